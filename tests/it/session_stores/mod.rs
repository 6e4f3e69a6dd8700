//! Session stores: one suite of `SessionStore` tests run against the memory
//! store and the Redis store; Redis behind several replicas (no turn lost),
//! its TTL, its URL and credentials; and Redis stopped, paused and
//! restarted under a running app.
//!
//! Every Redis test starts its own `redis-server` on a free port of
//! 127.0.0.1 with its own temporary directory (`PrivateRedis`) and stops it
//! by its process id when dropped. Without `redis-server`, each Redis test
//! returns at once and one line on stderr says they were skipped and which
//! package to install, so `cargo test` passes on a machine with only a Rust
//! toolchain; with `CI` set, a missing `redis-server` fails them instead
//! (`bash .ci/run` installs it).

mod outage;
mod redis_only;
mod replicas;
mod serve_binary;
mod suite;

use std::io::{ErrorKind, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::body::Body;
use axum::http::Request;
use mcp_orchestrator::intent::RuleClassifier;
use mcp_orchestrator::project::Service;
use mcp_orchestrator::server::{self, AppState, Environment, RuntimeSettings};
use mcp_orchestrator::services::{OutgoingRequest, RawResponse, Transport, TransportError};
use mcp_orchestrator::session::{RedisSessionConfig, RedisSessionStore, SessionStore};
use mcp_orchestrator::telemetry::loki::{self, LokiConfig, LokiHandle, LokiLimits};
use mcp_orchestrator::telemetry::{self, JsonLineLayer};
use serde_json::{Value as Json, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tower::ServiceExt;
use tracing_subscriber::layer::SubscriberExt;

use crate::runtime::{Answer, Stub, compile_project, http_client, json_response};

/// How long anything a test waits for may take on a loaded machine: a
/// `redis-server` to answer, a key to expire, a store to recover. Tests
/// poll and go on as soon as it happens.
pub const WAIT_DEADLINE: Duration = Duration::from_secs(30);

/// Between two polls.
pub const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// Whether the Redis tests must skip: `redis-server` is not installed and
/// `CI` is unset. The first call says so in one line on the process's
/// stderr, written directly so that the test harness does not capture it.
/// With `CI` set, a missing `redis-server` fails the test.
pub fn skip_without_redis() -> bool {
    static MISSING: OnceLock<bool> = OnceLock::new();
    let missing = *MISSING.get_or_init(|| {
        let missing = matches!(
            Command::new("redis-server")
                .arg("--version")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status(),
            Err(error) if error.kind() == ErrorKind::NotFound
        );
        if missing && std::env::var_os("CI").is_none_or(|value| value.is_empty()) {
            let _ = std::io::stderr().write_all(
                b"SKIPPED: the Redis session store tests: `redis-server` is not installed \
                  (Debian package `redis-server`: apt-get install redis-server)\n",
            );
        }
        missing
    });
    if missing && std::env::var_os("CI").is_some_and(|value| !value.is_empty()) {
        panic!(
            "`redis-server` is not installed and CI is set: the session store tests need it \
             (apt-get install redis-server; `bash .ci/run` installs it)"
        );
    }
    missing
}

/// A `redis-server` of the test's own, on `127.0.0.1:<port>`, with its own
/// directory, no persistence; killed (by its pid) when dropped.
pub struct PrivateRedis {
    pub port: u16,
    /// Extra arguments, kept for a restart (`--requirepass`).
    arguments: Vec<String>,
    /// Working directory of the server; removed with it.
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl PrivateRedis {
    pub async fn start() -> PrivateRedis {
        PrivateRedis::start_with(&[]).await
    }

    /// With extra `redis-server` arguments, e.g. `["--requirepass", "pw"]`.
    pub async fn start_with(arguments: &[&str]) -> PrivateRedis {
        // A free port can be taken between the probe and the server's bind:
        // then the server exits at once and another port is tried.
        for _ in 0..5 {
            let mut redis = PrivateRedis::on_port(free_port(), arguments);
            if redis.spawn_and_wait().await.is_ok() {
                return redis;
            }
        }
        panic!("`redis-server` did not start on any of 5 free ports");
    }

    /// Starts on a given port (a port a test reserved while Redis was down).
    pub async fn start_on(port: u16) -> PrivateRedis {
        PrivateRedis::start_with_on(port, &[]).await
    }

    /// `start_with` on a given port.
    pub async fn start_with_on(port: u16, arguments: &[&str]) -> PrivateRedis {
        let mut redis = PrivateRedis::on_port(port, arguments);
        if let Err(error) = redis.spawn_and_wait().await {
            panic!("`redis-server` did not start on port {port}: {error}");
        }
        redis
    }

    fn on_port(port: u16, arguments: &[&str]) -> PrivateRedis {
        PrivateRedis {
            port,
            arguments: arguments.iter().map(|a| (*a).to_owned()).collect(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("redis-server is running").id()
    }

    /// Kills the server (SIGKILL: a crash, nothing saved) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub async fn restart(&mut self) {
        self.stop();
        if let Err(error) = self.spawn_and_wait().await {
            panic!(
                "`redis-server` did not start again on port {}: {error}",
                self.port
            );
        }
    }

    /// SIGSTOP: the server keeps its connections and accepts new ones, but
    /// answers nothing — Redis "slow" without end.
    pub fn pause(&self) {
        signal(self.pid(), "-STOP");
    }

    /// SIGCONT: it answers again.
    pub fn resume(&self) {
        signal(self.pid(), "-CONT");
    }

    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = self.dir.path().join("redis.log");
        let spawned = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--save", "", "--appendonly", "no"])
            .arg("--logfile")
            .arg(&log)
            .args(&self.arguments)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(error) if error.kind() == ErrorKind::NotFound => panic!(
                "`redis-server` is not installed; the session store tests need it: \
                 `apt-get install redis-server` (`bash .ci/run` installs it)"
            ),
            Err(error) => panic!("`redis-server` could not be started: {error}"),
        };
        self.child = Some(child);
        let deadline = Instant::now() + WAIT_DEADLINE;
        loop {
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!("it exited with {status}: {log}"));
            }
            if answers_ping(self.port).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(format!("it did not answer within {WAIT_DEADLINE:?}"));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// A connection of the test's own, for looking at keys (with the
    /// server's password, when it has one, in `url`).
    pub async fn admin(&self, url: &str) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(url).unwrap();
        tokio::time::timeout(WAIT_DEADLINE, client.get_multiplexed_async_connection())
            .await
            .expect("Redis answers the admin connection in time")
            .unwrap()
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid} failed");
}

/// Whether something on the port answers a `PING` (`+PONG`, or `-NOAUTH`
/// from a server with a password): the server is ready.
async fn answers_ping(port: u16) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(b"PING\r\n").await?;
        let mut first = [0u8; 1];
        stream.read_exact(&mut first).await?;
        std::io::Result::Ok(first[0] == b'+' || first[0] == b'-')
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Ok(true))
    )
}

