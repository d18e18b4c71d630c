//! `medbatch bench wsi SLIDE`: whole-slide reading speed on one slide (a file or an
//! `s3://` object): the header, tiles decoded per second on level 0, tissue patch selection
//! with the pathology recipe's defaults, and reading the selected patches; bytes and requests
//! (reads, each one ranged GET from S3) against the slide's size, and the process's peak
//! memory; then the worker's reader of the pathology-report pipeline, holding a prompt's
//! patches as a job does until the engine takes them, and the peak memory with them.

use medbatch_connectors::inputs::InputSource;
use medbatch_formats::wsi::tissue::PatchParams;
use medbatch_formats::wsi::{FileSource, Metered, RangeRead, Slide, WsiLimits};
use medbatch_schemas::{Digest, InputKind, InputRef, Selection};
use medbatch_worker::LoadedPipeline;
use std::process::ExitCode;
use std::time::Instant;

/// Level-0 tiles decoded for the tile rate (spread over the slide by a fixed stride).
const SAMPLE_TILES: u64 = 400;

pub fn run(target: &str) -> anyhow::Result<ExitCode> {
    if target.starts_with("s3://") {
        let rt = crate::runtime()?;
        let loc = medbatch_connectors::s3::S3Location::parse(target)
            .ok_or_else(|| anyhow::anyhow!("{target}: not an s3://bucket/key location"))?;
        let (client, object) = rt.block_on(async {
            let c = medbatch_connectors::s3::client(None).await;
            let found = medbatch_connectors::s3_input::list_objects(&c, &loc).await.map_err(anyhow::Error::msg)?;
            let object = found.into_iter().find(|o| o.key == loc.prefix);
            anyhow::Ok((c, object))
        })?;
        let object = object.ok_or_else(|| anyhow::anyhow!("{target}: no such object"))?;
        let input = slide_input(target, object.size, object.etag.clone());
        let inputs = {
            let _in_runtime = rt.enter();
            InputSource::with_s3(None)
        };
        let src = Metered::new(medbatch_connectors::s3_input::S3RangeSource::new(client, rt.handle().clone(), object));
        // The source waits on the runtime: measure from a thread outside it.
        std::thread::scope(|s| s.spawn(|| measure(target, src, (&input, &inputs))).join().expect("bench thread"))
    } else {
        let path = std::path::Path::new(target);
        let src = Metered::new(FileSource::open(path)?);
        let input = slide_input(&medbatch_connectors::inputs::file_uri(&path.canonicalize()?), src.size(), None);
        measure(target, src, (&input, &InputSource::local()))
    }
}

/// The input of a job of one slide.
fn slide_input(uri: &str, size: u64, etag: Option<String>) -> InputRef {
    InputRef {
        uri: uri.to_string(),
        size,
        sha256: Digest::of_bytes(uri.as_bytes()),
        kind: InputKind::Slide,
        selection: Selection::Whole,
        etag,
        case: None,
    }
}

