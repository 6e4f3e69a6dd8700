//! One suite of `SessionStore` tests, run against both stores: every case
//! is a function of a `Backend`, and `against_both_stores!` makes a test of
//! it for the memory store and one for the Redis store.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use mcp_orchestrator::session::{
    MemorySessionStore, Session, SessionStore, SessionStoreKind, SessionStoreStatus, TurnUpdate,
    now_ms,
};
use serde_json::{Value as Json, json};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{PrivateRedis, WAIT_DEADLINE, redis_store};

/// Time to live of the stores of the suite, unless a case needs a short one.
const LONG_TTL: Duration = Duration::from_secs(600);

/// Operation timeout of the Redis stores of the suite: generous, since the
/// suite tests what is stored, not how fast (the outage tests do that).
const SUITE_OPERATION_TIMEOUT: Duration = Duration::from_secs(10);

/// A store to test: in memory, or in a private Redis.
enum Backend {
    Memory,
    Redis(PrivateRedis),
}

impl Backend {
    async fn redis() -> Backend {
        Backend::Redis(PrivateRedis::start().await)
    }

    /// A new store over the backend (Redis stores share the server).
    fn store(&self, ttl: Duration) -> Arc<dyn SessionStore> {
        match self {
            Backend::Memory => Arc::new(MemorySessionStore::new(ttl, 10_000)),
            Backend::Redis(redis) => redis_store(&redis.url(), ttl, SUITE_OPERATION_TIMEOUT),
        }
    }

    fn kind(&self) -> SessionStoreKind {
        match self {
            Backend::Memory => SessionStoreKind::Memory,
            Backend::Redis(_) => SessionStoreKind::Redis,
        }
    }
}

/// A test of each case against the memory store (`memory_store::<case>`)
/// and against Redis (`redis_store::<case>`).
macro_rules! against_both_stores {
    ($($case:ident),* $(,)?) => {
        mod memory_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(&super::Backend::Memory).await;
                }
            )*
        }
        mod redis_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    if super::super::skip_without_redis() {
                        return;
                    }
                    super::$case(&super::Backend::redis().await).await;
                }
            )*
        }
    };
}

against_both_stores!(
    an_unknown_session_loads_as_a_new_empty_one,
    apply_returns_the_session_after_the_update,
    a_later_turn_merges_its_variables_into_the_earlier_ones,
    every_kind_of_json_value_survives_the_store,
    loading_changes_nothing,
    sessions_are_kept_apart,
    two_hundred_concurrent_applies_to_one_session_lose_nothing,
    a_session_is_forgotten_its_ttl_after_its_last_turn,
    health_reports_the_kind_and_ok,
);

fn update(route: &str, variables: Json) -> TurnUpdate {
    TurnUpdate {
        route: route.to_owned(),
        variables: variables.as_object().unwrap().clone(),
    }
}

async fn an_unknown_session_loads_as_a_new_empty_one(backend: &Backend) {
    let store = backend.store(LONG_TTL);
    let session = store.load("never-seen").await.unwrap();
    assert_eq!(session, Session::default());
}

async fn apply_returns_the_session_after_the_update(backend: &Backend) {
    let store = backend.store(LONG_TTL);
    let before = now_ms();
    let session = store
        .apply("s-1", &update("menu", json!({"table": 7})))
        .await
        .unwrap();
    let after = now_ms();
    assert_eq!(session.turns, 1);
    assert_eq!(session.version, 1);
    assert_eq!(session.last_route.as_deref(), Some("menu"));
    assert_eq!(Json::Object(session.variables.clone()), json!({"table": 7}));
    assert!(
        (before..=after).contains(&session.last_active_ms),
        "{before} <= {} <= {after}",
        session.last_active_ms
    );
    assert_eq!(store.load("s-1").await.unwrap(), session);
}

async fn a_later_turn_merges_its_variables_into_the_earlier_ones(backend: &Backend) {
    let store = backend.store(LONG_TTL);
    store
        .apply(
            "s-1",
            &update("order", json!({"kept": 1, "replaced": "old"})),
        )
        .await
        .unwrap();
    let session = store
        .apply(
            "s-1",
            &update("track", json!({"replaced": "new", "added": [1, 2]})),
        )
        .await
        .unwrap();
    assert_eq!(session.turns, 2);
    assert_eq!(session.version, 2);
    assert_eq!(session.last_route.as_deref(), Some("track"));
    let variables: std::collections::BTreeMap<_, _> = session.variables.into_iter().collect();
    assert_eq!(
        serde_json::to_value(variables).unwrap(),
        json!({"kept": 1, "replaced": "new", "added": [1, 2]})
    );
}

