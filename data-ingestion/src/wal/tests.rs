//! The log as its users drive it: appends acked in order, read back, trimmed; restarts; a
//! full log; a directory in use.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use tokio::sync::mpsc;

use super::format;
use super::*;
use crate::model::{Frame, Point};
use nexus_common::domain::ValueType;

fn point(i: usize) -> Point {
    Point {
        topic: format!("a/b/t{}", i % 7),
        ts_us: 1_700_000_000_000_000 + i as i64,
        value: (!i.is_multiple_of(3)).then_some(i as f64 * 0.5),
        value_str: i.is_multiple_of(3).then(|| format!("s{i}")),
        quality: 192,
        value_type: Some(if i.is_multiple_of(3) {
            ValueType::String
        } else {
            ValueType::Float
        }),
        unit: i.is_multiple_of(2).then(|| "bar".to_owned()),
        source_ts_us: None,
    }
}

fn opts(dir: &Path, max: u64, seg: u64) -> WalOptions {
    WalOptions {
        dir: dir.to_path_buf(),
        max_size: max,
        segment_size: seg,
        fsync: false,
    }
}

async fn collect(rx: &mut mpsc::Receiver<Frame>, rows: usize) -> Vec<Frame> {
    let mut out = Vec::new();
    let mut n = 0;
    while n < rows {
        let f = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("frames in time")
            .expect("reader alive");
        n += f.rows();
        out.push(f);
    }
    out
}

#[tokio::test]
async fn appends_are_acked_in_order_read_back_and_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, start) = Wal::open(opts(dir.path(), 1 << 20, 16 * 1024), None).unwrap();
    assert_eq!(start, 1);
    let (atx, arx) = mpsc::channel(16);
    let (ktx, mut krx) = mpsc::unbounded_channel();
    let (ftx, mut frx) = mpsc::channel(4);
    let w = wal.spawn_writer(arx, ktx).unwrap();
    let r = wal.spawn_reader(start, ftx).unwrap();
    for i in 0..2000 {
        atx.send(Append {
            points: vec![point(i)],
            rejects: vec![],
            token: i,
        })
        .await
        .unwrap();
    }
    let mut acked = Vec::new();
    while acked.len() < 2000 {
        acked.extend(krx.recv().await.unwrap());
    }
    assert_eq!(acked, (0..2000).collect::<Vec<_>>());
    let frames = collect(&mut frx, 2000).await;
    let got: Vec<Point> = frames.iter().flat_map(|f| f.points.clone()).collect();
    assert_eq!(got, (0..2000).map(point).collect::<Vec<_>>());
    let segs = wal.lock().segments.clone();
    assert!(segs.len() > 1, "segments rolled: {segs:?}");
    let last = frames.last().unwrap().last_id;
    wal.commit_below(last + 1);
    assert_eq!(
        wal.lock().segments.len(),
        1,
        "all but the open segment trimmed"
    );
    assert_eq!(wal.pending_frames(), 0);
    drop(atx);
    w.join().unwrap();
    wal.close();
    r.join().unwrap();
    drop(wal);
    // A restart starts after what was committed.
    let (_wal, start) = Wal::open(opts(dir.path(), 1 << 20, 16 * 1024), None).unwrap();
    assert_eq!(start, last + 1);
}

/// A log the previous version left (a frame of body version 1) reads through after the
/// upgrade, and new frames follow it in the same segment.
#[tokio::test]
async fn frames_of_the_previous_version_are_read_after_an_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join(format!("{:020}.wal", 7)),
        format::frame_v1(),
    )
    .unwrap();
    let registry = prometheus::Registry::new();
    let metrics = WalMetrics::new(&registry).unwrap();
    let (wal, start) =
        Wal::open(opts(dir.path(), 1 << 20, 64 * 1024), Some(metrics.clone())).unwrap();
    assert_eq!(start, 7);
    let (atx, arx) = mpsc::channel(16);
    let (ktx, mut krx) = mpsc::unbounded_channel();
    let (ftx, mut frx) = mpsc::channel(4);
    let w = wal.spawn_writer(arx, ktx).unwrap();
    let r = wal.spawn_reader(start, ftx).unwrap();
    atx.send(Append {
        points: vec![point(2)],
        rejects: vec![],
        token: 0,
    })
    .await
    .unwrap();
    assert_eq!(krx.recv().await.unwrap(), vec![0]);
    let frames = collect(&mut frx, 5).await;
    assert_eq!(
        frames.iter().map(|f| f.first_id).collect::<Vec<_>>(),
        [7, 8]
    );
    let old: Vec<(&str, Option<f64>, Option<ValueType>)> = frames[0]
        .points
        .iter()
        .map(|p| (p.topic.as_str(), p.value, p.value_type))
        .collect();
    assert_eq!(
        old,
        [
            ("a/t", Some(21.5), None),
            ("a/s", None, None),
            ("a/n", None, None)
        ]
    );
    assert_eq!(frames[0].rejects.len(), 1);
    assert_eq!(frames[1].points, vec![point(2)]);
    assert_eq!(metrics.corrupt.get(), 0);
    assert_eq!(metrics.torn_frames.get(), 0);
    drop(atx);
    w.join().unwrap();
    wal.close();
    r.join().unwrap();
}

