//! Connection pools per protocol: one session per endpoint, shared by every device behind it
//! (a Modbus gateway with several unit ids, a serial bus), opened lazily, bounded per
//! protocol, each guarded by a circuit breaker so a dead device fails fast and recovers by
//! itself. A maintenance loop closes sessions idle past `idle_timeout` and, every
//! `health_interval`, checks idle sessions with a read so a half-dead connection is found
//! before the next poll needs it.
//!
//! [`Pools`] holds one typed [`Pool`] per protocol and is the one place where a device's
//! [`Plan`] picks its driver: a device can only ever reach its own protocol's driver.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nexus_common::breaker::{
    BreakerConfig, BreakerMetrics, BreakerOpen, BreakerState, CircuitBreaker,
};
use nexus_common::config::{GatewayConfig, OpcUaClientConfig, PoolConfig, Protocol};
use nexus_common::metrics::{self, MetricError};
use nexus_common::Value;
use prometheus::{IntGaugeVec, Registry};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::device::{Device, Plan};
use crate::driver::{DeviceError, Driver, Reading, TransportError};
use crate::modbus::ModbusDriver;
use crate::opcua::{BrowseEntry, BrowseRefused, OpcUaDriver};
use crate::s7::S7Driver;

#[derive(Debug, Clone, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Open(#[from] BreakerOpen),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("the {protocol:?} pool is full ({max} connections)")]
    Full { protocol: Protocol, max: usize },
    /// [`Pools::read_while`]: the caller's condition no longer held when the device's session
    /// was free, so nothing was sent.
    #[error("the read was called off before it was sent: its condition no longer held")]
    CalledOff,
}

/// A condition checked just before a call is sent ([`Pools::read_while`]).
pub type Holds<'a> = &'a (dyn Fn() -> bool + Send + Sync);

/// Why a browse of a device's address space did not complete.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrowseError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// The server refused (an unknown node, no access) or the node id is not one.
    #[error(transparent)]
    Refused(#[from] BrowseRefused),
    #[error("device {0} has no address space to browse (only OPC UA devices have one)")]
    NotBrowsable(String),
}

type OpFuture<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, TransportError>> + Send + 'a>>;

/// A device and its plan, kept to health-check an idle endpoint.
type Probe<P> = (Arc<Device>, Arc<P>);

/// A shared session to one endpoint.
pub struct Endpoint<D: Driver> {
    pub key: String,
    pub breaker: Arc<CircuitBreaker>,
    session: tokio::sync::Mutex<Option<D>>,
    last_used: Mutex<Instant>,
    /// A device on this endpoint and its plan, for health checks.
    probe: Mutex<Option<Probe<D::Plan>>>,
}

impl<D: Driver> Endpoint<D> {
    fn touch(&self, device: &Arc<Device>, plan: &Arc<D::Plan>) {
        *self.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        let mut p = self.probe.lock().unwrap_or_else(|e| e.into_inner());
        if p.is_none() {
            *p = Some((device.clone(), plan.clone()));
        }
    }

    fn idle_for(&self) -> Duration {
        self.last_used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
    }

    /// Run `op` on the session (opened lazily for `device`) under the breaker. A transport
    /// error drops the session so the next call reconnects. `touch`: the call counts as a use
    /// (health checks do not).
    async fn with_session<T, F>(
        &self,
        device: &Arc<Device>,
        touch: Option<&Arc<D::Plan>>,
        settings: &D::Settings,
        holds: Option<Holds<'_>>,
        op: F,
    ) -> Result<T, PoolError>
    where
        F: for<'a> FnOnce(&'a mut D) -> OpFuture<'a, T>,
    {
        let permit = self.breaker.try_acquire()?;
        if let Some(plan) = touch {
            self.touch(device, plan);
        }
        let mut guard = self.session.lock().await;
        let session = guard.get_or_insert_with(|| D::for_device(&device.cfg, settings));
        if !session.is_connected() {
            if let Err(e) = session.connect().await {
                permit.failure();
                return Err(e.into());
            }
        }
        // Checked here, after waiting for the session (other devices of the endpoint may have
        // held it for a while), not only before: the caller's condition may have ended since.
        if holds.is_some_and(|h| !h()) {
            permit.withdraw();
            return Err(PoolError::CalledOff);
        }
        match op(session).await {
            Ok(v) => {
                permit.success();
                Ok(v)
            }
            Err(e) => {
                permit.failure();
                if let Some(mut s) = guard.take() {
                    s.close().await;
                }
                Err(e.into())
            }
        }
    }

    pub fn is_open(&self) -> bool {
        self.session
            .try_lock()
            .map(|s| s.as_ref().is_some_and(|d| d.is_connected()))
            .unwrap_or(true)
    }
}

