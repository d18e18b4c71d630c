//! The pyramid from the TIFF structure: every directory's tags through the `tiff` crate,
//! tiled directories as levels, an SVS's stripped ones as associated images.

use super::source::{HeaderCursor, RangeRead};
use super::{
    header_digest, order_levels, AssociatedImage, Level, SlideFormat, SlideInfo, TileCodec, TileTable, WsiError,
    WsiLimits,
};
use tiff::decoder::{ifd::Value, Decoder};
use tiff::tags::Tag;
use tiff::TiffError;

/// Most directories walked: pyramids have a dozen or two; a longer chain is a loop the
/// crate did not catch or a file that is not a slide.
const MAX_DIRECTORIES: usize = 256;

/// One directory's tags as far as slides go.
struct Directory {
    width: u64,
    height: u64,
    tile: Option<(u32, u32)>,
    compression: u16,
    photometric: u16,
    samples: u16,
    bits: Vec<u16>,
    predictor: u16,
    planar: u16,
    subfile: u32,
    description: Option<String>,
    resolution: Option<(f64, f64, u16)>,
    offsets: Vec<u64>,
    byte_counts: Vec<u64>,
    jpeg_tables: Option<Vec<u8>>,
}

fn corrupt(e: TiffError) -> WsiError {
    match e {
        TiffError::IoError(io) => {
            if io.kind() == std::io::ErrorKind::UnexpectedEof {
                WsiError::Corrupt(format!("the file ends inside its header ({io})"))
            } else {
                WsiError::Io(io.to_string())
            }
        }
        TiffError::LimitsExceeded => WsiError::TooLarge("a header value is larger than the reader's limit".into()),
        other => WsiError::Corrupt(other.to_string()),
    }
}

fn unsigned<R: std::io::Read + std::io::Seek>(d: &mut Decoder<R>, tag: Tag) -> Result<Option<u64>, WsiError> {
    d.find_tag_unsigned::<u64>(tag).map_err(corrupt)
}

fn rational(v: Value) -> Option<f64> {
    match v {
        Value::Rational(n, d) if d != 0 => Some(f64::from(n) / f64::from(d)),
        Value::Unsigned(n) => Some(f64::from(n)),
        Value::Short(n) => Some(f64::from(n)),
        Value::Float(f) => Some(f64::from(f)),
        Value::Double(f) => Some(f),
        Value::List(mut l) if !l.is_empty() => rational(l.swap_remove(0)),
        _ => None,
    }
}

fn directory<R: std::io::Read + std::io::Seek>(d: &mut Decoder<R>) -> Result<Directory, WsiError> {
    let (width, height) = d.dimensions().map_err(corrupt)?;
    let tile = match (unsigned(d, Tag::TileWidth)?, unsigned(d, Tag::TileLength)?) {
        (Some(w), Some(h)) => Some((u32::try_from(w).unwrap_or(u32::MAX), u32::try_from(h).unwrap_or(u32::MAX))),
        _ => None,
    };
    let small = |v: Option<u64>, default: u16| v.map_or(default, |x| u16::try_from(x).unwrap_or(u16::MAX));
    let compression = small(unsigned(d, Tag::Compression)?, 1);
    let photometric = small(unsigned(d, Tag::PhotometricInterpretation)?, u16::MAX);
    let samples = small(unsigned(d, Tag::SamplesPerPixel)?, 1);
    let bits = d.find_tag_unsigned_vec::<u16>(Tag::BitsPerSample).map_err(corrupt)?.unwrap_or_else(|| vec![1]);
    let predictor = small(unsigned(d, Tag::Predictor)?, 1);
    let planar = small(unsigned(d, Tag::PlanarConfiguration)?, 1);
    let subfile = unsigned(d, Tag::NewSubfileType)?.map_or(0, |v| u32::try_from(v).unwrap_or(u32::MAX));
    let description = match d.find_tag(Tag::ImageDescription) {
        Ok(Some(Value::Ascii(s))) => Some(s),
        _ => None,
    };
    let resolution = {
        let x = d.find_tag(Tag::XResolution).ok().flatten().and_then(rational);
        let y = d.find_tag(Tag::YResolution).ok().flatten().and_then(rational);
        let unit = small(unsigned(d, Tag::ResolutionUnit).unwrap_or(None), 2);
        x.zip(y).map(|(x, y)| (x, y, unit))
    };
    let (offsets, byte_counts, jpeg_tables) = if tile.is_some() {
        let o = d.find_tag_unsigned_vec::<u64>(Tag::TileOffsets).map_err(corrupt)?.unwrap_or_default();
        let c = d.find_tag_unsigned_vec::<u64>(Tag::TileByteCounts).map_err(corrupt)?.unwrap_or_default();
        let t = if compression == 7 { d.find_tag_unsigned_vec::<u8>(Tag::JPEGTables).map_err(corrupt)? } else { None };
        (o, c, t)
    } else {
        (Vec::new(), Vec::new(), None)
    };
    Ok(Directory {
        width: u64::from(width),
        height: u64::from(height),
        tile,
        compression,
        photometric,
        samples,
        bits,
        predictor,
        planar,
        subfile,
        description,
        resolution,
        offsets,
        byte_counts,
        jpeg_tables,
    })
}

