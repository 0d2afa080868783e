//! The compiled form of an OPC UA device: each tag's node and conversion, and the
//! acquisition (polling or a subscription).

use std::str::FromStr;
use std::time::Duration;

use nexus_common::config::{AcquisitionMode, DataType, DeviceConfig};
use opcua::types::{NodeId, StatusCode};

use crate::device::PlanError;

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
    pub fn new(cfg: &DeviceConfig) -> Result<OpcUaPlan, PlanError> {
        let mut tags = Vec::with_capacity(cfg.tags.len());
        for t in &cfg.tags {
            let node = t
                .node_id
                .clone()
                .ok_or_else(|| PlanError::NoNodeId { tag: t.id.clone() })?;
            resolve(&node, &[]).map_err(|source| PlanError::NodeId {
                tag: t.id.clone(),
                source,
            })?;
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

/// Why a configured node id cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeIdError {
    #[error("{node:?} is not a node id like ns=2;s=Name")]
    Syntax { node: String, source: StatusCode },
    #[error("{node:?}: nsu=<uri>;<i|s|g|b>=<id> expected")]
    NamespaceUriSyntax { node: String },
    /// The identifier after `nsu=<uri>;` does not parse.
    #[error("{node:?} is not a node id")]
    Identifier { node: String, source: StatusCode },
    #[error("{node:?}: the server has no namespace {uri:?}")]
    UnknownNamespace { node: String, uri: String },
}

/// Parse a configured node id; `nsu=<uri>;...` is looked up in `namespaces` (the server's
/// namespace array). With an empty array only the syntax is checked.
pub fn resolve(node: &str, namespaces: &[String]) -> Result<NodeId, NodeIdError> {
    if let Some(rest) = node.strip_prefix("nsu=") {
        let (uri, id) = rest
            .split_once(';')
            .ok_or_else(|| NodeIdError::NamespaceUriSyntax { node: node.into() })?;
        let index = if namespaces.is_empty() {
            0
        } else {
            namespaces.iter().position(|n| n == uri).ok_or_else(|| {
                NodeIdError::UnknownNamespace {
                    node: node.into(),
                    uri: uri.into(),
                }
            })?
        };
        return NodeId::from_str(&format!("ns={index};{id}")).map_err(|source| {
            NodeIdError::Identifier {
                node: node.into(),
                source,
            }
        });
    }
    NodeId::from_str(node).map_err(|source| NodeIdError::Syntax {
        node: node.into(),
        source,
    })
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
        let e = resolve("nsu=urn:zzz;s=T", &ns).unwrap_err();
        assert!(
            matches!(&e, NodeIdError::UnknownNamespace { uri, .. } if uri == "urn:zzz"),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            r#""nsu=urn:zzz;s=T": the server has no namespace "urn:zzz""#
        );
        let e = resolve("nonsense", &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#""nonsense" is not a node id like ns=2;s=Name"#
        );
        assert!(std::error::Error::source(&e).is_some());
        assert!(matches!(
            resolve("nsu=urn:b", &ns),
            Err(NodeIdError::NamespaceUriSyntax { .. })
        ));
        assert!(matches!(
            resolve("nsu=urn:b;q=1", &ns),
            Err(NodeIdError::Identifier { .. })
        ));
    }
}
