//! Unified Namespace topics (`<enterprise>/<site>/<area>/<line>/<device>/<tag>`) and MQTT
//! topic filters: build, parse and validate with errors that say what is wrong and where.

use std::fmt;
use std::sync::Arc;

use crate::domain::{DeviceId, TagId};

/// Longest topic Nexus accepts, in bytes. MQTT allows 65,535; a UNS path longer than this is
/// almost certainly a mistake, and the historian indexes topics.
pub const MAX_TOPIC_LEN: usize = 1024;
/// Most levels in a topic.
pub const MAX_TOPIC_LEVELS: usize = 32;

/// Why a topic or filter was refused. `level` is 1-based.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic is empty")]
    Empty,
    #[error("topic is {len} bytes long, more than the limit of {max}")]
    TooLong { len: usize, max: usize },
    #[error("topic has {levels} levels, more than the limit of {max}")]
    TooManyLevels { levels: usize, max: usize },
    #[error("topic {topic:?} has an empty level at position {level}")]
    EmptyLevel { topic: String, level: usize },
    #[error("topic {topic:?} contains the wildcard {ch:?} at level {level}; wildcards are only allowed in filters")]
    Wildcard {
        topic: String,
        ch: char,
        level: usize,
    },
    #[error("topic {topic:?} contains a control character (U+{code:04X}) at level {level}")]
    ControlChar {
        topic: String,
        code: u32,
        level: usize,
    },
    #[error("topic {topic:?} starts with '$', which is reserved for system topics")]
    SystemPrefix { topic: String },
    #[error("filter {filter:?}: {reason}")]
    BadFilter {
        filter: String,
        reason: &'static str,
    },
}

fn check_common(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong {
            len: s.len(),
            max: MAX_TOPIC_LEN,
        });
    }
    let levels = s.split('/').count();
    if levels > MAX_TOPIC_LEVELS {
        return Err(TopicError::TooManyLevels {
            levels,
            max: MAX_TOPIC_LEVELS,
        });
    }
    for (i, level) in s.split('/').enumerate() {
        if let Some(c) = level.chars().find(|c| c.is_control()) {
            return Err(TopicError::ControlChar {
                topic: s.to_owned(),
                code: c as u32,
                level: i + 1,
            });
        }
    }
    Ok(())
}

/// A concrete MQTT topic name that Nexus will publish or accept: no empty levels, no wildcards,
/// no control characters (NUL included), within the length limits. UNS topics never start with
/// `$`; system topics (`$nexus/...`) are built by [`sys`] and checked with
/// [`Topic::parse_any`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(Arc<str>);

impl Topic {
    /// Parse a UNS (non-system) topic.
    pub fn parse(s: &str) -> Result<Topic, TopicError> {
        if s.starts_with('$') {
            return Err(TopicError::SystemPrefix {
                topic: s.to_owned(),
            });
        }
        Self::parse_any(s)
    }

    /// Parse any concrete topic, `$` topics included.
    pub fn parse_any(s: &str) -> Result<Topic, TopicError> {
        check_common(s)?;
        for (i, level) in s.split('/').enumerate() {
            if level.is_empty() {
                return Err(TopicError::EmptyLevel {
                    topic: s.to_owned(),
                    level: i + 1,
                });
            }
            if let Some(ch) = level.chars().find(|c| *c == '+' || *c == '#') {
                return Err(TopicError::Wildcard {
                    topic: s.to_owned(),
                    ch,
                    level: i + 1,
                });
            }
        }
        Ok(Topic(Arc::from(s)))
    }