/// `key = value` pairs of an Aperio ImageDescription (`|`-separated after the first line).
fn aperio_value(description: &str, key: &str) -> Option<f64> {
    description.split('|').skip(1).find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim() == key).then(|| v.trim().parse::<f64>().ok()).flatten()
    })
}

fn check_level(i: usize, d: Directory, limits: &WsiLimits) -> Result<(Level, TileTable), WsiError> {
    let (tw, th) = d.tile.expect("levels are tiled");
    let what = |s: String| WsiError::Corrupt(format!("level {i}: {s}"));
    if d.width == 0 || d.height == 0 || tw == 0 || th == 0 {
        return Err(what(format!("empty dimensions ({}x{}, tiles {tw}x{th})", d.width, d.height)));
    }
    if d.width > limits.max_side || d.height > limits.max_side {
        return Err(WsiError::TooLarge(format!(
            "level {i} declares {}x{} pixels, over the limit of {} a side",
            d.width, d.height, limits.max_side
        )));
    }
    if tw > limits.max_tile_side || th > limits.max_tile_side {
        return Err(WsiError::TooLarge(format!(
            "level {i} declares tiles of {tw}x{th} pixels, over the limit of {} a side",
            limits.max_tile_side
        )));
    }
    let codec = TileCodec::from_tiff(d.compression)
        .ok_or_else(|| WsiError::Unsupported(format!("TIFF compression {} (level {i})", d.compression)))?;
    if d.planar != 1 {
        return Err(WsiError::Unsupported(format!("separate colour planes (level {i})")));
    }
    if d.bits.iter().any(|&b| b != 8) {
        return Err(WsiError::Unsupported(format!("{:?} bits per sample (level {i}); slides store 8", d.bits)));
    }
    if !matches!(d.samples, 1 | 3 | 4) {
        return Err(WsiError::Unsupported(format!("{} samples per pixel (level {i})", d.samples)));
    }
    let tiles = d.width.div_ceil(u64::from(tw)) * d.height.div_ceil(u64::from(th));
    if tiles > limits.max_tiles_per_level {
        return Err(WsiError::TooLarge(format!(
            "level {i} has {tiles} tiles, over the limit of {}",
            limits.max_tiles_per_level
        )));
    }
    if d.offsets.len() as u64 != tiles || d.byte_counts.len() as u64 != tiles {
        return Err(what(format!(
            "the tile table has {} offsets and {} byte counts for {tiles} tiles",
            d.offsets.len(),
            d.byte_counts.len()
        )));
    }
    let level = Level { width: d.width, height: d.height, tile_width: tw, tile_height: th, downsample: 1.0, codec };
    let table = TileTable {
        source: 0,
        fragments: false,
        offsets: d.offsets,
        byte_counts: d.byte_counts,
        jpeg_tables: d.jpeg_tables,
        photometric: d.photometric,
        samples: d.samples,
        predictor: d.predictor,
    };
    Ok((level, table))
}

