//! The HTTP surface: `POST /orchestrate`, `GET /health`, `GET /metrics`,
//! problem+json errors.
//!
//! Holds no business logic: it validates the request, hands it to
//! `engine::run_turn` with the deployment current when the request arrived,
//! and shapes the answer. The live deployment sits in an `ArcSwap`, so a
//! request keeps the project it started with and a swap never waits for one.
//!
//! Every request runs inside a `request` span (the `observe` middleware);
//! `/orchestrate` records the turn's `trace_id`, `session_id`, `user_id` and
//! `channel` on it, so every event of the turn carries them, and
//! `session_error` (the code) when the session store failed the turn. The
//! middleware also counts and times every answer.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use serde_json::{Value as Json, json};
use tracing::Instrument;

mod channels;
mod connections;
pub mod console;
pub mod mcp;

pub use connections::{ConnectionSettings, MAX_HEAD_BYTES};

use crate::admission::{self, AdmissionControl};
use crate::engine::{self, TurnDeps, TurnRequest};
use crate::intent::Classifier;
use crate::project::{CompiledProject, Decision};
use crate::services::{CircuitBreakers, ServiceMode, ServiceSpan, Transport};
use crate::session::{SessionStore, SessionStoreStatus};
use crate::telemetry::{self, prometheus};

/// Largest request body accepted.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// Whether unset service URLs fall back to mocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Environment {
    Development,
    Production,
}

impl Environment {
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Development => "development",
            Environment::Production => "production",
        }
    }
}

/// A compiled project with the decisions of this deployment: how each
/// service is reached.
#[derive(Debug)]
pub struct Deployment {
    pub project: Arc<CompiledProject>,
    /// Indexed by `ServiceId`.
    pub modes: Vec<ServiceMode>,
    /// 1 for the project loaded at start-up, +1 for each reload.
    pub generation: u64,
    pub loaded_at: SystemTime,
}

/// Why a project cannot be deployed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingServiceUrl {
    pub service: String,
    /// The environment variable the URL comes from, when known.
    pub variable: Option<String>,
}

impl std::fmt::Display for MissingServiceUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.variable {
            Some(variable) => write!(f, "service `{}` has no URL: set `{variable}`", self.service),
            None => write!(f, "service `{}` has no URL", self.service),
        }
    }
}

/// Decides how each service is reached: its URL; its mock when forced, or
/// in development when it has no URL. In production a service without a URL
/// is an error.
pub fn deploy(
    project: CompiledProject,
    environment: Environment,
    force_mock: bool,
    generation: u64,
) -> Result<Deployment, Vec<MissingServiceUrl>> {
    let mut modes = Vec::with_capacity(project.services.len());
    let mut missing = Vec::new();
    for service in &project.services {
        let mode = match (&service.url, force_mock) {
            (_, true) => ServiceMode::Mock,
            (Some(url), false) => ServiceMode::Live(url.clone()),
            (None, false) => {
                if environment == Environment::Production || service.mock.is_none() {
                    missing.push(MissingServiceUrl {
                        service: service.name.clone(),
                        variable: service.url_variable.clone(),
                    });
                }
                ServiceMode::Mock
            }
        };
        modes.push(mode);
    }
    if !missing.is_empty() {
        return Err(missing);
    }
    Ok(Deployment {
        project: Arc::new(project),
        modes,
        generation,
        loaded_at: SystemTime::now(),
    })
}

/// What `/health` says about reloads; filled by the reloader.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReloadStatus {
    /// Reloads run since start-up, whatever their outcome.
    pub attempts: u64,
    pub last_success_at: Option<String>,
    pub last_error: Option<ReloadError>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReloadError {
    pub at: String,
    pub message: String,
    pub diagnostics: Vec<crate::diagnostic::Diagnostic>,
}

/// Settings of the running service.
#[derive(Debug, Clone)]
pub struct RuntimeSettings {
    pub environment: Environment,
    /// Every request has its answer within this time, its body included.
    pub request_timeout: Duration,
    /// How long a head and an idle connection may take; how many
    /// connections may be open.
    pub connections: ConnectionSettings,
    /// Who may reach `/mcp`: allowed `Host` and `Origin` values.
    pub mcp: mcp::McpSettings,
}

/// Everything the handlers share. Each field says why it is here.
pub struct AppState {
    /// The live deployment; swapped whole by reloads.
    pub deployment: ArcSwap<Deployment>,
    /// Rules, or the LLM with the rules as fallback.
    pub classifier: Arc<dyn Classifier>,
    /// Outlives deployments: a reload keeps every session.
    pub sessions: Arc<dyn SessionStore>,
    /// Outlives deployments: a reload keeps the connection pool.
    pub transport: Arc<dyn Transport>,
    pub settings: RuntimeSettings,
    pub reload: Mutex<ReloadStatus>,
    /// Outlives deployments: rate-limit buckets and the in-flight cap,
    /// kept while a reload leaves the limits unchanged.
    pub admission: AdmissionControl,
    /// Outlives deployments: each service's circuit breaker.
    pub breakers: CircuitBreakers,
    /// Outlives deployments: the channels' seen deliveries, background
    /// queue and counters.
    pub channels: crate::channels::ChannelRuntime,
    /// What long-lived streams (MCP subscriptions) wait on: reloads and
    /// shutdown, and the places such streams may take.
    pub events: Events,
    /// The console, when it is on: every turn is then recorded.
    pub console: Option<console::Console>,
    /// The tenant this state serves, when the process serves several.
    pub tenant: Option<String>,
}

