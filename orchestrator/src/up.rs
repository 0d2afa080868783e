//! `nexus up`: the whole platform in one process.

use std::net::SocketAddr;
use std::sync::Arc;

use nexus_common::auth::Identities;
use nexus_common::broker::{Acl, EmbeddedBroker};
use nexus_common::config::{Config, Role, Secret, UserConfig};
use nexus_common::supervise::{RestartPolicy, Supervisor};
use nexus_common::telemetry::Telemetry;
use rand::distr::{Alphanumeric, SampleString};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::status;
use nexus_devices::simulator::modbus::ModbusSimulator;
use nexus_devices::simulator::opcua::{OpcUaSimOptions, OpcUaSimulator};

/// Name of the account `nexus up` creates for its own services on the embedded broker.
pub const INTERNAL_USER: &str = "nexus-internal";
/// The demo operator login (`nexus up --demo` with no users configured).
pub const DEMO_OPERATOR: (&str, &str) = ("operator", "nexus-demo");
/// The demo admin login (`nexus up --demo` with no users configured): may change devices.
pub const DEMO_ADMIN: (&str, &str) = ("admin", "nexus-demo");
/// The devices file of `nexus up` when the configuration names no devices: the control
/// center adds devices there.
pub const DEVICES_FILE: &str = "nexus-data/devices.yaml";

#[derive(Debug, Clone, Copy, Default)]
pub struct UpOptions {
    pub demo: bool,
}

/// The demo's devices (deploy/examples/modbus-sim.yaml), pointed at the simulator's port.
pub const DEMO_DEVICES: &str = include_str!("../../deploy/examples/modbus-sim.yaml");

/// The demo's OPC UA device (deploy/examples/opcua-sim.yaml).
pub const DEMO_OPCUA_DEVICES: &str = include_str!("../../deploy/examples/opcua-sim.yaml");

/// The demo's simulated devices.
pub struct DemoSims {
    pub modbus: ModbusSimulator,
    pub opcua: OpcUaSimulator,
}

/// Start the demo's Modbus simulator (port 5020) and OPC UA simulator (port 4840), or free
/// ports if those are taken, and add their devices to `cfg`.
async fn start_demo_devices(cfg: &mut Config) -> anyhow::Result<DemoSims> {
    let tick = Some(std::time::Duration::from_millis(100));
    let sim = match ModbusSimulator::start("127.0.0.1:5020".parse()?, tick).await {
        Ok(s) => s,
        Err(_) => ModbusSimulator::start("127.0.0.1:0".parse()?, tick).await?,
    };
    let mut demo_entries = demo_entries(DEMO_DEVICES, |c| {
        c.insert("port".into(), json!(sim.addr.port()));
    })?;
    let ua_opts = |port| OpcUaSimOptions {
        port,
        pki_dir: "nexus-data/pki-simulator".into(),
        step: std::time::Duration::from_millis(500),
        ..OpcUaSimOptions::default()
    };
    let ua = match OpcUaSimulator::start(ua_opts(4840)).await {
        Ok(s) => s,
        Err(_) => OpcUaSimulator::start(ua_opts(0)).await?,
    };
    demo_entries.extend(demo_entries_of_opcua(&ua.endpoint)?);
    add_demo_devices(cfg, demo_entries)?;
    Ok(DemoSims {
        modbus: sim,
        opcua: ua,
    })
}

/// The device entries of a demo file, each connection changed by `point`.
fn demo_entries(
    text: &str,
    point: impl Fn(&mut serde_json::Map<String, serde_json::Value>),
) -> anyhow::Result<Vec<serde_json::Value>> {
    let (tree, _) = nexus_common::config::yaml::parse(text)
        .map_err(|(msg, pos)| anyhow::anyhow!("demo devices line {}: {msg}", pos.line))?;
    let mut list = match tree.get("devices") {
        Some(serde_json::Value::Array(a)) => a.clone(),
        _ => anyhow::bail!("demo devices: no list"),
    };
    for d in &mut list {
        if let Some(c) = d
            .get_mut("connection")
            .and_then(serde_json::Value::as_object_mut)
        {
            point(c);
        }
    }
    Ok(list)
}

fn demo_entries_of_opcua(endpoint: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    demo_entries(DEMO_OPCUA_DEVICES, |c| {
        c.insert("endpoint".into(), json!(endpoint));
    })
}

