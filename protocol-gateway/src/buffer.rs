//! Store-and-forward: values that could not be published wait here, on disk, in order.
//!
//! The buffer is a segment log ([`nexus_common::seglog`]): files `<n>.seg` in a locked
//! directory, one CRC-32C frame per record, the body `[topic][payload]` (each behind a u32
//! length). Appends go to the newest segment, which rolls at a quarter of the size limit,
//! and are fsynced per batch. The read position (`segment offset`) is kept in `position`,
//! replaced atomically, so a restart resumes where replay stopped. At open every segment is
//! read through and cut at its first bad frame (a torn tail after a crash); what was cut is
//! logged and counted in [`DiskBuffer::lost`]. Past `max_size` the oldest segment is deleted
//! and its unread records counted as dropped ([`DiskBuffer::dropped`]).

use std::collections::VecDeque;
use std::path::Path;

use nexus_common::seglog::{
    self, DecodeError, Decoder, Format, Options, Recovery, SegmentDir, SegmentWriter, Verify,
};

const FORMAT: Format = Format {
    magic: u32::from_le_bytes(*b"NXB2"),
    extension: "seg",
    max_body: 64 * 1024 * 1024,
};

/// One buffered message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    pub payload: Vec<u8>,
}

impl Record {
    fn decode(body: &[u8]) -> Result<Record, DecodeError> {
        let mut d = Decoder::new(body);
        let topic = d.str()?.to_owned();
        let payload = d.bytes()?.to_vec();
        d.finish()?;
        Ok(Record { topic, payload })
    }
}

/// Where an appended record lies: its segment and its frame's length, so that it can be
/// marked published ([`DiskBuffer::ack`]) without reading it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    base: u64,
    len: u64,
}

#[derive(Debug)]
struct Segment {
    base: u64,
    bytes: u64,
    /// Records in the segment not yet read.
    unread: u64,
}

pub struct DiskBuffer {
    dir: SegmentDir,
    max_size: u64,
    segment_size: u64,
    segments: VecDeque<Segment>,
    /// Read position in the oldest segment.
    read_offset: u64,
    /// The newest segment, open for appends.
    writer: Option<SegmentWriter>,
    next_base: u64,
    dropped: u64,
    lost: u64,
    recovery: Recovery,
    /// The read position moved since it was last saved.
    position_dirty: bool,
}

impl DiskBuffer {
    /// Open (or create) the buffer in `dir`, recovering what a previous run left.
    pub fn open(dir: &Path, max_size: u64) -> Result<DiskBuffer, seglog::Error> {
        Self::open_with(dir, max_size, (max_size / 4).max(16 * 1024))
    }

