//! mcp-orchestrator: a declarative flow engine for conversational ordering
//! assistants. Intents, flows and service calls are configuration (YAML plus
//! JSON Schemas); this crate loads, checks and compiles them.
//!
//! See `ARCHITECTURE.md` for the map of modules and their invariants.

pub mod check;
pub mod diagnostic;
pub mod load;
pub mod project;
pub mod spec;
pub mod template;
