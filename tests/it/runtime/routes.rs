//! Every route of the shipped flows, through the router: on the services'
//! mocks, and against stub services where the request a service receives
//! or a particular answer matters.

use mcp_orchestrator::services::HttpTransport;
use serde_json::{Value as Json, json};

use super::{
    Harness, HarnessOptions, Stub, assert_envelope, is_valid_traceparent, json_response, only_span,
    spans, turn_request,
};

#[tokio::test]
async fn menu_reads_out_the_mock_menu() {
    let harness = Harness::shipped();
    let envelope = harness.turn(turn_request("Can I see the menu?")).await;
    assert_envelope(&envelope, "menu", "menu", "reply");
    let reply = envelope["reply_text"].as_str().unwrap();
    assert!(
        reply.starts_with("Here's what we're serving today:"),
        "{reply}"
    );
    assert!(reply.contains("- Margherita pizza — 10.50 EUR"), "{reply}");
    assert!(reply.contains("Desserts"), "{reply}");
    let span = only_span(&envelope);
    assert_eq!(span["service"], "menu");
    assert_eq!(span["mock"], true);
    assert_eq!(span["attempts"], 1);
    assert!(span.get("error").is_none(), "{span:#}");
}

#[tokio::test]
async fn menu_prefers_the_text_the_service_wrote() {
    let menu = Stub::json(200, json!({"output": {"text": "Only soup today."}})).await;
    let harness = Harness::with_services(&[("MENU_SERVICE_URL", &menu)]);
    let envelope = harness.turn(turn_request("menu please")).await;
    assert_envelope(&envelope, "menu", "menu", "reply");
    assert_eq!(envelope["reply_text"], "Only soup today.");
    assert_eq!(only_span(&envelope)["status"], 200);
    assert_eq!(menu.only_request().body["user_id"], "u-1");
}

#[tokio::test]
async fn order_with_items_is_placed_on_the_mock() {
    let harness = Harness::shipped();
    let envelope = harness
        .turn(json!({
            "text": "I want to order a pizza",
            "user_id": "u-1",
            "order_items": [{"id": "mn-01", "quantity": 1}],
        }))
        .await;
    assert_envelope(&envelope, "order", "order", "reply");
    assert_eq!(
        envelope["reply_text"],
        "Thank you! Your order ORD-10421 is confirmed. It should be ready in about 25 minutes. \
         Total: 27.50 EUR."
    );
    assert_eq!(only_span(&envelope)["service"], "order");
}

#[tokio::test]
async fn order_sends_the_items_and_the_request_context_to_the_order_service() {
    let order = Stub::json(
        200,
        json!({"order_id": "ORD-777", "status": "being_prepared"}),
    )
    .await;
    let harness = Harness::with_services(&[("ORDER_SERVICE_URL", &order)]);
    let items = json!([
        {"id": "mn-01", "name": "Margherita pizza", "quantity": 2},
        {"id": "ds-01", "quantity": 1},
    ]);
    let envelope = harness
        .turn(json!({
            "text": "I'd like to order now",
            "user_id": "u-42",
            "channel": "whatsapp",
            "session_id": "session-9",
            "trace_id": "trace-abc",
            "order_items": items,
        }))
        .await;
    assert_envelope(&envelope, "order", "order", "reply");
    assert_eq!(
        envelope["reply_text"],
        "Thank you! Your order ORD-777 is being prepared."
    );
    let span = only_span(&envelope);
    assert_eq!(span["status"], 200);
    assert_eq!(span["attempts"], 1);
    assert!(span.get("mock").is_none(), "{span:#}");

    let request = order.only_request();
    assert_eq!(request.method, "POST");
    assert_eq!(request.body["items"], items, "items pass as the JSON array");
    assert_eq!(request.body["payment_method"], "not_provided");
    assert_eq!(request.body["delivery_mode"], "not_provided");
    assert_eq!(request.body["special_instructions"], Json::Null);
    assert_eq!(request.body["table_number"], Json::Null);
    assert_eq!(request.body["trace_id"], "trace-abc");
    assert_eq!(request.body["user_id"], "u-42");
    assert_eq!(request.body["channel"], "whatsapp");
    assert_eq!(request.body["session_id"], "session-9");
    assert_eq!(request.header("x-trace-id"), Some("trace-abc"));
    assert_eq!(request.header("content-type"), Some("application/json"));
    let traceparent = request.header("traceparent").unwrap();
    assert!(is_valid_traceparent(traceparent), "{traceparent}");
}

