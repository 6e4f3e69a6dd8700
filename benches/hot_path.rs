//! Micro-benchmarks of the request path: rule classification, body
//! rendering, response validation, and one whole engine turn with an
//! in-process stub service; and of the intent model's training, done at
//! each load. Run with `cargo bench --bench hot_path`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use mcp_orchestrator::engine::{TurnDeps, TurnRequest, run_turn};
use mcp_orchestrator::intent::model::IntentModel;
use mcp_orchestrator::intent::{RuleClassifier, classify_by_rules};
use mcp_orchestrator::project::{CompiledProject, Service};
use mcp_orchestrator::services::{
    CircuitBreakers, OutgoingRequest, RawResponse, ServiceMode, Transport, TransportError,
};
use mcp_orchestrator::session::MemorySessionStore;

fn main() {
    divan::main();
}

fn project() -> CompiledProject {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    mcp_orchestrator::check::check_project(&dir, &HashMap::new())
        .project
        .expect("the shipped project compiles")
}

#[divan::bench(args = ["Can you read me the menu?", "I want to track my order ORD-12345 please", "this is nice"])]
fn classify_rules(bencher: divan::Bencher, text: &str) {
    let project = project();
    bencher.bench(|| classify_by_rules(divan::black_box(&project), divan::black_box(text)));
}

/// Training the intent model of the shipped project (its examples and
/// keywords), as `check` and each reload do.
#[divan::bench(sample_count = 20)]
fn train_intent_model_shipped(bencher: divan::Bencher) {
    let project = project();
    bencher.bench(|| IntentModel::for_intents(divan::black_box(&project.intents)));
}

/// Training on 50 intents × 40 examples: sentences over each intent's own
/// made-up topic words and filler words shared by all (as
/// `bench/generate-project.py --examples 40` writes).
#[divan::bench(sample_count = 10)]
fn train_intent_model_50x40(bencher: divan::Bencher) {
    const FILLERS: [&str; 8] = [
        "can you",
        "i want to",
        "please",
        "tell me about",
        "what about",
        "i need",
        "show me",
        "is there",
    ];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |below: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % below as u64) as usize
    };
    let texts: Vec<Vec<String>> = (0..50)
        .map(|_| {
            let topics: Vec<String> = (0..6)
                .map(|_| {
                    (0..4 + next(6))
                        .map(|_| char::from(b'a' + next(26) as u8))
                        .collect()
                })
                .collect();
            (0..40)
                .map(|_| {
                    let mut words = vec![FILLERS[next(FILLERS.len())].to_owned()];
                    for _ in 0..1 + next(3) {
                        words.push(topics[next(topics.len())].clone());
                    }
                    words.join(" ")
                })
                .collect()
        })
        .collect();
    bencher.bench(|| IntentModel::train(divan::black_box(&texts)));
}

#[divan::bench]
fn validate_menu_response(bencher: divan::Bencher) {
    let project = project();
    let menu = project.services.iter().find(|s| s.name == "menu").unwrap();
    let schema = &menu.response_schema.as_ref().unwrap().validator;
    let body = mcp_orchestrator::document::Document::from(&menu.mock.as_ref().unwrap().body);
    bencher.bench(|| schema.is_valid(divan::black_box(&body)));
}

/// Answers every call with the service's mock, at once.
struct MockTransport;

impl Transport for MockTransport {
    fn send<'a>(
        &'a self,
        service: &'a Service,
        _: OutgoingRequest<'a>,
    ) -> BoxFuture<'a, Result<RawResponse, TransportError>> {
        Box::pin(async move {
            let mock = service.mock.as_ref().unwrap();
            Ok(RawResponse {
                status: 200,
                body: Bytes::from(serde_json::to_vec(&mock.body).unwrap()),
            })
        })
    }
}

#[divan::bench(args = ["Can you read me the menu?", "this is nice"])]
fn engine_turn(bencher: divan::Bencher, text: &str) {
    let project = project();
    let modes: Vec<ServiceMode> = project
        .services
        .iter()
        .map(|_| ServiceMode::Live(url::Url::parse("http://stub.invalid/").unwrap()))
        .collect();
    let sessions = MemorySessionStore::new(Duration::from_secs(600), 1000);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let request = TurnRequest {
        text: text.to_owned(),
        user_id: "bench".to_owned(),
        channel: "web".to_owned(),
        session_id: "bench:web".to_owned(),
        trace_id: "0af7651916cd43dd8448eb211c80319c".to_owned(),
        tenant: None,
        input: serde_json::Map::new(),
        direct: None,
    };
    let breakers = CircuitBreakers::default();
    bencher.bench(|| {
        runtime.block_on(async {
            let deps = TurnDeps {
                project: &project,
                modes: &modes,
                classifier: &RuleClassifier,
                sessions: &sessions,
                transport: &MockTransport,
                breakers: &breakers,
                deadline: tokio::time::Instant::now() + Duration::from_secs(10),
            };
            run_turn(&deps, divan::black_box(&request)).await.unwrap()
        })
    });
}
