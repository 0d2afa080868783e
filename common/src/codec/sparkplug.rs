//! Sparkplug B: topics (`spBv1.0/<group>/<type>/<edge node>[/<device>]`) and protobuf payloads,
//! on `srad-types` (prost). Our own small types keep the rest of Nexus free of the generated
//! structs; conversion follows the Sparkplug B 3.0 encoding rules (signed integers travel as
//! two's-complement bits in the unsigned `int_value`/`long_value` fields).

use srad_types::payload::{
    metric, property_value, DataType, Message, Metric, Payload, PropertySet, PropertyValue,
};

use crate::domain::Value;

pub const NAMESPACE: &str = "spBv1.0";

/// The property that carries a metric's engineering unit (the name Sparkplug hosts use).
pub const ENG_UNIT: &str = "engUnit";

/// Sparkplug message types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    NBirth,
    NDeath,
    NData,
    NCmd,
    DBirth,
    DDeath,
    DData,
    DCmd,
    State,
}

impl MessageType {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageType::NBirth => "NBIRTH",
            MessageType::NDeath => "NDEATH",
            MessageType::NData => "NDATA",
            MessageType::NCmd => "NCMD",
            MessageType::DBirth => "DBIRTH",
            MessageType::DDeath => "DDEATH",
            MessageType::DData => "DDATA",
            MessageType::DCmd => "DCMD",
            MessageType::State => "STATE",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "NBIRTH" => MessageType::NBirth,
            "NDEATH" => MessageType::NDeath,
            "NDATA" => MessageType::NData,
            "NCMD" => MessageType::NCmd,
            "DBIRTH" => MessageType::DBirth,
            "DDEATH" => MessageType::DDeath,
            "DDATA" => MessageType::DData,
            "DCMD" => MessageType::DCmd,
            "STATE" => MessageType::State,
            _ => return None,
        })
    }

    pub fn is_device(self) -> bool {
        matches!(
            self,
            MessageType::DBirth | MessageType::DDeath | MessageType::DData | MessageType::DCmd
        )
    }
}

/// A parsed Sparkplug topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparkplugTopic {
    pub group: String,
    pub message_type: MessageType,
    pub edge_node: String,
    pub device: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SparkplugError {
    #[error("not a Sparkplug B topic: {0:?}")]
    NotSparkplug(String),
    #[error("Sparkplug topic {topic:?}: {reason}")]
    BadTopic { topic: String, reason: &'static str },
    #[error("Sparkplug payload does not decode: {0}")]
    Decode(String),
    #[error("Sparkplug metric {metric}: {reason}")]
    BadMetric { metric: String, reason: String },
}

impl SparkplugError {
    pub fn reason(&self) -> &'static str {
        match self {
            SparkplugError::NotSparkplug(_) | SparkplugError::BadTopic { .. } => "sparkplug_topic",
            SparkplugError::Decode(_) => "sparkplug_decode",
            SparkplugError::BadMetric { .. } => "sparkplug_metric",
        }
    }
}

impl SparkplugTopic {
    pub fn parse(topic: &str) -> Result<Self, SparkplugError> {
        let mut parts = topic.split('/');
        if parts.next() != Some(NAMESPACE) {
            return Err(SparkplugError::NotSparkplug(topic.to_owned()));
        }
        let bad = |reason| SparkplugError::BadTopic {
            topic: topic.to_owned(),
            reason,
        };
        let group = parts
            .next()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("missing group id"))?;
        let mt = parts.next().ok_or_else(|| bad("missing message type"))?;
        let message_type = MessageType::parse(mt).ok_or_else(|| bad("unknown message type"))?;
        let edge_node = parts
            .next()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("missing edge node id"))?;
        let device = parts.next().map(str::to_owned);
        if parts.next().is_some() {
            return Err(bad("too many levels"));
        }
        if message_type.is_device() && device.as_deref().is_none_or(str::is_empty) {
            return Err(bad("device message without a device id"));
        }
        if !message_type.is_device() && device.is_some() {
            return Err(bad("node message with a device id"));
        }
        Ok(SparkplugTopic {
            group: group.to_owned(),
            message_type,
            edge_node: edge_node.to_owned(),
            device,
        })
    }

    pub fn to_topic_string(&self) -> String {
        let mut s = format!(
            "{NAMESPACE}/{}/{}/{}",
            self.group,
            self.message_type.as_str(),
            self.edge_node
        );
        if let Some(d) = &self.device {
            s.push('/');
            s.push_str(d);
        }
        s
    }
}

