//! Once a second: the WAL's gauges, its commit position on disk, and whether the database
//! answers (readiness and `nexus_ingest_db_up`; when it comes back, writers waiting out a
//! backoff are woken). Every 30 seconds on TimescaleDB: whether the background jobs of the
//! historian's policies (compression, retention, aggregate refresh) failed their last run
//! (`nexus_ingest_timescaledb_job_failing`, the readiness condition `timescaledb_jobs`, and a
//! warning with the job's last error when it starts failing).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use nexus_common::metrics::{self, MetricError};
use nexus_common::telemetry::{Readiness, ReadyFlag};
use prometheus::{IntGaugeVec, Registry};
use tokio_postgres::Client;

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
    /// Where the `timescaledb_jobs` condition is added once the storage is TimescaleDB.
    pub readiness: Readiness,
    pub jobs: JobMetrics,
}

/// The policies whose jobs are watched, by relation and policy (the label values).
pub const WATCHED_JOBS: [(&str, &str); 11] = [
    ("points", "compression"),
    ("points", "retention"),
    ("points_1min", "refresh"),
    ("points_1min", "retention"),
    ("points_1hour", "refresh"),
    ("points_1hour", "retention"),
    ("points_1day", "refresh"),
    ("points_1day", "retention"),
    // Unused names are cheap; they keep the label set fixed if a tier is added.
    ("points_1min", "compression"),
    ("points_1hour", "compression"),
    ("points_1day", "compression"),
];

/// `nexus_ingest_timescaledb_job_failing{relation, policy}`: 1 while the job's last run
/// failed; a series at 0 for every watched job from the start (also on plain PostgreSQL).
#[derive(Clone)]
pub struct JobMetrics {
    pub failing: IntGaugeVec,
}

impl JobMetrics {
    pub fn new(r: &Registry) -> Result<JobMetrics, MetricError> {
        let failing = metrics::gauge_vec(
            r,
            "nexus_ingest_timescaledb_job_failing",
            "1 while the TimescaleDB job of a historian policy failed its last run",
            &["relation", "policy"],
        )?;
        for (relation, policy) in WATCHED_JOBS {
            failing.with_label_values(&[relation, policy]).set(0);
        }
        Ok(JobMetrics { failing })
    }
}

/// A historian policy job whose last run failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailingJob {
    pub job_id: i32,
    pub relation: String,
    pub policy: String,
    pub last_error: String,
}

/// The historian's policy jobs whose last run failed, with their last error.
pub async fn failing_jobs(client: &Client) -> Result<Vec<FailingJob>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT s.job_id, coalesce(c.view_name::text, j.hypertable_name::text),
                    CASE j.proc_name WHEN 'policy_compression' THEN 'compression'
                                     WHEN 'policy_retention' THEN 'retention'
                                     ELSE 'refresh' END,
                    coalesce((SELECT e.err_message FROM timescaledb_information.job_errors e
                              WHERE e.job_id = s.job_id
                              ORDER BY e.finish_time DESC NULLS FIRST LIMIT 1), '')
             FROM timescaledb_information.job_stats s
             JOIN timescaledb_information.jobs j ON j.job_id = s.job_id
             LEFT JOIN timescaledb_information.continuous_aggregates c
                    ON c.materialization_hypertable_name = j.hypertable_name
             WHERE s.last_run_status = 'Failed'
               AND j.proc_name IN ('policy_compression', 'policy_retention',
                                   'policy_refresh_continuous_aggregate')
               AND (j.hypertable_name = 'points'
                    OR c.view_name IN ('points_1min', 'points_1hour', 'points_1day'))
             ORDER BY s.job_id",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| FailingJob {
            job_id: r.get(0),
            relation: r.get(1),
            policy: r.get(2),
            last_error: r.get(3),
        })
        .collect())
}

impl Monitor {
    /// Until `token`.
    pub async fn run(self, token: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut was_up = true;
        let mut jobs = JobWatch::default();
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
            if up {
                jobs.poll(&self).await;
            }
        }
    }
}

/// The TimescaleDB job check: every 30 seconds once the storage is TimescaleDB.
#[derive(Default)]
struct JobWatch {
    last: Option<tokio::time::Instant>,
    flag: Option<ReadyFlag>,
    failing: Vec<FailingJob>,
}

impl JobWatch {
    async fn poll(&mut self, m: &Monitor) {
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_secs(30))
        {
            return;
        }
        let timescale = m
            .api
            .storage
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .is_some_and(|s| s.timescale.is_some());
        if !timescale {
            return;
        }
        self.last = Some(tokio::time::Instant::now());
        let Ok(client) = m.api.client().await else {
            return;
        };
        let failing = match failing_jobs(&client).await {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(error = %e, "TimescaleDB job statistics not readable");
                return;
            }
        };
        for j in &failing {
            let known = self
                .failing
                .iter()
                .any(|k| k.job_id == j.job_id && k.last_error == j.last_error);
            if !known {
                tracing::warn!(
                    job = j.job_id,
                    relation = %j.relation,
                    policy = %j.policy,
                    last_error = %j.last_error,
                    "TimescaleDB background job failing: aggregates, compression or retention are not kept up"
                );
            }
        }
        for (relation, policy) in WATCHED_JOBS {
            let bad = failing
                .iter()
                .any(|j| j.relation == relation && j.policy == policy);
            m.jobs
                .failing
                .with_label_values(&[relation, policy])
                .set(i64::from(bad));
        }
        self.flag
            .get_or_insert_with(|| m.readiness.condition("timescaledb_jobs"))
            .set(failing.is_empty());
        self.failing = failing;
    }
}
