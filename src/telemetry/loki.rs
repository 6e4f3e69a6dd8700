//! Shipping log lines to Grafana Loki, in bounded memory.
//!
//! Two halves joined by a fixed-capacity channel:
//!
//! - `LokiSender`, held by the logging layer: `push` reserves room for the
//!   line in the buffer (a count of lines and of bytes, both capped) and
//!   `try_send`s it. When there is no room the line is dropped and counted;
//!   it never waits and never allocates beyond the line itself.
//! - `LokiWorker`, a background task: it gathers lines into a batch (by
//!   count, size and age), encodes the batch as Loki's JSON push body and
//!   POSTs it with the process's HTTP client. A failed push is retried with
//!   exponential backoff and jitter, a bounded number of times; meanwhile the
//!   worker reads no new lines, so the buffer fills and new lines are dropped
//!   at the sender. A line leaves the buffer's count only once it is pushed
//!   or dropped, so the count covers every line held in memory.
//!
//! On shutdown (`LokiHandle::shutdown`) the worker stops retrying, pushes
//! what it holds once more within a deadline, and drops the rest.
//!
//! Labels are few-valued: `app`, `env`, `level`, `service_type`. Everything
//! else (trace and session ids, event types, payloads) is in the JSON line;
//! the trace and session ids are also sent as structured metadata, unless
//! Loki refuses it.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde::ser::SerializeSeq;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::Level;

/// Path of Loki's push API.
pub const PUSH_PATH: &str = "/loki/api/v1/push";

/// Target of this module's own events: they go to stderr, never to Loki
/// (a failing push would otherwise log into the buffer it cannot empty).
pub const LOG_TARGET: &str = module_path!();

/// `service_type` label of lines that are not about one service.
pub const DEFAULT_SERVICE_TYPE: &str = "orchestrator";

pub use crate::project::Secret;

/// How pushes authenticate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LokiAuth {
    None,
    /// Grafana Cloud: the instance id as user, an access token as password.
    Basic {
        username: String,
        token: Secret,
    },
    /// A token without a user name.
    Bearer(Secret),
}

/// Limits that bound what the shipping holds and how it retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LokiLimits {
    /// Most lines held (buffer + batch being pushed).
    pub buffer_lines: usize,
    /// Most bytes of lines held.
    pub buffer_bytes: usize,
    /// A longer line is dropped (Loki refuses long lines too).
    pub line_bytes: usize,
    /// A batch is pushed when it has this many lines...
    pub batch_lines: usize,
    /// ...or this many bytes...
    pub batch_bytes: usize,
    /// ...or when its first line is this old.
    pub batch_age: Duration,
    /// Time allowed for one push.
    pub push_timeout: Duration,
    /// First wait after a failed push; doubled each time up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// Pushes of one batch before its lines are dropped.
    pub max_attempts: u32,
    /// Time the shutdown flush may take.
    pub flush_deadline: Duration,
}

impl Default for LokiLimits {
    fn default() -> Self {
        LokiLimits {
            buffer_lines: 10_000,
            buffer_bytes: 16 * 1024 * 1024,
            line_bytes: 64 * 1024,
            batch_lines: 1_000,
            batch_bytes: 1024 * 1024,
            batch_age: Duration::from_secs(1),
            push_timeout: Duration::from_secs(10),
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            max_attempts: 5,
            flush_deadline: Duration::from_secs(5),
        }
    }
}

/// Where and how to ship logs.
#[derive(Debug, Clone)]
pub struct LokiConfig {
    /// The full push URL, without user info.
    pub push_url: url::Url,
    pub auth: LokiAuth,
    /// The `app` label (`MCP_APP_LABEL`).
    pub app: String,
    /// The `env` label (`MCP_ENV`).
    pub env: String,
    pub limits: LokiLimits,
}