/// The Sparkplug datatypes Nexus maps to [`Value`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpDataType {
    Int8,
    Int16,
    Int32,
    Int64,
    UInt8,
    UInt16,
    UInt32,
    UInt64,
    Float,
    Double,
    Boolean,
    String,
    DateTime,
    Text,
}

impl SpDataType {
    fn to_proto(self) -> DataType {
        match self {
            SpDataType::Int8 => DataType::Int8,
            SpDataType::Int16 => DataType::Int16,
            SpDataType::Int32 => DataType::Int32,
            SpDataType::Int64 => DataType::Int64,
            SpDataType::UInt8 => DataType::UInt8,
            SpDataType::UInt16 => DataType::UInt16,
            SpDataType::UInt32 => DataType::UInt32,
            SpDataType::UInt64 => DataType::UInt64,
            SpDataType::Float => DataType::Float,
            SpDataType::Double => DataType::Double,
            SpDataType::Boolean => DataType::Boolean,
            SpDataType::String => DataType::String,
            SpDataType::DateTime => DataType::DateTime,
            SpDataType::Text => DataType::Text,
        }
    }

    fn from_proto(code: u32) -> Option<Self> {
        let dt = DataType::try_from(i32::try_from(code).ok()?).ok()?;
        Some(match dt {
            DataType::Int8 => SpDataType::Int8,
            DataType::Int16 => SpDataType::Int16,
            DataType::Int32 => SpDataType::Int32,
            DataType::Int64 => SpDataType::Int64,
            DataType::UInt8 => SpDataType::UInt8,
            DataType::UInt16 => SpDataType::UInt16,
            DataType::UInt32 => SpDataType::UInt32,
            DataType::UInt64 => SpDataType::UInt64,
            DataType::Float => SpDataType::Float,
            DataType::Double => SpDataType::Double,
            DataType::Boolean => SpDataType::Boolean,
            DataType::String => SpDataType::String,
            DataType::DateTime => SpDataType::DateTime,
            DataType::Text => SpDataType::Text,
            _ => return None,
        })
    }

    /// The natural Sparkplug type for a value.
    pub fn for_value(v: &Value) -> Self {
        match v {
            Value::Bool(_) => SpDataType::Boolean,
            Value::Int(_) => SpDataType::Int64,
            Value::UInt(_) => SpDataType::UInt64,
            Value::Float(_) => SpDataType::Double,
            Value::String(_) => SpDataType::String,
        }
    }
}

/// One metric. In DATA messages a metric usually carries only its alias; `datatype` is then
/// taken from the birth certificate by the consumer.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SpMetric {
    pub name: Option<String>,
    pub alias: Option<u64>,
    pub timestamp: Option<u64>,
    pub datatype: Option<SpDataType>,
    /// `None` when the metric is null (`is_null`) or carries a type Nexus does not map.
    pub value: Option<Value>,
    /// `is_historical`: a value sent late (store-and-forward), not the current one.
    pub historical: bool,
    /// The engineering unit, the `engUnit` property (births carry it).
    pub unit: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct SpPayload {
    pub timestamp: Option<u64>,
    pub seq: Option<u64>,
    pub metrics: Vec<SpMetric>,
}

fn metric_label(m: &Metric) -> String {
    match (&m.name, m.alias) {
        (Some(n), _) => n.clone(),
        (None, Some(a)) => format!("alias {a}"),
        (None, None) => "(unnamed)".into(),
    }
}

