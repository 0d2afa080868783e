//! Read coalescing: a device's tags planned into as few requests as possible, within the
//! device's largest request and largest gap of unused registers merged in.

use nexus_common::config::{ModbusAddress, ModbusTable};

/// Limits of one device.
#[derive(Debug, Clone, Copy)]
pub struct PlanLimits {
    /// Registers per read (FC 03/04), at most 125.
    pub max_registers: u16,
    /// Bits per read (FC 01/02), at most 2000.
    pub max_bits: u16,
    /// Unused registers (or bits) a request may span to merge two tags.
    pub max_gap: u16,
}

impl Default for PlanLimits {
    fn default() -> Self {
        PlanLimits {
            max_registers: 125,
            max_bits: 2000,
            max_gap: 10,
        }
    }
}

/// Where one tag sits in a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Index of the tag in the device's tag list.
    pub tag: usize,
    /// Offset (registers or bits) from the request's start.
    pub offset: u16,
    pub count: u16,
    pub bit: Option<u8>,
}

/// One read request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRequest {
    pub table: ModbusTable,
    pub start: u16,
    pub count: u16,
    pub slots: Vec<Slot>,
}

/// A tag to plan: its index, address and size in registers (or bits).
#[derive(Debug, Clone, Copy)]
pub struct PlanItem {
    pub tag: usize,
    pub address: ModbusAddress,
    pub count: u16,
}

/// Plan the reads. Every item lands in exactly one request; requests never exceed the limits
/// (an item larger than the limit gets a request of its own, which the device will refuse
/// with an exception that marks only that tag bad).
pub fn plan(items: &[PlanItem], limits: PlanLimits) -> Vec<ReadRequest> {
    let mut sorted: Vec<PlanItem> = items.to_vec();
    let table_rank = |t: ModbusTable| match t {
        ModbusTable::Coil => 0,
        ModbusTable::DiscreteInput => 1,
        ModbusTable::HoldingRegister => 2,
        ModbusTable::InputRegister => 3,
    };
    sorted.sort_by_key(|i| (table_rank(i.address.table), i.address.address, i.tag));
    let mut out: Vec<ReadRequest> = Vec::new();
    for item in sorted {
        let start = u32::from(item.address.address);
        let end = start + u32::from(item.count.max(1));
        let max = if item.address.is_bit_table() {
            limits.max_bits
        } else {
            limits.max_registers
        };
        let merged = match out.last_mut() {
            Some(r) if r.table == item.address.table => {
                let r_start = u32::from(r.start);
                let r_end = r_start + u32::from(r.count);
                let new_end = r_end.max(end);
                if start <= r_end + u32::from(limits.max_gap) && new_end - r_start <= u32::from(max)
                {
                    r.count = (new_end - r_start) as u16;
                    r.slots.push(Slot {
                        tag: item.tag,
                        offset: (start - r_start) as u16,
                        count: item.count.max(1),
                        bit: item.address.bit,
                    });
                    true
                } else {
                    false
                }
            }
            _ => false,
        };
        if !merged {
            out.push(ReadRequest {
                table: item.address.table,
                start: item.address.address,
                count: item.count.max(1),
                slots: vec![Slot {
                    tag: item.tag,
                    offset: 0,
                    count: item.count.max(1),
                    bit: item.address.bit,
                }],
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn item(tag: usize, s: &str, count: u16) -> PlanItem {
        PlanItem {
            tag,
            address: ModbusAddress::parse(s).unwrap(),
            count,
        }
    }

    #[test]
    fn merges_neighbours_and_respects_gap() {
        let items = [
            item(0, "HR:0", 2),
            item(1, "HR:2", 2),
            item(2, "HR:10", 1),
            item(3, "HR:40", 4),
            item(4, "IR:0", 1),
        ];
        let p = plan(
            &items,
            PlanLimits {
                max_gap: 6,
                ..PlanLimits::default()
            },
        );
        assert_eq!(p.len(), 3, "{p:?}");
        assert_eq!((p[0].start, p[0].count), (0, 11));
        assert_eq!(
            p[0].slots
                .iter()
                .map(|s| (s.tag, s.offset))
                .collect::<Vec<_>>(),
            vec![(0, 0), (1, 2), (2, 10)]
        );
        assert_eq!((p[1].start, p[1].count), (40, 4));
        assert_eq!(p[2].table, ModbusTable::InputRegister);
    }

    #[test]
    fn respects_max_registers() {
        let items: Vec<PlanItem> = (0..100)
            .map(|i| item(i, &format!("HR:{}", i * 2), 2))
            .collect();
        let p = plan(
            &items,
            PlanLimits {
                max_registers: 50,
                max_bits: 2000,
                max_gap: 0,
            },
        );
        assert_eq!(p.len(), 4);
        assert!(p.iter().all(|r| r.count <= 50));
        let p = plan(&items, PlanLimits::default());
        assert_eq!(p.len(), 2, "200 registers in 125 + 75");
    }

    #[test]
    fn bits_of_one_register_share_it() {
        let items = [
            item(0, "HR:5.0", 1),
            item(1, "HR:5.7", 1),
            item(2, "HR:6", 1),
        ];
        let p = plan(&items, PlanLimits::default());
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].count, 2);
        assert_eq!(p[0].slots[1].bit, Some(7));
    }

    proptest! {
        #[test]
        fn every_tag_once_within_limits(addrs in proptest::collection::vec((0u16..2000, 1u16..5, 0u8..2), 1..200),
                                        max in 4u16..126, gap in 0u16..20) {
            let items: Vec<PlanItem> = addrs.iter().enumerate().map(|(i, (a, c, t))| PlanItem {
                tag: i,
                address: ModbusAddress { table: if *t == 0 { ModbusTable::HoldingRegister } else { ModbusTable::InputRegister }, address: *a, bit: None },
                count: *c,
            }).collect();
            let p = plan(&items, PlanLimits { max_registers: max, max_bits: 2000, max_gap: gap });
            let mut seen: Vec<usize> = p.iter().flat_map(|r| r.slots.iter().map(|s| s.tag)).collect();
            seen.sort();
            prop_assert_eq!(seen, (0..items.len()).collect::<Vec<_>>());
            for r in &p {
                prop_assert!(r.count <= max);
                for s in &r.slots {
                    let it = items[s.tag];
                    prop_assert_eq!(r.start + s.offset, it.address.address);
                    prop_assert!(s.offset + s.count <= r.count);
                    prop_assert_eq!(r.table, it.address.table);
                }
            }
        }
    }
}
