//! Rule evaluation, without I/O: values in, alarm changes out.
//!
//! One alarm instance per (rule, matching topic). A rule's condition is filtered by its
//! deadband (hysteresis: a high alarm sets above `limit` and clears only below
//! `limit - deadband`), then by `on_delay` / `off_delay` (the condition must hold, or stay
//! clear, that long), then drives the [`Alarm`] state machine. Time is passed in (unix ms), so
//! every rule is testable without clocks; [`Engine::tick`] advances delays, stale checks and
//! shelf expiry.
//!
//! Instances and the per-topic rule cache grow with the topics clients publish, so both are
//! bounded ([`Limits`], `alerts.max_instances`). A full table forgets the normal instance idle
//! the longest; an alarm an operator must still see or act on is never forgotten, and when only
//! those are left a new topic is not evaluated. Both are counted.

use std::collections::HashMap;

use nexus_common::bounded::{text_weight, BoundedMap, MapStats};
use nexus_common::codec::ValueObject;
use nexus_common::config::{AlertRule, AlertsConfig, Condition};
use nexus_common::topic::filter_matches;
use nexus_common::{QualityClass, Value};

use crate::state::{Alarm, Event, Refused, State};

/// A change to publish: a state change or an operator action.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub rule_id: String,
    pub topic: String,
    pub event: Event,
    pub alarm: Alarm,
    pub severity: u16,
    pub value: Option<Value>,
    pub message: String,
    pub area: String,
    pub ts_ms: i64,
    /// Who acted, for operator actions.
    pub user: Option<String>,
    pub comment: Option<String>,
}

#[derive(Debug, Default)]
struct Instance {
    alarm: Alarm,
    /// The condition after its deadband.
    process: bool,
    /// Since when `process` has held (for on-delay) or been clear (for off-delay).
    since_change_ms: i64,
    value: Option<Value>,
    last_update_ms: i64,
    /// Previous numeric sample for rate of change: (value, ts).
    prev: Option<(f64, i64)>,
}

/// Whether an instance may be forgotten to make room: normal (so acknowledged), no shelf (a
/// shelf still to expire has a retained state to clear), in service, and its condition clear
/// (no on-delay running). Its retained state is already cleared, so nothing is lost but the
/// previous sample of a rate of change and, for a stale rule, the watch of a quiet topic.
fn idle(inst: &Instance) -> bool {
    inst.alarm.state == State::Normal
        && !inst.process
        && inst.alarm.shelved_until_ms.is_none()
        && !inst.alarm.out_of_service
}

/// The bounds of the engine's per-topic state: alarm instances and the per-topic rule cache,
/// each of `alerts.max_instances` units (a topic counts once per started 256 bytes).
#[derive(Clone)]
pub struct Limits {
    /// Alarm instances; a refused one is a value not evaluated by a rule.
    pub instances: MapStats,
    /// Rule indices per topic; evicting one only costs matching the topic again.
    pub topics: MapStats,
}

impl Limits {
    /// `max_instances` with counters registered nowhere (tests, benchmarks).
    pub fn detached(max_instances: usize) -> Limits {
        Limits {
            instances: MapStats::detached("instances", max_instances),
            topics: MapStats::detached("topics", max_instances),
        }
    }
}

