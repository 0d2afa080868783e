//! MQTT client helper on rumqttc, one API over MQTT 3.1.1 and 5.
//!
//! [`connect`] returns a [`MqttHandle`] to publish, subscribe and ack, and a bounded receiver of
//! incoming [`Message`]s. A task owns rumqttc's event loop and does nothing slow in it: it
//! forwards publishes into the channel (awaiting when the consumer is behind, which stops
//! reading from the socket: back-pressure reaches the broker instead of memory growing),
//! re-subscribes when a session was not kept, and on connection errors sleeps a jittered
//! exponential backoff before polling again (rumqttc would reconnect at once otherwise).
//! What a failed connection had not got acknowledged (and what was still queued) is resent
//! after the reconnect, in order, even when the broker lost the session: rumqttc alone drops
//! it then, and a restarted broker would lose every publish that was in flight.
//!
//! Persistent sessions are the default (`clean_session=false`; MQTT 5: `clean_start=false`
//! plus a session expiry), because rumqttc with a clean session drops queued and in-flight
//! messages on reconnect: 1,100 messages were lost in a broker-kill test with
//! `clean_session=true` and none without; MQTT 5 needs `clean_start=false` and a session
//! expiry, or nothing is redelivered. With `manual_acks`, a QoS 1/2 message is acked only
//! when the consumer calls [`MqttHandle::ack`], so a crash before that means redelivery.

use crate::metrics::{self, MetricError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Registry};
use rumqttc::v5::mqttbytes::v5 as v5b;
use rumqttc::v5::mqttbytes::QoS as V5QoS;
use tokio::sync::{mpsc, watch, Mutex};
use tokio_util::sync::CancellationToken;

use crate::config::{MqttConfig, MqttVersion};
use crate::supervise::backoff;

pub use rumqttc::QoS;

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("cannot read TLS file {path}: {source}")]
    TlsFile {
        path: String,
        source: std::io::Error,
    },
    #[error("MQTT client request failed: {0}")]
    Client(String),
    #[error("not connected to the broker within {0:?}")]
    ConnectTimeout(Duration),
    #[error("the MQTT client has stopped")]
    Closed,
}

/// Last will: published by the broker if the client vanishes without disconnecting.
#[derive(Debug, Clone)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
}

/// A last will made anew for each connection (Sparkplug's NDEATH carries a `bdSeq` that
/// changes with every CONNECT).
#[derive(Clone)]
pub struct WillSource(pub Arc<dyn Fn() -> Will + Send + Sync>);

impl std::fmt::Debug for WillSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WillSource")
    }
}

/// What one client is for.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// Full client id (unique per broker).
    pub client_id: String,
    pub will: Option<Will>,
    /// Called before every connection attempt for that connection's will (overrides `will`).
    pub will_source: Option<WillSource>,
    /// Ack QoS 1/2 messages only when told (see [`MqttHandle::ack`]).
    pub manual_acks: bool,
    /// Subscriptions made at every (re)connect that did not keep a session.
    pub subscriptions: Vec<(String, QoS)>,
    /// Capacity of the incoming message channel.
    pub incoming_capacity: usize,
    /// TCP_NODELAY (default true): without it a small publish can wait ~40 ms for a delayed
    /// ACK; throughput-bound publishers may turn it off to let the kernel coalesce packets.
    pub tcp_nodelay: bool,
}

impl ClientSettings {
    pub fn new(client_id: impl Into<String>) -> ClientSettings {
        ClientSettings {
            client_id: client_id.into(),
            will: None,
            will_source: None,
            manual_acks: false,
            subscriptions: Vec::new(),
            incoming_capacity: 1024,
            tcp_nodelay: true,
        }
    }
}

#[derive(Debug, Clone)]
enum Raw {
    V4(rumqttc::Publish),
    V5(v5b::Publish),
}

/// An incoming publish.
#[derive(Debug, Clone)]
pub struct Message {
    raw: Raw,
}

