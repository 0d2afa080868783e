//! The service sections of `nexus.yaml`: `broker`, `mqtt`, `gateway`, `ingestion`, `commands`,
//! `orchestrator`, `telemetry`. Every key has a default, documented on its field and in
//! docs/configuration.md.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::types::{duration, opt_duration, ByteSize, Secret, SecretUrl};
use super::Problems;
use crate::topic::TopicFilter;

fn listen(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)
}

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

/// MQTT protocol version a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum MqttVersion {
    #[serde(rename = "3.1.1", alias = "v311", alias = "4")]
    V311,
    #[serde(rename = "5", alias = "v5", alias = "5.0")]
    V5,
}

/// `mqtt`: how every service reaches the broker (the embedded one by default).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Broker host (default 127.0.0.1).
    pub host: String,
    /// Broker port (default 1883, or 8883 with TLS).
    pub port: Option<u16>,
    /// Protocol version: "3.1.1" or "5" (default "3.1.1").
    pub version: MqttVersion,
    /// Client id prefix; each service appends `-<service>-<instance>` (default "nexus").
    pub client_id_prefix: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// TLS to the broker (default off).
    pub tls: Option<MqttTls>,
    /// Keep-alive interval (default 30s).
    #[serde(with = "duration")]
    pub keep_alive: Duration,
    /// Keep the session across reconnects so nothing queued is lost (default true).
    pub persistent_session: bool,
    /// MQTT 5 session expiry for persistent sessions (default 1h).
    #[serde(with = "duration")]
    pub session_expiry: Duration,
    /// First reconnect delay (default 100ms); doubles up to `reconnect_max`, with jitter.
    #[serde(with = "duration")]
    pub reconnect_min: Duration,
    /// Longest reconnect delay (default 30s).
    #[serde(with = "duration")]
    pub reconnect_max: Duration,
    /// Largest packet sent or received (default 1MiB; rumqttc's own default is 10KiB).
    pub max_packet_size: ByteSize,
    /// Unacknowledged QoS 1/2 publishes in flight (default 100).
    pub inflight: u16,
    /// Capacity of the client's request queue (default 10000).
    pub request_capacity: usize,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            host: "127.0.0.1".into(),
            port: None,
            version: MqttVersion::V311,
            client_id_prefix: "nexus".into(),
            username: None,
            password: None,
            tls: None,
            keep_alive: Duration::from_secs(30),
            persistent_session: true,
            session_expiry: Duration::from_secs(3600),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(30),
            max_packet_size: ByteSize(1024 * 1024),
            inflight: 100,
            request_capacity: 10_000,
        }
    }
}

impl MqttConfig {
    pub fn effective_port(&self) -> u16 {
        self.port
            .unwrap_or(if self.tls.is_some() { 8883 } else { 1883 })
    }

