//! DICOM Part 10 files (dicom-rs): headers read up to the pixel data element and no further
//! ([`header`], for planning), and stored pixel values ([`pixels`], feature `pixels`).
//!
//! Errors name the problem and, for a bad header field, the field — never patient data.

pub mod header;
#[cfg(feature = "pixels")]
pub mod pixels;
mod scan;

pub use header::{header_of, read_header, read_header_from, sniff_preamble, BadField, DicomHeader};
#[cfg(feature = "pixels")]
pub use pixels::{read_frames, read_frames_from, Frames};
pub use scan::{check_lengths, pixel_data_at};

use medbatch_schemas::InputErrorKind;

/// Why a DICOM file could not be read. Messages name the problem, never patient data.
#[derive(Debug, thiserror::Error)]
pub enum DicomError {
    #[error("not a DICOM file: {0}")]
    NotDicom(String),
    #[error("DICOM data set cannot be read (truncated or corrupt): {0}")]
    Header(String),
    #[error("transfer syntax {name} ({uid}) is not supported")]
    UnsupportedSyntax { name: String, uid: String },
    #[error("pixel data could not be decoded: {0}")]
    Pixels(String),
    /// A header field an image needs is missing, zero, not a number or not finite.
    #[error("{0}")]
    Field(BadField),
    /// The header declares more decoded samples than the limit allows.
    #[error("the header declares {declared} of decoded pixel data ({what}), over the limit of {limit} bytes")]
    TooLarge { what: String, declared: String, limit: u64 },
}

impl DicomError {
    /// The error row kind this problem is reported as.
    pub fn kind(&self) -> InputErrorKind {
        match self {
            Self::NotDicom(_) => InputErrorKind::WrongFormat,
            Self::Header(_) | Self::Pixels(_) | Self::Field(_) => InputErrorKind::CorruptImage,
            Self::UnsupportedSyntax { .. } => InputErrorKind::UnsupportedEncoding,
            Self::TooLarge { .. } => InputErrorKind::TooLarge,
        }
    }
}