/// Most long-lived streams open at once (MCP `subscriptions/listen`): each
/// holds a connection and a task, so their number is bounded.
pub const MAX_STREAMS: usize = 1024;

/// Signals for long-lived streams, which outlive any one request.
pub struct Events {
    /// Bumped after every reload attempt, whatever its outcome: a stream
    /// re-reads what it shows (the tools, the reload status).
    reloads: tokio::sync::watch::Sender<u64>,
    /// Set when the server stops accepting: streams end so that shutdown
    /// does not wait out its grace period for them.
    closing: tokio::sync::watch::Sender<bool>,
    streams: Arc<tokio::sync::Semaphore>,
}

impl Default for Events {
    fn default() -> Events {
        Events {
            reloads: tokio::sync::watch::Sender::new(0),
            closing: tokio::sync::watch::Sender::new(false),
            streams: Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS)),
        }
    }
}

impl Events {
    /// After a reload attempt.
    pub fn reloaded(&self) {
        self.reloads
            .send_modify(|count| *count = count.wrapping_add(1));
    }

    /// When the server stops accepting requests.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// A place for one long-lived stream, or `None` when all are taken.
    pub fn stream_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.streams.clone().try_acquire_owned().ok()
    }

    pub fn reloads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reloads.subscribe()
    }

    /// Completes once the server is closing.
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut closing = self.closing.subscribe();
        async move {
            let _ = closing.wait_for(|closing| *closing).await;
        }
    }
}

/// The router, for the server and for in-process tests.
pub fn app(state: Arc<AppState>) -> Router {
    let mcp = Router::new()
        .nest_service("/mcp", mcp::service(state.clone()))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            mcp::gate,
        ));
    Router::new()
        .merge(mcp)
        .merge(console::routes(&state))
        .route("/orchestrate", post(orchestrate))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/openapi.json", get(openapi_document))
        .route(
            "/channels/{name}",
            post(channels::deliver).get(channels::handshake),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .layer(axum::middleware::from_fn(observe))
        .with_state(state)
}

/// The `endpoint` label of a request: its route, or `unmatched`. A fixed
/// set, so a scan of random paths cannot grow the metrics.
fn endpoint_label(path: &str) -> &'static str {
    match path {
        "/orchestrate" => "/orchestrate",
        "/health" => "/health",
        "/metrics" => "/metrics",
        "/openapi.json" => "/openapi.json",
        "/mcp" => "/mcp",
        _ if path.starts_with("/mcp/") => "/mcp",
        _ if path == "/console" || path.starts_with("/console/") => "/console",
        _ if path.starts_with("/channels/") => "/channels",
        _ => "unmatched",
    }
}

/// What a turn was, for the request metrics (a response extension).
#[derive(Debug, Clone)]
struct TurnLabels {
    route: Arc<str>,
    intent: Arc<str>,
}

/// The caller key's name (`anonymous` without keys, `none` when the
/// request was refused before it was known), for the request metrics (a
/// response extension).
#[derive(Debug, Clone)]
pub struct CallerLabel(pub Arc<str>);

/// The stable code of an error answer, for the request metrics (a response
/// extension).
#[derive(Debug, Clone, Copy)]
struct ErrorCode(&'static str);

/// The tenant a request was routed to, when the process serves several (a
/// request extension set by `tenants`): a label of its span and metrics.
#[derive(Debug, Clone)]
pub struct TenantLabel(pub Arc<str>);

/// Runs every request inside a `request` span, then counts and times its
/// answer.
async fn observe(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let endpoint = endpoint_label(request.uri().path());
    let tenant = request.extensions().get::<TenantLabel>().cloned();
    let span = tracing::info_span!(
        "request",
        endpoint,
        tenant = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        session_id = tracing::field::Empty,
        user_id = tracing::field::Empty,
        channel = tracing::field::Empty,
        caller = tracing::field::Empty,
        session_error = tracing::field::Empty,
    );
    if let Some(TenantLabel(tenant)) = &tenant {
        span.record("tenant", &**tenant);
    }
    let mut response = next.run(request).instrument(span).await;
    let (route, intent) = match response.extensions_mut().remove::<TurnLabels>() {
        Some(TurnLabels { route, intent }) => (route, intent),
        None => (NONE_LABEL.clone(), NONE_LABEL.clone()),
    };
    let caller = match response.extensions_mut().remove::<CallerLabel>() {
        Some(CallerLabel(name)) => name,
        None => NONE_LABEL.clone(),
    };
    // Several tenants: each metric also says its tenant.
    let tenant = tenant.map(|TenantLabel(tenant)| tenant);
    if let Some(ErrorCode(code)) = response.extensions().get::<ErrorCode>() {
        let labels = prometheus::with_tenant(
            tenant.as_deref(),
            vec![
                metrics::Label::new("endpoint", endpoint),
                metrics::Label::new("code", *code),
            ],
        );
        metrics::counter!(prometheus::REQUEST_ERRORS_TOTAL, labels).increment(1);
    }
    let key = RequestLabels {
        endpoint,
        caller,
        route,
        intent,
        status: response.status().as_u16(),
        tenant,
    };
    let (requests, duration) = REQUEST_METRICS.get(key, RequestLabels::register);
    requests.increment(1);
    duration.record(started.elapsed().as_secs_f64());
    response
}

/// The label value of what a request never reached (no turn, no caller).
static NONE_LABEL: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from("none"));

/// The labels of `mcp_requests_total` and `mcp_request_duration_seconds`.
#[derive(PartialEq, Eq, Hash)]
struct RequestLabels {
    endpoint: &'static str,
    caller: Arc<str>,
    route: Arc<str>,
    intent: Arc<str>,
    status: u16,
    tenant: Option<Arc<str>>,
}

