//! Following a published run to its end: poll the completion markers, commit the run once
//! every planned job has one, and stop waiting when the jobs left are all dead-lettered (no
//! worker will finish them). Workers may be anywhere; only the output store and the queue
//! are looked at.

use crate::commit::{commit_run_with, read_markers, MarkersRead};
use crate::plan::PlannedRun;
use crate::CoordinatorError;
use medbatch_connectors::queue::{DeadJob, JobQueue};
use medbatch_connectors::store::ObjectStore;
use medbatch_schemas::tables::{done_key, done_prefix};
use medbatch_schemas::Manifest;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// Dead-lettered messages looked at to find a run's jobs.
pub const DEAD_LETTER_SCAN: usize = 10_000;

/// How a run is followed.
#[derive(Clone, Debug)]
pub struct FollowConfig {
    /// The longest time between two listings of the completion markers.
    pub poll: Duration,
    /// The shortest. Between the two, the time between listings is ten times what the last
    /// listing took: a small run's end is seen at once, and following a large run keeps its
    /// store busy a tenth of the time at most.
    pub min_poll: Duration,
    /// Time between two looks at the dead-lettered jobs.
    pub dead_letter_interval: Duration,
    /// Dead-lettered messages looked at each time (of every run).
    pub dead_letter_scan: usize,
    /// Consecutive failed reads of the output waited out (one poll apart) before giving up:
    /// a storage hiccup does not end following, a store unreachable for minutes does. Failed
    /// commits (every marker listed, the commit failing or finding a marker unreadable) are
    /// counted on their own, and a successful listing does not reset them: a commit that
    /// fails the same way every time ends following with its reason instead of retrying forever.
    pub store_failures_tolerated: u32,
}

impl Default for FollowConfig {
    fn default() -> Self {
        Self {
            poll: Duration::from_secs(1),
            min_poll: Duration::from_millis(50),
            dead_letter_interval: Duration::from_secs(5),
            dead_letter_scan: DEAD_LETTER_SCAN,
            store_failures_tolerated: 90,
        }
    }
}

impl FollowConfig {
    /// The time to the next listing, after one that took `listing`; sooner when the jobs
    /// finishing since the listing before, at their pace, would all be done by then (`eta`):
    /// the run's end is seen when it comes rather than up to a poll later. A listing that
    /// found no new marker gives no `eta`, so a run whose last jobs are long does not make
    /// the follower list faster.
    fn next_poll(&self, listing: Duration, eta: Option<Duration>) -> Duration {
        let paced = (listing * 10).clamp(self.min_poll, self.poll.max(self.min_poll));
        match eta {
            Some(eta) => paced.min(eta.max(self.min_poll)),
            None => paced,
        }
    }
}

/// When the jobs left would be done, at the pace of those done between two listings
/// (`before`: the earlier listing's time and jobs done); `None` without progress.
fn estimated_end(before: Option<(Instant, u64)>, done: u64, planned: u64) -> Option<Duration> {
    let (at, done_then) = before?;
    let seconds = at.elapsed().as_secs_f64();
    if done <= done_then || seconds <= 0.0 {
        return None;
    }
    let rate = (done - done_then) as f64 / seconds;
    Some(Duration::from_secs_f64(planned.saturating_sub(done) as f64 / rate))
}

/// How following a run ended.
#[derive(Debug)]
pub enum Followed {
    /// Every job done; the run is committed.
    Committed(Box<Manifest>),
    /// Every job not done is dead-lettered (listed by job id); the others are done. The run
    /// is not committed: once the cause is fixed, publishing the run again finishes it.
    DeadLettered(Vec<DeadJob>),
}

