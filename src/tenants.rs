//! Several brands' flow projects served by one process: a deployment
//! folder with `tenants/<name>/flows/…` serves each subfolder as tenant
//! `<name>`.
//!
//! Each tenant is a whole `AppState` of its own — its deployment, reload
//! status, rate limits and turns in flight (its own `limits:`), circuit
//! breakers, channel de-duplication and queue, console — so one tenant's
//! broken edit or flood never reaches another. What they share is what
//! holds no tenant's data: the classifier, the HTTP transport, the settings,
//! and the session store, where every key carries the tenant's prefix
//! (`session::TenantSessions`).
//!
//! A request reaches a tenant by path (`/t/{tenant}/…`), by `Host` (a
//! tenant's `hosts:`), or on `/orchestrate` by the `X-Tenant` header or the
//! body's `tenant` field, in that order. A caller key belongs to the tenant
//! that declares it: one that another tenant would accept is answered 403.
//!
//! One watcher covers the `tenants/` folder: an edit reloads its tenant
//! alone (`reload::Reloader`, each with its own generation and status); a
//! folder added is loaded, a folder removed unloaded. A tenant whose project
//! does not load at start-up is left out — the others serve — and loaded
//! as soon as an edit fixes it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value as Json, json};
use tower_service::Service as _;
use tracing::Instrument;

use crate::diagnostic::Diagnostic;
use crate::intent::Classifier;
use crate::load;
use crate::reload::{self, Reloader, Source, WatchGuard};
use crate::server::{
    self, ApiError, AppState, Environment, ReloadError, RuntimeSettings, TenantLabel,
};
use crate::services::Transport;
use crate::session::{SessionStore, TenantSessions};

/// The folder of a deployment that holds one project per tenant.
pub const TENANTS_DIR: &str = "tenants";

/// Longest tenant name.
pub const MAX_TENANT_NAME: usize = 63;

/// Whether `dir` is a deployment of several tenants: it has `tenants/` and
/// no `flows/` of its own.
pub fn is_multi_tenant(dir: &Path) -> bool {
    dir.join(TENANTS_DIR).is_dir() && !dir.join(load::FLOWS_DIR).exists()
}

/// A tenant's name: lower-case letters, digits, `-` and `_`, starting with
/// a letter or digit; it is a path segment, a label value and a key prefix.
pub fn is_tenant_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TENANT_NAME
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// The folders under a deployment's `tenants/`.
#[derive(Debug, Default)]
pub struct TenantFolders {
    /// By name.
    pub tenants: Vec<(String, PathBuf)>,
    /// Folders whose names are not tenant names.
    pub invalid: Vec<String>,
}

/// The tenants of the deployment in `dir`, by name, and the folders under
/// `tenants/` whose names are not tenant names. Hidden entries (`.git`, a
/// ConfigMap's `..data`) are skipped.
pub fn tenant_dirs(dir: &Path) -> std::io::Result<TenantFolders> {
    let mut tenants = Vec::new();
    let mut invalid = Vec::new();
    for entry in std::fs::read_dir(dir.join(TENANTS_DIR))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !entry.path().is_dir() {
            continue;
        }
        if is_tenant_name(&name) {
            tenants.push((name, entry.path()));
        } else {
            invalid.push(name);
        }
    }
    tenants.sort();
    invalid.sort();
    Ok(TenantFolders { tenants, invalid })
}

/// What every tenant shares.
pub struct Shared {
    pub classifier: Arc<dyn Classifier>,
    /// Prefixed per tenant.
    pub sessions: Arc<dyn SessionStore>,
    pub transport: Arc<dyn Transport>,
    pub settings: RuntimeSettings,
    /// The console of each tenant, at `/t/{tenant}/console`.
    pub console: bool,
    /// The environment at start-up, for `${VAR}` in every project.
    pub variables: load::Environment,
    pub environment: Environment,
    pub force_mock: bool,
}

/// One tenant being served.
pub struct Tenant {
    pub name: String,
    pub state: Arc<AppState>,
    router: Router,
    reloader: Arc<Reloader>,
    label: TenantLabel,
    _reloads: WatchGuard,
}

/// The tenants being served, and where each host name leads.
#[derive(Default)]
struct Live {
    tenants: BTreeMap<String, Arc<Tenant>>,
    hosts: HashMap<String, Arc<Tenant>>,
}

/// A tenant whose folder is there but whose project has not loaded.
struct Failed {
    error: ReloadError,
    /// Its files when it failed: it is tried again once they change.
    fingerprint: BTreeMap<PathBuf, (u64, Option<SystemTime>)>,
}