#[test]
fn a_directory_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = Wal::open(opts(dir.path(), 1 << 20, 64 * 1024), None).unwrap();
    let e = Wal::open(opts(dir.path(), 1 << 20, 64 * 1024), None)
        .err()
        .unwrap();
    assert!(e.to_string().contains("in use by another"), "{e}");
    drop(wal);
    assert!(Wal::open(opts(dir.path(), 1 << 20, 64 * 1024), None).is_ok());
}

#[tokio::test]
async fn restart_replays_uncommitted_and_cuts_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (wal, _) = Wal::open(opts(dir.path(), 1 << 20, 64 * 1024), None).unwrap();
        let (atx, arx) = mpsc::channel(16);
        let (ktx, mut krx) = mpsc::unbounded_channel();
        let w = wal.spawn_writer(arx, ktx).unwrap();
        for i in 0..500 {
            atx.send(Append {
                points: vec![point(i)],
                rejects: vec![],
                token: (),
            })
            .await
            .unwrap();
        }
        let mut n = 0;
        while n < 500 {
            n += krx.recv().await.unwrap().len();
        }
        drop(atx);
        w.join().unwrap();
        wal.commit_below(3); // frames 1 and 2 are committed
        wal.close();
    }
    // A crash in the middle of a write leaves half a frame.
    let mut segs: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    segs.sort();
    let last = segs.last().unwrap();
    let mut f = OpenOptions::new().append(true).open(last).unwrap();
    let mut half = Vec::new();
    format::encode(&mut half, 9999, 0, &[point(1)], &[]).unwrap();
    f.write_all(&half[..half.len() / 2]).unwrap();
    drop(f);

    let registry = prometheus::Registry::new();
    let metrics = WalMetrics::new(&registry).unwrap();
    let (wal, start) =
        Wal::open(opts(dir.path(), 1 << 20, 64 * 1024), Some(metrics.clone())).unwrap();
    assert_eq!(start, 3);
    // The cut is counted.
    assert_eq!(metrics.torn_frames.get(), 1);
    assert_eq!(metrics.torn_bytes.get(), (half.len() / 2) as u64);
    let (ftx, mut frx) = mpsc::channel(4);
    let r = wal.spawn_reader(start, ftx).unwrap();
    let frames = collect(&mut frx, 1).await;
    assert_eq!(frames[0].first_id, 3);
    let mut rows: usize = frames.iter().map(Frame::rows).sum();
    let mut last_id = frames.last().unwrap().last_id;
    while last_id < wal.lock().durable_id() {
        let f = frx.recv().await.unwrap();
        rows += f.rows();
        last_id = f.last_id;
    }
    // Frames 1 and 2 hold the rows acked first; the torn frame is gone.
    let skipped = 500 - rows;
    assert!(skipped > 0 && skipped < 500, "skipped {skipped}");
    assert!(tokio::time::timeout(Duration::from_millis(300), frx.recv())
        .await
        .is_err());
    wal.close();
    r.join().unwrap();
    // New frames continue after the recovered ones.
    assert_eq!(wal.lock().next_id, last_id + 1);
    assert_eq!(metrics.corrupt.get(), 0);
}

fn reject(reason: String) -> crate::model::Reject {
    crate::model::Reject {
        ts_us: 1,
        topic: "t/q".into(),
        reason,
        payload: b"{}".to_vec(),
    }
}

/// The frame that used to be lost whole: good points sharing it with a reject whose reason
/// is 1,400 bytes of 'é' (the old encoding cut it at 1,024 bytes, mid-character, and the
/// frame failed to decode). Every row reads back, then again after a restart.
#[tokio::test]
async fn a_long_unicode_reason_costs_no_other_row() {
    let dir = tempfile::tempdir().unwrap();
    let registry = prometheus::Registry::new();
    let metrics = WalMetrics::new(&registry).unwrap();
    let (wal, start) =
        Wal::open(opts(dir.path(), 1 << 20, 64 * 1024), Some(metrics.clone())).unwrap();
    let (atx, arx) = mpsc::channel(16);
    let (ktx, mut krx) = mpsc::unbounded_channel();
    // Queue everything before the writer starts, so it is all one frame.
    let bad = format!("bad_quality: {}", "é".repeat(700));
    for i in 0..3 {
        let rejects = if i == 1 {
            vec![reject(bad.clone())]
        } else {
            vec![]
        };
        atx.send(Append {
            points: (i * 10..i * 10 + 10).map(point).collect(),
            rejects,
            token: i,
        })
        .await
        .unwrap();
    }
    let w = wal.spawn_writer(arx, ktx).unwrap();
    assert_eq!(
        krx.recv().await.unwrap(),
        vec![0, 1, 2],
        "one frame, acked in order"
    );
    drop(atx);
    w.join().unwrap();
    let (ftx, mut frx) = mpsc::channel(4);
    let r = wal.spawn_reader(start, ftx).unwrap();
    let frames = collect(&mut frx, 31).await;
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].points, (0..30).map(point).collect::<Vec<_>>());
    assert_eq!(frames[0].rejects, vec![reject(bad.clone())]);
    assert_eq!(metrics.corrupt.get(), 0);
    wal.close();
    r.join().unwrap();
    drop(wal);
    let (wal, start) =
        Wal::open(opts(dir.path(), 1 << 20, 64 * 1024), Some(metrics.clone())).unwrap();
    assert_eq!(metrics.torn_frames.get(), 0);
    let (ftx, mut frx) = mpsc::channel(4);
    let r = wal.spawn_reader(start, ftx).unwrap();
    let again = collect(&mut frx, 31).await;
    assert_eq!(again, frames, "replayed the same after a restart");
    wal.close();
    r.join().unwrap();
}

