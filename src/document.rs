//! Service answers as documents: JSON parsed into maps that keep the
//! answer's member order and find a member by comparing names (small maps)
//! or by binary search (large ones), never by hashing. The response schema
//! validates a document in place (`Answers` is its representation for
//! `jsonschema`), templates read it through views, and it becomes a
//! `serde_json::Value` only where one is kept: a recorded turn, a logged
//! payload, `to_json`.
//!
//! `serde_json`'s own order-preserving map hashes every name with SipHash
//! as it parses, and a service answer is mostly small objects whose names
//! are never looked up more than once or twice.

use std::borrow::Cow;
use std::cell::Cell;
use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt;

use jsonschema::JsonType;
use jsonschema::json::{self as schema_json, Json, Node, NodeIdentity};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// One JSON value of a service answer.
#[derive(Clone, PartialEq)]
pub enum Document {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
    Array(Vec<Document>),
    Object(Map),
}

/// An object's members in the answer's order. A name given twice keeps
/// its first place and its last value, as `serde_json` reads it.
#[derive(Clone, PartialEq)]
pub struct Map {
    members: Vec<(String, Document)>,
    /// The members' indices ordered by name, for maps over `SCANNED`
    /// members; empty for smaller maps, which are scanned.
    by_name: Box<[usize]>,
}

/// Up to this many members, comparing names one by one costs less than a
/// search that needs an index.
const SCANNED: usize = 16;

impl Map {
    fn new(mut members: Vec<(String, Document)>) -> Map {
        if members.len() <= SCANNED {
            let repeated = members
                .iter()
                .enumerate()
                .any(|(at, (name, _))| members[..at].iter().any(|(before, _)| before == name));
            if repeated {
                members = merge_repeated(members);
            }
            return Map {
                members,
                by_name: Box::default(),
            };
        }
        let mut by_name = sorted_by_name(&members);
        let repeated = by_name.windows(2).any(|pair| match pair {
            [a, b] => members.get(*a).map(|m| &m.0) == members.get(*b).map(|m| &m.0),
            _ => false,
        });
        if repeated {
            members = merge_repeated(members);
            by_name = sorted_by_name(&members);
        }
        Map {
            members,
            by_name: by_name.into_boxed_slice(),
        }
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The member `name`.
    pub fn get(&self, name: &str) -> Option<&Document> {
        if self.by_name.is_empty() {
            return self
                .members
                .iter()
                .find_map(|(member, value)| (member == name).then_some(value));
        }
        let at = self
            .by_name
            .binary_search_by(|&index| {
                self.members
                    .get(index)
                    .map_or(Ordering::Greater, |(member, _)| member.as_str().cmp(name))
            })
            .ok()?;
        let index = *self.by_name.get(at)?;
        self.members.get(index).map(|(_, value)| value)
    }

    /// The members in the answer's order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &Document)> {
        self.members
            .iter()
            .map(|(name, value)| (name.as_str(), value))
    }
}

/// Indices of `members`, ordered by name (a stable sort: equal names stay
/// in the answer's order).
fn sorted_by_name(members: &[(String, Document)]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..members.len()).collect();
    order.sort_by(|a, b| {
        let name = |index: &usize| members.get(*index).map(|(name, _)| name.as_str());
        name(a).cmp(&name(b))
    });
    order
}

/// One member per name: its first place, its last value. Rare (an answer
/// repeating a name), so it may hash.
fn merge_repeated(members: Vec<(String, Document)>) -> Vec<(String, Document)> {
    let mut merged: Vec<(String, Document)> = Vec::with_capacity(members.len());
    let mut place: HashMap<String, usize> = HashMap::with_capacity(members.len());
    for (name, value) in members {
        match place.get(&name).and_then(|&at| merged.get_mut(at)) {
            Some(kept) => kept.1 = value,
            None => {
                place.insert(name.clone(), merged.len());
                merged.push((name, value));
            }
        }
    }
    merged
}

impl Document {
    /// Parses a JSON document (`services::parse_json`; nesting is bounded
    /// by `serde_json`'s limit, 128).
    pub fn parse(bytes: &[u8]) -> Result<Document, String> {
        crate::services::parse_json(bytes)
    }

    /// The document as a `serde_json::Value`, for what keeps one.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Document::Null => serde_json::Value::Null,
            Document::Bool(flag) => serde_json::Value::Bool(*flag),
            Document::Number(number) => serde_json::Value::Number(number.clone()),
            Document::String(text) => serde_json::Value::String(text.clone()),
            Document::Array(items) => {
                serde_json::Value::Array(items.iter().map(Document::to_json).collect())
            }
            Document::Object(map) => serde_json::Value::Object(
                map.iter()
                    .map(|(name, value)| (name.to_owned(), value.to_json()))
                    .collect(),
            ),
        }
    }
}

