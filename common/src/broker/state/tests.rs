use super::*;
use rmqtt::codec::types::Publish as CodecPublish;
use rmqtt::types::SubOptionsV3;

fn id(client: &str) -> Id {
    Id::new(1, 1, None, None, client.into(), None)
}

fn conn(client: &str) -> ConnectInfo {
    ConnectInfo::V3(
        id(client),
        Box::new(rmqtt::codec::v3::Connect {
            clean_session: false,
            client_id: client.into(),
            username: Some("ingest".into()),
            password: Some(bytes::Bytes::from_static(b"secret-pw")),
            ..Default::default()
        }),
    )
}

fn publish(topic: &str, payload: &str, qos: QoS) -> Publish {
    Publish::from(CodecPublish {
        dup: false,
        retain: false,
        qos,
        topic: topic.into(),
        packet_id: None,
        payload: bytes::Bytes::from(payload.to_owned()),
        properties: None,
    })
}

fn opts(qos: QoS, group: Option<&str>) -> SubscriptionOptions {
    SubscriptionOptions::V3(SubOptionsV3 {
        qos,
        shared_group: group.map(Into::into),
    })
}

fn metrics() -> StateMetrics {
    StateMetrics {
        sessions: prometheus::IntGauge::new("s", "s").unwrap(),
        messages: prometheus::IntGauge::new("m", "m").unwrap(),
        errors: prometheus::IntCounter::new("e", "e").unwrap(),
        overflow: prometheus::IntCounter::new("o", "o").unwrap(),
    }
}

fn open(dir: &Path) -> BrokerState {
    BrokerState::open(dir, 1 << 20, 100, Duration::ZERO, metrics()).expect("state opens")
}

/// A persistent session subscribed to `filter` (in shared `group` if given).
fn add_session(st: &BrokerState, client: &str, filter: &str, qos: QoS, group: Option<&str>) {
    let mut inner = st.lock();
    let recs = vec![
        Record::Session {
            client: client.into(),
            conn: without_secrets(&conn(client)),
            created_at: 1,
            fresh: true,
        },
        Record::Sub {
            client: client.into(),
            filter: filter.into(),
            opts: opts(qos, group),
        },
    ];
    assert!(st.record(&mut inner, recs));
}

fn from() -> From {
    From::from_custom(id("gw"))
}

