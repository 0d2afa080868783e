//! Memory with many persistent sessions: does a broker's memory stay bounded when thousands of
//! clients each keep an offline session subscribed to `#`?
//!
//! The embedded broker (`nexus broker`, its own process, a `viewer` account for the sessions and
//! a `publisher` for the data) and Mosquitto (anonymous clients) in the same run, the same way:
//!
//! 1. BENCH_SESSIONS (5,000) clients each connect with MQTT 3.1.1, clean session 0, subscribe
//!    to `#` at QoS 1 and disconnect, BENCH_BATCH (200) at a time. Raw packets over TCP, with
//!    every CONNACK and SUBACK code checked: full clients would measure the clients.
//! 2. A publisher sends BENCH_MESSAGES QoS 1 messages (UNS JSON of ~100 bytes; default: the
//!    queue bound + 200) and waits for every PUBACK: each offline queue fills to its bound
//!    (BENCH_QUEUE, 1,000: `broker.max_mqueue_len`, Mosquitto's `max_queued_messages`) and the
//!    rest is dropped.
//! 3. The publisher sends BENCH_MESSAGES more, BENCH_ROUNDS - 1 times (4 rounds in all by
//!    default): the queues are full, so the broker's memory must stop growing. rmqtt's RSS
//!    still grows for a round or two as the queues turn over, then stays put, so the figure
//!    that tells is the growth during the last round.
//!
//! The broker's RSS is read (/proc/<pid>/status) idle, after the sessions and after each round,
//! once it has settled; the drops are read from the embedded broker's `/metrics`
//! (`nexus_broker_messages_dropped_total{reason="queue_full"}`) and Mosquitto's `$SYS` tree.
//! Figures are given as embedded/Mosquitto ratios: this machine is shared and noisy.
//!
//! `cargo bench -p nexus-orchestrator --bench broker_sessions`; BENCH_SESSIONS (5000),
//! BENCH_MESSAGES (queue + 200), BENCH_ROUNDS (4), BENCH_QUEUE (1000), BENCH_BATCH (200).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use nexus_common::testing::{free_port, Mosquitto, PUBLISHER_USER, VIEWER_USER};
use support::{env, http_get, metric_sum, status_kib, Proc};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod support;

/// MQTT 3.1.1 packets, built and read by hand.
mod packet {
    use super::*;

    pub const CONNACK: u8 = 2;
    pub const PUBLISH: u8 = 3;
    pub const PUBACK: u8 = 4;
    pub const SUBACK: u8 = 9;
    pub const DISCONNECT: [u8; 2] = [0xE0, 0];

    fn string(s: &str, out: &mut Vec<u8>) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    fn packet(first: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        let mut n = body.len();
        loop {
            let b = (n % 128) as u8;
            n /= 128;
            out.push(if n > 0 { b | 0x80 } else { b });
            if n == 0 {
                break;
            }
        }
        out.extend_from_slice(body);
        out
    }

    /// CONNECT with a keep-alive of 60 s; `login` is a user name and password.
    pub fn connect(client_id: &str, login: Option<(&str, &str)>, clean: bool) -> Vec<u8> {
        let mut b = Vec::new();
        string("MQTT", &mut b);
        b.push(4);
        let mut flags = if clean { 0x02 } else { 0 };
        if login.is_some() {
            flags |= 0xC0;
        }
        b.push(flags);
        b.extend_from_slice(&60u16.to_be_bytes());
        string(client_id, &mut b);
        if let Some((user, password)) = login {
            string(user, &mut b);
            string(password, &mut b);
        }
        packet(0x10, &b)
    }

    pub fn subscribe(packet_id: u16, filters: &[&str], qos: u8) -> Vec<u8> {
        let mut b = packet_id.to_be_bytes().to_vec();
        for f in filters {
            string(f, &mut b);
            b.push(qos);
        }
        packet(0x82, &b)
    }

    /// PUBLISH at QoS 1, not retained.
    pub fn publish(topic: &str, packet_id: u16, payload: &[u8]) -> Vec<u8> {
        let mut b = Vec::with_capacity(topic.len() + payload.len() + 4);
        string(topic, &mut b);
        b.extend_from_slice(&packet_id.to_be_bytes());
        b.extend_from_slice(payload);
        packet(0x32, &b)
    }

