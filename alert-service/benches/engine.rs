//! Rule evaluation throughput: 1,000 rules over 10,000 topics (each topic watched by one
//! limit rule with a deadband), values doing a random walk that crosses the limits now and
//! then. Reports points/s on one core for evaluation alone, and, as the baseline measured in
//! the same run, the rate of only decoding the same JSON value objects.
//!
//! `cargo bench -p nexus-alert-service --bench engine`; BENCH_POINTS (2,000,000).

use std::time::Instant;

use nexus_alert_service::engine::Engine;
use nexus_common::codec::{decode_value_object, encode_value_object, ValueObject};
use nexus_common::config::Config;
use nexus_common::{Quality, Value};

fn main() {
    let n: usize = std::env::var("BENCH_POINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    let mut yaml = String::from("alerts:\n  rules:\n");
    for k in 0..1000 {
        let (kind, limit) = match k % 4 {
            0 => ("high", 90),
            1 => ("high_high", 95),
            2 => ("low", 10),
            _ => ("low_low", 5),
        };
        yaml.push_str(&format!(
            "    - {{ id: r{k}, topic: \"acme/+/+/line{}/dev{}/+\", condition: {{ type: {kind}, limit: {limit}, deadband: 1 }} }}\n",
            k % 10,
            k / 10
        ));
    }
    let cfg = Config::from_str_with_env(&yaml, None, &[]).unwrap_or_else(|e| panic!("{e}"));
    let topics: Vec<String> = (0..10_000)
        .map(|i| {
            format!(
                "acme/site/area/line{}/dev{}/tag{}",
                (i / 10) % 10,
                i / 100,
                i % 10
            )
        })
        .collect();
    let mut engine = Engine::new(&cfg.alerts.rules, 3_600_000);
    // Random walk per topic, precomputed so only the engine is timed.
    let mut state: Vec<f64> = vec![50.0; topics.len()];
    let mut seed = 0x2545F4914F6CDD1Du64;
    let mut values = Vec::with_capacity(n);
    for i in 0..n {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let t = i % topics.len();
        state[t] = (state[t] + ((seed % 2001) as f64 / 100.0 - 10.0)).clamp(0.0, 100.0);
        values.push((
            t,
            ValueObject {
                value: Some(Value::Float(state[t])),
                quality: Quality::Good,
                ts_ms: Some(i as i64),
                source_ts_ms: None,
                unit: None,
            },
        ));
    }
    let payloads: Vec<Vec<u8>> = values
        .iter()
        .take(n.min(1_000_000))
        .map(|(_, v)| encode_value_object(v))
        .collect();

    // Baseline: decoding the value objects alone.
    let start = Instant::now();
    let mut ok = 0usize;
    for p in &payloads {
        ok += decode_value_object(p).is_ok() as usize;
    }
    let decode_rate = ok as f64 / start.elapsed().as_secs_f64();

    let start = Instant::now();
    let mut changes = 0usize;
    for (i, (t, v)) in values.iter().enumerate() {
        changes += engine.on_value(&topics[*t], v, i as i64).len();
    }
    let eval_rate = n as f64 / start.elapsed().as_secs_f64();
    println!("alarm engine: 1,000 rules over 10,000 topics, {n} values, one thread");
    println!("  evaluation                 {eval_rate:>12.0} points/s ({changes} alarm changes)");
    println!("  baseline: JSON decode only {decode_rate:>12.0} points/s");
    println!(
        "  evaluation / decode        {:>12.2}x; goal >= 1,000,000 points/s per core: {}",
        eval_rate / decode_rate,
        if eval_rate >= 1_000_000.0 {
            "met"
        } else {
            "not met"
        }
    );
}
