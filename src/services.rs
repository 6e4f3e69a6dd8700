//! Service calls: send, time out, retry, read, unwrap, validate.
//!
//! The network is behind the `Transport` trait (HTTP in production, stubs
//! in tests); everything around it — the per-attempt timeout within the
//! request's deadline, retries with backoff and jitter, the size cap, JSON
//! parsing, list unwrapping and strict schema validation — is here, the same
//! for every transport. Every failure becomes one `ServiceError` with a
//! stable code; no upstream text reaches a reply.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use serde::Serialize;
use tokio::time::Instant;

use crate::document::Document;
use crate::project::{HttpMethod, Service};

mod circuit_breaker;
mod mcp_call;

pub use mcp_call::list_tools;

pub use circuit_breaker::{CircuitBreakers, CircuitState};

/// Largest service answer read, in bytes; a larger one is `service_bad_response`.
pub const MAX_RESPONSE_BYTES: usize = 2 * 1024 * 1024;

/// How a service is reached in this deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceMode {
    Live(url::Url),
    /// Answers with the service's `mock`.
    Mock,
}

/// The stable codes of a failed call; the same in replies' `error.code`,
/// `service_spans`, logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceErrorCode {
    ServiceTimeout,
    ServiceUnavailable,
    ServiceHttpError,
    ServiceBadResponse,
    SchemaViolation,
    /// The service's circuit breaker is open: no call was made.
    CircuitOpen,
}

impl ServiceErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceErrorCode::ServiceTimeout => "service_timeout",
            ServiceErrorCode::ServiceUnavailable => "service_unavailable",
            ServiceErrorCode::ServiceHttpError => "service_http_error",
            ServiceErrorCode::ServiceBadResponse => "service_bad_response",
            ServiceErrorCode::SchemaViolation => "schema_violation",
            ServiceErrorCode::CircuitOpen => "circuit_open",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServiceError {
    pub code: ServiceErrorCode,
    /// For logs and `error.message`; never the upstream body.
    pub message: String,
    /// The HTTP status, when the service answered.
    pub status: Option<u16>,
    /// Whether another attempt could succeed.
    pub retryable: bool,
    /// The request's deadline, not the service, ended the call (or left no
    /// time to make it): it says nothing about the service's health.
    pub cut_by_deadline: bool,
}

impl ServiceError {
    /// Whether the failure says the service is unwell, for its circuit
    /// breaker: timeouts of its own, refused connections, 5xx and 429
    /// answers, answers that are not JSON or break the schema. Other 4xx
    /// answers are about the request, and a call cut by the request's
    /// deadline (a slow client, an earlier slow call) about the turn.
    pub fn counts_against_service(&self) -> bool {
        if self.cut_by_deadline {
            return false;
        }
        match self.code {
            ServiceErrorCode::ServiceHttpError => self
                .status
                .is_none_or(|status| status >= 500 || status == 429),
            ServiceErrorCode::CircuitOpen => false,
            _ => true,
        }
    }

    fn new(code: ServiceErrorCode, message: impl Into<String>) -> ServiceError {
        ServiceError {
            code,
            message: message.into(),
            status: None,
            retryable: false,
            cut_by_deadline: false,
        }
    }
}

/// What the transport got back.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub body: Bytes,
}

/// Why the transport got nothing usable.
#[derive(Debug, Clone)]
pub enum TransportError {
    Timeout,
    /// Could not connect (refused, unreachable, DNS).
    Connect(String),
    /// The connection failed during the exchange.
    Io(String),
    /// The answer was larger than `MAX_RESPONSE_BYTES`.
    TooLarge,
    /// The request cannot be sent as configured (a header value that is
    /// not a valid HTTP header value, say); another attempt cannot help.
    InvalidRequest(String),
}

/// One outgoing request, as the transport sees it.
#[derive(Debug)]
pub struct OutgoingRequest<'a> {
    pub url: &'a url::Url,
    pub method: HttpMethod,
    pub headers: &'a [(String, String)],
    pub trace: &'a TraceHeaders,
    /// JSON, already serialized.
    pub body: Option<&'a Bytes>,
    pub timeout: Duration,
}

