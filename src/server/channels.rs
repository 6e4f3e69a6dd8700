//! `POST /channels/{name}` and `GET /channels/{name}`: messaging platforms'
//! webhooks. A delivery is verified (401 and no turn when it fails), read,
//! and each user message in it becomes a turn once: the kinds that reply
//! through an API are acknowledged at once and run on the background queue
//! (503 when it is full, so the platform retries later), the others answer
//! in the response. A delivery seen within a day is acknowledged and not
//! run again.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tracing::Instrument;

use super::{ApiError, AppState, Deployment, MAX_REQUEST_BYTES, run_logged_turn};
use crate::admission;
use crate::channels::{self, ChannelCounters, Delivery, Inbound, Message, Reply};
use crate::engine::{TurnRequest, trace_headers};
use crate::project::{Channel, ChannelKind};
use crate::services::{self, ServiceMode};
use crate::telemetry::prometheus;

/// Most time a reply's delivery may take, its retries included.
const MAX_DELIVERY_TIME: Duration = Duration::from_secs(120);

/// `GET /channels/{name}`: WhatsApp's subscription handshake.
pub(super) async fn handshake(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    request: Request,
) -> Response {
    let deployment = state.deployment.load_full();
    let channel = match live_channel(&deployment, &name) {
        Ok(channel) => channel,
        Err(error) => return error.into_response(),
    };
    tracing::Span::current().record("channel", name.as_str());
    match channels::handshake(channel, request.uri().query()) {
        None => ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("a `{}` channel takes POST only", channel.kind.as_str()),
        )
        .into_response(),
        Some(Ok(challenge)) => {
            count_delivery(&name, "challenge");
            tracing::info!(event_type = "channel_handshake", channel = %name, "Webhook subscription confirmed");
            (
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                challenge,
            )
                .into_response()
        }
        Some(Err(rejection)) => {
            let counters = state.channels.counters(&name);
            ChannelCounters::add(&counters.verification_failures);
            unauthorized(&name, channel, rejection.0)
        }
    }
}

/// `POST /channels/{name}`: a delivery.
pub(super) async fn deliver(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    request: Request,
) -> Response {
    match run_delivery(&state, &name, request).await {
        Ok(response) | Err(response) => response,
    }
}