/// Pool metrics: `nexus_gateway_pool_connections{protocol}` (open sessions) and
/// `nexus_gateway_pool_endpoints{protocol}`.
#[derive(Clone)]
struct PoolMetrics {
    connections: IntGaugeVec,
    endpoints: IntGaugeVec,
}

/// The sessions of one protocol, by endpoint.
pub struct Pool<D: Driver> {
    max: usize,
    settings: D::Settings,
    breaker: BreakerConfig,
    breaker_metrics: BreakerMetrics,
    endpoints: Mutex<HashMap<String, Arc<Endpoint<D>>>>,
    metrics: PoolMetrics,
}

impl<D: Driver> Pool<D> {
    fn label() -> &'static str {
        proto_label(D::PROTOCOL)
    }

    /// The endpoint of `device`, created on first use.
    fn endpoint(&self, device: &Device) -> Result<Arc<Endpoint<D>>, PoolError> {
        let key = device.endpoint();
        let mut map = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = map.get(&key) {
            return Ok(e.clone());
        }
        if map.len() >= self.max {
            return Err(PoolError::Full {
                protocol: D::PROTOCOL,
                max: self.max,
            });
        }
        let e = Arc::new(Endpoint {
            key: key.clone(),
            breaker: CircuitBreaker::new(
                key.clone(),
                self.breaker,
                Some(self.breaker_metrics.clone()),
            ),
            session: tokio::sync::Mutex::new(None),
            last_used: Mutex::new(Instant::now()),
            probe: Mutex::new(None),
        });
        map.insert(key, e.clone());
        self.metrics
            .endpoints
            .with_label_values(&[Self::label()])
            .inc();
        Ok(e)
    }

    /// Run `op` on `device`'s session, counting as a use of the endpoint.
    async fn run<T, F>(
        &self,
        device: &Arc<Device>,
        plan: &Arc<D::Plan>,
        holds: Option<Holds<'_>>,
        op: F,
    ) -> Result<T, PoolError>
    where
        F: for<'a> FnOnce(&'a mut D) -> OpFuture<'a, T>,
    {
        let ep = self.endpoint(device)?;
        ep.with_session(device, Some(plan), &self.settings, holds, op)
            .await
    }

    async fn read(
        &self,
        device: &Arc<Device>,
        plan: &Arc<D::Plan>,
        tags: Option<Vec<usize>>,
        holds: Option<Holds<'_>>,
    ) -> Result<Vec<(usize, Reading)>, PoolError> {
        let (d, p) = (device.clone(), plan.clone());
        self.run(device, plan, holds, move |s| {
            Box::pin(async move { s.read(&d, &p, tags.as_deref()).await })
        })
        .await
    }

    async fn write(
        &self,
        device: &Arc<Device>,
        plan: &Arc<D::Plan>,
        tag: usize,
        value: Value,
    ) -> Result<Result<(), DeviceError>, PoolError> {
        let (d, p) = (device.clone(), plan.clone());
        self.run(device, plan, None, move |s| {
            Box::pin(async move { s.write(&d, &p, tag, &value).await })
        })
        .await
    }

    fn breaker_state(&self, device: &Device) -> BreakerState {
        self.endpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&device.endpoint())
            .map_or(BreakerState::Closed, |e| e.breaker.state())
    }

    fn snapshot(&self) -> Vec<Arc<Endpoint<D>>> {
        self.endpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn update_gauges(&self) {
        let open = self.snapshot().iter().filter(|e| e.is_open()).count();
        self.metrics
            .connections
            .with_label_values(&[Self::label()])
            .set(open as i64);
    }

    /// One round of maintenance: close idle sessions, health-check the others.
    async fn maintain_once(&self, cfg: &PoolConfig) {
        for e in self.snapshot() {
            let idle = e.idle_for();
            if idle >= cfg.idle_timeout {
                let mut s = e.session.lock().await;
                if let Some(mut d) = s.take() {
                    tracing::debug!(endpoint = %e.key, idle_s = idle.as_secs(), "closing idle connection");
                    d.close().await;
                }
            } else if idle >= cfg.health_interval && e.is_open() {
                let probe = e.probe.lock().unwrap_or_else(|x| x.into_inner()).clone();
                if let Some((device, plan)) = probe {
                    let first = (!device.cfg.tags.is_empty()).then(|| vec![0usize]);
                    let d = device.clone();
                    if let Err(err) = e
                        .with_session(&device, None, &self.settings, None, move |s| {
                            Box::pin(async move { s.read(&d, &plan, first.as_deref()).await })
                        })
                        .await
                    {
                        tracing::warn!(endpoint = %e.key, error = %err, "health check failed");
                    }
                }
            }
        }
        self.update_gauges();
    }

    async fn close_all(&self) {
        for e in self.snapshot() {
            if let Some(mut d) = e.session.lock().await.take() {
                d.close().await;
            }
        }
        self.update_gauges();
    }
}

