//! Metrics in Prometheus text: the recorder behind the `metrics` facade,
//! the names of the metrics, and the upkeep that keeps histograms bounded.
//!
//! The `metrics` facade has one recorder per process; this module installs
//! it once (`install`) and renders it for `GET /metrics` (`render`). Code
//! that records a metric uses the facade with a name from here, except the
//! Loki shipping, which names, describes and registers its own metrics
//! (`loki::describe_metrics`, called by `install`).

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use super::loki;

/// Requests answered, by `endpoint`, `route`, `intent` and `status`.
pub const REQUESTS_TOTAL: &str = "mcp_requests_total";
/// Requests answered with a problem+json error, by `endpoint` and `code`.
pub const REQUEST_ERRORS_TOTAL: &str = "mcp_request_errors_total";
/// Time to answer a request, by `endpoint`.
pub const REQUEST_DURATION_SECONDS: &str = "mcp_request_duration_seconds";
/// Service calls, by `service` and `outcome` (`ok` or the error code).
pub const SERVICE_CALLS_TOTAL: &str = "mcp_service_calls_total";
/// Time of a service call, retries included, by `service`.
pub const SERVICE_CALL_DURATION_SECONDS: &str = "mcp_service_call_duration_seconds";
/// LLM classifications, by `outcome` (`ok`, `error`, `timeout`).
pub const LLM_CLASSIFICATIONS_TOTAL: &str = "mcp_llm_classifications_total";
/// Time of an LLM classification, the fallback excluded.
pub const LLM_CLASSIFICATION_DURATION_SECONDS: &str = "mcp_llm_classification_duration_seconds";
/// Reloads, by `outcome` (`success`, `unchanged`, `error`); recorded by `reload`.
pub const RELOADS_TOTAL: &str = "mcp_reloads_total";
/// The live project's generation.
pub const PROJECT_GENERATION: &str = "mcp_project_generation";
/// Time of a reload.
pub const RELOAD_DURATION_SECONDS: &str = "mcp_reload_duration_seconds";
/// Sessions held by the session store (the memory store only: Redis does
/// not count without a scan).
pub const SESSIONS: &str = "mcp_sessions";
/// Session store operations of a turn that failed (the turn went on
/// without its session), by `operation` (`load`, `apply`).
pub const SESSION_STORE_ERRORS_TOTAL: &str = "mcp_session_store_errors_total";
/// Always 1, with the `version` label.
pub const BUILD_INFO: &str = "mcp_build_info";
/// Each service's circuit: 0 closed, 1 open, 2 half-open.
pub const CIRCUIT_BREAKER_STATE: &str = "mcp_circuit_breaker_state";
/// Channel deliveries, by channel and outcome (`accepted`, `duplicate`,
/// `ignored`, `unauthorized`, `invalid`, `rate_limited`, `overloaded`,
/// `challenge`).
pub const CHANNEL_DELIVERIES_TOTAL: &str = "mcp_channel_deliveries_total";
/// Replies sent through a platform API or a webhook's `reply.call`, by
/// channel and outcome (`ok` or the error code).
pub const CHANNEL_REPLIES_TOTAL: &str = "mcp_channel_replies_total";
/// Messages in the background queue of each channel.
pub const CHANNEL_QUEUE_DEPTH: &str = "mcp_channel_queue_depth";
/// MCP tool calls that ran their flow, by tool, caller, route and decision.
pub const TOOL_CALLS_TOTAL: &str = "mcp_tool_calls_total";

/// Every metric name, for documentation and tests.
pub const ALL: &[&str] = &[
    REQUESTS_TOTAL,
    REQUEST_ERRORS_TOTAL,
    REQUEST_DURATION_SECONDS,
    SERVICE_CALLS_TOTAL,
    SERVICE_CALL_DURATION_SECONDS,
    LLM_CLASSIFICATIONS_TOTAL,
    LLM_CLASSIFICATION_DURATION_SECONDS,
    RELOADS_TOTAL,
    PROJECT_GENERATION,
    RELOAD_DURATION_SECONDS,
    loki::LINES_SENT_TOTAL,
    loki::LINES_DROPPED_TOTAL,
    loki::BUFFER_LINES,
    loki::PUSHES_TOTAL,
    SESSIONS,
    SESSION_STORE_ERRORS_TOTAL,
    BUILD_INFO,
    CIRCUIT_BREAKER_STATE,
    CHANNEL_DELIVERIES_TOTAL,
    CHANNEL_REPLIES_TOTAL,
    CHANNEL_QUEUE_DEPTH,
    TOOL_CALLS_TOTAL,
];

/// Histogram buckets, in seconds: from 1 ms to 10 s.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How often histogram samples are folded into their buckets when nobody
/// scrapes; samples are held in memory until then.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder as the process's `metrics` recorder
/// (once; later calls return the same handle) and registers the metrics
/// that have no per-request labels, so they show from the start.
/// `labels`, and `tenant` when the process serves several tenants.
pub fn with_tenant(tenant: Option<&str>, mut labels: Vec<metrics::Label>) -> Vec<metrics::Label> {
    if let Some(tenant) = tenant {
        labels.push(metrics::Label::new("tenant", tenant.to_owned()));
    }
    labels
}

pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = || {
            let builder = PrometheusBuilder::new();
            match builder.set_buckets(DURATION_BUCKETS) {
                Ok(builder) => builder,
                Err(_) => PrometheusBuilder::new(),
            }
        };
        let handle = match builder().install_recorder() {
            Ok(handle) => handle,
            // Another recorder is installed: this one renders what is
            // recorded through it, which is nothing. Not reachable from the
            // binary, which installs this one first.
            Err(_) => builder().build_recorder().handle(),
        };
        describe();
        handle
    })
}