/// Every tenant of a deployment.
pub struct Tenants {
    dir: PathBuf,
    shared: Shared,
    live: ArcSwap<Live>,
    failed: Mutex<BTreeMap<String, Failed>>,
    /// One load or unload at a time.
    changes: tokio::sync::Mutex<()>,
    /// Wakes the supervisor: the `tenants/` folder changed.
    wake: tokio::sync::Notify,
    /// Set after the first sync (start-up): later ones wait for a folder
    /// being copied in to settle; the first has nothing being copied.
    synced: std::sync::atomic::AtomicBool,
    /// Folders already said not to be tenants.
    warned: Mutex<std::collections::BTreeSet<String>>,
}

impl Tenants {
    pub fn new(dir: PathBuf, shared: Shared) -> Arc<Tenants> {
        Arc::new(Tenants {
            dir,
            shared,
            live: ArcSwap::from_pointee(Live::default()),
            failed: Mutex::new(BTreeMap::new()),
            changes: tokio::sync::Mutex::new(()),
            wake: tokio::sync::Notify::new(),
            synced: std::sync::atomic::AtomicBool::new(false),
            warned: Mutex::new(Default::default()),
        })
    }

    /// The names of the tenants being served.
    pub fn names(&self) -> Vec<String> {
        self.live.load().tenants.keys().cloned().collect()
    }

    /// A tenant being served.
    pub fn get(&self, name: &str) -> Option<Arc<Tenant>> {
        self.live.load().tenants.get(name).cloned()
    }

    /// Every tenant's state, for shutdown.
    pub fn states(&self) -> Vec<Arc<AppState>> {
        self.live
            .load()
            .tenants
            .values()
            .map(|tenant| tenant.state.clone())
            .collect()
    }

    /// The tenants that did not load, with why.
    pub fn failures(&self) -> Vec<(String, ReloadError)> {
        self.failed_map()
            .iter()
            .map(|(name, failed)| (name.clone(), failed.error.clone()))
            .collect()
    }

