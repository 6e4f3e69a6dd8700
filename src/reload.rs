//! Loading a deployment, at start-up and on every change: one path.
//!
//! `prepare` is the whole way from a project directory to a `Deployment`
//! (load → check → compile → production rules → service modes). Start-up
//! calls it once; the reloader calls it whenever the project's files change
//! (file watcher, a poll as safety net, SIGHUP). Only a clean result replaces
//! the live deployment, in one atomic swap; a broken edit keeps the last good
//! project serving and shows in `/health` and the logs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use notify_debouncer_full::notify::RecursiveMode;
use tokio::sync::Notify;

use crate::check::{Checked, check_project};
use crate::diagnostic::{Code, Diagnostic, Severity, Sources};
use crate::load::{self, FLOWS_DIR, SCHEMAS_DIR};
use crate::server::{AppState, Deployment, Environment, MissingServiceUrl, ReloadError, deploy};

/// How quickly a burst of saves becomes one reload.
pub const DEBOUNCE: Duration = Duration::from_millis(50);
/// How often file metadata is compared, to catch what the watcher missed
/// (a folder replaced whole, a symlink swapped under a ConfigMap mount).
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// What a deployment is made from; fixed for the life of the process.
#[derive(Debug, Clone)]
pub struct Source {
    pub dir: PathBuf,
    /// The environment as it was at start-up: a reload sees the same
    /// `${VAR}` values (changing a variable needs a restart).
    pub variables: load::Environment,
    pub environment: Environment,
    pub force_mock: bool,
    /// The tenant this project is, when the process serves several.
    pub tenant: Option<String>,
}

/// Why a project cannot be deployed.
#[derive(Debug)]
pub struct PrepareError {
    pub diagnostics: Vec<Diagnostic>,
    pub sources: Sources,
}

impl PrepareError {
    pub fn summary(&self) -> String {
        let errors = self.diagnostics.iter().filter(|d| d.is_error()).count();
        format!(
            "the project has {errors} error{}",
            if errors == 1 { "" } else { "s" }
        )
    }
}

/// A deployment ready to go live, and the warnings about its project.
#[derive(Debug)]
pub struct Prepared {
    pub deployment: Deployment,
    pub warnings: Vec<Diagnostic>,
    pub sources: Sources,
}

/// Load → check → compile → production rules → service modes.
pub fn prepare(source: &Source, generation: u64) -> Result<Prepared, PrepareError> {
    let Checked {
        project,
        mut diagnostics,
        sources,
    } = check_project(&source.dir, &source.variables);
    let production = source.environment == Environment::Production;
    if production {
        // In production an unset variable is an error, not a warning.
        for diagnostic in &mut diagnostics {
            if diagnostic.code == Code::UnsetEnvVar {
                diagnostic.severity = Severity::Error;
            }
        }
    }
    // A project that compiled had no error of its own: what production
    // made errors (unset variables, disabled channels) is reported below
    // together with the other production rules.
    let mut project = match project {
        Some(project) => project,
        None => {
            return Err(PrepareError {
                diagnostics,
                sources,
            });
        }
    };
    // Production rules about the environment, all reported at once: unset
    // variables and channel secrets, caller keys without a value, services
    // without a URL.
    diagnostics.extend(
        project
            .access
            .unset_keys
            .iter()
            .map(|key| unset_key_diagnostic(key, production)),
    );
    if let Some(tenant) = &source.tenant {
        let tenant: Arc<str> = Arc::from(tenant.as_str());
        for service in &mut project.services {
            service.tenant = Some(tenant.clone());
        }
    }
    let deployed = deploy(project, source.environment, source.force_mock, generation);
    if let Err(missing) = &deployed {
        diagnostics.extend(missing.iter().map(missing_url_diagnostic));
    }
    match deployed {
        Ok(deployment) if !diagnostics.iter().any(Diagnostic::is_error) => Ok(Prepared {
            deployment,
            warnings: diagnostics,
            sources,
        }),
        _ => Err(PrepareError {
            diagnostics,
            sources,
        }),
    }
}

/// A caller key declared without a value: left out in development (a
/// warning), an error in production.
fn unset_key_diagnostic(key: &crate::project::UnsetCallerKey, production: bool) -> Diagnostic {
    let message = match &key.variable {
        Some(variable) => format!(
            "caller key `{}` has no value: `{variable}` is not set",
            key.name
        ),
        None => format!("caller key `{}` has no value", key.name),
    };
    let location = crate::diagnostic::Location::file(FLOWS_DIR);
    let diagnostic = if production {
        Diagnostic::error(Code::UnsetEnvVar, location, message)
    } else {
        Diagnostic::warning(Code::UnsetEnvVar, location, message)
    };
    diagnostic.with_hint(
        "outside production the key is left out; in production every declared key needs its value",
    )
}

