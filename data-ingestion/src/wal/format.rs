//! The WAL's frame body, inside the segment log's frame (`[magic "NXW2"][len][crc32c]`):
//!
//! ```text
//! [id u64][written unix ms i64][points u32][rejects u32]
//! point:  [ts µs i64][quality i16][flags u8: 1 value, 2 value_str][value f64]?[topic][value_str]?
//! reject: [ts µs i64][topic][reason][payload]
//! ```
//!
//! Strings and the payload are `[len u32][bytes]`, written whole: a frame that passes its
//! checksum always decodes.

use std::ops::Range;

use nexus_common::seglog::{DecodeError, Decoder, Encoder, Format, FrameError};

use crate::model::{Frame, Point, Reject};

/// Largest frame body; a longer length read back is a damaged header.
const MAX_BODY: u32 = 256 * 1024 * 1024;

pub(super) const FORMAT: Format = Format {
    magic: u32::from_le_bytes(*b"NXW2"),
    extension: "wal",
    max_body: MAX_BODY,
};

/// Largest frame the writer makes (group commit gathers up to it; one append larger than it
/// is written as several frames). Far above any one row: the parser's limits keep a row
/// near 1 MiB at most.
pub(super) const FRAME_TARGET: usize = 32 * 1024 * 1024;
/// Rows gathered into one frame at most.
pub(super) const MAX_FRAME_ROWS: usize = 20_000;

const POINT_MIN: usize = 8 + 2 + 1 + 4;
const REJECT_MIN: usize = 8 + 4 + 4 + 4;
const HAS_VALUE: u8 = 1;
const HAS_STR: u8 = 2;

/// Encoded size of a point.
pub(super) fn point_size(p: &Point) -> usize {
    POINT_MIN
        + p.value.map_or(0, |_| 8)
        + p.topic.len()
        + p.value_str.as_ref().map_or(0, |s| 4 + s.len())
}

/// Encoded size of a reject.
pub(super) fn reject_size(r: &Reject) -> usize {
    REJECT_MIN + r.topic.len() + r.reason.len() + r.payload.len()
}

pub(super) fn rows_size(points: &[Point], rejects: &[Reject]) -> usize {
    points.iter().map(point_size).sum::<usize>() + rejects.iter().map(reject_size).sum::<usize>()
}

fn count(e: &mut Encoder<'_>, n: usize) {
    // More than u32::MAX rows cannot fit a body anyway; the frame is refused for its size.
    e.u32(u32::try_from(n).unwrap_or(u32::MAX));
}

/// Encode one frame (header and body) into `out`, replacing what it held.
pub(super) fn encode(
    out: &mut Vec<u8>,
    id: u64,
    written_ms: i64,
    points: &[Point],
    rejects: &[Reject],
) -> Result<usize, FrameError> {
    out.clear();
    FORMAT.encode(out, |e| {
        e.u64(id);
        e.i64(written_ms);
        count(e, points.len());
        count(e, rejects.len());
        for p in points {
            e.i64(p.ts_us);
            e.i16(p.quality);
            let flags = if p.value.is_some() { HAS_VALUE } else { 0 }
                | if p.value_str.is_some() { HAS_STR } else { 0 };
            e.u8(flags);
            if let Some(v) = p.value {
                e.f64(v);
            }
            e.str(&p.topic);
            if let Some(s) = &p.value_str {
                e.str(s);
            }
        }
        for r in rejects {
            e.i64(r.ts_us);
            e.str(&r.topic);
            e.str(&r.reason);
            e.bytes(&r.payload);
        }
    })
}

/// Decode a frame body.
pub(super) fn decode(body: &[u8]) -> Result<Frame, DecodeError> {
    let mut d = Decoder::new(body);
    let id = d.u64()?;
    let written_ms = d.i64()?;
    let np = d.count(POINT_MIN)?;
    let nr = d.count(REJECT_MIN)?;
    let mut points = Vec::with_capacity(np);
    for _ in 0..np {
        let ts_us = d.i64()?;
        let quality = d.i16()?;
        let flags = d.u8()?;
        if flags & !(HAS_VALUE | HAS_STR) != 0 {
            return Err(d.invalid("point flags", 1, flags.into()));
        }
        let value = if flags & HAS_VALUE != 0 {
            Some(d.f64()?)
        } else {
            None
        };
        let topic = d.str()?.to_owned();
        let value_str = if flags & HAS_STR != 0 {
            Some(d.str()?.to_owned())
        } else {
            None
        };
        points.push(Point {
            topic,
            ts_us,
            value,
            value_str,
            quality,
        });
    }
    let mut rejects = Vec::with_capacity(nr);
    for _ in 0..nr {
        rejects.push(Reject {
            ts_us: d.i64()?,
            topic: d.str()?.to_owned(),
            reason: d.str()?.to_owned(),
            payload: d.bytes()?.to_vec(),
        });
    }
    d.finish()?;
    Ok(Frame {
        first_id: id,
        last_id: id,
        written_ms,
        points,
        rejects,
    })
}

