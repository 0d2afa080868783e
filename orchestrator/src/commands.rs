//! Write-back from the control center: `POST /api/v1/commands/{device}/{tag}` (operator)
//! publishes the write as a command (`$nexus/cmd/<device>/<tag>/set`) for the caller, waits
//! for the command handler's answer and returns it (docs/control.md, "Writing a value").
//!
//! The write goes through the command handler like any other: its validation, rate limits,
//! confirmation (read-back) and audit, which names the caller (MQTT 5 property
//! `nexus-on-behalf-of`). The answer comes back on this orchestrator's own Response Topic,
//! matched by correlation data, or over MQTT 3.1.1 (`commands.mqtt_v5: false`, a broker
//! without MQTT 5) on the standard response topics, matched by request id; the audit then
//! names the orchestrator's user.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use nexus_common::auth::http::{Caller, Routes};
use nexus_common::config::Role;
use nexus_common::domain::{DeviceId, TagId};
use nexus_common::mqtt::{MqttHandle, PublishProps, QoS};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::oneshot;

/// Writes waiting for their answer at once; more are answered 503.
pub const MAX_PENDING: usize = 256;
/// How long a write waits for the command handler's answer.
pub const ANSWER_WAIT: Duration = Duration::from_secs(15);

/// Where the answers for this orchestrator come back.
pub fn reply_topic(instance: &str) -> String {
    format!("nexus-ui/responses/{instance}")
}

#[derive(Clone)]
pub struct Writer {
    mqtt: Arc<OnceLock<MqttHandle>>,
    /// By request id (which the correlation data carries too).
    pending: Arc<Mutex<HashMap<String, oneshot::Sender<Value>>>>,
    reply_topic: String,
}

impl Writer {
    pub fn new(instance: &str) -> Writer {
        Writer {
            mqtt: Arc::new(OnceLock::new()),
            pending: Arc::new(Mutex::new(HashMap::new())),
            reply_topic: reply_topic(instance),
        }
    }

    /// The client to publish with, once the service has one.
    pub fn set_client(&self, mqtt: MqttHandle) {
        let _ = self.mqtt.set(mqtt);
    }

    pub fn reply_topic(&self) -> &str {
        &self.reply_topic
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Value>>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An answer arrived: on the reply topic (MQTT 5, with the correlation data), or on the
    /// standard `$nexus/cmd/response/...` topics (with the request id in the payload; how it
    /// comes back over MQTT 3.1.1). The first one answers the write.
    pub fn answer(&self, correlation: Option<&Bytes>, payload: &[u8]) {
        let Ok(v) = serde_json::from_slice::<Value>(payload) else {
            return;
        };
        let id = correlation
            .and_then(|c| std::str::from_utf8(c).ok().map(str::to_owned))
            .or_else(|| {
                v.get("request_id")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            });
        let Some(id) = id.filter(|i| i.starts_with("ui-")) else {
            return;
        };
        if let Some(tx) = self.pending().remove(&id) {
            let _ = tx.send(v);
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteBody {
    value: Value,
    #[serde(default)]
    confirm: Option<bool>,
}

fn fail(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({ "error": msg.into() }))).into_response()
}

async fn write(
    State(w): State<Writer>,
    Caller(who): Caller,
    Path((device, tag)): Path<(String, String)>,
    body: Result<Json<WriteBody>, JsonRejection>,
) -> Response {
    let body = match body {
        Ok(Json(b)) => b,
        Err(e) => return fail(StatusCode::BAD_REQUEST, format!("body: {}", e.body_text())),
    };
    if let Err(e) = DeviceId::new(device.clone()) {
        return fail(StatusCode::BAD_REQUEST, format!("device: {e}"));
    }
    if let Err(e) = TagId::new(tag.clone()) {
        return fail(StatusCode::BAD_REQUEST, format!("tag: {e}"));
    }
    let Some(mqtt) = w.mqtt.get().filter(|m| m.is_connected()) else {
        return fail(
            StatusCode::SERVICE_UNAVAILABLE,
            "the orchestrator is not connected to the broker",
        );
    };
    let correlation: [u8; 16] = rand::random();
    let request_id = format!(
        "ui-{}",
        correlation
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let (tx, rx) = oneshot::channel();
    {
        let mut p = w.pending();
        if p.len() >= MAX_PENDING {
            return fail(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{MAX_PENDING} writes are waiting for their answer; try again"),
            );
        }
        p.insert(request_id.clone(), tx);
    }
    let mut cmd =
        json!({"value": body.value, "request_id": request_id, "ts": nexus_common::now_ms()});
    if let Some(c) = body.confirm {
        cmd["confirm"] = json!(c);
    }
    let props = PublishProps {
        correlation_data: Some(Bytes::from(request_id.clone())),
        response_topic: Some(w.reply_topic.clone()),
        user_properties: vec![(
            nexus_common::broker::ON_BEHALF_PROPERTY.into(),
            who.name.clone(),
        )],
    };
    let topic = format!("{}{device}/{tag}/set", nexus_common::topic::sys::CMD_PREFIX);
    if let Err(e) = mqtt
        .publish_with(
            &topic,
            cmd.to_string(),
            QoS::AtLeastOnce,
            false,
            Some(props),
        )
        .await
    {
        w.pending().remove(&request_id);
        return fail(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot publish the command: {e}"),
        );
    }
    tracing::info!(user = %who.name, device = %device, tag = %tag, request_id = %request_id, "write sent for the control center");
    match tokio::time::timeout(ANSWER_WAIT, rx).await {
        Ok(Ok(answer)) => Json(answer).into_response(),
        _ => {
            w.pending().remove(&request_id);
            fail(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "no answer from the command handler in {} s (request {request_id}): is it running?",
                    ANSWER_WAIT.as_secs()
                ),
            )
        }
    }
}

/// The write route.
pub fn routes(w: Writer) -> Routes {
    Routes::new()
        .post("/api/v1/commands/{device}/{tag}", Role::Operator, write)
        .with_state(w)
}
