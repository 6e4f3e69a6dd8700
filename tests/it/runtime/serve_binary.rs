//! `mcp-orchestrator serve`, the real binary: it refuses to start on a
//! project it cannot run, and otherwise serves until SIGTERM.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{repository_root, shipped_project_copy};

/// How long the binary may take to exit on its own, on a loaded machine.
const EXIT_DEADLINE: Duration = Duration::from_secs(60);

/// `serve` with only `PATH` and `variables` in its environment.
pub(crate) fn serve_command(variables: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mcp-orchestrator"));
    command
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("PORT", "0")
        .env("LOG_FORMAT", "json")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (name, value) in variables {
        command.env(name, value);
    }
    command
}

/// Waits, with a deadline, for the child to exit; returns its exit code and
/// its stderr. Kills it if the deadline passes.
fn wait_for_exit(mut child: Child) -> (Option<i32>, String) {
    let deadline = Instant::now() + EXIT_DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`serve` did not exit within {EXIT_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        pipe.read_to_string(&mut stderr).unwrap();
    }
    (status.code(), stderr)
}

#[test]
fn serve_in_production_without_service_urls_exits_one_naming_the_variables() {
    let child = serve_command(&[
        ("MCP_ENV", "production"),
        ("MCP_PROJECT_DIR", repository_root().to_str().unwrap()),
    ])
    .spawn()
    .unwrap();
    let (code, stderr) = wait_for_exit(child);
    assert_eq!(code, Some(1), "{stderr}");
    for variable in [
        "MENU_SERVICE_URL",
        "ORDER_SERVICE_URL",
        "RECOMMEND_SERVICE_URL",
        "TRACKING_SERVICE_URL",
        "PROFILE_SERVICE_URL",
    ] {
        assert!(
            stderr.contains(variable),
            "{variable} not named in: {stderr}"
        );
    }
}

#[test]
fn serve_in_production_with_some_urls_names_only_the_missing_ones() {
    let child = serve_command(&[
        ("MCP_ENV", "production"),
        ("MCP_PROJECT_DIR", repository_root().to_str().unwrap()),
        ("MENU_SERVICE_URL", "http://127.0.0.1:9/menu"),
        ("ORDER_SERVICE_URL", "http://127.0.0.1:9/order"),
        ("RECOMMEND_SERVICE_URL", "http://127.0.0.1:9/recommend"),
        ("TRACKING_SERVICE_URL", "http://127.0.0.1:9/tracking"),
    ])
    .spawn()
    .unwrap();
    let (code, stderr) = wait_for_exit(child);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("PROFILE_SERVICE_URL"), "{stderr}");
    assert!(!stderr.contains("MENU_SERVICE_URL"), "{stderr}");
}

#[test]
fn serve_in_production_refuses_a_channel_whose_secrets_are_unset() {
    let mut variables: Vec<(&str, &str)> = vec![
        ("MCP_ENV", "production"),
        ("MENU_SERVICE_URL", "http://127.0.0.1:9/menu"),
        ("ORDER_SERVICE_URL", "http://127.0.0.1:9/order"),
        ("RECOMMEND_SERVICE_URL", "http://127.0.0.1:9/recommend"),
        ("TRACKING_SERVICE_URL", "http://127.0.0.1:9/tracking"),
        ("PROFILE_SERVICE_URL", "http://127.0.0.1:9/profile"),
        ("WEB_APP_API_KEY", "web-app-key-0123456789abcdef"),
        ("PARTNER_API_KEY", "partner-key-0123456789abcdef"),
        ("METRICS_API_KEY", "metrics-key-0123456789abcdef"),
    ];
    let root = repository_root();
    variables.push(("MCP_PROJECT_DIR", root.to_str().unwrap()));
    // Every channel secret but Slack's.
    variables.extend(
        crate::CHANNEL_SECRETS
            .iter()
            .copied()
            .filter(|(name, _)| !name.starts_with("SLACK_")),
    );
    let child = serve_command(&variables).spawn().unwrap();
    let (code, stderr) = wait_for_exit(child);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "error[unset-env-var]: channel `slack` is disabled: `SLACK_SIGNING_SECRET`, `SLACK_BOT_TOKEN` are not set"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("channel `telegram`"), "{stderr}");
    assert!(!stderr.contains("SERVICE_URL"), "{stderr}");
}