#[tokio::test]
async fn order_passes_the_payment_and_delivery_the_client_chose() {
    let order = Stub::json(200, json!({"order_id": "ORD-1", "status": "confirmed"})).await;
    let harness = Harness::with_services(&[("ORDER_SERVICE_URL", &order)]);
    // A W3C trace id is passed on as the trace of the outgoing traceparent.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    harness
        .turn(json!({
            "text": "checkout",
            "user_id": "u-1",
            "trace_id": trace_id,
            "order_items": [{"id": "st-02", "quantity": 1}],
            "order_payment_method": "card",
            "order_delivery_mode": "pickup",
            "special_instructions": "no basil",
            "table_number": 7,
        }))
        .await;
    let request = order.only_request();
    assert_eq!(request.body["payment_method"], "card");
    assert_eq!(request.body["delivery_mode"], "pickup");
    assert_eq!(request.body["special_instructions"], "no basil");
    assert_eq!(request.body["table_number"], 7);
    assert_eq!(request.header("x-trace-id"), Some(trace_id));
    let traceparent = request.header("traceparent").unwrap();
    assert!(is_valid_traceparent(traceparent), "{traceparent}");
    assert_eq!(traceparent.split('-').nth(1), Some(trace_id));
}

#[tokio::test]
async fn credentials_in_a_service_url_are_sent_as_basic_authorization() {
    let order = Stub::json(200, json!({"order_id": "ORD-1", "status": "confirmed"})).await;
    let url = order
        .url()
        .replacen("http://", "http://orders%40shop:s%3Acret@", 1);
    let harness = Harness::new(HarnessOptions {
        variables: vec![("ORDER_SERVICE_URL", url)],
        ..HarnessOptions::default()
    });
    harness
        .turn(json!({
            "text": "checkout",
            "user_id": "u-1",
            "order_items": [{"id": "st-02", "quantity": 1}],
        }))
        .await;
    let request = order.only_request();
    // base64("orders@shop:s:cret"): the user and password percent-decoded.
    assert_eq!(
        request.header("authorization"),
        Some("Basic b3JkZXJzQHNob3A6czpjcmV0")
    );
    assert_eq!(request.header("accept"), Some("application/json"));
    assert!(
        request
            .header("user-agent")
            .is_some_and(|agent| agent.starts_with("mcp-orchestrator/")),
        "{:?}",
        request.header("user-agent")
    );
}

#[tokio::test]
async fn behind_a_proxy_service_calls_go_through_it() {
    // The proxy answers every request as the order service would.
    let proxy = Stub::json(200, json!({"order_id": "ORD-7", "status": "confirmed"})).await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(proxy.url()).unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let harness = Harness::new(HarnessOptions {
        // Nothing listens there: only the proxy can answer for it.
        variables: vec![("ORDER_SERVICE_URL", "http://127.0.0.2:9/orders".to_owned())],
        transport: Some(HttpTransport::through_proxy(client)),
        ..HarnessOptions::default()
    });
    let envelope = harness
        .turn(json!({
            "text": "checkout",
            "user_id": "u-1",
            "trace_id": "trace-proxy",
            "order_items": [{"id": "st-02", "quantity": 1}],
        }))
        .await;
    assert_envelope(&envelope, "order", "order", "reply");
    let request = proxy.only_request();
    assert_eq!(request.header("host"), Some("127.0.0.2:9"));
    assert_eq!(request.path, "/orders");
    assert_eq!(request.header("x-trace-id"), Some("trace-proxy"));
    assert_eq!(
        request.body["items"],
        json!([{"id": "st-02", "quantity": 1}])
    );
}

#[tokio::test]
async fn order_without_items_asks_for_them_and_calls_nothing() {
    let order = Stub::json(200, json!({"order_id": "ORD-1", "status": "confirmed"})).await;
    let harness = Harness::with_services(&[("ORDER_SERVICE_URL", &order)]);
    for body in [
        turn_request("I want to order"),
        json!({"text": "I want to order", "user_id": "u-1", "order_items": []}),
    ] {
        let envelope = harness.turn(body).await;
        assert_envelope(&envelope, "order_missing_items", "order", "reply");
        assert!(
            envelope["reply_text"]
                .as_str()
                .unwrap()
                .contains("I just need to know what you'd like"),
            "{envelope:#}"
        );
        assert!(spans(&envelope).is_empty(), "{envelope:#}");
    }
    assert!(order.received().is_empty());
}