impl LokiConfig {
    /// `url` is a base URL (`https://logs-prod-012.grafana.net`) or the full
    /// push URL. Credentials written in the URL are moved to `auth` unless
    /// `username` / `token` are given.
    pub fn new(
        url: &str,
        username: Option<String>,
        token: Option<String>,
        app: String,
        env: String,
    ) -> Result<LokiConfig, String> {
        let (push_url, in_url) = push_url(url)?;
        let (url_user, url_password) = in_url.unzip();
        let username = username.filter(|u| !u.is_empty()).or(url_user);
        let token = token.filter(|t| !t.is_empty()).or(url_password);
        let auth = match (username, token) {
            (Some(username), Some(token)) => LokiAuth::Basic {
                username,
                token: Secret::new(token),
            },
            (None, Some(token)) => LokiAuth::Bearer(Secret::new(token)),
            (Some(_), None) => {
                return Err("GRAFANA_LOKI_USERNAME is set without GRAFANA_LOKI_API_TOKEN".into());
            }
            (None, None) => LokiAuth::None,
        };
        Ok(LokiConfig {
            push_url,
            auth,
            app,
            env,
            limits: LokiLimits::default(),
        })
    }

    /// The URL without its path, for a start-up log line.
    pub fn origin(&self) -> String {
        self.push_url.origin().ascii_serialization()
    }
}

/// The push URL for a base or full URL, and the user name and password
/// written in it (removed from the URL).
pub fn push_url(text: &str) -> Result<(url::Url, Option<(String, String)>), String> {
    let mut url = url::Url::parse(text.trim())
        .map_err(|error| format!("GRAFANA_LOKI_URL is not a URL: {error}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("GRAFANA_LOKI_URL must be an http or https URL".into());
    }
    let credentials = (!url.username().is_empty()).then(|| {
        (
            percent_decode(url.username()),
            percent_decode(url.password().unwrap_or("")),
        )
    });
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.set_query(None);
    url.set_fragment(None);
    let path = url.path().trim_end_matches('/').to_owned();
    let path = if path.ends_with(PUSH_PATH) {
        path
    } else if let Some(base) = path.strip_suffix("/loki/api/v1") {
        format!("{base}{PUSH_PATH}")
    } else {
        format!("{path}{PUSH_PATH}")
    };
    url.set_path(&path);
    Ok((url, credentials))
}

/// `%XX` escapes decoded (user info in a URL is percent-encoded).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let hex = |offset: usize| {
            bytes
                .get(index + offset)
                .and_then(|b| (*b as char).to_digit(16))
        };
        match (bytes[index], hex(1), hex(2)) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                index += 3;
            }
            (byte, _, _) => {
                out.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One line for Loki.
#[derive(Debug, Clone)]
pub struct LokiEntry {
    /// Nanoseconds since the Unix epoch.
    pub timestamp_ns: u128,
    pub level: Level,
    /// The `service_type` label; `DEFAULT_SERVICE_TYPE` when `None`.
    pub service_type: Option<String>,
    /// The JSON line.
    pub line: String,
    /// Structured metadata (trace and session ids).
    pub metadata: Vec<(&'static str, String)>,
}

impl LokiEntry {
    /// Bytes this entry holds, as counted against the buffer.
    fn size(&self) -> usize {
        const OVERHEAD: usize = 64;
        self.line.len()
            + self.service_type.as_ref().map_or(0, String::len)
            + self
                .metadata
                .iter()
                .map(|(_, v)| v.len() + 16)
                .sum::<usize>()
            + OVERHEAD
    }
}

/// Why a line was not pushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The buffer was full (Loki slow or down).
    BufferFull,
    /// The line alone is longer than `line_bytes`.
    TooLarge,
    /// Every push of its batch failed.
    PushFailed,
    /// Loki refused its batch (4xx other than 429).
    Rejected,
    /// Still held when the shutdown deadline passed.
    Shutdown,
}

impl DropReason {
    pub const ALL: [DropReason; 5] = [
        DropReason::BufferFull,
        DropReason::TooLarge,
        DropReason::PushFailed,
        DropReason::Rejected,
        DropReason::Shutdown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::BufferFull => "buffer_full",
            DropReason::TooLarge => "too_large",
            DropReason::PushFailed => "push_failed",
            DropReason::Rejected => "rejected",
            DropReason::Shutdown => "shutdown",
        }
    }
}

