//! Committing a run: manifest and `_SUCCESS` once every planned job has its marker.

use crate::plan::PlannedRun;
use crate::CoordinatorError;
use medbatch_connectors::store::ObjectStore;
use medbatch_schemas::tables::{done_key, manifest_key, run_table_prefix, success_key, DOCUMENTS_TABLE, ERRORS_TABLE};
use medbatch_schemas::{Completion, Manifest, JOB_SCHEMA_VERSION};

/// Where a run stands, from its completion markers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunProgress {
    pub jobs_planned: u64,
    pub jobs_done: u64,
    pub documents_ok: u64,
    pub documents_failed: u64,
    pub rows: u64,
    pub error_rows: u64,
    pub tokens_in: u64,
    pub tokens_out: u64,
    /// Pieces of documents set aside as non-results, by reason.
    pub set_aside: std::collections::BTreeMap<String, u64>,
    pub completions: Vec<Completion>,
}

impl RunProgress {
    /// A committed run's totals from its manifest, without reading the markers again; rows
    /// are those of `table`, the jobs' table (a commit stage's tables are not counted).
    pub fn of_manifest(m: &Manifest, table: &str) -> Self {
        Self {
            jobs_planned: m.jobs,
            jobs_done: m.jobs,
            documents_ok: m.documents_ok,
            documents_failed: m.documents_failed,
            rows: m.parts.iter().filter(|p| p.table == table).map(|p| p.rows).sum(),
            error_rows: m.error_rows,
            tokens_in: m.tokens_in,
            tokens_out: m.tokens_out,
            set_aside: m.set_aside.clone(),
            completions: Vec::new(),
        }
    }

    /// The summary line on what was set aside as not results, when anything was: first the
    /// ordered tests without a result (pending, cancelled, not reported, withdrawn), then the
    /// other kinds.
    pub fn set_aside_line(&self) -> Option<String> {
        if self.set_aside.is_empty() {
            return None;
        }
        use medbatch_schemas::job::UNRESULTED_KINDS;
        let count = |k: &str| self.set_aside.get(k).copied().unwrap_or(0);
        let entries: Vec<String> =
            UNRESULTED_KINDS.iter().map(|k| format!("{} {}", count(k), k.replace('_', " "))).collect();
        let others: Vec<(&String, &u64)> =
            self.set_aside.iter().filter(|(k, _)| !UNRESULTED_KINDS.contains(&k.as_str())).collect();
        let other_total: u64 = others.iter().map(|(_, n)| **n).sum();
        let others: Vec<String> = others.iter().map(|(k, n)| format!("{k} {n}")).collect();
        Some(format!(
            "{} (tests without a result, no row); {other_total} other non-result lines{}",
            entries.join(", "),
            if others.is_empty() { String::new() } else { format!(" ({})", others.join(", ")) }
        ))
    }
}

/// Completion markers read at once: a store's latency per request (tens of milliseconds on
/// some servers) is paid once per this many markers rather than once per job.
const MARKERS_IN_FLIGHT: usize = 32;

/// Completion markers already read, by marker key. A marker is written once and never
/// changed, so a marker read while a run is followed serves its commit: the commit then reads
/// only those that appeared since, instead of every job's marker after the last job is done.
pub type MarkersRead = std::collections::HashMap<String, Completion>;

