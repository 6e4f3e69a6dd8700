//! Every way a service call can fail, against stub services on port 0
//! through the real `HttpTransport`: the turn still answers 200, with the
//! flow's error route, the stable error code in its span, and no upstream
//! text in the reply.

use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use serde_json::{Value as Json, json};

use super::{
    Harness, HarnessOptions, Stub, assert_envelope, closed_port_url, json_response, only_span,
    project_copy_with,
};

/// What no reply may ever contain: the stubs put it in their answers.
const UPSTREAM_SECRET: &str = "upstream-secret-7f3a";

fn order_request() -> Json {
    json!({
        "text": "I want to order",
        "user_id": "u-1",
        "order_items": [{"id": "mn-01", "quantity": 1}],
    })
}

/// Asserts the order flow answered with its `on_error` reply because the
/// call failed with `code`.
#[track_caller]
fn assert_order_failed(envelope: &Json, code: &str) {
    assert_envelope(envelope, "order_error", "order", "error");
    assert_eq!(
        envelope["reply_text"],
        "Sorry, I couldn't place your order just now. Please try again in a moment."
    );
    let span = only_span(envelope);
    assert_eq!(span["service"], "order");
    assert_eq!(span["error"], code, "{span:#}");
    assert_eq!(span["attempts"], 1, "{span:#}");
    assert!(
        !envelope.to_string().contains(UPSTREAM_SECRET),
        "{envelope:#}"
    );
}

/// The order flow with its service at `url`.
fn order_harness(url: String) -> Harness {
    Harness::new(HarnessOptions {
        variables: vec![("ORDER_SERVICE_URL", url)],
        ..HarnessOptions::default()
    })
}

/// A stub that waits `delay` before answering a valid order. The delay is
/// bounded so that nothing outlives the test for long.
async fn slow_order_stub(delay: Duration) -> Stub {
    Stub::start(move |_, _| async move {
        tokio::time::sleep(delay).await;
        json_response(200, json!({"order_id": "ORD-1", "status": "confirmed"}))
    })
    .await
}

#[tokio::test]
async fn timeout_of_the_service_is_service_timeout() {
    let project = project_copy_with("services.yaml", |text| {
        text.replace("timeout: 5s", "timeout: 200ms")
    });
    let order = slow_order_stub(Duration::from_secs(20)).await;
    let harness = Harness::new(HarnessOptions {
        dir: Some(project.path()),
        variables: vec![("ORDER_SERVICE_URL", order.url())],
        ..HarnessOptions::default()
    });
    let envelope = tokio::time::timeout(Duration::from_secs(10), harness.turn(order_request()))
        .await
        .expect("the call is cut at the service's timeout, long before the stub answers");
    assert_order_failed(&envelope, "service_timeout");
    assert_eq!(only_span(&envelope)["status"], Json::Null);
}

#[tokio::test]
async fn a_tls_handshake_that_never_ends_is_cut_at_the_connect_timeout() {
    // Accepts connections and never answers: the TLS handshake stalls.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    // The service allows far longer than the connect timeout.
    let project = project_copy_with("services.yaml", |text| {
        text.replace("timeout: 5s", "timeout: 60s")
    });
    let harness = Harness::new(HarnessOptions {
        dir: Some(project.path()),
        variables: vec![("ORDER_SERVICE_URL", format!("https://{address}/orders"))],
        ..HarnessOptions::default()
    });
    // Well under the service's timeout and the request's deadline (30 s).
    let envelope = tokio::time::timeout(Duration::from_secs(20), harness.turn(order_request()))
        .await
        .expect("the connection is given up at the connect timeout, not the service's");
    assert_order_failed(&envelope, "service_timeout");
    holder.abort();
}

#[tokio::test]
async fn a_redirect_is_service_http_error_and_is_not_followed() {
    // The redirect points at a second stub: it must never be called.
    let elsewhere = Stub::json(200, json!({"order_id": "ORD-9", "status": "confirmed"})).await;
    let target = elsewhere.url();
    let order = Stub::start(move |_, _| {
        let target = target.clone();
        async move {
            (
                axum::http::StatusCode::TEMPORARY_REDIRECT,
                [(axum::http::header::LOCATION, target)],
            )
                .into_response()
        }
    })
    .await;
    let harness = order_harness(order.url());
    let envelope = harness.turn(order_request()).await;
    assert_order_failed(&envelope, "service_http_error");
    assert_eq!(only_span(&envelope)["status"], 307);
    assert!(elsewhere.received().is_empty(), "the redirect was followed");
}

