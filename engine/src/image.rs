//! Image preprocessing for Gemma 3 / MedGemma, exactly as transformers' Gemma 3 image
//! processor (its PIL backend) prepares `pixel_values`: decode → RGB (transparent pixels
//! composited over white, grey replicated) → bilinear resize to `size`×`size` (aspect ratio
//! not kept) → ×1/255 → (x − mean)/std → CHW `f32`. MedGemma's notebooks optionally pad an
//! image to a square (centred, black) before the processor: [`pad_to_square`].
//!
//! The resize and the compositing are written here, following Pillow's published algorithms
//! (antialiased separable resampling with a triangle filter whose support widens with the
//! downscale factor, in 8-bit fixed point with 22 fractional bits; "over" compositing in
//! fixed point with 7 fractional bits), because the reference input of the model is Pillow's
//! output to the last bit and the `image` crate's float resampler rounds differently.
//! Decoding (PNG, JPEG) is the `image` crate's, bounded by `medbatch_formats::image`; JPEG
//! decoders may differ from libjpeg by an LSB in places.

/// Why an image could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image is empty ({width}x{height})")]
    Empty { width: usize, height: usize },
}

/// An 8-bit RGB image, rows top to bottom, pixels `[r, g, b]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rgb8 {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl Rgb8 {
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Self {
        assert_eq!(data.len(), width * height * 3, "RGB buffer size");
        Self { width, height, data }
    }

    /// A grey image replicated to three channels.
    pub fn from_gray(width: usize, height: usize, gray: &[u8]) -> Self {
        assert_eq!(gray.len(), width * height, "grey buffer size");
        Self::new(width, height, gray.iter().flat_map(|&v| [v, v, v]).collect())
    }

    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let i = (y * self.width + x) * 3;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }
}

/// The processor's settings (`preprocessor_config.json`).
#[derive(Clone, Debug, PartialEq)]
pub struct ImageConfig {
    /// Output height and width.
    pub size: usize,
    pub rescale_factor: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// The resize filter (`resample`: 2 bilinear, Gemma 3's; 3 bicubic, SigLIP's).
    pub filter: Filter,
}

impl Default for ImageConfig {
    /// Gemma 3 and MedGemma: 896, 1/255, mean = std = 0.5.
    fn default() -> Self {
        Self { size: 896, rescale_factor: 1.0 / 255.0, mean: [0.5; 3], std: [0.5; 3], filter: Filter::Bilinear }
    }
}

/// The processor settings of a checkpoint folder (`preprocessor_config.json`), `size` when
/// the file is absent or does not say. Only what Gemma 3's and SigLIP's processors do is
/// accepted: a bilinear or bicubic resize to a square, rescale and normalise (pan-and-scan
/// is refused).
pub fn read_preprocessor_config(dir: &std::path::Path, size: usize) -> Result<ImageConfig, crate::EngineError> {
    let p = dir.join("preprocessor_config.json");
    let mut cfg = ImageConfig { size, ..ImageConfig::default() };
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(cfg),
        Err(e) => return Err(crate::EngineError::Load(format!("{}: {e}", p.display()))),
    };
    let bad = |m: String| crate::EngineError::Load(format!("{}: {m}", p.display()));
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let flag = |k: &str| v.get(k).and_then(serde_json::Value::as_bool);
    if flag("do_pan_and_scan") == Some(true) {
        return Err(bad("do_pan_and_scan is not supported".into()));
    }
    if flag("do_resize") == Some(false) || flag("do_rescale") == Some(false) || flag("do_normalize") == Some(false) {
        return Err(bad("only processors that resize, rescale and normalise are supported".into()));
    }
    match v.get("resample").and_then(serde_json::Value::as_u64) {
        None | Some(2) => {}
        Some(3) => cfg.filter = Filter::Bicubic,
        Some(r) => {
            return Err(bad(format!("resample {r} is not supported (2, bilinear, as Gemma 3; 3, bicubic, as SigLIP)")))
        }
    }
    if let Some(s) = v.get("size") {
        let h = s.get("height").and_then(serde_json::Value::as_u64);
        let w = s.get("width").and_then(serde_json::Value::as_u64);
        match (h, w) {
            (Some(h), Some(w)) if h == w => cfg.size = h as usize,
            (None, None) => {}
            _ => return Err(bad(format!("size {s} is not a square height/width"))),
        }
    }
    if cfg.size != size {
        return Err(bad(format!("images of {} pixels do not fit a vision tower of {size}", cfg.size)));
    }
    if let Some(f) = v.get("rescale_factor").and_then(serde_json::Value::as_f64) {
        cfg.rescale_factor = f as f32;
    }
    let triple = |k: &str, into: &mut [f32; 3]| -> Result<(), crate::EngineError> {
        match v.get(k) {
            None | Some(serde_json::Value::Null) => Ok(()),
            Some(serde_json::Value::Array(a)) if a.len() == 3 && a.iter().all(|x| x.is_number()) => {
                for (o, x) in into.iter_mut().zip(a) {
                    *o = x.as_f64().unwrap_or_default() as f32;
                }
                Ok(())
            }
            Some(other) => Err(bad(format!("{k} {other} is not three numbers"))),
        }
    };
    triple("image_mean", &mut cfg.mean)?;
    triple("image_std", &mut cfg.std)?;
    Ok(cfg)
}

