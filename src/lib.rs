//! mcp-orchestrator: a declarative flow engine for conversational ordering
//! assistants. Intents, flows and service calls are configuration (YAML plus
//! JSON Schemas); this crate loads, checks and compiles them, and serves
//! them behind `POST /orchestrate`.
//!
//! See `ARCHITECTURE.md` for the map of modules and their invariants.

pub mod admission;
pub mod channels;
pub mod check;
pub mod diagnostic;
pub mod document;
pub mod engine;
pub mod flowtest;
pub mod graph;
pub mod intent;
pub mod load;
pub mod project;
pub mod reload;
pub mod server;
pub mod services;
pub mod session;
pub mod spec;
pub mod telemetry;
pub mod template;
pub mod tenants;
pub mod trace;
