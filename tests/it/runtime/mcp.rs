//! `/mcp` on the real binary, with the official SDK's client: the shipped
//! flows listed and called as tools, over the 2025 revisions (with
//! `initialize`) and the stateless 2026 one; invalid arguments; caller
//! keys, the key's channels and the allowed hosts; `tools/list` after an
//! edit; each call a turn in the logs and metrics.

use std::time::{Duration, Instant};

use rmcp::model::{
    CallToolRequestParams, CallToolResult, ClientCapabilities, ClientConfig, ErrorCode,
    Implementation, ProtocolVersion,
};
use rmcp::service::{RoleClient, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{ClientLifecycleMode, ClientServiceExt, ServiceError, ServiceExt};
use serde_json::{Value as Json, json};

use super::http_client;
use super::serve_binary::Served;
use crate::shipped_project_copy;

const START_DEADLINE: Duration = Duration::from_secs(60);
/// How long an edit may take to show in `tools/list`, on a loaded machine.
const RELOAD_DEADLINE: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(25);

const PARTNER_KEY: &str = "partner-key-for-mcp-tests-0123456789";
const WEB_APP_KEY: &str = "web-app-key-for-mcp-tests-0123456789";

struct Running {
    /// Dropped first: the binary stops before its project directory goes.
    served: Served,
    project: tempfile::TempDir,
}

/// The shipped project, served by the binary with both caller keys set.
async fn start() -> Running {
    let project = shipped_project_copy();
    let dir = project.path().to_str().unwrap().to_owned();
    let served = Served::start(
        &[
            ("MCP_PROJECT_DIR", dir.as_str()),
            ("PARTNER_API_KEY", PARTNER_KEY),
            ("WEB_APP_API_KEY", WEB_APP_KEY),
            ("PER_USER_RATE", "100000/s"),
            // Longer than any deadline here: a stream that held shutdown
            // up would show.
            ("SHUTDOWN_GRACE", "120s"),
        ],
        START_DEADLINE,
    )
    .await;
    Running { served, project }
}

impl Running {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/mcp", self.served.port)
    }

    /// An SDK client with `key`, over a 2025 revision (`initialize`), or
    /// the stateless 2026 one (no `initialize`) when `version` is it.
    async fn client(
        &self,
        key: &str,
        version: ProtocolVersion,
    ) -> RunningService<RoleClient, ClientConfig> {
        let transport = StreamableHttpClientTransport::with_client(
            http_client(),
            StreamableHttpClientTransportConfig::with_uri(self.url()).auth_header(key),
        );
        let info = ClientConfig::new(
            ClientCapabilities::default(),
            Implementation::new("mcp-orchestrator-tests", "1.0.0"),
        )
        .with_protocol_version(version.clone());
        if version == ProtocolVersion::V_2026_07_28 {
            info.serve_with_lifecycle(
                transport,
                ClientLifecycleMode::Discover {
                    preferred_versions: vec![version],
                },
            )
            .await
            .unwrap()
        } else {
            info.serve(transport).await.unwrap()
        }
    }

    /// Every line logged so far.
    fn log(&self) -> String {
        self.served.logged().join("\n")
    }

    /// The log lines with `message`, waiting until there are `count`.
    async fn wait_for_lines(&self, message: &str, count: usize) -> Vec<Json> {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let found: Vec<Json> = self
                .log()
                .lines()
                .filter_map(|line| serde_json::from_str::<Json>(line).ok())
                .filter(|event| event["message"] == message)
                .collect();
            if found.len() >= count || Instant::now() > deadline {
                return found;
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

async fn call(
    client: &RunningService<RoleClient, ClientConfig>,
    tool: &str,
    arguments: Json,
) -> Result<CallToolResult, ServiceError> {
    let Json::Object(arguments) = arguments else {
        panic!("arguments must be an object");
    };
    client
        .call_tool(CallToolRequestParams::new(tool.to_owned()).with_arguments(arguments))
        .await
}

/// The shipped tools with valid arguments, and the route each answers on.
fn shipped_calls() -> Vec<(&'static str, Json, &'static str)> {
    vec![
        ("show_menu", json!({}), "menu"),
        (
            "place_order",
            json!({"order_items": [{"id": "mn-01", "name": "Margherita", "quantity": 2}], "order_payment_method": "card"}),
            "order",
        ),
        (
            "track_order",
            json!({"tracking_order_id": "ORD-10421"}),
            "track_order",
        ),
        ("recommend", json!({"text": "something spicy"}), "recommend"),
        ("get_profile", json!({}), "profile"),
    ]
}

#[tokio::test]
async fn agents_list_the_shipped_tools_and_call_each_over_both_protocol_generations() {
    let running = start().await;
    for version in [ProtocolVersion::V_2025_06_18, ProtocolVersion::V_2026_07_28] {
        let client = running.client(PARTNER_KEY, version.clone()).await;
        let tools = client.list_all_tools().await.unwrap();
        let names: Vec<&str> = tools.iter().map(|tool| tool.name.as_ref()).collect();
        for (name, _, _) in shipped_calls() {
            assert!(names.contains(&name), "{version}: {names:?}");
        }
        for tool in &tools {
            assert_eq!(
                tool.input_schema.get("type"),
                Some(&json!("object")),
                "{}",
                tool.name
            );
            assert!(tool.description.as_deref().is_some_and(|d| !d.is_empty()));
            let output = tool.output_schema.as_ref().unwrap();
            assert_eq!(
                output["required"],
                json!(["reply_text", "route", "decision", "trace_id"])
            );
        }
        for (name, arguments, route) in shipped_calls() {
            let result = call(&client, name, arguments).await.unwrap();
            assert_eq!(result.is_error, Some(false), "{version} {name}: {result:?}");
            let structured = result.structured_content.as_ref().unwrap();
            assert_eq!(structured["route"], route, "{version} {name}: {structured}");
            assert_eq!(structured["decision"], "reply");
            let reply = structured["reply_text"].as_str().unwrap();
            assert!(!reply.is_empty());
            let text = result.content[0].as_text().unwrap();
            assert_eq!(text.text, reply);
        }
        client.cancel().await.unwrap();
    }
    // The arguments reached the flows: the tracked order, the order placed.
    let client = running
        .client(PARTNER_KEY, ProtocolVersion::V_2025_11_25)
        .await;
    let tracked = call(
        &client,
        "track_order",
        json!({"tracking_order_id": "ORD-10421"}),
    )
    .await
    .unwrap();
    let reply = tracked.structured_content.unwrap()["reply_text"].clone();
    assert!(reply.as_str().unwrap().contains("ORD-10421"), "{reply}");
    client.cancel().await.unwrap();

    // Each call is a turn: its lines say which tool ran which flow.
    let answered = running.wait_for_lines("Turn answered", 11).await;
    assert_eq!(answered.len(), 11, "{}", running.log());
    let tracking = answered
        .iter()
        .find(|event| event["tool"] == "track_order")
        .unwrap();
    assert_eq!(tracking["intent_source"], "tool");
    assert_eq!(tracking["flow"], "track_order");
    assert_eq!(tracking["channel"], "mcp");
    assert_eq!(tracking["user_id"], "mcp:partner");
    assert_eq!(tracking["endpoint"], "/mcp");
    assert!(!running.log().contains(PARTNER_KEY));
}

#[tokio::test]
async fn invalid_arguments_and_unknown_tools_are_json_rpc_errors() {
    let running = start().await;
    let client = running
        .client(PARTNER_KEY, ProtocolVersion::V_2025_06_18)
        .await;
    for (tool, arguments, pointer) in [
        (
            "track_order",
            json!({"tracking_order_id": "10421"}),
            "/tracking_order_id",
        ),
        ("place_order", json!({"order_items": []}), "/order_items"),
        ("place_order", json!({}), "/order_items"),
        ("show_menu", json!({"surprise": true}), ""),
    ] {
        let error = call(&client, tool, arguments.clone()).await.unwrap_err();
        let ServiceError::McpError(error) = error else {
            panic!("{tool} {arguments}: {error:?}");
        };
        assert_eq!(error.code, ErrorCode::INVALID_PARAMS, "{tool} {arguments}");
        let data = error.data.unwrap();
        assert_eq!(data["code"], "invalid_arguments");
        assert_eq!(
            data["pointer"], pointer,
            "{tool} {arguments}: {}",
            error.message
        );
    }
    let error = call(&client, "launch_rockets", json!({}))
        .await
        .unwrap_err();
    let ServiceError::McpError(error) = error else {
        panic!("{error:?}");
    };
    assert_eq!(error.code, ErrorCode::INVALID_PARAMS);
    assert_eq!(error.data.unwrap()["code"], "unknown_tool");
    // Nothing ran.
    client.cancel().await.unwrap();
    assert!(
        !running.log().contains("Turn received"),
        "{}",
        running.log()
    );
}

#[tokio::test]
async fn callers_need_a_key_that_may_use_the_mcp_channel_and_an_allowed_host() {
    let running = start().await;
    let http = http_client();
    let list = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"});
    let post = |key: Option<&str>, host: Option<&str>| {
        let mut request = http
            .post(running.url())
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2025-06-18")
            .body(list.to_string());
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        if let Some(host) = host {
            request = request.header("host", host);
        }
        request.send()
    };
    let response = post(None, None).await.unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    let body: Json = response.json().await.unwrap();
    assert_eq!(body["code"], "unauthorized");

    let response = post(Some("not-a-key"), None).await.unwrap();
    assert_eq!(response.status(), 401);

    // `web-app` is limited to the web and app channels.
    let response = post(Some(WEB_APP_KEY), None).await.unwrap();
    assert_eq!(response.status(), 403);
    let body: Json = response.json().await.unwrap();
    assert_eq!(body["code"], "forbidden");

    // A host the deployment does not serve (DNS rebinding).
    let response = post(Some(PARTNER_KEY), Some("attacker.example"))
        .await
        .unwrap();
    assert_eq!(response.status(), 403);

    let response = post(Some(PARTNER_KEY), None).await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Json = response.json().await.unwrap();
    assert!(
        body["result"]["tools"].as_array().unwrap().len() >= 5,
        "{body}"
    );
}

#[tokio::test]
async fn tools_list_follows_an_edit_of_the_flow_files() {
    let running = start().await;
    let client = running
        .client(PARTNER_KEY, ProtocolVersion::V_2025_06_18)
        .await;
    let names = |tools: Vec<rmcp::model::Tool>| -> Vec<String> {
        tools
            .into_iter()
            .map(|tool| tool.name.into_owned())
            .collect()
    };
    let before = names(client.list_all_tools().await.unwrap());
    assert!(before.contains(&"show_menu".to_owned()));
    // A 2026 client listens for list changes (`subscriptions/listen`).
    let listener = running
        .client(PARTNER_KEY, ProtocolVersion::V_2026_07_28)
        .await;
    let mut subscription = listener
        .listen(
            rmcp::model::SubscriptionFilter::builder()
                .tools_list_changed()
                .build(),
        )
        .await
        .unwrap();
    assert_eq!(subscription.acknowledged().tools_list_changed, Some(true));
    let menu = running.project.path().join("flows/menu.yaml");
    let text = std::fs::read_to_string(&menu).unwrap();
    std::fs::write(
        &menu,
        text.replacen("name: show_menu", "name: read_menu", 1),
    )
    .unwrap();
    let deadline = Instant::now() + RELOAD_DEADLINE;
    let after = loop {
        let after = names(client.list_all_tools().await.unwrap());
        if after.contains(&"read_menu".to_owned()) || Instant::now() > deadline {
            break after;
        }
        tokio::time::sleep(POLL).await;
    };
    assert!(
        after.contains(&"read_menu".to_owned()),
        "{after:?}\n{}",
        running.log()
    );
    assert!(!after.contains(&"show_menu".to_owned()));
    let result = call(&client, "read_menu", json!({})).await.unwrap();
    assert_eq!(result.structured_content.unwrap()["route"], "menu");
    let notification = tokio::time::timeout(RELOAD_DEADLINE, subscription.next())
        .await
        .expect("no list change notified")
        .unwrap();
    assert!(
        matches!(
            notification,
            Some(rmcp::model::ServerNotification::ToolListChangedNotification(_))
        ),
        "{notification:?}"
    );
    // Shutdown ends the subscription rather than waiting out the grace.
    running.served.terminate();
    let end = tokio::time::timeout(RELOAD_DEADLINE, subscription.next())
        .await
        .expect("the subscription outlived the shutdown");
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
}

/// A project whose tool reads an entity, its session and `text`, and ends
/// with `decision: error` on demand.
const ENTITY_PROJECT: &str = r#"
intents:
  track:
    keywords: [track]
    entities:
      order_id: { pattern: 'ORD-\d+' }
  other:
    keywords: [other]
classifier: { fallback: other }
flows:
  track:
    intent: track
    tool:
      name: track
      description: Tracks an order.
      input:
        type: object
        properties:
          order_id: { type: string }
          text: { type: string }
          fail: { type: boolean }
    steps:
      - if: "input.fail"
        reply: "failed"
        decision: error
        route: track_failed
      - set: { seen: "{{ (session.seen or 0) + 1 }}" }
      - reply: "{{ intent.name }} {{ intent.entities.order_id or '-' }} {{ text or '-' }} {{ session.seen }} {{ user_id }} {{ session_id }}"
        route: tracked
  other:
    intent: other
    steps:
      - reply: other
"#;

/// One JSON-RPC `tools/call` through the router, in process.
async fn tool_call(harness: &super::Harness, arguments: Json, meta: Option<Json>) -> Json {
    let mut params = json!({"arguments": arguments});
    if let Some(meta) = meta {
        params["_meta"] = meta;
    }
    let answer = harness
        .send(super::mcp_request(super::tools_call(params, "track")))
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    answer.body["result"].clone()
}

#[tokio::test]
async fn a_tool_call_fills_entities_text_and_its_callers_session_and_reports_errors() {
    let project = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(project.path().join("flows")).unwrap();
    std::fs::write(project.path().join("flows/main.yaml"), ENTITY_PROJECT).unwrap();
    let harness = super::Harness::new(super::HarnessOptions {
        dir: Some(project.path()),
        ..Default::default()
    });
    let first = tool_call(&harness, json!({"order_id": "ORD-7", "text": "hi"}), None).await;
    assert_eq!(first["isError"], false, "{first}");
    assert_eq!(
        first["structuredContent"]["reply_text"],
        "track ORD-7 hi 1 mcp:anonymous mcp:anonymous"
    );
    // The same caller's next call sees the session the first one left.
    let second = tool_call(&harness, json!({}), None).await;
    assert_eq!(
        second["structuredContent"]["reply_text"],
        "track - - 2 mcp:anonymous mcp:anonymous"
    );
    // `_meta` keeps users and conversations apart, under the caller.
    let apart = tool_call(
        &harness,
        json!({"order_id": "ORD-8"}),
        Some(json!({"user_id": "u-1", "session_id": "s-1"})),
    )
    .await;
    assert_eq!(
        apart["structuredContent"]["reply_text"],
        "track ORD-8 - 1 mcp:anonymous:u-1 mcp:anonymous:s-1"
    );
    // A flow ending with `decision: error` is a tool error, still structured.
    let failed = tool_call(&harness, json!({"fail": true}), None).await;
    assert_eq!(failed["isError"], true, "{failed}");
    assert_eq!(failed["structuredContent"]["decision"], "error");
    assert_eq!(failed["structuredContent"]["route"], "track_failed");
    assert_eq!(failed["content"][0]["text"], "failed");
}

#[tokio::test]
async fn a_body_that_never_ends_is_answered_408_within_the_request_timeout() {
    let harness = super::Harness::new(super::HarnessOptions {
        request_timeout: Duration::from_millis(300),
        ..Default::default()
    });
    let never = futures_util::stream::pending::<Result<bytes::Bytes, std::io::Error>>();
    let answer = harness
        .send(super::mcp_request(axum::body::Body::from_stream(never)))
        .await;
    assert_eq!(answer.status, 408, "{answer:?}");
    assert_eq!(answer.body["code"], "request_timeout");
}

#[tokio::test]
async fn orchestrate_cannot_reach_the_users_and_sessions_of_tool_calls() {
    let harness = super::Harness::shipped();
    for body in [
        json!({"text": "where is my order", "user_id": "mcp:partner:alice"}),
        json!({"text": "where is my order", "user_id": "bob", "session_id": "mcp:partner"}),
    ] {
        let answer = harness.orchestrate(body.clone()).await;
        assert_eq!(answer.status, 403, "{body}: {answer:?}");
        assert_eq!(answer.body["code"], "forbidden");
    }
}

/// An MCP server on port 0, for flows that call MCP tools: `find_dishes`
/// answers structured content, `broken` a tool error, `slow` too late.
#[derive(Clone)]
struct KitchenServer;

impl rmcp::ServerHandler for KitchenServer {
    fn get_info(&self) -> rmcp::model::ServerConfig {
        rmcp::model::ServerConfig::new(
            rmcp::model::ServerCapabilities::builder()
                .enable_tools()
                .build(),
        )
    }

    async fn list_tools(
        &self,
        _request: Option<rmcp::model::PaginatedRequestParams>,
        _context: rmcp::service::RequestContext<rmcp::RoleServer>,
    ) -> Result<rmcp::model::ListToolsResult, rmcp::ErrorData> {
        let tool = |name: &'static str, schema: Json| {
            let Json::Object(schema) = schema else {
                unreachable!("a tool's schema is an object")
            };
            rmcp::model::Tool::new(name, "a kitchen tool", std::sync::Arc::new(schema))
        };
        let query = json!({
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "limit": {"type": "integer", "maximum": 20}
            },
            "required": ["query"],
            "additionalProperties": false
        });
        let anything = json!({"type": "object"});
        Ok(rmcp::model::ListToolsResult::with_all_items(vec![
            tool("find_dishes", query),
            tool("broken", anything.clone()),
            tool("slow", anything),
        ]))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: rmcp::service::RequestContext<rmcp::RoleServer>,
    ) -> Result<rmcp::model::CallToolResponse, rmcp::ErrorData> {
        let arguments = request.arguments.unwrap_or_default();
        let result = match request.name.as_ref() {
            "find_dishes" => CallToolResult::structured(json!({
                "dishes": ["margherita", arguments.get("query").cloned().unwrap_or(Json::Null)]
            })),
            "broken" => CallToolResult::error(vec![rmcp::model::ContentBlock::text(
                "the kitchen is closed",
            )]),
            "slow" => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                CallToolResult::structured(json!({"dishes": []}))
            }
            other => {
                return Err(rmcp::ErrorData::invalid_params(
                    format!("no tool {other}"),
                    None,
                ));
            }
        };
        Ok(result.into())
    }
}