/// (topic, payload) of each undone message for `target`, oldest first.
fn undone(st: &BrokerState, target: &Target) -> Vec<(String, String)> {
    let inner = st.lock();
    let d = &inner.data;
    d.pending
        .get(target)
        .map(|q| {
            q.iter()
                .map(|s| {
                    let p = &d.msgs[s].publish;
                    (
                        p.topic.to_string(),
                        String::from_utf8_lossy(&p.payload).into_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn client(c: &str) -> Target {
    Target::Client(c.into())
}

#[test]
fn undone_messages_survive_a_reopen_and_acknowledged_ones_do_not() {
    let dir = tempfile::tempdir().unwrap();
    {
        let st = open(dir.path());
        add_session(&st, "hist", "plant/#", QoS::AtLeastOnce, None);
        for i in 0..5 {
            let p = publish("plant/a", &i.to_string(), QoS::AtLeastOnce);
            assert!(st.publish(&from(), "gw", &p));
        }
        // Not for a persistent subscriber: nothing kept.
        assert!(st.publish(&from(), "gw", &publish("other/x", "9", QoS::AtLeastOnce)));
        // QoS 0 is never kept.
        assert!(st.publish(&from(), "gw", &publish("plant/a", "q0", QoS::AtMostOnce)));
        // Acknowledged out of order: 1 and 3.
        st.settled("hist", &publish("plant/a", "1", QoS::AtLeastOnce));
        st.settled("hist", &publish("plant/a", "3", QoS::AtLeastOnce));
        // Another client's acknowledgement settles nothing of this one.
        st.settled("someone", &publish("plant/a", "0", QoS::AtLeastOnce));
        assert_eq!(st.metrics.messages.get(), 3);
    }
    let st = open(dir.path());
    let want: Vec<(String, String)> = ["0", "2", "4"]
        .iter()
        .map(|v| ("plant/a".to_owned(), v.to_string()))
        .collect();
    assert_eq!(undone(&st, &client("hist")), want);
    let inner = st.lock();
    let s = &inner.data.sessions["hist"];
    assert_eq!(s.subs.len(), 1);
    assert_eq!(s.subs[0].0, "plant/#");
    // Credentials are not kept on disk.
    match &*s.conn {
        ConnectInfo::V3(_, c) => assert_eq!(c.password, None),
        ConnectInfo::V5(..) => panic!("a 3.1.1 connection came back as 5"),
    }
    drop(inner);
    let files: Vec<u8> = std::fs::read_dir(dir.path())
        .unwrap()
        .flat_map(|e| std::fs::read(e.unwrap().path()).unwrap_or_default())
        .collect();
    assert!(
        !files.windows(9).any(|w| w == b"secret-pw"),
        "a password reached the state directory"
    );
}

#[test]
fn a_shared_group_is_settled_by_any_member_and_a_forgotten_session_drops_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let st = open(dir.path());
    add_session(&st, "a", "plant/#", QoS::AtLeastOnce, Some("g"));
    add_session(&st, "b", "plant/#", QoS::AtLeastOnce, Some("g"));
    add_session(&st, "c", "plant/+", QoS::ExactlyOnce, None);
    assert!(st.publish(&from(), "gw", &publish("plant/x", "1", QoS::AtLeastOnce)));
    let group = Target::Group {
        group: "g".into(),
        filter: "plant/#".into(),
    };
    // One entry for the group (not one per member), one for c.
    assert_eq!(undone(&st, &group).len(), 1);
    assert_eq!(undone(&st, &client("c")).len(), 1);
    // An acknowledgement of a client outside the group (a clean session, or one subscribed
    // without the group) settles nothing of the group's.
    st.settled("someone", &publish("plant/x", "1", QoS::AtLeastOnce));
    add_session(&st, "d", "plant/#", QoS::AtLeastOnce, None);
    st.settled("d", &publish("plant/x", "1", QoS::AtLeastOnce));
    assert_eq!(undone(&st, &group).len(), 1);
    st.forget("d");
    st.settled("b", &publish("plant/x", "1", QoS::AtLeastOnce));
    assert!(undone(&st, &group).is_empty());
    assert_eq!(st.metrics.messages.get(), 1, "c has not acknowledged yet");
    st.forget("c");
    assert_eq!(st.metrics.messages.get(), 0);
    assert_eq!(st.metrics.sessions.get(), 2);
    drop(st);
    let st = open(dir.path());
    assert_eq!(st.lock().data.sessions.len(), 2);
    assert!(st.lock().data.msgs.is_empty());
}

#[test]
fn compaction_keeps_exactly_the_live_state_and_a_torn_tail_or_a_cut_snapshot_is_survived() {
    let dir = tempfile::tempdir().unwrap();
    {
        let st = open(dir.path());
        add_session(&st, "hist", "plant/#", QoS::AtLeastOnce, None);
        let mut retained = publish("plant/status", "up", QoS::AtLeastOnce);
        retained.retain = true;
        assert!(st.publish(&from(), "gw", &retained));
        st.lock().compact_at = 4096;
        st.lock().compact_min = 4096;
        // 99 left undone: the per-subscriber limit (100) is never reached.
        for i in 0..1980 {
            let p = publish("plant/v", &i.to_string(), QoS::AtLeastOnce);
            assert!(st.publish(&from(), "gw", &p));
            if i % 20 != 7 {
                st.settled("hist", &p);
            }
        }
        let base = st.lock().writer.base();
        assert!(base > 10, "compacted only {base} times");
        let segments = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "state"))
            })
            .count();
        assert_eq!(segments, 1, "old segments are deleted");
    }
    let check = |st: &BrokerState| {
        let got = undone(st, &client("hist"));
        let want: Vec<(String, String)> = (0..1980)
            .filter(|i| i % 20 == 7)
            .map(|i| ("plant/v".to_owned(), i.to_string()))
            .collect();
        assert_eq!(got, want);
        let inner = st.lock();
        assert_eq!(
            inner.data.retained.keys().collect::<Vec<_>>(),
            ["plant/status"]
        );
    };
    check(&open(dir.path()));

    // A write a crash cut short at the end of the newest segment.
    let newest = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "state"))
        .max()
        .unwrap();
    let mut bytes = std::fs::read(&newest).unwrap();
    bytes.extend_from_slice(&[0x53, 0x42, 0x58, 0x4e, 0xff, 0xff]);
    std::fs::write(&newest, &bytes).unwrap();
    check(&open(dir.path()));

    // A compaction the crash interrupted: a newer segment without its snapshot's end.
    let base: u64 = newest
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .unwrap();
    let cut = dir.path().join(format!("{:020}.state", base + 1));
    let format = Format {
        magic: 0x4e58_4253,
        extension: "state",
        max_body: 1 << 20,
    };
    let mut buf = Vec::new();
    encode(&format, &mut buf, &Record::Begin);
    std::fs::write(&cut, &buf).unwrap();
    check(&open(dir.path()));
    assert!(!cut.exists(), "the cut snapshot is removed");
}

