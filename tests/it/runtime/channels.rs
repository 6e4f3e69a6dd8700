//! Channels, end to end: messaging platforms' webhooks served by the real
//! binary at `/channels/{name}`, with fake platform APIs on `127.0.0.1:0`.
//!
//! Every test starts `mcp-orchestrator serve` on a copy of the shipped
//! project (every service on its mock unless a test points one at a stub),
//! with the channel's secrets in the environment and the platform's API URL
//! pointed at a `Stub` that records what the engine sends. The platforms'
//! signatures are computed here from each platform's documented algorithm
//! (HMAC-SHA256, HMAC-SHA1, hex, base64), never with the project's code, so
//! a test fails when the engine verifies something other than what the
//! platform really sends.
//!
//! The reply a platform receives for "Can I see the menu?" is compared with
//! the `reply_text` of `POST /orchestrate` on the same binary: the turn ran
//! through the flows, not through some canned answer.
//!
//! The platforms that expect a quick acknowledgement (Telegram, Slack,
//! WhatsApp, a webhook replying through a service) get their 200 at once and
//! the turn runs in the background, so a test that asserts that something
//! did *not* happen (no reply to a duplicate or to an ignored event) first
//! sends a fresh message, waits for its reply, then waits for `/health` to
//! show every turn run and the queue empty, and only then counts what the
//! fake API received.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{Value as Json, json};

use super::serve_binary::Served;
use super::{Received, Stub, http_client, json_response};
use crate::{repository_root, shipped_project_copy};

type HmacSha256 = Hmac<sha2::Sha256>;
type HmacSha1 = Hmac<sha1::Sha1>;

/// What the users say in every test: the shipped project answers it from
/// the menu mock, the same way every time.
const MENU_TEXT: &str = "Can I see the menu?";

/// How long the binary may take to say where it listens, on a loaded machine.
const START_DEADLINE: Duration = Duration::from_secs(60);
/// How long a test waits for something that happens in the background.
const DEADLINE: Duration = Duration::from_secs(20);
/// How often a test looks again.
const POLL: Duration = Duration::from_millis(20);

const JSON: &str = "application/json";
const FORM: &str = "application/x-www-form-urlencoded";

const TELEGRAM_SECRET: &str = "tg-secret-token-0123456789";
const TELEGRAM_BOT_TOKEN: &str = "123456:tg-bot-token-ABCdef";
const SLACK_SIGNING_SECRET: &str = "slack-signing-secret-0123456789";
const SLACK_BOT_TOKEN: &str = "xoxb-slack-bot-token-0123";
const WHATSAPP_VERIFY_TOKEN: &str = "wa-verify-token-0123";
const WHATSAPP_APP_SECRET: &str = "wa-app-secret-0123456789";
const WHATSAPP_ACCESS_TOKEN: &str = "wa-access-token-0123";
const TWILIO_AUTH_TOKEN: &str = "twilio-auth-token-0123456789";
/// What Twilio signs: the URL configured in Twilio, not the local address.
const TWILIO_PUBLIC_URL: &str = "https://example.test/channels/sms";
const PARTNER_SECRET: &str = "partner-secret-0123456789";

/// Two channels of the generic `webhook` kind, added to the project copy:
/// one answering in the response, one through a declared service.
const PARTNER_CHANNELS: &str = r#"channels:
  partner:
    kind: webhook
    verify: { hmac_sha256: { header: X-Signature, secret: "${PARTNER_SECRET}", prefix: "sha256=" } }
    request: { text: "{{ body.message.text }}", user_id: "{{ body.user.id }}", conversation: "{{ body.chat.id }}", message_id: "{{ body.id }}" }
    reply: { response: { text: "{{ reply_text }}", route: "{{ route }}" } }
  partner_async:
    kind: webhook
    verify: { hmac_sha256: { header: X-Signature, secret: "${PARTNER_SECRET}", prefix: "sha256=" } }
    request: { text: "{{ body.message.text }}", user_id: "{{ body.user.id }}", conversation: "{{ body.chat.id }}", message_id: "{{ body.id }}" }
    reply:
      call: partner_outbox
      body: { to: "{{ body.chat.id }}", text: "{{ reply_text }}" }
services:
  partner_outbox:
    url: "${PARTNER_OUTBOX_URL}"
    timeout: 5s
    retry: { attempts: 3, backoff: 50ms }
"#;

/// The binary, serving a project copy on its own port.
struct Running {
    /// Dropped first: the binary stops before its project directory goes.
    served: Served,
    client: reqwest::Client,
    _project: tempfile::TempDir,
}

/// A response, read whole.
#[derive(Debug)]
struct Reply {
    status: u16,
    content_type: String,
    text: String,
}

impl Reply {
    async fn read(response: reqwest::Response) -> Reply {
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|value| value.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let text = response.text().await.unwrap();
        Reply {
            status,
            content_type,
            text,
        }
    }

    /// The body as JSON (`Json::Null` when it is not JSON).
    fn json(&self) -> Json {
        serde_json::from_str(&self.text).unwrap_or(Json::Null)
    }
}

/// Starts `serve` on `project` in development, every service on its mock
/// unless `variables` sets its URL, and waits until it listens.
async fn start(project: tempfile::TempDir, variables: &[(&str, &str)]) -> Running {
    let dir = project.path().to_str().unwrap().to_owned();
    let mut all = vec![
        ("MCP_PROJECT_DIR", dir.as_str()),
        ("PER_USER_RATE", "100000/s"),
    ];
    all.extend_from_slice(variables);
    Running {
        served: Served::start(&all, START_DEADLINE).await,
        client: http_client(),
        _project: project,
    }
}

