//! The WAL's Prometheus metrics.

use nexus_common::metrics::{self, MetricError};
use prometheus::{Histogram, IntCounter, IntGauge, Registry};

#[derive(Clone)]
pub struct WalMetrics {
    pub bytes: IntGauge,
    pub segments: IntGauge,
    pub frames: IntCounter,
    pub fsync_seconds: Histogram,
    pub full: IntGauge,
    pub corrupt: IntCounter,
    pub torn_frames: IntCounter,
    pub torn_bytes: IntCounter,
    pub too_large: IntCounter,
    pub write_errors: IntCounter,
    pub write_failing: IntGauge,
}

impl WalMetrics {
    pub fn new(r: &Registry) -> Result<WalMetrics, MetricError> {
        Ok(WalMetrics {
            bytes: metrics::gauge(r, "nexus_ingest_wal_bytes", "Bytes in the write-ahead log")?,
            segments: metrics::gauge(r, "nexus_ingest_wal_segments", "Segment files of the WAL")?,
            frames: metrics::counter(
                r,
                "nexus_ingest_wal_frames_total",
                "Frames written (one fsync each)",
            )?,
            fsync_seconds: metrics::histogram(
                r,
                "nexus_ingest_wal_fsync_seconds",
                "Write and fsync of a frame",
                vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5],
            )?,
            full: metrics::gauge(
                r,
                "nexus_ingest_wal_full",
                "1 while the WAL is full and acks to the broker are held back",
            )?,
            corrupt: metrics::counter(
                r,
                "nexus_ingest_wal_corrupt_total",
                "Stretches of the WAL that could not be read back (their rows are lost)",
            )?,
            torn_frames: metrics::counter(
                r,
                "nexus_ingest_wal_torn_frames_total",
                "Frames cut off the end of the WAL at open: a write a crash interrupted (never acknowledged), or damaged data and the frames after it",
            )?,
            torn_bytes: metrics::counter(
                r,
                "nexus_ingest_wal_torn_bytes_total",
                "Bytes cut off the end of the WAL at open",
            )?,
            too_large: metrics::counter(
                r,
                "nexus_ingest_wal_too_large_total",
                "Rows that could not be encoded in a WAL frame and were dropped (the parser's limits keep this at 0)",
            )?,
            write_errors: metrics::counter(
                r,
                "nexus_ingest_wal_write_errors_total",
                "Failed writes of the WAL (a full or read-only disk): acks are held and the write retried every second",
            )?,
            write_failing: metrics::gauge(
                r,
                "nexus_ingest_wal_write_failing",
                "1 while the WAL cannot be written and acks to the broker are held back",
            )?,
        })
    }
}
