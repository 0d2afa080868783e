//! The harness's real parts: the embedded broker (contract probes with our client and with
//! Mosquitto's command-line clients), Mosquitto as an external broker, and PostgreSQL.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::process::Command;
use std::time::Duration;

use nexus_common::config::{BrokerConfig, MqttConfig, MqttVersion, Secret};
use nexus_common::mqtt::{self, ClientSettings, Message, MqttHandle, QoS};
use nexus_common::testing::{self, Mosquitto, PgServer};
use tokio::sync::mpsc::Receiver;
use tokio_util::sync::CancellationToken;

fn cfg(port: u16, user: Option<&str>, version: MqttVersion) -> MqttConfig {
    let mut c = testing::mqtt_config(port);
    c.version = version;
    c.persistent_session = false;
    if let Some(u) = user {
        c.username = Some(u.into());
        c.password = Some(Secret::new(format!("{u}-pw")));
    }
    c
}

async fn client(
    c: &MqttConfig,
    subs: &[&str],
    token: &CancellationToken,
) -> (MqttHandle, Receiver<Message>) {
    let mut s = ClientSettings::new(testing::unique("client"));
    s.subscriptions = subs
        .iter()
        .map(|f| (f.to_string(), QoS::AtLeastOnce))
        .collect();
    s.incoming_capacity = 10_000;
    let (h, rx) = mqtt::connect(c, s, None, token.clone()).unwrap();
    h.wait_connected(Duration::from_secs(10)).await.unwrap();
    // Let the SUBSCRIBE reach the broker before anyone publishes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    (h, rx)
}

