//! Imaging jobs: a job's image files become the images of one prompt, following Google's
//! MedGemma input recipes.
//!
//! - A study of radiographs (CR, DX …): every frame of every instance in instance-number
//!   order, up to `imaging.max_images`, each windowed by its header (VOI window or min–max,
//!   MONOCHROME1 inverted).
//! - A CT or MR series: instances ordered by instance number (then position along the
//!   slice normal), sampled uniformly down to `max_images` (85 in Google's CT notebook);
//!   CT as Hounsfield units through three windows to R, G, B; MR min–max over the whole
//!   series. Each slice is followed by the label `SLICE n`.
//! - A prior and a current study of one patient: the first image of each, prior first.
//! - A PNG or JPEG file: one image. A NIfTI volume: a series (min–max over the volume).
//! - A whole-slide image: up to `max_images` tissue patches ([`slide`]).
//!
//! The document handed to the prompt template is the image block: one `<start_of_image>`
//! marker per image (with its label), which the engine expands and fills. Its id is the
//! study or series UID, or the file name. A file that cannot be read becomes an error row
//! naming the file and the reason; the rest of the job goes on.

pub mod recipes;
pub mod slide;

use crate::pipelines::{Source, Unit};
use medbatch_connectors::inputs::InputSource;
use medbatch_engine::engine::START_OF_IMAGE;
use medbatch_engine::image::{pad_to_square, to_rgb, Rgb8};
use medbatch_formats::dicom::{read_frames_from, Frames};
use medbatch_formats::meter::read_capped;
use medbatch_formats::ImageLimits;
use medbatch_schemas::pipeline::{ImagingSpec, ImagingUnit, PipelineSpec};
use medbatch_schemas::{Digest, Document, InputError, InputErrorKind, InputKind, InputRef, SkipReason};
use recipes::{ct_rgb, minmax_u8, radiograph_u8, range_u8, rescaled, slice_choice};
use std::sync::Arc;

/// One prompt's worth of images with the document that stands for them, or why an input
/// could not become one.
pub type ImagingRead = Result<Unit, InputError>;

fn error(input: &InputRef, kind: InputErrorKind, detail: impl Into<String>) -> InputError {
    InputError { source_uri: input.uri.clone(), member: None, record: None, kind, detail: detail.into() }
}

fn file_name(uri: &str) -> &str {
    uri.rsplit('/').next().unwrap_or(uri)
}

/// The bytes of an input, refused past `max` bytes (as its size says, and as read).
fn read_bytes(input: &InputRef, source: &InputSource, max: u64) -> Result<Vec<u8>, InputError> {
    let too_large = |size: String| {
        error(input, InputErrorKind::TooLarge, format!("{size} bytes exceed input.max_document_bytes = {max}"))
    };
    if input.size > max {
        return Err(too_large(input.size.to_string()));
    }
    let mut f = source
        .open(&input.uri, input.size, input.etag.as_deref())
        .map_err(|e| error(input, InputErrorKind::Unreadable, e.to_string()))?;
    read_capped(&mut f, max)
        .map_err(|e| error(input, InputErrorKind::Unreadable, e.to_string()))?
        .ok_or_else(|| too_large(format!("more than {max}")))
}

/// A greyscale or RGB frame of a radiograph as 8-bit RGB.
fn radiograph(f: &Frames, frame: &[i32]) -> Result<Rgb8, String> {
    let (w, h) = (f.header.columns as usize, f.header.rows as usize);
    match f.samples_per_pixel {
        1 if frame.len() == w * h => Ok(Rgb8::from_gray(w, h, &radiograph_u8(frame, &f.header))),
        3 if frame.len() == w * h * 3 => Ok(Rgb8::new(w, h, frame.iter().map(|&v| v.clamp(0, 255) as u8).collect())),
        n => Err(format!("{n} samples per pixel over {w}x{h} pixels do not match the frame")),
    }
}

/// Combined digest of a group's inputs (their SHA-256s in order).
fn group_digest(inputs: &[&InputRef]) -> Digest {
    if let [one] = inputs {
        return one.sha256.clone();
    }
    let joined: Vec<u8> = inputs.iter().flat_map(|i| i.sha256.to_string().into_bytes()).collect();
    Digest::of_bytes(&joined)
}

/// The image block of a prompt: one marker per image, each followed by its label.
fn image_block(labels: &[String]) -> String {
    labels.iter().map(|l| format!("{START_OF_IMAGE}{l}")).collect()
}

fn prepare(img: Rgb8, spec: &ImagingSpec) -> Arc<Rgb8> {
    Arc::new(if spec.pad_to_square { pad_to_square(&img) } else { img })
}

/// A decoded DICOM instance of a job.
struct Instance<'a> {
    input: &'a InputRef,
    frames: Frames,
}