impl RequestLabels {
    fn register(&self) -> (metrics::Counter, metrics::Histogram) {
        let tenant = self.tenant.as_deref();
        let labels = prometheus::with_tenant(
            tenant,
            vec![
                metrics::Label::new("endpoint", self.endpoint),
                metrics::Label::new("caller", self.caller.to_string()),
                metrics::Label::new("route", self.route.to_string()),
                metrics::Label::new("intent", self.intent.to_string()),
                metrics::Label::new("status", self.status.to_string()),
            ],
        );
        let requests = metrics::counter!(prometheus::REQUESTS_TOTAL, labels);
        let labels =
            prometheus::with_tenant(tenant, vec![metrics::Label::new("endpoint", self.endpoint)]);
        let duration = metrics::histogram!(prometheus::REQUEST_DURATION_SECONDS, labels);
        (requests, duration)
    }
}

static REQUEST_METRICS: std::sync::LazyLock<
    prometheus::Handles<RequestLabels, (metrics::Counter, metrics::Histogram)>,
> = std::sync::LazyLock::new(prometheus::Handles::new);

/// An error answer: RFC 9457 problem details with a stable `code`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
    /// JSON pointer of the offending request field.
    pub pointer: Option<String>,
    pub trace_id: Option<String>,
    /// `Retry-After`, in seconds (429, 503).
    pub retry_after: Option<u64>,
    /// `WWW-Authenticate: Bearer` (401).
    pub www_authenticate: bool,
    /// `Connection: close`: the connection cannot serve another request.
    pub close_connection: bool,
}

/// `Retry-After` of a 503 `overloaded`: turns take milliseconds, so a
/// second is plenty.
pub(crate) const OVERLOADED_RETRY_AFTER_SECONDS: u64 = 1;

impl ApiError {
    pub(crate) fn new(
        status: StatusCode,
        code: &'static str,
        detail: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            code,
            detail: detail.into(),
            pointer: None,
            trace_id: None,
            retry_after: None,
            www_authenticate: false,
            close_connection: false,
        }
    }

    /// 408: the body did not arrive within the request timeout.
    pub(crate) fn request_timeout() -> ApiError {
        ApiError {
            close_connection: true,
            ..ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                "the request body did not arrive in time",
            )
        }
    }

    /// 413 over `MAX_REQUEST_BYTES`, else 400: the body could not be read.
    pub(crate) fn unreadable_body(too_large: bool) -> ApiError {
        if too_large {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the body is larger than {MAX_REQUEST_BYTES} bytes"),
            )
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the body could not be read",
            )
        }
    }

    /// 403: the caller may not do this.
    pub(crate) fn forbidden(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", detail)
    }

    /// 401: no caller key, or not one of the project's.
    pub(crate) fn unauthorized() -> ApiError {
        ApiError {
            www_authenticate: true,
            ..ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a caller key is required: send `Authorization: Bearer <key>` or `x-api-key: <key>`",
            )
        }
    }

    /// 429 over a rate, 503 over the in-flight cap; both with `Retry-After`.
    fn refused(refusal: admission::Refusal) -> ApiError {
        match refusal {
            admission::Refusal::RateLimited { retry_after } => {
                let seconds = admission::retry_after_seconds(retry_after);
                ApiError {
                    retry_after: Some(seconds),
                    ..ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "rate_limited",
                        format!("too many requests; retry in {seconds} s"),
                    )
                }
            }
            admission::Refusal::Overloaded => ApiError {
                retry_after: Some(OVERLOADED_RETRY_AFTER_SECONDS),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "overloaded",
                    "the service is at its limit of turns in flight; retry shortly",
                )
            },
        }
    }

    fn invalid(
        status: StatusCode,
        pointer: impl Into<String>,
        detail: impl Into<String>,
    ) -> ApiError {
        ApiError {
            pointer: Some(pointer.into()),
            ..ApiError::new(status, "invalid_request", detail)
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let title = self.status.canonical_reason().unwrap_or("Error").to_owned();
        let mut body = json!({
            "type": "about:blank",
            "title": title,
            "status": self.status.as_u16(),
            "code": self.code,
            "detail": self.detail,
        });
        if let Some(pointer) = self.pointer {
            body["pointer"] = Json::String(pointer);
        }
        if let Some(trace_id) = &self.trace_id {
            body["trace_id"] = Json::String(trace_id.clone());
        }
        let mut response = (self.status, axum::Json(body)).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(value) = self.trace_id.and_then(|id| HeaderValue::from_str(&id).ok()) {
            response.headers_mut().insert("x-trace-id", value);
        }
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.close_connection {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if self.www_authenticate {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response.extensions_mut().insert(ErrorCode(self.code));
        response
    }
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route; use POST /orchestrate, POST /channels/{name}, POST /mcp, GET /health, GET /metrics or GET /openapi.json",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept that method",
    )
}

/// A body read whole, within `deadline` and `MAX_REQUEST_BYTES`: 408, 413
/// or 400 otherwise.
pub(crate) async fn read_body(
    body: axum::body::Body,
    deadline: tokio::time::Instant,
) -> Result<bytes::Bytes, ApiError> {
    match tokio::time::timeout_at(deadline, axum::body::to_bytes(body, MAX_REQUEST_BYTES)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(error)) => {
            let too_large = std::error::Error::source(&error)
                .is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
            Err(ApiError::unreadable_body(too_large))
        }
        Err(_) => Err(ApiError::request_timeout()),
    }
}

