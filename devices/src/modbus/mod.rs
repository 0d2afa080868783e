//! Modbus TCP, RTU (serial) and RTU-over-TCP on tokio-modbus: function codes 01/02/03/04 for
//! reads (planned by [`plan`]), 05/06/15/16 for writes, 22 (Mask Write Register) for a bit of
//! a holding register, or 03 then 06 where a device lacks 22 and its `connection.bit_write`
//! says `read_modify_write`. Every call has a timeout; after a
//! timeout or any transport or framing error the connection is dropped, so a late reply can
//! never be read as the answer to the next request (tokio-modbus would otherwise fail the
//! next call with a transaction-id mismatch on TCP, and RTU has no transaction id at all).

pub mod codec;
pub mod plan;

use std::time::Duration;

use async_trait::async_trait;
use nexus_common::config::devices::BitWrite;
use nexus_common::config::{
    DeviceConfig, ModbusAddress, ModbusTable, ModbusTransport, Parity, Protocol,
};
use nexus_common::{Quality, Value};
use tokio_modbus::client::{Context, Reader, Writer};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{ExceptionCode, Slave};

use crate::device::{Device, PlanError};
use crate::driver::{order_as_asked, DeviceError, Driver, Reading, TransportError};
use plan::{PlanItem, PlanLimits, ReadRequest};

/// How one tag is decoded.
#[derive(Debug, Clone)]
pub struct TagSpec {
    pub address: ModbusAddress,
    pub count: u16,
    pub data_type: nexus_common::config::DataType,
    pub byte_order: nexus_common::config::ByteOrder,
    pub length: u16,
    pub scale: Option<f64>,
    pub offset: Option<f64>,
}

/// A device's read plan.
#[derive(Debug, Clone)]
pub struct ModbusPlan {
    pub unit_id: u8,
    /// How bits of holding registers are written.
    pub bit_write: BitWrite,
    pub limits: PlanLimits,
    pub tags: Vec<TagSpec>,
    pub requests: Vec<ReadRequest>,
}

impl ModbusPlan {
    pub fn new(cfg: &DeviceConfig) -> Result<ModbusPlan, PlanError> {
        let c = &cfg.connection;
        let limits = PlanLimits {
            max_registers: c.max_registers_per_request.unwrap_or(125).clamp(1, 125),
            max_bits: 2000,
            max_gap: c.max_register_gap.unwrap_or(10),
        };
        let mut tags = Vec::with_capacity(cfg.tags.len());
        for t in &cfg.tags {
            let a = t
                .address
                .as_deref()
                .ok_or_else(|| PlanError::NoAddress { tag: t.id.clone() })?;
            let address = ModbusAddress::parse(a).map_err(|reason| PlanError::Address {
                tag: t.id.clone(),
                reason,
            })?;
            let length = t.length.unwrap_or(0);
            let count = if address.is_bit_table() || address.bit.is_some() {
                1
            } else {
                t.data_type.modbus_registers(length)
            };
            tags.push(TagSpec {
                address,
                count,
                data_type: t.data_type,
                byte_order: t.byte_order,
                length,
                scale: t.scale,
                offset: t.offset,
            });
        }
        let items: Vec<PlanItem> = tags
            .iter()
            .enumerate()
            .map(|(i, t)| PlanItem {
                tag: i,
                address: t.address,
                count: t.count,
            })
            .collect();
        let requests = plan::plan(&items, limits);
        tracing::debug!(
            device = %cfg.id,
            tags = tags.len(),
            requests = requests.len(),
            plan = ?requests.iter().map(|r| format!("{:?}@{}+{}", r.table, r.start, r.count)).collect::<Vec<_>>(),
            "modbus read plan"
        );
        Ok(ModbusPlan {
            unit_id: c.unit_id.unwrap_or(1),
            bit_write: c.bit_write.unwrap_or_default(),
            limits,
            tags,
            requests,
        })
    }
}

/// The AND and OR masks of a Mask Write Register (function 22) that set (`on`) or clear bit
/// `bit` and keep the others: the device stores `(current & and) | (or & !and)`.
fn bit_masks(bit: u8, on: bool) -> (u16, u16) {
    let b = 1u16 << bit;
    (!b, if on { b } else { 0 })
}

fn exception_quality(e: ExceptionCode) -> Quality {
    match e {
        ExceptionCode::IllegalFunction
        | ExceptionCode::IllegalDataAddress
        | ExceptionCode::IllegalDataValue => Quality::BadConfigError,
        _ => Quality::BadDeviceFailure,
    }
}

