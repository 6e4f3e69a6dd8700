//! Telegram Bot API: a webhook set with `setWebhook(url, secret_token)`
//! sends each `Update` as JSON with the secret in
//! `X-Telegram-Bot-Api-Secret-Token`; replies go out with `sendMessage`.

use serde_json::{Map, Value as Json, json};

use crate::project::{SecretDigest, TelegramChannel};

use super::{
    BadPayload, Delivery, Inbound, Message, Outbound, Rejection, ReplyTo, api_url, header,
    json_body, scalar_text,
};

pub const SECRET_HEADER: &str = "x-telegram-bot-api-secret-token";

pub fn verify(channel: &TelegramChannel, delivery: &Delivery<'_>) -> Result<(), Rejection> {
    let presented = header(delivery.headers, SECRET_HEADER)
        .ok_or(Rejection("no X-Telegram-Bot-Api-Secret-Token header"))?;
    if SecretDigest::of(presented).matches(&channel.secret_token) {
        Ok(())
    } else {
        Err(Rejection("wrong secret token"))
    }
}

pub fn read(body: &[u8]) -> Result<Inbound, BadPayload> {
    let update = json_body(body)?;
    let update_id = update
        .get("update_id")
        .and_then(scalar_text)
        .ok_or_else(|| BadPayload("the update has no `update_id`".to_owned()))?;
    // `edited_message`, `callback_query`, `my_chat_member`...: not a new
    // message from a user.
    let Some(message) = update.get("message").and_then(Json::as_object) else {
        return Ok(Inbound::Ignored("not a message"));
    };
    let from = message.get("from").and_then(Json::as_object);
    if from
        .and_then(|from| from.get("is_bot"))
        .and_then(Json::as_bool)
        .unwrap_or(false)
    {
        return Ok(Inbound::Ignored("a bot's message"));
    }
    let Some(text) = message
        .get("text")
        .and_then(Json::as_str)
        .filter(|text| !text.trim().is_empty())
    else {
        return Ok(Inbound::Ignored("a message without text"));
    };
    let chat = message.get("chat").and_then(Json::as_object);
    let chat_id = chat
        .and_then(|chat| chat.get("id"))
        .filter(|id| id.is_i64() || id.is_u64() || id.is_string())
        .cloned()
        .ok_or_else(|| BadPayload("the message has no `chat.id`".to_owned()))?;
    let conversation = scalar_text(&chat_id).unwrap_or_default();
    let user = from
        .and_then(|from| from.get("id"))
        .and_then(scalar_text)
        .unwrap_or_else(|| conversation.clone());
    let mut platform = Map::new();
    platform.insert("update_id".to_owned(), update["update_id"].clone());
    let mut copy = |key: &str, value: Option<&Json>| {
        if let Some(value) = value.filter(|value| !value.is_null()) {
            platform.insert(key.to_owned(), value.clone());
        }
    };
    copy("message_id", message.get("message_id"));
    copy("chat_id", Some(&chat_id));
    copy("chat_type", chat.and_then(|chat| chat.get("type")));
    copy("from_id", from.and_then(|from| from.get("id")));
    copy("username", from.and_then(|from| from.get("username")));
    copy("first_name", from.and_then(|from| from.get("first_name")));
    copy(
        "language_code",
        from.and_then(|from| from.get("language_code")),
    );
    Ok(Inbound::Messages(vec![Message {
        id: Some(update_id),
        text: text.to_owned(),
        user,
        conversation,
        platform,
        reply_to: ReplyTo::Telegram { chat_id },
    }]))
}

pub fn outbound(channel: &TelegramChannel, chat_id: &Json, text: &str) -> Option<Outbound> {
    let method = format!("bot{}", channel.bot_token.expose());
    Some(Outbound {
        url: api_url(&channel.api_url, &[&method, "sendMessage"])?,
        shown_url: format!(
            "{}/bot<bot_token>/sendMessage",
            channel.api_url.as_str().trim_end_matches('/')
        ),
        body: json!({ "chat_id": chat_id, "text": text }),
    })
}
