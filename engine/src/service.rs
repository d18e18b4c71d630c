//! The engine thread. The model owns a thread: async code sends it a command carrying its
//! tracing span and a reply channel, and never blocks the runtime on tensor work.
//!
//! The thread serves requests with continuous batching ([`crate::scheduler`]): every step
//! runs one forward pass over all active sequences (prompt chunks and single generated tokens
//! packed together); new requests join between steps while the KV pool has room, finished
//! ones leave, and when the pool runs dry the newest sequence is preempted and recomputed
//! later.

use crate::engine::{EncodedImages, Engine, GenerateRequest, Generation, ImageEncoder, ModelInfo, PREFILL_CHUNK};
use crate::kv::{KvLayout, KvStats};
use crate::models::gemma3::KvConfig;
use crate::scheduler::{DecodeStats, Finished, Scheduler, SchedulerLimits};
use crate::tokenizer::Tokenizer;
use crate::EngineError;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How much the engine thread serves at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceLimits {
    /// Sequences in flight at most.
    pub max_sequences: usize,
    /// Bytes of keys and values per rank (the paged KV pool); `None`: the model's default
    /// (2 GiB on the CPU, most of a GPU's free memory).
    pub kv_memory: Option<u64>,
    /// Prompt tokens per forward pass, over all sequences (longer prompts are prefilled
    /// in chunks across steps).
    pub prefill_tokens_per_step: usize,
}

/// Default sequences in flight: enough to keep a CPU or a GPU busy with small prompts.
pub const DEFAULT_MAX_SEQUENCES: usize = 64;

impl Default for ServiceLimits {
    fn default() -> Self {
        Self { max_sequences: DEFAULT_MAX_SEQUENCES, kv_memory: None, prefill_tokens_per_step: PREFILL_CHUNK }
    }
}

/// What the engine thread has done so far, for progress and metrics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineStats {
    pub decode: DecodeStats,
    pub kv_layout: Option<KvLayout>,
    pub kv: KvStats,
    /// Sequences in flight and waiting after the last step.
    pub running: usize,
    pub waiting: usize,
    /// Over every step: pages held by sequences in flight, and sequences in flight (their
    /// ratio is the KV a sequence in flight costs, shared pages counted once).
    pub pages_in_flight_sum: u64,
    pub sequences_in_flight_sum: u64,
}

impl EngineStats {
    /// Token rows per forward pass, on average.
    pub fn tokens_per_step(&self) -> f64 {
        self.decode.rows as f64 / self.decode.passes.max(1) as f64
    }

    /// KV bytes per sequence in flight, on average over the steps (each rank's share summed).
    pub fn kv_bytes_per_sequence(&self) -> f64 {
        let page = self.kv_layout.as_ref().map(|l| l.page_bytes).unwrap_or(0) as f64;
        page * self.pages_in_flight_sum as f64 / self.sequences_in_flight_sum.max(1) as f64
    }

    /// Prompt tokens whose keys and values came from the prefix cache, over all prompt
    /// tokens looked up.
    pub fn prefix_hit_rate(&self) -> f64 {
        self.kv.hit_tokens as f64 / self.kv.lookup_tokens.max(1) as f64
    }
}

type Reply = oneshot::Sender<Result<Generation, EngineError>>;

enum Command {
    /// A request, with its images' rows when they were encoded before it was sent.
    Generate { req: GenerateRequest, images: Option<EncodedImages>, span: tracing::Span, reply: Reply },
}

/// A cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    info: ModelInfo,
    tokenizer: Arc<Tokenizer>,
    busy: Arc<Busy>,
    stats: Arc<Mutex<EngineStats>>,
    /// Images are encoded here, one request at a time, off the engine thread.
    encoder: Option<ImageEncoder>,
    encoding: Arc<tokio::sync::Mutex<()>>,
}

/// When the current calls into the model began (the engine thread's admission or step, and
/// an image encoding), so that a watchdog can tell a long call from a hung device.
struct Busy {
    epoch: Instant,
    /// Microseconds after `epoch` plus one when the engine thread's call began; 0 between
    /// calls.
    step: AtomicU64,
    /// The same for the image encoding under way.
    encoding: AtomicU64,
}

