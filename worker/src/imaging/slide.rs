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
//!
//! A case (`imaging.slide.group = "case"`, grouped at planning by a manifest or by DICOM
//! study) is one prompt of its slides' patches: `max_images` shared among the slides (evenly,
//! what a slide with fewer tissue cells leaves going to the others), each slide sampled as
//! it would be alone, each patch labelled `SLIDE n`. A slide of the case that cannot be read
//! is an error row, and the case goes on with the others.

use super::{error, file_name, group_digest, image_block, source, ImagingRead};
use crate::pipelines::{SlideRegions, Source, Unit};
use medbatch_connectors::inputs::InputSource;
use medbatch_engine::image::{resize_bilinear, Rgb8};
use medbatch_formats::wsi::tissue::{Patch, PatchParams, PatchSelection};
use medbatch_formats::wsi::{Metered, RangeRead, Slide, WsiLimits};
use medbatch_schemas::pipeline::{ImagingSpec, ImagingUnit};
use medbatch_schemas::{Document, InputError, InputErrorKind, InputKind, InputRef, Selection};
use std::collections::BTreeMap;
use std::sync::Arc;

/// An open slide, counting what it reads.
type OpenSlide = Slide<Metered<Box<dyn RangeRead>>>;

/// Reads a slide job's inputs: each SVS or TIFF file a slide, the job's DICOM files one; a
/// case job's inputs by the slide each belongs to. `pixels`: whether a tile unit reads its
/// tiles' pixels as its images (an embedding a tile) or only finds them (the tile table);
/// patches are always read.
pub fn read(inputs: &[&InputRef], source: &InputSource, spec: &ImagingSpec, pixels: bool) -> Vec<ImagingRead> {
    let mut out = Vec::new();
    // The job's slides: (case slide or file order, DICOM or not) → its inputs.
    let mut slides: BTreeMap<(u32, usize), Vec<&InputRef>> = BTreeMap::new();
    for (k, &input) in inputs.iter().enumerate() {
        let at = input.case.as_ref().map(|c| c.slide);
        match input.kind {
            InputKind::Slide => slides.entry((at.unwrap_or(0), k + 1)).or_default().push(input),
            InputKind::Dicom => slides.entry((at.unwrap_or(0), 0)).or_default().push(input),
            _ => out.push(Err(error(input, InputErrorKind::UnsupportedKind, "not a whole-slide image"))),
        }
    }
    let case = inputs.iter().find_map(|i| i.case.as_ref()).map(|c| c.id.clone());
    let mut opened: Vec<(OpenSlide, Vec<&InputRef>)> = Vec::new();
    for files in slides.into_values() {
        match open(&files, source) {
            Ok(slide) => opened.push((slide, files)),
            Err(e) => out.push(Err(e)),
        }
    }
    match case {
        None => {
            for (slide, files) in &opened {
                out.push(unit(slide, files, spec, pixels));
                log_reads(slide, files);
            }
        }
        Some(id) => {
            out.extend(case_unit(&id, &opened, spec));
            for (slide, files) in &opened {
                log_reads(slide, files);
            }
        }
    }
    out
}

/// Opens one slide: a TIFF file, or the DICOM instances of one series.
fn open(files: &[&InputRef], source: &InputSource) -> Result<OpenSlide, InputError> {
    let mut sources = Vec::with_capacity(files.len());
    for &input in files {
        let src = source
            .open_range(&input.uri, input.size, input.etag.as_deref())
            .map_err(|e| error(input, InputErrorKind::Unreadable, e.to_string()))?;
        sources.push(Metered::new(src));
    }
    let limits = WsiLimits::default();
    if files[0].kind == InputKind::Slide {
        let src = sources.pop().expect("a file a TIFF slide");
        return Slide::open(src, &limits).map_err(|e| error(files[0], e.kind(), e.to_string()));
    }
    Slide::open_dicom(sources, &limits)
        .map_err(|e| error(files[0], e.kind(), format!("{e} (a DICOM slide of {} files)", files.len())))
}