/// A session to one Modbus endpoint (one TCP connection or one serial bus); devices with
/// different unit ids behind it share it.
pub struct ModbusDriver {
    transport: ModbusTransport,
    host: String,
    port: u16,
    serial: Option<(String, u32, Parity, u8, u8)>,
    timeout: Duration,
    /// Silence between RTU frames (3.5 character times, at least 1.75 ms).
    frame_gap: Option<Duration>,
    ctx: Option<Context>,
}

impl ModbusDriver {
    pub fn new(cfg: &DeviceConfig) -> ModbusDriver {
        let c = &cfg.connection;
        let transport = c.transport.unwrap_or_default();
        let baud = c.baud_rate.unwrap_or(9600);
        let frame_gap = match transport {
            ModbusTransport::Tcp => None,
            _ => Some(
                Duration::from_micros((3.5 * 11.0 * 1_000_000.0 / baud as f64) as u64)
                    .max(Duration::from_micros(1750)),
            ),
        };
        ModbusDriver {
            transport,
            host: c.host.clone().unwrap_or_default(),
            port: c.port.unwrap_or(502),
            serial: c.serial_port.clone().map(|p| {
                (
                    p,
                    baud,
                    c.parity.unwrap_or(Parity::None),
                    c.data_bits.unwrap_or(8),
                    c.stop_bits.unwrap_or(1),
                )
            }),
            timeout: c.timeout(),
            frame_gap,
            ctx: None,
        }
    }

    fn endpoint(&self) -> String {
        match (&self.serial, self.transport) {
            (Some((p, ..)), ModbusTransport::Rtu) => p.clone(),
            _ => format!("{}:{}", self.host, self.port),
        }
    }

    async fn call<T, F>(
        &mut self,
        unit: u8,
        f: F,
    ) -> Result<Result<T, ExceptionCode>, TransportError>
    where
        F: for<'a> FnOnce(
            &'a mut Context,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = tokio_modbus::Result<T>> + Send + 'a>,
        >,
    {
        if self.ctx.is_none() {
            self.connect().await?;
        }
        let timeout = self.timeout;
        let Some(ctx) = self.ctx.as_mut() else {
            return Err(TransportError::Io("not connected".into()));
        };
        ctx.set_slave(Slave(unit));
        let result = tokio::time::timeout(timeout, f(ctx)).await;
        if let Some(gap) = self.frame_gap {
            tokio::time::sleep(gap).await;
        }
        match result {
            Err(_) => {
                // Drop the connection: the late reply must not answer the next request.
                self.ctx = None;
                Err(TransportError::Timeout(timeout))
            }
            Ok(Err(e)) => {
                self.ctx = None;
                Err(TransportError::Io(e.to_string()))
            }
            Ok(Ok(r)) => Ok(r),
        }
    }

    async fn execute(
        &mut self,
        unit: u8,
        r: &ReadRequest,
    ) -> Result<Result<Vec<u16>, ExceptionCode>, TransportError> {
        let (start, count) = (r.start, r.count);
        match r.table {
            ModbusTable::HoldingRegister => {
                self.call(unit, move |c| {
                    Box::pin(c.read_holding_registers(start, count))
                })
                .await
            }
            ModbusTable::InputRegister => {
                self.call(unit, move |c| {
                    Box::pin(c.read_input_registers(start, count))
                })
                .await
            }
            ModbusTable::Coil => {
                let bits = self
                    .call(unit, move |c| Box::pin(c.read_coils(start, count)))
                    .await?;
                Ok(bits.map(|b| b.into_iter().map(u16::from).collect()))
            }
            ModbusTable::DiscreteInput => {
                let bits = self
                    .call(unit, move |c| {
                        Box::pin(c.read_discrete_inputs(start, count))
                    })
                    .await?;
                Ok(bits.map(|b| b.into_iter().map(u16::from).collect()))
            }
        }
    }
}

fn decode_slot(spec: &TagSpec, words: &[u16]) -> Reading {
    if spec.address.is_bit_table() {
        return Reading::Good {
            value: Value::Bool(words.first().copied().unwrap_or(0) != 0),
            source_ts_ms: None,
        };
    }
    if let Some(bit) = spec.address.bit {
        return Reading::Good {
            value: Value::Bool(words.first().copied().unwrap_or(0) >> bit & 1 == 1),
            source_ts_ms: None,
        };
    }
    match codec::decode(words, spec.data_type, spec.byte_order, spec.length) {
        Ok(raw) => Reading::Good {
            value: codec::apply_scale(
                raw,
                codec::FloatWidth::of(spec.data_type),
                spec.scale,
                spec.offset,
            ),
            source_ts_ms: None,
        },
        Err(e) => Reading::Bad {
            quality: Quality::BadConfigError,
            reason: e.to_string(),
        },
    }
}

