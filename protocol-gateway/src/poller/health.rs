//! A device's health after each poll, and when its retained status is published: on every
//! change, and again each heartbeat (a broker restarted without persistence forgets retained
//! messages). Pure: time comes in as a parameter.

use std::time::Duration;

use nexus_common::breaker::BreakerState;
use tokio::time::Instant;

/// What `$nexus/status/device/<id>` says of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Online,
    /// Answering, but some tags read bad, or the breaker is trying it again (half open).
    Degraded,
    /// The last poll failed, or the breaker is open.
    Offline,
}

impl Health {
    /// The device's health after a poll: `failed` (the whole read failed), the endpoint's
    /// breaker, and how many tags read bad.
    pub fn after_poll(failed: bool, breaker: BreakerState, bad_tags: usize) -> Health {
        match (failed, breaker) {
            (true, _) | (_, BreakerState::Open) => Health::Offline,
            (false, BreakerState::HalfOpen) => Health::Degraded,
            (false, _) if bad_tags > 0 => Health::Degraded,
            _ => Health::Online,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Health::Online => "online",
            Health::Degraded => "degraded",
            Health::Offline => "offline",
        }
    }
}

/// When to publish the device status.
#[derive(Debug)]
pub struct StatusSchedule {
    last: Option<(Health, BreakerState)>,
    at: Instant,
    heartbeat: Duration,
}

impl StatusSchedule {
    pub fn new(heartbeat: Duration, now: Instant) -> StatusSchedule {
        StatusSchedule {
            last: None,
            at: now,
            heartbeat,
        }
    }

    /// Whether `(health, breaker)` is to be published at `now`: never published, changed, or
    /// a heartbeat old.
    pub fn due(&self, health: Health, breaker: BreakerState, now: Instant) -> bool {
        self.last != Some((health, breaker))
            || (!self.heartbeat.is_zero() && now.duration_since(self.at) >= self.heartbeat)
    }

    /// Whether it differs from what was last published (worth a log line).
    pub fn changed(&self, health: Health, breaker: BreakerState) -> bool {
        self.last != Some((health, breaker))
    }

    /// Record a successful publish.
    pub fn published(&mut self, health: Health, breaker: BreakerState, now: Instant) {
        self.last = Some((health, breaker));
        self.at = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_from_the_poll_and_the_breaker() {
        use BreakerState::*;
        assert_eq!(Health::after_poll(false, Closed, 0), Health::Online);
        assert_eq!(Health::after_poll(false, Closed, 2), Health::Degraded);
        assert_eq!(Health::after_poll(false, HalfOpen, 0), Health::Degraded);
        assert_eq!(Health::after_poll(true, Closed, 0), Health::Offline);
        assert_eq!(Health::after_poll(false, Open, 0), Health::Offline);
        assert_eq!(Health::Degraded.as_str(), "degraded");
    }

    #[test]
    fn status_on_change_and_each_heartbeat() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut st = StatusSchedule::new(s(30), t0);
        let closed = BreakerState::Closed;
        assert!(st.due(Health::Online, closed, t0), "never published");
        st.published(Health::Online, closed, t0);
        assert!(!st.due(Health::Online, closed, t0 + s(29)));
        assert!(st.due(Health::Online, closed, t0 + s(30)), "heartbeat");
        assert!(
            st.due(Health::Offline, BreakerState::Open, t0 + s(1)),
            "changed"
        );
        assert!(st.changed(Health::Online, BreakerState::HalfOpen));
        // Only a publish that went out is recorded: until then the change stays due; after
        // it, the same state is not due again before the heartbeat.
        let open = BreakerState::Open;
        assert!(st.due(Health::Offline, open, t0 + s(2)));
        assert!(
            st.due(Health::Offline, open, t0 + s(3)),
            "not published yet"
        );
        st.published(Health::Offline, open, t0 + s(3));
        assert!(!st.due(Health::Offline, open, t0 + s(4)));
        assert!(!st.changed(Health::Offline, open));
        // No heartbeat: only changes.
        let mut quiet = StatusSchedule::new(Duration::ZERO, t0);
        quiet.published(Health::Online, closed, t0);
        assert!(!quiet.due(Health::Online, closed, t0 + s(86_400)));
    }
}
