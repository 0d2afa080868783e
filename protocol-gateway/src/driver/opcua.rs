//! OPC UA on async-opcua: endpoints with every security policy and mode (or the most secure
//! one the server offers), anonymous, username/password or X.509 authentication, a client
//! certificate created at first start in the PKI directory; polling (Read in chunks of the
//! server's MaxNodesPerRead) and subscriptions (monitored items in chunks of
//! MaxMonitoredItemsPerCall); writes converted to the node's data type; browsing.
//!
//! One session per endpoint. Its event loop runs with reconnects off: when the connection is
//! lost the session is marked dead, the pool counts the failure (breaker, status offline) and
//! the next poll opens a new session, reading the namespace array again (so `nsu=` node ids
//! are re-resolved) and recreating every device's subscription and monitored items. Nothing of
//! the configuration is lost and no process restart is needed.
//!
//! Subscription notifications arrive on a synchronous callback; they are queued per device and
//! each poll hands every queued change to the poller (none is lost between polls), then, for
//! tags without news, the last value again, so the gateway's heartbeat republishes an
//! unchanging value. A deadband is asked of the server as a DataChangeFilter; where the server
//! refuses filters the item is created without one and the gateway's own deadband applies.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use nexus_common::config::{AcquisitionMode, DataType, DeviceConfig, OpcUaAuth, OpcUaClientConfig};
use nexus_common::{Quality, Value};
use opcua::client::{
    Client, ClientBuilder, DataChangeCallback, IdentityToken, Session, SessionPollResult,
};
use opcua::crypto::SecurityPolicy;
use opcua::types::{
    AttributeId, BrowseDescription, BrowseDirection, BrowseResultMask, DataChangeFilter,
    DataChangeTrigger, DataValue, DeadbandType, EndpointDescription, ExtensionObject,
    MessageSecurityMode, MonitoredItemCreateRequest, MonitoringMode, MonitoringParameters,
    NodeClassMask, NodeId, ReadValueId, ReferenceTypeId, StatusCode, SubStatusCode,
    TimestampsToReturn, UserTokenType, VariableId, Variant, WriteValue,
};
use tokio::sync::mpsc;

use super::value::widen;
use super::{wrong_protocol, Device, DeviceError, Driver, Plan, Reading, TransportError};

/// Largest chunk when the server announces no limit.
const DEFAULT_CHUNK: usize = 1000;
/// Values the server may put in one publish response (the rest follow in the next).
const MAX_NOTIFICATIONS_PER_PUBLISH: u32 = 20_000;

/// How one tag is read.
#[derive(Debug, Clone)]
pub struct TagSpec {
    /// The node id as configured (`ns=2;s=..`, `i=2258`, or `nsu=<uri>;s=..`).
    pub node: String,
    pub data_type: DataType,
    pub scale: Option<f64>,
    pub offset: Option<f64>,
    pub deadband: Option<f64>,
}

/// A device's acquisition plan.
#[derive(Debug, Clone)]
pub struct OpcUaPlan {
    pub tags: Vec<TagSpec>,
    pub mode: AcquisitionMode,
    pub publishing: Duration,
    pub sampling: Duration,
}

impl OpcUaPlan {
    pub fn new(cfg: &DeviceConfig) -> Result<OpcUaPlan, String> {
        let mut tags = Vec::with_capacity(cfg.tags.len());
        for t in &cfg.tags {
            let node = t
                .node_id
                .clone()
                .ok_or_else(|| format!("tag {} has no node_id", t.id))?;
            resolve(&node, &[]).map_err(|e| format!("tag {}: {e}", t.id))?;
            tags.push(TagSpec {
                node,
                data_type: t.data_type,
                scale: t.scale,
                offset: t.offset,
                deadband: t.deadband.filter(|d| *d > 0.0),
            });
        }
        let c = &cfg.connection;
        Ok(OpcUaPlan {
            tags,
            mode: cfg.mode.unwrap_or_default(),
            publishing: c.publishing_interval.unwrap_or(cfg.poll_interval),
            sampling: c.sampling_interval.unwrap_or(cfg.poll_interval),
        })
    }
}

/// Parse a configured node id; `nsu=<uri>;...` is looked up in `namespaces` (the server's
/// namespace array). With an empty array only the syntax is checked.
pub fn resolve(node: &str, namespaces: &[String]) -> Result<NodeId, String> {
    if let Some(rest) = node.strip_prefix("nsu=") {
        let (uri, id) = rest
            .split_once(';')
            .ok_or_else(|| format!("{node:?}: nsu=<uri>;<i|s|g|b>=<id> expected"))?;
        let index = if namespaces.is_empty() {
            0
        } else {
            namespaces
                .iter()
                .position(|n| n == uri)
                .ok_or_else(|| format!("{node:?}: the server has no namespace {uri:?}"))?
        };
        return NodeId::from_str(&format!("ns={index};{id}"))
            .map_err(|_| format!("{node:?} is not a node id"));
    }
    NodeId::from_str(node).map_err(|_| format!("{node:?} is not a node id like ns=2;s=Name"))
}

