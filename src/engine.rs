//! The step interpreter: one conversation turn over a compiled project.
//!
//! A turn classifies the text, reads the session, runs the intent's flow
//! step by step until a reply, and applies the session changes. All IO comes
//! in through `TurnDeps` (classifier, session store, service transport), so
//! the same engine serves HTTP and runs flow tests with stubs. The engine
//! knows nothing of axum and never re-validates configuration: the project
//! it runs was proven consistent by `check`.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::future::{BoxFuture, join_all};
use minijinja::Value;
use serde::Serialize;
use tokio::time::Instant;

use crate::document::Document;
use crate::intent::{Classification, Classifier};
use crate::project::{
    Action, Call, CompiledProject, Decision, Flow, FlowId, Service, Step, StepSource,
};
use crate::services::{
    self, CircuitBreakers, ServiceError, ServiceMode, ServiceSpan, TraceHeaders, Transport,
};
use crate::session::{Session, SessionError, SessionStore, TurnUpdate};
use crate::telemetry;
use crate::template::{ValueTemplate, json_document};

/// Elements a `foreach` may walk in one turn; a longer list is an error.
pub const MAX_FOREACH_ITEMS: usize = 100;

/// One turn's input, already validated by the caller.
#[derive(Debug, Clone)]
pub struct TurnRequest {
    pub text: String,
    pub user_id: String,
    pub channel: String,
    pub session_id: String,
    pub trace_id: String,
    pub tenant: Option<String>,
    /// Every other field of the request.
    pub input: serde_json::Map<String, serde_json::Value>,
    /// Runs this flow, with no classification: an MCP tool call.
    pub direct: Option<FlowId>,
}

/// Everything a turn needs from outside.
pub struct TurnDeps<'a> {
    pub project: &'a CompiledProject,
    /// How each service is reached, indexed by `ServiceId`.
    pub modes: &'a [ServiceMode],
    pub classifier: &'a dyn Classifier,
    pub sessions: &'a dyn SessionStore,
    pub transport: &'a dyn Transport,
    /// Outlives deployments: each service's failures in a row.
    pub breakers: &'a CircuitBreakers,
    /// The turn must have its answer by then.
    pub deadline: Instant,
}

/// The answer of a turn.
#[derive(Debug, Clone, Serialize)]
pub struct TurnOutcome {
    /// `reply`, `error` when a failed call ended the flow, or what the
    /// replying step declared.
    pub decision: Decision,
    pub reply_text: String,
    pub route: String,
    pub intent: String,
    pub intent_confidence: f64,
    /// Where the intent came from: `rules` or `llm`.
    pub intent_source: &'static str,
    pub service_spans: Vec<ServiceSpan>,
    /// The reply's structured `data`, when it has one.
    pub data: Option<serde_json::Value>,
    /// The flow that ran.
    pub flow: String,
    /// Set when the session store could not be used; the turn went on
    /// without it (an empty session when the load failed; its changes lost
    /// when the apply failed).
    pub session_error: Option<SessionError>,
    /// Every step reached, by `Step::index`, in order.
    pub visited: Vec<u32>,
}

/// Why a turn has no answer: a fault of the project's templates at run time.
#[derive(Debug, Clone)]
pub struct TurnError {
    pub message: String,
    /// The step being run.
    pub step: Option<StepSource>,
}

impl std::fmt::Display for TurnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.step {
            Some(step) => write!(
                f,
                "{} (step at {}:{}:{})",
                self.message,
                step.file.display(),
                step.line,
                step.column
            ),
            None => f.write_str(&self.message),
        }
    }
}

/// A reply that ends the flow.
struct ReplyOut {
    text: String,
    route: String,
    decision: Decision,
    data: Option<serde_json::Value>,
}

enum Control {
    Next,
    Reply(ReplyOut),
}

/// The classification of a turn: the classifier's, within the request's
/// deadline; past it, the rules decide at once.
async fn classify(deps: &TurnDeps<'_>, request: &TurnRequest) -> Classification {
    match tokio::time::timeout_at(
        deps.deadline,
        deps.classifier.classify(deps.project, &request.text),
    )
    .await
    {
        Ok(classification) => classification,
        Err(_) => {
            tracing::warn!(
                event_type = "intent_fallback",
                reason = "request deadline",
                "Classification did not finish before the request's deadline; using the rules"
            );
            let mut classification = crate::intent::classify_by_rules(deps.project, &request.text);
            classification.fallback_reason = Some("the request's deadline passed".to_owned());
            classification
        }
    }
}

