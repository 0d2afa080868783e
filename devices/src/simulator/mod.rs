//! Simulated devices: `nexus simulate modbus` and the demo's devices.

pub mod modbus;
pub mod opcua;
