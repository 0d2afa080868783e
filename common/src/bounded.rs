//! Maps keyed by what clients choose (topics, Sparkplug node ids, request ids), with a bound.
//!
//! A [`BoundedMap`] holds at most `capacity` units: an entry costs one unit per started 256
//! bytes of the client's text it keeps ([`text_weight`]), so a bound in entries is also a bound
//! in memory whatever length of topic a client sends. Entries are kept in least-recently-used
//! order (on [`lru`]); an insert that needs room evicts from the old end, and hands what it
//! evicted back to the caller. The caller may say which entries must not be evicted (an active
//! alarm, a command still running): those are stepped over, and when no room can be made the
//! insert is refused and the entry handed back. Nothing leaves the map without the caller
//! seeing it, so every drop can be counted: [`MapStats`] counts and logs them, and shows the
//! size of each map on the service's `/metrics` ([`StateMetrics`]).

use std::borrow::Borrow;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lru::LruCache;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry};

use crate::metrics::{self, MetricError};

/// Bytes of client text one unit of capacity pays for.
pub const TEXT_UNIT: usize = 256;

/// Entries stepped over as not evictable in one insert, at most. They move to the recent end
/// as they are passed, so the next insert looks further; a map full of entries that may not
/// be evicted costs a bounded amount of work per refused insert, never a scan of the whole map.
const MAX_PINNED_SCAN: usize = 256;

/// The cost in units of an entry keeping `bytes` of client text: one per started 256 bytes,
/// at least one.
pub fn text_weight(bytes: usize) -> usize {
    bytes.div_ceil(TEXT_UNIT).max(1)
}

struct Slot<V> {
    value: V,
    weight: usize,
}

/// An insert that found room: the stored value, and what was evicted for it (least recently
/// used first).
#[must_use = "evicted entries are to be counted"]
pub struct Stored<'a, K, V> {
    pub value: &'a mut V,
    pub evicted: Vec<(K, V)>,
}

/// An insert refused for want of room: the entry, handed back.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused<K, V> {
    pub key: K,
    pub value: V,
}

/// A map of at most `capacity` units in least-recently-used order. See the module.
pub struct BoundedMap<K: Hash + Eq, V> {
    map: LruCache<K, Slot<V>>,
    capacity: usize,
    used: usize,
}

impl<K: Hash + Eq + Clone, V> BoundedMap<K, V> {
    /// A map of `capacity` units (at least one).
    pub fn new(capacity: usize) -> BoundedMap<K, V> {
        BoundedMap {
            map: LruCache::unbounded(),
            capacity: capacity.max(1),
            used: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Units in use (at most [`capacity`](Self::capacity)).
    pub fn used(&self) -> usize {
        self.used
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.contains(key)
    }

    /// The value of `key`, marked as used now.
    pub fn get<Q>(&mut self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.get(key).map(|s| &s.value)
    }

    /// The value of `key`, marked as used now.
    pub fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.get_mut(key).map(|s| &mut s.value)
    }

    /// The value of `key`, its place in the order unchanged.
    pub fn peek<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.peek(key).map(|s| &s.value)
    }

