//! `medbatch submit` and `medbatch work`: a run over RabbitMQ, with output on S3 or a shared
//! directory. `submit` plans and publishes (resumable: rerun it with the same run id), then
//! follows the run's completion markers and commits it; `work` serves one model's queue
//! until stopped.

use crate::status::open_store;
use crate::{model_path, progress::Progress};
use anyhow::Context;
use medbatch_connectors::amqp::{model_route, AmqpConfig, RabbitQueue, Topology};
use medbatch_connectors::inputs::InputSource;
use medbatch_connectors::store::ObjectStore;
use medbatch_coordinator::follow::DEAD_LETTER_SCAN;
use medbatch_coordinator::plan::PlannedRun;
use medbatch_coordinator::{follow_and_commit, publish_pending, FollowConfig, Followed, PlanConfig};
use medbatch_engine::EngineHandle;
use medbatch_schemas::{ModelRef, RunId, NO_MODEL};
use medbatch_worker::pipeline::LoadedPipeline;
use medbatch_worker::serve::{serve, Contexts, Resolver, Served};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The broker settings shared by `submit`, `work` and `status`.
pub fn amqp_config(url: &str, ca_file: Option<&std::path::Path>) -> AmqpConfig {
    let mut c = AmqpConfig::new(url);
    c.ca_file = ca_file.map(|p| p.to_path_buf());
    // Operators (and `rabbitmqctl list_connections client_properties`) see which process a
    // connection belongs to.
    c.connection_name = format!("medbatch pid {}", std::process::id());
    // A namespace for the broker objects, so that separate deployments (or test runs) can
    // share one broker.
    if let Ok(ns) = std::env::var("MEDBATCH_AMQP_NAMESPACE") {
        if !ns.is_empty() {
            c.topology = Topology::default().with_suffix(&format!("-{ns}"));
        }
    }
    c
}

/// How to reach the broker (`submit`, `work`).
#[derive(clap::Args)]
pub struct BrokerArgs {
    /// Broker URL (`amqp://` or `amqps://`).
    #[arg(long, env = "MEDBATCH_AMQP_URL")]
    pub amqp: String,
    /// CA certificate (PEM) for `amqps://`.
    #[arg(long, env = "MEDBATCH_AMQP_CA_FILE")]
    pub amqp_ca_file: Option<std::path::PathBuf>,
    /// S3 endpoint URL (default: the AWS SDK's endpoint variables, else AWS).
    #[arg(long, env = "MEDBATCH_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
}

impl BrokerArgs {
    fn config(&self) -> AmqpConfig {
        amqp_config(&self.amqp, self.amqp_ca_file.as_deref())
    }
}

#[derive(clap::Args)]
pub struct SubmitArgs {
    /// Pipeline: a folder name under pipelines/ or a path to one.
    pub pipeline: String,
    /// Inputs: files, folders, or archives (paths every worker can read).
    #[arg(required = true)]
    pub inputs: Vec<String>,
    /// Output root: `s3://bucket/prefix` or a directory every worker can write.
    #[arg(long, env = "MEDBATCH_OUT")]
    pub out: String,
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// The model the workers serve (its digest routes the jobs); read, not loaded.
    #[arg(long, env = "MEDBATCH_MODEL", default_value = "demo")]
    pub model: String,
    /// Run id; reusing one resumes that run (nothing planned twice, finished jobs skipped).
    #[arg(long, env = "MEDBATCH_RUN_ID")]
    pub run_id: Option<String>,
    /// Publish and return instead of following the run.
    #[arg(long)]
    pub detach: bool,
    /// Process only what is new (as `run --incremental`): inputs a committed run of the same
    /// pipeline and model at this output processed with the same content are skipped.
    #[arg(long)]
    pub incremental: bool,
    /// Small files (text, JSONL, CSV or Parquet under 64 KiB) planned together into one job, up
    /// to this many (1: a job per file); they share the job's fixed cost.
    #[arg(long, env = "MEDBATCH_FILES_PER_JOB", default_value_t = medbatch_coordinator::plan::SMALL_FILES_PER_JOB)]
    pub files_per_job: usize,
    #[command(flatten)]
    pub ops: crate::ops::OpsArgs,
}

