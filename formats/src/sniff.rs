//! Telling formats apart by their first bytes, never by their names alone: magic numbers of
//! the binary formats that turn up misnamed, tar's header checksum, DICOM's `DICM` marker.
//! Error details name a format, never quote the bytes.

use crate::limits::TAR_BLOCK_BYTES;
use medbatch_schemas::InputErrorKind;
use std::io::{self, Read, Seek, SeekFrom};

/// The byte-order mark UTF-8 text may start with.
pub const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// Magic bytes of binary formats that turn up misnamed as text: (offset, magic, format).
const BINARY_MAGICS: &[(usize, &[u8], &str)] = &[
    (0, b"%PDF", "PDF"),
    (0, b"PK\x03\x04", "zip"),
    (0, b"\x1f\x8b", "gzip"),
    (0, b"\x89PNG", "PNG"),
    (0, b"\xFF\xD8\xFF", "JPEG"),
    (DICOM_PREAMBLE_BYTES, b"DICM", "DICOM"),
    (257, b"ustar", "tar"),
];

/// DICOM Part 10 files start with a 128-byte preamble, then `DICM`.
pub const DICOM_PREAMBLE_BYTES: usize = 128;

/// Reads up to `n` bytes from the start, then rewinds.
pub fn sniff<R: Read + Seek + ?Sized>(r: &mut R, n: u64) -> io::Result<Vec<u8>> {
    r.seek(SeekFrom::Start(0))?;
    let mut head = Vec::new();
    r.take(n).read_to_end(&mut head)?;
    r.seek(SeekFrom::Start(0))?;
    Ok(head)
}

/// Inflates up to `n` bytes from the start of a gzip stream, then rewinds.
pub fn sniff_gzip<R: Read + Seek + ?Sized>(r: &mut R, n: u64) -> io::Result<Vec<u8>> {
    r.seek(SeekFrom::Start(0))?;
    let mut head = Vec::new();
    flate2::read::GzDecoder::new(&mut *r).take(n).read_to_end(&mut head)?;
    r.seek(SeekFrom::Start(0))?;
    Ok(head)
}

/// The known binary format the first bytes belong to.
pub fn binary_format(head: &[u8]) -> Option<&'static str> {
    BINARY_MAGICS
        .iter()
        .find(|(offset, magic, _)| head.get(*offset..offset + magic.len()) == Some(*magic))
        .map(|(_, _, format)| *format)
}

/// A known binary format, or a NUL byte, in the first bytes of something meant to be text.
pub fn binary_problem(head: &[u8]) -> Option<String> {
    if let Some(format) = binary_format(head) {
        return Some(format!("content is {format}"));
    }
    head.iter().position(|&b| b == 0).map(|offset| format!("binary content (NUL byte at offset {offset})"))
}

/// ` (content looks like X)` for error details, naming a format, never quoting bytes.
pub fn format_hint(head: &[u8]) -> String {
    match binary_format(head) {
        Some(format) => format!(" (content looks like {format})"),
        None if !head.contains(&0) && std::str::from_utf8(head).is_ok() => " (content looks like text)".into(),
        None => String::new(),
    }
}

/// Checks the first block of a tar stream (up to 512 bytes): its checksum matches, or it is
/// the all-zero end marker of an empty archive. A short input with the ustar magic is a tar
/// cut inside its first header.
pub fn check_tar_head(head: &[u8]) -> Result<(), (InputErrorKind, String)> {
    let block = TAR_BLOCK_BYTES as usize;
    if head.is_empty() {
        return Err((InputErrorKind::Empty, "0 bytes".into()));
    }
    if head.len() < block {
        if head.get(257..262) == Some(b"ustar") {
            return Err((InputErrorKind::TruncatedArchive, "archive ends inside its first header".into()));
        }
        let detail = format!("not a tar archive: {} bytes, shorter than one header{}", head.len(), format_hint(head));
        return Err((InputErrorKind::WrongFormat, detail));
    }
    if head.iter().all(|&b| b == 0) {
        return Ok(());
    }
    let header = tar::Header::from_byte_slice(&head[..block]);
    // The checksum is the byte sum of the header with its own field counted as spaces.
    let sum: u32 =
        head[..148].iter().chain(&head[156..block]).map(|&b| u32::from(b)).sum::<u32>() + 8 * u32::from(b' ');
    if header.cksum().ok() == Some(sum) {
        return Ok(());
    }
    let detail = format!("not a tar archive: the first header's checksum does not match{}", format_hint(head));
    Err((InputErrorKind::WrongFormat, detail))
}

/// Whether the first 132 bytes of a file mark it as DICOM (`DICM` after the preamble).
pub fn looks_like_dicom(head: &[u8]) -> bool {
    head.get(DICOM_PREAMBLE_BYTES..DICOM_PREAMBLE_BYTES + 4) == Some(b"DICM")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_named_by_their_magic() {
        assert_eq!(binary_format(b"%PDF-1.7"), Some("PDF"));
        let mut dicom = vec![0u8; 128];
        dicom.extend_from_slice(b"DICM");
        assert!(looks_like_dicom(&dicom));
        assert_eq!(binary_format(&dicom), Some("DICOM"));
        assert_eq!(binary_problem(b"ab\0c").as_deref(), Some("binary content (NUL byte at offset 2)"));
        assert_eq!(format_hint(b"plain words"), " (content looks like text)");
    }

    #[test]
    fn tar_heads_are_checked_by_checksum() {
        let mut h = tar::Header::new_ustar();
        h.set_path("a.txt").unwrap();
        h.set_size(3);
        h.set_cksum();
        assert_eq!(check_tar_head(h.as_bytes()), Ok(()));
        assert_eq!(check_tar_head(&[0u8; 512]), Ok(()));
        let mut bad = h.as_bytes().to_vec();
        bad[0] ^= 1;
        assert_eq!(check_tar_head(&bad).unwrap_err().0, InputErrorKind::WrongFormat);
        assert_eq!(check_tar_head(&h.as_bytes()[..300]).unwrap_err().0, InputErrorKind::TruncatedArchive);
        assert_eq!(check_tar_head(b"").unwrap_err().0, InputErrorKind::Empty);
    }
}
