//! `/mcp`: the project's flows served as tools to AI agents, over the
//! Model Context Protocol's Streamable HTTP transport (the official SDK,
//! stateless: any replica answers any request, with no shared session).
//!
//! A gate in front of the SDK authenticates the caller key (401), checks
//! that the key may use the `mcp` channel (403) and its rate (429). A tool
//! call is then a turn like any other: the user's rate and a place among
//! the turns in flight, a `request` span, the `input` and `output` log
//! lines, the turn's metrics. `tools/list` reads the live deployment, so a
//! reload changes it for the next request.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ErrorCode,
    Implementation, JsonObject, ListToolsResult, PaginatedRequestParams, ServerCapabilities,
    ServerConfig, ServerNotification, SubscriptionFilter, Tool,
};
use rmcp::service::{RequestContext, SubscriptionContext};
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler};
use serde_json::{Value as Json, json};
use tracing::Instrument;

use super::{
    ApiError, AppState, CallerLabel, MAX_REQUEST_BYTES, first_violation, new_trace_id,
    run_logged_turn,
};
use crate::admission::{self, Refusal};
use crate::engine::TurnRequest;
use crate::project::{Decision, FlowTool};
use crate::telemetry::prometheus;

/// The channel of every tool call: a caller key limited to other channels
/// cannot use `/mcp`.
pub const MCP_CHANNEL: &str = "mcp";

/// The start of the user and session ids of tool calls; `/orchestrate`
/// refuses ids that start with it.
pub const MCP_ID_PREFIX: &str = "mcp:";

/// Longest `_meta.user_id` or `_meta.session_id` accepted.
const MAX_META_ID_LENGTH: usize = 128;

/// JSON-RPC error code of a refused or failed tool call (the server-error
/// range); `data.code` holds the stable code (`rate_limited`,
/// `overloaded`, `template_error`).
const SERVER_ERROR: ErrorCode = ErrorCode(-32000);

/// Which hosts and browser origins may reach `/mcp` (DNS-rebinding
/// protection).
#[derive(Debug, Clone, Default)]
pub struct McpSettings {
    /// `Host` values allowed; `None` allows any. Default: loopback names.
    pub allowed_hosts: Option<Vec<String>>,
    /// `Origin` values allowed when a request has one; empty allows any.
    pub allowed_origins: Vec<String>,
}

impl McpSettings {
    /// Reads `MCP_ALLOWED_HOSTS` (comma-separated; `*` for any) and
    /// `MCP_ALLOWED_ORIGINS` (comma-separated, with scheme).
    pub fn from_values(hosts: Option<&str>, origins: Option<&str>) -> McpSettings {
        let list = |value: &str| -> Vec<String> {
            value
                .split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(str::to_owned)
                .collect()
        };
        let allowed_hosts = match hosts.map(str::trim) {
            None | Some("") => Some(
                ["localhost", "127.0.0.1", "::1"]
                    .map(str::to_owned)
                    .to_vec(),
            ),
            Some("*") => None,
            Some(hosts) => Some(list(hosts)),
        };
        McpSettings {
            allowed_hosts,
            allowed_origins: origins.map(list).unwrap_or_default(),
        }
    }
}

/// The `/mcp` service: the SDK's Streamable HTTP server, stateless, with
/// JSON answers when nothing is streamed.
pub fn service(state: Arc<AppState>) -> StreamableHttpService<ToolServer, NeverSessionManager> {
    let settings = &state.settings.mcp;
    let mut config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(true)
        .with_max_request_body_bytes(MAX_REQUEST_BYTES)
        .with_allowed_origins(settings.allowed_origins.clone());
    config = match &settings.allowed_hosts {
        Some(hosts) => config.with_allowed_hosts(hosts.clone()),
        None => config.disable_allowed_hosts(),
    };
    let server = ToolServer { state };
    StreamableHttpService::new(
        move || Ok(server.clone()),
        Arc::new(NeverSessionManager::default()),
        config,
    )
}

/// The caller a request to `/mcp` was admitted as, and the request's
/// deadline (a request extension, read back by the tool call).
#[derive(Debug, Clone)]
struct McpCaller {
    name: String,
    deadline: tokio::time::Instant,
}

