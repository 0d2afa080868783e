//! # nexus-protocol-gateway
//!
//! Turns PLC registers into Unified Namespace topics (`nexus gateway`, part of `nexus up`).
//!
//! Data flow (the seed's "Protocol Gateway", built out by the gateway issues):
//!
//! ```text
//! devices config ──> poll scheduler (per-device interval + jitter, bounded worker pool,
//!                    skipped polls counted) ──> connection pool per protocol
//!                    (breaker per connection) ──> Driver (Modbus / OPC UA / S7)
//!                ──> scale/offset, deadband, heartbeat ──> publisher (batched, retained,
//!                    QoS 1) ──> MQTT; store-and-forward disk buffer while the broker is away
//! ```
//!
//! Today this crate runs the service shell: the MQTT client with its retained
//! `$nexus/status/service/gateway/<instance>` status and last will, and HTTP on :4000 with
//! `/healthz`, `/readyz` and `/metrics`. Devices in the config are validated at load.

use std::sync::Arc;

use nexus_common::config::Config;
use nexus_common::service::{Shell, ShellOptions};
use tokio_util::sync::CancellationToken;

pub const SERVICE: &str = "gateway";

/// Run the gateway until `shutdown`.
pub async fn run(cfg: Arc<Config>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let shell = Shell::start(
        &cfg,
        ShellOptions::new(SERVICE, cfg.gateway.http_listen),
        shutdown.clone(),
    )
    .await?;
    tracing::info!(devices = cfg.devices.len(), "gateway ready");
    shutdown.cancelled().await;
    shell.stop().await;
    Ok(())
}
pub mod buffer;
pub mod driver;
pub mod simulator;