impl Busy {
    /// Runs `f` with `slot` marking when it began.
    fn during<R>(&self, slot: &AtomicU64, f: impl FnOnce() -> R) -> R {
        slot.store(self.epoch.elapsed().as_micros() as u64 + 1, Ordering::Relaxed);
        let r = f();
        slot.store(0, Ordering::Relaxed);
        r
    }

    /// How long the older of the calls under way has lasted.
    fn longest(&self) -> Option<Duration> {
        let now = self.epoch.elapsed();
        [&self.step, &self.encoding]
            .iter()
            .filter_map(|slot| match slot.load(Ordering::Relaxed) {
                0 => None,
                t => Some(now.saturating_sub(Duration::from_micros(t - 1))),
            })
            .max()
    }
}

fn reply_all(done: Vec<Finished<Reply>>) {
    for f in done {
        // The caller may have gone away; nothing to do then.
        let _ = f.tag.send(f.result);
    }
}

/// Answers every request in hand `Stopped` after a tensor-parallel rank failed.
fn stop(engine: &Engine, sched: &mut Scheduler<Reply>, done: Vec<Finished<Reply>>) {
    let why = engine.model.broken().unwrap_or_default();
    tracing::error!(reason = %why, "a tensor-parallel rank failed; the engine stops");
    for reply in done.into_iter().map(|f| f.tag).chain(sched.drain()) {
        let _ = reply.send(Err(EngineError::Stopped));
    }
}

fn serve(
    mut engine: Engine,
    rx: mpsc::Receiver<Command>,
    limits: ServiceLimits,
    busy: Arc<Busy>,
    stats: Arc<Mutex<EngineStats>>,
) {
    let mut sched: Scheduler<Reply> = Scheduler::new(SchedulerLimits {
        max_sequences: limits.max_sequences.max(1),
        prefill_tokens_per_step: limits.prefill_tokens_per_step,
    });
    let layout = engine.model.kv_stats().ok().map(|(l, _)| l);
    let mut seen = Seen::default();
    loop {
        if sched.is_empty() {
            match rx.recv() {
                Ok(Command::Generate { req, images, span, reply }) => sched.push(req, images, span, reply),
                Err(_) => return,
            }
        }
        while let Ok(Command::Generate { req, images, span, reply }) = rx.try_recv() {
            sched.push(req, images, span, reply);
        }
        // A failed tensor-parallel rank leaves the model unusable: every request, in flight
        // or waiting, is answered `Stopped` and the thread ends, so that the worker gives its
        // jobs back instead of writing error rows for them.
        if engine.model.broken().is_some() {
            stop(&engine, &mut sched, Vec::new());
            return;
        }
        let admitted = busy.during(&busy.step, || sched.admit(&mut engine));
        reply_all(admitted);
        let done = busy.during(&busy.step, || sched.step(&mut engine));
        if engine.model.broken().is_some() {
            stop(&engine, &mut sched, done);
            return;
        }
        reply_all(done);
        let kv = engine.model.kv_stats().map(|(_, s)| s).unwrap_or_default();
        let mut st = stats.lock().unwrap_or_else(|e| e.into_inner());
        if sched.running() > 0 {
            st.pages_in_flight_sum += (kv.pages_used - kv.pages_cached_idle) as u64;
            st.sequences_in_flight_sum += sched.running() as u64;
        }
        st.decode = engine.stats;
        st.kv_layout = layout.clone();
        st.kv = kv;
        st.running = sched.running();
        st.waiting = sched.waiting();
        seen.record(&st);
    }
}

/// The engine's counters as last recorded to the metrics (each step adds what changed).
#[derive(Default)]
struct Seen {
    decode: DecodeStats,
    kv: KvStats,
}