/// Trace headers sent with every call.
#[derive(Debug, Clone)]
pub struct TraceHeaders {
    pub trace_id: String,
    /// W3C `traceparent`.
    pub traceparent: String,
}

/// Sends requests to services. The HTTP one is `HttpTransport`; tests pass
/// stubs. A transport must return within `request.timeout`.
pub trait Transport: Send + Sync {
    fn send<'a>(
        &'a self,
        service: &'a Service,
        request: OutgoingRequest<'a>,
    ) -> BoxFuture<'a, Result<RawResponse, TransportError>>;
}

/// The pooled HTTP/1.1 client of service calls: hyper-util's client over
/// rustls (HTTPS) or plain TCP (HTTP).
type ServiceClient = hyper_util::client::legacy::Client<
    ConnectTimeout<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    >,
    http_body_util::Full<Bytes>,
>;

/// A connector whose connections must be ready (DNS, TCP and, for HTTPS,
/// TLS) within `CONNECT_TIMEOUT`; a late one fails as `TimedOut`.
#[derive(Clone)]
struct ConnectTimeout<C> {
    inner: C,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<C> tower_service::Service<http::Uri> for ConnectTimeout<C>
where
    C: tower_service::Service<http::Uri> + Send + 'static,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<C::Response, BoxError>>;

    fn poll_ready(
        &mut self,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        self.inner.poll_ready(context).map_err(Into::into)
    }

    fn call(&mut self, destination: http::Uri) -> Self::Future {
        let connecting = self.inner.call(destination);
        Box::pin(async move {
            match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
                Ok(connected) => connected.map_err(Into::into),
                Err(_) => Err(Box::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no connection within the connect timeout",
                )) as BoxError),
            }
        })
    }
}

/// Service calls over HTTP: one pooled client for every service
/// (keep-alive, at most `MAX_IDLE_PER_HOST` idle connections per host, a
/// connect timeout), no redirects.
///
/// Without a proxy it is hyper-util's client, the one reqwest wraps, used
/// directly: a call needs none of reqwest's per-request layers (its
/// redirect policy alone parsed the URL again for every call), and these
/// were about a tenth of the work of a whole turn. Behind an HTTP proxy it
/// is reqwest (`through_proxy`), which implements proxies.
#[derive(Clone)]
pub struct HttpTransport {
    client: HttpClient,
    /// The reqwest client of `kind: mcp` services (the MCP SDK's client
    /// runs over reqwest), built at the first such call.
    mcp_client: std::sync::OnceLock<Result<reqwest::Client, String>>,
}

/// How service calls reach the network.
#[derive(Clone)]
enum HttpClient {
    /// Straight to the service.
    Direct(ServiceClient),
    /// Through reqwest, which goes through the HTTP proxy of the
    /// environment (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY`).
    Proxied(reqwest::Client),
}

impl std::fmt::Debug for HttpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpTransport").finish_non_exhaustive()
    }
}

/// Time to connect to a service: name resolution, TCP and TLS.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an idle pooled connection is kept.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per host.
pub const MAX_IDLE_PER_HOST: usize = 64;

const USER_AGENT: &str = concat!("mcp-orchestrator/", env!("CARGO_PKG_VERSION"));

