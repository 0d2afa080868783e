//! Payloads of any publisher: the format each topic's payloads are read in (`payloads.rules`,
//! the first rule whose filter matches; the contract's value object when none does), and a
//! decoder per format. Ingestion and the alert service read every UNS message through
//! [`Decoder::decode`], so both take the same payloads the same way.
//!
//! | format | payload | value(s) |
//! |---|---|---|
//! | `nexus` | `{"v":21.5,"q":"good","ts":1700000000000}` | the value object ([`super::json`]) |
//! | `scalar` | `42`, `true`, `"on"`, `null` | one, at the receive time, good |
//! | `text` | any UTF-8 text | one string, at the receive time, good |
//! | `umh` | `{"timestamp_ms":1700000000000,"value":21.5}` (UMH Core) | one, on the topic |
//! | `umh` | `{"timestamp_ms":..,"temp":21.5,"head":{"x":1}}` (UMH Classic) | one per key: `<topic>/temp`, `<topic>/head/x` |
//! | `auto` | an object with `v`, else one with `timestamp_ms`, else a JSON scalar | as `nexus`, `umh` or `scalar` |
//! | `mapping` | any JSON | JSON pointers (RFC 6901) to value, timestamp, quality, unit |
//!
//! Every byte is the publisher's: nothing here panics or allocates more than the payload
//! holds, nesting is bounded by serde_json's recursion limit, and one message gives at most
//! `payloads.max_values` values (the rest are counted in the message's error, not kept).
//! A message that gives some values and refuses others returns both: the values, and one
//! error that stands for everything refused.

use std::fmt;
use std::time::UNIX_EPOCH;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value as Json;

use super::json::{decode_bare_value, decode_value_object, PayloadError, ValueObject};
use crate::config::payloads::{check_pointer, PayloadFormat, PayloadsConfig, TimestampUnit};
use crate::domain::{Quality, Value};
use crate::topic::{TopicFilter, MAX_TOPIC_LEN, MAX_TOPIC_LEVELS};

/// Latest timestamp a decoder gives (9999-12-31T23:59:59.999Z), unix ms.
pub const MAX_TS_MS: i64 = 253_402_300_799_999;

/// Why (part of) a message was not taken: the stable label of metrics and dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Not JSON (or nested deeper than serde_json's limit of 128).
    BadJson,
    /// No `v`, no `timestamp_ms`, nothing at the value's pointer, or no value at all.
    MissingField,
    /// A value that is not a scalar, a timestamp or quality of the wrong JSON type.
    BadType,
    /// An unknown quality name or code.
    BadQuality,
    /// A timestamp that is negative, fractional in ms, unreadable or past the year 9999.
    BadTimestamp,
    /// A `text` payload that is not UTF-8.
    BadValue,
    /// A UMH key that is not a topic level, or that makes the topic too long or too deep.
    BadTopic,
    /// More values in one message than `payloads.max_values`.
    TooManyValues,
}

/// Every [`Reason`] label, to create metric series up front.
pub const REASONS: [&str; 8] = [
    "bad_json",
    "missing_field",
    "bad_type",
    "bad_quality",
    "bad_timestamp",
    "bad_value",
    "bad_topic",
    "too_many_values",
];

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::BadJson => "bad_json",
            Reason::MissingField => "missing_field",
            Reason::BadType => "bad_type",
            Reason::BadQuality => "bad_quality",
            Reason::BadTimestamp => "bad_timestamp",
            Reason::BadValue => "bad_value",
            Reason::BadTopic => "bad_topic",
            Reason::TooManyValues => "too_many_values",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What was not taken from a message, and why. The detail may quote the publisher's input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct DecodeError {
    pub reason: Reason,
    pub detail: String,
}

impl DecodeError {
    fn new(reason: Reason, detail: impl Into<String>) -> DecodeError {
        DecodeError {
            reason,
            detail: detail.into(),
        }
    }

    /// The stable label (`bad_json`, ...).
    pub fn reason(&self) -> &'static str {
        self.reason.as_str()
    }
}

impl From<PayloadError> for DecodeError {
    fn from(e: PayloadError) -> DecodeError {
        let reason = match e.reason() {
            "missing_field" => Reason::MissingField,
            "bad_type" => Reason::BadType,
            "bad_quality" => Reason::BadQuality,
            _ => Reason::BadJson,
        };
        DecodeError {
            reason,
            detail: e.0,
        }
    }
}

/// One value of a message.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The value's own topic (UMH Classic: `<topic>/<key>`), or `None` for the message's.
    pub topic: Option<String>,
    pub value: ValueObject,
}

impl Sample {
    /// The topic this value belongs to, given the message's.
    pub fn topic<'a>(&'a self, message_topic: &'a str) -> &'a str {
        self.topic.as_deref().unwrap_or(message_topic)
    }
}

/// What one message gave: its values, and what was refused (all of it when there are no
/// values).
#[derive(Debug, Default, PartialEq)]
pub struct Decoded {
    pub samples: Vec<Sample>,
    pub error: Option<DecodeError>,
}

impl Decoded {
    fn one(r: Result<ValueObject, DecodeError>) -> Decoded {
        match r {
            Ok(value) => Decoded {
                samples: vec![Sample { topic: None, value }],
                error: None,
            },
            Err(e) => Decoded::refused(e),
        }
    }

    fn refused(e: DecodeError) -> Decoded {
        Decoded {
            samples: Vec::new(),
            error: Some(e),
        }
    }
}

/// JSON pointers of a `mapping` rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapping {
    pub value: String,
    pub timestamp: Option<String>,
    pub timestamp_unit: TimestampUnit,
    pub quality: Option<String>,
    pub unit: Option<String>,
}

/// How a topic's payloads are read.
#[derive(Debug, Clone, PartialEq)]
pub enum Format {
    Nexus,
    Scalar,
    Text,
    Umh,
    Auto,
    Mapping(Mapping),
}

/// The formats of `payloads.rules`, compiled: first matching filter wins.
#[derive(Debug, Clone)]
pub struct Decoder {
    rules: Vec<(TopicFilter, Format)>,
    default: Format,
    max_values: usize,
}

impl Default for Decoder {
    /// Every topic as the contract's value object.
    fn default() -> Decoder {
        Decoder {
            rules: Vec::new(),
            default: Format::Nexus,
            max_values: crate::config::payloads::DEFAULT_MAX_VALUES,
        }
    }
}

