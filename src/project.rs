//! The compiled project: the immutable model the engine runs.
//!
//! Built only by `check::compile`. Every name is resolved to an index,
//! every template and schema is compiled, every default is filled in. The
//! engine never sees an unresolved name or re-validates configuration.

use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use jsonschema::Validator;
use jsonschema::json::{Json, SerdeJson};
use regex::Regex;

use crate::document::Answers;
pub use crate::spec::{Decision, HttpMethod};
use crate::template::{ExpressionId, TemplateId, Templates, ValueTemplate};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IntentId(pub u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceId(pub u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId(pub u32);

#[derive(Debug)]
pub struct CompiledProject {
    /// The project directory it was loaded from.
    pub dir: PathBuf,
    pub intents: Vec<Intent>,
    pub classifier: Classifier,
    pub services: Vec<Service>,
    pub flows: Vec<Flow>,
    /// The flow each intent runs, indexed by `IntentId`; intents without a
    /// flow of their own run the fallback intent's flow.
    pub flow_for_intent: Vec<FlowId>,
    /// Payload field names never written to a log: the project's `redact`
    /// list plus every response-schema property marked `x-sensitive: true`.
    pub redact: BTreeSet<String>,
    pub defaults: Defaults,
    pub templates: Templates,
    /// `schemas/orchestrate_request.schema.json`, when the project has one.
    pub request_schema: Option<Arc<Validator>>,
    /// Hash of every file the project was built from.
    pub content_hash: String,
    /// Every file the project was built from, relative to `dir`.
    pub source_files: Vec<PathBuf>,
    /// Where each step was written, by `Step::index`.
    pub steps: Vec<StepSource>,
    /// Every route a reply can report.
    pub routes: BTreeSet<String>,
    /// Who may call (`access:`).
    pub access: Access,
    /// Rate limits and the in-flight cap (`limits:`).
    pub limits: Limits,
    /// Messaging platforms' webhooks (`channels:`), in file order.
    pub channels: Vec<Channel>,
    /// Host names that reach this project when a deployment serves several
    /// tenants: lower-case, without a port.
    pub hosts: Vec<String>,
}

impl CompiledProject {
    pub fn intent(&self, id: IntentId) -> &Intent {
        &self.intents[id.0 as usize]
    }

    pub fn service(&self, id: ServiceId) -> &Service {
        &self.services[id.0 as usize]
    }

    pub fn channel(&self, name: &str) -> Option<&Channel> {
        self.channels.iter().find(|channel| channel.name == name)
    }

    pub fn flow(&self, id: FlowId) -> &Flow {
        &self.flows[id.0 as usize]
    }

    pub fn flow_for(&self, intent: IntentId) -> &Flow {
        self.flow(self.flow_for_intent[intent.0 as usize])
    }

    /// The flow served as the MCP tool `name`.
    pub fn tool(&self, name: &str) -> Option<(FlowId, &FlowTool)> {
        self.flows.iter().enumerate().find_map(|(index, flow)| {
            flow.tool
                .as_ref()
                .filter(|tool| tool.name == name)
                .map(|tool| (FlowId(index as u32), tool))
        })
    }

    /// Every flow served as a tool, in file order.
    pub fn tools(&self) -> impl Iterator<Item = &FlowTool> {
        self.flows.iter().filter_map(|flow| flow.tool.as_ref())
    }

    pub fn intent_by_name(&self, name: &str) -> Option<IntentId> {
        self.intents
            .iter()
            .position(|intent| intent.name == name)
            .map(|index| IntentId(index as u32))
    }
}

#[derive(Debug)]
pub struct Intent {
    pub name: String,
    pub description: String,
    pub examples: Vec<String>,
    /// Lower-cased, with runs of whitespace collapsed.
    pub keywords: Vec<String>,
    pub entities: Vec<Entity>,
}

#[derive(Debug)]
pub struct Entity {
    pub name: String,
    pub pattern: Regex,
}

#[derive(Debug)]
pub struct Classifier {
    pub llm: LlmSettings,
    pub min_confidence: f64,
    pub fallback: IntentId,
    /// Every intent's keywords, for the rule classifier.
    pub keywords: KeywordIndex,
    /// Learned from every intent's examples and keywords: what the rules
    /// use when no keyword matches.
    pub model: crate::intent::model::IntentModel,
}

#[derive(Debug)]
pub struct LlmSettings {
    pub model: String,
    pub timeout: Duration,
    /// The system prompt: every intent with its description and a few of
    /// its examples (`intent::llm_examples`).
    pub prompt: String,
    /// Structured-output schema: `intent` is an enum of the declared names.
    pub answer_schema: serde_json::Value,
}

pub const DEFAULT_LLM_MODEL: &str = "gpt-4o-mini";
pub const DEFAULT_LLM_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_MIN_CONFIDENCE: f64 = 0.5;
pub const DEFAULT_SERVICE_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(100);
pub const MAX_RETRY_ATTEMPTS: u32 = 10;

pub struct Service {
    pub name: String,
    /// The tenant whose project declares it, when the process serves
    /// several: a label of its metrics.
    pub tenant: Option<Arc<str>>,
    /// `None` when the URL is empty: the service runs on its mock (outside
    /// production).
    pub url: Option<url::Url>,
    /// The environment variable the URL comes from, for messages such as
    /// "MENU_SERVICE_URL is not set".
    pub url_variable: Option<String>,
    pub method: HttpMethod,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    pub retry: Option<RetryPolicy>,
    pub unwrap_first: bool,
    pub response_schema: Option<ResponseSchema>,
    pub mock: Option<Mock>,
    /// The service's own, else the project's default, else none.
    pub circuit_breaker: Option<CircuitBreakerPolicy>,
    /// `kind: mcp`: the MCP tool a call runs (the body is its arguments).
    pub mcp_tool: Option<String>,
    /// The handles of its call metrics, taken at its first call.
    pub call_metrics: std::sync::OnceLock<CallMetrics>,
}

/// What a service's successful calls count and time themselves with (a
/// failed call registers its outcome's counter, rarer, each time).
#[derive(Debug, Clone)]
pub struct CallMetrics {
    pub ok: metrics::Counter,
    pub duration: metrics::Histogram,
}

/// When a service's circuit opens, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitBreakerPolicy {
    /// Consecutive failed calls that open the circuit.
    pub failures: u32,
    /// How long an open circuit fails calls before a probe goes through.
    pub open_for: Duration,
}

impl fmt::Debug for Service {
    // Header values may hold secrets: only their names are shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Service")
            .field("name", &self.name)
            .field("url", &self.url.as_ref().map(url::Url::as_str))
            .field("method", &self.method)
            .field(
                "headers",
                &self
                    .headers
                    .iter()
                    .map(|(name, _)| name)
                    .collect::<Vec<_>>(),
            )
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .field("unwrap_first", &self.unwrap_first)
            .field("response_schema", &self.response_schema)
            .field("mock", &self.mock.is_some())
            .finish()
    }
}

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Total attempts, including the first; at least 2.
    pub attempts: u32,
    pub backoff: Duration,
}

