//! `docs/openapi.json` is what the service does: it is served at
//! `/openapi.json`, its paths are the router's, its request schema is the
//! shipped project's, and real answers — envelopes, `/health`, every kind
//! of problem — validate against its schemas.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{Value as Json, json};

use super::{Answer, Harness, HarnessOptions, project_copy_with, turn_request};
use crate::repository_root;

fn document() -> Json {
    let text = std::fs::read_to_string(repository_root().join("docs/openapi.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Validates `instance` against `components.schemas.<name>` of the
/// document (with its local references).
#[track_caller]
fn assert_matches(name: &str, instance: &Json) {
    let document = document();
    let schema = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$ref": format!("#/components/schemas/{name}"),
        "components": document["components"],
    });
    let validator = jsonschema::validator_for(&schema).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|error| format!("{} at {}", error, error.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{name}: {errors:#?}\n{instance:#}");
}

#[track_caller]
fn assert_problem_documented(answer: &Answer, path: &str, method: &str) {
    assert_eq!(answer.content_type(), "application/problem+json");
    assert_matches("Problem", &answer.body);
    let status = answer.status.as_u16().to_string();
    if path != "unmatched" {
        assert!(
            document()["paths"][path][method]["responses"][&status].is_object(),
            "{method} {path} answered {status}, which the document does not list"
        );
    }
}

#[tokio::test]
async fn the_document_is_served_and_names_exactly_the_routes() {
    let harness = Harness::shipped();
    let served = harness
        .send(Request::get("/openapi.json").body(Body::empty()).unwrap())
        .await;
    assert_eq!(served.status, StatusCode::OK);
    assert_eq!(served.body, document());

    let paths = document()["paths"].as_object().unwrap().clone();
    let mut documented: Vec<String> = paths.keys().cloned().collect();
    documented.sort();
    assert_eq!(
        documented,
        [
            "/channels/{name}",
            "/health",
            "/mcp",
            "/metrics",
            "/openapi.json",
            "/orchestrate",
            "/t/{tenant}/orchestrate"
        ]
    );
    for (path, operations) in paths {
        // Served by a deployment of several tenants (tests/it/tenants.rs).
        if path.starts_with("/t/") {
            continue;
        }
        // A declared channel that takes both methods.
        let path = path.replace("{name}", "whatsapp");
        for method in operations.as_object().unwrap().keys() {
            let request = Request::builder()
                .method(method.to_uppercase().as_str())
                .uri(&path)
                .header("content-type", "application/json")
                .body(Body::from(turn_request("hello").to_string()))
                .unwrap();
            let answer = harness.send(request).await;
            assert!(
                ![StatusCode::NOT_FOUND, StatusCode::METHOD_NOT_ALLOWED].contains(&answer.status),
                "{method} {path}: {}",
                answer.status
            );
        }
    }
}

#[test]
fn the_request_schema_is_the_shipped_projects() {
    let mut shipped: Json = serde_json::from_str(
        &std::fs::read_to_string(repository_root().join("schemas/orchestrate_request.schema.json"))
            .unwrap(),
    )
    .unwrap();
    shipped.as_object_mut().unwrap().remove("$schema");
    assert_eq!(
        document()["components"]["schemas"]["OrchestrateRequest"],
        shipped
    );
}

#[tokio::test]
async fn envelopes_and_health_match_their_schemas() {
    let harness = Harness::shipped();
    for text in [
        "Can you read me the menu?",
        "Where is my order ORD-10421?",
        "this is nice",
        "I want to order",
    ] {
        let answer = harness.orchestrate(turn_request(text)).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_matches("Envelope", &answer.body);
    }
    // A failed call: `decision: error` and a span with its code.
    let harness_down = Harness::new(HarnessOptions {
        variables: vec![("MENU_SERVICE_URL", super::closed_port_url().await)],
        ..HarnessOptions::default()
    });
    let answer = harness_down
        .orchestrate(turn_request("Can you read me the menu?"))
        .await;
    assert_eq!(answer.body["decision"], "error");
    assert_matches("Envelope", &answer.body);

    let health = harness
        .send(Request::get("/health").body(Body::empty()).unwrap())
        .await;
    assert_matches("Health", &health.body);
}

#[tokio::test]
async fn every_kind_of_problem_matches_the_document() {
    let harness = Harness::shipped();
    let post = |content_type: &str, body: &str| {
        Request::post("/orchestrate")
            .header("content-type", content_type)
            .body(Body::from(body.to_owned()))
            .unwrap()
    };
    for (request, status) in [
        (post("application/json", "{not json"), 400),
        (post("text/plain", "hello"), 415),
        (post("application/json", r#"{"user_id": "u-1"}"#), 422),
        (
            post(
                "application/json",
                &format!(
                    r#"{{"text": "{}", "user_id": "u"}}"#,
                    "a".repeat(2 * 1024 * 1024)
                ),
            ),
            413,
        ),
    ] {
        let answer = harness.send(request).await;
        assert_eq!(answer.status.as_u16(), status, "{:#}", answer.body);
        assert_problem_documented(&answer, "/orchestrate", "post");
    }
    let answer = harness
        .send(Request::get("/nowhere").body(Body::empty()).unwrap())
        .await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_problem_documented(&answer, "unmatched", "get");
    let answer = harness
        .send(Request::get("/orchestrate").body(Body::empty()).unwrap())
        .await;
    assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_problem_documented(&answer, "unmatched", "get");

    // 401, 403, 429 and /metrics' 401: with keys and a tight rate.
    let keyed = Harness::new(HarnessOptions {
        variables: vec![
            ("WEB_APP_API_KEY", "web-app-key-0123456789abcdef".to_owned()),
            ("METRICS_API_KEY", "metrics-key-0123456789abcdef".to_owned()),
            ("PER_USER_RATE", "1/m".to_owned()),
        ],
        ..HarnessOptions::default()
    });
    let answer = keyed.orchestrate(turn_request("hello")).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_problem_documented(&answer, "/orchestrate", "post");
    let with_key = |body: Json| {
        Request::post("/orchestrate")
            .header("content-type", "application/json")
            .header("authorization", "Bearer web-app-key-0123456789abcdef")
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let answer = keyed
        .send(with_key(
            json!({"text": "hi", "user_id": "u-1", "channel": "sms"}),
        ))
        .await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert_problem_documented(&answer, "/orchestrate", "post");
    assert_eq!(
        keyed.send(with_key(turn_request("hi"))).await.status,
        StatusCode::OK
    );
    let answer = keyed.send(with_key(turn_request("hi"))).await;
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
    assert_problem_documented(&answer, "/orchestrate", "post");
    let answer = keyed
        .send(Request::get("/metrics").body(Body::empty()).unwrap())
        .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_problem_documented(&answer, "/metrics", "get");

    // 503: no room for a turn.
    let project = project_copy_with("access.yaml", |text| {
        text.replace("max_in_flight: 512", "max_in_flight: 1")
    });
    let full = Harness::new(HarnessOptions {
        dir: Some(project.path()),
        ..HarnessOptions::default()
    });
    let held = full
        .state
        .admission
        .for_limits(&full.state.deployment.load().project.limits)
        .enter()
        .unwrap();
    let answer = full.orchestrate(turn_request("hi")).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_problem_documented(&answer, "/orchestrate", "post");
    drop(held);
}

#[test]
fn the_schemas_refuse_what_the_contract_forbids() {
    let document = document();
    let validator = |name: &str| {
        jsonschema::validator_for(&json!({
            "$ref": format!("#/components/schemas/{name}"),
            "components": document["components"],
        }))
        .unwrap()
    };
    let envelope = json!({"decision": "reply", "reply_text": "hi", "session_id": "s", "route": "r",
        "intent": "i", "intent_confidence": 0.7, "trace_id": "t", "service_spans": [], "data": null});
    assert!(validator("Envelope").is_valid(&envelope));
    let mut missing = envelope.clone();
    missing.as_object_mut().unwrap().remove("route");
    assert!(!validator("Envelope").is_valid(&missing));
    let mut unknown_decision = envelope.clone();
    unknown_decision["decision"] = json!("maybe");
    assert!(!validator("Envelope").is_valid(&unknown_decision));
    assert!(!validator("Problem").is_valid(&json!({"type": "about:blank", "title": "x", "status": 400, "code": "no_such_code", "detail": "x"})));
}
