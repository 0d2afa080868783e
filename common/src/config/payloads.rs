//! `payloads`: how ingestion and the alert service read the payloads of each topic, for
//! publishers other than Nexus (Node-RED, UMH, Neuron, scripts). The rules are tried in order
//! and the first whose filter matches the topic gives the format; a topic no rule matches is
//! read as the contract's value object. The decoders are `crate::codec::payload`.

use serde::Deserialize;

use super::Problems;
use crate::topic::TopicFilter;

/// Most values one message may give (a UMH object holds one per key), by default.
pub const DEFAULT_MAX_VALUES: usize = 1000;
/// Highest `payloads.max_values` accepted.
pub const MAX_MAX_VALUES: usize = 100_000;

/// `payloads`: the format of each topic's payloads.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PayloadsConfig {
    /// Most values taken from one message (default 1000); the values past it are not taken,
    /// and the message is counted as a reject (`too_many_values`).
    pub max_values: usize,
    /// Tried in order; the first whose `filter` matches the topic applies.
    pub rules: Vec<PayloadRule>,
}

impl Default for PayloadsConfig {
    fn default() -> Self {
        PayloadsConfig {
            max_values: DEFAULT_MAX_VALUES,
            rules: Vec::new(),
        }
    }
}

/// The payload format of the topics one filter matches.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadRule {
    /// MQTT topic filter (`umh/v1/#`, `plant/+/temperature`).
    pub filter: String,
    pub format: PayloadFormat,
    /// `mapping`: JSON pointer (RFC 6901) of the value, required.
    #[serde(default)]
    pub value: Option<String>,
    /// `mapping`: JSON pointer of the timestamp (absent: the receive time).
    #[serde(default)]
    pub timestamp: Option<String>,
    /// `mapping`: how the timestamp is written (default `ms`).
    #[serde(default)]
    pub timestamp_unit: Option<TimestampUnit>,
    /// `mapping`: JSON pointer of the quality: a quality name of the contract, or an OPC DA
    /// code 0-255 (absent: good).
    #[serde(default)]
    pub quality: Option<String>,
    /// `mapping`: JSON pointer of the engineering unit (a string).
    #[serde(default)]
    pub unit: Option<String>,
}

/// The payload formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    /// The contract's value object `{"v","q","ts"}` (the default).
    Nexus,
    /// A bare JSON number, boolean, string or null; the receive time, good quality.
    Scalar,
    /// The whole payload as a string value (UTF-8), as Node-RED sends a string.
    Text,
    /// UMH: `{"timestamp_ms": .., "value": ..}` (UMH Core), or `{"timestamp_ms": .., "<tag>":
    /// .., ...}` (UMH Classic `_historian`), one value per tag under `<topic>/<tag>`.
    Umh,
    /// A value object when the payload is an object with `v`, else UMH when it has
    /// `timestamp_ms`, else a bare JSON scalar.
    Auto,
    /// JSON pointers to the value, timestamp, quality and unit.
    Mapping,
}

impl PayloadFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            PayloadFormat::Nexus => "nexus",
            PayloadFormat::Scalar => "scalar",
            PayloadFormat::Text => "text",
            PayloadFormat::Umh => "umh",
            PayloadFormat::Auto => "auto",
            PayloadFormat::Mapping => "mapping",
        }
    }
}

/// How a mapped timestamp is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimestampUnit {
    /// Unix seconds (a fraction is kept to the millisecond).
    S,
    /// Unix milliseconds (the default).
    #[default]
    Ms,
    /// Unix microseconds.
    Us,
    /// Unix nanoseconds.
    Ns,
    /// RFC 3339 text (`2024-05-01T12:00:00.250Z`, `2024-05-01T14:00:00+02:00`).
    Rfc3339,
}

/// Why `p` is not a JSON pointer (RFC 6901): `""` (the whole document) or `/`-separated
/// reference tokens in which `~` is only ever `~0` or `~1`.
pub fn check_pointer(p: &str) -> Result<(), String> {
    if p.is_empty() {
        return Ok(());
    }
    if !p.starts_with('/') {
        return Err(format!(
            "{p:?} is not a JSON pointer: it must start with '/' (or be \"\" for the whole payload)"
        ));
    }
    let mut chars = p.chars();
    while let Some(c) = chars.next() {
        if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
            return Err(format!(
                "{p:?} is not a JSON pointer: '~' must be followed by 0 ('~') or 1 ('/')"
            ));
        }
    }
    Ok(())
}