/// A JSON object body, with every rejection in the problem+json shape.
struct JsonObject(serde_json::Map<String, Json>);

impl<S: Send + Sync> FromRequest<S> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.split(';').next())
            .map(|mime| {
                let mime = mime.trim().to_ascii_lowercase();
                mime == "application/json" || mime.ends_with("+json")
            })
            .unwrap_or(false);
        if !is_json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request",
                "the body must be JSON, sent with `content-type: application/json`",
            ));
        }
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                ApiError::unreadable_body(rejection.status() == StatusCode::PAYLOAD_TOO_LARGE)
            })?;
        match crate::services::parse_json(&bytes) {
            Ok(Json::Object(object)) => Ok(JsonObject(object)),
            Ok(_) => Err(ApiError::invalid(
                StatusCode::UNPROCESSABLE_ENTITY,
                "",
                "the body must be a JSON object",
            )),
            Err(error) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("the body is not valid JSON: {error}"),
            )),
        }
    }
}

/// Fields of the request the envelope owns; every other field is `input`.
const ENVELOPE_FIELDS: &[&str] = &[
    "text",
    "user_id",
    "channel",
    "session_id",
    "trace_id",
    "tenant",
];

/// The answer envelope, compatible with the Python service's.
#[derive(Debug, Serialize)]
pub struct Envelope {
    pub decision: Decision,
    pub reply_text: String,
    pub session_id: String,
    pub route: String,
    pub intent: String,
    pub intent_confidence: f64,
    pub trace_id: String,
    pub service_spans: Vec<ServiceSpan>,
    pub data: Option<Json>,
}

impl Envelope {
    /// The envelope as `serde_json` writes it, byte for byte, with its
    /// strings (the reply is most of the answer) escaped by
    /// `write_json_string`.
    pub fn to_json(&self) -> serde_json::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(384 + self.reply_text.len());
        out.extend_from_slice(b"{\"decision\":");
        serde_json::to_writer(&mut out, &self.decision)?;
        for (name, text) in [
            ("reply_text", &self.reply_text),
            ("session_id", &self.session_id),
            ("route", &self.route),
            ("intent", &self.intent),
        ] {
            field_name(&mut out, name);
            write_json_string(&mut out, text);
        }
        field_name(&mut out, "intent_confidence");
        serde_json::to_writer(&mut out, &self.intent_confidence)?;
        field_name(&mut out, "trace_id");
        write_json_string(&mut out, &self.trace_id);
        field_name(&mut out, "service_spans");
        serde_json::to_writer(&mut out, &self.service_spans)?;
        field_name(&mut out, "data");
        serde_json::to_writer(&mut out, &self.data)?;
        out.push(b'}');
        Ok(out)
    }
}

/// `,"name":`
fn field_name(out: &mut Vec<u8>, name: &str) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
}

/// A JSON string as `serde_json` writes it: `"` and `\` escaped, the
/// control characters as `\n`, `\t`... or `\u00XX`, everything else as
/// it is. Eight bytes are checked at once while none needs escaping (its
/// own loop looks at every byte).
pub fn write_json_string(out: &mut Vec<u8>, text: &str) {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    /// Whether a byte of `word` is zero (exact as a yes or no).
    fn has_zero(word: u64) -> u64 {
        word.wrapping_sub(ONES) & !word & HIGHS
    }
    let bytes = text.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut start = 0;
    let mut at = 0;
    while at < bytes.len() {
        if let Some(chunk) = bytes
            .get(at..at + 8)
            .and_then(|chunk| <[u8; 8]>::try_from(chunk).ok())
        {
            let word = u64::from_le_bytes(chunk);
            // A byte below 0x20, or a `"`, or a `\`.
            let control = word.wrapping_sub(ONES * 0x20) & !word & HIGHS;
            if control
                | has_zero(word ^ (ONES * u64::from(b'"')))
                | has_zero(word ^ (ONES * u64::from(b'\\')))
                == 0
            {
                at += 8;
                continue;
            }
        }
        let Some(&byte) = bytes.get(at) else {
            break;
        };
        if byte >= 0x20 && byte != b'"' && byte != b'\\' {
            at += 1;
            continue;
        }
        out.extend_from_slice(bytes.get(start..at).unwrap_or_default());
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(byte >> 4) & 0xf]);
                out.push(HEX[usize::from(byte & 0xf)]);
            }
        }
        at += 1;
        start = at;
    }
    out.extend_from_slice(bytes.get(start..).unwrap_or_default());
    out.push(b'"');
}

/// `POST /orchestrate`. The answer carries the caller's name for the
/// request metrics, whatever its fate.
async fn orchestrate(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let mut caller = None;
    let mut response = match run_orchestrate(&state, request, &mut caller).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    response
        .extensions_mut()
        .insert(CallerLabel(caller.unwrap_or_else(|| NONE_LABEL.clone())));
    response
}

