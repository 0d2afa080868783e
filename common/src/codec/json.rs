//! The JSON value object of the contract:
//! `{"v": <number|bool|string|null>, "q": "good", "ts": <unix ms>, "u": "<unit>", "src_ts": <unix ms>}`.
//!
//! Decoding is tolerant of extra fields and strict about types: `v` must be a scalar or null,
//! `ts`/`src_ts` integers, `q` a known quality name. `q` defaults to good and `ts` is left to
//! the caller (usually the receive time) when absent, so hand-written publishers work.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::domain::{Quality, Value};

/// A decoded value object.
#[derive(Debug, Clone, PartialEq)]
pub struct ValueObject {
    pub value: Option<Value>,
    pub quality: Quality,
    pub ts_ms: Option<i64>,
    pub source_ts_ms: Option<i64>,
    pub unit: Option<String>,
}

/// Why a payload is not a value object. The text names the field and, for syntax errors,
/// the line and column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid value object: {0}")]
pub struct PayloadError(pub String);

impl PayloadError {
    /// Every value [`reason`](Self::reason) returns (to create metric series up front).
    pub const REASONS: [&'static str; 4] = ["missing_field", "bad_type", "bad_quality", "bad_json"];

    /// A short stable reason for metrics labels and the dead-letter table.
    pub fn reason(&self) -> &'static str {
        let m = &self.0;
        if m.contains("missing field") {
            "missing_field"
        } else if m.contains("invalid type")
            || m.contains("invalid value")
            || m.contains("field ts")
        {
            "bad_type"
        } else if m.contains("quality") {
            "bad_quality"
        } else {
            "bad_json"
        }
    }
}

struct ScalarValue(Option<Value>);

