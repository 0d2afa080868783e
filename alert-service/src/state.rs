//! The ISA-18.2 / OPC UA Part 9 alarm state machine, without I/O.
//!
//! ```text
//!            activate                 ack
//!  normal ───────────▶ active_unacked ─────▶ active_acked
//!    ▲                    │        ▲              │
//!    │ ack                │ clear  │ activate     │ clear
//!    │                    ▼        │              ▼
//!  rtn_unacked ◀──────────┘        └──────── (normal)
//! ```
//!
//! Beside the state: shelving (for a bounded time, then back by itself), suppression by a
//! condition, and out of service. While shelved, suppressed or out of service an alarm still
//! follows its process condition, but it does not annunciate (its retained state says so).
//! Operations that make no sense in the current state are refused with a reason.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Normal,
    ActiveUnacked,
    ActiveAcked,
    RtnUnacked,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Normal => "normal",
            State::ActiveUnacked => "active_unacked",
            State::ActiveAcked => "active_acked",
            State::RtnUnacked => "rtn_unacked",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        Some(match s {
            "normal" => State::Normal,
            "active_unacked" => State::ActiveUnacked,
            "active_acked" => State::ActiveAcked,
            "rtn_unacked" => State::RtnUnacked,
            _ => return None,
        })
    }

    pub fn is_active(self) -> bool {
        matches!(self, State::ActiveUnacked | State::ActiveAcked)
    }

    pub fn is_unacked(self) -> bool {
        matches!(self, State::ActiveUnacked | State::RtnUnacked)
    }
}

/// What happened to an alarm (the `event` of `$nexus/alarms/events` and `alarm_events`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    Activated,
    Cleared,
    Acknowledged,
    Shelved,
    Unshelved,
    Suppressed,
    Unsuppressed,
    OutOfService,
    InService,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Activated => "activated",
            Event::Cleared => "cleared",
            Event::Acknowledged => "acknowledged",
            Event::Shelved => "shelved",
            Event::Unshelved => "unshelved",
            Event::Suppressed => "suppressed",
            Event::Unsuppressed => "unsuppressed",
            Event::OutOfService => "out_of_service",
            Event::InService => "in_service",
        }
    }
}

/// An operation refused in the current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// One alarm instance (a rule on one topic).
#[derive(Debug, Clone, PartialEq)]
pub struct Alarm {
    pub state: State,
    /// Unix ms of the last state change.
    pub since_ms: i64,
    /// Shelved until this unix ms.
    pub shelved_until_ms: Option<i64>,
    pub suppressed: bool,
    pub out_of_service: bool,
}

impl Default for Alarm {
    fn default() -> Self {
        Alarm {
            state: State::Normal,
            since_ms: 0,
            shelved_until_ms: None,
            suppressed: false,
            out_of_service: false,
        }
    }
}

impl Alarm {
    /// Whether the alarm is shown to operators now.
    pub fn annunciates(&self, now_ms: i64) -> bool {
        self.state != State::Normal
            && !self.is_shelved(now_ms)
            && !self.suppressed
            && !self.out_of_service
    }

    pub fn is_shelved(&self, now_ms: i64) -> bool {
        self.shelved_until_ms.is_some_and(|t| now_ms < t)
    }

    /// The process condition became active (after any on-delay).
    pub fn activate(&mut self, now_ms: i64) -> Option<Event> {
        match self.state {
            State::Normal | State::RtnUnacked => {
                self.state = State::ActiveUnacked;
                self.since_ms = now_ms;
                Some(Event::Activated)
            }
            State::ActiveUnacked | State::ActiveAcked => None,
        }
    }

    /// The process condition cleared (after deadband and any off-delay).
    pub fn clear(&mut self, now_ms: i64) -> Option<Event> {
        let next = match self.state {
            State::ActiveUnacked => State::RtnUnacked,
            State::ActiveAcked => State::Normal,
            State::Normal | State::RtnUnacked => return None,
        };
        self.state = next;
        self.since_ms = now_ms;
        Some(Event::Cleared)
    }

    pub fn acknowledge(&mut self, now_ms: i64) -> Result<Event, Refused> {
        let next = match self.state {
            State::ActiveUnacked => State::ActiveAcked,
            State::RtnUnacked => State::Normal,
            State::ActiveAcked => return Err(Refused("already acknowledged".into())),
            State::Normal => {
                return Err(Refused(
                    "nothing to acknowledge: the alarm is normal".into(),
                ))
            }
        };
        self.state = next;
        self.since_ms = now_ms;
        Ok(Event::Acknowledged)
    }

    /// Shelve for `for_ms` (bounded by `max_ms`).
    pub fn shelve(&mut self, now_ms: i64, for_ms: i64, max_ms: i64) -> Result<Event, Refused> {
        if self.out_of_service {
            return Err(Refused("the alarm is out of service".into()));
        }
        if for_ms <= 0 {
            return Err(Refused("a shelving time must be positive".into()));
        }
        if for_ms > max_ms {
            return Err(Refused(format!(
                "shelving is limited to {} s",
                max_ms / 1000
            )));
        }
        let Some(until) = now_ms.checked_add(for_ms) else {
            return Err(Refused(
                "the shelving would end past the latest time there is".into(),
            ));
        };
        self.shelved_until_ms = Some(until);
        Ok(Event::Shelved)
    }