/// Metric handles by the values of their labels, so a request or a service
/// call counts itself through a handle instead of building its labels and
/// looking them up in the recorder's registry (owned strings in a `Key`,
/// hashed, a lock, a map) every time. Handles are kept only once the
/// recorder is installed (one taken before would record nowhere for good),
/// and for at most `MAX_CACHED_LABEL_SETS` label sets; past that, `register`
/// runs each time.
pub struct Handles<K, V> {
    map: std::sync::RwLock<std::collections::HashMap<K, V>>,
}

/// Label sets `Handles` keeps: routes × intents × statuses × callers of a
/// project are far fewer.
pub const MAX_CACHED_LABEL_SETS: usize = 4096;

impl<K: std::hash::Hash + Eq, V: Clone> Handles<K, V> {
    pub fn new() -> Self {
        Handles {
            map: std::sync::RwLock::new(std::collections::HashMap::new()),
        }
    }

    /// The handles for `key`, registered by `register` the first time.
    pub fn get(&self, key: K, register: impl FnOnce(&K) -> V) -> V {
        let read = self
            .map
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(handles) = read.get(&key) {
            return handles.clone();
        }
        drop(read);
        let handles = register(&key);
        if installed() {
            let mut map = self
                .map
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if map.len() < MAX_CACHED_LABEL_SETS {
                map.insert(key, handles.clone());
            }
        }
        handles
    }
}

impl<K: std::hash::Hash + Eq, V: Clone> Default for Handles<K, V> {
    fn default() -> Self {
        Handles::new()
    }
}

/// Whether `install` ran: handles taken before record nowhere.
pub fn installed() -> bool {
    HANDLE.get().is_some()
}

/// The current metrics in Prometheus text format.
pub fn render() -> String {
    install().render()
}

/// Folds histogram samples into buckets every `UPKEEP_INTERVAL`, so their
/// memory stays bounded without scrapes. Needs a Tokio runtime.
pub fn spawn_upkeep() -> tokio::task::JoinHandle<()> {
    let handle = install();
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(UPKEEP_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            handle.run_upkeep();
        }
    })
}

/// Sets the generation gauge (start-up sets 1; reloads set theirs).
pub fn record_generation(generation: u64) {
    metrics::gauge!(PROJECT_GENERATION).set(generation as f64);
}

fn describe() {
    use metrics::Unit;
    metrics::describe_counter!(
        REQUESTS_TOTAL,
        "Requests answered, by endpoint, caller key, flow route, intent and HTTP status"
    );
    metrics::describe_counter!(
        REQUEST_ERRORS_TOTAL,
        "Requests answered with a problem+json error, by endpoint and code"
    );
    metrics::describe_histogram!(
        REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Time to answer a request, by endpoint"
    );
    metrics::describe_counter!(
        SERVICE_CALLS_TOTAL,
        "Service calls, by service and outcome (ok or the error code)"
    );
    metrics::describe_histogram!(
        SERVICE_CALL_DURATION_SECONDS,
        Unit::Seconds,
        "Time of a service call, retries included, by service"
    );
    metrics::describe_counter!(
        LLM_CLASSIFICATIONS_TOTAL,
        "LLM intent classifications, by outcome (ok, error, timeout)"
    );
    metrics::describe_histogram!(
        LLM_CLASSIFICATION_DURATION_SECONDS,
        Unit::Seconds,
        "Time of an LLM intent classification"
    );
    metrics::describe_counter!(RELOADS_TOTAL, "Project reloads, by outcome");
    metrics::describe_gauge!(PROJECT_GENERATION, "Generation of the live project");
    metrics::describe_histogram!(
        RELOAD_DURATION_SECONDS,
        Unit::Seconds,
        "Time of a project reload"
    );
    metrics::describe_gauge!(SESSIONS, "Sessions held by the session store");
    metrics::describe_counter!(
        SESSION_STORE_ERRORS_TOTAL,
        "Session store operations of a turn that failed, by operation (load, apply)"
    );
    metrics::describe_gauge!(BUILD_INFO, "Always 1; the version is a label");
    metrics::describe_gauge!(
        CIRCUIT_BREAKER_STATE,
        "Circuit breaker of each service: 0 closed, 1 open, 2 half-open"
    );
    metrics::describe_counter!(
        CHANNEL_DELIVERIES_TOTAL,
        "Channel deliveries, by channel and outcome"
    );
    metrics::describe_counter!(
        TOOL_CALLS_TOTAL,
        "MCP tool calls that ran their flow, by tool, caller, route and decision"
    );
    metrics::describe_counter!(
        CHANNEL_REPLIES_TOTAL,
        "Replies sent through a platform API, by channel and outcome (ok or the error code)"
    );
    metrics::describe_gauge!(
        CHANNEL_QUEUE_DEPTH,
        "Messages of each channel acknowledged and not yet answered"
    );

    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    for outcome in ["success", "unchanged", "error"] {
        metrics::counter!(RELOADS_TOTAL, "outcome" => outcome).increment(0);
    }
    let _ = metrics::histogram!(RELOAD_DURATION_SECONDS);
    let _ = metrics::gauge!(PROJECT_GENERATION);
    for outcome in ["ok", "error", "timeout"] {
        metrics::counter!(LLM_CLASSIFICATIONS_TOTAL, "outcome" => outcome).increment(0);
    }
    let _ = metrics::histogram!(LLM_CLASSIFICATION_DURATION_SECONDS);
    loki::describe_metrics();
    metrics::gauge!(SESSIONS).set(0.0);
    for operation in ["load", "apply"] {
        metrics::counter!(SESSION_STORE_ERRORS_TOTAL, "operation" => operation).increment(0);
    }
}