#[derive(clap::Args)]
pub struct WorkArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Model: a GGUF file, a checkpoint folder, or `demo`. The worker takes only jobs for it;
    /// `none` serves the pipelines that call no model (`tiles`).
    #[arg(long, env = "MEDBATCH_MODEL", default_value = "demo")]
    pub model: String,
    /// Jobs worked on at once (their requests share the engine's batches).
    #[arg(long, env = "MEDBATCH_CONCURRENCY", default_value_t = 2)]
    pub concurrency: usize,
    #[command(flatten)]
    pub limits: model_path::EngineLimitArgs,
    #[command(flatten)]
    pub split: model_path::SplitArgs,
    /// A folder of pipeline folders to serve from, searched before the built-in `pipelines/`
    /// (a job names its pipeline; its digest must match the folder's, or the job goes back).
    #[arg(long, env = "MEDBATCH_PIPELINES")]
    pub pipelines: Option<std::path::PathBuf>,
    /// Seconds one call into the model (admitting a request, or one forward step) may take
    /// before the worker decides its device or a rank hung and exits (code 4) so that the
    /// broker gives its jobs to another worker. Default: 600 with `--devices`, none on the CPU
    /// (where a long prompt or many images legitimately take minutes); 0 turns it off.
    #[arg(long, env = "MEDBATCH_STALL_TIMEOUT", value_name = "SECONDS")]
    pub stall_timeout: Option<f64>,
    #[command(flatten)]
    pub ops: crate::ops::OpsArgs,
}

/// Default `--stall-timeout` for GPU ranks.
const GPU_STALL_TIMEOUT_S: f64 = 600.0;

/// Ends the process when the engine has been inside one call for longer than `limit`. The
/// jobs in hand are not acknowledged, so the broker hands them to another worker when the
/// connection drops with the process; their partial output is never committed. A hung device
/// cannot be recovered from inside the process (the rank's thread cannot be stopped).
fn spawn_watchdog(engine: EngineHandle, limit: Duration) {
    let every = (limit / 4).clamp(Duration::from_millis(10), Duration::from_secs(15));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            if let Some(busy) = engine.busy_for().filter(|b| *b > limit) {
                tracing::error!(busy_s = busy.as_secs_f64(), "the engine made no progress; exiting");
                eprintln!(
                    "medbatch: the engine has been inside one step for {:.1} s (limit {:.1} s): a hung GPU or \
                     tensor-parallel rank? Exiting so that the broker gives the jobs in hand to another worker.",
                    busy.as_secs_f64(),
                    limit.as_secs_f64()
                );
                std::process::exit(i32::from(crate::EXIT_STALLED));
            }
        }
    });
}

pub fn submit(args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let rt = crate::runtime()?;
    rt.block_on(run_submit(args))
}

async fn run_submit(args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    args.ops.start().await?.set_loaded();
    let run_id = RunId::new(args.run_id.clone().unwrap_or_else(crate::embedded::new_run_id))?;
    let pipeline = LoadedPipeline::load(&args.pipeline)?;
    let (store, root) = open_store(&args.out, args.broker.s3_endpoint.as_deref()).await?;
    // A pipeline that calls no model (tiles) is served by workers started with `--model none`.
    let model = if pipeline.spec.task.needs_model() {
        let model_arg = args.model.clone();
        tokio::task::spawn_blocking(move || model_path::model_ref(&model_arg)).await??
    } else {
        ModelRef::none()
    };
    let cfg = PlanConfig {
        run_id: run_id.clone(),
        pipeline: pipeline.reference(),
        model: model.clone(),
        output: root.clone(),
        inputs: args.inputs.clone(),
        source: InputSource::with_s3(args.broker.s3_endpoint.clone()),
        imaging: pipeline.spec.imaging.clone(),
    };
    let (plan, planning_s) = crate::embedded::plan(cfg, store.as_ref(), args.incremental, args.files_per_job).await?;
    let queue = RabbitQueue::connect(args.broker.config(), &model_route(model.digest.as_str())).await?;
    let t = Instant::now();
    let (published, already) = publish_pending(&plan, store.as_ref(), &queue).await?;
    metrics::counter!("medbatch_jobs_published_total").increment(published.len() as u64);
    eprintln!(
        "medbatch: run {run_id}: {} input files, {} jobs ({} published in {:.1} s, {already} already done; planned in {planning_s:.1} s), model {}",
        plan.files,
        plan.jobs.len(),
        published.len(),
        t.elapsed().as_secs_f64(),
        model.id
    );
    if let Some(line) = crate::status::incremental_line(&plan) {
        eprintln!("medbatch: run {run_id}: {line}");
    }
    if args.detach {
        println!("run {run_id} submitted; follow it with: medbatch status {root} --run-id {run_id}");
        return Ok(ExitCode::SUCCESS);
    }
    follow_and_report(&plan, store.as_ref(), &queue, &pipeline, &root, started).await
}