async fn run_delivery(
    state: &Arc<AppState>,
    name: &str,
    request: Request,
) -> Result<Response, Response> {
    let started = Instant::now();
    let deployment = state.deployment.load_full();
    let channel = live_channel(&deployment, name).map_err(IntoResponse::into_response)?;
    let span = tracing::Span::current();
    span.record("channel", name);
    let counters = state.channels.counters(name);
    ChannelCounters::add(&counters.received);
    let (parts, body) = request.into_parts();
    let deadline = tokio::time::Instant::now() + state.settings.request_timeout;
    let body = match tokio::time::timeout_at(
        deadline,
        axum::body::to_bytes(body, MAX_REQUEST_BYTES),
    )
    .await
    {
        Err(_) => return Err(ApiError::request_timeout().into_response()),
        Ok(Err(_)) => {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the body is larger than {MAX_REQUEST_BYTES} bytes, or could not be read"),
            )
            .into_response());
        }
        Ok(Ok(body)) => body,
    };
    let delivery = Delivery {
        headers: &parts.headers,
        query: parts.uri.query(),
        body: &body,
        now: SystemTime::now(),
    };
    if let Err(rejection) = channels::verify(channel, &delivery) {
        ChannelCounters::add(&counters.verification_failures);
        return Err(unauthorized(name, channel, rejection.0));
    }
    let messages = match channels::read(&deployment.project, channel, &body) {
        // A platform repeats a refused delivery for hours or days (Meta for
        // a week; Slack may turn the subscription off): what a verified
        // platform sends and cannot be read is acknowledged, logged and
        // counted. A webhook's sender is told (400).
        Err(bad) if !matches!(channel.kind, ChannelKind::Webhook(_)) => {
            ChannelCounters::add(&counters.ignored);
            count_delivery(name, "invalid");
            tracing::warn!(event_type = "channel_delivery", channel = %name, kind = channel.kind.as_str(), reason = %bad.0, "Acknowledged and not run: the payload cannot be read");
            return Ok(acknowledgement(channel));
        }
        Err(bad) => {
            count_delivery(name, "invalid");
            tracing::warn!(event_type = "channel_delivery", channel = %name, kind = channel.kind.as_str(), reason = %bad.0, "Delivery refused: the payload cannot be read");
            return Err(
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", bad.0).into_response(),
            );
        }
        Ok(Inbound::Challenge { content_type, body }) => {
            count_delivery(name, "challenge");
            tracing::info!(event_type = "channel_handshake", channel = %name, "Webhook endpoint confirmed");
            return Ok(([(header::CONTENT_TYPE, content_type)], body).into_response());
        }
        Ok(Inbound::Ignored(reason)) => {
            ChannelCounters::add(&counters.ignored);
            count_delivery(name, "ignored");
            tracing::debug!(event_type = "channel_delivery", channel = %name, reason, "Acknowledged: not a user's text message");
            return Ok(acknowledgement(channel));
        }
        Ok(Inbound::Messages(messages)) => messages,
    };
    let admission = state.admission.for_limits(&deployment.project.limits);
    let mut answer = None;
    for message in messages {
        let request = message.turn_request(
            name,
            super::trace_id_from_traceparent(&parts.headers).unwrap_or_else(super::new_trace_id),
        );
        if channel.replies_later() {
            // The place is taken before the delivery is recorded as seen: a
            // full queue refuses it (503) and the platform's next attempt runs.
            let Some(slot) = state.channels.reserve() else {
                ChannelCounters::add(&counters.overloaded);
                count_delivery(name, "overloaded");
                return Err(queue_full().into_response());
            };
            if !first_delivery(state, name, &message, &counters).await
                || !within_rate(&admission, name, &request, &counters)
            {
                continue;
            }
            count_delivery(name, "accepted");
            let job = reply_later(
                state.clone(),
                deployment.clone(),
                name.to_owned(),
                message,
                request,
                counters.clone(),
            );
            state.channels.spawn(slot, counters.clone(), job);
        } else {
            let _in_flight = admission.enter().map_err(|refusal| {
                ChannelCounters::add(&counters.overloaded);
                count_delivery(name, "overloaded");
                ApiError::refused(refusal).into_response()
            })?;
            if !first_delivery(state, name, &message, &counters).await {
                continue;
            }
            // Until the answer is built, the delivery is forgotten if this
            // ends any other way (the flow fails, the client goes away), so
            // the sender's next attempt runs.
            let mut seen = ForgetUnlessAnswered::new(state, name, &message);
            if !within_rate(&admission, name, &request, &counters) {
                seen.answered();
                continue;
            }
            count_delivery(name, "accepted");
            span.record("trace_id", request.trace_id.as_str());
            ChannelCounters::add(&counters.turns);
            let outcome = run_logged_turn(state, &deployment, &request, deadline, started)
                .await
                .map_err(|error| {
                    ChannelCounters::add(&counters.turn_failures);
                    error.into_response()
                })?;
            let response = reply_now(&deployment, channel, &message, &request, &outcome);
            if response.status().is_success() {
                ChannelCounters::add(&counters.replies);
                seen.answered();
            } else {
                ChannelCounters::add(&counters.turn_failures);
            }
            answer = Some(response);
        }
    }
    Ok(answer.unwrap_or_else(|| acknowledgement(channel)))
}

/// Whether the message is within its user's rate. A platform repeats
/// whatever it did not see acknowledged, and Telegram holds back a bot's
/// later updates until then: a message over the rate is dropped (logged
/// and counted), not refused.
fn within_rate(
    admission: &admission::Admission,
    name: &str,
    request: &TurnRequest,
    counters: &ChannelCounters,
) -> bool {
    if admission.check_user(&request.user_id).is_ok() {
        return true;
    }
    ChannelCounters::add(&counters.rate_limited);
    count_delivery(name, "rate_limited");
    tracing::warn!(event_type = "channel_delivery", channel = %name, user_id = %request.user_id, code = "rate_limited", "Message dropped: its user is over the rate limit");
    false
}

/// 503 when the background queue is full.
fn queue_full() -> ApiError {
    ApiError {
        retry_after: Some(super::OVERLOADED_RETRY_AFTER_SECONDS),
        ..ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "the channels' queue of messages to answer is full; deliver again shortly",
        )
    }
}

/// A delivery recorded as seen, forgotten when dropped before `answered`.
struct ForgetUnlessAnswered {
    pending: Option<(Arc<AppState>, String, String)>,
}

