//! Slack Events API: every request is signed with the app's signing secret
//! (`X-Slack-Signature: v0=` HMAC-SHA256 of `v0:{timestamp}:{body}`), the
//! timestamp no older than five minutes; the endpoint is confirmed with a
//! `url_verification` challenge; replies go out with `chat.postMessage`.

use std::time::{Duration, UNIX_EPOCH};

use serde_json::{Map, Value as Json, json};

use crate::project::SlackChannel;

use super::signature::hex_hmac_sha256_matches;
use super::{
    BadPayload, Delivery, Inbound, Message, Outbound, Rejection, ReplyTo, api_url, header,
    json_body,
};

/// How far a request's timestamp may be from now, either way.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

pub fn verify(channel: &SlackChannel, delivery: &Delivery<'_>) -> Result<(), Rejection> {
    let timestamp = header(delivery.headers, "x-slack-request-timestamp")
        .ok_or(Rejection("no X-Slack-Request-Timestamp header"))?;
    let seconds: u64 = timestamp
        .trim()
        .parse()
        .map_err(|_| Rejection("X-Slack-Request-Timestamp is not a number"))?;
    let now = delivery
        .now
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    if now.abs_diff(seconds) > MAX_CLOCK_SKEW.as_secs() {
        return Err(Rejection("the timestamp is more than 5 minutes from now"));
    }
    let signature = header(delivery.headers, "x-slack-signature")
        .ok_or(Rejection("no X-Slack-Signature header"))?;
    hex_hmac_sha256_matches(
        channel.signing_secret.expose().as_bytes(),
        &[b"v0:", timestamp.as_bytes(), b":", delivery.body],
        signature,
        "v0=",
    )
}

pub fn read(body: &[u8]) -> Result<Inbound, BadPayload> {
    let payload = json_body(body)?;
    match payload.get("type").and_then(Json::as_str) {
        Some("url_verification") => {
            let challenge = payload
                .get("challenge")
                .and_then(Json::as_str)
                .ok_or_else(|| BadPayload("`url_verification` without `challenge`".to_owned()))?;
            Ok(Inbound::Challenge {
                content_type: "application/json",
                body: json!({ "challenge": challenge }).to_string(),
            })
        }
        Some("event_callback") => read_event(&payload),
        _ => Ok(Inbound::Ignored("not an event callback")),
    }
}

fn read_event(payload: &Json) -> Result<Inbound, BadPayload> {
    let event_id = payload
        .get("event_id")
        .and_then(Json::as_str)
        .ok_or_else(|| BadPayload("the event callback has no `event_id`".to_owned()))?;
    let Some(event) = payload.get("event").and_then(Json::as_object) else {
        return Err(BadPayload("the event callback has no `event`".to_owned()));
    };
    let kind = event.get("type").and_then(Json::as_str).unwrap_or_default();
    if kind != "message" && kind != "app_mention" {
        return Ok(Inbound::Ignored("not a message event"));
    }
    // Bots' messages (this app's own replies among them), edits, deletions,
    // joins: every message with a subtype or a bot id.
    if event.contains_key("bot_id") || event.contains_key("subtype") {
        return Ok(Inbound::Ignored("a bot's message or a message change"));
    }
    let Some(user) = event.get("user").and_then(Json::as_str) else {
        return Ok(Inbound::Ignored("a message without a user"));
    };
    let text = without_leading_mention(event.get("text").and_then(Json::as_str).unwrap_or(""));
    if text.is_empty() {
        return Ok(Inbound::Ignored("a message without text"));
    }
    let channel = event
        .get("channel")
        .and_then(Json::as_str)
        .ok_or_else(|| BadPayload("the message event has no `channel`".to_owned()))?;
    let thread_ts = event
        .get("thread_ts")
        .and_then(Json::as_str)
        .map(str::to_owned);
    let conversation = match &thread_ts {
        Some(thread) => format!("{channel}:{thread}"),
        None => channel.to_owned(),
    };
    let mut platform = Map::new();
    platform.insert("event_id".to_owned(), json!(event_id));
    for key in ["team_id", "api_app_id"] {
        if let Some(value) = payload.get(key) {
            platform.insert(key.to_owned(), value.clone());
        }
    }
    for key in ["channel", "user", "ts", "thread_ts", "channel_type"] {
        if let Some(value) = event.get(key) {
            platform.insert(key.to_owned(), value.clone());
        }
    }
    platform.insert("event_type".to_owned(), json!(kind));
    // One message can arrive as two events with their own `event_id`s
    // (`message` and `app_mention` when both are subscribed); its channel
    // and timestamp name it once, retries included.
    let ts = event
        .get("ts")
        .and_then(Json::as_str)
        .ok_or_else(|| BadPayload("the message event has no `ts`".to_owned()))?;
    Ok(Inbound::Messages(vec![Message {
        id: Some(format!("{channel}:{ts}")),
        text,
        user: user.to_owned(),
        conversation,
        platform,
        reply_to: ReplyTo::Slack {
            channel: channel.to_owned(),
            thread_ts,
        },
    }]))
}

/// The text without the `<@U123>` mention that starts an `app_mention`.
fn without_leading_mention(text: &str) -> String {
    let trimmed = text.trim_start();
    match trimmed
        .strip_prefix("<@")
        .and_then(|rest| rest.split_once('>'))
    {
        Some((_, rest)) => rest.trim().to_owned(),
        None => text.trim().to_owned(),
    }
}

pub fn outbound(
    channel: &SlackChannel,
    conversation: &str,
    thread_ts: Option<&str>,
    text: &str,
) -> Option<Outbound> {
    let mut body = json!({ "channel": conversation, "text": text });
    if let Some(thread_ts) = thread_ts {
        body["thread_ts"] = json!(thread_ts);
    }
    let url = api_url(&channel.api_url, &["chat.postMessage"])?;
    Some(Outbound {
        shown_url: url.to_string(),
        url,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::without_leading_mention;

    #[test]
    fn a_leading_mention_is_dropped() {
        assert_eq!(without_leading_mention("<@U1> menu please"), "menu please");
        assert_eq!(without_leading_mention("menu <@U1>"), "menu <@U1>");
    }
}
