//! What outlives one delivery: the seen-ids set, the bounded queue of
//! background turns, and each channel's counters.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::session::SessionStore;

/// Deliveries acknowledged and not yet answered (waiting or running), over
/// every channel; past it a delivery is answered 503 and the platform
/// retries later.
pub const QUEUE_CAPACITY: usize = 1024;

/// Background turns running at once; the rest of the queue waits.
pub const WORKERS: usize = 64;

/// How long a delivery's id is remembered. Slack retries three times
/// within the hour and Telegram for a shorter while; Meta retries a
/// WhatsApp delivery with backoff for up to a week, so a delivery refused
/// for a whole day and repeated after it would run again.
pub const DELIVERY_MEMORY: Duration = Duration::from_secs(24 * 60 * 60);

/// Ids remembered in memory; the oldest are forgotten first past it.
pub const SEEN_CAPACITY: u64 = 200_000;

/// Longest id kept as is; a longer one is kept as its SHA-256.
const MAX_ID_LENGTH: usize = 128;

/// Counters of one channel since start-up, for `/health`.
#[derive(Debug, Default, Serialize)]
pub struct ChannelCounters {
    /// Deliveries that reached the channel.
    pub received: AtomicU64,
    pub verification_failures: AtomicU64,
    pub duplicates: AtomicU64,
    /// Not a user's text message.
    pub ignored: AtomicU64,
    /// Messages dropped over the user's rate.
    pub rate_limited: AtomicU64,
    /// Deliveries answered 503: the queue or the in-flight cap was full.
    pub overloaded: AtomicU64,
    pub turns: AtomicU64,
    /// Turns that failed (a flow's template error, a reply template's):
    /// nothing could be sent.
    pub turn_failures: AtomicU64,
    /// Replies delivered.
    pub replies: AtomicU64,
    /// Replies that could not be delivered, retries included.
    pub outbound_failures: AtomicU64,
    /// Messages in the background queue now (waiting or running).
    pub queue_depth: AtomicU64,
}

impl ChannelCounters {
    pub fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A place in the background queue; given back when dropped.
#[derive(Debug)]
pub struct QueueSlot {
    _permit: OwnedSemaphorePermit,
}

/// A message counted in its channel's queue depth until dropped, however
/// its job ends.
struct Queued(Arc<ChannelCounters>);

impl Drop for Queued {
    fn drop(&mut self) {
        self.0.queue_depth.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The channels' shared state, in the `AppState`: it outlives deployments.
pub struct ChannelRuntime {
    /// `<channel>\0<id>` of every delivery seen within `DELIVERY_MEMORY`.
    seen: moka::sync::Cache<String, ()>,
    slots: Arc<Semaphore>,
    workers: Arc<Semaphore>,
    counters: Mutex<HashMap<String, Arc<ChannelCounters>>>,
    /// Whether the shared store's failure has been logged (once per outage).
    store_failing: AtomicBool,
}

impl Default for ChannelRuntime {
    fn default() -> Self {
        ChannelRuntime {
            seen: moka::sync::Cache::builder()
                .max_capacity(SEEN_CAPACITY)
                .time_to_live(DELIVERY_MEMORY)
                .build(),
            slots: Arc::new(Semaphore::new(QUEUE_CAPACITY)),
            workers: Arc::new(Semaphore::new(WORKERS)),
            counters: Mutex::new(HashMap::new()),
            store_failing: AtomicBool::new(false),
        }
    }
}

impl ChannelRuntime {
    /// The counters of a declared channel (kept across reloads).
    pub fn counters(&self, channel: &str) -> Arc<ChannelCounters> {
        let mut counters = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(found) = counters.get(channel) {
            return found.clone();
        }
        let created = Arc::new(ChannelCounters::default());
        counters.insert(channel.to_owned(), created.clone());
        created
    }

    /// A place in the background queue, or `None` when it is full.
    pub fn reserve(&self) -> Option<QueueSlot> {
        self.slots
            .clone()
            .try_acquire_owned()
            .ok()
            .map(|permit| QueueSlot { _permit: permit })
    }

    /// Deliveries in the background queue, over every channel.
    pub fn queue_depth(&self) -> usize {
        QUEUE_CAPACITY - self.slots.available_permits()
    }

    /// Whether this is the first delivery of `id` on `channel` within
    /// `DELIVERY_MEMORY`. With a shared store (Redis) the replicas answer
    /// together; when it fails, this replica's memory answers alone.
    pub async fn first_delivery(
        &self,
        sessions: &dyn SessionStore,
        channel: &str,
        id: &str,
    ) -> bool {
        let (key, shared_key) = delivery_keys(channel, id);
        let first_here = self.seen.entry(key).or_insert(()).is_fresh();
        match sessions.first_delivery(&shared_key, DELIVERY_MEMORY).await {
            None => first_here,
            Some(Ok(first)) => {
                if self.store_failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(
                        event_type = "channel_deliveries",
                        "Duplicate deliveries are checked in the shared store again"
                    );
                }
                first
            }
            Some(Err(error)) => {
                if !self.store_failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        event_type = "channel_deliveries",
                        code = error.code(),
                        error = %error,
                        "The shared store cannot check duplicate deliveries; this replica checks its own until it answers"
                    );
                }
                first_here
            }
        }
    }

    /// Forgets a delivery whose turn failed before its answer, so the
    /// platform's next attempt runs.
    pub async fn forget_delivery(&self, sessions: &dyn SessionStore, channel: &str, id: &str) {
        let (key, shared_key) = delivery_keys(channel, id);
        self.seen.invalidate(&key);
        sessions.forget_delivery(&shared_key).await;
    }

    /// Runs `job` in the background once a worker is free, holding `slot`
    /// until it ends.
    pub fn spawn<F>(&self, slot: QueueSlot, counters: Arc<ChannelCounters>, job: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let workers = self.workers.clone();
        counters.queue_depth.fetch_add(1, Ordering::Relaxed);
        let depth = Queued(counters);
        tokio::spawn(async move {
            let _slot = slot;
            let _depth = depth;
            // Never closed: a worker place always comes.
            let _worker = workers.acquire_owned().await;
            job.await;
        });
    }

    /// Waits until the background queue is empty, for at most `within`;
    /// whether it emptied.
    pub async fn drain(&self, within: Duration) -> bool {
        let capacity = u32::try_from(QUEUE_CAPACITY).unwrap_or(u32::MAX);
        matches!(
            tokio::time::timeout(within, self.slots.acquire_many(capacity)).await,
            Ok(Ok(_))
        )
    }
}

/// The keys of a delivery: in this replica's set, and in the shared store
/// (which adds its own prefix). An id longer than `MAX_ID_LENGTH` is kept
/// as `sha256:<hex>`.
fn delivery_keys(channel: &str, id: &str) -> (String, String) {
    let id = if id.len() > MAX_ID_LENGTH {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(id.as_bytes());
        let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
        format!("sha256:{hex}")
    } else {
        id.to_owned()
    };
    (format!("{channel}\0{id}"), format!("{channel}:{id}"))
}
