//! Logs, Loki and metrics: lines pushed to a fake Loki on `127.0.0.1:0`
//! carry the turn's fields with few-valued labels only, payloads are
//! redacted, no secret reaches a line, `/health` or an error body; with Loki
//! down or slow every request is answered and the buffer stays within its
//! bound; `/metrics` is Prometheus text naming every metric the dashboard
//! uses.
//!
//! The subscriber under test is installed for the test's thread only
//! (`tracing::subscriber::set_default`), on Tokio's current-thread runtime,
//! so every event of the requests reaches it and tests do not see each
//! other's lines (see `keep_callsites_interested`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use futures_util::future::join_all;
use mcp_orchestrator::intent::{LlmClassifier, LlmConnection};
use mcp_orchestrator::reload::{Reloader, Source};
use mcp_orchestrator::server::Environment;
use mcp_orchestrator::telemetry::loki::{self, LokiConfig, LokiHandle, LokiLimits, LokiSender};
use mcp_orchestrator::telemetry::{self, JsonLineLayer, prometheus};
use serde_json::{Value as Json, json};
use tracing_subscriber::layer::SubscriberExt;

use super::{
    Harness, HarnessOptions, Stub, closed_port_url, http_client, json_response, turn_request,
};
use crate::{repository_root, shipped_project_copy, test_environment};

const LOKI_USER: &str = "123456";
const LOKI_TOKEN: &str = "glc_loki-token-must-never-be-logged";

/// The Loki shipping under test, installed as the thread's subscriber.
struct LokiUnderTest {
    sender: LokiSender,
    handle: LokiHandle,
    _guard: tracing::subscriber::DefaultGuard,
}

impl LokiUnderTest {
    /// Ships the thread's events at `level` (with payloads when
    /// `payloads`) to `url`.
    fn start(url: &str, limits: LokiLimits, level: &str, payloads: bool) -> LokiUnderTest {
        super::keep_callsites_interested();
        let mut config = LokiConfig::new(
            url,
            Some(LOKI_USER.to_owned()),
            Some(LOKI_TOKEN.to_owned()),
            "mcp_orchestrator".to_owned(),
            "test".to_owned(),
        )
        .unwrap();
        config.limits = limits;
        let (sender, worker) = loki::channel(config);
        let subscriber = tracing_subscriber::registry()
            .with(telemetry::filter(level, payloads).unwrap())
            .with(JsonLineLayer::new(false, Some(sender.clone())));
        let guard = tracing::subscriber::set_default(subscriber);
        // Callsites first hit before this subscriber existed.
        tracing::callsite::rebuild_interest_cache();
        let handle = worker.spawn(http_client());
        LokiUnderTest {
            sender,
            handle,
            _guard: guard,
        }
    }
}

/// Limits small enough for a test to fill the buffer.
fn small_limits() -> LokiLimits {
    LokiLimits {
        buffer_lines: 256,
        buffer_bytes: 256 * 1024,
        batch_lines: 64,
        batch_age: Duration::from_millis(50),
        min_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        flush_deadline: Duration::from_millis(200),
        ..LokiLimits::default()
    }
}

/// Limits for tests that expect every line: the shutdown flush may take
/// as long as a loaded machine needs (it ends as soon as the lines are
/// pushed).
fn roomy_limits() -> LokiLimits {
    LokiLimits {
        batch_age: Duration::from_millis(50),
        flush_deadline: Duration::from_secs(60),
        ..LokiLimits::default()
    }
}

/// A fake Loki that accepts every push.
async fn accepting_loki() -> Stub {
    Stub::start(|_, _| async { json_response(204, Json::Null) }).await
}

/// One pushed line: its stream's labels, the line as JSON, its structured
/// metadata.
#[derive(Debug)]
struct Pushed {
    labels: BTreeMap<String, String>,
    line: Json,
    raw: String,
    metadata: Json,
}

