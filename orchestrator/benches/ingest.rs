//! Ingestion end to end: a client in this process publishes one point per message, UNS-style
//! over 10,000 topics, QoS 1, through a broker (`nexus broker`, then Mosquitto configured for
//! throughput) to `nexus ingest` (its own process, default settings: 4 writers, 5,000-point
//! batches, fsync'd WAL), and the points/s committed to PostgreSQL are measured, with the
//! ingest process's CPU and peak RSS. On the embedded broker the points come from a
//! `publisher`, ingestion logs in as the service account and the bare subscriber as a
//! `viewer`; Mosquitto lets them in anonymously.
//!
//! Baselines in the same run, on the same PostgreSQL and schema:
//! * raw binary COPY of the same rows, 4 connections, 5,000-row transactions (the storage
//!   ceiling);
//! * the storage side of ingestion alone: the WAL filled while the database is stopped, then
//!   drained into it (no broker in the path);
//! * a bare QoS 1 subscriber of the same stream through the same broker (clean session), and
//!   on the embedded broker a second one subscribed as ingestion is (the service account, a
//!   persistent session, a shared subscription).
//!
//! For each subscriber's run it prints the CPU per message of the broker, of this process
//! (the publisher, and the bare subscriber in its runs), of `nexus ingest` and of PostgreSQL,
//! and of the whole machine: on two shared cores the rates follow these sums.
//!
//! Then Sparkplug B end to end: simulated Modbus devices (in this process, every value
//! changing at every poll) polled by `nexus gateway` as a Sparkplug edge node (UNS output off)
//! through `nexus broker` to `nexus ingest` and PostgreSQL, all separate processes. The devices
//! are offered at rising rates (shorter poll intervals), each step measured once steady (over
//! BENCH_SECONDS), until a step is not kept up with: the gateway publishes less than 0.95x of
//! what is offered, or the points ingestion has received but not committed grow by more than
//! 5% of it. The figure is the highest rate kept up with (points received per second in that
//! step; a window may commit more, a backlog from before it), as a ratio to the raw COPY baselines of the same run,
//! with the CPU of the gateway, broker and ingestion. A step beyond the chain's capacity is no
//! measure of it: the gateway then polls, and ingestion receives and logs, points that the
//! database cannot take in the window.
//!
//! `cargo bench -p nexus-orchestrator --bench ingest`; BENCH_POINTS (300,000); the Sparkplug
//! run: BENCH_SP_DEVICES (20), BENCH_SP_TAGS (500), BENCH_SP_POLL_MS (the steps' poll intervals,
//! `50,44,40,38,36,33,30,28,25,22,20`: 200,000 to 500,000 points/s offered), BENCH_SECONDS (10).
//! BENCH_PG_SHARED_BUFFERS (1GB) sizes the database server's cache for every run.
//! BENCH_PARTS picks runs (`embedded,mosquitto,drain,sparkplug`); BENCH_BROKER_INFLIGHT and
//! BENCH_BROKER_ENV (`NEXUS_BROKER__NAME=value,...`) change the embedded broker of its run.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::pin_mut;
use nexus_common::config::IngestionConfig;
use nexus_common::domain::ValueType;
use nexus_common::mqtt::{self, ClientSettings, QoS};
use nexus_common::testing::{self, free_port, Mosquitto, PgServer, PUBLISHER_USER, VIEWER_USER};
use nexus_data_ingestion::writer::{COLUMNS, COPY_TYPES};
use support::{cpu_seconds, env, http_get, metric_sum, mqtt_as, status_kib, Proc, NEXUS};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_util::sync::CancellationToken;

mod support;

const TAGS: usize = 10_000;
const T0: i64 = 1_770_000_000_000;

fn topic(i: usize) -> String {
    let t = i % TAGS;
    format!(
        "acme/site/area{}/line{}/dev{}/tag{}",
        t / 2500,
        (t / 250) % 10,
        (t / 10) % 25,
        t % 10
    )
}

async fn client(url: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("postgres connection: {e}");
        }
    });
    c
}

