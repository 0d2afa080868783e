//! The embedded MQTT broker: rmqtt configured in code from the `broker` section.
//!
//! rmqtt rather than rumqttd (which the first design named): rumqttd cannot subscribe or deliver
//! `$` topics, has no ACL hook and keeps its log in RAM (docs/adr/0001-embedded-broker.md).
//! rmqtt's defaults are set on purpose here: in-flight window 128 (not 16), per-client queue
//! from config with drops counted, no message expiry unless configured, retained messages
//! without TTL (rmqtt-retainer, RAM), `$share` groups (rmqtt-shared-subscription), and the
//! CPU busy check off. rmqtt has no shutdown API and `MqttServer::start` exits the process on
//! a bind error, so the broker runs on a thread with its own runtime, listeners are bound
//! before it is reported started, and stopping aborts the server and drops that runtime.

pub mod acl;

use crate::metrics::{self, MetricError};
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::sync::Arc;
use std::thread::JoinHandle;

use async_trait::async_trait;
use prometheus::{IntCounterVec, IntGauge, Registry};
use rmqtt::context::ServerContext;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType, Type};
use rmqtt::net::Builder;
use rmqtt::server::MqttServer;
use rmqtt::types::{AuthResult, PublishAclResult, SubscribeAclResult};
use tokio::sync::oneshot;

pub use acl::{Acl, Action, AuthDecision};

use crate::config::BrokerConfig;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen on {addr} ({listener}): {reason}")]
    Bind {
        listener: &'static str,
        addr: SocketAddr,
        reason: String,
    },
    #[error("broker setup failed: {0}")]
    Setup(String),
    #[error(transparent)]
    Password(#[from] acl::MissingPassword),
    #[error(transparent)]
    Metric(#[from] MetricError),
}

/// Where the broker listens (ports resolved when 0 was asked).
#[derive(Debug, Clone, Copy)]
pub struct BrokerPorts {
    pub tcp: SocketAddr,
    pub ws: Option<SocketAddr>,
    pub tls: Option<SocketAddr>,
}

/// Broker metrics: `nexus_broker_connections`, `nexus_broker_messages_dropped_total{reason}`,
/// `nexus_broker_acl_denied_total{action}`, `nexus_broker_auth_failures_total`.
#[derive(Clone)]
struct BrokerMetrics {
    connections: IntGauge,
    dropped: IntCounterVec,
    denied: IntCounterVec,
    auth_failures: prometheus::IntCounter,
}

impl BrokerMetrics {
    fn new(r: &Registry) -> Result<BrokerMetrics, MetricError> {
        let m = BrokerMetrics {
            connections: metrics::gauge(
                r,
                "nexus_broker_connections",
                "Clients connected to the embedded broker",
            )?,
            dropped: metrics::counter_vec(
                r,
                "nexus_broker_messages_dropped_total",
                "Messages the broker dropped",
                &["reason"],
            )?,
            denied: metrics::counter_vec(
                r,
                "nexus_broker_acl_denied_total",
                "Publishes and subscriptions refused by the ACL",
                &["action"],
            )?,
            auth_failures: metrics::counter(
                r,
                "nexus_broker_auth_failures_total",
                "Connections refused for bad credentials",
            )?,
        };
        // Every reason and action from the start, at 0.
        for reason in DROP_REASONS {
            m.dropped.with_label_values(&[reason]);
        }
        for action in ["publish", "subscribe"] {
            m.denied.with_label_values(&[action]);
        }
        Ok(m)
    }
}

struct Hooks {
    acl: Arc<Acl>,
    metrics: BrokerMetrics,
}

/// Every label [`drop_reason`] gives.
const DROP_REASONS: [&str; 5] = [
    "queue_full",
    "inflight_full",
    "expired",
    "publish_refused",
    "other",
];

fn drop_reason(r: &rmqtt::types::Reason) -> &'static str {
    use rmqtt::types::Reason as R;
    match r {
        R::MessageQueueFull => "queue_full",
        R::InflightWindowFull => "inflight_full",
        R::MessageExpiration => "expired",
        R::PublishResult(_) => "publish_refused",
        _ => "other",
    }
}

