//! The WAL's Prometheus metrics.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Registry};

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
}

impl WalMetrics {
    pub fn new(registry: &Registry) -> WalMetrics {
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("metric");
            registry.register(Box::new(c.clone())).ok();
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("metric");
            registry.register(Box::new(g.clone())).ok();
            g
        };
        let fsync_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "nexus_ingest_wal_fsync_seconds",
                "Write and fsync of a frame",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5,
            ]),
        )
        .expect("metric");
        registry.register(Box::new(fsync_seconds.clone())).ok();
        WalMetrics {
            bytes: gauge("nexus_ingest_wal_bytes", "Bytes in the write-ahead log"),
            segments: gauge("nexus_ingest_wal_segments", "Segment files of the WAL"),
            frames: counter(
                "nexus_ingest_wal_frames_total",
                "Frames written (one fsync each)",
            ),
            fsync_seconds,
            full: gauge(
                "nexus_ingest_wal_full",
                "1 while the WAL is full and acks to the broker are held back",
            ),
            corrupt: counter(
                "nexus_ingest_wal_corrupt_total",
                "Stretches of the WAL that could not be read back (their rows are lost)",
            ),
            torn_frames: counter(
                "nexus_ingest_wal_torn_frames_total",
                "Frames cut off the end of the WAL at open: a write a crash interrupted (never acknowledged), or damaged data and the frames after it",
            ),
            torn_bytes: counter(
                "nexus_ingest_wal_torn_bytes_total",
                "Bytes cut off the end of the WAL at open",
            ),
        }
    }
}
