//! One segment file: appended to by a [`SegmentWriter`], read frame by frame by a
//! [`SegmentReader`] (which may follow a file another thread is appending to).

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::frame::{Format, FrameError, HEADER};
use super::Error;

/// The end of a segment open for appending.
#[derive(Debug)]
pub struct SegmentWriter {
    file: File,
    path: PathBuf,
    base: u64,
    len: u64,
    fsync: bool,
}

impl SegmentWriter {
    pub(crate) fn new(file: File, path: PathBuf, base: u64, len: u64, fsync: bool) -> Self {
        SegmentWriter {
            file,
            path,
            base,
            len,
            fsync,
        }
    }

    /// The segment's number.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Bytes of whole frames in the segment.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Write whole encoded frames after the last ones and make them durable (`fdatasync`)
    /// before returning. On an error nothing counts as written: the next append goes at the
    /// same place, over whatever part of these bytes reached the file.
    pub fn append(&mut self, frames: &[u8]) -> Result<(), Error> {
        self.put(frames, self.fsync)
    }

    /// [`SegmentWriter::append`] without the `fdatasync`: the frames are in the operating
    /// system's cache, so they survive the process (a kill, a crash) but not a power loss
    /// until [`SegmentWriter::sync_handle`]'s file is synced.
    pub fn write(&mut self, frames: &[u8]) -> Result<(), Error> {
        self.put(frames, false)
    }

    /// A second handle on the segment's file, to `fdatasync` it from another thread without
    /// holding the writer.
    pub fn sync_handle(&self) -> Result<File, Error> {
        self.file.try_clone().map_err(|source| Error::Io {
            path: self.path.clone(),
            source,
        })
    }

    fn put(&mut self, frames: &[u8], sync: bool) -> Result<(), Error> {
        let res = (|| {
            // One positioned write (pwrite), not a seek and a write: every record of the
            // broker's state, the gateway's buffer and the WAL comes through here.
            std::os::unix::fs::FileExt::write_all_at(&self.file, frames, self.len)?;
            if sync {
                self.file.sync_data()?;
            }
            io::Result::Ok(())
        })();
        match res {
            Ok(()) => {
                self.len += frames.len() as u64;
                Ok(())
            }
            Err(source) => {
                // Best effort: a reader must not meet a half-written frame past `len`.
                let _ = self.file.set_len(self.len);
                Err(Error::Io {
                    path: self.path.clone(),
                    source,
                })
            }
        }
    }
}

/// Read as much of `buf` as the file holds: the count read (short only at the end of data).
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Frames of one segment, from an offset on.
#[derive(Debug)]
pub struct SegmentReader {
    r: BufReader<File>,
    path: PathBuf,
    format: Format,
    offset: u64,
    body: Vec<u8>,
}

impl SegmentReader {
    pub(crate) fn open(path: &Path, format: Format, offset: u64) -> Result<Self, Error> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(io)?;
        file.seek(SeekFrom::Start(offset)).map_err(io)?;
        Ok(SegmentReader {
            r: BufReader::with_capacity(1 << 20, file),
            path: path.to_path_buf(),
            format,
            offset,
            body: Vec::new(),
        })
    }

    /// Offset of the next frame.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Continue at `offset` (after a bad frame, say).
    pub fn seek(&mut self, offset: u64) -> Result<(), Error> {
        self.r
            .seek(SeekFrom::Start(offset))
            .map_err(|source| Error::Io {
                path: self.path.clone(),
                source,
            })?;
        self.offset = offset;
        Ok(())
    }

    /// The next frame's body; `Ok(None)` where the data ends on a frame boundary. A frame
    /// that does not check out is [`Error::Frame`], and the reader stays before it.
    ///
    /// Reading where a writer is appending is fine up to the end of its last append: a frame
    /// still being written reads as `Truncated`, and can be read again later.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, Error> {
        let start = self.offset;
        let mut head = [0u8; HEADER];
        let n = match read_full(&mut self.r, &mut head) {
            Ok(n) => n,
            Err(e) => return Err(self.fail(start, self.io(e))),
        };
        if n == 0 {
            return Ok(None);
        }
        let (len, sum) = match self.format.header(&head[..n]) {
            Ok(h) => h,
            Err(error) => return Err(self.fail(start, self.frame(start, error))),
        };
        self.body.clear();
        // `take` + `read_to_end` grows the buffer with the data actually there, so a damaged
        // length cannot make it allocate `max_body` up front.
        let got = match (&mut self.r)
            .take(u64::from(len))
            .read_to_end(&mut self.body)
        {
            Ok(got) => got,
            Err(e) => return Err(self.fail(start, self.io(e))),
        };
        let checked = if got < len as usize {
            Err(FrameError::Truncated)
        } else {
            Format::verify(len, sum, &self.body)
        };
        if let Err(error) = checked {
            return Err(self.fail(start, self.frame(start, error)));
        }
        self.offset = start + HEADER as u64 + u64::from(len);
        Ok(Some(&self.body))
    }

    /// Go back before the frame that failed (the caller decides whether to skip it or wait
    /// for it), and hand back `error`.
    fn fail(&mut self, start: u64, error: Error) -> Error {
        if let Err(e) = self.seek(start) {
            return e;
        }
        error
    }

    fn frame(&self, offset: u64, error: FrameError) -> Error {
        Error::Frame {
            path: self.path.clone(),
            offset,
            error,
        }
    }

    fn io(&self, source: io::Error) -> Error {
        Error::Io {
            path: self.path.clone(),
            source,
        }
    }
}