/// A port free right now on 127.0.0.1.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A Redis session store for `url`, with the default key prefix.
pub fn redis_store(
    url: &str,
    ttl: Duration,
    operation_timeout: Duration,
) -> Arc<RedisSessionStore> {
    Arc::new(
        RedisSessionStore::new(RedisSessionConfig {
            url: url.to_owned(),
            key_prefix: mcp_orchestrator::session::redis_store::DEFAULT_KEY_PREFIX.to_owned(),
            ttl,
            operation_timeout,
        })
        .unwrap(),
    )
}

/// A flow project for session tests, in a temporary directory:
/// - "note" (input `slot`, `value`) sets the variable `slot_<slot>` to
///   `value`, for slots `0..slots`, and replies "Noted." (route `noted`);
/// - "visit" replies "Welcome back." (route `returning`) when the session
///   has `visited`, else sets it and replies "Welcome." (`first_visit`).
pub fn session_project(slots: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    // A `switch` needs at least one case.
    let mut switch = String::new();
    if slots > 0 {
        switch.push_str("      - switch: \"input.slot\"\n        cases:\n");
        for slot in 0..slots {
            switch.push_str(&format!(
                "          \"{slot}\": [{{ set: {{ slot_{slot}: \"{{{{ input.value }}}}\" }} }}]\n"
            ));
        }
        switch.push_str("        default: []\n");
    }
    let flows = format!(
        r#"intents:
  note:
    description: The user wants a value remembered
    keywords: [note]
  visit:
    description: The user drops by
    keywords: [visit]
classifier:
  fallback: visit
flows:
  note:
    intent: note
    steps:
{switch}      - reply: "Noted."
        route: noted
  visit:
    intent: visit
    steps:
      - if: "session.visited"
        reply: "Welcome back."
        route: returning
      - set: {{ visited: true }}
      - reply: "Welcome."
        route: first_visit
"#
    );
    std::fs::create_dir_all(dir.path().join("flows")).unwrap();
    std::fs::write(dir.path().join("flows/main.yaml"), flows).unwrap();
    dir
}

