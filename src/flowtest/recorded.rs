//! A conversation seen by the console, written as a conversation test: the
//! requests, the stubs of what the services answered, the expectations
//! seen. The file is YAML whose values are written as JSON (YAML's flow
//! style), so any text survives quoting.

use serde_json::Value as Json;

use crate::telemetry::redact::REDACTED;

/// The test file for `traces` (the console's turn traces of one session,
/// oldest first), as one case named `name`.
pub fn test_file(name: &str, session_id: &str, traces: &[Json]) -> String {
    let mut out = String::new();
    out.push_str("# yaml-language-server: $schema=../../docs/test-file.schema.json\n#\n");
    out.push_str(&format!(
        "# Recorded by the console from session {}: the services are stubbed\n",
        json(&Json::String(session_id.to_owned()))
    ));
    out.push_str("# with what they answered, and every expectation is what the turn did.\n");
    if traces.iter().any(is_altered) {
        out.push_str(&format!(
            "# Values under sensitive names were recorded as \"{REDACTED}\", and long texts\n# and lists shortened (as in logs): put test values there.\n"
        ));
    }
    out.push_str("\ncases:\n");
    out.push_str(&format!(
        "  - name: {}\n    turns:\n",
        json(&Json::String(name.to_owned()))
    ));
    for trace in traces {
        // The runner stops a case at a turn that fails; so does the file.
        if trace["error"].is_object() {
            out.push_str(&format!(
                "      # then {} failed ({}): the case ends here\n",
                json(&trace["text"]),
                json(&trace["error"]["code"])
            ));
            break;
        }
        turn(&mut out, trace);
    }
    out
}

/// One turn of the case; a turn the file cannot replay is a comment.
fn turn(out: &mut String, trace: &Json) {
    let text = field_str(trace, "text");
    if field_str(&trace["classification"], "source") == "tool" {
        out.push_str(&format!(
            "      # an MCP tool call ({}) is not replayed here\n",
            json(&trace["flow"])
        ));
        return;
    }
    let mut request = serde_json::Map::new();
    request.insert("text".to_owned(), Json::String(text.to_owned()));
    for key in ["user_id", "channel", "session_id", "tenant"] {
        if !trace[key].is_null() {
            request.insert(key.to_owned(), trace[key].clone());
        }
    }
    if let Json::Object(input) = &trace["input"] {
        for (key, value) in input {
            request.entry(key.clone()).or_insert_with(|| value.clone());
        }
    }
    out.push_str(&format!(
        "      - request: {}\n",
        json(&Json::Object(request))
    ));
    let classification = &trace["classification"];
    if field_str(classification, "source") == "llm" {
        out.push_str(&format!(
            "        llm: {}\n",
            json(&serde_json::json!({
                "intent": classification["intent"],
                "confidence": classification["confidence"],
            }))
        ));
    }
    let calls = trace["calls"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let mut stubbed: Vec<&str> = Vec::new();
    let mut stubs = String::new();
    for call in calls {
        let service = field_str(call, "service");
        // A service called twice in a turn answers both calls with its
        // first answer's stub.
        if stubbed.contains(&service) {
            continue;
        }
        stubbed.push(service);
        stubs.push_str(&format!(
            "          {}: {}\n",
            json(&Json::String(service.to_owned())),
            json(&stub(call))
        ));
    }
    if !stubs.is_empty() {
        out.push_str("        services:\n");
        out.push_str(&stubs);
    }
    out.push_str("        expect:\n");
    for key in ["intent", "flow", "route", "decision"] {
        if !trace[key].is_null() {
            out.push_str(&format!("          {key}: {}\n", json(&trace[key])));
        }
    }
    if !calls.is_empty() {
        out.push_str("          calls:\n");
        for call in calls {
            let mut expected = serde_json::Map::new();
            expected.insert("service".to_owned(), call["service"].clone());
            // A redacted or shortened body cannot be expected as it was
            // sent; the trace id differs in every run.
            if !call["request"].is_null() && !is_altered(&call["request"]) {
                let mut body = call["request"].clone();
                without_value(&mut body, &trace["trace_id"]);
                expected.insert("body".to_owned(), body);
            }
            out.push_str(&format!(
                "            - {}\n",
                json(&Json::Object(expected))
            ));
        }
    }
    if let Some(reply) = trace["reply_text"].as_str() {
        out.push_str(&format!(
            "          reply: {}\n",
            json(&Json::String(reply.to_owned()))
        ));
    }
}

/// The stub that makes a test's call end as the recorded one did.
fn stub(call: &Json) -> Json {
    let error = field_str(&call["error"], "code");
    match error {
        "" => serde_json::json!({ "response": call["response"] }),
        "service_timeout" => serde_json::json!({ "error": "timeout" }),
        "service_unavailable" | "circuit_open" => {
            serde_json::json!({ "error": "connection_refused" })
        }
        "service_bad_response" => serde_json::json!({ "error": "not_json" }),
        "service_http_error" => serde_json::json!({
            "status": call["status"].as_u64().filter(|status| *status >= 400).unwrap_or(500),
            "response": {},
        }),
        // The answer broke the service's response schema; it was not kept,
        // and `null` breaks any object schema the same way.
        _ => serde_json::json!({ "response": null }),
    }
}

/// `value` without the object fields whose value is `unwanted`, at any
/// depth.
fn without_value(value: &mut Json, unwanted: &Json) {
    match value {
        Json::Object(map) => {
            map.retain(|_, field| field != unwanted);
            map.values_mut()
                .for_each(|field| without_value(field, unwanted));
        }
        Json::Array(items) => items
            .iter_mut()
            .for_each(|item| without_value(item, unwanted)),
        _ => {}
    }
}

fn field_str<'a>(value: &'a Json, key: &str) -> &'a str {
    value[key].as_str().unwrap_or_default()
}

