//! Static validation: spec types → `CompiledProject`, or every problem found.
//!
//! One pass over the loaded files resolves names, compiles templates and
//! JSON Schemas, and walks every flow with the set of names a template may
//! read at that point (step results defined before it, with the response
//! schema of the service each one called). It reports every problem it finds
//! rather than stopping at the first, and builds the compiled project only
//! when there is no error.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jsonschema::Validator;
use serde_json::Value as Json;

use crate::diagnostic::{Code, Diagnostic, Location, Sources, did_you_mean};
use crate::load::{self, Environment, LoadedProject, SCHEMAS_DIR};
use crate::project::{self, CompiledProject, FlowId, IntentId, ServiceId};
use crate::spec::{self, Name, Position, Spanned, TemplateValue};
use crate::template::{self, Analysis, TemplatesBuilder, ValueTemplate};

/// The request body schema, when a project has one.
pub const REQUEST_SCHEMA_FILE: &str = "orchestrate_request.schema.json";

/// Context variables every template may read.
const BASE_VARIABLES: &[&str] = &[
    "text",
    "user_id",
    "channel",
    "session_id",
    "trace_id",
    "tenant",
    "input",
    "intent",
    "session",
];
const INTENT_FIELDS: &[&str] = &["name", "confidence", "entities"];
const ERROR_FIELDS: &[&str] = &["code", "message", "service", "status"];

/// The result of checking a project.
#[derive(Debug)]
pub struct Checked {
    /// Present when there is no error (warnings allowed).
    pub project: Option<CompiledProject>,
    /// Sorted by file, line and column.
    pub diagnostics: Vec<Diagnostic>,
    pub sources: Sources,
}

impl Checked {
    pub fn error_count(&self) -> usize {
        self.diagnostics.iter().filter(|d| d.is_error()).count()
    }

    pub fn warning_count(&self) -> usize {
        self.diagnostics.len() - self.error_count()
    }
}

/// Loads, checks and compiles the project in `dir`: the one path used by
/// `check`, by `serve` at start-up and by every reload.
pub fn check_project(dir: &Path, environment: &Environment) -> Checked {
    compile(load::load_project(dir, environment))
}

/// Checks loaded files and compiles them.
pub fn compile(loaded: LoadedProject) -> Checked {
    let LoadedProject {
        dir,
        files,
        sources,
        diagnostics,
        unparsed_names,
        complete,
    } = loaded;
    let mut checker = Checker {
        dir: &dir,
        sources: &sources,
        unparsed_names: &unparsed_names,
        diagnostics,
        templates: TemplatesBuilder::default(),
        hashed_files: BTreeMap::new(),
        schemas: HashMap::new(),
        redact: BTreeSet::new(),
        service_schema_files: HashMap::new(),
        complete,
        step_sources: Vec::new(),
        routes: BTreeSet::new(),
    };
    for file in &files {
        if let Some(text) = sources.get(&file.path) {
            checker
                .hashed_files
                .insert(file.path.clone(), text.as_bytes().to_vec());
        }
    }
    let project = checker.check(&files);
    let mut diagnostics = checker.diagnostics;
    crate::diagnostic::sort(&mut diagnostics);
    diagnostics.dedup();
    let has_errors = diagnostics.iter().any(Diagnostic::is_error);
    Checked {
        project: if has_errors { None } else { project },
        diagnostics,
        sources,
    }
}

/// A JSON Schema file, read and compiled once per check.
struct SchemaFile {
    json: Arc<Json>,
    validator: Arc<Validator>,
}

struct Checker<'a> {
    dir: &'a Path,
    sources: &'a Sources,
    /// Names of entries that failed to parse; references to them are not errors.
    unparsed_names: &'a HashSet<String>,
    diagnostics: Vec<Diagnostic>,
    templates: TemplatesBuilder,
    /// Every file read, for the content hash.
    hashed_files: BTreeMap<PathBuf, Vec<u8>>,
    /// Schema files by name; `None` when the file is broken (already reported).
    schemas: HashMap<String, Option<SchemaFile>>,
    redact: BTreeSet<String>,
    /// Response schema file of each service, by service name, whether or not
    /// the service itself compiled: its paths are still checked.
    service_schema_files: HashMap<String, String>,
    /// Whether every file parsed; project-wide "something is missing"
    /// checks run only then.
    complete: bool,
    /// Where each compiled step was written, by index.
    step_sources: Vec<project::StepSource>,
    /// Routes of every reply.
    routes: BTreeSet<String>,
}

/// A definition and the file it is in.
struct Defined<'s, T> {
    file: &'s Path,
    name: &'s Name,
    spec: &'s T,
}

/// What a name in a template refers to, at one point of a flow.
#[derive(Clone)]
enum Binding {
    /// The validated response of a call; paths are checked against the schema.
    Response(Option<Arc<Json>>),
    /// A value whose shape is not known statically.
    Any,
}

#[derive(Clone, Default)]
struct Scope {
    bindings: Vec<(String, Binding)>,
    in_on_error: bool,
}

impl Scope {
    fn get(&self, name: &str) -> Option<&Binding> {
        self.bindings
            .iter()
            .rev()
            .find(|(bound, _)| bound == name)
            .map(|(_, binding)| binding)
    }

    fn define(&mut self, name: &str, binding: Binding) {
        self.bindings.push((name.to_owned(), binding));
    }
}

/// Facts about the flow being checked.
struct FlowFacts<'s> {
    file: &'s Path,
    name: &'s str,
    /// Every step id anywhere in the flow.
    step_ids: HashSet<String>,
    /// Entity names of the intents that trigger the flow; `None` when unknown.
    entities: Option<BTreeSet<String>>,
}

/// The compiled form of a step list, and whether every path through it replies.
struct CompiledSteps {
    steps: Vec<project::Step>,
    replies: bool,
}

impl<'a> Checker<'a> {
    fn location<T>(&self, file: &Path, spanned: &Spanned<T>, width: usize) -> Location {
        Location::new(file, spanned.position, width)
    }

    fn error(
        &mut self,
        code: Code,
        location: Location,
        message: impl Into<String>,
    ) -> &mut Diagnostic {
        self.diagnostics
            .push(Diagnostic::error(code, location, message));
        let last = self.diagnostics.len() - 1;
        &mut self.diagnostics[last]
    }

    fn push(&mut self, diagnostic: Diagnostic) {
        self.diagnostics.push(diagnostic);
    }

