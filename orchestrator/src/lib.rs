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
//! - [`ui`]: the control center, a browser UI embedded in the binary, served at `/ui/` on the
//!   orchestrator's port (`/` redirects there; docs/adr/0008-control-center-ui.md).
//! - [`control`]: the control API (devices added, changed and removed through the devices
//!   file) on the orchestrator's port.
//! - [`live`]: the live namespace for browsers (a snapshot and server-sent events).
//! - [`commands`]: write-back from the control center, through the command handler.
//! - [`proxy`]: the other services' APIs (history, alarms) served on the orchestrator's port.
//! - [`cli`]: argument parsing and the one-service subcommands.

pub mod cli;
pub mod commands;
pub mod control;
pub mod live;
pub mod proxy;
pub mod status;
pub mod ui;
pub mod up;

use std::sync::Arc;

use nexus_common::config::Config;
use nexus_common::telemetry::Telemetry;
use tokio_util::sync::CancellationToken;

/// The gateway with the command handler inside it, sharing its connection pools and device
/// directory (`nexus gateway`, and the gateway of `nexus up`). Each keeps its own HTTP port and
/// metrics (:4000 and :4100). Whichever stops first stops the other, so the supervisor restarts
/// them together: a handler that failed is never left dead beside a running gateway.
/// With `gateway.commands: false` the gateway runs alone (commands are consumed elsewhere).
pub async fn gateway_with_commands(
    cfg: Arc<Config>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if !cfg.gateway.commands {
        tracing::info!("gateway.commands is false: no command handler in this process");
        return nexus_protocol_gateway::run(cfg, shutdown).await;
    }
    let gw_telemetry = Telemetry::new(nexus_protocol_gateway::SERVICE);
    let shared = nexus_devices::DeviceLayer::new(&cfg, &gw_telemetry.registry)?;
    let mut commands = tokio::spawn(nexus_command_handler::run_shared(
        cfg.clone(),
        Telemetry::new(nexus_command_handler::SERVICE),
        shared.pools.clone(),
        shared.directory.clone(),
        shutdown.clone(),
    ));
    let mut gateway = tokio::spawn(nexus_protocol_gateway::run_shared(
        cfg,
        gw_telemetry,
        shared,
        shutdown.clone(),
    ));
    let (first, first_result, other, other_name) = tokio::select! {
        r = &mut gateway => ("gateway", r, commands, "command handler"),
        r = &mut commands => ("command handler", r, gateway, "gateway"),
    };
    if !shutdown.is_cancelled() {
        tracing::warn!(
            component = first,
            "stopped on its own; stopping the {other_name} too, so both restart"
        );
    }
    shutdown.cancel();
    let first_result = first_result.map_err(|e| anyhow::anyhow!("{first} task: {e}"));
    let other_result = other
        .await
        .map_err(|e| anyhow::anyhow!("{other_name} task: {e}"));
    first_result
        .and_then(|r| r.map_err(|e| e.context(first)))
        .and(other_result.and_then(|r| r.map_err(|e| e.context(other_name))))
}