/// What became of a retained alarm state read back at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restore {
    Restored,
    /// Its rule is not (or no longer) configured.
    UnknownRule,
    /// The instance table is full of alarms that may not be forgotten (counted).
    Refused,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActionError {
    #[error("no alarm of rule {rule} on topic {topic}")]
    NotFound { rule: String, topic: String },
    #[error(transparent)]
    Refused(#[from] Refused),
}

pub struct Engine {
    rules: Vec<AlertRule>,
    instances: BoundedMap<(usize, String), Instance>,
    /// Rule indices matching a topic, computed once per topic.
    matches: BoundedMap<String, Vec<usize>>,
    /// Latest value of each setpoint topic of deviation rules (keys: configured topics only).
    setpoints: HashMap<String, f64>,
    setpoint_topics: Vec<String>,
    /// Whether each rule is suppressed now (by its `suppress_when` topic; keys: rule indices).
    suppressed: HashMap<usize, bool>,
    max_shelve_ms: i64,
    limits: Limits,
}

fn area_of(rule: &AlertRule, topic: &str) -> String {
    rule.area
        .clone()
        .unwrap_or_else(|| topic.split('/').take(4).collect::<Vec<_>>().join("/"))
}

fn limit_of(c: &Condition) -> Option<f64> {
    match c {
        Condition::HighHigh { limit, .. }
        | Condition::High { limit, .. }
        | Condition::Low { limit, .. }
        | Condition::LowLow { limit, .. }
        | Condition::Deviation { limit, .. }
        | Condition::RateOfChange { limit, .. } => Some(*limit),
        _ => None,
    }
}

/// Whether a reloaded rule keeps the alarms of `old`: the same id, topic filter and condition
/// (limits and deadband included); its message, severity, area, delays or suppression may change.
fn keeps_alarms(old: &AlertRule, new: &AlertRule) -> bool {
    old.id == new.id && old.topic == new.topic && old.condition == new.condition
}

fn equals(v: &Value, want: &serde_json::Value) -> bool {
    match (v, want) {
        (Value::Bool(b), serde_json::Value::Bool(w)) => b == w,
        (Value::String(s), serde_json::Value::String(w)) => s == w,
        (v, serde_json::Value::Number(n)) => {
            v.as_f64().zip(n.as_f64()).is_some_and(|(a, b)| a == b)
        }
        (Value::Bool(b), serde_json::Value::String(w)) => w == &b.to_string(),
        _ => false,
    }
}

/// The enabled rules, and the setpoint topics of their deviation conditions.
fn enabled(rules: &[AlertRule]) -> (Vec<AlertRule>, Vec<String>) {
    let rules: Vec<AlertRule> = rules.iter().filter(|r| r.enabled).cloned().collect();
    let setpoint_topics = rules
        .iter()
        .filter_map(|r| match &r.condition {
            Condition::Deviation { setpoint_topic, .. } => Some(setpoint_topic.clone()),
            _ => None,
        })
        .collect();
    (rules, setpoint_topics)
}

impl Engine {
    /// An engine with the default bounds, counted nowhere (tests, benchmarks).
    pub fn new(rules: &[AlertRule], max_shelve_ms: i64) -> Engine {
        let max = AlertsConfig::default().max_instances;
        Engine::with_limits(rules, max_shelve_ms, Limits::detached(max))
    }

    pub fn with_limits(rules: &[AlertRule], max_shelve_ms: i64, limits: Limits) -> Engine {
        let (rules, setpoint_topics) = enabled(rules);
        Engine {
            rules,
            instances: BoundedMap::new(limits.instances.capacity()),
            matches: BoundedMap::new(limits.topics.capacity()),
            setpoints: HashMap::new(),
            setpoint_topics,
            suppressed: HashMap::new(),
            max_shelve_ms,
            limits,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Alarm instances held now.
    pub fn instance_count(&self) -> usize {
        self.instances.len()
    }

    /// Topics in the rule cache now.
    pub fn cached_topics(&self) -> usize {
        self.matches.len()
    }

    pub fn rules(&self) -> &[AlertRule] {
        &self.rules
    }

    /// Replace the rules (a reloaded configuration). Alarms of rules that are kept with the
    /// same id, topic filter and condition keep their state; alarms of removed or changed rules
    /// are dropped and returned as (rule id, topic) so their retained state can be cleared.
    pub fn replace_rules(&mut self, rules: &[AlertRule]) -> Vec<(String, String)> {
        let (new_rules, setpoint_topics) = enabled(rules);
        let mut removed = Vec::new();
        let mut instances = BoundedMap::new(self.instances.capacity());
        // Least recently used first, so the order carries over.
        for ((ri, topic), inst, weight) in self.instances.drain() {
            let old = &self.rules[ri];
            match new_rules.iter().position(|r| keeps_alarms(old, r)) {
                // Fits: the same entries or fewer, in a table of the same size.
                Some(ni) => match instances.insert((ni, topic), inst, weight) {
                    Ok(s) => self.limits.instances.evicted(s.evicted.len()),
                    Err(_) => self.limits.instances.refused(),
                },
                None => removed.push((old.id.clone(), topic)),
            }
        }
        // Suppression carries over by rule id.
        let suppressed: HashMap<usize, bool> = self
            .suppressed
            .iter()
            .filter_map(|(ri, on)| {
                new_rules
                    .iter()
                    .position(|r| r.id == self.rules[*ri].id)
                    .map(|ni| (ni, *on))
            })
            .collect();
        self.rules = new_rules;
        self.setpoint_topics = setpoint_topics;
        self.instances = instances;
        self.suppressed = suppressed;
        self.matches.clear();
        self.limits.instances.size(&self.instances);
        self.limits.topics.size(&self.matches);
        removed
    }

    /// Filters to subscribe to: every rule's topic and every setpoint topic.
    pub fn filters(&self) -> Vec<String> {
        let mut f: Vec<String> = self
            .rules
            .iter()
            .map(|r| r.topic.clone())
            .chain(self.setpoint_topics.iter().cloned())
            .chain(
                self.rules
                    .iter()
                    .filter_map(|r| r.suppress_when.as_ref().map(|s| s.topic.clone())),
            )
            .collect();
        f.sort();
        f.dedup();
        f
    }

    fn rules_for(&mut self, topic: &str) -> Vec<usize> {
        if let Some(m) = self.matches.get(topic) {
            return m.clone();
        }
        let m: Vec<usize> = self
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| filter_matches(&r.topic, topic))
            .map(|(i, _)| i)
            .collect();
        let weight = text_weight(topic.len() + m.len() * std::mem::size_of::<usize>());
        match self.matches.insert(topic.to_owned(), m.clone(), weight) {
            Ok(s) => self.limits.topics.evicted(s.evicted.len()),
            // Longer than the whole cache: matched again next time.
            Err(_) => self.limits.topics.refused(),
        }
        self.limits.topics.size(&self.matches);
        m
    }

    /// Make the instance `key` (rule index, topic) if there is none, evicting an idle one when
    /// the table is full. False when it cannot be made: the table is full of alarms that may
    /// not be forgotten (counted).
    fn ensure_instance(&mut self, key: &(usize, String)) -> bool {
        if self.instances.contains_key(key) {
            return true;
        }
        let mut inst = Instance::default();
        inst.alarm.suppressed = self.suppressed.get(&key.0).copied().unwrap_or(false);
        let weight = text_weight(key.1.len());
        match self
            .instances
            .insert_evicting(key.clone(), inst, weight, |_, i| idle(i))
        {
            Ok(s) => self.limits.instances.evicted(s.evicted.len()),
            Err(_) => {
                self.limits.instances.refused();
                return false;
            }
        }
        self.limits.instances.size(&self.instances);
        true
    }

    fn message(rule: &AlertRule, topic: &str, value: &Option<Value>) -> String {
        let v = value
            .as_ref()
            .map(|v| v.to_string())
            .unwrap_or_else(|| "null".into());
        let limit = limit_of(&rule.condition)
            .map(|l| l.to_string())
            .unwrap_or_default();
        rule.message
            .replace("{topic}", topic)
            .replace("{value}", &v)
            .replace("{limit}", &limit)
            .replace("{rule}", &rule.id)
    }

    fn change(&self, ri: usize, topic: &str, inst: &Instance, event: Event, now_ms: i64) -> Change {
        let rule = &self.rules[ri];
        Change {
            rule_id: rule.id.clone(),
            topic: topic.to_owned(),
            event,
            alarm: inst.alarm.clone(),
            severity: rule.severity.0,
            value: inst.value.clone(),
            message: Self::message(rule, topic, &inst.value),
            area: area_of(rule, topic),
            ts_ms: now_ms,
            user: None,
            comment: None,
        }
    }

    /// The condition with its deadband, given the previous state.
    fn evaluate(
        cond: &Condition,
        was: bool,
        v: &ValueObject,
        setpoint: Option<f64>,
        prev: Option<(f64, i64)>,
        ts: i64,
    ) -> Option<bool> {
        let x = v.value.as_ref().and_then(Value::as_f64);
        Some(match cond {
            Condition::HighHigh { limit, deadband } | Condition::High { limit, deadband } => {
                let x = x?;
                if was {
                    x >= limit - deadband
                } else {
                    x > *limit
                }
            }
            Condition::Low { limit, deadband } | Condition::LowLow { limit, deadband } => {
                let x = x?;
                if was {
                    x <= limit + deadband
                } else {
                    x < *limit
                }
            }
            Condition::Deviation {
                limit, deadband, ..
            } => {
                let d = (x? - setpoint?).abs();
                if was {
                    d >= limit - deadband
                } else {
                    d > *limit
                }
            }
            Condition::RateOfChange { limit, deadband } => {
                let (px, pts) = prev?;
                let dt = (ts - pts) as f64 / 1000.0;
                if dt <= 0.0 {
                    return None;
                }
                let rate = ((x? - px) / dt).abs();
                if was {
                    rate >= limit - deadband
                } else {
                    rate > *limit
                }
            }
            // Without a value (bad quality, null) the condition is unknown: no change.
            Condition::Equals { value } => equals(v.value.as_ref()?, value),
            Condition::BadQuality {} => v.quality.class() == QualityClass::Bad,
            Condition::Stale { .. } => false,
        })
    }

    /// Apply delays: drive the alarm from the filtered condition.
    fn settle(&mut self, ri: usize, topic: &str, now_ms: i64) -> Option<Change> {
        let (on_delay, off_delay) = (
            self.rules[ri].on_delay.as_millis() as i64,
            self.rules[ri].off_delay.as_millis() as i64,
        );
        let inst = self.instances.peek_mut(&(ri, topic.to_owned()))?;
        if inst.alarm.out_of_service {
            return None;
        }
        let held = now_ms - inst.since_change_ms;
        let event = if inst.process && !inst.alarm.state.is_active() && held >= on_delay {
            inst.alarm.activate(now_ms)
        } else if !inst.process && inst.alarm.state.is_active() && held >= off_delay {
            inst.alarm.clear(now_ms)
        } else {
            None
        };
        let inst = self.instances.peek(&(ri, topic.to_owned()))?;
        event.map(|e| self.change(ri, topic, inst, e, now_ms))
    }

    /// A value arrived on `topic` (at `now_ms`; `obj.ts_ms` is used for rates when present).
    pub fn on_value(&mut self, topic: &str, obj: &ValueObject, now_ms: i64) -> Vec<Change> {
        if self.setpoint_topics.iter().any(|t| t == topic) {
            if let Some(x) = obj.value.as_ref().and_then(Value::as_f64) {
                self.setpoints.insert(topic.to_owned(), x);
            }
        }
        let mut out = self.suppression(topic, obj, now_ms);
        for ri in self.rules_for(topic) {
            let setpoint = match &self.rules[ri].condition {
                Condition::Deviation { setpoint_topic, .. } => {
                    self.setpoints.get(setpoint_topic).copied()
                }
                _ => None,
            };
            let ts = obj.ts_ms.unwrap_or(now_ms);
            let key = (ri, topic.to_owned());
            if !self.ensure_instance(&key) {
                continue;
            }
            let Some(inst) = self.instances.get_mut(&key) else {
                continue;
            };
            inst.value = obj.value.clone();
            inst.last_update_ms = now_ms;
            if let Some(now) = Self::evaluate(
                &self.rules[ri].condition,
                inst.process,
                obj,
                setpoint,
                inst.prev,
                ts,
            ) {
                if now != inst.process {
                    inst.process = now;
                    inst.since_change_ms = now_ms;
                }
            }
            if matches!(self.rules[ri].condition, Condition::Stale { .. }) && inst.process {
                inst.process = false;
                inst.since_change_ms = now_ms;
            }
            if let Some(x) = obj.value.as_ref().and_then(Value::as_f64) {
                inst.prev = Some((x, ts));
            }
            if let Some(c) = self.settle(ri, topic, now_ms) {
                out.push(c);
            }
        }
        out
    }

    /// A value on a `suppress_when` topic: suppress or release the alarms of those rules.
    fn suppression(&mut self, topic: &str, obj: &ValueObject, now_ms: i64) -> Vec<Change> {
        let mut out = Vec::new();
        let ruled: Vec<(usize, bool)> = self
            .rules
            .iter()
            .enumerate()
            .filter_map(|(ri, r)| {
                let sw = r.suppress_when.as_ref().filter(|s| s.topic == topic)?;
                Some((
                    ri,
                    obj.value.as_ref().is_some_and(|v| equals(v, &sw.equals)),
                ))
            })
            .collect();
        for (ri, on) in ruled {
            self.suppressed.insert(ri, on);
            let keys: Vec<(usize, String)> = self
                .instances
                .keys()
                .filter(|(r, _)| *r == ri)
                .cloned()
                .collect();
            for key in keys {
                let event = self
                    .instances
                    .peek_mut(&key)
                    .and_then(|i| i.alarm.set_suppressed(on));
                if let (Some(e), Some(inst)) = (event, self.instances.peek(&key)) {
                    out.push(self.change(ri, &key.1, inst, e, now_ms));
                }
            }
        }
        out
    }

    /// Advance time: delays that ran out, stale topics, shelves that expired.
    pub fn tick(&mut self, now_ms: i64) -> Vec<Change> {
        let keys: Vec<(usize, String)> = self.instances.keys().cloned().collect();
        let mut out = Vec::new();
        for (ri, topic) in keys {
            if let Condition::Stale { after } = self.rules[ri].condition {
                if let Some(inst) = self.instances.peek_mut(&(ri, topic.clone())) {
                    let stale = now_ms - inst.last_update_ms > after.as_millis() as i64;
                    if stale != inst.process {
                        inst.process = stale;
                        inst.since_change_ms = now_ms;
                    }
                }
            }
            if let Some(c) = self.settle(ri, &topic, now_ms) {
                out.push(c);
            }
            let expired = self
                .instances
                .peek_mut(&(ri, topic.clone()))
                .and_then(|i| i.alarm.expire_shelf(now_ms));
            if let (Some(e), Some(inst)) = (expired, self.instances.peek(&(ri, topic.clone()))) {
                out.push(self.change(ri, &topic, inst, e, now_ms));
            }
        }
        out
    }

    fn find(&self, rule: &str, topic: &str) -> Result<usize, ActionError> {
        let not_found = || ActionError::NotFound {
            rule: rule.to_owned(),
            topic: topic.to_owned(),
        };
        let ri = self
            .rules
            .iter()
            .position(|r| r.id == rule)
            .ok_or_else(not_found)?;
        if !self.instances.contains_key(&(ri, topic.to_owned())) {
            return Err(not_found());
        }
        Ok(ri)
    }

    fn act(
        &mut self,
        rule: &str,
        topic: &str,
        now_ms: i64,
        user: Option<String>,
        comment: Option<String>,
        f: impl FnOnce(&mut Alarm) -> Result<Event, Refused>,
    ) -> Result<Change, ActionError> {
        let ri = self.find(rule, topic)?;
        let key = (ri, topic.to_owned());
        let inst = self
            .instances
            .peek_mut(&key)
            .ok_or_else(|| ActionError::NotFound {
                rule: rule.to_owned(),
                topic: topic.to_owned(),
            })?;
        let event = f(&mut inst.alarm)?;
        let inst = self
            .instances
            .peek(&key)
            .ok_or_else(|| ActionError::NotFound {
                rule: rule.to_owned(),
                topic: topic.to_owned(),
            })?;
        let mut c = self.change(ri, topic, inst, event, now_ms);
        c.user = user;
        c.comment = comment;
        Ok(c)
    }

    pub fn acknowledge(
        &mut self,
        rule: &str,
        topic: &str,
        now_ms: i64,
        user: Option<String>,
        comment: Option<String>,
    ) -> Result<Change, ActionError> {
        self.act(rule, topic, now_ms, user, comment, |a| {
            a.acknowledge(now_ms)
        })
    }

    pub fn shelve(
        &mut self,
        rule: &str,
        topic: &str,
        for_ms: i64,
        now_ms: i64,
        user: Option<String>,
    ) -> Result<Change, ActionError> {
        let max = self.max_shelve_ms;
        self.act(rule, topic, now_ms, user, None, |a| {
            a.shelve(now_ms, for_ms, max)
        })
    }

    pub fn unshelve(
        &mut self,
        rule: &str,
        topic: &str,
        now_ms: i64,
        user: Option<String>,
    ) -> Result<Change, ActionError> {
        self.act(rule, topic, now_ms, user, None, |a| a.unshelve(now_ms))
    }

    pub fn set_out_of_service(
        &mut self,
        rule: &str,
        topic: &str,
        on: bool,
        now_ms: i64,
        user: Option<String>,
    ) -> Result<Change, ActionError> {
        self.act(rule, topic, now_ms, user, None, |a| {
            a.set_out_of_service(on)
        })
    }

    /// Restore an alarm found in a retained state topic after a restart, so an active alarm
    /// is neither raised again nor forgotten (unless the table is full of alarms that may not
    /// be forgotten, which is counted).
    pub fn restore(&mut self, rule: &str, topic: &str, alarm: Alarm) -> Restore {
        let Some(ri) = self.rules.iter().position(|r| r.id == rule) else {
            return Restore::UnknownRule;
        };
        let key = (ri, topic.to_owned());
        if !self.ensure_instance(&key) {
            return Restore::Refused;
        }
        let Some(inst) = self.instances.peek_mut(&key) else {
            return Restore::Refused;
        };
        inst.process = alarm.state.is_active();
        inst.since_change_ms = alarm.since_ms;
        inst.alarm = alarm;
        Restore::Restored
    }

    /// Every alarm that is not normal (or is shelved or out of service), as changes.
    pub fn alarms(&self, now_ms: i64) -> Vec<Change> {
        let mut v: Vec<Change> = self
            .instances
            .iter()
            .filter(|(_, i)| {
                i.alarm.state != State::Normal
                    || i.alarm.is_shelved(now_ms)
                    || i.alarm.out_of_service
            })
            .map(|((ri, topic), i)| self.change(*ri, topic, i, Event::Activated, now_ms))
            .collect();
        v.sort_by(|a, b| b.severity.cmp(&a.severity).then(a.topic.cmp(&b.topic)));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::State;
    use nexus_common::config::Config;
    use nexus_common::Quality;

    fn rules(yaml: &str) -> Vec<AlertRule> {
        Config::from_str_with_env(&format!("alerts:\n  rules:\n{yaml}"), None, &[])
            .unwrap_or_else(|e| panic!("{e}"))
            .alerts
            .rules
    }

    fn v(x: f64) -> ValueObject {
        ValueObject {
            value: Some(Value::Float(x)),
            quality: Quality::Good,
            ts_ms: None,
            source_ts_ms: None,
            unit: None,
        }
    }

    const T: &str = "acme/s/a/l/dev/temp";

    #[test]
    fn high_limit_with_deadband() {
        let mut e = Engine::new(&rules("    - { id: hot, topic: \"acme/+/+/+/+/temp\", condition: { type: high, limit: 80, deadband: 2 }, message: \"{topic} is {value} above {limit}\" }\n"), 3_600_000);
        assert!(e.on_value(T, &v(79.0), 0).is_empty());
        let c = e.on_value(T, &v(81.0), 1);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].event, Event::Activated);
        assert_eq!(c[0].alarm.state, State::ActiveUnacked);
        assert_eq!(c[0].message, "acme/s/a/l/dev/temp is 81 above 80");
        // Noise around the limit does not clear it: 78.5 is inside the deadband.
        assert!(e.on_value(T, &v(79.5), 2).is_empty());
        assert!(e.on_value(T, &v(78.5), 3).is_empty());
        let c = e.on_value(T, &v(77.9), 4);
        assert_eq!(
            (c[0].event, c[0].alarm.state),
            (Event::Cleared, State::RtnUnacked)
        );
        let c = e
            .acknowledge("hot", T, 5, Some("ann".into()), None)
            .unwrap();
        assert_eq!(c.alarm.state, State::Normal);
        assert_eq!(c.user.as_deref(), Some("ann"));
        assert!(matches!(
            e.acknowledge("hot", "other/topic", 6, None, None),
            Err(ActionError::NotFound { .. })
        ));
    }

    #[test]
    fn on_and_off_delays_stop_chattering() {
        let mut e = Engine::new(&rules("    - { id: lo, topic: \"t/x\", condition: { type: low, limit: 10 }, on_delay: 5s, off_delay: 2s }\n"), 3_600_000);
        assert!(
            e.on_value("t/x", &v(5.0), 0).is_empty(),
            "not yet: on-delay"
        );
        assert!(
            e.on_value("t/x", &v(11.0), 1000).is_empty(),
            "recovered within the delay"
        );
        assert!(e.on_value("t/x", &v(5.0), 2000).is_empty());
        assert!(e.tick(6000).is_empty(), "held 4 s only");
        let c = e.tick(7000);
        assert_eq!(c[0].event, Event::Activated, "held 5 s");
        assert!(e.on_value("t/x", &v(12.0), 8000).is_empty(), "off-delay");
        assert!(
            e.on_value("t/x", &v(5.0), 9000).is_empty(),
            "back low within off-delay: stays active"
        );
        assert!(e.on_value("t/x", &v(12.0), 9500).is_empty());
        let c = e.tick(11_600);
        assert_eq!(c[0].event, Event::Cleared);
    }

    #[test]
    fn deviation_rate_equals_quality_and_stale() {
        let yaml = "    - { id: dev, topic: \"p/pv\", condition: { type: deviation, setpoint_topic: \"p/sp\", limit: 5 } }\n    - { id: roc, topic: \"p/pv\", condition: { type: rate_of_change, limit: 2 } }\n    - { id: run, topic: \"p/state\", condition: { type: equals, value: \"fault\" } }\n    - { id: bq, topic: \"p/#\", condition: { type: bad_quality } }\n    - { id: old, topic: \"p/pv\", condition: { type: stale, after: 10s } }\n";
        let mut e = Engine::new(&rules(yaml), 3_600_000);
        assert_eq!(
            e.filters(),
            vec![
                "p/#".to_string(),
                "p/pv".into(),
                "p/sp".into(),
                "p/state".into()
            ]
        );
        e.on_value("p/sp", &v(50.0), 0);
        let pv = |x: f64, ts: i64| {
            let mut o = v(x);
            o.ts_ms = Some(ts);
            o
        };
        assert!(e.on_value("p/pv", &pv(52.0, 0), 0).is_empty());
        let c = e.on_value("p/pv", &pv(56.0, 1000), 1000);
        let ids: Vec<&str> = c.iter().map(|c| c.rule_id.as_str()).collect();
        assert_eq!(
            ids,
            vec!["dev", "roc"],
            "deviation 6 > 5 and rate 4/s > 2/s"
        );
        let mut state = ValueObject {
            value: Some(Value::String("fault".into())),
            quality: Quality::Good,
            ts_ms: None,
            source_ts_ms: None,
            unit: None,
        };
        assert_eq!(e.on_value("p/state", &state, 1000)[0].rule_id, "run");
        state.quality = Quality::BadCommFailure;
        state.value = None;
        let c = e.on_value("p/state", &state, 1100);
        assert_eq!(
            c.iter().map(|c| c.rule_id.as_str()).collect::<Vec<_>>(),
            vec!["bq"]
        );
        assert!(e.tick(5000).is_empty());
        let c = e.tick(11_001);
        assert_eq!(
            c.iter()
                .map(|c| (c.rule_id.as_str(), c.event))
                .collect::<Vec<_>>(),
            vec![("old", Event::Activated)]
        );
        let c = e.on_value("p/pv", &pv(56.0, 12_000), 12_000);
        assert!(
            c.iter()
                .any(|c| c.rule_id == "old" && c.event == Event::Cleared),
            "{c:?}"
        );
    }

    #[test]
    fn restore_neither_re_raises_nor_forgets() {
        let mut e = Engine::new(
            &rules("    - { id: hot, topic: \"t/x\", condition: { type: high, limit: 80 } }\n"),
            3_600_000,
        );
        let alarm = Alarm {
            state: State::ActiveAcked,
            since_ms: 100,
            ..Alarm::default()
        };
        assert_eq!(e.restore("hot", "t/x", alarm), Restore::Restored);
        assert_eq!(
            e.restore("gone", "t/x", Alarm::default()),
            Restore::UnknownRule
        );
        assert!(
            e.on_value("t/x", &v(90.0), 200).is_empty(),
            "still active: not raised again"
        );
        let c = e.on_value("t/x", &v(70.0), 300);
        assert_eq!(
            (c[0].event, c[0].alarm.state),
            (Event::Cleared, State::Normal)
        );
        assert_eq!(e.alarms(400).len(), 0);
    }

    #[test]
    fn reloaded_rules_keep_the_state_of_unchanged_ones() {
        let two = "    - { id: hot, topic: \"t/x\", condition: { type: high, limit: 80 } }\n    - { id: cold, topic: \"t/x\", condition: { type: low, limit: 10 } }\n";
        let mut e = Engine::new(&rules(two), 3_600_000);
        e.on_value("t/x", &v(90.0), 0);
        e.on_value("t/y", &v(5.0), 0);
        // "cold" removed, "warm" added, "hot" unchanged.
        let removed = e.replace_rules(&rules("    - { id: hot, topic: \"t/x\", condition: { type: high, limit: 80 } }\n    - { id: warm, topic: \"t/x\", condition: { type: high, limit: 60 } }\n"));
        assert_eq!(removed, vec![("cold".to_string(), "t/x".to_string())]);
        assert_eq!(
            e.alarms(1)
                .iter()
                .map(|c| c.rule_id.as_str())
                .collect::<Vec<_>>(),
            vec!["hot"],
            "hot is still active"
        );
        assert!(
            e.on_value("t/x", &v(91.0), 2)
                .iter()
                .all(|c| c.rule_id == "warm"),
            "hot is not raised again"
        );
        // A changed limit is a new alarm.
        let removed = e.replace_rules(&rules(
            "    - { id: hot, topic: \"t/x\", condition: { type: high, limit: 85 } }\n",
        ));
        assert_eq!(removed.len(), 2);
    }

    #[test]
    fn reload_sees_a_changed_condition_and_not_an_identical_rule() {
        let hot = |cond: &str, extra: &str| {
            rules(&format!(
                "    - {{ id: hot, topic: \"t/+\", condition: {cond}, suppress_when: {{ topic: \"t/run\", equals: false }}{extra} }}\n"
            ))
            .remove(0)
        };
        let high = "{ type: high, limit: 80, deadband: 2 }";
        let same = hot(high, "");
        assert!(
            keeps_alarms(&same, &hot(high, "")),
            "parsed again, unchanged"
        );
        assert!(
            keeps_alarms(
                &same,
                &hot(high, ", message: \"{topic} hot\", severity: 900")
            ),
            "only the text and severity changed"
        );
        for changed in [
            "{ type: high, limit: 85, deadband: 2 }",
            "{ type: high, limit: 80, deadband: 3 }",
            "{ type: high_high, limit: 80, deadband: 2 }",
            "{ type: stale, after: 10s }",
        ] {
            assert!(!keeps_alarms(&same, &hot(changed, "")), "{changed}");
        }
        let eq = |v: &str| hot(&format!("{{ type: equals, value: {v} }}"), "");
        assert!(keeps_alarms(&eq("\"fault\""), &eq("\"fault\"")));
        assert!(!keeps_alarms(&eq("\"fault\""), &eq("\"trip\"")));
        assert!(!keeps_alarms(&eq("true"), &eq("\"true\"")));

        // Through a reload: an identical rule keeps its alarm, a changed limit drops it.
        let mut e = Engine::new(&[hot(high, "")], 3_600_000);
        assert_eq!(e.on_value("t/x", &v(90.0), 0)[0].event, Event::Activated);
        assert!(e.replace_rules(&[hot(high, "")]).is_empty());
        assert!(
            e.on_value("t/x", &v(91.0), 1).is_empty(),
            "not raised again"
        );
        assert_eq!(e.alarms(2).len(), 1);
        let removed = e.replace_rules(&[hot("{ type: high, limit: 95, deadband: 2 }", "")]);
        assert_eq!(removed, vec![("hot".to_string(), "t/x".to_string())]);
        assert!(e.alarms(3).is_empty());
    }

    #[test]
    fn suppression_by_a_condition() {
        let mut e = Engine::new(&rules("    - { id: lo, topic: \"l/pressure\", condition: { type: low, limit: 2 }, suppress_when: { topic: \"l/running\", equals: false } }\n"), 3_600_000);
        assert!(e.filters().contains(&"l/running".to_string()));
        let off = ValueObject {
            value: Some(Value::Bool(false)),
            quality: Quality::Good,
            ts_ms: None,
            source_ts_ms: None,
            unit: None,
        };
        let on = ValueObject {
            value: Some(Value::Bool(true)),
            ..off.clone()
        };
        e.on_value("l/running", &off, 0);
        let c = e.on_value("l/pressure", &v(0.5), 1);
        assert_eq!(c[0].event, Event::Activated);
        assert!(
            c[0].alarm.suppressed && !c[0].alarm.annunciates(1),
            "the line is stopped: no annunciation"
        );
        let c = e.on_value("l/running", &on, 2);
        assert_eq!(
            (c[0].event, c[0].alarm.suppressed),
            (Event::Unsuppressed, false)
        );
        assert!(c[0].alarm.annunciates(2));
    }

    /// A client publishing to ever new topics: the table stays at its bound, the normal
    /// instances idle the longest go first, and alarms an operator must see are never
    /// forgotten; when only those are left, new topics are refused and counted.
    #[test]
    fn a_flood_of_topics_keeps_the_instance_table_at_its_bound() {
        let rules = rules(
            "    - { id: hot, topic: \"f/+\", condition: { type: high, limit: 80 }, on_delay: 5s }\n",
        );
        let mut e = Engine::with_limits(&rules, 3_600_000, Limits::detached(4));
        for i in 0..1000 {
            assert!(e.on_value(&format!("f/t{i}"), &v(20.0), i).is_empty());
        }
        assert_eq!(e.instance_count(), 4);
        assert_eq!(e.limits().instances.evicted_total(), 996);
        assert_eq!(e.cached_topics(), 4);
        assert_eq!(e.limits().topics.evicted_total(), 996);
        // Two alarms raised, one acknowledged; one topic past its limit, its on-delay running.
        for t in ["f/a", "f/b", "f/c"] {
            e.on_value(t, &v(90.0), 2000);
        }
        assert_eq!(e.tick(7000).len(), 3, "raised after the on-delay");
        e.acknowledge("hot", "f/a", 7001, None, None).unwrap();
        e.on_value("f/pending", &v(90.0), 7002);
        assert_eq!(e.instance_count(), 4);
        // The table now holds only what may not be forgotten: new topics are refused.
        for i in 0..50 {
            assert!(e.on_value(&format!("f/n{i}"), &v(95.0), 7003).is_empty());
        }
        assert_eq!(e.limits().instances.refused_total(), 50);
        let active: Vec<String> = e.alarms(7004).into_iter().map(|c| c.topic).collect();
        assert_eq!(active, vec!["f/a", "f/b", "f/c"]);
        let c = e.tick(7003 + 5000);
        assert_eq!(c[0].topic, "f/pending", "its on-delay was kept");
        // "a" clears while acknowledged: normal, and the one that may go.
        e.on_value("f/a", &v(10.0), 13_000);
        assert!(e.on_value("f/new", &v(10.0), 13_001).is_empty());
        assert!(e.find("hot", "f/new").is_ok());
        assert!(
            e.find("hot", "f/a").is_err(),
            "the normal one was forgotten"
        );
        assert_eq!(e.limits().instances.refused_total(), 50);
        // Shelved and out-of-service alarms are kept too.
        e.on_value("f/new", &v(90.0), 13_002);
        e.acknowledge("hot", "f/b", 13_003, None, None).unwrap();
        e.on_value("f/b", &v(10.0), 13_004);
        e.shelve("hot", "f/b", 60_000, 13_005, None).unwrap();
        e.acknowledge("hot", "f/c", 13_006, None, None).unwrap();
        e.on_value("f/c", &v(10.0), 13_007);
        e.set_out_of_service("hot", "f/c", true, 13_008, None)
            .unwrap();
        assert!(e.on_value("f/other", &v(10.0), 13_009).is_empty());
        assert_eq!(e.limits().instances.refused_total(), 51);
        assert_eq!(e.instance_count(), 4);
    }

    #[test]
    fn a_restore_past_the_bound_is_refused_and_counted() {
        let mut e = Engine::with_limits(
            &rules("    - { id: hot, topic: \"r/+\", condition: { type: high, limit: 80 } }\n"),
            3_600_000,
            Limits::detached(2),
        );
        let active = Alarm {
            state: State::ActiveUnacked,
            since_ms: 1,
            ..Alarm::default()
        };
        assert_eq!(e.restore("hot", "r/1", active.clone()), Restore::Restored);
        assert_eq!(e.restore("hot", "r/2", active.clone()), Restore::Restored);
        assert_eq!(e.restore("hot", "r/3", active), Restore::Refused);
        assert_eq!(e.limits().instances.refused_total(), 1);
        assert_eq!(e.alarms(2).len(), 2);
        // A reload keeps them within the same bound.
        let removed = e.replace_rules(&rules(
            "    - { id: hot, topic: \"r/+\", condition: { type: high, limit: 80 } }\n",
        ));
        assert!(removed.is_empty());
        assert_eq!(e.instance_count(), 2);
    }

    #[test]
    fn shelving_through_the_engine() {
        let mut e = Engine::new(
            &rules("    - { id: hot, topic: \"t/x\", condition: { type: high, limit: 80 } }\n"),
            60_000,
        );
        e.on_value("t/x", &v(90.0), 0);
        assert!(e
            .shelve("hot", "t/x", 120_000, 0, None)
            .unwrap_err()
            .to_string()
            .contains("limited to 60 s"));
        let c = e
            .shelve("hot", "t/x", 30_000, 0, Some("op".into()))
            .unwrap();
        assert_eq!(c.event, Event::Shelved);
        assert!(!c.alarm.annunciates(1));
        let c = e.tick(30_000);
        assert_eq!(c[0].event, Event::Unshelved);
    }
}
