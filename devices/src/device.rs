//! The compiled form of a device: its configuration, each tag's topic and its protocol's read
//! plan, computed once when the device list is loaded.

use std::sync::Arc;

use nexus_common::config::{DeviceConfig, ModbusTransport, OpcUaAuth, Protocol};
use nexus_common::Topic;

use crate::{modbus, opcua, s7};

/// A device ready to poll.
#[derive(Debug, Clone)]
pub struct Device {
    pub cfg: DeviceConfig,
    pub topics: Vec<Topic>,
    pub plan: Plan,
}

/// How a device is read, precomputed once. The variant is the device's protocol: the pools
/// hand each plan to its own protocol's driver.
#[derive(Debug, Clone)]
pub enum Plan {
    Modbus(Arc<modbus::ModbusPlan>),
    S7(Arc<s7::S7Plan>),
    OpcUa(Arc<opcua::OpcUaPlan>),
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

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
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
            Protocol::Modbus => Plan::Modbus(Arc::new(modbus::ModbusPlan::new(&cfg).map_err(err)?)),
            Protocol::S7 => Plan::S7(Arc::new(s7::S7Plan::new(&cfg).map_err(err)?)),
            Protocol::Opcua => Plan::OpcUa(Arc::new(opcua::OpcUaPlan::new(&cfg).map_err(err)?)),
        };
        Ok(Device { cfg, topics, plan })
    }

    /// The pool key: devices on the same endpoint share a connection.
    pub fn endpoint(&self) -> String {
        let c = &self.cfg.connection;
        match self.cfg.protocol {
            Protocol::Modbus => match (&c.serial_port, c.transport.unwrap_or_default()) {
                (Some(port), ModbusTransport::Rtu) => format!("modbus-rtu:{port}"),
                _ => format!(
                    "modbus-{}:{}:{}",
                    if c.transport == Some(ModbusTransport::RtuOverTcp) {
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
                    Some(OpcUaAuth::User { username, .. }) => format!("user:{username}"),
                    Some(OpcUaAuth::Cert { cert, .. }) => format!("cert:{}", cert.display()),
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