impl Decoder {
    /// The decoder of a configuration; `Err` names the first problem (a validated
    /// configuration has none).
    pub fn new(cfg: &PayloadsConfig) -> Result<Decoder, String> {
        if cfg.max_values == 0 {
            return Err("payloads.max_values: must be at least 1".into());
        }
        let mut rules = Vec::with_capacity(cfg.rules.len());
        for (i, r) in cfg.rules.iter().enumerate() {
            let at = format!("payloads.rules[{i}]");
            let filter = TopicFilter::parse(&r.filter).map_err(|e| format!("{at}.filter: {e}"))?;
            let format = match r.format {
                PayloadFormat::Nexus => Format::Nexus,
                PayloadFormat::Scalar => Format::Scalar,
                PayloadFormat::Text => Format::Text,
                PayloadFormat::Umh => Format::Umh,
                PayloadFormat::Auto => Format::Auto,
                PayloadFormat::Mapping => {
                    let value = r
                        .value
                        .clone()
                        .ok_or_else(|| format!("{at}.value: format mapping needs it"))?;
                    for p in [&Some(value.clone()), &r.timestamp, &r.quality, &r.unit]
                        .into_iter()
                        .flatten()
                    {
                        check_pointer(p).map_err(|e| format!("{at}: {e}"))?;
                    }
                    Format::Mapping(Mapping {
                        value,
                        timestamp: r.timestamp.clone(),
                        timestamp_unit: r.timestamp_unit.unwrap_or_default(),
                        quality: r.quality.clone(),
                        unit: r.unit.clone(),
                    })
                }
            };
            rules.push((filter, format));
        }
        Ok(Decoder {
            rules,
            default: Format::Nexus,
            max_values: cfg.max_values,
        })
    }

    /// The format of `topic`'s payloads.
    pub fn format(&self, topic: &str) -> &Format {
        self.rules
            .iter()
            .find(|(f, _)| f.matches(topic))
            .map(|(_, fmt)| fmt)
            .unwrap_or(&self.default)
    }

    /// Filters of the rules whose messages may hold values of topics below their own (`umh`
    /// and `auto`): a subscriber to the values' topics needs these messages too.
    pub fn splitting_filters(&self) -> Vec<String> {
        self.rules
            .iter()
            .filter(|(_, f)| matches!(f, Format::Umh | Format::Auto))
            .map(|(f, _)| f.as_str().to_owned())
            .collect()
    }

    /// Read one message published on `topic`.
    pub fn decode(&self, topic: &str, payload: &[u8]) -> Decoded {
        self.decode_as(self.format(topic), topic, payload)
    }

    /// Read one message published on `topic` in `format`.
    pub fn decode_as(&self, format: &Format, topic: &str, payload: &[u8]) -> Decoded {
        match format {
            Format::Nexus => Decoded::one(decode_value_object(payload).map_err(Into::into)),
            Format::Scalar => Decoded::one(scalar(payload)),
            Format::Text => Decoded::one(text(payload)),
            Format::Umh => umh(topic, payload, self.max_values).decoded(),
            Format::Auto => self.auto(topic, payload),
            Format::Mapping(m) => Decoded::one(mapping(m, payload)),
        }
    }

    fn auto(&self, topic: &str, payload: &[u8]) -> Decoded {
        let first = payload.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'{') {
            return Decoded::one(scalar(payload));
        }
        let vo = match decode_value_object(payload) {
            Ok(o) => return Decoded::one(Ok(o)),
            Err(e) => DecodeError::from(e),
        };
        // Not a valid value object: UMH when it has timestamp_ms and no v.
        let u = umh(topic, payload, self.max_values);
        match u.shape {
            Shape::Object {
                has_v: false,
                has_ts: true,
            } => u.decoded(),
            Shape::Object {
                has_v: false,
                has_ts: false,
            } => Decoded::refused(DecodeError::new(
                Reason::MissingField,
                "an object needs v (a value object) or timestamp_ms (UMH)",
            )),
            _ => Decoded::refused(vo),
        }
    }
}

fn plain(value: Option<Value>) -> ValueObject {
    ValueObject {
        value,
        quality: Quality::Good,
        ts_ms: None,
        source_ts_ms: None,
        unit: None,
    }
}

fn scalar(payload: &[u8]) -> Result<ValueObject, DecodeError> {
    decode_bare_value(payload)
        .map(plain)
        .map_err(DecodeError::from)
}

fn text(payload: &[u8]) -> Result<ValueObject, DecodeError> {
    match std::str::from_utf8(payload) {
        Ok(s) => Ok(plain(Some(Value::String(s.to_owned())))),
        Err(e) => Err(DecodeError::new(
            Reason::BadValue,
            format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.valid_up_to()
            ),
        )),
    }
}

/// A JSON scalar as a value; `Err` names the JSON type that is not one.
fn json_scalar(v: &Json) -> Result<Option<Value>, &'static str> {
    Ok(match v {
        Json::Null => None,
        Json::Bool(b) => Some(Value::Bool(*b)),
        Json::Number(n) => Some(number(n)),
        Json::String(s) => Some(Value::String(s.clone())),
        Json::Array(_) => return Err("a list"),
        Json::Object(_) => return Err("an object"),
    })
}

fn number(n: &serde_json::Number) -> Value {
    if let Some(i) = n.as_i64() {
        Value::Int(i)
    } else if let Some(u) = n.as_u64() {
        Value::UInt(u)
    } else {
        // serde_json never holds a non-finite number read from JSON text.
        Value::Float(n.as_f64().unwrap_or(f64::NAN))
    }
}

fn ts_range(ms: i64) -> Result<i64, DecodeError> {
    if (0..=MAX_TS_MS).contains(&ms) {
        Ok(ms)
    } else {
        Err(DecodeError::new(
            Reason::BadTimestamp,
            format!("timestamp {ms} ms is before 1970 or past the year 9999"),
        ))
    }
}