/// A decoded image (`medbatch_formats::image::decode`) to RGB as the processor converts
/// images: RGB kept, grey replicated, transparency composited over white.
pub fn to_rgb(img: image::DynamicImage) -> Result<Rgb8, ImageError> {
    let (width, height) = (img.width() as usize, img.height() as usize);
    if width == 0 || height == 0 {
        return Err(ImageError::Empty { width, height });
    }
    let rgb = match img {
        image::DynamicImage::ImageRgb8(i) => Rgb8::new(width, height, i.into_raw()),
        image::DynamicImage::ImageLuma8(i) => Rgb8::from_gray(width, height, i.as_raw()),
        other if other.color().has_alpha() => {
            let rgba = other.into_rgba8();
            let data = rgba.pixels().flat_map(|p| over_white(p.0)).collect();
            Rgb8::new(width, height, data)
        }
        // 16-bit and float images: the `image` crate's conversion to 8 bits.
        other => Rgb8::new(width, height, other.into_rgb8().into_raw()),
    };
    Ok(rgb)
}

/// Pillow's `alpha_composite` of one RGBA pixel over opaque white, then its RGB.
fn over_white([r, g, b, a]: [u8; 4]) -> [u8; 3] {
    const BITS: u32 = 7;
    if a == 0 {
        return [255; 3];
    }
    let a = u32::from(a);
    // Destination alpha is 255: blend = 255·(255 − a), out alpha·255 = 255·255.
    let outa255 = a * 255 + 255 * (255 - a);
    let coef1 = a * 255 * 255 * (1 << BITS) / outa255;
    let coef2 = 255 * (1 << BITS) - coef1;
    let div255 = |v: u32| ((v >> 8) + v) >> 8;
    let mix = |c: u8| (div255(u32::from(c) * coef1 + 255 * coef2 + (0x80 << BITS)) >> BITS) as u8;
    [mix(r), mix(g), mix(b)]
}

/// Centred zero padding to a square (`max(w, h)` a side); an odd remainder goes to the
/// bottom or right.
pub fn pad_to_square(img: &Rgb8) -> Rgb8 {
    let s = img.width.max(img.height);
    let (top, left) = ((s - img.height) / 2, (s - img.width) / 2);
    let mut data = vec![0u8; s * s * 3];
    for y in 0..img.height {
        let src = &img.data[y * img.width * 3..(y + 1) * img.width * 3];
        let at = ((top + y) * s + left) * 3;
        data[at..at + src.len()].copy_from_slice(src);
    }
    Rgb8::new(s, s, data)
}

/// Fractional bits of the fixed-point filter weights (Pillow: 32 − 8 − 2).
const PRECISION_BITS: u32 = 22;

/// Pillow's resampling filters (`Image.BILINEAR`, `Image.BICUBIC`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// Support 1 (Gemma 3's processor, resample 2).
    Bilinear,
    /// Keys' cubic with a = -0.5, support 2 (SigLIP's processor, resample 3).
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Self::Bilinear => 1.0,
            Self::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Self::Bilinear => (1.0 - x).max(0.0),
            Self::Bicubic => {
                let a = -0.5;
                if x < 1.0 {
                    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * a
                } else {
                    0.0
                }
            }
        }
    }
}

/// For each output index, the first input index, how many inputs, and their fixed-point
/// weights (Pillow's `precompute_coeffs`, then normalised to ints).
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    weights: Vec<i32>,
}

fn coeffs(in_size: usize, out_size: usize, filter: Filter) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) cast truncates toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut total = 0.0;
        for (x, w) in k.iter_mut().enumerate().take(xmax) {
            let t = ((x + xmin) as f64 - center + 0.5) * ss;
            *w = filter.weight(t);
            total += *w;
        }
        for (x, w) in k.iter().enumerate().take(xmax) {
            let w = if total != 0.0 { w / total } else { *w };
            let fixed = w * f64::from(1u32 << PRECISION_BITS);
            weights[xx * ksize + x] = if fixed < 0.0 { (fixed - 0.5) as i32 } else { (fixed + 0.5) as i32 };
        }
        bounds.push((xmin, xmax));
    }
    Coeffs { bounds, ksize, weights }
}

fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's bilinear `Image.resize` of an RGB image: antialiased (the filter widens when
/// shrinking), horizontal pass then vertical, each rounded to 8 bits.
pub fn resize_bilinear(img: &Rgb8, width: usize, height: usize) -> Rgb8 {
    resize(img, width, height, Filter::Bilinear)
}

