//! Serde types that mirror the flow files one-to-one, with source positions.
//!
//! These types describe what the author wrote, nothing more: names are plain
//! strings, durations are unparsed text, optional keys are `Option`s. The
//! `check` module turns them into a `project::CompiledProject`, where every
//! name is resolved and every optional that must be present is proven so.
//!
//! Positions survive because no type here is flattened or untagged (serde
//! buffers those and serde-saphyr then loses the spans); a step is one struct
//! with every possible key, and `check` decides which kind it is.

use std::borrow::Cow;
use std::fmt;
use std::hash::{Hash, Hasher};

use indexmap::IndexMap;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

/// A 1-based line and column in a flow file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize)]
pub struct Position {
    pub line: u32,
    pub column: u32,
}

impl Position {
    pub const UNKNOWN: Position = Position { line: 0, column: 0 };

    pub fn is_known(self) -> bool {
        self.line > 0
    }
}

/// A value together with the position of the YAML node it came from.
///
/// Equality and hashing look at the value only, so spanned names can be map keys.
#[derive(Debug, Clone)]
pub struct Spanned<T> {
    pub value: T,
    pub position: Position,
}

impl<T> Spanned<T> {
    pub fn new(value: T, position: Position) -> Self {
        Spanned { value, position }
    }
}

impl<T: PartialEq> PartialEq for Spanned<T> {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

impl<T: Eq> Eq for Spanned<T> {}

impl<T: Hash> Hash for Spanned<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.value.hash(state);
    }
}

impl std::borrow::Borrow<str> for Spanned<String> {
    fn borrow(&self) -> &str {
        &self.value
    }
}

impl<T: fmt::Display> fmt::Display for Spanned<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.value.fmt(f)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Spanned<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let spanned = serde_saphyr::Spanned::<T>::deserialize(deserializer)?;
        let location = spanned.referenced;
        Ok(Spanned {
            value: spanned.value,
            position: Position {
                line: u32::try_from(location.line()).unwrap_or(u32::MAX),
                column: u32::try_from(location.column()).unwrap_or(u32::MAX),
            },
        })
    }
}

impl<T: JsonSchema> JsonSchema for Spanned<T> {
    fn inline_schema() -> bool {
        T::inline_schema()
    }

    fn schema_name() -> Cow<'static, str> {
        T::schema_name()
    }

    fn schema_id() -> Cow<'static, str> {
        T::schema_id()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        T::json_schema(generator)
    }
}

pub type Name = Spanned<String>;
pub type Text = Spanned<String>;
/// A list of steps, with the position of the list.
pub type Steps = Spanned<Vec<Spanned<Step>>>;

/// One flow file. Every file may hold any of the top-level sections; the
/// project is their union, and a name defined twice is an error.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "mcp-orchestrator flow file")]
pub struct FlowFile {
    /// Intents the classifier can recognise, by name.
    #[serde(default)]
    pub intents: IndexMap<Name, Intent>,
    /// How user text is classified into an intent.
    #[serde(default)]
    pub classifier: Option<Spanned<Classifier>>,
    /// Services the flows call, by name.
    #[serde(default)]
    pub services: IndexMap<Name, Service>,
    /// Flows, by name: which intent triggers each one, and its steps.
    #[serde(default)]
    pub flows: IndexMap<Name, Flow>,
    /// Payload field names that are never written to a log.
    #[serde(default)]
    pub redact: Vec<Name>,
    /// Project-wide defaults.
    #[serde(default)]
    pub defaults: Option<Spanned<Defaults>>,
    /// Who may call: caller keys for `POST /orchestrate` and `/metrics`.
    #[serde(default)]
    pub access: Option<Spanned<Access>>,
    /// Rate limits per user and per caller key, and the cap on turns in
    /// flight.
    #[serde(default)]
    pub limits: Option<Spanned<Limits>>,
    /// Messaging platforms whose webhooks run turns, by name: served at
    /// `POST /channels/{name}`.
    #[serde(default)]
    pub channels: IndexMap<Name, Channel>,
    /// When one deployment serves several tenants: the host names whose
    /// requests reach this project (`Host: brand-a.example.com`).
    #[serde(default)]
    pub hosts: Option<Spanned<Vec<Text>>>,
}

