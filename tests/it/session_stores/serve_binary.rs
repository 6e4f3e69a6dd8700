//! `mcp-orchestrator serve` with `SESSION_STORE_URL`: the real binary
//! starts while Redis is down, keeps sessions in Redis once it is up, and
//! never prints the URL's password.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value as Json, json};

use super::{PrivateRedis, WAIT_DEADLINE, free_port, session_project, wait_until};
use crate::runtime::http_client;
use crate::runtime::serve_binary::{KillOnDrop, listening_port, serve_command, stderr_lines};

const PASSWORD: &str = "binary-redis-password-never-printed";

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_starts_while_redis_is_down_then_keeps_sessions_there_and_never_prints_the_password()
{
    if super::skip_without_redis() {
        return;
    }
    let redis_port = free_port();
    let url = format!("redis://:{PASSWORD}@127.0.0.1:{redis_port}/1");
    let project = session_project(0);
    let variables = [
        ("MCP_PROJECT_DIR", project.path().to_str().unwrap()),
        ("SESSION_STORE_URL", url.as_str()),
        ("SESSION_KEY_PREFIX", "binary:"),
        ("SESSION_STORE_TIMEOUT", "250ms"),
    ];

    let help = serve_command(&variables).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("SESSION_STORE_TIMEOUT"), "{help}");
    assert!(!help.contains(PASSWORD), "{help}");

    let mut child = KillOnDrop(serve_command(&variables).spawn().unwrap());
    let lines = stderr_lines(&mut child.0);
    let mut logged = Vec::new();
    let port = listening_port(&lines, &mut logged, WAIT_DEADLINE);
    assert!(
        logged
            .iter()
            .any(|line| line.contains("does not answer yet")
                && line.contains("session_store_unavailable")),
        "{logged:#?}"
    );

    let client = http_client();
    let base = format!("http://127.0.0.1:{port}");
    let health = || {
        let client = client.clone();
        let base = base.clone();
        async move {
            client
                .get(format!("{base}/health"))
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .unwrap()
                .json::<Json>()
                .await
                .unwrap()
        }
    };
    let down = health().await;
    assert_eq!(down["status"], "degraded", "{down:#}");
    assert_eq!(down["session_store"]["status"], "unavailable", "{down:#}");
    assert_eq!(
        down["session_store"]["address"],
        format!("redis://127.0.0.1:{redis_port}/1")
    );

    let redis = PrivateRedis::start_with_on(redis_port, &["--requirepass", PASSWORD]).await;
    wait_until("the binary's store connects", || {
        let health = health();
        async move { health.await["session_store"]["status"] == "ok" }
    })
    .await;
    let visit = |trace_id: &'static str| {
        let client = client.clone();
        let base = base.clone();
        async move {
            client
                .post(format!("{base}/orchestrate"))
                .json(
                    &json!({"text": "visit", "user_id": "u-1", "session_id": "binary-session",
                              "trace_id": trace_id}),
                )
                .send()
                .await
                .unwrap()
                .json::<Json>()
                .await
                .unwrap()
        }
    };
    assert_eq!(visit("t-1").await["route"], "first_visit");
    assert_eq!(visit("t-2").await["route"], "returning");
    let mut admin = redis.admin(&url).await;
    let turns: u64 = redis::cmd("HGET")
        .arg("binary:binary-session")
        .arg("turns")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(turns, 2);

    let killed = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let exit_deadline = Instant::now() + WAIT_DEADLINE;
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < exit_deadline, "serve did not stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(0));
    // The reader thread ends with the pipe: collect every line.
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(5)) {
        logged.push(line);
    }
    for line in &logged {
        assert!(!line.contains(PASSWORD), "{line}");
    }
}