/// In front of the SDK: the caller key, the key's channels, its rate; then
/// the body, read whole within the request timeout and 1 MiB (the SDK
/// would wait for a slow body without limit).
pub async fn gate(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let deadline = tokio::time::Instant::now() + state.settings.request_timeout;
    let deployment = state.deployment.load();
    let project = &deployment.project;
    let caller = match admission::authenticate(&project.access, request.headers()) {
        Some(caller) => caller,
        None => return labelled(ApiError::unauthorized().into_response(), "none"),
    };
    let name = caller.name().to_owned();
    tracing::Span::current().record("caller", name.as_str());
    if !caller.allows_channel(MCP_CHANNEL) {
        let error = ApiError::forbidden(format!(
            "the caller key `{name}` may not use channel `{MCP_CHANNEL}` (the /mcp endpoint)"
        ));
        return labelled(error.into_response(), &name);
    }
    if let Err(refusal) = state.admission.for_limits(&project.limits).check_key(&name) {
        return labelled(ApiError::refused(refusal).into_response(), &name);
    }
    drop(deployment);
    let (parts, body) = request.into_parts();
    let bytes = match super::read_body(body, deadline).await {
        Ok(bytes) => bytes,
        Err(error) => return labelled(error.into_response(), &name),
    };
    let mut request = Request::from_parts(parts, axum::body::Body::from(bytes));
    request.extensions_mut().insert(McpCaller {
        name: name.clone(),
        deadline,
    });
    labelled(next.run(request).await, &name)
}

fn labelled(mut response: Response, caller: &str) -> Response {
    response
        .extensions_mut()
        .insert(CallerLabel(Arc::from(caller)));
    response
}

/// The SDK's handler: one per request (stateless), sharing the state.
#[derive(Clone)]
pub struct ToolServer {
    state: Arc<AppState>,
}