impl HttpTransport {
    /// The transport, verifying servers' certificates with the platform's
    /// trust store. Uses the process's default rustls crypto provider,
    /// which `serve` installs (ring).
    pub fn new() -> Result<HttpTransport, rustls::Error> {
        use rustls_platform_verifier::BuilderVerifierExt;
        let provider = rustls::crypto::CryptoProvider::get_default()
            .cloned()
            .unwrap_or_else(|| std::sync::Arc::new(rustls::crypto::ring::default_provider()));
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_platform_verifier()?
            .with_no_client_auth();
        let mut tcp = hyper_util::client::legacy::connect::HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        let connector = ConnectTimeout {
            inner: hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls)
                .https_or_http()
                .enable_http1()
                .wrap_connector(tcp),
        };
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_timer(hyper_util::rt::TokioTimer::new())
                .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                .pool_max_idle_per_host(MAX_IDLE_PER_HOST)
                .build(connector);
        Ok(HttpTransport {
            client: HttpClient::Direct(client),
            mcp_client: std::sync::OnceLock::new(),
        })
    }

    /// The transport of a deployment behind an HTTP proxy: calls go through
    /// `client` (see `http_client`), which reads the proxy environment
    /// variables. Slower per call than `new`, for the same behaviour
    /// otherwise (timeouts, no redirects, headers, size cap).
    pub fn through_proxy(client: reqwest::Client) -> HttpTransport {
        HttpTransport {
            mcp_client: std::sync::OnceLock::from(Ok(client.clone())),
            client: HttpClient::Proxied(client),
        }
    }
}

/// Whether the environment names an HTTP proxy (`HTTPS_PROXY`,
/// `HTTP_PROXY`, `ALL_PROXY`, in either case), as reqwest reads them.
pub fn proxy_configured(variable: impl Fn(&str) -> Option<String>) -> Option<&'static str> {
    [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ]
    .into_iter()
    .find(|name| variable(name).is_some_and(|value| !value.trim().is_empty()))
}

/// The LLM's and Loki's HTTP client: rustls, pooled keep-alive
/// connections, a connect timeout, no redirects; per-request timeouts are
/// set on each request.
pub fn http_client() -> reqwest::Result<reqwest::Client> {
    // reqwest reads the process's rustls provider; ring unless one was
    // installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(MAX_IDLE_PER_HOST)
        .tcp_nodelay(true)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(USER_AGENT)
        .build()
}

/// The request of one attempt; `Err` names what cannot be sent.
fn http_request(request: &OutgoingRequest<'_>) -> Result<http::Request<Bytes>, String> {
    let method = match request.method {
        HttpMethod::Get => http::Method::GET,
        HttpMethod::Post => http::Method::POST,
        HttpMethod::Put => http::Method::PUT,
        HttpMethod::Patch => http::Method::PATCH,
        HttpMethod::Delete => http::Method::DELETE,
    };
    let (uri, authorization) = target(request.url)?;
    let mut builder = http::Request::builder()
        .method(method)
        .uri(uri)
        .header(http::header::USER_AGENT, USER_AGENT)
        .header(http::header::ACCEPT, "application/json")
        .header("x-trace-id", request.trace.trace_id.as_str())
        .header("traceparent", request.trace.traceparent.as_str());
    if let Some(authorization) = authorization {
        builder = builder.header(http::header::AUTHORIZATION, authorization);
    }
    if request.body.is_some() {
        builder = builder.header(http::header::CONTENT_TYPE, "application/json");
    }
    // The project's headers come last, so they may override the ones above.
    let mut http_request = builder
        .body(request.body.cloned().unwrap_or_default())
        .map_err(|error| format!("the request cannot be built: {error}"))?;
    let headers = http_request.headers_mut();
    for (name, value) in request.headers {
        let name = http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("`{name}` is not a valid header name"))?;
        let mut value = http::HeaderValue::from_str(value)
            .map_err(|_| format!("the value of header `{name}` is not a valid header value"))?;
        value.set_sensitive(true);
        headers.insert(name, value);
    }
    Ok(http_request)
}

/// The URI of `url` and, when the URL carries `user:password@`, the Basic
/// authorization they stand for (they are not sent in the URI).
fn target(url: &url::Url) -> Result<(http::Uri, Option<http::HeaderValue>), String> {
    let invalid =
        |error: http::uri::InvalidUri| format!("the service URL is not a valid URI: {error}");
    if url.username().is_empty() && url.password().is_none() {
        return Ok((http::Uri::try_from(url.as_str()).map_err(invalid)?, None));
    }
    // The decoded bytes as they are, UTF-8 or not.
    let mut credentials: Vec<u8> = percent_encoding::percent_decode_str(url.username()).collect();
    credentials.push(b':');
    credentials.extend(percent_encoding::percent_decode_str(
        url.password().unwrap_or_default(),
    ));
    let mut value = http::HeaderValue::try_from(format!(
        "Basic {}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, credentials)
    ))
    .map_err(|_| "the service URL's credentials cannot be sent".to_owned())?;
    value.set_sensitive(true);
    let mut bare = url.clone();
    // Cannot fail for an http(s) URL with a host, which `check` ensures.
    let _ = bare.set_username("");
    let _ = bare.set_password(None);
    Ok((
        http::Uri::try_from(bare.as_str()).map_err(invalid)?,
        Some(value),
    ))
}