#[async_trait]
impl Driver for ModbusDriver {
    type Plan = ModbusPlan;
    type Settings = ();
    const PROTOCOL: Protocol = Protocol::Modbus;

    fn for_device(device: &DeviceConfig, _settings: &()) -> ModbusDriver {
        ModbusDriver::new(device)
    }

    async fn connect(&mut self) -> Result<(), TransportError> {
        let endpoint = self.endpoint();
        let err = |reason: String| TransportError::Connect {
            endpoint: endpoint.clone(),
            reason,
        };
        let ctx = match self.transport {
            ModbusTransport::Tcp | ModbusTransport::RtuOverTcp => {
                let addr = format!("{}:{}", self.host, self.port);
                let stream =
                    tokio::time::timeout(self.timeout, tokio::net::TcpStream::connect(&addr))
                        .await
                        .map_err(|_| err(format!("no connection within {:?}", self.timeout)))?
                        .map_err(|e| err(e.to_string()))?;
                let _ = stream.set_nodelay(true);
                if self.transport == ModbusTransport::Tcp {
                    tokio_modbus::client::tcp::attach_slave(stream, Slave(1))
                } else {
                    tokio_modbus::client::rtu::attach_slave(stream, Slave(1))
                }
            }
            ModbusTransport::Rtu => {
                let Some((path, baud, parity, data_bits, stop_bits)) = &self.serial else {
                    return Err(err("no serial_port configured".into()));
                };
                let builder = tokio_serial::new(path.as_str(), *baud)
                    .parity(match parity {
                        Parity::None => tokio_serial::Parity::None,
                        Parity::Even => tokio_serial::Parity::Even,
                        Parity::Odd => tokio_serial::Parity::Odd,
                    })
                    .data_bits(if *data_bits == 7 {
                        tokio_serial::DataBits::Seven
                    } else {
                        tokio_serial::DataBits::Eight
                    })
                    .stop_bits(if *stop_bits == 2 {
                        tokio_serial::StopBits::Two
                    } else {
                        tokio_serial::StopBits::One
                    });
                let port =
                    tokio_serial::SerialStream::open(&builder).map_err(|e| err(e.to_string()))?;
                tokio_modbus::client::rtu::attach_slave(port, Slave(1))
            }
        };
        self.ctx = Some(ctx);
        Ok(())
    }

    fn is_connected(&self) -> bool {
        self.ctx.is_some()
    }

    async fn read(
        &mut self,
        _device: &Device,
        plan: &ModbusPlan,
        tags: Option<&[usize]>,
    ) -> Result<Vec<(usize, Reading)>, TransportError> {
        let subset;
        let requests: &[ReadRequest] = match tags {
            None => &plan.requests,
            Some(list) => {
                let items: Vec<PlanItem> = list
                    .iter()
                    .filter_map(|&i| {
                        plan.tags.get(i).map(|t| PlanItem {
                            tag: i,
                            address: t.address,
                            count: t.count,
                        })
                    })
                    .collect();
                subset = plan::plan(&items, plan.limits);
                &subset
            }
        };
        let mut out = Vec::with_capacity(plan.tags.len());
        for r in requests {
            match self.execute(plan.unit_id, r).await? {
                Ok(words) => {
                    for s in &r.slots {
                        let start = s.offset as usize;
                        let end = start + s.count as usize;
                        let reading = match words.get(start..end) {
                            Some(w) => decode_slot(&plan.tags[s.tag], w),
                            None => Reading::Bad {
                                quality: Quality::BadDeviceFailure,
                                reason: format!(
                                    "short response: {} of {} values",
                                    words.len(),
                                    r.count
                                ),
                            },
                        };
                        out.push((s.tag, reading));
                    }
                }
                Err(exc) => {
                    for s in &r.slots {
                        out.push((
                            s.tag,
                            Reading::Bad {
                                quality: exception_quality(exc),
                                reason: format!("Modbus exception {exc:?}"),
                            },
                        ));
                    }
                }
            }
        }
        if let Some(list) = tags {
            order_as_asked(&mut out, list);
        }
        Ok(out)
    }