impl PayloadsConfig {
    pub(crate) fn validate(&self, p: &mut Problems) {
        if !(1..=MAX_MAX_VALUES).contains(&self.max_values) {
            p.push(
                "payloads.max_values",
                format!("must be between 1 and {MAX_MAX_VALUES}"),
            );
        }
        for (i, r) in self.rules.iter().enumerate() {
            let at = format!("payloads.rules[{i}]");
            match TopicFilter::parse(&r.filter) {
                Ok(f) if f.pattern().len() != f.as_str().len() => p.push(
                    format!("{at}.filter"),
                    format!(
                        "{:?}: a shared subscription is not a topic filter here",
                        r.filter
                    ),
                ),
                Ok(_) => {}
                Err(e) => p.push(format!("{at}.filter"), format!("{:?}: {e}", r.filter)),
            }
            let mapped = [
                ("value", &r.value),
                ("timestamp", &r.timestamp),
                ("quality", &r.quality),
                ("unit", &r.unit),
            ];
            if r.format != PayloadFormat::Mapping {
                for (key, v) in mapped {
                    if v.is_some() {
                        p.push(
                            format!("{at}.{key}"),
                            format!(
                                "is read only with format: mapping (this rule is {})",
                                r.format.as_str()
                            ),
                        );
                    }
                }
                if r.timestamp_unit.is_some() {
                    p.push(
                        format!("{at}.timestamp_unit"),
                        format!(
                            "is read only with format: mapping (this rule is {})",
                            r.format.as_str()
                        ),
                    );
                }
                continue;
            }
            if r.value.is_none() {
                p.push(
                    format!("{at}.value"),
                    "format mapping needs the JSON pointer of the value (e.g. /value)",
                );
            }
            for (key, v) in mapped {
                if let Some(Err(e)) = v.as_deref().map(check_pointer) {
                    p.push(format!("{at}.{key}"), e);
                }
            }
            if r.timestamp_unit.is_some() && r.timestamp.is_none() {
                p.push(
                    format!("{at}.timestamp_unit"),
                    "has no timestamp to apply to: set timestamp (a JSON pointer) too",
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn errors(text: &str) -> Vec<String> {
        match Config::from_str_with_env(text, Some(Path::new("nexus.yaml")), &[]) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    fn has(errs: &[String], want: &str) {
        assert!(
            errs.iter().any(|e| e.contains(want)),
            "no error containing {want:?} in:\n{}",
            errs.join("\n")
        );
    }

    #[test]
    fn defaults_read_everything_as_value_objects() {
        let c = Config::from_str_with_env("", None, &[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.payloads, PayloadsConfig::default());
        assert_eq!(c.payloads.max_values, 1000);
        assert!(c.payloads.rules.is_empty());
    }

    #[test]
    fn rules_are_read_in_order_with_their_mapping() {
        let text = "payloads:\n  max_values: 50\n  rules:\n    - { filter: \"umh/v1/#\", format: umh }\n    - { filter: \"nodered/+/state\", format: text }\n    - filter: \"vendor/#\"\n      format: mapping\n      value: /data/value\n      timestamp: /data/time\n      timestamp_unit: rfc3339\n      quality: /data/status\n      unit: /data/unit\n";
        let c = Config::from_str_with_env(text, None, &[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.payloads.max_values, 50);
        let r = &c.payloads.rules;
        assert_eq!(
            r.iter().map(|r| r.format).collect::<Vec<_>>(),
            [
                PayloadFormat::Umh,
                PayloadFormat::Text,
                PayloadFormat::Mapping
            ]
        );
        assert_eq!(r[2].value.as_deref(), Some("/data/value"));
        assert_eq!(r[2].timestamp_unit, Some(TimestampUnit::Rfc3339));
        assert_eq!(r[2].quality.as_deref(), Some("/data/status"));
        // The environment overrides a rule like any other key.
        let env = [(
            "NEXUS_PAYLOADS__RULES__1__FORMAT".to_owned(),
            "scalar".to_owned(),
        )];
        let c = Config::from_str_with_env(text, None, &env).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.payloads.rules[1].format, PayloadFormat::Scalar);
    }

    #[test]
    fn every_bad_rule_is_reported_at_its_line() {
        let text = "payloads:\n  max_values: 0\n  rules:\n    - { filter: \"a/#/b\", format: umh }\n    - { filter: \"$share/g/x/#\", format: scalar }\n    - { filter: \"ok/#\", format: mapping, value: data/value, timestamp: \"/t~2\", quality: /q }\n    - { filter: \"m/#\", format: mapping, timestamp_unit: s }\n    - { filter: \"n/#\", format: nexus, value: /v, timestamp_unit: ms }\n";
        let errs = errors(text);
        has(
            &errs,
            "nexus.yaml:2:3: payloads.max_values: must be between 1 and 100000",
        );
        has(
            &errs,
            "nexus.yaml:4:9: payloads.rules[0].filter: \"a/#/b\": filter \"a/#/b\": '#' must be a whole level and the last one",
        );
        has(
            &errs,
            "nexus.yaml:5:9: payloads.rules[1].filter: \"$share/g/x/#\": a shared subscription",
        );
        has(
            &errs,
            "nexus.yaml:6:42: payloads.rules[2].value: \"data/value\" is not a JSON pointer",
        );
        has(
            &errs,
            "nexus.yaml:6:61: payloads.rules[2].timestamp: \"/t~2\" is not a JSON pointer: '~' must be followed",
        );
        has(
            &errs,
            "nexus.yaml:7:7: payloads.rules[3].value: format mapping needs the JSON pointer of the value",
        );
        has(
            &errs,
            "payloads.rules[3].timestamp_unit: has no timestamp to apply to",
        );
        has(
            &errs,
            "payloads.rules[4].value: is read only with format: mapping (this rule is nexus)",
        );
        has(
            &errs,
            "payloads.rules[4].timestamp_unit: is read only with format: mapping",
        );
        assert_eq!(errs.len(), 9, "{}", errs.join("\n"));
    }

    #[test]
    fn unknown_formats_units_and_keys_are_refused_where_they_are() {
        let errs = errors("payloads:\n  rules:\n    - { filter: \"a/#\", format: csv }\n");
        has(&errs, "nexus.yaml:3:24: payloads.rules[0].format: unknown variant `csv`, expected one of `nexus`, `scalar`, `text`, `umh`, `auto`, `mapping`");
        let errs = errors("payloads:\n  rules:\n    - { filter: \"a/#\", format: mapping, value: /v, timestamp: /t, timestamp_unit: min }\n");
        has(&errs, "payloads.rules[0].timestamp_unit: unknown variant `min`, expected one of `s`, `ms`, `us`, `ns`, `rfc3339`");
        let errs =
            errors("payloads:\n  rules:\n    - { filter: \"a/#\", format: umh, pointer: /v }\n");
        has(
            &errs,
            "nexus.yaml:3:37: payloads.rules[0].pointer: unknown field `pointer`",
        );
        let errs = errors("payloads:\n  rules: 3\n");
        has(
            &errs,
            "payloads.rules: invalid type: integer `3`, expected a sequence",
        );
    }

    /// The example of docs/configuration.md is a valid configuration that means what the
    /// page says.
    #[test]
    fn the_documented_example_loads() {
        let doc = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md"),
        )
        .unwrap_or_else(|e| panic!("docs/configuration.md: {e}"));
        let section = doc
            .split("### `payloads`")
            .nth(1)
            .expect("a payloads section");
        let yaml = section
            .split("```yaml\n")
            .nth(1)
            .and_then(|s| s.split("```").next())
            .expect("a yaml example");
        let c = Config::from_str_with_env(yaml, None, &[]).unwrap_or_else(|e| panic!("{e}"));
        let formats: Vec<_> = c.payloads.rules.iter().map(|r| r.format).collect();
        assert_eq!(
            formats,
            [
                PayloadFormat::Umh,
                PayloadFormat::Text,
                PayloadFormat::Scalar,
                PayloadFormat::Auto,
                PayloadFormat::Mapping
            ]
        );
        assert_eq!(
            c.payloads.rules[4].timestamp_unit,
            Some(TimestampUnit::Rfc3339)
        );
    }

    #[test]
    fn pointers_follow_rfc_6901() {
        for ok in ["", "/", "/a", "/a/0/b", "/a~0b", "/a~1b", "/ü/é", "//"] {
            assert_eq!(check_pointer(ok), Ok(()), "{ok:?}");
        }
        for bad in ["a", "a/b", "/a~", "/a~2", "~0", "#/a"] {
            assert!(check_pointer(bad).is_err(), "{bad:?}");
        }
    }
}
