//! Rate limits on governor: one global limiter and one per key (device, client), each
//! optional. Refusals are counted in `nexus_ratelimit_rejected_total{limiter,scope}`.
//! Keyed state is pruned by [`RateLimiter::housekeeping`] (governor keeps every key otherwise).

use crate::metrics::{self, MetricError};
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};
use prometheus::{IntCounterVec, Registry};

/// `per_second` sustained, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

impl Rate {
    pub fn new(per_second: u32, burst: u32) -> Option<Rate> {
        Some(Rate {
            per_second: NonZeroU32::new(per_second)?,
            burst: NonZeroU32::new(burst)?,
        })
    }

    fn quota(self) -> Quota {
        Quota::per_second(self.per_second).allow_burst(self.burst)
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitScope {
    Global,
    Key,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rate limit ({scope}) exceeded; retry in {} ms", .retry_in.as_millis().max(1), scope = match .scope { LimitScope::Global => "global", LimitScope::Key => "per key" })]
pub struct RateLimited {
    pub scope: LimitScope,
    pub retry_in: Duration,
}

/// `nexus_ratelimit_rejected_total{limiter,scope}`, created once per service registry and
/// shared by its limiters.
#[derive(Clone)]
pub struct RateLimitMetrics {
    rejected: IntCounterVec,
}

impl RateLimitMetrics {
    pub fn new(registry: &Registry) -> Result<RateLimitMetrics, MetricError> {
        Ok(RateLimitMetrics {
            rejected: metrics::counter_vec(
                registry,
                "nexus_ratelimit_rejected_total",
                "Requests refused by a rate limit",
                &["limiter", "scope"],
            )?,
        })
    }
}

pub struct RateLimiter {
    name: String,
    global: Option<DefaultDirectRateLimiter>,
    keyed: Option<DefaultKeyedRateLimiter<String>>,
    metrics: Option<RateLimitMetrics>,
}

impl RateLimiter {
    pub fn new(
        name: impl Into<String>,
        global: Option<Rate>,
        per_key: Option<Rate>,
        metrics: Option<RateLimitMetrics>,
    ) -> RateLimiter {
        let name = name.into();
        if let Some(m) = &metrics {
            // Each configured scope's series exists from the start, at 0.
            for (on, scope) in [(per_key.is_some(), "key"), (global.is_some(), "global")] {
                if on {
                    m.rejected.with_label_values(&[&name, scope]);
                }
            }
        }
        RateLimiter {
            name,
            global: global.map(|r| DefaultDirectRateLimiter::direct(r.quota())),
            keyed: per_key.map(|r| DefaultKeyedRateLimiter::keyed(r.quota())),
            metrics,
        }
    }

    /// Take one unit for `key`. The key limit is checked first so that a noisy key does not
    /// use up the global budget.
    pub fn check(&self, key: &str) -> Result<(), RateLimited> {
        let now = DefaultClock::default().now();
        if let Some(k) = &self.keyed {
            if let Err(not_until) = k.check_key(&key.to_owned()) {
                self.count("key");
                return Err(RateLimited {
                    scope: LimitScope::Key,
                    retry_in: not_until.wait_time_from(now),
                });
            }
        }
        if let Some(g) = &self.global {
            if let Err(not_until) = g.check() {
                self.count("global");
                return Err(RateLimited {
                    scope: LimitScope::Global,
                    retry_in: not_until.wait_time_from(now),
                });
            }
        }
        Ok(())
    }

    fn count(&self, scope: &str) {
        if let Some(m) = &self.metrics {
            m.rejected.with_label_values(&[&self.name, scope]).inc();
        }
    }

    /// Forget keys whose state is back to full; call it now and then.
    pub fn housekeeping(&self) {
        if let Some(k) = &self.keyed {
            k.retain_recent();
            k.shrink_to_fit();
        }
    }

    pub fn tracked_keys(&self) -> usize {
        self.keyed.as_ref().map_or(0, |k| k.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_key_and_global_limits() {
        let reg = Registry::new();
        let l = RateLimiter::new(
            "cmd",
            Rate::new(1, 5),
            Rate::new(1, 2),
            Some(RateLimitMetrics::new(&reg).unwrap()),
        );
        assert!(l.check("a").is_ok());
        assert!(l.check("a").is_ok());
        let e = l.check("a").unwrap_err();
        assert_eq!(e.scope, LimitScope::Key);
        assert!(e.retry_in > Duration::ZERO && e.retry_in <= Duration::from_secs(1));
        assert!(l.check("b").is_ok());
        assert!(l.check("b").is_ok());
        assert!(l.check("c").is_ok());
        let e = l.check("d").unwrap_err();
        assert_eq!(e.scope, LimitScope::Global, "five admitted in all");
        assert!(e.to_string().contains("global"));
        let text = {
            use prometheus::Encoder;
            let mut b = Vec::new();
            prometheus::TextEncoder::new()
                .encode(&reg.gather(), &mut b)
                .unwrap();
            String::from_utf8(b).unwrap()
        };
        assert!(
            text.contains("nexus_ratelimit_rejected_total{limiter=\"cmd\",scope=\"key\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("nexus_ratelimit_rejected_total{limiter=\"cmd\",scope=\"global\"} 1"),
            "{text}"
        );
        assert_eq!(l.tracked_keys(), 4);
    }

    #[test]
    fn unlimited_when_not_configured() {
        let l = RateLimiter::new("none", None, None, None);
        for _ in 0..10_000 {
            assert!(l.check("x").is_ok());
        }
    }
}
