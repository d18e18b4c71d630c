//! A completion marker whose conditional write is retried after its answer was lost (the
//! store restarted between writing the marker and answering) finds the marker the first try
//! wrote. That marker is the attempt's own: the attempt's parts stay, so the manifest never
//! names a part that was removed.

mod support;

use async_trait::async_trait;
use bytes::Bytes;
use medbatch_connectors::queue::{InProcessQueue, JobQueue};
use medbatch_connectors::store::{LocalStore, ObjectStore, StoreError};
use medbatch_engine::{Engine, EngineHandle};
use medbatch_schemas::tables::done_key;
use medbatch_schemas::Completion;
use medbatch_worker::run_worker;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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
    let engine = Engine::load_checkpoint(&support::tiny_model(tmp.path())).unwrap();
    let info = engine.info.clone();
    let engine = EngineHandle::spawn(engine);
    let pipeline = support::note_pipeline();
    let (job, out) = support::one_note_job(tmp.path(), "lost-answer", &pipeline, &info);
    let store = Arc::new(LostAnswer { inner: LocalStore::create(&out).unwrap(), lost: AtomicBool::new(false) });
    let queue = InProcessQueue::new();
    queue.publish(&job).await.unwrap();
    queue.close();
    let ctx = support::context(store.clone(), engine, pipeline);
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
