//! `broker`: the embedded MQTT broker, its users, ACL rules and TLS.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::auth::Role;
use super::types::{duration, ByteSize};
use super::Problems;
use crate::topic::TopicFilter;

/// `broker`: the embedded MQTT broker (`nexus broker`, and part of `nexus up`). Who may connect
/// is in `auth`; the limits below bound what clients can make the broker hold.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Start the embedded broker in `nexus up` (default true). Set false to use an external
    /// broker given in `mqtt`.
    pub enabled: bool,
    /// Address the listeners bind (default 0.0.0.0).
    pub bind: IpAddr,
    /// MQTT over TCP, 3.1.1 and 5 on one port (default 1883; null turns plain MQTT off, for a
    /// TLS-only broker).
    pub port: Option<u16>,
    /// MQTT over WebSocket (default 8083; null disables).
    pub ws_port: Option<u16>,
    /// MQTT over TLS (default off; set cert_file and key_file to enable, port 8883).
    pub tls: Option<BrokerTls>,
    /// Moved to `auth.users`; still accepted by the parser only to say so.
    #[doc(hidden)]
    pub users: Option<serde_json::Value>,
    /// Moved to `auth.anonymous`; still accepted by the parser only to say so.
    #[doc(hidden)]
    pub allow_anonymous: Option<serde_json::Value>,
    /// Gone: anonymous clients are viewers; still accepted by the parser only to say so.
    #[doc(hidden)]
    pub anonymous_role: Option<serde_json::Value>,
    /// Access rules checked in order before each role's defaults (first match wins). They
    /// cannot open what is reserved for Nexus's services (docs/security.md).
    pub acl: Vec<AclRule>,
    /// Most concurrent connections per listener (default 10000).
    pub max_connections: usize,
    /// Most sessions, connected or kept for a disconnected client (default 10000). A new
    /// client beyond it is refused (CONNACK "server unavailable"), counted in
    /// `nexus_broker_sessions_refused_total`.
    pub max_sessions: usize,
    /// Subscriptions one session may hold (default 1000). A SUBSCRIBE beyond it is refused
    /// ("quota exceeded"), counted in `nexus_broker_subscriptions_refused_total`.
    pub max_subscriptions: usize,
    /// Unacknowledged QoS 1/2 messages in flight per client (default 128; rmqtt's 16 makes
    /// clients with a larger window loop).
    pub max_inflight: u16,
    /// The same window for a Nexus service's session (default 1024): ingestion acknowledges
    /// a message only once its WAL has synced it, so with 128 in flight it waits on the
    /// round trip rather than on its work (docs/ingestion.md, "The in-flight window").
    pub service_max_inflight: u16,
    /// Topic aliases an MQTT 5 client may set on one connection (default 10, as Mosquitto;
    /// 0 allows none). An alias above it ends the connection with "Topic Alias invalid".
    pub max_topic_aliases: u16,
    /// Messages queued per client beyond the in-flight window (default 1000, as Mosquitto).
    /// Overflow is counted in `nexus_broker_messages_dropped_total{reason="queue_full"}`.
    pub max_mqueue_len: usize,
    /// Messages queued for a Nexus service's session (default 100000: a historian that
    /// restarts must not lose what arrived meanwhile).
    pub service_mqueue_len: usize,
    /// Largest packet accepted (default 1MiB).
    pub max_packet_size: ByteSize,
    /// How long a queued or retained message lives without a client-set expiry (default 0s:
    /// forever).
    #[serde(with = "duration")]
    pub message_expiry: Duration,
    /// How long a persistent session is kept after its client disconnects (default 2h).
    #[serde(with = "duration")]
    pub session_expiry: Duration,
    /// Longest session expiry an MQTT 5 client may ask for (default 1d).
    #[serde(with = "duration")]
    pub max_session_expiry: Duration,
    /// Most retained topics (default 100000). A retained publish to a new topic beyond it is
    /// delivered but not retained, counted in `nexus_broker_retained_refused_total`; Nexus's
    /// services are never refused.
    pub max_retained: usize,
    /// Most bytes of retained payloads (default 256MiB), the same way.
    pub max_retained_bytes: ByteSize,
    /// Where the broker keeps persistent sessions (subscriptions and QoS 1/2 messages not yet
    /// acknowledged by them) and retained messages, so that a crash or restart loses nothing
    /// it acknowledged (default `nexus-data/broker`; null: in memory only). docs/broker.md,
    /// "Durable state".
    pub state_dir: Option<PathBuf>,
    /// How often what the broker wrote to `state_dir` is flushed to the disk (default 100ms;
    /// 0s: before every acknowledgement, slower). A killed broker loses nothing either way;
    /// a power loss can lose what was acknowledged within the last interval.
    #[serde(with = "duration")]
    pub state_sync: Duration,
    /// Acknowledge what a client sends at once instead of delaying the ACK (default true;
    /// TCP_QUICKACK after each read, Linux). A client that leaves Nagle's algorithm on, as
    /// Python's paho-mqtt does, otherwise waits ~40 ms per command or publish that follows
    /// another packet (docs/broker.md, "Clients that leave Nagle on").
    pub quickack: bool,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            enabled: true,
            bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port: Some(1883),
            ws_port: Some(8083),
            tls: None,
            users: None,
            allow_anonymous: None,
            anonymous_role: None,
            acl: Vec::new(),
            max_connections: 10_000,
            max_sessions: 10_000,
            max_subscriptions: 1000,
            max_inflight: 128,
            service_max_inflight: 1024,
            max_topic_aliases: 10,
            max_mqueue_len: 1000,
            service_mqueue_len: 100_000,
            max_packet_size: ByteSize(1024 * 1024),
            message_expiry: Duration::ZERO,
            session_expiry: Duration::from_secs(2 * 3600),
            max_session_expiry: Duration::from_secs(24 * 3600),
            max_retained: 100_000,
            max_retained_bytes: ByteSize(256 * 1024 * 1024),
            state_dir: Some(PathBuf::from("nexus-data/broker")),
            state_sync: Duration::from_millis(100),
            quickack: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerTls {
    /// TLS port (default 8883).
    #[serde(default = "default_tls_port")]
    pub port: u16,
    /// MQTT over secure WebSocket (wss) on this port (default off).
    #[serde(default)]
    pub ws_port: Option<u16>,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Require client certificates signed by this CA (default off).
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

fn default_tls_port() -> u16 {
    8883
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AclPermission {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AclAction {
    Publish,
    Subscribe,
    All,
}

/// One access rule. It applies to a client when `users` and `roles` are both empty, or the
/// client's username is in `users`, or its role is in `roles`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclRule {
    pub permission: AclPermission,
    pub action: AclAction,
    /// An MQTT filter; a subscription matches when its filter equals this or falls under it.
    pub topic: String,
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub roles: Vec<Role>,
}

impl BrokerConfig {
    pub(crate) fn validate(&self, p: &mut Problems) {
        for (key, given, msg) in [
            (
                "broker.users",
                self.users.is_some(),
                "moved: list users in auth.users (for MQTT and HTTP alike)",
            ),
            (
                "broker.allow_anonymous",
                self.allow_anonymous.is_some(),
                "moved: set auth.anonymous (off, loopback or any)",
            ),
            (
                "broker.anonymous_role",
                self.anonymous_role.is_some(),
                "gone: anonymous clients are read-only viewers (auth.anonymous)",
            ),
        ] {
            if given {
                p.push(key, msg);
            }
        }
        for (i, r) in self.acl.iter().enumerate() {
            if let Err(e) = TopicFilter::parse(&r.topic) {
                p.push(format!("broker.acl[{i}].topic"), e.to_string());
            }
        }
        for (key, v) in [
            ("max_inflight", self.max_inflight),
            ("service_max_inflight", self.service_max_inflight),
        ] {
            if v == 0 {
                p.push(format!("broker.{key}"), "must be at least 1");
            }
        }
        for (key, v) in [
            ("max_mqueue_len", self.max_mqueue_len),
            ("service_mqueue_len", self.service_mqueue_len),
            ("max_sessions", self.max_sessions),
            ("max_subscriptions", self.max_subscriptions),
            ("max_connections", self.max_connections),
        ] {
            if v == 0 {
                p.push(format!("broker.{key}"), "must be at least 1");
            }
        }
        if self.session_expiry > self.max_session_expiry {
            p.push(
                "broker.session_expiry",
                format!(
                    "longer than broker.max_session_expiry ({})",
                    humantime::format_duration(self.max_session_expiry)
                ),
            );
        }
        let mut ports = Vec::new();
        if let Some(port) = self.port {
            ports.push(("port", port));
        }
        if let Some(ws) = self.ws_port {
            ports.push(("ws_port", ws));
        }
        if let Some(tls) = &self.tls {
            ports.push(("tls.port", tls.port));
            if let Some(wss) = tls.ws_port {
                ports.push(("tls.ws_port", wss));
            }
        }
        if ports.is_empty() {
            p.push(
                "broker.port",
                "every listener is off: keep port, ws_port or tls",
            );
        }
        for (i, (name, port)) in ports.iter().enumerate() {
            if *port != 0 && ports[..i].iter().any(|(_, other)| other == port) {
                p.push(
                    format!("broker.{name}"),
                    format!("port {port} is used by another listener"),
                );
            }
        }
    }
}
