//! Whole-slide reading against OpenSlide: OpenSlide's own sample slides (boxes.tiff,
//! small.svs; fetched from openslide-python's source package by infra/test.sh, LGPL, never
//! committed) and synthetic pyramids written by tifffile and imagecodecs in every codec the
//! reader takes (JPEG in YCbCr and in RGB, JPEG 2000 as Aperio's 33003 and 33005, LZW with
//! the predictor, Deflate, uncompressed; TIFF and BigTIFF), and DICOM VL Whole Slide
//! Microscopy pyramids written with pydicom (JPEG frames found through a basic or an extended
//! offset table, JPEG 2000 frames through their fragment items, a TILED_SPARSE uncompressed
//! level whose glass tiles are left out). Levels, dimensions, downsamples,
//! µm per pixel and magnification equal OpenSlide's; every pixel of several regions per level
//! (across tile edges, at the level's edge) equals OpenSlide's `read_region`, exactly for
//! lossless tiles and within JPEG decoder tolerance for lossy ones. Damaged slides give the
//! errors that name level, tile and reason.

use medbatch_formats::wsi::{FileSource, Metered, Slide, SlideFormat, WsiError, WsiLimits};
use medbatch_schemas::InputErrorKind;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn python() -> String {
    std::env::var("MEDBATCH_PYTHON").expect("MEDBATCH_PYTHON: run the tests through `bash infra/test.sh`")
}

fn oracle_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/wsi_oracle.py")
}

fn oracle(args: &[&str]) -> Vec<u8> {
    let o = Command::new(python()).arg(oracle_script()).args(args).output().expect("python");
    assert!(o.status.success(), "wsi_oracle.py {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    o.stdout
}

/// OpenSlide's sample slides.
fn openslide_fixture(name: &str) -> PathBuf {
    let dir = std::env::var("MEDBATCH_OPENSLIDE_DATA")
        .expect("MEDBATCH_OPENSLIDE_DATA: run the tests through `bash infra/test.sh`");
    let p = Path::new(&dir).join(name);
    assert!(p.is_file(), "{} missing", p.display());
    p
}

fn synthetic() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    oracle(&["make", path.to_str().unwrap()]);
    (dir, path)
}

/// A TIFF slide, or a DICOM slide made of every `.dcm` file in the folder of `path` (as
/// OpenSlide finds the instances of a series beside the one it is given).
fn open(path: &Path) -> Result<Slide<FileSource>, WsiError> {
    if path.extension().is_some_and(|e| e == "dcm") {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
            .collect();
        // In reverse order: the reader sorts the levels itself.
        files.sort();
        files.reverse();
        let sources = files.iter().map(|p| FileSource::open(p).unwrap()).collect();
        return Slide::open_dicom(sources, &WsiLimits::default());
    }
    Slide::open(FileSource::open(path).unwrap(), &WsiLimits::default())
}

