//! Channels: messaging platforms' webhooks (`channels:`). Each kind has its
//! own keys; a key of another kind is an error naming the keys that belong.
//! Secrets come from the environment: a channel with an unset secret is
//! compiled disabled, with a warning (`reload::prepare` makes it an error in
//! production).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use crate::diagnostic::{Code, Diagnostic, did_you_mean};
use crate::project::{self, ServiceId};
use crate::spec::{self, Spanned, Text};

use super::templates::{ChannelVars, Vars};
use super::{Checker, Defined};

/// The kinds of channel, as written in `kind:`.
pub const CHANNEL_KINDS: &[&str] = &["telegram", "slack", "whatsapp", "twilio", "webhook"];

/// Time allowed for one attempt at sending a reply through a platform API.
pub const DEFAULT_DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Attempts at sending a reply, and the first backoff: platforms throttle
/// and fail briefly, and a reply is worth a few seconds of retrying.
pub const DEFAULT_DELIVERY_RETRY: project::RetryPolicy = project::RetryPolicy {
    attempts: 4,
    backoff: Duration::from_millis(250),
};

/// What a webhook's request templates may read.
const REQUEST_VARIABLES: &[&str] = &["body"];

/// What a webhook's reply templates may read.
const REPLY_VARIABLES: &[&str] = &[
    "body",
    "reply_text",
    "decision",
    "route",
    "intent",
    "data",
    "text",
    "user_id",
    "session_id",
    "trace_id",
    "channel",
];

/// The keys each kind takes besides `kind`: the kinds that send replies
/// through an API also take `timeout` and `retry`.
fn kind_keys(kind: &str) -> &'static [&'static str] {
    match kind {
        "telegram" => &["secret_token", "bot_token", "api_url", "timeout", "retry"],
        "slack" => &["signing_secret", "bot_token", "api_url", "timeout", "retry"],
        "whatsapp" => &[
            "verify_token",
            "app_secret",
            "access_token",
            "api_url",
            "timeout",
            "retry",
        ],
        "twilio" => &["auth_token", "public_url"],
        _ => &["verify", "schema", "request", "reply"],
    }
}

