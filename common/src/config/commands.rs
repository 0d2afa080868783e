//! `commands`: the command handler.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::types::{duration, listen, ByteSize};
use super::Problems;

/// `commands`: the command handler.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandsConfig {
    /// HTTP for health and metrics (default 0.0.0.0:4100).
    pub http_listen: SocketAddr,
    /// Commands waiting to run (default 1000); when full a command is answered "queue full".
    pub queue_size: usize,
    /// Writes running at once (default 50).
    pub max_in_flight: usize,
    /// Writes per second per device, and burst (defaults 20 and 20).
    pub rate_per_device: u32,
    pub burst_per_device: u32,
    /// Writes per second in all, and burst (defaults 200 and 200).
    pub rate_global: u32,
    pub burst_global: u32,
    /// A command older than this (from its `ts`, or from its arrival) is refused, unless it
    /// sets its own `ttl_ms` (default 10s).
    #[serde(with = "duration")]
    pub ttl: Duration,
    /// Longest a device write may take (default 5s).
    #[serde(with = "duration")]
    pub write_timeout: Duration,
    /// A repeated `request_id` within this window is answered from the first result (default 60s).
    #[serde(with = "duration")]
    pub dedup_window: Duration,
    /// Most answered `request_id`s kept for `dedup_window` (default 10000; an id and its answer
    /// count once per started 256 bytes). The oldest answer is forgotten for a new one, so a
    /// repeat of it runs again (`nexus_commands_state_*{map="dedup"}`).
    pub dedup_max_entries: usize,
    /// Largest command payload (default 64KiB).
    pub max_payload: ByteSize,
    /// Speak MQTT 5 so Response Topic and Correlation Data are honoured (default true).
    pub mqtt_v5: bool,
    /// Where the request ids of commands are kept on disk, so that a repeat after a restart
    /// is answered and never run again (default `nexus-data/commands`).
    pub journal_dir: PathBuf,
}

impl Default for CommandsConfig {
    fn default() -> Self {
        CommandsConfig {
            http_listen: listen(4100),
            queue_size: 1000,
            max_in_flight: 50,
            rate_per_device: 20,
            burst_per_device: 20,
            rate_global: 200,
            burst_global: 200,
            ttl: Duration::from_secs(10),
            write_timeout: Duration::from_secs(5),
            dedup_window: Duration::from_secs(60),
            dedup_max_entries: 10_000,
            max_payload: ByteSize(64 * 1024),
            mqtt_v5: true,
            journal_dir: PathBuf::from("nexus-data/commands"),
        }
    }
}

impl CommandsConfig {
    pub(crate) fn validate(&self, p: &mut Problems) {
        for (key, v) in [
            ("queue_size", self.queue_size),
            ("max_in_flight", self.max_in_flight),
            ("rate_per_device", self.rate_per_device as usize),
            ("burst_per_device", self.burst_per_device as usize),
            ("rate_global", self.rate_global as usize),
            ("burst_global", self.burst_global as usize),
            ("dedup_max_entries", self.dedup_max_entries),
        ] {
            if v == 0 {
                p.push(format!("commands.{key}"), "must be at least 1");
            }
        }
        if self.write_timeout.is_zero() {
            p.push("commands.write_timeout", "must be positive");
        }
    }
}

#[cfg(test)]
mod bound_tests {
    use crate::config::tests::problems;
    use crate::config::Config;

    #[test]
    fn the_dedup_bound_has_a_default_and_refuses_zero() {
        let c = Config::from_str_with_env("{}", None, &[]).unwrap();
        assert_eq!(c.commands.dedup_max_entries, 10_000);
        let e = problems("commands:\n  dedup_max_entries: 0\n");
        assert!(
            e.contains("commands.dedup_max_entries: must be at least 1"),
            "{e}"
        );
    }
}