    pub(crate) fn validate(&self, p: &mut Problems) {
        if self.host.trim().is_empty() {
            p.push("mqtt.host", "host is empty");
        }
        if self.client_id_prefix.is_empty() || self.client_id_prefix.len() > 64 {
            p.push("mqtt.client_id_prefix", "must be 1 to 64 characters");
        }
        if self.password.is_some() && self.username.is_none() {
            p.push("mqtt.password", "a password needs a username");
        }
        if self.keep_alive < Duration::from_secs(1) {
            p.push("mqtt.keep_alive", "must be at least 1s");
        }
        if self.reconnect_min > self.reconnect_max {
            p.push("mqtt.reconnect_min", "is larger than reconnect_max");
        }
        if self.inflight == 0 {
            p.push("mqtt.inflight", "must be at least 1");
        }
        if self.max_packet_size.0 < 1024 {
            p.push("mqtt.max_packet_size", "must be at least 1KiB");
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttTls {
    /// CA bundle (PEM) that signs the broker's certificate.
    pub ca_file: PathBuf,
    /// Client certificate and key (PEM) for mutual TLS (optional).
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// `gateway`: the protocol gateway service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// HTTP for health, metrics and the device API (default 0.0.0.0:4000).
    pub http_listen: SocketAddr,
    /// Polls running at once (default 10). A poll due while all are busy is skipped and
    /// counted in `nexus_gateway_polls_skipped_total`, never queued.
    pub workers: usize,
    /// QoS of published values: 0, 1 or 2 (default 1).
    pub qos: u8,
    /// Publish values retained (default true), so a new subscriber sees the last value.
    pub retain: bool,
    /// Republish an unchanged value at least this often (default 60s; 0s: never).
    #[serde(with = "duration")]
    pub heartbeat: Duration,
    /// Watch `devices_file` and apply changes without a restart (default true).
    pub watch_devices_file: bool,
    /// Store-and-forward buffer used while the broker is unreachable.
    pub buffer: BufferConfig,
    /// Connection pools.
    pub pool: PoolConfig,
    /// Circuit breaker of each connection.
    pub breaker: BreakerSettings,
    /// The OPC UA client's certificates.
    pub opcua: OpcUaClientConfig,
}

/// `gateway.opcua`: the OPC UA client's identity and trust.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OpcUaClientConfig {
    /// PKI directory (default `nexus-data/pki`): the client certificate and key are created
    /// in `own/` and `private/` at first start; server certificates in `trusted/` are trusted,
    /// unknown ones are saved in `rejected/` (move them to `trusted/` to accept them).
    pub pki_dir: PathBuf,
    /// Trust every server certificate (default false; for commissioning only).
    pub trust_server_certs: bool,
    /// Application URI of the client certificate (default `urn:nexus:gateway`).
    pub application_uri: String,
}

impl Default for OpcUaClientConfig {
    fn default() -> Self {
        OpcUaClientConfig {
            pki_dir: PathBuf::from("nexus-data/pki"),
            trust_server_certs: false,
            application_uri: "urn:nexus:gateway".into(),
        }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            http_listen: listen(4000),
            workers: 10,
            qos: 1,
            retain: true,
            heartbeat: Duration::from_secs(60),
            watch_devices_file: true,
            buffer: BufferConfig::default(),
            pool: PoolConfig::default(),
            breaker: BreakerSettings::default(),
            opcua: OpcUaClientConfig::default(),
        }
    }
}

impl GatewayConfig {
    pub(crate) fn validate(&self, p: &mut Problems) {
        if self.workers == 0 {
            p.push("gateway.workers", "must be at least 1");
        }
        if self.qos > 2 {
            p.push(
                "gateway.qos",
                format!("QoS {} does not exist (0, 1 or 2)", self.qos),
            );
        }
        if self.buffer.max_size.0 < 64 * 1024 {
            p.push("gateway.buffer.max_size", "must be at least 64KiB");
        }
        if self.buffer.replay_rate == 0 {
            p.push(
                "gateway.buffer.replay_rate",
                "must be at least 1 point per second",
            );
        }
        let b = &self.breaker;
        if !(b.failure_ratio > 0.0 && b.failure_ratio <= 1.0) {
            p.push(
                "gateway.breaker.failure_ratio",
                "must be above 0 and at most 1",
            );
        }
        if b.window == 0 || b.min_requests == 0 || b.min_requests > b.window {
            p.push(
                "gateway.breaker.min_requests",
                "must be between 1 and window",
            );
        }
        if b.half_open_trials == 0 {
            p.push("gateway.breaker.half_open_trials", "must be at least 1");
        }
    }
}

/// `gateway.buffer`: values kept on disk while the broker is away.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BufferConfig {
    /// Directory of the buffer's segment files (default `nexus-data/gateway-buffer`).
    pub dir: PathBuf,
    /// Largest size on disk (default 256MiB); past it the oldest values are dropped and
    /// counted in `nexus_gateway_buffer_dropped_total`.
    pub max_size: ByteSize,
    /// Buffered values replayed per second once the broker is back (default 5000), after
    /// live values.
    pub replay_rate: u32,
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            dir: PathBuf::from("nexus-data/gateway-buffer"),
            max_size: ByteSize(256 * 1024 * 1024),
            replay_rate: 5000,
        }
    }
}

/// `gateway.pool`: connections per protocol.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Most open connections per protocol (defaults 100 Modbus, 50 OPC UA, 100 S7).
    pub modbus_max_connections: usize,
    pub opcua_max_connections: usize,
    pub s7_max_connections: usize,
    /// How often idle connections are checked (default 30s).
    #[serde(with = "duration")]
    pub health_interval: Duration,
    /// Connections unused this long are closed (default 5m).
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            modbus_max_connections: 100,
            opcua_max_connections: 50,
            s7_max_connections: 100,
            health_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// `gateway.breaker`: opens at `failure_ratio` of the last `window` calls (once
/// `min_requests` were made), stays open `open_for`, then admits `half_open_trials` trials.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerSettings {
    pub window: usize,
    pub min_requests: usize,
    pub failure_ratio: f64,
    #[serde(with = "duration")]
    pub open_for: Duration,
    pub half_open_trials: usize,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            window: 20,
            min_requests: 5,
            failure_ratio: 0.6,
            open_for: Duration::from_secs(30),
            half_open_trials: 3,
        }
    }
}

impl From<BreakerSettings> for crate::breaker::BreakerConfig {
    fn from(b: BreakerSettings) -> Self {
        crate::breaker::BreakerConfig {
            window: b.window,
            min_requests: b.min_requests,
            failure_ratio: b.failure_ratio,
            open_for: b.open_for,
            half_open_trials: b.half_open_trials,
        }
    }
}

