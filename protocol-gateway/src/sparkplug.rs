//! Sparkplug B 3.0 edge node: the gateway's values as births and data of one edge node.
//!
//! The gateway is the edge node `spBv1.0/<group>/.../<edge node>`; each polled device is a
//! Sparkplug device and each of its tags a metric named after the tag. The node:
//!
//! - registers NDEATH (with `bdSeq`) as the MQTT will of its connection, a new `bdSeq` for
//!   each connection (kept in `<dir>/bdseq`, so a restart does not reuse the last one);
//! - publishes NBIRTH (`bdSeq`, `Node Control/Rebirth`) and then a DBIRTH per device (every
//!   metric seen so far: name, alias, datatype, `engUnit`, current value) on each connection,
//!   on a rebirth request, and a device's DBIRTH again when one of its metrics is new or
//!   changes type;
//! - publishes DDATA by exception (the gateway's deadband and heartbeat), metrics by alias,
//!   `seq` 0-255 across all of the node's messages after the NBIRTH (which has 0);
//! - publishes DDEATH when a device cannot be read (every tag not connected or failing to
//!   communicate), and its DBIRTH again with its first value after that;
//! - marks values from the store-and-forward buffer `is_historical`.
//!
//! A value with bad quality is a null metric (Sparkplug has no quality of its own).
//! Aliases are unique across the node and stable while the gateway runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

// Looked up for every sample of every poll: foldhash rather than SipHash (the names are the
// configuration's, not a client's).
use foldhash::HashMap;

use nexus_common::codec::sparkplug::{
    self, MessageType, SpDataType, SpMetric, SpPayload, SparkplugTopic,
};
use nexus_common::codec::ValueObject;
use nexus_common::domain::{now_ms, QualityClass};
use nexus_common::{Quality, Value};

/// The node metric a host sets to ask for new births.
pub const REBIRTH: &str = "Node Control/Rebirth";
/// The node metric that pairs an NBIRTH with its NDEATH.
pub const BD_SEQ: &str = "bdSeq";

/// Most metrics in one DDATA.
pub const MAX_METRICS: usize = 500;

#[derive(Debug)]
struct MetricDef {
    name: String,
    alias: u64,
    datatype: SpDataType,
    unit: Option<String>,
    /// The last value sent, for the next DBIRTH: value (None: null) and timestamp.
    last: Option<(Option<Value>, u64)>,
}

#[derive(Debug, Default)]
struct DeviceDef {
    metrics: Vec<MetricDef>,
    by_name: HashMap<String, usize>,
    /// A DBIRTH with the current metrics went out on this connection.
    born: bool,
    /// The device cannot be reached (its DDEATH went out); a value brings its DBIRTH again.
    offline: bool,
}

/// One value to publish: device, metric (tag) and the value object.
pub struct Sample<'a> {
    pub device: &'a str,
    pub tag: &'a str,
    /// Borrowed from the publisher's queue, or read from a replayed record.
    pub value: std::borrow::Cow<'a, ValueObject>,
}

/// The device and tag of a UNS topic `<prefix>/<device>/<tag>`.
pub fn device_and_tag(topic: &str) -> Option<(&str, &str)> {
    let (rest, tag) = topic.rsplit_once('/')?;
    let device = rest.rsplit_once('/').map_or(rest, |(_, d)| d);
    Some((device, tag))
}

/// The edge node's state: its devices' metrics and aliases, `seq` and `bdSeq`.
pub struct EdgeNode {
    group: String,
    node: String,
    devices: BTreeMap<String, DeviceDef>,
    next_alias: u64,
    /// The `seq` of the next message.
    seq: u8,
    bd_seq: u8,
    bd_file: Option<PathBuf>,
}

/// A message to publish: topic and payload.
pub type Out = (String, Vec<u8>);

/// The writes of a DCMD, (tag, value) each, and its timestamp.
pub type DcmdWrites = (Vec<(String, Value)>, Option<u64>);

