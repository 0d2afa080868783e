//! Scale-out: several gateways share the devices, each device polled by exactly one of them.
//!
//! ```text
//! member m ── retained advert ──> $nexus/gateway/<group>/members/<m>
//!              {"member", "incarnation", "alive", "seq", "polling": [...], "claims": [...]}
//!              repeated every `heartbeat`; the will says {"alive": false}
//! ```
//!
//! - **Who should poll a device**: rendezvous hashing over the live members, so a member
//!   joining or leaving moves only the devices it wins or held.
//! - **Handoff without overlap, and without a gap**: the member that wins a device claims
//!   it in its advert. The member polling it keeps polling until it sees that claim, then
//!   stops, waits until its poll task has ended, and only then advertises that it let it
//!   go. The claimer starts a device when the broker's echo of its claim arrives and no
//!   other member polls or claims it by then (every advert the broker ordered first has
//!   arrived); of two members claiming one device, the one ranked lower withdraws.
//! - **Fencing**: the echo of its own adverts is a member's lease, counted from when the
//!   echoed advert was sent (an echo read late, after the process was frozen, renews
//!   nothing). With no fresh echo for `lease` (broker gone, network split, process frozen)
//!   it polls nothing: each poll checks the lease before it reads, and the membership then
//!   stops every device. The others forget a member they have not heard for twice `lease`
//!   (or at once when its will arrives) and only then take its devices.
//! - Two crossing claims on a broker that routes publishes on several threads can still
//!   both start; each member then sees the other's `polling` at the next advert and the one
//!   ranked lower stops at once (`nexus_gateway_shard_conflicts_total`).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nexus_common::config::{Config, DeviceConfig, ShardConfig};
use nexus_common::metrics::{self, MetricError};
use nexus_common::mqtt::{self, ClientSettings, MqttHandle, QoS, Will};
use prometheus::{IntCounter, IntCounterVec, IntGauge, Registry};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::http::SharedDevices;

/// Most peers remembered; adverts of more are refused and counted.
pub const MAX_PEERS: usize = 1024;
/// Largest advert accepted (a member polling thousands of devices fits).
pub const MAX_ADVERT_BYTES: usize = 4 * 1024 * 1024;

/// Until when this member may poll: shared by the membership (which renews it) and every
/// poll task (which checks it before each read).
#[derive(Debug)]
pub struct Lease {
    base: Instant,
    /// Nanoseconds after `base`; 0: not held.
    until: AtomicU64,
}

impl Lease {
    pub fn new() -> Lease {
        Lease {
            base: Instant::now(),
            until: AtomicU64::new(0),
        }
    }

    fn set(&self, until: Option<Instant>) {
        let n = until.map_or(0, |t| {
            t.saturating_duration_since(self.base).as_nanos().max(1) as u64
        });
        self.until.store(n, Ordering::Release);
    }

    /// Whether polls may run now.
    pub fn holds(&self) -> bool {
        let until = self.until.load(Ordering::Acquire);
        until != 0 && (self.base.elapsed().as_nanos() as u64) < until
    }
}

impl Default for Lease {
    fn default() -> Self {
        Lease::new()
    }
}

/// Rank of `member` for `device`: the member with the highest rank polls it.
pub fn rank(member: &str, device: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(member.as_bytes());
    h.update([0]);
    h.update(device.as_bytes());
    let d = h.finalize();
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// The member that should poll `device` (highest rank; ties by name).
pub fn winner<'a>(members: impl IntoIterator<Item = &'a str>, device: &str) -> Option<&'a str> {
    members
        .into_iter()
        .max_by(|a, b| rank(a, device).cmp(&rank(b, device)).then(a.cmp(b)))
}

/// What a member says about itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Advert {
    pub member: String,
    /// Random per process: tells a restarted member's old adverts from its own.
    pub incarnation: u64,
    pub alive: bool,
    #[serde(default)]
    pub seq: u64,
    #[serde(default)]
    pub polling: Vec<String>,
    #[serde(default)]
    pub claims: Vec<String>,
}

#[derive(Debug)]
struct Peer {
    member: String,
    polling: HashSet<String>,
    claims: HashSet<String>,
    seen: Instant,
}

/// What the driver must do after a step.
#[derive(Debug, Default, PartialEq)]
pub struct Step {
    /// The owned set changed: apply it to the poll tasks (and wait for stopped ones).
    pub apply: bool,
    /// Publish the advert (after `apply` has finished).
    pub publish: bool,
}

