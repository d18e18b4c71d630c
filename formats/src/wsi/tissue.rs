//! Tissue detection and patch selection, after Google's MedGemma pathology recipe: a tissue
//! mask at about 1.25×, a grid of non-overlapping patches at the pipeline's magnification
//! (10×, 896 px, stride 896), and a seeded sample of up to N tissue patches, so that a rerun
//! picks the same patches.
//!
//! The mask is computed tile by tile on the least detailed level at or above the mask
//! magnification: each grid cell accumulates the luminance (and saturation) of the mask
//! pixels it covers, so memory is one tile plus the grid whatever the slide's size. A cell is
//! tissue when its mean luminance lies in [1/255, 0.8] (Google's default, for white glass;
//! [`TissueMethod::Luminance`]) or, with [`TissueMethod::OtsuSaturation`], when its mean
//! saturation exceeds the Otsu threshold of the slide's saturation histogram.

use super::source::RangeRead;
use super::{Slide, WsiError};
#[cfg(feature = "pixels")]
use rand::SeedableRng;

/// How tissue is told from glass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TissueMethod {
    /// Mean luminance of the cell within [min, max] (Google's recipe).
    Luminance,
    /// Mean saturation of the cell above the slide's Otsu threshold.
    OtsuSaturation,
}

/// What to select.
#[derive(Clone, Debug, PartialEq)]
pub struct PatchParams {
    /// Magnification the patches are read at (10× in the recipe).
    pub magnification: f64,
    /// Patch side in pixels at that magnification (896: MedGemma's image size).
    pub patch: u32,
    /// Distance between patch origins (= `patch`: non-overlapping).
    pub stride: u32,
    /// Magnification of the tissue mask (1.25×).
    pub mask_magnification: f64,
    pub method: TissueMethod,
    /// Luminance bounds of tissue, as fractions of white.
    pub min_luminance: f64,
    pub max_luminance: f64,
    /// Most patches kept (125 in the recipe); `None` keeps all.
    pub max_patches: Option<usize>,
    /// Seed of the sample; with the slide's header digest it fixes which patches are kept.
    pub seed: u64,
    /// Only the grid rows `start..end` (a tile-range job's band of the grid); `None`: all.
    /// The mask is still computed over the whole slide, so a band's cells are judged as
    /// they are in a whole-slide selection.
    pub grid_rows: Option<(u64, u64)>,
}

impl Default for PatchParams {
    fn default() -> Self {
        Self {
            magnification: 10.0,
            patch: 896,
            stride: 896,
            mask_magnification: 1.25,
            method: TissueMethod::Luminance,
            min_luminance: 1.0 / 255.0,
            max_luminance: 0.8,
            max_patches: Some(125),
            seed: 0,
            grid_rows: None,
        }
    }
}

impl PatchParams {
    /// The patch parameters of an imaging pipeline: its `imaging.slide` settings, up to
    /// `max_images` patches for a slide-level pipeline, every tissue cell for a tile-level
    /// one.
    pub fn from_spec(spec: &medbatch_schemas::pipeline::ImagingSpec) -> Self {
        use medbatch_schemas::pipeline::{ImagingUnit, TissueDetection};
        let s = &spec.slide;
        Self {
            magnification: s.magnification,
            patch: s.patch,
            stride: s.stride,
            mask_magnification: s.mask_magnification,
            method: match s.tissue {
                TissueDetection::Luminance => TissueMethod::Luminance,
                TissueDetection::OtsuSaturation => TissueMethod::OtsuSaturation,
            },
            max_patches: (spec.unit != ImagingUnit::Tiles).then_some(spec.max_images),
            seed: s.seed,
            ..Self::default()
        }
    }
}

/// One selected patch: the region to read, in pixels of `level`, and how much of it is
/// tissue. When the slide has no level at the asked magnification, the region is larger than
/// the patch (read at the next more detailed level) and is resized to `patch` on reading.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Patch {
    pub level: usize,
    pub x: u64,
    pub y: u64,
    pub width: u32,
    pub height: u32,
    /// Share of the cell's mask pixels that pass the tissue test on their own.
    pub tissue_fraction: f32,
}

/// The patch grid of a slide at a magnification: which level it is read from, and its cells.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PatchGrid {
    /// Level the patches are read from, and its magnification.
    pub level: usize,
    pub magnification: f64,
    /// Level the tissue mask is computed on.
    pub mask_level: usize,
    /// Patch side and stride in pixels of `level` (larger than asked when the level is
    /// more detailed than the magnification asked).
    pub side: u64,
    pub step: u64,
    /// Cells across and down (0 when the level is smaller than one patch).
    pub cols: u64,
    pub rows: u64,
}

