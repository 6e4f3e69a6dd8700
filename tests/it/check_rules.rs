//! Focused rules of `check`, each on a small inline project.

use mcp_orchestrator::check::{Checked, check_project};
use mcp_orchestrator::diagnostic::Code;

use crate::test_environment;

const BASE: &str = "
intents:
  hello:
    keywords: [hello]
classifier:
  fallback: hello
";

/// Checks a project made of one flow file (appended to a valid base) and
/// the given extra files.
fn check(flow_file: &str, extra: &[(&str, &str)]) -> Checked {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("flows")).unwrap();
    std::fs::write(
        dir.path().join("flows/main.yaml"),
        format!("{BASE}{flow_file}"),
    )
    .unwrap();
    for (path, content) in extra {
        let path = dir.path().join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
    check_project(dir.path(), &test_environment())
}

fn codes(checked: &Checked) -> Vec<Code> {
    checked.diagnostics.iter().map(|d| d.code).collect()
}

const ORDER_SCHEMA: &str = r#"{"type": "object", "properties": {"order_id": {"type": "string"}, "eta": {"type": "integer"}}}"#;

#[test]
fn a_single_attempt_is_no_retry_and_still_compiles() {
    let checked = check(
        "services:\n  s:\n    url: http://127.0.0.1:9/s\n    retry: { attempts: 1 }\nflows:\n  f:\n    intent: hello\n    steps:\n      - call: s\n      - reply: ok\n",
        &[],
    );
    assert_eq!(codes(&checked), []);
    let project = checked.project.unwrap();
    assert!(project.services[0].retry.is_none());
}

#[test]
fn flow_level_on_error_may_have_an_id() {
    let checked = check(
        "services:\n  s:\n    url: http://127.0.0.1:9/s\nflows:\n  f:\n    intent: hello\n    on_error:\n      id: failed\n      call: s\n      on_error: { reply: sorry }\n    steps:\n      - call: s\n      - reply: ok\n",
        &[],
    );
    assert!(
        !codes(&checked).contains(&Code::DuplicateName),
        "{:#?}",
        checked.diagnostics
    );
}

#[test]
fn on_error_must_reply_and_sees_the_error() {
    let checked = check(
        "services:\n  s:\n    url: http://127.0.0.1:9/s\nflows:\n  f:\n    intent: hello\n    steps:\n      - call: s\n        on_error: { set: { failed: \"{{ error.code }}\" } }\n      - reply: \"{{ error.code }}\"\n",
        &[],
    );
    // The on_error does not reply, and `error` is unknown outside on_error.
    assert_eq!(codes(&checked), [Code::MissingReply, Code::UnknownVariable]);
}

#[test]
fn a_result_is_visible_only_where_its_step_surely_ran() {
    let flow = "services:\n  s:\n    url: http://127.0.0.1:9/s\n    response: { schema: order.json }\nflows:\n  f:\n    intent: hello\n    steps:\n      - if: \"input.go\"\n        id: placed\n        call: s\n      - reply: \"{{ placed.order_id }}\"\n";
    let checked = check(flow, &[("schemas/order.json", ORDER_SCHEMA)]);
    assert_eq!(codes(&checked), [Code::UndefinedStepReference]);

    // With an `else` that replies, the step ran on every path that goes on.
    let flow = flow.replace(
        "        call: s\n",
        "        call: s\n        else:\n          - reply: no\n",
    );
    let checked = check(&flow, &[("schemas/order.json", ORDER_SCHEMA)]);
    assert_eq!(codes(&checked), []);
}

#[test]
fn a_scalar_field_has_no_fields_below_it() {
    let checked = check(
        "services:\n  s:\n    url: http://127.0.0.1:9/s\n    response: { schema: order.json }\nflows:\n  f:\n    intent: hello\n    steps:\n      - id: placed\n        call: s\n      - reply: \"{{ placed.eta.hours }}\"\n",
        &[("schemas/order.json", ORDER_SCHEMA)],
    );
    assert_eq!(codes(&checked), [Code::UnknownResponseField]);
}

