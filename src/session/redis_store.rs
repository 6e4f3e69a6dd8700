//! Sessions in Redis, shared by every replica behind one address.
//!
//! A session is one Redis hash under `<key prefix><session id>`:
//!
//! | field | value |
//! |---|---|
//! | `turns` | completed turns |
//! | `version` | updates applied, one per turn |
//! | `last_active_ms` | Unix time of the last turn, in milliseconds |
//! | `last_route` | the route of the last turn's reply |
//! | `var:<name>` | a flow variable, as JSON text |
//!
//! `load` is one `HGETALL`. `apply` is one Lua script (`APPLY_SCRIPT`) that
//! adds one to `turns` and `version`, writes the route, the time and the
//! turn's variables, refreshes the TTL and returns the whole hash. Redis
//! runs a script alone, so the merge happens on the server with nothing
//! between read and write: two replicas applying turns of one session at the
//! same moment both count, and neither overwrites the other's variables
//! with a stale copy. No compare-and-set loop is needed, so there is no
//! retry budget that many writers of one session could exhaust. `apply` is
//! never retried by this store: after a timeout the script may have run, and
//! running it again would count the turn twice.
//!
//! Every operation is bounded by the store's operation timeout. The
//! connection is a redis-rs `ConnectionManager` (one multiplexed connection
//! that reconnects by itself after an IO error); a connection that failed
//! for another reason (a refused `AUTH`, for one) is replaced, at most once per `REPLACE_CONNECTION_INTERVAL`, so the store
//! recovers from those too. Nothing connects at construction: a replica
//! starts while Redis is down and its turns run without session state until
//! Redis answers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use futures_util::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ConnectionAddr, RedisError, RedisResult};

use super::{
    SESSION_STORE_UNAVAILABLE, Session, SessionError, SessionStore, SessionStoreHealth,
    SessionStoreKind, SessionStoreStatus, TurnUpdate, now_ms,
};

/// Prefix of every session key unless `SESSION_KEY_PREFIX` says otherwise
/// (the Python service's).
pub const DEFAULT_KEY_PREFIX: &str = "mcp:session:";

/// What follows the key prefix in the key of a channel delivery: a NUL
/// byte, which a session's key never holds (`RedisSessionStore::key`
/// replaces it), so no session id can name a delivery's key.
pub const DELIVERY_KEY_INFIX: &str = "\0delivery:";

/// Time one connection attempt may take (TCP, TLS, `AUTH`, `SELECT`). Longer
/// than an operation: the connection manager's own reconnects run in the
/// background and may take it whole. A first connection (or one after a
/// replacement) only moves on while an operation waits for it, so on a
/// quiet store a handshake slower than the operation timeout takes more
/// than one operation to complete.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Attempts after the first when the connection manager reconnects, with
/// exponential backoff from `RECONNECT_MIN_DELAY` to `RECONNECT_MAX_DELAY`.
/// Few: once they are spent, the next operation starts a new round, so a
/// Redis that comes back is used again within about a second.
pub const RECONNECT_RETRIES: usize = 2;
pub const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(50);
pub const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(1);

/// Longest a `/health` ping waits, whatever the operation timeout: a
/// readiness probe gives up after a second or two.
pub const HEALTH_PING_TIMEOUT: Duration = Duration::from_secs(1);

/// Least time between two replacements of the connection manager after a
/// failure it does not recover from by itself.
pub const REPLACE_CONNECTION_INTERVAL: Duration = Duration::from_secs(1);

/// Operations in a row that got no answer in time, over at least
/// `HUNG_CONNECTION_SPAN`, after which the connection is taken for hung and
/// replaced. A connection to a Redis that vanished without closing it (a
/// lost node, a partition) stays open and silent until the kernel gives up
/// on it, many minutes later; the connection manager only reconnects after
/// a connection is closed.
pub const HUNG_CONNECTION_TIMEOUTS: u32 = 3;
pub const HUNG_CONNECTION_SPAN: Duration = Duration::from_secs(1);

/// How long a `/health` answer about Redis is reused: a probe on every
/// replica every few seconds reaches Redis, a flood of `/health` requests
/// does not.
pub const HEALTH_PING_REUSE: Duration = Duration::from_secs(1);

