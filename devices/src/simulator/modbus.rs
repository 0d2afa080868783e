//! A Modbus TCP device (tokio-modbus server) whose registers move like a small machine's and
//! accept writes. Map (protocol addresses, big-endian ABCD), matching
//! `deploy/examples/modbus-sim.yaml`:
//!
//! | address | type | signal |
//! |---|---|---|
//! | HR 0-1 | float32 | temperature, sine 20-80 degC over 60 s |
//! | HR 2-3 | float32 | pressure, random walk around 5 bar |
//! | HR 4 | uint16 | ramp 0-999, +1 per 100 ms |
//! | HR 5-6 | uint32 | parts counter, +1 per second |
//! | HR 10 | int16 | setpoint x10 (writable; starts at 500 = 50.0) |
//! | HR 11 | uint16 | status word; bit 0 follows coil 0 (running) |
//! | HR 20-27 | string(16) | "NEXUS-SIM" |
//! | HR 30-33 | float64 | energy in kWh, increasing |
//! | HR 100-199 | uint16 | 100 writable scratch registers (tests, benchmarks) |
//! | IR 0 | int16 | ambient x10, sine 15-25 degC over 10 min |
//! | CO 0 | bool | running, toggles every 5 s |
//! | CO 1 | bool | pump command (writable) |
//! | DI 0 | bool | door open, random |
//!
//! Addresses at or above `illegal_from` (default 60000) answer IllegalDataAddress, so
//! exception handling can be exercised. Every unit id is served by the same map.
//!
//! Function codes served: 01-06, 15, 16 and 22 (Mask Write Register). For tests,
//! [`Registers`] counts requests per function code, can refuse 22 with IllegalFunction like
//! a device without it (`refuse_mask_write`), and can run a hook after each request (a PLC
//! that changes a register between a client's read and its write).

use std::collections::BTreeMap;
use std::future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tokio::net::TcpListener;
use tokio_modbus::server::tcp::{accept_tcp_connection, Server};
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_util::sync::CancellationToken;

const SIZE: usize = 65536;

/// Runs after each request is served, before the reply leaves, with the request's function
/// code (3 for Read Holding Registers, ...).
pub type AfterRequest = Box<dyn FnMut(u8, &mut Registers) + Send>;

/// The register map.
pub struct Registers {
    pub holding: Vec<u16>,
    pub input: Vec<u16>,
    pub coils: Vec<bool>,
    pub discrete: Vec<bool>,
    /// Requests served (for tests and benchmarks).
    pub requests: u64,
    /// Requests received per function code, refused ones included.
    pub function_codes: BTreeMap<u8, u64>,
    /// Answer Mask Write Register (22) with IllegalFunction, as devices without it do.
    pub refuse_mask_write: bool,
    /// What the "PLC" does after each request (tests: change a bit between a client's read
    /// and its write).
    pub after_request: Option<AfterRequest>,
    pub illegal_from: u16,
    /// Holding registers incremented by every read that covers them, before it is answered
    /// (benchmarks: every polled value changes at every poll, whatever the poll's timing).
    pub churn: std::ops::Range<usize>,
}

