//! The real binary: exit codes and output formats.

use std::process::{Command, Output};

use crate::{fixtures_dir, repository_root, shipped_project_copy};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mcp-orchestrator"))
        .args(args)
        .env_remove("MCP_PROJECT_DIR")
        .output()
        .unwrap()
}

fn fixture(name: &str) -> String {
    fixtures_dir()
        .join("check")
        .join(name)
        .display()
        .to_string()
}

#[test]
fn check_exits_zero_on_the_shipped_project() {
    let output = Command::new(env!("CARGO_BIN_EXE_mcp-orchestrator"))
        .args(["check", repository_root().to_str().unwrap()])
        .envs(crate::CHANNEL_SECRETS.iter().copied())
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("0 errors, 0 warnings"));
}

#[test]
fn check_warns_about_each_channel_whose_secrets_are_unset() {
    let output = Command::new(env!("CARGO_BIN_EXE_mcp-orchestrator"))
        .args(["check", repository_root().to_str().unwrap()])
        .env_remove("TELEGRAM_SECRET_TOKEN")
        .env_remove("TELEGRAM_BOT_TOKEN")
        .envs(
            crate::CHANNEL_SECRETS
                .iter()
                .copied()
                .filter(|(name, _)| !name.starts_with("TELEGRAM_")),
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("0 errors, 1 warning"), "{stderr}");
    assert!(
        stderr.contains(
            "channel `telegram` is disabled: `TELEGRAM_SECRET_TOKEN`, `TELEGRAM_BOT_TOKEN` are not set"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("flows/channels.yaml:10:3"), "{stderr}");
}

#[test]
fn check_defaults_to_the_project_dir_variable() {
    let output = Command::new(env!("CARGO_BIN_EXE_mcp-orchestrator"))
        .arg("check")
        .env("MCP_PROJECT_DIR", fixture("unknown-service"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
}

#[test]
fn check_exits_one_on_an_invalid_project_with_file_line_column() {
    let project = shipped_project_copy();
    let order = project.path().join("flows/order.yaml");
    let text = std::fs::read_to_string(&order).unwrap();
    std::fs::write(
        &order,
        text.replace(
            "Your order {{ placed.order_id }}",
            "Your order {{ placed.order_idd }}",
        ),
    )
    .unwrap();
    let output = run(&["check", project.path().to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let line = text
        .lines()
        .position(|l| l.contains("Your order {{"))
        .unwrap()
        + 1;
    assert!(
        stderr.contains(&format!("flows/order.yaml:{line}:")),
        "{stderr}"
    );
    assert!(stderr.contains("did you mean `order_id`?"), "{stderr}");

    let output = run(&[
        "check",
        "--format",
        "github",
        project.path().to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let expected = format!(
        "::error file={}/flows/order.yaml,line={line},",
        project.path().display()
    );
    assert!(stdout.contains(&expected), "{stdout}");
}

#[test]
fn json_format_prints_one_array() {
    let output = run(&["check", "--format", "json", &fixture("unknown-intent")]);
    assert_eq!(output.status.code(), Some(1));
    let diagnostics: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let diagnostics = diagnostics.as_array().unwrap();
    assert!(
        diagnostics
            .iter()
            .any(|d| d["code"] == "unknown-intent" && d["hint"] == "did you mean `hello`?")
    );
}

#[test]
fn github_format_marks_warnings_as_warnings() {
    let output = run(&["check", "--format", "github", &fixture("unreachable-step")]);
    assert_eq!(output.status.code(), Some(0), "warnings alone pass");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.starts_with("::warning file="), "{stdout}");
    assert!(stdout.contains("title=unreachable-step"), "{stdout}");
}

#[test]
fn deny_warnings_turns_warnings_into_failure() {
    let output = run(&["check", "--deny-warnings", &fixture("unset-env-var")]);
    assert_eq!(output.status.code(), Some(1));
    let output = run(&["check", &fixture("unset-env-var")]);
    assert_eq!(output.status.code(), Some(0));
}

#[test]
fn usage_and_io_errors_exit_two() {
    assert_eq!(run(&["check", "--format", "xml"]).status.code(), Some(2));
    assert_eq!(run(&["no-such-command"]).status.code(), Some(2));
    assert_eq!(
        run(&["check", "/nonexistent/project"]).status.code(),
        Some(2)
    );
    assert_eq!(run(&["check", &fixture("io")]).status.code(), Some(2));
}

#[test]
fn schema_prints_the_flow_file_schema() {
    let output = run(&["schema"]);
    assert_eq!(output.status.code(), Some(0));
    let schema: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    assert!(schema["properties"]["flows"].is_object());
}