/// What a tool call stands for: the tool's intent (the flow's first; the
/// tool's name for a flow only agents run), sure, with the entities taken
/// from the arguments of the same names.
fn direct_classification<'p>(
    project: &'p CompiledProject,
    flow: &'p Flow,
    request: &TurnRequest,
) -> (&'p str, Classification) {
    let tool = flow.tool.as_ref();
    let entities = tool
        .map(|tool| {
            tool.entities
                .iter()
                .filter_map(|name| {
                    let value = match request.input.get(name)? {
                        serde_json::Value::String(text) => text.clone(),
                        serde_json::Value::Number(number) => number.to_string(),
                        serde_json::Value::Bool(flag) => flag.to_string(),
                        _ => return None,
                    };
                    Some((name.clone(), value))
                })
                .collect()
        })
        .unwrap_or_default();
    let intent = tool.and_then(|tool| tool.intent);
    let name = match (intent, tool) {
        (Some(intent), _) => project.intent(intent).name.as_str(),
        (None, Some(tool)) => tool.name.as_str(),
        (None, None) => flow.name.as_str(),
    };
    (
        name,
        Classification {
            intent: intent.unwrap_or(project.classifier.fallback),
            confidence: 1.0,
            entities,
            source: crate::intent::Source::Tool,
            fallback_reason: None,
        },
    )
}

/// Runs one turn.
pub async fn run_turn(
    deps: &TurnDeps<'_>,
    request: &TurnRequest,
) -> Result<TurnOutcome, TurnError> {
    run(deps, request, None).await
}

/// Runs one turn and records what it did, step by step, for the console
/// (`trace`); the recording is there whether the turn answered or failed.
pub async fn run_turn_recorded(
    deps: &TurnDeps<'_>,
    request: &TurnRequest,
) -> (Result<TurnOutcome, TurnError>, Recording) {
    let mut recording = Recording::default();
    let result = run(deps, request, Some(&mut recording)).await;
    (result, recording)
}