/// Serves `KitchenServer` at `http://127.0.0.1:<port>/mcp`.
async fn kitchen() -> String {
    use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
    use rmcp::transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService,
    };
    let service = StreamableHttpService::new(
        || Ok(KitchenServer),
        std::sync::Arc::new(NeverSessionManager::default()),
        StreamableHttpServerConfig::default()
            .with_legacy_session_mode(false)
            .with_json_response(true),
    );
    let router = axum::Router::new().nest_service("/mcp", service);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    format!("http://{address}/mcp")
}

const KITCHEN_PROJECT: &str = r#"
intents:
  ask: { keywords: [ask] }
  fail: { keywords: [fail] }
  slow: { keywords: [slow] }
classifier: { fallback: ask }
services:
  dishes: { kind: mcp, url: "${KITCHEN_URL}", tool: find_dishes, timeout: 5s, response: { schema: dishes.schema.json } }
  broken: { kind: mcp, url: "${KITCHEN_URL}", tool: broken, retry: { attempts: 3, backoff: 10ms }, response: { schema: dishes.schema.json } }
  late: { kind: mcp, url: "${KITCHEN_URL}", tool: slow, timeout: 300ms, response: { schema: dishes.schema.json } }
flows:
  ask:
    intent: ask
    steps:
      - id: found
        call: dishes
        body: { query: "{{ text }}" }
        on_error: { reply: "error {{ error.code }}", route: failed }
      - reply: "{{ found.dishes | join(', ') }}"
        route: found
  fail:
    intent: fail
    steps:
      - id: found
        call: broken
        body: {}
        on_error: { reply: "error {{ error.code }}: {{ error.message }}", route: failed }
      - reply: "{{ found.dishes | join(', ') }}"
        route: found
  slow:
    intent: slow
    steps:
      - id: found
        call: late
        body: {}
        on_error: { reply: "error {{ error.code }}", route: failed }
      - reply: "{{ found.dishes | join(', ') }}"
        route: found
