//! Values <-> big-endian bytes for every tag data type, shared by the drivers whose devices
//! carry plain binary values (Modbus registers after byte-order correction, S7 memory as is):
//! integer ranges, floats, scale and offset, and the errors a write can meet.

use nexus_common::config::DataType;
use nexus_common::Value;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    #[error("expected {want} {unit}, got {got}")]
    Length {
        want: usize,
        got: usize,
        unit: &'static str,
    },
    #[error("{0} is not a data type of this protocol")]
    Unsupported(&'static str),
    #[error("value {value} does not fit {data_type}")]
    OutOfRange {
        value: String,
        data_type: &'static str,
    },
    #[error("a {got} value cannot be written to a {data_type} tag")]
    WrongType {
        got: &'static str,
        data_type: &'static str,
    },
}

pub fn type_name(dt: DataType) -> &'static str {
    match dt {
        DataType::Bool => "bool",
        DataType::Int16 => "int16",
        DataType::Uint16 => "uint16",
        DataType::Int32 => "int32",
        DataType::Uint32 => "uint32",
        DataType::Int64 => "int64",
        DataType::Uint64 => "uint64",
        DataType::Float32 => "float32",
        DataType::Float64 => "float64",
        DataType::String => "string",
        DataType::Byte => "byte",
        DataType::Int => "int",
        DataType::Dint => "dint",
        DataType::Word => "word",
        DataType::Dword => "dword",
        DataType::Real => "real",
        DataType::Lreal => "lreal",
    }
}

/// An f32 as the f64 with the same shortest decimal form (60.75294, not 60.7529411315918),
/// which is what a person reading the PLC expects to see.
pub fn widen(f: f32) -> f64 {
    if !f.is_finite() {
        return f as f64;
    }
    f.to_string().parse().unwrap_or(f as f64)
}

/// Engineering value: raw * scale + offset, as a float, when either is set.
pub fn apply_scale(raw: Value, scale: Option<f64>, offset: Option<f64>) -> Value {
    if scale.is_none() && offset.is_none() {
        return raw;
    }
    match raw.as_f64() {
        Some(x) if !matches!(raw, Value::Bool(_)) => {
            Value::Float(x * scale.unwrap_or(1.0) + offset.unwrap_or(0.0))
        }
        _ => raw,
    }
}

pub(crate) fn int_in(
    value: &Value,
    dt: DataType,
    min: i128,
    max: i128,
    scale: Option<f64>,
    offset: Option<f64>,
) -> Result<i128, CodecError> {
    let out_of_range = || CodecError::OutOfRange {
        value: value.to_string(),
        data_type: type_name(dt),
    };
    let raw: i128 = match (value, scale.is_some() || offset.is_some()) {
        (Value::Int(i), false) => *i as i128,
        (Value::UInt(u), false) => *u as i128,
        (Value::Float(f), false) if f.fract() == 0.0 && f.is_finite() => *f as i128,
        (Value::Float(_), false) => return Err(out_of_range()),
        (v, true) if !matches!(v, Value::Bool(_) | Value::String(_)) => {
            let x = v.as_f64().ok_or_else(out_of_range)?;
            let r = ((x - offset.unwrap_or(0.0)) / scale.unwrap_or(1.0)).round();
            if !r.is_finite() {
                return Err(out_of_range());
            }
            r as i128
        }
        (v, _) => {
            return Err(CodecError::WrongType {
                got: v.type_name(),
                data_type: type_name(dt),
            })
        }
    };
    if raw < min || raw > max {
        return Err(out_of_range());
    }
    Ok(raw)
}

/// Bytes a fixed-size value of `dt` takes (`None` for strings).
pub fn width(dt: DataType) -> Option<usize> {
    use DataType::*;
    match dt {
        Bool | Byte => Some(1),
        Int16 | Uint16 | Int | Word => Some(2),
        Int32 | Uint32 | Float32 | Dint | Dword | Real => Some(4),
        Int64 | Uint64 | Float64 | Lreal => Some(8),
        String => None,
    }
}

