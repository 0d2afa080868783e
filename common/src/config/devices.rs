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

/// Modbus register tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModbusTable {
    Coil,
    DiscreteInput,
    InputRegister,
    HoldingRegister,
}

/// A parsed Modbus address: table, 0-based protocol address, optional bit in a register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModbusAddress {
    pub table: ModbusTable,
    pub address: u16,
    pub bit: Option<u8>,
}

/// S7 memory areas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum S7Area {
    /// Process inputs (`I`).
    Input,
    /// Process outputs (`Q`).
    Output,
    /// Flags / bit memory (`M`).
    Merker,
    /// A data block (`DB<n>`).
    Db(u16),
}

/// A parsed S7 address: `DB10.DBX2.3`, `DB10.DBB1`, `DB10.DBW2`, `DB10.DBD4`, `M20.1`, `MB20`,
/// `MW20`, `MD20`, `I0.1`, `IB0`, `IW0`, `ID0`, `Q0.0`, `QB0`, `QW0`, `QD0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct S7Address {
    pub area: S7Area,
    /// Byte offset in the area.
    pub byte: u32,
    /// Bit 0-7 for `X` (and `M20.1`-style) addresses.
    pub bit: Option<u8>,
    /// Bytes the size letter names: 0 for a bit, 1 for `B`, 2 for `W`, 4 for `D`.
    pub width: u8,
}

impl S7Address {
    pub fn parse(s: &str) -> Result<S7Address, String> {
        let bad = |why: &str| {
            format!("invalid S7 address {s:?}: {why} (expected e.g. DB10.DBD4, DB10.DBX2.3, MW20, M20.1, I0.1, Q0.0, IB0)")
        };
        let t = s.trim().to_ascii_uppercase();
        let (area, rest) = if let Some(r) = t.strip_prefix("DB") {
            let (n, r) = r
                .split_once('.')
                .ok_or_else(|| bad("a data block address is DB<n>.DB<X|B|W|D><byte>"))?;
            let n: u16 = n
                .parse()
                .map_err(|_| bad("the data block number must be 1-65535"))?;
            if n == 0 {
                return Err(bad("the data block number must be 1-65535"));
            }
            let r = r
                .strip_prefix("DB")
                .ok_or_else(|| bad("after DB<n>. comes DBX, DBB, DBW or DBD"))?;
            (S7Area::Db(n), r.to_owned())
        } else {
            let mut c = t.chars();
            let area = match c.next() {
                Some('M') => S7Area::Merker,
                Some('I') | Some('E') => S7Area::Input,
                Some('Q') | Some('A') => S7Area::Output,
                _ => return Err(bad("unknown area; use DB, M, I or Q")),
            };
            let r = c.as_str();
            // `M20.1` is a bit without the X.
            let r = if r.starts_with(|ch: char| ch.is_ascii_digit()) {
                format!("X{r}")
            } else {
                r.to_owned()
            };
            (area, r)
        };
        let mut c = rest.chars();
        let width = match c.next() {
            Some('X') => 0,
            Some('B') => 1,
            Some('W') => 2,
            Some('D') => 4,
            _ => return Err(bad("the size letter must be X, B, W or D")),
        };
        let rest = c.as_str();
        let (byte, bit) = match (width, rest.split_once('.')) {
            (0, Some((b, bit))) => (b, Some(bit)),
            (0, None) => return Err(bad("a bit address needs .<bit> (0-7)")),
            (_, Some(_)) => return Err(bad("only X (bit) addresses take .<bit>")),
            (_, None) => (rest, None),
        };
        let byte: u32 = byte
            .parse()
            .map_err(|_| bad("the byte offset must be a number"))?;
        if byte > 0x1F_FFFF {
            return Err(bad("the byte offset is above 2097151"));
        }
        let bit = match bit {
            None => None,
            Some(b) => match b.parse::<u8>() {
                Ok(b) if b <= 7 => Some(b),
                _ => return Err(bad("the bit must be 0-7")),
            },
        };
        Ok(S7Address {
            area,
            byte,
            bit,
            width,
        })
    }

    /// Bytes a value of `dt` occupies from this address (strings: 2 header bytes + `length`).
    pub fn size(&self, dt: DataType, length: u16) -> u32 {
        match dt {
            DataType::Bool => 1,
            DataType::Byte => 1,
            DataType::Int | DataType::Word => 2,
            DataType::Dint | DataType::Dword | DataType::Real => 4,
            DataType::Lreal => 8,
            DataType::String => 2 + u32::from(length),
            _ => u32::from(self.width.max(1)),
        }
    }