/// A schema file compiled for what it checks: service answers as parsed
/// (`document::Answers`, the default) or, for a webhook's payload,
/// `serde_json` values.
pub struct ResponseSchema<F: Json = Answers> {
    /// File name under `schemas/`.
    pub file: String,
    pub validator: Arc<Validator<F>>,
}

impl<F: Json> fmt::Debug for ResponseSchema<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseSchema")
            .field("file", &self.file)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct Mock {
    pub status: u16,
    pub body: serde_json::Value,
}

#[derive(Debug)]
pub struct Flow {
    pub name: String,
    pub steps: Vec<Step>,
    /// Runs when a call without its own `on_error` fails; ends with a reply.
    pub on_error: Option<Vec<Step>>,
    /// Served as an MCP tool at `/mcp`.
    pub tool: Option<FlowTool>,
}

/// A flow served as an MCP tool.
#[derive(Debug)]
pub struct FlowTool {
    /// Unique in the project.
    pub name: String,
    pub description: String,
    /// The arguments' JSON Schema (an object schema), MCP's `inputSchema`.
    pub input_schema: Arc<serde_json::Value>,
    pub validator: Arc<Validator>,
    /// The intent a tool call reports (`intent.name`): the flow's first.
    /// `None` for a flow only agents run.
    pub intent: Option<IntentId>,
    /// The entities of the flow's intents: a tool call's argument of the
    /// same name fills `intent.entities.<name>`.
    pub entities: Vec<String>,
}

