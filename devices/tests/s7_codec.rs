//! The S7comm codec against an independent S7 server (python-snap7's): connection setup with
//! PDU negotiation, a multi-item ReadVar of every data type, WriteVar of bytes and of a single
//! bit (bit transport size), and item errors for a missing data block.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use nexus_common::testing::{self, free_port};
use nexus_devices::s7::proto::{self, Item, AREA_DB, AREA_INPUT, AREA_MERKER};

struct Conn {
    s: TcpStream,
    pdu_ref: u16,
}

impl Conn {
    fn open(port: u16) -> (Conn, u16) {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&proto::connect_request(0x0100, proto::remote_tsap(0, 1)))
            .unwrap();
        let cc = read_packet(&mut s);
        proto::check_connect_confirm(&cc).unwrap();
        let mut c = Conn { s, pdu_ref: 0 };
        let reply = c.call(|r| proto::setup_request(r, 960));
        let pdu = proto::setup_pdu(&proto::parse_ack(&reply, c.pdu_ref).unwrap()).unwrap();
        (c, pdu)
    }

    fn call(&mut self, req: impl FnOnce(u16) -> Vec<u8>) -> Vec<u8> {
        self.pdu_ref = self.pdu_ref.wrapping_add(1);
        self.s.write_all(&req(self.pdu_ref)).unwrap();
        read_packet(&mut self.s)
    }

    fn read(&mut self, items: &[Item]) -> Vec<Result<Vec<u8>, proto::ItemError>> {
        let reply = self.call(|r| proto::read_request(r, items));
        proto::parse_read(&proto::parse_ack(&reply, self.pdu_ref).unwrap(), items).unwrap()
    }

    fn write(&mut self, items: &[(Item, Vec<u8>)]) -> Vec<Result<(), proto::ItemError>> {
        let reply = self.call(|r| proto::write_request(r, items));
        proto::parse_write(
            &proto::parse_ack(&reply, self.pdu_ref).unwrap(),
            items.len(),
        )
        .unwrap()
    }
}

fn read_packet(s: &mut TcpStream) -> Vec<u8> {
    let mut head = [0u8; 4];
    s.read_exact(&mut head).unwrap();
    let len = proto::tpkt_len(&head).unwrap();
    let mut p = head.to_vec();
    p.resize(len, 0);
    s.read_exact(&mut p[4..]).unwrap();
    p
}

fn db(n: u16, byte: u32, len: u16) -> Item {
    Item {
        area: AREA_DB,
        db: n,
        byte,
        bit: None,
        len,
    }
}

#[test]
fn the_codec_talks_to_python_snap7() {
    let port = free_port();
    let _peer = testing::PythonPeer::start("snap7_server.py", "snap7", &[port.to_string()], port);
    let (mut c, pdu) = Conn::open(port);
    assert!((240..=960).contains(&pdu), "negotiated PDU {pdu}");

    // Every type in one request.
    let items = [
        db(1, 0, 4),   // real
        db(1, 4, 2),   // int
        db(1, 6, 4),   // dint
        db(1, 10, 2),  // word
        db(1, 12, 4),  // dword
        db(1, 16, 1),  // byte (odd: padded in the reply)
        db(1, 17, 1),  // the byte holding bool DB1.DBX17.3
        db(1, 18, 8),  // lreal
        db(1, 26, 12), // string[10]
        Item {
            area: AREA_MERKER,
            ..db(0, 2, 2)
        }, // MW2
        Item {
            area: AREA_INPUT,
            ..db(0, 0, 1)
        }, // IB0, holding I0.1
    ];
    assert!(proto::read_reply_size(&items) <= pdu as usize);
    let got: Vec<Vec<u8>> = c.read(&items).into_iter().map(Result::unwrap).collect();
    assert_eq!(f32::from_be_bytes(got[0][..].try_into().unwrap()), 12.5);
    assert_eq!(i16::from_be_bytes(got[1][..].try_into().unwrap()), -2);
    assert_eq!(i32::from_be_bytes(got[2][..].try_into().unwrap()), -123_456);
    assert_eq!(u16::from_be_bytes(got[3][..].try_into().unwrap()), 65534);
    assert_eq!(u32::from_be_bytes(got[4][..].try_into().unwrap()), 65538);
    assert_eq!(got[5], vec![200]);
    assert_ne!(got[6][0] & 0b1000, 0, "DB1.DBX17.3");
    assert_eq!(f64::from_be_bytes(got[7][..].try_into().unwrap()), 100.25);
    assert_eq!((got[8][0], got[8][1]), (10, 6));
    assert_eq!(&got[8][2..8], b"PACK-1");
    assert_eq!(i16::from_be_bytes(got[9][..].try_into().unwrap()), 300);
    assert_ne!(got[10][0] & 0b10, 0, "I0.1");

    // Writes: two bytes, and bit 5 of DB10.DBB3 with the bit transport size.
    let bit = Item {
        bit: Some(5),
        len: 1,
        ..db(10, 3, 1)
    };
    // One item per request: Nexus writes one tag at a time (and this server answers only
    // the first item of a multi-item write).
    assert_eq!(c.write(&[(db(10, 0, 2), vec![0x12, 0x34])]), vec![Ok(())]);
    assert_eq!(c.write(&[(bit, vec![1])]), vec![Ok(())]);
    let back = c.read(&[db(10, 0, 4)]);
    assert_eq!(back[0].as_ref().unwrap()[..2], [0x12, 0x34]);
    // python-snap7 stores a written bit's value into the whole byte
    // (docs/adr/0006-own-s7comm-client.md), so this checks that the bit write reached DB10.DBB3; the BIT transport size and the bit address
    // of the request are checked byte by byte in proto.rs.
    assert_ne!(
        back[0].as_ref().unwrap()[3],
        0,
        "bit write reached DB10.DBB3"
    );

    // A data block that does not exist is an item error, not a broken session.
    let r = c.read(&[db(99, 0, 2), db(1, 16, 1)]);
    assert!(r[0].is_err(), "{r:?}");
    assert_eq!(r[1], Ok(vec![200]));
}
