//! The worker loop: take a job, produce its parts, write the marker, then acknowledge.

use crate::extract::extract_document;
use crate::input::{read_documents, InputLimits};
use crate::parquet_out::{errors_batch, lab_results_batch, to_parquet, ErrorRow, JobProvenance, LabRow};
use crate::pipeline::LoadedPipeline;
use bytes::Bytes;
use medbatch_connectors::queue::{Delivery, JobQueue};
use medbatch_connectors::store::ObjectStore;
use medbatch_engine::EngineHandle;
use medbatch_schemas::tables::{done_key, part_key, ERRORS_TABLE};
use medbatch_schemas::{Completion, Digest, Document, InputError, Job, OutputPart, JOB_SCHEMA_VERSION};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;
use tracing::Instrument;

/// Progress reported to whoever shows it (the embedded run's progress bar).
#[derive(Clone, Debug, PartialEq)]
pub enum WorkerEvent {
    /// Documents (and rejected inputs) found in a job's inputs, once they are read.
    DocumentsFound { job_id: String, count: u64 },
    DocumentDone { ok: bool, tokens_out: u64 },
    JobDone { job_id: String, skipped: bool },
    JobFailed { job_id: String, reason: String },
}

/// What a worker needs.
#[derive(Clone)]
pub struct WorkerContext {
    pub store: Arc<dyn ObjectStore>,
    pub engine: EngineHandle,
    pub pipeline: Arc<LoadedPipeline>,
    pub worker_id: String,
    pub events: Option<UnboundedSender<WorkerEvent>>,
}

impl WorkerContext {
    fn emit(&self, e: WorkerEvent) {
        if let Some(tx) = &self.events {
            let _ = tx.send(e);
        }
    }
}

/// Why a job did not complete. Every variant maps to one disposition.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// This worker serves another pipeline or model: give the job back for another worker.
    #[error("job needs {what} {want}, this worker serves {have}")]
    WrongTarget { what: &'static str, want: String, have: String },
    /// Storage failed: retry (the queue's delivery limit bounds retries).
    #[error("storage: {0}")]
    Store(#[from] medbatch_connectors::store::StoreError),
    /// Writing Parquet failed: retry.
    #[error("{0}")]
    Output(#[from] crate::parquet_out::ParquetOutError),
}

impl JobError {
    /// Stable label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::WrongTarget { .. } => "wrong_target",
            Self::Store(_) => "store",
            Self::Output(_) => "output",
        }
    }
}

/// Takes jobs until the queue is drained.
pub async fn run_worker(queue: Arc<dyn JobQueue>, ctx: WorkerContext) -> Result<u64, medbatch_connectors::queue::QueueError> {
    let mut done = 0;
    while let Some(delivery) = queue.next().await? {
        let span = tracing::info_span!("job", job_id = %delivery.job.job_id, run_id = %delivery.job.run_id, attempt = delivery.job.attempt);
        handle_delivery(delivery, &ctx).instrument(span).await?;
        done += 1;
    }
    Ok(done)
}

async fn handle_delivery(delivery: Delivery, ctx: &WorkerContext) -> Result<(), medbatch_connectors::queue::QueueError> {
    let job_id = delivery.job.job_id.to_string();
    match process_job(&delivery.job, ctx).await {
        Ok(skipped) => {
            ctx.emit(WorkerEvent::JobDone { job_id, skipped });
            delivery.ack().await
        }
        Err(e) => {
            tracing::warn!(reason = e.label(), error = %e, "job failed; returning it to the queue");
            ctx.emit(WorkerEvent::JobFailed { job_id, reason: e.to_string() });
            delivery.nack(true).await
        }
    }
}

fn input_error_row(e: &InputError) -> ErrorRow {
    ErrorRow {
        source_uri: e.source_uri.clone(),
        member: e.member.clone(),
        record: e.record.clone(),
        document_id: None,
        stage: "input",
        reason: e.kind.label().to_string(),
        detail: e.detail.clone(),
        evidence: None,
        input_sha256: None,
    }
}

