//! Helpers shared by the benchmarks: child processes, /proc readings, HTTP and metrics.
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nexus_common::config::{MqttConfig, Secret};
use nexus_common::testing::{
    self, free_port, OPERATOR_USER, PUBLISHER_USER, SERVICE_USER, VIEWER_USER,
};

pub const NEXUS: &str = env!("CARGO_BIN_EXE_nexus");

/// A number from the environment, or `default`.
pub fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A child process killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// User + system CPU seconds of a process.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// CPU seconds of a process and all its children, live or ended (a server's backends).
pub fn tree_cpu_seconds(pid: u32) -> f64 {
    let fields = |p: &str| -> Option<(u32, Vec<f64>)> {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
        let f: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
        let ppid = f.get(1)?.parse().ok()?;
        let t = (11..15)
            .map(|i| f.get(i).and_then(|v| v.parse().ok()).unwrap_or(0.0))
            .collect();
        Some((ppid, t))
    };
    // Its own time and that of its children that ended (cutime, cstime) ...
    let mut ticks = fields(&pid.to_string()).map_or(0.0, |(_, t)| t.iter().sum());
    // ... and that of the live ones.
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = e.file_name();
        let Some(p) = name
            .to_str()
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if let Some((_, t)) = fields(p).filter(|(ppid, _)| *ppid == pid) {
            ticks += t[0] + t[1];
        }
    }
    ticks / 100.0
}

/// Busy CPU seconds of the whole machine (all cores), from /proc/stat.
pub fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    let busy: f64 =
        f.iter().take(8).sum::<f64>() - f.get(3).unwrap_or(&0.0) - f.get(4).unwrap_or(&0.0);
    busy / 100.0
}

/// A field of /proc/<pid>/status in KiB (`VmRSS:`, `VmHWM:`).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