/// The gateway's quality for an OPC UA status code.
pub fn quality_of(status: StatusCode) -> Quality {
    use SubStatusCode as S;
    if status.is_good() {
        return Quality::Good;
    }
    let sub = status.sub_code();
    if status.is_uncertain() {
        return match sub {
            S::UncertainLastUsableValue => Quality::UncertainLastUsable,
            S::UncertainSensorNotAccurate => Quality::UncertainSensorNotAccurate,
            S::UncertainEngineeringUnitsExceeded => Quality::UncertainEuExceeded,
            S::UncertainSubNormal => Quality::UncertainSubNormal,
            _ => Quality::Uncertain,
        };
    }
    match sub {
        S::BadConfigurationError
        | S::BadNodeIdUnknown
        | S::BadNodeIdInvalid
        | S::BadAttributeIdInvalid
        | S::BadTypeMismatch
        | S::BadNotReadable => Quality::BadConfigError,
        S::BadNotConnected | S::BadServerNotConnected => Quality::BadNotConnected,
        S::BadDeviceFailure => Quality::BadDeviceFailure,
        S::BadSensorFailure => Quality::BadSensorFailure,
        S::BadOutOfService => Quality::BadOutOfService,
        S::BadCommunicationError | S::BadTimeout => Quality::BadCommFailure,
        _ => Quality::Bad,
    }
}

/// A variant as a gateway value (`None` for empty or structured values).
pub fn value_of(v: &Variant) -> Option<Value> {
    Some(match v {
        Variant::Boolean(b) => Value::Bool(*b),
        Variant::SByte(x) => Value::Int(i64::from(*x)),
        Variant::Byte(x) => Value::Int(i64::from(*x)),
        Variant::Int16(x) => Value::Int(i64::from(*x)),
        Variant::UInt16(x) => Value::Int(i64::from(*x)),
        Variant::Int32(x) => Value::Int(i64::from(*x)),
        Variant::UInt32(x) => Value::Int(i64::from(*x)),
        Variant::Int64(x) => Value::Int(*x),
        Variant::UInt64(x) => i64::try_from(*x).map(Value::Int).unwrap_or(Value::UInt(*x)),
        Variant::Float(x) => Value::Float(widen(*x)),
        Variant::Double(x) => Value::Float(*x),
        Variant::String(s) => Value::String(s.as_ref().to_owned()),
        Variant::LocalizedText(t) => Value::String(t.text.as_ref().to_owned()),
        Variant::DateTime(d) => Value::String(d.as_chrono().to_rfc3339()),
        Variant::StatusCode(c) => Value::String(c.to_string()),
        Variant::NodeId(n) => Value::String(n.to_string()),
        _ => return None,
    })
}

/// One tag's reading from a data value.
pub fn reading_of(spec: &TagSpec, dv: &DataValue) -> Reading {
    let status = dv.status.unwrap_or(StatusCode::Good);
    let source_ts_ms = dv
        .source_timestamp
        .map(|t| t.as_chrono().timestamp_millis());
    let quality = quality_of(status);
    if status.is_bad() {
        return Reading::Bad {
            quality,
            reason: format!("OPC UA status {status}"),
        };
    }
    let Some(raw) = dv.value.as_ref().and_then(value_of) else {
        return Reading::Bad {
            quality: Quality::BadConfigError,
            reason: format!(
                "no scalar value ({:?})",
                dv.value.as_ref().map(|v| v.type_id())
            ),
        };
    };
    let value = super::value::apply_scale(raw, spec.scale, spec.offset);
    if status.is_uncertain() {
        Reading::Uncertain {
            value,
            quality,
            source_ts_ms,
        }
    } else {
        Reading::Good {
            value,
            source_ts_ms,
        }
    }
}

/// Convert a value written by a user to the variant type `like` has (the node's current
/// value), after the inverse of scale/offset. `like` = `None`: from the tag's data type.
pub fn to_variant(
    value: &Value,
    like: Option<&Variant>,
    spec: &TagSpec,
) -> Result<Variant, String> {
    let engineering = |v: &Value| -> Result<f64, String> {
        let x = v
            .as_f64()
            .filter(|_| !matches!(v, Value::Bool(_)))
            .ok_or_else(|| {
                format!(
                    "a {} value cannot be written to a numeric node",
                    v.type_name()
                )
            })?;
        Ok((x - spec.offset.unwrap_or(0.0)) / spec.scale.unwrap_or(1.0))
    };
    let int = |min: f64, max: f64, name: &str| -> Result<i64, String> {
        let x = engineering(value)?;
        if x.fract() != 0.0 && spec.scale.is_none() && spec.offset.is_none() {
            return Err(format!("value {value} is not a whole number for {name}"));
        }
        let r = x.round();
        if !(min..=max).contains(&r) {
            return Err(format!("value {value} does not fit {name}"));
        }
        Ok(r as i64)
    };
    let template = match like {
        Some(v) if !matches!(v, Variant::Empty) => v.clone(),
        _ => match spec.data_type {
            DataType::Bool => Variant::Boolean(false),
            DataType::Int16 | DataType::Int => Variant::Int16(0),
            DataType::Uint16 | DataType::Word => Variant::UInt16(0),
            DataType::Int32 | DataType::Dint => Variant::Int32(0),
            DataType::Uint32 | DataType::Dword => Variant::UInt32(0),
            DataType::Int64 => Variant::Int64(0),
            DataType::Uint64 => Variant::UInt64(0),
            DataType::Float32 | DataType::Real => Variant::Float(0.0),
            DataType::Float64 | DataType::Lreal => Variant::Double(0.0),
            DataType::Byte => Variant::Byte(0),
            DataType::String => Variant::from(""),
        },
    };
    Ok(match template {
        Variant::Boolean(_) => Variant::Boolean(match value {
            Value::Bool(b) => *b,
            Value::Int(0) | Value::UInt(0) => false,
            Value::Int(1) | Value::UInt(1) => true,
            v => return Err(format!("a Boolean node takes true/false, not {v}")),
        }),
        Variant::SByte(_) => Variant::SByte(int(-128.0, 127.0, "SByte")? as i8),
        Variant::Byte(_) => Variant::Byte(int(0.0, 255.0, "Byte")? as u8),
        Variant::Int16(_) => Variant::Int16(int(-32768.0, 32767.0, "Int16")? as i16),
        Variant::UInt16(_) => Variant::UInt16(int(0.0, 65535.0, "UInt16")? as u16),
        Variant::Int32(_) => Variant::Int32(int(i32::MIN as f64, i32::MAX as f64, "Int32")? as i32),
        Variant::UInt32(_) => Variant::UInt32(int(0.0, u32::MAX as f64, "UInt32")? as u32),
        Variant::Int64(_) => match value {
            Value::Int(i) if spec.scale.is_none() && spec.offset.is_none() => Variant::Int64(*i),
            _ => Variant::Int64(int(i64::MIN as f64, i64::MAX as f64, "Int64")?),
        },
        Variant::UInt64(_) => match value {
            Value::UInt(u) if spec.scale.is_none() && spec.offset.is_none() => Variant::UInt64(*u),
            Value::Int(i) if *i >= 0 && spec.scale.is_none() && spec.offset.is_none() => {
                Variant::UInt64(*i as u64)
            }
            _ => Variant::UInt64(int(0.0, u64::MAX as f64, "UInt64")? as u64),
        },
        Variant::Float(_) => {
            let x = engineering(value)?;
            if x.is_finite() && x.abs() > f32::MAX as f64 {
                return Err(format!("value {value} does not fit Float"));
            }
            Variant::Float(x as f32)
        }
        Variant::Double(_) => Variant::Double(engineering(value)?),
        Variant::String(_) | Variant::LocalizedText(_) => match value {
            Value::String(s) => Variant::from(s.as_str()),
            v => return Err(format!("a String node takes text, not {v}")),
        },
        other => {
            return Err(format!(
                "writing to a node of type {:?} is not supported",
                other.type_id()
            ))
        }
    })
}

