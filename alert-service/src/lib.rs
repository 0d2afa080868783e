//! # nexus-alert-service
//!
//! The ISA-18.2 alarm engine on the Unified Namespace (`nexus alerts`, part of `nexus up`).
//!
//! Data flow (built out by the alert service issue):
//!
//! ```text
//! alerts.rules ──> rule index by topic filter
//! MQTT UNS values ──> condition (limits with deadband, deviation, rate, equals, quality,
//!   stale) ──> on/off delays ──> ISA-18.2 state machine (ack, shelve, suppress, out of service)
//!   ──> retained $nexus/alarms/<topic>/<rule>, $nexus/alarms/events, alarm_events journal,
//!       webhooks (retries, rate limit); REST on :6000
//! ```
//!
//! Today this crate runs the service shell: MQTT client with status topic and last will, and
//! HTTP on :6000 with `/healthz`, `/readyz` and `/metrics`. Rules in the config are validated
//! at load.

pub mod engine;
pub mod state;

use std::sync::Arc;

use nexus_common::config::Config;
use nexus_common::service::{Shell, ShellOptions};
use tokio_util::sync::CancellationToken;

pub const SERVICE: &str = "alerts";

/// Run the alert service until `shutdown`.
pub async fn run(cfg: Arc<Config>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let shell = Shell::start(
        &cfg,
        ShellOptions::new(SERVICE, cfg.alerts.http_listen),
        shutdown.clone(),
    )
    .await?;
    tracing::info!(rules = cfg.alerts.rules.len(), "alert service ready");
    shutdown.cancelled().await;
    shell.stop().await;
    Ok(())
}
