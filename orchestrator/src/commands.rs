//! Write-back from the control center: `POST /api/v1/commands/{device}/{tag}` (operator)
//! publishes the write as a command (`$nexus/cmd/<device>/<tag>/set`) for the caller, waits
//! for the command handler's answer and returns it (docs/control.md, "Writing a value").
//!
//! The write goes through the command handler like any other: its validation, rate limits,
//! confirmation (read-back) and audit, which names the caller (MQTT 5 property
//! `nexus-on-behalf-of`; over MQTT 3.1.1, `commands.mqtt_v5: false`, the audit names the
//! orchestrator's user). The answer is taken from the standard `$nexus/cmd/response/...`
//! topics, where only Nexus's services publish, matched by its random request id: no Response
//! Topic, which any publisher allowed there could answer on first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
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

#[derive(Clone)]
pub struct Writer {
    mqtt: Arc<OnceLock<MqttHandle>>,
    /// By request id.
    pending: Arc<Mutex<HashMap<String, oneshot::Sender<Value>>>>,
}

impl Default for Writer {
    fn default() -> Self {
        Writer::new()
    }
}

impl Writer {
    pub fn new() -> Writer {
        Writer {
            mqtt: Arc::new(OnceLock::new()),
            pending: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The client to publish with, once the service has one.
    pub fn set_client(&self, mqtt: MqttHandle) {
        let _ = self.mqtt.set(mqtt);
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Value>>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A message of `$nexus/cmd/response/...` arrived: the answer of a write of ours when it
    /// carries one of our request ids.
    pub fn answer(&self, payload: &[u8]) {
        let Ok(v) = serde_json::from_slice::<Value>(payload) else {
            return;
        };
        let Some(id) = v.get("request_id").and_then(Value::as_str) else {
            return;
        };
        if !id.starts_with("ui-") {
            return;
        }
        let tx = self.pending().remove(id);
        if let Some(tx) = tx {
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
    let nonce: [u8; 16] = rand::random();
    let request_id = format!(
        "ui-{}",
        nonce.iter().map(|b| format!("{b:02x}")).collect::<String>()
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
        correlation_data: None,
        response_topic: None,
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_an_answer_naming_a_pending_write_of_ours_is_taken() {
        let w = Writer::new();
        let (tx, mut rx) = oneshot::channel();
        w.pending().insert("ui-abc".into(), tx);
        // Not ours, not JSON, no request id: ignored, the write still waits.
        w.answer(br#"{"request_id":"r-1","success":true}"#);
        w.answer(b"not json");
        w.answer(br#"{"success":true}"#);
        assert!(rx.try_recv().is_err());
        w.answer(br#"{"request_id":"ui-abc","success":false,"error":"read-only"}"#);
        assert_eq!(rx.try_recv().unwrap()["error"], "read-only");
        assert!(w.pending().is_empty());
    }
}