/// Every line the fake Loki received, in order.
fn pushed_lines(loki: &Stub) -> Vec<Pushed> {
    let mut lines = Vec::new();
    for request in loki.received() {
        assert_eq!(request.method, "POST");
        assert_eq!(request.path, "/loki/api/v1/push");
        for stream in request.body["streams"].as_array().unwrap() {
            let labels: BTreeMap<String, String> =
                serde_json::from_value(stream["stream"].clone()).unwrap();
            for value in stream["values"].as_array().unwrap() {
                let raw = value[1].as_str().unwrap().to_owned();
                lines.push(Pushed {
                    labels: labels.clone(),
                    line: serde_json::from_str(&raw)
                        .unwrap_or_else(|error| panic!("not JSON ({error}): {raw}")),
                    raw,
                    metadata: value.get(2).cloned().unwrap_or(Json::Null),
                });
            }
        }
    }
    lines
}

/// The one line with `event_type` and `trace_id`.
#[track_caller]
fn line_of<'a>(lines: &'a [Pushed], event_type: &str, trace_id: &str) -> &'a Pushed {
    let found: Vec<&Pushed> = lines
        .iter()
        .filter(|p| p.line["event_type"] == event_type && p.line["trace_id"] == trace_id)
        .collect();
    assert_eq!(found.len(), 1, "{event_type} of {trace_id} in {lines:#?}");
    found[0]
}

#[tokio::test]
async fn lines_reach_loki_with_few_valued_labels_and_the_turn_in_the_line() {
    let fake = accepting_loki().await;
    let loki = LokiUnderTest::start(&fake.url(), roomy_limits(), "info", false);
    let harness = Harness::shipped();
    for (index, text) in ["show me the menu", "track my order ORD-7", "hello"]
        .iter()
        .enumerate()
    {
        harness
            .turn(json!({
                "text": text, "user_id": format!("user-{index}"), "channel": "voice",
                "session_id": format!("session-{index}"), "trace_id": format!("trace-{index}"),
            }))
            .await;
    }
    let stats = loki.handle.shutdown().await;
    assert_eq!(stats.dropped, 0, "{stats:?}");
    assert_eq!(stats.held_lines, 0, "{stats:?}");

    let received = fake.received();
    assert!(!received.is_empty());
    let expected_auth = format!(
        "Basic {}",
        base64_encode(format!("{LOKI_USER}:{LOKI_TOKEN}").as_bytes())
    );
    for request in &received {
        assert_eq!(
            request.header("authorization"),
            Some(expected_auth.as_str())
        );
        assert_eq!(request.header("content-type"), Some("application/json"));
    }
    let lines = pushed_lines(&fake);
    let label_names: BTreeSet<&str> = ["app", "env", "level", "service_type"].into();
    for pushed in &lines {
        let names: BTreeSet<&str> = pushed.labels.keys().map(String::as_str).collect();
        assert_eq!(names, label_names, "{pushed:?}");
        assert_eq!(pushed.labels["app"], "mcp_orchestrator");
        assert_eq!(pushed.labels["env"], "test");
        for value in pushed.labels.values() {
            assert!(
                !value.contains("trace-")
                    && !value.contains("session-")
                    && !value.contains("user-"),
                "a label carries a per-request value: {pushed:?}"
            );
        }
        assert!(!pushed.raw.contains(LOKI_TOKEN));
    }
    for index in 0..3 {
        let trace_id = format!("trace-{index}");
        let input = line_of(&lines, "input", &trace_id);
        assert_eq!(input.line["io"], "in");
        assert_eq!(input.labels["level"], "info");
        let output = line_of(&lines, "output", &trace_id);
        assert_eq!(output.line["io"], "out");
        assert_eq!(output.line["session_id"], format!("session-{index}"));
        assert_eq!(output.line["user_id"], format!("user-{index}"));
        assert_eq!(output.line["channel"], "voice");
        assert_eq!(output.line["level"], "INFO");
        assert!(output.line["latency_ms"].is_number(), "{output:?}");
        assert!(output.line["intent"].is_string(), "{output:?}");
        assert!(output.line["route"].is_string(), "{output:?}");
        assert_eq!(output.metadata["trace_id"], trace_id, "{output:?}");
        assert_eq!(output.metadata["session_id"], format!("session-{index}"));
    }
    assert_eq!(line_of(&lines, "output", "trace-0").line["route"], "menu");
}