fn missing_url_diagnostic(missing: &MissingServiceUrl) -> Diagnostic {
    Diagnostic::error(
        Code::InvalidUrl,
        crate::diagnostic::Location::file(FLOWS_DIR),
        missing.to_string(),
    )
    .with_hint("in production every service needs its URL; outside production a service with a `mock` runs on it")
}

/// Reloads the live deployment of `state` from `source`.
pub struct Reloader {
    source: Source,
    state: Arc<AppState>,
    /// Wakes the reload task; a permit taken while a reload runs makes one
    /// more reload afterwards, so bursts coalesce and nothing queues up.
    trigger: Notify,
}

/// The result of one reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A new generation is live.
    Swapped { generation: u64 },
    /// The files produce the project already live.
    Unchanged,
    /// The project has errors; the last good one keeps serving.
    Failed,
}

impl Reloader {
    pub fn new(source: Source, state: Arc<AppState>) -> Arc<Reloader> {
        Arc::new(Reloader {
            source,
            state,
            trigger: Notify::new(),
        })
    }

    /// Asks for a reload soon (from the watcher, a poll or SIGHUP).
    pub fn request(&self) {
        self.trigger.notify_one();
    }

    /// Runs one reload now, on the calling thread (it reads files and
    /// compiles; call it from a blocking context).
    pub fn reload_now(&self) -> Outcome {
        self.record(|status| status.attempts += 1);
        let started = Instant::now();
        let current = self.state.deployment.load_full();
        let next_generation = current.generation + 1;
        let result = prepare(&self.source, next_generation);
        let elapsed = started.elapsed();
        let tenant = self.state.tenant.as_deref();
        let labelled =
            |labels: Vec<metrics::Label>| crate::telemetry::prometheus::with_tenant(tenant, labels);
        metrics::histogram!("mcp_reload_duration_seconds", labelled(Vec::new()))
            .record(elapsed.as_secs_f64());
        let now = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        match result {
            Ok(Prepared { deployment, .. }) => {
                if deployment.project.content_hash == current.project.content_hash {
                    metrics::counter!(
                        "mcp_reloads_total",
                        labelled(vec![metrics::Label::new("outcome", "unchanged")])
                    )
                    .increment(1);
                    self.record(|status| {
                        status.last_error = None;
                    });
                    return Outcome::Unchanged;
                }
                let flows = deployment.project.flows.len();
                let hash = deployment.project.content_hash.clone();
                self.state.deployment.store(Arc::new(deployment));
                metrics::counter!(
                    "mcp_reloads_total",
                    labelled(vec![metrics::Label::new("outcome", "success")])
                )
                .increment(1);
                metrics::gauge!("mcp_project_generation", labelled(Vec::new()))
                    .set(next_generation as f64);
                self.record(|status| {
                    status.last_success_at = Some(now.clone());
                    status.last_error = None;
                });
                tracing::info!(
                    event_type = "reload",
                    outcome = "success",
                    generation = next_generation,
                    content_hash = %hash,
                    flows,
                    duration_ms = elapsed.as_secs_f64() * 1000.0,
                    "Project reloaded"
                );
                Outcome::Swapped {
                    generation: next_generation,
                }
            }
            Err(error) => {
                metrics::counter!(
                    "mcp_reloads_total",
                    labelled(vec![metrics::Label::new("outcome", "error")])
                )
                .increment(1);
                for diagnostic in error.diagnostics.iter().filter(|d| d.is_error()) {
                    tracing::error!(
                        event_type = "reload",
                        code = diagnostic.code.as_str(),
                        file = %diagnostic.location.file.display(),
                        line = diagnostic.location.line,
                        column = diagnostic.location.column,
                        hint = diagnostic.hint.as_deref().unwrap_or(""),
                        "{}:{}:{}: {}",
                        diagnostic.location.file.display(),
                        diagnostic.location.line,
                        diagnostic.location.column,
                        diagnostic.message
                    );
                }
                tracing::error!(
                    event_type = "reload",
                    outcome = "error",
                    generation = current.generation,
                    duration_ms = elapsed.as_secs_f64() * 1000.0,
                    "Reload failed; the last good project keeps serving"
                );
                let message = error.summary();
                let diagnostics: Vec<Diagnostic> = error
                    .diagnostics
                    .into_iter()
                    .filter(|d| d.is_error())
                    .collect();
                self.record(|status| {
                    status.last_error = Some(ReloadError {
                        at: now.clone(),
                        message: message.clone(),
                        diagnostics: diagnostics.clone(),
                    });
                });
                Outcome::Failed
            }
        }
    }

