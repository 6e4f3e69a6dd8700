//! Graceful shutdown of `server::serve`: the server stops accepting at once,
//! finishes the requests in flight, and returns.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::sync::{Semaphore, mpsc};

use super::{Harness, RunningServer, Stub, http_client, json_response};

/// A menu service that reports each request it receives on `arrived`, then
/// answers only when the test adds a permit to `release`.
async fn gated_menu_stub() -> (Stub, mpsc::UnboundedReceiver<()>, Arc<Semaphore>) {
    let (arrived_sender, arrived) = mpsc::unbounded_channel();
    let arrived_sender = Arc::new(Mutex::new(arrived_sender));
    let release = Arc::new(Semaphore::new(0));
    let stub = Stub::start({
        let release = release.clone();
        move |_, _| {
            let arrived_sender = arrived_sender.clone();
            let release = release.clone();
            async move {
                let _ = arrived_sender.lock().unwrap().send(());
                release.acquire().await.unwrap().forget();
                json_response(200, json!({"output": "Tonight: risotto."}))
            }
        }
    })
    .await;
    (stub, arrived, release)
}

/// Polls, with a deadline, until nothing accepts connections on `addr`.
async fn wait_until_refused(addr: std::net::SocketAddr) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server still accepts connections after the shutdown signal"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_the_request_in_flight_and_refuses_new_ones() {
    let (menu, mut arrived, release) = gated_menu_stub().await;
    let harness = Harness::with_services(&[("MENU_SERVICE_URL", &menu)]);
    let mut server = RunningServer::start(harness.state.clone(), Duration::from_secs(30)).await;

    let in_flight = tokio::spawn({
        let url = server.url("/orchestrate");
        async move {
            let response = http_client()
                .post(url)
                .json(&json!({"text": "menu", "user_id": "u-1"}))
                .send()
                .await?;
            let status = response.status();
            let envelope: serde_json::Value = response.json().await?;
            Ok::<_, reqwest::Error>((status, envelope))
        }
    });

    // The request is now waiting on the menu service.
    arrived.recv().await.unwrap();
    server.trigger_shutdown();
    wait_until_refused(server.addr).await;
    // Only now does the service answer: the request was in flight throughout.
    release.add_permits(1);

    let (status, envelope) = in_flight
        .await
        .unwrap()
        .expect("the in-flight request is answered");
    assert_eq!(status, 200);
    assert_eq!(envelope["route"], "menu");
    assert_eq!(envelope["reply_text"], "Tonight: risotto.");

    let served = tokio::time::timeout(Duration::from_secs(10), &mut server.task)
        .await
        .expect("serve returns once the request in flight is done")
        .unwrap();
    assert!(served.is_ok(), "{served:?}");

    // A new client: a new connection, not one kept alive from before.
    let refused = http_client()
        .post(server.url("/orchestrate"))
        .json(&json!({"text": "menu", "user_id": "u-1"}))
        .send()
        .await;
    let error = refused.expect_err("no new request is served after shutdown");
    assert!(error.is_connect(), "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_returns_after_the_grace_period_when_a_request_hangs() {
    // The stub never answers: its permit is never added.
    let (menu, mut arrived, _release) = gated_menu_stub().await;
    let harness = Harness::with_services(&[("MENU_SERVICE_URL", &menu)]);
    let mut server = RunningServer::start(harness.state.clone(), Duration::from_millis(200)).await;

    let client = http_client();
    let _in_flight = tokio::spawn({
        let url = server.url("/orchestrate");
        async move {
            client
                .post(url)
                .json(&json!({"text": "menu", "user_id": "u-1"}))
                .send()
                .await
        }
    });
    arrived.recv().await.unwrap();
    server.trigger_shutdown();

    let served = tokio::time::timeout(Duration::from_secs(10), &mut server.task)
        .await
        .expect("serve gives up on the hung request after its grace period")
        .unwrap();
    assert!(served.is_ok(), "{served:?}");
    assert!(tokio::net::TcpStream::connect(server.addr).await.is_err());
}

#[tokio::test]
async fn serve_answers_health_and_turns_until_shut_down() {
    let harness = Harness::shipped();
    let mut server = RunningServer::start(harness.state.clone(), Duration::from_secs(5)).await;
    let client = http_client();
    let health: serde_json::Value = client
        .get(server.url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    let response = client
        .post(server.url("/orchestrate"))
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .json(&json!({"text": "hello", "user_id": "u-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["x-trace-id"],
        "0af7651916cd43dd8448eb211c80319c"
    );
    let envelope: serde_json::Value = response.json().await.unwrap();
    assert_eq!(envelope["intent"], "greeting");

    server.trigger_shutdown();
    let served = tokio::time::timeout(Duration::from_secs(10), &mut server.task)
        .await
        .expect("an idle server stops at once")
        .unwrap();
    assert!(served.is_ok(), "{served:?}");
}
