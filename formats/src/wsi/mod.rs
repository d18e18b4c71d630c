//! Whole-slide images: pyramidal tiled TIFF and BigTIFF, Aperio SVS, DICOM VL Whole Slide
//! Microscopy (TILED_FULL and TILED_SPARSE, one instance a level).
//!
//! Two calls. [`Slide::open`] reads the header only: the IFD chain, its tags and the tile
//! tables, through a small block cache and within a byte budget ([`WsiLimits`]) — what
//! planning needs (levels, dimensions, tile grid, µm per pixel, magnification) and the
//! slide's header digest. [`Slide::read_tile`] and [`Slide::read_region`] (feature `pixels`)
//! then read exactly the bytes of the tiles asked for, one range per tile: a slide is never
//! read whole nor held in memory, so it can be read straight from S3 through a ranged
//! [`RangeRead`].
//!
//! The TIFF structure comes from the `tiff` crate; tiles are decoded here (uncompressed,
//! LZW, Deflate with or without the horizontal predictor, JPEG with shared JPEGTables, JPEG
//! 2000 as Aperio writes it: 33003 YCbCr and 33005 RGB codestreams). JPEG colour follows the
//! photometric tag as libtiff does: YCbCr data is converted, RGB data is taken as stored,
//! whatever the JPEG markers suggest (Aperio writes RGB JPEG tiles without an Adobe marker).
//!
//! Levels are the tiled directories, largest first; in an SVS the stripped directories are
//! its associated images (thumbnail, label, macro). Errors name the level and tile and the
//! reason, never pixel content.

#[cfg(feature = "dicom-header")]
pub mod dicom;
pub mod source;
mod structure;
#[cfg(feature = "pixels")]
mod tile;
pub mod tissue;

pub use source::{BytesSource, FileSource, Metered, RangeRead};
#[cfg(feature = "pixels")]
pub use tile::BACKGROUND;

use medbatch_schemas::InputErrorKind;

/// Size limits of reading one slide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WsiLimits {
    /// Most bytes the header (IFDs, tags, tile tables) may make the reader fetch.
    pub max_header_bytes: u64,
    /// Widest or tallest level accepted, in pixels.
    pub max_side: u64,
    /// Most tiles in one level.
    pub max_tiles_per_level: u64,
    /// Widest or tallest tile, in pixels.
    pub max_tile_side: u32,
    /// Largest stored tile, in bytes.
    pub max_tile_bytes: u64,
    /// Most levels.
    pub max_levels: usize,
    /// Largest region one read may return (width × height × 3 bytes).
    pub max_region_bytes: u64,
}

/// A 40× slide of 200,000 pixels a side has about 600,000 tiles of 256 px in its first
/// level and 5–10 MB of tile tables; these limits leave an order of magnitude of room and
/// still bound what a hostile header can make a reader allocate.
pub const DEFAULT_WSI_LIMITS: WsiLimits = WsiLimits {
    max_header_bytes: 256 << 20,
    max_side: 1 << 21,
    max_tiles_per_level: 8 << 20,
    max_tile_side: 8192,
    max_tile_bytes: 64 << 20,
    max_levels: 64,
    max_region_bytes: 256 << 20,
};

impl Default for WsiLimits {
    fn default() -> Self {
        DEFAULT_WSI_LIMITS
    }
}

/// The file format, as far as reading goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlideFormat {
    /// A pyramidal tiled TIFF or BigTIFF of no particular scanner.
    GenericTiff,
    /// Aperio SVS (ImageDescription starting `Aperio`).
    Aperio,
    /// DICOM VL Whole Slide Microscopy: one instance a level.
    Dicom,
}

impl SlideFormat {
    /// The name OpenSlide gives the format (`openslide.vendor`).
    pub fn vendor(self) -> &'static str {
        match self {
            Self::GenericTiff => "generic-tiff",
            Self::Aperio => "aperio",
            Self::Dicom => "dicom",
        }
    }
}

/// How a level's tiles are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TileCodec {
    None,
    Lzw,
    Deflate,
    Jpeg,
    /// Aperio JPEG 2000, YCbCr components without the codestream's colour transform (33003).
    Jpeg2000YCbCr,
    /// Aperio JPEG 2000, RGB components (33005).
    Jpeg2000Rgb,
}