/// `ingestion`: the historian writer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestionConfig {
    /// PostgreSQL URL of the historian (default none: `nexus up` runs without ingestion).
    /// `NEXUS_DATABASE_URL` sets it too.
    pub database_url: Option<SecretUrl>,
    /// Extra CA certificates (PEM) to verify the database's TLS certificate with, when the URL
    /// asks for TLS (`sslmode=require` or `prefer`); the webpki roots are always trusted.
    pub database_ca_file: Option<PathBuf>,
    /// HTTP for health, metrics and the history API (default 0.0.0.0:7000).
    pub http_listen: SocketAddr,
    /// Topic filters stored (default `["#"]`, which never matches `$` topics).
    pub filters: Vec<String>,
    /// Shared-subscription group: instances with the same group split the stream
    /// (`$share/<group>/<filter>`). Empty: a plain subscription (default "nexus-ingest").
    pub shared_group: String,
    /// Directory of the write-ahead log (default `nexus-data/ingest-wal`).
    pub wal_dir: PathBuf,
    /// Largest WAL size on disk (default 2GiB). When full, acks to the broker stop
    /// (back-pressure) until the database has taken enough; nothing is discarded.
    pub wal_max_size: ByteSize,
    /// Size at which a WAL segment file is closed and a new one begun (default 16MiB);
    /// committed segments are deleted whole.
    pub wal_segment_size: ByteSize,
    /// Points per COPY batch (default 5000).
    pub batch_size: usize,
    /// Longest wait before a partial batch is written (default 100ms).
    #[serde(with = "duration")]
    pub batch_timeout: Duration,
    /// Parallel COPY writers, one database connection each (default 4).
    pub writers: usize,
    /// Points older than this are deleted (default none: kept for ever).
    #[serde(deserialize_with = "opt_duration::deserialize")]
    pub retention: Option<Duration>,
    /// TimescaleDB: chunk interval of the hypertable (default 1d).
    #[serde(with = "duration")]
    pub chunk_interval: Duration,
    /// TimescaleDB: chunks older than this are compressed, segmented by tag (default 7d;
    /// none turns compression off).
    #[serde(deserialize_with = "opt_duration::deserialize")]
    pub compress_after: Option<Duration>,
    /// Most points a history response holds; `agg=auto` picks the finest aggregate that
    /// fits (default 10000).
    pub history_max_points: usize,
    /// Ask a Sparkplug edge node for a rebirth when data arrives with aliases not seen in a
    /// birth (default true).
    pub request_rebirth: bool,
    /// Circuit breaker on the database.
    pub breaker: BreakerSettings,
}

impl Default for IngestionConfig {
    fn default() -> Self {
        IngestionConfig {
            database_url: None,
            database_ca_file: None,
            http_listen: listen(7000),
            filters: vec!["#".into()],
            shared_group: "nexus-ingest".into(),
            wal_dir: PathBuf::from("nexus-data/ingest-wal"),
            wal_max_size: ByteSize(2 * 1024 * 1024 * 1024),
            wal_segment_size: ByteSize(16 * 1024 * 1024),
            batch_size: 5000,
            batch_timeout: Duration::from_millis(100),
            writers: 4,
            retention: None,
            chunk_interval: Duration::from_secs(86_400),
            compress_after: Some(Duration::from_secs(7 * 86_400)),
            history_max_points: 10_000,
            request_rebirth: true,
            breaker: BreakerSettings {
                open_for: Duration::from_secs(5),
                ..BreakerSettings::default()
            },
        }
    }
}

impl IngestionConfig {
    pub(crate) fn validate(&self, p: &mut Problems) {
        if let Some(url) = &self.database_url {
            let u = url.expose();
            let is_url = u.starts_with("postgres://") || u.starts_with("postgresql://");
            let is_kv = u.contains('=');
            if !is_url && !is_kv {
                p.push(
                    "ingestion.database_url",
                    format!(
                        "{} is not a postgres:// URL or key=value string",
                        url.redacted()
                    ),
                );
            }
        }
        if self.filters.is_empty() {
            p.push("ingestion.filters", "must list at least one topic filter");
        }
        for (i, f) in self.filters.iter().enumerate() {
            if let Err(e) = TopicFilter::parse(f) {
                p.push(format!("ingestion.filters[{i}]"), format!("{f:?}: {e}"));
            }
        }
        if self.shared_group.contains(['/', '+', '#']) {
            p.push("ingestion.shared_group", "must not contain '/', '+' or '#'");
        }
        if self.wal_segment_size.0 < 64 * 1024 {
            p.push("ingestion.wal_segment_size", "must be at least 64KiB");
        }
        if self.wal_max_size.0 < 2 * self.wal_segment_size.0 {
            p.push(
                "ingestion.wal_max_size",
                "must be at least twice wal_segment_size",
            );
        }
        if !(1..=1_000_000).contains(&self.batch_size) {
            p.push("ingestion.batch_size", "must be between 1 and 1000000");
        }
        if self.batch_timeout.is_zero() {
            p.push("ingestion.batch_timeout", "must be more than 0");
        }
        if !(1..=64).contains(&self.writers) {
            p.push("ingestion.writers", "must be between 1 and 64");
        }
        if self.chunk_interval < Duration::from_secs(60) {
            p.push("ingestion.chunk_interval", "must be at least 1m");
        }
        if self.history_max_points < 10 {
            p.push("ingestion.history_max_points", "must be at least 10");
        }
    }
}