/// Reads a job's inputs into prompts' images (normally one item per job) and error rows.
pub fn read_imaging(inputs: &[InputRef], source: &InputSource, spec: &PipelineSpec) -> Vec<ImagingRead> {
    let Some(imaging) = &spec.imaging else { return Vec::new() };
    let limits = ImageLimits::from_spec(&spec.input, imaging);
    let max = limits.max_file_bytes;
    let mut out: Vec<ImagingRead> = Vec::new();
    let mut dicoms: Vec<Instance<'_>> = Vec::new();
    let mut slides: Vec<&InputRef> = Vec::new();
    for input in inputs {
        if !spec.input.kinds.contains(&input.kind) {
            let reads: Vec<String> = spec.input.kinds.iter().map(|k| format!("{k:?}").to_lowercase()).collect();
            out.push(Err(error(
                input,
                InputErrorKind::UnsupportedKind,
                format!("this pipeline reads {}; {} is not one of them", reads.join(", "), file_name(&input.uri)),
            )));
            continue;
        }
        // Slides are read a range at a time, never whole.
        if matches!(imaging.unit, ImagingUnit::Slide | ImagingUnit::Tiles) {
            slides.push(input);
            continue;
        }
        let bytes = match read_bytes(input, source, max) {
            Ok(b) => b,
            Err(e) => {
                out.push(Err(e));
                continue;
            }
        };
        match input.kind {
            InputKind::Image => out.push(
                medbatch_formats::image::decode(&bytes, &limits)
                    .map_err(|e| error(input, e.kind(), e.to_string()))
                    .and_then(|img| to_rgb(img).map_err(|e| error(input, InputErrorKind::CorruptImage, e.to_string())))
                    .map(|img| whole_file_unit(input, image_block(&[String::new()]), vec![prepare(img, imaging)])),
            ),
            InputKind::Nifti => out.push(volume(&bytes, input, imaging, &limits)),
            InputKind::Dicom => match read_frames_from(&bytes, &limits) {
                Ok(frames) => {
                    let m = &frames.header.modality;
                    if !imaging.modalities.is_empty() && !imaging.modalities.iter().any(|x| x == m) {
                        out.push(Err(error(
                            input,
                            InputErrorKind::NotApplicable,
                            format!("modality {m:?} is not read by this pipeline ({})", imaging.modalities.join(", ")),
                        )));
                    } else {
                        dicoms.push(Instance { input, frames });
                    }
                }
                Err(e) => out.push(Err(error(input, e.kind(), e.to_string()))),
            },
            _ => out.push(Err(error(input, InputErrorKind::UnsupportedKind, "not an image or volume"))),
        }
    }
    if !slides.is_empty() {
        // The tile table (no model) finds tiles; an embedding pipeline reads them.
        out.extend(slide::read(&slides, source, imaging, spec.task.needs_model()));
    }
    if !dicoms.is_empty() {
        out.extend(match imaging.unit {
            ImagingUnit::Study => study(dicoms, imaging),
            ImagingUnit::Series => series(dicoms, imaging),
            ImagingUnit::PriorCurrent => prior_current(dicoms, imaging),
            // Collected as slides above.
            ImagingUnit::Slide | ImagingUnit::Tiles => Vec::new(),
        });
    }
    out
}

/// The unit of one file's images.
fn whole_file_unit(input: &InputRef, text: String, images: Vec<Arc<Rgb8>>) -> Unit {
    let doc = Document {
        id: file_name(&input.uri).to_string(),
        source_uri: input.uri.clone(),
        input_sha256: input.sha256.clone(),
        text,
        patient_id: None,
        date: None,
    };
    let sources = vec![source(input, Ok(images.len()))];
    Unit { doc, images, sources, slides: Vec::new() }
}

/// A file of an imaging unit: the images it gave, or why it gave none.
fn source(input: &InputRef, taken: Result<usize, SkipReason>) -> Source {
    let (images, skipped) = match taken {
        Ok(n) => (u32::try_from(n).unwrap_or(u32::MAX), None),
        Err(why) => (0, Some(why)),
    };
    Source { uri: input.uri.clone(), member: None, sha256: input.sha256.clone(), images: Some(images), skipped }
}