impl Seen {
    /// Records one step to the metrics: its time and token rows, the sequences in flight and
    /// waiting, the KV pages used and free, and the prefix cache's lookups and hits.
    fn record(&mut self, st: &EngineStats) {
        let (d, p) = (&st.decode, &self.decode);
        let steps = d.steps.saturating_sub(p.steps);
        if steps > 0 {
            let seconds = d.step_ns.saturating_sub(p.step_ns) as f64 / 1e9 / steps as f64;
            metrics::histogram!("medbatch_engine_step_seconds").record(seconds);
        }
        let passes = d.passes.saturating_sub(p.passes);
        if passes > 0 {
            let rows = d.rows.saturating_sub(p.rows) as f64 / passes as f64;
            metrics::histogram!("medbatch_engine_step_tokens").record(rows);
        }
        metrics::counter!("medbatch_engine_preemptions_total").increment(d.preemptions.saturating_sub(p.preemptions));
        let kv = &st.kv;
        metrics::counter!("medbatch_prefix_cache_queries_total")
            .increment(kv.lookup_tokens.saturating_sub(self.kv.lookup_tokens));
        metrics::counter!("medbatch_prefix_cache_hits_total")
            .increment(kv.hit_tokens.saturating_sub(self.kv.hit_tokens));
        metrics::gauge!("medbatch_kv_blocks_used").set(kv.pages_used as f64);
        metrics::gauge!("medbatch_kv_blocks_free").set(kv.pages.saturating_sub(kv.pages_used) as f64);
        metrics::gauge!("medbatch_engine_sequences_running").set(st.running as f64);
        metrics::gauge!("medbatch_engine_sequences_waiting").set(st.waiting as f64);
        self.decode = *d;
        self.kv = *kv;
    }
}

impl EngineHandle {
    /// Moves `engine` onto its own thread and returns a handle to it. The thread ends when
    /// every handle is dropped.
    pub fn spawn(engine: Engine) -> Self {
        Self::spawn_with(engine, ServiceLimits::default())
    }

    /// [`Self::start`], for limits known to fit (tests, benchmarks): panics when the KV cache
    /// cannot be set up.
    pub fn spawn_with(engine: Engine, limits: ServiceLimits) -> Self {
        Self::start(engine, limits).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Sets up the model's KV cache as `limits` ask and moves `engine` onto its own thread.
    /// The thread ends when every handle is dropped.
    pub fn start(engine: Engine, limits: ServiceLimits) -> Result<Self, EngineError> {
        engine
            .model
            .configure_kv(KvConfig { memory: limits.kv_memory })
            .map_err(|e| EngineError::Load(e.to_string()))?;
        let info = engine.info.clone();
        let tokenizer = engine.tokenizer.clone();
        let encoder = engine.image_encoder();
        let (tx, rx) = mpsc::channel::<Command>();
        let busy = Arc::new(Busy { epoch: Instant::now(), step: AtomicU64::new(0), encoding: AtomicU64::new(0) });
        let stats = Arc::new(Mutex::new(EngineStats::default()));
        let (thread_busy, thread_stats) = (busy.clone(), stats.clone());
        std::thread::Builder::new()
            .name("medbatch-engine".into())
            .spawn(move || serve(engine, rx, limits, thread_busy, thread_stats))
            .map_err(|e| EngineError::Load(format!("engine thread: {e}")))?;
        Ok(Self { tx, info, tokenizer, busy, stats, encoder, encoding: Arc::new(tokio::sync::Mutex::new(())) })
    }

    /// What the engine thread has done so far (as of its last step).
    pub fn stats(&self) -> EngineStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// How long the current call into the model has lasted (the engine thread admitting a
    /// request or running one forward step over every sequence in flight, or an image
    /// encoding; the older one); `None` between calls. A call that never ends means a hung
    /// device or rank.
    pub fn busy_for(&self) -> Option<Duration> {
        self.busy.longest()
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The model's tokenizer, to measure text in tokens without a round trip to the engine.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Generates on the engine thread, batched with whatever else is in flight. A request's
    /// images are encoded first, on a blocking thread of the runtime (one request's images at
    /// a time), while the engine thread goes on stepping the other sequences.
    pub async fn generate(&self, req: GenerateRequest) -> Result<Generation, EngineError> {
        let span = tracing::Span::current();
        let images = match &self.encoder {
            Some(encoder) if !req.images.is_empty() => {
                let _one_at_a_time = self.encoding.lock().await;
                let (encoder, images, busy, span) =
                    (encoder.clone(), req.images.clone(), self.busy.clone(), span.clone());
                let rows = tokio::task::spawn_blocking(move || {
                    let _g = span.enter();
                    busy.during(&busy.encoding, || encoder.encode_with_keys(&images))
                })
                .await
                .map_err(|e| EngineError::Compute(format!("image encoding: {e}")))??;
                Some(rows)
            }
            _ => None,
        };
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Generate { req, images, span, reply }).map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }
}