    /// The value of `key`, its place in the order unchanged.
    pub fn peek_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.peek_mut(key).map(|s| &mut s.value)
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let slot = self.map.pop(key)?;
        self.used -= slot.weight;
        Some(slot.value)
    }

    /// Store `value` under `key` at `weight` units, evicting the least recently used entries
    /// as needed. A value already under `key` is replaced (and dropped).
    pub fn insert(
        &mut self,
        key: K,
        value: V,
        weight: usize,
    ) -> Result<Stored<'_, K, V>, Refused<K, V>> {
        self.insert_evicting(key, value, weight, |_, _| true)
    }

    /// [`insert`](Self::insert), evicting only entries for which `evictable` is true. Refused
    /// when the entry weighs more than the whole map, or when no room can be made (the entries
    /// that could make it may not be evicted); the map is then as it was, but for a value
    /// already under `key`, which is removed.
    pub fn insert_evicting(
        &mut self,
        key: K,
        value: V,
        weight: usize,
        evictable: impl FnMut(&K, &V) -> bool,
    ) -> Result<Stored<'_, K, V>, Refused<K, V>> {
        let weight = weight.max(1);
        self.remove(&key);
        let Some(evicted) = self.make_room(weight, None, evictable) else {
            return Err(Refused { key, value });
        };
        self.used += weight;
        let slot = self.map.get_or_insert_mut(key, || Slot { value, weight });
        Ok(Stored {
            value: &mut slot.value,
            evicted,
        })
    }

    /// Set the weight of the entry under `key` (it grew or shrank), evicting other entries for
    /// which `evictable` is true to make room. `Ok` with what was evicted (nothing when the
    /// key is absent); `Err(())` when no room can be made, the weight then unchanged.
    #[allow(clippy::result_unit_err)]
    pub fn reweigh(
        &mut self,
        key: &K,
        weight: usize,
        evictable: impl FnMut(&K, &V) -> bool,
    ) -> Result<Vec<(K, V)>, ()> {
        let weight = weight.max(1);
        let Some(old) = self.map.peek(key).map(|s| s.weight) else {
            return Ok(Vec::new());
        };
        if weight <= old {
            self.used -= old - weight;
            if let Some(s) = self.map.peek_mut(key) {
                s.weight = weight;
            }
            return Ok(Vec::new());
        }
        let evicted = self
            .make_room(weight - old, Some(key), evictable)
            .ok_or(())?;
        self.used += weight - old;
        if let Some(s) = self.map.peek_mut(key) {
            s.weight = weight;
        }
        Ok(evicted)
    }

    /// Evict until `need` more units fit, never `skip`; `None` (and nothing evicted) when
    /// that cannot be done.
    fn make_room(
        &mut self,
        need: usize,
        skip: Option<&K>,
        mut evictable: impl FnMut(&K, &V) -> bool,
    ) -> Option<Vec<(K, V)>> {
        let skip_weight = skip.and_then(|k| self.map.peek(k)).map_or(0, |s| s.weight);
        if need > self.capacity - skip_weight {
            return None;
        }
        let mut free = self.capacity - self.used;
        if free >= need {
            return Some(Vec::new());
        }
        let mut victims = Vec::new();
        let mut passed = Vec::new();
        for (k, slot) in self.map.iter().rev() {
            if skip == Some(k) {
                continue;
            }
            if evictable(k, &slot.value) {
                victims.push(k.clone());
                free += slot.weight;
                if free >= need {
                    break;
                }
            } else {
                passed.push(k.clone());
                if passed.len() >= MAX_PINNED_SCAN {
                    break;
                }
            }
        }
        for k in &passed {
            self.map.promote(k);
        }
        if free < need {
            return None;
        }
        let mut evicted = Vec::with_capacity(victims.len());
        for k in victims {
            if let Some((k, slot)) = self.map.pop_entry(&k) {
                self.used -= slot.weight;
                evicted.push((k, slot.value));
            }
        }
        Some(evicted)
    }

    /// Entries from the least recently used.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.map.iter().rev().map(|(k, s)| (k, &s.value))
    }

    /// Entries from the least recently used, order unchanged.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&K, &mut V)> {
        self.map.iter_mut().rev().map(|(k, s)| (k, &mut s.value))
    }

    /// Keys from the least recently used.
    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.map.iter().rev().map(|(k, _)| k)
    }

    /// Keep the entries for which `keep` is true; returns how many were removed.
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) -> usize {
        let before = self.map.len();
        let mut freed = 0;
        self.map.retain(|k, s| {
            let kept = keep(k, &mut s.value);
            if !kept {
                freed += s.weight;
            }
            kept
        });
        self.used -= freed;
        before - self.map.len()
    }

    /// Take every entry out, the least recently used first, with its weight.
    pub fn drain(&mut self) -> Vec<(K, V, usize)> {
        let mut out = Vec::with_capacity(self.map.len());
        while let Some((k, s)) = self.map.pop_lru() {
            out.push((k, s.value, s.weight));
        }
        self.used = 0;
        out
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.used = 0;
    }
}