#[tokio::test]
async fn order_error_when_the_order_service_fails() {
    let order = Stub::json(500, json!({"detail": "database on fire"})).await;
    let harness = Harness::with_services(&[("ORDER_SERVICE_URL", &order)]);
    let envelope = harness
        .turn(json!({
            "text": "I want to order",
            "user_id": "u-1",
            "order_items": [{"id": "mn-01", "quantity": 1}],
        }))
        .await;
    assert_envelope(&envelope, "order_error", "order", "error");
    assert_eq!(
        envelope["reply_text"],
        "Sorry, I couldn't place your order just now. Please try again in a moment."
    );
    let span = only_span(&envelope);
    assert_eq!(span["error"], "service_http_error");
    assert_eq!(span["status"], 500);
    assert_eq!(span["attempts"], 1, "placing an order is never retried");
    assert_eq!(order.received().len(), 1);
}

#[tokio::test]
async fn recommend_lists_the_mock_suggestions_and_passes_the_text_as_context() {
    let harness = Harness::shipped();
    let envelope = harness.turn(turn_request("What do you recommend?")).await;
    assert_envelope(&envelope, "recommend", "recommend", "reply");
    let reply = envelope["reply_text"].as_str().unwrap();
    assert!(reply.starts_with("Here's what I'd suggest:"), "{reply}");
    assert!(
        reply.contains("1. Penne all'arrabbiata (11.00 EUR)"),
        "{reply}"
    );
    assert!(reply.contains("3. Tiramisu (6.00 EUR)"), "{reply}");

    let recommend = Stub::json(200, json!({"recommendations": [{"name": "Minestrone"}]})).await;
    let harness = Harness::with_services(&[("RECOMMEND_SERVICE_URL", &recommend)]);
    let envelope = harness.turn(turn_request("suggest something light")).await;
    assert_envelope(&envelope, "recommend", "recommend", "reply");
    assert_eq!(
        envelope["reply_text"],
        "Here's what I'd suggest:\n1. Minestrone"
    );
    assert_eq!(
        recommend.only_request().body["context"],
        "suggest something light"
    );
}

#[tokio::test]
async fn recommend_empty_when_the_service_has_no_suggestion() {
    let recommend = Stub::json(200, json!({"recommendations": []})).await;
    let harness = Harness::with_services(&[("RECOMMEND_SERVICE_URL", &recommend)]);
    let envelope = harness.turn(turn_request("What do you recommend?")).await;
    assert_envelope(&envelope, "recommend_empty", "recommend", "reply");
    assert!(
        envelope["reply_text"]
            .as_str()
            .unwrap()
            .contains("Would you like to see the menu instead?"),
        "{envelope:#}"
    );
    assert_eq!(only_span(&envelope)["status"], 200);
}

/// A tracking service that reports the order it was asked about.
async fn tracking_stub() -> Stub {
    Stub::start(|_, request| async move {
        json_response(
            200,
            json!({
                "order_id": request.body["order_id"],
                "status": "out_for_delivery",
                "eta_minutes": 9,
            }),
        )
    })
    .await
}

#[tokio::test]
async fn track_order_on_the_mock() {
    let harness = Harness::shipped();
    let envelope = harness.turn(turn_request("Track my order ORD-10421")).await;
    assert_envelope(&envelope, "track_order", "track_order", "reply");
    assert_eq!(
        envelope["reply_text"],
        "Your order ORD-10421 is out for delivery. It should be with you in about 12 minutes."
    );
    assert_eq!(only_span(&envelope)["service"], "tracking");
}

#[tokio::test]
async fn track_order_uses_the_order_id_the_client_sent() {
    let tracking = tracking_stub().await;
    let harness = Harness::with_services(&[("TRACKING_SERVICE_URL", &tracking)]);
    let envelope = harness
        .turn(json!({
            "text": "Where is my order?",
            "user_id": "u-1",
            "tracking_order_id": "ORD-555",
        }))
        .await;
    assert_envelope(&envelope, "track_order", "track_order", "reply");
    assert_eq!(
        envelope["reply_text"],
        "Your order ORD-555 is out for delivery. It should be with you in about 9 minutes."
    );
    let request = tracking.only_request();
    assert_eq!(request.body["order_id"], "ORD-555");
    assert_eq!(request.body["user_id"], "u-1");
}

#[tokio::test]
async fn track_order_finds_the_order_id_in_the_text() {
    let tracking = tracking_stub().await;
    let harness = Harness::with_services(&[("TRACKING_SERVICE_URL", &tracking)]);
    let envelope = harness
        .turn(turn_request("What's the order status of ORD-12345?"))
        .await;
    assert_envelope(&envelope, "track_order", "track_order", "reply");
    assert!(
        envelope["reply_text"]
            .as_str()
            .unwrap()
            .starts_with("Your order ORD-12345 is out for delivery."),
        "{envelope:#}"
    );
    assert_eq!(tracking.only_request().body["order_id"], "ORD-12345");
}