/// Follows `plan` to its commit (the completion markers; workers may be anywhere) and prints
/// the run's summary; a run whose jobs left are all dead-lettered ends with their list and
/// [`crate::EXIT_DEAD_LETTERED`].
async fn follow_and_report(
    plan: &PlannedRun,
    store: &dyn ObjectStore,
    queue: &RabbitQueue,
    pipeline: &LoadedPipeline,
    root: &str,
    started: Instant,
) -> anyhow::Result<ExitCode> {
    let run_id = &plan.run_id;
    metrics::gauge!("medbatch_run_jobs_planned").set(plan.jobs.len() as f64);
    let mut bar = Progress::counting(plan.jobs.len() as u64, "jobs");
    let stage = medbatch_worker::patients::stage(pipeline)?;
    let stage_ref = stage.as_deref();
    let cfg = FollowConfig::default();
    let followed = follow_and_commit(
        plan,
        store,
        queue,
        &cfg,
        &mut |done| {
            metrics::gauge!("medbatch_run_jobs_done").set(done as f64);
            bar.set(done, 0)
        },
        stage_ref,
    )
    .await?;
    bar.finish();
    let manifest = match followed {
        Followed::Committed(m) => *m,
        Followed::DeadLettered(dead) => {
            eprintln!("medbatch: run {run_id}: {} jobs were dead-lettered after the delivery limit:", dead.len());
            for j in &dead {
                eprintln!("  job {} ({})", j.job_id, j.reason);
            }
            eprintln!(
                "medbatch: the other jobs are done. The workers' logs say why these failed; once fixed, \
                 `medbatch replay {root} --run-id {run_id}` publishes them again and commits the run."
            );
            return Ok(ExitCode::from(crate::EXIT_DEAD_LETTERED));
        }
    };
    let p = medbatch_coordinator::RunProgress::of_manifest(&manifest, &pipeline.spec.output.table);
    println!("medbatch run {run_id} ({} pipeline, model {}) over RabbitMQ", plan.pipeline.name, plan.model.id);
    println!("  jobs       {}/{} done", p.jobs_done, p.jobs_planned);
    println!("  documents  {} ok, {} failed", p.documents_ok, p.documents_failed);
    println!("  rows       {} ({} error rows)", p.rows, p.error_rows);
    if let Some(line) = p.set_aside_line() {
        println!("  set aside  {line}");
    }
    if let Some(stage) = &stage {
        println!("  patients   {}", crate::status::stage_line(&stage.tables(), &manifest));
    }
    println!("  wall time  {:.1} s", started.elapsed().as_secs_f64());
    println!("  output     {root}/{}/run_id={run_id}", pipeline.spec.output.table);
    println!("  manifest   {root}/{}", medbatch_schemas::tables::manifest_key(run_id));
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args)]
pub struct ReplayArgs {
    /// The run's output root: a directory or `s3://bucket/prefix`.
    pub out: String,
    #[arg(long, env = "MEDBATCH_RUN_ID")]
    pub run_id: String,
    /// Only the jobs dead-lettered for this reason (`delivery_limit`, `rejected`, ...).
    #[arg(long)]
    pub reason: Option<String>,
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// A folder of pipeline folders searched before the built-in `pipelines/` for the run's
    /// pipeline (read for its stage at commit; its digest must be the run's).
    #[arg(long, env = "MEDBATCH_PIPELINES")]
    pub pipelines: Option<std::path::PathBuf>,
    /// Publish and return instead of following the run to its commit.
    #[arg(long)]
    pub detach: bool,
    #[command(flatten)]
    pub ops: crate::ops::OpsArgs,
}

