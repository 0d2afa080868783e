//! `devices`: what the gateway polls and the command handler may write. One shape for every
//! protocol; the protocol decides which connection keys and tag fields apply, and validation
//! says when one is missing or does not belong.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::types::{duration, opt_duration, Secret};
use super::Problems;
use crate::domain::{DeviceId, TagId};
use crate::topic::validate_uns_prefix;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Modbus,
    Opcua,
    S7,
}

/// OPC UA acquisition mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AcquisitionMode {
    #[default]
    Poll,
    Subscribe,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    pub id: DeviceId,
    pub protocol: Protocol,
    /// `enterprise/site/area/line`; tag topics are `uns_prefix/<device id>/<tag id>`.
    pub uns_prefix: String,
    /// Poll interval (default 1s).
    #[serde(with = "duration", default = "default_poll")]
    pub poll_interval: Duration,
    /// Disabled devices are validated but not polled (default true).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// OPC UA only: poll or subscribe (default poll).
    #[serde(default)]
    pub mode: Option<AcquisitionMode>,
    pub connection: ConnectionConfig,
    pub tags: Vec<TagConfig>,
}

fn default_poll() -> Duration {
    Duration::from_secs(1)
}

fn yes() -> bool {
    true
}

/// Modbus transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ModbusTransport {
    #[default]
    Tcp,
    Rtu,
    RtuOverTcp,
}

/// How a Modbus device's register bits (`HR:10.3`) are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BitWrite {
    /// Function 22, Mask Write Register: the device changes the one bit itself, so the other
    /// bits of the register keep whatever the PLC wrote meanwhile.
    #[default]
    Mask,
    /// Function 03 then 06 (read the register, write it back whole), for devices without
    /// function 22. Not atomic: a bit the PLC changes between the two requests is lost.
    ReadModifyWrite,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    None,
    Even,
    Odd,
}

/// The union of every protocol's connection keys; [`DeviceConfig`] validation checks that
/// the ones given belong to the device's protocol.
#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConnectionConfig {
    // Modbus TCP / RTU-over-TCP and S7
    pub host: Option<String>,
    pub port: Option<u16>,
    // Modbus
    pub transport: Option<ModbusTransport>,
    pub unit_id: Option<u8>,
    /// Serial device for RTU (`/dev/ttyUSB0`).
    pub serial_port: Option<String>,
    pub baud_rate: Option<u32>,
    pub parity: Option<Parity>,
    pub data_bits: Option<u8>,
    pub stop_bits: Option<u8>,
    /// Largest read request in registers (default 125) and bits (default 2000).
    pub max_registers_per_request: Option<u16>,
    /// Largest gap of unused registers merged into one read (default 10).
    pub max_register_gap: Option<u16>,
    /// How bits of holding registers are written (default `mask`).
    pub bit_write: Option<BitWrite>,
    // OPC UA
    pub endpoint: Option<String>,
    pub security_policy: Option<String>,
    pub security_mode: Option<String>,
    pub auth: Option<OpcUaAuth>,
    /// Subscription publishing interval and monitored-item sampling interval (default: the
    /// device's poll_interval).
    #[serde(default, deserialize_with = "opt_duration::deserialize")]
    pub publishing_interval: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration::deserialize")]
    pub sampling_interval: Option<Duration>,
    // S7
    pub rack: Option<u16>,
    pub slot: Option<u16>,
    /// Request/response timeout (default 2s).
    #[serde(default, deserialize_with = "opt_duration::deserialize")]
    pub timeout: Option<Duration>,
}

/// OPC UA authentication: `anonymous`, `{username, password}` or `{cert, key}`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum OpcUaAuth {
    Named(String),
    User { username: String, password: Secret },
    Cert { cert: PathBuf, key: PathBuf },
}

impl ConnectionConfig {
    pub fn timeout(&self) -> Duration {
        self.timeout.unwrap_or(Duration::from_secs(2))
    }
}

/// Tag data types. Modbus and OPC UA use the first group; S7 uses its own names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataType {
    Bool,
    Int16,
    Uint16,
    Int32,
    Uint32,
    Int64,
    Uint64,
    Float32,
    Float64,
    String,
    // S7 names
    Byte,
    Int,
    Dint,
    Word,
    Dword,
    Real,
    Lreal,
}

impl DataType {
    fn valid_for(self, p: Protocol) -> bool {
        use DataType::*;
        match p {
            Protocol::Modbus | Protocol::Opcua => {
                matches!(
                    self,
                    Bool | Int16
                        | Uint16
                        | Int32
                        | Uint32
                        | Int64
                        | Uint64
                        | Float32
                        | Float64
                        | String
                )
            }
            Protocol::S7 => matches!(
                self,
                Bool | Byte | Int | Dint | Word | Dword | Real | Lreal | String
            ),
        }
    }

