//! The one `Driver` trait every protocol implements, and the compiled form of a device.
//!
//! Two layers of result, after tokio-modbus: the outer `Err(TransportError)` means the
//! connection is unusable (it is dropped, the breaker counts it, the device goes offline);
//! inside, each tag has its own [`Reading`], so a device exception (illegal address, a bad
//! OPC UA status) marks that tag bad and keeps the session.

pub mod modbus;
pub mod opcua;
pub mod s7;
pub mod value;

use std::time::Duration;

use async_trait::async_trait;
use nexus_common::config::{DeviceConfig, OpcUaClientConfig, Protocol};
use nexus_common::{Quality, Topic, Value};

/// The connection is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("connection failed: {0}")]
    Io(String),
    #[error("{0}")]
    Unsupported(String),
}

/// The device refused one operation (the session stays up).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("device refused: {0}")]
pub struct DeviceError(pub String);

/// One tag's outcome of a read.
#[derive(Debug, Clone, PartialEq)]
pub enum Reading {
    Good {
        value: Value,
        source_ts_ms: Option<i64>,
    },
    /// A value whose source says it is uncertain (OPC UA Uncertain* status codes).
    Uncertain {
        value: Value,
        quality: Quality,
        source_ts_ms: Option<i64>,
    },
    Bad {
        quality: Quality,
        reason: String,
    },
}

/// A device ready to poll: its config, each tag's topic, and the protocol's read plan.
#[derive(Debug, Clone)]
pub struct Device {
    pub cfg: DeviceConfig,
    pub topics: Vec<Topic>,
    pub plan: Plan,
}

/// How a device is read, precomputed once.
#[derive(Debug, Clone)]
pub enum Plan {
    Modbus(modbus::ModbusPlan),
    S7(s7::S7Plan),
    OpcUa(opcua::OpcUaPlan),
}

impl Plan {
    /// Read requests one poll of every tag sends (for S7: as packed for the PDU the PLC
    /// granted at the last poll).
    pub fn requests_per_poll(&self) -> usize {
        match self {
            Plan::Modbus(p) => p.requests.len(),
            Plan::S7(p) => p.requests_per_poll(),
            Plan::OpcUa(_) => 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("device {device}: {reason}")]
pub struct CompileError {
    pub device: String,
    pub reason: String,
}

impl Device {
    pub fn compile(cfg: DeviceConfig) -> Result<Device, CompileError> {
        let err = |reason: String| CompileError {
            device: cfg.id.to_string(),
            reason,
        };
        let topics = cfg
            .tags
            .iter()
            .map(|t| Topic::for_tag(&cfg.uns_prefix, &cfg.id, &t.id))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| err(e.to_string()))?;
        let plan = match cfg.protocol {
            Protocol::Modbus => Plan::Modbus(modbus::ModbusPlan::new(&cfg).map_err(err)?),
            Protocol::S7 => Plan::S7(s7::S7Plan::new(&cfg).map_err(err)?),
            Protocol::Opcua => Plan::OpcUa(opcua::OpcUaPlan::new(&cfg).map_err(err)?),
        };
        Ok(Device { cfg, topics, plan })
    }

    /// The pool key: devices on the same endpoint share a connection.
    pub fn endpoint(&self) -> String {
        let c = &self.cfg.connection;
        match self.cfg.protocol {
            Protocol::Modbus => match (&c.serial_port, c.transport.unwrap_or_default()) {
                (Some(port), nexus_common::config::ModbusTransport::Rtu) => {
                    format!("modbus-rtu:{port}")
                }
                _ => format!(
                    "modbus-{}:{}:{}",
                    if c.transport == Some(nexus_common::config::ModbusTransport::RtuOverTcp) {
                        "rtu-tcp"
                    } else {
                        "tcp"
                    },
                    c.host.as_deref().unwrap_or(""),
                    c.port.unwrap_or(502)
                ),
            },
            // Devices share a session only with the same security and identity.
            Protocol::Opcua => format!(
                "opcua:{}|{}/{}|{}",
                c.endpoint.as_deref().unwrap_or(""),
                c.security_policy.as_deref().unwrap_or("None"),
                c.security_mode.as_deref().unwrap_or(""),
                match &c.auth {
                    // No password here: keys appear in logs and metric labels.
                    Some(nexus_common::config::OpcUaAuth::User { username, .. }) => {
                        format!("user:{username}")
                    }
                    Some(nexus_common::config::OpcUaAuth::Cert { cert, .. }) => {
                        format!("cert:{}", cert.display())
                    }
                    _ => "anonymous".into(),
                }
            ),
            Protocol::S7 => format!(
                "s7:{}:{}",
                c.host.as_deref().unwrap_or(""),
                c.port.unwrap_or(102)
            ),
        }
    }
}

/// A protocol session to one endpoint.
#[async_trait]
pub trait Driver: Send {
    /// Open the session (also used to reconnect after a transport error).
    async fn connect(&mut self) -> Result<(), TransportError>;

    fn is_connected(&self) -> bool;

    /// Read `tags` of `device` (indices into its tag list; `None` reads them all with the
    /// precomputed plan). Returns one reading per requested tag, in the same order.
    async fn read(
        &mut self,
        device: &Device,
        tags: Option<&[usize]>,
    ) -> Result<Vec<(usize, Reading)>, TransportError>;

    /// Write one tag.
    async fn write(
        &mut self,
        device: &Device,
        tag: usize,
        value: &Value,
    ) -> Result<Result<(), DeviceError>, TransportError>;

    /// Stream the children of `node` (the protocol's root when `None`) into `out`; the inner
    /// error is the device's refusal. Only OPC UA has an address space to browse.
    async fn browse(
        &mut self,
        _node: Option<&str>,
        _out: tokio::sync::mpsc::Sender<opcua::BrowseEntry>,
    ) -> Result<Result<(), String>, TransportError> {
        Ok(Err("this protocol has no address space to browse".into()))
    }

    /// Close the session.
    async fn close(&mut self);
}

/// The error of a driver handed a device of another protocol (`what`: "a Modbus", ...).
pub(crate) fn wrong_protocol(device: &Device, what: &str) -> TransportError {
    TransportError::Unsupported(format!("device {} is not {what} device", device.cfg.id))
}

/// Put readings in the order the tags were asked for.
pub(crate) fn order_as_asked(out: &mut [(usize, Reading)], asked: &[usize]) {
    out.sort_by_key(|(t, _)| asked.iter().position(|x| x == t).unwrap_or(usize::MAX));
}

/// A driver for `device`'s endpoint (`opcua`: the OPC UA client's certificates).
pub fn driver_for(
    device: &Device,
    opcua: &OpcUaClientConfig,
) -> Result<Box<dyn Driver>, TransportError> {
    match &device.plan {
        Plan::Modbus(_) => Ok(Box::new(modbus::ModbusDriver::new(&device.cfg))),
        Plan::S7(_) => Ok(Box::new(s7::S7Driver::new(&device.cfg))),
        Plan::OpcUa(_) => Ok(Box::new(opcua::OpcUaDriver::new(&device.cfg, opcua))),
    }
}
