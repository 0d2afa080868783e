//! Browsing the server's address space, streamed entry by entry and following continuation
//! points, so a large address space never sits in memory.

use opcua::types::{
    BrowseDescription, BrowseDirection, BrowseResultMask, NodeClassMask, NodeId, ReferenceTypeId,
    StatusCode,
};
use tokio::sync::mpsc;

use super::plan::{resolve, NodeIdError};
use super::OpcUaDriver;
use crate::driver::TransportError;

/// Why a browse was refused while the session stays usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrowseRefused {
    /// The node to start from is not a node id (or names a namespace the server lacks).
    #[error(transparent)]
    Node(#[from] NodeIdError),
    /// The server answered the Browse with a bad status (an unknown node, no access).
    #[error("the server refused to browse: {0}")]
    Status(StatusCode),
}

/// One child node found by browsing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BrowseEntry {
    pub node_id: String,
    pub browse_name: String,
    pub display_name: String,
    pub node_class: String,
    pub type_definition: String,
}

impl OpcUaDriver {
    /// Stream the children of `node` (default: the Objects folder) into `out`.
    pub async fn browse_into(
        &mut self,
        node: Option<&str>,
        out: mpsc::Sender<BrowseEntry>,
    ) -> Result<Result<(), BrowseRefused>, TransportError> {
        let session = self.session()?;
        let start = match node {
            None | Some("") => NodeId::from(opcua::types::ObjectId::ObjectsFolder),
            Some(n) => match resolve(n, &self.namespaces) {
                Ok(id) => id,
                Err(e) => return Ok(Err(e.into())),
            },
        };
        let desc = BrowseDescription {
            node_id: start,
            browse_direction: BrowseDirection::Forward,
            reference_type_id: ReferenceTypeId::HierarchicalReferences.into(),
            include_subtypes: true,
            node_class_mask: NodeClassMask::all().bits(),
            result_mask: BrowseResultMask::All as u32,
        };
        let timeout = self.timeout;
        let first = tokio::time::timeout(timeout, session.browse(&[desc], 500, None)).await;
        let mut result = match first {
            Err(_) => return Err(TransportError::Timeout(timeout)),
            Ok(Err(e)) => return Err(self.service_error("Browse", e)),
            Ok(Ok(mut r)) => match r.pop() {
                Some(r) => r,
                None => return Ok(Ok(())),
            },
        };
        loop {
            if result.status_code.is_bad() {
                return Ok(Err(BrowseRefused::Status(result.status_code)));
            }
            for r in result.references.take().unwrap_or_default() {
                let entry = BrowseEntry {
                    node_id: r.node_id.node_id.to_string(),
                    browse_name: format!(
                        "{}:{}",
                        r.browse_name.namespace_index,
                        r.browse_name.name.as_ref()
                    ),
                    display_name: r.display_name.text.as_ref().to_owned(),
                    node_class: format!("{:?}", r.node_class),
                    type_definition: r.type_definition.node_id.to_string(),
                };
                if out.send(entry).await.is_err() {
                    // The HTTP client went away: release the continuation point.
                    if !result.continuation_point.is_null() {
                        let _ = session
                            .browse_next(true, &[result.continuation_point.clone()])
                            .await;
                    }
                    return Ok(Ok(()));
                }
            }
            if result.continuation_point.is_null() {
                return Ok(Ok(()));
            }
            let next = tokio::time::timeout(
                timeout,
                session.browse_next(false, &[result.continuation_point.clone()]),
            )
            .await;
            result = match next {
                Err(_) => return Err(TransportError::Timeout(timeout)),
                Ok(Err(e)) => return Err(self.service_error("BrowseNext", e)),
                Ok(Ok(mut r)) => match r.pop() {
                    Some(r) => r,
                    None => return Ok(Ok(())),
                },
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_read_as_before() {
        assert_eq!(
            BrowseRefused::Status(StatusCode::BadNodeIdUnknown).to_string(),
            "the server refused to browse: BadNodeIdUnknown"
        );
        let e: BrowseRefused = resolve("nonsense", &[]).unwrap_err().into();
        assert_eq!(
            e.to_string(),
            r#""nonsense" is not a node id like ns=2;s=Name"#
        );
        let e = crate::BrowseError::from(e);
        assert_eq!(
            e.to_string(),
            r#""nonsense" is not a node id like ns=2;s=Name"#
        );
    }
}