/// Whether redaction changed `value` (as `telemetry::redact` marks it): a
/// value replaced, a long text or list shortened, a deep value dropped.
fn is_altered(value: &Json) -> bool {
    match value {
        Json::String(text) => text == REDACTED || text == "[TOO DEEP]" || is_shortened_text(text),
        Json::Array(items) => {
            items
                .last()
                .and_then(Json::as_str)
                .is_some_and(is_more_marker)
                || items.iter().any(is_altered)
        }
        Json::Object(map) => map.values().any(is_altered),
        _ => false,
    }
}

/// `…[N bytes]` at the end of a shortened text.
fn is_shortened_text(text: &str) -> bool {
    text.strip_suffix(" bytes]")
        .and_then(|rest| rest.rsplit_once("…["))
        .is_some_and(|(_, digits)| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
}

/// `[N more]`, the last element of a shortened list.
fn is_more_marker(text: &str) -> bool {
    text.strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(" more]"))
        .is_some_and(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
}

/// JSON text, which YAML reads as the same value: every `$` in a string
/// doubled (test files expand `${VAR}` and `$VAR` in values, and read `$$`
/// as `$`), and the characters YAML refuses in quoted text escaped.
fn json(value: &Json) -> String {
    let text = serde_json::to_string(&escape_dollars(value)).unwrap_or_else(|_| "null".to_owned());
    let mut out = String::with_capacity(text.len());
    for character in text.chars() {
        if matches!(character, '\u{7f}'..='\u{9f}' | '\u{fffe}' | '\u{ffff}') {
            out.push_str(&format!("\\u{:04x}", u32::from(character)));
        } else {
            out.push(character);
        }
    }
    out
}

/// `value` with `$` doubled in its strings (not in its keys, which are not
/// expanded).
fn escape_dollars(value: &Json) -> Json {
    match value {
        Json::String(text) if text.contains('$') => Json::String(text.replace('$', "$$")),
        Json::Array(items) => Json::Array(items.iter().map(escape_dollars).collect()),
        Json::Object(map) => Json::Object(
            map.iter()
                .map(|(key, value)| (key.clone(), escape_dollars(value)))
                .collect(),
        ),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_call_is_stubbed_to_fail_the_same_way() {
        let call = serde_json::json!({"service": "menu", "error": {"code": "service_timeout"}});
        assert_eq!(stub(&call), serde_json::json!({"error": "timeout"}));
        let call = serde_json::json!({"service": "menu", "status": 503, "error": {"code": "service_http_error"}});
        assert_eq!(
            stub(&call),
            serde_json::json!({"status": 503, "response": {}})
        );
    }

    #[test]
    fn a_redacted_body_is_not_expected() {
        let trace = serde_json::json!({
            "text": "hi", "user_id": "u", "channel": "web", "session_id": "u:web",
            "input": {}, "classification": {"source": "rules"},
            "intent": "greet", "flow": "greet", "route": "greet", "decision": "reply",
            "reply_text": "Hello\n\"you\"",
            "calls": [{"service": "profile", "request": {"token": REDACTED}, "response": {"name": "A"}}],
        });
        let text = test_file("greeting", "u:web", &[trace]);
        assert!(text.contains("- {\"service\":\"profile\"}\n"), "{text}");
        assert!(text.contains("reply: \"Hello\\n\\\"you\\\"\""), "{text}");
        assert!(text.contains("put test values there"), "{text}");
    }

    #[test]
    fn shortened_values_are_recognised() {
        assert!(is_altered(&Json::String(format!(
            "{}…[2000 bytes]",
            "a".repeat(10)
        ))));
        assert!(is_altered(&serde_json::json!([1, 2, "[12 more]"])));
        assert!(!is_altered(&serde_json::json!([
            "[more]",
            "price …[x bytes]"
        ])));
    }

    #[test]
    fn dollars_and_unprintable_characters_survive_yaml() {
        let value = serde_json::json!({"$schema": "costs $5 or ${HOME}", "c": "a\u{85}b\u{7f}"});
        assert_eq!(
            json(&value),
            r#"{"$schema":"costs $$5 or $${HOME}","c":"a\u0085b\u007f"}"#
        );
    }
}