impl Message {
    /// The topic; `None` if it is not UTF-8 (MQTT requires UTF-8, so this is a broken peer).
    pub fn topic(&self) -> Option<&str> {
        match &self.raw {
            Raw::V4(p) => Some(p.topic.as_str()),
            Raw::V5(p) => std::str::from_utf8(&p.topic).ok(),
        }
    }

    pub fn topic_bytes(&self) -> &[u8] {
        match &self.raw {
            Raw::V4(p) => p.topic.as_bytes(),
            Raw::V5(p) => &p.topic,
        }
    }

    pub fn payload(&self) -> &Bytes {
        match &self.raw {
            Raw::V4(p) => &p.payload,
            Raw::V5(p) => &p.payload,
        }
    }

    pub fn qos(&self) -> QoS {
        match &self.raw {
            Raw::V4(p) => p.qos,
            Raw::V5(p) => match p.qos {
                V5QoS::AtMostOnce => QoS::AtMostOnce,
                V5QoS::AtLeastOnce => QoS::AtLeastOnce,
                V5QoS::ExactlyOnce => QoS::ExactlyOnce,
            },
        }
    }

    pub fn retain(&self) -> bool {
        match &self.raw {
            Raw::V4(p) => p.retain,
            Raw::V5(p) => p.retain,
        }
    }

    /// MQTT 5 Response Topic, if the sender gave one.
    pub fn response_topic(&self) -> Option<&str> {
        match &self.raw {
            Raw::V4(_) => None,
            Raw::V5(p) => p.properties.as_ref()?.response_topic.as_deref(),
        }
    }

    /// MQTT 5 Correlation Data, if the sender gave it.
    pub fn correlation_data(&self) -> Option<&Bytes> {
        match &self.raw {
            Raw::V4(_) => None,
            Raw::V5(p) => p.properties.as_ref()?.correlation_data.as_ref(),
        }
    }

    /// The value of the MQTT 5 user property `key` (the first, if the sender repeated it).
    pub fn user_property(&self, key: &str) -> Option<&str> {
        match &self.raw {
            Raw::V4(_) => None,
            Raw::V5(p) => p
                .properties
                .as_ref()?
                .user_properties
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str()),
        }
    }

    /// Every value of the MQTT 5 user property `key`.
    pub fn user_properties(&self, key: &str) -> Vec<&str> {
        match &self.raw {
            Raw::V4(_) => Vec::new(),
            Raw::V5(p) => p.properties.as_ref().map_or_else(Vec::new, |props| {
                props
                    .user_properties
                    .iter()
                    .filter(|(k, _)| k == key)
                    .map(|(_, v)| v.as_str())
                    .collect()
            }),
        }
    }

    /// A message built in code (tests, loopback).
    pub fn new_v4(topic: &str, payload: impl Into<Bytes>, qos: QoS, retain: bool) -> Message {
        let mut p = rumqttc::Publish::new(topic, qos, payload.into());
        p.retain = retain;
        Message { raw: Raw::V4(p) }
    }
}

/// Optional MQTT 5 properties of an outgoing publish (ignored on 3.1.1).
#[derive(Debug, Clone, Default)]
pub struct PublishProps {
    pub correlation_data: Option<Bytes>,
    pub response_topic: Option<String>,
    pub user_properties: Vec<(String, String)>,
}

#[derive(Clone)]
enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

fn v5_qos(q: QoS) -> V5QoS {
    match q {
        QoS::AtMostOnce => V5QoS::AtMostOnce,
        QoS::AtLeastOnce => V5QoS::AtLeastOnce,
        QoS::ExactlyOnce => V5QoS::ExactlyOnce,
    }
}

/// Client metrics, one set per registry: `nexus_mqtt_connected{client}`,
/// `nexus_mqtt_reconnects_total{client}`, `nexus_mqtt_received_total{client}`,
/// `nexus_mqtt_published_total{client}`.
#[derive(Clone)]
pub struct MqttMetrics {
    connected: prometheus::IntGaugeVec,
    reconnects: IntCounterVec,
    received: IntCounterVec,
    published: IntCounterVec,
}