const FIELD_TURNS: &str = "turns";
const FIELD_VERSION: &str = "version";
const FIELD_LAST_ACTIVE_MS: &str = "last_active_ms";
const FIELD_LAST_ROUTE: &str = "last_route";
/// Flow variables are fields with this prefix, so a variable can never
/// take the name of one of the fields above.
const VARIABLE_FIELD_PREFIX: &str = "var:";

/// Applies one turn to a session's hash. Redis runs it alone, so every
/// read and write of the hash happen with nothing in between.
///
/// KEYS[1]: the session's key. ARGV[1]: the TTL in milliseconds; ARGV[2]:
/// the turn's time (Unix milliseconds); ARGV[3]: the turn's route;
/// ARGV[4..]: pairs of field (`var:<name>`) and JSON value. Returns the
/// hash after the update, as `HGETALL` does.
///
/// The counts are read and written as text (a field that is not a number
/// counts as 0) rather than with `HINCRBY`, which would fail on such a
/// field halfway through the script — Redis does not undo the writes a
/// failing script already made. The time never goes back: replicas' clocks
/// may differ a little.
pub const APPLY_SCRIPT: &str = r"
local key = KEYS[1]
local function count(field)
  local value = tonumber(redis.call('HGET', key, field))
  -- A count that is not a whole, non-negative, finite number counts as 0.
  if value == nil or value ~= value or value < 0 or value >= 2^53 then
    return 0
  end
  return math.floor(value)
end
local turns = string.format('%d', count('turns') + 1)
local version = string.format('%d', count('version') + 1)
local last_active = ARGV[2]
local previous = redis.call('HGET', key, 'last_active_ms')
if tonumber(previous) and tonumber(previous) > tonumber(last_active) then
  last_active = previous
end
redis.call('HSET', key, 'turns', turns, 'version', version,
  'last_active_ms', last_active, 'last_route', ARGV[3])
for index = 4, #ARGV - 1, 2 do
  redis.call('HSET', key, ARGV[index], ARGV[index + 1])
end
redis.call('PEXPIRE', key, ARGV[1])
return redis.call('HGETALL', key)
";

/// How to reach Redis and how to keep sessions there.
#[derive(Clone)]
pub struct RedisSessionConfig {
    /// `redis://[user][:password]@host[:port][/db]` or `rediss://...` (TLS).
    /// May hold a password: never logged or shown (see `Debug`).
    pub url: String,
    /// Put before each session id to make its key, so several deployments
    /// can share one Redis.
    pub key_prefix: String,
    /// A session is forgotten this long after its last turn (`PEXPIRE` on
    /// every apply).
    pub ttl: Duration,
    /// Time each operation may take in all, connection wait included.
    pub operation_timeout: Duration,
}

impl std::fmt::Debug for RedisSessionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSessionConfig")
            .field("url", &redact_url(&self.url))
            .field("key_prefix", &self.key_prefix)
            .field("ttl", &self.ttl)
            .field("operation_timeout", &self.operation_timeout)
            .finish()
    }
}

/// Why a store cannot be built from its configuration. The message names
/// the URL with its password hidden.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfigError(pub String);

impl std::fmt::Display for RedisConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RedisConfigError {}

/// The last failure the store saw, for `/health`.
#[derive(Debug, Default)]
struct LastFailure {
    /// `<operation>: <why>`, credentials scrubbed.
    message: Option<String>,
    /// When it happened (the wall clock, shown as RFC 3339).
    at: Option<SystemTime>,
}

