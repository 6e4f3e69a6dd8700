//! Hot reload with real file edits: a temp project served on port 0, the
//! watcher running, `/health` polled with a deadline (never a fixed sleep).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use mcp_orchestrator::intent::RuleClassifier;
use mcp_orchestrator::reload::{Reloader, Source, WatchGuard, prepare};
use mcp_orchestrator::server::{self, AppState, Environment, RuntimeSettings};
use mcp_orchestrator::services::{HttpTransport, http_client};
use mcp_orchestrator::session::MemorySessionStore;
use serde_json::{Value, json};

use crate::shipped_project_copy;

/// Generous: the machine may be loaded; a passing run never waits this long.
const DEADLINE: Duration = Duration::from_secs(20);

struct Served {
    /// Kept alive for the test's duration.
    _project: Option<tempfile::TempDir>,
    dir: PathBuf,
    base: String,
    client: reqwest::Client,
    _watch: WatchGuard,
    _server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Served {
    fn path(&self, relative: &str) -> PathBuf {
        self.dir.join(relative)
    }

    async fn health(&self) -> Value {
        self.client
            .get(format!("{}/health", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn generation(&self) -> u64 {
        self.health().await["reload"]["generation"]
            .as_u64()
            .unwrap()
    }

    /// Polls `/health` until `ready` holds, failing after `DEADLINE`.
    async fn wait_for(&self, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let health = self.health().await;
            if ready(&health) {
                return health;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}: {health:#}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Asks for the menu until the reply starts with `intro`, failing after
    /// `DEADLINE`.
    async fn wait_for_menu_starting_with(&self, intro: &str) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let reply = self.turn("show me the menu").await;
            let text = reply["reply_text"].as_str().unwrap_or_default();
            if text.starts_with(intro) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the menu never started with {intro:?}: {reply:#}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Asks for the menu and asserts the reply starts with `intro`.
    async fn assert_menu_starts_with(&self, intro: &str) {
        let reply = self.turn("show me the menu").await;
        let text = reply["reply_text"].as_str().unwrap_or_default();
        assert!(text.starts_with(intro), "{reply:#}");
    }

    async fn turn(&self, text: &str) -> Value {
        self.client
            .post(format!("{}/orchestrate", self.base))
            .json(&json!({"text": text, "user_id": "reload-user"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

/// Serves a copy of the shipped project with the watcher on.
async fn serve_project(project: tempfile::TempDir, variables: &[(&str, String)]) -> Served {
    let dir = project.path().to_path_buf();
    serve_dir(dir, Some(project), variables).await
}

/// Serves the project in `dir` with the watcher on.
async fn serve_dir(
    dir: PathBuf,
    keep: Option<tempfile::TempDir>,
    variables: &[(&str, String)],
) -> Served {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let source = Source {
        dir: dir.clone(),
        // The tests' fixed environment (lifted per-user rate among it: a
        // test polls with many turns while a reload runs), then the test's.
        variables: crate::test_environment()
            .into_iter()
            .chain(variables.iter().map(|(k, v)| ((*k).to_owned(), v.clone())))
            .collect(),
        environment: Environment::Development,
        force_mock: false,
        tenant: None,
    };
    let prepared = prepare(&source, 1).unwrap_or_else(|error| panic!("{:#?}", error.diagnostics));
    let http = http_client().unwrap();
    let state = Arc::new(AppState {
        deployment: ArcSwap::from_pointee(prepared.deployment),
        classifier: Arc::new(RuleClassifier),
        sessions: Arc::new(MemorySessionStore::new(Duration::from_secs(60), 1000)),
        transport: Arc::new(HttpTransport::new().unwrap()),
        settings: RuntimeSettings {
            environment: Environment::Development,
            request_timeout: Duration::from_secs(30),
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
    });
    let reloader = Reloader::new(source, state.clone());
    let watch = reloader.watch().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(server::serve(
        listener,
        state,
        std::future::pending(),
        Duration::from_secs(1),
    ));
    Served {
        _project: keep,
        dir,
        base,
        client: http,
        _watch: watch,
        _server: server,
    }
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(
        text.contains(from),
        "{} does not contain {from:?}",
        path.display()
    );
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

const MENU_INTRO: &str = "Here's what we're serving today:";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_edit_goes_live() {
    let served = serve_project(shipped_project_copy(), &[]).await;
    assert_eq!(served.generation().await, 1);
    served.assert_menu_starts_with(MENU_INTRO).await;

    edit(
        &served.path("flows/menu.yaml"),
        MENU_INTRO,
        "Tonight's menu:",
    );
    let health = served
        .wait_for("generation 2", |h| h["reload"]["generation"] == 2)
        .await;
    assert!(health["reload"]["last_success_at"].is_string());
    assert!(health["reload"]["last_error"].is_null());
    let reply = served.turn("show me the menu").await;
    assert!(
        reply["reply_text"]
            .as_str()
            .unwrap()
            .starts_with("Tonight's menu:"),
        "{reply:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_yaml_edit_keeps_the_last_good_project_and_a_fix_recovers() {
    let served = serve_project(shipped_project_copy(), &[]).await;
    let menu = served.path("flows/menu.yaml");
    let good = std::fs::read_to_string(&menu).unwrap();
    std::fs::write(&menu, format!("{good}\n  broken: [unclosed\n")).unwrap();
    let health = served
        .wait_for("a reload error", |h| !h["reload"]["last_error"].is_null())
        .await;
    let diagnostics = health["reload"]["last_error"]["diagnostics"]
        .as_array()
        .unwrap();
    assert_eq!(diagnostics[0]["code"], "yaml-syntax");
    assert_eq!(diagnostics[0]["file"], "flows/menu.yaml");
    assert!(diagnostics[0]["line"].as_u64().unwrap() > 0);
    assert_eq!(health["reload"]["generation"], 1);
    // Still serving the last good project.
    let reply = served.turn("show me the menu").await;
    assert_eq!(reply["route"], "menu");

    std::fs::write(&menu, good.replace(MENU_INTRO, "Fixed menu:")).unwrap();
    served
        .wait_for("recovery", |h| {
            h["reload"]["generation"] == 2 && h["reload"]["last_error"].is_null()
        })
        .await;
    served.assert_menu_starts_with("Fixed menu:").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_reference_keeps_the_last_good_project() {
    let served = serve_project(shipped_project_copy(), &[]).await;
    edit(&served.path("flows/menu.yaml"), "call: menu", "call: menuu");
    let health = served
        .wait_for("a reload error", |h| !h["reload"]["last_error"].is_null())
        .await;
    let diagnostic = &health["reload"]["last_error"]["diagnostics"][0];
    assert_eq!(diagnostic["code"], "unknown-service");
    assert_eq!(diagnostic["hint"], "did you mean `menu`?");
    assert_eq!(health["reload"]["generation"], 1);
    assert_eq!(served.turn("show me the menu").await["route"], "menu");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_edits_coalesce_and_the_last_one_wins() {
    let served = serve_project(shipped_project_copy(), &[]).await;
    let menu = served.path("flows/menu.yaml");
    let good = std::fs::read_to_string(&menu).unwrap();
    for version in 1..=50 {
        std::fs::write(
            &menu,
            good.replace(MENU_INTRO, &format!("Menu version {version}:")),
        )
        .unwrap();
    }
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let reply = served.turn("show me the menu").await;
        if reply["reply_text"]
            .as_str()
            .unwrap()
            .starts_with("Menu version 50:")
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the last edit never went live: {reply:#}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let generation = served.generation().await;
    assert!(
        (2..50).contains(&generation),
        "50 edits made {} reloads",
        generation - 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_atomic_rename_save_is_seen() {
    let served = serve_project(shipped_project_copy(), &[]).await;
    let menu = served.path("flows/menu.yaml");
    let text = std::fs::read_to_string(&menu).unwrap();
    // How editors and `sed -i` save: write a new file beside, rename over.
    let temporary = served.path("flows/.menu.yaml.tmp");
    std::fs::write(&temporary, text.replace(MENU_INTRO, "Renamed menu:")).unwrap();
    std::fs::rename(&temporary, &menu).unwrap();
    served
        .wait_for("generation 2", |h| h["reload"]["generation"] == 2)
        .await;
    served.assert_menu_starts_with("Renamed menu:").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_referenced_file_keeps_the_last_good_project() {
    let served = serve_project(shipped_project_copy(), &[]).await;
    // services.yaml defines the services every flow calls.
    std::fs::remove_file(served.path("flows/services.yaml")).unwrap();
    let health = served
        .wait_for("a reload error", |h| !h["reload"]["last_error"].is_null())
        .await;
    let codes: Vec<&str> = health["reload"]["last_error"]["diagnostics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["code"].as_str().unwrap())
        .collect();
    assert!(codes.contains(&"unknown-service"), "{codes:?}");
    assert_eq!(health["reload"]["generation"], 1);
    assert_eq!(served.turn("show me the menu").await["route"], "menu");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_during_a_swap_finishes_on_its_version() {
    // A menu service that answers only when the test lets it.
    let (received_sender, mut received) = tokio::sync::mpsc::channel::<()>(1);
    let release = Arc::new(tokio::sync::Notify::new());
    let stub_release = release.clone();
    let stub = axum::Router::new().fallback(move || {
        let received_sender = received_sender.clone();
        let release = stub_release.clone();
        async move {
            let _ = received_sender.send(()).await;
            release.notified().await;
            axum::Json(json!({"output": "Pasta tonight."}))
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stub_url = format!("http://{}/menu", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, stub).await });

    let served =
        Arc::new(serve_project(shipped_project_copy(), &[("MENU_SERVICE_URL", stub_url)]).await);
    let in_flight = {
        let served = served.clone();
        tokio::spawn(async move { served.turn("show me the menu").await })
    };
    tokio::time::timeout(DEADLINE, received.recv())
        .await
        .unwrap()
        .unwrap();

    // The menu flow's reply changes while the request waits on the service.
    edit(
        &served.path("flows/menu.yaml"),
        "{{ menu.output }}",
        "NEW: {{ menu.output }}",
    );
    served
        .wait_for("generation 2", |h| h["reload"]["generation"] == 2)
        .await;
    release.notify_one();
    let reply = tokio::time::timeout(DEADLINE, in_flight)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply["reply_text"], "Pasta tonight.", "{reply:#}");

    // A new request runs on the new version.
    let next = {
        let served = served.clone();
        tokio::spawn(async move { served.turn("show me the menu").await })
    };
    tokio::time::timeout(DEADLINE, received.recv())
        .await
        .unwrap()
        .unwrap();
    release.notify_one();
    let reply = tokio::time::timeout(DEADLINE, next).await.unwrap().unwrap();
    assert_eq!(reply["reply_text"], "NEW: Pasta tonight.", "{reply:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folder_replaced_whole_is_seen() {
    let served = serve_project(shipped_project_copy(), &[]).await;
    // What `git checkout` does to a folder: remove it, write it anew.
    let flows = served.path("flows");
    let staged = served.path("flows.new");
    crate::copy_tree(&flows, &staged);
    edit(&staged.join("menu.yaml"), MENU_INTRO, "Checked-out menu:");
    std::fs::remove_dir_all(&flows).unwrap();
    std::fs::rename(&staged, &flows).unwrap();
    // On a loaded machine a reload may land between the removal and the
    // rename (a folder with some files gone can be a valid project); the
    // one after the rename must follow.
    served
        .wait_for_menu_starting_with("Checked-out menu:")
        .await;
    let generation = served.generation().await;

    // The new folder is watched too.
    edit(
        &served.path("flows/menu.yaml"),
        "Checked-out menu:",
        "Edited again:",
    );
    served
        .wait_for("a generation after the edit", |h| {
            h["reload"]["generation"].as_u64() > Some(generation)
        })
        .await;
    served.wait_for_menu_starting_with("Edited again:").await;
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlinked_project_swapped_like_a_config_map_is_seen() {
    // Kubernetes mounts a ConfigMap as `dir/..data -> ..<timestamp>` and
    // swaps the `..data` link atomically on an update.
    let root = tempfile::tempdir().unwrap();
    let first = shipped_project_copy();
    let second = shipped_project_copy();
    edit(
        &second.path().join("flows/menu.yaml"),
        MENU_INTRO,
        "ConfigMap menu:",
    );
    let data = root.path().join("..data");
    std::os::unix::fs::symlink(first.path(), &data).unwrap();
    let project = root.path().join("project");
    std::os::unix::fs::symlink(&data, &project).unwrap();

    let served = serve_dir(project, None, &[]).await;
    assert_eq!(served.turn("show me the menu").await["route"], "menu");
    let swap = root.path().join("..data_tmp");
    std::os::unix::fs::symlink(second.path(), &swap).unwrap();
    std::fs::rename(&swap, &data).unwrap();
    served
        .wait_for("generation 2", |h| h["reload"]["generation"] == 2)
        .await;
    served.assert_menu_starts_with("ConfigMap menu:").await;
}

/// A reload reads every project file; reads must not trigger reloads (they
/// once did, about fifteen times a second). This watches for an absence, so
/// it can only observe a window: one idle second, long against the 50 ms
/// debounce, after the edit's own reloads have settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_the_project_does_not_trigger_reloads() {
    let served = serve_project(shipped_project_copy(), &[]).await;
    edit(&served.path("flows/menu.yaml"), MENU_INTRO, "Quiet menu:");
    served
        .wait_for("generation 2", |h| h["reload"]["generation"] == 2)
        .await;
    // Let the edit's trailing events (a write may arrive as two batches)
    // run their course: wait until the count holds still for half a second.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut attempts = served.health().await["reload"]["attempts"]
        .as_u64()
        .unwrap();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = served.health().await["reload"]["attempts"]
            .as_u64()
            .unwrap();
        if now == attempts {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "reloads never stopped: {now} so far"
        );
        attempts = now;
    }
    // Reading the files, as a reload does, changes nothing.
    for entry in std::fs::read_dir(served.path("flows")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::read_to_string(path).unwrap();
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let health = served.health().await;
    assert_eq!(
        health["reload"]["attempts"].as_u64().unwrap(),
        attempts,
        "{health:#}"
    );
    assert_eq!(health["reload"]["generation"], 2);
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_map_mounted_as_the_flows_folder_is_read_once_and_its_update_reloaded() {
    // Kubernetes mounts a ConfigMap as a folder holding the files in
    // `..<timestamp>/`, a link `..data -> ..<timestamp>` and one link per
    // file, `menu.yaml -> ..data/menu.yaml`. An update writes a new
    // timestamped folder, swaps `..data` and removes the old folder.
    let project = shipped_project_copy();
    let flows = project.path().join("flows");
    let originals = project.path().join("flow-files");
    std::fs::rename(&flows, &originals).unwrap();
    std::fs::create_dir(&flows).unwrap();
    let first = flows.join("..2026_11_30_10_00_00.1");
    std::fs::create_dir(&first).unwrap();
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&originals).unwrap() {
        let path = entry.unwrap().path();
        if path
            .extension()
            .is_some_and(|extension| extension == "yaml")
        {
            let name = path.file_name().unwrap().to_owned();
            std::fs::copy(&path, first.join(&name)).unwrap();
            names.push(name);
        }
    }
    std::os::unix::fs::symlink("..2026_11_30_10_00_00.1", flows.join("..data")).unwrap();
    for name in &names {
        std::os::unix::fs::symlink(Path::new("..data").join(name), flows.join(name)).unwrap();
    }

    // Read once: every flow name would otherwise be a duplicate.
    let served = serve_project(project, &[]).await;
    assert_eq!(served.turn("show me the menu").await["route"], "menu");

    let second = flows.join("..2026_11_30_10_05_00.2");
    std::fs::create_dir(&second).unwrap();
    for name in &names {
        std::fs::copy(first.join(name), second.join(name)).unwrap();
    }
    edit(&second.join("menu.yaml"), MENU_INTRO, "ConfigMap menu:");
    let swap = flows.join("..data_tmp");
    std::os::unix::fs::symlink("..2026_11_30_10_05_00.2", &swap).unwrap();
    std::fs::rename(&swap, flows.join("..data")).unwrap();
    std::fs::remove_dir_all(&first).unwrap();
    served
        .wait_for("generation 2", |h| h["reload"]["generation"] == 2)
        .await;
    served.assert_menu_starts_with("ConfigMap menu:").await;
}