/// The outcome of selection for one slide.
#[cfg(feature = "pixels")]
#[derive(Clone, Debug, PartialEq)]
pub struct PatchSelection {
    /// Level the patches are read from, and its magnification.
    pub level: usize,
    pub magnification: f64,
    /// Level the mask was computed on.
    pub mask_level: usize,
    /// Cells of the grid, and how many are tissue (in the whole grid, whatever the band).
    pub grid_cells: usize,
    pub tissue_cells: usize,
    /// The kept patches (of the band, when one is asked), in reading order (top to bottom, left to right).
    pub patches: Vec<Patch>,
    /// The Otsu threshold used (saturation, 0–1), for [`TissueMethod::OtsuSaturation`].
    pub threshold: Option<f64>,
}

#[cfg(feature = "pixels")]
#[derive(Clone, Copy, Default)]
struct Cell {
    luminance: f64,
    saturation: f64,
    in_range: u64,
    pixels: u64,
}

/// Otsu's threshold of a 256-bin histogram, as a bin index.
#[cfg(feature = "pixels")]
pub fn otsu(hist: &[u64; 256]) -> usize {
    let total: u64 = hist.iter().sum();
    let sum_all: f64 = hist.iter().enumerate().map(|(i, &n)| i as f64 * n as f64).sum();
    let (mut w0, mut sum0, mut best, mut best_t) = (0u64, 0.0f64, -1.0f64, 0usize);
    for (t, &n) in hist.iter().enumerate() {
        w0 += n;
        sum0 += t as f64 * n as f64;
        let w1 = total - w0;
        if w0 == 0 || w1 == 0 {
            continue;
        }
        let (m0, m1) = (sum0 / w0 as f64, (sum_all - sum0) / w1 as f64);
        let between = w0 as f64 * w1 as f64 * (m0 - m1) * (m0 - m1);
        if between > best {
            best = between;
            best_t = t;
        }
    }
    best_t
}

impl<S: RangeRead> Slide<S> {
    /// The patch grid for these parameters, from the header alone (planning splits it into
    /// bands of rows).
    pub fn patch_grid(&self, p: &PatchParams) -> Result<PatchGrid, WsiError> {
        let info = self.info();
        if p.patch == 0 || p.stride == 0 {
            return Err(WsiError::Corrupt("patch size and stride must be positive".into()));
        }
        let level = info.level_for_magnification(p.magnification).ok_or_else(|| {
            WsiError::Unsupported("a slide that states neither its magnification nor its pixel size".into())
        })?;
        let magnification = info.magnification(level).expect("a level was found by magnification");
        let mask_level = info.level_for_magnification(p.mask_magnification).unwrap_or(info.levels.len() - 1);
        let l = &info.levels[level];
        // Patch and stride in pixels of the patch level (larger when it is more detailed
        // than asked).
        let scale = (magnification / p.magnification).max(1.0);
        let side = (f64::from(p.patch) * scale).round() as u64;
        let step = (f64::from(p.stride) * scale).round() as u64;
        let (cols, rows) = if l.width >= side && l.height >= side {
            ((l.width - side) / step + 1, (l.height - side) / step + 1)
        } else {
            (0, 0)
        };
        Ok(PatchGrid { level, magnification, mask_level, side, step, cols, rows })
    }
}

