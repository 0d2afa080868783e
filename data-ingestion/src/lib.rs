//! # nexus-data-ingestion
//!
//! The historian writer (`nexus ingest`, part of `nexus up` when a database is configured).
//! The seed's "Data Ingestion Service" without its loss: a point that reached ingestion is
//! stored exactly once, or counted as rejected with a reason.
//!
//! ```text
//! MQTT $share/<group>/<filter> (QoS 1, persistent session, manual acks)
//!   ──> parse: JSON value object / Sparkplug B           (parse.rs; rejects counted)
//!   ──> write-ahead log, group-commit fsync               (wal/)
//!   ──> ack to the broker, in order
//!   ──> WAL reader ──> batcher (size or time) ──> N binary COPY writers (writer.rs)
//!   ──> PostgreSQL / TimescaleDB (schema.rs); WAL trimmed below the committed frames
//! HTTP :7000  /api/v1/history, /api/v1/latest (history.rs), /healthz, /readyz, /metrics
//! ```
//!
//! Exactly once: the WAL makes a message durable before its ack, and the unique key on
//! `points (tag_id, time)` drops what a crash makes come twice (WAL replay of frames whose
//! commit was not yet recorded; broker redelivery of messages whose ack was lost). Points
//! without their own timestamp take the receive time, which a redelivery changes: for them
//! the guarantee is at least once.

pub mod history;
pub mod model;
pub mod parse;
pub mod schema;
pub mod wal;
pub mod writer;

use std::sync::Arc;
use std::time::Duration;

use prometheus::{Gauge, IntCounter, IntCounterVec, Registry};
use rumqttc::QoS;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use nexus_common::breaker::{BreakerMetrics, CircuitBreaker};
use nexus_common::config::Config;
use nexus_common::metrics::{self, MetricError};
use nexus_common::mqtt::Message;
use nexus_common::service::{Shell, ShellOptions};
use nexus_common::telemetry::Telemetry;

use crate::history::Db;
use crate::wal::{Append, Wal, WalMetrics, WalOptions};
use crate::writer::{TagCache, Tracker, WriterCtx, WriterMetrics};

pub const SERVICE: &str = "ingest";

/// Counters of what arrives.
#[derive(Clone)]
pub struct IngestMetrics {
    pub messages: IntCounter,
    pub points: IntCounter,
    pub rejected: IntCounterVec,
    pub ignored: IntCounterVec,
    pub rebirths: IntCounter,
    pub ack_errors: IntCounter,
    pub oldest_age: Gauge,
    pub usage: Gauge,
}

impl IngestMetrics {
    /// Register the metrics in `registry`; the labelled ones start with a series at 0 for
    /// every label the parser can give, so `/metrics` shows them before the first reject.
    pub fn new(r: &Registry) -> Result<IngestMetrics, MetricError> {
        let m = IngestMetrics {
            messages: metrics::counter(
                r,
                "nexus_ingest_messages_received_total",
                "MQTT messages received",
            )?,
            points: metrics::counter(
                r,
                "nexus_ingest_points_received_total",
                "Points parsed from messages",
            )?,
            rejected: metrics::counter_vec(
                r,
                "nexus_ingest_rejected_total",
                "Messages (or Sparkplug metrics) not stored as points, by reason; kept in ingest_rejects",
                &["reason"],
            )?,
            ignored: metrics::counter_vec(
                r,
                "nexus_ingest_messages_ignored_total",
                "Messages that carry no values (Sparkplug deaths, commands, host state), by kind",
                &["kind"],
            )?,
            rebirths: metrics::counter(
                r,
                "nexus_ingest_rebirth_requests_total",
                "Sparkplug rebirth requests sent for unknown aliases",
            )?,
            ack_errors: metrics::counter(
                r,
                "nexus_ingest_ack_errors_total",
                "Acks that could not be handed to the MQTT client (the broker resends; duplicates are dropped)",
            )?,
            oldest_age: metrics::gauge_f64(
                r,
                "nexus_ingest_oldest_unwritten_age_seconds",
                "Age of the oldest point durable in the WAL but not yet in the database",
            )?,
            usage: metrics::gauge_f64(
                r,
                "nexus_ingest_buffer_usage_ratio",
                "WAL size over wal_max_size (the autoscaling signal)",
            )?,
        };
        for reason in parse::reject_labels() {
            m.rejected.with_label_values(&[reason]);
        }
        for kind in parse::IGNORED_KINDS {
            m.ignored.with_label_values(&[kind]);
        }
        Ok(m)
    }
}

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