impl MqttMetrics {
    pub fn new(r: &Registry) -> Result<MqttMetrics, MetricError> {
        let client = &["client"];
        Ok(MqttMetrics {
            connected: metrics::gauge_vec(
                r,
                "nexus_mqtt_connected",
                "1 while connected to the broker",
                client,
            )?,
            reconnects: metrics::counter_vec(
                r,
                "nexus_mqtt_reconnects_total",
                "Connection attempts after a failure",
                client,
            )?,
            received: metrics::counter_vec(
                r,
                "nexus_mqtt_received_total",
                "Publishes received",
                client,
            )?,
            published: metrics::counter_vec(
                r,
                "nexus_mqtt_published_total",
                "Publishes handed to the client",
                client,
            )?,
        })
    }
}

struct ClientMetrics {
    connected: IntGauge,
    reconnects: IntCounter,
    received: IntCounter,
    published: IntCounter,
}

/// Publish, subscribe and ack. Cheap to clone.
#[derive(Clone)]
pub struct MqttHandle {
    client: Client,
    connected: watch::Receiver<bool>,
    subscriptions: Arc<Mutex<Vec<(String, QoS)>>>,
    published: Option<IntCounter>,
    closed: Arc<AtomicBool>,
    acked: watch::Receiver<u64>,
}

impl MqttHandle {
    /// Queue a publish. Returns when rumqttc accepted it into its request channel (awaiting
    /// when that is full): this is not delivery; QoS 1/2 delivery survives reconnects through
    /// the persistent session.
    pub async fn publish(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
        qos: QoS,
        retain: bool,
    ) -> Result<(), MqttError> {
        self.publish_with(topic, payload, qos, retain, None).await
    }

    pub async fn publish_with(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
        qos: QoS,
        retain: bool,
        props: Option<PublishProps>,
    ) -> Result<(), MqttError> {
        let payload = payload.into();
        let r = match &self.client {
            Client::V4(c) => c
                .publish_bytes(topic, qos, retain, payload)
                .await
                .map_err(|e| e.to_string()),
            Client::V5(c) => match props {
                Some(p) => {
                    let props = v5b::PublishProperties {
                        correlation_data: p.correlation_data,
                        response_topic: p.response_topic,
                        user_properties: p.user_properties,
                        ..Default::default()
                    };
                    c.publish_bytes_with_properties(topic, v5_qos(qos), retain, payload, props)
                        .await
                }
                None => c.publish_bytes(topic, v5_qos(qos), retain, payload).await,
            }
            .map_err(|e| e.to_string()),
        };
        r.map_err(MqttError::Client)?;
        if let Some(p) = &self.published {
            p.inc();
        }
        Ok(())
    }

    /// Subscribe now and after every reconnect that lost the session.
    pub async fn subscribe(&self, filter: &str, qos: QoS) -> Result<(), MqttError> {
        {
            let mut subs = self.subscriptions.lock().await;
            if !subs.iter().any(|(f, _)| f == filter) {
                subs.push((filter.to_owned(), qos));
            }
        }
        match &self.client {
            Client::V4(c) => c.subscribe(filter, qos).await.map_err(|e| e.to_string()),
            Client::V5(c) => c
                .subscribe(filter, v5_qos(qos))
                .await
                .map_err(|e| e.to_string()),
        }
        .map_err(MqttError::Client)
    }

    /// Acknowledge a QoS 1/2 message received with manual acks. Acks must be given in the
    /// order messages arrived (MQTT requires in-order acks per QoS level).
    pub async fn ack(&self, msg: &Message) -> Result<(), MqttError> {
        match (&self.client, &msg.raw) {
            (Client::V4(c), Raw::V4(p)) => c.ack(p).await.map_err(|e| e.to_string()),
            (Client::V5(c), Raw::V5(p)) => c.ack(p).await.map_err(|e| e.to_string()),
            _ => Ok(()),
        }
        .map_err(MqttError::Client)
    }

    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Watch how many of this client's QoS 1 and 2 publishes the broker has acknowledged
    /// (PUBACK, PUBCOMP) since it was made. The broker acknowledges in the order it received
    /// them (MQTT requires it), and the client resends what was not acknowledged across
    /// reconnects, to a new session too (see [`connect`]): so a client whose only QoS 1/2
    /// publisher is one task can match each acknowledgement to its oldest open publish.
    pub fn acked(&self) -> watch::Receiver<u64> {
        self.acked.clone()
    }

