//! Templates, expressions and template values: compiled into the project's
//! template set, with every variable they read checked against the scope of
//! the step they are in.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use serde_json::Value as Json;

use crate::diagnostic::{Code, Diagnostic, Location, did_you_mean};
use crate::spec::{self, Position, Spanned, TemplateValue};
use crate::template::{self, Analysis, ValueTemplate};

use super::Checker;
use super::flows::{BASE_VARIABLES, Binding, FlowFacts, Scope};
use super::schemas::schema_path;

const INTENT_FIELDS: &[&str] = &["name", "confidence", "entities"];
const ERROR_FIELDS: &[&str] = &["code", "message", "service", "status"];

/// What the variables of a template are checked against.
pub(super) enum Vars<'c, 's> {
    /// A step of a flow: the flow's scope at that step.
    Flow(&'c Scope, &'c FlowFacts<'s>),
    /// A channel's mapping: a fixed set of names, and `body` (the payload)
    /// checked against the channel's payload schema when it has one.
    Channel(&'c ChannelVars),
}

pub(super) struct ChannelVars {
    pub(super) roots: &'static [&'static str],
    pub(super) body_schema: Option<Arc<Json>>,
}

impl Checker<'_> {
    pub(super) fn compile_text(
        &mut self,
        file: &Path,
        text: &spec::Text,
        scope: &Scope,
        facts: &FlowFacts<'_>,
    ) -> Option<template::TemplateId> {
        self.compile_text_in(file, text, &Vars::Flow(scope, facts))
    }

    pub(super) fn compile_text_in(
        &mut self,
        file: &Path,
        text: &spec::Text,
        vars: &Vars<'_, '_>,
    ) -> Option<template::TemplateId> {
        match self.templates.add_template(&text.value) {
            Ok((id, analysis)) => {
                self.check_vars(file, text.position, &analysis, vars);
                Some(id)
            }
            Err(error) => {
                self.template_error(file, text.position, &text.value, &error);
                None
            }
        }
    }

    pub(super) fn compile_expression<T>(
        &mut self,
        file: &Path,
        at: &Spanned<T>,
        source: &str,
        scope: &Scope,
        facts: &FlowFacts<'_>,
    ) -> Option<template::ExpressionId> {
        self.compile_expression_in(file, at, source, &Vars::Flow(scope, facts))
    }

    pub(super) fn compile_expression_in<T>(
        &mut self,
        file: &Path,
        at: &Spanned<T>,
        source: &str,
        vars: &Vars<'_, '_>,
    ) -> Option<template::ExpressionId> {
        // `if: "{{ x }}"` is accepted as the expression `x`.
        let expression = template::lone_expression(source).unwrap_or(source);
        match self.templates.add_expression(expression) {
            Ok((id, analysis)) => {
                self.check_vars(file, at.position, &analysis, vars);
                Some(id)
            }
            Err(error) => {
                self.template_error(file, at.position, source, &error);
                None
            }
        }
    }

    pub(super) fn compile_value(
        &mut self,
        file: &Path,
        value: &Spanned<TemplateValue>,
        scope: &Scope,
        facts: &FlowFacts<'_>,
    ) -> Option<ValueTemplate> {
        self.compile_value_in(file, value, &Vars::Flow(scope, facts))
    }

