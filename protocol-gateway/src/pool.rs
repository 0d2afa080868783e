//! Connection pools per protocol: one session per endpoint, shared by every device behind it
//! (a Modbus gateway with several unit ids, a serial bus), opened lazily, bounded per
//! protocol, each guarded by a circuit breaker so a dead device fails fast and recovers by
//! itself. A maintenance loop closes sessions idle past `idle_timeout` and, every
//! `health_interval`, checks idle sessions with a read so a half-dead connection is found
//! before the next poll needs it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nexus_common::breaker::{
    BreakerConfig, BreakerMetrics, BreakerOpen, BreakerState, CircuitBreaker,
};
use nexus_common::config::{OpcUaClientConfig, PoolConfig, Protocol};
use nexus_common::Value;
use prometheus::{IntGaugeVec, Opts, Registry};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::driver::{driver_for, Device, DeviceError, Driver, Reading, TransportError};

#[derive(Debug, Clone, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Open(#[from] BreakerOpen),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("the {protocol:?} pool is full ({max} connections)")]
    Full { protocol: Protocol, max: usize },
}

/// A shared session to one endpoint.
pub struct Endpoint {
    pub key: String,
    pub protocol: Protocol,
    pub breaker: Arc<CircuitBreaker>,
    session: tokio::sync::Mutex<Option<Box<dyn Driver>>>,
    last_used: Mutex<Instant>,
    /// A device on this endpoint, for health checks.
    probe: Mutex<Option<Arc<Device>>>,
    /// The OPC UA client's certificates, for new OPC UA sessions.
    opcua: OpcUaClientConfig,
}

impl Endpoint {
    fn touch(&self, device: &Arc<Device>) {
        *self.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        let mut p = self.probe.lock().unwrap_or_else(|e| e.into_inner());
        if p.is_none() {
            *p = Some(device.clone());
        }
    }

    fn idle_for(&self) -> Duration {
        self.last_used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
    }

