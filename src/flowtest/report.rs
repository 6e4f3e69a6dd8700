//! Renderings of a test report: human, JUnit XML, GitHub annotations.

use std::fmt::Write as _;

use super::{CaseResult, Coverage, Failure, Report};

/// Readable output: a line per case, and for each failure the case, the
/// turn, where the flow went, and a diff of expected and actual.
pub fn human(report: &Report, coverage: Option<&Coverage>, elapsed: std::time::Duration) -> String {
    let mut out = String::new();
    for case in &report.cases {
        let status = if case.passed() { "PASS" } else { "FAIL" };
        let _ = writeln!(
            out,
            "{status} {}:{}:{} {} ({} turn{})",
            case.file.display(),
            case.position.line,
            case.position.column,
            case.name,
            case.turns,
            if case.turns == 1 { "" } else { "s" }
        );
        for failure in &case.failures {
            write_failure(&mut out, case, failure);
        }
    }
    for golden in &report.golden {
        let status = if golden.passed() { "PASS" } else { "FAIL" };
        let _ = writeln!(
            out,
            "{status} {}:{}:{} golden intents: {}/{} correct ({:.1}%), at least {:.1}% required",
            golden.file.display(),
            golden.position.line,
            golden.position.column,
            golden.correct,
            golden.total,
            golden.accuracy() * 100.0,
            golden.min_accuracy * 100.0
        );
        let width = golden
            .by_intent
            .iter()
            .map(|(intent, _, _)| intent.len())
            .max()
            .unwrap_or(0);
        for (intent, correct, total) in &golden.by_intent {
            let _ = writeln!(
                out,
                "    {intent:<width$}  {correct:>3}/{total:<3}  {:5.1}%",
                *correct as f64 * 100.0 / (*total).max(1) as f64
            );
        }
        let confusions = golden.confusions();
        if !confusions.is_empty() {
            let pairs: Vec<String> = confusions
                .iter()
                .map(|(expected, actual, count)| format!("{expected} → {actual} ×{count}"))
                .collect();
            let _ = writeln!(out, "    taken for another: {}", pairs.join(", "));
        }
        for (text, expected, actual, position) in &golden.misclassified {
            let _ = writeln!(
                out,
                "    {}:{}: {text:?}: expected `{expected}`, the rules say `{actual}`",
                golden.file.display(),
                position.line
            );
        }
    }
    if let Some(coverage) = coverage {
        write_coverage(&mut out, coverage);
    }
    let (passed, failed) = report.counts();
    let _ = writeln!(out, "\nfinished in {:.2}s", elapsed.as_secs_f64());
    let _ = writeln!(out, "{passed} passed, {failed} failed");
    out
}

fn write_failure(out: &mut String, case: &CaseResult, failure: &Failure) {
    let _ = writeln!(
        out,
        "  {}:{}:{}: turn {}: {}",
        case.file.display(),
        failure.position.line,
        failure.position.column,
        failure.turn,
        failure.what
    );
    if let Some(path) = &failure.path {
        let _ = writeln!(out, "    {path}");
    }
    let diff = similar::TextDiff::from_lines(&failure.expected, &failure.actual);
    let _ = writeln!(out, "    --- expected");
    let _ = writeln!(out, "    +++ actual");
    for change in diff.iter_all_changes() {
        let sign = match change.tag() {
            similar::ChangeTag::Delete => '-',
            similar::ChangeTag::Insert => '+',
            similar::ChangeTag::Equal => ' ',
        };
        let line = change.value();
        let _ = write!(out, "    {sign}{line}");
        if !line.ends_with('\n') {
            out.push('\n');
        }
    }
}

fn write_coverage(out: &mut String, coverage: &Coverage) {
    let reached_steps = coverage.steps_total - coverage.unreached_steps.len();
    let reached_routes = coverage.routes_total - coverage.unreached_routes.len();
    let _ = writeln!(
        out,
        "\ncoverage: {reached_steps}/{} steps, {reached_routes}/{} routes ({:.0}%)",
        coverage.steps_total,
        coverage.routes_total,
        if coverage.routes_total == 0 {
            100.0
        } else {
            reached_routes as f64 * 100.0 / coverage.routes_total as f64
        }
    );
    for route in &coverage.unreached_routes {
        let _ = writeln!(out, "  route not reached: {route}");
    }
    for step in &coverage.unreached_steps {
        let _ = writeln!(
            out,
            "  step not reached: {}:{}:{}",
            step.file.display(),
            step.line,
            step.column
        );
    }
}