/// Where a step was written, for coverage and error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepSource {
    pub file: PathBuf,
    pub line: u32,
    pub column: u32,
}

#[derive(Debug)]
pub struct Step {
    /// Position in `CompiledProject::steps`, for traces and coverage.
    pub index: u32,
    pub id: Option<String>,
    pub condition: Option<ExpressionId>,
    /// Steps run when `condition` is false.
    pub otherwise: Vec<Step>,
    pub action: Action,
    pub source: StepSource,
}

#[derive(Debug)]
pub enum Action {
    Call(Call),
    Reply(Reply),
    Set(Vec<(String, ValueTemplate)>),
    Then(Vec<Step>),
    Switch(Switch),
    /// Calls run at the same time; each has an id.
    Parallel(Vec<Step>),
    Foreach(Foreach),
}

#[derive(Debug)]
pub struct Call {
    pub service: ServiceId,
    pub body: Option<ValueTemplate>,
    /// Ends with a reply.
    pub on_error: Option<Vec<Step>>,
}

#[derive(Debug)]
pub struct Reply {
    pub text: TemplateId,
    pub route: String,
    pub data: Option<ValueTemplate>,
    pub decision: Decision,
}

#[derive(Debug)]
pub struct Switch {
    pub value: ExpressionId,
    pub cases: Vec<(String, Vec<Step>)>,
    pub default: Vec<Step>,
}

#[derive(Debug)]
pub struct Foreach {
    pub list: ExpressionId,
    pub binding: String,
    pub steps: Vec<Step>,
}

#[derive(Debug)]
pub struct Defaults {
    pub error_reply: TemplateId,
    /// `None`: the failed flow's name is the route.
    pub error_route: Option<String>,
}

pub const DEFAULT_ERROR_REPLY: &str =
    "Sorry, something went wrong on our side. Please try again in a moment.";

/// Every intent's keywords in one automaton, so a text is scanned once
/// whatever the number of keywords.
#[derive(Debug, Clone)]
pub struct KeywordIndex {
    /// Patterns are ` keyword ` (spaces included), matched against
    /// `normalize`d text, which puts a space around every word.
    automaton: aho_corasick::AhoCorasick,
    /// Per pattern: its intent and its score.
    patterns: Vec<(IntentId, Score)>,
}

impl KeywordIndex {
    /// Indexes the keywords of `intents` (already normalized by `check`).
    pub fn new(intents: &[Intent]) -> Result<KeywordIndex, String> {
        let mut seen = std::collections::HashSet::new();
        let mut texts = Vec::new();
        let mut patterns = Vec::new();
        for (index, intent) in intents.iter().enumerate() {
            for keyword in &intent.keywords {
                // A repeated keyword cannot win over its first occurrence.
                if !seen.insert(keyword.as_str()) {
                    continue;
                }
                texts.push(format!(" {keyword} "));
                patterns.push((
                    IntentId(index as u32),
                    Score {
                        words: keyword.split(' ').count(),
                        characters: keyword.len(),
                    },
                ));
            }
        }
        let automaton = aho_corasick::AhoCorasick::builder()
            .match_kind(aho_corasick::MatchKind::Standard)
            .build(&texts)
            .map_err(|error| format!("the intents' keywords cannot be indexed: {error}"))?;
        Ok(KeywordIndex {
            automaton,
            patterns,
        })
    }

