//! Register <-> value conversion for Modbus: data types, byte/word orders, strings, bits,
//! scale and offset. Pure functions, tested byte by byte.
//!
//! Byte orders name where the bytes of the big-endian value `A B C D ...` land in the
//! registers (each register is sent high byte first):
//! - `ABCD`: as is (the Modbus standard, big endian);
//! - `DCBA`: all bytes reversed (little endian);
//! - `BADC`: bytes swapped inside each register;
//! - `CDAB`: register (word) order reversed, bytes inside each register kept.

use nexus_common::config::{ByteOrder, DataType};
use nexus_common::Value;

pub use crate::value::{apply_scale, type_name, widen, CodecError, FloatWidth};
use crate::value::{decode_be, encode_be};

/// Move bytes between wire order (registers as sent, high byte first) and canonical order
/// (the big-endian value). Every order is its own inverse, so one function serves both ways.
fn reorder(mut bytes: Vec<u8>, order: ByteOrder) -> Vec<u8> {
    match order {
        ByteOrder::ABCD => {}
        ByteOrder::DCBA => bytes.reverse(),
        ByteOrder::BADC => bytes.chunks_mut(2).for_each(|c| c.swap(0, 1)),
        ByteOrder::CDAB => {
            let mut words: Vec<[u8; 2]> = bytes
                .chunks(2)
                .map(|c| [c[0], c.get(1).copied().unwrap_or(0)])
                .collect();
            words.reverse();
            bytes = words.concat();
        }
    }
    bytes
}

/// Registers -> bytes in canonical order.
fn canonical_bytes(regs: &[u16], order: ByteOrder) -> Vec<u8> {
    reorder(regs.iter().flat_map(|r| r.to_be_bytes()).collect(), order)
}

/// Canonical bytes -> registers; the inverse of [`canonical_bytes`].
fn wire_registers(bytes: Vec<u8>, order: ByteOrder) -> Vec<u16> {
    reorder(bytes, order)
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]))
        .collect()
}

/// Registers a value of this type needs (strings: `string_len` bytes).
pub fn register_count(dt: DataType, string_len: u16) -> usize {
    dt.modbus_registers(string_len) as usize
}

/// Decode the raw value (before scale/offset).
pub fn decode(
    regs: &[u16],
    dt: DataType,
    order: ByteOrder,
    string_len: u16,
) -> Result<Value, CodecError> {
    let want = register_count(dt, string_len);
    if regs.len() != want {
        return Err(CodecError::Length {
            want,
            got: regs.len(),
            unit: "registers",
        });
    }
    if dt == DataType::String {
        // Strings are byte sequences: only the within-register swap applies.
        let mut bytes: Vec<u8> = regs.iter().flat_map(|r| r.to_be_bytes()).collect();
        if matches!(order, ByteOrder::BADC | ByteOrder::DCBA) {
            bytes.chunks_mut(2).for_each(|c| c.swap(0, 1));
        }
        bytes.truncate(string_len as usize);
        let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
        let s = String::from_utf8_lossy(&bytes[..end]).trim_end().to_owned();
        return Ok(Value::String(s));
    }
    decode_be(&canonical_bytes(regs, order), dt)
}

