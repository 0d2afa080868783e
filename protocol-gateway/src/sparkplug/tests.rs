use super::*;
use nexus_common::Quality;

fn vo(v: Option<Value>, q: Quality, ts: i64) -> ValueObject {
    ValueObject {
        value: v,
        quality: q,
        ts_ms: Some(ts),
        source_ts_ms: None,
        unit: None,
    }
}

fn sample<'a>(device: &'a str, tag: &'a str, v: ValueObject) -> Sample<'a> {
    Sample {
        device,
        tag,
        value: std::borrow::Cow::Owned(v),
    }
}

fn decoded(out: &Out) -> (SparkplugTopic, SpPayload) {
    (
        SparkplugTopic::parse(&out.0).unwrap(),
        sparkplug::decode(&out.1).unwrap(),
    )
}

#[test]
fn uns_topics_split_into_device_and_tag() {
    assert_eq!(device_and_tag("a/b/c/plc-1/temp"), Some(("plc-1", "temp")));
    assert_eq!(device_and_tag("plc-1/temp"), Some(("plc-1", "temp")));
    assert_eq!(device_and_tag("temp"), None);
}

#[test]
fn births_then_data_by_alias_with_seq_across_the_node() {
    let mut n = EdgeNode::new("g", "edge", None);
    let will = decoded(&n.next_connection());
    assert_eq!(will.0.message_type, MessageType::NDeath);
    assert_eq!(
        will.1.metrics[0].value,
        Some(Value::Int(0)),
        "first bdSeq is 0"
    );
    assert_eq!(will.1.seq, None);

    let b = n.births();
    assert_eq!(b.len(), 1, "no device yet: NBIRTH only");
    let (t, nb) = decoded(&b[0]);
    assert_eq!(t.message_type, MessageType::NBirth);
    assert_eq!(nb.seq, Some(0));
    let names: Vec<_> = nb.metrics.iter().map(|m| m.name.clone().unwrap()).collect();
    assert_eq!(names, [BD_SEQ, REBIRTH]);
    assert_eq!(
        nb.metrics[0].value,
        Some(Value::Int(0)),
        "bdSeq of the will"
    );

    // First data of a device: its DBIRTH comes first, then DDATA by alias.
    let out = n.data(
        "plc-1",
        &[
            sample(
                "plc-1",
                "temp",
                vo(Some(Value::Float(21.5)), Quality::Good, 1000),
            ),
            sample(
                "plc-1",
                "run",
                vo(Some(Value::Bool(true)), Quality::Good, 1000),
            ),
        ],
        false,
    );
    assert_eq!(out.len(), 2);
    let (t, db) = decoded(&out[0]);
    assert_eq!(
        (t.message_type, t.device.as_deref()),
        (MessageType::DBirth, Some("plc-1"))
    );
    assert_eq!(db.seq, Some(1));
    assert_eq!(db.metrics.len(), 2);
    assert_eq!(db.metrics[0].name.as_deref(), Some("temp"));
    assert_eq!(db.metrics[0].datatype, Some(SpDataType::Double));
    assert_eq!(db.metrics[1].datatype, Some(SpDataType::Boolean));
    let (t, dd) = decoded(&out[1]);
    assert_eq!(t.message_type, MessageType::DData);
    assert_eq!(dd.seq, Some(2));
    assert!(dd.metrics.iter().all(|m| m.name.is_none()), "by alias only");
    assert_eq!(dd.metrics[0].alias, db.metrics[0].alias);
    assert_eq!(dd.metrics[0].value, Some(Value::Float(21.5)));
    assert_eq!(dd.metrics[0].timestamp, Some(1000));

    // Known metrics: DDATA alone; a bad value is null.
    let out = n.data(
        "plc-1",
        &[sample(
            "plc-1",
            "temp",
            vo(Some(Value::Float(22.0)), Quality::BadSensorFailure, 2000),
        )],
        false,
    );
    assert_eq!(out.len(), 1);
    let (_, dd) = decoded(&out[0]);
    assert_eq!(dd.seq, Some(3));
    assert_eq!(dd.metrics[0].value, None);

    // A rebirth: NBIRTH seq 0, the device's DBIRTH with its last value.
    let b = n.births();
    assert_eq!(b.len(), 2);
    assert_eq!(decoded(&b[0]).1.seq, Some(0));
    let (_, db) = decoded(&b[1]);
    assert_eq!(db.seq, Some(1));
    assert_eq!(db.metrics[0].value, None, "the last value sent was null");
    assert_eq!(db.metrics[1].value, Some(Value::Bool(true)));
}