/// A number of `unit`s since the epoch, in ms (rounded down).
fn numeric_ms(n: &Json, unit: TimestampUnit, what: &str) -> Result<i64, DecodeError> {
    let out_of_range = || {
        DecodeError::new(
            Reason::BadTimestamp,
            format!("{what} {n} is before 1970 or past the year 9999"),
        )
    };
    let int = match n {
        Json::Number(x) => x.as_i64(),
        Json::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    let float = match n {
        Json::Number(x) => x.as_f64(),
        Json::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    let ms = match (int, float) {
        (Some(i), _) => match unit {
            TimestampUnit::S => i.checked_mul(1000),
            TimestampUnit::Ms => Some(i),
            TimestampUnit::Us => Some(i.div_euclid(1000)),
            TimestampUnit::Ns => Some(i.div_euclid(1_000_000)),
            TimestampUnit::Rfc3339 => None,
        },
        (None, Some(f)) => {
            let ms = match unit {
                TimestampUnit::S => f * 1e3,
                TimestampUnit::Ms => f,
                TimestampUnit::Us => f / 1e3,
                TimestampUnit::Ns => f / 1e6,
                TimestampUnit::Rfc3339 => f64::NAN,
            }
            .floor();
            // Past i64 (or not finite) is out of range anyway.
            (ms.is_finite() && ms.abs() < 9.2e18).then_some(ms as i64)
        }
        (None, None) => {
            return Err(DecodeError::new(
                Reason::BadType,
                format!("{what} is not a number: {}", json_kind(n)),
            ))
        }
    };
    ms.ok_or_else(out_of_range)
        .and_then(|ms| ts_range(ms).map_err(|_| out_of_range()))
}

fn json_kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "an object",
    }
}

/// RFC 3339 text (`Z` or a `±hh:mm` offset) in unix ms.
fn rfc3339_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let (base, offset_min): (String, i64) = if matches!(b.last(), Some(b'Z' | b'z')) {
        (format!("{}Z", &s[..s.len() - 1]), 0)
    } else {
        let cut = s.len().checked_sub(6)?;
        if !s.is_char_boundary(cut) || b.get(cut + 3) != Some(&b':') {
            return None;
        }
        let sign = match b[cut] {
            b'+' => 1,
            b'-' => -1,
            _ => return None,
        };
        let digits = |r: std::ops::Range<usize>| -> Option<i64> {
            let t = s.get(r)?;
            if t.bytes().all(|c| c.is_ascii_digit()) {
                t.parse().ok()
            } else {
                None
            }
        };
        let (h, m) = (digits(cut + 1..cut + 3)?, digits(cut + 4..cut + 6)?);
        if h > 23 || m > 59 {
            return None;
        }
        (format!("{}Z", &s[..cut]), sign * (h * 60 + m))
    };
    let t = humantime::parse_rfc3339(&base).ok()?;
    let ms = i64::try_from(t.duration_since(UNIX_EPOCH).ok()?.as_millis()).ok()?;
    Some(ms - offset_min * 60_000)
}

fn mapping(m: &Mapping, payload: &[u8]) -> Result<ValueObject, DecodeError> {
    let doc: Json = serde_json::from_slice(payload)
        .map_err(|e| DecodeError::new(Reason::BadJson, e.to_string()))?;
    // Absent and null are the same for the optional fields: the default applies.
    let get = |p: &Option<String>| {
        p.as_deref()
            .and_then(|p| doc.pointer(p))
            .filter(|v| !v.is_null())
    };
    let v = doc.pointer(&m.value).ok_or_else(|| {
        DecodeError::new(
            Reason::MissingField,
            format!("nothing at the value pointer {:?}", m.value),
        )
    })?;
    let value = json_scalar(v).map_err(|kind| {
        DecodeError::new(
            Reason::BadType,
            format!(
                "the value at {:?} is {kind}, not a number, bool, string or null",
                m.value
            ),
        )
    })?;
    if let Some(Value::Float(f)) = &value {
        if !f.is_finite() {
            return Err(DecodeError::new(Reason::BadType, "not a finite number"));
        }
    }
    let ts_ms = match get(&m.timestamp) {
        None => None,
        Some(t) if m.timestamp_unit == TimestampUnit::Rfc3339 => {
            let Json::String(s) = t else {
                return Err(DecodeError::new(
                    Reason::BadType,
                    format!("the timestamp is {}, not RFC 3339 text", json_kind(t)),
                ));
            };
            let ms = rfc3339_ms(s).ok_or_else(|| {
                DecodeError::new(
                    Reason::BadTimestamp,
                    format!("{s:?} is not an RFC 3339 time (2024-05-01T12:00:00Z, ...+02:00) from 1970 on"),
                )
            })?;
            Some(ts_range(ms)?)
        }
        Some(t) => Some(numeric_ms(t, m.timestamp_unit, "the timestamp")?),
    };
    let quality = match get(&m.quality) {
        None => Quality::Good,
        Some(Json::String(s)) => s.parse().map_err(|e: crate::domain::UnknownQuality| {
            DecodeError::new(Reason::BadQuality, e.to_string())
        })?,
        Some(Json::Number(n)) => match n.as_u64().filter(|c| *c <= 255) {
            Some(code) => Quality::from_code(code as i16),
            None => {
                return Err(DecodeError::new(
                    Reason::BadQuality,
                    format!("quality code {n} is not an OPC DA code (0-255)"),
                ))
            }
        },
        Some(q) => {
            return Err(DecodeError::new(
                Reason::BadType,
                format!(
                    "the quality is {}, not a name or an OPC DA code",
                    json_kind(q)
                ),
            ))
        }
    };
    let unit = match get(&m.unit) {
        None => None,
        Some(Json::String(s)) => Some(s.clone()),
        Some(u) => {
            return Err(DecodeError::new(
                Reason::BadType,
                format!("the unit is {}, not text", json_kind(u)),
            ))
        }
    };
    Ok(ValueObject {
        value,
        quality,
        ts_ms,
        source_ts_ms: None,
        unit,
    })
}

// ---- UMH ----

/// What the top of a payload looked like (for `auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// Not JSON, or JSON that is not an object.
    Other,
    Object {
        has_v: bool,
        has_ts: bool,
    },
}

/// The state of one UMH message being read: the values taken so far, bounded, and what was
/// refused.
struct Umh<'t> {
    topic: &'t str,
    topic_levels: usize,
    max: usize,
    /// Key path below the topic (`head/pos/x`) and value, in payload order.
    values: Vec<(String, Option<Value>)>,
    /// The key path being read, `/`-joined.
    path: String,
    depth: usize,
    /// Values (or subtrees) refused, and the first reason.
    refused: usize,
    first: Option<DecodeError>,
    /// Values past `max`, not taken.
    over: usize,
    ts: Option<Result<i64, DecodeError>>,
    top_keys: usize,
    shape: Shape,
    /// A syntax error: nothing is taken.
    fatal: Option<DecodeError>,
}

