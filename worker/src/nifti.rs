//! NIfTI-1 volumes (the `nifti` crate; `.nii` or gzip-compressed `.nii.gz`) as a series of
//! slices: the third axis is the slice axis, each slice is `dim[1]` pixels wide and `dim[2]`
//! high in stored voxel order (no reorientation), values scaled by `scl_slope`/`scl_inter`,
//! min–max over the whole volume to 8 bits (as MR series), sampled uniformly down to
//! `imaging.max_images` and labelled `SLICE n`. A 4-D volume contributes its first volume.
//! NIfTI-2 headers are refused with that reason (the crate reads NIfTI-1 only).

use crate::dicom::{minmax_u8, slice_choice};
use crate::imaging::ImagingItem;
use medbatch_engine::engine::START_OF_IMAGE;
use medbatch_engine::image::{pad_to_square, Rgb8};
use medbatch_schemas::pipeline::ImagingSpec;
use medbatch_schemas::{Document, InputError, InputErrorKind, InputRef};
use nifti::{InMemNiftiObject, NiftiObject, NiftiVolume, RandomAccessNiftiVolume};
use std::io::Read;
use std::sync::Arc;

/// Largest volume read, in voxels of the slices used (a 4 GiB f64 buffer).
const MAX_VOXELS: usize = 1 << 29;

fn error(input: &InputRef, kind: InputErrorKind, detail: impl Into<String>) -> InputError {
    InputError { source_uri: input.uri.clone(), member: None, record: None, kind, detail: detail.into() }
}

/// The header size field of NIfTI-2 (540), in either byte order.
fn is_nifti2(bytes: &[u8]) -> bool {
    bytes.len() >= 4 && (bytes[..4] == 540i32.to_le_bytes() || bytes[..4] == 540i32.to_be_bytes())
}

/// Reads one NIfTI file (its bytes) into a prompt's slices.
pub fn read_volume(bytes: &[u8], input: &InputRef, spec: &ImagingSpec) -> Result<ImagingItem, InputError> {
    let raw = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(bytes)
            .read_to_end(&mut out)
            .map_err(|e| error(input, InputErrorKind::CorruptImage, format!("gzip stream: {e}")))?;
        out
    } else {
        bytes.to_vec()
    };
    if is_nifti2(&raw) {
        return Err(error(input, InputErrorKind::UnsupportedEncoding, "NIfTI-2 header (only NIfTI-1 is read)"));
    }
    let obj = InMemNiftiObject::from_reader(raw.as_slice())
        .map_err(|e| error(input, InputErrorKind::CorruptImage, format!("not a readable NIfTI-1 file: {e}")))?;
    let vol = obj.volume();
    let dim = vol.dim().to_vec();
    if dim.len() < 2 || dim.contains(&0) {
        return Err(error(input, InputErrorKind::CorruptImage, format!("volume dimensions {dim:?}")));
    }
    let (w, h) = (dim[0] as usize, dim[1] as usize);
    let depth = dim.get(2).copied().unwrap_or(1) as usize;
    if w * h * depth > MAX_VOXELS {
        return Err(error(input, InputErrorKind::TooLarge, format!("{w}x{h}x{depth} voxels")));
    }
    let mut slices = Vec::with_capacity(depth);
    let mut coords = vec![0u16; dim.len()];
    for z in 0..depth {
        let mut s = Vec::with_capacity(w * h);
        for y in 0..h {
            for x in 0..w {
                coords[0] = x as u16;
                coords[1] = y as u16;
                if coords.len() > 2 {
                    coords[2] = z as u16;
                }
                let v = vol
                    .get_f64(&coords)
                    .map_err(|e| error(input, InputErrorKind::CorruptImage, format!("voxel data: {e}")))?;
                s.push(if v.is_finite() { v } else { 0.0 });
            }
        }
        slices.push(s);
    }
    let grey = minmax_u8(&slices);
    let chosen = slice_choice(depth, spec.max_images);
    let images: Vec<Arc<Rgb8>> = chosen
        .iter()
        .map(|&z| {
            let img = Rgb8::from_gray(w, h, &grey[z]);
            Arc::new(if spec.pad_to_square { pad_to_square(&img) } else { img })
        })
        .collect();
    let text: String = (1..=images.len()).map(|n| format!("{START_OF_IMAGE}SLICE {n}")).collect();
    Ok(ImagingItem {
        doc: Document {
            id: input.uri.rsplit('/').next().unwrap_or(&input.uri).to_string(),
            source_uri: input.uri.clone(),
            input_sha256: input.sha256.clone(),
            text,
        },
        images,
    })
}
