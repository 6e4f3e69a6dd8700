//! The runtime: `POST /orchestrate` over the shipped project, service calls
//! against stub services on `127.0.0.1:0`, the LLM classifier against a fake
//! OpenAI-compatible server, concurrency, graceful shutdown and the `serve`
//! subcommand.
//!
//! This module holds the test set-up shared by the submodules: building an
//! `AppState` from a project directory, sending requests through the router,
//! and stub HTTP services that record what they receive.

mod channels;
mod concurrency;
mod console;
mod edge;
mod hardened_http;
mod llm_classifier;
mod mcp;
mod observability;
mod openapi;
mod request_fields;
mod requests;
mod routes;
pub(crate) mod serve_binary;
mod service_failures;
mod shutdown;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use mcp_orchestrator::check::check_project;
use mcp_orchestrator::intent::{Classifier, RuleClassifier};
use mcp_orchestrator::project::CompiledProject;
use mcp_orchestrator::server::{self, AppState, Environment, RuntimeSettings};
use mcp_orchestrator::services::HttpTransport;
use mcp_orchestrator::session::MemorySessionStore;
use serde_json::{Value as Json, json};
use tower::ServiceExt;

use crate::{repository_root, shipped_project_copy, test_environment};

/// Request timeout of the test states unless a test sets its own: long
/// enough never to cut a call on a loaded machine.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The process's HTTP client, as `serve` builds it.
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    mcp_orchestrator::services::http_client().unwrap()
}

/// The service transport, as `serve` builds it.
pub fn http_transport() -> HttpTransport {
    let _ = rustls::crypto::ring::default_provider().install_default();
    HttpTransport::new().unwrap()
}

/// Loads and compiles a project; fails the test on any error diagnostic.
pub fn compile_project(dir: &Path, variables: &[(&str, String)]) -> CompiledProject {
    let mut environment = test_environment();
    for (name, value) in variables {
        environment.insert((*name).to_owned(), value.clone());
    }
    let checked = check_project(dir, &environment);
    assert_eq!(
        checked.error_count(),
        0,
        "the project does not compile: {:#?}",
        checked.diagnostics
    );
    checked.project.expect("a project without errors compiles")
}

/// A running app over one project, with its session store kept at hand.
pub struct Harness {
    pub state: Arc<AppState>,
    pub sessions: Arc<MemorySessionStore>,
}

/// How to build a `Harness`.
pub struct HarnessOptions<'a> {
    /// The project directory; the shipped project by default.
    pub dir: Option<&'a Path>,
    /// Extra environment variables, e.g. `ORDER_SERVICE_URL`.
    pub variables: Vec<(&'a str, String)>,
    pub environment: Environment,
    pub request_timeout: Duration,
    pub classifier: Arc<dyn Classifier>,
    /// The service transport; `serve`'s direct one by default.
    pub transport: Option<HttpTransport>,
    /// The console on (every turn recorded).
    pub console: bool,
}

impl Default for HarnessOptions<'_> {
    fn default() -> Self {
        HarnessOptions {
            dir: None,
            variables: Vec::new(),
            environment: Environment::Development,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            classifier: Arc::new(RuleClassifier),
            transport: None,
            console: false,
        }
    }
}

impl Harness {
    /// The shipped project, every service on its mock.
    pub fn shipped() -> Harness {
        Harness::new(HarnessOptions::default())
    }

