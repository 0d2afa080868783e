//! OPC UA values and status codes <-> Nexus values, qualities and readings; writes converted
//! to the node's own data type.

use nexus_common::config::DataType;
use nexus_common::{Quality, Value};
use opcua::types::{DataValue, StatusCode, SubStatusCode, Variant};

use super::plan::TagSpec;
use crate::driver::Reading;
use crate::value::{widen, FloatWidth};

/// The gateway's quality for an OPC UA status code.
pub fn quality_of(status: StatusCode) -> Quality {
    use SubStatusCode as S;
    if status.is_good() {
        return Quality::Good;
    }
    let sub = status.sub_code();
    if status.is_uncertain() {
        return match sub {
            S::UncertainLastUsableValue => Quality::UncertainLastUsable,
            S::UncertainSensorNotAccurate => Quality::UncertainSensorNotAccurate,
            S::UncertainEngineeringUnitsExceeded => Quality::UncertainEuExceeded,
            S::UncertainSubNormal => Quality::UncertainSubNormal,
            _ => Quality::Uncertain,
        };
    }
    match sub {
        S::BadConfigurationError
        | S::BadNodeIdUnknown
        | S::BadNodeIdInvalid
        | S::BadAttributeIdInvalid
        | S::BadTypeMismatch
        | S::BadNotReadable => Quality::BadConfigError,
        S::BadNotConnected | S::BadServerNotConnected => Quality::BadNotConnected,
        S::BadDeviceFailure => Quality::BadDeviceFailure,
        S::BadSensorFailure => Quality::BadSensorFailure,
        S::BadOutOfService => Quality::BadOutOfService,
        S::BadCommunicationError | S::BadTimeout => Quality::BadCommFailure,
        _ => Quality::Bad,
    }
}

/// A variant as a gateway value (`None` for empty or structured values).
pub fn value_of(v: &Variant) -> Option<Value> {
    Some(match v {
        Variant::Boolean(b) => Value::Bool(*b),
        Variant::SByte(x) => Value::Int(i64::from(*x)),
        Variant::Byte(x) => Value::Int(i64::from(*x)),
        Variant::Int16(x) => Value::Int(i64::from(*x)),
        Variant::UInt16(x) => Value::Int(i64::from(*x)),
        Variant::Int32(x) => Value::Int(i64::from(*x)),
        Variant::UInt32(x) => Value::Int(i64::from(*x)),
        Variant::Int64(x) => Value::Int(*x),
        Variant::UInt64(x) => i64::try_from(*x).map(Value::Int).unwrap_or(Value::UInt(*x)),
        Variant::Float(x) => Value::Float(widen(*x)),
        Variant::Double(x) => Value::Float(*x),
        Variant::String(s) => Value::String(s.as_ref().to_owned()),
        Variant::LocalizedText(t) => Value::String(t.text.as_ref().to_owned()),
        Variant::DateTime(d) => Value::String(d.as_chrono().to_rfc3339()),
        Variant::StatusCode(c) => Value::String(c.to_string()),
        Variant::NodeId(n) => Value::String(n.to_string()),
        _ => return None,
    })
}

/// One tag's reading from a data value.
pub fn reading_of(spec: &TagSpec, dv: &DataValue) -> Reading {
    let status = dv.status.unwrap_or(StatusCode::Good);
    let source_ts_ms = dv
        .source_timestamp
        .map(|t| t.as_chrono().timestamp_millis());
    let quality = quality_of(status);
    if status.is_bad() {
        return Reading::Bad {
            quality,
            reason: format!("OPC UA status {status}"),
        };
    }
    let Some(raw) = dv.value.as_ref().and_then(value_of) else {
        return Reading::Bad {
            quality: Quality::BadConfigError,
            reason: format!(
                "no scalar value ({:?})",
                dv.value.as_ref().map(|v| v.type_id())
            ),
        };
    };
    let width = match dv.value {
        Some(Variant::Float(_)) => FloatWidth::Single,
        _ => FloatWidth::Double,
    };
    let value = crate::value::apply_scale(raw, width, spec.scale, spec.offset);
    if status.is_uncertain() {
        Reading::Uncertain {
            value,
            quality,
            source_ts_ms,
        }
    } else {
        Reading::Good {
            value,
            source_ts_ms,
        }
    }
}