    fn failed_map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Failed>> {
        self.failed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Loads every tenant folder (a few at a time), and unloads tenants
    /// whose folder is gone. A tenant that does not load is left out with
    /// its diagnostics (`failures`), and tried again when its files change.
    pub async fn sync(self: &Arc<Self>) {
        let _one_at_a_time = self.changes.lock().await;
        let TenantFolders {
            tenants: folders,
            invalid,
        } = match tenant_dirs(&self.dir) {
            Ok(found) => found,
            Err(error) => {
                tracing::error!(event_type = "tenant", error = %error, "The tenants folder cannot be read");
                return;
            }
        };
        for name in invalid.into_iter().filter(|name| self.warned(name)) {
            tracing::warn!(
                event_type = "tenant",
                folder = %name,
                "Not a tenant name (lower-case letters, digits, `-`, `_`): the folder is skipped"
            );
        }
        let live = self.live.load_full();
        for name in live.tenants.keys() {
            if !folders.iter().any(|(folder, _)| folder == name) {
                self.unload(name);
            }
        }
        self.failed_map()
            .retain(|name, _| folders.iter().any(|(folder, _)| folder == name));
        let pending: Vec<(String, PathBuf)> = folders
            .into_iter()
            .filter(|(name, dir)| {
                !live.tenants.contains_key(name)
                    && self
                        .failed_map()
                        .get(name)
                        .is_none_or(|failed| failed.fingerprint != reload::folder_fingerprint(dir))
            })
            .collect();
        let settle_first = self.synced.swap(true, std::sync::atomic::Ordering::Relaxed);
        let parallel = std::thread::available_parallelism().map_or(2, |n| n.get());
        for batch in pending.chunks(parallel) {
            let prepared = futures_util::future::join_all(batch.iter().map(|(name, dir)| {
                let source = self.source(name, dir);
                let name = name.clone();
                async move {
                    let settled = if settle_first {
                        reload::settle(|| reload::folder_fingerprint(&source.dir)).await
                    } else {
                        reload::folder_fingerprint(&source.dir)
                    };
                    let prepared =
                        tokio::task::spawn_blocking(move || reload::prepare(&source, 1)).await;
                    (name, settled, prepared)
                }
            }))
            .await;
            for (name, fingerprint, prepared) in prepared {
                match prepared {
                    Ok(Ok(prepared)) => {
                        self.start(&name, prepared.deployment);
                        // An edit while it loaded: its reloader takes it.
                        let dir = self.dir.join(TENANTS_DIR).join(&name);
                        if let Some(tenant) = self.get(&name)
                            && reload::folder_fingerprint(&dir) != fingerprint
                        {
                            tenant.reloader.request();
                        }
                    }
                    Ok(Err(error)) => self.failed_to_load(&name, &error, fingerprint),
                    Err(error) => {
                        tracing::error!(event_type = "tenant", tenant = %name, error = %error, "Loading the tenant failed");
                        self.failed_map().insert(
                            name,
                            Failed {
                                error: ReloadError {
                                    at: now(),
                                    message: "loading the project failed; the logs say why"
                                        .to_owned(),
                                    diagnostics: Vec::new(),
                                },
                                fingerprint,
                            },
                        );
                    }
                }
            }
        }
    }

    /// Whether `folder` is warned about for the first time (a folder that
    /// is not a tenant is said once, not at every poll).
    fn warned(&self, folder: &str) -> bool {
        let mut warned = self
            .warned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Bounded: a deployment with more odd folders than this is told
        // about the first ones.
        warned.len() < 1024 && warned.insert(folder.to_owned())
    }

    fn source(&self, name: &str, dir: &Path) -> Source {
        Source {
            dir: dir.to_path_buf(),
            variables: self.shared.variables.clone(),
            environment: self.shared.environment,
            force_mock: self.shared.force_mock,
            tenant: Some(name.to_owned()),
        }
    }

    /// Serves `name` with its first deployment, unless another tenant
    /// already has one of its hosts.
    fn start(self: &Arc<Self>, name: &str, deployment: server::Deployment) {
        let live = self.live.load_full();
        if let Some((host, owner)) = deployment.project.hosts.iter().find_map(|host| {
            live.hosts
                .get(host)
                .filter(|owner| owner.name != name)
                .map(|owner| (host, owner.name.clone()))
        }) {
            let message = format!("host `{host}` belongs to tenant `{owner}`");
            tracing::error!(event_type = "tenant", tenant = %name, "{message}; the tenant is not served");
            self.failed_map().insert(
                name.to_owned(),
                Failed {
                    error: ReloadError {
                        at: now(),
                        message,
                        diagnostics: Vec::new(),
                    },
                    // Retried at every sync: the owner may let the host go.
                    fingerprint: BTreeMap::new(),
                },
            );
            return;
        }
        let shared = &self.shared;
        let state = Arc::new(AppState {
            deployment: ArcSwap::from_pointee(deployment),
            classifier: shared.classifier.clone(),
            sessions: Arc::new(TenantSessions::new(shared.sessions.clone(), name)),
            transport: shared.transport.clone(),
            settings: shared.settings.clone(),
            reload: Mutex::new(server::ReloadStatus {
                last_success_at: Some(now()),
                ..Default::default()
            }),
            admission: Default::default(),
            breakers: Default::default(),
            channels: Default::default(),
            events: Default::default(),
            console: shared.console.then(Default::default),
            tenant: Some(name.to_owned()),
        });
        let dir = self.dir.join(TENANTS_DIR).join(name);
        let reloader = Reloader::new(self.source(name, &dir), state.clone());
        let span = tracing::info_span!("tenant", tenant = %name);
        let reloads = reloader.run_without_watcher(span);
        // A reload may change the tenant's hosts.
        let mut changed = state.events.reloads();
        let tenants = Arc::downgrade(self);
        tokio::spawn(async move {
            while changed.changed().await.is_ok() {
                match tenants.upgrade() {
                    Some(tenants) => tenants.route_hosts(),
                    None => break,
                }
            }
        });
        let tenant = Arc::new(Tenant {
            name: name.to_owned(),
            router: server::app(state.clone()),
            state,
            reloader,
            label: TenantLabel(Arc::from(name)),
            _reloads: reloads,
        });
        self.failed_map().remove(name);
        self.live.rcu(|live| {
            let mut tenants = live.tenants.clone();
            tenants.insert(name.to_owned(), tenant.clone());
            Live {
                hosts: live.hosts.clone(),
                tenants,
            }
        });
        self.route_hosts();
        let deployment = tenant.state.deployment.load();
        tracing::info!(
            event_type = "tenant",
            tenant = %name,
            flows = deployment.project.flows.len(),
            hosts = ?deployment.project.hosts,
            "Tenant loaded"
        );
    }

    fn failed_to_load(
        &self,
        name: &str,
        error: &reload::PrepareError,
        fingerprint: BTreeMap<PathBuf, (u64, Option<SystemTime>)>,
    ) {
        let prefix = Path::new(TENANTS_DIR).join(name);
        let diagnostics: Vec<Diagnostic> = error
            .diagnostics
            .iter()
            .filter(|d| d.is_error())
            .cloned()
            .map(|diagnostic| diagnostic.under(&prefix))
            .collect();
        for diagnostic in &diagnostics {
            tracing::error!(
                event_type = "tenant",
                tenant = %name,
                code = diagnostic.code.as_str(),
                "{}:{}:{}: {}",
                diagnostic.location.file.display(),
                diagnostic.location.line,
                diagnostic.location.column,
                diagnostic.message
            );
        }
        tracing::error!(event_type = "tenant", tenant = %name, "The tenant's project does not load; it is not served until it does");
        self.failed_map().insert(
            name.to_owned(),
            Failed {
                error: ReloadError {
                    at: now(),
                    message: error.summary(),
                    diagnostics,
                },
                fingerprint,
            },
        );
    }

    fn unload(&self, name: &str) {
        let mut removed = None;
        self.live.rcu(|live| {
            let mut tenants = live.tenants.clone();
            removed = tenants.remove(name);
            Live {
                hosts: live.hosts.clone(),
                tenants,
            }
        });
        self.route_hosts();
        if let Some(tenant) = removed {
            // Its event streams end; its requests in flight finish.
            tenant.state.events.close();
            tracing::info!(event_type = "tenant", tenant = %name, "Tenant folder removed: the tenant is no longer served");
        }
    }

    /// Rebuilds where each host name leads, from the live projects. A host
    /// keeps its owner while the owner declares it: a tenant that adds
    /// another's host by a reload does not get its traffic (logged).
    fn route_hosts(&self) {
        self.live.rcu(|live| {
            let mut hosts: HashMap<String, Arc<Tenant>> = HashMap::new();
            let declares = |tenant: &Tenant, host: &str| {
                tenant
                    .state
                    .deployment
                    .load()
                    .project
                    .hosts
                    .iter()
                    .any(|declared| declared == host)
            };
            for (host, owner) in &live.hosts {
                if let Some(current) = live.tenants.get(&owner.name)
                    && Arc::ptr_eq(current, owner)
                    && declares(owner, host)
                {
                    hosts.insert(host.clone(), owner.clone());
                }
            }
            for tenant in live.tenants.values() {
                for host in &tenant.state.deployment.load().project.hosts {
                    match hosts.get(host) {
                        Some(owner) if owner.name != tenant.name => {
                            tracing::warn!(event_type = "tenant", tenant = %tenant.name, host = %host, owner = %owner.name, "Host claimed by two tenants: it stays with its owner");
                        }
                        Some(_) => {}
                        None => {
                            hosts.insert(host.clone(), tenant.clone());
                        }
                    }
                }
            }
            Live {
                tenants: live.tenants.clone(),
                hosts,
            }
        });
    }

    /// Watches the `tenants/` folder until the guard is dropped: an edit
    /// reloads its tenant, a folder added or removed (or a failed tenant's
    /// files changed) makes the set of tenants sync. A poll backs the
    /// watcher up.
    pub fn watch(
        self: &Arc<Self>,
    ) -> Result<SupervisorGuard, notify_debouncer_full::notify::Error> {
        let tenants = Arc::downgrade(self);
        let root = self.dir.join(TENANTS_DIR);
        let events_root = root.clone();
        let mut debouncer = notify_debouncer_full::new_debouncer(
            reload::DEBOUNCE,
            None,
            move |result: notify_debouncer_full::DebounceEventResult| {
                let Some(tenants) = tenants.upgrade() else {
                    return;
                };
                let Ok(events) = result else {
                    tenants.wake.notify_one();
                    return;
                };
                for event in events.iter().filter(|event| !event.kind.is_access()) {
                    for path in &event.paths {
                        let Some(name) = path
                            .strip_prefix(&events_root)
                            .ok()
                            .and_then(|relative| relative.components().next())
                            .map(|first| first.as_os_str().to_string_lossy().into_owned())
                        else {
                            continue;
                        };
                        match tenants.get(&name) {
                            // An edit of a tenant served: its reload alone.
                            Some(tenant) if events_root.join(&name).is_dir() => {
                                if tenant.reloader.is_project_path(path) {
                                    tenant.reloader.request();
                                }
                            }
                            // A folder added or removed, a failed tenant's
                            // edit: the set of tenants syncs.
                            _ => tenants.wake.notify_one(),
                        }
                    }
                }
            },
        )?;
        debouncer.watch(
            &root,
            notify_debouncer_full::notify::RecursiveMode::Recursive,
        )?;
        let tenants = Arc::clone(self);
        let task = tokio::spawn(async move {
            // Owned by the task: dropped (unwatched) when it ends.
            let _debouncer = debouncer;
            let mut poll = tokio::time::interval(reload::POLL_INTERVAL);
            poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = tenants.wake.notified() => {}
                    _ = poll.tick() => {}
                }
                tenants.sync().await;
            }
        });
        Ok(SupervisorGuard { task })
    }
}

