//! The orchestrator service: the platform's status, from the retained status topics
//! (`GET /api/v1/status`, role `viewer`).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use axum::extract::State;
use axum::Json;
use nexus_common::auth::http::Routes;
use nexus_common::config::{Config, Role};
use nexus_common::mqtt::QoS;
use nexus_common::service::{Shell, ShellOptions};
use nexus_common::telemetry::Telemetry;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

pub const SERVICE: &str = "orchestrator";

/// Latest status payload per status topic (`service/<name>/<instance>`, `device/<id>`).
#[derive(Clone, Default)]
pub struct StatusBoard {
    entries: Arc<RwLock<BTreeMap<String, Value>>>,
}

impl StatusBoard {
    /// Take one `$nexus/status/...` message; an empty payload removes the entry (a cleared
    /// retained topic); a payload that is not JSON is kept as text so it stays visible.
    pub fn update(&self, topic: &str, payload: &[u8]) {
        let Some(key) = topic.strip_prefix(nexus_common::topic::sys::STATUS_PREFIX) else {
            return;
        };
        let mut map = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if payload.is_empty() {
            map.remove(key);
            return;
        }
        let v = serde_json::from_slice(payload)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(payload).into_owned()));
        map.insert(key.to_owned(), v);
    }

    /// The status of device `id`, if one was published.
    pub fn device(&self, id: &str) -> Option<Value> {
        let map = self.entries.read().unwrap_or_else(|e| e.into_inner());
        map.get(&format!("device/{id}")).cloned()
    }

    pub fn snapshot(&self) -> Value {
        let map = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let mut services = serde_json::Map::new();
        let mut devices = serde_json::Map::new();
        for (k, v) in map.iter() {
            if let Some(s) = k.strip_prefix("service/") {
                services.insert(s.to_owned(), v.clone());
            } else if let Some(d) = k.strip_prefix("device/") {
                devices.insert(d.to_owned(), v.clone());
            }
        }
        json!({"services": services, "devices": devices})
    }
}

#[derive(Clone)]
struct AppState {
    board: StatusBoard,
    platform: Value,
}

async fn status(State(s): State<AppState>) -> Json<Value> {
    let mut v = s.board.snapshot();
    v["platform"] = s.platform.clone();
    Json(v)
}

/// Run the orchestrator service. `telemetry` lets `nexus up` add the broker's metrics to this
/// service's `/metrics`; `platform` is what `nexus up` started (ports, config).
pub async fn run_with(
    cfg: Arc<Config>,
    telemetry: Telemetry,
    platform: Value,
    ns: crate::live::Namespace,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let board = StatusBoard::default();
    let writer = crate::commands::Writer::new();
    let control = crate::control::ControlState {
        devices: Arc::new(crate::control::DeviceFile::new(&cfg)),
        board: board.clone(),
        config: cfg.clone(),
    };
    let routes = Routes::new()
        .get("/api/v1/status", Role::Viewer, status)
        .with_state(AppState {
            board: board.clone(),
            platform,
        })
        .merge(crate::control::routes(control))
        .merge(crate::live::routes(ns.clone()))
        .merge(crate::proxy::routes(crate::proxy::Upstreams::new(&cfg)?))
        .merge(crate::commands::routes(writer.clone()))
        .merge(crate::ui::routes());
    let mut opts = ShellOptions::new(SERVICE, cfg.orchestrator.http_listen);
    opts.routes = routes;
    // Status, and every UNS topic for the live namespace (`#` matches no `$` topic).
    opts.subscriptions = vec![
        (
            nexus_common::topic::sys::STATUS_ALL.into(),
            QoS::AtLeastOnce,
        ),
        ("#".into(), QoS::AtMostOnce),
        (
            format!("{}#", nexus_common::topic::sys::CMD_RESPONSE_PREFIX),
            QoS::AtLeastOnce,
        ),
    ];
    // MQTT 5 where the command handler uses it: the control center's writes then carry the
    // user they are made for.
    opts.mqtt_v5 = cfg.commands.mqtt_v5;
    opts.incoming_capacity = 16 * 1024;
    opts.telemetry = Some(telemetry);
    let mut shell = Shell::start(&cfg, opts, shutdown.clone()).await?;
    writer.set_client(shell.mqtt.clone());
    let mut rx = shell
        .incoming
        .take()
        .ok_or_else(|| anyhow::anyhow!("no incoming channel"))?;
    let batches = shutdown.child_token();
    let flusher = tokio::spawn(ns.clone().run(batches.clone()));
    loop {
        tokio::select! {
            m = rx.recv() => match m {
                Some(m) => match m.topic() {
                    Some(t) if t.starts_with(nexus_common::topic::sys::CMD_RESPONSE_PREFIX) => {
                        writer.answer(m.payload())
                    }
                    Some(t) if t.starts_with('$') => board.update(t, m.payload()),
                    Some(t) => ns.update(t, m.payload()),
                    None => {}
                },
                None => break,
            },
            _ = shutdown.cancelled() => break,
        }
    }
    batches.cancel();
    let _ = flusher.await;
    shell.stop().await;
    Ok(())
}

/// `nexus orchestrator`.
pub async fn run(cfg: Arc<Config>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let telemetry = Telemetry::new(SERVICE);
    let ns = crate::live::Namespace::new(&telemetry.registry)?;
    run_with(cfg, telemetry, json!({"mode": "standalone"}), ns, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn board_tracks_services_and_devices() {
        let b = StatusBoard::default();
        b.update(
            "$nexus/status/service/gateway/edge-1",
            br#"{"state":"online"}"#,
        );
        b.update(
            "$nexus/status/device/plc-1",
            br#"{"state":"offline","breaker":"open"}"#,
        );
        b.update("$nexus/status/device/plc-2", b"not json");
        b.update("acme/x", b"ignored");
        let s = b.snapshot();
        assert_eq!(s["services"]["gateway/edge-1"]["state"], "online");
        assert_eq!(s["devices"]["plc-1"]["breaker"], "open");
        assert_eq!(s["devices"]["plc-2"], "not json");
        b.update("$nexus/status/device/plc-1", b"");
        assert!(b.snapshot()["devices"].get("plc-1").is_none());
    }
}