    fn record(&self, change: impl FnOnce(&mut crate::server::ReloadStatus)) {
        let mut status = self
            .state
            .reload
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        change(&mut status);
        drop(status);
        self.state.events.reloaded();
    }

    /// Watches the project and reloads on changes until the returned guard
    /// is dropped. Needs a Tokio runtime.
    pub fn watch(self: &Arc<Self>) -> Result<WatchGuard, notify_debouncer_full::notify::Error> {
        let reloader = Arc::clone(self);
        let mut debouncer = notify_debouncer_full::new_debouncer(
            DEBOUNCE,
            None,
            move |result: notify_debouncer_full::DebounceEventResult| match result {
                Ok(events) => {
                    // Reading a file is not a change: a reload reads every
                    // file, and reacting to its own reads would loop.
                    let relevant = events.iter().any(|event| {
                        !event.kind.is_access()
                            && event
                                .paths
                                .iter()
                                .any(|path| reloader.is_project_path(path))
                    });
                    if relevant {
                        reloader.request();
                    }
                }
                Err(errors) => {
                    for error in errors {
                        tracing::warn!(event_type = "reload", error = %error, "File watcher error");
                    }
                    reloader.request();
                }
            },
        )?;
        // The project directory itself (not recursive: it may be a whole
        // repository) and the folders that hold the project, recursively.
        debouncer.watch(&self.source.dir, RecursiveMode::NonRecursive)?;
        for folder in self.watched_folders() {
            if folder.is_dir() {
                debouncer.watch(&folder, RecursiveMode::Recursive)?;
            }
        }
        let reloader = Arc::clone(self);
        let task = tokio::spawn(async move { reloader.run(Some(debouncer)).await });
        Ok(WatchGuard { task })
    }

    /// Reloads when asked (`request`: a watcher of several projects, a
    /// signal) and when a poll sees the files change, until the returned
    /// guard is dropped. Needs a Tokio runtime.
    /// Its log lines are in `span` (a tenant's).
    pub fn run_without_watcher(self: &Arc<Self>, span: tracing::Span) -> WatchGuard {
        use tracing::Instrument;
        let reloader = Arc::clone(self);
        let task = tokio::spawn(
            async move {
                reloader
                    .run::<notify_debouncer_full::notify::RecommendedWatcher, notify_debouncer_full::RecommendedCache>(None)
                    .await
            }
            .instrument(span),
        );
        WatchGuard { task }
    }

    fn watched_folders(&self) -> Vec<PathBuf> {
        let mut folders: Vec<PathBuf> = vec![
            self.source.dir.join(FLOWS_DIR),
            self.source.dir.join(SCHEMAS_DIR),
        ];
        let project = self.state.deployment.load_full();
        for file in &project.project.source_files {
            if let Some(first) = file.components().next() {
                let folder = self.source.dir.join(first.as_os_str());
                if folder.is_dir() && !folders.contains(&folder) {
                    folders.push(folder);
                }
            }
        }
        folders
    }

    /// Whether a changed path can affect the project: not a conversation
    /// test, not an editor's swap or backup file.
    pub fn is_project_path(&self, path: &Path) -> bool {
        let relative = path.strip_prefix(&self.source.dir).unwrap_or(path);
        let tests = Path::new(FLOWS_DIR).join(load::TESTS_DIR);
        if relative.starts_with(&tests) {
            return false;
        }
        let name = relative
            .file_name()
            .map(|name| name.to_string_lossy())
            .unwrap_or_default();
        !(name.ends_with(".swp")
            || name.ends_with(".swx")
            || name.ends_with('~')
            || name.starts_with(".#"))
    }

