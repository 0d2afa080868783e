//! Hostile MQTT clients against the embedded broker, each finding of the security review as a
//! test through a real broker and real clients (docs/security.md lists which test covers
//! which finding). Every one of these failed on the broker before the review: anonymous
//! clients could publish device values and join the historian's shared group, anyone could
//! take a service's client id, a last will bypassed the ACL, client-set user properties went
//! through, and retained messages, sessions and queues had no bound.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::time::Duration;

use nexus_common::config::{
    Anonymous, AuthConfig, BrokerConfig, Config, DeviceConfig, MqttConfig, MqttVersion, Secret,
};
use nexus_common::mqtt::{self, ClientSettings, Message, MqttHandle, PublishProps, QoS, Will};
use nexus_common::testing::{self, metric_value, OPERATOR_USER, PUBLISHER_USER, SERVICE_USER};
use prometheus::Registry;
use tokio::sync::mpsc::Receiver;
use tokio_util::sync::CancellationToken;

const PREFIX: &str = "acme/plant/packaging/line-1";
const DEVICE_TOPIC: &str = "acme/plant/packaging/line-1/plc-1/temperature";

fn devices() -> Vec<DeviceConfig> {
    let yaml = format!(
        "devices:\n  - id: plc-1\n    protocol: modbus\n    uns_prefix: {PREFIX}\n    connection: {{ host: 127.0.0.1 }}\n    tags:\n      - {{ id: temperature, address: \"HR:1\", data_type: int16 }}\n"
    );
    Config::from_str_with_env(&yaml, None, &[]).unwrap().devices
}

struct Rig {
    broker: nexus_common::broker::EmbeddedBroker,
    registry: Registry,
    token: CancellationToken,
}

impl Rig {
    fn new(cfg: BrokerConfig, auth: AuthConfig) -> Rig {
        let registry = Registry::new();
        let broker = testing::start_broker(cfg, &auth, &devices(), &registry);
        Rig {
            broker,
            registry,
            token: CancellationToken::new(),
        }
    }

    fn default() -> Rig {
        Rig::new(BrokerConfig::default(), testing::test_auth())
    }

    fn port(&self) -> u16 {
        self.broker.ports.tcp().port()
    }

    /// A sample's value, 0 when it is not there yet; `labels` as written (`reason="will"`).
    fn metric(&self, name: &str, labels: &str) -> f64 {
        let sample = if labels.is_empty() {
            name.to_owned()
        } else {
            format!("{name}{{{labels}}}")
        };
        metric_value(&testing::registry_text(&self.registry), &sample).unwrap_or(0.0)
    }

    fn cfg(&self, user: Option<(&str, &str)>, version: MqttVersion) -> MqttConfig {
        let mut c = testing::mqtt_config(self.port());
        c.version = version;
        c.persistent_session = false;
        if let Some((u, p)) = user {
            c.username = Some(u.into());
            c.password = Some(Secret::new(p));
        }
        c
    }

    /// A connected client, or None when the broker refuses it within 3 s.
    async fn client(
        &self,
        cfg: &MqttConfig,
        settings: ClientSettings,
    ) -> Option<(MqttHandle, Receiver<Message>)> {
        let (h, rx) = mqtt::connect(cfg, settings, None, self.token.clone()).unwrap();
        h.wait_connected(Duration::from_secs(3)).await.ok()?;
        // Let SUBSCRIBEs reach the broker before anyone publishes.
        tokio::time::sleep(Duration::from_millis(200)).await;
        Some((h, rx))
    }

    async fn subscriber(
        &self,
        user: Option<(&str, &str)>,
        version: MqttVersion,
        filters: &[&str],
    ) -> (MqttHandle, Receiver<Message>) {
        let mut s = ClientSettings::new(testing::unique("sub"));
        s.subscriptions = filters
            .iter()
            .map(|f| (f.to_string(), QoS::AtLeastOnce))
            .collect();
        s.incoming_capacity = 10_000;
        self.client(&self.cfg(user, version), s)
            .await
            .expect("subscriber connects")
    }

