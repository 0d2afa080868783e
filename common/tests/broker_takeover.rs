//! Session takeover on the embedded broker: a client that disconnects and reconnects at once
//! with the same client id is always accepted (MQTT-3.1.4-3), over MQTT 3.1.1 and 5, and a
//! persistent session's queued messages all reach it across quick reconnects; an MQTT 5 client
//! without a client id is assigned one. MQTT 5 protocol errors (a bad Topic Alias, more
//! unacknowledged publishes than the Receive Maximum) and a takeover are answered with a
//! DISCONNECT that carries the reason code before the connection closes.
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
        let id = connack_props(&body)
            .assigned_id
            .expect("an Assigned Client Identifier in the CONNACK");
        assert!(!id.is_empty());
        assigned.insert(id);
        s.write_all(&disconnect(V5)).await.unwrap();
    }
    assert_eq!(assigned.len(), 2, "each client its own id: {assigned:?}");
}

/// What a CONNACK's properties say (MQTT 5, 3.2.2.3).
#[derive(Default)]
struct ConnackProps {
    assigned_id: Option<String>,
    /// Receive Maximum (0x21); absent means 65,535.
    receive_max: Option<u16>,
    /// Topic Alias Maximum (0x22); absent means 0.
    topic_alias_max: Option<u16>,
}

/// The properties of a CONNACK body (flags, reason code, property length, properties).
fn connack_props(body: &[u8]) -> ConnackProps {
    let mut props = ConnackProps::default();
    let (mut len, mut shift, mut at) = (0usize, 0, 2);
    loop {
        let b = body[at];
        at += 1;
        len |= ((b & 0x7f) as usize) << shift;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    let end = at + len;
    let u16_at = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    while at < end {
        let prop = body[at];
        at += 1;
        match prop {
            0x12 | 0x1A | 0x1C | 0x1F | 0x15 => {
                let n = usize::from(u16_at(at));
                let text = String::from_utf8(body[at + 2..at + 2 + n].to_vec()).unwrap();
                if prop == 0x12 {
                    props.assigned_id = Some(text);
                }
                at += 2 + n;
            }
            0x21 => {
                props.receive_max = Some(u16_at(at));
                at += 2;
            }
            0x22 => {
                props.topic_alias_max = Some(u16_at(at));
                at += 2;
            }
            0x24 | 0x25 | 0x28 | 0x29 | 0x2A => at += 1,
            0x13 => at += 2,
            0x11 | 0x27 => at += 4,
            other => panic!("CONNACK property {other:#x} not expected here: {body:?}"),
        }
    }
    props
}

/// A QoS `qos` PUBLISH over MQTT 5 whose only property is the Topic Alias `alias`.
fn publish_with_alias(topic: &str, alias: u16, qos: u8, id: u16) -> Vec<u8> {
    let mut b = Vec::new();
    string(topic, &mut b);
    if qos > 0 {
        b.extend_from_slice(&id.to_be_bytes());
    }
    b.extend_from_slice(&[3, 0x23]);
    b.extend_from_slice(&alias.to_be_bytes());
    b.extend_from_slice(b"1");
    packet(0x30 | (qos << 1), b)
}

/// Read until the server's DISCONNECT; its reason code and reason string. Fails if the
/// connection closes without one, or if no DISCONNECT comes within 10 s.
async fn disconnect_reason(s: &mut TcpStream) -> (u8, String) {
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), read_packet(s))
            .await
            .expect("a DISCONNECT within 10 s");
        let (first, body) = next.expect("a DISCONNECT before the connection closed");
        if first != 0xE0 {
            continue;
        }
        let code = body.first().copied().unwrap_or(0);
        let text = String::from_utf8_lossy(&body).into_owned();
        // And then the connection closes.
        let after = tokio::time::timeout(Duration::from_secs(10), read_packet(s)).await;
        assert!(
            matches!(after, Ok(Err(_))),
            "the connection closes after the DISCONNECT: {after:?}"
        );
        return (code, text);
    }
}

async fn open_v5(port: u16) -> (TcpStream, ConnackProps) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(&connect(V5, &testing::unique("proto"), false))
        .await
        .unwrap();
    let (first, body) = read_packet(&mut s).await.unwrap();
    assert_eq!((first, body[1]), (0x20, 0), "accepted");
    (s, connack_props(&body))
}