    /// The intent of the most specific keyword in `normalized` text (more
    /// words, then more characters; on a tie, the one declared first) and
    /// that keyword's word count.
    pub fn best_match(&self, normalized: &str) -> Option<(IntentId, usize)> {
        let mut best: Option<(Score, usize)> = None;
        for found in self.automaton.find_overlapping_iter(normalized) {
            let pattern = found.pattern().as_usize();
            let Some((_, score)) = self.patterns.get(pattern) else {
                continue;
            };
            let better = match best {
                None => true,
                Some((best_score, best_pattern)) => {
                    *score > best_score || (*score == best_score && pattern < best_pattern)
                }
            };
            if better {
                best = Some((*score, pattern));
            }
        }
        let (score, pattern) = best?;
        self.patterns
            .get(pattern)
            .map(|(intent, _)| (*intent, score.words))
    }
}

/// The score of a keyword match: more words beat fewer, then longer text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Score {
    words: usize,
    characters: usize,
}

/// Who may call, compiled from `access:`.
#[derive(Debug, Default)]
pub struct Access {
    /// Caller keys with a value. When there is at least one,
    /// `POST /orchestrate` needs one of them.
    pub keys: Vec<CallerKey>,
    /// Keys declared with an empty value (their variable unset): left out
    /// in development, a start-up error in production.
    pub unset_keys: Vec<UnsetCallerKey>,
    /// The key of `GET /metrics`, when it has one.
    pub metrics_key: Option<SecretDigest>,
}

impl Access {
    /// The caller key `presented` is, if any. Every declared key is
    /// compared, in constant time over digests of equal length, so neither
    /// the time taken nor the key's length tells how close a guess was.
    pub fn authenticate(&self, presented: &str) -> Option<&CallerKey> {
        let digest = SecretDigest::of(presented);
        let mut found = None;
        for key in &self.keys {
            if key.digest.matches(&digest) && found.is_none() {
                found = Some(key);
            }
        }
        found
    }
}

/// A caller key: its name, shown everywhere, and its secret, shown nowhere.
#[derive(Debug)]
pub struct CallerKey {
    /// Shared with the request metrics' labels.
    pub name: Arc<str>,
    pub digest: SecretDigest,
    /// The `channel` values it may send; `None`: any.
    pub channels: Option<Vec<String>>,
    /// It opens the console.
    pub console: bool,
}

impl CallerKey {
    pub fn allows_channel(&self, channel: &str) -> bool {
        self.channels
            .as_ref()
            .is_none_or(|channels| channels.iter().any(|allowed| allowed == channel))
    }
}

/// A caller key declared without a value.
#[derive(Debug, Clone)]
pub struct UnsetCallerKey {
    pub name: String,
    /// The environment variable its value comes from, when known.
    pub variable: Option<String>,
}

/// The SHA-256 digest of a secret. The secret itself is not kept; `Debug`
/// shows nothing of the digest either.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretDigest([u8; 32]);

impl SecretDigest {
    pub fn of(secret: &str) -> SecretDigest {
        use sha2::Digest;
        SecretDigest(sha2::Sha256::digest(secret.as_bytes()).into())
    }

    /// The digest in hexadecimal (for keys, never shown).
    pub fn hex(&self) -> String {
        self.0.iter().map(|byte| format!("{byte:02x}")).collect()
    }

    /// Compares in constant time.
    pub fn matches(&self, other: &SecretDigest) -> bool {
        use subtle::ConstantTimeEq;
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for SecretDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretDigest([hidden])")
    }
}

/// Rate limits and the in-flight cap, compiled from `limits:`. Compared
/// with the previous project's on reload: unchanged limits keep their
/// buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub per_user: Option<Rate>,
    pub per_key: Option<Rate>,
    /// Turns running at once in the process.
    pub max_in_flight: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            per_user: None,
            per_key: None,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        }
    }
}

pub const DEFAULT_MAX_IN_FLIGHT: u32 = 1024;

