//! The console's API in process: turns recorded step by step and redacted,
//! the live event stream, the graph, saving a conversation as a test, and
//! who may open it.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ConnectInfo;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value as Json, json};
use tower::ServiceExt;

use super::{Harness, HarnessOptions, project_copy_with};
use crate::shipped_project_copy;
use mcp_orchestrator::server::Environment;

fn console_harness() -> Harness {
    Harness::new(HarnessOptions {
        console: true,
        ..HarnessOptions::default()
    })
}

/// A request from this machine, as the server marks console requests.
fn local(mut request: Request<Body>) -> Request<Body> {
    request
        .extensions_mut()
        .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40_000))));
    request
}

fn get(path: &str) -> Request<Body> {
    local(
        Request::get(path)
            .header("host", "localhost")
            .body(Body::empty())
            .unwrap(),
    )
}

fn post_json(path: &str, body: Json) -> Request<Body> {
    local(
        Request::post(path)
            .header("host", "localhost")
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap(),
    )
}

fn get_with_key(path: &str, key: &str) -> Request<Body> {
    Request::get(path)
        .header("host", "localhost")
        .header("authorization", format!("Bearer {key}"))
        .body(Body::empty())
        .unwrap()
}

async fn body_text(response: axum::response::Response) -> String {
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test]
async fn the_console_is_absent_when_off() {
    let harness = Harness::shipped();
    for path in ["/console", "/console/api/turns", "/console/api/status"] {
        let answer = harness.send(get(path)).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{path}");
    }
    // And no turn is recorded.
    harness.turn(json!({"text": "menu", "user_id": "u1"})).await;
    assert!(harness.state.console.is_none());
}

#[tokio::test]
async fn the_page_and_its_files_are_served_with_a_strict_policy() {
    let harness = console_harness();
    let response = harness.router().oneshot(get("/console")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let policy = response.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(policy.contains("default-src 'none'"), "{policy}");
    let html = body_text(response).await;
    assert!(html.contains("\"console/assets/console.js\""), "{html}");
    for (file, kind) in [("console.js", "javascript"), ("console.css", "css")] {
        let response = harness
            .router()
            .oneshot(get(&format!("/console/assets/{file}")))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{file}");
        let content_type = response.headers()["content-type"].to_str().unwrap();
        assert!(content_type.contains(kind), "{file}: {content_type}");
    }
    let missing = harness.send(get("/console/assets/../../Cargo.toml")).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_turn_is_recorded_step_by_step_with_its_call() {
    let harness = console_harness();
    let envelope = harness
        .turn(json!({"text": "What's on the menu?", "user_id": "u1"}))
        .await;
    let turns = harness.send(get("/console/api/turns")).await;
    assert_eq!(turns.status, StatusCode::OK);
    let summary = &turns.body["turns"][0];
    assert_eq!(summary["intent"], "menu");
    assert_eq!(summary["intent_source"], "rules");
    assert_eq!(summary["route"], "menu");
    assert_eq!(summary["decision"], "reply");
    assert_eq!(summary["call_count"], 1);
    assert_eq!(summary["failed_calls"], 0);
    assert_eq!(summary["trace_id"], envelope["trace_id"]);
    assert_eq!(summary["reply_text"], envelope["reply_text"]);

    let id = summary["id"].as_u64().unwrap();
    let trace = harness
        .send(get(&format!("/console/api/turns/{id}")))
        .await
        .body;
    let evidence = trace["classification"]["evidence"].as_str().unwrap();
    assert!(evidence.contains("keyword `menu`"), "{evidence}");
    let steps = trace["steps"].as_array().unwrap();
    assert!(!steps.is_empty());
    assert!(
        steps
            .iter()
            .all(|step| step["file"].as_str().unwrap().ends_with(".yaml")
                && step["line"].as_u64().unwrap() > 0),
        "{steps:#?}"
    );
    let call_step = steps.iter().find(|step| step["kind"] == "call").unwrap();
    let call = &trace["calls"][0];
    assert_eq!(call["service"], "menu");
    assert_eq!(call["step"], call_step["index"]);
    assert_eq!(call["status"], 200);
    assert!(call["mock"].as_bool().unwrap());
    assert_eq!(call["request"]["user_id"], "u1");
    assert!(
        call["response"].to_string().contains("Margherita pizza"),
        "{:#}",
        call["response"]
    );
    assert_eq!(trace["reply"]["route"], "menu");
    assert!(trace["session_after"].is_object());

    let gone = harness.send(get("/console/api/turns/999999")).await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
    assert_eq!(gone.body["code"], "not_found");
}

#[tokio::test]
async fn secrets_never_reach_a_trace() {
    let harness = console_harness();
    harness
        .turn(json!({
            "text": "I'd like to order a margherita pizza",
            "user_id": "u2",
            "order_items": [{"name": "Margherita pizza", "quantity": 1}],
            "order_payment_method": "card-4242-secret",
            "order_delivery_mode": "pickup",
        }))
        .await;
    let turns = harness.send(get("/console/api/turns")).await.body;
    let id = turns["turns"][0]["id"].as_u64().unwrap();
    let response = harness
        .router()
        .oneshot(get(&format!("/console/api/turns/{id}")))
        .await
        .unwrap();
    let text = body_text(response).await;
    assert!(!text.contains("card-4242-secret"), "{text}");
    let trace: Json = serde_json::from_str(&text).unwrap();
    assert_eq!(trace["input"]["order_payment_method"], "[REDACTED]");
}

#[tokio::test]
async fn a_failed_call_shows_its_error_code_and_the_turn_counts_it() {
    let closed = super::closed_port_url().await;
    let harness = Harness::new(HarnessOptions {
        console: true,
        variables: vec![("MENU_SERVICE_URL", closed)],
        ..HarnessOptions::default()
    });
    harness
        .turn(json!({"text": "What's on the menu?", "user_id": "u3"}))
        .await;
    let turns = harness.send(get("/console/api/turns")).await.body;
    let summary = &turns["turns"][0];
    assert_eq!(summary["failed_calls"], 1);
    assert_eq!(summary["decision"], "error");
    let id = summary["id"].as_u64().unwrap();
    let trace = harness
        .send(get(&format!("/console/api/turns/{id}")))
        .await
        .body;
    let call = &trace["calls"][0];
    assert_eq!(call["error"]["code"], "service_unavailable");
    assert!(call["response"].is_null());
    assert!(call["attempts"].as_u64().unwrap() >= 1);
}

/// Reads server-sent events from `body` until one named `name` arrives.
async fn next_event(body: &mut Body, buffer: &mut String, name: &str) -> Json {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        while let Some(end) = buffer.find("\n\n") {
            let frame: String = buffer.drain(..end + 2).collect();
            let mut event = "message";
            let mut data = String::new();
            for line in frame.lines() {
                if let Some(value) = line.strip_prefix("event:") {
                    event = value.trim();
                } else if let Some(value) = line.strip_prefix("data:") {
                    data.push_str(value.trim_start());
                }
            }
            if event == name {
                return serde_json::from_str(&data).unwrap();
            }
        }
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .unwrap_or_else(|_| panic!("no `{name}` event in time; read {buffer:?}"))
            .expect("the stream ended")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            buffer.push_str(std::str::from_utf8(&data).unwrap());
        }
    }
}

