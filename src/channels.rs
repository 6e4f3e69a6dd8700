//! Channels: what each messaging platform sends and expects, without HTTP
//! serving or flows. A delivery is verified exactly as its platform
//! specifies (`verify`), read into the user messages it carries or the
//! reason it carries none (`read`), and a reply becomes the platform API
//! call that sends it (`outbound`) or, for the synchronous kinds, the answer
//! to the delivery (`twilio::twiml`, a webhook's `reply.response`).
//!
//! `runtime` holds what outlives a delivery: the seen-ids set that drops
//! duplicate deliveries, the bounded queue of background turns and the
//! per-channel counters of `/health`.

mod runtime;
mod signature;
mod slack;
mod telegram;
pub mod twilio;
mod webhook;
mod whatsapp;

use std::time::SystemTime;

use http::HeaderMap;
use serde_json::{Map, Value as Json};

use crate::engine::{TurnOutcome, TurnRequest};
use crate::project::{self, Channel, ChannelKind, CompiledProject, ServiceId};

pub use runtime::{ChannelCounters, ChannelRuntime, DELIVERY_MEMORY, QUEUE_CAPACITY, QueueSlot};

/// A delivery as it arrived: what verification and reading need. No
/// `Debug`: its headers carry tokens.
#[derive(Clone, Copy)]
pub struct Delivery<'a> {
    pub headers: &'a HeaderMap,
    /// The raw query string, without `?`.
    pub query: Option<&'a str>,
    /// The raw body: signatures are over these exact bytes.
    pub body: &'a [u8],
    pub now: SystemTime,
}

/// Why a delivery failed verification: logged with the channel, never
/// answered in detail (401 `unauthorized`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection(pub &'static str);

/// What a verified delivery carries.
#[derive(Debug)]
pub enum Inbound {
    /// A subscription handshake: answer this body (with its content type).
    Challenge {
        content_type: &'static str,
        body: String,
    },
    /// Not a user's text message (a status, an edit, a bot's message, a
    /// join): acknowledged, nothing runs.
    Ignored(&'static str),
    /// User messages, one turn each (WhatsApp batches several).
    Messages(Vec<Message>),
}

/// One user message, as a turn will see it.
#[derive(Debug, Clone)]
pub struct Message {
    /// The platform's id of this delivery, for dropping repeats.
    pub id: Option<String>,
    pub text: String,
    /// The platform's user id (the turn's `user_id` is `<channel>:<this>`).
    pub user: String,
    /// The platform's conversation (the turn's `session_id` is
    /// `<channel>:<this>`).
    pub conversation: String,
    /// The platform fields a flow may need: `input.platform`.
    pub platform: Map<String, Json>,
    /// Where the reply goes.
    pub reply_to: ReplyTo,
}

impl Message {
    /// The turn of this message on channel `name`: `<name>:<platform id>`
    /// as user and session, the platform's fields under `input.platform`.
    pub fn turn_request(&self, name: &str, trace_id: String) -> TurnRequest {
        let mut input = Map::new();
        input.insert("platform".to_owned(), Json::Object(self.platform.clone()));
        TurnRequest {
            text: self.text.clone(),
            user_id: format!("{name}:{}", self.user),
            channel: name.to_owned(),
            session_id: format!("{name}:{}", self.conversation),
            trace_id,
            tenant: None,
            input,
            direct: None,
        }
    }
}

/// What sending a reply needs, per platform.
#[derive(Debug, Clone)]
pub enum ReplyTo {
    Telegram {
        chat_id: Json,
    },
    Slack {
        channel: String,
        thread_ts: Option<String>,
    },
    WhatsApp {
        phone_number_id: String,
        to: String,
    },
    /// In the answer to the delivery.
    Response,
    /// A webhook: the payload, for the reply templates.
    Webhook {
        body: Json,
    },
}

/// A payload that cannot be read (not JSON, not the platform's shape):
/// 400 `invalid_request`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadPayload(pub String);

/// Checks a delivery as the channel's platform specifies.
pub fn verify(channel: &Channel, delivery: &Delivery<'_>) -> Result<(), Rejection> {
    match &channel.kind {
        ChannelKind::Telegram(telegram) => telegram::verify(telegram, delivery),
        ChannelKind::Slack(slack) => slack::verify(slack, delivery),
        ChannelKind::WhatsApp(whatsapp) => whatsapp::verify(whatsapp, delivery),
        ChannelKind::Twilio(twilio) => twilio::verify(twilio, delivery),
        ChannelKind::Webhook(webhook) => webhook::verify(webhook, delivery),
    }
}

/// A `GET` to a channel: WhatsApp's subscription handshake; `None` for the
/// kinds that take no `GET`.
pub fn handshake(channel: &Channel, query: Option<&str>) -> Option<Result<String, Rejection>> {
    match &channel.kind {
        ChannelKind::WhatsApp(whatsapp) => Some(whatsapp::handshake(whatsapp, query)),
        _ => None,
    }
}

/// Reads a verified delivery.
pub fn read(
    project: &CompiledProject,
    channel: &Channel,
    body: &[u8],
) -> Result<Inbound, BadPayload> {
    match &channel.kind {
        ChannelKind::Telegram(_) => telegram::read(body),
        ChannelKind::Slack(_) => slack::read(body),
        ChannelKind::WhatsApp(_) => whatsapp::read(body),
        ChannelKind::Twilio(_) => twilio::read(body),
        ChannelKind::Webhook(webhook) => webhook::read(project, webhook, body),
    }
}

/// A platform API call that sends a reply. `Debug` shows `shown_url`.
pub struct Outbound {
    /// Holds the Telegram bot token: never logged.
    pub url: url::Url,
    /// The URL as logs and test reports show it: the bot token is
    /// `<bot_token>`.
    pub shown_url: String,
    pub body: Json,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("url", &self.shown_url)
            .field("body", &self.body)
            .finish()
    }
}