/// Why a step changed the owned set (for metrics).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Changes {
    pub taken: u64,
    pub released: u64,
    pub fenced: u64,
    pub conflicts: u64,
}

/// The membership state machine, free of I/O (time is passed in).
#[derive(Debug)]
pub struct Shard {
    me: String,
    incarnation: u64,
    lease: Duration,
    settle: Duration,
    /// Keyed by (member, incarnation): an old incarnation of a member (or a second process
    /// misconfigured with the same name) blocks the devices it advertises, never more.
    peers: HashMap<(String, u64), Peer>,
    devices: Vec<String>,
    owned: BTreeSet<String>,
    claims: BTreeSet<String>,
    claim_seq: Option<u64>,
    claim_at: Instant,
    /// A peer's advert arrived (or a peer expired) since our claims were last sent.
    peers_changed: bool,
    seq: u64,
    /// When each recent advert was sent, to count the lease from there.
    sent: VecDeque<(u64, Instant)>,
    last_echo: Option<Instant>,
    live_since: Option<Instant>,
    pub changes: Changes,
    pub refused: u64,
}

impl Shard {
    pub fn new(me: String, incarnation: u64, cfg: &ShardConfig, now: Instant) -> Shard {
        Shard {
            me,
            incarnation,
            lease: cfg.lease,
            settle: cfg.settle,
            peers: HashMap::new(),
            devices: Vec::new(),
            owned: BTreeSet::new(),
            claims: BTreeSet::new(),
            claim_seq: None,
            claim_at: now,
            peers_changed: false,
            seq: 0,
            sent: VecDeque::new(),
            last_echo: None,
            live_since: None,
            changes: Changes::default(),
            refused: 0,
        }
    }

    /// The enabled devices of the group's device list.
    pub fn set_devices(&mut self, ids: Vec<String>) {
        self.devices = ids;
    }

    /// Until when polls may run (`None`: not now).
    pub fn lease_until(&self) -> Option<Instant> {
        self.last_echo.map(|t| t + self.lease)
    }

    pub fn owned(&self) -> &BTreeSet<String> {
        &self.owned
    }

    /// Live members, this one included.
    pub fn members(&self) -> BTreeSet<&str> {
        let mut m: BTreeSet<&str> = self.peers.values().map(|p| p.member.as_str()).collect();
        m.insert(&self.me);
        m
    }

    /// The next advert (numbered), about to be sent at `now`.
    pub fn advert(&mut self, now: Instant) -> Advert {
        self.seq += 1;
        if self.sent.len() >= 64 {
            self.sent.pop_front();
        }
        self.sent.push_back((self.seq, now));
        Advert {
            member: self.me.clone(),
            incarnation: self.incarnation,
            alive: true,
            seq: self.seq,
            polling: self.owned.iter().cloned().collect(),
            claims: self.claims.iter().cloned().collect(),
        }
    }

    /// The advert of a member that stopped (graceful shutdown; also the will).
    pub fn farewell(me: &str, incarnation: u64) -> Advert {
        Advert {
            member: me.to_owned(),
            incarnation,
            alive: false,
            seq: u64::MAX,
            polling: Vec::new(),
            claims: Vec::new(),
        }
    }

    fn desired(&self) -> BTreeSet<String> {
        let members = self.members();
        self.devices
            .iter()
            .filter(|d| winner(members.iter().copied(), d) == Some(self.me.as_str()))
            .cloned()
            .collect()
    }

    /// An advert arrived (ours echoed by the broker, or a peer's).
    pub fn on_advert(&mut self, a: Advert, now: Instant) -> Step {
        if a.member == self.me && a.incarnation == self.incarnation {
            let Some(&(_, sent)) = self.sent.iter().find(|(s, _)| *s == a.seq) else {
                return Step::default();
            };
            if now.saturating_duration_since(sent) < self.lease {
                if self.live_since.is_none() {
                    self.live_since = Some(now);
                }
                self.last_echo = Some(self.last_echo.map_or(sent, |t| t.max(sent)));
            }
            if self.claim_seq.is_some_and(|s| a.seq >= s) {
                return self.resolve_claims();
            }
            return Step::default();
        }
        let key = (a.member.clone(), a.incarnation);
        self.peers_changed = true;
        if !a.alive {
            self.peers.remove(&key);
            return Step::default();
        }
        if !self.peers.contains_key(&key) && self.peers.len() >= MAX_PEERS {
            self.refused += 1;
            return Step::default();
        }
        self.peers.insert(
            key,
            Peer {
                member: a.member,
                polling: a.polling.into_iter().collect(),
                claims: a.claims.into_iter().collect(),
                seen: now,
            },
        );
        Step::default()
    }

