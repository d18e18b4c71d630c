//! Element lengths checked before dicom-rs parses a file. dicom-rs reserves and zero-fills
//! the length an element declares before it reads the value, so a single damaged length
//! field (a flipped bit, bytes inserted before an element header) costs up to 4 GiB of
//! memory however small the file is. This walk reads only element headers — tag, VR, length
//! — descends into sequences and items, and refuses any length longer than the bytes that
//! remain in the file.
//!
//! Hand-written because no dicom-rs entry point bounds a value by the bytes left (measured:
//! a 2 KB file with 16 bytes inserted after its pixel data took a worker to 2.3 GB).

use super::DicomError;
use crate::sniff::DICOM_PREAMBLE_BYTES;

/// Sequences nest a few levels in real files; far deeper nesting is crafted.
const MAX_DEPTH: usize = 32;
/// Undefined length (sequences, items, encapsulated pixel data).
const UNDEFINED: u32 = 0xFFFF_FFFF;
const IMPLICIT_LE: &str = "1.2.840.10008.1.2";
const EXPLICIT_BE: &str = "1.2.840.10008.1.2.2";
const DEFLATED: &str = "1.2.840.10008.1.2.1.99";

#[derive(Clone, Copy)]
struct Encoding {
    implicit: bool,
    big_endian: bool,
}

const META: Encoding = Encoding { implicit: false, big_endian: false };

/// The byte buffer walked, and how many bytes the whole file has (the buffer may be a prefix).
struct Walk<'a> {
    bytes: &'a [u8],
    file_len: u64,
    /// Stop at the pixel data element (headers are read up to it and no further).
    until_pixel_data: bool,
}

impl Walk<'_> {
    fn u16(&self, at: usize, e: Encoding) -> Option<u16> {
        let b: [u8; 2] = self.bytes.get(at..at + 2)?.try_into().ok()?;
        Some(if e.big_endian { u16::from_be_bytes(b) } else { u16::from_le_bytes(b) })
    }

    fn u32(&self, at: usize, e: Encoding) -> Option<u32> {
        let b: [u8; 4] = self.bytes.get(at..at + 4)?.try_into().ok()?;
        Some(if e.big_endian { u32::from_be_bytes(b) } else { u32::from_le_bytes(b) })
    }

    fn too_long(&self, group: u16, elem: u16, len: u32, at: usize) -> DicomError {
        let left = self.file_len.saturating_sub(at as u64);
        DicomError::Header(format!(
            "element ({group:04X},{elem:04X}) declares {len} bytes at offset {at}, but only {left} remain in the file"
        ))
    }

    /// Walks elements from `pos` to `end` (or to a delimitation item when `end` is `None`).
    /// Returns where it stopped: after the delimitation item, at `end`, or at the end of the
    /// buffer when the buffer is a prefix of the file.
    /// In `fragments` (the items of encapsulated pixel data) items hold compressed bytes, not
    /// elements: only their lengths are checked.
    fn elements(
        &self,
        mut pos: usize,
        end: Option<usize>,
        e: Encoding,
        depth: usize,
        fragments: bool,
    ) -> Result<usize, DicomError> {
        if depth > MAX_DEPTH {
            return Err(DicomError::Header(format!("sequences nested deeper than {MAX_DEPTH} levels")));
        }
        loop {
            if end.is_some_and(|end| pos >= end) {
                return Ok(pos);
            }
            let (Some(group), Some(elem)) = (self.u16(pos, e), self.u16(pos + 2, e)) else {
                return Ok(pos);
            };
            if group == 0xFFFE {
                // Item and delimitation tags carry a 4-byte length and no VR, in any encoding.
                let Some(len) = self.u32(pos + 4, e) else { return Ok(pos) };
                let body = pos + 8;
                match elem {
                    0xE00D | 0xE0DD => return Ok(body),
                    _ if len == UNDEFINED => pos = self.elements(body, None, e, depth + 1, false)?,
                    _ => {
                        let item_end = self.value_end(group, elem, len, body)?;
                        if !fragments {
                            self.elements(body, Some(item_end), e, depth + 1, false)?;
                        }
                        pos = item_end;
                    }
                }
                continue;
            }
            if self.until_pixel_data && depth == 0 && (group, elem) == (0x7FE0, 0x0010) {
                return Ok(pos);
            }
            let (len, body, sequence) = if e.implicit {
                let Some(len) = self.u32(pos + 4, e) else { return Ok(pos) };
                (len, pos + 8, None)
            } else {
                let Some(vr) = self.bytes.get(pos + 4..pos + 6) else { return Ok(pos) };
                // The VRs with a 16-bit length, as dicom-rs decodes them; any other VR, an
                // unknown one included (read as UN), has 2 reserved bytes and a 32-bit length.
                let short = matches!(
                    vr,
                    b"AE"
                        | b"AS"
                        | b"AT"
                        | b"CS"
                        | b"DA"
                        | b"DS"
                        | b"DT"
                        | b"FL"
                        | b"FD"
                        | b"IS"
                        | b"LO"
                        | b"LT"
                        | b"PN"
                        | b"SH"
                        | b"SL"
                        | b"SS"
                        | b"ST"
                        | b"TM"
                        | b"UI"
                        | b"UL"
                        | b"US"
                );
                let long = !short;
                if long {
                    let Some(len) = self.u32(pos + 8, e) else { return Ok(pos) };
                    (len, pos + 12, Some(vr == b"SQ"))
                } else {
                    let Some(len) = self.u16(pos + 6, e) else { return Ok(pos) };
                    (u32::from(len), pos + 8, Some(false))
                }
            };
            if len == UNDEFINED {
                // A sequence, or encapsulated pixel data (its fragments): items until the
                // delimitation.
                let pixel_data = (group, elem) == (0x7FE0, 0x0010);
                pos = self.elements(body, None, e, depth + 1, pixel_data)?;
                continue;
            }
            let value_end = self.value_end(group, elem, len, body)?;
            // In implicit VR a sequence is known by the item tag its value starts with.
            let item_tag = |b: &[u8]| {
                b.get(body..body + 4) == Some(if e.big_endian { b"\xFF\xFE\xE0\x00" } else { b"\xFE\xFF\x00\xE0" })
            };
            if sequence.unwrap_or_else(|| item_tag(self.bytes)) && len > 0 {
                self.elements(body, Some(value_end), e, depth + 1, false)?;
            }
            pos = value_end;
        }
    }

    /// Where a value of `len` bytes starting at `body` ends, or an error when the file is
    /// shorter than that.
    fn value_end(&self, group: u16, elem: u16, len: u32, body: usize) -> Result<usize, DicomError> {
        if body as u64 + u64::from(len) > self.file_len {
            return Err(self.too_long(group, elem, len, body));
        }
        Ok(body + len as usize)
    }
}