async fn run(
    deps: &TurnDeps<'_>,
    request: &TurnRequest,
    mut recording: Option<&mut Recording>,
) -> Result<TurnOutcome, TurnError> {
    let project = deps.project;
    let started = Instant::now();
    let (intent_name, classification, flow) = match request.direct {
        Some(flow_id) => {
            let flow = project.flow(flow_id);
            let (name, classification) = direct_classification(project, flow, request);
            (name, classification, flow)
        }
        None => {
            let classification = classify(deps, request).await;
            let intent = project.intent(classification.intent);
            let flow = project.flow_for(classification.intent);
            (intent.name.as_str(), classification, flow)
        }
    };
    tracing::debug!(
        event_type = "intent_classified",
        io = "none",
        intent = %intent_name,
        confidence = classification.confidence,
        source = classification.source.as_str(),
        "Intent classified"
    );
    if let Some(recording) = recording.as_deref_mut() {
        recording.classified_us = micros_since(started);
        recording.classification = Some(classification.clone());
        recording.flow = Some(flow.name.clone());
    }

    let mut session_error = None;
    // The store bounds its own time; the deadline bounds it too, so no
    // store can hold a turn past it.
    let loaded = tokio::time::timeout_at(deps.deadline, deps.sessions.load(&request.session_id))
        .await
        .unwrap_or_else(|_| Err(deadline_passed("load")));
    let session = match loaded {
        Ok(session) => session,
        Err(error) => {
            report_session_error("load", &error);
            session_error = Some(error);
            Session::default()
        }
    };

    let mut context = BTreeMap::new();
    context.insert("text", Value::from(request.text.as_str()));
    context.insert("user_id", Value::from(request.user_id.as_str()));
    context.insert("channel", Value::from(request.channel.as_str()));
    context.insert("session_id", Value::from(request.session_id.as_str()));
    context.insert("trace_id", Value::from(request.trace_id.as_str()));
    context.insert(
        "tenant",
        request
            .tenant
            .as_deref()
            .map_or(Value::from(()), Value::from),
    );
    context.insert(
        "input",
        json_document(serde_json::Value::Object(request.input.clone())),
    );
    context.insert(
        "intent",
        map_value([
            ("name", Value::from(intent_name)),
            ("confidence", Value::from(classification.confidence)),
            ("entities", Value::from(classification.entities.clone())),
        ]),
    );
    context.insert(
        "session",
        json_document(serde_json::Value::Object(session.variables.clone())),
    );
    if let Some(recording) = recording.as_deref_mut() {
        recording.session_before = Some(serde_json::Value::Object(session.variables.clone()));
    }
    let mut run = Run {
        deps,
        flow,
        context: Context::new(
            context
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        ),
        session_variables: session.variables,
        session_set: serde_json::Map::new(),
        spans: Vec::new(),
        trace: trace_headers(&request.trace_id),
        visited: Vec::new(),
        recording,
        started,
    };
    tracing::debug!(event_type = "flow_start", io = "none", flow = %flow.name, "Flow started");
    let control = run.steps(&flow.steps).await;
    if let Some(recording) = run.recording.as_deref_mut() {
        recording.session_after = Some(serde_json::Value::Object(run.session_variables.clone()));
    }
    let reply = match control? {
        Control::Reply(reply) => reply,
        // `check` proves every path replies; this is the last resort.
        Control::Next => {
            return Err(TurnError {
                message: format!("flow `{}` ended without a reply", flow.name),
                step: None,
            });
        }
    };
    let update = TurnUpdate {
        route: reply.route.clone(),
        variables: std::mem::take(&mut run.session_set),
    };
    // A turn whose flow used the whole deadline (a slow service) has no time
    // left for its update: that is not the store's fault.
    let out_of_time = Instant::now() >= deps.deadline;
    let applied = tokio::time::timeout_at(
        deps.deadline,
        deps.sessions.apply(&request.session_id, &update),
    )
    .await
    .unwrap_or_else(|_| {
        Err(if out_of_time {
            SessionError::OutOfTime("apply: the flow used the request's whole deadline".to_owned())
        } else {
            deadline_passed("apply")
        })
    });
    if let Err(error) = applied {
        report_session_error("apply", &error);
        session_error = Some(error);
    }
    Ok(TurnOutcome {
        decision: reply.decision,
        reply_text: reply.text,
        route: reply.route,
        intent: intent_name.to_owned(),
        intent_confidence: classification.confidence,
        intent_source: classification.source.as_str(),
        service_spans: run.spans,
        data: reply.data,
        flow: flow.name.clone(),
        session_error,
        visited: run.visited,
    })
}

/// The error of a session operation cut short by the request's deadline.
fn deadline_passed(operation: &str) -> SessionError {
    SessionError::Unavailable(format!("{operation}: the request's deadline passed"))
}

/// Logs a session store failure (`session_error`, with its code) and counts
/// it by operation (`load` or `apply`); a turn out of time is logged, not
/// counted as the store's failure.
fn report_session_error(operation: &'static str, error: &SessionError) {
    if let SessionError::OutOfTime(_) = error {
        tracing::warn!(
            event_type = "session_error",
            code = error.code(),
            operation,
            error = %error,
            "The turn had no time left for its session"
        );
        return;
    }
    tracing::warn!(
        event_type = "session_error",
        code = error.code(),
        operation,
        error = %error,
        "The session store failed; the turn goes on without it"
    );
    metrics::counter!(
        telemetry::prometheus::SESSION_STORE_ERRORS_TOTAL,
        "operation" => operation,
    )
    .increment(1);
}

/// W3C trace context for outgoing calls: the trace id when it is 32 hex
/// digits, else a hash of it, and a new span id.
pub fn trace_headers(trace_id: &str) -> TraceHeaders {
    let w3c_trace_id = if trace_id.len() == 32
        && trace_id.bytes().all(|b| b.is_ascii_hexdigit())
        && trace_id.bytes().any(|b| b != b'0')
    {
        trace_id.to_ascii_lowercase()
    } else {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(trace_id.as_bytes());
        digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
    };
    // A span id is 16 hex digits and must not be all zeros.
    let span_id = rand::random::<u64>().max(1);
    TraceHeaders {
        trace_id: trace_id.to_owned(),
        traceparent: format!("00-{w3c_trace_id}-{span_id:016x}-01"),
    }
}

/// A template map from fixed keys.
fn map_value<const N: usize>(entries: [(&str, Value); N]) -> Value {
    Value::from(
        entries
            .into_iter()
            .map(|(key, value)| (key.to_owned(), value))
            .collect::<BTreeMap<String, Value>>(),
    )
}