#[test]
fn serve_with_an_invalid_project_exits_one_with_the_location() {
    let project = shipped_project_copy();
    let order = project.path().join("flows/order.yaml");
    let text = std::fs::read_to_string(&order).unwrap();
    let typo = text.replace(
        "Your order {{ placed.order_id }}",
        "Your order {{ placed.order_idd }}",
    );
    assert_ne!(typo, text);
    std::fs::write(&order, typo).unwrap();
    let line = text
        .lines()
        .position(|line| line.contains("Your order {{"))
        .unwrap()
        + 1;

    let child = serve_command(&[])
        .arg("--project-dir")
        .arg(project.path())
        .spawn()
        .unwrap();
    let (code, stderr) = wait_for_exit(child);
    assert_eq!(code, Some(1), "{stderr}");
    let location = format!("flows/order.yaml:{line}:");
    let after = stderr
        .split(&location)
        .nth(1)
        .unwrap_or_else(|| panic!("no `{location}<column>` in: {stderr}"));
    assert!(
        after.starts_with(|c: char| c.is_ascii_digit()),
        "no column after `{location}` in: {stderr}"
    );
    assert!(stderr.contains("did you mean `order_id`?"), "{stderr}");
    assert!(stderr.contains("not starting"), "{stderr}");
}

/// Kills the child when the test fails before it exits; `None` once it
/// has been waited for.
struct KillUnlessWaited(Option<Child>);

