//! Circuit breakers: one per service per process. After `failures` failed
//! calls in a row (a call counts once, whatever its retries) the circuit
//! opens and calls fail at once with `circuit_open`; after `open_for` one
//! probe call is let through (half-open): its success closes the circuit,
//! its failure opens it again.
//!
//! State is kept by service name, so it survives reloads; the policy (how
//! many failures, how long open) is read from the live project at each call.
//! Only live calls go through a breaker; mocks never fail that way.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::project::CircuitBreakerPolicy;
use crate::telemetry::prometheus;

/// The breakers of every service called so far, by name. Bounded by the
/// names of services the projects declared.
#[derive(Default)]
pub struct CircuitBreakers {
    by_service: Mutex<HashMap<String, Arc<Mutex<Breaker>>>>,
}

/// A circuit's state, for `/health` and the gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

impl CircuitState {
    /// The value of `mcp_circuit_breaker_state`: 0 closed, 1 open, 2 half-open.
    pub fn gauge_value(self) -> f64 {
        match self {
            CircuitState::Closed => 0.0,
            CircuitState::Open => 1.0,
            CircuitState::HalfOpen => 2.0,
        }
    }
}

#[derive(Debug)]
struct Breaker {
    state: CircuitState,
    /// Failed calls in a row while closed.
    failures: u32,
    /// While open: when the next call may probe.
    open_until: Option<Instant>,
    /// While half-open: whether the probe call is running.
    probing: bool,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            state: CircuitState::Closed,
            failures: 0,
            open_until: None,
            probing: false,
        }
    }
}

/// A call let through; report how it went with `finish`. Dropped without
/// `finish` (the turn was cancelled), it counts as neither outcome, and a
/// probe it was leaves the next call free to probe.
pub struct Ticket {
    breaker: Option<(String, Arc<Mutex<Breaker>>, CircuitBreakerPolicy)>,
    probe: bool,
}

impl CircuitBreakers {
    /// A ticket when a call to `service` may go out now; `None` while its
    /// circuit is open (or half-open with its probe running).
    pub fn admit(
        &self,
        service: &str,
        policy: Option<CircuitBreakerPolicy>,
        now: Instant,
    ) -> Option<Ticket> {
        let Some(policy) = policy else {
            return Some(Ticket {
                breaker: None,
                probe: false,
            });
        };
        let breaker = {
            let mut by_service = self
                .by_service
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            by_service.entry(service.to_owned()).or_default().clone()
        };
        let mut state = breaker.lock().unwrap_or_else(PoisonError::into_inner);
        let probe = match state.state {
            CircuitState::Closed => false,
            CircuitState::Open => {
                if state.open_until.is_some_and(|until| now < until) {
                    return None;
                }
                state.state = CircuitState::HalfOpen;
                state.probing = true;
                gauge(service, CircuitState::HalfOpen);
                tracing::info!(
                    event_type = "circuit_breaker",
                    service_type = service,
                    state = "half_open",
                    "Circuit half-open: one probe call goes through"
                );
                true
            }
            CircuitState::HalfOpen => {
                if state.probing {
                    return None;
                }
                state.probing = true;
                true
            }
        };
        drop(state);
        Some(Ticket {
            breaker: Some((service.to_owned(), breaker, policy)),
            probe,
        })
    }

    /// The state of each breaker, by service name.
    pub fn states(&self) -> Vec<(String, CircuitState)> {
        let by_service = self
            .by_service
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut states: Vec<(String, CircuitState)> = by_service
            .iter()
            .map(|(name, breaker)| {
                let state = breaker.lock().unwrap_or_else(PoisonError::into_inner).state;
                (name.clone(), state)
            })
            .collect();
        states.sort_by(|a, b| a.0.cmp(&b.0));
        states
    }

    /// The state of one service's breaker (closed when it never failed).
    pub fn state(&self, service: &str) -> CircuitState {
        let by_service = self
            .by_service
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        by_service
            .get(service)
            .map_or(CircuitState::Closed, |breaker| {
                breaker.lock().unwrap_or_else(PoisonError::into_inner).state
            })
    }
}

