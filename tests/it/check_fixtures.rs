//! One broken project per diagnostic code under `tests/fixtures/check/<code>/`,
//! snapshot-tested through one helper. Each fixture must produce its code.

use mcp_orchestrator::check::check_project;
use mcp_orchestrator::diagnostic::{Code, render_human, render_json};
use mcp_orchestrator::flowtest::check_with_tests;

use crate::{fixtures_dir, test_environment};

/// Checks the fixture project `name` and returns its human rendering and
/// the codes it produced.
fn check_fixture(name: &str) -> (String, Vec<Code>) {
    let dir = fixtures_dir().join("check").join(name);
    let checked = check_with_tests(&dir, &test_environment());
    let human = render_human(&checked.diagnostics, &checked.sources, false);
    let codes = checked.diagnostics.iter().map(|d| d.code).collect();
    (human, codes)
}

#[test]
fn every_code_has_a_fixture_that_produces_it() {
    let mut missing = Vec::new();
    // The online codes are covered against a live server in `cli`.
    for code in Code::ALL.iter().filter(|code| !code.is_online()) {
        let name = code.as_str();
        if !fixtures_dir().join("check").join(name).is_dir() {
            missing.push(format!("{name}: no fixture folder"));
            continue;
        }
        let (_, codes) = check_fixture(name);
        if !codes.contains(code) {
            missing.push(format!("{name}: fixture produced {codes:?}"));
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}

#[test]
fn fixture_diagnostics_match_snapshots() {
    let mut names: Vec<String> = std::fs::read_dir(fixtures_dir().join("check"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(names.len() >= Code::ALL.iter().filter(|code| !code.is_online()).count());
    for name in names {
        let (human, _) = check_fixture(&name);
        insta::with_settings!({ snapshot_suffix => name.clone(), prepend_module_to_snapshot => false }, {
            insta::assert_snapshot!("check", human);
        });
    }
}

#[test]
fn json_output_lists_every_field() {
    let dir = fixtures_dir().join("check").join("unknown-response-field");
    let checked = check_project(&dir, &test_environment());
    let json: serde_json::Value = serde_json::from_str(&render_json(&checked.diagnostics)).unwrap();
    let first = &json[0];
    assert_eq!(first["code"], "unknown-response-field");
    assert_eq!(first["severity"], "error");
    assert_eq!(first["file"], "flows/main.yaml");
    assert!(first["line"].as_u64().unwrap() > 0);
    assert!(first["column"].as_u64().unwrap() > 0);
    assert!(first["end_column"].as_u64() > first["column"].as_u64());
    assert_eq!(first["hint"], "did you mean `order_id`?");
}

/// A project with twelve mistakes over three files: every one is reported,
/// each at its own line.
#[test]
fn every_mistake_of_a_project_is_reported_in_one_run() {
    let dir = fixtures_dir().join("many-mistakes");
    let checked = check_project(&dir, &test_environment());
    let errors: Vec<String> = checked
        .diagnostics
        .iter()
        .filter(|d| d.is_error())
        .map(|d| {
            format!(
                "{}:{} {}",
                d.location.file.display(),
                d.location.line,
                d.code.as_str()
            )
        })
        .collect();
    // Sorted by file name, then line.
    let expected = [
        "flows/flows.yaml:9 unknown-intent",
        "flows/flows.yaml:15 unknown-service",
        "flows/flows.yaml:22 unknown-response-field",
        "flows/flows.yaml:27 template-syntax",
        "flows/flows.yaml:30 unknown-variable",
        "flows/intents.yaml:9 invalid-regex",
        "flows/intents.yaml:13 unknown-key",
        "flows/intents.yaml:18 unknown-intent",
        "flows/services.yaml:5 invalid-url",
        "flows/services.yaml:6 invalid-duration",
        "flows/services.yaml:13 schema-missing",
        "flows/services.yaml:16 unknown-key",
    ];
    assert_eq!(
        errors, expected,
        "all diagnostics: {:#?}",
        checked.diagnostics
    );
}