impl EdgeNode {
    /// A node whose `bdSeq` is kept in `dir` (None: in memory only).
    pub fn new(group: &str, node: &str, dir: Option<&Path>) -> EdgeNode {
        let bd_file = dir.map(|d| d.join("bdseq"));
        // The last bdSeq used; the first connection takes the next one.
        let bd_seq = bd_file
            .as_ref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .and_then(|s| s.trim().parse::<u8>().ok())
            .unwrap_or(u8::MAX);
        EdgeNode {
            group: group.to_owned(),
            node: node.to_owned(),
            devices: BTreeMap::new(),
            next_alias: 1,
            seq: 0,
            bd_seq,
            bd_file,
        }
    }

    fn topic(&self, t: MessageType, device: Option<&str>) -> String {
        SparkplugTopic {
            group: self.group.clone(),
            message_type: t,
            edge_node: self.node.clone(),
            device: device.map(str::to_owned),
        }
        .to_topic_string()
    }

    /// The topic of the node's commands (NCMD).
    pub fn ncmd_topic(&self) -> String {
        self.topic(MessageType::NCmd, None)
    }

    /// A new connection is about to be made: the next `bdSeq` (kept on disk), and the
    /// NDEATH to register as its will.
    pub fn next_connection(&mut self) -> Out {
        self.bd_seq = self.bd_seq.wrapping_add(1);
        if let Some(f) = &self.bd_file {
            let tmp = f.with_extension("tmp");
            let saved = std::fs::write(&tmp, self.bd_seq.to_string())
                .and_then(|_| std::fs::rename(&tmp, f));
            if let Err(e) = saved {
                tracing::warn!(file = %f.display(), error = %e, "cannot keep the Sparkplug bdSeq; a restart may reuse it");
            }
        }
        self.ndeath()
    }

    /// The NDEATH of the current connection (also published on a clean stop).
    pub fn ndeath(&self) -> Out {
        let p = SpPayload {
            timestamp: Some(now_ms() as u64),
            seq: None,
            metrics: vec![self.bd_metric()],
        };
        (self.topic(MessageType::NDeath, None), encode(&p))
    }

    fn bd_metric(&self) -> SpMetric {
        SpMetric {
            name: Some(BD_SEQ.into()),
            datatype: Some(SpDataType::Int64),
            value: Some(Value::Int(i64::from(self.bd_seq))),
            ..Default::default()
        }
    }

    fn next_seq(&mut self) -> u64 {
        let s = self.seq;
        self.seq = self.seq.wrapping_add(1);
        u64::from(s)
    }

    /// NBIRTH (seq 0) and a DBIRTH for every device: at each connection and on a rebirth.
    pub fn births(&mut self) -> Vec<Out> {
        self.seq = 0;
        let ts = now_ms() as u64;
        let nbirth = SpPayload {
            timestamp: Some(ts),
            seq: Some(self.next_seq()),
            metrics: vec![
                self.bd_metric(),
                SpMetric {
                    name: Some(REBIRTH.into()),
                    timestamp: Some(ts),
                    datatype: Some(SpDataType::Boolean),
                    value: Some(Value::Bool(false)),
                    ..Default::default()
                },
            ],
        };
        let mut out = vec![(self.topic(MessageType::NBirth, None), encode(&nbirth))];
        let names: Vec<String> = self.devices.keys().cloned().collect();
        for d in names {
            let offline = self.devices.get_mut(&d).is_some_and(|dev| {
                dev.born = false;
                dev.offline
            });
            if !offline {
                out.push(self.dbirth(&d));
            }
        }
        out
    }

