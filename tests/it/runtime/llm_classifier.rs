//! The LLM classifier against a fake OpenAI-compatible server on port 0:
//! a good answer is used; anything else (undeclared intent, garbage, HTTP
//! error, no answer in time) falls back to the keyword rules.

use std::sync::Arc;
use std::time::Duration;

use mcp_orchestrator::intent::{Classification, Classifier, LlmClassifier, LlmConnection, Source};
use mcp_orchestrator::project::CompiledProject;
use serde_json::{Value as Json, json};

use super::{
    Harness, HarnessOptions, Stub, compile_project, http_client, json_response, project_copy_with,
    turn_request,
};
use crate::repository_root;

/// A chat completion whose message content is `content`.
fn completion(content: &str) -> Json {
    json!({
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "stop",
        }],
    })
}

/// A fake OpenAI server that always answers `status` with `body`.
async fn fake_openai(status: u16, body: Json) -> Stub {
    Stub::json(status, body).await
}

fn classifier_for(fake: &Stub, model: Option<&str>) -> LlmClassifier {
    LlmClassifier::new(
        LlmConnection {
            api_key: "test-key".to_owned(),
            base_url: Some(format!("{}/v1", fake.url())),
            model: model.map(str::to_owned),
        },
        http_client(),
    )
}

fn shipped_project() -> CompiledProject {
    compile_project(&repository_root(), &[])
}

/// A copy of the shipped project whose classifier waits 30 s instead of 2 s,
/// so that a good answer is never cut on a loaded machine.
fn patient_project_dir() -> tempfile::TempDir {
    project_copy_with("intents.yaml", |text| {
        text.replace("timeout: 2s", "timeout: 30s")
    })
}

fn patient_project() -> CompiledProject {
    compile_project(patient_project_dir().path(), &[])
}

fn intent_name<'a>(project: &'a CompiledProject, classification: &Classification) -> &'a str {
    &project.intent(classification.intent).name
}