    async fn write(
        &mut self,
        _device: &Device,
        plan: &ModbusPlan,
        tag: usize,
        value: &Value,
    ) -> Result<Result<(), DeviceError>, TransportError> {
        let Some(spec) = plan.tags.get(tag) else {
            return Ok(Err(DeviceError(format!("no tag {tag}"))));
        };
        let unit = plan.unit_id;
        let addr = spec.address.address;
        let exc = |e: ExceptionCode| DeviceError(format!("Modbus exception {e:?}"));
        match (spec.address.table, spec.address.bit) {
            (ModbusTable::InputRegister | ModbusTable::DiscreteInput, _) => Ok(Err(DeviceError(
                "input registers and discrete inputs are read-only".into(),
            ))),
            (ModbusTable::Coil, _) => {
                let on = match value {
                    Value::Bool(b) => *b,
                    Value::Int(0) | Value::UInt(0) => false,
                    Value::Int(1) | Value::UInt(1) => true,
                    v => return Ok(Err(DeviceError(format!("a coil takes a bool, not {v}")))),
                };
                Ok(self
                    .call(unit, move |c| Box::pin(c.write_single_coil(addr, on)))
                    .await?
                    .map_err(exc))
            }
            (ModbusTable::HoldingRegister, Some(bit)) => {
                let Value::Bool(on) = value else {
                    return Ok(Err(DeviceError(format!(
                        "a register bit takes a bool, not {value}"
                    ))));
                };
                let on = *on;
                if plan.bit_write == BitWrite::Mask {
                    // One request: the device changes the bit itself, so a bit the PLC sets
                    // meanwhile is kept (a read then a write would put back its old value).
                    let (and_mask, or_mask) = bit_masks(bit, on);
                    return match self
                        .call(unit, move |c| {
                            Box::pin(c.masked_write_register(addr, and_mask, or_mask))
                        })
                        .await?
                    {
                        Ok(()) => Ok(Ok(())),
                        Err(ExceptionCode::IllegalFunction) => Ok(Err(DeviceError(format!(
                            "HR:{addr}.{bit}: the device does not support Mask Write Register \
                             (function 22, exception IllegalFunction); for such a device set \
                             connection.bit_write: read_modify_write (function 03 then 06, \
                             which overwrites bits the PLC changes in between)"
                        )))),
                        Err(e) => Ok(Err(exc(e))),
                    };
                }
                // `bit_write: read_modify_write`, for devices without function 22: not atomic,
                // a bit the PLC changes between the read and the write is lost.
                let current = match self
                    .call(unit, move |c| Box::pin(c.read_holding_registers(addr, 1)))
                    .await?
                {
                    Ok(w) => w.first().copied().unwrap_or(0),
                    Err(e) => return Ok(Err(exc(e))),
                };
                let word = if on {
                    current | (1 << bit)
                } else {
                    current & !(1 << bit)
                };
                Ok(self
                    .call(unit, move |c| Box::pin(c.write_single_register(addr, word)))
                    .await?
                    .map_err(exc))
            }
            (ModbusTable::HoldingRegister, None) => {
                let words = match codec::encode(
                    value,
                    spec.data_type,
                    spec.byte_order,
                    spec.length,
                    spec.scale,
                    spec.offset,
                ) {
                    Ok(w) => w,
                    Err(e) => return Ok(Err(DeviceError(e.to_string()))),
                };
                if words.len() == 1 {
                    let w = words[0];
                    Ok(self
                        .call(unit, move |c| Box::pin(c.write_single_register(addr, w)))
                        .await?
                        .map_err(exc))
                } else {
                    Ok(self
                        .call(unit, move |c| {
                            Box::pin(async move { c.write_multiple_registers(addr, &words).await })
                        })
                        .await?
                        .map_err(exc))
                }
            }
        }
    }

    async fn close(&mut self) {
        if let Some(mut ctx) = self.ctx.take() {
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                tokio_modbus::client::Client::disconnect(&mut ctx),
            )
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::bit_masks;

    /// What a device does with a Mask Write Register (Modbus Application Protocol 6.16).
    fn apply(current: u16, and_mask: u16, or_mask: u16) -> u16 {
        (current & and_mask) | (or_mask & !and_mask)
    }

    #[test]
    fn bit_masks_change_only_their_bit() {
        for current in [0u16, 0xFFFF, 0b10_0001, 0xA5A5, 0x8000] {
            for bit in 0..16u8 {
                let b = 1u16 << bit;
                let (and_mask, or_mask) = bit_masks(bit, true);
                assert_eq!(apply(current, and_mask, or_mask), current | b);
                let (and_mask, or_mask) = bit_masks(bit, false);
                assert_eq!(apply(current, and_mask, or_mask), current & !b);
            }
        }
        // The bytes on the wire for bit 3: AND 0xFFF7, OR 0x0008 (set) or 0x0000 (clear).
        assert_eq!(bit_masks(3, true), (0xFFF7, 0x0008));
        assert_eq!(bit_masks(3, false), (0xFFF7, 0x0000));
    }
}
