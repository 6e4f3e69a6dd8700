//! Files → spec types plus diagnostics.
//!
//! Reads every `*.yaml` under `flows/` (except `flows/tests/`, which holds
//! conversation tests), substitutes `${VAR}` / `${VAR:-default}` from the
//! environment map it is given, and deserializes each file into a
//! `spec::FlowFile` with serde-saphyr.
//!
//! A file that fails to deserialize is parsed again one entry at a time (one
//! intent, one service, one flow, one other top-level section), so that one
//! bad key does not hide the mistakes in the other entries. Entries that fail
//! are reported and left out; their names are remembered so `check` does not
//! report every reference to them as a second error.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use indexmap::IndexMap;
use regex::Regex;
use serde::Deserialize;
use serde::de::{self, DeserializeOwned, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_saphyr::{DuplicateKeyPolicy, Options, PropertySyntax};

use crate::diagnostic::{Code, Diagnostic, Location, Sources, did_you_mean};
use crate::spec::{FLOW_FILE_KEYS, FlowFile, Name, Position};

/// Environment variables visible to `${VAR}` substitution. Only the CLI layer
/// reads the process environment; everything below gets this map.
pub type Environment = HashMap<String, String>;

/// The folder of flow files inside a project directory.
pub const FLOWS_DIR: &str = "flows";
/// The folder of JSON Schemas inside a project directory.
pub const SCHEMAS_DIR: &str = "schemas";
/// The folder of conversation tests inside `flows/`, not read by `serve`.
pub const TESTS_DIR: &str = "tests";

/// One flow file as read and parsed.
#[derive(Debug)]
pub struct LoadedFile {
    /// Path relative to the project directory, e.g. `flows/order.yaml`.
    pub path: PathBuf,
    pub spec: FlowFile,
}

/// Everything `check` needs: the parsed files, their text, what went wrong.
#[derive(Debug)]
pub struct LoadedProject {
    pub dir: PathBuf,
    pub files: Vec<LoadedFile>,
    /// Source text of every file read, for snippets and for locating
    /// positions inside templates.
    pub sources: Sources,
    pub diagnostics: Vec<Diagnostic>,
    /// Names of entries that failed to parse: references to them are not
    /// reported again.
    pub unparsed_names: HashSet<String>,
    /// False when some file or entry could not be parsed: project-wide
    /// checks ("the fallback intent has no flow") are then skipped, since
    /// what is missing may be in the part that failed.
    pub complete: bool,
}

/// Reads and parses the flow files of the project in `dir`.
pub fn load_project(dir: &Path, environment: &Environment) -> LoadedProject {
    let mut project = LoadedProject {
        dir: dir.to_path_buf(),
        files: Vec::new(),
        sources: Sources::default(),
        diagnostics: Vec::new(),
        unparsed_names: HashSet::new(),
        complete: true,
    };
    let flows_dir = dir.join(FLOWS_DIR);
    let mut paths = Vec::new();
    if let Err(error) = collect_yaml_files(&flows_dir, &flows_dir, &mut paths) {
        project.complete = false;
        project.diagnostics.push(Diagnostic::error(
            Code::Io,
            Location::file(FLOWS_DIR),
            format!("cannot read the flow folder `{FLOWS_DIR}/`: {error}"),
        ));
        return project;
    }
    if paths.is_empty() {
        project.complete = false;
        project.diagnostics.push(
            Diagnostic::error(
                Code::Io,
                Location::file(FLOWS_DIR),
                format!("no flow files (`*.yaml` or `*.yml`) in `{FLOWS_DIR}/`"),
            )
            .with_hint(
                "a project keeps its flow files in `flows/` and its JSON Schemas in `schemas/`",
            ),
        );
        return project;
    }
    paths.sort();
    for absolute in paths {
        let relative = absolute
            .strip_prefix(dir)
            .map(Path::to_path_buf)
            .unwrap_or_else(|_| absolute.clone());
        let text = match std::fs::read_to_string(&absolute) {
            Ok(text) => text,
            Err(error) => {
                project.complete = false;
                project.diagnostics.push(Diagnostic::error(
                    Code::Io,
                    Location::file(&relative),
                    format!("cannot read `{}`: {error}", relative.display()),
                ));
                continue;
            }
        };
        let parsed = parse_flow_file(&relative, &text, environment);
        project.diagnostics.extend(parsed.diagnostics);
        project.unparsed_names.extend(parsed.unparsed_names);
        project.complete &= parsed.complete;
        project.files.push(LoadedFile {
            path: relative.clone(),
            spec: parsed.spec,
        });
        project.sources.insert(relative, text);
    }
    project
}

fn collect_yaml_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        // Hidden entries are not the project's: a Kubernetes ConfigMap
        // mounted as `flows/` keeps every file a second and third time under
        // `..data/` and `..<timestamp>/`, and editors leave `.#name.yaml`
        // lock links that point nowhere.
        if entry.file_name().as_encoded_bytes().starts_with(b".") {
            continue;
        }
        let path = entry.path();
        let file_type = std::fs::metadata(&path)?.file_type();
        if file_type.is_dir() {
            if dir == root && entry.file_name() == TESTS_DIR {
                continue;
            }
            collect_yaml_files(root, &path, out)?;
        } else if path
            .extension()
            .is_some_and(|extension| extension == "yaml" || extension == "yml")
        {
            out.push(path);
        }
    }
    Ok(())
}