#[tokio::test]
async fn good_answer_is_the_llm_intent() {
    let fake = fake_openai(200, completion(r#"{"intent":"menu","confidence":0.9}"#)).await;
    let project = patient_project();
    // The rules would say greeting: the answer is the model's.
    let classification = classifier_for(&fake, None)
        .classify(&project, "hello")
        .await;
    assert_eq!(intent_name(&project, &classification), "menu");
    assert_eq!(classification.source, Source::Llm);
    assert_eq!(classification.confidence, 0.9);
    assert!(classification.fallback_reason.is_none());

    let request = fake.only_request();
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, "/v1/chat/completions");
    assert_eq!(request.header("authorization"), Some("Bearer test-key"));
    let body = &request.body;
    assert_eq!(body["model"], "gpt-4o-mini", "the project's model");
    let messages = body["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "{body:#}");
    assert_eq!(messages[0]["role"], "system");
    assert_eq!(messages[1]["role"], "user");
    assert_eq!(messages[1]["content"], "hello");
    assert_eq!(body["response_format"]["type"], "json_schema");
    let declared: Vec<Json> = project
        .intents
        .iter()
        .map(|intent| Json::from(intent.name.as_str()))
        .collect();
    assert_eq!(declared.len(), 8);
    assert_eq!(
        body["response_format"]["json_schema"]["schema"]["properties"]["intent"]["enum"],
        Json::Array(declared),
        "{body:#}"
    );
}

#[tokio::test]
async fn model_of_the_connection_overrides_the_project_s() {
    let fake = fake_openai(200, completion(r#"{"intent":"order","confidence":0.8}"#)).await;
    let project = patient_project();
    let classification = classifier_for(&fake, Some("local-model"))
        .classify(&project, "hello")
        .await;
    assert_eq!(intent_name(&project, &classification), "order");
    assert_eq!(fake.only_request().body["model"], "local-model");
}

#[tokio::test]
async fn low_confidence_answer_is_the_fallback_intent() {
    let fake = fake_openai(200, completion(r#"{"intent":"menu","confidence":0.2}"#)).await;
    let project = patient_project();
    let classification = classifier_for(&fake, None)
        .classify(&project, "hello")
        .await;
    assert_eq!(intent_name(&project, &classification), "smalltalk");
    assert_eq!(classification.source, Source::Llm);
}

/// Asserts the classification of "hello" came from the rules (greeting),
/// with the reason the LLM was not used.
#[track_caller]
fn assert_rules_fallback(project: &CompiledProject, classification: &Classification) {
    assert_eq!(classification.source, Source::Rules);
    assert_eq!(intent_name(project, classification), "greeting");
    assert_eq!(classification.confidence, 0.7);
    assert!(
        classification
            .fallback_reason
            .as_ref()
            .is_some_and(|reason| !reason.is_empty()),
        "{classification:?}"
    );
}

#[tokio::test]
async fn undeclared_intent_falls_back_to_the_rules() {
    let fake = fake_openai(
        200,
        completion(r#"{"intent":"pizza_party","confidence":0.99}"#),
    )
    .await;
    let project = shipped_project();
    let classification = classifier_for(&fake, None)
        .classify(&project, "hello")
        .await;
    assert_rules_fallback(&project, &classification);
    assert!(
        classification
            .fallback_reason
            .unwrap()
            .contains("pizza_party")
    );
}

#[tokio::test]
async fn garbage_content_falls_back_to_the_rules() {
    for content in [
        "I think it is the menu",
        r#"{"intent":"menu"}"#,
        r#"{"intent":"menu","confidence":7}"#,
    ] {
        let fake = fake_openai(200, completion(content)).await;
        let project = shipped_project();
        let classification = classifier_for(&fake, None)
            .classify(&project, "hello")
            .await;
        assert_rules_fallback(&project, &classification);
    }
}

#[tokio::test]
async fn answer_that_is_not_a_completion_falls_back_to_the_rules() {
    let fake = fake_openai(200, json!({"unexpected": true})).await;
    let project = shipped_project();
    let classification = classifier_for(&fake, None)
        .classify(&project, "hello")
        .await;
    assert_rules_fallback(&project, &classification);
}

/// The error body OpenAI sends with a 5xx.
fn server_error() -> Json {
    json!({"error": {"message": "overloaded", "type": "server_error", "param": null, "code": null}})
}

#[tokio::test]
async fn http_500_falls_back_to_the_rules() {
    let fake = fake_openai(500, server_error()).await;
    let project = shipped_project();
    let classification = classifier_for(&fake, None)
        .classify(&project, "hello")
        .await;
    assert_rules_fallback(&project, &classification);
    assert!(!fake.received().is_empty());
}

#[tokio::test]
async fn http_500_is_tried_twice_per_classification() {
    let fake = fake_openai(500, server_error()).await;
    let project = shipped_project();
    let classification = classifier_for(&fake, None)
        .classify(&project, "hello")
        .await;
    assert_rules_fallback(&project, &classification);
    // src/intent.rs: "At most this many tries of the LLM per classification."
    assert_eq!(fake.received().len(), 2, "two tries per classification");
}

#[tokio::test]
async fn retry_after_does_not_hold_the_classification() {
    let fake = Stub::start(|_, _| async {
        let mut response = json_response(503, server_error());
        response
            .headers_mut()
            .insert("retry-after", axum::http::HeaderValue::from_static("30"));
        response
    })
    .await;
    let project = shipped_project();
    let classification = tokio::time::timeout(
        Duration::from_secs(10),
        classifier_for(&fake, None).classify(&project, "hello"),
    )
    .await
    .expect("the classification ends by the classifier's timeout");
    assert_rules_fallback(&project, &classification);
    // "no Retry-After can make a turn wait": the classifier's own second try
    // follows the first at once.
    assert_eq!(fake.received().len(), 2, "{classification:?}");
}

#[tokio::test]
async fn unreachable_server_falls_back_to_the_rules() {
    let url = super::closed_port_url().await;
    let classifier = LlmClassifier::new(
        LlmConnection {
            api_key: "test-key".to_owned(),
            base_url: Some(format!("{url}/v1")),
            model: None,
        },
        http_client(),
    );
    let project = shipped_project();
    let classification = classifier.classify(&project, "hello").await;
    assert_rules_fallback(&project, &classification);
}

#[tokio::test]
async fn answer_slower_than_the_classifier_timeout_falls_back_to_the_rules() {
    let project_dir = project_copy_with("intents.yaml", |text| {
        text.replace("timeout: 2s", "timeout: 300ms")
    });
    let project = compile_project(project_dir.path(), &[]);
    assert_eq!(project.classifier.llm.timeout, Duration::from_millis(300));
    let fake = Stub::start(|_, _| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        json_response(200, completion(r#"{"intent":"menu","confidence":0.9}"#))
    })
    .await;
    let classifier = classifier_for(&fake, None);
    let classification = tokio::time::timeout(
        Duration::from_secs(5),
        classifier.classify(&project, "hello"),
    )
    .await
    .expect("the classification ends at the classifier's timeout, not the fake's answer");
    assert_rules_fallback(&project, &classification);
    assert!(
        classification
            .fallback_reason
            .unwrap()
            .contains("no answer within"),
    );
}

#[tokio::test]
async fn turn_through_the_router_uses_the_llm_intent() {
    let fake = fake_openai(200, completion(r#"{"intent":"profile","confidence":0.8}"#)).await;
    let project_dir = patient_project_dir();
    let harness = Harness::new(HarnessOptions {
        dir: Some(project_dir.path()),
        classifier: Arc::new(classifier_for(&fake, None)),
        ..HarnessOptions::default()
    });
    let envelope = harness.turn(turn_request("tell me about myself")).await;
    assert_eq!(envelope["intent"], "profile");
    assert_eq!(envelope["route"], "profile");
    assert_eq!(envelope["intent_confidence"], 0.8);
    assert_eq!(
        fake.only_request().body["messages"][1]["content"],
        "tell me about myself"
    );
}

#[tokio::test]
async fn request_deadline_bounds_the_llm_classification() {
    // The classifier may wait 30 s; the request only has 300 ms.
    let project_dir = project_copy_with("intents.yaml", |text| {
        text.replace("timeout: 2s", "timeout: 30s")
    });
    let fake = Stub::start(|_, _| async {
        tokio::time::sleep(Duration::from_secs(60)).await;
        json_response(200, completion(r#"{"intent":"menu","confidence":0.9}"#))
    })
    .await;
    let harness = Harness::new(HarnessOptions {
        dir: Some(project_dir.path()),
        classifier: Arc::new(classifier_for(&fake, None)),
        request_timeout: Duration::from_millis(300),
        ..HarnessOptions::default()
    });
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        harness.orchestrate(turn_request("hello")),
    )
    .await
    .expect("every request has its answer within the request timeout");
    assert_eq!(answer.status, 200, "{:#}", answer.body);
    assert_eq!(answer.body["intent"], "greeting", "{:#}", answer.body);
}
