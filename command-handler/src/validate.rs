//! Validation before any device I/O: device exists and is enabled, tag exists, tag is
//! writable, value has the tag's type (or converts to it without loss), within the type's
//! range and the tag's `min`/`max`. Every refusal names the rule that failed.

use nexus_common::config::{DataType, TagConfig};
use nexus_common::Value;
use nexus_devices::Device;

/// Which rule refused a write (the `reason` label of `nexus_commands_rejected_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    UnknownDevice,
    DeviceDisabled,
    UnknownTag,
    NotWritable,
    WrongType,
    OutOfRange,
}

impl Rule {
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::UnknownDevice => "unknown_device",
            Rule::DeviceDisabled => "device_disabled",
            Rule::UnknownTag => "unknown_tag",
            Rule::NotWritable => "not_writable",
            Rule::WrongType => "wrong_type",
            Rule::OutOfRange => "out_of_range",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Invalid {
    pub rule: Rule,
    pub message: String,
}

fn invalid(rule: Rule, message: String) -> Invalid {
    Invalid { rule, message }
}

fn int_range(dt: DataType) -> Option<(i128, i128)> {
    Some(match dt {
        DataType::Int16 | DataType::Int => (i16::MIN as i128, i16::MAX as i128),
        DataType::Uint16 | DataType::Word => (0, u16::MAX as i128),
        DataType::Int32 | DataType::Dint => (i32::MIN as i128, i32::MAX as i128),
        DataType::Uint32 | DataType::Dword => (0, u32::MAX as i128),
        DataType::Int64 => (i64::MIN as i128, i64::MAX as i128),
        DataType::Uint64 => (0, u64::MAX as i128),
        DataType::Byte => (0, 255),
        _ => return None,
    })
}

fn type_label(dt: DataType) -> String {
    format!("{dt:?}").to_lowercase()
}

/// Convert `value` to what `tag` takes, or say why not.
pub fn coerce(tag: &TagConfig, value: &Value) -> Result<Value, Invalid> {
    let dt = tag.data_type;
    let wrong = |want: &str| {
        invalid(
            Rule::WrongType,
            format!(
                "tag {} takes {want} ({}), not {} {value}",
                tag.id,
                type_label(dt),
                value.type_name()
            ),
        )
    };
    let scaled = tag.scale.is_some() || tag.offset.is_some();
    let v = match dt {
        DataType::Bool => match value {
            Value::Bool(b) => Value::Bool(*b),
            Value::Int(0) | Value::UInt(0) => Value::Bool(false),
            Value::Int(1) | Value::UInt(1) => Value::Bool(true),
            _ => return Err(wrong("a bool")),
        },
        DataType::String => match value {
            Value::String(s) => {
                if let Some(len) = tag.length {
                    if s.len() > len as usize {
                        return Err(invalid(
                            Rule::OutOfRange,
                            format!(
                                "tag {} holds at most {len} bytes, the value has {}",
                                tag.id,
                                s.len()
                            ),
                        ));
                    }
                }
                Value::String(s.clone())
            }
            _ => return Err(wrong("a string")),
        },
        DataType::Float32 | DataType::Float64 | DataType::Real | DataType::Lreal => match value {
            Value::Bool(_) | Value::String(_) => return Err(wrong("a number")),
            v => Value::Float(v.as_f64().unwrap_or(0.0)),
        },
        _ if scaled => match value {
            // An engineering value; the driver converts it to the raw integer.
            Value::Bool(_) | Value::String(_) => return Err(wrong("a number")),
            v => Value::Float(v.as_f64().unwrap_or(0.0)),
        },
        _ => {
            let n: i128 = match value {
                Value::Int(i) => *i as i128,
                Value::UInt(u) => *u as i128,
                Value::Float(f) if f.fract() == 0.0 && f.is_finite() => *f as i128,
                Value::Float(f) => {
                    return Err(invalid(
                        Rule::WrongType,
                        format!(
                            "tag {} takes a whole number ({}), not {f}",
                            tag.id,
                            type_label(dt)
                        ),
                    ))
                }
                _ => return Err(wrong("a whole number")),
            };
            if let Some((lo, hi)) = int_range(dt) {
                if n < lo || n > hi {
                    return Err(invalid(
                        Rule::OutOfRange,
                        format!(
                            "value {n} does not fit {} tag {} ({lo}..{hi})",
                            type_label(dt),
                            tag.id
                        ),
                    ));
                }
            }
            match i64::try_from(n) {
                Ok(i) => Value::Int(i),
                Err(_) => Value::UInt(n as u64),
            }
        }
    };
    if let Some(x) = v.as_f64().filter(|_| !matches!(v, Value::Bool(_))) {
        if let Some(min) = tag.min {
            if x < min {
                return Err(invalid(
                    Rule::OutOfRange,
                    format!("value {x} is below min {min} of tag {}", tag.id),
                ));
            }
        }
        if let Some(max) = tag.max {
            if x > max {
                return Err(invalid(
                    Rule::OutOfRange,
                    format!("value {x} is above max {max} of tag {}", tag.id),
                ));
            }
        }
    }
    Ok(v)
}

/// Check a write of `tag_id` on `device` (looked up by `device_id`); returns the tag's index
/// and the value to write.
pub fn validate(
    device_id: &str,
    device: Option<&Device>,
    tag_id: &str,
    value: &Value,
) -> Result<(usize, Value), Invalid> {
    let Some(device) = device else {
        return Err(invalid(
            Rule::UnknownDevice,
            format!("unknown device {device_id}"),
        ));
    };
    if !device.cfg.enabled {
        return Err(invalid(
            Rule::DeviceDisabled,
            format!("device {device_id} is disabled"),
        ));
    }
    let Some((index, tag)) = device
        .cfg
        .tags
        .iter()
        .enumerate()
        .find(|(_, t)| t.id.as_str() == tag_id)
    else {
        return Err(invalid(
            Rule::UnknownTag,
            format!("device {device_id} has no tag {tag_id}"),
        ));
    };
    if !tag.access.writable() {
        return Err(invalid(
            Rule::NotWritable,
            format!("tag {tag_id} of device {device_id} is read-only (access: read)"),
        ));
    }
    Ok((index, coerce(tag, value)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_common::config::Config;

    fn device() -> Device {
        let yaml = r#"
devices:
  - id: plc-1
    protocol: modbus
    uns_prefix: a/b
    connection: { host: h }
    tags:
      - { id: sp, address: "HR:0", data_type: float32, access: readwrite, min: 0, max: 150 }
      - { id: count, address: "HR:2", data_type: int16, access: write }
      - { id: temp, address: "HR:3", data_type: int16 }
      - { id: run, address: "CO:0", data_type: bool, access: readwrite }
      - { id: name, address: "HR:10", data_type: string, length: 4, access: readwrite }
      - { id: scaled, address: "HR:20", data_type: int16, scale: 0.1, access: readwrite, max: 100 }
"#;
        let cfg = Config::from_str_with_env(yaml, None, &[]).unwrap();
        Device::compile(cfg.devices[0].clone()).unwrap()
    }

    #[test]
    fn every_rule() {
        let d = device();
        let check = |tag: &str, v: Value| validate("plc-1", Some(&d), tag, &v);
        assert_eq!(
            check("sp", Value::Int(75)).unwrap(),
            (0, Value::Float(75.0))
        );
        assert_eq!(
            check("count", Value::Float(12.0)).unwrap(),
            (1, Value::Int(12)),
            "lossless float to int"
        );
        assert_eq!(check("run", Value::Int(1)).unwrap(), (3, Value::Bool(true)));
        assert_eq!(
            check("scaled", Value::Float(12.5)).unwrap(),
            (5, Value::Float(12.5))
        );
        let cases = [
            (
                validate("nope", None, "sp", &Value::Int(1)),
                Rule::UnknownDevice,
                "unknown device nope",
            ),
            (
                check("missing", Value::Int(1)),
                Rule::UnknownTag,
                "device plc-1 has no tag missing",
            ),
            (
                check("temp", Value::Int(1)),
                Rule::NotWritable,
                "tag temp of device plc-1 is read-only",
            ),
            (
                check("sp", Value::String("hot".into())),
                Rule::WrongType,
                "tag sp takes a number (float32), not string hot",
            ),
            (
                check("count", Value::Float(1.5)),
                Rule::WrongType,
                "takes a whole number (int16), not 1.5",
            ),
            (
                check("run", Value::Int(5)),
                Rule::WrongType,
                "tag run takes a bool",
            ),
            (
                check("name", Value::Int(5)),
                Rule::WrongType,
                "takes a string",
            ),
            (
                check("sp", Value::Int(200)),
                Rule::OutOfRange,
                "value 200 is above max 150 of tag sp",
            ),
            (
                check("sp", Value::Float(-1.0)),
                Rule::OutOfRange,
                "value -1 is below min 0 of tag sp",
            ),
            (
                check("count", Value::Int(40000)),
                Rule::OutOfRange,
                "value 40000 does not fit int16 tag count",
            ),
            (
                check("name", Value::String("toolong".into())),
                Rule::OutOfRange,
                "holds at most 4 bytes",
            ),
            (
                check("scaled", Value::Int(101)),
                Rule::OutOfRange,
                "above max 100",
            ),
        ];
        for (r, rule, msg) in cases {
            let e = r.unwrap_err();
            assert_eq!(e.rule, rule, "{}", e.message);
            assert!(e.message.contains(msg), "{} vs {msg}", e.message);
        }
    }
}