    fn check(&mut self, files: &[load::LoadedFile]) -> Option<CompiledProject> {
        let intents = self.collect(files, "intent", |file| &file.intents);
        let services = self.collect(files, "service", |file| &file.services);
        let flows = self.collect(files, "flow", |file| &file.flows);
        let classifier = self.single(files, "classifier", |file| file.classifier.as_ref());
        let defaults = self.single(files, "defaults", |file| file.defaults.as_ref());
        for file in files {
            for name in &file.spec.redact {
                self.redact.insert(name.value.clone());
            }
        }

        let compiled_intents: Vec<project::Intent> = intents
            .iter()
            .map(|intent| self.compile_intent(intent))
            .collect();
        let intent_ids: HashMap<&str, IntentId> = intents
            .iter()
            .enumerate()
            .map(|(index, intent)| (intent.name.value.as_str(), IntentId(index as u32)))
            .collect();
        let classifier = self.compile_classifier(files, classifier, &intent_ids, &compiled_intents);

        let compiled_services: Vec<Option<project::Service>> = services
            .iter()
            .map(|service| self.compile_service(service))
            .collect();
        let service_ids: HashMap<&str, ServiceId> = services
            .iter()
            .enumerate()
            .map(|(index, service)| (service.name.value.as_str(), ServiceId(index as u32)))
            .collect();

        let mut flow_of_intent: HashMap<IntentId, (FlowId, &Defined<'_, spec::Flow>)> =
            HashMap::new();
        let mut compiled_flows = Vec::new();
        for (index, flow) in flows.iter().enumerate() {
            let flow_id = FlowId(index as u32);
            let triggers = self.flow_triggers(flow, &intent_ids);
            for (intent_name, intent_id) in &triggers {
                if let Some((_, first)) = flow_of_intent.get(intent_id) {
                    let related = self.location(first.file, first.name, first.name.value.len());
                    let location = self.location(flow.file, intent_name, intent_name.value.len());
                    self.push(
                        Diagnostic::error(
                            Code::IntentWithSeveralFlows,
                            location,
                            format!(
                                "intent `{}` already triggers flow `{}`",
                                intent_name.value, first.name.value
                            ),
                        )
                        .with_related(related, "the flow it already triggers")
                        .with_hint(
                            "an intent triggers one flow; use `if` or `switch` inside it to branch",
                        ),
                    );
                } else {
                    flow_of_intent.insert(*intent_id, (flow_id, flow));
                }
            }
            let entities = if triggers.is_empty() {
                None
            } else {
                Some(
                    triggers
                        .iter()
                        .flat_map(|(_, id)| compiled_intents[id.0 as usize].entities.iter())
                        .map(|entity| entity.name.clone())
                        .collect(),
                )
            };
            compiled_flows.push(self.compile_flow(
                flow,
                entities,
                &service_ids,
                &compiled_services,
            ));
        }

        let mut flow_for_intent = Vec::with_capacity(intents.len());
        let fallback_flow = classifier
            .as_ref()
            .and_then(|classifier| flow_of_intent.get(&classifier.fallback))
            .map(|(flow_id, _)| *flow_id);
        if let (Some(classifier), None, true) = (&classifier, fallback_flow, self.complete) {
            let fallback = &intents[classifier.fallback.0 as usize];
            let location = self.location(fallback.file, fallback.name, fallback.name.value.len());
            self.push(
                Diagnostic::error(
                    Code::MissingFallback,
                    location,
                    format!(
                        "the fallback intent `{}` has no flow, so unrecognised messages have nowhere to go",
                        fallback.name.value
                    ),
                )
                .with_hint(format!("add a flow with `intent: {}`", fallback.name.value)),
            );
        }
        for (index, intent) in intents.iter().enumerate() {
            let id = IntentId(index as u32);
            match flow_of_intent.get(&id) {
                Some((flow_id, _)) => flow_for_intent.push(*flow_id),
                None => {
                    if self.complete && classifier.as_ref().is_some_and(|c| c.fallback != id) {
                        let location =
                            self.location(intent.file, intent.name, intent.name.value.len());
                        self.push(
                            Diagnostic::warning(
                                Code::IntentWithoutFlow,
                                location,
                                format!(
                                    "no flow is triggered by intent `{}`; it runs the fallback flow",
                                    intent.name.value
                                ),
                            )
                            .with_hint(format!("add a flow with `intent: {}`", intent.name.value)),
                        );
                    }
                    flow_for_intent.push(fallback_flow.unwrap_or(FlowId(0)));
                }
            }
        }

        let defaults = self.compile_defaults(defaults);
        let request_schema = self.request_schema();
        let content_hash = load::content_hash(&self.hashed_files);
        let source_files = self.hashed_files.keys().cloned().collect();

        if self.diagnostics.iter().any(Diagnostic::is_error) {
            return None;
        }
        let classifier = classifier?;
        let templates = match std::mem::take(&mut self.templates).finish() {
            Ok(templates) => templates,
            Err(error) => {
                self.error(
                    Code::TemplateSyntax,
                    Location::file(load::FLOWS_DIR),
                    format!("a template could not be compiled: {error}"),
                );
                return None;
            }
        };
        let flows: Option<Vec<project::Flow>> = compiled_flows.into_iter().collect();
        let services: Option<Vec<project::Service>> = compiled_services.into_iter().collect();
        Some(CompiledProject {
            dir: self.dir.to_path_buf(),
            intents: compiled_intents,
            classifier,
            services: services?,
            flows: flows?,
            flow_for_intent,
            redact: std::mem::take(&mut self.redact),
            defaults: defaults?,
            templates,
            request_schema,
            content_hash,
            source_files,
            steps: std::mem::take(&mut self.step_sources),
            routes: std::mem::take(&mut self.routes),
        })
    }

    /// Gathers one kind of named definition from every file; a name defined
    /// twice is reported with both places.
    fn collect<'s, T>(
        &mut self,
        files: &'s [load::LoadedFile],
        kind: &str,
        section: impl Fn(&'s spec::FlowFile) -> &'s indexmap::IndexMap<Name, T>,
    ) -> Vec<Defined<'s, T>> {
        let mut seen: HashMap<&str, (&Path, &Name)> = HashMap::new();
        let mut out = Vec::new();
        for file in files {
            for (name, spec) in section(&file.spec) {
                if let Some((first_file, first_name)) = seen.get(name.value.as_str()) {
                    let related =
                        Location::new(*first_file, first_name.position, first_name.value.len());
                    let location = Location::new(&file.path, name.position, name.value.len());
                    self.push(
                        Diagnostic::error(
                            Code::DuplicateName,
                            location,
                            format!("{kind} `{}` is defined twice", name.value),
                        )
                        .with_related(related, "first defined here")
                        .with_hint(format!(
                            "{kind} names are unique across the project; rename or remove one"
                        )),
                    );
                    continue;
                }
                seen.insert(name.value.as_str(), (&file.path, name));
                out.push(Defined {
                    file: &file.path,
                    name,
                    spec,
                });
            }
        }
        out
    }

    /// A top-level section that must appear at most once in the project.
    fn single<'s, T>(
        &mut self,
        files: &'s [load::LoadedFile],
        key: &str,
        section: impl Fn(&'s spec::FlowFile) -> Option<&'s Spanned<T>>,
    ) -> Option<(&'s Path, &'s Spanned<T>)> {
        let mut first: Option<(&Path, &Spanned<T>)> = None;
        for file in files {
            if let Some(value) = section(&file.spec) {
                if let Some((first_file, first_value)) = first {
                    let related = Location::new(first_file, first_value.position, 1);
                    self.push(
                        Diagnostic::error(
                            Code::DuplicateName,
                            Location::new(&file.path, value.position, 1),
                            format!("`{key}` is defined twice"),
                        )
                        .with_related(related, "first defined here")
                        .with_hint(format!("keep one `{key}` section for the whole project")),
                    );
                } else {
                    first = Some((&file.path, value));
                }
            }
        }
        first
    }

    fn compile_intent(&mut self, intent: &Defined<'_, spec::Intent>) -> project::Intent {
        let spec = intent.spec;
        let mut entities = Vec::new();
        for (name, entity) in &spec.entities {
            match regex::Regex::new(&entity.pattern.value) {
                Ok(pattern) => entities.push(project::Entity {
                    name: name.value.clone(),
                    pattern,
                }),
                Err(error) => {
                    let location =
                        self.location(intent.file, &entity.pattern, entity.pattern.value.len());
                    self.push(
                        Diagnostic::error(
                            Code::InvalidRegex,
                            location,
                            format!(
                                "invalid regular expression for entity `{}`: {}",
                                name.value,
                                regex_error_summary(&error)
                            ),
                        )
                        .with_hint("patterns use Rust `regex` syntax, e.g. '\\bORD-\\d+\\b'; quote them with single quotes in YAML"),
                    );
                }
            }
        }
        for keyword in &spec.keywords {
            if keyword.value.trim().is_empty() {
                let location = self.location(intent.file, keyword, 1);
                self.error(Code::InvalidValue, location, "a keyword cannot be empty");
            }
        }
        project::Intent {
            name: intent.name.value.clone(),
            description: spec
                .description
                .as_ref()
                .map(|d| d.value.trim().to_owned())
                .unwrap_or_default(),
            examples: spec.examples.iter().map(|e| e.value.clone()).collect(),
            keywords: spec
                .keywords
                .iter()
                .map(|k| {
                    k.value
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                        .to_lowercase()
                })
                .filter(|k| !k.is_empty())
                .collect(),
            entities,
        }
    }

