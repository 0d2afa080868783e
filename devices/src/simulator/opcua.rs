//! `nexus simulate opcua`: an OPC UA server (async-opcua) with moving variables and writable
//! setpoints, for the demo, the tests and the subscription benchmark.
//!
//! Address space, namespace `urn:nexus:simulator` (index 2 on this server; configs may name it
//! `nsu=urn:nexus:simulator;s=...`), under `Objects/Simulator`:
//! - `Sine` (Double, period 10 s), `Ramp` (Int32, 0-99 a step), `Counter` (UInt32),
//!   `Toggle` (Boolean, flips every 5 steps), `Status` (String), `Temperature` (Float, random walk);
//! - writable: `Setpoint` (Double), `Enable` (Boolean), `Mode` (Int16), `Label` (String);
//! - `Bulk/Tag0000..` (`--bulk N` Double variables, all changing every step) for load tests.
//!
//! Endpoints: None, and Basic256Sha256, Aes128_Sha256_RsaOaep, Aes256_Sha256_RsaPss each with
//! Sign and SignAndEncrypt. Users: anonymous, and one username/password when configured.
//! Client certificates are trusted on first use (a simulator, not a server to copy).

use std::path::PathBuf;
use std::time::Duration;

use opcua::crypto::SecurityPolicy;
use opcua::server::node_manager::memory::{simple_node_manager, SimpleNodeManager};
use opcua::server::{ServerBuilder, ServerHandle, ServerUserToken, ANONYMOUS_USER_TOKEN_ID};
use opcua::types::{
    DataValue, DateTime, MessageSecurityMode, NodeId, ObjectId, QualifiedName, StatusCode, Variant,
};
use tokio_util::sync::CancellationToken;

/// The simulator's namespace URI.
pub const NAMESPACE: &str = "urn:nexus:simulator";

/// Options of a simulator.
#[derive(Debug, Clone)]
pub struct OpcUaSimOptions {
    pub host: String,
    pub port: u16,
    /// Where the server keeps its certificate (created at first start) and trusted clients.
    pub pki_dir: PathBuf,
    /// One username/password account besides anonymous.
    pub user: Option<(String, String)>,
    /// `Bulk/TagNNNN` variables.
    pub bulk: usize,
    /// Time between value changes.
    pub step: Duration,
    /// MaxNodesPerRead and MaxMonitoredItemsPerCall the server announces (0: its defaults).
    pub max_nodes_per_call: usize,
}

impl Default for OpcUaSimOptions {
    fn default() -> Self {
        OpcUaSimOptions {
            host: "127.0.0.1".into(),
            port: 4840,
            pki_dir: PathBuf::from("nexus-data/pki-simulator"),
            user: None,
            bulk: 0,
            step: Duration::from_millis(500),
            max_nodes_per_call: 0,
        }
    }
}

