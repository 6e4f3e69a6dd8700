//! Redaction of payloads before they are logged.
//!
//! Which names are sensitive is decided when the project is compiled: the
//! project's `redact:` list plus every schema property marked
//! `x-sensitive: true` (`CompiledProject::redact`). At run time a payload is
//! walked once and every value under such a name is replaced, at any depth.
//! A few credential names are always redacted, whatever the project says.
//! Long strings and lists are shortened, so a logged payload stays small.

use std::collections::BTreeSet;

use serde_json::Value as Json;

/// What a redacted value is replaced with.
pub const REDACTED: &str = "[REDACTED]";

/// Field names redacted in every project (compared without case): they name
/// credentials.
pub const ALWAYS_REDACTED: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "password",
    "passwd",
    "secret",
    "client_secret",
    "token",
    "access_token",
    "refresh_token",
    "id_token",
    "api_key",
    "apikey",
    "x-api-key",
];

/// Longest string kept whole in a logged payload, in bytes.
pub const MAX_LOGGED_STRING: usize = 1024;
/// Most elements of a list kept in a logged payload.
pub const MAX_LOGGED_ITEMS: usize = 50;
/// Deeper values are replaced by a marker.
pub const MAX_LOGGED_DEPTH: usize = 16;

/// A copy of `value` fit for a log line: every value under a name in `names`
/// (or in `ALWAYS_REDACTED`) replaced by `REDACTED`, long strings and lists
/// shortened.
pub fn redact(value: &Json, names: &BTreeSet<String>) -> Json {
    redact_at(value, names, 0)
}

/// `redact`, serialized: the text of a `payload` field.
pub fn redacted_text(value: &Json, names: &BTreeSet<String>) -> String {
    redact(value, names).to_string()
}

/// Whether a field of this name is never logged.
pub fn is_sensitive(name: &str, names: &BTreeSet<String>) -> bool {
    names.contains(name)
        || ALWAYS_REDACTED
            .iter()
            .any(|always| always.eq_ignore_ascii_case(name))
}

fn redact_at(value: &Json, names: &BTreeSet<String>, depth: usize) -> Json {
    if depth >= MAX_LOGGED_DEPTH {
        return Json::String("[TOO DEEP]".to_owned());
    }
    match value {
        Json::Object(object) => Json::Object(
            object
                .iter()
                .map(|(key, value)| {
                    let value = if is_sensitive(key, names) {
                        Json::String(REDACTED.to_owned())
                    } else {
                        redact_at(value, names, depth + 1)
                    };
                    (key.clone(), value)
                })
                .collect(),
        ),
        Json::Array(items) => {
            let mut kept: Vec<Json> = items
                .iter()
                .take(MAX_LOGGED_ITEMS)
                .map(|item| redact_at(item, names, depth + 1))
                .collect();
            if items.len() > MAX_LOGGED_ITEMS {
                kept.push(Json::String(format!(
                    "[{} more]",
                    items.len() - MAX_LOGGED_ITEMS
                )));
            }
            Json::Array(kept)
        }
        Json::String(text) if text.len() > MAX_LOGGED_STRING => {
            let mut end = MAX_LOGGED_STRING;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            Json::String(format!("{}…[{} bytes]", &text[..end], text.len()))
        }
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn names(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|name| (*name).to_owned()).collect()
    }

    #[test]
    fn names_are_redacted_at_any_depth() {
        let value = json!({
            "user_id": "u-1",
            "payment_method": "card",
            "items": [{"name": "pizza", "phone": "555"}],
            "nested": {"deeper": {"email": "a@b.c"}}
        });
        let redacted = redact(&value, &names(&["payment_method", "phone", "email"]));
        assert_eq!(
            redacted,
            json!({
                "user_id": "u-1",
                "payment_method": REDACTED,
                "items": [{"name": "pizza", "phone": REDACTED}],
                "nested": {"deeper": {"email": REDACTED}}
            })
        );
    }

    #[test]
    fn credential_names_are_always_redacted_whatever_their_case() {
        let value = json!({"Authorization": "Bearer x", "API_KEY": "k", "note": "token"});
        let redacted = redact(&value, &BTreeSet::new());
        assert_eq!(
            redacted,
            json!({"Authorization": REDACTED, "API_KEY": REDACTED, "note": "token"})
        );
    }

    #[test]
    fn long_strings_and_lists_are_shortened() {
        let long = "é".repeat(MAX_LOGGED_STRING);
        let value = json!({"text": long, "list": (0..100).collect::<Vec<_>>()});
        let redacted = redact(&value, &BTreeSet::new());
        assert!(redacted["text"].as_str().unwrap().len() < MAX_LOGGED_STRING + 32);
        assert_eq!(
            redacted["list"].as_array().unwrap().len(),
            MAX_LOGGED_ITEMS + 1
        );
    }
}
