//! Stored pixel values of a DICOM file, as pydicom's `pixel_array` gives them: decoded
//! without any LUT and sign-extended from BitsStored. Decoders: uncompressed (any byte
//! order), deflate, RLE, JPEG baseline and lossless (8-bit), JPEG 2000 (pure Rust). JPEG-LS
//! and 12-bit JPEG are refused with the transfer syntax named.
//!
//! Before anything is decoded, the header is held to the limits: Rows, Columns and
//! NumberOfFrames present and positive, the rescale and window values numbers, and the
//! declared size (rows × columns × frames × samples × bytes a sample) within
//! [`ImageLimits::max_decoded_bytes`].

use super::{header_of, sniff_preamble, DicomError, DicomHeader};
use crate::limits::ImageLimits;
use dicom_dictionary_std::tags;
use dicom_pixeldata::{ConvertOptions, ModalityLutOption, PixelDecoder, PixelRepresentation, VoiLutOption};
use std::io::Read;
use std::path::Path;

/// Transfer syntaxes this build cannot decode, by UID prefix, with their names.
const UNSUPPORTED: [(&str, &str); 4] = [
    ("1.2.840.10008.1.2.4.80", "JPEG-LS lossless"),
    ("1.2.840.10008.1.2.4.81", "JPEG-LS near-lossless"),
    ("1.2.840.10008.1.2.4.51", "JPEG extended (12-bit)"),
    ("1.2.840.10008.1.2.4.100", "MPEG-2"),
];

/// A decoded file: header and each frame's stored values (row-major, one sample a pixel
/// for greyscale; RGB frames interleaved).
#[derive(Clone, Debug)]
pub struct Frames {
    pub header: DicomHeader,
    pub samples_per_pixel: u16,
    pub frames: Vec<Vec<i32>>,
}

/// Reads a local file (trusted to fit in memory: benchmarks and tests) and decodes its
/// stored pixel values.
pub fn read_frames(path: &Path, limits: &ImageLimits) -> Result<Frames, DicomError> {
    let bytes = std::fs::read(path).map_err(|e| DicomError::Header(e.to_string()))?;
    read_frames_from(&bytes, limits)
}

/// Decodes the stored pixel values of a DICOM file held in memory (with or without the
/// preamble), after its element lengths are checked against its size.
pub fn read_frames_from(bytes: &[u8], limits: &ImageLimits) -> Result<Frames, DicomError> {
    crate::guard::guarded("DICOM pixel", || {
        super::scan::check_lengths(bytes, bytes.len() as u64, false)?;
        decode(bytes, limits)
    })
    .unwrap_or_else(|panic| Err(DicomError::Pixels(panic)))
}

/// Holds a header to what decoding needs, before any pixel buffer exists.
fn check(header: &DicomHeader, limits: &ImageLimits) -> Result<u64, DicomError> {
    if let Some(bad) = &header.bad_field {
        return Err(DicomError::Field(bad.clone()));
    }
    let bytes_per_sample = u64::from(header.bits_allocated.div_ceil(8)).max(1);
    let dims = [
        u64::from(header.rows),
        u64::from(header.columns),
        u64::from(header.frames),
        u64::from(header.samples_per_pixel),
    ];
    limits.check_declared(&dims, bytes_per_sample).map_err(|declared| DicomError::TooLarge {
        what: format!(
            "{} x {} pixels, {} frame(s), {} sample(s) of {} bits",
            header.columns, header.rows, header.frames, header.samples_per_pixel, header.bits_allocated
        ),
        declared: if declared == u64::MAX { "more than 2^64 bytes".into() } else { format!("{declared} bytes") },
        limit: limits.max_decoded_bytes,
    })
}

fn decode(reader: impl Read, limits: &ImageLimits) -> Result<Frames, DicomError> {
    let (preamble, reader) = sniff_preamble(reader)?;
    let obj = dicom_object::OpenFileOptions::new()
        .read_preamble(preamble)
        .from_reader(reader)
        .map_err(|e| DicomError::Header(e.to_string()))?;
    let header = header_of(&obj);
    if let Some((uid, name)) = UNSUPPORTED.iter().find(|(uid, _)| header.transfer_syntax == *uid) {
        return Err(DicomError::UnsupportedSyntax { name: name.to_string(), uid: uid.to_string() });
    }
    let declared = check(&header, limits)?;
    // Native (uncompressed) pixel data holds every declared byte; one that holds fewer is
    // refused before the decoder sizes its frames by the header.
    let stored = obj.element(tags::PIXEL_DATA).ok().and_then(|e| e.value().primitive().map(|p| p.calculate_byte_len()));
    if let Some(stored) = stored.filter(|&n| (n as u64) < declared) {
        return Err(DicomError::Pixels(format!("pixel data holds {stored} bytes; the header declares {declared}")));
    }
    let decoded = obj.decode_pixel_data().map_err(|e| match e.to_string() {
        m if m.contains("nsupported") => DicomError::UnsupportedSyntax { name: m, uid: header.transfer_syntax.clone() },
        m => DicomError::Pixels(m),
    })?;
    let opts = ConvertOptions::new().with_modality_lut(ModalityLutOption::None).with_voi_lut(VoiLutOption::Identity);
    // The decoder gives the whole container (BitsAllocated); signed values narrower than it
    // are sign-extended from BitsStored.
    let shift = if decoded.pixel_representation() == PixelRepresentation::Signed
        && decoded.bits_stored() < decoded.bits_allocated()
    {
        32 - u32::from(decoded.bits_stored())
    } else {
        0
    };
    let mut frames = Vec::with_capacity(decoded.number_of_frames().min(header.frames) as usize);
    for f in 0..decoded.number_of_frames() {
        let mut v: Vec<i32> =
            decoded.to_vec_frame_with_options(f, &opts).map_err(|e| DicomError::Pixels(e.to_string()))?;
        if shift > 0 {
            v.iter_mut().for_each(|x| *x = (*x << shift) >> shift);
        }
        frames.push(v);
    }
    Ok(Frames { header, samples_per_pixel: decoded.samples_per_pixel(), frames })
}