impl Drop for KillUnlessWaited {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(unix)]
#[tokio::test]
async fn serve_runs_on_mocks_in_development_and_stops_on_sigterm() {
    let child = serve_command(&[("MCP_PROJECT_DIR", repository_root().to_str().unwrap())])
        .spawn()
        .unwrap();
    let mut child = KillUnlessWaited(Some(child));
    // The log says where it listens: `{"address":"0.0.0.0:<port>",...}`.
    let lines = stderr_lines(child.0.as_mut().unwrap());
    let mut logged = Vec::new();
    let port = listening_port(&lines, &mut logged, EXIT_DEADLINE);
    assert!(
        logged
            .iter()
            .any(|line| line.contains("Service runs on its mock")),
        "{logged:#?}"
    );

    let client = super::http_client();
    let health: serde_json::Value = client
        .get(format!("http://127.0.0.1:{port}/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["environment"], "development");
    assert_eq!(health["mocked_services"].as_array().unwrap().len(), 5);
    let envelope: serde_json::Value = client
        .post(format!("http://127.0.0.1:{port}/orchestrate"))
        .json(&serde_json::json!({"text": "Can I see the menu?", "user_id": "u-1"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(envelope["route"], "menu");

    let pid = child.0.as_ref().unwrap().id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    let child = child.0.take().unwrap();
    let (code, _) = tokio::task::spawn_blocking(move || wait_for_exit(child))
        .await
        .unwrap();
    assert_eq!(code, Some(0));
}

/// Kills a spawned binary when the test ends, passed or failed.
pub(crate) struct KillOnDrop(pub(crate) Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `serve` with `variables`, listening on its own port, killed when
/// dropped; its log lines are kept as they are read.
pub(crate) struct Served {
    pub(crate) port: u16,
    lines: std::sync::mpsc::Receiver<String>,
    logged: std::cell::RefCell<Vec<String>>,
    _child: KillOnDrop,
}

impl Served {
    /// Starts it and waits, at most `wait`, until it listens.
    pub(crate) async fn start(variables: &[(&str, &str)], wait: Duration) -> Served {
        let mut child = serve_command(variables).spawn().unwrap();
        let lines = stderr_lines(&mut child);
        let child = KillOnDrop(child);
        let (port, lines, logged) = tokio::task::spawn_blocking(move || {
            let mut logged = Vec::new();
            let port = listening_port(&lines, &mut logged, wait);
            (port, lines, logged)
        })
        .await
        .unwrap_or_else(|error| std::panic::resume_unwind(error.into_panic()));
        Served {
            port,
            lines,
            logged: std::cell::RefCell::new(logged),
            _child: child,
        }
    }

    /// Sends SIGTERM, as an orchestrator stopping the process does.
    pub(crate) fn terminate(&self) {
        let pid = self._child.0.id().to_string();
        let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(killed.success());
    }

    /// Every line logged so far.
    pub(crate) fn logged(&self) -> std::cell::Ref<'_, Vec<String>> {
        self.logged.borrow_mut().extend(self.lines.try_iter());
        self.logged.borrow()
    }
}

/// The child's stderr, line by line, read on a thread of its own.
pub(crate) fn stderr_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let stderr = child.stderr.take().unwrap();
    let (lines_sender, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if lines_sender.send(line).is_err() {
                break;
            }
        }
    });
    lines
}

/// The port of the `Listening` JSON log line, read within `wait`; every
/// line read is kept in `logged`.
pub(crate) fn listening_port(
    lines: &std::sync::mpsc::Receiver<String>,
    logged: &mut Vec<String>,
    wait: Duration,
) -> u16 {
    let deadline = Instant::now() + wait;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(remaining)
            .unwrap_or_else(|_| panic!("no `Listening` log line; logged: {logged:#?}"));
        let event: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        logged.push(line);
        if event["message"] == "Listening" {
            let address = event["address"].as_str().unwrap();
            return address.rsplit(':').next().unwrap().parse::<u16>().unwrap();
        }
    }
}

#[cfg(unix)]
#[tokio::test]
async fn serve_ships_logs_to_loki_and_flushes_them_on_sigterm() {
    const TOKEN: &str = "glc_binary-token-never-logged";
    let loki =
        super::Stub::start(|_, _| async { super::json_response(204, serde_json::Value::Null) })
            .await;
    let loki_url = loki.url();
    let child = serve_command(&[
        ("MCP_PROJECT_DIR", repository_root().to_str().unwrap()),
        ("GRAFANA_LOKI_URL", loki_url.as_str()),
        ("GRAFANA_LOKI_USERNAME", "424242"),
        ("GRAFANA_LOKI_API_TOKEN", TOKEN),
        ("MCP_APP_LABEL", "mcp_binary_test"),
    ])
    .spawn()
    .unwrap();
    let mut child = KillUnlessWaited(Some(child));
    let lines = stderr_lines(child.0.as_mut().unwrap());
    let mut logged = Vec::new();
    let port = listening_port(&lines, &mut logged, EXIT_DEADLINE);

    let client = super::http_client();
    let envelope: serde_json::Value = client
        .post(format!("http://127.0.0.1:{port}/orchestrate"))
        .json(
            &serde_json::json!({"text": "Can I see the menu?", "user_id": "u-1",
                                  "trace_id": "trace-binary"}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(envelope["route"], "menu");
    let metrics = client
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"mcp_requests_total{endpoint="/orchestrate",caller="anonymous",route="menu",intent="menu",status="200"} 1"#),
        "{metrics}"
    );

    let pid = child.0.as_ref().unwrap().id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    let child = child.0.take().unwrap();
    let (code, _) = tokio::task::spawn_blocking(move || wait_for_exit(child))
        .await
        .unwrap();
    assert_eq!(code, Some(0));
    logged.extend(lines.try_iter());

    let mut pushed = Vec::new();
    for request in loki.received() {
        assert_eq!(request.path, "/loki/api/v1/push");
        assert!(
            request
                .header("authorization")
                .unwrap()
                .starts_with("Basic ")
        );
        for stream in request.body["streams"].as_array().unwrap() {
            assert_eq!(stream["stream"]["app"], "mcp_binary_test", "{stream}");
            assert_eq!(stream["stream"]["env"], "development", "{stream}");
            for value in stream["values"].as_array().unwrap() {
                pushed.push(value[1].as_str().unwrap().to_owned());
            }
        }
    }
    let has = |needle: &str| pushed.iter().any(|line| line.contains(needle));
    assert!(has(r#""trace_id":"trace-binary""#), "{pushed:#?}");
    // Logged after the server stopped: only the shutdown flush sends it.
    assert!(has(r#""message":"Stopped""#), "{pushed:#?}");
    for line in pushed.iter().chain(&logged) {
        assert!(!line.contains(TOKEN), "{line}");
    }
}
