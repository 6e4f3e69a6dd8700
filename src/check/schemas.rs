//! JSON Schema files: read and compiled once per check, paths checked
//! against them, and the properties they mark sensitive.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use jsonschema::Validator;
use serde_json::Value as Json;

use crate::diagnostic::{Code, Diagnostic, Location, did_you_mean};
use crate::document::Answers;
use crate::load::SCHEMAS_DIR;
use crate::spec::{self, Position};

use super::{Checker, REQUEST_SCHEMA_FILE, stays_inside};

/// A JSON Schema file, read and compiled once per check.
pub(super) struct SchemaFile {
    pub(super) json: Arc<Json>,
    pub(super) validator: Arc<Validator>,
}

impl Checker<'_> {
    /// Reads and compiles a schema file under `schemas/`, once per check.
    pub(super) fn schema_file(
        &mut self,
        file: &Path,
        name: &spec::Text,
    ) -> Option<Arc<SchemaFile>> {
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

    /// `schema` compiled for service answers as parsed
    /// (`document::Answers`): the same keywords, another representation.
    pub(super) fn answers_validator(
        &mut self,
        file_name: &str,
        schema: &SchemaFile,
    ) -> Option<Arc<Validator<Answers>>> {
        match jsonschema::options_for::<Answers>().build(&schema.json) {
            Ok(validator) => Some(Arc::new(validator)),
            Err(error) => {
                self.push(Diagnostic::error(
                    Code::SchemaInvalid,
                    Location::file(Path::new(SCHEMAS_DIR).join(file_name)),
                    format!("schema `{file_name}` cannot be compiled: {error}"),
                ));
                None
            }
        }
    }

    pub(super) fn request_schema(&mut self) -> Option<Arc<Validator>> {
        let relative = Path::new(SCHEMAS_DIR).join(REQUEST_SCHEMA_FILE);
        if !self.dir.join(&relative).is_file() {
            return None;
        }
        self.load_schema(REQUEST_SCHEMA_FILE, Location::file(&relative))
            .map(|schema| schema.validator.clone())
    }
}

/// " at `/a/b`" for a JSON pointer, nothing for the document root.
pub(super) fn at_pointer(pointer: &str) -> String {
    if pointer.is_empty() {
        String::new()
    } else {
        format!(" at `{pointer}`")
    }
}

/// Why a path does not exist in a schema.
pub(super) struct PathFailure {
    /// Index of the first segment that is not declared.
    pub(super) segment: usize,
    /// The property names declared where it was looked up.
    pub(super) candidates: Vec<String>,
}

const MAX_SCHEMA_DEPTH: usize = 32;

/// Follows `segments` through `node` (part of `root`): `properties`,
/// `items` for numeric segments, `anyOf` / `oneOf` / `allOf`, local `$ref`.
/// A node that declares no properties at all accepts any path.
pub(super) fn schema_path(
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
pub(super) fn collect_sensitive(node: &Json, out: &mut BTreeSet<String>, depth: usize) {
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
