//! The one `Driver` trait every protocol implements.
//!
//! Two layers of result, after tokio-modbus: the outer `Err(TransportError)` means the
//! connection is unusable (it is dropped, the breaker counts it, the device goes offline);
//! inside, each tag has its own [`Reading`], so a device exception (illegal address, a bad
//! OPC UA status) marks that tag bad and keeps the session.
//!
//! A driver is handed its own protocol's plan (`Self::Plan`), never a device of another
//! protocol: the pools pick the driver from the device's [`Plan`](crate::Plan) in one place
//! ([`Pools`](crate::Pools)), so there is no run-time protocol check to get wrong.

use std::time::Duration;

use async_trait::async_trait;
use nexus_common::config::{DeviceConfig, Protocol};
use nexus_common::{Quality, Value};

use crate::device::Device;

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

/// A protocol session to one endpoint.
#[async_trait]
pub trait Driver: Send + Sized + 'static {
    /// The compiled read plan of one device of this protocol.
    type Plan: Send + Sync + 'static;
    /// What the protocol's sessions need besides a device's configuration (the OPC UA
    /// client's certificates; nothing for Modbus and S7).
    type Settings: Clone + Send + Sync + 'static;
    const PROTOCOL: Protocol;

    /// A closed session to `device`'s endpoint.
    fn for_device(device: &DeviceConfig, settings: &Self::Settings) -> Self;

    /// Open the session (also used to reconnect after a transport error).
    async fn connect(&mut self) -> Result<(), TransportError>;

    fn is_connected(&self) -> bool;

    /// Read `tags` of `device` (indices into its tag list; `None` reads them all with the
    /// precomputed plan). Returns one reading per requested tag, in the same order.
    async fn read(
        &mut self,
        device: &Device,
        plan: &Self::Plan,
        tags: Option<&[usize]>,
    ) -> Result<Vec<(usize, Reading)>, TransportError>;

    /// Write one tag.
    async fn write(
        &mut self,
        device: &Device,
        plan: &Self::Plan,
        tag: usize,
        value: &Value,
    ) -> Result<Result<(), DeviceError>, TransportError>;

    /// Close the session.
    async fn close(&mut self);
}

/// Put readings in the order the tags were asked for.
pub(crate) fn order_as_asked(out: &mut [(usize, Reading)], asked: &[usize]) {
    out.sort_by_key(|(t, _)| asked.iter().position(|x| x == t).unwrap_or(usize::MAX));
}
