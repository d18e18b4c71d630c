//! `medbatch run`: the embedded mode — coordinator, in-process queue and worker tasks in one
//! process, writing to a local directory.

use crate::model_path;
use crate::progress::Progress;
use anyhow::{bail, Context};
use medbatch_connectors::inputs::InputSource;
use medbatch_connectors::queue::{InProcessQueue, JobQueue};
use medbatch_coordinator::{
    commit_run, current_view, job_units, plan_run, publish_pending, run_progress, skip_committed, PlanConfig,
};
use medbatch_schemas::{tables, ModelRef, RunId};
use medbatch_worker::{run_worker, LoadedPipeline, WorkerContext, WorkerEvent};
use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct RunArgs {
    /// Pipeline: a folder name under pipelines/ (e.g. `lab-report`) or a path to one.
    pub pipeline: String,
    /// Inputs: files, folders, or .tar/.tar.gz/.zip archives of .txt, .jsonl or .csv.
    #[arg(required = true)]
    pub inputs: Vec<String>,
    /// Output: a directory, or `s3://bucket/prefix` (S3 or an S3-compatible server).
    #[arg(long, env = "MEDBATCH_OUT")]
    pub out: String,
    /// S3 endpoint URL (default: the AWS SDK's `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, else
    /// AWS itself).
    #[arg(long, env = "MEDBATCH_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// Model: a Gemma 3 GGUF file, a Hugging Face checkpoint folder, or `demo` for the cached
    /// Gemma 3 270M demo model.
    #[arg(long, env = "MEDBATCH_MODEL", default_value = "demo")]
    pub model: String,
    /// Worker tasks. They share one engine thread; more than one overlaps input reading and
    /// output writing with generation.
    #[arg(long, env = "MEDBATCH_WORKERS", default_value_t = 2)]
    pub workers: usize,
    #[command(flatten)]
    pub limits: model_path::EngineLimitArgs,
    #[command(flatten)]
    pub split: model_path::SplitArgs,
    /// Run id. Reusing one resumes that run: finished jobs are not done again.
    #[arg(long, env = "MEDBATCH_RUN_ID")]
    pub run_id: Option<String>,
    /// Decode free text instead of under the pipeline's answer grammar (for comparison:
    /// answers may then fail to parse or quote text that is not in the document).
    #[arg(long)]
    pub unconstrained: bool,
    /// Process only what is new: an input whose URI and content a committed run of the same
    /// pipeline and model at this output processed is skipped (the index `OUT/_inputs/`);
    /// one whose content changed is processed again and supersedes the earlier content. The
    /// inputs are fixed when the run is planned.
    #[arg(long)]
    pub incremental: bool,
    /// Small files (text, JSONL, CSV or Parquet under 64 KiB) planned together into one job, up
    /// to this many (1: a job per file); they share the job's fixed cost.
    #[arg(long, env = "MEDBATCH_FILES_PER_JOB", default_value_t = medbatch_coordinator::plan::SMALL_FILES_PER_JOB)]
    pub files_per_job: usize,
    #[command(flatten)]
    pub ops: crate::ops::OpsArgs,
}

pub fn new_run_id() -> String {
    let now = chrono::Utc::now();
    format!("run-{}-{:04x}", now.format("%Y%m%dT%H%M%SZ"), now.timestamp_subsec_micros() & 0xffff)
}

/// Plans a run (reading the inputs on a blocking thread); `incremental`: over the current view
/// of the committed inputs, the run's own earlier commit left out. Returns the plan and the
/// seconds planning took.
pub async fn plan(
    cfg: PlanConfig,
    store: &dyn medbatch_connectors::store::ObjectStore,
    incremental: bool,
    files_per_job: usize,
) -> anyhow::Result<(medbatch_coordinator::PlannedRun, f64)> {
    let started = Instant::now();
    let mut plan = tokio::task::spawn_blocking(move || plan_run(&cfg)).await??;
    if incremental {
        let view = current_view(store, &plan.pipeline, &plan.model, Some(&plan.run_id)).await?;
        skip_committed(&mut plan, &view);
    }
    // After skipping: a job never mixes new inputs with committed ones.
    medbatch_coordinator::group_small_files(&mut plan, files_per_job);
    Ok((plan, started.elapsed().as_secs_f64()))
}

