//! Session state behind the `SessionStore` trait; an in-memory store here,
//! a Redis store in `redis_store`.
//!
//! A turn reads a snapshot of its session at the start and, at the end,
//! applies its changes as one atomic update (turn count + 1, last route,
//! variables it set merged in). Two concurrent turns of one session therefore
//! never lose each other's update: neither writes back a stale copy. The
//! memory store does the update under the session's mutex; the Redis store
//! in one Lua script, which Redis runs alone.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

pub mod redis_store;

pub use redis_store::{RedisSessionConfig, RedisSessionStore};

/// What a session remembers between turns.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// Completed turns.
    pub turns: u64,
    /// Updates applied to the session, one per turn: a reader can tell
    /// which update a copy reflects (the Redis store keeps it as a field of
    /// the session's hash).
    pub version: u64,
    /// Unix time of the last turn, in milliseconds.
    pub last_active_ms: u64,
    /// The route of the last turn's reply.
    pub last_route: Option<String>,
    /// Variables set by flows (`set:`), read by later turns as `session.*`.
    pub variables: serde_json::Map<String, serde_json::Value>,
}

/// The changes one turn makes to its session.
#[derive(Debug, Clone, Default)]
pub struct TurnUpdate {
    /// The route of the turn's reply.
    pub route: String,
    /// The variables the turn set; merged into the session's, name by name.
    pub variables: serde_json::Map<String, serde_json::Value>,
}

impl Session {
    /// Applies one turn's changes.
    pub fn apply(&mut self, update: &TurnUpdate, now_ms: u64) {
        self.turns += 1;
        self.version += 1;
        // Never back in time: replicas' clocks may differ a little.
        self.last_active_ms = self.last_active_ms.max(now_ms);
        self.last_route = Some(update.route.clone());
        for (name, value) in &update.variables {
            self.variables.insert(name.clone(), value.clone());
        }
    }
}

/// The stable code of `SessionError::Unavailable`, the same in logs, metrics
/// and `/health`.
pub const SESSION_STORE_UNAVAILABLE: &str = "session_store_unavailable";

/// The stable code of `SessionError::OutOfTime`.
pub const SESSION_OUT_OF_TIME: &str = "session_out_of_time";

/// Why the store could not serve a turn; the turn goes on without it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionError {
    /// The store could not be reached in time, or refused the operation.
    /// The text says which operation and why; it never holds a credential.
    Unavailable(String),
    /// The turn had used its whole deadline before the operation started
    /// (a slow service, say): the operation was cut at once, whatever the
    /// store's state, and may or may not have been applied.
    OutOfTime(String),
}

impl SessionError {
    /// The stable code (`session_store_unavailable`, `session_out_of_time`).
    pub fn code(&self) -> &'static str {
        match self {
            SessionError::Unavailable(_) => SESSION_STORE_UNAVAILABLE,
            SessionError::OutOfTime(_) => SESSION_OUT_OF_TIME,
        }
    }
}

impl std::fmt::Display for SessionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionError::Unavailable(reason) => write!(f, "session store unavailable: {reason}"),
            SessionError::OutOfTime(reason) => write!(f, "no time left for the session: {reason}"),
        }
    }
}

impl Serialize for SessionError {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut error = serializer.serialize_struct("SessionError", 2)?;
        error.serialize_field("code", self.code())?;
        error.serialize_field("message", &self.to_string())?;
        error.end()
    }
}

/// Which store holds the sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionStoreKind {
    Memory,
    Redis,
}

/// Whether the store answered its last operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionStoreStatus {
    Ok,
    Unavailable,
}

/// What `/health` shows about the session store. Never holds a credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionStoreHealth {
    pub kind: SessionStoreKind,
    pub status: SessionStoreStatus,
    /// `session_store_unavailable` while the store is unavailable, so
    /// `/health` names the condition with the code logs and metrics use.
    pub code: Option<&'static str>,
    /// Where the sessions are (`redis://host:port/db`, credentials left
    /// out), for the operator; `None` for memory.
    pub address: Option<String>,
    /// The last failure, kept after the store recovers so the last outage
    /// stays visible.
    pub last_error: Option<String>,
    /// When the last failure happened, RFC 3339.
    pub last_error_at: Option<String>,
}

/// Where sessions live. Implementations bound their own time: no call may
/// hang a turn.
pub trait SessionStore: Send + Sync {
    /// The session as it is now; a new, empty one when it does not exist.
    fn load<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Session, SessionError>>;

