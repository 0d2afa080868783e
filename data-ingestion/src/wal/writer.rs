//! The writer thread: group commit (everything waiting becomes one frame, one `fdatasync`),
//! acks handed back only after that, and back-pressure when the log is full.

use std::time::{Duration, Instant};

use nexus_common::seglog::{self, SegmentWriter};
use tokio::sync::mpsc;

use super::format::{self, FRAME_TARGET, MAX_FRAME_ROWS};
use super::state::{Seg, State};
use super::{now_ms, wait, Append, Wal};
use crate::model::{Point, Reject};

impl Wal {
    /// Start the writer thread. It ends when `rx` closes (after writing what it holds) or on
    /// [`Wal::close`] (dropping what it holds unacknowledged).
    pub fn spawn_writer<T: Send + 'static>(
        &self,
        rx: mpsc::Receiver<Append<T>>,
        acks: mpsc::UnboundedSender<Vec<T>>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
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
        let mut file: Option<SegmentWriter> = None;
        let cap = ((self.shared.opts.segment_size / 2) as usize).min(FRAME_TARGET);
        while let Some(first) = rx.blocking_recv() {
            let mut tokens = vec![first.token];
            let (mut points, mut rejects) = (first.points, first.rejects);
            let mut bytes = format::rows_size(&points, &rejects);
            while points.len() + rejects.len() < MAX_FRAME_ROWS && bytes < cap {
                match rx.try_recv() {
                    Ok(a) => {
                        bytes += format::rows_size(&a.points, &a.rejects);
                        points.extend(a.points);
                        rejects.extend(a.rejects);
                        tokens.push(a.token);
                    }
                    Err(_) => break,
                }
            }
            // Normally one frame; an append larger than `cap` alone is split.
            for (p, r) in format::chunks(&points, &rejects, cap) {
                let mut failed = false;
                loop {
                    match self.write_frame(
                        &mut file,
                        &mut buf,
                        &points[p.clone()],
                        &rejects[r.clone()],
                    ) {
                        Ok(true) => {
                            if failed {
                                self.write_state(None);
                                tracing::info!(dir = %self.shared.opts.dir.display(), "WAL written again; acks resume");
                            }
                            break;
                        }
                        Ok(false) => return, // closing
                        Err(e) => {
                            tracing::error!(dir = %self.shared.opts.dir.display(), error = %e, "WAL write failed; holding acks and retrying in 1s");
                            self.write_state(Some(&e.to_string()));
                            failed = true;
                            file = None;
                            std::thread::sleep(Duration::from_secs(1));
                            if self.lock().closing {
                                return;
                            }
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
        file: &mut Option<SegmentWriter>,
        buf: &mut Vec<u8>,
        points: &[Point],
        rejects: &[Reject],
    ) -> Result<bool, seglog::Error> {
        let opts = &self.shared.opts;
        // Only this thread hands out ids: the one read here is the one the frame gets.
        let id = self.lock().next_id;
        let written_ms = now_ms();
        if let Err(e) = format::encode(buf, id, written_ms, points, rejects) {
            // Not reachable from the parser, whose limits keep a row near 1 MiB: rows that
            // cannot be logged are dropped and counted rather than stalling the log.
            tracing::error!(error = %e, points = points.len(), rejects = rejects.len(), "WAL: rows too large for a frame are dropped");
            if let Some(m) = &self.shared.metrics {
                m.too_large.inc_by((points.len() + rejects.len()) as u64);
            }
            return Ok(true);
        }
        let len = buf.len() as u64;
        let mut st = self.lock();
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
                    self.shared.dir.remove(&[back.first_id])?;
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
        // A segment's frame ids follow on from its number (that is how open finds them), so
        // a frame that would not continue the open segment starts a new one.
        let roll = match st.segments.back() {
            None => true,
            Some(s) => (s.bytes > 0 && s.bytes + len > opts.segment_size) || s.last_id + 1 != id,
        };
        if roll {
            *file = Some(self.shared.dir.create(id)?);
            st.segments.push_back(Seg {
                first_id: id,
                last_id: id - 1,
                bytes: 0,
            });
        }
        // `roll` made sure there is one.
        let seg = st
            .segments
            .back()
            .copied()
            .ok_or_else(|| seglog::Error::Io {
                path: opts.dir.clone(),
                source: std::io::Error::other("no open segment"),
            })?;
        let f = match file {
            Some(f) => f,
            // After a failed write (or a restart): continue after the last whole frame.
            None => file.insert(self.shared.dir.append_to(seg.first_id, seg.bytes)?),
        };
        drop(st);
        let started = Instant::now();
        f.append(buf)?;
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
}
