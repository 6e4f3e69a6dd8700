//! The example project at the repository root checks clean, its flow files
//! validate against the published format schema, and a typo in a template
//! path is caught with a hint.

use mcp_orchestrator::check::check_project;
use mcp_orchestrator::diagnostic::Code;

use crate::{repository_root, shipped_project_copy, test_environment};

#[test]
fn shipped_project_checks_clean() {
    let checked = check_project(&repository_root(), &test_environment());
    assert!(
        checked.diagnostics.is_empty(),
        "diagnostics: {:#?}",
        checked.diagnostics
    );
    let project = checked.project.expect("a clean project compiles");
    let intents: Vec<&str> = project.intents.iter().map(|i| i.name.as_str()).collect();
    for intent in [
        "menu",
        "order",
        "recommend",
        "track_order",
        "profile",
        "save_preferences",
        "greeting",
        "smalltalk",
    ] {
        assert!(intents.contains(&intent), "missing intent {intent}");
    }
    assert_eq!(project.services.len(), 5);
    assert!(
        project
            .services
            .iter()
            .all(|s| s.url.is_none() && s.mock.is_some())
    );
    assert!(project.request_schema.is_some());
    assert_eq!(project.content_hash.len(), 16);
}

#[test]
fn shipped_flow_files_validate_against_the_format_schema() {
    let schema = mcp_orchestrator::spec::flow_file_json_schema();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let committed: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repository_root().join("docs/flow-file.schema.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        committed, schema,
        "docs/flow-file.schema.json is stale: run `mcp-orchestrator schema > docs/flow-file.schema.json`"
    );
    let mut checked_files = 0;
    for entry in std::fs::read_dir(repository_root().join("flows")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("# yaml-language-server: $schema=../docs/flow-file.schema.json"),
            "{} must start with the yaml-language-server line",
            path.display()
        );
        let document: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&document)
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{}: {errors:#?}", path.display());
        checked_files += 1;
    }
    assert!(checked_files >= 6);
}

#[test]
fn format_schema_rejects_unknown_keys() {
    let schema = mcp_orchestrator::spec::flow_file_json_schema();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let document =
        serde_json::json!({"flows": {"f": {"intent": "x", "steps": [{"replyy": "hi"}]}}});
    assert!(!validator.is_valid(&document));
}

#[test]
fn misspelt_response_field_in_a_reply_is_caught_with_a_hint() {
    let project = shipped_project_copy();
    let order = project.path().join("flows/order.yaml");
    let text = std::fs::read_to_string(&order).unwrap();
    let reply_line = text
        .lines()
        .position(|line| line.contains("Your order {{ placed.order_id }}"))
        .expect("the order reply mentions placed.order_id")
        + 1;
    std::fs::write(
        &order,
        text.replace(
            "Your order {{ placed.order_id }}",
            "Your order {{ placed.order_idd }}",
        ),
    )
    .unwrap();
    let checked = check_project(project.path(), &test_environment());
    assert!(checked.project.is_none());
    let [diagnostic] = checked.diagnostics.as_slice() else {
        panic!("expected one diagnostic, got {:#?}", checked.diagnostics);
    };
    assert_eq!(diagnostic.code, Code::UnknownResponseField);
    assert_eq!(
        diagnostic.location.file,
        std::path::Path::new("flows/order.yaml")
    );
    assert_eq!(diagnostic.location.line as usize, reply_line);
    let line = text.lines().nth(reply_line - 1).unwrap();
    let column = line.find("order_id }}").unwrap() + 1;
    assert_eq!(diagnostic.location.column as usize, column);
    assert_eq!(diagnostic.hint.as_deref(), Some("did you mean `order_id`?"));
}

#[test]
fn unset_variable_without_default_is_a_warning() {
    let project = shipped_project_copy();
    let services = project.path().join("flows/services.yaml");
    let text = std::fs::read_to_string(&services).unwrap();
    std::fs::write(
        &services,
        text.replace("${MENU_SERVICE_URL:-}", "${MENU_SERVICE_URL}"),
    )
    .unwrap();
    let checked = check_project(project.path(), &test_environment());
    assert!(
        checked.project.is_some(),
        "a warning does not stop compilation"
    );
    let codes: Vec<Code> = checked.diagnostics.iter().map(|d| d.code).collect();
    assert_eq!(codes, [Code::UnsetEnvVar]);
}

#[test]
fn environment_values_are_substituted() {
    let project = shipped_project_copy();
    let mut environment = test_environment();
    environment.insert(
        "MENU_SERVICE_URL".to_owned(),
        "http://127.0.0.1:9/menu".to_owned(),
    );
    let checked = check_project(project.path(), &environment);
    let project = checked.project.expect("clean");
    let menu = project.services.iter().find(|s| s.name == "menu").unwrap();
    assert_eq!(
        menu.url.as_ref().map(|u| u.as_str()),
        Some("http://127.0.0.1:9/menu")
    );
    assert_eq!(menu.url_variable.as_deref(), Some("MENU_SERVICE_URL"));
}
