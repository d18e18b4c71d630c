//! A completion marker whose conditional write is retried after its answer was lost (the
//! store restarted between writing the marker and answering) finds the marker the first try
//! wrote. That marker is the attempt's own: the attempt's parts stay, so the manifest never
//! names a part that was removed.

use async_trait::async_trait;
use bytes::Bytes;
use medbatch_connectors::inputs::InputSource;
use medbatch_connectors::queue::{InProcessQueue, JobQueue};
use medbatch_connectors::store::{LocalStore, ObjectStore, StoreError};
use medbatch_engine::{Engine, EngineHandle};
use medbatch_schemas::tables::done_key;
use medbatch_schemas::{Completion, Digest, InputKind, InputRef, Job, ModelRef, RunId, Selection};
use medbatch_worker::{run_worker, LoadedPipeline, WorkerContext};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf")
}

/// A store whose first conditional write lands but answers as a retry of it would: "already
/// there".
struct LostAnswer {
    inner: LocalStore,
    lost: AtomicBool,
}

#[async_trait]
impl ObjectStore for LostAnswer {
    fn location(&self) -> String {
        self.inner.location()
    }
    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        self.inner.put(key, bytes).await
    }
    async fn put_if_absent(&self, key: &str, bytes: Bytes) -> Result<bool, StoreError> {
        let wrote = self.inner.put_if_absent(key, bytes).await?;
        Ok(wrote && self.lost.swap(true, Ordering::SeqCst))
    }
    async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        self.inner.get(key).await
    }
    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        self.inner.exists(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.delete(key).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_marker_write_keeps_the_attempts_parts() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("model");
    std::fs::create_dir(&model_dir).unwrap();
    for d in [fixtures().join("models/gqa_window"), fixtures().join("tokenizer")] {
        for f in std::fs::read_dir(d).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, model_dir.join(f.file_name().unwrap())).unwrap();
        }
    }
    let engine = Engine::load_checkpoint(&model_dir).unwrap();
    let info = engine.info.clone();
    let engine = EngineHandle::spawn(engine);
    let pipeline = LoadedPipeline::load(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines/note-medications").to_str().unwrap(),
    )
    .unwrap();
    let note = tmp.path().join("note.txt");
    std::fs::write(&note, "Started metformin 500 mg twice daily.\n").unwrap();
    let bytes = std::fs::read(&note).unwrap();
    let input = InputRef {
        uri: format!("file://{}", note.display()),
        size: bytes.len() as u64,
        sha256: Digest::of_bytes(&bytes),
        kind: InputKind::Text,
        selection: Selection::Whole,
        etag: None,
    };
    let out = tmp.path().join("out");
    let job = Job::new(
        RunId::new("lost-answer").unwrap(),
        pipeline.reference(),
        ModelRef { id: info.id.clone(), digest: Digest::parse(&info.digest).unwrap() },
        vec![input],
        out.display().to_string(),
    );
    let store = Arc::new(LostAnswer { inner: LocalStore::create(&out).unwrap(), lost: AtomicBool::new(false) });
    let queue = InProcessQueue::new();
    queue.publish(&job).await.unwrap();
    queue.close();
    let ctx = WorkerContext {
        store: store.clone(),
        engine,
        pipeline: medbatch_worker::pipelines::for_spec(Arc::new(pipeline)).unwrap(),
        worker_id: "w".into(),
        events: None,
        inputs: InputSource::local(),
    };
    assert_eq!(run_worker(Arc::new(queue.clone()), ctx).await.unwrap(), 1);
    assert!(store.lost.load(Ordering::SeqCst), "the marker's write was answered as a retry");
    let marker = store.get(&done_key(&job.run_id, &job.job_id)).await.unwrap().expect("the marker");
    let completion: Completion = serde_json::from_slice(&marker).unwrap();
    // The table, _documents (and _errors if any): every part the marker names is there.
    assert!(completion.parts.len() >= 2, "{:?}", completion.parts);
    for p in &completion.parts {
        assert!(store.exists(&p.key).await.unwrap(), "{} named by the marker was removed", p.key);
    }
}
