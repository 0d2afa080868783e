//! The directory: its lock, its segment files, their recovery at open, and small state files
//! replaced atomically.

use std::fmt;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::frame::{Format, FrameError};
use super::segment::{SegmentReader, SegmentWriter};
use super::Error;

/// Which segments [`SegmentDir::open`] reads through and cuts at their first bad frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Only the newest, the one a crash can leave torn (a large log opens without reading
    /// all of itself; its reader meets any damage in older segments later).
    Newest,
    /// Every segment (a small log that counts its frames at open anyway).
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    pub format: Format,
    pub verify: Verify,
    /// `fdatasync` appends and `fsync` the directory and state files. Always on in service;
    /// tests of a log's logic may turn it off.
    pub fsync: bool,
}

/// A segment file found at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// The number in the file name.
    pub base: u64,
    /// Bytes of whole frames (after any cut).
    pub bytes: u64,
    /// Frames in it, for the segments read through at open ([`Verify`]).
    pub frames: Option<u64>,
}

/// One stretch cut off the end of a segment at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    pub segment: u64,
    /// Where the first bad frame started; the segment now ends here.
    pub offset: u64,
    pub bytes: u64,
    pub error: FrameError,
    /// Whole, valid frames found after the bad one and cut with it. Zero for a write a crash
    /// interrupted; more means frames that had been durable were lost.
    pub whole_frames: u64,
}

impl Cut {
    /// Frames lost: the bad one and the whole ones after it.
    pub fn frames(&self) -> u64 {
        1 + self.whole_frames
    }
}

/// What [`SegmentDir::open`] cut. The caller logs it and counts it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    pub cuts: Vec<Cut>,
}

impl Recovery {
    pub fn is_clean(&self) -> bool {
        self.cuts.is_empty()
    }

    pub fn bytes(&self) -> u64 {
        self.cuts.iter().map(|c| c.bytes).sum()
    }

    pub fn frames(&self) -> u64 {
        self.cuts.iter().map(Cut::frames).sum()
    }
}

impl fmt::Display for Cut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "segment {} cut at {} ({}): {} bytes, {} frames",
            self.segment,
            self.offset,
            self.error,
            self.bytes,
            self.frames()
        )
    }
}

/// An open, locked segment directory. Segment files are `<base:020>.<extension>`; other
/// files (the lock, state files) are left alone.
#[derive(Debug)]
pub struct SegmentDir {
    path: PathBuf,
    options: Options,
    /// Held locked while the directory is open, so two processes cannot share it.
    _lock: File,
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn sync_dir(path: &Path) -> Result<(), Error> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(io_at(path))
}

impl SegmentDir {
    /// Lock `path` (creating it), list its segments in order, and cut the newest (or every)
    /// segment at its first frame that does not check out.
    pub fn open(
        path: &Path,
        options: Options,
    ) -> Result<(SegmentDir, Vec<Segment>, Recovery), Error> {
        let existed = path.is_dir();
        fs::create_dir_all(path).map_err(io_at(path))?;
        if !existed && options.fsync {
            // A new directory's entry must be durable too, or a power loss could take the log
            // (and what it acknowledged) with it.
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
        let lock_path = path.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_at(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(Error::Locked {
                    dir: path.to_path_buf(),
                })
            }
            Err(TryLockError::Error(e)) => return Err(io_at(&lock_path)(e)),
        }
        let dir = SegmentDir {
            path: path.to_path_buf(),
            options,
            _lock: lock,
        };
        let suffix = format!(".{}", options.format.extension);
        let mut bases = Vec::new();
        let mut renamed = false;
        for entry in fs::read_dir(path).map_err(io_at(path))? {
            let Ok(entry) = entry else { continue };
            let name = entry.file_name();
            let Some(digits) = name.to_str().and_then(|n| n.strip_suffix(suffix.as_str())) else {
                continue;
            };
            if !digits.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Ok(base) = digits.parse::<u64>() else {
                continue;
            };
            // Segment paths are built from the number: a file named with other padding (an
            // older layout) gets the canonical name, unless that is taken.
            let canonical = dir.segment_path(base);
            if entry.path() != canonical {
                if canonical.exists() {
                    continue;
                }
                fs::rename(entry.path(), &canonical).map_err(io_at(&canonical))?;
                renamed = true;
            }
            bases.push(base);
        }
        if renamed && options.fsync {
            sync_dir(path)?;
        }
        bases.sort_unstable();
        bases.dedup();
        let mut segments = Vec::with_capacity(bases.len());
        let mut recovery = Recovery::default();
        for (i, &base) in bases.iter().enumerate() {
            let newest = i + 1 == bases.len();
            if newest || options.verify == Verify::All {
                let (seg, cut) = dir.recover(base)?;
                segments.push(seg);
                recovery.cuts.extend(cut);
            } else {
                let p = dir.segment_path(base);
                let bytes = fs::metadata(&p).map_err(io_at(&p))?.len();
                segments.push(Segment {
                    base,
                    bytes,
                    frames: None,
                });
            }
        }
        Ok((dir, segments, recovery))
    }

