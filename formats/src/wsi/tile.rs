//! Tile decoding: the stored bytes of one tile to RGB pixels, and regions assembled from
//! tiles. Every decoder runs under [`crate::guard::guarded`] with its output size known
//! beforehand (the tile's dimensions), so a tile that lies about itself is an error.

use super::source::{check_range, RangeRead};
use super::{Level, Slide, TileCodec, TileTable, WsiError};
use image::RgbImage;
use std::io::Read;

/// The colour of a region outside the slide or of a tile the file leaves out (byte count 0):
/// white, as glass without tissue looks.
pub const BACKGROUND: [u8; 3] = [255, 255, 255];

/// Tiles stored back to back are fetched with one read up to this many bytes.
pub const COALESCE_BYTES: u64 = 8 << 20;
/// Reads of one request for tiles ([`Slide::read_tiles`]) in flight at once: object stores
/// answer each ranged GET after tens of milliseconds whatever its size, so a patch of 16
/// tiles read one after the other is latency-bound (measured with the local S3 server: 125
/// patches of 896 px in 88 s one tile at a time; see docs/benchmarks.md for the figures with
/// coalescing and these concurrent reads).
pub const CONCURRENT_READS: usize = 8;

/// The decoded tiles of one run of tiles read together, or why they could not be.
type RunTiles = Result<Vec<RgbImage>, WsiError>;

/// Where a tile's stored bytes lie: `None` for a tile the file leaves out.
struct Span {
    source: usize,
    offset: u64,
    count: u64,
}

impl<S: RangeRead> Slide<S> {
    fn span(&self, level: usize, col: u64, row: u64) -> Result<Option<Span>, WsiError> {
        let (l, t) = self.level(level)?;
        let err = |reason: String| WsiError::Tile { level, col, row, reason };
        if col >= l.tiles_across() || row >= l.tiles_down() {
            return Err(err(format!("outside the {}x{} tile grid", l.tiles_across(), l.tiles_down())));
        }
        let i = (row * l.tiles_across() + col) as usize;
        let (offset, count) = (t.offsets[i], t.byte_counts[i]);
        if count == 0 {
            return Ok(None);
        }
        if count > self.limits.max_tile_bytes {
            return Err(err(format!("{count} stored bytes, over the limit of {}", self.limits.max_tile_bytes)));
        }
        let src = &self.sources[t.source];
        // The last frame of a DICOM level with a basic offset table runs to the end of the
        // file (its fragments end at the sequence delimiter).
        let count = if t.fragments { count.min(src.size().saturating_sub(offset)) } else { count };
        check_range(offset, count as usize, src.size())
            .map_err(|_| err(format!("its bytes {offset}..{} lie past the end of the file", offset + count)))?;
        Ok(Some(Span { source: t.source, offset, count }))
    }

    fn decode_tile(&self, level: usize, col: u64, row: u64, bytes: Option<Vec<u8>>) -> Result<RgbImage, WsiError> {
        let (l, t) = self.level(level)?;
        let err = |reason: String| WsiError::Tile { level, col, row, reason };
        let Some(mut bytes) = bytes else {
            return Ok(RgbImage::from_pixel(l.tile_width, l.tile_height, image::Rgb(BACKGROUND)));
        };
        if t.fragments {
            bytes = join_fragments(&bytes).map_err(err)?;
        }
        crate::guard::guarded(l.codec.name(), || decode(&bytes, l, t))
            .unwrap_or_else(Err)
            .map_err(|reason| err(format!("{} tile does not decode: {reason}", l.codec.name())))
    }

    /// Tile (`col`, `row`) of `level` as RGB, at the full tile size (edge tiles include the
    /// padding the file stores past the level's edge).
    pub fn read_tile(&self, level: usize, col: u64, row: u64) -> Result<RgbImage, WsiError> {
        let bytes = match self.span(level, col, row)? {
            None => None,
            Some(s) => {
                Some(self.sources[s.source].read_at(s.offset, s.count as usize).map_err(|e| WsiError::Tile {
                    level,
                    col,
                    row,
                    reason: format!("reading failed: {e}"),
                })?)
            }
        };
        self.decode_tile(level, col, row, bytes)
    }

