//! The write-ahead log: what ingestion has received is durable here before the broker gets
//! its ack, and stays until the database has committed it.
//!
//! * **Files** ([`nexus_common::seglog`]): segment files `<first frame id>.wal` in `wal_dir`,
//!   locked against a second process. A frame is `[magic][len][crc32c][body]`; the body
//!   (`format.rs`) holds the frame id, the time it was written and the rows, every string
//!   behind a u32 length (never cut). A torn frame at the tail (crash during a write) fails
//!   its checksum and is cut off at open, logged and counted
//!   (`nexus_ingest_wal_torn_frames_total`); it was never acknowledged, so the broker sends
//!   it again. Rows too large to log never get here: the parser rejects them.
//! * **Writer** (`writer.rs`, a thread): takes every append waiting in its channel as one
//!   frame, writes it and `fdatasync`s once (group commit), then hands the appends' tokens
//!   (the MQTT messages) back to be acknowledged, in order. When the log reaches `max_size`
//!   it stops taking appends: the channel fills, acks stop, and the broker holds the rest
//!   (back-pressure, no discard).
//! * **Reader** (`reader.rs`, a thread): follows the durable end of the log like `tail -f`
//!   and sends frames on in order, so a restart replays what was left before anything new
//!   (new data is appended after it). Data just written is read back from the page cache.
//! * **Trim** (`state.rs`): [`Wal::commit_below`] is told the first frame id not yet committed
//!   in the database; whole segments below it are deleted, and the id is kept in `committed`
//!   (replaced atomically) so a restart does not replay committed frames (it is only a
//!   shortcut: the database's unique key drops anything replayed twice).

mod format;
mod metrics;
mod reader;
mod state;
mod writer;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use nexus_common::seglog::{self, Options, Recovery, SegmentDir, Verify};

pub use metrics::WalMetrics;
use state::{Seg, State};

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
    pub points: Vec<crate::model::Point>,
    pub rejects: Vec<crate::model::Reject>,
    pub token: T,
}

struct Shared {
    opts: WalOptions,
    /// The segment files (and the directory lock, held while the log is open).
    dir: SegmentDir,
    state: Mutex<State>,
    /// Signalled when segments are trimmed (room for the writer) or on close.
    space: Condvar,
    /// Signalled when a frame is durable (work for the reader) or on close.
    progress: Condvar,
    /// One writer of the `committed` file at a time, outside the state lock (it fsyncs).
    persist: Mutex<()>,
    metrics: Option<WalMetrics>,
    /// Readiness condition that fails while the log cannot be written.
    writable: Mutex<Option<nexus_common::telemetry::ReadyFlag>>,
}

/// Handle to an open log; clones share it.
#[derive(Clone)]
pub struct Wal {
    shared: Arc<Shared>,
}

fn now_ms() -> i64 {
    crate::model::now_us() / 1000
}

/// Wait on `cv` for at most `d` (a poisoned lock is taken over: the state stays consistent).
fn wait<'a>(cv: &Condvar, st: MutexGuard<'a, State>, d: Duration) -> MutexGuard<'a, State> {
    cv.wait_timeout(st, d)
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .0
}

impl Wal {
    /// The readiness condition (met now) that fails, with the error, while the log cannot be
    /// written.
    pub fn set_writable_flag(&self, flag: nexus_common::telemetry::ReadyFlag) {
        flag.set(true);
        *self
            .shared
            .writable
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(flag);
    }

    /// A write failed (`Some(error)`) or succeeded after failing (`None`).
    fn write_state(&self, error: Option<&str>) {
        let flag = self
            .shared
            .writable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match error {
            Some(e) => {
                if let Some(m) = &self.shared.metrics {
                    m.write_errors.inc();
                    m.write_failing.set(1);
                }
                if let Some(f) = flag {
                    f.fail(format!(
                        "the WAL cannot be written ({}: {e}); acks are held",
                        self.shared.opts.dir.display()
                    ));
                }
            }
            None => {
                if let Some(m) = &self.shared.metrics {
                    m.write_failing.set(0);
                }
                if let Some(f) = flag {
                    f.set(true);
                }
            }
        }
    }
}

/// Log and count what open cut off the log.
fn report(dir: &SegmentDir, recovery: &Recovery, metrics: Option<&WalMetrics>) {
    for cut in &recovery.cuts {
        let segment = dir.segment_path(cut.segment);
        if cut.offset == 0 && matches!(cut.error, nexus_common::seglog::FrameError::BadMagic(_)) {
            tracing::error!(segment = %segment.display(), bytes = cut.bytes, error = %cut.error, "WAL: a segment of an earlier format or not a WAL at all; cut, its rows are lost (drain the WAL before upgrading Nexus)");
        } else if cut.whole_frames == 0 {
            tracing::warn!(segment = %segment.display(), offset = cut.offset, bytes = cut.bytes, error = %cut.error, "WAL: cut an unreadable tail (a write a crash interrupted was never acknowledged; the broker sends it again)");
        } else {
            tracing::error!(segment = %segment.display(), offset = cut.offset, bytes = cut.bytes, error = %cut.error, whole_frames = cut.whole_frames, "WAL: cut a damaged frame and the whole frames after it; their rows are lost");
        }
    }
    if let Some(m) = metrics {
        m.torn_frames.inc_by(recovery.frames());
        m.torn_bytes.inc_by(recovery.bytes());
    }
}

impl Wal {
    /// Open (or create) the log and recover what a previous run left. Returns the log and the
    /// first frame id still to be written to the database.
    pub fn open(
        opts: WalOptions,
        metrics: Option<WalMetrics>,
    ) -> Result<(Wal, u64), seglog::Error> {
        let (dir, found, recovery) = SegmentDir::open(
            &opts.dir,
            Options {
                format: format::FORMAT,
                verify: Verify::Newest,
                fsync: opts.fsync,
            },
        )?;
        report(&dir, &recovery, metrics.as_ref());
        let floor: u64 = dir
            .read_state("committed")?
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1)
            .max(1);
        let mut segments = VecDeque::new();
        let mut times = VecDeque::new();
        let mut total = 0;
        let mut next_id = floor;
        for (i, s) in found.iter().enumerate() {
            // Frame ids run on from the number in the name: the newest segment (read through
            // at open) holds `frames` of them, an older one runs up to the next one's first.
            let last_id = match found.get(i + 1) {
                Some(n) => n.base.saturating_sub(1),
                None => (s.base + s.frames.unwrap_or(0)).saturating_sub(1),
            };
            let mtime = std::fs::metadata(dir.segment_path(s.base))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or_else(now_ms, |d| d.as_millis() as i64);
            times.push_back((s.base, mtime));
            total += s.bytes;
            next_id = next_id.max(last_id + 1);
            segments.push_back(Seg {
                first_id: s.base,
                last_id,
                bytes: s.bytes,
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
                dir,
                state: Mutex::new(State {
                    segments,
                    total_bytes: total,
                    next_id,
                    committed_below: start,
                    persisted: floor,
                    times,
                    closing: false,
                    last_persist: None,
                }),
                space: Condvar::new(),
                progress: Condvar::new(),
                persist: Mutex::new(()),
                metrics,
                writable: Mutex::new(None),
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
        self.lock().closing = true;
        self.shared.space.notify_all();
        self.shared.progress.notify_all();
        self.persist_floor();
    }
}

#[cfg(test)]
mod tests;