impl ServerHandler for ToolServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_tool_list_changed()
                .build(),
        )
        .with_server_info(Implementation::new(
            "mcp-orchestrator",
            env!("CARGO_PKG_VERSION"),
        ))
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        Ok(ListToolsResult::with_all_items(self.tool_list()))
    }

    /// `subscriptions/listen` (protocol 2026-07-28): tool list changes only.
    fn accepted_subscription_filter(
        &self,
        _requested: &SubscriptionFilter,
    ) -> Option<SubscriptionFilter> {
        Some(SubscriptionFilter::builder().tools_list_changed().build())
    }

    /// Notifies `notifications/tools/list_changed` when a reload changes
    /// the tools, until the client goes or the server closes. Streams are
    /// bounded (`MAX_STREAMS`).
    async fn listen(&self, subscription: SubscriptionContext) -> Result<(), McpError> {
        let Some(_permit) = self.state.events.stream_permit() else {
            return Err(McpError::new(
                SERVER_ERROR,
                "too many open subscriptions; try again later",
                Some(json!({"code": "overloaded"})),
            ));
        };
        let mut reloads = self.state.events.reloads();
        let closed = self.state.events.closed();
        tokio::pin!(closed);
        let mut tools = self.tool_list();
        loop {
            tokio::select! {
                () = subscription.cancelled() => return Ok(()),
                () = &mut closed => return Ok(()),
                changed = reloads.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    let now = self.tool_list();
                    if now == tools {
                        continue;
                    }
                    tools = now;
                    let notification =
                        ServerNotification::ToolListChangedNotification(Default::default());
                    if subscription.sink().send(notification).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        let deployment = self.state.deployment.load();
        deployment
            .project
            .tool(name)
            .map(|(_, tool)| mcp_tool(tool))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let parts = context.extensions.get::<axum::http::request::Parts>();
        let Some(caller) = parts
            .and_then(|parts| parts.extensions.get::<McpCaller>())
            .cloned()
        else {
            // The gate admits every request; without it, nothing runs.
            return Err(McpError::internal_error(
                "the request was not admitted",
                None,
            ));
        };
        let trace_id = parts
            .and_then(|parts| super::trace_id_from_traceparent(&parts.headers))
            .unwrap_or_else(new_trace_id);
        let span = tracing::info_span!(
            "request",
            endpoint = "/mcp",
            tool = %request.name,
            caller = %caller.name,
            trace_id = tracing::field::Empty,
            session_id = tracing::field::Empty,
            user_id = tracing::field::Empty,
            channel = tracing::field::Empty,
            session_error = tracing::field::Empty,
        );
        let result = self
            .run_tool(request, &context, &caller, trace_id)
            .instrument(span.clone())
            .await;
        if let Err(error) = &result {
            // A refused or failed call is answered 200 with a JSON-RPC
            // error, which the request metrics cannot tell apart: it is
            // logged and counted here.
            let code = error
                .data
                .as_ref()
                .and_then(|data| data.get("code"))
                .and_then(Json::as_str)
                .and_then(known_error_code)
                .unwrap_or("invalid_request");
            metrics::counter!(prometheus::REQUEST_ERRORS_TOTAL, "endpoint" => "/mcp", "code" => code)
                .increment(1);
            span.in_scope(|| {
                tracing::info!(
                    event_type = "tool_refused",
                    code,
                    error = %error.message,
                    "Tool call refused or failed"
                );
            });
        }
        result.map(CallToolResponse::from)
    }
}

impl ToolServer {
    /// The live deployment's tools, as `tools/list` answers them.
    fn tool_list(&self) -> Vec<Tool> {
        let deployment = self.state.deployment.load();
        deployment.project.tools().map(mcp_tool).collect()
    }

    async fn run_tool(
        &self,
        request: CallToolRequestParams,
        context: &RequestContext<RoleServer>,
        caller: &McpCaller,
        trace_id: String,
    ) -> Result<CallToolResult, McpError> {
        let started = Instant::now();
        let deadline = caller.deadline;
        let caller = caller.name.as_str();
        let deployment = self.state.deployment.load_full();
        let project = &deployment.project;
        let Some((flow, tool)) = project.tool(&request.name) else {
            let known: Vec<&str> = project.tools().map(|tool| tool.name.as_str()).collect();
            return Err(McpError::invalid_params(
                format!("no tool `{}`", request.name),
                Some(json!({ "code": "unknown_tool", "tools": known })),
            ));
        };
        let arguments = request.arguments.unwrap_or_default();
        let instance = Json::Object(arguments);
        if let Some((pointer, message)) = first_violation(&tool.validator, &instance) {
            return Err(McpError::invalid_params(
                format!("invalid arguments for tool `{}`: {message}", tool.name),
                Some(json!({ "code": "invalid_arguments", "pointer": pointer })),
            ));
        }
        let Json::Object(arguments) = instance else {
            return Err(McpError::invalid_params(
                "arguments must be an object",
                None,
            ));
        };
        let meta = |key: &str| -> Result<Option<String>, McpError> {
            match context.meta.get(key) {
                None | Some(Json::Null) => Ok(None),
                Some(Json::String(value))
                    if !value.trim().is_empty()
                        && value.chars().count() <= MAX_META_ID_LENGTH
                        && !value.chars().any(char::is_control) =>
                {
                    Ok(Some(value.clone()))
                }
                Some(_) => Err(McpError::invalid_params(
                    format!(
                        "`_meta.{key}` must be a non-empty string of at most {MAX_META_ID_LENGTH} characters"
                    ),
                    Some(json!({ "code": "invalid_request", "pointer": format!("/_meta/{key}") })),
                )),
            }
        };
        // Users and sessions of tool calls live under `mcp:<caller key>:`,
        // apart from `/orchestrate`'s and the channels'.
        let user_id = match meta("user_id")? {
            Some(user) => format!("{MCP_ID_PREFIX}{caller}:{user}"),
            None => format!("{MCP_ID_PREFIX}{caller}"),
        };
        let session_id = match meta("session_id")? {
            Some(session) => format!("{MCP_ID_PREFIX}{caller}:{session}"),
            None => user_id.clone(),
        };
        if context.ct.is_cancelled() {
            return Err(McpError::new(
                SERVER_ERROR,
                "the client went away",
                Some(json!({ "code": "client_closed" })),
            ));
        }
        let admission = self.state.admission.for_limits(&project.limits);
        admission.check_user(&user_id).map_err(refused)?;
        let _in_flight = admission.enter().map_err(refused)?;
        let text = match arguments.get("text") {
            Some(Json::String(text)) => text.clone(),
            _ => String::new(),
        };
        let turn = TurnRequest {
            text,
            user_id,
            channel: MCP_CHANNEL.to_owned(),
            session_id,
            trace_id: trace_id.clone(),
            tenant: None,
            input: arguments,
            direct: Some(flow),
        };
        let outcome = run_logged_turn(&self.state, &deployment, &turn, deadline, started)
            .await
            .map_err(|error| {
                McpError::new(
                    SERVER_ERROR,
                    error.detail,
                    Some(json!({ "code": error.code, "trace_id": trace_id })),
                )
            })?;
        let labels = prometheus::with_tenant(
            self.state.tenant.as_deref(),
            vec![
                metrics::Label::new("tool", tool.name.clone()),
                metrics::Label::new("caller", caller.to_owned()),
                metrics::Label::new("route", outcome.route.clone()),
                metrics::Label::new("decision", outcome.decision.as_str()),
            ],
        );
        metrics::counter!(prometheus::TOOL_CALLS_TOTAL, labels).increment(1);
        let structured = json!({
            "reply_text": outcome.reply_text,
            "route": outcome.route,
            "decision": outcome.decision.as_str(),
            "data": outcome.data,
            "trace_id": trace_id,
        });
        let mut result = if outcome.decision == Decision::Error {
            CallToolResult::structured_error(structured)
        } else {
            CallToolResult::structured(structured)
        };
        result.content = vec![ContentBlock::text(outcome.reply_text)];
        Ok(result)
    }
}

/// The stable codes a tool call's JSON-RPC error may carry (a fixed set:
/// metric labels).
fn known_error_code(code: &str) -> Option<&'static str> {
    [
        "unknown_tool",
        "invalid_arguments",
        "invalid_request",
        "rate_limited",
        "overloaded",
        "template_error",
        "client_closed",
    ]
    .into_iter()
    .find(|known| *known == code)
}