#[tokio::test]
async fn track_missing_order_id_asks_for_it_and_calls_nothing() {
    let tracking = tracking_stub().await;
    let harness = Harness::with_services(&[("TRACKING_SERVICE_URL", &tracking)]);
    let envelope = harness.turn(turn_request("Where is my order?")).await;
    assert_envelope(&envelope, "track_missing_order_id", "track_order", "reply");
    assert!(
        envelope["reply_text"]
            .as_str()
            .unwrap()
            .starts_with("Which order should I look up?"),
        "{envelope:#}"
    );
    assert!(spans(&envelope).is_empty(), "{envelope:#}");
    assert!(tracking.received().is_empty());
}

#[tokio::test]
async fn track_error_when_the_tracking_service_fails() {
    // 404 is not retried, so one attempt decides.
    let tracking = Stub::json(404, json!({"error": "no such order ORD-999"})).await;
    let harness = Harness::with_services(&[("TRACKING_SERVICE_URL", &tracking)]);
    let envelope = harness.turn(turn_request("track my order ORD-999")).await;
    assert_envelope(&envelope, "track_error", "track_order", "error");
    assert_eq!(
        envelope["reply_text"],
        "Sorry, I can't check on that order right now. Please try again in a moment."
    );
    let span = only_span(&envelope);
    assert_eq!(span["error"], "service_http_error");
    assert_eq!(span["status"], 404);
    assert_eq!(span["attempts"], 1);
}

#[tokio::test]
async fn profile_tells_what_the_mock_knows() {
    let harness = Harness::shipped();
    let envelope = harness
        .turn(turn_request("What do you know about me?"))
        .await;
    assert_envelope(&envelope, "profile", "profile", "reply");
    assert_eq!(
        envelope["reply_text"],
        "Here's what I know about you:\n\
         - Diet: vegetarian\n\
         - Spice level: medium\n\
         - Allergies: peanuts\n\
         - Orders so far: 12\n\
         - Favourites: Margherita pizza, Tiramisu\n\
         - Average spend: 23.40 EUR"
    );
}

#[tokio::test]
async fn profile_of_a_new_user_asks_for_preferences() {
    let profile = Stub::json(
        200,
        json!({
            "preferences": {"dietary": [], "allergies": []},
            "order_history_summary": {"favorite_items": []},
        }),
    )
    .await;
    let harness = Harness::with_services(&[("PROFILE_SERVICE_URL", &profile)]);
    let envelope = harness.turn(turn_request("show my profile")).await;
    assert_envelope(&envelope, "profile", "profile", "reply");
    assert!(
        envelope["reply_text"]
            .as_str()
            .unwrap()
            .starts_with("I don't know much about you yet."),
        "{envelope:#}"
    );
    assert_eq!(profile.only_request().body["mode"], "get_profile");
}

#[tokio::test]
async fn profile_saved_sends_the_structured_preferences() {
    let profile = Stub::json(200, json!({"success": true})).await;
    let harness = Harness::with_services(&[("PROFILE_SERVICE_URL", &profile)]);
    let preferences = json!({"dietary": ["vegetarian"], "spice_level": "mild"});
    let envelope = harness
        .turn(json!({
            "text": "Remember that I'm vegetarian",
            "user_id": "u-7",
            "preferences": preferences,
        }))
        .await;
    assert_envelope(&envelope, "profile_saved", "save_preferences", "reply");
    assert_eq!(
        envelope["reply_text"],
        "Got it! I've saved your preferences and I'll keep them in mind for your next order."
    );
    let request = profile.only_request();
    assert_eq!(request.body["mode"], "save_preferences");
    assert_eq!(request.body["user_id"], "u-7");
    assert_eq!(request.body["preferences"], preferences);
}

#[tokio::test]
async fn profile_saved_sends_the_text_as_a_note_without_structured_preferences() {
    let profile = Stub::json(200, json!({"success": true})).await;
    let harness = Harness::with_services(&[("PROFILE_SERVICE_URL", &profile)]);
    let text = "I am allergic to peanuts";
    let envelope = harness.turn(turn_request(text)).await;
    assert_envelope(&envelope, "profile_saved", "save_preferences", "reply");
    assert_eq!(
        profile.only_request().body["preferences"],
        json!({"note": text})
    );
}

