//! DICOM VL Whole Slide Microscopy: the instances of one series, one a pyramid level
//! (ImageType VOLUME) plus label, overview and thumbnail images. Each instance's header is
//! read up to its pixel data (dicom-rs, after the element lengths are checked), and its
//! frames are located without reading them: an Extended Offset Table, a Basic Offset Table,
//! or, for neither, the fragment item headers one by one; uncompressed frames by arithmetic.
//! TILED_FULL frames fill the tile grid row by row (the first focal plane and optical path
//! are read); TILED_SPARSE frames say where they lie, and tiles without a frame read as
//! background.

use super::source::{check_range, RangeRead};
use super::{
    header_digest, order_levels, AssociatedImage, Level, SlideFormat, SlideInfo, TileCodec, TileTable, WsiError,
    WsiLimits,
};
use crate::dicom::{pixel_data_at, sniff_preamble};
use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, InMemDicomObject, OpenFileOptions};

/// First bytes read for a header; doubled until the pixel data element is inside, up to the
/// header budget.
const FIRST_READ: u64 = 256 << 10;

const NATIVE: [&str; 3] = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"];
const JPEG: [&str; 3] = ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"];
const JPEG2000: [&str; 2] = ["1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"];

/// What one instance is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Volume,
    Label,
    Overview,
    Thumbnail,
    Other,
}

struct Instance {
    kind: Kind,
    series: String,
    width: u64,
    height: u64,
    mpp: Option<(f64, f64)>,
    objective: Option<f64>,
    level: Option<(Level, TileTable)>,
}

fn corrupt(i: usize, reason: impl std::fmt::Display) -> WsiError {
    WsiError::Corrupt(format!("instance {i}: {reason}"))
}

fn text(obj: &InMemDicomObject, tag: dicom_core::Tag) -> String {
    obj.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|v| v.trim_end_matches(['\0', ' ']).trim().to_string())
        .unwrap_or_default()
}

fn uint(obj: &InMemDicomObject, tag: dicom_core::Tag) -> Option<u64> {
    obj.get(tag).and_then(|e| e.to_int::<i64>().ok()).and_then(|v| u64::try_from(v).ok())
}

/// The first item of a sequence.
fn first_item(obj: &InMemDicomObject, tag: dicom_core::Tag) -> Option<&InMemDicomObject> {
    obj.get(tag).and_then(|e| e.items()).and_then(|items| items.first())
}

/// The bytes of a DICOM file up to its top-level pixel data element, read a range at a time
/// (256 KiB, doubled until the element is inside, up to `max` bytes), with every element
/// length before it checked; and where the pixel data starts and whether the data set is
/// explicit VR. Planning groups DICOM slides by these headers without streaming the files.
pub fn header_prefix(src: &dyn RangeRead, max: u64) -> Result<(Vec<u8>, usize, bool), WsiError> {
    let mut want = FIRST_READ.min(src.size());
    loop {
        let prefix = src.read_at(0, want as usize).map_err(|e| WsiError::Io(e.to_string()))?;
        let found = pixel_data_at(&prefix, src.size()).map_err(|e| WsiError::Corrupt(e.to_string()))?;
        if let Some((at, explicit)) = found {
            return Ok((prefix, at, explicit));
        }
        if want >= src.size() {
            sniff_preamble(&prefix[..]).map_err(|e| WsiError::NotASlide(e.to_string()))?;
            return Err(WsiError::Corrupt("no pixel data".into()));
        }
        if want >= max {
            return Err(WsiError::TooLarge(format!("no pixel data within the first {max} bytes")));
        }
        want = (want * 2).min(src.size()).min(max);
    }
}

fn header(src: &dyn RangeRead, i: usize, limits: &WsiLimits) -> Result<(DefaultDicomObject, usize, bool), WsiError> {
    let in_instance = |e: WsiError| match e {
        WsiError::Corrupt(r) => corrupt(i, r),
        WsiError::TooLarge(r) => WsiError::TooLarge(format!("instance {i}: {r}")),
        other => other,
    };
    let (prefix, at, explicit) = header_prefix(src, limits.max_header_bytes).map_err(in_instance)?;
    let (preamble, reader) = sniff_preamble(&prefix[..at]).map_err(|e| WsiError::NotASlide(e.to_string()))?;
    let obj = OpenFileOptions::new()
        .read_preamble(preamble)
        .read_until(tags::PIXEL_DATA)
        .from_reader(reader)
        .map_err(|e| corrupt(i, e))?;
    Ok((obj, at, explicit))
}

