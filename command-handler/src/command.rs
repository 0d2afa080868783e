//! Command topics and payloads of the contract, parsed without I/O.
//!
//! - `$nexus/cmd/<device>/write`: `{"tag_id":"sp","value":75.5,"request_id":"r-1"}` or
//!   `{"writes":[{"tag_id":..,"value":..},..],"request_id":..}`
//! - `$nexus/cmd/<device>/<tag>/set`: a bare JSON value (`75.5`, `true`, `"text"`) or
//!   `{"value":..,"request_id":..}`
//!
//! Optional fields everywhere: `confirm` (read back after writing), `ttl_ms` (refuse when older),
//! `ts` (when the sender sent it, unix ms; the age for `ttl_ms` is counted from it), `user`
//! (who claims to send it, recorded in the audit as claimed).

use nexus_common::codec::json::decode_bare_value;
use nexus_common::topic::sys;
use nexus_common::Value;
use serde_json::Value as Json;

/// Where a command was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CmdTopic {
    Write { device: String },
    Set { device: String, tag: String },
}

impl CmdTopic {
    pub fn device(&self) -> &str {
        match self {
            CmdTopic::Write { device } | CmdTopic::Set { device, .. } => device,
        }
    }
}

/// A refused command, with what is known for answering it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub device: Option<String>,
    pub tag: Option<String>,
    pub request_id: Option<String>,
    /// Short stable reason for metrics (`bad_topic`, `bad_json`, `bad_payload`, `too_large`).
    pub reason: &'static str,
    pub message: String,
}

/// A parsed command.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub device: String,
    pub writes: Vec<(String, Value)>,
    pub request_id: Option<String>,
    pub confirm: Option<bool>,
    pub ttl_ms: Option<u64>,
    pub sent_ts_ms: Option<i64>,
    /// The `user` the payload names: a claim, kept for the audit beside [`Command::user`].
    pub claimed_user: Option<String>,
    /// Who sent it, as the broker authenticated them (its `nexus-user` property); None when
    /// the broker did not say (an external broker, MQTT 3.1.1 between them).
    pub user: Option<String>,
}

/// An MQTT 5 Response Topic the handler may publish to as the service user: a plain topic
/// outside `$` (so never `$nexus/...`, where the service user may publish commands), without
/// wildcards and within MQTT's limits. The service user bypasses the broker's ACL, so a
/// requester who could name any topic here could make the handler publish where the
/// requester may not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyTopic(String);

/// MQTT's limit on a topic name: a UTF-8 string of at most 65,535 bytes.
const MAX_TOPIC_LEN: usize = 65_535;

