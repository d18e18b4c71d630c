//! Whole-slide jobs, after Google's MedGemma 1.5 pathology recipe: the tissue patches of one
//! slide are the images of one prompt. A slide is an SVS or pyramidal TIFF file, or the
//! DICOM instances of one series (planning groups them); it is read a range at a time
//! (`medbatch_formats::wsi`), from disk or straight from S3, never whole.
//!
//! Patches: the tissue mask at `imaging.slide.mask_magnification` (1.25×), a grid of
//! `patch`-pixel cells at stride `stride` at `magnification` (896 px at 10×), and a seeded
//! sample of up to `imaging.max_images` tissue cells (125), in reading order. A region read
//! from a more detailed level (the slide has none at 10×) is resized to the patch size. The
//! image block has one marker per patch, after the prompt's text. A slide that cannot be
//! read, has a tile that does not decode, or shows no tissue is an error row naming the
//! slide and the reason. Each slide read is logged with its requests and bytes against its
//! size (at `info`).

use super::{error, file_name, group_digest, image_block, source, ImagingRead};
use crate::pipelines::{SlideRegions, Unit};
use medbatch_connectors::inputs::InputSource;
use medbatch_engine::image::{resize_bilinear, Rgb8};
use medbatch_formats::wsi::tissue::PatchParams;
use medbatch_formats::wsi::{Metered, RangeRead, Slide, WsiLimits};
use medbatch_schemas::pipeline::{ImagingSpec, ImagingUnit};
use medbatch_schemas::{Document, InputError, InputErrorKind, InputKind, InputRef, Selection};
use std::sync::Arc;

/// Reads a slide job's inputs: each SVS or TIFF file a slide, the job's DICOM files one.
pub fn read(inputs: &[&InputRef], source: &InputSource, spec: &ImagingSpec) -> Vec<ImagingRead> {
    let mut out = Vec::new();
    let mut dicom: Vec<&InputRef> = Vec::new();
    for &input in inputs {
        match input.kind {
            InputKind::Slide => {
                let opened = source
                    .open_range(&input.uri, input.size, input.etag.as_deref())
                    .map_err(|e| error(input, InputErrorKind::Unreadable, e.to_string()))
                    .and_then(|src| {
                        Slide::open(Metered::new(src), &WsiLimits::default())
                            .map_err(|e| error(input, e.kind(), e.to_string()))
                    });
                out.push(opened.and_then(|slide| {
                    let u = unit(&slide, &[input], spec);
                    log_reads(&slide, input.size);
                    u
                }));
            }
            InputKind::Dicom => dicom.push(input),
            _ => out.push(Err(error(input, InputErrorKind::UnsupportedKind, "not a whole-slide image"))),
        }
    }
    if !dicom.is_empty() {
        let mut sources = Vec::with_capacity(dicom.len());
        for &input in &dicom {
            match source.open_range(&input.uri, input.size, input.etag.as_deref()) {
                Ok(s) => sources.push(Metered::new(s)),
                Err(e) => {
                    out.push(Err(error(input, InputErrorKind::Unreadable, e.to_string())));
                    return out;
                }
            }
        }
        let size = dicom.iter().map(|i| i.size).sum();
        out.push(
            Slide::open_dicom(sources, &WsiLimits::default())
                .map_err(|e| error(dicom[0], e.kind(), format!("{e} (a DICOM slide of {} files)", dicom.len())))
                .and_then(|slide| {
                    let u = unit(&slide, &dicom, spec);
                    log_reads(&slide, size);
                    u
                }),
        );
    }
    out
}

/// What reading a slide cost: requests and bytes against its size (the slide named by its
/// header digest, never by its name or content).
fn log_reads<S: RangeRead>(slide: &Slide<Metered<S>>, size: u64) {
    let (requests, bytes) =
        slide.sources().iter().map(Metered::counts).fold((0, 0), |(r, b), (r2, b2)| (r + r2, b + b2));
    let digest = &slide.info().header_digest;
    tracing::info!(slide = &digest[..16.min(digest.len())], requests, bytes, size, "slide read");
}

