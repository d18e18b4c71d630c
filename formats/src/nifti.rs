//! NIfTI-1 volumes (the `nifti` crate), plain `.nii` or gzip-compressed `.nii.gz`.
//!
//! The header is read first and held to the limits — dimensions present and non-zero, the
//! declared voxel bytes within [`ImageLimits::max_decoded_bytes`], the voxel offset sane —
//! and only then is the file inflated, never past the header, extensions and voxels it
//! declares: a gzip bomb costs what its header admits to and no more, and a stream that
//! inflates past that is refused as one. NIfTI-2 headers are
//! refused with that reason (the crate reads NIfTI-1 only).

use crate::limits::ImageLimits;
use nifti::{InMemNiftiObject, NiftiHeader, NiftiObject, NiftiVolume, RandomAccessNiftiVolume};
use std::io::Read;

/// Bytes of a NIfTI-1 header.
const HEADER_BYTES: u64 = 348;
/// The 4-byte extension flag after the header; voxels start at `vox_offset` ≥ 352.
const MIN_VOX_OFFSET: u64 = 352;
/// Extensions between the header and the voxels (JSON sidecars, DICOM headers) are small;
/// more than this is a crafted offset.
const MAX_EXTENSION_BYTES: u64 = 16 << 20;

/// Why a NIfTI file could not be read. Messages name sizes and fields, never content.
#[derive(Debug, thiserror::Error)]
pub enum NiftiError {
    #[error("gzip stream: {0}")]
    Gzip(String),
    #[error("NIfTI-2 header (only NIfTI-1 is read)")]
    Nifti2,
    #[error("not a readable NIfTI-1 file: {0}")]
    Corrupt(String),
    #[error("the header declares {declared} voxel bytes ({dims}), over the limit of {limit} bytes")]
    TooLarge { dims: String, declared: String, limit: u64 },
    #[error("the gzip stream inflates past the {declared} bytes its header declares")]
    Bomb { declared: u64 },
}

impl NiftiError {
    /// The error row kind this problem is reported as.
    pub fn kind(&self) -> medbatch_schemas::InputErrorKind {
        use medbatch_schemas::InputErrorKind as K;
        match self {
            Self::Gzip(_) | Self::Corrupt(_) => K::CorruptImage,
            Self::Nifti2 => K::UnsupportedEncoding,
            Self::TooLarge { .. } => K::TooLarge,
            Self::Bomb { .. } => K::CompressionBomb,
        }
    }
}

/// The header size field of NIfTI-2 (540), in either byte order.
fn is_nifti2(bytes: &[u8]) -> bool {
    bytes.len() >= 4 && (bytes[..4] == 540i32.to_le_bytes() || bytes[..4] == 540i32.to_be_bytes())
}

/// A volume read into memory: the first 3-D volume of the file is what [`Volume::slice`]
/// serves (a 4-D file contributes its first volume).
pub struct Volume {
    /// Pixels across (`dim[1]`).
    pub width: usize,
    /// Pixels down (`dim[2]`).
    pub height: usize,
    /// Slices (`dim[3]`, 1 for a 2-D image).
    pub depth: usize,
    obj: InMemNiftiObject,
}

impl Volume {
    /// Slice `z` in stored voxel order (no reorientation), values scaled by
    /// `scl_slope`/`scl_inter`, non-finite values as 0.
    pub fn slice(&self, z: usize) -> Result<Vec<f64>, NiftiError> {
        let vol = self.obj.volume();
        let mut coords = vec![0u16; vol.dim().len()];
        let mut s = Vec::with_capacity(self.width * self.height);
        for y in 0..self.height {
            for x in 0..self.width {
                coords[0] = x as u16;
                coords[1] = y as u16;
                if coords.len() > 2 {
                    coords[2] = z as u16;
                }
                let v = vol.get_f64(&coords).map_err(|e| NiftiError::Corrupt(format!("voxel data: {e}")))?;
                s.push(if v.is_finite() { v } else { 0.0 });
            }
        }
        Ok(s)
    }
}

