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
mod state;

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
use rmqtt::types::{AuthResult, Publish, PublishAclResult, SubscribeAclResult};
use tokio::sync::oneshot;

pub use acl::{Acl, Action, AuthDecision, Connect};

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
    Metric(#[from] MetricError),
    #[error(transparent)]
    State(#[from] state::StateError),
}

/// Where the broker listens (ports resolved when 0 was asked).
#[derive(Debug, Clone, Copy)]
pub struct BrokerPorts {
    /// Plain MQTT (None when `broker.port` is null).
    pub tcp: Option<SocketAddr>,
    pub ws: Option<SocketAddr>,
    pub tls: Option<SocketAddr>,
    /// MQTT over secure WebSocket.
    pub wss: Option<SocketAddr>,
}

impl BrokerPorts {
    /// The plain MQTT address of a broker started with one (tests, benches).
    ///
    /// # Panics
    /// When `broker.port` was null.
    pub fn tcp(&self) -> SocketAddr {
        self.tcp
            .expect("the broker was started without a plain MQTT listener")
    }
}

/// Broker metrics (docs/broker.md lists them).
#[derive(Clone)]
struct BrokerMetrics {
    connections: IntGauge,
    sessions: IntGauge,
    sessions_refused: prometheus::IntCounter,
    dropped: IntCounterVec,
    denied: IntCounterVec,
    auth_failures: prometheus::IntCounter,
    connects_refused: IntCounterVec,
    retained: IntGauge,
    retained_bytes: IntGauge,
    retained_refused: prometheus::IntCounter,
    stripped: prometheus::IntCounter,
    subscriptions_refused: prometheus::IntCounter,
    received: prometheus::IntCounter,
    delivered: prometheus::IntCounter,
    state: state::StateMetrics,
}

impl BrokerMetrics {
    fn new(r: &Registry) -> Result<BrokerMetrics, MetricError> {
        let m = BrokerMetrics {
            connections: metrics::gauge(
                r,
                "nexus_broker_connections",
                "Clients connected to the embedded broker",
            )?,
            sessions: metrics::gauge(
                r,
                "nexus_broker_sessions",
                "Sessions held, connected or kept for a disconnected client",
            )?,
            sessions_refused: metrics::counter(
                r,
                "nexus_broker_sessions_refused_total",
                "Connections refused because broker.max_sessions sessions are held",
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
            connects_refused: metrics::counter_vec(
                r,
                "nexus_broker_connects_refused_total",
                "Connections refused with good or no credentials: anonymous not allowed, a reserved client id, a forbidden last will",
                &["reason"],
            )?,
            retained: metrics::gauge(
                r,
                "nexus_broker_retained_messages",
                "Retained messages held",
            )?,
            retained_bytes: metrics::gauge(
                r,
                "nexus_broker_retained_bytes",
                "Bytes of retained payloads held",
            )?,
            retained_refused: metrics::counter(
                r,
                "nexus_broker_retained_refused_total",
                "Retained publishes delivered but not retained: broker.max_retained or max_retained_bytes reached",
            )?,
            received: metrics::counter(
                r,
                "nexus_broker_messages_received_total",
                "Publishes received from clients and last wills, refused ones included",
            )?,
            delivered: metrics::counter(
                r,
                "nexus_broker_messages_delivered_total",
                "Messages sent to subscribers (one per subscriber)",
            )?,
            stripped: metrics::counter(
                r,
                "nexus_broker_user_property_stripped_total",
                "Publishes that carried a client-set nexus-user property, removed by the broker",
            )?,
            subscriptions_refused: metrics::counter(
                r,
                "nexus_broker_subscriptions_refused_total",
                "Subscriptions refused because the session holds broker.max_subscriptions",
            )?,
            state: state::StateMetrics {
                sessions: metrics::gauge(
                    r,
                    "nexus_broker_state_sessions",
                    "Persistent sessions kept in broker.state_dir",
                )?,
                messages: metrics::gauge(
                    r,
                    "nexus_broker_state_messages",
                    "QoS 1/2 messages kept in broker.state_dir until every persistent subscriber acknowledged them",
                )?,
                errors: metrics::counter(
                    r,
                    "nexus_broker_state_errors_total",
                    "Failed writes or syncs of broker.state_dir (a publish that could not be written is refused)",
                )?,
                overflow: metrics::counter(
                    r,
                    "nexus_broker_state_overflow_total",
                    "Messages let go from the durable state because a subscriber's queue was full",
                )?,
            },
        };
        // Every reason and action from the start, at 0.
        for reason in DROP_REASONS {
            m.dropped.with_label_values(&[reason]);
        }
        for action in ["publish", "subscribe"] {
            m.denied.with_label_values(&[action]);
        }
        for reason in REFUSE_REASONS {
            m.connects_refused.with_label_values(&[reason]);
        }
        Ok(m)
    }
}

/// Every label of `nexus_broker_connects_refused_total`.
const REFUSE_REASONS: [&str; 3] = ["anonymous", "client_id", "will"];

/// The MQTT 5 user property the broker sets to the publishing client's authenticated user
/// name on `$nexus/...` publishes (commands, alarm acknowledgements), and removes from every
/// publish that a client sent with it.
pub const USER_PROPERTY: &str = "nexus-user";

/// MQTT 5 user property with which a Nexus service publishes a command for a user (the
/// control center's writes, sent by the orchestrator). The command handler takes it only from
/// a publisher the broker stamped ([`USER_PROPERTY`]) as a `service` user.
pub const ON_BEHALF_PROPERTY: &str = "nexus-on-behalf-of";

/// Retained topics and payload sizes, to hold them within the configured limits.
#[derive(Default)]
struct Retained {
    sizes: std::collections::HashMap<String, usize>,
    bytes: usize,
}

struct Hooks {
    acl: Arc<Acl>,
    metrics: BrokerMetrics,
    retained: std::sync::Mutex<Retained>,
    /// Client id -> sessions held under it (two while one takes over from the other).
    sessions: std::sync::Mutex<std::collections::HashMap<String, u32>>,
    max_retained: usize,
    max_retained_bytes: usize,
    max_sessions: usize,
    max_subscriptions: usize,
    /// Persistent sessions and retained messages kept on disk (`broker.state_dir`).
    state: Option<Arc<state::BrokerState>>,
    /// Client ids whose session has a subscription ([`EmbeddedBroker::has_subscriber`]).
    subscribed: Subscribed,
    scx: ServerContext,
}

/// Sessions held, from the per-client-id counts.
fn held(sessions: &std::collections::HashMap<String, u32>) -> i64 {
    sessions.values().map(|n| i64::from(*n)).sum()
}

impl Hooks {
    fn lock_sessions(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, u32>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn identity(&self, session: Option<&rmqtt::session::Session>) -> crate::auth::Identity {
        self.acl
            .identity(session.and_then(|s| s.id.username.as_deref()))
    }

    /// Strip a client-set user property, stamp the authenticated user on `$nexus/` topics,
    /// and hold retained messages within their limits. `None`: the publish goes on unchanged.
    /// The publisher's identity is looked up only when a stamp or a retained message needs
    /// it, not for every publish.
    fn rewrite(&self, session: Option<&rmqtt::session::Session>, p: &Publish) -> Option<Publish> {
        let identity = std::cell::OnceCell::new();
        let who = || identity.get_or_init(|| self.identity(session));
        let mut out: Option<Publish> = None;
        let forged = p.properties.as_ref().is_some_and(|props| {
            props
                .user_properties
                .iter()
                .any(|(k, _)| &**k == USER_PROPERTY)
        });
        if forged {
            self.metrics.stripped.inc();
            let q = out.get_or_insert_with(|| p.clone());
            if let Some(props) = q.inner.properties.as_mut() {
                props.user_properties.retain(|(k, _)| &**k != USER_PROPERTY);
            }
        }
        if p.topic.starts_with(crate::topic::sys::NEXUS_PREFIX) {
            let q = out.get_or_insert_with(|| p.clone());
            q.inner
                .properties
                .get_or_insert_with(Default::default)
                .user_properties
                .push((USER_PROPERTY.into(), who().name.as_str().into()));
        }
        if p.retain
            && self.acl.check(who(), Action::Publish, &p.topic).is_ok()
            && !self.retain(who(), p)
        {
            out.get_or_insert_with(|| p.clone()).inner.retain = false;
        }
        out
    }

    /// Account for a retained publish; false when it may not be retained.
    fn retain(&self, who: &crate::auth::Identity, p: &Publish) -> bool {
        let mut r = self.retained.lock().unwrap_or_else(|e| e.into_inner());
        let len = p.payload.len();
        let old = r.sizes.get(&*p.topic).copied();
        if len == 0 {
            // An empty retained payload deletes the topic's retained message.
            if let Some(old) = old {
                r.sizes.remove(&*p.topic);
                r.bytes -= old;
            }
        } else {
            let bytes = r.bytes - old.unwrap_or(0) + len;
            let count = r.sizes.len() + usize::from(old.is_none());
            let service = who.role == crate::config::Role::Service;
            if !service && (count > self.max_retained || bytes > self.max_retained_bytes) {
                self.metrics.retained_refused.inc();
                return false;
            }
            r.sizes.insert(p.topic.to_string(), len);
            r.bytes = bytes;
        }
        self.metrics.retained.set(r.sizes.len() as i64);
        self.metrics.retained_bytes.set(r.bytes as i64);
        true
    }
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

impl Hooks {
    /// The hooks of every message: no I/O, so no future of their own (rmqtt calls several
    /// per message; a large boxed future each cost as much as the rest of the hooks).
    fn per_message(&self, param: &Parameter<'_>, acc: Option<HookResult>) -> ReturnType {
        match param {
            Parameter::MessagePublish(session, from, publish) => {
                self.metrics.received.inc();
                let rewritten = self.rewrite(*session, publish);
                // A last will is not checked by the publish ACL hook (its topic was at
                // CONNECT): it is made durable here. Other publishes once the ACL allowed them.
                if let (Some(st), rmqtt::types::FromType::LastWill) = (&self.state, from.typ()) {
                    st.publish(
                        from,
                        &from.id.client_id,
                        rewritten.as_ref().unwrap_or(publish),
                    );
                }
                match rewritten {
                    Some(p) => (true, Some(HookResult::Publish(p))),
                    None => (true, acc),
                }
            }
            Parameter::MessagePublishCheckAcl(session, publish) => {
                let who = self.identity(Some(session));
                match self.acl.check(&who, Action::Publish, &publish.topic) {
                    Ok(()) => match &self.state {
                        Some(st) => {
                            let from = rmqtt::types::From::from_custom(session.id.clone());
                            if st.publish(&from, &session.id.client_id, publish) {
                                (true, acc)
                            } else {
                                // Not durable: not acknowledged. The client sends it again.
                                (
                                    false,
                                    Some(HookResult::PublishAclResult(
                                        PublishAclResult::rejected(
                                            true,
                                            Some("the broker cannot write its state (broker.state_dir); try again later".into()),
                                        ),
                                    )),
                                )
                            }
                        }
                        None => (true, acc),
                    },
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
            Parameter::MessageDelivered(..) => {
                self.metrics.delivered.inc();
                (true, acc)
            }
            Parameter::MessageDropped(to, _from, publish, reason) => {
                self.metrics
                    .dropped
                    .with_label_values(&[drop_reason(reason)])
                    .inc();
                if let (Some(st), Some(to)) = (&self.state, to) {
                    st.settled(&to.client_id, publish);
                }
                (true, acc)
            }
            Parameter::MessageAcked(s, _from, p) => {
                if let Some(st) = &self.state {
                    st.settled(&s.id.client_id, p);
                }
                (true, acc)
            }
            _ => (true, acc),
        }
    }

    /// The other hooks (connections, subscriptions, sessions, start).
    async fn handle(&self, param: &Parameter<'_>, acc: Option<HookResult>) -> ReturnType {
        match param {
            Parameter::ClientAuthenticate(info) => {
                let user = info.username().map(|u| &**u);
                let will_topic = info.last_will().map(|w| match w {
                    rmqtt::types::LastWill::V3(w) => w.topic.to_string(),
                    rmqtt::types::LastWill::V5(w) => w.topic.to_string(),
                });
                let connect = acl::Connect {
                    client_id: info.client_id(),
                    username: user,
                    password: info.password().map(|p| p.as_ref()),
                    peer: info.id().remote_addr.map(|a| a.ip()),
                    will_topic: will_topic.as_deref(),
                };
                let result = match self.acl.authenticate(connect).await {
                    AuthDecision::Allow(_) => AuthResult::Allow(false, None),
                    AuthDecision::BadCredentials => {
                        self.metrics.auth_failures.inc();
                        tracing::warn!(client_id = %info.client_id(), username = user.unwrap_or(""), "broker refused bad credentials");
                        AuthResult::BadUsernameOrPassword
                    }
                    AuthDecision::NotAuthorized(reason) => {
                        let label = if reason.starts_with("anonymous") {
                            "anonymous"
                        } else if reason.starts_with("last will") {
                            "will"
                        } else {
                            "client_id"
                        };
                        self.metrics
                            .connects_refused
                            .with_label_values(&[label])
                            .inc();
                        tracing::warn!(client_id = %info.client_id(), username = user.unwrap_or(""), %reason, "broker refused a connection");
                        AuthResult::NotAuthorized
                    }
                };
                (false, Some(HookResult::AuthResult(result)))
            }
            Parameter::ClientSubscribeCheckAcl(session, sub) => {
                let who = self.identity(Some(session));
                // rmqtt hands over `$share/<group>/<filter>` split in two; the ACL sees it whole.
                let filter = match sub.opts.shared_group() {
                    Some(group) => format!("$share/{group}/{}", sub.topic_filter),
                    None => sub.topic_filter.to_string(),
                };
                // Each subscription is state the broker holds for the client, and the durable
                // state matches every publish against a persistent session's: bounded.
                let held = match session.subscriptions().await {
                    Ok(subs) => {
                        let n = subs.len().await;
                        let again = subs
                            .read()
                            .await
                            .get(&sub.topic_filter)
                            .is_some_and(|o| o.shared_group() == sub.opts.shared_group());
                        if again {
                            0
                        } else {
                            n
                        }
                    }
                    Err(_) => 0,
                };
                if held >= self.max_subscriptions {
                    self.metrics.subscriptions_refused.inc();
                    tracing::warn!(client_id = %session.id.client_id, %filter, max_subscriptions = self.max_subscriptions, "broker refused a subscription: broker.max_subscriptions reached");
                    let refused = SubscribeAclResult::new_failure(
                        rmqtt::codec::v5::SubscribeAckReason::QuotaExceeded,
                    );
                    return (false, Some(HookResult::SubscribeAclResult(refused)));
                }
                match self.acl.check(&who, Action::Subscribe, &filter) {
                    Ok(()) => (true, acc),
                    Err(reason) => {
                        self.metrics.denied.with_label_values(&["subscribe"]).inc();
                        tracing::warn!(client_id = %session.id.client_id, %filter, %reason, "broker refused a subscription");
                        let refused = SubscribeAclResult::new_failure(
                            rmqtt::codec::v5::SubscribeAckReason::NotAuthorized,
                        );
                        (false, Some(HookResult::SubscribeAclResult(refused)))
                    }
                }
            }
            Parameter::SessionCreated(s) => {
                {
                    let mut sessions = self.lock_sessions();
                    *sessions.entry(s.id.client_id.to_string()).or_default() += 1;
                    self.metrics.sessions.set(held(&sessions));
                }
                if let Some(st) = &self.state {
                    if let Ok(conn) = s.connect_info().await {
                        st.session(s, &conn, true);
                    }
                }
                (true, acc)
            }
            Parameter::SessionTerminated(s, _) => {
                if let Some(st) = &self.state {
                    st.terminated(&s.id);
                }
                self.subscribed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&*s.id.client_id);
                let mut sessions = self.lock_sessions();
                let id = s.id.client_id.to_string();
                if let Some(n) = sessions.get_mut(&id) {
                    *n -= 1;
                    if *n == 0 {
                        sessions.remove(&id);
                    }
                }
                self.metrics.sessions.set(held(&sessions));
                (true, acc)
            }
            Parameter::ClientConnect(info) => {
                // rmqtt refuses a new client at broker.max_sessions right after this hook,
                // without calling another: count it here.
                let sessions = self.lock_sessions();
                if held(&sessions) >= self.max_sessions as i64
                    && !sessions.contains_key(&**info.client_id())
                {
                    self.metrics.sessions_refused.inc();
                    tracing::warn!(client_id = %info.client_id(), max_sessions = self.max_sessions, "broker refused a new session: broker.max_sessions reached");
                }
                (true, acc)
            }
            Parameter::ClientConnected(s) => {
                self.metrics.connections.inc();
                if let Some(st) = &self.state {
                    if let Ok(conn) = s.connect_info().await {
                        st.session(s, &conn, false);
                    }
                }
                (true, acc)
            }
            Parameter::ClientDisconnected(s, _) => {
                self.metrics.connections.dec();
                if let Some(st) = &self.state {
                    st.disconnected(&s.id.client_id);
                }
                (true, acc)
            }
            Parameter::SessionSubscribed(s, sub) => {
                self.subscribed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(s.id.client_id.to_string());
                if let Some(st) = &self.state {
                    st.subscribed(&s.id.client_id, &sub.topic_filter, &sub.opts);
                }
                (true, acc)
            }
            Parameter::SessionUnsubscribed(s, unsub) => {
                if let Some(st) = &self.state {
                    st.unsubscribed(
                        &s.id.client_id,
                        &unsub.topic_filter,
                        unsub.shared_group.as_deref(),
                    );
                }
                (true, acc)
            }
            Parameter::BeforeStartup => {
                if let Some(st) = &self.state {
                    let restored = st.restore(&self.scx).await;
                    self.subscribed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend(restored.sessions.iter().cloned());
                    let mut sessions = self.lock_sessions();
                    for client in restored.sessions {
                        *sessions.entry(client).or_default() += 1;
                    }
                    self.metrics.sessions.set(held(&sessions));
                    let mut r = self.retained.lock().unwrap_or_else(|e| e.into_inner());
                    for (topic, len) in restored.retained {
                        r.bytes += len;
                        if let Some(old) = r.sizes.insert(topic, len) {
                            r.bytes -= old;
                        }
                    }
                    self.metrics.retained.set(r.sizes.len() as i64);
                    self.metrics.retained_bytes.set(r.bytes as i64);
                }
                (true, acc)
            }
            _ => (true, acc),
        }
    }
}

/// A running embedded broker. Dropping it stops it.
pub struct EmbeddedBroker {
    pub ports: BrokerPorts,
    subscribed: Subscribed,
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
        let subscribed = Subscribed::default();
        let subscribed_in = subscribed.clone();
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
                    let server = match build(&cfg, acl, metrics, subscribed_in).await {
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
                subscribed,
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

    /// Whether the session of `client_id` holds a subscription (made since the start, or
    /// restored from the durable state).
    pub fn has_subscriber(&self, client_id: &str) -> bool {
        self.subscribed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(client_id)
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

/// Longest client id accepted (MQTT's 23 is a floor servers may raise; 128 fits instance
/// names and UUIDs).
const MAX_CLIENT_ID_LEN: usize = 128;

fn listener_builder(cfg: &BrokerConfig, name: &str, port: u16) -> Builder {
    let inflight = NonZeroU16::new(cfg.max_inflight).unwrap_or(NonZeroU16::MIN);
    Builder::new()
        .name(name)
        .laddr(SocketAddr::new(cfg.bind, port))
        .max_connections(cfg.max_connections)
        .max_inflight(inflight)
        .max_topic_aliases(cfg.max_topic_aliases)
        .max_mqueue_len(cfg.max_mqueue_len)
        .max_clientid_len(MAX_CLIENT_ID_LEN)
        .max_packet_size(cfg.max_packet_size.0.min(u32::MAX as u64) as u32)
        .message_expiry_interval(cfg.message_expiry)
        .session_expiry_interval(cfg.session_expiry)
        .max_session_expiry_interval(cfg.max_session_expiry)
        // rmqtt would let a client without a user name in before the authentication hook
        // runs; off, the hook decides every CONNECT (auth.anonymous, client ids, wills).
        .allow_anonymous(false)
        .nodelay(true)
        .quickack(cfg.quickack)
        .reuseaddr(Some(true))
}

type Subscribed = Arc<std::sync::Mutex<std::collections::HashSet<String>>>;

async fn build(
    cfg: &BrokerConfig,
    acl: Acl,
    metrics: BrokerMetrics,
    subscribed: Subscribed,
) -> Result<Built, BrokerError> {
    let setup = |e: rmqtt::Error| BrokerError::Setup(e.to_string());
    // The retainer's own count limit would also refuse updates of topics it already holds once
    // full (a device's value would freeze); the limits are enforced in the hooks instead.
    let retainer = format!(
        "storage.type = \"ram\"\nmax_retained_messages = 0\nmax_payload_size = \"{}B\"\nretained_message_ttl = \"0s\"\n",
        cfg.max_packet_size.0
    );
    let scx = ServerContext::new()
        .busy_check_enable(false)
        .mqtt_max_sessions(isize::try_from(cfg.max_sessions).unwrap_or(isize::MAX))
        .plugins_config_map_add("rmqtt-retainer", retainer)
        .plugins_config_map_add("rmqtt-shared-subscription", "strategy = \"round_robin\"\n")
        .build()
        .await;
    rmqtt_retainer::register(&scx, true, false)
        .await
        .map_err(setup)?;
    rmqtt_shared_subscription::register(&scx, true, false)
        .await
        .map_err(setup)?;
    let acl = Arc::new(acl);
    *scx.extends.fitter_mgr_mut().await = Box::new(Fitters {
        acl: acl.clone(),
        service_mqueue_len: cfg.service_mqueue_len,
        service_max_inflight: NonZeroU16::new(cfg.service_max_inflight).unwrap_or(NonZeroU16::MIN),
    });
    let state = match &cfg.state_dir {
        Some(dir) => {
            let max_body = u32::try_from(cfg.max_packet_size.0)
                .unwrap_or(u32::MAX)
                .saturating_add(64 * 1024);
            let cap = cfg.max_mqueue_len.max(cfg.service_mqueue_len)
                + usize::from(cfg.max_inflight.max(cfg.service_max_inflight))
                + state::SLACK;
            let st = state::BrokerState::open(
                dir,
                max_body,
                cap,
                cfg.state_sync,
                metrics.state.clone(),
            )?;
            Some(Arc::new(st))
        }
        None => None,
    };
    if let (Some(st), false) = (&state, cfg.state_sync.is_zero()) {
        let st = st.clone();
        let every = cfg.state_sync;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let st = st.clone();
                let _ = tokio::task::spawn_blocking(move || st.sync()).await;
            }
        });
    }
    let hooks = Hooks {
        acl,
        metrics,
        retained: Default::default(),
        sessions: Default::default(),
        max_retained: cfg.max_retained,
        max_retained_bytes: usize::try_from(cfg.max_retained_bytes.0).unwrap_or(usize::MAX),
        max_sessions: cfg.max_sessions,
        max_subscriptions: cfg.max_subscriptions,
        state,
        scx: scx.clone(),
        subscribed,
    };
    let register = scx.extends.hook_mgr().register();
    // Above the default priority so these decide before anything else.
    let shared = Arc::new(hooks);
    for typ in [
        Type::ClientAuthenticate,
        Type::ClientConnect,
        Type::MessagePublish,
        Type::MessagePublishCheckAcl,
        Type::ClientSubscribeCheckAcl,
        Type::MessageDropped,
        Type::MessageDelivered,
        Type::SessionCreated,
        Type::SessionTerminated,
        Type::ClientConnected,
        Type::ClientDisconnected,
        Type::SessionSubscribed,
        Type::SessionUnsubscribed,
        Type::MessageAcked,
        Type::BeforeStartup,
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
    // Listener ids must be unique; rmqtt derives them from the configured port (0 for an
    // ephemeral port) and panics on a repeat, so give fixed ids.
    let mut server = MqttServer::new(scx.clone());
    let mut ports = BrokerPorts {
        tcp: None,
        ws: None,
        tls: None,
        wss: None,
    };
    if let Some(port) = cfg.port {
        let tcp = listener_builder(cfg, "tcp", port)
            .bind()
            .and_then(|l| l.tcp())
            .map_err(bind_err("tcp", port))?;
        ports.tcp = Some(tcp.local_addr().map_err(bind_err("tcp", port))?);
        server = server.listener_by_id(tcp, 1);
    }
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
        let secure = |name: &str, port: u16| {
            listener_builder(cfg, name, port)
                .tls_cert(Some(tls.cert_file.display().to_string()))
                .tls_key(Some(tls.key_file.display().to_string()))
                .tls_client_ca_certs(tls.client_ca_file.as_ref().map(|p| p.display().to_string()))
                .tls_cross_certificate(tls.client_ca_file.is_some())
        };
        let l = secure("tls", tls.port)
            .bind()
            .and_then(|l| l.tls())
            .map_err(bind_err("tls", tls.port))?;
        ports.tls = Some(l.local_addr().map_err(bind_err("tls", tls.port))?);
        server = server.listener_by_id(l, 3);
        if let Some(wss_port) = tls.ws_port {
            let l = secure("wss", wss_port)
                .bind()
                .and_then(|l| l.wss())
                .map_err(bind_err("secure websocket", wss_port))?;
            ports.wss = Some(
                l.local_addr()
                    .map_err(bind_err("secure websocket", wss_port))?,
            );
            server = server.listener_by_id(l, 4);
        }
    }
    Ok((server.build(), ports, register))
}

/// Per-client settings rmqtt asks for at each connection: a Nexus service's session may queue
/// `broker.service_mqueue_len` messages and have `broker.service_max_inflight` in flight to
/// it, every other client `broker.max_mqueue_len` and `broker.max_inflight`. (The window a
/// client may use towards the broker, the CONNACK's Receive Maximum, is the listener's
/// `broker.max_inflight` for everyone.)
struct Fitters {
    acl: Arc<Acl>,
    service_mqueue_len: usize,
    service_max_inflight: NonZeroU16,
}

impl rmqtt::fitter::FitterManager for Fitters {
    fn create(
        &self,
        conn: Arc<rmqtt::types::ConnectInfo>,
        id: rmqtt::types::Id,
        cfg: rmqtt::types::ListenerConfig,
    ) -> rmqtt::types::FitterType {
        // The fitter is made after authentication: the user name here is the proven one.
        let service =
            self.acl.identity(conn.username().map(|u| &**u)).role == crate::config::Role::Service;
        let cfg = if service {
            let mut own = (*cfg).clone();
            own.max_mqueue_len = self.service_mqueue_len;
            own.max_inflight = self.service_max_inflight;
            Arc::new(own)
        } else {
            cfg
        };
        Arc::new(rmqtt::fitter::DefaultFitter::new(conn, id, cfg))
    }
}

struct SharedHooks(Arc<Hooks>);

#[async_trait]
impl Handler for SharedHooks {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        match param {
            Parameter::MessagePublish(..)
            | Parameter::MessagePublishCheckAcl(..)
            | Parameter::MessageDelivered(..)
            | Parameter::MessageDropped(..)
            | Parameter::MessageAcked(..) => self.0.per_message(param, acc),
            // Boxed: its future is large (authentication, restoring the state), and this one
            // stays small for the per-message calls above.
            _ => Box::pin(self.0.handle(param, acc)).await,
        }
    }
}
