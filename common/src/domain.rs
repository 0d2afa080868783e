//! Domain types shared by every service: values, qualities, data points and identifiers.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::topic::Topic;

/// A tag value as read from a device or carried on the UNS.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    String(String),
}

impl Value {
    /// The numeric view used by the historian (`metrics.value`) and by alarm limits.
    /// Booleans are 0/1; strings have no numeric view.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
            Value::Int(i) => Some(*i as f64),
            Value::UInt(u) => Some(*u as f64),
            Value::Float(f) => Some(*f),
            Value::String(_) => None,
        }
    }

    /// The type the historian stores and the APIs return the value as.
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::Bool(_) => ValueType::Bool,
            Value::Int(_) | Value::UInt(_) => ValueType::Integer,
            Value::Float(_) => ValueType::Float,
            Value::String(_) => ValueType::String,
        }
    }

    /// A single-precision value as the double with the same shortest decimal form (60.75294,
    /// not 60.7529411315918): what a person reading the device expects, and no more digits
    /// than the device has.
    pub fn from_f32(f: f32) -> Value {
        Value::Float(widen_f32(f))
    }

    /// The name of the variant, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::UInt(_) => "uint",
            Value::Float(_) => "float",
            Value::String(_) => "string",
        }
    }
}

/// The f64 whose shortest decimal form is the f32's (`f32::to_string` is the shortest form
/// that reads back as the same f32). Not finite: the plain conversion.
pub fn widen_f32(f: f32) -> f64 {
    if !f.is_finite() {
        return f64::from(f);
    }
    f.to_string().parse().unwrap_or(f64::from(f))
}

/// The four types a value has in the historian and its APIs. Every source type maps to one:
/// the gateway's tag data types, JSON values and Sparkplug B datatypes (docs/ingestion.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ValueType {
    /// `true`/`false`; stored as 0/1 in `metrics.value`.
    Bool,
    /// Signed or unsigned integers of any width; stored in `metrics.value` as a double, exact
    /// within ±2^53.
    Integer,
    /// Single and double precision.
    Float,
    /// Text; stored in `metrics.value_str`.
    String,
}

impl ValueType {
    pub const ALL: [ValueType; 4] = [
        ValueType::Bool,
        ValueType::Integer,
        ValueType::Float,
        ValueType::String,
    ];

    /// The name in the `metrics` view's `value_type` column.
    pub fn as_str(self) -> &'static str {
        match self {
            ValueType::Bool => "bool",
            ValueType::Integer => "integer",
            ValueType::Float => "float",
            ValueType::String => "string",
        }
    }

    /// The code stored in `points.value_type`.
    pub fn code(self) -> i16 {
        match self {
            ValueType::Bool => 1,
            ValueType::Integer => 2,
            ValueType::Float => 3,
            ValueType::String => 4,
        }
    }

    /// Inverse of [`ValueType::code`]; `None` for a code no version has written.
    pub fn from_code(code: i16) -> Option<ValueType> {
        ValueType::ALL.into_iter().find(|t| t.code() == code)
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::UInt(u) => write!(f, "{u}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::String(s) => f.write_str(s),
        }
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}
impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::UInt(v)
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::String(v.to_owned())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::String(v)
    }
}

/// Quality of a value, after the OPC UA status classes (good / uncertain / bad) with named
/// sub-reasons. The historian stores [`Quality::code`], the OPC DA quality byte, so the class
/// is `code & 0xC0` (192 good, 64 uncertain, 0 bad) and the sub-reason sits in the low bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quality {
    Good,
    GoodLocalOverride,
    Uncertain,
    UncertainLastUsable,
    UncertainSensorNotAccurate,
    UncertainEuExceeded,
    UncertainSubNormal,
    Bad,
    BadConfigError,
    BadNotConnected,
    BadDeviceFailure,
    BadSensorFailure,
    BadLastKnownValue,
    BadCommFailure,
    BadOutOfService,
}

/// The three OPC UA status classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QualityClass {
    Good,
    Uncertain,
    Bad,
}

const QUALITY_TABLE: [(Quality, &str, i16); 15] = [
    (Quality::Good, "good", 192),
    (Quality::GoodLocalOverride, "good_local_override", 216),
    (Quality::Uncertain, "uncertain", 64),
    (Quality::UncertainLastUsable, "uncertain_last_usable", 68),
    (
        Quality::UncertainSensorNotAccurate,
        "uncertain_sensor_not_accurate",
        80,
    ),
    (Quality::UncertainEuExceeded, "uncertain_eu_exceeded", 84),
    (Quality::UncertainSubNormal, "uncertain_sub_normal", 88),
    (Quality::Bad, "bad", 0),
    (Quality::BadConfigError, "bad_config_error", 4),
    (Quality::BadNotConnected, "bad_not_connected", 8),
    (Quality::BadDeviceFailure, "bad_device_failure", 12),
    (Quality::BadSensorFailure, "bad_sensor_failure", 16),
    (Quality::BadLastKnownValue, "bad_last_known_value", 20),
    (Quality::BadCommFailure, "bad_comm_failure", 24),
    (Quality::BadOutOfService, "bad_out_of_service", 28),
];