/// A token bucket: `count` requests per `period` sustained, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub period: Duration,
    pub burst: u32,
}

impl Rate {
    /// The time one token takes to come back.
    pub fn replenish_interval(&self) -> Duration {
        self.period / self.count.max(1)
    }
}

/// A secret that must be used as is (an HMAC key, a token sent to a
/// platform or to Loki). `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([hidden])")
    }
}

/// A messaging platform's webhook, compiled from `channels:`.
#[derive(Debug)]
pub struct Channel {
    pub name: String,
    pub kind: ChannelKind,
    /// Secrets declared with an empty value (their variable unset): the
    /// channel is disabled in development and refused in production.
    pub unset: Vec<UnsetSecret>,
    /// How replies go out through the platform's API (telegram, slack,
    /// whatsapp): a service call with its timeout and retries. `None` for
    /// the kinds that answer in the response.
    pub delivery: Option<Service>,
}

impl Channel {
    /// Whether every secret is set.
    pub fn enabled(&self) -> bool {
        self.unset.is_empty()
    }

    /// Whether the reply goes out after the delivery was acknowledged (the
    /// turn runs in the background).
    pub fn replies_later(&self) -> bool {
        match &self.kind {
            ChannelKind::Telegram(_) | ChannelKind::Slack(_) | ChannelKind::WhatsApp(_) => true,
            ChannelKind::Twilio(_) => false,
            ChannelKind::Webhook(webhook) => matches!(webhook.reply, WebhookReply::Call { .. }),
        }
    }
}

/// A channel secret declared without a value.
#[derive(Debug, Clone)]
pub struct UnsetSecret {
    /// The key, for example `bot_token`.
    pub key: &'static str,
    /// The environment variable its value comes from, when known.
    pub variable: Option<String>,
}

#[derive(Debug)]
pub enum ChannelKind {
    Telegram(TelegramChannel),
    Slack(SlackChannel),
    WhatsApp(WhatsAppChannel),
    Twilio(TwilioChannel),
    Webhook(WebhookChannel),
}

impl ChannelKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            ChannelKind::Telegram(_) => "telegram",
            ChannelKind::Slack(_) => "slack",
            ChannelKind::WhatsApp(_) => "whatsapp",
            ChannelKind::Twilio(_) => "twilio",
            ChannelKind::Webhook(_) => "webhook",
        }
    }
}

#[derive(Debug)]
pub struct TelegramChannel {
    pub secret_token: SecretDigest,
    pub bot_token: Secret,
    pub api_url: url::Url,
}

#[derive(Debug)]
pub struct SlackChannel {
    pub signing_secret: Secret,
    pub bot_token: Secret,
    pub api_url: url::Url,
}

#[derive(Debug)]
pub struct WhatsAppChannel {
    pub verify_token: SecretDigest,
    pub app_secret: Secret,
    pub access_token: Secret,
    pub api_url: url::Url,
}

#[derive(Debug)]
pub struct TwilioChannel {
    pub auth_token: Secret,
    pub public_url: String,
}

#[derive(Debug)]
pub struct WebhookChannel {
    pub verify: WebhookVerify,
    /// The payload's schema, when declared.
    pub schema: Option<ResponseSchema<SerdeJson>>,
    pub text: TemplateId,
    pub user_id: TemplateId,
    pub conversation: Option<TemplateId>,
    pub message_id: Option<TemplateId>,
    pub when: Option<ExpressionId>,
    pub reply: WebhookReply,
}

#[derive(Debug)]
pub enum WebhookVerify {
    HmacSha256 {
        /// Lower-case.
        header: String,
        secret: Secret,
        prefix: String,
    },
    Token {
        /// Lower-case.
        header: String,
        value: SecretDigest,
    },
}

#[derive(Debug)]
pub enum WebhookReply {
    /// The JSON answered to the delivery.
    Response(ValueTemplate),
    /// A call to a declared service, after the acknowledgement.
    Call {
        service: ServiceId,
        body: Option<ValueTemplate>,
    },
}