/// The description equals OpenSlide's.
fn same_description(path: &Path) {
    let slide = open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let info = slide.info();
    let want: Value = serde_json::from_slice(&oracle(&["describe", path.to_str().unwrap()])).unwrap();
    let name = path.file_name().unwrap().to_string_lossy();
    assert_eq!(want["vendor"], info.format.vendor(), "{name}");
    let pairs = |v: &Value| -> Vec<(u64, u64)> {
        v.as_array().unwrap().iter().map(|d| (d[0].as_u64().unwrap(), d[1].as_u64().unwrap())).collect()
    };
    let dims: Vec<(u64, u64)> = info.levels.iter().map(|l| (l.width, l.height)).collect();
    assert_eq!(dims, pairs(&want["level_dimensions"]), "{name}");
    for (l, d) in info.levels.iter().zip(want["level_downsamples"].as_array().unwrap()) {
        assert!((l.downsample - d.as_f64().unwrap()).abs() < 1e-9, "{name}: {} vs {d}", l.downsample);
    }
    let tiles: Vec<(u64, u64)> =
        info.levels.iter().map(|l| (u64::from(l.tile_width), u64::from(l.tile_height))).collect();
    assert_eq!(tiles, pairs(&want["tile_sizes"]), "{name}");
    match (info.mpp, want["mpp"][0].as_f64()) {
        (Some((x, y)), Some(wx)) => {
            assert!((x - wx).abs() < 1e-6 && (y - want["mpp"][1].as_f64().unwrap()).abs() < 1e-6, "{name}: {x} vs {wx}")
        }
        (None, None) => {}
        (a, b) => panic!("{name}: mpp {a:?} vs OpenSlide's {b:?}"),
    }
    assert_eq!(info.objective_power, want["objective_power"].as_f64(), "{name}");
    let assoc: Vec<&str> = info.associated.iter().map(|a| a.name).collect();
    let want_assoc: Vec<&str> = want["associated"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(assoc, want_assoc, "{name}");
    assert_eq!(info.header_digest.len(), 64);
}

/// Pixels of a region equal OpenSlide's within `tolerance` (max) and `mean_tolerance`; only
/// pixels inside the level are compared (OpenSlide leaves the outside transparent, this
/// reader white).
fn same_region(path: &Path, level: usize, (x, y, w, h): (i64, i64, u32, u32), (tolerance, mean_tolerance): (u8, f64)) {
    let slide = open(path).unwrap();
    let l = &slide.info().levels[level];
    let ds = l.downsample.round() as i64;
    let got = slide.read_region(level, x, y, w, h).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let args: Vec<String> =
        [level as i64, x * ds, y * ds, i64::from(w), i64::from(h)].iter().map(i64::to_string).collect();
    let mut a = vec!["region", path.to_str().unwrap()];
    a.extend(args.iter().map(String::as_str));
    let want = oracle(&a);
    assert_eq!(want.len(), (w * h * 3) as usize);
    let (mut max, mut sum, mut n) = (0u8, 0u64, 0u64);
    for py in 0..h as i64 {
        for px in 0..w as i64 {
            let (lx, ly) = (x + px, y + py);
            if lx < 0 || ly < 0 || lx >= l.width as i64 || ly >= l.height as i64 {
                assert_eq!(got.get_pixel(px as u32, py as u32).0, [255, 255, 255], "outside the level is white");
                continue;
            }
            let i = ((py * i64::from(w) + px) * 3) as usize;
            for c in 0..3 {
                let d = got.as_raw()[i + c].abs_diff(want[i + c]);
                max = max.max(d);
                sum += u64::from(d);
                n += 1;
            }
        }
    }
    let mean = sum as f64 / n.max(1) as f64;
    assert!(
        max <= tolerance && mean <= mean_tolerance,
        "{} level {level} ({x}, {y}) {w}x{h}: max difference {max}, mean {mean:.3} (allowed {tolerance}, {mean_tolerance})",
        path.display()
    );
}

#[test]
fn openslide_sample_slides_read_as_openslide_reads_them() {
    let boxes = openslide_fixture("boxes.tiff");
    same_description(&boxes);
    let slide = open(&boxes).unwrap();
    assert_eq!(slide.info().format, SlideFormat::GenericTiff);
    // Deflate with the horizontal predictor: exact.
    same_region(&boxes, 0, (0, 0, 300, 250), (0, 0.0));
    same_region(&boxes, 0, (37, 41, 100, 90), (0, 0.0));
    same_region(&boxes, 1, (0, 0, 150, 125), (0, 0.0));
    same_region(&boxes, 2, (0, 0, 75, 62), (0, 0.0));

    let small = openslide_fixture("small.svs");
    same_description(&small);
    assert_eq!(open(&small).unwrap().info().format, SlideFormat::Aperio);
    // One JPEG tile with JPEGTables, RGB components as stored (a YCbCr guess turns it magenta).
    same_region(&small, 0, (0, 0, 16, 16), (2, 0.5));

    // The same slide as DICOM VL Whole Slide Microscopy: a JPEG level (empty basic offset
    // table) and an uncompressed thumbnail instance.
    let dicom = openslide_fixture("boxes_0.dcm");
    same_description(&dicom);
    assert_eq!(open(&dicom).unwrap().info().format, SlideFormat::Dicom);
    same_region(&dicom, 0, (0, 0, 16, 16), (2, 0.5));
}

#[test]
fn synthetic_pyramids_in_every_codec_read_as_openslide_reads_them() {
    let (_keep, dir) = synthetic();
    // (file, largest difference, mean difference allowed). JPEG: jpeg-decoder against
    // OpenSlide's libjpeg-turbo (IDCT rounding, chroma upsampling; measured at most 3 and a
    // mean of 0.14); JPEG 2000: both decode with OpenJPEG, each converts YCbCr itself
    // (measured at most 1).
    let slides = [
        ("raw.tiff", 0, 0.0),
        ("deflate.tiff", 0, 0.0),
        ("lzw-predictor.tiff", 0, 0.0),
        ("jpeg-ycbcr.tiff", 4, 0.2),
        ("jpeg-rgb.tiff", 4, 0.2),
        ("aperio-j2k-ycbcr.svs", 1, 0.01),
        ("aperio-j2k-rgb.svs", 1, 0.01),
        ("dicom-jpeg-bot/level-0.dcm", 4, 0.2),
        ("dicom-jpeg-eot/level-0.dcm", 4, 0.2),
        ("dicom-j2k/level-0.dcm", 1, 0.01),
        ("dicom-sparse/level-0.dcm", 0, 0.0),
    ];
    for (name, tol, mean) in slides {
        let path = dir.join(name);
        same_description(&path);
        same_region(&path, 0, (0, 0, 1000, 760), (tol, mean));
        same_region(&path, 0, (230, 250, 300, 270), (tol, mean));
        same_region(&path, 0, (900, 700, 200, 100), (tol, mean));
        same_region(&path, 1, (100, 100, 400, 280), (tol, mean));
        same_region(&path, 2, (0, 0, 250, 190), (tol, mean));
    }
}

#[test]
fn a_tile_read_fetches_only_that_tiles_bytes() {
    let (_keep, dir) = synthetic();
    let path = dir.join("jpeg-ycbcr.tiff");
    let size = std::fs::metadata(&path).unwrap().len();
    let slide = Slide::open(Metered::new(FileSource::open(&path).unwrap()), &WsiLimits::default()).unwrap();
    let (requests, bytes) = slide.source().counts();
    assert!(requests <= 4, "{requests} requests for the header");
    assert_eq!(bytes, slide.info().header_bytes_read);
    slide.read_tile(0, 1, 1).unwrap();
    let (r2, b2) = slide.source().counts();
    assert_eq!(r2, requests + 1, "one request a tile");
    assert!(b2 - bytes < size / 8, "a tile read {} of {size} bytes", b2 - bytes);
    // A region over 4 x 3 tiles: tiles stored back to back (here all twelve, row after row)
    // come with one read.
    let before = slide.source().counts().0;
    let region = slide.read_region(0, 0, 0, 1000, 700).unwrap();
    assert_eq!(slide.source().counts().0 - before, 1, "tiles stored back to back come with one read");
    let one_by_one = open(&path).unwrap();
    for (col, row) in [(0u32, 0u32), (3, 2)] {
        let tile = one_by_one.read_tile(0, u64::from(col), u64::from(row)).unwrap();
        let (x, y) = (col * 256, row * 256);
        for (dx, dy) in [(0, 0), (100, 50), (200, 150)] {
            if x + dx < 1000 && y + dy < 700 {
                assert_eq!(region.get_pixel(x + dx, y + dy), tile.get_pixel(dx, dy));
            }
        }
    }
}

fn damaged(dir: &Path, kind: &str) -> PathBuf {
    let out = dir.join(format!("damaged-{kind}.tiff"));
    oracle(&["damage", dir.join("jpeg-ycbcr.tiff").to_str().unwrap(), out.to_str().unwrap(), kind]);
    out
}

#[test]
fn damaged_slides_give_errors_naming_level_tile_and_reason() {
    let (_keep, dir) = synthetic();

    let e = open(&damaged(&dir, "truncate")).err().expect("a truncated slide does not open");
    assert_eq!(e.kind(), InputErrorKind::CorruptImage, "{e}");

    let e = open(&damaged(&dir, "huge")).err().expect("an absurd size is refused");
    assert!(matches!(e, WsiError::TooLarge(_) | WsiError::Corrupt(_)), "{e}");
    assert!(e.to_string().contains("image directory 0"), "{e}");

    let e = open(&damaged(&dir, "short-table")).err().expect("a short tile table is refused");
    assert!(e.to_string().contains("image directory 1"), "{e}");
    assert_eq!(e.kind(), InputErrorKind::CorruptImage);

    let slide = open(&damaged(&dir, "offset-past-end")).unwrap();
    slide.read_tile(0, 0, 0).unwrap();
    let e = slide.read_tile(0, 1, 0).unwrap_err();
    assert!(e.to_string().starts_with("level 0, tile (1, 0): its bytes"), "{e}");
    assert!(e.to_string().contains("past the end of the file"), "{e}");
    assert!(slide.read_region(0, 0, 0, 600, 100).is_err());

    let slide = open(&damaged(&dir, "garbage-tile")).unwrap();
    let e = slide.read_tile(0, 1, 0).unwrap_err();
    assert!(e.to_string().starts_with("level 0, tile (1, 0): JPEG tile does not decode"), "{e}");
    assert_eq!(e.kind(), InputErrorKind::CorruptImage);
    slide.read_tile(0, 2, 0).unwrap();

    let e = slide.read_tile(5, 0, 0).unwrap_err();
    assert_eq!(e.to_string(), "no level 5 (the slide has 3)");
    let e = slide.read_tile(0, 99, 0).unwrap_err();
    assert!(e.to_string().contains("outside the 4x3 tile grid"), "{e}");

    // OpenSlide's own bad samples.
    let e = open(&openslide_fixture("unopenable.tiff")).err().expect("unopenable.tiff");
    assert!(
        matches!(
            e.kind(),
            InputErrorKind::WrongFormat | InputErrorKind::CorruptImage | InputErrorKind::UnsupportedEncoding
        ),
        "{e}"
    );
    match open(&openslide_fixture("unreadable.svs")) {
        Err(e) => assert_eq!(e.kind(), InputErrorKind::CorruptImage, "{e}"),
        Ok(s) => {
            let l = &s.info().levels[0];
            assert!(s.read_region(0, 0, 0, l.width as u32, l.height as u32).is_err(), "unreadable.svs read");
        }
    }

    // Not a slide at all, and a plain (stripped) TIFF picture.
    let txt = dir.join("note.svs");
    std::fs::write(&txt, "Patient seen today, no complaints.").unwrap();
    let e = open(&txt).err().unwrap();
    assert_eq!(e.kind(), InputErrorKind::WrongFormat);
    assert!(!e.to_string().contains("Patient"), "{e}");
}

#[test]
fn limits_hold_whatever_the_header_claims() {
    let (_keep, dir) = synthetic();
    let path = dir.join("deflate.tiff");
    let tight = WsiLimits { max_tiles_per_level: 4, ..WsiLimits::default() };
    let e = Slide::open(FileSource::open(&path).unwrap(), &tight).err().unwrap();
    assert!(e.to_string().contains("level 0 has 12 tiles, over the limit of 4"), "{e}");
    let tight = WsiLimits { max_header_bytes: 100, ..WsiLimits::default() };
    let e = Slide::open(FileSource::open(&path).unwrap(), &tight).err().unwrap();
    assert!(e.to_string().contains("more than 100 bytes"), "{e}");
    let slide = open(&path).unwrap();
    let e = slide.read_region(0, 0, 0, 100_000, 100_000).unwrap_err();
    assert_eq!(e.kind(), InputErrorKind::TooLarge);
}

#[test]
fn tissue_patches_follow_the_recipe_and_a_rerun_picks_the_same() {
    use medbatch_formats::wsi::tissue::{PatchParams, TissueMethod};
    let (_keep, dir) = synthetic();
    let path = dir.join("jpeg-ycbcr.tiff");
    let slide = open(&path).unwrap();
    // The slide: 20× (0.5 µm a pixel) at level 0, 10× at level 1, 5× at level 2. Patches of
    // 64 px at 10×: a 7×5 grid on level 1; the mask on level 2 (the least detailed at or
    // above 1.25×), where a cell is 32 px.
    let params = PatchParams { patch: 64, stride: 64, max_patches: None, ..PatchParams::default() };
    let sel = slide.select_patches(&params).unwrap();
    assert_eq!((sel.level, sel.mask_level, sel.magnification), (1, 2, 10.0));
    assert_eq!(sel.grid_cells, 7 * 5);
    let want: Value =
        serde_json::from_slice(&oracle(&["tissue", path.to_str().unwrap(), "2", "32", "7", "5"])).unwrap();
    let mut got: Vec<(u64, u64)> = sel.patches.iter().map(|p| (p.x / 64, p.y / 64)).collect();
    got.sort_unstable();
    let mut want: Vec<(u64, u64)> =
        want.as_array().unwrap().iter().map(|c| (c[0].as_u64().unwrap(), c[1].as_u64().unwrap())).collect();
    want.sort_unstable();
    assert!(!want.is_empty() && want.len() < 35, "the synthetic slide has tissue and glass: {want:?}");
    assert_eq!(got, want, "tissue cells as the recipe computes them from OpenSlide's pixels");
    for p in &sel.patches {
        assert_eq!((p.level, p.width, p.height), (1, 64, 64));
        assert!(p.tissue_fraction > 0.0 && p.tissue_fraction <= 1.0);
    }

    // Seeded sampling: the same seed picks the same patches, in reading order.
    let few = PatchParams { max_patches: Some(5), seed: 11, ..params.clone() };
    let a = slide.select_patches(&few).unwrap();
    let b = open(&path).unwrap().select_patches(&few).unwrap();
    assert_eq!(a.patches, b.patches);
    assert_eq!(a.patches.len(), 5);
    assert!(a.patches.windows(2).all(|w| (w[0].y, w[0].x) < (w[1].y, w[1].x)));
    let other = slide.select_patches(&PatchParams { seed: 12, ..few.clone() }).unwrap();
    assert_ne!(a.patches, other.patches, "another seed, another sample");

    // Asked for 5× with 20× patches read at 10×: the level at or above 5× is level 2 itself.
    let coarse = slide.select_patches(&PatchParams { magnification: 5.0, ..params.clone() }).unwrap();
    assert_eq!(coarse.level, 2);
    // Asked for 40× on a 20× slide: level 0, patches as they are.
    let fine = slide.select_patches(&PatchParams { magnification: 40.0, ..params.clone() }).unwrap();
    assert_eq!((fine.level, fine.patches.first().map(|p| p.width)), (0, Some(64)));

    // Otsu on saturation finds the stained blobs too.
    let otsu = slide.select_patches(&PatchParams { method: TissueMethod::OtsuSaturation, ..params.clone() }).unwrap();
    assert!(otsu.threshold.is_some_and(|t| t > 0.0 && t < 1.0));
    assert!(!otsu.patches.is_empty() && otsu.patches.len() < 35);

    // Glass only: no tissue.
    let glass = open(&dir.join("glass.tiff")).unwrap().select_patches(&params).unwrap();
    assert_eq!((glass.grid_cells, glass.tissue_cells, glass.patches.len()), (35, 0, 0));
}

#[test]
fn bands_of_grid_rows_partition_the_tissue_tiles() {
    use medbatch_formats::wsi::tissue::{PatchGrid, PatchParams};
    let (_keep, dir) = synthetic();
    let slide = open(&dir.join("aperio-j2k-ycbcr.svs")).unwrap();
    let params = PatchParams { patch: 64, stride: 64, max_patches: None, ..PatchParams::default() };
    // The grid from the header alone: 64 px at 10x on level 1 (1,000 x 760 at 20x).
    let grid = slide.patch_grid(&params).unwrap();
    assert_eq!(grid, PatchGrid { level: 1, magnification: 10.0, mask_level: 2, side: 64, step: 64, cols: 7, rows: 5 });
    let whole = slide.select_patches(&params).unwrap();
    assert!(whole.tissue_cells > 0 && whole.patches.len() == whole.tissue_cells);
    let mut joined = Vec::new();
    for (start, end) in [(0, 2), (2, 3), (3, 5), (5, 9)] {
        let band = slide.select_patches(&PatchParams { grid_rows: Some((start, end)), ..params.clone() }).unwrap();
        assert_eq!(band.tissue_cells, whole.tissue_cells, "the tissue count is the whole slide's");
        assert!(band.patches.iter().all(|p| (start..end).contains(&(p.y / grid.step))), "{start}..{end}");
        joined.extend(band.patches);
    }
    assert_eq!(joined, whole.patches, "the bands' tiles are the whole grid's, each once, in reading order");
    // Google's grid at 10x: 896 px, larger than this slide; none.
    let large = slide.patch_grid(&PatchParams::default()).unwrap();
    assert_eq!((large.cols, large.rows), (0, 0));
}