/// Admission, then the turn: the caller key (401), its rate (429), the body
/// (400/408/413/415/422), the key's channels (403), the user's rate (429),
/// room among the turns in flight (503). What costs nothing comes first, so
/// a flood of unauthenticated or over-limit requests never reaches the body
/// parser.
async fn run_orchestrate(
    state: &AppState,
    request: Request,
    caller_name: &mut Option<Arc<str>>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let deployment = state.deployment.load_full();
    let project = &deployment.project;
    let span = tracing::Span::current();
    let Some(caller) = admission::authenticate(&project.access, request.headers()) else {
        return Err(ApiError::unauthorized());
    };
    *caller_name = Some(caller.label());
    span.record("caller", caller.name());
    let admission = state.admission.for_limits(&project.limits);
    admission
        .check_key(caller.name())
        .map_err(ApiError::refused)?;
    // The body extractor takes the request; of its headers the turn needs
    // only `traceparent` (no copy of the whole map per request).
    let mut headers = HeaderMap::new();
    if let Some(traceparent) = request.headers().get("traceparent") {
        headers.insert("traceparent", traceparent.clone());
    }
    // One deadline for the whole request: a body dripped in slowly leaves
    // the turn less time, never more.
    let deadline = tokio::time::Instant::now() + state.settings.request_timeout;
    let JsonObject(body) =
        match tokio::time::timeout_at(deadline, JsonObject::from_request(request, &())).await {
            Ok(body) => body?,
            Err(_) => return Err(ApiError::request_timeout()),
        };
    let body = match &project.request_schema {
        Some(schema) => validate_request_body(schema, body)?,
        None => body,
    };
    let mut request = turn_request(body, &headers)?;
    if let Some(serving) = &state.tenant {
        match &request.tenant {
            Some(named) if named != serving => {
                return Err(ApiError::invalid(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "/tenant",
                    format!("this request reached tenant `{serving}`; its body names `{named}`"),
                ));
            }
            Some(_) => {}
            None => request.tenant = Some(serving.clone()),
        }
    }
    if !caller.allows_channel(&request.channel) {
        return Err(ApiError::forbidden(format!(
            "the caller key `{}` may not send channel `{}`",
            caller.name(),
            request.channel
        )));
    }
    // The users and sessions of a declared channel (`telegram:42`) belong to
    // its deliveries: only a key that names that channel may reach them.
    if let Some(channel) = reserved_channel(project, &request)
        && !caller.names_channel(channel)
    {
        return Err(ApiError::forbidden(format!(
            "`user_id` and `session_id` starting with `{channel}:` belong to channel `{channel}`; only a caller key that lists it in `channels` may use them"
        )));
    }
    // Users and sessions of tool calls (`mcp:<key>:…`) belong to `/mcp`.
    if [&request.user_id, &request.session_id]
        .iter()
        .any(|id| id.starts_with(mcp::MCP_ID_PREFIX))
    {
        return Err(ApiError::forbidden(format!(
            "`user_id` and `session_id` starting with `{}` belong to tool calls at /mcp",
            mcp::MCP_ID_PREFIX
        )));
    }
    admission
        .check_user(&request.user_id)
        .map_err(ApiError::refused)?;
    // A place among the turns in flight, taken once the body is in: a slow
    // upload holds a connection (bounded by MAX_CONNECTIONS and the
    // request timeout), never a turn's place.
    let _in_flight = admission.enter().map_err(ApiError::refused)?;
    let outcome = run_logged_turn(state, &deployment, &request, deadline, started).await?;
    let labels = TurnLabels {
        route: Arc::from(outcome.route.as_str()),
        intent: Arc::from(outcome.intent.as_str()),
    };
    let envelope = Envelope {
        decision: outcome.decision,
        reply_text: outcome.reply_text,
        session_id: request.session_id,
        route: outcome.route,
        intent: outcome.intent,
        intent_confidence: outcome.intent_confidence,
        trace_id: request.trace_id.clone(),
        service_spans: outcome.service_spans,
        data: outcome.data,
    };
    let mut response = match envelope.to_json() {
        Ok(body) => (
            [(
                axum::http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
        Err(error) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the answer cannot be written as JSON: {error}"),
        )
        .into_response(),
    };
    if let Ok(value) = HeaderValue::from_str(&request.trace_id) {
        response.headers_mut().insert("x-trace-id", value);
    }
    response.extensions_mut().insert(labels);
    Ok(response)
}

/// Runs a turn on `deployment`: records the request's fields on the current
/// span, logs the `input` and `output` events, and turns a flow's failure
/// into its 500 answer. `/orchestrate` and the channels share it.
pub(crate) async fn run_logged_turn(
    state: &AppState,
    deployment: &Deployment,
    request: &TurnRequest,
    deadline: tokio::time::Instant,
    started: Instant,
) -> Result<engine::TurnOutcome, ApiError> {
    let project = &deployment.project;
    let span = tracing::Span::current();
    span.record("trace_id", request.trace_id.as_str());
    span.record("session_id", request.session_id.as_str());
    span.record("user_id", request.user_id.as_str());
    span.record("channel", request.channel.as_str());
    if telemetry::payloads_enabled() {
        let mut payload = serde_json::Map::new();
        payload.insert("text".to_owned(), Json::String(request.text.clone()));
        payload.extend(request.input.clone());
        let payload = telemetry::redact::redacted_text(&Json::Object(payload), &project.redact);
        tracing::info!(event_type = "input", io = "in", payload = %payload, "Turn received");
    } else {
        tracing::info!(event_type = "input", io = "in", "Turn received");
    }
    let deps = TurnDeps {
        project,
        modes: &deployment.modes,
        classifier: state.classifier.as_ref(),
        sessions: state.sessions.as_ref(),
        transport: state.transport.as_ref(),
        breakers: &state.breakers,
        deadline,
    };
    let result = match &state.console {
        None => engine::run_turn(&deps, request).await,
        Some(console) => {
            let (result, recording) = engine::run_turn_recorded(&deps, request).await;
            console
                .traces
                .record(crate::trace::build(crate::trace::Finished {
                    project,
                    generation: deployment.generation,
                    request,
                    result: &result,
                    recording,
                    started,
                }));
            result
        }
    };
    let outcome = match result {
        Ok(outcome) => outcome,
        Err(error) => {
            tracing::error!(
                event_type = "template_error",
                trace_id = %request.trace_id,
                error = %error,
                "The flow failed"
            );
            return Err(ApiError {
                trace_id: Some(request.trace_id.clone()),
                ..ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "template_error",
                    "the flow could not build its answer; the trace id identifies it in the logs",
                )
            });
        }
    };
    if let Some(error) = &outcome.session_error {
        // On the request span, so the turn's lines after it (the `output`
        // line among them) say the turn ran without its session.
        span.record("session_error", error.code());
    }
    tracing::info!(
        event_type = "output",
        io = "out",
        route = %outcome.route,
        intent = %outcome.intent,
        intent_confidence = outcome.intent_confidence,
        intent_source = outcome.intent_source,
        flow = %outcome.flow,
        decision = %outcome.decision,
        services = outcome.service_spans.len(),
        latency_ms = (started.elapsed().as_micros() as f64 / 10.0).round() / 100.0,
        "Turn answered"
    );
    Ok(outcome)
}

/// The declared channel whose users or sessions (`<channel>:…`) the
/// request names, if any.
fn reserved_channel<'p>(project: &'p CompiledProject, request: &TurnRequest) -> Option<&'p str> {
    if project.channels.is_empty() {
        return None;
    }
    project
        .channels
        .iter()
        .map(|channel| channel.name.as_str())
        .find(|name| {
            [&request.user_id, &request.session_id].iter().any(|id| {
                id.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(':'))
            })
        })
}

