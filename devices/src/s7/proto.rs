//! S7comm over ISO-on-TCP (RFC 1006): the bytes of connection setup, ReadVar and WriteVar.
//!
//! ```text
//! TPKT  [0x03 0x00 len:u16]                       RFC 1006, length of the whole packet
//! COTP  CR [0x11 0xE0 dst:u16 src:u16 class ...]  connection request with TPDU size and TSAPs
//!       CC [.. 0xD0 ..]                           connection confirm
//!       DT [0x02 0xF0 0x80]                       data, last unit
//! S7    [0x32 rosctr 0 0 pdu_ref:u16 param_len:u16 data_len:u16 (error:u16 in ack-data)]
//! ```
//!
//! Everything here is pure (bytes in, bytes out) and unit-tested at the byte level; the
//! driver does the I/O. Multi-byte fields are big-endian.

/// S7 area codes.
pub const AREA_INPUT: u8 = 0x81;
pub const AREA_OUTPUT: u8 = 0x82;
pub const AREA_MERKER: u8 = 0x83;
pub const AREA_DB: u8 = 0x84;

/// Transport sizes in a request item.
const TS_BIT: u8 = 0x01;
const TS_BYTE: u8 = 0x02;
/// Transport sizes in data items (lengths in bits for these two).
const DTS_BIT: u8 = 0x03;
const DTS_BYTE: u8 = 0x04;

const ROSCTR_JOB: u8 = 0x01;
const ROSCTR_ACK_DATA: u8 = 0x03;
const FN_SETUP: u8 = 0xF0;
const FN_READ: u8 = 0x04;
const FN_WRITE: u8 = 0x05;

/// Bytes of TPKT + COTP DT in front of every S7 PDU.
pub const ISO_HEADER: usize = 7;
/// Bytes of a job header / an ack-data header.
pub const JOB_HEADER: usize = 10;
pub const ACK_HEADER: usize = 12;
/// Bytes of one ReadVar/WriteVar request item.
pub const ITEM_SPEC: usize = 12;
/// Items per request at most (what S7 CPUs accept).
pub const MAX_ITEMS: usize = 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("malformed reply: {0}")]
    Malformed(String),
    #[error("the PLC refused the request: error class {class:#04x} code {code:#04x} ({})", describe(*class, *code))]
    Refused { class: u8, code: u8 },
    #[error("reply to request {got}, expected {want}")]
    WrongReference { want: u16, got: u16 },
}

fn describe(class: u8, code: u8) -> &'static str {
    match (class, code) {
        (0x81, _) => "application relationship error",
        (0x82, _) => "object definition error",
        (0x84, _) => "service error",
        (0x85, 0x00) => "PDU too long",
        (0x85, _) => "error on supplies",
        (0x87, _) => "access error",
        (0xD6, _) | (0xD2, _) => {
            "PUT/GET communication not permitted (enable it in the CPU's protection settings)"
        }
        _ => "see the CPU's diagnostic buffer",
    }
}

/// A returned item code other than success (0xFF).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{}", item_error(self.0))]
pub struct ItemError(pub u8);

impl ItemError {
    /// Whether the address or type is wrong (a configuration error, not a device fault).
    pub fn is_config(self) -> bool {
        matches!(self.0, 0x03 | 0x05 | 0x06 | 0x07 | 0x0A)
    }
}

/// What a returned item code means.
fn item_error(code: u8) -> String {
    match code {
        0x01 => "hardware fault".into(),
        0x03 => "access to the object not allowed".into(),
        0x05 => "address out of range".into(),
        0x06 => "data type not supported".into(),
        0x07 => "data type inconsistent".into(),
        0x0A => "object does not exist (no such data block?)".into(),
        c => format!("item error {c:#04x}"),
    }
}

fn tpkt(out: &mut [u8]) {
    let len = out.len() as u16;
    out[2..4].copy_from_slice(&len.to_be_bytes());
}

/// The remote TSAP for rack/slot addressing (connection type PG).
pub fn remote_tsap(rack: u16, slot: u16) -> u16 {
    0x0100 | ((rack & 0x07) * 0x20 + (slot & 0x1F))
}