    /// The shipped project with some services pointed at stubs, e.g.
    /// `[("ORDER_SERVICE_URL", &order_stub)]`; the others on their mocks.
    pub fn with_services(services: &[(&'static str, &Stub)]) -> Harness {
        Harness::new(HarnessOptions {
            variables: services
                .iter()
                .map(|(variable, stub)| (*variable, stub.url()))
                .collect(),
            ..HarnessOptions::default()
        })
    }

    pub fn new(options: HarnessOptions<'_>) -> Harness {
        keep_callsites_interested();
        let root = repository_root();
        let dir = options.dir.unwrap_or(&root);
        let project = compile_project(dir, &options.variables);
        let deployment = server::deploy(project, options.environment, false, 1).unwrap();
        let sessions = Arc::new(MemorySessionStore::new(
            Duration::from_secs(30 * 60),
            10_000,
        ));
        let state = Arc::new(AppState {
            deployment: ArcSwap::from_pointee(deployment),
            classifier: options.classifier,
            sessions: sessions.clone(),
            transport: Arc::new(options.transport.unwrap_or_else(http_transport)),
            settings: RuntimeSettings {
                environment: options.environment,
                request_timeout: options.request_timeout,
                connections: Default::default(),
                mcp: mcp_orchestrator::server::mcp::McpSettings::from_values(None, None),
            },
            reload: Mutex::new(Default::default()),
            admission: Default::default(),
            breakers: Default::default(),
            channels: Default::default(),
            events: Default::default(),
            console: options.console.then(Default::default),
            tenant: None,
        });
        Harness { state, sessions }
    }

    pub fn router(&self) -> Router {
        server::app(self.state.clone())
    }

    /// `POST /orchestrate` with a JSON body through the router.
    pub async fn orchestrate(&self, body: Json) -> Answer {
        self.send(
            Request::post("/orchestrate")
                .header("content-type", "application/json")
                .body(Body::from(body.to_string()))
                .unwrap(),
        )
        .await
    }

    /// A successful turn: status 200 and the envelope.
    pub async fn turn(&self, body: Json) -> Json {
        let answer = self.orchestrate(body).await;
        assert_eq!(answer.status, StatusCode::OK, "{:#}", answer.body);
        answer.body
    }

    pub async fn send(&self, request: Request<Body>) -> Answer {
        let response = self.router().oneshot(request).await.unwrap();
        Answer::read(response).await
    }
}

/// Installs, once, a global subscriber that logs nothing but keeps every
/// callsite's interest at "sometimes". Tests that watch logs install their
/// own subscriber for their thread only; without this, a callsite first hit
/// by another test at the moment such a subscriber is installed can cache
/// "never" (a race in `tracing-core`'s interest cache) and its events would
/// be lost to the test.
pub fn keep_callsites_interested() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let _ = tracing::subscriber::set_global_default(Interested);
    });
}

/// Interested in every callsite, enabled for none.
struct Interested;

impl tracing::Subscriber for Interested {
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::TRACE)
    }

    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        false
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, _: &tracing::Event<'_>) {}

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}

/// A response, read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// The body as JSON (`Json::Null` when it is empty or not JSON).
    pub body: Json,
}

impl Answer {
    pub async fn read(response: Response) -> Answer {
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Json::Null);
        Answer {
            status,
            headers,
            body,
        }
    }

    pub fn content_type(&self) -> &str {
        self.headers
            .get("content-type")
            .and_then(|value| value.to_str().ok())
            .unwrap_or("")
    }
}

/// The request body of a turn of `user_id` "u-1" saying `text`.
/// An in-process request to `/mcp` with what the transport requires (an
/// allowed `Host`, JSON, both media types accepted, a 2025 revision).
pub fn mcp_request(body: Body) -> Request<Body> {
    Request::post("/mcp")
        .header("host", "localhost")
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2025-06-18")
        .body(body)
        .unwrap()
}

/// A JSON-RPC `tools/call` of `tool` with `params` (`arguments`, `_meta`).
pub fn tools_call(mut params: Json, tool: &str) -> Body {
    params["name"] = json!(tool);
    Body::from(
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}).to_string(),
    )
}

pub fn turn_request(text: &str) -> Json {
    json!({"text": text, "user_id": "u-1"})
}

/// Asserts the parts of an envelope every test looks at.
#[track_caller]
pub fn assert_envelope(envelope: &Json, route: &str, intent: &str, decision: &str) {
    assert_eq!(envelope["route"], route, "{envelope:#}");
    assert_eq!(envelope["intent"], intent, "{envelope:#}");
    assert_eq!(envelope["decision"], decision, "{envelope:#}");
}