impl Umh<'_> {
    fn refuse(&mut self, reason: Reason, detail: impl FnOnce() -> String) {
        self.refused += 1;
        if self.first.is_none() {
            self.first = Some(DecodeError::new(reason, detail()));
        }
    }

    fn leaf(&mut self, value: Option<Value>) {
        if let Some(Value::Float(f)) = value {
            if !f.is_finite() {
                let at = self.path.clone();
                return self.refuse(Reason::BadType, || {
                    format!("key {at:?}: not a finite number")
                });
            }
        }
        if self.values.len() >= self.max {
            self.over += 1;
            return;
        }
        self.values.push((self.path.clone(), value));
    }

    /// Enter key `key`; false (refused, counted) when it cannot be a topic level here.
    fn enter(&mut self, key: &str) -> bool {
        let problem = if key.is_empty() {
            Some("an empty key is not a topic level".to_owned())
        } else if let Some(c) = key
            .chars()
            .find(|c| matches!(c, '/' | '+' | '#') || c.is_control())
        {
            Some(format!(
                "key {:?} has {c:?}, which a topic level may not hold",
                clip(key)
            ))
        } else if self.topic_levels + self.depth + 1 > MAX_TOPIC_LEVELS {
            Some(format!(
                "key {:?} makes a topic of more than {MAX_TOPIC_LEVELS} levels",
                clip(key)
            ))
        } else if self.topic.len()
            + 1
            + self.path.len()
            + usize::from(!self.path.is_empty())
            + key.len()
            > MAX_TOPIC_LEN
        {
            Some(format!(
                "key {:?} makes a topic longer than {MAX_TOPIC_LEN} bytes",
                clip(key)
            ))
        } else {
            None
        };
        if let Some(p) = problem {
            self.refuse(Reason::BadTopic, || p);
            return false;
        }
        if !self.path.is_empty() {
            self.path.push('/');
        }
        self.path.push_str(key);
        self.depth += 1;
        true
    }

    fn leave(&mut self, key_len: usize) {
        let keep = self
            .path
            .len()
            .saturating_sub(key_len + usize::from(self.depth > 1));
        self.path.truncate(keep);
        self.depth -= 1;
    }

    fn decoded(self) -> Decoded {
        if let Some(e) = self.fatal {
            return Decoded::refused(e);
        }
        if self.shape == Shape::Other {
            return Decoded::refused(DecodeError::new(
                Reason::BadType,
                "a UMH payload is a JSON object with timestamp_ms",
            ));
        }
        let ts = match self.ts {
            None => {
                return Decoded::refused(DecodeError::new(
                    Reason::MissingField,
                    "missing field `timestamp_ms`",
                ))
            }
            Some(Err(e)) => return Decoded::refused(e),
            Some(Ok(ts)) => ts,
        };
        let total = self.values.len() + self.refused + self.over;
        if total == 0 {
            return Decoded::refused(DecodeError::new(
                Reason::MissingField,
                "no value besides timestamp_ms",
            ));
        }
        // UMH Core: exactly timestamp_ms and a scalar value, which is the topic's own.
        let core = self.top_keys == 2
            && total == 1
            && self.values.len() == 1
            && self.values[0].0 == "value";
        let topic = self.topic;
        let samples = self
            .values
            .into_iter()
            .map(|(path, value)| Sample {
                topic: (!core).then(|| format!("{topic}/{path}")),
                value: ValueObject {
                    ts_ms: Some(ts),
                    ..plain(value)
                },
            })
            .collect();
        let error = match (self.over, self.first) {
            (0, None) => None,
            (0, Some(e)) if total == 1 => Some(e),
            (0, Some(e)) => Some(DecodeError::new(
                e.reason,
                format!("{} of {total} values not taken: {}", self.refused, e.detail),
            )),
            (over, first) => Some(DecodeError::new(
                Reason::TooManyValues,
                format!(
                    "{over} of {total} values not taken: more than payloads.max_values ({}) in one message{}",
                    self.max,
                    match first {
                        Some(e) => format!("; {} more refused ({}: {})", self.refused, e.reason, e.detail),
                        None => String::new(),
                    }
                ),
            )),
        };
        Decoded { samples, error }
    }
}

/// At most 64 characters of a key, for messages.
fn clip(key: &str) -> &str {
    match key.char_indices().nth(64) {
        Some((i, _)) => &key[..i],
        None => key,
    }
}

fn umh<'t>(topic: &'t str, payload: &[u8], max: usize) -> Umh<'t> {
    let mut u = Umh {
        topic,
        topic_levels: topic.split('/').count(),
        max,
        values: Vec::new(),
        path: String::new(),
        depth: 0,
        refused: 0,
        first: None,
        over: 0,
        ts: None,
        top_keys: 0,
        shape: Shape::Other,
        fatal: None,
    };
    let mut de = serde_json::Deserializer::from_slice(payload);
    let r = de.deserialize_any(Top(&mut u)).and_then(|()| de.end());
    if let Err(e) = r {
        u.fatal = Some(DecodeError::new(Reason::BadJson, e.to_string()));
    }
    u
}

/// The top of a UMH payload: an object.
struct Top<'a, 't>(&'a mut Umh<'t>);

impl<'de> Visitor<'de> for Top<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let u = self.0;
        let (mut has_v, mut has_ts) = (false, false);
        while let Some(key) = map.next_key::<String>()? {
            u.top_keys += 1;
            if key == "timestamp_ms" {
                has_ts = true;
                let t: Json = map.next_value()?;
                u.ts = Some(umh_ts(&t));
                continue;
            }
            has_v |= key == "v";
            if u.enter(&key) {
                map.next_value_seed(Node(u))?;
                u.leave(key.len());
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        u.shape = Shape::Object { has_v, has_ts };
        Ok(())
    }

    // Anything else is not a UMH payload (the shape stays Other); its syntax is still read.
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }
}

/// UMH's `timestamp_ms`: unix ms, an integer (or a float without a fraction).
fn umh_ts(t: &Json) -> Result<i64, DecodeError> {
    let Json::Number(n) = t else {
        return Err(DecodeError::new(
            Reason::BadType,
            format!("timestamp_ms is {}, not a number", json_kind(t)),
        ));
    };
    let ms = match (n.as_i64(), n.as_f64()) {
        (Some(i), _) => Some(i),
        (None, Some(f)) if f.fract() == 0.0 && f.abs() < 9.2e18 => Some(f as i64),
        _ => None,
    };
    match ms {
        Some(ms) => ts_range(ms),
        None => Err(DecodeError::new(
            Reason::BadTimestamp,
            format!("timestamp_ms {n} is not a whole number of milliseconds"),
        )),
    }
}

/// A value under a UMH key: a scalar, or an object of more keys (UMH Classic's JSON tag
/// groups).
struct Node<'a, 't>(&'a mut Umh<'t>);

