//! What a Sparkplug B consumer keeps to read data: the births' aliases, per edge node, and
//! the names metrics are known by. Ingestion and the alert service both read Sparkplug
//! through it, so a metric has one name everywhere:
//! `spBv1.0/<group>/<edge node>[/<device>]/<metric name>` (the message type left out, so a
//! birth's value and later data have one topic).
//!
//! - NBIRTH starts the node's alias table over; DBIRTH replaces the device's aliases.
//! - NDATA/DDATA metrics are resolved by alias; an alias never announced cannot be named: it
//!   is reported, and a rebirth request (`Node Control/Rebirth` on the node's NCMD topic) is
//!   due at most once per 10 s per node.
//! - NDEATH keeps the node's aliases until its next NBIRTH: data the node sent before it
//!   died can still arrive after its death (a QoS 1 publish resent on a new connection) and
//!   is still named. Deaths, commands and host STATE hold no values.
//! - The table is bounded (units of [`text_weight`], all nodes together): the node heard
//!   from least recently is forgotten for a new one (counted as evicted), and its next data
//!   by alias is then unknown; aliases of a birth past the whole bound are not remembered
//!   (counted as refused).

// foldhash rather than the standard SipHash: these maps are looked up for every metric of
// every message. Its per-process random seed keeps keys from being chosen to collide, and
// the table is bounded in size whatever a client sends.
use foldhash::{HashMap, HashMapExt};
use std::time::{Duration, Instant};

use crate::bounded::{text_weight, BoundedMap, MapStats};
use crate::codec::sparkplug::{self, MessageType, SpDataType, SparkplugError, SparkplugTopic};
use crate::domain::Value;

/// A node is asked for a rebirth at most this often.
pub const REBIRTH_EVERY: Duration = Duration::from_secs(10);

/// One metric of a birth or data message, named.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedMetric {
    /// `spBv1.0/<group>/<edge node>[/<device>]/<metric name>`.
    pub topic: String,
    /// `None`: a null metric.
    pub value: Option<Value>,
    /// From the metric, or from the birth that announced its alias.
    pub datatype: Option<SpDataType>,
    /// The metric's timestamp, else the payload's (unix ms).
    pub ts_ms: Option<u64>,
    pub historical: bool,
}

/// What a message holds.
#[derive(Debug, Default)]
pub struct Read {
    pub metrics: Vec<NamedMetric>,
    /// A message type that holds no values: `sparkplug_state`, `sparkplug_death`,
    /// `sparkplug_command`.
    pub ignored: Option<&'static str>,
    /// The message cannot be read at all (topic or payload): the reject label and the detail.
    pub refused: Option<(&'static str, String)>,
    /// Some metrics are malformed (neither name nor alias); the others are in `metrics`.
    pub bad_metric: Option<&'static str>,
    /// Aliases no birth announced; their metrics are not in `metrics`.
    pub unknown_aliases: Vec<u64>,
    /// A rebirth request to publish: (topic, payload).
    pub rebirth: Option<(String, Vec<u8>)>,
}

/// A metric's name and datatype, as its birth gave them.
type Named = (String, Option<SpDataType>);

/// A device's aliases: alias -> (name, datatype). Edge nodes number their aliases in runs
/// (one per device, in birth order), and data names them in that order: a run starting at the
/// first alias remembered is kept in a vector, read in order, and only the others are hashed.
/// A hashed lookup per metric missed the cache on most of them (the largest entry of
/// ingestion's profile with Sparkplug data).
#[derive(Default)]
struct Aliases {
    base: u64,
    run: Vec<Option<Named>>,
    others: HashMap<u64, Named>,
}

impl Aliases {
    fn slot(&self, alias: u64) -> Option<usize> {
        let i = usize::try_from(alias.checked_sub(self.base)?).ok()?;
        (i < self.run.len()).then_some(i)
    }

    fn get(&self, alias: &u64) -> Option<&Named> {
        match self.slot(*alias) {
            Some(i) => self.run[i].as_ref(),
            None => self.others.get(alias),
        }
    }