impl Transport for HttpTransport {
    fn send<'a>(
        &'a self,
        service: &'a Service,
        request: OutgoingRequest<'a>,
    ) -> BoxFuture<'a, Result<RawResponse, TransportError>> {
        if let Some(tool) = &service.mcp_tool {
            let client = self
                .mcp_client
                .get_or_init(|| http_client().map_err(|error| error_chain(&error)));
            return Box::pin(async move {
                match client {
                    Ok(client) => mcp_call::call_tool(client, tool, &request).await,
                    Err(error) => Err(TransportError::InvalidRequest(error.clone())),
                }
            });
        }
        Box::pin(async move {
            let http_request = http_request(&request).map_err(TransportError::InvalidRequest)?;
            let exchange = async {
                match &self.client {
                    HttpClient::Direct(client) => {
                        let response = client
                            .request(http_request.map(http_body_util::Full::new))
                            .await
                            .map_err(client_error)?;
                        read_answer(response).await
                    }
                    HttpClient::Proxied(client) => {
                        let request =
                            reqwest::Request::try_from(http_request).map_err(|error| {
                                TransportError::InvalidRequest(error_chain(&error.without_url()))
                            })?;
                        let response = client.execute(request).await.map_err(reqwest_error)?;
                        read_answer(http::Response::from(response)).await
                    }
                }
            };
            match tokio::time::timeout(request.timeout, exchange).await {
                Ok(result) => result,
                Err(_) => Err(TransportError::Timeout),
            }
        })
    }
}

/// The status and the body of an answer, at most `MAX_RESPONSE_BYTES`.
async fn read_answer<B>(response: http::Response<B>) -> Result<RawResponse, TransportError>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::error::Error,
{
    let status = response.status().as_u16();
    let mut body = response.into_body();
    if http_body::Body::size_hint(&body)
        .upper()
        .is_some_and(|length| length > MAX_RESPONSE_BYTES as u64)
    {
        return Err(TransportError::TooLarge);
    }
    let mut bytes = Vec::new();
    while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
        let frame = frame.map_err(|error| TransportError::Io(error_chain(&error)))?;
        if let Ok(chunk) = frame.into_data() {
            if bytes.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(TransportError::TooLarge);
            }
            bytes.extend_from_slice(&chunk);
        }
    }
    Ok(RawResponse {
        status,
        body: Bytes::from(bytes),
    })
}

/// Sorts a reqwest error like `client_error`; its text leaves the URL out.
fn reqwest_error(error: reqwest::Error) -> TransportError {
    let error = error.without_url();
    if error.is_timeout() {
        TransportError::Timeout
    } else if error.is_connect() {
        TransportError::Connect(error_chain(&error))
    } else {
        TransportError::Io(error_chain(&error))
    }
}

/// Sorts a client error: a connect timeout is a timeout, any other connect
/// failure `Connect`, the rest `Io`.
fn client_error(error: hyper_util::client::legacy::Error) -> TransportError {
    let timed_out =
        std::iter::successors(std::error::Error::source(&error), |cause| cause.source()).any(
            |cause| {
                cause
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
            },
        );
    if timed_out {
        TransportError::Timeout
    } else if error.is_connect() {
        TransportError::Connect(error_chain(&error))
    } else {
        TransportError::Io(error_chain(&error))
    }
}

/// The error and its sources on one line. Client errors do not carry the
/// URL (which may hold credentials or a query).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// One call's record, reported in the envelope's `service_spans`.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceSpan {
    pub service: String,
    /// The last HTTP status, `null` when no answer came.
    pub status: Option<u16>,
    pub latency_ms: f64,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ServiceErrorCode>,
    /// True when the answer came from the service's mock.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub mock: bool,
}

