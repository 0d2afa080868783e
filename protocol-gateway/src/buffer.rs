//! Store-and-forward: values that could not be published wait here, on disk, in order.
//!
//! Segment files `<n>.seg` hold records `[len u32][sum u32][topic len u16][topic][payload]`
//! (`sum` is a checksum of the rest, so a torn write at the tail after a crash is detected and
//! cut off). Appends go to the newest segment, which rolls at a quarter of the size limit; the
//! read position (`segment, offset`) is kept in `position` so a restart resumes where replay
//! stopped. Past `max_size` the oldest segment is deleted and its unread records counted as
//! dropped: the only way data leaves the buffer without being published, and it is counted.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// One buffered message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    pub payload: Vec<u8>,
}

struct Segment {
    id: u64,
    bytes: u64,
    /// Records in the segment not yet read.
    unread: u64,
}

pub struct DiskBuffer {
    dir: PathBuf,
    max_size: u64,
    segment_size: u64,
    segments: VecDeque<Segment>,
    /// Read position in the oldest segment.
    read_offset: u64,
    writer: Option<File>,
    dropped: u64,
}

fn checksum(data: &[u8]) -> u32 {
    // FNV-1a: enough to detect a torn or garbled tail record.
    data.iter().fold(0x811c9dc5u32, |h, b| {
        (h ^ *b as u32).wrapping_mul(0x01000193)
    })
}

fn seg_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016}.seg"))
}

/// Read records from `offset`; returns them, the offset after the last whole record, and
/// whether the file ended cleanly (false: a torn record follows).
fn scan(path: &Path, offset: u64, limit: usize) -> io::Result<(Vec<Record>, u64, bool)> {
    let mut f = BufReader::new(File::open(path)?);
    f.seek(SeekFrom::Start(offset))?;
    let mut out = Vec::new();
    let mut pos = offset;
    loop {
        if out.len() >= limit {
            return Ok((out, pos, true));
        }
        let mut head = [0u8; 8];
        match f.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok((out, pos, true)),
            Err(e) => return Err(e),
        }
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let sum = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if !(2..=64 * 1024 * 1024).contains(&len) {
            return Ok((out, pos, false));
        }
        let mut body = vec![0u8; len];
        if f.read_exact(&mut body).is_err() || checksum(&body) != sum {
            return Ok((out, pos, false));
        }
        let tlen = u16::from_le_bytes([body[0], body[1]]) as usize;
        if 2 + tlen > len {
            return Ok((out, pos, false));
        }
        let topic = String::from_utf8_lossy(&body[2..2 + tlen]).into_owned();
        out.push(Record {
            topic,
            payload: body[2 + tlen..].to_vec(),
        });
        pos += 8 + len as u64;
    }
}