/// Sessions in Redis. Each field says why it is here.
pub struct RedisSessionStore {
    /// Parsed once from the URL; a replacement connection manager is built
    /// from it.
    client: redis::Client,
    /// Reconnect and timing settings of every connection manager.
    manager_config: ConnectionManagerConfig,
    /// The live connection manager (one multiplexed connection, cloned per
    /// operation: an `Arc` inside). Swapped whole when it is replaced.
    connection: ArcSwap<ConnectionManager>,
    /// When the connection manager was last replaced, to replace it at most
    /// once per `REPLACE_CONNECTION_INTERVAL`.
    last_replaced: Mutex<Instant>,
    /// The apply script; `invoke_async` sends `EVALSHA` and loads the script
    /// when Redis answers `NOSCRIPT` (after a restart or a `SCRIPT FLUSH`).
    apply_script: redis::Script,
    /// Put before each session id to make its key.
    key_prefix: String,
    /// The TTL `PEXPIRE` sets on every apply, in milliseconds; at least 1,
    /// as `PEXPIRE 0` deletes the key before the script reads it back.
    ttl_ms: u64,
    /// The most any operation waits, connection wait included.
    operation_timeout: Duration,
    /// `redis://host:port/db`, never with credentials: for logs and `/health`.
    address: String,
    /// The URL's password, removed from any error text before it is kept or
    /// logged (redis-rs does not quote it, but error texts are not ours).
    password: Option<String>,
    /// Whether the last operation succeeded; read on every operation to log
    /// only the changes (one line per outage, one per recovery).
    available: AtomicBool,
    /// The last failure, for `/health`.
    last_failure: Mutex<LastFailure>,
    /// Operations in a row without an answer in time, and when the first of
    /// them started: to replace a hung connection.
    timeouts_in_a_row: Mutex<(u32, Option<Instant>)>,
    /// The last `/health` ping and its outcome, reused for
    /// `HEALTH_PING_REUSE`; forgotten when the store's availability changes.
    last_health_ping: Mutex<Option<(Instant, bool)>>,
    /// Held while a `/health` ping runs: one at a time.
    health_ping_running: tokio::sync::Mutex<()>,
}

/// What an operation's failure says about the connection.
enum FailureKind {
    /// No answer in time: the connection may be hung.
    Timeout,
    /// The connection failed (closed, refused, `AUTH` refused, the server
    /// became a read-only replica): the store is unavailable until a
    /// connection works again.
    Connection,
    /// Redis refused this one command (a key of another type, `NOPERM`, out
    /// of memory, a script error); the connection is fine.
    Command,
}

fn failure_kind(error: &RedisError) -> FailureKind {
    use redis::{ErrorKind, ServerErrorKind};
    if error.is_timeout() {
        return FailureKind::Timeout;
    }
    match error.kind() {
        ErrorKind::Server(
            ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown | ServerErrorKind::BusyLoading,
        ) => FailureKind::Connection,
        ErrorKind::Server(_) | ErrorKind::Extension | ErrorKind::UnexpectedReturnType => {
            FailureKind::Command
        }
        _ => FailureKind::Connection,
    }
}

