//! DICOM inputs (dicom-rs): headers without pixels, stored pixel values, and the pixel paths
//! MedGemma's input recipes use.
//!
//! - Headers are read up to the pixel data element and no further, so grouping an archive
//!   into studies and series never touches pixels.
//! - Stored values are decoded without any LUT and sign-extended from BitsStored, as pydicom's
//!   `pixel_array` gives them. Decoders: uncompressed (any byte order), deflate, RLE, JPEG
//!   baseline and lossless (8-bit), JPEG 2000 (pure Rust). JPEG-LS and 12-bit JPEG are refused
//!   with the transfer syntax named.
//! - CT: Hounsfield units, three windows to R, G, B (−1024…1024, −135…215, 0…80), and at most
//!   85 slices sampled uniformly (Google's MedGemma 1.5 CT notebook).
//! - Radiographs (CR/DX): the header's first VOI window (DICOM's linear function) or min–max,
//!   MONOCHROME1 inverted.
//! - MR: min–max over the whole series.
//!
//! Rounding is half to even throughout, as numpy's `round` in the reference recipes.

use dicom_pixeldata::{ConvertOptions, ModalityLutOption, PixelDecoder, PixelRepresentation, VoiLutOption};
pub use medbatch_connectors::dicom_header::{header_of, read_header, read_header_from, DicomError, DicomHeader};
use std::path::Path;

/// Slices a CT or MR volume is sampled down to.
pub const MAX_SLICES: usize = 85;
/// CT windows (Hounsfield units) mapped to R, G and B.
pub const CT_WINDOWS: [(f64, f64); 3] = [(-1024.0, 1024.0), (-135.0, 215.0), (0.0, 80.0)];

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

/// Reads a file and decodes its stored pixel values.
pub fn read_frames(path: &Path) -> Result<Frames, DicomError> {
    let f = std::fs::File::open(path).map_err(|e| DicomError::Header(e.to_string()))?;
    read_frames_from(std::io::BufReader::new(f))
}

/// Reads a DICOM file from a byte stream (with or without the preamble) and decodes its
/// stored pixel values.
pub fn read_frames_from(reader: impl std::io::Read) -> Result<Frames, DicomError> {
    let (preamble, reader) = medbatch_connectors::dicom_header::sniff_preamble(reader)?;
    let obj = dicom_object::OpenFileOptions::new()
        .read_preamble(preamble)
        .from_reader(reader)
        .map_err(|e| DicomError::Header(e.to_string()))?;
    let header = header_of(&obj);
    if let Some((uid, name)) = UNSUPPORTED.iter().find(|(uid, _)| header.transfer_syntax == *uid) {
        return Err(DicomError::UnsupportedSyntax { name: name.to_string(), uid: uid.to_string() });
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
    let mut frames = Vec::with_capacity(decoded.number_of_frames() as usize);
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

/// Modality values (e.g. Hounsfield units): stored × slope + intercept.
pub fn rescaled(stored: &[i32], h: &DicomHeader) -> Vec<f64> {
    stored.iter().map(|&v| f64::from(v) * h.rescale_slope + h.rescale_intercept).collect()
}

fn to_u8(v: f64) -> u8 {
    v.round_ties_even().clamp(0.0, 255.0) as u8
}

/// One window (`lo`…`hi`) onto 0…255: clip, scale, round.
pub fn window_u8(values: &[f64], lo: f64, hi: f64) -> Vec<u8> {
    values.iter().map(|&v| to_u8((v.clamp(lo, hi) - lo) / (hi - lo) * 255.0)).collect()
}

/// A CT slice in Hounsfield units as RGB: the three [`CT_WINDOWS`], pixels interleaved.
pub fn ct_rgb(hu: &[f64]) -> Vec<u8> {
    let planes: Vec<Vec<u8>> = CT_WINDOWS.iter().map(|&(lo, hi)| window_u8(hu, lo, hi)).collect();
    (0..hu.len()).flat_map(|i| [planes[0][i], planes[1][i], planes[2][i]]).collect()
}

/// A radiograph's grey levels: modality rescale, the header's VOI window (DICOM's linear
/// function) or min–max without one, MONOCHROME1 inverted.
pub fn radiograph_u8(stored: &[i32], h: &DicomHeader) -> Vec<u8> {
    let v = rescaled(stored, h);
    let mut out: Vec<u8> = match h.window {
        Some((c, w)) => {
            let (lo, hi) = (c - 0.5 - (w - 1.0) / 2.0, c - 0.5 + (w - 1.0) / 2.0);
            v.iter()
                .map(|&x| {
                    if x <= lo {
                        0
                    } else if x > hi {
                        255
                    } else {
                        to_u8(((x - (c - 0.5)) / (w - 1.0) + 0.5) * 255.0)
                    }
                })
                .collect()
        }
        None => minmax_u8(&[v]).remove(0),
    };
    if h.photometric == "MONOCHROME1" {
        out.iter_mut().for_each(|x| *x = 255 - *x);
    }
    out
}

/// Min–max over every slice together onto 0…255 (MR series).
pub fn minmax_u8(slices: &[Vec<f64>]) -> Vec<Vec<u8>> {
    let all = slices.iter().flatten();
    let lo = all.clone().copied().fold(f64::INFINITY, f64::min);
    let hi = all.copied().fold(f64::NEG_INFINITY, f64::max);
    let span = (hi - lo).max(1e-12);
    slices.iter().map(|s| s.iter().map(|&v| to_u8((v - lo) / span * 255.0)).collect()).collect()
}

/// Which of `n` ordered slices a volume keeps: all when `n` ≤ `max` (85 in Google's
/// recipe, [`MAX_SLICES`]), otherwise `round(k / max · (n − 1))` for k = 1…max (half to
/// even, as Python's `round`).
pub fn slice_choice(n: usize, max: usize) -> Vec<usize> {
    if n <= max {
        return (0..n).collect();
    }
    (1..=max).map(|k| (k as f64 / max as f64 * (n - 1) as f64).round_ties_even() as usize).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_clip_and_round_half_to_even() {
        assert_eq!(window_u8(&[-2000.0, -1024.0, 0.0, 1024.0, 5000.0], -1024.0, 1024.0), vec![0, 0, 128, 255, 255]);
        // 0.5 steps round to even: 2.5 → 2, 3.5 → 4.
        assert_eq!(window_u8(&[2.5, 3.5], 0.0, 255.0), vec![2, 4]);
        assert_eq!(ct_rgb(&[40.0]), vec![132, 128, 128]);
    }

    #[test]
    fn short_series_keep_every_slice() {
        assert_eq!(slice_choice(3, MAX_SLICES), vec![0, 1, 2]);
        assert_eq!(slice_choice(85, MAX_SLICES).len(), 85);
        let s = slice_choice(200, MAX_SLICES);
        assert_eq!((s.len(), s[84]), (85, 199));
        assert!(s.windows(2).all(|w| w[0] < w[1]));
    }
}
