//! Problems found in a flow project, and their three renderings: human
//! (rustc-style snippets), JSON, and GitHub workflow annotations.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use annotate_snippets::{AnnotationKind, Group, Level, Renderer, Snippet};
use serde::Serialize;

use crate::spec::Position;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// Stable diagnostic codes. The kebab-case string is the public name: CI
/// scripts and editors match on it, so a code is never renamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Code {
    Io,
    YamlSyntax,
    UnknownKey,
    DuplicateKey,
    InvalidValue,
    MissingKey,
    DuplicateName,
    UnknownIntent,
    UnknownService,
    UnknownRoute,
    UnknownFlow,
    UnknownDecision,
    UnknownVariable,
    UnknownResponseField,
    UndefinedStepReference,
    TemplateSyntax,
    InvalidRegex,
    InvalidDuration,
    InvalidUrl,
    SchemaMissing,
    SchemaInvalid,
    MockMissing,
    MockInvalid,
    StepKind,
    MisplacedKey,
    MissingReply,
    UnreachableStep,
    IntentWithoutFlow,
    IntentWithSeveralFlows,
    FlowWithoutIntent,
    MissingFallback,
    UnsetEnvVar,
    FewExamples,
    DuplicateExample,
    ConfusableExample,
    /// `check --online` only: a `kind: mcp` service's server did not list
    /// its tools.
    McpServerUnavailable,
    /// `check --online` only: the server serves no such tool.
    UnknownTool,
    /// `check --online` only: a call's body does not fit the tool's
    /// input schema.
    InvalidArguments,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Io => "io",
            Code::YamlSyntax => "yaml-syntax",
            Code::UnknownKey => "unknown-key",
            Code::DuplicateKey => "duplicate-key",
            Code::InvalidValue => "invalid-value",
            Code::MissingKey => "missing-key",
            Code::DuplicateName => "duplicate-name",
            Code::UnknownIntent => "unknown-intent",
            Code::UnknownService => "unknown-service",
            Code::UnknownRoute => "unknown-route",
            Code::UnknownFlow => "unknown-flow",
            Code::UnknownDecision => "unknown-decision",
            Code::UnknownVariable => "unknown-variable",
            Code::UnknownResponseField => "unknown-response-field",
            Code::UndefinedStepReference => "undefined-step-reference",
            Code::TemplateSyntax => "template-syntax",
            Code::InvalidRegex => "invalid-regex",
            Code::InvalidDuration => "invalid-duration",
            Code::InvalidUrl => "invalid-url",
            Code::SchemaMissing => "schema-missing",
            Code::SchemaInvalid => "schema-invalid",
            Code::MockMissing => "mock-missing",
            Code::MockInvalid => "mock-invalid",
            Code::StepKind => "step-kind",
            Code::MisplacedKey => "misplaced-key",
            Code::MissingReply => "missing-reply",
            Code::UnreachableStep => "unreachable-step",
            Code::IntentWithoutFlow => "intent-without-flow",
            Code::IntentWithSeveralFlows => "intent-with-several-flows",
            Code::FlowWithoutIntent => "flow-without-intent",
            Code::MissingFallback => "missing-fallback",
            Code::UnsetEnvVar => "unset-env-var",
            Code::FewExamples => "few-examples",
            Code::DuplicateExample => "duplicate-example",
            Code::ConfusableExample => "confusable-example",
            Code::McpServerUnavailable => "mcp-server-unavailable",
            Code::UnknownTool => "unknown-tool",
            Code::InvalidArguments => "invalid-arguments",
        }
    }

    /// Every code, for documentation and for the test that each has a fixture.
    pub const ALL: &'static [Code] = &[
        Code::Io,
        Code::YamlSyntax,
        Code::UnknownKey,
        Code::DuplicateKey,
        Code::InvalidValue,
        Code::MissingKey,
        Code::DuplicateName,
        Code::UnknownIntent,
        Code::UnknownService,
        Code::UnknownRoute,
        Code::UnknownFlow,
        Code::UnknownDecision,
        Code::UnknownVariable,
        Code::UnknownResponseField,
        Code::UndefinedStepReference,
        Code::TemplateSyntax,
        Code::InvalidRegex,
        Code::InvalidDuration,
        Code::InvalidUrl,
        Code::SchemaMissing,
        Code::SchemaInvalid,
        Code::MockMissing,
        Code::MockInvalid,
        Code::StepKind,
        Code::MisplacedKey,
        Code::MissingReply,
        Code::UnreachableStep,
        Code::IntentWithoutFlow,
        Code::IntentWithSeveralFlows,
        Code::FlowWithoutIntent,
        Code::MissingFallback,
        Code::UnsetEnvVar,
        Code::FewExamples,
        Code::DuplicateExample,
        Code::ConfusableExample,
        Code::McpServerUnavailable,
        Code::UnknownTool,
        Code::InvalidArguments,
    ];

    /// Whether only `check --online` reports it (it needs a server to
    /// answer, so no fixture project produces it alone).
    pub fn is_online(self) -> bool {
        matches!(
            self,
            Code::McpServerUnavailable | Code::UnknownTool | Code::InvalidArguments
        )
    }
}