impl ForgetUnlessAnswered {
    fn new(state: &Arc<AppState>, name: &str, message: &Message) -> ForgetUnlessAnswered {
        ForgetUnlessAnswered {
            pending: message
                .id
                .as_ref()
                .map(|id| (state.clone(), name.to_owned(), id.clone())),
        }
    }

    fn answered(&mut self) {
        self.pending = None;
    }
}

impl Drop for ForgetUnlessAnswered {
    fn drop(&mut self) {
        let Some((state, name, id)) = self.pending.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                state
                    .channels
                    .forget_delivery(state.sessions.as_ref(), &name, &id)
                    .await;
            });
        }
    }
}

/// The channel of that name, when the live project declares it and its
/// secrets are set; 404 otherwise.
fn live_channel<'d>(deployment: &'d Deployment, name: &str) -> Result<&'d Channel, ApiError> {
    match deployment.project.channel(name) {
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no channel `{name}` is declared"),
        )),
        // Answered like an undeclared one: a scan learns nothing of which
        // secrets are unset (`/health` and the start-up log say it).
        Some(channel) if !channel.enabled() => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no channel `{name}` is declared"),
        )),
        Some(channel) => Ok(channel),
    }
}

fn unauthorized(name: &str, channel: &Channel, reason: &str) -> Response {
    count_delivery(name, "unauthorized");
    tracing::warn!(
        event_type = "channel_delivery",
        channel = %name,
        kind = channel.kind.as_str(),
        reason,
        code = "unauthorized",
        "Delivery refused: it fails the platform's verification"
    );
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "the delivery fails the platform's verification",
    )
    .into_response()
}

fn count_delivery(name: &str, outcome: &'static str) {
    metrics::counter!(
        prometheus::CHANNEL_DELIVERIES_TOTAL,
        "channel" => name.to_owned(),
        "outcome" => outcome,
    )
    .increment(1);
}

/// Whether the message is new; a repeat is counted and logged.
async fn first_delivery(
    state: &AppState,
    name: &str,
    message: &Message,
    counters: &ChannelCounters,
) -> bool {
    let Some(id) = &message.id else {
        return true;
    };
    if state
        .channels
        .first_delivery(state.sessions.as_ref(), name, id)
        .await
    {
        return true;
    }
    ChannelCounters::add(&counters.duplicates);
    count_delivery(name, "duplicate");
    tracing::info!(event_type = "channel_delivery", channel = %name, delivery_id = %id, "Acknowledged: a delivery already seen");
    false
}

/// The answer to a delivery that runs nothing now.
fn acknowledgement(channel: &Channel) -> Response {
    match &channel.kind {
        ChannelKind::Twilio(_) => twiml_response(channels::twilio::twiml(None)),
        ChannelKind::Webhook(_) => axum::Json(json!({})).into_response(),
        _ => StatusCode::OK.into_response(),
    }
}

fn twiml_response(document: String) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(channels::twilio::TWIML_CONTENT_TYPE),
        )],
        document,
    )
        .into_response()
}

/// The answer carrying the reply, for the kinds that reply in it.
fn reply_now(
    deployment: &Deployment,
    channel: &Channel,
    message: &Message,
    request: &TurnRequest,
    outcome: &crate::engine::TurnOutcome,
) -> Response {
    match channels::reply(&deployment.project, channel, message, request, outcome) {
        Ok(Reply::TwiML(document)) => twiml_response(document),
        Ok(Reply::Json(value)) => axum::Json(value).into_response(),
        Ok(Reply::Api(_) | Reply::Service { .. }) => acknowledgement(channel),
        Err(error) => {
            tracing::error!(event_type = "template_error", channel = %channel.name, error = %error, "The channel's reply template failed");
            ApiError {
                trace_id: Some(request.trace_id.clone()),
                ..ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "template_error",
                    "the channel could not build its answer; the trace id identifies it in the logs",
                )
            }
            .into_response()
        }
    }
}

