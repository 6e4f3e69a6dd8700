//! The minijinja environment of a project, and typed rendering of values.
//!
//! Every template and expression of a project is compiled once, when the
//! project is checked, and kept in a `Templates` value owned by the compiled
//! project. At run time a template is found by index; nothing is parsed or
//! compiled on a request.
//!
//! The typed body rule: a string that is exactly one `{{ expr }}` is an
//! expression and keeps its JSON type; any other string renders as text.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::sync::LazyLock;

use minijinja::{Environment, Error, Expression, Template, UndefinedBehavior, Value};
use regex::Regex;

/// Instructions one render may execute before it is stopped, so that no
/// template can spin forever.
pub const TEMPLATE_FUEL: u64 = 50_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TemplateId(u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExpressionId(u32);

/// A value whose strings are templates, compiled.
#[derive(Debug, Clone)]
pub enum ValueTemplate {
    /// No template inside: used as it is.
    Literal(serde_json::Value),
    /// A lone `{{ expr }}`: keeps the expression's type.
    Expression(ExpressionId),
    /// Any other string containing template syntax: renders as text.
    Text(TemplateId),
    List(Vec<ValueTemplate>),
    Map(Vec<(String, ValueTemplate)>),
}

fn new_environment() -> Environment<'static> {
    let mut environment = Environment::new();
    environment.set_undefined_behavior(UndefinedBehavior::SemiStrict);
    environment.set_fuel(Some(TEMPLATE_FUEL));
    environment.set_recursion_limit(64);
    environment.set_debug(true);
    // `debug()` would print the whole context, redacted fields included,
    // into a reply.
    environment.remove_global("debug");
    environment
}

/// Names the environment defines globally; templates may use them freely.
pub fn is_global_name(name: &str) -> bool {
    matches!(
        name,
        "range" | "dict" | "namespace" | "none" | "true" | "false" | "loop"
    )
}

/// What the static checks need to know about one compiled template.
#[derive(Debug)]
pub struct Analysis {
    /// Variables read from the context, as dotted paths (`placed.order_id`).
    pub variables: HashSet<String>,
}

/// Collects templates while a project is checked.
///
/// Identical sources are compiled once and share an id: bodies repeat
/// `{{ user_id }}` or `{{ trace_id }}` in every call, and each compiled
/// template costs a few kilobytes for as long as the project is loaded.
pub struct TemplatesBuilder {
    environment: Environment<'static>,
    template_count: u32,
    expression_sources: Vec<String>,
    templates_by_source: HashMap<String, (TemplateId, Arc<Analysis>)>,
    expressions_by_source: HashMap<String, (ExpressionId, Arc<Analysis>)>,
}

impl fmt::Debug for TemplatesBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TemplatesBuilder")
            .field("templates", &self.template_count)
            .field("expressions", &self.expression_sources.len())
            .finish()
    }
}

impl Default for TemplatesBuilder {
    fn default() -> Self {
        TemplatesBuilder {
            environment: new_environment(),
            template_count: 0,
            expression_sources: Vec::new(),
            templates_by_source: HashMap::new(),
            expressions_by_source: HashMap::new(),
        }
    }
}

fn template_name(index: u32) -> String {
    format!("template-{index}")
}

impl TemplatesBuilder {
    /// Compiles a text template.
    pub fn add_template(&mut self, source: &str) -> Result<(TemplateId, Arc<Analysis>), Error> {
        if let Some((id, analysis)) = self.templates_by_source.get(source) {
            return Ok((*id, analysis.clone()));
        }
        let index = self.template_count;
        let name = template_name(index);
        self.environment
            .add_template_owned(name.clone(), source.to_owned())?;
        let template = self.environment.get_template(&name)?;
        let analysis = Arc::new(Analysis {
            variables: template.undeclared_variables(true),
        });
        self.template_count += 1;
        let id = TemplateId(index);
        self.templates_by_source
            .insert(source.to_owned(), (id, analysis.clone()));
        Ok((id, analysis))
    }

