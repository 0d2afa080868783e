//! # nexus-protocol-gateway
//!
//! Turns PLC registers into Unified Namespace topics (`nexus gateway`, part of `nexus up`).
//!
//! ```text
//! devices (config / devices_file, reloaded on change) ──> DeviceSet: one task per device
//!   ──> scheduler: interval + 0-10% jitter; a shared pool of `gateway.workers` permits
//!       (a poll due while all are busy is skipped and counted)
//!   ──> Pools: one session per endpoint and protocol, bounded, lazy, idle reaper and health
//!       checks, a circuit breaker per endpoint ──> Driver (Modbus TCP/RTU/RTU-over-TCP:
//!       coalesced reads, codec for types and byte orders, scale/offset)
//!   ──> per tag: deadband and heartbeat; device status on $nexus/status/device/<id>
//!   ──> Publisher: JSON value objects, retained, QoS from config, on <uns_prefix>/<device>/<tag>;
//!       while the broker is away values go to the on-disk store-and-forward buffer and are
//!       replayed at a bounded rate, after live values, once it is back
//!   ──> with gateway.sparkplug: the same values as a Sparkplug B edge node (births, DDATA by
//!       alias) through a publisher, live log and buffer of its own (`sparkplug`)
//! HTTP :4000: /healthz /readyz /metrics, GET /api/v1/devices, GET /api/v1/devices/{id}/tags
//! ```
//!
//! Devices, drivers, pools and breakers are the device layer's (`nexus-devices`), shared with
//! the command handler; this crate polls them and publishes.

pub mod buffer;
pub mod http;
pub mod poller;
pub mod publisher;
pub mod shard;
pub mod sparkplug;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nexus_common::config::Config;
use nexus_common::mqtt::{self, ClientSettings};
use nexus_common::service::{Shell, ShellOptions};
use nexus_common::telemetry::Telemetry;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use buffer::DiskBuffer;
use nexus_devices::{watch_devices, DeviceLayer};
use poller::{DeviceSet, PollContext, PollMetrics};
use publisher::{PublishSettings, Publisher, PublisherMetrics};

pub const SERVICE: &str = "gateway";

/// Open the live log in `<dir>/live` and move what a previous run left in it (never
/// acknowledged by the broker) into the store-and-forward buffer.
async fn open_live_log(
    dir: &std::path::Path,
    buffer: DiskBuffer,
) -> anyhow::Result<(DiskBuffer, DiskBuffer)> {
    let live_dir = dir.join("live");
    tokio::task::spawn_blocking(move || {
        let mut buffer = buffer;
        // No size limit of its own: the publisher keeps it under `LIVE_MAX` values.
        let mut live = DiskBuffer::open_with(&live_dir, u64::MAX, 16 * 1024 * 1024)
            .map_err(|e| anyhow::anyhow!("cannot open the live log in {}: {e}", live_dir.display()))?;
        let moved = publisher::take_over(&mut live, &mut buffer).map_err(|e| {
            anyhow::anyhow!("cannot move the live log in {} to the store-and-forward buffer: {e}", live_dir.display())
        })?;
        if moved > 0 {
            tracing::info!(points = moved, "values published before the restart without the broker's acknowledgement will be replayed");
        }
        Ok((live, buffer))
    })
    .await?
}

/// Run the gateway until `shutdown`.
pub async fn run(cfg: Arc<Config>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let telemetry = Telemetry::new(SERVICE);
    let shared = DeviceLayer::new(&cfg, &telemetry.registry)?;
    run_shared(cfg, telemetry, shared, shutdown).await
}