/// The outcome of parsing one flow file.
#[derive(Debug)]
pub struct ParsedFile {
    pub spec: FlowFile,
    pub diagnostics: Vec<Diagnostic>,
    pub unparsed_names: Vec<String>,
    /// False when part of the file could not be read into the spec.
    pub complete: bool,
}

/// Parses one flow file, reporting as many problems as it can find.
pub fn parse_flow_file(path: &Path, text: &str, environment: &Environment) -> ParsedFile {
    let mut diagnostics = unset_variables(path, text, environment);
    let options = parse_options(environment);
    match from_str_with::<FlowFile>(text, &options) {
        Ok(spec) => ParsedFile {
            spec,
            diagnostics,
            unparsed_names: Vec::new(),
            complete: true,
        },
        Err(whole_file_error) => {
            // A syntax error (or a duplicate key) is reported as the plain
            // parse finds it, without the typed reading in the way.
            if let Err(syntax_error) = from_str_with::<IndexMap<Name, SectionKeys>>(text, &options)
            {
                diagnostics.push(yaml_error_diagnostic(path, &syntax_error));
                return ParsedFile {
                    spec: FlowFile::default(),
                    diagnostics,
                    unparsed_names: Vec::new(),
                    complete: false,
                };
            }
            let recovered = parse_entry_by_entry(path, text, &options);
            match recovered {
                Some(recovered) if !recovered.diagnostics.is_empty() => {
                    diagnostics.extend(recovered.diagnostics);
                    ParsedFile {
                        spec: recovered.spec,
                        diagnostics,
                        unparsed_names: recovered.unparsed_names,
                        complete: false,
                    }
                }
                _ => {
                    diagnostics.push(yaml_error_diagnostic(path, &whole_file_error));
                    ParsedFile {
                        spec: FlowFile::default(),
                        diagnostics,
                        unparsed_names: Vec::new(),
                        complete: false,
                    }
                }
            }
        }
    }
}

/// Parses one YAML document of any spec type with the same options as flow
/// files (`${VAR}` substitution, duplicate keys rejected), without the
/// entry-by-entry recovery.
pub fn parse_document<T: DeserializeOwned>(
    path: &Path,
    text: &str,
    environment: &Environment,
) -> Result<(T, Vec<Diagnostic>), Vec<Diagnostic>> {
    let mut diagnostics = unset_variables(path, text, environment);
    match from_str_with::<T>(text, &parse_options(environment)) {
        Ok(value) => Ok((value, diagnostics)),
        Err(error) => {
            diagnostics.push(yaml_error_diagnostic(path, &error));
            Err(diagnostics)
        }
    }
}