impl Registers {
    fn new() -> Registers {
        let mut r = Registers {
            holding: vec![0; SIZE],
            input: vec![0; SIZE],
            coils: vec![false; SIZE],
            discrete: vec![false; SIZE],
            requests: 0,
            function_codes: BTreeMap::new(),
            refuse_mask_write: false,
            after_request: None,
            illegal_from: 60000,
            churn: 0..0,
        };
        r.holding[10] = 500;
        let name = b"NEXUS-SIM";
        for (i, pair) in name.chunks(2).enumerate() {
            r.holding[20 + i] = u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]);
        }
        r.set_f32(2, 5.0);
        r
    }

    pub fn set_f32(&mut self, addr: usize, v: f32) {
        let b = v.to_be_bytes();
        self.holding[addr] = u16::from_be_bytes([b[0], b[1]]);
        self.holding[addr + 1] = u16::from_be_bytes([b[2], b[3]]);
    }

    pub fn get_f32(&self, addr: usize) -> f32 {
        let (a, b) = (
            self.holding[addr].to_be_bytes(),
            self.holding[addr + 1].to_be_bytes(),
        );
        f32::from_be_bytes([a[0], a[1], b[0], b[1]])
    }

    fn set_f64(&mut self, addr: usize, v: f64) {
        for (i, pair) in v.to_be_bytes().chunks(2).enumerate() {
            self.holding[addr + i] = u16::from_be_bytes([pair[0], pair[1]]);
        }
    }

    fn get_f64(&self, addr: usize) -> f64 {
        let mut b = [0u8; 8];
        for i in 0..4 {
            b[i * 2..i * 2 + 2].copy_from_slice(&self.holding[addr + i].to_be_bytes());
        }
        f64::from_be_bytes(b)
    }

    fn check(&self, addr: u16, count: usize) -> Result<std::ops::Range<usize>, ExceptionCode> {
        let start = addr as usize;
        let end = start + count;
        if count == 0 || end > self.illegal_from as usize {
            return Err(ExceptionCode::IllegalDataAddress);
        }
        Ok(start..end)
    }

    /// Move the signals to time `t` seconds since start.
    fn tick(&mut self, t: f64, rng: &mut impl Rng) {
        use std::f64::consts::PI;
        self.set_f32(0, (50.0 + 30.0 * (2.0 * PI * t / 60.0).sin()) as f32);
        let p = self.get_f32(2) as f64 + rng.random_range(-0.05..0.05);
        self.set_f32(2, p.clamp(3.0, 7.0) as f32);
        self.holding[4] = ((t * 10.0) as u64 % 1000) as u16;
        let count = t as u32;
        self.holding[5] = (count >> 16) as u16;
        self.holding[6] = count as u16;
        self.coils[0] = (t as u64 / 5).is_multiple_of(2);
        self.holding[11] = (self.holding[11] & !1) | self.coils[0] as u16;
        let e = self.get_f64(30);
        self.set_f64(30, e + 0.0125);
        self.input[0] = ((200.0 + 50.0 * (2.0 * PI * t / 600.0).sin()) as i16) as u16;
        if rng.random_range(0..50) == 0 {
            self.discrete[0] = !self.discrete[0];
        }
    }
}

impl Registers {
    fn serve(&mut self, req: Request<'static>) -> Result<Response, ExceptionCode> {
        Ok(match req {
            Request::ReadCoils(a, n) => {
                Response::ReadCoils(self.coils[self.check(a, n as usize)?].to_vec())
            }
            Request::ReadDiscreteInputs(a, n) => {
                Response::ReadDiscreteInputs(self.discrete[self.check(a, n as usize)?].to_vec())
            }
            Request::ReadHoldingRegisters(a, n) => {
                let range = self.check(a, n as usize)?;
                let churned = range.start.max(self.churn.start)..range.end.min(self.churn.end);
                if !churned.is_empty() {
                    for r in &mut self.holding[churned] {
                        *r = r.wrapping_add(1);
                    }
                }
                Response::ReadHoldingRegisters(self.holding[range].to_vec())
            }
            Request::ReadInputRegisters(a, n) => {
                Response::ReadInputRegisters(self.input[self.check(a, n as usize)?].to_vec())
            }
            Request::WriteSingleCoil(a, v) => {
                let range = self.check(a, 1)?;
                self.coils[range.start] = v;
                Response::WriteSingleCoil(a, v)
            }
            Request::WriteMultipleCoils(a, v) => {
                let range = self.check(a, v.len())?;
                self.coils[range].copy_from_slice(&v);
                Response::WriteMultipleCoils(a, v.len() as u16)
            }
            Request::WriteSingleRegister(a, v) => {
                let range = self.check(a, 1)?;
                self.holding[range.start] = v;
                Response::WriteSingleRegister(a, v)
            }
            Request::WriteMultipleRegisters(a, v) => {
                let range = self.check(a, v.len())?;
                self.holding[range].copy_from_slice(&v);
                Response::WriteMultipleRegisters(a, v.len() as u16)
            }
            Request::MaskWriteRegister(_, _, _) if self.refuse_mask_write => {
                return Err(ExceptionCode::IllegalFunction)
            }
            Request::MaskWriteRegister(a, and_mask, or_mask) => {
                let i = self.check(a, 1)?.start;
                self.holding[i] = (self.holding[i] & and_mask) | (or_mask & !and_mask);
                Response::MaskWriteRegister(a, and_mask, or_mask)
            }
            _ => return Err(ExceptionCode::IllegalFunction),
        })
    }
}

#[derive(Clone)]
struct Service {
    regs: Arc<Mutex<Registers>>,
}

impl Service {
    fn handle(&self, req: Request<'static>) -> Result<Response, ExceptionCode> {
        let mut r = self.regs.lock().unwrap_or_else(|e| e.into_inner());
        r.requests += 1;
        let fc = req.function_code().value();
        *r.function_codes.entry(fc).or_default() += 1;
        let result = r.serve(req);
        if let Some(mut hook) = r.after_request.take() {
            hook(fc, &mut r);
            // Unless the hook installed another one.
            if r.after_request.is_none() {
                r.after_request = Some(hook);
            }
        }
        result
    }
}

