//! One JSON line per event, with the fields of its spans, written to stderr
//! and/or put into the Loki buffer. Formatted once for both.
//!
//! A line is a flat object: `timestamp`, `level`, `target`, the event's
//! fields (`message` among them), then the fields of the spans around it
//! (`trace_id`, `session_id`, `user_id`, `channel` of the request span),
//! innermost first; an event's field wins over a span's of the same name. A
//! `payload` field holding JSON text is written as JSON, not as a string.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

use super::loki::{LOG_TARGET, LokiEntry, LokiSender};

/// Fields whose values also go to Loki as structured metadata.
const METADATA_FIELDS: [&str; 2] = ["trace_id", "session_id"];

/// The field that gives a line its `service_type` label.
const SERVICE_TYPE_FIELD: &str = "service_type";

/// A field holding a JSON payload, written as JSON.
const PAYLOAD_FIELD: &str = "payload";

/// The layer. `stderr`: write each line to stderr; `loki`: put it into the
/// Loki buffer (never waiting).
pub struct JsonLineLayer {
    stderr: bool,
    loki: Option<LokiSender>,
}

impl JsonLineLayer {
    pub fn new(stderr: bool, loki: Option<LokiSender>) -> JsonLineLayer {
        JsonLineLayer { stderr, loki }
    }
}

#[derive(Debug, Clone)]
enum FieldValue {
    Text(String),
    I64(i64),
    U64(u64),
    F64(f64),
    Bool(bool),
}

/// The recorded fields of a span or an event, in order.
#[derive(Debug, Default)]
struct Fields(Vec<(&'static str, FieldValue)>);

impl Fields {
    fn set(&mut self, name: &'static str, value: FieldValue) {
        match self.0.iter_mut().find(|(existing, _)| *existing == name) {
            Some((_, slot)) => *slot = value,
            None => self.0.push((name, value)),
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.0.iter().any(|(existing, _)| *existing == name)
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.set(field.name(), FieldValue::Text(value.to_owned()));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.set(field.name(), FieldValue::I64(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.set(field.name(), FieldValue::U64(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.set(field.name(), FieldValue::F64(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.set(field.name(), FieldValue::Bool(value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.set(field.name(), FieldValue::Text(value.to_string()));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.set(field.name(), FieldValue::Text(format!("{value:?}")));
    }
}

impl<S> tracing_subscriber::Layer<S> for JsonLineLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attributes: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Fields::default();
        attributes.record(&mut fields);
        span.extensions_mut().insert(fields);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        match extensions.get_mut::<Fields>() {
            Some(fields) => values.record(fields),
            None => {
                let mut fields = Fields::default();
                values.record(&mut fields);
                extensions.insert(fields);
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let metadata = event.metadata();
        let loki = self
            .loki
            .as_ref()
            .filter(|_| !metadata.target().starts_with(LOG_TARGET));
        if !self.stderr && loki.is_none() {
            return;
        }
        let now = SystemTime::now();
        let mut line = Line::new(now, metadata, loki.is_some());
        let mut fields = Fields::default();
        event.record(&mut fields);
        for (name, value) in &fields.0 {
            line.field(name, value);
        }
        let mut written_from_spans: Vec<&'static str> = Vec::new();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope {
                let extensions = span.extensions();
                let Some(span_fields) = extensions.get::<Fields>() else {
                    continue;
                };
                for (name, value) in &span_fields.0 {
                    if fields.contains(name) || written_from_spans.contains(name) {
                        continue;
                    }
                    written_from_spans.push(name);
                    line.field(name, value);
                }
            }
        }
        let mut text = line.finish();
        if self.stderr {
            text.push('\n');
            let _ = std::io::stderr().lock().write_all(text.as_bytes());
            text.pop();
        }
        if let Some(loki) = loki {
            loki.push(LokiEntry {
                timestamp_ns: now
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |elapsed| elapsed.as_nanos()),
                level: *metadata.level(),
                service_type: line.service_type,
                line: text,
                metadata: line.metadata,
            });
        }
    }
}

/// A JSON line being written.
struct Line {
    text: String,
    /// Whether the Loki-only parts (label, metadata) are collected.
    for_loki: bool,
    service_type: Option<String>,
    metadata: Vec<(&'static str, String)>,
}

impl Line {
    fn new(now: SystemTime, metadata: &tracing::Metadata<'_>, for_loki: bool) -> Line {
        let mut text = String::with_capacity(256);
        text.push_str("{\"timestamp\":\"");
        text.push_str(&humantime::format_rfc3339_micros(now).to_string());
        text.push_str("\",\"level\":\"");
        text.push_str(metadata.level().as_str());
        text.push_str("\",\"target\":");
        push_json_string(&mut text, metadata.target());
        Line {
            text,
            for_loki,
            service_type: None,
            metadata: Vec::new(),
        }
    }

    fn field(&mut self, name: &'static str, value: &FieldValue) {
        self.text.push(',');
        push_json_string(&mut self.text, name);
        self.text.push(':');
        match value {
            FieldValue::Text(text) => {
                if name == PAYLOAD_FIELD && is_json_container(text) {
                    self.text.push_str(text);
                } else {
                    push_json_string(&mut self.text, text);
                }
                if self.for_loki {
                    if name == SERVICE_TYPE_FIELD && self.service_type.is_none() {
                        self.service_type = Some(text.clone());
                    } else if METADATA_FIELDS.contains(&name) {
                        self.metadata.push((name, text.clone()));
                    }
                }
            }
            FieldValue::I64(number) => self.text.push_str(&number.to_string()),
            FieldValue::U64(number) => self.text.push_str(&number.to_string()),
            FieldValue::F64(number) if number.is_finite() => {
                self.text.push_str(&number.to_string())
            }
            FieldValue::F64(_) => self.text.push_str("null"),
            FieldValue::Bool(value) => self.text.push_str(if *value { "true" } else { "false" }),
        }
    }

    fn finish(&mut self) -> String {
        self.text.push('}');
        std::mem::take(&mut self.text)
    }
}

/// Whether `text` is a JSON object or array (checked by parsing: only
/// payload fields, at debug level, get here).
fn is_json_container(text: &str) -> bool {
    let trimmed = text.trim_start();
    (trimmed.starts_with('{') || trimmed.starts_with('['))
        && serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
}

/// Appends `value` as a JSON string, escaped.
fn push_json_string(out: &mut String, value: &str) {
    out.push('"');
    let mut start = 0;
    for (index, byte) in value.bytes().enumerate() {
        let escape = match byte {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&value[start..index]);
        if escape.is_empty() {
            out.push_str(&format!("\\u{byte:04x}"));
        } else {
            out.push_str(escape);
        }
        start = index + 1;
    }
    out.push_str(&value[start..]);
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_as_json() {
        let mut out = String::new();
        push_json_string(&mut out, "a\"b\\c\nd\u{1}é");
        assert_eq!(out, r#""a\"b\\c\nd\u0001é""#);
        let parsed: String = serde_json::from_str(&out).unwrap();
        assert_eq!(parsed, "a\"b\\c\nd\u{1}é");
    }
}
