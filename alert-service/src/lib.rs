//! # nexus-alert-service
//!
//! The ISA-18.2 alarm engine on the Unified Namespace (`nexus alerts`, part of `nexus up`).
//!
//! ```text
//! alerts.rules ──> [engine] rule index by topic filter (cached per topic)
//! MQTT: rule filters + setpoint topics ──> payloads (value object, or a `payloads` format)
//!   ──> condition with deadband
//!   (high_high/high/low/low_low, deviation, rate_of_change, equals, bad_quality, stale)
//!   ──> on/off delays ──> [state] ISA-18.2 machine (ack, shelve with a bound, out of service)
//!   ──> [service] engine behind a lock, outbox task, flood/chattering metrics
//!   (instances, rule cache, areas and chattering windows are bounded tables: alerts.max_*)
//!   ──> [topics] retained $nexus/alarms/<topic>/<rule> (cleared when normal and acked),
//!       $nexus/alarms/events; acknowledge on $nexus/alarms/ack or REST
//!   ──> [journal] alarm_events rows in PostgreSQL (queued, dropped and counted when full)
//!   ──> [webhook] JSON POSTs per endpoint (rate limit, retries)
//! start: retained $nexus/alarms/# read back first (clean session, so the broker sends them
//!        again), so active alarms are neither raised again nor forgotten
//! HTTP :6000: [http] GET /api/v1/alarms (?severity=, ?topic=), GET /api/v1/rules,
//!             POST /api/v1/alarms/{id}/ack|shelve|unshelve|out_of_service|in_service;
//!             /healthz /readyz /metrics from the service shell
//! rules reload: the configuration file is watched; changed rules replace the engine's, and
//!        alarms of rules with the same id, topic filter and condition keep their state
//! ```

pub mod engine;
pub mod http;
pub mod journal;
pub mod service;
pub mod state;
pub mod statefile;
pub mod topics;
pub mod webhook;

use std::sync::Arc;

use nexus_common::config::Config;
use nexus_common::mqtt::QoS;
use nexus_common::service::{Shell, ShellOptions};
use nexus_common::telemetry::Telemetry;
use tokio_util::sync::CancellationToken;

pub const SERVICE: &str = "alerts";