impl RedisSessionStore {
    /// Builds the store without connecting: the first operation connects.
    /// Fails only on a configuration Redis can never accept (a URL that
    /// does not parse). Needs a Tokio runtime (the connection manager
    /// spawns its task here).
    pub fn new(config: RedisSessionConfig) -> Result<RedisSessionStore, RedisConfigError> {
        let client = redis::Client::open(config.url.as_str()).map_err(|error| {
            RedisConfigError(format!(
                "`{}` is not a Redis URL ({}); expected redis://[user][:password]@host[:port][/db] or rediss://...",
                redact_url(&config.url),
                url_error_text(&error, &config.url)
            ))
        })?;
        let info = client.get_connection_info();
        let password = info
            .redis_settings()
            .password()
            .filter(|password| !password.is_empty())
            .map(str::to_owned);
        let address = display_address(info.addr(), info.redis_settings().db());
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT.max(config.operation_timeout)))
            // A backstop only: the operation timeout around every operation
            // fires first, with its own message.
            .set_response_timeout(Some(config.operation_timeout * 2))
            .set_number_of_retries(RECONNECT_RETRIES)
            .set_min_delay(RECONNECT_MIN_DELAY)
            .set_max_delay(RECONNECT_MAX_DELAY);
        let connection =
            ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone())
                .map_err(|error| {
                    RedisConfigError(format!(
                        "the Redis connection for `{address}` cannot be set up: {}",
                        scrub(&error.to_string(), password.as_deref())
                    ))
                })?;
        Ok(RedisSessionStore {
            client,
            manager_config,
            connection: ArcSwap::from_pointee(connection),
            last_replaced: Mutex::new(Instant::now()),
            apply_script: redis::Script::new(APPLY_SCRIPT),
            key_prefix: config.key_prefix,
            ttl_ms: u64::try_from(config.ttl.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
            operation_timeout: config.operation_timeout,
            address,
            password,
            available: AtomicBool::new(true),
            last_failure: Mutex::new(LastFailure::default()),
            timeouts_in_a_row: Mutex::new((0, None)),
            last_health_ping: Mutex::new(None),
            health_ping_running: tokio::sync::Mutex::new(()),
        })
    }

    /// `redis://host:port/db` (or `rediss://`), without credentials.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The Redis key of a session. A NUL in the id becomes U+FFFD, so that
    /// no session id reaches the keys of channel deliveries
    /// (`DELIVERY_KEY_INFIX`).
    pub fn key(&self, session_id: &str) -> String {
        if session_id.contains('\0') {
            format!(
                "{}{}",
                self.key_prefix,
                session_id.replace('\0', "\u{fffd}")
            )
        } else {
            format!("{}{session_id}", self.key_prefix)
        }
    }

    /// Runs one operation within the operation timeout, and records what
    /// happened for `/health` and the outage log lines.
    async fn bounded<T>(
        &self,
        operation: &'static str,
        work: impl std::future::Future<Output = RedisResult<T>>,
    ) -> Result<T, SessionError> {
        self.bounded_by(self.operation_timeout, operation, work)
            .await
    }

    /// `bounded` with another time limit.
    async fn bounded_by<T>(
        &self,
        timeout: Duration,
        operation: &'static str,
        work: impl std::future::Future<Output = RedisResult<T>>,
    ) -> Result<T, SessionError> {
        let started = Instant::now();
        let (kind, failure) = match tokio::time::timeout(timeout, work).await {
            Ok(Ok(value)) => {
                *lock(&self.timeouts_in_a_row) = (0, None);
                if !self.available.swap(true, Ordering::AcqRel) {
                    *lock(&self.last_health_ping) = None;
                    tracing::info!(
                        event_type = "session_store",
                        address = %self.address,
                        "Session store reachable again"
                    );
                }
                return Ok(value);
            }
            Ok(Err(error)) => (
                failure_kind(&error),
                scrub(&error.to_string(), self.password.as_deref()),
            ),
            Err(_) => (
                FailureKind::Timeout,
                format!("no answer within {}", humantime::format_duration(timeout)),
            ),
        };
        let message = format!("{operation}: {failure}");
        {
            let mut last = lock(&self.last_failure);
            last.message = Some(message.clone());
            last.at = Some(SystemTime::now());
        }
        match kind {
            // This command only: the connection and the store are fine.
            FailureKind::Command => return Err(SessionError::Unavailable(message)),
            FailureKind::Timeout => {
                let hung = {
                    let mut in_a_row = lock(&self.timeouts_in_a_row);
                    let first = *in_a_row.1.get_or_insert(started);
                    in_a_row.0 += 1;
                    in_a_row.0 >= HUNG_CONNECTION_TIMEOUTS
                        && first.elapsed() >= HUNG_CONNECTION_SPAN
                };
                if hung {
                    self.replace_connection();
                }
            }
            FailureKind::Connection => self.replace_connection(),
        }
        if self.available.swap(false, Ordering::AcqRel) {
            *lock(&self.last_health_ping) = None;
            tracing::warn!(
                event_type = "session_store",
                code = SESSION_STORE_UNAVAILABLE,
                address = %self.address,
                error = %message,
                "Session store unavailable; turns run without their session until it answers"
            );
        }
        Err(SessionError::Unavailable(message))
    }

    /// Starts a new connection manager in place of the live one (at most
    /// once per `REPLACE_CONNECTION_INTERVAL`), for failures the manager
    /// does not recover from by itself: a refused `AUTH`, a server that
    /// turned read-only, a connection that stays open but silent. A closed
    /// connection it reopens on its own; replacing it then costs nothing
    /// but a new handshake.
    fn replace_connection(&self) {
        let mut last_replaced = lock(&self.last_replaced);
        if last_replaced.elapsed() < REPLACE_CONNECTION_INTERVAL {
            return;
        }
        if let Ok(connection) = ConnectionManager::new_lazy_with_config(
            self.client.clone(),
            self.manager_config.clone(),
        ) {
            self.connection.store(Arc::new(connection));
            *last_replaced = Instant::now();
            *lock(&self.timeouts_in_a_row) = (0, None);
        }
    }

    /// Pings Redis, waiting at most `timeout`: for start-up, which can wait
    /// for a whole connection attempt (`CONNECT_TIMEOUT`) and so report why
    /// Redis refused, where an operation would only see its timeout.
    pub async fn ping(&self, timeout: Duration) -> Result<(), SessionError> {
        let mut connection = self.connection();
        self.bounded_by(timeout, "ping", async {
            redis::cmd("PING")
                .query_async::<String>(&mut connection)
                .await
        })
        .await
        .map(drop)
    }

    fn connection(&self) -> ConnectionManager {
        ConnectionManager::clone(&self.connection.load())
    }
}