impl tokio_modbus::server::Service for Service {
    type Request = SlaveRequest<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = future::Ready<Result<Response, ExceptionCode>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        future::ready(self.handle(req.request))
    }
}

/// A running simulator.
pub struct ModbusSimulator {
    pub addr: SocketAddr,
    pub registers: Arc<Mutex<Registers>>,
    token: CancellationToken,
}

impl ModbusSimulator {
    /// Serve on `addr` (port 0 for a free port); signals move every `tick` (None: frozen,
    /// for tests that need stable values).
    pub async fn start(
        addr: SocketAddr,
        tick: Option<Duration>,
    ) -> std::io::Result<ModbusSimulator> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let registers = Arc::new(Mutex::new(Registers::new()));
        let token = CancellationToken::new();
        let service = Service {
            regs: registers.clone(),
        };
        let server = Server::new(listener);
        let t = token.clone();
        tokio::spawn(async move {
            let on_connected = |stream, socket_addr| {
                let service = service.clone();
                async move {
                    accept_tcp_connection(stream, socket_addr, move |_| Ok(Some(service.clone())))
                }
            };
            let on_error = |e| tracing::debug!(error = %e, "simulator connection ended");
            tokio::select! {
                r = server.serve(&on_connected, on_error) => if let Err(e) = r { tracing::warn!(error = %e, "simulator stopped") },
                _ = t.cancelled() => {}
            }
        });
        if let Some(period) = tick {
            let regs = registers.clone();
            let t = token.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                let mut rng = rand::rngs::StdRng::from_os_rng();
                let mut iv = tokio::time::interval(period);
                loop {
                    tokio::select! {
                        _ = iv.tick() => {}
                        _ = t.cancelled() => break,
                    }
                    let secs = start.elapsed().as_secs_f64();
                    regs.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .tick(secs, &mut rng);
                }
            });
        }
        Ok(ModbusSimulator {
            addr,
            registers,
            token,
        })
    }

    pub fn requests(&self) -> u64 {
        self.registers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .requests
    }

    /// Requests received with function code `fc` (refused ones included).
    pub fn function_count(&self, fc: u8) -> u64 {
        self.registers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .function_codes
            .get(&fc)
            .copied()
            .unwrap_or(0)
    }

    /// Stop serving (open connections end too).
    pub fn stop(&self) {
        self.token.cancel();
    }
}

impl Drop for ModbusSimulator {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_write_changes_only_the_masked_bits_or_is_refused() {
        let mut r = Registers::new();
        r.holding[7] = 0b10_0001;
        assert_eq!(
            r.serve(Request::MaskWriteRegister(7, !0b1000, 0b1000)),
            Ok(Response::MaskWriteRegister(7, !0b1000, 0b1000))
        );
        assert_eq!(r.holding[7], 0b10_1001);
        // The example of the Modbus Application Protocol (6.16): 0x12, AND 0xF2, OR 0x25.
        r.holding[8] = 0x12;
        r.serve(Request::MaskWriteRegister(8, 0xF2, 0x25)).unwrap();
        assert_eq!(r.holding[8], 0x17);
        assert_eq!(
            r.serve(Request::MaskWriteRegister(60000, 0, 1)),
            Err(ExceptionCode::IllegalDataAddress)
        );
        r.refuse_mask_write = true;
        assert_eq!(
            r.serve(Request::MaskWriteRegister(7, 0, 0)),
            Err(ExceptionCode::IllegalFunction)
        );
        assert_eq!(r.holding[7], 0b10_1001, "a refused request changes nothing");
    }

    #[test]
    fn a_read_advances_the_churned_registers_it_covers_and_no_others() {
        let mut r = Registers::new();
        r.churn = 100..110;
        let read = |r: &mut Registers, a, n| match r.serve(Request::ReadHoldingRegisters(a, n)) {
            Ok(Response::ReadHoldingRegisters(v)) => v,
            other => panic!("{other:?}"),
        };
        assert_eq!(read(&mut r, 95, 10), [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]);
        assert_eq!(
            r.holding[105..110],
            [0; 5],
            "registers not read do not advance"
        );
        assert_eq!(
            read(&mut r, 100, 15),
            [2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            read(&mut r, 0, 10)[..2],
            [0, 0],
            "outside the churn: unchanged"
        );
        r.churn = 0..0;
        assert_eq!(read(&mut r, 100, 2), [2, 2]);
    }
}