"#;

#[tokio::test]
async fn a_flow_calls_an_mcp_tool_as_a_service_validated_like_any_answer() {
    let url = kitchen().await;
    let project = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(project.path().join("flows")).unwrap();
    std::fs::create_dir_all(project.path().join("schemas")).unwrap();
    std::fs::write(project.path().join("flows/main.yaml"), KITCHEN_PROJECT).unwrap();
    std::fs::write(
        project.path().join("schemas/dishes.schema.json"),
        r#"{"type": "object", "required": ["dishes"], "properties": {"dishes": {"type": "array", "items": {"type": "string"}}}}"#,
    )
    .unwrap();
    let harness = super::Harness::new(super::HarnessOptions {
        dir: Some(project.path()),
        variables: vec![("KITCHEN_URL", url)],
        ..Default::default()
    });
    let found = harness
        .turn(json!({"text": "ask for pizza", "user_id": "u-1"}))
        .await;
    assert_eq!(found["route"], "found", "{found:#}");
    assert_eq!(found["reply_text"], "margherita, ask for pizza");
    assert_eq!(found["service_spans"][0]["service"], "dishes");

    // A tool error is `service_http_error`, not retried.
    let failed = harness
        .turn(json!({"text": "fail", "user_id": "u-1"}))
        .await;
    assert_eq!(
        failed["reply_text"],
        "error service_http_error: tool `broken` of service `broken` failed: the kitchen is closed",
        "{failed:#}"
    );
    assert_eq!(failed["service_spans"][0]["attempts"], 1, "{failed:#}");

    // Past the attempt's timeout, `service_timeout`.
    let started = Instant::now();
    let late = harness
        .turn(json!({"text": "slow", "user_id": "u-1"}))
        .await;
    assert_eq!(late["reply_text"], "error service_timeout", "{late:#}");
    assert!(started.elapsed() < Duration::from_secs(20));
}

