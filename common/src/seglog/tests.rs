//! The directory and its files: lock, recovery of torn and damaged tails, state files, a
//! reader following a writer.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;

use proptest::prelude::*;

use super::*;

const F: Format = Format {
    magic: 0x3154_5853, // "SXT1"
    extension: "seg",
    max_body: 1 << 20,
};

fn opts(verify: Verify) -> Options {
    Options {
        format: F,
        verify,
        fsync: false,
    }
}

fn encode(bodies: &[String]) -> (Vec<u8>, Vec<usize>) {
    let mut out = Vec::new();
    let mut ends = Vec::new();
    for b in bodies {
        F.encode(&mut out, |e| e.str(b)).unwrap();
        ends.push(out.len());
    }
    (out, ends)
}

fn read_all(dir: &SegmentDir, base: u64) -> Vec<String> {
    let mut r = dir.reader(base, 0).unwrap();
    let mut out = Vec::new();
    while let Some(body) = r.next_frame().unwrap() {
        let mut d = Decoder::new(body);
        out.push(d.str().unwrap().to_owned());
        d.finish().unwrap();
    }
    out
}

fn bodies(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("frame {i} {}", "é".repeat(i * 7)))
        .collect()
}

#[test]
fn a_locked_directory_is_refused_with_its_name() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, segs, rec) = SegmentDir::open(tmp.path(), opts(Verify::Newest)).unwrap();
    assert!(segs.is_empty() && rec.is_clean());
    let e = SegmentDir::open(tmp.path(), opts(Verify::Newest)).unwrap_err();
    assert!(matches!(e, Error::Locked { .. }), "{e}");
    let text = e.to_string();
    assert!(text.contains(&tmp.path().display().to_string()), "{text}");
    assert!(text.contains("in use by another process"), "{text}");
    drop(dir);
    assert!(SegmentDir::open(tmp.path(), opts(Verify::Newest)).is_ok());
}

#[test]
fn appends_roll_read_back_and_remove() {
    let tmp = tempfile::tempdir().unwrap();
    let all = bodies(6);
    {
        let (dir, _, _) = SegmentDir::open(tmp.path(), opts(Verify::Newest)).unwrap();
        let mut w = dir.create(1).unwrap();
        w.append(&encode(&all[..3]).0).unwrap();
        assert!(
            dir.create(1).is_err(),
            "a segment with data is never created twice"
        );
        // An empty file of a create whose directory sync failed is taken over on retry.
        fs::write(dir.segment_path(2), b"").unwrap();
        drop(dir.create(2).unwrap());
        dir.remove(&[2]).unwrap();
        let mut w2 = dir.create(4).unwrap();
        w2.append(&encode(&all[3..5]).0).unwrap();
        drop(w2);
        // Continue the newest after a restart of the writer.
        let mut w2 = dir.append_to(4, encode(&all[3..5]).0.len() as u64).unwrap();
        w2.append(&encode(&all[5..]).0).unwrap();
        assert_eq!(w.base(), 1);
    }
    let (dir, segs, rec) = SegmentDir::open(tmp.path(), opts(Verify::All)).unwrap();
    assert!(rec.is_clean(), "{rec:?}");
    assert_eq!(
        segs.iter().map(|s| (s.base, s.frames)).collect::<Vec<_>>(),
        vec![(1, Some(3)), (4, Some(3))]
    );
    assert_eq!(read_all(&dir, 1), all[..3]);
    assert_eq!(read_all(&dir, 4), all[3..]);
    dir.remove(&[1, 99]).unwrap();
    assert!(!dir.segment_path(1).exists());
    // Other files in the directory are not segments.
    fs::write(tmp.path().join("notes.txt"), "x").unwrap();
    fs::write(tmp.path().join("12.seg.tmp"), "x").unwrap();
    drop(dir);
    let (_, segs, _) = SegmentDir::open(tmp.path(), opts(Verify::Newest)).unwrap();
    assert_eq!(segs.iter().map(|s| s.base).collect::<Vec<_>>(), vec![4]);
}

/// Write `data` as segment 7 of a fresh directory and open it.
fn open_with(tmp: &Path, data: &[u8], verify: Verify) -> (SegmentDir, Vec<Segment>, Recovery) {
    let _ = fs::remove_dir_all(tmp);
    fs::create_dir_all(tmp).unwrap();
    fs::write(tmp.join(format!("{:020}.seg", 7)), data).unwrap();
    SegmentDir::open(tmp, opts(verify)).unwrap()
}

