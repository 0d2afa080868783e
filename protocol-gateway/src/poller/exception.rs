//! Report by exception, per tag: a reading is published when it is the tag's first, when its
//! quality changed, when its value moved by more than the tag's deadband, or when the
//! heartbeat has passed since the tag was last published. A bad read keeps the last good
//! value, marked with the bad quality. Pure: time comes in as a parameter.

use std::time::Duration;

use nexus_common::{Quality, Value};
use tokio::time::Instant;

use nexus_devices::Reading;

/// What was last published for a tag.
#[derive(Debug, Clone)]
struct Published {
    value: Option<Value>,
    quality: Quality,
    at: Instant,
}

/// A tag's value as it will be published.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub value: Option<Value>,
    pub quality: Quality,
    pub source_ts_ms: Option<i64>,
}

/// The report-by-exception memory of one device's tags.
#[derive(Debug)]
pub struct Exceptions {
    last: Vec<Option<Published>>,
    heartbeat: Duration,
}

/// Whether `new` differs from `old` by more than `deadband` (numbers), or at all (others).
pub fn changed(deadband: Option<f64>, old: &Option<Value>, new: &Option<Value>) -> bool {
    match (old, new, deadband) {
        (Some(a), Some(b), Some(db)) if db > 0.0 => match (a.as_f64(), b.as_f64()) {
            (Some(x), Some(y)) => (x - y).abs() > db,
            _ => a != b,
        },
        _ => old != new,
    }
}

impl Exceptions {
    /// Memory for `tags` tags; `heartbeat` zero: no heartbeat.
    pub fn new(tags: usize, heartbeat: Duration) -> Exceptions {
        Exceptions {
            last: vec![None; tags],
            heartbeat,
        }
    }

    /// The sample a reading of tag `i` stands for: a bad read keeps the last published value.
    pub fn sample(&self, i: usize, reading: Reading) -> Sample {
        match reading {
            Reading::Good {
                value,
                source_ts_ms,
            } => Sample {
                value: Some(value),
                quality: Quality::Good,
                source_ts_ms,
            },
            Reading::Uncertain {
                value,
                quality,
                source_ts_ms,
            } => Sample {
                value: Some(value),
                quality,
                source_ts_ms,
            },
            Reading::Bad { quality, .. } => Sample {
                value: self
                    .last
                    .get(i)
                    .and_then(|p| p.as_ref())
                    .and_then(|p| p.value.clone()),
                quality,
                source_ts_ms: None,
            },
        }
    }

    /// Whether tag `i`'s `sample` is due at `now`; if so it is remembered as published.
    pub fn due(&mut self, i: usize, deadband: Option<f64>, sample: &Sample, now: Instant) -> bool {
        let Some(slot) = self.last.get_mut(i) else {
            return false;
        };
        let due = match slot {
            None => true,
            Some(p) => {
                p.quality != sample.quality
                    || changed(deadband, &p.value, &sample.value)
                    || (!self.heartbeat.is_zero() && now.duration_since(p.at) >= self.heartbeat)
            }
        };
        if due {
            *slot = Some(Published {
                value: sample.value.clone(),
                quality: sample.quality,
                at: now,
            });
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good(v: f64) -> Reading {
        Reading::Good {
            value: Value::Float(v),
            source_ts_ms: None,
        }
    }

    fn bad() -> Reading {
        Reading::Bad {
            quality: Quality::BadCommFailure,
            reason: "gone".into(),
        }
    }

    #[test]
    fn first_change_deadband_quality_and_heartbeat() {
        let t0 = Instant::now();
        let mut e = Exceptions::new(1, Duration::from_secs(10));
        let mut step = |r: Reading, at: Duration| {
            let s = e.sample(0, r);
            e.due(0, Some(0.5), &s, t0 + at)
        };
        assert!(step(good(20.0), Duration::ZERO), "the first reading");
        assert!(!step(good(20.0), Duration::from_secs(1)), "unchanged");
        assert!(
            !step(good(20.4), Duration::from_secs(2)),
            "within the deadband"
        );
        assert!(
            step(good(20.6), Duration::from_secs(3)),
            "past the deadband"
        );
        assert!(
            !step(good(20.6), Duration::from_secs(12)),
            "9 s after the last publish"
        );
        assert!(step(good(20.6), Duration::from_secs(13)), "heartbeat");
        assert!(step(bad(), Duration::from_secs(14)), "quality changed");
        assert!(!step(bad(), Duration::from_secs(15)), "still bad");
        assert!(step(good(20.6), Duration::from_secs(16)), "good again");
    }

    #[test]
    fn a_bad_read_keeps_the_last_value_with_its_quality() {
        let t0 = Instant::now();
        let mut e = Exceptions::new(2, Duration::ZERO);
        let s = e.sample(0, good(7.0));
        assert!(e.due(0, None, &s, t0));
        let b = e.sample(0, bad());
        assert_eq!(b.value, Some(Value::Float(7.0)));
        assert_eq!(b.quality, Quality::BadCommFailure);
        // A tag never read has no value to keep.
        assert_eq!(e.sample(1, bad()).value, None);
        // Without a heartbeat an unchanged value is never repeated.
        let s = e.sample(0, good(7.0));
        assert!(!e.due(0, None, &s, t0 + Duration::from_secs(3600)));
    }

    #[test]
    fn without_a_deadband_any_change_counts_and_non_numbers_compare_whole() {
        assert!(changed(
            None,
            &Some(Value::Float(1.0)),
            &Some(Value::Float(1.0001))
        ));
        assert!(!changed(
            Some(0.1),
            &Some(Value::Float(1.0)),
            &Some(Value::Float(1.05))
        ));
        assert!(changed(
            Some(5.0),
            &Some(Value::String("a".into())),
            &Some(Value::String("b".into()))
        ));
        assert!(changed(Some(5.0), &None, &Some(Value::Float(1.0))));
        assert!(!changed(Some(5.0), &None, &None));
    }
}
