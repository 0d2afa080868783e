//! The whole chain, device to historian, under faults: a Modbus device that answers every read
//! with a new number and records each one it hands out; `nexus broker`, `nexus gateway` and
//! `nexus ingest` as separate processes; the broker, the gateway and ingestion killed with
//! SIGKILL several times while numbers flow, and PostgreSQL stopped once. Every number the device handed out
//! must be in the historian exactly once. The only loss allowed is a read in flight at the
//! instant the gateway dies (answered by the device, not yet in the gateway's live log): each
//! such number must have been handed out just before a gateway kill, and they are counted.
//!
//! The first gateway kill comes while the broker is stalled (SIGSTOP): the values read during
//! the stall were handed to the broker's socket but never acknowledged. One broker kill comes
//! while ingestion is down: what the broker acknowledged and queued for ingestion's session is
//! only in its durable state then.
//!
//! A second test kills the command handler with a write in flight, and the alert service with
//! an excursion under way, each several times, as their own processes.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nexus_common::mqtt::{self, ClientSettings, Message, MqttHandle, QoS};
use nexus_common::testing::{self, free_port, PgServer, OPERATOR_USER, SERVICE_USER};
use nexus_devices::simulator::modbus::ModbusSimulator;
use tokio::sync::mpsc::Receiver;
use tokio_util::sync::CancellationToken;

const NEXUS: &str = env!("CARGO_BIN_EXE_nexus");
/// The counter's holding registers (a uint32, big-endian words).
const COUNTER: usize = 100;
/// The variables holding the service account's and the operator's passwords for the broker
/// process.
const PW_ENV: &str = "NEXUS_CHAIN_TEST_SVC_PW";
const OP_PW_ENV: &str = "NEXUS_CHAIN_TEST_OP_PW";

/// One `nexus <service>` process, restartable.
struct Service {
    name: &'static str,
    config: PathBuf,
    http: u16,
    ready_path: &'static str,
    child: Option<Child>,
}

impl Service {
    fn new(name: &'static str, config: &Path, http: u16, ready_path: &'static str) -> Service {
        Service {
            name,
            config: config.to_path_buf(),
            http,
            ready_path,
            child: None,
        }
    }