/// Standard base64, for the expected `Authorization` header.
fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[tokio::test]
async fn payloads_are_redacted_by_redact_names_and_x_sensitive_properties() {
    // The order answer gains a property marked `x-sensitive` in its schema.
    let project = shipped_project_copy();
    let schema_path = project.path().join("schemas/order_response.schema.json");
    let mut schema: Json =
        serde_json::from_str(&std::fs::read_to_string(&schema_path).unwrap()).unwrap();
    schema["properties"]["loyalty_card"] = json!({"type": "string", "x-sensitive": true});
    std::fs::write(&schema_path, schema.to_string()).unwrap();
    let order_service = Stub::json(
        200,
        json!({"order_id": "ORD-77", "status": "confirmed", "loyalty_card": "LOYALTY-SECRET-42"}),
    )
    .await;
    let harness = Harness::new(HarnessOptions {
        dir: Some(project.path()),
        variables: vec![("ORDER_SERVICE_URL", order_service.url())],
        ..HarnessOptions::default()
    });
    assert!(
        harness
            .state
            .deployment
            .load()
            .project
            .redact
            .contains("loyalty_card")
    );

    let fake = accepting_loki().await;
    // `LOG_PAYLOADS`: payloads at the `info` level.
    let loki = LokiUnderTest::start(&fake.url(), roomy_limits(), "info", true);
    let envelope = harness
        .turn(json!({
            "text": "I want to order", "user_id": "u-9", "trace_id": "trace-pay",
            "order_items": [{"name": "pizza", "quantity": 1}],
            "order_payment_method": "VISA-SECRET-4111",
        }))
        .await;
    assert_eq!(envelope["route"], "order", "{envelope:#}");
    let stats = loki.handle.shutdown().await;
    assert_eq!(stats.dropped, 0, "{stats:?}");
    // The service did get the real values: only logs are redacted.
    assert_eq!(
        order_service.only_request().body["payment_method"],
        "VISA-SECRET-4111"
    );

    let lines = pushed_lines(&fake);
    for pushed in &lines {
        assert!(!pushed.raw.contains("VISA-SECRET-4111"), "{}", pushed.raw);
        assert!(!pushed.raw.contains("LOYALTY-SECRET-42"), "{}", pushed.raw);
    }
    let input = line_of(&lines, "input", "trace-pay");
    assert_eq!(input.line["payload"]["order_payment_method"], "[REDACTED]");
    assert_eq!(input.line["payload"]["text"], "I want to order");
    let call = line_of(&lines, "service_call", "trace-pay");
    assert_eq!(call.labels["service_type"], "order");
    assert_eq!(call.line["io"], "out");
    assert_eq!(call.line["session_id"], "u-9:web");
    assert_eq!(call.line["payload"]["payment_method"], "[REDACTED]");
    assert_eq!(call.line["payload"]["items"][0]["name"], "pizza");
    let answer = line_of(&lines, "service_return", "trace-pay");
    assert_eq!(answer.labels["service_type"], "order");
    assert_eq!(answer.line["io"], "in");
    assert_eq!(answer.line["payload"]["loyalty_card"], "[REDACTED]");
    assert_eq!(answer.line["payload"]["order_id"], "ORD-77");
    assert!(answer.line["latency_ms"].is_number());
}