/// The template context of a turn. Templates see it as one map value that
/// shares the map: a change (a call's result, a `set`, a `foreach`
/// element) copies it only while a template value still holds it, which
/// after a render or an evaluation none does.
struct Context {
    values: Arc<BTreeMap<String, Value>>,
}

impl Context {
    fn new(values: BTreeMap<String, Value>) -> Context {
        Context {
            values: Arc::new(values),
        }
    }

    fn value(&self) -> Value {
        Value::from_dyn_object(self.values.clone())
    }

    fn get(&self, name: &str) -> Option<&Value> {
        self.values.get(name)
    }

    fn set(&mut self, name: String, value: Value) -> Option<Value> {
        Arc::make_mut(&mut self.values).insert(name, value)
    }

    fn take(&mut self, name: &str) -> Option<Value> {
        Arc::make_mut(&mut self.values).remove(name)
    }
}

struct Run<'a, 'd> {
    deps: &'a TurnDeps<'d>,
    flow: &'a Flow,
    context: Context,
    /// The session's variables, including those set in this turn.
    session_variables: serde_json::Map<String, serde_json::Value>,
    /// Variables set in this turn, applied to the store at the end.
    session_set: serde_json::Map<String, serde_json::Value>,
    spans: Vec<ServiceSpan>,
    trace: TraceHeaders,
    visited: Vec<u32>,
    /// Present when the console records this turn.
    recording: Option<&'a mut Recording>,
    started: Instant,
}

/// What a turn did, for the console: filled only by `run_turn_recorded`.
/// Payloads are as the services saw them; `trace` redacts them.
#[derive(Debug, Default)]
pub struct Recording {
    pub classification: Option<Classification>,
    /// The flow that ran.
    pub flow: Option<String>,
    /// When classification ended, from the turn's start.
    pub classified_us: u64,
    pub session_before: Option<serde_json::Value>,
    pub session_after: Option<serde_json::Value>,
    /// In the order reached; at most `MAX_RECORDED_STEPS`.
    pub steps: Vec<StepRecord>,
    /// At most `MAX_RECORDED_CALLS`.
    pub calls: Vec<CallRecord>,
    /// Steps or calls past the caps were left out (a long `foreach`).
    pub truncated: bool,
}

/// Most steps one recording keeps.
pub const MAX_RECORDED_STEPS: usize = 1000;
/// Most service calls one recording keeps.
pub const MAX_RECORDED_CALLS: usize = 200;

/// One step reached.
#[derive(Debug)]
pub struct StepRecord {
    /// `Step::index`: where it is (`CompiledProject::steps`).
    pub index: u32,
    pub kind: &'static str,
    pub id: Option<String>,
    /// From the turn's start.
    pub started_us: u64,
    /// `None` when the turn failed inside this step.
    pub duration_us: Option<u64>,
    /// Its `if` was false: its `else` ran instead, if any.
    pub skipped: bool,
}

/// One service call, with what was sent and what came back.
#[derive(Debug)]
pub struct CallRecord {
    /// The step that made it.
    pub step: u32,
    pub started_us: u64,
    pub request: Option<serde_json::Value>,
    pub response: Option<serde_json::Value>,
    pub span: ServiceSpan,
    pub error: Option<(String, String)>,
}

fn micros_since(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// A step's kind, as the flow file says it.
fn step_kind(step: &Step) -> &'static str {
    match &step.action {
        Action::Call(_) => "call",
        Action::Reply(_) => "reply",
        Action::Set(_) => "set",
        Action::Then(_) => "then",
        Action::Switch(_) => "switch",
        Action::Parallel(_) => "parallel",
        Action::Foreach(_) => "foreach",
    }
}

impl<'a, 'd> Run<'a, 'd> {
    /// Notes that `step` is reached; returns its place in the recording.
    fn record_step(&mut self, step: &Step) -> Option<usize> {
        let started = self.started;
        let recording = self.recording.as_deref_mut()?;
        if recording.steps.len() >= MAX_RECORDED_STEPS {
            recording.truncated = true;
            return None;
        }
        recording.steps.push(StepRecord {
            index: step.index,
            kind: step_kind(step),
            id: step.id.clone(),
            started_us: micros_since(started),
            duration_us: None,
            skipped: false,
        });
        Some(recording.steps.len() - 1)
    }