pub fn replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let rt = crate::runtime()?;
    rt.block_on(run_replay(args))
}

/// One replay of a run's dead-lettered jobs, as recorded under `_runs/RUN/replays/`.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct ReplayRecord {
    pub replayed_at: String,
    /// The reason asked for (`None`: every reason).
    pub reason: Option<String>,
    pub jobs: Vec<ReplayedJob>,
}

#[derive(serde::Serialize, serde::Deserialize)]
pub struct ReplayedJob {
    pub job_id: String,
    /// Why it had been dead-lettered.
    pub reason: String,
    /// Its deliveries before this replay, and how often it has been replayed.
    pub attempts: u32,
    pub replays: u32,
}

/// Where the replays of a run are recorded.
pub fn replays_prefix(run_id: &RunId) -> String {
    format!("_runs/{run_id}/replays/")
}

async fn run_replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    args.ops.start().await?.set_loaded();
    let run_id = RunId::new(args.run_id.clone())?;
    let (store, root) = open_store(&args.out, args.broker.s3_endpoint.as_deref()).await?;
    let key = medbatch_schemas::tables::plan_key(&run_id);
    let bytes = store.get(&key).await?.with_context(|| format!("no run {run_id} under {root} (no {key})"))?;
    let plan: PlannedRun = serde_json::from_slice(&bytes).with_context(|| format!("reading {key}"))?;
    // The run's pipeline (for its stage at commit), as a worker finds it; not needed when
    // only publishing.
    let pipeline = if args.detach {
        None
    } else {
        let name = &plan.pipeline.name;
        let local = args.pipelines.as_ref().map(|d| d.join(name)).filter(|d| d.is_dir());
        let pipeline = LoadedPipeline::load(&local.map_or(name.clone(), |d| d.to_string_lossy().into_owned()))?;
        if pipeline.digest != plan.pipeline.digest {
            anyhow::bail!(
                "pipeline {name} here has digest {}, the run's is {}: point --pipelines at the run's pipeline, or use \
                 --detach (the workers check the digest, not this command)",
                pipeline.digest,
                plan.pipeline.digest
            );
        }
        Some(pipeline)
    };
    let queue = RabbitQueue::connect(args.broker.config(), &model_route(plan.model.digest.as_str())).await?;
    let replayed = queue.replay(run_id.as_str(), args.reason.as_deref(), DEAD_LETTER_SCAN).await?;
    let now = chrono::Utc::now();
    if !replayed.is_empty() {
        let record = ReplayRecord {
            replayed_at: now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            reason: args.reason.clone(),
            jobs: replayed
                .iter()
                .map(|r| ReplayedJob {
                    job_id: r.job.job_id.clone(),
                    reason: r.job.reason.clone(),
                    attempts: r.attempts,
                    replays: r.replays,
                })
                .collect(),
        };
        let key = format!("{}{}.json", replays_prefix(&run_id), now.format("%Y%m%dT%H%M%S%.3fZ"));
        store.put(&key, serde_json::to_vec_pretty(&record)?.into()).await?;
    }
    metrics::counter!("medbatch_jobs_replayed_total").increment(replayed.len() as u64);
    eprintln!(
        "medbatch: run {run_id}: {} dead-lettered jobs published again{}",
        replayed.len(),
        args.reason.as_ref().map(|r| format!(" (reason {r})")).unwrap_or_default()
    );
    for r in &replayed {
        eprintln!("  job {} ({}, {} attempts, replay {})", r.job.job_id, r.job.reason, r.attempts, r.replays);
    }
    let Some(pipeline) = pipeline else {
        println!("run {run_id}: follow it with: medbatch status {root} --run-id {run_id}");
        return Ok(ExitCode::SUCCESS);
    };
    follow_and_report(&plan, store.as_ref(), &queue, &pipeline, &root, started).await
}