    /// Tiles of `level`, in the order given: tiles stored back to back (as a row of a
    /// pyramid usually is) are fetched with one read, and up to [`CONCURRENT_READS`] reads
    /// are in flight at once, each decoding its own tiles.
    pub fn read_tiles(&self, level: usize, tiles: &[(u64, u64)]) -> Result<Vec<RgbImage>, WsiError> {
        let spans: Vec<Option<Span>> = tiles.iter().map(|&(c, r)| self.span(level, c, r)).collect::<Result<_, _>>()?;
        // Runs of consecutive tiles whose bytes follow each other in one file.
        let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
        for (i, s) in spans.iter().enumerate() {
            let joins = match (runs.last(), s) {
                (Some(run), Some(s)) => match &spans[run.end - 1] {
                    Some(prev) => {
                        let first = spans[run.start].as_ref().map_or(0, |f| f.offset);
                        prev.source == s.source
                            && prev.offset + prev.count == s.offset
                            && s.offset + s.count - first <= COALESCE_BYTES
                    }
                    None => false,
                },
                _ => false,
            };
            if joins {
                runs.last_mut().expect("checked").end = i + 1;
            } else {
                runs.push(i..i + 1);
            }
        }
        let fetch_and_decode = |run: &std::ops::Range<usize>| -> RunTiles {
            let (col, row) = tiles[run.start];
            let bytes: Vec<Option<Vec<u8>>> =
                match &spans[run.start] {
                    None => vec![None],
                    Some(first) => {
                        let last = spans[run.end - 1].as_ref().expect("runs of stored tiles");
                        let len = (last.offset + last.count - first.offset) as usize;
                        let all = self.sources[first.source]
                            .read_at(first.offset, len)
                            .map_err(|e| WsiError::Tile { level, col, row, reason: format!("reading failed: {e}") })?;
                        spans[run.clone()]
                            .iter()
                            .map(|s| {
                                let s = s.as_ref().expect("runs of stored tiles");
                                let at = (s.offset - first.offset) as usize;
                                Some(all[at..at + s.count as usize].to_vec())
                            })
                            .collect()
                    }
                };
            run.clone().zip(bytes).map(|(i, b)| self.decode_tile(level, tiles[i].0, tiles[i].1, b)).collect()
        };
        let per_run: Vec<RunTiles> = if runs.len() <= 1 {
            runs.iter().map(fetch_and_decode).collect()
        } else {
            let next = std::sync::atomic::AtomicUsize::new(0);
            let results: Vec<std::sync::Mutex<Option<RunTiles>>> =
                runs.iter().map(|_| std::sync::Mutex::new(None)).collect();
            std::thread::scope(|scope| {
                for _ in 0..CONCURRENT_READS.min(runs.len()) {
                    scope.spawn(|| loop {
                        let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(run) = runs.get(k) else { break };
                        let r = crate::guard::guarded("tile reader", || fetch_and_decode(run))
                            .unwrap_or_else(|p| Err(WsiError::Corrupt(p)));
                        *results[k].lock().expect("result slot") = Some(r);
                    });
                }
            });
            results.into_iter().map(|m| m.into_inner().expect("result slot").expect("every run was read")).collect()
        };
        let mut out = Vec::with_capacity(tiles.len());
        for r in per_run {
            out.extend(r?);
        }
        Ok(out)
    }

