//! Turn traces for the console: what each turn did, step by step — its
//! classification, every step reached with its time, each service call's
//! request and answer, the session before and after, the reply — redacted
//! exactly as in logs (`telemetry::redact`), kept in a bounded ring (by
//! count and by bytes) and sent to subscribers.
//!
//! Nothing here runs unless the console is on: the server then runs turns
//! with `engine::run_turn_recorded` and hands the recording to
//! `Traces::record`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use serde::Serialize;
use serde_json::Value as Json;
use tokio::sync::broadcast;

use crate::engine::{Recording, TurnError, TurnOutcome, TurnRequest};
use crate::intent::Source;
use crate::project::CompiledProject;
use crate::telemetry::redact::{REDACTED, is_sensitive, redact};

/// Most turns kept.
pub const MAX_TURNS: usize = 500;
/// Most bytes of serialized traces kept; the oldest go first.
pub const MAX_BYTES: usize = 16 << 20;
/// Turns a subscriber may fall behind by before it is told it missed some.
pub const SUBSCRIBER_BACKLOG: usize = 256;
/// Largest trace kept whole; a larger one keeps its steps and calls
/// without their payloads (`truncated`).
pub const MAX_TRACE_BYTES: usize = 1 << 20;

/// One line of the turn list.
#[derive(Debug, Clone, Serialize)]
pub struct TurnSummary {
    /// Unique in the process, increasing.
    pub id: u64,
    pub at: String,
    pub trace_id: String,
    pub channel: String,
    pub user_id: String,
    pub session_id: String,
    /// The request's `tenant` field, when it had one.
    pub tenant: Option<String>,
    /// `[REDACTED]` when the project redacts `text`.
    pub text: String,
    pub intent: Option<String>,
    /// `rules`, `llm` or `tool`.
    pub intent_source: Option<&'static str>,
    pub confidence: Option<f64>,
    pub flow: Option<String>,
    pub route: Option<String>,
    pub decision: Option<&'static str>,
    pub reply_text: Option<String>,
    /// Set when the turn had no reply (its flow failed).
    pub error: Option<Failure>,
    pub duration_ms: f64,
    /// Service calls made (the trace lists them as `calls`).
    pub call_count: usize,
    pub failed_calls: usize,
    /// The project generation that ran it.
    pub generation: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub code: String,
    pub message: String,
}

/// Everything the console shows of one turn.
#[derive(Debug, Serialize)]
pub struct TurnTrace {
    #[serde(flatten)]
    pub summary: TurnSummary,
    /// The request's other fields.
    pub input: Json,
    /// From the turn's start to the end of classification.
    pub classification_ms: f64,
    pub classification: Option<ClassificationTrace>,
    pub steps: Vec<StepTrace>,
    pub calls: Vec<CallTrace>,
    pub session_before: Option<Json>,
    pub session_after: Option<Json>,
    pub reply: Option<ReplyTrace>,
    /// Steps, calls or payloads were left out to keep the trace small.
    pub truncated: bool,
}

#[derive(Debug, Serialize)]
pub struct ClassificationTrace {
    pub intent: String,
    pub source: &'static str,
    pub confidence: f64,
    /// Why: the keyword matched, the model's guess, the LLM's answer.
    pub evidence: String,
    pub entities: BTreeMap<String, String>,
    pub fallback_reason: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct StepTrace {
    pub index: u32,
    pub kind: &'static str,
    pub id: Option<String>,
    /// Relative to the project directory.
    pub file: String,
    pub line: u32,
    pub column: u32,
    pub started_ms: f64,
    /// `None` when the turn failed inside the step.
    pub duration_ms: Option<f64>,
    pub skipped: bool,
}

#[derive(Debug, Serialize)]
pub struct CallTrace {
    /// The step that made it.
    pub step: u32,
    pub service: String,
    pub started_ms: f64,
    pub duration_ms: f64,
    pub attempts: u32,
    pub status: Option<u16>,
    pub mock: bool,
    pub error: Option<Failure>,
    pub request: Option<Json>,
    pub response: Option<Json>,
}

#[derive(Debug, Serialize)]
pub struct ReplyTrace {
    pub reply_text: String,
    pub route: String,
    pub decision: &'static str,
    pub data: Option<Json>,
}

/// What a finished turn leaves for its trace.
pub struct Finished<'a> {
    pub project: &'a CompiledProject,
    pub generation: u64,
    pub request: &'a TurnRequest,
    pub result: &'a Result<TurnOutcome, TurnError>,
    pub recording: Recording,
    pub started: Instant,
}