impl From<&serde_json::Value> for Document {
    fn from(value: &serde_json::Value) -> Document {
        match value {
            serde_json::Value::Null => Document::Null,
            serde_json::Value::Bool(flag) => Document::Bool(*flag),
            serde_json::Value::Number(number) => Document::Number(number.clone()),
            serde_json::Value::String(text) => Document::String(text.clone()),
            serde_json::Value::Array(items) => {
                Document::Array(items.iter().map(Document::from).collect())
            }
            serde_json::Value::Object(map) => Document::Object(Map::new(
                map.iter()
                    .map(|(name, value)| (name.clone(), Document::from(value)))
                    .collect(),
            )),
        }
    }
}

/// As JSON text would show it (the `Debug` of its `serde_json::Value`).
impl fmt::Debug for Document {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.to_json(), f)
    }
}

impl fmt::Debug for Map {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<'de> Deserialize<'de> for Document {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Document, D::Error> {
        deserializer.deserialize_any(DocumentVisitor)
    }
}

struct DocumentVisitor;

impl<'de> Visitor<'de> for DocumentVisitor {
    type Value = Document;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, flag: bool) -> Result<Document, E> {
        Ok(Document::Bool(flag))
    }

    fn visit_i64<E>(self, number: i64) -> Result<Document, E> {
        Ok(Document::Number(number.into()))
    }

    fn visit_u64<E>(self, number: u64) -> Result<Document, E> {
        Ok(Document::Number(number.into()))
    }

    fn visit_f64<E>(self, number: f64) -> Result<Document, E> {
        // JSON text has no NaN or infinity; `serde_json` makes them null.
        Ok(serde_json::Number::from_f64(number).map_or(Document::Null, Document::Number))
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Document, E> {
        Ok(Document::String(text.to_owned()))
    }

    fn visit_string<E>(self, text: String) -> Result<Document, E> {
        Ok(Document::String(text))
    }

    fn visit_none<E>(self) -> Result<Document, E> {
        Ok(Document::Null)
    }

    fn visit_unit<E>(self) -> Result<Document, E> {
        Ok(Document::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Document, D::Error> {
        Document::deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Document, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Document::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Document, A::Error> {
        let mut members = Vec::new();
        while let Some(name) = map.next_key::<String>()? {
            let value = map.next_value()?;
            members.push((name, value));
        }
        Ok(Document::Object(Map::new(members)))
    }
}

/// Documents as `jsonschema` validates them: in place, with no conversion.
pub struct Answers;

impl Json for Answers {
    type Node<'a> = &'a Document;
    type PreparedKey = String;
    type StringBuffer = ();

    // As for `serde_json`'s map: a members pass beats lookups that scan.
    const KEYS_PER_LOOKUP: usize = 2;
    const ACYCLIC: bool = true;

    fn prepare_key(key: &str) -> String {
        key.to_owned()
    }

    fn with_string_node<T>((): &mut (), string: &str, f: impl FnOnce(&Document) -> T) -> T {
        thread_local! {
            // Backs the name nodes of `propertyNames` on this thread, so
            // names allocate only while it grows.
            static NAME: Cell<String> = const { Cell::new(String::new()) };
        }
        let mut name = NAME.take();
        name.clear();
        name.push_str(string);
        let node = Document::String(name);
        let result = f(&node);
        if let Document::String(name) = node {
            NAME.set(name);
        }
        result
    }
}

impl<'a> Node<'a, Answers> for &'a Document {
    type Object = &'a Map;
    type Array = &'a [Document];
    type Number = &'a serde_json::Number;

    fn as_object(&self) -> Option<&'a Map> {
        match self {
            Document::Object(map) => Some(map),
            _ => None,
        }
    }

    fn as_array(&self) -> Option<&'a [Document]> {
        match self {
            Document::Array(items) => Some(items),
            _ => None,
        }
    }

    fn as_string(&self) -> Option<Cow<'a, str>> {
        match self {
            Document::String(text) => Some(Cow::Borrowed(text)),
            _ => None,
        }
    }

