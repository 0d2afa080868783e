//! `gateway`: polling, publishing, the store-and-forward buffer, and the device layer's
//! pools, breakers and OPC UA client settings.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::types::{duration, listen, BreakerSettings, ByteSize};
use super::Problems;

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
    /// Run the command handler inside `nexus gateway` and `nexus up`, sharing the gateway's
    /// connections (default true). Set it false where commands are consumed by one separate
    /// `nexus commands` (a platform has exactly one command consumer).
    pub commands: bool,
    /// Share the devices among several gateways (`nexus gateway` replicas).
    pub shard: ShardConfig,
    /// Publish as a Sparkplug B edge node (docs/gateway.md, "Sparkplug B").
    pub sparkplug: SparkplugConfig,
}

/// `v` at `field` must be one topic level (letters, digits, `-`, `_`, `.`), the rule of device
/// ids; a problem calls it `what`.
fn topic_level(field: &str, v: &str, what: &str, p: &mut Problems) {
    if let Err(e) = crate::domain::DeviceId::new(v.to_owned()) {
        p.push(field, e.to_string().replace("device id", what));
    }
}

/// `gateway.sparkplug`: the gateway as a Sparkplug B 3.0 edge node, beside the UNS output or
/// instead of it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SparkplugConfig {
    /// Off by default.
    pub enabled: bool,
    /// The Sparkplug group (default `nexus`).
    pub group_id: String,
    /// The edge node id (default: `telemetry.instance`, else `gateway`); each gateway of a
    /// shard needs its own.
    pub edge_node_id: Option<String>,
    /// The primary host application to wait for (default none): the node publishes only
    /// while `spBv1.0/STATE/<primary_host_id>` says it is online, and keeps values meanwhile.
    pub primary_host_id: Option<String>,
    /// Keep publishing the UNS JSON values too (default true).
    pub uns: bool,
    /// QoS of NDATA/DDATA (default 1, so the broker acknowledges each message and the
    /// gateway's live log lets go of it only then; Sparkplug 3.0 asks for 0, which loses what
    /// is in flight when a connection drops).
    pub data_qos: u8,
}

impl Default for SparkplugConfig {
    fn default() -> Self {
        SparkplugConfig {
            enabled: false,
            group_id: "nexus".into(),
            edge_node_id: None,
            primary_host_id: None,
            uns: true,
            data_qos: 1,
        }
    }
}

impl SparkplugConfig {
    fn validate(&self, p: &mut Problems) {
        let level =
            |field: &str, v: &str, p: &mut Problems| topic_level(field, v, "Sparkplug id", p);
        level("gateway.sparkplug.group_id", &self.group_id, p);
        if let Some(n) = &self.edge_node_id {
            level("gateway.sparkplug.edge_node_id", n, p);
        }
        if let Some(h) = &self.primary_host_id {
            level("gateway.sparkplug.primary_host_id", h, p);
        }
        if self.data_qos > 1 {
            p.push(
                "gateway.sparkplug.data_qos",
                format!("must be 0 or 1, not {}", self.data_qos),
            );
        }
    }
}

/// `gateway.shard`: several gateways split the devices, each polled by exactly one.
///
/// Each member owns the devices it wins by rendezvous hashing over the live members, and
/// hands them over through retained adverts on `$nexus/gateway/<group>/members/<member>`:
/// a device is started only after its previous owner has said it stopped polling it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ShardConfig {
    /// Off by default: one gateway polls every device.
    pub enabled: bool,
    /// This member's name, unique in its group (default `telemetry.instance`, e.g. the pod
    /// name of a StatefulSet).
    pub member: Option<String>,
    /// Gateways of one group share one device list (default `default`).
    pub group: String,
    /// Adverts are repeated this often (default 2s); the broker's echo of them is the lease.
    #[serde(with = "duration")]
    pub heartbeat: Duration,
    /// A member that has heard no echo of its own advert for this long stops polling
    /// (default 10s); the others take its devices over after twice as long.
    #[serde(with = "duration")]
    pub lease: Duration,
    /// After (re)connecting, wait this long to learn the other members before taking
    /// devices (default 3s).
    #[serde(with = "duration")]
    pub settle: Duration,
}

impl Default for ShardConfig {
    fn default() -> Self {
        ShardConfig {
            enabled: false,
            member: None,
            group: "default".into(),
            heartbeat: Duration::from_secs(2),
            lease: Duration::from_secs(10),
            settle: Duration::from_secs(3),
        }
    }
}

impl ShardConfig {
    fn validate(&self, p: &mut Problems) {
        let level = |field: &str, v: &str, p: &mut Problems| topic_level(field, v, "name", p);
        level("gateway.shard.group", &self.group, p);
        if let Some(m) = &self.member {
            level("gateway.shard.member", m, p);
        }
        if self.heartbeat < Duration::from_millis(100) {
            p.push("gateway.shard.heartbeat", "must be at least 100ms");
        }
        if self.lease < self.heartbeat * 3 {
            p.push(
                "gateway.shard.lease",
                "must be at least three heartbeats, so one lost advert does not stop polling",
            );
        }
    }
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
            commands: true,
            shard: ShardConfig::default(),
            sparkplug: SparkplugConfig::default(),
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
        self.shard.validate(p);
        self.sparkplug.validate(p);
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
    /// Durable before publish (default true): every value is appended to the live log in
    /// `<dir>/live` (fsynced) before it is published, and kept there until the broker
    /// acknowledges it, so a kill -9 of the gateway loses no value it read. Off: values live
    /// in the MQTT client's memory until the broker has them.
    pub durable_publish: bool,
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            dir: PathBuf::from("nexus-data/gateway-buffer"),
            max_size: ByteSize(256 * 1024 * 1024),
            replay_rate: 5000,
            durable_publish: true,
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