/// What reading a slide cost: requests and bytes against its size (the slide named by its
/// header digest, never by its name or content).
fn log_reads<S: RangeRead>(slide: &Slide<Metered<S>>, files: &[&InputRef]) {
    let size: u64 = files.iter().map(|i| i.size).sum();
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

/// A slide's name in rows: its file name, or a DICOM slide's first 16 hex digits of its
/// header digest.
fn slide_id<S: RangeRead>(slide: &Slide<S>, files: &[&InputRef]) -> String {
    if files.len() == 1 {
        file_name(&files[0].uri).to_string()
    } else {
        slide.info().header_digest[..16].to_string()
    }
}

/// Why a slide gave no patch: smaller than one, or no tissue.
fn no_patch_detail(sel: &PatchSelection, params: &PatchParams) -> String {
    if sel.grid_cells == 0 {
        format!(
            "the slide is smaller than one patch of {} px at {:.2}x (level {})",
            params.patch, sel.magnification, sel.level
        )
    } else {
        format!(
            "no tissue found: none of the {} patch cells at {:.2}x passes the tissue test on the mask (level {})",
            sel.grid_cells, sel.magnification, sel.mask_level
        )
    }
}

/// The patches' pixels, each resized to the patch side when read from a more detailed level.
fn read_patches<S: RangeRead>(
    slide: &Slide<S>,
    patches: &[Patch],
    side: usize,
    first: &InputRef,
) -> Result<Vec<Arc<Rgb8>>, InputError> {
    let mut images = Vec::with_capacity(patches.len());
    for p in patches {
        let region = slide
            .read_region(p.level, p.x as i64, p.y as i64, p.width, p.height)
            .map_err(|e| error(first, e.kind(), e.to_string()))?;
        let mut img = Rgb8::new(region.width() as usize, region.height() as usize, region.into_raw());
        if img.width != side || img.height != side {
            img = resize_bilinear(&img, side, side);
        }
        images.push(Arc::new(img));
    }
    Ok(images)
}

/// The regions of a slide's unit.
fn regions<S: RangeRead>(
    slide: &Slide<S>,
    id: String,
    sel: &PatchSelection,
    step: u64,
    patches: Vec<Patch>,
) -> SlideRegions {
    SlideRegions {
        id,
        magnification: sel.magnification,
        mpp: slide.info().level_mpp(sel.level),
        step,
        regions: patches,
    }
}

/// The `_documents` sources of one slide's files: the file holding the patches' level gave
/// them, the others none (`None` for tiles found but not read, which are not images).
fn slide_sources<S: RangeRead>(
    slide: &Slide<S>,
    files: &[&InputRef],
    level: usize,
    images: Option<usize>,
) -> Vec<Source> {
    let holder = slide.level_source(level);
    files
        .iter()
        .enumerate()
        .map(|(k, i)| {
            let mut s = source(i, Ok(if k == holder { images.unwrap_or(0) } else { 0 }));
            if images.is_none() {
                s.images = None;
            }
            s
        })
        .collect()
}

/// The unit of one open slide: its tissue patches as the images of one prompt
/// (`unit = "slide"`), or the tissue tiles of the job's band of its grid (`unit = "tiles"`),
/// their pixels its images when `pixels` (at most `tiles_per_job` of them: the band bounds
/// the memory a job holds).
fn unit<S: RangeRead>(slide: &Slide<S>, inputs: &[&InputRef], spec: &ImagingSpec, pixels: bool) -> ImagingRead {
    let first = inputs[0];
    let tiles = spec.unit == ImagingUnit::Tiles;
    let read_pixels = !tiles || pixels;
    let mut params = PatchParams::from_spec(spec);
    let grid = slide.patch_grid(&params).map_err(|e| error(first, e.kind(), e.to_string()))?;
    params.grid_rows = band(first, grid.level)?;
    // Each band's job computes the slide's mask: a tile that does not decode fails every
    // band, each error row naming its rows.
    let in_band = |detail: String| match params.grid_rows {
        Some((start, end)) => format!("{detail} (the job of grid rows {start}..{end})"),
        None => detail,
    };
    let sel = slide.select_patches(&params).map_err(|e| error(first, e.kind(), in_band(e.to_string())))?;
    // A band of glass on a slide with tissue elsewhere gives no rows; a slide without
    // tissue is reported once, by the job of its first band.
    let first_band = params.grid_rows.is_none_or(|(start, _)| start == 0);
    if sel.patches.is_empty() && (!tiles || sel.tissue_cells == 0) && first_band {
        return Err(error(first, InputErrorKind::NotApplicable, no_patch_detail(&sel, &params)));
    }
    let images = if read_pixels {
        read_patches(slide, &sel.patches, params.patch as usize, first)
            .map_err(|e| InputError { detail: in_band(e.detail), ..e })?
    } else {
        Vec::new()
    };
    let id = slide_id(slide, inputs);
    let sources = slide_sources(slide, inputs, sel.level, read_pixels.then_some(images.len()));
    let labels = vec![String::new(); images.len()];
    let regions = regions(slide, id.clone(), &sel, grid.step, sel.patches.clone());
    Ok(Unit {
        doc: Document {
            id,
            source_uri: first.uri.clone(),
            input_sha256: group_digest(inputs),
            text: image_block(&labels),
            patient_id: None,
            date: None,
        },
        images,
        sources,
        slides: vec![regions],
    })
}

/// Shares of `budget` patches among slides with `available` tissue cells each: evenly, what a
/// slide cannot use going to the others.
fn shares(available: &[usize], budget: usize) -> Vec<usize> {
    let mut share = vec![0; available.len()];
    let mut left = budget;
    loop {
        let open: Vec<usize> = (0..available.len()).filter(|&k| share[k] < available[k]).collect();
        if left == 0 || open.is_empty() {
            return share;
        }
        let each = (left / open.len()).max(1);
        for k in open {
            let add = each.min(available[k] - share[k]).min(left);
            share[k] += add;
            left -= add;
        }
    }
}

/// The unit of a case: its slides' patches in one prompt (slides in case order), after an
/// error for each slide that gives none (cannot be read, or shows no tissue). A case whose
/// slides all give none has only their errors.
fn case_unit(id: &str, slides: &[(OpenSlide, Vec<&InputRef>)], spec: &ImagingSpec) -> Vec<ImagingRead> {
    let params = PatchParams { max_patches: None, ..PatchParams::from_spec(spec) };
    let mut errors = Vec::new();
    // Every tissue cell of each slide, then each slide's share sampled as it would be alone.
    let mut found = Vec::new();
    for (slide, files) in slides {
        let grid = slide.patch_grid(&params);
        match grid.and_then(|g| slide.select_patches(&params).map(|s| (g, s))) {
            Ok((g, sel)) if !sel.patches.is_empty() => found.push((slide, files, g, sel)),
            Ok((_, sel)) => errors.push(error(files[0], InputErrorKind::NotApplicable, no_patch_detail(&sel, &params))),
            Err(e) => errors.push(error(files[0], e.kind(), e.to_string())),
        }
    }
    let all: Vec<&InputRef> = slides.iter().flat_map(|(_, f)| f.iter().copied()).collect();
    let available: Vec<usize> = found.iter().map(|f| f.3.patches.len()).collect();
    let share = shares(&available, spec.max_images);
    let (mut images, mut labels, mut sources, mut regions_of) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let side = params.patch as usize;
    for (k, (slide, files, grid, sel)) in found.iter().enumerate() {
        // The slide's share, sampled from its tissue cells as a slide alone is.
        let patches = slide.sample(sel.patches.clone(), share[k], params.seed);
        let read = match read_patches(*slide, &patches, side, files[0]) {
            Ok(r) => r,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        let n = files[0].case.as_ref().map_or(k as u32, |c| c.slide) + 1;
        labels.extend(std::iter::repeat_n(
            if found.len() > 1 { format!("SLIDE {n}") } else { String::new() },
            read.len(),
        ));
        sources.extend(slide_sources(*slide, files, sel.level, Some(read.len())));
        images.extend(read);
        regions_of.push(regions(*slide, slide_id(*slide, files), sel, grid.step, patches));
    }
    // The slides that gave nothing are in `errors`; the prompt is what is left.
    let mut out: Vec<ImagingRead> = errors.into_iter().map(Err).collect();
    if images.is_empty() {
        return out;
    }
    let doc = Document {
        id: id.to_string(),
        source_uri: all[0].uri.clone(),
        input_sha256: group_digest(&all),
        text: image_block(&labels),
        patient_id: None,
        date: None,
    };
    out.push(Ok(Unit { doc, images, sources, slides: regions_of }));
    out
}

#[cfg(test)]
mod tests {
    use super::shares;

    #[test]
    fn a_case_shares_its_patches_evenly_and_passes_on_what_a_slide_cannot_use() {
        assert_eq!(shares(&[100, 100], 125), [63, 62]);
        assert_eq!(shares(&[10, 500, 500], 125), [10, 58, 57]);
        assert_eq!(shares(&[3, 4], 125), [3, 4], "fewer cells than the budget: all of them");
        assert_eq!(shares(&[5, 5, 5], 2), [1, 1, 0]);
        assert_eq!(shares(&[], 125), Vec::<usize>::new());
    }
}
