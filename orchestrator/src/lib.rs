//! # nexus-orchestrator
//!
//! The `nexus` binary and the orchestrator service.
//!
//! - [`status`]: the orchestrator service (`nexus orchestrator`, :5000): follows every retained
//!   `$nexus/status/#` topic and serves the platform's state at `GET /api/v1/status`.
//! - [`up`]: `nexus up` composes the platform in one process: embedded broker (with an
//!   internal service account for the services), then gateway, command handler, alert service,
//!   ingestion (when a database is configured) and the orchestrator, each supervised and
//!   restarted with backoff, drained within `orchestrator.shutdown_grace` on Ctrl-C/SIGTERM.
//! - [`cli`]: argument parsing and the one-service subcommands.

pub mod cli;
pub mod status;
pub mod up;

use std::sync::Arc;

use nexus_common::config::Config;
use nexus_common::telemetry::Telemetry;
use tokio_util::sync::CancellationToken;

/// The gateway with the command handler inside it, sharing its connection pools and device
/// directory (`nexus gateway`, and the gateway of `nexus up`). Each keeps its own HTTP port and
/// metrics (:4000 and :4100).
pub async fn gateway_with_commands(
    cfg: Arc<Config>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let gw_telemetry = Telemetry::new(nexus_protocol_gateway::SERVICE);
    let shared = nexus_devices::DeviceLayer::new(&cfg, &gw_telemetry.registry)?;
    let commands = tokio::spawn(nexus_command_handler::run_shared(
        cfg.clone(),
        Telemetry::new(nexus_command_handler::SERVICE),
        shared.pools.clone(),
        shared.directory.clone(),
        shutdown.clone(),
    ));
    let gateway =
        nexus_protocol_gateway::run_shared(cfg, gw_telemetry, shared, shutdown.clone()).await;
    // Whichever ends first takes the other down with it, so the supervisor restarts both.
    shutdown.cancel();
    let commands = commands
        .await
        .map_err(|e| anyhow::anyhow!("command handler task: {e}"))?;
    gateway.and(commands)
}
