//! The edge of `POST /orchestrate`: caller keys (401, 403), rate limits
//! (429 with `Retry-After`), the in-flight cap (503 at once), a key for
//! `/metrics`, and circuit breakers that stop calling a failing service.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{Value as Json, json};

use super::{
    Answer, Harness, HarnessOptions, Stub, json_response, project_copy_with, turn_request,
};
use crate::repository_root;

const WEB_KEY: &str = "web-app-key-0123456789abcdef";
const PARTNER_KEY: &str = "partner-key-0123456789abcdef";
const METRICS_KEY: &str = "metrics-key-0123456789abcdef";

/// The shipped project with its caller keys set (and `extra` variables).
fn with_keys(extra: &[(&'static str, &str)]) -> Harness {
    let mut variables = vec![
        ("WEB_APP_API_KEY", WEB_KEY.to_owned()),
        ("PARTNER_API_KEY", PARTNER_KEY.to_owned()),
        ("METRICS_API_KEY", METRICS_KEY.to_owned()),
    ];
    variables.extend(
        extra
            .iter()
            .map(|(name, value)| (*name, (*value).to_owned())),
    );
    Harness::new(HarnessOptions {
        variables,
        ..HarnessOptions::default()
    })
}

fn post(body: &Json, headers: &[(&str, &str)]) -> Request<Body> {
    let mut request = Request::post("/orchestrate").header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(Body::from(body.to_string())).unwrap()
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

#[track_caller]
fn assert_problem(answer: &Answer, status: StatusCode, code: &str) {
    assert_eq!(answer.status, status, "{:#}", answer.body);
    assert_eq!(answer.content_type(), "application/problem+json");
    assert_eq!(answer.body["code"], code, "{:#}", answer.body);
}

#[tokio::test]
async fn with_keys_declared_a_turn_needs_one_of_them() {
    let harness = with_keys(&[]);
    let body = turn_request("Can you read me the menu?");

    let answer = harness.send(post(&body, &[])).await;
    assert_problem(&answer, StatusCode::UNAUTHORIZED, "unauthorized");
    assert_eq!(answer.headers["www-authenticate"], "Bearer");

    let wrong = bearer("web-app-key-0123456789abcdeX");
    let answer = harness
        .send(post(&body, &[("authorization", &wrong)]))
        .await;
    assert_problem(&answer, StatusCode::UNAUTHORIZED, "unauthorized");
    assert!(
        !answer.body.to_string().contains("0123456789"),
        "{}",
        answer.body
    );

    let answer = harness
        .send(post(&body, &[("authorization", &bearer(WEB_KEY))]))
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{:#}", answer.body);
    assert_eq!(answer.body["route"], "menu");

    let answer = harness
        .send(post(&body, &[("x-api-key", PARTNER_KEY)]))
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{:#}", answer.body);
}

#[tokio::test]
async fn a_key_may_send_only_its_channels() {
    let harness = with_keys(&[]);
    let body = json!({"text": "Can you read me the menu?", "user_id": "u-1", "channel": "sms"});
    let answer = harness
        .send(post(&body, &[("authorization", &bearer(WEB_KEY))]))
        .await;
    assert_problem(&answer, StatusCode::FORBIDDEN, "forbidden");
    assert!(answer.body["detail"].as_str().unwrap().contains("web-app"));
    // The partner key has no channel list: any channel.
    let answer = harness
        .send(post(&body, &[("authorization", &bearer(PARTNER_KEY))]))
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{:#}", answer.body);
}

#[tokio::test]
async fn health_names_the_keys_never_their_values_and_metrics_need_their_key() {
    let harness = with_keys(&[]);
    let health = harness
        .send(Request::get("/health").body(Body::empty()).unwrap())
        .await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.body["auth"], "api_key");
    assert_eq!(health.body["caller_keys"], json!(["web-app", "partner"]));
    assert_eq!(health.body["metrics_auth"], "api_key");
    let text = health.body.to_string();
    for secret in [WEB_KEY, PARTNER_KEY, METRICS_KEY] {
        assert!(!text.contains(secret), "{text}");
    }

    let metrics = harness
        .send(Request::get("/metrics").body(Body::empty()).unwrap())
        .await;
    assert_problem(&metrics, StatusCode::UNAUTHORIZED, "unauthorized");
    let metrics = harness
        .send(
            Request::get("/metrics")
                .header("authorization", bearer(METRICS_KEY))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(metrics.status, StatusCode::OK);

    // Without keys (the variables unset, outside production): open.
    let open = Harness::shipped();
    let health = open
        .send(Request::get("/health").body(Body::empty()).unwrap())
        .await;
    assert_eq!(health.body["auth"], "none");
    assert_eq!(health.body["caller_keys"], json!([]));
    let answer = open
        .orchestrate(turn_request("Can you read me the menu?"))
        .await;
    assert_eq!(answer.status, StatusCode::OK);
}

#[tokio::test]
async fn twenty_turns_of_one_user_against_five_a_second_are_limited_and_others_are_not() {
    let harness = with_keys(&[("PER_USER_RATE", "5/s")]);
    let key = bearer(WEB_KEY);
    let started = Instant::now();
    let answers = futures_util::future::join_all((0..20).map(|_| {
        harness.send(post(
            &turn_request("this is nice"),
            &[("authorization", key.as_str())],
        ))
    }))
    .await;
    let elapsed = started.elapsed();
    let ok = answers
        .iter()
        .filter(|a| a.status == StatusCode::OK)
        .count();
    let limited: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.status == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    assert_eq!(ok + limited.len(), 20, "{answers:#?}");
    // The burst of 5, plus what came back while the turns ran.
    let most = 5 + (elapsed.as_secs_f64() * 5.0).ceil() as usize;
    assert!(ok >= 5 && ok <= most, "{ok} answered in {elapsed:?}");
    assert!(!limited.is_empty());
    for answer in limited {
        assert_eq!(answer.body["code"], "rate_limited");
        let retry_after: u64 = answer.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=1).contains(&retry_after), "{retry_after}");
    }
    let other = harness
        .send(post(
            &json!({"text": "this is nice", "user_id": "u-2"}),
            &[("authorization", key.as_str())],
        ))
        .await;
    assert_eq!(other.status, StatusCode::OK, "{:#}", other.body);
}

#[tokio::test]
async fn a_caller_key_over_its_rate_is_limited_before_its_body_is_read() {
    let harness = with_keys(&[("PER_KEY_RATE", "3/m")]);
    let web = bearer(WEB_KEY);
    for n in 0..3 {
        let body = json!({"text": "this is nice", "user_id": format!("u-{n}")});
        let answer = harness.send(post(&body, &[("authorization", &web)])).await;
        assert_eq!(answer.status, StatusCode::OK, "{:#}", answer.body);
    }
    // Not even JSON: refused on the key's rate first.
    let answer = harness
        .send(
            Request::post("/orchestrate")
                .header("content-type", "application/json")
                .header("authorization", &web)
                .body(Body::from("{not json"))
                .unwrap(),
        )
        .await;
    assert_problem(&answer, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    let retry_after: u64 = answer.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=20).contains(&retry_after), "{retry_after}");
    // The other key has its own bucket.
    let answer = harness
        .send(post(
            &turn_request("this is nice"),
            &[("x-api-key", PARTNER_KEY)],
        ))
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{:#}", answer.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_in_flight_a_turn_is_refused_at_once() {
    // The menu service holds every call until released.
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let arrived = Arc::new(AtomicUsize::new(0));
    let stub = Stub::start({
        let release = release.clone();
        let arrived = arrived.clone();
        move |_, _| {
            let release = release.clone();
            let arrived = arrived.clone();
            async move {
                arrived.fetch_add(1, Ordering::SeqCst);
                let _released = release.acquire().await.unwrap();
                json_response(200, menu_mock())
            }
        }
    })
    .await;
    let project = project_copy_with("access.yaml", |text| {
        text.replace("max_in_flight: 512", "max_in_flight: 2")
    });
    let harness = Arc::new(Harness::new(HarnessOptions {
        dir: Some(project.path()),
        variables: vec![("MENU_SERVICE_URL", stub.url())],
        ..HarnessOptions::default()
    }));
    let running: Vec<_> = (0..2)
        .map(|n| {
            let harness = harness.clone();
            tokio::spawn(async move {
                harness
                    .orchestrate(
                        json!({"text": "Can you read me the menu?", "user_id": format!("u-{n}")}),
                    )
                    .await
            })
        })
        .collect();
    crate::session_stores::wait_until("both turns reach the menu service", || {
        let arrived = arrived.clone();
        async move { arrived.load(Ordering::SeqCst) == 2 }
    })
    .await;
    let started = Instant::now();
    let refused = harness.orchestrate(turn_request("this is nice")).await;
    assert_problem(&refused, StatusCode::SERVICE_UNAVAILABLE, "overloaded");
    assert_eq!(refused.headers["retry-after"], "1");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let health = harness
        .send(Request::get("/health").body(Body::empty()).unwrap())
        .await;
    assert_eq!(health.body["limits"]["in_flight"], 2, "{:#}", health.body);

    release.add_permits(2);
    for turn in running {
        let answer = turn.await.unwrap();
        assert_eq!(answer.status, StatusCode::OK, "{:#}", answer.body);
    }
    let answer = harness.orchestrate(turn_request("this is nice")).await;
    assert_eq!(answer.status, StatusCode::OK, "{:#}", answer.body);
}

fn menu_mock() -> Json {
    let path = repository_root().join("mocks/menu.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_failing_five_times_opens_its_circuit_then_a_probe_closes_it() {
    let healthy = Arc::new(AtomicBool::new(false));
    let stub = Stub::start({
        let healthy = healthy.clone();
        move |_, _| {
            let healthy = healthy.clone();
            async move {
                if healthy.load(Ordering::SeqCst) {
                    json_response(200, menu_mock())
                } else {
                    json_response(500, json!({"error": "down"}))
                }
            }
        }
    })
    .await;
    let project = project_copy_with("services.yaml", |text| {
        text.replace(
            "circuit_breaker: { failures: 5, open_for: 30s }",
            "circuit_breaker: { failures: 5, open_for: 4s }",
        )
    });
    let harness = Harness::new(HarnessOptions {
        dir: Some(project.path()),
        variables: vec![("MENU_SERVICE_URL", stub.url())],
        ..HarnessOptions::default()
    });
    let menu = || turn_request("Can you read me the menu?");
    for _ in 0..5 {
        let envelope = harness.turn(menu()).await;
        assert_eq!(envelope["decision"], "error", "{envelope:#}");
        assert_eq!(envelope["service_spans"][0]["error"], "service_http_error");
    }
    // Three attempts a turn (the menu service retries): the circuit counts
    // turns, not attempts.
    let calls = stub.received().len();
    assert_eq!(calls, 15);

    let envelope = harness.turn(menu()).await;
    assert_eq!(envelope["decision"], "error", "{envelope:#}");
    assert_eq!(envelope["service_spans"][0]["error"], "circuit_open");
    assert_eq!(envelope["service_spans"][0]["attempts"], 0);
    assert_eq!(
        stub.received().len(),
        calls,
        "no call while the circuit is open"
    );
    let health = harness
        .send(Request::get("/health").body(Body::empty()).unwrap())
        .await;
    let menu_service = health.body["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "menu")
        .unwrap()
        .clone();
    assert_eq!(menu_service["circuit"], "open", "{:#}", health.body);

    // The service recovers; after `open_for` one probe goes through and
    // closes the circuit.
    healthy.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let envelope = harness.turn(menu()).await;
        if envelope["decision"] == "reply" {
            assert_eq!(envelope["route"], "menu");
            break;
        }
        assert_eq!(envelope["service_spans"][0]["error"], "circuit_open");
        assert!(Instant::now() < deadline, "the circuit never closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stub.received().len(), calls + 1, "one probe, then closed");
    let envelope = harness.turn(menu()).await;
    assert_eq!(envelope["decision"], "reply");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_cut_by_the_request_deadline_do_not_open_the_circuit() {
    // The service is fine but slower than the whole request may take.
    let stub = Stub::start(|_, _| async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        json_response(200, menu_mock())
    })
    .await;
    let harness = Harness::new(HarnessOptions {
        variables: vec![("MENU_SERVICE_URL", stub.url())],
        request_timeout: Duration::from_millis(200),
        ..HarnessOptions::default()
    });
    for _ in 0..7 {
        let envelope = harness
            .turn(turn_request("Can you read me the menu?"))
            .await;
        assert_eq!(envelope["service_spans"][0]["error"], "service_timeout");
    }
    // Every turn called the service: the deadline's cuts are not its failures.
    assert_eq!(stub.received().len(), 7);
    assert_eq!(
        harness.state.breakers.state("menu"),
        mcp_orchestrator::services::CircuitState::Closed
    );
}