    /// The `width` × `height` region of `level` whose top-left corner is (`x`, `y`) in that
    /// level's pixels; what lies outside the level is [`BACKGROUND`].
    pub fn read_region(&self, level: usize, x: i64, y: i64, width: u32, height: u32) -> Result<RgbImage, WsiError> {
        let (l, _) = self.level(level)?;
        let bytes = u64::from(width) * u64::from(height) * 3;
        if bytes > self.limits.max_region_bytes {
            return Err(WsiError::TooLarge(format!(
                "a region of {width}x{height} pixels is over the limit of {} bytes",
                self.limits.max_region_bytes
            )));
        }
        let mut out = RgbImage::from_pixel(width, height, image::Rgb(BACKGROUND));
        let (tw, th) = (i64::from(l.tile_width), i64::from(l.tile_height));
        // The part of the region inside the level.
        let (x0, y0) = (x.max(0), y.max(0));
        let (x1, y1) = ((x + i64::from(width)).min(l.width as i64), (y + i64::from(height)).min(l.height as i64));
        if x0 >= x1 || y0 >= y1 {
            return Ok(out);
        }
        let wanted: Vec<(u64, u64)> = ((y0 / th)..=((y1 - 1) / th))
            .flat_map(|row| ((x0 / tw)..=((x1 - 1) / tw)).map(move |col| (col as u64, row as u64)))
            .collect();
        let tiles = self.read_tiles(level, &wanted)?;
        for (&(col, row), tile) in wanted.iter().zip(&tiles) {
            let (tx, ty) = (col as i64 * tw, row as i64 * th);
            // Overlap of this tile with the region, in level pixels.
            let (ox0, oy0) = (tx.max(x0), ty.max(y0));
            let (ox1, oy1) = ((tx + tw).min(x1), (ty + th).min(y1));
            for py in oy0..oy1 {
                let src = &tile.as_raw()[(((py - ty) * tw + (ox0 - tx)) * 3) as usize..][..((ox1 - ox0) * 3) as usize];
                let at = (((py - y) * i64::from(width) + (ox0 - x)) * 3) as usize;
                out.as_mut()[at..at + src.len()].copy_from_slice(src);
            }
        }
        Ok(out)
    }
}

/// The bytes of a frame stored as DICOM fragment items (item tag FFFE,E000 and a 32-bit
/// length, little endian), up to the end of the range or a sequence delimiter.
fn join_fragments(span: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(span.len());
    let mut at = 0;
    while at + 8 <= span.len() {
        let tag = &span[at..at + 4];
        let len = u32::from_le_bytes([span[at + 4], span[at + 5], span[at + 6], span[at + 7]]) as usize;
        if tag == [0xFE, 0xFF, 0xDD, 0xE0] {
            break;
        }
        if tag != [0xFE, 0xFF, 0x00, 0xE0] {
            return Err(format!("no fragment item at byte {at} of the frame"));
        }
        let body = at + 8;
        let end = body.checked_add(len).filter(|&e| e <= span.len()).ok_or("a fragment runs past the frame")?;
        out.extend_from_slice(&span[body..end]);
        at = end;
    }
    if out.is_empty() {
        return Err("the frame holds no fragment".into());
    }
    Ok(out)
}

fn decode(bytes: &[u8], l: &Level, t: &TileTable) -> Result<RgbImage, String> {
    let (tw, th) = (l.tile_width, l.tile_height);
    match l.codec {
        TileCodec::Jpeg => jpeg(bytes, t, tw, th),
        TileCodec::Jpeg2000YCbCr => jpeg2000(bytes, tw, th, true),
        TileCodec::Jpeg2000Rgb => jpeg2000(bytes, tw, th, false),
        TileCodec::None | TileCodec::Lzw | TileCodec::Deflate => {
            let want = tw as usize * th as usize * t.samples as usize;
            let mut raw = match l.codec {
                TileCodec::None => bytes.to_vec(),
                TileCodec::Deflate => inflate(bytes, want)?,
                _ => lzw(bytes, want)?,
            };
            if raw.len() < want {
                return Err(format!("{} bytes where the tile needs {want}", raw.len()));
            }
            raw.truncate(want);
            match t.predictor {
                1 => {}
                2 => undo_horizontal_predictor(&mut raw, tw as usize, t.samples as usize),
                p => return Err(format!("predictor {p} is not supported")),
            }
            samples_to_rgb(raw, tw, th, t.samples, t.photometric)
        }
    }
}