    fn as_number(&self) -> Option<&'a serde_json::Number> {
        match self {
            Document::Number(number) => Some(number),
            _ => None,
        }
    }

    fn as_boolean(&self) -> Option<bool> {
        match self {
            Document::Bool(flag) => Some(*flag),
            _ => None,
        }
    }

    fn is_null(&self) -> bool {
        matches!(self, Document::Null)
    }

    fn json_type(&self) -> JsonType {
        match self {
            Document::Null => JsonType::Null,
            Document::Bool(_) => JsonType::Boolean,
            Document::Number(_) => JsonType::Number,
            Document::String(_) => JsonType::String,
            Document::Array(_) => JsonType::Array,
            Document::Object(_) => JsonType::Object,
        }
    }

    fn string_length_within(&self, min: u64, max: u64) -> Option<bool> {
        let Document::String(text) = self else {
            return None;
        };
        // A code point takes one to four bytes, so the count lies in
        // `ceil(bytes / 4)..=bytes`: most bounds are decided without counting.
        let bytes = text.len() as u64;
        let fewest = bytes.div_ceil(4);
        if bytes < min || fewest > max {
            return Some(false);
        }
        if min <= fewest && bytes <= max {
            return Some(true);
        }
        Some((min..=max).contains(&(text.chars().count() as u64)))
    }

    /// `const` and `enum`: scalars compare without building a value.
    fn equals_value(&self, expected: &serde_json::Value) -> bool {
        match (self, expected) {
            (Document::String(text), serde_json::Value::String(other)) => text == other,
            (Document::String(_), _) => false,
            (Document::Bool(flag), serde_json::Value::Bool(other)) => flag == other,
            (Document::Null, serde_json::Value::Null) => true,
            (Document::Null | Document::Bool(_), _) => false,
            _ => schema_json::cmp::equal(&self.to_value(), expected),
        }
    }

    /// Errors, annotations and `uniqueItems` only.
    fn to_value(&self) -> Cow<'a, serde_json::Value> {
        Cow::Owned(self.to_json())
    }

    fn identity(&self) -> Option<NodeIdentity> {
        Some(NodeIdentity::new(
            std::ptr::from_ref::<Document>(self) as usize
        ))
    }
}

impl<'a> schema_json::Object<'a, Answers> for &'a Map {
    type Node = &'a Document;
    type MemberName = &'a str;
    type MembersIter = Members<'a>;

    fn len(&self) -> usize {
        self.members.len()
    }

    fn get(&self, key: &String) -> Option<&'a Document> {
        Map::get(self, key)
    }

    fn members(&self) -> Members<'a> {
        Members(self.members.iter())
    }
}

/// A map's members as `jsonschema` walks them.
pub struct Members<'a>(std::slice::Iter<'a, (String, Document)>);

impl<'a> Iterator for Members<'a> {
    type Item = (&'a str, &'a Document);

    fn next(&mut self) -> Option<Self::Item> {
        self.0.next().map(|(name, value)| (name.as_str(), value))
    }
}