impl Quality {
    /// Every quality, in code order within each class.
    pub const ALL: [Quality; 15] = {
        let mut out = [Quality::Good; 15];
        let mut i = 0;
        while i < QUALITY_TABLE.len() {
            out[i] = QUALITY_TABLE[i].0;
            i += 1;
        }
        out
    };

    fn entry(self) -> (Quality, &'static str, i16) {
        // The table covers every variant; the fallback is unreachable but keeps this total.
        QUALITY_TABLE
            .iter()
            .copied()
            .find(|(q, _, _)| *q == self)
            .unwrap_or((Quality::Bad, "bad", 0))
    }

    /// The smallint stored by the historian.
    pub fn code(self) -> i16 {
        self.entry().2
    }

    /// The name used in the JSON value object (`"q"`).
    pub fn as_str(self) -> &'static str {
        self.entry().1
    }

    pub fn class(self) -> QualityClass {
        match self.code() & 0xC0 {
            0xC0 => QualityClass::Good,
            0x40 => QualityClass::Uncertain,
            _ => QualityClass::Bad,
        }
    }

    pub fn is_good(self) -> bool {
        self.class() == QualityClass::Good
    }

    /// Inverse of [`Quality::code`]; an unknown sub-reason maps to its class.
    pub fn from_code(code: i16) -> Quality {
        if let Some((q, _, _)) = QUALITY_TABLE.iter().find(|(_, _, c)| *c == code) {
            return *q;
        }
        match code & 0xC0 {
            0xC0 => Quality::Good,
            0x40 => Quality::Uncertain,
            _ => Quality::Bad,
        }
    }
}

impl fmt::Display for Quality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error for a quality name that is neither known nor prefixed by a known class.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown quality {0:?} (expected good, uncertain, bad or a sub-reason such as bad_comm_failure)")]
pub struct UnknownQuality(pub String);

impl FromStr for Quality {
    type Err = UnknownQuality;

    /// Accepts the names of [`Quality::as_str`] in any case; an unknown sub-reason with a
    /// known class prefix (`bad_whatever`) maps to its class so producers may be more precise
    /// than this table.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some((q, _, _)) = QUALITY_TABLE
            .iter()
            .find(|(_, n, _)| n.eq_ignore_ascii_case(s))
        {
            return Ok(*q);
        }
        let lower = s.to_ascii_lowercase();
        if lower.starts_with("good_") {
            Ok(Quality::Good)
        } else if lower.starts_with("uncertain_") {
            Ok(Quality::Uncertain)
        } else if lower.starts_with("bad_") {
            Ok(Quality::Bad)
        } else {
            Err(UnknownQuality(s.to_owned()))
        }
    }
}