/// The grid rows a job covers, from its selection (`None`: the whole grid), checked against
/// the level the plan split.
fn band(input: &InputRef, level: usize) -> Result<Option<(u64, u64)>, InputError> {
    match &input.selection {
        Selection::Whole => Ok(None),
        Selection::Tiles { level: planned, first_row, rows } if *planned as usize == level => {
            Ok(Some((*first_row, first_row.saturating_add(*rows))))
        }
        Selection::Tiles { level: planned, .. } => Err(error(
            input,
            InputErrorKind::NotApplicable,
            format!("the job covers grid rows of level {planned}, the slide's patch grid is now on level {level}"),
        )),
        Selection::Members(_) => Err(error(input, InputErrorKind::UnsupportedKind, "a slide is not an archive")),
    }
}

/// The unit of one open slide: its tissue patches as the images of one prompt
/// (`unit = "slide"`), or the tissue tiles of the job's band of its grid (`unit = "tiles"`,
/// no images).
fn unit<S: RangeRead>(slide: &Slide<S>, inputs: &[&InputRef], spec: &ImagingSpec) -> ImagingRead {
    let first = inputs[0];
    let tiles = spec.unit == ImagingUnit::Tiles;
    let mut params = PatchParams::from_spec(spec);
    let grid = slide.patch_grid(&params).map_err(|e| error(first, e.kind(), e.to_string()))?;
    params.grid_rows = band(first, grid.level)?;
    // Each band's job computes the slide's mask: a tile that does not decode fails every
    // band, each error row naming its rows.
    let sel = slide.select_patches(&params).map_err(|e| {
        let detail = match params.grid_rows {
            Some((start, end)) => format!("{e} (the job of grid rows {start}..{end})"),
            None => e.to_string(),
        };
        error(first, e.kind(), detail)
    })?;
    // A band of glass on a slide with tissue elsewhere gives no rows; a slide without
    // tissue is reported once, by the job of its first band.
    let first_band = params.grid_rows.is_none_or(|(start, _)| start == 0);
    if sel.patches.is_empty() && (!tiles || sel.tissue_cells == 0) && first_band {
        let detail = if sel.grid_cells == 0 {
            format!(
                "the slide is smaller than one patch of {} px at {:.2}x (level {})",
                params.patch, sel.magnification, sel.level
            )
        } else {
            format!(
                "no tissue found: none of the {} patch cells at {:.2}x passes the tissue test on the mask (level {})",
                sel.grid_cells, sel.magnification, sel.mask_level
            )
        };
        return Err(error(first, InputErrorKind::NotApplicable, detail));
    }
    let mut images = Vec::new();
    if !tiles {
        let side = params.patch as usize;
        for p in &sel.patches {
            let region = slide
                .read_region(p.level, p.x as i64, p.y as i64, p.width, p.height)
                .map_err(|e| error(first, e.kind(), e.to_string()))?;
            let mut img = Rgb8::new(region.width() as usize, region.height() as usize, region.into_raw());
            if img.width != side || img.height != side {
                img = resize_bilinear(&img, side, side);
            }
            images.push(Arc::new(img));
        }
    }
    let id = if inputs.len() == 1 {
        file_name(&first.uri).to_string()
    } else {
        slide.info().header_digest[..16].to_string()
    };
    let sha256 = group_digest(inputs);
    // The patches come from the file that holds their level; the other files of a DICOM
    // slide gave none. Tiles are not images.
    let holder = slide.level_source(sel.level);
    let sources = inputs
        .iter()
        .enumerate()
        .map(|(k, i)| {
            let mut s = source(i, Ok(if k == holder { images.len() } else { 0 }));
            if tiles {
                s.images = None;
            }
            s
        })
        .collect();
    let labels = vec![String::new(); images.len()];
    let regions = SlideRegions {
        magnification: sel.magnification,
        mpp: slide.info().level_mpp(sel.level),
        step: grid.step,
        regions: sel.patches,
    };
    Ok(Unit {
        doc: Document { id, source_uri: first.uri.clone(), input_sha256: sha256, text: image_block(&labels) },
        images,
        sources,
        slide: Some(regions),
    })
}