    /// Whether the size letter fits the data type.
    pub fn check_type(&self, dt: DataType) -> Result<(), String> {
        let ok = match dt {
            DataType::Bool => self.width == 0,
            DataType::Byte => self.width == 1,
            DataType::Int | DataType::Word => self.width == 2,
            DataType::Dint | DataType::Dword | DataType::Real => self.width == 4,
            DataType::Lreal => matches!(self.width, 1 | 4),
            DataType::String => self.width == 1,
            _ => false,
        };
        if ok {
            return Ok(());
        }
        let want = match dt {
            DataType::Bool => "an X (bit) address, e.g. DB1.DBX0.0 or M0.0",
            DataType::Byte => "a B address, e.g. DB1.DBB0 or MB0",
            DataType::Int | DataType::Word => "a W address, e.g. DB1.DBW0 or MW0",
            DataType::Dint | DataType::Dword | DataType::Real => {
                "a D address, e.g. DB1.DBD0 or MD0"
            }
            DataType::Lreal => "a B or D address of its first byte, e.g. DB1.DBD0",
            DataType::String => "a B address of its first byte, e.g. DB1.DBB0",
            _ => "an S7 data type",
        };
        Err(format!("{dt:?} needs {want}").to_lowercase())
    }
}

impl ModbusAddress {
    pub fn parse(s: &str) -> Result<ModbusAddress, String> {
        let bad = || {
            format!("invalid Modbus address {s:?}: expected HR:<n>, IR:<n>, CO:<n> or DI:<n>, with .<bit> (0-15) for a bit of a register")
        };
        let (prefix, rest) = s.split_once(':').ok_or_else(bad)?;
        let table = match prefix.trim().to_ascii_uppercase().as_str() {
            "HR" => ModbusTable::HoldingRegister,
            "IR" => ModbusTable::InputRegister,
            "CO" => ModbusTable::Coil,
            "DI" => ModbusTable::DiscreteInput,
            _ => return Err(bad()),
        };
        let (addr, bit) = match rest.split_once('.') {
            Some((a, b)) => (a, Some(b)),
            None => (rest, None),
        };
        let address: u32 = addr.trim().parse().map_err(|_| bad())?;
        let address =
            u16::try_from(address).map_err(|_| format!("Modbus address {s:?} is above 65535"))?;
        let bit = match bit {
            None => None,
            Some(b) => {
                if matches!(table, ModbusTable::Coil | ModbusTable::DiscreteInput) {
                    return Err(format!(
                        "Modbus address {s:?}: coils and discrete inputs have no bits"
                    ));
                }
                let b: u8 = b.trim().parse().map_err(|_| bad())?;
                if b > 15 {
                    return Err(format!("Modbus address {s:?}: bit {b} is above 15"));
                }
                Some(b)
            }
        };
        Ok(ModbusAddress {
            table,
            address,
            bit,
        })
    }

    pub fn is_bit_table(&self) -> bool {
        matches!(self.table, ModbusTable::Coil | ModbusTable::DiscreteInput)
    }
}

