//! `/console`: a page served by the binary itself where flow authors see
//! every turn step by step, chat with the flows, see the project as a
//! graph and the diagnostics of a broken edit, and save a conversation as a
//! test. Its files are embedded; its data comes from `/console/api/*`.
//!
//! Who may use it: a caller key declared with `console: true`; in
//! development, when no key says so, any caller key — or anyone, when the
//! project declares no key, from an allowed `Host` only (loopback unless
//! `MCP_ALLOWED_HOSTS` says otherwise), so a web page cannot reach it by
//! DNS rebinding. Answers never carry a secret: traces are redacted as in
//! logs.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value as Json, json};
use tokio::sync::broadcast;

use super::{ApiError, AppState, Environment, JsonObject};
use crate::admission::{self, Caller};
use crate::graph::{self, GraphError, GraphFormat};
use crate::trace::TurnSummary;

/// Every console route starts with it (after `/t/{tenant}` for a tenant's).
pub const PREFIX: &str = "/console";

/// Whether `path` is a console route, of the process or of a tenant.
pub fn is_console_path(path: &str) -> bool {
    let path = match path.strip_prefix("/t/") {
        Some(rest) => rest.find('/').map_or("", |at| &rest[at..]),
        None => path,
    };
    path.starts_with(PREFIX)
}

const INDEX_HTML: &str = include_str!("../../console/index.html");
const CONSOLE_JS: &str = include_str!("../../console/console.js");
const CONSOLE_CSS: &str = include_str!("../../console/console.css");

/// What the page may load: its own files and API, nothing else; inline
/// styles for the drawn graph.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// How often an idle event stream says it is alive.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Longest test name accepted.
const MAX_TEST_NAME: usize = 120;

/// Most `flows/tests/console-*.yaml` files the console writes.
const MAX_SAVED_TESTS: usize = 200;

/// Most console event streams open at once (beside MCP's).
const MAX_CONSOLE_STREAMS: usize = 64;

/// What the console keeps: the last turns' traces, and drawn graphs.
pub struct Console {
    pub traces: crate::trace::Traces,
    graphs: Mutex<Graphs>,
    /// One graph is drawn at a time: layout is CPU work.
    drawing: tokio::sync::Semaphore,
    streams: Arc<tokio::sync::Semaphore>,
}

impl Default for Console {
    fn default() -> Console {
        Console {
            traces: Default::default(),
            graphs: Default::default(),
            drawing: tokio::sync::Semaphore::new(1),
            streams: Arc::new(tokio::sync::Semaphore::new(MAX_CONSOLE_STREAMS)),
        }
    }
}