#[test]
fn switch_replies_only_when_every_case_and_the_default_reply() {
    let checked = check(
        "flows:\n  f:\n    intent: hello\n    steps:\n      - switch: channel\n        cases:\n          web: [{ reply: web }]\n          voice: [{ reply: voice }]\n",
        &[],
    );
    assert_eq!(codes(&checked), [Code::MissingReply]);
    let checked = check(
        "flows:\n  f:\n    intent: hello\n    steps:\n      - switch: channel\n        cases:\n          web: [{ reply: web }]\n        default: [{ reply: other }]\n",
        &[],
    );
    assert_eq!(codes(&checked), []);
}

#[test]
fn parallel_branches_are_calls_with_ids_that_do_not_see_each_other() {
    let checked = check(
        "services:\n  s:\n    url: http://127.0.0.1:9/s\n    response: { schema: order.json }\nflows:\n  f:\n    intent: hello\n    steps:\n      - parallel:\n          - { id: a, call: s }\n          - { id: b, call: s, body: { x: \"{{ a.order_id }}\" } }\n          - { reply: nope }\n      - reply: \"{{ a.order_id }} {{ b.order_id }}\"\n",
        &[("schemas/order.json", ORDER_SCHEMA)],
    );
    assert_eq!(
        codes(&checked),
        [Code::UndefinedStepReference, Code::StepKind]
    );
}

#[test]
fn foreach_binds_its_element_and_collects_under_its_id() {
    let checked = check(
        "services:\n  s:\n    url: http://127.0.0.1:9/s\nflows:\n  f:\n    intent: hello\n    steps:\n      - id: lines\n        foreach: input.items\n        as: line\n        do:\n          - { id: priced, call: s, body: { sku: \"{{ line.sku }}\" } }\n      - reply: \"{{ lines | length }} lines, {{ line }}\"\n",
        &[],
    );
    // `line` exists only inside `do`.
    assert_eq!(codes(&checked), [Code::UnknownVariable]);
}

#[test]
fn entity_names_are_checked_against_the_flow_intents() {
    let checked = check(
        "flows:\n  f:\n    intent: hello\n    steps:\n      - reply: \"{{ intent.entities.order }}\"\n",
        &[],
    );
    assert_eq!(codes(&checked), [Code::UnknownVariable]);
}

#[test]
fn paths_may_not_leave_the_project() {
    let checked = check(
        "services:\n  s:\n    url: http://127.0.0.1:9/s\n    response: { schema: ../../etc/passwd }\n    mock: { file: /etc/passwd }\nflows:\n  f:\n    intent: hello\n    steps:\n      - reply: hi\n",
        &[],
    );
    assert_eq!(codes(&checked), [Code::InvalidValue, Code::InvalidValue]);
}

#[test]
fn a_bare_unset_variable_is_a_warning_too() {
    let checked = check(
        "flows:\n  f:\n    intent: hello\n    steps:\n      - reply: \"Only $PRICE today\"\n",
        &[],
    );
    assert_eq!(codes(&checked), [Code::UnsetEnvVar]);
    let checked = check(
        "flows:\n  f:\n    intent: hello\n    steps:\n      - reply: \"Only $$5 today\"\n",
        &[],
    );
    assert_eq!(codes(&checked), []);
}

#[test]
fn the_debug_global_is_not_available() {
    let checked = check(
        "flows:\n  f:\n    intent: hello\n    steps:\n      - reply: \"{{ debug() }}\"\n",
        &[],
    );
    assert_eq!(codes(&checked), [Code::UnknownVariable]);
}

const GREET: &str = "flows:\n  f:\n    intent: hello\n    steps:\n      - reply: hi\n";

