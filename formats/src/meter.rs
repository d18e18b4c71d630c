//! Bounded reading: nothing is read into memory past its limit plus one byte, and a
//! compressed stream is metered on both sides while it is read (headers can lie), so a bomb
//! stops early. Used by the archive walkers at planning and in workers, and by NIfTI.

use crate::limits::{RATIO_CHECK_MIN_BYTES, TAR_HEADER_ALLOWANCE_BYTES};
use medbatch_schemas::InputErrorKind;
use std::cell::{Cell, RefCell};
use std::io::{self, Read, Seek, SeekFrom};
use std::rc::Rc;

/// Reads at most `cap + 1` bytes: the extra byte tells "exactly at the limit" from "over it".
/// `None` when the content is over `cap`.
pub fn read_capped(r: &mut dyn Read, cap: u64) -> io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::new();
    r.take(cap.saturating_add(1)).read_to_end(&mut buf)?;
    Ok((buf.len() as u64 <= cap).then_some(buf))
}

/// Counts both sides of a (possibly compressed) stream, enforces the whole-stream limits, and
/// bounds how much a tar reader may consume for headers. Shared by the readers stacked around
/// the decoder; a tripped limit is kept as the verdict, since the error itself passes through
/// the tar and gzip readers.
pub struct StreamMeter {
    gzip: bool,
    compressed: Cell<u64>,
    inflated: Cell<u64>,
    /// Bytes the inflated side may still deliver before the tar reader yields its next entry.
    header_allowance: Cell<u64>,
    eof: Cell<bool>,
    verdict: RefCell<Option<(InputErrorKind, String)>>,
    max_inflated: u64,
    max_ratio: u64,
}

impl StreamMeter {
    /// A meter for a stream that is gzip-compressed (`gzip`: the limits apply) or not.
    pub fn new(gzip: bool, max_inflated: u64, max_ratio: u64) -> Self {
        Self {
            gzip,
            compressed: Cell::new(0),
            inflated: Cell::new(0),
            header_allowance: Cell::new(u64::MAX),
            eof: Cell::new(false),
            verdict: RefCell::new(None),
            max_inflated,
            max_ratio,
        }
    }

    pub fn is_gzip(&self) -> bool {
        self.gzip
    }

    /// Compressed bytes read so far.
    pub fn compressed(&self) -> u64 {
        self.compressed.get()
    }

    /// Inflated (or, uncompressed, plain) bytes delivered so far.
    pub fn inflated(&self) -> u64 {
        self.inflated.get()
    }

    /// Whether the inflated side has reported its end.
    pub fn at_eof(&self) -> bool {
        self.eof.get()
    }

    /// The limit that stopped the stream, if one did: its kind and a detail free of content.
    pub fn verdict(&self) -> Option<(InputErrorKind, String)> {
        self.verdict.borrow().clone()
    }

    /// Lets the inflated side deliver `n` more bytes before the next call (a tar member's
    /// padded data to skip plus the allowance for its headers).
    pub fn allow_header_bytes(&self, n: u64) {
        self.header_allowance.set(n);
    }

    fn trip(&self, kind: InputErrorKind, detail: String) -> io::Error {
        self.verdict.borrow_mut().get_or_insert((kind, detail));
        io::Error::other("stream limit reached")
    }

    /// Checks the inflated side after `n` more bytes.
    fn on_inflated(&self, n: usize) -> io::Result<()> {
        let inflated = self.inflated.get() + n as u64;
        self.inflated.set(inflated);
        self.header_allowance.set(self.header_allowance.get().saturating_sub(n as u64));
        if !self.gzip {
            return Ok(());
        }
        if inflated > self.max_inflated {
            return Err(self
                .trip(InputErrorKind::CompressionBomb, format!("archive inflates past {} bytes", self.max_inflated)));
        }
        let compressed = self.compressed.get();
        if inflated > RATIO_CHECK_MIN_BYTES && inflated > compressed.saturating_mul(self.max_ratio) {
            let detail = format!(
                "archive inflates {inflated} bytes from {compressed}, over the {}:1 ratio limit",
                self.max_ratio
            );
            return Err(self.trip(InputErrorKind::CompressionBomb, detail));
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Side {
    Compressed,
    Inflated,
}

/// A reader that reports to a [`StreamMeter`]: under the decoder (compressed side) or above
/// it (inflated side).
pub struct Metered<R> {
    inner: R,
    meter: Rc<StreamMeter>,
    side: Side,
}

impl<R> Metered<R> {
    /// The compressed bytes going into a decoder.
    pub fn compressed(inner: R, meter: &Rc<StreamMeter>) -> Self {
        Self { inner, meter: Rc::clone(meter), side: Side::Compressed }
    }

    /// The bytes coming out of a decoder (or a plain stream).
    pub fn inflated(inner: R, meter: &Rc<StreamMeter>) -> Self {
        Self { inner, meter: Rc::clone(meter), side: Side::Inflated }
    }
}

impl<R: Read> Read for Metered<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let meter = &self.meter;
        if meter.verdict.borrow().is_some() {
            return Err(io::Error::other("stream limit reached"));
        }
        let buf = match self.side {
            Side::Compressed => buf,
            Side::Inflated => {
                let allowance = meter.header_allowance.get();
                if allowance == 0 {
                    let detail = format!("tar headers of one member exceed {TAR_HEADER_ALLOWANCE_BYTES} bytes");
                    return Err(meter.trip(InputErrorKind::TooLarge, detail));
                }
                let len = buf.len().min(usize::try_from(allowance).unwrap_or(usize::MAX));
                &mut buf[..len]
            }
        };
        let n = self.inner.read(buf)?;
        match self.side {
            Side::Compressed => meter.compressed.set(meter.compressed.get() + n as u64),
            Side::Inflated => {
                if n == 0 && !buf.is_empty() {
                    meter.eof.set(true);
                }
                meter.on_inflated(n)?;
            }
        }
        Ok(n)
    }
}

/// Plain tar seeks over members it skips; seeking delivers no bytes, so nothing is counted.
impl<R: Seek> Seek for Metered<R> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.inner.seek(pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use flate2::Compression;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn capped_reads_tell_at_the_limit_from_over_it() {
        assert_eq!(read_capped(&mut &b"abcd"[..], 4).unwrap(), Some(b"abcd".to_vec()));
        assert_eq!(read_capped(&mut &b"abcde"[..], 4).unwrap(), None);
    }

    #[test]
    fn a_gzip_bomb_trips_the_ratio_limit_early() {
        let bomb = gzip(&vec![0u8; 16 << 20]);
        let meter = Rc::new(StreamMeter::new(true, 1 << 40, 100));
        let decoder = flate2::read::GzDecoder::new(Metered::compressed(&bomb[..], &meter));
        let mut inflated = Metered::inflated(decoder, &meter);
        let mut sink = Vec::new();
        assert!(inflated.read_to_end(&mut sink).is_err());
        let (kind, detail) = meter.verdict().expect("tripped");
        assert_eq!(kind, InputErrorKind::CompressionBomb);
        assert!(detail.contains("ratio"), "{detail}");
        assert!(sink.len() < 4 << 20, "stopped after {} bytes", sink.len());
    }

    #[test]
    fn plain_streams_are_only_counted() {
        let meter = Rc::new(StreamMeter::new(false, 1, 1));
        let mut r = Metered::inflated(&[7u8; 5000][..], &meter);
        let mut sink = Vec::new();
        r.read_to_end(&mut sink).unwrap();
        assert_eq!((meter.inflated(), meter.at_eof(), meter.verdict()), (5000, true, None));
    }
}