/// MQTT-3.3.2-8: a Topic Alias of 0 is a protocol error; the broker answers DISCONNECT 0x94
/// (Topic Alias invalid) and closes the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_5_topic_alias_of_0_is_answered_with_disconnect_topic_alias_invalid() {
    let broker = testing::service_broker();
    let (mut s, _) = open_v5(broker.ports.tcp().port()).await;
    s.write_all(&publish_with_alias("nexus/t/alias", 0, 1, 1))
        .await
        .unwrap();
    let (code, text) = disconnect_reason(&mut s).await;
    assert_eq!(code, 0x94, "Topic Alias invalid: {text}");
}

/// MQTT-3.3.2-10: an alias above the Topic Alias Maximum of the CONNACK is "Topic Alias
/// invalid"; an alias that was never set, sent with an empty topic, is a protocol error (0x82).
/// Aliases within the maximum work: set once with a topic, then used alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_5_topic_aliases_beyond_the_maximum_or_never_set_end_the_connection_with_the_reason() {
    let broker = testing::service_broker();
    let port = broker.ports.tcp().port();
    let (mut s, props) = open_v5(port).await;
    let max = props.topic_alias_max.unwrap_or(0);
    s.write_all(&publish_with_alias("nexus/t/alias", max + 1, 1, 1))
        .await
        .unwrap();
    let (code, text) = disconnect_reason(&mut s).await;
    assert_eq!(code, 0x94, "alias {} above maximum {max}: {text}", max + 1);

    if max > 0 {
        // Within the maximum: set, then use alone; each publish is acknowledged.
        let (mut s, _) = open_v5(port).await;
        s.write_all(&publish_with_alias("nexus/t/alias", max, 1, 1))
            .await
            .unwrap();
        s.write_all(&publish_with_alias("", max, 1, 2))
            .await
            .unwrap();
        for id in [1u16, 2] {
            let (first, body) = read_packet(&mut s).await.unwrap();
            assert_eq!(first, 0x40, "PUBACK for {id}");
            assert_eq!(u16::from_be_bytes([body[0], body[1]]), id);
            assert!(body.len() < 3 || body[2] < 0x80, "success: {body:?}");
        }
        // An alias this connection never set.
        let unset = if max > 1 { max - 1 } else { max };
        let (mut s, _) = open_v5(port).await;
        s.write_all(&publish_with_alias("", unset, 1, 1))
            .await
            .unwrap();
        let (code, text) = disconnect_reason(&mut s).await;
        assert_eq!(code, 0x82, "protocol error: {text}");
    }
}

/// MQTT-3.3.4-9: a client that has more QoS 2 publishes unacknowledged (PUBREC sent, PUBREL
/// not yet) than the broker's Receive Maximum gets DISCONNECT 0x93 (Receive Maximum exceeded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exceeding_the_receive_maximum_is_answered_with_disconnect_receive_maximum_exceeded() {
    let broker = testing::service_broker();
    let (mut s, props) = open_v5(broker.ports.tcp().port()).await;
    let max = props.receive_max.unwrap_or(u16::MAX);
    assert!(max < 1000, "a Receive Maximum this test can exceed: {max}");
    for id in 1..=max {
        let mut b = Vec::new();
        string("nexus/t/recvmax", &mut b);
        b.extend_from_slice(&id.to_be_bytes());
        b.push(0);
        b.extend_from_slice(b"1");
        s.write_all(&packet(0x34, b)).await.unwrap();
        let (first, _) = read_packet(&mut s).await.unwrap();
        assert_eq!(first, 0x50, "PUBREC for {id} of {max}");
    }
    let mut b = Vec::new();
    string("nexus/t/recvmax", &mut b);
    b.extend_from_slice(&(max + 1).to_be_bytes());
    b.push(0);
    b.extend_from_slice(b"1");
    s.write_all(&packet(0x34, b)).await.unwrap();
    let (code, text) = disconnect_reason(&mut s).await;
    assert_eq!(code, 0x93, "Receive Maximum exceeded: {text}");
}

/// MQTT-3.1.4-3 with MQTT 5: the connection whose client id a new connection takes gets
/// DISCONNECT 0x8E (Session taken over) before it is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_5_connection_taken_over_is_told_so() {
    let broker = testing::service_broker();
    let port = broker.ports.tcp().port();
    let id = testing::unique("taken");
    let (mut old, _, code) = open(port, V5, &id, false).await;
    assert_eq!(code, 0);
    let (_new, _, code) = open(port, V5, &id, false).await;
    assert_eq!(code, 0, "the new connection is accepted");
    let (code, text) = disconnect_reason(&mut old).await;
    assert_eq!(code, 0x8E, "Session taken over: {text}");
}
