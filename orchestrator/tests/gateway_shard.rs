//! Gateway scale-out with `nexus gateway` processes sharing 12 Modbus devices
//! (`gateway.shard`): three members, then a fourth added, one stopped, one killed with
//! SIGKILL and started again, one frozen (SIGSTOP) past its lease and woken. The Modbus server records every read with the TCP connection
//! it came on (one connection per gateway and endpoint): at no moment do two connections
//! poll the same device, and after each change every device is polled again.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::future;
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nexus_common::config::{AuthConfig, BrokerConfig, Config};
use nexus_common::testing::{self, free_port, SERVICE_USER};
use tokio::net::TcpListener;
use tokio_modbus::server::tcp::{accept_tcp_connection, Server};
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};

const NEXUS: &str = env!("CARGO_BIN_EXE_nexus");
const DEVICES: u8 = 12;
const POLL: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug)]
struct Read {
    at: Instant,
    unit: u8,
    conn: u16,
}

type Log = Arc<Mutex<Vec<Read>>>;

/// A Modbus device per unit id, all behind one port; every read is logged with the
/// client's port.
#[derive(Clone)]
struct Recorder {
    conn: u16,
    log: Log,
}

impl tokio_modbus::server::Service for Recorder {
    type Request = SlaveRequest<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = future::Ready<Result<Response, ExceptionCode>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        self.log.lock().unwrap().push(Read {
            at: Instant::now(),
            unit: req.slave,
            conn: self.conn,
        });
        future::ready(match req.request {
            Request::ReadHoldingRegisters(_, n) => Ok(Response::ReadHoldingRegisters(vec![
                    u16::from(req.slave);
                    n as usize
                ])),
            _ => Err(ExceptionCode::IllegalFunction),
        })
    }
}

async fn start_devices(log: Log) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::new(listener);
    tokio::spawn(async move {
        let on_connected = |stream, peer: SocketAddr| {
            let svc = Recorder {
                conn: peer.port(),
                log: log.clone(),
            };
            async move { accept_tcp_connection(stream, peer, move |_| Ok(Some(svc.clone()))) }
        };
        let _ = server.serve(&on_connected, |_| {}).await;
    });
    addr
}

fn devices_yaml(port: u16) -> String {
    let mut s = String::from("devices:\n");
    for unit in 1..=DEVICES {
        s.push_str(&format!(
            "  - id: dev-{unit:02}\n    protocol: modbus\n    uns_prefix: test/shard\n    \
             poll_interval: {}ms\n    connection: {{ host: 127.0.0.1, port: {port}, unit_id: {unit}, timeout: 1s }}\n    \
             tags:\n      - {{ id: v, address: \"HR:0\", data_type: uint16 }}\n",
            POLL.as_millis()
        ));
    }
    s
}

struct Gateway {
    name: String,
    config: tempfile::NamedTempFile,
    _buffer: tempfile::TempDir,
    http: u16,
    child: Option<Child>,
}

impl Gateway {
    fn start(name: &str, mqtt_port: u16, devices: &str) -> Gateway {
        let http = free_port();
        let buffer = tempfile::tempdir().unwrap();
        let mut config = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
        write!(
            config,
            "mqtt: {{ host: 127.0.0.1, port: {mqtt_port}, username: {}, reconnect_min: 50ms, reconnect_max: 500ms }}\n\
             telemetry: {{ instance: {name}, log_level: warn }}\n\
             auth: {{ metrics: open }}\n\
             gateway:\n  http_listen: 127.0.0.1:{http}\n  commands: false\n  watch_devices_file: false\n  \
             buffer: {{ dir: {} }}\n  shard: {{ enabled: true, heartbeat: 200ms, lease: 1s, settle: 500ms }}\n{devices}",
            SERVICE_USER.0,
            buffer.path().display()
        )
        .unwrap();
        let mut g = Gateway {
            name: name.into(),
            config,
            _buffer: buffer,
            http,
            child: None,
        };
        g.spawn();
        g
    }

    fn spawn(&mut self) {
        self.child = Some(
            Command::new(NEXUS)
                .args(["gateway", "--config"])
                .arg(self.config.path())
                .env("NEXUS_MQTT__PASSWORD", SERVICE_USER.1)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        );
    }