/// COTP connection request.
pub fn connect_request(local_tsap: u16, remote_tsap: u16) -> Vec<u8> {
    let mut out = vec![
        0x03, 0x00, 0x00, 0x00, // TPKT
        0x11, 0xE0, 0x00, 0x00, 0x00, 0x01, 0x00, // COTP CR, dst 0, src 1, class 0
        0xC0, 0x01, 0x0A, // TPDU size 1024
        0xC1, 0x02, // calling TSAP
    ];
    out.extend_from_slice(&local_tsap.to_be_bytes());
    out.extend_from_slice(&[0xC2, 0x02]);
    out.extend_from_slice(&remote_tsap.to_be_bytes());
    tpkt(&mut out);
    out
}

/// Check a COTP connection confirm (a whole TPKT packet).
pub fn check_connect_confirm(p: &[u8]) -> Result<(), ProtoError> {
    if p.len() < 7 || p[0] != 0x03 {
        return Err(ProtoError::Malformed("not a TPKT packet".into()));
    }
    if p[5] != 0xD0 {
        return Err(ProtoError::Malformed(format!(
            "COTP type {:#04x} instead of connection confirm (wrong rack/slot or TSAP?)",
            p[5]
        )));
    }
    Ok(())
}

/// Wrap an S7 PDU in TPKT + COTP DT.
fn wrap(s7: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ISO_HEADER + s7.len());
    out.extend_from_slice(&[0x03, 0x00, 0x00, 0x00, 0x02, 0xF0, 0x80]);
    out.extend_from_slice(s7);
    tpkt(&mut out);
    out
}

fn job(pdu_ref: u16, param: &[u8], data: &[u8]) -> Vec<u8> {
    let mut s7 = vec![0x32, ROSCTR_JOB, 0x00, 0x00];
    s7.extend_from_slice(&pdu_ref.to_be_bytes());
    s7.extend_from_slice(&(param.len() as u16).to_be_bytes());
    s7.extend_from_slice(&(data.len() as u16).to_be_bytes());
    s7.extend_from_slice(param);
    s7.extend_from_slice(data);
    wrap(&s7)
}

/// Setup communication, asking for `pdu` bytes.
pub fn setup_request(pdu_ref: u16, pdu: u16) -> Vec<u8> {
    let mut param = vec![FN_SETUP, 0x00, 0x00, 0x01, 0x00, 0x01];
    param.extend_from_slice(&pdu.to_be_bytes());
    job(pdu_ref, &param, &[])
}

/// An ack-data reply split into its parts.
#[derive(Debug)]
pub struct Ack<'a> {
    pub pdu_ref: u16,
    pub param: &'a [u8],
    pub data: &'a [u8],
}

/// Parse a whole TPKT packet holding an S7 ack-data PDU.
pub fn parse_ack(p: &[u8], want_ref: u16) -> Result<Ack<'_>, ProtoError> {
    let bad = |m: &str| ProtoError::Malformed(m.to_owned());
    if p.len() < ISO_HEADER + ACK_HEADER || p[0] != 0x03 || p[5] != 0xF0 {
        return Err(bad("not a COTP data packet"));
    }
    let s7 = &p[ISO_HEADER..];
    if s7[0] != 0x32 {
        return Err(bad("no S7 protocol id"));
    }
    if s7[1] != ROSCTR_ACK_DATA && s7[1] != 0x02 {
        return Err(ProtoError::Malformed(format!(
            "S7 message type {:#04x}",
            s7[1]
        )));
    }
    let pdu_ref = u16::from_be_bytes([s7[4], s7[5]]);
    let plen = u16::from_be_bytes([s7[6], s7[7]]) as usize;
    let dlen = u16::from_be_bytes([s7[8], s7[9]]) as usize;
    let (class, code) = (s7[10], s7[11]);
    if pdu_ref != want_ref {
        return Err(ProtoError::WrongReference {
            want: want_ref,
            got: pdu_ref,
        });
    }
    if class != 0 || code != 0 {
        return Err(ProtoError::Refused { class, code });
    }
    if s7.len() < ACK_HEADER + plen + dlen {
        return Err(bad("shorter than its header says"));
    }
    Ok(Ack {
        pdu_ref,
        param: &s7[ACK_HEADER..ACK_HEADER + plen],
        data: &s7[ACK_HEADER + plen..ACK_HEADER + plen + dlen],
    })
}

