//! The `nexus` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use nexus_common::broker::{Acl, EmbeddedBroker};
use nexus_common::config::{Config, LogFormat, EXIT_BAD_CONFIG};
use nexus_common::supervise::{cancel_on_signals, RestartPolicy, Supervisor};
use nexus_common::telemetry::{self, init_logging, Telemetry};
use tokio_util::sync::CancellationToken;

use crate::{status, up};

#[derive(Parser, Debug)]
#[command(
    name = "nexus",
    version,
    about = "Nexus industrial data platform: PLCs to a Unified Namespace, historian, alarms and safe write-back"
)]
pub struct Cli {
    /// Log format: pretty (default) or json (one object per line).
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormatArg>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormatArg {
    Pretty,
    Json,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ConfigArg {
    /// Configuration file (default: nexus.yaml in the working directory, if present).
    #[arg(long, short = 'c', env = "NEXUS_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the whole platform in one process.
    Up {
        #[command(flatten)]
        config: ConfigArg,
        /// Demo mode: also starts a simulated Modbus device (port 5020) polled into
        /// demo/plant/packaging/line-1/sim-plc-1/..., and an operator login (operator /
        /// nexus-demo) when no broker users are configured.
        #[arg(long)]
        demo: bool,
    },
    /// Run the embedded MQTT broker alone.
    Broker(ConfigArg),
    /// Run the protocol gateway (with the command handler inside, sharing its connections).
    Gateway(ConfigArg),
    /// Run the historian ingestion alone.
    Ingest(ConfigArg),
    /// Run the command handler alone, with its own device connections.
    Commands(ConfigArg),
    /// Run the alert service alone.
    Alerts(ConfigArg),
    /// Run the orchestrator (platform status API) alone.
    Orchestrator(ConfigArg),
    /// Run a simulated device.
    Simulate {
        #[arg(value_enum)]
        protocol: SimProtocol,
        /// Port to serve on (Modbus 5020, OPC UA 4840).
        #[arg(long)]
        port: Option<u16>,
        /// OPC UA: address to listen on and name in endpoint URLs.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// OPC UA: the server's PKI directory (certificate made at first start).
        #[arg(long, default_value = "nexus-data/pki-simulator")]
        pki_dir: PathBuf,
        /// OPC UA: extra Bulk/TagNNNN variables, all changing every step (load tests).
        #[arg(long, default_value_t = 0)]
        bulk: usize,
        /// OPC UA: milliseconds between value changes.
        #[arg(long, default_value_t = 500)]
        step_ms: u64,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Credentials for the `auth` section: password hashes and API tokens.
    Auth {
        #[command(subcommand)]
        action: AuthAction,
    },
}

#[derive(Subcommand, Debug)]
pub enum AuthAction {
    /// Read a password (typed without echo on a terminal, else the first line of stdin) and
    /// print its argon2 hash, for `auth.users[].password_hash`.
    HashPassword,
    /// Make a random API token: print it (line 1; it is not stored anywhere) and the
    /// `auth.tokens` entry holding its SHA-256 (line 2).
    NewToken {
        /// The token's name in logs and the audit (`token:<name>`).
        #[arg(long, default_value = "api")]
        name: String,
        /// What the token may do over HTTP.
        #[arg(long, value_enum, default_value_t = TokenRole::Viewer)]
        role: TokenRole,
    },
}

/// The roles a token may have (the service role belongs to Nexus's own services).
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TokenRole {
    Viewer,
    Operator,
    Admin,
}

impl TokenRole {
    fn as_str(self) -> &'static str {
        match self {
            TokenRole::Viewer => "viewer",
            TokenRole::Operator => "operator",
            TokenRole::Admin => "admin",
        }
    }
}

/// Turns the terminal's echo off until dropped (`stty`, so no terminal code of our own).
struct NoEcho;

impl NoEcho {
    fn new() -> anyhow::Result<NoEcho> {
        let off = std::process::Command::new("stty")
            .arg("-echo")
            .stdin(std::process::Stdio::inherit())
            .status();
        match off {
            Ok(s) if s.success() => Ok(NoEcho),
            _ => anyhow::bail!(
                "cannot turn off the terminal's echo (stty -echo failed); pipe the password in instead: \
                 printf '%s\\n' \"$PASSWORD\" | nexus auth hash-password"
            ),
        }
    }
}

impl Drop for NoEcho {
    fn drop(&mut self) {
        let _ = std::process::Command::new("stty")
            .arg("echo")
            .stdin(std::process::Stdio::inherit())
            .status();
    }
}

/// One line of stdin without its line end; `None` at end of input.
fn read_line() -> anyhow::Result<Option<String>> {
    use std::io::BufRead;
    let mut line = String::new();
    if std::io::stdin().lock().read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let end = line.trim_end_matches(['\n', '\r']).len();
    line.truncate(end);
    Ok(Some(line))
}

fn read_hidden(prompt: &str) -> anyhow::Result<String> {
    use std::io::Write;
    eprint!("{prompt}");
    std::io::stderr().flush()?;
    let line = {
        let _no_echo = NoEcho::new()?;
        read_line()
    };
    eprintln!();
    line?.ok_or_else(|| anyhow::anyhow!("no password given"))
}

/// The password to hash: asked twice on a terminal, else the first line of stdin.
fn read_password() -> anyhow::Result<String> {
    use std::io::IsTerminal;
    let password = if std::io::stdin().is_terminal() {
        let first = read_hidden("Password: ")?;
        if read_hidden("Again: ")? != first {
            anyhow::bail!("the two passwords differ");
        }
        first
    } else {
        read_line()?.ok_or_else(|| anyhow::anyhow!("no password on stdin"))?
    };
    if password.is_empty() {
        anyhow::bail!("the password is empty");
    }
    Ok(password)
}

fn auth_command(action: &AuthAction) -> anyhow::Result<()> {
    match action {
        AuthAction::HashPassword => {
            let password = read_password()?;
            println!("{}", nexus_common::auth::hash_password(&password));
            eprintln!("put it in nexus.yaml as auth.users[].password_hash");
        }
        AuthAction::NewToken { name, role } => {
            let (token, sha256) = nexus_common::auth::new_token();
            // A JSON string is a YAML scalar, whatever the name holds.
            let name = serde_json::Value::from(name.as_str());
            println!("{token}");
            println!(
                "- {{ name: {name}, sha256: {sha256}, role: {} }}",
                role.as_str()
            );
            eprintln!("line 1 is the token, shown once: give it to the client (Authorization: Bearer <token>); line 2 goes under auth.tokens in nexus.yaml");
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SimProtocol {
    Modbus,
    Opcua,
}

#[derive(Subcommand, Debug)]
pub enum ConfigAction {
    /// Validate a configuration without starting anything.
    Check(ConfigArg),
}

fn load(arg: &ConfigArg) -> Result<Config, ExitCode> {
    Config::load(arg.config.as_deref()).map_err(|e| {
        eprint!("{e}");
        ExitCode::from(EXIT_BAD_CONFIG as u8)
    })
}

fn logging(cfg: &Config, flag: Option<LogFormatArg>) {
    let format = match flag {
        Some(LogFormatArg::Json) => LogFormat::Json,
        Some(LogFormatArg::Pretty) => LogFormat::Pretty,
        None => cfg.telemetry.log_format,
    };
    init_logging(&cfg.telemetry.log_level, format);
}

fn done(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "nexus stopped with an error");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

type Runner = fn(
    Arc<Config>,
    CancellationToken,
)
    -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>;

/// Run one service under a supervisor until a signal.
async fn one_service(cfg: Config, name: &'static str, run: Runner) -> anyhow::Result<()> {
    let token = CancellationToken::new();
    cancel_on_signals(token.clone());
    let cfg = Arc::new(cfg);
    let policy = RestartPolicy {
        max_restarts: cfg.orchestrator.max_restarts,
        window: cfg.orchestrator.restart_window,
        ..RestartPolicy::default()
    };
    let sup = Supervisor::new(token, policy, &prometheus::Registry::new())?;
    let c = cfg.clone();
    sup.spawn(name, move |tok| run(c.clone(), tok));
    sup.wait(cfg.orchestrator.shutdown_grace).await?;
    Ok(())
}

/// `nexus broker`: the broker, with health and metrics on the orchestrator's HTTP address.
async fn broker_only(cfg: Config) -> anyhow::Result<()> {
    let token = CancellationToken::new();
    cancel_on_signals(token.clone());
    let t = Telemetry::new("broker");
    let ids = std::sync::Arc::new(nexus_common::auth::Identities::new(&cfg.auth)?);
    let acl = Acl::new(ids.clone(), &cfg.broker, &cfg.devices);
    if cfg.gateway.watch_devices_file {
        // A device added or changed at runtime is reserved for the gateway at once.
        let (ns, c, tok) = (acl.device_namespaces(), cfg.clone(), token.clone());
        tokio::spawn(async move {
            c.watch(std::time::Duration::from_secs(2), tok, |new| {
                ns.set(&new.devices)
            })
            .await
        });
    }
    let (bcfg, reg) = (cfg.broker.clone(), t.registry.clone());
    let b = tokio::task::spawn_blocking(move || EmbeddedBroker::start(&bcfg, acl, &reg)).await??;
    t.readiness.condition("listeners").set(true);
    // Health and metrics behind the same guard, authentication and TLS as every service port.
    let app = nexus_common::http::service_router_for(
        &t,
        nexus_common::auth::http::Routes::new(),
        nexus_common::http::HttpLimits::default(),
        ids,
        &cfg,
    )?;
    let (http, task) =
        telemetry::serve_as(cfg.orchestrator.http_listen, app, &cfg.http, token.clone()).await?;
    println!(
        "Nexus broker listening on {:?} (WebSocket {:?}, TLS {:?}, secure WebSocket {:?}); health and metrics on {}://{http}",
        b.ports.tcp,
        b.ports.ws,
        b.ports.tls,
        b.ports.wss,
        if cfg.http.tls.is_some() { "https" } else { "http" }
    );
    token.cancelled().await;
    let _ = task.await;
    tokio::task::spawn_blocking(move || b.stop()).await?;
    Ok(())
}

/// `nexus simulate modbus`: a moving Modbus TCP device until Ctrl-C.
async fn simulate_modbus(port: u16) -> anyhow::Result<()> {
    let token = CancellationToken::new();
    cancel_on_signals(token.clone());
    let addr = std::net::SocketAddr::from(([0, 0, 0, 0], port));
    let sim = nexus_devices::simulator::modbus::ModbusSimulator::start(
        addr,
        Some(std::time::Duration::from_millis(100)),
    )
    .await?;
    println!("Modbus TCP simulator on {} (any unit id); its register map matches deploy/examples/modbus-sim.yaml. Stop with Ctrl-C.", sim.addr);
    token.cancelled().await;
    sim.stop();
    Ok(())
}

/// `nexus simulate opcua`: a moving OPC UA server until Ctrl-C.
async fn simulate_opcua(
    opts: nexus_devices::simulator::opcua::OpcUaSimOptions,
) -> anyhow::Result<()> {
    let token = CancellationToken::new();
    cancel_on_signals(token.clone());
    let sim = nexus_devices::simulator::opcua::OpcUaSimulator::start(opts).await?;
    println!("OPC UA simulator at {} (namespace urn:nexus:simulator, index {}; nodes under Objects/Simulator: Sine, Ramp, Counter, Toggle, Temperature, Status; writable Setpoint, Enable, Mode, Label). Stop with Ctrl-C.", sim.endpoint, sim.namespace);
    token.cancelled().await;
    drop(sim);
    Ok(())
}

pub async fn main(cli: Cli) -> ExitCode {
    let with_config = |arg: &ConfigArg| -> Result<Config, ExitCode> {
        let cfg = load(arg)?;
        logging(&cfg, cli.log_format);
        Ok(cfg)
    };
    macro_rules! service {
        ($arg:expr, $name:expr, $run:path) => {
            match with_config($arg) {
                Ok(cfg) => done(one_service(cfg, $name, |c, t| Box::pin($run(c, t))).await),
                Err(code) => code,
            }
        };
    }
    match &cli.command {
        Command::Up { config, demo } => match with_config(config) {
            Ok(cfg) => {
                let token = CancellationToken::new();
                cancel_on_signals(token.clone());
                done(up::up(cfg, up::UpOptions { demo: *demo }, token).await)
            }
            Err(code) => code,
        },
        Command::Broker(arg) => match with_config(arg) {
            Ok(cfg) => done(broker_only(cfg).await),
            Err(code) => code,
        },
        Command::Gateway(arg) => service!(
            arg,
            nexus_protocol_gateway::SERVICE,
            crate::gateway_with_commands
        ),
        Command::Ingest(arg) => service!(
            arg,
            nexus_data_ingestion::SERVICE,
            nexus_data_ingestion::run
        ),
        Command::Commands(arg) => service!(
            arg,
            nexus_command_handler::SERVICE,
            nexus_command_handler::run
        ),
        Command::Alerts(arg) => {
            service!(arg, nexus_alert_service::SERVICE, nexus_alert_service::run)
        }
        Command::Orchestrator(arg) => service!(arg, status::SERVICE, status::run),
        Command::Simulate {
            protocol: SimProtocol::Modbus,
            port,
            ..
        } => {
            init_logging(
                "info",
                match cli.log_format {
                    Some(LogFormatArg::Json) => LogFormat::Json,
                    _ => LogFormat::Pretty,
                },
            );
            done(simulate_modbus(port.unwrap_or(5020)).await)
        }
        Command::Simulate {
            protocol: SimProtocol::Opcua,
            port,
            host,
            pki_dir,
            bulk,
            step_ms,
        } => {
            init_logging(
                "info",
                match cli.log_format {
                    Some(LogFormatArg::Json) => LogFormat::Json,
                    _ => LogFormat::Pretty,
                },
            );
            let opts = nexus_devices::simulator::opcua::OpcUaSimOptions {
                host: host.clone(),
                port: port.unwrap_or(4840),
                pki_dir: pki_dir.clone(),
                user: None,
                bulk: *bulk,
                step: std::time::Duration::from_millis((*step_ms).max(10)),
                max_nodes_per_call: 0,
            };
            done(simulate_opcua(opts).await)
        }
        Command::Auth { action } => match auth_command(action) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Config {
            action: ConfigAction::Check(arg),
        } => {
            match Config::load(arg.config.as_deref()) {
                Ok(cfg) => {
                    println!(
                    "configuration OK: {} ({} devices, {} alert rules, broker {}, ingestion {})",
                    cfg.source_name(),
                    cfg.devices.len(),
                    cfg.alerts.rules.len(),
                    if cfg.broker.enabled { "embedded" } else { "external" },
                    if cfg.database.url.is_some() { "on" } else { "off" },
                );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprint!("{e}");
                    ExitCode::from(EXIT_BAD_CONFIG as u8)
                }
            }
        }
    }
}