/// Counts of the shipping, for tests and `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LokiStats {
    /// Lines held now (buffer + batch).
    pub held_lines: usize,
    pub held_bytes: usize,
    /// The most lines and bytes ever held at once.
    pub peak_lines: usize,
    pub peak_bytes: usize,
    pub sent: u64,
    pub dropped: u64,
    pub failed_pushes: u64,
}

#[derive(Debug, Default)]
struct Counts {
    held_lines: AtomicUsize,
    held_bytes: AtomicUsize,
    peak_lines: AtomicUsize,
    peak_bytes: AtomicUsize,
    sent: AtomicU64,
    dropped: AtomicU64,
    failed_pushes: AtomicU64,
}

/// Log lines pushed to Loki.
pub const LINES_SENT_TOTAL: &str = "mcp_loki_lines_sent_total";
/// Log lines not pushed to Loki, by `reason` (`DropReason`).
pub const LINES_DROPPED_TOTAL: &str = "mcp_loki_lines_dropped_total";
/// Log lines waiting for Loki (buffer and batch).
pub const BUFFER_LINES: &str = "mcp_loki_buffer_lines";
/// Pushes to Loki, by `outcome` (`success`, `error`).
pub const PUSHES_TOTAL: &str = "mcp_loki_pushes_total";

/// Describes the Loki metrics and registers them at zero, so they show from
/// the start, whether or not logs go to Loki. Called once, by
/// `prometheus::install`.
pub(super) fn describe_metrics() {
    metrics::describe_counter!(LINES_SENT_TOTAL, "Log lines pushed to Loki");
    metrics::describe_counter!(
        LINES_DROPPED_TOTAL,
        "Log lines not pushed to Loki, by reason"
    );
    metrics::describe_gauge!(BUFFER_LINES, "Log lines waiting to be pushed to Loki");
    metrics::describe_counter!(PUSHES_TOTAL, "Pushes to Loki, by outcome");

    metrics::counter!(LINES_SENT_TOTAL).increment(0);
    for reason in DropReason::ALL {
        metrics::counter!(LINES_DROPPED_TOTAL, "reason" => reason.as_str()).increment(0);
    }
    for outcome in ["success", "error"] {
        metrics::counter!(PUSHES_TOTAL, "outcome" => outcome).increment(0);
    }
    metrics::gauge!(BUFFER_LINES).set(0.0);
}

/// Handles of the metrics, taken once (recording through a handle is an
/// atomic add, no lookup).
struct Metrics {
    sent: metrics::Counter,
    dropped: [metrics::Counter; 5],
    pushes_ok: metrics::Counter,
    pushes_error: metrics::Counter,
    buffer: metrics::Gauge,
}

impl Metrics {
    fn new() -> Metrics {
        Metrics {
            sent: metrics::counter!(LINES_SENT_TOTAL),
            dropped: DropReason::ALL
                .map(|reason| metrics::counter!(LINES_DROPPED_TOTAL, "reason" => reason.as_str())),
            pushes_ok: metrics::counter!(PUSHES_TOTAL, "outcome" => "success"),
            pushes_error: metrics::counter!(PUSHES_TOTAL, "outcome" => "error"),
            buffer: metrics::gauge!(BUFFER_LINES),
        }
    }
}

/// What both halves share.
struct Shared {
    limits: LokiLimits,
    counts: Counts,
    metrics: Metrics,
}

impl Shared {
    fn drop_lines(&self, lines: usize, reason: DropReason) {
        self.counts
            .dropped
            .fetch_add(lines as u64, Ordering::Relaxed);
        let index = DropReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.metrics.dropped[index].increment(lines as u64);
    }

    /// Lines leave the buffer's count (pushed or dropped).
    fn release(&self, lines: usize, bytes: usize) {
        let held = self
            .counts
            .held_lines
            .fetch_sub(lines, Ordering::AcqRel)
            .saturating_sub(lines);
        self.counts.held_bytes.fetch_sub(bytes, Ordering::AcqRel);
        self.metrics.buffer.set(held as f64);
    }

