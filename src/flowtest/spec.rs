//! Serde types of conversation-test files (`flows/tests/*.yaml`), with
//! source positions, mirroring the YAML one-to-one.

use std::borrow::Cow;
use std::fmt;

use indexmap::IndexMap;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::spec::{Name, Spanned, TemplateValue, Text};

/// One test file: conversation cases, and optionally a golden intent set.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "mcp-orchestrator conversation test file")]
pub struct TestFile {
    /// Conversations, each run on a fresh session.
    #[serde(default)]
    pub cases: Vec<Spanned<Case>>,
    /// `text → intent` pairs for the rule classifier.
    #[serde(default)]
    pub golden: Option<Spanned<GoldenSet>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// Names the case in reports and for `--filter`.
    pub name: Text,
    /// When true, calling a service this case does not stub fails the case
    /// (instead of answering from the service's mock).
    #[serde(default)]
    pub only_stubbed: Option<Spanned<bool>>,
    /// The turns, in order, sharing one session.
    pub turns: Spanned<Vec<Spanned<Turn>>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Turn {
    /// The request body: `text`, and any other request fields. `user_id`
    /// defaults to `test-user`. Or `channel` and `payload` instead.
    pub request: Option<Spanned<TemplateValue>>,
    /// A channel of the project: the turn arrives as that platform's
    /// delivery (`payload`), read as `serve` reads it (not verified).
    pub channel: Option<Name>,
    /// The platform's payload: JSON for every kind but `twilio`, whose
    /// form fields are given as a map.
    #[schemars(with = "Option<serde_json::Value>")]
    pub payload: Option<Spanned<TemplateValue>>,
    /// What the LLM classifier answers; without it the rules classify.
    pub llm: Option<Spanned<LlmStub>>,
    /// Stubbed answers per service; a list gives one answer per attempt
    /// (the last one repeats). Read as plain YAML and decoded into
    /// `ServiceStub`s by `decode_stubs`, so that positions survive.
    #[serde(default)]
    #[schemars(with = "IndexMap<String, OneOrMany<ServiceStub>>")]
    pub services: IndexMap<Name, Spanned<TemplateValue>>,
    /// What must be true after the turn.
    pub expect: Option<Spanned<Expect>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LlmStub {
    /// The intent the LLM answers.
    pub intent: Option<Name>,
    /// Its confidence. Default 0.9.
    pub confidence: Option<Spanned<f64>>,
    /// The LLM fails instead: the rules classify.
    pub error: Option<Spanned<LlmFailure>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LlmFailure {
    Timeout,
    Garbage,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceStub {
    /// The answer body, inline.
    pub response: Option<serde_json::Value>,
    /// The answer body from a JSON file, relative to the project directory.
    pub file: Option<String>,
    /// HTTP status. Default 200.
    pub status: Option<u16>,
    /// The answer comes after this long (on the test clock), e.g. `6s`.
    pub delay: Option<String>,
    /// The call fails instead.
    pub error: Option<StubFailure>,
}

/// The stubs of one service in a turn: one, or a list (one per attempt).
pub fn decode_stubs(value: &TemplateValue) -> Result<Vec<ServiceStub>, String> {
    serde_json::from_value::<OneOrMany<ServiceStub>>(value.to_json())
        .map(|stubs| stubs.0)
        .map_err(|error| error.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StubFailure {
    Timeout,
    ConnectionRefused,
    NotJson,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    pub route: Option<Name>,
    pub intent: Option<Name>,
    pub flow: Option<Name>,
    /// `reply`, `error`, `handoff` or `end`.
    #[schemars(with = "Option<crate::spec::Decision>")]
    pub decision: Option<Name>,
    pub reply: Option<Spanned<ReplyExpectation>>,
    /// The services called, in order; `body` is matched as a subset.
    pub calls: Option<Spanned<Vec<Spanned<CallExpectation>>>>,
    /// Session variables after the turn (matched as a subset).
    #[schemars(with = "Option<serde_json::Value>")]
    pub session: Option<Spanned<TemplateValue>>,
    /// With `channel`: what goes back to the platform.
    pub outbound: Option<Spanned<OutboundExpectation>>,
    /// With `channel`: `true` when the payload is not a user's message
    /// (a status, an edit, a bot's message) and runs nothing.
    pub ignored: Option<Spanned<bool>>,
}

/// What a channel sends back: the API call that carries the reply, or the
/// answer to the delivery (Twilio's TwiML, a webhook's `reply.response`).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OutboundExpectation {
    /// The end of the API URL (`/sendMessage`; the bot token shows as
    /// `<bot_token>`), or for a webhook's `reply.call` the service's name.
    pub to: Option<Text>,
    /// A subset of the JSON sent, or the TwiML document.
    #[schemars(with = "Option<serde_json::Value>")]
    pub body: Option<Spanned<TemplateValue>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CallExpectation {
    pub service: Name,
    /// A subset of the request body.
    #[schemars(with = "Option<serde_json::Value>")]
    pub body: Option<Spanned<TemplateValue>>,
}

/// The reply text: exactly this string, or `{contains: ...}`, or `{matches: regex}`.
#[derive(Debug)]
pub enum ReplyExpectation {
    Exact(String),
    Contains(Vec<String>),
    Matches(String),
}

impl<'de> Deserialize<'de> for ReplyExpectation {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ReplyVisitor;
        impl<'de> Visitor<'de> for ReplyVisitor {
            type Value = ReplyExpectation;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, `{contains: ...}` or `{matches: ...}`")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<ReplyExpectation, E> {
                Ok(ReplyExpectation::Exact(value.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<ReplyExpectation, A::Error> {
                let Some(key) = map.next_key::<String>()? else {
                    return Err(de::Error::custom("expected `contains` or `matches`"));
                };
                let expectation = match key.as_str() {
                    "contains" => {
                        ReplyExpectation::Contains(map.next_value::<OneOrMany<String>>()?.0)
                    }
                    "matches" => ReplyExpectation::Matches(map.next_value()?),
                    other => return Err(de::Error::unknown_field(other, &["contains", "matches"])),
                };
                if let Some(extra) = map.next_key::<String>()? {
                    return Err(de::Error::custom(format!(
                        "`reply` takes one of `contains` or `matches`, not also `{extra}`"
                    )));
                }
                Ok(expectation)
            }
        }
        deserializer.deserialize_any(ReplyVisitor)
    }
}

impl JsonSchema for ReplyExpectation {
    fn schema_name() -> Cow<'static, str> {
        "ReplyExpectation".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        schemars::json_schema!({
            "oneOf": [
                {"type": "string", "description": "The exact reply text."},
                {"type": "object", "additionalProperties": false, "required": ["contains"],
                 "properties": {"contains": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}}},
                {"type": "object", "additionalProperties": false, "required": ["matches"],
                 "properties": {"matches": {"type": "string", "description": "A regular expression."}}}
            ]
        })
    }
}

/// One value or a list of them.
#[derive(Debug)]
pub struct OneOrMany<T>(pub Vec<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ListVisitor<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for ListVisitor<T> {
            type Value = OneOrMany<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a value or a list of values")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany<T>, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(OneOrMany(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<OneOrMany<T>, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(|item| OneOrMany(vec![item]))
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<OneOrMany<T>, E> {
                T::deserialize(de::value::StrDeserializer::<E>::new(value))
                    .map(|item| OneOrMany(vec![item]))
            }
        }
        deserializer.deserialize_any(ListVisitor(std::marker::PhantomData))
    }
}

impl<T: JsonSchema> JsonSchema for OneOrMany<T> {
    fn schema_name() -> Cow<'static, str> {
        format!("OneOrMany_{}", T::schema_name()).into()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let item = generator.subschema_for::<T>();
        schemars::json_schema!({
            "anyOf": [item, {"type": "array", "items": item}]
        })
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GoldenSet {
    /// The least accuracy (0 to 1) the rule classifier must reach.
    pub min_accuracy: Spanned<f64>,
    pub examples: Vec<Spanned<GoldenExample>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GoldenExample {
    pub text: Text,
    pub intent: Name,
}

/// The JSON Schema of the test file format.
pub fn test_file_json_schema() -> serde_json::Value {
    let generator = schemars::generate::SchemaSettings::draft2020_12().into_generator();
    generator.into_root_schema_for::<TestFile>().to_value()
}
