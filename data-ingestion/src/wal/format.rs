//! The WAL's frame body, inside the segment log's frame (`[magic "NXW2"][len][crc32c]`):
//!
//! ```text
//! [id u64][written unix ms i64][points u32][rejects u32]
//! point:  [ts µs i64][quality i16][flags u8: 1 value, 2 value_str][value f64]?[topic][value_str]?
//! reject: [ts µs i64][topic][reason][payload]
//! version 2 on: [version u8] and, for each point in order,
//! typed:  [flags u8: 1 type, 2 unit, 4 source time][type u8]?[unit]?[source time µs i64]?
//! ```
//!
//! Strings and the payload are `[len u32][bytes]`, written whole: a frame that passes its
//! checksum always decodes.
//!
//! **Versions.** The body is versioned by what follows the rejects, so the magic (and the
//! segment log's recovery, which knows nothing of bodies) stays the same and a log holding
//! frames of both versions reads through:
//! * 1 (Nexus 0.1.0): the body ends after the rejects. Its points read back without type,
//!   unit or source time, as that version stored them.
//! * 2: a version byte, then each point's type, unit and source time.
//!
//! A later version appends after the version byte and keeps reading the earlier ones. An
//! earlier Nexus cannot read a later version's frames (it counts them as corrupt): drain the
//! WAL before a downgrade.

use std::ops::Range;

use nexus_common::domain::ValueType;
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

/// The body version the writer makes (module docs).
pub(super) const VERSION: u8 = 2;

const POINT_MIN: usize = 8 + 2 + 1 + 4;
const REJECT_MIN: usize = 8 + 4 + 4 + 4;
const HAS_VALUE: u8 = 1;
const HAS_STR: u8 = 2;
const HAS_TYPE: u8 = 1;
const HAS_UNIT: u8 = 2;
const HAS_SOURCE_TS: u8 = 4;

/// Encoded size of a point (with its version 2 fields).
pub(super) fn point_size(p: &Point) -> usize {
    POINT_MIN
        + p.value.map_or(0, |_| 8)
        + p.topic.len()
        + p.value_str.as_ref().map_or(0, |s| 4 + s.len())
        + 1
        + p.value_type.map_or(0, |_| 1)
        + p.unit.as_ref().map_or(0, |u| 4 + u.len())
        + p.source_ts_us.map_or(0, |_| 8)
}

