//! The frame: `[magic u32][len u32][crc32c u32][body]`, little endian. The CRC-32C
//! (Castagnoli, the iSCSI polynomial) covers the length bytes and the body, so a flipped bit
//! anywhere in a frame (magic, length, checksum or body) makes it fail.

use super::cursor::Encoder;

/// Bytes before the body.
pub const HEADER: usize = 12;

/// What tells one log's frames apart: each user of the segment log has its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Format {
    /// First word of every frame. A frame of another log (or of an older format) in the
    /// directory fails on it and is treated like a torn tail.
    pub magic: u32,
    /// Extension of the segment files, `<number>.<extension>`.
    pub extension: &'static str,
    /// Largest body written or read. A larger length read back is a damaged header (and is
    /// never allocated).
    pub max_body: u32,
}

/// Why bytes are not a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("the data ends inside a frame")]
    Truncated,
    #[error("no frame starts here (magic {0:#010x})")]
    BadMagic(u32),
    #[error("frame length {0} is over the limit")]
    BadLength(u32),
    #[error("frame checksum does not match")]
    BadChecksum,
    #[error("a frame body of {len} bytes is over the limit of {max}")]
    TooLarge { len: usize, max: u32 },
}

/// The `crc32c` crate uses the CPU's CRC-32C instruction where there is one (SSE 4.2 on x86-64,
/// found at run time) and tables otherwise: table-driven, CRC-32C took 4-5.5% of the gateway's
/// samples in the Sparkplug benchmark (byte at a time, 10-12%).
fn checksum(len: u32, body: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&len.to_le_bytes()), body)
}