#[test]
fn caller_keys_are_long_distinct_and_never_quoted() {
    let checked = check(
        &format!(
            "{GREET}access:\n  api_keys:\n    - {{ name: a, key: short-secret }}\n    - {{ name: b, key: same-value-0123456789 }}\n    - {{ name: c, key: same-value-0123456789 }}\n    - {{ name: b, key: another-value-0123456789 }}\n    - {{ name: d, key: fine-value-0123456789, channels: [] }}\n"
        ),
        &[],
    );
    let messages: Vec<String> = checked
        .diagnostics
        .iter()
        .map(|d| {
            format!(
                "{} {}:{} {}",
                d.code.as_str(),
                d.location.line,
                d.location.column,
                d.message
            )
        })
        .collect();
    assert!(checked.project.is_none());
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("invalid-value 14:23 caller key `a` has 12 characters")),
        "{messages:#?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("duplicate-name")
                && m.contains("`b` and `c` have the same value")),
        "{messages:#?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("caller key `b` is declared twice")),
        "{messages:#?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("`d` may use no channel")),
        "{messages:#?}"
    );
    for message in &messages {
        assert!(
            !message.contains("short-secret") && !message.contains("0123456789"),
            "{message}"
        );
    }
}

#[test]
fn an_empty_key_is_kept_apart_for_serve_to_decide() {
    let checked = check(
        &format!(
            "{GREET}access:\n  api_keys:\n    - {{ name: web, key: \"${{WEB_KEY_FOR_TEST:-}}\" }}\n"
        ),
        &[],
    );
    assert_eq!(codes(&checked), []);
    let project = checked.project.unwrap();
    assert!(project.access.keys.is_empty());
    assert_eq!(project.access.unset_keys[0].name, "web");
    assert_eq!(
        project.access.unset_keys[0].variable.as_deref(),
        Some("WEB_KEY_FOR_TEST")
    );
}

#[test]
fn limits_and_circuit_breakers_are_checked() {
    let checked = check(
        &format!(
            "{GREET}limits:\n  per_user: {{ rate: 5/day }}\n  per_key: {{ rate: 10/s, burst: 0 }}\n  max_in_flight: 0\nservices:\n  s:\n    url: http://127.0.0.1:9/s\n    circuit_breaker: {{ failures: 0, open_for: 30s }}\ndefaults:\n  circuit_breaker: {{ failures: 5, open_for: soon }}\n"
        ),
        &[],
    );
    let found: Vec<(Code, u32)> = checked
        .diagnostics
        .iter()
        .map(|d| (d.code, d.location.line))
        .collect();
    // The bad rate, the zero burst, the zero cap, the zero failures, the
    // bad duration: every one reported.
    for expected in [
        (Code::InvalidValue, 13),
        (Code::InvalidValue, 14),
        (Code::InvalidValue, 15),
        (Code::InvalidValue, 19),
        (Code::InvalidDuration, 21),
    ] {
        assert!(found.contains(&expected), "{expected:?} in {found:?}");
    }
    let rate = checked
        .diagnostics
        .iter()
        .find(|d| d.message.contains("5/day"))
        .unwrap();
    assert!(rate.hint.as_deref().unwrap().contains("`5/s`"), "{rate:?}");
    let checked = check(
        &format!(
            "{GREET}limits:\n  per_user: {{ rate: 5/s }}\n  per_key: {{ rate: 300/m, burst: 600 }}\nservices:\n  s:\n    url: http://127.0.0.1:9/s\n  t:\n    url: http://127.0.0.1:9/t\n    circuit_breaker: {{ failures: 2, open_for: 5s }}\ndefaults:\n  circuit_breaker: {{ failures: 5, open_for: 30s }}\n"
        ),
        &[],
    );
    assert_eq!(codes(&checked), []);
    let project = checked.project.unwrap();
    let per_user = project.limits.per_user.unwrap();
    assert_eq!((per_user.count, per_user.burst), (5, 5));
    assert_eq!(project.limits.per_key.unwrap().burst, 600);
    assert_eq!(project.limits.max_in_flight, 1024);
    assert_eq!(project.services[0].circuit_breaker.unwrap().failures, 5);
    assert_eq!(project.services[1].circuit_breaker.unwrap().failures, 2);
}