/// `commands`: the command handler.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandsConfig {
    /// HTTP for health and metrics (default 0.0.0.0:4100).
    pub http_listen: SocketAddr,
    /// Commands waiting to run (default 1000); when full a command is answered "queue full".
    pub queue_size: usize,
    /// Writes running at once (default 50).
    pub max_in_flight: usize,
    /// Writes per second per device, and burst (defaults 20 and 20).
    pub rate_per_device: u32,
    pub burst_per_device: u32,
    /// Writes per second in all, and burst (defaults 200 and 200).
    pub rate_global: u32,
    pub burst_global: u32,
    /// A command older than this (from its `ts`, or from its arrival) is refused, unless it
    /// sets its own `ttl_ms` (default 10s).
    #[serde(with = "duration")]
    pub ttl: Duration,
    /// Longest a device write may take (default 5s).
    #[serde(with = "duration")]
    pub write_timeout: Duration,
    /// A repeated `request_id` within this window is answered from the first result (default 60s).
    #[serde(with = "duration")]
    pub dedup_window: Duration,
    /// Largest command payload (default 64KiB).
    pub max_payload: ByteSize,
    /// Speak MQTT 5 so Response Topic and Correlation Data are honoured (default true).
    pub mqtt_v5: bool,
}

impl Default for CommandsConfig {
    fn default() -> Self {
        CommandsConfig {
            http_listen: listen(4100),
            queue_size: 1000,
            max_in_flight: 50,
            rate_per_device: 20,
            burst_per_device: 20,
            rate_global: 200,
            burst_global: 200,
            ttl: Duration::from_secs(10),
            write_timeout: Duration::from_secs(5),
            dedup_window: Duration::from_secs(60),
            max_payload: ByteSize(64 * 1024),
            mqtt_v5: true,
        }
    }
}

impl CommandsConfig {
    pub(crate) fn validate(&self, p: &mut Problems) {
        for (key, v) in [
            ("queue_size", self.queue_size),
            ("max_in_flight", self.max_in_flight),
            ("rate_per_device", self.rate_per_device as usize),
            ("burst_per_device", self.burst_per_device as usize),
            ("rate_global", self.rate_global as usize),
            ("burst_global", self.burst_global as usize),
        ] {
            if v == 0 {
                p.push(format!("commands.{key}"), "must be at least 1");
            }
        }
        if self.write_timeout.is_zero() {
            p.push("commands.write_timeout", "must be positive");
        }
    }
}

/// `orchestrator`: the `nexus up` supervisor and its API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OrchestratorConfig {
    /// HTTP for health, metrics and platform status (default 0.0.0.0:5000).
    pub http_listen: SocketAddr,
    /// How long shutdown waits for services to drain (default 10s).
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    /// Crashes of one component within `restart_window` that stop the process (default 5).
    pub max_restarts: u32,
    /// Window for `max_restarts` (default 60s).
    #[serde(with = "duration")]
    pub restart_window: Duration,
}

impl Default for OrchestratorConfig {
    fn default() -> Self {
        OrchestratorConfig {
            http_listen: listen(5000),
            shutdown_grace: Duration::from_secs(10),
            max_restarts: 5,
            restart_window: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Pretty,
    Json,
}

/// `telemetry`: logs and identity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// A tracing filter such as `info` or `info,nexus_protocol_gateway=debug` (default info;
    /// `RUST_LOG` wins when set).
    pub log_level: String,
    /// pretty (default) or json; `--log-format` wins.
    pub log_format: LogFormat,
    /// Instance name used in status topics and client ids (default: $HOSTNAME, else "local").
    pub instance: Option<String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            log_level: "info".into(),
            log_format: LogFormat::Pretty,
            instance: None,
        }
    }
}

impl TelemetryConfig {
    pub fn instance_name(&self) -> String {
        self.instance
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "local".into())
    }

    pub(crate) fn validate(&self, p: &mut Problems) {
        if let Some(i) = &self.instance {
            if let Err(e) = crate::domain::DeviceId::new(i.clone()) {
                p.push(
                    "telemetry.instance",
                    e.to_string().replace("device id", "instance name"),
                );
            }
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log_level).is_err() {
            p.push(
                "telemetry.log_level",
                format!("{:?} is not a valid log filter", self.log_level),
            );
        }
    }
}