pub(super) fn read(src: &dyn RangeRead, limits: &WsiLimits) -> Result<(SlideInfo, Vec<TileTable>), WsiError> {
    if src.size() < 8 {
        return Err(WsiError::NotASlide(format!("{} bytes, too short for a TIFF header", src.size())));
    }
    let mut cursor = HeaderCursor::new(src, limits.max_header_bytes);
    let mut magic = [0u8; 4];
    std::io::Read::read_exact(&mut cursor, &mut magic).map_err(|e| WsiError::Io(e.to_string()))?;
    if !matches!(&magic[..], b"II*\0" | b"MM\0*" | b"II+\0" | b"MM\0+") {
        let hint = crate::sniff::format_hint(&src.read_at(0, src.size().min(512) as usize).unwrap_or_default());
        return Err(WsiError::NotASlide(format!("no TIFF signature{hint}")));
    }
    std::io::Seek::seek(&mut cursor, std::io::SeekFrom::Start(0)).map_err(|e| WsiError::Io(e.to_string()))?;
    // Errors name the image directory (counted from 0) they were found in.
    let in_dir = |i: usize| {
        move |e: WsiError| match e {
            WsiError::Corrupt(r) => WsiError::Corrupt(format!("image directory {i}: {r}")),
            WsiError::TooLarge(r) => WsiError::TooLarge(format!("image directory {i}: {r}")),
            other => other,
        }
    };
    let mut decoder = Decoder::new(&mut cursor).map_err(corrupt).map_err(in_dir(0))?;
    let mut dirs = vec![directory(&mut decoder).map_err(in_dir(0))?];
    while decoder.more_images() {
        if dirs.len() >= MAX_DIRECTORIES {
            return Err(WsiError::Corrupt(format!("more than {MAX_DIRECTORIES} directories")));
        }
        let i = dirs.len();
        decoder.next_image().map_err(corrupt).map_err(in_dir(i))?;
        dirs.push(directory(&mut decoder).map_err(in_dir(i))?);
    }
    drop(decoder);
    let header_bytes_read = cursor.fetched();

    let first = &dirs[0];
    let aperio = first.description.as_deref().is_some_and(|s| s.starts_with("Aperio"));
    if first.tile.is_none() {
        return Err(WsiError::NotASlide("its first image is not tiled (a plain TIFF picture, not a pyramid)".into()));
    }
    let mut associated = Vec::new();
    if aperio {
        for (i, d) in dirs.iter().enumerate().filter(|(_, d)| d.tile.is_none()) {
            let name = match (i, d.subfile) {
                (_, 1) => "label",
                (_, 9) => "macro",
                (1, _) => "thumbnail",
                _ => continue,
            };
            associated.push(AssociatedImage { name, width: d.width, height: d.height });
        }
    }
    let (mpp, objective_power) = if aperio {
        let desc = first.description.as_deref().unwrap_or("");
        (aperio_value(desc, "MPP").filter(|m| *m > 0.0).map(|m| (m, m)), aperio_value(desc, "AppMag"))
    } else {
        let mpp = first.resolution.and_then(|(x, y, unit)| {
            let per = match unit {
                2 => 25_400.0,
                3 => 10_000.0,
                _ => return None,
            };
            (x > 0.0 && y > 0.0).then(|| (per / x, per / y))
        });
        (mpp, None)
    };
    let format = if aperio { SlideFormat::Aperio } else { SlideFormat::GenericTiff };

    // Levels: the tiled directories that are not marked as masks or associated images,
    // largest first (numbered so in errors).
    let mut level_dirs: Vec<Directory> = dirs.into_iter().filter(|d| d.tile.is_some() && d.subfile & !1 == 0).collect();
    level_dirs.sort_by(|a, b| b.width.cmp(&a.width).then(b.height.cmp(&a.height)));
    if level_dirs.len() > limits.max_levels {
        return Err(WsiError::TooLarge(format!(
            "{} levels, over the limit of {}",
            level_dirs.len(),
            limits.max_levels
        )));
    }
    let checked =
        level_dirs.into_iter().enumerate().map(|(i, d)| check_level(i, d, limits)).collect::<Result<Vec<_>, _>>()?;
    let (levels, tables) = order_levels(checked);
    let header_digest = header_digest(&format!("{}|{mpp:?}|{objective_power:?}", format.vendor()), &levels, &tables);
    Ok((SlideInfo { format, levels, mpp, objective_power, associated, header_digest, header_bytes_read }, tables))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aperio_descriptions() {
        let d = "Aperio Image Library v12.2.2 \n46000x32914 [0,100 46000x32914] (256x256) JPEG/RGB Q=30|AppMag = 20|StripeWidth = 20|MPP = 0.4990";
        assert_eq!(aperio_value(d, "AppMag"), Some(20.0));
        assert_eq!(aperio_value(d, "MPP"), Some(0.499));
        assert_eq!(aperio_value(d, "Gamma"), None);
    }
}
