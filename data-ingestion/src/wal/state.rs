//! What the log knows about itself (segments, ids, the commit position) and the trim: segments
//! wholly below the commit position are deleted, and the position is recorded in `committed`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::Wal;

/// A commit records its position at most this often (a restart replays a little more;
/// duplicates are dropped by the database).
const PERSIST_EVERY: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, Copy)]
pub(super) struct Seg {
    pub first_id: u64,
    /// Highest frame id in the segment; `first_id - 1` while it is empty.
    pub last_id: u64,
    pub bytes: u64,
}

pub(super) struct State {
    pub segments: VecDeque<Seg>,
    pub total_bytes: u64,
    /// Id the next frame gets.
    pub next_id: u64,
    /// First frame id not yet committed to the database.
    pub committed_below: u64,
    /// The position last written to `committed`.
    pub persisted: u64,
    /// One `(frame id, written ms)` sample per second of writing, for the age of the oldest
    /// uncommitted frame.
    pub times: VecDeque<(u64, i64)>,
    pub closing: bool,
    pub last_persist: Option<Instant>,
}

impl State {
    pub fn durable_id(&self) -> u64 {
        self.next_id - 1
    }
}

impl Wal {
    pub(super) fn update_gauges(&self, st: &State) {
        if let Some(m) = &self.shared.metrics {
            m.bytes.set(st.total_bytes as i64);
            m.segments.set(st.segments.len() as i64);
        }
    }

    /// Every frame below `id` is committed in the database: delete the segments wholly
    /// below it.
    pub fn commit_below(&self, id: u64) {
        let mut st = self.lock();
        if id <= st.committed_below {
            return;
        }
        st.committed_below = id;
        // The open segment stays: it is the writer's (see `writer`).
        let mut gone = Vec::new();
        while st.segments.len() > 1 {
            let Some(seg) = st.segments.front().copied() else {
                break;
            };
            if seg.last_id >= id {
                break;
            }
            st.segments.pop_front();
            st.total_bytes -= seg.bytes;
            gone.push(seg.first_id);
        }
        while st.times.len() > 1 && st.times.get(1).is_some_and(|t| t.0 <= id) {
            st.times.pop_front();
        }
        let persist = st.last_persist.is_none_or(|t| t.elapsed() >= PERSIST_EVERY);
        if persist {
            st.last_persist = Some(Instant::now());
        }
        self.update_gauges(&st);
        drop(st);
        // Deleting (and syncing the directory) outside the lock: nobody else uses these
        // segments any more, and the writer need not wait for it.
        if !gone.is_empty() {
            if let Err(e) = self.shared.dir.remove(&gone) {
                tracing::warn!(error = %e, "WAL: cannot delete a committed segment");
            }
            self.shared.space.notify_all();
        }
        if persist {
            self.persist_floor();
        }
    }

    /// Record the commit position now (commits record it at most every 200 ms).
    pub fn record_position(&self) {
        self.lock().last_persist = Some(Instant::now());
        self.persist_floor();
    }

    /// Write the commit position to `committed` (atomically), unless it is there already.
    pub(super) fn persist_floor(&self) {
        let _one = self
            .shared
            .persist
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let floor = {
            let st = self.lock();
            if st.persisted == st.committed_below {
                return;
            }
            st.committed_below
        };
        match self
            .shared
            .dir
            .write_state("committed", &format!("{floor}\n"))
        {
            Ok(()) => self.lock().persisted = floor,
            Err(e) => {
                tracing::debug!(error = %e, "WAL: cannot record the committed position (a restart replays more; duplicates are dropped)");
            }
        }
    }
}
