//! Distinct id types, so that a job id can never be passed where a run id is meant.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::fmt;

/// Longest run id accepted; run ids become path segments of the output layout.
pub const MAX_RUN_ID_LEN: usize = 128;

/// Identifier of one run: a user-chosen or generated name, safe as a path segment.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RunId(String);

/// Why a string is not a valid run id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid run id {0:?}: use 1-128 characters from A-Z a-z 0-9 . _ - (not starting with '.')")]
pub struct InvalidRunId(pub String);

impl RunId {
    /// Validates a run id: letters, digits, `.`, `_`, `-`, not starting with a dot.
    pub fn new(s: impl Into<String>) -> Result<Self, InvalidRunId> {
        let s = s.into();
        let ok = !s.is_empty()
            && s.len() <= MAX_RUN_ID_LEN
            && !s.starts_with('.')
            && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if ok {
            Ok(Self(s))
        } else {
            Err(InvalidRunId(s))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Identifier of one job: a digest of the run id and the job's canonical input references,
/// so that planning a run again yields the same ids.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(String);

/// Hex characters kept from the SHA-256 of a job's identity (80 bits: collisions within one
/// run are not a practical concern, and the id stays readable in file names).
pub const JOB_ID_HEX_LEN: usize = 20;

impl JobId {
    /// Derives the job id from the run id and the canonical serialization of its inputs.
    pub fn derive(run_id: &RunId, canonical_inputs: &str) -> Self {
        let mut h = Sha256::new();
        h.update(run_id.as_str().as_bytes());
        h.update([0u8]);
        h.update(canonical_inputs.as_bytes());
        let hex = hex::encode(h.finalize());
        Self(hex[..JOB_ID_HEX_LEN].to_string())
    }

    /// Accepts an id read back from storage or the queue; it must look like a derived id.
    pub fn parse(s: &str) -> Option<Self> {
        (s.len() == JOB_ID_HEX_LEN && s.chars().all(|c| c.is_ascii_hexdigit())).then(|| Self(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A SHA-256 digest in lowercase hex.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Digest(String);

impl Digest {
    pub fn of_bytes(bytes: &[u8]) -> Self {
        Self(hex::encode(Sha256::digest(bytes)))
    }

    /// Wraps a digest computed elsewhere (a streaming hasher's output).
    pub fn from_sha256(out: impl AsRef<[u8]>) -> Self {
        Self(hex::encode(out.as_ref()))
    }

    /// Accepts a digest in hex (64 characters), lowercasing it.
    pub fn parse(s: &str) -> Option<Self> {
        (s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit())).then(|| Self(s.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 12 hex characters, for log lines.
    pub fn short(&self) -> &str {
        &self.0[..self.0.len().min(12)]
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_id_rejects_path_tricks() {
        assert!(RunId::new("nightly-2026-11-29").is_ok());
        for bad in ["", "..", ".hidden", "a/b", "a b", "x\\y", &"a".repeat(129)] {
            assert!(RunId::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn job_id_is_stable_and_depends_on_run() {
        let a = RunId::new("a").unwrap();
        let b = RunId::new("b").unwrap();
        let j1 = JobId::derive(&a, "[x]");
        assert_eq!(j1, JobId::derive(&a, "[x]"));
        assert_ne!(j1, JobId::derive(&b, "[x]"));
        assert_ne!(j1, JobId::derive(&a, "[y]"));
        assert_eq!(j1.as_str().len(), JOB_ID_HEX_LEN);
        assert_eq!(JobId::parse(j1.as_str()), Some(j1));
        assert_eq!(JobId::parse("../etc"), None);
    }

    #[test]
    fn digest_matches_known_vector() {
        assert_eq!(
            Digest::of_bytes(b"abc").as_str(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