    fn compile_classifier(
        &mut self,
        files: &[load::LoadedFile],
        classifier: Option<(&Path, &Spanned<spec::Classifier>)>,
        intent_ids: &HashMap<&str, IntentId>,
        intents: &[project::Intent],
    ) -> Option<project::Classifier> {
        let Some((file, classifier)) = classifier else {
            if !self.complete {
                return None;
            }
            let file = files
                .iter()
                .find(|file| !file.spec.intents.is_empty())
                .or(files.first())
                .map_or_else(|| PathBuf::from(load::FLOWS_DIR), |file| file.path.clone());
            self.push(
                Diagnostic::error(
                    Code::MissingFallback,
                    Location::file(file),
                    "the project has no `classifier` section naming the fallback intent",
                )
                .with_hint("add `classifier: { fallback: <intent> }` to one flow file"),
            );
            return None;
        };
        let spec = &classifier.value;
        let fallback = self.resolve_intent(file, &spec.fallback, intent_ids);
        let min_confidence = match &spec.min_confidence {
            Some(value) if !(0.0..=1.0).contains(&value.value) => {
                let location = self.location(file, value, 1);
                self.error(
                    Code::InvalidValue,
                    location,
                    format!(
                        "`min_confidence` is {}; it must be between 0 and 1",
                        value.value
                    ),
                );
                project::DEFAULT_MIN_CONFIDENCE
            }
            Some(value) => value.value,
            None => project::DEFAULT_MIN_CONFIDENCE,
        };
        let (model, timeout) = match &spec.llm {
            Some(llm) => (
                llm.value
                    .model
                    .as_ref()
                    .map(|model| model.value.trim().to_owned())
                    .filter(|model| !model.is_empty()),
                llm.value
                    .timeout
                    .as_ref()
                    .and_then(|timeout| self.duration(file, timeout)),
            ),
            None => (None, None),
        };
        let (prompt, answer_schema) = crate::intent::llm_instructions(intents);
        let keywords = match project::KeywordIndex::new(intents) {
            Ok(keywords) => Some(keywords),
            Err(message) => {
                self.error(
                    Code::InvalidValue,
                    Location::file(file.to_path_buf()),
                    message,
                );
                None
            }
        };
        Some(project::Classifier {
            llm: project::LlmSettings {
                model: model.unwrap_or_else(|| project::DEFAULT_LLM_MODEL.to_owned()),
                timeout: timeout.unwrap_or(project::DEFAULT_LLM_TIMEOUT),
                prompt,
                answer_schema,
            },
            min_confidence,
            fallback: fallback?,
            keywords: keywords?,
        })
    }

    fn resolve_intent(
        &mut self,
        file: &Path,
        name: &Name,
        intent_ids: &HashMap<&str, IntentId>,
    ) -> Option<IntentId> {
        if let Some(id) = intent_ids.get(name.value.as_str()) {
            return Some(*id);
        }
        if !self.unparsed_names.contains(&name.value) {
            let location = self.location(file, name, name.value.len());
            let hint = did_you_mean(&name.value, intent_ids.keys().copied());
            self.push(
                Diagnostic::error(
                    Code::UnknownIntent,
                    location,
                    format!("unknown intent `{}`", name.value),
                )
                .with_optional_hint(
                    hint.or_else(|| Some(known_names("intents", intent_ids.keys().copied()))),
                ),
            );
        }
        None
    }

    /// A positive duration such as `2s` or `150ms`.
    fn duration(&mut self, file: &Path, text: &spec::Text) -> Option<Duration> {
        match humantime::parse_duration(text.value.trim()) {
            Ok(duration) if !duration.is_zero() => Some(duration),
            Ok(_) => {
                let location = self.location(file, text, text.value.len());
                self.error(
                    Code::InvalidDuration,
                    location,
                    "a duration must be greater than zero",
                );
                None
            }
            Err(error) => {
                let location = self.location(file, text, text.value.len());
                self.push(
                    Diagnostic::error(
                        Code::InvalidDuration,
                        location,
                        format!("invalid duration `{}`: {error}", text.value),
                    )
                    .with_hint("write a number with a unit, such as `2s`, `150ms` or `1m`"),
                );
                None
            }
        }
    }

    fn compile_service(
        &mut self,
        service: &Defined<'_, spec::Service>,
    ) -> Option<project::Service> {
        let spec = service.spec;
        let file = service.file;
        let mut ok = true;
        if let Some(schema) = spec.response.as_ref().and_then(|r| r.value.schema.as_ref()) {
            self.service_schema_files
                .insert(service.name.value.clone(), schema.value.trim().to_owned());
        }
        let (url, url_variable) = match &spec.url {
            Some(text) => {
                let variable = self.variable_at(file, text.position);
                let trimmed = text.value.trim();
                if trimmed.is_empty() {
                    (None, variable)
                } else {
                    match url::Url::parse(trimmed) {
                        Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => {
                            (Some(url), variable)
                        }
                        Ok(url) => {
                            let location = self.location(file, text, text.value.len());
                            self.push(
                                Diagnostic::error(
                                    Code::InvalidUrl,
                                    location,
                                    format!(
                                        "`{}` is not an http(s) URL (scheme `{}`)",
                                        trimmed,
                                        url.scheme()
                                    ),
                                )
                                .with_hint(
                                    "service URLs look like `http://menu.internal:8080/menu`",
                                ),
                            );
                            ok = false;
                            (None, variable)
                        }
                        Err(error) => {
                            let location = self.location(file, text, text.value.len());
                            self.push(
                                Diagnostic::error(
                                    Code::InvalidUrl,
                                    location,
                                    format!("invalid URL `{trimmed}`: {error}"),
                                )
                                .with_hint(
                                    "service URLs look like `http://menu.internal:8080/menu`",
                                ),
                            );
                            ok = false;
                            (None, variable)
                        }
                    }
                }
            }
            None => (None, None),
        };
        let timeout = match &spec.timeout {
            Some(text) => self.duration(file, text),
            None => Some(project::DEFAULT_SERVICE_TIMEOUT),
        };
        let retry = match &spec.retry {
            Some(retry) => {
                let attempts = retry.value.attempts.value;
                if !(1..=project::MAX_RETRY_ATTEMPTS).contains(&attempts) {
                    let location = self.location(file, &retry.value.attempts, 1);
                    self.error(
                        Code::InvalidValue,
                        location,
                        format!(
                            "`attempts` is {attempts}; it must be between 1 and {}",
                            project::MAX_RETRY_ATTEMPTS
                        ),
                    );
                    ok = false;
                }
                let backoff = match &retry.value.backoff {
                    Some(text) => self.duration(file, text),
                    None => Some(project::DEFAULT_RETRY_BACKOFF),
                };
                // One attempt is no retry at all.
                backoff.map(|backoff| {
                    (attempts > 1).then_some(project::RetryPolicy { attempts, backoff })
                })
            }
            None => Some(None),
        };
        let (unwrap_first, response_schema) = match &spec.response {
            Some(response) => {
                let unwrap_first = response
                    .value
                    .unwrap
                    .as_ref()
                    .is_some_and(|unwrap| unwrap.value == spec::Unwrap::First);
                let schema = match &response.value.schema {
                    Some(name) => self
                        .schema_file(file, name)
                        .map(|schema| Some((name.value.trim().to_owned(), schema))),
                    None => Some(None),
                };
                (unwrap_first, schema)
            }
            None => (false, Some(None)),
        };
        let mock = match &spec.mock {
            Some(mock) => self.compile_mock(
                file,
                &service.name.value,
                mock,
                unwrap_first,
                response_schema
                    .as_ref()
                    .and_then(|s| s.as_ref())
                    .map(|(_, s)| s),
            ),
            None => Some(None),
        };
        let mut headers = Vec::new();
        for (name, value) in &spec.headers {
            if reqwest_header_name_is_valid(&name.value) {
                headers.push((name.value.clone(), value.value.clone()));
            } else {
                let location = self.location(file, name, name.value.len());
                self.error(
                    Code::InvalidValue,
                    location,
                    format!("`{}` is not a valid HTTP header name", name.value),
                );
                ok = false;
            }
        }
        if !ok {
            return None;
        }
        Some(project::Service {
            name: service.name.value.clone(),
            url,
            url_variable,
            method: spec
                .method
                .as_ref()
                .map_or(spec::HttpMethod::Post, |m| m.value),
            headers,
            timeout: timeout?,
            retry: retry?,
            unwrap_first,
            response_schema: response_schema?.map(|(file, schema)| project::ResponseSchema {
                file,
                validator: schema.validator.clone(),
            }),
            mock: mock?,
        })
    }