/// Encode an engineering value into registers (inverse of scale/offset first).
pub fn encode(
    value: &Value,
    dt: DataType,
    order: ByteOrder,
    string_len: u16,
    scale: Option<f64>,
    offset: Option<f64>,
) -> Result<Vec<u16>, CodecError> {
    let bytes: Vec<u8> = match dt {
        DataType::String => {
            let Value::String(s) = value else {
                return Err(CodecError::WrongType {
                    got: value.type_name(),
                    data_type: "string",
                });
            };
            if s.len() > string_len as usize {
                return Err(CodecError::OutOfRange {
                    value: format!("{} bytes", s.len()),
                    data_type: "string",
                });
            }
            let mut b = s.as_bytes().to_vec();
            b.resize(register_count(dt, string_len) * 2, 0);
            if matches!(order, ByteOrder::BADC | ByteOrder::DCBA) {
                b.chunks_mut(2).for_each(|c| c.swap(0, 1));
            }
            return Ok(b
                .chunks(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect());
        }
        other => encode_be(value, other, 2, scale, offset)?,
    };
    Ok(wire_registers(bytes, order))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn float32_in_every_order() {
        // 123.456f32 = 0x42F6E979: A=42 B=F6 C=E9 D=79
        let cases = [
            (ByteOrder::ABCD, [0x42F6, 0xE979]),
            (ByteOrder::DCBA, [0x79E9, 0xF642]),
            (ByteOrder::BADC, [0xF642, 0x79E9]),
            (ByteOrder::CDAB, [0xE979, 0x42F6]),
        ];
        for (order, regs) in cases {
            let v = decode(&regs, DataType::Float32, order, 0).unwrap();
            assert_eq!(v, Value::Float(123.456), "{order:?}");
            assert_eq!(
                encode(&v, DataType::Float32, order, 0, None, None).unwrap(),
                regs.to_vec(),
                "{order:?}"
            );
        }
    }

    #[test]
    fn integers() {
        assert_eq!(
            decode(&[0xFFFE], DataType::Int16, ByteOrder::ABCD, 0).unwrap(),
            Value::Int(-2)
        );
        assert_eq!(
            decode(&[0xFFFE], DataType::Uint16, ByteOrder::ABCD, 0).unwrap(),
            Value::Int(65534)
        );
        assert_eq!(
            decode(&[0xFEFF], DataType::Int16, ByteOrder::DCBA, 0).unwrap(),
            Value::Int(-2)
        );
        assert_eq!(
            decode(&[0x0001, 0x0002], DataType::Uint32, ByteOrder::ABCD, 0).unwrap(),
            Value::Int(65538)
        );
        assert_eq!(
            decode(&[0x0002, 0x0001], DataType::Uint32, ByteOrder::CDAB, 0).unwrap(),
            Value::Int(65538)
        );
        let i64regs = [0x0102, 0x0304, 0x0506, 0x0708];
        assert_eq!(
            decode(&i64regs, DataType::Int64, ByteOrder::ABCD, 0).unwrap(),
            Value::Int(0x0102030405060708)
        );
        assert_eq!(
            decode(
                &[0x0708, 0x0506, 0x0304, 0x0102],
                DataType::Int64,
                ByteOrder::CDAB,
                0
            )
            .unwrap(),
            Value::Int(0x0102030405060708)
        );
        assert_eq!(
            decode(
                &[0x0807, 0x0605, 0x0403, 0x0201],
                DataType::Int64,
                ByteOrder::DCBA,
                0
            )
            .unwrap(),
            Value::Int(0x0102030405060708)
        );
        assert_eq!(
            decode(&[0xFFFF; 4], DataType::Uint64, ByteOrder::ABCD, 0).unwrap(),
            Value::UInt(u64::MAX)
        );
        assert_eq!(
            decode(&[0x4059, 0, 0, 0], DataType::Float64, ByteOrder::ABCD, 0).unwrap(),
            Value::Float(100.0)
        );
        assert!(matches!(
            decode(&[1], DataType::Int32, ByteOrder::ABCD, 0),
            Err(CodecError::Length {
                want: 2,
                got: 1,
                ..
            })
        ));
    }

    #[test]
    fn strings() {
        let regs = [0x4845, 0x4C4C, 0x4F00];
        assert_eq!(
            decode(&regs, DataType::String, ByteOrder::ABCD, 6).unwrap(),
            Value::String("HELLO".into())
        );
        let swapped = [0x4548, 0x4C4C, 0x004F];
        assert_eq!(
            decode(&swapped, DataType::String, ByteOrder::BADC, 6).unwrap(),
            Value::String("HELLO".into())
        );
        assert_eq!(
            encode(
                &Value::String("HELLO".into()),
                DataType::String,
                ByteOrder::ABCD,
                6,
                None,
                None
            )
            .unwrap(),
            regs.to_vec()
        );
        assert!(encode(
            &Value::String("TOO LONG".into()),
            DataType::String,
            ByteOrder::ABCD,
            6,
            None,
            None
        )
        .is_err());
    }

    #[test]
    fn scale_and_offset_both_ways() {
        let raw = decode(&[215], DataType::Int16, ByteOrder::ABCD, 0).unwrap();
        assert_eq!(
            apply_scale(raw, FloatWidth::of(DataType::Int16), Some(0.1), Some(-1.0)),
            Value::Float(20.5)
        );
        // 20.5 degC with scale 0.1, offset -1 -> raw 215
        assert_eq!(
            encode(
                &Value::Float(20.5),
                DataType::Int16,
                ByteOrder::ABCD,
                0,
                Some(0.1),
                Some(-1.0)
            )
            .unwrap(),
            vec![215]
        );
        assert_eq!(
            apply_scale(Value::Bool(true), FloatWidth::Double, Some(2.0), None),
            Value::Bool(true)
        );
    }

    #[test]
    fn writes_check_range_and_type() {
        let e = encode(
            &Value::Int(70000),
            DataType::Uint16,
            ByteOrder::ABCD,
            0,
            None,
            None,
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "value 70000 does not fit uint16");
        assert!(encode(
            &Value::Int(-1),
            DataType::Uint32,
            ByteOrder::ABCD,
            0,
            None,
            None
        )
        .is_err());
        assert!(
            encode(
                &Value::Float(1.5),
                DataType::Int16,
                ByteOrder::ABCD,
                0,
                None,
                None
            )
            .is_err(),
            "not lossless"
        );
        assert_eq!(
            encode(
                &Value::Float(3.0),
                DataType::Int16,
                ByteOrder::ABCD,
                0,
                None,
                None
            )
            .unwrap(),
            vec![3]
        );
        let e = encode(
            &Value::String("x".into()),
            DataType::Int16,
            ByteOrder::ABCD,
            0,
            None,
            None,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "a string value cannot be written to a int16 tag"
        );
        assert_eq!(
            encode(
                &Value::Bool(true),
                DataType::Bool,
                ByteOrder::ABCD,
                0,
                None,
                None
            )
            .unwrap(),
            vec![1]
        );
    }

    proptest! {
        #[test]
        fn round_trips(x in any::<i32>(), y in any::<u64>(), f in any::<f64>().prop_filter("finite", |f| f.is_finite()),
                       order in proptest::sample::select(vec![ByteOrder::ABCD, ByteOrder::DCBA, ByteOrder::BADC, ByteOrder::CDAB])) {
            let v = Value::Int(x as i64);
            prop_assert_eq!(decode(&encode(&v, DataType::Int32, order, 0, None, None).unwrap(), DataType::Int32, order, 0).unwrap(), v);
            let u = i64::try_from(y).map(Value::Int).unwrap_or(Value::UInt(y));
            prop_assert_eq!(decode(&encode(&u, DataType::Uint64, order, 0, None, None).unwrap(), DataType::Uint64, order, 0).unwrap(), u);
            let fv = Value::Float(f);
            prop_assert_eq!(decode(&encode(&fv, DataType::Float64, order, 0, None, None).unwrap(), DataType::Float64, order, 0).unwrap(), fv);
        }

        #[test]
        fn decode_never_panics(regs in proptest::collection::vec(any::<u16>(), 0..6), len in 0u16..12) {
            for dt in [DataType::Int16, DataType::Uint32, DataType::Float32, DataType::Int64, DataType::Float64, DataType::String, DataType::Real] {
                for order in [ByteOrder::ABCD, ByteOrder::DCBA, ByteOrder::BADC, ByteOrder::CDAB] {
                    let _ = decode(&regs, dt, order, len);
                }
            }
        }
    }
}