/// Reads the markers under `keys` (`MARKERS_IN_FLIGHT` at a time) into `read`. Absent ones
/// are left out; every marker that could be read is kept, and the first failure (the store,
/// or a marker that is not a completion) is returned after all were tried.
pub async fn read_markers(
    store: &dyn ObjectStore,
    keys: &[String],
    read: &mut MarkersRead,
) -> Result<(), CoordinatorError> {
    let reads = futures_util::StreamExt::buffered(
        futures_util::stream::iter(keys.iter().map(|key| async move { (key, store.get(key).await) })),
        MARKERS_IN_FLIGHT,
    );
    let got: Vec<_> = futures_util::StreamExt::collect(reads).await;
    let mut first_error = None;
    for (key, got) in got {
        let parsed = match got {
            Ok(None) => continue,
            Ok(Some(bytes)) => serde_json::from_slice::<Completion>(&bytes)
                .map_err(|e| CoordinatorError::Corrupt { key: key.clone(), reason: e.to_string() }),
            Err(e) => Err(e.into()),
        };
        match parsed {
            Ok(c) => {
                read.insert(key.clone(), c);
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Reads every planned job's completion marker.
pub async fn run_progress(plan: &PlannedRun, store: &dyn ObjectStore) -> Result<RunProgress, CoordinatorError> {
    run_progress_with(plan, store, &mut MarkersRead::new()).await
}

/// [`run_progress`], reading only the markers not in `known` (and adding them to it).
pub async fn run_progress_with(
    plan: &PlannedRun,
    store: &dyn ObjectStore,
    known: &mut MarkersRead,
) -> Result<RunProgress, CoordinatorError> {
    let keys: Vec<String> = plan.jobs.iter().map(|job| done_key(&job.run_id, &job.job_id)).collect();
    let missing: Vec<String> = keys.iter().filter(|k| !known.contains_key(*k)).cloned().collect();
    read_markers(store, &missing, known).await?;
    let mut p = RunProgress { jobs_planned: plan.jobs.len() as u64, ..Default::default() };
    for key in &keys {
        let Some(c) = known.get(key) else { continue };
        p.jobs_done += 1;
        p.documents_ok += c.documents_ok;
        p.documents_failed += c.documents_failed;
        p.error_rows += c.error_rows;
        p.rows += c
            .parts
            .iter()
            .filter(|x| !medbatch_schemas::tables::is_system_table(&x.table))
            .map(|x| x.rows)
            .sum::<u64>();
        p.tokens_in += c.tokens_in;
        p.tokens_out += c.tokens_out;
        for (reason, n) in &c.set_aside {
            *p.set_aside.entry(reason.clone()).or_insert(0) += n;
        }
        p.completions.push(c.clone());
    }
    Ok(p)
}

/// What the stage run at commit reads.
#[derive(Clone, Debug)]
pub struct StageInput<'a> {
    pub run_id: &'a medbatch_schemas::RunId,
    /// The run's parts; for an incremental run, then the parts of the earlier committed runs
    /// (of the same pipeline and model) that hold current inputs.
    pub parts: Vec<medbatch_schemas::OutputPart>,
    /// An incremental run: each input URI's current content digest (this run's inputs and
    /// the unchanged ones of earlier runs); rows of other content are superseded and do not
    /// count. `None`: every row of `parts` counts.
    pub current: Option<std::collections::BTreeMap<String, medbatch_schemas::Digest>>,
    /// When the run's last job finished (the stage's rows' time, the same for every
    /// committer).
    pub finished_at: &'a str,
}

/// A stage run once every job of a run is done, before its manifest (the patient-level
/// reduce): it reads the jobs' parts and writes parts of tables of its own, which the
/// manifest lists with the jobs' parts. It must be deterministic — the same input gives the
/// same bytes under the same keys — since two committers of a run may both run it, and a
/// committer that died before the manifest is followed by one that runs it again.
#[async_trait::async_trait]
pub trait RunStage: Send + Sync {
    /// The tables it writes.
    fn tables(&self) -> Vec<&str>;

    /// The parts written.
    async fn run(
        &self,
        input: &StageInput<'_>,
        store: &dyn ObjectStore,
    ) -> Result<Vec<medbatch_schemas::OutputPart>, String>;
}

/// Writes the run's part of the index of committed inputs (`crate::index`): a row per input
/// the run planned, its time the run's last job's (so that two committers write the same
/// bytes).
async fn write_index_part(
    plan: &PlannedRun,
    store: &dyn ObjectStore,
    finished_at: &str,
) -> Result<medbatch_schemas::OutputPart, CoordinatorError> {
    let mut inputs: Vec<medbatch_schemas::IndexedInput> = Vec::new();
    for i in plan.jobs.iter().flat_map(|j| &j.inputs) {
        if !inputs.iter().any(|x| x.uri == i.uri) {
            inputs.push(medbatch_schemas::IndexedInput {
                uri: i.uri.clone(),
                sha256: i.sha256.clone(),
                run_id: plan.run_id.clone(),
                committed_at: finished_at.to_string(),
            });
        }
    }
    inputs.sort_by(|a, b| a.uri.cmp(&b.uri));
    let key = crate::index::index_key(&plan.pipeline, &plan.model, &plan.run_id);
    let bytes =
        crate::index::index_part(&inputs).map_err(|reason| CoordinatorError::Corrupt { key: key.clone(), reason })?;
    let part = medbatch_schemas::OutputPart {
        table: crate::index::INPUTS_TABLE.into(),
        key: key.clone(),
        rows: inputs.len() as u64,
        bytes: bytes.len() as u64,
        sha256: medbatch_schemas::Digest::of_bytes(&bytes),
    };
    store.put(&key, bytes.into()).await?;
    Ok(part)
}

/// The stage's input: the run's parts; for an incremental run also the earlier committed
/// runs' parts and the current content of each input.
async fn stage_input<'a>(
    plan: &'a PlannedRun,
    store: &dyn ObjectStore,
    parts: &[medbatch_schemas::OutputPart],
    finished_at: &'a str,
) -> Result<StageInput<'a>, CoordinatorError> {
    let mut input = StageInput { run_id: &plan.run_id, parts: parts.to_vec(), current: None, finished_at };
    if !plan.incremental {
        return Ok(input);
    }
    let view = crate::index::current_view(store, &plan.pipeline, &plan.model, Some(&plan.run_id)).await?;
    let mut current: std::collections::BTreeMap<String, medbatch_schemas::Digest> =
        view.iter().map(|(uri, e)| (uri.clone(), e.sha256.clone())).collect();
    for i in plan.jobs.iter().flat_map(|j| &j.inputs) {
        current.insert(i.uri.clone(), i.sha256.clone());
    }
    let mut earlier: Vec<&medbatch_schemas::RunId> =
        view.values().filter(|e| current.get(&e.uri) == Some(&e.sha256)).map(|e| &e.run_id).collect();
    earlier.sort();
    earlier.dedup();
    for run in earlier {
        let key = manifest_key(run);
        let Some(bytes) = store.get(&key).await? else { continue };
        let m: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| CoordinatorError::Corrupt { key, reason: e.to_string() })?;
        let results = m.parts.into_iter().filter(|p| !medbatch_schemas::tables::is_system_table(&p.table));
        input.parts.extend(results);
    }
    input.current = Some(current);
    Ok(input)
}

