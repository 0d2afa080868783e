//! Subscriptions: monitored items created in chunks of MaxMonitoredItemsPerCall, with the
//! tag's deadband asked of the server (or applied by the gateway where the server refuses
//! filters); changes are queued by the callback until the next poll takes them.

use std::sync::{Arc, Mutex};

use nexus_common::Quality;
use opcua::client::DataChangeCallback;
use opcua::types::{
    DataChangeFilter, DataChangeTrigger, DeadbandType, ExtensionObject, MonitoredItemCreateRequest,
    MonitoringMode, MonitoringParameters, NodeId, ReadValueId, SubStatusCode, TimestampsToReturn,
};

use super::convert::{quality_of, reading_of};
use super::plan::OpcUaPlan;
use super::{OpcUaDriver, MAX_NOTIFICATIONS_PER_PUBLISH};
use crate::device::Device;
use crate::driver::{Reading, TransportError};

/// A device's subscription on the current session.
pub(super) struct Subscription {
    /// Changes queued by the callback since the last poll.
    pub(super) queue: Arc<Mutex<Vec<(usize, Reading)>>>,
    /// The last reading of each tag (for heartbeats).
    pub(super) last: Vec<Option<Reading>>,
    /// Tags the server refused to monitor, with why.
    pub(super) refused: Vec<(usize, Reading)>,
}

impl OpcUaDriver {
    /// Create the device's subscription and monitored items on this session.
    pub(super) async fn subscribe(
        &mut self,
        device: &Device,
        plan: &OpcUaPlan,
    ) -> Result<(), TransportError> {
        let session = self.session()?;
        let max_items = self.max_items.max(1);
        let queue: Arc<Mutex<Vec<(usize, Reading)>>> = Arc::new(Mutex::new(Vec::new()));
        let q = queue.clone();
        let specs = plan.tags.clone();
        let callback = DataChangeCallback::new(move |dv, item| {
            // Handles are tag index + 1: the client replaces handle 0 with its own.
            let i = (item.client_handle() as usize).wrapping_sub(1);
            if let Some(spec) = specs.get(i) {
                q.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((i, reading_of(spec, &dv)));
            }
        });
        let timeout = self.timeout;
        let keep_alive = (10_000 / plan.publishing.as_millis().max(1) as u32).clamp(3, 100);
        let created = tokio::time::timeout(
            timeout,
            session.create_subscription(
                plan.publishing,
                keep_alive * 3,
                keep_alive,
                MAX_NOTIFICATIONS_PER_PUBLISH,
                0,
                true,
                callback,
            ),
        )
        .await;
        let sub_id = match created {
            Err(_) => return Err(TransportError::Timeout(timeout)),
            Ok(Err(e)) => return Err(self.service_error("CreateSubscription", e)),
            Ok(Ok(id)) => id,
        };
        let ds = self.device_session(device, plan);
        let mut refused = Vec::new();
        let mut items: Vec<(usize, MonitoredItemCreateRequest)> = Vec::new();
        for (i, node) in ds.nodes.iter().enumerate() {
            match node {
                Ok(n) => items.push((i, item_request(n, i, plan, true))),
                Err(e) => refused.push((
                    i,
                    Reading::Bad {
                        quality: Quality::BadConfigError,
                        reason: e.to_string(),
                    },
                )),
            }
        }
        let mut retry_without_filter = Vec::new();
        for chunk in items.chunks(max_items) {
            let reqs: Vec<MonitoredItemCreateRequest> =
                chunk.iter().map(|(_, r)| r.clone()).collect();
            let r = tokio::time::timeout(
                timeout,
                session.create_monitored_items(sub_id, TimestampsToReturn::Both, reqs),
            )
            .await;
            let results = match r {
                Err(_) => return Err(TransportError::Timeout(timeout)),
                Ok(Err(e)) => return Err(self.service_error("CreateMonitoredItems", e)),
                Ok(Ok(v)) => v,
            };
            for ((i, _), res) in chunk.iter().zip(results) {
                let status = res.result.status_code;
                if status.is_good() {
                    continue;
                }
                let sub = status.sub_code();
                if matches!(
                    sub,
                    SubStatusCode::BadMonitoredItemFilterUnsupported
                        | SubStatusCode::BadFilterNotAllowed
                        | SubStatusCode::BadDeadbandFilterInvalid
                        | SubStatusCode::BadMonitoredItemFilterInvalid
                ) {
                    retry_without_filter.push(*i);
                } else {
                    refused.push((
                        *i,
                        Reading::Bad {
                            quality: quality_of(status),
                            reason: format!("the server refused to monitor the node: {status}"),
                        },
                    ));
                }
            }
        }
        if !retry_without_filter.is_empty() {
            tracing::info!(device = %device.cfg.id, items = retry_without_filter.len(), "the server refused deadband filters; the gateway applies the deadband itself");
            let ds = self.device_session(device, plan);
            let reqs: Vec<(usize, MonitoredItemCreateRequest)> = retry_without_filter
                .iter()
                .filter_map(|&i| match &ds.nodes[i] {
                    Ok(n) => Some((i, item_request(n, i, plan, false))),
                    Err(_) => None,
                })
                .collect();
            for chunk in reqs.chunks(max_items) {
                let r = tokio::time::timeout(
                    timeout,
                    session.create_monitored_items(
                        sub_id,
                        TimestampsToReturn::Both,
                        chunk.iter().map(|(_, r)| r.clone()).collect(),
                    ),
                )
                .await;
                let results = match r {
                    Err(_) => return Err(TransportError::Timeout(timeout)),
                    Ok(Err(e)) => return Err(self.service_error("CreateMonitoredItems", e)),
                    Ok(Ok(v)) => v,
                };
                for ((i, _), res) in chunk.iter().zip(results) {
                    if !res.result.status_code.is_good() {
                        refused.push((
                            *i,
                            Reading::Bad {
                                quality: quality_of(res.result.status_code),
                                reason: format!(
                                    "the server refused to monitor the node: {}",
                                    res.result.status_code
                                ),
                            },
                        ));
                    }
                }
            }
        }
        let ds = self.device_session(device, plan);
        ds.subscription = Some(Subscription {
            queue,
            last: vec![None; plan.tags.len()],
            refused,
        });
        Ok(())
    }
}

fn item_request(
    node: &NodeId,
    i: usize,
    plan: &OpcUaPlan,
    filter: bool,
) -> MonitoredItemCreateRequest {
    let deadband = plan.tags[i].deadband.filter(|_| filter);
    MonitoredItemCreateRequest {
        item_to_monitor: ReadValueId::new_value(node.clone()),
        monitoring_mode: MonitoringMode::Reporting,
        requested_parameters: MonitoringParameters {
            client_handle: i as u32 + 1,
            sampling_interval: plan.sampling.as_secs_f64() * 1000.0,
            filter: match deadband {
                // The server's deadband works on raw values; the tag's is in engineering units.
                Some(d) => ExtensionObject::from_message(DataChangeFilter {
                    trigger: DataChangeTrigger::StatusValue,
                    deadband_type: DeadbandType::Absolute as u32,
                    deadband_value: d / plan.tags[i].scale.unwrap_or(1.0).abs(),
                }),
                None => ExtensionObject::null(),
            },
            queue_size: 100,
            discard_oldest: true,
        },
    }
}
