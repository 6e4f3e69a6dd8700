//! `check --online`: each `kind: mcp` service's server is asked for its
//! tools, so that a tool name the server does not serve, a required
//! argument the call's body leaves out, an argument the tool does not take
//! or a literal argument its schema refuses is caught before deploying,
//! at the file, line and column of the mistake.
//!
//! Offline, `check` knows only the configuration; this is the one check
//! that reaches the network, and only when asked.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rmcp::model::{JsonObject, Tool};
use serde_json::Value as Json;

use crate::diagnostic::{Code, Diagnostic, Location, did_you_mean};
use crate::load::{self, Environment};
use crate::project::CompiledProject;
use crate::spec::{self, Position, Spanned, TemplateValue};

/// The least time a server gets to answer `initialize` and `tools/list`.
const MIN_LIST_TIMEOUT: Duration = Duration::from_secs(5);
/// Tools named in the hint of an unknown tool, at most.
const LISTED_TOOLS: usize = 10;

/// A `kind: mcp` service as written.
struct McpService<'a> {
    file: &'a Path,
    /// `tool:` (absent only in a project the offline check refused).
    tool: Option<&'a spec::Text>,
    url: Option<&'a spec::Text>,
    position: Position,
}

/// A `call:` of a `kind: mcp` service.
struct CallSite<'a> {
    file: &'a Path,
    call: &'a spec::Name,
    body: Option<&'a Spanned<TemplateValue>>,
}

/// Lists the tools of every `kind: mcp` service of `project` (read again
/// from `dir` for the positions) and reports what does not match.
pub async fn check_mcp_servers(
    dir: &Path,
    environment: &Environment,
    project: &CompiledProject,
) -> Vec<Diagnostic> {
    let loaded = load::load_project(dir, environment);
    let mut services: HashMap<&str, McpService<'_>> = HashMap::new();
    let mut calls: Vec<CallSite<'_>> = Vec::new();
    for file in &loaded.files {
        for (name, service) in &file.spec.services {
            if service
                .kind
                .as_ref()
                .is_some_and(|kind| kind.value == "mcp")
            {
                services.insert(
                    name.value.as_str(),
                    McpService {
                        file: &file.path,
                        tool: service.tool.as_ref(),
                        url: service.url.as_ref(),
                        position: name.position,
                    },
                );
            }
        }
    }
    for file in &loaded.files {
        for flow in file.spec.flows.values() {
            let mut steps = Vec::new();
            super::flows::collect_steps(&flow.steps.value, &mut steps);
            if let Some(on_error) = &flow.on_error {
                super::flows::collect_steps(std::slice::from_ref(on_error.as_ref()), &mut steps);
            }
            for step in steps {
                if let Some(call) = &step.call
                    && services.contains_key(call.value.as_str())
                {
                    calls.push(CallSite {
                        file: &file.path,
                        call,
                        body: step.body.as_ref(),
                    });
                }
            }
        }
    }

    let client = match crate::services::http_client() {
        Ok(client) => client,
        Err(error) => {
            return vec![Diagnostic::error(
                Code::McpServerUnavailable,
                Location::new(PathBuf::from("."), Position::default(), 1),
                format!("cannot build an HTTP client: {error}"),
            )];
        }
    };
    let mut names: Vec<&str> = services.keys().copied().collect();
    names.sort_unstable();
    let listings = names.iter().map(|name| {
        let compiled = project.services.iter().find(|s| s.name == *name);
        let client = &client;
        async move {
            let compiled = compiled?;
            let url = compiled.url.as_ref()?;
            let timeout = compiled.timeout.max(MIN_LIST_TIMEOUT);
            Some(
                crate::services::list_tools(client, url.as_str(), &compiled.headers, timeout).await,
            )
        }
    });
    let listings = futures_util::future::join_all(listings).await;

    let mut diagnostics = Vec::new();
    for (name, listing) in names.iter().zip(listings) {
        let service = &services[name];
        let (Some(tool_name), Some(compiled)) = (
            service.tool,
            project.services.iter().find(|s| s.name == *name),
        ) else {
            continue;
        };
        let at_url = service.url.map_or(service.position, |url| url.position);
        let tools = match listing {
            None => {
                let set = compiled
                    .url_variable
                    .as_deref()
                    .map(|variable| format!(" (set `{variable}`)"))
                    .unwrap_or_default();
                diagnostics.push(Diagnostic::warning(
                    Code::McpServerUnavailable,
                    Location::new(service.file, at_url, 1),
                    format!("service `{name}` has no URL{set}: its tools were not checked"),
                ));
                continue;
            }
            Some(Err(error)) => {
                let url = compiled.url.as_ref().map_or("", url::Url::as_str);
                diagnostics.push(
                    Diagnostic::error(
                        Code::McpServerUnavailable,
                        Location::new(service.file, at_url, 1),
                        format!("cannot list the tools of service `{name}` at {url}: {error}"),
                    )
                    .with_hint(
                        "check the URL and headers, that the server speaks MCP's Streamable \
                         HTTP, or run `check` without `--online`",
                    ),
                );
                continue;
            }
            Some(Ok(tools)) => tools,
        };
        let Some(tool) = tools.iter().find(|tool| tool.name == tool_name.value) else {
            diagnostics.push(unknown_tool(service.file, tool_name, name, &tools));
            continue;
        };
        for call in calls.iter().filter(|call| call.call.value == *name) {
            check_arguments(call, tool, &mut diagnostics);
        }
    }
    crate::diagnostic::sort(&mut diagnostics);
    diagnostics
}