/// The demo's devices: into the devices file of `nexus up` when it is ours (so the control
/// center shows and edits them; an entry of the same id is updated to the simulator's
/// address, others are left alone), else beside the configured devices, in memory.
fn add_demo_devices(cfg: &mut Config, entries: Vec<serde_json::Value>) -> anyhow::Result<()> {
    let id = |d: &serde_json::Value| d.get("id").and_then(|v| v.as_str()).map(str::to_owned);
    match cfg.devices_file.clone().filter(|_| cfg.devices_pinned) {
        Some(path) => {
            let text = std::fs::read_to_string(&path)?;
            let (tree, _) = nexus_common::config::yaml::parse(&text).map_err(|(msg, pos)| {
                anyhow::anyhow!("{} line {}: {msg}", path.display(), pos.line)
            })?;
            let mut list = match tree.get("devices") {
                Some(serde_json::Value::Array(a)) => a.clone(),
                _ => Vec::new(),
            };
            for e in entries {
                match list.iter_mut().find(|d| id(d) == id(&e)) {
                    Some(d) => {
                        if let (Some(dc), Some(ec)) = (
                            d.get_mut("connection").and_then(|c| c.as_object_mut()),
                            e.get("connection").and_then(|c| c.as_object()),
                        ) {
                            for k in ["port", "endpoint"] {
                                if let Some(v) = ec.get(k) {
                                    dc.insert(k.into(), v.clone());
                                }
                            }
                        }
                    }
                    None => list.push(e),
                }
            }
            let out = nexus_common::config::yaml::to_yaml(&json!({ "devices": list }));
            crate::control::write_atomically(&path, out.as_bytes())?;
            cfg.pin_devices_file(&path)
                .map_err(|e| anyhow::anyhow!("demo devices: {e}"))?;
        }
        None => {
            let text = nexus_common::config::yaml::to_yaml(&json!({ "devices": entries }));
            let demo = Config::from_str_with_env(&text, None, &[])
                .map_err(|e| anyhow::anyhow!("demo devices: {e}"))?;
            for d in demo.devices {
                if !cfg.devices.iter().any(|x| x.id == d.id) {
                    cfg.devices.push(d);
                }
            }
        }
    }
    Ok(())
}

fn shown(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("http://127.0.0.1:{}", addr.port())
    } else {
        format!("http://{addr}")
    }
}

