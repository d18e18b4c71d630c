//! The worker loop of both modes: take a delivery, find what its job needs (pipeline, output
//! store, inputs), handle it, until the queue is drained or closed, or the engine stops. The
//! embedded run serves one fixed context; a distributed worker resolves each job's pipeline
//! and output store, opening each once.

use crate::job::{handle_delivery, Handled, WorkerContext};
use crate::pipeline::{LoadedPipeline, PipelineError};
use crate::pipelines::Pipeline;
use medbatch_connectors::inputs::InputSource;
use medbatch_connectors::queue::{JobQueue, QueueError};
use medbatch_connectors::store::{ObjectStore, StoreError};
use medbatch_engine::EngineHandle;
use medbatch_schemas::Job;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::Mutex;
use tracing::Instrument;

/// Why a job's context could not be found: another worker may have it.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("output {output}: {source}")]
    Store { output: String, source: StoreError },
}

/// Where each job's context comes from.
pub enum Contexts {
    /// One pipeline and one output for every job (the embedded run).
    Fixed(WorkerContext),
    /// Any pipeline and output the jobs name (distributed workers).
    Resolved(Resolver),
}

/// Pipelines and output stores of the jobs a worker sees, opened once each.
pub struct Resolver {
    /// `None`: a worker of pipelines that call no model, or of an embedding model.
    pub engine: Option<EngineHandle>,
    /// The embedding model's service (a worker of `embed` pipelines).
    pub embedder: Option<medbatch_engine::embed::EmbedHandle>,
    pub s3_endpoint: Option<String>,
    pub inputs: InputSource,
    /// Pipelines looked for here first (by name), then among the built-in ones.
    pub pipeline_dir: Option<std::path::PathBuf>,
    pub worker_id: String,
    pipelines: Mutex<HashMap<String, Arc<dyn Pipeline>>>,
    stores: Mutex<HashMap<String, Arc<dyn ObjectStore>>>,
}

impl Resolver {
    pub fn new(
        (engine, embedder): (Option<EngineHandle>, Option<medbatch_engine::embed::EmbedHandle>),
        s3_endpoint: Option<String>,
        pipeline_dir: Option<std::path::PathBuf>,
        worker_id: String,
    ) -> Self {
        let inputs = InputSource::with_s3(s3_endpoint.clone());
        Self {
            engine,
            embedder,
            s3_endpoint,
            inputs,
            pipeline_dir,
            worker_id,
            pipelines: Mutex::new(HashMap::new()),
            stores: Mutex::new(HashMap::new()),
        }
    }

    async fn context(&self, job: &Job, slot: usize) -> Result<WorkerContext, ResolveError> {
        let pipeline = {
            let mut p = self.pipelines.lock().await;
            match p.get(&job.pipeline.name) {
                Some(x) => x.clone(),
                None => {
                    let name = &job.pipeline.name;
                    let local = self.pipeline_dir.as_ref().map(|d| d.join(name)).filter(|d| d.is_dir());
                    let loaded = match local {
                        Some(dir) => LoadedPipeline::load(&dir.to_string_lossy())?,
                        None => LoadedPipeline::load(name)?,
                    };
                    let pipeline = crate::pipelines::for_spec(Arc::new(loaded))?;
                    p.insert(job.pipeline.name.clone(), pipeline.clone());
                    pipeline
                }
            }
        };
        let store = {
            let mut s = self.stores.lock().await;
            match s.get(&job.output) {
                Some(x) => x.clone(),
                None => {
                    let (opened, _) = medbatch_connectors::store::open(&job.output, self.s3_endpoint.as_deref())
                        .await
                        .map_err(|source| ResolveError::Store { output: job.output.clone(), source })?;
                    s.insert(job.output.clone(), opened.clone());
                    opened
                }
            }
        };
        Ok(WorkerContext {
            store,
            engine: self.engine.clone(),
            embedder: self.embedder.clone(),
            pipeline,
            worker_id: format!("{}-{slot}", self.worker_id),
            events: None,
            inputs: self.inputs.clone(),
        })
    }
}

impl Contexts {
    async fn context(&self, job: &Job, slot: usize) -> Result<WorkerContext, ResolveError> {
        match self {
            Self::Fixed(ctx) => Ok(ctx.clone()),
            Self::Resolved(r) => r.context(job, slot).await,
        }
    }
}

/// How a worker loop ended, with the deliveries it handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// The queue was drained or closed.
    Drained(u64),
    /// The engine stopped (a tensor-parallel rank failed): the job in hand went back to the
    /// queue and no more were taken.
    EngineStopped(u64),
}

/// Takes jobs from `queue` until it is drained or closed, or the engine stops. `slot` names
/// this loop among a worker's concurrent ones.
pub async fn serve(queue: Arc<dyn JobQueue>, contexts: Arc<Contexts>, slot: usize) -> Result<Served, QueueError> {
    let mut handled = 0;
    while let Some(delivery) = queue.next().await? {
        let span = tracing::info_span!("job", job_id = %delivery.job.job_id, run_id = %delivery.job.run_id, attempt = delivery.job.attempt);
        match contexts.context(&delivery.job, slot).await {
            Ok(ctx) => {
                if handle_delivery(delivery, &ctx).instrument(span).await? == Handled::EngineStopped {
                    return Ok(Served::EngineStopped(handled));
                }
            }
            Err(e) => {
                // Another worker may have the pipeline or reach the output; after the
                // delivery limit the job is dead-lettered.
                tracing::warn!(parent: &span, error = %e, "cannot take the job; returning it");
                delivery.nack(true).await?;
            }
        }
        handled += 1;
    }
    Ok(Served::Drained(handled))
}