#[tokio::test]
async fn profile_save_error_when_the_save_is_not_confirmed() {
    let profile = Stub::json(200, json!({"success": false})).await;
    let harness = Harness::with_services(&[("PROFILE_SERVICE_URL", &profile)]);
    let envelope = harness.turn(turn_request("remember that I'm vegan")).await;
    assert_envelope(&envelope, "profile_save_error", "save_preferences", "reply");
    assert_eq!(
        envelope["reply_text"],
        "Sorry, I couldn't save your preferences just now. Please try again in a moment."
    );
    assert!(only_span(&envelope).get("error").is_none());
}

#[tokio::test]
async fn profile_save_error_when_the_profile_service_fails() {
    let profile = Stub::json(502, json!({"error": "bad gateway"})).await;
    let harness = Harness::with_services(&[("PROFILE_SERVICE_URL", &profile)]);
    let envelope = harness
        .turn(turn_request("save my preferences: no nuts"))
        .await;
    assert_envelope(&envelope, "profile_save_error", "save_preferences", "error");
    assert_eq!(
        envelope["reply_text"],
        "Sorry, I couldn't save your preferences just now. Please try again in a moment."
    );
    let span = only_span(&envelope);
    assert_eq!(span["error"], "service_http_error");
    assert_eq!(span["attempts"], 1, "saving preferences is never retried");
}

#[tokio::test]
async fn fallback_greets_a_greeting() {
    let harness = Harness::shipped();
    let envelope = harness.turn(turn_request("Hi there!")).await;
    assert_envelope(&envelope, "fallback", "greeting", "reply");
    assert_eq!(envelope["intent_confidence"], 0.7);
    let reply = envelope["reply_text"].as_str().unwrap();
    assert!(reply.starts_with("Hello, and welcome! I can:"), "{reply}");
    assert!(reply.ends_with("You said: \"Hi there!\""), "{reply}");
    assert!(spans(&envelope).is_empty());
}

#[tokio::test]
async fn fallback_answers_unrecognised_text_as_smalltalk_not_greeting() {
    let harness = Harness::shipped();
    // "this" and "nice" contain no greeting word ("hi" is only part of
    // "this"); the model learned from the examples knows chit-chat, and a
    // text with nothing it knows has no confidence at all.
    for (text, known) in [("this is nice", true), ("xqzv wvvk", false)] {
        let envelope = harness.turn(turn_request(text)).await;
        assert_envelope(&envelope, "fallback", "smalltalk", "reply");
        let confidence = envelope["intent_confidence"].as_f64().unwrap();
        if known {
            assert!(confidence > 0.0, "{envelope:#}");
        } else {
            assert_eq!(confidence, 0.0, "{envelope:#}");
        }
        let reply = envelope["reply_text"].as_str().unwrap();
        assert!(
            reply.starts_with("I'm here to help with your meal. I can:"),
            "{reply}"
        );
        assert!(reply.ends_with(&format!("You said: \"{text}\"")), "{reply}");
    }
    let envelope = harness.turn(turn_request("thanks a lot")).await;
    assert_envelope(&envelope, "fallback", "smalltalk", "reply");
    assert_eq!(envelope["intent_confidence"], 0.7);
}

#[tokio::test]
async fn trace_id_that_is_not_a_header_value_does_not_break_service_calls() {
    let menu = Stub::json(200, json!({"output": "Soup."})).await;
    let harness = Harness::with_services(&[("MENU_SERVICE_URL", &menu)]);
    let answer = harness
        .orchestrate(json!({"text": "menu", "user_id": "u-1", "trace_id": "line\nbreak"}))
        .await;
    if answer.status == 422 {
        // Rejecting the trace id up front would be fine too.
        assert_eq!(answer.body["pointer"], "/trace_id", "{:#}", answer.body);
    } else {
        assert_eq!(answer.status, 200);
        assert_envelope(&answer.body, "menu", "menu", "reply");
        assert_eq!(menu.received().len(), 1, "{:#}", answer.body);
    }
}

#[tokio::test]
async fn trace_id_with_non_ascii_text_still_reaches_the_service() {
    let menu = Stub::json(200, json!({"output": "Soup."})).await;
    let harness = Harness::with_services(&[("MENU_SERVICE_URL", &menu)]);
    let envelope = harness
        .turn(json!({"text": "menu", "user_id": "u-1", "trace_id": "café 1"}))
        .await;
    assert_envelope(&envelope, "menu", "menu", "reply");
    assert_eq!(envelope["trace_id"], "café 1");
    let request = menu.only_request();
    assert_eq!(request.body["trace_id"], "café 1");
    let traceparent = request.header("traceparent").unwrap();
    assert!(is_valid_traceparent(traceparent), "{traceparent}");
}
