//! The edge of the service: caller keys (`access:`), rate limits and the
//! in-flight cap (`limits:`), and circuit breakers (on a service or in
//! `defaults:`).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use crate::diagnostic::{Code, Diagnostic};
use crate::project;
use crate::spec::{self, Spanned};

use super::Checker;

/// Shortest caller key accepted: 16 characters (about 96 bits when random).
pub const MIN_KEY_LENGTH: usize = 16;

/// Most consecutive failures a circuit breaker may wait for.
const MAX_BREAKER_FAILURES: u32 = 1000;

impl Checker<'_> {
    /// `access:`: key names unique, keys long enough and distinct, channel
    /// lists not empty. A key whose value is empty (its variable unset) is
    /// kept apart: `serve` leaves it out in development and refuses it in
    /// production.
    pub(super) fn compile_access(
        &mut self,
        access: Option<(&Path, &Spanned<spec::Access>)>,
    ) -> Option<project::Access> {
        let Some((file, access)) = access else {
            return Some(project::Access::default());
        };
        let mut ok = true;
        let mut compiled = project::Access::default();
        let mut names: HashMap<&str, &Spanned<String>> = HashMap::new();
        let mut digests: Vec<(project::SecretDigest, &str)> = Vec::new();
        for key in &access.value.api_keys {
            let key = &key.value;
            // The name is part of the user and session ids of its MCP
            // calls (`mcp:<name>:<user>`): a `:` would make two of them one.
            if key.name.value.contains(':') || key.name.value.trim().is_empty() {
                let location =
                    self.location(file, &key.name, key.name.value.chars().count().max(1));
                self.push(
                    Diagnostic::error(
                        Code::InvalidValue,
                        location,
                        format!(
                            "caller key name `{}` cannot be empty or hold a `:`",
                            key.name.value
                        ),
                    )
                    .with_hint("use letters, digits, `_`, `-` or `.`, e.g. `web-app`"),
                );
                ok = false;
            }
            if let Some(first) = names.insert(&key.name.value, &key.name) {
                let location = self.location(file, &key.name, key.name.value.chars().count());
                let related = self.location(file, first, first.value.chars().count());
                self.push(
                    Diagnostic::error(
                        Code::DuplicateName,
                        location,
                        format!("caller key `{}` is declared twice", key.name.value),
                    )
                    .with_related(related, "first declared here"),
                );
                ok = false;
                continue;
            }
            let channels = match &key.channels {
                Some(channels) if channels.value.is_empty() => {
                    let location = self.location(file, channels, 1);
                    self.push(
                        Diagnostic::error(
                            Code::InvalidValue,
                            location,
                            format!(
                                "caller key `{}` may use no channel at all",
                                key.name.value
                            ),
                        )
                        .with_hint("list the `channel` values it may send, or leave `channels` out to allow any"),
                    );
                    ok = false;
                    None
                }
                Some(channels) => Some(
                    channels
                        .value
                        .iter()
                        .map(|channel| channel.value.clone())
                        .collect(),
                ),
                None => None,
            };
            let secret = key.key.value.trim();
            if secret.is_empty() {
                compiled.unset_keys.push(project::UnsetCallerKey {
                    name: key.name.value.clone(),
                    variable: self.variable_at(file, key.key.position),
                });
                continue;
            }
            if !self.long_enough(file, &key.key, &format!("caller key `{}`", key.name.value)) {
                ok = false;
                continue;
            }
            let digest = project::SecretDigest::of(secret);
            if let Some((_, other)) = digests.iter().find(|(known, _)| known.matches(&digest)) {
                let location = self.location(file, &key.key, key.key.value.chars().count());
                self.error(
                    Code::DuplicateName,
                    location,
                    format!(
                        "caller keys `{other}` and `{}` have the same value: a caller could not be told apart",
                        key.name.value
                    ),
                );
                ok = false;
                continue;
            }
            digests.push((digest.clone(), &key.name.value));
            compiled.keys.push(project::CallerKey {
                name: std::sync::Arc::from(key.name.value.as_str()),
                digest,
                channels,
                console: key.console,
            });
        }
        if let Some(metrics_key) = &access.value.metrics_key
            && !metrics_key.value.trim().is_empty()
        {
            if self.long_enough(file, metrics_key, "`metrics_key`") {
                compiled.metrics_key = Some(project::SecretDigest::of(metrics_key.value.trim()));
            } else {
                ok = false;
            }
        }
        ok.then_some(compiled)
    }

    /// Whether a secret has at least `MIN_KEY_LENGTH` characters; reports it
    /// otherwise, without quoting it.
    fn long_enough(&mut self, file: &Path, secret: &spec::Text, what: &str) -> bool {
        let length = secret.value.trim().chars().count();
        if length >= MIN_KEY_LENGTH {
            return true;
        }
        let location = self.location(file, secret, secret.value.chars().count());
        self.push(
            Diagnostic::error(
                Code::InvalidValue,
                location,
                format!("{what} has {length} characters; a key needs at least {MIN_KEY_LENGTH}"),
            )
            .with_hint("use a random key, e.g. `openssl rand -hex 32`, passed in through `${VAR}`"),
        );
        false
    }

    /// `limits:`: rates such as `5/s`, bursts and the in-flight cap.
    pub(super) fn compile_limits(
        &mut self,
        limits: Option<(&Path, &Spanned<spec::Limits>)>,
    ) -> Option<project::Limits> {
        let Some((file, limits)) = limits else {
            return Some(project::Limits::default());
        };
        let limits = &limits.value;
        // Every part is checked, whatever the others' fate.
        let per_user = limits.per_user.as_ref().map(|rate| self.rate(file, rate));
        let per_key = limits.per_key.as_ref().map(|rate| self.rate(file, rate));
        let max_in_flight = match &limits.max_in_flight {
            Some(cap) if cap.value == 0 => {
                let location = self.location(file, cap, 1);
                self.error(
                    Code::InvalidValue,
                    location,
                    "`max_in_flight` is 0: no turn could ever run",
                );
                None
            }
            Some(cap) => Some(cap.value),
            None => Some(project::DEFAULT_MAX_IN_FLIGHT),
        };
        Some(project::Limits {
            per_user: per_user.map_or(Some(None), |rate| rate.map(Some))?,
            per_key: per_key.map_or(Some(None), |rate| rate.map(Some))?,
            max_in_flight: max_in_flight?,
        })
    }

    fn rate(&mut self, file: &Path, rate: &Spanned<spec::RateLimit>) -> Option<project::Rate> {
        let text = &rate.value.rate;
        let Some((count, period)) = parse_rate(&text.value) else {
            let location = self.location(file, text, text.value.chars().count());
            self.push(
                Diagnostic::error(
                    Code::InvalidValue,
                    location,
                    format!("invalid rate `{}`", text.value),
                )
                .with_hint("write requests per second, minute or hour: `5/s`, `300/m`, `1000/h`"),
            );
            return None;
        };
        let burst = match &rate.value.burst {
            Some(burst) if burst.value == 0 => {
                let location = self.location(file, burst, 1);
                self.error(
                    Code::InvalidValue,
                    location,
                    "`burst` is 0: no request could ever pass",
                );
                return None;
            }
            Some(burst) => burst.value,
            None => count,
        };
        Some(project::Rate {
            count,
            period,
            burst,
        })
    }

    /// A circuit breaker of a service or of `defaults`.
    pub(super) fn circuit_breaker(
        &mut self,
        file: &Path,
        policy: &Spanned<spec::CircuitBreaker>,
    ) -> Option<project::CircuitBreakerPolicy> {
        let failures = &policy.value.failures;
        if !(1..=MAX_BREAKER_FAILURES).contains(&failures.value) {
            let location = self.location(file, failures, 1);
            self.error(
                Code::InvalidValue,
                location,
                format!(
                    "`failures` is {}; it must be between 1 and {MAX_BREAKER_FAILURES}",
                    failures.value
                ),
            );
            return None;
        }
        let open_for = self.duration(file, &policy.value.open_for)?;
        Some(project::CircuitBreakerPolicy {
            failures: failures.value,
            open_for,
        })
    }
}