#[async_trait]
impl Handler for Hooks {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        match param {
            Parameter::ClientAuthenticate(info) => {
                let user = info.username().map(|u| &**u);
                let pass = info.password().map(|p| p.as_ref());
                let result = match self.acl.authenticate(user, pass) {
                    AuthDecision::Allow { superuser } => AuthResult::Allow(superuser, None),
                    AuthDecision::BadCredentials => {
                        self.metrics.auth_failures.inc();
                        tracing::warn!(client_id = %info.client_id(), username = user.unwrap_or(""), "broker refused bad credentials");
                        AuthResult::BadUsernameOrPassword
                    }
                    AuthDecision::NotAuthorized => {
                        self.metrics.auth_failures.inc();
                        AuthResult::NotAuthorized
                    }
                };
                (false, Some(HookResult::AuthResult(result)))
            }
            Parameter::MessagePublishCheckAcl(session, publish) => {
                let user = session.id.username.as_deref();
                match self.acl.check(user, Action::Publish, &publish.topic) {
                    Ok(()) => (true, acc),
                    Err(reason) => {
                        self.metrics.denied.with_label_values(&["publish"]).inc();
                        tracing::warn!(client_id = %session.id.client_id, topic = %&*publish.topic, %reason, "broker refused a publish");
                        (
                            false,
                            Some(HookResult::PublishAclResult(PublishAclResult::rejected(
                                false,
                                Some(reason.into()),
                            ))),
                        )
                    }
                }
            }
            Parameter::ClientSubscribeCheckAcl(session, sub) => {
                let user = session.id.username.as_deref();
                match self.acl.check(user, Action::Subscribe, &sub.topic_filter) {
                    Ok(()) => (true, acc),
                    Err(reason) => {
                        self.metrics.denied.with_label_values(&["subscribe"]).inc();
                        tracing::warn!(client_id = %session.id.client_id, filter = %&*sub.topic_filter, %reason, "broker refused a subscription");
                        let refused = SubscribeAclResult::new_failure(
                            rmqtt::codec::v5::SubscribeAckReason::NotAuthorized,
                        );
                        (false, Some(HookResult::SubscribeAclResult(refused)))
                    }
                }
            }
            Parameter::MessageDropped(_to, _from, _publish, reason) => {
                self.metrics
                    .dropped
                    .with_label_values(&[drop_reason(reason)])
                    .inc();
                (true, acc)
            }
            Parameter::ClientConnected(_) => {
                self.metrics.connections.inc();
                (true, acc)
            }
            Parameter::ClientDisconnected(..) => {
                self.metrics.connections.dec();
                (true, acc)
            }
            _ => (true, acc),
        }
    }
}