impl<'de> DeserializeSeed<'de> for Node<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a number, bool, string, null or object")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.0.leaf(Some(Value::Bool(v)));
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.0.leaf(Some(Value::Int(v)));
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.0.leaf(Some(match i64::try_from(v) {
            Ok(i) => Value::Int(i),
            Err(_) => Value::UInt(v),
        }));
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.0.leaf(Some(Value::Float(v)));
        Ok(())
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.0.leaf(Some(Value::String(v.to_owned())));
        Ok(())
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<(), E> {
        self.0.leaf(Some(Value::String(v)));
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.0.leaf(None);
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        let at = self.0.path.clone();
        self.0.refuse(Reason::BadType, || {
            format!("key {:?}: a list is not a value", clip(&at))
        });
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let u = self.0;
        while let Some(key) = map.next_key::<String>()? {
            if u.enter(&key) {
                map.next_value_seed(Node(u))?;
                u.leave(key.len());
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::payloads::PayloadRule;
    use proptest::prelude::*;

    const TOPIC: &str = "acme/site/line/dev";
    const T: i64 = 1_700_000_000_000;

    fn rule(filter: &str, format: PayloadFormat) -> PayloadRule {
        PayloadRule {
            filter: filter.into(),
            format,
            value: None,
            timestamp: None,
            timestamp_unit: None,
            quality: None,
            unit: None,
        }
    }

    fn decoder(format: PayloadFormat) -> Decoder {
        Decoder::new(&PayloadsConfig {
            rules: vec![rule("#", format)],
            ..PayloadsConfig::default()
        })
        .unwrap()
    }

    fn mapped(m: Mapping) -> Decoder {
        Decoder {
            rules: vec![(TopicFilter::parse("#").unwrap(), Format::Mapping(m))],
            ..Decoder::default()
        }
    }

    fn map(value: &str, ts: Option<(&str, TimestampUnit)>) -> Mapping {
        Mapping {
            value: value.into(),
            timestamp: ts.map(|(p, _)| p.to_owned()),
            timestamp_unit: ts.map(|(_, u)| u).unwrap_or_default(),
            quality: None,
            unit: None,
        }
    }

    /// The one value of a message that must give exactly one and refuse nothing.
    fn one(d: &Decoder, payload: &[u8]) -> ValueObject {
        let got = d.decode(TOPIC, payload);
        assert_eq!(got.error, None, "{}", String::from_utf8_lossy(payload));
        assert_eq!(got.samples.len(), 1);
        assert_eq!(got.samples[0].topic, None);
        got.samples.into_iter().next().unwrap().value
    }

    /// The reason a message is refused whole.
    fn refused(d: &Decoder, payload: &[u8]) -> DecodeError {
        let got = d.decode(TOPIC, payload);
        assert!(
            got.samples.is_empty(),
            "{}: {:?}",
            String::from_utf8_lossy(payload),
            got.samples
        );
        got.error.expect("an error")
    }

    /// (topic, value, ts) of each value of a message.
    fn values(got: &Decoded) -> Vec<(String, Option<Value>, Option<i64>)> {
        got.samples
            .iter()
            .map(|s| {
                (
                    s.topic(TOPIC).to_owned(),
                    s.value.value.clone(),
                    s.value.ts_ms,
                )
            })
            .collect()
    }

    #[test]
    fn nexus_is_the_value_object_and_the_default() {
        let d = Decoder::default();
        let o = one(
            &d,
            br#"{"v":21.5,"q":"uncertain","ts":1700000000000,"u":"degC"}"#,
        );
        assert_eq!(o.value, Some(Value::Float(21.5)));
        assert_eq!(o.quality, Quality::Uncertain);
        assert_eq!((o.ts_ms, o.unit.as_deref()), (Some(T), Some("degC")));
        for (payload, reason) in [
            (&b"{\"v\":"[..], "bad_json"),
            (b"42", "bad_type"),
            (b"{\"q\":\"good\"}", "missing_field"),
            (b"{\"v\":[1]}", "bad_type"),
            (b"{\"v\":1,\"q\":\"great\"}", "bad_quality"),
            (br#"{"timestamp_ms":1,"value":2}"#, "missing_field"),
        ] {
            assert_eq!(refused(&d, payload).reason(), reason);
        }
    }

    #[test]
    fn scalar_takes_bare_json_at_the_receive_time() {
        let d = decoder(PayloadFormat::Scalar);
        for (payload, want) in [
            (&b"42"[..], Some(Value::Int(42))),
            (b" -7 ", Some(Value::Int(-7))),
            (b"21.5", Some(Value::Float(21.5))),
            (b"18446744073709551615", Some(Value::UInt(u64::MAX))),
            (b"true", Some(Value::Bool(true))),
            (b"\"running\"", Some(Value::String("running".into()))),
            (b"null", None),
        ] {
            let o = one(&d, payload);
            assert_eq!(o.value, want);
            assert_eq!((o.quality, o.ts_ms), (Quality::Good, None));
        }
        assert_eq!(refused(&d, b"running").reason(), "bad_json");
        assert_eq!(refused(&d, b"").reason(), "bad_json");
        assert_eq!(refused(&d, br#"{"v":1}"#).reason(), "bad_type");
        assert_eq!(refused(&d, b"[1,2]").reason(), "bad_type");
        assert_eq!(refused(&d, b"1e999").reason(), "bad_json");
    }

    #[test]
    fn text_takes_the_payload_as_a_string() {
        let d = decoder(PayloadFormat::Text);
        let o = one(&d, "running – ok".as_bytes());
        assert_eq!(o.value, Some(Value::String("running – ok".into())));
        assert_eq!(one(&d, b"42").value, Some(Value::String("42".into())));
        let e = refused(&d, b"ab\xffcd");
        assert_eq!(e.reason(), "bad_value");
        assert!(e.detail.contains("offset 2"), "{e}");
    }

    #[test]
    fn umh_core_is_one_value_on_the_topic() {
        let d = decoder(PayloadFormat::Umh);
        let o = one(&d, br#"{"timestamp_ms":1700000000000,"value":23.4}"#);
        assert_eq!((o.value, o.ts_ms), (Some(Value::Float(23.4)), Some(T)));
        assert_eq!(o.quality, Quality::Good);
        let o = one(&d, br#"{"value":"running","timestamp_ms":1.7e12}"#);
        assert_eq!(
            (o.value, o.ts_ms),
            (Some(Value::String("running".into())), Some(T))
        );
        assert_eq!(
            one(&d, br#"{"timestamp_ms":0,"value":true}"#).value,
            Some(Value::Bool(true))
        );
        for (payload, reason) in [
            (&br#"{"value":1}"#[..], "missing_field"),
            (br#"{"timestamp_ms":1700000000000}"#, "missing_field"),
            (br#"{"timestamp_ms":"1700000000000","value":1}"#, "bad_type"),
            (
                br#"{"timestamp_ms":1700000000000.5,"value":1}"#,
                "bad_timestamp",
            ),
            (br#"{"timestamp_ms":-1,"value":1}"#, "bad_timestamp"),
            (
                br#"{"timestamp_ms":253402300800000,"value":1}"#,
                "bad_timestamp",
            ),
            (br#"{"timestamp_ms":1,"value":[1]}"#, "bad_type"),
            (b"42", "bad_type"),
            (b"{\"timestamp_ms\":1,", "bad_json"),
            (br#"{"timestamp_ms":1,"value":1} x"#, "bad_json"),
        ] {
            assert_eq!(
                refused(&d, payload).reason(),
                reason,
                "{}",
                String::from_utf8_lossy(payload)
            );
        }
    }

    #[test]
    fn umh_classic_gives_one_value_per_key_below_the_topic() {
        let d = decoder(PayloadFormat::Umh);
        let got = d.decode(
            TOPIC,
            br#"{"timestamp_ms":1700000000000,"temperature_c":154.1,"pressure_bar":5,"notes":"sensor 1 is faulty","door":false,"lost":null}"#,
        );
        assert_eq!(got.error, None);
        let t = |k: &str| format!("{TOPIC}/{k}");
        assert_eq!(
            values(&got),
            vec![
                (t("temperature_c"), Some(Value::Float(154.1)), Some(T)),
                (t("pressure_bar"), Some(Value::Int(5)), Some(T)),
                (
                    t("notes"),
                    Some(Value::String("sensor 1 is faulty".into())),
                    Some(T)
                ),
                (t("door"), Some(Value::Bool(false)), Some(T)),
                (t("lost"), None, Some(T)),
            ]
        );
        // JSON tag groups are topic levels, as UMH Classic documents: the same three values
        // as publishing {"x","y","z"} on <topic>/head/pos.
        let got = d.decode(
            TOPIC,
            br#"{"head":{"pos":{"x":12.5,"y":7.3,"z":3.2}},"timestamp_ms":1700000000000,"value":1}"#,
        );
        assert_eq!(got.error, None);
        let topics: Vec<String> = values(&got).into_iter().map(|v| v.0).collect();
        assert_eq!(
            topics,
            [
                t("head/pos/x"),
                t("head/pos/y"),
                t("head/pos/z"),
                t("value")
            ],
            "with other keys, value is a tag like any other"
        );
    }

    #[test]
    fn umh_keys_that_are_not_topic_levels_are_refused_and_the_rest_taken() {
        let d = decoder(PayloadFormat::Umh);
        let got = d.decode(
            TOPIC,
            br##"{"timestamp_ms":1700000000000,"ok":1,"a/b":2,"+":3,"":4,"list":[1,2],"g":{"#":5,"fine":6}}"##,
        );
        let topics: Vec<String> = values(&got).into_iter().map(|v| v.0).collect();
        assert_eq!(topics, [format!("{TOPIC}/ok"), format!("{TOPIC}/g/fine")]);
        let e = got.error.expect("the refused keys");
        assert_eq!(e.reason(), "bad_topic");
        assert!(
            e.detail.starts_with("5 of 7 values not taken: key \"a/b\""),
            "{e}"
        );
        // One bad value alone is the message's error as it is.
        let e = refused(&d, br#"{"timestamp_ms":1,"a\u0000b":1}"#);
        assert_eq!(e.reason(), "bad_topic");
        assert!(e.detail.starts_with("key \"a\\0b\" has '\\0'"), "{e}");
        // Too deep, too long.
        let deep = format!(
            "{{\"timestamp_ms\":1,{}\"k\":1{}}}",
            "\"k\":{".repeat(40),
            "}".repeat(40)
        );
        let e = refused(&d, deep.as_bytes());
        assert_eq!(e.reason(), "bad_topic");
        assert!(e.detail.contains("more than 32 levels"), "{e}");
        let long = format!("{{\"timestamp_ms\":1,\"{}\":1}}", "k".repeat(MAX_TOPIC_LEN));
        let e = refused(&d, long.as_bytes());
        assert!(e.detail.contains("longer than 1024 bytes"), "{e}");
        let fits = format!(
            "{{\"timestamp_ms\":1,\"{}\":1}}",
            "k".repeat(MAX_TOPIC_LEN - TOPIC.len() - 1)
        );
        let got = d.decode(TOPIC, fits.as_bytes());
        assert_eq!(got.samples[0].topic(TOPIC).len(), MAX_TOPIC_LEN);
        // Nesting past serde_json's limit is a syntax error, not a stack overflow.
        let abyss = format!(
            "{{\"timestamp_ms\":1,\"k\":{}{}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(refused(&d, abyss.as_bytes()).reason(), "bad_json");
    }

    /// A hostile UMH object: 100,000 keys give `max_values` values, and the rest is counted
    /// in the message's error, not kept.
    #[test]
    fn a_huge_umh_object_gives_at_most_max_values() {
        let mut body = String::from("{\"timestamp_ms\":1700000000000");
        for i in 0..100_000 {
            body.push_str(&format!(",\"k{i}\":{i}"));
        }
        body.push('}');
        let d = decoder(PayloadFormat::Umh);
        let got = d.decode(TOPIC, body.as_bytes());
        assert_eq!(got.samples.len(), 1000);
        assert_eq!(got.samples[999].topic(TOPIC), format!("{TOPIC}/k999"));
        let e = got.error.expect("the rest is refused");
        assert_eq!(e.reason(), "too_many_values");
        assert!(
            e.detail.starts_with(
                "99000 of 100000 values not taken: more than payloads.max_values (1000)"
            ),
            "{e}"
        );
        let small = Decoder::new(&PayloadsConfig {
            max_values: 2,
            rules: vec![rule("#", PayloadFormat::Umh)],
        })
        .unwrap();
        let got = small.decode(TOPIC, br#"{"timestamp_ms":1,"a":1,"b":[2],"c":3,"d":4}"#);
        assert_eq!(got.samples.len(), 2);
        let e = got.error.unwrap();
        assert_eq!(e.reason(), "too_many_values");
        assert!(
            e.detail
                .contains("1 more refused (bad_type: key \"b\": a list"),
            "{e}"
        );
    }

    #[test]
    fn auto_tells_value_objects_umh_and_scalars_apart() {
        let d = decoder(PayloadFormat::Auto);
        assert_eq!(one(&d, br#"{"v":1,"ts":5}"#).ts_ms, Some(5));
        // An object with v is a value object, whatever else it holds.
        assert_eq!(one(&d, br#"{"v":1,"timestamp_ms":5}"#).ts_ms, None);
        assert_eq!(
            refused(&d, br#"{"v":1,"q":"great"}"#).reason(),
            "bad_quality"
        );
        assert_eq!(
            refused(&d, br#"{"v":{"a":1},"timestamp_ms":5}"#).reason(),
            "bad_type"
        );
        let o = one(&d, br#"{"timestamp_ms":1700000000000,"value":23.4}"#);
        assert_eq!((o.value, o.ts_ms), (Some(Value::Float(23.4)), Some(T)));
        // A UMH Classic object whose tags are named like value object fields.
        let got = d.decode(TOPIC, br#"{"timestamp_ms":1700000000000,"q":1,"u":2}"#);
        assert_eq!(got.error, None);
        assert_eq!(
            values(&got)[1],
            (format!("{TOPIC}/u"), Some(Value::Int(2)), Some(T))
        );
        assert_eq!(one(&d, b" 42").value, Some(Value::Int(42)));
        assert_eq!(one(&d, b"false").value, Some(Value::Bool(false)));
        let e = refused(&d, br#"{"temperature":1}"#);
        assert_eq!(e.reason(), "missing_field");
        assert!(e
            .detail
            .contains("needs v (a value object) or timestamp_ms (UMH)"));
        assert_eq!(refused(&d, b"{\"v\":").reason(), "bad_json");
        assert_eq!(refused(&d, b"[1]").reason(), "bad_type");
        assert_eq!(refused(&d, b"garbage").reason(), "bad_json");
    }

    #[test]
    fn mapping_reads_value_time_quality_and_unit_by_pointer() {
        let mut m = map("/data/value", Some(("/data/time", TimestampUnit::S)));
        m.quality = Some("/data/status".into());
        m.unit = Some("/meta/unit".into());
        let d = mapped(m);
        let o = one(
            &d,
            br#"{"data":{"value":7.5,"time":1700000000.25,"status":"uncertain"},"meta":{"unit":"bar"}}"#,
        );
        assert_eq!(o.value, Some(Value::Float(7.5)));
        assert_eq!(o.ts_ms, Some(T + 250));
        assert_eq!(o.quality, Quality::Uncertain);
        assert_eq!(o.unit.as_deref(), Some("bar"));
        // Absent or null optional fields take their defaults.
        let o = one(&d, br#"{"data":{"value":true,"time":null}}"#);
        assert_eq!((o.ts_ms, o.quality, o.unit), (None, Quality::Good, None));
        // OPC DA codes, and their class when the sub-code is unknown.
        let o = one(&d, br#"{"data":{"value":1,"status":24}}"#);
        assert_eq!(o.quality, Quality::BadCommFailure);
        assert_eq!(
            one(&d, br#"{"data":{"value":1,"status":193}}"#).quality,
            Quality::Good
        );
        for (payload, reason) in [
            (&br#"{"data":{}}"#[..], "missing_field"),
            (br#"{"data":{"value":{"x":1}}}"#, "bad_type"),
            (br#"{"data":{"value":1,"status":"fine"}}"#, "bad_quality"),
            (br#"{"data":{"value":1,"status":256}}"#, "bad_quality"),
            (br#"{"data":{"value":1,"status":true}}"#, "bad_type"),
            (br#"{"data":{"value":1},"meta":{"unit":5}}"#, "bad_type"),
            (br#"{"data":{"value":1,"time":"soon"}}"#, "bad_type"),
            (br#"{"data":{"value":1,"time":-5}}"#, "bad_timestamp"),
            (br#"{"data":{"value":1,"time":1e300}}"#, "bad_timestamp"),
            (b"not json", "bad_json"),
        ] {
            assert_eq!(
                refused(&d, payload).reason(),
                reason,
                "{}",
                String::from_utf8_lossy(payload)
            );
        }
        // The whole payload, an array element, escaped keys.
        assert_eq!(one(&mapped(map("", None)), b"5").value, Some(Value::Int(5)));
        let d = mapped(map("/readings/1/a~1b~0c", None));
        assert_eq!(
            one(&d, br#"{"readings":[{},{"a/b~c":"x"}]}"#).value,
            Some(Value::String("x".into()))
        );
    }

    #[test]
    fn mapped_timestamps_in_every_unit() {
        let at = |unit, raw: &str| {
            let d = mapped(map("/v", Some(("/t", unit))));
            let payload = format!("{{\"v\":1,\"t\":{raw}}}");
            d.decode(TOPIC, payload.as_bytes())
                .samples
                .first()
                .and_then(|s| s.value.ts_ms)
        };
        use TimestampUnit::*;
        assert_eq!(at(S, "1700000000"), Some(T));
        assert_eq!(at(S, "\"1700000000\""), Some(T), "a number in a string");
        assert_eq!(at(S, "1700000000.9999"), Some(T + 999));
        assert_eq!(at(Ms, "1700000000000"), Some(T));
        assert_eq!(at(Ms, "1700000000000.7"), Some(T));
        assert_eq!(at(Us, "1700000000000999"), Some(T));
        assert_eq!(at(Ns, "1700000000000999999"), Some(T));
        assert_eq!(at(S, "9223372036854775807"), None, "overflows as ms");
        assert_eq!(at(Ns, "18446744073709551615"), Some(18_446_744_073_709));
        assert_eq!(at(Rfc3339, "\"2023-11-14T22:13:20Z\""), Some(T));
        assert_eq!(at(Rfc3339, "\"2023-11-14T22:13:20.250z\""), Some(T + 250));
        assert_eq!(at(Rfc3339, "\"2023-11-15T00:13:20+02:00\""), Some(T));
        assert_eq!(
            at(Rfc3339, "\"2023-11-14T17:43:20.5-04:30\""),
            Some(T + 500)
        );
        assert_eq!(at(Rfc3339, "\"2023-11-14T22:13:20+00:00\""), Some(T));
        for bad in [
            "\"2023-11-14T22:13:20\"",
            "\"2023-11-14 22:13:20Z\"",
            "\"2023-11-14T22:13:20+2:00\"",
            "\"2023-11-14T22:13:20+24:00\"",
            "\"1969-12-31T23:59:59Z\"",
            "\"1970-01-01T00:00:00+00:01\"",
            "\"ééééééééééééééééééééé\"",
            "\"+00:00\"",
            "\"\"",
            "1700000000",
        ] {
            assert_eq!(at(Rfc3339, bad), None, "{bad}");
        }
    }

    #[test]
    fn the_first_matching_rule_gives_the_format() {
        let mut m = rule("vendor/#", PayloadFormat::Mapping);
        m.value = Some("/value".into());
        let d = Decoder::new(&PayloadsConfig {
            max_values: 10,
            rules: vec![
                rule("umh/v1/+/special/#", PayloadFormat::Scalar),
                rule("umh/v1/#", PayloadFormat::Umh),
                m,
                rule("+/auto/#", PayloadFormat::Auto),
            ],
        })
        .unwrap();
        assert_eq!(d.format("umh/v1/acme/special/x"), &Format::Scalar);
        assert_eq!(d.format("umh/v1/acme/_historian"), &Format::Umh);
        assert!(matches!(d.format("vendor/a"), Format::Mapping(_)));
        assert_eq!(d.format("acme/site/line/dev/t"), &Format::Nexus);
        assert_eq!(d.format("$nexus/auto/x"), &Format::Nexus);
        assert_eq!(d.splitting_filters(), ["umh/v1/#", "+/auto/#"]);
        assert_eq!(one(&d, b"{\"v\":2}").value, Some(Value::Int(2)));
        assert_eq!(
            d.decode("vendor/a", br#"{"value":3}"#).samples[0]
                .value
                .value,
            Some(Value::Int(3))
        );
        // A configuration the validation would refuse cannot make a decoder.
        let bad = |r: PayloadRule| {
            Decoder::new(&PayloadsConfig {
                rules: vec![r],
                ..PayloadsConfig::default()
            })
        };
        assert!(bad(rule("a/#/b", PayloadFormat::Umh))
            .unwrap_err()
            .contains("rules[0].filter"));
        assert!(bad(rule("a", PayloadFormat::Mapping))
            .unwrap_err()
            .contains("needs it"));
        let mut p = rule("a", PayloadFormat::Mapping);
        p.value = Some("v".into());
        assert!(bad(p).unwrap_err().contains("not a JSON pointer"));
        assert!(Decoder::new(&PayloadsConfig {
            max_values: 0,
            rules: vec![]
        })
        .is_err());
    }

    /// Every format there is, for the property tests.
    fn every_format() -> Vec<Decoder> {
        let mut m = map("/a/0", Some(("/t", TimestampUnit::Rfc3339)));
        m.quality = Some("/q".into());
        m.unit = Some("/u".into());
        let mut all: Vec<Decoder> = [
            PayloadFormat::Nexus,
            PayloadFormat::Scalar,
            PayloadFormat::Text,
            PayloadFormat::Umh,
            PayloadFormat::Auto,
        ]
        .into_iter()
        .map(|f| Decoder {
            max_values: 5,
            ..decoder(f)
        })
        .collect();
        all.push(mapped(m));
        for unit in [
            TimestampUnit::S,
            TimestampUnit::Ms,
            TimestampUnit::Us,
            TimestampUnit::Ns,
        ] {
            all.push(mapped(map("", Some(("/t", unit)))));
        }
        all
    }

    fn arb_json() -> impl Strategy<Value = Json> {
        let key = prop_oneof![
            Just("timestamp_ms".to_owned()),
            Just("value".to_owned()),
            Just("v".to_owned()),
            Just("t".to_owned()),
            "\\PC{0,6}",
            "[a-z/+#]{0,3}",
        ];
        let leaf = prop_oneof![
            Just(Json::Null),
            any::<bool>().prop_map(Json::Bool),
            any::<i64>().prop_map(Json::from),
            any::<u64>().prop_map(Json::from),
            any::<f64>().prop_map(Json::from),
            "\\PC{0,8}".prop_map(Json::String),
            Just(Json::from("2023-11-14T22:13:20+02:00")),
        ];
        leaf.prop_recursive(6, 64, 8, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Json::Array),
                proptest::collection::vec((key.clone(), inner), 0..8)
                    .prop_map(|kv| Json::Object(kv.into_iter().collect())),
            ]
        })
    }

    /// What every decode keeps to, whatever the input.
    fn check(d: &Decoder, topic: &str, got: &Decoded) -> Result<(), TestCaseError> {
        prop_assert!(got.samples.len() <= d.max_values.max(1));
        prop_assert!(!got.samples.is_empty() || got.error.is_some());
        for s in &got.samples {
            if let Some(t) = &s.topic {
                prop_assert!(t.starts_with(&format!("{topic}/")), "{t}");
                prop_assert!(crate::topic::Topic::parse(t).is_ok(), "{t:?}");
            }
            if let Some(ts) = s.value.ts_ms {
                prop_assert!((0..=MAX_TS_MS).contains(&ts) || d.format(topic) == &Format::Nexus);
            }
            if let Some(Value::Float(f)) = s.value.value {
                prop_assert!(f.is_finite());
            }
        }
        if let Some(e) = &got.error {
            prop_assert!(REASONS.contains(&e.reason()));
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_in_any_format(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            for d in every_format() {
                let got = d.decode(TOPIC, &bytes);
                check(&d, TOPIC, &got)?;
            }
        }

        #[test]
        fn arbitrary_json_never_panics_in_any_format(doc in arb_json(), topic in "[a-z]{1,8}(/[a-z]{1,8}){0,30}") {
            let bytes = serde_json::to_vec(&doc).unwrap();
            for d in every_format() {
                let got = d.decode(&topic, &bytes);
                check(&d, &topic, &got)?;
            }
        }

        /// Every UMH value comes back under its key, with the message's time.
        #[test]
        fn umh_round_trip(kv in proptest::collection::btree_map("[a-z]{1,8}", any::<i64>(), 1..20), ts in 0i64..MAX_TS_MS) {
            let mut doc = serde_json::Map::new();
            doc.insert("timestamp_ms".into(), ts.into());
            for (k, v) in &kv {
                doc.insert(k.clone(), (*v).into());
            }
            let got = decoder(PayloadFormat::Umh).decode(TOPIC, &serde_json::to_vec(&doc).unwrap());
            prop_assert_eq!(&got.error, &None);
            let want: Vec<_> = kv
                .iter()
                .map(|(k, v)| {
                    let topic = if kv.len() == 1 && k == "value" { TOPIC.to_owned() } else { format!("{TOPIC}/{k}") };
                    (topic, Some(Value::Int(*v)), Some(ts))
                })
                .collect();
            prop_assert_eq!(values(&got), want);
        }
    }
}
