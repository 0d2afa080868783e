//! The write-ahead log: what ingestion has received is durable here before the broker gets
//! its ack, and stays until the database has committed it.
//!
//! * **Files**: segment files `<first frame id>.wal` in `wal_dir`. A frame is
//!   `[magic u32][body len u32][crc32c u32][body]`, the body `[id u64][written unix ms i64]
//!   [points u32][rejects u32]` and the records. A torn frame at the tail (crash during a
//!   write) fails its checksum and is cut off at open; it was never acknowledged, so the
//!   broker sends it again.
//! * **Writer** (a thread): takes every append waiting in its channel as one frame, writes it
//!   and `fdatasync`s once (group commit), then hands the appends' tokens (the MQTT messages)
//!   back to be acknowledged, in order. When the log reaches `max_size` it stops taking
//!   appends: the channel fills, acks stop, and the broker holds the rest (back-pressure, no
//!   discard).
//! * **Reader** (a thread): follows the durable end of the log like `tail -f` and sends
//!   frames on in order, so a restart replays what was left before anything new (new data is
//!   appended after it). Data just written is read back from the page cache.
//! * **Trim**: [`Wal::commit_below`] is told the first frame id not yet committed in the
//!   database; whole segments below it are deleted, and the id is kept in `committed` so a
//!   restart does not replay committed frames (it is only a shortcut: the database's unique
//!   key drops anything replayed twice).

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Registry};
use tokio::sync::mpsc;

use crate::model::{approx_bytes, Frame, Point, Reject};

const MAGIC: u32 = 0x4e58_5731; // "NXW1"
const HEADER: usize = 12;
const BODY_HEAD: usize = 24;
/// Largest frame body accepted when reading (a bigger length is a corrupt header).
const MAX_BODY: usize = 256 * 1024 * 1024;
/// Rows gathered into one frame at most.
const MAX_FRAME_ROWS: usize = 20_000;
const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

#[derive(Debug, Clone)]
pub struct WalOptions {
    pub dir: PathBuf,
    pub max_size: u64,
    pub segment_size: u64,
    /// `fdatasync` each frame (always on in service; tests of the format may turn it off).
    pub fsync: bool,
}

/// One append: rows and the token to hand back once they are durable.
pub struct Append<T> {
    pub points: Vec<Point>,
    pub rejects: Vec<Reject>,
    pub token: T,
}

#[derive(Clone)]
pub struct WalMetrics {
    pub bytes: IntGauge,
    pub segments: IntGauge,
    pub frames: IntCounter,
    pub fsync_seconds: Histogram,
    pub full: IntGauge,
    pub corrupt: IntCounter,
}

impl WalMetrics {
    pub fn new(registry: &Registry) -> WalMetrics {
        let m = WalMetrics {
            bytes: IntGauge::new("nexus_ingest_wal_bytes", "Bytes in the write-ahead log")
                .expect("metric"),
            segments: IntGauge::new("nexus_ingest_wal_segments", "Segment files of the WAL")
                .expect("metric"),
            frames: IntCounter::new(
                "nexus_ingest_wal_frames_total",
                "Frames written (one fsync each)",
            )
            .expect("metric"),
            fsync_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "nexus_ingest_wal_fsync_seconds",
                    "Write and fsync of a frame",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5,
                ]),
            )
            .expect("metric"),
            full: IntGauge::new(
                "nexus_ingest_wal_full",
                "1 while the WAL is full and acks to the broker are held back",
            )
            .expect("metric"),
            corrupt: IntCounter::new(
                "nexus_ingest_wal_corrupt_total",
                "Stretches of the WAL that could not be read back (their rows are lost)",
            )
            .expect("metric"),
        };
        for c in [&m.bytes, &m.segments, &m.full] {
            registry.register(Box::new(c.clone())).ok();
        }
        registry.register(Box::new(m.frames.clone())).ok();
        registry.register(Box::new(m.fsync_seconds.clone())).ok();
        registry.register(Box::new(m.corrupt.clone())).ok();
        m
    }
}

#[derive(Debug, Clone, Copy)]
struct Seg {
    first_id: u64,
    /// Highest frame id in the segment; `first_id - 1` while it is empty.
    last_id: u64,
    bytes: u64,
}