    /// One packet: its type (high nibble of the first byte) and body.
    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<(u8, Vec<u8>)> {
        let first = r.read_u8().await?;
        let mut len = 0usize;
        for shift in [0, 7, 14, 21] {
            let b = r.read_u8().await?;
            len |= usize::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                let mut body = vec![0; len];
                r.read_exact(&mut body).await?;
                return Ok((first >> 4, body));
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "remaining length over 4 bytes",
        ))
    }

    /// Connect and wait for a CONNACK accepting the connection.
    pub async fn open(
        port: u16,
        client_id: &str,
        login: Option<(&str, &str)>,
        clean: bool,
    ) -> Result<TcpStream, String> {
        let mut s = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("{client_id}: connect: {e}"))?;
        let _ = s.set_nodelay(true);
        s.write_all(&connect(client_id, login, clean))
            .await
            .map_err(|e| format!("{client_id}: CONNECT: {e}"))?;
        match read(&mut s).await {
            Ok((CONNACK, body)) if body.len() == 2 && body[1] == 0 => Ok(s),
            Ok((CONNACK, body)) => Err(format!(
                "{client_id}: CONNACK return code {:?}",
                body.get(1)
            )),
            Ok((t, _)) => Err(format!("{client_id}: packet type {t} instead of CONNACK")),
            Err(e) => Err(format!("{client_id}: no CONNACK: {e}")),
        }
    }
}

/// How long any one step may take before the bench gives up.
const STEP: Duration = Duration::from_secs(30);

/// One persistent session: CONNECT (clean session 0), SUBSCRIBE `#` at QoS 1, both answers
/// checked, DISCONNECT and close (rmqtt leaves closing to the client).
async fn open_session(
    port: u16,
    client_id: String,
    login: Option<(&str, &str)>,
) -> Result<(), String> {
    let mut s = packet::open(port, &client_id, login, false).await?;
    s.write_all(&packet::subscribe(1, &["#"], 1))
        .await
        .map_err(|e| format!("{client_id}: SUBSCRIBE: {e}"))?;
    loop {
        match packet::read(&mut s).await {
            Ok((packet::SUBACK, body)) if body == [0, 1, 1] => break,
            Ok((packet::SUBACK, body)) => {
                return Err(format!(
                    "{client_id}: SUBACK {body:?}, wanted packet 1 granted QoS 1"
                ))
            }
            // A retained message may come first; the session keeps what it is not sent.
            Ok((packet::PUBLISH, _)) => {}
            Ok((t, _)) => return Err(format!("{client_id}: packet type {t} instead of SUBACK")),
            Err(e) => return Err(format!("{client_id}: no SUBACK: {e}")),
        }
    }
    s.write_all(&packet::DISCONNECT)
        .await
        .map_err(|e| format!("{client_id}: DISCONNECT: {e}"))?;
    let _ = s.shutdown().await;
    Ok(())
}