/// A running embedded broker. Dropping it stops it.
pub struct EmbeddedBroker {
    pub ports: BrokerPorts,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl EmbeddedBroker {
    /// Start from `cfg`, with `acl` (from [`Acl::new`], possibly with added service users).
    /// Returns once every listener is bound.
    pub fn start(
        cfg: &BrokerConfig,
        acl: Acl,
        registry: &Registry,
    ) -> Result<EmbeddedBroker, BrokerError> {
        let cfg = cfg.clone();
        let metrics = BrokerMetrics::new(registry)?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<BrokerPorts, BrokerError>>();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("nexus-broker".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("nexus-broker-rt")
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(BrokerError::Setup(e.to_string())));
                        return;
                    }
                };
                rt.block_on(async move {
                    let server = match build(&cfg, acl, metrics).await {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let (server, ports, _hooks) = server;
                    let _ = ready_tx.send(Ok(ports));
                    tokio::select! {
                        r = server.run() => {
                            if let Err(e) = r {
                                tracing::error!(error = %e, "embedded broker stopped");
                            }
                        }
                        _ = stop_rx => {}
                    }
                });
                // rmqtt has no shutdown: dropping the runtime ends its tasks.
                rt.shutdown_background();
            })
            .map_err(|e| BrokerError::Setup(e.to_string()))?;
        match ready_rx.recv() {
            Ok(Ok(ports)) => Ok(EmbeddedBroker {
                ports,
                stop: Some(stop_tx),
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err(BrokerError::Setup(
                "broker thread ended during start".into(),
            )),
        }
    }

    /// Stop and wait for the listeners to close.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

type Built = (
    rmqtt::server::MqttServer,
    BrokerPorts,
    Box<dyn rmqtt::hook::Register>,
);

fn listener_builder(cfg: &BrokerConfig, name: &str, port: u16) -> Builder {
    let inflight = NonZeroU16::new(cfg.max_inflight).unwrap_or(NonZeroU16::MIN);
    Builder::new()
        .name(name)
        .laddr(SocketAddr::new(cfg.bind, port))
        .max_connections(cfg.max_connections)
        .max_inflight(inflight)
        .max_mqueue_len(cfg.max_mqueue_len)
        .max_packet_size(cfg.max_packet_size.0.min(u32::MAX as u64) as u32)
        .message_expiry_interval(cfg.message_expiry)
        .session_expiry_interval(cfg.session_expiry)
        .max_session_expiry_interval(
            cfg.session_expiry
                .max(std::time::Duration::from_secs(7 * 24 * 3600)),
        )
        .allow_anonymous(cfg.allow_anonymous)
        .nodelay(true)
        .reuseaddr(Some(true))
}

async fn build(cfg: &BrokerConfig, acl: Acl, metrics: BrokerMetrics) -> Result<Built, BrokerError> {
    let setup = |e: rmqtt::Error| BrokerError::Setup(e.to_string());
    let retainer = format!(
        "storage.type = \"ram\"\nmax_retained_messages = {}\nmax_payload_size = \"{}B\"\nretained_message_ttl = \"0s\"\n",
        cfg.max_retained,
        cfg.max_packet_size.0
    );
    let scx = ServerContext::new()
        .busy_check_enable(false)
        .plugins_config_map_add("rmqtt-retainer", retainer)
        .plugins_config_map_add("rmqtt-shared-subscription", "")
        .build()
        .await;
    rmqtt_retainer::register(&scx, true, false)
        .await
        .map_err(setup)?;
    rmqtt_shared_subscription::register(&scx, true, false)
        .await
        .map_err(setup)?;
    let hooks = Hooks {
        acl: Arc::new(acl),
        metrics,
    };
    let register = scx.extends.hook_mgr().register();
    // Above the default priority so these decide before anything else.
    let shared = Arc::new(hooks);
    for typ in [
        Type::ClientAuthenticate,
        Type::MessagePublishCheckAcl,
        Type::ClientSubscribeCheckAcl,
        Type::MessageDropped,
        Type::ClientConnected,
        Type::ClientDisconnected,
    ] {
        register
            .add_priority(typ, 100, Box::new(SharedHooks(shared.clone())))
            .await;
    }
    register.start().await;

    let bind_err = |listener: &'static str, port: u16| {
        let addr = SocketAddr::new(cfg.bind, port);
        move |e: rmqtt::Error| BrokerError::Bind {
            listener,
            addr,
            reason: e.to_string(),
        }
    };
    let tcp = listener_builder(cfg, "tcp", cfg.port)
        .bind()
        .and_then(|l| l.tcp())
        .map_err(bind_err("tcp", cfg.port))?;
    let tcp_addr = tcp.local_addr().map_err(bind_err("tcp", cfg.port))?;
    // Listener ids must be unique; rmqtt derives them from the configured port (0 for an
    // ephemeral port) and panics on a repeat, so give fixed ids.
    let mut server = MqttServer::new(scx.clone()).listener_by_id(tcp, 1);
    let mut ports = BrokerPorts {
        tcp: tcp_addr,
        ws: None,
        tls: None,
    };
    if let Some(ws_port) = cfg.ws_port {
        let ws = listener_builder(cfg, "ws", ws_port)
            .bind()
            .and_then(|l| l.ws())
            .map_err(bind_err("websocket", ws_port))?;
        ports.ws = Some(ws.local_addr().map_err(bind_err("websocket", ws_port))?);
        server = server.listener_by_id(ws, 2);
    }
    if let Some(tls) = &cfg.tls {
        crate::install_tls_provider();
        let b = listener_builder(cfg, "tls", tls.port)
            .tls_cert(Some(tls.cert_file.display().to_string()))
            .tls_key(Some(tls.key_file.display().to_string()))
            .tls_client_ca_certs(tls.client_ca_file.as_ref().map(|p| p.display().to_string()))
            .tls_cross_certificate(tls.client_ca_file.is_some());
        let l = b
            .bind()
            .and_then(|l| l.tls())
            .map_err(bind_err("tls", tls.port))?;
        ports.tls = Some(l.local_addr().map_err(bind_err("tls", tls.port))?);
        server = server.listener_by_id(l, 3);
    }
    Ok((server.build(), ports, register))
}

struct SharedHooks(Arc<Hooks>);

#[async_trait]
impl Handler for SharedHooks {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        self.0.hook(param, acc).await
    }
}
