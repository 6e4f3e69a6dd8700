//! Session state behind the `SessionStore` trait; an in-memory store.
//!
//! A turn reads a snapshot of its session at the start and, at the end,
//! applies its changes as one atomic update (turn count + 1, last route,
//! variables it set merged in). Two concurrent turns of one session therefore
//! never lose each other's update: neither writes back a stale copy.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

/// What a session remembers between turns.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// Completed turns.
    pub turns: u64,
    /// Unix time of the last turn, in milliseconds.
    pub last_active_ms: u64,
    pub last_route: Option<String>,
    /// Variables set by flows (`set:`), read by later turns as `session.*`.
    pub variables: serde_json::Map<String, serde_json::Value>,
}

/// The changes one turn makes to its session.
#[derive(Debug, Clone, Default)]
pub struct TurnUpdate {
    pub route: String,
    pub variables: serde_json::Map<String, serde_json::Value>,
}

impl Session {
    /// Applies one turn's changes.
    pub fn apply(&mut self, update: &TurnUpdate, now_ms: u64) {
        self.turns += 1;
        self.last_active_ms = now_ms;
        self.last_route = Some(update.route.clone());
        for (name, value) in &update.variables {
            self.variables.insert(name.clone(), value.clone());
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionError {
    /// The store could not be reached in time.
    Unavailable(String),
}

impl std::fmt::Display for SessionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionError::Unavailable(reason) => write!(f, "session store unavailable: {reason}"),
        }
    }
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
    fn len(&self) -> u64;

    fn is_empty(&self) -> bool {
        self.len() == 0
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
}

/// A poisoned lock only means another turn panicked while holding it; the
/// session data is still a valid value, so it is used as it is.
fn lock(entry: &Mutex<Session>) -> std::sync::MutexGuard<'_, Session> {
    entry
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
