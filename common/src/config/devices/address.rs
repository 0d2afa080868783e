//! Tag addresses: Modbus (`HR:100`, `HR:100.3`, `CO:0`) and Siemens S7 (`DB10.DBD4`,
//! `M0.1`, `IW2`), parsed and checked against the data type.

use super::DataType;

/// Modbus register tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModbusTable {
    Coil,
    DiscreteInput,
    InputRegister,
    HoldingRegister,
}

/// A parsed Modbus address: table, 0-based protocol address, optional bit in a register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModbusAddress {
    pub table: ModbusTable,
    pub address: u16,
    pub bit: Option<u8>,
}

/// S7 memory areas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum S7Area {
    /// Process inputs (`I`).
    Input,
    /// Process outputs (`Q`).
    Output,
    /// Flags / bit memory (`M`).
    Merker,
    /// A data block (`DB<n>`).
    Db(u16),
}

/// A parsed S7 address: `DB10.DBX2.3`, `DB10.DBB1`, `DB10.DBW2`, `DB10.DBD4`, `M20.1`, `MB20`,
/// `MW20`, `MD20`, `I0.1`, `IB0`, `IW0`, `ID0`, `Q0.0`, `QB0`, `QW0`, `QD0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct S7Address {
    pub area: S7Area,
    /// Byte offset in the area.
    pub byte: u32,
    /// Bit 0-7 for `X` (and `M20.1`-style) addresses.
    pub bit: Option<u8>,
    /// Bytes the size letter names: 0 for a bit, 1 for `B`, 2 for `W`, 4 for `D`.
    pub width: u8,
}

impl S7Address {
    pub fn parse(s: &str) -> Result<S7Address, String> {
        let bad = |why: &str| {
            format!("invalid S7 address {s:?}: {why} (expected e.g. DB10.DBD4, DB10.DBX2.3, MW20, M20.1, I0.1, Q0.0, IB0)")
        };
        let t = s.trim().to_ascii_uppercase();
        let (area, rest) = if let Some(r) = t.strip_prefix("DB") {
            let (n, r) = r
                .split_once('.')
                .ok_or_else(|| bad("a data block address is DB<n>.DB<X|B|W|D><byte>"))?;
            let n: u16 = n
                .parse()
                .map_err(|_| bad("the data block number must be 1-65535"))?;
            if n == 0 {
                return Err(bad("the data block number must be 1-65535"));
            }
            let r = r
                .strip_prefix("DB")
                .ok_or_else(|| bad("after DB<n>. comes DBX, DBB, DBW or DBD"))?;
            (S7Area::Db(n), r.to_owned())
        } else {
            let mut c = t.chars();
            let area = match c.next() {
                Some('M') => S7Area::Merker,
                Some('I') | Some('E') => S7Area::Input,
                Some('Q') | Some('A') => S7Area::Output,
                _ => return Err(bad("unknown area; use DB, M, I or Q")),
            };
            let r = c.as_str();
            // `M20.1` is a bit without the X.
            let r = if r.starts_with(|ch: char| ch.is_ascii_digit()) {
                format!("X{r}")
            } else {
                r.to_owned()
            };
            (area, r)
        };
        let mut c = rest.chars();
        let width = match c.next() {
            Some('X') => 0,
            Some('B') => 1,
            Some('W') => 2,
            Some('D') => 4,
            _ => return Err(bad("the size letter must be X, B, W or D")),
        };
        let rest = c.as_str();
        let (byte, bit) = match (width, rest.split_once('.')) {
            (0, Some((b, bit))) => (b, Some(bit)),
            (0, None) => return Err(bad("a bit address needs .<bit> (0-7)")),
            (_, Some(_)) => return Err(bad("only X (bit) addresses take .<bit>")),
            (_, None) => (rest, None),
        };
        let byte: u32 = byte
            .parse()
            .map_err(|_| bad("the byte offset must be a number"))?;
        if byte > 0x1F_FFFF {
            return Err(bad("the byte offset is above 2097151"));
        }
        let bit = match bit {
            None => None,
            Some(b) => match b.parse::<u8>() {
                Ok(b) if b <= 7 => Some(b),
                _ => return Err(bad("the bit must be 0-7")),
            },
        };
        Ok(S7Address {
            area,
            byte,
            bit,
            width,
        })
    }