/// The PDU size the PLC granted in its setup reply.
pub fn setup_pdu(ack: &Ack<'_>) -> Result<u16, ProtoError> {
    match ack.param {
        [FN_SETUP, _, _, _, _, _, hi, lo, ..] => Ok(u16::from_be_bytes([*hi, *lo])),
        _ => Err(ProtoError::Malformed("not a setup reply".into())),
    }
}

/// One variable: `len` bytes at `byte` of an area (or one bit when `bit` is set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Item {
    pub area: u8,
    pub db: u16,
    pub byte: u32,
    pub bit: Option<u8>,
    pub len: u16,
}

impl Item {
    fn spec(&self, out: &mut Vec<u8>) {
        let (ts, len, addr) = match self.bit {
            Some(b) => (TS_BIT, 1u16, self.byte * 8 + u32::from(b)),
            None => (TS_BYTE, self.len, self.byte * 8),
        };
        out.extend_from_slice(&[0x12, 0x0A, 0x10, ts]);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&self.db.to_be_bytes());
        out.push(self.area);
        out.extend_from_slice(&addr.to_be_bytes()[1..4]);
    }

    /// Bytes this item's data takes in a reply (header + data, before padding).
    pub fn reply_bytes(&self) -> usize {
        4 + if self.bit.is_some() {
            1
        } else {
            self.len as usize
        }
    }
}

/// Bytes of a ReadVar reply carrying `items` (for packing within the PDU size).
pub fn read_reply_size(items: &[Item]) -> usize {
    ACK_HEADER + 2 + data_items_size(items)
}

/// Bytes of the data items for `items` in a ReadVar reply or a WriteVar request (each odd
/// item but the last is followed by a fill byte).
fn data_items_size(items: &[Item]) -> usize {
    let n = items.len();
    items
        .iter()
        .enumerate()
        .map(|(i, it)| {
            let b = it.reply_bytes();
            b + usize::from(b % 2 == 1 && i + 1 < n)
        })
        .sum()
}

/// Bytes of a ReadVar request for `n` items.
pub fn read_request_size(n: usize) -> usize {
    JOB_HEADER + 2 + ITEM_SPEC * n
}

pub fn read_request(pdu_ref: u16, items: &[Item]) -> Vec<u8> {
    let mut param = vec![FN_READ, items.len() as u8];
    for it in items {
        it.spec(&mut param);
    }
    job(pdu_ref, &param, &[])
}

/// Each item's bytes, or the PLC's reason it could not be read.
pub fn parse_read(
    ack: &Ack<'_>,
    items: &[Item],
) -> Result<Vec<Result<Vec<u8>, ItemError>>, ProtoError> {
    let bad = |m: String| ProtoError::Malformed(m);
    if ack.param.len() < 2 || ack.param[0] != FN_READ {
        return Err(bad("not a read reply".into()));
    }
    if ack.param[1] as usize != items.len() {
        return Err(bad(format!(
            "{} items in the reply for {} asked",
            ack.param[1],
            items.len()
        )));
    }
    let d = ack.data;
    let mut pos = 0;
    let mut out = Vec::with_capacity(items.len());
    for (i, it) in items.iter().enumerate() {
        if pos + 4 > d.len() {
            return Err(bad(format!("item {i} is cut short")));
        }
        let (ret, ts) = (d[pos], d[pos + 1]);
        let len = u16::from_be_bytes([d[pos + 2], d[pos + 3]]) as usize;
        pos += 4;
        if ret != 0xFF {
            out.push(Err(ItemError(ret)));
            continue;
        }
        // Bit and byte transport sizes count bits; octet strings (0x09) and reals count bytes.
        let bytes = match ts {
            DTS_BIT | DTS_BYTE => len.div_ceil(8),
            _ => len,
        };
        if pos + bytes > d.len() {
            return Err(bad(format!("item {i} is cut short")));
        }
        let want = if it.bit.is_some() { 1 } else { it.len as usize };
        if bytes != want {
            return Err(bad(format!("item {i}: {bytes} bytes for {want} asked")));
        }
        out.push(Ok(d[pos..pos + bytes].to_vec()));
        pos += bytes;
        if bytes % 2 == 1 && i + 1 < items.len() {
            pos += 1;
        }
    }
    Ok(out)
}