fn type_code(t: ValueType) -> u8 {
    // Codes 1-4, as in `points.value_type`.
    u8::try_from(t.code()).unwrap_or(0)
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
        e.u8(VERSION);
        for p in points {
            let flags = if p.value_type.is_some() { HAS_TYPE } else { 0 }
                | if p.unit.is_some() { HAS_UNIT } else { 0 }
                | if p.source_ts_us.is_some() {
                    HAS_SOURCE_TS
                } else {
                    0
                };
            e.u8(flags);
            if let Some(t) = p.value_type {
                e.u8(type_code(t));
            }
            if let Some(u) = &p.unit {
                e.str(u);
            }
            if let Some(ts) = p.source_ts_us {
                e.i64(ts);
            }
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
            value_type: None,
            unit: None,
            source_ts_us: None,
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
    // Version 1 ends here.
    if d.remaining() > 0 {
        let version = d.u8()?;
        if version != VERSION {
            return Err(d.invalid("body version", 1, version.into()));
        }
        for p in &mut points {
            let flags = d.u8()?;
            if flags & !(HAS_TYPE | HAS_UNIT | HAS_SOURCE_TS) != 0 {
                return Err(d.invalid("point type flags", 1, flags.into()));
            }
            if flags & HAS_TYPE != 0 {
                let code = d.u8()?;
                p.value_type = Some(
                    ValueType::from_code(code.into())
                        .ok_or_else(|| d.invalid("value type", 1, code.into()))?,
                );
            }
            if flags & HAS_UNIT != 0 {
                p.unit = Some(d.str()?.to_owned());
            }
            if flags & HAS_SOURCE_TS != 0 {
                p.source_ts_us = Some(d.i64()?);
            }
        }
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

/// A frame as Nexus 0.1.0 wrote it (body version 1, no version byte), id 7: three points (a
/// number, a string, a null) and a reject.
#[cfg(test)]
pub(super) fn frame_v1() -> Vec<u8> {
    const HEX: &str = "4e5857327a000000c5d63ca707000000000000007b68e5cf8b01000003000000\
        0100000000401e18240a0600c00001000000000080354003000000612f7401401e18240a06004000020300\
        0000612f73020000006f6e02401e18240a060018000003000000612f6e0500000000000000010000007808\
        0000006261645f6a736f6e010000007b";
    (0..HEX.len())
        .step_by(2)
        .filter_map(|i| u8::from_str_radix(&HEX[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Bytes of a body besides its rows: the four header fields and the version.
    const BODY_FIXED: usize = 8 + 8 + 4 + 4 + 1;

    fn point(i: usize) -> Point {
        Point {
            topic: format!("a/b/t{}", i % 7),
            ts_us: 1_700_000_000_000_000 + i as i64,
            value: (!i.is_multiple_of(3)).then_some(i as f64 * 0.5),
            value_str: i.is_multiple_of(3).then(|| format!("s{i}")),
            quality: 192,
            value_type: Some(if i.is_multiple_of(3) {
                ValueType::String
            } else {
                ValueType::Float
            }),
            unit: i.is_multiple_of(2).then(|| "degC".to_owned()),
            source_ts_us: i
                .is_multiple_of(4)
                .then_some(1_700_000_000_000_000 - i as i64),
        }
    }

    fn round_trip(points: &[Point], rejects: &[Reject]) -> Frame {
        let mut buf = Vec::new();
        let size = encode(&mut buf, 42, 1234, points, rejects).unwrap();
        assert_eq!(size, buf.len());
        assert_eq!(
            size,
            nexus_common::seglog::HEADER + BODY_FIXED + rows_size(points, rejects)
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
    fn frames_of_the_first_version_read_back() {
        let buf = frame_v1();
        let (body, len) = FORMAT.decode(&buf).unwrap().unwrap();
        assert_eq!(len, buf.len());
        let f = decode(body).unwrap();
        assert_eq!(
            (f.first_id, f.last_id, f.written_ms),
            (7, 7, 1_700_000_000_123)
        );
        let untyped = |topic: &str, us: i64, value, value_str: Option<&str>, quality| Point {
            topic: topic.into(),
            ts_us: us,
            value,
            value_str: value_str.map(str::to_owned),
            quality,
            value_type: None,
            unit: None,
            source_ts_us: None,
        };
        assert_eq!(
            f.points,
            vec![
                untyped("a/t", 1_700_000_000_000_000, Some(21.5), None, 192),
                untyped("a/s", 1_700_000_000_000_001, None, Some("on"), 64),
                untyped("a/n", 1_700_000_000_000_002, None, None, 24),
            ]
        );
        assert_eq!(
            f.rejects,
            vec![Reject {
                ts_us: 5,
                topic: "x".into(),
                reason: "bad_json".into(),
                payload: b"{".to_vec(),
            }]
        );
        // The same rows written now: the version-1 bytes, then the version and the typed part.
        let mut now = Vec::new();
        encode(&mut now, 7, 1_700_000_000_123, &f.points, &f.rejects).unwrap();
        let old_body = &buf[nexus_common::seglog::HEADER..];
        let new_body = &now[nexus_common::seglog::HEADER..];
        assert_eq!(&new_body[..old_body.len()], old_body);
        assert_eq!(&new_body[old_body.len()..], [VERSION, 0, 0, 0]);
    }

    #[test]
    fn typed_points_round_trip() {
        let mut p = point(4);
        p.value = Some(1.0);
        p.value_str = None;
        p.value_type = Some(ValueType::Bool);
        let mut q = point(1);
        q.value = None;
        q.value_type = None;
        q.unit = Some("m³/h".into());
        q.source_ts_us = Some(-1);
        let f = round_trip(&[p.clone(), q.clone(), point(2)], &[]);
        assert_eq!(f.points, vec![p, q, point(2)]);
        for t in ValueType::ALL {
            let mut p = point(5);
            p.value_type = Some(t);
            assert_eq!(round_trip(std::slice::from_ref(&p), &[]).points, vec![p]);
        }
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
        // point(1) has a type and no unit or source time: its typed part is [flags 1, type].
        let typed = body.len() - 3;
        assert_eq!(&body[typed..], [VERSION, HAS_TYPE, 3]);
        // An unknown version, unknown typed flags, an unknown type code.
        for (at, byte, field) in [
            (typed, 3, "body version"),
            (typed + 1, 0x80, "point type flags"),
            (typed + 2, 9, "value type"),
        ] {
            let mut bad = body.to_vec();
            bad[at] = byte;
            assert!(
                matches!(decode(&bad), Err(DecodeError::Invalid { field: f, .. }) if f == field),
                "{field}: {:?}",
                decode(&bad)
            );
        }
        // Bytes after the typed part.
        let mut bad = body.to_vec();
        bad.push(0);
        assert!(matches!(decode(&bad), Err(DecodeError::Trailing(1))));
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
            typed in prop::collection::vec((prop::option::of(prop::sample::select(ValueType::ALL.to_vec())), any::<Option<String>>(), any::<Option<i64>>()), 20),
            reasons in prop::collection::vec((any::<String>(), prop::collection::vec(any::<u8>(), 0..50)), 0..5),
        ) {
            let points: Vec<Point> = rows.into_iter().zip(typed).map(|((topic, value_str, value, quality, ts_us), (value_type, unit, source_ts_us))| Point {
                topic, ts_us, value: value.filter(|v| !v.is_nan()), value_str, quality,
                value_type, unit, source_ts_us,
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