fn parse_options(environment: &Environment) -> Options {
    let mut options = Options::default().with_properties(environment.clone());
    options.property_syntax = PropertySyntax::DockerCompose;
    options.duplicate_keys = DuplicateKeyPolicy::Error;
    options
}

fn from_str_with<T: DeserializeOwned>(
    text: &str,
    options: &Options,
) -> Result<T, serde_saphyr::Error> {
    serde_saphyr::from_str_with_options(text, options.clone())
}

/// `${VAR}` without a default, where `VAR` is not set: a warning, since the
/// value silently becomes empty. Positions come straight from the text.
fn unset_variables(path: &Path, text: &str, environment: &Environment) -> Vec<Diagnostic> {
    static VARIABLE: LazyLock<Regex> = LazyLock::new(|| {
        #[allow(clippy::expect_used)]
        Regex::new(
            r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[-?+=][^}]*)?\}|\$([A-Za-z_][A-Za-z0-9_]*)",
        )
        .expect("the variable pattern is valid")
    });
    let mut diagnostics = Vec::new();
    for (line_index, line) in text.lines().enumerate() {
        if line.trim_start().starts_with('#') {
            continue;
        }
        for captures in VARIABLE.captures_iter(line) {
            // `${NAME}` or, as docker-compose reads it, a bare `$NAME`.
            let (Some(whole), Some(name)) =
                (captures.get(0), captures.get(1).or_else(|| captures.get(3)))
            else {
                continue;
            };
            if captures.get(2).is_some() || environment.contains_key(name.as_str()) {
                continue;
            }
            let column = line[..whole.start()].chars().count() + 1;
            diagnostics.push(
                Diagnostic::warning(
                    Code::UnsetEnvVar,
                    Location::new(
                        path,
                        position(line_index + 1, column),
                        whole.as_str().chars().count(),
                    ),
                    format!(
                        "environment variable `{}` is not set; the value is empty",
                        name.as_str()
                    ),
                )
                .with_hint(format!(
                    "set `{0}`, or give a default: `${{{0}:-value}}` (write `$$` for a literal `$`)",
                    name.as_str()
                )),
            );
        }
    }
    diagnostics
}

fn position(line: usize, column: usize) -> Position {
    Position {
        line: u32::try_from(line).unwrap_or(u32::MAX),
        column: u32::try_from(column).unwrap_or(u32::MAX),
    }
}

fn location_of(error: &serde_saphyr::Error) -> Position {
    error.location().map_or(Position::UNKNOWN, |location| {
        position(
            usize::try_from(location.line()).unwrap_or(usize::MAX),
            usize::try_from(location.column()).unwrap_or(usize::MAX),
        )
    })
}