/// Open `n` sessions, `batch` at a time; panics with the first failures.
async fn open_sessions(port: u16, n: usize, batch: usize, login: Option<(&str, &str)>) {
    let errors: Vec<String> = futures::stream::iter(0..n)
        .map(|i| async move {
            tokio::time::timeout(STEP, open_session(port, format!("bench-s-{i}"), login))
                .await
                .unwrap_or_else(|_| Err(format!("bench-s-{i}: no answer within {STEP:?}")))
        })
        .buffer_unordered(batch)
        .filter_map(|r| async move { r.err() })
        .collect()
        .await;
    assert!(
        errors.is_empty(),
        "{} of {n} sessions failed, e.g. {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
}

/// A UNS value of about 100 bytes.
fn payload(seq: usize) -> Vec<u8> {
    format!(
        "{{\"v\":{}.25,\"q\":\"good\",\"ts\":{},\"u\":\"degC\",\"src\":\"bench-sessions\",\"seq\":{seq:08}}}",
        seq % 1000,
        1_770_000_000_000u64 + seq as u64
    )
    .into_bytes()
}

fn topic(seq: usize) -> String {
    format!(
        "acme/site/area/line-{}/plc-{}/temperature",
        seq % 4,
        seq % 50
    )
}

/// Publish `n` QoS 1 messages from `first` on, at most 100 unacknowledged; returns once every
/// PUBACK is in.
async fn publish_round(port: u16, login: Option<(&str, &str)>, first: usize, n: usize) -> Duration {
    const WINDOW: usize = 100;
    let start = Instant::now();
    let s = packet::open(port, &format!("bench-pub-{first}"), login, true)
        .await
        .unwrap_or_else(|e| panic!("publisher: {e}"));
    let (mut r, mut w) = s.into_split();
    let window = Arc::new(tokio::sync::Semaphore::new(WINDOW));
    let acks = window.clone();
    let reader = tokio::spawn(async move {
        let mut acked = 0;
        while acked < n {
            match tokio::time::timeout(STEP, packet::read(&mut r)).await {
                Ok(Ok((packet::PUBACK, _))) => {
                    acked += 1;
                    acks.add_permits(1);
                }
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(_) => break,
            }
        }
        acked
    });
    for seq in first..first + n {
        window.acquire().await.expect("open semaphore").forget();
        let id = (seq % 65_535) as u16 + 1;
        w.write_all(&packet::publish(&topic(seq), id, &payload(seq)))
            .await
            .expect("publish");
    }
    let acked = reader.await.expect("reader");
    assert_eq!(
        acked, n,
        "publisher: only {acked} of {n} QoS 1 messages acknowledged"
    );
    let _ = w.write_all(&packet::DISCONNECT).await;
    start.elapsed()
}

/// Mosquitto's `$SYS` values for `topics`: the last received within 2.5 s (it publishes them
/// retained, every `sys_interval`, when they change, so the first may predate this reader).
async fn mosquitto_sys(port: u16, topics: &[&str]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let Ok(mut s) = packet::open(port, "bench-sys", None, true).await else {
        return out;
    };
    if s.write_all(&packet::subscribe(1, topics, 0)).await.is_err() {
        return out;
    }
    let deadline = Instant::now() + Duration::from_millis(2500);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, packet::read(&mut s)).await {
            Ok(Ok((packet::PUBLISH, body))) if body.len() >= 2 => {
                let len = usize::from(u16::from_be_bytes([body[0], body[1]]));
                let topic = String::from_utf8_lossy(&body[2..2 + len]).into_owned();
                let value = String::from_utf8_lossy(&body[2 + len..]).into_owned();
                out.insert(topic, value);
            }
            Ok(Ok(_)) => {}
            _ => break,
        }
    }
    let _ = s.write_all(&packet::DISCONNECT).await;
    out
}

/// Wait until a process's RSS stops moving (under 1 MiB over 2 s, or `limit`); its RSS in KiB.
fn settled_rss(pid: u32, limit: Duration) -> u64 {
    let start = Instant::now();
    let mut samples = vec![status_kib(pid, "VmRSS:")];
    loop {
        std::thread::sleep(Duration::from_millis(500));
        samples.push(status_kib(pid, "VmRSS:"));
        let last = &samples[samples.len().saturating_sub(5)..];
        let (lo, hi) = (
            last.iter().min().copied().unwrap_or(0),
            last.iter().max().copied().unwrap_or(0),
        );
        if (last.len() == 5 && hi - lo < 1024) || start.elapsed() > limit {
            return *samples.last().unwrap_or(&0);
        }
    }
}

/// The broker under test.
enum Kind {
    Embedded { http: u16 },
    Mosquitto,
}

struct Broker {
    name: &'static str,
    kind: Kind,
    port: u16,
    pid: u32,
    _proc: Option<(Proc, tempfile::TempDir)>,
    _mosq: Option<Mosquitto>,
}