/// A running simulator; dropping it stops the server.
pub struct OpcUaSimulator {
    pub endpoint: String,
    pub handle: ServerHandle,
    pub namespace: u16,
    token: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for OpcUaSimulator {
    fn drop(&mut self) {
        self.token.cancel();
        self.handle.cancel();
        self.task.abort();
    }
}

fn node(ns: u16, name: &str) -> NodeId {
    NodeId::new(ns, name.to_owned())
}

impl OpcUaSimulator {
    /// Start the server on `opts.host:opts.port` (port 0: a free one).
    pub async fn start(opts: OpcUaSimOptions) -> anyhow::Result<OpcUaSimulator> {
        let listener = tokio::net::TcpListener::bind((opts.host.as_str(), opts.port)).await?;
        let port = listener.local_addr()?.port();
        let endpoint = format!("opc.tcp://{}:{port}/", opts.host);
        let mut tokens = vec![ANONYMOUS_USER_TOKEN_ID.to_owned()];
        crate::opcua::pki::prepare(&opts.pki_dir)?;
        let mut builder = ServerBuilder::new()
            .application_name("Nexus OPC UA simulator")
            .application_uri("urn:nexus:simulator:server")
            .product_uri("urn:nexus:simulator")
            .create_sample_keypair(true)
            .pki_dir(&opts.pki_dir)
            .trust_client_certs(true)
            .host(opts.host.clone())
            .port(port)
            .discovery_urls(vec![endpoint.clone()])
            .with_node_manager(simple_node_manager(
                opcua::server::diagnostics::NamespaceMetadata {
                    namespace_uri: NAMESPACE.to_owned(),
                    ..Default::default()
                },
                "nexus-simulator",
            ));
        if let Some((user, pass)) = &opts.user {
            builder = builder.add_user_token("user", ServerUserToken::user_pass(user, pass));
            tokens.push("user".to_owned());
        }
        let ids: Vec<&str> = tokens.iter().map(String::as_str).collect();
        builder = builder.add_endpoint(
            "none",
            (
                "/",
                SecurityPolicy::None,
                MessageSecurityMode::None,
                &ids[..],
            ),
        );
        for (name, policy) in [
            ("basic256sha256", SecurityPolicy::Basic256Sha256),
            ("aes128", SecurityPolicy::Aes128Sha256RsaOaep),
            ("aes256", SecurityPolicy::Aes256Sha256RsaPss),
        ] {
            for (mode_name, mode) in [
                ("sign", MessageSecurityMode::Sign),
                ("sign_encrypt", MessageSecurityMode::SignAndEncrypt),
            ] {
                builder = builder
                    .add_endpoint(format!("{name}_{mode_name}"), ("/", policy, mode, &ids[..]));
            }
        }
        {
            let limits = builder.limits_mut();
            limits.max_array_length = 100_000;
            limits.subscriptions.max_monitored_items_per_sub = 100_000;
            limits.subscriptions.max_queued_notifications = 100_000;
            if opts.max_nodes_per_call > 0 {
                limits.operational.max_nodes_per_read = opts.max_nodes_per_call;
                limits.operational.max_monitored_items_per_call = opts.max_nodes_per_call;
            }
        }
        let (server, handle) = builder
            .build()
            .map_err(|e| anyhow::anyhow!("OPC UA simulator: {e}"))?;
        let nm = handle
            .node_managers()
            .get_of_type::<SimpleNodeManager>()
            .ok_or_else(|| anyhow::anyhow!("OPC UA simulator: no node manager"))?;
        let ns = handle
            .get_namespace_index(NAMESPACE)
            .ok_or_else(|| anyhow::anyhow!("OPC UA simulator: namespace not registered"))?;
        crate::opcua::pki::protect(&opts.pki_dir)?;
        build_address_space(&nm, ns, opts.bulk);
        let token = CancellationToken::new();
        let t = token.clone();
        let h = handle.clone();
        let step = opts.step;
        let bulk = opts.bulk;
        let task = tokio::spawn(async move {
            let run = tokio::spawn(server.run_with(listener));
            let mut tick = tokio::time::interval(step);
            let mut n: u64 = 0;
            let mut temp = 21.0f32;
            loop {
                tokio::select! {
                    _ = t.cancelled() => break,
                    _ = tick.tick() => {}
                }
                n += 1;
                temp += (rand::random::<f32>() - 0.5) * 0.2;
                let secs = n as f64 * step.as_secs_f64();
                let now = DateTime::now();
                let dv = |v: Variant| DataValue {
                    value: Some(v),
                    status: Some(StatusCode::Good),
                    source_timestamp: Some(now),
                    server_timestamp: Some(now),
                    ..Default::default()
                };
                let mut values: Vec<(NodeId, DataValue)> = vec![
                    (
                        node(ns, "Sine"),
                        dv(Variant::Double(
                            (secs * std::f64::consts::TAU / 10.0).sin() * 50.0 + 50.0,
                        )),
                    ),
                    (node(ns, "Ramp"), dv(Variant::Int32((n % 100) as i32))),
                    (node(ns, "Counter"), dv(Variant::UInt32(n as u32))),
                    (node(ns, "Toggle"), dv(Variant::Boolean((n / 5) % 2 == 1))),
                    (node(ns, "Temperature"), dv(Variant::Float(temp))),
                    (
                        node(ns, "Status"),
                        dv(Variant::from(if (n / 20).is_multiple_of(2) {
                            "RUNNING"
                        } else {
                            "IDLE"
                        })),
                    ),
                ];
                for i in 0..bulk {
                    values.push((
                        bulk_node(ns, i),
                        dv(Variant::Double(n as f64 + i as f64 / 1000.0)),
                    ));
                }
                let _ = nm.set_values(
                    h.subscriptions(),
                    values.iter().map(|(id, v)| (id, None, v.clone())),
                );
            }
            h.cancel();
            let _ = run.await;
        });
        Ok(OpcUaSimulator {
            endpoint,
            handle,
            namespace: ns,
            token,
            task,
        })
    }
}

/// The node id of bulk variable `i`.
pub fn bulk_node(ns: u16, i: usize) -> NodeId {
    NodeId::new(ns, format!("Bulk.Tag{i:04}"))
}

fn build_address_space(nm: &SimpleNodeManager, ns: u16, bulk: usize) {
    use opcua::nodes::Variable;
    let mut space = nm.address_space().write();
    let folder = node(ns, "Simulator");
    space.add_folder(
        &folder,
        QualifiedName::new(ns, "Simulator"),
        "Simulator",
        &ObjectId::ObjectsFolder.into(),
    );
    let var = |name: &str, v: Variant, writable: bool| {
        let mut var = Variable::new(&node(ns, name), QualifiedName::new(ns, name), name, v);
        if writable {
            var.set_writable(true);
            var.set_user_access_level(var.access_level());
        }
        var
    };
    space.add_variables(
        vec![
            var("Sine", Variant::Double(50.0), false),
            var("Ramp", Variant::Int32(0), false),
            var("Counter", Variant::UInt32(0), false),
            var("Toggle", Variant::Boolean(false), false),
            var("Temperature", Variant::Float(21.0), false),
            var("Status", Variant::from("RUNNING"), false),
            var("Setpoint", Variant::Double(42.5), true),
            var("Enable", Variant::Boolean(false), true),
            var("Mode", Variant::Int16(1), true),
            var("Label", Variant::from("line-1"), true),
        ],
        &folder,
    );
    if bulk > 0 {
        let bulk_folder = node(ns, "Bulk");
        space.add_folder(
            &bulk_folder,
            QualifiedName::new(ns, "Bulk"),
            "Bulk",
            &folder,
        );
        let vars = (0..bulk)
            .map(|i| {
                let id = bulk_node(ns, i);
                let name = format!("Tag{i:04}");
                Variable::new(
                    &id,
                    QualifiedName::new(ns, name.as_str()),
                    name.as_str(),
                    0.0f64,
                )
            })
            .collect();
        space.add_variables(vars, &bulk_folder);
    }
}