struct State {
    segments: VecDeque<Seg>,
    total_bytes: u64,
    /// Id the next frame gets.
    next_id: u64,
    /// First frame id not yet committed to the database.
    committed_below: u64,
    /// One `(frame id, written ms)` sample per second of writing, for the age of the oldest
    /// uncommitted frame.
    times: VecDeque<(u64, i64)>,
    closing: bool,
    last_persist: Option<Instant>,
}

impl State {
    fn durable_id(&self) -> u64 {
        self.next_id - 1
    }
}

struct Shared {
    opts: WalOptions,
    /// Held (locked) while the log is open, so two processes cannot share a directory.
    _lock: File,
    state: Mutex<State>,
    /// Signalled when segments are trimmed (room for the writer) or on close.
    space: Condvar,
    /// Signalled when a frame is durable (work for the reader) or on close.
    progress: Condvar,
    metrics: Option<WalMetrics>,
}

/// Handle to an open log; clones share it.
#[derive(Clone)]
pub struct Wal {
    shared: Arc<Shared>,
}

fn seg_path(dir: &Path, first_id: u64) -> PathBuf {
    dir.join(format!("{first_id:020}.wal"))
}

fn now_ms() -> i64 {
    crate::model::now_us() / 1000
}

/// A frame read back: its id and records, or `None` at the end of the valid data.
fn read_frame(r: &mut impl Read) -> io::Result<Option<(u64, Frame)>> {
    let mut head = [0u8; HEADER];
    match r.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let word = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    let (magic, len, sum) = (word(0), word(4) as usize, word(8));
    if magic != MAGIC || !(BODY_HEAD..=MAX_BODY).contains(&len) {
        return Ok(None);
    }
    let mut body = vec![0u8; len];
    match r.read_exact(&mut body) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    if CRC.checksum(&body) != sum {
        return Ok(None);
    }
    Ok(decode_body(&body).map(|f| ((HEADER + len) as u64, f)))
}

struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.b.len() < n {
            return None;
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Some(h)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
    }
    fn str(&mut self, len: usize) -> Option<String> {
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }
}