/// Checks a request body against the project's request schema, and answers
/// the first violation as 422 with the JSON pointer of the bad field.
pub fn validate_request_body(
    schema: &jsonschema::Validator,
    body: serde_json::Map<String, Json>,
) -> Result<serde_json::Map<String, Json>, ApiError> {
    // Validated as a JSON value, then taken apart again: no copy.
    let instance = Json::Object(body);
    if let Some((pointer, message)) = first_violation(schema, &instance) {
        return Err(ApiError::invalid(
            StatusCode::UNPROCESSABLE_ENTITY,
            pointer,
            message,
        ));
    }
    match instance {
        Json::Object(body) => Ok(body),
        _ => Ok(serde_json::Map::new()),
    }
}

/// The first way `instance` breaks `schema`, if any: the JSON pointer of
/// the offending value and a message naming it. A missing property is
/// pointed at itself, not at its object.
pub(crate) fn first_violation(
    schema: &jsonschema::Validator,
    instance: &Json,
) -> Option<(String, String)> {
    if schema.is_valid(instance) {
        return None;
    }
    let error = schema.iter_errors(instance).next()?;
    let mut pointer = error.instance_path().to_string();
    if let jsonschema::error::ValidationErrorKind::Required { property } = error.kind()
        && let Some(name) = property.as_str()
    {
        pointer.push('/');
        pointer.push_str(&name.replace('~', "~0").replace('/', "~1"));
    }
    let message = format!(
        "{error} at `{}`",
        if pointer.is_empty() { "/" } else { &pointer }
    );
    Some((pointer, message))
}

/// Reads the envelope fields of a request body; the rest becomes `input`.
pub fn turn_request(
    mut body: serde_json::Map<String, Json>,
    headers: &HeaderMap,
) -> Result<TurnRequest, ApiError> {
    let text = required_string(&body, "text")?;
    let user_id = required_string(&body, "user_id")?;
    let channel = optional_string(&body, "channel")?.unwrap_or_else(|| "web".to_owned());
    let session_id =
        optional_string(&body, "session_id")?.unwrap_or_else(|| format!("{user_id}:{channel}"));
    let trace_id = match optional_string(&body, "trace_id")? {
        // It travels in headers (`x-trace-id` to services and to the client).
        Some(trace_id) if !is_header_safe(&trace_id) => {
            return Err(ApiError::invalid(
                StatusCode::UNPROCESSABLE_ENTITY,
                "/trace_id",
                format!(
                    "`trace_id` must be at most {MAX_TRACE_ID_LENGTH} characters, without control characters"
                ),
            ));
        }
        Some(trace_id) => trace_id,
        None => trace_id_from_traceparent(headers).unwrap_or_else(new_trace_id),
    };
    let tenant = optional_string(&body, "tenant")?;
    for field in ENVELOPE_FIELDS {
        body.remove(*field);
    }
    Ok(TurnRequest {
        text,
        user_id,
        channel,
        session_id,
        trace_id,
        tenant,
        input: body,
        direct: None,
    })
}

/// Longest `trace_id` accepted.
pub const MAX_TRACE_ID_LENGTH: usize = 128;

/// Whether a trace id is acceptable: at most `MAX_TRACE_ID_LENGTH`
/// characters, none of them a control character (what the request schema
/// says too). One that is not printable ASCII travels in bodies but not as
/// the `x-trace-id` header.
fn is_header_safe(value: &str) -> bool {
    value.chars().count() <= MAX_TRACE_ID_LENGTH && !value.chars().any(char::is_control)
}

fn required_string(body: &serde_json::Map<String, Json>, field: &str) -> Result<String, ApiError> {
    match body.get(field) {
        Some(Json::String(value)) if !value.trim().is_empty() => Ok(value.clone()),
        Some(Json::String(_)) => Err(ApiError::invalid(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("/{field}"),
            format!("`{field}` must not be empty"),
        )),
        Some(_) => Err(ApiError::invalid(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("/{field}"),
            format!("`{field}` must be a string"),
        )),
        None => Err(ApiError::invalid(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("/{field}"),
            format!("`{field}` is required"),
        )),
    }
}