#[tokio::test]
async fn subscribers_see_every_new_turn_and_every_reload() {
    let harness = console_harness();
    let response = harness
        .router()
        .oneshot(get("/console/api/events"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let mut buffer = String::new();
    harness
        .turn(json!({"text": "track my order ORD-1", "user_id": "u4", "channel": "app"}))
        .await;
    let turn = next_event(&mut body, &mut buffer, "turn").await;
    assert_eq!(turn["user_id"], "u4");
    assert_eq!(turn["channel"], "app");
    assert_eq!(turn["route"], "track_order");

    harness.state.events.reloaded();
    let status = next_event(&mut body, &mut buffer, "status").await;
    assert_eq!(status["generation"], 1);
    assert!(
        status["flows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|flow| flow == "menu")
    );

    // Shutdown ends the stream.
    harness.state.events.close();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(frame) = body.frame().await {
            frame.unwrap();
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream outlived shutdown");
}

#[tokio::test]
async fn the_graph_marks_every_step_of_a_flow() {
    let harness = console_harness();
    let response = harness
        .router()
        .oneshot(get("/console/api/graph?flow=menu"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "image/svg+xml");
    let svg = body_text(response).await;
    assert!(svg.starts_with("<svg") || svg.contains("<svg"), "{svg}");
    let deployment = harness.state.deployment.load();
    let menu = deployment
        .project
        .flows
        .iter()
        .find(|flow| flow.name == "menu")
        .unwrap();
    let first = menu.steps[0].index;
    assert!(svg.contains(&format!("id=\"step-{first}\"")), "{svg}");

    let unknown = harness.send(get("/console/api/graph?flow=menuu")).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert!(
        unknown.body["detail"].as_str().unwrap().contains("`menu`"),
        "{:#}",
        unknown.body
    );
}

#[tokio::test]
async fn a_conversation_saved_as_a_test_passes_as_is() {
    let project = shipped_project_copy();
    let harness = Harness::new(HarnessOptions {
        console: true,
        dir: Some(project.path()),
        ..HarnessOptions::default()
    });
    let session = json!({"user_id": "saver", "session_id": "saver:web"});
    for text in [
        "What's on the menu?",
        "track my order ORD-10421",
        "what do you recommend?",
        "anything under $10 or ${HOME}?",
    ] {
        let mut body = session.clone();
        body["text"] = json!(text);
        harness.turn(body).await;
    }
    let saved = harness
        .send(post_json(
            "/console/api/tests",
            json!({"session_id": "saver:web", "name": "Menu, tracking & advice"}),
        ))
        .await;
    assert_eq!(saved.status, StatusCode::OK, "{:#}", saved.body);
    assert_eq!(
        saved.body["path"],
        "flows/tests/console-menu-tracking-advice.yaml"
    );
    let yaml = saved.body["yaml"].as_str().unwrap();
    assert_eq!(yaml.matches("- request:").count(), 4, "{yaml}");
    let written = std::fs::read_to_string(
        project
            .path()
            .join("flows/tests/console-menu-tracking-advice.yaml"),
    )
    .unwrap();
    assert_eq!(written, yaml);

    let run = std::process::Command::new(env!("CARGO_BIN_EXE_mcp-orchestrator"))
        .args(["test", "--filter", "Menu, tracking & advice"])
        .arg(project.path())
        .output()
        .unwrap();
    let output =
        String::from_utf8_lossy(&run.stdout).into_owned() + &String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{output}\n{yaml}");
    assert!(output.contains("Menu, tracking & advice"), "{output}");

    let unknown = harness
        .send(post_json(
            "/console/api/tests",
            json!({"session_id": "nobody:web"}),
        ))
        .await;
    assert_eq!(unknown.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(unknown.body["code"], "invalid_request");
}

fn project_with_console_key() -> tempfile::TempDir {
    project_copy_with("access.yaml", |text| {
        text.replace(
            "  metrics_key:",
            "    - name: console\n      key: \"${CONSOLE_TEST_KEY:-}\"\n      console: true\n  metrics_key:",
        )
    })
}

#[tokio::test]
async fn only_console_keys_open_it_when_one_is_declared() {
    let project = project_with_console_key();
    let closed = super::closed_port_url().await;
    let mut variables: Vec<(&str, String)> = [
        "MENU_SERVICE_URL",
        "ORDER_SERVICE_URL",
        "RECOMMEND_SERVICE_URL",
        "TRACKING_SERVICE_URL",
        "PROFILE_SERVICE_URL",
    ]
    .into_iter()
    .map(|variable| (variable, closed.clone()))
    .collect();
    variables.extend([
        (
            "CONSOLE_TEST_KEY",
            "console-key-0123456789abcdef".to_owned(),
        ),
        ("WEB_APP_API_KEY", "web-app-key-0123456789abcdef".to_owned()),
        ("PARTNER_API_KEY", "partner-key-0123456789abcdef".to_owned()),
    ]);
    let harness = Harness::new(HarnessOptions {
        console: true,
        dir: Some(project.path()),
        environment: Environment::Production,
        variables,
        ..HarnessOptions::default()
    });
    let none = harness.send(get("/console/api/turns")).await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    assert_eq!(none.body["code"], "unauthorized");
    let wrong = harness
        .send(get_with_key(
            "/console/api/turns",
            "web-app-key-0123456789abcdef",
        ))
        .await;
    assert_eq!(wrong.status, StatusCode::FORBIDDEN);
    assert_eq!(wrong.body["code"], "forbidden");
    let events = harness
        .send(get_with_key(
            "/console/api/events",
            "partner-key-0123456789abcdef",
        ))
        .await;
    assert_eq!(events.status, StatusCode::FORBIDDEN);
    let right = harness
        .send(get_with_key(
            "/console/api/status",
            "console-key-0123456789abcdef",
        ))
        .await;
    assert_eq!(right.status, StatusCode::OK);
    assert_eq!(right.body["environment"], "production");
    // The page itself holds no data.
    let page = harness.send(get("/console")).await;
    assert_eq!(page.status, StatusCode::OK);
}

#[tokio::test]
async fn without_keys_only_an_allowed_host_opens_it() {
    let harness = console_harness();
    let rebound = harness
        .send(local(
            Request::get("/console/api/turns")
                .header("host", "attacker.example")
                .body(Body::empty())
                .unwrap(),
        ))
        .await;
    assert_eq!(rebound.status, StatusCode::FORBIDDEN);
    let mut remote = Request::get("/console/api/turns")
        .header("host", "localhost")
        .body(Body::empty())
        .unwrap();
    remote
        .extensions_mut()
        .insert(ConnectInfo(SocketAddr::from(([192, 0, 2, 7], 40_000))));
    let remote = harness.send(remote).await;
    assert_eq!(
        remote.status,
        StatusCode::FORBIDDEN,
        "a machine on the network"
    );
    let allowed = harness
        .send(local(
            Request::get("/console/api/turns")
                .header("host", "LOCALHOST.:8080")
                .body(Body::empty())
                .unwrap(),
        ))
        .await;
    assert_eq!(allowed.status, StatusCode::OK);
}
