//! `connection.bit_write`: its default, its two values, and its refusal on devices of another
//! protocol or with a value it does not know.

use super::BitWrite;
use crate::config::{Config, ConfigErrors};

fn load(devices: &str) -> Result<Config, ConfigErrors> {
    Config::from_str_with_env(&format!("devices:\n{devices}"), None, &[])
}

fn errors(devices: &str) -> Vec<String> {
    load(devices)
        .unwrap_err()
        .0
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn modbus(connection_extra: &str) -> String {
    format!(
        "  - id: plc\n    protocol: modbus\n    uns_prefix: a/b\n    connection: {{ host: 127.0.0.1{connection_extra} }}\n    tags:\n      - {{ id: flag, address: \"HR:10.3\", data_type: bool, access: readwrite }}\n"
    )
}

#[test]
fn bit_write_defaults_to_mask_and_takes_read_modify_write() {
    let c = load(&modbus("")).unwrap();
    assert_eq!(c.devices[0].connection.bit_write, None);
    assert_eq!(
        c.devices[0].connection.bit_write.unwrap_or_default(),
        BitWrite::Mask
    );
    for (text, want) in [
        ("mask", BitWrite::Mask),
        ("read_modify_write", BitWrite::ReadModifyWrite),
    ] {
        let c = load(&modbus(&format!(", bit_write: {text}"))).unwrap();
        assert_eq!(c.devices[0].connection.bit_write, Some(want), "{text}");
    }
}

#[test]
fn bit_write_refuses_an_unknown_value() {
    let errs = errors(&modbus(", bit_write: rmw"));
    assert!(
        errs.iter()
            .any(|e| e.contains("rmw") && e.contains("read_modify_write")),
        "{errs:?}"
    );
}

#[test]
fn bit_write_is_refused_on_s7_and_opc_ua_devices() {
    let s7 = "  - id: s7\n    protocol: s7\n    uns_prefix: a/b\n    connection: { host: 10.0.0.6, bit_write: read_modify_write }\n    tags:\n      - { id: x, address: DB1.DBX0.3, data_type: bool }\n";
    let ua = "  - id: ua\n    protocol: opcua\n    uns_prefix: a/b\n    connection: { endpoint: \"opc.tcp://127.0.0.1:4840\", bit_write: mask }\n    tags:\n      - { id: x, node_id: \"ns=2;s=X\", data_type: bool }\n";
    let errs = errors(&format!("{s7}{ua}"));
    for want in [
        "devices[0].connection.bit_write: bit_write does not apply to a S7 device",
        "devices[1].connection.bit_write: bit_write does not apply to a Opcua device",
    ] {
        assert!(errs.iter().any(|e| e.contains(want)), "{want}\n{errs:#?}");
    }
    assert_eq!(errs.len(), 2, "{errs:#?}");
}
