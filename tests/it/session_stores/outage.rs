//! Redis trouble under a running app: stopped, paused (connections open,
//! no answer), a connection gone silent, slower than the request's
//! deadline. Every turn is answered
//! in time, without its session; the log line, the request span, the
//! metric and `/health` say `session_store_unavailable`; once Redis is back
//! the store works again without restarting the app.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::future::join_all;
use mcp_orchestrator::session::{SessionStore, TurnUpdate};
use mcp_orchestrator::telemetry::prometheus;
use serde_json::Value as Json;
use tokio::time::Instant;

use super::{
    CapturedLines, PrivateRedis, counter_value, health, redis_store, replica, session_project,
    visit, wait_until,
};

const SHORT_OPERATION_TIMEOUT: Duration = Duration::from_millis(250);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
const TTL: Duration = Duration::from_secs(600);
const TURNS_DURING_OUTAGE: usize = 10;

const LOAD_ERRORS: &str = r#"mcp_session_store_errors_total{operation="load"}"#;
const APPLY_ERRORS: &str = r#"mcp_session_store_errors_total{operation="apply"}"#;

/// A current-thread runtime: the captured subscriber is the thread's, so
/// every event of the app must happen on it.
#[tokio::test]
async fn redis_stopped_mid_run_every_turn_is_answered_in_time_and_reported_then_it_recovers() {
    if super::skip_without_redis() {
        return;
    }
    prometheus::install();
    let captured = CapturedLines::start().await;
    let mut redis = PrivateRedis::start().await;
    let project = session_project(0);
    let app = replica(
        project.path(),
        redis_store(&redis.url(), TTL, SHORT_OPERATION_TIMEOUT),
        REQUEST_TIMEOUT,
    );

    assert_eq!(visit(&app, "s-1", "before-1").await["route"], "first_visit");
    assert_eq!(visit(&app, "s-1", "before-2").await["route"], "returning");
    let healthy = health(&app).await;
    assert_eq!(healthy["status"], "ok", "{healthy:#}");
    assert_eq!(healthy["session_store"]["kind"], "redis");
    assert_eq!(healthy["session_store"]["status"], "ok");
    assert_eq!(
        healthy["sessions"],
        Json::Null,
        "Redis does not count sessions"
    );

    redis.stop();
    let load_errors = counter_value(LOAD_ERRORS);
    let apply_errors = counter_value(APPLY_ERRORS);
    for turn in 0..TURNS_DURING_OUTAGE {
        let started = Instant::now();
        let envelope = visit(&app, "s-1", &format!("outage-{turn}")).await;
        let elapsed = started.elapsed();
        assert!(
            elapsed < REQUEST_TIMEOUT,
            "turn {turn} took {elapsed:?}, past its deadline"
        );
        // Without its session the turn is a first visit: answered all the same.
        assert_eq!(envelope["route"], "first_visit", "{envelope:#}");
        assert_eq!(envelope["decision"], "reply");
    }
    let down = health(&app).await;
    assert_eq!(down["status"], "degraded", "{down:#}");
    let store = &down["session_store"];
    assert_eq!(store["status"], "unavailable", "{down:#}");
    assert_eq!(store["code"], "session_store_unavailable");
    assert!(
        store["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{down:#}"
    );
    assert!(store["last_error_at"].is_string(), "{down:#}");
    // Other tests may count too: the counters only grow.
    assert!(counter_value(LOAD_ERRORS) >= load_errors + TURNS_DURING_OUTAGE as f64);
    assert!(counter_value(APPLY_ERRORS) >= apply_errors + TURNS_DURING_OUTAGE as f64);

    redis.restart().await;
    wait_until("the store answers again", || {
        let app = app.clone();
        async move { health(&app).await["session_store"]["status"] == "ok" }
    })
    .await;
    let recovered = health(&app).await;
    assert_eq!(recovered["status"], "ok", "{recovered:#}");
    // The last outage stays visible.
    assert!(recovered["session_store"]["last_error"].is_string());
    // The restarted Redis is empty: the session starts again, and is kept.
    assert_eq!(visit(&app, "s-1", "after-1").await["route"], "first_visit");
    assert_eq!(visit(&app, "s-1", "after-2").await["route"], "returning");

    let lines = captured.lines().await;
    let of_trace = |trace_id: &str, event_type: &str| -> Vec<&Json> {
        lines
            .iter()
            .filter(|line| line["trace_id"] == trace_id && line["event_type"] == event_type)
            .collect()
    };
    for turn in 0..TURNS_DURING_OUTAGE {
        let trace_id = format!("outage-{turn}");
        let errors = of_trace(&trace_id, "session_error");
        let operations: Vec<&str> = errors
            .iter()
            .map(|line| line["operation"].as_str().unwrap())
            .collect();
        assert_eq!(operations.len(), 2, "{errors:#?}");
        assert!(operations.contains(&"load") && operations.contains(&"apply"));
        for line in &errors {
            assert_eq!(line["code"], "session_store_unavailable", "{line}");
            assert_eq!(line["level"], "WARN");
        }
        // The request span carries the code, so the turn's `output` line
        // says it ran without its session.
        let output = of_trace(&trace_id, "output");
        assert_eq!(output.len(), 1, "{lines:#?}");
        assert_eq!(output[0]["session_error"], "session_store_unavailable");
    }
    for trace_id in ["before-1", "after-2"] {
        let output = of_trace(trace_id, "output");
        assert_eq!(output.len(), 1, "{lines:#?}");
        assert!(output[0].get("session_error").is_none(), "{}", output[0]);
    }
    // One line when the store became unavailable, one when it came back.
    let store_lines: Vec<&str> = lines
        .iter()
        .filter(|line| line["event_type"] == "session_store")
        .map(|line| line["message"].as_str().unwrap())
        .collect();
    assert!(
        store_lines
            .iter()
            .any(|m| m.starts_with("Session store unavailable")),
        "{store_lines:?}"
    );
    assert!(
        store_lines
            .iter()
            .any(|m| m.starts_with("Session store reachable again")),
        "{store_lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_stops_answering_holds_no_turn_and_no_health_check() {
    if super::skip_without_redis() {
        return;
    }
    let redis = PrivateRedis::start().await;
    let project = session_project(0);
    let app = replica(
        project.path(),
        redis_store(&redis.url(), TTL, SHORT_OPERATION_TIMEOUT),
        REQUEST_TIMEOUT,
    );
    assert_eq!(visit(&app, "s-1", "t-1").await["route"], "first_visit");

    redis.pause();
    let turns = (0..5).map(|turn| {
        let app = app.clone();
        async move {
            let started = Instant::now();
            let envelope = visit(&app, "s-1", &format!("paused-{turn}")).await;
            (started.elapsed(), envelope)
        }
    });
    for (elapsed, envelope) in join_all(turns).await {
        assert!(elapsed < REQUEST_TIMEOUT, "a turn took {elapsed:?}");
        assert_eq!(envelope["decision"], "reply", "{envelope:#}");
    }
    let started = Instant::now();
    let paused = health(&app).await;
    assert!(
        started.elapsed() < REQUEST_TIMEOUT,
        "/health took {:?}",
        started.elapsed()
    );
    assert_eq!(
        paused["session_store"]["status"], "unavailable",
        "{paused:#}"
    );
    let last_error = paused["session_store"]["last_error"].as_str().unwrap();
    assert!(
        last_error.contains("no answer within 250ms"),
        "{last_error}"
    );

    redis.resume();
    wait_until("the store answers again", || {
        let app = app.clone();
        async move { health(&app).await["session_store"]["status"] == "ok" }
    })
    .await;
    // The session from before the pause is still there.
    assert_eq!(visit(&app, "s-1", "t-2").await["route"], "returning");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_slower_than_the_request_deadline_is_cut_at_the_deadline() {
    if super::skip_without_redis() {
        return;
    }
    // The store would wait 30 s; the request may take 1 s.
    const PATIENT_STORE: Duration = Duration::from_secs(30);
    const SHORT_REQUEST: Duration = Duration::from_secs(1);
    let redis = PrivateRedis::start().await;
    let project = session_project(0);
    let app = replica(
        project.path(),
        redis_store(&redis.url(), TTL, PATIENT_STORE),
        SHORT_REQUEST,
    );
    assert_eq!(visit(&app, "s-1", "t-1").await["route"], "first_visit");
    redis.pause();
    let started = Instant::now();
    let envelope = visit(&app, "s-1", "t-2").await;
    let elapsed = started.elapsed();
    assert_eq!(envelope["decision"], "reply", "{envelope:#}");
    // Cut at the deadline (1 s), with room for a loaded machine, and far
    // from the store's own 30 s.
    assert!(elapsed < SHORT_REQUEST * 5, "the turn took {elapsed:?}");
    redis.resume();
}

/// A TCP relay to `target` on `127.0.0.1:0`. `silence()` makes every
/// connection open so far go quiet, as a host lost without closing its
/// connections does: bytes in either direction are dropped, the sockets stay
/// open. Connections made after it relay normally.
struct SilencingRelay {
    port: u16,
    /// Connections numbered up to this one are silent.
    silenced_up_to: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl SilencingRelay {
    async fn start(target: u16) -> SilencingRelay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let silenced_up_to = Arc::new(AtomicU64::new(0));
        let silenced = silenced_up_to.clone();
        let accept = tokio::spawn(async move {
            let mut number = 0;
            while let Ok((client, _)) = listener.accept().await {
                number += 1;
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(relay(client_read, server_write, number, silenced.clone()));
                tokio::spawn(relay(server_read, client_write, number, silenced.clone()));
            }
        });
        SilencingRelay {
            port,
            silenced_up_to,
            accept,
        }
    }

    /// Connections 1 to `up_to` (in the order they were made) go quiet
    /// and stay open.
    fn silence(&self, up_to: u64) {
        self.silenced_up_to.store(up_to, Ordering::SeqCst);
    }
}

impl Drop for SilencingRelay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    number: u64,
    silenced_up_to: Arc<AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0; 16 * 1024];
    // Held open when silent: dropped only when the other side closes.
    while let Ok(read) = from.read(&mut buffer).await {
        if read == 0 {
            return;
        }
        if number <= silenced_up_to.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_goes_silent_is_replaced_and_the_store_recovers() {
    if super::skip_without_redis() {
        return;
    }
    let redis = PrivateRedis::start().await;
    let relay = SilencingRelay::start(redis.port).await;
    let store = redis_store(
        &format!("redis://127.0.0.1:{}", relay.port),
        Duration::from_secs(600),
        Duration::from_millis(200),
    );
    let update = TurnUpdate {
        route: "r".to_owned(),
        variables: serde_json::Map::new(),
    };
    store.apply("s-1", &update).await.unwrap();

    // The store's one connection goes quiet without closing; Redis is fine.
    relay.silence(1);
    assert!(
        store.load("s-1").await.is_err(),
        "a silent connection answered"
    );
    // Timeouts in a row make the store take the connection for hung and
    // open a new one, which the relay passes on.
    wait_until("the store replaces its silent connection", || {
        let store = store.clone();
        let update = update.clone();
        async move { store.apply("s-1", &update).await.is_ok() }
    })
    .await;
    assert_eq!(store.load("s-1").await.unwrap().turns, 2);
    drop(redis);
}
