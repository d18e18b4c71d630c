//! Where a slide's bytes come from: anything that reads a byte range on request.
//!
//! A slide is read a range at a time, never whole: the header (the IFD chain and the tile
//! tables) through a small block cache, each tile with one read of exactly its bytes. The
//! workers' S3 source (ranged GETs) lives with the store code; here are the local file, bytes
//! in memory and a meter that counts requests and bytes for any source.

use std::io::{self, Read, Seek, SeekFrom};
use std::sync::atomic::{AtomicU64, Ordering};

/// Random-access reads of one object.
pub trait RangeRead: Send + Sync {
    /// The object's size in bytes.
    fn size(&self) -> u64;
    /// Exactly `len` bytes from `offset`; an error when the range passes the end.
    fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>>;
}

impl<T: RangeRead + ?Sized> RangeRead for &T {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        (**self).read_at(offset, len)
    }
}

impl<T: RangeRead + ?Sized> RangeRead for Box<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        (**self).read_at(offset, len)
    }
}

/// The error for a range past the end of the object.
pub fn past_end(offset: u64, len: usize, size: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("bytes {offset}..{} lie past the end of the file ({size} bytes)", offset.saturating_add(len as u64)),
    )
}

/// Checks a range against the size before anything is allocated for it.
pub fn check_range(offset: u64, len: usize, size: u64) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(past_end(offset, len, size)),
    }
}

/// A local file, read with positioned reads (no shared cursor, so tiles can be read from
/// several threads at once).
pub struct FileSource {
    file: std::fs::File,
    size: u64,
}

impl FileSource {
    pub fn open(path: &std::path::Path) -> io::Result<Self> {
        let file = std::fs::File::open(path)?;
        let size = file.metadata()?.len();
        Ok(Self { file, size })
    }
}

impl RangeRead for FileSource {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        check_range(offset, len, self.size)?;
        let mut buf = vec![0; len];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
}

/// Bytes in memory (tests, small files already read).
pub struct BytesSource(pub Vec<u8>);

impl RangeRead for BytesSource {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        check_range(offset, len, self.size())?;
        Ok(self.0[offset as usize..offset as usize + len].to_vec())
    }
}

/// Counts the requests made and bytes read through a source.
pub struct Metered<S> {
    inner: S,
    requests: AtomicU64,
    bytes: AtomicU64,
}

impl<S: RangeRead> Metered<S> {
    pub fn new(inner: S) -> Self {
        Self { inner, requests: AtomicU64::new(0), bytes: AtomicU64::new(0) }
    }
    /// (requests, bytes) so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.requests.load(Ordering::Relaxed), self.bytes.load(Ordering::Relaxed))
    }
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: RangeRead> RangeRead for Metered<S> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let out = self.inner.read_at(offset, len)?;
        self.bytes.fetch_add(out.len() as u64, Ordering::Relaxed);
        Ok(out)
    }
}

/// Bytes one header request fetches: IFD entries and small tag values are scattered over the
/// file's first kilobytes (and, in some writers, its end), so a block serves many of them.
pub const HEADER_BLOCK_BYTES: usize = 64 << 10;
/// Blocks the header cursor keeps.
const HEADER_BLOCKS: usize = 8;

/// `Read + Seek` over a [`RangeRead`] for the TIFF structure parser: small reads come from
/// cached aligned blocks, reads of a block or more (tile tables) are fetched as asked. Stops
/// with an error once `budget` bytes have been fetched, so a header that points everywhere
/// cannot make planning read a whole slide.
pub struct HeaderCursor<'a> {
    src: &'a dyn RangeRead,
    pos: u64,
    blocks: Vec<(u64, Vec<u8>)>,
    fetched: u64,
    budget: u64,
}

impl<'a> HeaderCursor<'a> {
    pub fn new(src: &'a dyn RangeRead, budget: u64) -> Self {
        Self { src, pos: 0, blocks: Vec::new(), fetched: 0, budget }
    }

    /// Bytes fetched from the source so far.
    pub fn fetched(&self) -> u64 {
        self.fetched
    }

    fn fetch(&mut self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.fetched += len as u64;
        if self.fetched > self.budget {
            return Err(io::Error::other(format!(
                "the header asks for more than {} bytes to be read (a slide's header is far smaller)",
                self.budget
            )));
        }
        self.src.read_at(offset, len)
    }

    fn block(&mut self, start: u64) -> io::Result<&[u8]> {
        if let Some(i) = self.blocks.iter().position(|(s, _)| *s == start) {
            let b = self.blocks.remove(i);
            self.blocks.push(b);
        } else {
            let len = (self.src.size() - start).min(HEADER_BLOCK_BYTES as u64) as usize;
            let data = self.fetch(start, len)?;
            if self.blocks.len() == HEADER_BLOCKS {
                self.blocks.remove(0);
            }
            self.blocks.push((start, data));
        }
        Ok(&self.blocks.last().expect("just pushed").1)
    }
}

impl Read for HeaderCursor<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let size = self.src.size();
        if self.pos >= size || buf.is_empty() {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(size - self.pos) as usize;
        if want >= HEADER_BLOCK_BYTES {
            let data = self.fetch(self.pos, want)?;
            buf[..want].copy_from_slice(&data);
            self.pos += want as u64;
            return Ok(want);
        }
        let block_start = self.pos - self.pos % HEADER_BLOCK_BYTES as u64;
        let at = (self.pos - block_start) as usize;
        let block = self.block(block_start)?;
        let n = want.min(block.len() - at);
        buf[..n].copy_from_slice(&block[at..at + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for HeaderCursor<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let size = self.src.size() as i128;
        let target = match to {
            SeekFrom::Start(p) => p as i128,
            SeekFrom::End(d) => size + d as i128,
            SeekFrom::Current(d) => self.pos as i128 + d as i128,
        };
        if target < 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "seek before the start of the file"));
        }
        self.pos = target.min(u64::MAX as i128) as u64;
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_cursor_reads_what_it_is_asked_within_its_budget() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let src = Metered::new(BytesSource(data.clone()));
        let mut c = HeaderCursor::new(&src, 1 << 20);
        let mut b = [0u8; 10];
        c.seek(SeekFrom::Start(70_000)).unwrap();
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b[..], &data[70_000..70_010]);
        c.seek(SeekFrom::Start(70_100)).unwrap();
        c.read_exact(&mut b).unwrap();
        assert_eq!(src.counts(), (1, HEADER_BLOCK_BYTES as u64), "one block served both reads");
        // A read across a block boundary, and a large one fetched as asked.
        c.seek(SeekFrom::Start(65_530)).unwrap();
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b[..], &data[65_530..65_540]);
        let mut big = vec![0u8; 100_000];
        c.seek(SeekFrom::Start(1)).unwrap();
        c.read_exact(&mut big).unwrap();
        assert_eq!(&big[..], &data[1..100_001]);
        // Past the end: no bytes, then an error for an exact read.
        c.seek(SeekFrom::End(-2)).unwrap();
        assert!(c.read_exact(&mut b).is_err());
        // The budget.
        let mut tight = HeaderCursor::new(&src, 1000);
        assert!(tight.read_exact(&mut b).unwrap_err().to_string().contains("more than 1000 bytes"));
    }

    #[test]
    fn ranges_past_the_end_are_refused_before_allocating() {
        let src = BytesSource(vec![1, 2, 3]);
        assert!(src.read_at(2, usize::MAX).is_err());
        assert_eq!(src.read_at(1, 2).unwrap(), vec![2, 3]);
        assert!(src.read_at(u64::MAX, 1).unwrap_err().to_string().contains("past the end"));
    }
}
