//! `medbatch bench wsi SLIDE`: whole-slide reading speed on one slide (a file or an
//! `s3://` object): the header, tiles decoded per second on level 0, tissue patch selection
//! with the pathology recipe's defaults, and reading the selected patches; bytes and requests
//! (reads, each one ranged GET from S3) against the slide's size, and the process's peak
//! memory.

use medbatch_formats::wsi::tissue::PatchParams;
use medbatch_formats::wsi::{FileSource, Metered, RangeRead, Slide, WsiLimits};
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
        let src = Metered::new(medbatch_connectors::s3_input::S3RangeSource::new(client, rt.handle().clone(), object));
        // The source waits on the runtime: measure from a thread outside it.
        std::thread::scope(|s| s.spawn(|| measure(target, src)).join().expect("bench thread"))
    } else {
        let src = Metered::new(FileSource::open(std::path::Path::new(target))?);
        measure(target, src)
    }
}

fn measure<S: RangeRead>(target: &str, src: Metered<S>) -> anyhow::Result<ExitCode> {
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
    println!(
        "  summary    {requests} requests, {:.1} MB read of {:.1} MB ({:.2} %); peak memory {} MiB",
        bytes as f64 / 1e6,
        size as f64 / 1e6,
        100.0 * bytes as f64 / size.max(1) as f64,
        crate::bench::peak_rss_mib().map_or("?".to_string(), |m| format!("{m:.0}"))
    );
    Ok(ExitCode::SUCCESS)
}