/// Run the alert service until `shutdown`.
pub async fn run(cfg: Arc<Config>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let telemetry = Telemetry::new(SERVICE);
    let metrics = service::AlertMetrics::new(&telemetry.registry)?;
    let engine = engine::Engine::with_limits(
        &cfg.alerts.rules,
        cfg.alerts.max_shelve.as_millis() as i64,
        metrics.engine_limits(cfg.alerts.max_instances),
    );
    let mut subscriptions = vec![(
        nexus_common::topic::sys::ALARMS_ALL.to_owned(),
        QoS::AtLeastOnce,
    )];
    let payloads = nexus_common::codec::payload::Decoder::new(&cfg.payloads)
        .map_err(|e| anyhow::anyhow!("payloads: {e}"))?;
    // A rule on a Sparkplug metric (`spBv1.0/<group>/<edge node>/<device>/<metric>`) needs
    // the group's messages, births included (they name the aliases).
    let mut filters: Vec<String> = engine
        .filters()
        .into_iter()
        .map(|f| nexus_common::codec::sparkplug_host::subscription_for(&f).unwrap_or(f))
        .collect();
    // A UMH message holds the values of topics below its own (`<topic>/<key>`), which a
    // rule's filter may match while the message's topic does not: take those messages too.
    if !filters.is_empty() {
        filters.extend(payloads.splitting_filters());
        filters.sort();
        filters.dedup();
    }
    // Many wildcard filters cost the broker a lot per message (measured with rmqtt: 1,000
    // filters cut delivery to this client several times over); past a few dozen, take the
    // whole namespace and match locally, where the per-topic rule cache makes it cheap.
    if filters.len() > 32 {
        subscriptions.push(("#".to_owned(), QoS::AtLeastOnce));
    } else {
        subscriptions.extend(filters.into_iter().map(|f| (f, QoS::AtLeastOnce)));
    }
    let rules = engine.rules().len();
    let alerts = service::Alerts::new(
        engine,
        metrics,
        cfg.alerts.max_areas,
        cfg.alerts.sparkplug_max_aliases,
    );
    alerts.set_payloads(payloads);
    if !cfg.alerts.webhooks.is_empty() {
        alerts.set_notifier(webhook::Notifier::start(
            &cfg.alerts.webhooks,
            &telemetry.registry,
            shutdown.clone(),
        )?);
    }
    let mut opts = ShellOptions::new(SERVICE, cfg.alerts.http_listen);
    opts.routes = http::routes(alerts.clone()).merge(http::journal_routes(Arc::new(
        journal::JournalReader::new(nexus_common::pg::Database::from_config(&cfg.database)),
    )));
    opts.subscriptions = subscriptions;
    opts.incoming_capacity = 10_000;
    opts.manual_acks = true;
    opts.telemetry = Some(telemetry);
    // A persistent session (`mqtt.persistent_session`): the values published while the service
    // was down come when it is back, so an excursion meanwhile is evaluated. The alarm states
    // come from `alerts.state_dir` first; a new session (or none kept) subscribes again and gets
    // the retained states and last values as well.
    // MQTT 5, so an acknowledgement carries the user the broker authenticated (nexus-user).
    opts.mqtt_v5 = true;
    let file = {
        let dir = cfg.alerts.state_dir.clone();
        tokio::task::spawn_blocking(move || {
            let f = statefile::StateFile::open(&dir)?;
            let states = f.load()?;
            Ok::<_, std::io::Error>((f, states))
        })
        .await?
        .map_err(|e| {
            anyhow::anyhow!(
                "alerts.state_dir: cannot read the alarm states in {}: {e}",
                cfg.alerts.state_dir.display()
            )
        })?
    };
    alerts.set_state_file(file.0, file.1);
    let mut shell = Shell::start(&cfg, opts, shutdown.clone()).await?;
    alerts.set_mqtt(shell.mqtt.clone());
    if let Some(db) = nexus_common::pg::Database::from_config(&cfg.database) {
        alerts.set_journal(journal::start(db, shutdown.clone()));
    }
    let incoming = shell
        .incoming
        .take()
        .ok_or_else(|| anyhow::anyhow!("no incoming channel"))?;
    tracing::info!(rules, "alert service evaluating");
    // Rules are reloaded without a restart when the configuration file changes.
    let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel(4);
    let watcher = {
        let (cfg, token) = (cfg.clone(), shutdown.clone());
        tokio::spawn(async move {
            let last = std::sync::Mutex::new(cfg.alerts.rules.clone());
            cfg.watch(std::time::Duration::from_secs(2), token, |new| {
                let mut l = last.lock().unwrap_or_else(|e| e.into_inner());
                if *l != new.alerts.rules {
                    *l = new.alerts.rules.clone();
                    let _ = reload_tx.try_send(new.alerts.rules);
                }
            })
            .await
        })
    };
    let reloader = {
        let alerts = alerts.clone();
        tokio::spawn(async move {
            while let Some(rules) = reload_rx.recv().await {
                alerts.reload(&rules).await;
            }
        })
    };
    alerts.run(incoming, shutdown).await;
    let _ = watcher.await;
    reloader.abort();
    shell.stop().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use nexus_common::config::{AlertRule, Config};

    fn rules(yaml: &str) -> Vec<AlertRule> {
        Config::from_str_with_env(&format!("alerts:\n  rules:\n{yaml}"), None, &[])
            .unwrap_or_else(|e| panic!("{e}"))
            .alerts
            .rules
    }

    /// The configuration watcher reloads the rules only when they differ from the last ones.
    #[test]
    fn a_reload_is_triggered_by_a_changed_rule_only() {
        let two = "    - { id: hot, topic: \"t/x\", condition: { type: high, limit: 80, deadband: 1.5 }, on_delay: 2s, suppress_when: { topic: \"t/run\", equals: false } }\n    - { id: run, topic: \"t/state\", condition: { type: equals, value: \"fault\" }, severity: high }\n";
        assert!(rules(two) == rules(two), "the same file read again");
        for (from, to) in [
            ("limit: 80", "limit: 81"),
            ("deadband: 1.5", "deadband: 1.25"),
            ("type: high,", "type: high_high,"),
            ("\"fault\"", "\"trip\""),
            ("equals: false", "equals: true"),
            ("on_delay: 2s", "on_delay: 3s"),
            ("severity: high", "severity: critical"),
        ] {
            assert!(
                rules(two) != rules(&two.replace(from, to)),
                "{from} -> {to}"
            );
        }
    }
}
