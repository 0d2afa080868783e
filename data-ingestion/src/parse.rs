//! From MQTT messages to points: UNS payloads in the format the `payloads` rules give their
//! topic (the JSON value object by default; bare scalars, text, UMH, JSON-pointer mappings:
//! `nexus_common::codec::payload`), and Sparkplug B births and data (`spBv1.0/...`) with
//! aliases resolved from the births seen. A message of many values (UMH) is one reject at
//! most, whatever part of it was not stored, so it costs one copy of its payload.
//!
//! Sparkplug metrics are stored under `spBv1.0/<group>/<edge node>[/<device>]/<metric name>`
//! (the message type left out, so a birth's value and later data land on one topic). Data
//! whose aliases were never announced cannot be named: the message goes to `ingest_rejects`
//! (`unknown_alias`) and the edge node is asked for a rebirth (`Node Control/Rebirth` on its
//! NCMD topic), at most once per 10 s per node.
//!
//! The alias tables grow with the node and device ids clients publish under, so they are
//! bounded (`ingestion.sparkplug_max_aliases`, all nodes together): the node heard from least
//! recently is forgotten for a new one, and its next data is then an unknown alias, rejected
//! and counted like any other. A birth with more aliases than fit is stored, but the aliases
//! past the bound are not remembered (counted as refused).

use nexus_common::bounded::MapStats;
use nexus_common::codec::json::ValueObject;
use nexus_common::codec::payload::{self, Decoder, Sample};
use nexus_common::codec::sparkplug::SpDataType;
use nexus_common::codec::sparkplug_host::SparkplugNames;
use nexus_common::domain::{Quality, Value, ValueType};

use crate::model::{Point, Reject, MAX_STORED_TOPIC_BYTES, MAX_UNIT_BYTES, MAX_VALUE_STR_BYTES};

/// Latest time accepted (9999-12-31), in microseconds.
const MAX_TS_US: i64 = 253_402_300_799_000_000;

/// Reject labels the parser gives besides the payload decoders' ([`payload::REASONS`]).
const OWN_REJECT_LABELS: [&str; 8] = [
    "bad_value",
    "bad_timestamp",
    "empty_payload",
    "bad_topic",
    "sparkplug_topic",
    "sparkplug_decode",
    "sparkplug_metric",
    "unknown_alias",
];

/// Every label a reject from the parser can have: the values of
/// `nexus_ingest_rejected_total{reason}`, whose series start at 0.
pub fn reject_labels() -> impl Iterator<Item = &'static str> {
    payload::REASONS.into_iter().chain(
        OWN_REJECT_LABELS
            .into_iter()
            .filter(|l| !payload::REASONS.contains(l)),
    )
}

/// Every kind of message the parser ignores ([`Parsed::ignored`]): the values of
/// `nexus_ingest_messages_ignored_total{kind}`.
pub const IGNORED_KINDS: [&str; 3] = ["sparkplug_state", "sparkplug_death", "sparkplug_command"];

/// What one message gave.
#[derive(Debug, Default, PartialEq)]
pub struct Parsed {
    pub points: Vec<Point>,
    pub rejects: Vec<Reject>,
    /// A message type that holds no values (Sparkplug deaths, commands, host state).
    pub ignored: Option<&'static str>,
    /// Publish a rebirth request: (topic, payload).
    pub rebirth: Option<(String, Vec<u8>)>,
}

/// Parser state: the Sparkplug births seen, per `(group, edge node)`, in a table of
/// `ingestion.sparkplug_max_aliases` units.
pub struct Parser {
    sparkplug: SparkplugNames,
    /// The format of each UNS topic's payloads (`payloads`).
    payloads: Decoder,
}

impl Default for Parser {
    fn default() -> Parser {
        let max = nexus_common::config::IngestionConfig::default().sparkplug_max_aliases;
        Parser::with_limit(MapStats::detached("sparkplug_aliases", max))
    }
}

fn reject(topic: &str, recv_us: i64, reason: &str, detail: &str, payload: &[u8]) -> Reject {
    // Within the WAL's limits: the reason shortened at a character boundary (details quote
    // client input, such as an unknown quality), the payload to its first MiB.
    Reject::new(recv_us, topic, reason, detail, payload)
}

/// A point of `value`, typed by the value (or by `declared` for a null); `Err` names what the
/// database (or the WAL) cannot take.
fn stored_point(
    topic: String,
    ts_us: i64,
    value: Option<Value>,
    declared: Option<ValueType>,
    quality: Quality,
) -> Result<Point, &'static str> {
    if let Some(Value::String(s)) = &value {
        if s.contains('\0') {
            return Err("string value contains a NUL character");
        }
        if s.len() > MAX_VALUE_STR_BYTES {
            return Err("string value longer than 1 MiB (1048576 bytes)");
        }
    }
    let mut p = Point::new(topic, ts_us, value, quality.code());
    p.value_type = p.value_type.or(declared);
    Ok(p)
}