fn millis(micros: u64) -> f64 {
    (micros as f64 / 10.0).round() / 100.0
}

/// The trace of a finished turn, every payload redacted as in logs.
pub fn build(finished: Finished<'_>) -> TurnTrace {
    let Finished {
        project,
        generation,
        request,
        result,
        recording,
        started,
    } = finished;
    let redacted = |value: &Json| redact(value, &project.redact);
    // Texts are logged under these names: the project may redact them.
    let text_named = |name: &str, text: &str| {
        if is_sensitive(name, &project.redact) {
            REDACTED.to_owned()
        } else {
            text.to_owned()
        }
    };
    let classification = recording.classification.as_ref().map(|classification| {
        let intent = project.intent(classification.intent).name.clone();
        let evidence = match classification.source {
            Source::Rules => crate::intent::explain_rules(project, &request.text),
            Source::Llm => format!(
                "the LLM answered `{intent}` with confidence {:.2}",
                classification.confidence
            ),
            Source::Tool => "an MCP tool call: the flow runs without classification".to_owned(),
        };
        ClassificationTrace {
            intent,
            source: classification.source.as_str(),
            confidence: classification.confidence,
            evidence,
            entities: classification
                .entities
                .iter()
                .map(|(name, value)| (name.clone(), text_named(name, value)))
                .collect(),
            fallback_reason: classification.fallback_reason.clone(),
        }
    });
    let steps = recording
        .steps
        .iter()
        .map(|step| {
            let source = project.steps.get(step.index as usize);
            StepTrace {
                index: step.index,
                kind: step.kind,
                id: step.id.clone(),
                file: source
                    .map(|source| source.file.display().to_string())
                    .unwrap_or_default(),
                line: source.map_or(0, |source| source.line),
                column: source.map_or(0, |source| source.column),
                started_ms: millis(step.started_us),
                duration_ms: step.duration_us.map(millis),
                skipped: step.skipped,
            }
        })
        .collect();
    let calls: Vec<CallTrace> = recording
        .calls
        .iter()
        .map(|call| CallTrace {
            step: call.step,
            service: call.span.service.clone(),
            started_ms: millis(call.started_us),
            duration_ms: call.span.latency_ms,
            attempts: call.span.attempts,
            status: call.span.status,
            mock: call.span.mock,
            error: call.error.as_ref().map(|(code, message)| Failure {
                code: code.clone(),
                message: message.clone(),
            }),
            request: call.request.as_ref().map(redacted),
            response: call.response.as_ref().map(redacted),
        })
        .collect();
    let failed_calls = calls.iter().filter(|call| call.error.is_some()).count();
    let input = redacted(&Json::Object(request.input.clone()));
    let (reply, error) = match result {
        Ok(outcome) => (
            Some(ReplyTrace {
                reply_text: text_named("reply_text", &outcome.reply_text),
                route: outcome.route.clone(),
                decision: outcome.decision.as_str(),
                data: outcome.data.as_ref().map(redacted),
            }),
            None,
        ),
        Err(error) => (
            None,
            Some(Failure {
                code: "template_error".to_owned(),
                message: error.to_string(),
            }),
        ),
    };
    let summary = TurnSummary {
        id: 0,
        at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        trace_id: request.trace_id.clone(),
        channel: request.channel.clone(),
        user_id: request.user_id.clone(),
        session_id: request.session_id.clone(),
        tenant: request.tenant.clone(),
        text: text_named("text", &request.text),
        intent: classification.as_ref().map(|c| c.intent.clone()),
        intent_source: classification.as_ref().map(|c| c.source),
        confidence: classification.as_ref().map(|c| c.confidence),
        flow: recording.flow.clone(),
        route: reply.as_ref().map(|reply| reply.route.clone()),
        decision: reply.as_ref().map(|reply| reply.decision),
        reply_text: reply.as_ref().map(|reply| reply.reply_text.clone()),
        error,
        duration_ms: millis(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX)),
        call_count: calls.len(),
        failed_calls,
        generation,
    };
    TurnTrace {
        summary,
        input,
        classification_ms: millis(recording.classified_us),
        classification,
        steps,
        calls,
        session_before: recording.session_before.as_ref().map(redacted),
        session_after: recording.session_after.as_ref().map(redacted),
        reply,
        truncated: recording.truncated,
    }
}