/// Follows `plan` until it is committed or its unfinished jobs are all dead-lettered.
/// `on_done` is called with the number of jobs done after each poll (for progress); `stage`
/// runs at commit ([`commit_run`]).
pub async fn follow_and_commit(
    plan: &PlannedRun,
    store: &dyn ObjectStore,
    queue: &dyn JobQueue,
    cfg: &FollowConfig,
    on_done: &mut (dyn FnMut(u64) + Send),
    stage: Option<&dyn crate::commit::RunStage>,
) -> Result<Followed, CoordinatorError> {
    // One listing of the markers per poll (not a request per job). The markers that appear
    // are read as they do, a poll's new ones at a time, so that the commit has only the last
    // few to read. Each planned job's marker key, and the job it marks:
    let job_of_marker: HashMap<String, &str> =
        plan.jobs.iter().map(|j| (done_key(&j.run_id, &j.job_id), j.job_id.as_str())).collect();
    let planned = plan.jobs.len() as u64;
    let mut known = MarkersRead::new();
    let mut store_failures = 0u32;
    let mut commit_failures = 0u32;
    let mut dead_letters_seen = Instant::now();
    let mut last_listing: Option<(Instant, u64)> = None;
    loop {
        let listing = Instant::now();
        let listed = match store.list(&done_prefix(&plan.run_id)).await {
            Ok(l) => {
                store_failures = 0;
                l
            }
            Err(e) if store_failures < cfg.store_failures_tolerated => {
                store_failures += 1;
                tracing::warn!(error = %e, "reading the completion markers failed; trying again");
                tokio::time::sleep(cfg.poll).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let listing = listing.elapsed();
        let done_jobs: HashSet<&str> = listed.iter().filter_map(|k| job_of_marker.get(k).copied()).collect();
        let done = done_jobs.len() as u64;
        on_done(done);
        let eta = estimated_end(last_listing, done, planned);
        last_listing = Some((Instant::now(), done));
        if done == planned {
            let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            match commit_run_with(plan, store, &now, stage, &mut known).await {
                Ok(Some(m)) => return Ok(Followed::Committed(Box::new(m))),
                // A marker listed but not yet readable: look again, a bounded number of times.
                Ok(None) if commit_failures < cfg.store_failures_tolerated => {
                    commit_failures += 1;
                    tracing::warn!(
                        attempt = commit_failures,
                        "every completion marker is listed but not every one could be read; trying again"
                    );
                }
                Ok(None) => {
                    return Err(CoordinatorError::Stalled {
                        run_id: plan.run_id.to_string(),
                        reason: format!(
                            "every completion marker is listed, but {} reads in a row found one missing",
                            commit_failures + 1
                        ),
                    })
                }
                Err(e) if commit_failures < cfg.store_failures_tolerated => {
                    commit_failures += 1;
                    tracing::warn!(error = %e, attempt = commit_failures, "committing the run failed; trying again");
                }
                Err(e) => return Err(e),
            }
        } else {
            let new: Vec<String> =
                listed.into_iter().filter(|k| job_of_marker.contains_key(k) && !known.contains_key(k)).collect();
            // A marker that cannot be read now is read again by the commit, which reports it.
            if let Err(e) = read_markers(store, &new, &mut known).await {
                tracing::debug!(error = %e, "a completion marker could not be read yet");
            }
            if dead_letters_seen.elapsed() >= cfg.dead_letter_interval {
                dead_letters_seen = Instant::now();
                // When every job left is dead-lettered, no worker will finish them.
                match queue.dead_letters(cfg.dead_letter_scan).await {
                    Ok(d) => {
                        let dead: Vec<DeadJob> = d
                            .of_run(plan.run_id.as_str())
                            .into_iter()
                            .filter(|j| !done_jobs.contains(j.job_id.as_str()))
                            .collect();
                        if !dead.is_empty() && done + dead.len() as u64 >= planned {
                            return Ok(Followed::DeadLettered(dead));
                        }
                    }
                    // The broker away for a moment: the run goes on; look again later.
                    Err(e) => tracing::warn!(error = %e, "could not look at the dead-lettered jobs"),
                }
            }
        }
        tokio::time::sleep(cfg.next_poll(listing, eta)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{plan_run, publish_pending, PlanConfig};
    use medbatch_connectors::queue::InProcessQueue;
    use medbatch_connectors::store::LocalStore;
    use medbatch_schemas::{Completion, Digest, ModelRef, PipelineRef, RunId, JOB_SCHEMA_VERSION};

    fn plan(dir: &std::path::Path, run: &str) -> PlannedRun {
        for f in ["a.txt", "b.txt", "c.txt"] {
            std::fs::write(dir.join(f), f).unwrap();
        }
        plan_run(&PlanConfig {
            run_id: RunId::new(run).unwrap(),
            pipeline: PipelineRef { name: "p".into(), version: "1".into(), digest: Digest::of_bytes(b"p") },
            model: ModelRef { id: "m".into(), digest: Digest::of_bytes(b"m") },
            output: "/out".into(),
            inputs: vec![dir.to_str().unwrap().into()],
            source: medbatch_connectors::inputs::InputSource::local(),
            imaging: None,
        })
        .unwrap()
    }

    fn fast() -> FollowConfig {
        FollowConfig {
            poll: Duration::from_millis(5),
            min_poll: Duration::from_millis(1),
            dead_letter_interval: Duration::from_millis(10),
            ..FollowConfig::default()
        }
    }

    /// A worker's part of the bargain: the marker of a job (no parts).
    async fn finish(store: &LocalStore, plan: &PlannedRun, i: usize) {
        let c = Completion {
            schema_version: JOB_SCHEMA_VERSION,
            run_id: plan.run_id.clone(),
            job_id: plan.jobs[i].job_id.clone(),
            parts: Vec::new(),
            documents_ok: 1,
            documents_failed: 0,
            error_rows: 0,
            tokens_in: 0,
            tokens_out: 0,
            engine_ms: 0,
            set_aside: Default::default(),
            wall_ms: 0,
            worker_id: "w".into(),
            finished_at: "2026-01-01T00:00:00Z".into(),
        };
        store.put(&done_key(&c.run_id, &c.job_id), serde_json::to_vec(&c).unwrap().into()).await.unwrap();
    }

    /// Workers finishing the plan's jobs one by one, 20 ms apart.
    fn finish_one_by_one(store: &LocalStore, plan: &PlannedRun) -> tokio::task::JoinHandle<()> {
        let (s, p) = (store.clone(), plan.clone());
        tokio::spawn(async move {
            for i in 0..p.jobs.len() {
                tokio::time::sleep(Duration::from_millis(20)).await;
                finish(&s, &p, i).await;
            }
        })
    }

    #[tokio::test]
    async fn commits_once_every_job_is_done() {
        let (d, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let store = LocalStore::create(out.path()).unwrap();
        let plan = plan(d.path(), "r1");
        let queue = InProcessQueue::new();
        publish_pending(&plan, &store, &queue).await.unwrap();
        // Jobs finish one by one while the run is followed.
        let workers = finish_one_by_one(&store, &plan);
        let mut seen = Vec::new();
        let followed = follow_and_commit(&plan, &store, &queue, &fast(), &mut |n| seen.push(n), None).await.unwrap();
        workers.await.unwrap();
        let Followed::Committed(m) = followed else { panic!("{followed:?}") };
        assert_eq!((m.jobs, m.run_id.as_str()), (plan.jobs.len() as u64, "r1"));
        assert!(store.exists(&medbatch_schemas::tables::success_key(&plan.run_id)).await.unwrap());
        assert!(seen.windows(2).all(|w| w[0] <= w[1]) && seen.last() == Some(&(plan.jobs.len() as u64)), "{seen:?}");
    }

    /// A store that counts reads of each key.
    struct CountingStore {
        inner: LocalStore,
        gets: std::sync::Mutex<HashMap<String, u32>>,
    }

    #[async_trait::async_trait]
    impl ObjectStore for CountingStore {
        fn location(&self) -> String {
            self.inner.location()
        }
        async fn put(&self, key: &str, bytes: bytes::Bytes) -> Result<(), medbatch_connectors::store::StoreError> {
            self.inner.put(key, bytes).await
        }
        async fn put_if_absent(
            &self,
            key: &str,
            bytes: bytes::Bytes,
        ) -> Result<bool, medbatch_connectors::store::StoreError> {
            self.inner.put_if_absent(key, bytes).await
        }
        async fn get(&self, key: &str) -> Result<Option<bytes::Bytes>, medbatch_connectors::store::StoreError> {
            *self.gets.lock().unwrap().entry(key.to_string()).or_insert(0) += 1;
            self.inner.get(key).await
        }
        async fn exists(&self, key: &str) -> Result<bool, medbatch_connectors::store::StoreError> {
            self.inner.exists(key).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<String>, medbatch_connectors::store::StoreError> {
            self.inner.list(prefix).await
        }
        async fn delete(&self, key: &str) -> Result<(), medbatch_connectors::store::StoreError> {
            self.inner.delete(key).await
        }
    }

    #[tokio::test]
    async fn each_marker_is_read_once_while_following_and_committing() {
        let (d, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let store = LocalStore::create(out.path()).unwrap();
        let plan = plan(d.path(), "r4");
        let queue = InProcessQueue::new();
        publish_pending(&plan, &store, &queue).await.unwrap();
        let counting = CountingStore { inner: store.clone(), gets: Default::default() };
        let workers = finish_one_by_one(&store, &plan);
        let followed = follow_and_commit(&plan, &counting, &queue, &fast(), &mut |_| {}, None).await.unwrap();
        workers.await.unwrap();
        let Followed::Committed(m) = followed else { panic!("{followed:?}") };
        assert_eq!(m.jobs, plan.jobs.len() as u64);
        let gets = counting.gets.lock().unwrap();
        for job in &plan.jobs {
            assert_eq!(gets.get(&done_key(&job.run_id, &job.job_id)), Some(&1), "{gets:?}");
        }
    }

    #[test]
    fn the_poll_follows_the_listing_time_within_its_bounds() {
        let cfg = FollowConfig::default();
        assert_eq!(cfg.next_poll(Duration::from_millis(1), None), cfg.min_poll);
        assert_eq!(cfg.next_poll(Duration::from_millis(20), None), Duration::from_millis(200));
        assert_eq!(cfg.next_poll(Duration::from_secs(3), None), cfg.poll);
        // The jobs left due sooner than the next listing: the listing comes when they are.
        assert_eq!(cfg.next_poll(Duration::from_secs(3), Some(Duration::from_millis(300))), Duration::from_millis(300));
        assert_eq!(cfg.next_poll(Duration::from_secs(3), Some(Duration::ZERO)), cfg.min_poll);
        assert_eq!(cfg.next_poll(Duration::from_millis(20), Some(Duration::from_secs(60))), Duration::from_millis(200));
    }

    #[test]
    fn the_end_is_estimated_from_the_pace_between_listings() {
        assert_eq!(estimated_end(None, 10, 100), None);
        let before = Instant::now() - Duration::from_secs(1);
        // No job done since the listing before: no estimate.
        assert_eq!(estimated_end(Some((before, 10)), 10, 100), None);
        // 50 jobs a second, 40 left: about 0.8 s.
        let eta = estimated_end(Some((before, 10)), 60, 100).unwrap();
        assert!(eta >= Duration::from_millis(700) && eta <= Duration::from_millis(900), "{eta:?}");
        assert_eq!(estimated_end(Some((before, 10)), 100, 100), Some(Duration::ZERO));
    }

    #[tokio::test]
    async fn a_commit_failing_every_time_ends_following_with_its_reason() {
        let (d, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let store = LocalStore::create(out.path()).unwrap();
        let plan = plan(d.path(), "r3");
        let queue = InProcessQueue::new();
        for i in 1..plan.jobs.len() {
            finish(&store, &plan, i).await;
        }
        // The first job's marker is there (listed) but is not a completion: every commit fails.
        let bad = done_key(&plan.run_id, &plan.jobs[0].job_id);
        store.put(&bad, bytes::Bytes::from_static(b"not json")).await.unwrap();
        let cfg = FollowConfig { poll: Duration::from_millis(1), store_failures_tolerated: 3, ..fast() };
        let err = follow_and_commit(&plan, &store, &queue, &cfg, &mut |_| {}, None).await.unwrap_err();
        assert!(matches!(&err, CoordinatorError::Corrupt { key, .. } if *key == bad), "{err}");
        assert!(!store.exists(&medbatch_schemas::tables::manifest_key(&plan.run_id)).await.unwrap());
    }

    #[tokio::test]
    async fn stops_when_every_job_left_is_dead_lettered() {
        let (d, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let store = LocalStore::create(out.path()).unwrap();
        let plan = plan(d.path(), "r2");
        assert!(plan.jobs.len() >= 2, "{}", plan.jobs.len());
        let queue = InProcessQueue::new();
        publish_pending(&plan, &store, &queue).await.unwrap();
        queue.close();
        // The first job is rejected by a worker (dead-lettered at once), the others done.
        let first = queue.next().await.unwrap().unwrap();
        let dead_id = first.job.job_id.to_string();
        first.nack(false).await.unwrap();
        while let Some(d) = queue.next().await.unwrap() {
            let i = plan.jobs.iter().position(|j| j.job_id == d.job.job_id).unwrap();
            finish(&store, &plan, i).await;
            d.ack().await.unwrap();
        }
        let followed = follow_and_commit(&plan, &store, &queue, &fast(), &mut |_| {}, None).await.unwrap();
        let Followed::DeadLettered(dead) = followed else { panic!("{followed:?}") };
        assert_eq!(dead, vec![DeadJob { run_id: "r2".into(), job_id: dead_id, reason: "rejected".into() }]);
        assert!(!store.exists(&medbatch_schemas::tables::manifest_key(&plan.run_id)).await.unwrap());
    }
}