pub fn http_get(port: u16, path: &str) -> String {
    use std::io::Read;
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Sum of every sample of a metric family.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{') | Some(b' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The accounts of [`start_broker`]: the test harness's names and passwords, each password
/// handed to the broker process in its own environment variable (a plain password in the
/// file is refused).
pub const USERS: [(&str, &str, &str); 4] = [
    (SERVICE_USER.0, SERVICE_USER.1, "role: service"),
    (
        PUBLISHER_USER.0,
        PUBLISHER_USER.1,
        "role: publisher, publish: [\"#\"]",
    ),
    (OPERATOR_USER.0, OPERATOR_USER.1, "role: operator"),
    (VIEWER_USER.0, VIEWER_USER.1, "role: viewer"),
];

/// The environment variable holding `user`'s password for the broker process.
fn password_env(user: &str) -> String {
    format!("NEXUS_BENCH_PW_{}", user.to_uppercase())
}

/// MQTT settings for a broker on 127.0.0.1:`port` logged in as `user` (`(name, password)`,
/// e.g. [`PUBLISHER_USER`]), or anonymous with `None` (Mosquitto).
pub fn mqtt_as(port: u16, user: Option<(&str, &str)>) -> MqttConfig {
    let mut c = testing::mqtt_config(port);
    if let Some((name, password)) = user {
        c.username = Some(name.into());
        c.password = Some(Secret::new(password));
    }
    c
}

/// The `mqtt` section (YAML flow mapping, without braces) of a Nexus service logging in to
/// the broker on `port` as the service account.
pub fn service_mqtt_yaml(port: u16) -> String {
    format!(
        "host: 127.0.0.1, port: {port}, username: {}, password: {}",
        SERVICE_USER.0, SERVICE_USER.1
    )
}

/// Broker queues that hold a whole run, for clients and Nexus's services alike: a throughput
/// bench's publisher outruns its subscribers, and the default bounds (1,000 per client,
/// 100,000 per service) would drop QoS 1 messages, which is what they are for, but not what
/// these benches measure. The harness's Mosquitto lifts its queue limit the same way.
pub const QUEUES_HOLD_THE_RUN: &[(&str, &str)] = &[
    ("NEXUS_BROKER__MAX_MQUEUE_LEN", "10000000"),
    ("NEXUS_BROKER__SERVICE_MQUEUE_LEN", "10000000"),
];

/// `nexus gateway --config cfg`, with environment overrides (`NEXUS_GATEWAY__...`).
pub fn start_gateway(cfg: &Path, env: &[(&str, &str)]) -> Proc {
    Proc(
        Command::new(NEXUS)
            .args(["gateway", "--config"])
            .arg(cfg)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .spawn()
            .expect("nexus gateway"),
    )
}

/// `nexus broker` on a free port with the accounts of [`USERS`]: `svc` (service), `pub`
/// (publisher of any topic outside `$`), `op` (operator), `view` (viewer).
pub fn start_broker(dir: &Path) -> (Proc, u16) {
    start_broker_with(dir, &[])
}

/// [`start_broker`] with extra environment overrides (`NEXUS_BROKER__...`).
pub fn start_broker_with(dir: &Path, env: &[(&str, &str)]) -> (Proc, u16) {
    start_broker_http(dir, env, free_port())
}

/// [`start_broker_with`], serving its health and metrics on 127.0.0.1:`http`.
pub fn start_broker_http(dir: &Path, env: &[(&str, &str)], http: u16) -> (Proc, u16) {
    let port = free_port();
    let cfg = dir.join(format!("broker-{port}.yaml"));
    let mut yaml = String::from("auth:\n  users:\n");
    for (user, _, role) in USERS {
        yaml.push_str(&format!(
            "    - {{ username: {user}, password_env: {}, {role} }}\n",
            password_env(user)
        ));
    }
    std::fs::write(&cfg, yaml).expect("write");
    let mut p = Proc(
        Command::new(NEXUS)
            .args(["broker", "--config"])
            .arg(&cfg)
            .envs(USERS.map(|(user, pw, _)| (password_env(user), pw)))
            .env("NEXUS_BROKER__PORT", port.to_string())
            .env("NEXUS_BROKER__WS_PORT", "null")
            // Its own durable state: the default (`nexus-data/broker` in the working
            // directory) would carry one run's sessions and messages into the next.
            .env(
                "NEXUS_BROKER__STATE_DIR",
                dir.join(format!("broker-state-{port}")),
            )
            .env(
                "NEXUS_ORCHESTRATOR__HTTP_LISTEN",
                format!("127.0.0.1:{http}"),
            )
            .env("NEXUS_TELEMETRY__LOG_LEVEL", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .spawn()
            .expect("nexus broker"),
    );
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = p.0.try_wait() {
            panic!("nexus broker exited with {status} (its errors are above)");
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "nexus broker did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (p, port)
}

/// `devices` Modbus simulators whose registers 100.. (`tags` of them, the tags of
/// [`load_devices`]) all change at every read of them, so at every poll.
pub async fn churning_modbus_sims(
    devices: usize,
    tags: usize,
    poll_ms: u64,
) -> Vec<nexus_devices::simulator::modbus::ModbusSimulator> {
    let mut v = Vec::new();
    for _ in 0..devices {
        let s = nexus_devices::simulator::modbus::ModbusSimulator::start(
            "127.0.0.1:0".parse().expect("addr"),
            Some(Duration::from_millis(poll_ms)),
        )
        .await
        .expect("simulator");
        s.registers.lock().expect("lock").churn = 100..100 + tags;
        v.push(s);
    }
    v
}

/// YAML of `n` Modbus devices of `tags` uint16 tags each, on the given simulator ports.
pub fn load_devices(ports: &[u16], tags: usize, poll_ms: u64) -> String {
    let mut yaml = String::new();
    for (d, port) in ports.iter().enumerate() {
        yaml.push_str(&format!(
            "  - id: dev-{d}\n    protocol: modbus\n    uns_prefix: bench/site/area/line\n    poll_interval: {poll_ms}ms\n    connection: {{ host: 127.0.0.1, port: {port}, timeout: 2s }}\n    tags:\n"
        ));
        for t in 0..tags {
            yaml.push_str(&format!(
                "      - {{ id: t{t}, address: \"HR:{}\", data_type: uint16 }}\n",
                100 + t
            ));
        }
    }
    yaml
}