#[test]
fn seq_wraps_after_255() {
    let mut n = EdgeNode::new("g", "edge", None);
    n.births();
    let mut last = 0;
    for i in 0..600 {
        let out = n.data(
            "d",
            &[sample("d", "t", vo(Some(Value::Int(i)), Quality::Good, i))],
            false,
        );
        let seq = decoded(out.last().unwrap()).1.seq.unwrap();
        if i > 0 {
            assert_eq!(seq, (last + 1) % 256);
        }
        last = seq;
    }
}

#[test]
fn a_new_metric_or_type_brings_a_new_dbirth_and_integers_widen_to_double() {
    let mut n = EdgeNode::new("g", "edge", None);
    n.births();
    n.data(
        "d",
        &[sample("d", "a", vo(Some(Value::Int(1)), Quality::Good, 1))],
        false,
    );
    // Same type: no DBIRTH.
    let out = n.data(
        "d",
        &[sample("d", "a", vo(Some(Value::Int(2)), Quality::Good, 2))],
        false,
    );
    assert_eq!(out.len(), 1);
    // A fraction: the metric becomes a Double, declared in a DBIRTH.
    let out = n.data(
        "d",
        &[sample(
            "d",
            "a",
            vo(Some(Value::Float(2.5)), Quality::Good, 3),
        )],
        false,
    );
    assert_eq!(out.len(), 2);
    let (_, db) = decoded(&out[0]);
    assert_eq!(db.metrics[0].datatype, Some(SpDataType::Double));
    // Back to an integer: sent as a Double, no DBIRTH.
    let out = n.data(
        "d",
        &[sample("d", "a", vo(Some(Value::Int(3)), Quality::Good, 4))],
        false,
    );
    assert_eq!(out.len(), 1);
    assert_eq!(decoded(&out[0]).1.metrics[0].value, Some(Value::Float(3.0)));
    // A new tag: DBIRTH with both, aliases unique across devices.
    let out = n.data(
        "d",
        &[sample("d", "b", vo(Some(Value::Int(3)), Quality::Good, 5))],
        false,
    );
    assert_eq!(out.len(), 2);
    let out2 = n.data(
        "e",
        &[sample("e", "a", vo(Some(Value::Int(3)), Quality::Good, 5))],
        false,
    );
    let aliases: Vec<u64> = [&out[0], &out2[0]]
        .iter()
        .flat_map(|o| decoded(o).1.metrics.into_iter().map(|m| m.alias.unwrap()))
        .collect();
    assert_eq!(aliases, [1, 2, 3]);
}

#[test]
fn historical_values_are_marked_and_do_not_become_the_births_value() {
    let mut n = EdgeNode::new("g", "edge", None);
    n.births();
    n.data(
        "d",
        &[sample(
            "d",
            "a",
            vo(Some(Value::Int(10)), Quality::Good, 10),
        )],
        false,
    );
    let out = n.data(
        "d",
        &[sample("d", "a", vo(Some(Value::Int(5)), Quality::Good, 5))],
        true,
    );
    let (_, dd) = decoded(&out[0]);
    assert!(dd.metrics[0].historical);
    let b = n.births();
    assert_eq!(decoded(&b[1]).1.metrics[0].value, Some(Value::Int(10)));
}

