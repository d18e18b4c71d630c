//! Persistent threads for the ranks of a split model: each rank's thread is started once,
//! when the model first runs split, and then serves every pass. The engine thread hands all
//! ranks the same [`PassJob`] and collects rank 0's logits; no thread is started per pass.

use super::pass::{forward_shard, PassJob};
use super::Shard;
use crate::kv::PageStore;
use candle_core::Tensor;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

type Reply = candle_core::Result<Option<Tensor>>;

/// A pass for one rank: the job and its pages.
struct Work {
    job: Arc<PassJob>,
    store: Arc<Mutex<PageStore>>,
}

struct Worker {
    tx: Option<Sender<Work>>,
    rx: Receiver<Reply>,
    handle: Option<JoinHandle<()>>,
}

/// One thread per rank. Passes are run one at a time (the lock), so that every rank sees
/// them, and their collectives, in the same order.
pub(crate) struct RankWorkers {
    workers: Mutex<Vec<Worker>>,
}

impl RankWorkers {
    pub fn start(shards: &[Arc<Shard>]) -> Self {
        let workers = shards
            .iter()
            .enumerate()
            .map(|(r, shard)| {
                let (tx, work_rx) = channel::<Work>();
                let (reply_tx, rx) = channel::<Reply>();
                let shard = shard.clone();
                let handle = std::thread::Builder::new()
                    .name(format!("medbatch-rank-{r}"))
                    .spawn(move || serve(&shard, work_rx, reply_tx))
                    .expect("spawn rank thread");
                Worker { tx: Some(tx), rx, handle: Some(handle) }
            })
            .collect();
        Self { workers: Mutex::new(workers) }
    }

    /// Runs `job` on every rank (rank `r` with `stores[r]`); returns rank 0's logits (every
    /// rank ends with the same), or the first rank's error.
    pub fn run(&self, job: Arc<PassJob>, stores: &[Arc<Mutex<PageStore>>]) -> Reply {
        let workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        for (w, store) in workers.iter().zip(stores) {
            let tx = w.tx.as_ref().expect("running");
            tx.send(Work { job: job.clone(), store: store.clone() })
                .map_err(|_| candle_core::Error::Msg("a rank's thread is gone".into()))?;
        }
        let mut first: Option<Reply> = None;
        for w in workers.iter() {
            let r = w.rx.recv().unwrap_or_else(|_| Err(candle_core::Error::Msg("a rank's thread is gone".into())));
            match (&first, r) {
                (None, r) => first = Some(r),
                (Some(Ok(_)), Err(e)) => first = Some(Err(e)),
                _ => {}
            }
        }
        first.unwrap_or(Ok(None))
    }
}

fn serve(shard: &Shard, work: Receiver<Work>, reply: Sender<Reply>) {
    while let Ok(Work { job, store }) = work.recv() {
        // A rank that errs or panics breaks the group, so that the others return from their
        // collectives instead of waiting for it.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut store = store.lock().unwrap_or_else(|e| e.into_inner());
            forward_shard(shard, &job, &mut store)
        }))
        .unwrap_or_else(|_| Err(candle_core::Error::Msg("the rank's thread panicked".into())));
        if let Err(e) = &r {
            shard.comm.abort(&e.to_string());
        }
        if reply.send(r).is_err() {
            return;
        }
    }
}

impl Drop for RankWorkers {
    fn drop(&mut self) {
        let workers = self.workers.get_mut().unwrap_or_else(|e| e.into_inner());
        for w in workers.iter_mut() {
            w.tx.take();
        }
        for w in workers.iter_mut() {
            if let Some(h) = w.handle.take() {
                let _ = h.join();
            }
        }
    }
}