/// The type a Sparkplug datatype's values have in the historian (docs/ingestion.md). A
/// metric's value decodes to this type; a null metric is stored with it.
fn sparkplug_type(dt: SpDataType) -> ValueType {
    use SpDataType as S;
    match dt {
        S::Boolean => ValueType::Bool,
        // DateTime is unix milliseconds.
        S::Int8
        | S::Int16
        | S::Int32
        | S::Int64
        | S::UInt8
        | S::UInt16
        | S::UInt32
        | S::UInt64
        | S::DateTime => ValueType::Integer,
        S::Float | S::Double => ValueType::Float,
        S::String | S::Text => ValueType::String,
    }
}

fn ms_to_us(ms: i64) -> Option<i64> {
    ms.checked_mul(1000)
        .filter(|us| (0..=MAX_TS_US).contains(us))
}

/// The point of one value of a UNS message; `Err` is the reject label and why.
fn value_point(
    topic: &str,
    obj: ValueObject,
    recv_us: i64,
) -> Result<Point, (&'static str, &'static str)> {
    let ts_us = match obj.ts_ms {
        None => Some(recv_us),
        Some(ms) => ms_to_us(ms),
    };
    let Some(ts_us) = ts_us else {
        return Err((
            "bad_timestamp",
            "ts is past the year 9999 (seconds or microseconds instead of ms?)",
        ));
    };
    let source_ts_us = match obj.source_ts_ms.map(ms_to_us) {
        Some(None) => return Err(("bad_timestamp", "src_ts is negative or past the year 9999")),
        other => other.flatten(),
    };
    stored_point(topic.to_owned(), ts_us, obj.value, None, obj.quality)
        .and_then(|mut p| {
            if let Some(u) = &obj.unit {
                if u.contains('\0') {
                    return Err("unit contains a NUL character");
                }
                if u.len() > MAX_UNIT_BYTES {
                    return Err("unit longer than 256 bytes");
                }
            }
            p.unit = obj.unit;
            p.source_ts_us = source_ts_us;
            Ok(p)
        })
        .map_err(|why| ("bad_value", why))
}

impl Parser {
    /// A parser with the default bound, counted nowhere.
    pub fn new() -> Parser {
        Parser::default()
    }

    /// A parser whose alias table holds `stats.capacity()` units, counted in `stats`.
    pub fn with_limit(stats: MapStats) -> Parser {
        Parser {
            sparkplug: SparkplugNames::new(stats),
            payloads: Decoder::default(),
        }
    }

    /// Read UNS payloads by the `payloads` rules of `d` (value objects until set).
    pub fn set_payloads(&mut self, d: Decoder) {
        self.payloads = d;
    }

    /// Edge nodes whose births are remembered now.
    pub fn nodes(&self) -> usize {
        self.sparkplug.nodes()
    }

    /// Parse one message received at `recv_us` (unix microseconds).
    pub fn parse(&mut self, topic: Option<&str>, payload: &[u8], recv_us: i64) -> Parsed {
        let mut out = Parsed::default();
        let Some(topic) = topic else {
            out.rejects.push(reject(
                "",
                recv_us,
                "bad_topic",
                "topic is not UTF-8",
                payload,
            ));
            return out;
        };
        if topic.starts_with("spBv1.0/") {
            self.sparkplug(topic, payload, recv_us, &mut out);
            return out;
        }
        if topic.len() > MAX_STORED_TOPIC_BYTES {
            out.rejects.push(reject(
                topic,
                recv_us,
                "bad_topic",
                &format!(
                    "topic of {} bytes, longer than the {MAX_STORED_TOPIC_BYTES} a UNS topic may have",
                    topic.len()
                ),
                payload,
            ));
            return out;
        }
        if payload.is_empty() {
            out.rejects.push(reject(
                topic,
                recv_us,
                "empty_payload",
                "no value object (a retained message being cleared?)",
                payload,
            ));
            return out;
        }
        let decoded = self.payloads.decode(topic, payload);
        let total = decoded.samples.len();
        // The first value not stored and how many were not: with the decoder's error, they
        // make the message's one reject.
        let mut bad: Option<(&'static str, &'static str)> = None;
        let mut not_stored = 0;
        for Sample { topic: own, value } in decoded.samples {
            match value_point(own.as_deref().unwrap_or(topic), value, recv_us) {
                Ok(p) => out.points.push(p),
                Err(why) => {
                    not_stored += 1;
                    bad = bad.or(Some(why));
                }
            }
        }
        let refused = match (decoded.error, bad) {
            (None, None) => None,
            (Some(e), None) => Some((e.reason(), e.detail)),
            (None, Some((label, why))) if total == 1 => Some((label, why.to_owned())),
            (None, Some((label, why))) => Some((
                label,
                format!("{not_stored} of {total} values not stored: {why}"),
            )),
            (Some(e), Some((label, why))) => Some((
                e.reason(),
                format!(
                    "{}; of the {total} values taken, {not_stored} not stored ({label}: {why})",
                    e.detail
                ),
            )),
        };
        if let Some((label, detail)) = refused {
            out.rejects
                .push(reject(topic, recv_us, label, &detail, payload));
        }
        out
    }

