//! Meta's WhatsApp Cloud API: the webhook is subscribed with a `GET`
//! (`hub.mode=subscribe`, `hub.verify_token`, answered with
//! `hub.challenge`); each `POST` is signed with the app secret
//! (`X-Hub-Signature-256: sha256=` HMAC-SHA256 of the body) and may batch
//! several messages and statuses; replies go out to
//! `/{phone_number_id}/messages`.

use serde_json::{Map, Value as Json, json};

use crate::project::{SecretDigest, WhatsAppChannel};

use super::signature::hex_hmac_sha256_matches;
use super::{
    BadPayload, Delivery, Inbound, Message, Outbound, Rejection, ReplyTo, api_url, header,
    json_body,
};

pub fn handshake(channel: &WhatsAppChannel, query: Option<&str>) -> Result<String, Rejection> {
    let mut mode = None;
    let mut token = None;
    let mut challenge = None;
    for (name, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match name.as_ref() {
            "hub.mode" => mode = Some(value.into_owned()),
            "hub.verify_token" => token = Some(value.into_owned()),
            "hub.challenge" => challenge = Some(value.into_owned()),
            _ => {}
        }
    }
    if mode.as_deref() != Some("subscribe") {
        return Err(Rejection("`hub.mode` is not `subscribe`"));
    }
    let token = token.ok_or(Rejection("no `hub.verify_token`"))?;
    if !SecretDigest::of(&token).matches(&channel.verify_token) {
        return Err(Rejection("wrong verify token"));
    }
    challenge.ok_or(Rejection("no `hub.challenge`"))
}

pub fn verify(channel: &WhatsAppChannel, delivery: &Delivery<'_>) -> Result<(), Rejection> {
    let signature = header(delivery.headers, "x-hub-signature-256")
        .ok_or(Rejection("no X-Hub-Signature-256 header"))?;
    hex_hmac_sha256_matches(
        channel.app_secret.expose().as_bytes(),
        &[delivery.body],
        signature,
        "sha256=",
    )
}

pub fn read(body: &[u8]) -> Result<Inbound, BadPayload> {
    let payload = json_body(body)?;
    let entries = payload
        .get("entry")
        .and_then(Json::as_array)
        .ok_or_else(|| BadPayload("the notification has no `entry` list".to_owned()))?;
    let mut messages = Vec::new();
    for change in entries
        .iter()
        .filter_map(|entry| entry.get("changes").and_then(Json::as_array))
        .flatten()
    {
        if change.get("field").and_then(Json::as_str) != Some("messages") {
            continue;
        }
        let Some(value) = change.get("value") else {
            continue;
        };
        let metadata = value.get("metadata");
        let Some(phone_number_id) = metadata
            .and_then(|metadata| metadata.get("phone_number_id"))
            .and_then(Json::as_str)
        else {
            continue;
        };
        let contacts = value.get("contacts").and_then(Json::as_array);
        for message in value
            .get("messages")
            .and_then(Json::as_array)
            .into_iter()
            .flatten()
        {
            // Images, locations, reactions...: not text this assistant reads.
            if message.get("type").and_then(Json::as_str) != Some("text") {
                continue;
            }
            let (Some(from), Some(id), Some(text)) = (
                message.get("from").and_then(Json::as_str),
                message.get("id").and_then(Json::as_str),
                message
                    .get("text")
                    .and_then(|text| text.get("body"))
                    .and_then(Json::as_str)
                    .filter(|text| !text.trim().is_empty()),
            ) else {
                continue;
            };
            let mut platform = Map::new();
            platform.insert("message_id".to_owned(), json!(id));
            platform.insert("from".to_owned(), json!(from));
            platform.insert("phone_number_id".to_owned(), json!(phone_number_id));
            if let Some(display) = metadata.and_then(|m| m.get("display_phone_number")) {
                platform.insert("display_phone_number".to_owned(), display.clone());
            }
            if let Some(timestamp) = message.get("timestamp") {
                platform.insert("timestamp".to_owned(), timestamp.clone());
            }
            let profile_name = contacts
                .into_iter()
                .flatten()
                .find(|contact| contact.get("wa_id").and_then(Json::as_str) == Some(from))
                .and_then(|contact| contact.get("profile")?.get("name"));
            if let Some(name) = profile_name {
                platform.insert("profile_name".to_owned(), name.clone());
            }
            messages.push(Message {
                id: Some(id.to_owned()),
                text: text.to_owned(),
                user: from.to_owned(),
                conversation: from.to_owned(),
                platform,
                reply_to: ReplyTo::WhatsApp {
                    phone_number_id: phone_number_id.to_owned(),
                    to: from.to_owned(),
                },
            });
        }
    }
    if messages.is_empty() {
        // Statuses (sent, delivered, read), other fields, other types.
        Ok(Inbound::Ignored("no text message"))
    } else {
        Ok(Inbound::Messages(messages))
    }
}

pub fn outbound(
    channel: &WhatsAppChannel,
    phone_number_id: &str,
    to: &str,
    text: &str,
) -> Option<Outbound> {
    let url = api_url(&channel.api_url, &[phone_number_id, "messages"])?;
    Some(Outbound {
        shown_url: url.to_string(),
        url,
        body: json!({
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": to,
            "type": "text",
            "text": { "preview_url": false, "body": text },
        }),
    })
}
