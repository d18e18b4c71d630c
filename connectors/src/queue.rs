//! Job queues: at-least-once delivery with explicit acknowledgement.

use async_trait::async_trait;
use medbatch_schemas::Job;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// Deliveries of one job before it is dead-lettered (a quorum queue's delivery limit does
/// the same on RabbitMQ).
pub const DELIVERY_LIMIT: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue closed")]
    Closed,
    #[error("queue: {0}")]
    Broker(String),
}

/// A dead-lettered job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadJob {
    pub run_id: String,
    pub job_id: String,
    /// Why the broker dead-lettered it (`delivery_limit`, `rejected`, ...).
    pub reason: String,
}

/// What [`JobQueue::dead_letters`] saw among the dead-lettered jobs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeadLetters {
    pub jobs: Vec<DeadJob>,
    /// Messages that are not jobs.
    pub other: usize,
    /// Messages looked at.
    pub scanned: usize,
    /// Messages left in the queue after the last one looked at (beyond the limit).
    pub remaining: u32,
}

impl DeadLetters {
    /// The dead-lettered jobs of one run, by job id (a job dead-lettered twice counts once).
    pub fn of_run(&self, run_id: &str) -> Vec<DeadJob> {
        let mut jobs: Vec<DeadJob> = self.jobs.iter().filter(|j| j.run_id == run_id).cloned().collect();
        jobs.sort_by(|a, b| a.job_id.cmp(&b.job_id));
        jobs.dedup_by(|a, b| a.job_id == b.job_id);
        jobs
    }
}

/// One delivery of a job. Acknowledge it once the job's outputs are durable; return it
/// (`nack`) to have it delivered again.
pub struct Delivery {
    pub job: Job,
    acker: Box<dyn Acker>,
    /// When the job was published (the broker message's timestamp), if known.
    published: Option<std::time::SystemTime>,
    /// The first delivery of the job's first publication, made when its run was planned
    /// ([`JobQueue::publish_new_run`]): no delivery of the job can have finished it before.
    first: bool,
}

impl Delivery {
    pub fn new(job: Job, acker: Box<dyn Acker>) -> Self {
        Self { job, acker, published: None, first: false }
    }

    /// The delivery, known to be the first of its run's first publication.
    pub fn first_of_new_run(mut self) -> Self {
        self.first = true;
        self
    }

    /// Whether no earlier delivery can have finished the job: the first delivery of a
    /// message published with its new run, not redelivered, not replayed. Its worker need
    /// not look for the job's completion marker first (a request to the store per job). A
    /// job published twice in a new run (a publish retried after a lost connection) is
    /// published again without the mark; should two copies still both run, the conditional
    /// marker keeps one attempt's output, as for any duplicate.
    pub fn is_first_of_new_run(&self) -> bool {
        self.first
    }

    /// The delivery, published at `unix_s` (seconds since the epoch).
    pub fn published_at(mut self, unix_s: u64) -> Self {
        self.published = Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix_s));
        self
    }

    /// How long the job waited between its publication and now (to the second), if known.
    pub fn queued_for(&self) -> Option<std::time::Duration> {
        self.published.and_then(|t| t.elapsed().ok())
    }

    pub async fn ack(self) -> Result<(), QueueError> {
        self.acker.ack().await
    }

    /// Gives the job back; `requeue = false` dead-letters it.
    pub async fn nack(self, requeue: bool) -> Result<(), QueueError> {
        let job = self.job;
        self.acker.nack(job, requeue).await
    }
}

#[async_trait]
pub trait Acker: Send {
    async fn ack(self: Box<Self>) -> Result<(), QueueError>;
    async fn nack(self: Box<Self>, job: Job, requeue: bool) -> Result<(), QueueError>;
}

/// Where planned jobs wait for workers.
#[async_trait]
pub trait JobQueue: Send + Sync {
    /// Publishes a job; returns once the queue has accepted it durably.
    async fn publish(&self, job: &Job) -> Result<(), QueueError>;
    /// Publishes jobs; returns once the queue has accepted all of them durably. Queues that
    /// can have several publishes in flight do so.
    async fn publish_batch(&self, jobs: &[Job]) -> Result<(), QueueError> {
        for j in jobs {
            self.publish(j).await?;
        }
        Ok(())
    }
    /// Publishes the jobs of a run planned just now (none was published before): their
    /// first deliveries can skip the completion-marker check ([`Delivery::is_first_of_new_run`]).
    /// Queues that cannot mark them publish them as [`JobQueue::publish_batch`] does.
    async fn publish_new_run(&self, jobs: &[Job]) -> Result<(), QueueError> {
        self.publish_batch(jobs).await
    }
    /// The next delivery, or `None` once the queue is closed and drained.
    async fn next(&self) -> Result<Option<Delivery>, QueueError>;
    /// Looks at up to `max` dead-lettered jobs (of every run) without taking them: jobs no
    /// worker will finish, which whoever follows a run must stop waiting for.
    async fn dead_letters(&self, max: usize) -> Result<DeadLetters, QueueError>;
}