/// Run the gateway with pools and directory shared with a command handler; `telemetry` is
/// the registry `shared` was created with.
pub async fn run_shared(
    cfg: Arc<Config>,
    telemetry: Telemetry,
    shared: DeviceLayer,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let gw = &cfg.gateway;
    let pools = shared.pools.clone();
    let poll_metrics = PollMetrics::new(&telemetry.registry)?;
    poll_metrics.workers.set(gw.workers as i64);
    let pub_metrics = PublisherMetrics::new(&telemetry.registry)?;
    let devices_token = CancellationToken::new();
    let set: http::SharedDevices = Arc::new(Mutex::new(DeviceSet::new(devices_token.clone())));

    let mut opts = ShellOptions::new(SERVICE, gw.http_listen);
    opts.routes = http::routes(set.clone(), shared.pools.clone());
    opts.telemetry = Some(telemetry);
    // The gateway's client carries bulk values: let the kernel coalesce them (commands have
    // their own, latency-first connection).
    opts.tcp_nodelay = false;
    let shell = Shell::start(&cfg, opts, shutdown.clone()).await?;
    // Durable before publish: a client of its own, whose acknowledgements are the live log's
    // alone.
    let data_stop = CancellationToken::new();
    let uns = !gw.sparkplug.enabled || gw.sparkplug.uns;
    let data = if gw.buffer.durable_publish && uns {
        let mut client = ClientSettings::new(format!("{}-data", shell.client_id));
        client.tcp_nodelay = false;
        let (data, _) = mqtt::connect(
            &cfg.mqtt,
            client,
            Some(&shell.mqtt_metrics),
            data_stop.clone(),
        )?;
        Some(data)
    } else {
        None
    };
    // Give the broker a moment before the first polls, so startup values go out live rather
    // than through the store-and-forward buffer.
    let publishing = data.clone().unwrap_or_else(|| shell.mqtt.clone());
    if publishing
        .wait_connected(Duration::from_secs(2))
        .await
        .is_err()
    {
        tracing::warn!(
            "broker not reachable yet; values are kept in the store-and-forward buffer until it is"
        );
    }

    let mut sparkplug_client = None;
    let (dir, max) = (gw.buffer.dir.clone(), gw.buffer.max_size.0);
    let buffer = tokio::task::spawn_blocking(move || DiskBuffer::open(&dir, max))
        .await?
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot open the store-and-forward buffer in {}: {e}",
                gw.buffer.dir.display()
            )
        })?;
    if !buffer.is_empty() {
        tracing::info!(
            points = buffer.len(),
            "store-and-forward buffer holds values from before; they will be replayed"
        );
    }
    let settings = PublishSettings {
        qos: publisher::qos_of(gw.qos),
        retain: gw.retain,
        replay_rate: gw.buffer.replay_rate,
        replay_delay: Duration::from_secs(1),
        window: (cfg.mqtt.inflight as usize * 4).clamp(64, 4096),
    };
    let (tx, rx) = mpsc::channel(256);
    let mut publisher_tasks = Vec::new();
    let mut outputs = Vec::new();
    if uns {
        let publisher = match data {
            Some(data) => {
                let (live, buffer) = open_live_log(&gw.buffer.dir, buffer).await?;
                let acked = data.acked();
                Publisher::new(data, buffer, settings, pub_metrics)
                    .with_live_log(publisher::LiveLog::new(live, acked))
            }
            None => Publisher::new(shell.mqtt.clone(), buffer, settings, pub_metrics),
        }
        .with_disk_flag(shell.telemetry.readiness.condition("disk_writable"));
        let (out, rx) = mpsc::channel(256);
        outputs.push(out);
        publisher_tasks.push(tokio::spawn(publisher.run(rx)));
    } else {
        drop(data);
    }
    if gw.sparkplug.enabled {
        let (publisher, client) =
            sparkplug_publisher(&cfg, &shell, settings, data_stop.clone()).await?;
        sparkplug_client = Some(client);
        let (out, rx) = mpsc::channel(256);
        outputs.push(out);
        publisher_tasks.push(tokio::spawn(publisher.run(rx)));
    }
    // The pollers' batches go to each output (the UNS and the Sparkplug publisher).
    let fan_out = tokio::spawn(fan_out(rx, outputs));

    let lease = gw.shard.enabled.then(|| Arc::new(shard::Lease::new()));
    let ctx = PollContext {
        pools: pools.clone(),
        workers: Arc::new(Semaphore::new(gw.workers)),
        out: tx,
        mqtt: shell.mqtt.clone(),
        metrics: poll_metrics,
        heartbeat: gw.heartbeat,
        lease: lease.clone(),
    };
    set.lock()
        .unwrap_or_else(|e| e.into_inner())
        .set_context(Some(ctx));
    // Sharded: the membership decides which devices this gateway polls; it follows the
    // device list through `device_list`.
    let (device_list, device_list_rx) = tokio::sync::watch::channel(cfg.devices.clone());
    let shard_task = if gw.shard.enabled {
        shard::member_name(&cfg)?;
        let metrics = shard::ShardMetrics::new(&shell.telemetry.registry)?;
        let task = shard::run(
            cfg.clone(),
            lease.clone().unwrap_or_default(),
            set.clone(),
            device_list_rx,
            metrics,
            shutdown.clone(),
        );
        tracing::info!(
            devices = cfg.devices.len(),
            workers = gw.workers,
            group = %gw.shard.group,
            "gateway polling its share of the devices"
        );
        Some(tokio::spawn(task))
    } else {
        let started = set
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .apply(&cfg.devices)
            .started;
        tracing::info!(devices = started, workers = gw.workers, "gateway polling");
        None
    };
    let sharded = shard_task.is_some();
    let maintenance = tokio::spawn(pools.clone().maintain(devices_token.clone()));
    let watcher = gw.watch_devices_file.then(|| {
        let (set, directory) = (set.clone(), shared.directory.clone());
        let client = shell.mqtt.clone();
        let polled = Mutex::new(enabled_ids(&cfg.devices));
        let apply = move |devices: &[nexus_common::config::DeviceConfig]| {
            directory.apply(devices);
            let now = enabled_ids(devices);
            let gone: Vec<String> = {
                let mut before = polled.lock().unwrap_or_else(|e| e.into_inner());
                let gone = before.difference(&now).cloned().collect();
                *before = now;
                gone
            };
            if sharded {
                device_list.send_replace(devices.to_vec());
                tracing::info!(
                    devices = devices.len(),
                    "device configuration reloaded; the shard takes its share"
                );
                tokio::spawn(clear_status(client.clone(), gone, Vec::new()));
                return;
            }
            let a = set.lock().unwrap_or_else(|e| e.into_inner()).apply(devices);
            tracing::info!(
                started = a.started,
                stopped = a.stopped,
                restarted = a.restarted,
                devices = devices.len(),
                "device configuration reloaded"
            );
            tokio::spawn(clear_status(client.clone(), gone, a.stopping));
        };
        tokio::spawn(watch_devices(cfg.clone(), apply, devices_token.clone()))
    });

    shutdown.cancelled().await;
    // A shard member stops its devices and says so before the rest shuts down.
    if let Some(t) = shard_task {
        match t.await {
            Ok(Err(e)) => tracing::error!(error = %e, "gateway shard member failed"),
            Err(e) => tracing::error!(error = %e, "gateway shard member task failed"),
            Ok(Ok(())) => {}
        }
    }
    // Ordered drain: pollers stop, then the publisher flushes what they produced.
    let tasks = {
        let mut s = set.lock().unwrap_or_else(|e| e.into_inner());
        let t = s.stop_all();
        s.set_context(None);
        t
    };
    for t in tasks {
        let _ = t.await;
    }
    devices_token.cancel();
    let _ = fan_out.await;
    for t in publisher_tasks {
        let _ = t.await;
    }
    drop(sparkplug_client);
    data_stop.cancel();
    let _ = maintenance.await;
    if let Some(w) = watcher {
        let _ = w.await;
    }
    shell.stop().await;
    Ok(())
}