    /// The `${VAR}` written at a position, so messages can name the variable.
    fn variable_at(&self, file: &Path, position: Position) -> Option<String> {
        let text = self.sources.get(file)?;
        let line = text.lines().nth(position.line.checked_sub(1)? as usize)?;
        let start = line
            .char_indices()
            .nth(position.column.saturating_sub(1) as usize)
            .map_or(line.len(), |(index, _)| index);
        let rest = &line[start..];
        let open = rest.find("${")?;
        let name: String = rest[open + 2..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        (!name.is_empty()).then_some(name)
    }

    fn compile_mock(
        &mut self,
        file: &Path,
        service: &str,
        mock: &Spanned<spec::Mock>,
        unwrap_first: bool,
        schema: Option<&Arc<SchemaFile>>,
    ) -> Option<Option<project::Mock>> {
        let spec = &mock.value;
        let status = spec.status.as_ref().map_or(200, |status| status.value);
        if !(100..=599).contains(&status) {
            let location = self.location(file, mock, 1);
            self.error(
                Code::InvalidValue,
                location,
                format!("mock status {status} is not an HTTP status"),
            );
            return None;
        }
        let (body, body_location) = match (&spec.file, &spec.response) {
            (Some(path), None) => {
                let location = self.location(file, path, path.value.len());
                let relative = PathBuf::from(path.value.trim());
                if !stays_inside(&relative) {
                    self.push(
                        Diagnostic::error(
                            Code::InvalidValue,
                            location,
                            format!("mock path `{}` leaves the project directory", relative.display()),
                        )
                        .with_hint("mock files are relative to the project directory, e.g. `mocks/menu.json`"),
                    );
                    return None;
                }
                let absolute = self.dir.join(&relative);
                let bytes = match std::fs::read(&absolute) {
                    Ok(bytes) => bytes,
                    Err(error) => {
                        self.push(
                            Diagnostic::error(
                                Code::MockMissing,
                                location,
                                format!("cannot read mock file `{}`: {error}", relative.display()),
                            )
                            .with_hint("mock files are relative to the project directory, e.g. `mocks/menu.json`"),
                        );
                        return None;
                    }
                };
                let body = match serde_json::from_slice::<Json>(&bytes) {
                    Ok(body) => body,
                    Err(error) => {
                        self.error(
                            Code::MockInvalid,
                            location,
                            format!("mock file `{}` is not JSON: {error}", relative.display()),
                        );
                        return None;
                    }
                };
                self.hashed_files.insert(relative, bytes);
                (body, location)
            }
            (None, Some(response)) => (response.value.to_json(), self.location(file, response, 1)),
            _ => {
                let location = self.location(file, mock, 1);
                self.push(Diagnostic::error(
                    Code::InvalidValue,
                    location,
                    format!(
                        "the mock of service `{service}` needs exactly one of `file` or `response`"
                    ),
                ));
                return None;
            }
        };
        if let (Some(schema), true) = (schema, (200..300).contains(&status)) {
            let unwrapped = match (&body, unwrap_first) {
                (Json::Array(items), true) => items.first().cloned().unwrap_or(Json::Null),
                _ => body.clone(),
            };
            if let Some(error) = schema.validator.iter_errors(&unwrapped).next() {
                self.push(
                    Diagnostic::error(
                        Code::MockInvalid,
                        body_location,
                        format!(
                            "the mock of service `{service}` does not match its response schema: {error}{}",
                            at_pointer(&error.instance_path().to_string())
                        ),
                    )
                    .with_hint("a mock must be an answer the real service could give"),
                );
                return None;
            }
        }
        Some(Some(project::Mock { status, body }))
    }

    /// Reads and compiles a schema file under `schemas/`, once per check.
    fn schema_file(&mut self, file: &Path, name: &spec::Text) -> Option<Arc<SchemaFile>> {
        let file_name = name.value.trim().to_owned();
        let location = self.location(file, name, name.value.len());
        if !stays_inside(Path::new(&file_name)) {
            self.push(
                Diagnostic::error(
                    Code::InvalidValue,
                    location,
                    format!("schema path `{file_name}` leaves the `{SCHEMAS_DIR}/` folder"),
                )
                .with_hint("name a file under `schemas/`, such as `menu_response.schema.json`"),
            );
            return None;
        }
        self.load_schema(&file_name, location)
    }

    fn load_schema(&mut self, file_name: &str, location: Location) -> Option<Arc<SchemaFile>> {
        if let Some(cached) = self.schemas.get(file_name) {
            return cached.as_ref().map(|schema| {
                Arc::new(SchemaFile {
                    json: schema.json.clone(),
                    validator: schema.validator.clone(),
                })
            });
        }
        let loaded = self.read_schema(file_name, location);
        let shared = loaded.as_ref().map(|schema| {
            Arc::new(SchemaFile {
                json: schema.json.clone(),
                validator: schema.validator.clone(),
            })
        });
        self.schemas.insert(file_name.to_owned(), loaded);
        shared
    }

    fn read_schema(&mut self, file_name: &str, location: Location) -> Option<SchemaFile> {
        let relative = Path::new(SCHEMAS_DIR).join(file_name);
        let absolute = self.dir.join(&relative);
        let bytes = match std::fs::read(&absolute) {
            Ok(bytes) => bytes,
            Err(error) => {
                let known = std::fs::read_dir(self.dir.join(SCHEMAS_DIR))
                    .map(|entries| {
                        entries
                            .filter_map(Result::ok)
                            .map(|entry| entry.file_name().to_string_lossy().into_owned())
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default();
                let hint = did_you_mean(file_name, known.iter().map(String::as_str))
                    .unwrap_or_else(|| {
                        format!("schema files live in `{SCHEMAS_DIR}/` of the project")
                    });
                self.push(
                    Diagnostic::error(
                        Code::SchemaMissing,
                        location,
                        format!("cannot read schema `{}`: {error}", relative.display()),
                    )
                    .with_hint(hint),
                );
                return None;
            }
        };
        let json: Json = match serde_json::from_slice(&bytes) {
            Ok(json) => json,
            Err(error) => {
                self.push(Diagnostic::error(
                    Code::SchemaInvalid,
                    Location::new(
                        &relative,
                        Position {
                            line: u32::try_from(error.line()).unwrap_or(0),
                            column: u32::try_from(error.column()).unwrap_or(0),
                        },
                        1,
                    ),
                    format!("schema `{}` is not valid JSON: {error}", relative.display()),
                ));
                return None;
            }
        };
        self.hashed_files.insert(relative.clone(), bytes);
        if let Err(error) = jsonschema::meta::validate(&json) {
            self.push(
                Diagnostic::error(
                    Code::SchemaInvalid,
                    Location::file(&relative),
                    format!(
                        "schema `{}` does not match its meta-schema: {error}{}",
                        relative.display(),
                        at_pointer(&error.instance_path().to_string())
                    ),
                )
                .with_hint(
                    "schemas are JSON Schema, draft 2020-12 unless `$schema` says otherwise",
                ),
            );
            return None;
        }
        // The draft is the one `$schema` names; 2020-12 when it names none.
        let validator = match jsonschema::options().build(&json) {
            Ok(validator) => validator,
            Err(error) => {
                self.push(Diagnostic::error(
                    Code::SchemaInvalid,
                    Location::file(&relative),
                    format!(
                        "schema `{}` cannot be compiled: {error}",
                        relative.display()
                    ),
                ));
                return None;
            }
        };
        collect_sensitive(&json, &mut self.redact, 0);
        Some(SchemaFile {
            json: Arc::new(json),
            validator: Arc::new(validator),
        })
    }

    fn request_schema(&mut self) -> Option<Arc<Validator>> {
        let relative = Path::new(SCHEMAS_DIR).join(REQUEST_SCHEMA_FILE);
        if !self.dir.join(&relative).is_file() {
            return None;
        }
        self.load_schema(REQUEST_SCHEMA_FILE, Location::file(&relative))
            .map(|schema| schema.validator.clone())
    }

    fn flow_triggers<'s>(
        &mut self,
        flow: &Defined<'s, spec::Flow>,
        intent_ids: &HashMap<&str, IntentId>,
    ) -> Vec<(&'s Name, IntentId)> {
        let spec = flow.spec;
        let mut names: Vec<&Name> = Vec::new();
        match (&spec.intent, &spec.intents) {
            (Some(intent), None) => names.push(intent),
            (None, Some(intents)) => names.extend(intents.value.iter()),
            (Some(intent), Some(_)) => {
                let location = self.location(flow.file, intent, intent.value.len());
                self.error(
                    Code::MisplacedKey,
                    location,
                    format!(
                        "flow `{}` has both `intent` and `intents`; keep one",
                        flow.name.value
                    ),
                );
            }
            (None, None) => {
                let location = self.location(flow.file, flow.name, flow.name.value.len());
                self.push(
                    Diagnostic::warning(
                        Code::FlowWithoutIntent,
                        location,
                        format!(
                            "flow `{}` has no `intent`, so nothing runs it",
                            flow.name.value
                        ),
                    )
                    .with_hint("add `intent: <name>` (or `intents: [a, b]`), or remove the flow"),
                );
            }
        }
        names
            .into_iter()
            .filter_map(|name| {
                self.resolve_intent(flow.file, name, intent_ids)
                    .map(|id| (name, id))
            })
            .collect()
    }

    fn compile_flow(
        &mut self,
        flow: &Defined<'_, spec::Flow>,
        entities: Option<BTreeSet<String>>,
        service_ids: &HashMap<&str, ServiceId>,
        services: &[Option<project::Service>],
    ) -> Option<project::Flow> {
        let spec = flow.spec;
        let mut step_ids = HashSet::new();
        let mut first_id: HashMap<String, Position> = HashMap::new();
        let mut all_steps: Vec<&spec::Step> = Vec::new();
        collect_steps(&spec.steps.value, &mut all_steps);
        if let Some(on_error) = &spec.on_error {
            collect_steps(std::slice::from_ref(on_error.as_ref()), &mut all_steps);
        }
        for step in &all_steps {
            if let Some(id) = &step.id {
                if let Some(first) = first_id.get(&id.value) {
                    let related = Location::new(flow.file, *first, id.value.len());
                    let location = self.location(flow.file, id, id.value.len());
                    self.push(
                        Diagnostic::error(
                            Code::DuplicateName,
                            location,
                            format!(
                                "step id `{}` is used twice in flow `{}`",
                                id.value, flow.name.value
                            ),
                        )
                        .with_related(related, "first used here"),
                    );
                } else {
                    first_id.insert(id.value.clone(), id.position);
                }
                if BASE_VARIABLES.contains(&id.value.as_str()) || id.value == "error" {
                    let location = self.location(flow.file, id, id.value.len());
                    self.error(
                        Code::InvalidValue,
                        location,
                        format!(
                            "step id `{}` would hide the context variable of that name",
                            id.value
                        ),
                    );
                }
                step_ids.insert(id.value.clone());
            }
        }
        let facts = FlowFacts {
            file: flow.file,
            name: &flow.name.value,
            step_ids,
            entities,
        };
        let mut scope = Scope::default();
        let steps =
            self.compile_steps(&spec.steps.value, &mut scope, &facts, service_ids, services);
        if !steps.replies {
            let location = self.location(flow.file, flow.name, flow.name.value.len());
            self.push(
                Diagnostic::error(
                    Code::MissingReply,
                    location,
                    format!("flow `{}` can end without a reply", flow.name.value),
                )
                .with_hint(
                    "end every path with a `reply` step (an `if` without `else` may be skipped)",
                ),
            );
        }
        let on_error = spec.on_error.as_ref().map(|on_error| {
            let mut scope = Scope {
                in_on_error: true,
                ..Scope::default()
            };
            self.compile_on_error(on_error, &mut scope, &facts, service_ids, services)
        });
        Some(project::Flow {
            name: flow.name.value.clone(),
            steps: steps.steps,
            on_error: match on_error {
                Some(compiled) => Some(compiled?),
                None => None,
            },
        })
    }

    fn compile_on_error(
        &mut self,
        on_error: &Spanned<spec::Step>,
        scope: &mut Scope,
        facts: &FlowFacts<'_>,
        service_ids: &HashMap<&str, ServiceId>,
        services: &[Option<project::Service>],
    ) -> Option<Vec<project::Step>> {
        scope.in_on_error = true;
        let compiled = self.compile_steps(
            std::slice::from_ref(on_error),
            scope,
            facts,
            service_ids,
            services,
        );
        if !compiled.replies {
            self.push(
                Diagnostic::error(
                    Code::MissingReply,
                    Location::new(facts.file, on_error.position, 1),
                    "`on_error` can end without a reply",
                )
                .with_hint("give `on_error` a `reply` (and a `route`), e.g. `on_error: { reply: \"...\", route: x_error }`"),
            );
        }
        Some(compiled.steps)
    }

    fn compile_steps(
        &mut self,
        steps: &[Spanned<spec::Step>],
        scope: &mut Scope,
        facts: &FlowFacts<'_>,
        service_ids: &HashMap<&str, ServiceId>,
        services: &[Option<project::Service>],
    ) -> CompiledSteps {
        let mut compiled = Vec::new();
        let mut replies = false;
        let mut warned = false;
        for step in steps {
            if replies && !warned {
                warned = true;
                self.push(
                    Diagnostic::warning(
                        Code::UnreachableStep,
                        Location::new(facts.file, step.position, 1),
                        "this step can never run: every path before it has replied",
                    )
                    .with_hint("remove it, or put an `if` on the reply before it"),
                );
            }
            match self.compile_step(step, scope, facts, service_ids, services) {
                Some((step, step_replies)) => {
                    compiled.push(step);
                    replies |= step_replies;
                }
                // Already reported; an unconditional reply still ends the
                // path, so the flow is not reported again as missing one.
                None => replies |= step.value.reply.is_some() && step.value.condition.is_none(),
            }
        }
        CompiledSteps {
            steps: compiled,
            replies,
        }
    }

    /// Compiles one step; returns it and whether it always replies.
    fn compile_step(
        &mut self,
        step: &Spanned<spec::Step>,
        scope: &mut Scope,
        facts: &FlowFacts<'_>,
        service_ids: &HashMap<&str, ServiceId>,
        services: &[Option<project::Service>],
    ) -> Option<(project::Step, bool)> {
        let spec = &step.value;
        let file = facts.file;
        let kinds: Vec<&str> = [
            ("call", spec.call.is_some()),
            ("reply", spec.reply.is_some()),
            ("set", spec.set.is_some()),
            ("then", spec.then.is_some()),
            ("switch", spec.switch.is_some()),
            ("parallel", spec.parallel.is_some()),
            ("foreach", spec.foreach.is_some()),
        ]
        .into_iter()
        .filter_map(|(kind, present)| present.then_some(kind))
        .collect();
        let kind = match kinds.as_slice() {
            [kind] => *kind,
            [] => {
                self.push(
                    Diagnostic::error(
                        Code::StepKind,
                        Location::new(file, step.position, 1),
                        "this step does nothing",
                    )
                    .with_hint("a step needs one of `call`, `reply`, `set`, `then`, `switch`, `parallel`, `foreach`"),
                );
                return None;
            }
            several => {
                self.push(
                    Diagnostic::error(
                        Code::StepKind,
                        Location::new(file, step.position, 1),
                        format!(
                            "a step does one thing, this one has {}",
                            several
                                .iter()
                                .map(|k| format!("`{k}`"))
                                .collect::<Vec<_>>()
                                .join(" and ")
                        ),
                    )
                    .with_hint("split it into one step per action"),
                );
                return None;
            }
        };
        self.misplaced_keys(file, step, kind);

        let condition = spec.condition.as_ref().and_then(|condition| {
            self.compile_expression(file, condition, &condition.value, scope, facts)
        });
        let condition_failed = spec.condition.is_some() && condition.is_none();

        // `else` runs with the scope from before the step.
        let otherwise = spec.otherwise.as_ref().map(|otherwise| {
            let mut branch_scope = scope.clone();
            self.compile_steps(
                &otherwise.value,
                &mut branch_scope,
                facts,
                service_ids,
                services,
            )
        });
        let otherwise_replies = otherwise.as_ref().is_some_and(|o| o.replies);

        let mut action_scope = scope.clone();
        let (action, action_replies) = match kind {
            "call" => {
                let (call, binding) =
                    self.compile_call(spec, &mut action_scope, facts, service_ids, services)?;
                if let Some(id) = &spec.id {
                    action_scope.define(&id.value, binding);
                }
                (project::Action::Call(call), false)
            }
            "reply" => (
                project::Action::Reply(self.compile_reply(spec, &action_scope, facts)?),
                true,
            ),
            "set" => {
                let mut values = Vec::new();
                let mut ok = true;
                for (name, value) in spec.set.iter().flat_map(|set| set.value.iter()) {
                    match self.compile_value(file, value, &action_scope, facts) {
                        Some(value) => values.push((name.value.clone(), value)),
                        None => ok = false,
                    }
                }
                if !ok {
                    return None;
                }
                (project::Action::Set(values), false)
            }
            "then" => {
                let then = spec.then.as_ref()?;
                let nested = self.compile_steps(
                    &then.value,
                    &mut action_scope,
                    facts,
                    service_ids,
                    services,
                );
                (project::Action::Then(nested.steps), nested.replies)
            }
            "switch" => {
                let expression = spec.switch.as_ref()?;
                let value = self.compile_expression(
                    file,
                    expression,
                    &expression.value,
                    &action_scope,
                    facts,
                );
                let mut cases = Vec::new();
                let mut all_reply = true;
                for (case, steps) in spec.cases.iter().flat_map(|cases| cases.value.iter()) {
                    let mut case_scope = action_scope.clone();
                    let compiled = self.compile_steps(
                        &steps.value,
                        &mut case_scope,
                        facts,
                        service_ids,
                        services,
                    );
                    all_reply &= compiled.replies;
                    cases.push((case.value.clone(), compiled.steps));
                }
                if spec.cases.is_none() {
                    self.push(
                        Diagnostic::error(
                            Code::MissingKey,
                            Location::new(file, expression.position, expression.value.len()),
                            "`switch` needs `cases`",
                        )
                        .with_hint("cases: { value: [steps], other: [steps] }"),
                    );
                }
                let default = match &spec.default {
                    Some(default) => {
                        let mut default_scope = action_scope.clone();
                        let compiled = self.compile_steps(
                            &default.value,
                            &mut default_scope,
                            facts,
                            service_ids,
                            services,
                        );
                        all_reply &= compiled.replies;
                        compiled.steps
                    }
                    None => {
                        all_reply = false;
                        Vec::new()
                    }
                };
                (
                    project::Action::Switch(project::Switch {
                        value: value?,
                        cases,
                        default,
                    }),
                    all_reply,
                )
            }
            "parallel" => {
                let branches = spec.parallel.as_ref()?;
                let mut calls = Vec::new();
                let mut bindings = Vec::new();
                for branch in &branches.value {
                    let branch_spec = &branch.value;
                    if branch_spec.call.is_none() || branch_spec.id.is_none() {
                        self.push(
                            Diagnostic::error(
                                Code::StepKind,
                                Location::new(file, branch.position, 1),
                                "each `parallel` branch is a `call` with an `id`",
                            )
                            .with_hint("- id: menu\n  call: menu"),
                        );
                        continue;
                    }
                    // Branches run at the same time: none sees another's result.
                    let mut branch_scope = action_scope.clone();
                    if let Some((compiled, _)) =
                        self.compile_step(branch, &mut branch_scope, facts, service_ids, services)
                    {
                        if let (Some(id), Some(binding)) = (
                            &branch_spec.id,
                            branch_scope.get(&branch_spec.id.as_ref()?.value),
                        ) {
                            bindings.push((id.value.clone(), binding.clone()));
                        }
                        calls.push(compiled);
                    }
                }
                for (id, binding) in bindings {
                    action_scope.define(&id, binding);
                }
                (project::Action::Parallel(calls), false)
            }
            "foreach" => {
                let list_text = spec.foreach.as_ref()?;
                let list = self.compile_expression(
                    file,
                    list_text,
                    &list_text.value,
                    &action_scope,
                    facts,
                );
                let binding = spec
                    .binding
                    .as_ref()
                    .map_or_else(|| "item".to_owned(), |name| name.value.clone());
                let mut body_scope = action_scope.clone();
                body_scope.define(&binding, Binding::Any);
                let steps = match &spec.each {
                    Some(steps) => {
                        self.compile_steps(
                            &steps.value,
                            &mut body_scope,
                            facts,
                            service_ids,
                            services,
                        )
                        .steps
                    }
                    None => {
                        self.push(Diagnostic::error(
                            Code::MissingKey,
                            Location::new(file, list_text.position, list_text.value.len()),
                            "`foreach` needs `do`: the steps to run for each element",
                        ));
                        Vec::new()
                    }
                };
                if let Some(id) = &spec.id {
                    action_scope.define(&id.value, Binding::Any);
                }
                (
                    project::Action::Foreach(project::Foreach {
                        list: list?,
                        binding,
                        steps,
                    }),
                    false,
                )
            }
            _ => return None,
        };
        if condition_failed {
            return None;
        }

        let replies = if spec.condition.is_some() {
            action_replies && otherwise_replies
        } else {
            action_replies
        };
        // What the step defined is visible after it only when the step
        // certainly ran: unconditionally, or with an `else` that replies.
        if spec.condition.is_none() || otherwise_replies {
            *scope = action_scope;
        }
        let source = project::StepSource {
            file: file.to_path_buf(),
            line: step.position.line,
            column: step.position.column,
        };
        let index = u32::try_from(self.step_sources.len()).unwrap_or(u32::MAX);
        self.step_sources.push(source.clone());
        Some((
            project::Step {
                index,
                id: spec.id.as_ref().map(|id| id.value.clone()),
                condition,
                otherwise: otherwise.map(|o| o.steps).unwrap_or_default(),
                action,
                source,
            },
            replies,
        ))
    }

    /// Keys that belong to another kind of step.
    fn misplaced_keys(&mut self, file: &Path, step: &Spanned<spec::Step>, kind: &str) {
        let spec = &step.value;
        let mut misplaced: Vec<(&str, Position, &str)> = Vec::new();
        let mut note = |key: &'static str, position: Option<Position>, owner: &'static str| {
            if let Some(position) = position
                && owner != kind
            {
                misplaced.push((key, position, owner));
            }
        };
        note("body", spec.body.as_ref().map(|v| v.position), "call");
        note(
            "on_error",
            spec.on_error.as_ref().map(|v| v.position),
            "call",
        );
        note("route", spec.route.as_ref().map(|v| v.position), "reply");
        note("data", spec.data.as_ref().map(|v| v.position), "reply");
        note(
            "decision",
            spec.decision.as_ref().map(|v| v.position),
            "reply",
        );
        note("cases", spec.cases.as_ref().map(|v| v.position), "switch");
        note(
            "default",
            spec.default.as_ref().map(|v| v.position),
            "switch",
        );
        note("as", spec.binding.as_ref().map(|v| v.position), "foreach");
        note("do", spec.each.as_ref().map(|v| v.position), "foreach");
        if let Some(id) = &spec.id
            && !matches!(kind, "call" | "foreach")
        {
            misplaced.push(("id", id.position, "call` or `foreach"));
        }
        for (key, position, owner) in misplaced {
            self.push(
                Diagnostic::error(
                    Code::MisplacedKey,
                    Location::new(file, position, 1),
                    format!("`{key}` belongs to a `{owner}` step, not to a `{kind}` step"),
                )
                .with_hint(format!("remove `{key}`, or make this a `{owner}` step")),
            );
        }
        if let (Some(otherwise), None) = (&spec.otherwise, &spec.condition) {
            self.push(
                Diagnostic::error(
                    Code::MisplacedKey,
                    Location::new(file, otherwise.position, 1),
                    "`else` without `if`",
                )
                .with_hint("add an `if:` condition to this step, or remove `else`"),
            );
        }
    }

    fn compile_call(
        &mut self,
        spec: &spec::Step,
        scope: &mut Scope,
        facts: &FlowFacts<'_>,
        service_ids: &HashMap<&str, ServiceId>,
        services: &[Option<project::Service>],
    ) -> Option<(project::Call, Binding)> {
        let file = facts.file;
        let name = spec.call.as_ref()?;
        let service = match service_ids.get(name.value.as_str()) {
            Some(id) => Some(*id),
            None => {
                if !self.unparsed_names.contains(&name.value) {
                    let hint = did_you_mean(&name.value, service_ids.keys().copied())
                        .unwrap_or_else(|| known_names("services", service_ids.keys().copied()));
                    self.push(
                        Diagnostic::error(
                            Code::UnknownService,
                            Location::new(file, name.position, name.value.len()),
                            format!("unknown service `{}`", name.value),
                        )
                        .with_hint(hint),
                    );
                }
                None
            }
        };
        let body = spec
            .body
            .as_ref()
            .map(|body| self.compile_value(file, body, scope, facts));
        let on_error = match &spec.on_error {
            Some(on_error) => {
                let mut error_scope = scope.clone();
                Some(self.compile_on_error(
                    on_error,
                    &mut error_scope,
                    facts,
                    service_ids,
                    services,
                ))
            }
            None => None,
        };
        let _ = services;
        let schema = self
            .service_schema_files
            .get(&name.value)
            .and_then(|file| self.schemas.get(file))
            .and_then(Option::as_ref)
            .map(|schema| schema.json.clone());
        let service = service?;
        Some((
            project::Call {
                service,
                body: match body {
                    Some(body) => Some(body?),
                    None => None,
                },
                on_error: match on_error {
                    Some(on_error) => Some(on_error?),
                    None => None,
                },
            },
            Binding::Response(schema),
        ))
    }

    fn compile_reply(
        &mut self,
        spec: &spec::Step,
        scope: &Scope,
        facts: &FlowFacts<'_>,
    ) -> Option<project::Reply> {
        let file = facts.file;
        let text = spec.reply.as_ref()?;
        let template = self.compile_text(file, text, scope, facts);
        let data = match &spec.data {
            Some(data) => Some(self.compile_value(file, data, scope, facts)?),
            None => None,
        };
        let decision = spec.decision.as_ref().map_or_else(
            || if scope.in_on_error { "error" } else { "reply" }.to_owned(),
            |decision| decision.value.clone(),
        );
        let route = spec
            .route
            .as_ref()
            .map_or_else(|| facts.name.to_owned(), |route| route.value.clone());
        self.routes.insert(route.clone());
        Some(project::Reply {
            text: template?,
            route,
            data,
            decision,
        })
    }

    fn compile_defaults(
        &mut self,
        defaults: Option<(&Path, &Spanned<spec::Defaults>)>,
    ) -> Option<project::Defaults> {
        let scope = Scope {
            in_on_error: true,
            ..Scope::default()
        };
        let error_reply =
            match defaults.and_then(|(file, d)| Some((file, d.value.error_reply.as_ref()?))) {
                Some((file, text)) => {
                    let facts = FlowFacts {
                        file,
                        name: "defaults",
                        step_ids: HashSet::new(),
                        entities: None,
                    };
                    self.compile_text(file, text, &scope, &facts)?
                }
                None => match self.templates.add_template(project::DEFAULT_ERROR_REPLY) {
                    Ok((id, _)) => id,
                    Err(error) => {
                        self.error(
                            Code::TemplateSyntax,
                            Location::file(load::FLOWS_DIR),
                            error.to_string(),
                        );
                        return None;
                    }
                },
            };
        Some(project::Defaults {
            error_reply,
            error_route: defaults
                .and_then(|(_, d)| d.value.error_route.as_ref())
                .map(|route| route.value.clone()),
        })
    }

    fn compile_text(
        &mut self,
        file: &Path,
        text: &spec::Text,
        scope: &Scope,
        facts: &FlowFacts<'_>,
    ) -> Option<template::TemplateId> {
        match self.templates.add_template(&text.value) {
            Ok((id, analysis)) => {
                self.check_variables(file, text.position, &analysis, scope, facts);
                Some(id)
            }
            Err(error) => {
                self.template_error(file, text.position, &text.value, &error);
                None
            }
        }
    }

    fn compile_expression<T>(
        &mut self,
        file: &Path,
        at: &Spanned<T>,
        source: &str,
        scope: &Scope,
        facts: &FlowFacts<'_>,
    ) -> Option<template::ExpressionId> {
        // `if: "{{ x }}"` is accepted as the expression `x`.
        let expression = template::lone_expression(source).unwrap_or(source);
        match self.templates.add_expression(expression) {
            Ok((id, analysis)) => {
                self.check_variables(file, at.position, &analysis, scope, facts);
                Some(id)
            }
            Err(error) => {
                self.template_error(file, at.position, source, &error);
                None
            }
        }
    }

    fn compile_value(
        &mut self,
        file: &Path,
        value: &Spanned<TemplateValue>,
        scope: &Scope,
        facts: &FlowFacts<'_>,
    ) -> Option<ValueTemplate> {
        match &value.value {
            TemplateValue::String(text) => {
                if let Some(expression) = template::lone_expression(text) {
                    let at = Spanned::new((), value.position);
                    let expression = expression.to_owned();
                    match self.templates.add_expression(&expression) {
                        Ok((id, analysis)) => {
                            self.check_variables(file, at.position, &analysis, scope, facts);
                            Some(ValueTemplate::Expression(id))
                        }
                        Err(error) => {
                            self.template_error(file, value.position, text, &error);
                            None
                        }
                    }
                } else if template::has_template_syntax(text) {
                    let spanned = Spanned::new(text.clone(), value.position);
                    self.compile_text(file, &spanned, scope, facts)
                        .map(ValueTemplate::Text)
                } else {
                    Some(ValueTemplate::Literal(Json::String(text.clone())))
                }
            }
            TemplateValue::List(items) => {
                let compiled: Vec<Option<ValueTemplate>> = items
                    .iter()
                    .map(|item| self.compile_value(file, item, scope, facts))
                    .collect();
                Some(ValueTemplate::List(
                    compiled.into_iter().collect::<Option<_>>()?,
                ))
            }
            TemplateValue::Map(entries) => {
                let compiled: Vec<Option<(String, ValueTemplate)>> = entries
                    .iter()
                    .map(|(key, value)| {
                        self.compile_value(file, value, scope, facts)
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

    fn template_error(
        &mut self,
        file: &Path,
        position: Position,
        source: &str,
        error: &minijinja::Error,
    ) {
        let located = error
            .range()
            .filter(|range| range.start < source.len())
            .and_then(|range| {
                let needle_end = source[range.start..]
                    .find('\n')
                    .map_or(source.len(), |offset| range.start + offset)
                    .min(range.end.max(range.start + 1))
                    .min(source.len());
                self.find_in_source(file, position, &source[range.start..needle_end])
            });
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
                if let Binding::Response(Some(schema)) = binding
                    && let Err(failure) = schema_path(schema, schema, &segments[1..], 0)
                {
                    self.report_path(
                        file,
                        position,
                        &segments,
                        failure.segment + 1,
                        &failure.candidates,
                        "the response schema of this call",
                        Code::UnknownResponseField,
                    );
                }
                continue;
            }
            match root {
                "text" | "user_id" | "channel" | "session_id" | "trace_id" | "tenant" | "input"
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

/// " at `/a/b`" for a JSON pointer, nothing for the document root.
fn at_pointer(pointer: &str) -> String {
    if pointer.is_empty() {
        String::new()
    } else {
        format!(" at `{pointer}`")
    }
}

/// A relative path with no `..`: it cannot leave the folder it is joined to.
fn stays_inside(path: &Path) -> bool {
    path.components()
        .all(|component| matches!(component, std::path::Component::Normal(_)))
}

fn candidates(names: &[&str]) -> Vec<String> {
    names.iter().map(|name| (*name).to_owned()).collect()
}

fn known_names<'n>(what: &str, names: impl Iterator<Item = &'n str>) -> String {
    let mut names: Vec<&str> = names.collect();
    names.sort_unstable();
    if names.is_empty() {
        format!("the project defines no {what}")
    } else {
        format!(
            "known {what}: {}",
            names
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// The last line of a regex error ("error: unclosed group"), without its prefix.
fn regex_error_summary(error: &regex::Error) -> String {
    let text = error.to_string();
    let last = text
        .lines()
        .map(str::trim)
        .rfind(|line| !line.is_empty())
        .unwrap_or(&text);
    last.strip_prefix("error: ").unwrap_or(last).to_owned()
}

fn reqwest_header_name_is_valid(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte))
}

fn collect_steps<'s>(steps: &'s [Spanned<spec::Step>], out: &mut Vec<&'s spec::Step>) {
    for step in steps {
        let spec = &step.value;
        out.push(spec);
        let nested = [
            &spec.otherwise,
            &spec.then,
            &spec.default,
            &spec.parallel,
            &spec.each,
        ];
        for list in nested.into_iter().flatten() {
            collect_steps(&list.value, out);
        }
        if let Some(cases) = &spec.cases {
            for steps in cases.value.values() {
                collect_steps(&steps.value, out);
            }
        }
        if let Some(on_error) = &spec.on_error {
            collect_steps(std::slice::from_ref(on_error.as_ref()), out);
        }
    }
}

/// Why a path does not exist in a schema.
struct PathFailure {
    /// Index of the first segment that is not declared.
    segment: usize,
    /// The property names declared where it was looked up.
    candidates: Vec<String>,
}

const MAX_SCHEMA_DEPTH: usize = 32;

/// Follows `segments` through `node` (part of `root`): `properties`,
/// `items` for numeric segments, `anyOf` / `oneOf` / `allOf`, local `$ref`.
/// A node that declares no properties at all accepts any path.
fn schema_path(
    root: &Json,
    node: &Json,
    segments: &[&str],
    depth: usize,
) -> Result<(), PathFailure> {
    let Some(segment) = segments.first() else {
        return Ok(());
    };
    if depth > MAX_SCHEMA_DEPTH {
        return Ok(());
    }
    let Json::Object(object) = node else {
        return Ok(());
    };
    if let Some(Json::String(reference)) = object.get("$ref") {
        if let Some(target) = reference
            .strip_prefix('#')
            .and_then(|pointer| root.pointer(pointer))
        {
            return schema_path(root, target, segments, depth + 1);
        }
        return Ok(());
    }
    let mut branches: Vec<&Json> = Vec::new();
    for keyword in ["anyOf", "oneOf", "allOf"] {
        if let Some(Json::Array(items)) = object.get(keyword) {
            branches.extend(items.iter());
        }
    }
    let properties = object.get("properties").and_then(Json::as_object);
    if properties.is_none() && branches.is_empty() {
        let is_index = segment.parse::<usize>().is_ok();
        if let (true, Some(items)) = (is_index, object.get("items")) {
            return schema_path(root, items, &segments[1..], depth + 1);
        }
        // A node typed as something without fields (a string, a number)
        // has no path below it; an object without declared properties
        // accepts any.
        let allows = |wanted: &str| match object.get("type") {
            None => true,
            Some(Json::String(kind)) => kind == wanted,
            Some(Json::Array(kinds)) => kinds.iter().any(|kind| kind == wanted),
            Some(_) => true,
        };
        if allows("object") || (is_index && allows("array")) {
            return Ok(());
        }
        return Err(PathFailure {
            segment: 0,
            candidates: Vec::new(),
        });
    }
    let mut candidates: Vec<String> = Vec::new();
    let mut deepest: Option<PathFailure> = None;
    if let Some(properties) = properties {
        match properties.get(*segment) {
            Some(child) => match schema_path(root, child, &segments[1..], depth + 1) {
                Ok(()) => return Ok(()),
                Err(failure) => deepest = Some(shift(failure)),
            },
            None => candidates.extend(properties.keys().cloned()),
        }
    }
    for branch in branches {
        match schema_path(root, branch, segments, depth + 1) {
            Ok(()) => {
                // A branch that declares nothing accepts anything; a branch
                // that declares properties accepted this segment.
                return Ok(());
            }
            Err(failure) if failure.segment == 0 => candidates.extend(failure.candidates),
            Err(failure) => {
                if deepest.as_ref().is_none_or(|d| failure.segment > d.segment) {
                    deepest = Some(failure);
                }
            }
        }
    }
    if let Some(failure) = deepest {
        return Err(failure);
    }
    candidates.sort();
    candidates.dedup();
    Err(PathFailure {
        segment: 0,
        candidates,
    })
}

fn shift(failure: PathFailure) -> PathFailure {
    PathFailure {
        segment: failure.segment + 1,
        candidates: failure.candidates,
    }
}

/// Adds every property marked `x-sensitive: true` to the redaction list.
fn collect_sensitive(node: &Json, out: &mut BTreeSet<String>, depth: usize) {
    if depth > MAX_SCHEMA_DEPTH {
        return;
    }
    match node {
        Json::Object(object) => {
            if let Some(Json::Object(properties)) = object.get("properties") {
                for (name, property) in properties {
                    if property.get("x-sensitive") == Some(&Json::Bool(true)) {
                        out.insert(name.clone());
                    }
                }
            }
            for value in object.values() {
                collect_sensitive(value, out, depth + 1);
            }
        }
        Json::Array(items) => {
            for item in items {
                collect_sensitive(item, out, depth + 1);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn path(schema: &Json, dotted: &str) -> Result<(), (usize, Vec<String>)> {
        let segments: Vec<&str> = dotted.split('.').collect();
        schema_path(schema, schema, &segments, 0).map_err(|f| (f.segment, f.candidates))
    }

    #[test]
    fn schema_paths_follow_properties_refs_and_unions() {
        let schema = json!({
            "type": "object",
            "properties": {
                "order_id": {"type": "string"},
                "output": {"anyOf": [{"type": "string"}, {"type": "object", "properties": {"text": {"type": "string"}}}]},
                "customer": {"$ref": "#/$defs/customer"},
                "lines": {"type": "array", "items": {"properties": {"sku": {}}}},
                "extra": {"type": "object"}
            },
            "$defs": {"customer": {"properties": {"name": {"type": "string"}}}}
        });
        assert!(path(&schema, "order_id").is_ok());
        assert!(path(&schema, "output.text").is_ok());
        assert!(path(&schema, "customer.name").is_ok());
        assert!(path(&schema, "lines.0.sku").is_ok());
        assert!(path(&schema, "extra.anything.at.all").is_ok());
        assert_eq!(path(&schema, "order_idd").unwrap_err().0, 0);
        let (segment, candidates) = path(&schema, "customer.nme").unwrap_err();
        assert_eq!((segment, candidates), (1, vec!["name".to_owned()]));
        let (segment, candidates) = path(&schema, "output.txt").unwrap_err();
        assert_eq!((segment, candidates), (1, vec!["text".to_owned()]));
    }

    #[test]
    fn sensitive_properties_are_collected() {
        let schema = json!({"properties": {"card": {"x-sensitive": true}, "nested": {"properties": {"pin": {"x-sensitive": true}, "ok": {}}}}});
        let mut out = BTreeSet::new();
        collect_sensitive(&schema, &mut out, 0);
        assert_eq!(out.into_iter().collect::<Vec<_>>(), ["card", "pin"]);
    }
}
