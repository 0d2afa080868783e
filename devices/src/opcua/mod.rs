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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use nexus_common::config::{AcquisitionMode, DeviceConfig, OpcUaAuth, OpcUaClientConfig, Protocol};
use nexus_common::{Quality, Value};
use opcua::client::Session;
use opcua::types::{
    AttributeId, DataValue, NodeId, ReadValueId, TimestampsToReturn, VariableId, Variant,
    WriteValue,
};

use crate::device::Device;
use crate::driver::{DeviceError, Driver, Reading, TransportError};

mod browse;
mod convert;
mod endpoint;
pub mod pki;
mod plan;
mod subscription;

pub use browse::{BrowseEntry, BrowseRefused};
pub use convert::{quality_of, reading_of, to_variant, value_of, ConvertError};
pub use plan::{resolve, NodeIdError, OpcUaPlan, TagSpec};
use subscription::Subscription;

/// Largest chunk when the server announces no limit.
const DEFAULT_CHUNK: usize = 1000;
/// Values the server may put in one publish response (the rest follow in the next).
const MAX_NOTIFICATIONS_PER_PUBLISH: u32 = 20_000;

/// Per device, per session.
struct DeviceSession {
    nodes: Vec<Result<NodeId, NodeIdError>>,
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
                        reason: e.to_string(),
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
}

#[async_trait]
impl Driver for OpcUaDriver {
    type Plan = OpcUaPlan;
    type Settings = OpcUaClientConfig;
    const PROTOCOL: Protocol = Protocol::Opcua;

    fn for_device(device: &DeviceConfig, settings: &OpcUaClientConfig) -> OpcUaDriver {
        OpcUaDriver::new(device, settings)
    }

    async fn connect(&mut self) -> Result<(), TransportError> {
        self.open().await
    }

    fn is_connected(&self) -> bool {
        self.session.is_some() && self.alive.load(Ordering::SeqCst)
    }

    async fn read(
        &mut self,
        device: &Device,
        plan: &OpcUaPlan,
        tags: Option<&[usize]>,
    ) -> Result<Vec<(usize, Reading)>, TransportError> {
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
        plan: &OpcUaPlan,
        tag: usize,
        value: &Value,
    ) -> Result<Result<(), DeviceError>, TransportError> {
        let session = self.session()?;
        let Some(spec) = plan.tags.get(tag) else {
            return Ok(Err(DeviceError(format!("no tag {tag}"))));
        };
        let node = match self.device_session(device, plan).nodes.get(tag) {
            Some(Ok(n)) => n.clone(),
            Some(Err(e)) => return Ok(Err(DeviceError(e.to_string()))),
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
            Err(e) => return Ok(Err(DeviceError(e.to_string()))),
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

    async fn close(&mut self) {
        self.drop_session();
    }
}