/// A NIfTI volume as a series of slices: the third axis is the slice axis, each slice
/// `dim[1]` pixels wide and `dim[2]` high in stored voxel order (no reorientation), values
/// scaled by `scl_slope`/`scl_inter`, min–max over the whole volume to 8 bits (as MR
/// series), sampled uniformly down to `imaging.max_images` and labelled `SLICE n`. Only the
/// slices kept are held in memory as values.
pub fn volume(bytes: &[u8], input: &InputRef, spec: &ImagingSpec, limits: &ImageLimits) -> ImagingRead {
    let fail = |e: medbatch_formats::nifti::NiftiError| error(input, e.kind(), e.to_string());
    let vol = medbatch_formats::nifti::read_volume(bytes, limits).map_err(fail)?;
    // One pass: the range over every slice, and the slices kept (in order, each once).
    let chosen = slice_choice(vol.depth, spec.max_images);
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    let mut kept = Vec::with_capacity(chosen.len());
    for z in 0..vol.depth {
        let slice = vol.slice(z).map_err(fail)?;
        (lo, hi) = slice.iter().fold((lo, hi), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        if chosen.binary_search(&z).is_ok() {
            kept.push(slice);
        }
    }
    let images: Vec<Arc<Rgb8>> =
        kept.iter().map(|s| prepare(Rgb8::from_gray(vol.width, vol.height, &range_u8(s, lo, hi)), spec)).collect();
    let labels: Vec<String> = (1..=images.len()).map(|n| format!("SLICE {n}")).collect();
    Ok(whole_file_unit(input, image_block(&labels), images))
}

/// Instance-number order, then position along the slice direction, then URI.
fn sort_instances(v: &mut [Instance<'_>]) {
    v.sort_by(|a, b| {
        let key = |i: &Instance<'_>| {
            (i.frames.header.instance_number.unwrap_or(i64::MAX), i.frames.header.image_position.map(|p| p[2]))
        };
        let (ka, kb) = (key(a), key(b));
        ka.0.cmp(&kb.0)
            .then(ka.1.partial_cmp(&kb.1).unwrap_or(std::cmp::Ordering::Equal))
            .then(a.input.uri.cmp(&b.input.uri))
    });
}

/// What each instance of a group gave a prompt: images, none for a reason, or an error row
/// (`None`: the error row accounts for the file).
type Taken = Vec<Option<Result<usize, SkipReason>>>;

/// The images of a study's radiographs (up to `limit`), what each instance gave, and the
/// errors of frames that do not convert. An instance with a frame that does not convert is
/// an error row; frames it gave before that stay in the prompt.
fn radiographs(
    instances: &[Instance<'_>],
    limit: usize,
    over_limit: SkipReason,
    spec: &ImagingSpec,
) -> (Vec<Arc<Rgb8>>, Taken, Vec<ImagingRead>) {
    let (mut images, mut errors) = (Vec::new(), Vec::new());
    let mut taken: Taken = Vec::with_capacity(instances.len());
    for i in instances {
        let before = images.len();
        let mut outcome = Some(Err(over_limit));
        for frame in &i.frames.frames {
            if images.len() == limit {
                break;
            }
            match radiograph(&i.frames, frame) {
                Ok(img) => {
                    images.push(prepare(img, spec));
                    outcome = Some(Ok(images.len() - before));
                }
                Err(m) => {
                    errors.push(Err(error(i.input, InputErrorKind::CorruptImage, m)));
                    outcome = None;
                    break;
                }
            }
        }
        taken.push(outcome);
    }
    (images, taken, errors)
}

/// The unit of a group's prompt; `taken[k]` is what `group[k]` gave it.
fn item(doc_id: String, group: &[Instance<'_>], taken: &Taken, labels: &[String], images: Vec<Arc<Rgb8>>) -> Unit {
    let inputs: Vec<&InputRef> = group.iter().map(|i| i.input).collect();
    let sources = group.iter().zip(taken).filter_map(|(i, t)| t.map(|t| source(i.input, t))).collect();
    Unit {
        doc: Document {
            id: doc_id,
            source_uri: inputs[0].uri.clone(),
            input_sha256: group_digest(&inputs),
            text: image_block(labels),
            patient_id: None,
            date: None,
        },
        images,
        sources,
        slides: Vec::new(),
    }
}

fn study(mut dicoms: Vec<Instance<'_>>, spec: &ImagingSpec) -> Vec<ImagingRead> {
    sort_instances(&mut dicoms);
    let (images, taken, mut out) = radiographs(&dicoms, spec.max_images, SkipReason::MaxImages, spec);
    if !images.is_empty() {
        let id = dicoms[0].frames.header.study_uid.clone();
        let labels = vec![String::new(); images.len()];
        out.push(Ok(item(id, &dicoms, &taken, &labels, images)));
    }
    out
}

fn series(mut dicoms: Vec<Instance<'_>>, spec: &ImagingSpec) -> Vec<ImagingRead> {
    sort_instances(&mut dicoms);
    let mut out = Vec::new();
    // Every frame is a slice; each must have the first slice's size.
    let (w, h) = (dicoms[0].frames.header.columns as usize, dicoms[0].frames.header.rows as usize);
    let mut slices: Vec<(usize, &[i32])> = Vec::new();
    let mut taken: Taken = Vec::with_capacity(dicoms.len());
    for (k, i) in dicoms.iter().enumerate() {
        let hd = &i.frames.header;
        if i.frames.samples_per_pixel != 1 || hd.columns as usize != w || hd.rows as usize != h {
            out.push(Err(error(
                i.input,
                InputErrorKind::NotApplicable,
                format!(
                    "slice of {}x{} with {} samples per pixel does not fit a {w}x{h} greyscale series",
                    hd.columns, hd.rows, i.frames.samples_per_pixel
                ),
            )));
            taken.push(None);
            continue;
        }
        let before = slices.len();
        slices.extend(i.frames.frames.iter().filter(|f| f.len() == w * h).map(|f| (k, f.as_slice())));
        if slices.len() == before {
            let detail = format!("no frame holds the {w}x{h} values its header declares");
            out.push(Err(error(i.input, InputErrorKind::CorruptImage, detail)));
            taken.push(None);
        } else {
            taken.push(Some(Err(SkipReason::SampledOut)));
        }
    }
    if slices.is_empty() {
        return out;
    }
    let chosen = slice_choice(slices.len(), spec.max_images);
    for &s in &chosen {
        let t = &mut taken[slices[s].0];
        *t = Some(Ok(t.and_then(Result::ok).unwrap_or(0) + 1));
    }
    let ct = dicoms[0].frames.header.modality == "CT";
    let images: Vec<Rgb8> = if ct {
        chosen
            .iter()
            .map(|&s| {
                let (k, f) = slices[s];
                Rgb8::new(w, h, ct_rgb(&rescaled(f, &dicoms[k].frames.header)))
            })
            .collect()
    } else {
        // Min–max over the whole series, as Google's serving code does for MR.
        let all: Vec<Vec<f64>> = slices.iter().map(|&(k, f)| rescaled(f, &dicoms[k].frames.header)).collect();
        let grey = minmax_u8(&all);
        chosen.iter().map(|&s| Rgb8::from_gray(w, h, &grey[s])).collect()
    };
    let labels: Vec<String> = (1..=images.len()).map(|n| format!("SLICE {n}")).collect();
    let id = dicoms[0].frames.header.series_uid.clone();
    let images = images.into_iter().map(|i| prepare(i, spec)).collect();
    out.push(Ok(item(id, &dicoms, &taken, &labels, images)));
    out
}

fn prior_current(dicoms: Vec<Instance<'_>>, spec: &ImagingSpec) -> Vec<ImagingRead> {
    let mut studies: std::collections::BTreeMap<(String, String), Vec<Instance<'_>>> = Default::default();
    for i in dicoms {
        let key = (i.frames.header.study_date.clone(), i.frames.header.study_uid.clone());
        studies.entry(key).or_default().push(i);
    }
    let mut studies: Vec<Vec<Instance<'_>>> = studies.into_values().collect();
    // Every file of a comparison that cannot be made gets its error row.
    let not_applicable = |files: &mut dyn Iterator<Item = &Instance<'_>>, detail: &str| -> Vec<ImagingRead> {
        files.map(|i| Err(error(i.input, InputErrorKind::NotApplicable, detail))).collect()
    };
    if studies.len() != 2 {
        let detail = if studies.len() == 1 {
            "no earlier study of this patient among the inputs to compare with".to_string()
        } else {
            format!("{} studies in one comparison; expected a prior and a current", studies.len())
        };
        return not_applicable(&mut studies.iter().flatten(), &detail);
    }
    let mut out = Vec::new();
    let mut images = Vec::new();
    let mut taken: Taken = Vec::new();
    for s in studies.iter_mut() {
        sort_instances(s);
        let (imgs, t, errs) = radiographs(s, 1, SkipReason::OnePerStudy, spec);
        out.extend(errs);
        images.extend(imgs);
        taken.extend(t);
    }
    let id = format!("{} prior {}", studies[1][0].frames.header.study_uid, studies[0][0].frames.header.study_uid);
    let group: Vec<Instance<'_>> = studies.into_iter().flatten().collect();
    if images.len() == 2 {
        out.push(Ok(item(id, &group, &taken, &[String::new(), String::new()], images)));
    } else {
        let usable = group.iter().zip(&taken).filter(|(_, t)| t.is_some()).map(|(i, _)| i);
        out.extend(not_applicable(&mut usable.into_iter(), "the other study of the comparison has no usable image"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_blocks_label_each_image() {
        assert_eq!(
            image_block(&["SLICE 1".into(), "SLICE 2".into()]),
            "<start_of_image>SLICE 1<start_of_image>SLICE 2"
        );
        assert_eq!(image_block(&[String::new(), String::new()]), "<start_of_image><start_of_image>");
    }
}