    /// Compiles an expression (the text of an `if:`, or a lone `{{ expr }}`).
    pub fn add_expression(&mut self, source: &str) -> Result<(ExpressionId, Arc<Analysis>), Error> {
        if let Some((id, analysis)) = self.expressions_by_source.get(source) {
            return Ok((*id, analysis.clone()));
        }
        let expression = self.environment.compile_expression(source)?;
        let analysis = Arc::new(Analysis {
            variables: expression.undeclared_variables(true),
        });
        let index = u32::try_from(self.expression_sources.len()).unwrap_or(u32::MAX);
        self.expression_sources.push(source.to_owned());
        let id = ExpressionId(index);
        self.expressions_by_source
            .insert(source.to_owned(), (id, analysis.clone()));
        Ok((id, analysis))
    }

    pub fn finish(self) -> Result<Templates, Error> {
        let template_count = self.template_count;
        let expression_sources = self.expression_sources;
        drop(self.templates_by_source);
        drop(self.expressions_by_source);
        let cell = TemplateCell::try_new(self.environment, |environment| {
            let templates = (0..template_count)
                .map(|index| environment.get_template(&template_name(index)))
                .collect::<Result<Vec<_>, _>>()?;
            let expressions = expression_sources
                .into_iter()
                .map(|source| environment.compile_expression_owned(source))
                .collect::<Result<Vec<_>, _>>()?;
            Ok::<_, Error>(Compiled {
                templates,
                expressions,
            })
        })?;
        Ok(Templates { cell })
    }
}

struct Compiled<'environment> {
    templates: Vec<Template<'environment, 'environment>>,
    expressions: Vec<Expression<'environment, 'static>>,
}

self_cell::self_cell!(
    struct TemplateCell {
        owner: Environment<'static>,
        #[not_covariant]
        dependent: Compiled,
    }
);

/// Every compiled template and expression of a project.
pub struct Templates {
    cell: TemplateCell,
}

impl fmt::Debug for Templates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.cell.with_dependent(|_, compiled| {
            f.debug_struct("Templates")
                .field("templates", &compiled.templates.len())
                .field("expressions", &compiled.expressions.len())
                .finish()
        })
    }
}

impl Templates {
    pub fn render(&self, id: TemplateId, context: &Value) -> Result<String, Error> {
        self.cell
            .with_dependent(|_, compiled| match compiled.templates.get(id.0 as usize) {
                Some(template) => template.render(context),
                None => Err(missing(id.0)),
            })
    }

    pub fn evaluate(&self, id: ExpressionId, context: &Value) -> Result<Value, Error> {
        self.cell.with_dependent(
            |_, compiled| match compiled.expressions.get(id.0 as usize) {
                Some(expression) => expression.eval(context),
                None => Err(missing(id.0)),
            },
        )
    }

    /// Renders a value template to JSON by the typed body rule.
    pub fn render_value(
        &self,
        value: &ValueTemplate,
        context: &Value,
    ) -> Result<serde_json::Value, Error> {
        Ok(match value {
            ValueTemplate::Literal(literal) => literal.clone(),
            ValueTemplate::Text(id) => serde_json::Value::String(self.render(*id, context)?),
            ValueTemplate::Expression(id) => {
                let value = self.evaluate(*id, context)?;
                if value.is_undefined() {
                    return Err(Error::new(
                        minijinja::ErrorKind::UndefinedError,
                        "the expression is undefined",
                    ));
                }
                serde_json::to_value(&value).map_err(|error| {
                    Error::new(minijinja::ErrorKind::BadSerialization, error.to_string())
                })?
            }
            ValueTemplate::List(items) => serde_json::Value::Array(
                items
                    .iter()
                    .map(|item| self.render_value(item, context))
                    .collect::<Result<_, _>>()?,
            ),
            ValueTemplate::Map(entries) => serde_json::Value::Object(
                entries
                    .iter()
                    .map(|(key, value)| Ok((key.clone(), self.render_value(value, context)?)))
                    .collect::<Result<_, Error>>()?,
            ),
        })
    }
}

fn missing(index: u32) -> Error {
    Error::new(
        minijinja::ErrorKind::InvalidOperation,
        format!("no compiled template {index}"),
    )
}