    fn record_step_end(&mut self, slot: Option<usize>, skipped: bool) {
        let started = self.started;
        if let (Some(slot), Some(recording)) = (slot, self.recording.as_deref_mut())
            && let Some(record) = recording.steps.get_mut(slot)
        {
            record.duration_us = Some(micros_since(started).saturating_sub(record.started_us));
            record.skipped = skipped;
        }
    }

    /// Microseconds since the turn began, when the turn is recorded (0
    /// otherwise: an unrecorded turn reads no clock for it).
    fn micros_if_recording(&self) -> u64 {
        if self.recording.is_some() {
            micros_since(self.started)
        } else {
            0
        }
    }

    fn record_step_took(&mut self, slot: Option<usize>, micros: u64) {
        if let (Some(slot), Some(recording)) = (slot, self.recording.as_deref_mut())
            && let Some(record) = recording.steps.get_mut(slot)
        {
            record.duration_us = Some(micros);
        }
    }

    fn record_call(
        &mut self,
        step: u32,
        started_us: u64,
        body: Option<&serde_json::Value>,
        outcome: &services::CallOutcome,
    ) {
        if let Some(recording) = self.recording.as_deref_mut() {
            if recording.calls.len() >= MAX_RECORDED_CALLS {
                recording.truncated = true;
                return;
            }
            recording.calls.push(CallRecord {
                step,
                started_us,
                request: body.cloned(),
                response: outcome.result.as_ref().ok().map(Document::to_json),
                span: outcome.span.clone(),
                error: outcome
                    .result
                    .as_ref()
                    .err()
                    .map(|error| (error.code.as_str().to_owned(), error.message.clone())),
            });
        }
    }

    fn context_value(&self) -> Value {
        self.context.value()
    }

    fn template_error(step: &Step, error: &minijinja::Error) -> TurnError {
        let mut message = error.kind().to_string();
        if let Some(detail) = error.detail() {
            message.push_str(": ");
            message.push_str(detail);
        }
        TurnError {
            message,
            step: Some(step.source.clone()),
        }
    }

    fn evaluate(&self, step: &Step, id: crate::template::ExpressionId) -> Result<Value, TurnError> {
        self.deps
            .project
            .templates
            .evaluate(id, &self.context_value())
            .map_err(|error| Self::template_error(step, &error))
    }

    fn render_value(
        &self,
        step: &Step,
        value: &ValueTemplate,
    ) -> Result<serde_json::Value, TurnError> {
        self.deps
            .project
            .templates
            .render_value(value, &self.context_value())
            .map_err(|error| Self::template_error(step, &error))
    }

    fn steps<'s>(&'s mut self, steps: &'a [Step]) -> BoxFuture<'s, Result<Control, TurnError>> {
        Box::pin(async move {
            for step in steps {
                self.visited.push(step.index);
                let slot = self.record_step(step);
                if let Some(condition) = step.condition
                    && !self.evaluate(step, condition)?.is_true()
                {
                    self.record_step_end(slot, true);
                    if let Control::Reply(reply) = self.steps(&step.otherwise).await? {
                        return Ok(Control::Reply(reply));
                    }
                    continue;
                }
                let control = self.action(step).await?;
                self.record_step_end(slot, false);
                if let Control::Reply(reply) = control {
                    return Ok(Control::Reply(reply));
                }
            }
            Ok(Control::Next)
        })
    }