#[test]
fn bd_seq_is_kept_across_restarts_and_wraps() {
    let dir = tempfile::tempdir().unwrap();
    let mut n = EdgeNode::new("g", "edge", Some(dir.path()));
    n.next_connection();
    let (_, p) = decoded(&n.next_connection());
    assert_eq!(p.metrics[0].value, Some(Value::Int(1)));
    let mut n = EdgeNode::new("g", "edge", Some(dir.path()));
    let (_, p) = decoded(&n.next_connection());
    assert_eq!(
        p.metrics[0].value,
        Some(Value::Int(2)),
        "not reused after a restart"
    );
    std::fs::write(dir.path().join("bdseq"), "255").unwrap();
    let mut n = EdgeNode::new("g", "edge", Some(dir.path()));
    let (_, p) = decoded(&n.next_connection());
    assert_eq!(p.metrics[0].value, Some(Value::Int(0)), "wraps to 0");
}

#[test]
fn rebirth_requests_are_recognised() {
    let ask = |v: Value| {
        sparkplug::encode(&SpPayload {
            timestamp: Some(1),
            seq: None,
            metrics: vec![SpMetric {
                name: Some(REBIRTH.into()),
                datatype: Some(SpDataType::Boolean),
                value: Some(v),
                ..Default::default()
            }],
        })
        .unwrap()
    };
    assert!(EdgeNode::is_rebirth_request(&ask(Value::Bool(true))));
    assert!(!EdgeNode::is_rebirth_request(&ask(Value::Bool(false))));
    assert!(!EdgeNode::is_rebirth_request(b"garbage"));
}

fn dcmd(metrics: Vec<SpMetric>) -> Vec<u8> {
    sparkplug::encode(&SpPayload {
        timestamp: Some(1234),
        seq: None,
        metrics,
    })
    .unwrap()
}

#[test]
fn dcmd_metrics_are_resolved_by_name_or_by_the_births_aliases() {
    let mut n = EdgeNode::new("g", "edge", None);
    n.births();
    n.data(
        "d",
        &[
            sample("d", "a", vo(Some(Value::Int(1)), Quality::Good, 1)),
            sample("d", "sp", vo(Some(Value::Int(1)), Quality::Good, 1)),
        ],
        false,
    );
    let by_alias = dcmd(vec![SpMetric {
        alias: Some(2),
        datatype: Some(SpDataType::Int64),
        value: Some(Value::Int(42)),
        ..Default::default()
    }]);
    let (writes, ts) = n.dcmd_writes("d", &by_alias).unwrap();
    assert_eq!(writes, [("sp".to_owned(), Value::Int(42))]);
    assert_eq!(ts, Some(1234));
    let by_name = dcmd(vec![SpMetric {
        name: Some("a".into()),
        datatype: Some(SpDataType::Boolean),
        value: Some(Value::Bool(true)),
        ..Default::default()
    }]);
    assert_eq!(
        n.dcmd_writes("d", &by_name).unwrap().0,
        [("a".to_owned(), Value::Bool(true))]
    );
    // Refused, naming what is wrong.
    let unknown = dcmd(vec![SpMetric {
        alias: Some(99),
        datatype: Some(SpDataType::Int64),
        value: Some(Value::Int(1)),
        ..Default::default()
    }]);
    let e = n.dcmd_writes("d", &unknown).unwrap_err();
    assert!(e.contains("alias 99"), "{e}");
    assert!(
        n.dcmd_writes("other", &by_alias).is_err(),
        "another device's alias"
    );
    let null = dcmd(vec![SpMetric {
        name: Some("a".into()),
        datatype: Some(SpDataType::Int64),
        ..Default::default()
    }]);
    assert!(n.dcmd_writes("d", &null).unwrap_err().contains("no value"));
    assert!(n.dcmd_writes("d", &dcmd(vec![])).is_err());
    assert!(n.dcmd_writes("d", b"\xff\xff").is_err());

    // The write command: the same DCMD twice is the same request (executed once).
    let (topic, p1) = crate::publisher::dcmd_command(&n, "d", &by_alias).unwrap();
    let (_, p2) = crate::publisher::dcmd_command(&n, "d", &by_alias).unwrap();
    assert_eq!(topic, "$nexus/cmd/d/write");
    assert_eq!(p1, p2);
    let cmd: serde_json::Value = serde_json::from_slice(&p1).unwrap();
    assert_eq!(cmd["writes"][0]["tag_id"], "sp");
    assert_eq!(cmd["writes"][0]["value"], 42);
    assert_eq!(cmd["ts"], 1234);
    assert!(cmd["request_id"]
        .as_str()
        .unwrap()
        .starts_with("sparkplug-"));
    let (_, other) = crate::publisher::dcmd_command(&n, "d", &by_name).unwrap();
    let other: serde_json::Value = serde_json::from_slice(&other).unwrap();
    assert_ne!(other["request_id"], cmd["request_id"]);
}