pub fn main(args: RunArgs) -> anyhow::Result<ExitCode> {
    let rt = crate::runtime()?;
    rt.block_on(run(args))
}

async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let run_id = RunId::new(args.run_id.clone().unwrap_or_else(new_run_id))?;
    let mut pipeline = LoadedPipeline::load(&args.pipeline)?;
    if args.unconstrained {
        pipeline = pipeline.unconstrained();
    }
    let runner = medbatch_worker::pipelines::for_spec(Arc::new(pipeline))?;
    let pipeline = runner.loaded();
    let (store, out_root) = crate::status::open_store(&args.out, args.s3_endpoint.as_deref()).await?;
    let health = args.ops.start().await?;

    // A pipeline that calls no model (tiles) runs without one, whatever --model says.
    let mut embedder = None;
    let (engine, model) = if pipeline.spec.task == medbatch_schemas::pipeline::Task::Embed {
        let (handle, model) = model_path::start_embedder(&args.model, &args.split.devices).await?;
        embedder = Some(handle);
        (None, model)
    } else if pipeline.spec.task.needs_model() {
        let (engine, model) = model_path::start_engine(&args.model, &args.split, &args.limits).await?;
        health.set_engine(engine.clone(), Duration::from_secs(600));
        (Some(engine), model)
    } else {
        eprintln!("medbatch: the {} pipeline calls no model: none is loaded", pipeline.spec.name);
        (None, ModelRef::none())
    };

    health.set_loaded();
    let source = InputSource::with_s3(args.s3_endpoint.clone());
    let cfg = PlanConfig {
        run_id: run_id.clone(),
        pipeline: pipeline.reference(),
        model: model.clone(),
        output: out_root.clone(),
        inputs: args.inputs.clone(),
        source: source.clone(),
        imaging: pipeline.spec.imaging.clone(),
    };
    let (plan, planning_s) = crate::embedded::plan(cfg, store.as_ref(), args.incremental, args.files_per_job).await?;
    let queue = InProcessQueue::new();
    let (published, already) = publish_pending(&plan, store.as_ref(), &queue).await?;
    queue.close();
    eprintln!(
        "medbatch: run {run_id}: {} input files, {} jobs ({} to do, {} already done), {} workers; planned in {planning_s:.1} s",
        plan.files,
        plan.jobs.len(),
        published.len(),
        already,
        args.workers
    );
    if let Some(line) = crate::status::incremental_line(&plan) {
        eprintln!("medbatch: run {run_id}: {line}");
    }

    // A band of a slide's grid: the slide counts once, on its first band.
    let planned_units: HashMap<String, u64> = plan.jobs.iter().map(|j| (j.job_id.to_string(), job_units(j))).collect();
    let todo_units: u64 = published.iter().map(|id| planned_units[id.as_str()]).sum();

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let queue: Arc<dyn JobQueue> = Arc::new(queue.clone());
    let mut tasks = Vec::new();
    for i in 0..args.workers {
        let ctx = WorkerContext {
            store: store.clone(),
            engine: engine.clone(),
            embedder: embedder.clone(),
            pipeline: runner.clone(),
            worker_id: format!("{}-{}", crate::hostname(), i),
            events: Some(tx.clone()),
            inputs: source.clone(),
        };
        tasks.push(tokio::spawn(run_worker(queue.clone(), ctx)));
    }
    drop(tx);

    let mut progress = Progress::new(todo_units);
    let mut failures: Vec<String> = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            WorkerEvent::DocumentsFound { job_id, count } => {
                progress.found(count, planned_units.get(&job_id).copied().unwrap_or(1))
            }
            WorkerEvent::DocumentDone { ok } => progress.document(ok),
            WorkerEvent::Generated { tokens } => progress.generated(tokens),
            WorkerEvent::JobDone { .. } => {}
            WorkerEvent::JobFailed { job_id, reason } => failures.push(format!("job {job_id}: {reason}")),
        }
    }
    for t in tasks {
        t.await.context("worker task")??;
    }
    progress.finish();

    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let stage = medbatch_worker::patients::stage(pipeline)?;
    let stage_ref = stage.as_deref();
    if stage.is_some() && failures.is_empty() {
        eprintln!("medbatch: run {run_id}: gathering the notes by patient");
    }
    let manifest = commit_run(&plan, store.as_ref(), &now, stage_ref).await?;
    let table = &pipeline.spec.output.table;
    let status = match &manifest {
        Some(m) => medbatch_coordinator::RunProgress::of_manifest(m, table),
        None => run_progress(&plan, store.as_ref()).await?,
    };
    let wall = started.elapsed().as_secs_f64();
    println!("medbatch run {run_id} ({} pipeline, model {})", pipeline.spec.name, model.id);
    println!("  documents  {} ok, {} failed", status.documents_ok, status.documents_failed);
    println!("  rows       {table}: {}   {}: {}", status.rows, tables::ERRORS_TABLE, status.error_rows);
    println!(
        "  tokens     {} in, {} out ({:.1} generated tokens/s)",
        status.tokens_in,
        status.tokens_out,
        progress.tokens_out as f64 / wall.max(1e-3)
    );
    if let Some(line) = status.set_aside_line() {
        println!("  set aside  {line}");
    }
    if let (Some(stage), Some(m)) = (&stage, &manifest) {
        println!("  patients   {}", crate::status::stage_line(&stage.tables(), m));
    }
    println!("  jobs       {}/{} done", status.jobs_done, status.jobs_planned);
    if let Some(line) = crate::status::incremental_line(&plan) {
        println!("  inputs     {line}");
    }
    if let Some(engine) = &engine {
        println!("  engine     {}", engine_summary(&engine.stats()));
    }
    println!(
        "  wall time  {wall:.1} s ({:.2} documents/s){}",
        progress.done as f64 / wall.max(1e-3),
        crate::bench::peak_rss_mib().map(|m| format!(", peak memory {m:.0} MiB")).unwrap_or_default()
    );
    println!("  output     {out_root}/{table}/run_id={run_id}");
    println!("  accounted  {out_root}/{}/run_id={run_id} (each input: ok, failed or skipped)", tables::DOCUMENTS_TABLE);
    match manifest {
        Some(_) => {
            println!("  manifest   {out_root}/{}", tables::manifest_key(&run_id));
            Ok(ExitCode::SUCCESS)
        }
        None => {
            let dead = status.jobs_planned - status.jobs_done;
            let first = failures.last().cloned().unwrap_or_default();
            bail!("run {run_id} incomplete: {dead} jobs failed after retries (last: {first}); run again with --run-id {run_id} to resume")
        }
    }
}

/// One line on what the engine did: steps, tokens per step, the KV pool and prefix cache.
pub fn engine_summary(s: &medbatch_engine::service::EngineStats) -> String {
    let mib = |b: f64| b / (1u64 << 20) as f64;
    let (pages, page) = s.kv_layout.as_ref().map(|l| (l.pages, l.page_bytes)).unwrap_or((0, 0));
    format!(
        "{} steps, {:.1} tokens per step; KV pool {} pages of {} KiB, at most {} in use ({:.0} MiB), {:.2} MiB per sequence in flight; prefix cache {:.0}% of prompt tokens ({} of {}); {} preemptions",
        s.decode.passes,
        s.tokens_per_step(),
        pages,
        page / 1024,
        s.kv.pages_peak,
        mib((s.kv.pages_peak as u64 * page) as f64),
        mib(s.kv_bytes_per_sequence()),
        s.prefix_hit_rate() * 100.0,
        s.kv.hit_tokens,
        s.kv.lookup_tokens,
        s.decode.preemptions
    )
}