    fn stats(&self) -> LokiStats {
        let counts = &self.counts;
        LokiStats {
            held_lines: counts.held_lines.load(Ordering::Acquire),
            held_bytes: counts.held_bytes.load(Ordering::Acquire),
            peak_lines: counts.peak_lines.load(Ordering::Acquire),
            peak_bytes: counts.peak_bytes.load(Ordering::Acquire),
            sent: counts.sent.load(Ordering::Acquire),
            dropped: counts.dropped.load(Ordering::Acquire),
            failed_pushes: counts.failed_pushes.load(Ordering::Acquire),
        }
    }
}

/// The logging side: puts lines into the buffer, or drops them.
#[derive(Clone)]
pub struct LokiSender {
    queue: mpsc::Sender<LokiEntry>,
    shared: Arc<Shared>,
}

impl LokiSender {
    /// Puts `entry` into the buffer if there is room; drops and counts it
    /// otherwise. Never waits. Returns whether it was kept.
    pub fn push(&self, entry: LokiEntry) -> bool {
        let shared = &*self.shared;
        let limits = &shared.limits;
        let size = entry.size();
        if entry.line.len() > limits.line_bytes {
            shared.drop_lines(1, DropReason::TooLarge);
            return false;
        }
        let counts = &shared.counts;
        let lines = counts.held_lines.fetch_add(1, Ordering::AcqRel) + 1;
        let bytes = counts.held_bytes.fetch_add(size, Ordering::AcqRel) + size;
        if lines > limits.buffer_lines || bytes > limits.buffer_bytes {
            counts.held_lines.fetch_sub(1, Ordering::AcqRel);
            counts.held_bytes.fetch_sub(size, Ordering::AcqRel);
            shared.drop_lines(1, DropReason::BufferFull);
            return false;
        }
        match self.queue.try_send(entry) {
            Ok(()) => {
                counts.peak_lines.fetch_max(lines, Ordering::AcqRel);
                counts.peak_bytes.fetch_max(bytes, Ordering::AcqRel);
                shared.metrics.buffer.set(lines as f64);
                true
            }
            Err(error) => {
                counts.held_lines.fetch_sub(1, Ordering::AcqRel);
                counts.held_bytes.fetch_sub(size, Ordering::AcqRel);
                let reason = match error {
                    mpsc::error::TrySendError::Full(_) => DropReason::BufferFull,
                    mpsc::error::TrySendError::Closed(_) => DropReason::Shutdown,
                };
                shared.drop_lines(1, reason);
                false
            }
        }
    }

    pub fn stats(&self) -> LokiStats {
        self.shared.stats()
    }

    pub fn limits(&self) -> LokiLimits {
        self.shared.limits
    }
}

/// The pushing side; `spawn` it on a Tokio runtime.
pub struct LokiWorker {
    queue: mpsc::Receiver<LokiEntry>,
    shared: Arc<Shared>,
    config: LokiConfig,
}

/// The two halves of the shipping, joined by a buffer of `limits.buffer_lines`.
pub fn channel(config: LokiConfig) -> (LokiSender, LokiWorker) {
    let limits = config.limits;
    let (sender, receiver) = mpsc::channel(limits.buffer_lines.max(1));
    let shared = Arc::new(Shared {
        limits,
        counts: Counts::default(),
        metrics: Metrics::new(),
    });
    (
        LokiSender {
            queue: sender,
            shared: shared.clone(),
        },
        LokiWorker {
            queue: receiver,
            shared,
            config,
        },
    )
}

/// The running worker.
pub struct LokiHandle {
    stop: oneshot::Sender<Instant>,
    task: tokio::task::JoinHandle<()>,
    shared: Arc<Shared>,
}