    fn remove(&mut self, alias: &u64) -> Option<Named> {
        match self.slot(*alias) {
            Some(i) => self.run[i].take(),
            None => self.others.remove(alias),
        }
    }

    /// Insert (after [`Aliases::remove`] of the same alias): in the run when it extends it
    /// (no gaps, so the vector never outgrows what was inserted), else hashed.
    fn insert(&mut self, alias: u64, named: Named) {
        if self.run.is_empty() && self.others.is_empty() {
            self.base = alias;
        }
        if let Some(i) = self.slot(alias) {
            self.run[i] = Some(named);
        } else if alias.checked_sub(self.base) == Some(self.run.len() as u64) {
            self.run.push(Some(named));
        } else {
            self.others.insert(alias, named);
        }
    }

    fn values(&self) -> impl Iterator<Item = &Named> {
        self.run.iter().flatten().chain(self.others.values())
    }
}

struct Node {
    /// Aliases of the node (device `""`) and of each device.
    devices: HashMap<String, Aliases>,
    last_rebirth: Option<Instant>,
    /// Units of the table this node takes: one for itself, one per alias (more for names
    /// longer than 256 bytes).
    weight: usize,
}

fn node_weight((group, edge_node): &(String, String)) -> usize {
    text_weight(group.len() + edge_node.len())
}

fn alias_weight(device: &str, name: &str) -> usize {
    text_weight(device.len() + name.len())
}

/// The births seen, per `(group, edge node)`, in a bounded table.
pub struct SparkplugNames {
    nodes: BoundedMap<(String, String), Node>,
    stats: MapStats,
}

impl SparkplugNames {
    /// A table of `stats.capacity()` units.
    pub fn new(stats: MapStats) -> SparkplugNames {
        SparkplugNames {
            nodes: BoundedMap::new(stats.capacity()),
            stats,
        }
    }

    /// Edge nodes remembered.
    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// Units of the table in use.
    pub fn used(&self) -> usize {
        self.nodes.used()
    }

    /// Units the node `group`/`edge_node` takes in the table, if remembered.
    pub fn node_units(&self, group: &str, edge_node: &str) -> Option<usize> {
        self.nodes
            .peek(&(group.to_owned(), edge_node.to_owned()))
            .map(|n| n.weight)
    }

    /// The table's counters.
    pub fn stats(&self) -> &MapStats {
        &self.stats
    }

    /// The node `key`, made (and marked as heard from now) if needed; false when it cannot be
    /// tracked (its ids alone are longer than the whole table).
    fn touch_node(&mut self, key: &(String, String)) -> bool {
        if self.nodes.get(key).is_some() {
            return true;
        }
        let node = Node {
            devices: HashMap::new(),
            last_rebirth: None,
            weight: node_weight(key),
        };
        let weight = node.weight;
        match self.nodes.insert(key.clone(), node, weight) {
            Ok(s) => self.stats.evicted(s.evicted.len()),
            Err(_) => {
                self.stats.refused();
                return false;
            }
        }
        self.stats.size(&self.nodes);
        true
    }

    fn forget_node(&mut self, key: &(String, String)) {
        if self.nodes.remove(key).is_some() {
            self.stats.size(&self.nodes);
        }
    }

    /// Remember alias `alias` of `device` on node `key` from a birth, making room by
    /// forgetting other nodes; an alias that does not fit is not remembered (counted).
    fn remember(
        &mut self,
        key: &(String, String),
        device: &str,
        alias: u64,
        name: &str,
        dt: Option<SpDataType>,
    ) {
        let Some(node) = self.nodes.peek_mut(key) else {
            return;
        };
        // A repeated alias replaces the earlier one.
        if let Some((old, _)) = node
            .devices
            .get_mut(device)
            .and_then(|aliases| aliases.remove(&alias))
        {
            node.weight -= alias_weight(device, &old);
        }
        let without = node.weight;
        let with = without + alias_weight(device, name);
        match self.nodes.reweigh(key, with, |_, _| true) {
            Ok(evicted) => {
                self.stats.evicted(evicted.len());
                if let Some(node) = self.nodes.peek_mut(key) {
                    node.weight = with;
                    node.devices
                        .entry(device.to_owned())
                        .or_default()
                        .insert(alias, (name.to_owned(), dt));
                }
            }
            Err(()) => {
                // Shrinking always succeeds: the table keeps what the node holds.
                let _ = self.nodes.reweigh(key, without, |_, _| true);
                self.stats.refused();
            }
        }
        self.stats.size(&self.nodes);
    }

