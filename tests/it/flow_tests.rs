//! `mcp-orchestrator test`: the shipped conversation tests, failure output,
//! JUnit and GitHub formats, the paused clock.

use std::process::{Command, Output};

use mcp_orchestrator::flowtest;

use crate::{repository_root, shipped_project_copy, test_environment};

fn run_test_command(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mcp-orchestrator"))
        .arg("test")
        .arg(dir)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn shipped_cases_pass_with_full_route_coverage() {
    let output = run_test_command(&repository_root(), &["--coverage"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains(" 0 failed"), "{stdout}");
    let coverage = stdout.lines().find(|l| l.starts_with("coverage:")).unwrap();
    assert!(coverage.ends_with("routes (100%)"), "{coverage}");
    assert!(!stdout.contains("not reached"), "{stdout}");
}

#[test]
fn shipped_tests_cover_every_route_and_a_golden_set_of_forty() {
    let project = mcp_orchestrator::check::check_project(&repository_root(), &test_environment())
        .project
        .unwrap();
    let tests = flowtest::load_tests(&repository_root(), &test_environment());
    assert!(tests.diagnostics.is_empty(), "{:#?}", tests.diagnostics);
    let report = flowtest::run(&project, &tests, Default::default());
    assert!(report.passed());
    let coverage = flowtest::coverage(&project, &report);
    assert_eq!(coverage.unreached_routes, Vec::<String>::new());
    let golden: usize = report.golden.iter().map(|g| g.total).sum();
    assert!(golden >= 40, "{golden} golden examples");
}

#[test]
fn a_broken_expectation_fails_with_a_diff_naming_file_case_and_turn() {
    let project = shipped_project_copy();
    let tests_dir = repository_root().join("flows/tests");
    crate::copy_tree(&tests_dir, &project.path().join("flows/tests"));
    let order = project.path().join("flows/tests/order.yaml");
    let text = std::fs::read_to_string(&order).unwrap();
    assert!(text.contains("Total: 27.50 EUR."));
    std::fs::write(
        &order,
        text.replacen("Total: 27.50 EUR.", "Total: 99.00 EUR.", 1),
    )
    .unwrap();

    let output = run_test_command(project.path(), &[]);
    assert_eq!(output.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("FAIL flows/tests/order.yaml:"), "{stdout}");
    assert!(stdout.contains(": turn 1: reply"), "{stdout}");
    assert!(
        stdout.contains("-Thank you! Your order ORD-10421"),
        "{stdout}"
    );
    assert!(
        stdout.contains("+Thank you! Your order ORD-10421"),
        "{stdout}"
    );
    assert!(stdout.contains("answered at flows/order.yaml:"), "{stdout}");

    let output = run_test_command(project.path(), &["--format", "github"]);
    assert_eq!(output.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("::error file=flows/tests/order.yaml,line="),
        "{stdout}"
    );

    let junit = project.path().join("report.xml");
    let output = run_test_command(
        project.path(),
        &["--format", "junit", "--output", junit.to_str().unwrap()],
    );
    assert_eq!(output.status.code(), Some(1));
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(xml.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>"));
    assert_eq!(xml.matches("<failure ").count(), 1, "{xml}");
    assert_eq!(
        xml.matches("<testsuite ").count(),
        xml.matches("</testsuite>").count()
    );
    assert!(xml.trim_end().ends_with("</testsuites>"));
}

#[test]
fn filter_runs_only_matching_cases() {
    let output = run_test_command(
        &repository_root(),
        &["--filter", "timeout on the first attempt"],
    );
    assert_eq!(output.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("PASS")).count(),
        1,
        "{stdout}"
    );
    let output = run_test_command(&repository_root(), &["--filter", "no case has this name"]);
    assert_eq!(output.status.code(), Some(1));
}

#[test]
fn an_invalid_test_file_is_a_usage_error() {
    let project = shipped_project_copy();
    std::fs::create_dir_all(project.path().join("flows/tests")).unwrap();
    std::fs::write(
        project.path().join("flows/tests/bad.yaml"),
        "cases:\n  - name: x\n    turns:\n      - request: { text: menu }\n        services: { menuu: { status: 500 } }\n",
    )
    .unwrap();
    let output = run_test_command(project.path(), &[]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("flows/tests/bad.yaml:5:21"), "{stderr}");
    assert!(stderr.contains("did you mean `menu`?"), "{stderr}");
}

/// A stubbed 3 s timeout and a retry run on the paused clock: the case
/// passes without waiting (its wall time is reported, not asserted).
#[test]
fn stubbed_timeouts_run_on_the_test_clock() {
    let project = shipped_project_copy();
    std::fs::create_dir_all(project.path().join("flows/tests")).unwrap();
    std::fs::write(
        project.path().join("flows/tests/retry.yaml"),
        "cases:
  - name: menu times out once, then answers
    turns:
      - request: { text: show me the menu }
        services:
          menu: [ { error: timeout }, { delay: 2s, file: mocks/menu.json } ]
        expect: { route: menu, decision: reply, calls: [ { service: menu } ] }
",
    )
    .unwrap();
    let checked = flowtest::check_with_tests(project.path(), &test_environment());
    let compiled = checked
        .project
        .unwrap_or_else(|| panic!("{:#?}", checked.diagnostics));
    let tests = flowtest::load_tests(project.path(), &test_environment());
    let report = flowtest::run(&compiled, &tests, Default::default());
    let case = &report.cases[0];
    assert!(case.passed(), "{:#?}", case.failures);
    eprintln!(
        "wall time of a case with a 3 s timeout and a retry: {:?}",
        case.elapsed
    );
}

#[test]
fn the_test_file_schema_is_committed_and_the_shipped_tests_follow_it() {
    let schema = flowtest::spec::test_file_json_schema();
    let committed: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repository_root().join("docs/test-file.schema.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        committed, schema,
        "docs/test-file.schema.json is stale: run `mcp-orchestrator schema --tests`"
    );
    let validator = jsonschema::validator_for(&schema).unwrap();
    let mut files = 0;
    for entry in std::fs::read_dir(repository_root().join("flows/tests")).unwrap() {
        let path = entry.unwrap().path();
        let document: serde_json::Value =
            serde_saphyr::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&document)
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{}: {errors:#?}", path.display());
        files += 1;
    }
    assert!(files >= 6);
}

#[test]
fn a_test_request_the_request_schema_refuses_fails_like_a_real_request() {
    let project = shipped_project_copy();
    std::fs::create_dir_all(project.path().join("flows/tests")).unwrap();
    std::fs::write(
        project.path().join("flows/tests/bad_request.yaml"),
        "cases:\n  - name: a table number that is a list\n    turns:\n      - request: { text: \"I want to order\", order_items: [{ id: mn-01 }], order_table_number: [7] }\n        expect: { route: order }\n",
    )
    .unwrap();
    let output = run_test_command(project.path(), &[]);
    assert_eq!(output.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("FAIL flows/tests/bad_request.yaml:2:5"),
        "{stdout}"
    );
    assert!(stdout.contains("/order_table_number"), "{stdout}");
}

/// A channel turn whose outbound call is not what the test expects fails
/// with the body sent, and the bot token never shows in the report.
#[test]
fn a_channel_turn_checks_what_goes_back_to_the_platform() {
    let project = shipped_project_copy();
    std::fs::create_dir_all(project.path().join("flows/tests")).unwrap();
    std::fs::write(
        project.path().join("flows/tests/telegram.yaml"),
        r#"cases:
  - name: telegram reply goes to the wrong chat
    turns:
      - channel: telegram
        payload:
          update_id: 7
          message: { message_id: 1, from: { id: 42, is_bot: false }, chat: { id: 42, type: private }, date: 1, text: "Can I see the menu?" }
        expect:
          route: menu
          outbound: { to: /sendMessage, body: { chat_id: 43 } }
  - name: a bot's message runs nothing
    turns:
      - channel: telegram
        payload:
          update_id: 8
          message: { message_id: 2, from: { id: 9, is_bot: true }, chat: { id: 42, type: private }, date: 1, text: "Can I see the menu?" }
        expect: { ignored: true }
  - name: a user's message is not ignored
    turns:
      - channel: telegram
        payload:
          update_id: 9
          message: { message_id: 3, from: { id: 42, is_bot: false }, chat: { id: 42, type: private }, date: 1, text: "hello" }
        expect: { ignored: true }
"#,
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_mcp-orchestrator"))
        .arg("test")
        .arg(project.path())
        .env("TELEGRAM_SECRET_TOKEN", "telegram-secret-token-for-tests")
        .env("TELEGRAM_BOT_TOKEN", "123456:never-shown-bot-token")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("FAIL flows/tests/telegram.yaml:2:5 telegram reply goes to the wrong chat"),
        "{stdout}"
    );
    assert!(stdout.contains(": turn 1: outbound body"), "{stdout}");
    assert!(stdout.contains("-  \"chat_id\": 43"), "{stdout}");
    assert!(stdout.contains("+  \"chat_id\": 42"), "{stdout}");
    assert!(
        stdout.contains("PASS flows/tests/telegram.yaml:11:5 a bot's message runs nothing"),
        "{stdout}"
    );
    assert!(
        stdout.contains("FAIL flows/tests/telegram.yaml:18:5 a user's message is not ignored"),
        "{stdout}"
    );
    assert!(!stdout.contains("never-shown-bot-token"), "{stdout}");
}

#[test]
fn a_channel_turn_names_a_declared_channel() {
    let project = shipped_project_copy();
    std::fs::create_dir_all(project.path().join("flows/tests")).unwrap();
    std::fs::write(
        project.path().join("flows/tests/bad.yaml"),
        "cases:\n  - name: x\n    turns:\n      - channel: telegramm\n        payload: { update_id: 1 }\n      - expect: { route: menu }\n",
    )
    .unwrap();
    let output = run_test_command(project.path(), &[]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unknown channel `telegramm`"), "{stderr}");
    assert!(stderr.contains("did you mean `telegram`?"), "{stderr}");
    assert!(
        stderr.contains("a turn needs either `request`, or `channel` and `payload`"),
        "{stderr}"
    );
}

#[test]
fn golden_only_reports_accuracy_per_intent_and_the_intents_taken_for_one_another() {
    let project = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(project.path().join("flows/tests")).unwrap();
    std::fs::write(
        project.path().join("flows/main.yaml"),
        r#"
intents:
  hello:
    keywords: [hello, hi]
  bye:
    keywords: [bye, goodbye]
classifier:
  fallback: hello
flows:
  main:
    intents: [hello, bye]
    steps:
      - reply: "ok"
"#,
    )
    .unwrap();
    std::fs::write(
        project.path().join("flows/tests/golden.yaml"),
        r#"
cases:
  - name: a case that --golden-only leaves out
    turns:
      - request: { text: "hello" }
        expect: { reply: "not what the flow says" }
golden:
  min_accuracy: 0.5
  examples:
    - { text: "hello there", intent: hello }
    - { text: "hi", intent: hello }
    - { text: "bye now", intent: bye }
    - { text: "goodbye", intent: bye }
    - { text: "hi and goodbye... no, hello", intent: bye }
"#,
    )
    .unwrap();
    let output = run_test_command(project.path(), &["--golden-only"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    assert!(!stdout.contains("a case that"), "{stdout}");
    assert!(
        stdout.contains("golden intents: 4/5 correct (80.0%)"),
        "{stdout}"
    );
    assert!(stdout.contains("    hello    2/2    100.0%"), "{stdout}");
    assert!(stdout.contains("    bye      2/3     66.7%"), "{stdout}");
    assert!(
        stdout.contains("taken for another: bye → hello ×1"),
        "{stdout}"
    );
    assert!(stdout.contains("1 passed, 0 failed"), "{stdout}");

    // Without it, the failing case runs too.
    let output = run_test_command(project.path(), &[]);
    assert_eq!(output.status.code(), Some(1));
}

/// The shipped golden set measures what the model learned: none of its
/// texts is an example, and there are enough of them for every intent.
#[test]
fn the_shipped_golden_set_holds_no_example_and_covers_every_intent() {
    let project = mcp_orchestrator::check::check_project(&repository_root(), &test_environment())
        .project
        .unwrap();
    let tests = flowtest::load_tests(&repository_root(), &test_environment());
    let examples: std::collections::HashSet<String> = project
        .intents
        .iter()
        .flat_map(|intent| &intent.examples)
        .map(|example| mcp_orchestrator::intent::normalize(example).replace(' ', ""))
        .collect();
    let report = flowtest::run(
        &project,
        &tests,
        flowtest::Selection {
            golden_only: true,
            ..Default::default()
        },
    );
    let golden = &report.golden[0];
    assert!(golden.total >= 150, "{} texts", golden.total);
    for (_, test_file) in &tests.files {
        for example in test_file.golden.iter().flat_map(|g| &g.value.examples) {
            let text =
                mcp_orchestrator::intent::normalize(&example.value.text.value).replace(' ', "");
            assert!(
                !examples.contains(&text),
                "{:?} is an example",
                example.value.text.value
            );
        }
    }
    for intent in &project.intents {
        assert!(
            intent.examples.len() >= 20,
            "{}: {} examples",
            intent.name,
            intent.examples.len()
        );
        let (_, _, total) = golden
            .by_intent
            .iter()
            .find(|(name, _, _)| *name == intent.name)
            .unwrap_or_else(|| panic!("no golden text for {}", intent.name));
        assert!(*total >= 10, "{}: {total} golden texts", intent.name);
    }
}