    fn running(&self) -> bool {
        self.child.is_some()
    }

    fn owned(&self) -> Option<f64> {
        let (status, text) = testing::http(self.http, "GET", "/metrics", "");
        (status == 200)
            .then(|| testing::metric_value(&text, "nexus_gateway_shard_devices"))
            .flatten()
    }

    fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    /// SIGSTOP for `pause`, then SIGCONT: a member frozen (a stalled VM, a stopped
    /// container) while the others take its devices over, that then wakes up.
    fn freeze(&self, pause: Duration) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        let _ = Command::new("kill").args(["-STOP", &pid]).status();
        std::thread::sleep(pause);
        let _ = Command::new("kill").args(["-CONT", &pid]).status();
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Wait until the running gateways together own every device, each device is read in the
/// last half second, and that holds for a second. Returns how long it took.
async fn settled(gws: &[Gateway], log: &Log, what: &str) -> Duration {
    let start = Instant::now();
    let mut since: Option<Instant> = None;
    loop {
        let owned: Option<Vec<f64>> = gws
            .iter()
            .filter(|g| g.running())
            .map(Gateway::owned)
            .collect();
        let now = Instant::now();
        let recent: BTreeSet<u8> = log
            .lock()
            .unwrap()
            .iter()
            .rev()
            .take_while(|r| now - r.at < Duration::from_millis(500))
            .map(|r| r.unit)
            .collect();
        let ok = owned
            .as_ref()
            .is_some_and(|o| o.iter().sum::<f64>() == f64::from(DEVICES))
            && recent.len() == usize::from(DEVICES);
        match (ok, since) {
            (true, None) => since = Some(now),
            (true, Some(s)) if now - s >= Duration::from_secs(1) => return s - start,
            (false, _) => since = None,
            _ => {}
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what}: not settled in 30 s (owned {owned:?}, devices read in the last 0.5 s: {recent:?}, running: {:?})",
            gws.iter().filter(|g| g.running()).map(|g| &g.name).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Wait until settled after a change made at `mark`, and report how long it took and the
/// longest time a device went unread.
async fn after(gws: &[Gateway], log: &Log, what: &str, mark: Instant) {
    let took = settled(gws, log, what).await;
    eprintln!(
        "{what}: settled after {took:?}, longest unread {:?}",
        longest_gap(&log.lock().unwrap(), mark)
    );
}

/// Per device, the stretches each connection polled it (reads less than `gap` apart); two
/// stretches of different connections that overlap in time are a device polled twice.
fn overlaps(reads: &[Read], gap: Duration) -> Vec<String> {
    let mut per_device: BTreeMap<u8, Vec<Read>> = BTreeMap::new();
    for r in reads {
        per_device.entry(r.unit).or_default().push(*r);
    }
    let mut found = Vec::new();
    for (unit, mut rs) in per_device {
        rs.sort_by_key(|r| r.at);
        // (conn, first, last)
        let mut stretches: Vec<(u16, Instant, Instant)> = Vec::new();
        let mut open: BTreeMap<u16, usize> = BTreeMap::new();
        for r in rs {
            match open.get(&r.conn) {
                Some(&i) if r.at - stretches[i].2 < gap => stretches[i].2 = r.at,
                _ => {
                    open.insert(r.conn, stretches.len());
                    stretches.push((r.conn, r.at, r.at));
                }
            }
        }
        for (i, a) in stretches.iter().enumerate() {
            for b in &stretches[i + 1..] {
                if a.0 != b.0 && a.1.max(b.1) <= a.2.min(b.2) {
                    found.push(format!(
                        "dev-{unit:02}: connections {} and {} both polled it for {:?}",
                        a.0,
                        b.0,
                        a.2.min(b.2) - a.1.max(b.1)
                    ));
                }
            }
        }
    }
    found
}

/// The longest time any device went unread after `from`.
fn longest_gap(reads: &[Read], from: Instant) -> Duration {
    let mut last: BTreeMap<u8, Instant> = (1..=DEVICES).map(|u| (u, from)).collect();
    let mut worst = Duration::ZERO;
    let mut sorted: Vec<&Read> = reads.iter().filter(|r| r.at >= from).collect();
    sorted.sort_by_key(|r| r.at);
    for r in sorted {
        if let Some(prev) = last.insert(r.unit, r.at) {
            worst = worst.max(r.at - prev);
        }
    }
    worst
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_device_is_polled_by_exactly_one_gateway_as_members_come_and_go() {
    let log: Log = Arc::new(Mutex::new(Vec::new()));
    let modbus = start_devices(log.clone()).await;
    let devices = devices_yaml(modbus.port());
    let parsed = Config::from_str_with_env(&devices, None, &[]).unwrap();
    let broker = testing::start_broker(
        BrokerConfig::default(),
        &AuthConfig {
            metrics: nexus_common::config::MetricsAccess::Open,
            ..testing::test_auth()
        },
        &parsed.devices,
        &prometheus::Registry::new(),
    );
    let mqtt = broker.ports.tcp().port();

    let mut gws: Vec<Gateway> = (0..3)
        .map(|i| Gateway::start(&format!("gw-{i}"), mqtt, &devices))
        .collect();
    let took = settled(&gws, &log, "three members").await;
    eprintln!("three members settled after {took:?}");

    let mark = Instant::now();
    gws.push(Gateway::start("gw-3", mqtt, &devices));
    after(&gws, &log, "a fourth member added", mark).await;
    assert!(
        gws[3].owned().unwrap() >= 1.0,
        "the new member took a share"
    );

    let mark = Instant::now();
    gws[1].terminate();
    after(&gws, &log, "gw-1 stopped", mark).await;

    let mark = Instant::now();
    gws[2].kill9();
    after(&gws, &log, "gw-2 killed", mark).await;

    // A rollout restarts a member under the same name.
    let mark = Instant::now();
    gws[2].spawn();
    after(&gws, &log, "gw-2 back", mark).await;
    assert!(
        gws[2].owned().unwrap() >= 1.0,
        "the restarted member took a share"
    );

    // Frozen past its lease: the others take over, and when it wakes it must not poll a
    // device before it has learnt that it lost it.
    let frozen_owned = gws[0].owned().unwrap();
    assert!(
        frozen_owned >= 1.0,
        "gw-0 polls something before it freezes"
    );
    let mark = Instant::now();
    gws[0].freeze(Duration::from_secs(3));
    after(&gws, &log, "gw-0 woke up", mark).await;

    // A rolling update as a StatefulSet does it: one member at a time stopped (SIGTERM) and
    // started again under the same name.
    for i in [0, 2, 3] {
        let mark = Instant::now();
        gws[i].terminate();
        after(&gws, &log, &format!("gw-{i} stopped for an update"), mark).await;
        let mark = Instant::now();
        gws[i].spawn();
        after(&gws, &log, &format!("gw-{i} updated"), mark).await;
    }

    for g in &mut gws {
        g.terminate();
    }
    let reads = log.lock().unwrap().clone();
    let conns: BTreeSet<u16> = reads.iter().map(|r| r.conn).collect();
    eprintln!("{} reads over {} connections", reads.len(), conns.len());
    assert!(conns.len() >= 8, "every member polled something: {conns:?}");
    let found = overlaps(&reads, POLL * 4);
    assert!(
        found.is_empty(),
        "devices polled twice:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_overlap_check_sees_two_pollers() {
    let t = Instant::now();
    let at = |ms: u64| t + Duration::from_millis(ms);
    let handoff = [
        Read {
            at: at(0),
            unit: 1,
            conn: 10,
        },
        Read {
            at: at(100),
            unit: 1,
            conn: 10,
        },
        Read {
            at: at(150),
            unit: 1,
            conn: 11,
        },
        Read {
            at: at(250),
            unit: 1,
            conn: 11,
        },
    ];
    assert!(overlaps(&handoff, POLL * 4).is_empty());
    let twice = [
        Read {
            at: at(0),
            unit: 1,
            conn: 10,
        },
        Read {
            at: at(50),
            unit: 1,
            conn: 11,
        },
        Read {
            at: at(100),
            unit: 1,
            conn: 10,
        },
        Read {
            at: at(150),
            unit: 1,
            conn: 11,
        },
    ];
    assert_eq!(overlaps(&twice, POLL * 4).len(), 1);
}
