//! Every size limit of reading, in one place: planning (listing archives, reading headers)
//! and workers (reading members, decoding pixels) are held to the same numbers.

use medbatch_schemas::pipeline::{ImagingSpec, InputSpec};

/// 64 MiB: a JSONL/CSV member may hold many notes, but hundreds of MiB in one member is a
/// bomb or a misrouted dump, and members are held in memory while parsed.
pub const DEFAULT_MAX_MEMBER_BYTES: u64 = 64 << 20;
/// Text and JSON compress 3–10:1; deflate tops out near 1030:1, so 100:1 is only reached by
/// padding or crafted data.
pub const DEFAULT_MAX_INFLATE_RATIO: u64 = 100;
/// 4 GiB inflated per archive: far beyond a job's worth of notes. Listing an archive at
/// planning stops here too, since no job could read past it.
pub const DEFAULT_MAX_ARCHIVE_INFLATED_BYTES: u64 = 4 << 30;
/// Members of one archive turned into documents or error rows by one read.
pub const DEFAULT_MAX_MEMBERS: usize = 100_000;
/// Most entries listed from one archive at planning; past this the listing stops (a header
/// flood, not notes). Ten times the members one read turns into documents.
pub const LIST_MAX_MEMBERS: usize = 1_000_000;
/// The ratio limit applies only past this many inflated bytes: small, repetitive files (blank
/// CSV columns, whitespace) legitimately exceed 100:1 and cost nothing to read.
pub const RATIO_CHECK_MIN_BYTES: u64 = 1 << 20;
/// Bytes the tar reader may consume for one member's headers (PAX records, GNU long names),
/// beyond skipping the previous member's data: the tar crate buffers these whole.
pub const TAR_HEADER_ALLOWANCE_BYTES: u64 = 1 << 20;
/// Tar's block: headers and padded member data.
pub const TAR_BLOCK_BYTES: u64 = 512;
pub use medbatch_schemas::pipeline::{DEFAULT_MAX_DECODED_BYTES, DEFAULT_MAX_DOCUMENT_BYTES};

/// Size limits for reading one text input. `max_document_bytes` comes from the pipeline spec;
/// the archive limits are deployment-wide defaults.
#[derive(Clone, Debug)]
pub struct InputLimits {
    /// Largest document: a text file or member, or one record's text.
    pub max_document_bytes: u64,
    /// Largest archive member once inflated.
    pub max_member_bytes: u64,
    /// Largest inflated/compressed ratio of a member, and of a tar.gz stream as a whole.
    pub max_inflate_ratio: u64,
    /// Most bytes inflated from one archive.
    pub max_archive_inflated_bytes: u64,
    /// Most members of one archive turned into documents or error rows.
    pub max_members: usize,
}

impl InputLimits {
    pub fn from_spec(spec: &InputSpec) -> Self {
        Self {
            max_document_bytes: spec.max_document_bytes,
            max_member_bytes: DEFAULT_MAX_MEMBER_BYTES,
            max_inflate_ratio: DEFAULT_MAX_INFLATE_RATIO,
            max_archive_inflated_bytes: DEFAULT_MAX_ARCHIVE_INFLATED_BYTES,
            max_members: DEFAULT_MAX_MEMBERS,
        }
    }
}

/// Size limits for decoding one image or volume file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest file read (compressed size, as stored).
    pub max_file_bytes: u64,
    /// Most bytes of decoded samples a header may declare (rows × columns × frames × samples
    /// × bytes per sample); also bounds how far a gzip NIfTI is inflated.
    pub max_decoded_bytes: u64,
}

impl ImageLimits {
    pub fn from_spec(input: &InputSpec, imaging: &ImagingSpec) -> Self {
        Self { max_file_bytes: input.max_document_bytes, max_decoded_bytes: imaging.max_decoded_bytes }
    }

    /// Checks a declared decoded size (`dims` multiplied, times `bytes_per_sample`) against
    /// the limit before anything is allocated. Overflow counts as over.
    pub fn check_declared(&self, dims: &[u64], bytes_per_sample: u64) -> Result<u64, u64> {
        let total = dims.iter().try_fold(bytes_per_sample, |acc, &d| acc.checked_mul(d));
        match total {
            Some(t) if t <= self.max_decoded_bytes => Ok(t),
            Some(t) => Err(t),
            None => Err(u64::MAX),
        }
    }
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self { max_file_bytes: DEFAULT_MAX_DOCUMENT_BYTES, max_decoded_bytes: DEFAULT_MAX_DECODED_BYTES }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_sizes_are_checked_without_overflow() {
        let l = ImageLimits { max_file_bytes: 1 << 20, max_decoded_bytes: 1 << 30 };
        assert_eq!(l.check_declared(&[512, 512, 100], 2), Ok(512 * 512 * 100 * 2));
        assert_eq!(l.check_declared(&[65535, 65535, 4000], 2), Err(65535 * 65535 * 4000 * 2));
        assert_eq!(l.check_declared(&[u64::MAX, 2], 1), Err(u64::MAX));
    }
}