impl SessionStore for RedisSessionStore {
    fn load<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Session, SessionError>> {
        Box::pin(async move {
            let key = self.key(id);
            let mut connection = self.connection();
            let fields: Vec<(Vec<u8>, Vec<u8>)> = self
                .bounded("load", async {
                    redis::cmd("HGETALL")
                        .arg(&key)
                        .query_async(&mut connection)
                        .await
                })
                .await?;
            Ok(session_from_fields(fields, &key))
        })
    }

    fn apply<'a>(
        &'a self,
        id: &'a str,
        update: &'a TurnUpdate,
    ) -> BoxFuture<'a, Result<Session, SessionError>> {
        Box::pin(async move {
            let key = self.key(id);
            let mut invocation = self.apply_script.prepare_invoke();
            invocation
                .key(&key)
                .arg(self.ttl_ms)
                .arg(now_ms())
                .arg(&update.route);
            for (name, value) in &update.variables {
                invocation
                    .arg(format!("{VARIABLE_FIELD_PREFIX}{name}"))
                    .arg(value.to_string());
            }
            let mut connection = self.connection();
            let fields: Vec<(Vec<u8>, Vec<u8>)> = self
                .bounded("apply", invocation.invoke_async(&mut connection))
                .await?;
            Ok(session_from_fields(fields, &key))
        })
    }

    /// `SET key 1 NX PX ttl`: one round trip, atomic across replicas. No
    /// session id can name the key (`DELIVERY_KEY_INFIX`).
    fn first_delivery<'a>(
        &'a self,
        key: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Option<Result<bool, SessionError>>> {
        Box::pin(async move {
            let key = format!("{}{DELIVERY_KEY_INFIX}{key}", self.key_prefix);
            let mut connection = self.connection();
            let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
            let set: Result<Option<String>, SessionError> = self
                .bounded("first_delivery", async {
                    redis::cmd("SET")
                        .arg(&key)
                        .arg(1)
                        .arg("NX")
                        .arg("PX")
                        .arg(ttl_ms)
                        .query_async(&mut connection)
                        .await
                })
                .await;
            Some(set.map(|answer| answer.is_some()))
        })
    }

    fn forget_delivery<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let key = format!("{}{DELIVERY_KEY_INFIX}{key}", self.key_prefix);
            let mut connection = self.connection();
            let _: Result<u64, SessionError> = self
                .bounded("forget_delivery", async {
                    redis::cmd("DEL")
                        .arg(&key)
                        .query_async(&mut connection)
                        .await
                })
                .await;
        })
    }

    /// Always 0: counting would need a scan of the keys. `session_count`
    /// says `None`.
    fn len(&self) -> u64 {
        0
    }

    fn session_count(&self) -> Option<u64> {
        None
    }

    /// Pings Redis (within the operation timeout, at most
    /// `HEALTH_PING_TIMEOUT`), so `/health` tells the state of now even when
    /// no turn has run for a while, and a Redis that came back is noticed
    /// without a turn.
    fn health(&self) -> BoxFuture<'_, SessionStoreHealth> {
        Box::pin(async move {
            let reused = |store: &Self| match *lock(&store.last_health_ping) {
                Some((at, answered)) if at.elapsed() < HEALTH_PING_REUSE => Some(answered),
                _ => None,
            };
            let answered = match reused(self) {
                Some(answered) => answered,
                None => {
                    // One ping at a time; a `/health` that waited for it
                    // takes its answer.
                    let _running = self.health_ping_running.lock().await;
                    match reused(self) {
                        Some(answered) => answered,
                        None => {
                            let mut connection = self.connection();
                            let timeout = self.operation_timeout.min(HEALTH_PING_TIMEOUT);
                            let answered = self
                                .bounded_by(timeout, "ping", async {
                                    redis::cmd("PING")
                                        .query_async::<String>(&mut connection)
                                        .await
                                })
                                .await
                                .is_ok();
                            *lock(&self.last_health_ping) = Some((Instant::now(), answered));
                            answered
                        }
                    }
                }
            };
            let last = lock(&self.last_failure);
            SessionStoreHealth {
                kind: SessionStoreKind::Redis,
                status: if answered {
                    SessionStoreStatus::Ok
                } else {
                    SessionStoreStatus::Unavailable
                },
                code: (!answered).then_some(SESSION_STORE_UNAVAILABLE),
                address: Some(self.address.clone()),
                last_error: last.message.clone(),
                last_error_at: last
                    .at
                    .map(|at| humantime::format_rfc3339_millis(at).to_string()),
            }
        })
    }
}

