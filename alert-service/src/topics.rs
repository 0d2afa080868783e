//! The alarm topics and what travels on them, without I/O: the retained state of each alarm,
//! its events, and the acknowledge request. The state payload is also what the REST API
//! returns, and what a restart reads back.

use nexus_common::codec::json::value_to_json;
use serde::Deserialize;
use serde_json::{json, Value as JValue};

use crate::engine::Change;
use crate::state::{Alarm, State};

pub use nexus_common::topic::sys::{
    ALARMS_PREFIX as ALARM_PREFIX, ALARM_ACK as ACK_TOPIC, ALARM_EVENTS as EVENTS_TOPIC,
};

/// `$nexus/alarms/<topic>/<rule id>`.
pub fn state_topic(topic: &str, rule_id: &str) -> String {
    nexus_common::topic::sys::alarm_state(topic, rule_id)
}

/// The id used by the REST API: `<rule id>:<topic>` (URL-encode it in paths).
pub fn alarm_id(rule_id: &str, topic: &str) -> String {
    format!("{rule_id}:{topic}")
}

pub fn state_payload(c: &Change, now: i64) -> JValue {
    json!({
        "id": alarm_id(&c.rule_id, &c.topic),
        "rule_id": c.rule_id,
        "topic": c.topic,
        "state": c.alarm.state.as_str(),
        "severity": c.severity,
        "value": value_to_json(c.value.as_ref()),
        "message": c.message,
        "since": c.alarm.since_ms,
        "ts": c.ts_ms,
        "shelved_until": c.alarm.shelved_until_ms.filter(|t| *t > now),
        "out_of_service": c.alarm.out_of_service,
        "suppressed": c.alarm.suppressed,
        "area": c.area,
    })
}

/// An event on [`EVENTS_TOPIC`] (and to webhooks): the state plus who did what.
pub fn event_payload(c: &Change, now: i64) -> JValue {
    let mut ev = state_payload(c, now);
    ev["event"] = json!(c.event.as_str());
    ev["user"] = json!(c.user);
    ev["comment"] = json!(c.comment);
    ev
}

/// An acknowledge request on [`ACK_TOPIC`].
#[derive(Debug, Deserialize)]
pub struct Ack {
    pub rule_id: String,
    pub topic: String,
    pub user: Option<String>,
    pub comment: Option<String>,
}

/// A retained state read back at start: (rule id, topic, alarm), or `None` for anything
/// that is not one (the ack and events topics, cleared states, foreign payloads).
pub fn parse_state(topic: &str, payload: &[u8]) -> Option<(String, String, Alarm)> {
    if topic == ACK_TOPIC
        || topic == EVENTS_TOPIC
        || !topic.starts_with(ALARM_PREFIX)
        || payload.is_empty()
    {
        return None;
    }
    let v = serde_json::from_slice::<JValue>(payload).ok()?;
    let (Some(rule), Some(t), Some(state)) = (
        v["rule_id"].as_str(),
        v["topic"].as_str(),
        v["state"].as_str().and_then(State::parse),
    ) else {
        return None;
    };
    let alarm = Alarm {
        state,
        since_ms: v["since"].as_i64().unwrap_or(0),
        shelved_until_ms: v["shelved_until"].as_i64(),
        suppressed: v["suppressed"].as_bool().unwrap_or(false),
        out_of_service: v["out_of_service"].as_bool().unwrap_or(false),
    };
    Some((rule.to_owned(), t.to_owned(), alarm))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Event;
    use nexus_common::Value;

    fn change() -> Change {
        Change {
            rule_id: "hot".into(),
            topic: "acme/s/a/l/dev/temp".into(),
            event: Event::Shelved,
            alarm: Alarm {
                state: State::ActiveAcked,
                since_ms: 1_000,
                shelved_until_ms: Some(9_000),
                suppressed: true,
                out_of_service: false,
            },
            severity: 750,
            value: Some(Value::Float(81.5)),
            message: "hot".into(),
            area: "acme/s/a/l".into(),
            ts_ms: 2_000,
            user: Some("ann".into()),
            comment: None,
        }
    }

    #[test]
    fn a_retained_state_reads_back_as_the_alarm_it_came_from() {
        let c = change();
        let topic = state_topic(&c.topic, &c.rule_id);
        assert_eq!(topic, "$nexus/alarms/acme/s/a/l/dev/temp/hot");
        let body = state_payload(&c, 2_000).to_string();
        assert_eq!(
            parse_state(&topic, body.as_bytes()),
            Some((c.rule_id.clone(), c.topic.clone(), c.alarm.clone()))
        );
        let ev = event_payload(&c, 2_000);
        assert_eq!(
            (&ev["id"], &ev["event"], &ev["user"]),
            (
                &json!("hot:acme/s/a/l/dev/temp"),
                &json!("shelved"),
                &json!("ann")
            )
        );
    }

    #[test]
    fn only_alarm_states_are_read_back() {
        let body = state_payload(&change(), 2_000).to_string();
        for topic in [ACK_TOPIC, EVENTS_TOPIC, "acme/s/a/l/dev/temp/hot"] {
            assert_eq!(parse_state(topic, body.as_bytes()), None, "{topic}");
        }
        let topic = state_topic("acme/s/a/l/dev/temp", "hot");
        assert_eq!(parse_state(&topic, b""), None, "a cleared state");
        assert_eq!(parse_state(&topic, b"{\"state\":\"normal\"}"), None);
        assert_eq!(parse_state(&topic, b"not json"), None);
    }
}