/// JUnit XML: one test suite per file, one test case per case and golden set.
pub fn junit(report: &Report) -> String {
    let mut files: Vec<&std::path::Path> = report.cases.iter().map(|c| c.file.as_path()).collect();
    files.extend(report.golden.iter().map(|g| g.file.as_path()));
    files.sort();
    files.dedup();
    let (passed, failures) = report.counts();
    let total = passed + failures;
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        out,
        "<testsuites name=\"mcp-orchestrator\" tests=\"{total}\" failures=\"{failures}\">"
    );
    for file in files {
        let cases: Vec<&CaseResult> = report.cases.iter().filter(|c| c.file == file).collect();
        let golden: Vec<_> = report.golden.iter().filter(|g| g.file == file).collect();
        let suite_failures = cases.iter().filter(|c| !c.passed()).count()
            + golden.iter().filter(|g| !g.passed()).count();
        let time: f64 = cases.iter().map(|c| c.elapsed.as_secs_f64()).sum();
        let name = escape(&file.display().to_string());
        let _ = writeln!(
            out,
            "  <testsuite name=\"{name}\" tests=\"{}\" failures=\"{suite_failures}\" time=\"{time:.3}\">",
            cases.len() + golden.len()
        );
        for case in cases {
            let _ = write!(
                out,
                "    <testcase name=\"{}\" classname=\"{name}\" file=\"{name}\" line=\"{}\" time=\"{:.3}\"",
                escape(&case.name),
                case.position.line,
                case.elapsed.as_secs_f64()
            );
            if case.passed() {
                out.push_str("/>\n");
                continue;
            }
            out.push_str(">\n");
            for failure in &case.failures {
                let mut body = String::new();
                write_failure(&mut body, case, failure);
                let _ = writeln!(
                    out,
                    "      <failure message=\"turn {}: {}\" type=\"expectation\">{}</failure>",
                    failure.turn,
                    escape(&failure.what),
                    escape(&body)
                );
            }
            out.push_str("    </testcase>\n");
        }
        for golden in golden {
            let _ = write!(
                out,
                "    <testcase name=\"golden intents\" classname=\"{name}\" file=\"{name}\" line=\"{}\"",
                golden.position.line
            );
            if golden.passed() {
                out.push_str("/>\n");
            } else {
                let _ = writeln!(
                    out,
                    ">\n      <failure message=\"accuracy {:.3} below {:.3}\" type=\"accuracy\"/>\n    </testcase>",
                    golden.accuracy(),
                    golden.min_accuracy
                );
            }
        }
        out.push_str("  </testsuite>\n");
    }
    out.push_str("</testsuites>\n");
    out
}

/// GitHub workflow commands, one per failure, at the test file's line.
pub fn github(report: &Report) -> String {
    let mut out = String::new();
    for case in &report.cases {
        for failure in &case.failures {
            let mut message = format!(
                "{}: turn {}: {}: expected {}, got {}",
                case.name, failure.turn, failure.what, failure.expected, failure.actual
            );
            if let Some(path) = &failure.path {
                message.push('\n');
                message.push_str(path);
            }
            let _ = writeln!(
                out,
                "::error file={},line={},col={},title={}::{}",
                property(&case.file.display().to_string()),
                failure.position.line,
                failure.position.column,
                property(&format!("test: {}", case.name)),
                data(&message)
            );
        }
    }
    for golden in report.golden.iter().filter(|g| !g.passed()) {
        let _ = writeln!(
            out,
            "::error file={},line={},title=golden intents::{}",
            property(&golden.file.display().to_string()),
            golden.position.line,
            data(&format!(
                "accuracy {:.1}% is below {:.1}%",
                golden.accuracy() * 100.0,
                golden.min_accuracy * 100.0
            ))
        );
    }
    let (passed, failed) = report.counts();
    let _ = writeln!(out, "{passed} passed, {failed} failed");
    out
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if (c as u32) < 0x20 && !matches!(c, '\n' | '\r' | '\t') => {}
            c => out.push(c),
        }
    }
    out
}

fn data(text: &str) -> String {
    crate::diagnostic::escape_data(text)
}

fn property(text: &str) -> String {
    crate::diagnostic::escape_property(text)
}