impl Pool<OpcUaDriver> {
    async fn browse(
        &self,
        device: &Arc<Device>,
        node: Option<String>,
        out: tokio::sync::mpsc::Sender<BrowseEntry>,
    ) -> Result<Result<(), BrowseRefused>, PoolError> {
        let ep = self.endpoint(device)?;
        ep.with_session(device, None, &self.settings, None, move |s| {
            Box::pin(async move { s.browse_into(node.as_deref(), out).await })
        })
        .await
    }
}

fn proto_label(p: Protocol) -> &'static str {
    match p {
        Protocol::Modbus => "modbus",
        Protocol::Opcua => "opcua",
        Protocol::S7 => "s7",
    }
}

/// Every protocol's pool; the devices' single entry to their drivers.
pub struct Pools {
    cfg: PoolConfig,
    modbus: Pool<ModbusDriver>,
    s7: Pool<S7Driver>,
    opcua: Pool<OpcUaDriver>,
}

impl Pools {
    /// Pools with the gateway section's settings (`gateway.pool`, `gateway.breaker`,
    /// `gateway.opcua`), shared by the gateway and the command handler.
    pub fn from_config(
        cfg: &GatewayConfig,
        registry: &Registry,
    ) -> Result<Arc<Pools>, MetricError> {
        Pools::new(
            cfg.pool.clone(),
            cfg.breaker.into(),
            cfg.opcua.clone(),
            registry,
        )
    }

    pub fn new(
        cfg: PoolConfig,
        breaker: BreakerConfig,
        opcua: OpcUaClientConfig,
        registry: &Registry,
    ) -> Result<Arc<Pools>, MetricError> {
        let metrics = PoolMetrics {
            connections: metrics::gauge_vec(
                registry,
                "nexus_gateway_pool_connections",
                "Open device sessions",
                &["protocol"],
            )?,
            endpoints: metrics::gauge_vec(
                registry,
                "nexus_gateway_pool_endpoints",
                "Endpoints known to the pool",
                &["protocol"],
            )?,
        };
        // Every protocol from the start, so dashboards see 0 rather than nothing.
        for p in [Protocol::Modbus, Protocol::S7, Protocol::Opcua] {
            metrics.connections.with_label_values(&[proto_label(p)]);
            metrics.endpoints.with_label_values(&[proto_label(p)]);
        }
        let breaker_metrics = BreakerMetrics::new(registry)?;
        fn pool<D: Driver>(
            max: usize,
            settings: &D::Settings,
            breaker: BreakerConfig,
            breaker_metrics: &BreakerMetrics,
            metrics: &PoolMetrics,
        ) -> Pool<D> {
            Pool {
                max,
                settings: settings.clone(),
                breaker,
                breaker_metrics: breaker_metrics.clone(),
                endpoints: Mutex::new(HashMap::new()),
                metrics: metrics.clone(),
            }
        }
        Ok(Arc::new(Pools {
            modbus: pool(
                cfg.modbus_max_connections,
                &(),
                breaker,
                &breaker_metrics,
                &metrics,
            ),
            s7: pool(
                cfg.s7_max_connections,
                &(),
                breaker,
                &breaker_metrics,
                &metrics,
            ),
            opcua: pool(
                cfg.opcua_max_connections,
                &opcua,
                breaker,
                &breaker_metrics,
                &metrics,
            ),
            cfg,
        }))
    }

