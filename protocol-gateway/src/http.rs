//! The gateway's device API: `GET /api/v1/devices` (config and live status),
//! `GET /api/v1/devices/{id}/tags` (last values) and `GET /api/v1/devices/{id}/browse?node=`
//! (an OPC UA device's address space, streamed as JSON lines). A `node` longer than an OPC UA
//! node id can be is a 400 before any device is asked.
//!
//! Roles: the list and the tags need `viewer`; browsing needs `operator`, since it opens a
//! session on the plant's OPC UA server and walks its address space, work a read-only client
//! should not be able to put on a controller.

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use nexus_common::auth::http::Routes;
use nexus_common::codec::json::value_to_json;
use nexus_common::config::Role;
use serde_json::{json, Value};

use nexus_devices::opcua::BrowseEntry;
use nexus_devices::{BrowseError, Pools};

use crate::poller::DeviceSet;

pub type SharedDevices = Arc<Mutex<DeviceSet>>;

#[derive(Clone)]
pub struct Api {
    pub devices: SharedDevices,
    pub pools: Arc<Pools>,
}

async fn devices_list(State(api): State<Api>) -> Json<Value> {
    let views = api
        .devices
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .views();
    let list: Vec<Value> = views
        .iter()
        .map(|(cfg, state, device)| {
            let status = state
                .status
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            json!({
                "id": cfg.id,
                "protocol": format!("{:?}", cfg.protocol).to_lowercase(),
                "uns_prefix": cfg.uns_prefix,
                "poll_interval_ms": cfg.poll_interval.as_millis() as u64,
                "endpoint": device.endpoint(),
                "tags": cfg.tags.len(),
                "status": status,
            })
        })
        .collect();
    Json(json!({ "devices": list }))
}

async fn tags(State(api): State<Api>, Path(id): Path<String>) -> Response {
    let views = api
        .devices
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .views();
    let Some((cfg, state, device)) = views.into_iter().find(|(c, _, _)| c.id.as_str() == id) else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("no device {id:?}")})),
        )
            .into_response();
    };
    let values = state
        .values
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let list: Vec<Value> = cfg
        .tags
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let p = values.get(i).cloned().flatten();
            json!({
                "id": t.id,
                "topic": device.topics[i].as_str(),
                "v": p.as_ref().map(|p| value_to_json(p.value.as_ref())),
                "q": p.as_ref().map(|p| p.quality.as_str()),
                "ts": p.as_ref().map(|p| p.ts_ms),
                "u": t.unit,
                "access": format!("{:?}", t.access).to_lowercase(),
            })
        })
        .collect();
    Json(json!({ "device": id, "tags": list })).into_response()
}

fn error(status: StatusCode, msg: String) -> Response {
    (status, Json(json!({ "error": msg }))).into_response()
}

#[derive(serde::Deserialize)]
struct BrowseQuery {
    node: Option<String>,
}

/// Longest `node` taken, in characters: OPC UA limits string identifiers to 4096 characters,
/// and `ns=<index>;s=` comes on top.
const MAX_NODE_CHARS: usize = 4096 + 32;

/// The browse parameters, or the message of a 400 naming the one that is wrong.
fn browse_query(q: Result<Query<BrowseQuery>, QueryRejection>) -> Result<BrowseQuery, String> {
    let Query(q) = q.map_err(|e| e.body_text())?;
    if let Some(n) = &q.node {
        let chars = n.chars().count();
        if chars > MAX_NODE_CHARS {
            return Err(format!(
                "node: {chars} characters, more than an OPC UA node id has ({MAX_NODE_CHARS})"
            ));
        }
    }
    Ok(q)
}

fn line(v: &impl serde::Serialize) -> bytes::Bytes {
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.push(b'\n');
    b.into()
}

/// The children of `node` (default: the Objects folder), one JSON object a line, streamed as
/// the server answers (browse continuation points), so a large address space never sits in
/// memory. An error before the first child is a 4xx/5xx; one later ends the stream with an
/// `{"error": ..}` line.
async fn browse(
    State(api): State<Api>,
    Path(id): Path<String>,
    q: Result<Query<BrowseQuery>, QueryRejection>,
) -> Response {
    let q = match browse_query(q) {
        Ok(q) => q,
        Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
    };
    let device = {
        let views = api
            .devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .views();
        views
            .into_iter()
            .find(|(c, _, _)| c.id.as_str() == id)
            .map(|(_, _, d)| d)
    };
    let Some(device) = device else {
        return error(StatusCode::NOT_FOUND, format!("no device {id:?}"));
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<BrowseEntry>(256);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let pools = api.pools.clone();
    tokio::spawn(async move {
        let r = pools.browse(&device, q.node, tx).await;
        let _ = done_tx.send(r);
    });
    let outcome = |r: Result<Result<(), BrowseError>, _>| match r {
        Ok(Ok(())) => None,
        Ok(Err(e @ (BrowseError::Refused(_) | BrowseError::NotBrowsable(_)))) => {
            Some((StatusCode::BAD_REQUEST, e.to_string()))
        }
        Ok(Err(e @ BrowseError::Pool(_))) => Some((StatusCode::BAD_GATEWAY, e.to_string())),
        Err(_) => Some((StatusCode::INTERNAL_SERVER_ERROR, "browse ended".to_owned())),
    };
    let first = rx.recv().await;
    let Some(first) = first else {
        // Nothing came: either no children or an error.
        return match outcome(done_rx.await) {
            None => (
                [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
                "",
            )
                .into_response(),
            Some((status, e)) => error(status, e),
        };
    };
    let stream = futures::stream::unfold(
        (Some(first), rx, Some(done_rx)),
        move |(pending, mut rx, done)| async move {
            if let Some(e) = pending {
                return Some((
                    Ok::<_, std::convert::Infallible>(line(&e)),
                    (None, rx, done),
                ));
            }
            if let Some(e) = rx.recv().await {
                return Some((Ok(line(&e)), (None, rx, done)));
            }
            let done = done?;
            outcome(done.await).map(|(_, e)| (Ok(line(&json!({ "error": e }))), (None, rx, None)))
        },
    );
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response()
}

pub fn routes(devices: SharedDevices, pools: Arc<Pools>) -> Routes {
    Routes::new()
        .get("/api/v1/devices", Role::Viewer, devices_list)
        .get("/api/v1/devices/{id}/tags", Role::Viewer, tags)
        .get("/api/v1/devices/{id}/browse", Role::Operator, browse)
        .with_state(Api { devices, pools })
}
