//! What flows through ingestion: points to store, rejects for the dead-letter table, and the
//! WAL frames that carry both, with the size limits that keep every row loggable.

use std::borrow::Cow;

use nexus_common::domain::{Value, ValueType};

/// Longest topic of a stored point, in bytes: MQTT's own limit (a Sparkplug metric name can
/// make a longer one, which is rejected).
pub const MAX_TOPIC_BYTES: usize = 65_535;
/// Longest topic stored as a point, in bytes: the UNS limit of the contract. `tags.topic` is
/// indexed, and PostgreSQL refuses an index entry over about 2.7 kB (SQLSTATE 54000); a longer
/// topic is rejected (`bad_topic`) instead of stalling the writer on a batch it can never
/// store.
pub const MAX_STORED_TOPIC_BYTES: usize = nexus_common::topic::MAX_TOPIC_LEN;
/// Longest string value stored, in bytes; a longer one is rejected (`bad_value`).
pub const MAX_VALUE_STR_BYTES: usize = 1024 * 1024;
/// Longest unit (`u`) stored, in bytes; a longer one is rejected (`bad_value`).
pub const MAX_UNIT_BYTES: usize = 256;
/// Longest reject reason, in bytes; a longer detail is shortened at a character boundary.
pub const MAX_REASON_BYTES: usize = 1024;
/// Most payload bytes kept with a reject; the reason says when the payload was longer.
pub const MAX_REJECT_PAYLOAD_BYTES: usize = 1024 * 1024;

/// `s` in at most `max` bytes: whole if it fits, else cut at a character boundary and ended
/// with `…` (when `max` leaves room for it).
pub fn shorten(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return Cow::Borrowed(s);
    }
    // No room for the ellipsis: just the characters that fit.
    let more = if max >= "…".len() { "…" } else { "" };
    let mut end = max - more.len();
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}{more}", &s[..end]))
}

/// One stored point: a row of `points` (through the `metrics` view: time, topic, value,
/// value_str, quality, value_type, unit, source_time).
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub topic: String,
    /// Unix microseconds.
    pub ts_us: i64,
    /// Numeric view of the value (booleans 0/1); `None` for strings and nulls.
    pub value: Option<f64>,
    /// String values.
    pub value_str: Option<String>,
    /// OPC DA quality code (192 good).
    pub quality: i16,
    /// The value's type; `None` for a null whose type nobody declared, and for points of the
    /// WAL's first format.
    pub value_type: Option<ValueType>,
    /// Engineering unit (`u` of the value object).
    pub unit: Option<String>,
    /// The time the source gave the value (`src_ts`, e.g. OPC UA's source timestamp), unix
    /// microseconds.
    pub source_ts_us: Option<i64>,
}

impl Point {
    /// A point of `value` without unit or source time; its type is the value's.
    pub fn new(topic: impl Into<String>, ts_us: i64, value: Option<Value>, quality: i16) -> Point {
        let value_type = value.as_ref().map(Value::value_type);
        let (value_f64, value_str) = match value {
            Some(Value::String(s)) => (None, Some(s)),
            Some(v) => (v.as_f64(), None),
            None => (None, None),
        };
        Point {
            topic: topic.into(),
            ts_us,
            value: value_f64,
            value_str,
            quality,
            value_type,
            unit: None,
            source_ts_us: None,
        }
    }
}

/// A message that could not be stored as points, kept in `ingest_rejects`.
#[derive(Debug, Clone, PartialEq)]
pub struct Reject {
    /// Receive time, unix microseconds.
    pub ts_us: i64,
    pub topic: String,
    /// Short stable reason (also the metric label), then `: ` and the detail.
    pub reason: String,
    pub payload: Vec<u8>,
}

impl Reject {
    /// A reject with reason `label: detail`, its fields within the limits: the reason
    /// shortened at a character boundary, the payload to its first
    /// [`MAX_REJECT_PAYLOAD_BYTES`] (the reason says so).
    pub fn new(ts_us: i64, topic: &str, label: &str, detail: &str, payload: &[u8]) -> Reject {
        let (payload, note) = if payload.len() > MAX_REJECT_PAYLOAD_BYTES {
            (
                &payload[..MAX_REJECT_PAYLOAD_BYTES],
                format!(
                    " (payload of {} bytes, the first {MAX_REJECT_PAYLOAD_BYTES} kept)",
                    payload.len()
                ),
            )
        } else {
            (payload, String::new())
        };
        let reason = if detail.is_empty() {
            label.to_owned()
        } else {
            format!("{label}: {detail}")
        };
        let reason = shorten(&reason, MAX_REASON_BYTES - note.len()) + note.as_str();
        Reject {
            ts_us,
            topic: shorten(topic, MAX_TOPIC_BYTES).into_owned(),
            reason: reason.into_owned(),
            payload: payload.to_vec(),
        }
    }

    /// The label part of `reason` (before the first `:`).
    pub fn label(&self) -> &str {
        self.reason.split(':').next().unwrap_or("")
    }
}

/// What one WAL frame holds. `first_id..=last_id` is normally one id; a frame standing for
/// an unreadable stretch of the log (counted as corrupt) spans the ids it replaces.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Frame {
    pub first_id: u64,
    pub last_id: u64,
    /// When the frame was made durable, unix milliseconds.
    pub written_ms: i64,
    pub points: Vec<Point>,
    pub rejects: Vec<Reject>,
}

impl Frame {
    pub fn rows(&self) -> usize {
        self.points.len() + self.rejects.len()
    }
}

/// About the stored size of records, in bytes (frame sizing, batch metrics).
pub fn approx_bytes(points: &[Point], rejects: &[Reject]) -> usize {
    points
        .iter()
        .map(|p| {
            48 + p.topic.len()
                + p.value_str.as_ref().map_or(0, String::len)
                + p.unit.as_ref().map_or(0, String::len)
        })
        .sum::<usize>()
        + rejects
            .iter()
            .map(|r| 16 + r.topic.len() + r.reason.len() + r.payload.len())
            .sum::<usize>()
}

pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shorten_cuts_at_a_character_boundary() {
        assert_eq!(shorten("abc", 3), "abc");
        assert_eq!(shorten("abcdef", 5), "ab…");
        // Every limit across two-byte characters gives valid UTF-8 within the limit.
        let s = "é".repeat(50);
        for max in 3..s.len() {
            let got = shorten(&s, max);
            assert!(got.len() <= max, "{max}");
            assert!(got.ends_with('…'));
        }
        assert_eq!(shorten("éé", 2), "é", "no room for the ellipsis");
        assert_eq!(shorten("é", 1), "");
    }

    #[test]
    fn rejects_stay_within_the_limits() {
        let quality = "é".repeat(700);
        let r = Reject::new(5, "t/q", "bad_quality", &quality, b"{}");
        assert!(r.reason.len() <= MAX_REASON_BYTES, "{}", r.reason.len());
        assert!(r.reason.starts_with("bad_quality: éé"));
        assert_eq!(r.label(), "bad_quality");
        let big = vec![b'x'; MAX_REJECT_PAYLOAD_BYTES + 10];
        let r = Reject::new(5, "t/p", "bad_json", &quality, &big);
        assert_eq!(r.payload.len(), MAX_REJECT_PAYLOAD_BYTES);
        assert!(r.reason.len() <= MAX_REASON_BYTES);
        assert!(
            r.reason
                .ends_with(" (payload of 1048586 bytes, the first 1048576 kept)"),
            "{}",
            r.reason
        );
        let r = Reject::new(5, "t/s", "empty_payload", "", b"");
        assert_eq!(r.reason, "empty_payload");
    }
}