#[tokio::test]
async fn payloads_are_not_logged_at_info_without_log_payloads() {
    let fake = accepting_loki().await;
    let loki = LokiUnderTest::start(&fake.url(), roomy_limits(), "info", false);
    Harness::shipped()
        .turn(json!({"text": "show me the menu", "user_id": "u-1", "trace_id": "trace-quiet"}))
        .await;
    let stats = loki.handle.shutdown().await;
    assert_eq!(stats.dropped, 0, "{stats:?}");
    let lines = pushed_lines(&fake);
    assert!(!lines.is_empty());
    for pushed in &lines {
        assert!(pushed.line.get("payload").is_none(), "{}", pushed.raw);
        assert_ne!(pushed.line["event_type"], "service_call", "{}", pushed.raw);
    }
}

#[tokio::test]
async fn no_secret_reaches_a_log_line_health_or_an_error_body() {
    const SERVICE_TOKEN: &str = "svc-token-must-never-be-logged";
    const OPENAI_KEY: &str = "sk-openai-key-must-never-be-logged";
    let project = super::project_copy_with("services.yaml", |text| {
        text.replacen(
            "    timeout: 3s\n",
            "    timeout: 3s\n    headers: { Authorization: \"Bearer ${MENU_TOKEN}\" }\n",
            1,
        )
    });
    // The menu service fails, so the call is logged as a `service_error`.
    let menu = Stub::json(500, json!({"error": "down"})).await;
    // The LLM refuses the key and quotes it, as some compatible servers do.
    let llm = Stub::json(
        401,
        json!({"error": {"message": format!("Incorrect API key provided: {OPENAI_KEY}"),
                         "type": "invalid_request_error", "code": "invalid_api_key"}}),
    )
    .await;
    let llm_url = llm.url();
    let harness = Harness::new(HarnessOptions {
        dir: Some(project.path()),
        variables: vec![
            ("MENU_SERVICE_URL", menu.url()),
            ("MENU_TOKEN", SERVICE_TOKEN.to_owned()),
        ],
        classifier: Arc::new(LlmClassifier::new(
            LlmConnection {
                api_key: OPENAI_KEY.to_owned(),
                base_url: Some(format!("{llm_url}/v1")),
                model: None,
            },
            http_client(),
        )),
        ..HarnessOptions::default()
    });
    let fake = accepting_loki().await;
    // Everything of this crate, payloads included.
    let loki = LokiUnderTest::start(
        &fake.url(),
        roomy_limits(),
        "info,mcp_orchestrator=trace",
        true,
    );

    let envelope = harness
        .turn(
            json!({"text": "show me the menu", "user_id": "u-1", "trace_id": "trace-secret",
                     "authorization": "Bearer from-the-client", "api_key": "client-key"}),
        )
        .await;
    assert_eq!(envelope["decision"], "error", "{envelope:#}");
    // The service did get the token: it is only kept out of logs.
    assert_eq!(
        menu.received()[0].header("authorization"),
        Some(format!("Bearer {SERVICE_TOKEN}").as_str())
    );
    let health = harness
        .send(Request::get("/health").body(Body::empty()).unwrap())
        .await;
    let invalid = harness.orchestrate(json!({"user_id": "u-1"})).await;
    assert_eq!(invalid.status, StatusCode::UNPROCESSABLE_ENTITY);
    let not_found = harness
        .send(Request::get("/nowhere").body(Body::empty()).unwrap())
        .await;
    let stats = loki.handle.shutdown().await;
    assert_eq!(stats.dropped, 0, "{stats:?}");

    let lines = pushed_lines(&fake);
    assert!(
        lines
            .iter()
            .any(|p| p.line["event_type"] == "service_error"),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|p| p.line["event_type"] == "intent_fallback"),
        "{lines:#?}"
    );
    let mut texts: Vec<String> = lines.iter().map(|p| p.raw.clone()).collect();
    texts.extend(fake.received().iter().map(|r| r.body.to_string()));
    texts.push(health.body.to_string());
    texts.push(invalid.body.to_string());
    texts.push(not_found.body.to_string());
    for text in &texts {
        for secret in [
            SERVICE_TOKEN,
            OPENAI_KEY,
            LOKI_TOKEN,
            "from-the-client",
            "client-key",
        ] {
            assert!(!text.contains(secret), "`{secret}` in: {text}");
        }
    }
}