/// One child node found by browsing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BrowseEntry {
    pub node_id: String,
    pub browse_name: String,
    pub display_name: String,
    pub node_class: String,
    pub type_definition: String,
}

/// A device's subscription on the current session.
struct Subscription {
    /// Changes queued by the callback since the last poll.
    queue: Arc<Mutex<Vec<(usize, Reading)>>>,
    /// The last reading of each tag (for heartbeats).
    last: Vec<Option<Reading>>,
    /// Tags the server refused to monitor, with why.
    refused: Vec<(usize, Reading)>,
}

/// Per device, per session.
struct DeviceSession {
    nodes: Vec<Result<NodeId, String>>,
    subscription: Option<Subscription>,
}

/// A session to one OPC UA endpoint.
pub struct OpcUaDriver {
    url: String,
    policy: String,
    mode: String,
    auth: Option<OpcUaAuth>,
    timeout: Duration,
    settings: OpcUaClientConfig,
    session: Option<Arc<Session>>,
    alive: Arc<AtomicBool>,
    ended: Arc<Mutex<Option<String>>>,
    namespaces: Vec<String>,
    max_read: usize,
    max_items: usize,
    devices: HashMap<String, DeviceSession>,
}

fn policy_of(name: &str) -> SecurityPolicy {
    match name {
        "Basic256Sha256" => SecurityPolicy::Basic256Sha256,
        "Aes128_Sha256_RsaOaep" => SecurityPolicy::Aes128Sha256RsaOaep,
        "Aes256_Sha256_RsaPss" => SecurityPolicy::Aes256Sha256RsaPss,
        _ => SecurityPolicy::None,
    }
}

fn mode_of(name: &str) -> MessageSecurityMode {
    match name {
        "Sign" => MessageSecurityMode::Sign,
        "SignAndEncrypt" => MessageSecurityMode::SignAndEncrypt,
        _ => MessageSecurityMode::None,
    }
}

impl OpcUaDriver {
    pub fn new(cfg: &DeviceConfig, settings: &OpcUaClientConfig) -> OpcUaDriver {
        let c = &cfg.connection;
        OpcUaDriver {
            url: c.endpoint.clone().unwrap_or_default(),
            policy: c.security_policy.clone().unwrap_or_else(|| "None".into()),
            mode: c.security_mode.clone().unwrap_or_else(|| {
                if c.security_policy.as_deref().is_none_or(|p| p == "None") {
                    "None".into()
                } else {
                    "SignAndEncrypt".into()
                }
            }),
            auth: c.auth.clone(),
            timeout: c.timeout(),
            settings: settings.clone(),
            session: None,
            alive: Arc::new(AtomicBool::new(false)),
            ended: Arc::new(Mutex::new(None)),
            namespaces: Vec::new(),
            max_read: DEFAULT_CHUNK,
            max_items: DEFAULT_CHUNK,
            devices: HashMap::new(),
        }
    }

    /// MaxNodesPerRead and MaxMonitoredItemsPerCall of the session's server.
    pub fn limits(&self) -> (usize, usize) {
        (self.max_read, self.max_items)
    }