#[derive(Debug)]
pub struct CallOutcome {
    pub result: Result<Document, ServiceError>,
    pub span: ServiceSpan,
}

/// Calls `service` with `body`: at most its retry attempts, each within its
/// timeout and the request's `deadline`; reads, unwraps and validates the
/// answer.
pub async fn call(
    transport: &dyn Transport,
    breakers: &CircuitBreakers,
    service: &Service,
    mode: &ServiceMode,
    body: Option<&serde_json::Value>,
    trace: &TraceHeaders,
    deadline: Instant,
) -> CallOutcome {
    let started = Instant::now();
    let ticket = match mode {
        ServiceMode::Mock => None,
        ServiceMode::Live(_) => {
            match breakers.admit(&service.name, service.circuit_breaker, started) {
                Some(ticket) => Some(ticket),
                None => {
                    let error = ServiceError::new(
                        ServiceErrorCode::CircuitOpen,
                        format!(
                            "the circuit of service `{}` is open after repeated failures: not called",
                            service.name
                        ),
                    );
                    let mut span = span(service, None, started, 0, false);
                    span.error = Some(error.code);
                    record_call_metrics(service, span.error, started.elapsed());
                    return CallOutcome {
                        result: Err(error),
                        span,
                    };
                }
            }
        }
    };
    let attempts = AtomicU32::new(0);
    let last_status = Arc::new(std::sync::Mutex::new(None::<u16>));
    let result = match mode {
        ServiceMode::Mock => {
            attempts.store(1, Ordering::Relaxed);
            match &service.mock {
                Some(mock) => {
                    set_status(&last_status, mock.status);
                    interpret(
                        service,
                        mock.status,
                        serde_json::to_vec(&mock.body)
                            .map(Bytes::from)
                            .unwrap_or_default(),
                    )
                }
                None => Err(ServiceError::new(
                    ServiceErrorCode::ServiceUnavailable,
                    format!("service `{}` has no URL and no mock", service.name),
                )),
            }
        }
        ServiceMode::Live(url) => {
            let body = match body.map(serde_json::to_vec).transpose() {
                Ok(body) => body.map(Bytes::from),
                Err(error) => {
                    return CallOutcome {
                        result: Err(ServiceError::new(
                            ServiceErrorCode::ServiceBadResponse,
                            format!("the request body cannot be serialized: {error}"),
                        )),
                        span: span(service, None, started, 0, false),
                    };
                }
            };
            let attempt = || async {
                attempts.fetch_add(1, Ordering::Relaxed);
                let remaining = deadline.saturating_duration_since(Instant::now());
                if remaining.is_zero() {
                    return Err(timeout_error(service, true));
                }
                let timeout = service.timeout.min(remaining);
                let request = OutgoingRequest {
                    url,
                    method: service.method,
                    headers: &service.headers,
                    trace,
                    body: body.as_ref(),
                    timeout,
                };
                match transport.send(service, request).await {
                    Ok(response) => {
                        set_status(&last_status, response.status);
                        interpret(service, response.status, response.body)
                    }
                    Err(error) => Err(transport_error(service, error, timeout < service.timeout)),
                }
            };
            match service.retry {
                Some(retry) => {
                    let backoff = ExponentialBuilder::default()
                        .with_min_delay(retry.backoff)
                        .with_max_delay(retry.backoff.saturating_mul(16))
                        .with_max_times(retry.attempts.saturating_sub(1) as usize)
                        .with_jitter();
                    attempt
                        .retry(backoff)
                        .sleep(tokio::time::sleep)
                        .when(|error: &ServiceError| error.retryable)
                        // Never sleep past the request's deadline.
                        .adjust(|_, delay| delay.filter(|delay| Instant::now() + *delay < deadline))
                        .await
                }
                None => attempt().await,
            }
        }
    };
    if let Some(ticket) = ticket {
        match &result {
            Ok(_) => ticket.finish(false, Instant::now()),
            // Cut by the request's deadline: neither a success nor a
            // failure of the service (a probe frees its place).
            Err(error) if error.cut_by_deadline => drop(ticket),
            Err(error) => ticket.finish(error.counts_against_service(), Instant::now()),
        }
    }
    let status = *last_status
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let error = result.as_ref().err().map(|error| error.code);
    let mut span = span(
        service,
        status,
        started,
        attempts.load(Ordering::Relaxed),
        matches!(mode, ServiceMode::Mock),
    );
    span.error = error;
    record_call_metrics(service, error, started.elapsed());
    CallOutcome { result, span }
}