fn unknown_tool(file: &Path, tool: &spec::Text, service: &str, tools: &[Tool]) -> Diagnostic {
    let names: Vec<&str> = tools.iter().map(|tool| tool.name.as_ref()).collect();
    let listed = names
        .iter()
        .take(LISTED_TOOLS)
        .map(|name| format!("`{name}`"))
        .collect::<Vec<_>>()
        .join(", ");
    let more = names.len().saturating_sub(LISTED_TOOLS);
    let hint = match (
        did_you_mean(&tool.value, names.iter().copied()),
        names.len(),
    ) {
        (Some(hint), _) => hint,
        (None, 0) => "the server lists no tools".to_owned(),
        (None, _) if more > 0 => format!("the server's tools: {listed} and {more} more"),
        (None, _) => format!("the server's tools: {listed}"),
    };
    Diagnostic::error(
        Code::UnknownTool,
        Location::new(file, tool.position, tool.value.chars().count()),
        format!("service `{service}`'s server has no tool `{}`", tool.value),
    )
    .with_hint(hint)
}

/// The call's body against the tool's input schema: required arguments,
/// unknown ones, and the literal values (templates are known only at run
/// time).
fn check_arguments(call: &CallSite<'_>, tool: &Tool, diagnostics: &mut Vec<Diagnostic>) {
    let schema: &JsonObject = &tool.input_schema;
    let tool_name = tool.name.as_ref();
    let service = call.call.value.as_str();
    let (entries, at) = match call.body {
        None => (&[][..], call.call.position),
        Some(body) => match &body.value {
            TemplateValue::Map(entries) => (entries.as_slice(), body.position),
            // A lone expression: its keys are known only at run time.
            TemplateValue::String(_) => return,
            _ => {
                diagnostics.push(Diagnostic::error(
                    Code::InvalidArguments,
                    Location::new(call.file, body.position, 1),
                    format!(
                        "the body of a call to service `{service}` is the arguments of tool \
                         `{tool_name}`: it must be a mapping"
                    ),
                ));
                return;
            }
        },
    };
    let properties = schema.get("properties").and_then(Json::as_object);
    let closed = schema.get("additionalProperties") == Some(&Json::Bool(false));
    let required = schema
        .get("required")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .filter_map(Json::as_str);
    for argument in required {
        if !entries.iter().any(|(key, _)| key.value == argument) {
            diagnostics.push(
                Diagnostic::error(
                    Code::InvalidArguments,
                    Location::new(call.file, at, 1),
                    format!(
                        "tool `{tool_name}` of service `{service}` requires argument \
                         `{argument}`, which this call does not pass"
                    ),
                )
                .with_hint(format!("add `{argument}:` to the call's `body`")),
            );
        }
    }
    if let Some(properties) = properties {
        for (key, _) in entries {
            if properties.contains_key(&key.value) {
                continue;
            }
            let message = format!(
                "tool `{tool_name}` of service `{service}` takes no argument `{}`",
                key.value
            );
            let location = Location::new(call.file, key.position, key.value.chars().count());
            let diagnostic = if closed {
                Diagnostic::error(Code::InvalidArguments, location, message)
            } else {
                Diagnostic::warning(
                    Code::InvalidArguments,
                    location,
                    message + " (its schema does not declare it; the server may ignore it)",
                )
            };
            let hint = did_you_mean(&key.value, properties.keys().map(String::as_str));
            diagnostics.push(diagnostic.with_optional_hint(hint));
        }
    }
    check_literal_values(call, entries, schema, tool_name, diagnostics);
}

/// The arguments written without a template, validated against the
/// tool's schema (without `required`: the other arguments come at run time).
fn check_literal_values(
    call: &CallSite<'_>,
    entries: &[(spec::Name, Spanned<TemplateValue>)],
    schema: &JsonObject,
    tool_name: &str,
    diagnostics: &mut Vec<Diagnostic>,
) {
    let literal: serde_json::Map<String, Json> = entries
        .iter()
        .filter(|(_, value)| !has_template(&value.value))
        .map(|(key, value)| (key.value.clone(), value.value.to_json()))
        .collect();
    if literal.is_empty() {
        return;
    }
    let mut schema = schema.clone();
    schema.remove("required");
    // The unknown arguments are reported by name above.
    schema.remove("additionalProperties");
    let Ok(validator) = jsonschema::options().build(&Json::Object(schema)) else {
        // A schema this validator cannot compile is the server's concern.
        return;
    };
    let instance = Json::Object(literal);
    for error in validator.iter_errors(&instance) {
        let path = error.instance_path().to_string();
        let key = path.trim_start_matches('/').split('/').next().unwrap_or("");
        let Some((name, value)) = entries.iter().find(|(name, _)| name.value == key) else {
            continue;
        };
        diagnostics.push(Diagnostic::error(
            Code::InvalidArguments,
            Location::new(call.file, value.position, 1),
            format!("argument `{}` of tool `{tool_name}`: {error}", name.value),
        ));
    }
}

/// Whether a value holds template syntax anywhere.
fn has_template(value: &TemplateValue) -> bool {
    match value {
        TemplateValue::String(text) => text.contains("{{") || text.contains("{%"),
        TemplateValue::List(items) => items.iter().any(|item| has_template(&item.value)),
        TemplateValue::Map(entries) => entries.iter().any(|(_, value)| has_template(&value.value)),
        TemplateValue::Null | TemplateValue::Bool(_) | TemplateValue::Integer(_) => false,
        TemplateValue::Float(_) => false,
    }
}