/// Why a written value cannot become the node's variant.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConvertError {
    #[error("a {got} value cannot be written to a numeric node")]
    NotNumeric { got: &'static str },
    #[error("value {value} is not a whole number for {node_type}")]
    NotWhole {
        value: Value,
        node_type: &'static str,
    },
    #[error("value {value} does not fit {node_type}")]
    OutOfRange {
        value: Value,
        node_type: &'static str,
    },
    #[error("a Boolean node takes true/false, not {value}")]
    NotBoolean { value: Value },
    #[error("a String node takes text, not {value}")]
    NotText { value: Value },
    /// The node's variant type (as the library names it) has no conversion.
    #[error("writing to a node of type {variant_type} is not supported")]
    UnsupportedType { variant_type: String },
}

/// Convert a value written by a user to the variant type `like` has (the node's current
/// value), after the inverse of scale/offset. `like` = `None`: from the tag's data type.
pub fn to_variant(
    value: &Value,
    like: Option<&Variant>,
    spec: &TagSpec,
) -> Result<Variant, ConvertError> {
    let engineering = |v: &Value| -> Result<f64, ConvertError> {
        let x = v
            .as_f64()
            .filter(|_| !matches!(v, Value::Bool(_)))
            .ok_or(ConvertError::NotNumeric { got: v.type_name() })?;
        Ok((x - spec.offset.unwrap_or(0.0)) / spec.scale.unwrap_or(1.0))
    };
    let int = |min: f64, max: f64, node_type: &'static str| -> Result<i64, ConvertError> {
        let x = engineering(value)?;
        if x.fract() != 0.0 && spec.scale.is_none() && spec.offset.is_none() {
            return Err(ConvertError::NotWhole {
                value: value.clone(),
                node_type,
            });
        }
        let r = x.round();
        if !(min..=max).contains(&r) {
            return Err(ConvertError::OutOfRange {
                value: value.clone(),
                node_type,
            });
        }
        Ok(r as i64)
    };
    let template = match like {
        Some(v) if !matches!(v, Variant::Empty) => v.clone(),
        _ => match spec.data_type {
            DataType::Bool => Variant::Boolean(false),
            DataType::Int16 | DataType::Int => Variant::Int16(0),
            DataType::Uint16 | DataType::Word => Variant::UInt16(0),
            DataType::Int32 | DataType::Dint => Variant::Int32(0),
            DataType::Uint32 | DataType::Dword => Variant::UInt32(0),
            DataType::Int64 => Variant::Int64(0),
            DataType::Uint64 => Variant::UInt64(0),
            DataType::Float32 | DataType::Real => Variant::Float(0.0),
            DataType::Float64 | DataType::Lreal => Variant::Double(0.0),
            DataType::Byte => Variant::Byte(0),
            DataType::String => Variant::from(""),
        },
    };
    Ok(match template {
        Variant::Boolean(_) => Variant::Boolean(match value {
            Value::Bool(b) => *b,
            Value::Int(0) | Value::UInt(0) => false,
            Value::Int(1) | Value::UInt(1) => true,
            v => return Err(ConvertError::NotBoolean { value: v.clone() }),
        }),
        Variant::SByte(_) => Variant::SByte(int(-128.0, 127.0, "SByte")? as i8),
        Variant::Byte(_) => Variant::Byte(int(0.0, 255.0, "Byte")? as u8),
        Variant::Int16(_) => Variant::Int16(int(-32768.0, 32767.0, "Int16")? as i16),
        Variant::UInt16(_) => Variant::UInt16(int(0.0, 65535.0, "UInt16")? as u16),
        Variant::Int32(_) => Variant::Int32(int(i32::MIN as f64, i32::MAX as f64, "Int32")? as i32),
        Variant::UInt32(_) => Variant::UInt32(int(0.0, u32::MAX as f64, "UInt32")? as u32),
        Variant::Int64(_) => match value {
            Value::Int(i) if spec.scale.is_none() && spec.offset.is_none() => Variant::Int64(*i),
            _ => Variant::Int64(int(i64::MIN as f64, i64::MAX as f64, "Int64")?),
        },
        Variant::UInt64(_) => match value {
            Value::UInt(u) if spec.scale.is_none() && spec.offset.is_none() => Variant::UInt64(*u),
            Value::Int(i) if *i >= 0 && spec.scale.is_none() && spec.offset.is_none() => {
                Variant::UInt64(*i as u64)
            }
            _ => Variant::UInt64(int(0.0, u64::MAX as f64, "UInt64")? as u64),
        },
        Variant::Float(_) => {
            let x = engineering(value)?;
            if x.is_finite() && x.abs() > f32::MAX as f64 {
                return Err(ConvertError::OutOfRange {
                    value: value.clone(),
                    node_type: "Float",
                });
            }
            Variant::Float(x as f32)
        }
        Variant::Double(_) => Variant::Double(engineering(value)?),
        Variant::String(_) | Variant::LocalizedText(_) => match value {
            Value::String(s) => Variant::from(s.as_str()),
            v => return Err(ConvertError::NotText { value: v.clone() }),
        },
        other => {
            return Err(ConvertError::UnsupportedType {
                variant_type: format!("{:?}", other.type_id()),
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dt: DataType) -> TagSpec {
        TagSpec {
            node: "ns=2;s=x".into(),
            data_type: dt,
            scale: None,
            offset: None,
            deadband: None,
        }
    }

    #[test]
    fn statuses_map_to_qualities_and_values_convert() {
        assert_eq!(quality_of(StatusCode::Good), Quality::Good);
        assert_eq!(
            quality_of(StatusCode::BadNodeIdUnknown),
            Quality::BadConfigError
        );
        assert_eq!(
            quality_of(StatusCode::BadCommunicationError),
            Quality::BadCommFailure
        );
        assert_eq!(
            quality_of(StatusCode::UncertainLastUsableValue),
            Quality::UncertainLastUsable
        );
        let dv = DataValue {
            value: Some(Variant::Float(60.75)),
            status: Some(StatusCode::UncertainSensorNotAccurate),
            source_timestamp: Some(opcua::types::DateTime::from(
                1_700_000_000_000i64 * 10_000 + 116_444_736_000_000_000,
            )),
            ..Default::default()
        };
        match reading_of(&spec(DataType::Float32), &dv) {
            Reading::Uncertain {
                value,
                quality,
                source_ts_ms,
            } => {
                assert_eq!(value, Value::Float(60.75));
                assert_eq!(quality, Quality::UncertainSensorNotAccurate);
                assert_eq!(source_ts_ms, Some(1_700_000_000_000));
            }
            other => panic!("{other:?}"),
        }
        let bad = DataValue {
            value: None,
            status: Some(StatusCode::BadNodeIdUnknown),
            ..Default::default()
        };
        assert!(matches!(
            reading_of(&spec(DataType::Int32), &bad),
            Reading::Bad {
                quality: Quality::BadConfigError,
                ..
            }
        ));
    }

    #[test]
    fn writes_take_the_node_type_and_check_ranges() {
        let s = spec(DataType::Float64);
        assert_eq!(
            to_variant(&Value::Int(7), Some(&Variant::Int16(0)), &s).unwrap(),
            Variant::Int16(7)
        );
        let e = to_variant(&Value::Int(70_000), Some(&Variant::Int16(0)), &s).unwrap_err();
        assert_eq!(
            e,
            ConvertError::OutOfRange {
                value: Value::Int(70_000),
                node_type: "Int16"
            }
        );
        assert_eq!(e.to_string(), "value 70000 does not fit Int16");
        let e = to_variant(&Value::Float(1.5), Some(&Variant::Int32(0)), &s).unwrap_err();
        assert_eq!(e.to_string(), "value 1.5 is not a whole number for Int32");
        assert_eq!(
            to_variant(&Value::Float(1.5), Some(&Variant::Double(0.0)), &s).unwrap(),
            Variant::Double(1.5)
        );
        assert_eq!(
            to_variant(&Value::Bool(true), Some(&Variant::Boolean(false)), &s).unwrap(),
            Variant::Boolean(true)
        );
        assert_eq!(
            to_variant(&Value::String("x".into()), Some(&Variant::Double(0.0)), &s)
                .unwrap_err()
                .to_string(),
            "a string value cannot be written to a numeric node"
        );
        assert_eq!(
            to_variant(&Value::String("ok".into()), Some(&Variant::from("")), &s).unwrap(),
            Variant::from("ok")
        );
        // Without a current value the tag's data type decides; scale is undone first.
        let scaled = TagSpec {
            scale: Some(0.1),
            ..spec(DataType::Int16)
        };
        assert_eq!(
            to_variant(&Value::Float(61.5), None, &scaled).unwrap(),
            Variant::Int16(615)
        );
    }
}
