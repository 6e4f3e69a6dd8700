//! Many turns at once: all answered, and turns of one session never lose
//! each other's session update.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use mcp_orchestrator::session::{MemorySessionStore, SessionStore, TurnUpdate};
use serde_json::json;
use tokio::task::JoinSet;

use super::{Harness, RunningServer, Stub, http_client, json_response};

const TURNS: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_requests_to_a_real_server_are_all_answered() {
    let harness = Harness::shipped();
    let server = RunningServer::start(harness.state.clone(), Duration::from_secs(5)).await;
    let client = http_client();
    let texts = [
        "show me the menu",
        "what do you recommend",
        "track my order ORD-1",
        "what do you know about me",
        "hello",
    ];
    let mut requests = JoinSet::new();
    for index in 0..TURNS {
        let client = client.clone();
        let url = server.url("/orchestrate");
        let text = texts[index % texts.len()];
        requests.spawn(async move {
            let response = client
                .post(url)
                .json(&json!({"text": text, "user_id": format!("user-{index}")}))
                .send()
                .await
                .unwrap();
            let status = response.status();
            let envelope: serde_json::Value = response.json().await.unwrap();
            (index, status, envelope)
        });
    }
    let mut answered = BTreeSet::new();
    while let Some(result) = requests.join_next().await {
        let (index, status, envelope) = result.unwrap();
        assert_eq!(status, 200, "{envelope:#}");
        assert_eq!(envelope["decision"], "reply", "{envelope:#}");
        assert_eq!(envelope["session_id"], format!("user-{index}:web"));
        answered.insert(index);
    }
    assert_eq!(answered.len(), TURNS);
    assert_eq!(harness.sessions.len(), TURNS as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_turns_of_one_session_lose_no_update() {
    // Each order gets its own id, so every turn sets a different value.
    let order = Stub::start(|n, _| async move {
        json_response(
            200,
            json!({"order_id": format!("ORD-{n}"), "status": "confirmed"}),
        )
    })
    .await;
    let harness = Arc::new(Harness::with_services(&[("ORDER_SERVICE_URL", &order)]));
    let mut turns = JoinSet::new();
    for _ in 0..TURNS {
        let harness = harness.clone();
        turns.spawn(async move {
            harness
                .turn(json!({
                    "text": "I want to order",
                    "user_id": "u-1",
                    "session_id": "shared-session",
                    "order_items": [{"id": "mn-01", "quantity": 1}],
                }))
                .await
        });
    }
    let mut order_ids = BTreeSet::new();
    while let Some(envelope) = turns.join_next().await {
        let envelope = envelope.unwrap();
        assert_eq!(envelope["route"], "order", "{envelope:#}");
        let reply = envelope["reply_text"].as_str().unwrap().to_owned();
        let order_id = reply
            .split_whitespace()
            .find(|word| word.starts_with("ORD-"))
            .unwrap()
            .to_owned();
        order_ids.insert(order_id);
    }
    assert_eq!(order_ids.len(), TURNS, "every turn placed its own order");
    assert_eq!(order.received().len(), TURNS);

    let session = harness.sessions.load("shared-session").await.unwrap();
    assert_eq!(session.turns, TURNS as u64);
    assert_eq!(session.last_route.as_deref(), Some("order"));
    let last_order_id = session.variables["last_order_id"].as_str().unwrap();
    assert!(order_ids.contains(last_order_id), "{last_order_id}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_applies_to_one_session_keep_every_variable() {
    let store = Arc::new(MemorySessionStore::new(Duration::from_secs(60), 1_000));
    let mut applies = JoinSet::new();
    for index in 0..TURNS {
        let store = store.clone();
        applies.spawn(async move {
            let mut variables = serde_json::Map::new();
            variables.insert(format!("variable_{index}"), json!(index));
            variables.insert("shared".to_owned(), json!(index));
            let update = TurnUpdate {
                route: format!("route_{index}"),
                variables,
            };
            store.apply("one-session", &update).await.unwrap()
        });
    }
    let mut turn_counts = BTreeSet::new();
    while let Some(session) = applies.join_next().await {
        turn_counts.insert(session.unwrap().turns);
    }
    // Each apply saw its own turn number: they were applied one at a time.
    assert_eq!(turn_counts, (1..=TURNS as u64).collect());

    let session = store.load("one-session").await.unwrap();
    assert_eq!(session.turns, TURNS as u64);
    for index in 0..TURNS {
        assert_eq!(
            session.variables.get(&format!("variable_{index}")),
            Some(&json!(index)),
            "variable_{index} was lost"
        );
    }
    assert_eq!(session.variables.len(), TURNS + 1);
    assert!(session.variables["shared"].as_u64().unwrap() < TURNS as u64);
    assert_eq!(store.len(), 1);
}

#[tokio::test]
async fn session_variables_persist_between_turns() {
    let harness = Harness::shipped();
    let order = json!({
        "text": "I want to order",
        "user_id": "u-9",
        "order_items": [{"id": "mn-01", "quantity": 1}],
    });
    harness.turn(order).await;
    harness
        .turn(json!({"text": "hello", "user_id": "u-9"}))
        .await;
    let session = harness.sessions.load("u-9:web").await.unwrap();
    assert_eq!(session.turns, 2);
    assert_eq!(session.last_route.as_deref(), Some("fallback"));
    assert_eq!(session.variables["last_order_id"], "ORD-10421");
    assert!(session.last_active_ms > 0);
}
