//! Contracts shared by every medbatch component.
//!
//! This crate owns the vocabulary that crosses process and machine boundaries: distinct id
//! types, the job and completion messages carried by the queue and written next to the
//! output, the pipeline spec read from `pipelines/NAME/pipeline.toml`, the documents a worker
//! reads, and the Arrow schemas of every output table. It performs no I/O and depends on no
//! runtime, no model code and no cloud SDK, so any component (or an external reader) can link
//! it cheaply.

pub mod document;
pub mod errors;
pub mod ids;
pub mod job;
pub mod pipeline;
pub mod tables;

pub use document::{Document, InputError, InputErrorKind};
pub use errors::{DocumentStatus, ErrorReason, ErrorStage, SkipReason};
pub use ids::{Digest, JobId, RunId};
pub use job::{
    CaseRef, Completion, IndexedInput, InputKind, InputRef, Job, Manifest, ModelRef, OutputPart, PipelineRef,
    Selection, JOB_SCHEMA_VERSION, NO_MODEL,
};
pub use pipeline::{PipelineSpec, SpecError};