impl Format {
    /// Append one frame to `out`, its body written by `body`. Returns the frame's size; a body
    /// over `max_body` appends nothing and is refused.
    pub fn encode(
        &self,
        out: &mut Vec<u8>,
        body: impl FnOnce(&mut Encoder<'_>),
    ) -> Result<usize, FrameError> {
        let start = out.len();
        out.extend_from_slice(&[0u8; HEADER]);
        body(&mut Encoder::new(out));
        let len = out.len() - start - HEADER;
        let Some(len32) = u32::try_from(len).ok().filter(|l| *l <= self.max_body) else {
            out.truncate(start);
            return Err(FrameError::TooLarge {
                len,
                max: self.max_body,
            });
        };
        let sum = checksum(len32, &out[start + HEADER..]);
        out[start..start + 4].copy_from_slice(&self.magic.to_le_bytes());
        out[start + 4..start + 8].copy_from_slice(&len32.to_le_bytes());
        out[start + 8..start + 12].copy_from_slice(&sum.to_le_bytes());
        Ok(HEADER + len)
    }

    /// Check the start of a header (`head` may be short: the data ended there). Returns the
    /// body length and the checksum.
    pub(crate) fn header(&self, head: &[u8]) -> Result<(u32, u32), FrameError> {
        let word = |i: usize| {
            head.get(i..i + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        match word(0) {
            Some(m) if m != self.magic => return Err(FrameError::BadMagic(m)),
            Some(_) => {}
            None => {
                // Fewer than four bytes: a magic cut short, or not one at all.
                let m = self.magic.to_le_bytes();
                return Err(if head.iter().zip(m).all(|(a, b)| *a == b) {
                    FrameError::Truncated
                } else {
                    let mut w = [0u8; 4];
                    w[..head.len()].copy_from_slice(head);
                    FrameError::BadMagic(u32::from_le_bytes(w))
                });
            }
        }
        let (Some(len), Some(sum)) = (word(4), word(8)) else {
            return Err(FrameError::Truncated);
        };
        if len > self.max_body {
            return Err(FrameError::BadLength(len));
        }
        Ok((len, sum))
    }

    pub(crate) fn verify(len: u32, sum: u32, body: &[u8]) -> Result<(), FrameError> {
        if checksum(len, body) == sum {
            Ok(())
        } else {
            Err(FrameError::BadChecksum)
        }
    }

    /// The frame at the start of `buf`: its body and its size. `Ok(None)` for an empty `buf`.
    pub fn decode<'a>(&self, buf: &'a [u8]) -> Result<Option<(&'a [u8], usize)>, FrameError> {
        if buf.is_empty() {
            return Ok(None);
        }
        let (len, sum) = self.header(&buf[..buf.len().min(HEADER)])?;
        let end = HEADER + len as usize;
        let body = buf.get(HEADER..end).ok_or(FrameError::Truncated)?;
        Format::verify(len, sum, body)?;
        Ok(Some((body, end)))
    }

    /// Whole, valid frames in `buf` past its first byte, found by looking for the magic at
    /// every offset: what is lost when a log is cut at a bad frame at the start of `buf`.
    pub(crate) fn count_whole_frames(&self, buf: &[u8]) -> u64 {
        let magic = self.magic.to_le_bytes();
        let mut n = 0;
        let mut i = 1;
        while i + HEADER <= buf.len() {
            if buf[i..i + 4] == magic {
                if let Ok(Some((_, size))) = self.decode(&buf[i..]) {
                    n += 1;
                    i += size;
                    continue;
                }
            }
            i += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use crate::seglog::cursor::Decoder;

    const F: Format = Format {
        magic: 0x4e58_5454, // "TTXN"
        extension: "test",
        max_body: 1 << 20,
    };

    fn frame(topic: &str, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        F.encode(&mut out, |e| {
            e.str(topic);
            e.bytes(payload);
        })
        .unwrap();
        out
    }

    #[test]
    fn byte_fixture() {
        let got = frame("a", &[1]);
        // magic, length 10, CRC-32C of the length's bytes and the body (0x106b6bda, computed
        // bit by bit outside Nexus: frames written by earlier versions carry the same), body.
        let want = vec![
            0x54, 0x54, 0x58, 0x4e, 10, 0, 0, 0, 0xda, 0x6b, 0x6b, 0x10, 1, 0, 0, 0, b'a', 1, 0, 0,
            0, 1,
        ];
        assert_eq!(got, want);
        // CRC-32C of the standard check string, so the polynomial is the one documented.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        // In two parts, as a frame's checksum is computed.
        assert_eq!(
            crc32c::crc32c_append(crc32c::crc32c(b"1234"), b"56789"),
            0xe306_9283
        );
    }

    #[test]
    fn strings_beyond_u16_and_cut_points_survive() {
        // 1,400 bytes of 'é' (the reject reason that used to be cut mid-character) and a
        // string past 65,535 bytes (the old u16 length).
        for s in ["é".repeat(700), "é".repeat(40_000), "x".repeat(70_000)] {
            let f = frame(&s, s.as_bytes());
            let (body, size) = F.decode(&f).unwrap().unwrap();
            assert_eq!(size, f.len());
            let mut d = Decoder::new(body);
            assert_eq!(d.str().unwrap(), s);
            assert_eq!(d.bytes().unwrap(), s.as_bytes());
            d.finish().unwrap();
        }
    }

    #[test]
    fn a_body_over_the_limit_is_refused_whole() {
        let mut out = vec![9];
        let small = Format { max_body: 8, ..F };
        let e = small.encode(&mut out, |e| e.str("123456789")).unwrap_err();
        assert_eq!(e, FrameError::TooLarge { len: 13, max: 8 });
        assert_eq!(out, vec![9], "nothing appended");
        // A length over the limit read back is refused before any allocation.
        let f = frame("123456789", &[]);
        assert_eq!(small.decode(&f), Err(FrameError::BadLength(17)));
    }

    #[test]
    fn short_and_foreign_data() {
        let f = frame("abc", b"xyz");
        for cut in 1..f.len() {
            assert_eq!(F.decode(&f[..cut]), Err(FrameError::Truncated), "cut {cut}");
        }
        assert_eq!(F.decode(&[0, 0, 0, 0, 0]), Err(FrameError::BadMagic(0)));
        assert_eq!(F.decode(&[7]), Err(FrameError::BadMagic(7)));
        assert_eq!(F.decode(&[]), Ok(None));
    }

    fn body_strings() -> impl Strategy<Value = Vec<String>> {
        // Any Unicode (not only ASCII), short and long.
        prop::collection::vec(
            prop_oneof![
                any::<String>(),
                prop::collection::vec(any::<char>(), 0..5000).prop_map(|c| c.into_iter().collect()),
            ],
            0..4,
        )
    }

    proptest! {
        #[test]
        fn unicode_strings_round_trip(strings in body_strings(), payload in prop::collection::vec(any::<u8>(), 0..300)) {
            let mut out = Vec::new();
            F.encode(&mut out, |e| {
                e.u32(strings.len() as u32);
                for s in &strings {
                    e.str(s);
                }
                e.bytes(&payload);
            }).unwrap();
            let (body, size) = F.decode(&out).unwrap().unwrap();
            prop_assert_eq!(size, out.len());
            let mut d = Decoder::new(body);
            let n = d.count(4).unwrap();
            let got: Vec<&str> = (0..n).map(|_| d.str().unwrap()).collect();
            prop_assert_eq!(got, strings.iter().map(String::as_str).collect::<Vec<_>>());
            prop_assert_eq!(d.bytes().unwrap(), &payload[..]);
            prop_assert!(d.finish().is_ok());
        }

        #[test]
        fn a_flipped_byte_is_never_a_valid_frame(s in any::<String>(), payload in prop::collection::vec(any::<u8>(), 0..100), at in any::<prop::sample::Index>(), mask in 1u8..=255) {
            let mut f = frame(&s, &payload);
            let i = at.index(f.len());
            f[i] ^= mask;
            prop_assert!(F.decode(&f).is_err(), "flip at {} of {} passed", i, f.len());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = F.decode(&bytes);
            let _ = F.count_whole_frames(&bytes);
        }
    }
}