    pub(super) fn compile_value_in(
        &mut self,
        file: &Path,
        value: &Spanned<TemplateValue>,
        vars: &Vars<'_, '_>,
    ) -> Option<ValueTemplate> {
        match &value.value {
            TemplateValue::String(text) => {
                if let Some(expression) = template::lone_expression(text) {
                    let at = Spanned::new((), value.position);
                    let expression = expression.to_owned();
                    match self.templates.add_expression(&expression) {
                        Ok((id, analysis)) => {
                            self.check_vars(file, at.position, &analysis, vars);
                            Some(ValueTemplate::Expression(id))
                        }
                        Err(error) => {
                            self.template_error(file, value.position, text, &error);
                            None
                        }
                    }
                } else if template::has_template_syntax(text) {
                    let spanned = Spanned::new(text.clone(), value.position);
                    self.compile_text_in(file, &spanned, vars)
                        .map(ValueTemplate::Text)
                } else {
                    Some(ValueTemplate::Literal(Json::String(text.clone())))
                }
            }
            TemplateValue::List(items) => {
                let compiled: Vec<Option<ValueTemplate>> = items
                    .iter()
                    .map(|item| self.compile_value_in(file, item, vars))
                    .collect();
                Some(ValueTemplate::List(
                    compiled.into_iter().collect::<Option<_>>()?,
                ))
            }
            TemplateValue::Map(entries) => {
                let compiled: Vec<Option<(String, ValueTemplate)>> = entries
                    .iter()
                    .map(|(key, value)| {
                        self.compile_value_in(file, value, vars)
                            .map(|value| (key.value.clone(), value))
                    })
                    .collect();
                Some(ValueTemplate::Map(
                    compiled.into_iter().collect::<Option<_>>()?,
                ))
            }
            other => Some(ValueTemplate::Literal(other.to_json())),
        }
    }

    fn check_vars(&mut self, file: &Path, position: Position, analysis: &Analysis, vars: &Vars) {
        match vars {
            Vars::Flow(scope, facts) => {
                self.check_variables(file, position, analysis, scope, facts)
            }
            Vars::Channel(channel) => {
                self.check_channel_variables(file, position, analysis, channel)
            }
        }
    }

    /// A channel's templates read only the names of their context, and
    /// `body` paths that the payload schema has.
    fn check_channel_variables(
        &mut self,
        file: &Path,
        position: Position,
        analysis: &Analysis,
        vars: &ChannelVars,
    ) {
        let mut paths: Vec<&String> = analysis.variables.iter().collect();
        paths.sort();
        let mut reported_roots: HashSet<&str> = HashSet::new();
        for path in paths {
            let segments: Vec<&str> = path.split('.').collect();
            let root = segments[0];
            if template::is_global_name(root) {
                continue;
            }
            if vars.roots.contains(&root) {
                if root == "body"
                    && let Some(schema) = &vars.body_schema
                {
                    self.check_schema_path(
                        file,
                        position,
                        &segments,
                        schema,
                        "the payload schema of this channel",
                        Code::UnknownResponseField,
                    );
                }
                continue;
            }
            if !reported_roots.insert(root) {
                continue;
            }
            let location = self.find_in_source(file, position, root).map_or_else(
                || Location::new(file, position, 1),
                |found| Location::new(file, found, root.chars().count()),
            );
            self.unknown_variable(location, root, vars.roots);
        }
    }