/// How a turn's reply goes back to its platform.
#[derive(Debug)]
pub enum Reply {
    /// Through the platform's API, after the acknowledgement.
    Api(Outbound),
    /// To a declared service (a webhook's `reply.call`), after the
    /// acknowledgement.
    Service { service: ServiceId, body: Json },
    /// In the answer to the delivery: a webhook's `reply.response`.
    Json(Json),
    /// In the answer to the delivery: Twilio's TwiML.
    TwiML(String),
}

/// What goes back for `message` once its turn answered `outcome`; an error
/// when a webhook's reply template fails.
pub fn reply(
    project: &CompiledProject,
    channel: &Channel,
    message: &Message,
    request: &TurnRequest,
    outcome: &TurnOutcome,
) -> Result<Reply, String> {
    match (&channel.kind, &message.reply_to) {
        (ChannelKind::Twilio(_), _) => Ok(Reply::TwiML(twilio::twiml(Some(&outcome.reply_text)))),
        (ChannelKind::Webhook(webhook), ReplyTo::Webhook { body }) => {
            let context = reply_context(body, request, outcome);
            let render = |template| {
                project
                    .templates
                    .render_value(template, &context)
                    .map_err(|error| {
                        format!(
                            "the reply template of channel `{}` failed: {error}",
                            channel.name
                        )
                    })
            };
            match &webhook.reply {
                project::WebhookReply::Response(template) => Ok(Reply::Json(render(template)?)),
                project::WebhookReply::Call { service, body } => Ok(Reply::Service {
                    service: *service,
                    body: match body {
                        Some(template) => render(template)?,
                        None => serde_json::json!({
                            "reply_text": outcome.reply_text,
                            "route": outcome.route,
                        }),
                    },
                }),
            }
        }
        _ => outbound(channel, message, &outcome.reply_text)
            .map(Reply::Api)
            .ok_or_else(|| format!("channel `{}` cannot address this reply", channel.name)),
    }
}

/// The context of a webhook's reply templates.
fn reply_context(body: &Json, request: &TurnRequest, outcome: &TurnOutcome) -> minijinja::Value {
    use serde_json::json;
    webhook::reply_context(
        body,
        &[
            ("reply_text", json!(outcome.reply_text)),
            ("decision", json!(outcome.decision)),
            ("route", json!(outcome.route)),
            ("intent", json!(outcome.intent)),
            ("data", outcome.data.clone().unwrap_or(Json::Null)),
            ("text", json!(request.text)),
            ("user_id", json!(request.user_id)),
            ("session_id", json!(request.session_id)),
            ("trace_id", json!(request.trace_id)),
            ("channel", json!(request.channel)),
        ],
    )
}

/// The API call that sends `reply_text` for `message`, for the kinds that
/// reply through an API.
pub fn outbound(channel: &Channel, message: &Message, reply_text: &str) -> Option<Outbound> {
    match (&channel.kind, &message.reply_to) {
        (ChannelKind::Telegram(telegram), ReplyTo::Telegram { chat_id }) => {
            telegram::outbound(telegram, chat_id, reply_text)
        }
        (ChannelKind::Slack(slack), ReplyTo::Slack { channel, thread_ts }) => {
            slack::outbound(slack, channel, thread_ts.as_deref(), reply_text)
        }
        (
            ChannelKind::WhatsApp(whatsapp),
            ReplyTo::WhatsApp {
                phone_number_id,
                to,
            },
        ) => whatsapp::outbound(whatsapp, phone_number_id, to, reply_text),
        _ => None,
    }
}

/// `base` with `segments` appended to its path (`https://host/api` +
/// `chat.postMessage`); `None` for a segment that is not a plain name.
fn api_url(base: &url::Url, segments: &[&str]) -> Option<url::Url> {
    let mut url = base.clone();
    {
        let mut path = url.path_segments_mut().ok()?;
        path.pop_if_empty();
        for segment in segments {
            path.push(segment);
        }
    }
    Some(url)
}

/// A JSON body, or why it is not one.
fn json_body(body: &[u8]) -> Result<Json, BadPayload> {
    crate::services::parse_json(body)
        .map_err(|error| BadPayload(format!("the payload is not JSON: {error}")))
}

/// A header's value as text.
fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

/// A JSON scalar as text: strings as they are, numbers written out.
fn scalar_text(value: &Json) -> Option<String> {
    match value {
        Json::String(text) => Some(text.clone()),
        Json::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::api_url;

    #[test]
    fn api_paths_are_appended_to_the_base_path() {
        let base = url::Url::parse("https://slack.com/api").unwrap();
        assert_eq!(
            api_url(&base, &["chat.postMessage"]).unwrap().as_str(),
            "https://slack.com/api/chat.postMessage"
        );
        let base = url::Url::parse("http://127.0.0.1:9/v21.0/").unwrap();
        assert_eq!(
            api_url(&base, &["PN1", "messages"]).unwrap().as_str(),
            "http://127.0.0.1:9/v21.0/PN1/messages"
        );
        // A segment cannot climb out of the base path.
        let base = url::Url::parse("https://graph.example/v21.0").unwrap();
        assert_eq!(
            api_url(&base, &["../x", "messages"]).unwrap().as_str(),
            "https://graph.example/v21.0/..%2Fx/messages"
        );
    }
}