impl TileCodec {
    fn from_tiff(compression: u16) -> Option<Self> {
        Some(match compression {
            1 => Self::None,
            5 => Self::Lzw,
            8 | 32946 => Self::Deflate,
            7 => Self::Jpeg,
            33003 => Self::Jpeg2000YCbCr,
            33005 => Self::Jpeg2000Rgb,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::None => "uncompressed",
            Self::Lzw => "LZW",
            Self::Deflate => "Deflate",
            Self::Jpeg => "JPEG",
            Self::Jpeg2000YCbCr => "JPEG 2000 (YCbCr)",
            Self::Jpeg2000Rgb => "JPEG 2000 (RGB)",
        }
    }
}

/// One level of the pyramid.
#[derive(Clone, Debug, PartialEq)]
pub struct Level {
    pub width: u64,
    pub height: u64,
    pub tile_width: u32,
    pub tile_height: u32,
    /// Level 0's size over this level's (the mean of the two axes, as OpenSlide gives it).
    pub downsample: f64,
    pub codec: TileCodec,
}

impl Level {
    pub fn tiles_across(&self) -> u64 {
        self.width.div_ceil(u64::from(self.tile_width))
    }
    pub fn tiles_down(&self) -> u64 {
        self.height.div_ceil(u64::from(self.tile_height))
    }
}

/// An image stored beside the pyramid (SVS thumbnail, label, macro): named, not read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssociatedImage {
    pub name: &'static str,
    pub width: u64,
    pub height: u64,
}

/// What planning needs to know about a slide: read from its header alone.
#[derive(Clone, Debug, PartialEq)]
pub struct SlideInfo {
    pub format: SlideFormat,
    /// Largest first.
    pub levels: Vec<Level>,
    /// Micrometres per pixel of level 0 (x, y), when the file says.
    pub mpp: Option<(f64, f64)>,
    /// The scanner objective's magnification (Aperio `AppMag`), when the file says.
    pub objective_power: Option<f64>,
    pub associated: Vec<AssociatedImage>,
    /// SHA-256 over the pyramid's description and tile tables: with the object's ETag and
    /// size, the slide's identity, computed without reading any pixel data.
    pub header_digest: String,
    /// Bytes the header made the reader fetch.
    pub header_bytes_read: u64,
}

impl SlideInfo {
    /// The magnification of `level`, from the objective power or else from µm per pixel
    /// (10× = 1 µm per pixel, the convention of Google's pathology tools).
    pub fn magnification(&self, level: usize) -> Option<f64> {
        let l = self.levels.get(level)?;
        let base = self.objective_power.or_else(|| self.mpp.map(|(x, y)| 10.0 / ((x + y) / 2.0)))?;
        Some(base / l.downsample)
    }

    /// The level to read at `magnification`: the least detailed one at or above it (within
    /// 1 %: downsamples of odd-sized levels are not exact), or level 0 when every level is
    /// below it. `None` when the slide states neither objective nor pixel size.
    pub fn level_for_magnification(&self, magnification: f64) -> Option<usize> {
        let mags: Vec<f64> = (0..self.levels.len()).map(|i| self.magnification(i)).collect::<Option<_>>()?;
        if mags.is_empty() {
            return None;
        }
        Some((0..mags.len()).rev().find(|&i| mags[i] >= magnification * 0.99).unwrap_or(0))
    }

    /// The slide's identity, for planning and job ids: a SHA-256 over its version tag (an
    /// object store's ETag, when it has one), its size and its header digest. Planning never
    /// reads gigabytes of pixels to digest a slide.
    pub fn identity(&self, etag: Option<&str>, size: u64) -> medbatch_schemas::Digest {
        medbatch_schemas::Digest::of_bytes(
            format!("slide\n{}\n{size}\n{}", etag.unwrap_or(""), self.header_digest).as_bytes(),
        )
    }

    /// Micrometres per pixel of `level` (x, y).
    pub fn level_mpp(&self, level: usize) -> Option<(f64, f64)> {
        let l = self.levels.get(level)?;
        self.mpp.map(|(x, y)| (x * l.downsample, y * l.downsample))
    }
}