    /// Watch the connection state.
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.connected.clone()
    }

    /// Wait until connected, up to `timeout`.
    pub async fn wait_connected(&self, timeout: Duration) -> Result<(), MqttError> {
        let mut rx = self.connected.clone();
        let waited =
            tokio::time::timeout(timeout, async { rx.wait_for(|c| *c).await.map(|_| ()) }).await;
        match waited {
            Err(_) => Err(MqttError::ConnectTimeout(timeout)),
            Ok(Err(_)) => Err(MqttError::Closed),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// Disconnect cleanly (no last will). The event loop ends afterwards.
    pub async fn disconnect(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _ = match &self.client {
            Client::V4(c) => c.disconnect().await.map_err(|e| e.to_string()),
            Client::V5(c) => c.disconnect().await.map_err(|e| e.to_string()),
        };
    }
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, MqttError> {
    std::fs::read(path).map_err(|source| MqttError::TlsFile {
        path: path.display().to_string(),
        source,
    })
}

fn tls_config(cfg: &MqttConfig) -> Result<Option<rumqttc::TlsConfiguration>, MqttError> {
    let Some(tls) = &cfg.tls else { return Ok(None) };
    crate::install_tls_provider();
    let ca = read(&tls.ca_file)?;
    let client_auth = match (&tls.cert_file, &tls.key_file) {
        (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
        _ => None,
    };
    Ok(Some(rumqttc::TlsConfiguration::Simple {
        ca,
        alpn: None,
        client_auth,
    }))
}

fn network_options(cfg: &MqttConfig, settings: &ClientSettings) -> rumqttc::NetworkOptions {
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(settings.tcp_nodelay);
    net.set_connection_timeout(cfg.keep_alive.as_secs().clamp(1, 30));
    net
}

/// Connect (in the background: this returns at once) and run the event loop until `shutdown`.
pub fn connect(
    cfg: &MqttConfig,
    settings: ClientSettings,
    metrics: Option<&MqttMetrics>,
    shutdown: CancellationToken,
) -> Result<(MqttHandle, mpsc::Receiver<Message>), MqttError> {
    let port = cfg.effective_port();
    let tls = tls_config(cfg)?;
    let max_packet = cfg.max_packet_size.0.min(u32::MAX as u64) as usize;
    let (tx, rx) = mpsc::channel(settings.incoming_capacity.max(1));
    let (conn_tx, conn_rx) = watch::channel(false);
    let subscriptions = Arc::new(Mutex::new(settings.subscriptions.clone()));
    let cm = metrics.map(|m| {
        let id = settings.client_id.as_str();
        ClientMetrics {
            connected: m.connected.with_label_values(&[id]),
            reconnects: m.reconnects.with_label_values(&[id]),
            received: m.received.with_label_values(&[id]),
            published: m.published.with_label_values(&[id]),
        }
    });
    let published = cm.as_ref().map(|m| m.published.clone());
    let closed = Arc::new(AtomicBool::new(false));
    let will_source = settings.will_source.clone();
    let first_will = match &will_source {
        Some(w) => Some((w.0)()),
        None => settings.will.clone(),
    };
    let (acked_tx, acked_rx) = watch::channel(0u64);
    let client = match cfg.version {
        MqttVersion::V311 => {
            let mut o = rumqttc::MqttOptions::new(&settings.client_id, &cfg.host, port);
            o.set_keep_alive(cfg.keep_alive)
                .set_clean_session(!cfg.persistent_session)
                .set_max_packet_size(max_packet, max_packet)
                .set_inflight(cfg.inflight)
                .set_manual_acks(settings.manual_acks);
            if let Some(u) = &cfg.username {
                o.set_credentials(u, cfg.password.as_ref().map(|p| p.expose()).unwrap_or(""));
            }
            if let Some(w) = &first_will {
                o.set_last_will(rumqttc::LastWill::new(
                    &w.topic,
                    w.payload.to_vec(),
                    w.qos,
                    w.retain,
                ));
            }
            if let Some(t) = tls {
                o.set_transport(rumqttc::Transport::tls_with_config(t));
            }
            let (client, mut eventloop) =
                rumqttc::AsyncClient::new(o, cfg.request_capacity.max(10));
            eventloop.set_network_options(network_options(cfg, &settings));
            tokio::spawn(run_v4(
                eventloop,
                client.clone(),
                tx,
                conn_tx,
                acked_tx,
                subscriptions.clone(),
                cfg.clone(),
                cm,
                closed.clone(),
                shutdown,
                settings.client_id.clone(),
                will_source,
            ));
            Client::V4(client)
        }
        MqttVersion::V5 => {
            let mut o = rumqttc::v5::MqttOptions::new(&settings.client_id, &cfg.host, port);
            o.set_keep_alive(cfg.keep_alive)
                .set_clean_start(!cfg.persistent_session)
                .set_max_packet_size(Some(max_packet as u32))
                .set_outgoing_inflight_upper_limit(cfg.inflight)
                .set_manual_acks(settings.manual_acks);
            o.set_network_options(network_options(cfg, &settings));
            if cfg.persistent_session {
                o.set_session_expiry_interval(Some(
                    cfg.session_expiry.as_secs().min(u32::MAX as u64) as u32,
                ));
            }
            if let Some(u) = &cfg.username {
                o.set_credentials(u, cfg.password.as_ref().map(|p| p.expose()).unwrap_or(""));
            }
            if let Some(w) = &first_will {
                o.set_last_will(v5b::LastWill::new(
                    &w.topic,
                    w.payload.to_vec(),
                    v5_qos(w.qos),
                    w.retain,
                    None,
                ));
            }
            if let Some(t) = tls {
                o.set_transport(rumqttc::Transport::tls_with_config(t));
            }
            let (client, eventloop) =
                rumqttc::v5::AsyncClient::new(o, cfg.request_capacity.max(10));
            tokio::spawn(run_v5(
                eventloop,
                client.clone(),
                tx,
                conn_tx,
                acked_tx,
                subscriptions.clone(),
                cfg.clone(),
                cm,
                closed.clone(),
                shutdown,
                settings.client_id.clone(),
                will_source,
            ));
            Client::V5(client)
        }
    };
    Ok((
        MqttHandle {
            client,
            connected: conn_rx,
            subscriptions,
            published,
            closed,
            acked: acked_rx,
        },
        rx,
    ))
}

macro_rules! event_loop {
    ($name:ident, $eventloop:ty, $client:ty, $incoming:path, $event:path, $raw:path, $sub:expr, $set_will:expr) => {
        #[allow(clippy::too_many_arguments)]
        async fn $name(
            mut eventloop: $eventloop,
            client: $client,
            tx: mpsc::Sender<Message>,
            conn: watch::Sender<bool>,
            acked: watch::Sender<u64>,
            subscriptions: Arc<Mutex<Vec<(String, QoS)>>>,
            cfg: MqttConfig,
            metrics: Option<ClientMetrics>,
            closed: Arc<AtomicBool>,
            shutdown: CancellationToken,
            id: String,
            will_source: Option<WillSource>,
        ) {
            use $event as Event;
            use $incoming as Incoming;
            let mut failures = 0u32;
            // Requests of a connection that failed: what the broker had not acknowledged, and
            // what was still queued. Kept here, because the event loop drops them when the next
            // CONNACK says the session is new (a restarted broker, an expired session).
            let mut unsent = std::collections::VecDeque::new();
            loop {
                let ev = tokio::select! {
                    ev = eventloop.poll() => ev,
                    _ = shutdown.cancelled(), if !closed.load(Ordering::SeqCst) => {
                        closed.store(true, Ordering::SeqCst);
                        let _ = client.try_disconnect();
                        // Let the DISCONNECT go out, briefly, then close (MQTT-3.14.4-1). What
                        // arrives meanwhile still goes to the consumer: with automatic acks it
                        // is acknowledged already, and dropping it here lost it.
                        let _ = tokio::time::timeout(Duration::from_millis(500), async {
                            loop {
                                match eventloop.poll().await {
                                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                                        let _ = tx.try_send(Message { raw: $raw(p) });
                                    }
                                    Ok(_) => {}
                                }
                            }
                        }).await;
                        break;
                    }
                };
                match ev {
                    Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                        failures = 0;
                        // Resent first, in their order, to the old session or the new one: a
                        // publish is not given up because the broker forgot the session.
                        if !unsent.is_empty() {
                            tracing::info!(client = %id, requests = unsent.len(), session_present = ack.session_present, "resending what the broker had not acknowledged");
                            let mut resend = std::mem::take(&mut unsent);
                            resend.extend(eventloop.pending.drain(..));
                            eventloop.pending = resend;
                        }
                        conn.send_replace(true);
                        if let Some(m) = &metrics {
                            m.connected.set(1);
                        }
                        tracing::info!(client = %id, session_present = ack.session_present, "connected to MQTT broker");
                        if !ack.session_present {
                            let subs = subscriptions.lock().await.clone();
                            for (filter, qos) in subs {
                                let sub = $sub;
                                if let Err(e) = sub(&client, filter.clone(), qos) {
                                    tracing::warn!(client = %id, filter = %filter, error = %e, "subscribe failed");
                                }
                            }
                        }
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        if let Some(m) = &metrics {
                            m.received.inc();
                        }
                        if tx.send(Message { raw: $raw(p) }).await.is_err() {
                            // The consumer is gone; keep the connection for publishing.
                        }
                    }
                    Ok(Event::Incoming(Incoming::PubAck(_) | Incoming::PubComp(_))) => {
                        acked.send_modify(|n| *n += 1);
                    }
                    // After its DISCONNECT the client closes the connection (MQTT-3.14.4-1):
                    // a broker may keep the session online until it does.
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect))
                        if closed.load(Ordering::SeqCst) =>
                    {
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        unsent.extend(eventloop.pending.drain(..));
                        conn.send_replace(false);
                        if let Some(m) = &metrics {
                            m.connected.set(0);
                            m.reconnects.inc();
                        }
                        if closed.load(Ordering::SeqCst) || shutdown.is_cancelled() {
                            break;
                        }
                        // The next connection's will.
                        if let Some(w) = &will_source {
                            let set_will = $set_will;
                            set_will(&mut eventloop, (w.0)());
                        }
                        let delay = backoff(cfg.reconnect_min, cfg.reconnect_max, failures);
                        failures = failures.saturating_add(1);
                        tracing::warn!(client = %id, error = %e, retry_ms = delay.as_millis() as u64, "MQTT connection failed");
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = shutdown.cancelled() => break,
                        }
                    }
                }
            }
            conn.send_replace(false);
            if let Some(m) = &metrics {
                m.connected.set(0);
            }
        }
    };
}

event_loop!(
    run_v4,
    rumqttc::EventLoop,
    rumqttc::AsyncClient,
    rumqttc::Incoming,
    rumqttc::Event,
    Raw::V4,
    |c: &rumqttc::AsyncClient, f: String, q: QoS| c.try_subscribe(f, q).map_err(|e| e.to_string()),
    |e: &mut rumqttc::EventLoop, w: Will| {
        e.mqtt_options.set_last_will(rumqttc::LastWill::new(
            &w.topic,
            w.payload.to_vec(),
            w.qos,
            w.retain,
        ));
    }
);
event_loop!(
    run_v5,
    rumqttc::v5::EventLoop,
    rumqttc::v5::AsyncClient,
    rumqttc::v5::Incoming,
    rumqttc::v5::Event,
    Raw::V5,
    |c: &rumqttc::v5::AsyncClient, f: String, q: QoS| c
        .try_subscribe(f, v5_qos(q))
        .map_err(|e| e.to_string()),
    |e: &mut rumqttc::v5::EventLoop, w: Will| {
        e.options.set_last_will(v5b::LastWill::new(
            &w.topic,
            w.payload.to_vec(),
            v5_qos(w.qos),
            w.retain,
            None,
        ));
    }
);
