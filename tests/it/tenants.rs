//! A deployment of several tenants, served by the real binary: each
//! answers with its own wording whichever way a request reaches it, keys
//! stay with their tenant, a broken edit or a flood in one leaves the other
//! alone, and a tenant folder added while serving is served.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value as Json, json};

use crate::runtime::serve_binary::Served;
use crate::runtime::{Stub, http_client, json_response};
use crate::{copy_tree, repository_root};

const TRATTORIA_KEY: &str = "trattoria-key-0123456789abcdef";
const SAKURA_KEY: &str = "sakura-key-0123456789abcdef01";
const TRATTORIA_MENU: &str = "Here's what we're serving today";
const SAKURA_MENU: &str = "Irasshaimase! Today at Sakura Sushi";

/// `tenants/trattoria` (the shipped project) and `tenants/sakura` (the
/// example's second brand, reached also as `sakura.test`), each with a
/// caller key of its own.
fn deployment() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let trattoria = dir.path().join("tenants/trattoria");
    for folder in ["flows", "schemas", "mocks"] {
        copy_tree(&repository_root().join(folder), &trattoria.join(folder));
    }
    add_sakura(dir.path(), "sakura", Some("sakura.test"));
    dir
}

/// Copies the example's Sakura tenant to `tenants/<name>`.
fn add_sakura(deployment: &Path, name: &str, host: Option<&str>) {
    let sakura = deployment.join("tenants").join(name);
    let staging = deployment.join(format!(".staging-{name}"));
    copy_tree(
        &repository_root().join("examples/multi-tenant/tenants/sakura"),
        &staging,
    );
    // Its own hosts, if any, instead of the example's.
    std::fs::remove_file(staging.join("flows/hosts.yaml")).unwrap();
    let mut extra =
        "access:\n  api_keys:\n    - name: sakura-app\n      key: \"${SAKURA_API_KEY}\"\n"
            .to_owned();
    if let Some(host) = host {
        extra.push_str(&format!("hosts: [{host}]\n"));
    }
    std::fs::write(staging.join("flows/tenant.yaml"), extra).unwrap();
    // In place at once, as a deployment tool would move it.
    std::fs::rename(&staging, &sakura).unwrap();
}

fn variables(dir: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("MCP_PROJECT_DIR", dir.to_str().unwrap().to_owned()),
        ("WEB_APP_API_KEY", TRATTORIA_KEY.to_owned()),
        ("SAKURA_API_KEY", SAKURA_KEY.to_owned()),
        ("LOG_LEVEL", "info".to_owned()),
    ]
}

/// The binary serving a deployment, and one client for the test's
/// requests (connections kept and reused, as a channel's would be).
struct Running {
    served: Served,
    port: u16,
    client: reqwest::Client,
}