/// Pillow's `Image.resize` of an RGB image with `filter`, as [`resize_bilinear`] describes.
pub fn resize(img: &Rgb8, width: usize, height: usize, filter: Filter) -> Rgb8 {
    if (width, height) == (img.width, img.height) {
        return img.clone();
    }
    let horiz = coeffs(img.width, width, filter);
    let vert = coeffs(img.height, height, filter);
    let round = 1i32 << (PRECISION_BITS - 1);
    // Horizontal pass over the rows the vertical pass reads (all of them, when the height
    // changes; Pillow skips rows outside the first and last output rows' windows).
    let (first, last) = if height != img.height {
        (vert.bounds[0].0, vert.bounds[height - 1].0 + vert.bounds[height - 1].1)
    } else {
        (0, img.height)
    };
    let mut mid = img.clone();
    if width != img.width {
        let rows = last - first;
        let mut data = vec![0u8; rows * width * 3];
        for yy in 0..rows {
            let row = &img.data[(yy + first) * img.width * 3..(yy + first + 1) * img.width * 3];
            for (xx, &(xmin, n)) in horiz.bounds.iter().enumerate() {
                let k = &horiz.weights[xx * horiz.ksize..xx * horiz.ksize + n];
                for c in 0..3 {
                    let mut ss = round;
                    for (x, w) in k.iter().enumerate() {
                        ss += i32::from(row[(xmin + x) * 3 + c]) * w;
                    }
                    data[(yy * width + xx) * 3 + c] = clip8(ss);
                }
            }
        }
        mid = Rgb8::new(width, rows, data);
    } else if first != 0 || last != img.height {
        mid = Rgb8::new(width, last - first, img.data[first * width * 3..last * width * 3].to_vec());
    }
    if height == img.height {
        return mid;
    }
    let mut data = vec![0u8; width * height * 3];
    for (yy, &(ymin, n)) in vert.bounds.iter().enumerate() {
        let k = &vert.weights[yy * vert.ksize..yy * vert.ksize + n];
        let ymin = ymin - first;
        for xx in 0..width {
            for c in 0..3 {
                let mut ss = round;
                for (y, w) in k.iter().enumerate() {
                    ss += i32::from(mid.data[((ymin + y) * width + xx) * 3 + c]) * w;
                }
                data[(yy * width + xx) * 3 + c] = clip8(ss);
            }
        }
    }
    Rgb8::new(width, height, data)
}

/// Rescales and normalises an image of the configured size into CHW `f32` values.
pub fn normalize(img: &Rgb8, cfg: &ImageConfig) -> Vec<f32> {
    let plane = img.width * img.height;
    let mut out = vec![0f32; 3 * plane];
    for (i, px) in img.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (f32::from(px[c]) * cfg.rescale_factor - cfg.mean[c]) / cfg.std[c];
        }
    }
    out
}

/// The processor's whole path for one decoded image: resize, rescale, normalise, CHW.
pub fn pixel_values(img: &Rgb8, cfg: &ImageConfig) -> Vec<f32> {
    normalize(&resize(img, cfg.size, cfg.size, cfg.filter), cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opaque_and_transparent_pixels_over_white() {
        assert_eq!(over_white([10, 200, 255, 255]), [10, 200, 255]);
        assert_eq!(over_white([10, 200, 255, 0]), [255, 255, 255]);
        let half = over_white([0, 0, 0, 128]);
        assert!(half.iter().all(|&v| v == 127), "{half:?}");
    }

    #[test]
    fn weights_sum_to_one_and_cover_the_input() {
        for (i, o) in [(300, 896), (896, 896), (640, 224), (7, 3), (3, 7)] {
            let c = coeffs(i, o, Filter::Bilinear);
            assert_eq!(c.bounds.len(), o);
            for (xx, &(xmin, n)) in c.bounds.iter().enumerate() {
                assert!(xmin + n <= i && n >= 1);
                let sum: i64 = c.weights[xx * c.ksize..xx * c.ksize + n].iter().map(|&w| i64::from(w)).sum();
                assert!((sum - (1 << PRECISION_BITS)).abs() <= n as i64, "{i}->{o} at {xx}: {sum}");
            }
        }
    }

    #[test]
    fn flat_images_stay_flat_and_padding_centres() {
        let img = Rgb8::new(5, 3, [9u8, 99, 199].repeat(15));
        let r = resize_bilinear(&img, 11, 2);
        assert!(r.data.chunks(3).all(|p| p == [9, 99, 199]));
        let sq = pad_to_square(&img);
        assert_eq!((sq.width, sq.height), (5, 5));
        assert_eq!(sq.pixel(0, 0), [0, 0, 0]);
        assert_eq!(sq.pixel(0, 1), [9, 99, 199]);
        assert_eq!(sq.pixel(4, 3), [9, 99, 199]);
        assert_eq!(sq.pixel(4, 4), [0, 0, 0]);
        let v = normalize(&Rgb8::new(1, 1, vec![0, 255, 51]), &ImageConfig::default());
        assert_eq!(&v[..2], &[-1.0, 1.0]);
        assert!((v[2] + 0.6).abs() < 1e-6, "{v:?}");
    }
}
