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

use minijinja::value::{Enumerator, Object, ObjectExt, ObjectRepr};
use minijinja::{Environment, Error, Expression, Template, UndefinedBehavior, Value};
use regex::Regex;
use yoke::Yoke;

use crate::document::Document;

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
    environment.add_filter("money", money);
    environment
}

/// `{{ price | money }}`: a number with exactly two decimals (`6.5` →
/// `6.50`), the text `"%.2f" | format(price)` writes, without parsing a
/// printf format at every call (a menu prints a dozen prices).
fn money(value: minijinja::Value) -> Result<String, minijinja::Error> {
    match f64::try_from(value.clone()) {
        Ok(number) if value.kind() == minijinja::value::ValueKind::Number => {
            Ok(two_decimals(number))
        }
        _ => Err(minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            format!("`money` needs a number, not {}", value.kind()),
        )),
    }
}

/// `{number:.2}`, most often without its exact (and, for most binary
/// fractions, bignum) rounding: when the shortest text that reads back as
/// `number` has at most two decimals and `number` is below 2^45, it is the
/// answer. That text is within half a unit in the last place of `number`,
/// under 0.002 there, so no other two-decimal number is nearer to it.
fn two_decimals(number: f64) -> String {
    use std::fmt::Write as _;
    /// 2^45: below it, a unit in the last place is at most 2^-8.
    const EXACT_BELOW: f64 = 35_184_372_088_832.0;
    let mut text = String::with_capacity(24);
    if number.is_finite() && number.abs() < EXACT_BELOW {
        let _ = write!(text, "{number}");
        match text.find('.').map(|dot| text.len() - dot - 1) {
            None => text.push_str(".00"),
            Some(1) => text.push('0'),
            Some(2) => {}
            Some(_) => {
                text.clear();
                let _ = write!(text, "{number:.2}");
            }
        }
        return text;
    }
    let _ = write!(text, "{number:.2}");
    text
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
        let paths = expression_sources
            .iter()
            .map(|source| plain_path(source))
            .collect();
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
        Ok(Templates { cell, paths })
    }
}

/// The names of an expression that only reads a variable (`user_id`,
/// `menu.categories`): names joined by dots, none a literal or an operator.
fn plain_path(source: &str) -> Option<Box<[Box<str>]>> {
    let names: Vec<&str> = source.trim().split('.').collect();
    let plain = names.iter().all(|name| {
        let mut characters = name.chars();
        characters
            .next()
            .is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
            && characters.all(|character| character.is_ascii_alphanumeric() || character == '_')
            && !matches!(
                *name,
                "true"
                    | "false"
                    | "none"
                    | "True"
                    | "False"
                    | "None"
                    | "and"
                    | "or"
                    | "not"
                    | "in"
                    | "is"
                    | "if"
                    | "else"
            )
    });
    plain.then(|| names.into_iter().map(Box::from).collect())
}

/// A plain path read from the context as minijinja reads it, when every
/// step finds a value; `None` leaves the expression to minijinja, which
/// decides what a missing step means (a global, undefined, an error).
fn read_path(context: &Value, path: &[Box<str>]) -> Option<Value> {
    let mut value = context.clone();
    for name in path {
        value = value.get_attr(name).ok()?;
        if matches!(
            value.kind(),
            minijinja::value::ValueKind::Undefined | minijinja::value::ValueKind::Invalid
        ) {
            return None;
        }
    }
    Some(value)
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
    /// Per expression, its names when it only reads a variable: read
    /// without starting minijinja's machine, which costs more than the
    /// lookup itself (a call body's `{{ user_id }}`).
    paths: Vec<Option<Box<[Box<str>]>>>,
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
        if let Some(Some(path)) = self.paths.get(id.0 as usize)
            && let Some(value) = read_path(context, path)
        {
            return Ok(value);
        }
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
                to_json(&value)?
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

/// A JSON document as a template value, without converting it: templates
/// see its maps and lists as views into the one shared document, made only
/// when a template reaches them, and its scalars converted when read. A
/// service answer is often larger than what its flow reads. Maps keep the
/// document's key order.
pub fn json_document<D: Tree>(document: D) -> Value {
    JsonView(Yoke::attach_to_cart(Arc::new(document), |value| value)).into_value()
}

/// A JSON tree templates read in place: a service answer (`Document`) or
/// a `serde_json` value (the request, the session, a webhook's payload).
pub trait Tree: fmt::Debug + Send + Sync + 'static {
    /// A scalar as a template value; `None` for maps and lists.
    fn scalar(&self) -> Option<Value>;
    fn is_list(&self) -> bool;
    fn is_map(&self) -> bool;
    /// Members of a map, items of a list, 0 for a scalar.
    fn size(&self) -> usize;
    fn item(&self, index: usize) -> Option<&Self>;
    fn member(&self, name: &str) -> Option<&Self>;
    /// A map's names, in its order.
    fn names(&self) -> Box<dyn Iterator<Item = Value> + Send + Sync + '_>;
    fn to_json(&self) -> serde_json::Value;
}