/// A session from the fields of its hash. A field that does not decode is
/// left out with a warning (its name only: values may be personal data).
fn session_from_fields(fields: Vec<(Vec<u8>, Vec<u8>)>, key: &str) -> Session {
    let mut session = Session::default();
    for (name, value) in fields {
        let name = String::from_utf8_lossy(&name);
        let decoded = match name.as_ref() {
            FIELD_TURNS => parse_count(&value).map(|turns| session.turns = turns),
            FIELD_VERSION => parse_count(&value).map(|version| session.version = version),
            FIELD_LAST_ACTIVE_MS => parse_count(&value).map(|ms| session.last_active_ms = ms),
            FIELD_LAST_ROUTE => String::from_utf8(value)
                .ok()
                .map(|route| session.last_route = Some(route)),
            other => match other.strip_prefix(VARIABLE_FIELD_PREFIX) {
                Some(variable) => serde_json::from_slice::<serde_json::Value>(&value)
                    .ok()
                    .map(|value| {
                        session.variables.insert(variable.to_owned(), value);
                    }),
                // A field a later version may add: not an error.
                None => Some(()),
            },
        };
        if decoded.is_none() {
            tracing::warn!(
                event_type = "session_store",
                key = %key,
                field = %name,
                "A session field does not decode; it is left out"
            );
        }
    }
    session
}

/// A poisoned lock only means a thread panicked while holding it; what it
/// guards (counters, the last failure) is still a valid value.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn parse_count(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

/// `redis://host:port/db` for an address: what an operator needs to find
/// the Redis, and nothing secret.
fn display_address(addr: &ConnectionAddr, db: i64) -> String {
    match addr {
        ConnectionAddr::Tcp(host, port) => format!("redis://{host}:{port}/{db}"),
        ConnectionAddr::TcpTls { host, port, .. } => format!("rediss://{host}:{port}/{db}"),
        ConnectionAddr::Unix(path) => format!("redis+unix://{}?db={db}", path.display()),
        _ => "redis".to_owned(),
    }
}

/// A URL with its password replaced by `***`, for messages about it; a
/// text that does not parse as a URL is not shown at all.
pub fn redact_url(text: &str) -> String {
    match url::Url::parse(text) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("***"));
            }
            url.to_string()
        }
        Err(_) => "(a URL that does not parse)".to_owned(),
    }
}

/// `text` with every occurrence of `secret` replaced.
fn scrub(text: &str, secret: Option<&str>) -> String {
    match secret {
        Some(secret) if !secret.is_empty() => text.replace(secret, "***"),
        _ => text.to_owned(),
    }
}

/// The text of an error about `url`, with the URL and its password taken
/// out.
fn url_error_text(error: &RedisError, url: &str) -> String {
    let mut text = error.to_string().replace(url, "the URL");
    if let Ok(parsed) = url::Url::parse(url)
        && let Some(password) = parsed.password()
    {
        text = scrub(&text, Some(password));
    }
    text
}