impl LokiHandle {
    /// Stops the worker: it pushes what it holds within the configured
    /// flush deadline and drops the rest. Returns the final counts.
    pub async fn shutdown(self) -> LokiStats {
        let deadline = Instant::now() + self.shared.limits.flush_deadline;
        let _ = self.stop.send(deadline);
        let mut task = self.task;
        // The worker keeps to the deadline; the margin only covers a worker
        // that cannot run at all.
        if tokio::time::timeout_at(deadline + Duration::from_millis(500), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
        self.shared.stats()
    }

    pub fn stats(&self) -> LokiStats {
        self.shared.stats()
    }
}

impl LokiWorker {
    pub fn spawn(self, client: reqwest::Client) -> LokiHandle {
        let (stop, stopped) = oneshot::channel();
        let shared = self.shared.clone();
        let task = tokio::spawn(self.run(client, stopped));
        LokiHandle { stop, task, shared }
    }

    async fn run(mut self, client: reqwest::Client, mut stop: oneshot::Receiver<Instant>) {
        let limits = self.shared.limits;
        let mut pusher = Pusher {
            client,
            config: self.config.clone(),
            structured_metadata: true,
            failing: false,
        };
        let mut batch = Batch::default();
        let mut received = Vec::with_capacity(limits.batch_lines.min(1024));
        loop {
            let due = batch.started.map(|started| started + limits.batch_age);
            tokio::select! {
                biased;
                deadline = &mut stop => {
                    let deadline = deadline.unwrap_or_else(|_| Instant::now() + limits.flush_deadline);
                    self.finish(&mut pusher, batch, deadline).await;
                    return;
                }
                count = self.queue.recv_many(&mut received, limits.batch_lines.saturating_sub(batch.entries.len()).max(1)) => {
                    if count == 0 {
                        // Every sender is gone: nothing more will come.
                        let deadline = Instant::now() + limits.flush_deadline;
                        self.finish(&mut pusher, batch, deadline).await;
                        return;
                    }
                    for entry in received.drain(..) {
                        batch.push(entry);
                    }
                    if batch.entries.len() < limits.batch_lines && batch.bytes < limits.batch_bytes {
                        continue;
                    }
                }
                _ = sleep_until(due), if due.is_some() => {}
            }
            if let Some(deadline) = self.deliver(&mut pusher, &mut batch, &mut stop).await {
                self.finish(&mut pusher, batch, deadline).await;
                return;
            }
        }
    }