    /// Applies a turn's changes atomically and returns the session after them.
    fn apply<'a>(
        &'a self,
        id: &'a str,
        update: &'a TurnUpdate,
    ) -> BoxFuture<'a, Result<Session, SessionError>>;

    /// Sessions currently held (an estimate for stores that cannot count).
    /// Synchronous and without IO: `/health` and `/metrics` call it.
    fn len(&self) -> u64;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The number of sessions held, when the store can tell without IO;
    /// `None` otherwise (Redis), so nobody reads an estimate as a count.
    fn session_count(&self) -> Option<u64> {
        Some(self.len())
    }

    /// The store's state for `/health`. Bounded in time like every other
    /// operation: a store that needs the network to answer waits at most
    /// its operation timeout.
    fn health(&self) -> BoxFuture<'_, SessionStoreHealth>;

    /// Records that the channel delivery `key` was seen, for `ttl`:
    /// `Some(Ok(true))` the first time. A store shared by replicas (Redis)
    /// answers for all of them; `None` when the store keeps no such record
    /// (the caller remembers deliveries itself).
    fn first_delivery<'a>(
        &'a self,
        key: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Option<Result<bool, SessionError>>> {
        let _ = (key, ttl);
        Box::pin(async { None })
    }

    /// Forgets a delivery recorded by `first_delivery`, so that the
    /// platform's next attempt runs (its turn failed). Best effort: a
    /// failure is logged by the store.
    fn forget_delivery<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ()> {
        let _ = key;
        Box::pin(async {})
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

/// Sessions in memory: bounded in count, each forgotten `ttl` after its
/// last turn.
pub struct MemorySessionStore {
    /// Bounded in entries, with time-to-idle; each session behind its own
    /// mutex, held only for the synchronous update.
    sessions: moka::sync::Cache<String, Arc<Mutex<Session>>>,
}

pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(30 * 60);
pub const DEFAULT_MAX_SESSIONS: u64 = 100_000;

impl MemorySessionStore {
    pub fn new(ttl: Duration, max_sessions: u64) -> MemorySessionStore {
        MemorySessionStore {
            sessions: moka::sync::Cache::builder()
                .max_capacity(max_sessions)
                .time_to_idle(ttl)
                .build(),
        }
    }

    fn entry(&self, id: &str) -> Arc<Mutex<Session>> {
        self.sessions
            .get_with_by_ref(id, || Arc::new(Mutex::new(Session::default())))
    }
}

impl SessionStore for MemorySessionStore {
    fn load<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Session, SessionError>> {
        Box::pin(async move {
            let session = match self.sessions.get(id) {
                Some(entry) => lock(&entry).clone(),
                None => Session::default(),
            };
            Ok(session)
        })
    }

    fn apply<'a>(
        &'a self,
        id: &'a str,
        update: &'a TurnUpdate,
    ) -> BoxFuture<'a, Result<Session, SessionError>> {
        Box::pin(async move {
            let entry = self.entry(id);
            let mut session = lock(&entry);
            session.apply(update, now_ms());
            Ok(session.clone())
        })
    }

    fn len(&self) -> u64 {
        self.sessions.run_pending_tasks();
        self.sessions.entry_count()
    }

    fn health(&self) -> BoxFuture<'_, SessionStoreHealth> {
        Box::pin(async {
            SessionStoreHealth {
                kind: SessionStoreKind::Memory,
                status: SessionStoreStatus::Ok,
                code: None,
                address: None,
                last_error: None,
                last_error_at: None,
            }
        })
    }
}

/// A poisoned lock only means another turn panicked while holding it; the
/// session data is still a valid value, so it is used as it is.
fn lock(entry: &Mutex<Session>) -> std::sync::MutexGuard<'_, Session> {
    entry
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One tenant's view of a store shared by several: every session id and
/// delivery key gets the tenant's prefix (`tenant:<name>:`), so tenants
/// never read each other's sessions or de-duplicate each other's
/// deliveries. Tenant names hold no `:`.
pub struct TenantSessions {
    inner: Arc<dyn SessionStore>,
    prefix: String,
}

impl TenantSessions {
    pub fn new(inner: Arc<dyn SessionStore>, tenant: &str) -> TenantSessions {
        TenantSessions {
            inner,
            prefix: format!("tenant:{tenant}:"),
        }
    }

    fn key(&self, id: &str) -> String {
        let mut key = String::with_capacity(self.prefix.len() + id.len());
        key.push_str(&self.prefix);
        key.push_str(id);
        key
    }
}

impl SessionStore for TenantSessions {
    fn load<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Session, SessionError>> {
        Box::pin(async move { self.inner.load(&self.key(id)).await })
    }

    fn apply<'a>(
        &'a self,
        id: &'a str,
        update: &'a TurnUpdate,
    ) -> BoxFuture<'a, Result<Session, SessionError>> {
        Box::pin(async move { self.inner.apply(&self.key(id), update).await })
    }

    /// The whole store's: sessions are not counted per tenant.
    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn session_count(&self) -> Option<u64> {
        self.inner.session_count()
    }

    fn health(&self) -> BoxFuture<'_, SessionStoreHealth> {
        self.inner.health()
    }

    fn first_delivery<'a>(
        &'a self,
        key: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Option<Result<bool, SessionError>>> {
        Box::pin(async move { self.inner.first_delivery(&self.key(key), ttl).await })
    }

    fn forget_delivery<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move { self.inner.forget_delivery(&self.key(key)).await })
    }
}