fn optional_string(
    body: &serde_json::Map<String, Json>,
    field: &str,
) -> Result<Option<String>, ApiError> {
    match body.get(field) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(value)) if value.is_empty() => Ok(None),
        Some(Json::String(value)) => Ok(Some(value.clone())),
        Some(_) => Err(ApiError::invalid(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("/{field}"),
            format!("`{field}` must be a string"),
        )),
    }
}

/// A new trace id: 32 lowercase hex digits from the thread's CSPRNG (no
/// system call per request), never all zeros.
pub(crate) fn new_trace_id() -> String {
    format!("{:032x}", rand::random::<u128>().max(1))
}

/// The trace id of a W3C `traceparent` header (`00-<32 hex>-<16 hex>-<2 hex>`).
pub fn trace_id_from_traceparent(headers: &HeaderMap) -> Option<String> {
    let value = headers.get("traceparent")?.to_str().ok()?;
    let mut parts = value.trim().split('-');
    let version = parts.next()?;
    let trace_id = parts.next()?;
    let parent_id = parts.next()?;
    let flags = parts.next()?;
    let hex = |text: &str, length: usize| {
        text.len() == length && text.bytes().all(|b| b.is_ascii_hexdigit())
    };
    if hex(version, 2)
        && version != "ff"
        && hex(trace_id, 32)
        && trace_id.bytes().any(|b| b != b'0')
        && hex(parent_id, 16)
        && hex(flags, 2)
    {
        Some(trace_id.to_ascii_lowercase())
    } else {
        None
    }
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    axum::Json(health_json(&state).await).into_response()
}

/// What `/health` says of one project.
pub(crate) async fn health_json(state: &AppState) -> Json {
    // Bounded by the store's operation timeout: `/health` never hangs on
    // the store.
    let session_store = state.sessions.health().await;
    health_json_with(state, session_store)
}

/// `health_json`, with the session store's health already asked (one
/// tenant of several: the store is shared).
pub(crate) fn health_json_with(
    state: &AppState,
    session_store: crate::session::SessionStoreHealth,
) -> Json {
    let deployment = state.deployment.load_full();
    let project = &deployment.project;
    let services: Vec<Json> = project
        .services
        .iter()
        .zip(&deployment.modes)
        .map(|(service, mode)| {
            json!({
                "name": service.name,
                "mode": match mode { ServiceMode::Live(_) => "live", ServiceMode::Mock => "mock" },
                "url_variable": service.url_variable,
                "circuit": service.circuit_breaker.map(|_| state.breakers.state(&service.name)),
            })
        })
        .collect();
    let admission = state.admission.for_limits(&project.limits);
    let mocked: Vec<&str> = project
        .services
        .iter()
        .zip(&deployment.modes)
        .filter(|(_, mode)| matches!(mode, ServiceMode::Mock))
        .map(|(service, _)| service.name.as_str())
        .collect();
    let reload = state
        .reload
        .lock()
        .map(|status| status.clone())
        .unwrap_or_default();
    // Degraded, not failed: turns are still answered (without their
    // session), so a readiness probe keeps the replica in service.
    let status = match session_store.status {
        SessionStoreStatus::Ok => "ok",
        SessionStoreStatus::Unavailable => "degraded",
    };
    let body = json!({
        "status": status,
        "version": env!("CARGO_PKG_VERSION"),
        "environment": state.settings.environment.as_str(),
        "project": {
            "flows": project.flows.len(),
            "intents": project.intents.len(),
            "services": project.services.len(),
            "content_hash": project.content_hash,
            "generation": deployment.generation,
            "loaded_at": humantime::format_rfc3339_millis(deployment.loaded_at).to_string(),
        },
        "services": services,
        "mocked_services": mocked,
        "auth": if project.access.keys.is_empty() { "none" } else { "api_key" },
        "caller_keys": project.access.keys.iter().map(|key| &*key.name).collect::<Vec<_>>(),
        "metrics_auth": if project.access.metrics_key.is_some() { "api_key" } else { "none" },
        "limits": {
            "per_user": project.limits.per_user.map(rate_json),
            "per_key": project.limits.per_key.map(rate_json),
            "max_in_flight": project.limits.max_in_flight,
            "in_flight": admission.in_flight(),
        },
        "channels": channels_json(state, project),
        "sessions": state.sessions.session_count(),
        "session_store": session_store,
        "reload": {
            "generation": deployment.generation,
            "content_hash": project.content_hash,
            "attempts": reload.attempts,
            "last_success_at": reload.last_success_at,
            "last_error": reload.last_error,
        },
    });
    body
}

/// Each declared channel for `/health`: its kind, whether it is enabled,
/// and its counters since start-up.
fn channels_json(state: &AppState, project: &CompiledProject) -> Json {
    use std::sync::atomic::Ordering::Relaxed;
    Json::Array(
        project
            .channels
            .iter()
            .map(|channel| {
                let counters = state.channels.counters(&channel.name);
                json!({
                    "name": channel.name,
                    "kind": channel.kind.as_str(),
                    "enabled": channel.enabled(),
                    "unset": channel.unset.iter().map(|unset| unset.variable.clone().unwrap_or_else(|| unset.key.to_owned())).collect::<Vec<_>>(),
                    "received": counters.received.load(Relaxed),
                    "verification_failures": counters.verification_failures.load(Relaxed),
                    "duplicates": counters.duplicates.load(Relaxed),
                    "ignored": counters.ignored.load(Relaxed),
                    "rate_limited": counters.rate_limited.load(Relaxed),
                    "overloaded": counters.overloaded.load(Relaxed),
                    "turns": counters.turns.load(Relaxed),
                    "turn_failures": counters.turn_failures.load(Relaxed),
                    "replies": counters.replies.load(Relaxed),
                    "outbound_failures": counters.outbound_failures.load(Relaxed),
                    "queue_depth": counters.queue_depth.load(Relaxed),
                })
            })
            .collect(),
    )
}