/// Inputs the fuzzers found crashes with (`tests/fixtures/fuzz/`), run the
/// way the `check_project` target runs them: each is checked without a
/// panic, and a project comes out exactly when there is no error.
#[test]
fn fuzz_findings_are_checked_without_panicking() {
    use mcp_orchestrator::check::compile;
    use mcp_orchestrator::diagnostic::Sources;
    use mcp_orchestrator::load::{LoadedFile, LoadedProject, parse_flow_file};

    let dir = crate::fixtures_dir().join("fuzz");
    let mut checked_any = false;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("check_project-") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let relative = std::path::PathBuf::from("flows/fuzz.yaml");
        let parsed = parse_flow_file(&relative, &text, &test_environment());
        let mut sources = Sources::default();
        sources.insert(relative.clone(), text.clone());
        let checked = compile(LoadedProject {
            dir: crate::repository_root(),
            files: vec![LoadedFile {
                path: relative,
                spec: parsed.spec,
            }],
            sources,
            diagnostics: parsed.diagnostics,
            unparsed_names: parsed.unparsed_names.into_iter().collect(),
            complete: parsed.complete,
        });
        assert_eq!(
            checked.project.is_some(),
            checked.error_count() == 0,
            "{name}"
        );
        assert!(
            checked.error_count() > 0,
            "{name}: {:#?}",
            checked.diagnostics
        );
        checked_any = true;
    }
    assert!(checked_any);
}

#[track_caller]
fn assert_reported(messages: &[String], prefix: &str) {
    assert!(
        messages.iter().any(|m| m.starts_with(prefix)),
        "no `{prefix}` in {messages:#?}"
    );
}

/// Each diagnostic as `code line:column message`.
fn located(checked: &Checked) -> Vec<String> {
    checked
        .diagnostics
        .iter()
        .map(|d| {
            format!(
                "{} {}:{} {}",
                d.code.as_str(),
                d.location.line,
                d.location.column,
                d.message
            )
        })
        .collect()
}

#[test]
fn channel_kinds_and_keys_are_checked_with_hints() {
    let checked = check(
        &format!(
            "{GREET}channels:
  tg:
    kind: telegramm
  sl:
    kind: slack
    signing_secret: a-secret-that-is-set
    secret_token: not-a-slack-key
  sms:
    kind: twilio
    auth_token: twilio-token
    public_url: https://bot.example.test/channels/sms
    timeout: 5s
  wa:
    kind: whatsapp
    verify_token: v
    app_secret: s
  bad/name:
    kind: telegram
"
        ),
        &[],
    );
    let messages = located(&checked);
    assert!(checked.project.is_none());
    let expect = |prefix: &str| assert_reported(&messages, prefix);
    expect("invalid-value 14:11 unknown channel kind `telegramm`");
    expect("unknown-key 18:19 `secret_token` is not a key of a `slack` channel");
    expect("missing-key 15:3 channel `sl` has no `bot_token`");
    expect("unknown-key 23:14 `timeout` is not a key of a `twilio` channel");
    expect("missing-key 24:3 channel `wa` has no `access_token`");
    expect("invalid-value 28:3 channel name `bad/name` cannot be a URL path segment");
    let hint = checked
        .diagnostics
        .iter()
        .find(|d| d.message.contains("unknown channel kind"))
        .and_then(|d| d.hint.clone())
        .unwrap_or_default();
    assert!(hint.contains("did you mean `telegram`?"), "{hint}");
}