    async fn publisher(&self, user: Option<(&str, &str)>, version: MqttVersion) -> MqttHandle {
        self.client(
            &self.cfg(user, version),
            ClientSettings::new(testing::unique("pub")),
        )
        .await
        .expect("publisher connects")
        .0
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// Messages received until `quiet` passes without one.
async fn drain(rx: &mut Receiver<Message>, quiet: Duration) -> Vec<Message> {
    let mut out = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(quiet, rx.recv()).await {
        out.push(m);
    }
    out
}

fn topics(ms: &[Message]) -> Vec<String> {
    ms.iter()
        .map(|m| m.topic().unwrap_or("").to_owned())
        .collect()
}

const Q: Duration = Duration::from_millis(400);

/// A non-loopback address of this machine, if it has one.
fn lan_address() -> Option<std::net::IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outsiders_cannot_connect_anonymously() {
    // `auth.anonymous: off`: not even this machine gets in without credentials.
    let rig = Rig::new(
        BrokerConfig::default(),
        AuthConfig {
            anonymous: Anonymous::Off,
            ..testing::test_auth()
        },
    );
    let anon = rig
        .client(
            &rig.cfg(None, MqttVersion::V311),
            ClientSettings::new(testing::unique("anon")),
        )
        .await;
    assert!(
        anon.is_none(),
        "anonymous client accepted with anonymous: off"
    );
    assert!(
        rig.metric(
            "nexus_broker_connects_refused_total",
            "reason=\"anonymous\""
        ) >= 1.0
    );
    assert!(rig
        .client(
            &rig.cfg(Some(PUBLISHER_USER), MqttVersion::V5),
            ClientSettings::new(testing::unique("pub"))
        )
        .await
        .is_some());

    // The default (`loopback`): a client from the network is refused, this machine is not.
    if let Some(ip) = lan_address() {
        let mut cfg = BrokerConfig::default();
        let rig = Rig::new(
            BrokerConfig {
                bind: "0.0.0.0".parse().unwrap(),
                ..std::mem::take(&mut cfg)
            },
            testing::test_auth(),
        );
        let mut from_lan = rig.cfg(None, MqttVersion::V311);
        from_lan.host = ip.to_string();
        let refused = rig
            .client(&from_lan, ClientSettings::new(testing::unique("lan")))
            .await;
        assert!(refused.is_none(), "anonymous client from {ip} accepted");
        assert!(rig
            .client(
                &rig.cfg(None, MqttVersion::V311),
                ClientSettings::new(testing::unique("lo"))
            )
            .await
            .is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_gateway_writes_device_values_and_viewers_write_nothing() {
    let rig = Rig::default();
    let (_s, mut seen) = rig
        .subscriber(Some(SERVICE_USER), MqttVersion::V5, &["#"])
        .await;
    // Anonymous, a viewer, an operator and a publisher each try to overwrite a device's
    // retained value, and to publish plain UNS data (a rule's suppress_when topic, say).
    let attackers = [
        None,
        Some(testing::VIEWER_USER),
        Some(OPERATOR_USER),
        Some(PUBLISHER_USER),
    ];
    for who in attackers {
        let p = rig.publisher(who, MqttVersion::V311).await;
        p.publish(
            DEVICE_TOPIC,
            r#"{"v":999,"q":"good"}"#,
            QoS::AtLeastOnce,
            true,
        )
        .await
        .unwrap();
        if who != Some(PUBLISHER_USER) {
            p.publish(
                "acme/plant/utilities/suppress",
                "1",
                QoS::AtLeastOnce,
                false,
            )
            .await
            .unwrap();
        }
    }
    let got = drain(&mut seen, Q).await;
    assert!(
        got.is_empty(),
        "refused publishes were delivered: {:?}",
        topics(&got)
    );
    assert!(rig.metric("nexus_broker_acl_denied_total", "action=\"publish\"") >= 7.0);
    // No forged retained value is there for the next subscriber either.
    let (_l, mut late) = rig
        .subscriber(None, MqttVersion::V311, &[DEVICE_TOPIC])
        .await;
    assert!(drain(&mut late, Q).await.is_empty());

    // The gateway (service role) writes the device's value; a publisher writes under its
    // own topics, which are not a configured device's.
    let gw = rig.publisher(Some(SERVICE_USER), MqttVersion::V311).await;
    gw.publish(
        DEVICE_TOPIC,
        r#"{"v":21.5,"q":"good"}"#,
        QoS::AtLeastOnce,
        true,
    )
    .await
    .unwrap();
    let p = rig.publisher(Some(PUBLISHER_USER), MqttVersion::V311).await;
    p.publish(
        "acme/plant/packaging/line-1/scale/weight",
        "12",
        QoS::AtLeastOnce,
        false,
    )
    .await
    .unwrap();
    let got = topics(&drain(&mut seen, Q).await);
    assert_eq!(
        got,
        vec![
            DEVICE_TOPIC.to_owned(),
            "acme/plant/packaging/line-1/scale/weight".to_owned()
        ]
    );
    // The broker counts what it took in (refused publishes included) and what it sent out.
    assert!(rig.metric("nexus_broker_messages_received_total", "") >= 9.0);
    assert!(rig.metric("nexus_broker_messages_delivered_total", "") >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_historian_stream_cannot_be_joined_or_its_client_id_taken() {
    let rig = Rig::default();
    let group = "$share/nexus-ingest/acme/#";
    let (_m, mut member) = rig
        .subscriber(Some(SERVICE_USER), MqttVersion::V311, &[group])
        .await;
    for who in [None, Some(testing::VIEWER_USER), Some(OPERATOR_USER)] {
        let (_t, mut thief) = rig.subscriber(who, MqttVersion::V5, &[group]).await;
        let gw = rig.publisher(Some(SERVICE_USER), MqttVersion::V311).await;
        for i in 0..20 {
            gw.publish("acme/plant/x/y/z", i.to_string(), QoS::AtLeastOnce, false)
                .await
                .unwrap();
        }
        assert_eq!(drain(&mut member, Q).await.len(), 20, "{who:?}");
        assert!(
            drain(&mut thief, Q).await.is_empty(),
            "{who:?} joined the group"
        );
    }
    assert!(rig.metric("nexus_broker_acl_denied_total", "action=\"subscribe\"") >= 3.0);

    // A service's client id: the service keeps its session, the impostor is refused.
    let id = "nexus-ingestion-plant1";
    let mut svc_cfg = rig.cfg(Some(SERVICE_USER), MqttVersion::V311);
    svc_cfg.persistent_session = true;
    let mut s = ClientSettings::new(id);
    s.subscriptions = vec![("acme/#".into(), QoS::AtLeastOnce)];
    let (_svc, mut svc_rx) = rig.client(&svc_cfg, s).await.expect("service connects");
    for who in [None, Some(OPERATOR_USER), Some(PUBLISHER_USER)] {
        let impostor = rig
            .client(&rig.cfg(who, MqttVersion::V5), ClientSettings::new(id))
            .await;
        assert!(impostor.is_none(), "{who:?} took the client id {id}");
    }
    assert!(
        rig.metric(
            "nexus_broker_connects_refused_total",
            "reason=\"client_id\""
        ) >= 3.0
    );
    let gw = rig.publisher(Some(SERVICE_USER), MqttVersion::V311).await;
    gw.publish("acme/after", "1", QoS::AtLeastOnce, false)
        .await
        .unwrap();
    assert_eq!(topics(&drain(&mut svc_rx, Q).await), vec!["acme/after"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_will_is_checked_like_a_publish() {
    let rig = Rig::default();
    let (_s, mut seen) = rig
        .subscriber(Some(SERVICE_USER), MqttVersion::V311, &["#", "$nexus/#"])
        .await;
    for (topic, who) in [
        (DEVICE_TOPIC, None),
        (DEVICE_TOPIC, Some(PUBLISHER_USER)),
        ("$nexus/status/service/ingestion/local", Some(OPERATOR_USER)),
    ] {
        let mut s = ClientSettings::new(testing::unique("will"));
        s.will = Some(Will {
            topic: topic.into(),
            payload: r#"{"v":-1,"q":"good"}"#.into(),
            qos: QoS::AtLeastOnce,
            retain: true,
        });
        let c = rig.client(&rig.cfg(who, MqttVersion::V311), s).await;
        assert!(c.is_none(), "{who:?} connected with a will to {topic}");
    }
    assert!(rig.metric("nexus_broker_connects_refused_total", "reason=\"will\"") >= 3.0);
    assert!(drain(&mut seen, Q).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_stamps_who_sent_a_command() {
    let rig = Rig::default();
    let (_s, mut seen) = rig
        .subscriber(
            Some(SERVICE_USER),
            MqttVersion::V5,
            &["$nexus/cmd/#", "acme/#"],
        )
        .await;
    let forged = || PublishProps {
        user_properties: vec![
            ("nexus-user".into(), "admin".into()),
            ("site".into(), "kept".into()),
        ],
        ..PublishProps::default()
    };
    let op = rig.publisher(Some(OPERATOR_USER), MqttVersion::V5).await;
    op.publish_with(
        "$nexus/cmd/plc-1/write",
        r#"{"writes":[]}"#,
        QoS::AtLeastOnce,
        false,
        Some(forged()),
    )
    .await
    .unwrap();
    let p = rig.publisher(Some(PUBLISHER_USER), MqttVersion::V5).await;
    p.publish_with(
        "acme/erp/order",
        "1",
        QoS::AtLeastOnce,
        false,
        Some(forged()),
    )
    .await
    .unwrap();
    // MQTT 3.1.1 clients cannot send properties; they are stamped all the same.
    let op3 = rig.publisher(Some(OPERATOR_USER), MqttVersion::V311).await;
    op3.publish("$nexus/cmd/plc-1/t/set", "1", QoS::AtLeastOnce, false)
        .await
        .unwrap();
    let got = drain(&mut seen, Q).await;
    assert_eq!(got.len(), 3, "{:?}", topics(&got));
    assert_eq!(got[0].user_properties("nexus-user"), vec!["op"]);
    assert_eq!(got[0].user_property("site"), Some("kept"));
    assert!(got[1].user_properties("nexus-user").is_empty());
    assert_eq!(got[2].user_properties("nexus-user"), vec!["op"]);
    assert_eq!(
        rig.metric("nexus_broker_user_property_stripped_total", ""),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_are_bounded() {
    let rig = Rig::new(
        BrokerConfig {
            max_retained: 5,
            max_retained_bytes: nexus_common::config::ByteSize(200),
            ..BrokerConfig::default()
        },
        testing::test_auth(),
    );
    let p = rig.publisher(Some(PUBLISHER_USER), MqttVersion::V311).await;
    let mut acked = p.acked();
    let start = *acked.borrow();
    // Everything published so far acknowledged (so retained or refused) before a subscriber
    // looks.
    async fn all_acked(acked: &mut tokio::sync::watch::Receiver<u64>, n: u64) {
        tokio::time::timeout(Duration::from_secs(20), acked.wait_for(|a| *a >= n))
            .await
            .expect("publishes acknowledged")
            .unwrap();
    }
    for i in 0..10 {
        p.publish(&format!("lab/r/{i}"), "x", QoS::AtLeastOnce, true)
            .await
            .unwrap();
    }
    // An update of a topic already held still replaces it at the limit.
    p.publish("lab/r/0", "updated", QoS::AtLeastOnce, true)
        .await
        .unwrap();
    all_acked(&mut acked, start + 11).await;
    // The retainer stores behind the acknowledgement: a late subscriber may look again.
    let mut got = Vec::new();
    let looked = std::time::Instant::now();
    while looked.elapsed() < Duration::from_secs(10) {
        let (_l, mut late) = rig.subscriber(None, MqttVersion::V311, &["lab/r/#"]).await;
        got = drain(&mut late, Q).await;
        if got.len() >= 5 {
            break;
        }
    }
    assert_eq!(got.len(), 5, "{:?}", topics(&got));
    let first = got.iter().find(|m| m.topic() == Some("lab/r/0")).unwrap();
    assert_eq!(first.payload().as_ref(), b"updated");
    assert_eq!(rig.metric("nexus_broker_retained_refused_total", ""), 5.0);
    assert_eq!(rig.metric("nexus_broker_retained_messages", ""), 5.0);
    // Deleting one makes room; bytes are bounded too.
    p.publish("lab/r/1", Vec::<u8>::new(), QoS::AtLeastOnce, true)
        .await
        .unwrap();
    p.publish("lab/big", vec![b'x'; 300], QoS::AtLeastOnce, true)
        .await
        .unwrap();
    p.publish("lab/small", "s", QoS::AtLeastOnce, true)
        .await
        .unwrap();
    // Nexus's own services are never refused.
    let gw = rig.publisher(Some(SERVICE_USER), MqttVersion::V311).await;
    let mut gw_acked = gw.acked();
    let gw_start = *gw_acked.borrow();
    gw.publish(DEVICE_TOPIC, "21", QoS::AtLeastOnce, true)
        .await
        .unwrap();
    all_acked(&mut acked, start + 14).await;
    all_acked(&mut gw_acked, gw_start + 1).await;
    let mut got = Vec::new();
    let looked = std::time::Instant::now();
    while looked.elapsed() < Duration::from_secs(10) {
        let (_l2, mut later) = rig
            .subscriber(None, MqttVersion::V311, &["lab/#", DEVICE_TOPIC])
            .await;
        got = topics(&drain(&mut later, Q).await);
        if got.contains(&"lab/small".to_owned()) && got.contains(&DEVICE_TOPIC.to_owned()) {
            break;
        }
    }
    got.sort();
    assert!(got.contains(&"lab/small".to_owned()), "{got:?}");
    assert!(!got.contains(&"lab/big".to_owned()), "{got:?}");
    assert!(got.contains(&DEVICE_TOPIC.to_owned()), "{got:?}");
    assert_eq!(rig.metric("nexus_broker_retained_refused_total", ""), 6.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_and_queues_are_bounded() {
    let rig = Rig::new(
        BrokerConfig {
            max_sessions: 4,
            max_mqueue_len: 5,
            service_mqueue_len: 1000,
            ..BrokerConfig::default()
        },
        testing::test_auth(),
    );
    // Two persistent sessions subscribed to q/#, a viewer's and a service's, then offline.
    let persistent = |user, id: &str| {
        let mut c = rig.cfg(Some(user), MqttVersion::V311);
        c.persistent_session = true;
        let mut s = ClientSettings::new(id);
        s.subscriptions = vec![("q/#".into(), QoS::AtLeastOnce)];
        s.incoming_capacity = 10_000;
        (c, s)
    };
    let viewer_id = testing::unique("viewer");
    let (c, s) = persistent(testing::VIEWER_USER, &viewer_id);
    let tok = CancellationToken::new();
    let (h, _) = mqtt::connect(&c, s, None, tok.clone()).unwrap();
    h.wait_connected(Duration::from_secs(3)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    tok.cancel();
    let svc_id = "nexus-ingestion-q";
    let (c, s) = persistent(SERVICE_USER, svc_id);
    let tok = CancellationToken::new();
    let (h, _) = mqtt::connect(&c, s, None, tok.clone()).unwrap();
    h.wait_connected(Duration::from_secs(3)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    tok.cancel();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let p = rig.publisher(Some(PUBLISHER_USER), MqttVersion::V311).await;
    for i in 0..100 {
        p.publish("q/x", i.to_string(), QoS::AtLeastOnce, false)
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Sessions held: the two offline ones and the publisher's; one more fits, then no more.
    assert_eq!(rig.metric("nexus_broker_sessions", ""), 3.0);
    let fourth = rig
        .client(
            &rig.cfg(None, MqttVersion::V311),
            ClientSettings::new("fourth"),
        )
        .await;
    assert!(fourth.is_some());
    let fifth = rig
        .client(
            &rig.cfg(None, MqttVersion::V5),
            ClientSettings::new("fifth"),
        )
        .await;
    assert!(
        fifth.is_none(),
        "a fifth session beyond broker.max_sessions: 4"
    );
    assert!(rig.metric("nexus_broker_sessions_refused_total", "") >= 1.0);

    // Back online (their sessions are there, so the cap does not stop them): the viewer gets
    // at most its queue, the service everything.
    let (c, s) = persistent(testing::VIEWER_USER, &viewer_id);
    let (_v, mut vrx) = rig.client(&c, s).await.expect("viewer resumes");
    let (c, s) = persistent(SERVICE_USER, svc_id);
    let (_s, mut srx) = rig.client(&c, s).await.expect("service resumes");
    let viewer_got = drain(&mut vrx, Q).await.len();
    let service_got = drain(&mut srx, Q).await.len();
    assert!(viewer_got <= 5, "viewer queue held {viewer_got}");
    assert_eq!(service_got, 100);
    assert!(
        rig.metric(
            "nexus_broker_messages_dropped_total",
            "reason=\"queue_full\""
        ) >= 95.0
    );
}

/// A client that does not acknowledge gets `broker.max_inflight` messages and then waits; a
/// Nexus service's session gets `broker.service_max_inflight`. Acknowledging lets the rest
/// through: it was the window, not a loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_session_has_its_own_in_flight_window() {
    let rig = Rig::new(
        BrokerConfig {
            max_inflight: 8,
            service_max_inflight: 40,
            ..BrokerConfig::default()
        },
        testing::test_auth(),
    );
    for version in [MqttVersion::V311, MqttVersion::V5] {
        let topic = format!("w{}/x", version as u8);
        let subscriber = |user| {
            let mut s = ClientSettings::new(testing::unique("window"));
            s.subscriptions = vec![(format!("w{}/#", version as u8), QoS::AtLeastOnce)];
            s.manual_acks = true;
            s.incoming_capacity = 1000;
            (rig.cfg(Some(user), version), s)
        };
        let (c, s) = subscriber(testing::VIEWER_USER);
        let (viewer, mut vrx) = rig.client(&c, s).await.expect("viewer connects");
        let (c, s) = subscriber(SERVICE_USER);
        let (service, mut srx) = rig.client(&c, s).await.expect("service connects");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let p = rig.publisher(Some(PUBLISHER_USER), version).await;
        for i in 0..60 {
            p.publish(&topic, i.to_string(), QoS::AtLeastOnce, false)
                .await
                .unwrap();
        }
        let v = drain(&mut vrx, Q).await;
        let s = drain(&mut srx, Q).await;
        assert_eq!(v.len(), 8, "{version:?}: a viewer's window");
        assert_eq!(s.len(), 40, "{version:?}: a service's window");
        // Acknowledged, the rest arrives, in order.
        let (mut v_all, mut s_all) = (v, s);
        let (mut v_acked, mut s_acked) = (0, 0);
        for _ in 0..10 {
            for m in &v_all[v_acked..] {
                viewer.ack(m).await.unwrap();
            }
            for m in &s_all[s_acked..] {
                service.ack(m).await.unwrap();
            }
            (v_acked, s_acked) = (v_all.len(), s_all.len());
            v_all.extend(drain(&mut vrx, Q).await);
            s_all.extend(drain(&mut srx, Q).await);
            if v_all.len() >= 60 && s_all.len() >= 60 {
                break;
            }
        }
        let payloads = |ms: &[Message]| -> Vec<String> {
            ms.iter()
                .map(|m| String::from_utf8_lossy(m.payload()).into_owned())
                .collect()
        };
        let want: Vec<String> = (0..60).map(|i| i.to_string()).collect();
        assert_eq!(payloads(&v_all), want, "{version:?}: the viewer's messages");
        assert_eq!(
            payloads(&s_all),
            want,
            "{version:?}: the service's messages"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_keep_its_session_past_the_cap() {
    let rig = Rig::new(
        BrokerConfig {
            session_expiry: Duration::from_secs(1),
            max_session_expiry: Duration::from_secs(1),
            ..BrokerConfig::default()
        },
        testing::test_auth(),
    );
    // An MQTT 5 client asks for a day.
    let id = testing::unique("long");
    let mut c = rig.cfg(None, MqttVersion::V5);
    c.persistent_session = true;
    c.session_expiry = Duration::from_secs(86_400);
    let settings = || {
        let mut s = ClientSettings::new(id.clone());
        s.subscriptions = vec![("cap/#".into(), QoS::AtLeastOnce)];
        s
    };
    let tok = CancellationToken::new();
    let (h, _) = mqtt::connect(&c, settings(), None, tok.clone()).unwrap();
    h.wait_connected(Duration::from_secs(3)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    tok.cancel();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        rig.metric("nexus_broker_sessions", ""),
        0.0,
        "session expired after 1 s"
    );
    let p = rig.publisher(Some(PUBLISHER_USER), MqttVersion::V311).await;
    p.publish("cap/x", "1", QoS::AtLeastOnce, false)
        .await
        .unwrap();
    // Its subscription went with the session: a client that resumes without subscribing
    // again gets nothing.
    let mut s = settings();
    s.subscriptions.clear();
    let (_h, mut rx) = rig.client(&c, s).await.unwrap();
    assert!(drain(&mut rx, Q).await.is_empty());
}

/// A client that subscribes without end: past `broker.max_subscriptions` each new filter is
/// refused and counted, the ones it holds keep working, and a repeat of one it holds is fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_per_session_are_bounded() {
    let rig = Rig::new(
        BrokerConfig {
            max_subscriptions: 5,
            ..BrokerConfig::default()
        },
        testing::test_auth(),
    );
    let filters: Vec<String> = (0..8).map(|i| format!("lab/subs/{i}")).collect();
    let mut wanted: Vec<&str> = filters.iter().map(String::as_str).collect();
    // A repeat of a held filter replaces it: not refused.
    wanted.insert(3, "lab/subs/0");
    let (_s, mut rx) = rig.subscriber(None, MqttVersion::V5, &wanted).await;
    let p = rig.publisher(Some(PUBLISHER_USER), MqttVersion::V311).await;
    for f in &filters {
        p.publish(f, "x", QoS::AtLeastOnce, false).await.unwrap();
    }
    let mut got = topics(&drain(&mut rx, Q).await);
    got.sort();
    let held: Vec<String> = filters[..5].to_vec();
    assert_eq!(got, held);
    assert_eq!(
        rig.metric("nexus_broker_subscriptions_refused_total", ""),
        3.0
    );
}