/// Checks every element length of a DICOM Part 10 file against the bytes that remain.
/// `bytes` is the file or a prefix of it, `file_len` the whole file's length; elements past
/// the prefix are not looked at, nor, with `until_pixel_data`, the pixel data element and
/// what follows it. A deflated data set is not walked (its values are checked by the size
/// limits instead).
pub fn check_lengths(bytes: &[u8], file_len: u64, until_pixel_data: bool) -> Result<(), DicomError> {
    walk_top_level(bytes, file_len, until_pixel_data).map(|_| ())
}

/// Where the top-level pixel data element of a DICOM Part 10 file starts, with every
/// element length before it checked: `Ok(None)` when `bytes` (a prefix of the file) ends
/// before it or the data set is deflated. The second value: whether the data set is
/// explicit VR (the pixel data header is then 12 bytes, else 8).
pub fn pixel_data_at(bytes: &[u8], file_len: u64) -> Result<Option<(usize, bool)>, DicomError> {
    let Some((pos, e)) = walk_top_level(bytes, file_len, true)? else { return Ok(None) };
    let walk = Walk { bytes, file_len, until_pixel_data: true };
    let found = walk.u16(pos, e) == Some(0x7FE0) && walk.u16(pos + 2, e) == Some(0x0010);
    Ok(found.then_some((pos, !e.implicit)))
}

/// Walks the meta group and the data set; returns where the top-level walk stopped and the
/// data set's encoding (`None` when it is not walked).
fn walk_top_level(
    bytes: &[u8],
    file_len: u64,
    until_pixel_data: bool,
) -> Result<Option<(usize, Encoding)>, DicomError> {
    let start = if crate::sniff::looks_like_dicom(bytes) {
        DICOM_PREAMBLE_BYTES + 4
    } else if bytes.starts_with(b"DICM") {
        4
    } else {
        return Ok(None);
    };
    let walk = Walk { bytes, file_len, until_pixel_data };
    // The meta group is explicit VR little endian; its transfer syntax says how the rest is.
    let mut pos = start;
    let mut syntax = String::new();
    while walk.u16(pos, META) == Some(0x0002) {
        let Some(elem) = walk.u16(pos + 2, META) else { return Ok(None) };
        let end = walk.elements(pos, Some(pos + 1), META, 0, false)?;
        if elem == 0x0010 {
            let value = bytes.get(pos + 8..end).unwrap_or_default();
            syntax = String::from_utf8_lossy(value).trim_end_matches(['\0', ' ']).to_string();
        }
        if end <= pos {
            return Ok(None);
        }
        pos = end;
    }
    let e = match syntax.as_str() {
        DEFLATED => return Ok(None),
        IMPLICIT_LE => Encoding { implicit: true, big_endian: false },
        EXPLICIT_BE => Encoding { implicit: false, big_endian: true },
        _ => Encoding { implicit: false, big_endian: false },
    };
    walk.elements(pos, None, e, 0, false).map(|stop| Some((stop, e)))
}