    /// Forget the aliases of `device` on node `key` (a new DBIRTH replaces them).
    fn forget_device(&mut self, key: &(String, String), device: &str) {
        let Some(node) = self.nodes.peek_mut(key) else {
            return;
        };
        let freed: usize = node
            .devices
            .remove(device)
            .map(|aliases| {
                aliases
                    .values()
                    .map(|(name, _)| alias_weight(device, name))
                    .sum()
            })
            .unwrap_or(0);
        node.weight -= freed;
        let weight = node.weight;
        // Shrinking always succeeds.
        let _ = self.nodes.reweigh(key, weight, |_, _| true);
        self.stats.size(&self.nodes);
    }

    /// Read one Sparkplug message (`topic` under `spBv1.0/`).
    pub fn read(&mut self, topic: &str, payload: &[u8]) -> Read {
        let mut out = Read::default();
        let refuse = |e: SparkplugError| (e.reason(), e.to_string());
        let t = match SparkplugTopic::parse(topic) {
            Ok(t) => t,
            Err(e) => {
                // `spBv1.0/STATE/<host>` is a host application's state, not data.
                if topic.starts_with("spBv1.0/STATE/") {
                    out.ignored = Some("sparkplug_state");
                } else {
                    out.refused = Some(refuse(e));
                }
                return out;
            }
        };
        let kind = t.message_type;
        match kind {
            MessageType::NBirth | MessageType::DBirth | MessageType::NData | MessageType::DData => {
            }
            MessageType::NDeath | MessageType::DDeath => {
                // The aliases stay until the next birth replaces them: data published before
                // the death may still arrive (resent at QoS 1) and must still be named.
                out.ignored = Some("sparkplug_death");
                return out;
            }
            MessageType::NCmd | MessageType::DCmd => {
                out.ignored = Some("sparkplug_command");
                return out;
            }
            MessageType::State => {
                out.ignored = Some("sparkplug_state");
                return out;
            }
        }
        let p = match sparkplug::decode(payload) {
            Ok(p) => p,
            Err(e) => {
                out.refused = Some(refuse(e));
                return out;
            }
        };
        let device = t.device.clone().unwrap_or_default();
        let node_key = (t.group.clone(), t.edge_node.clone());
        let is_birth = matches!(kind, MessageType::NBirth | MessageType::DBirth);
        if kind == MessageType::NBirth {
            // A node birth starts the node's alias table over.
            self.forget_node(&node_key);
        }
        let tracked = self.touch_node(&node_key);
        if kind == MessageType::DBirth {
            self.forget_device(&node_key, &device);
        }
        let base = match &t.device {
            Some(d) => format!("spBv1.0/{}/{}/{}/", t.group, t.edge_node, d),
            None => format!("spBv1.0/{}/{}/", t.group, t.edge_node),
        };
        if is_birth && tracked {
            for m in &p.metrics {
                if let (Some(n), Some(a)) = (&m.name, m.alias) {
                    self.remember(&node_key, &device, a, n, m.datatype);
                }
            }
        }
        // Looked up once per message: data by alias is the common case.
        let known = self
            .nodes
            .peek(&node_key)
            .and_then(|node| node.devices.get(&device));
        for m in p.metrics {
            let (name, dt) = match (&m.name, m.alias) {
                (Some(n), _) => (n.as_str(), m.datatype),
                (None, Some(a)) => match known.and_then(|aliases| aliases.get(&a)) {
                    Some((n, dt)) => (n.as_str(), m.datatype.or(*dt)),
                    None => {
                        out.unknown_aliases.push(a);
                        continue;
                    }
                },
                (None, None) => {
                    out.bad_metric = Some("a metric has neither a name nor an alias");
                    continue;
                }
            };
            let value = match (m.value, dt) {
                // A Float metric's value in its own digits (21.2, not 21.200000762939453).
                (Some(Value::Float(x)), Some(SpDataType::Float)) => Some(Value::from_f32(x as f32)),
                (Some(v), Some(dt)) => Some(sparkplug::retype(&v, dt)),
                (v, _) => v,
            };
            let mut topic = String::with_capacity(base.len() + name.len());
            topic.push_str(&base);
            topic.push_str(name);
            out.metrics.push(NamedMetric {
                topic,
                value,
                datatype: dt,
                ts_ms: m.timestamp.or(p.timestamp),
                historical: m.historical,
            });
        }
        if !out.unknown_aliases.is_empty() {
            // A node that cannot be tracked (its ids alone are longer than the whole table)
            // could not remember a rebirth's aliases either: it is not asked.
            let due = match self.nodes.peek_mut(&node_key) {
                Some(node) => {
                    let due = node
                        .last_rebirth
                        .is_none_or(|t| t.elapsed() >= REBIRTH_EVERY);
                    if due {
                        node.last_rebirth = Some(Instant::now());
                    }
                    due
                }
                None => false,
            };
            if due {
                out.rebirth = rebirth_request(&t.group, &t.edge_node);
            }
        }
        out
    }
}

/// `spBv1.0/<group>/NCMD/<edge node>` with `Node Control/Rebirth = true`.
pub fn rebirth_request(group: &str, edge_node: &str) -> Option<(String, Vec<u8>)> {
    let topic = SparkplugTopic {
        group: group.to_owned(),
        message_type: MessageType::NCmd,
        edge_node: edge_node.to_owned(),
        device: None,
    };
    let payload = sparkplug::SpPayload {
        timestamp: u64::try_from(crate::domain::now_ms()).ok(),
        seq: None,
        metrics: vec![sparkplug::SpMetric {
            name: Some("Node Control/Rebirth".into()),
            datatype: Some(SpDataType::Boolean),
            value: Some(Value::Bool(true)),
            ..Default::default()
        }],
    };
    sparkplug::encode(&payload)
        .ok()
        .map(|b| (topic.to_topic_string(), b))
}

/// The subscription that brings the Sparkplug messages of the metrics a rule filter names
/// (`spBv1.0/<group>/<edge node>/...`): the group's whole namespace (births included, which
/// name the aliases), or every group's when the filter leaves the group open. `None` for a
/// filter outside `spBv1.0/`.
pub fn subscription_for(filter: &str) -> Option<String> {
    let rest = filter.strip_prefix("spBv1.0/")?;
    let group = rest.split('/').next().unwrap_or("#");
    Some(match group {
        "+" | "#" | "" => "spBv1.0/#".to_owned(),
        g => format!("spBv1.0/{g}/#"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_filter_is_served_by_its_groups_namespace() {
        assert_eq!(
            subscription_for("spBv1.0/G/edge/plc/temp").as_deref(),
            Some("spBv1.0/G/#")
        );
        assert_eq!(
            subscription_for("spBv1.0/+/edge/plc/temp").as_deref(),
            Some("spBv1.0/#")
        );
        assert_eq!(subscription_for("spBv1.0/#").as_deref(), Some("spBv1.0/#"));
        assert_eq!(subscription_for("acme/spBv1.0/x"), None);
    }

    #[test]
    fn metrics_are_named_like_ingestion_stores_them() {
        let mut n = SparkplugNames::new(MapStats::detached("sparkplug_aliases", 100));
        let p = |metrics: Vec<sparkplug::SpMetric>| {
            sparkplug::encode(&sparkplug::SpPayload {
                timestamp: Some(5),
                seq: Some(0),
                metrics,
            })
            .unwrap()
        };
        let birth = sparkplug::SpMetric {
            name: Some("temp".into()),
            alias: Some(3),
            datatype: Some(SpDataType::Float),
            value: Some(Value::Float(21.2f32 as f64)),
            ..Default::default()
        };
        let r = n.read("spBv1.0/G/DBIRTH/E/D", &p(vec![birth]));
        assert_eq!(r.metrics[0].topic, "spBv1.0/G/E/D/temp");
        assert_eq!(
            r.metrics[0].value,
            Some(Value::Float(21.2)),
            "Float digits kept"
        );
        let data = sparkplug::SpMetric {
            alias: Some(3),
            value: Some(Value::Float(22.5)),
            historical: true,
            ..Default::default()
        };
        let r = n.read("spBv1.0/G/DDATA/E/D", &p(vec![data.clone()]));
        assert_eq!(r.metrics[0].topic, "spBv1.0/G/E/D/temp");
        assert_eq!(r.metrics[0].ts_ms, Some(5), "the payload's timestamp");
        assert!(r.metrics[0].historical);
        // NDEATH keeps the aliases: data sent before the death, arriving after it, is named.
        assert_eq!(
            n.read("spBv1.0/G/NDEATH/E", &p(vec![])).ignored,
            Some("sparkplug_death")
        );
        let r = n.read("spBv1.0/G/DDATA/E/D", &p(vec![data.clone()]));
        assert_eq!(r.metrics[0].topic, "spBv1.0/G/E/D/temp");
        // An NBIRTH starts over: the alias is unknown, and a rebirth is due once per 10 s.
        n.read("spBv1.0/G/NBIRTH/E", &p(vec![]));
        let r = n.read("spBv1.0/G/DDATA/E/D", &p(vec![data.clone()]));
        assert_eq!(r.unknown_aliases, [3]);
        assert!(r.rebirth.is_some_and(|(t, _)| t == "spBv1.0/G/NCMD/E"));
        assert!(n
            .read("spBv1.0/G/DDATA/E/D", &p(vec![data]))
            .rebirth
            .is_none());
        assert_eq!(
            n.read("spBv1.0/STATE/host", b"{}").ignored,
            Some("sparkplug_state")
        );
        assert_eq!(
            n.read("spBv1.0/G/DDATA/E/D", b"\xff").refused.map(|r| r.0),
            Some("sparkplug_decode")
        );
    }

    #[test]
    fn aliases_in_a_run_and_out_of_it_are_all_found_and_the_run_has_no_gaps() {
        let named = |n: &str| (n.to_owned(), Some(SpDataType::Int32));
        let mut a = Aliases::default();
        for (alias, name) in [(10, "a"), (11, "b"), (12, "c"), (7, "low"), (14, "gap")] {
            a.insert(alias, named(name));
        }
        a.insert(u64::MAX, named("max"));
        a.insert(13, named("d"));
        assert_eq!(a.run.len(), 4, "10..=13 in the run");
        assert_eq!(a.others.len(), 3, "7, 14 and u64::MAX hashed");
        for (alias, name) in [(10, "a"), (12, "c"), (13, "d"), (7, "low"), (14, "gap")] {
            assert_eq!(
                a.get(&alias).map(|n| n.0.as_str()),
                Some(name),
                "alias {alias}"
            );
        }
        assert_eq!(a.get(&u64::MAX).map(|n| n.0.as_str()), Some("max"));
        assert!(a.get(&9).is_none() && a.get(&15).is_none() && a.get(&0).is_none());
        // A repeated alias replaces the earlier one in place.
        assert_eq!(a.remove(&11).map(|n| n.0), Some("b".to_owned()));
        assert!(a.get(&11).is_none());
        a.insert(11, named("b2"));
        assert_eq!(a.get(&11).map(|n| n.0.as_str()), Some("b2"));
        assert_eq!(a.run.len(), 4);
        let mut names: Vec<&str> = a.values().map(|n| n.0.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["a", "b2", "c", "d", "gap", "low", "max"]);
    }
}