impl TurnTrace {
    /// Leaves out every payload (what a service was sent and answered, the
    /// input, the session, the reply's data), keeping what ran and when.
    fn without_payloads(&mut self) {
        self.truncated = true;
        self.input = Json::Null;
        self.session_before = None;
        self.session_after = None;
        if let Some(reply) = &mut self.reply {
            reply.data = None;
        }
        for call in &mut self.calls {
            call.request = None;
            call.response = None;
        }
    }
}

/// A kept turn: its summary, and its whole trace as JSON text (what the
/// console asks for, and what the byte cap counts).
struct Kept {
    summary: Arc<TurnSummary>,
    trace: Arc<str>,
}

#[derive(Default)]
struct Ring {
    turns: VecDeque<Kept>,
    bytes: usize,
}

/// The last turns, and their subscribers.
pub struct Traces {
    ring: Mutex<Ring>,
    next_id: AtomicU64,
    events: broadcast::Sender<Arc<TurnSummary>>,
}

impl Default for Traces {
    fn default() -> Traces {
        Traces {
            ring: Mutex::new(Ring::default()),
            next_id: AtomicU64::new(1),
            events: broadcast::Sender::new(SUBSCRIBER_BACKLOG),
        }
    }
}

impl Traces {
    /// Keeps `trace` (dropping the oldest turns past `MAX_TURNS` or
    /// `MAX_BYTES`) and sends its summary to every subscriber.
    pub fn record(&self, mut trace: TurnTrace) {
        trace.summary.id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut text = serde_json::to_string(&trace);
        if text.as_ref().is_ok_and(|text| text.len() > MAX_TRACE_BYTES) {
            trace.without_payloads();
            text = serde_json::to_string(&trace);
        }
        let text: Arc<str> = match text {
            Ok(text) => text.into(),
            Err(error) => {
                tracing::warn!(error = %error, "A turn's trace could not be serialized");
                return;
            }
        };
        let summary = Arc::new(trace.summary);
        {
            let mut ring = match self.ring.lock() {
                Ok(ring) => ring,
                Err(poisoned) => poisoned.into_inner(),
            };
            ring.bytes += text.len();
            ring.turns.push_back(Kept {
                summary: summary.clone(),
                trace: text,
            });
            while ring.turns.len() > MAX_TURNS || (ring.bytes > MAX_BYTES && ring.turns.len() > 1) {
                if let Some(oldest) = ring.turns.pop_front() {
                    ring.bytes = ring.bytes.saturating_sub(oldest.trace.len());
                }
            }
        }
        // No subscriber is not an error.
        let _ = self.events.send(summary);
    }

    /// Every kept turn, oldest first.
    pub fn summaries(&self) -> Vec<Arc<TurnSummary>> {
        self.with_ring(|ring| ring.turns.iter().map(|kept| kept.summary.clone()).collect())
    }

    /// The whole trace of turn `id`, as JSON text, while it is kept.
    pub fn trace(&self, id: u64) -> Option<Arc<str>> {
        self.with_ring(|ring| {
            ring.turns
                .iter()
                .find(|kept| kept.summary.id == id)
                .map(|kept| kept.trace.clone())
        })
    }

    /// The kept traces of one session, oldest first, as JSON values.
    pub fn session(&self, session_id: &str) -> Vec<Json> {
        let texts: Vec<Arc<str>> = self.with_ring(|ring| {
            ring.turns
                .iter()
                .filter(|kept| kept.summary.session_id == session_id)
                .map(|kept| kept.trace.clone())
                .collect()
        });
        texts
            .iter()
            .filter_map(|text| serde_json::from_str(text).ok())
            .collect()
    }

    /// New turns' summaries from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<TurnSummary>> {
        self.events.subscribe()
    }

    fn with_ring<T>(&self, read: impl FnOnce(&Ring) -> T) -> T {
        match self.ring.lock() {
            Ok(ring) => read(&ring),
            Err(poisoned) => read(&poisoned.into_inner()),
        }
    }
}