/// One replica: an app over `project` with its own session store, as
/// `serve` builds it.
pub fn replica(
    project: &Path,
    sessions: Arc<dyn SessionStore>,
    request_timeout: Duration,
) -> Arc<AppState> {
    crate::runtime::keep_callsites_interested();
    let deployment = server::deploy(
        compile_project(project, &[]),
        Environment::Development,
        false,
        1,
    )
    .unwrap();
    Arc::new(AppState {
        deployment: ArcSwap::from_pointee(deployment),
        classifier: Arc::new(RuleClassifier),
        sessions,
        transport: Arc::new(NoServices),
        settings: RuntimeSettings {
            environment: Environment::Development,
            request_timeout,
            connections: Default::default(),
            mcp: mcp_orchestrator::server::mcp::McpSettings::from_values(None, None),
        },
        reload: Mutex::new(Default::default()),
        admission: Default::default(),
        breakers: Default::default(),
        channels: Default::default(),
        events: Default::default(),
        console: None,
        tenant: None,
    })
}

/// The transport of `session_project`, which calls no service.
struct NoServices;

impl Transport for NoServices {
    fn send<'a>(
        &'a self,
        service: &'a Service,
        _: OutgoingRequest<'a>,
    ) -> futures_util::future::BoxFuture<'a, Result<RawResponse, TransportError>> {
        let name = service.name.clone();
        Box::pin(async move {
            Err(TransportError::Connect(format!(
                "the session test project calls no service, not `{name}`"
            )))
        })
    }
}

/// `POST /orchestrate` through the router of `state`.
pub async fn orchestrate(state: &Arc<AppState>, body: Json) -> Answer {
    let request = Request::post("/orchestrate")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    Answer::read(server::app(state.clone()).oneshot(request).await.unwrap()).await
}

/// `GET /health` through the router of `state`: the body.
pub async fn health(state: &Arc<AppState>) -> Json {
    let request = Request::get("/health").body(Body::empty()).unwrap();
    let answer = Answer::read(server::app(state.clone()).oneshot(request).await.unwrap()).await;
    assert_eq!(answer.status, 200, "{:#}", answer.body);
    answer.body
}

/// A "visit" turn of `session_id`; the envelope, after checking it is a 200.
pub async fn visit(state: &Arc<AppState>, session_id: &str, trace_id: &str) -> Json {
    let answer = orchestrate(
        state,
        json!({"text": "visit", "user_id": "u-1", "session_id": session_id, "trace_id": trace_id}),
    )
    .await;
    assert_eq!(answer.status, 200, "{:#}", answer.body);
    answer.body
}

/// Polls `condition` until it holds; fails the test after `WAIT_DEADLINE`.
pub async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT_DEADLINE;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {WAIT_DEADLINE:?}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The value of one counter in the Prometheus text, 0 when absent.
pub fn counter_value(series: &str) -> f64 {
    telemetry::prometheus::render()
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The log lines of the test's thread, as the JSON lines the service writes,
/// through a fake Loki on `127.0.0.1:0`. The subscriber is the thread's
/// only: use a current-thread runtime so every event of the app is seen.
pub struct CapturedLines {
    loki: Stub,
    handle: LokiHandle,
    _guard: tracing::subscriber::DefaultGuard,
}

impl CapturedLines {
    pub async fn start() -> CapturedLines {
        crate::runtime::keep_callsites_interested();
        let loki = Stub::start(|_, _| async { json_response(204, Json::Null) }).await;
        let mut config = LokiConfig::new(
            &loki.url(),
            None,
            None,
            "mcp_orchestrator".to_owned(),
            "test".to_owned(),
        )
        .unwrap();
        config.limits = LokiLimits {
            batch_age: Duration::from_millis(50),
            flush_deadline: Duration::from_secs(60),
            ..LokiLimits::default()
        };
        let (sender, worker) = loki::channel(config);
        let subscriber = tracing_subscriber::registry()
            .with(telemetry::filter("info", false).unwrap())
            .with(JsonLineLayer::new(false, Some(sender)));
        let guard = tracing::subscriber::set_default(subscriber);
        tracing::callsite::rebuild_interest_cache();
        let handle = worker.spawn(http_client());
        CapturedLines {
            loki,
            handle,
            _guard: guard,
        }
    }

    /// Flushes and returns every line logged so far (grouped by Loki
    /// stream, so not in time order).
    pub async fn lines(self) -> Vec<Json> {
        let stats = self.handle.shutdown().await;
        assert_eq!(stats.dropped, 0, "{stats:?}");
        let mut lines = Vec::new();
        for request in self.loki.received() {
            for stream in request.body["streams"].as_array().unwrap() {
                for value in stream["values"].as_array().unwrap() {
                    lines.push(serde_json::from_str(value[1].as_str().unwrap()).unwrap());
                }
            }
        }
        lines
    }
}
