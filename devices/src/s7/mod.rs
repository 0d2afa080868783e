//! Siemens S7 (S7comm over ISO-on-TCP) for S7-300/400 (rack/slot) and S7-1200/1500 (PUT/GET
//! enabled). No async S7 crate is usable today (s7-client lacks PDU splitting and typed
//! areas, snap7-client sends malformed writes, rust7 blocks and has no multi-variable read;
//! docs/adr/0006-own-s7comm-client.md), so Nexus has its own client: [`proto`] holds the codec, [`plan`] packs
//! reads into the PDU the PLC grants, and [`S7Driver`] does the I/O.
//!
//! Reads go by bytes: bools are read as their byte and the bit taken out, so bits of one byte
//! share a read. Writes go one item per request (one tag per write command); a bool is written
//! with the BIT transport size, so only that bit changes in the PLC. Every exchange has a
//! timeout, and any transport error, a malformed reply or a reply to another request drops the
//! connection, so a late reply can never answer the next request.

pub mod plan;
pub mod proto;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nexus_common::config::{DataType, DeviceConfig, Protocol, S7Address, S7Area};
use nexus_common::{Quality, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::device::{Device, PlanError};
use crate::driver::{order_as_asked, DeviceError, Driver, Reading, TransportError};
use crate::value::{self, CodecError};
use plan::{Chunk, Range};
use proto::{Item, ProtoError};

/// The PDU size Nexus asks for (PLCs grant 240 to 960).
const WANT_PDU: u16 = 960;
/// The local TSAP Nexus presents (a PG connection).
const LOCAL_TSAP: u16 = 0x0100;

/// How one tag is decoded.
#[derive(Debug, Clone)]
pub struct TagSpec {
    pub address: S7Address,
    /// Bytes read for the tag (a bool reads its byte).
    pub size: u32,
    pub data_type: DataType,
    /// Characters of a string (its declared maximum).
    pub length: u16,
    pub scale: Option<f64>,
    pub offset: Option<f64>,
}

/// A device's read plan: its tags merged into byte ranges (packed per PDU at read time).
#[derive(Debug, Clone)]
pub struct S7Plan {
    pub tags: Vec<TagSpec>,
    pub ranges: Vec<Range>,
    /// Requests the last full read sent (before the first: as packed for the smallest PDU).
    sent: Arc<AtomicUsize>,
}

impl S7Plan {
    pub fn new(cfg: &DeviceConfig) -> Result<S7Plan, PlanError> {
        let mut tags = Vec::with_capacity(cfg.tags.len());
        for t in &cfg.tags {
            let a = t
                .address
                .as_deref()
                .ok_or_else(|| PlanError::NoAddress { tag: t.id.clone() })?;
            let address = S7Address::parse(a).map_err(|reason| PlanError::Address {
                tag: t.id.clone(),
                reason,
            })?;
            address
                .check_type(t.data_type)
                .map_err(|reason| PlanError::DataType {
                    tag: t.id.clone(),
                    reason,
                })?;
            let length = t.length.unwrap_or(0);
            if t.data_type == DataType::String && !(1..=254).contains(&length) {
                return Err(PlanError::S7StringLength {
                    tag: t.id.clone(),
                    length,
                });
            }
            tags.push(TagSpec {
                address,
                size: address.size(t.data_type, length),
                data_type: t.data_type,
                length,
                scale: t.scale,
                offset: t.offset,
            });
        }
        let ranges = plan::ranges(&Self::layout(&tags, None), plan::MAX_GAP);
        tracing::debug!(
            device = %cfg.id,
            tags = tags.len(),
            ranges = ranges.len(),
            plan = ?ranges.iter().map(|r| format!("{:?}@{}+{}", r.area, r.start, r.len)).collect::<Vec<_>>(),
            "s7 read plan"
        );
        let sent = Arc::new(AtomicUsize::new(plan::pack(&ranges, 240).len()));
        Ok(S7Plan { tags, ranges, sent })
    }

    pub fn requests_per_poll(&self) -> usize {
        self.sent.load(Ordering::Relaxed)
    }

    /// `(tag, area, byte, size)` of the tags in `subset` (all when `None`).
    fn layout(tags: &[TagSpec], subset: Option<&[usize]>) -> Vec<(usize, S7Area, u32, u32)> {
        let one = |i: usize| {
            tags.get(i)
                .map(|t| (i, t.address.area, t.address.byte, t.size))
        };
        match subset {
            None => (0..tags.len()).filter_map(one).collect(),
            Some(list) => list.iter().filter_map(|&i| one(i)).collect(),
        }
    }
}

/// Decode one tag from its bytes.
fn decode(spec: &TagSpec, bytes: &[u8]) -> Reading {
    let bad = |reason: String| Reading::Bad {
        quality: Quality::BadConfigError,
        reason,
    };
    let value = match spec.data_type {
        DataType::Bool => {
            let bit = spec.address.bit.unwrap_or(0);
            Value::Bool(bytes.first().is_some_and(|b| b >> bit & 1 == 1))
        }
        DataType::String => match decode_string(bytes) {
            Ok(s) => Value::String(s),
            Err(e) => return bad(e.to_string()),
        },
        dt => match value::decode_be(bytes, dt) {
            Ok(raw) => value::apply_scale(raw, value::FloatWidth::of(dt), spec.scale, spec.offset),
            Err(e) => return bad(e.to_string()),
        },
    };
    Reading::Good {
        value,
        source_ts_ms: None,
    }
}

/// Fewer bytes than an S7 string's header (a read answered short).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an S7 string needs its two header bytes")]
pub struct StringHeaderMissing;

/// An S7 string: maximum length, current length, then the characters (Latin-1).
pub fn decode_string(b: &[u8]) -> Result<String, StringHeaderMissing> {
    let [max, len, chars @ ..] = b else {
        return Err(StringHeaderMissing);
    };
    let n = usize::from(*len).min(usize::from(*max)).min(chars.len());
    Ok(chars[..n].iter().map(|&c| char::from(c)).collect())
}

/// Encode a string for a tag of `max` characters (Latin-1; the rest padded with zeros).
pub fn encode_string(value: &Value, max: u16) -> Result<Vec<u8>, CodecError> {
    let Value::String(s) = value else {
        return Err(CodecError::WrongType {
            got: value.type_name(),
            data_type: "string",
        });
    };
    let mut chars = Vec::with_capacity(s.len());
    for c in s.chars() {
        let code = u32::from(c);
        if code > 0xFF {
            return Err(CodecError::OutOfRange {
                value: format!("{c:?}"),
                data_type: "string (Latin-1 characters only)",
            });
        }
        chars.push(code as u8);
    }
    if chars.len() > usize::from(max) {
        return Err(CodecError::OutOfRange {
            value: format!("{} characters", chars.len()),
            data_type: "string",
        });
    }
    let mut out = vec![max as u8, chars.len() as u8];
    out.extend_from_slice(&chars);
    out.resize(2 + usize::from(max), 0);
    Ok(out)
}

/// A session to one S7 PLC.
pub struct S7Driver {
    host: String,
    port: u16,
    rack: u16,
    slot: u16,
    timeout: Duration,
    stream: Option<TcpStream>,
    pdu: u16,
    pdu_ref: u16,
}

impl S7Driver {
    pub fn new(cfg: &DeviceConfig) -> S7Driver {
        let c = &cfg.connection;
        S7Driver {
            host: c.host.clone().unwrap_or_default(),
            port: c.port.unwrap_or(102),
            rack: c.rack.unwrap_or(0),
            slot: c.slot.unwrap_or(1),
            timeout: c.timeout(),
            stream: None,
            pdu: 240,
            pdu_ref: 0,
        }
    }

    /// The PDU size the PLC granted (240 before the first connection).
    pub fn pdu(&self) -> u16 {
        self.pdu
    }

    async fn exchange(stream: &mut TcpStream, req: &[u8]) -> std::io::Result<Vec<u8>> {
        stream.write_all(req).await?;
        let mut head = [0u8; 4];
        stream.read_exact(&mut head).await?;
        let len = proto::tpkt_len(&head)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
        let mut p = head.to_vec();
        p.resize(len, 0);
        stream.read_exact(&mut p[4..]).await?;
        Ok(p)
    }

    /// Send one job and return the whole reply packet; transport errors drop the connection.
    async fn call(
        &mut self,
        req: impl FnOnce(u16) -> Vec<u8>,
    ) -> Result<(Vec<u8>, u16), TransportError> {
        if self.stream.is_none() {
            self.connect().await?;
        }
        let Some(stream) = self.stream.as_mut() else {
            return Err(TransportError::Io("not connected".into()));
        };
        self.pdu_ref = self.pdu_ref.wrapping_add(1).max(1);
        let r = self.pdu_ref;
        match tokio::time::timeout(self.timeout, Self::exchange(stream, &req(r))).await {
            Err(_) => {
                self.stream = None;
                Err(TransportError::Timeout(self.timeout))
            }
            Ok(Err(e)) => {
                self.stream = None;
                Err(TransportError::Io(e.to_string()))
            }
            Ok(Ok(p)) => Ok((p, r)),
        }
    }

    /// A protocol error of a reply: refusals keep the session, anything else drops it.
    fn reply_error(&mut self, e: ProtoError) -> Result<String, TransportError> {
        match e {
            ProtoError::Refused { .. } => Ok(e.to_string()),
            other => {
                self.stream = None;
                Err(TransportError::Io(other.to_string()))
            }
        }
    }

    /// Read `ranges`: each range's bytes, or why the PLC could not read it.
    async fn read_ranges(
        &mut self,
        ranges: &[Range],
    ) -> Result<(Vec<Result<Vec<u8>, (Quality, String)>>, usize), TransportError> {
        if self.stream.is_none() {
            self.connect().await?;
        }
        let mut out: Vec<Result<Vec<u8>, (Quality, String)>> = ranges
            .iter()
            .map(|r| Ok(vec![0u8; r.len as usize]))
            .collect();
        let requests = plan::pack(ranges, self.pdu);
        let sent = requests.len();
        for req in requests {
            let items: Vec<Item> = req.iter().map(|c| plan::item(ranges, c)).collect();
            let (reply, r) = self.call(|r| proto::read_request(r, &items)).await?;
            let parsed =
                proto::parse_ack(&reply, r).and_then(|ack| proto::parse_read(&ack, &items));
            let results = match parsed {
                Ok(v) => v,
                Err(e) => {
                    let why = self.reply_error(e)?;
                    for c in &req {
                        out[c.range] = Err((Quality::BadConfigError, why.clone()));
                    }
                    continue;
                }
            };
            for (c, res) in req.iter().zip(results) {
                fill(&mut out[c.range], c, res);
            }
        }
        Ok((out, sent))
    }
}

/// Copy one item's bytes into its range's buffer, or mark the range failed.
fn fill(
    slot: &mut Result<Vec<u8>, (Quality, String)>,
    c: &Chunk,
    res: Result<Vec<u8>, proto::ItemError>,
) {
    let Ok(buf) = slot else { return };
    match res {
        Ok(bytes) => {
            let at = c.offset as usize;
            buf[at..at + bytes.len()].copy_from_slice(&bytes);
        }
        Err(e) => {
            let q = if e.is_config() {
                Quality::BadConfigError
            } else {
                Quality::BadDeviceFailure
            };
            *slot = Err((q, e.to_string()));
        }
    }
}

#[async_trait]
impl Driver for S7Driver {
    type Plan = S7Plan;
    type Settings = ();
    const PROTOCOL: Protocol = Protocol::S7;

    fn for_device(device: &DeviceConfig, _settings: &()) -> S7Driver {
        S7Driver::new(device)
    }

    async fn connect(&mut self) -> Result<(), TransportError> {
        self.stream = None;
        let endpoint = format!("{}:{}", self.host, self.port);
        let err = |reason: String| TransportError::Connect {
            endpoint: endpoint.clone(),
            reason,
        };
        let timeout = self.timeout;
        let (rack, slot) = (self.rack, self.slot);
        let setup = async {
            let mut stream = TcpStream::connect(&endpoint)
                .await
                .map_err(|e| err(e.to_string()))?;
            let _ = stream.set_nodelay(true);
            let cc = Self::exchange(
                &mut stream,
                &proto::connect_request(LOCAL_TSAP, proto::remote_tsap(rack, slot)),
            )
            .await
            .map_err(|e| err(format!("ISO connection (rack {rack}, slot {slot}): {e}")))?;
            proto::check_connect_confirm(&cc).map_err(|e| err(e.to_string()))?;
            let reply = Self::exchange(&mut stream, &proto::setup_request(1, WANT_PDU))
                .await
                .map_err(|e| err(format!("S7 setup: {e}")))?;
            let pdu = proto::parse_ack(&reply, 1)
                .and_then(|a| proto::setup_pdu(&a))
                .map_err(|e| err(format!("S7 setup: {e}")))?;
            Ok::<_, TransportError>((stream, pdu))
        };
        let (stream, pdu) = tokio::time::timeout(timeout, setup)
            .await
            .map_err(|_| err(format!("no connection within {timeout:?}")))??;
        if pdu < 64 {
            return Err(err(format!("the PLC granted a PDU of {pdu} bytes")));
        }
        tracing::debug!(endpoint = %endpoint, pdu, "s7 connected");
        self.pdu = pdu.min(WANT_PDU);
        self.pdu_ref = 1;
        self.stream = Some(stream);
        Ok(())
    }

    fn is_connected(&self) -> bool {
        self.stream.is_some()
    }

    async fn read(
        &mut self,
        _device: &Device,
        plan: &S7Plan,
        tags: Option<&[usize]>,
    ) -> Result<Vec<(usize, Reading)>, TransportError> {
        let subset;
        let ranges: &[Range] = match tags {
            None => &plan.ranges,
            Some(list) => {
                subset = plan::ranges(&S7Plan::layout(&plan.tags, Some(list)), plan::MAX_GAP);
                &subset
            }
        };
        let (buffers, mut sent) = self.read_ranges(ranges).await?;
        let mut out = Vec::with_capacity(plan.tags.len());
        // Tags of a merged range that failed are read again one by one, so one bad address
        // marks only its own tag.
        let mut retry = Vec::new();
        for (r, buf) in ranges.iter().zip(&buffers) {
            for &(tag, off, size) in &r.slots {
                match buf {
                    Ok(b) => {
                        let bytes = &b[off as usize..(off + size) as usize];
                        out.push((tag, decode(&plan.tags[tag], bytes)));
                    }
                    Err(_) if r.slots.len() > 1 => retry.push(tag),
                    Err((quality, reason)) => out.push((
                        tag,
                        Reading::Bad {
                            quality: *quality,
                            reason: reason.clone(),
                        },
                    )),
                }
            }
        }
        if !retry.is_empty() {
            let single: Vec<Range> = S7Plan::layout(&plan.tags, Some(&retry))
                .into_iter()
                .map(|(tag, area, start, len)| Range {
                    area,
                    start,
                    len,
                    slots: vec![(tag, 0, len)],
                })
                .collect();
            let (buffers, more) = self.read_ranges(&single).await?;
            sent += more;
            for (r, buf) in single.iter().zip(buffers) {
                let tag = r.slots[0].0;
                out.push((
                    tag,
                    match buf {
                        Ok(b) => decode(&plan.tags[tag], &b),
                        Err((quality, reason)) => Reading::Bad { quality, reason },
                    },
                ));
            }
        }
        if tags.is_none() {
            plan.sent.store(sent, Ordering::Relaxed);
        }
        match tags {
            Some(list) => order_as_asked(&mut out, list),
            None => out.sort_by_key(|(t, _)| *t),
        }
        Ok(out)
    }

    async fn write(
        &mut self,
        _device: &Device,
        plan: &S7Plan,
        tag: usize,
        value: &Value,
    ) -> Result<Result<(), DeviceError>, TransportError> {
        let Some(spec) = plan.tags.get(tag) else {
            return Ok(Err(DeviceError(format!("no tag {tag}"))));
        };
        let a = spec.address;
        if a.area == S7Area::Input {
            return Ok(Err(DeviceError("process inputs (I) are read-only".into())));
        }
        let (area, db) = plan::area_code(a.area);
        let encoded = match spec.data_type {
            DataType::Bool => value::encode_be(value, DataType::Bool, 1, None, None),
            DataType::String => encode_string(value, spec.length),
            dt => value::encode_be(value, dt, 1, spec.scale, spec.offset),
        };
        let bytes = match encoded {
            Ok(b) => b,
            Err(e) => return Ok(Err(DeviceError(e.to_string()))),
        };
        if self.stream.is_none() {
            self.connect().await?;
        }
        // One item per request; a value longer than the PDU allows goes in pieces.
        let room = usize::from(self.pdu)
            .saturating_sub(proto::JOB_HEADER + 2 + proto::ITEM_SPEC + 4)
            .max(2)
            & !1;
        let mut at = 0usize;
        while at < bytes.len() {
            let piece = &bytes[at..(at + room).min(bytes.len())];
            let item = Item {
                area,
                db,
                byte: a.byte + at as u32,
                bit: if spec.data_type == DataType::Bool {
                    a.bit
                } else {
                    None
                },
                len: piece.len() as u16,
            };
            let (reply, r) = self
                .call(|r| proto::write_request(r, &[(item, piece.to_vec())]))
                .await?;
            let parsed = proto::parse_ack(&reply, r).and_then(|ack| proto::parse_write(&ack, 1));
            match parsed {
                Ok(v) => {
                    if let Some(Err(e)) = v.into_iter().next() {
                        return Ok(Err(DeviceError(e.to_string())));
                    }
                }
                Err(e) => return Ok(Err(DeviceError(self.reply_error(e)?))),
            }
            at += piece.len();
        }
        Ok(Ok(()))
    }

    async fn close(&mut self) {
        if let Some(mut s) = self.stream.take() {
            let _ = tokio::time::timeout(Duration::from_secs(1), s.shutdown()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec(addr: &str, dt: DataType, length: u16) -> TagSpec {
        let address = S7Address::parse(addr).unwrap();
        TagSpec {
            address,
            size: address.size(dt, length),
            data_type: dt,
            length,
            scale: None,
            offset: None,
        }
    }

    fn good(r: Reading) -> Value {
        match r {
            Reading::Good { value, .. } => value,
            bad => panic!("{bad:?}"),
        }
    }

    #[test]
    fn every_type_decodes_from_plc_bytes() {
        let cases: Vec<(TagSpec, Vec<u8>, Value)> = vec![
            (
                spec("DB1.DBX0.3", DataType::Bool, 0),
                vec![0b1000],
                Value::Bool(true),
            ),
            (
                spec("M0.2", DataType::Bool, 0),
                vec![0b1011],
                Value::Bool(false),
            ),
            (
                spec("DB1.DBB0", DataType::Byte, 0),
                vec![200],
                Value::Int(200),
            ),
            (
                spec("DB1.DBW0", DataType::Int, 0),
                vec![0xFF, 0xFE],
                Value::Int(-2),
            ),
            (
                spec("MW0", DataType::Word, 0),
                vec![0xFF, 0xFE],
                Value::Int(65534),
            ),
            (
                spec("DB1.DBD0", DataType::Dint, 0),
                (-123_456i32).to_be_bytes().to_vec(),
                Value::Int(-123_456),
            ),
            (
                spec("DB1.DBD0", DataType::Dword, 0),
                0xFFFF_FFFFu32.to_be_bytes().to_vec(),
                Value::Int(4_294_967_295),
            ),
            (
                spec("DB1.DBD0", DataType::Real, 0),
                12.5f32.to_be_bytes().to_vec(),
                Value::Float(12.5),
            ),
            (
                spec("DB1.DBD0", DataType::Lreal, 0),
                100.25f64.to_be_bytes().to_vec(),
                Value::Float(100.25),
            ),
            (
                spec("DB1.DBB0", DataType::String, 4),
                vec![4, 2, b'o', b'k', 0, 0],
                Value::String("ok".into()),
            ),
        ];
        for (s, bytes, want) in cases {
            assert_eq!(bytes.len() as u32, s.size, "{s:?}");
            assert_eq!(good(decode(&s, &bytes)), want, "{s:?}");
        }
    }

    #[test]
    fn strings_round_trip_and_are_checked() {
        let b = encode_string(&Value::String("Grüße".into()), 8).unwrap();
        assert_eq!(b.len(), 10);
        assert_eq!(&b[..2], &[8, 5]);
        assert_eq!(decode_string(&b).unwrap(), "Grüße");
        assert!(encode_string(&Value::String("too long".into()), 3).is_err());
        assert!(encode_string(&Value::String("€".into()), 3)
            .unwrap_err()
            .to_string()
            .contains("Latin-1"));
        assert!(encode_string(&Value::Int(1), 3).is_err());
        // A current length above the maximum or the bytes read is cut, not trusted.
        assert_eq!(decode_string(&[2, 200, b'a', b'b', b'c']).unwrap(), "ab");
    }

    #[test]
    fn writes_check_the_range_of_the_plc_type() {
        let e = value::encode_be(&Value::Int(256), DataType::Byte, 1, None, None).unwrap_err();
        assert!(e.to_string().contains("does not fit byte"), "{e}");
        let e = value::encode_be(&Value::Int(-1), DataType::Word, 1, None, None).unwrap_err();
        assert!(e.to_string().contains("does not fit word"), "{e}");
        assert_eq!(
            value::encode_be(&Value::Float(61.5), DataType::Int, 1, Some(0.1), None).unwrap(),
            615i16.to_be_bytes().to_vec()
        );
        assert_eq!(
            value::encode_be(&Value::Bool(true), DataType::Bool, 1, None, None).unwrap(),
            vec![1]
        );
    }

    proptest! {
        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..12), len in 1u16..8) {
            for (addr, dt) in [("DB1.DBX0.7", DataType::Bool), ("DB1.DBW0", DataType::Int), ("DB1.DBD0", DataType::Real), ("DB1.DBB0", DataType::String), ("DB1.DBD0", DataType::Lreal)] {
                let _ = decode(&spec(addr, dt, len), &bytes);
            }
        }
    }
}