/// Counts the call by service and outcome (`ok` or its error code), and
/// times it.
fn record_call_metrics(service: &Service, error: Option<ServiceErrorCode>, elapsed: Duration) {
    use crate::telemetry::prometheus;
    let tenant = service.tenant.as_deref();
    let counter = |outcome: &'static str| {
        let labels = prometheus::with_tenant(
            tenant,
            vec![
                metrics::Label::new("service", service.name.clone()),
                metrics::Label::new("outcome", outcome),
            ],
        );
        metrics::counter!(prometheus::SERVICE_CALLS_TOTAL, labels)
    };
    let register = || {
        let labels = prometheus::with_tenant(
            tenant,
            vec![metrics::Label::new("service", service.name.clone())],
        );
        crate::project::CallMetrics {
            ok: counter("ok"),
            duration: metrics::histogram!(prometheus::SERVICE_CALL_DURATION_SECONDS, labels),
        }
    };
    // Handles taken before the recorder is installed would record nowhere.
    let handles = match prometheus::installed() {
        true => service.call_metrics.get_or_init(register),
        false => &register(),
    };
    match error {
        None => handles.ok.increment(1),
        Some(code) => counter(code.as_str()).increment(1),
    }
    handles.duration.record(elapsed.as_secs_f64());
}

fn set_status(slot: &std::sync::Mutex<Option<u16>>, status: u16) {
    *slot
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(status);
}

fn span(
    service: &Service,
    status: Option<u16>,
    started: Instant,
    attempts: u32,
    mock: bool,
) -> ServiceSpan {
    let micros = started.elapsed().as_micros() as f64;
    ServiceSpan {
        service: service.name.clone(),
        status,
        latency_ms: (micros / 10.0).round() / 100.0,
        attempts,
        error: None,
        mock,
    }
}

fn timeout_error(service: &Service, deadline: bool) -> ServiceError {
    ServiceError {
        code: ServiceErrorCode::ServiceTimeout,
        message: if deadline {
            format!(
                "service `{}` did not answer before the request's deadline",
                service.name
            )
        } else {
            format!(
                "service `{}` did not answer within {}",
                service.name,
                humantime::format_duration(service.timeout)
            )
        },
        status: None,
        retryable: !deadline,
        cut_by_deadline: deadline,
    }
}

fn transport_error(
    service: &Service,
    error: TransportError,
    cut_by_deadline: bool,
) -> ServiceError {
    match error {
        TransportError::Timeout => timeout_error(service, cut_by_deadline),
        TransportError::Connect(reason) => ServiceError {
            code: ServiceErrorCode::ServiceUnavailable,
            message: format!("cannot connect to service `{}`: {reason}", service.name),
            status: None,
            retryable: true,
            cut_by_deadline: false,
        },
        TransportError::Io(reason) => ServiceError {
            code: ServiceErrorCode::ServiceUnavailable,
            message: format!(
                "the exchange with service `{}` failed: {reason}",
                service.name
            ),
            status: None,
            retryable: true,
            cut_by_deadline: false,
        },
        TransportError::InvalidRequest(reason) => ServiceError::new(
            ServiceErrorCode::ServiceUnavailable,
            format!(
                "the call to service `{}` cannot be made: {reason}",
                service.name
            ),
        ),
        TransportError::TooLarge => ServiceError::new(
            ServiceErrorCode::ServiceBadResponse,
            format!(
                "service `{}` answered more than {} bytes",
                service.name, MAX_RESPONSE_BYTES
            ),
        ),
    }
}