async fn start(variables: &[(&'static str, String)]) -> Running {
    let borrowed: Vec<(&str, &str)> = variables
        .iter()
        .map(|(name, value)| (*name, value.as_str()))
        .collect();
    let served = Served::start(&borrowed, Duration::from_secs(60)).await;
    Running {
        port: served.port,
        served,
        client: http_client(),
    }
}

/// `POST path` with `body`, the key and extra headers; (status, body).
async fn post(
    client: &reqwest::Client,
    port: u16,
    path: &str,
    key: &str,
    headers: &[(&str, &str)],
    body: Json,
) -> (u16, Json) {
    let mut request = client
        .post(format!("http://127.0.0.1:{port}{path}"))
        .bearer_auth(key)
        .json(&body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Json::Null))
}

fn menu(user: &str) -> Json {
    json!({"text": "What's on the menu?", "user_id": user})
}

async fn health(served: &Running) -> Json {
    served
        .client
        .get(format!("http://127.0.0.1:{}/health", served.port))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Polls `/health` until `done` holds, within a deadline.
async fn health_until(served: &Running, what: &str, done: impl Fn(&Json) -> bool) -> Json {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let health = health(served).await;
        if done(&health) {
            return health;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: never; last /health {health:#}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn each_tenant_answers_in_its_own_words_by_path_host_header_and_body() {
    let dir = deployment();
    let served = start(&variables(dir.path())).await;

    let (status, body) = post(
        &served.client,
        served.port,
        "/t/trattoria/orchestrate",
        TRATTORIA_KEY,
        &[],
        menu("u1"),
    )
    .await;
    assert_eq!(status, 200, "{body:#}");
    assert!(
        body["reply_text"]
            .as_str()
            .unwrap()
            .contains(TRATTORIA_MENU),
        "{body:#}"
    );
    let (status, body) = post(
        &served.client,
        served.port,
        "/t/sakura/orchestrate",
        SAKURA_KEY,
        &[],
        menu("u1"),
    )
    .await;
    assert_eq!(status, 200, "{body:#}");
    assert!(
        body["reply_text"].as_str().unwrap().contains(SAKURA_MENU),
        "{body:#}"
    );

    let (status, body) = post(
        &served.client,
        served.port,
        "/orchestrate",
        SAKURA_KEY,
        &[("host", "sakura.test")],
        menu("u2"),
    )
    .await;
    assert_eq!(status, 200, "{body:#}");
    assert!(
        body["reply_text"].as_str().unwrap().contains(SAKURA_MENU),
        "{body:#}"
    );

    let (status, body) = post(
        &served.client,
        served.port,
        "/orchestrate",
        TRATTORIA_KEY,
        &[("x-tenant", "trattoria")],
        menu("u3"),
    )
    .await;
    assert_eq!(status, 200, "{body:#}");
    assert!(
        body["reply_text"]
            .as_str()
            .unwrap()
            .contains(TRATTORIA_MENU),
        "{body:#}"
    );

    let mut named = menu("u4");
    named["tenant"] = json!("sakura");
    let (status, body) = post(
        &served.client,
        served.port,
        "/orchestrate",
        SAKURA_KEY,
        &[],
        named,
    )
    .await;
    assert_eq!(status, 200, "{body:#}");
    assert!(
        body["reply_text"].as_str().unwrap().contains(SAKURA_MENU),
        "{body:#}"
    );

    let (status, body) = post(
        &served.client,
        served.port,
        "/t/pizzeria/orchestrate",
        SAKURA_KEY,
        &[],
        menu("u5"),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("unknown_tenant"))
    );
    let (status, body) = post(
        &served.client,
        served.port,
        "/orchestrate",
        SAKURA_KEY,
        &[],
        menu("u5"),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("unknown_tenant")),
        "{body:#}"
    );

    // The body may not name another tenant than the one it reached.
    let mut other = menu("u6");
    other["tenant"] = json!("trattoria");
    let (status, body) = post(
        &served.client,
        served.port,
        "/t/sakura/orchestrate",
        SAKURA_KEY,
        &[],
        other,
    )
    .await;
    assert_eq!(
        (status, body["pointer"].as_str()),
        (422, Some("/tenant")),
        "{body:#}"
    );

    // The turns' metrics say their tenant.
    let metrics = served
        .client
        .get(format!("http://127.0.0.1:{}/metrics", served.port))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for tenant in ["sakura", "trattoria"] {
        assert!(
            metrics
                .lines()
                .any(|line| line.starts_with("mcp_service_calls_total{")
                    && line.contains(&format!("tenant=\"{tenant}\""))),
            "no service call of {tenant} in {metrics}"
        );
        assert!(
            metrics
                .lines()
                .any(|line| line.starts_with("mcp_requests_total{")
                    && line.contains(&format!("tenant=\"{tenant}\""))),
            "no request of {tenant}"
        );
    }
    let health = health(&served).await;
    assert_eq!(health["tenants"]["sakura"]["status"], "ok", "{health:#}");
    assert_eq!(health["tenants"]["trattoria"]["status"], "ok", "{health:#}");
    // Every line of a turn says its tenant.
    let logged = served.served.logged();
    assert!(
        logged
            .iter()
            .any(|line| line.contains("\"event_type\":\"output\"")
                && line.contains("\"tenant\":\"sakura\"")),
        "no output line with the tenant"
    );
}

#[tokio::test]
async fn a_key_of_one_tenant_is_refused_for_the_other() {
    let dir = deployment();
    let served = start(&variables(dir.path())).await;
    for (path, headers) in [
        ("/t/sakura/orchestrate", vec![]),
        ("/orchestrate", vec![("host", "sakura.test")]),
        ("/orchestrate", vec![("x-tenant", "sakura")]),
    ] {
        let (status, body) = post(
            &served.client,
            served.port,
            path,
            TRATTORIA_KEY,
            &headers,
            menu("u1"),
        )
        .await;
        assert_eq!(
            (status, body["code"].as_str()),
            (403, Some("forbidden")),
            "{path} {headers:?}: {body:#}"
        );
    }
    // A key no tenant has is still 401.
    let (status, _) = post(
        &served.client,
        served.port,
        "/t/sakura/orchestrate",
        "nobody-key-0123456789abcdef",
        &[],
        menu("u1"),
    )
    .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn a_broken_edit_in_one_tenant_leaves_the_other_untouched() {
    let dir = deployment();
    let served = start(&variables(dir.path())).await;
    let before = health(&served).await;
    let sakura_generation = before["tenants"]["sakura"]["reload"]["generation"].clone();
    let trattoria_generation = before["tenants"]["trattoria"]["reload"]["generation"].clone();

    let menu_file = dir.path().join("tenants/trattoria/flows/menu.yaml");
    let text = std::fs::read_to_string(&menu_file).unwrap();
    std::fs::write(&menu_file, text.replacen("reply:", "replyy:", 1)).unwrap();
    let after = health_until(&served, "the broken edit is reported", |health| {
        health["tenants"]["trattoria"]["reload"]["last_error"].is_object()
    })
    .await;
    assert_eq!(
        after["tenants"]["sakura"]["reload"]["generation"],
        sakura_generation
    );
    assert!(after["tenants"]["sakura"]["reload"]["last_error"].is_null());
    assert_eq!(
        after["tenants"]["trattoria"]["reload"]["generation"],
        trattoria_generation
    );
    let diagnostic = &after["tenants"]["trattoria"]["reload"]["last_error"]["diagnostics"][0];
    assert_eq!(diagnostic["code"], "unknown-key", "{after:#}");

    // The last good project still serves.
    let (status, body) = post(
        &served.client,
        served.port,
        "/t/trattoria/orchestrate",
        TRATTORIA_KEY,
        &[],
        menu("u1"),
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        body["reply_text"]
            .as_str()
            .unwrap()
            .contains(TRATTORIA_MENU)
    );
    let (status, _) = post(
        &served.client,
        served.port,
        "/t/sakura/orchestrate",
        SAKURA_KEY,
        &[],
        menu("u1"),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_tenant_folder_added_while_serving_is_served_and_one_removed_is_not() {
    let dir = deployment();
    let served = start(&variables(dir.path())).await;
    let added = Instant::now();
    add_sakura(dir.path(), "sakura-east", None);
    let deadline = added + Duration::from_secs(20);
    loop {
        let (status, body) = post(
            &served.client,
            served.port,
            "/t/sakura-east/orchestrate",
            SAKURA_KEY,
            &[],
            menu("u1"),
        )
        .await;
        if status == 200 {
            assert!(body["reply_text"].as_str().unwrap().contains(SAKURA_MENU));
            break;
        }
        assert_eq!(body["code"], "unknown_tenant", "{body:#}");
        assert!(Instant::now() < deadline, "the new tenant was never served");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("tenant folder added → served in {:?}", added.elapsed());

    std::fs::remove_dir_all(dir.path().join("tenants/sakura-east")).unwrap();
    health_until(&served, "the removed tenant is unloaded", |health| {
        health["tenants"]["sakura-east"].is_null()
    })
    .await;
    let (status, body) = post(
        &served.client,
        served.port,
        "/t/sakura-east/orchestrate",
        SAKURA_KEY,
        &[],
        menu("u1"),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("unknown_tenant"))
    );
}

/// The p99 of `latencies`.
fn p99(latencies: &mut [Duration]) -> Duration {
    latencies.sort();
    latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_flooding_its_limit_leaves_the_other_its_latency() {
    // Both menus come from stubs that take a while, as services do, so a
    // turn's time is the service's plus the engine's.
    let slow = Stub::start(|_, _| async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        json_response(200, json!({"output": "Only pizza tonight."}))
    })
    .await;
    let steady = Stub::start(|_, _| async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        json_response(200, json!({"output": "Only ramen tonight."}))
    })
    .await;
    let dir = deployment();
    let mut variables = variables(dir.path());
    variables.extend([
        ("MENU_SERVICE_URL", slow.url()),
        ("SAKURA_MENU_SERVICE_URL", steady.url()),
        // The trattoria's limit: 5 turns a second per user.
        ("PER_USER_RATE", "5/s".to_owned()),
    ]);
    let served = start(&variables).await;

    /// Sakura's p99 over 150 menu turns, after a warm-up (connections
    /// open, the stub's first answer).
    async fn sakura_p99(served: &Running) -> Duration {
        let turn = |n: usize| {
            post(
                &served.client,
                served.port,
                "/t/sakura/orchestrate",
                SAKURA_KEY,
                &[],
                menu(&format!("s{n}")),
            )
        };
        for n in 0..10 {
            assert_eq!(turn(n).await.0, 200);
        }
        let mut latencies = Vec::new();
        for n in 0..150 {
            let started = Instant::now();
            assert_eq!(turn(n).await.0, 200);
            latencies.push(started.elapsed());
        }
        p99(&mut latencies)
    }
    let unloaded = sakura_p99(&served).await;

    // The flood: 32 clients as one user of the trattoria, each retrying
    // 50 ms after a refusal (some 600 requests a second against a limit
    // of 5).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut flood = Vec::new();
    for _ in 0..32 {
        let (client, port, stop, refused) = (
            served.client.clone(),
            served.port,
            stop.clone(),
            refused.clone(),
        );
        flood.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (status, _) = post(
                    &client,
                    port,
                    "/t/trattoria/orchestrate",
                    TRATTORIA_KEY,
                    &[],
                    menu("flood"),
                )
                .await;
                if status == 429 || status == 503 {
                    refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    // Until the flood is at its limit.
    let deadline = Instant::now() + Duration::from_secs(20);
    while refused.load(std::sync::atomic::Ordering::Relaxed) < 100 {
        assert!(
            Instant::now() < deadline,
            "the flood never reached the trattoria's limit"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let loaded = sakura_p99(&served).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in flood {
        task.await.unwrap();
    }
    eprintln!(
        "sakura p99: {unloaded:?} unloaded, {loaded:?} while the trattoria was flooded ({} refusals)",
        refused.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert!(
        loaded <= unloaded * 2,
        "sakura's p99 went from {unloaded:?} to {loaded:?} under the trattoria's flood"
    );
}

#[tokio::test]
async fn a_tenant_that_does_not_load_is_unavailable_until_fixed_and_hosts_keep_their_owner() {
    let dir = deployment();
    // A third tenant whose project does not load.
    let broken = dir.path().join("tenants/broken");
    copy_tree(
        &repository_root().join("examples/multi-tenant/tenants/sakura"),
        &broken,
    );
    std::fs::remove_file(broken.join("flows/hosts.yaml")).unwrap();
    let menu_file = broken.join("flows/menu.yaml");
    let good = std::fs::read_to_string(&menu_file).unwrap();
    std::fs::write(&menu_file, good.replacen("reply:", "replyy:", 1)).unwrap();
    let served = start(&variables(dir.path())).await;

    let health = health(&served).await;
    assert_eq!(health["status"], "degraded", "{health:#}");
    assert_eq!(
        health["tenants"]["broken"]["status"], "failed",
        "{health:#}"
    );
    let file =
        health["tenants"]["broken"]["reload"]["last_error"]["diagnostics"][0]["file"].clone();
    assert_eq!(file, "tenants/broken/flows/menu.yaml", "{health:#}");
    let (status, body) = post(
        &served.client,
        served.port,
        "/t/broken/orchestrate",
        SAKURA_KEY,
        &[],
        menu("u1"),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("tenant_unavailable")),
        "{body:#}"
    );

    // Another tenant claiming sakura's host by a reload does not get it.
    std::fs::write(
        dir.path().join("tenants/trattoria/flows/hosts.yaml"),
        "hosts: [sakura.test]\n",
    )
    .unwrap();
    health_until(&served, "the trattoria reloads with the host", |health| {
        health["tenants"]["trattoria"]["reload"]["generation"] == 2
    })
    .await;
    let (status, body) = post(
        &served.client,
        served.port,
        "/orchestrate",
        SAKURA_KEY,
        &[("host", "sakura.test")],
        menu("u2"),
    )
    .await;
    assert_eq!(status, 200, "{body:#}");
    assert!(
        body["reply_text"].as_str().unwrap().contains(SAKURA_MENU),
        "{body:#}"
    );

    // Fixed, the broken tenant is served.
    std::fs::write(&menu_file, good).unwrap();
    health_until(&served, "the fixed tenant is served", |health| {
        health["tenants"]["broken"]["status"] == "ok"
    })
    .await;
    let (status, body) = post(
        &served.client,
        served.port,
        "/t/broken/orchestrate",
        SAKURA_KEY,
        &[],
        menu("u3"),
    )
    .await;
    assert_eq!(status, 200, "{body:#}");
}