    /// An advert of ours carrying the claims came back: every advert the broker ordered
    /// before it has arrived. Start what no other member polls or claims; of two members
    /// claiming one device, the one ranked lower withdraws.
    fn resolve_claims(&mut self) -> Step {
        let desired = self.desired();
        let mut take = Vec::new();
        let mut withdrawn = false;
        for d in std::mem::take(&mut self.claims) {
            if !desired.contains(&d) {
                withdrawn = true;
                continue;
            }
            if self.peers.values().any(|p| p.polling.contains(&d)) {
                self.claims.insert(d); // wait for the holder to let go
                continue;
            }
            let rival = self
                .peers
                .iter()
                .filter(|(_, p)| p.claims.contains(&d))
                .map(|((m, inc), _)| (rank(m, &d), m.as_str(), *inc))
                .max();
            match rival {
                None => take.push(d),
                Some(r) if r > (rank(&self.me, &d), self.me.as_str(), self.incarnation) => {
                    withdrawn = true;
                }
                Some(_) => {
                    self.claims.insert(d);
                }
            }
        }
        self.claim_seq = None;
        self.changes.taken += take.len() as u64;
        let apply = !take.is_empty();
        self.owned.extend(take);
        Step {
            apply,
            publish: apply || withdrawn,
        }
    }

    /// Re-evaluate after any event or tick.
    pub fn step(&mut self, now: Instant) -> Step {
        let live = self
            .last_echo
            .is_some_and(|t| now.saturating_duration_since(t) < self.lease);
        if !live {
            // Fenced: the others will take our devices once they stop hearing from us.
            self.live_since = None;
            self.claims.clear();
            self.claim_seq = None;
            if self.owned.is_empty() {
                return Step::default();
            }
            self.changes.fenced += self.owned.len() as u64;
            self.owned.clear();
            return Step {
                apply: true,
                publish: true,
            };
        }
        let expiry = self.lease * 2;
        let before = self.peers.len();
        self.peers
            .retain(|_, p| now.saturating_duration_since(p.seen) < expiry);
        self.peers_changed |= self.peers.len() != before;
        if self
            .live_since
            .is_some_and(|t| now.saturating_duration_since(t) < self.settle)
        {
            return Step::default();
        }
        let desired = self.desired();
        let members = self.members();
        let mut step = Step::default();
        // Let go of a device once the member that wins it claims it (until then keep
        // polling: no gap while it settles), of a device gone from the list, and of what
        // another process also polls and outranks us for (crossing claims; a second
        // process under our name).
        let outranked = |d: &str| {
            let mine = (rank(&self.me, d), self.me.as_str(), self.incarnation);
            self.peers
                .iter()
                .any(|((m, inc), p)| p.polling.contains(d) && (rank(m, d), m.as_str(), *inc) > mine)
        };
        let claimed_by_winner = |d: &str| {
            winner(members.iter().copied(), d).is_some_and(|w| {
                self.peers
                    .values()
                    .any(|p| p.member == w && p.claims.contains(d))
            })
        };
        let release: Vec<String> = self
            .owned
            .iter()
            .filter(|d| {
                !self.devices.contains(*d)
                    || (!desired.contains(*d) && claimed_by_winner(d))
                    || outranked(d)
            })
            .cloned()
            .collect();
        drop(members);
        if !release.is_empty() {
            for d in &release {
                if desired.contains(d) {
                    self.changes.conflicts += 1;
                }
                self.owned.remove(d);
            }
            self.changes.released += release.len() as u64;
            step.apply = true;
            step.publish = true;
        }
        if self.claim_seq.is_some() {
            if now.saturating_duration_since(self.claim_at) >= self.lease {
                // The echo never came: ask again.
                self.claim_seq = None;
            } else {
                return step;
            }
        }
        let before = self.claims.len();
        self.claims.retain(|d| desired.contains(d));
        let withdrew = self.claims.len() != before;
        let new: Vec<String> = desired
            .iter()
            .filter(|d| !self.owned.contains(*d) && !self.claims.contains(*d))
            .cloned()
            .collect();
        let fresh = !new.is_empty();
        self.claims.extend(new);
        if !self.claims.is_empty() && (fresh || self.peers_changed) {
            // The advert about to be published carries the claims; its echo resolves them.
            self.peers_changed = false;
            self.claim_seq = Some(self.seq + 1);
            self.claim_at = now;
            step.publish = true;
        }
        step.publish |= withdrew;
        step
    }
}