#[test]
fn a_full_subscriber_lets_its_oldest_go_counted() {
    let dir = tempfile::tempdir().unwrap();
    let st = open(dir.path());
    add_session(&st, "hist", "plant/#", QoS::AtLeastOnce, None);
    for i in 0..150 {
        let p = publish("plant/v", &i.to_string(), QoS::AtLeastOnce);
        assert!(st.publish(&from(), "gw", &p));
    }
    let got = undone(&st, &client("hist"));
    assert_eq!(got.len(), 100);
    assert_eq!(got[0].1, "50");
    assert_eq!(st.metrics.overflow.get(), 50);
}

#[test]
fn a_state_of_another_format_is_refused_with_the_place() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    let seg = dir.path().join(format!("{:020}.state", 0));
    let format = Format {
        magic: 0x4e58_4253,
        extension: "state",
        max_body: 1 << 20,
    };
    let mut buf = std::fs::read(&seg).unwrap();
    format
        .encode(&mut buf, |e| e.bytes(&[250, 250, 250]))
        .unwrap();
    std::fs::write(&seg, &buf).unwrap();
    let e = BrokerState::open(dir.path(), 1 << 20, 100, Duration::ZERO, metrics())
        .err()
        .expect("an undecodable record is refused");
    let text = e.to_string();
    assert!(
        text.starts_with("broker.state_dir: ") && text.contains("does not decode"),
        "{text}"
    );
}

/// With a sync interval, an acknowledgement is applied at once but written with the next
/// record, at the next sync, or when the state closes. A crash before that sends the message
/// again (a repeat, allowed at QoS 1); nothing unacknowledged is ever lost.
#[test]
fn an_acknowledgement_is_written_with_the_next_record_or_sync_and_a_crash_only_repeats() {
    let dir = tempfile::tempdir().unwrap();
    let open_synced = || {
        BrokerState::open(
            dir.path(),
            1 << 20,
            100,
            Duration::from_millis(100),
            metrics(),
        )
        .expect("state opens")
    };
    let values = |vs: &[&str]| -> Vec<(String, String)> {
        vs.iter()
            .map(|v| ("plant/a".to_owned(), v.to_string()))
            .collect()
    };
    let ack = |st: &BrokerState, v: &str| {
        st.settled("hist", &publish("plant/a", v, QoS::AtLeastOnce));
    };
    // A crash: the process ends without writing what it kept back.
    let crash = |st: BrokerState| {
        st.lock().deferred.clear();
        drop(st);
    };
    {
        let st = open_synced();
        add_session(&st, "hist", "plant/#", QoS::AtLeastOnce, None);
        for i in 0..5 {
            assert!(st.publish(
                &from(),
                "gw",
                &publish("plant/a", &i.to_string(), QoS::AtLeastOnce)
            ));
        }
        ack(&st, "1");
        // Applied at once.
        assert_eq!(undone(&st, &client("hist")), values(&["0", "2", "3", "4"]));
        assert!(
            !st.lock().deferred.is_empty(),
            "kept back, not written on its own"
        );
        // The next record takes it along.
        assert!(st.publish(&from(), "gw", &publish("plant/a", "5", QoS::AtLeastOnce)));
        assert!(st.lock().deferred.is_empty());
        ack(&st, "3");
        crash(st);
    }
    {
        let st = open_synced();
        // 1 went out with 5; 3 was lost in the crash and comes back: a repeat, not a loss.
        assert_eq!(
            undone(&st, &client("hist")),
            values(&["0", "2", "3", "4", "5"])
        );
        ack(&st, "0");
        st.sync();
        crash(st);
    }
    {
        let st = open_synced();
        // The sync wrote 0.
        assert_eq!(undone(&st, &client("hist")), values(&["2", "3", "4", "5"]));
        ack(&st, "2");
        // A broker that stops writes what it kept back.
        drop(st);
    }
    let st = open_synced();
    assert_eq!(undone(&st, &client("hist")), values(&["3", "4", "5"]));
}