/// Files of the previous WAL format do not stop ingestion: the newest is cut at open and an
/// older one is skipped by the reader, both counted.
#[tokio::test]
async fn old_format_files_are_counted_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let mut old = 0x4e58_5731u32.to_le_bytes().to_vec(); // the old magic, "NXW1"
    old.extend_from_slice(&[24, 0, 0, 0, 1, 2, 3, 4]);
    old.extend_from_slice(&[0; 24]);
    fs::write(dir.path().join(format!("{:020}.wal", 1)), &old).unwrap();
    fs::write(dir.path().join(format!("{:020}.wal", 5)), &old).unwrap();
    fs::write(dir.path().join("committed"), "1\n").unwrap();
    let registry = prometheus::Registry::new();
    let metrics = WalMetrics::new(&registry).unwrap();
    let (wal, start) =
        Wal::open(opts(dir.path(), 1 << 20, 64 * 1024), Some(metrics.clone())).unwrap();
    assert_eq!(start, 1);
    assert_eq!(
        (metrics.torn_frames.get(), metrics.torn_bytes.get()),
        (1, old.len() as u64)
    );
    let (ftx, mut frx) = mpsc::channel(4);
    let r = wal.spawn_reader(start, ftx).unwrap();
    // The old segment's ids are passed over as one empty stand-in frame.
    let gap = tokio::time::timeout(Duration::from_secs(10), frx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((gap.first_id, gap.last_id, gap.rows()), (1, 4, 0));
    assert_eq!(metrics.corrupt.get(), 1);
    // New data goes on from there.
    let (atx, arx) = mpsc::channel(16);
    let (ktx, mut krx) = mpsc::unbounded_channel();
    let w = wal.spawn_writer(arx, ktx).unwrap();
    atx.send(Append {
        points: vec![point(1)],
        rejects: vec![],
        token: (),
    })
    .await
    .unwrap();
    krx.recv().await.unwrap();
    let f = collect(&mut frx, 1).await;
    assert_eq!((f[0].first_id, f[0].points.clone()), (5, vec![point(1)]));
    drop(atx);
    w.join().unwrap();
    wal.close();
    r.join().unwrap();
}

#[tokio::test]
async fn a_full_log_holds_acks_until_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, start) = Wal::open(opts(dir.path(), 128 * 1024, 64 * 1024), None).unwrap();
    let (atx, arx) = mpsc::channel(4);
    let (ktx, mut krx) = mpsc::unbounded_channel();
    let (ftx, mut frx) = mpsc::channel(1000);
    let w = wal.spawn_writer(arx, ktx).unwrap();
    let r = wal.spawn_reader(start, ftx).unwrap();
    let big = |i: usize| Append {
        points: (0..100).map(|j| point(i * 100 + j)).collect(),
        rejects: vec![],
        token: i,
    };
    let sender = tokio::spawn(async move {
        for i in 0..100 {
            if atx.send(big(i)).await.is_err() {
                break;
            }
        }
        atx
    });
    // Without commits the log fills and acks stop well short of 100 appends.
    let mut acked = 0;
    while let Ok(Some(v)) = tokio::time::timeout(Duration::from_millis(500), krx.recv()).await {
        acked += v.len();
    }
    assert!(acked > 0 && acked < 100, "acked {acked}");
    assert!(wal.bytes() <= 128 * 1024);
    // Committing what was read frees space and the rest comes through.
    let mut committed = start;
    while acked < 100 {
        while let Ok(f) = frx.try_recv() {
            committed = f.last_id + 1;
        }
        wal.commit_below(committed);
        if let Ok(Some(v)) = tokio::time::timeout(Duration::from_millis(100), krx.recv()).await {
            acked += v.len();
        }
    }
    let atx = sender.await.unwrap();
    drop(atx);
    w.join().unwrap();
    wal.close();
    r.join().unwrap();
}
