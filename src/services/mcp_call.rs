//! A call to a `kind: mcp` service: the call's body as the arguments of
//! the service's tool, over MCP's Streamable HTTP transport (the official
//! SDK's client over the process's reqwest client), within the attempt's
//! timeout. The answer becomes a `RawResponse`, so the schema validation,
//! retries, circuit breaker and error codes of HTTP services apply:
//! `structuredContent` (or a text block holding JSON) is a 200 body; an
//! `isError` result or a JSON-RPC error is a 422 (`service_http_error`, not
//! retried) whose body is the tool's message.

use std::collections::HashMap;

use bytes::Bytes;
use rmcp::ServiceExt;
use rmcp::model::{
    CallToolRequestParams, ClientCapabilities, ClientConfig, Implementation, JsonObject,
    ProtocolVersion, Tool,
};
use rmcp::service::{RoleClient, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use serde_json::Value as Json;

use super::{OutgoingRequest, RawResponse, TransportError};

/// The status of a tool's own failure: a client error, never retried.
const TOOL_ERROR_STATUS: u16 = 422;

/// The tools `url` serves, for `check --online`: connects with `headers`
/// and lists every page within `timeout`.
pub async fn list_tools(
    client: &reqwest::Client,
    url: &str,
    headers: &[(String, String)],
    timeout: std::time::Duration,
) -> Result<Vec<Tool>, String> {
    let headers = header_map(
        headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str())),
    )?;
    let exchange = async {
        let session = connect(client, url, headers).await?;
        let tools = session.list_all_tools().await;
        let _ = session.cancel().await;
        tools.map_err(|error| format!("tools/list: {error}"))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "no answer within {}",
            humantime::format_duration(timeout)
        )),
    }
}

/// A client session with the server at `url` (`initialize` done).
async fn connect(
    client: &reqwest::Client,
    url: &str,
    headers: HashMap<http::HeaderName, http::HeaderValue>,
) -> Result<RunningService<RoleClient, ClientConfig>, String> {
    let mut config = StreamableHttpClientTransportConfig::with_uri(url).custom_headers(headers);
    // The same cap as an HTTP service's answer.
    config.max_json_response_size = super::MAX_RESPONSE_BYTES;
    config.max_sse_event_size = super::MAX_RESPONSE_BYTES;
    let transport = StreamableHttpClientTransport::with_client(client.clone(), config);
    let info = ClientConfig::new(
        ClientCapabilities::default(),
        Implementation::new("mcp-orchestrator", env!("CARGO_PKG_VERSION")),
    )
    .with_protocol_version(ProtocolVersion::V_2025_11_25);
    info.serve(transport).await.map_err(|error| match error {
        // The transport's own error, without the SDK's type names.
        rmcp::service::ClientInitializeError::TransportError { error, .. } => {
            format!("MCP initialize: {}", super::error_chain(&*error.error))
        }
        other => format!("MCP initialize: {other}"),
    })
}

/// Request headers, refused when a name or value cannot be sent.
fn header_map<'a>(
    pairs: impl Iterator<Item = (&'a str, &'a str)>,
) -> Result<HashMap<http::HeaderName, http::HeaderValue>, String> {
    let mut headers = HashMap::new();
    for (name, value) in pairs {
        let name = http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("invalid header name `{name}`"))?;
        let value = http::HeaderValue::from_str(value)
            .map_err(|_| format!("invalid value for header `{name}`"))?;
        headers.insert(name, value);
    }
    Ok(headers)
}

/// Calls `tool` with the request's body as arguments.
pub(super) async fn call_tool(
    client: &reqwest::Client,
    tool: &str,
    request: &OutgoingRequest<'_>,
) -> Result<RawResponse, TransportError> {
    let arguments: JsonObject = match request.body {
        None => JsonObject::new(),
        Some(body) => match serde_json::from_slice(body) {
            Ok(Json::Object(arguments)) => arguments,
            Ok(_) | Err(_) => {
                return Err(TransportError::InvalidRequest(
                    "the body of a call to an MCP tool must be a JSON object (its arguments)"
                        .to_owned(),
                ));
            }
        },
    };
    let trace = [
        ("traceparent", request.trace.traceparent.as_str()),
        ("x-trace-id", request.trace.trace_id.as_str()),
    ];
    let headers = header_map(
        request
            .headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .chain(trace),
    )
    .map_err(TransportError::InvalidRequest)?;
    let exchange = async {
        let session = connect(client, request.url.as_str(), headers)
            .await
            .map_err(TransportError::Connect)?;
        let result = session
            .call_tool(CallToolRequestParams::new(tool.to_owned()).with_arguments(arguments))
            .await;
        let _ = session.cancel().await;
        Ok::<_, TransportError>(result)
    };
    let result = match tokio::time::timeout(request.timeout, exchange).await {
        Err(_) => return Err(TransportError::Timeout),
        Ok(Err(error)) => return Err(error),
        Ok(Ok(result)) => result,
    };
    let result = match result {
        Ok(result) => result,
        Err(rmcp::ServiceError::McpError(error)) => {
            return Ok(RawResponse {
                status: TOOL_ERROR_STATUS,
                body: Bytes::from(format!(
                    "JSON-RPC error {}: {}",
                    error.code.0, error.message
                )),
            });
        }
        Err(error) => return Err(TransportError::Io(format!("MCP tools/call: {error}"))),
    };
    let text = result
        .content
        .iter()
        .filter_map(|block| block.as_text())
        .map(|block| block.text.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    if result.is_error == Some(true) {
        return Ok(RawResponse {
            status: TOOL_ERROR_STATUS,
            body: Bytes::from(text),
        });
    }
    let body = match result.structured_content {
        Some(structured) => serde_json::to_vec(&structured).unwrap_or_default(),
        // A tool without structured output may answer JSON as text; the
        // response schema decides whether it will do.
        None => text.into_bytes(),
    };
    Ok(RawResponse {
        status: 200,
        body: Bytes::from(body),
    })
}