    async fn action(&mut self, step: &'a Step) -> Result<Control, TurnError> {
        match &step.action {
            Action::Call(call) => {
                let body = match &call.body {
                    Some(body) => Some(self.render_value(step, body)?),
                    None => None,
                };
                let outcome = self.send(step, call, body.as_ref()).await;
                match outcome {
                    Ok(value) => {
                        if let Some(id) = &step.id {
                            self.context.set(id.clone(), json_document(value));
                        }
                        Ok(Control::Next)
                    }
                    Err(error) => self.failed(step, call, &error).await.map(Control::Reply),
                }
            }
            Action::Reply(reply) => {
                let context = self.context_value();
                let templates = &self.deps.project.templates;
                let text = templates
                    .render(reply.text, &context)
                    .map_err(|error| Self::template_error(step, &error))?;
                let data = match &reply.data {
                    Some(data) => Some(self.render_value(step, data)?),
                    None => None,
                };
                Ok(Control::Reply(ReplyOut {
                    text: text.trim().to_owned(),
                    route: reply.route.clone(),
                    decision: reply.decision,
                    data,
                }))
            }
            Action::Set(values) => {
                for (name, value) in values {
                    let value = self.render_value(step, value)?;
                    self.session_variables.insert(name.clone(), value.clone());
                    self.session_set.insert(name.clone(), value);
                }
                self.context.set(
                    "session".to_owned(),
                    json_document(serde_json::Value::Object(self.session_variables.clone())),
                );
                Ok(Control::Next)
            }
            Action::Then(steps) => self.steps(steps).await,
            Action::Switch(switch) => {
                let value = self.evaluate(step, switch.value)?;
                let key = match value.as_str() {
                    Some(text) => text.to_owned(),
                    None => value.to_string(),
                };
                let steps = switch
                    .cases
                    .iter()
                    .find(|(case, _)| *case == key)
                    .map_or(&switch.default, |(_, steps)| steps);
                self.steps(steps).await
            }
            Action::Parallel(branches) => self.parallel(branches).await,
            Action::Foreach(foreach) => {
                let list = self.evaluate(step, foreach.list)?;
                let items: Vec<Value> = match list.try_iter() {
                    Ok(items) => items.take(MAX_FOREACH_ITEMS + 1).collect(),
                    Err(_) if list.is_undefined() || list.is_none() => Vec::new(),
                    Err(error) => return Err(Self::template_error(step, &error)),
                };
                if items.len() > MAX_FOREACH_ITEMS {
                    return Err(TurnError {
                        message: format!("`foreach` walks at most {MAX_FOREACH_ITEMS} elements"),
                        step: Some(step.source.clone()),
                    });
                }
                let mut collected = Vec::with_capacity(items.len());
                let saved = self.context.get(&foreach.binding).cloned();
                for item in items {
                    self.context.set(foreach.binding.clone(), item);
                    let control = self.steps(&foreach.steps).await?;
                    let mut results = serde_json::Map::new();
                    for inner in &foreach.steps {
                        if let Some(id) = &inner.id
                            && let Some(value) = self.context.take(id)
                        {
                            let value = crate::template::to_json(&value)
                                .map_err(|error| Self::template_error(inner, &error))?;
                            results.insert(id.clone(), value);
                        }
                    }
                    collected.push(serde_json::Value::Object(results));
                    if let Control::Reply(reply) = control {
                        return Ok(Control::Reply(reply));
                    }
                }
                match saved {
                    Some(saved) => self.context.set(foreach.binding.clone(), saved),
                    None => self.context.take(&foreach.binding),
                };
                if let Some(id) = &step.id {
                    self.context.set(
                        id.clone(),
                        json_document(serde_json::Value::Array(collected)),
                    );
                }
                Ok(Control::Next)
            }
        }
    }

    async fn send(
        &mut self,
        step: &Step,
        call: &Call,
        body: Option<&serde_json::Value>,
    ) -> Result<Document, ServiceError> {
        let project = self.deps.project;
        let service = project.service(call.service);
        let mode = &self.deps.modes[call.service.0 as usize];
        log_call(project, service, body);
        let started_us = self.micros_if_recording();
        let outcome = services::call(
            self.deps.transport,
            self.deps.breakers,
            service,
            mode,
            body,
            &self.trace,
            self.deps.deadline,
        )
        .await;
        log_outcome(project, &outcome.span, outcome.result.as_ref());
        self.record_call(step.index, started_us, body, &outcome);
        self.spans.push(outcome.span);
        outcome.result
    }

