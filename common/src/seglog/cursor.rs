//! Body encoding: fixed-width little-endian numbers, and strings and byte fields behind a u32
//! length. A field is written whole or the frame is refused ([`Format::encode`]); it is never
//! cut, so a body that passed its checksum always decodes to what was written.
//!
//! [`Format::encode`]: super::Format::encode

/// Writes the body of one frame; made by [`Format::encode`](super::Format::encode), which
/// checks the finished length (so a field longer than `u32::MAX`, whose length cannot be
/// written, makes the whole frame too large instead of being cut).
pub struct Encoder<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> Encoder<'a> {
    pub(crate) fn new(out: &'a mut Vec<u8>) -> Encoder<'a> {
        Encoder { out }
    }

    pub fn u8(&mut self, v: u8) {
        self.out.push(v);
    }

    pub fn u16(&mut self, v: u16) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    pub fn u32(&mut self, v: u32) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    pub fn u64(&mut self, v: u64) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    pub fn i16(&mut self, v: i16) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    pub fn i64(&mut self, v: i64) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    /// The IEEE 754 bits, so every value (NaN payloads included) comes back bit for bit.
    pub fn f64(&mut self, v: f64) {
        self.u64(v.to_bits());
    }

    /// `[len u32][bytes]`.
    pub fn bytes(&mut self, v: &[u8]) {
        // Longer than u32::MAX: the body is then longer than any limit and the frame is refused.
        self.u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
        self.out.extend_from_slice(v);
    }

    /// `[len u32][UTF-8 bytes]`.
    pub fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }

    /// `v` in postcard as a byte field: the same bytes as [`Encoder::bytes`] of
    /// `postcard::to_stdvec(v)`, serialized in place instead of through a vector of its own.
    /// False (and nothing written) when `v` does not serialize.
    pub fn postcard<T: serde::Serialize + ?Sized>(&mut self, v: &T) -> bool {
        let start = self.out.len();
        self.u32(0);
        let body = self.out.len();
        if postcard::to_extend(v, Extend(self.out)).is_err() {
            self.out.truncate(start);
            return false;
        }
        let len = u32::try_from(self.out.len() - body).unwrap_or(u32::MAX);
        self.out[start..body].copy_from_slice(&len.to_le_bytes());
        true
    }
}

/// A vector postcard appends to (it takes its output by value).
struct Extend<'a>(&'a mut Vec<u8>);

impl std::iter::Extend<u8> for Extend<'_> {
    fn extend<I: IntoIterator<Item = u8>>(&mut self, iter: I) {
        self.0.extend(iter);
    }
}

/// Why a body does not decode. Small and `Copy`: decoding runs on every frame read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("the body ends at byte {at}, {missing} bytes short of the next field")]
    Short { at: usize, missing: usize },
    #[error("the string at byte {at} is not UTF-8")]
    NotUtf8 { at: usize },
    #[error("{field} at byte {at} has the invalid value {value}")]
    Invalid {
        field: &'static str,
        at: usize,
        value: u64,
    },
    #[error("{0} bytes are left after the last field")]
    Trailing(usize),
}

