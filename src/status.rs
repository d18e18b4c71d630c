//! `medbatch status OUT --run-id ID`: where a run stands, read from its output alone (plan,
//! completion markers, manifest), so it answers from any machine, during and after the run;
//! with `--amqp`, also the jobs waiting in the model's queue and the dead-lettered ones.

use anyhow::Context;
use medbatch_connectors::amqp::{model_route, RabbitQueue};
use medbatch_connectors::store::ObjectStore;
use medbatch_coordinator::commit::run_progress;
use medbatch_coordinator::follow::DEAD_LETTER_SCAN;
use medbatch_coordinator::plan::PlannedRun;
use medbatch_schemas::tables::{manifest_key, plan_key};
use medbatch_schemas::RunId;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(clap::Args)]
pub struct StatusArgs {
    /// The run's output root: a directory or `s3://bucket/prefix`.
    pub out: String,
    #[arg(long)]
    pub run_id: String,
    /// Also ask the broker for queued and dead-lettered jobs of the run's model.
    #[arg(long, env = "MEDBATCH_AMQP_URL")]
    pub amqp: Option<String>,
    #[arg(long, env = "MEDBATCH_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Opens an output root (`medbatch_connectors::store::open`), naming it in the error.
pub async fn open_store(out: &str, s3_endpoint: Option<&str>) -> anyhow::Result<(Arc<dyn ObjectStore>, String)> {
    medbatch_connectors::store::open(out, s3_endpoint).await.with_context(|| format!("output {out}"))
}

/// What the broker says about a run.
struct Broker {
    queued: u32,
    dead_total: u32,
    dead_jobs: Vec<medbatch_connectors::amqp::DeadJob>,
    scanned_all: bool,
}

/// An incremental run's inputs: how many were skipped as committed before and how many
/// changed (`None` for a run planned in full).
pub fn incremental_line(plan: &medbatch_coordinator::PlannedRun) -> Option<String> {
    plan.incremental.then(|| {
        format!(
            "incremental: {} unchanged since a committed run (skipped), {} changed (processed again, superseding the earlier content)",
            plan.skipped.len(),
            plan.superseded.len()
        )
    })
}

/// Rows of the stage tables `tables` in a run's manifest: `patient_facts: 12   cohort_members: 3`.
pub fn stage_line(tables: &[&str], manifest: &medbatch_schemas::Manifest) -> String {
    let rows = |t: &str| manifest.parts.iter().filter(|p| p.table == t).map(|p| p.rows).sum::<u64>();
    tables.iter().map(|t| format!("{t}: {}", rows(t))).collect::<Vec<_>>().join("   ")
}

pub fn main(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let rt = crate::runtime()?;
    rt.block_on(run(args))
}

/// Seconds between two RFC 3339 times.
fn seconds_between(a: &str, b: &str) -> Option<f64> {
    let a = chrono::DateTime::parse_from_rfc3339(a).ok()?;
    let b = chrono::DateTime::parse_from_rfc3339(b).ok()?;
    Some((b - a).num_milliseconds() as f64 / 1000.0)
}

async fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let run_id = RunId::new(args.run_id.clone())?;
    if !args.out.starts_with("s3://") && !Path::new(&args.out).is_dir() {
        anyhow::bail!("no output at {}", args.out);
    }
    let (store, root) = open_store(&args.out, args.s3_endpoint.as_deref()).await?;
    let plan_bytes = store
        .get(&plan_key(&run_id))
        .await?
        .with_context(|| format!("no run {run_id} under {root} (no {})", plan_key(&run_id)))?;
    let plan: PlannedRun =
        serde_json::from_slice(&plan_bytes).with_context(|| format!("reading {}", plan_key(&run_id)))?;
    let progress = run_progress(&plan, store.as_ref()).await?;
    let committed = store.exists(&manifest_key(&run_id)).await?;
    // The replays of dead-lettered jobs (`medbatch replay`), oldest first.
    let mut replays: Vec<crate::distributed::ReplayRecord> = Vec::new();
    for key in store.list(&crate::distributed::replays_prefix(&run_id)).await? {
        if let Some(bytes) = store.get(&key).await? {
            replays.push(serde_json::from_slice(&bytes).with_context(|| format!("reading {key}"))?);
        }
    }
    // Throughput over the span of finished jobs: from the first job's start to the last finish.
    let mut starts = Vec::new();
    let mut ends = Vec::new();
    for c in &progress.completions {
        if let Ok(t) = chrono::DateTime::parse_from_rfc3339(&c.finished_at) {
            ends.push(t);
            starts.push(t - chrono::Duration::milliseconds(c.wall_ms as i64));
        }
    }
    let span_s = match (starts.iter().min(), ends.iter().max()) {
        (Some(a), Some(b)) => seconds_between(&a.to_rfc3339(), &b.to_rfc3339()).unwrap_or(0.0),
        _ => 0.0,
    };
    let remaining = progress.jobs_planned - progress.jobs_done;
    let jobs_with_errors = progress.completions.iter().filter(|c| c.error_rows > 0).count();
    let tokens_per_s = if span_s > 0.0 { progress.tokens_out as f64 / span_s } else { 0.0 };
    let eta_s = (progress.jobs_done > 0 && remaining > 0 && span_s > 0.0)
        .then(|| span_s / progress.jobs_done as f64 * remaining as f64);
    let broker = match &args.amqp {
        None => None,
        Some(url) => {
            let q = RabbitQueue::connect(
                crate::distributed::amqp_config(url, None),
                &model_route(plan.model.digest.as_str()),
            )
            .await?;
            let (queued, dead_total) = q.depths().await?;
            // Dead-lettered jobs of this run that never finished (a job can finish on its
            // last delivery and still be dead-lettered if its acknowledgement was lost).
            let done =
                progress.completions.iter().map(|c| c.job_id.to_string()).collect::<std::collections::HashSet<_>>();
            let dead = q.dead_letters(DEAD_LETTER_SCAN).await?;
            let dead_jobs: Vec<_> =
                dead.of_run(run_id.as_str()).into_iter().filter(|j| !done.contains(&j.job_id)).collect();
            Some(Broker { queued, dead_total, dead_jobs, scanned_all: dead.remaining == 0 })
        }
    };
    let state = if committed {
        "committed"
    } else if broker.as_ref().is_some_and(|b| !b.dead_jobs.is_empty() && b.dead_jobs.len() as u64 >= remaining) {
        "stalled: every job left is dead-lettered"
    } else if remaining == 0 {
        "done, not committed"
    } else {
        "running"
    };
    if args.json {
        let v = serde_json::json!({
            "run_id": run_id.to_string(),
            "output": root,
            "state": state,
            "pipeline": plan.pipeline.name,
            "model": plan.model.id,
            "jobs_planned": progress.jobs_planned,
            "jobs_done": progress.jobs_done,
            "jobs_remaining": remaining,
            "jobs_with_errors": jobs_with_errors,
            "jobs_queued": broker.as_ref().map(|b| b.queued),
            "jobs_dead_lettered": broker.as_ref().map(|b| b.dead_jobs.len()),
            "dead_lettered_jobs": broker.as_ref().map(|b| b.dead_jobs.iter().map(|j| serde_json::json!({"job_id": j.job_id, "reason": j.reason})).collect::<Vec<_>>()),
            "dead_letter_queue": broker.as_ref().map(|b| b.dead_total),
            "replays": replays,
            "documents_ok": progress.documents_ok,
            "documents_failed": progress.documents_failed,
            "rows": progress.rows,
            "error_rows": progress.error_rows,
            "tokens_in": progress.tokens_in,
            "tokens_out": progress.tokens_out,
            "set_aside": progress.set_aside,
            "tokens_per_s": (tokens_per_s * 10.0).round() / 10.0,
            "eta_s": eta_s.map(f64::round),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("run {run_id} ({} pipeline, model {}): {state}", plan.pipeline.name, plan.model.id);
        println!("  output     {root}");
        println!(
            "  jobs       {}/{} done ({jobs_with_errors} with error rows), {remaining} to go",
            progress.jobs_done, progress.jobs_planned
        );
        if let Some(b) = &broker {
            println!(
                "  broker     {} queued (model queue), {} dead-lettered of this run ({} in the dead-letter queue{})",
                b.queued,
                b.dead_jobs.len(),
                b.dead_total,
                if b.scanned_all { "" } else { "; only the first part looked at" }
            );
            for j in &b.dead_jobs {
                println!("  dead       job {} ({})", j.job_id, j.reason);
            }
        }
        if let Some(last) = replays.last() {
            let jobs: usize = replays.iter().map(|r| r.jobs.len()).sum();
            println!(
                "  replays    {} ({jobs} dead-lettered jobs published again; last at {})",
                replays.len(),
                last.replayed_at
            );
        }
        println!("  documents  {} ok, {} failed", progress.documents_ok, progress.documents_failed);
        println!("  rows       {} ({} error rows)", progress.rows, progress.error_rows);
        if let Some(line) = progress.set_aside_line() {
            println!("  set aside  {line}");
        }
        println!(
            "  tokens     {} in, {} out ({tokens_per_s:.1} generated tokens/s)",
            progress.tokens_in, progress.tokens_out
        );
        if let Some(eta) = eta_s {
            println!("  eta        {eta:.0} s at the rate so far");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_between_rfc3339_times() {
        assert_eq!(seconds_between("2026-11-29T10:00:00.000Z", "2026-11-29T10:01:30.500Z"), Some(90.5));
        assert_eq!(seconds_between("x", "2026-11-29T10:00:00Z"), None);
    }
}