/// Reads one NIfTI-1 file (its bytes as stored, gzip or not).
pub fn read_volume(bytes: &[u8], limits: &ImageLimits) -> Result<Volume, NiftiError> {
    crate::guard::guarded("NIfTI", || read(bytes, limits)).unwrap_or_else(|panic| Err(NiftiError::Corrupt(panic)))
}

fn read(bytes: &[u8], limits: &ImageLimits) -> Result<Volume, NiftiError> {
    let gzip = bytes.starts_with(&[0x1f, 0x8b]);
    let mut stream: Box<dyn Read + '_> =
        if gzip { Box::new(flate2::read::MultiGzDecoder::new(bytes)) } else { Box::new(bytes) };
    let mut head = Vec::with_capacity(HEADER_BYTES as usize);
    (&mut stream).take(HEADER_BYTES).read_to_end(&mut head).map_err(|e| NiftiError::Gzip(e.to_string()))?;
    if is_nifti2(&head) {
        return Err(NiftiError::Nifti2);
    }
    let header = NiftiHeader::from_reader(head.as_slice()).map_err(|e| NiftiError::Corrupt(e.to_string()))?;
    let dims = header.dim().map_err(|e| NiftiError::Corrupt(format!("volume dimensions: {e}")))?.to_vec();
    if dims.len() < 2 || dims.contains(&0) {
        return Err(NiftiError::Corrupt(format!("volume dimensions {dims:?}")));
    }
    let bytes_per_voxel = u64::try_from(header.bitpix).ok().filter(|&b| b > 0).map(|b| b.div_ceil(8));
    let Some(bytes_per_voxel) = bytes_per_voxel else {
        return Err(NiftiError::Corrupt(format!("bitpix {} is not a voxel size", header.bitpix)));
    };
    let dims64: Vec<u64> = dims.iter().map(|&d| u64::from(d)).collect();
    let voxel_bytes = limits.check_declared(&dims64, bytes_per_voxel).map_err(|declared| NiftiError::TooLarge {
        dims: format!("{} at {} bits", dims.iter().map(u16::to_string).collect::<Vec<_>>().join(" x "), header.bitpix),
        declared: if declared == u64::MAX { "more than 2^64".into() } else { declared.to_string() },
        limit: limits.max_decoded_bytes,
    })?;
    let offset = header.vox_offset;
    if !offset.is_finite() || offset < MIN_VOX_OFFSET as f32 || offset > (MIN_VOX_OFFSET + MAX_EXTENSION_BYTES) as f32 {
        return Err(NiftiError::Corrupt(format!(
            "voxel offset {offset} is outside {MIN_VOX_OFFSET}..={}",
            MIN_VOX_OFFSET + MAX_EXTENSION_BYTES
        )));
    }
    // Everything the header declares and one byte more, which tells a gzip stream that goes
    // on (a bomb behind a small header) from one that ends: nothing further is inflated.
    let rest = offset as u64 - HEADER_BYTES + voxel_bytes;
    let mut raw = head;
    raw.try_reserve_exact(rest as usize + 1).map_err(|_| NiftiError::TooLarge {
        dims: "the volume".into(),
        declared: voxel_bytes.to_string(),
        limit: limits.max_decoded_bytes,
    })?;
    stream.take(rest + 1).read_to_end(&mut raw).map_err(|e| NiftiError::Gzip(e.to_string()))?;
    if raw.len() as u64 > HEADER_BYTES + rest {
        if gzip {
            return Err(NiftiError::Bomb { declared: HEADER_BYTES + rest });
        }
        raw.pop();
    }
    let obj = InMemNiftiObject::from_reader(raw.as_slice()).map_err(|e| NiftiError::Corrupt(e.to_string()))?;
    let dim = obj.volume().dim().to_vec();
    Ok(Volume {
        width: dim[0] as usize,
        height: dim[1] as usize,
        depth: dim.get(2).copied().unwrap_or(1) as usize,
        obj,
    })
}
