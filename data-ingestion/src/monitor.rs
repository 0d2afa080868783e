//! Once a second: the WAL's gauges, its commit position on disk, and whether the database
//! answers (readiness and `nexus_ingest_db_up`; when it comes back, writers waiting out a
//! backoff are woken).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use nexus_common::telemetry::ReadyFlag;

use crate::history::Db;
use crate::intake::IngestMetrics;
use crate::wal::Wal;
use crate::writer::WriterCtx;

pub struct Monitor {
    pub wal: Wal,
    pub metrics: IngestMetrics,
    pub writers: Arc<WriterCtx>,
    /// The history API's connections: the probe shares them.
    pub api: Arc<Db>,
    /// The `database` readiness condition.
    pub ready: ReadyFlag,
}

impl Monitor {
    /// Until `token`.
    pub async fn run(self, token: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut was_up = true;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = token.cancelled() => return,
            }
            self.wal.record_position();
            self.metrics
                .oldest_age
                .set(self.wal.oldest_uncommitted_age());
            self.metrics.usage.set(self.wal.usage_ratio());
            let up = match self.api.client().await {
                Ok(c) => c.simple_query("SELECT 1").await.is_ok(),
                Err(_) => false,
            };
            self.writers.metrics.db_up.set(i64::from(up));
            self.ready.set(up);
            if up && !was_up {
                // Writers waiting out a backoff go now.
                self.writers.recovered.notify_waiters();
            }
            was_up = up;
        }
    }
}