/// Why a slide or one of its tiles could not be read. Messages name levels, tiles, sizes and
/// codecs, never content.
#[derive(Debug, thiserror::Error)]
pub enum WsiError {
    #[error("not a TIFF slide: {0}")]
    NotASlide(String),
    #[error("the slide's header is corrupt: {0}")]
    Corrupt(String),
    #[error("the slide uses {0}, which this build cannot read")]
    Unsupported(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("level {level}, tile ({col}, {row}): {reason}")]
    Tile { level: usize, col: u64, row: u64, reason: String },
    #[error("no level {level} (the slide has {levels})")]
    NoLevel { level: usize, levels: usize },
    #[error("reading the slide failed: {0}")]
    Io(String),
}

impl WsiError {
    /// The error row kind this problem is reported as.
    pub fn kind(&self) -> InputErrorKind {
        match self {
            Self::NotASlide(_) => InputErrorKind::WrongFormat,
            Self::Corrupt(_) | Self::Tile { .. } | Self::NoLevel { .. } => InputErrorKind::CorruptImage,
            Self::Unsupported(_) => InputErrorKind::UnsupportedEncoding,
            Self::TooLarge(_) => InputErrorKind::TooLarge,
            Self::Io(_) => InputErrorKind::Unreadable,
        }
    }
}

/// Where one level's tiles lie and how they are stored (how: read by the pixel readers only).
#[derive(Clone, Debug)]
#[cfg_attr(not(feature = "pixels"), allow(dead_code))]
struct TileTable {
    /// Which of the slide's sources holds the level (DICOM: one instance a level).
    source: usize,
    offsets: Vec<u64>,
    byte_counts: Vec<u64>,
    /// The ranges hold DICOM fragment items (8-byte item headers before each fragment's
    /// bytes) rather than the tile's bytes alone.
    fragments: bool,
    jpeg_tables: Option<Vec<u8>>,
    /// As TIFF numbers it: 1 grey, 2 RGB, 6 YCbCr.
    photometric: u16,
    samples: u16,
    predictor: u16,
}

/// Levels sorted largest first, each with its downsample from the first (the mean of the two
/// axes, as OpenSlide gives it), split into descriptions and tile tables.
fn order_levels(mut levels: Vec<(Level, TileTable)>) -> (Vec<Level>, Vec<TileTable>) {
    levels.sort_by(|a, b| b.0.width.cmp(&a.0.width).then(b.0.height.cmp(&a.0.height)));
    let (w0, h0) = levels.first().map_or((1.0, 1.0), |(l, _)| (l.width as f64, l.height as f64));
    levels
        .into_iter()
        .map(|(mut l, t)| {
            l.downsample = (w0 / l.width as f64 + h0 / l.height as f64) / 2.0;
            (l, t)
        })
        .unzip()
}

/// The header digest: `head` (format, pixel size, objective and what else identifies the
/// slide), then each level's description and every tile's place, in a fixed layout.
fn header_digest(head: &str, levels: &[Level], tables: &[TileTable]) -> String {
    let mut canon = head.as_bytes().to_vec();
    for (l, t) in levels.iter().zip(tables) {
        let d = format!(
            "|{}x{}/{}x{}/{:?}/{}/{}|",
            l.width, l.height, l.tile_width, l.tile_height, l.codec, t.photometric, t.samples
        );
        canon.extend_from_slice(d.as_bytes());
        for (o, c) in t.offsets.iter().zip(&t.byte_counts) {
            canon.extend_from_slice(&o.to_le_bytes());
            canon.extend_from_slice(&c.to_le_bytes());
        }
        if let Some(j) = &t.jpeg_tables {
            canon.extend_from_slice(j);
        }
    }
    medbatch_schemas::Digest::of_bytes(&canon).as_str().to_string()
}

/// An open slide: its description and tile tables; tiles are read on request.
pub struct Slide<S: RangeRead> {
    sources: Vec<S>,
    info: SlideInfo,
    tables: Vec<TileTable>,
    /// Region sizes (the pixel readers').
    #[cfg_attr(not(feature = "pixels"), allow(dead_code))]
    limits: WsiLimits,
}