impl Serialize for Quality {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Quality {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One value of one tag at one moment: what flows from the gateway to every consumer.
#[derive(Debug, Clone, PartialEq)]
pub struct DataPoint {
    pub topic: Topic,
    /// `None` when the device gave no usable value (bad quality without a last value).
    pub value: Option<Value>,
    pub quality: Quality,
    /// When the value was sampled by the gateway (unix ms). This is the `ts` of the value object.
    pub ts_ms: i64,
    /// When the source (PLC, OPC UA server) says the value changed, if it says (unix ms).
    pub source_ts_ms: Option<i64>,
    /// Engineering unit.
    pub unit: Option<String>,
}

/// Milliseconds since the unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Error for an identifier that cannot be one level of a topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} id is empty")]
    Empty { kind: &'static str },
    #[error("{kind} id {id:?} is longer than {max} bytes")]
    TooLong {
        kind: &'static str,
        id: String,
        max: usize,
    },
    #[error("{kind} id {id:?} contains {ch:?}; ids may use letters, digits, '-', '_' and '.'")]
    BadChar {
        kind: &'static str,
        id: String,
        ch: char,
    },
}

/// Longest device or tag id, in bytes.
pub const MAX_ID_LEN: usize = 128;

fn validate_id(kind: &'static str, id: &str) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if id.len() > MAX_ID_LEN {
        // Quoted in messages: the start is enough to find it, however long it was sent.
        let shown: String = id.chars().take(32).collect();
        return Err(IdError::TooLong {
            kind,
            id: format!("{shown}..."),
            max: MAX_ID_LEN,
        });
    }
    if let Some(ch) = id
        .chars()
        .find(|c| !(c.is_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(IdError::BadChar {
            kind,
            id: id.to_owned(),
            ch,
        });
    }
    Ok(())
}

macro_rules! id_type {
    ($name:ident, $kind:literal) => {
        #[doc = concat!("A validated ", $kind, " identifier: one topic level of letters, digits, `-`, `_`, `.`.")]
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn new(id: impl Into<String>) -> Result<Self, IdError> {
                let id = id.into();
                validate_id($kind, &id)?;
                Ok(Self(id))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(DeviceId, "device");
id_type!(TagId, "tag");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quality_codes_and_classes() {
        assert_eq!(Quality::Good.code(), 192);
        assert_eq!(Quality::Uncertain.code(), 64);
        assert_eq!(Quality::Bad.code(), 0);
        for q in Quality::ALL {
            assert_eq!(Quality::from_code(q.code()), q);
            assert_eq!(q.as_str().parse::<Quality>(), Ok(q));
            let class = match q.as_str().split('_').next() {
                Some("good") => QualityClass::Good,
                Some("uncertain") => QualityClass::Uncertain,
                _ => QualityClass::Bad,
            };
            assert_eq!(q.class(), class, "{q}");
        }
    }

    #[test]
    fn quality_parsing_is_tolerant_of_case_and_new_sub_reasons() {
        assert_eq!("GOOD".parse::<Quality>(), Ok(Quality::Good));
        assert_eq!(
            "bad_waiting_for_initial_data".parse::<Quality>(),
            Ok(Quality::Bad)
        );
        assert_eq!(
            "uncertain_initial".parse::<Quality>(),
            Ok(Quality::Uncertain)
        );
        let err = "fine".parse::<Quality>().unwrap_err();
        assert!(err.to_string().contains("\"fine\""), "{err}");
        assert_eq!(Quality::from_code(0xC4), Quality::Good);
        assert_eq!(Quality::from_code(0x46), Quality::Uncertain);
    }

    #[test]
    fn ids_are_single_clean_levels() {
        assert!(DeviceId::new("plc-001").is_ok());
        assert!(TagId::new("motor.speed_1").is_ok());
        assert_eq!(DeviceId::new(""), Err(IdError::Empty { kind: "device" }));
        let e = TagId::new("a/b").unwrap_err().to_string();
        assert!(e.contains("tag id \"a/b\" contains '/'"), "{e}");
        assert!(TagId::new("a+b").is_err());
        assert!(TagId::new("x".repeat(129)).is_err());
    }

    #[test]
    fn value_types_and_their_codes() {
        assert_eq!(Value::Bool(false).value_type(), ValueType::Bool);
        assert_eq!(Value::Int(-1).value_type(), ValueType::Integer);
        assert_eq!(Value::UInt(u64::MAX).value_type(), ValueType::Integer);
        assert_eq!(Value::Float(2.0).value_type(), ValueType::Float);
        assert_eq!(Value::from("x").value_type(), ValueType::String);
        for t in ValueType::ALL {
            assert_eq!(ValueType::from_code(t.code()), Some(t));
        }
        assert_eq!(ValueType::from_code(0), None);
        let names: Vec<&str> = ValueType::ALL.iter().map(|t| t.as_str()).collect();
        assert_eq!(names, ["bool", "integer", "float", "string"]);
    }

    #[test]
    fn single_precision_keeps_its_own_digits() {
        assert_eq!(widen_f32(21.2), 21.2);
        assert_eq!(f64::from(21.2f32), 21.200000762939453);
        assert_eq!(Value::from_f32(60.75294), Value::Float(60.75294));
        assert_eq!(widen_f32(f32::MAX) as f32, f32::MAX);
        assert!(widen_f32(f32::NAN).is_nan());
        assert_eq!(widen_f32(f32::NEG_INFINITY), f64::NEG_INFINITY);
    }

    proptest::proptest! {
        /// The widened value reads back as the same f32 and prints as the f32 does.
        #[test]
        fn widened_f32_is_the_same_number_in_its_own_digits(bits in proptest::prelude::any::<u32>()) {
            let f = f32::from_bits(bits);
            if f.is_finite() {
                let w = widen_f32(f);
                proptest::prop_assert_eq!(w as f32, f);
                proptest::prop_assert_eq!(w.to_string().parse::<f32>().ok(), Some(f));
                proptest::prop_assert!(w.to_string().len() <= f.to_string().len());
            }
        }
    }

    #[test]
    fn value_numeric_view() {
        assert_eq!(Value::Bool(true).as_f64(), Some(1.0));
        assert_eq!(Value::Int(-3).as_f64(), Some(-3.0));
        assert_eq!(Value::String("x".into()).as_f64(), None);
    }
}