fn encode_value(dt: SpDataType, v: &Value) -> Option<metric::Value> {
    use metric::Value as P;
    Some(match (dt, v) {
        (SpDataType::Boolean, Value::Bool(b)) => P::BooleanValue(*b),
        (SpDataType::Int8 | SpDataType::Int16 | SpDataType::Int32, Value::Int(i)) => {
            P::IntValue(*i as i32 as u32)
        }
        (SpDataType::UInt8 | SpDataType::UInt16 | SpDataType::UInt32, Value::UInt(u)) => {
            P::IntValue(*u as u32)
        }
        (SpDataType::UInt8 | SpDataType::UInt16 | SpDataType::UInt32, Value::Int(i)) => {
            P::IntValue(*i as u32)
        }
        (SpDataType::Int64, Value::Int(i)) => P::LongValue(*i as u64),
        (SpDataType::UInt64 | SpDataType::DateTime, Value::UInt(u)) => P::LongValue(*u),
        (SpDataType::UInt64 | SpDataType::DateTime, Value::Int(i)) => P::LongValue(*i as u64),
        (SpDataType::Float, Value::Float(f)) => P::FloatValue(*f as f32),
        (SpDataType::Double, Value::Float(f)) => P::DoubleValue(*f),
        (SpDataType::String | SpDataType::Text, Value::String(s)) => P::StringValue(s.clone()),
        _ => return None,
    })
}

fn decode_value(dt: Option<SpDataType>, v: &metric::Value) -> Result<Value, String> {
    use metric::Value as P;
    Ok(match (dt, v) {
        (_, P::BooleanValue(b)) => Value::Bool(*b),
        (Some(SpDataType::Int8), P::IntValue(u)) => Value::Int(*u as i8 as i64),
        (Some(SpDataType::Int16), P::IntValue(u)) => Value::Int(*u as i16 as i64),
        (Some(SpDataType::Int32), P::IntValue(u)) => Value::Int(*u as i32 as i64),
        (_, P::IntValue(u)) => Value::Int(*u as i64),
        (Some(SpDataType::Int64), P::LongValue(u)) => Value::Int(*u as i64),
        (_, P::LongValue(u)) => match i64::try_from(*u) {
            Ok(i) if dt != Some(SpDataType::UInt64) => Value::Int(i),
            _ => Value::UInt(*u),
        },
        (_, P::FloatValue(f)) => Value::Float(*f as f64),
        (_, P::DoubleValue(f)) => Value::Float(*f),
        (_, P::StringValue(s)) => Value::String(s.clone()),
        (_, other) => return Err(format!("unsupported value kind {other:?}")),
    })
}

/// Encode a payload to protobuf bytes.
pub fn encode(p: &SpPayload) -> Result<Vec<u8>, SparkplugError> {
    let mut metrics = Vec::with_capacity(p.metrics.len());
    for m in &p.metrics {
        let mut pm = Metric::new();
        pm.name = m.name.clone();
        pm.alias = m.alias;
        pm.timestamp = m.timestamp;
        if m.historical {
            pm.is_historical = Some(true);
        }
        if let Some(unit) = &m.unit {
            pm.properties = Some(PropertySet {
                keys: vec![ENG_UNIT.to_owned()],
                values: vec![PropertyValue {
                    r#type: Some(DataType::String as u32),
                    is_null: None,
                    value: Some(property_value::Value::StringValue(unit.clone())),
                }],
            });
        }
        match &m.value {
            None => {
                pm.datatype = m.datatype.map(|d| d.to_proto() as u32);
                pm.is_null = Some(true);
            }
            Some(v) => {
                let dt = m.datatype.unwrap_or_else(|| SpDataType::for_value(v));
                pm.datatype = Some(dt.to_proto() as u32);
                pm.value = Some(
                    encode_value(dt, v).ok_or_else(|| SparkplugError::BadMetric {
                        metric: metric_label(&pm),
                        reason: format!("a {} value does not fit datatype {dt:?}", v.type_name()),
                    })?,
                );
            }
        }
        metrics.push(pm);
    }
    let payload = Payload {
        timestamp: p.timestamp,
        metrics,
        seq: p.seq,
        uuid: None,
        body: None,
    };
    Ok(payload.encode_to_vec())
}