/// Run ingestion until `shutdown`.
pub async fn run(cfg: Arc<Config>, shutdown: CancellationToken) -> anyhow::Result<()> {
    nexus_common::install_tls_provider();
    let ic = cfg.ingestion.clone();
    let Some(database) = nexus_common::pg::Database::from_config(&cfg.database) else {
        anyhow::bail!("ingestion needs a database: set database.url or NEXUS_DATABASE_URL");
    };
    let telemetry = Telemetry::new(SERVICE);
    let registry = telemetry.registry.clone();
    let metrics = IngestMetrics::new(&registry)?;
    let wmetrics = WriterMetrics::new(&registry)?;
    let wal_opts = WalOptions {
        dir: ic.wal_dir.clone(),
        max_size: ic.wal_max_size.0,
        segment_size: ic.wal_segment_size.0,
        fsync: true,
    };
    let wal_metrics = WalMetrics::new(&registry)?;
    let (wal, start) = tokio::task::spawn_blocking(move || Wal::open(wal_opts, Some(wal_metrics)))
        .await?
        .map_err(|e| anyhow::anyhow!("cannot open the WAL in {}: {e}", ic.wal_dir.display()))?;

    let db = Arc::new(Db::new(database.clone(), ic.history_max_points));
    let mut opts = ShellOptions::new(SERVICE, ic.http_listen);
    opts.routes = history::routes(db.clone());
    opts.subscriptions = subscriptions(&cfg);
    opts.manual_acks = true;
    opts.incoming_capacity = 4096;
    opts.telemetry = Some(telemetry.clone());
    let mut shell = Shell::start(&cfg, opts, shutdown.clone()).await?;
    let db_ready = telemetry.readiness.condition("database");

    // Pipeline: WAL reader -> batcher -> writers. It outlives `shutdown` a little, to finish
    // what is in flight.
    let pipeline = CancellationToken::new();
    let (frame_tx, frame_rx) = mpsc::channel(8);
    let reader = wal.spawn_reader(start, frame_tx)?;
    let (batch_tx, batch_rx) = mpsc::channel(ic.writers);
    let batcher = tokio::spawn(writer::batcher(
        frame_rx,
        batch_tx,
        ic.batch_size,
        ic.batch_timeout,
        pipeline.clone(),
    ));
    let ctx = Arc::new(WriterCtx {
        db: database.clone(),
        tags: Arc::new(TagCache::default()),
        tracker: Arc::new(Tracker::new(wal.clone(), start)),
        breaker: CircuitBreaker::new(
            "database",
            ic.breaker.into(),
            Some(BreakerMetrics::new(&registry)?),
        ),
        metrics: wmetrics.clone(),
        recovered: tokio::sync::Notify::new(),
    });
    let setup = {
        let (db, ic, ctx, pipeline) = (db.clone(), ic.clone(), ctx.clone(), pipeline.clone());
        let batch_rx = Arc::new(tokio::sync::Mutex::new(batch_rx));
        tokio::spawn(async move {
            // The schema first (retrying while the database is away; the WAL holds the data).
            let mut attempt = 0;
            let storage = loop {
                let r = async {
                    let (client, _task) = nexus_common::pg::connect(&ctx.db)
                        .await
                        .map_err(|e| e.to_string())?;
                    schema::ensure(&client, &ic)
                        .await
                        .map_err(|e| e.to_string())
                }
                .await;
                match r {
                    Ok(s) => break s,
                    Err(e) => {
                        if attempt == 0 {
                            tracing::warn!(error = %e, "historian schema not ready; retrying (points wait in the WAL)");
                        }
                        attempt += 1;
                        tokio::select! {
                            _ = tokio::time::sleep(nexus_common::supervise::backoff(Duration::from_millis(200), Duration::from_secs(10), attempt)) => {}
                            _ = pipeline.cancelled() => return Vec::new(),
                        }
                    }
                }
            };
            let plain_retention = storage
                .timescale
                .is_none()
                .then_some(ic.retention)
                .flatten();
            *db.storage
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(storage);
            let mut tasks: Vec<_> = (0..ic.writers)
                .map(|i| {
                    tokio::spawn(writer::writer(
                        i,
                        ctx.clone(),
                        batch_rx.clone(),
                        pipeline.clone(),
                    ))
                })
                .collect();
            if let Some(keep) = plain_retention {
                tasks.push(tokio::spawn(retention(ctx.clone(), keep, pipeline.clone())));
            }
            tasks
        })
    };

    // Gauges and database readiness.
    let monitor = {
        let (wal, metrics, wmetrics, db, token, ctx) = (
            wal.clone(),
            metrics.clone(),
            wmetrics.clone(),
            db.clone(),
            pipeline.clone(),
            ctx.clone(),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut was_up = true;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = token.cancelled() => return,
                }
                wal.record_position();
                metrics.oldest_age.set(wal.oldest_uncommitted_age());
                metrics.usage.set(wal.usage_ratio());
                let up = match db.client().await {
                    Ok(c) => c.simple_query("SELECT 1").await.is_ok(),
                    Err(_) => false,
                };
                wmetrics.db_up.set(i64::from(up));
                db_ready.set(up);
                if up && !was_up {
                    // Writers waiting out a backoff go now.
                    ctx.recovered.notify_waiters();
                }
                was_up = up;
            }
        })
    };

    // Durable, then acknowledged.
    let (append_tx, append_rx) = mpsc::channel::<Append<Message>>(4096);
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<Vec<Message>>();
    let wal_writer = wal.spawn_writer(append_rx, ack_tx)?;
    let acker = {
        let mqtt = shell.mqtt.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            while let Some(msgs) = ack_rx.recv().await {
                for m in &msgs {
                    if mqtt.ack(m).await.is_err() {
                        metrics.ack_errors.inc();
                    }
                }
            }
        })
    };

    let mut incoming = shell
        .incoming
        .take()
        .ok_or_else(|| anyhow::anyhow!("no incoming messages"))?;
    let mut parser = parse::Parser::new();
    loop {
        let msg = tokio::select! {
            m = incoming.recv() => match m { Some(m) => m, None => break },
            _ = shutdown.cancelled() => break,
        };
        metrics.messages.inc();
        let parsed = parser.parse(msg.topic(), msg.payload(), model::now_us());
        metrics.points.inc_by(parsed.points.len() as u64);
        for r in &parsed.rejects {
            metrics.rejected.with_label_values(&[r.label()]).inc();
            tracing::debug!(topic = %r.topic, reason = %r.reason, "message rejected");
        }
        if let Some(kind) = parsed.ignored {
            metrics.ignored.with_label_values(&[kind]).inc();
        }
        if let (Some((topic, payload)), true) = (parsed.rebirth, ic.request_rebirth) {
            metrics.rebirths.inc();
            if let Err(e) = shell
                .mqtt
                .publish(&topic, payload, QoS::AtLeastOnce, false)
                .await
            {
                tracing::warn!(%topic, error = %e, "cannot request a Sparkplug rebirth");
            }
        }
        let append = Append {
            points: parsed.points,
            rejects: parsed.rejects,
            token: msg,
        };
        tokio::select! {
            r = append_tx.send(append) => if r.is_err() { break },
            _ = shutdown.cancelled() => break,
        }
    }

    // Drain: what was received goes to the WAL and is acknowledged; writers get a moment to
    // commit what is in flight; the rest stays in the WAL for the next start.
    drop(append_tx);
    let writer_done = tokio::task::spawn_blocking(move || wal_writer.join());
    tokio::pin!(writer_done);
    if tokio::time::timeout(Duration::from_secs(5), &mut writer_done)
        .await
        .is_err()
    {
        // Waiting for room in a full log: what it holds is not acknowledged, so the broker
        // sends it again after the restart.
        tracing::warn!("WAL writer still waiting for room; stopping it unacknowledged");
        wal.close();
        let _ = writer_done.await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), acker).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while wal.pending_frames() > 0 && tokio::time::Instant::now() < deadline && setup.is_finished()
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pipeline.cancel();
    wal.close();
    let _ = batcher.await;
    if let Ok(tasks) = setup.await {
        for t in tasks {
            let _ = t.await;
        }
    }
    let _ = monitor.await;
    let _ = tokio::task::spawn_blocking(move || reader.join()).await;
    tracing::info!(
        pending_frames = wal.pending_frames(),
        "ingestion stopped; anything pending is written at the next start"
    );
    shell.stop().await;
    Ok(())
}

/// Plain PostgreSQL retention: every 10 minutes, delete points older than `keep`.
async fn retention(ctx: Arc<WriterCtx>, keep: Duration, token: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(600));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = token.cancelled() => return,
        }
        let r = async {
            let (client, _task) = nexus_common::pg::connect(&ctx.db)
                .await
                .map_err(|e| e.to_string())?;
            schema::delete_expired(&client, keep)
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        match r {
            Ok(n) if n > 0 => tracing::info!(deleted = n, "retention: old points deleted"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "retention run failed; next in 10 minutes"),
        }
    }
}
