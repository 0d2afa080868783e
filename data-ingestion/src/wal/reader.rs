//! The reader thread: follows the durable end of the log and sends frames on in order. A
//! stretch that does not read back is counted and stood in for by an empty frame spanning
//! its ids, so the commit position can move past it.

use std::time::Duration;

use nexus_common::seglog::{self, DecodeError, SegmentReader};
use tokio::sync::mpsc;

use super::{format, now_ms, wait, Wal};
use crate::model::Frame;

/// Why durable data did not read back.
#[derive(Debug, thiserror::Error)]
enum Unreadable {
    #[error(transparent)]
    Log(#[from] seglog::Error),
    #[error("frame body: {0}")]
    Body(#[from] DecodeError),
    #[error("the segment ends before its last durable frame")]
    Short,
}

impl Wal {
    /// Start the reader thread: it sends every durable frame from `start` on, in order, and
    /// ends on [`Wal::close`] or when `tx` closes.
    pub fn spawn_reader(
        &self,
        start: u64,
        tx: mpsc::Sender<Frame>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let wal = self.clone();
        std::thread::Builder::new()
            .name("nexus-wal-reader".into())
            .spawn(move || wal.reader_loop(start, tx))
    }

    fn reader_loop(&self, start: u64, tx: mpsc::Sender<Frame>) {
        let mut next = start;
        // The open segment: its first id and its reader.
        let mut open: Option<(u64, SegmentReader)> = None;
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
                match self.shared.dir.reader(seg.first_id, 0) {
                    Ok(r) => open = Some((seg.first_id, r)),
                    Err(e) => {
                        tracing::error!(error = %e, segment = seg.first_id, "WAL: cannot open a segment");
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                }
            }
            let Some((_, reader)) = open.as_mut() else {
                continue;
            };
            if reader.offset() >= limit {
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
            let read = match reader.next_frame() {
                Ok(Some(body)) => format::decode(body).map_err(Unreadable::from),
                Ok(None) => Err(Unreadable::Short),
                Err(e) => Err(Unreadable::from(e)),
            };
            match read {
                Ok(frame) => {
                    if frame.first_id < next {
                        continue;
                    }
                    next = frame.last_id + 1;
                    if tx.blocking_send(frame).is_err() {
                        return;
                    }
                }
                Err(why) => {
                    // Durable data that does not read back: count it, and stand in for the
                    // lost frames so the commit position can move past them.
                    let lost_to = if is_last {
                        self.lock().durable_id()
                    } else {
                        seg.last_id
                    };
                    tracing::error!(segment = seg.first_id, offset = reader.offset(), frames = %format!("{next}..={lost_to}"), error = %why, "WAL: unreadable frames skipped; their rows are lost");
                    if let Some(m) = &self.shared.metrics {
                        m.corrupt.inc();
                    }
                    if reader.seek(limit).is_err() {
                        open = None;
                    }
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
                }
            }
        }
    }
}