/// Deflate (zlib) data, inflated to at most `want` bytes.
fn inflate(bytes: &[u8], want: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(want);
    flate2::read::ZlibDecoder::new(bytes).take(want as u64).read_to_end(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// TIFF LZW (most significant bit first, with TIFF's early code size switch), decoded into a
/// buffer of exactly `want` bytes: LZW can expand far beyond any ratio check.
fn lzw(bytes: &[u8], want: usize) -> Result<Vec<u8>, String> {
    let mut out = vec![0u8; want];
    let mut d = weezl::decode::Decoder::with_tiff_size_switch(weezl::BitOrder::Msb, 8);
    let (mut read, mut written) = (0, 0);
    while written < want {
        let r = d.decode_bytes(&bytes[read..], &mut out[written..]);
        read += r.consumed_in;
        written += r.consumed_out;
        match r.status {
            Ok(weezl::LzwStatus::Ok) if r.consumed_in == 0 && r.consumed_out == 0 => break,
            Ok(weezl::LzwStatus::Ok) => {}
            Ok(weezl::LzwStatus::Done | weezl::LzwStatus::NoProgress) => break,
            Err(e) => return Err(e.to_string()),
        }
    }
    out.truncate(written);
    Ok(out)
}

fn undo_horizontal_predictor(raw: &mut [u8], width: usize, samples: usize) {
    for row in raw.chunks_mut(width * samples) {
        for i in samples..row.len() {
            row[i] = row[i].wrapping_add(row[i - samples]);
        }
    }
}

fn samples_to_rgb(raw: Vec<u8>, w: u32, h: u32, samples: u16, photometric: u16) -> Result<RgbImage, String> {
    let rgb = match (samples, photometric) {
        (3, 2) => raw,
        (4, 2) => raw.chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect(),
        (1, 1) => raw.iter().flat_map(|&v| [v, v, v]).collect(),
        (1, 0) => raw.iter().flat_map(|&v| [255 - v, 255 - v, 255 - v]).collect(),
        (s, p) => return Err(format!("{s} samples with photometric interpretation {p} are not supported")),
    };
    RgbImage::from_raw(w, h, rgb).ok_or_else(|| "the samples do not fill the tile".to_string())
}

/// A JPEG tile: the level's JPEGTables spliced in front (an abbreviated stream carries no
/// tables of its own), colour as the photometric tag says.
fn jpeg(bytes: &[u8], t: &TileTable, tw: u32, th: u32) -> Result<RgbImage, String> {
    let stream: std::borrow::Cow<[u8]> = match &t.jpeg_tables {
        Some(tables) if tables.len() >= 4 && bytes.starts_with(&[0xFF, 0xD8]) => {
            // Tables: SOI, tables, EOI. Tile: SOI, the rest. Joined: SOI, tables, the rest.
            let mut s = Vec::with_capacity(tables.len() + bytes.len());
            s.extend_from_slice(&tables[..tables.len() - 2]);
            s.extend_from_slice(&bytes[2..]);
            s.into()
        }
        _ => bytes.into(),
    };
    let mut d = jpeg_decoder::Decoder::new(&stream[..]);
    // Photometric RGB: the components are R, G, B as stored (Aperio writes such tiles with
    // no marker saying so; guessing from the markers would turn them magenta). YCbCr (6) and
    // anything else with three components: converted to RGB.
    d.set_color_transform(match (t.photometric, t.samples) {
        (_, 1) => jpeg_decoder::ColorTransform::Grayscale,
        (2, _) => jpeg_decoder::ColorTransform::RGB,
        _ => jpeg_decoder::ColorTransform::YCbCr,
    });
    d.read_info().map_err(|e| e.to_string())?;
    let info = d.info().ok_or("no JPEG header")?;
    if u32::from(info.width) != tw || u32::from(info.height) != th {
        return Err(format!("the JPEG is {}x{}, the tile {tw}x{th}", info.width, info.height));
    }
    d.set_max_decoding_buffer_size(tw as usize * th as usize * 4);
    let px = d.decode().map_err(|e| e.to_string())?;
    let rgb = match info.pixel_format {
        jpeg_decoder::PixelFormat::RGB24 => px,
        jpeg_decoder::PixelFormat::L8 => px.iter().flat_map(|&v| [v, v, v]).collect(),
        other => return Err(format!("JPEG pixel format {other:?} is not supported")),
    };
    RgbImage::from_raw(tw, th, rgb).ok_or_else(|| "the JPEG does not fill the tile".to_string())
}

/// The image size a JPEG 2000 codestream declares (SIZ marker), read before decoding.
fn j2k_size(bytes: &[u8]) -> Option<(u32, u32)> {
    // SOC (FF4F) then SIZ (FF51): length, capabilities, Xsiz, Ysiz, XOsiz, YOsiz.
    if bytes.len() < 24 || bytes[..4] != [0xFF, 0x4F, 0xFF, 0x51] {
        return None;
    }
    let be = |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    let (x, y, xo, yo) = (be(8), be(12), be(16), be(20));
    Some((x.checked_sub(xo)?, y.checked_sub(yo)?))
}

/// Whether the codestream's coding style (COD marker of the main header) applies the
/// multiple component transform: the decoder then returns RGB itself.
fn j2k_mct(bytes: &[u8]) -> bool {
    let mut at = 4; // after SOC and at SIZ
    while at + 4 <= bytes.len() && bytes[at] == 0xFF {
        let marker = bytes[at + 1];
        if marker == 0x90 {
            break; // SOT: the main header is over
        }
        let len = usize::from(u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]));
        if marker == 0x52 {
            return bytes.get(at + 8).is_some_and(|&m| m != 0);
        }
        at += 2 + len;
    }
    false
}