/// A place in a project file. `file` is relative to the project directory.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Location {
    pub file: PathBuf,
    pub line: u32,
    pub column: u32,
    pub end_line: u32,
    pub end_column: u32,
}

impl Location {
    pub fn new(file: impl Into<PathBuf>, position: Position, width: usize) -> Location {
        let width = u32::try_from(width.max(1)).unwrap_or(1);
        Location {
            file: file.into(),
            line: position.line,
            column: position.column,
            end_line: position.line,
            end_column: position.column.saturating_add(width),
        }
    }

    /// A location for a whole file, when nothing more precise is known.
    pub fn file(file: impl Into<PathBuf>) -> Location {
        Location {
            file: file.into(),
            line: 0,
            column: 0,
            end_line: 0,
            end_column: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Related {
    pub message: String,
    #[serde(flatten)]
    pub location: Location,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub code: Code,
    pub severity: Severity,
    pub message: String,
    #[serde(flatten)]
    pub location: Location,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub related: Vec<Related>,
}

impl Diagnostic {
    /// The same diagnostic with its files under `prefix` (a tenant's
    /// folder in a deployment of several).
    pub fn under(mut self, prefix: &Path) -> Diagnostic {
        self.location.file = prefix.join(&self.location.file);
        for related in &mut self.related {
            related.location.file = prefix.join(&related.location.file);
        }
        self
    }

    pub fn error(code: Code, location: Location, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            code,
            severity: Severity::Error,
            message: message.into(),
            location,
            hint: None,
            related: Vec::new(),
        }
    }

    pub fn warning(code: Code, location: Location, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::error(code, location, message)
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Diagnostic {
        self.hint = Some(hint.into());
        self
    }

    pub fn with_optional_hint(mut self, hint: Option<String>) -> Diagnostic {
        self.hint = hint;
        self
    }

    pub fn with_related(mut self, location: Location, message: impl Into<String>) -> Diagnostic {
        self.related.push(Related {
            message: message.into(),
            location,
        });
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

/// "did you mean `x`?" for a misspelt name, when one candidate is close enough.
pub fn did_you_mean<'a>(
    wrong: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    let mut best: Option<(f64, &str)> = None;
    for candidate in candidates {
        let score = strsim::jaro_winkler(wrong, candidate);
        if score > 0.8 && best.is_none_or(|(best_score, _)| score > best_score) {
            best = Some((score, candidate));
        }
    }
    best.map(|(_, candidate)| format!("did you mean `{candidate}`?"))
}

/// Sorts diagnostics by file, line and column, so output is stable.
pub fn sort(diagnostics: &mut [Diagnostic]) {
    diagnostics
        .sort_by(|a, b| (&a.location, a.code, &a.message).cmp(&(&b.location, b.code, &b.message)));
}

/// Source text of the project's files, for rendering snippets.
#[derive(Debug, Default)]
pub struct Sources {
    files: HashMap<PathBuf, String>,
}

impl Sources {
    pub fn insert(&mut self, file: PathBuf, text: String) {
        self.files.insert(file, text);
    }

    /// The same files under `prefix` (a tenant's folder in a deployment
    /// of several).
    pub fn under(self, prefix: &Path) -> Sources {
        Sources {
            files: self
                .files
                .into_iter()
                .map(|(file, text)| (prefix.join(file), text))
                .collect(),
        }
    }

    /// Adds every file of `other`.
    pub fn merge(&mut self, other: Sources) {
        self.files.extend(other.files);
    }

    pub fn get(&self, file: &Path) -> Option<&str> {
        self.files.get(file).map(String::as_str)
    }
}

/// rustc-style rendering with the offending line and a caret.
pub fn render_human(diagnostics: &[Diagnostic], sources: &Sources, color: bool) -> String {
    let renderer = if color {
        Renderer::styled()
    } else {
        Renderer::plain()
    };
    let mut out = String::new();
    for diagnostic in diagnostics {
        let level = match diagnostic.severity {
            Severity::Error => Level::ERROR,
            Severity::Warning => Level::WARNING,
        };
        let path = diagnostic.location.file.display().to_string();
        let title = level
            .primary_title(diagnostic.message.as_str())
            .id(diagnostic.code.as_str());
        let mut groups = Vec::new();
        let snippet = snippet_for(&diagnostic.location, sources, &path, "");
        groups.push(match snippet {
            Some(snippet) => title.element(snippet),
            None => title.element(annotate_snippets::Origin::path(path.as_str())),
        });
        let related_paths: Vec<String> = diagnostic
            .related
            .iter()
            .map(|related| related.location.file.display().to_string())
            .collect();
        for (related, related_path) in diagnostic.related.iter().zip(&related_paths) {
            if let Some(snippet) = snippet_for(
                &related.location,
                sources,
                related_path,
                related.message.as_str(),
            ) {
                groups.push(
                    Group::with_title(Level::NOTE.secondary_title(related.message.as_str()))
                        .element(snippet),
                );
            }
        }
        if let Some(hint) = &diagnostic.hint {
            groups.push(Group::with_title(
                Level::HELP.secondary_title(hint.as_str()),
            ));
        }
        let _ = writeln!(out, "{}\n", renderer.render(&groups));
    }
    let errors = diagnostics.iter().filter(|d| d.is_error()).count();
    let warnings = diagnostics.len() - errors;
    let _ = writeln!(
        out,
        "{errors} error{}, {warnings} warning{}",
        if errors == 1 { "" } else { "s" },
        if warnings == 1 { "" } else { "s" }
    );
    out
}

fn snippet_for<'a>(
    location: &Location,
    sources: &'a Sources,
    path: &'a str,
    label: &'a str,
) -> Option<Snippet<'a, annotate_snippets::Annotation<'a>>> {
    if location.line == 0 {
        return None;
    }
    let text = sources.get(&location.file)?;
    let line_index = usize::try_from(location.line - 1).ok()?;
    let line_text = nth_line(text, line_index)?;
    let column = usize::try_from(location.column.max(1) - 1).ok()?;
    let start = char_to_byte(line_text, column);
    let end = if location.end_line == location.line {
        char_to_byte(
            line_text,
            usize::try_from(location.end_column.max(location.column + 1) - 1).ok()?,
        )
    } else {
        line_text.len()
    }
    .max(start);
    let end = if end == start && start < line_text.len() {
        start + line_text[start..].chars().next().map_or(1, char::len_utf8)
    } else {
        end
    };
    Some(
        Snippet::source(line_text)
            .line_start(line_index + 1)
            .path(path)
            .annotation(AnnotationKind::Primary.span(start..end).label(label)),
    )
}

fn nth_line(text: &str, index: usize) -> Option<&str> {
    text.split('\n')
        .nth(index)
        .map(|line| line.strip_suffix('\r').unwrap_or(line))
}

fn char_to_byte(line: &str, chars: usize) -> usize {
    line.char_indices()
        .nth(chars)
        .map_or(line.len(), |(byte, _)| byte)
}

/// One JSON array of diagnostics.
pub fn render_json(diagnostics: &[Diagnostic]) -> String {
    serde_json::to_string_pretty(diagnostics).unwrap_or_else(|_| "[]".to_owned())
}

/// GitHub Actions workflow commands: `::error file=...,line=...::message`.
/// `file` is made relative to the working directory's repository layout by
/// prefixing the project directory as given on the command line.
pub fn render_github(diagnostics: &[Diagnostic], project_dir: &Path) -> String {
    let mut out = String::new();
    for diagnostic in diagnostics {
        let command = match diagnostic.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        let file = if project_dir == Path::new(".") || project_dir.as_os_str().is_empty() {
            diagnostic.location.file.clone()
        } else {
            project_dir.join(&diagnostic.location.file)
        };
        let mut properties = format!("file={}", escape_property(&file.display().to_string()));
        if diagnostic.location.line > 0 {
            let location = &diagnostic.location;
            let _ = write!(
                properties,
                ",line={},col={},endLine={},endColumn={}",
                location.line, location.column, location.end_line, location.end_column
            );
        }
        let _ = write!(
            properties,
            ",title={}",
            escape_property(diagnostic.code.as_str())
        );
        let mut message = diagnostic.message.clone();
        if let Some(hint) = &diagnostic.hint {
            message.push_str("\nhint: ");
            message.push_str(hint);
        }
        let _ = writeln!(out, "::{command} {properties}::{}", escape_data(&message));
    }
    out
}

/// Escapes the message of a GitHub workflow command.
pub fn escape_data(text: &str) -> String {
    text.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

/// Escapes a property (`file=`, `title=`) of a GitHub workflow command.
pub fn escape_property(text: &str) -> String {
    escape_data(text).replace(':', "%3A").replace(',', "%2C")
}