#[test]
fn a_tail_torn_at_every_offset_keeps_every_whole_frame_and_reports_the_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("log");
    let all = bodies(5);
    let (data, ends) = encode(&all);
    for cut in 0..=data.len() {
        let (dir, segs, rec) = open_with(&path, &data[..cut], Verify::Newest);
        let whole = ends.iter().filter(|e| **e <= cut).count();
        let boundary = if whole == 0 { 0 } else { ends[whole - 1] };
        assert_eq!(segs[0].frames, Some(whole as u64), "cut {cut}");
        assert_eq!(segs[0].bytes, boundary as u64, "cut {cut}");
        if cut == boundary {
            assert!(rec.is_clean(), "cut {cut}: {rec:?}");
        } else {
            let c = rec.cuts[0];
            assert_eq!(
                (c.segment, c.offset, c.bytes, c.frames(), c.whole_frames),
                (7, boundary as u64, (cut - boundary) as u64, 1, 0),
                "cut {cut}"
            );
            assert_eq!(c.error, FrameError::Truncated, "cut {cut}");
        }
        assert_eq!(read_all(&dir, 7), all[..whole], "cut {cut}");
        let len = fs::metadata(dir.segment_path(7)).unwrap().len();
        assert_eq!(len, boundary as u64, "the file itself is cut");
    }
}

#[test]
fn old_or_foreign_data_is_cut_and_counted_not_fatal() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("log");
    // The gateway buffer's old records: `[len u32][fnv u32][topic len u16]...`.
    let old = [9u8, 0, 0, 0, 1, 2, 3, 4, 1, 0, b'a', 1, 2, 3, 4, 5, 6];
    let _ = fs::remove_dir_all(&path);
    fs::create_dir_all(&path).unwrap();
    // Named with the old padding: taken in under the canonical name.
    fs::write(path.join(format!("{:016}.seg", 7)), old).unwrap();
    let (dir, segs, rec) = SegmentDir::open(&path, opts(Verify::Newest)).unwrap();
    assert_eq!(segs[0].base, 7);
    assert!(dir.segment_path(7).exists());
    assert_eq!(segs[0].bytes, 0);
    assert_eq!(rec.bytes(), old.len() as u64);
    assert_eq!(rec.frames(), 1);
    assert!(matches!(rec.cuts[0].error, FrameError::BadMagic(9)));
    drop(dir);
    // A frame of another log (other magic) counts the same way.
    let other = Format {
        magic: 0x1234_5678,
        ..F
    };
    let mut data = Vec::new();
    other.encode(&mut data, |e| e.str("x")).unwrap();
    let (_, segs, rec) = open_with(&path, &data, Verify::Newest);
    assert_eq!((segs[0].bytes, rec.frames()), (0, 1));
}

#[test]
fn verify_all_cuts_older_segments_newest_only_leaves_them() {
    let tmp = tempfile::tempdir().unwrap();
    let all = bodies(3);
    let (data, ends) = encode(&all);
    fs::write(
        tmp.path().join(format!("{:020}.seg", 1)),
        &data[..ends[1] + 3],
    )
    .unwrap();
    fs::write(tmp.path().join(format!("{:020}.seg", 2)), &data).unwrap();
    {
        let (_, segs, rec) = SegmentDir::open(tmp.path(), opts(Verify::Newest)).unwrap();
        assert!(rec.is_clean());
        assert_eq!(segs[0].frames, None);
        assert_eq!(segs[0].bytes, ends[1] as u64 + 3);
    }
    let (_, segs, rec) = SegmentDir::open(tmp.path(), opts(Verify::All)).unwrap();
    assert_eq!(segs[0].frames, Some(2));
    assert_eq!(segs[0].bytes, ends[1] as u64);
    assert_eq!((rec.cuts[0].segment, rec.bytes()), (1, 3));
}

#[test]
fn whole_frames_after_a_bad_one_are_counted_as_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("log");
    let all = bodies(5);
    let (mut data, ends) = encode(&all);
    // Damage the checksum of frame 1 (0-based): frames 2, 3, 4 are whole but cut with it.
    data[ends[0] + 9] ^= 0xff;
    let (dir, segs, rec) = open_with(&path, &data, Verify::Newest);
    assert_eq!(segs[0].frames, Some(1));
    let c = rec.cuts[0];
    assert_eq!(c.error, FrameError::BadChecksum);
    assert_eq!((c.whole_frames, c.frames()), (3, 4));
    assert_eq!(c.bytes, (data.len() - ends[0]) as u64);
    assert_eq!(read_all(&dir, 7), all[..1]);
}

