//! `broker`: the embedded MQTT broker, its users, ACL rules and TLS.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::types::{duration, ByteSize, Secret};
use super::Problems;
use crate::topic::TopicFilter;

/// `broker`: the embedded MQTT broker (`nexus broker`, and part of `nexus up`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Start the embedded broker in `nexus up` (default true). Set false to use an external
    /// broker given in `mqtt`.
    pub enabled: bool,
    /// Address the listeners bind (default 0.0.0.0).
    pub bind: IpAddr,
    /// MQTT over TCP, 3.1.1 and 5 on one port (default 1883).
    pub port: u16,
    /// MQTT over WebSocket (default 8083; null disables).
    pub ws_port: Option<u16>,
    /// MQTT over TLS (default off; set cert_file and key_file to enable, port 8883).
    pub tls: Option<BrokerTls>,
    /// Let clients connect without a username (default true). Anonymous clients get
    /// `anonymous_role`.
    pub allow_anonymous: bool,
    /// Role of anonymous clients (default viewer: may read everything, publish UNS data, and
    /// not publish commands or other `$nexus` topics).
    pub anonymous_role: Role,
    /// Users with passwords and roles.
    pub users: Vec<BrokerUser>,
    /// Access rules checked in order before the built-in ones (first match wins).
    pub acl: Vec<AclRule>,
    /// Most concurrent connections per listener (default 10000).
    pub max_connections: usize,
    /// Unacknowledged QoS 1/2 messages in flight per client (default 128; rmqtt's 16 makes
    /// clients with a larger window loop).
    pub max_inflight: u16,
    /// Messages queued per client beyond the in-flight window (default 100000). Overflow is
    /// counted in `nexus_broker_messages_dropped_total`.
    pub max_mqueue_len: usize,
    /// Largest packet accepted (default 1MiB).
    pub max_packet_size: ByteSize,
    /// How long a queued or retained message lives without a client-set expiry (default 0s:
    /// forever).
    #[serde(with = "duration")]
    pub message_expiry: Duration,
    /// How long a persistent session is kept after its client disconnects (default 2h).
    #[serde(with = "duration")]
    pub session_expiry: Duration,
    /// Most retained messages (default 0: unlimited).
    pub max_retained: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            enabled: true,
            bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port: 1883,
            ws_port: Some(8083),
            tls: None,
            allow_anonymous: true,
            anonymous_role: Role::Viewer,
            users: Vec::new(),
            acl: Vec::new(),
            max_connections: 10_000,
            max_inflight: 128,
            max_mqueue_len: 100_000,
            max_packet_size: ByteSize(1024 * 1024),
            message_expiry: Duration::ZERO,
            session_expiry: Duration::from_secs(2 * 3600),
            max_retained: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerTls {
    /// TLS port (default 8883).
    #[serde(default = "default_tls_port")]
    pub port: u16,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Require client certificates signed by this CA (default off).
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

fn default_tls_port() -> u16 {
    8883
}

/// What a broker user may do. `service` and `admin` bypass the ACL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read everything, publish UNS data; no commands, no `$nexus` topics.
    Viewer,
    /// A viewer that may also send write commands and acknowledge alarms.
    Operator,
    /// Nexus services: everything.
    Service,
    /// Everything.
    Admin,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerUser {
    pub username: String,
    /// The password, or leave it out and set `password_env`.
    #[serde(default)]
    pub password: Option<Secret>,
    /// Name of an environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(default = "default_role")]
    pub role: Role,
}

impl std::fmt::Debug for BrokerUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerUser")
            .field("username", &self.username)
            .field("password", &self.password)
            .field("password_env", &self.password_env)
            .field("role", &self.role)
            .finish()
    }
}

fn default_role() -> Role {
    Role::Viewer
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
        let mut names = std::collections::HashSet::new();
        for (i, u) in self.users.iter().enumerate() {
            let at = format!("broker.users[{i}]");
            if u.username.is_empty() {
                p.push(format!("{at}.username"), "username is empty");
            }
            if !names.insert(u.username.as_str()) {
                p.push(
                    format!("{at}.username"),
                    format!("user {:?} is listed twice", u.username),
                );
            }
            match (&u.password, &u.password_env) {
                (None, None) => p.push(
                    at,
                    format!("user {:?} needs password or password_env", u.username),
                ),
                (Some(_), Some(_)) => p.push(
                    at,
                    format!(
                        "user {:?}: give password or password_env, not both",
                        u.username
                    ),
                ),
                _ => {}
            }
        }
        for (i, r) in self.acl.iter().enumerate() {
            if let Err(e) = TopicFilter::parse(&r.topic) {
                p.push(format!("broker.acl[{i}].topic"), e.to_string());
            }
        }
        if self.max_inflight == 0 {
            p.push("broker.max_inflight", "must be at least 1");
        }
        if self.max_mqueue_len == 0 {
            p.push("broker.max_mqueue_len", "must be at least 1");
        }
        let mut ports = vec![("port", self.port)];
        if let Some(ws) = self.ws_port {
            ports.push(("ws_port", ws));
        }
        if let Some(tls) = &self.tls {
            ports.push(("tls.port", tls.port));
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