impl DiskBuffer {
    /// Open (or create) the buffer in `dir`, recovering what a previous run left.
    pub fn open(dir: &Path, max_size: u64) -> io::Result<DiskBuffer> {
        fs::create_dir_all(dir)?;
        let mut ids: Vec<u64> = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".seg")?.parse().ok())
            .collect();
        ids.sort_unstable();
        let (pos_seg, pos_off) = fs::read_to_string(dir.join("position"))
            .ok()
            .and_then(|s| {
                let (a, b) = s.trim().split_once(' ')?;
                Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?))
            })
            .unwrap_or((0, 0));
        let mut segments = VecDeque::new();
        let mut read_offset = 0;
        for id in ids {
            let path = seg_path(dir, id);
            if id < pos_seg {
                // Fully replayed before the restart.
                let _ = fs::remove_file(&path);
                continue;
            }
            let start = if id == pos_seg { pos_off } else { 0 };
            let (records, end, clean) = scan(&path, 0, usize::MAX)?;
            if !clean {
                // Cut a torn tail left by a crash.
                OpenOptions::new().write(true).open(&path)?.set_len(end)?;
            }
            let unread = if start == 0 {
                records.len() as u64
            } else {
                let (after, _, _) = scan(&path, start.min(end), usize::MAX)?;
                after.len() as u64
            };
            if segments.is_empty() {
                read_offset = start.min(end);
            }
            segments.push_back(Segment {
                id,
                bytes: end,
                unread,
            });
        }
        Ok(DiskBuffer {
            dir: dir.to_path_buf(),
            max_size,
            segment_size: (max_size / 4).max(16 * 1024),
            segments,
            read_offset,
            writer: None,
            dropped: 0,
        })
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

    fn new_segment(&mut self) -> io::Result<()> {
        let id = self.segments.back().map_or(1, |s| s.id + 1);
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(seg_path(&self.dir, id))?;
        self.segments.push_back(Segment {
            id,
            bytes: 0,
            unread: 0,
        });
        self.writer = Some(f);
        Ok(())
    }

    /// Append records and make them durable (one fsync per call).
    pub fn append(&mut self, records: &[Record]) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let needs_new = match self.segments.back() {
            None => true,
            Some(s) => s.bytes >= self.segment_size || self.writer.is_none(),
        };
        if needs_new {
            if let (Some(_), None) = (self.segments.back(), &self.writer) {
                // Reopen the last segment after a restart if it still has room.
                let last = self.segments.back().map(|s| (s.id, s.bytes));
                if let Some((id, bytes)) = last {
                    if bytes < self.segment_size {
                        self.writer = Some(
                            OpenOptions::new()
                                .append(true)
                                .open(seg_path(&self.dir, id))?,
                        );
                    }
                }
            }
            if self.writer.is_none()
                || self
                    .segments
                    .back()
                    .is_none_or(|s| s.bytes >= self.segment_size)
            {
                self.new_segment()?;
            }
        }
        let mut buf = Vec::with_capacity(records.len() * 96);
        for r in records {
            let tlen = r.topic.len().min(u16::MAX as usize);
            let mut body = Vec::with_capacity(2 + tlen + r.payload.len());
            body.extend_from_slice(&(tlen as u16).to_le_bytes());
            body.extend_from_slice(&r.topic.as_bytes()[..tlen]);
            body.extend_from_slice(&r.payload);
            buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
            buf.extend_from_slice(&checksum(&body).to_le_bytes());
            buf.extend_from_slice(&body);
        }
        if let Some(w) = self.writer.as_mut() {
            w.write_all(&buf)?;
            w.sync_data()?;
        }
        if let Some(s) = self.segments.back_mut() {
            s.bytes += buf.len() as u64;
            s.unread += records.len() as u64;
        }
        self.enforce_limit()?;
        Ok(())
    }

    fn enforce_limit(&mut self) -> io::Result<()> {
        while self.bytes() > self.max_size && self.segments.len() > 1 {
            if let Some(old) = self.segments.pop_front() {
                self.dropped += old.unread;
                let _ = fs::remove_file(seg_path(&self.dir, old.id));
                self.read_offset = 0;
                self.save_position()?;
            }
        }
        Ok(())
    }

    /// The next records, up to `limit`, without consuming them.
    pub fn peek(&self, limit: usize) -> io::Result<Vec<Record>> {
        let Some(first) = self.segments.front() else {
            return Ok(Vec::new());
        };
        let (records, _, _) = scan(&seg_path(&self.dir, first.id), self.read_offset, limit)?;
        Ok(records)
    }

    /// Mark the first `n` records (as returned by [`peek`](Self::peek)) as published.
    pub fn consume(&mut self, n: usize) -> io::Result<()> {
        let Some(first) = self.segments.front() else {
            return Ok(());
        };
        let path = seg_path(&self.dir, first.id);
        let (records, end, _) = scan(&path, self.read_offset, n)?;
        self.read_offset = end;
        if let Some(s) = self.segments.front_mut() {
            s.unread = s.unread.saturating_sub(records.len() as u64);
        }
        let is_last = self.segments.len() == 1;
        if let Some(s) = self.segments.front() {
            if s.unread == 0 && self.read_offset >= s.bytes {
                if is_last {
                    // Keep writing into a fresh segment next time.
                    self.writer = None;
                }
                self.segments.pop_front();
                let _ = fs::remove_file(&path);
                self.read_offset = 0;
            }
        }
        self.save_position()
    }

    fn save_position(&self) -> io::Result<()> {
        let (seg, off) = self
            .segments
            .front()
            .map_or((0, 0), |s| (s.id, self.read_offset));
        let tmp = self.dir.join("position.tmp");
        fs::write(&tmp, format!("{seg} {off}\n"))?;
        fs::rename(tmp, self.dir.join("position"))
    }
}

#[cfg(test)]
mod tests {
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
    }

    #[test]
    fn torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut b = DiskBuffer::open(dir.path(), 1024 * 1024).unwrap();
            b.append(&[rec(1), rec(2)]).unwrap();
        }
        let seg = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .find(|e| e.path().extension().is_some_and(|x| x == "seg"))
            .unwrap();
        let mut f = OpenOptions::new().append(true).open(seg.path()).unwrap();
        f.write_all(&[40, 0, 0, 0, 1, 2, 3, 4, 9, 9]).unwrap();
        let mut b = DiskBuffer::open(dir.path(), 1024 * 1024).unwrap();
        assert_eq!(b.len(), 2);
        b.append(&[rec(3)]).unwrap();
        assert_eq!(b.peek(10).unwrap(), vec![rec(1), rec(2), rec(3)]);
    }
}