    fn client(&self) -> Result<Client, String> {
        // Sessions opening at once must not each create the client certificate at first start.
        static PKI: Mutex<()> = Mutex::new(());
        let _pki = PKI.lock().unwrap_or_else(|e| e.into_inner());
        std::fs::create_dir_all(&self.settings.pki_dir)
            .map_err(|e| format!("PKI directory {}: {e}", self.settings.pki_dir.display()))?;
        ClientBuilder::new()
            .application_name("Nexus gateway")
            .application_uri(self.settings.application_uri.clone())
            .product_uri("urn:nexus")
            .pki_dir(self.settings.pki_dir.clone())
            .create_sample_keypair(true)
            .trust_server_certs(self.settings.trust_server_certs)
            .session_retry_limit(0)
            .session_retry_initial(Duration::from_millis(100))
            .request_timeout(self.timeout.max(Duration::from_millis(500)))
            .keep_alive_interval(Duration::from_secs(2).max(self.timeout))
            .max_failed_keep_alive_count(2)
            .session_timeout(60_000)
            // A publish response of a large subscription carries thousands of values: the
            // library's default decoding limits (1000 array elements) would drop the session.
            .max_array_length(1_000_000)
            .max_message_size(64 * 1024 * 1024)
            .max_chunk_count(4096)
            .client()
            .map_err(|e| e.join("; "))
    }

    fn identity(&self) -> Result<(IdentityToken, UserTokenType), String> {
        Ok(match &self.auth {
            None => (IdentityToken::Anonymous, UserTokenType::Anonymous),
            Some(OpcUaAuth::Named(_)) => (IdentityToken::Anonymous, UserTokenType::Anonymous),
            Some(OpcUaAuth::User { username, password }) => (
                IdentityToken::UserName(username.clone(), password.expose().to_owned().into()),
                UserTokenType::UserName,
            ),
            Some(OpcUaAuth::Cert { cert, key }) => (
                IdentityToken::new_x509_path(cert, key)
                    .map_err(|e| format!("user certificate {}: {e}", cert.display()))?,
                UserTokenType::Certificate,
            ),
        })
    }