/// A background turn: runs the flow, then sends the reply through the
/// platform's API (or the webhook's `reply.call`) with the retries of a
/// service call.
async fn reply_later(
    state: Arc<AppState>,
    deployment: Arc<Deployment>,
    name: String,
    message: Message,
    request: TurnRequest,
    counters: Arc<ChannelCounters>,
) {
    let span = tracing::info_span!(
        "channel_turn",
        channel = %name,
        tenant = state.tenant.as_deref(),
        trace_id = tracing::field::Empty,
        session_id = tracing::field::Empty,
        user_id = tracing::field::Empty,
        session_error = tracing::field::Empty,
    );
    async move {
        let started = Instant::now();
        let Some(channel) = deployment.project.channel(&name) else {
            return;
        };
        ChannelCounters::add(&counters.turns);
        let deadline = tokio::time::Instant::now() + state.settings.request_timeout;
        let Ok(outcome) = run_logged_turn(&state, &deployment, &request, deadline, started).await
        else {
            // Logged as the flow's failure; there is no reply to send.
            ChannelCounters::add(&counters.turn_failures);
            return;
        };
        if outcome.reply_text.trim().is_empty() {
            tracing::info!(event_type = "channel_reply", channel = %name, "The flow's reply is empty: nothing to send");
            return;
        }
        let sent = send_reply(&state, &deployment, channel, &message, &request, &outcome).await;
        let latency_ms = (started.elapsed().as_micros() as f64 / 10.0).round() / 100.0;
        match sent {
            Ok((span, to)) => {
                ChannelCounters::add(&counters.replies);
                count_reply(&name, "ok");
                tracing::info!(
                    event_type = "channel_reply",
                    io = "out",
                    channel = %name,
                    to = %to,
                    status = span.status,
                    attempts = span.attempts,
                    send_ms = span.latency_ms,
                    latency_ms,
                    "Reply sent"
                );
            }
            Err((code, message, span)) => {
                ChannelCounters::add(&counters.outbound_failures);
                count_reply(&name, code);
                tracing::error!(
                    event_type = "channel_reply",
                    io = "out",
                    channel = %name,
                    code,
                    error = %message,
                    status = span.as_ref().and_then(|span| span.status),
                    attempts = span.as_ref().map(|span| span.attempts),
                    latency_ms,
                    "The reply could not be sent"
                );
            }
        }
    }
    .instrument(span)
    .await;
}

fn count_reply(name: &str, outcome: &'static str) {
    metrics::counter!(
        prometheus::CHANNEL_REPLIES_TOTAL,
        "channel" => name.to_owned(),
        "outcome" => outcome,
    )
    .increment(1);
}

type SendError = (&'static str, String, Option<services::ServiceSpan>);

/// Sends the reply as a service call: its timeout, retries with backoff
/// and error codes.
async fn send_reply(
    state: &AppState,
    deployment: &Deployment,
    channel: &Channel,
    message: &Message,
    request: &TurnRequest,
    outcome: &crate::engine::TurnOutcome,
) -> Result<(services::ServiceSpan, String), SendError> {
    let trace = trace_headers(&request.trace_id);
    let reply = channels::reply(&deployment.project, channel, message, request, outcome)
        .map_err(|error| ("template_error", error, None))?;
    let (service, mode, body, to) = match reply {
        Reply::Service { service, body } => {
            let mode = deployment
                .modes
                .get(service.0 as usize)
                .cloned()
                .unwrap_or(ServiceMode::Mock);
            let service = deployment.project.service(service);
            (service, mode, body, format!("service `{}`", service.name))
        }
        Reply::Api(outbound) => {
            let Some(service) = &channel.delivery else {
                return Err(("internal", "the channel has no reply API".to_owned(), None));
            };
            (
                service,
                ServiceMode::Live(outbound.url),
                outbound.body,
                outbound.shown_url,
            )
        }
        Reply::Json(_) | Reply::TwiML(_) => {
            return Err((
                "internal",
                "the channel replies in its response".to_owned(),
                None,
            ));
        }
    };
    let budget = service
        .timeout
        .saturating_mul(service.retry.map_or(1, |retry| retry.attempts))
        .saturating_add(Duration::from_secs(5))
        .min(MAX_DELIVERY_TIME);
    let deadline = tokio::time::Instant::now() + budget;
    let call = services::call(
        state.transport.as_ref(),
        &state.breakers,
        service,
        &mode,
        Some(&body),
        &trace,
        deadline,
    )
    .await;
    match call.result {
        Ok(_) => Ok((call.span, to)),
        Err(error) => Err((
            error.code.as_str(),
            format!("{} (to {to})", error.message),
            Some(call.span),
        )),
    }
}