    /// Bytes a value of `dt` occupies from this address (strings: 2 header bytes + `length`).
    pub fn size(&self, dt: DataType, length: u16) -> u32 {
        match dt {
            DataType::Bool => 1,
            DataType::Byte => 1,
            DataType::Int | DataType::Word => 2,
            DataType::Dint | DataType::Dword | DataType::Real => 4,
            DataType::Lreal => 8,
            DataType::String => 2 + u32::from(length),
            _ => u32::from(self.width.max(1)),
        }
    }

    /// Whether the size letter fits the data type.
    pub fn check_type(&self, dt: DataType) -> Result<(), String> {
        let ok = match dt {
            DataType::Bool => self.width == 0,
            DataType::Byte => self.width == 1,
            DataType::Int | DataType::Word => self.width == 2,
            DataType::Dint | DataType::Dword | DataType::Real => self.width == 4,
            DataType::Lreal => matches!(self.width, 1 | 4),
            DataType::String => self.width == 1,
            _ => false,
        };
        if ok {
            return Ok(());
        }
        let want = match dt {
            DataType::Bool => "an X (bit) address, e.g. DB1.DBX0.0 or M0.0",
            DataType::Byte => "a B address, e.g. DB1.DBB0 or MB0",
            DataType::Int | DataType::Word => "a W address, e.g. DB1.DBW0 or MW0",
            DataType::Dint | DataType::Dword | DataType::Real => {
                "a D address, e.g. DB1.DBD0 or MD0"
            }
            DataType::Lreal => "a B or D address of its first byte, e.g. DB1.DBD0",
            DataType::String => "a B address of its first byte, e.g. DB1.DBB0",
            _ => "an S7 data type",
        };
        Err(format!("{dt:?} needs {want}").to_lowercase())
    }
}

impl ModbusAddress {
    pub fn parse(s: &str) -> Result<ModbusAddress, String> {
        let bad = || {
            format!("invalid Modbus address {s:?}: expected HR:<n>, IR:<n>, CO:<n> or DI:<n>, with .<bit> (0-15) for a bit of a register")
        };
        let (prefix, rest) = s.split_once(':').ok_or_else(bad)?;
        let table = match prefix.trim().to_ascii_uppercase().as_str() {
            "HR" => ModbusTable::HoldingRegister,
            "IR" => ModbusTable::InputRegister,
            "CO" => ModbusTable::Coil,
            "DI" => ModbusTable::DiscreteInput,
            _ => return Err(bad()),
        };
        let (addr, bit) = match rest.split_once('.') {
            Some((a, b)) => (a, Some(b)),
            None => (rest, None),
        };
        let address: u32 = addr.trim().parse().map_err(|_| bad())?;
        let address =
            u16::try_from(address).map_err(|_| format!("Modbus address {s:?} is above 65535"))?;
        let bit = match bit {
            None => None,
            Some(b) => {
                if matches!(table, ModbusTable::Coil | ModbusTable::DiscreteInput) {
                    return Err(format!(
                        "Modbus address {s:?}: coils and discrete inputs have no bits"
                    ));
                }
                let b: u8 = b.trim().parse().map_err(|_| bad())?;
                if b > 15 {
                    return Err(format!("Modbus address {s:?}: bit {b} is above 15"));
                }
                Some(b)
            }
        };
        Ok(ModbusAddress {
            table,
            address,
            bit,
        })
    }

    pub fn is_bit_table(&self) -> bool {
        matches!(self.table, ModbusTable::Coil | ModbusTable::DiscreteInput)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modbus_addresses() {
        assert_eq!(
            ModbusAddress::parse("HR:100").unwrap(),
            ModbusAddress {
                table: ModbusTable::HoldingRegister,
                address: 100,
                bit: None
            }
        );
        assert_eq!(ModbusAddress::parse("hr:100.3").unwrap().bit, Some(3));
        assert_eq!(
            ModbusAddress::parse("CO:0").unwrap().table,
            ModbusTable::Coil
        );
        assert!(ModbusAddress::parse("HR:70000")
            .unwrap_err()
            .contains("above 65535"));
        assert!(ModbusAddress::parse("HR:1.16")
            .unwrap_err()
            .contains("bit 16"));
        assert!(ModbusAddress::parse("CO:1.2")
            .unwrap_err()
            .contains("no bits"));
        assert!(ModbusAddress::parse("40001")
            .unwrap_err()
            .contains("expected HR:<n>"));
    }
}