#[derive(Clone)]
pub struct ShardMetrics {
    members: IntGauge,
    owned: IntGauge,
    handoffs: IntCounterVec,
    fenced: IntCounter,
    conflicts: IntCounter,
    refused: IntCounterVec,
}

impl ShardMetrics {
    pub fn new(r: &Registry) -> Result<ShardMetrics, MetricError> {
        let handoffs = metrics::counter_vec(
            r,
            "nexus_gateway_shard_handoffs_total",
            "Devices this member took over or let go of",
            &["direction"],
        )?;
        let refused = metrics::counter_vec(
            r,
            "nexus_gateway_shard_adverts_refused_total",
            "Member adverts ignored, by reason (bad, too_large, too_many_members)",
            &["reason"],
        )?;
        for d in ["taken", "released"] {
            handoffs.with_label_values(&[d]);
        }
        for r in ["bad", "too_large", "too_many_members"] {
            refused.with_label_values(&[r]);
        }
        Ok(ShardMetrics {
            members: metrics::gauge(
                r,
                "nexus_gateway_shard_members",
                "Live gateways of this group, this one included",
            )?,
            owned: metrics::gauge(
                r,
                "nexus_gateway_shard_devices",
                "Devices this member polls",
            )?,
            handoffs,
            fenced: metrics::counter(
                r,
                "nexus_gateway_shard_fenced_total",
                "Devices this member stopped polling because the broker stopped echoing its adverts",
            )?,
            conflicts: metrics::counter(
                r,
                "nexus_gateway_shard_conflicts_total",
                "Devices found polled by another member too, and let go of",
            )?,
            refused,
        })
    }

    fn record(&self, shard: &mut Shard) {
        let c = std::mem::take(&mut shard.changes);
        self.handoffs.with_label_values(&["taken"]).inc_by(c.taken);
        self.handoffs
            .with_label_values(&["released"])
            .inc_by(c.released + c.fenced);
        self.fenced.inc_by(c.fenced);
        self.conflicts.inc_by(c.conflicts);
        let refused = std::mem::take(&mut shard.refused);
        self.refused
            .with_label_values(&["too_many_members"])
            .inc_by(refused);
        self.members.set(shard.members().len() as i64);
        self.owned.set(shard.owned().len() as i64);
    }
}

/// This member's name: `gateway.shard.member`, else `telemetry.instance`.
pub fn member_name(cfg: &Config) -> anyhow::Result<String> {
    crate::named_or_instance(
        cfg,
        cfg.gateway.shard.member.as_deref(),
        "gateway.shard.member",
        "member name",
    )
}

/// `$nexus/gateway/<group>/members/<member>`.
pub fn advert_topic(group: &str, member: &str) -> String {
    format!("$nexus/gateway/{group}/members/{member}")
}

