//! Helpers shared by the benchmarks: child processes, /proc readings, HTTP and metrics.
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nexus_common::testing::free_port;

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

/// `nexus broker` on a free port with users `svc` (service) and `op` (operator).
pub fn start_broker(dir: &Path) -> (Proc, u16) {
    start_broker_with(dir, &[])
}

/// [`start_broker`] with extra environment overrides (`NEXUS_BROKER__...`).
pub fn start_broker_with(dir: &Path, env: &[(&str, &str)]) -> (Proc, u16) {
    let port = free_port();
    let cfg = dir.join("broker.yaml");
    std::fs::write(&cfg, "broker:\n  users:\n    - { username: svc, password: svc-pw, role: service }\n    - { username: op, password: op-pw, role: operator }\n").expect("write");
    let p = Proc(
        Command::new(NEXUS)
            .args(["broker", "--config"])
            .arg(&cfg)
            .env("NEXUS_BROKER__PORT", port.to_string())
            .env("NEXUS_BROKER__WS_PORT", "null")
            .env(
                "NEXUS_ORCHESTRATOR__HTTP_LISTEN",
                format!("127.0.0.1:{}", free_port()),
            )
            .env("NEXUS_TELEMETRY__LOG_LEVEL", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .spawn()
            .expect("nexus broker"),
    );
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(50));
    }
    (p, port)
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
