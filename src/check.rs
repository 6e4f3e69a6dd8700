//! Static validation: spec types → `CompiledProject`, or every problem found.
//!
//! One pass over the loaded files resolves names, compiles templates and
//! JSON Schemas, and walks every flow with the set of names a template may
//! read at that point (step results defined before it, with the response
//! schema of the service each one called). It reports every problem it finds
//! rather than stopping at the first, and builds the compiled project only
//! when there is no error.
//!
//! This file holds the public API and the walk over the project; each part
//! of the project is checked in its own file, which adds the methods it needs
//! to `Checker`:
//!
//! - `names`: definitions gathered across files, duplicates, references;
//! - `intents`: intents (entity patterns, keywords) and the classifier;
//! - `services`: services (URL, timeout, retry, headers) and their mocks;
//! - `schemas`: JSON Schema files, paths into them, sensitive properties;
//! - `flows`: flows, their triggers and steps, the scope of each step, and
//!   the project defaults;
//! - `channels`: messaging platforms' webhooks, their secrets and mappings;
//! - `templates`: templates, expressions and values, and the variables they
//!   read.

mod access;
mod channels;
mod flows;
mod intents;
mod names;
pub mod online;
mod schemas;
mod services;
mod templates;
mod tools;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use crate::diagnostic::{Code, Diagnostic, Location, Sources};
use crate::load::{self, Environment, LoadedProject};
use crate::project::{self, CompiledProject, IntentId, ServiceId};
use crate::spec::{Name, Spanned};
use crate::template::TemplatesBuilder;

use schemas::SchemaFile;

/// The request body schema, when a project has one.
pub const REQUEST_SCHEMA_FILE: &str = "orchestrate_request.schema.json";

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

/// The state of one check: what has been read and compiled so far, and
/// every diagnostic.
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

    /// Checks each part of the project in turn; builds the compiled project
    /// when no diagnostic is an error.
    fn check(&mut self, files: &[load::LoadedFile]) -> Option<CompiledProject> {
        let intents = self.collect(files, "intent", |file| &file.intents);
        let services = self.collect(files, "service", |file| &file.services);
        let flows = self.collect(files, "flow", |file| &file.flows);
        let classifier = self.single(files, "classifier", |file| file.classifier.as_ref());
        let defaults = self.single(files, "defaults", |file| file.defaults.as_ref());
        let access = self.single(files, "access", |file| file.access.as_ref());
        let limits = self.single(files, "limits", |file| file.limits.as_ref());
        let channels = self.collect(files, "channel", |file| &file.channels);
        let hosts = self.single(files, "hosts", |file| file.hosts.as_ref());
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
        if let Some(classifier) = &classifier {
            self.check_examples(&intents, classifier);
        }

        let default_breaker =
            match defaults.and_then(|(file, d)| Some((file, d.value.circuit_breaker.as_ref()?))) {
                Some((file, policy)) => self.circuit_breaker(file, policy),
                None => None,
            };
        let mut compiled_services: Vec<Option<project::Service>> = services
            .iter()
            .map(|service| self.compile_service(service))
            .collect();
        for service in compiled_services.iter_mut().flatten() {
            if service.circuit_breaker.is_none() {
                service.circuit_breaker = default_breaker;
            }
        }
        let service_ids: HashMap<&str, ServiceId> = services
            .iter()
            .enumerate()
            .map(|(index, service)| (service.name.value.as_str(), ServiceId(index as u32)))
            .collect();

        let (compiled_flows, flow_of_intent) = self.compile_flows(
            &flows,
            &intent_ids,
            &compiled_intents,
            &service_ids,
            &compiled_services,
        );
        let flow_for_intent = self.flow_for_intent(&intents, classifier.as_ref(), &flow_of_intent);

        let defaults = self.compile_defaults(defaults);
        let access = self.compile_access(access);
        let limits = self.compile_limits(limits);
        let channels = self.compile_channels(&channels, &service_ids);
        let hosts = self.compile_hosts(hosts);
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
            access: access?,
            limits: limits?,
            channels: channels?,
            hosts,
        })
    }
}

/// A relative path with no `..`: it cannot leave the folder it is joined to.
fn stays_inside(path: &Path) -> bool {
    path.components()
        .all(|component| matches!(component, std::path::Component::Normal(_)))
}