fn measure<S: RangeRead>(target: &str, src: Metered<S>, job: (&InputRef, &InputSource)) -> anyhow::Result<ExitCode> {
    let size = src.size();
    let t = Instant::now();
    let slide = Slide::open(src, &WsiLimits::default())?;
    let header_s = t.elapsed().as_secs_f64();
    let info = slide.info();
    let (header_requests, header_bytes) = slide.source().counts();
    println!(
        "{target}: {:.1} MB, {} ({} levels, level 0 {}x{}, {:?} tiles of {}x{}, mpp {:?}, objective {:?})",
        size as f64 / 1e6,
        info.format.vendor(),
        info.levels.len(),
        info.levels[0].width,
        info.levels[0].height,
        info.levels[0].codec,
        info.levels[0].tile_width,
        info.levels[0].tile_height,
        info.mpp.map(|m| m.0),
        info.objective_power,
    );
    println!("  header     {:.1} ms, {header_requests} requests, {:.1} KB", header_s * 1e3, header_bytes as f64 / 1e3);

    // Level-0 tiles spread over the whole slide.
    let l0 = &info.levels[0];
    let total = l0.tiles_across() * l0.tiles_down();
    let stride = (total / SAMPLE_TILES).max(1);
    let t = Instant::now();
    let mut decoded = 0u64;
    let mut i = 0;
    while i < total && decoded < SAMPLE_TILES {
        std::hint::black_box(slide.read_tile(0, i % l0.tiles_across(), i / l0.tiles_across())?);
        decoded += 1;
        i += stride;
    }
    let tiles_s = t.elapsed().as_secs_f64();
    println!(
        "  tiles      {decoded} level-0 tiles in {:.2} s: {:.0} tiles/s ({:.1} Mpixel/s)",
        tiles_s,
        decoded as f64 / tiles_s,
        decoded as f64 * f64::from(l0.tile_width) * f64::from(l0.tile_height) / tiles_s / 1e6
    );

    // The recipe: mask at 1.25×, 896-px patches at 10×, up to 125.
    let (r0, b0) = slide.source().counts();
    let t = Instant::now();
    let sel = slide.select_patches(&PatchParams::default())?;
    let select_s = t.elapsed().as_secs_f64();
    let (r1, b1) = slide.source().counts();
    println!(
        "  select     {} tissue cells of {} (level {} at {:.2}x, mask on level {}), {} kept in {:.2} s: \
         {:.0} cells/s, {:.0} tissue patches/s; {} requests, {:.1} MB",
        sel.tissue_cells,
        sel.grid_cells,
        sel.level,
        sel.magnification,
        sel.mask_level,
        sel.patches.len(),
        select_s,
        sel.grid_cells as f64 / select_s,
        sel.tissue_cells as f64 / select_s,
        r1 - r0,
        (b1 - b0) as f64 / 1e6
    );
    let t = Instant::now();
    for p in &sel.patches {
        std::hint::black_box(slide.read_region(p.level, p.x as i64, p.y as i64, p.width, p.height)?);
    }
    let read_s = t.elapsed().as_secs_f64();
    let (r2, b2) = slide.source().counts();
    println!(
        "  patches    {} patches read in {:.2} s: {:.1} patches/s; {} requests, {:.1} MB",
        sel.patches.len(),
        read_s,
        sel.patches.len() as f64 / read_s.max(1e-9),
        r2 - r1,
        (b2 - b1) as f64 / 1e6
    );
    let (requests, bytes) = slide.source().counts();
    let mib = || crate::bench::peak_rss_mib().map_or("?".to_string(), |m| format!("{m:.0}"));
    println!(
        "  summary    {requests} requests, {:.1} MB read of {:.1} MB ({:.2} %); peak memory {} MiB",
        bytes as f64 / 1e6,
        size as f64 / 1e6,
        100.0 * bytes as f64 / size.max(1) as f64,
        mib()
    );
    drop(slide);

    // A pathology-report job's prompt: the worker's slide reader with the pipeline's
    // settings, its patches held until the engine would take them.
    let spec = LoadedPipeline::load("pathology-report")?
        .spec
        .imaging
        .ok_or_else(|| anyhow::anyhow!("pathology-report has no [imaging] section"))?;
    let t = Instant::now();
    let units = medbatch_worker::imaging::slide::read(&[job.0], job.1, &spec, true);
    let read_s = t.elapsed().as_secs_f64();
    let unit = match units.into_iter().next() {
        Some(Ok(u)) => u,
        Some(Err(e)) => anyhow::bail!("the worker's reader: {} ({})", e.detail, e.kind.label()),
        None => anyhow::bail!("the worker's reader gave nothing"),
    };
    let held: usize = unit.images.iter().map(|i| i.data.len()).sum();
    println!(
        "  prompt     the worker's reader: {} patches of {}x{} held ({:.1} MB) in {:.2} s; peak memory {} MiB",
        unit.images.len(),
        unit.images.first().map_or(0, |i| i.width),
        unit.images.first().map_or(0, |i| i.height),
        held as f64 / 1e6,
        read_s,
        mib()
    );
    Ok(ExitCode::SUCCESS)
}
