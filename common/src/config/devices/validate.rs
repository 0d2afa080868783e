//! Semantic checks of a device: the connection keys its protocol needs (and none it does
//! not), and each tag's address, type, range and write settings.

use super::*;
use crate::config::Problems;

pub(super) fn check_connection(d: &DeviceConfig, at: &str, p: &mut Problems) {
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
                (c.bit_write.is_some(), "bit_write"),
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
                (c.bit_write.is_some(), "bit_write"),
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

pub(super) fn check_tag(
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
