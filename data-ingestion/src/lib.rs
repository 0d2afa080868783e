//! # nexus-data-ingestion
//!
//! The historian writer (`nexus ingest`, part of `nexus up` when a database is configured).
//! The seed's "Data Ingestion Service" without its loss: a point that reached ingestion is
//! stored exactly once, or counted as rejected with a reason.
//!
//! ```text
//! MQTT $share/<group>/<filter> (QoS 1, persistent session, manual acks)
//!   ──> parse: JSON value object / Sparkplug B           (intake.rs, parse.rs; rejects counted;
//!       other publishers' payloads by the `payloads` rules: bare scalars, text, UMH, mappings;
//!       Sparkplug aliases in a bounded table: ingestion.sparkplug_max_aliases)
//!   ──> write-ahead log, group-commit fsync               (wal/)
//!   ──> ack to the broker, in order                      (intake.rs)
//!   ──> WAL reader ──> batcher (size or time) ──> N binary COPY writers (store.rs, writer.rs;
//!       tag ids from a bounded cache of the tags table: ingestion.max_tags_cached)
//!   ──> PostgreSQL / TimescaleDB (schema.rs); WAL trimmed below the committed frames
//! HTTP :7000  /api/v1/history, /api/v1/latest (history.rs), /healthz, /readyz, /metrics
//!             (database readiness and the WAL gauges: monitor.rs)
//! ```
//!
//! Exactly once: the WAL makes a message durable before its ack, and the unique key on
//! `points (tag_id, time)` drops what a crash makes come twice (WAL replay of frames whose
//! commit was not yet recorded; broker redelivery of messages whose ack was lost). Points
//! without their own timestamp take the receive time, which a redelivery changes: for them
//! the guarantee is at least once.
//!
//! Shutdown drains in order: receiving stops, the WAL writer logs and acknowledges what it
//! was handed, the writers get a moment to commit what is in flight, and the rest stays in
//! the WAL for the next start.

pub mod history;
pub mod intake;
pub mod model;
pub mod monitor;
pub mod parse;
pub mod schema;
pub mod store;
pub mod wal;
pub mod writer;

use std::sync::Arc;
use std::time::Duration;

use rumqttc::QoS;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use nexus_common::breaker::{BreakerMetrics, CircuitBreaker};
use nexus_common::config::{Config, IngestionConfig};
use nexus_common::service::{Shell, ShellOptions, StatusStats};
use nexus_common::telemetry::Telemetry;

use crate::history::Db;
pub use crate::intake::IngestMetrics;
use crate::intake::Intake;
use crate::monitor::Monitor;
use crate::store::{Historian, Store};
use crate::wal::{Wal, WalMetrics, WalOptions};
use crate::writer::{TagCache, Tracker, WriterCtx, WriterMetrics};

pub const SERVICE: &str = "ingest";

fn subscriptions(cfg: &Config) -> Vec<(String, QoS)> {
    let group = &cfg.ingestion.shared_group;
    cfg.ingestion
        .filters
        .iter()
        .map(|f| {
            let topic = if group.is_empty() {
                f.clone()
            } else {
                format!("$share/{group}/{f}")
            };
            (topic, QoS::AtLeastOnce)
        })
        .collect()
}

/// The service shell: the history API on the HTTP port, the subscriptions, and manual acks
/// (a message is acknowledged only once it is durable).
fn shell_options(cfg: &Config, api: Arc<Db>, telemetry: &Telemetry) -> ShellOptions {
    let mut opts = ShellOptions::new(SERVICE, cfg.ingestion.http_listen);
    opts.routes = history::routes(api);
    opts.subscriptions = subscriptions(cfg);
    opts.manual_acks = true;
    opts.incoming_capacity = 4096;
    opts.telemetry = Some(telemetry.clone());
    opts
}

/// How often ingestion's status carries fresh figures.
const STATUS_STATS_EVERY: Duration = Duration::from_secs(5);

/// Ingestion's figures in its retained status (docs/contract.md, "Status topics"): WAL use,
/// whether the database is up, points received and written per second over the last period,
/// and the age of the oldest point not yet in the database.
fn status_stats(wal: &Wal, m: &IngestMetrics, w: &WriterMetrics) -> StatusStats {
    let (wal, m, w) = (wal.clone(), m.clone(), w.clone());
    let last = std::sync::Mutex::new(None::<(std::time::Instant, u64, u64)>);
    StatusStats {
        every: STATUS_STATS_EVERY,
        read: Arc::new(move || {
            let now = std::time::Instant::now();
            let (received, written) = (m.points.get(), w.written.get());
            let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
            let rate = |before: u64, after: u64, secs: f64| {
                (after.saturating_sub(before) as f64 / secs * 10.0).round() / 10.0
            };
            let (received_per_s, written_per_s) = match *last {
                Some((at, r, wr)) if now.duration_since(at).as_secs_f64() > 0.05 => {
                    let secs = now.duration_since(at).as_secs_f64();
                    (rate(r, received, secs), rate(wr, written, secs))
                }
                _ => (0.0, 0.0),
            };
            *last = Some((now, received, written));
            serde_json::json!({
                "wal_used_ratio": (wal.usage_ratio() * 10_000.0).round() / 10_000.0,
                "wal_bytes": wal.bytes(),
                "db_up": w.db_up.get() == 1,
                "points_received_per_s": received_per_s,
                "points_written_per_s": written_per_s,
                "points_received": received,
                "points_written": written,
                "oldest_unwritten_s": m.oldest_age.get(),
            })
        }),
    }
}