impl ReplyTopic {
    /// Why a topic is refused, in a few words (for the log).
    pub fn parse(topic: &str) -> Result<ReplyTopic, &'static str> {
        if topic.is_empty() {
            return Err("empty");
        }
        if topic.starts_with('$') {
            return Err("a $ topic (broker or system topics)");
        }
        if topic.len() > MAX_TOPIC_LEN {
            return Err("longer than 65535 bytes");
        }
        if topic.contains(['+', '#']) {
            return Err("contains a wildcard");
        }
        // MQTT forbids U+0000 and advises against other control characters (a receiver may
        // close the connection over them).
        if topic.chars().any(char::is_control) {
            return Err("contains a control character");
        }
        Ok(ReplyTopic(topic.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A topic cut to its first two levels (each at most 32 characters) for the log, so a
/// refused Response Topic does not put what a requester chose, whole, into the log.
pub fn redact_topic(topic: &str) -> String {
    const LEVELS: usize = 2;
    const LEVEL_CHARS: usize = 32;
    let mut out = Vec::with_capacity(LEVELS);
    let mut cut = false;
    for (i, level) in topic.split('/').enumerate() {
        if i == LEVELS {
            cut = true;
            break;
        }
        if level.chars().count() > LEVEL_CHARS {
            cut = true;
        }
        out.push(level.chars().take(LEVEL_CHARS).collect::<String>());
    }
    let mut s = out.join("/");
    if cut {
        s.push_str("/...");
    }
    s
}

fn level_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Parse a command topic. `Err` carries the device when it could be read from the topic.
pub fn parse_topic(topic: &str) -> Result<CmdTopic, Rejection> {
    let reject = |device: Option<&str>, message: String| Rejection {
        device: device.filter(|d| level_ok(d)).map(str::to_owned),
        tag: None,
        request_id: None,
        reason: "bad_topic",
        message,
    };
    let Some(rest) = topic.strip_prefix(sys::CMD_PREFIX) else {
        return Err(reject(None, format!("{topic:?} is not a command topic")));
    };
    let levels: Vec<&str> = rest.split('/').collect();
    match levels.as_slice() {
        [device, "write"] if level_ok(device) => Ok(CmdTopic::Write { device: (*device).to_owned() }),
        [device, tag, "set"] if level_ok(device) && level_ok(tag) => Ok(CmdTopic::Set { device: (*device).to_owned(), tag: (*tag).to_owned() }),
        [device, ..] => Err(reject(
            Some(device),
            format!("topic {topic:?}: expected $nexus/cmd/<device>/write or $nexus/cmd/<device>/<tag>/set"),
        )),
        [] => Err(reject(None, format!("topic {topic:?} names no device"))),
    }
}

fn scalar(v: &Json, what: &str) -> Result<Value, String> {
    match v {
        Json::Null => Err(format!(
            "{what} is null; a write needs a number, bool or string"
        )),
        Json::Array(_) | Json::Object(_) => Err(format!("{what} must be a number, bool or string")),
        other => decode_bare_value(other.to_string().as_bytes())
            .map_err(|e| format!("{what}: {e}"))?
            .ok_or_else(|| format!("{what} is null")),
    }
}

fn opt_str(o: &serde_json::Map<String, Json>, key: &str) -> Result<Option<String>, String> {
    match o.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) if s.len() <= 256 => Ok(Some(s.clone())),
        Some(Json::String(_)) => Err(format!("{key} is longer than 256 characters")),
        Some(Json::Number(n)) if key == "request_id" => Ok(Some(n.to_string())),
        Some(_) => Err(format!("{key} must be a string")),
    }
}

/// Parse a payload sent to `topic` (at most `max_len` bytes).
pub fn parse(topic: &CmdTopic, payload: &[u8], max_len: usize) -> Result<Command, Rejection> {
    let device = topic.device().to_owned();
    let set_tag = match topic {
        CmdTopic::Set { tag, .. } => Some(tag.clone()),
        CmdTopic::Write { .. } => None,
    };
    let mut rej = Rejection {
        device: Some(device.clone()),
        tag: set_tag.clone(),
        request_id: None,
        reason: "bad_payload",
        message: String::new(),
    };
    if payload.len() > max_len {
        rej.reason = "too_large";
        rej.message = format!(
            "payload of {} bytes is larger than the limit of {max_len}",
            payload.len()
        );
        return Err(rej);
    }
    let json: Json = match serde_json::from_slice(payload) {
        Ok(j) => j,
        Err(e) => {
            rej.reason = "bad_json";
            rej.message = format!("payload is not JSON: {e}");
            return Err(rej);
        }
    };
    let obj = match (&json, &set_tag) {
        (Json::Object(o), _) => o.clone(),
        // `/set` takes a bare value.
        (other, Some(tag)) => {
            let value = scalar(other, "value").map_err(|m| Rejection {
                message: m,
                ..rej.clone()
            })?;
            return Ok(Command {
                device,
                writes: vec![(tag.clone(), value)],
                request_id: None,
                confirm: None,
                ttl_ms: None,
                sent_ts_ms: None,
                claimed_user: None,
                user: None,
            });
        }
        (_, None) => {
            rej.message =
                "a write command is a JSON object with tag_id and value, or writes".into();
            return Err(rej);
        }
    };
    rej.request_id = opt_str(&obj, "request_id").ok().flatten();
    // The handler never acts on an answer of its own. Every answer it publishes is an object
    // with `success` and `duration_ms` (built by the handler, so a requester cannot take them
    // out), and no command carries either; a payload with one is refused. The mark is in the
    // payload rather than in an MQTT 5 user property because a payload crosses every broker,
    // bridge and protocol version unchanged, where a 3.1.1 hop drops properties. Forging the
    // mark only gets the forger's own command refused.
    if let Some(k) = ["success", "duration_ms"]
        .into_iter()
        .find(|k| obj.contains_key(*k))
    {
        rej.message = format!(
            "this is a command response (it has {k:?}), not a command; the handler never acts on its own answers"
        );
        return Err(rej);
    }
    let fail = |rej: &Rejection, m: String| Rejection {
        message: m,
        ..rej.clone()
    };
    let request_id = opt_str(&obj, "request_id").map_err(|m| fail(&rej, m))?;
    let claimed_user = opt_str(&obj, "user").map_err(|m| fail(&rej, m))?;
    let confirm = match obj.get("confirm") {
        None | Some(Json::Null) => None,
        Some(Json::Bool(b)) => Some(*b),
        Some(_) => return Err(fail(&rej, "confirm must be true or false".into())),
    };
    let ttl_ms =
        match obj.get("ttl_ms") {
            None | Some(Json::Null) => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                fail(&rej, "ttl_ms must be a whole number of milliseconds".into())
            })?),
        };
    let sent_ts_ms = match obj.get("ts") {
        None | Some(Json::Null) => None,
        Some(v) => Some(
            v.as_i64()
                .ok_or_else(|| fail(&rej, "ts must be unix milliseconds".into()))?,
        ),
    };
    let writes = match &set_tag {
        Some(tag) => {
            let v = obj
                .get("value")
                .ok_or_else(|| fail(&rej, "missing value".into()))?;
            vec![(tag.clone(), scalar(v, "value").map_err(|m| fail(&rej, m))?)]
        }
        None => {
            let one =
                |o: &serde_json::Map<String, Json>, at: &str| -> Result<(String, Value), String> {
                    let tag = match o.get("tag_id") {
                        Some(Json::String(t)) if level_ok(t) => t.clone(),
                        Some(Json::String(t)) => {
                            return Err(format!("{at}tag_id {t:?} is not a tag id"))
                        }
                        Some(_) => return Err(format!("{at}tag_id must be a string")),
                        None => return Err(format!("{at}missing tag_id")),
                    };
                    let v = o.get("value").ok_or_else(|| format!("{at}missing value"))?;
                    Ok((tag, scalar(v, &format!("{at}value"))?))
                };
            match obj.get("writes") {
                Some(Json::Array(list)) if list.is_empty() => {
                    return Err(fail(&rej, "writes is empty".into()))
                }
                Some(Json::Array(list)) if list.len() > 100 => {
                    return Err(fail(&rej, "more than 100 writes in one command".into()))
                }
                Some(Json::Array(list)) => {
                    let mut out = Vec::with_capacity(list.len());
                    for (i, w) in list.iter().enumerate() {
                        let Json::Object(o) = w else {
                            return Err(fail(&rej, format!("writes[{i}] must be an object")));
                        };
                        out.push(one(o, &format!("writes[{i}]: ")).map_err(|m| fail(&rej, m))?);
                    }
                    out
                }
                Some(_) => return Err(fail(&rej, "writes must be a list".into())),
                None => {
                    if let Some(Json::String(t)) = obj.get("tag_id") {
                        rej.tag = level_ok(t).then(|| t.clone());
                    }
                    vec![one(&obj, "").map_err(|m| fail(&rej, m))?]
                }
            }
        }
    };
    Ok(Command {
        device,
        writes,
        request_id,
        confirm,
        ttl_ms,
        sent_ts_ms,
        claimed_user,
        user: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn write() -> CmdTopic {
        CmdTopic::Write {
            device: "plc-1".into(),
        }
    }

    #[test]
    fn topics() {
        assert_eq!(parse_topic("$nexus/cmd/plc-1/write").unwrap(), write());
        assert_eq!(
            parse_topic("$nexus/cmd/plc-1/sp/set").unwrap(),
            CmdTopic::Set {
                device: "plc-1".into(),
                tag: "sp".into()
            }
        );
        let e = parse_topic("$nexus/cmd/plc-1/sp/extra/set").unwrap_err();
        assert_eq!(e.device.as_deref(), Some("plc-1"));
        assert!(
            e.message.contains("expected $nexus/cmd/<device>/write"),
            "{}",
            e.message
        );
        assert!(parse_topic("$nexus/cmd/plc-1/read").is_err());
        assert!(parse_topic("$nexus/cmd/a+b/write")
            .unwrap_err()
            .device
            .is_none());
        assert!(parse_topic("acme/x").is_err());
    }

    #[test]
    fn single_multi_and_bare() {
        let c = parse(
            &write(),
            br#"{"tag_id":"setpoint","value":75.5,"request_id":"r-1"}"#,
            1024,
        )
        .unwrap();
        assert_eq!(c.writes, vec![("setpoint".into(), Value::Float(75.5))]);
        assert_eq!(c.request_id.as_deref(), Some("r-1"));
        let c = parse(&write(), br#"{"writes":[{"tag_id":"a","value":1},{"tag_id":"b","value":true}],"request_id":7,"confirm":true,"ttl_ms":500,"ts":1700000000000,"user":"ann"}"#, 1024).unwrap();
        assert_eq!(
            c.writes,
            vec![("a".into(), Value::Int(1)), ("b".into(), Value::Bool(true))]
        );
        assert_eq!(c.request_id.as_deref(), Some("7"));
        assert_eq!(
            (c.confirm, c.ttl_ms, c.sent_ts_ms),
            (Some(true), Some(500), Some(1_700_000_000_000))
        );
        assert_eq!(c.claimed_user.as_deref(), Some("ann"));
        let set = CmdTopic::Set {
            device: "plc-1".into(),
            tag: "sp".into(),
        };
        assert_eq!(
            parse(&set, b"75.5", 1024).unwrap().writes,
            vec![("sp".into(), Value::Float(75.5))]
        );
        assert_eq!(
            parse(&set, b"\"on\"", 1024).unwrap().writes,
            vec![("sp".into(), Value::String("on".into()))]
        );
        let c = parse(&set, br#"{"value":false,"request_id":"x"}"#, 1024).unwrap();
        assert_eq!(
            (c.writes[0].1.clone(), c.request_id.as_deref()),
            (Value::Bool(false), Some("x"))
        );
    }

    #[test]
    fn rejections_say_what() {
        let cases: [(&[u8], &str, &str); 9] = [
            (b"{not json", "bad_json", "payload is not JSON"),
            (br#"{"value":1}"#, "bad_payload", "missing tag_id"),
            (br#"{"tag_id":"a"}"#, "bad_payload", "missing value"),
            (
                br#"{"tag_id":"a","value":[1]}"#,
                "bad_payload",
                "value must be a number, bool or string",
            ),
            (
                br#"{"tag_id":"a","value":null}"#,
                "bad_payload",
                "value is null",
            ),
            (
                br#"{"tag_id":"a/b","value":1}"#,
                "bad_payload",
                "is not a tag id",
            ),
            (br#"{"writes":[]}"#, "bad_payload", "writes is empty"),
            (
                br#"{"writes":[{"tag_id":"a","value":1},{"tag_id":"b"}],"request_id":"r9"}"#,
                "bad_payload",
                "writes[1]: missing value",
            ),
            (
                br#"{"tag_id":"a","value":1,"ttl_ms":-5}"#,
                "bad_payload",
                "ttl_ms must be",
            ),
        ];
        for (p, reason, want) in cases {
            let e = parse(&write(), p, 1024).unwrap_err();
            assert_eq!(e.reason, reason, "{}", String::from_utf8_lossy(p));
            assert!(
                e.message.contains(want),
                "{}: {}",
                String::from_utf8_lossy(p),
                e.message
            );
            assert_eq!(e.device.as_deref(), Some("plc-1"));
        }
        let e = parse(
            &write(),
            br#"{"writes":[{"tag_id":"a"}],"request_id":"r9"}"#,
            1024,
        )
        .unwrap_err();
        assert_eq!(
            e.request_id.as_deref(),
            Some("r9"),
            "the request id is echoed even when refused"
        );
        let e = parse(&write(), &vec![b' '; 2000], 1024).unwrap_err();
        assert_eq!(e.reason, "too_large");
    }

    #[test]
    fn reply_topics() {
        for ok in ["replies/op/1", "a", "acme/site/x y", "a//b"] {
            assert_eq!(ReplyTopic::parse(ok).unwrap().as_str(), ok);
        }
        let long = "a".repeat(MAX_TOPIC_LEN + 1);
        for (bad, why) in [
            ("", "empty"),
            ("$nexus/cmd/plc/sp/set", "a $ topic"),
            ("$nexus/cmd/plc/write", "a $ topic"),
            ("$nexus/cmd/response/plc/sp", "a $ topic"),
            ("$SYS/x", "a $ topic"),
            ("$", "a $ topic"),
            ("replies/+", "wildcard"),
            ("replies/#", "wildcard"),
            ("a\u{0}b", "control"),
            ("a\nb", "control"),
            (long.as_str(), "longer than"),
        ] {
            let e = ReplyTopic::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn redaction_keeps_two_levels() {
        assert_eq!(redact_topic("$nexus/cmd/plc-a/sp/set"), "$nexus/cmd/...");
        assert_eq!(redact_topic("replies/op"), "replies/op");
        assert_eq!(redact_topic("x"), "x");
        let long = "é".repeat(40);
        assert_eq!(redact_topic(&long), format!("{}/...", "é".repeat(32)));
    }

    #[test]
    fn a_response_body_is_not_a_command() {
        for p in [
            &br#"{"tag_id":"a","value":1,"success":true}"#[..],
            br#"{"tag_id":"a","value":1,"duration_ms":0.3}"#,
        ] {
            let e = parse(&write(), p, 1024).unwrap_err();
            assert_eq!(e.reason, "bad_payload");
            assert!(e.message.contains("command response"), "{}", e.message);
        }
    }

    proptest! {
        #[test]
        fn redaction_and_reply_topics_never_panic(t in "\\PC{0,80}") {
            let r = redact_topic(&t);
            prop_assert!(r.split('/').count() <= 3);
            if let Ok(rt) = ReplyTopic::parse(&t) {
                prop_assert!(!rt.as_str().starts_with('$'));
            }
        }

        #[test]
        fn arbitrary_input_never_panics(topic in "\\PC{0,40}", payload in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_topic(&topic);
            let _ = parse(&write(), &payload, 1024);
            let _ = parse(&CmdTopic::Set { device: "d".into(), tag: "t".into() }, &payload, 1024);
        }

        #[test]
        fn json_shaped_input_never_panics(key in "(tag_id|value|writes|request_id|ttl_ms|ts|confirm)", v in "(1|true|null|\"x\"|\\[\\]|\\{\\}|-1|1e999)") {
            let p = format!("{{\"{key}\":{v}}}");
            let _ = parse(&write(), p.as_bytes(), 1024);
        }
    }
}