#[test]
fn state_files_are_replaced_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, _, _) = SegmentDir::open(
        tmp.path(),
        Options {
            fsync: true,
            ..opts(Verify::Newest)
        },
    )
    .unwrap();
    assert_eq!(dir.read_state("committed").unwrap(), None);
    dir.write_state("committed", "41\n").unwrap();
    dir.write_state("committed", "42\n").unwrap();
    assert_eq!(
        dir.read_state("committed").unwrap().as_deref(),
        Some("42\n")
    );
    assert!(!tmp.path().join("committed.tmp").exists());
}

#[test]
fn a_reader_follows_a_writer_and_waits_at_a_frame_being_written() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, _, _) = SegmentDir::open(tmp.path(), opts(Verify::Newest)).unwrap();
    let mut w = dir.create(1).unwrap();
    let mut r = dir.reader(1, 0).unwrap();
    assert_eq!(r.next_frame().unwrap(), None);
    let (one, _) = encode(&bodies(1));
    w.append(&one).unwrap();
    assert!(r.next_frame().unwrap().is_some());
    // Half a frame written (by hand; the writer never leaves one): not readable yet, and
    // the reader stays before it.
    let (two, _) = encode(&["second".to_owned()]);
    let mut f = OpenOptions::new()
        .append(true)
        .open(dir.segment_path(1))
        .unwrap();
    f.write_all(&two[..5]).unwrap();
    let at = r.offset();
    assert!(matches!(
        r.next_frame(),
        Err(Error::Frame {
            error: FrameError::Truncated,
            ..
        })
    ));
    assert_eq!(r.offset(), at);
    // The writer puts the frame where its last append ended, over the partial bytes.
    w.append(&two).unwrap();
    let body = r.next_frame().unwrap().unwrap().to_vec();
    assert_eq!(Decoder::new(&body).str().unwrap(), "second");
    assert_eq!(r.next_frame().unwrap(), None);
}

fn arb_bodies() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(any::<String>(), 1..8)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any single flipped byte in a written segment is found at open: what reads back is
    /// exactly the frames before the damaged one, never a different frame, and the cut says
    /// how many whole frames went with it.
    #[test]
    fn a_flipped_byte_in_a_segment_is_detected(all in arb_bodies(), at in any::<prop::sample::Index>(), mask in 1u8..=255) {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("log");
        let (mut data, ends) = encode(&all);
        let i = at.index(data.len());
        data[i] ^= mask;
        let damaged = ends.iter().position(|e| i < *e).unwrap();
        let (dir, segs, rec) = open_with(&path, &data, Verify::Newest);
        prop_assert_eq!(read_all(&dir, 7), all[..damaged].to_vec());
        prop_assert_eq!(segs[0].frames, Some(damaged as u64));
        prop_assert_eq!(rec.cuts.len(), 1);
        let start = if damaged == 0 { 0 } else { ends[damaged - 1] };
        prop_assert_eq!(rec.cuts[0].offset, start as u64);
        prop_assert_eq!(rec.cuts[0].bytes, (data.len() - start) as u64);
        prop_assert_eq!(rec.cuts[0].whole_frames, (all.len() - damaged - 1) as u64);
    }

    /// A tail torn anywhere keeps every frame before it and reports the rest.
    #[test]
    fn a_torn_tail_keeps_every_complete_frame(all in arb_bodies(), at in any::<prop::sample::Index>()) {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("log");
        let (data, ends) = encode(&all);
        let cut = at.index(data.len() + 1);
        let whole = ends.iter().filter(|e| **e <= cut).count();
        let boundary = if whole == 0 { 0 } else { ends[whole - 1] };
        let (dir, _, rec) = open_with(&path, &data[..cut], Verify::Newest);
        prop_assert_eq!(read_all(&dir, 7), all[..whole].to_vec());
        prop_assert_eq!(rec.bytes(), (cut - boundary) as u64);
        prop_assert_eq!(rec.frames(), u64::from(cut != boundary));
    }
}