    /// Read a segment through; cut it at its first bad frame.
    fn recover(&self, base: u64) -> Result<(Segment, Option<Cut>), Error> {
        let path = self.segment_path(base);
        let mut r = SegmentReader::open(&path, self.options.format, 0)?;
        let mut frames = 0;
        let bad = loop {
            match r.next_frame() {
                Ok(Some(_)) => frames += 1,
                Ok(None) => break None,
                Err(Error::Frame { offset, error, .. }) => break Some((offset, error)),
                Err(e) => return Err(e),
            }
        };
        let mut seg = Segment {
            base,
            bytes: r.offset(),
            frames: Some(frames),
        };
        let Some((offset, error)) = bad else {
            return Ok((seg, None));
        };
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_at(&path))?;
        let mut rest = Vec::new();
        f.seek(SeekFrom::Start(offset))
            .and_then(|_| f.read_to_end(&mut rest))
            .map_err(io_at(&path))?;
        let whole_frames = self.options.format.count_whole_frames(&rest);
        f.set_len(offset).map_err(io_at(&path))?;
        if self.options.fsync {
            f.sync_all().map_err(io_at(&path))?;
        }
        seg.bytes = offset;
        Ok((
            seg,
            Some(Cut {
                segment: base,
                offset,
                bytes: rest.len() as u64,
                error,
                whole_frames,
            }),
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn segment_path(&self, base: u64) -> PathBuf {
        self.path
            .join(format!("{base:020}.{}", self.options.format.extension))
    }

    /// Start a new, empty segment. An empty file of that number (left by a create whose
    /// directory sync failed) is taken over; one with data is an error.
    pub fn create(&self, base: u64) -> Result<SegmentWriter, Error> {
        let path = self.segment_path(base);
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(io_at(&path))?;
                if f.metadata().map_err(io_at(&path))?.len() != 0 {
                    return Err(io_at(&path)(e));
                }
                f
            }
            Err(e) => return Err(io_at(&path)(e)),
        };
        if self.options.fsync {
            sync_dir(&self.path)?;
        }
        Ok(SegmentWriter::new(file, path, base, 0, self.options.fsync))
    }

    /// Continue a segment whose whole frames end at `len`; anything after it (what a failed
    /// write left) is dropped.
    pub fn append_to(&self, base: u64, len: u64) -> Result<SegmentWriter, Error> {
        let path = self.segment_path(base);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_at(&path))?;
        file.set_len(len).map_err(io_at(&path))?;
        Ok(SegmentWriter::new(
            file,
            path,
            base,
            len,
            self.options.fsync,
        ))
    }

    /// Read a segment's frames from `offset`.
    pub fn reader(&self, base: u64, offset: u64) -> Result<SegmentReader, Error> {
        SegmentReader::open(&self.segment_path(base), self.options.format, offset)
    }

    /// Delete segments (one already gone is fine), then make that durable.
    pub fn remove(&self, bases: &[u64]) -> Result<(), Error> {
        if bases.is_empty() {
            return Ok(());
        }
        for &base in bases {
            let path = self.segment_path(base);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_at(&path)(e)),
            }
        }
        if self.options.fsync {
            sync_dir(&self.path)?;
        }
        Ok(())
    }

    /// A small state file (`name` in the directory), or `None` when there is none.
    pub fn read_state(&self, name: &str) -> Result<Option<String>, Error> {
        let path = self.path.join(name);
        match fs::read_to_string(&path) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => Ok(None),
            Err(e) => Err(io_at(&path)(e)),
        }
    }

    /// Replace a small state file atomically: write `<name>.tmp`, fsync it, rename it over
    /// `name`, fsync the directory. A crash leaves the old contents or the new, never a mix.
    pub fn write_state(&self, name: &str, contents: &str) -> Result<(), Error> {
        let tmp = self.path.join(format!("{name}.tmp"));
        let path = self.path.join(name);
        let mut f = File::create(&tmp).map_err(io_at(&tmp))?;
        f.write_all(contents.as_bytes()).map_err(io_at(&tmp))?;
        if self.options.fsync {
            f.sync_all().map_err(io_at(&tmp))?;
        }
        drop(f);
        fs::rename(&tmp, &path).map_err(io_at(&path))?;
        if self.options.fsync {
            sync_dir(&self.path)?;
        }
        Ok(())
    }
}