/// Every optional key of a channel that is present, with its position.
fn present_keys(channel: &spec::Channel) -> Vec<(&'static str, spec::Position)> {
    let text =
        |name: &'static str, value: &Option<Text>| value.as_ref().map(|v| (name, v.position));
    [
        text("secret_token", &channel.secret_token),
        text("bot_token", &channel.bot_token),
        text("signing_secret", &channel.signing_secret),
        text("verify_token", &channel.verify_token),
        text("app_secret", &channel.app_secret),
        text("access_token", &channel.access_token),
        text("auth_token", &channel.auth_token),
        text("public_url", &channel.public_url),
        text("api_url", &channel.api_url),
        channel.verify.as_ref().map(|v| ("verify", v.position)),
        text("schema", &channel.schema),
        channel.request.as_ref().map(|v| ("request", v.position)),
        channel.reply.as_ref().map(|v| ("reply", v.position)),
        text("timeout", &channel.timeout),
        channel.retry.as_ref().map(|v| ("retry", v.position)),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// A secret as read: its value, or the variable that left it unset.
enum SecretValue {
    Set(String),
    Unset,
}

impl Checker<'_> {
    pub(super) fn compile_channels(
        &mut self,
        channels: &[Defined<'_, spec::Channel>],
        service_ids: &HashMap<&str, ServiceId>,
    ) -> Option<Vec<project::Channel>> {
        let compiled: Vec<Option<project::Channel>> = channels
            .iter()
            .map(|channel| self.compile_channel(channel, service_ids))
            .collect();
        compiled.into_iter().collect()
    }

    fn compile_channel(
        &mut self,
        channel: &Defined<'_, spec::Channel>,
        service_ids: &HashMap<&str, ServiceId>,
    ) -> Option<project::Channel> {
        let file = channel.file;
        let spec = channel.spec;
        let name = &channel.name.value;
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            let location = self.location(file, channel.name, name.chars().count());
            self.push(
                Diagnostic::error(
                    Code::InvalidValue,
                    location,
                    format!("channel name `{name}` cannot be a URL path segment"),
                )
                .with_hint("use letters, digits, `_` and `-`: it is served at `/channels/{name}`"),
            );
            return None;
        }
        if name == crate::server::mcp::MCP_CHANNEL {
            let location = self.location(file, channel.name, name.chars().count());
            self.push(
                Diagnostic::error(
                    Code::InvalidValue,
                    location,
                    format!("channel name `{name}` is reserved for tool calls at `/mcp`"),
                )
                .with_hint("name the channel after its platform, e.g. `telegram`"),
            );
            return None;
        }
        let kind = spec.kind.value.trim();
        if !CHANNEL_KINDS.contains(&kind) {
            let location = self.location(file, &spec.kind, spec.kind.value.chars().count());
            let hint = did_you_mean(kind, CHANNEL_KINDS.iter().copied())
                .unwrap_or_else(|| format!("the kinds are: {}", CHANNEL_KINDS.join(", ")));
            self.push(
                Diagnostic::error(
                    Code::InvalidValue,
                    location,
                    format!("unknown channel kind `{kind}`"),
                )
                .with_hint(hint),
            );
            return None;
        }
        let allowed = kind_keys(kind);
        let mut ok = true;
        for (key, position) in present_keys(spec) {
            if !allowed.contains(&key) {
                let location = self.location(file, &Spanned::new((), position), 1);
                self.push(
                    Diagnostic::error(
                        Code::UnknownKey,
                        location,
                        format!("`{key}` is not a key of a `{kind}` channel"),
                    )
                    .with_hint(if matches!(key, "timeout" | "retry") {
                        format!(
                            "a `{kind}` channel answers in the response; a webhook's `reply.call` uses its service's timeout and retry"
                        )
                    } else {
                        format!("a `{kind}` channel takes: kind, {}", allowed.join(", "))
                    }),
                );
                ok = false;
            }
        }
        let mut unset = Vec::new();
        let mut secret = |checker: &mut Self, key: &'static str, value: &Option<Text>| {
            let value = value.as_ref();
            checker.channel_secret(channel, key, value, &mut unset)
        };
        let compiled_kind = match kind {
            "telegram" => {
                let secret_token = secret(self, "secret_token", &spec.secret_token);
                let bot_token = secret(self, "bot_token", &spec.bot_token);
                let api_url = self.api_url(file, &spec.api_url, "https://api.telegram.org");
                match (secret_token, bot_token, api_url) {
                    (Some(secret_token), Some(bot_token), Some(api_url)) => {
                        Some(project::ChannelKind::Telegram(project::TelegramChannel {
                            secret_token: project::SecretDigest::of(&secret_token.or_empty()),
                            bot_token: project::Secret::new(bot_token.or_empty()),
                            api_url,
                        }))
                    }
                    _ => None,
                }
            }
            "slack" => {
                let signing_secret = secret(self, "signing_secret", &spec.signing_secret);
                let bot_token = secret(self, "bot_token", &spec.bot_token);
                let api_url = self.api_url(file, &spec.api_url, "https://slack.com/api");
                match (signing_secret, bot_token, api_url) {
                    (Some(signing_secret), Some(bot_token), Some(api_url)) => {
                        Some(project::ChannelKind::Slack(project::SlackChannel {
                            signing_secret: project::Secret::new(signing_secret.or_empty()),
                            bot_token: project::Secret::new(bot_token.or_empty()),
                            api_url,
                        }))
                    }
                    _ => None,
                }
            }
            "whatsapp" => {
                let verify_token = secret(self, "verify_token", &spec.verify_token);
                let app_secret = secret(self, "app_secret", &spec.app_secret);
                let access_token = secret(self, "access_token", &spec.access_token);
                let api_url = self.api_url(file, &spec.api_url, "https://graph.facebook.com/v21.0");
                match (verify_token, app_secret, access_token, api_url) {
                    (Some(verify_token), Some(app_secret), Some(access_token), Some(api_url)) => {
                        Some(project::ChannelKind::WhatsApp(project::WhatsAppChannel {
                            verify_token: project::SecretDigest::of(&verify_token.or_empty()),
                            app_secret: project::Secret::new(app_secret.or_empty()),
                            access_token: project::Secret::new(access_token.or_empty()),
                            api_url,
                        }))
                    }
                    _ => None,
                }
            }
            "twilio" => {
                let auth_token = secret(self, "auth_token", &spec.auth_token);
                let public_url = secret(self, "public_url", &spec.public_url);
                if let (Some(SecretValue::Set(_)), Some(text)) = (&public_url, &spec.public_url) {
                    let hint = "the URL configured in Twilio, such as `https://bot.example.com/channels/sms`";
                    if self.http_url(file, text, hint).is_err() {
                        ok = false;
                    }
                }
                match (auth_token, public_url) {
                    (Some(auth_token), Some(public_url)) => {
                        Some(project::ChannelKind::Twilio(project::TwilioChannel {
                            auth_token: project::Secret::new(auth_token.or_empty()),
                            public_url: public_url.or_empty().trim().to_owned(),
                        }))
                    }
                    _ => None,
                }
            }
            _ => self
                .compile_webhook(channel, service_ids, &mut unset)
                .map(project::ChannelKind::Webhook),
        };
        let timeout = match &spec.timeout {
            Some(text) => self.duration(file, text),
            None => Some(DEFAULT_DELIVERY_TIMEOUT),
        };
        let retry = match &spec.retry {
            Some(retry) => self.retry_policy(file, retry),
            None => Some(Some(DEFAULT_DELIVERY_RETRY)),
        };
        if !unset.is_empty() {
            let variables: Vec<String> = unset
                .iter()
                .map(|secret: &project::UnsetSecret| match &secret.variable {
                    Some(variable) => format!("`{variable}`"),
                    None => format!("`{}`", secret.key),
                })
                .collect();
            let location = self.location(file, channel.name, name.chars().count());
            self.push(
                Diagnostic::warning(
                    Code::UnsetEnvVar,
                    location,
                    format!(
                        "channel `{name}` is disabled: {} {} not set",
                        variables.join(", "),
                        if variables.len() == 1 { "is" } else { "are" }
                    ),
                )
                .with_hint(
                    "outside production the channel answers 404 until its secrets are set; in production every declared channel needs them",
                ),
            );
        }
        let kind = compiled_kind?;
        let (timeout, retry) = (timeout?, retry?);
        if !ok {
            return None;
        }
        let delivery = self.delivery_service(name, &kind, timeout, retry);
        Some(project::Channel {
            name: name.clone(),
            kind,
            unset,
            delivery,
        })
    }

    /// A required secret of a channel: its value, or `Unset` (recorded in
    /// `unset`) when it is empty; `None` when the key is missing.
    fn channel_secret(
        &mut self,
        channel: &Defined<'_, spec::Channel>,
        key: &'static str,
        value: Option<&Text>,
        unset: &mut Vec<project::UnsetSecret>,
    ) -> Option<SecretValue> {
        let Some(text) = value else {
            let location = self.location(channel.file, channel.name, channel.name.value.len());
            self.push(
                Diagnostic::error(
                    Code::MissingKey,
                    location,
                    format!(
                        "channel `{}` has no `{key}`",
                        channel.name.value
                    ),
                )
                .with_hint(format!(
                    "a `{}` channel needs `{key}`, from the environment: `{key}: ${{SOME_VARIABLE}}`",
                    channel.spec.kind.value.trim()
                )),
            );
            return None;
        };
        if text.value.trim().is_empty() {
            unset.push(project::UnsetSecret {
                key,
                variable: self.variable_at(channel.file, text.position),
            });
            return Some(SecretValue::Unset);
        }
        Some(SecretValue::Set(text.value.trim().to_owned()))
    }

    /// A platform API's base URL, without a trailing `/`; the platform's
    /// own when the key is absent or empty.
    fn api_url(&mut self, file: &Path, text: &Option<Text>, default: &str) -> Option<url::Url> {
        let hint = "the platform API's base URL, such as `https://api.telegram.org`";
        let parsed = match text {
            Some(text) => self.http_url(file, text, hint).ok()?,
            None => None,
        };
        match parsed {
            Some(url) => Some(url),
            None => url::Url::parse(default).ok(),
        }
    }

    fn compile_webhook(
        &mut self,
        channel: &Defined<'_, spec::Channel>,
        service_ids: &HashMap<&str, ServiceId>,
        unset: &mut Vec<project::UnsetSecret>,
    ) -> Option<project::WebhookChannel> {
        let file = channel.file;
        let spec = channel.spec;
        let name = &channel.name.value;
        let mut ok = true;
        let missing = |checker: &mut Self, key: &str, example: &str| {
            let location = checker.location(file, channel.name, name.len());
            checker.push(
                Diagnostic::error(
                    Code::MissingKey,
                    location,
                    format!("webhook channel `{name}` has no `{key}`"),
                )
                .with_hint(format!("for example `{key}: {example}`")),
            );
        };
        let verify = match &spec.verify {
            None => {
                missing(
                    self,
                    "verify",
                    "{ hmac_sha256: { header: X-Signature, secret: \"${PARTNER_SECRET}\" } }",
                );
                None
            }
            Some(verify) => self.webhook_verify(channel, verify, unset),
        };
        let body_schema = match &spec.schema {
            Some(schema) => match self.schema_file(file, schema) {
                Some(loaded) => Some((schema.value.trim().to_owned(), loaded)),
                None => {
                    ok = false;
                    None
                }
            },
            None => None,
        };
        let request_vars = Vars::Channel(&ChannelVars {
            roots: REQUEST_VARIABLES,
            body_schema: body_schema.as_ref().map(|(_, schema)| schema.json.clone()),
        });
        let reply_vars_owned = ChannelVars {
            roots: REPLY_VARIABLES,
            body_schema: body_schema.as_ref().map(|(_, schema)| schema.json.clone()),
        };
        let reply_vars = Vars::Channel(&reply_vars_owned);
        let request = match &spec.request {
            None => {
                missing(
                    self,
                    "request",
                    "{ text: \"{{ body.message.text }}\", user_id: \"{{ body.user.id }}\" }",
                );
                None
            }
            Some(request) => {
                let request = &request.value;
                let text = self.compile_text_in(file, &request.text, &request_vars);
                let user_id = self.compile_text_in(file, &request.user_id, &request_vars);
                let optional = |checker: &mut Self, text: &Option<Text>| match text {
                    Some(text) => checker.compile_text_in(file, text, &request_vars).map(Some),
                    None => Some(None),
                };
                let conversation = optional(self, &request.conversation);
                let message_id = optional(self, &request.message_id);
                let when = match &request.when {
                    Some(when) => self
                        .compile_expression_in(file, when, &when.value, &request_vars)
                        .map(Some),
                    None => Some(None),
                };
                if request.message_id.is_none() {
                    let location = self.location(file, channel.name, name.len());
                    self.push(
                        Diagnostic::warning(
                            Code::MissingKey,
                            location,
                            format!(
                                "webhook channel `{name}` has no `request.message_id`: a delivery the sender repeats runs again"
                            ),
                        )
                        .with_hint("name the payload's unique id, e.g. `message_id: \"{{ body.id }}\"`"),
                    );
                }
                Some((text?, user_id?, conversation?, message_id?, when?))
            }
        };
        let reply = match &spec.reply {
            None => {
                missing(
                    self,
                    "reply",
                    "{ response: { text: \"{{ reply_text }}\" } }",
                );
                None
            }
            Some(reply) => {
                let value = &reply.value;
                match (&value.response, &value.call) {
                    (Some(response), None) => {
                        if let Some(body) = &value.body {
                            let location = self.location(file, body, 1);
                            self.push(
                                Diagnostic::error(
                                    Code::MisplacedKey,
                                    location,
                                    "`reply.body` is the body of `reply.call`; with `reply.response` it is not used",
                                )
                                .with_hint("remove `body`, or reply through `call:` a service"),
                            );
                            ok = false;
                        }
                        self.compile_value_in(file, response, &reply_vars)
                            .map(project::WebhookReply::Response)
                    }
                    (None, Some(call)) => {
                        let service =
                            self.resolve(file, call, service_ids, "service", Code::UnknownService);
                        let body = match &value.body {
                            Some(body) => self.compile_value_in(file, body, &reply_vars).map(Some),
                            None => Some(None),
                        };
                        Some(project::WebhookReply::Call {
                            service: service?,
                            body: body?,
                        })
                    }
                    _ => {
                        let location = self.location(file, reply, 1);
                        self.push(
                            Diagnostic::error(
                                Code::InvalidValue,
                                location,
                                format!(
                                    "the reply of webhook channel `{name}` needs exactly one of `response` and `call`"
                                ),
                            )
                            .with_hint(
                                "`response:` answers the delivery with JSON; `call:` sends the reply to a declared service",
                            ),
                        );
                        None
                    }
                }
            }
        };
        let (text, user_id, conversation, message_id, when) = request?;
        if !ok {
            return None;
        }
        Some(project::WebhookChannel {
            verify: verify?,
            schema: body_schema.map(|(file, schema)| project::ResponseSchema {
                file,
                validator: schema.validator.clone(),
            }),
            text,
            user_id,
            conversation,
            message_id,
            when,
            reply: reply?,
        })
    }

    fn webhook_verify(
        &mut self,
        channel: &Defined<'_, spec::Channel>,
        verify: &Spanned<spec::WebhookVerify>,
        unset: &mut Vec<project::UnsetSecret>,
    ) -> Option<project::WebhookVerify> {
        let file = channel.file;
        let header = |checker: &mut Self, name: &spec::Name| {
            let lower = name.value.trim().to_ascii_lowercase();
            if http::HeaderName::from_bytes(lower.as_bytes()).is_ok() {
                Some(lower)
            } else {
                let location = checker.location(file, name, name.value.len());
                checker.error(
                    Code::InvalidValue,
                    location,
                    format!("`{}` is not a valid HTTP header name", name.value),
                );
                None
            }
        };
        match (&verify.value.hmac_sha256, &verify.value.token) {
            (Some(hmac), None) => {
                let hmac = &hmac.value;
                let header = header(self, &hmac.header);
                let secret = self.channel_secret(channel, "secret", Some(&hmac.secret), unset);
                Some(project::WebhookVerify::HmacSha256 {
                    header: header?,
                    secret: project::Secret::new(secret?.or_empty()),
                    prefix: hmac
                        .prefix
                        .as_ref()
                        .map(|prefix| prefix.value.clone())
                        .unwrap_or_default(),
                })
            }
            (None, Some(token)) => {
                let token = &token.value;
                let header = header(self, &token.header);
                let value = self.channel_secret(channel, "value", Some(&token.value), unset);
                Some(project::WebhookVerify::Token {
                    header: header?,
                    value: project::SecretDigest::of(&value?.or_empty()),
                })
            }
            _ => {
                let location = self.location(file, verify, 1);
                self.push(
                    Diagnostic::error(
                        Code::InvalidValue,
                        location,
                        "`verify` needs exactly one of `hmac_sha256` and `token`",
                    )
                    .with_hint(
                        "`hmac_sha256: { header, secret, prefix }` checks a signature of the body; `token: { header, value }` a shared secret",
                    ),
                );
                None
            }
        }
    }

    /// The service through which a channel's replies go out: its platform
    /// API, with the channel's timeout and retries. Its URL is given per
    /// reply (`ServiceMode::Live`), so the bot token in a Telegram URL is
    /// never kept in a `Service`.
    fn delivery_service(
        &self,
        name: &str,
        kind: &project::ChannelKind,
        timeout: Duration,
        retry: Option<project::RetryPolicy>,
    ) -> Option<project::Service> {
        let headers = match kind {
            project::ChannelKind::Telegram(_) => Vec::new(),
            project::ChannelKind::Slack(slack) => vec![(
                "authorization".to_owned(),
                format!("Bearer {}", slack.bot_token.expose()),
            )],
            project::ChannelKind::WhatsApp(whatsapp) => vec![(
                "authorization".to_owned(),
                format!("Bearer {}", whatsapp.access_token.expose()),
            )],
            project::ChannelKind::Twilio(_) | project::ChannelKind::Webhook(_) => return None,
        };
        Some(project::Service {
            tenant: None,
            mcp_tool: None,
            name: format!("channel:{name}"),
            url: None,
            url_variable: None,
            method: spec::HttpMethod::Post,
            headers,
            timeout,
            retry,
            unwrap_first: false,
            response_schema: platform_answer_schema(kind),
            mock: None,
            circuit_breaker: None,
            call_metrics: std::sync::OnceLock::new(),
        })
    }
}

impl SecretValue {
    /// The value; empty when unset (the channel is then disabled and the
    /// value never used).
    fn or_empty(self) -> String {
        match self {
            SecretValue::Set(value) => value,
            SecretValue::Unset => String::new(),
        }
    }
}

/// What Telegram's and Slack's APIs answer on success: `"ok": true` (a
/// refused call is often HTTP 200 with `"ok": false` and an `error`).
fn platform_answer_schema(kind: &project::ChannelKind) -> Option<project::ResponseSchema> {
    if !matches!(
        kind,
        project::ChannelKind::Telegram(_) | project::ChannelKind::Slack(_)
    ) {
        return None;
    }
    let schema = serde_json::json!({
        "type": "object",
        "required": ["ok"],
        "properties": { "ok": { "const": true } }
    });
    let validator = jsonschema::options_for::<crate::document::Answers>()
        .build(&schema)
        .ok()?;
    Some(project::ResponseSchema {
        file: format!("the {} API's answer", kind.as_str()),
        validator: std::sync::Arc::new(validator),
    })
}
