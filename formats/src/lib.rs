//! Untrusted bytes → typed content.
//!
//! Everything here is synchronous, bounded (no read past a limit plus one byte, inflation
//! metered or capped while reading, declared sizes checked before a buffer is reserved) and
//! free of patient text in its errors, and no panic crosses its API ([`guard`]). It knows
//! nothing about queues, stores, models, prompts or Parquet.
//!
//! - [`limits`]: every size limit of reading, for planning and workers alike.
//! - [`sniff`]: formats told apart by their first bytes.
//! - [`meter`]: bounded and metered reading.
//! - [`archive`]: tar, tar.gz and zip walked member by member, for listing and for reading.
//! - [`records`]: whole-file text, JSON Lines and CSV, one record at a time.
//! - [`dicom`]: DICOM headers (feature `dicom-header`) and stored pixel values (`pixels`).
//! - [`nifti`], [`image`]: NIfTI-1 volumes, PNG and JPEG files (`pixels`).
//! - [`wsi`]: whole-slide pyramids (TIFF, BigTIFF, Aperio SVS): descriptions from headers
//!   (feature `wsi-header`), tiles and regions (`pixels`), read a range at a time.
//!
//! The coordinator builds this crate without `pixels`: planning reads headers, never pixels.

pub mod archive;
pub mod guard;
pub mod limits;
pub mod meter;
pub mod records;
pub mod sniff;

#[cfg(feature = "dicom-header")]
pub mod dicom;
#[cfg(feature = "pixels")]
pub mod image;
#[cfg(feature = "pixels")]
pub mod nifti;
#[cfg(feature = "wsi-header")]
pub mod wsi;

pub use limits::{ImageLimits, InputLimits};