/// Reads a body field by field; every read is checked against the bytes left, so no input
/// makes it panic or allocate more than the body holds.
#[derive(Debug, Clone)]
pub struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Decoder<'a> {
    pub fn new(buf: &'a [u8]) -> Decoder<'a> {
        Decoder { buf, pos: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let rest = &self.buf[self.pos..];
        if rest.len() < n {
            return Err(DecodeError::Short {
                at: self.pos,
                missing: n - rest.len(),
            });
        }
        self.pos += n;
        Ok(&rest[..n])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        self.array().map(u16::from_le_bytes)
    }

    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        self.array().map(u32::from_le_bytes)
    }

    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        self.array().map(u64::from_le_bytes)
    }

    pub fn i16(&mut self) -> Result<i16, DecodeError> {
        self.array().map(i16::from_le_bytes)
    }

    pub fn i64(&mut self) -> Result<i64, DecodeError> {
        self.array().map(i64::from_le_bytes)
    }

    pub fn f64(&mut self) -> Result<f64, DecodeError> {
        self.u64().map(f64::from_bits)
    }

    /// A `[len u32][bytes]` field.
    pub fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    /// A `[len u32][UTF-8 bytes]` field.
    pub fn str(&mut self) -> Result<&'a str, DecodeError> {
        let len = self.u32()? as usize;
        let at = self.pos;
        std::str::from_utf8(self.take(len)?).map_err(|_| DecodeError::NotUtf8 { at })
    }

    /// A u32 count of items that take at least `min_size` bytes each: a count the rest of the
    /// body cannot hold is refused here, before anything is allocated for it.
    pub fn count(&mut self, min_size: usize) -> Result<usize, DecodeError> {
        let at = self.pos;
        let n = self.u32()? as usize;
        let need = n.saturating_mul(min_size.max(1));
        if need > self.remaining() {
            return Err(DecodeError::Short {
                at,
                missing: need - self.remaining(),
            });
        }
        Ok(n)
    }

    /// An error for a field that decoded but holds a value the caller does not accept, placed
    /// at the field just read (`size` bytes back).
    pub fn invalid(&self, field: &'static str, size: usize, value: u64) -> DecodeError {
        DecodeError::Invalid {
            field,
            at: self.pos.saturating_sub(size),
            value,
        }
    }

    /// The body must end here.
    pub fn finish(self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_with_byte_fixture() {
        let mut out = Vec::new();
        let mut e = Encoder::new(&mut out);
        e.u8(7);
        e.u16(0x0102);
        e.i64(-2);
        e.str("é");
        e.bytes(&[0xff]);
        assert_eq!(
            out,
            [
                7, 2, 1, 0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0xc3, 0xa9, 1,
                0, 0, 0, 0xff
            ]
        );
        let mut d = Decoder::new(&out);
        assert_eq!(d.u8(), Ok(7));
        assert_eq!(d.u16(), Ok(0x0102));
        assert_eq!(d.i64(), Ok(-2));
        assert_eq!(d.str(), Ok("é"));
        assert_eq!(d.bytes(), Ok(&[0xff][..]));
        assert_eq!(d.finish(), Ok(()));
    }

    #[test]
    fn a_postcard_field_is_the_byte_field_of_its_serialization() {
        #[derive(serde::Serialize)]
        enum Rec {
            _A,
            B {
                name: String,
                seq: u64,
                data: Vec<u8>,
            },
        }
        let v = Rec::B {
            name: "plant/é".into(),
            seq: 300,
            data: vec![1; 200],
        };
        let mut direct = vec![9];
        assert!(Encoder::new(&mut direct).postcard(&v));
        let mut via = vec![9];
        Encoder::new(&mut via).bytes(&postcard::to_stdvec(&v).unwrap());
        assert_eq!(direct, via);
        let mut d = Decoder::new(&direct[1..]);
        assert_eq!(d.bytes(), Ok(&postcard::to_stdvec(&v).unwrap()[..]));
        assert_eq!(d.finish(), Ok(()));
        // What does not serialize writes nothing (postcard needs a sequence's length).
        struct Unsized;
        impl serde::Serialize for Unsized {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeSeq;
                s.serialize_seq(None)?.end()
            }
        }
        assert!(!Encoder::new(&mut direct).postcard(&Unsized));
        assert_eq!(direct, via);
    }

    #[test]
    fn bad_bodies_are_errors_not_panics() {
        // A length past the end.
        let mut d = Decoder::new(&[5, 0, 0, 0, b'a']);
        assert_eq!(d.str(), Err(DecodeError::Short { at: 4, missing: 4 }));
        // Half a character.
        let mut d = Decoder::new(&[1, 0, 0, 0, 0xc3]);
        assert_eq!(d.str(), Err(DecodeError::NotUtf8 { at: 4 }));
        // A count that cannot fit.
        let mut d = Decoder::new(&[0xff, 0xff, 0xff, 0xff, 0]);
        assert!(matches!(d.count(8), Err(DecodeError::Short { at: 0, .. })));
        // Left-over bytes.
        let mut d = Decoder::new(&[1, 2]);
        assert_eq!(d.u8(), Ok(1));
        assert_eq!(d.finish(), Err(DecodeError::Trailing(1)));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let mut d = Decoder::new(&bytes);
            while d.remaining() > 0 {
                let _ = d.count(3);
                let _ = d.str();
                if d.bytes().is_err() && d.u8().is_err() {
                    break;
                }
            }
        }
    }
}