#[test]
fn an_unreachable_device_dies_once_and_is_born_again_with_its_next_value() {
    let mut n = EdgeNode::new("g", "edge", None);
    n.births();
    let good = |v: i64| sample("d", "a", vo(Some(Value::Int(v)), Quality::Good, v));
    let gone = |q| sample("d", "a", vo(Some(Value::Int(1)), q, 5));
    n.data("d", &[good(1)], false);
    // Unreachable: DDEATH once, then nothing.
    let out = n.data("d", &[gone(Quality::BadCommFailure)], false);
    assert_eq!(out.len(), 1);
    let (t, p) = decoded(&out[0]);
    assert_eq!(t.message_type, MessageType::DDeath);
    assert!(p.seq.is_some() && p.metrics.is_empty());
    assert!(n
        .data("d", &[gone(Quality::BadNotConnected)], false)
        .is_empty());
    // A rebirth meanwhile leaves it out.
    assert_eq!(n.births().len(), 1, "NBIRTH only: the device is offline");
    // Back: DBIRTH with the new value, then DDATA.
    let out = n.data("d", &[good(7)], false);
    assert_eq!(out.len(), 2);
    let (t, db) = decoded(&out[0]);
    assert_eq!(t.message_type, MessageType::DBirth);
    assert_eq!(db.metrics[0].value, Some(Value::Int(7)));
    // Some bad tags are not a dead device: DDATA with a null.
    let out = n.data(
        "d",
        &[
            good(8),
            sample("d", "b", vo(None, Quality::BadDeviceFailure, 8)),
        ],
        false,
    );
    assert_eq!(
        decoded(out.last().unwrap()).0.message_type,
        MessageType::DData
    );
    // A device never heard from that cannot be read: nothing to say.
    assert!(n
        .data(
            "new",
            &[sample("new", "a", vo(None, Quality::BadCommFailure, 1))],
            false
        )
        .is_empty());
}

#[test]
fn each_sample_gets_its_own_metrics_alias_whatever_the_order_or_subset() {
    let mut n = EdgeNode::new("g", "edge", None);
    n.births();
    let tags = ["t0", "t1", "t2", "t3", "t4"];
    let poll = |n: &mut EdgeNode, order: &[usize]| {
        let samples: Vec<Sample<'_>> = order
            .iter()
            .map(|&i| {
                sample(
                    "plc-1",
                    tags[i],
                    vo(Some(Value::Int(i as i64)), Quality::Good, 1000),
                )
            })
            .collect();
        n.data("plc-1", &samples, false)
    };
    let out = poll(&mut n, &[0, 1, 2, 3, 4]);
    let (_, birth) = decoded(&out[0]);
    let alias_of: std::collections::HashMap<u64, i64> = birth
        .metrics
        .iter()
        .map(|m| {
            let i = m.name.as_deref().unwrap()[1..].parse().unwrap();
            (m.alias.unwrap(), i)
        })
        .collect();
    // In order, reversed, a subset skipping some, one alone: each value under its alias.
    for order in [
        &[0, 1, 2, 3, 4][..],
        &[4, 3, 2, 1, 0],
        &[1, 3, 4],
        &[2],
        &[0, 0, 4],
    ] {
        let out = poll(&mut n, order);
        assert_eq!(out.len(), 1, "{order:?}: known metrics, DDATA only");
        let (_, data) = decoded(&out[0]);
        let got: Vec<(i64, Option<Value>)> = data
            .metrics
            .iter()
            .map(|m| (alias_of[&m.alias.unwrap()], m.value.clone()))
            .collect();
        let want: Vec<(i64, Option<Value>)> = order
            .iter()
            .map(|&i| (i as i64, Some(Value::Int(i as i64))))
            .collect();
        assert_eq!(got, want, "{order:?}");
    }
}