/// Decode protobuf bytes. Metrics of types Nexus does not map (datasets, templates, arrays)
/// are reported as errors so a consumer can count them rather than store something wrong.
pub fn decode(bytes: &[u8]) -> Result<SpPayload, SparkplugError> {
    let p = Payload::decode(bytes).map_err(|e| SparkplugError::Decode(e.to_string()))?;
    let mut metrics = Vec::with_capacity(p.metrics.len());
    for m in &p.metrics {
        let datatype = match m.datatype {
            None => None,
            Some(code) => {
                Some(
                    SpDataType::from_proto(code).ok_or_else(|| SparkplugError::BadMetric {
                        metric: metric_label(m),
                        reason: format!("unsupported datatype {code}"),
                    })?,
                )
            }
        };
        let value =
            if m.is_null == Some(true) {
                None
            } else {
                match &m.value {
                    None => None,
                    Some(v) => Some(decode_value(datatype, v).map_err(|reason| {
                        SparkplugError::BadMetric {
                            metric: metric_label(m),
                            reason,
                        }
                    })?),
                }
            };
        let unit = m.properties.as_ref().and_then(|ps| {
            let i = ps.keys.iter().position(|k| k == ENG_UNIT)?;
            match ps.values.get(i)?.value.as_ref()? {
                property_value::Value::StringValue(u) => Some(u.clone()),
                _ => None,
            }
        });
        metrics.push(SpMetric {
            name: m.name.clone(),
            alias: m.alias,
            timestamp: m.timestamp,
            datatype,
            value,
            historical: m.is_historical == Some(true),
            unit,
        });
    }
    Ok(SpPayload {
        timestamp: p.timestamp,
        seq: p.seq,
        metrics,
    })
}