/// Runs one job to its completion marker. Returns `true` when the job was already done.
pub async fn process_job(job: &Job, ctx: &WorkerContext) -> Result<bool, JobError> {
    let started = Instant::now();
    let marker = done_key(&job.run_id, &job.job_id);
    if ctx.store.exists(&marker).await? {
        tracing::info!("already done; acknowledging without work");
        return Ok(true);
    }
    let info = ctx.engine.info();
    if job.model.digest.as_str() != info.digest {
        return Err(JobError::WrongTarget { what: "model", want: job.model.digest.short().into(), have: info.digest.chars().take(12).collect() });
    }
    if job.pipeline.digest != ctx.pipeline.digest {
        return Err(JobError::WrongTarget {
            what: "pipeline",
            want: job.pipeline.digest.short().into(),
            have: ctx.pipeline.digest.short().into(),
        });
    }

    // Read every input on a blocking thread; documents and input errors come back in order.
    let spec = ctx.pipeline.spec.input.clone();
    let inputs = job.inputs.clone();
    let read = tokio::task::spawn_blocking(move || {
        let limits = InputLimits::from_spec(&spec);
        let mut items: Vec<Result<Document, InputError>> = Vec::new();
        for input in &inputs {
            let mut sink = |r| items.push(r);
            match medbatch_connectors::inputs::open(&input.uri) {
                Ok(f) => read_documents(input, Box::new(f), &spec, &limits, &mut sink),
                Err(e) => sink(Err(InputError {
                    source_uri: input.uri.clone(),
                    member: None,
                    record: None,
                    kind: medbatch_schemas::InputErrorKind::Unreadable,
                    detail: e.to_string(),
                })),
            }
        }
        items
    })
    .await
    .expect("input reader task");

    let docs = read.iter().filter(|r| r.is_ok()).count() as u64;
    ctx.emit(WorkerEvent::DocumentsFound { job_id: job.job_id.to_string(), count: read.len() as u64 });
    let mut rows: Vec<LabRow> = Vec::new();
    let mut errors: Vec<ErrorRow> = Vec::new();
    let (mut tokens_in, mut tokens_out, mut engine_ms) = (0u64, 0u64, 0u64);
    let mut documents_failed = 0u64;
    for item in read {
        match item {
            Err(e) => {
                tracing::warn!(reason = e.kind.label(), source = %e.source_uri, member = ?e.member, record = ?e.record, "input rejected");
                errors.push(input_error_row(&e));
                documents_failed += 1;
                ctx.emit(WorkerEvent::DocumentDone { ok: false, tokens_out: 0 });
            }
            Ok(doc) => {
                let span = tracing::info_span!("document", document_id = %doc.id);
                let r = extract_document(&doc, &ctx.pipeline, &ctx.engine).instrument(span).await;
                tokens_in += r.tokens_in;
                tokens_out += r.tokens_out;
                engine_ms += r.engine_ms;
                ctx.emit(WorkerEvent::DocumentDone { ok: true, tokens_out: r.tokens_out });
                rows.extend(r.rows);
                errors.extend(r.errors);
            }
        }
    }

    let prov = JobProvenance {
        job_id: job.job_id.to_string(),
        run_id: job.run_id.to_string(),
        pipeline: job.pipeline.name.clone(),
        pipeline_digest: job.pipeline.digest.to_string(),
        model_id: job.model.id.clone(),
        model_digest: job.model.digest.to_string(),
        generated_at_us: chrono::Utc::now().timestamp_micros(),
    };
    let mut parts = Vec::new();
    let table = ctx.pipeline.spec.output.table.clone();
    if !rows.is_empty() {
        let bytes = to_parquet(&lab_results_batch(&rows, &prov)?)?;
        parts.push(write_part(ctx, &table, job, bytes, rows.len() as u64).await?);
    }
    if !errors.is_empty() {
        let bytes = to_parquet(&errors_batch(&errors, &prov)?)?;
        parts.push(write_part(ctx, ERRORS_TABLE, job, bytes, errors.len() as u64).await?);
    }
    let completion = Completion {
        schema_version: JOB_SCHEMA_VERSION,
        run_id: job.run_id.clone(),
        job_id: job.job_id.clone(),
        parts,
        documents_ok: docs,
        documents_failed,
        error_rows: errors.len() as u64,
        tokens_in,
        tokens_out,
        engine_ms,
        wall_ms: started.elapsed().as_millis() as u64,
        worker_id: ctx.worker_id.clone(),
        finished_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    };
    let marker_bytes = serde_json::to_vec_pretty(&completion).expect("completion serializes");
    // The marker is written after the parts and only once: a racing duplicate delivery that
    // finished first keeps its marker, and its parts are byte-for-byte the same keys.
    ctx.store.put_if_absent(&marker, Bytes::from(marker_bytes)).await?;
    tracing::info!(rows = rows.len(), error_rows = errors.len(), tokens_out, "job done");
    Ok(false)
}

async fn write_part(ctx: &WorkerContext, table: &str, job: &Job, bytes: Vec<u8>, rows: u64) -> Result<OutputPart, JobError> {
    let key = part_key(table, &job.run_id, &job.job_id);
    let part = OutputPart { table: table.to_string(), key: key.clone(), rows, bytes: bytes.len() as u64, sha256: Digest::of_bytes(&bytes) };
    ctx.store.put(&key, Bytes::from(bytes)).await?;
    Ok(part)
}