    /// Modbus registers a value of this type spans (strings: `length` bytes, two a register).
    pub fn modbus_registers(self, string_len: u16) -> u16 {
        match self {
            DataType::Bool | DataType::Int16 | DataType::Uint16 => 1,
            DataType::Int32 | DataType::Uint32 | DataType::Float32 => 2,
            DataType::Int64 | DataType::Uint64 | DataType::Float64 => 4,
            DataType::String => string_len.div_ceil(2).max(1),
            _ => 1,
        }
    }

    pub fn is_numeric(self) -> bool {
        !matches!(self, DataType::Bool | DataType::String)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum ByteOrder {
    #[default]
    ABCD,
    DCBA,
    BADC,
    CDAB,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    #[default]
    Read,
    Write,
    Readwrite,
}

impl Access {
    pub fn writable(self) -> bool {
        matches!(self, Access::Write | Access::Readwrite)
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TagConfig {
    pub id: TagId,
    /// Modbus (`HR:100`, `IR:5`, `CO:1`, `DI:7`, bit in register `HR:100.3`) or S7 (`DB10.DBD4`).
    pub address: Option<String>,
    /// OPC UA node id (`ns=2;s=Demo.Temperature`).
    pub node_id: Option<String>,
    pub data_type: DataType,
    /// Modbus word/byte order for multi-register values (default ABCD).
    #[serde(default)]
    pub byte_order: ByteOrder,
    /// String length in bytes (strings only).
    pub length: Option<u16>,
    /// Engineering value = raw * scale + offset (defaults 1 and 0).
    pub scale: Option<f64>,
    pub offset: Option<f64>,
    pub unit: Option<String>,
    /// Publish only when the value moves more than this (absolute; default 0: every change).
    pub deadband: Option<f64>,
    #[serde(default)]
    pub access: Access,
    /// Limits a write command must respect.
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// Read back after a write to confirm it (default false).
    #[serde(default)]
    pub confirm: bool,
}

mod address;
#[cfg(test)]
mod tests;
mod validate;

pub use address::{ModbusAddress, ModbusTable, S7Address, S7Area};
use validate::{check_connection, check_tag};

impl DeviceConfig {
    pub(crate) fn validate(&self, at: &str, p: &mut Problems) {
        if let Err(e) = validate_uns_prefix(&self.uns_prefix) {
            p.push(format!("{at}.uns_prefix"), e.to_string());
        }
        if self.poll_interval < Duration::from_millis(10) {
            p.push(format!("{at}.poll_interval"), "must be at least 10ms");
        }
        check_connection(self, at, p);
        if self.tags.is_empty() {
            p.push(
                format!("{at}.tags"),
                format!("device {} has no tags", self.id),
            );
        }
        let mut ids: HashMap<&TagId, usize> = HashMap::new();
        let mut ranges: Vec<(usize, ModbusAddress, u16)> = Vec::new();
        for (i, t) in self.tags.iter().enumerate() {
            let tat = format!("{at}.tags[{i}]");
            if let Some(first) = ids.insert(&t.id, i) {
                p.push(
                    format!("{tat}.id"),
                    format!("device {}: tag {} is also tags[{first}]", self.id, t.id),
                );
            }
            if let Some((addr, count)) = check_tag(self, t, &tat, p) {
                ranges.push((i, addr, count));
            }
        }
        // Whole-register tags must not overlap; bit tags may share a register with each
        // other and with a tag that reads the whole word (a status word and its bits).
        for (n, (i, a, ca)) in ranges.iter().enumerate() {
            for (j, b, cb) in &ranges[..n] {
                if a.table != b.table || a.bit.is_some() || b.bit.is_some() {
                    continue;
                }
                let (a0, a1) = (u32::from(a.address), u32::from(a.address) + u32::from(*ca));
                let (b0, b1) = (u32::from(b.address), u32::from(b.address) + u32::from(*cb));
                if a0 < b1 && b0 < a1 {
                    p.push(
                        format!("{at}.tags[{i}].address"),
                        format!(
                            "device {}: tag {} overlaps tag {} (registers {}..{} and {}..{})",
                            self.id,
                            self.tags[*i].id,
                            self.tags[*j].id,
                            a0,
                            a1 - 1,
                            b0,
                            b1 - 1
                        ),
                    );
                }
            }
        }
    }
}

/// `index[i]` is the position of `devices[i]` in its file.
pub(crate) fn validate_devices(devices: &[DeviceConfig], index: &[usize], p: &mut Problems) {
    let mut ids: HashMap<&DeviceId, usize> = HashMap::new();
    for (d, &i) in devices.iter().zip(index) {
        let at = format!("devices[{i}]");
        if let Some(first) = ids.insert(&d.id, i) {
            p.push(
                format!("{at}.id"),
                format!("device {} is also devices[{first}]", d.id),
            );
        }
        d.validate(&at, p);
    }
}