/// Stops watching the tenants when dropped.
pub struct SupervisorGuard {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SupervisorGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// The router of a deployment of several tenants.
pub fn router(tenants: Arc<Tenants>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/openapi.json", get(server::openapi_document))
        .fallback(dispatch)
        .with_state(tenants)
}

fn unknown_tenant(detail: String) -> Response {
    ApiError::new(StatusCode::NOT_FOUND, "unknown_tenant", detail).into_response()
}

/// The tenant named `name`, or why there is none to serve.
fn find(tenants: &Tenants, live: &Live, name: &str) -> Result<Arc<Tenant>, Box<ApiError>> {
    if let Some(tenant) = live.tenants.get(name) {
        return Ok(tenant.clone());
    }
    if tenants.failed_map().contains_key(name) {
        return Err(Box::new(ApiError {
            retry_after: Some(server::OVERLOADED_RETRY_AFTER_SECONDS),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "tenant_unavailable",
                format!(
                    "tenant `{name}` is declared but its project does not load; /health says why"
                ),
            )
        }));
    }
    Err(Box::new(ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_tenant",
        format!("there is no tenant `{name}`"),
    )))
}

/// Routes a request to its tenant: by path, `Host`, `X-Tenant`, then the
/// body's `tenant` on `POST /orchestrate`.
async fn dispatch(State(tenants): State<Arc<Tenants>>, mut request: Request) -> Response {
    let live = tenants.live.load_full();
    if let Some(rest) = request.uri().path().strip_prefix("/t/") {
        let (name, tail) = match rest.find('/') {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, "/"),
        };
        let tenant = match find(&tenants, &live, name) {
            Ok(tenant) => tenant,
            Err(error) => return error.into_response(),
        };
        // The process's metrics hold every tenant's: the root's rule.
        if tail == "/metrics" {
            return metrics_text(State(tenants.clone()), request.headers().clone()).await;
        }
        let uri = match request.uri().query() {
            Some(query) => format!("{tail}?{query}"),
            None => tail.to_owned(),
        };
        match uri.parse::<Uri>() {
            Ok(uri) => *request.uri_mut() = uri,
            Err(_) => return unknown_tenant("the path is not valid".to_owned()),
        }
        return forward(&live, &tenant, request).await;
    }
    if let Some(tenant) = request
        .headers()
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
        .map(|host| server::console::host_name(host).to_ascii_lowercase())
        .and_then(|host| live.hosts.get(&host).cloned())
    {
        return forward(&live, &tenant, request).await;
    }
    if let Some(name) = request.headers().get("x-tenant") {
        let name = name.to_str().unwrap_or_default().trim().to_owned();
        return match find(&tenants, &live, &name) {
            Ok(tenant) => forward(&live, &tenant, request).await,
            Err(error) => error.into_response(),
        };
    }
    if request.method() == Method::POST && request.uri().path() == "/orchestrate" {
        let (parts, body) = request.into_parts();
        let deadline = tokio::time::Instant::now() + tenants.shared.settings.request_timeout;
        let bytes = match server::read_body(body, deadline).await {
            Ok(bytes) => bytes,
            Err(error) => return error.into_response(),
        };
        #[derive(serde::Deserialize)]
        struct Named {
            tenant: Option<String>,
        }
        if let Ok(Named { tenant: Some(name) }) = serde_json::from_slice::<Named>(&bytes) {
            return match find(&tenants, &live, &name) {
                Ok(tenant) => {
                    forward(
                        &live,
                        &tenant,
                        Request::from_parts(parts, Body::from(bytes)),
                    )
                    .await
                }
                Err(error) => error.into_response(),
            };
        }
    }
    unknown_tenant(
        "no tenant is named: use /t/{tenant}/…, a tenant's host, the `X-Tenant` header or the body's `tenant`".to_owned(),
    )
}