#[tokio::test]
async fn http_500_is_service_http_error() {
    let order = Stub::start(|_, _| async {
        (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("Traceback: {UPSTREAM_SECRET}"),
        )
            .into_response()
    })
    .await;
    let harness = order_harness(order.url());
    let envelope = harness.turn(order_request()).await;
    assert_order_failed(&envelope, "service_http_error");
    assert_eq!(only_span(&envelope)["status"], 500);
    assert_eq!(
        order.received().len(),
        1,
        "placing an order is never retried"
    );
}

#[tokio::test]
async fn non_json_answer_is_service_bad_response() {
    let order = Stub::start(|_, _| async {
        (
            [("content-type", "text/html")],
            format!("<html>{UPSTREAM_SECRET}</html>"),
        )
            .into_response()
    })
    .await;
    let harness = order_harness(order.url());
    let envelope = harness.turn(order_request()).await;
    assert_order_failed(&envelope, "service_bad_response");
    assert_eq!(only_span(&envelope)["status"], 200);
}

#[tokio::test]
async fn json_that_is_not_utf8_is_service_bad_response() {
    let order = Stub::start(|_, _| async {
        // A JSON document whose one string holds the byte 0xFF, never UTF-8.
        let mut body = br#"{"order_id": "ORD-1", "status": "confirmed"#.to_vec();
        body.push(0xFF);
        body.extend_from_slice(br#""}"#);
        ([("content-type", "application/json")], body).into_response()
    })
    .await;
    let harness = order_harness(order.url());
    let envelope = harness.turn(order_request()).await;
    assert_order_failed(&envelope, "service_bad_response");
}

#[tokio::test]
async fn answer_violating_the_schema_is_schema_violation() {
    // `order_id` is required by schemas/order_response.schema.json.
    let order = Stub::json(200, json!({"status": UPSTREAM_SECRET})).await;
    let harness = order_harness(order.url());
    let envelope = harness.turn(order_request()).await;
    assert_order_failed(&envelope, "schema_violation");
    assert_eq!(only_span(&envelope)["status"], 200);

    // A wrong type is a violation too.
    let order = Stub::json(200, json!({"order_id": 17, "status": "confirmed"})).await;
    let harness = order_harness(order.url());
    assert_order_failed(&harness.turn(order_request()).await, "schema_violation");
}

#[tokio::test]
async fn refused_connection_is_service_unavailable() {
    let harness = order_harness(closed_port_url().await);
    let envelope = harness.turn(order_request()).await;
    assert_order_failed(&envelope, "service_unavailable");
    assert_eq!(only_span(&envelope)["status"], Json::Null);
}

#[tokio::test]
async fn list_wrapped_answer_is_unwrapped() {
    let order = Stub::json(
        200,
        json!([{"order_id": "ORD-31", "status": "confirmed", "eta_minutes": 5}]),
    )
    .await;
    let harness = order_harness(order.url());
    let envelope = harness.turn(order_request()).await;
    assert_envelope(&envelope, "order", "order", "reply");
    assert_eq!(
        envelope["reply_text"],
        "Thank you! Your order ORD-31 is confirmed. It should be ready in about 5 minutes."
    );
    assert!(only_span(&envelope).get("error").is_none());
}

#[tokio::test]
async fn empty_list_answer_is_service_bad_response() {
    let order = Stub::json(200, json!([])).await;
    let harness = order_harness(order.url());
    assert_order_failed(&harness.turn(order_request()).await, "service_bad_response");
}

/// A valid order answer padded past `MAX_RESPONSE_BYTES`: only its size is
/// wrong.
fn oversized_order_answer() -> Vec<u8> {
    let padding = "x".repeat(mcp_orchestrator::services::MAX_RESPONSE_BYTES + 1024);
    serde_json::to_vec(&json!({"order_id": "ORD-1", "status": "confirmed", "padding": padding}))
        .unwrap()
}

#[tokio::test]
async fn oversized_answer_with_a_content_length_is_service_bad_response() {
    let order = Stub::start(|_, _| async {
        Response::builder()
            .header("content-type", "application/json")
            .body(Body::from(oversized_order_answer()))
            .unwrap()
    })
    .await;
    let harness = order_harness(order.url());
    assert_order_failed(&harness.turn(order_request()).await, "service_bad_response");
}

#[tokio::test]
async fn oversized_streamed_answer_is_service_bad_response() {
    // Chunked, without a content length: the cap applies while reading.
    let order = Stub::start(|_, _| async {
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = oversized_order_answer()
            .chunks(64 * 1024)
            .map(|chunk| Ok(chunk.to_vec()))
            .collect();
        Response::builder()
            .header("content-type", "application/json")
            .body(Body::from_stream(futures_util::stream::iter(chunks)))
            .unwrap()
    })
    .await;
    let harness = order_harness(order.url());
    assert_order_failed(&harness.turn(order_request()).await, "service_bad_response");
}

#[tokio::test]
async fn answer_slower_than_the_request_deadline_is_service_timeout() {
    // The order service may take 5 s, but the request only has 300 ms.
    let order = slow_order_stub(Duration::from_secs(20)).await;
    let harness = Harness::new(HarnessOptions {
        variables: vec![("ORDER_SERVICE_URL", order.url())],
        request_timeout: Duration::from_millis(300),
        ..HarnessOptions::default()
    });
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        harness.orchestrate(order_request()),
    )
    .await
    .expect("the turn answers at its deadline, long before the stub does");
    assert_eq!(answer.status, 200);
    assert_order_failed(&answer.body, "service_timeout");
}