fn check_connection(d: &DeviceConfig, at: &str, p: &mut Problems) {
    let c = &d.connection;
    let proto = d.protocol;
    let mut not_for = |present: bool, key: &str| {
        if present {
            p.push(
                format!("{at}.connection.{key}"),
                format!("{key} does not apply to a {proto:?} device"),
            );
        }
    };
    match proto {
        Protocol::Modbus => {
            not_for(c.endpoint.is_some(), "endpoint");
            not_for(c.security_policy.is_some(), "security_policy");
            not_for(c.security_mode.is_some(), "security_mode");
            not_for(c.auth.is_some(), "auth");
            not_for(c.rack.is_some(), "rack");
            not_for(c.slot.is_some(), "slot");
            not_for(c.publishing_interval.is_some(), "publishing_interval");
            not_for(c.sampling_interval.is_some(), "sampling_interval");
            match c.transport.unwrap_or_default() {
                ModbusTransport::Tcp | ModbusTransport::RtuOverTcp => {
                    if c.host.as_deref().is_none_or(str::is_empty) {
                        p.push(
                            format!("{at}.connection"),
                            "a Modbus TCP device needs connection.host",
                        );
                    }
                }
                ModbusTransport::Rtu => {
                    if c.serial_port.is_none() {
                        p.push(
                            format!("{at}.connection"),
                            "a Modbus RTU device needs connection.serial_port",
                        );
                    }
                }
            }
            if let Some(n) = c.max_registers_per_request {
                if n == 0 || n > 125 {
                    p.push(
                        format!("{at}.connection.max_registers_per_request"),
                        "must be 1 to 125",
                    );
                }
            }
        }
        Protocol::Opcua => {
            for (present, key) in [
                (c.unit_id.is_some(), "unit_id"),
                (c.transport.is_some(), "transport"),
                (c.serial_port.is_some(), "serial_port"),
                (c.rack.is_some(), "rack"),
                (c.slot.is_some(), "slot"),
                (c.host.is_some(), "host"),
            ] {
                not_for(present, key);
            }
            match &c.endpoint {
                Some(e) if e.starts_with("opc.tcp://") => {}
                Some(e) => p.push(
                    format!("{at}.connection.endpoint"),
                    format!("{e:?} is not an opc.tcp:// URL"),
                ),
                None => p.push(
                    format!("{at}.connection"),
                    "an OPC UA device needs connection.endpoint",
                ),
            }
            if let Some(sp) = &c.security_policy {
                if ![
                    "Auto",
                    "None",
                    "Basic256Sha256",
                    "Aes128_Sha256_RsaOaep",
                    "Aes256_Sha256_RsaPss",
                ]
                .contains(&sp.as_str())
                {
                    p.push(
                        format!("{at}.connection.security_policy"),
                        format!("unknown policy {sp:?} (Auto, None, Basic256Sha256, Aes128_Sha256_RsaOaep, Aes256_Sha256_RsaPss)"),
                    );
                }
            }
            if let Some(sm) = &c.security_mode {
                if !["None", "Sign", "SignAndEncrypt"].contains(&sm.as_str()) {
                    p.push(
                        format!("{at}.connection.security_mode"),
                        format!("unknown mode {sm:?} (None, Sign, SignAndEncrypt)"),
                    );
                }
            }
            if let Some(OpcUaAuth::Named(n)) = &c.auth {
                if n != "anonymous" {
                    p.push(
                        format!("{at}.connection.auth"),
                        format!("{n:?}: use anonymous, {{username, password}} or {{cert, key}}"),
                    );
                }
            }
        }
        Protocol::S7 => {
            for (present, key) in [
                (c.unit_id.is_some(), "unit_id"),
                (c.transport.is_some(), "transport"),
                (c.serial_port.is_some(), "serial_port"),
                (c.endpoint.is_some(), "endpoint"),
                (c.auth.is_some(), "auth"),
                (c.publishing_interval.is_some(), "publishing_interval"),
                (c.sampling_interval.is_some(), "sampling_interval"),
                (
                    c.max_registers_per_request.is_some(),
                    "max_registers_per_request",
                ),
                (c.max_register_gap.is_some(), "max_register_gap"),
            ] {
                not_for(present, key);
            }
            if c.host.as_deref().is_none_or(str::is_empty) {
                p.push(
                    format!("{at}.connection"),
                    "an S7 device needs connection.host",
                );
            }
        }
    }
    if d.mode.is_some() && proto != Protocol::Opcua {
        p.push(format!("{at}.mode"), "mode applies to OPC UA devices only");
    }
}