fn decode_body(body: &[u8]) -> Option<Frame> {
    let mut c = Cursor { b: body };
    let id = c.u64()?;
    let written_ms = c.u64()? as i64;
    let np = c.u32()? as usize;
    let nr = c.u32()? as usize;
    let mut points = Vec::with_capacity(np.min(MAX_FRAME_ROWS));
    for _ in 0..np {
        let ts_us = c.u64()? as i64;
        let quality = c.u16()? as i16;
        let flags = c.u8()?;
        let value = if flags & 1 != 0 {
            Some(f64::from_bits(c.u64()?))
        } else {
            None
        };
        let tlen = c.u16()? as usize;
        let topic = c.str(tlen)?;
        let value_str = if flags & 2 != 0 {
            let l = c.u32()? as usize;
            Some(c.str(l)?)
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
    let mut rejects = Vec::with_capacity(nr.min(MAX_FRAME_ROWS));
    for _ in 0..nr {
        let ts_us = c.u64()? as i64;
        let tlen = c.u16()? as usize;
        let topic = c.str(tlen)?;
        let rlen = c.u16()? as usize;
        let reason = c.str(rlen)?;
        let plen = c.u32()? as usize;
        let payload = c.take(plen)?.to_vec();
        rejects.push(Reject {
            ts_us,
            topic,
            reason,
            payload,
        });
    }
    if !c.b.is_empty() {
        return None;
    }
    Some(Frame {
        first_id: id,
        last_id: id,
        written_ms,
        points,
        rejects,
    })
}

/// Encode one frame (header and body) into `out`.
fn encode_frame(out: &mut Vec<u8>, id: u64, written_ms: i64, points: &[Point], rejects: &[Reject]) {
    out.clear();
    out.extend_from_slice(&[0u8; HEADER]);
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&written_ms.to_le_bytes());
    out.extend_from_slice(&(points.len() as u32).to_le_bytes());
    out.extend_from_slice(&(rejects.len() as u32).to_le_bytes());
    for p in points {
        out.extend_from_slice(&p.ts_us.to_le_bytes());
        out.extend_from_slice(&p.quality.to_le_bytes());
        let flags = u8::from(p.value.is_some()) | (u8::from(p.value_str.is_some()) << 1);
        out.push(flags);
        if let Some(v) = p.value {
            out.extend_from_slice(&v.to_bits().to_le_bytes());
        }
        // MQTT topics are at most 65535 bytes.
        let topic = &p.topic.as_bytes()[..p.topic.len().min(u16::MAX as usize)];
        out.extend_from_slice(&(topic.len() as u16).to_le_bytes());
        out.extend_from_slice(topic);
        if let Some(s) = &p.value_str {
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }
    for r in rejects {
        out.extend_from_slice(&r.ts_us.to_le_bytes());
        let topic = &r.topic.as_bytes()[..r.topic.len().min(u16::MAX as usize)];
        out.extend_from_slice(&(topic.len() as u16).to_le_bytes());
        out.extend_from_slice(topic);
        let reason = &r.reason.as_bytes()[..r.reason.len().min(1024)];
        out.extend_from_slice(&(reason.len() as u16).to_le_bytes());
        out.extend_from_slice(reason);
        out.extend_from_slice(&(r.payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&r.payload);
    }
    let body_len = (out.len() - HEADER) as u32;
    let sum = CRC.checksum(&out[HEADER..]);
    out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    out[4..8].copy_from_slice(&body_len.to_le_bytes());
    out[8..12].copy_from_slice(&sum.to_le_bytes());
}

/// Scan a segment: the ids of its first and last whole frames and the length of the valid
/// data (anything after it is a torn tail).
fn scan_segment(path: &Path) -> io::Result<(Option<(u64, u64)>, u64)> {
    let mut r = BufReader::with_capacity(1 << 20, File::open(path)?);
    let mut pos = 0;
    let mut ids: Option<(u64, u64)> = None;
    while let Some((len, f)) = read_frame(&mut r)? {
        pos += len;
        ids = Some(ids.map_or((f.first_id, f.first_id), |(a, _)| (a, f.first_id)));
    }
    Ok((ids, pos))
}

/// Wait on `cv` for at most `d` (a poisoned lock is taken over: the state stays consistent).
fn wait<'a>(cv: &Condvar, st: MutexGuard<'a, State>, d: Duration) -> MutexGuard<'a, State> {
    cv.wait_timeout(st, d)
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .0
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Wal {
    /// Open (or create) the log and recover what a previous run left. Returns the log and the
    /// first frame id still to be written to the database.
    pub fn open(opts: WalOptions, metrics: Option<WalMetrics>) -> io::Result<(Wal, u64)> {
        fs::create_dir_all(&opts.dir)?;
        let lock = File::create(opts.dir.join("lock"))?;
        if let Err(e) = lock.try_lock() {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "{} is in use by another ingestion process ({e}); give each instance its own wal_dir",
                    opts.dir.display()
                ),
            ));
        }
        let mut firsts: Vec<u64> = fs::read_dir(&opts.dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".wal")?.parse().ok())
            .collect();
        firsts.sort_unstable();
        let floor: u64 = fs::read_to_string(opts.dir.join("committed"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1)
            .max(1);
        let mut segments = VecDeque::new();
        let mut times = VecDeque::new();
        let mut total = 0;
        let mut next_id = floor;
        for (i, &first) in firsts.iter().enumerate() {
            let path = seg_path(&opts.dir, first);
            let last_seg = i + 1 == firsts.len();
            let (bytes, last_id) = if last_seg {
                // Only the newest segment can have a torn tail.
                let (ids, valid) = scan_segment(&path)?;
                let len = fs::metadata(&path)?.len();
                if valid < len {
                    tracing::warn!(segment = %path.display(), cut = len - valid, "WAL: cutting a torn tail left by a crash (never acknowledged; the broker resends it)");
                    OpenOptions::new().write(true).open(&path)?.set_len(valid)?;
                }
                (valid, ids.map_or(first - 1, |(_, l)| l))
            } else {
                (fs::metadata(&path)?.len(), firsts[i + 1] - 1)
            };
            let mtime = fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or_else(now_ms, |d| d.as_millis() as i64);
            times.push_back((first, mtime));
            total += bytes;
            next_id = next_id.max(last_id + 1);
            segments.push_back(Seg {
                first_id: first,
                last_id,
                bytes,
            });
        }
        let start = segments
            .front()
            .map_or(next_id, |s| s.first_id)
            .max(floor)
            .min(next_id);
        if !segments.is_empty() {
            tracing::info!(
                dir = %opts.dir.display(),
                bytes = total,
                frames = next_id - start,
                "WAL recovered; replaying frames not yet committed before new data"
            );
        }
        let wal = Wal {
            shared: Arc::new(Shared {
                opts,
                _lock: lock,
                state: Mutex::new(State {
                    segments,
                    total_bytes: total,
                    next_id,
                    committed_below: start,
                    times,
                    closing: false,
                    last_persist: None,
                }),
                space: Condvar::new(),
                progress: Condvar::new(),
                metrics,
            }),
        };
        wal.update_gauges(&wal.lock());
        Ok((wal, start))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn update_gauges(&self, st: &State) {
        if let Some(m) = &self.shared.metrics {
            m.bytes.set(st.total_bytes as i64);
            m.segments.set(st.segments.len() as i64);
        }
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.lock().total_bytes
    }

    /// Share of `max_size` in use (the scaling signal).
    pub fn usage_ratio(&self) -> f64 {
        self.bytes() as f64 / self.shared.opts.max_size as f64
    }

    /// Frames durable but not yet committed to the database.
    pub fn pending_frames(&self) -> u64 {
        let st = self.lock();
        st.next_id.saturating_sub(st.committed_below)
    }

    /// Seconds since the oldest frame not yet committed was written (0 when all is), to
    /// about a second.
    pub fn oldest_uncommitted_age(&self) -> f64 {
        let st = self.lock();
        if st.committed_below >= st.next_id {
            return 0.0;
        }
        let written = st
            .times
            .iter()
            .take_while(|(id, _)| *id <= st.committed_below)
            .last()
            .or(st.times.front())
            .map_or_else(now_ms, |t| t.1);
        ((now_ms() - written).max(0)) as f64 / 1000.0
    }

    /// Stop the writer and reader threads (waits end at once; nothing more is acknowledged).
    pub fn close(&self) {
        let mut st = self.lock();
        st.closing = true;
        self.persist_floor(&mut st, true);
        drop(st);
        self.shared.space.notify_all();
        self.shared.progress.notify_all();
    }

    /// Every frame below `id` is committed in the database: delete the segments wholly
    /// below it.
    pub fn commit_below(&self, id: u64) {
        let mut st = self.lock();
        if id <= st.committed_below {
            return;
        }
        st.committed_below = id;
        let mut freed = false;
        while st.segments.len() > 1 {
            let Some(seg) = st.segments.front().copied() else {
                break;
            };
            if seg.last_id >= id {
                break;
            }
            let path = seg_path(&self.shared.opts.dir, seg.first_id);
            if let Err(e) = fs::remove_file(&path) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(segment = %path.display(), error = %e, "WAL: cannot delete a committed segment");
                    break;
                }
            }
            st.segments.pop_front();
            st.total_bytes -= seg.bytes;
            freed = true;
        }
        while st.times.len() > 1 && st.times.get(1).is_some_and(|t| t.0 <= id) {
            st.times.pop_front();
        }
        self.persist_floor(&mut st, false);
        self.update_gauges(&st);
        drop(st);
        if freed {
            self.shared.space.notify_all();
        }
    }

    /// Record the commit position now (commits record it at most every 200 ms).
    pub fn record_position(&self) {
        let mut st = self.lock();
        self.persist_floor(&mut st, true);
    }

    fn persist_floor(&self, st: &mut State, force: bool) {
        if !force
            && st
                .last_persist
                .is_some_and(|t| t.elapsed() < Duration::from_millis(200))
        {
            return;
        }
        st.last_persist = Some(Instant::now());
        let dir = &self.shared.opts.dir;
        let tmp = dir.join("committed.tmp");
        let res = fs::write(&tmp, format!("{}\n", st.committed_below))
            .and_then(|()| fs::rename(&tmp, dir.join("committed")));
        if let Err(e) = res {
            tracing::debug!(error = %e, "WAL: cannot record the committed position (a restart replays more; duplicates are dropped)");
        }
    }

    /// Start the writer thread. It ends when `rx` closes (after writing what it holds) or on
    /// [`Wal::close`] (dropping what it holds unacknowledged).
    pub fn spawn_writer<T: Send + 'static>(
        &self,
        rx: mpsc::Receiver<Append<T>>,
        acks: mpsc::UnboundedSender<Vec<T>>,
    ) -> io::Result<std::thread::JoinHandle<()>> {
        let wal = self.clone();
        std::thread::Builder::new()
            .name("nexus-wal-writer".into())
            .spawn(move || wal.writer_loop(rx, acks))
    }

    fn writer_loop<T>(
        &self,
        mut rx: mpsc::Receiver<Append<T>>,
        acks: mpsc::UnboundedSender<Vec<T>>,
    ) {
        let mut buf = Vec::with_capacity(1 << 20);
        let mut file: Option<File> = None;
        while let Some(first) = rx.blocking_recv() {
            let mut tokens = vec![first.token];
            let (mut points, mut rejects) = (first.points, first.rejects);
            let byte_cap = (self.shared.opts.segment_size / 2) as usize;
            let mut bytes = approx_bytes(&points, &rejects);
            while points.len() + rejects.len() < MAX_FRAME_ROWS && bytes < byte_cap {
                match rx.try_recv() {
                    Ok(a) => {
                        bytes += approx_bytes(&a.points, &a.rejects);
                        points.extend(a.points);
                        rejects.extend(a.rejects);
                        tokens.push(a.token);
                    }
                    Err(_) => break,
                }
            }
            if points.is_empty() && rejects.is_empty() {
                let _ = acks.send(tokens);
                continue;
            }
            loop {
                match self.write_frame(&mut file, &mut buf, &points, &rejects) {
                    Ok(true) => break,
                    Ok(false) => return, // closing
                    Err(e) => {
                        tracing::error!(dir = %self.shared.opts.dir.display(), error = %e, "WAL write failed; holding acks and retrying in 1s");
                        file = None;
                        std::thread::sleep(Duration::from_secs(1));
                        if self.lock().closing {
                            return;
                        }
                    }
                }
            }
            if acks.send(tokens).is_err() {
                return;
            }
        }
    }

    /// Write one frame durably. `Ok(false)`: the log is closing.
    fn write_frame(
        &self,
        file: &mut Option<File>,
        buf: &mut Vec<u8>,
        points: &[Point],
        rejects: &[Reject],
    ) -> io::Result<bool> {
        let opts = &self.shared.opts;
        let mut st = self.lock();
        let id = st.next_id;
        let written_ms = now_ms();
        encode_frame(buf, id, written_ms, points, rejects);
        let len = buf.len() as u64;
        let mut waited = false;
        loop {
            if st.closing {
                return Ok(false);
            }
            let fits = |st: &State| st.total_bytes == 0 || st.total_bytes + len <= opts.max_size;
            // The open segment, once wholly committed, is the writer's to delete (nobody
            // else may: a frame could be on its way into it).
            if let Some(back) = st.segments.back().copied() {
                if !fits(&st) && back.bytes > 0 && back.last_id < st.committed_below {
                    let path = seg_path(&opts.dir, back.first_id);
                    match fs::remove_file(&path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e),
                    }
                    st.segments.pop_back();
                    st.total_bytes -= back.bytes;
                    *file = None;
                    self.update_gauges(&st);
                }
            }
            // An empty log takes any frame, so one larger than the limit cannot stall it.
            if fits(&st) {
                break;
            }
            if !waited {
                tracing::warn!(
                    bytes = st.total_bytes,
                    max = opts.max_size,
                    "WAL full: holding acks to the broker until the database catches up"
                );
                if let Some(m) = &self.shared.metrics {
                    m.full.set(1);
                }
                waited = true;
            }
            st = wait(&self.shared.space, st, Duration::from_secs(1));
        }
        if waited {
            if let Some(m) = &self.shared.metrics {
                m.full.set(0);
            }
        }
        let roll = match st.segments.back() {
            None => true,
            Some(s) => s.bytes > 0 && s.bytes + len > opts.segment_size,
        };
        if roll {
            let path = seg_path(&opts.dir, id);
            *file = Some(OpenOptions::new().create(true).append(true).open(&path)?);
            sync_dir(&opts.dir)?;
            st.segments.push_back(Seg {
                first_id: id,
                last_id: id - 1,
                bytes: 0,
            });
        }
        let seg = st.segments.back().copied().unwrap_or(Seg {
            first_id: id,
            last_id: id - 1,
            bytes: 0,
        });
        if file.is_none() {
            let path = seg_path(&opts.dir, seg.first_id);
            let f = OpenOptions::new().write(true).open(&path)?;
            // Drop whatever a failed write left past the last whole frame.
            f.set_len(seg.bytes)?;
            let mut f = f;
            f.seek(SeekFrom::Start(seg.bytes))?;
            *file = Some(f);
        }
        drop(st);
        let started = Instant::now();
        let f = file
            .as_mut()
            .ok_or_else(|| io::Error::other("no segment file"))?;
        f.write_all(buf)?;
        if opts.fsync {
            f.sync_data()?;
        }
        let mut st = self.lock();
        if let Some(s) = st.segments.back_mut() {
            s.last_id = id;
            s.bytes += len;
        }
        st.total_bytes += len;
        st.next_id = id + 1;
        if st.times.back().is_none_or(|t| written_ms - t.1 >= 1000) {
            st.times.push_back((id, written_ms));
        }
        self.update_gauges(&st);
        drop(st);
        if let Some(m) = &self.shared.metrics {
            m.frames.inc();
            m.fsync_seconds.observe(started.elapsed().as_secs_f64());
        }
        self.shared.progress.notify_all();
        Ok(true)
    }

    /// Start the reader thread: it sends every durable frame from `start` on, in order, and
    /// ends on [`Wal::close`] or when `tx` closes.
    pub fn spawn_reader(
        &self,
        start: u64,
        tx: mpsc::Sender<Frame>,
    ) -> io::Result<std::thread::JoinHandle<()>> {
        let wal = self.clone();
        std::thread::Builder::new()
            .name("nexus-wal-reader".into())
            .spawn(move || wal.reader_loop(start, tx))
    }

    fn reader_loop(&self, start: u64, tx: mpsc::Sender<Frame>) {
        let dir = self.shared.opts.dir.clone();
        let mut next = start;
        // The open segment: its first id, the reader and the offset read up to.
        let mut open: Option<(u64, BufReader<File>, u64)> = None;
        loop {
            // Wait for a durable frame at `next` and find how far its segment may be read.
            let (seg, limit, is_last) = {
                let mut st = self.lock();
                while st.durable_id() < next && !st.closing {
                    st = wait(&self.shared.progress, st, Duration::from_secs(1));
                }
                if st.closing {
                    return;
                }
                let idx = st
                    .segments
                    .iter()
                    .rposition(|s| s.first_id <= next)
                    .unwrap_or(0);
                let Some(seg) = st.segments.get(idx).copied() else {
                    continue;
                };
                (seg, seg.bytes, idx + 1 == st.segments.len())
            };
            if open.as_ref().is_none_or(|o| o.0 != seg.first_id) {
                match File::open(seg_path(&dir, seg.first_id)) {
                    Ok(f) => open = Some((seg.first_id, BufReader::with_capacity(1 << 20, f), 0)),
                    Err(e) => {
                        tracing::error!(error = %e, segment = seg.first_id, "WAL: cannot open a segment");
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                }
            }
            let Some((_, reader, offset)) = open.as_mut() else {
                continue;
            };
            if *offset >= limit {
                if is_last {
                    // Everything durable here is read; the writer moves `durable` on.
                    let st = self.lock();
                    if st.durable_id() < next && !st.closing {
                        drop(wait(&self.shared.progress, st, Duration::from_millis(200)));
                    }
                } else {
                    open = None;
                    next = next.max(seg.last_id + 1);
                }
                continue;
            }
            match read_frame(reader) {
                Ok(Some((len, frame))) => {
                    *offset += len;
                    if frame.first_id < next {
                        continue;
                    }
                    next = frame.last_id + 1;
                    if tx.blocking_send(frame).is_err() {
                        return;
                    }
                }
                Ok(None) | Err(_) => {
                    // Durable data that does not read back: count it, and stand in for the
                    // lost frames so the commit position can move past them.
                    let lost_to = if is_last {
                        self.lock().durable_id()
                    } else {
                        seg.last_id
                    };
                    tracing::error!(segment = seg.first_id, offset = *offset, frames = %format!("{next}..={lost_to}"), "WAL: unreadable frames skipped; their rows are lost");
                    if let Some(m) = &self.shared.metrics {
                        m.corrupt.inc();
                    }
                    *offset = limit;
                    if lost_to >= next {
                        let gap = Frame {
                            first_id: next,
                            last_id: lost_to,
                            written_ms: now_ms(),
                            ..Frame::default()
                        };
                        next = lost_to + 1;
                        if tx.blocking_send(gap).is_err() {
                            return;
                        }
                    }
                    if let Some((_, r, _)) = open.as_mut() {
                        let _ = r.seek(SeekFrom::Start(limit));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(i: usize) -> Point {
        Point {
            topic: format!("a/b/t{}", i % 7),
            ts_us: 1_700_000_000_000_000 + i as i64,
            value: (!i.is_multiple_of(3)).then_some(i as f64 * 0.5),
            value_str: i.is_multiple_of(3).then(|| format!("s{i}")),
            quality: 192,
        }
    }

    fn opts(dir: &Path, max: u64, seg: u64) -> WalOptions {
        WalOptions {
            dir: dir.to_path_buf(),
            max_size: max,
            segment_size: seg,
            fsync: false,
        }
    }

    #[test]
    fn frames_round_trip() {
        let points: Vec<Point> = (0..10).map(point).collect();
        let rejects = vec![Reject {
            ts_us: 5,
            topic: "x/y".into(),
            reason: "bad_json: expected value at line 1".into(),
            payload: vec![0, 159, 146, 150],
        }];
        let mut buf = Vec::new();
        encode_frame(&mut buf, 42, 1234, &points, &rejects);
        let (len, f) = read_frame(&mut &buf[..]).unwrap().unwrap();
        assert_eq!(len, buf.len() as u64);
        assert_eq!((f.first_id, f.last_id, f.written_ms), (42, 42, 1234));
        assert_eq!(f.points, points);
        assert_eq!(f.rejects, rejects);
        // Any flipped byte is detected.
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            assert!(
                !matches!(read_frame(&mut &bad[..]), Ok(Some((_, ref g))) if g.points == points && g.first_id == 42),
                "flip at {i} not detected"
            );
        }
    }

    async fn collect(rx: &mut mpsc::Receiver<Frame>, rows: usize) -> Vec<Frame> {
        let mut out = Vec::new();
        let mut n = 0;
        while n < rows {
            let f = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("frames in time")
                .expect("reader alive");
            n += f.rows();
            out.push(f);
        }
        out
    }

    #[tokio::test]
    async fn appends_are_acked_in_order_read_back_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, start) = Wal::open(opts(dir.path(), 1 << 20, 16 * 1024), None).unwrap();
        assert_eq!(start, 1);
        let (atx, arx) = mpsc::channel(16);
        let (ktx, mut krx) = mpsc::unbounded_channel();
        let (ftx, mut frx) = mpsc::channel(4);
        let w = wal.spawn_writer(arx, ktx).unwrap();
        let r = wal.spawn_reader(start, ftx).unwrap();
        for i in 0..2000 {
            atx.send(Append {
                points: vec![point(i)],
                rejects: vec![],
                token: i,
            })
            .await
            .unwrap();
        }
        let mut acked = Vec::new();
        while acked.len() < 2000 {
            acked.extend(krx.recv().await.unwrap());
        }
        assert_eq!(acked, (0..2000).collect::<Vec<_>>());
        let frames = collect(&mut frx, 2000).await;
        let got: Vec<Point> = frames.iter().flat_map(|f| f.points.clone()).collect();
        assert_eq!(got, (0..2000).map(point).collect::<Vec<_>>());
        let segs = wal.lock().segments.clone();
        assert!(segs.len() > 1, "segments rolled: {segs:?}");
        let last = frames.last().unwrap().last_id;
        wal.commit_below(last + 1);
        assert_eq!(
            wal.lock().segments.len(),
            1,
            "all but the open segment trimmed"
        );
        assert_eq!(wal.pending_frames(), 0);
        drop(atx);
        w.join().unwrap();
        wal.close();
        r.join().unwrap();
        drop(wal);
        // A restart starts after what was committed.
        let (_wal, start) = Wal::open(opts(dir.path(), 1 << 20, 16 * 1024), None).unwrap();
        assert_eq!(start, last + 1);
    }

    #[test]
    fn a_directory_in_use_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(opts(dir.path(), 1 << 20, 64 * 1024), None).unwrap();
        let e = Wal::open(opts(dir.path(), 1 << 20, 64 * 1024), None)
            .err()
            .unwrap();
        assert!(e.to_string().contains("in use by another"), "{e}");
        drop(wal);
        assert!(Wal::open(opts(dir.path(), 1 << 20, 64 * 1024), None).is_ok());
    }

    #[tokio::test]
    async fn restart_replays_uncommitted_and_cuts_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (wal, _) = Wal::open(opts(dir.path(), 1 << 20, 64 * 1024), None).unwrap();
            let (atx, arx) = mpsc::channel(16);
            let (ktx, mut krx) = mpsc::unbounded_channel();
            let w = wal.spawn_writer(arx, ktx).unwrap();
            for i in 0..500 {
                atx.send(Append {
                    points: vec![point(i)],
                    rejects: vec![],
                    token: (),
                })
                .await
                .unwrap();
            }
            let mut n = 0;
            while n < 500 {
                n += krx.recv().await.unwrap().len();
            }
            drop(atx);
            w.join().unwrap();
            wal.commit_below(3); // frames 1 and 2 are committed
            wal.close();
        }
        // A crash in the middle of a write leaves half a frame.
        let mut segs: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "wal"))
            .collect();
        segs.sort();
        let last = segs.last().unwrap();
        let mut f = OpenOptions::new().append(true).open(last).unwrap();
        let mut half = Vec::new();
        encode_frame(&mut half, 9999, 0, &[point(1)], &[]);
        f.write_all(&half[..half.len() / 2]).unwrap();
        drop(f);

        let (wal, start) = Wal::open(opts(dir.path(), 1 << 20, 64 * 1024), None).unwrap();
        assert_eq!(start, 3);
        let (ftx, mut frx) = mpsc::channel(4);
        let r = wal.spawn_reader(start, ftx).unwrap();
        let frames = collect(&mut frx, 1).await;
        assert_eq!(frames[0].first_id, 3);
        let mut rows: usize = frames.iter().map(Frame::rows).sum();
        let mut last_id = frames.last().unwrap().last_id;
        while last_id < wal.lock().durable_id() {
            let f = frx.recv().await.unwrap();
            rows += f.rows();
            last_id = f.last_id;
        }
        // Frames 1 and 2 hold the rows acked first; the torn frame is gone.
        let skipped = 500 - rows;
        assert!(skipped > 0 && skipped < 500, "skipped {skipped}");
        assert!(tokio::time::timeout(Duration::from_millis(300), frx.recv())
            .await
            .is_err());
        wal.close();
        r.join().unwrap();
        // New frames continue after the recovered ones.
        assert_eq!(wal.lock().next_id, last_id + 1);
    }

    #[tokio::test]
    async fn a_full_log_holds_acks_until_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, start) = Wal::open(opts(dir.path(), 128 * 1024, 64 * 1024), None).unwrap();
        let (atx, arx) = mpsc::channel(4);
        let (ktx, mut krx) = mpsc::unbounded_channel();
        let (ftx, mut frx) = mpsc::channel(1000);
        let w = wal.spawn_writer(arx, ktx).unwrap();
        let r = wal.spawn_reader(start, ftx).unwrap();
        let big = |i: usize| Append {
            points: (0..100).map(|j| point(i * 100 + j)).collect(),
            rejects: vec![],
            token: i,
        };
        let sender = tokio::spawn(async move {
            for i in 0..100 {
                if atx.send(big(i)).await.is_err() {
                    break;
                }
            }
            atx
        });
        // Without commits the log fills and acks stop well short of 100 appends.
        let mut acked = 0;
        while let Ok(Some(v)) = tokio::time::timeout(Duration::from_millis(500), krx.recv()).await {
            acked += v.len();
        }
        assert!(acked > 0 && acked < 100, "acked {acked}");
        assert!(wal.bytes() <= 128 * 1024);
        // Committing what was read frees space and the rest comes through.
        let mut committed = start;
        while acked < 100 {
            while let Ok(f) = frx.try_recv() {
                committed = f.last_id + 1;
            }
            wal.commit_below(committed);
            if let Ok(Some(v)) = tokio::time::timeout(Duration::from_millis(100), krx.recv()).await
            {
                acked += v.len();
            }
        }
        let atx = sender.await.unwrap();
        drop(atx);
        w.join().unwrap();
        wal.close();
        r.join().unwrap();
    }
}