/// Start everything, print where it is, and run until `shutdown` (or a component that keeps
/// crashing) stops it.
pub async fn up(
    mut cfg: Config,
    opts: UpOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let telemetry = Telemetry::new(status::SERVICE);
    let mut demo_login = None;
    if cfg.devices_file.is_none() && cfg.devices.is_empty() {
        // Nothing configured: devices live in a file of ours, which the control center edits.
        cfg.pin_devices_file(std::path::Path::new(DEVICES_FILE))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let demo_sim = if opts.demo {
        Some(start_demo_devices(&mut cfg).await?)
    } else {
        None
    };
    let mut broker = None;
    let mut namespaces = None;
    if cfg.broker.enabled {
        if opts.demo && cfg.auth.users.is_empty() {
            for ((user, password), role) in
                [(DEMO_OPERATOR, Role::Operator), (DEMO_ADMIN, Role::Admin)]
            {
                cfg.auth
                    .users
                    .push(UserConfig::with_password(user, password, role));
            }
            demo_login = Some(DEMO_OPERATOR);
        }
        if cfg.mqtt.username.is_none() {
            // The services reach the embedded broker with a random service credential, so
            // only they may publish device values, status, responses and other system topics.
            let password = Alphanumeric.sample_string(&mut rand::rng(), 32);
            cfg.auth.users.push(UserConfig::with_password(
                INTERNAL_USER,
                &password,
                Role::Service,
            ));
            cfg.mqtt.username = Some(INTERNAL_USER.into());
            cfg.mqtt.password = Some(Secret::new(password));
        }
        let acl = Acl::new(
            Arc::new(Identities::new(&cfg.auth)?),
            &cfg.broker,
            &cfg.devices,
        );
        namespaces = Some(acl.device_namespaces());
        let bcfg = cfg.broker.clone();
        let registry = telemetry.registry.clone();
        let b = tokio::task::spawn_blocking(move || EmbeddedBroker::start(&bcfg, acl, &registry))
            .await??;
        match (b.ports.tcp, b.ports.tls) {
            (Some(tcp), _) => {
                cfg.mqtt.host = "127.0.0.1".into();
                cfg.mqtt.port = Some(tcp.port());
                cfg.mqtt.tls = None;
            }
            // A TLS-only broker: the services connect over TLS too, with `mqtt.tls` (the CA
            // that signed the broker's certificate) and `mqtt.host` (a name the certificate
            // holds).
            (None, Some(tls)) if cfg.mqtt.tls.is_some() => cfg.mqtt.port = Some(tls.port()),
            (None, _) => anyhow::bail!(
                "broker.port is null (TLS only): set mqtt.tls.ca_file and mqtt.host so that \
                 Nexus's services can reach the embedded broker over TLS"
            ),
        }
        broker = Some(b);
    }
    let with_ingestion = cfg.database.url.is_some();
    // The control center reaches the other services through the orchestrator's port. Over
    // HTTPS (http.tls) name them in orchestrator.upstreams, with a certificate valid for the
    // name used.
    if cfg.http.tls.is_none() {
        let local = |a: SocketAddr| {
            let host = if a.ip().is_unspecified() {
                "127.0.0.1".to_owned()
            } else {
                a.ip().to_string()
            };
            format!("http://{host}:{}", a.port())
        };
        let ups = &mut cfg.orchestrator.upstreams;
        if ups.ingestion.is_none() && with_ingestion {
            ups.ingestion = Some(local(cfg.ingestion.http_listen));
        }
        if ups.alerts.is_none() {
            ups.alerts = Some(local(cfg.alerts.http_listen));
        }
    }
    let platform = json!({
        "mode": if opts.demo { "up --demo" } else { "up" },
        "config": cfg.source_name(),
        "broker": broker.as_ref().map(|b| json!({
            "tcp": b.ports.tcp.map(|a| a.to_string()),
            "websocket": b.ports.ws.map(|a| a.to_string()),
            "tls": b.ports.tls.map(|a| a.to_string()),
        })),
        "ingestion": with_ingestion,
    });
    let cfg = Arc::new(cfg);
    // A device added or changed at runtime is reserved for the gateway at once.
    if let (Some(ns), true) = (namespaces, cfg.gateway.watch_devices_file) {
        let (c, tok) = (cfg.clone(), shutdown.clone());
        tokio::spawn(async move {
            c.watch(std::time::Duration::from_secs(2), tok, |new| {
                ns.set(&new.devices)
            })
            .await
        });
    }
    let policy = RestartPolicy {
        max_restarts: cfg.orchestrator.max_restarts,
        window: cfg.orchestrator.restart_window,
        ..RestartPolicy::default()
    };
    let sup = Supervisor::new(shutdown.clone(), policy, &telemetry.registry)?;
    {
        // The command handler runs beside the gateway on the same device sessions (small PLCs
        // allow few connections); the two are supervised, and restarted, together.
        if with_ingestion {
            let c = cfg.clone();
            sup.spawn(nexus_data_ingestion::SERVICE, move |tok| {
                nexus_data_ingestion::run(c.clone(), tok)
            });
            // On a first start the historian's session does not exist yet: what the gateway
            // published before it subscribed would reach nobody. The gateway waits for it
            // (briefly: a historian that cannot start must not stop the polling).
            if let Some(b) = &broker {
                let id =
                    nexus_common::service::service_client_id(&cfg, nexus_data_ingestion::SERVICE);
                let end = std::time::Instant::now() + std::time::Duration::from_secs(15);
                while !b.has_subscriber(&id) && std::time::Instant::now() < end {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                if !b.has_subscriber(&id) {
                    tracing::warn!(client_id = %id, "the historian has not subscribed after 15 s; the gateway starts anyway");
                }
            }
        }
        let c = cfg.clone();
        sup.spawn(nexus_protocol_gateway::SERVICE, move |tok| {
            crate::gateway_with_commands(c.clone(), tok)
        });
        let c = cfg.clone();
        sup.spawn(nexus_alert_service::SERVICE, move |tok| {
            nexus_alert_service::run(c.clone(), tok)
        });
        let c = cfg.clone();
        let t = telemetry.clone();
        // Made once: it keeps its metrics and topics when the orchestrator restarts.
        let ns = crate::live::Namespace::new(&telemetry.registry)?;
        sup.spawn(status::SERVICE, move |tok| {
            status::run_with(c.clone(), t.clone(), platform.clone(), ns.clone(), tok)
        });
    }

    print_banner(
        &cfg,
        broker.as_ref(),
        with_ingestion,
        demo_login,
        demo_sim
            .as_ref()
            .map(|s| (s.modbus.addr, s.opcua.endpoint.clone())),
    );
    let result = sup.wait(cfg.orchestrator.shutdown_grace).await;
    if let Some(b) = broker {
        let _ = tokio::task::spawn_blocking(move || b.stop()).await;
    }
    result?;
    println!("Nexus stopped.");
    Ok(())
}

fn print_banner(
    cfg: &Config,
    broker: Option<&EmbeddedBroker>,
    ingestion: bool,
    demo: Option<(&str, &str)>,
    sim: Option<(SocketAddr, String)>,
) {
    let mut out = String::new();
    out.push_str(&format!(
        "Nexus {} is up (config: {})\n",
        env!("CARGO_PKG_VERSION"),
        cfg.source_name()
    ));
    match broker {
        Some(b) => {
            let ws = b
                .ports
                .ws
                .map(|a| format!("ws://127.0.0.1:{}/mqtt", a.port()))
                .unwrap_or_else(|| "off".into());
            let tls = b
                .ports
                .tls
                .map(|a| format!("mqtts://127.0.0.1:{}", a.port()))
                .unwrap_or_else(|| "off".into());
            let wss = b
                .ports
                .wss
                .map(|a| format!("; secure WebSocket wss://127.0.0.1:{}/mqtt", a.port()))
                .unwrap_or_default();
            let plain = match b.ports.tcp {
                Some(a) => format!("mqtt://127.0.0.1:{}  (listening on {a}", a.port()),
                None => "plain MQTT off  (".to_owned(),
            };
            out.push_str(&format!(
                "  MQTT broker   {plain}; WebSocket {ws}; TLS {tls}{wss}; anonymous: {})\n",
                match cfg.auth.anonymous {
                    nexus_common::config::Anonymous::Off => "off",
                    nexus_common::config::Anonymous::Loopback => "read-only from this machine",
                    nexus_common::config::Anonymous::Any => "read-only from anywhere",
                }
            ));
        }
        None => out.push_str(&format!(
            "  MQTT broker   external: {}:{}\n",
            cfg.mqtt.host,
            cfg.mqtt.effective_port()
        )),
    }
    out.push_str(&format!(
        "  gateway       {}  (/healthz /readyz /metrics)\n",
        shown(cfg.gateway.http_listen)
    ));
    out.push_str(&format!(
        "  commands      {}\n",
        shown(cfg.commands.http_listen)
    ));
    out.push_str(&format!(
        "  alerts        {}\n",
        shown(cfg.alerts.http_listen)
    ));
    if ingestion {
        out.push_str(&format!(
            "  ingestion     {}  (/api/v1/history?topic=..., /api/v1/latest?filter=...; database {})\n",
            shown(cfg.ingestion.http_listen),
            cfg.database
                .url
                .as_ref()
                .map_or_else(String::new, |u| u.redacted())
        ));
    } else {
        out.push_str("  ingestion     off (no database: set NEXUS_DATABASE_URL or database.url)\n");
    }
    out.push_str(&format!(
        "  orchestrator  {}  (/api/v1/status, /api/openapi.json)\n",
        shown(cfg.orchestrator.http_listen)
    ));
    out.push_str(&format!(
        "  control center {}/  (open it in a browser)\n",
        shown(cfg.orchestrator.http_listen)
    ));
    out.push_str(&format!(
        "  devices       {} configured\n",
        cfg.devices.len()
    ));
    if let Some((addr, ua)) = sim {
        out.push_str(&format!(
            "  simulator     Modbus TCP on {addr}: device sim-plc-1 -> demo/plant/packaging/line-1/sim-plc-1/<tag>\n"
        ));
        out.push_str(&format!(
            "  simulator     OPC UA at {ua}: device sim-ua-1 -> demo/plant/packaging/line-2/sim-ua-1/<tag>\n"
        ));
    }
    if let Some((u, p)) = demo {
        out.push_str(&format!(
            "  demo login    {u} / {p}  (operator: may publish $nexus/cmd/#)\n"
        ));
        let (a, ap) = DEMO_ADMIN;
        out.push_str(&format!(
            "  demo admin    {a} / {ap}  (may change devices in the control center)\n"
        ));
    }
    if let Some(f) = cfg.devices_file.as_ref().filter(|_| cfg.devices_pinned) {
        out.push_str(&format!(
            "  devices file  {}  (edited by the control center)\n",
            f.display()
        ));
    }
    if let Some(tcp) = broker.and_then(|b| b.ports.tcp) {
        out.push_str(&format!(
            "Watch the namespace:  mosquitto_sub -h 127.0.0.1 -p {} -t '#' -v\n",
            tcp.port()
        ));
        out.push_str(&format!(
            "Watch system topics:  mosquitto_sub -h 127.0.0.1 -p {} -t '$nexus/#' -v\n",
            tcp.port()
        ));
    }
    out.push_str("Stop with Ctrl-C.\n");
    print!("{out}");
}