/// Decode a DATA metric whose datatype is only known from the birth certificate.
pub fn retype(value: &Value, dt: SpDataType) -> Value {
    match (dt, value) {
        (SpDataType::Int8, Value::Int(i)) => Value::Int(*i as i8 as i64),
        (SpDataType::Int16, Value::Int(i)) => Value::Int(*i as i16 as i64),
        (SpDataType::Int32, Value::Int(i)) => Value::Int(*i as i32 as i64),
        (SpDataType::UInt64, Value::Int(i)) => Value::UInt(*i as u64),
        (SpDataType::Int64, Value::UInt(u)) => Value::Int(*u as i64),
        _ => value.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn topics() {
        let t = SparkplugTopic::parse("spBv1.0/plant1/DDATA/edge-1/plc-7").unwrap();
        assert_eq!(t.group, "plant1");
        assert_eq!(t.message_type, MessageType::DData);
        assert_eq!(t.edge_node, "edge-1");
        assert_eq!(t.device.as_deref(), Some("plc-7"));
        assert_eq!(t.to_topic_string(), "spBv1.0/plant1/DDATA/edge-1/plc-7");
        let n = SparkplugTopic::parse("spBv1.0/g/NBIRTH/e").unwrap();
        assert_eq!(n.device, None);
        for (bad, want) in [
            ("spBv1.0/g/XDATA/e", "unknown message type"),
            ("spBv1.0/g/DDATA/e", "device message without a device id"),
            ("spBv1.0/g/NDATA/e/d", "node message with a device id"),
            ("spBv1.0/g/DDATA/e/d/x", "too many levels"),
            ("spBv1.0//NDATA/e", "missing group id"),
        ] {
            let e = SparkplugTopic::parse(bad).unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
        assert!(matches!(
            SparkplugTopic::parse("acme/x"),
            Err(SparkplugError::NotSparkplug(_))
        ));
    }

    #[test]
    fn signed_integers_use_twos_complement_bits() {
        let p = SpPayload {
            timestamp: Some(10),
            seq: Some(3),
            metrics: vec![SpMetric {
                name: Some("t".into()),
                alias: Some(1),
                timestamp: Some(9),
                datatype: Some(SpDataType::Int16),
                value: Some(Value::Int(-2)),
                ..Default::default()
            }],
        };
        let bytes = encode(&p).unwrap();
        let raw = Payload::decode(bytes.as_slice()).unwrap();
        assert_eq!(
            raw.metrics[0].value,
            Some(metric::Value::IntValue(0xFFFF_FFFE))
        );
        assert_eq!(decode(&bytes).unwrap(), p);
        // A DATA metric that relies on the birth's datatype.
        assert_eq!(
            retype(&Value::Int(0xFFFE), SpDataType::Int16),
            Value::Int(-2)
        );
    }

    #[test]
    fn byte_fixture_from_another_implementation() {
        // NDATA with seq 1 and a metric alias 5, Double 21.5, timestamp 1000, encoded by hand
        // from the Sparkplug B .proto (field 2 metrics, 3 seq; metric fields 2 alias, 3 ts,
        // 4 datatype, 13 double).
        let bytes: Vec<u8> = vec![
            0x12, 0x10, // metrics, 16 bytes
            0x10, 0x05, // alias 5
            0x18, 0xe8, 0x07, // timestamp 1000
            0x20, 0x0a, // datatype Double
            0x69, 0, 0, 0, 0, 0, 0x80, 0x35, 0x40, // double 21.5
            0x18, 0x01, // seq 1
        ];
        let p = decode(&bytes).unwrap();
        assert_eq!(p.seq, Some(1));
        assert_eq!(
            p.metrics,
            vec![SpMetric {
                name: None,
                alias: Some(5),
                timestamp: Some(1000),
                datatype: Some(SpDataType::Double),
                value: Some(Value::Float(21.5)),
                ..Default::default()
            }]
        );
    }

    #[test]
    fn unsupported_metric_types_are_errors_not_panics() {
        let mut m = Metric::new();
        m.name = Some("ds".into());
        m.datatype = Some(DataType::DataSet as u32);
        let bytes = Payload {
            timestamp: None,
            metrics: vec![m],
            seq: None,
            uuid: None,
            body: None,
        }
        .encode_to_vec();
        let e = decode(&bytes).unwrap_err();
        assert_eq!(e.reason(), "sparkplug_metric");
        assert!(e.to_string().contains("ds"), "{e}");
        let mismatch = SpPayload {
            metrics: vec![SpMetric {
                name: Some("b".into()),
                alias: None,
                timestamp: None,
                datatype: Some(SpDataType::Boolean),
                value: Some(Value::Float(1.0)),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(encode(&mismatch)
            .unwrap_err()
            .to_string()
            .contains("does not fit datatype Boolean"));
    }

    fn arb_metric() -> impl Strategy<Value = SpMetric> {
        let typed = prop_oneof![
            any::<bool>().prop_map(|b| (SpDataType::Boolean, Some(Value::Bool(b)))),
            any::<i8>().prop_map(|i| (SpDataType::Int8, Some(Value::Int(i as i64)))),
            any::<i16>().prop_map(|i| (SpDataType::Int16, Some(Value::Int(i as i64)))),
            any::<i32>().prop_map(|i| (SpDataType::Int32, Some(Value::Int(i as i64)))),
            any::<i64>().prop_map(|i| (SpDataType::Int64, Some(Value::Int(i)))),
            (i64::MAX as u64 + 1..=u64::MAX)
                .prop_map(|u| (SpDataType::UInt64, Some(Value::UInt(u)))),
            any::<f64>()
                .prop_filter("not nan", |f| !f.is_nan())
                .prop_map(|f| (SpDataType::Double, Some(Value::Float(f)))),
            "\\PC{0,16}".prop_map(|s| (SpDataType::String, Some(Value::String(s)))),
            Just((SpDataType::Double, None)),
        ];
        (
            proptest::option::of("[a-z/]{1,12}"),
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u64>()),
            typed,
            any::<bool>(),
            proptest::option::of("\\PC{0,8}"),
        )
            .prop_map(
                |(name, alias, timestamp, (dt, value), historical, unit)| SpMetric {
                    name,
                    alias,
                    timestamp,
                    datatype: Some(dt),
                    value,
                    historical,
                    unit,
                },
            )
    }

    proptest! {
        #[test]
        fn round_trip(ts in proptest::option::of(any::<u64>()), seq in proptest::option::of(0u64..256),
                      metrics in proptest::collection::vec(arb_metric(), 0..8)) {
            let p = SpPayload { timestamp: ts, seq, metrics };
            prop_assert_eq!(decode(&encode(&p).unwrap()).unwrap(), p);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn arbitrary_topics_never_panic(s in "\\PC{0,48}") {
            let _ = SparkplugTopic::parse(&s);
        }
    }
}
