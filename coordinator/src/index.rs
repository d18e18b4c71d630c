//! The index of committed inputs: which content each committed run of a pipeline and model
//! processed at an output, for incremental runs.
//!
//! Every run writes, at commit and before its manifest (which lists it), one Parquet part
//! `OUT/_inputs/pipeline=NAME/digest=P/model=M/run_id=RUN.parquet` (P and M: the first 16
//! hex digits of the pipeline's and the model's digests) with a row per input it planned:
//! `source_uri`, `input_sha256`, `run_id`, `committed_at`. A part counts only when its run's
//! manifest exists (a committer that died before the manifest leaves a part that does not).
//!
//! The current view: for each input URI, the content of the latest committed run that
//! processed it. An incremental run skips an input whose URI and content are in the current
//! view, and processes one whose content changed (the earlier content is then superseded:
//! its rows no longer count downstream).

use crate::CoordinatorError;
use arrow::array::{Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use medbatch_connectors::store::ObjectStore;
use medbatch_schemas::tables::manifest_key;
pub use medbatch_schemas::IndexedInput;
use medbatch_schemas::{Digest, ModelRef, PipelineRef, RunId};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The index table's name (a system table: its rows are not results).
pub const INPUTS_TABLE: &str = "_inputs";

/// Where the index parts of a pipeline and model live.
pub fn index_prefix(pipeline: &PipelineRef, model: &ModelRef) -> String {
    let short = |d: &Digest| d.as_str()[..16.min(d.as_str().len())].to_string();
    format!(
        "{INPUTS_TABLE}/pipeline={}/digest={}/model={}/",
        pipeline.name,
        short(&pipeline.digest),
        short(&model.digest)
    )
}

/// The key of a run's index part.
pub fn index_key(pipeline: &PipelineRef, model: &ModelRef, run_id: &RunId) -> String {
    format!("{}run_id={run_id}.parquet", index_prefix(pipeline, model))
}

fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(
        ["source_uri", "input_sha256", "run_id", "committed_at"].map(|n| Field::new(n, DataType::Utf8, false)).to_vec(),
    ))
}

/// A run's index part: a row per input.
pub fn index_part(inputs: &[IndexedInput]) -> Result<Vec<u8>, String> {
    let col = |f: fn(&IndexedInput) -> &str| Arc::new(StringArray::from_iter_values(inputs.iter().map(f))) as _;
    let batch = RecordBatch::try_new(
        schema(),
        vec![col(|i| &i.uri), col(|i| i.sha256.as_str()), col(|i| i.run_id.as_str()), col(|i| &i.committed_at)],
    )
    .map_err(|e| e.to_string())?;
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
        .set_created_by("medbatch".into())
        .build();
    let mut buf = Vec::new();
    let mut w =
        parquet::arrow::ArrowWriter::try_new(&mut buf, batch.schema(), Some(props)).map_err(|e| e.to_string())?;
    w.write(&batch).map_err(|e| e.to_string())?;
    w.close().map_err(|e| e.to_string())?;
    Ok(buf)
}

fn read_part(key: &str, bytes: bytes::Bytes) -> Result<Vec<IndexedInput>, CoordinatorError> {
    let corrupt = |reason: String| CoordinatorError::Corrupt { key: key.to_string(), reason };
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
        .and_then(|b| b.build())
        .map_err(|e| corrupt(e.to_string()))?;
    let mut out = Vec::new();
    for b in reader {
        let b = b.map_err(|e| corrupt(e.to_string()))?;
        let col = |n: &str| -> Result<&StringArray, CoordinatorError> {
            b.column_by_name(n)
                .and_then(|c| c.as_any().downcast_ref::<StringArray>())
                .ok_or_else(|| corrupt(format!("no text column {n}")))
        };
        let (uri, sha, run, at) = (col("source_uri")?, col("input_sha256")?, col("run_id")?, col("committed_at")?);
        for i in 0..b.num_rows() {
            if uri.is_null(i) || sha.is_null(i) {
                continue;
            }
            let sha256 = Digest::parse(sha.value(i)).ok_or_else(|| corrupt("an input digest is not hex".into()))?;
            let run_id = RunId::new(run.value(i)).map_err(|e| corrupt(e.to_string()))?;
            out.push(IndexedInput { uri: uri.value(i).into(), sha256, run_id, committed_at: at.value(i).into() });
        }
    }
    Ok(out)
}