impl Console {
    fn graphs(&self) -> std::sync::MutexGuard<'_, Graphs> {
        match self.graphs.lock() {
            Ok(graphs) => graphs,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The graph of `flow` drawn for `generation`, if any.
    fn drawn(&self, generation: u64, flow: &Option<String>) -> Option<Arc<str>> {
        let graphs = self.graphs();
        (graphs.generation == generation)
            .then(|| graphs.drawn.get(flow).cloned())
            .flatten()
    }

    /// Keeps a graph drawn for `generation`, unless a newer generation's
    /// are kept already.
    fn keep_drawn(&self, generation: u64, flow: Option<String>, svg: Arc<str>) {
        let mut graphs = self.graphs();
        if generation > graphs.generation {
            *graphs = Graphs {
                generation,
                drawn: HashMap::new(),
            };
        }
        if generation == graphs.generation {
            graphs.drawn.insert(flow, svg);
        }
    }
}

/// The client's address, when the server knows it (`ConnectInfo`, set by
/// `connections` for console routes).
struct Peer(Option<std::net::SocketAddr>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Peer {
    type Rejection = Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Peer, Infallible> {
        Ok(Peer(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|info| info.0),
        ))
    }
}

/// Graphs of one generation, by flow (`None`: the whole project). At most
/// one per flow plus one: bounded by the project.
#[derive(Default)]
struct Graphs {
    generation: u64,
    drawn: HashMap<Option<String>, Arc<str>>,
}

/// The console's routes; empty when the console is off.
pub fn routes(state: &AppState) -> Router<Arc<AppState>> {
    if state.console.is_none() {
        return Router::new();
    }
    Router::new()
        .route("/console", get(page))
        // The page's links are relative to `/console`.
        .route(
            "/console/",
            get(|| async { axum::response::Redirect::permanent("../console") }),
        )
        .route("/console/assets/{file}", get(asset))
        .route("/console/api/status", get(status))
        .route("/console/api/turns", get(turns))
        .route("/console/api/turns/{id}", get(turn))
        .route("/console/api/events", get(events))
        .route("/console/api/graph", get(graph_svg))
        .route("/console/api/tests", post(save_test))
}

async fn page() -> Response {
    static_file("text/html; charset=utf-8", INDEX_HTML)
}

async fn asset(Path(file): Path<String>) -> Response {
    match file.as_str() {
        "console.js" => static_file("text/javascript; charset=utf-8", CONSOLE_JS),
        "console.css" => static_file("text/css; charset=utf-8", CONSOLE_CSS),
        _ => not_found("no such console file").into_response(),
    }
}

fn static_file(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

fn not_found(detail: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", detail)
}

/// Whether this request may use the console's API.
fn admit(state: &AppState, headers: &HeaderMap, peer: &Peer) -> Result<(), ApiError> {
    let deployment = state.deployment.load();
    let access = &deployment.project.access;
    let console_keys = access.keys.iter().any(|key| key.console);
    match admission::authenticate(access, headers) {
        None => Err(ApiError::unauthorized()),
        Some(Caller::Key(key)) if key.console => Ok(()),
        Some(Caller::Key(key)) => {
            if console_keys || state.settings.environment == Environment::Production {
                Err(ApiError::forbidden(format!(
                    "the caller key `{}` may not open the console: declare it with `console: true`",
                    key.name
                )))
            } else {
                Ok(())
            }
        }
        Some(Caller::Anonymous) => {
            let host_allowed = match &state.settings.mcp.allowed_hosts {
                None => true,
                Some(hosts) => headers
                    .get(header::HOST)
                    .and_then(|host| host.to_str().ok())
                    .map(host_name)
                    .is_some_and(|host| {
                        hosts
                            .iter()
                            .any(|allowed| allowed.eq_ignore_ascii_case(host))
                    }),
            };
            // Nobody else on the network: a request from this machine,
            // for an allowed name (not a rebound DNS name).
            let local = peer.0.is_some_and(|peer| peer.ip().is_loopback());
            if state.settings.environment == Environment::Development && host_allowed && local {
                Ok(())
            } else {
                Err(ApiError::forbidden(
                    "without caller keys the console answers only in development, from this machine, on an allowed host (MCP_ALLOWED_HOSTS)",
                ))
            }
        }
    }
}

/// `Host` without its port and trailing dot (and without the brackets of
/// an IPv6 address).
pub(crate) fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    let name = host.rsplit_once(':').map_or(host, |(name, _)| name);
    name.strip_suffix('.').unwrap_or(name)
}

/// `body` as `content_type`, never cached.
fn fresh(body: String, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn json_response(body: Json) -> Response {
    let mut response = axum::Json(body).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The project, its generation and its reload status.
fn status_json(state: &AppState) -> Json {
    let deployment = state.deployment.load();
    let project = &deployment.project;
    let reload = match state.reload.lock() {
        Ok(reload) => reload.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    let mut channels = vec!["web".to_owned()];
    channels.extend(
        project
            .channels
            .iter()
            .map(|channel| channel.name.clone())
            .filter(|name| name != "web"),
    );
    json!({
        "environment": state.settings.environment.as_str(),
        "generation": deployment.generation,
        "loaded_at": humantime::format_rfc3339_millis(deployment.loaded_at).to_string(),
        "flows": project.flows.iter().map(|flow| flow.name.as_str()).collect::<Vec<_>>(),
        "intents": project.intents.iter().map(|intent| intent.name.as_str()).collect::<Vec<_>>(),
        "channels": channels,
        "reload": reload,
    })
}

async fn status(State(state): State<Arc<AppState>>, peer: Peer, headers: HeaderMap) -> Response {
    match admit(&state, &headers, &peer) {
        Ok(()) => json_response(status_json(&state)),
        Err(error) => error.into_response(),
    }
}

async fn turns(State(state): State<Arc<AppState>>, peer: Peer, headers: HeaderMap) -> Response {
    if let Err(error) = admit(&state, &headers, &peer) {
        return error.into_response();
    }
    let summaries = state
        .console
        .as_ref()
        .map(|console| console.traces.summaries())
        .unwrap_or_default();
    let turns: Vec<&TurnSummary> = summaries.iter().map(Arc::as_ref).collect();
    json_response(json!({ "turns": turns }))
}

async fn turn(
    State(state): State<Arc<AppState>>,
    peer: Peer,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(error) = admit(&state, &headers, &peer) {
        return error.into_response();
    }
    let trace = id
        .parse::<u64>()
        .ok()
        .and_then(|id| state.console.as_ref()?.traces.trace(id));
    match trace {
        Some(text) => fresh(text.to_string(), "application/json"),
        None => not_found(format!(
            "no turn `{id}` is kept (the console keeps the last {} turns)",
            crate::trace::MAX_TURNS
        ))
        .into_response(),
    }
}

/// What the event stream waits on.
struct Feed {
    state: Arc<AppState>,
    credentials: HeaderMap,
    peer: Peer,
    turns: broadcast::Receiver<Arc<TurnSummary>>,
    reloads: tokio::sync::watch::Receiver<u64>,
    closed: Pin<Box<dyn Future<Output = ()> + Send>>,
    _place: tokio::sync::OwnedSemaphorePermit,
}

/// `GET /console/api/events`: every new turn (`turn`), every reload
/// attempt (`status`), and `lagged` when the reader fell behind. Ends when
/// the server shuts down.
async fn events(State(state): State<Arc<AppState>>, peer: Peer, headers: HeaderMap) -> Response {
    if let Err(error) = admit(&state, &headers, &peer) {
        return error.into_response();
    }
    let Some(console) = state.console.as_ref() else {
        return not_found("the console is off").into_response();
    };
    let Ok(place) = console.streams.clone().try_acquire_owned() else {
        return ApiError {
            retry_after: Some(super::OVERLOADED_RETRY_AFTER_SECONDS),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                format!("{MAX_CONSOLE_STREAMS} console event streams are open; retry shortly"),
            )
        }
        .into_response();
    };
    // What `admit` reads, kept to ask it again before every event: a key
    // removed by a reload ends the stream.
    let mut credentials = HeaderMap::new();
    for name in [header::AUTHORIZATION, header::HOST] {
        if let Some(value) = headers.get(&name) {
            credentials.insert(name, value.clone());
        }
    }
    if let Some(value) = headers.get("x-api-key") {
        credentials.insert("x-api-key", value.clone());
    }
    let feed = Feed {
        credentials,
        peer,
        turns: console.traces.subscribe(),
        reloads: state.events.reloads(),
        closed: Box::pin(state.events.closed()),
        state: state.clone(),
        _place: place,
    };
    let stream = futures_util::stream::unfold(feed, next_event);
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn next_event(mut feed: Feed) -> Option<(Result<Event, Infallible>, Feed)> {
    let event = tokio::select! {
        () = &mut feed.closed => return None,
        turn = feed.turns.recv() => match turn {
            Ok(summary) => json_event("turn", &*summary),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                json_event("lagged", &json!({ "missed": missed }))
            }
            Err(broadcast::error::RecvError::Closed) => return None,
        },
        changed = feed.reloads.changed() => match changed {
            Ok(()) => json_event("status", &status_json(&feed.state)),
            Err(_) => return None,
        },
    };
    if admit(&feed.state, &feed.credentials, &feed.peer).is_err() {
        return None;
    }
    Some((Ok(event), feed))
}

fn json_event(name: &str, data: &impl serde::Serialize) -> Event {
    Event::default()
        .event(name)
        .json_data(data)
        .unwrap_or_else(|_| Event::default().comment("an event could not be written"))
}

#[derive(Debug, Deserialize)]
struct GraphQuery {
    flow: Option<String>,
}

/// `GET /console/api/graph?flow=NAME`: the flow (or the whole project) as
/// SVG, drawn once per generation.
async fn graph_svg(
    State(state): State<Arc<AppState>>,
    peer: Peer,
    headers: HeaderMap,
    Query(query): Query<GraphQuery>,
) -> Response {
    if let Err(error) = admit(&state, &headers, &peer) {
        return error.into_response();
    }
    let Some(console) = state.console.as_ref() else {
        return not_found("the console is off").into_response();
    };
    let deployment = state.deployment.load_full();
    let flow = query.flow.filter(|flow| !flow.is_empty());
    if let Some(svg) = console.drawn(deployment.generation, &flow) {
        return fresh(svg.to_string(), "image/svg+xml");
    }
    // One drawing at a time, waited for within the request timeout; the
    // one before may have drawn this very graph.
    let Ok(Ok(_drawing)) =
        tokio::time::timeout(state.settings.request_timeout, console.drawing.acquire()).await
    else {
        return ApiError {
            retry_after: Some(super::OVERLOADED_RETRY_AFTER_SECONDS),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "another graph is being drawn; retry shortly",
            )
        }
        .into_response();
    };
    if let Some(svg) = console.drawn(deployment.generation, &flow) {
        return fresh(svg.to_string(), "image/svg+xml");
    }
    // Layout is CPU work: off the request threads.
    let drawn = {
        let deployment = deployment.clone();
        let flow = flow.clone();
        tokio::task::spawn_blocking(move || {
            graph::render(&deployment.project, flow.as_deref(), GraphFormat::Svg)
        })
        .await
    };
    let svg: Arc<str> = match drawn {
        Ok(Ok(svg)) => svg.into(),
        Ok(Err(GraphError::UnknownFlow { name, suggestion })) => {
            let hint = suggestion
                .map(|suggestion| format!("; did you mean `{suggestion}`?"))
                .unwrap_or_default();
            return not_found(format!("no flow `{name}`{hint}")).into_response();
        }
        Ok(Err(error)) => return graph_failed(&error),
        Err(error) => return graph_failed(&error),
    };
    console.keep_drawn(deployment.generation, flow, svg.clone());
    fresh(svg.to_string(), "image/svg+xml")
}

/// A drawing fault: logged, and answered without its details.
fn graph_failed(error: &dyn std::fmt::Display) -> Response {
    tracing::error!(event_type = "console", error = %error, "A graph could not be drawn");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "graph_error",
        "the graph could not be drawn; the logs say why",
    )
    .into_response()
}

/// `POST /console/api/tests` `{session_id, name}`: the session's kept turns
/// as a conversation test. In development it is also written to
/// `flows/tests/console-<name>.yaml` (never over an existing file).
async fn save_test(State(state): State<Arc<AppState>>, peer: Peer, request: Request) -> Response {
    if let Err(error) = admit(&state, request.headers(), &peer) {
        return error.into_response();
    }
    let body = match tokio::time::timeout(
        state.settings.request_timeout,
        JsonObject::from_request(request, &()),
    )
    .await
    {
        Ok(Ok(JsonObject(body))) => body,
        Ok(Err(error)) => return error.into_response(),
        Err(_) => return ApiError::request_timeout().into_response(),
    };
    let text_field = |name: &str| body.get(name).and_then(Json::as_str);
    let Some(session_id) = text_field("session_id").filter(|id| !id.is_empty()) else {
        return ApiError::invalid(
            StatusCode::UNPROCESSABLE_ENTITY,
            "/session_id",
            "`session_id` is required: the session whose turns become the test",
        )
        .into_response();
    };
    let name = text_field("name")
        .filter(|name| !name.is_empty())
        .unwrap_or(session_id);
    if name.chars().count() > MAX_TEST_NAME || name.chars().any(char::is_control) {
        return ApiError::invalid(
            StatusCode::UNPROCESSABLE_ENTITY,
            "/name",
            format!(
                "`name` must be at most {MAX_TEST_NAME} characters, without control characters"
            ),
        )
        .into_response();
    }
    let traces = state
        .console
        .as_ref()
        .map(|console| console.traces.session(session_id))
        .unwrap_or_default();
    if traces.is_empty() {
        return ApiError::invalid(
            StatusCode::UNPROCESSABLE_ENTITY,
            "/session_id",
            format!("the console keeps no turn of session `{session_id}`"),
        )
        .into_response();
    }
    let yaml = crate::flowtest::recorded::test_file(name, session_id, &traces);
    let path = if state.settings.environment == Environment::Development {
        let project_dir = state.deployment.load().project.dir.clone();
        let written = tokio::task::spawn_blocking({
            let yaml = yaml.clone();
            let slug = slug(name);
            move || write_new_test(&project_dir, &slug, &yaml)
        })
        .await;
        match written {
            Ok(Ok(path)) => Some(path),
            Ok(Err(error)) => {
                tracing::warn!(event_type = "console", error = %error, "A recorded test could not be written");
                return ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "test_not_written",
                    format!("the test could not be written to flows/tests/: {error}"),
                )
                .into_response();
            }
            Err(_) => {
                return ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "test_not_written",
                    "the test could not be written to flows/tests/",
                )
                .into_response();
            }
        }
    } else {
        None
    };
    json_response(json!({ "path": path, "yaml": yaml }))
}