/// Sends `count` turns, `concurrency` at a time; returns how many were
/// answered with 200, and the statuses of the others.
async fn many_turns(
    harness: &Harness,
    count: usize,
    concurrency: usize,
) -> (usize, BTreeMap<u16, usize>) {
    let mut answered = 0;
    let mut others = BTreeMap::new();
    let mut sent = 0;
    while sent < count {
        let wave = concurrency.min(count - sent);
        let answers = join_all((0..wave).map(|i| {
            harness.orchestrate(json!({
                "text": "show me the menu",
                "user_id": format!("user-{}", sent + i),
            }))
        }))
        .await;
        for answer in &answers {
            if answer.status == StatusCode::OK {
                answered += 1;
            } else {
                *others.entry(answer.status.as_u16()).or_insert(0) += 1;
            }
        }
        sent += wave;
    }
    (answered, others)
}

const MANY: usize = 10_000;

/// With Loki unusable, every turn is answered, the buffer never holds more
/// than its capacity, and lines are dropped (and counted) instead.
async fn turns_survive_an_unusable_loki(loki_url: &str) {
    let limits = small_limits();
    let loki = LokiUnderTest::start(loki_url, limits, "info", false);
    // The shipped key rate (1,000 a second) is not what this test is
    // about: turns on this machine can come faster than that.
    let harness = Harness::new(HarnessOptions {
        variables: vec![("PER_KEY_RATE", "1000000/s".to_owned())],
        ..HarnessOptions::default()
    });
    let (answered, others) = many_turns(&harness, MANY, 50).await;
    assert_eq!(answered, MANY, "other statuses: {others:?}");
    let stats = loki.sender.stats();
    assert!(
        stats.peak_lines <= limits.buffer_lines,
        "held {} lines, bound {}",
        stats.peak_lines,
        limits.buffer_lines
    );
    assert!(stats.peak_bytes <= limits.buffer_bytes, "{stats:?}");
    assert!(stats.held_lines <= limits.buffer_lines, "{stats:?}");
    // Two lines per turn (input, output): far more than the buffer holds.
    assert!(stats.dropped > 0, "{stats:?}");
    assert_eq!(
        stats.sent + stats.dropped + stats.held_lines as u64,
        2 * MANY as u64,
        "{stats:?}"
    );
    let final_stats = loki.handle.shutdown().await;
    assert!(final_stats.dropped >= stats.dropped);
    assert_eq!(final_stats.held_lines, 0, "{final_stats:?}");
}

#[tokio::test]
async fn with_loki_refusing_connections_every_request_is_answered_within_the_buffer_bound() {
    turns_survive_an_unusable_loki(&closed_port_url().await).await;
}

#[tokio::test]
async fn with_loki_answering_after_five_seconds_every_request_is_answered_within_the_buffer_bound()
{
    let slow = Stub::start(|_, _| async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        json_response(204, Json::Null)
    })
    .await;
    turns_survive_an_unusable_loki(&slow.url()).await;
}

/// The names of the samples in a Prometheus text exposition; fails on any
/// line that is not a comment, a blank or a well-formed sample.
fn parse_prometheus_text(text: &str) -> BTreeSet<String> {
    let sample = regex::Regex::new(
        r#"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? (-?[0-9.eE+-]+|NaN|\+Inf|-Inf)( -?[0-9]+)?$"#,
    )
    .unwrap();
    let comment = regex::Regex::new(
        r"^# (HELP [a-zA-Z_:][a-zA-Z0-9_:]* .*|TYPE [a-zA-Z_:][a-zA-Z0-9_:]* (counter|gauge|histogram|summary|untyped))$",
    )
    .unwrap();
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if line.is_empty() || comment.is_match(line) {
            continue;
        }
        let captures = sample
            .captures(line)
            .unwrap_or_else(|| panic!("not Prometheus text: `{line}`"));
        names.insert(captures[1].to_owned());
    }
    names
}

