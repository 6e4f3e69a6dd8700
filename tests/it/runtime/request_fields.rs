//! Parity with the Python service's request model: every one of its fields
//! reaches a service body of the shipped flows through `POST /orchestrate`,
//! as sent by a channel that moves over unchanged.

use serde_json::{Value as Json, json};

use super::{Harness, Stub, assert_envelope};
use crate::repository_root;

/// A stub answering the shipped mock of `service` (a valid answer).
async fn stub_answering_mock(service: &str) -> Stub {
    let path = repository_root().join(format!("mocks/{service}.json"));
    let mock: Json = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    Stub::json(200, mock).await
}

/// One field of the Python request model: a request carrying it, the
/// service whose body must show it, and where.
struct FieldCase {
    field: &'static str,
    request: Json,
    service: &'static str,
    variable: &'static str,
    body_key: &'static str,
    expected: Json,
}

fn field_cases() -> Vec<FieldCase> {
    let order_items = json!([{"id": "mn-01", "name": "Margherita pizza", "quantity": 2}]);
    let order = |field: &'static str, value: Json, body_key: &'static str| FieldCase {
        field,
        request: json!({"text": "I want to order", "user_id": "u-1", "order_items": [{"id": "mn-01"}], field: value.clone()}),
        service: "order",
        variable: "ORDER_SERVICE_URL",
        body_key,
        expected: value,
    };
    let menu = |field: &'static str, value: &str| FieldCase {
        field,
        request: json!({"text": "Can I see the menu?", "user_id": "u-1", field: value}),
        service: "menu",
        variable: "MENU_SERVICE_URL",
        body_key: field,
        expected: json!(value),
    };
    vec![
        FieldCase {
            field: "text",
            request: json!({"text": "What do you recommend tonight?", "user_id": "u-1"}),
            service: "recommend",
            variable: "RECOMMEND_SERVICE_URL",
            body_key: "context",
            expected: json!("What do you recommend tonight?"),
        },
        menu("user_id", "guest-4711"),
        menu("channel", "kiosk"),
        menu("session_id", "table-7-visit-3"),
        menu("trace_id", "trace-abc-123"),
        FieldCase {
            request: json!({"text": "I want to order", "user_id": "u-1", "order_items": order_items.clone()}),
            ..order("order_items", order_items, "items")
        },
        order("order_payment_method", json!("cash"), "payment_method"),
        order("order_delivery_mode", json!("dine_in"), "delivery_mode"),
        order(
            "order_special_instructions",
            json!("no onions"),
            "special_instructions",
        ),
        order("order_table_number", json!("14"), "table_number"),
        FieldCase {
            field: "tracking_order_id",
            request: json!({"text": "Where is my order?", "user_id": "u-1", "tracking_order_id": "ORD-5150"}),
            service: "tracking",
            variable: "TRACKING_SERVICE_URL",
            body_key: "order_id",
            expected: json!("ORD-5150"),
        },
    ]
}

#[tokio::test]
async fn every_field_of_the_python_request_model_reaches_a_service_body() {
    let cases = field_cases();
    // The whole list of the Python service's `OrchestrateRequest`, no more,
    // no less.
    let fields: Vec<&str> = cases.iter().map(|case| case.field).collect();
    assert_eq!(
        fields,
        [
            "text",
            "user_id",
            "channel",
            "session_id",
            "trace_id",
            "order_items",
            "order_payment_method",
            "order_delivery_mode",
            "order_special_instructions",
            "order_table_number",
            "tracking_order_id",
        ]
    );
    for case in cases {
        let stub = stub_answering_mock(case.service).await;
        let harness = Harness::with_services(&[(case.variable, &stub)]);
        let envelope = harness.turn(case.request.clone()).await;
        assert_eq!(
            envelope["decision"], "reply",
            "{}: {envelope:#}",
            case.field
        );
        let received = stub.only_request();
        assert_eq!(
            received.body[case.body_key], case.expected,
            "`{}` did not reach the {} service as `{}`: {:#}",
            case.field, case.service, case.body_key, received.body
        );
    }
}

#[tokio::test]
async fn a_request_with_every_field_places_the_order_with_all_of_them() {
    let stub = stub_answering_mock("order").await;
    let harness = Harness::with_services(&[("ORDER_SERVICE_URL", &stub)]);
    let items = json!([{"id": "mn-01", "name": "Margherita pizza", "quantity": 1}, {"id": "ds-01", "quantity": 2}]);
    let envelope = harness
        .turn(json!({
            "text": "I want to order",
            "user_id": "user-123",
            "channel": "app",
            "session_id": "user-123:app:42",
            "trace_id": "trace-all-fields",
            "order_items": items,
            "order_payment_method": "card",
            "order_delivery_mode": "delivery",
            "order_special_instructions": "no onions, ring twice",
            "order_table_number": "7",
            "tracking_order_id": "ORD-1",
        }))
        .await;
    assert_envelope(&envelope, "order", "order", "reply");
    assert_eq!(envelope["session_id"], "user-123:app:42");
    assert_eq!(envelope["trace_id"], "trace-all-fields");
    let received = stub.only_request();
    assert_eq!(received.header("x-trace-id"), Some("trace-all-fields"));
    assert_eq!(
        received.body,
        json!({
            "user_id": "user-123",
            "channel": "app",
            "session_id": "user-123:app:42",
            "items": items,
            "payment_method": "card",
            "delivery_mode": "delivery",
            "special_instructions": "no onions, ring twice",
            "table_number": "7",
            "trace_id": "trace-all-fields",
        })
    );
}

#[tokio::test]
async fn the_short_names_are_read_when_the_python_names_are_absent() {
    let stub = stub_answering_mock("order").await;
    let harness = Harness::with_services(&[("ORDER_SERVICE_URL", &stub)]);
    harness
        .turn(json!({
            "text": "I want to order", "user_id": "u-1", "order_items": [{"id": "mn-01"}],
            "special_instructions": "extra chilli", "table_number": 12,
        }))
        .await;
    let body = stub.only_request().body;
    assert_eq!(body["special_instructions"], "extra chilli");
    assert_eq!(body["table_number"], 12);
}

#[tokio::test]
async fn fields_of_the_wrong_type_are_422_at_their_pointer() {
    let harness = Harness::shipped();
    for (field, value) in [
        ("order_items", json!("two pizzas")),
        ("order_items", json!(["a pizza"])),
        ("order_payment_method", json!(3)),
        ("order_delivery_mode", json!(["pickup"])),
        ("order_special_instructions", json!({"note": "x"})),
        ("order_table_number", json!(true)),
        ("tracking_order_id", json!(10421)),
    ] {
        let mut body = json!({"text": "I want to order", "user_id": "u-1"});
        body[field] = value.clone();
        let answer = harness.orchestrate(body).await;
        assert_eq!(answer.status, 422, "{field} = {value}: {:#}", answer.body);
        assert_eq!(answer.body["code"], "invalid_request");
        assert!(
            answer.body["pointer"]
                .as_str()
                .unwrap()
                .starts_with(&format!("/{field}")),
            "{field} = {value}: {:#}",
            answer.body
        );
    }
}
