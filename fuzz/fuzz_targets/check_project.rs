//! Loading and checking a flow project from arbitrary YAML: the bytes are
//! one flow file beside the shipped project's schemas and mocks. Whatever
//! the file holds, check answers with diagnostics, never a panic or a hang.

#![no_main]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use libfuzzer_sys::fuzz_target;
use mcp_orchestrator::check;
use mcp_orchestrator::diagnostic::Sources;
use mcp_orchestrator::load::{LoadedFile, LoadedProject, parse_flow_file};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let environment = HashMap::from([("SET".to_owned(), "value".to_owned())]);
    let path = PathBuf::from("flows/fuzz.yaml");
    let parsed = parse_flow_file(&path, text, &environment);
    let mut sources = Sources::default();
    sources.insert(path.clone(), text.to_owned());
    let checked = check::compile(LoadedProject {
        dir: root,
        files: vec![LoadedFile {
            path,
            spec: parsed.spec,
        }],
        sources,
        diagnostics: parsed.diagnostics,
        unparsed_names: parsed.unparsed_names.into_iter().collect(),
        complete: parsed.complete,
    });
    // Every diagnostic renders, in every format.
    let _ = mcp_orchestrator::diagnostic::render_human(&checked.diagnostics, &checked.sources, false);
    let _ = mcp_orchestrator::diagnostic::render_json(&checked.diagnostics);
    assert_eq!(checked.project.is_some(), checked.error_count() == 0);
});
