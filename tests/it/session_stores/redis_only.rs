//! What only the Redis store has: its key layout, TTL refresh, URLs with a
//! password, a database and TLS, a start while Redis is down, and fields it
//! cannot read.

use std::time::Duration;

use mcp_orchestrator::session::{
    RedisSessionConfig, RedisSessionStore, SessionStore, SessionStoreStatus, TurnUpdate,
};
use serde_json::json;
use tokio::io::AsyncReadExt;

use super::{PrivateRedis, free_port, redis_store, wait_until};

const TTL: Duration = Duration::from_secs(600);
const OPERATION_TIMEOUT: Duration = Duration::from_secs(5);

fn update(variables: serde_json::Value) -> TurnUpdate {
    TurnUpdate {
        route: "r".to_owned(),
        variables: variables.as_object().unwrap().clone(),
    }
}

fn store_with(url: &str, key_prefix: &str, operation_timeout: Duration) -> RedisSessionStore {
    RedisSessionStore::new(RedisSessionConfig {
        url: url.to_owned(),
        key_prefix: key_prefix.to_owned(),
        ttl: TTL,
        operation_timeout,
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_one_hash_under_the_prefix_and_every_turn_refreshes_its_ttl() {
    if super::skip_without_redis() {
        return;
    }
    let redis = PrivateRedis::start().await;
    let store = store_with(&redis.url(), "tenant-a:sessions:", OPERATION_TIMEOUT);
    store
        .apply(
            "s-1",
            &update(json!({"last_order_id": "ORD-1", "count": 2})),
        )
        .await
        .unwrap();
    let key = "tenant-a:sessions:s-1";
    assert_eq!(store.key("s-1"), key);
    let mut admin = redis.admin(&redis.url()).await;
    let mut fields: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(key)
        .query_async(&mut admin)
        .await
        .unwrap();
    fields.retain(|(name, _)| name != "last_active_ms");
    fields.sort();
    assert_eq!(
        fields,
        [
            ("last_route", "r"),
            ("turns", "1"),
            ("var:count", "2"),
            ("var:last_order_id", "\"ORD-1\""),
            ("version", "1"),
        ]
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
    );

    // Shorten the TTL by hand: the next turn sets it back to the full TTL.
    let _: () = redis::cmd("PEXPIRE")
        .arg(key)
        .arg(5_000)
        .query_async(&mut admin)
        .await
        .unwrap();
    store.apply("s-1", &update(json!({}))).await.unwrap();
    let ttl_ms: i64 = redis::cmd("PTTL")
        .arg(key)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(
        ttl_ms > 5_000 && ttl_ms <= TTL.as_millis() as i64,
        "PTTL {ttl_ms}"
    );
    // A load does not touch the TTL.
    let _: () = redis::cmd("PEXPIRE")
        .arg(key)
        .arg(5_000)
        .query_async(&mut admin)
        .await
        .unwrap();
    store.load("s-1").await.unwrap();
    let ttl_ms: i64 = redis::cmd("PTTL")
        .arg(key)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(ttl_ms <= 5_000, "PTTL {ttl_ms}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_field_that_does_not_decode_is_left_out_and_the_rest_is_read() {
    if super::skip_without_redis() {
        return;
    }
    let redis = PrivateRedis::start().await;
    let store = redis_store(&redis.url(), TTL, OPERATION_TIMEOUT);
    let mut admin = redis.admin(&redis.url()).await;
    let _: () = redis::cmd("HSET")
        .arg(store.key("s-1"))
        .arg(&[
            ("turns", "3"),
            ("version", "not a number"),
            ("var:good", "{\"a\":1}"),
            ("var:broken", "{not json"),
            ("field_of_a_later_version", "x"),
        ])
        .query_async(&mut admin)
        .await
        .unwrap();
    let session = store.load("s-1").await.unwrap();
    assert_eq!(session.turns, 3);
    assert_eq!(session.version, 0);
    assert_eq!(
        serde_json::Value::Object(session.variables.clone()),
        json!({"good": {"a": 1}})
    );
    // A turn still applies: a count that is not a number counts as 0.
    let session = store
        .apply("s-1", &update(json!({"new": true})))
        .await
        .unwrap();
    assert_eq!((session.turns, session.version), (4, 1));
    assert_eq!(
        serde_json::Value::Object(session.variables.clone()),
        json!({"good": {"a": 1}, "new": true})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_and_a_database_in_the_url_are_used_and_never_shown() {
    if super::skip_without_redis() {
        return;
    }
    const PASSWORD: &str = "s3cret-redis-pass";
    let redis = PrivateRedis::start_with(&["--requirepass", PASSWORD]).await;
    let url = format!("redis://:{PASSWORD}@127.0.0.1:{}/5", redis.port);
    let store = redis_store(&url, TTL, OPERATION_TIMEOUT);
    store.apply("s-1", &update(json!({"a": 1}))).await.unwrap();

    let mut admin_database_5 = redis.admin(&url).await;
    let exists: i64 = redis::cmd("EXISTS")
        .arg(store.key("s-1"))
        .query_async(&mut admin_database_5)
        .await
        .unwrap();
    assert_eq!(exists, 1, "the session is in database 5");
    let mut admin_database_0 = redis
        .admin(&format!("redis://:{PASSWORD}@127.0.0.1:{}/0", redis.port))
        .await;
    let exists: i64 = redis::cmd("EXISTS")
        .arg(store.key("s-1"))
        .query_async(&mut admin_database_0)
        .await
        .unwrap();
    assert_eq!(exists, 0);

    let health = store.health().await;
    assert_eq!(health.status, SessionStoreStatus::Ok);
    assert_eq!(
        health.address.as_deref(),
        Some(format!("redis://127.0.0.1:{}/5", redis.port).as_str())
    );
    let config = RedisSessionConfig {
        url: url.clone(),
        key_prefix: "p:".to_owned(),
        ttl: TTL,
        operation_timeout: OPERATION_TIMEOUT,
    };
    let shown = format!("{config:?} {}", serde_json::to_string(&health).unwrap());
    assert!(!shown.contains(PASSWORD), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_password_is_reported_without_it_and_the_store_recovers_once_redis_accepts_it() {
    if super::skip_without_redis() {
        return;
    }
    const RIGHT: &str = "the-right-password";
    const NEW: &str = "the-password-of-tomorrow";
    let redis = PrivateRedis::start_with(&["--requirepass", RIGHT]).await;
    // The store already has the password Redis will be given.
    let store = redis_store(
        &format!("redis://:{NEW}@127.0.0.1:{}", redis.port),
        TTL,
        Duration::from_millis(500),
    );
    let error = store.load("s-1").await.unwrap_err();
    let health = store.health().await;
    assert_eq!(health.status, SessionStoreStatus::Unavailable);
    let shown = format!(
        "{error} {error:?} {}",
        serde_json::to_string(&health).unwrap()
    );
    assert!(!shown.contains(NEW), "{shown}");
    assert_eq!(error.code(), "session_store_unavailable");

    let mut admin = redis
        .admin(&format!("redis://:{RIGHT}@127.0.0.1:{}", redis.port))
        .await;
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "requirepass", NEW])
        .query_async(&mut admin)
        .await
        .unwrap();
    // A refused AUTH is not an IO error: the connection manager would keep
    // it; the store replaces the manager and so recovers.
    wait_until("the store accepts the new password", || {
        let store = store.clone();
        async move { store.load("s-1").await.is_ok() }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_made_while_redis_is_down_starts_working_when_redis_comes_up() {
    if super::skip_without_redis() {
        return;
    }
    let port = free_port();
    let started = tokio::time::Instant::now();
    let store = redis_store(
        &format!("redis://127.0.0.1:{port}"),
        TTL,
        Duration::from_millis(250),
    );
    assert!(store.load("s-1").await.is_err());
    assert!(store.apply("s-1", &update(json!({}))).await.is_err());
    assert_eq!(store.health().await.status, SessionStoreStatus::Unavailable);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    let _redis = PrivateRedis::start_on(port).await;
    wait_until("the store connects", || {
        let store = store.clone();
        async move { store.apply("s-1", &update(json!({"a": 1}))).await.is_ok() }
    })
    .await;
    assert_eq!(store.health().await.status, SessionStoreStatus::Ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rediss_url_makes_a_tls_connection_with_the_process_provider() {
    const PASSWORD: &str = "tls-password-never-shown";
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Not Redis: a socket that records the first bytes a client sends.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let first_bytes = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut bytes = [0u8; 3];
        socket.read_exact(&mut bytes).await.unwrap();
        bytes
    });
    let store = redis_store(
        &format!("rediss://:{PASSWORD}@127.0.0.1:{port}/0"),
        TTL,
        Duration::from_millis(500),
    );
    let health = store.health().await;
    assert_eq!(health.status, SessionStoreStatus::Unavailable);
    assert_eq!(
        health.address.as_deref(),
        Some(format!("rediss://127.0.0.1:{port}/0").as_str())
    );
    assert!(!serde_json::to_string(&health).unwrap().contains(PASSWORD));
    // A TLS handshake record (0x16), version 3.x: the client built its TLS
    // configuration (rustls, ring) and started a handshake.
    let bytes = tokio::time::timeout(super::WAIT_DEADLINE, first_bytes)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((bytes[0], bytes[1]), (0x16, 0x03), "{bytes:?}");
}

#[test]
fn a_url_that_cannot_work_is_refused_with_its_password_hidden() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _inside = runtime.enter();
    for url in [
        "http://user:hidden-password@127.0.0.1:6379",
        "redis://:hidden-password@127.0.0.1:notaport",
        "not a url hidden-password",
    ] {
        let error = RedisSessionStore::new(RedisSessionConfig {
            url: url.to_owned(),
            key_prefix: "p:".to_owned(),
            ttl: TTL,
            operation_timeout: OPERATION_TIMEOUT,
        })
        .err()
        .unwrap_or_else(|| panic!("`{url}` was accepted"));
        let message = error.to_string();
        assert!(!message.contains("hidden-password"), "{message}");
        assert!(message.contains("redis://"), "{message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_redis_refuses_fails_that_turn_only_not_the_store() {
    if super::skip_without_redis() {
        return;
    }
    let redis = PrivateRedis::start().await;
    let store = store_with(&redis.url(), "p:", OPERATION_TIMEOUT);
    store.apply("s-1", &update(json!({}))).await.unwrap();
    let mut admin = redis.admin(&redis.url()).await;
    // The ids of the connections other than the test's own.
    async fn store_connections(admin: &mut redis::aio::MultiplexedConnection) -> Vec<String> {
        let own: i64 = redis::cmd("CLIENT")
            .arg("ID")
            .query_async(admin)
            .await
            .unwrap();
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(admin)
            .await
            .unwrap();
        list.lines()
            .filter_map(|line| line.split(' ').find_map(|field| field.strip_prefix("id=")))
            .filter(|id| *id != own.to_string())
            .map(str::to_owned)
            .collect()
    }
    let before = store_connections(&mut admin).await;
    assert_eq!(before.len(), 1, "{before:?}");
    // Something else wrote a string where a session hash would be.
    let _: () = redis::cmd("SET")
        .arg("p:foreign")
        .arg("not a hash")
        .query_async(&mut admin)
        .await
        .unwrap();
    let error = store.load("foreign").await.unwrap_err();
    assert!(error.to_string().contains("WRONGTYPE"), "{error}");
    // The store is still available, on the same connection: no outage.
    let health = store.health().await;
    assert_eq!(health.status, SessionStoreStatus::Ok, "{health:?}");
    assert_eq!(store.load("s-1").await.unwrap().turns, 1);
    assert_eq!(
        store_connections(&mut admin).await,
        before,
        "the store reconnected"
    );
}

/// Channel deliveries are remembered with `SET NX` under the prefix and a
/// NUL byte, which no session key holds: a session id cannot claim or
/// shadow a delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_are_claimed_once_and_no_session_id_reaches_their_keys() {
    if super::skip_without_redis() {
        return;
    }
    let redis = PrivateRedis::start().await;
    let store = store_with(&redis.url(), "mcp:session:", OPERATION_TIMEOUT);
    let ttl = Duration::from_secs(3600);
    assert!(matches!(
        store.first_delivery("telegram:1001", ttl).await,
        Some(Ok(true))
    ));
    assert!(matches!(
        store.first_delivery("telegram:1001", ttl).await,
        Some(Ok(false))
    ));
    let mut admin = redis.admin(&redis.url()).await;
    let key = "mcp:session:\0delivery:telegram:1001";
    let remaining: i64 = redis::cmd("PTTL")
        .arg(key)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(remaining > 0 && remaining <= 3_600_000, "{remaining}");
    store.forget_delivery("telegram:1001").await;
    assert!(matches!(
        store.first_delivery("telegram:1001", ttl).await,
        Some(Ok(true))
    ));

    // A session whose id spells the delivery's key lands elsewhere.
    let forged = "\0delivery:telegram:1002";
    assert_ne!(store.key(forged), "mcp:session:\0delivery:telegram:1002");
    store.apply(forged, &update(json!({"x": 1}))).await.unwrap();
    assert!(matches!(
        store.first_delivery("telegram:1002", ttl).await,
        Some(Ok(true))
    ));
}