/// The envelope's `service_spans`.
#[track_caller]
pub fn spans(envelope: &Json) -> &Vec<Json> {
    envelope["service_spans"]
        .as_array()
        .unwrap_or_else(|| panic!("no service_spans in {envelope:#}"))
}

/// The one span of a turn that made exactly one call.
#[track_caller]
pub fn only_span(envelope: &Json) -> &Json {
    let spans = spans(envelope);
    assert_eq!(spans.len(), 1, "{envelope:#}");
    &spans[0]
}

/// A W3C `traceparent` as the engine sends it: `00-<32 hex>-<16 hex>-<2 hex>`.
pub fn is_valid_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |text: &str, length: usize| {
        text.len() == length
            && text
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    parts.len() == 4
        && parts[0] == "00"
        && hex(parts[1], 32)
        && parts[1].bytes().any(|b| b != b'0')
        && hex(parts[2], 16)
        && parts[2].bytes().any(|b| b != b'0')
        && hex(parts[3], 2)
}

/// A request a stub received.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    /// The body as JSON (`Json::Null` when it is empty or not JSON).
    pub body: Json,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }
}

type Answering = Arc<
    dyn Fn(usize, Received) -> futures_util::future::BoxFuture<'static, Response> + Send + Sync,
>;

/// A stub HTTP service on `127.0.0.1:0`: records every request and answers
/// with `answer(n, request)`, `n` counting calls from 1. Stops when dropped.
pub struct Stub {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Stub {
    pub async fn start<F, Fut>(answer: F) -> Stub
    where
        F: Fn(usize, Received) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response> + Send + 'static,
    {
        let answer: Answering = Arc::new(move |n, request| Box::pin(answer(n, request)));
        let received = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicUsize::new(0));
        let router = Router::new().fallback({
            let received = received.clone();
            move |request: axum::extract::Request| {
                let received = received.clone();
                let count = count.clone();
                let answer = answer.clone();
                async move {
                    let (parts, body) = request.into_parts();
                    let bytes = body.collect().await.unwrap().to_bytes();
                    let request = Received {
                        method: parts.method.to_string(),
                        path: parts.uri.path().to_owned(),
                        headers: parts.headers,
                        body: serde_json::from_slice(&bytes).unwrap_or(Json::Null),
                    };
                    received.lock().unwrap().push(request.clone());
                    let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                    answer(n, request).await
                }
            }
        });
        Stub::serve(router, received).await
    }

    /// Always answers `status` with the JSON `body`.
    pub async fn json(status: u16, body: Json) -> Stub {
        Stub::start(move |_, _| {
            let body = body.clone();
            async move { json_response(status, body) }
        })
        .await
    }

    async fn serve(router: Router, received: Arc<Mutex<Vec<Received>>>) -> Stub {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        Stub {
            addr,
            received,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// The one request received so far.
    #[track_caller]
    pub fn only_request(&self) -> Received {
        let received = self.received();
        assert_eq!(received.len(), 1, "{received:#?}");
        received.into_iter().next().unwrap()
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A response with a status and a JSON body.
pub fn json_response(status: u16, body: Json) -> Response {
    (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response()
}

/// A copy of the shipped project with `edit(text)` applied to one of its
/// flow files; the edit must change the file.
pub fn project_copy_with(file: &str, edit: impl Fn(&str) -> String) -> tempfile::TempDir {
    let project = shipped_project_copy();
    let path = project.path().join("flows").join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    let edited = edit(&text);
    assert_ne!(edited, text, "the edit of {file} changed nothing");
    std::fs::write(&path, edited).unwrap();
    project
}

/// A port nothing listens on: bound, then released.
pub async fn closed_port_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

/// `server::serve` on `127.0.0.1:0`, as `serve` runs it.
pub struct RunningServer {
    pub addr: SocketAddr,
    /// Completing it starts the graceful shutdown.
    pub shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningServer {
    pub async fn start(state: Arc<AppState>, grace: Duration) -> RunningServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, signal) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server::serve(
            listener,
            state,
            async move {
                let _ = signal.await;
            },
            grace,
        ));
        RunningServer {
            addr,
            shutdown: Some(shutdown),
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn trigger_shutdown(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
