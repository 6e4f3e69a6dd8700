//! Admission at the edge, before a turn runs: who is calling (caller keys),
//! whether they are within their rates (token buckets per caller key and
//! per user), and whether the process has room for one more turn (the
//! in-flight cap).
//!
//! The limits come from the live project. `Admission` holds the buckets and
//! the in-flight semaphore for one set of limits; `AdmissionControl` keeps
//! the current one and builds a new one only when a reload changed the
//! limits, so unchanged limits keep their buckets across reloads.
//!
//! Memory is bounded: buckets live in caches bounded in entries, and a
//! bucket idle long enough to have refilled is forgotten (a new one would be
//! the same).

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use http::HeaderMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::project::{Access, CallerKey, Limits, Rate};

/// Most users with a bucket at once; past it the least recently seen are
/// forgotten first (they get a full bucket when they come back).
pub const MAX_USER_BUCKETS: u64 = 100_000;

/// Most caller names with a bucket (declared keys, plus `anonymous`).
const MAX_KEY_BUCKETS: u64 = 10_000;

/// Longest bucket key kept as it is; a longer one is kept as its SHA-256.
const MAX_KEY_BYTES: usize = 64;

/// The caller name of requests when the project declares no key.
pub const ANONYMOUS: &str = "anonymous";

/// The caller key a request presents: `Authorization: Bearer <key>`, else
/// `x-api-key: <key>`.
pub fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(value) = headers.get(http::header::AUTHORIZATION)
        && let Ok(value) = value.to_str()
    {
        let mut parts = value.trim().splitn(2, ' ');
        if let (Some(scheme), Some(token)) = (parts.next(), parts.next())
            && scheme.eq_ignore_ascii_case("bearer")
            && !token.trim().is_empty()
        {
            return Some(token.trim());
        }
    }
    headers
        .get("x-api-key")
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|key| !key.is_empty())
}

/// Who is calling.
#[derive(Debug, Clone, Copy)]
pub enum Caller<'p> {
    /// No key is declared: anyone may call.
    Anonymous,
    Key(&'p CallerKey),
}

impl Caller<'_> {
    pub fn name(&self) -> &str {
        match self {
            Caller::Anonymous => ANONYMOUS,
            Caller::Key(key) => &key.name,
        }
    }

    /// The name, shared: a label of the request metrics.
    pub fn label(&self) -> std::sync::Arc<str> {
        static ANONYMOUS_LABEL: std::sync::LazyLock<std::sync::Arc<str>> =
            std::sync::LazyLock::new(|| std::sync::Arc::from(ANONYMOUS));
        match self {
            Caller::Anonymous => ANONYMOUS_LABEL.clone(),
            Caller::Key(key) => key.name.clone(),
        }
    }

    pub fn allows_channel(&self, channel: &str) -> bool {
        match self {
            Caller::Anonymous => true,
            Caller::Key(key) => key.allows_channel(channel),
        }
    }

    /// Whether the caller's key lists `channel` by name: only such a key
    /// may act for the users of a declared channel (`<channel>:…` ids).
    pub fn names_channel(&self, channel: &str) -> bool {
        match self {
            Caller::Anonymous => false,
            Caller::Key(key) => key
                .channels
                .as_ref()
                .is_some_and(|channels| channels.iter().any(|named| named == channel)),
        }
    }
}

/// The caller of a request, or `None` when keys are declared and the
/// request presents none of them.
pub fn authenticate<'p>(access: &'p Access, headers: &HeaderMap) -> Option<Caller<'p>> {
    if access.keys.is_empty() {
        return Some(Caller::Anonymous);
    }
    access
        .authenticate(presented_key(headers)?)
        .map(Caller::Key)
}

/// Whether `GET /metrics` may be answered: always when the project has no
/// metrics key, else only with it as a Bearer token.
pub fn metrics_allowed(access: &Access, headers: &HeaderMap) -> bool {
    match &access.metrics_key {
        None => true,
        Some(digest) => presented_key(headers)
            .is_some_and(|presented| digest.matches(&crate::project::SecretDigest::of(presented))),
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Over a rate: retry after this long.
    RateLimited { retry_after: Duration },
    /// The process has `max_in_flight` turns running.
    Overloaded,
}

/// The buckets and the in-flight cap of one set of limits.
pub struct Admission {
    limits: Limits,
    per_user: Option<Buckets>,
    per_key: Option<Buckets>,
    in_flight: Arc<Semaphore>,
}

impl Admission {
    fn new(limits: Limits) -> Admission {
        Admission {
            limits,
            per_user: limits
                .per_user
                .map(|rate| Buckets::new(rate, MAX_USER_BUCKETS)),
            per_key: limits
                .per_key
                .map(|rate| Buckets::new(rate, MAX_KEY_BUCKETS)),
            in_flight: Arc::new(Semaphore::new(limits.max_in_flight as usize)),
        }
    }

    /// A place among the turns in flight, held until the permit is dropped;
    /// `Overloaded` at once when there is none (no queueing).
    pub fn enter(&self) -> Result<OwnedSemaphorePermit, Refusal> {
        self.in_flight
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::Overloaded)
    }

    /// One request of caller `name` against its key's bucket.
    pub fn check_key(&self, name: &str) -> Result<(), Refusal> {
        self.per_key.as_ref().map_or(Ok(()), |b| b.check(name))
    }

    /// One request of `user_id` against the user's bucket.
    pub fn check_user(&self, user_id: &str) -> Result<(), Refusal> {
        self.per_user.as_ref().map_or(Ok(()), |b| b.check(user_id))
    }

    /// Turns running now.
    pub fn in_flight(&self) -> usize {
        (self.limits.max_in_flight as usize).saturating_sub(self.in_flight.available_permits())
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }
}