    /// The UNS topic of a tag: `uns_prefix/device/tag`.
    pub fn for_tag(uns_prefix: &str, device: &DeviceId, tag: &TagId) -> Result<Topic, TopicError> {
        let mut s = String::with_capacity(
            uns_prefix.len() + device.as_str().len() + tag.as_str().len() + 2,
        );
        s.push_str(uns_prefix);
        s.push('/');
        s.push_str(device.as_str());
        s.push('/');
        s.push_str(tag.as_str());
        Self::parse(&s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_system(&self) -> bool {
        self.0.starts_with('$')
    }

    pub fn levels(&self) -> std::str::Split<'_, char> {
        self.0.split('/')
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Topic {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Validate a UNS prefix (`enterprise/site/area/line`): the rules of a topic, no `$`.
pub fn validate_uns_prefix(prefix: &str) -> Result<(), TopicError> {
    Topic::parse(prefix).map(|_| ())
}

/// An MQTT topic filter (`acme/+/+/+/+/temp`, `spBv1.0/#`, `$share/group/#`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TopicFilter {
    raw: Arc<str>,
    /// Index where the matched part starts (after `$share/<group>/`).
    start: usize,
}

impl TopicFilter {
    pub fn parse(s: &str) -> Result<TopicFilter, TopicError> {
        check_common(s)?;
        let bad = |reason| TopicError::BadFilter {
            filter: s.to_owned(),
            reason,
        };
        let mut start = 0;
        if let Some(rest) = s.strip_prefix("$share/") {
            let Some(slash) = rest.find('/') else {
                return Err(bad("a shared subscription needs $share/<group>/<filter>"));
            };
            let group = &rest[..slash];
            if group.is_empty() || group.contains(['+', '#']) {
                return Err(bad(
                    "the share group must be a non-empty name without wildcards",
                ));
            }
            start = "$share/".len() + slash + 1;
            if start >= s.len() {
                return Err(bad("a shared subscription needs a filter after the group"));
            }
        }
        let body = &s[start..];
        let count = body.split('/').count();
        for (i, level) in body.split('/').enumerate() {
            if level.contains('#') && (level != "#" || i + 1 != count) {
                return Err(bad("'#' must be a whole level and the last one"));
            }
            if level.contains('+') && level != "+" {
                return Err(bad("'+' must be a whole level"));
            }
        }
        Ok(TopicFilter {
            raw: Arc::from(s),
            start,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The filter without any `$share/<group>/` prefix.
    pub fn pattern(&self) -> &str {
        &self.raw[self.start..]
    }

    pub fn has_wildcards(&self) -> bool {
        self.pattern().contains(['+', '#'])
    }

    /// MQTT matching, including the rule that a filter starting with a wildcard never
    /// matches a topic starting with `$`.
    pub fn matches(&self, topic: &str) -> bool {
        filter_matches(self.pattern(), topic)
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

/// MQTT filter matching on raw strings (the filter is assumed valid).
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Nexus's own topics, `$nexus/...` (docs/contract.md, Topics): every crate builds and
/// recognises them here, so their shape is defined once.
pub mod sys {
    /// Every Nexus topic starts with this.
    pub const NEXUS_PREFIX: &str = "$nexus/";
    /// Retained status of services and devices.
    pub const STATUS_PREFIX: &str = "$nexus/status/";
    pub const STATUS_ALL: &str = "$nexus/status/#";
    /// Write commands (`$nexus/cmd/<device>/write`, `$nexus/cmd/<device>/<tag>/set`).
    pub const CMD_PREFIX: &str = "$nexus/cmd/";
    pub const CMD_ALL: &str = "$nexus/cmd/#";
    pub const CMD_WRITE: &str = "$nexus/cmd/+/write";
    pub const CMD_SET: &str = "$nexus/cmd/+/+/set";
    /// Command responses (`$nexus/cmd/response/<device>[/<tag>]`).
    pub const CMD_RESPONSE_PREFIX: &str = "$nexus/cmd/response/";
    /// Alarm states (`$nexus/alarms/<source topic>/<rule>`), acknowledgements and events.
    pub const ALARMS_PREFIX: &str = "$nexus/alarms/";
    pub const ALARMS_ALL: &str = "$nexus/alarms/#";
    pub const ALARM_ACK: &str = "$nexus/alarms/ack";
    pub const ALARM_EVENTS: &str = "$nexus/alarms/events";

    /// `$nexus/status/service/<service>/<instance>`.
    pub fn service_status(service: &str, instance: &str) -> String {
        format!("{STATUS_PREFIX}service/{service}/{instance}")
    }

    /// `$nexus/status/device/<device>`.
    pub fn device_status(device: &str) -> String {
        format!("{STATUS_PREFIX}device/{device}")
    }

    /// `$nexus/cmd/response/<device>/<tag>`, or `$nexus/cmd/response/<device>` without a tag
    /// (a command refused before its tag was known).
    pub fn cmd_response(device: &str, tag: Option<&str>) -> String {
        match tag {
            Some(tag) => format!("{CMD_RESPONSE_PREFIX}{device}/{tag}"),
            None => format!("{CMD_RESPONSE_PREFIX}{device}"),
        }
    }

    /// `$nexus/alarms/<source topic>/<rule>`: the retained state of one rule on one topic.
    pub fn alarm_state(source_topic: &str, rule: &str) -> String {
        format!("{ALARMS_PREFIX}{source_topic}/{rule}")
    }

    /// Topics an operator may publish to: write commands and alarm acknowledgements.
    pub const OPERATOR_PUBLISH: [&str; 3] = [CMD_WRITE, CMD_SET, ALARM_ACK];

    /// Sparkplug B topics an operator may publish to, as a host application does: node and
    /// device commands (a DCMD to Nexus's gateway becomes a write command) and host state.
    pub const OPERATOR_SPARKPLUG: [&str; 3] =
        ["spBv1.0/+/NCMD/+", "spBv1.0/+/DCMD/+/+", "spBv1.0/STATE/+"];
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn builds_tag_topics() {
        let d = DeviceId::new("plc-001").unwrap();
        let t = TagId::new("temperature").unwrap();
        let topic = Topic::for_tag("acme/chicago/bldg-a/line-1", &d, &t).unwrap();
        assert_eq!(
            topic.as_str(),
            "acme/chicago/bldg-a/line-1/plc-001/temperature"
        );
        assert!(!topic.is_system());
        assert_eq!(topic.levels().count(), 6);
        assert!(matches!(
            Topic::for_tag("acme//x", &d, &t),
            Err(TopicError::EmptyLevel { level: 2, .. })
        ));
        assert!(matches!(
            Topic::for_tag("$nexus/x", &d, &t),
            Err(TopicError::SystemPrefix { .. })
        ));
    }

    #[test]
    fn rejections_say_what_and_where() {
        let cases = [
            ("", "topic is empty"),
            ("a/b/", "empty level at position 3"),
            ("/a", "empty level at position 1"),
            ("a/+/c", "wildcard '+' at level 2"),
            ("a/b#", "wildcard '#' at level 2"),
            ("a/b\0c", "control character (U+0000) at level 2"),
            ("$SYS/x", "reserved for system topics"),
        ];
        for (input, want) in cases {
            let err = Topic::parse(input).unwrap_err().to_string();
            assert!(err.contains(want), "{input:?}: {err}");
        }
        let long = "a".repeat(MAX_TOPIC_LEN + 1);
        assert!(matches!(
            Topic::parse(&long),
            Err(TopicError::TooLong { .. })
        ));
        let deep = vec!["a"; MAX_TOPIC_LEVELS + 1].join("/");
        assert!(matches!(
            Topic::parse(&deep),
            Err(TopicError::TooManyLevels { .. })
        ));
    }

    #[test]
    fn system_topics() {
        let t = Topic::parse_any(&sys::device_status("plc-1")).unwrap();
        assert_eq!(t.as_str(), "$nexus/status/device/plc-1");
        assert!(t.is_system());
        assert!(Topic::parse_any("$nexus/cmd/plc/write").is_ok());
    }

    #[test]
    fn filters() {
        let f = TopicFilter::parse("acme/+/+/+/+/temp").unwrap();
        assert!(f.matches("acme/a/b/c/d/temp"));
        assert!(!f.matches("acme/a/b/c/d/pressure"));
        assert!(!f.matches("acme/a/b/c/temp"));
        let all = TopicFilter::parse("#").unwrap();
        assert!(all.matches("a/b"));
        assert!(
            !all.matches("$nexus/cmd/x/write"),
            "# never matches $ topics"
        );
        assert!(!TopicFilter::parse("+/cmd/#")
            .unwrap()
            .matches("$nexus/cmd/x"));
        assert!(TopicFilter::parse("$nexus/cmd/#")
            .unwrap()
            .matches("$nexus/cmd/x/write"));
        assert!(
            TopicFilter::parse("a/#").unwrap().matches("a"),
            "a/# matches its parent"
        );
        let shared = TopicFilter::parse("$share/ingest/#").unwrap();
        assert_eq!(shared.pattern(), "#");
        assert!(shared.matches("a/b"));
        for bad in [
            "a/#/b",
            "a/b#",
            "a+/b",
            "$share/g",
            "$share//x",
            "$share/g/",
        ] {
            assert!(TopicFilter::parse(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,64}") {
            let _ = Topic::parse(&s);
            let _ = TopicFilter::parse(&s);
        }

        #[test]
        fn valid_topics_round_trip(levels in proptest::collection::vec("[a-zA-Z0-9_.-]{1,12}", 1..8)) {
            let s = levels.join("/");
            let t = Topic::parse(&s).unwrap();
            prop_assert_eq!(t.as_str(), s.as_str());
            prop_assert!(TopicFilter::parse(&s).unwrap().matches(&s));
            prop_assert!(TopicFilter::parse("#").unwrap().matches(&s));
        }
    }

    #[test]
    fn system_topics_are_valid_topics_and_filters() {
        use super::sys;
        for t in [
            sys::service_status("gateway", "edge-1"),
            sys::device_status("plc-1"),
            sys::cmd_response("plc-1", Some("sp")),
            sys::cmd_response("plc-1", None),
            sys::alarm_state("acme/l1/plc-1/temp", "high"),
            sys::ALARM_ACK.to_owned(),
            sys::ALARM_EVENTS.to_owned(),
        ] {
            let parsed = Topic::parse_any(&t).unwrap();
            assert!(parsed.is_system(), "{t}");
        }
        assert_eq!(sys::device_status("plc-1"), "$nexus/status/device/plc-1");
        assert_eq!(
            sys::cmd_response("plc-1", Some("sp")),
            "$nexus/cmd/response/plc-1/sp"
        );
        for f in [
            sys::STATUS_ALL,
            sys::CMD_ALL,
            sys::ALARMS_ALL,
            sys::CMD_WRITE,
            sys::CMD_SET,
        ] {
            TopicFilter::parse(f).unwrap();
        }
        assert!(filter_matches(sys::CMD_SET, "$nexus/cmd/plc-1/sp/set"));
        assert!(filter_matches(sys::STATUS_ALL, &sys::device_status("x")));
        assert!(sys::alarm_state("a/b", "r").starts_with(sys::ALARMS_PREFIX));
    }
}
