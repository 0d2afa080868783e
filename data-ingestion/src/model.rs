//! What flows through ingestion: points to store, rejects for the dead-letter table, and the
//! WAL frames that carry both.

/// One stored point: a row of `points` (through the `metrics` view: time, topic, value,
/// value_str, quality).
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub topic: String,
    /// Unix microseconds.
    pub ts_us: i64,
    /// Numeric view of the value (booleans 0/1); `None` for strings and nulls.
    pub value: Option<f64>,
    /// String values.
    pub value_str: Option<String>,
    /// OPC DA quality code (192 good).
    pub quality: i16,
}

/// A message that could not be stored as points, kept in `ingest_rejects`.
#[derive(Debug, Clone, PartialEq)]
pub struct Reject {
    /// Receive time, unix microseconds.
    pub ts_us: i64,
    pub topic: String,
    /// Short stable reason (also the metric label), then `: ` and the detail.
    pub reason: String,
    pub payload: Vec<u8>,
}

impl Reject {
    /// The label part of `reason` (before the first `:`).
    pub fn label(&self) -> &str {
        self.reason.split(':').next().unwrap_or("")
    }
}

/// What one WAL frame holds. `first_id..=last_id` is normally one id; a frame standing for
/// an unreadable stretch of the log (counted as corrupt) spans the ids it replaces.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Frame {
    pub first_id: u64,
    pub last_id: u64,
    /// When the frame was made durable, unix milliseconds.
    pub written_ms: i64,
    pub points: Vec<Point>,
    pub rejects: Vec<Reject>,
}

impl Frame {
    pub fn rows(&self) -> usize {
        self.points.len() + self.rejects.len()
    }
}

/// About the stored size of records, in bytes (frame sizing, batch metrics).
pub fn approx_bytes(points: &[Point], rejects: &[Reject]) -> usize {
    points
        .iter()
        .map(|p| 32 + p.topic.len() + p.value_str.as_ref().map_or(0, String::len))
        .sum::<usize>()
        + rejects
            .iter()
            .map(|r| 16 + r.topic.len() + r.reason.len() + r.payload.len())
            .sum::<usize>()
}

pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