/// Raw binary COPY of `n` rows into the historian schema, the columns ingestion fills: 4
/// connections, 5,000-row transactions. Rows/s.
async fn raw_copy(url: &str, n: usize) -> f64 {
    let c = client(url).await;
    // As ingestion sets it up: TimescaleDB when the server has it loaded.
    nexus_data_ingestion::schema::ensure(&c, &IngestionConfig::default(), true)
        .await
        .expect("schema");
    let topics: Vec<String> = (0..TAGS).map(topic).collect();
    c.execute(
        "INSERT INTO tags (topic) SELECT unnest($1::text[])",
        &[&topics],
    )
    .await
    .expect("tags");
    let ids: std::collections::HashMap<String, i32> = c
        .query("SELECT topic, id FROM tags", &[])
        .await
        .expect("ids")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let ids: Vec<i32> = (0..TAGS).map(|t| ids[&topic(t)]).collect();
    copy_rows(url, ids, T0, n).await
}

/// COPY `n` rows as ingestion writes them, row `k` of tag `ids[k % len]` at `t0_ms + k` ms,
/// over 4 connections in 5,000-row statements; returns rows/s.
async fn copy_rows(url: &str, ids: Vec<i32>, t0_ms: i64, n: usize) -> f64 {
    let ids = std::sync::Arc::new(ids);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..4usize {
        let (url, ids) = (url.to_owned(), ids.clone());
        tasks.push(tokio::spawn(async move {
            let c = client(&url).await;
            let mut i = w * 5000;
            while i < n {
                let end = (i + 5000).min(n);
                // The columns ingestion writes, with what it writes for a float value.
                let sink = c
                    .copy_in(&format!(
                        "COPY points ({COLUMNS}) FROM STDIN (FORMAT binary)"
                    ))
                    .await
                    .expect("copy");
                let writer = BinaryCopyInWriter::new(sink, &COPY_TYPES);
                pin_mut!(writer);
                let float = Some(ValueType::Float.code());
                for k in i..end {
                    let time = UNIX_EPOCH + Duration::from_millis((t0_ms + k as i64) as u64);
                    let id = ids[k % ids.len()];
                    writer
                        .as_mut()
                        .write(&[
                            &time,
                            &id,
                            &Some(k as f64),
                            &None::<String>,
                            &192i16,
                            &float,
                            &None::<String>,
                            &None::<SystemTime>,
                        ])
                        .await
                        .expect("row");
                }
                writer.finish().await.expect("finish");
                i += 4 * 5000;
            }
        }));
    }
    for t in tasks {
        t.await.expect("copy task");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// Raw COPY into the Sparkplug run's own table once the run is over: rows for the run's
/// tags, each later than any stored, so they land where the run's did in the unique index,
/// which by then holds millions of rows. Returns (rows/s, rows in the table before).
async fn raw_copy_after(url: &str, n: usize) -> (f64, i64) {
    let c = client(url).await;
    let ids: Vec<i32> = c
        .query("SELECT id FROM tags ORDER BY id", &[])
        .await
        .expect("ids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let row = c
        .query_one(
            "SELECT count(*), (extract(epoch FROM max(time)) * 1000)::bigint FROM points",
            &[],
        )
        .await
        .expect("table size");
    let (rows, last): (i64, Option<i64>) = (row.get(0), row.get(1));
    let t0 = last.unwrap_or(T0) + 1000;
    (copy_rows(url, ids, t0, n).await, rows)
}

struct Ingest {
    proc: Proc,
    http: u16,
    _wal: tempfile::TempDir,
}

fn start_ingest(mqtt_yaml: &str, db: &str) -> Ingest {
    let wal = tempfile::tempdir().expect("tempdir");
    let http = free_port();
    let cfg = wal.path().join("ingest.yaml");
    std::fs::write(
        &cfg,
        format!(
            "mqtt: {{ {mqtt_yaml} }}\ntelemetry: {{ log_level: warn, instance: bench }}\n\
             database:\n  url: \"{db}\"\ningestion:\n  http_listen: 127.0.0.1:{http}\n  wal_dir: {}\n",
            wal.path().join("wal").display()
        ),
    )
    .expect("write");
    let proc = Proc(
        Command::new(NEXUS)
            .args(["ingest", "--config"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .spawn()
            .expect("nexus ingest"),
    );
    let start = Instant::now();
    while http_get(http, "/readyz").split_whitespace().nth(1) != Some("200") {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "ingest not ready"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    Ingest {
        proc,
        http,
        _wal: wal,
    }
}

impl Ingest {
    fn written(&self) -> f64 {
        metric_sum(
            &http_get(self.http, "/metrics"),
            "nexus_ingest_points_written_total",
        )
    }

    /// Wait until `n` points are written (or nothing moves for 10 s); returns the instant
    /// the count first moved and the instant it reached `n`.
    fn wait_written(&self, n: f64) -> (Instant, Instant) {
        let mut first = None;
        let mut last = 0.0;
        let mut still = Instant::now();
        loop {
            let w = self.written();
            if w > 0.0 && first.is_none() {
                first = Some(Instant::now());
            }
            if w >= n || still.elapsed() > Duration::from_secs(10) {
                if env("BENCH_VERBOSE", 0) == 1 {
                    let m = http_get(self.http, "/metrics");
                    for name in [
                        "nexus_ingest_messages_received_total",
                        "nexus_ingest_points_received_total",
                        "nexus_ingest_wal_frames_total",
                        "nexus_ingest_batches_total",
                        "nexus_ingest_points_duplicate_total",
                        "nexus_ingest_write_errors_total",
                        "nexus_ingest_wal_bytes",
                    ] {
                        eprintln!("  {name} {}", metric_sum(&m, name));
                    }
                }
                return (first.unwrap_or_else(Instant::now), Instant::now());
            }
            if w != last {
                if env("BENCH_VERBOSE", 0) == 1 {
                    eprintln!("  {:>8.2}s written {w}", still.elapsed().as_secs_f64());
                }
                still = Instant::now();
                last = w;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Publish `n` points; `auth`: as the bench's publisher (the embedded broker), else
/// anonymously (Mosquitto).
async fn publish(port: u16, auth: bool, n: usize, token: &CancellationToken) -> f64 {
    let mut c = mqtt_as(port, auth.then_some(PUBLISHER_USER));
    c.persistent_session = false;
    c.inflight = 1000;
    let mut s = ClientSettings::new(testing::unique("bench-pub"));
    s.tcp_nodelay = false;
    let (p, _) = mqtt::connect(&c, s, None, token.clone()).expect("publisher");
    p.wait_connected(Duration::from_secs(10))
        .await
        .expect("connect");
    let topics: Vec<String> = (0..TAGS).map(topic).collect();
    let start = Instant::now();
    for i in 0..n {
        p.publish(
            &topics[i % TAGS],
            format!("{{\"v\":{i},\"q\":\"good\",\"ts\":{}}}", T0 + i as i64),
            QoS::AtLeastOnce,
            false,
        )
        .await
        .expect("publish");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// Baseline through the same broker: a bare QoS 1 subscriber receiving the same stream.
/// `durable`: subscribed as ingestion is (the service account, a persistent session and a
/// shared subscription), so that the embedded broker writes every message to its durable
/// state for it as it does for ingestion.
async fn bare_subscriber(port: u16, auth: bool, n: usize, durable: bool) -> f64 {
    let token = CancellationToken::new();
    let (user, id, filter) = if durable {
        (
            testing::SERVICE_USER,
            testing::unique("nexus-bench-sub"),
            "$share/nexus-bench/acme/#",
        )
    } else {
        (VIEWER_USER, testing::unique("bench-sub"), "acme/#")
    };
    let mut c = mqtt_as(port, auth.then_some(user));
    c.persistent_session = durable;
    let mut s = ClientSettings::new(id.clone());
    s.subscriptions = vec![(filter.into(), QoS::AtLeastOnce)];
    s.incoming_capacity = 10_000;
    let (sub, mut rx) = mqtt::connect(&c, s, None, token.clone()).expect("subscriber");
    sub.wait_connected(Duration::from_secs(10))
        .await
        .expect("connect");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let counter = tokio::spawn(async move {
        let mut got = 0;
        let mut first = None;
        while got < n {
            match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
                Ok(Some(_)) => {
                    first.get_or_insert_with(Instant::now);
                    got += 1;
                }
                _ => break,
            }
        }
        got as f64 / first.map_or(1.0, |f| f.elapsed().as_secs_f64())
    });
    publish(port, auth, n, &token).await;
    let rate = counter.await.expect("counter");
    token.cancel();
    if durable {
        // End the persistent session (a clean session with its client id): left offline, its
        // shared subscription would make the broker keep every later message of the bench.
        c.persistent_session = false;
        let end = CancellationToken::new();
        let (s, _) = mqtt::connect(&c, ClientSettings::new(id), None, end.clone()).expect("end");
        s.wait_connected(Duration::from_secs(10))
            .await
            .expect("connect");
        end.cancel();
    }
    rate
}

struct Run {
    name: &'static str,
    bare: f64,
    /// The bare subscriber with a persistent session (embedded broker only).
    bare_durable: Option<f64>,
    /// Where the CPU went during the bare subscriber's run, the durable one's (none on
    /// Mosquitto) and ingestion's (each `n` messages).
    cpu: [CpuSplit; 3],
    committed: f64,
    published: f64,
    cores: f64,
    rss_mib: f64,
}

/// The broker of an end-to-end run: its port, whether clients log in, its process, and
/// whether it is `nexus broker` (whose durable state is measured too).
struct Via {
    port: u16,
    auth: bool,
    broker_pid: u32,
    nexus_broker: bool,
}

/// Where the CPU went while one subscriber took the stream: seconds of the broker, of this
/// process (the publisher, and the bare subscriber if it is one), of `nexus ingest`, of
/// PostgreSQL (the postmaster and its backends), and of the whole machine.
#[derive(Clone, Copy, Default)]
struct CpuSplit {
    broker: f64,
    bench: f64,
    ingest: f64,
    postgres: f64,
    machine: f64,
    seconds: f64,
}

impl CpuSplit {
    fn now(broker: u32, ingest: Option<u32>, postgres: u32) -> (CpuSplit, Instant) {
        let split = CpuSplit {
            broker: cpu_seconds(broker),
            bench: cpu_seconds(std::process::id()),
            ingest: ingest.map_or(0.0, cpu_seconds),
            postgres: support::tree_cpu_seconds(postgres),
            machine: support::machine_busy_seconds(),
            seconds: 0.0,
        };
        (split, Instant::now())
    }

    fn since(start: (CpuSplit, Instant), end: (CpuSplit, Instant)) -> CpuSplit {
        let ((a, t0), (b, t1)) = (start, end);
        CpuSplit {
            broker: b.broker - a.broker,
            bench: b.bench - a.bench,
            ingest: b.ingest - a.ingest,
            postgres: b.postgres - a.postgres,
            machine: b.machine - a.machine,
            seconds: t1.duration_since(t0).as_secs_f64(),
        }
    }

    /// Microseconds per message of each part, and the machine's busy cores; `bench` names
    /// what this process ran.
    fn line(&self, n: usize, bench: &str) -> String {
        let us = |s: f64| s * 1e6 / n as f64;
        let parts = [
            ("broker", self.broker),
            (bench, self.bench),
            ("ingest", self.ingest),
            ("PostgreSQL", self.postgres),
        ];
        let listed: f64 = parts.iter().map(|p| p.1).sum();
        let each: Vec<String> = parts
            .iter()
            .filter(|p| p.1 > 0.0)
            .map(|(name, s)| format!("{name} {:.1}", us(*s)))
            .collect();
        format!(
            "{}; sum {:.1}, whole machine {:.1} us per message; machine busy {:.2} cores",
            each.join(", "),
            us(listed),
            us(self.machine),
            self.machine / self.seconds.max(1e-3)
        )
    }
}

fn end_to_end(
    rt: &tokio::runtime::Runtime,
    name: &'static str,
    via: Via,
    mqtt_yaml: &str,
    db: &str,
    n: usize,
    pg_pid: u32,
) -> Run {
    let Via {
        port,
        auth,
        broker_pid,
        nexus_broker,
    } = via;
    let split = |ingest| CpuSplit::now(broker_pid, ingest, pg_pid);
    let s0 = split(None);
    let bare = rt.block_on(bare_subscriber(port, auth, n, false));
    let s1 = split(None);
    let bare_durable = nexus_broker.then(|| rt.block_on(bare_subscriber(port, auth, n, true)));
    let s2 = split(None);
    let ing = start_ingest(mqtt_yaml, db);
    let pid = ing.proc.0.id();
    let token = CancellationToken::new();
    let cpu0 = cpu_seconds(pid);
    let s3 = split(Some(pid));
    let start = Instant::now();
    let published = rt.block_on(publish(port, auth, n, &token));
    let (_, done) = ing.wait_written(n as f64);
    let elapsed = done.duration_since(start).as_secs_f64();
    let written = ing.written();
    let m = http_get(ing.http, "/metrics");
    assert!(
        written >= n as f64,
        "{name}: only {written} of {n} written; ingest received {} messages, WAL {} bytes",
        metric_sum(&m, "nexus_ingest_messages_received_total"),
        metric_sum(&m, "nexus_ingest_wal_bytes")
    );
    let s4 = split(Some(pid));
    token.cancel();
    Run {
        name,
        bare,
        bare_durable,
        cpu: [
            CpuSplit::since(s0, s1),
            CpuSplit::since(s1, s2),
            CpuSplit::since(s3, s4),
        ],
        committed: written / elapsed,
        published,
        cores: (cpu_seconds(pid) - cpu0) / elapsed,
        rss_mib: status_kib(pid, "VmHWM:") as f64 / 1024.0,
    }
}

/// Figures of one step of the Sparkplug run.
struct SparkplugStep {
    offered: f64,
    committed: f64,
    gateway_cores: f64,
    broker_cores: f64,
    ingest_cores: f64,
    messages_per_s: f64,
    /// Polls, points published by the gateway, points received by ingestion, per second.
    polls_per_s: f64,
    published: f64,
    received: f64,
    /// How fast points received but not yet committed piled up in ingestion (negative: the
    /// backlog shrank).
    backlog_growth: f64,
}

impl SparkplugStep {
    /// Whether the chain kept up: the gateway published nearly all it was offered, and the
    /// points waiting in ingestion grew by less than 5% of the offered rate. The committed
    /// rate alone cannot tell: a window can start with a backlog (the births' new tags, the
    /// warm-up) and commit more than arrives in it.
    fn sustained(&self) -> bool {
        self.published >= 0.95 * self.offered && self.backlog_growth <= 0.05 * self.offered
    }
}

/// Simulated devices -> `nexus gateway` (Sparkplug edge node) -> `nexus broker` ->
/// `nexus ingest` -> PostgreSQL `db`, at rising offered rates (one poll interval per step,
/// every value changing at every poll) until a step is not sustained. The broker and
/// ingestion run throughout; each step has its own devices and gateway, and starts once
/// ingestion has committed what the step before it received.
fn sparkplug_end_to_end(rt: &tokio::runtime::Runtime, db: &str) -> Vec<SparkplugStep> {
    let devices = env("BENCH_SP_DEVICES", 20) as usize;
    let tags = env("BENCH_SP_TAGS", 500) as usize;
    let steps: Vec<u64> = std::env::var("BENCH_SP_POLL_MS")
        .unwrap_or_else(|_| "50,44,40,38,36,33,30,28,25,22,20".into())
        .split(',')
        .map(|v| {
            v.trim()
                .parse()
                .expect("BENCH_SP_POLL_MS: poll intervals in ms")
        })
        .collect();
    let seconds = env("BENCH_SECONDS", 10);
    let dir = tempfile::tempdir().expect("tempdir");
    let (broker, port) = support::start_broker_with(dir.path(), support::QUEUES_HOLD_THE_RUN);
    let broker_pid = broker.0.id();
    let ing = start_ingest(&support::service_mqtt_yaml(port), db);
    let mut out = Vec::new();
    for (k, poll_ms) in steps.into_iter().enumerate() {
        let step = dir.path().join(format!("step-{k}"));
        std::fs::create_dir(&step).expect("step dir");
        let sims = rt.block_on(support::churning_modbus_sims(devices, tags, poll_ms));
        let mut yaml = format!(
            "mqtt: {{ {}, inflight: 1000 }}
gateway:
  heartbeat: 0s
  workers: {}
  buffer: {{ dir: {} }}
  sparkplug: {{ enabled: true, uns: false, group_id: bench, edge_node_id: gw }}
telemetry: {{ log_level: warn }}
devices:
",
            support::service_mqtt_yaml(port),
            devices.max(10),
            step.join("buffer").display(),
        );
        yaml.push_str(&support::load_devices(
            &sims.iter().map(|s| s.addr.port()).collect::<Vec<_>>(),
            tags,
            poll_ms,
        ));
        let gw_cfg = step.join("gateway.yaml");
        std::fs::write(&gw_cfg, yaml).expect("write");
        let gw_http = free_port();
        let listen = format!("127.0.0.1:{gw_http}");
        let gw = support::start_gateway(
            &gw_cfg,
            &[
                ("NEXUS_GATEWAY__HTTP_LISTEN", &listen),
                ("NEXUS_GATEWAY__COMMANDS", "false"),
            ],
        );
        // Warm up, then measure the steady state.
        std::thread::sleep(Duration::from_secs(3));
        let pids = (gw.0.id(), broker_pid, ing.proc.0.id());
        let counts = || {
            let (g, i) = (
                http_get(gw_http, "/metrics"),
                http_get(ing.http, "/metrics"),
            );
            [
                metric_sum(&i, "nexus_ingest_messages_received_total"),
                metric_sum(&g, "nexus_gateway_polls_total"),
                metric_sum(&g, "nexus_gateway_sparkplug_points_published_total"),
                metric_sum(&i, "nexus_ingest_points_received_total"),
            ]
        };
        let cpu = || {
            [
                cpu_seconds(pids.0),
                cpu_seconds(pids.1),
                cpu_seconds(pids.2),
            ]
        };
        let (w0, c0, cpu0, t0) = (ing.written(), counts(), cpu(), Instant::now());
        let backlog0 = c0[3] - w0;
        std::thread::sleep(Duration::from_secs(seconds));
        let elapsed = t0.elapsed().as_secs_f64();
        let (w1, c1, cpu1) = (ing.written(), counts(), cpu());
        let rate = |k: usize| (c1[k] - c0[k]) / elapsed;
        let cores = |k: usize| (cpu1[k] - cpu0[k]) / elapsed;
        drop(gw);
        drop(sims);
        let s = SparkplugStep {
            offered: (devices * tags) as f64 * 1000.0 / poll_ms as f64,
            committed: (w1 - w0) / elapsed,
            gateway_cores: cores(0),
            broker_cores: cores(1),
            ingest_cores: cores(2),
            messages_per_s: rate(0),
            polls_per_s: rate(1),
            published: rate(2),
            received: rate(3),
            backlog_growth: ((c1[3] - w1) - backlog0) / elapsed,
        };
        let sustained = s.sustained();
        out.push(s);
        if !sustained {
            break;
        }
        // The next step starts on an empty log.
        let received = metric_sum(
            &http_get(ing.http, "/metrics"),
            "nexus_ingest_points_received_total",
        );
        ing.wait_written(received);
    }
    out
}

fn main() {
    let n = env("BENCH_POINTS", 300_000) as usize;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // The test harness keeps its servers small (64 MB of shared buffers); the Sparkplug run
    // alone writes millions of rows, whose unique index outgrows that within seconds.
    let shared_buffers = std::env::var("BENCH_PG_SHARED_BUFFERS").unwrap_or_else(|_| "1GB".into());
    let mut pg = PgServer::start_with_settings(&[&format!("shared_buffers={shared_buffers}")]);

    let url = rt.block_on(pg.create_database("raw"));
    let raw = rt.block_on(raw_copy(&url, n));

    // BENCH_PARTS: which runs besides the raw COPY baseline (default all of them).
    let parts = std::env::var("BENCH_PARTS")
        .unwrap_or_else(|_| "embedded,mosquitto,drain,sparkplug".into());
    let want = |part: &str| parts.split(',').any(|p| p.trim() == part);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut runs = Vec::new();
    if want("embedded") {
        // The queue per client holds the whole run: the publisher outruns the historian.
        // BENCH_BROKER_INFLIGHT: the broker's in-flight window per client, if not the default.
        let inflight = std::env::var("BENCH_BROKER_INFLIGHT").ok();
        let mut broker_env = support::QUEUES_HOLD_THE_RUN.to_vec();
        if let Some(n) = &inflight {
            broker_env.push(("NEXUS_BROKER__MAX_INFLIGHT", n.as_str()));
        }
        // BENCH_BROKER_ENV: more of the broker's settings, `NAME=value,NAME=value`.
        let extra = std::env::var("BENCH_BROKER_ENV").unwrap_or_default();
        broker_env.extend(extra.split(',').filter_map(|kv| kv.split_once('=')));
        let (broker, port) = support::start_broker_with(dir.path(), &broker_env);
        let db = rt.block_on(pg.create_database("e2e_embedded"));
        let via = Via {
            port,
            auth: true,
            broker_pid: broker.0.id(),
            nexus_broker: true,
        };
        runs.push(end_to_end(
            &rt,
            "embedded broker (nexus broker)",
            via,
            &support::service_mqtt_yaml(port),
            &db,
            n,
            pg.pid(),
        ));
    }
    if want("mosquitto") {
        // The harness's Mosquitto raises the in-flight window to 1000 and lifts the queue
        // limits: its defaults (20 in flight, 1000 queued) throttle or drop QoS 1 floods.
        let mq = Mosquitto::start("").expect("mosquitto");
        let port = mq.addr().port();
        let db = rt.block_on(pg.create_database("e2e_mosquitto"));
        let via = Via {
            port,
            auth: false,
            broker_pid: mq.pid(),
            nexus_broker: false,
        };
        runs.push(end_to_end(
            &rt,
            "Mosquitto",
            via,
            &format!("host: 127.0.0.1, port: {port}"),
            &db,
            n,
            pg.pid(),
        ));
    }

    // Storage side alone: fill the WAL while PostgreSQL is down, then time the drain.
    let drain = want("drain").then(|| {
        let (_broker, port) = support::start_broker_with(dir.path(), support::QUEUES_HOLD_THE_RUN);
        let db = rt.block_on(pg.create_database("drain"));
        let ing = start_ingest(&support::service_mqtt_yaml(port), &db);
        pg.stop();
        let token = CancellationToken::new();
        rt.block_on(publish(port, true, n, &token));
        // Everything durable in the WAL before the database returns.
        let start = Instant::now();
        while metric_sum(
            &http_get(ing.http, "/metrics"),
            "nexus_ingest_messages_received_total",
        ) < n as f64
            && start.elapsed() < Duration::from_secs(60)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(500));
        pg.restart();
        let (first, done) = ing.wait_written(n as f64);
        token.cancel();
        ing.written() / done.duration_since(first).as_secs_f64().max(1e-3)
    });

    let sp = want("sparkplug").then(|| {
        let db = rt.block_on(pg.create_database("e2e_sparkplug"));
        let steps = sparkplug_end_to_end(&rt, &db);
        (steps, rt.block_on(raw_copy_after(&db, n)))
    });

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    println!("ingestion: {n} points, one per message, QoS 1, {TAGS} topics (run at unix {now})");
    println!("  baseline: raw binary COPY, 4 conn x 5,000 rows   {raw:>10.0} points/s");
    if let Some(drain) = drain {
        println!(
            "  WAL drain into PostgreSQL (storage side alone)   {drain:>10.0} points/s  {:.2}x of raw COPY",
            drain / raw
        );
    }
    for r in &runs {
        println!(
            "  end to end via {:<32} {:>10.0} points/s  {:.2}x of raw COPY, {:.2}x of a bare QoS 1 subscriber ({:.0} msgs/s); publisher {:.0} msgs/s; ingest {:.2} cores, peak RSS {:.1} MiB",
            r.name,
            r.committed,
            r.committed / raw,
            r.committed / r.bare,
            r.bare,
            r.published,
            r.cores,
            r.rss_mib
        );
        if let Some(durable) = r.bare_durable {
            println!(
                "      {:.2}x of a bare subscriber subscribed as ingestion is (persistent session, shared subscription: the broker writes each message to its state) ({durable:.0} msgs/s)",
                r.committed / durable,
            );
        }
        let both = "bench (publisher, bare subscriber)";
        println!(
            "      CPU with the bare subscriber: {}",
            r.cpu[0].line(n, both)
        );
        if r.bare_durable.is_some() {
            println!(
                "      CPU with the durable one:    {}",
                r.cpu[1].line(n, both)
            );
        }
        println!(
            "      CPU with ingestion:          {}",
            r.cpu[2].line(n, "bench (publisher)")
        );
    }
    if let Some((steps, (raw_after, rows_before))) = sp {
        println!("  Sparkplug B end to end (devices -> gateway edge node -> nexus broker -> ingest), offered rates rising until one is not sustained (published < 0.95x offered, or ingestion's backlog growing by 5% of it):");
        for sp in &steps {
            println!(
                "    offered {:>7.0} points/s: committed {:>7.0} points/s, {:.2}x of raw COPY into its table{}; {:.0} polls/s, published {:.0} points/s, received {:.0} points/s in {:.0} DDATA msgs/s, backlog {:+.0} points/s; gateway {:.2} cores, broker {:.2}, ingest {:.2}",
                sp.offered,
                sp.committed,
                sp.committed / raw_after,
                if sp.sustained() { "" } else { " (not sustained)" },
                sp.polls_per_s,
                sp.published,
                sp.received,
                sp.messages_per_s,
                sp.backlog_growth,
                sp.gateway_cores,
                sp.broker_cores,
                sp.ingest_cores
            );
        }
        // What a sustained step kept up with: the points that arrived (and did not pile up).
        let best = steps
            .iter()
            .filter(|s| s.sustained())
            .map(|s| s.received)
            .fold(0.0, f64::max);
        println!(
            "  baseline after the run: raw binary COPY of {n} rows into its table ({rows_before} rows in it), 4 conn x 5,000 rows {raw_after:>10.0} points/s"
        );
        let met = |ok: bool| if ok { "met" } else { "not met" };
        println!(
            "  Sparkplug: highest rate kept up with {best:.0} points/s, {:.2}x of raw COPY into its table, {:.2}x of raw COPY into an empty one; goals: >= 250,000 points/s: {}; >= 0.5x raw COPY: {} (into its table), {} (into an empty one)",
            best / raw_after,
            best / raw,
            met(best >= 250_000.0),
            met(best / raw_after >= 0.5),
            met(best / raw >= 0.5),
        );
    }
    let best = runs.iter().map(|r| r.committed).fold(0.0, f64::max);
    println!(
        "  goals: >= 200,000 points/s end to end: {}; >= 0.5x raw COPY: {}",
        if best >= 200_000.0 { "met" } else { "not met" },
        if best / raw >= 0.5 { "met" } else { "not met" }
    );
}