    fn spawn(&mut self) {
        self.child = Some(
            Command::new(NEXUS)
                .args([self.name, "--config"])
                .arg(&self.config)
                // Defaults relative to the working directory land in the test's own.
                .current_dir(self.config.parent().unwrap())
                .env(PW_ENV, SERVICE_USER.1)
                .env(OP_PW_ENV, OPERATOR_USER.1)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        );
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status();
        }
    }

    /// SIGTERM and wait: the service drains as it does at a normal stop.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    async fn ready(&self, limit: Duration) {
        let start = Instant::now();
        while testing::http(self.http, "GET", self.ready_path, "").0 != 200 {
            assert!(
                start.elapsed() < limit,
                "nexus {} not ready in {limit:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The sum of every series of a metric.
    fn metric_sum(&self, name: &str) -> f64 {
        let (_, text) = testing::http(self.http, "GET", "/metrics", "");
        text.lines()
            .filter(|l| {
                l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{' | b' '))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// What the device handed out: each number and when.
type Handed = Arc<Mutex<Vec<(u32, Instant)>>>;

/// A Modbus device whose counter (HR 100-101) moves on after every read of it, recording
/// each number it answered with.
async fn counting_device() -> (ModbusSimulator, Handed) {
    let sim = ModbusSimulator::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    let handed: Handed = Arc::default();
    let log = handed.clone();
    {
        let mut r = sim.registers.lock().unwrap();
        r.holding[COUNTER] = 0;
        r.holding[COUNTER + 1] = 1;
        r.after_request = Some(Box::new(move |fc, regs| {
            if fc != 3 {
                return;
            }
            let n = (u32::from(regs.holding[COUNTER]) << 16) | u32::from(regs.holding[COUNTER + 1]);
            log.lock().unwrap().push((n, Instant::now()));
            let next = n + 1;
            regs.holding[COUNTER] = (next >> 16) as u16;
            regs.holding[COUNTER + 1] = next as u16;
        }));
    }
    (sim, handed)
}

/// The `devices:` section polling the counting device on `port` every 20 ms.
fn counter_device_yaml(port: u16) -> String {
    format!(
        "devices:\n  - id: counter\n    protocol: modbus\n    uns_prefix: chain/site/area/line\n    poll_interval: 20ms\n    \
         connection: {{ host: 127.0.0.1, port: {port}, timeout: 2s }}\n    tags:\n      - {{ id: n, address: \"HR:{COUNTER}\", data_type: uint32 }}\n"
    )
}

async fn stored_numbers(url: &str) -> Result<(i64, BTreeSet<u32>), tokio_postgres::Error> {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let rows = c
        .query(
            // Good readings only: when the device goes away the gateway publishes its last
            // value again with a bad quality.
            "SELECT p.value FROM points p JOIN tags t ON t.id = p.tag_id \
             WHERE t.topic = 'chain/site/area/line/counter/n' AND (p.quality & 192) = 192",
            &[],
        )
        .await?;
    let values: Vec<f64> = rows.iter().map(|r| r.get::<_, f64>(0)).collect();
    Ok((
        values.len() as i64,
        values.into_iter().map(|v| v as u32).collect(),
    ))
}

/// Where the end of a chain run is looked at.
struct Ends {
    ingest_http: u16,
    broker_http: u16,
    /// `nexus_gateway_unacked_points` just before the gateway's last stop (it is started
    /// once more to replay them).
    unacked_at_stop: f64,
}

/// Wait until the historian has drained, then check that every number the device handed out
/// is stored exactly once, except reads within 500 ms before one of `kills` (of the process
/// polling the device), which are counted.
async fn check_every_number(
    url: &str,
    handed: &Handed,
    kills: &[Instant],
    t0: Instant,
    mut events: Vec<(Instant, &str)>,
    faults: &str,
    end: &Ends,
) {
    let pause = |ms| tokio::time::sleep(Duration::from_millis(ms));
    let total = handed.lock().unwrap().len();
    assert!(total > 500, "the device handed out only {total} numbers");
    // Drained: everything is there, or nothing more arrived for 5 s.
    let start = Instant::now();
    let (mut last, mut since) = (0, Instant::now());
    let (rows, stored) = loop {
        let got = stored_numbers(url).await;
        let n = got.as_ref().map_or(0, |(_, s)| s.len());
        if n != last {
            (last, since) = (n, Instant::now());
        }
        let settled = n >= total || since.elapsed() > Duration::from_secs(5);
        if (got.is_ok() && settled) || start.elapsed() > Duration::from_secs(60) {
            break got.unwrap();
        }
        pause(250).await;
    };
    let handed = handed.lock().unwrap().clone();
    let numbers: BTreeSet<u32> = handed.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        numbers.len(),
        handed.len(),
        "the device handed out each number once"
    );
    let unknown: Vec<&u32> = stored.difference(&numbers).collect();
    assert!(
        unknown.is_empty(),
        "stored numbers the device never handed out: {unknown:?}"
    );
    if rows != stored.len() as i64 {
        let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let twice = c
            .query(
                "SELECT p.value, array_agg((extract(epoch from p.time) * 1000)::bigint ORDER BY p.time) FROM points p \
                 JOIN tags t ON t.id = p.tag_id WHERE t.topic = 'chain/site/area/line/counter/n' \
                 AND (p.quality & 192) = 192 GROUP BY p.value HAVING count(*) > 1 ORDER BY p.value LIMIT 20",
                &[],
            )
            .await
            .unwrap();
        let twice: Vec<(f64, Vec<i64>)> = twice.iter().map(|r| (r.get(0), r.get(1))).collect();
        panic!(
            "{} rows for {} numbers: stored twice (value, times in ms): {twice:?}",
            rows,
            stored.len()
        );
    }
    // Missing numbers: each must have been read just before a kill (the read in flight when
    // the gateway died).
    let mut in_flight = 0;
    let mut unexplained = Vec::new();
    for (n, at) in &handed {
        if stored.contains(n) {
            continue;
        }
        let near_kill = kills
            .iter()
            .any(|k| *at <= *k && k.duration_since(*at) < Duration::from_millis(500));
        if near_kill {
            in_flight += 1;
        } else {
            unexplained.push(*n);
        }
    }
    eprintln!(
        "chain: the device handed out {total} numbers; stored {}; lost as reads in flight at {} kills of the polling process: {in_flight}; {faults}",
        stored.len(),
        kills.len(),
    );
    let metric = |port: u16, name: &str| {
        let (_, text) = testing::http(port, "GET", "/metrics", "");
        text.lines()
            .filter(|l| l.starts_with(name))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    if !unexplained.is_empty() {
        for k in kills {
            events.push((*k, "polling process killed"));
        }
        events.sort_by_key(|e| e.0);
        let when: Vec<String> = unexplained
            .iter()
            .take(20)
            .map(|n| {
                let at = handed
                    .iter()
                    .find(|(m, _)| m == n)
                    .map_or(t0, |(_, at)| *at);
                format!("{n} at {:.3} s", at.duration_since(t0).as_secs_f64())
            })
            .collect();
        let events: Vec<String> = events
            .iter()
            .map(|(at, what)| format!("{what} at {:.3} s", at.duration_since(t0).as_secs_f64()))
            .collect();
        // The rows stored around the first lost number's read, by time.
        let first = unexplained[0];
        let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let rows = c
            .query(
                "SELECT (extract(epoch from p.time) * 1000)::bigint, p.value FROM points p JOIN tags t ON t.id = p.tag_id \
                 WHERE t.topic = 'chain/site/area/line/counter/n' AND p.value BETWEEN $1 AND $2 ORDER BY p.time",
                &[&(f64::from(first) - 3.0), &(f64::from(first) + 3.0)],
            )
            .await
            .unwrap();
        let near: Vec<(i64, f64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        panic!(
            "{} numbers lost that were not in flight at a kill: {when:?}; events: {events:?}; stored near {first}: {near:?}; \
             gateway values unacknowledged at its last stop: {}; ingestion: {:?} {:?}; broker: {:?}",
            unexplained.len(),
            end.unacked_at_stop,
            metric(end.ingest_http, "nexus_ingest_points_duplicate_total"),
            metric(end.ingest_http, "nexus_ingest_rejected_total"),
            metric(end.broker_http, "nexus_broker_messages_dropped_total{"),
        );
    }
    let rejected: Vec<String> = metric(end.ingest_http, "nexus_ingest_rejected_total")
        .into_iter()
        .filter(|l| !l.ends_with(" 0"))
        .collect();
    assert!(
        rejected.is_empty(),
        "ingestion rejected values: {rejected:?}"
    );
    // Two readings of the counter never share a timestamp (the historian would keep one).
    let conflicts = metric(end.ingest_http, "nexus_ingest_points_conflict_total");
    assert!(
        !conflicts.is_empty() && conflicts.iter().all(|l| l.ends_with(" 0")),
        "values with the time of another: {conflicts:?}"
    );
    // A kill loses at most the reads between the device's answer and the fsync.
    assert!(
        in_flight <= 3 * kills.len(),
        "{in_flight} reads lost at {} kills",
        kills.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_number_a_device_hands_out_is_stored_once_across_kills_and_a_database_stop() {
    let mut pg = PgServer::start();
    let url = pg.create_database("chain").await;
    let (sim, handed) = counting_device().await;
    let dir = tempfile::tempdir().unwrap();
    let (mqtt, broker_http, gw_http, ing_http) =
        (free_port(), free_port(), free_port(), free_port());
    let config = dir.path().join("nexus.yaml");
    std::fs::write(
        &config,
        format!(
            "mqtt: {{ host: 127.0.0.1, port: {mqtt}, username: {user}, password: {pw}, reconnect_min: 50ms, reconnect_max: 500ms }}\n\
             broker: {{ bind: 127.0.0.1, port: {mqtt}, ws_port: null, state_dir: {state} }}\n\
             orchestrator: {{ http_listen: \"127.0.0.1:{broker_http}\" }}\n\
             auth:\n  users:\n    - {{ username: {user}, password_env: {PW_ENV}, role: service }}\n\
             telemetry: {{ instance: chain, log_level: warn }}\n\
             database: {{ url: \"{url}\" }}\n\
             gateway:\n  http_listen: \"127.0.0.1:{gw_http}\"\n  commands: false\n  buffer: {{ dir: {buffer} }}\n\
             ingestion:\n  http_listen: \"127.0.0.1:{ing_http}\"\n  wal_dir: {wal}\n\
             {devices}",
            user = SERVICE_USER.0,
            pw = SERVICE_USER.1,
            buffer = dir.path().join("buffer").display(),
            wal = dir.path().join("wal").display(),
            state = dir.path().join("broker").display(),
            devices = counter_device_yaml(sim.addr.port()),
        ),
    )
    .unwrap();
    let mut broker = Service::new("broker", &config, broker_http, "/readyz");
    let mut ingest = Service::new("ingest", &config, ing_http, "/readyz");
    let mut gateway = Service::new("gateway", &config, gw_http, "/healthz");
    broker.spawn();
    broker.ready(Duration::from_secs(30)).await;
    ingest.spawn();
    ingest.ready(Duration::from_secs(30)).await;
    gateway.spawn();
    gateway.ready(Duration::from_secs(30)).await;

    let mut gateway_kills = Vec::new();
    let mut ingest_kills = 0;
    let mut broker_kills = 0;
    // What happened when, for the report of a loss.
    let t0 = Instant::now();
    let mut events: Vec<(Instant, &str)> = Vec::new();
    let pause = |ms| tokio::time::sleep(Duration::from_millis(ms));
    pause(2000).await;
    for round in 0..3 {
        if round == 0 {
            // The broker stalls (SIGSTOP) and the gateway dies meanwhile: the values it read
            // during the stall were never acknowledged, only its live log has them.
            broker.signal("-STOP");
            pause(1000).await;
            gateway.kill9();
            gateway_kills.push(Instant::now());
            broker.signal("-CONT");
        } else {
            gateway.kill9();
            gateway_kills.push(Instant::now());
        }
        pause(300 + 400 * round).await;
        gateway.spawn();
        pause(1500).await;
        ingest.kill9();
        ingest_kills += 1;
        events.push((Instant::now(), "ingestion killed"));
        pause(500).await;
        if round == 1 {
            // The broker dies while it holds what it queued for the dead ingestion.
            broker.kill9();
            broker_kills += 1;
            events.push((Instant::now(), "broker killed (ingestion down)"));
            pause(300).await;
            broker.spawn();
            events.push((Instant::now(), "broker started"));
            pause(500).await;
        }
        ingest.spawn();
        pause(1500).await;
        // The broker dies with everything flowing through it.
        broker.kill9();
        broker_kills += 1;
        events.push((Instant::now(), "broker killed"));
        pause(200 + 300 * round).await;
        broker.spawn();
        events.push((Instant::now(), "broker started"));
        pause(1500).await;
        if round == 1 {
            // The database away for 5 s: ingestion keeps acking into its WAL.
            events.push((Instant::now(), "database stopped"));
            pg.stop();
            pause(5000).await;
            pg.restart();
            events.push((Instant::now(), "database back"));
            pause(1000).await;
        }
    }
    pause(1000).await;
    // The end: the device goes away (nothing more is handed out) and the gateway stops as
    // usual. What the broker had not acknowledged by then stays in its live log, which its
    // next start replays: it starts once more to drain it.
    sim.stop();
    pause(500).await;
    let unacked = gateway.metric_sum("nexus_gateway_unacked_points");
    gateway.stop();
    gateway.spawn();
    gateway.ready(Duration::from_secs(30)).await;
    let drained = Instant::now();
    while gateway.metric_sum("nexus_gateway_unacked_points")
        + gateway.metric_sum("nexus_gateway_buffer_points")
        > 0.0
        && drained.elapsed() < Duration::from_secs(20)
    {
        pause(100).await;
    }
    let faults = format!(
        "{ingest_kills} ingestion kills, {broker_kills} broker kills and a 5 s database stop"
    );
    let end = Ends {
        ingest_http: ing_http,
        broker_http,
        unacked_at_stop: unacked,
    };
    check_every_number(&url, &handed, &gateway_kills, t0, events, &faults, &end).await;
    gateway.stop();
    broker.stop();
    ingest.stop();
}

async fn client(port: u16, user: (&str, &str), subs: &[&str]) -> (MqttHandle, Receiver<Message>) {
    let mut c = testing::mqtt_config(port);
    c.username = Some(user.0.into());
    c.password = Some(nexus_common::config::Secret::new(user.1.to_owned()));
    c.persistent_session = false;
    let mut s = ClientSettings::new(testing::unique(user.0));
    s.subscriptions = subs
        .iter()
        .map(|f| (f.to_string(), QoS::AtLeastOnce))
        .collect();
    let (h, rx) = mqtt::connect(&c, s, None, CancellationToken::new()).unwrap();
    h.wait_connected(Duration::from_secs(10)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    (h, rx)
}

/// The next message on `topic` whose JSON has `key` = `want`, within `limit`.
async fn next_with(
    rx: &mut Receiver<Message>,
    topic_prefix: &str,
    key: &str,
    want: &str,
    limit: Duration,
) -> Option<serde_json::Value> {
    let end = tokio::time::Instant::now() + limit;
    loop {
        let m = tokio::time::timeout_at(end, rx.recv()).await.ok()??;
        if !m.topic().is_some_and(|t| t.starts_with(topic_prefix)) {
            continue;
        }
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(m.payload()) else {
            continue;
        };
        if v[key].as_str() == Some(want) {
            return Some(v);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_and_an_excursion_survive_kills_of_their_services() {
    let sim = ModbusSimulator::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    // Every write of the setpoint (HR 10), as the device saw it.
    let writes: Arc<Mutex<Vec<u16>>> = Arc::default();
    {
        let w = writes.clone();
        sim.registers.lock().unwrap().after_request = Some(Box::new(move |fc, regs| {
            if matches!(fc, 6 | 16 | 22) {
                w.lock().unwrap().push(regs.holding[10]);
            }
        }));
    }
    let dir = tempfile::tempdir().unwrap();
    let (port, broker_http, cmd_http, alert_http) =
        (free_port(), free_port(), free_port(), free_port());
    let config = dir.path().join("nexus.yaml");
    std::fs::write(
        &config,
        format!(
            "mqtt: {{ host: 127.0.0.1, port: {port}, username: {svc}, password: {svc_pw}, reconnect_min: 50ms, reconnect_max: 500ms }}\n\
             broker: {{ bind: 127.0.0.1, port: {port}, ws_port: null }}\n\
             orchestrator: {{ http_listen: \"127.0.0.1:{broker_http}\" }}\n\
             auth:\n  users:\n    - {{ username: {svc}, password_env: {PW_ENV}, role: service }}\n    - {{ username: {op}, password_env: {OP_PW_ENV}, role: operator }}\n\
             telemetry: {{ instance: chain-svc, log_level: warn }}\n\
             commands: {{ http_listen: \"127.0.0.1:{cmd_http}\", journal_dir: {journal}, ttl: 60s }}\n\
             alerts:\n  http_listen: \"127.0.0.1:{alert_http}\"\n  state_dir: {states}\n  rules:\n    - {{ id: hot, topic: \"chain/+/temp\", condition: {{ type: high, limit: 80, deadband: 2 }}, severity: 700, message: \"{{topic}} is {{value}}\" }}\n\
             devices:\n  - id: plc\n    protocol: modbus\n    uns_prefix: chain/site/area/line\n    poll_interval: 1s\n    \
             connection: {{ host: 127.0.0.1, port: {dev}, timeout: 2s }}\n    tags:\n      - {{ id: setpoint, address: \"HR:10\", data_type: int16, access: readwrite, min: 0, max: 1000 }}\n",
            svc = SERVICE_USER.0,
            svc_pw = SERVICE_USER.1,
            op = OPERATOR_USER.0,
            journal = dir.path().join("journal").display(),
            states = dir.path().join("alarms").display(),
            dev = sim.addr.port(),
        ),
    )
    .unwrap();
    let mut broker = Service::new("broker", &config, broker_http, "/readyz");
    let mut commands = Service::new("commands", &config, cmd_http, "/readyz");
    let mut alerts = Service::new("alerts", &config, alert_http, "/readyz");
    broker.spawn();
    broker.ready(Duration::from_secs(30)).await;
    commands.spawn();
    alerts.spawn();
    commands.ready(Duration::from_secs(30)).await;
    alerts.ready(Duration::from_secs(30)).await;
    let (op, mut responses) = client(
        port,
        OPERATOR_USER,
        &["$nexus/cmd/response/#", "$nexus/alarms/#"],
    )
    .await;
    let (svc, _) = client(port, SERVICE_USER, &[]).await;

    // Commands: published, then the handler killed 0 to 60 ms later.
    let mut outcomes = Vec::new();
    for (i, delay) in [0u64, 3, 10, 25, 60].into_iter().enumerate() {
        let value = 100 + i as u16;
        let rid = format!("kill-{i}");
        let cmd = format!(
            "{{\"tag_id\":\"setpoint\",\"value\":{value},\"request_id\":\"{rid}\",\"ts\":{}}}",
            nexus_common::now_ms()
        );
        op.publish("$nexus/cmd/plc/write", cmd.clone(), QoS::AtLeastOnce, false)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(delay)).await;
        commands.kill9();
        commands.spawn();
        let first = next_with(
            &mut responses,
            "$nexus/cmd/response/",
            "request_id",
            &rid,
            Duration::from_secs(20),
        )
        .await
        .unwrap_or_else(|| {
            panic!("no answer to {rid} after the handler was killed {delay} ms after it was sent")
        });
        // The client sends it again, as a client that saw no answer would.
        op.publish("$nexus/cmd/plc/write", cmd, QoS::AtLeastOnce, false)
            .await
            .unwrap();
        let again = next_with(
            &mut responses,
            "$nexus/cmd/response/",
            "request_id",
            &rid,
            Duration::from_secs(20),
        )
        .await
        .unwrap_or_else(|| panic!("no answer to {rid} sent again"));
        let written = writes
            .lock()
            .unwrap()
            .iter()
            .filter(|w| **w == value)
            .count();
        assert!(written <= 1, "{rid} written {written} times");
        if first["success"] == true {
            assert_eq!(
                written, 1,
                "{rid} answered success but not written: {first}"
            );
        }
        assert_eq!(
            first["success"], again["success"],
            "{rid}: the repeat is answered as the first: {first} / {again}"
        );
        outcomes.push(format!(
            "{rid} (kill after {delay} ms): {}, written {written}x",
            if first["success"] == true {
                "done".to_owned()
            } else {
                format!("{}", first["error"])
            }
        ));
    }
    eprintln!("commands across handler kills: {outcomes:?}");

    // Alerts: an excursion while the service is dead, then an acknowledged alarm across a kill.
    let value = |topic: &str, x: u32| {
        let body = format!(
            "{{\"v\":{x},\"q\":\"good\",\"ts\":{}}}",
            nexus_common::now_ms()
        );
        let (svc, topic) = (svc.clone(), topic.to_owned());
        async move {
            svc.publish(&topic, body, QoS::AtLeastOnce, false)
                .await
                .unwrap()
        }
    };
    value("chain/m1/temp", 20).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    alerts.kill9();
    value("chain/m1/temp", 95).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    alerts.spawn();
    let raised = next_with(
        &mut responses,
        "$nexus/alarms/chain/m1/temp",
        "state",
        "active_unacked",
        Duration::from_secs(20),
    )
    .await
    .expect("the excursion sent while the alert service was dead raises the alarm");
    assert_eq!(raised["value"], 95, "{raised}");
    // Acknowledged, then killed at once.
    op.publish(
        "$nexus/alarms/ack",
        r#"{"rule_id":"hot","topic":"chain/m1/temp","user":"op","comment":"seen"}"#,
        QoS::AtLeastOnce,
        false,
    )
    .await
    .unwrap();
    next_with(
        &mut responses,
        "$nexus/alarms/chain/m1/temp",
        "state",
        "active_acked",
        Duration::from_secs(10),
    )
    .await
    .expect("acknowledged");
    alerts.kill9();
    value("chain/m1/temp", 97).await;
    alerts.spawn();
    alerts.ready(Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Still acknowledged after evaluating 97: the state file kept it, never active_unacked.
    let start = Instant::now();
    let alarm = loop {
        let (code, body) = testing::http_with(
            alert_http,
            "GET",
            "/api/v1/alarms",
            &["Authorization: Basic b3A6b3AtcHc="], // op:op-pw
            "",
        );
        assert_eq!(code, 200, "{body}");
        let list: serde_json::Value = serde_json::from_str(&body).unwrap();
        let alarm = list["alarms"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["topic"] == "chain/m1/temp").cloned())
            .unwrap_or_default();
        if alarm["value"] == 97 || start.elapsed() > Duration::from_secs(10) {
            break alarm;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        alarm["value"], 97,
        "the value sent while it was dead evaluated: {alarm}"
    );
    assert_eq!(
        alarm["state"], "active_acked",
        "an acknowledged alarm stays acknowledged across a kill: {alarm}"
    );
    eprintln!("alerts across kills: an excursion sent while the service was dead raised the alarm at 95; acknowledged, killed, 97 evaluated after the restart: {}", alarm["state"]);
    broker.stop();
}

/// A persistent subscriber over `version`, with a fixed client id; cancel the token to end
/// its connection.
async fn persistent_client(
    port: u16,
    id: &str,
    version: nexus_common::config::MqttVersion,
    subs: &[&str],
) -> (MqttHandle, Receiver<Message>, CancellationToken) {
    let mut c = testing::mqtt_config(port);
    c.username = Some(SERVICE_USER.0.into());
    c.password = Some(nexus_common::config::Secret::new(SERVICE_USER.1.to_owned()));
    c.persistent_session = true;
    c.version = version;
    let mut s = ClientSettings::new(id);
    s.subscriptions = subs
        .iter()
        .map(|f| (f.to_string(), QoS::AtLeastOnce))
        .collect();
    let token = CancellationToken::new();
    let (h, rx) = mqtt::connect(&c, s, None, token.clone()).unwrap();
    h.wait_connected(Duration::from_secs(10)).await.unwrap();
    (h, rx, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_crash_loses_no_acknowledged_message_of_a_persistent_session_nor_a_retained_value()
{
    use nexus_common::config::MqttVersion;
    let dir = tempfile::tempdir().unwrap();
    let (port, http) = (free_port(), free_port());
    let config = dir.path().join("nexus.yaml");
    std::fs::write(
        &config,
        format!(
            "broker: {{ bind: 127.0.0.1, port: {port}, ws_port: null, state_dir: {state} }}\n\
             orchestrator: {{ http_listen: \"127.0.0.1:{http}\" }}\n\
             auth:\n  users:\n    - {{ username: {user}, password_env: {PW_ENV}, role: service }}\n\
             telemetry: {{ instance: crash, log_level: warn }}\n",
            user = SERVICE_USER.0,
            state = dir.path().join("broker").display(),
        ),
    )
    .unwrap();
    let mut broker = Service::new("broker", &config, http, "/readyz");
    broker.spawn();
    broker.ready(Duration::from_secs(30)).await;

    // Two persistent subscribers (3.1.1 and 5) and a shared group member subscribe, then go
    // away: their sessions stay.
    let subscribers = [
        ("crash-v311", MqttVersion::V311, "crash/#"),
        ("crash-v5", MqttVersion::V5, "crash/#"),
        ("crash-group", MqttVersion::V5, "$share/g/crash/#"),
    ];
    for (id, version, filter) in subscribers {
        let (h, _rx, token) = persistent_client(port, id, version, &[filter]).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        h.disconnect().await;
        token.cancel();
    }
    // Gone: only their sessions are left.
    let end = Instant::now() + Duration::from_secs(10);
    while broker.metric_sum("nexus_broker_connections") > 0.0 {
        assert!(Instant::now() < end, "the subscribers did not disconnect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Acknowledged publishes, queued for the absent subscribers, and a retained value.
    let (publisher, _) = client(port, SERVICE_USER, &[]).await;
    let n = 500u64;
    let mut acked = publisher.acked();
    let before = *acked.borrow();
    for i in 0..n {
        publisher
            .publish("crash/n", i.to_string(), QoS::AtLeastOnce, false)
            .await
            .unwrap();
    }
    publisher
        .publish("crash/status", "up", QoS::AtLeastOnce, true)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(20), acked.wait_for(|a| *a > before + n))
        .await
        .expect("every publish acknowledged")
        .unwrap();
    publisher.disconnect().await;
    assert_eq!(
        broker.metric_sum("nexus_broker_state_messages"),
        n as f64 + 1.0,
        "kept until acknowledged: every message for the absent subscribers (the retained one included)"
    );

    broker.kill9();
    broker.spawn();
    broker.ready(Duration::from_secs(30)).await;

    for (id, version, _) in subscribers {
        // The session is present: no subscription is made again.
        let (_h, mut rx, _token) = persistent_client(port, id, version, &[]).await;
        let mut got = BTreeSet::new();
        let end = tokio::time::Instant::now() + Duration::from_secs(15);
        while got.len() < n as usize {
            match tokio::time::timeout_at(end, rx.recv()).await {
                Ok(Some(m)) if m.topic() == Some("crash/n") => {
                    got.insert(String::from_utf8_lossy(m.payload()).parse::<u64>().unwrap());
                }
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        assert_eq!(
            got.len() as u64,
            n,
            "{id}: {} of {n} acknowledged messages after the broker's crash",
            got.len()
        );
    }
    assert_eq!(
        broker.metric_sum("nexus_broker_retained_messages"),
        1.0,
        "the restored retained value is counted"
    );
    let (_h, mut rx) = client(port, SERVICE_USER, &["crash/status"]).await;
    let m = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the retained value after the crash")
        .unwrap();
    assert_eq!(m.payload().as_ref(), b"up");
    assert!(m.retain());
    eprintln!("broker crash: {n} queued messages for each of 3 persistent sessions (3.1.1, 5, a shared group) and a retained value, all there after kill -9");
    broker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_number_is_stored_once_across_kills_of_nexus_up() {
    let pg = PgServer::start();
    let url = pg.create_database("chain_up").await;
    let (sim, handed) = counting_device().await;
    let dir = tempfile::tempdir().unwrap();
    let (mqtt, http, gw_http, ing_http, cmd_http, alert_http) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    let config = dir.path().join("nexus.yaml");
    std::fs::write(
        &config,
        format!(
            "mqtt: {{ host: 127.0.0.1, port: {mqtt}, username: {user}, password: {pw}, reconnect_min: 50ms, reconnect_max: 500ms }}\n\
             broker: {{ bind: 127.0.0.1, port: {mqtt}, ws_port: null }}\n\
             orchestrator: {{ http_listen: \"127.0.0.1:{http}\" }}\n\
             auth:\n  users:\n    - {{ username: {user}, password_env: {PW_ENV}, role: service }}\n\
             telemetry: {{ instance: chain-up, log_level: warn }}\n\
             database: {{ url: \"{url}\" }}\n\
             gateway:\n  http_listen: \"127.0.0.1:{gw_http}\"\n\
             ingestion:\n  http_listen: \"127.0.0.1:{ing_http}\"\n\
             commands: {{ http_listen: \"127.0.0.1:{cmd_http}\" }}\n\
             alerts: {{ http_listen: \"127.0.0.1:{alert_http}\" }}\n\
             {devices}",
            user = SERVICE_USER.0,
            pw = SERVICE_USER.1,
            devices = counter_device_yaml(sim.addr.port()),
        ),
    )
    .unwrap();
    // Everything in one process, its data under the working directory (the defaults).
    let mut up = Service::new("up", &config, http, "/readyz");
    up.spawn();
    up.ready(Duration::from_secs(60)).await;
    let t0 = Instant::now();
    let mut kills = Vec::new();
    let mut events: Vec<(Instant, &str)> = Vec::new();
    let pause = |ms| tokio::time::sleep(Duration::from_millis(ms));
    pause(2000).await;
    for round in 0..4u64 {
        up.kill9();
        kills.push(Instant::now());
        pause(200 + 300 * round).await;
        up.spawn();
        events.push((Instant::now(), "nexus up started"));
        up.ready(Duration::from_secs(60)).await;
        events.push((Instant::now(), "nexus up ready"));
        pause(1500 + 500 * round).await;
    }
    pause(1000).await;
    // The device goes away (nothing more is handed out); the chain drains with the process
    // running.
    sim.stop();
    pause(1000).await;
    let unacked = up.metric_sum("nexus_gateway_unacked_points");
    let end = Ends {
        ingest_http: ing_http,
        broker_http: http,
        unacked_at_stop: unacked,
    };
    let faults = format!(
        "{} kills of nexus up (broker, gateway and ingestion in one process), each restarted",
        kills.len()
    );
    check_every_number(&url, &handed, &kills, t0, events, &faults, &end).await;
    up.stop();
}