/// Split rows into frames of at most `cap` encoded bytes and [`MAX_FRAME_ROWS`] rows (a row
/// larger than `cap` gets a frame of its own). Each part is a range of `points` and a range
/// of `rejects`, points first.
pub(super) fn chunks(
    points: &[Point],
    rejects: &[Reject],
    cap: usize,
) -> Vec<(Range<usize>, Range<usize>)> {
    let np = points.len();
    let split = |a: usize, b: usize| {
        (
            a.min(np)..b.min(np),
            a.saturating_sub(np)..b.saturating_sub(np),
        )
    };
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for i in 0..np + rejects.len() {
        let size = match points.get(i) {
            Some(p) => point_size(p),
            None => rejects.get(i - np).map_or(0, reject_size),
        };
        let rows = i - start;
        if rows > 0 && (bytes + size > cap || rows >= MAX_FRAME_ROWS) {
            out.push(split(start, i));
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if np + rejects.len() > start {
        out.push(split(start, np + rejects.len()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn point(i: usize) -> Point {
        Point {
            topic: format!("a/b/t{}", i % 7),
            ts_us: 1_700_000_000_000_000 + i as i64,
            value: (!i.is_multiple_of(3)).then_some(i as f64 * 0.5),
            value_str: i.is_multiple_of(3).then(|| format!("s{i}")),
            quality: 192,
        }
    }

    fn round_trip(points: &[Point], rejects: &[Reject]) -> Frame {
        let mut buf = Vec::new();
        let size = encode(&mut buf, 42, 1234, points, rejects).unwrap();
        assert_eq!(size, buf.len());
        assert_eq!(
            size,
            nexus_common::seglog::HEADER + 24 + rows_size(points, rejects)
        );
        let (body, len) = FORMAT.decode(&buf).unwrap().unwrap();
        assert_eq!(len, buf.len());
        decode(body).unwrap()
    }

    #[test]
    fn frames_round_trip_and_any_flipped_byte_is_detected() {
        let points: Vec<Point> = (0..10).map(point).collect();
        let rejects = vec![Reject {
            ts_us: 5,
            topic: "x/y".into(),
            reason: "bad_json: expected value at line 1".into(),
            payload: vec![0, 159, 146, 150],
        }];
        let f = round_trip(&points, &rejects);
        assert_eq!((f.first_id, f.last_id, f.written_ms), (42, 42, 1234));
        assert_eq!(f.points, points);
        assert_eq!(f.rejects, rejects);
        let mut buf = Vec::new();
        encode(&mut buf, 42, 1234, &points, &rejects).unwrap();
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            assert!(FORMAT.decode(&bad).is_err(), "flip at {i} not detected");
        }
    }

    /// The frame that used to be lost: a reject reason of 1,400 bytes of 'é' (cut at 1,024
    /// bytes, mid-character, by the old u16 encoding) among good points.
    #[test]
    fn long_unicode_fields_are_kept_whole() {
        let mut p = point(1);
        p.topic = "é".repeat(40_000);
        p.value_str = Some("ü".repeat(700));
        let r = Reject {
            ts_us: 1,
            topic: "t/q".into(),
            reason: format!("bad_quality: {}", "é".repeat(700)),
            payload: vec![b'x'; 70_000],
        };
        let f = round_trip(&[point(0), p.clone(), point(2)], std::slice::from_ref(&r));
        assert_eq!(f.points[1], p);
        assert_eq!(f.rejects[0], r);
    }

    #[test]
    fn undecodable_bodies_are_errors() {
        let mut buf = Vec::new();
        encode(&mut buf, 1, 2, &[point(1)], &[]).unwrap();
        let body = &buf[nexus_common::seglog::HEADER..];
        // Unknown flag bits.
        let mut bad = body.to_vec();
        bad[24 + 10] |= 0x80;
        assert!(matches!(decode(&bad), Err(DecodeError::Invalid { .. })));
        // A count larger than the body.
        let mut bad = body.to_vec();
        bad[16] = 0xff;
        assert!(matches!(decode(&bad), Err(DecodeError::Short { .. })));
        assert!(decode(&body[..body.len() - 1]).is_err());
    }

    #[test]
    fn chunks_split_by_size_and_rows() {
        let points: Vec<Point> = (0..10).map(point).collect();
        let rejects = vec![
            Reject {
                ts_us: 0,
                topic: "t".into(),
                reason: "r".into(),
                payload: vec![0; 100],
            };
            3
        ];
        assert_eq!(chunks(&points, &rejects, usize::MAX), vec![(0..10, 0..3)]);
        assert!(chunks(&[], &[], 10).is_empty());
        // A cap below one row: one row per frame.
        let one = chunks(&points, &rejects, 1);
        assert_eq!(one.len(), 13);
        assert_eq!(one[9], (9..10, 0..0));
        assert_eq!(one[10], (10..10, 0..1));
        let many: Vec<Point> = (0..MAX_FRAME_ROWS + 5).map(point).collect();
        let parts = chunks(&many, &[], usize::MAX);
        assert_eq!(
            parts,
            vec![
                (0..MAX_FRAME_ROWS, 0..0),
                (MAX_FRAME_ROWS..MAX_FRAME_ROWS + 5, 0..0)
            ]
        );
    }

    proptest! {
        #[test]
        fn arbitrary_rows_round_trip(
            rows in prop::collection::vec((any::<String>(), any::<Option<String>>(), any::<Option<f64>>(), any::<i16>(), any::<i64>()), 0..20),
            reasons in prop::collection::vec((any::<String>(), prop::collection::vec(any::<u8>(), 0..50)), 0..5),
        ) {
            let points: Vec<Point> = rows.into_iter().map(|(topic, value_str, value, quality, ts_us)| Point {
                topic, ts_us, value: value.filter(|v| !v.is_nan()), value_str, quality,
            }).collect();
            let rejects: Vec<Reject> = reasons.into_iter().map(|(reason, payload)| Reject {
                ts_us: 1, topic: reason.chars().rev().collect(), reason, payload,
            }).collect();
            let f = round_trip(&points, &rejects);
            prop_assert_eq!(f.points, points);
            prop_assert_eq!(f.rejects, rejects);
        }

        #[test]
        fn arbitrary_bodies_never_panic(body in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&body);
        }
    }
}