    /// `unknown variable` at `location`, with the closest known name or the
    /// list of them.
    fn unknown_variable(&mut self, location: Location, root: &str, known: &[&str]) {
        let hint = did_you_mean(root, known.iter().copied()).unwrap_or_else(|| {
            format!(
                "variables here: {}",
                known
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        });
        self.push(
            Diagnostic::error(
                Code::UnknownVariable,
                location,
                format!("unknown variable `{root}`"),
            )
            .with_hint(hint),
        );
    }

    fn template_error(
        &mut self,
        file: &Path,
        position: Position,
        source: &str,
        error: &minijinja::Error,
    ) {
        let located = error
            .range()
            .and_then(|range| error_excerpt(source, range))
            .and_then(|excerpt| self.find_in_source(file, position, excerpt));
        let detail = error
            .detail()
            .map(str::to_owned)
            .unwrap_or_else(|| error.kind().to_string());
        self.push(
            Diagnostic::error(
                Code::TemplateSyntax,
                Location::new(file, located.unwrap_or(position), 1),
                format!("template syntax error: {detail}"),
            )
            .with_hint(
                "templates use Jinja syntax: `{{ expression }}`, `{% if ... %}...{% endif %}`",
            ),
        );
    }

    /// Finds `needle` in the file at or after `from`, within the next lines;
    /// maps a place inside a template back to the file.
    fn find_in_source(&self, file: &Path, from: Position, needle: &str) -> Option<Position> {
        const SEARCH_LINES: usize = 400;
        if needle.trim().is_empty() {
            return None;
        }
        let text = self.sources.get(file)?;
        for (index, line) in text
            .lines()
            .enumerate()
            .skip(from.line.saturating_sub(1) as usize)
            .take(SEARCH_LINES)
        {
            let start_column = if index + 1 == from.line as usize {
                line.char_indices()
                    .nth(from.column.saturating_sub(1) as usize)
                    .map_or(line.len(), |(byte, _)| byte)
            } else {
                0
            };
            if let Some(offset) = line[start_column..].find(needle) {
                let column = line[..start_column + offset].chars().count() + 1;
                return Some(Position {
                    line: u32::try_from(index + 1).unwrap_or(u32::MAX),
                    column: u32::try_from(column).unwrap_or(u32::MAX),
                });
            }
        }
        None
    }

    /// Every variable a template reads must exist at that point of the flow,
    /// and a path into a call's result must exist in its response schema.
    fn check_variables(
        &mut self,
        file: &Path,
        position: Position,
        analysis: &Analysis,
        scope: &Scope,
        facts: &FlowFacts<'_>,
    ) {
        let mut paths: Vec<&String> = analysis.variables.iter().collect();
        paths.sort();
        // `a.b` is reported under `a.b.c` too; keep the longest paths only
        // when checking schemas, and every root once.
        let mut reported_roots: HashSet<&str> = HashSet::new();
        for path in paths {
            let segments: Vec<&str> = path.split('.').collect();
            let root = segments[0];
            if template::is_global_name(root) {
                continue;
            }
            if let Some(binding) = scope.get(root) {
                if let Binding::Response(Some(schema)) = binding {
                    self.check_schema_path(
                        file,
                        position,
                        &segments,
                        schema,
                        "the response schema of this call",
                        Code::UnknownResponseField,
                    );
                }
                continue;
            }
            match root {
                "input" => {
                    if let Some(schema) = &facts.tool_input {
                        self.check_schema_path(
                            file,
                            position,
                            &segments,
                            schema,
                            "the input schema of this flow's tool",
                            Code::UnknownVariable,
                        );
                    }
                    continue;
                }
                "text" | "user_id" | "channel" | "session_id" | "trace_id" | "tenant"
                | "session" => continue,
                "intent" => {
                    if let Some(field) = segments.get(1) {
                        if !INTENT_FIELDS.contains(field) {
                            self.report_path(
                                file,
                                position,
                                &segments,
                                1,
                                &candidates(INTENT_FIELDS),
                                "`intent`",
                                Code::UnknownVariable,
                            );
                        } else if *field == "entities"
                            && let (Some(entity), Some(entities)) =
                                (segments.get(2), &facts.entities)
                            && !entities.contains(*entity)
                        {
                            let known: Vec<String> = entities.iter().cloned().collect();
                            self.report_path(
                                file,
                                position,
                                &segments,
                                2,
                                &known,
                                "the entities of this flow's intents",
                                Code::UnknownVariable,
                            );
                        }
                    }
                    continue;
                }
                "error" if scope.in_on_error => {
                    if let Some(field) = segments.get(1)
                        && !ERROR_FIELDS.contains(field)
                    {
                        self.report_path(
                            file,
                            position,
                            &segments,
                            1,
                            &candidates(ERROR_FIELDS),
                            "`error`",
                            Code::UnknownVariable,
                        );
                    }
                    continue;
                }
                _ => {}
            }
            if !reported_roots.insert(root) {
                continue;
            }
            let location = self.find_in_source(file, position, root).map_or_else(
                || Location::new(file, position, 1),
                |found| Location::new(file, found, root.chars().count()),
            );
            if facts.step_ids.contains(root) {
                self.push(
                    Diagnostic::error(
                        Code::UndefinedStepReference,
                        location,
                        format!("step `{root}` has not run at this point of flow `{}`", facts.name),
                    )
                    .with_hint(format!(
                        "a template can read a step's result only after that step, on a path where it surely ran; move the step `{root}` earlier or the reference later"
                    )),
                );
                continue;
            }
            let mut known: Vec<&str> = BASE_VARIABLES.to_vec();
            known.extend(scope.bindings.iter().map(|(name, _)| name.as_str()));
            if scope.in_on_error {
                known.push("error");
            }
            self.unknown_variable(location, root, &known);
        }
    }

    /// A dotted path (`root.a.b`) below its root must exist in `schema`;
    /// else the first segment that does not is reported, with `code`.
    fn check_schema_path(
        &mut self,
        file: &Path,
        position: Position,
        segments: &[&str],
        schema: &Json,
        what: &str,
        code: Code,
    ) {
        if let Err(failure) = schema_path(schema, schema, &segments[1..], 0) {
            self.report_path(
                file,
                position,
                segments,
                failure.segment + 1,
                &failure.candidates,
                what,
                code,
            );
        }
    }

    /// Reports the segment `bad` of a dotted path, pointing at it in the file.
    #[allow(clippy::too_many_arguments)]
    fn report_path(
        &mut self,
        file: &Path,
        position: Position,
        segments: &[&str],
        bad: usize,
        candidates: &[String],
        what: &str,
        code: Code,
    ) {
        let prefix = segments[..bad].join(".");
        let full = segments[..=bad.min(segments.len() - 1)].join(".");
        let segment = segments.get(bad).copied().unwrap_or_default();
        let location = match self.find_in_source(file, position, &full) {
            Some(found) => Location::new(
                file,
                Position {
                    line: found.line,
                    column: found.column + u32::try_from(prefix.chars().count() + 1).unwrap_or(0),
                },
                segment.chars().count(),
            ),
            None => Location::new(file, position, 1),
        };
        let hint =
            did_you_mean(segment, candidates.iter().map(String::as_str)).unwrap_or_else(|| {
                if candidates.is_empty() {
                    format!("{what} declares no fields here")
                } else {
                    format!(
                        "{what} has: {}",
                        candidates
                            .iter()
                            .map(|c| format!("`{c}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            });
        self.push(
            Diagnostic::error(
                code,
                location,
                format!("`{prefix}` has no field `{segment}` in {what}"),
            )
            .with_hint(hint),
        );
    }
}

fn candidates(names: &[&str]) -> Vec<String> {
    names.iter().map(|name| (*name).to_owned()).collect()
}

/// The text of `source` an error's byte range points at, up to the end of
/// its line: `None` when the range is not inside the source or not on
/// character boundaries (minijinja's ranges are bytes; a multi-byte
/// character may straddle them).
fn error_excerpt(source: &str, range: std::ops::Range<usize>) -> Option<&str> {
    let start = range.start;
    let line_end = source
        .get(start..)?
        .find('\n')
        .map_or(source.len(), |offset| start + offset);
    let mut end = line_end.min(range.end.max(start + 1)).min(source.len());
    while !source.is_char_boundary(end) {
        end += 1;
    }
    source.get(start..end)
}

#[cfg(test)]
mod tests {
    use super::error_excerpt;

    #[test]
    fn an_excerpt_never_cuts_a_character() {
        let source = "or profile.o\u{feff}aml\nnext";
        // The range ends inside the three bytes of U+FEFF.
        assert_eq!(error_excerpt(source, 3..13), Some("profile.o\u{feff}"));
        assert_eq!(error_excerpt(source, 13..14), None);
        assert_eq!(
            error_excerpt(source, 0..99),
            Some("or profile.o\u{feff}aml")
        );
        assert_eq!(error_excerpt(source, 99..100), None);
    }
}