/// How often a full map is logged, at most.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// The metrics of a service's bounded maps, one series per map (label `map`):
/// `<prefix>_state_size` (units in use, at most the map's bound; an entry is one unit per
/// started 256 bytes of the client text it keeps), `<prefix>_state_evicted_total` and, for
/// maps whose inserts can be refused, `<prefix>_state_refused_total`.
#[derive(Clone)]
pub struct StateMetrics {
    size: IntGaugeVec,
    evicted: IntCounterVec,
    refused: IntCounterVec,
}

impl StateMetrics {
    /// Register the three families in `r`, named after `prefix` (e.g. `nexus_alerts`).
    pub fn new(r: &Registry, prefix: &str) -> Result<StateMetrics, MetricError> {
        Ok(StateMetrics {
            size: metrics::gauge_vec(
                r,
                &format!("{prefix}_state_size"),
                "Units in use of a bounded map keyed by what clients choose (an entry is one unit per started 256 bytes of client text), at most its bound",
                &["map"],
            )?,
            evicted: metrics::counter_vec(
                r,
                &format!("{prefix}_state_evicted_total"),
                "Entries evicted from a full bounded map to make room (least recently used first)",
                &["map"],
            )?,
            refused: metrics::counter_vec(
                r,
                &format!("{prefix}_state_refused_total"),
                "Entries not stored in a full bounded map whose other entries may not be evicted",
                &["map"],
            )?,
        })
    }

    /// The series of map `name` (all at 0 from now on); `refuses` if its inserts can be refused.
    pub fn map(&self, name: &'static str, capacity: usize, refuses: bool) -> MapStats {
        MapStats::with(
            name,
            capacity,
            self.size.with_label_values(&[name]),
            self.evicted.with_label_values(&[name]),
            refuses.then(|| self.refused.with_label_values(&[name])),
        )
    }
}

/// The counters and gauge of one bounded map, and its rate-limited log. Cheap to clone (the
/// clones share the series).
#[derive(Clone)]
pub struct MapStats {
    name: &'static str,
    capacity: usize,
    size: IntGauge,
    evicted: IntCounter,
    refused: Option<IntCounter>,
    last_log: Arc<Mutex<Option<Instant>>>,
}

impl MapStats {
    fn with(
        name: &'static str,
        capacity: usize,
        size: IntGauge,
        evicted: IntCounter,
        refused: Option<IntCounter>,
    ) -> MapStats {
        MapStats {
            name,
            capacity: capacity.max(1),
            size,
            evicted,
            refused,
            last_log: Arc::new(Mutex::new(None)),
        }
    }

    /// Series registered nowhere: an engine without a service (tests, benchmarks) still counts.
    pub fn detached(name: &'static str, capacity: usize) -> MapStats {
        let counter = || IntCounter::new("detached", "detached").expect("a valid literal name");
        MapStats::with(
            name,
            capacity,
            IntGauge::new("detached", "detached").expect("a valid literal name"),
            counter(),
            Some(counter()),
        )
    }

    /// The bound the map was made with.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Show the size of `map` now.
    pub fn size<K: Hash + Eq + Clone, V>(&self, map: &BoundedMap<K, V>) {
        self.size.set(map.used() as i64);
    }

    /// `n` entries were evicted (0 does nothing).
    pub fn evicted(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.evicted.inc_by(n as u64);
        if self.due() {
            tracing::warn!(map = self.name, capacity = self.capacity, evicted_total = self.evicted.get(), "bounded map full: least recently used entries evicted (logged once a minute at most)");
        }
    }

    /// An entry was not stored: the map is full of entries that may not be evicted.
    pub fn refused(&self) {
        let total = self.refused.as_ref().map_or(0, |c| {
            c.inc();
            c.get()
        });
        if self.due() {
            tracing::warn!(map = self.name, capacity = self.capacity, refused_total = total, "bounded map full of entries that may not be evicted: new entries refused (logged once a minute at most)");
        }
    }

    pub fn evicted_total(&self) -> u64 {
        self.evicted.get()
    }

    pub fn refused_total(&self) -> u64 {
        self.refused.as_ref().map_or(0, IntCounter::get)
    }

    fn due(&self) -> bool {
        let mut last = self.last_log.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            return false;
        }
        *last = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn keys(m: &BoundedMap<String, u32>) -> Vec<&str> {
        m.keys().map(String::as_str).collect()
    }