/// Telegram's variables, its API at `api_url`.
fn telegram_env(api_url: &str) -> Vec<(&'static str, &str)> {
    vec![
        ("TELEGRAM_SECRET_TOKEN", TELEGRAM_SECRET),
        ("TELEGRAM_BOT_TOKEN", TELEGRAM_BOT_TOKEN),
        ("TELEGRAM_API_URL", api_url),
    ]
}

/// Slack's variables, its API at `api_url`.
fn slack_env(api_url: &str) -> Vec<(&'static str, &str)> {
    vec![
        ("SLACK_SIGNING_SECRET", SLACK_SIGNING_SECRET),
        ("SLACK_BOT_TOKEN", SLACK_BOT_TOKEN),
        ("SLACK_API_URL", api_url),
    ]
}

/// A copy of the shipped project with the `partner` webhook channels.
fn project_with_partner_channels() -> tempfile::TempDir {
    let project = shipped_project_copy();
    std::fs::write(project.path().join("flows/partner.yaml"), PARTNER_CHANNELS).unwrap();
    project
}

impl Running {
    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.served.port)
    }

    /// The binary's last log lines, for failure messages.
    fn log(&self) -> String {
        let logged = self.served.logged();
        let from = logged.len().saturating_sub(40);
        logged[from..].join("\n")
    }

    async fn post(
        &self,
        path: &str,
        content_type: &str,
        headers: &[(&str, String)],
        body: &str,
    ) -> Reply {
        let mut request = self
            .client
            .post(self.url(path))
            .header("content-type", content_type)
            .body(body.to_owned());
        for (name, value) in headers {
            request = request.header(*name, value.as_str());
        }
        Reply::read(request.send().await.unwrap()).await
    }

    async fn get(&self, path_and_query: &str) -> Reply {
        let response = self
            .client
            .get(self.url(path_and_query))
            .send()
            .await
            .unwrap();
        Reply::read(response).await
    }

    /// `POST /channels/telegram` with the secret header when given.
    async fn telegram(&self, secret: Option<&str>, update: &Json) -> Reply {
        let headers: Vec<(&str, String)> = secret
            .map(|secret| ("X-Telegram-Bot-Api-Secret-Token", secret.to_owned()))
            .into_iter()
            .collect();
        self.post("/channels/telegram", JSON, &headers, &update.to_string())
            .await
    }

    /// The `reply_text` of `POST /orchestrate` saying `MENU_TEXT`: what every
    /// platform must receive for the same message.
    async fn orchestrated_reply(&self) -> String {
        let body = json!({"text": MENU_TEXT, "user_id": "x"}).to_string();
        let reply = self.post("/orchestrate", JSON, &[], &body).await;
        assert_eq!(reply.status, 200, "{reply:#?}");
        let envelope = reply.json();
        assert_eq!(envelope["route"], "menu", "{envelope:#}");
        let text = envelope["reply_text"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(!text.trim().is_empty(), "an empty reply: {envelope:#}");
        text
    }

    /// The channel's entry in `GET /health`.
    async fn channel(&self, name: &str) -> Json {
        let reply = self.get("/health").await;
        let health: Json = serde_json::from_str(&reply.text)
            .unwrap_or_else(|_| panic!("/health is not JSON: {reply:#?}"));
        health["channels"]
            .as_array()
            .and_then(|channels| channels.iter().find(|channel| channel["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no channel `{name}` in /health: {health:#}"))
    }

    /// Waits until the channel's counters in `/health` are as `expected`
    /// says: `counter=value` pairs separated by white space.
    async fn expect_stats(&self, name: &str, expected: &str) -> Json {
        let expected: Vec<(&str, u64)> = expected
            .split_whitespace()
            .map(|pair| {
                let (counter, value) = pair.split_once('=').unwrap();
                (counter, value.parse().unwrap())
            })
            .collect();
        let deadline = Instant::now() + DEADLINE;
        loop {
            let stats = self.channel(name).await;
            if expected
                .iter()
                .all(|(counter, value)| count(&stats, counter) == *value)
            {
                return stats;
            }
            if Instant::now() > deadline {
                panic!(
                    "the counters of channel `{name}` did not become {expected:?} within \
                     {DEADLINE:?}: {stats:#}\nlog:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until the channel has run `turns` turns and has nothing queued.
    async fn settle(&self, name: &str, turns: u64) -> Json {
        self.expect_stats(name, &format!("turns={turns} queue_depth=0"))
            .await
    }

    /// Waits until `stub` has received at least `count` requests.
    async fn wait_for_requests(&self, stub: &Stub, count: usize, what: &str) -> Vec<Received> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let received = stub.received();
            if received.len() >= count {
                return received;
            }
            if Instant::now() > deadline {
                panic!(
                    "{what}: {count} request(s) expected within {DEADLINE:?}, got \
                     {received:#?}\nlog:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// A counter of a channel's `/health` entry.
#[track_caller]
fn count(stats: &Json, counter: &str) -> u64 {
    stats[counter]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter `{counter}` in {stats:#}"))
}

#[track_caller]
fn assert_ok(reply: &Reply, what: &str) {
    assert_eq!(reply.status, 200, "{what}: {reply:#?}");
}

/// Refused as not coming from the platform: 401, problem+json.
#[track_caller]
fn assert_unauthorized(reply: &Reply, what: &str) {
    assert_eq!(reply.status, 401, "{what}: {reply:#?}");
    assert_problem(reply, 401, "unauthorized");
}

#[track_caller]
fn assert_problem(reply: &Reply, status: u16, code: &str) {
    assert_eq!(reply.status, status, "{reply:#?}");
    assert!(
        reply.content_type.starts_with("application/problem+json"),
        "{reply:#?}"
    );
    assert_eq!(reply.json()["code"], code, "{reply:#?}");
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn hmac_sha256_hex(secret: &str, data: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(data);
    hex(&mac.finalize().into_bytes())
}

/// Slack's headers: `v0=` + hex HMAC-SHA256 of `v0:{timestamp}:{body}`.
fn slack_headers(secret: &str, timestamp: u64, body: &str) -> Vec<(&'static str, String)> {
    let base = format!("v0:{timestamp}:{body}");
    vec![
        ("X-Slack-Request-Timestamp", timestamp.to_string()),
        (
            "X-Slack-Signature",
            format!("v0={}", hmac_sha256_hex(secret, base.as_bytes())),
        ),
    ]
}

/// Meta's header: `sha256=` + hex HMAC-SHA256 of the raw body.
fn whatsapp_headers(secret: &str, body: &str) -> Vec<(&'static str, String)> {
    vec![(
        "X-Hub-Signature-256",
        format!("sha256={}", hmac_sha256_hex(secret, body.as_bytes())),
    )]
}

/// The partner's header, as `partner.yaml` declares it.
fn partner_headers(secret: &str, body: &str) -> Vec<(&'static str, String)> {
    vec![(
        "X-Signature",
        format!("sha256={}", hmac_sha256_hex(secret, body.as_bytes())),
    )]
}

/// Twilio's header: base64 HMAC-SHA1 of the URL followed by every parameter,
/// sorted by name, as name and value.
fn twilio_headers(token: &str, url: &str, params: &[(&str, &str)]) -> Vec<(&'static str, String)> {
    let mut sorted = params.to_vec();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut data = url.to_owned();
    for (name, value) in sorted {
        data.push_str(name);
        data.push_str(value);
    }
    let mut mac = HmacSha1::new_from_slice(token.as_bytes()).unwrap();
    mac.update(data.as_bytes());
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    vec![("X-Twilio-Signature", signature)]
}

/// `application/x-www-form-urlencoded`, as Twilio sends it.
fn form_encode(params: &[(&str, &str)]) -> String {
    let component = |text: &str| {
        let mut out = String::new();
        for byte in text.bytes() {
            match byte {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                    out.push(char::from(byte));
                }
                b' ' => out.push('+'),
                _ => out.push_str(&format!("%{byte:02X}")),
            }
        }
        out
    };
    params
        .iter()
        .map(|(name, value)| format!("{}={}", component(name), component(value)))
        .collect::<Vec<_>>()
        .join("&")
}

/// XML text back to plain text: the five named entities and character
/// references.
fn xml_unescape(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find('&') {
        out.push_str(&rest[..start]);
        let after = &rest[start..];
        let end = after
            .find(';')
            .unwrap_or_else(|| panic!("a bare `&` in XML text: {text}"));
        let entity = &after[1..end];
        let decoded = match entity {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" => '\'',
            _ => {
                let code = if let Some(hex) = entity
                    .strip_prefix("#x")
                    .or_else(|| entity.strip_prefix("#X"))
                {
                    u32::from_str_radix(hex, 16).ok()
                } else {
                    entity.strip_prefix('#').and_then(|dec| dec.parse().ok())
                };
                code.and_then(char::from_u32)
                    .unwrap_or_else(|| panic!("unknown entity `&{entity};` in {text}"))
            }
        };
        out.push(decoded);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

/// The text of the one `<Message>` of a TwiML answer.
#[track_caller]
fn twiml_message(reply: &Reply) -> String {
    let open = "<Response><Message>";
    let close = "</Message></Response>";
    let start = reply
        .text
        .find(open)
        .unwrap_or_else(|| panic!("no `{open}` in {reply:#?}"))
        + open.len();
    let end = reply
        .text
        .find(close)
        .unwrap_or_else(|| panic!("no `{close}` in {reply:#?}"));
    let inner = &reply.text[start..end];
    assert!(!inner.contains('<'), "markup in the message: {reply:#?}");
    xml_unescape(inner)
}

#[track_caller]
fn assert_xml(reply: &Reply) {
    assert!(
        reply.content_type.starts_with("application/xml")
            || reply.content_type.starts_with("text/xml"),
        "not XML: {reply:#?}"
    );
}

/// A Telegram update with a message from user (and private chat) `user`;
/// without text, it carries a sticker.
fn telegram_message(update_id: u64, user: u64, text: Option<&str>, is_bot: bool) -> Json {
    let mut message = json!({
        "message_id": update_id,
        "from": {"id": user, "is_bot": is_bot, "first_name": "Ana"},
        "chat": {"id": user, "type": "private"},
        "date": 1_700_000_000,
    });
    match text {
        Some(text) => message["text"] = json!(text),
        None => message["sticker"] = json!({"file_id": "CAACAgIAAxkBAAE", "emoji": "🍕"}),
    }
    json!({"update_id": update_id, "message": message})
}

/// A Slack Events API callback around `event`.
fn slack_callback(event_id: &str, event: Json) -> String {
    json!({
        "type": "event_callback",
        "team_id": "T1",
        "event_id": event_id,
        "event_time": 1_700_000_000,
        "event": event,
    })
    .to_string()
}

/// A user's direct message to the Slack app in `channel`.
fn slack_message(channel: &str) -> Json {
    json!({"type": "message", "user": "U42", "text": MENU_TEXT, "channel": channel,
           "ts": "1700000000.000100", "channel_type": "im"})
}

/// A WhatsApp Cloud API delivery with one change, whose `value` is given.
fn whatsapp_delivery(value: Json) -> String {
    json!({
        "object": "whatsapp_business_account",
        "entry": [{"id": "WABA1", "changes": [{"field": "messages", "value": value}]}],
    })
    .to_string()
}

fn whatsapp_metadata() -> Json {
    json!({"display_phone_number": "15550001111", "phone_number_id": "PN123"})
}

/// A partner webhook payload.
fn partner_payload(id: &str, chat: &str) -> String {
    json!({"id": id, "message": {"text": MENU_TEXT}, "user": {"id": "p-9"}, "chat": {"id": chat}})
        .to_string()
}

/// Telegram: the secret header is checked, updates that are not a user's
/// text (an edit, a bot's message, a sticker) are acknowledged and ignored,
/// an update Telegram redelivers runs once, and the reply goes out through
/// `sendMessage` with the flows' answer. Telegram redelivers whatever it did
/// not see acknowledged, so a duplicate answered twice would reach the user
/// twice.
#[cfg(unix)]
#[tokio::test]
async fn telegram_verifies_ignores_deduplicates_and_replies_with_the_flows_answer() {
    let api = Stub::json(200, json!({"ok": true, "result": {"message_id": 1}})).await;
    let api_url = api.url();
    let running = start(shipped_project_copy(), &telegram_env(&api_url)).await;
    let telegram = running.channel("telegram").await;
    assert_eq!(telegram["kind"], "telegram", "{telegram:#}");
    assert_eq!(telegram["enabled"], true, "{telegram:#}");
    // Its secrets are unset: declared, but disabled.
    let slack = running.channel("slack").await;
    assert_eq!(slack["enabled"], false, "{slack:#}");
    let expected = running.orchestrated_reply().await;

    // Not from Telegram: a wrong secret, or none.
    let update = telegram_message(1000, 42, Some(MENU_TEXT), false);
    assert_problem(
        &running.telegram(Some("not-the-secret"), &update).await,
        401,
        "unauthorized",
    );
    assert_problem(&running.telegram(None, &update).await, 401, "unauthorized");

    let edited = json!({"update_id": 1001, "edited_message": {
        "message_id": 5, "from": {"id": 42, "is_bot": false, "first_name": "Ana"},
        "chat": {"id": 42, "type": "private"}, "date": 1_700_000_000,
        "edit_date": 1_700_000_100, "text": "Can I see the menu, please?"}});
    let ignored = [
        ("an edited message", edited),
        (
            "a bot's message",
            telegram_message(1002, 77, Some(MENU_TEXT), true),
        ),
        ("a sticker", telegram_message(1003, 42, None, false)),
    ];
    for (what, update) in &ignored {
        assert_ok(&running.telegram(Some(TELEGRAM_SECRET), update).await, what);
    }

    // Delivered three times: acknowledged each time, answered once.
    let update = telegram_message(1010, 42, Some(MENU_TEXT), false);
    for delivery in 1..=3 {
        let reply = running.telegram(Some(TELEGRAM_SECRET), &update).await;
        assert_ok(&reply, &format!("delivery {delivery} of update 1010"));
    }
    running
        .wait_for_requests(&api, 1, "the reply to update 1010")
        .await;
    // A fresh message from someone else; once it is answered and the queue
    // is empty, nothing else is on its way.
    let fresh = telegram_message(1011, 43, Some(MENU_TEXT), false);
    assert_ok(
        &running.telegram(Some(TELEGRAM_SECRET), &fresh).await,
        "update 1011",
    );
    running
        .wait_for_requests(&api, 2, "the reply to update 1011")
        .await;
    running.settle("telegram", 2).await;
    running
        .expect_stats(
            "telegram",
            "received=9 verification_failures=2 duplicates=2 ignored=3 \
             turns=2 replies=2 outbound_failures=0 queue_depth=0",
        )
        .await;

    let sent = api.received();
    assert_eq!(sent.len(), 2, "{sent:#?}");
    for request in &sent {
        assert_eq!(request.method, "POST", "{request:#?}");
        assert_eq!(
            request.path,
            format!("/bot{TELEGRAM_BOT_TOKEN}/sendMessage"),
            "{request:#?}"
        );
        assert_eq!(request.body["text"], expected.as_str(), "{request:#?}");
    }
    let mut chats: Vec<u64> = sent
        .iter()
        .map(|request| {
            request.body["chat_id"]
                .as_u64()
                .unwrap_or_else(|| panic!("chat_id is not the chat's number: {request:#?}"))
        })
        .collect();
    chats.sort_unstable();
    assert_eq!(chats, [42, 43]);
}

/// Telegram: a `sendMessage` that fails (500 twice) is retried with the same
/// body until the API accepts it; the reply then counts as delivered once,
/// not as a failure. A platform's brief outage must not lose the answer.
#[cfg(unix)]
#[tokio::test]
async fn telegram_retries_a_failed_send_until_the_api_accepts_it() {
    let api = Stub::start(|n, _| async move {
        if n <= 2 {
            json_response(
                500,
                json!({"ok": false, "error_code": 500, "description": "Internal Server Error"}),
            )
        } else {
            json_response(200, json!({"ok": true, "result": {"message_id": 1}}))
        }
    })
    .await;
    let api_url = api.url();
    let running = start(shipped_project_copy(), &telegram_env(&api_url)).await;

    let update = telegram_message(2001, 42, Some(MENU_TEXT), false);
    assert_ok(
        &running.telegram(Some(TELEGRAM_SECRET), &update).await,
        "the update",
    );
    running
        .wait_for_requests(&api, 3, "two failed attempts and a third that succeeds")
        .await;
    running
        .expect_stats(
            "telegram",
            "turns=1 replies=1 outbound_failures=0 queue_depth=0",
        )
        .await;

    let sent = api.received();
    assert_eq!(sent.len(), 3, "{sent:#?}");
    for request in &sent {
        assert_eq!(
            request.path,
            format!("/bot{TELEGRAM_BOT_TOKEN}/sendMessage"),
            "{request:#?}"
        );
        assert_eq!(request.body, sent[0].body, "{sent:#?}");
    }
    assert_eq!(sent[0].body["chat_id"], 42, "{sent:#?}");
    assert!(
        sent[0].body["text"]
            .as_str()
            .is_some_and(|text| !text.is_empty()),
        "{sent:#?}"
    );
}

/// Slack: every request is signed over its timestamp and raw body, and a
/// stale timestamp is refused even when correctly signed (a replayed
/// request); the URL verification answers the challenge; bots' messages
/// (the app's own replies among them) are ignored, or the app would talk to
/// itself; a user's message is answered with `chat.postMessage` in its
/// channel, with the bot token.
#[cfg(unix)]
#[tokio::test]
async fn slack_checks_signature_and_age_answers_the_challenge_and_posts_the_reply() {
    let api = Stub::json(200, json!({"ok": true})).await;
    let api_url = api.url();
    let running = start(shipped_project_copy(), &slack_env(&api_url)).await;
    let expected = running.orchestrated_reply().await;

    let challenge =
        json!({"type": "url_verification", "challenge": "abc123", "token": "x"}).to_string();
    let signed = slack_headers(SLACK_SIGNING_SECRET, now(), &challenge);
    let reply = running
        .post("/channels/slack", JSON, &signed, &challenge)
        .await;
    assert_ok(&reply, "the URL verification");
    assert!(reply.content_type.starts_with(JSON), "{reply:#?}");
    assert_eq!(reply.json()["challenge"], "abc123", "{reply:#?}");

    let event = slack_callback("Ev01", slack_message("C7"));
    let forged = slack_headers("not-the-secret", now(), &event);
    let stale_time = now() - 600;
    let stale = slack_headers(SLACK_SIGNING_SECRET, stale_time, &event);
    // Signed over another body: the text was changed on the way.
    let tampered = event.replace(MENU_TEXT, "Cancel my order");
    assert_ne!(tampered, event);
    let for_other_body = slack_headers(SLACK_SIGNING_SECRET, now(), &tampered);
    for (what, headers) in [
        ("a wrong secret", forged),
        ("a stale timestamp", stale),
        ("no signature", Vec::new()),
        ("another body's signature", for_other_body),
    ] {
        let reply = running
            .post("/channels/slack", JSON, &headers, &event)
            .await;
        assert_unauthorized(&reply, what);
    }

    // Whether the URL verification counts as ignored is not the point here.
    let ignored = count(&running.channel("slack").await, "ignored") + 2;
    let from_a_bot = slack_callback(
        "Ev02",
        json!({"type": "message", "bot_id": "B1", "text": MENU_TEXT, "channel": "C7",
               "ts": "1700000000.000200", "channel_type": "im"}),
    );
    let bot_message = slack_callback(
        "Ev03",
        json!({"type": "message", "subtype": "bot_message", "bot_id": "B1", "text": MENU_TEXT,
               "channel": "C7", "ts": "1700000000.000300", "channel_type": "im"}),
    );
    for (what, body) in [("a bot_id", from_a_bot), ("a bot_message", bot_message)] {
        let headers = slack_headers(SLACK_SIGNING_SECRET, now(), &body);
        let reply = running.post("/channels/slack", JSON, &headers, &body).await;
        assert_ok(&reply, what);
    }

    let headers = slack_headers(SLACK_SIGNING_SECRET, now(), &event);
    assert_ok(
        &running
            .post("/channels/slack", JSON, &headers, &event)
            .await,
        "the user's message",
    );
    running
        .wait_for_requests(&api, 1, "the reply in channel C7")
        .await;
    running.settle("slack", 1).await;
    running
        .expect_stats(
            "slack",
            &format!(
                "received=8 verification_failures=4 ignored={ignored} duplicates=0 \
                 turns=1 replies=1 outbound_failures=0"
            ),
        )
        .await;

    let request = api.only_request();
    assert_eq!(request.method, "POST", "{request:#?}");
    assert_eq!(request.path, "/chat.postMessage", "{request:#?}");
    assert_eq!(
        request.header("authorization"),
        Some(format!("Bearer {SLACK_BOT_TOKEN}").as_str()),
        "{request:#?}"
    );
    assert_eq!(request.body["channel"], "C7", "{request:#?}");
    assert_eq!(request.body["text"], expected.as_str(), "{request:#?}");
}

/// Slack retries an event it has not seen acknowledged within 3 seconds, so
/// the acknowledgement must not wait for the turn: with the menu service
/// taking 2 seconds, the event is answered well before, and the reply is
/// posted once the slow service has answered.
#[cfg(unix)]
#[tokio::test]
async fn slack_acknowledges_an_event_before_a_slow_turn_finishes() {
    const MENU_DELAY: Duration = Duration::from_secs(2);
    let menu_text = std::fs::read_to_string(repository_root().join("mocks/menu.json")).unwrap();
    let menu: Json = serde_json::from_str(&menu_text).unwrap();
    let menu_service = Stub::start(move |_, _| {
        let menu = menu.clone();
        async move {
            tokio::time::sleep(MENU_DELAY).await;
            json_response(200, menu)
        }
    })
    .await;
    let api = Stub::json(200, json!({"ok": true})).await;
    let (menu_url, api_url) = (menu_service.url(), api.url());
    let mut variables = slack_env(&api_url);
    variables.push(("MENU_SERVICE_URL", menu_url.as_str()));
    let running = start(shipped_project_copy(), &variables).await;

    let event = slack_callback("Ev10", slack_message("C8"));
    let headers = slack_headers(SLACK_SIGNING_SECRET, now(), &event);
    let sent_at = Instant::now();
    let reply = running
        .post("/channels/slack", JSON, &headers, &event)
        .await;
    let acknowledged = sent_at.elapsed();
    assert_ok(&reply, "the event");
    assert!(
        acknowledged < MENU_DELAY * 3 / 4,
        "the event was answered after {acknowledged:?}, with a menu service taking \
         {MENU_DELAY:?}: the acknowledgement waited for the turn"
    );

    let sent = running
        .wait_for_requests(&api, 1, "the reply after the slow menu service")
        .await;
    assert!(
        sent_at.elapsed() >= MENU_DELAY,
        "the reply did not wait for the menu service"
    );
    assert!(
        !menu_service.received().is_empty(),
        "the turn did not call the menu service"
    );
    running.settle("slack", 1).await;
    running
        .expect_stats("slack", "replies=1 outbound_failures=0")
        .await;

    // The same binary, through `/orchestrate` (slow too): the same answer.
    let expected = running.orchestrated_reply().await;
    assert_eq!(sent.len(), 1, "{sent:#?}");
    assert_eq!(sent[0].path, "/chat.postMessage", "{sent:#?}");
    assert_eq!(sent[0].body["channel"], "C8", "{sent:#?}");
    assert_eq!(sent[0].body["text"], expected.as_str(), "{sent:#?}");
}

/// WhatsApp (Meta's Cloud API): the subscription handshake echoes the
/// challenge only for the right verify token; every delivery is signed with
/// the app secret; status updates (delivered, read) of the app's own
/// messages are ignored; a user's text is answered through
/// `/{phone_number_id}/messages` with the access token.
#[cfg(unix)]
#[tokio::test]
async fn whatsapp_handshake_signature_statuses_and_reply() {
    let api = Stub::json(
        200,
        json!({"messaging_product": "whatsapp",
               "contacts": [{"input": "34600111222", "wa_id": "34600111222"}],
               "messages": [{"id": "wamid.OUT"}]}),
    )
    .await;
    let api_url = api.url();
    let running = start(
        shipped_project_copy(),
        &[
            ("WHATSAPP_VERIFY_TOKEN", WHATSAPP_VERIFY_TOKEN),
            ("WHATSAPP_APP_SECRET", WHATSAPP_APP_SECRET),
            ("WHATSAPP_ACCESS_TOKEN", WHATSAPP_ACCESS_TOKEN),
            ("WHATSAPP_API_URL", api_url.as_str()),
        ],
    )
    .await;
    let expected = running.orchestrated_reply().await;

    let handshake = |token: &str| {
        format!(
            "/channels/whatsapp?hub.mode=subscribe&hub.verify_token={token}\
             &hub.challenge=1158201444"
        )
    };
    let reply = running.get(&handshake(WHATSAPP_VERIFY_TOKEN)).await;
    assert_ok(&reply, "the handshake");
    assert_eq!(reply.text, "1158201444", "{reply:#?}");
    let reply = running.get(&handshake("not-the-token")).await;
    assert_eq!(reply.status, 401, "{reply:#?}");
    assert!(!reply.text.contains("1158201444"), "{reply:#?}");
    // The POSTs' failures, whether or not the handshake's counted.
    let failures = count(&running.channel("whatsapp").await, "verification_failures") + 2;

    let message = whatsapp_delivery(json!({
        "messaging_product": "whatsapp",
        "metadata": whatsapp_metadata(),
        "contacts": [{"profile": {"name": "Ana"}, "wa_id": "34600111222"}],
        "messages": [{"from": "34600111222", "id": "wamid.ABC", "timestamp": "1700000000",
                      "type": "text", "text": {"body": MENU_TEXT}}],
    }));
    let forged = whatsapp_headers("not-the-secret", &message);
    for (what, headers) in [("a wrong secret", forged), ("no signature", Vec::new())] {
        let reply = running
            .post("/channels/whatsapp", JSON, &headers, &message)
            .await;
        assert_unauthorized(&reply, what);
    }

    let status = whatsapp_delivery(json!({
        "messaging_product": "whatsapp",
        "metadata": whatsapp_metadata(),
        "statuses": [{"id": "wamid.OUT", "status": "delivered", "timestamp": "1700000001",
                      "recipient_id": "34600111222"}],
    }));
    let headers = whatsapp_headers(WHATSAPP_APP_SECRET, &status);
    assert_ok(
        &running
            .post("/channels/whatsapp", JSON, &headers, &status)
            .await,
        "a status update",
    );

    let headers = whatsapp_headers(WHATSAPP_APP_SECRET, &message);
    assert_ok(
        &running
            .post("/channels/whatsapp", JSON, &headers, &message)
            .await,
        "the user's message",
    );
    running
        .wait_for_requests(&api, 1, "the reply to wamid.ABC")
        .await;
    running.settle("whatsapp", 1).await;
    running
        .expect_stats(
            "whatsapp",
            &format!(
                "received=4 verification_failures={failures} ignored=1 duplicates=0 \
                 turns=1 replies=1 outbound_failures=0"
            ),
        )
        .await;

    let request = api.only_request();
    assert_eq!(request.method, "POST", "{request:#?}");
    assert_eq!(request.path, "/PN123/messages", "{request:#?}");
    assert_eq!(
        request.header("authorization"),
        Some(format!("Bearer {WHATSAPP_ACCESS_TOKEN}").as_str()),
        "{request:#?}"
    );
    assert_eq!(
        request.body["messaging_product"], "whatsapp",
        "{request:#?}"
    );
    assert_eq!(request.body["to"], "34600111222", "{request:#?}");
    assert_eq!(request.body["type"], "text", "{request:#?}");
    assert_eq!(
        request.body["text"]["body"],
        expected.as_str(),
        "{request:#?}"
    );
}

/// SMS through Twilio: the form is signed over the public URL configured in
/// Twilio (not the address the request reached, which differs behind any
/// proxy), the reply is the TwiML of the same HTTP answer, a redelivered
/// `MessageSid` gets an empty TwiML (no second SMS), and a delivery status
/// callback is acknowledged and ignored.
#[cfg(unix)]
#[tokio::test]
async fn sms_through_twilio_is_signed_over_the_public_url_and_answered_in_twiml() {
    let running = start(
        shipped_project_copy(),
        &[
            ("TWILIO_AUTH_TOKEN", TWILIO_AUTH_TOKEN),
            ("TWILIO_PUBLIC_URL", TWILIO_PUBLIC_URL),
        ],
    )
    .await;
    let expected = running.orchestrated_reply().await;

    let message = [
        ("MessageSid", "SM1"),
        ("AccountSid", "AC1"),
        ("From", "+15551230000"),
        ("To", "+15559870000"),
        ("Body", MENU_TEXT),
        ("NumMedia", "0"),
    ];
    let body = form_encode(&message);
    let local_url = running.url("/channels/sms");
    for (what, headers) in [
        (
            "signed over the local URL",
            twilio_headers(TWILIO_AUTH_TOKEN, &local_url, &message),
        ),
        (
            "a wrong auth token",
            twilio_headers("not-the-token", TWILIO_PUBLIC_URL, &message),
        ),
    ] {
        let reply = running.post("/channels/sms", FORM, &headers, &body).await;
        assert_unauthorized(&reply, what);
    }

    let signed = twilio_headers(TWILIO_AUTH_TOKEN, TWILIO_PUBLIC_URL, &message);
    let reply = running.post("/channels/sms", FORM, &signed, &body).await;
    assert_ok(&reply, "the SMS");
    assert_xml(&reply);
    assert_eq!(twiml_message(&reply), expected, "{reply:#?}");

    // Twilio retried: no second message.
    let again = running.post("/channels/sms", FORM, &signed, &body).await;
    assert_ok(&again, "the SMS again");
    assert_xml(&again);
    assert!(again.text.contains("<Response"), "{again:#?}");
    assert!(!again.text.contains("<Message"), "{again:#?}");

    let status = [
        ("MessageSid", "SM2"),
        ("AccountSid", "AC1"),
        ("From", "+15559870000"),
        ("To", "+15551230000"),
        ("MessageStatus", "delivered"),
    ];
    let headers = twilio_headers(TWILIO_AUTH_TOKEN, TWILIO_PUBLIC_URL, &status);
    let reply = running
        .post("/channels/sms", FORM, &headers, &form_encode(&status))
        .await;
    assert_ok(&reply, "the status callback");
    assert!(!reply.text.contains("<Message"), "{reply:#?}");

    let sms = running.channel("sms").await;
    assert_eq!(sms["kind"], "twilio", "{sms:#}");
    running
        .expect_stats(
            "sms",
            "received=5 verification_failures=2 duplicates=1 ignored=1 \
             turns=1 replies=1 outbound_failures=0 queue_depth=0",
        )
        .await;
}

/// The generic `webhook` kind, declared in the project: a payload signed
/// with the partner's secret becomes a turn through the request templates;
/// `partner` answers with the reply template in the same response,
/// `partner_async` acknowledges at once and sends the reply to a declared
/// service, once per message id however often the partner redelivers.
#[cfg(unix)]
#[tokio::test]
async fn generic_webhook_answers_in_the_response_or_through_a_declared_service() {
    let outbox = Stub::json(200, json!({"ok": true})).await;
    let outbox_url = outbox.url();
    let running = start(
        project_with_partner_channels(),
        &[
            ("PARTNER_SECRET", PARTNER_SECRET),
            ("PARTNER_OUTBOX_URL", outbox_url.as_str()),
        ],
    )
    .await;
    let partner = running.channel("partner").await;
    assert_eq!(partner["kind"], "webhook", "{partner:#}");
    assert_eq!(partner["enabled"], true, "{partner:#}");
    let expected = running.orchestrated_reply().await;

    let payload = partner_payload("m-1", "c-9");
    let forged = partner_headers("not-the-secret", &payload);
    let reply = running
        .post("/channels/partner", JSON, &forged, &payload)
        .await;
    assert_problem(&reply, 401, "unauthorized");
    let reply = running
        .post("/channels/partner_async", JSON, &[], &payload)
        .await;
    assert_problem(&reply, 401, "unauthorized");

    let signed = partner_headers(PARTNER_SECRET, &payload);
    let reply = running
        .post("/channels/partner", JSON, &signed, &payload)
        .await;
    assert_ok(&reply, "the synchronous partner");
    assert!(reply.content_type.starts_with(JSON), "{reply:#?}");
    assert_eq!(
        reply.json(),
        json!({"text": expected, "route": "menu"}),
        "{reply:#?}"
    );

    // Its own ids, so no deduplication across channels can play a part.
    let payload = partner_payload("a-1", "c-9");
    let signed = partner_headers(PARTNER_SECRET, &payload);
    for delivery in 1..=3 {
        let reply = running
            .post("/channels/partner_async", JSON, &signed, &payload)
            .await;
        assert_ok(&reply, &format!("delivery {delivery} of a-1"));
    }
    running
        .wait_for_requests(&outbox, 1, "the reply to a-1 in the outbox")
        .await;
    let fresh = partner_payload("a-2", "c-10");
    let signed = partner_headers(PARTNER_SECRET, &fresh);
    assert_ok(
        &running
            .post("/channels/partner_async", JSON, &signed, &fresh)
            .await,
        "a-2",
    );
    running
        .wait_for_requests(&outbox, 2, "the reply to a-2 in the outbox")
        .await;
    running.settle("partner_async", 2).await;
    running
        .expect_stats(
            "partner_async",
            "received=5 verification_failures=1 duplicates=2 \
             turns=2 replies=2 outbound_failures=0",
        )
        .await;
    running
        .expect_stats(
            "partner",
            "received=2 verification_failures=1 turns=1 replies=1",
        )
        .await;

    let sent = outbox.received();
    assert_eq!(sent.len(), 2, "{sent:#?}");
    let mut bodies: Vec<Json> = sent
        .iter()
        .inspect(|request| assert_eq!(request.method, "POST", "{request:#?}"))
        .map(|request| request.body.clone())
        .collect();
    bodies.sort_by_key(|body| body["to"].as_str().unwrap_or_default().to_owned());
    assert_eq!(
        bodies,
        [
            json!({"to": "c-10", "text": expected}),
            json!({"to": "c-9", "text": expected}),
        ]
    );
}

/// A declared channel whose secrets are unset is disabled outside
/// production: it answers 404 like a route that does not exist (it neither
/// runs turns nor reveals that it is declared), as does a name that is not
/// declared at all.
#[cfg(unix)]
#[tokio::test]
async fn disabled_and_undeclared_channels_are_not_found() {
    let running = start(shipped_project_copy(), &[]).await;
    let telegram = running.channel("telegram").await;
    assert_eq!(telegram["enabled"], false, "{telegram:#}");

    let update = telegram_message(3001, 42, Some(MENU_TEXT), false);
    let reply = running.telegram(Some("anything"), &update).await;
    assert_problem(&reply, 404, "not_found");
    let reply = running.telegram(None, &update).await;
    assert_problem(&reply, 404, "not_found");

    let reply = running
        .post("/channels/nope", JSON, &[], &update.to_string())
        .await;
    assert_problem(&reply, 404, "not_found");

    let reply = running
        .get("/channels/whatsapp?hub.mode=subscribe&hub.verify_token=&hub.challenge=1158201444")
        .await;
    assert_problem(&reply, 404, "not_found");
    assert!(!reply.text.contains("1158201444"), "{reply:#?}");

    let telegram = running.channel("telegram").await;
    assert_eq!(count(&telegram, "turns"), 0, "{telegram:#}");
}

/// A webhook answered in the response whose turn fails (here its reply
/// template reads a field this payload lacks) is answered 500 and not
/// recorded as seen: the sender's next attempt of the same id runs.
#[cfg(unix)]
#[tokio::test]
async fn a_failed_synchronous_delivery_runs_again_when_the_sender_retries() {
    let project = shipped_project_copy();
    std::fs::write(
        project.path().join("flows/fragile.yaml"),
        r#"channels:
  fragile:
    kind: webhook
    verify: { token: { header: X-Token, value: "${PARTNER_SECRET}" } }
    request: { text: "{{ body.text }}", user_id: "{{ body.user }}", message_id: "{{ body.id }}" }
    reply: { response: { text: "{{ reply_text }}", note: "{{ body.extra.note }}" } }
"#,
    )
    .unwrap();
    let running = start(project, &[("PARTNER_SECRET", PARTNER_SECRET)]).await;
    let token = [("X-Token", PARTNER_SECRET.to_owned())];
    let without_extra = json!({"id": "f-1", "text": MENU_TEXT, "user": "u-1"}).to_string();
    let failed = running
        .post("/channels/fragile", JSON, &token, &without_extra)
        .await;
    assert_problem(&failed, 500, "template_error");
    let with_extra =
        json!({"id": "f-1", "text": MENU_TEXT, "user": "u-1", "extra": {"note": "n"}}).to_string();
    // The forgetting runs right after the 500 is sent: poll until the retry
    // is answered with the reply.
    let deadline = std::time::Instant::now() + DEADLINE;
    let answered = loop {
        let retried = running
            .post("/channels/fragile", JSON, &token, &with_extra)
            .await;
        assert_ok(&retried, "the retry");
        if retried.json().get("note").is_some() {
            break retried;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the retry was taken for a duplicate: {retried:?}\n{}",
            running.log()
        );
        tokio::time::sleep(POLL).await;
    };
    assert_eq!(answered.json()["note"], "n");
    assert_eq!(answered.json()["text"], running.orchestrated_reply().await);
    let stats = running.channel("fragile").await;
    assert_eq!(count(&stats, "turn_failures"), 1, "{stats:#}");
    assert_eq!(count(&stats, "replies"), 1, "{stats:#}");
}

/// `/orchestrate` may not act for a channel's users: `user_id` or
/// `session_id` starting with `<channel>:` is refused unless the caller key
/// names that channel.
#[cfg(unix)]
#[tokio::test]
async fn orchestrate_cannot_reach_the_sessions_of_a_channel() {
    let project = shipped_project_copy();
    let key = "channel-bridge-key-0123456789";
    std::fs::write(
        project.path().join("flows/access.yaml"),
        format!(
            "access:\n  api_keys:\n    - {{ name: bridge, key: \"{key}\", channels: [web, telegram] }}\n    - {{ name: web, key: \"web-only-key-0123456789\", channels: [web] }}\n"
        ),
    )
    .unwrap();
    let mut variables = telegram_env("http://127.0.0.1:9");
    variables.push(("PER_USER_RATE", "100000/s"));
    let running = start(project, &variables).await;
    let send = |key: &'static str, body: Json| {
        let request = running
            .client
            .post(running.url("/orchestrate"))
            .bearer_auth(key)
            .json(&body);
        async move { Reply::read(request.send().await.unwrap()).await }
    };
    for body in [
        json!({"text": MENU_TEXT, "user_id": "telegram:42"}),
        json!({"text": MENU_TEXT, "user_id": "u-1", "session_id": "telegram:42"}),
    ] {
        let refused = send("web-only-key-0123456789", body).await;
        assert_problem(&refused, 403, "forbidden");
    }
    let allowed = send(key, json!({"text": MENU_TEXT, "user_id": "telegram:42"})).await;
    assert_ok(&allowed, "a key that names the channel");
    // Ids that only look alike are not the channel's.
    let other = send(
        "web-only-key-0123456789",
        json!({"text": MENU_TEXT, "user_id": "telegrammer:1", "session_id": "u-1:telegram"}),
    )
    .await;
    assert_ok(&other, "ids of another shape");
}
