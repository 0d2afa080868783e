//! The devices Nexus knows, compiled, by id: shared with the command handler, which
//! writes through the same pools, and kept current when the device list is reloaded.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use nexus_common::config::DeviceConfig;

use crate::device::Device;

#[derive(Default)]
pub struct DeviceDirectory {
    devices: RwLock<HashMap<String, Arc<Device>>>,
}

impl DeviceDirectory {
    pub fn new() -> Arc<DeviceDirectory> {
        Arc::new(DeviceDirectory::default())
    }

    /// Replace the directory's contents with `devices` (disabled ones included: a write to
    /// one is refused with that reason). Devices that fail to compile are left out and logged.
    pub fn apply(&self, devices: &[DeviceConfig]) {
        let mut map = HashMap::with_capacity(devices.len());
        for d in devices {
            match Device::compile(d.clone()) {
                Ok(dev) => {
                    map.insert(d.id.to_string(), Arc::new(dev));
                }
                Err(e) => tracing::error!(error = %e, "device left out of the directory"),
            }
        }
        *self.devices.write().unwrap_or_else(|e| e.into_inner()) = map;
    }

    pub fn get(&self, id: &str) -> Option<Arc<Device>> {
        self.devices
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// The UNS prefix (`enterprise/site/area/line`) of a device whose namespace holds `topic`,
    /// if any: Nexus's services publish as the service user, which may publish there, so a
    /// topic a client names (a Response Topic) must not be one of these.
    pub fn uns_prefix_holding(&self, topic: &str) -> Option<String> {
        self.devices
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|d| d.cfg.uns_prefix.as_str())
            .find(|p| {
                topic
                    .strip_prefix(p)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            })
            .map(str::to_owned)
    }

    pub fn len(&self) -> usize {
        self.devices.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