    fn put(m: &mut BoundedMap<String, u32>, k: &str, v: u32) -> Vec<String> {
        let stored = m.insert(k.to_owned(), v, 1).ok().unwrap();
        stored.evicted.into_iter().map(|(k, _)| k).collect()
    }

    #[test]
    fn text_weight_is_one_unit_per_started_256_bytes() {
        assert_eq!(text_weight(0), 1);
        assert_eq!(text_weight(1), 1);
        assert_eq!(text_weight(256), 1);
        assert_eq!(text_weight(257), 2);
        assert_eq!(text_weight(65_535), 256);
    }

    #[test]
    fn the_least_recently_used_entry_is_evicted_and_handed_back() {
        let mut m = BoundedMap::new(3);
        for (i, k) in ["a", "b", "c"].into_iter().enumerate() {
            assert!(put(&mut m, k, i as u32).is_empty());
        }
        assert_eq!(m.get(&"a".to_owned()), Some(&0), "a is now the most recent");
        assert_eq!(m.peek(&"b".to_owned()), Some(&1), "a peek leaves b oldest");
        assert_eq!(put(&mut m, "d", 3), vec!["b"]);
        assert_eq!(keys(&m), vec!["c", "a", "d"]);
        assert_eq!((m.len(), m.used()), (3, 3));
        // Replacing a key neither grows the map nor evicts.
        assert!(put(&mut m, "c", 9).is_empty());
        assert_eq!(keys(&m), vec!["a", "d", "c"]);
        assert_eq!(m.remove(&"a".to_owned()), Some(0));
        assert_eq!(m.used(), 2);
    }

    #[test]
    fn weights_count_against_the_capacity() {
        let mut m: BoundedMap<String, u32> = BoundedMap::new(4);
        for k in ["a", "b", "c", "d"] {
            let _ = m.insert(k.to_owned(), 0, 1).ok().unwrap();
        }
        let s = m.insert("long".to_owned(), 1, 3).ok().unwrap();
        let gone: Vec<String> = s.evicted.into_iter().map(|(k, _)| k).collect();
        assert_eq!(gone, vec!["a", "b", "c"]);
        assert_eq!((m.len(), m.used()), (2, 4));
        // Heavier than the whole map: refused, the map untouched.
        let r = m.insert("huge".to_owned(), 2, 5).err().unwrap();
        assert_eq!(
            r,
            Refused {
                key: "huge".to_owned(),
                value: 2
            }
        );
        assert_eq!(keys(&m), vec!["d", "long"]);
    }

    #[test]
    fn pinned_entries_are_stepped_over_and_a_full_map_of_them_refuses() {
        // Odd values may not be evicted.
        let odd = |_: &String, v: &u32| v.is_multiple_of(2);
        let mut m = BoundedMap::new(3);
        for (k, v) in [("p1", 1), ("e", 2), ("p2", 3)] {
            let _ = m.insert(k.to_owned(), v, 1).ok().unwrap();
        }
        let s = m.insert_evicting("n".to_owned(), 4, 1, odd).ok().unwrap();
        assert_eq!(s.evicted, vec![("e".to_owned(), 2)]);
        // Full of odd values once "n" goes: 5 replaces nothing.
        assert_eq!(m.remove(&"n".to_owned()), Some(4));
        let _ = m.insert("p3".to_owned(), 5, 1).ok().unwrap();
        let r = m.insert_evicting("x".to_owned(), 6, 1, odd).err().unwrap();
        assert_eq!(r.key, "x");
        assert_eq!(m.len(), 3);
        assert!(
            keys(&m).iter().all(|k| k.starts_with('p')),
            "{:?}",
            keys(&m)
        );
        // Once one of them may go, it goes.
        *m.peek_mut(&"p2".to_owned()).unwrap() = 8;
        let s = m.insert_evicting("x".to_owned(), 6, 1, odd).ok().unwrap();
        assert_eq!(s.evicted, vec![("p2".to_owned(), 8)]);
    }