/// Writes the manifest and `_SUCCESS` when every job is done, after the run's index part
/// and the `stage` (if any); returns the manifest, or `None` when jobs are still missing.
/// Idempotent: an existing manifest is returned as is.
pub async fn commit_run(
    plan: &PlannedRun,
    store: &dyn ObjectStore,
    created_at: &str,
    stage: Option<&dyn RunStage>,
) -> Result<Option<Manifest>, CoordinatorError> {
    commit_run_with(plan, store, created_at, stage, &mut MarkersRead::new()).await
}

/// [`commit_run`] with the markers already read (`known`, see [`MarkersRead`]).
pub async fn commit_run_with(
    plan: &PlannedRun,
    store: &dyn ObjectStore,
    created_at: &str,
    stage: Option<&dyn RunStage>,
    known: &mut MarkersRead,
) -> Result<Option<Manifest>, CoordinatorError> {
    let mkey = manifest_key(&plan.run_id);
    if let Some(bytes) = store.get(&mkey).await? {
        let m: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| CoordinatorError::Corrupt { key: mkey.clone(), reason: e.to_string() })?;
        store.put_if_absent(&success_key(&plan.run_id), bytes::Bytes::new()).await?;
        return Ok(Some(m));
    }
    let progress = run_progress_with(plan, store, known).await?;
    if progress.jobs_done < progress.jobs_planned {
        return Ok(None);
    }
    let mut parts: Vec<_> = progress.completions.iter().flat_map(|c| c.parts.iter().cloned()).collect();
    parts.sort_by(|a, b| a.key.cmp(&b.key));
    let finished_at = progress.completions.iter().map(|c| c.finished_at.as_str()).max().unwrap_or(created_at);
    let index = write_index_part(plan, store, finished_at).await?;
    if let Some(stage) = stage {
        let input = stage_input(plan, store, &parts, finished_at).await?;
        let more = stage
            .run(&input, store)
            .await
            .map_err(|reason| CoordinatorError::Stage { run_id: plan.run_id.to_string(), reason })?;
        parts.extend(more);
    }
    parts.push(index);
    parts.sort_by(|a, b| a.key.cmp(&b.key));
    remove_stray_parts(plan, store, &parts).await?;
    let manifest = Manifest {
        schema_version: JOB_SCHEMA_VERSION,
        run_id: plan.run_id.clone(),
        pipeline: plan.pipeline.clone(),
        model: plan.model.clone(),
        jobs: progress.jobs_planned,
        documents_ok: progress.documents_ok,
        documents_failed: progress.documents_failed,
        error_rows: progress.error_rows,
        tokens_in: progress.tokens_in,
        tokens_out: progress.tokens_out,
        set_aside: progress.set_aside.clone(),
        parts,
        created_at: created_at.to_string(),
        skipped: plan.skipped.clone(),
        superseded: plan.superseded.clone(),
    };
    let bytes = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
    // Only the first writer's manifest counts; a concurrent committer reads it back.
    store.put_if_absent(&mkey, bytes.into()).await?;
    store.put_if_absent(&success_key(&plan.run_id), bytes::Bytes::new()).await?;
    let stored = store.get(&mkey).await?.unwrap_or_default();
    serde_json::from_slice(&stored)
        .map(Some)
        .map_err(|e| CoordinatorError::Corrupt { key: mkey, reason: e.to_string() })
}