/// Decode a fixed-size value from its big-endian bytes (before scale/offset). A Modbus bool
/// spans a register (two bytes): any bit set is true.
pub fn decode_be(b: &[u8], dt: DataType) -> Result<Value, CodecError> {
    use DataType::*;
    let want = match dt {
        Bool => b.len().max(1),
        other => width(other).ok_or(CodecError::Unsupported(type_name(other)))?,
    };
    if b.len() != want {
        return Err(CodecError::Length {
            want,
            got: b.len(),
            unit: "bytes",
        });
    }
    let a = |n: usize| -> [u8; 8] {
        let mut x = [0u8; 8];
        x[..n].copy_from_slice(&b[..n]);
        x
    };
    Ok(match dt {
        Bool => Value::Bool(b.iter().any(|x| *x != 0)),
        Byte => Value::Int(i64::from(b[0])),
        Int16 | Int => Value::Int(i64::from(i16::from_be_bytes([b[0], b[1]]))),
        Uint16 | Word => Value::Int(i64::from(u16::from_be_bytes([b[0], b[1]]))),
        Int32 | Dint => Value::Int(i64::from(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))),
        Uint32 | Dword => Value::Int(i64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))),
        Float32 | Real => Value::Float(widen(f32::from_be_bytes([b[0], b[1], b[2], b[3]]))),
        Int64 => Value::Int(i64::from_be_bytes(a(8))),
        Uint64 => {
            let u = u64::from_be_bytes(a(8));
            i64::try_from(u).map(Value::Int).unwrap_or(Value::UInt(u))
        }
        Float64 | Lreal => Value::Float(f64::from_be_bytes(a(8))),
        String => return Err(CodecError::Unsupported("string")),
    })
}

/// Encode an engineering value of a fixed-size type into big-endian bytes (inverse of
/// scale/offset first). `bool_width` is the bytes a bool takes (a Modbus register: 2).
pub fn encode_be(
    value: &Value,
    dt: DataType,
    bool_width: usize,
    scale: Option<f64>,
    offset: Option<f64>,
) -> Result<Vec<u8>, CodecError> {
    use DataType::*;
    let int = |min: i128, max: i128| int_in(value, dt, min, max, scale, offset);
    Ok(match dt {
        Bool => {
            let on = match value {
                Value::Bool(b) => *b,
                Value::Int(0) | Value::UInt(0) => false,
                Value::Int(1) | Value::UInt(1) => true,
                v => {
                    return Err(CodecError::WrongType {
                        got: v.type_name(),
                        data_type: "bool",
                    })
                }
            };
            let mut out = vec![0u8; bool_width.max(1)];
            if let Some(last) = out.last_mut() {
                *last = u8::from(on);
            }
            out
        }
        Byte => vec![int(0, 255)? as u8],
        Int16 | Int => (int(i16::MIN.into(), i16::MAX.into())? as i16)
            .to_be_bytes()
            .to_vec(),
        Uint16 | Word => (int(0, u16::MAX.into())? as u16).to_be_bytes().to_vec(),
        Int32 | Dint => (int(i32::MIN.into(), i32::MAX.into())? as i32)
            .to_be_bytes()
            .to_vec(),
        Uint32 | Dword => (int(0, u32::MAX.into())? as u32).to_be_bytes().to_vec(),
        Int64 => (int(i64::MIN.into(), i64::MAX.into())? as i64)
            .to_be_bytes()
            .to_vec(),
        Uint64 => (int(0, u64::MAX.into())? as u64).to_be_bytes().to_vec(),
        Float32 | Float64 | Real | Lreal => {
            let x = match value {
                Value::Bool(_) | Value::String(_) => {
                    return Err(CodecError::WrongType {
                        got: value.type_name(),
                        data_type: type_name(dt),
                    })
                }
                v => v.as_f64().unwrap_or(0.0),
            };
            let raw = (x - offset.unwrap_or(0.0)) / scale.unwrap_or(1.0);
            if width(dt) == Some(4) {
                if raw.is_finite() && raw.abs() > f32::MAX as f64 {
                    return Err(CodecError::OutOfRange {
                        value: value.to_string(),
                        data_type: type_name(dt),
                    });
                }
                (raw as f32).to_be_bytes().to_vec()
            } else {
                raw.to_be_bytes().to_vec()
            }
        }
        String => return Err(CodecError::Unsupported("string")),
    })
}
