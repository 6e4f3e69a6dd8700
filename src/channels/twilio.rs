//! Twilio Messaging (SMS, and WhatsApp through Twilio): each incoming
//! message is a form `POST` signed with the account's auth token
//! (`X-Twilio-Signature`: base64 HMAC-SHA1 of the public URL followed by
//! every parameter's name and value, sorted by name); the reply is the TwiML
//! of the answer.

use base64::Engine;
use serde_json::{Map, Value as Json};

use crate::project::TwilioChannel;

use super::signature::hmac_sha1_matches;
use super::{BadPayload, Delivery, Inbound, Message, Rejection, ReplyTo, header};

pub fn verify(channel: &TwilioChannel, delivery: &Delivery<'_>) -> Result<(), Rejection> {
    let signature = header(delivery.headers, "x-twilio-signature")
        .ok_or(Rejection("no X-Twilio-Signature header"))?;
    let digest = base64::engine::general_purpose::STANDARD
        .decode(signature.trim())
        .map_err(|_| Rejection("X-Twilio-Signature is not base64"))?;
    // Twilio signs the URL it was given, query string included.
    let mut url = channel.public_url.clone();
    if let Some(query) = delivery.query.filter(|query| !query.is_empty())
        && !url.contains('?')
    {
        url.push('?');
        url.push_str(query);
    }
    let mut parameters: Vec<(String, String)> = form_urlencoded::parse(delivery.body)
        .map(|(name, value)| (name.into_owned(), value.into_owned()))
        .collect();
    parameters.sort_by(|a, b| a.0.cmp(&b.0));
    let mut parts: Vec<&[u8]> = Vec::with_capacity(1 + parameters.len() * 2);
    parts.push(url.as_bytes());
    for (name, value) in &parameters {
        parts.push(name.as_bytes());
        parts.push(value.as_bytes());
    }
    if hmac_sha1_matches(channel.auth_token.expose().as_bytes(), &parts, &digest) {
        Ok(())
    } else {
        Err(Rejection("wrong signature"))
    }
}

pub fn read(body: &[u8]) -> Result<Inbound, BadPayload> {
    let parameters: Map<String, Json> = form_urlencoded::parse(body)
        .map(|(name, value)| (name.into_owned(), Json::String(value.into_owned())))
        .collect();
    let text = |name: &str| parameters.get(name).and_then(Json::as_str);
    let Some(sid) = text("MessageSid").or_else(|| text("SmsMessageSid")) else {
        return Err(BadPayload("the request has no `MessageSid`".to_owned()));
    };
    // A status callback (queued, sent, delivered...) reports on a message
    // sent earlier.
    if parameters.contains_key("MessageStatus") {
        return Ok(Inbound::Ignored("a status callback"));
    }
    let Some(body) = text("Body").filter(|body| !body.trim().is_empty()) else {
        return Ok(Inbound::Ignored("a message without text"));
    };
    let from = text("From")
        .filter(|from| !from.is_empty())
        .ok_or_else(|| BadPayload("the message has no `From`".to_owned()))?;
    let mut platform = Map::new();
    for (name, key) in [
        ("MessageSid", "message_sid"),
        ("AccountSid", "account_sid"),
        ("MessagingServiceSid", "messaging_service_sid"),
        ("From", "from"),
        ("To", "to"),
        ("NumMedia", "num_media"),
        ("ProfileName", "profile_name"),
        ("WaId", "wa_id"),
        ("FromCountry", "from_country"),
    ] {
        if let Some(value) = parameters.get(name) {
            platform.insert(key.to_owned(), value.clone());
        }
    }
    Ok(Inbound::Messages(vec![Message {
        id: Some(sid.to_owned()),
        text: body.to_owned(),
        user: from.to_owned(),
        conversation: from.to_owned(),
        platform,
        reply_to: ReplyTo::Response,
    }]))
}

/// The content type of TwiML.
pub const TWIML_CONTENT_TYPE: &str = "application/xml; charset=utf-8";

/// The TwiML answer: one `<Message>` with the reply, or none.
pub fn twiml(reply: Option<&str>) -> String {
    let mut document = String::from(r#"<?xml version="1.0" encoding="UTF-8"?><Response>"#);
    if let Some(reply) = reply.filter(|reply| !reply.is_empty()) {
        document.push_str("<Message>");
        for character in reply.chars() {
            match character {
                '&' => document.push_str("&amp;"),
                '<' => document.push_str("&lt;"),
                '>' => document.push_str("&gt;"),
                '"' => document.push_str("&quot;"),
                '\'' => document.push_str("&apos;"),
                // Control characters other than tab and newlines are not
                // allowed in XML 1.0.
                c if c.is_control() && !matches!(c, '\t' | '\n' | '\r') => {}
                c => document.push(c),
            }
        }
        document.push_str("</Message>");
    }
    document.push_str("</Response>");
    document
}

#[cfg(test)]
mod tests {
    use super::twiml;

    #[test]
    fn twiml_escapes_the_reply() {
        assert_eq!(
            twiml(Some("Fish & <chips>")),
            r#"<?xml version="1.0" encoding="UTF-8"?><Response><Message>Fish &amp; &lt;chips&gt;</Message></Response>"#
        );
        assert_eq!(
            twiml(None),
            r#"<?xml version="1.0" encoding="UTF-8"?><Response></Response>"#
        );
    }
}