    fn sparkplug(&mut self, topic: &str, payload: &[u8], recv_us: i64, out: &mut Parsed) {
        let read = self.sparkplug.read(topic, payload);
        if let Some(kind) = read.ignored {
            out.ignored = Some(kind);
            return;
        }
        if let Some((reason, detail)) = &read.refused {
            out.rejects
                .push(reject(topic, recv_us, reason, detail, payload));
            return;
        }
        let mut bad = read.bad_metric;
        for m in read.metrics {
            let ts_us = match m.ts_ms {
                None => Some(recv_us),
                Some(ms) => i64::try_from(ms).ok().and_then(ms_to_us),
            };
            let Some(ts_us) = ts_us else {
                bad = Some("a metric timestamp is past the year 9999");
                continue;
            };
            let quality = if m.value.is_some() {
                Quality::Good
            } else {
                Quality::Bad
            };
            if m.topic.len() > MAX_STORED_TOPIC_BYTES {
                bad = Some(
                    "a metric name makes a topic longer than the 1024 bytes a UNS topic may have",
                );
                continue;
            }
            match stored_point(
                m.topic,
                ts_us,
                m.value,
                m.datatype.map(sparkplug_type),
                quality,
            ) {
                Ok(p) => out.points.push(p),
                Err(why) => bad = Some(why),
            }
        }
        if let Some(why) = bad {
            out.rejects
                .push(reject(topic, recv_us, "sparkplug_metric", why, payload));
        }
        if !read.unknown_aliases.is_empty() {
            out.rejects.push(reject(
                topic,
                recv_us,
                "unknown_alias",
                &format!(
                    "aliases {:?} were not announced in a birth",
                    read.unknown_aliases
                ),
                payload,
            ));
        }
        out.rebirth = read.rebirth;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_common::codec::sparkplug::{self, SpMetric, SpPayload};

    const NOW: i64 = 1_700_000_000_123_456;

    fn metric(name: Option<&str>, alias: Option<u64>, v: Value) -> SpMetric {
        SpMetric {
            name: name.map(str::to_owned),
            alias,
            timestamp: Some(1_700_000_000_500),
            datatype: Some(SpDataType::for_value(&v)),
            value: Some(v),
            ..Default::default()
        }
    }

    fn sp(metrics: Vec<SpMetric>) -> Vec<u8> {
        sparkplug::encode(&SpPayload {
            timestamp: Some(1_700_000_000_000),
            seq: Some(0),
            metrics,
        })
        .unwrap()
    }

    #[test]
    fn value_objects_become_points() {
        let mut p = Parser::new();
        let got = p.parse(
            Some("a/b/c/d/e/temp"),
            br#"{"v":21.5,"q":"uncertain","ts":1700000000000}"#,
            NOW,
        );
        assert_eq!(
            got.points,
            vec![Point {
                topic: "a/b/c/d/e/temp".into(),
                ts_us: 1_700_000_000_000_000,
                value: Some(21.5),
                value_str: None,
                quality: 64,
                value_type: Some(ValueType::Float),
                unit: None,
                source_ts_us: None,
            }]
        );
        let s = p.parse(Some("t/s"), br#"{"v":"on"}"#, NOW).points;
        assert_eq!(s[0].value_str.as_deref(), Some("on"));
        assert_eq!(s[0].ts_us, NOW, "receive time without ts");
        assert_eq!(s[0].quality, 192);
        let b = p.parse(Some("t/b"), br#"{"v":true,"ts":5}"#, NOW).points;
        assert_eq!(b[0].value, Some(1.0));
        let n = p.parse(Some("t/n"), br#"{"v":null,"q":"bad"}"#, NOW).points;
        assert_eq!(
            (n[0].value, n[0].value_str.clone(), n[0].quality),
            (None, None, 0)
        );
    }

    #[test]
    fn value_objects_keep_their_type_unit_and_source_time() {
        let mut p = Parser::new();
        let one = |p: &mut Parser, payload: &str| {
            let got = p.parse(Some("a/t"), payload.as_bytes(), NOW);
            assert!(got.rejects.is_empty(), "{payload}: {:?}", got.rejects);
            got.points.into_iter().next().unwrap()
        };
        type Case<'a> = (&'a str, Option<f64>, Option<&'a str>, Option<ValueType>);
        let cases: [Case; 7] = [
            (r#"{"v":false}"#, Some(0.0), None, Some(ValueType::Bool)),
            (r#"{"v":42}"#, Some(42.0), None, Some(ValueType::Integer)),
            (r#"{"v":-42}"#, Some(-42.0), None, Some(ValueType::Integer)),
            (r#"{"v":42.0}"#, Some(42.0), None, Some(ValueType::Float)),
            (r#"{"v":21.2}"#, Some(21.2), None, Some(ValueType::Float)),
            (r#"{"v":"on"}"#, None, Some("on"), Some(ValueType::String)),
            (r#"{"v":null,"q":"bad"}"#, None, None, None),
        ];
        for (payload, value, value_str, value_type) in cases {
            let got = one(&mut p, payload);
            assert_eq!(
                (got.value, got.value_str.as_deref(), got.value_type),
                (value, value_str, value_type),
                "{payload}"
            );
            assert_eq!((got.unit, got.source_ts_us), (None, None), "{payload}");
        }
        let got = one(
            &mut p,
            r#"{"v":60.75,"q":"good","ts":1700000000100,"u":"degC","src_ts":1700000000050}"#,
        );
        assert_eq!(got.unit.as_deref(), Some("degC"));
        assert_eq!(got.source_ts_us, Some(1_700_000_000_050_000));
        assert_eq!(got.ts_us, 1_700_000_000_100_000);
        // What the historian cannot keep is a reject, with the reason.
        let long_unit = format!(r#"{{"v":1,"u":"{}"}}"#, "m".repeat(MAX_UNIT_BYTES + 1));
        let fitting_unit = format!(r#"{{"v":1,"u":"{}"}}"#, "m".repeat(MAX_UNIT_BYTES));
        assert_eq!(one(&mut p, &fitting_unit).unit.map(|u| u.len()), Some(256));
        for (payload, label, says) in [
            (
                long_unit.as_str(),
                "bad_value",
                "unit longer than 256 bytes",
            ),
            (
                r#"{"v":1,"u":"a\u0000"}"#,
                "bad_value",
                "unit contains a NUL",
            ),
            (r#"{"v":1,"src_ts":-1}"#, "bad_timestamp", "src_ts"),
            (
                r#"{"v":1,"src_ts":99999999999999999}"#,
                "bad_timestamp",
                "src_ts",
            ),
        ] {
            let got = p.parse(Some("a/t"), payload.as_bytes(), NOW);
            assert!(got.points.is_empty(), "{payload}");
            assert_eq!(got.rejects[0].label(), label, "{payload}");
            assert!(
                got.rejects[0].reason.contains(says),
                "{}",
                got.rejects[0].reason
            );
        }
    }

    /// Every Sparkplug datatype Nexus takes stores its values as the type of the mapping, in
    /// births and in data by alias, and a null metric keeps its declared type.
    #[test]
    fn sparkplug_datatypes_map_to_value_types() {
        use SpDataType as S;
        let cases: [(S, Value, ValueType); 14] = [
            (S::Boolean, Value::Bool(true), ValueType::Bool),
            (S::Int8, Value::Int(-8), ValueType::Integer),
            (S::Int16, Value::Int(-16), ValueType::Integer),
            (S::Int32, Value::Int(-32), ValueType::Integer),
            (S::Int64, Value::Int(-64), ValueType::Integer),
            (S::UInt8, Value::UInt(8), ValueType::Integer),
            (S::UInt16, Value::UInt(16), ValueType::Integer),
            (S::UInt32, Value::UInt(32), ValueType::Integer),
            (S::UInt64, Value::UInt(u64::MAX), ValueType::Integer),
            (
                S::DateTime,
                Value::UInt(1_700_000_000_000),
                ValueType::Integer,
            ),
            (S::Float, Value::Float(21.2), ValueType::Float),
            (S::Double, Value::Float(0.1), ValueType::Float),
            (S::String, Value::from("s"), ValueType::String),
            (S::Text, Value::from("t"), ValueType::String),
        ];
        let mut p = Parser::new();
        let typed = |dt, alias, v: Option<Value>, named: bool| SpMetric {
            name: named.then(|| format!("m{alias}")),
            alias: Some(alias),
            timestamp: Some(1_700_000_000_500 + alias),
            datatype: named.then_some(dt),
            value: v,
            ..Default::default()
        };
        let birth: Vec<SpMetric> = cases
            .iter()
            .zip(0..)
            .map(|((dt, v, _), a)| typed(*dt, a, Some(v.clone()), true))
            .collect();
        let got = p.parse(Some("spBv1.0/G/DBIRTH/E/D"), &sp(birth), NOW);
        assert!(got.rejects.is_empty(), "{:?}", got.rejects);
        // Data by alias: the datatype comes from the birth; then the same metrics as nulls.
        let data: Vec<SpMetric> = cases
            .iter()
            .zip(0..)
            .map(|((dt, v, _), a)| typed(*dt, a, Some(v.clone()), false))
            .collect();
        let by_alias = p.parse(Some("spBv1.0/G/DDATA/E/D"), &sp(data), NOW);
        assert!(by_alias.rejects.is_empty(), "{:?}", by_alias.rejects);
        let nulls: Vec<SpMetric> = cases
            .iter()
            .zip(0..)
            .map(|((dt, _, _), a)| typed(*dt, a, None, true))
            .collect();
        let nulls = p.parse(Some("spBv1.0/G/DDATA/E/D"), &sp(nulls), NOW);
        for (i, (dt, v, want)) in cases.iter().enumerate() {
            assert_eq!(sparkplug_type(*dt), *want, "{dt:?}");
            for point in [&got.points[i], &by_alias.points[i]] {
                assert_eq!(point.value_type, Some(*want), "{dt:?}");
                assert_eq!(point.value, v.as_f64(), "{dt:?}");
            }
            let null = &nulls.points[i];
            assert_eq!((null.value, null.value_type), (None, Some(*want)), "{dt:?}");
        }
        // A Float metric shows its own digits, not 21.200000762939453.
        assert_eq!(got.points[10].value, Some(21.2));
        assert_eq!(by_alias.points[10].value, Some(21.2));
    }

    #[test]
    fn bad_messages_are_rejected_with_a_reason() {
        let mut p = Parser::new();
        let cases: [(&str, &[u8], &str); 7] = [
            ("t/1", b"{\"v\":", "bad_json"),
            ("t/2", b"{\"q\":\"good\"}", "missing_field"),
            ("t/3", b"{\"v\":[1]}", "bad_type"),
            ("t/4", b"{\"v\":1,\"q\":\"great\"}", "bad_quality"),
            ("t/5", b"", "empty_payload"),
            ("t/6", b"{\"v\":\"a\\u0000b\"}", "bad_value"),
            (
                "t/7",
                b"{\"v\":1,\"ts\":99999999999999999}",
                "bad_timestamp",
            ),
        ];
        for (topic, payload, reason) in cases {
            let got = p.parse(Some(topic), payload, NOW);
            assert!(got.points.is_empty(), "{topic}");
            assert_eq!(got.rejects.len(), 1, "{topic}");
            let r = &got.rejects[0];
            assert_eq!(r.label(), reason, "{topic}: {}", r.reason);
            assert_eq!((r.topic.as_str(), r.payload.as_slice()), (topic, payload));
            assert_eq!(r.ts_us, NOW);
        }
        let got = p.parse(None, b"x", NOW);
        assert_eq!(got.rejects[0].label(), "bad_topic");
    }

    #[test]
    fn fields_too_long_to_log_are_rejects_with_whole_characters() {
        let mut p = Parser::new();
        // The quality ends up quoted in the reason: shortened at a character boundary.
        let q = format!(r#"{{"v":1,"q":"{}"}}"#, "é".repeat(700));
        let got = p.parse(Some("t/q"), q.as_bytes(), NOW);
        assert!(got.points.is_empty());
        let r = &got.rejects[0];
        assert_eq!(r.label(), "bad_quality");
        assert!(r.reason.len() <= crate::model::MAX_REASON_BYTES);
        assert!(r.reason.ends_with('…'), "{}", r.reason);
        assert_eq!(r.payload, q.as_bytes());
        // A string value over the limit is a reject, not a point.
        let v = format!(r#"{{"v":"{}"}}"#, "x".repeat(MAX_VALUE_STR_BYTES + 1));
        let got = p.parse(Some("t/v"), v.as_bytes(), NOW);
        assert!(got.points.is_empty());
        assert_eq!(got.rejects[0].label(), "bad_value");
        assert!(got.rejects[0].reason.contains("longer than 1 MiB"));
        let v = format!(r#"{{"v":"{}"}}"#, "x".repeat(MAX_VALUE_STR_BYTES));
        assert_eq!(p.parse(Some("t/v"), v.as_bytes(), NOW).points.len(), 1);
        // A Sparkplug metric name that makes the topic too long.
        let long = "m".repeat(MAX_STORED_TOPIC_BYTES);
        let data = sp(vec![
            metric(Some(&long), None, Value::Float(1.0)),
            metric(Some("ok"), None, Value::Float(2.0)),
        ]);
        let got = p.parse(Some("spBv1.0/G/NDATA/E"), &data, NOW);
        assert_eq!(got.points.len(), 1);
        assert_eq!(got.points[0].topic, "spBv1.0/G/E/ok");
        assert_eq!(got.rejects[0].label(), "sparkplug_metric");
        // A UNS topic past the limit is rejected, never handed to the writer (whose index on
        // tags.topic would refuse it and stall the batch).
        let long = format!("t/{}", "x".repeat(MAX_STORED_TOPIC_BYTES));
        let got = p.parse(Some(&long), br#"{"v":1}"#, NOW);
        assert!(got.points.is_empty());
        assert_eq!(got.rejects[0].label(), "bad_topic");
        assert!(
            got.rejects[0].reason.contains("longer than the 1024"),
            "{}",
            got.rejects[0].reason
        );
        let edge = format!("t/{}", "x".repeat(MAX_STORED_TOPIC_BYTES - 2));
        assert_eq!(p.parse(Some(&edge), br#"{"v":1}"#, NOW).points.len(), 1);
    }

    #[test]
    fn sparkplug_aliases_resolve_from_births() {
        let mut p = Parser::new();
        let birth = sp(vec![
            metric(Some("Temp"), Some(1), Value::Float(20.0)),
            metric(Some("Count"), Some(2), Value::Int(-3)),
        ]);
        let got = p.parse(Some("spBv1.0/G/DBIRTH/E/D"), &birth, NOW);
        assert_eq!(got.points.len(), 2);
        assert_eq!(got.points[0].topic, "spBv1.0/G/E/D/Temp");
        assert_eq!(got.points[1].value, Some(-3.0));
        let mut data_metric = metric(None, Some(2), Value::Int(-7));
        data_metric.datatype = None;
        let data = sp(vec![metric(None, Some(1), Value::Float(21.5)), data_metric]);
        let got = p.parse(Some("spBv1.0/G/DDATA/E/D"), &data, NOW);
        assert!(got.rejects.is_empty(), "{:?}", got.rejects);
        assert_eq!(got.points[0].topic, "spBv1.0/G/E/D/Temp");
        assert_eq!(got.points[0].value, Some(21.5));
        assert_eq!(got.points[0].ts_us, 1_700_000_000_500_000);
        assert_eq!(got.points[1].topic, "spBv1.0/G/E/D/Count");
        assert_eq!(got.points[1].value, Some(-7.0));
        // Named metrics need no birth.
        let named = sp(vec![metric(Some("Speed"), None, Value::UInt(5))]);
        let got = p.parse(Some("spBv1.0/G/NDATA/E2"), &named, NOW);
        assert_eq!(got.points[0].topic, "spBv1.0/G/E2/Speed");
        // A node death keeps the aliases (data sent before it may arrive after it); the
        // next node birth starts over.
        let got = p.parse(Some("spBv1.0/G/NDEATH/E"), &sp(vec![]), NOW);
        assert_eq!(got.ignored, Some("sparkplug_death"));
        let got = p.parse(Some("spBv1.0/G/DDATA/E/D"), &data, NOW);
        assert!(got.rejects.is_empty(), "{:?}", got.rejects);
        p.parse(Some("spBv1.0/G/NBIRTH/E"), &sp(vec![]), NOW);
        let got = p.parse(Some("spBv1.0/G/DDATA/E/D"), &data, NOW);
        assert_eq!(got.rejects[0].label(), "unknown_alias");
    }

    #[test]
    fn unknown_aliases_ask_for_a_rebirth_once_per_interval() {
        let mut p = Parser::new();
        let data = sp(vec![metric(None, Some(9), Value::Float(1.0))]);
        let got = p.parse(Some("spBv1.0/G/NDATA/E"), &data, NOW);
        assert!(got.points.is_empty());
        assert_eq!(got.rejects[0].label(), "unknown_alias");
        let (topic, payload) = got.rebirth.expect("rebirth requested");
        assert_eq!(topic, "spBv1.0/G/NCMD/E");
        let cmd = sparkplug::decode(&payload).unwrap();
        assert_eq!(cmd.metrics[0].name.as_deref(), Some("Node Control/Rebirth"));
        assert_eq!(cmd.metrics[0].value, Some(Value::Bool(true)));
        let again = p.parse(Some("spBv1.0/G/NDATA/E"), &data, NOW);
        assert!(again.rebirth.is_none(), "not again within 10 s");
    }

    /// A client inventing edge nodes: the alias table stays at its bound, the node heard from
    /// least recently is forgotten, and its data is then rejected as unknown aliases (counted
    /// with a rebirth request), never stored under a wrong name.
    #[test]
    fn the_alias_table_is_bounded_and_a_forgotten_node_is_an_unknown_alias() {
        // Each node: 1 unit for itself and 1 per alias.
        let mut p = Parser::with_limit(MapStats::detached("sparkplug_aliases", 10));
        let birth = sp(vec![
            metric(Some("Temp"), Some(1), Value::Float(20.0)),
            metric(Some("Count"), Some(2), Value::Int(3)),
        ]);
        for i in 0..100 {
            let got = p.parse(Some(&format!("spBv1.0/G/NBIRTH/E{i}")), &birth, NOW);
            assert_eq!(got.points.len(), 2, "a birth's values are stored");
        }
        assert_eq!(p.nodes(), 3, "3 units each in 10");
        assert_eq!(p.sparkplug.stats().evicted_total(), 97);
        assert!(p.sparkplug.used() <= 10);
        let data = sp(vec![metric(None, Some(1), Value::Float(21.0))]);
        let got = p.parse(Some("spBv1.0/G/NDATA/E99"), &data, NOW);
        assert_eq!(got.points[0].topic, "spBv1.0/G/E99/Temp");
        let got = p.parse(Some("spBv1.0/G/NDATA/E0"), &data, NOW);
        assert!(got.points.is_empty());
        assert_eq!(got.rejects[0].label(), "unknown_alias");
        assert!(got.rebirth.is_some());
        // Data naming its metrics needs no birth, bound or not.
        let named = sp(vec![metric(Some("Speed"), None, Value::UInt(5))]);
        assert_eq!(
            p.parse(Some("spBv1.0/G/NDATA/E0"), &named, NOW)
                .points
                .len(),
            1
        );

        // One node with more aliases than fit: all values stored, the aliases past the bound
        // not remembered (counted), their data rejected.
        let mut p = Parser::with_limit(MapStats::detached("sparkplug_aliases", 4));
        let big = sp((0..6)
            .map(|a| metric(Some(&format!("m{a}")), Some(a), Value::Float(a as f64)))
            .collect());
        let got = p.parse(Some("spBv1.0/G/DBIRTH/E/D"), &big, NOW);
        assert_eq!(got.points.len(), 6);
        assert_eq!(
            p.sparkplug.stats().refused_total(),
            3,
            "the node and 3 aliases fit in 4"
        );
        let got = p.parse(
            Some("spBv1.0/G/DDATA/E/D"),
            &sp(vec![
                metric(None, Some(0), Value::Float(1.0)),
                metric(None, Some(5), Value::Float(2.0)),
            ]),
            NOW,
        );
        assert_eq!(got.points.len(), 1);
        assert_eq!(got.points[0].topic, "spBv1.0/G/E/D/m0");
        assert_eq!(got.rejects[0].label(), "unknown_alias");
        // A new birth of the device frees its aliases again.
        let small = sp(vec![metric(Some("x"), Some(7), Value::Float(1.0))]);
        p.parse(Some("spBv1.0/G/DBIRTH/E/D"), &small, NOW);
        assert_eq!(p.sparkplug.used(), 2);
        // Long names weigh more: 600 bytes is 3 units.
        let long = "n".repeat(600);
        let named = sp(vec![metric(Some(&long), Some(8), Value::Float(1.0))]);
        p.parse(Some("spBv1.0/G/NBIRTH/F"), &named, NOW);
        assert_eq!(p.sparkplug.node_units("G", "F"), Some(4));
    }

    #[test]
    fn sparkplug_non_data_is_ignored_and_garbage_rejected() {
        let mut p = Parser::new();
        assert_eq!(
            p.parse(Some("spBv1.0/STATE/host1"), b"{\"online\":true}", NOW)
                .ignored,
            Some("sparkplug_state")
        );
        assert_eq!(
            p.parse(Some("spBv1.0/G/NCMD/E"), &sp(vec![]), NOW).ignored,
            Some("sparkplug_command")
        );
        let got = p.parse(Some("spBv1.0/G/DDATA/E/D"), b"\xff\xff\xff", NOW);
        assert_eq!(got.rejects[0].label(), "sparkplug_decode");
        let got = p.parse(Some("spBv1.0/G/BOGUS/E"), &sp(vec![]), NOW);
        assert_eq!(got.rejects[0].label(), "sparkplug_topic");
    }

    /// A parser reading `u/#` as UMH, `s/#` as bare scalars and `m/#` by a mapping, at most
    /// `max_values` values per message.
    fn umh_parser(max_values: usize) -> Parser {
        let cfg = nexus_common::config::Config::from_str_with_env(
            &format!(
                "payloads:\n  max_values: {max_values}\n  rules:\n    - {{ filter: \"u/#\", format: umh }}\n    - {{ filter: \"s/#\", format: scalar }}\n    - {{ filter: \"m/#\", format: mapping, value: /d/v, timestamp: /d/t, timestamp_unit: s, quality: /d/q }}\n"
            ),
            None,
            &[],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let mut p = Parser::new();
        p.set_payloads(Decoder::new(&cfg.payloads).unwrap());
        p
    }

    #[test]
    fn other_publishers_payloads_become_points() {
        let mut p = umh_parser(100);
        let got = p.parse(Some("s/answer"), b"42", NOW);
        assert_eq!(
            got.points,
            vec![Point::new("s/answer", NOW, Some(Value::Int(42)), 192)]
        );
        let got = p.parse(Some("s/run"), b"true", NOW);
        assert_eq!(got.points[0].value, Some(1.0));
        let got = p.parse(
            Some("u/cell/_historian"),
            br#"{"timestamp_ms":1700000000000,"temp":21.5,"head":{"x":1}}"#,
            NOW,
        );
        assert!(got.rejects.is_empty(), "{:?}", got.rejects);
        let at = |t: &str, v| Point::new(t, 1_700_000_000_000_000, Some(v), 192);
        assert_eq!(
            got.points,
            vec![
                at("u/cell/_historian/temp", Value::Float(21.5)),
                at("u/cell/_historian/head/x", Value::Int(1)),
            ]
        );
        let got = p.parse(
            Some("u/level"),
            br#"{"timestamp_ms":1700000000000,"value":7}"#,
            NOW,
        );
        assert_eq!(got.points, vec![at("u/level", Value::Int(7))]);
        let got = p.parse(
            Some("m/x"),
            br#"{"d":{"v":"on","t":1700000000,"q":"uncertain"}}"#,
            NOW,
        );
        assert_eq!(
            got.points,
            vec![Point::new(
                "m/x",
                1_700_000_000_000_000,
                Some(Value::String("on".into())),
                64
            )]
        );
        // Other topics stay value objects.
        assert_eq!(
            p.parse(Some("t/x"), b"42", NOW).rejects[0].label(),
            "bad_type"
        );
        for (topic, payload, label) in [
            ("s/x", &b"forty-two"[..], "bad_json"),
            ("u/x", br#"{"temp":1}"#, "missing_field"),
            ("m/x", br#"{"d":{"v":[1]}}"#, "bad_type"),
            ("m/x", br#"{"d":{"v":1,"t":-1}}"#, "bad_timestamp"),
        ] {
            let got = p.parse(Some(topic), payload, NOW);
            assert!(got.points.is_empty());
            assert_eq!(got.rejects.len(), 1);
            assert_eq!(got.rejects[0].label(), label);
            assert_eq!(
                (
                    got.rejects[0].topic.as_str(),
                    got.rejects[0].payload.as_slice()
                ),
                (topic, payload)
            );
        }
    }

    /// However many of a message's values are refused, the message is one reject: one copy of
    /// its payload, with a reason that counts them.
    #[test]
    fn a_message_of_many_values_is_one_reject_at_most() {
        let mut p = umh_parser(1000);
        let payload =
            br#"{"timestamp_ms":1700000000000,"a":1,"b":"x\u0000","c":2,"d":"\u0000","e/f":3}"#;
        let got = p.parse(Some("u/h"), payload, NOW);
        let topics: Vec<&str> = got.points.iter().map(|p| p.topic.as_str()).collect();
        assert_eq!(topics, ["u/h/a", "u/h/c"]);
        assert_eq!(got.rejects.len(), 1);
        let r = &got.rejects[0];
        assert_eq!(r.label(), "bad_topic");
        assert!(
            r.reason.contains("1 of 5 values not taken: key \"e/f\""),
            "{}",
            r.reason
        );
        assert!(
            r.reason.contains(
                "of the 4 values taken, 2 not stored (bad_value: string value contains a NUL"
            ),
            "{}",
            r.reason
        );
        let got = p.parse(
            Some("u/h"),
            br#"{"timestamp_ms":1,"a":"\u0000","b":"\u0000"}"#,
            NOW,
        );
        assert_eq!(got.rejects.len(), 1);
        assert!(
            got.rejects[0]
                .reason
                .starts_with("bad_value: 2 of 2 values not stored: string value contains a NUL"),
            "{}",
            got.rejects[0].reason
        );
        // 100,000 values in one message: 1,000 points and one reject.
        let mut body = String::from("{\"timestamp_ms\":1700000000000");
        for i in 0..100_000 {
            body.push_str(&format!(",\"k{i}\":{i}"));
        }
        body.push('}');
        let got = p.parse(Some("u/h"), body.as_bytes(), NOW);
        assert_eq!(got.points.len(), 1000);
        assert_eq!(got.rejects.len(), 1);
        assert_eq!(got.rejects[0].label(), "too_many_values");
        assert!(
            got.rejects[0]
                .reason
                .contains("99000 of 100000 values not taken"),
            "{}",
            got.rejects[0].reason
        );
    }

    /// The label lists that create metric series up front are exactly what the parser gives.
    #[test]
    fn every_reject_label_and_ignored_kind_is_known_up_front() {
        let mut p = Parser::new();
        let nameless = SpMetric {
            name: None,
            alias: None,
            timestamp: None,
            datatype: Some(SpDataType::Double),
            value: Some(Value::Float(1.0)),
            ..Default::default()
        };
        let cases: Vec<(Option<&str>, Vec<u8>)> = vec![
            (Some("t/1"), b"{\"v\":".to_vec()),
            (Some("t/2"), b"{\"q\":\"good\"}".to_vec()),
            (Some("t/3"), b"{\"v\":[1]}".to_vec()),
            (Some("t/4"), b"{\"v\":1,\"q\":\"great\"}".to_vec()),
            (Some("t/5"), b"{\"v\":\"a\\u0000b\"}".to_vec()),
            (Some("t/6"), b"{\"v\":1,\"ts\":99999999999999999}".to_vec()),
            (Some("t/7"), Vec::new()),
            (None, b"{\"v\":1}".to_vec()),
            (Some("spBv1.0/G/BOGUS/E"), sp(vec![])),
            (Some("spBv1.0/G/DDATA/E/D"), b"\xff\xff\xff".to_vec()),
            (Some("spBv1.0/G/NDATA/E"), sp(vec![nameless])),
            (
                Some("spBv1.0/G/NDATA/E"),
                sp(vec![metric(None, Some(9), Value::Float(1.0))]),
            ),
        ];
        let mut labels: Vec<String> = cases
            .iter()
            .flat_map(|(t, payload)| p.parse(*t, payload, NOW).rejects)
            .map(|r| r.label().to_owned())
            .collect();
        // More values in a message than payloads.max_values.
        let mut umh = umh_parser(1);
        let many = umh.parse(Some("u/h"), br#"{"timestamp_ms":1,"a":1,"b":2}"#, NOW);
        labels.extend(many.rejects.iter().map(|r| r.label().to_owned()));
        labels.sort();
        let mut known: Vec<&str> = reject_labels().collect();
        known.sort_unstable();
        assert_eq!(labels, known);

        let mut kinds: Vec<&str> = [
            "spBv1.0/STATE/host",
            "spBv1.0/G/NDEATH/E",
            "spBv1.0/G/DDEATH/E/D",
            "spBv1.0/G/NCMD/E",
            "spBv1.0/G/DCMD/E/D",
        ]
        .into_iter()
        .filter_map(|t| p.parse(Some(t), &sp(vec![]), NOW).ignored)
        .collect();
        kinds.dedup();
        kinds.sort_unstable();
        let mut known = IGNORED_KINDS.to_vec();
        known.sort_unstable();
        assert_eq!(kinds, known);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_payloads_never_panic(topic in "[a-z/]{0,20}|spBv1\\.0/[A-Z]{1,3}/(NDATA|DDATA|DBIRTH)/[a-z]{1,3}(/[a-z]{1,3})?", payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let mut p = Parser::new();
            let got = p.parse(Some(&topic), &payload, NOW);
            if !topic.starts_with("spBv1.0/") {
                // Anything else is exactly one point or one reject.
                proptest::prop_assert_eq!(got.points.len() + got.rejects.len(), 1);
            }
        }

        /// Any bytes in any format: at most max_values points, at most one reject, and
        /// something for every message.
        #[test]
        fn arbitrary_payloads_never_panic_in_any_format(topic in "(u|s|m|t)/[a-z]{1,3}", payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let mut p = umh_parser(3);
            let got = p.parse(Some(&topic), &payload, NOW);
            proptest::prop_assert!(got.points.len() <= 3);
            proptest::prop_assert!(got.rejects.len() <= 1);
            proptest::prop_assert!(got.points.len() + got.rejects.len() >= 1);
        }
    }
}