/// Maps a serde-saphyr error to a diagnostic with a stable code.
fn yaml_error_diagnostic(path: &Path, error: &serde_saphyr::Error) -> Diagnostic {
    use serde_saphyr::Error as E;
    let inner = error.without_snippet();
    let position = location_of(error);
    match inner {
        E::SerdeUnknownField {
            field, expected, ..
        } => {
            let hint = did_you_mean(field, expected.iter().copied()).unwrap_or_else(|| {
                format!(
                    "allowed keys here: {}",
                    expected
                        .iter()
                        .map(|key| format!("`{key}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            });
            Diagnostic::error(
                Code::UnknownKey,
                Location::new(path, position, field.chars().count()),
                format!("unknown key `{field}`"),
            )
            .with_hint(hint)
        }
        E::DuplicateMappingKey { key, .. } => Diagnostic::error(
            Code::DuplicateKey,
            Location::new(
                path,
                position,
                key.as_deref().map_or(1, |k| k.chars().count()),
            ),
            match key {
                Some(key) => format!("duplicate key `{key}`"),
                None => "duplicate key".to_owned(),
            },
        )
        .with_hint("a key may appear only once in a mapping; remove or rename one of them"),
        E::SerdeMissingField { field, .. } => Diagnostic::error(
            Code::MissingKey,
            Location::new(path, position, 1),
            format!("missing key `{field}`"),
        ),
        E::SerdeUnknownVariant {
            variant, expected, ..
        } => Diagnostic::error(
            Code::InvalidValue,
            Location::new(path, position, variant.chars().count()),
            format!("invalid value `{variant}`"),
        )
        .with_hint(
            did_you_mean(variant, expected.iter().copied()).unwrap_or_else(|| {
                format!(
                    "expected one of {}",
                    expected
                        .iter()
                        .map(|v| format!("`{v}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }),
        ),
        E::SerdeInvalidType {
            unexpected,
            expected,
            ..
        }
        | E::SerdeInvalidValue {
            unexpected,
            expected,
            ..
        } => Diagnostic::error(
            Code::InvalidValue,
            Location::new(path, position, 1),
            format!("invalid value: found {unexpected}, expected {expected}"),
        ),
        other => Diagnostic::error(
            Code::YamlSyntax,
            Location::new(path, position, 1),
            plain_message(other),
        ),
    }
}

fn plain_message(error: &serde_saphyr::Error) -> String {
    let formatter = serde_saphyr::UserMessageFormatter;
    let options = serde_saphyr::render_options! {
        formatter: &formatter,
        snippets: serde_saphyr::SnippetMode::Off,
    };
    let rendered = error.render_with_options(options);
    // The plain rendering ends with " at line L column C"; the diagnostic
    // carries the position itself.
    match rendered.rfind(" at line ") {
        Some(index) => rendered[..index].to_owned(),
        None => rendered,
    }
}

/// Entry-by-entry parse of a file whose whole-file parse failed.
/// Returns `None` when the file's layout does not allow it (the whole-file
/// error is then reported as it is).
fn parse_entry_by_entry(path: &Path, text: &str, options: &Options) -> Option<ParsedFile> {
    let skeleton: IndexMap<Name, SectionKeys> = from_str_with(text, options).ok()?;
    let line_starts = line_starts(text);
    let last_line = line_starts.len() + 1;
    let mut sections: Vec<(&Name, &SectionKeys)> = skeleton.iter().collect();
    sections.sort_by_key(|(name, _)| name.position.line);

    let mut spec = FlowFile::default();
    let mut diagnostics = Vec::new();
    let mut unparsed_names = Vec::new();
    for (index, (name, keys)) in sections.iter().enumerate() {
        let start = name.position.line as usize;
        let end = sections
            .get(index + 1)
            .map_or(last_line, |(next, _)| next.position.line as usize);
        if !FLOW_FILE_KEYS.contains(&name.value.as_str()) {
            diagnostics.push(
                Diagnostic::error(
                    Code::UnknownKey,
                    Location::new(path, name.position, name.value.chars().count()),
                    format!("unknown key `{}`", name.value),
                )
                .with_hint(
                    did_you_mean(&name.value, FLOW_FILE_KEYS.iter().copied()).unwrap_or_else(
                        || format!("allowed top-level keys: {}", FLOW_FILE_KEYS.join(", ")),
                    ),
                ),
            );
            continue;
        }
        let entries_on_own_lines = keys
            .entries
            .windows(2)
            .all(|pair| pair[0].line < pair[1].line)
            && keys.entries.first().is_some_and(|first| first.line > start);
        let by_entry =
            matches!(name.value.as_str(), "intents" | "services" | "flows") && entries_on_own_lines;
        if !by_entry {
            let slice = padded_slice(text, &line_starts, start, end);
            match from_str_with::<FlowFile>(&slice, options) {
                Ok(section) => merge(&mut spec, section),
                Err(error) => diagnostics.push(yaml_error_diagnostic(path, &error)),
            }
            continue;
        }
        for (entry_index, entry) in keys.entries.iter().enumerate() {
            let entry_start = entry.line;
            let entry_end = keys
                .entries
                .get(entry_index + 1)
                .map_or(end, |next| next.line);
            let slice = padded_slice(text, &line_starts, entry_start, entry_end);
            let outcome = match name.value.as_str() {
                "intents" => parse_entries(&slice, options, &mut spec.intents),
                "services" => parse_entries(&slice, options, &mut spec.services),
                _ => parse_entries(&slice, options, &mut spec.flows),
            };
            if let Err(error) = outcome {
                if matches!(
                    error.without_snippet(),
                    serde_saphyr::Error::UnknownAnchor { .. }
                ) {
                    // The entry uses an anchor defined elsewhere in the file:
                    // it cannot be parsed alone.
                    return None;
                }
                diagnostics.push(yaml_error_diagnostic(path, &error));
                unparsed_names.push(entry.name.clone());
            }
        }
    }
    Some(ParsedFile {
        spec,
        diagnostics,
        unparsed_names,
        complete: false,
    })
}

fn parse_entries<T: DeserializeOwned>(
    slice: &str,
    options: &Options,
    into: &mut IndexMap<Name, T>,
) -> Result<(), serde_saphyr::Error> {
    let entries: IndexMap<Name, T> = from_str_with(slice, options)?;
    into.extend(entries);
    Ok(())
}

fn merge(into: &mut FlowFile, from: FlowFile) {
    into.intents.extend(from.intents);
    into.services.extend(from.services);
    into.flows.extend(from.flows);
    into.redact.extend(from.redact);
    if from.classifier.is_some() {
        into.classifier = from.classifier;
    }
    if from.defaults.is_some() {
        into.defaults = from.defaults;
    }
}

fn line_starts(text: &str) -> Vec<usize> {
    std::iter::once(0)
        .chain(text.match_indices('\n').map(|(index, _)| index + 1))
        .filter(|&start| start < text.len())
        .collect()
}

/// Lines `start..end` (1-based, end exclusive) of `text`, preceded by blank
/// lines so that line numbers in the slice are those of the file.
fn padded_slice(text: &str, line_starts: &[usize], start: usize, end: usize) -> String {
    let from = line_starts
        .get(start.saturating_sub(1))
        .copied()
        .unwrap_or(text.len());
    let to = line_starts
        .get(end.saturating_sub(1))
        .copied()
        .unwrap_or(text.len());
    let mut slice = "\n".repeat(start.saturating_sub(1));
    slice.push_str(&text[from..to.max(from)]);
    slice
}

/// The keys of one top-level section, with their lines; any other value
/// shape gives no keys.
#[derive(Debug, Default)]
struct SectionKeys {
    entries: Vec<EntryKey>,
}

#[derive(Debug)]
struct EntryKey {
    name: String,
    line: usize,
}

impl<'de> Deserialize<'de> for SectionKeys {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeysVisitor;
        impl<'de> Visitor<'de> for KeysVisitor {
            type Value = SectionKeys;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SectionKeys, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<Name>()? {
                    map.next_value::<IgnoredAny>()?;
                    entries.push(EntryKey {
                        name: key.value,
                        line: key.position.line as usize,
                    });
                }
                Ok(SectionKeys { entries })
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<SectionKeys, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(SectionKeys::default())
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<SectionKeys, E> {
                Ok(SectionKeys::default())
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<SectionKeys, E> {
                Ok(SectionKeys::default())
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<SectionKeys, E> {
                Ok(SectionKeys::default())
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<SectionKeys, E> {
                Ok(SectionKeys::default())
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<SectionKeys, E> {
                Ok(SectionKeys::default())
            }
            fn visit_unit<E: de::Error>(self) -> Result<SectionKeys, E> {
                Ok(SectionKeys::default())
            }
        }
        deserializer.deserialize_any(KeysVisitor)
    }
}

/// Hash of the content of every file in the project (flows, schemas, mocks),
/// in path order: two loads of the same files have the same hash.
pub fn content_hash(files: &BTreeMap<PathBuf, Vec<u8>>) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for (path, content) in files {
        hasher.update(path.to_string_lossy().as_bytes());
        hasher.update([0]);
        hasher.update((content.len() as u64).to_le_bytes());
        hasher.update(content);
    }
    let digest = hasher.finalize();
    digest
        .iter()
        .take(8)
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, environment: &[(&str, &str)]) -> ParsedFile {
        let environment = environment
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        parse_flow_file(Path::new("flows/test.yaml"), text, &environment)
    }

    #[test]
    fn variables_are_substituted_with_defaults() {
        let parsed = parse(
            "services:\n  a:\n    url: \"${A_URL}\"\n  b:\n    url: \"${B_URL:-http://b.local}\"\n    timeout: ${B_TIMEOUT:-3s}\n",
            &[("A_URL", "http://a.local")],
        );
        assert!(parsed.diagnostics.is_empty(), "{:?}", parsed.diagnostics);
        let services = &parsed.spec.services;
        assert_eq!(services["a"].url.as_ref().unwrap().value, "http://a.local");
        assert_eq!(services["b"].url.as_ref().unwrap().value, "http://b.local");
        assert_eq!(services["b"].timeout.as_ref().unwrap().value, "3s");
        // Positions are those of the scalar as written.
        assert_eq!(services["a"].url.as_ref().unwrap().position.line, 3);
    }

    #[test]
    fn an_unset_variable_without_default_is_a_warning_at_its_place() {
        let parsed = parse(
            "# ${IN_A_COMMENT}\nservices:\n  a:\n    url: \"x${NOPE}\"\n",
            &[],
        );
        let [warning] = parsed.diagnostics.as_slice() else {
            panic!("{:?}", parsed.diagnostics)
        };
        assert_eq!(warning.code, Code::UnsetEnvVar);
        assert_eq!((warning.location.line, warning.location.column), (4, 12));
        assert_eq!(parsed.spec.services["a"].url.as_ref().unwrap().value, "x");
    }

    #[test]
    fn a_bad_entry_does_not_hide_the_others() {
        let text = "\
intents:
  a:
    keywordz: [x]
  b:
    keywords: [y]
  c:
    descripton: z
flows:
  f:
    intent: b
    steps:
      - reply: hi
";
        let parsed = parse(text, &[]);
        let found: Vec<(u32, Code)> = parsed
            .diagnostics
            .iter()
            .map(|d| (d.location.line, d.code))
            .collect();
        assert_eq!(found, [(3, Code::UnknownKey), (7, Code::UnknownKey)]);
        assert!(parsed.spec.intents.contains_key("b"));
        assert!(parsed.spec.flows.contains_key("f"));
        assert_eq!(parsed.unparsed_names, ["a", "c"]);
        assert!(!parsed.complete);
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let parsed = parse(
            "intents:\n  a:\n    keywords: [x]\n  a:\n    keywords: [y]\n",
            &[],
        );
        assert_eq!(parsed.diagnostics[0].code, Code::DuplicateKey);
        assert_eq!(parsed.diagnostics[0].location.line, 4);
    }

    #[test]
    fn entries_using_anchors_from_elsewhere_fall_back_to_the_whole_file_error() {
        let text = "\
services:
  a: &base
    timeout: 2s
  b:
    <<: *base
    bogus: 1
";
        let parsed = parse(text, &[]);
        assert_eq!(parsed.diagnostics.len(), 1, "{:?}", parsed.diagnostics);
        assert_eq!(parsed.diagnostics[0].code, Code::UnknownKey);
    }

    #[test]
    fn content_hash_changes_with_content() {
        let mut files = BTreeMap::new();
        files.insert(PathBuf::from("flows/a.yaml"), b"a".to_vec());
        let first = content_hash(&files);
        files.insert(PathBuf::from("flows/a.yaml"), b"b".to_vec());
        assert_ne!(first, content_hash(&files));
        assert_eq!(first.len(), 16);
    }
}