/// A node of a shared JSON document (see `json_document`).
#[derive(Clone)]
struct JsonView<D: Tree>(Yoke<&'static D, Arc<D>>);

impl<D: Tree> JsonView<D> {
    fn node(&self) -> &D {
        self.0.get()
    }

    fn into_value(self) -> Value {
        match self.node().scalar() {
            Some(value) => value,
            None => Value::from_object(self),
        }
    }

    /// The child `pick` finds, as a template value.
    fn child(&self, pick: impl for<'a> Fn(&'a D) -> Option<&'a D>) -> Option<Value> {
        let child = pick(self.node())?;
        if let Some(value) = child.scalar() {
            return Some(value);
        }
        // A map or a list: a view sharing the document. `pick` found it
        // above, so it finds it again.
        self.0
            .try_map_project_cloned(|node, _| pick(node).ok_or(()))
            .ok()
            .map(|view| Value::from_object(JsonView(view)))
    }
}

impl Tree for serde_json::Value {
    fn scalar(&self) -> Option<Value> {
        Some(match self {
            serde_json::Value::Null => Value::from(()),
            serde_json::Value::Bool(flag) => Value::from(*flag),
            serde_json::Value::Number(number) => number_value(number),
            serde_json::Value::String(text) => Value::from(text.as_str()),
            serde_json::Value::Array(_) | serde_json::Value::Object(_) => return None,
        })
    }

    fn is_list(&self) -> bool {
        self.is_array()
    }

    fn is_map(&self) -> bool {
        self.is_object()
    }

    fn size(&self) -> usize {
        match self {
            serde_json::Value::Object(map) => map.len(),
            serde_json::Value::Array(items) => items.len(),
            _ => 0,
        }
    }

    fn item(&self, index: usize) -> Option<&Self> {
        self.as_array()?.get(index)
    }

    /// The objects read here are small, and under nine members comparing
    /// names costs less than hashing one (the order-preserving map hashes
    /// with SipHash); names are unique in the map, so both find the same
    /// member.
    fn member(&self, name: &str) -> Option<&Self> {
        let map = self.as_object()?;
        if map.len() <= 8 {
            map.iter()
                .find_map(|(member, value)| (member == name).then_some(value))
        } else {
            map.get(name)
        }
    }

    fn names(&self) -> Box<dyn Iterator<Item = Value> + Send + Sync + '_> {
        match self {
            serde_json::Value::Object(map) => {
                Box::new(map.keys().map(|key| Value::from(key.as_str())))
            }
            _ => Box::new(std::iter::empty()),
        }
    }

    fn to_json(&self) -> serde_json::Value {
        self.clone()
    }
}

impl Tree for Document {
    fn scalar(&self) -> Option<Value> {
        Some(match self {
            Document::Null => Value::from(()),
            Document::Bool(flag) => Value::from(*flag),
            Document::Number(number) => number_value(number),
            Document::String(text) => Value::from(text.as_str()),
            Document::Array(_) | Document::Object(_) => return None,
        })
    }

    fn is_list(&self) -> bool {
        matches!(self, Document::Array(_))
    }

    fn is_map(&self) -> bool {
        matches!(self, Document::Object(_))
    }

    fn size(&self) -> usize {
        match self {
            Document::Object(map) => map.len(),
            Document::Array(items) => items.len(),
            _ => 0,
        }
    }

    fn item(&self, index: usize) -> Option<&Self> {
        match self {
            Document::Array(items) => items.get(index),
            _ => None,
        }
    }

    fn member(&self, name: &str) -> Option<&Self> {
        match self {
            Document::Object(map) => map.get(name),
            _ => None,
        }
    }

    fn names(&self) -> Box<dyn Iterator<Item = Value> + Send + Sync + '_> {
        match self {
            Document::Object(map) => Box::new(map.iter().map(|(name, _)| Value::from(name))),
            _ => Box::new(std::iter::empty()),
        }
    }

    fn to_json(&self) -> serde_json::Value {
        Document::to_json(self)
    }
}

