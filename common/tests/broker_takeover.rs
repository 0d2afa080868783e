//! Session takeover on the embedded broker: a client that disconnects and reconnects at once
//! with the same client id is always accepted (MQTT-3.1.4-3), over MQTT 3.1.1 and 5, and a
//! persistent session's queued messages all reach it across quick reconnects; an MQTT 5 client
//! without a client id is assigned one.
//!
//! The clients here write MQTT packets by hand on a TCP socket, so nothing between the test and
//! the broker retries, waits or hides a refused CONNACK.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use nexus_common::testing::{self, SERVICE_USER};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const V311: u8 = 4;
const V5: u8 = 5;

fn varint(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

fn string(s: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn packet(first: u8, body: Vec<u8>) -> Vec<u8> {
    let mut p = vec![first];
    varint(body.len(), &mut p);
    p.extend(body);
    p
}

/// CONNECT as the service user; `persistent`: clean session 0 (3.1.1), or clean start 0 with a
/// session expiry of 300 s (5).
fn connect(version: u8, client_id: &str, persistent: bool) -> Vec<u8> {
    let mut b = Vec::new();
    string("MQTT", &mut b);
    b.push(version);
    b.push(0x80 | 0x40 | if persistent { 0 } else { 0x02 });
    b.extend_from_slice(&30u16.to_be_bytes());
    if version == V5 {
        if persistent {
            b.extend_from_slice(&[5, 0x11, 0, 0, 1, 0x2c]);
        } else {
            b.push(0);
        }
    }
    string(client_id, &mut b);
    string(SERVICE_USER.0, &mut b);
    string(SERVICE_USER.1, &mut b);
    packet(0x10, b)
}

fn disconnect(version: u8) -> Vec<u8> {
    if version == V5 {
        vec![0xE0, 0x02, 0x00, 0x00]
    } else {
        vec![0xE0, 0x00]
    }
}

fn subscribe(version: u8, filter: &str) -> Vec<u8> {
    let mut b = 1u16.to_be_bytes().to_vec();
    if version == V5 {
        b.push(0);
    }
    string(filter, &mut b);
    b.push(1);
    packet(0x82, b)
}

fn publish(version: u8, topic: &str, id: u16, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    string(topic, &mut b);
    b.extend_from_slice(&id.to_be_bytes());
    if version == V5 {
        b.push(0);
    }
    b.extend_from_slice(payload);
    packet(0x32, b)
}

fn puback(id: u16) -> Vec<u8> {
    let mut p = vec![0x40, 0x02];
    p.extend_from_slice(&id.to_be_bytes());
    p
}

/// One packet: its first byte and body.
async fn read_packet(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let first = s.read_u8().await?;
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let b = s.read_u8().await?;
        len |= ((b & 0x7f) as usize) << shift;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    let mut body = vec![0; len];
    s.read_exact(&mut body).await?;
    Ok((first, body))
}

/// Connect; the CONNACK's session-present flag and return / reason code.
async fn open(port: u16, version: u8, id: &str, persistent: bool) -> (TcpStream, bool, u8) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(&connect(version, id, persistent))
        .await
        .unwrap();
    let (first, body) = tokio::time::timeout(Duration::from_secs(10), read_packet(&mut s))
        .await
        .expect("a CONNACK within 10 s")
        .unwrap();
    assert_eq!(first, 0x20, "CONNACK expected, got {first:#x}");
    (s, body[0] & 1 == 1, body[1])
}

/// Publish `payload` at QoS 1 from a connection of its own and wait for the PUBACK.
async fn publish_acked(port: u16, version: u8, topic: &str, payload: &[u8]) {
    let (mut s, _, code) = open(port, version, &testing::unique("pub"), false).await;
    assert_eq!(code, 0);
    s.write_all(&publish(version, topic, 1, payload))
        .await
        .unwrap();
    let (first, _) = read_packet(&mut s).await.unwrap();
    assert_eq!(first & 0xF0, 0x40, "PUBACK expected");
    s.write_all(&disconnect(version)).await.unwrap();
}

async fn storm(version: u8) {
    let broker = testing::service_broker();
    let port = broker.ports.tcp().port();
    let id = testing::unique("storm");
    let mut refused = Vec::new();
    for i in 0..1000 {
        let (mut s, _, code) = open(port, version, &id, false).await;
        if code != 0 {
            refused.push((i, code));
        }
        // DISCONNECT, close, and connect again at once: the old session may still be tearing
        // itself down when the new CONNECT arrives.
        let _ = s.write_all(&disconnect(version)).await;
        drop(s);
    }
    assert!(
        refused.is_empty(),
        "MQTT {version}: {} of 1000 reconnects refused (cycle, code): {refused:?}",
        refused.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_quick_reconnects_over_mqtt_3_1_1_are_all_accepted() {
    storm(V311).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_quick_reconnects_over_mqtt_5_are_all_accepted() {
    storm(V5).await;
}

/// A persistent subscriber leaves and comes back 100 times; while it is away 5 messages are
/// published (each acknowledged by the broker). Every message reaches it, in the order it was
/// published, each reconnect finds its session, and no reconnect is refused.
async fn persistent_queue(version: u8) {
    let broker = testing::service_broker();
    let port = broker.ports.tcp().port();
    let id = testing::unique("keep");
    let topic = format!("takeover/{id}");
    let (mut s, _, code) = open(port, version, &id, true).await;
    assert_eq!(code, 0);
    s.write_all(&subscribe(version, &topic)).await.unwrap();
    let (first, _) = read_packet(&mut s).await.unwrap();
    assert_eq!(first, 0x90, "SUBACK expected");
    s.write_all(&disconnect(version)).await.unwrap();
    drop(s);

    let (mut sent, mut got) = (BTreeSet::new(), BTreeSet::new());
    // Each message as it first arrived: MQTT keeps the order of one publisher's messages, and
    // a session sends what was in flight again in the order it was first sent.
    let mut order = Vec::new();
    let mut n = 0u32;
    for round in 0..100 {
        for _ in 0..5 {
            publish_acked(port, version, &topic, &n.to_be_bytes()).await;
            sent.insert(n);
            n += 1;
        }
        let (mut s, present, code) = open(port, version, &id, true).await;
        assert_eq!(code, 0, "MQTT {version}: round {round} refused");
        assert!(present, "MQTT {version}: round {round} lost the session");
        // Take what arrives until this round's messages are in, acknowledging each.
        while !sent.is_subset(&got) {
            let (first, body) = tokio::time::timeout(Duration::from_secs(10), read_packet(&mut s))
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "MQTT {version}: round {round}: missing {:?}",
                        sent.difference(&got).collect::<Vec<_>>()
                    )
                })
                .unwrap();
            if first & 0xF0 != 0x30 {
                continue;
            }
            let tlen = u16::from_be_bytes([body[0], body[1]]) as usize;
            let mut at = 2 + tlen;
            let pid = u16::from_be_bytes([body[at], body[at + 1]]);
            at += 2;
            if version == V5 {
                at += 1 + body[at] as usize;
            }
            let v = u32::from_be_bytes(body[at..at + 4].try_into().unwrap());
            if got.insert(v) {
                order.push(v);
            }
            s.write_all(&puback(pid)).await.unwrap();
        }
        s.write_all(&disconnect(version)).await.unwrap();
        drop(s);
    }
    assert_eq!(got, sent, "MQTT {version}: every queued message delivered");
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "MQTT {version}: delivered out of order: {order:?}"
    );
    assert_eq!(got.len(), 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_keeps_its_queue_across_quick_reconnects_over_mqtt_3_1_1() {
    persistent_queue(V311).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_keeps_its_queue_across_quick_reconnects_over_mqtt_5() {
    persistent_queue(V5).await;
}

/// MQTT 5: a client that connects with an empty client id and a clean start is given one in
/// the CONNACK (Assigned Client Identifier, 3.2.2.3.7), a different one each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_5_client_without_a_client_id_is_assigned_one() {
    let broker = testing::service_broker();
    let port = broker.ports.tcp().port();
    let mut assigned = BTreeSet::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(&connect(V5, "", false)).await.unwrap();
        let (first, body) = read_packet(&mut s).await.unwrap();
        assert_eq!((first, body[1]), (0x20, 0), "accepted");
        // Properties: a length (one byte here), then (id, value) pairs; 0x12 is a string.
        let (len, mut at) = (body[2] as usize, 3);
        let end = at + len;
        let mut id = None;
        while at < end {
            let prop = body[at];
            at += 1;
            match prop {
                0x12 => {
                    let n = u16::from_be_bytes([body[at], body[at + 1]]) as usize;
                    id = Some(String::from_utf8(body[at + 2..at + 2 + n].to_vec()).unwrap());
                    at += 2 + n;
                }
                // Other properties a CONNACK of this broker carries: one-byte and two-byte
                // values, four-byte values.
                0x24 | 0x25 | 0x28 | 0x29 | 0x2A => at += 1,
                0x21 | 0x22 | 0x13 => at += 2,
                0x11 | 0x27 => at += 4,
                other => panic!("CONNACK property {other:#x} not expected here: {body:?}"),
            }
        }
        let id = id.expect("an Assigned Client Identifier in the CONNACK");
        assert!(!id.is_empty());
        assigned.insert(id);
        s.write_all(&disconnect(V5)).await.unwrap();
    }
    assert_eq!(assigned.len(), 2, "each client its own id: {assigned:?}");
}
