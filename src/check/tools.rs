//! Flows served as MCP tools: the tool's name, description and input
//! schema, and one name per tool in the project.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde_json::Value as Json;

use crate::diagnostic::{Code, Diagnostic};
use crate::project::{self, IntentId};
use crate::spec::{self, Spanned};

use super::schemas::{at_pointer, collect_sensitive};
use super::{Checker, Defined};

/// MCP's limit on a tool name's length.
pub const TOOL_NAME_MAX: usize = 128;

/// Whether `name` is a tool name MCP allows: 1 to 128 ASCII letters,
/// digits, `_`, `-` and `.`.
pub fn is_tool_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= TOOL_NAME_MAX
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b'.'))
}

/// The compiled tool and its input schema, for the flow's templates.
pub(super) struct CompiledTool {
    pub(super) tool: project::FlowTool,
    pub(super) schema: Arc<Json>,
}

impl Checker<'_> {
    /// The tool a flow declares: a valid name, a description, and an object
    /// schema for its arguments (inline `input`, or a `schema` file).
    pub(super) fn compile_tool(
        &mut self,
        file: &Path,
        flow_name: &str,
        tool: &Spanned<spec::FlowTool>,
        intent: Option<IntentId>,
        entities: Vec<String>,
    ) -> Option<CompiledTool> {
        let spec = &tool.value;
        let name = spec.name.value.trim();
        let mut valid = true;
        if !is_tool_name(name) {
            let location = self.location(file, &spec.name, spec.name.value.chars().count());
            self.push(
                Diagnostic::error(
                    Code::InvalidValue,
                    location,
                    format!("tool name `{name}` is not one MCP allows"),
                )
                .with_hint(format!(
                    "use 1 to {TOOL_NAME_MAX} ASCII letters, digits, `_`, `-` or `.`, e.g. `{}`",
                    suggested_tool_name(flow_name)
                )),
            );
            valid = false;
        }
        let description = spec.description.value.trim();
        if description.is_empty() {
            let location = self.location(file, &spec.description, 1);
            self.push(
                Diagnostic::error(
                    Code::InvalidValue,
                    location,
                    format!("tool `{name}` has an empty description"),
                )
                .with_hint("say what the tool does and when to use it: agents choose tools by it"),
            );
            valid = false;
        }
        let schema = match (&spec.input, &spec.schema) {
            (Some(input), None) => self.inline_tool_schema(file, name, input),
            (None, Some(schema_file)) => self
                .schema_file(file, schema_file)
                .map(|schema| (schema.json.clone(), schema.validator.clone())),
            (None, None) => {
                let location = self.location(file, tool, 1);
                self.push(
                    Diagnostic::error(
                        Code::MissingKey,
                        location,
                        format!("tool `{name}` has no schema for its arguments"),
                    )
                    .with_hint("add `input:` (an inline JSON Schema, `type: object`) or `schema:` (a file under `schemas/`)"),
                );
                None
            }
            (Some(input), Some(_)) => {
                let location = self.location(file, input, 1);
                self.error(
                    Code::MisplacedKey,
                    location,
                    format!("tool `{name}` has both `input` and `schema`; keep one"),
                );
                None
            }
        };
        let (json, validator) = schema?;
        if json.get("type").and_then(Json::as_str) != Some("object") {
            let location = match (&spec.input, &spec.schema) {
                (Some(input), _) => self.location(file, input, 1),
                (_, Some(schema_file)) => {
                    self.location(file, schema_file, schema_file.value.chars().count())
                }
                _ => self.location(file, tool, 1),
            };
            self.push(
                Diagnostic::error(
                    Code::SchemaInvalid,
                    location,
                    format!("the input schema of tool `{name}` is not an object schema"),
                )
                .with_hint("MCP tools take an object of named arguments: start the schema with `type: object` and list them under `properties`"),
            );
            return None;
        }
        if !valid {
            return None;
        }
        Some(CompiledTool {
            tool: project::FlowTool {
                name: name.to_owned(),
                description: description.to_owned(),
                input_schema: json.clone(),
                validator,
                intent,
                entities,
            },
            schema: json,
        })
    }

    /// An inline input schema: valid against its meta-schema and compiled.
    fn inline_tool_schema(
        &mut self,
        file: &Path,
        name: &str,
        input: &Spanned<spec::TemplateValue>,
    ) -> Option<(Arc<Json>, Arc<jsonschema::Validator>)> {
        let json = input.value.to_json();
        let location = self.location(file, input, 1);
        if let Err(error) = jsonschema::meta::validate(&json) {
            self.push(
                Diagnostic::error(
                    Code::SchemaInvalid,
                    location,
                    format!(
                        "the input schema of tool `{name}` is not a valid JSON Schema: {error}{}",
                        at_pointer(&error.instance_path().to_string())
                    ),
                )
                .with_hint(
                    "schemas are JSON Schema, draft 2020-12 unless `$schema` says otherwise",
                ),
            );
            return None;
        }
        match jsonschema::options().build(&json) {
            Ok(validator) => {
                collect_sensitive(&json, &mut self.redact, 0);
                Some((Arc::new(json), Arc::new(validator)))
            }
            Err(error) => {
                self.push(Diagnostic::error(
                    Code::SchemaInvalid,
                    location,
                    format!("the input schema of tool `{name}` cannot be compiled: {error}"),
                ));
                None
            }
        }
    }

    /// Two flows cannot serve one tool name.
    pub(super) fn check_tool_names(&mut self, flows: &[Defined<'_, spec::Flow>]) {
        let mut first: HashMap<&str, (&Path, &spec::Text)> = HashMap::new();
        for flow in flows {
            let Some(tool) = &flow.spec.tool else {
                continue;
            };
            let name = &tool.value.name;
            match first.get(name.value.trim()) {
                Some((first_file, first_name)) => {
                    let related =
                        self.location(first_file, first_name, first_name.value.chars().count());
                    let location = self.location(flow.file, name, name.value.chars().count());
                    self.push(
                        Diagnostic::error(
                            Code::DuplicateName,
                            location,
                            format!("tool `{}` is served by two flows", name.value.trim()),
                        )
                        .with_related(related, "first served here")
                        .with_hint("give each flow's tool its own name"),
                    );
                }
                None => {
                    first.insert(name.value.trim(), (flow.file, name));
                }
            }
        }
    }
}

/// A tool name made of a flow's name: what MCP does not allow becomes `_`.
fn suggested_tool_name(flow_name: &str) -> String {
    let name: String = flow_name
        .chars()
        .take(TOOL_NAME_MAX)
        .map(|character| {
            if character.is_ascii_alphanumeric() || matches!(character, '_' | '-' | '.') {
                character
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() {
        "my_tool".to_owned()
    } else {
        name
    }
}
