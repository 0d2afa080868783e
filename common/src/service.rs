//! The shell every Nexus service runs in: its MQTT client (with a last will that marks the
//! service offline), the retained `$nexus/status/service/<service>/<instance>` topic, readiness
//! tied to the broker connection, and the HTTP server with `/healthz`, `/readyz`, `/metrics`
//! plus the service's own routes, behind the guard of [`crate::http`] and the authentication
//! of [`crate::auth::http`] (users and tokens of `auth`, resolved once per shell).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::auth::http::Routes;
use crate::auth::{AuthSetupError, Identities};
use crate::config::Config;
use crate::http::HttpLimits;
use crate::mqtt::{self, ClientSettings, Message, MqttHandle, MqttMetrics, QoS, Will};
use crate::now_ms;
use crate::telemetry::{self, Telemetry};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The service status payload of the contract.
pub fn status_payload(state: &str) -> Vec<u8> {
    status_payload_with(state, None)
}

/// The service status with the service's own figures under `stats` (docs/contract.md,
/// "Status topics").
pub fn status_payload_with(state: &str, stats: Option<serde_json::Value>) -> Vec<u8> {
    let mut v = serde_json::json!({"state": state, "version": VERSION, "ts": now_ms()});
    if let Some(stats) = stats {
        v["stats"] = stats;
    }
    v.to_string().into_bytes()
}

/// What a service adds to its status: called at each (re)connect and every
/// [`StatusStats::every`] while connected.
#[derive(Clone)]
pub struct StatusStats {
    pub every: Duration,
    pub read: Arc<dyn Fn() -> serde_json::Value + Send + Sync>,
}

/// A running service shell.
pub struct Shell {
    pub service: &'static str,
    pub instance: String,
    pub telemetry: Telemetry,
    pub mqtt: MqttHandle,
    /// The MQTT client id of `mqtt`.
    pub client_id: String,
    pub mqtt_metrics: MqttMetrics,
    /// Incoming publishes for the subscriptions given at start.
    pub incoming: Option<mpsc::Receiver<Message>>,
    /// Where the HTTP server listens.
    pub http_addr: SocketAddr,
    http: JoinHandle<std::io::Result<()>>,
    status: JoinHandle<()>,
    mqtt_stop: CancellationToken,
}

/// What a service asks of its shell.
pub struct ShellOptions {
    pub service: &'static str,
    pub http_listen: SocketAddr,
    /// The service's routes, each with the role it needs.
    pub routes: Routes,
    pub subscriptions: Vec<(String, QoS)>,
    pub manual_acks: bool,
    pub incoming_capacity: usize,
    /// Use this telemetry (with metrics the service registered already) instead of a new one.
    pub telemetry: Option<Telemetry>,
    /// TCP_NODELAY on the MQTT connection (default true; see [`ClientSettings`]).
    pub tcp_nodelay: bool,
    /// A clean MQTT session instead of `mqtt.persistent_session` (default false).
    pub clean_session: bool,
    /// MQTT 5 whatever `mqtt.version` says (default false).
    pub mqtt_v5: bool,
    /// Body limit and request timeout of the HTTP port (default: [`HttpLimits::default`]).
    pub http_limits: HttpLimits,
    /// Figures published with the service's status (default: none).
    pub status_stats: Option<StatusStats>,
}