/// Bytes of a WriteVar request for `items` carrying `values`.
pub fn write_request_size(items: &[Item]) -> usize {
    JOB_HEADER + 2 + ITEM_SPEC * items.len() + data_items_size(items)
}

/// WriteVar: bit items travel with the bit transport size, so only that bit changes.
pub fn write_request(pdu_ref: u16, items: &[(Item, Vec<u8>)]) -> Vec<u8> {
    let mut param = vec![FN_WRITE, items.len() as u8];
    let mut data = Vec::new();
    for (i, (it, bytes)) in items.iter().enumerate() {
        it.spec(&mut param);
        let (ts, bits) = match it.bit {
            Some(_) => (DTS_BIT, 1u16),
            None => (DTS_BYTE, (bytes.len() * 8) as u16),
        };
        data.extend_from_slice(&[0x00, ts]);
        data.extend_from_slice(&bits.to_be_bytes());
        data.extend_from_slice(bytes);
        if bytes.len() % 2 == 1 && i + 1 < items.len() {
            data.push(0x00);
        }
    }
    job(pdu_ref, &param, &data)
}

/// Each written item's outcome.
pub fn parse_write(ack: &Ack<'_>, n: usize) -> Result<Vec<Result<(), ItemError>>, ProtoError> {
    if ack.param.len() < 2 || ack.param[0] != FN_WRITE || ack.param[1] as usize != n {
        return Err(ProtoError::Malformed(
            "not a write reply for these items".into(),
        ));
    }
    if ack.data.len() < n {
        return Err(ProtoError::Malformed("write reply cut short".into()));
    }
    Ok(ack.data[..n]
        .iter()
        .map(|&c| if c == 0xFF { Ok(()) } else { Err(ItemError(c)) })
        .collect())
}