impl Broker {
    fn embedded(queue: usize, sessions: usize) -> Broker {
        let dir = tempfile::tempdir().expect("tempdir");
        let http = free_port();
        let queue = queue.to_string();
        // Room for every session, the publisher and its second connection.
        let max_sessions = (sessions + 10).max(10_000).to_string();
        let (p, port) = support::start_broker_http(
            dir.path(),
            &[
                ("NEXUS_BROKER__MAX_MQUEUE_LEN", &queue),
                ("NEXUS_BROKER__MAX_SESSIONS", &max_sessions),
            ],
            http,
        );
        Broker {
            name: "embedded (rmqtt)",
            kind: Kind::Embedded { http },
            port,
            pid: p.0.id(),
            _proc: Some((p, dir)),
            _mosq: None,
        }
    }

    fn mosquitto(queue: usize) -> Broker {
        // After the harness's own settings, so these win: the same queue bound as the
        // embedded broker, and $SYS every second to read the drops.
        let m = Mosquitto::start(&format!("max_queued_messages {queue}\nsys_interval 1\n"))
            .expect("mosquitto installed (scripts/deps.sh)");
        Broker {
            name: "mosquitto",
            kind: Kind::Mosquitto,
            port: m.port,
            pid: m.pid(),
            _proc: None,
            _mosq: Some(m),
        }
    }

    fn login(&self, user: (&'static str, &'static str)) -> Option<(&'static str, &'static str)> {
        match self.kind {
            Kind::Embedded { .. } => Some(user),
            Kind::Mosquitto => None,
        }
    }

    /// Sessions held, clients connected and messages dropped at a full queue, as the broker
    /// reports them.
    fn counters(&self, rt: &tokio::runtime::Runtime) -> Counters {
        match self.kind {
            Kind::Embedded { http } => {
                let m = http_get(http, "/metrics");
                let full = "nexus_broker_messages_dropped_total{reason=\"queue_full\"} ";
                Counters {
                    sessions: Some(metric_sum(&m, "nexus_broker_sessions")),
                    connected: Some(metric_sum(&m, "nexus_broker_connections")),
                    dropped: m.lines().find_map(|l| l.strip_prefix(full)?.parse().ok()),
                }
            }
            Kind::Mosquitto => {
                const TOTAL: &str = "$SYS/broker/clients/total";
                const CONNECTED: &str = "$SYS/broker/clients/connected";
                const DROPPED: &str = "$SYS/broker/publish/messages/dropped";
                let v = rt.block_on(mosquitto_sys(self.port, &[TOTAL, CONNECTED, DROPPED]));
                // The $SYS reader is one of the clients by the last update.
                let get = |t: &str| v.get(t).and_then(|c| c.parse::<f64>().ok());
                Counters {
                    sessions: get(TOTAL).map(|c| c - 1.0),
                    connected: get(CONNECTED).map(|c| c - 1.0),
                    dropped: get(DROPPED),
                }
            }
        }
    }
}

struct Counters {
    sessions: Option<f64>,
    connected: Option<f64>,
    dropped: Option<f64>,
}

struct Figures {
    idle: u64,
    sessions: u64,
    /// After each round.
    rounds: Vec<u64>,
    peak: u64,
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn show(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.0}"))
}