/// Messages received until `quiet` passes without one.
async fn drain(rx: &mut Receiver<Message>, quiet: Duration) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(quiet, rx.recv()).await {
        out.push((
            m.topic().unwrap_or("").to_owned(),
            String::from_utf8_lossy(m.payload()).into_owned(),
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_keeps_the_contract() {
    let broker = testing::service_broker();
    let port = broker.ports.tcp().port();
    let token = CancellationToken::new();
    for version in [MqttVersion::V311, MqttVersion::V5] {
        let root = testing::unique("acme");
        let (svc, _) = client(&cfg(port, Some("svc"), version), &[], &token).await;
        let (_w, mut uns) = client(&cfg(port, None, version), &["#"], &token).await;
        let (_s, mut sys) = client(&cfg(port, Some("svc"), version), &["$nexus/#"], &token).await;

        svc.publish(
            &format!("{root}/line/dev/tag"),
            "1",
            QoS::AtLeastOnce,
            false,
        )
        .await
        .unwrap();
        svc.publish("$nexus/status/device/plc-1", "{}", QoS::AtLeastOnce, false)
            .await
            .unwrap();
        let got_uns = drain(&mut uns, Duration::from_millis(500)).await;
        let got_sys = drain(&mut sys, Duration::from_millis(300)).await;
        assert!(
            got_uns
                .iter()
                .any(|(t, _)| t == &format!("{root}/line/dev/tag")),
            "{version:?}: {got_uns:?}"
        );
        assert!(
            got_uns.iter().all(|(t, _)| !t.starts_with('$')),
            "# must not match $ topics: {got_uns:?}"
        );
        assert!(
            got_sys
                .iter()
                .any(|(t, _)| t == "$nexus/status/device/plc-1"),
            "{version:?}: {got_sys:?}"
        );

        // Commands: a viewer is refused, an operator gets through.
        let (viewer, _) = client(&cfg(port, Some("view"), version), &[], &token).await;
        let (operator, _) = client(&cfg(port, Some("op"), version), &[], &token).await;
        viewer
            .publish(
                "$nexus/cmd/plc-1/write",
                "{\"from\":\"viewer\"}",
                QoS::AtLeastOnce,
                false,
            )
            .await
            .unwrap();
        operator
            .publish(
                "$nexus/cmd/plc-1/write",
                "{\"from\":\"operator\"}",
                QoS::AtLeastOnce,
                false,
            )
            .await
            .unwrap();
        let cmds: Vec<_> = drain(&mut sys, Duration::from_millis(500))
            .await
            .into_iter()
            .filter(|(t, _)| t.starts_with("$nexus/cmd"))
            .collect();
        assert_eq!(
            cmds,
            vec![(
                "$nexus/cmd/plc-1/write".to_owned(),
                "{\"from\":\"operator\"}".to_owned()
            )],
            "{version:?}"
        );

        // Retained: set, seen by a new subscriber, cleared.
        let rt = format!("{root}/retained");
        svc.publish(&rt, "42", QoS::AtLeastOnce, true)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (_n, mut late) = client(&cfg(port, None, version), &[&rt], &token).await;
        assert_eq!(
            drain(&mut late, Duration::from_millis(300)).await,
            vec![(rt.clone(), "42".to_owned())]
        );
        svc.publish(&rt, Vec::<u8>::new(), QoS::AtLeastOnce, true)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (_n2, mut later) = client(&cfg(port, None, version), &[&rt], &token).await;
        assert!(drain(&mut later, Duration::from_millis(300))
            .await
            .is_empty());
    }
    token.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_qos1_in_order_and_shared_groups() {
    let broker = testing::start_embedded_broker(BrokerConfig::default());
    let port = broker.ports.tcp().port();
    let token = CancellationToken::new();
    let (publisher, _) = client(&cfg(port, Some("pub"), MqttVersion::V311), &[], &token).await;
    let (_a, mut all) = client(&cfg(port, None, MqttVersion::V311), &["load/#"], &token).await;
    let (_g1, mut g1) = client(
        &cfg(port, None, MqttVersion::V311),
        &["$share/g/load/#"],
        &token,
    )
    .await;
    let (_g2, mut g2) = client(
        &cfg(port, None, MqttVersion::V5),
        &["$share/g/load/#"],
        &token,
    )
    .await;
    let n = 3000;
    for i in 0..n {
        publisher
            .publish(
                &format!("load/{}", i % 7),
                i.to_string(),
                QoS::AtLeastOnce,
                false,
            )
            .await
            .unwrap();
    }
    let got = drain(&mut all, Duration::from_secs(2)).await;
    let seq: Vec<usize> = got.iter().map(|(_, p)| p.parse().unwrap()).collect();
    assert!(
        seq.iter().copied().eq(0..n),
        "every QoS 1 message once, in order: got {} messages, the first {:?}",
        seq.len(),
        &seq[..seq.len().min(10)]
    );
    let a = drain(&mut g1, Duration::from_millis(500)).await.len();
    let b = drain(&mut g2, Duration::from_millis(500)).await.len();
    assert_eq!(a + b, n, "a shared group gets each message once");
    assert!(a > 0 && b > 0, "both members get a share: {a} / {b}");
    token.cancel();
}

fn mosquitto_clients() -> bool {
    Command::new("mosquitto_pub").arg("--help").output().is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clients_talk_to_the_embedded_broker() {
    assert!(
        mosquitto_clients(),
        "mosquitto-clients must be installed (scripts/test.sh installs them)"
    );
    let broker = testing::service_broker();
    let port = broker.ports.tcp().port().to_string();
    for version in ["mqttv311", "mqttv5"] {
        // A bad password gets a CONNACK refusal, not a dropped socket.
        let out = Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-V",
                version,
                "-u",
                "op",
                "-P",
                "wrong",
                "-t",
                "x",
                "-m",
                "1",
            ])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(
            err.contains("bad user name or password") || err.contains("bad username or password"),
            "{version}: {err}"
        );

        // mosquitto_sub receives what mosquitto_pub sends through the embedded broker.
        let topic = testing::unique("real/clients");
        let sub = Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-V",
                version,
                "-t",
                &topic,
                "-C",
                "1",
                "-W",
                "10",
                "-q",
                "1",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let status = Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-V",
                version,
                "-u",
                "pub",
                "-P",
                "pub-pw",
                "-t",
                &topic,
                "-m",
                "hello",
                "-q",
                "1",
            ])
            .status()
            .unwrap();
        assert!(status.success());
        let out = sub.wait_with_output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "hello",
            "{version}"
        );

        // A viewer's command publish is refused (MQTT 5: PUBACK 135, which mosquitto_pub reports).
        if version == "mqttv5" {
            let out = Command::new("mosquitto_pub")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-V",
                    version,
                    "-u",
                    "view",
                    "-P",
                    "view-pw",
                    "-t",
                    "$nexus/cmd/p/write",
                    "-m",
                    "{}",
                    "-q",
                    "1",
                ])
                .output()
                .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
            .to_lowercase();
            assert!(
                !out.status.success() || text.contains("not authorized"),
                "viewer command: {text}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_as_external_broker() {
    let m = Mosquitto::start("").expect("mosquitto (scripts/test.sh installs it)");
    let token = CancellationToken::new();
    for version in [MqttVersion::V311, MqttVersion::V5] {
        let topic = testing::unique("ext/topic");
        let (_s, mut rx) = client(&cfg(m.port, None, version), &[&topic], &token).await;
        let (p, _) = client(&cfg(m.port, None, version), &[], &token).await;
        for i in 0..500 {
            p.publish(&topic, i.to_string(), QoS::AtLeastOnce, false)
                .await
                .unwrap();
        }
        let got = drain(&mut rx, Duration::from_secs(1)).await;
        assert_eq!(got.len(), 500, "{version:?}");
    }
    token.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_and_both_brokers_together() {
    let pg = PgServer::start();
    let url = pg.create_database(&testing::unique("harness")).await;
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    db.batch_execute("CREATE TABLE seen (topic text, payload text)")
        .await
        .unwrap();

    let embedded = testing::start_embedded_broker(BrokerConfig::default());
    let mosq = Mosquitto::start("").unwrap();
    let token = CancellationToken::new();
    // A message goes in through one broker, is stored, and the row count is read back.
    for port in [embedded.ports.tcp().port(), mosq.port] {
        let topic = testing::unique("pg/flow");
        let (_s, mut rx) = client(&cfg(port, None, MqttVersion::V311), &[&topic], &token).await;
        let (p, _) = client(&cfg(port, Some("pub"), MqttVersion::V5), &[], &token).await;
        p.publish(&topic, "21.5", QoS::AtLeastOnce, false)
            .await
            .unwrap();
        let m = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        db.execute(
            "INSERT INTO seen VALUES ($1, $2)",
            &[
                &m.topic().unwrap(),
                &String::from_utf8_lossy(m.payload()).as_ref(),
            ],
        )
        .await
        .unwrap();
    }
    let n: i64 = db
        .query_one("SELECT count(*) FROM seen WHERE payload = '21.5'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    let whoami: String = db
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(whoami, "nexus");
    token.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_a_dead_broker_never_acknowledged_go_to_the_next_one() {
    // rumqttc alone drops what it had not got acknowledged when the new broker has no session
    // for it; the client keeps it and sends it again.
    let broker = testing::start_embedded_broker_on(0);
    let port = broker.ports.tcp().port();
    let token = CancellationToken::new();
    let mut c = cfg(port, Some("pub"), MqttVersion::V311);
    c.persistent_session = true;
    // Slow to come back: the subscriber is on the new broker first (a busy CI machine took
    // more than 1.5 s to start the broker and subscribe).
    c.reconnect_min = Duration::from_secs(5);
    c.reconnect_max = Duration::from_secs(5);
    let (publisher, _) = mqtt::connect(
        &c,
        ClientSettings::new(testing::unique("resend")),
        None,
        token.clone(),
    )
    .unwrap();
    publisher
        .wait_connected(Duration::from_secs(10))
        .await
        .unwrap();
    let acks = publisher.acked();
    let n = 2000u64;
    for i in 0..n {
        publisher
            .publish("resend/t", i.to_string(), QoS::AtLeastOnce, false)
            .await
            .unwrap();
    }
    drop(broker);
    let acked_by_first = *acks.borrow();
    assert!(
        acked_by_first < n,
        "the first broker acknowledged all {n} before it died: nothing to resend"
    );
    let broker = testing::start_embedded_broker_on(port);
    let (_s, mut rx) = client(&cfg(port, None, MqttVersion::V311), &["resend/#"], &token).await;
    let got = drain(&mut rx, Duration::from_secs(8)).await;
    let numbers: std::collections::BTreeSet<u64> =
        got.iter().map(|(_, p)| p.parse().unwrap()).collect();
    // The first broker acknowledged a prefix (some of its acknowledgements may reach the
    // client only after the counter was read above); every publish after it must have reached
    // the second broker, and each publish is acknowledged exactly once.
    assert_eq!(
        *acks.borrow(),
        n,
        "each publish acknowledged once, by one broker or the other"
    );
    let first_at_second = numbers.first().copied().unwrap_or(n);
    assert!(
        first_at_second < n,
        "nothing reached the second broker: nothing was resent"
    );
    let missing: Vec<u64> = (first_at_second..n)
        .filter(|i| !numbers.contains(i))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of the {} publishes after the first broker's last acknowledgement did not reach the second, from {:?}",
        missing.len(),
        n - first_at_second,
        missing.first()
    );
    token.cancel();
    drop(broker);
}

/// The disk under the embedded broker's durable state fills up: a publish it cannot write is
/// not acknowledged (the connection is closed; the publisher sends it again), counted; once
/// space returns every message is acknowledged and reaches the persistent subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_state_disk_acknowledges_nothing_it_could_not_keep() {
    let disk = testing::SmallDisk::mount("2m");
    let registry = prometheus::Registry::new();
    let broker = testing::start_broker(
        BrokerConfig {
            state_dir: Some(disk.path().join("state")),
            ..BrokerConfig::default()
        },
        &testing::test_auth(),
        &[],
        &registry,
    );
    let port = broker.ports.tcp().port();
    let token = CancellationToken::new();
    // A persistent subscriber that goes away: what follows is queued for it.
    let mut sc = testing::service_mqtt_config(port);
    sc.persistent_session = true;
    let sub_id = testing::unique("keeper");
    let mut settings = ClientSettings::new(sub_id.clone());
    settings.subscriptions = vec![("full/#".into(), QoS::AtLeastOnce)];
    let sub_token = CancellationToken::new();
    let (sub, _rx) = mqtt::connect(&sc, settings, None, sub_token.clone()).unwrap();
    sub.wait_connected(Duration::from_secs(10)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    sub.disconnect().await;
    sub_token.cancel();

    disk.fill();
    let (publisher, _) = client(&testing::service_mqtt_config(port), &[], &token).await;
    let mut acked = publisher.acked();
    let before = *acked.borrow();
    let n = 50u64;
    for i in 0..n {
        publisher
            .publish("full/x", i.to_string(), QoS::AtLeastOnce, false)
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let errors = |r: &prometheus::Registry| {
        testing::metric_value(
            &testing::registry_text(r),
            "nexus_broker_state_errors_total",
        )
        .unwrap_or(0.0)
    };
    assert!(errors(&registry) >= 1.0, "the failed writes are counted");
    assert!(
        *acked.borrow() - before < n,
        "acknowledged while the state could not be written"
    );

    disk.free();
    tokio::time::timeout(
        Duration::from_secs(30),
        acked.wait_for(|a| *a >= before + n),
    )
    .await
    .expect("everything acknowledged once the disk has room")
    .unwrap();
    let mut settings = ClientSettings::new(sub_id);
    settings.incoming_capacity = 10_000;
    let (_sub, mut rx) = mqtt::connect(&sc, settings, None, token.clone()).unwrap();
    let mut got = std::collections::BTreeSet::new();
    let end = tokio::time::Instant::now() + Duration::from_secs(15);
    while (got.len() as u64) < n {
        match tokio::time::timeout_at(end, rx.recv()).await {
            Ok(Some(m)) => {
                got.insert(String::from_utf8_lossy(m.payload()).into_owned());
            }
            _ => break,
        }
    }
    assert_eq!(
        got.len() as u64,
        n,
        "the persistent subscriber got every message: {got:?}; {}",
        testing::registry_text(&registry)
            .lines()
            .filter(|l| l.starts_with("nexus_broker"))
            .collect::<Vec<_>>()
            .join("; ")
    );
    token.cancel();
}

/// A persistent subscriber with automatic acks disconnects in the middle of a stream and comes
/// back: every message reaches it, on the old connection (up to its DISCONNECT, including
/// what arrived while the DISCONNECT went out) or from its session on the new one. The client
/// used to acknowledge and drop what arrived while it waited for its DISCONNECT to leave: 4
/// of 8 rounds lost every message after the disconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_subscriber_that_disconnects_mid_stream_misses_nothing() {
    let broker = testing::service_broker();
    let port = broker.ports.tcp().port();
    for round in 0..6 {
        let mut sc = testing::service_mqtt_config(port);
        sc.persistent_session = true;
        let id = testing::unique("leaver");
        let mut s = ClientSettings::new(id.clone());
        s.subscriptions = vec![(format!("leave{round}/#"), QoS::AtLeastOnce)];
        let first_token = CancellationToken::new();
        let (sub, mut first) = mqtt::connect(&sc, s, None, first_token.clone()).unwrap();
        sub.wait_connected(Duration::from_secs(10)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let token = CancellationToken::new();
        let (p, _) = client(&cfg(port, Some("svc"), MqttVersion::V311), &[], &token).await;
        let n = 200u64;
        let topic = format!("leave{round}/x");
        let publishing = tokio::spawn(async move {
            for i in 0..n {
                p.publish(&topic, i.to_string(), QoS::AtLeastOnce, false)
                    .await
                    .unwrap();
                if i % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            p
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        sub.disconnect().await;
        first_token.cancel();
        let mut got = std::collections::BTreeSet::new();
        // The old connection's messages, until its event loop ends.
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(3), first.recv()).await {
            got.insert(String::from_utf8_lossy(m.payload()).into_owned());
        }
        let on_first = got.len();
        let _p = publishing.await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (_again, mut rx) =
            mqtt::connect(&sc, ClientSettings::new(id), None, token.clone()).unwrap();
        let end = tokio::time::Instant::now() + Duration::from_secs(10);
        while (got.len() as u64) < n {
            match tokio::time::timeout_at(end, rx.recv()).await {
                Ok(Some(m)) => {
                    got.insert(String::from_utf8_lossy(m.payload()).into_owned());
                }
                _ => break,
            }
        }
        let missing: Vec<u64> = (0..n).filter(|i| !got.contains(&i.to_string())).collect();
        assert!(
            missing.is_empty(),
            "round {round}: {on_first} on the first connection, {} of {n} in all; missing {missing:?}",
            got.len()
        );
        token.cancel();
    }
}

/// Round trips (publish QoS 1 to a topic the client subscribed to, wait for the message) of a
/// client that leaves Nagle's algorithm on, as Python's paho-mqtt does; returns how many took
/// at least 40 ms, Linux's shortest delayed ACK.
async fn nagle_round_trips_stalled(port: u16, n: usize) -> usize {
    let token = CancellationToken::new();
    let topic = testing::unique("nagle/echo");
    let mut s = ClientSettings::new(testing::unique("nagle"));
    s.subscriptions = vec![(topic.clone(), QoS::AtLeastOnce)];
    s.tcp_nodelay = false;
    let mut c = testing::publisher_mqtt_config(port);
    c.persistent_session = false;
    let (h, mut rx) = mqtt::connect(&c, s, None, token.clone()).unwrap();
    h.wait_connected(Duration::from_secs(10)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut stalled = 0;
    for i in 0..n {
        let t = std::time::Instant::now();
        h.publish(&topic, i.to_string(), QoS::AtLeastOnce, false)
            .await
            .unwrap();
        let m = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("round trip {i} never came back"))
            .unwrap();
        assert_eq!(m.payload(), i.to_string().as_bytes());
        if t.elapsed() >= Duration::from_millis(40) {
            stalled += 1;
        }
    }
    h.disconnect().await;
    token.cancel();
    stalled
}

/// The client's PUBACK of each message is a packet the broker does not answer. Linux delays
/// its ACK, and a client with Nagle on holds its next publish until that ACK comes: ~40 ms per
/// round trip. The broker acknowledges such a packet at once (`broker.quickack`, default on).
/// The same client against the broker with `quickack: false` shows the stall, so the check
/// can fail. A stall is counted by the kernel's delay, not timed against a budget: a slow
/// machine makes few round trips reach 40 ms, the delayed ACK makes all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_nagle_on_does_not_wait_for_the_delayed_ack() {
    let n = 30;
    let broker = testing::service_broker();
    let stalled = nagle_round_trips_stalled(broker.ports.tcp().port(), n).await;
    assert!(
        stalled <= n / 3,
        "{stalled} of {n} round trips of a Nagle-on client waited for a delayed ACK"
    );

    let delayed = testing::start_embedded_broker(BrokerConfig {
        quickack: false,
        ..BrokerConfig::default()
    });
    let stalled = nagle_round_trips_stalled(delayed.ports.tcp().port(), n).await;
    assert!(
        stalled >= n * 2 / 3,
        "without quick ACKs only {stalled} of {n} round trips stalled: the check above cannot \
         tell the difference on this machine"
    );
}
