//! # nexus-command-handler
//!
//! Safe write-back to devices over MQTT. Runs beside the gateway, sharing its connection pools
//! and device directory (`nexus gateway`, `nexus up`: one session per device, as small PLCs
//! allow few), or standalone with its own pools (`nexus commands`).
//!
//! ```text
//! $nexus/cmd/<device>/write, $nexus/cmd/<device>/<tag>/set   (subscribed as $nexus/cmd/#)
//!   ──> [command] parse topic and payload (size limit; errors answered on
//!       $nexus/cmd/response/<device>/<tag>, or $nexus/cmd/response/<device> without a tag)
//!   ──> bounded queue (full: "queue full" at once) ──> dispatcher, at most max_in_flight
//!   ──> [handler] TTL ──> duplicate request_id (answered from the first result)
//!   ──> [validate] device, enabled, tag, writable, type, range, min/max
//!   ──> rate limits (per device, global) ──> Pools::write with a timeout, breaker fast-fail
//!   ──> optional read-back ──> response on $nexus/cmd/response/<device>/<tag> and on the
//!       MQTT 5 Response Topic with its Correlation Data (only a plain topic outside `$`:
//!       the service user is not bound by the broker's ACL; see command::ReplyTopic)
//!   ──> [audit] structured log always; command_audit table when a database is configured
//! ```
//!
//! The handler's MQTT session is clean on purpose: commands published while it is offline are
//! not queued by the broker to run later; senders see no response and retry. A command that
//! carries `ts` is refused once older than its `ttl_ms` (default `commands.ttl`).

pub mod audit;
pub mod command;
pub mod handler;
pub mod journal;
pub mod validate;

use std::sync::Arc;

use nexus_common::config::Config;
use nexus_common::mqtt::QoS;
use nexus_common::service::{Shell, ShellOptions};
use nexus_common::telemetry::Telemetry;
use nexus_devices::{watch_devices, DeviceDirectory, DeviceLayer, Pools};
use tokio_util::sync::CancellationToken;

pub const SERVICE: &str = "commands";

/// `nexus commands`: standalone, with its own pools and device directory (reloaded with the
/// devices file).
pub async fn run(cfg: Arc<Config>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let telemetry = Telemetry::new(SERVICE);
    let shared = DeviceLayer::new(&cfg, &telemetry.registry)?;
    let maintenance = tokio::spawn(shared.pools.clone().maintain(shutdown.clone()));
    let directory = shared.directory.clone();
    let watcher = tokio::spawn(watch_devices(
        cfg.clone(),
        move |d| directory.apply(d),
        shutdown.clone(),
    ));
    let r = run_shared(cfg, telemetry, shared.pools, shared.directory, shutdown).await;
    let _ = maintenance.await;
    let _ = watcher.await;
    r
}

/// Run with the gateway's pools and directory.
pub async fn run_shared(
    cfg: Arc<Config>,
    telemetry: Telemetry,
    pools: Arc<Pools>,
    directory: Arc<DeviceDirectory>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut opts = ShellOptions::new(SERVICE, cfg.commands.http_listen);
    opts.mqtt_v5 = cfg.commands.mqtt_v5;
    // A persistent session (`mqtt.persistent_session`) with manual acks: a command sent while
    // the handler restarts, or one it had not answered when it stopped, comes after the
    // restart and is run, expired by its TTL, or answered from the journal.
    opts.manual_acks = true;
    opts.subscriptions = vec![(nexus_common::topic::sys::CMD_ALL.into(), QoS::AtLeastOnce)];
    opts.incoming_capacity = 4096;
    let registry = telemetry.registry.clone();
    opts.telemetry = Some(telemetry);
    let (journal, opened) = {
        let (dir, window, max) = (
            cfg.commands.journal_dir.clone(),
            cfg.commands.dedup_window,
            cfg.commands.dedup_max_entries,
        );
        tokio::task::spawn_blocking(move || {
            journal::Journal::open(&dir, window, max, nexus_common::now_ms()).map_err(|e| {
                anyhow::anyhow!(
                    "commands.journal_dir: cannot open the request journal in {}: {e}",
                    dir.display()
                )
            })
        })
        .await??
    };
    let mut shell = Shell::start(&cfg, opts, shutdown.clone()).await?;
    let db = nexus_common::pg::Database::from_config(&cfg.database);
    let audit_db = db.is_some();
    let audit = db.map(|db| audit::start_writer(db, shutdown.clone()));
    let handler = handler::Handler::new(
        cfg.commands.clone(),
        directory,
        pools,
        shell.mqtt.clone(),
        &registry,
        audit,
        nexus_common::broker::Acl::new(
            Arc::new(nexus_common::auth::Identities::roles_only(&cfg.auth)),
            &cfg.broker,
            &cfg.devices,
        ),
    )?;
    handler.restore(Arc::new(journal), opened);
    let incoming = shell
        .incoming
        .take()
        .ok_or_else(|| anyhow::anyhow!("no incoming channel"))?;
    tracing::info!(audit_db, "command handler listening on $nexus/cmd/#");
    handler.run(incoming, shutdown).await;
    shell.stop().await;
    Ok(())
}