/// The committed inputs of `pipeline` and `model` at the output, as the current view: for
/// each URI, the entry of the latest committed run (by commit time, then run id). Runs
/// without a manifest do not count, nor run `except` (a run being planned again or
/// committed).
pub async fn current_view(
    store: &dyn ObjectStore,
    pipeline: &PipelineRef,
    model: &ModelRef,
    except: Option<&RunId>,
) -> Result<BTreeMap<String, IndexedInput>, CoordinatorError> {
    let mut view: BTreeMap<String, IndexedInput> = BTreeMap::new();
    for key in store.list(&index_prefix(pipeline, model)).await? {
        let Some(run) = key.rsplit('/').next().and_then(|f| f.strip_prefix("run_id=")?.strip_suffix(".parquet")) else {
            continue;
        };
        let Ok(run) = RunId::new(run) else { continue };
        if Some(&run) == except || !store.exists(&manifest_key(&run)).await? {
            continue;
        }
        let Some(bytes) = store.get(&key).await? else { continue };
        for e in read_part(&key, bytes)? {
            let newer = view.get(&e.uri).is_none_or(|v| (&e.committed_at, &e.run_id) > (&v.committed_at, &v.run_id));
            if newer {
                view.insert(e.uri.clone(), e);
            }
        }
    }
    Ok(view)
}

/// Makes `plan` incremental over the current view `view`: a job whose inputs are all in the
/// view with the same content is dropped (its inputs listed as skipped, with the run that
/// processed them); an input planned whose URI the view holds with other content supersedes
/// that entry (listed). The plan's job ids do not change (they derive from the run and the
/// job's inputs), so planning again over the same view gives the same plan.
pub fn skip_committed(plan: &mut crate::PlannedRun, view: &BTreeMap<String, IndexedInput>) {
    plan.incremental = true;
    let unchanged = |i: &medbatch_schemas::InputRef| view.get(&i.uri).is_some_and(|v| v.sha256 == i.sha256);
    let mut skipped: BTreeMap<String, IndexedInput> = BTreeMap::new();
    let mut superseded: BTreeMap<String, IndexedInput> = BTreeMap::new();
    plan.jobs.retain(|j| {
        if j.inputs.iter().all(unchanged) {
            skipped.extend(j.inputs.iter().map(|i| (i.uri.clone(), view[&i.uri].clone())));
            return false;
        }
        for i in j.inputs.iter().filter(|i| !unchanged(i)) {
            if let Some(old) = view.get(&i.uri) {
                superseded.insert(i.uri.clone(), old.clone());
            }
        }
        true
    });
    plan.units = plan.jobs.iter().map(crate::plan::job_units).sum();
    plan.skipped = skipped.into_values().collect();
    plan.superseded = superseded.into_values().collect();
}

#[cfg(test)]
mod tests {
    use super::*;
    use medbatch_connectors::store::LocalStore;

    #[tokio::test]
    async fn the_current_view_is_the_latest_committed_content_of_each_input() {
        let out = tempfile::tempdir().unwrap();
        let store = LocalStore::create(out.path()).unwrap();
        let pipeline = PipelineRef { name: "p".into(), version: "1".into(), digest: Digest::of_bytes(b"p") };
        let model = ModelRef { id: "m".into(), digest: Digest::of_bytes(b"m") };
        let entry = |uri: &str, content: &[u8], run: &str, at: &str| IndexedInput {
            uri: uri.into(),
            sha256: Digest::of_bytes(content),
            run_id: RunId::new(run).unwrap(),
            committed_at: at.into(),
        };
        let runs = [
            (
                "r1",
                "2026-01-01T00:00:00Z",
                vec![entry("a", b"a1", "r1", "2026-01-01T00:00:00Z"), entry("b", b"b1", "r1", "2026-01-01T00:00:00Z")],
            ),
            ("r2", "2026-01-02T00:00:00Z", vec![entry("a", b"a2", "r2", "2026-01-02T00:00:00Z")]),
            // Not committed: no manifest.
            ("r3", "2026-01-03T00:00:00Z", vec![entry("b", b"b3", "r3", "2026-01-03T00:00:00Z")]),
        ];
        for (run, _, rows) in &runs {
            let run = RunId::new(*run).unwrap();
            store.put(&index_key(&pipeline, &model, &run), index_part(rows).unwrap().into()).await.unwrap();
        }
        for run in ["r1", "r2"] {
            store.put(&manifest_key(&RunId::new(run).unwrap()), bytes::Bytes::from_static(b"{}")).await.unwrap();
        }
        let view = current_view(&store, &pipeline, &model, None).await.unwrap();
        assert_eq!(view.len(), 2);
        assert_eq!((view["a"].sha256.clone(), view["a"].run_id.as_str()), (Digest::of_bytes(b"a2"), "r2"));
        assert_eq!(view["b"].run_id.as_str(), "r1", "an uncommitted run's part does not count");
        let other = ModelRef { id: "m2".into(), digest: Digest::of_bytes(b"m2") };
        assert!(
            current_view(&store, &pipeline, &other, None).await.unwrap().is_empty(),
            "another model's index is its own"
        );
        let without_r2 = current_view(&store, &pipeline, &model, Some(&RunId::new("r2").unwrap())).await.unwrap();
        assert_eq!(without_r2["a"].run_id.as_str(), "r1", "the run being planned again is left out");
    }
}