    /// Run `op` on the session (opened lazily) under the breaker. A transport error drops
    /// the session so the next call reconnects.
    async fn with_session<T, F>(
        &self,
        device: &Arc<Device>,
        touch: bool,
        op: F,
    ) -> Result<T, PoolError>
    where
        F: for<'a> FnOnce(
            &'a mut Box<dyn Driver>,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, TransportError>> + Send + 'a>,
        >,
    {
        let permit = self.breaker.try_acquire()?;
        if touch {
            self.touch(device);
        }
        let mut guard = self.session.lock().await;
        if guard.is_none() {
            match driver_for(device, &self.opcua) {
                Ok(d) => *guard = Some(d),
                Err(e) => {
                    permit.failure();
                    return Err(e.into());
                }
            }
        }
        let Some(session) = guard.as_mut() else {
            permit.failure();
            return Err(TransportError::Io("no session".into()).into());
        };
        if !session.is_connected() {
            if let Err(e) = session.connect().await {
                permit.failure();
                return Err(e.into());
            }
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

pub struct Pools {
    cfg: PoolConfig,
    breaker: BreakerConfig,
    breaker_metrics: BreakerMetrics,
    endpoints: Mutex<HashMap<String, Arc<Endpoint>>>,
    metrics: PoolMetrics,
    opcua: Mutex<OpcUaClientConfig>,
}

fn proto_label(p: Protocol) -> &'static str {
    match p {
        Protocol::Modbus => "modbus",
        Protocol::Opcua => "opcua",
        Protocol::S7 => "s7",
    }
}

impl Pools {
    pub fn new(cfg: PoolConfig, breaker: BreakerConfig, registry: &Registry) -> Arc<Pools> {
        let connections = IntGaugeVec::new(
            Opts::new("nexus_gateway_pool_connections", "Open device sessions"),
            &["protocol"],
        )
        .expect("static metric definition");
        let endpoints = IntGaugeVec::new(
            Opts::new(
                "nexus_gateway_pool_endpoints",
                "Endpoints known to the pool",
            ),
            &["protocol"],
        )
        .expect("static metric definition");
        let _ = registry.register(Box::new(connections.clone()));
        let _ = registry.register(Box::new(endpoints.clone()));
        Arc::new(Pools {
            cfg,
            breaker,
            breaker_metrics: BreakerMetrics::new(registry),
            endpoints: Mutex::new(HashMap::new()),
            metrics: PoolMetrics {
                connections,
                endpoints,
            },
            opcua: Mutex::new(OpcUaClientConfig::default()),
        })
    }

    /// Set the OPC UA client's certificates (PKI directory, trust) for sessions opened later.
    pub fn set_opcua(&self, cfg: OpcUaClientConfig) {
        *self.opcua.lock().unwrap_or_else(|e| e.into_inner()) = cfg;
    }

    fn max_for(&self, p: Protocol) -> usize {
        match p {
            Protocol::Modbus => self.cfg.modbus_max_connections,
            Protocol::Opcua => self.cfg.opcua_max_connections,
            Protocol::S7 => self.cfg.s7_max_connections,
        }
    }

    /// The endpoint of `device`, created on first use.
    pub fn endpoint(&self, device: &Device) -> Result<Arc<Endpoint>, PoolError> {
        let key = device.endpoint();
        let mut map = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = map.get(&key) {
            return Ok(e.clone());
        }
        let protocol = device.cfg.protocol;
        let max = self.max_for(protocol);
        if map.values().filter(|e| e.protocol == protocol).count() >= max {
            return Err(PoolError::Full { protocol, max });
        }
        let e = Arc::new(Endpoint {
            key: key.clone(),
            protocol,
            breaker: CircuitBreaker::new(
                key.clone(),
                self.breaker,
                Some(self.breaker_metrics.clone()),
            ),
            session: tokio::sync::Mutex::new(None),
            last_used: Mutex::new(Instant::now()),
            probe: Mutex::new(None),
            opcua: self.opcua.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        });
        map.insert(key, e.clone());
        self.metrics
            .endpoints
            .with_label_values(&[proto_label(protocol)])
            .inc();
        Ok(e)
    }

    /// Read tags of a device through its endpoint.
    pub async fn read(
        &self,
        device: &Arc<Device>,
        tags: Option<Vec<usize>>,
    ) -> Result<Vec<(usize, Reading)>, PoolError> {
        let ep = self.endpoint(device)?;
        let d = device.clone();
        ep.with_session(device, true, move |s| {
            Box::pin(async move { s.read(&d, tags.as_deref()).await })
        })
        .await
    }

    /// Stream the children of `node` in the device's address space into `out`.
    pub async fn browse(
        &self,
        device: &Arc<Device>,
        node: Option<String>,
        out: tokio::sync::mpsc::Sender<crate::driver::opcua::BrowseEntry>,
    ) -> Result<Result<(), String>, PoolError> {
        let ep = self.endpoint(device)?;
        ep.with_session(device, false, move |s| {
            Box::pin(async move { s.browse(node.as_deref(), out).await })
        })
        .await
    }

    /// Write one tag of a device through its endpoint.
    pub async fn write(
        &self,
        device: &Arc<Device>,
        tag: usize,
        value: Value,
    ) -> Result<Result<(), DeviceError>, PoolError> {
        let ep = self.endpoint(device)?;
        let d = device.clone();
        ep.with_session(device, true, move |s| {
            Box::pin(async move { s.write(&d, tag, &value).await })
        })
        .await
    }

    /// Breaker state of a device's endpoint.
    pub fn breaker_state(&self, device: &Device) -> BreakerState {
        let key = device.endpoint();
        self.endpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .map_or(BreakerState::Closed, |e| e.breaker.state())
    }

    fn snapshot(&self) -> Vec<Arc<Endpoint>> {
        self.endpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn update_gauges(&self) {
        let mut open: HashMap<&'static str, i64> = HashMap::new();
        for e in self.snapshot() {
            if e.is_open() {
                *open.entry(proto_label(e.protocol)).or_default() += 1;
            }
        }
        for p in ["modbus", "opcua", "s7"] {
            self.metrics
                .connections
                .with_label_values(&[p])
                .set(open.get(p).copied().unwrap_or(0));
        }
    }

    /// Idle reaper and health checks until `token`.
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
            for e in self.snapshot() {
                let idle = e.idle_for();
                if idle >= self.cfg.idle_timeout {
                    let mut s = e.session.lock().await;
                    if let Some(mut d) = s.take() {
                        tracing::debug!(endpoint = %e.key, idle_s = idle.as_secs(), "closing idle connection");
                        d.close().await;
                    }
                } else if idle >= self.cfg.health_interval && e.is_open() {
                    let probe = e.probe.lock().unwrap_or_else(|x| x.into_inner()).clone();
                    if let Some(device) = probe {
                        let first = (!device.cfg.tags.is_empty()).then(|| vec![0usize]);
                        let d = device.clone();
                        if let Err(err) = e
                            .with_session(&device, false, move |s| {
                                Box::pin(async move { s.read(&d, first.as_deref()).await })
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
        for e in self.snapshot() {
            if let Some(mut d) = e.session.lock().await.take() {
                d.close().await;
            }
        }
        self.update_gauges();
    }
}