/// The top-level keys of a flow file, in the order the format reference lists them.
pub const FLOW_FILE_KEYS: &[&str] = &[
    "intents",
    "classifier",
    "services",
    "flows",
    "redact",
    "defaults",
    "access",
    "limits",
    "channels",
    "hosts",
];

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Intent {
    /// What the user wants, in a sentence; given to the LLM classifier.
    pub description: Option<Text>,
    /// Example phrasings, as customers would type them: the offline
    /// classifier learns the intent from them (with the keywords), and the
    /// LLM is shown a few. `check` warns below 5.
    #[serde(default)]
    pub examples: Vec<Text>,
    /// Words or phrases that select this intent in the offline classifier.
    /// Matched as whole words, case-insensitively; longer phrases win. One or
    /// two words yield to a model sure of another intent; three or more
    /// always decide.
    #[serde(default)]
    pub keywords: Vec<Text>,
    /// Values taken from the user's text by regular expression.
    #[serde(default)]
    pub entities: IndexMap<Name, Entity>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Entity {
    /// A regular expression (Rust `regex` syntax). The first capture group is
    /// the value when there is one, else the whole match.
    pub pattern: Text,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Classifier {
    /// The LLM classifier, used when an API key is configured.
    pub llm: Option<Spanned<LlmClassifier>>,
    /// Below this confidence the fallback intent is used. Default 0.5.
    pub min_confidence: Option<Spanned<f64>>,
    /// The intent used when nothing else matches.
    pub fallback: Name,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LlmClassifier {
    /// Model name, for example `gpt-4o-mini`.
    pub model: Option<Text>,
    /// Time allowed for one classification, for example `2s`. Default 2s.
    pub timeout: Option<Text>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// `http` (the default): a JSON API. `mcp`: an MCP server (Streamable
    /// HTTP) whose `tool` a call runs, with the call's body as arguments.
    pub kind: Option<Text>,
    /// The tool of a `kind: mcp` service.
    pub tool: Option<Text>,
    /// Base URL. Usually `${SOME_SERVICE_URL:-}`; empty means "not configured",
    /// and the service then runs on its mock outside production.
    pub url: Option<Text>,
    /// HTTP method. Default POST.
    pub method: Option<Spanned<HttpMethod>>,
    /// Extra request headers (values may use `${VAR}`).
    #[serde(default)]
    pub headers: IndexMap<Name, Text>,
    /// Time allowed for one attempt, for example `3s`. Default 5s.
    pub timeout: Option<Text>,
    /// Retries, only for services where repeating a call is safe.
    pub retry: Option<Spanned<Retry>>,
    /// How the response is read and validated.
    pub response: Option<Spanned<ServiceResponse>>,
    /// The answer used in development when no URL is set, with `serve --mock`, and in tests.
    pub mock: Option<Spanned<Mock>>,
    /// Stop calling the service for a while after it failed this many times
    /// in a row. Default: `defaults.circuit_breaker`, else none.
    pub circuit_breaker: Option<Spanned<CircuitBreaker>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreaker {
    /// Consecutive failed calls (a call counts once, whatever its retries)
    /// that open the circuit, 1 to 1000.
    pub failures: Spanned<u32>,
    /// How long an open circuit fails calls at once before one probe call is
    /// let through, for example `30s`.
    pub open_for: Text,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    Get,
    Post,
    Put,
    Patch,
    Delete,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    /// Total attempts including the first, 1 to 10.
    pub attempts: Spanned<u32>,
    /// Delay before the first retry, doubled for each further one, for example `100ms`.
    pub backoff: Option<Text>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceResponse {
    /// `first`: a JSON array answer is replaced by its first element
    /// (webhook platforms answer `[ {...} ]`). Default `none`.
    pub unwrap: Option<Spanned<Unwrap>>,
    /// JSON Schema file under `schemas/` that every answer must match.
    pub schema: Option<Text>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Unwrap {
    None,
    First,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Mock {
    /// A JSON file, relative to the project directory.
    pub file: Option<Text>,
    /// The answer, inline (taken literally; no templates).
    #[schemars(with = "Option<serde_json::Value>")]
    pub response: Option<Spanned<TemplateValue>>,
    /// HTTP status of the mock answer. Default 200.
    pub status: Option<Spanned<u16>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Flow {
    /// What the flow does, for people.
    pub description: Option<Text>,
    /// The intent that triggers this flow.
    pub intent: Option<Name>,
    /// Several intents that trigger this flow.
    pub intents: Option<Spanned<Vec<Name>>>,
    /// Handles a failed call that has no `on_error` of its own.
    pub on_error: Option<Box<Spanned<Step>>>,
    /// Serves the flow as a tool to AI agents at `/mcp`: a tool call runs
    /// the flow directly, with the arguments as `input`.
    pub tool: Option<Spanned<FlowTool>>,
    /// The steps, run in order until one replies.
    pub steps: Steps,
}

/// A flow served as an MCP tool.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FlowTool {
    /// The tool's name: letters, digits, `_`, `-` and `.`, at most 128;
    /// unique in the project.
    pub name: Text,
    /// What the tool does, for the agent choosing among tools.
    pub description: Text,
    /// JSON Schema of the arguments, inline: an object schema whose
    /// properties are the `input` fields the flow reads.
    #[schemars(with = "Option<serde_json::Value>")]
    pub input: Option<Spanned<TemplateValue>>,
    /// Or the same, from a file under `schemas/`.
    pub schema: Option<Text>,
}

/// One step. Exactly one of `call`, `reply`, `set`, `then`, `switch`,
/// `parallel`, `foreach` says what it does; `if` makes it conditional and
/// `else` gives the steps run when the condition is false.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Names the step's result, for later templates (`{{ placed.order_id }}`).
    pub id: Option<Name>,
    /// Condition (a template expression); the step runs only when it is true.
    #[serde(rename = "if")]
    pub condition: Option<Text>,
    /// Steps run instead when `if` is false.
    #[serde(rename = "else")]
    pub otherwise: Option<Steps>,

    /// Call a service by name.
    pub call: Option<Name>,
    /// The request body of a `call`; strings are templates.
    pub body: Option<Spanned<TemplateValue>>,
    /// What to do when this call fails; must end with a reply.
    pub on_error: Option<Box<Spanned<Step>>>,

    /// Reply to the user and end the flow (a text template).
    pub reply: Option<Text>,
    /// The route reported with the reply. Default: the flow's name.
    pub route: Option<Name>,
    /// Structured data returned with the reply; strings are templates.
    pub data: Option<Spanned<TemplateValue>>,
    /// The envelope's `decision`: `reply`, `error`, `handoff` or `end`.
    /// Default `reply` (`error` inside `on_error`).
    #[schemars(with = "Option<Decision>")]
    pub decision: Option<Name>,

    /// Set session variables that later turns can read under `session`.
    pub set: Option<Spanned<IndexMap<Name, Spanned<TemplateValue>>>>,

    /// Run these steps (usually with `if`).
    pub then: Option<Steps>,

    /// Pick steps by the value of an expression.
    pub switch: Option<Text>,
    /// `switch` cases: value → steps.
    pub cases: Option<Spanned<IndexMap<Name, Steps>>>,
    /// `switch` steps when no case matches.
    pub default: Option<Steps>,

    /// Calls made at the same time; each needs an `id`.
    pub parallel: Option<Steps>,

    /// Walk a list (an expression); runs `do` once per element.
    pub foreach: Option<Text>,
    /// Name of the element inside `do`. Default `item`.
    #[serde(rename = "as")]
    pub binding: Option<Name>,
    /// Steps run for each element; with an `id`, the results of each
    /// iteration's steps are collected into a list under that id.
    #[serde(rename = "do")]
    pub each: Option<Steps>,
}

/// The keys a step may have, for hints on unknown keys.
pub const STEP_KEYS: &[&str] = &[
    "id", "if", "else", "call", "body", "on_error", "reply", "route", "data", "decision", "set",
    "then", "switch", "cases", "default", "parallel", "foreach", "as", "do",
];

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    /// Reply used when a call fails and neither the step nor the flow has `on_error`.
    pub error_reply: Option<Text>,
    /// Route reported with that reply. Default: the name of the flow that failed.
    pub error_route: Option<Name>,
    /// The circuit breaker of every service that declares none.
    pub circuit_breaker: Option<Spanned<CircuitBreaker>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Access {
    /// Caller keys. When at least one is declared, `POST /orchestrate`
    /// needs `Authorization: Bearer <key>` (or `x-api-key: <key>`).
    #[serde(default)]
    pub api_keys: Vec<Spanned<ApiKey>>,
    /// A key of its own for `GET /metrics` (Bearer). Without it `/metrics`
    /// is open, like `/health`.
    pub metrics_key: Option<Text>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// Names the caller in logs, metrics and `/health`; the key never shows.
    pub name: Name,
    /// The secret, at least 16 characters; from the environment
    /// (`${WEB_APP_API_KEY}`).
    pub key: Text,
    /// The `channel` values this key may send. Default: any.
    pub channels: Option<Spanned<Vec<Name>>>,
    /// This key opens the console (`/console`). In production the console
    /// is served only when a key says so.
    #[serde(default)]
    pub console: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// A token bucket per `user_id`.
    pub per_user: Option<Spanned<RateLimit>>,
    /// A token bucket per caller key (all anonymous callers share one when
    /// no key is declared).
    pub per_key: Option<Spanned<RateLimit>>,
    /// Turns running at once in the whole process; past it requests are
    /// answered 503 at once. Default 1024.
    pub max_in_flight: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained rate: `N/s`, `N/m` or `N/h`.
    pub rate: Text,
    /// Requests allowed at once after a quiet spell. Default: the `N` of
    /// `rate`.
    pub burst: Option<Spanned<u32>>,
}

/// A messaging platform's webhook. `kind` says which platform, and so which
/// other keys belong: secrets come from the environment (`${VAR}`) and are
/// never logged or shown.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Channel {
    /// `telegram`, `slack`, `whatsapp` (Meta's WhatsApp Cloud API), `twilio`
    /// (SMS and WhatsApp through Twilio) or `webhook` (any JSON webhook).
    pub kind: Name,
    /// telegram: the `secret_token` given to `setWebhook`, sent back in
    /// `X-Telegram-Bot-Api-Secret-Token`.
    pub secret_token: Option<Text>,
    /// telegram, slack: the bot's token, for sending replies.
    pub bot_token: Option<Text>,
    /// slack: the app's signing secret.
    pub signing_secret: Option<Text>,
    /// whatsapp: the token Meta sends back when the webhook is subscribed.
    pub verify_token: Option<Text>,
    /// whatsapp: the app secret that signs every delivery.
    pub app_secret: Option<Text>,
    /// whatsapp: the access token for sending replies.
    pub access_token: Option<Text>,
    /// twilio: the account's auth token, which signs every request.
    pub auth_token: Option<Text>,
    /// twilio: the exact URL configured in Twilio (it is what Twilio signs).
    pub public_url: Option<Text>,
    /// telegram, slack, whatsapp: the platform API's base URL (tests and
    /// proxies point it elsewhere). Default: the platform's.
    pub api_url: Option<Text>,
    /// webhook: how a delivery is verified.
    pub verify: Option<Spanned<WebhookVerify>>,
    /// webhook: a JSON Schema file (under `schemas/`) of the payload; the
    /// request and reply templates' `body.` paths are checked against it,
    /// and a payload that breaks it is refused.
    pub schema: Option<Text>,
    /// webhook: how a payload becomes a turn; strings are templates over
    /// `body` (the payload).
    pub request: Option<Spanned<WebhookRequest>>,
    /// webhook: how the reply goes back, in the response or through a call.
    pub reply: Option<Spanned<WebhookReply>>,
    /// Time allowed for one attempt at sending a reply through the
    /// platform's API, for example `10s`. Default 10s.
    pub timeout: Option<Text>,
    /// Attempts at sending a reply through the platform's API. Default 4
    /// attempts, from 250ms backoff.
    pub retry: Option<Spanned<Retry>>,
}

/// How a `webhook` channel verifies a delivery: one of the two.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookVerify {
    /// An HMAC-SHA256 of the raw body, hex, in a header.
    pub hmac_sha256: Option<Spanned<HmacVerify>>,
    /// A shared secret sent as is in a header.
    pub token: Option<Spanned<TokenVerify>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HmacVerify {
    /// The header carrying the signature, for example `X-Signature`.
    pub header: Name,
    /// The shared secret (`${PARTNER_SECRET}`).
    pub secret: Text,
    /// Text before the hex digest, for example `sha256=`. Default none.
    pub prefix: Option<Text>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenVerify {
    /// The header carrying the token.
    pub header: Name,
    /// The token (`${PARTNER_TOKEN}`).
    pub value: Text,
}

/// A `webhook` payload as a turn: templates over `body`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookRequest {
    /// The user's text. A payload whose text renders empty is acknowledged
    /// and not run.
    pub text: Text,
    /// The sender; the turn's `user_id` is `<channel>:<this>`.
    pub user_id: Text,
    /// The conversation; the turn's `session_id` is `<channel>:<this>`.
    /// Default: the user.
    pub conversation: Option<Text>,
    /// The delivery's id: a delivery seen in the last 24 hours is
    /// acknowledged and not run again.
    pub message_id: Option<Text>,
    /// Runs a turn only when this expression is true (for example
    /// `body.type == 'message'`); other payloads are acknowledged.
    pub when: Option<Text>,
}

/// How a `webhook` channel answers: `response` (synchronous) or `call`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookReply {
    /// The JSON answered to the delivery, once the turn has run; strings
    /// are templates.
    pub response: Option<Spanned<TemplateValue>>,
    /// A declared service that receives the reply: the delivery is
    /// acknowledged at once and the turn runs in the background.
    pub call: Option<Name>,
    /// The body sent to `call`; strings are templates.
    pub body: Option<Spanned<TemplateValue>>,
}

/// Any YAML value whose strings are templates: a call body, reply data, a
/// session variable, an inline mock. Strings keep their positions.
#[derive(Debug, Clone)]
pub enum TemplateValue {
    Null,
    Bool(bool),
    Integer(i64),
    Float(f64),
    String(String),
    List(Vec<Spanned<TemplateValue>>),
    Map(Vec<(Name, Spanned<TemplateValue>)>),
}

impl TemplateValue {
    /// The value as plain JSON, with strings taken literally.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value;
        match self {
            TemplateValue::Null => Value::Null,
            TemplateValue::Bool(b) => Value::Bool(*b),
            TemplateValue::Integer(i) => Value::from(*i),
            TemplateValue::Float(f) => serde_json::Number::from_f64(*f)
                .map(Value::Number)
                .unwrap_or(Value::Null),
            TemplateValue::String(s) => Value::String(s.clone()),
            TemplateValue::List(items) => {
                Value::Array(items.iter().map(|item| item.value.to_json()).collect())
            }
            TemplateValue::Map(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(key, value)| (key.value.clone(), value.value.to_json()))
                    .collect(),
            ),
        }
    }
}

impl<'de> Deserialize<'de> for TemplateValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ValueVisitor;

        impl<'de> Visitor<'de> for ValueVisitor {
            type Value = TemplateValue;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_unit<E: de::Error>(self) -> Result<TemplateValue, E> {
                Ok(TemplateValue::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<TemplateValue, E> {
                Ok(TemplateValue::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<TemplateValue, D::Error> {
                TemplateValue::deserialize(d)
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<TemplateValue, E> {
                Ok(TemplateValue::Bool(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<TemplateValue, E> {
                Ok(TemplateValue::Integer(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<TemplateValue, E> {
                match i64::try_from(v) {
                    Ok(v) => Ok(TemplateValue::Integer(v)),
                    Err(_) => Ok(TemplateValue::Float(v as f64)),
                }
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<TemplateValue, E> {
                Ok(TemplateValue::Float(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<TemplateValue, E> {
                Ok(TemplateValue::String(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<TemplateValue, E> {
                Ok(TemplateValue::String(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TemplateValue, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<Spanned<TemplateValue>>()? {
                    items.push(item);
                }
                Ok(TemplateValue::List(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TemplateValue, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<Name>()? {
                    let value = map.next_value::<Spanned<TemplateValue>>()?;
                    entries.push((key, value));
                }
                Ok(TemplateValue::Map(entries))
            }
        }

        deserializer.deserialize_any(ValueVisitor)
    }
}

/// The envelope's `decision`: what the channel should do with the turn. A
/// closed set, so channels can switch on it; `check` refuses any other value.
/// The spec keeps a step's `decision` as text with its position (for the
/// "did you mean" of `check`); the compiled project holds this enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Say `reply_text`; the conversation goes on (the Python service's only
    /// value).
    Reply,
    /// The turn could not do what was asked (a service failed); `reply_text`
    /// apologises. Default inside `on_error`.
    Error,
    /// Say `reply_text`, then hand the conversation to a person (staff, a
    /// support queue): the flow cannot go further on its own.
    Handoff,
    /// Say `reply_text`; the conversation is over (a voice channel may hang
    /// up, a chat may close).
    End,
}

impl Decision {
    /// Every value, in the order the documentation lists them.
    pub const ALL: [Decision; 4] = [
        Decision::Reply,
        Decision::Error,
        Decision::Handoff,
        Decision::End,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Reply => "reply",
            Decision::Error => "error",
            Decision::Handoff => "handoff",
            Decision::End => "end",
        }
    }

    /// The decision of this name, if it is one.
    pub fn from_name(name: &str) -> Option<Decision> {
        Decision::ALL
            .into_iter()
            .find(|decision| decision.as_str() == name)
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for Decision {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl JsonSchema for Decision {
    fn schema_name() -> Cow<'static, str> {
        "Decision".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        schemars::json_schema!({
            "type": "string",
            "enum": Decision::ALL.map(Decision::as_str),
        })
    }
}

impl JsonSchema for TemplateValue {
    fn schema_name() -> Cow<'static, str> {
        "TemplateValue".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        schemars::json_schema!({
            "description": "Any value; strings are templates. A string that is exactly one `{{ expr }}` keeps the expression's JSON type."
        })
    }
}

/// The JSON Schema of the flow file format, for editors and CI.
pub fn flow_file_json_schema() -> serde_json::Value {
    let generator = schemars::generate::SchemaSettings::draft2020_12().into_generator();
    let schema = generator.into_root_schema_for::<FlowFile>();
    schema.to_value()
}