    pub fn unshelve(&mut self, now_ms: i64) -> Result<Event, Refused> {
        if !self.is_shelved(now_ms) {
            return Err(Refused("the alarm is not shelved".into()));
        }
        self.shelved_until_ms = None;
        Ok(Event::Unshelved)
    }

    /// A shelf whose time is up lifts by itself.
    pub fn expire_shelf(&mut self, now_ms: i64) -> Option<Event> {
        match self.shelved_until_ms {
            Some(t) if now_ms >= t => {
                self.shelved_until_ms = None;
                Some(Event::Unshelved)
            }
            _ => None,
        }
    }

    pub fn set_suppressed(&mut self, on: bool) -> Option<Event> {
        if self.suppressed == on {
            return None;
        }
        self.suppressed = on;
        Some(if on {
            Event::Suppressed
        } else {
            Event::Unsuppressed
        })
    }

    pub fn set_out_of_service(&mut self, on: bool) -> Result<Event, Refused> {
        if self.out_of_service == on {
            return Err(Refused(
                if on {
                    "already out of service"
                } else {
                    "already in service"
                }
                .into(),
            ));
        }
        self.out_of_service = on;
        if on {
            // An alarm taken out of service forgets its process state.
            self.state = State::Normal;
            self.shelved_until_ms = None;
        }
        Ok(if on {
            Event::OutOfService
        } else {
            Event::InService
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_transition() {
        let mut a = Alarm::default();
        assert_eq!(a.activate(1), Some(Event::Activated));
        assert_eq!(a.state, State::ActiveUnacked);
        assert_eq!(a.activate(2), None, "already active");
        assert_eq!(a.acknowledge(3), Ok(Event::Acknowledged));
        assert_eq!(a.state, State::ActiveAcked);
        assert_eq!(a.acknowledge(4).unwrap_err().0, "already acknowledged");
        assert_eq!(a.clear(5), Some(Event::Cleared));
        assert_eq!(a.state, State::Normal, "acked then cleared: normal");
        assert_eq!(
            a.acknowledge(6).unwrap_err().0,
            "nothing to acknowledge: the alarm is normal"
        );
        assert_eq!(a.clear(6), None);

        // Active -> return to normal unacknowledged -> ack -> normal.
        a.activate(10);
        assert_eq!(a.clear(11), Some(Event::Cleared));
        assert_eq!(a.state, State::RtnUnacked);
        assert!(a.annunciates(11), "rtn_unacked still needs an operator");
        // Re-activation from rtn_unacked.
        assert_eq!(a.activate(12), Some(Event::Activated));
        assert_eq!(a.state, State::ActiveUnacked);
        a.clear(13);
        assert_eq!(a.acknowledge(14), Ok(Event::Acknowledged));
        assert_eq!(a.state, State::Normal);
        assert_eq!(a.since_ms, 14);
    }

    #[test]
    fn shelving_is_bounded_and_lifts_by_itself() {
        let mut a = Alarm::default();
        a.activate(0);
        assert!(a.shelve(0, 10_000, 3_600_000).is_ok());
        assert!(!a.annunciates(5_000));
        assert!(a.is_shelved(9_999));
        assert_eq!(a.expire_shelf(9_999), None);
        assert_eq!(a.expire_shelf(10_000), Some(Event::Unshelved));
        assert!(a.annunciates(10_000));
        assert_eq!(
            a.shelve(0, 7_200_000, 3_600_000).unwrap_err().0,
            "shelving is limited to 3600 s"
        );
        assert!(a.shelve(0, 0, 3_600_000).is_err());
        assert_eq!(
            a.unshelve(20_000).unwrap_err().0,
            "the alarm is not shelved"
        );
        a.shelve(20_000, 1_000, 3_600_000).unwrap();
        assert_eq!(a.unshelve(20_500), Ok(Event::Unshelved));
        // A bound as large as the clock: the deadline is checked, not wrapped.
        assert_eq!(
            a.shelve(i64::MAX - 5, 10, i64::MAX).unwrap_err().0,
            "the shelving would end past the latest time there is"
        );
        assert!(!a.is_shelved(i64::MAX - 5));
    }

    #[test]
    fn suppression_and_out_of_service() {
        let mut a = Alarm::default();
        a.activate(0);
        assert_eq!(a.set_suppressed(true), Some(Event::Suppressed));
        assert_eq!(a.set_suppressed(true), None);
        assert!(!a.annunciates(1));
        assert_eq!(a.set_suppressed(false), Some(Event::Unsuppressed));
        assert_eq!(a.set_out_of_service(true), Ok(Event::OutOfService));
        assert_eq!(a.state, State::Normal);
        assert_eq!(
            a.shelve(1, 1000, 10_000).unwrap_err().0,
            "the alarm is out of service"
        );
        assert_eq!(
            a.set_out_of_service(true).unwrap_err().0,
            "already out of service"
        );
        assert_eq!(a.set_out_of_service(false), Ok(Event::InService));
    }

    #[test]
    fn state_names_round_trip() {
        for s in [
            State::Normal,
            State::ActiveUnacked,
            State::ActiveAcked,
            State::RtnUnacked,
        ] {
            assert_eq!(State::parse(s.as_str()), Some(s));
        }
        assert_eq!(State::parse("weird"), None);
    }
}
