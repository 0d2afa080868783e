//! # nexus-common
//!
//! What two or more Nexus services share:
//!
//! - [`domain`]: `Value`, `Quality` (OPC UA classes, historian codes), `DataPoint`, ids.
//! - [`topic`]: UNS topics and MQTT filters: build, parse, validate, match.
//! - [`codec`]: the contract's JSON value object and Sparkplug B payloads.
//! - [`config`]: `nexus.yaml` with environment overrides and located validation errors.

pub mod codec;
pub mod config;
pub mod domain;
pub mod topic;

pub use domain::{now_ms, DataPoint, DeviceId, Quality, QualityClass, TagId, Value};
pub use topic::{Topic, TopicFilter};
pub mod breaker;
pub mod ratelimit;
pub mod supervise;
pub mod telemetry;