    /// The endpoint to use among those the server offers.
    fn choose(
        &self,
        client: &Client,
        offered: Vec<EndpointDescription>,
        token: UserTokenType,
    ) -> Result<EndpointDescription, String> {
        let takes_token = |e: &EndpointDescription| {
            e.user_identity_tokens
                .as_ref()
                .is_some_and(|ts| ts.iter().any(|t| t.token_type == token))
        };
        let list = |v: &[EndpointDescription]| {
            v.iter()
                .map(|e| {
                    format!(
                        "{}/{:?}",
                        SecurityPolicy::from_uri(e.security_policy_uri.as_ref()),
                        e.security_mode
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut candidates: Vec<EndpointDescription> = offered
            .iter()
            .filter(|e| client.is_supported_endpoint(e) && takes_token(e))
            .cloned()
            .collect();
        if self.policy == "Auto" {
            candidates.sort_by_key(|e| e.security_level);
            return candidates.pop().ok_or_else(|| {
                format!(
                    "no usable endpoint for {token:?} authentication among: {}",
                    list(&offered)
                )
            });
        }
        let (policy, mode) = (policy_of(&self.policy), mode_of(&self.mode));
        candidates
            .into_iter()
            .find(|e| {
                SecurityPolicy::from_uri(e.security_policy_uri.as_ref()) == policy
                    && e.security_mode == mode
            })
            .ok_or_else(|| {
                format!(
                    "the server offers no {}/{} endpoint for {token:?} authentication (it offers: {})",
                    self.policy,
                    self.mode,
                    list(&offered)
                )
            })
    }

    fn session(&self) -> Result<Arc<Session>, TransportError> {
        match &self.session {
            Some(s) if self.alive.load(Ordering::SeqCst) => Ok(s.clone()),
            _ => Err(TransportError::Io(self.lost_reason())),
        }
    }

    fn lost_reason(&self) -> String {
        self.ended
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| "the OPC UA session is closed".into())
    }

    /// A service error: the session is dropped when the connection itself failed.
    fn service_error(&mut self, what: &str, e: impl std::fmt::Display) -> TransportError {
        if !self.alive.load(Ordering::SeqCst) {
            return TransportError::Io(format!("{what}: {}", self.lost_reason()));
        }
        let msg = format!("{what}: {e}");
        if msg.contains("BadTimeout") {
            TransportError::Timeout(self.timeout)
        } else {
            TransportError::Io(msg)
        }
    }

    async fn read_u32(&self, session: &Session, id: VariableId) -> Option<u32> {
        let r = session
            .read(
                &[ReadValueId::new_value(id.into())],
                TimestampsToReturn::Neither,
                0.0,
            )
            .await
            .ok()?;
        match r.first()?.value.as_ref()? {
            Variant::UInt32(n) => Some(*n),
            Variant::UInt16(n) => Some(u32::from(*n)),
            _ => None,
        }
    }

    fn device_session(&mut self, device: &Device, plan: &OpcUaPlan) -> &mut DeviceSession {
        let namespaces = &self.namespaces;
        self.devices
            .entry(device.cfg.id.to_string())
            .or_insert_with(|| DeviceSession {
                nodes: plan
                    .tags
                    .iter()
                    .map(|t| resolve(&t.node, namespaces))
                    .collect(),
                subscription: None,
            })
    }

    /// Read `tags` with the Read service, in chunks of MaxNodesPerRead.
    async fn read_nodes(
        &mut self,
        device: &Device,
        plan: &OpcUaPlan,
        tags: &[usize],
    ) -> Result<Vec<(usize, Reading)>, TransportError> {
        let session = self.session()?;
        let max_read = self.max_read.max(1);
        let ds = self.device_session(device, plan);
        let mut out = Vec::with_capacity(tags.len());
        let mut ask: Vec<(usize, NodeId)> = Vec::with_capacity(tags.len());
        for &i in tags {
            match ds.nodes.get(i) {
                Some(Ok(n)) => ask.push((i, n.clone())),
                Some(Err(e)) => out.push((
                    i,
                    Reading::Bad {
                        quality: Quality::BadConfigError,
                        reason: e.clone(),
                    },
                )),
                None => {}
            }
        }
        for chunk in ask.chunks(max_read) {
            let ids: Vec<ReadValueId> = chunk
                .iter()
                .map(|(_, n)| ReadValueId::new_value(n.clone()))
                .collect();
            let r = tokio::time::timeout(
                self.timeout,
                session.read(&ids, TimestampsToReturn::Both, 0.0),
            )
            .await;
            let values = match r {
                Err(_) => {
                    self.drop_session();
                    return Err(TransportError::Timeout(self.timeout));
                }
                Ok(Err(e)) => return Err(self.service_error("Read", e)),
                Ok(Ok(v)) => v,
            };
            for (k, (i, _)) in chunk.iter().enumerate() {
                let reading = match values.get(k) {
                    Some(dv) => reading_of(&plan.tags[*i], dv),
                    None => Reading::Bad {
                        quality: Quality::BadDeviceFailure,
                        reason: "the server answered fewer values than asked".into(),
                    },
                };
                out.push((*i, reading));
            }
        }
        Ok(out)
    }

    /// Create the device's subscription and monitored items on this session.
    async fn subscribe(&mut self, device: &Device, plan: &OpcUaPlan) -> Result<(), TransportError> {
        let session = self.session()?;
        let max_items = self.max_items.max(1);
        let queue: Arc<Mutex<Vec<(usize, Reading)>>> = Arc::new(Mutex::new(Vec::new()));
        let q = queue.clone();
        let specs = plan.tags.clone();
        let callback = DataChangeCallback::new(move |dv, item| {
            // Handles are tag index + 1: the client replaces handle 0 with its own.
            let i = (item.client_handle() as usize).wrapping_sub(1);
            if let Some(spec) = specs.get(i) {
                q.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((i, reading_of(spec, &dv)));
            }
        });
        let timeout = self.timeout;
        let keep_alive = (10_000 / plan.publishing.as_millis().max(1) as u32).clamp(3, 100);
        let created = tokio::time::timeout(
            timeout,
            session.create_subscription(
                plan.publishing,
                keep_alive * 3,
                keep_alive,
                MAX_NOTIFICATIONS_PER_PUBLISH,
                0,
                true,
                callback,
            ),
        )
        .await;
        let sub_id = match created {
            Err(_) => return Err(TransportError::Timeout(timeout)),
            Ok(Err(e)) => return Err(self.service_error("CreateSubscription", e)),
            Ok(Ok(id)) => id,
        };
        let ds = self.device_session(device, plan);
        let mut refused = Vec::new();
        let mut items: Vec<(usize, MonitoredItemCreateRequest)> = Vec::new();
        for (i, node) in ds.nodes.iter().enumerate() {
            match node {
                Ok(n) => items.push((i, item_request(n, i, plan, true))),
                Err(e) => refused.push((
                    i,
                    Reading::Bad {
                        quality: Quality::BadConfigError,
                        reason: e.clone(),
                    },
                )),
            }
        }
        let mut retry_without_filter = Vec::new();
        for chunk in items.chunks(max_items) {
            let reqs: Vec<MonitoredItemCreateRequest> =
                chunk.iter().map(|(_, r)| r.clone()).collect();
            let r = tokio::time::timeout(
                timeout,
                session.create_monitored_items(sub_id, TimestampsToReturn::Both, reqs),
            )
            .await;
            let results = match r {
                Err(_) => return Err(TransportError::Timeout(timeout)),
                Ok(Err(e)) => return Err(self.service_error("CreateMonitoredItems", e)),
                Ok(Ok(v)) => v,
            };
            for ((i, _), res) in chunk.iter().zip(results) {
                let status = res.result.status_code;
                if status.is_good() {
                    continue;
                }
                let sub = status.sub_code();
                if matches!(
                    sub,
                    SubStatusCode::BadMonitoredItemFilterUnsupported
                        | SubStatusCode::BadFilterNotAllowed
                        | SubStatusCode::BadDeadbandFilterInvalid
                        | SubStatusCode::BadMonitoredItemFilterInvalid
                ) {
                    retry_without_filter.push(*i);
                } else {
                    refused.push((
                        *i,
                        Reading::Bad {
                            quality: quality_of(status),
                            reason: format!("the server refused to monitor the node: {status}"),
                        },
                    ));
                }
            }
        }
        if !retry_without_filter.is_empty() {
            tracing::info!(device = %device.cfg.id, items = retry_without_filter.len(), "the server refused deadband filters; the gateway applies the deadband itself");
            let ds = self.device_session(device, plan);
            let reqs: Vec<(usize, MonitoredItemCreateRequest)> = retry_without_filter
                .iter()
                .filter_map(|&i| match &ds.nodes[i] {
                    Ok(n) => Some((i, item_request(n, i, plan, false))),
                    Err(_) => None,
                })
                .collect();
            for chunk in reqs.chunks(max_items) {
                let r = tokio::time::timeout(
                    timeout,
                    session.create_monitored_items(
                        sub_id,
                        TimestampsToReturn::Both,
                        chunk.iter().map(|(_, r)| r.clone()).collect(),
                    ),
                )
                .await;
                let results = match r {
                    Err(_) => return Err(TransportError::Timeout(timeout)),
                    Ok(Err(e)) => return Err(self.service_error("CreateMonitoredItems", e)),
                    Ok(Ok(v)) => v,
                };
                for ((i, _), res) in chunk.iter().zip(results) {
                    if !res.result.status_code.is_good() {
                        refused.push((
                            *i,
                            Reading::Bad {
                                quality: quality_of(res.result.status_code),
                                reason: format!(
                                    "the server refused to monitor the node: {}",
                                    res.result.status_code
                                ),
                            },
                        ));
                    }
                }
            }
        }
        let ds = self.device_session(device, plan);
        ds.subscription = Some(Subscription {
            queue,
            last: vec![None; plan.tags.len()],
            refused,
        });
        Ok(())
    }

    fn drop_session(&mut self) {
        self.alive.store(false, Ordering::SeqCst);
        if let Some(s) = self.session.take() {
            s.disable_reconnects();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(2), s.disconnect()).await;
            });
        }
        self.devices.clear();
    }

