//! The orchestrator service: the platform's status, from the retained status topics
//! (`GET /api/v1/status`, role `viewer`), and the same live as server-sent events
//! (`GET /api/v1/status/stream`, role `viewer`): the status again whenever it changed, and a
//! notice whenever an alarm topic did.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use nexus_common::auth::http::Routes;
use nexus_common::config::{Config, Role};
use nexus_common::mqtt::QoS;
use nexus_common::service::{Shell, ShellOptions};
use nexus_common::telemetry::Telemetry;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub const SERVICE: &str = "orchestrator";

/// A status stream sends at most one status and one alarm notice per this period.
pub const STREAM_EVERY: Duration = Duration::from_millis(500);

/// Latest status payload per status topic (`service/<name>/<instance>`, `device/<id>`).
#[derive(Clone)]
pub struct StatusBoard {
    entries: Arc<RwLock<BTreeMap<String, Value>>>,
    /// Counts the changes of the entries.
    changed: Arc<watch::Sender<u64>>,
    /// Counts the messages on the alarm topics.
    alarms: Arc<watch::Sender<u64>>,
}

impl Default for StatusBoard {
    fn default() -> StatusBoard {
        StatusBoard {
            entries: Arc::default(),
            changed: Arc::new(watch::channel(0).0),
            alarms: Arc::new(watch::channel(0).0),
        }
    }
}

impl StatusBoard {
    /// Take one `$nexus/status/...` message; an empty payload removes the entry (a cleared
    /// retained topic); a payload that is not JSON is kept as text so it stays visible.
    pub fn update(&self, topic: &str, payload: &[u8]) {
        let Some(key) = topic.strip_prefix(nexus_common::topic::sys::STATUS_PREFIX) else {
            return;
        };
        {
            let mut map = self.entries.write().unwrap_or_else(|e| e.into_inner());
            if payload.is_empty() {
                map.remove(key);
            } else {
                let v = serde_json::from_slice(payload).unwrap_or_else(|_| {
                    Value::String(String::from_utf8_lossy(payload).into_owned())
                });
                map.insert(key.to_owned(), v);
            }
        }
        self.changed.send_modify(|n| *n += 1);
    }

