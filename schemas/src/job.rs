//! Job and completion messages, and the run manifest.

use crate::ids::{Digest, JobId, RunId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The `set_aside` kinds that are ordered tests without a result (no row was written for
/// them), as the lab-report pipeline names them; summaries list them first.
pub const UNRESULTED_KINDS: [&str; 4] = ["pending", "cancelled", "not_reported", "withdrawn"];

/// Version of the job, completion and manifest formats; bumped on incompatible change.
pub const JOB_SCHEMA_VERSION: u32 = 1;

/// What a worker must do: process these inputs with this pipeline and model, for this run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub schema_version: u32,
    pub run_id: RunId,
    pub job_id: JobId,
    pub pipeline: PipelineRef,
    pub model: ModelRef,
    pub inputs: Vec<InputRef>,
    /// Root of the output layout (a local directory path or an object-store URI).
    pub output: String,
    /// Delivery attempt, starting at 1.
    pub attempt: u32,
}

impl Job {
    /// Canonical serialization of the inputs, from which the job id is derived.
    pub fn canonical_inputs(inputs: &[InputRef]) -> String {
        serde_json::to_string(inputs).expect("input refs serialize")
    }

    /// Builds a job with its id derived from the run id and the inputs.
    pub fn new(run_id: RunId, pipeline: PipelineRef, model: ModelRef, inputs: Vec<InputRef>, output: String) -> Self {
        let job_id = JobId::derive(&run_id, &Self::canonical_inputs(&inputs));
        Self { schema_version: JOB_SCHEMA_VERSION, run_id, job_id, pipeline, model, inputs, output, attempt: 1 }
    }
}

/// The pipeline a job runs: its name, version and the digest of the pipeline folder's files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineRef {
    pub name: String,
    pub version: String,
    pub digest: Digest,
}

/// The model a job needs: an id (file name or checkpoint name) and the weights digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRef {
    pub id: String,
    pub digest: Digest,
}

/// The model id of runs whose pipeline calls no model (`task = "tiles"`).
pub const NO_MODEL: &str = "none";

impl ModelRef {
    /// The model of a run whose pipeline calls none: id `none`, the digest of that word.
    pub fn none() -> Self {
        Self { id: NO_MODEL.into(), digest: Digest::of_bytes(NO_MODEL.as_bytes()) }
    }

    pub fn is_none(&self) -> bool {
        *self == Self::none()
    }
}

/// How an input's bytes are to be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputKind {
    /// A plain text document (.txt).
    Text,
    /// One JSON record per line (.jsonl).
    Jsonl,
    /// Records with a header row (.csv).
    Csv,
    /// A tar archive (.tar).
    Tar,
    /// A gzip-compressed tar archive (.tar.gz, .tgz).
    TarGz,
    /// A zip archive (.zip).
    Zip,
    /// An Apache Parquet file whose rows are records (.parquet): the spec's id, text, patient
    /// and date fields are its columns (the tables of an earlier run can be read this way).
    Parquet,
    /// A DICOM file (.dcm, .dicom; in imaging pipelines also a file without an extension
    /// that carries the DICOM marker).
    Dicom,
    /// A PNG or JPEG image (.png, .jpg, .jpeg).
    Image,
    /// A NIfTI-1 or NIfTI-2 volume (.nii, .nii.gz).
    Nifti,
    /// A whole-slide image in a tiled TIFF: Aperio SVS, pyramidal TIFF or BigTIFF (.svs,
    /// .tif, .tiff). DICOM whole-slide images are `Dicom` files.
    Slide,
    /// An extension medbatch does not read; the worker reports it as an error row.
    Unsupported,
}

impl InputKind {
    /// Kind from a file or member name, by extension (case-insensitive).
    pub fn from_name(name: &str) -> Self {
        let n = name.to_ascii_lowercase();
        if n.ends_with(".tar.gz") || n.ends_with(".tgz") {
            Self::TarGz
        } else if n.ends_with(".tar") {
            Self::Tar
        } else if n.ends_with(".zip") {
            Self::Zip
        } else if n.ends_with(".jsonl") || n.ends_with(".ndjson") {
            Self::Jsonl
        } else if n.ends_with(".csv") {
            Self::Csv
        } else if n.ends_with(".parquet") {
            Self::Parquet
        } else if n.ends_with(".txt") || n.ends_with(".text") {
            Self::Text
        } else if n.ends_with(".dcm") || n.ends_with(".dicom") {
            Self::Dicom
        } else if n.ends_with(".png") || n.ends_with(".jpg") || n.ends_with(".jpeg") {
            Self::Image
        } else if n.ends_with(".nii") || n.ends_with(".nii.gz") {
            Self::Nifti
        } else if n.ends_with(".svs") || n.ends_with(".tif") || n.ends_with(".tiff") {
            Self::Slide
        } else {
            Self::Unsupported
        }
    }

    pub fn is_archive(self) -> bool {
        matches!(self, Self::Tar | Self::TarGz | Self::Zip)
    }

    /// Images and volumes, read by imaging pipelines.
    pub fn is_imaging(self) -> bool {
        matches!(self, Self::Dicom | Self::Image | Self::Nifti | Self::Slide)
    }
}