/// `check --online` against the kitchen: a tool the server does not
/// serve, a required argument left out, an argument the tool does not
/// take, a literal the tool's schema refuses, a server that does not
/// answer; offline, the same project passes.
#[tokio::test]
async fn check_online_asks_each_mcp_server_for_its_tools() {
    let url = kitchen().await;
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/mcp", listener.local_addr().unwrap())
    };
    let project = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(project.path().join("flows")).unwrap();
    std::fs::write(
        project.path().join("flows/main.yaml"),
        r#"intents:
  ask: { keywords: [ask] }
classifier: { fallback: ask }
services:
  dishes: { kind: mcp, url: "${KITCHEN_URL}", tool: find_dishes }
  typo: { kind: mcp, url: "${KITCHEN_URL}", tool: find_dish }
  gone: { kind: mcp, url: "${GONE_URL}", tool: find_dishes }
flows:
  ask:
    intent: ask
    steps:
      - call: dishes
        body: { query: "{{ text }}", limit: 5 }
      - call: dishes
        body:
          qurey: "{{ text }}"
          limit: 50
      - call: typo
      - call: gone
      - reply: done
"#,
    )
    .unwrap();
    let check = |online: bool| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_mcp-orchestrator"));
        command
            .arg("check")
            .arg(project.path())
            .args(["--format", "json"])
            .env("KITCHEN_URL", &url)
            .env("GONE_URL", &closed)
            .env_remove("MCP_PROJECT_DIR");
        if online {
            command.arg("--online");
        }
        command
    };
    let offline = tokio::task::spawn_blocking({
        let mut command = check(false);
        move || command.output().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        offline.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&offline.stdout)
    );

    let online = tokio::task::spawn_blocking({
        let mut command = check(true);
        move || command.output().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        online.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&online.stderr)
    );
    let found: Json = serde_json::from_slice(&online.stdout).unwrap();
    let found: Vec<(String, u64, u64, String)> = found
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["code"].as_str().unwrap().to_owned(),
                d["line"].as_u64().unwrap(),
                d["column"].as_u64().unwrap(),
                format!("{} {}", d["message"], d["hint"]),
            )
        })
        .collect();
    let has = |code: &str, line: u64, column: u64, text: &str| {
        assert!(
            found
                .iter()
                .any(|f| f.0 == code && f.1 == line && f.2 == column && f.3.contains(text)),
            "no {code} at {line}:{column} with `{text}` in {found:#?}"
        );
    };
    has("unknown-tool", 6, 51, "did you mean `find_dishes`?");
    has(
        "mcp-server-unavailable",
        7,
        27,
        "cannot list the tools of service `gone`",
    );
    has("mcp-server-unavailable", 7, 27, "error sending request");
    has("invalid-arguments", 16, 11, "requires argument `query`");
    has("invalid-arguments", 16, 11, "did you mean `query`?");
    has(
        "invalid-arguments",
        17,
        18,
        "50 is greater than the maximum of 20",
    );
    // The first call fits; the typo'd service is not checked further.
    assert_eq!(found.len(), 5, "{found:#?}");
}