#[cfg(feature = "pixels")]
impl<S: RangeRead> Slide<S> {
    /// Finds the tissue patches of this slide (of the band `p.grid_rows` when given).
    pub fn select_patches(&self, p: &PatchParams) -> Result<PatchSelection, WsiError> {
        let info = self.info();
        let PatchGrid { level, magnification: mag, mask_level, side, step, cols, rows } = self.patch_grid(p)?;
        let l = &info.levels[level];
        let cells_n = (cols * rows) as usize;
        if cells_n == 0 {
            return Ok(PatchSelection {
                level,
                magnification: mag,
                mask_level,
                grid_cells: 0,
                tissue_cells: 0,
                patches: Vec::new(),
                threshold: None,
            });
        }
        if cells_n > 50_000_000 {
            return Err(WsiError::TooLarge(format!("a grid of {cells_n} patches")));
        }
        // Patch-level pixels per mask pixel.
        let m = &info.levels[mask_level];
        let ratio = m.downsample / l.downsample;
        // Each mask pixel's grid cell (only cells of whole patches: the margin past the last
        // one is in none), from the pixel's centre in patch-level pixels.
        let cell_of = |mx: u64, my: u64| -> Option<usize> {
            let (lx, ly) = ((mx as f64 + 0.5) * ratio, (my as f64 + 0.5) * ratio);
            let (cx, cy) = ((lx / step as f64) as u64, (ly / step as f64) as u64);
            let (within_x, within_y) = (lx - (cx * step) as f64, ly - (cy * step) as f64);
            let inside = cx < cols && cy < rows && within_x < side as f64 && within_y < side as f64;
            inside.then_some((cy * cols + cx) as usize)
        };
        // Otsu needs the slide's saturation histogram before any pixel is judged: a first
        // pass over the (small) mask level.
        let threshold = if p.method == TissueMethod::OtsuSaturation {
            let mut hist = [0u64; 256];
            self.scan_level(mask_level, |_, _, _, sat| hist[(sat * 255.0).round().clamp(0.0, 255.0) as usize] += 1)?;
            Some(otsu(&hist) as f64 / 255.0)
        } else {
            None
        };
        let mut cells = vec![Cell::default(); cells_n];
        self.scan_level(mask_level, |mx, my, lum, sat| {
            let Some(i) = cell_of(mx, my) else { return };
            let c = &mut cells[i];
            c.luminance += lum;
            c.saturation += sat;
            c.pixels += 1;
            let tissue_px = match threshold {
                None => lum >= p.min_luminance && lum <= p.max_luminance,
                Some(t) => sat > t,
            };
            c.in_range += u64::from(tissue_px);
        })?;
        let mut tissue: Vec<Patch> = Vec::new();
        let mut tissue_cells = 0;
        for (i, c) in cells.iter().enumerate() {
            if c.pixels == 0 {
                continue;
            }
            let (lum, sat) = (c.luminance / c.pixels as f64, c.saturation / c.pixels as f64);
            let is_tissue = match threshold {
                None => lum >= p.min_luminance && lum <= p.max_luminance,
                Some(t) => sat > t,
            };
            if !is_tissue {
                continue;
            }
            tissue_cells += 1;
            let (cx, cy) = (i as u64 % cols, i as u64 / cols);
            if p.grid_rows.is_some_and(|(start, end)| cy < start || cy >= end) {
                continue;
            }
            tissue.push(Patch {
                level,
                x: cx * step,
                y: cy * step,
                width: side as u32,
                height: side as u32,
                tissue_fraction: c.in_range as f32 / c.pixels as f32,
            });
        }
        let patches = match p.max_patches {
            Some(n) => self.sample(tissue, n, p.seed),
            None => tissue,
        };
        Ok(PatchSelection {
            level,
            magnification: mag,
            mask_level,
            grid_cells: cells_n,
            tissue_cells,
            patches,
            threshold,
        })
    }
}

#[cfg(feature = "pixels")]
impl<S: RangeRead> Slide<S> {
    /// Up to `n` of this slide's `patches`, in their order: a sample seeded with `seed` and the
    /// slide's header digest, so the same slide and seed give the same sample and slides of
    /// one run are sampled independently.
    pub fn sample(&self, patches: Vec<Patch>, n: usize, seed: u64) -> Vec<Patch> {
        if n >= patches.len() {
            return patches;
        }
        let info = self.info();
        let digest = u64::from_str_radix(&info.header_digest[..16.min(info.header_digest.len())], 16).unwrap_or(0);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ digest);
        let mut picked = rand::seq::index::sample(&mut rng, patches.len(), n).into_vec();
        picked.sort_unstable();
        picked.into_iter().map(|i| patches[i]).collect()
    }

    /// Visits every pixel of `level` inside the level, tile by tile: (x, y, luminance 0–1 as
    /// OpenCV's RGB to grey, HSV saturation 0–1).
    fn scan_level(&self, level: usize, mut f: impl FnMut(u64, u64, f64, f64)) -> Result<(), WsiError> {
        let m = &self.info().levels[level];
        for row in 0..m.tiles_down() {
            let wanted: Vec<(u64, u64)> = (0..m.tiles_across()).map(|col| (col, row)).collect();
            let tiles = self.read_tiles(level, &wanted)?;
            for (&(col, _), tile) in wanted.iter().zip(&tiles) {
                let (tx, ty) = (col * u64::from(m.tile_width), row * u64::from(m.tile_height));
                for (px, py, rgb) in tile.enumerate_pixels() {
                    let (x, y) = (tx + u64::from(px), ty + u64::from(py));
                    if x >= m.width || y >= m.height {
                        continue;
                    }
                    let [r, g, b] = rgb.0.map(f64::from);
                    let lum = (0.299 * r + 0.587 * g + 0.114 * b) / 255.0;
                    let (max, min) = (r.max(g).max(b), r.min(g).min(b));
                    let sat = if max > 0.0 { (max - min) / max } else { 0.0 };
                    f(x, y, lum, sat);
                }
            }
        }
        Ok(())
    }
}

#[cfg(all(test, feature = "pixels"))]
mod tests {
    use super::*;

    #[test]
    fn otsu_splits_two_modes() {
        let mut h = [0u64; 256];
        h[20] = 100;
        h[25] = 80;
        h[200] = 50;
        h[210] = 70;
        let t = otsu(&h);
        assert!((25..200).contains(&t), "{t}");
        assert_eq!(otsu(&[0; 256]), 0);
    }
}