/// Removes the run's parts that no completion marker names: those of attempts that lost a
/// race with a duplicate delivery, or died between writing a part and its marker. Returns
/// how many were removed.
pub async fn remove_stray_parts(
    plan: &PlannedRun,
    store: &dyn ObjectStore,
    parts: &[medbatch_schemas::OutputPart],
) -> Result<usize, CoordinatorError> {
    let named: std::collections::HashSet<&str> = parts.iter().map(|p| p.key.as_str()).collect();
    let mut tables: Vec<&str> = parts.iter().map(|p| p.table.as_str()).collect();
    tables.extend([ERRORS_TABLE, DOCUMENTS_TABLE]);
    tables.sort_unstable();
    tables.dedup();
    // The tables are listed at once (each listing is a round trip per thousand keys).
    let prefixes: Vec<String> = tables.iter().map(|t| run_table_prefix(t, &plan.run_id)).collect();
    let listed = futures_util::future::try_join_all(prefixes.iter().map(|p| store.list(p))).await?;
    let mut removed = 0;
    for keys in listed {
        for key in keys {
            let file = key.rsplit('/').next().unwrap_or_default();
            if file.starts_with("part-") && file.ends_with(".parquet") && !named.contains(key.as_str()) {
                tracing::info!(key = %key, "removing a part no completion marker names");
                store.delete(&key).await?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{plan_run, PlanConfig};
    use medbatch_connectors::store::LocalStore;
    use medbatch_schemas::{Digest, ModelRef, OutputPart, PipelineRef, RunId};

    #[tokio::test]
    async fn manifest_only_when_every_job_is_done_and_written_once() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a.txt"), "x").unwrap();
        std::fs::write(d.path().join("b.txt"), "y").unwrap();
        let out = tempfile::tempdir().unwrap();
        let store = LocalStore::create(out.path()).unwrap();
        let plan = plan_run(&PlanConfig {
            run_id: RunId::new("r").unwrap(),
            pipeline: PipelineRef { name: "p".into(), version: "1".into(), digest: Digest::of_bytes(b"p") },
            model: ModelRef { id: "m".into(), digest: Digest::of_bytes(b"m") },
            output: "/out".into(),
            inputs: vec![d.path().to_str().unwrap().into()],
            source: medbatch_connectors::inputs::InputSource::local(),
            imaging: None,
        })
        .unwrap();
        let complete = |i: usize| Completion {
            schema_version: JOB_SCHEMA_VERSION,
            run_id: plan.run_id.clone(),
            job_id: plan.jobs[i].job_id.clone(),
            parts: vec![OutputPart {
                table: "t".into(),
                key: format!("t/run_id=r/part-{}.parquet", plan.jobs[i].job_id),
                rows: 3,
                bytes: 10,
                sha256: Digest::of_bytes(b"part"),
            }],
            documents_ok: 1,
            documents_failed: 0,
            error_rows: 0,
            tokens_in: 5,
            tokens_out: 2,
            engine_ms: 1,
            set_aside: [("pending".to_string(), 1)].into(),
            wall_ms: 1,
            worker_id: "w".into(),
            finished_at: "2026-01-01T00:00:00Z".into(),
        };
        let put = |i: usize| {
            let c = complete(i);
            let key = done_key(&c.run_id, &c.job_id);
            let store = store.clone();
            async move { store.put(&key, serde_json::to_vec(&c).unwrap().into()).await.unwrap() }
        };
        put(0).await;
        assert!(commit_run(&plan, &store, "t1", None).await.unwrap().is_none());
        assert!(!store.exists(&success_key(&plan.run_id)).await.unwrap());
        put(1).await;
        // The parts the markers name, parts of attempts no marker names, another run's part.
        let stray = ["t/run_id=r/part-lost-0a0b0c0d.parquet", "_errors/run_id=r/part-lost-0a0b0c0d.parquet"];
        let kept =
            [complete(0).parts[0].key.clone(), complete(1).parts[0].key.clone(), "t/run_id=q/part-x.parquet".into()];
        for k in stray.iter().map(|k| k.to_string()).chain(kept.iter().cloned()) {
            store.put(&k, bytes::Bytes::from_static(b"PAR1")).await.unwrap();
        }
        let m = commit_run(&plan, &store, "t1", None).await.unwrap().unwrap();
        assert_eq!((m.jobs, m.parts.len(), m.tokens_in), (2, 3, 10), "two jobs' parts and the index part");
        assert!(store.exists(&success_key(&plan.run_id)).await.unwrap());
        for k in stray {
            assert!(!store.exists(k).await.unwrap(), "{k} should be removed");
        }
        for k in &kept {
            assert!(store.exists(k).await.unwrap(), "{k} should be kept");
        }
        // Committing again returns the stored manifest unchanged.
        assert_eq!(commit_run(&plan, &store, "t2", None).await.unwrap().unwrap(), m);
        let p = run_progress(&plan, &store).await.unwrap();
        assert_eq!((p.jobs_done, p.rows), (2, 6));
    }
}