    /// Whether every sample says the device could not be read (a failed poll, an open
    /// circuit breaker), rather than some tags being bad.
    fn unreachable(samples: &[Sample<'_>]) -> bool {
        !samples.is_empty()
            && samples.iter().all(|s| {
                matches!(
                    s.value.quality,
                    Quality::BadNotConnected | Quality::BadCommFailure
                )
            })
    }

    /// The DBIRTH of `device`: every metric with its name, alias, datatype, unit and value.
    fn dbirth(&mut self, device: &str) -> Out {
        let seq = self.next_seq();
        let ts = now_ms() as u64;
        let dev = self.devices.entry(device.to_owned()).or_default();
        dev.born = true;
        let metrics = dev
            .metrics
            .iter()
            .map(|m| SpMetric {
                name: Some(m.name.clone()),
                alias: Some(m.alias),
                timestamp: Some(m.last.as_ref().map_or(ts, |(_, t)| *t)),
                datatype: Some(m.datatype),
                value: m.last.as_ref().and_then(|(v, _)| v.clone()),
                unit: m.unit.clone(),
                ..Default::default()
            })
            .collect();
        let p = SpPayload {
            timestamp: Some(ts),
            seq: Some(seq),
            metrics,
        };
        (self.topic(MessageType::DBirth, Some(device)), encode(&p))
    }

    /// The messages for `samples` of one device: a DBIRTH first when a metric is new or
    /// changed type (or the device has not been born on this connection), then one DDATA.
    pub fn data(&mut self, device: &str, samples: &[Sample<'_>], historical: bool) -> Vec<Out> {
        // A device that cannot be read: DDEATH once (its metrics keep their last values for
        // the DBIRTH when it returns), nothing while it stays so.
        if !historical && Self::unreachable(samples) {
            let dev = self.devices.entry(device.to_owned()).or_default();
            if dev.offline {
                return Vec::new();
            }
            dev.offline = true;
            let was_born = std::mem::replace(&mut dev.born, false);
            if !was_born {
                return Vec::new();
            }
            let p = SpPayload {
                timestamp: Some(now_ms() as u64),
                seq: Some(self.next_seq()),
                metrics: Vec::new(),
            };
            return vec![(self.topic(MessageType::DDeath, Some(device)), encode(&p))];
        }
        if !historical {
            if let Some(dev) = self.devices.get_mut(device) {
                dev.offline = false;
            }
        }
        let mut rebirth = false;
        let mut metrics = Vec::with_capacity(samples.len());
        // Once per message, not per sample: the lookup hashes (and this copies) the name.
        let next_alias = &mut self.next_alias;
        let dev = self.devices.entry(device.to_owned()).or_default();
        // A device's samples come in the same order at every poll, the order its metrics
        // were first seen in: the metric after the last one found is tried before the map
        // (a hashed lookup per sample missed the cache on most of them).
        let mut next = 0;
        for s in samples {
            let good = s.value.quality.class() != QualityClass::Bad;
            let value = if good { s.value.value.clone() } else { None };
            let ts = s.value.ts_ms.unwrap_or_else(now_ms).max(0) as u64;
            let known = match dev.metrics.get(next) {
                Some(m) if m.name == s.tag => Some(next),
                _ => dev.by_name.get(s.tag).copied(),
            };
            let i = match known {
                Some(i) => i,
                None => {
                    let alias = *next_alias;
                    *next_alias += 1;
                    dev.metrics.push(MetricDef {
                        name: s.tag.to_owned(),
                        alias,
                        datatype: value
                            .as_ref()
                            .map_or(SpDataType::Double, SpDataType::for_value),
                        unit: s.value.unit.clone(),
                        last: None,
                    });
                    dev.by_name.insert(s.tag.to_owned(), dev.metrics.len() - 1);
                    rebirth = true;
                    dev.metrics.len() - 1
                }
            };
            next = i + 1;
            let m = &mut dev.metrics[i];
            // A value that does not fit the declared type: integers go as a Double once
            // declared so; anything else declares the new type in a new DBIRTH.
            let value = match (m.datatype, value) {
                (SpDataType::Double, Some(Value::Int(v))) => Some(Value::Float(v as f64)),
                (SpDataType::Double, Some(Value::UInt(v))) => Some(Value::Float(v as f64)),
                (dt, Some(v)) if dt != SpDataType::for_value(&v) => {
                    m.datatype = match (dt, &v) {
                        (SpDataType::Int64 | SpDataType::UInt64, Value::Float(_)) => {
                            SpDataType::Double
                        }
                        _ => SpDataType::for_value(&v),
                    };
                    rebirth = true;
                    match (m.datatype, v) {
                        (SpDataType::Double, Value::Int(i)) => Some(Value::Float(i as f64)),
                        (SpDataType::Double, Value::UInt(u)) => Some(Value::Float(u as f64)),
                        (_, v) => Some(v),
                    }
                }
                (_, v) => v,
            };
            if s.value.unit.is_some() && m.unit != s.value.unit {
                m.unit = s.value.unit.clone();
                rebirth = true;
            }
            if !historical {
                m.last = Some((value.clone(), ts));
            }
            metrics.push(SpMetric {
                alias: Some(m.alias),
                timestamp: Some(ts),
                datatype: Some(m.datatype),
                value,
                historical,
                ..Default::default()
            });
        }
        let mut out = Vec::with_capacity(2);
        let born = self.devices.get(device).is_some_and(|d| d.born);
        if rebirth || !born {
            out.push(self.dbirth(device));
        }
        let p = SpPayload {
            timestamp: Some(now_ms() as u64),
            seq: Some(self.next_seq()),
            metrics,
        };
        out.push((self.topic(MessageType::DData, Some(device)), encode(&p)));
        out
    }

    /// The topic filter of the node's device commands (DCMD).
    pub fn dcmd_filter(&self) -> String {
        format!("{}/+", self.topic(MessageType::DCmd, None))
    }

    /// The writes a DCMD asks for on `device`: (tag, value) per metric, each named or by an
    /// alias of this node's births; and the DCMD's timestamp. `Err` names what is wrong.
    pub fn dcmd_writes(&self, device: &str, payload: &[u8]) -> Result<DcmdWrites, String> {
        let p = sparkplug::decode(payload).map_err(|e| e.to_string())?;
        let dev = self.devices.get(device);
        let mut writes = Vec::with_capacity(p.metrics.len());
        for m in &p.metrics {
            let name = match (&m.name, m.alias) {
                (Some(n), _) => n.clone(),
                (None, Some(a)) => dev
                    .and_then(|d| d.metrics.iter().find(|x| x.alias == a))
                    .map(|x| x.name.clone())
                    .ok_or_else(|| format!("alias {a} is not a metric of device {device}"))?,
                (None, None) => return Err("a metric with neither name nor alias".into()),
            };
            let value = m
                .value
                .clone()
                .ok_or_else(|| format!("metric {name} has no value"))?;
            writes.push((name, value));
        }
        if writes.is_empty() {
            return Err("no metrics".into());
        }
        Ok((writes, p.timestamp))
    }

    /// Whether an NCMD payload asks for a rebirth (`Node Control/Rebirth` = true).
    pub fn is_rebirth_request(payload: &[u8]) -> bool {
        sparkplug::decode(payload).is_ok_and(|p| {
            p.metrics
                .iter()
                .any(|m| m.name.as_deref() == Some(REBIRTH) && m.value == Some(Value::Bool(true)))
        })
    }
}

fn encode(p: &SpPayload) -> Vec<u8> {
    // Every metric is built here with a value of its declared type, so encoding cannot fail;
    // if it did, the metric is sent null rather than the message lost.
    sparkplug::encode(p).unwrap_or_else(|e| {
        tracing::error!(error = %e, "Sparkplug metric not encodable; sent as null");
        let metrics = p
            .metrics
            .iter()
            .map(|m| SpMetric {
                value: None,
                ..m.clone()
            })
            .collect();
        sparkplug::encode(&SpPayload {
            metrics,
            ..p.clone()
        })
        .unwrap_or_default()
    })
}

#[cfg(test)]
mod tests;