/// A JSON number as a template value: an integer when it is one.
fn number_value(number: &serde_json::Number) -> Value {
    if let Some(unsigned) = number.as_u64() {
        Value::from(unsigned)
    } else if let Some(signed) = number.as_i64() {
        Value::from(signed)
    } else {
        Value::from(number.as_f64().unwrap_or(f64::NAN))
    }
}

impl<D: Tree> fmt::Debug for JsonView<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.node(), f)
    }
}

impl<D: Tree> Object for JsonView<D> {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        if self.node().is_list() {
            ObjectRepr::Seq
        } else {
            ObjectRepr::Map
        }
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let node = self.node();
        if node.is_map() {
            self.get_value_by_str(key.as_str()?)
        } else if node.is_list() {
            let index = key.as_usize()?;
            self.child(|node| node.item(index))
        } else {
            None
        }
    }

    fn get_value_by_str(self: &Arc<Self>, key: &str) -> Option<Value> {
        self.child(|node| node.member(key))
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        let node = self.node();
        if node.is_map() {
            self.mapped_enumerator(|this| this.node().names())
        } else if node.is_list() {
            // By index through `get_value`: a sequence of known length, so
            // `loop.length`, `loop.last` and `|last` work as on any list.
            Enumerator::Seq(node.size())
        } else {
            Enumerator::Empty
        }
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        Some(self.node().size())
    }
}