/// Run the membership until `shutdown`; polls only the devices this member owns. `devices`
/// carries the whole device list (initial and reloaded).
pub async fn run(
    cfg: Arc<Config>,
    lease: Arc<Lease>,
    set: SharedDevices,
    mut devices: watch::Receiver<Vec<DeviceConfig>>,
    metrics: ShardMetrics,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let sc = cfg.gateway.shard.clone();
    let me = member_name(&cfg)?;
    let incarnation: u64 = rand::random();
    let topic = advert_topic(&sc.group, &me);
    let farewell = serde_json::to_vec(&Shard::farewell(&me, incarnation))?;
    let mut settings =
        ClientSettings::new(format!("{}-gateway-shard-{me}", cfg.mqtt.client_id_prefix));
    settings.will = Some(Will {
        topic: topic.clone(),
        payload: farewell.clone().into(),
        qos: QoS::AtLeastOnce,
        retain: true,
    });
    settings.subscriptions = vec![(
        format!("$nexus/gateway/{}/members/+", sc.group),
        QoS::AtLeastOnce,
    )];
    let mut mcfg = cfg.mqtt.clone();
    mcfg.persistent_session = false;
    let client_stop = CancellationToken::new();
    let (client, mut rx) = mqtt::connect(&mcfg, settings, None, client_stop.clone())?;
    let mut connected = client.connected();
    let mut shard = Shard::new(me.clone(), incarnation, &sc, Instant::now());
    let mut configs: Vec<DeviceConfig> = devices.borrow_and_update().clone();
    shard.set_devices(enabled_ids(&configs));
    let mut tick =
        tokio::time::interval(sc.heartbeat.min(sc.settle.max(Duration::from_millis(100))));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_publish = Instant::now() - sc.heartbeat;
    let mut list_open = true;
    tracing::info!(member = %me, group = %sc.group, "gateway shard member starting");
    loop {
        let mut publish = false;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                let payload = msg.payload();
                if payload.len() > MAX_ADVERT_BYTES {
                    metrics.refused.with_label_values(&["too_large"]).inc();
                } else if payload.is_empty() {
                    // A cleared retained advert: nothing to learn.
                } else {
                    match serde_json::from_slice::<Advert>(payload) {
                        Ok(a) if msg.topic() == Some(advert_topic(&sc.group, &a.member).as_str()) => {
                            let s = shard.on_advert(a, Instant::now());
                            lease.set(shard.lease_until());
                            if s.apply {
                                apply(&set, &configs, shard.owned()).await;
                            }
                            publish |= s.publish;
                        }
                        Ok(_) | Err(_) => metrics.refused.with_label_values(&["bad"]).inc(),
                    }
                }
            }
            r = devices.changed(), if list_open => {
                if r.is_err() {
                    // Nobody reloads the device list (no file watcher): it stays as it is.
                    list_open = false;
                    continue;
                }
                configs = devices.borrow_and_update().clone();
                shard.set_devices(enabled_ids(&configs));
                // Changed settings of owned devices apply now.
                apply(&set, &configs, shard.owned()).await;
            }
            r = connected.changed() => {
                if r.is_err() { break }
                // Say at once that we are here, so the others count us.
                publish |= *connected.borrow_and_update();
            }
            _ = tick.tick() => {
                publish |= last_publish.elapsed() >= sc.heartbeat;
            }
        }
        let s = shard.step(Instant::now());
        lease.set(shard.lease_until());
        if s.apply {
            apply(&set, &configs, shard.owned()).await;
        }
        if (publish || s.publish) && client.is_connected() {
            let advert = shard.advert(Instant::now());
            send(&client, &topic, &advert).await;
            last_publish = Instant::now();
        }
        metrics.record(&mut shard);
    }
    lease.set(None);
    // Stop polling, then say so, so the others take over without waiting for the lease.
    let owned_before = shard.owned().len();
    apply(&set, &configs, &BTreeSet::new()).await;
    if client.is_connected() {
        let _ = client
            .publish(&topic, farewell, QoS::AtLeastOnce, true)
            .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        client.disconnect().await;
    }
    client_stop.cancel();
    tracing::info!(member = %me, devices = owned_before, "gateway shard member left");
    Ok(())
}

fn enabled_ids(configs: &[DeviceConfig]) -> Vec<String> {
    configs
        .iter()
        .filter(|d| d.enabled)
        .map(|d| d.id.to_string())
        .collect()
}

/// Poll exactly `owned`: stop the rest and wait until their tasks have ended.
async fn apply(set: &SharedDevices, configs: &[DeviceConfig], owned: &BTreeSet<String>) {
    let mine: Vec<DeviceConfig> = configs
        .iter()
        .filter(|d| owned.contains(d.id.as_str()))
        .cloned()
        .collect();
    let stopping: Vec<JoinHandle<()>> = {
        let mut s = set.lock().unwrap_or_else(|e| e.into_inner());
        s.apply(&mine).stopping
    };
    for t in stopping {
        let _ = t.await;
    }
}

