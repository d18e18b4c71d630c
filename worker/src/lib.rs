//! Job execution: the worker side of medbatch.
//!
//! A worker takes a job from the queue ([`serve`]), reads its inputs into units: documents,
//! or imaging studies with their images ([`input`], [`imaging`]); hands each unit to its
//! pipeline ([`pipelines`]: lab reports, structured extraction), whose model calls all go
//! through [`model_call`]; writes one Parquet part per table ([`parquet_out`]), then the
//! completion marker, and only then acknowledges the job ([`job`]). Bad input becomes error
//! rows; the job still completes.

pub mod chunk;
pub mod clinical;
pub mod criteria;
pub mod grammar;
pub mod grounding;
pub mod imaging;
pub mod input;
pub mod job;
pub mod model_call;
pub mod parquet_out;
pub mod patient_notes;
pub mod patients;
pub mod pipeline;
pub mod pipelines;
pub mod serve;

pub use job::{run_worker, WorkerContext, WorkerEvent};
pub use pipeline::LoadedPipeline;
pub use pipelines::Pipeline;
