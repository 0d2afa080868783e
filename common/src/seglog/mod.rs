//! The segment log: checksummed frames appended to numbered files in one locked directory.
//! The ingestion WAL and the gateway's store-and-forward buffer both keep their data in one;
//! each keeps its own state on top (frame ids and a commit position; a FIFO read position)
//! and uses this for everything that touches the disk. Why it is written here rather than
//! taken from a crate: `docs/adr/0005-segment-log.md`.
//!
//! * **Frame** ([`Format`]): `[magic u32][len u32][crc32c u32][body]`, little endian; the
//!   CRC-32C covers the length and the body. Each log has its own magic, so data from
//!   another log or an older format fails like a torn tail.
//! * **Body** ([`Encoder`], [`Decoder`]): fixed-width numbers, strings and byte fields behind
//!   a u32 length. A field is written whole or the frame is refused; nothing is ever cut, so
//!   a frame that passes its checksum decodes. Decoding errors are a small enum, on any input.
//! * **Segments** ([`SegmentDir`]): files `<number:020>.<extension>`; what the number means
//!   (first frame id, sequence) is the user's. [`SegmentWriter::append`] writes whole frames
//!   and `fdatasync`s before it returns; creating or deleting a segment `fsync`s the
//!   directory.
//! * **Recovery**: at open the newest segment (or all, [`Verify::All`]) is read through and
//!   cut at its first frame that does not check out: a write a crash interrupted, or damage.
//!   The returned [`Recovery`] says where, how many bytes and how many frames (whole valid
//!   frames found after the bad one are counted apart: they had been durable).
//! * **Lock**: `<dir>/lock` is held locked while open; a second process gets
//!   [`Error::Locked`] naming the directory.
//! * **State files** ([`SegmentDir::write_state`]): a commit or read position, replaced
//!   atomically (tmp file, fsync, rename, fsync of the directory).

mod cursor;
mod dir;
mod frame;
mod segment;

use std::path::PathBuf;

pub use cursor::{DecodeError, Decoder, Encoder};
pub use dir::{Cut, Options, Recovery, Segment, SegmentDir, Verify};
pub use frame::{Format, FrameError, HEADER};
pub use segment::{SegmentReader, SegmentWriter};

/// What can go wrong with a segment directory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{} is in use by another process (its lock file is held); give each instance its own directory", dir.display())]
    Locked { dir: PathBuf },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: bad frame at offset {offset}: {error}", path.display())]
    Frame {
        path: PathBuf,
        offset: u64,
        error: FrameError,
    },
}

#[cfg(test)]
mod tests;