    /// [`open`](Self::open) with segments rolling at `segment_size`.
    pub fn open_with(
        dir: &Path,
        max_size: u64,
        segment_size: u64,
    ) -> Result<DiskBuffer, seglog::Error> {
        let (sd, found, recovery) = SegmentDir::open(
            dir,
            Options {
                format: FORMAT,
                verify: Verify::All,
                fsync: true,
            },
        )?;
        for cut in &recovery.cuts {
            tracing::warn!(segment = %sd.segment_path(cut.segment).display(), offset = cut.offset, bytes = cut.bytes, records = cut.frames(), error = %cut.error, "store-and-forward buffer: cut records that do not read back (a write a crash interrupted, or damage)");
        }
        let (pos_base, pos_off) = sd
            .read_state("position")?
            .and_then(|s| {
                let (a, b) = s.trim().split_once(' ')?;
                Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?))
            })
            .unwrap_or((0, 0));
        let next_base = found.last().map_or(1, |s| s.base + 1);
        let mut replayed = Vec::new();
        let mut segments = VecDeque::new();
        let mut read_offset = 0;
        for s in found {
            if s.base < pos_base {
                // Fully replayed before the restart.
                replayed.push(s.base);
                continue;
            }
            let (unread, from) = if s.base == pos_base && pos_off > 0 {
                unread_after(&sd, s.base, pos_off)?
            } else {
                (s.frames.unwrap_or(0), 0)
            };
            if segments.is_empty() {
                read_offset = from;
            }
            segments.push_back(Segment {
                base: s.base,
                bytes: s.bytes,
                unread,
            });
        }
        sd.remove(&replayed)?;
        let mut b = DiskBuffer {
            dir: sd,
            max_size,
            segment_size: segment_size.max(1024),
            segments,
            read_offset,
            writer: None,
            next_base,
            dropped: 0,
            lost: recovery.frames(),
            recovery,
            position_dirty: false,
        };
        b.drop_read()?;
        Ok(b)
    }

    /// Records waiting.
    pub fn len(&self) -> u64 {
        self.segments.iter().map(|s| s.unread).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// Records dropped because the size limit was hit (since open).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Records lost to files that did not read back (since open): cut at open, see
    /// [`recovery`](Self::recovery), or found damaged later.
    pub fn lost(&self) -> u64 {
        self.lost
    }

    /// What open cut off the segment files.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// Append records and make them durable (one fsync per call). A record too large for a
    /// frame (64 MiB) cannot be kept: it is counted as dropped.
    pub fn append(&mut self, records: &[Record]) -> Result<(), seglog::Error> {
        self.append_placed(records).map(|_| ())
    }

    /// [`append`](Self::append), returning where each record lies (`None`: dropped, too
    /// large).
    pub fn append_placed(
        &mut self,
        records: &[Record],
    ) -> Result<Vec<Option<Place>>, seglog::Error> {
        let mut buf = Vec::with_capacity(records.len() * 96);
        let mut lens = Vec::with_capacity(records.len());
        let mut kept = 0;
        for r in records {
            let framed = FORMAT.encode(&mut buf, |e| {
                e.str(&r.topic);
                e.bytes(&r.payload);
            });
            match framed {
                Ok(len) => {
                    kept += 1;
                    lens.push(Some(len as u64));
                }
                Err(e) => {
                    tracing::warn!(topic = %r.topic, error = %e, "store-and-forward buffer: record too large to keep; dropped");
                    self.dropped += 1;
                    lens.push(None);
                }
            }
        }
        if kept == 0 {
            return Ok(vec![None; records.len()]);
        }
        let w = self.writer_with_room()?;
        let base = w.base();
        if let Err(e) = w.append(&buf) {
            // Reopened (after the last whole record) by the next append.
            self.writer = None;
            return Err(e);
        }
        if let Some(s) = self.segments.back_mut() {
            s.bytes += buf.len() as u64;
            s.unread += kept;
        }
        self.enforce_limit()?;
        Ok(lens
            .into_iter()
            .map(|l| l.map(|len| Place { base, len }))
            .collect())
    }

    /// Mark records as published, oldest first, as [`append_placed`](Self::append_placed)
    /// placed them (without reading them back). The read position is saved when a segment is
    /// done, and by [`save_position`](Self::save_position); until then a restart replays
    /// them again (at least once, never lost).
    pub fn ack(&mut self, places: &[Place]) -> Result<(), seglog::Error> {
        for p in places {
            self.drop_read_but_newest()?;
            let Some(front) = self.segments.front_mut() else {
                break;
            };
            // A segment dropped at the size limit took its records with it.
            if p.base < front.base {
                continue;
            }
            if p.base > front.base {
                tracing::error!(
                    front = front.base,
                    acked = p.base,
                    "store-and-forward buffer: acknowledgement out of order; ignored"
                );
                continue;
            }
            self.read_offset += p.len;
            front.unread = front.unread.saturating_sub(1);
            self.position_dirty = true;
        }
        self.drop_read_but_newest()
    }

    /// Delete the oldest segments while they hold nothing unread, but keep the newest (the
    /// one appended to), so that a log that keeps emptying does not create and delete a file
    /// each time.
    fn drop_read_but_newest(&mut self) -> Result<(), seglog::Error> {
        let mut gone = Vec::new();
        while self.segments.len() > 1 && self.segments.front().is_some_and(|s| s.unread == 0) {
            if let Some(s) = self.segments.pop_front() {
                gone.push(s.base);
            }
            self.read_offset = 0;
        }
        if gone.is_empty() {
            return Ok(());
        }
        // The position moves first: a crash in between leaves files the next open sees as
        // read.
        self.write_position()?;
        self.dir.remove(&gone)
    }

    /// Save the read position if it moved since it was last saved.
    pub fn save_position(&mut self) -> Result<(), seglog::Error> {
        if self.position_dirty {
            self.write_position()?;
        }
        Ok(())
    }

    /// The newest segment's writer, a new segment when it is full or gone.
    fn writer_with_room(&mut self) -> Result<&mut SegmentWriter, seglog::Error> {
        let back = self
            .segments
            .back()
            .map(|s| (s.base, s.bytes))
            .filter(|(_, bytes)| *bytes < self.segment_size);
        let reuse = matches!((&self.writer, back), (Some(w), Some((base, _))) if w.base() == base);
        if !reuse {
            self.writer = None;
            let w = match back {
                // After a restart (or a failed write): continue the newest if it has room.
                Some((base, bytes)) => self.dir.append_to(base, bytes)?,
                None => {
                    let base = self.next_base;
                    let w = self.dir.create(base)?;
                    self.next_base += 1;
                    self.segments.push_back(Segment {
                        base,
                        bytes: 0,
                        unread: 0,
                    });
                    w
                }
            };
            self.writer = Some(w);
        }
        self.writer.as_mut().ok_or_else(|| seglog::Error::Io {
            path: self.dir.path().to_path_buf(),
            source: std::io::Error::other("no open segment"),
        })
    }

    fn enforce_limit(&mut self) -> Result<(), seglog::Error> {
        while self.bytes() > self.max_size && self.segments.len() > 1 {
            if let Some(old) = self.segments.pop_front() {
                self.dropped += old.unread;
                self.read_offset = 0;
                // The position moves first: a crash in between leaves a file the next open
                // sees as replayed.
                self.write_position()?;
                self.dir.remove(&[old.base])?;
            }
        }
        Ok(())
    }

    /// The next records, up to `limit`, without consuming them (from the oldest segment).
    pub fn peek(&mut self, limit: usize) -> Result<Vec<Record>, seglog::Error> {
        loop {
            let Some(first) = self.segments.front() else {
                return Ok(Vec::new());
            };
            let mut r = self.dir.reader(first.base, self.read_offset)?;
            let mut out = Vec::new();
            let mut damaged = None;
            while out.len() < limit {
                match r.next_frame() {
                    Ok(Some(body)) => match Record::decode(body) {
                        Ok(rec) => out.push(rec),
                        Err(e) => {
                            damaged = Some(e.to_string());
                            break;
                        }
                    },
                    Ok(None) => break,
                    Err(e @ seglog::Error::Frame { .. }) => {
                        damaged = Some(e.to_string());
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            match damaged {
                // The records before the damage go out first; the next peek starts at it.
                Some(_) if !out.is_empty() => return Ok(out),
                Some(why) => self.skip_damaged(&why)?,
                None => return Ok(out),
            }
        }
    }

    /// The oldest segment does not read back from the read position on (checked at open, so
    /// damaged since): its unread records are counted as lost and the segment deleted, so
    /// replay goes on with the next.
    fn skip_damaged(&mut self, why: &str) -> Result<(), seglog::Error> {
        if let Some(s) = self.segments.pop_front() {
            tracing::error!(segment = %self.dir.segment_path(s.base).display(), offset = self.read_offset, records = s.unread, error = why, "store-and-forward buffer: records that do not read back are lost");
            self.lost += s.unread;
            if self.segments.is_empty() {
                self.writer = None;
            }
            self.read_offset = 0;
            self.write_position()?;
            self.dir.remove(&[s.base])?;
        }
        Ok(())
    }

    /// Mark the first `n` records (as returned by [`peek`](Self::peek)) as published.
    pub fn consume(&mut self, n: usize) -> Result<(), seglog::Error> {
        let Some(first) = self.segments.front() else {
            return Ok(());
        };
        let mut r = self.dir.reader(first.base, self.read_offset)?;
        let mut done = 0;
        while done < n && r.next_frame()?.is_some() {
            done += 1;
        }
        self.read_offset = r.offset();
        if let Some(s) = self.segments.front_mut() {
            s.unread = s.unread.saturating_sub(done as u64);
        }
        self.drop_read()?;
        self.write_position()
    }

    /// Delete the oldest segments while they hold nothing unread.
    fn drop_read(&mut self) -> Result<(), seglog::Error> {
        let mut gone = Vec::new();
        while self.segments.front().is_some_and(|s| s.unread == 0) {
            if let Some(s) = self.segments.pop_front() {
                gone.push(s.base);
            }
            self.read_offset = 0;
        }
        if gone.is_empty() {
            return Ok(());
        }
        if self.segments.is_empty() {
            // Keep writing into a fresh segment next time.
            self.writer = None;
        }
        self.write_position()?;
        self.dir.remove(&gone)
    }

    fn write_position(&mut self) -> Result<(), seglog::Error> {
        self.position_dirty = false;
        let (base, off) = self
            .segments
            .front()
            .map_or((0, 0), |s| (s.base, self.read_offset));
        self.dir.write_state("position", &format!("{base} {off}\n"))
    }
}

/// Records at or after `offset` in a segment, and the frame boundary they start at (an
/// offset inside a frame moves on to the next boundary).
fn unread_after(dir: &SegmentDir, base: u64, offset: u64) -> Result<(u64, u64), seglog::Error> {
    let mut r = dir.reader(base, 0)?;
    let (mut unread, mut from) = (0, None);
    loop {
        let at = r.offset();
        if at >= offset && from.is_none() {
            from = Some(at);
        }
        // Open read the segment through and cut it at any bad frame: none is left.
        if r.next_frame()?.is_none() {
            break;
        }
        if from.is_some() {
            unread += 1;
        }
    }
    Ok((unread, from.unwrap_or(r.offset())))
}

#[cfg(test)]
mod tests {
    use std::fs::{self, OpenOptions};
    use std::io::Write;

    use super::*;

    fn rec(i: usize) -> Record {
        Record {
            topic: format!("acme/t/{}", i % 3),
            payload: format!("{{\"v\":{i}}}").into_bytes(),
        }
    }

    #[test]
    fn fifo_across_segments_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = DiskBuffer::open(dir.path(), 1024 * 1024).unwrap();
        for chunk in (0..1000).collect::<Vec<_>>().chunks(50) {
            b.append(&chunk.iter().map(|i| rec(*i)).collect::<Vec<_>>())
                .unwrap();
        }
        assert_eq!(b.len(), 1000);
        let first = b.peek(300).unwrap();
        assert_eq!(first, (0..300).map(rec).collect::<Vec<_>>());
        b.consume(300).unwrap();
        drop(b);
        // A restart resumes after what was consumed.
        let mut b = DiskBuffer::open(dir.path(), 1024 * 1024).unwrap();
        assert_eq!(b.len(), 700);
        let mut got = Vec::new();
        while !b.is_empty() {
            let r = b.peek(128).unwrap();
            assert!(!r.is_empty());
            b.consume(r.len()).unwrap();
            got.extend(r);
        }
        assert_eq!(got, (300..1000).map(rec).collect::<Vec<_>>());
        b.append(&[rec(5)]).unwrap();
        assert_eq!(b.peek(10).unwrap(), vec![rec(5)]);
        assert_eq!((b.dropped(), b.lost()), (0, 0));
    }

    /// Every unread record, oldest first, consumed.
    fn read_all(b: &mut DiskBuffer) -> Vec<Record> {
        let mut got = Vec::new();
        loop {
            let r = b.peek(64).unwrap();
            if r.is_empty() {
                return got;
            }
            b.consume(r.len()).unwrap();
            got.extend(r);
        }
    }

    #[test]
    fn acked_records_are_done_across_segments_and_a_restart_replays_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = DiskBuffer::open_with(dir.path(), u64::MAX, 1024).unwrap();
        let mut places = Vec::new();
        for chunk in (0..300).collect::<Vec<_>>().chunks(10) {
            let recs: Vec<Record> = chunk.iter().map(|i| rec(*i)).collect();
            places.extend(
                b.append_placed(&recs)
                    .unwrap()
                    .into_iter()
                    .map(Option::unwrap),
            );
        }
        let files = segment_files(dir.path()).len();
        assert!(files > 3, "{files} segments");
        // The first 250 acknowledged: the segments they filled are deleted.
        b.ack(&places[..250]).unwrap();
        assert_eq!(b.len(), 50);
        assert!(segment_files(dir.path()).len() < files);
        b.save_position().unwrap();
        drop(b);
        let mut b = DiskBuffer::open_with(dir.path(), u64::MAX, 1024).unwrap();
        assert_eq!(b.len(), 50);
        assert_eq!(read_all(&mut b), (250..300).map(rec).collect::<Vec<_>>());
        // The last segment stays while it is appended to, even when everything is done.
        let rest: Vec<Record> = (300..305).map(rec).collect();
        let more: Vec<Place> = b
            .append_placed(&rest)
            .unwrap()
            .into_iter()
            .map(Option::unwrap)
            .collect();
        b.ack(&more).unwrap();
        assert!(b.is_empty());
        assert_eq!(segment_files(dir.path()).len(), 1);
        b.save_position().unwrap();
        drop(b);
        assert!(DiskBuffer::open_with(dir.path(), u64::MAX, 1024)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn an_unsaved_position_replays_acked_records_never_loses_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = DiskBuffer::open_with(dir.path(), u64::MAX, 1 << 20).unwrap();
        let places: Vec<Place> = b
            .append_placed(&(0..20).map(rec).collect::<Vec<_>>())
            .unwrap()
            .into_iter()
            .map(Option::unwrap)
            .collect();
        b.ack(&places[..5]).unwrap();
        b.save_position().unwrap();
        b.ack(&places[5..15]).unwrap();
        drop(b); // a crash before the next save
        let mut b = DiskBuffer::open_with(dir.path(), u64::MAX, 1 << 20).unwrap();
        assert_eq!(b.peek(100).unwrap(), (5..20).map(rec).collect::<Vec<_>>());
    }

    #[test]
    fn oldest_dropped_and_counted_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = DiskBuffer::open(dir.path(), 64 * 1024).unwrap();
        for i in 0..10_000 {
            b.append(&[rec(i)]).unwrap();
        }
        assert!(b.bytes() <= 64 * 1024 + 16 * 1024, "{}", b.bytes());
        assert_eq!(
            b.len() + b.dropped(),
            10_000,
            "every record is either kept or counted"
        );
        assert!(b.dropped() > 0);
        let first = b.peek(1).unwrap().remove(0);
        assert_eq!(first, rec(b.dropped() as usize), "the oldest go first");
        // And after a restart.
        let (len, dropped) = (b.len(), b.dropped());
        drop(b);
        let mut b = DiskBuffer::open(dir.path(), 64 * 1024).unwrap();
        assert_eq!(b.len(), len);
        assert_eq!(b.peek(1).unwrap()[0], rec(dropped as usize));
    }

    fn segment_files(dir: &Path) -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "seg"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn torn_tail_is_cut_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut b = DiskBuffer::open(dir.path(), 1024 * 1024).unwrap();
            b.append(&[rec(1), rec(2)]).unwrap();
        }
        let seg = segment_files(dir.path()).remove(0);
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[40, 0, 0, 0, 1, 2, 3, 4, 9, 9]).unwrap();
        drop(f);
        let mut b = DiskBuffer::open(dir.path(), 1024 * 1024).unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!((b.recovery().bytes(), b.lost()), (10, 1));
        b.append(&[rec(3)]).unwrap();
        assert_eq!(b.peek(10).unwrap(), vec![rec(1), rec(2), rec(3)]);
    }

    #[test]
    fn long_unicode_topics_are_kept_whole() {
        // Past the old u16 topic length, in two-byte characters.
        let dir = tempfile::tempdir().unwrap();
        let r = Record {
            topic: "é".repeat(40_000),
            payload: vec![1, 2, 3],
        };
        {
            let mut b = DiskBuffer::open(dir.path(), 1024 * 1024).unwrap();
            b.append(std::slice::from_ref(&r)).unwrap();
        }
        let mut b = DiskBuffer::open(dir.path(), 1024 * 1024).unwrap();
        assert_eq!(b.peek(1).unwrap(), vec![r]);
    }

    #[test]
    fn a_directory_in_use_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _b = DiskBuffer::open(dir.path(), 1024 * 1024).unwrap();
        let e = DiskBuffer::open(dir.path(), 1024 * 1024).err().unwrap();
        assert!(e.to_string().contains("in use by another process"), "{e}");
    }

    #[test]
    fn damage_found_while_replaying_is_counted_and_skipped() {
        let dir = tempfile::tempdir().unwrap();
        // Small segments: the first fills and a second starts.
        let mut b = DiskBuffer::open(dir.path(), 64 * 1024).unwrap();
        let mut n = 0;
        while segment_files(dir.path()).len() < 2 {
            b.append(&[rec(n)]).unwrap();
            n += 1;
        }
        let first_seg = b.segments[0].unread;
        // Damage the first segment after its first record, while open.
        let seg = segment_files(dir.path()).remove(0);
        let mut data = fs::read(&seg).unwrap();
        let first_len = FORMAT
            .encode(&mut Vec::new(), |e| {
                e.str(&rec(0).topic);
                e.bytes(&rec(0).payload);
            })
            .unwrap();
        data[first_len + 20] ^= 0xff;
        fs::write(&seg, &data).unwrap();
        // The record before the damage, then the next segment's.
        assert_eq!(b.peek(10).unwrap(), vec![rec(0)]);
        b.consume(1).unwrap();
        assert_eq!(b.peek(1).unwrap(), vec![rec(first_seg as usize)]);
        assert_eq!(b.lost(), first_seg - 1);
        assert_eq!(b.len(), n as u64 - first_seg);
    }

    #[test]
    fn old_format_files_are_counted_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        // The previous format: `[len u32][fnv u32][topic len u16][topic][payload]`.
        fs::write(
            dir.path().join(format!("{:016}.seg", 3)),
            [9, 0, 0, 0, 1, 2, 3, 4, 1, 0, b'a', 1, 2, 3, 4, 5, 6],
        )
        .unwrap();
        fs::write(dir.path().join("position"), "3 0\n").unwrap();
        let mut b = DiskBuffer::open(dir.path(), 1024 * 1024).unwrap();
        assert_eq!((b.len(), b.lost()), (0, 1));
        b.append(&[rec(1)]).unwrap();
        assert_eq!(b.peek(5).unwrap(), vec![rec(1)]);
    }
}
