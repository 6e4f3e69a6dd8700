//! Any JSON webhook: verified by an HMAC-SHA256 of the body or a shared
//! token in a header, read into a turn by the channel's templates over
//! `body`, validated against the channel's payload schema when it has one.

use minijinja::Value;
use serde_json::{Map, Value as Json};

use crate::project::{CompiledProject, SecretDigest, WebhookChannel, WebhookVerify};
use crate::template::json_document;

use super::signature::hex_hmac_sha256_matches;
use super::{BadPayload, Delivery, Inbound, Message, Rejection, ReplyTo, header, json_body};

pub fn verify(channel: &WebhookChannel, delivery: &Delivery<'_>) -> Result<(), Rejection> {
    match &channel.verify {
        WebhookVerify::HmacSha256 {
            header: name,
            secret,
            prefix,
        } => {
            let signature =
                header(delivery.headers, name).ok_or(Rejection("no signature header"))?;
            hex_hmac_sha256_matches(
                secret.expose().as_bytes(),
                &[delivery.body],
                signature,
                prefix,
            )
        }
        WebhookVerify::Token {
            header: name,
            value,
        } => {
            let presented = header(delivery.headers, name).ok_or(Rejection("no token header"))?;
            if SecretDigest::of(presented.trim()).matches(value) {
                Ok(())
            } else {
                Err(Rejection("wrong token"))
            }
        }
    }
}

pub fn read(
    project: &CompiledProject,
    channel: &WebhookChannel,
    body: &[u8],
) -> Result<Inbound, BadPayload> {
    let payload = json_body(body)?;
    if let Some(schema) = &channel.schema
        && !schema.validator.is_valid(&payload)
        && let Some(error) = schema.validator.iter_errors(&payload).next()
    {
        let pointer = error.instance_path().to_string();
        return Err(BadPayload(format!(
            "the payload does not match `{}` at `{}`",
            schema.file,
            if pointer.is_empty() { "/" } else { &pointer }
        )));
    }
    let context = map_value(vec![("body", json_document(payload.clone()))]);
    let templates = &project.templates;
    let render = |id, what: &str| {
        templates
            .render(id, &context)
            .map(|text| text.trim().to_owned())
            .map_err(|error| BadPayload(format!("the payload has no {what}: {error}")))
    };
    if let Some(when) = channel.when {
        let runs = templates
            .evaluate(when, &context)
            .map_err(|error| BadPayload(format!("`request.when` failed: {error}")))?;
        if !runs.is_true() {
            return Ok(Inbound::Ignored("`request.when` is false"));
        }
    }
    // A payload without the text (a status, an event of another kind) is
    // not a message; one whose text is there but renders empty neither.
    let text = match templates.render(channel.text, &context) {
        Ok(text) if !text.trim().is_empty() => text.trim().to_owned(),
        _ => return Ok(Inbound::Ignored("no text")),
    };
    let user = render(channel.user_id, "user id")?;
    if user.is_empty() {
        return Err(BadPayload("the payload's user id is empty".to_owned()));
    }
    let conversation = match channel.conversation {
        Some(id) => render(id, "conversation")?,
        None => String::new(),
    };
    // No conversation: the user's own.
    let conversation = if conversation.is_empty() {
        user.clone()
    } else {
        conversation
    };
    let id = match channel.message_id {
        Some(id) => Some(render(id, "message id")?).filter(|id| !id.is_empty()),
        None => None,
    };
    let mut platform = Map::new();
    platform.insert("body".to_owned(), payload.clone());
    Ok(Inbound::Messages(vec![Message {
        id,
        text,
        user,
        conversation,
        platform,
        reply_to: ReplyTo::Webhook { body: payload },
    }]))
}

/// The context of a webhook's reply templates.
pub fn reply_context(body: &Json, fields: &[(&str, Json)]) -> Value {
    let mut entries: Vec<(&str, Value)> = vec![("body", json_document(body.clone()))];
    for (name, value) in fields {
        entries.push((name, json_document(value.clone())));
    }
    map_value(entries)
}

/// A template map from named values.
fn map_value(entries: Vec<(&str, Value)>) -> Value {
    Value::from(
        entries
            .into_iter()
            .map(|(key, value)| (key.to_owned(), value))
            .collect::<std::collections::BTreeMap<String, Value>>(),
    )
}
