//! DICOM headers, read up to the pixel data element and no further, so that planning can
//! group files into studies and series without touching pixels.
//!
//! Reading a header never fails on the fields an image needs (planning only groups files);
//! the first such field that is unusable — a Rows of 0, a RescaleSlope that is not a number
//! — is kept in [`DicomHeader::bad_field`] and refused by the pixel path.

use super::DicomError;
use crate::sniff::DICOM_PREAMBLE_BYTES;
use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use std::io::Read;
use std::path::Path;

/// What medbatch reads from a header.
#[derive(Clone, Debug, PartialEq)]
pub struct DicomHeader {
    pub transfer_syntax: String,
    pub modality: String,
    pub patient_id: String,
    pub study_uid: String,
    pub series_uid: String,
    pub study_date: String,
    pub instance_number: Option<i64>,
    pub image_position: Option<[f64; 3]>,
    pub rows: u32,
    pub columns: u32,
    pub frames: u32,
    pub samples_per_pixel: u16,
    pub bits_allocated: u16,
    pub photometric: String,
    pub bits_stored: u16,
    pub pixel_representation: u16,
    pub rescale_slope: f64,
    pub rescale_intercept: f64,
    /// The first VOI window, when the header has one.
    pub window: Option<(f64, f64)>,
    /// The first field an image needs that is unusable, if any.
    pub bad_field: Option<BadField>,
}

/// A header field that makes the file unusable as an image: its DICOM keyword and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("DICOM field {field} {reason}")]
pub struct BadField {
    pub field: &'static str,
    pub reason: &'static str,
}

fn text(obj: &DefaultDicomObject, tag: Tag) -> String {
    obj.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|v| v.trim_end_matches(['\0', ' ']).trim().to_string())
        .unwrap_or_default()
}

/// A decimal field's values: `Ok(None)` when absent or empty, an error naming the field when
/// present but not numbers, or not finite.
fn numbers(obj: &DefaultDicomObject, tag: Tag, field: &'static str) -> Result<Option<Vec<f64>>, BadField> {
    let Some(e) = obj.get(tag) else { return Ok(None) };
    if e.to_str().is_ok_and(|s| s.trim_matches(['\0', ' ', '\\']).is_empty()) {
        return Ok(None);
    }
    let v = e.to_multi_float64().map_err(|_| BadField { field, reason: "is not a number" })?;
    if v.iter().any(|x| !x.is_finite()) {
        return Err(BadField { field, reason: "is not finite" });
    }
    Ok((!v.is_empty()).then_some(v))
}

fn int(obj: &DefaultDicomObject, tag: Tag) -> Option<i64> {
    obj.get(tag).and_then(|e| e.to_int::<i64>().ok())
}

/// An integer field an image needs: present, a number, and at least 1.
fn positive(obj: &DefaultDicomObject, tag: Tag, field: &'static str) -> Result<i64, BadField> {
    match obj.get(tag) {
        None => Err(BadField { field, reason: "is missing" }),
        Some(e) => match e.to_int::<i64>() {
            Err(_) => Err(BadField { field, reason: "is not a number" }),
            Ok(v) if v < 1 => Err(BadField { field, reason: "is 0 or negative" }),
            Ok(v) => Ok(v),
        },
    }
}

