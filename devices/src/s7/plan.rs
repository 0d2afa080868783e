//! S7 read planning in two steps. At compile time a device's tags are merged into byte
//! ranges of one area (tags at most `max_gap` unused bytes apart share a range). At read
//! time, once the PLC has granted its PDU size, the ranges are packed into ReadVar requests:
//! up to [`proto::MAX_ITEMS`] items each, with the request and its reply both within the PDU;
//! a range larger than a PDU is split into several items (and requests), and a range that
//! does not fit the room left in a request is split to fill it.

use nexus_common::config::S7Area;

use super::proto::{self, Item};

/// Unused bytes between two tags that a range may span to merge them.
pub const MAX_GAP: u32 = 16;
/// A range is split to fill a request only when at least this many bytes fit.
const MIN_SPLIT: usize = 16;

/// Consecutive bytes of one area read together, and the tags in them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub area: S7Area,
    pub start: u32,
    pub len: u32,
    /// (tag index, offset from `start`, bytes).
    pub slots: Vec<(usize, u32, u32)>,
}

/// A piece of a range read as one item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub range: usize,
    pub offset: u32,
    pub len: u16,
}

/// The wire area code and data block number of an area.
pub fn area_code(a: S7Area) -> (u8, u16) {
    match a {
        S7Area::Input => (proto::AREA_INPUT, 0),
        S7Area::Output => (proto::AREA_OUTPUT, 0),
        S7Area::Merker => (proto::AREA_MERKER, 0),
        S7Area::Db(n) => (proto::AREA_DB, n),
    }
}

/// Merge tags `(index, area, byte, size)` into ranges.
pub fn ranges(tags: &[(usize, S7Area, u32, u32)], max_gap: u32) -> Vec<Range> {
    let mut sorted = tags.to_vec();
    sorted.sort_by_key(|&(i, area, byte, _)| (area, byte, i));
    let mut out: Vec<Range> = Vec::new();
    for (tag, area, byte, size) in sorted {
        let size = size.max(1);
        if let Some(r) = out.last_mut() {
            let end = r.start + r.len;
            if r.area == area && byte <= end.saturating_add(max_gap) {
                r.len = end.max(byte + size) - r.start;
                r.slots.push((tag, byte - r.start, size));
                continue;
            }
        }
        out.push(Range {
            area,
            start: byte,
            len: size,
            slots: vec![(tag, 0, size)],
        });
    }
    out
}

/// The item reading `chunk`.
pub fn item(ranges: &[Range], c: &Chunk) -> Item {
    let r = &ranges[c.range];
    let (area, db) = area_code(r.area);
    Item {
        area,
        db,
        byte: r.start + c.offset,
        bit: None,
        len: c.len,
    }
}