/// The expression inside a string that is exactly one `{{ expr }}`, if it is one.
pub fn lone_expression(text: &str) -> Option<&str> {
    static LONE: LazyLock<Regex> = LazyLock::new(|| {
        #[allow(clippy::expect_used)]
        Regex::new(r"(?s)^\s*\{\{[-+]?(.*?)[-+]?\}\}\s*$")
            .expect("the lone-expression pattern is valid")
    });
    let inner = LONE.captures(text)?.get(1)?.as_str();
    if inner.contains("{{") || inner.contains("}}") || inner.contains("{%") {
        return None;
    }
    Some(inner.trim())
}

/// Whether a string contains any template syntax at all.
pub fn has_template_syntax(text: &str) -> bool {
    text.contains("{{") || text.contains("{%") || text.contains("{#")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lone_expression_is_one_expression_and_nothing_else() {
        assert_eq!(lone_expression("{{ input.items }}"), Some("input.items"));
        assert_eq!(lone_expression("  {{- a or 'x' -}} "), Some("a or 'x'"));
        assert_eq!(lone_expression("Hi {{ name }}"), None);
        assert_eq!(lone_expression("{{ a }} and {{ b }}"), None);
        assert_eq!(lone_expression("{% if a %}{{ a }}{% endif %}"), None);
        assert_eq!(lone_expression("plain"), None);
    }

    fn render(
        value: ValueTemplate,
        builder: TemplatesBuilder,
        context: serde_json::Value,
    ) -> serde_json::Value {
        let templates = builder.finish().unwrap();
        templates
            .render_value(&value, &Value::from(minijinja::value::Serde(&context)))
            .unwrap()
    }

    #[test]
    fn a_lone_expression_keeps_its_json_type() {
        let mut builder = TemplatesBuilder::default();
        let (items, _) = builder.add_expression("input.items").unwrap();
        let (count, _) = builder.add_expression("input.items | length").unwrap();
        let (text, _) = builder
            .add_template("{{ input.items | length }} items")
            .unwrap();
        let value = ValueTemplate::Map(vec![
            ("items".into(), ValueTemplate::Expression(items)),
            ("count".into(), ValueTemplate::Expression(count)),
            ("text".into(), ValueTemplate::Text(text)),
            ("fixed".into(), ValueTemplate::Literal(json!(true))),
        ]);
        let context = json!({"input": {"items": [{"id": "p1", "qty": 2}]}});
        assert_eq!(
            render(value, builder, context),
            json!({"items": [{"id": "p1", "qty": 2}], "count": 1, "text": "1 items", "fixed": true})
        );
    }

    #[test]
    fn undefined_values_are_errors_but_can_be_tested() {
        let mut builder = TemplatesBuilder::default();
        let (printed, _) = builder.add_template("{{ input.missing }}").unwrap();
        let (tested, _) = builder.add_expression("not input.missing").unwrap();
        let (lone, _) = builder.add_expression("input.missing").unwrap();
        let templates = builder.finish().unwrap();
        let context = Value::from(minijinja::value::Serde(json!({"input": {}})));
        assert!(templates.render(printed, &context).is_err());
        assert_eq!(
            templates.evaluate(tested, &context).unwrap(),
            Value::from(true)
        );
        assert!(
            templates
                .render_value(&ValueTemplate::Expression(lone), &context)
                .is_err()
        );
    }

    #[test]
    fn runaway_templates_run_out_of_fuel() {
        let mut builder = TemplatesBuilder::default();
        let (id, _) = builder
            .add_template(
                "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            )
            .unwrap();
        let templates = builder.finish().unwrap();
        let error = templates.render(id, &Value::from(())).unwrap_err();
        assert_eq!(error.kind(), minijinja::ErrorKind::OutOfFuel);
    }

    #[test]
    fn analysis_lists_dotted_paths() {
        let mut builder = TemplatesBuilder::default();
        let (_, analysis) = builder
            .add_template(
                "{% for c in menu.categories %}{{ c.name }}{% endfor %}{{ placed.order_id }}",
            )
            .unwrap();
        let mut variables: Vec<_> = analysis.variables.iter().cloned().collect();
        variables.sort();
        assert_eq!(variables, ["menu.categories", "placed.order_id"]);
    }
}