    /// Read tags of a device through its endpoint.
    pub async fn read(
        &self,
        device: &Arc<Device>,
        tags: Option<Vec<usize>>,
    ) -> Result<Vec<(usize, Reading)>, PoolError> {
        self.read_if(device, tags, None).await
    }

    /// [`Self::read`] only if `holds` is still true once the device's session is free, just
    /// before the read is sent; else [`PoolError::CalledOff`], with nothing sent and nothing
    /// counted by the breaker. A sharded gateway passes its lease: a poll that waited for the
    /// session while the member's lease ran out must not read a device another member polls.
    pub async fn read_while(
        &self,
        device: &Arc<Device>,
        tags: Option<Vec<usize>>,
        holds: Holds<'_>,
    ) -> Result<Vec<(usize, Reading)>, PoolError> {
        self.read_if(device, tags, Some(holds)).await
    }

    async fn read_if(
        &self,
        device: &Arc<Device>,
        tags: Option<Vec<usize>>,
        holds: Option<Holds<'_>>,
    ) -> Result<Vec<(usize, Reading)>, PoolError> {
        match &device.plan {
            Plan::Modbus(p) => self.modbus.read(device, p, tags, holds).await,
            Plan::S7(p) => self.s7.read(device, p, tags, holds).await,
            Plan::OpcUa(p) => self.opcua.read(device, p, tags, holds).await,
        }
    }

    /// Write one tag of a device through its endpoint.
    pub async fn write(
        &self,
        device: &Arc<Device>,
        tag: usize,
        value: Value,
    ) -> Result<Result<(), DeviceError>, PoolError> {
        match &device.plan {
            Plan::Modbus(p) => self.modbus.write(device, p, tag, value).await,
            Plan::S7(p) => self.s7.write(device, p, tag, value).await,
            Plan::OpcUa(p) => self.opcua.write(device, p, tag, value).await,
        }
    }

    /// Stream the children of `node` (the root when `None`) in the device's address space
    /// into `out`.
    pub async fn browse(
        &self,
        device: &Arc<Device>,
        node: Option<String>,
        out: tokio::sync::mpsc::Sender<BrowseEntry>,
    ) -> Result<(), BrowseError> {
        match &device.plan {
            Plan::OpcUa(_) => self
                .opcua
                .browse(device, node, out)
                .await?
                .map_err(BrowseError::Refused),
            Plan::Modbus(_) | Plan::S7(_) => {
                Err(BrowseError::NotBrowsable(device.cfg.id.to_string()))
            }
        }
    }

    /// Breaker state of a device's endpoint.
    pub fn breaker_state(&self, device: &Device) -> BreakerState {
        match &device.plan {
            Plan::Modbus(_) => self.modbus.breaker_state(device),
            Plan::S7(_) => self.s7.breaker_state(device),
            Plan::OpcUa(_) => self.opcua.breaker_state(device),
        }
    }

    /// Idle reaper and health checks until `token`; then every session is closed.
    pub async fn maintain(self: Arc<Self>, token: CancellationToken) {
        let mut iv = tokio::time::interval(
            self.cfg
                .health_interval
                .min(Duration::from_secs(30))
                .max(Duration::from_millis(100)),
        );
        loop {
            tokio::select! {
                _ = iv.tick() => {}
                _ = token.cancelled() => break,
            }
            self.modbus.maintain_once(&self.cfg).await;
            self.s7.maintain_once(&self.cfg).await;
            self.opcua.maintain_once(&self.cfg).await;
        }
        self.modbus.close_all().await;
        self.s7.close_all().await;
        self.opcua.close_all().await;
    }
}