/// Aperio's JPEG 2000 tiles: a bare codestream of three components, chroma possibly
/// subsampled. 33003 stores YCbCr without the codestream's colour transform and is converted
/// here; a 33003 codestream that does use the transform (some converters write one) comes
/// out of the decoder as RGB already and is taken as it is.
fn jpeg2000(bytes: &[u8], tw: u32, th: u32, ycbcr: bool) -> Result<RgbImage, String> {
    let ycbcr = ycbcr && !j2k_mct(bytes);
    let (w, h) = j2k_size(bytes).ok_or("not a JPEG 2000 codestream")?;
    if w != tw || h != th {
        return Err(format!("the codestream is {w}x{h}, the tile {tw}x{th}"));
    }
    let img = jpeg2k::Image::from_bytes(bytes).map_err(|e| e.to_string())?;
    let comps = img.components();
    if comps.len() < 3 {
        return Err(format!("{} components where 3 are needed", comps.len()));
    }
    let planes: Vec<(&[i32], u32, u32, u32)> = comps[..3]
        .iter()
        .map(|c| {
            let (cw, ch) = (c.width().max(1), c.height().max(1));
            (c.data(), cw, tw.div_ceil(cw), th.div_ceil(ch))
        })
        .collect();
    for (data, cw, dx, dy) in &planes {
        if data.len() < (*cw as usize) * (th.div_ceil(*dy) as usize) || *dx > 4 || *dy > 4 {
            return Err("a component is smaller than the tile".into());
        }
    }
    let sample = |p: usize, x: u32, y: u32| {
        let (data, cw, dx, dy) = planes[p];
        data[((y / dy) * cw + (x / dx)) as usize]
    };
    let mut out = RgbImage::new(tw, th);
    for y in 0..th {
        for x in 0..tw {
            let (a, b, c) = (sample(0, x, y), sample(1, x, y), sample(2, x, y));
            let px = if ycbcr {
                let (yy, cb, cr) = (f64::from(a), f64::from(b) - 128.0, f64::from(c) - 128.0);
                let clamp = |v: f64| v.round().clamp(0.0, 255.0) as u8;
                [clamp(yy + 1.402 * cr), clamp(yy - 0.344136 * cb - 0.714136 * cr), clamp(yy + 1.772 * cb)]
            } else {
                [a.clamp(0, 255) as u8, b.clamp(0, 255) as u8, c.clamp(0, 255) as u8]
            };
            out.put_pixel(x, y, image::Rgb(px));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_horizontal_predictor_is_undone_per_row() {
        let mut raw = vec![10, 20, 30, 1, 1, 1, 5, 5, 5, 2, 2, 2];
        undo_horizontal_predictor(&mut raw, 2, 3);
        assert_eq!(raw, vec![10, 20, 30, 11, 21, 31, 5, 5, 5, 7, 7, 7]);
    }

    #[test]
    fn lzw_output_is_capped() {
        let data = vec![7u8; 10_000];
        let packed = weezl::encode::Encoder::with_tiff_size_switch(weezl::BitOrder::Msb, 8).encode(&data).unwrap();
        assert_eq!(lzw(&packed, 10_000).unwrap(), data);
        assert_eq!(lzw(&packed, 100).unwrap().len(), 100);
        assert!(lzw(&[0xFF; 20], 100).is_err() || lzw(&[0xFF; 20], 100).unwrap().len() < 100);
    }

    #[test]
    fn codestream_sizes() {
        let mut siz = vec![0xFF, 0x4F, 0xFF, 0x51, 0, 41, 0, 0];
        for v in [240u32, 240, 0, 0] {
            siz.extend_from_slice(&v.to_be_bytes());
        }
        assert_eq!(j2k_size(&siz), Some((240, 240)));
        assert_eq!(j2k_size(b"not a codestream at all here"), None);
    }
}