/// The OpenAPI document of the HTTP surface (`docs/openapi.json`, kept
/// true by the tests).
pub const OPENAPI_DOCUMENT: &str = include_str!("../docs/openapi.json");

/// `GET /openapi.json`.
pub(crate) async fn openapi_document() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        OPENAPI_DOCUMENT,
    )
        .into_response()
}

/// A rate as `/health` shows it.
fn rate_json(rate: crate::project::Rate) -> Json {
    json!({
        "rate": format!("{}/{}", rate.count, match rate.period.as_secs() {
            1 => "s",
            60 => "m",
            _ => "h",
        }),
        "burst": rate.burst,
    })
}

/// `GET /metrics`: every metric in Prometheus text format; with a metrics
/// key in the project, only for a request bearing it.
async fn metrics_text(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let deployment = state.deployment.load();
    if !admission::metrics_allowed(&deployment.project.access, &headers) {
        return ApiError::unauthorized().into_response();
    }
    // Every breaker of the live project shows, also before its first call.
    for service in &deployment.project.services {
        if service.circuit_breaker.is_some() {
            metrics::gauge!(prometheus::CIRCUIT_BREAKER_STATE, "service" => service.name.clone())
                .set(state.breakers.state(&service.name).gauge_value());
        }
    }
    // Every declared channel shows, also before its first delivery.
    for channel in &deployment.project.channels {
        let counters = state.channels.counters(&channel.name);
        metrics::gauge!(prometheus::CHANNEL_QUEUE_DEPTH, "channel" => channel.name.clone()).set(
            counters
                .queue_depth
                .load(std::sync::atomic::Ordering::Relaxed) as f64,
        );
        metrics::counter!(prometheus::CHANNEL_DELIVERIES_TOTAL, "channel" => channel.name.clone(), "outcome" => "accepted")
            .increment(0);
        metrics::counter!(prometheus::CHANNEL_REPLIES_TOTAL, "channel" => channel.name.clone(), "outcome" => "ok")
            .increment(0);
    }
    drop(deployment);
    if let Some(count) = state.sessions.session_count() {
        metrics::gauge!(prometheus::SESSIONS).set(count as f64);
    }
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        prometheus::render(),
    )
        .into_response()
}

/// Serves `app` on `listener` until `shutdown` completes; then stops
/// accepting, lets in-flight requests finish for at most `grace`, and
/// returns. Connections are bounded in number and time
/// (`RuntimeSettings::connections`, see `connections`).
/// Serves `router` (the tenants' dispatcher) as `serve` serves one
/// project.
pub async fn serve_router(
    listener: tokio::net::TcpListener,
    router: Router,
    settings: ConnectionSettings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    connections::serve(listener, router, settings, shutdown, grace).await
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let settings = state.settings.connections;
    let closing = state.clone();
    let shutdown = async move {
        shutdown.await;
        closing.events.close();
    };
    connections::serve(listener, app(state), settings, shutdown, grace).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_written_as_serde_json_writes_them() {
        let mut texts: Vec<String> = (0u8..0x80)
            .map(|byte| char::from(byte).to_string())
            .collect();
        texts.push(String::new());
        texts.push("Here's what we're serving today:\n\nStarters\n- Burrata — 9.00 EUR".to_owned());
        texts.push("é—€🦀 \"quoted\" back\\slash \u{7f} \u{1f}".to_owned());
        // One escape at every place of an eight-byte chunk, and at its ends.
        for escape in ["\"", "\\", "\n", "\u{1}"] {
            for at in 0..20 {
                let mut text = "abcdefghijklmnopqrstuvwxyz".to_owned();
                text.insert_str(at, escape);
                texts.push(text);
            }
        }
        for text in texts {
            let mut ours = Vec::new();
            write_json_string(&mut ours, &text);
            let theirs = serde_json::to_vec(&text).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&ours),
                String::from_utf8_lossy(&theirs),
                "{text:?}"
            );
        }
    }

    #[test]
    fn the_envelope_is_written_as_serde_json_writes_it() {
        let span = |error, mock| ServiceSpan {
            service: "menu".to_owned(),
            status: Some(200),
            latency_ms: 1.25,
            attempts: 1,
            error,
            mock,
        };
        for (data, spans) in [
            (None, vec![]),
            (
                Some(serde_json::json!({"b": [1, 2.5, "x\ny"], "a": null})),
                vec![
                    span(None, false),
                    span(
                        Some(crate::services::ServiceErrorCode::ServiceTimeout),
                        true,
                    ),
                ],
            ),
        ] {
            let envelope = Envelope {
                decision: Decision::Reply,
                reply_text: "Here's the menu:\n- Burrata — 9.00 \"EUR\"".to_owned(),
                session_id: "s-1".to_owned(),
                route: "menu".to_owned(),
                intent: "menu".to_owned(),
                intent_confidence: 0.875,
                trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".to_owned(),
                service_spans: spans,
                data,
            };
            assert_eq!(
                String::from_utf8(envelope.to_json().unwrap()).unwrap(),
                serde_json::to_string(&envelope).unwrap()
            );
        }
    }
}