/// Run ingestion until `shutdown`.
pub async fn run(cfg: Arc<Config>, shutdown: CancellationToken) -> anyhow::Result<()> {
    nexus_common::install_tls_provider();
    let ic = cfg.ingestion.clone();
    let payloads = nexus_common::codec::payload::Decoder::new(&cfg.payloads)
        .map_err(|e| anyhow::anyhow!("payloads: {e}"))?;
    let Some(database) = nexus_common::pg::Database::from_config(&cfg.database) else {
        anyhow::bail!("ingestion needs a database: set database.url or NEXUS_DATABASE_URL");
    };
    let telemetry = Telemetry::new(SERVICE);
    let registry = &telemetry.registry;
    let metrics = IngestMetrics::new(registry)?;
    let wmetrics = WriterMetrics::new(registry)?;
    let (wal, start) = open_wal(&ic, WalMetrics::new(registry)?).await?;
    wal.set_writable_flag(telemetry.readiness.condition("wal_writable"));

    let api = Arc::new(Db::new(database.clone(), ic.history_max_points));
    api.watch_wal(wal.clone());
    let mut opts = shell_options(&cfg, api.clone(), &telemetry);
    opts.status_stats = Some(status_stats(&wal, &metrics, &wmetrics));
    let mut shell = Shell::start(&cfg, opts, shutdown.clone()).await?;
    let db_ready = telemetry.readiness.condition("database");

    // Storing: WAL reader -> batcher -> writers.
    let writers = Arc::new(WriterCtx {
        db: database,
        tags: Arc::new(TagCache::new(metrics.state.map(
            "tag_ids",
            ic.max_tags_cached,
            false,
        ))),
        tracker: Arc::new(Tracker::new(wal.clone(), start)),
        breaker: CircuitBreaker::new(
            "database",
            ic.breaker.into(),
            Some(BreakerMetrics::new(registry)?),
        ),
        metrics: wmetrics,
        recovered: tokio::sync::Notify::new(),
    });
    let historian = Historian {
        cfg: ic.clone(),
        writers: writers.clone(),
        api: api.clone(),
    };
    let store = Store::start(&wal, start, historian)?;
    let monitor = Monitor {
        wal: wal.clone(),
        metrics: metrics.clone(),
        writers,
        api,
        ready: db_ready,
        readiness: telemetry.readiness.clone(),
        jobs: crate::monitor::JobMetrics::new(registry)?,
    };
    let monitor = tokio::spawn(monitor.run(store.token()));

    // Receiving: durable, then acknowledged.
    let (append_tx, append_rx) = mpsc::channel(4096);
    let (ack_tx, ack_rx) = mpsc::unbounded_channel();
    let wal_writer = wal.spawn_writer(append_rx, ack_tx)?;
    let acker = tokio::spawn(intake::acker(
        ack_rx,
        shell.mqtt.clone(),
        metrics.ack_errors.clone(),
    ));
    let mut incoming = shell
        .incoming
        .take()
        .ok_or_else(|| anyhow::anyhow!("no incoming messages"))?;
    Intake::new(metrics, shell.mqtt.clone(), &ic)
        .with_payloads(payloads)
        .run(&mut incoming, append_tx, &shutdown)
        .await;

    // Drain: what was received goes to the WAL and is acknowledged; writers get a moment to
    // commit what is in flight; the rest stays in the WAL for the next start.
    stop_wal_writer(&wal, wal_writer, Duration::from_secs(5)).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), acker).await;
    store.stop(Duration::from_secs(3)).await;
    let _ = monitor.await;
    tracing::info!(
        pending_frames = wal.pending_frames(),
        "ingestion stopped; anything pending is written at the next start"
    );
    shell.stop().await;
    Ok(())
}

/// Open (or create) the WAL and recover what a previous run left, off the async threads.
/// Returns the log and the first frame id still to be written to the database.
async fn open_wal(ic: &IngestionConfig, metrics: WalMetrics) -> anyhow::Result<(Wal, u64)> {
    let opts = WalOptions {
        dir: ic.wal_dir.clone(),
        max_size: ic.wal_max_size.0,
        segment_size: ic.wal_segment_size.0,
        fsync: true,
    };
    let opened = tokio::task::spawn_blocking(move || Wal::open(opts, Some(metrics))).await?;
    opened.map_err(|e| anyhow::anyhow!("cannot open the WAL in {}: {e}", ic.wal_dir.display()))
}

/// Wait up to `grace` for the WAL writer to log and acknowledge what it was handed (its
/// channel is closed). A writer still waiting for room in a full log then is stopped: what
/// it holds is not acknowledged, so the broker sends it again after the restart.
async fn stop_wal_writer(wal: &Wal, writer: std::thread::JoinHandle<()>, grace: Duration) {
    let done = tokio::task::spawn_blocking(move || writer.join());
    tokio::pin!(done);
    if tokio::time::timeout(grace, &mut done).await.is_err() {
        tracing::warn!("WAL writer still waiting for room; stopping it unacknowledged");
        wal.close();
        let _ = done.await;
    }
}