    /// Pushes `batch`, retrying with backoff; empties it (lines pushed or
    /// dropped). Returns the deadline when a stop interrupted it (the batch
    /// is then kept for the final flush).
    async fn deliver(
        &self,
        pusher: &mut Pusher,
        batch: &mut Batch,
        stop: &mut oneshot::Receiver<Instant>,
    ) -> Option<Instant> {
        let limits = self.shared.limits;
        let mut backoff = limits.min_backoff;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut push = Box::pin(pusher.push(&batch.entries));
            let outcome = tokio::select! {
                biased;
                outcome = &mut push => outcome,
                deadline = &mut *stop => {
                    // A push in flight may already have reached Loki: let it
                    // end (within the deadline) rather than send it twice.
                    let deadline = stop_deadline(deadline, limits);
                    let outcome = tokio::time::timeout_at(deadline, push).await;
                    if let Ok(Pushed::Ok) = outcome {
                        self.pushed(batch);
                    }
                    return Some(deadline);
                }
            };
            drop(push);
            match outcome {
                Pushed::Ok => {
                    self.pushed(batch);
                    return None;
                }
                Pushed::Rejected => {
                    self.failed_push();
                    self.drop_batch(batch, DropReason::Rejected);
                    return None;
                }
                Pushed::Failed => {
                    self.failed_push();
                    if attempt >= limits.max_attempts {
                        self.drop_batch(batch, DropReason::PushFailed);
                        return None;
                    }
                    let wait = jitter(backoff);
                    backoff = (backoff * 2).min(limits.max_backoff);
                    tokio::select! {
                        biased;
                        deadline = &mut *stop => return Some(stop_deadline(deadline, limits)),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    /// The shutdown flush: no more lines are taken in; what is held is
    /// pushed once, batch by batch, until `deadline`; the rest is dropped.
    async fn finish(&mut self, pusher: &mut Pusher, mut batch: Batch, deadline: Instant) {
        self.queue.close();
        let limits = self.shared.limits;
        let mut rest = Vec::new();
        while let Ok(entry) = self.queue.try_recv() {
            rest.push(entry);
        }
        let mut rest = rest.into_iter();
        loop {
            while batch.entries.len() < limits.batch_lines {
                match rest.next() {
                    Some(entry) => batch.push(entry),
                    None => break,
                }
            }
            if batch.entries.is_empty() {
                return;
            }
            let pushed = tokio::time::timeout_at(deadline, pusher.push(&batch.entries)).await;
            match pushed {
                Ok(Pushed::Ok) => self.pushed(&mut batch),
                _ => {
                    self.failed_push();
                    self.drop_batch(&mut batch, DropReason::Shutdown);
                    for entry in rest.by_ref() {
                        batch.push(entry);
                    }
                    self.drop_batch(&mut batch, DropReason::Shutdown);
                    return;
                }
            }
        }
    }

    fn pushed(&self, batch: &mut Batch) {
        let lines = batch.entries.len();
        let shared = &self.shared;
        shared
            .counts
            .sent
            .fetch_add(lines as u64, Ordering::Relaxed);
        shared.metrics.sent.increment(lines as u64);
        shared.metrics.pushes_ok.increment(1);
        shared.release(lines, batch.bytes);
        batch.clear();
    }

    fn drop_batch(&self, batch: &mut Batch, reason: DropReason) {
        let lines = batch.entries.len();
        if lines == 0 {
            return;
        }
        self.shared.drop_lines(lines, reason);
        self.shared.release(lines, batch.bytes);
        batch.clear();
    }

    fn failed_push(&self) {
        self.shared
            .counts
            .failed_pushes
            .fetch_add(1, Ordering::Relaxed);
        self.shared.metrics.pushes_error.increment(1);
    }
}

fn stop_deadline(
    received: Result<Instant, oneshot::error::RecvError>,
    limits: LokiLimits,
) -> Instant {
    received.unwrap_or_else(|_| Instant::now() + limits.flush_deadline)
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

/// A wait between `backoff / 2` and `backoff`, so replicas do not retry in
/// step.
fn jitter(backoff: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |now| now.subsec_nanos());
    let fraction = 0.5 + f64::from(nanos % 1000) / 2000.0;
    backoff.mul_f64(fraction)
}

#[derive(Default)]
struct Batch {
    entries: Vec<LokiEntry>,
    bytes: usize,
    /// When the first line came in.
    started: Option<Instant>,
}

impl Batch {
    fn push(&mut self, entry: LokiEntry) {
        if self.entries.is_empty() {
            self.started = Some(Instant::now());
        }
        self.bytes += entry.size();
        self.entries.push(entry);
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
        self.started = None;
    }
}

enum Pushed {
    Ok,
    /// Worth another try: no answer, 429 or 5xx.
    Failed,
    /// Loki refused the batch; another try would fail the same way.
    Rejected,
}

/// Sends batches; remembers whether Loki accepts structured metadata and
/// whether pushes are failing (to log a change of state once, not every
/// failure).
struct Pusher {
    client: reqwest::Client,
    config: LokiConfig,
    structured_metadata: bool,
    failing: bool,
}

impl Pusher {
    async fn push(&mut self, entries: &[LokiEntry]) -> Pushed {
        let mut outcome = self.post(entries).await;
        if let Err(Failure::Refused { status: 400, .. }) = &outcome
            && self.structured_metadata
        {
            // Loki before 3.0, or with structured metadata disabled, refuses
            // the third element of a value. Try once without it.
            self.structured_metadata = false;
            outcome = self.post(entries).await;
            if outcome.is_ok() {
                tracing::warn!(
                    target: LOG_TARGET,
                    event_type = "loki",
                    "Loki refuses structured metadata; pushing lines without it"
                );
            } else {
                self.structured_metadata = true;
            }
        }
        match outcome {
            Ok(()) => {
                if self.failing {
                    self.failing = false;
                    tracing::info!(target: LOG_TARGET, event_type = "loki", "Loki pushes work again");
                }
                Pushed::Ok
            }
            Err(failure) => {
                if !self.failing {
                    self.failing = true;
                    tracing::warn!(
                        target: LOG_TARGET,
                        event_type = "loki",
                        error = %failure,
                        "Loki push failed; lines wait in the bounded buffer and are dropped when it is full"
                    );
                }
                match failure {
                    Failure::Refused { .. } => Pushed::Rejected,
                    Failure::Unreachable(_) | Failure::Status(_) => Pushed::Failed,
                }
            }
        }
    }

    async fn post(&self, entries: &[LokiEntry]) -> Result<(), Failure> {
        let body = encode(&self.config, entries, self.structured_metadata)
            .map_err(|error| Failure::Unreachable(format!("cannot encode the batch: {error}")))?;
        let mut request = self
            .client
            .post(self.config.push_url.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .timeout(self.config.limits.push_timeout)
            .body(body);
        request = match &self.config.auth {
            LokiAuth::None => request,
            LokiAuth::Basic { username, token } => {
                request.basic_auth(username, Some(token.expose()))
            }
            LokiAuth::Bearer(token) => request.bearer_auth(token.expose()),
        };
        let response = request.send().await.map_err(|error| {
            let error = error.without_url();
            let mut text = error.to_string();
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                source = cause.source();
            }
            Failure::Unreachable(text)
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        if status.as_u16() == 429 || status.is_server_error() {
            return Err(Failure::Status(status.as_u16()));
        }
        Err(Failure::Refused {
            status: status.as_u16(),
            detail: self.error_detail(response).await,
        })
    }

    /// The start of Loki's error message (it says why: line too long,
    /// timestamp too old...), without any credential.
    async fn error_detail(&self, mut response: reqwest::Response) -> String {
        const MAX_DETAIL: usize = 256;
        let mut body = Vec::new();
        while body.len() < MAX_DETAIL {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                _ => break,
            }
        }
        body.truncate(MAX_DETAIL);
        let mut detail = String::from_utf8_lossy(&body).trim().to_owned();
        let secret = match &self.config.auth {
            LokiAuth::Basic { token, .. } | LokiAuth::Bearer(token) => Some(token.expose()),
            LokiAuth::None => None,
        };
        if let Some(secret) = secret.filter(|s| !s.is_empty()) {
            detail = detail.replace(secret, super::redact::REDACTED);
        }
        detail
    }
}

enum Failure {
    /// No answer: connection refused, timeout, reset.
    Unreachable(String),
    /// 429 or 5xx.
    Status(u16),
    /// Any other non-2xx.
    Refused { status: u16, detail: String },
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Unreachable(reason) => write!(f, "no answer: {reason}"),
            Failure::Status(status) => write!(f, "HTTP {status}"),
            Failure::Refused { status, detail } => write!(f, "HTTP {status}: {detail}"),
        }
    }
}

/// The `level` label of a line.
pub fn level_label(level: Level) -> &'static str {
    match level {
        Level::ERROR => "error",
        Level::WARN => "warn",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

#[derive(Serialize)]
struct PushBody<'a> {
    streams: Vec<Stream<'a>>,
}

#[derive(Serialize)]
struct Stream<'a> {
    stream: Labels<'a>,
    values: Vec<Value<'a>>,
}

#[derive(Serialize)]
struct Labels<'a> {
    app: &'a str,
    env: &'a str,
    level: &'a str,
    service_type: &'a str,
}

/// `["<unix ns>", "<line>", {structured metadata}]`.
struct Value<'a> {
    entry: &'a LokiEntry,
    metadata: bool,
}

impl Serialize for Value<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let with_metadata = self.metadata && !self.entry.metadata.is_empty();
        let mut seq = serializer.serialize_seq(Some(if with_metadata { 3 } else { 2 }))?;
        seq.serialize_element(&self.entry.timestamp_ns.to_string())?;
        seq.serialize_element(&self.entry.line)?;
        if with_metadata {
            let metadata: BTreeMap<&str, &str> = self
                .entry
                .metadata
                .iter()
                .map(|(name, value)| (*name, value.as_str()))
                .collect();
            seq.serialize_element(&metadata)?;
        }
        seq.end()
    }
}

