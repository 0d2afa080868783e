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
    nexus_common::domain::widen_f32(f)
}

/// The floating-point width of a raw value: a single-precision source (`float32`, S7 `real`,
/// an OPC UA `Float`) keeps single-precision digits after scaling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatWidth {
    Single,
    Double,
}

impl FloatWidth {
    /// The width of a tag data type's raw values (integers have none; `Double` is then moot).
    pub fn of(dt: DataType) -> FloatWidth {
        match dt {
            DataType::Float32 | DataType::Real => FloatWidth::Single,
            _ => FloatWidth::Double,
        }
    }
}

/// A decimal number `m × 10^e`, exact: scaling works on the decimals a person wrote (a scale
/// of `0.1`, an offset of `-273.15`), not on their binary approximations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Decimal {
    m: i128,
    e: i32,
}

impl Decimal {
    fn int(i: i128) -> Decimal {
        Decimal { m: i, e: 0 }
    }

    /// The shortest decimal that reads back as `x` (`None` when `x` is not finite).
    fn of(x: f64) -> Option<Decimal> {
        if !x.is_finite() {
            return None;
        }
        // `{:e}` prints the shortest round-trip digits: `2.12e1`, `-1e-7`, `0e0`.
        let s = format!("{x:e}");
        let (mantissa, exp) = s.split_once('e')?;
        let exp: i32 = exp.parse().ok()?;
        let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        let m: i128 = format!("{int}{frac}").parse().ok()?;
        Some(Decimal {
            m,
            e: exp.checked_sub(i32::try_from(frac.len()).ok()?)?,
        })
    }

    fn mul(self, o: Decimal) -> Option<Decimal> {
        Some(Decimal {
            m: self.m.checked_mul(o.m)?,
            e: self.e.checked_add(o.e)?,
        })
    }

    fn add(self, o: Decimal) -> Option<Decimal> {
        let (hi, lo) = if self.e >= o.e { (self, o) } else { (o, self) };
        let shift = u32::try_from(hi.e.checked_sub(lo.e)?).ok()?;
        let m = hi.m.checked_mul(10i128.checked_pow(shift)?)?;
        Some(Decimal {
            m: m.checked_add(lo.m)?,
            e: lo.e,
        })
    }

    /// The nearest `f64` or `f32` (the standard library's parsing rounds correctly).
    fn to<F: std::str::FromStr>(self) -> Option<F> {
        format!("{}e{}", self.m, self.e).parse().ok()
    }
}