fn check_tag(
    d: &DeviceConfig,
    t: &TagConfig,
    at: &str,
    p: &mut Problems,
) -> Option<(ModbusAddress, u16)> {
    let proto = d.protocol;
    if !t.data_type.valid_for(proto) {
        p.push(
            format!("{at}.data_type"),
            format!("{:?} is not a {proto:?} data type", t.data_type).to_lowercase(),
        );
    }
    if t.data_type == DataType::String && t.length.is_none() && proto != Protocol::Opcua {
        p.push(format!("{at}.length"), "a string tag needs length (bytes)");
    }
    if let (Some(min), Some(max)) = (t.min, t.max) {
        if min > max {
            p.push(format!("{at}.min"), format!("min {min} is above max {max}"));
        }
    }
    if let Some(db) = t.deadband {
        if db.is_nan() || db < 0.0 {
            p.push(format!("{at}.deadband"), "must be zero or positive");
        }
    }
    if t.scale == Some(0.0) {
        p.push(format!("{at}.scale"), "scale 0 would make every value 0");
    }
    if (t.scale.is_some() || t.offset.is_some() || t.deadband.is_some())
        && !t.data_type.is_numeric()
    {
        p.push(
            at.to_owned(),
            "scale, offset and deadband apply to numeric tags only",
        );
    }
    let mut modbus = None;
    match proto {
        Protocol::Modbus | Protocol::S7 => {
            if t.node_id.is_some() {
                p.push(
                    format!("{at}.node_id"),
                    format!("node_id does not apply to a {proto:?} device"),
                );
            }
            match &t.address {
                None => p.push(at.to_owned(), "missing address"),
                Some(a) if proto == Protocol::Modbus => match ModbusAddress::parse(a) {
                    Err(e) => p.push(format!("{at}.address"), e),
                    Ok(addr) => {
                        if addr.is_bit_table() && t.data_type != DataType::Bool {
                            p.push(
                                format!("{at}.data_type"),
                                "coils and discrete inputs hold bool values",
                            );
                        }
                        if addr.bit.is_some() && t.data_type != DataType::Bool {
                            p.push(format!("{at}.data_type"), "a bit of a register is a bool");
                        }
                        if matches!(
                            addr.table,
                            ModbusTable::InputRegister | ModbusTable::DiscreteInput
                        ) && t.access.writable()
                        {
                            p.push(
                                format!("{at}.access"),
                                "input registers and discrete inputs are read-only",
                            );
                        }
                        let count = if addr.is_bit_table() || addr.bit.is_some() {
                            1
                        } else {
                            t.data_type.modbus_registers(t.length.unwrap_or(0))
                        };
                        if u32::from(addr.address) + u32::from(count) - 1 > 65535 {
                            p.push(
                                format!("{at}.address"),
                                format!("{a} with {count} registers runs past 65535"),
                            );
                        } else {
                            modbus = Some((addr, count));
                        }
                    }
                },
                Some(a) if a.trim().is_empty() => {
                    p.push(format!("{at}.address"), "address is empty")
                }
                Some(a) => match S7Address::parse(a) {
                    Err(e) => p.push(format!("{at}.address"), e),
                    Ok(addr) => {
                        if let Err(e) = addr.check_type(t.data_type) {
                            p.push(format!("{at}.data_type"), format!("{a}: {e}"));
                        }
                        if addr.area == S7Area::Input && t.access.writable() {
                            p.push(format!("{at}.access"), "process inputs (I) are read-only");
                        }
                        if t.data_type == DataType::String
                            && t.length.is_some_and(|n| !(1..=254).contains(&n))
                        {
                            p.push(
                                format!("{at}.length"),
                                "an S7 string holds 1 to 254 characters",
                            );
                        }
                    }
                },
            }
        }
        Protocol::Opcua => {
            if t.address.is_some() {
                p.push(
                    format!("{at}.address"),
                    "an OPC UA tag uses node_id, not address",
                );
            }
            match &t.node_id {
                None => p.push(at.to_owned(), "missing node_id"),
                Some(n)
                    if !(n.contains("i=")
                        || n.contains("s=")
                        || n.contains("g=")
                        || n.contains("b=")) =>
                {
                    p.push(
                        format!("{at}.node_id"),
                        format!("{n:?} is not a node id like ns=2;s=Name or i=2258"),
                    )
                }
                Some(_) => {}
            }
        }
    }
    modbus
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modbus_addresses() {
        assert_eq!(
            ModbusAddress::parse("HR:100").unwrap(),
            ModbusAddress {
                table: ModbusTable::HoldingRegister,
                address: 100,
                bit: None
            }
        );
        assert_eq!(ModbusAddress::parse("hr:100.3").unwrap().bit, Some(3));
        assert_eq!(
            ModbusAddress::parse("CO:0").unwrap().table,
            ModbusTable::Coil
        );
        assert!(ModbusAddress::parse("HR:70000")
            .unwrap_err()
            .contains("above 65535"));
        assert!(ModbusAddress::parse("HR:1.16")
            .unwrap_err()
            .contains("bit 16"));
        assert!(ModbusAddress::parse("CO:1.2")
            .unwrap_err()
            .contains("no bits"));
        assert!(ModbusAddress::parse("40001")
            .unwrap_err()
            .contains("expected HR:<n>"));
    }
}