/// A file name from a test name: lower-case letters, digits and dashes.
fn slug(name: &str) -> String {
    let mut slug = String::new();
    for character in name.chars().flat_map(char::to_lowercase) {
        if character.is_ascii_alphanumeric() {
            slug.push(character);
        } else if !slug.ends_with('-') && !slug.is_empty() {
            slug.push('-');
        }
        if slug.len() >= 60 {
            break;
        }
    }
    let slug = slug.trim_end_matches('-');
    if slug.is_empty() {
        "conversation".to_owned()
    } else {
        slug.to_owned()
    }
}

/// Writes `flows/tests/console-<slug>.yaml` (or `-2`, `-3`… when taken);
/// answers its path relative to the project.
fn write_new_test(
    project_dir: &std::path::Path,
    slug: &str,
    yaml: &str,
) -> std::io::Result<String> {
    let dir = project_dir.join("flows").join("tests");
    std::fs::create_dir_all(&dir)?;
    let saved = std::fs::read_dir(&dir)?
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("console-"))
        .count();
    if saved >= MAX_SAVED_TESTS {
        return Err(std::io::Error::other(format!(
            "it holds {saved} console-*.yaml files already; remove some"
        )));
    }
    for attempt in 1..100 {
        let file = if attempt == 1 {
            format!("console-{slug}.yaml")
        } else {
            format!("console-{slug}-{attempt}.yaml")
        };
        let path: PathBuf = dir.join(&file);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut handle) => {
                std::io::Write::write_all(&mut handle, yaml.as_bytes())?;
                return Ok(format!("flows/tests/{file}"));
            }
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(error) => return Err(error),
        }
    }
    Err(std::io::Error::other("too many tests of that name"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_file_names() {
        assert_eq!(slug("Menu, then order!"), "menu-then-order");
        assert_eq!(slug("../../etc/passwd"), "etc-passwd");
        assert_eq!(slug("   "), "conversation");
    }

    #[test]
    fn host_names_lose_their_port() {
        assert_eq!(host_name("localhost:8080"), "localhost");
        assert_eq!(host_name("[::1]:8080"), "::1");
        assert_eq!(host_name("example.com"), "example.com");
        assert_eq!(host_name("brand-a.example.com:443"), "brand-a.example.com");
        assert_eq!(host_name("brand-a.example.com."), "brand-a.example.com");
        assert_eq!(host_name("[::1]:80"), "::1");
    }
}