/// Engineering value: `raw * scale + offset`, as a float, when either is set.
///
/// It is computed in decimal on the shortest forms of the three numbers, then rounded once to
/// the precision of the source, so it shows no more digits than the device has: an integer
/// register with a scale of `0.1` gives at most one decimal (`212` -> `21.2`, not
/// `21.200000000000003`), and a single-precision source (`width`) keeps single-precision
/// digits. Numbers too far apart for exact decimal arithmetic (past 38 digits) fall back to
/// binary floating point, where the difference is below the last digit anyway.
pub fn apply_scale(
    raw: Value,
    width: FloatWidth,
    scale: Option<f64>,
    offset: Option<f64>,
) -> Value {
    if scale.is_none() && offset.is_none() {
        return raw;
    }
    let (exact_raw, single) = match &raw {
        Value::Int(i) => (Some(Decimal::int(i128::from(*i))), false),
        Value::UInt(u) => (Some(Decimal::int(i128::from(*u))), false),
        Value::Float(x) => (Decimal::of(*x), width == FloatWidth::Single),
        Value::Bool(_) | Value::String(_) => return raw,
    };
    let (scale, offset) = (scale.unwrap_or(1.0), offset.unwrap_or(0.0));
    let exact = exact_raw.and_then(|r| r.mul(Decimal::of(scale)?)?.add(Decimal::of(offset)?));
    let double = exact
        .and_then(Decimal::to::<f64>)
        .unwrap_or_else(|| raw.as_f64().unwrap_or(f64::NAN) * scale + offset);
    if single {
        let narrow = exact.and_then(Decimal::to::<f32>).unwrap_or(double as f32);
        // Past the single-precision range the double is kept rather than an infinity.
        if narrow.is_finite() || !double.is_finite() {
            return Value::Float(widen(narrow));
        }
    }
    Value::Float(double)
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn scaled(raw: Value, width: FloatWidth, scale: f64, offset: f64) -> f64 {
        match apply_scale(raw, width, Some(scale), Some(offset)) {
            Value::Float(x) => x,
            other => panic!("not a float: {other:?}"),
        }
    }

    /// Decimals in the shortest form of `x` (`21.2` has 1, `1e-7` has 7, `2120` has 0).
    fn decimals(x: f64) -> usize {
        let s = format!("{x:e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let frac = mantissa.split_once('.').map_or(0, |(_, f)| f.len()) as i64;
        (frac - exp.parse::<i64>().unwrap_or(0)).max(0) as usize
    }

    #[test]
    fn scaled_integers_have_the_decimals_of_scale_and_offset() {
        // The demo's ambient: an int16 holding 212 with a scale of 0.1.
        let ambient = apply_scale(Value::Int(212), FloatWidth::Double, Some(0.1), None);
        assert_eq!(ambient, Value::Float(21.2));
        assert_eq!(212.0 * 0.1, 21.200000000000003, "what plain floats give");
        let cases: [(i64, f64, f64, &str); 8] = [
            (212, 0.1, 0.0, "21.2"),
            (215, 0.1, -1.0, "20.5"),
            (3, 0.1, 0.0, "0.3"),
            (-7, 0.001, 0.0, "-0.007"),
            (12_345, 0.001, 0.0, "12.345"),
            (2950, 0.1, -273.15, "21.85"),
            (7, 3.0, 0.7, "21.7"),
            (i64::MAX, 0.1, 0.0, "922337203685477600"),
        ];
        for (raw, scale, offset, want) in cases {
            let got = scaled(Value::Int(raw), FloatWidth::Double, scale, offset);
            assert_eq!(got.to_string(), want, "{raw} * {scale} + {offset}");
        }
        let big = scaled(Value::UInt(u64::MAX), FloatWidth::Double, 0.5, 0.0);
        assert_eq!(big, u64::MAX as f64 / 2.0);
    }

    #[test]
    fn single_precision_sources_keep_their_digits() {
        // float32 60.75294 (as decoded), scaled: the f32 digits, not 6.0752940000000004.
        let raw = Value::Float(widen(60.75294));
        assert_eq!(
            apply_scale(raw.clone(), FloatWidth::Single, Some(0.1), None),
            Value::Float(6.075294)
        );
        assert_eq!(
            apply_scale(raw, FloatWidth::Single, Some(1.0 / 3.0), None),
            Value::Float(widen(60.75294f32 / 3.0))
        );
        // Past the f32 range the double is kept, not an infinity.
        let huge = scaled(Value::Float(widen(f32::MAX)), FloatWidth::Single, 10.0, 0.0);
        assert!(huge.is_finite() && huge > f32::MAX as f64, "{huge}");
        // Doubles keep their own digits: 21.2 * 0.1 is 2.12.
        assert_eq!(
            scaled(Value::Float(21.2), FloatWidth::Double, 0.1, 0.0),
            2.12
        );
    }

    #[test]
    fn unscaled_and_non_numeric_values_are_left_alone() {
        for v in [
            Value::Int(212),
            Value::Float(0.1 + 0.2),
            Value::Bool(true),
            Value::String("x".into()),
        ] {
            assert_eq!(apply_scale(v.clone(), FloatWidth::Double, None, None), v);
        }
        assert_eq!(
            apply_scale(Value::Bool(true), FloatWidth::Double, Some(2.0), None),
            Value::Bool(true)
        );
        assert!(matches!(
            apply_scale(Value::Float(f64::NAN), FloatWidth::Single, Some(0.1), None),
            Value::Float(x) if x.is_nan()
        ));
        assert_eq!(
            apply_scale(
                Value::Float(f64::INFINITY),
                FloatWidth::Double,
                Some(2.0),
                None
            ),
            Value::Float(f64::INFINITY)
        );
    }

    /// A scale as people write them: 1, 2 or 5 times a power of ten, or a multiple of 0.25.
    fn written_scale() -> impl Strategy<Value = f64> {
        prop_oneof![
            (prop::sample::select(vec![1.0, 2.0, 5.0, 25.0]), -6i32..4).prop_map(|(k, p)| format!(
                "{k}e{p}"
            )
            .parse()
            .unwrap_or(1.0)),
            (-40i32..40).prop_map(|q| f64::from(q) * 0.25),
        ]
    }

    proptest! {
        /// Any integer register times a written scale, plus a written offset, is the exact
        /// decimal result, in no more decimals than scale and offset have together.
        #[test]
        fn integer_registers_gain_no_digits(
            raw in prop_oneof![any::<i16>().prop_map(i64::from), any::<i32>().prop_map(i64::from), any::<u16>().prop_map(i64::from)],
            scale in written_scale(),
            offset in prop_oneof![Just(0.0), (-100_000i32..100_000).prop_map(|c| f64::from(c) / 100.0)],
        ) {
            let x = scaled(Value::Int(raw), FloatWidth::Double, scale, offset);
            let d = decimals(scale).max(decimals(offset));
            prop_assert!(decimals(x) <= d, "{} * {} + {} = {}", raw, scale, offset, x);
            // The nearest double to the decimal result (integer arithmetic, in units of 10^-d).
            let unit = 10f64.powi(d as i32);
            let exact = i128::from(raw) * (scale * unit).round() as i128 + (offset * unit).round() as i128;
            prop_assert_eq!(Some(x), format!("{exact}e-{d}").parse::<f64>().ok());
        }

        /// A single-precision source stays a single-precision number, shown in its own digits.
        #[test]
        fn single_precision_sources_gain_no_double_digits(
            bits in any::<u32>(),
            scale in written_scale(),
            offset in prop_oneof![Just(0.0), (-1000i32..1000).prop_map(|c| f64::from(c) / 10.0)],
        ) {
            let f = f32::from_bits(bits);
            prop_assume!(f.is_finite());
            let x = scaled(Value::Float(widen(f)), FloatWidth::Single, scale, offset);
            let plain = f64::from(f) * scale + offset;
            if plain.abs() < f64::from(f32::MAX) {
                prop_assert_eq!(x, widen(x as f32), "{} * {} + {} = {}", f, scale, offset, x);
                prop_assert!(x.to_string().len() <= (x as f32).to_string().len());
                // Within single precision of the terms (the source's own digits stand for it);
                // below f32::MIN_POSITIVE (subnormal numbers) single precision is a fixed step
                // of 2^-149, not a relative one.
                let terms = (f64::from(f) * scale).abs() + offset.abs();
                let ulp = f64::from(f32::EPSILON) * terms.max(f64::from(f32::MIN_POSITIVE));
                let step = 2f64.powi(-149);
                prop_assert!((x - plain).abs() <= 2.0 * ulp + 2.0 * step, "{} vs {}", x, plain);
            } else {
                prop_assert!(x.is_finite());
            }
        }

        /// Doubles come out as the nearest double to the decimal result.
        #[test]
        fn doubles_are_the_nearest_to_the_decimal_result(
            raw in -1e9f64..1e9,
            scale in written_scale(),
        ) {
            let x = scaled(Value::Float(raw), FloatWidth::Double, scale, 0.0);
            let plain = raw * scale;
            prop_assert!((x - plain).abs() <= 2.0 * f64::EPSILON * plain.abs(), "{} vs {}", x, plain);
        }
    }
}