/// `N/s`, `N/m`, `N/h` (also `N/sec`, `N/min`, `N/hour`) with N ≥ 1.
fn parse_rate(text: &str) -> Option<(u32, Duration)> {
    let (count, unit) = text.split_once('/')?;
    let count: u32 = count.trim().parse().ok().filter(|count| *count > 0)?;
    let period = match unit.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        _ => return None,
    };
    Some((count, period))
}

impl Checker<'_> {
    /// `hosts:`: host names (letters, digits, `-` and `.`), each once;
    /// kept lower-case, without a trailing dot.
    pub(super) fn compile_hosts(
        &mut self,
        hosts: Option<(&Path, &Spanned<Vec<spec::Text>>)>,
    ) -> Vec<String> {
        let Some((file, hosts)) = hosts else {
            return Vec::new();
        };
        let mut compiled: Vec<String> = Vec::new();
        for host in &hosts.value {
            let name = host.value.trim().trim_end_matches('.').to_ascii_lowercase();
            let valid = !name.is_empty()
                && name.len() <= 253
                && name.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                });
            if !valid {
                let location = self.location(file, host, host.value.len());
                self.error(
                    Code::InvalidValue,
                    location,
                    format!("`{}` is not a host name", host.value),
                )
                .hint = Some(
                    "a DNS name such as `brand-a.example.com`, without a scheme, port or path"
                        .to_owned(),
                );
            } else if compiled.contains(&name) {
                let location = self.location(file, host, host.value.len());
                self.error(
                    Code::DuplicateName,
                    location,
                    format!("host `{name}` is listed twice"),
                );
            } else {
                compiled.push(name);
            }
        }
        compiled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_read_per_second_minute_and_hour() {
        assert_eq!(parse_rate("5/s"), Some((5, Duration::from_secs(1))));
        assert_eq!(
            parse_rate(" 300 / m "),
            Some((300, Duration::from_secs(60)))
        );
        assert_eq!(
            parse_rate("1000/hour"),
            Some((1000, Duration::from_secs(3600)))
        );
        assert_eq!(parse_rate("0/s"), None);
        assert_eq!(parse_rate("5/d"), None);
        assert_eq!(parse_rate("5"), None);
        assert_eq!(parse_rate("-5/s"), None);
    }
}