impl<'a> schema_json::Array<'a, Answers> for &'a [Document] {
    type Node = &'a Document;
    type ElementsIter = std::slice::Iter<'a, Document>;

    fn len(&self) -> usize {
        <[Document]>::len(self)
    }

    fn elements(&self) -> std::slice::Iter<'a, Document> {
        self.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Document {
        match Document::parse(text.as_bytes()) {
            Ok(document) => document,
            Err(error) => panic!("{text}: {error}"),
        }
    }

    #[test]
    fn parses_as_serde_json_does_keeping_member_order() {
        let cases = [
            r#"{"b": 1, "a": [true, null, -2, 1.5, 18446744073709551615], "c": {"z": "é\n", "y": {}}}"#,
            r#"[]"#,
            r#""text""#,
            r#"{"k": 1, "k": 2, "j": 3}"#,
            r#"{"a": 1, "b": 2, "a": {"x": [1]}}"#,
            "-0.0",
            "1e400",
        ];
        for text in cases {
            let ours = Document::parse(text.as_bytes()).map(|document| document.to_json());
            let theirs = serde_json::from_str::<serde_json::Value>(text).map_err(|e| e.to_string());
            assert_eq!(ours, theirs, "{text}");
            if let Ok(value) = &theirs {
                // Same order of members, not only the same members.
                assert_eq!(
                    serde_json::to_string(&ours.unwrap_or_default()).ok(),
                    serde_json::to_string(value).ok(),
                    "{text}"
                );
            }
        }
    }

    #[test]
    fn rejects_what_serde_json_rejects() {
        for text in [
            "",
            "{",
            "[1,]",
            "{\"a\" 1}",
            "nul",
            "\"\\ud800\"",
            &"[".repeat(200),
        ] {
            assert!(Document::parse(text.as_bytes()).is_err(), "{text:?}");
            assert!(serde_json::from_str::<serde_json::Value>(text).is_err());
        }
        assert!(Document::parse(b"\"\xff\"").is_err());
    }

    #[test]
    fn finds_members_in_small_and_large_maps_with_repeated_names() {
        for size in [0, 1, 5, SCANNED, SCANNED + 1, 200] {
            // Every fifth name is given again later with another value.
            let mut text = String::from("{");
            for index in 0..size {
                text.push_str(&format!("\"m{index}\": {index},"));
            }
            for index in (0..size).step_by(5) {
                text.push_str(&format!("\"m{index}\": \"again\","));
            }
            text.push_str("\"last\": true}");
            let document = parse(&text);
            let Document::Object(map) = &document else {
                panic!("not an object");
            };
            assert_eq!(map.len(), size + 1);
            for index in 0..size {
                let expected = if index % 5 == 0 {
                    Document::String("again".to_owned())
                } else {
                    Document::Number((index as u64).into())
                };
                assert_eq!(
                    map.get(&format!("m{index}")),
                    Some(&expected),
                    "size {size}"
                );
            }
            assert_eq!(map.get("last"), Some(&Document::Bool(true)));
            for missing in ["", "m", "m-1", "lasT", "zzz", "m1000"] {
                assert_eq!(map.get(missing), None, "size {size}: {missing}");
            }
            // First places kept, in order.
            let names: Vec<&str> = map.iter().map(|(name, _)| name).collect();
            let mut expected: Vec<String> = (0..size).map(|index| format!("m{index}")).collect();
            expected.push("last".to_owned());
            assert_eq!(names, expected);
        }
    }

    #[test]
    fn converts_from_and_to_serde_json() {
        let value = serde_json::json!({"z": [1, 2.5, "x"], "a": {"b": null}});
        assert_eq!(Document::from(&value).to_json(), value);
    }

    #[test]
    fn validates_like_the_serde_json_representation() {
        let schema = serde_json::json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 2, "maxLength": 4},
                "kind": {"enum": ["a", "b", 3, null]},
                "price": {"type": "number", "minimum": 0},
                "count": {"type": "integer"},
                "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": true},
                "nested": {"type": "object", "required": ["id"], "additionalProperties": false, "properties": {"id": {"const": 7}}}
            },
            "required": ["name"],
            "propertyNames": {"pattern": "^[a-z]+$"}
        });
        let ours = jsonschema::options_for::<Answers>().build(&schema);
        let theirs = jsonschema::options().build(&schema);
        let (Ok(ours), Ok(theirs)) = (ours, theirs) else {
            panic!("the schema compiles");
        };
        let instances = [
            r#"{"name": "abc"}"#,
            r#"{"name": "a"}"#,
            r#"{"name": "ééé"}"#,
            r#"{"name": "ééééé"}"#,
            r#"{"kind": "a"}"#,
            r#"{"name": "ab", "kind": "c"}"#,
            r#"{"name": "ab", "kind": 3.0}"#,
            r#"{"name": "ab", "kind": null}"#,
            r#"{"name": "ab", "price": -1}"#,
            r#"{"name": "ab", "price": 2.5, "count": 2}"#,
            r#"{"name": "ab", "count": 2.5}"#,
            r#"{"name": "ab", "tags": ["x", "y"]}"#,
            r#"{"name": "ab", "tags": ["x", "x"]}"#,
            r#"{"name": "ab", "tags": ["x", 1]}"#,
            r#"{"name": "ab", "nested": {"id": 7}}"#,
            r#"{"name": "ab", "nested": {"id": 7.0}}"#,
            r#"{"name": "ab", "nested": {"id": 8}}"#,
            r#"{"name": "ab", "nested": {"id": 7, "other": 1}}"#,
            r#"{"name": "ab", "Upper": 1}"#,
            r#"[1]"#,
        ];
        for text in instances {
            let document = parse(text);
            let value: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
            assert_eq!(ours.is_valid(&document), theirs.is_valid(&value), "{text}");
            let ours: Vec<String> = ours
                .iter_errors(&document)
                .map(|error| format!("{} {error}", error.instance_path()))
                .collect();
            let theirs: Vec<String> = theirs
                .iter_errors(&value)
                .map(|error| format!("{} {error}", error.instance_path()))
                .collect();
            assert_eq!(ours, theirs, "{text}");
        }
    }
}
