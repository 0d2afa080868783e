//! The compiled form of an OPC UA device: each tag's node and conversion, and the
//! acquisition (polling or a subscription).

use std::str::FromStr;
use std::time::Duration;

use nexus_common::config::{AcquisitionMode, DataType, DeviceConfig};
use opcua::types::NodeId;

/// How one tag is read.
#[derive(Debug, Clone)]
pub struct TagSpec {
    /// The node id as configured (`ns=2;s=..`, `i=2258`, or `nsu=<uri>;s=..`).
    pub node: String,
    pub data_type: DataType,
    pub scale: Option<f64>,
    pub offset: Option<f64>,
    pub deadband: Option<f64>,
}

/// A device's acquisition plan.
#[derive(Debug, Clone)]
pub struct OpcUaPlan {
    pub tags: Vec<TagSpec>,
    pub mode: AcquisitionMode,
    pub publishing: Duration,
    pub sampling: Duration,
}

impl OpcUaPlan {
    pub fn new(cfg: &DeviceConfig) -> Result<OpcUaPlan, String> {
        let mut tags = Vec::with_capacity(cfg.tags.len());
        for t in &cfg.tags {
            let node = t
                .node_id
                .clone()
                .ok_or_else(|| format!("tag {} has no node_id", t.id))?;
            resolve(&node, &[]).map_err(|e| format!("tag {}: {e}", t.id))?;
            tags.push(TagSpec {
                node,
                data_type: t.data_type,
                scale: t.scale,
                offset: t.offset,
                deadband: t.deadband.filter(|d| *d > 0.0),
            });
        }
        let c = &cfg.connection;
        Ok(OpcUaPlan {
            tags,
            mode: cfg.mode.unwrap_or_default(),
            publishing: c.publishing_interval.unwrap_or(cfg.poll_interval),
            sampling: c.sampling_interval.unwrap_or(cfg.poll_interval),
        })
    }
}

/// Parse a configured node id; `nsu=<uri>;...` is looked up in `namespaces` (the server's
/// namespace array). With an empty array only the syntax is checked.
pub fn resolve(node: &str, namespaces: &[String]) -> Result<NodeId, String> {
    if let Some(rest) = node.strip_prefix("nsu=") {
        let (uri, id) = rest
            .split_once(';')
            .ok_or_else(|| format!("{node:?}: nsu=<uri>;<i|s|g|b>=<id> expected"))?;
        let index = if namespaces.is_empty() {
            0
        } else {
            namespaces
                .iter()
                .position(|n| n == uri)
                .ok_or_else(|| format!("{node:?}: the server has no namespace {uri:?}"))?
        };
        return NodeId::from_str(&format!("ns={index};{id}"))
            .map_err(|_| format!("{node:?} is not a node id"));
    }
    NodeId::from_str(node).map_err(|_| format!("{node:?} is not a node id like ns=2;s=Name"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_parse_and_namespace_uris_resolve() {
        assert_eq!(
            resolve("ns=2;s=Demo.T", &[]).unwrap(),
            NodeId::new(2, "Demo.T")
        );
        assert_eq!(resolve("i=2258", &[]).unwrap(), NodeId::new(0, 2258u32));
        let ns = vec![
            "http://opcfoundation.org/UA/".to_owned(),
            "urn:a".into(),
            "urn:b".into(),
        ];
        assert_eq!(resolve("nsu=urn:b;s=T", &ns).unwrap(), NodeId::new(2, "T"));
        assert!(resolve("nsu=urn:zzz;s=T", &ns)
            .unwrap_err()
            .contains("no namespace"));
        assert!(resolve("nonsense", &[]).is_err());
    }
}