    /// The configured devices changed (the status streams send the status again).
    pub fn touch(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Something was published on an alarm topic (`$nexus/alarms/...`).
    pub fn alarm_changed(&self) {
        self.alarms.send_modify(|n| *n += 1);
    }

    /// The status of device `id`, if one was published.
    pub fn device(&self, id: &str) -> Option<Value> {
        let map = self.entries.read().unwrap_or_else(|e| e.into_inner());
        map.get(&format!("device/{id}")).cloned()
    }

    /// The services that reported, and the `configured` devices (id, enabled) with their
    /// status: `disabled` for a disabled one, `unknown` until one is published. A status left
    /// retained by a device no longer configured is not shown.
    pub fn snapshot(&self, configured: &[(String, bool)]) -> Value {
        let map = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let mut services = serde_json::Map::new();
        for (k, v) in map.iter() {
            if let Some(s) = k.strip_prefix("service/") {
                services.insert(s.to_owned(), v.clone());
            }
        }
        let mut devices = serde_json::Map::new();
        for (id, enabled) in configured {
            let v = if !enabled {
                json!({"state": "disabled"})
            } else {
                map.get(&format!("device/{id}"))
                    .cloned()
                    .unwrap_or_else(|| json!({"state": "unknown"}))
            };
            devices.insert(id.clone(), v);
        }
        json!({"services": services, "devices": devices})
    }
}

#[derive(Clone)]
struct AppState {
    board: StatusBoard,
    platform: Value,
    devices: Arc<crate::control::DeviceFile>,
    ns: crate::live::Namespace,
}

impl AppState {
    fn status(&self) -> Value {
        let mut v = self.board.snapshot(&self.devices.configured());
        v["platform"] = self.platform.clone();
        v
    }
}

async fn status(State(s): State<AppState>) -> Json<Value> {
    Json(s.status())
}

fn status_event(app: &AppState) -> Event {
    Event::default()
        .event("status")
        .data(app.status().to_string())
}

struct StatusStream {
    app: AppState,
    status: watch::Receiver<u64>,
    alarms: watch::Receiver<u64>,
    sent_status: Instant,
    sent_alarms: Instant,
    first: bool,
    _slot: crate::live::StreamSlot,
}

/// The status now, then again whenever it changed and a notice (`alarms`) whenever an alarm
/// topic did, each at most once per [`STREAM_EVERY`]. Shares the live namespace's limit of
/// open streams.
async fn stream(State(app): State<AppState>) -> Response {
    let Some(slot) = app.ns.stream_slot() else {
        return crate::live::streams_busy();
    };
    let mut status = app.board.changed.subscribe();
    let mut alarms = app.board.alarms.subscribe();
    status.mark_unchanged();
    alarms.mark_unchanged();
    let st = StatusStream {
        app,
        status,
        alarms,
        sent_status: Instant::now(),
        sent_alarms: Instant::now(),
        first: true,
        _slot: slot,
    };
    let s = futures::stream::unfold(st, |mut st| async move {
        if st.first {
            st.first = false;
            let ev = status_event(&st.app);
            return Some((Ok::<Event, Infallible>(ev), st));
        }
        tokio::select! {
            r = st.status.changed() => {
                r.ok()?;
                // What changes meanwhile goes out with this one.
                tokio::time::sleep_until(st.sent_status + STREAM_EVERY).await;
                st.status.mark_unchanged();
                st.sent_status = Instant::now();
                let ev = status_event(&st.app);
                Some((Ok(ev), st))
            }
            r = st.alarms.changed() => {
                r.ok()?;
                tokio::time::sleep_until(st.sent_alarms + STREAM_EVERY).await;
                let n = *st.alarms.borrow_and_update();
                st.sent_alarms = Instant::now();
                Some((Ok(Event::default().event("alarms").data(n.to_string())), st))
            }
        }
    });
    Sse::new(s)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
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
    let devices = Arc::new(crate::control::DeviceFile::new(&cfg));
    let control = crate::control::ControlState::new(cfg.clone(), devices.clone(), board.clone());
    let routes = Routes::new()
        .get("/api/v1/status", Role::Viewer, status)
        .get("/api/v1/status/stream", Role::Viewer, stream)
        .with_state(AppState {
            board: board.clone(),
            platform,
            devices,
            ns: ns.clone(),
        })
        .merge(crate::control::routes(control))
        .merge(crate::live::routes(ns.clone()))
        .merge(crate::proxy::routes(crate::proxy::Upstreams::new(&cfg)?))
        .merge(crate::commands::routes(writer.clone()))
        .merge(crate::ui::routes());
    let mut opts = ShellOptions::new(SERVICE, cfg.orchestrator.http_listen);
    opts.routes = routes;
    // Status, alarm changes (a notice to the browsers), and every UNS topic for the live
    // namespace (`#` matches no `$` topic).
    opts.subscriptions = vec![
        (
            nexus_common::topic::sys::STATUS_ALL.into(),
            QoS::AtLeastOnce,
        ),
        (nexus_common::topic::sys::ALARMS_ALL.into(), QoS::AtMostOnce),
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
                    Some(t) if t.starts_with(nexus_common::topic::sys::ALARMS_PREFIX) => {
                        board.alarm_changed()
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
        b.update("$nexus/status/device/gone", br#"{"state":"online"}"#);
        b.update("$nexus/status/device/off", br#"{"state":"online"}"#);
        b.update("acme/x", b"ignored");
        let configured = [
            ("plc-1".to_owned(), true),
            ("plc-2".to_owned(), true),
            ("new".to_owned(), true),
            ("off".to_owned(), false),
        ];
        let s = b.snapshot(&configured);
        assert_eq!(s["services"]["gateway/edge-1"]["state"], "online");
        assert_eq!(s["devices"]["plc-1"]["breaker"], "open");
        assert_eq!(s["devices"]["plc-2"], "not json");
        // Not configured any more: its retained status is not shown.
        assert!(s["devices"].get("gone").is_none());
        assert_eq!(s["devices"]["off"]["state"], "disabled");
        assert_eq!(s["devices"]["new"]["state"], "unknown");
        b.update("$nexus/status/device/plc-1", b"");
        assert_eq!(
            b.snapshot(&configured)["devices"]["plc-1"]["state"],
            "unknown"
        );
    }

    #[tokio::test]
    async fn changes_are_counted_for_the_streams() {
        let b = StatusBoard::default();
        let mut status = b.changed.subscribe();
        let mut alarms = b.alarms.subscribe();
        b.update("$nexus/status/device/plc-1", br#"{"state":"online"}"#);
        b.update("acme/x", b"not a status");
        assert!(status.has_changed().unwrap());
        assert_eq!(*status.borrow_and_update(), 1);
        assert!(!alarms.has_changed().unwrap());
        b.alarm_changed();
        assert_eq!(*alarms.borrow_and_update(), 1);
    }
}