async fn every_kind_of_json_value_survives_the_store(backend: &Backend) {
    let store = backend.store(LONG_TTL);
    let values = json!({
        "text": "Grüße, \"quoted\"\nand a new line ✓",
        "empty_text": "",
        "integer": -42,
        "large": u64::MAX,
        "float": 27.5,
        "yes": true,
        "no": false,
        "nothing": null,
        "list": [1, "two", {"three": 3}],
        "empty_list": [],
        "object": {"nested": {"deeper": [true, null]}},
        "empty_object": {},
        "name with spaces and : colons": 1,
    });
    store
        .apply("s-1", &update("r", values.clone()))
        .await
        .unwrap();
    let loaded = store.load("s-1").await.unwrap();
    for (name, value) in values.as_object().unwrap() {
        assert_eq!(loaded.variables.get(name), Some(value), "{name}");
    }
    assert_eq!(loaded.variables.len(), values.as_object().unwrap().len());
}

async fn loading_changes_nothing(backend: &Backend) {
    let store = backend.store(LONG_TTL);
    let applied = store
        .apply("s-1", &update("r", json!({"a": 1})))
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(store.load("s-1").await.unwrap(), applied);
    }
}

async fn sessions_are_kept_apart(backend: &Backend) {
    let store = backend.store(LONG_TTL);
    store
        .apply("alice", &update("menu", json!({"who": "alice"})))
        .await
        .unwrap();
    store
        .apply("alice", &update("order", json!({})))
        .await
        .unwrap();
    store
        .apply("bob", &update("track", json!({"who": "bob"})))
        .await
        .unwrap();
    let alice = store.load("alice").await.unwrap();
    let bob = store.load("bob").await.unwrap();
    assert_eq!((alice.turns, bob.turns), (2, 1));
    assert_eq!(alice.variables["who"], "alice");
    assert_eq!(bob.variables["who"], "bob");
    assert_eq!(bob.last_route.as_deref(), Some("track"));
}

async fn two_hundred_concurrent_applies_to_one_session_lose_nothing(backend: &Backend) {
    const TURNS: u64 = 200;
    let store = backend.store(LONG_TTL);
    let mut applies = JoinSet::new();
    for index in 0..TURNS {
        let store = store.clone();
        applies.spawn(async move {
            let variables = json!({format!("variable_{index}"): index, "shared": index});
            store
                .apply("one-session", &update(&format!("route_{index}"), variables))
                .await
                .unwrap()
        });
    }
    let mut turn_counts = BTreeSet::new();
    while let Some(session) = applies.join_next().await {
        turn_counts.insert(session.unwrap().turns);
    }
    // Each apply saw its own turn number: they were applied one at a time.
    assert_eq!(turn_counts, (1..=TURNS).collect());
    let session = store.load("one-session").await.unwrap();
    assert_eq!(session.turns, TURNS);
    assert_eq!(session.version, TURNS);
    for index in 0..TURNS {
        assert_eq!(
            session.variables.get(&format!("variable_{index}")),
            Some(&json!(index)),
            "variable_{index} was lost"
        );
    }
    assert_eq!(session.variables.len() as u64, TURNS + 1);
}

async fn a_session_is_forgotten_its_ttl_after_its_last_turn(backend: &Backend) {
    const TTL: Duration = Duration::from_secs(1);
    let store = backend.store(TTL);
    store
        .apply("s-1", &update("r", json!({"a": 1})))
        .await
        .unwrap();
    let applied_at = Instant::now();
    store
        .apply("s-1", &update("r", json!({"b": 2})))
        .await
        .unwrap();
    // Loading right away finds it (the memory store's time-to-idle is
    // reset by reads; Redis's TTL is not: both forget a session a TTL after
    // its last turn when no turn reads it).
    assert_eq!(store.load("s-1").await.unwrap().turns, 2);
    // Each look waits a TTL and a little more since the one before, as a
    // read of the memory store starts its time-to-idle again.
    let pause = TTL + TTL / 5;
    let deadline = Instant::now() + WAIT_DEADLINE;
    loop {
        tokio::time::sleep(pause).await;
        let session = store.load("s-1").await.unwrap();
        if session == Session::default() {
            break;
        }
        assert!(Instant::now() < deadline, "still there: {session:?}");
    }
    assert!(applied_at.elapsed() >= TTL);
    // A new turn starts afresh.
    let session = store.apply("s-1", &update("r", json!({}))).await.unwrap();
    assert_eq!(session.turns, 1);
    assert!(session.variables.is_empty());
}

async fn health_reports_the_kind_and_ok(backend: &Backend) {
    let store = backend.store(LONG_TTL);
    let health = store.health().await;
    assert_eq!(health.kind, backend.kind());
    assert_eq!(health.status, SessionStoreStatus::Ok);
    assert_eq!(health.code, None);
    assert_eq!(health.last_error, None);
}