/// The whole packet length from a TPKT header.
pub fn tpkt_len(head: &[u8; 4]) -> Result<usize, ProtoError> {
    if head[0] != 0x03 {
        return Err(ProtoError::Malformed(format!(
            "TPKT version {:#04x} (is this an S7 port?)",
            head[0]
        )));
    }
    let len = u16::from_be_bytes([head[2], head[3]]) as usize;
    if len < 7 {
        return Err(ProtoError::Malformed(format!("TPKT length {len}")));
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_request_bytes() {
        // Rack 0, slot 2 (an S7-300 CPU): remote TSAP 0x0102.
        assert_eq!(remote_tsap(0, 2), 0x0102);
        assert_eq!(remote_tsap(0, 1), 0x0101);
        assert_eq!(remote_tsap(1, 3), 0x0123);
        assert_eq!(
            connect_request(0x0100, 0x0102),
            vec![
                0x03, 0x00, 0x00, 0x16, 0x11, 0xE0, 0x00, 0x00, 0x00, 0x01, 0x00, 0xC0, 0x01, 0x0A,
                0xC1, 0x02, 0x01, 0x00, 0xC2, 0x02, 0x01, 0x02
            ]
        );
        assert!(check_connect_confirm(&[0x03, 0, 0, 0x16, 0x11, 0xD0, 0, 1, 0, 1, 0]).is_ok());
        let e = check_connect_confirm(&[0x03, 0, 0, 0x16, 0x11, 0x80, 0, 1, 0, 1, 0]).unwrap_err();
        assert!(e.to_string().contains("rack/slot"), "{e}");
    }

    #[test]
    fn setup_request_and_reply() {
        assert_eq!(
            setup_request(1, 960),
            vec![
                0x03, 0x00, 0x00, 0x19, 0x02, 0xF0, 0x80, 0x32, 0x01, 0x00, 0x00, 0x00, 0x01, 0x00,
                0x08, 0x00, 0x00, 0xF0, 0x00, 0x00, 0x01, 0x00, 0x01, 0x03, 0xC0
            ]
        );
        let reply = [
            0x03, 0x00, 0x00, 0x1B, 0x02, 0xF0, 0x80, 0x32, 0x03, 0x00, 0x00, 0x00, 0x01, 0x00,
            0x08, 0x00, 0x00, 0x00, 0x00, 0xF0, 0x00, 0x00, 0x01, 0x00, 0x01, 0x00, 0xF0,
        ];
        let ack = parse_ack(&reply, 1).unwrap();
        assert_eq!(setup_pdu(&ack).unwrap(), 240);
        assert_eq!(
            parse_ack(&reply, 2).unwrap_err(),
            ProtoError::WrongReference { want: 2, got: 1 }
        );
    }

    #[test]
    fn read_of_two_items_and_its_reply() {
        let items = [
            Item {
                area: AREA_DB,
                db: 10,
                byte: 4,
                bit: None,
                len: 4,
            },
            Item {
                area: AREA_MERKER,
                db: 0,
                byte: 2,
                bit: Some(3),
                len: 1,
            },
        ];
        let req = read_request(7, &items);
        assert_eq!(req.len(), ISO_HEADER + read_request_size(2));
        assert_eq!(
            &req[ISO_HEADER..],
            &[
                0x32, 0x01, 0x00, 0x00, 0x00, 0x07, 0x00, 0x1A, 0x00, 0x00, // header
                0x04, 0x02, // read, 2 items
                0x12, 0x0A, 0x10, 0x02, 0x00, 0x04, 0x00, 0x0A, 0x84, 0x00, 0x00,
                0x20, // DB10.DBD4
                0x12, 0x0A, 0x10, 0x01, 0x00, 0x01, 0x00, 0x00, 0x83, 0x00, 0x00,
                0x13, // M2.3
            ][..]
        );
        // Reply: 4 bytes (length in bits), then 1 bit; the odd item is last, so no fill.
        let mut reply = vec![0x03, 0x00, 0x00, 0x00, 0x02, 0xF0, 0x80];
        reply.extend_from_slice(&[0x32, 0x03, 0, 0, 0x00, 0x07, 0x00, 0x02, 0x00, 0x0D, 0, 0]);
        reply.extend_from_slice(&[0x04, 0x02]);
        reply.extend_from_slice(&[0xFF, 0x04, 0x00, 0x20, 0x41, 0x20, 0x00, 0x00]);
        reply.extend_from_slice(&[0xFF, 0x03, 0x00, 0x01, 0x01]);
        let len = reply.len() as u16;
        reply[2..4].copy_from_slice(&len.to_be_bytes());
        assert_eq!(read_reply_size(&items), reply.len() - ISO_HEADER);
        let ack = parse_ack(&reply, 7).unwrap();
        let got = parse_read(&ack, &items).unwrap();
        assert_eq!(got, vec![Ok(vec![0x41, 0x20, 0, 0]), Ok(vec![0x01])]);
    }

    #[test]
    fn odd_items_are_padded_and_item_errors_kept() {
        let items = [
            Item {
                area: AREA_DB,
                db: 1,
                byte: 0,
                bit: None,
                len: 1,
            },
            Item {
                area: AREA_DB,
                db: 99,
                byte: 0,
                bit: None,
                len: 2,
            },
            Item {
                area: AREA_DB,
                db: 1,
                byte: 2,
                bit: None,
                len: 2,
            },
        ];
        let mut reply = vec![0x03, 0x00, 0x00, 0x00, 0x02, 0xF0, 0x80];
        let data = [
            0xFF, 0x04, 0x00, 0x08, 0xAB, 0x00, // 1 byte + fill
            0x0A, 0x00, 0x00, 0x00, // no such DB
            0xFF, 0x04, 0x00, 0x10, 0x12, 0x34,
        ];
        reply.extend_from_slice(&[0x32, 0x03, 0, 0, 0, 9, 0, 2]);
        reply.extend_from_slice(&(data.len() as u16).to_be_bytes());
        reply.extend_from_slice(&[0, 0, 0x04, 0x03]);
        reply.extend_from_slice(&data);
        let len = reply.len() as u16;
        reply[2..4].copy_from_slice(&len.to_be_bytes());
        let got = parse_read(&parse_ack(&reply, 9).unwrap(), &items).unwrap();
        assert_eq!(got[0], Ok(vec![0xAB]));
        let e = got[1].as_ref().unwrap_err();
        assert!(
            e.to_string().contains("does not exist") && e.is_config(),
            "{e}"
        );
        assert_eq!(got[2], Ok(vec![0x12, 0x34]));
    }

    #[test]
    fn writes_of_bytes_and_of_a_single_bit() {
        let items = vec![
            (
                Item {
                    area: AREA_DB,
                    db: 10,
                    byte: 2,
                    bit: Some(3),
                    len: 1,
                },
                vec![0x01],
            ),
            (
                Item {
                    area: AREA_DB,
                    db: 10,
                    byte: 4,
                    bit: None,
                    len: 2,
                },
                vec![0x00, 0x2A],
            ),
        ];
        let req = write_request(3, &items);
        let s7 = &req[ISO_HEADER..];
        assert_eq!(u16::from_be_bytes([s7[6], s7[7]]), 2 + 24, "param length");
        assert_eq!(
            &s7[12..24],
            &[0x12, 0x0A, 0x10, 0x01, 0x00, 0x01, 0x00, 0x0A, 0x84, 0x00, 0x00, 0x13],
            "bit item: transport size BIT, address byte*8+bit"
        );
        assert_eq!(
            &s7[JOB_HEADER + 26..],
            &[
                0x00, 0x03, 0x00, 0x01, 0x01, 0x00, // the bit (length in bits) + fill
                0x00, 0x04, 0x00, 0x10, 0x00, 0x2A, // two bytes (length in bits)
            ]
        );
        assert_eq!(
            req.len(),
            ISO_HEADER + write_request_size(&items.iter().map(|i| i.0).collect::<Vec<_>>())
        );
        let mut reply = vec![0x03, 0x00, 0x00, 0x00, 0x02, 0xF0, 0x80];
        reply.extend_from_slice(&[
            0x32, 0x03, 0, 0, 0, 3, 0, 2, 0, 2, 0, 0, 0x05, 0x02, 0xFF, 0x05,
        ]);
        let len = reply.len() as u16;
        reply[2..4].copy_from_slice(&len.to_be_bytes());
        let got = parse_write(&parse_ack(&reply, 3).unwrap(), 2).unwrap();
        assert_eq!(got[0], Ok(()));
        assert!(got[1]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("out of range"));
    }

    #[test]
    fn refusals_and_garbage_are_errors_not_panics() {
        let mut reply = vec![0x03, 0x00, 0x00, 0x13, 0x02, 0xF0, 0x80];
        reply.extend_from_slice(&[0x32, 0x03, 0, 0, 0, 1, 0, 0, 0, 0, 0xD6, 0x02]);
        let e = parse_ack(&reply, 1).unwrap_err();
        assert!(e.to_string().contains("PUT/GET"), "{e}");
        for n in 0..reply.len() {
            let _ = parse_ack(&reply[..n], 1);
        }
        assert!(tpkt_len(&[0x16, 0x03, 0x01, 0x00]).is_err());
        assert_eq!(tpkt_len(&[0x03, 0x00, 0x00, 0x16]).unwrap(), 22);
    }

    proptest::proptest! {
        #[test]
        fn any_reply_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..120)) {
            let items = [Item { area: AREA_DB, db: 1, byte: 0, bit: None, len: 4 }];
            if let Ok(ack) = parse_ack(&bytes, u16::from_be_bytes([bytes.get(11).copied().unwrap_or(0), bytes.get(12).copied().unwrap_or(0)])) {
                let _ = parse_read(&ack, &items);
                let _ = parse_write(&ack, 1);
                let _ = setup_pdu(&ack);
            }
        }
    }
}
