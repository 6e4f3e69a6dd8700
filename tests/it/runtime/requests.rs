//! The request side of `POST /orchestrate`: every kind of invalid request
//! gets `application/problem+json` with its status and code; valid requests
//! get their defaults and a complete envelope.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{Value as Json, json};

use super::{Answer, Harness, turn_request};

/// Asserts a problem+json answer with `status` and `code`.
#[track_caller]
fn assert_problem(answer: &Answer, status: StatusCode, code: &str) {
    assert_eq!(answer.status, status, "{:#}", answer.body);
    assert_eq!(answer.content_type(), "application/problem+json");
    assert_eq!(answer.body["status"], status.as_u16(), "{:#}", answer.body);
    assert_eq!(answer.body["code"], code, "{:#}", answer.body);
    assert_eq!(answer.body["type"], "about:blank");
    assert!(answer.body["title"].is_string(), "{:#}", answer.body);
    assert!(answer.body["detail"].is_string(), "{:#}", answer.body);
}

fn post(content_type: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post("/orchestrate")
        .header("content-type", content_type)
        .body(body.into())
        .unwrap()
}

#[tokio::test]
async fn missing_text_is_422_at_its_pointer() {
    let harness = Harness::shipped();
    let answer = harness.orchestrate(json!({"user_id": "u-1"})).await;
    assert_problem(&answer, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
    assert_eq!(answer.body["pointer"], "/text", "{:#}", answer.body);
}

#[tokio::test]
async fn missing_text_is_422_invalid_request() {
    let harness = Harness::shipped();
    let answer = harness.orchestrate(json!({"user_id": "u-1"})).await;
    assert_problem(&answer, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
    assert!(
        answer.body["detail"].as_str().unwrap().contains("text"),
        "{:#}",
        answer.body
    );
}

#[tokio::test]
async fn empty_or_non_string_fields_are_422_at_their_pointer() {
    let harness = Harness::shipped();
    for (body, pointer) in [
        (json!({"text": "", "user_id": "u-1"}), "/text"),
        (json!({"text": "hi", "user_id": 42}), "/user_id"),
        (json!({"text": ["hi"], "user_id": "u-1"}), "/text"),
        (
            json!({"text": "hi", "user_id": "u-1", "channel": 3}),
            "/channel",
        ),
        (
            json!({"text": "hi", "user_id": "u-1", "order_items": "pizza"}),
            "/order_items",
        ),
    ] {
        let answer = harness.orchestrate(body.clone()).await;
        assert_problem(&answer, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
        assert_eq!(
            answer.body["pointer"], pointer,
            "{body} → {:#}",
            answer.body
        );
    }
}

#[tokio::test]
async fn body_that_is_not_json_is_400() {
    let harness = Harness::shipped();
    let answer = harness
        .send(post("application/json", "{\"text\": \"hi\", "))
        .await;
    assert_problem(&answer, StatusCode::BAD_REQUEST, "invalid_request");
}

#[tokio::test]
async fn json_that_is_not_an_object_is_422() {
    let harness = Harness::shipped();
    for body in [
        "[{\"text\": \"hi\", \"user_id\": \"u-1\"}]",
        "\"hi\"",
        "null",
    ] {
        let answer = harness.send(post("application/json", body)).await;
        assert_problem(&answer, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
    }
}

#[tokio::test]
async fn wrong_content_type_is_415() {
    let harness = Harness::shipped();
    let body = turn_request("hi").to_string();
    let answer = harness.send(post("text/plain", body.clone())).await;
    assert_problem(
        &answer,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "invalid_request",
    );
    let answer = harness
        .send(
            Request::post("/orchestrate")
                .body(Body::from(body.clone()))
                .unwrap(),
        )
        .await;
    assert_problem(
        &answer,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "invalid_request",
    );
    // Parameters and `+json` types are JSON.
    let answer = harness
        .send(post("application/json; charset=utf-8", body.clone()))
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{:#}", answer.body);
    let answer = harness
        .send(post("application/vnd.example+json", body))
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{:#}", answer.body);
}

#[tokio::test]
async fn body_over_one_mebibyte_is_413() {
    let harness = Harness::shipped();
    let text = "a".repeat(mcp_orchestrator::server::MAX_REQUEST_BYTES);
    let body = json!({"text": text, "user_id": "u-1"}).to_string();
    assert!(body.len() > mcp_orchestrator::server::MAX_REQUEST_BYTES);
    let answer = harness.send(post("application/json", body)).await;
    assert_problem(&answer, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
}

#[tokio::test]
async fn unknown_route_is_404() {
    let harness = Harness::shipped();
    let answer = harness
        .send(Request::get("/nowhere").body(Body::empty()).unwrap())
        .await;
    assert_problem(&answer, StatusCode::NOT_FOUND, "not_found");
    let answer = harness
        .send(
            Request::post("/orchestrate/extra")
                .header("content-type", "application/json")
                .body(Body::from(turn_request("hi").to_string()))
                .unwrap(),
        )
        .await;
    assert_problem(&answer, StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn wrong_method_is_405() {
    let harness = Harness::shipped();
    let answer = harness
        .send(Request::get("/orchestrate").body(Body::empty()).unwrap())
        .await;
    assert_problem(
        &answer,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
    let answer = harness
        .send(Request::post("/health").body(Body::empty()).unwrap())
        .await;
    assert_problem(
        &answer,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
}

#[tokio::test]
async fn envelope_has_every_field() {
    let harness = Harness::shipped();
    let answer = harness.orchestrate(turn_request("menu")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(
        answer.content_type().starts_with("application/json"),
        "{}",
        answer.content_type()
    );
    let envelope = answer.body.as_object().unwrap();
    for field in [
        "decision",
        "reply_text",
        "session_id",
        "route",
        "intent",
        "trace_id",
    ] {
        assert!(
            envelope.get(field).is_some_and(Json::is_string),
            "`{field}` is not a string in {envelope:#?}"
        );
    }
    assert!(envelope["intent_confidence"].is_number(), "{envelope:#?}");
    assert!(envelope["service_spans"].is_array(), "{envelope:#?}");
    assert!(envelope.contains_key("data"), "{envelope:#?}");
}

#[tokio::test]
async fn channel_and_session_id_have_defaults() {
    let harness = Harness::shipped();
    let envelope = harness
        .turn(json!({"text": "hello", "user_id": "alice"}))
        .await;
    assert_eq!(envelope["session_id"], "alice:web");

    let envelope = harness
        .turn(json!({"text": "hello", "user_id": "alice", "channel": "sms"}))
        .await;
    assert_eq!(envelope["session_id"], "alice:sms");

    let envelope = harness
        .turn(json!({"text": "hello", "user_id": "alice", "channel": "sms", "session_id": "s-1"}))
        .await;
    assert_eq!(envelope["session_id"], "s-1");

    // The default channel reaches the services too.
    let menu = super::Stub::json(200, json!({"output": "ok"})).await;
    let harness = Harness::with_services(&[("MENU_SERVICE_URL", &menu)]);
    harness
        .turn(json!({"text": "menu", "user_id": "bob"}))
        .await;
    let request = menu.only_request();
    assert_eq!(request.body["channel"], "web");
    assert_eq!(request.body["session_id"], "bob:web");
}

#[tokio::test]
async fn trace_id_comes_from_the_body_then_traceparent_then_is_generated() {
    let harness = Harness::shipped();
    let traceparent = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01";
    let with_traceparent = |body: Json| {
        Request::post("/orchestrate")
            .header("content-type", "application/json")
            .header("traceparent", traceparent)
            .body(Body::from(body.to_string()))
            .unwrap()
    };

    let answer = harness.send(with_traceparent(turn_request("hello"))).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(
        answer.headers["x-trace-id"],
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );

    // The body's trace id wins over the header.
    let answer = harness
        .send(with_traceparent(
            json!({"text": "hello", "user_id": "u-1", "trace_id": "mine"}),
        ))
        .await;
    assert_eq!(answer.body["trace_id"], "mine");
    assert_eq!(answer.headers["x-trace-id"], "mine");

    // Without either, one is generated: a fresh one per request.
    let first = harness.orchestrate(turn_request("hello")).await;
    let second = harness.orchestrate(turn_request("hello")).await;
    for answer in [&first, &second] {
        let trace_id = answer.body["trace_id"].as_str().unwrap();
        assert!(!trace_id.is_empty());
        assert_eq!(answer.headers["x-trace-id"], trace_id);
    }
    assert_ne!(first.body["trace_id"], second.body["trace_id"]);

    // An invalid traceparent is ignored.
    for invalid in [
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        "garbage",
    ] {
        let answer = harness
            .send(
                Request::post("/orchestrate")
                    .header("content-type", "application/json")
                    .header("traceparent", invalid)
                    .body(Body::from(turn_request("hello").to_string()))
                    .unwrap(),
            )
            .await;
        assert_eq!(answer.status, StatusCode::OK);
        let trace_id = answer.body["trace_id"].as_str().unwrap();
        assert!(
            !invalid.to_ascii_lowercase().contains(trace_id),
            "{invalid} gave {trace_id}"
        );
    }
}

#[tokio::test]
async fn health_describes_the_deployment() {
    let harness = Harness::shipped();
    let answer = harness
        .send(Request::get("/health").body(Body::empty()).unwrap())
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    let health = &answer.body;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["environment"], "development");
    assert_eq!(health["project"]["flows"], 7);
    assert_eq!(health["project"]["generation"], 1);
    assert_eq!(
        health["mocked_services"],
        json!(["menu", "order", "recommend", "tracking", "profile"])
    );
    assert_eq!(health["sessions"], 0);

    harness.turn(turn_request("hello")).await;
    let answer = harness
        .send(Request::get("/health").body(Body::empty()).unwrap())
        .await;
    assert_eq!(answer.body["sessions"], 1);
}

#[tokio::test]
async fn a_trace_id_has_at_most_128_characters_and_no_control_character_as_the_schema_says() {
    let harness = Harness::shipped();
    for (trace_id, status) in [
        ("a".repeat(128), StatusCode::OK),
        ("é".repeat(128), StatusCode::OK),
        ("a".repeat(129), StatusCode::UNPROCESSABLE_ENTITY),
        ("trace\u{7}".to_owned(), StatusCode::UNPROCESSABLE_ENTITY),
        ("trace\u{85}".to_owned(), StatusCode::UNPROCESSABLE_ENTITY),
    ] {
        let answer = harness
            .orchestrate(json!({"text": "hello", "user_id": "u-1", "trace_id": trace_id}))
            .await;
        assert_eq!(answer.status, status, "{trace_id:?}: {:#}", answer.body);
        if status != StatusCode::OK {
            assert_eq!(answer.body["pointer"], "/trace_id");
        }
    }
    // Without the project's request schema, the envelope rule says the same.
    let body = serde_json::Map::from_iter([
        ("text".to_owned(), json!("hello")),
        ("user_id".to_owned(), json!("u-1")),
        ("trace_id".to_owned(), json!("é".repeat(129))),
    ]);
    let refused = mcp_orchestrator::server::turn_request(body, &axum::http::HeaderMap::new());
    assert_eq!(refused.unwrap_err().pointer.as_deref(), Some("/trace_id"));
}
