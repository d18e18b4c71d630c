//! Job execution: the worker side of medbatch.
//!
//! A worker takes a job from the queue, reads its inputs into documents ([`input`]), turns
//! each document into rows — deterministic parsers first, then the model on what is left
//! ([`extract`], [`labreport`]) — writes one Parquet part per table ([`parquet_out`]), then
//! the completion marker, and only then acknowledges the job ([`job`]). Bad input becomes
//! error rows; the job still completes.

pub mod chunk;
pub mod eval;
pub mod extract;
pub mod grammar;
pub mod grounding;
pub mod imaging;
pub mod input;
pub mod job;
pub mod labreport;
pub mod parquet_out;
pub mod pipeline;
pub mod serve;
pub mod structured;

pub use job::{run_worker, WorkerContext, WorkerEvent};
pub use pipeline::LoadedPipeline;