    /// Stream the children of `node` (default: the Objects folder) into `out`.
    pub async fn browse_into(
        &mut self,
        node: Option<&str>,
        out: mpsc::Sender<BrowseEntry>,
    ) -> Result<Result<(), String>, TransportError> {
        let session = self.session()?;
        let start = match node {
            None | Some("") => NodeId::from(opcua::types::ObjectId::ObjectsFolder),
            Some(n) => match resolve(n, &self.namespaces) {
                Ok(id) => id,
                Err(e) => return Ok(Err(e)),
            },
        };
        let desc = BrowseDescription {
            node_id: start,
            browse_direction: BrowseDirection::Forward,
            reference_type_id: ReferenceTypeId::HierarchicalReferences.into(),
            include_subtypes: true,
            node_class_mask: NodeClassMask::all().bits(),
            result_mask: BrowseResultMask::All as u32,
        };
        let timeout = self.timeout;
        let first = tokio::time::timeout(timeout, session.browse(&[desc], 500, None)).await;
        let mut result = match first {
            Err(_) => return Err(TransportError::Timeout(timeout)),
            Ok(Err(e)) => return Err(self.service_error("Browse", e)),
            Ok(Ok(mut r)) => match r.pop() {
                Some(r) => r,
                None => return Ok(Ok(())),
            },
        };
        loop {
            if result.status_code.is_bad() {
                return Ok(Err(format!(
                    "the server refused to browse: {}",
                    result.status_code
                )));
            }
            for r in result.references.take().unwrap_or_default() {
                let entry = BrowseEntry {
                    node_id: r.node_id.node_id.to_string(),
                    browse_name: format!(
                        "{}:{}",
                        r.browse_name.namespace_index,
                        r.browse_name.name.as_ref()
                    ),
                    display_name: r.display_name.text.as_ref().to_owned(),
                    node_class: format!("{:?}", r.node_class),
                    type_definition: r.type_definition.node_id.to_string(),
                };
                if out.send(entry).await.is_err() {
                    // The HTTP client went away: release the continuation point.
                    if !result.continuation_point.is_null() {
                        let _ = session
                            .browse_next(true, &[result.continuation_point.clone()])
                            .await;
                    }
                    return Ok(Ok(()));
                }
            }
            if result.continuation_point.is_null() {
                return Ok(Ok(()));
            }
            let next = tokio::time::timeout(
                timeout,
                session.browse_next(false, &[result.continuation_point.clone()]),
            )
            .await;
            result = match next {
                Err(_) => return Err(TransportError::Timeout(timeout)),
                Ok(Err(e)) => return Err(self.service_error("BrowseNext", e)),
                Ok(Ok(mut r)) => match r.pop() {
                    Some(r) => r,
                    None => return Ok(Ok(())),
                },
            };
        }
    }
}

fn item_request(
    node: &NodeId,
    i: usize,
    plan: &OpcUaPlan,
    filter: bool,
) -> MonitoredItemCreateRequest {
    let deadband = plan.tags[i].deadband.filter(|_| filter);
    MonitoredItemCreateRequest {
        item_to_monitor: ReadValueId::new_value(node.clone()),
        monitoring_mode: MonitoringMode::Reporting,
        requested_parameters: MonitoringParameters {
            client_handle: i as u32 + 1,
            sampling_interval: plan.sampling.as_secs_f64() * 1000.0,
            filter: match deadband {
                // The server's deadband works on raw values; the tag's is in engineering units.
                Some(d) => ExtensionObject::from_message(DataChangeFilter {
                    trigger: DataChangeTrigger::StatusValue,
                    deadband_type: DeadbandType::Absolute as u32,
                    deadband_value: d / plan.tags[i].scale.unwrap_or(1.0).abs(),
                }),
                None => ExtensionObject::null(),
            },
            queue_size: 100,
            discard_oldest: true,
        },
    }
}