/// The admission of the live limits.
pub struct AdmissionControl {
    current: ArcSwap<Admission>,
}

impl Default for AdmissionControl {
    fn default() -> Self {
        AdmissionControl {
            current: ArcSwap::from_pointee(Admission::new(Limits::default())),
        }
    }
}

impl AdmissionControl {
    /// The admission for `limits`: the current one when they are unchanged,
    /// else a new one (fresh buckets, a new in-flight cap; turns admitted
    /// under the old cap finish under it).
    pub fn for_limits(&self, limits: &Limits) -> Arc<Admission> {
        let current = self.current.load_full();
        if current.limits == *limits {
            return current;
        }
        // Requests racing on a reload agree on one new admission.
        self.current.rcu(|current| {
            if current.limits == *limits {
                current.clone()
            } else {
                Arc::new(Admission::new(*limits))
            }
        });
        self.current.load_full()
    }
}

/// Token buckets by key, bounded in number.
struct Buckets {
    quota: Quota,
    clock: DefaultClock,
    limiters: moka::sync::Cache<String, Arc<DefaultDirectRateLimiter>>,
}

impl Buckets {
    fn new(rate: Rate, capacity: u64) -> Buckets {
        let interval = rate.replenish_interval().max(Duration::from_nanos(1));
        let burst = std::num::NonZeroU32::new(rate.burst).unwrap_or(std::num::NonZeroU32::MIN);
        let quota = Quota::with_period(interval)
            .unwrap_or_else(|| Quota::per_second(std::num::NonZeroU32::MIN))
            .allow_burst(burst);
        // Idle this long, a bucket is full again: forgetting it changes
        // nothing.
        let refill = interval
            .saturating_mul(rate.burst)
            .max(Duration::from_secs(1));
        Buckets {
            quota,
            clock: DefaultClock::default(),
            limiters: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_idle(refill)
                .build(),
        }
    }

    fn check(&self, key: &str) -> Result<(), Refusal> {
        // A long key (a `user_id` of a project without a request schema)
        // is kept as its digest: an entry's size is bounded too.
        let digest;
        let key = if key.len() > MAX_KEY_BYTES {
            digest = crate::project::SecretDigest::of(key).hex();
            digest.as_str()
        } else {
            key
        };
        let limiter = self.limiters.get_with_by_ref(key, || {
            Arc::new(RateLimiter::direct_with_clock(
                self.quota,
                self.clock.clone(),
            ))
        });
        limiter.check().map_err(|not_until| Refusal::RateLimited {
            retry_after: not_until.wait_time_from(self.clock.now()),
        })
    }
}

/// Whole seconds for a `Retry-After` header: rounded up, at least 1.
pub fn retry_after_seconds(wait: Duration) -> u64 {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    seconds.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(count: u32, period: Duration, burst: u32) -> Limits {
        Limits {
            per_user: Some(Rate {
                count,
                period,
                burst,
            }),
            per_key: None,
            max_in_flight: 2,
        }
    }

    #[test]
    fn a_user_gets_the_burst_then_is_limited_and_others_are_not() {
        let admission = Admission::new(rate(5, Duration::from_secs(1), 5));
        for _ in 0..5 {
            assert_eq!(admission.check_user("u-1"), Ok(()));
        }
        match admission.check_user("u-1") {
            Err(Refusal::RateLimited { retry_after }) => {
                assert!(retry_after <= Duration::from_millis(200), "{retry_after:?}");
                assert_eq!(retry_after_seconds(retry_after), 1);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(admission.check_user("u-2"), Ok(()));
    }

    #[test]
    fn the_in_flight_cap_refuses_at_once_and_frees_on_drop() {
        let admission = Admission::new(rate(5, Duration::from_secs(1), 5));
        let first = admission.enter().unwrap();
        let _second = admission.enter().unwrap();
        assert_eq!(admission.in_flight(), 2);
        assert_eq!(admission.enter().err(), Some(Refusal::Overloaded));
        drop(first);
        assert!(admission.enter().is_ok());
    }

    #[test]
    fn unchanged_limits_keep_their_buckets() {
        let control = AdmissionControl::default();
        let limits = rate(1, Duration::from_secs(60), 1);
        let admission = control.for_limits(&limits);
        assert_eq!(admission.check_user("u-1"), Ok(()));
        assert!(control.for_limits(&limits).check_user("u-1").is_err());
        let changed = rate(2, Duration::from_secs(60), 2);
        assert_eq!(control.for_limits(&changed).check_user("u-1"), Ok(()));
    }

    #[test]
    fn keys_are_read_from_bearer_or_x_api_key() {
        let mut headers = HeaderMap::new();
        assert_eq!(presented_key(&headers), None);
        headers.insert("x-api-key", "key-b".parse().unwrap());
        assert_eq!(presented_key(&headers), Some("key-b"));
        headers.insert("authorization", "bearer  key-a ".parse().unwrap());
        assert_eq!(presented_key(&headers), Some("key-a"));
        headers.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(presented_key(&headers), Some("key-b"));
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_seconds(Duration::ZERO), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_seconds(Duration::from_millis(2001)), 3);
    }
}