/// Pack `ranges` into requests for a PLC that granted `pdu` bytes.
pub fn pack(ranges: &[Range], pdu: u16) -> Vec<Vec<Chunk>> {
    let pdu = usize::from(pdu);
    let max_items = proto::MAX_ITEMS.min((pdu.saturating_sub(proto::read_request_size(0))) / 12);
    let max_items = max_items.max(1);
    // The most data one item can carry: a reply with only that item.
    let max_data = pdu
        .saturating_sub(proto::read_reply_size(&[]))
        .saturating_sub(4);
    let max_data = (max_data & !1).max(2);
    let mut out: Vec<Vec<Chunk>> = Vec::new();
    let mut cur: Vec<Chunk> = Vec::new();
    let mut cur_items: Vec<Item> = Vec::new();
    for (ri, r) in ranges.iter().enumerate() {
        let mut offset = 0u32;
        while offset < r.len {
            let left = (r.len - offset) as usize;
            let mut len = left.min(max_data);
            if cur.len() >= max_items {
                out.push(std::mem::take(&mut cur));
                cur_items.clear();
            }
            if !cur.is_empty() {
                // Room left in the reply for one more item (header 4, a fill byte before it).
                let used = proto::read_reply_size(&cur_items) + 1;
                let room = pdu.saturating_sub(used + 4) & !1;
                if len > room {
                    if room >= MIN_SPLIT {
                        len = room;
                    } else {
                        out.push(std::mem::take(&mut cur));
                        cur_items.clear();
                    }
                }
            }
            let c = Chunk {
                range: ri,
                offset,
                len: len as u16,
            };
            cur_items.push(item(ranges, &c));
            cur.push(c);
            offset += len as u32;
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn neighbours_merge_within_the_gap_and_areas_stay_apart() {
        let tags = [
            (0, S7Area::Db(1), 0, 4),
            (1, S7Area::Db(1), 4, 2),
            (2, S7Area::Db(1), 20, 4), // 14 bytes after the end of tag 1: merged
            (3, S7Area::Db(1), 100, 2),
            (4, S7Area::Db(2), 0, 2),
            (5, S7Area::Merker, 2, 1),
            (6, S7Area::Merker, 2, 1), // another bit of the same byte
        ];
        let r = ranges(&tags, MAX_GAP);
        assert_eq!(r.len(), 4, "{r:?}");
        assert_eq!((r[0].area, r[0].start, r[0].len), (S7Area::Merker, 2, 1));
        assert_eq!(r[0].slots.len(), 2);
        assert_eq!((r[1].start, r[1].len), (0, 24));
        assert_eq!(r[1].slots, vec![(0, 0, 4), (1, 4, 2), (2, 20, 4)]);
        assert_eq!((r[2].start, r[2].len), (100, 2));
        assert_eq!(r[3].area, S7Area::Db(2));
    }

    #[test]
    fn a_range_larger_than_the_pdu_is_split() {
        let r = ranges(&[(0, S7Area::Db(5), 0, 1000)], MAX_GAP);
        let p = pack(&r, 240);
        let total: u32 = p.iter().flatten().map(|c| u32::from(c.len)).sum();
        assert_eq!(total, 1000);
        for req in &p {
            let items: Vec<Item> = req.iter().map(|c| item(&r, c)).collect();
            assert!(proto::read_reply_size(&items) <= 240);
        }
        assert_eq!(p.len(), 5, "222 bytes a reply at PDU 240");
    }

    #[test]
    fn many_small_tags_share_requests() {
        // 100 ints 100 bytes apart in one DB: 100 ranges, 20 items a request at PDU 480.
        let tags: Vec<_> = (0..100)
            .map(|i| (i, S7Area::Db(1), i as u32 * 100, 2))
            .collect();
        let r = ranges(&tags, MAX_GAP);
        assert_eq!(r.len(), 100);
        assert_eq!(pack(&r, 480).len(), 5);
        // At PDU 240 the request holds at most 19 item specs (12 + 2 + 19 * 12 = 240).
        let p = pack(&r, 240);
        assert!(p.iter().all(|q| q.len() <= 19));
        assert_eq!(p.len(), 6);
    }

    proptest! {
        #[test]
        fn every_byte_once_within_the_pdu(
            tags in proptest::collection::vec((0u16..4, 0u32..3000, 1u32..300), 1..80),
            pdu in 240u16..961,
        ) {
            let tags: Vec<_> = tags.iter().enumerate().map(|(i, (db, b, s))| {
                (i, if *db == 0 { S7Area::Merker } else { S7Area::Db(*db) }, *b, *s)
            }).collect();
            let r = ranges(&tags, MAX_GAP);
            let mut seen: Vec<usize> = r.iter().flat_map(|x| x.slots.iter().map(|s| s.0)).collect();
            seen.sort();
            prop_assert_eq!(seen, (0..tags.len()).collect::<Vec<_>>());
            for x in &r {
                for &(t, off, size) in &x.slots {
                    prop_assert_eq!(x.area, tags[t].1);
                    prop_assert_eq!(x.start + off, tags[t].2);
                    prop_assert!(off + size <= x.len);
                }
            }
            let p = pack(&r, pdu);
            let mut covered = vec![0u32; r.len()];
            for req in &p {
                prop_assert!(!req.is_empty() && req.len() <= proto::MAX_ITEMS);
                let items: Vec<Item> = req.iter().map(|c| item(&r, c)).collect();
                prop_assert!(proto::read_reply_size(&items) <= usize::from(pdu));
                prop_assert!(proto::read_request_size(items.len()) <= usize::from(pdu));
                for c in req {
                    prop_assert_eq!(c.offset, covered[c.range]);
                    covered[c.range] += u32::from(c.len);
                }
            }
            for (i, x) in r.iter().enumerate() {
                prop_assert_eq!(covered[i], x.len);
            }
        }
    }
}