/// Status, JSON, unwrap, schema: the answer as the flow will see it.
fn interpret(service: &Service, status: u16, body: Bytes) -> Result<Document, ServiceError> {
    if !(200..300).contains(&status) {
        let code = if status == 503 {
            ServiceErrorCode::ServiceUnavailable
        } else {
            ServiceErrorCode::ServiceHttpError
        };
        let message = match &service.mcp_tool {
            // The tool's own words: what went wrong is in them.
            Some(tool) => {
                let said: String = String::from_utf8_lossy(&body).chars().take(300).collect();
                format!("tool `{tool}` of service `{}` failed: {said}", service.name)
            }
            None => format!("service `{}` answered HTTP {status}", service.name),
        };
        return Err(ServiceError {
            code,
            message,
            status: Some(status),
            retryable: matches!(status, 429 | 500 | 502 | 503 | 504),
            cut_by_deadline: false,
        });
    }
    let mut value: Document = parse_json(&body).map_err(|error| ServiceError {
        status: Some(status),
        ..ServiceError::new(
            ServiceErrorCode::ServiceBadResponse,
            format!("service `{}` did not answer JSON: {error}", service.name),
        )
    })?;
    if service.unwrap_first
        && let Document::Array(items) = &mut value
    {
        if items.is_empty() {
            return Err(ServiceError {
                status: Some(status),
                ..ServiceError::new(
                    ServiceErrorCode::ServiceBadResponse,
                    format!("service `{}` answered an empty list", service.name),
                )
            });
        }
        value = items.swap_remove(0);
    }
    // `is_valid` stops at the first failure without building errors; the
    // error is built only for an answer that fails.
    if let Some(schema) = &service.response_schema
        && !schema.validator.is_valid(&value)
        && let Some(error) = schema.validator.iter_errors(&value).next()
    {
        let pointer = error.instance_path().to_string();
        return Err(ServiceError {
            status: Some(status),
            ..ServiceError::new(
                ServiceErrorCode::SchemaViolation,
                format!(
                    "the answer of service `{}` does not match `{}` at `{}`: {}",
                    service.name,
                    schema.file,
                    if pointer.is_empty() { "/" } else { &pointer },
                    error.kind_description()
                ),
            )
        });
    }
    Ok(value)
}

/// Parses a JSON document. The bytes are checked to be UTF-8 once, as a
/// whole, and parsed as text: parsing bytes would check every string
/// again on its own.
pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let text = std::str::from_utf8(bytes).map_err(|error| {
        format!(
            "invalid UTF-8 at byte {} of {}",
            error.valid_up_to(),
            bytes.len()
        )
    })?;
    serde_json::from_str(text).map_err(|error| error.to_string())
}

/// Describes a schema error without quoting the instance (which may hold
/// upstream data that must not reach a log unredacted).
trait KindDescription {
    fn kind_description(&self) -> String;
}

impl KindDescription for jsonschema::ValidationError<'_> {
    fn kind_description(&self) -> String {
        let text = format!("{:?}", self.kind());
        let name = text
            .split(|c: char| !c.is_alphanumeric())
            .next()
            .unwrap_or("invalid");
        format!("`{name}` constraint failed")
    }
}

#[cfg(test)]
mod tests {
    use super::proxy_configured;

    #[test]
    fn a_proxy_is_configured_by_any_non_empty_proxy_variable() {
        let only = |set: &'static str, value: &'static str| {
            move |name: &str| (name == set).then(|| value.to_owned())
        };
        assert_eq!(proxy_configured(|_| None), None);
        assert_eq!(proxy_configured(only("NO_PROXY", "*")), None);
        assert_eq!(proxy_configured(only("https_proxy", " ")), None);
        assert_eq!(
            proxy_configured(only("https_proxy", "http://proxy:3128")),
            Some("https_proxy")
        );
        assert_eq!(
            proxy_configured(only("ALL_PROXY", "socks5://proxy:1080")),
            Some("ALL_PROXY")
        );
    }
}
