//! Logs and metrics: the tracing subscriber (human-readable on a terminal,
//! JSON lines otherwise), shipping to Grafana Loki through a bounded buffer,
//! the Prometheus recorder, and the redaction of payloads before they are
//! logged.
//!
//! Configuration arrives typed (`TelemetryConfig`); nothing here reads the
//! environment.

mod json_line;
pub mod loki;
pub mod prometheus;
pub mod redact;

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub use json_line::JsonLineLayer;

/// The target of events that carry payloads (service request and response
/// bodies). They are written at `debug`, so `LOG_LEVEL=debug` shows them, and
/// so does the directive `mcp_orchestrator::payload=debug` (`LOG_PAYLOADS`)
/// at any level.
pub const PAYLOAD_TARGET: &str = "mcp_orchestrator::payload";

/// Whether payloads are logged: a cheap check made before any payload is
/// redacted and serialized.
pub fn payloads_enabled() -> bool {
    tracing::enabled!(target: PAYLOAD_TARGET, tracing::Level::DEBUG)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

impl LogFormat {
    /// `LOG_FORMAT` when set (`json` or `pretty`), else pretty on a terminal.
    pub fn choose(forced: Option<&str>) -> LogFormat {
        match forced.map(str::to_ascii_lowercase).as_deref() {
            Some("json") => LogFormat::Json,
            Some("pretty") | Some("text") => LogFormat::Pretty,
            _ if std::io::stderr().is_terminal() => LogFormat::Pretty,
            _ => LogFormat::Json,
        }
    }
}

/// How the process logs.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// A level (`info`) or an EnvFilter directive (`info,mcp_orchestrator=debug`).
    pub level: String,
    pub format: LogFormat,
    /// Log service payloads (redacted) whatever the level.
    pub log_payloads: bool,
    /// Ship logs to Loki.
    pub loki: Option<loki::LokiConfig>,
}

/// The logging set-up of the process. Its Loki worker needs a Tokio runtime
/// and the HTTP client, so it starts later, with `start_loki`.
pub struct Telemetry {
    loki: Option<(loki::LokiSender, loki::LokiWorker)>,
}

/// Builds the filter: the level or directive, plus the payload target when
/// payloads are enabled.
pub fn filter(level: &str, log_payloads: bool) -> Result<EnvFilter, String> {
    let mut filter = EnvFilter::try_new(level)
        .map_err(|error| format!("invalid LOG_LEVEL `{level}`: {error}"))?;
    // The MCP SDK logs every stateless request's start and end, and a
    // client's bad arguments as a warning; the turn's own lines say what
    // matters. `LOG_LEVEL=info,rmcp=info` brings them back.
    if !level.contains("rmcp") {
        let directive = "rmcp=error"
            .parse()
            .map_err(|error| format!("invalid directive: {error}"))?;
        filter = filter.add_directive(directive);
    }
    if log_payloads {
        let directive = format!("{PAYLOAD_TARGET}=debug")
            .parse()
            .map_err(|error| format!("invalid payload directive: {error}"))?;
        filter = filter.add_directive(directive);
    }
    Ok(filter)
}

/// Installs the global subscriber: pretty lines on stderr, or JSON lines on
/// stderr; and, when Loki is configured, the same JSON lines into the Loki
/// buffer. Lines logged before `start_loki` wait in the (bounded) buffer.
pub fn init(config: TelemetryConfig) -> Result<Telemetry, String> {
    let filter = filter(&config.level, config.log_payloads)?;
    let loki = config.loki.map(loki::channel);
    let pretty = (config.format == LogFormat::Pretty).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
    });
    let json_to_stderr = config.format == LogFormat::Json;
    let sender = loki.as_ref().map(|(sender, _)| sender.clone());
    let json =
        (json_to_stderr || sender.is_some()).then(|| JsonLineLayer::new(json_to_stderr, sender));
    tracing_subscriber::registry()
        .with(filter)
        .with(pretty)
        .with(json)
        .try_init()
        .map_err(|error| error.to_string())?;
    Ok(Telemetry { loki })
}

impl Telemetry {
    /// Starts shipping to Loki (when configured) with the process's HTTP
    /// client. Needs a Tokio runtime.
    pub fn start_loki(&mut self, client: reqwest::Client) -> Option<loki::LokiHandle> {
        let (_, worker) = self.loki.take()?;
        Some(worker.spawn(client))
    }
}