async fn send(client: &MqttHandle, topic: &str, advert: &Advert) {
    match serde_json::to_vec(advert) {
        Ok(body) => {
            if let Err(e) = client.publish(topic, body, QoS::AtLeastOnce, true).await {
                tracing::warn!(error = %e, "cannot publish the shard advert");
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot encode the shard advert"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ShardConfig {
        ShardConfig {
            enabled: true,
            lease: Duration::from_secs(10),
            settle: Duration::from_secs(1),
            ..ShardConfig::default()
        }
    }

    /// A live peer's advert.
    fn adv(member: &str, incarnation: u64, polling: Vec<String>, claims: Vec<String>) -> Advert {
        Advert {
            member: member.into(),
            incarnation,
            alive: true,
            seq: 1,
            polling,
            claims,
        }
    }

    fn devices(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("dev-{i}")).collect()
    }

    /// A member that has heard its own echo long enough ago to be settled.
    fn settled(me: &str, n: usize, t0: Instant) -> Shard {
        let mut s = Shard::new(me.into(), 1, &cfg(), t0);
        s.set_devices(devices(n));
        let a = s.advert(t0);
        s.on_advert(a, t0);
        s
    }

    /// A settled member alone, polling all `n` devices at the time returned.
    fn owning_all(me: &str, n: usize) -> (Shard, Instant) {
        let t0 = Instant::now();
        let mut s = settled(me, n, t0);
        let t1 = t0 + Duration::from_secs(2);
        s.step(t1);
        echo(&mut s, t1);
        assert_eq!(s.owned().len(), n);
        (s, t1)
    }

    fn echo(s: &mut Shard, now: Instant) -> Step {
        let a = s.advert(now);
        s.on_advert(a, now)
    }

    #[test]
    fn rendezvous_moves_only_what_it_must() {
        let ids = devices(1000);
        let three = ["a", "b", "c"];
        let four = ["a", "b", "c", "d"];
        let mut moved = 0;
        let mut counts = HashMap::new();
        for d in &ids {
            let w3 = winner(three, d).unwrap();
            let w4 = winner(four, d).unwrap();
            *counts.entry(w3).or_insert(0) += 1;
            if w3 != w4 {
                assert_eq!(w4, "d", "{d} moved between old members");
                moved += 1;
            }
        }
        // About a quarter moves to the new member; the shares are balanced.
        assert!((150..350).contains(&moved), "moved {moved}");
        for (m, c) in counts {
            assert!((250..420).contains(&c), "{m} owns {c}");
        }
    }

    #[test]
    fn alone_it_takes_everything_after_settling_and_its_echo() {
        let t0 = Instant::now();
        let mut s = settled("a", 5, t0);
        assert_eq!(s.step(t0), Step::default(), "still settling");
        let t1 = t0 + Duration::from_secs(2);
        let st = s.step(t1);
        assert!(st.publish && !st.apply, "a claim is published first");
        assert!(s.owned().is_empty());
        let st = echo(&mut s, t1);
        assert!(st.apply);
        assert_eq!(s.owned().len(), 5);
    }

    #[test]
    fn a_device_another_member_polls_is_not_started_until_released() {
        let t0 = Instant::now();
        let mut s = settled("b", 50, t0);
        // "a" polls every device and is alive.
        let peer = |polling: Vec<String>| adv("a", 7, polling, vec![]);
        s.on_advert(peer(devices(50)), t0);
        let t1 = t0 + Duration::from_secs(2);
        let b_wins: BTreeSet<String> = devices(50)
            .into_iter()
            .filter(|d| winner(["a", "b"], d) == Some("b"))
            .collect();
        assert!(!b_wins.is_empty());
        assert!(s.step(t1).publish, "b claims what it wins");
        assert_eq!(s.claims, b_wins);
        let st = echo(&mut s, t1);
        assert!(!st.apply, "a still polls them");
        assert!(s.owned().is_empty());
        assert_eq!(s.claims, b_wins, "the claims stand");
        // "a" lets go of what "b" claimed; b claims again and its echo starts them.
        let a_keeps: Vec<String> = devices(50)
            .into_iter()
            .filter(|d| !b_wins.contains(d))
            .collect();
        s.on_advert(peer(a_keeps), t1);
        assert!(s.step(t1).publish);
        assert!(echo(&mut s, t1).apply);
        assert_eq!(s.owned(), &b_wins, "exactly what b wins");
        assert!(s.claims.is_empty());
    }

    #[test]
    fn a_holder_polls_on_until_the_winner_claims() {
        let (mut s, t1) = owning_all("a", 40);
        let joiner = |claims: Vec<String>| adv("b", 9, vec![], claims);
        // b joined and is settling: a keeps everything.
        s.on_advert(joiner(vec![]), t1);
        let st = s.step(t1);
        assert!(!st.apply);
        assert_eq!(s.owned().len(), 40);
        // b claims what it wins: a lets exactly those go.
        let b_wins: Vec<String> = devices(40)
            .into_iter()
            .filter(|d| winner(["a", "b"], d) == Some("b"))
            .collect();
        s.on_advert(joiner(b_wins.clone()), t1);
        let st = s.step(t1);
        assert!(st.apply && st.publish);
        assert_eq!(s.owned().len(), 40 - b_wins.len());
        assert!(b_wins.iter().all(|d| !s.owned().contains(d)));
        assert_eq!(s.changes.released, b_wins.len() as u64);
    }

    #[test]
    fn a_claim_ordered_before_ours_wins() {
        let t0 = Instant::now();
        let mut s = settled("b", 20, t0);
        let t1 = t0 + Duration::from_secs(2);
        assert!(s.step(t1).publish);
        let claimed = s.claims.clone();
        // "a" claims the same devices, and the broker delivered it before our echo.
        s.on_advert(adv("a", 3, vec![], claimed.iter().cloned().collect()), t1);
        let st = echo(&mut s, t1);
        assert!(!st.apply);
        assert!(s.owned().is_empty(), "a claimed first");
    }

    #[test]
    fn without_echo_it_stops_polling_before_the_others_take_over() {
        let (mut s, t1) = owning_all("a", 5);
        // No echo for a lease: fenced.
        let st = s.step(t1 + Duration::from_secs(10));
        assert!(st.apply);
        assert!(s.owned().is_empty());
        assert_eq!(s.changes.fenced, 5);
    }

    #[test]
    fn an_echo_read_late_renews_nothing() {
        let (mut s, t1) = owning_all("a", 5);
        // Sent just before the process froze; read when it woke 30 s later.
        let stale = s.advert(t1);
        let woke = t1 + Duration::from_secs(30);
        s.on_advert(stale, woke);
        assert!(s.lease_until().unwrap() < woke);
        assert!(s.step(woke).apply);
        assert!(s.owned().is_empty(), "fenced, not renewed");
    }

    #[test]
    fn the_lease_is_shared_with_the_pollers() {
        let l = Lease::new();
        assert!(!l.holds());
        l.set(Some(Instant::now() + Duration::from_secs(5)));
        assert!(l.holds());
        l.set(Some(Instant::now() - Duration::from_millis(1)));
        assert!(!l.holds());
        l.set(None);
        assert!(!l.holds());
    }

    #[test]
    fn a_silent_peer_is_forgotten_after_two_leases_and_a_farewell_at_once() {
        let t0 = Instant::now();
        let mut s = settled("b", 10, t0);
        s.on_advert(adv("a", 1, devices(10), vec![]), t0);
        // Keep our own lease alive while time passes.
        let t1 = t0 + Duration::from_secs(19);
        echo(&mut s, t1);
        s.step(t1);
        assert_eq!(s.members().len(), 2);
        let t2 = t0 + Duration::from_secs(21);
        echo(&mut s, t2);
        s.step(t2);
        assert_eq!(s.members().len(), 1, "expired");
        s.on_advert(adv("c", 1, vec![], vec![]), t2);
        assert_eq!(s.members().len(), 2);
        s.on_advert(Shard::farewell("c", 1), t2);
        assert_eq!(s.members().len(), 1);
    }

    #[test]
    fn a_second_process_under_the_same_name_is_resolved_by_incarnation() {
        let (mut s, t1) = owning_all("a", 30);
        // Another "a" (incarnation 2 outranks our 1) polls everything too.
        s.on_advert(adv("a", 2, devices(30), vec![]), t1);
        let st = s.step(t1);
        assert!(st.apply && st.publish);
        assert!(s.owned().is_empty());
        assert_eq!(s.changes.conflicts, 30);
        // And it is not claimed back while the other advertises it.
        assert!(!s.step(t1).publish);
    }

    #[test]
    fn peers_are_bounded() {
        let t0 = Instant::now();
        let mut s = settled("a", 1, t0);
        for i in 0..MAX_PEERS + 10 {
            s.on_advert(adv(&format!("m{i}"), 1, vec![], vec![]), t0);
        }
        assert_eq!(s.peers.len(), MAX_PEERS);
        assert_eq!(s.refused, 10);
    }
}