/// Runs `request` on `tenant`. A 401 for a key another tenant declares
/// becomes 403: keys belong to their tenant.
async fn forward(live: &Live, tenant: &Tenant, mut request: Request) -> Response {
    request.extensions_mut().insert(tenant.label.clone());
    let mut credentials = HeaderMap::new();
    for name in [
        header::AUTHORIZATION,
        header::HeaderName::from_static("x-api-key"),
    ] {
        if let Some(value) = request.headers().get(&name) {
            credentials.insert(name, value.clone());
        }
    }
    let mut router = tenant.router.clone();
    let response = match router.call(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    if response.status() != StatusCode::UNAUTHORIZED {
        return response;
    }
    let Some(key) = crate::admission::presented_key(&credentials) else {
        return response;
    };
    let owner = live.tenants.values().find(|other| {
        other.name != tenant.name
            && other
                .state
                .deployment
                .load()
                .project
                .access
                .authenticate(key)
                .is_some()
    });
    match owner {
        Some(_) => ApiError::forbidden(format!(
            "this caller key belongs to another tenant, not to `{}`",
            tenant.name
        ))
        .into_response(),
        None => response,
    }
}

/// `GET /health`: every tenant, served or not, with its reload status.
async fn health(State(tenants): State<Arc<Tenants>>) -> Response {
    let live = tenants.live.load_full();
    let mut by_name = serde_json::Map::new();
    let mut status = if live.tenants.is_empty() {
        "degraded"
    } else {
        "ok"
    };
    // The store is shared: asked once, not once per tenant.
    let store = tenants.shared.sessions.health().await;
    for (name, tenant) in &live.tenants {
        let health = server::health_json_with(&tenant.state, store.clone());
        if health["status"] != "ok" {
            status = "degraded";
        }
        by_name.insert(name.clone(), health);
    }
    for (name, error) in tenants.failures() {
        status = "degraded";
        by_name.insert(
            name,
            json!({
                "status": "failed",
                "reload": { "generation": Json::Null, "last_error": error },
            }),
        );
    }
    let body = json!({
        "status": status,
        "version": env!("CARGO_PKG_VERSION"),
        "environment": tenants.shared.environment.as_str(),
        "tenants": by_name,
    });
    let mut response = axum::Json(body).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `GET /metrics`: the process's metrics, which hold every tenant's. Open
/// unless a tenant declares a `metrics_key`; then only a key every such
/// tenant declares opens it (the deployment's, e.g. one `METRICS_API_KEY`),
/// so no tenant's own key reads another's metrics.
async fn metrics_text(State(tenants): State<Arc<Tenants>>, headers: HeaderMap) -> Response {
    let live = tenants.live.load_full();
    let keys: Vec<Arc<server::Deployment>> = live
        .tenants
        .values()
        .map(|tenant| tenant.state.deployment.load_full())
        .filter(|deployment| deployment.project.access.metrics_key.is_some())
        .collect();
    if !keys.is_empty()
        && !keys.iter().any(|deployment| {
            crate::admission::metrics_allowed(&deployment.project.access, &headers)
        })
    {
        return ApiError::unauthorized().into_response();
    }
    if let Some(count) = tenants.shared.sessions.session_count() {
        metrics::gauge!(crate::telemetry::prometheus::SESSIONS).set(count as f64);
    }
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        crate::telemetry::prometheus::render(),
    )
        .into_response()
}

/// Ends every tenant's long-lived streams (shutdown).
pub fn close(tenants: &Tenants) {
    for state in tenants.states() {
        state.events.close();
    }
}

/// Serves the deployment until `shutdown`, as `server::serve` serves one
/// project.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tenants: Arc<Tenants>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let settings = tenants.shared.settings.connections;
    let closing = tenants.clone();
    let shutdown = async move {
        shutdown.await;
        close(&closing);
    }
    .instrument(tracing::Span::current());
    server::serve_router(listener, router(tenants), settings, shutdown, grace).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_names_are_path_segments_and_prefixes() {
        assert!(is_tenant_name("brand-a"));
        assert!(is_tenant_name("sushi_2"));
        assert!(!is_tenant_name("Brand"));
        assert!(!is_tenant_name("-a"));
        assert!(!is_tenant_name("a:b"));
        assert!(!is_tenant_name(""));
        assert!(!is_tenant_name(&"a".repeat(64)));
    }
}