    #[test]
    fn a_refused_insert_costs_a_bounded_scan_and_later_ones_look_further() {
        let cap = MAX_PINNED_SCAN * 3;
        let mut m = BoundedMap::new(cap);
        for i in 0..cap - 1 {
            let _ = m.insert(format!("p{i}"), 1, 1).ok().unwrap();
        }
        // The one evictable entry is the most recent: past the first scans.
        let _ = m.insert("e".to_owned(), 0, 1).ok().unwrap();
        let evictable = |_: &String, v: &u32| *v == 0;
        let mut refusals = 0;
        loop {
            match m.insert_evicting("new".to_owned(), 1, 1, evictable) {
                Err(_) => refusals += 1,
                Ok(s) => {
                    assert_eq!(s.evicted, vec![("e".to_owned(), 0)]);
                    break;
                }
            }
            assert!(refusals < 10, "never found");
        }
        assert_eq!(
            refusals, 2,
            "each refused insert passes {MAX_PINNED_SCAN} entries"
        );
    }

    #[test]
    fn reweigh_makes_room_without_evicting_the_entry_itself() {
        let mut m: BoundedMap<String, u32> = BoundedMap::new(5);
        for k in ["a", "b", "c"] {
            let _ = m.insert(k.to_owned(), 0, 1).ok().unwrap();
        }
        // "a" is the least recently used, and grows: "b" makes the room, "a" stays.
        let gone = m.reweigh(&"a".to_owned(), 4, |_, _| true).unwrap();
        assert_eq!(
            gone.into_iter().map(|(k, _)| k).collect::<Vec<_>>(),
            vec!["b"]
        );
        assert_eq!((m.len(), m.used()), (2, 5));
        // Past the whole map even alone: refused, nothing evicted.
        assert!(m.reweigh(&"a".to_owned(), 6, |_, _| true).is_err());
        assert_eq!((m.len(), m.used()), (2, 5), "unchanged");
        assert!(m
            .reweigh(&"a".to_owned(), 2, |_, _| true)
            .unwrap()
            .is_empty());
        assert_eq!(m.used(), 3);
        assert!(m
            .reweigh(&"absent".to_owned(), 9, |_, _| true)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn retain_and_drain_keep_the_accounts() {
        let mut m: BoundedMap<String, u32> = BoundedMap::new(10);
        for (i, k) in ["a", "b", "c", "d"].into_iter().enumerate() {
            let _ = m.insert(k.to_owned(), i as u32, 2).ok().unwrap();
        }
        assert_eq!(m.retain(|_, v| *v % 2 == 0), 2);
        assert_eq!((m.len(), m.used()), (2, 4));
        for (_, v) in m.iter_mut() {
            *v += 10;
        }
        let all = m.drain();
        assert_eq!(all, vec![("a".to_owned(), 10, 2), ("c".to_owned(), 12, 2)]);
        assert_eq!((m.len(), m.used()), (0, 0));
    }

    #[test]
    fn stats_are_served_per_map_and_count() {
        let r = Registry::new();
        let s = StateMetrics::new(&r, "nexus_test").unwrap();
        let a = s.map("alpha", 2, true);
        let _b = s.map("beta", 5, false);
        let mut m: BoundedMap<String, u32> = BoundedMap::new(2);
        for k in ["x", "y", "z"] {
            let n = m.insert(k.to_owned(), 0, 1).ok().unwrap().evicted.len();
            a.evicted(n);
        }
        a.size(&m);
        a.refused();
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&r.gather())
            .unwrap();
        for want in [
            "nexus_test_state_size{map=\"alpha\"} 2",
            "nexus_test_state_evicted_total{map=\"alpha\"} 1",
            "nexus_test_state_refused_total{map=\"alpha\"} 1",
            "nexus_test_state_size{map=\"beta\"} 0",
            "nexus_test_state_evicted_total{map=\"beta\"} 0",
        ] {
            assert!(text.contains(want), "{want} in\n{text}");
        }
        assert!(!text.contains("nexus_test_state_refused_total{map=\"beta\"}"));
        assert_eq!((a.evicted_total(), a.refused_total()), (1, 1));
        assert!(
            StateMetrics::new(&r, "nexus_test").is_err(),
            "registered once"
        );
        let d = MapStats::detached("gamma", 1);
        d.evicted(3);
        d.refused();
        assert_eq!((d.evicted_total(), d.refused_total()), (3, 1));
    }
}