pub fn work(args: WorkArgs) -> anyhow::Result<ExitCode> {
    let rt = crate::runtime()?;
    rt.block_on(run_work(args))
}

async fn run_work(args: WorkArgs) -> anyhow::Result<ExitCode> {
    let concurrency = args.concurrency.max(1);
    // Probes answer from the start: not ready while the model loads.
    let health = args.ops.start().await?;
    // `--model none`: a worker of the pipelines that call no model (tiles).
    let mut embedder = None;
    let (engine, model) = if args.model == NO_MODEL {
        (None, ModelRef::none())
    } else if model_path::is_siglip(&args.model) {
        let (handle, model) = model_path::start_embedder(&args.model, &args.split.devices).await?;
        embedder = Some(handle);
        (None, model)
    } else {
        let (engine, model) = model_path::start_engine(&args.model, &args.split, &args.limits).await?;
        let stall = args.stall_timeout.unwrap_or(if args.split.devices.is_empty() { 0.0 } else { GPU_STALL_TIMEOUT_S });
        anyhow::ensure!(stall.is_finite() && stall >= 0.0, "--stall-timeout must be a number of seconds, 0 or more");
        if stall > 0.0 {
            spawn_watchdog(engine.clone(), Duration::from_secs_f64(stall));
        }
        // /healthz fails past the stall limit, or past ten minutes where none is set.
        let unhealthy_after = if stall > 0.0 { stall } else { GPU_STALL_TIMEOUT_S };
        health.set_engine(engine.clone(), Duration::from_secs_f64(unhealthy_after));
        (Some(engine), model)
    };
    let mut cfg = args.broker.config();
    cfg.prefetch = u16::try_from(concurrency).unwrap_or(u16::MAX);
    let route = model_route(model.digest.as_str());
    let queue = Arc::new(RabbitQueue::connect(cfg, &route).await?);
    let live = queue.clone();
    health.set_queue(move || live.is_live());
    health.set_loaded();
    eprintln!(
        "medbatch: worker for model {} (route {route}) on {}, {concurrency} at once",
        model.id,
        queue_url(&args.broker.amqp)
    );
    // SIGTERM or Ctrl-C: take no new job; the jobs in hand finish (or go back to the queue
    // when the process is killed harder).
    let stopper = queue.clone();
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        eprintln!("medbatch: stopping: finishing the jobs in hand");
        stopper.close().await;
    });
    let contexts = Arc::new(Contexts::Resolved(Resolver::new(
        (engine, embedder),
        args.broker.s3_endpoint.clone(),
        args.pipelines.clone(),
        format!("{}-{}", crate::hostname(), std::process::id()),
    )));
    let mut tasks = Vec::new();
    for slot in 0..concurrency {
        let (queue, contexts) = (queue.clone(), contexts.clone());
        tasks.push(tokio::spawn(async move {
            match serve(queue.clone(), contexts, slot).await? {
                Served::Drained(handled) => Ok::<u64, anyhow::Error>(handled),
                Served::EngineStopped(_) => {
                    // A tensor-parallel rank failed: take no more jobs; the ones in hand go
                    // back to the queue for another worker.
                    queue.close().await;
                    Err(anyhow::anyhow!("the engine stopped (a tensor-parallel rank failed)"))
                }
            }
        }));
    }
    let mut handled = 0;
    for t in tasks {
        handled += t.await.context("worker task")??;
    }
    eprintln!("medbatch: worker stopped after {handled} deliveries");
    Ok(ExitCode::SUCCESS)
}

fn queue_url(url: &str) -> String {
    medbatch_connectors::amqp::redact_url(url)
}
