//! Several replicas sharing one Redis: concurrent turns of one session
//! spread over two apps all count and lose no variable; a session expires
//! its TTL after its last turn, whichever replica served it.

use std::sync::Arc;
use std::time::Duration;

use mcp_orchestrator::session::SessionStore;
use serde_json::json;
use tokio::task::JoinSet;

use super::{PrivateRedis, redis_store, replica, session_project, visit, wait_until};
use crate::runtime::{RunningServer, http_client};

const TURNS: usize = 200;

/// Generous: these tests count turns; a turn that lost its session to a
/// timeout on a loaded machine would be a false failure. The outage tests
/// hold the store to short timeouts.
const GENEROUS_OPERATION_TIMEOUT: Duration = Duration::from_secs(10);
const GENEROUS_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_count_all_two_hundred_concurrent_turns_of_one_session() {
    if super::skip_without_redis() {
        return;
    }
    let redis = PrivateRedis::start().await;
    let project = session_project(TURNS);
    let ttl = Duration::from_secs(600);
    // Two apps, each with its own store and connection, as two processes
    // would have.
    let start_replica = || {
        RunningServer::start(
            replica(
                project.path(),
                redis_store(&redis.url(), ttl, GENEROUS_OPERATION_TIMEOUT),
                GENEROUS_REQUEST_TIMEOUT,
            ),
            Duration::from_secs(5),
        )
    };
    let servers = [start_replica().await, start_replica().await];
    let client = http_client();
    let started = std::time::Instant::now();
    let mut turns = JoinSet::new();
    for index in 0..TURNS {
        // Alternate replicas, as a round-robin load balancer would.
        let url = servers[index % 2].url("/orchestrate");
        let client = client.clone();
        turns.spawn(async move {
            let response = client
                .post(url)
                .json(&json!({
                    "text": "note", "user_id": "u-1", "session_id": "shared-session",
                    "slot": index.to_string(), "value": index,
                }))
                .send()
                .await
                .unwrap();
            let status = response.status();
            let envelope: serde_json::Value = response.json().await.unwrap();
            (status, envelope)
        });
    }
    while let Some(answer) = turns.join_next().await {
        let (status, envelope) = answer.unwrap();
        assert_eq!(status, 200, "{envelope:#}");
        assert_eq!(envelope["route"], "noted", "{envelope:#}");
    }
    eprintln!(
        "{TURNS} concurrent turns over two replicas answered in {:?}",
        started.elapsed()
    );

    // Read back through a third store: what any replica would see.
    let reader = redis_store(&redis.url(), ttl, GENEROUS_OPERATION_TIMEOUT);
    let session = reader.load("shared-session").await.unwrap();
    eprintln!(
        "turn count observed: {}, variables: {}",
        session.turns,
        session.variables.len()
    );
    assert_eq!(session.turns, TURNS as u64, "a turn was lost");
    assert_eq!(session.version, TURNS as u64);
    assert_eq!(session.last_route.as_deref(), Some("noted"));
    for index in 0..TURNS {
        assert_eq!(
            session.variables.get(&format!("slot_{index}")),
            Some(&json!(index)),
            "slot_{index} was lost"
        );
    }
    assert_eq!(session.variables.len(), TURNS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_expires_its_ttl_after_its_last_turn_on_any_replica() {
    if super::skip_without_redis() {
        return;
    }
    const TTL: Duration = Duration::from_secs(1);
    let redis = PrivateRedis::start().await;
    let project = session_project(0);
    let stores = [
        redis_store(&redis.url(), TTL, GENEROUS_OPERATION_TIMEOUT),
        redis_store(&redis.url(), TTL, GENEROUS_OPERATION_TIMEOUT),
    ];
    let replicas = stores
        .iter()
        .map(|store| {
            replica(
                project.path(),
                store.clone() as Arc<dyn SessionStore>,
                GENEROUS_REQUEST_TIMEOUT,
            )
        })
        .collect::<Vec<_>>();

    // The first turn on one replica, the second on the other.
    assert_eq!(
        visit(&replicas[0], "s-ttl", "t-1").await["route"],
        "first_visit"
    );
    assert_eq!(
        visit(&replicas[1], "s-ttl", "t-2").await["route"],
        "returning"
    );

    let key = stores[0].key("s-ttl");
    assert_eq!(key, "mcp:session:s-ttl");
    let mut admin = redis.admin(&redis.url()).await;
    let ttl_ms: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(
        0 < ttl_ms && ttl_ms <= TTL.as_millis() as i64,
        "PTTL {ttl_ms}"
    );

    wait_until("the session key expires", || {
        let mut admin = admin.clone();
        let key = key.clone();
        async move {
            let exists: i64 = redis::cmd("EXISTS")
                .arg(&key)
                .query_async(&mut admin)
                .await
                .unwrap();
            exists == 0
        }
    })
    .await;

    // The next turn, on either replica, starts a new session.
    assert_eq!(
        visit(&replicas[1], "s-ttl", "t-3").await["route"],
        "first_visit"
    );
    let session = stores[0].load("s-ttl").await.unwrap();
    assert_eq!(session.turns, 1);
    assert_eq!(session.variables["visited"], true);
}

/// A platform delivery repeated to another replica is answered once: the
/// replicas share the seen deliveries (and the sessions) through Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_repeated_to_another_replica_runs_once() {
    if super::skip_without_redis() {
        return;
    }
    const TOKEN: &str = "replica-webhook-token-0123456789";
    let redis = PrivateRedis::start().await;
    let project = session_project(0);
    std::fs::write(
        project.path().join("flows/channels.yaml"),
        format!(
            r#"channels:
  partner:
    kind: webhook
    verify: {{ token: {{ header: X-Token, value: "{TOKEN}" }} }}
    request: {{ text: "{{{{ body.text }}}}", user_id: "{{{{ body.user }}}}", message_id: "{{{{ body.id }}}}" }}
    reply: {{ response: {{ text: "{{{{ reply_text }}}}" }} }}
"#
        ),
    )
    .unwrap();
    let ttl = Duration::from_secs(600);
    let start_replica = || {
        RunningServer::start(
            replica(
                project.path(),
                redis_store(&redis.url(), ttl, GENEROUS_OPERATION_TIMEOUT),
                GENEROUS_REQUEST_TIMEOUT,
            ),
            Duration::from_secs(5),
        )
    };
    let servers = [start_replica().await, start_replica().await];
    let client = http_client();
    let deliver = |server: usize, id: &str| {
        let request = client
            .post(servers[server].url("/channels/partner"))
            .header("x-token", TOKEN)
            .json(&json!({"id": id, "user": "u-7", "text": "visit"}));
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            response.json::<serde_json::Value>().await.unwrap()
        }
    };
    assert_eq!(deliver(0, "m-1").await, json!({"text": "Welcome."}));
    // The same delivery, repeated to the other replica: acknowledged, not run.
    assert_eq!(deliver(1, "m-1").await, json!({}));
    // A new message of the same user on the other replica sees the session
    // the first one left.
    assert_eq!(deliver(1, "m-2").await, json!({"text": "Welcome back."}));
    let health: serde_json::Value = client
        .get(servers[1].url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let partner = &health["channels"][0];
    assert_eq!(partner["duplicates"], 1, "{partner:#}");
    assert_eq!(partner["turns"], 1, "{partner:#}");
}