#[async_trait]
impl Driver for OpcUaDriver {
    async fn connect(&mut self) -> Result<(), TransportError> {
        self.drop_session();
        let url = self.url.clone();
        let err = |reason: String| TransportError::Connect {
            endpoint: url.clone(),
            reason,
        };
        let mut client = self.client().map_err(&err)?;
        let (identity, token) = self.identity().map_err(&err)?;
        let offered = tokio::time::timeout(
            self.timeout,
            client.get_server_endpoints_from_url(url.as_str()),
        )
        .await
        .map_err(|_| err(format!("no answer within {:?}", self.timeout)))?
        .map_err(|e| err(format!("GetEndpoints: {e}")))?;
        let endpoint = self.choose(&client, offered, token).map_err(&err)?;
        let chosen = format!(
            "{}/{:?}",
            SecurityPolicy::from_uri(endpoint.security_policy_uri.as_ref()),
            endpoint.security_mode
        );
        let (session, event_loop) = client
            .connect_to_endpoint_directly(endpoint, identity)
            .map_err(|e| err(e.to_string()))?;
        let alive = Arc::new(AtomicBool::new(true));
        let ended = Arc::new(Mutex::new(None::<String>));
        let (a, e) = (alive.clone(), ended.clone());
        let (dead_tx, mut dead_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let stream = event_loop.enter();
            futures::pin_mut!(stream);
            let why = loop {
                match stream.next().await {
                    None => break "the session was closed".to_owned(),
                    Some(Err(code)) => break format!("the connection failed: {code}"),
                    Some(Ok(SessionPollResult::ConnectionLost(code))) => {
                        break format!("the connection was lost: {code}")
                    }
                    Some(Ok(SessionPollResult::ReconnectFailed(code))) => {
                        break format!("the connection failed: {code}")
                    }
                    Some(Ok(_)) => {}
                }
            };
            a.store(false, Ordering::SeqCst);
            *e.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
            let _ = dead_tx.send(true);
        });
        let connected = tokio::time::timeout(self.timeout * 3, async {
            tokio::select! {
                ok = session.wait_for_connection() => ok,
                _ = dead_rx.wait_for(|d| *d) => false,
            }
        })
        .await;
        let fail = |why: String| {
            session.disable_reconnects();
            let s = session.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(1), s.disconnect()).await;
            });
            err(why)
        };
        match connected {
            Err(_) => return Err(fail(format!("no session within {:?}", self.timeout * 3))),
            Ok(false) => {
                let why = ended
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
                    .unwrap_or_else(|| "the session could not be activated".into());
                let hint = if why.contains("Certificate") || why.contains("Security") {
                    format!(
                        " (is the server's certificate in {}/trusted? unknown ones are saved in rejected/)",
                        self.settings.pki_dir.display()
                    )
                } else {
                    String::new()
                };
                return Err(fail(format!("{chosen}: {why}{hint}")));
            }
            Ok(true) => {}
        }
        self.namespaces = match session.read_namespace_array().await {
            Ok(map) => {
                let mut v: Vec<(u16, String)> = map
                    .known_namespaces()
                    .iter()
                    .map(|(k, i)| (*i, k.clone()))
                    .collect();
                v.sort();
                v.into_iter().map(|(_, s)| s).collect()
            }
            Err(e) => return Err(fail(format!("reading the namespace array: {e}"))),
        };
        let limit = |n: Option<u32>| match n {
            Some(0) | None => DEFAULT_CHUNK,
            Some(n) => n as usize,
        };
        self.max_read = limit(
            self.read_u32(
                &session,
                VariableId::Server_ServerCapabilities_OperationLimits_MaxNodesPerRead,
            )
            .await,
        );
        self.max_items = limit(
            self.read_u32(
                &session,
                VariableId::Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall,
            )
            .await,
        );
        tracing::info!(endpoint = %self.url, security = %chosen, max_nodes_per_read = self.max_read, max_monitored_items_per_call = self.max_items, "opc ua session open");
        self.alive = alive;
        self.ended = ended;
        self.session = Some(session);
        self.devices.clear();
        Ok(())
    }

    fn is_connected(&self) -> bool {
        self.session.is_some() && self.alive.load(Ordering::SeqCst)
    }

    async fn read(
        &mut self,
        device: &Device,
        tags: Option<&[usize]>,
    ) -> Result<Vec<(usize, Reading)>, TransportError> {
        let Plan::OpcUa(plan) = &device.plan else {
            return Err(wrong_protocol(device, "an OPC UA"));
        };
        self.session()?;
        if let Some(list) = tags {
            return self.read_nodes(device, plan, list).await;
        }
        if plan.mode == AcquisitionMode::Poll {
            let all: Vec<usize> = (0..plan.tags.len()).collect();
            return self.read_nodes(device, plan, &all).await;
        }
        if self.device_session(device, plan).subscription.is_none() {
            self.subscribe(device, plan).await?;
        }
        let ds = self.device_session(device, plan);
        let Some(sub) = ds.subscription.as_mut() else {
            return Ok(Vec::new());
        };
        let news: Vec<(usize, Reading)> =
            std::mem::take(&mut *sub.queue.lock().unwrap_or_else(|e| e.into_inner()));
        let mut fresh = vec![false; sub.last.len()];
        for (i, r) in &news {
            fresh[*i] = true;
            sub.last[*i] = Some(r.clone());
        }
        let mut out = sub.refused.clone();
        out.extend(news);
        for (i, last) in sub.last.iter().enumerate() {
            if let (false, Some(r)) = (fresh[i], last) {
                out.push((i, r.clone()));
            }
        }
        Ok(out)
    }

    async fn write(
        &mut self,
        device: &Device,
        tag: usize,
        value: &Value,
    ) -> Result<Result<(), DeviceError>, TransportError> {
        let Plan::OpcUa(plan) = &device.plan else {
            return Err(wrong_protocol(device, "an OPC UA"));
        };
        let session = self.session()?;
        let Some(spec) = plan.tags.get(tag) else {
            return Ok(Err(DeviceError(format!("no tag {tag}"))));
        };
        let node = match self.device_session(device, plan).nodes.get(tag) {
            Some(Ok(n)) => n.clone(),
            Some(Err(e)) => return Ok(Err(DeviceError(e.clone()))),
            None => return Ok(Err(DeviceError(format!("no tag {tag}")))),
        };
        // The node's current value tells its data type.
        let current = tokio::time::timeout(
            self.timeout,
            session.read(
                &[ReadValueId::new_value(node.clone())],
                TimestampsToReturn::Neither,
                0.0,
            ),
        )
        .await;
        let like = match current {
            Err(_) => return Err(TransportError::Timeout(self.timeout)),
            Ok(Err(e)) => return Err(self.service_error("Read", e)),
            Ok(Ok(v)) => v.into_iter().next().and_then(|dv| dv.value),
        };
        let variant = match to_variant(value, like.as_ref(), spec) {
            Ok(v) => v,
            Err(e) => return Ok(Err(DeviceError(e))),
        };
        let wv = WriteValue {
            node_id: node,
            attribute_id: AttributeId::Value as u32,
            index_range: Default::default(),
            value: DataValue::value_only(variant),
        };
        let r = tokio::time::timeout(self.timeout, session.write(&[wv])).await;
        match r {
            Err(_) => Err(TransportError::Timeout(self.timeout)),
            Ok(Err(e)) => Err(self.service_error("Write", e)),
            Ok(Ok(codes)) => match codes.first() {
                Some(c) if c.is_good() => Ok(Ok(())),
                Some(c) => Ok(Err(DeviceError(format!(
                    "the server refused the write: {c}"
                )))),
                None => Ok(Err(DeviceError("the server answered no status".into()))),
            },
        }
    }

    async fn browse(
        &mut self,
        node: Option<&str>,
        out: mpsc::Sender<BrowseEntry>,
    ) -> Result<Result<(), String>, TransportError> {
        self.browse_into(node, out).await
    }

    async fn close(&mut self) {
        self.drop_session();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dt: DataType) -> TagSpec {
        TagSpec {
            node: "ns=2;s=x".into(),
            data_type: dt,
            scale: None,
            offset: None,
            deadband: None,
        }
    }

    #[test]
    fn node_ids_parse_and_namespace_uris_resolve() {
        assert_eq!(
            resolve("ns=2;s=Demo.T", &[]).unwrap(),
            NodeId::new(2, "Demo.T")
        );
        assert_eq!(resolve("i=2258", &[]).unwrap(), NodeId::new(0, 2258u32));
        let ns = vec![
            "http://opcfoundation.org/UA/".to_owned(),
            "urn:a".into(),
            "urn:b".into(),
        ];
        assert_eq!(resolve("nsu=urn:b;s=T", &ns).unwrap(), NodeId::new(2, "T"));
        assert!(resolve("nsu=urn:zzz;s=T", &ns)
            .unwrap_err()
            .contains("no namespace"));
        assert!(resolve("nonsense", &[]).is_err());
    }

    #[test]
    fn statuses_map_to_qualities_and_values_convert() {
        assert_eq!(quality_of(StatusCode::Good), Quality::Good);
        assert_eq!(
            quality_of(StatusCode::BadNodeIdUnknown),
            Quality::BadConfigError
        );
        assert_eq!(
            quality_of(StatusCode::BadCommunicationError),
            Quality::BadCommFailure
        );
        assert_eq!(
            quality_of(StatusCode::UncertainLastUsableValue),
            Quality::UncertainLastUsable
        );
        let dv = DataValue {
            value: Some(Variant::Float(60.75)),
            status: Some(StatusCode::UncertainSensorNotAccurate),
            source_timestamp: Some(opcua::types::DateTime::from(
                1_700_000_000_000i64 * 10_000 + 116_444_736_000_000_000,
            )),
            ..Default::default()
        };
        match reading_of(&spec(DataType::Float32), &dv) {
            Reading::Uncertain {
                value,
                quality,
                source_ts_ms,
            } => {
                assert_eq!(value, Value::Float(60.75));
                assert_eq!(quality, Quality::UncertainSensorNotAccurate);
                assert_eq!(source_ts_ms, Some(1_700_000_000_000));
            }
            other => panic!("{other:?}"),
        }
        let bad = DataValue {
            value: None,
            status: Some(StatusCode::BadNodeIdUnknown),
            ..Default::default()
        };
        assert!(matches!(
            reading_of(&spec(DataType::Int32), &bad),
            Reading::Bad {
                quality: Quality::BadConfigError,
                ..
            }
        ));
    }

    #[test]
    fn writes_take_the_node_type_and_check_ranges() {
        let s = spec(DataType::Float64);
        assert_eq!(
            to_variant(&Value::Int(7), Some(&Variant::Int16(0)), &s).unwrap(),
            Variant::Int16(7)
        );
        assert!(
            to_variant(&Value::Int(70_000), Some(&Variant::Int16(0)), &s)
                .unwrap_err()
                .contains("does not fit Int16")
        );
        assert!(to_variant(&Value::Float(1.5), Some(&Variant::Int32(0)), &s)
            .unwrap_err()
            .contains("whole number"));
        assert_eq!(
            to_variant(&Value::Float(1.5), Some(&Variant::Double(0.0)), &s).unwrap(),
            Variant::Double(1.5)
        );
        assert_eq!(
            to_variant(&Value::Bool(true), Some(&Variant::Boolean(false)), &s).unwrap(),
            Variant::Boolean(true)
        );
        assert!(to_variant(&Value::String("x".into()), Some(&Variant::Double(0.0)), &s).is_err());
        assert_eq!(
            to_variant(&Value::String("ok".into()), Some(&Variant::from("")), &s).unwrap(),
            Variant::from("ok")
        );
        // Without a current value the tag's data type decides; scale is undone first.
        let scaled = TagSpec {
            scale: Some(0.1),
            ..spec(DataType::Int16)
        };
        assert_eq!(
            to_variant(&Value::Float(61.5), None, &scaled).unwrap(),
            Variant::Int16(615)
        );
    }
}