#[tokio::test]
async fn flow_without_on_error_uses_the_default_error_reply() {
    // recommend has no `on_error`: the project's default reply, decision error.
    let recommend = Stub::json(200, json!({"recommendations": UPSTREAM_SECRET})).await;
    let harness = Harness::with_services(&[("RECOMMEND_SERVICE_URL", &recommend)]);
    let envelope = harness
        .turn(json!({"text": "what do you recommend", "user_id": "u-1"}))
        .await;
    assert_envelope(&envelope, "recommend", "recommend", "error");
    assert_eq!(
        envelope["reply_text"],
        "Sorry, something went wrong on our side. Please try again in a moment."
    );
    assert_eq!(only_span(&envelope)["error"], "schema_violation");
    assert!(!envelope.to_string().contains(UPSTREAM_SECRET));
}

/// The shipped project with the read services' backoff cut to 10 ms.
fn fast_retry_project() -> tempfile::TempDir {
    project_copy_with("services.yaml", |text| {
        text.replace(
            "retry: { attempts: 3, backoff: 200ms }",
            "retry: { attempts: 3, backoff: 10ms }",
        )
    })
}

#[tokio::test]
async fn retried_service_succeeds_on_the_third_attempt() {
    let project = fast_retry_project();
    let menu = Stub::start(|n, _| async move {
        if n <= 2 {
            json_response(503, json!({"error": "busy"}))
        } else {
            json_response(200, json!({"output": "Soup of the day."}))
        }
    })
    .await;
    let harness = Harness::new(HarnessOptions {
        dir: Some(project.path()),
        variables: vec![("MENU_SERVICE_URL", menu.url())],
        ..HarnessOptions::default()
    });
    let envelope = harness
        .turn(json!({"text": "menu", "user_id": "u-1"}))
        .await;
    assert_envelope(&envelope, "menu", "menu", "reply");
    assert_eq!(envelope["reply_text"], "Soup of the day.");
    let span = only_span(&envelope);
    assert_eq!(span["attempts"], 3);
    assert_eq!(span["status"], 200);
    assert!(span.get("error").is_none(), "{span:#}");
    assert_eq!(menu.received().len(), 3);
}

#[tokio::test]
async fn retried_service_gives_up_after_its_attempts() {
    let project = fast_retry_project();
    let menu = Stub::json(503, json!({"error": UPSTREAM_SECRET})).await;
    let harness = Harness::new(HarnessOptions {
        dir: Some(project.path()),
        variables: vec![("MENU_SERVICE_URL", menu.url())],
        ..HarnessOptions::default()
    });
    let envelope = harness
        .turn(json!({"text": "menu", "user_id": "u-1"}))
        .await;
    assert_envelope(&envelope, "menu", "menu", "error");
    let span = only_span(&envelope);
    assert_eq!(span["attempts"], 3);
    assert_eq!(span["status"], 503);
    assert_eq!(span["error"], "service_unavailable");
    assert_eq!(menu.received().len(), 3);
    assert!(!envelope.to_string().contains(UPSTREAM_SECRET));
}

#[tokio::test]
async fn client_errors_are_not_retried() {
    let project = fast_retry_project();
    let menu = Stub::json(400, json!({"error": "bad request"})).await;
    let harness = Harness::new(HarnessOptions {
        dir: Some(project.path()),
        variables: vec![("MENU_SERVICE_URL", menu.url())],
        ..HarnessOptions::default()
    });
    let envelope = harness
        .turn(json!({"text": "menu", "user_id": "u-1"}))
        .await;
    let span = only_span(&envelope);
    assert_eq!(span["attempts"], 1);
    assert_eq!(span["error"], "service_http_error");
    assert_eq!(menu.received().len(), 1);
}
