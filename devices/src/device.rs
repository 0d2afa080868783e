//! The compiled form of a device: its configuration, each tag's topic and its protocol's read
//! plan, computed once when the device list is loaded.

use std::sync::Arc;

use nexus_common::config::{DeviceConfig, ModbusTransport, OpcUaAuth, Protocol};
use nexus_common::topic::TopicError;
use nexus_common::{DeviceId, TagId, Topic};

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

/// Why a device's tags cannot be planned (the same for every protocol's plan).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("tag {tag} has no address")]
    NoAddress { tag: TagId },
    #[error("tag {tag} has no node_id")]
    NoNodeId { tag: TagId },
    /// The address does not parse (the configuration's parser says why).
    #[error("tag {tag}: {reason}")]
    Address { tag: TagId, reason: String },
    /// The address cannot hold the tag's data type.
    #[error("tag {tag}: {reason}")]
    DataType { tag: TagId, reason: String },
    #[error("tag {tag}: an S7 string holds 1 to 254 characters")]
    S7StringLength { tag: TagId, length: u16 },
    #[error("tag {tag}: {source}")]
    NodeId {
        tag: TagId,
        source: opcua::NodeIdError,
    },
}

/// A device that cannot be compiled, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    /// A tag's topic is not a valid UNS topic.
    #[error("device {device}: {source}")]
    Topic {
        device: DeviceId,
        source: TopicError,
    },
    #[error("device {device}: {source}")]
    Plan { device: DeviceId, source: PlanError },
}

impl CompileError {
    /// The device that failed to compile.
    pub fn device(&self) -> &DeviceId {
        match self {
            CompileError::Topic { device, .. } | CompileError::Plan { device, .. } => device,
        }
    }
}

impl Device {
    pub fn compile(cfg: DeviceConfig) -> Result<Device, CompileError> {
        let plan_err = |source: PlanError| CompileError::Plan {
            device: cfg.id.clone(),
            source,
        };
        let topics = cfg
            .tags
            .iter()
            .map(|t| Topic::for_tag(&cfg.uns_prefix, &cfg.id, &t.id))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| CompileError::Topic {
                device: cfg.id.clone(),
                source,
            })?;
        let plan = match cfg.protocol {
            Protocol::Modbus => {
                Plan::Modbus(Arc::new(modbus::ModbusPlan::new(&cfg).map_err(plan_err)?))
            }
            Protocol::S7 => Plan::S7(Arc::new(s7::S7Plan::new(&cfg).map_err(plan_err)?)),
            Protocol::Opcua => {
                Plan::OpcUa(Arc::new(opcua::OpcUaPlan::new(&cfg).map_err(plan_err)?))
            }
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

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use nexus_common::config::Config;

    use super::*;
    use crate::opcua::NodeIdError;

    fn modbus_device() -> DeviceConfig {
        let yaml = r#"
devices:
  - id: plc-1
    protocol: modbus
    uns_prefix: a/b
    connection: { host: h }
    tags:
      - { id: t, address: "HR:0", data_type: int16 }
"#;
        let cfg = Config::from_str_with_env(yaml, None, &[]).unwrap();
        cfg.devices[0].clone()
    }

    #[test]
    fn compile_errors_name_the_device_and_keep_their_cause() {
        let mut cfg = modbus_device();
        cfg.tags[0].address = None;
        let e = Device::compile(cfg.clone()).unwrap_err();
        assert_eq!(e.to_string(), "device plc-1: tag t has no address");
        assert_eq!(e.device().as_str(), "plc-1");
        let plan = e.source().and_then(|s| s.downcast_ref::<PlanError>());
        assert!(
            matches!(plan, Some(PlanError::NoAddress { tag }) if tag.as_str() == "t"),
            "{e:?}"
        );

        cfg.tags[0].address = Some("XY:1".into());
        let e = Device::compile(cfg.clone()).unwrap_err();
        assert!(e.to_string().starts_with("device plc-1: tag t: "), "{e}");
        assert!(matches!(
            e,
            CompileError::Plan {
                source: PlanError::Address { .. },
                ..
            }
        ));

        cfg.protocol = Protocol::Opcua;
        cfg.tags[0].node_id = Some("nonsense".into());
        let e = Device::compile(cfg).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"device plc-1: tag t: "nonsense" is not a node id like ns=2;s=Name"#
        );
        // CompileError -> PlanError -> NodeIdError -> the library's status code.
        let node = e
            .source()
            .and_then(|s| s.source())
            .and_then(|s| s.downcast_ref::<NodeIdError>());
        assert!(matches!(node, Some(NodeIdError::Syntax { .. })), "{e:?}");
        assert!(node.and_then(|n| n.source()).is_some());
    }

    #[test]
    fn s7_string_length_is_checked_per_tag() {
        let mut cfg = modbus_device();
        cfg.protocol = Protocol::S7;
        cfg.tags[0].address = Some("DB1.DBB0".into());
        cfg.tags[0].data_type = nexus_common::config::DataType::String;
        cfg.tags[0].length = Some(300);
        let e = Device::compile(cfg).unwrap_err();
        assert_eq!(
            e.to_string(),
            "device plc-1: tag t: an S7 string holds 1 to 254 characters"
        );
        assert!(matches!(
            e,
            CompileError::Plan {
                source: PlanError::S7StringLength { length: 300, .. },
                ..
            }
        ));
    }
}
