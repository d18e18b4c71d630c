//! DICOM headers (dicom-rs), read up to the pixel data element and no further, so that
//! planning can group files into studies and series without touching pixels. Shared by the
//! coordinator (grouping) and the worker (decoding).

use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use std::io::Read;
use std::path::Path;

/// Why a DICOM file could not be read. Messages name the problem, never patient data.
#[derive(Debug, thiserror::Error)]
pub enum DicomError {
    #[error("not a DICOM file or unreadable header: {0}")]
    Header(String),
    #[error("transfer syntax {name} ({uid}) is not supported")]
    UnsupportedSyntax { name: String, uid: String },
    #[error("pixel data could not be decoded: {0}")]
    Pixels(String),
}

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
    pub photometric: String,
    pub bits_stored: u16,
    pub pixel_representation: u16,
    pub rescale_slope: f64,
    pub rescale_intercept: f64,
    /// The first VOI window, when the header has one.
    pub window: Option<(f64, f64)>,
}

fn text(obj: &DefaultDicomObject, tag: dicom_core::Tag) -> String {
    obj.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|v| v.trim_end_matches(['\0', ' ']).trim().to_string())
        .unwrap_or_default()
}

fn floats(obj: &DefaultDicomObject, tag: dicom_core::Tag) -> Option<Vec<f64>> {
    obj.get(tag).and_then(|e| e.to_multi_float64().ok()).filter(|v| !v.is_empty())
}

fn int(obj: &DefaultDicomObject, tag: dicom_core::Tag) -> Option<i64> {
    obj.get(tag).and_then(|e| e.to_int::<i64>().ok())
}

pub fn header_of(obj: &DefaultDicomObject) -> DicomHeader {
    let first = |tag| floats(obj, tag).map(|v| v[0]);
    DicomHeader {
        transfer_syntax: obj.meta().transfer_syntax().trim_end_matches(['\0', ' ']).to_string(),
        modality: text(obj, tags::MODALITY),
        patient_id: text(obj, tags::PATIENT_ID),
        study_uid: text(obj, tags::STUDY_INSTANCE_UID),
        series_uid: text(obj, tags::SERIES_INSTANCE_UID),
        study_date: text(obj, tags::STUDY_DATE),
        instance_number: int(obj, tags::INSTANCE_NUMBER),
        image_position: floats(obj, tags::IMAGE_POSITION_PATIENT).filter(|v| v.len() == 3).map(|v| [v[0], v[1], v[2]]),
        rows: int(obj, tags::ROWS).unwrap_or(0) as u32,
        columns: int(obj, tags::COLUMNS).unwrap_or(0) as u32,
        frames: int(obj, tags::NUMBER_OF_FRAMES).unwrap_or(1).max(1) as u32,
        photometric: text(obj, tags::PHOTOMETRIC_INTERPRETATION),
        bits_stored: int(obj, tags::BITS_STORED).unwrap_or(0) as u16,
        pixel_representation: int(obj, tags::PIXEL_REPRESENTATION).unwrap_or(0) as u16,
        rescale_slope: first(tags::RESCALE_SLOPE).unwrap_or(1.0),
        rescale_intercept: first(tags::RESCALE_INTERCEPT).unwrap_or(0.0),
        window: first(tags::WINDOW_CENTER).zip(first(tags::WINDOW_WIDTH)),
    }
}

/// Reads a header from a file, stopping before the pixel data.
pub fn read_header(path: &Path) -> Result<DicomHeader, DicomError> {
    let f = std::fs::File::open(path).map_err(|e| DicomError::Header(e.to_string()))?;
    read_header_from(std::io::BufReader::new(f))
}

/// Reads a header from a byte stream holding a DICOM file (with or without the 128-byte
/// preamble), stopping before the pixel data.
pub fn read_header_from(reader: impl Read) -> Result<DicomHeader, DicomError> {
    let (preamble, reader) = sniff_preamble(reader)?;
    let obj = OpenFileOptions::new()
        .read_preamble(preamble)
        .read_until(tags::PIXEL_DATA)
        .from_reader(reader)
        .map_err(|e| DicomError::Header(e.to_string()))?;
    Ok(header_of(&obj))
}

/// Whether a stream starts with the 128-byte preamble and `DICM` (a file) or with `DICM`
/// (a file without preamble); the bytes looked at are put back in front of the stream.
pub fn sniff_preamble<R: Read>(mut reader: R) -> Result<(ReadPreamble, impl Read), DicomError> {
    let mut head = Vec::with_capacity(132);
    (&mut reader).take(132).read_to_end(&mut head).map_err(|e| DicomError::Header(e.to_string()))?;
    let preamble = if head.len() == 132 && &head[128..132] == b"DICM" {
        ReadPreamble::Always
    } else if head.starts_with(b"DICM") {
        ReadPreamble::Never
    } else {
        return Err(DicomError::Header("no DICM marker at byte 128 (not a DICOM Part 10 file)".into()));
    };
    Ok((preamble, std::io::Cursor::new(head).chain(reader)))
}

/// Whether the first 132 bytes of a file mark it as DICOM (`DICM` after the preamble).
pub fn looks_like_dicom(head: &[u8]) -> bool {
    head.len() >= 132 && &head[128..132] == b"DICM"
}
