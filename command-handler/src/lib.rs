//! # nexus-command-handler
//!
//! Safe write-back to devices (`nexus commands`; inside `nexus gateway` in `nexus up`).
//!
//! Data flow (the seed's "Command Flow", built out by the command handler issue):
//!
//! ```text
//! $nexus/cmd/<device>/write, $nexus/cmd/<device>/<tag>/set
//!   ──> parse ──> bounded queue (full: answered "queue full" at once) ──> validate (device,
//!       tag, writable, type, min/max, TTL, duplicate request id) ──> rate limits (global,
//!       per device) ──> concurrency limit ──> Driver write through the gateway's pools
//!       (timeout, optional read-back) ──> $nexus/cmd/response/<device>/<tag> + audit log/table
//! ```
//!
//! Today this crate runs the service shell: MQTT client with status topic and last will, and
//! HTTP on :4100 with `/healthz`, `/readyz` and `/metrics`.

use std::sync::Arc;

use nexus_common::config::Config;
use nexus_common::service::{Shell, ShellOptions};
use tokio_util::sync::CancellationToken;

pub const SERVICE: &str = "commands";

/// Run the command handler until `shutdown`.
pub async fn run(cfg: Arc<Config>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let shell = Shell::start(
        &cfg,
        ShellOptions::new(SERVICE, cfg.commands.http_listen),
        shutdown.clone(),
    )
    .await?;
    shutdown.cancelled().await;
    shell.stop().await;
    Ok(())
}