    async fn parallel(&mut self, branches: &'a [Step]) -> Result<Control, TurnError> {
        let mut planned: Vec<(&'a Step, &'a Call, Option<serde_json::Value>)> = Vec::new();
        let mut slots = Vec::new();
        for branch in branches {
            self.visited.push(branch.index);
            let slot = self.record_step(branch);
            if let Some(condition) = branch.condition
                && !self.evaluate(branch, condition)?.is_true()
            {
                self.record_step_end(slot, true);
                continue;
            }
            if let Action::Call(call) = &branch.action {
                let body = match &call.body {
                    Some(body) => Some(self.render_value(branch, body)?),
                    None => None,
                };
                planned.push((branch, call, body));
                slots.push(slot);
            } else {
                self.record_step_end(slot, false);
            }
        }
        let project = self.deps.project;
        for (_, call, body) in &planned {
            log_call(project, project.service(call.service), body.as_ref());
        }
        let calls = planned.iter().map(|(_, call, body)| {
            services::call(
                self.deps.transport,
                self.deps.breakers,
                project.service(call.service),
                &self.deps.modes[call.service.0 as usize],
                body.as_ref(),
                &self.trace,
                self.deps.deadline,
            )
        });
        let started_us = self.micros_if_recording();
        let outcomes = join_all(calls).await;
        let mut first_failure = None;
        for (((branch, call, body), outcome), slot) in planned.iter().zip(outcomes).zip(slots) {
            log_outcome(project, &outcome.span, outcome.result.as_ref());
            self.record_call(branch.index, started_us, body.as_ref(), &outcome);
            // Each branch took as long as its call.
            self.record_step_took(slot, (outcome.span.latency_ms * 1000.0) as u64);
            self.spans.push(outcome.span);
            match outcome.result {
                Ok(value) => {
                    if let Some(id) = &branch.id {
                        self.context.set(id.clone(), json_document(value));
                    }
                }
                Err(error) => {
                    if first_failure.is_none() {
                        first_failure = Some((*branch, *call, error));
                    }
                }
            }
        }
        match first_failure {
            Some((branch, call, error)) => {
                self.failed(branch, call, &error).await.map(Control::Reply)
            }
            None => Ok(Control::Next),
        }
    }

    /// A call failed: its `on_error`, else the flow's, else the default apology.
    async fn failed(
        &mut self,
        step: &'a Step,
        call: &'a Call,
        error: &ServiceError,
    ) -> Result<ReplyOut, TurnError> {
        let service = self.deps.project.service(call.service);
        self.context.set(
            "error".to_owned(),
            map_value([
                ("code", Value::from(error.code.as_str())),
                ("message", Value::from(error.message.as_str())),
                ("service", Value::from(service.name.as_str())),
                ("status", error.status.map_or(Value::from(()), Value::from)),
            ]),
        );
        let handler = call.on_error.as_deref().or(self.flow.on_error.as_deref());
        if let Some(handler) = handler
            && let Control::Reply(reply) = self.steps(handler).await?
        {
            return Ok(reply);
        }
        let project = self.deps.project;
        let text = project
            .templates
            .render(project.defaults.error_reply, &self.context_value())
            .map_err(|error| Self::template_error(step, &error))?;
        Ok(ReplyOut {
            text: text.trim().to_owned(),
            route: project
                .defaults
                .error_route
                .clone()
                .unwrap_or_else(|| self.flow.name.clone()),
            decision: Decision::Error,
            data: None,
        })
    }
}

/// The `service_call` event; with the request body (redacted) when
/// payloads are logged.
fn log_call(project: &CompiledProject, service: &Service, body: Option<&serde_json::Value>) {
    if telemetry::payloads_enabled() {
        let payload = body.map_or_else(
            || "null".to_owned(),
            |body| telemetry::redact::redacted_text(body, &project.redact),
        );
        tracing::debug!(
            target: telemetry::PAYLOAD_TARGET,
            event_type = "service_call",
            service_type = %service.name,
            io = "out",
            payload = %payload,
            "Calling service"
        );
    } else {
        tracing::debug!(event_type = "service_call", service_type = %service.name, io = "out", "Calling service");
    }
}

/// The `service_return` event (with the answer, redacted, when payloads are
/// logged) or the `service_error` event.
fn log_outcome(
    project: &CompiledProject,
    span: &ServiceSpan,
    result: Result<&Document, &ServiceError>,
) {
    match result {
        Ok(answer) if telemetry::payloads_enabled() => tracing::debug!(
            target: telemetry::PAYLOAD_TARGET,
            event_type = "service_return",
            service_type = %span.service,
            io = "in",
            status = span.status,
            latency_ms = span.latency_ms,
            attempts = span.attempts,
            mock = span.mock,
            payload = %telemetry::redact::redacted_text(&answer.to_json(), &project.redact),
            "Service answered"
        ),
        Ok(_) => tracing::debug!(
            event_type = "service_return",
            service_type = %span.service,
            io = "in",
            status = span.status,
            latency_ms = span.latency_ms,
            attempts = span.attempts,
            mock = span.mock,
            "Service answered"
        ),
        Err(error) => tracing::warn!(
            event_type = "service_error",
            service_type = %span.service,
            io = "in",
            status = span.status,
            latency_ms = span.latency_ms,
            attempts = span.attempts,
            code = error.code.as_str(),
            error = %error.message,
            "Service call failed"
        ),
    }
}