impl Ticket {
    /// Records the call's outcome: `failed` when it counts against the
    /// service.
    pub fn finish(mut self, failed: bool, now: Instant) {
        let Some((service, breaker, policy)) = self.breaker.take() else {
            return;
        };
        let mut state = breaker.lock().unwrap_or_else(PoisonError::into_inner);
        if self.probe {
            state.probing = false;
        }
        match (state.state, failed) {
            (CircuitState::Closed, false) => state.failures = 0,
            (CircuitState::Closed, true) => {
                state.failures += 1;
                if state.failures >= policy.failures {
                    open(&mut state, &service, policy, now);
                    tracing::warn!(
                        event_type = "circuit_breaker",
                        service_type = %service,
                        state = "open",
                        failures = policy.failures,
                        open_for_ms = policy.open_for.as_millis() as u64,
                        "Circuit open: calls fail at once until a probe succeeds"
                    );
                }
            }
            (CircuitState::HalfOpen, false) if self.probe => {
                state.state = CircuitState::Closed;
                state.failures = 0;
                state.open_until = None;
                gauge(&service, CircuitState::Closed);
                tracing::info!(
                    event_type = "circuit_breaker",
                    service_type = %service,
                    state = "closed",
                    "Circuit closed: the probe call succeeded"
                );
            }
            (CircuitState::HalfOpen, true) if self.probe => {
                open(&mut state, &service, policy, now);
                tracing::warn!(
                    event_type = "circuit_breaker",
                    service_type = %service,
                    state = "open",
                    "Circuit open again: the probe call failed"
                );
            }
            // A call that started before the circuit opened, or while it
            // was half-open but was not the probe: the state moved on.
            _ => {}
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.probe
            && let Some((_, breaker, _)) = self.breaker.take()
        {
            breaker
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .probing = false;
        }
    }
}

fn open(state: &mut Breaker, service: &str, policy: CircuitBreakerPolicy, now: Instant) {
    state.state = CircuitState::Open;
    state.failures = 0;
    // A duration too large for the clock opens it for good, never panics.
    state.open_until = Some(
        now.checked_add(policy.open_for)
            .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600)),
    );
    gauge(service, CircuitState::Open);
}

fn gauge(service: &str, state: CircuitState) {
    metrics::gauge!(prometheus::CIRCUIT_BREAKER_STATE, "service" => service.to_owned())
        .set(state.gauge_value());
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: CircuitBreakerPolicy = CircuitBreakerPolicy {
        failures: 3,
        open_for: Duration::from_secs(30),
    };

    /// One call; whether it was let through.
    fn call(breakers: &CircuitBreakers, now: Instant, failed: bool) -> bool {
        breakers
            .admit("menu", Some(POLICY), now)
            .map(|ticket| ticket.finish(failed, now))
            .is_some()
    }

    #[test]
    fn opens_after_the_failures_in_a_row_then_probes_once_and_closes() {
        let breakers = CircuitBreakers::default();
        let start = Instant::now();
        assert!(call(&breakers, start, true));
        assert!(call(&breakers, start, false), "a success resets the count");
        for _ in 0..3 {
            assert!(call(&breakers, start, true));
        }
        assert_eq!(breakers.state("menu"), CircuitState::Open);
        assert!(!call(&breakers, start + Duration::from_secs(29), false));

        let later = start + Duration::from_secs(30);
        let probe = breakers.admit("menu", Some(POLICY), later).unwrap();
        assert_eq!(breakers.state("menu"), CircuitState::HalfOpen);
        assert!(
            breakers.admit("menu", Some(POLICY), later).is_none(),
            "one probe at a time"
        );
        probe.finish(false, later);
        assert_eq!(breakers.state("menu"), CircuitState::Closed);
        assert!(call(&breakers, later, false));
    }

    #[test]
    fn a_failed_probe_opens_again_and_a_dropped_one_frees_the_next() {
        let breakers = CircuitBreakers::default();
        let start = Instant::now();
        for _ in 0..3 {
            assert!(call(&breakers, start, true));
        }
        let later = start + Duration::from_secs(30);
        drop(breakers.admit("menu", Some(POLICY), later).unwrap());
        let probe = breakers.admit("menu", Some(POLICY), later).unwrap();
        probe.finish(true, later);
        assert_eq!(breakers.state("menu"), CircuitState::Open);
        assert!(breakers.admit("menu", Some(POLICY), later).is_none());
    }

    #[test]
    fn without_a_policy_nothing_is_counted() {
        let breakers = CircuitBreakers::default();
        for _ in 0..10 {
            breakers
                .admit("menu", None, Instant::now())
                .unwrap()
                .finish(true, Instant::now());
        }
        assert!(breakers.states().is_empty());
    }
}