#[derive(Default)]
struct State {
    ready: VecDeque<Job>,
    in_flight: usize,
    closed: bool,
    /// Dead-lettered jobs and why (`delivery_limit`, `rejected`, as RabbitMQ says).
    dead: Vec<(Job, &'static str)>,
}

/// The embedded run's queue: jobs in memory, delivered to worker tasks of the same process.
/// `next` returns `None` once [`InProcessQueue::close`] was called, nothing is ready and no
/// delivery is outstanding (an outstanding one may still come back).
#[derive(Clone, Default)]
pub struct InProcessQueue {
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
}

impl InProcessQueue {
    pub fn new() -> Self {
        Self::default()
    }

    /// No more jobs will be published.
    pub fn close(&self) {
        self.state.lock().expect("queue lock").closed = true;
        self.changed.notify_waiters();
    }
}

struct InProcessAcker {
    queue: InProcessQueue,
}

#[async_trait]
impl Acker for InProcessAcker {
    async fn ack(self: Box<Self>) -> Result<(), QueueError> {
        let mut s = self.queue.state.lock().expect("queue lock");
        s.in_flight -= 1;
        drop(s);
        self.queue.changed.notify_waiters();
        Ok(())
    }

    async fn nack(self: Box<Self>, mut job: Job, requeue: bool) -> Result<(), QueueError> {
        let mut s = self.queue.state.lock().expect("queue lock");
        s.in_flight -= 1;
        if requeue && job.attempt < DELIVERY_LIMIT {
            job.attempt += 1;
            s.ready.push_back(job);
        } else {
            s.dead.push((job, if requeue { "delivery_limit" } else { "rejected" }));
        }
        drop(s);
        self.queue.changed.notify_waiters();
        Ok(())
    }
}

#[async_trait]
impl JobQueue for InProcessQueue {
    async fn publish(&self, job: &Job) -> Result<(), QueueError> {
        let mut s = self.state.lock().expect("queue lock");
        if s.closed {
            return Err(QueueError::Closed);
        }
        s.ready.push_back(job.clone());
        drop(s);
        self.changed.notify_waiters();
        Ok(())
    }

    async fn next(&self) -> Result<Option<Delivery>, QueueError> {
        loop {
            let notified = self.changed.notified();
            {
                let mut s = self.state.lock().expect("queue lock");
                if let Some(job) = s.ready.pop_front() {
                    s.in_flight += 1;
                    let acker = Box::new(InProcessAcker { queue: self.clone() });
                    return Ok(Some(Delivery::new(job, acker)));
                }
                if s.closed && s.in_flight == 0 {
                    return Ok(None);
                }
            }
            notified.await;
        }
    }

    async fn dead_letters(&self, max: usize) -> Result<DeadLetters, QueueError> {
        let s = self.state.lock().expect("queue lock");
        let jobs: Vec<DeadJob> = s
            .dead
            .iter()
            .take(max)
            .map(|(j, why)| DeadJob {
                run_id: j.run_id.to_string(),
                job_id: j.job_id.to_string(),
                reason: (*why).into(),
            })
            .collect();
        let remaining = u32::try_from(s.dead.len() - jobs.len()).unwrap_or(u32::MAX);
        Ok(DeadLetters { scanned: jobs.len(), jobs, other: 0, remaining })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use medbatch_schemas::{Digest, ModelRef, PipelineRef, RunId};

    fn job(n: u32) -> Job {
        Job::new(
            RunId::new("r").unwrap(),
            PipelineRef { name: "p".into(), version: "1".into(), digest: Digest::of_bytes(b"p") },
            ModelRef { id: "m".into(), digest: Digest::of_bytes(b"m") },
            vec![medbatch_schemas::InputRef {
                uri: format!("file:///{n}.txt"),
                size: 1,
                sha256: Digest::of_bytes(b"x"),
                kind: medbatch_schemas::InputKind::Text,
                selection: medbatch_schemas::Selection::Whole,
                etag: None,
                case: None,
            }],
            "/out".into(),
        )
    }

    #[tokio::test]
    async fn drains_then_ends_and_redelivers_until_limit() {
        let q = InProcessQueue::new();
        q.publish(&job(1)).await.unwrap();
        q.publish(&job(2)).await.unwrap();
        q.close();
        let d1 = q.next().await.unwrap().unwrap();
        d1.ack().await.unwrap();
        // Job 2 fails every time: delivered DELIVERY_LIMIT times, then dead-lettered.
        let mut deliveries = 0;
        while let Some(d) = q.next().await.unwrap() {
            deliveries += 1;
            assert_eq!(d.job.attempt, deliveries);
            d.nack(true).await.unwrap();
        }
        assert_eq!(deliveries, DELIVERY_LIMIT);
        let dead = q.dead_letters(10).await.unwrap();
        assert_eq!((dead.jobs.len(), dead.jobs[0].reason.as_str()), (1, "delivery_limit"));
        assert!(q.publish(&job(3)).await.is_err());
    }
}
