//! # nexus-data-ingestion
//!
//! The historian writer (`nexus ingest`, part of `nexus up` when a database is configured).
//!
//! Data flow (the seed's "Data Ingestion Service", without its loss; built out by the
//! ingestion issue):
//!
//! ```text
//! MQTT $share/<group>/# (QoS 1, persistent session, manual acks)
//!   ──> parse JSON value object / Sparkplug B (rejects to ingest_rejects, counted)
//!   ──> write-ahead log (group-commit fsync) ──> ack to the broker
//!   ──> batcher (size or time) ──> N binary COPY writers (breaker, retries)
//!   ──> PostgreSQL/TimescaleDB; WAL trimmed once committed; `metrics` view for Grafana
//! ```
//!
//! Today this crate runs the service shell: MQTT client with status topic and last will, and
//! HTTP on :7000 with `/healthz`, `/readyz` and `/metrics`.

use std::sync::Arc;

use nexus_common::config::Config;
use nexus_common::service::{Shell, ShellOptions};
use tokio_util::sync::CancellationToken;

pub const SERVICE: &str = "ingest";

/// Run ingestion until `shutdown`.
pub async fn run(cfg: Arc<Config>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let shell = Shell::start(
        &cfg,
        ShellOptions::new(SERVICE, cfg.ingestion.http_listen),
        shutdown.clone(),
    )
    .await?;
    if let Some(url) = &cfg.ingestion.database_url {
        tracing::info!(database = %url, "historian database configured");
    }
    shutdown.cancelled().await;
    shell.stop().await;
    Ok(())
}