/// Which part of an input a job covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    /// The whole input.
    Whole,
    /// These members of an archive (in archive order), as listed at planning time.
    Members(Vec<String>),
    /// A band of a whole-slide image's patch grid: grid rows `first_row..first_row + rows`
    /// of the cells read from pyramid level `level` (a tile-level pipeline's job).
    Tiles { level: u32, first_row: u64, rows: u64 },
}

/// A reference to an input: where it is, how big, its digest, and the part this job covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputRef {
    pub uri: String,
    pub size: u64,
    pub sha256: Digest,
    pub kind: InputKind,
    pub selection: Selection,
    /// The object's version tag when the input is in an object store (S3's ETag): a worker
    /// reads exactly that version or reports the input as changed. Absent for local files
    /// (and then not serialized, so their job ids stay the same).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// Slide runs grouped by case: the case this input's slide belongs to and the slide's
    /// place in it. Absent otherwise (and then not serialized).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub case: Option<CaseRef>,
}

/// A slide's case in a job of several slides (`imaging.slide.group = "case"`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CaseRef {
    /// The case id: a manifest's `case` value, or a DICOM slide's study instance UID.
    pub id: String,
    /// Which slide of the case (0, 1, …): the inputs of one slide share it.
    pub slide: u32,
}

/// One Parquet part written by a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputPart {
    /// Table name (`lab_results`, `_errors`, ...).
    pub table: String,
    /// Key relative to the output root, e.g. `lab_results/run_id=R/part-J.parquet`.
    pub key: String,
    pub rows: u64,
    pub bytes: u64,
    pub sha256: Digest,
}

/// An input a committed run processed (the index of committed inputs, `OUT/_inputs/`): its
/// URI, the digest of its content, the run and when it committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexedInput {
    pub uri: String,
    pub sha256: Digest,
    pub run_id: RunId,
    pub committed_at: String,
}

/// The completion marker `OUT/_runs/RUN/done/JOB.json`, written after the job's parts and
/// before the message is acknowledged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    pub schema_version: u32,
    pub run_id: RunId,
    pub job_id: JobId,
    pub parts: Vec<OutputPart>,
    pub documents_ok: u64,
    pub documents_failed: u64,
    pub error_rows: u64,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub engine_ms: u64,
    /// Pieces of the job's documents that are not results, by reason (`pending`,
    /// `cancelled`, `not_reported`, `metadata` …): extraction pipelines with a classifier.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set_aside: BTreeMap<String, u64>,
    pub wall_ms: u64,
    pub worker_id: String,
    /// RFC 3339 UTC time the marker was written.
    pub finished_at: String,
}

/// The run manifest `OUT/_runs/RUN/manifest.json`: every part of every job, with digests.
/// Readers trust the manifest, not a directory listing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema_version: u32,
    pub run_id: RunId,
    pub pipeline: PipelineRef,
    pub model: ModelRef,
    pub jobs: u64,
    pub documents_ok: u64,
    pub documents_failed: u64,
    pub error_rows: u64,
    pub tokens_in: u64,
    pub tokens_out: u64,
    /// The jobs' `set_aside` counts summed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set_aside: BTreeMap<String, u64>,
    pub parts: Vec<OutputPart>,
    pub created_at: String,
    /// An incremental run: the inputs not planned because a committed run of the same
    /// pipeline and model processed the same content at the same URI (that run named).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<IndexedInput>,
    /// An incremental run: the earlier content of inputs it processed again because they
    /// changed; rows from these no longer count (see `OUT/_inputs/`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub superseded: Vec<IndexedInput>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_from_extension() {
        assert_eq!(InputKind::from_name("A.TXT"), InputKind::Text);
        assert_eq!(InputKind::from_name("x.tar.gz"), InputKind::TarGz);
        assert_eq!(InputKind::from_name("x.tgz"), InputKind::TarGz);
        assert_eq!(InputKind::from_name("x.zip"), InputKind::Zip);
        assert_eq!(InputKind::from_name("x.jsonl"), InputKind::Jsonl);
        assert_eq!(InputKind::from_name("part-0.PARQUET"), InputKind::Parquet);
        assert_eq!(InputKind::from_name("x.csv"), InputKind::Csv);
        assert_eq!(InputKind::from_name("x.pdf"), InputKind::Unsupported);
    }

    #[test]
    fn job_round_trips_and_replans_to_same_id() {
        let inputs = vec![InputRef {
            uri: "file:///a.txt".into(),
            size: 3,
            sha256: Digest::of_bytes(b"abc"),
            kind: InputKind::Text,
            selection: Selection::Whole,
            etag: None,
            case: None,
        }];
        let p = PipelineRef { name: "p".into(), version: "1".into(), digest: Digest::of_bytes(b"p") };
        let m = ModelRef { id: "m".into(), digest: Digest::of_bytes(b"m") };
        let run = RunId::new("r").unwrap();
        let j = Job::new(run.clone(), p.clone(), m.clone(), inputs.clone(), "/out".into());
        let j2 = Job::new(run, p, m, inputs, "/out".into());
        assert_eq!(j.job_id, j2.job_id);
        let s = serde_json::to_string(&j).unwrap();
        let back: Job = serde_json::from_str(&s).unwrap();
        assert_eq!(back, j);
    }
}