pub fn header_of(obj: &DefaultDicomObject) -> DicomHeader {
    let mut bad: Option<BadField> = None;
    let mut keep = |r: Result<Option<Vec<f64>>, BadField>| match r {
        Ok(v) => v,
        Err(b) => {
            bad.get_or_insert(b);
            None
        }
    };
    let first = |v: Option<Vec<f64>>| v.map(|v| v[0]);
    let slope = first(keep(numbers(obj, tags::RESCALE_SLOPE, "RescaleSlope")));
    let intercept = first(keep(numbers(obj, tags::RESCALE_INTERCEPT, "RescaleIntercept")));
    let center = first(keep(numbers(obj, tags::WINDOW_CENTER, "WindowCenter")));
    let width = first(keep(numbers(obj, tags::WINDOW_WIDTH, "WindowWidth")));
    let position = keep(numbers(obj, tags::IMAGE_POSITION_PATIENT, "ImagePositionPatient"));
    let mut dim = |tag, field| match positive(obj, tag, field) {
        Ok(v) => u32::try_from(v).unwrap_or(u32::MAX),
        Err(b) => {
            bad.get_or_insert(b);
            0
        }
    };
    let rows = dim(tags::ROWS, "Rows");
    let columns = dim(tags::COLUMNS, "Columns");
    if slope == Some(0.0) {
        bad.get_or_insert(BadField { field: "RescaleSlope", reason: "is 0" });
    }
    if width.is_some_and(|w| w < 1.0) {
        bad.get_or_insert(BadField { field: "WindowWidth", reason: "is below 1" });
    }
    let frames = match obj.get(tags::NUMBER_OF_FRAMES).map(|e| e.to_int::<i64>()) {
        None => 1,
        Some(Ok(n)) if n >= 1 => u32::try_from(n).unwrap_or(u32::MAX),
        Some(_) => {
            bad.get_or_insert(BadField { field: "NumberOfFrames", reason: "is not a positive number" });
            1
        }
    };
    DicomHeader {
        transfer_syntax: obj.meta().transfer_syntax().trim_end_matches(['\0', ' ']).to_string(),
        modality: text(obj, tags::MODALITY),
        patient_id: text(obj, tags::PATIENT_ID),
        study_uid: text(obj, tags::STUDY_INSTANCE_UID),
        series_uid: text(obj, tags::SERIES_INSTANCE_UID),
        study_date: text(obj, tags::STUDY_DATE),
        instance_number: int(obj, tags::INSTANCE_NUMBER),
        image_position: position.filter(|v| v.len() == 3).map(|v| [v[0], v[1], v[2]]),
        rows,
        columns,
        frames,
        samples_per_pixel: int(obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1).clamp(1, i64::from(u16::MAX)) as u16,
        bits_allocated: int(obj, tags::BITS_ALLOCATED).unwrap_or(0).clamp(0, i64::from(u16::MAX)) as u16,
        photometric: text(obj, tags::PHOTOMETRIC_INTERPRETATION),
        bits_stored: int(obj, tags::BITS_STORED).unwrap_or(0).clamp(0, i64::from(u16::MAX)) as u16,
        pixel_representation: int(obj, tags::PIXEL_REPRESENTATION).unwrap_or(0).clamp(0, 1) as u16,
        rescale_slope: slope.unwrap_or(1.0),
        rescale_intercept: intercept.unwrap_or(0.0),
        window: center.zip(width),
        bad_field: bad,
    }
}

/// Bytes of a file read before its header is parsed, to check element lengths: headers
/// before the pixel data are far smaller.
const HEADER_PREFIX_BYTES: u64 = 16 << 20;

/// Reads a header from a file, stopping before the pixel data.
pub fn read_header(path: &Path) -> Result<DicomHeader, DicomError> {
    let f = std::fs::File::open(path).map_err(|e| DicomError::Header(e.to_string()))?;
    let len = f.metadata().map_err(|e| DicomError::Header(e.to_string()))?.len();
    read_header_from(std::io::BufReader::new(f), len)
}

/// Reads a header from a byte stream holding a DICOM file of `file_len` bytes (with or
/// without the 128-byte preamble), stopping before the pixel data. The element lengths of
/// its first bytes are checked against the file's length first.
pub fn read_header_from(mut reader: impl Read, file_len: u64) -> Result<DicomHeader, DicomError> {
    crate::guard::guarded("DICOM header", || {
        let mut prefix = Vec::new();
        (&mut reader)
            .take(HEADER_PREFIX_BYTES)
            .read_to_end(&mut prefix)
            .map_err(|e| DicomError::Header(e.to_string()))?;
        super::scan::check_lengths(&prefix, file_len.max(prefix.len() as u64), true)?;
        let (preamble, reader) = sniff_preamble(std::io::Cursor::new(prefix).chain(reader))?;
        let obj = OpenFileOptions::new()
            .read_preamble(preamble)
            .read_until(tags::PIXEL_DATA)
            .from_reader(reader)
            .map_err(|e| DicomError::Header(e.to_string()))?;
        Ok(header_of(&obj))
    })
    .unwrap_or_else(|panic| Err(DicomError::Header(panic)))
}

/// Whether a stream starts with the 128-byte preamble and `DICM` (a file) or with `DICM`
/// (a file without preamble); the bytes looked at are put back in front of the stream.
pub fn sniff_preamble<R: Read>(mut reader: R) -> Result<(ReadPreamble, impl Read), DicomError> {
    let marker = DICOM_PREAMBLE_BYTES + 4;
    let mut head = Vec::with_capacity(marker);
    (&mut reader).take(marker as u64).read_to_end(&mut head).map_err(|e| DicomError::Header(e.to_string()))?;
    let preamble = if crate::sniff::looks_like_dicom(&head) {
        ReadPreamble::Always
    } else if head.starts_with(b"DICM") {
        ReadPreamble::Never
    } else {
        return Err(DicomError::NotDicom(format!(
            "no DICM marker at byte 128 (not a DICOM Part 10 file){}",
            crate::sniff::format_hint(&head)
        )));
    };
    Ok((preamble, std::io::Cursor::new(head).chain(reader)))
}