impl<'de> Deserialize<'de> for ScalarValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ScalarValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number, bool, string or null")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<ScalarValue, E> {
                Ok(ScalarValue(Some(Value::Bool(v))))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ScalarValue, E> {
                Ok(ScalarValue(Some(Value::Int(v))))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ScalarValue, E> {
                Ok(ScalarValue(Some(match i64::try_from(v) {
                    Ok(i) => Value::Int(i),
                    Err(_) => Value::UInt(v),
                })))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<ScalarValue, E> {
                Ok(ScalarValue(Some(Value::Float(v))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ScalarValue, E> {
                Ok(ScalarValue(Some(Value::String(v.to_owned()))))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<ScalarValue, E> {
                Ok(ScalarValue(Some(Value::String(v))))
            }
            fn visit_unit<E: de::Error>(self) -> Result<ScalarValue, E> {
                Ok(ScalarValue(None))
            }
            fn visit_none<E: de::Error>(self) -> Result<ScalarValue, E> {
                Ok(ScalarValue(None))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
struct Wire<'a> {
    v: ScalarValue,
    #[serde(borrow, default)]
    q: Option<Cow<'a, str>>,
    #[serde(default)]
    ts: Option<i64>,
    #[serde(default)]
    src_ts: Option<i64>,
    #[serde(borrow, default)]
    u: Option<Cow<'a, str>>,
}

/// Decode a value object.
pub fn decode_value_object(payload: &[u8]) -> Result<ValueObject, PayloadError> {
    let wire: Wire<'_> =
        serde_json::from_slice(payload).map_err(|e| PayloadError(e.to_string()))?;
    let quality = match wire.q {
        None => Quality::Good,
        Some(q) => q
            .parse()
            .map_err(|e: crate::domain::UnknownQuality| PayloadError(format!("field q: {e}")))?,
    };
    if let Some(ts) = wire.ts {
        if ts < 0 {
            return Err(PayloadError(format!("field ts: {ts} is negative")));
        }
    }
    if let Some(Value::Float(f)) = &wire.v.0 {
        if !f.is_finite() {
            return Err(PayloadError("field v: not a finite number".into()));
        }
    }
    Ok(ValueObject {
        value: wire.v.0,
        quality,
        ts_ms: wire.ts,
        source_ts_ms: wire.src_ts,
        unit: wire.u.map(Cow::into_owned),
    })
}

/// Decode a bare JSON scalar (`75.5`, `true`, `"text"`, `null`), as the `/set` command takes.
pub fn decode_bare_value(payload: &[u8]) -> Result<Option<Value>, PayloadError> {
    serde_json::from_slice::<ScalarValue>(payload)
        .map(|s| s.0)
        .map_err(|e| PayloadError(e.to_string()))
}

/// Append a value as JSON (floats that are not finite become null: JSON has no NaN). Numbers
/// are written as serde_json writes them (itoa, and zmij for floats, the shortest round trip),
/// without its allocations: the gateway encodes every value it reads.
pub fn write_value(out: &mut String, value: Option<&Value>) {
    match value {
        None => out.push_str("null"),
        Some(Value::Bool(b)) => out.push_str(if *b { "true" } else { "false" }),
        Some(Value::Int(i)) => out.push_str(itoa::Buffer::new().format(*i)),
        Some(Value::UInt(u)) => out.push_str(itoa::Buffer::new().format(*u)),
        Some(Value::Float(f)) if f.is_finite() => {
            out.push_str(zmij::Buffer::new().format_finite(*f));
        }
        Some(Value::Float(_)) => out.push_str("null"),
        Some(Value::String(s)) => write_string(out, s),
    }
}

/// Append `s` as a JSON string.
fn write_string(out: &mut String, s: &str) {
    match serde_json::to_string(s) {
        Ok(quoted) => out.push_str(&quoted),
        // Serializing a str cannot fail; stay valid JSON if it ever did.
        Err(_) => out.push_str("null"),
    }
}

/// The value as a `serde_json::Value` (for responses and APIs).
pub fn value_to_json(value: Option<&Value>) -> serde_json::Value {
    match value {
        None => serde_json::Value::Null,
        Some(Value::Bool(b)) => (*b).into(),
        Some(Value::Int(i)) => (*i).into(),
        Some(Value::UInt(u)) => (*u).into(),
        Some(Value::Float(f)) => serde_json::Number::from_f64(*f)
            .map(serde_json::Value::Number)
            .unwrap_or_default(),
        Some(Value::String(s)) => s.clone().into(),
    }
}

/// Encode a value object. Field order is fixed (`v`, `q`, `ts`, then optional `u`, `src_ts`).
pub fn encode_value_object(obj: &ValueObject) -> Vec<u8> {
    let mut out = String::with_capacity(64);
    out.push_str("{\"v\":");
    write_value(&mut out, obj.value.as_ref());
    out.push_str(",\"q\":\"");
    out.push_str(obj.quality.as_str());
    out.push('"');
    if let Some(ts) = obj.ts_ms {
        out.push_str(",\"ts\":");
        out.push_str(itoa::Buffer::new().format(ts));
    }
    if let Some(u) = &obj.unit {
        out.push_str(",\"u\":");
        write_string(&mut out, u);
    }
    if let Some(src) = obj.source_ts_ms {
        out.push_str(",\"src_ts\":");
        out.push_str(itoa::Buffer::new().format(src));
    }
    out.push('}');
    out.into_bytes()
}

impl From<&crate::domain::DataPoint> for ValueObject {
    fn from(p: &crate::domain::DataPoint) -> Self {
        ValueObject {
            value: p.value.clone(),
            quality: p.quality,
            ts_ms: Some(p.ts_ms),
            source_ts_ms: p.source_ts_ms,
            unit: p.unit.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn numbers_and_strings_are_written_as_serde_json_writes_them() {
        let floats = [
            0.0,
            -0.0,
            0.1,
            21.5,
            3.0,
            -1.5e-7,
            1e21,
            1e-7,
            123_456_789.125,
            5e-324,
            f64::MAX,
            f64::MIN_POSITIVE,
            f64::from(21.2f32),
        ];
        for f in floats {
            let mut out = String::new();
            write_value(&mut out, Some(&Value::Float(f)));
            assert_eq!(out, serde_json::to_string(&f).unwrap(), "{f:e}");
        }
        for f in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let mut out = String::new();
            write_value(&mut out, Some(&Value::Float(f)));
            assert_eq!(out, "null");
        }
        for i in [0, -1, 42, i64::MIN, i64::MAX] {
            let mut out = String::new();
            write_value(&mut out, Some(&Value::Int(i)));
            assert_eq!(out, i.to_string());
        }
        let mut out = String::new();
        write_value(&mut out, Some(&Value::UInt(u64::MAX)));
        assert_eq!(out, u64::MAX.to_string());
        let s = "quote \" backslash \\ newline \n nul \u{0} é 🚀";
        let mut out = String::new();
        write_value(&mut out, Some(&Value::String(s.into())));
        assert_eq!(out, serde_json::to_string(s).unwrap());
        assert_eq!(serde_json::from_str::<String>(&out).unwrap(), s);
    }

    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_contract_example() {
        let o =
            decode_value_object(br#"{"v":72.5,"q":"good","ts":1700000000000,"u":"degC"}"#).unwrap();
        assert_eq!(o.value, Some(Value::Float(72.5)));
        assert_eq!(o.quality, Quality::Good);
        assert_eq!(o.ts_ms, Some(1_700_000_000_000));
        assert_eq!(o.unit.as_deref(), Some("degC"));
    }

    #[test]
    fn tolerant_of_extra_fields_and_defaults() {
        let o = decode_value_object(br#"{"v":true,"src_ts":5,"extra":{"a":[1,2]}}"#).unwrap();
        assert_eq!(o.value, Some(Value::Bool(true)));
        assert_eq!(o.quality, Quality::Good);
        assert_eq!(o.ts_ms, None);
        assert_eq!(o.source_ts_ms, Some(5));
        let o = decode_value_object(br#"{"v":null,"q":"bad_comm_failure","ts":1}"#).unwrap();
        assert_eq!(o.value, None);
        assert_eq!(o.quality, Quality::BadCommFailure);
        let big = decode_value_object(br#"{"v":18446744073709551615}"#).unwrap();
        assert_eq!(big.value, Some(Value::UInt(u64::MAX)));
        let neg = decode_value_object(br#"{"v":-5}"#).unwrap();
        assert_eq!(neg.value, Some(Value::Int(-5)));
    }

    #[test]
    fn strict_about_types() {
        let cases: [(&[u8], &str); 8] = [
            (br#"{"q":"good"}"#, "missing field `v`"),
            (br#"{"v":[1]}"#, "a number, bool, string or null"),
            (br#"{"v":{"a":1}}"#, "a number, bool, string or null"),
            (br#"{"v":1,"ts":"now"}"#, "invalid type: string \"now\""),
            (br#"{"v":1,"ts":1.5}"#, "invalid type: floating point"),
            (br#"{"v":1,"q":"fine"}"#, "field q: unknown quality"),
            (br#"{"v":1,"ts":-1}"#, "field ts: -1 is negative"),
            (b"{\"v\":1", "EOF while parsing"),
        ];
        for (input, want) in cases {
            let err = decode_value_object(input).unwrap_err();
            assert!(
                err.to_string().contains(want),
                "{}: {err}",
                String::from_utf8_lossy(input)
            );
        }
        assert_eq!(
            decode_value_object(br#"{"q":"good"}"#)
                .unwrap_err()
                .reason(),
            "missing_field"
        );
        assert_eq!(
            decode_value_object(br#"{"v":[1]}"#).unwrap_err().reason(),
            "bad_type"
        );
        assert_eq!(
            decode_value_object(b"garbage").unwrap_err().reason(),
            "bad_json"
        );
    }

    #[test]
    fn encodes_compactly() {
        let o = ValueObject {
            value: Some(Value::Float(72.5)),
            quality: Quality::Good,
            ts_ms: Some(1_700_000_000_000),
            source_ts_ms: None,
            unit: Some("degC".into()),
        };
        assert_eq!(
            String::from_utf8(encode_value_object(&o)).unwrap(),
            r#"{"v":72.5,"q":"good","ts":1700000000000,"u":"degC"}"#
        );
        let nan = ValueObject {
            value: Some(Value::Float(f64::NAN)),
            quality: Quality::Bad,
            ts_ms: Some(1),
            source_ts_ms: Some(2),
            unit: None,
        };
        assert_eq!(
            String::from_utf8(encode_value_object(&nan)).unwrap(),
            r#"{"v":null,"q":"bad","ts":1,"src_ts":2}"#
        );
    }

    #[test]
    fn bare_values() {
        assert_eq!(
            decode_bare_value(b"75.5").unwrap(),
            Some(Value::Float(75.5))
        );
        assert_eq!(decode_bare_value(b"true").unwrap(), Some(Value::Bool(true)));
        assert_eq!(
            decode_bare_value(br#""on""#).unwrap(),
            Some(Value::String("on".into()))
        );
        assert!(decode_bare_value(b"{}").is_err());
    }

    fn arb_value() -> impl Strategy<Value = Option<Value>> {
        prop_oneof![
            Just(None),
            any::<bool>().prop_map(|b| Some(Value::Bool(b))),
            any::<i64>().prop_map(|i| Some(Value::Int(i))),
            (i64::MAX as u64 + 1..=u64::MAX).prop_map(|u| Some(Value::UInt(u))),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| Some(Value::Float(f))),
            "\\PC{0,20}".prop_map(|s| Some(Value::String(s))),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(value in arb_value(), q in proptest::sample::select(Quality::ALL.to_vec()),
                      ts in proptest::option::of(0i64..i64::MAX), src in proptest::option::of(any::<i64>()),
                      unit in proptest::option::of("\\PC{0,8}")) {
            let o = ValueObject { value, quality: q, ts_ms: ts, source_ts_ms: src, unit };
            let back = decode_value_object(&encode_value_object(&o)).unwrap();
            // Integral floats come back as floats because serde_json keeps the ".0".
            prop_assert_eq!(back, o);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_value_object(&bytes);
            let _ = decode_bare_value(&bytes);
        }
    }
}