impl ShellOptions {
    pub fn new(service: &'static str, http_listen: SocketAddr) -> ShellOptions {
        ShellOptions {
            service,
            http_listen,
            routes: Routes::new(),
            subscriptions: Vec::new(),
            manual_acks: false,
            incoming_capacity: 1024,
            telemetry: None,
            tcp_nodelay: true,
            clean_session: false,
            mqtt_v5: false,
            http_limits: HttpLimits::default(),
            status_stats: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    #[error(transparent)]
    Mqtt(#[from] mqtt::MqttError),
    #[error(transparent)]
    Metric(#[from] crate::metrics::MetricError),
    /// A user or token of `auth` cannot be set up (e.g. its environment variable is unset).
    #[error(transparent)]
    Auth(#[from] AuthSetupError),
    #[error("cannot serve HTTP on {addr}: {source}")]
    Http {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The MQTT client id of a Nexus service: `<mqtt.client_id_prefix>-<service>-<instance>`.
pub fn service_client_id(cfg: &Config, service: &str) -> String {
    format!(
        "{}-{}-{}",
        cfg.mqtt.client_id_prefix,
        service,
        cfg.telemetry.instance_name()
    )
}

impl Shell {
    pub async fn start(
        cfg: &Config,
        opts: ShellOptions,
        shutdown: CancellationToken,
    ) -> Result<Shell, ShellError> {
        let instance = cfg.telemetry.instance_name();
        // First: a missing password variable stops the service before it connects anywhere.
        let ids = Arc::new(Identities::new(&cfg.auth)?);
        let telemetry = opts
            .telemetry
            .unwrap_or_else(|| Telemetry::new(opts.service));
        let mqtt_metrics = telemetry.mqtt_metrics()?;
        let topic = crate::topic::sys::service_status(opts.service, &instance);
        let client_id = service_client_id(cfg, opts.service);
        let mut settings = ClientSettings::new(client_id.clone());
        settings.will = Some(Will {
            topic: topic.clone(),
            payload: status_payload("offline").into(),
            qos: QoS::AtLeastOnce,
            retain: true,
        });
        settings.subscriptions = opts.subscriptions;
        settings.manual_acks = opts.manual_acks;
        settings.incoming_capacity = opts.incoming_capacity;
        settings.tcp_nodelay = opts.tcp_nodelay;
        // The client outlives `shutdown` so that "offline" can be published in `stop`.
        let mqtt_stop = CancellationToken::new();
        let mut mqtt_cfg = std::borrow::Cow::Borrowed(&cfg.mqtt);
        if opts.clean_session {
            mqtt_cfg.to_mut().persistent_session = false;
        }
        if opts.mqtt_v5 {
            mqtt_cfg.to_mut().version = crate::config::MqttVersion::V5;
        }
        let (handle, incoming) =
            mqtt::connect(&mqtt_cfg, settings, Some(&mqtt_metrics), mqtt_stop.clone())?;

        // Readiness follows the connection; every (re)connect republishes "online", and the
        // service's figures are republished with it every `stats.every`.
        let ready = telemetry.readiness.condition("broker");
        let status = {
            let handle = handle.clone();
            let mut connected = handle.connected();
            let shutdown = shutdown.clone();
            let topic = topic.clone();
            let stats = opts.status_stats;
            tokio::spawn(async move {
                let every = stats
                    .as_ref()
                    .map_or(Duration::from_secs(3600), |s| s.every)
                    .max(Duration::from_millis(100));
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.reset();
                loop {
                    let up = *connected.borrow_and_update();
                    ready.set(up);
                    if up {
                        let figures = stats.as_ref().map(|s| (s.read)());
                        if let Err(e) = handle
                            .publish(
                                &topic,
                                status_payload_with("online", figures),
                                QoS::AtLeastOnce,
                                true,
                            )
                            .await
                        {
                            tracing::warn!(error = %e, "cannot publish service status");
                        }
                    }
                    tokio::select! {
                        r = connected.changed() => if r.is_err() { break },
                        _ = tick.tick(), if stats.is_some() => {}
                        _ = shutdown.cancelled() => break,
                    }
                }
            })
        };

        let app =
            crate::http::service_router_for(&telemetry, opts.routes, opts.http_limits, ids, cfg)?;
        let (http_addr, http) =
            telemetry::serve_as(opts.http_listen, app, &cfg.http, shutdown.clone())
                .await
                .map_err(|source| ShellError::Http {
                    addr: opts.http_listen,
                    source,
                })?;
        tracing::info!(service = opts.service, %instance, http = %http_addr, broker = %format!("{}:{}", cfg.mqtt.host, cfg.mqtt.effective_port()), "service started");
        Ok(Shell {
            service: opts.service,
            instance,
            telemetry,
            mqtt: handle,
            client_id,
            mqtt_metrics,
            incoming: Some(incoming),
            http_addr,
            http,
            status,
            mqtt_stop,
        })
    }

    /// Publish "offline", disconnect cleanly and stop the HTTP server. Call after the
    /// shutdown token was cancelled and the service drained its own work.
    pub async fn stop(mut self) {
        let topic = crate::topic::sys::service_status(self.service, &self.instance);
        if self.mqtt.is_connected() {
            let _ = self
                .mqtt
                .publish(&topic, status_payload("offline"), QoS::AtLeastOnce, true)
                .await;
            // Give the publish a moment to leave before the DISCONNECT.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.mqtt.disconnect().await;
        self.mqtt_stop.cancel();
        self.status.abort();
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.http).await;
        tracing::info!(service = self.service, "service stopped");
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        self.mqtt_stop.cancel();
    }
}
