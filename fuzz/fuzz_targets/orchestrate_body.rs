//! The `/orchestrate` body through the real router: parsing, the request
//! schema, the envelope fields, then the turn on the shipped project with
//! every service on its mock. Any body gets an answer below 500 — a
//! problem+json error or an envelope — never a panic.

#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use libfuzzer_sys::fuzz_target;
use mcp_orchestrator::intent::RuleClassifier;
use mcp_orchestrator::server::{self, AppState, Environment, RuntimeSettings};
use mcp_orchestrator::project::Service;
use mcp_orchestrator::services::{OutgoingRequest, RawResponse, Transport, TransportError};
use mcp_orchestrator::session::MemorySessionStore;
use tower::ServiceExt;

struct Fixture {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        // No per-user limit: the fuzzer sends one user's turns by the
        // thousand.
        let environment = std::collections::HashMap::from([(
            "PER_USER_RATE".to_owned(),
            "1000000000/s".to_owned(),
        )]);
        let checked = mcp_orchestrator::check::check_project(&root, &environment);
        let project = checked.project.expect("the shipped project compiles");
        let deployment = server::deploy(project, Environment::Development, true, 1)
            .expect("every service runs on its mock");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let state = runtime.block_on(async {
            Arc::new(AppState {
                deployment: arc_swap::ArcSwap::from_pointee(deployment),
                classifier: Arc::new(RuleClassifier),
                sessions: Arc::new(MemorySessionStore::new(Duration::from_secs(60), 10_000)),
                transport: Arc::new(NoNetwork),
                settings: RuntimeSettings {
                    environment: Environment::Development,
                    request_timeout: Duration::from_secs(10),
                    connections: Default::default(),
                },
                reload: Default::default(),
                admission: Default::default(),
                breakers: Default::default(),
            })
        });
        Fixture {
            runtime,
            router: server::app(state),
        }
    })
}

/// Every service runs on its mock; a call that reached the network would
/// be a bug, answered as a refused connection.
struct NoNetwork;

impl Transport for NoNetwork {
    fn send<'a>(
        &'a self,
        _: &'a Service,
        _: OutgoingRequest<'a>,
    ) -> futures_util::future::BoxFuture<'a, Result<RawResponse, TransportError>> {
        Box::pin(async { Err(TransportError::Connect("no network in the fuzzer".to_owned())) })
    }
}

fuzz_target!(|data: &[u8]| {
    let fixture = fixture();
    let request = Request::post("/orchestrate")
        .header("content-type", "application/json")
        .body(Body::from(data.to_vec()))
        .expect("a request");
    let response = fixture
        .runtime
        .block_on(fixture.router.clone().oneshot(request))
        .expect("the router never fails");
    assert!(
        response.status().as_u16() < 500,
        "status {} for {:?}",
        response.status(),
        String::from_utf8_lossy(data)
    );
});