/// Reads a little-endian u32 at `at` of `src`.
fn read_u32s(src: &dyn RangeRead, at: u64, n: usize) -> std::io::Result<Vec<u32>> {
    let b = src.read_at(at, n * 4)?;
    Ok(b.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

fn instance(src: &dyn RangeRead, i: usize, limits: &WsiLimits) -> Result<Instance, WsiError> {
    let (obj, pixel_at, explicit) = header(src, i, limits)?;
    let syntax = obj.meta().transfer_syntax().trim_end_matches(['\0', ' ']).to_string();
    let image_type = text(&obj, tags::IMAGE_TYPE);
    let kind = match image_type.split('\\').nth(2).map(str::trim) {
        Some("VOLUME") => Kind::Volume,
        Some("LABEL") => Kind::Label,
        Some("OVERVIEW") => Kind::Overview,
        Some("THUMBNAIL") => Kind::Thumbnail,
        _ => Kind::Other,
    };
    let width = uint(&obj, tags::TOTAL_PIXEL_MATRIX_COLUMNS).or_else(|| uint(&obj, tags::COLUMNS)).unwrap_or(0);
    let height = uint(&obj, tags::TOTAL_PIXEL_MATRIX_ROWS).or_else(|| uint(&obj, tags::ROWS)).unwrap_or(0);
    let shared = first_item(&obj, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE);
    let mpp = shared
        .and_then(|s| first_item(s, tags::PIXEL_MEASURES_SEQUENCE))
        .and_then(|m| m.get(tags::PIXEL_SPACING))
        .and_then(|e| e.to_multi_float64().ok())
        .filter(|v| v.len() == 2 && v.iter().all(|x| x.is_finite() && *x > 0.0))
        // PixelSpacing is (row spacing, column spacing) in mm: y, then x.
        .map(|v| (v[1] * 1000.0, v[0] * 1000.0));
    let objective = first_item(&obj, tags::OPTICAL_PATH_SEQUENCE)
        .and_then(|p| p.get(tags::OBJECTIVE_LENS_POWER))
        .and_then(|e| e.to_float64().ok())
        .filter(|v| v.is_finite() && *v > 0.0);
    let series = text(&obj, tags::SERIES_INSTANCE_UID);
    let mut inst = Instance { kind, series, width, height, mpp, objective, level: None };
    if kind != Kind::Volume {
        return Ok(inst);
    }

    // The level: tile grid, codec, frames.
    let what = |s: String| corrupt(i, s);
    let (tw, th) = (uint(&obj, tags::COLUMNS).unwrap_or(0), uint(&obj, tags::ROWS).unwrap_or(0));
    if width == 0 || height == 0 || tw == 0 || th == 0 {
        return Err(what(format!("empty dimensions ({width}x{height}, tiles {tw}x{th})")));
    }
    if width > limits.max_side || height > limits.max_side {
        return Err(WsiError::TooLarge(format!(
            "instance {i} declares {width}x{height} pixels, over the limit of {} a side",
            limits.max_side
        )));
    }
    if tw > u64::from(limits.max_tile_side) || th > u64::from(limits.max_tile_side) {
        return Err(WsiError::TooLarge(format!(
            "instance {i} declares tiles of {tw}x{th} pixels, over the limit of {} a side",
            limits.max_tile_side
        )));
    }
    let (across, down) = (width.div_ceil(tw), height.div_ceil(th));
    let tiles = across * down;
    if tiles > limits.max_tiles_per_level {
        return Err(WsiError::TooLarge(format!(
            "instance {i} has {tiles} tiles, over the limit of {}",
            limits.max_tiles_per_level
        )));
    }
    let frames = uint(&obj, tags::NUMBER_OF_FRAMES).unwrap_or(1);
    if frames == 0 || frames > limits.max_tiles_per_level * 64 {
        return Err(what(format!("{frames} frames")));
    }
    let samples = uint(&obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1) as u16;
    let bits = uint(&obj, tags::BITS_ALLOCATED).unwrap_or(8);
    let photometric_name = text(&obj, tags::PHOTOMETRIC_INTERPRETATION);
    let codec = if NATIVE.contains(&syntax.as_str()) {
        if syntax == NATIVE[2] {
            return Err(WsiError::Unsupported(format!("big-endian pixel data (instance {i})")));
        }
        TileCodec::None
    } else if JPEG.contains(&syntax.as_str()) {
        TileCodec::Jpeg
    } else if JPEG2000.contains(&syntax.as_str()) {
        // The codestream's own colour transform (YBR_ICT, YBR_RCT) is undone by the decoder.
        TileCodec::Jpeg2000Rgb
    } else {
        return Err(WsiError::Unsupported(format!("transfer syntax {syntax} (instance {i})")));
    };
    let photometric = match (photometric_name.as_str(), codec) {
        ("MONOCHROME2", _) => 1,
        ("RGB", _) => 2,
        ("YBR_FULL_422" | "YBR_FULL", TileCodec::Jpeg) => 6,
        ("YBR_ICT" | "YBR_RCT", TileCodec::Jpeg2000Rgb) => 2,
        (p, _) => return Err(WsiError::Unsupported(format!("photometric interpretation {p} (instance {i})"))),
    };
    if bits != 8 || !matches!(samples, 1 | 3) || uint(&obj, tags::PLANAR_CONFIGURATION).unwrap_or(0) != 0 {
        return Err(WsiError::Unsupported(format!(
            "{samples} samples of {bits} bits (planar configuration {}) (instance {i})",
            uint(&obj, tags::PLANAR_CONFIGURATION).unwrap_or(0)
        )));
    }

    // Where each frame lies.
    let header_len = if explicit { 12 } else { 8 };
    let value_at = pixel_at as u64 + header_len;
    let io = |e: std::io::Error| what(format!("reading the frame table: {e}"));
    let (mut frame_at, mut frame_len, fragments): (Vec<u64>, Vec<u64>, bool) = if codec == TileCodec::None {
        let bytes = tw * th * u64::from(samples);
        let at: Vec<u64> = (0..frames).map(|f| value_at + f * bytes).collect();
        check_range(value_at, (frames * bytes) as usize, src.size())
            .map_err(|_| what(format!("its {frames} frames of {bytes} bytes run past the end of the file")))?;
        (at, vec![bytes; frames as usize], false)
    } else {
        // The basic offset table item, then the fragments.
        let head = src.read_at(value_at, 8).map_err(io)?;
        if head[..4] != [0xFE, 0xFF, 0x00, 0xE0] {
            return Err(what("the encapsulated pixel data does not start with an offset table item".into()));
        }
        let bot_len = u64::from(u32::from_le_bytes([head[4], head[5], head[6], head[7]]));
        let first = value_at + 8 + bot_len;
        let eot = obj.get(tags::EXTENDED_OFFSET_TABLE).and_then(|e| e.to_bytes().ok()).map(|b| b.to_vec());
        let eot_lengths =
            obj.get(tags::EXTENDED_OFFSET_TABLE_LENGTHS).and_then(|e| e.to_bytes().ok()).map(|b| b.to_vec());
        let u64s = |b: &[u8]| -> Vec<u64> {
            b.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()
        };
        if let (Some(o), Some(l)) = (eot, eot_lengths) {
            let (o, l) = (u64s(&o), u64s(&l));
            if o.len() as u64 != frames || l.len() as u64 != frames {
                return Err(what(format!("the extended offset table lists {} frames of {frames}", o.len())));
            }
            (o.iter().map(|x| first + x + 8).collect(), l, false)
        } else if bot_len > 0 {
            if bot_len != frames * 4 {
                return Err(what(format!("the basic offset table has {} entries for {frames} frames", bot_len / 4)));
            }
            let bot = read_u32s(src, value_at + 8, frames as usize).map_err(io)?;
            let at: Vec<u64> = bot.iter().map(|&x| first + u64::from(x)).collect();
            let mut len: Vec<u64> = at.windows(2).map(|w| w[1].saturating_sub(w[0])).collect();
            len.push(src.size().saturating_sub(*at.last().expect("frames > 0")));
            (at, len, true)
        } else {
            // No offset table: one fragment a frame, found item by item.
            let (mut at, mut len) = (Vec::with_capacity(frames as usize), Vec::with_capacity(frames as usize));
            let mut pos = first;
            for _ in 0..frames {
                let h = src.read_at(pos, 8).map_err(io)?;
                if h[..4] != [0xFE, 0xFF, 0x00, 0xE0] {
                    return Err(what(format!(
                        "fewer fragments than its {frames} frames, or several a frame without an offset table"
                    )));
                }
                let n = u64::from(u32::from_le_bytes([h[4], h[5], h[6], h[7]]));
                at.push(pos + 8);
                len.push(n);
                pos += 8 + n;
            }
            (at, len, false)
        }
    };

    // Frames onto the tile grid.
    let tiled_full = text(&obj, tags::DIMENSION_ORGANIZATION_TYPE) != "TILED_SPARSE";
    let (mut offsets, mut byte_counts) = (vec![0u64; tiles as usize], vec![0u64; tiles as usize]);
    if tiled_full {
        if frames < tiles {
            return Err(what(format!("{frames} frames for a grid of {tiles} tiles")));
        }
        // The first focal plane and optical path: the first `tiles` frames.
        frame_at.truncate(tiles as usize);
        frame_len.truncate(tiles as usize);
        offsets = frame_at;
        byte_counts = frame_len;
    } else {
        let per_frame = obj.get(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE).and_then(|e| e.items()).unwrap_or(&[]);
        if per_frame.len() as u64 != frames {
            return Err(what(format!("TILED_SPARSE with {} frame positions for {frames} frames", per_frame.len())));
        }
        for (f, item) in per_frame.iter().enumerate() {
            let pos = first_item(item, tags::PLANE_POSITION_SLIDE_SEQUENCE);
            let col = pos
                .and_then(|p| p.get(tags::COLUMN_POSITION_IN_TOTAL_IMAGE_PIXEL_MATRIX))
                .and_then(|e| e.to_int::<i64>().ok());
            let row = pos
                .and_then(|p| p.get(tags::ROW_POSITION_IN_TOTAL_IMAGE_PIXEL_MATRIX))
                .and_then(|e| e.to_int::<i64>().ok());
            let (Some(col), Some(row)) = (col, row) else {
                return Err(what(format!("frame {f} has no position in the total pixel matrix")));
            };
            // 1-based pixel positions of the tile's top-left corner.
            let (x, y) = (u64::try_from(col - 1).unwrap_or(u64::MAX), u64::try_from(row - 1).unwrap_or(u64::MAX));
            if x >= width || y >= height || x % tw != 0 || y % th != 0 {
                return Err(what(format!("frame {f} lies at ({col}, {row}), off the tile grid")));
            }
            let t = ((y / th) * across + x / tw) as usize;
            if byte_counts[t] == 0 {
                offsets[t] = frame_at[f];
                byte_counts[t] = frame_len[f];
            }
        }
    }
    let level = Level { width, height, tile_width: tw as u32, tile_height: th as u32, downsample: 1.0, codec };
    let table =
        TileTable { source: i, offsets, byte_counts, fragments, jpeg_tables: None, photometric, samples, predictor: 1 };
    inst.level = Some((level, table));
    Ok(inst)
}

pub(super) fn read<S: RangeRead>(sources: &[S], limits: &WsiLimits) -> Result<(SlideInfo, Vec<TileTable>), WsiError> {
    if sources.is_empty() {
        return Err(WsiError::NotASlide("no DICOM instances".into()));
    }
    let mut instances = Vec::with_capacity(sources.len());
    let mut header_bytes_read = 0;
    for (i, s) in sources.iter().enumerate() {
        let metered = super::source::Metered::new(s);
        instances.push(instance(&metered, i, limits)?);
        header_bytes_read += metered.counts().1;
    }
    let series = instances[0].series.clone();
    if let Some(i) = instances.iter().position(|x| x.series != series) {
        return Err(WsiError::Corrupt(format!("instance {i} belongs to another series than instance 0")));
    }
    let levels: Vec<(Level, TileTable)> = instances.iter_mut().filter_map(|x| x.level.take()).collect();
    if levels.is_empty() {
        return Err(WsiError::NotASlide("no instance of the series is a pyramid level (ImageType VOLUME)".into()));
    }
    if levels.len() > limits.max_levels {
        return Err(WsiError::TooLarge(format!("{} levels, over the limit of {}", levels.len(), limits.max_levels)));
    }
    let (levels, tables) = order_levels(levels);
    let base = instances.iter().find(|x| x.kind == Kind::Volume && x.width == levels[0].width);
    let mpp = base.and_then(|b| b.mpp);
    let objective_power = base.and_then(|b| b.objective);
    let mut associated: Vec<AssociatedImage> = instances
        .iter()
        .filter_map(|x| {
            let name = match x.kind {
                Kind::Label => "label",
                Kind::Overview => "macro",
                Kind::Thumbnail => "thumbnail",
                _ => return None,
            };
            Some(AssociatedImage { name, width: x.width, height: x.height })
        })
        .collect();
    associated.sort_by_key(|a| a.name);
    let header_digest = header_digest(&format!("dicom|{series}|{mpp:?}|{objective_power:?}"), &levels, &tables);
    let info = SlideInfo {
        format: SlideFormat::Dicom,
        levels,
        mpp,
        objective_power,
        associated,
        header_digest,
        header_bytes_read,
    };
    Ok((info, tables))
}