impl<S: RangeRead> Slide<S> {
    /// Reads the header of the TIFF slide (TIFF, BigTIFF, SVS) in `src`.
    pub fn open(src: S, limits: &WsiLimits) -> Result<Self, WsiError> {
        let (info, tables) = crate::guard::guarded("TIFF structure", || structure::read(&src, limits))
            .unwrap_or_else(|panic| Err(WsiError::Corrupt(panic)))?;
        Ok(Self { sources: vec![src], info, tables, limits: *limits })
    }

    /// Reads the headers of a DICOM whole-slide image: the instances of one series (one a
    /// level, plus label, overview and thumbnail images), in any order.
    pub fn open_dicom(sources: Vec<S>, limits: &WsiLimits) -> Result<Self, WsiError> {
        let (info, tables) = crate::guard::guarded("DICOM whole-slide", || dicom::read(&sources, limits))
            .unwrap_or_else(|panic| Err(WsiError::Corrupt(panic)))?;
        Ok(Self { sources, info, tables, limits: *limits })
    }

    pub fn info(&self) -> &SlideInfo {
        &self.info
    }

    /// The (first) source: the file of a TIFF slide.
    pub fn source(&self) -> &S {
        &self.sources[0]
    }

    pub fn sources(&self) -> &[S] {
        &self.sources
    }

    /// Which source holds `level` (DICOM: the instance of that level; TIFF: 0).
    pub fn level_source(&self, level: usize) -> usize {
        self.tables.get(level).map_or(0, |t| t.source)
    }

    #[cfg(feature = "pixels")]
    fn level(&self, level: usize) -> Result<(&Level, &TileTable), WsiError> {
        match (self.info.levels.get(level), self.tables.get(level)) {
            (Some(l), Some(t)) => Ok((l, t)),
            _ => Err(WsiError::NoLevel { level, levels: self.info.levels.len() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(levels: &[(u64, f64)], mpp: Option<f64>, power: Option<f64>) -> SlideInfo {
        SlideInfo {
            format: SlideFormat::GenericTiff,
            levels: levels
                .iter()
                .map(|&(w, d)| Level {
                    width: w,
                    height: w,
                    tile_width: 256,
                    tile_height: 256,
                    downsample: d,
                    codec: TileCodec::Jpeg,
                })
                .collect(),
            mpp: mpp.map(|m| (m, m)),
            objective_power: power,
            associated: Vec::new(),
            header_digest: String::new(),
            header_bytes_read: 0,
        }
    }

    #[test]
    fn magnification_from_the_objective_or_the_pixel_size() {
        let a = info(&[(40_000, 1.0), (10_000, 4.0), (2_500, 16.0)], Some(0.25), Some(40.0));
        assert_eq!(a.magnification(1), Some(10.0));
        assert_eq!(a.level_mpp(2), Some((4.0, 4.0)));
        let b = info(&[(40_000, 1.0), (10_000, 4.0)], Some(0.5), None);
        assert_eq!(b.magnification(0), Some(20.0));
        assert_eq!(info(&[(10, 1.0)], None, None).magnification(0), None);
        assert_eq!(a.levels[0].tiles_across(), 157);
        assert_eq!(a.level_for_magnification(10.0), Some(1));
        assert_eq!(a.level_for_magnification(1.25), Some(2));
        assert_eq!(a.level_for_magnification(80.0), Some(0));
        assert_eq!(b.level_for_magnification(10.0), Some(0));
        let id = a.identity(Some("\"abc\""), 100);
        assert_eq!(id, a.identity(Some("\"abc\""), 100));
        assert_ne!(id, a.identity(Some("\"abd\""), 100));
        assert_ne!(id, a.identity(Some("\"abc\""), 101));
    }

    #[test]
    fn error_kinds() {
        assert_eq!(WsiError::NotASlide("x".into()).kind(), InputErrorKind::WrongFormat);
        assert_eq!(WsiError::Unsupported("x".into()).kind(), InputErrorKind::UnsupportedEncoding);
        let t = WsiError::Tile { level: 1, col: 2, row: 3, reason: "offset past the end".into() };
        assert_eq!(t.to_string(), "level 1, tile (2, 3): offset past the end");
    }
}
