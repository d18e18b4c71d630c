//! A worker whose engine stops (a tensor-parallel rank failed) gives the job in hand back to
//! the queue — no error rows, no parts, no completion marker — and takes no more jobs.

mod support;

use medbatch_connectors::queue::{InProcessQueue, JobQueue};
use medbatch_connectors::store::{LocalStore, ObjectStore};
use medbatch_engine::{Engine, EngineHandle};
use medbatch_schemas::tables::done_key;
use medbatch_worker::run_worker;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_rank_returns_the_job_and_stops_the_worker() {
    let tmp = tempfile::tempdir().unwrap();
    // The tiny text model with the fixture tokenizer, split over two ranks.
    let engine = Engine::load_checkpoint_tp(&support::tiny_model(tmp.path()), 2).unwrap();
    let info = engine.info.clone();
    engine.model.shards[1].comm.abort("device lost");
    let engine = EngineHandle::spawn(engine);

    let pipeline = support::note_pipeline();
    let (job, out) = support::one_note_job(tmp.path(), "tp-stop", &pipeline, &info);
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::create(&out).unwrap());
    let queue = InProcessQueue::new();
    queue.publish(&job).await.unwrap();
    queue.close();
    let ctx = support::context(store.clone(), engine, pipeline);
    let done = run_worker(Arc::new(queue.clone()), ctx).await.unwrap();
    assert_eq!(done, 0, "the worker stops without finishing the job");
    assert!(!store.exists(&done_key(&job.run_id, &job.job_id)).await.unwrap(), "no completion marker");
    let parts: Vec<_> = walk(&out).into_iter().filter(|p| p.extension().is_some_and(|e| e == "parquet")).collect();
    assert!(parts.is_empty(), "no rows or error rows written: {parts:?}");
    // The job is back in the queue for another worker, on its second delivery.
    let again = queue.next().await.unwrap().expect("the job was returned");
    assert_eq!((again.job.job_id.clone(), again.job.attempt), (job.job_id.clone(), 2));
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}