/// A refusal of the admission control, as a JSON-RPC error with its stable
/// code and when to retry.
fn refused(refusal: Refusal) -> McpError {
    let (code, retry_after, message) = match refusal {
        Refusal::RateLimited { retry_after } => {
            let seconds = admission::retry_after_seconds(retry_after);
            (
                "rate_limited",
                seconds,
                format!("too many requests; retry in {seconds} s"),
            )
        }
        Refusal::Overloaded => (
            "overloaded",
            super::OVERLOADED_RETRY_AFTER_SECONDS,
            "the service is at its limit of turns in flight; retry shortly".to_owned(),
        ),
    };
    McpError::new(
        SERVER_ERROR,
        message,
        Some(json!({ "code": code, "retry_after": retry_after })),
    )
}

/// The SDK's description of a flow's tool, with the output schema every
/// tool shares.
fn mcp_tool(tool: &FlowTool) -> Tool {
    let input = match tool.input_schema.as_ref() {
        Json::Object(schema) => schema.clone(),
        _ => JsonObject::new(),
    };
    Tool::new(tool.name.clone(), tool.description.clone(), Arc::new(input))
        .with_raw_output_schema(OUTPUT_SCHEMA.clone())
}

/// What every tool answers in `structuredContent`, built once.
static OUTPUT_SCHEMA: std::sync::LazyLock<Arc<JsonObject>> =
    std::sync::LazyLock::new(|| Arc::new(output_schema()));

fn output_schema() -> JsonObject {
    let schema = json!({
        "type": "object",
        "properties": {
            "reply_text": {"type": "string", "description": "The reply, as the flow wrote it."},
            "route": {"type": "string", "description": "The route of the replying step."},
            "decision": {"type": "string", "enum": Decision::ALL.map(Decision::as_str)},
            "data": {"description": "The replying step's `data`, when it has one."},
            "trace_id": {"type": "string", "description": "Finds the turn in logs and traces."}
        },
        "required": ["reply_text", "route", "decision", "trace_id"]
    });
    match schema {
        Json::Object(schema) => schema,
        _ => JsonObject::new(),
    }
}