/// The name set at `field`, else `telemetry.instance`; it must be one topic level (a problem
/// calls it `what`).
fn named_or_instance(
    cfg: &Config,
    configured: Option<&str>,
    field: &str,
    what: &str,
) -> anyhow::Result<String> {
    let name = configured.map_or_else(|| cfg.telemetry.instance_name(), str::to_owned);
    nexus_common::domain::DeviceId::new(name.clone()).map_err(|e| {
        anyhow::anyhow!(
            "{field}: {} (set {field} or telemetry.instance)",
            e.to_string().replace("device id", what)
        )
    })?;
    Ok(name)
}

/// Each batch of the pollers to every output, in order; ends when the pollers stop.
async fn fan_out(
    mut rx: mpsc::Receiver<Vec<nexus_common::DataPoint>>,
    outputs: Vec<mpsc::Sender<Vec<nexus_common::DataPoint>>>,
) {
    while let Some(batch) = rx.recv().await {
        if let [only] = outputs.as_slice() {
            let _ = only.send(batch).await;
            continue;
        }
        for out in &outputs {
            let _ = out.send(batch.clone()).await;
        }
    }
}

/// The Sparkplug edge node's publisher: a client of its own (`<client id>-sparkplug`) whose
/// will is the node's NDEATH, subscribed to the node's NCMD; a store-and-forward buffer and
/// live log of its own in `<buffer.dir>/sparkplug`. Returns the client's handle too, kept
/// until the publisher has stopped.
async fn sparkplug_publisher(
    cfg: &Config,
    shell: &Shell,
    settings: PublishSettings,
    stop: CancellationToken,
) -> anyhow::Result<(Publisher, mqtt::MqttHandle)> {
    let sp = &cfg.gateway.sparkplug;
    let node_id = named_or_instance(
        cfg,
        sp.edge_node_id.as_deref(),
        "gateway.sparkplug.edge_node_id",
        "Sparkplug id",
    )?;
    let dir = cfg.gateway.buffer.dir.join("sparkplug");
    std::fs::create_dir_all(&dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    let node = Arc::new(Mutex::new(sparkplug::EdgeNode::new(
        &sp.group_id,
        &node_id,
        Some(&dir),
    )));
    let ncmd = node.lock().unwrap_or_else(|e| e.into_inner()).ncmd_topic();
    let mut client = ClientSettings::new(format!("{}-sparkplug", shell.client_id));
    client.tcp_nodelay = false;
    let will_node = node.clone();
    client.will_source = Some(mqtt::WillSource(Arc::new(move || {
        let (topic, payload) = will_node
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .next_connection();
        mqtt::Will {
            topic,
            payload: payload.into(),
            qos: mqtt::QoS::AtLeastOnce,
            retain: false,
        }
    })));
    let dcmd = node.lock().unwrap_or_else(|e| e.into_inner()).dcmd_filter();
    client.subscriptions = vec![
        (ncmd, mqtt::QoS::AtLeastOnce),
        (dcmd, mqtt::QoS::AtLeastOnce),
    ];
    if let Some(host) = &sp.primary_host_id {
        client
            .subscriptions
            .push((publisher::state_topic(host), mqtt::QoS::AtLeastOnce));
    }
    client.incoming_capacity = 16;
    let (handle, commands) = mqtt::connect(&cfg.mqtt, client, Some(&shell.mqtt_metrics), stop)?;
    let (max, buf_dir) = (cfg.gateway.buffer.max_size.0, dir.clone());
    let buffer = tokio::task::spawn_blocking(move || DiskBuffer::open(&buf_dir, max))
        .await?
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot open the Sparkplug store-and-forward buffer in {}: {e}",
                dir.display()
            )
        })?;
    let (live, buffer) = open_live_log(&dir, buffer).await?;
    let metrics = PublisherMetrics::sparkplug(&shell.telemetry.registry)?;
    let acked = handle.acked();
    let qos = publisher::qos_of(sp.data_qos);
    let command_results = nexus_common::metrics::counter_vec(
        &shell.telemetry.registry,
        "nexus_gateway_sparkplug_commands_total",
        "Sparkplug commands to this edge node: rebirth requests, DCMDs forwarded to the command handler, and refused ones",
        &["result"],
    )?;
    for r in ["rebirth", "forwarded", "refused"] {
        command_results.with_label_values(&[r]);
    }
    let publisher = Publisher::new(handle.clone(), buffer, settings, metrics)
        .with_live_log(publisher::LiveLog::new(live, acked))
        .with_sparkplug({
            let out = publisher::SparkplugOut::new(
                node,
                qos,
                commands,
                shell.mqtt.clone(),
                command_results,
            );
            match &sp.primary_host_id {
                Some(host) => out.with_primary_host(host),
                None => out,
            }
        })
        .with_disk_flag(
            shell
                .telemetry
                .readiness
                .condition("sparkplug_disk_writable"),
        );
    Ok((publisher, handle))
}

/// The ids of the enabled devices of a device list.
fn enabled_ids(devices: &[nexus_common::config::DeviceConfig]) -> BTreeSet<String> {
    devices
        .iter()
        .filter(|d| d.enabled)
        .map(|d| d.id.to_string())
        .collect()
}

/// Once the `stopping` poll tasks have ended, clear the retained status of the devices
/// removed from the device list or disabled (`gone`), so it does not outlive them in the
/// broker.
async fn clear_status(
    client: mqtt::MqttHandle,
    gone: Vec<String>,
    stopping: Vec<tokio::task::JoinHandle<()>>,
) {
    for t in stopping {
        let _ = t.await;
    }
    for id in gone {
        let topic = nexus_common::topic::sys::device_status(&id);
        if let Err(e) = client
            .publish(&topic, Vec::new(), mqtt::QoS::AtLeastOnce, true)
            .await
        {
            tracing::warn!(device = %id, error = %e, "cannot clear the status of a removed device");
        }
    }
}