/// Every `mcp_*` metric name in the dashboard's queries.
fn dashboard_metric_names() -> BTreeSet<String> {
    let path = repository_root().join("deploy/grafana/mcp-orchestrator.json");
    let dashboard: Json = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let name = regex::Regex::new(r"\bmcp_[a-z_]+").unwrap();
    let mut names = BTreeSet::new();
    let mut queries = Vec::new();
    collect_strings_named(&dashboard, "expr", &mut queries);
    assert!(queries.len() >= 8, "{queries:#?}");
    for query in queries {
        for found in name.find_iter(&query) {
            names.insert(found.as_str().to_owned());
        }
    }
    names
}

fn collect_strings_named(value: &Json, key: &str, out: &mut Vec<String>) {
    match value {
        Json::Object(object) => {
            for (name, value) in object {
                match value {
                    Json::String(text) if name == key => out.push(text.clone()),
                    _ => collect_strings_named(value, key, out),
                }
            }
        }
        Json::Array(items) => items
            .iter()
            .for_each(|item| collect_strings_named(item, key, out)),
        _ => {}
    }
}

#[tokio::test]
async fn metrics_are_prometheus_text_naming_every_metric_of_the_dashboard() {
    prometheus::install();
    let llm_url = closed_port_url().await;
    let harness = Harness::new(HarnessOptions {
        variables: vec![("MENU_SERVICE_URL", closed_port_url().await)],
        classifier: Arc::new(LlmClassifier::new(
            LlmConnection {
                api_key: "test-key".to_owned(),
                base_url: Some(format!("{llm_url}/v1")),
                model: None,
            },
            http_client(),
        )),
        ..HarnessOptions::default()
    });
    // A failed call, a mocked one, a request error, a reload.
    harness.turn(turn_request("show me the menu")).await;
    harness.turn(turn_request("what do you recommend")).await;
    harness.orchestrate(json!({"user_id": "u-1"})).await;
    // A tool call over MCP.
    let tool_call = harness
        .send(super::mcp_request(super::tools_call(
            json!({"arguments": {}}),
            "get_profile",
        )))
        .await;
    assert_eq!(tool_call.status, StatusCode::OK, "{tool_call:?}");
    let reloader = Reloader::new(
        Source {
            dir: repository_root(),
            variables: test_environment().into_iter().collect(),
            environment: Environment::Development,
            force_mock: false,
            tenant: None,
        },
        harness.state.clone(),
    );
    reloader.reload_now();
    // The Loki counters are registered when the recorder is installed.
    let answer = harness
        .send(Request::get("/metrics").body(Body::empty()).unwrap())
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(
        answer.content_type().starts_with("text/plain"),
        "{answer:?}"
    );
    let response = get_text(&harness, "/metrics").await;
    let names = parse_prometheus_text(&response);
    for name in prometheus::ALL {
        let rendered = [
            name.to_string(),
            format!("{name}_bucket"),
            format!("{name}_count"),
        ];
        assert!(
            rendered.iter().any(|n| names.contains(n)),
            "`{name}` is not in /metrics:\n{response}"
        );
    }
    let missing: Vec<String> = dashboard_metric_names()
        .into_iter()
        .filter(|name| !names.contains(name))
        .collect();
    assert!(
        missing.is_empty(),
        "not in /metrics: {missing:?}\n{response}"
    );
    assert!(
        response
            .contains(r#"mcp_service_calls_total{service="menu",outcome="service_unavailable"}"#),
        "{response}"
    );
    assert!(
        response.contains(
            r#"mcp_request_errors_total{endpoint="/orchestrate",code="invalid_request"}"#
        ),
        "{response}"
    );
}

/// `GET path` through the router; the body as text.
async fn get_text(harness: &Harness, path: &str) -> String {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let response = harness
        .router()
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}
