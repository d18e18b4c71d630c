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

use super::{error, file_name, image_block, source, ImagingRead};
use crate::pipelines::Unit;
use medbatch_connectors::inputs::InputSource;
use medbatch_engine::image::{resize_bilinear, Rgb8};
use medbatch_formats::wsi::tissue::{PatchParams, TissueMethod};
use medbatch_formats::wsi::{Metered, RangeRead, Slide, WsiLimits};
use medbatch_schemas::pipeline::{ImagingSpec, TissueDetection};
use medbatch_schemas::{Digest, Document, InputErrorKind, InputKind, InputRef};
use std::sync::Arc;

/// The patch parameters of a pipeline.
pub fn patch_params(spec: &ImagingSpec) -> PatchParams {
    let s = &spec.slide;
    PatchParams {
        magnification: s.magnification,
        patch: s.patch,
        stride: s.stride,
        mask_magnification: s.mask_magnification,
        method: match s.tissue {
            TissueDetection::Luminance => TissueMethod::Luminance,
            TissueDetection::OtsuSaturation => TissueMethod::OtsuSaturation,
        },
        max_patches: Some(spec.max_images),
        seed: s.seed,
        ..PatchParams::default()
    }
}

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

/// The prompt's unit of one open slide.
fn unit<S: RangeRead>(slide: &Slide<S>, inputs: &[&InputRef], spec: &ImagingSpec) -> ImagingRead {
    let first = inputs[0];
    let params = patch_params(spec);
    let sel = slide.select_patches(&params).map_err(|e| error(first, e.kind(), e.to_string()))?;
    if sel.patches.is_empty() {
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
    let side = params.patch as usize;
    let mut images = Vec::with_capacity(sel.patches.len());
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
    let id = if inputs.len() == 1 {
        file_name(&first.uri).to_string()
    } else {
        slide.info().header_digest[..16].to_string()
    };
    let sha256 = if inputs.len() == 1 {
        first.sha256.clone()
    } else {
        Digest::of_bytes(&inputs.iter().flat_map(|i| i.sha256.to_string().into_bytes()).collect::<Vec<u8>>())
    };
    // The patches come from the file that holds their level; the other files of a DICOM
    // slide gave none.
    let holder = slide.level_source(sel.level);
    let sources =
        inputs.iter().enumerate().map(|(k, i)| source(i, Ok(if k == holder { images.len() } else { 0 }))).collect();
    let labels = vec![String::new(); images.len()];
    Ok(Unit {
        doc: Document { id, source_uri: first.uri.clone(), input_sha256: sha256, text: image_block(&labels) },
        images,
        sources,
    })
}