/// Loki's JSON push body: one stream per label set.
pub fn encode(
    config: &LokiConfig,
    entries: &[LokiEntry],
    structured_metadata: bool,
) -> Result<Bytes, serde_json::Error> {
    let mut streams: BTreeMap<(&'static str, &str), Vec<Value<'_>>> = BTreeMap::new();
    for entry in entries {
        let service_type = entry
            .service_type
            .as_deref()
            .unwrap_or(DEFAULT_SERVICE_TYPE);
        streams
            .entry((level_label(entry.level), service_type))
            .or_default()
            .push(Value {
                entry,
                metadata: structured_metadata,
            });
    }
    let body = PushBody {
        streams: streams
            .into_iter()
            .map(|((level, service_type), values)| Stream {
                stream: Labels {
                    app: &config.app,
                    env: &config.env,
                    level,
                    service_type,
                },
                values,
            })
            .collect(),
    };
    serde_json::to_vec(&body).map(Bytes::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_base_url_gets_the_push_path() {
        for (given, expected) in [
            (
                "https://logs.example.net",
                "https://logs.example.net/loki/api/v1/push",
            ),
            (
                "https://logs.example.net/",
                "https://logs.example.net/loki/api/v1/push",
            ),
            (
                "https://logs.example.net/loki/api/v1/push",
                "https://logs.example.net/loki/api/v1/push",
            ),
            (
                "http://127.0.0.1:3100/loki/api/v1",
                "http://127.0.0.1:3100/loki/api/v1/push",
            ),
            (
                "http://gateway/tenant-a/",
                "http://gateway/tenant-a/loki/api/v1/push",
            ),
        ] {
            assert_eq!(push_url(given).unwrap().0.as_str(), expected, "{given}");
        }
    }

    #[test]
    fn credentials_in_the_url_move_to_auth() {
        let config = LokiConfig::new(
            "https://12345:glc%2Fsecret+1@logs.example.net",
            None,
            None,
            "app".into(),
            "dev".into(),
        )
        .unwrap();
        assert_eq!(
            config.push_url.as_str(),
            "https://logs.example.net/loki/api/v1/push"
        );
        assert_eq!(
            config.auth,
            LokiAuth::Basic {
                username: "12345".into(),
                token: Secret::new("glc/secret+1")
            }
        );
        assert!(!format!("{config:?}").contains("secret"));
    }

    #[test]
    fn a_user_without_a_token_is_an_error() {
        assert!(
            LokiConfig::new(
                "https://logs.example.net",
                Some("12345".into()),
                None,
                "app".into(),
                "dev".into()
            )
            .is_err()
        );
        assert!(push_url("ftp://logs.example.net").is_err());
    }

    #[test]
    fn lines_are_grouped_into_streams_by_level_and_service_type() {
        let config =
            LokiConfig::new("http://loki", None, None, "mcp".into(), "test".into()).unwrap();
        let entry = |level, service: Option<&str>, line: &str| LokiEntry {
            timestamp_ns: 1,
            level,
            service_type: service.map(str::to_owned),
            line: line.to_owned(),
            metadata: vec![("trace_id", "t-1".to_owned())],
        };
        let body = encode(
            &config,
            &[
                entry(Level::INFO, None, "a"),
                entry(Level::INFO, Some("menu"), "b"),
                entry(Level::INFO, None, "c"),
            ],
            true,
        )
        .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"streams": [
                {"stream": {"app": "mcp", "env": "test", "level": "info", "service_type": "menu"},
                 "values": [["1", "b", {"trace_id": "t-1"}]]},
                {"stream": {"app": "mcp", "env": "test", "level": "info", "service_type": "orchestrator"},
                 "values": [["1", "a", {"trace_id": "t-1"}], ["1", "c", {"trace_id": "t-1"}]]},
            ]})
        );
        let body = encode(&config, &[entry(Level::WARN, None, "a")], false).unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            body["streams"][0]["values"][0],
            serde_json::json!(["1", "a"])
        );
    }
}