fn main() {
    let sessions = env("BENCH_SESSIONS", 5000) as usize;
    let queue = env("BENCH_QUEUE", 1000) as usize;
    let messages = env("BENCH_MESSAGES", queue as u64 + 200) as usize;
    let rounds = env("BENCH_ROUNDS", 4).max(1) as usize;
    let batch = env("BENCH_BATCH", 200).max(1) as usize;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let size = topic(0).len() + payload(0).len();
    println!(
        "persistent sessions benchmark: {sessions} sessions (MQTT 3.1.1, clean session 0) subscribed to # at QoS 1, then offline; \
         queue bound {queue} per client; {rounds} rounds of {messages} QoS 1 messages ({size} bytes of topic and payload each)"
    );
    let queued = (sessions * messages.min(queue)) as f64;
    let mut figures = HashMap::new();
    let brokers: [fn(usize, usize) -> Broker; 2] =
        [Broker::embedded, |queue, _| Broker::mosquitto(queue)];
    for start in brokers {
        let b = start(queue, sessions);
        std::thread::sleep(Duration::from_secs(1));
        let idle = settled_rss(b.pid, Duration::from_secs(10));

        let t = Instant::now();
        rt.block_on(open_sessions(b.port, sessions, batch, b.login(VIEWER_USER)));
        let opened = t.elapsed();
        // Every client gone before measuring: the sessions are offline.
        let t = Instant::now();
        let mut c = b.counters(&rt);
        while c.connected.is_some_and(|n| n > 0.0) && t.elapsed() < STEP {
            std::thread::sleep(Duration::from_millis(200));
            c = b.counters(&rt);
        }
        let with_sessions = settled_rss(b.pid, Duration::from_secs(30));
        println!(
            "{}: {sessions} sessions opened in {:.1} s; broker's count: {} sessions held, {} clients connected",
            b.name,
            opened.as_secs_f64(),
            show(c.sessions),
            show(c.connected)
        );

        let mut after = Vec::new();
        for round in 0..rounds {
            let took = rt.block_on(publish_round(
                b.port,
                b.login(PUBLISHER_USER),
                round * messages,
                messages,
            ));
            let rss = settled_rss(b.pid, Duration::from_secs(120));
            let dropped = b.counters(&rt).dropped;
            let expected = sessions * ((round + 1) * messages).saturating_sub(queue);
            println!(
                "{}: round {} published and acknowledged in {:.1} s ({:.0} messages x sessions per s); RSS {:.1} MiB; dropped at a full queue {} (bound {queue} per session: {expected} expected)",
                b.name,
                round + 1,
                took.as_secs_f64(),
                (sessions * messages) as f64 / took.as_secs_f64(),
                mib(rss),
                show(dropped)
            );
            after.push(rss);
        }
        figures.insert(
            b.name,
            Figures {
                idle,
                sessions: with_sessions,
                rounds: after,
                peak: status_kib(b.pid, "VmHWM:"),
            },
        );
    }

    println!();
    println!(
        "{:<18} {:>10} {:>12} {:>12} {:>12} {:>12} {:>10} {:>10} {:>13}",
        "RSS",
        "idle",
        "+ sessions",
        "+ round 1",
        format!("+ round {rounds}"),
        "last round",
        "peak",
        "B/session",
        "B/queued msg"
    );
    let per = |f: &Figures| {
        (
            (f.sessions.saturating_sub(f.idle) * 1024) as f64 / sessions as f64,
            (f.rounds[0].saturating_sub(f.sessions) * 1024) as f64 / queued,
        )
    };
    for name in ["embedded (rmqtt)", "mosquitto"] {
        let f = &figures[name];
        let (s, q) = per(f);
        let last = f.rounds[rounds - 1] as f64;
        let before = f.rounds[rounds.saturating_sub(2)] as f64;
        println!(
            "{name:<18} {:>7.1}MiB {:>9.1}MiB {:>9.1}MiB {:>9.1}MiB {:>+9.1}MiB {:>7.1}MiB {:>10.0} {:>13.0}",
            mib(f.idle),
            mib(f.sessions),
            mib(f.rounds[0]),
            mib(f.rounds[rounds - 1]),
            (last - before) / 1024.0,
            mib(f.peak),
            s,
            q
        );
    }
    println!(
        "(last round: RSS growth during the last round, the queues already full; B/queued msg: growth in round 1 over the {queued:.0} messages it left queued)"
    );
    let (e, m) = (&figures["embedded (rmqtt)"], &figures["mosquitto"]);
    let ratio = |a: u64, b: u64| a as f64 / b.max(1) as f64;
    let ((es, eq), (ms, mq)) = (per(e), per(m));
    println!(
        "RSS embedded / mosquitto: idle {:.1}x, with sessions {:.1}x, after round 1 {:.1}x, after round {rounds} {:.1}x, peak {:.1}x; per session {:.1}x, per queued message {:.1}x",
        ratio(e.idle, m.idle),
        ratio(e.sessions, m.sessions),
        ratio(e.rounds[0], m.rounds[0]),
        ratio(e.rounds[rounds - 1], m.rounds[rounds - 1]),
        ratio(e.peak, m.peak),
        es / ms.max(1e-9),
        eq / mq.max(1e-9)
    );
}
