//! # nexus-devices
//!
//! The device layer: everything that talks to PLCs, shared by the gateway (polling) and the
//! command handler (write-back), which use the same sessions when they run in one process.
//!
//! ```text
//! DeviceConfig ──> Device::compile: topics + a Plan (Modbus | S7 | OPC UA)
//!   ──> DeviceDirectory: compiled devices by id, replaced on reload
//!   ──> Pools: one Pool per protocol (the only place a Plan picks its driver), one session
//!       per endpoint, bounded, lazy, idle reaper, health checks, a circuit breaker each
//!   ──> Driver: modbus (TCP/RTU/RTU-over-TCP), s7 (own S7comm client), opcua (async-opcua)
//! ```
//!
//! - [`driver`]: the `Driver` trait (transport errors apart from device exceptions).
//! - [`simulator`] (feature `simulators`): `nexus simulate` and the demo's devices.

pub mod device;
pub mod directory;
pub mod driver;
pub mod modbus;
pub mod opcua;
pub mod pool;
pub mod s7;
#[cfg(feature = "simulators")]
pub mod simulator;
pub mod value;

pub use device::{CompileError, Device, Plan, PlanError};
pub use directory::DeviceDirectory;
pub use driver::{DeviceError, Driver, Reading, TransportError};
pub use pool::{BrowseError, Holds, PoolError, Pools};

use std::sync::Arc;
use std::time::Duration;

use nexus_common::config::{Config, DeviceConfig};
use tokio_util::sync::CancellationToken;

/// The sessions and the device directory one process shares between its gateway and its
/// command handler (one session per device endpoint, as small PLCs allow few).
#[derive(Clone)]
pub struct DeviceLayer {
    pub pools: Arc<Pools>,
    pub directory: Arc<DeviceDirectory>,
}

impl DeviceLayer {
    /// Pools with the `gateway` section's settings and a directory of `cfg.devices`; the pool
    /// metrics go to `registry`.
    pub fn new(
        cfg: &Config,
        registry: &prometheus::Registry,
    ) -> Result<DeviceLayer, nexus_common::metrics::MetricError> {
        let directory = DeviceDirectory::new();
        directory.apply(&cfg.devices);
        Ok(DeviceLayer {
            pools: Pools::from_config(&cfg.gateway, registry)?,
            directory,
        })
    }
}

/// Call `apply` with the new device list whenever the config file or the devices file
/// changes on disk (checked every 2 s); see [`Config::watch`].
pub async fn watch_devices<F: Fn(&[DeviceConfig])>(
    cfg: Arc<Config>,
    apply: F,
    token: CancellationToken,
) {
    cfg.watch(Duration::from_secs(2), token, |new| apply(&new.devices))
        .await
}