/// The JSON a template value stands for: a document view as it is in the
/// document (numbers keep their exact type), anything else serialized.
pub fn to_json(value: &Value) -> Result<serde_json::Value, Error> {
    if let Some(view) = value.downcast_object_ref::<JsonView<Document>>() {
        return Ok(view.node().to_json());
    }
    if let Some(view) = value.downcast_object_ref::<JsonView<serde_json::Value>>() {
        return Ok(view.node().clone());
    }
    serde_json::to_value(value)
        .map_err(|error| Error::new(minijinja::ErrorKind::BadSerialization, error.to_string()))
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

    /// Expressions that only read a variable give what minijinja gives,
    /// and the rest still go to minijinja.
    #[test]
    fn plain_paths_read_what_minijinja_reads() {
        let sources = [
            "user_id",
            " menu.categories ",
            "menu.output.text",
            "menu.output",
            "menu.missing",
            "menu.missing.deeper",
            "missing",
            "range",
            "none",
            "true",
            "session.name",
            "input.list",
            "nothing",
            "user_id.length",
            "menu.categories.0",
            "menu.output.text | upper",
        ];
        let mut builder = TemplatesBuilder::default();
        let ids: Vec<ExpressionId> = sources
            .iter()
            .map(|source| builder.add_expression(source).unwrap().0)
            .collect();
        let templates = builder.finish().unwrap();
        let answer = Document::parse(
            br#"{"categories": [{"name": "Mains"}], "output": {"text": "Hi"}, "n": 1}"#,
        )
        .unwrap();
        let context = Value::from(std::collections::BTreeMap::from([
            ("user_id".to_owned(), Value::from("u-1")),
            ("menu".to_owned(), json_document(answer)),
            (
                "session".to_owned(),
                json_document(serde_json::json!({"name": "Ada"})),
            ),
            (
                "input".to_owned(),
                json_document(serde_json::json!({"list": [1, 2]})),
            ),
            ("nothing".to_owned(), Value::from(())),
        ]));
        let environment = new_environment();
        for (source, id) in sources.iter().zip(ids) {
            let fast = templates.evaluate(id, &context);
            let full = environment
                .compile_expression(source)
                .unwrap()
                .eval(&context);
            match (fast, full) {
                (Ok(fast), Ok(full)) => {
                    assert_eq!(fast, full, "{source}");
                    assert_eq!(fast.kind(), full.kind(), "{source}");
                }
                (Err(fast), Err(full)) => assert_eq!(fast.kind(), full.kind(), "{source}"),
                (fast, full) => panic!("{source}: {fast:?} against {full:?}"),
            }
        }
        assert!(plain_path("menu.output.text").is_some());
        for not_plain in ["true", "a.none", "a..b", "a.0", "a b", "a|b", "", "a.", "é"] {
            assert!(plain_path(not_plain).is_none(), "{not_plain}");
        }
    }

    #[test]
    fn money_writes_what_printf_writes_for_every_number() {
        let environment = new_environment();
        for value in [
            minijinja::Value::from(6.5),
            minijinja::Value::from(10),
            minijinja::Value::from(0.005),
            minijinja::Value::from(2.675),
            minijinja::Value::from(-3.125),
            minijinja::Value::from(1e21),
            minijinja::Value::from(123456.999),
        ] {
            let context = minijinja::context! { x => value.clone() };
            let money = environment
                .render_str("{{ x | money }}", context.clone())
                .unwrap();
            let printf = environment
                .render_str("{{ \"%.2f\" | format(x) }}", context)
                .unwrap();
            assert_eq!(money, printf, "{value}");
        }
        let text = minijinja::context! { x => "6.50" };
        assert!(environment.render_str("{{ x | money }}", text).is_err());
    }

    #[test]
    fn two_decimals_is_exact_rounding_on_and_off_its_fast_path() {
        let mut numbers = vec![
            0.0,
            -0.0,
            0.125,
            0.375,
            1.005,
            1.015,
            2.675,
            1e-9,
            35_184_372_088_831.99,
            35_184_372_088_832.0,
            35_184_372_088_832.5,
            1e300,
            -1e-300,
            f64::MAX,
            f64::MIN_POSITIVE,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ];
        // Cents, thirds, eighths and sevenths over six orders of magnitude,
        // and values a hair off each cent.
        for i in 0..200_000_i64 {
            let i = i as f64;
            numbers.extend([i / 100.0, i / 3.0, i / 8.0, i / 7.0 * 1e3, -i / 100.0]);
            numbers.push(f64::from_bits((i / 100.0).to_bits() + 1));
            numbers.push(f64::from_bits((i / 100.0).to_bits().saturating_sub(1)));
        }
        for number in numbers {
            assert_eq!(two_decimals(number), format!("{number:.2}"), "{number:e}");
        }
    }
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
    fn json_documents_read_like_converted_json_and_keep_key_order() {
        let json = json!({
            "z": [1, -2, 3.5, 18446744073709551615u64, null, true, "text"],
            "a": {"nested": {"deep": "value"}, "empty": {}, "list": []},
            "long": "a string longer than the small-string optimisation holds",
        });
        let document = super::json_document(json.clone());
        let converted = Value::from(minijinja::value::Serde(&json));
        assert_eq!(document, converted);
        let env = minijinja::Environment::new();
        let render = |source: &str| {
            env.render_str(source, minijinja::context! { doc => document.clone() })
                .unwrap()
        };
        assert_eq!(
            render("{{ doc.z[0] + doc.z[1] }} {{ doc.z[-1] }} {{ doc.z[3] }}"),
            "-1 text 18446744073709551615"
        );
        assert_eq!(
            render("{{ doc.a.nested.deep }} {{ doc['long'] | length }}"),
            "value 56"
        );
        assert_eq!(
            render(
                "{{ doc.a.empty is mapping }} {{ doc.z is sequence }} {{ doc.a.list | length }}"
            ),
            "True True 0"
        );
        assert_eq!(
            render(
                "{% if doc.a.empty %}x{% else %}empty{% endif %} {{ doc.missing is undefined }}"
            ),
            "empty True"
        );
        // Loops over lists know their length.
        assert_eq!(
            render(
                "{% for x in doc.z %}{{ loop.index }}/{{ loop.length }}{% if loop.last %}!{% endif %} {% endfor %}"
            ),
            "1/7 2/7 3/7 4/7 5/7 6/7 7/7! "
        );
        assert_eq!(
            render("{{ doc.z | last }} {{ doc.z | reverse | first }} {{ doc.a.list | length }}"),
            "text text 0"
        );
        assert_eq!(
            render("{% for key in doc %}{{ loop.length }}{% endfor %}"),
            "333"
        );
        // Keys in the document's order, not sorted.
        assert_eq!(
            render("{% for key in doc %}{{ key }},{% endfor %}"),
            "z,a,long,"
        );
        assert_eq!(
            render(
                "{% for key, value in doc.a | items %}{{ key }}={{ value | length }};{% endfor %}"
            ),
            "nested=1;empty=0;list=0;"
        );
        // A view turns back into exactly the JSON it points at.
        let nested = env
            .compile_expression("doc.z")
            .unwrap()
            .eval(minijinja::context! { doc => document.clone() })
            .unwrap();
        assert_eq!(super::to_json(&nested).unwrap(), json["z"]);
        assert_eq!(super::to_json(&document).unwrap(), json);
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
