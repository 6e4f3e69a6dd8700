//! Integration tests, one binary: the check fixtures, the shipped project,
//! the output formats, the command line, and the runtime behind
//! `POST /orchestrate`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod check_fixtures;
mod check_rules;
mod cli;
mod flow_tests;
mod reload;
mod runtime;
mod session_stores;
mod shipped_project;
mod tenants;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub fn repository_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixtures_dir() -> PathBuf {
    repository_root().join("tests/fixtures")
}

/// The environment every check in the tests sees: fixed, so results do not
/// depend on the machine.
pub fn test_environment() -> HashMap<String, String> {
    HashMap::from([
        ("SET_IN_TESTS".to_owned(), "yes".to_owned()),
        // The shipped project limits each user to 10 turns a second; tests
        // that send many turns of one user would hit it. The tests of the
        // limits set their own.
        ("PER_USER_RATE".to_owned(), "100000/s".to_owned()),
    ])
    .into_iter()
    .chain(
        CHANNEL_SECRETS
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned())),
    )
    .collect()
}

/// Values for the secrets of the shipped project's channels, so that a
/// check in the tests has them enabled (unset, each channel is a warning).
pub const CHANNEL_SECRETS: &[(&str, &str)] = &[
    ("TELEGRAM_SECRET_TOKEN", "telegram-secret-token-for-tests"),
    ("TELEGRAM_BOT_TOKEN", "123456:telegram-bot-token-for-tests"),
    ("SLACK_SIGNING_SECRET", "slack-signing-secret-for-tests"),
    ("SLACK_BOT_TOKEN", "xoxb-slack-bot-token-for-tests"),
    ("WHATSAPP_VERIFY_TOKEN", "whatsapp-verify-token-for-tests"),
    ("WHATSAPP_APP_SECRET", "whatsapp-app-secret-for-tests"),
    ("WHATSAPP_ACCESS_TOKEN", "whatsapp-access-token-for-tests"),
    ("TWILIO_AUTH_TOKEN", "twilio-auth-token-for-tests"),
    ("TWILIO_PUBLIC_URL", "https://bot.example.test/channels/sms"),
];

/// Copies a project directory tree (for tests that edit a copy).
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A temporary copy of the shipped project (flows, schemas, mocks).
pub fn shipped_project_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for folder in ["flows", "schemas", "mocks"] {
        copy_tree(&repository_root().join(folder), &dir.path().join(folder));
    }
    dir
}