    async fn run<W, C>(
        self: Arc<Self>,
        mut debouncer: Option<notify_debouncer_full::Debouncer<W, C>>,
    ) where
        W: notify_debouncer_full::notify::Watcher,
        C: notify_debouncer_full::FileIdCache,
    {
        let mut fingerprint = self.fingerprint();
        let mut folders = self.watched_folders_identity();
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.trigger.notified() => {}
                _ = poll.tick() => {
                    let now = self.fingerprint();
                    if now == fingerprint {
                        continue;
                    }
                }
            }
            // Wait until the files stop changing, so a save caught half-way
            // (truncated, not yet written) is never loaded.
            let settled = self.settle().await;
            let reloader = Arc::clone(&self);
            let span = tracing::Span::current();
            match tokio::task::spawn_blocking(move || span.in_scope(|| reloader.reload_now())).await
            {
                Ok(_) => {}
                Err(error) => {
                    tracing::error!(event_type = "reload", error = %error, "Reload task failed")
                }
            }
            fingerprint = self.fingerprint();
            if fingerprint != settled {
                // Changed while it was loading: once more.
                self.request();
            }
            // A folder replaced whole (git checkout, a ConfigMap swap) has a
            // new identity: watch the new one.
            let now = self.watched_folders_identity();
            if let Some(debouncer) = debouncer.as_mut()
                && now != folders
            {
                for (folder, _) in &folders {
                    let _ = debouncer.unwatch(folder);
                }
                let _ = debouncer.unwatch(&self.source.dir);
                let _ = debouncer.watch(&self.source.dir, RecursiveMode::NonRecursive);
                for (folder, _) in &now {
                    if let Err(error) = debouncer.watch(folder, RecursiveMode::Recursive) {
                        tracing::warn!(event_type = "reload", folder = %folder.display(), error = %error, "Cannot watch folder");
                    }
                }
            }
            folders = now;
        }
    }

    /// The fingerprint once it has stayed the same for `DEBOUNCE` (or after
    /// a bounded number of tries, for files that never stop changing).
    async fn settle(&self) -> BTreeMap<PathBuf, (u64, Option<SystemTime>)> {
        settle(|| self.fingerprint()).await
    }

    fn watched_folders_identity(&self) -> Vec<(PathBuf, Option<(u64, u64)>)> {
        self.watched_folders()
            .into_iter()
            .map(|folder| {
                let identity = std::fs::metadata(&folder)
                    .ok()
                    .map(|metadata| identity_of(&metadata));
                (folder, identity)
            })
            .collect()
    }

    /// Size and modification time of every file under the watched folders
    /// (following symlinks): cheap, and changes with any save.
    fn fingerprint(&self) -> BTreeMap<PathBuf, (u64, Option<SystemTime>)> {
        let mut out = BTreeMap::new();
        for folder in self.watched_folders() {
            collect_metadata(&folder, 0, &mut out);
        }
        out
    }
}

#[cfg(unix)]
fn identity_of(metadata: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (metadata.dev(), metadata.ino())
}

#[cfg(not(unix))]
fn identity_of(metadata: &std::fs::Metadata) -> (u64, u64) {
    (0, metadata.len())
}

const MAX_FINGERPRINT_DEPTH: usize = 16;

/// The fingerprint once it has stayed the same for `DEBOUNCE` (or after a
/// bounded number of tries, for files that never stop changing): files
/// being saved or a folder being copied in are never read half-way.
pub async fn settle(
    fingerprint: impl Fn() -> BTreeMap<PathBuf, (u64, Option<SystemTime>)>,
) -> BTreeMap<PathBuf, (u64, Option<SystemTime>)> {
    const MAX_TRIES: usize = 20;
    let mut before = fingerprint();
    for _ in 0..MAX_TRIES {
        tokio::time::sleep(DEBOUNCE).await;
        let now = fingerprint();
        if now == before {
            return now;
        }
        before = now;
    }
    before
}

/// Size and modification time of every file under `dir`.
pub fn folder_fingerprint(dir: &Path) -> BTreeMap<PathBuf, (u64, Option<SystemTime>)> {
    let mut out = BTreeMap::new();
    collect_metadata(dir, 0, &mut out);
    out
}

fn collect_metadata(
    path: &Path,
    depth: usize,
    out: &mut BTreeMap<PathBuf, (u64, Option<SystemTime>)>,
) {
    if depth > MAX_FINGERPRINT_DEPTH {
        return;
    }
    let Ok(entries) = std::fs::read_dir(path) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(metadata) = std::fs::metadata(&path) else {
            continue;
        };
        if metadata.is_dir() {
            collect_metadata(&path, depth + 1, out);
        } else {
            out.insert(path, (metadata.len(), metadata.modified().ok()));
        }
    }
}

/// Stops the watcher when dropped.
pub struct WatchGuard {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reloads on SIGHUP until the task is aborted.
#[cfg(unix)]
pub fn reload_on_sighup(reloader: Arc<Reloader>) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            tracing::info!(event_type = "reload", "SIGHUP: reloading");
            reloader.request();
        }
    }))
}