#[test]
fn webhook_templates_read_only_their_context_and_the_payload_schema() {
    let checked = check(
        &format!(
            "{GREET}channels:
  partner:
    kind: webhook
    verify: {{ hmac_sha256: {{ header: X-Signature, secret: partner-secret }} }}
    schema: partner.schema.json
    request:
      text: \"{{{{ body.message.txt }}}}\"
      user_id: \"{{{{ reply_text }}}}\"
      message_id: \"{{{{ body.id }}}}\"
    reply:
      response: {{ text: \"{{{{ reply_txt }}}}\" }}
"
        ),
        &[(
            "schemas/partner.schema.json",
            r#"{"type": "object", "properties": {"id": {"type": "string"}, "message": {"type": "object", "properties": {"text": {"type": "string"}}}}}"#,
        )],
    );
    let messages = located(&checked);
    assert!(checked.project.is_none());
    let expect = |prefix: &str| assert_reported(&messages, prefix);
    expect("unknown-response-field 18:30 `body.message` has no field `txt`");
    expect("unknown-variable 19:20 unknown variable `reply_text`");
    expect("unknown-variable 22:29 unknown variable `reply_txt`");
    let hints: Vec<String> = checked
        .diagnostics
        .iter()
        .filter_map(|d| d.hint.clone())
        .collect();
    assert!(
        hints.iter().any(|h| h.contains("did you mean `text`?")),
        "{hints:#?}"
    );
    assert!(
        hints
            .iter()
            .any(|h| h.contains("did you mean `reply_text`?")),
        "{hints:#?}"
    );
}

#[test]
fn an_unset_channel_secret_is_a_warning_naming_its_variable() {
    let checked = check(
        &format!(
            "{GREET}channels:
  tg:
    kind: telegram
    secret_token: \"${{NOT_SET_TG_SECRET:-}}\"
    bot_token: \"${{NOT_SET_TG_TOKEN:-}}\"
"
        ),
        &[],
    );
    assert_eq!(codes(&checked), [Code::UnsetEnvVar]);
    assert!(
        checked.diagnostics[0].message.contains(
            "channel `tg` is disabled: `NOT_SET_TG_SECRET`, `NOT_SET_TG_TOKEN` are not set"
        ),
        "{:#?}",
        checked.diagnostics
    );
    let project = checked
        .project
        .expect("a warning does not stop compilation");
    assert!(!project.channels[0].enabled());
}

/// A flow served as an MCP tool, with `tool` spliced in.
fn tool_flow(tool: &str, steps: &str) -> String {
    format!("flows:\n  f:\n    intent: hello\n    tool:\n{tool}\n    steps:\n{steps}\n")
}

#[test]
fn a_tool_compiles_with_its_schema_and_intent() {
    let checked = check(
        &tool_flow(
            "      name: track.order-v2\n      description: Where an order is.\n      input: { type: object, properties: { order_id: { type: string, pattern: '^ORD-\\d+$' } } }",
            "      - reply: \"{{ input.order_id }}\"",
        ),
        &[],
    );
    assert_eq!(codes(&checked), [], "{:#?}", checked.diagnostics);
    let project = checked.project.unwrap();
    let (_, tool) = project.tool("track.order-v2").unwrap();
    assert_eq!(tool.description, "Where an order is.");
    assert!(
        tool.validator
            .is_valid(&serde_json::json!({"order_id": "ORD-1"}))
    );
    assert!(
        !tool
            .validator
            .is_valid(&serde_json::json!({"order_id": "1"}))
    );
    assert_eq!(tool.intent, project.intent_by_name("hello"));
}

#[test]
fn a_tool_input_path_must_exist_in_its_input_schema() {
    let checked = check(
        &tool_flow(
            "      name: t\n      description: d\n      input: { type: object, properties: { order_id: { type: string } } }",
            "      - reply: \"{{ input.ordr_id }}\"",
        ),
        &[],
    );
    assert_eq!(
        codes(&checked),
        [Code::UnknownVariable],
        "{:#?}",
        checked.diagnostics
    );
    assert_eq!(
        checked.diagnostics[0].hint.as_deref(),
        Some("did you mean `order_id`?")
    );
    assert!(
        checked.diagnostics[0]
            .message
            .contains("input schema of this flow's tool"),
        "{}",
        checked.diagnostics[0].message
    );
}

#[test]
fn tool_names_schemas_and_descriptions_are_checked() {
    for (tool, expected) in [
        (
            "      name: track order\n      description: d\n      input: { type: object }",
            Code::InvalidValue,
        ),
        (
            "      name: t\n      description: \"  \"\n      input: { type: object }",
            Code::InvalidValue,
        ),
        ("      name: t\n      description: d", Code::MissingKey),
        (
            "      name: t\n      description: d\n      input: { type: string }",
            Code::SchemaInvalid,
        ),
        (
            "      name: t\n      description: d\n      input: { type: object, properties: 3 }",
            Code::SchemaInvalid,
        ),
        (
            "      name: t\n      description: d\n      input: { type: object }\n      schema: t.schema.json",
            Code::MisplacedKey,
        ),
        (
            "      name: t\n      description: d\n      schema: missing.schema.json",
            Code::SchemaMissing,
        ),
    ] {
        let checked = check(&tool_flow(tool, "      - reply: ok"), &[]);
        assert_eq!(
            codes(&checked),
            [expected],
            "{tool}: {:#?}",
            checked.diagnostics
        );
        assert!(checked.diagnostics[0].location.line > 0, "{tool}");
    }
}

#[test]
fn a_tool_schema_may_come_from_a_file_and_two_flows_cannot_share_a_tool_name() {
    let checked = check(
        "flows:\n  f:\n    intent: hello\n    tool: { name: t, description: d, schema: t.schema.json }\n    steps:\n      - reply: \"{{ input.n }}\"\n  g:\n    tool: { name: t, description: d, input: { type: object } }\n    steps:\n      - reply: ok\n",
        &[(
            "schemas/t.schema.json",
            r#"{"type": "object", "properties": {"n": {"type": "integer"}}}"#,
        )],
    );
    // `g` has no intent but a tool: agents run it, so no
    // `flow-without-intent` warning.
    assert_eq!(
        codes(&checked),
        [Code::DuplicateName],
        "{:#?}",
        checked.diagnostics
    );
    assert_eq!(checked.diagnostics[0].related.len(), 1);
}

#[test]
fn key_names_cannot_hold_a_colon_and_no_channel_is_called_mcp() {
    let checked = check(
        "access:\n  api_keys:\n    - { name: \"a:b\", key: 0123456789abcdef0123 }\nflows:\n  f:\n    intent: hello\n    steps:\n      - reply: ok\n",
        &[],
    );
    assert_eq!(
        codes(&checked),
        [Code::InvalidValue],
        "{:#?}",
        checked.diagnostics
    );
    let checked = check(
        "channels:\n  mcp:\n    kind: telegram\n    secret_token: s0123456789abcdef\n    bot_token: \"1:abc\"\nflows:\n  f:\n    intent: hello\n    steps:\n      - reply: ok\n",
        &[],
    );
    assert!(
        checked
            .diagnostics
            .iter()
            .any(|d| d.code == Code::InvalidValue && d.message.contains("reserved")),
        "{:#?}",
        checked.diagnostics
    );
}

#[test]
fn mcp_services_need_a_tool_and_no_http_method() {
    let flow = "flows:\n  f:\n    intent: hello\n    steps:\n      - call: s\n      - reply: ok\n";
    for (service, expected) in [
        (
            "kind: mcp\n    url: http://127.0.0.1:9/mcp\n    tool: find_dishes",
            None,
        ),
        (
            "kind: mcp\n    url: http://127.0.0.1:9/mcp",
            Some(Code::MissingKey),
        ),
        (
            "url: http://127.0.0.1:9/s\n    tool: find_dishes",
            Some(Code::MisplacedKey),
        ),
        (
            "kind: grpc\n    url: http://127.0.0.1:9/s",
            Some(Code::InvalidValue),
        ),
        (
            "kind: mcp\n    url: http://127.0.0.1:9/mcp\n    tool: find_dishes\n    method: GET",
            Some(Code::MisplacedKey),
        ),
        (
            "kind: mcp\n    url: http://127.0.0.1:9/mcp\n    tool: \"find dishes\"",
            Some(Code::InvalidValue),
        ),
    ] {
        let checked = check(&format!("services:\n  s:\n    {service}\n{flow}"), &[]);
        assert_eq!(
            codes(&checked),
            expected.into_iter().collect::<Vec<_>>(),
            "{service}: {:#?}",
            checked.diagnostics
        );
        if expected.is_none() {
            let project = checked.project.unwrap();
            assert_eq!(project.services[0].mcp_tool.as_deref(), Some("find_dishes"));
        }
    }
}
