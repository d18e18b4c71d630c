//! Run planning and commit: the coordinator side of medbatch.
//!
//! It discovers inputs (files, folders, archive directories — metadata only, never document
//! content), splits them into jobs whose ids are derived from the run id and their inputs,
//! skips jobs that already have a completion marker (so planning is resumable), publishes
//! the rest, follows the markers ([`follow`]), and once every job has one writes the run
//! manifest and `_SUCCESS`.
//! It never links the model engine.

pub mod commit;
pub mod follow;
pub mod index;
pub mod plan;

pub use commit::{commit_run, run_progress, RunProgress, RunStage, StageInput};
pub use follow::{follow_and_commit, FollowConfig, Followed};
pub use index::{current_view, skip_committed};
pub use plan::{group_small_files, job_units, plan_run, publish_pending, PlanConfig, PlannedRun};

/// Errors that stop planning or committing a run.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("input {0}")]
    Input(#[from] medbatch_connectors::inputs::InputsError),
    #[error("output: {0}")]
    Store(#[from] medbatch_connectors::store::StoreError),
    #[error("queue: {0}")]
    Queue(#[from] medbatch_connectors::queue::QueueError),
    #[error("no input files found in {0}")]
    NoInputs(String),
    /// A slide manifest that cannot be used (it is configuration: the run stops).
    #[error("slide manifest {path}: {reason}")]
    Manifest { path: String, reason: String },
    #[error("run {run_id} was planned before with other inputs or settings; use a new --run-id")]
    PlanMismatch { run_id: String },
    /// The stage run at commit (the patient-level reduce) failed; the run stays uncommitted.
    #[error("run {run_id}: the stage after its jobs failed: {reason}")]
    Stage { run_id: String, reason: String },
    #[error("corrupt run metadata {key}: {reason}")]
    Corrupt { key: String, reason: String },
    /// Following could not commit a run whose jobs are all marked done.
    #[error("run {run_id} could not be committed: {reason}")]
    Stalled { run_id: String, reason: String },
}
