//! MedGemma's input recipes for DICOM and NIfTI pixels (decoding is `medbatch_formats`'s):
//!
//! - CT: Hounsfield units, three windows to R, G, B (−1024…1024, −135…215, 0…80), and at most
//!   85 slices sampled uniformly (Google's MedGemma 1.5 CT notebook).
//! - Radiographs (CR/DX): the header's first VOI window (DICOM's linear function) or min–max,
//!   MONOCHROME1 inverted.
//! - MR: min–max over the whole series.
//!
//! Rounding is half to even throughout, as numpy's `round` in the reference recipes.

use medbatch_formats::dicom::DicomHeader;

/// Slices a CT or MR volume is sampled down to.
pub const MAX_SLICES: usize = 85;
/// CT windows (Hounsfield units) mapped to R, G and B.
pub const CT_WINDOWS: [(f64, f64); 3] = [(-1024.0, 1024.0), (-135.0, 215.0), (0.0, 80.0)];

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
    slices.iter().map(|s| range_u8(s, lo, hi)).collect()
}

/// One slice onto 0…255 by a range found over the whole volume (`lo`…`hi`).
pub fn range_u8(slice: &[f64], lo: f64, hi: f64) -> Vec<u8> {
    let span = (hi - lo).max(1e-12);
    slice.iter().map(|&v| to_u8((v - lo) / span * 255.0)).collect()
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
