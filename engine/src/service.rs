//! The engine thread. The model owns a thread: async code sends it a command carrying its
//! tracing span and a reply channel, and never blocks the runtime on tensor work.
//!
//! The thread serves requests with continuous batching: every step runs one forward pass
//! over all active sequences (prompt chunks and single generated tokens packed together);
//! new requests join between steps and finished ones leave. Admission is bounded by a
//! number of sequences and by the KV-cache memory the admitted sequences can grow to.

use crate::engine::{Engine, GenerateRequest, Generation, ImageEncoder, ModelInfo, PREFILL_CHUNK};
use crate::scheduler::Active;
use crate::tokenizer::Tokenizer;
use crate::EngineError;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How much the engine thread serves at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceLimits {
    /// Sequences in flight at most.
    pub max_sequences: usize,
    /// KV-cache bytes the admitted sequences may grow to (at their full length); one
    /// sequence is always admitted, whatever its size.
    pub kv_budget_bytes: u64,
    /// Prompt tokens per forward pass, over all sequences (longer prompts are prefilled
    /// in chunks across steps).
    pub prefill_tokens_per_step: usize,
}

/// Default sequences in flight: enough to keep a CPU or a GPU busy with small prompts.
pub const DEFAULT_MAX_SEQUENCES: usize = 64;
/// Default KV budget: 2 GiB.
pub const DEFAULT_KV_BUDGET_BYTES: u64 = 2 << 30;

impl Default for ServiceLimits {
    fn default() -> Self {
        Self {
            max_sequences: DEFAULT_MAX_SEQUENCES,
            kv_budget_bytes: DEFAULT_KV_BUDGET_BYTES,
            prefill_tokens_per_step: PREFILL_CHUNK,
        }
    }
}

type Reply = oneshot::Sender<Result<Generation, EngineError>>;

enum Command {
    /// A request, with its images' rows when they were encoded before it was sent.
    Generate { req: GenerateRequest, rows: Option<candle_core::Tensor>, span: tracing::Span, reply: Reply },
}

/// A request waiting for admission.
type Waiting = (GenerateRequest, Option<candle_core::Tensor>, tracing::Span, Reply);

/// A cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    info: ModelInfo,
    tokenizer: Arc<Tokenizer>,
    busy: Arc<Busy>,
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

struct InFlight {
    seq: Active,
    projected_kv: u64,
    span: tracing::Span,
    reply: Reply,
}

fn serve(mut engine: Engine, rx: mpsc::Receiver<Command>, limits: ServiceLimits, busy: Arc<Busy>) {
    let mut waiting: VecDeque<Waiting> = VecDeque::new();
    let mut flying: Vec<InFlight> = Vec::new();
    let mut parked: Option<InFlight> = None;
    loop {
        if flying.is_empty() && waiting.is_empty() && parked.is_none() {
            match rx.recv() {
                Ok(Command::Generate { req, rows, span, reply }) => waiting.push_back((req, rows, span, reply)),
                Err(_) => return,
            }
        }
        while let Ok(Command::Generate { req, rows, span, reply }) = rx.try_recv() {
            waiting.push_back((req, rows, span, reply));
        }
        // Admit while there is room. A sequence set up but waiting for KV memory is parked
        // with its prompt already tokenized, and admitted first once memory frees up.
        while flying.len() < limits.max_sequences.max(1) {
            let next = match parked.take() {
                Some(p) => p,
                None => {
                    let Some((req, rows, span, reply)) = waiting.pop_front() else { break };
                    let admitted = {
                        let _g = span.enter();
                        busy.during(&busy.step, || engine.admit_encoded(&req, rows))
                    };
                    match admitted {
                        Err(_) if engine.model.broken().is_some() => {
                            // Admission ran the model (a cached prompt prefix) and a rank failed.
                            let _ = reply.send(Err(EngineError::Stopped));
                            stop(&engine, waiting, parked, flying.drain(..).map(|f| f.reply));
                            return;
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                            continue;
                        }
                        Ok(seq) if req.max_new_tokens == 0 => {
                            let _ = reply.send(Ok(seq.into_generation()));
                            continue;
                        }
                        Ok(seq) => InFlight { projected_kv: engine.projected_kv_bytes(&seq), seq, span, reply },
                    }
                }
            };
            let in_use: u64 = flying.iter().map(|f| f.projected_kv).sum();
            if !flying.is_empty() && in_use + next.projected_kv > limits.kv_budget_bytes {
                parked = Some(next);
                break;
            }
            flying.push(next);
        }
        if flying.is_empty() {
            continue;
        }
        let mut seqs: Vec<Active> = Vec::with_capacity(flying.len());
        let mut meta = Vec::with_capacity(flying.len());
        for f in flying.drain(..) {
            seqs.push(f.seq);
            meta.push((f.projected_kv, f.span, f.reply));
        }
        let stepped = {
            let _s = tracing::trace_span!("engine_step", sequences = seqs.len()).entered();
            busy.during(&busy.step, || engine.step(&mut seqs, limits.prefill_tokens_per_step))
        };
        // A failed tensor-parallel rank leaves the model unusable: every request, in flight
        // or waiting, is answered `Stopped` and the thread ends, so that the worker gives its
        // jobs back instead of writing error rows for them.
        if engine.model.broken().is_some() {
            stop(&engine, waiting, parked, meta.into_iter().map(|(_, _, reply)| reply));
            return;
        }
        for (seq, (projected_kv, span, reply)) in seqs.into_iter().zip(meta) {
            match &stepped {
                Err(e) => {
                    let _ = reply.send(Err(EngineError::Compute(e.to_string())));
                }
                Ok(()) if seq.is_done() => {
                    // The caller may have gone away; nothing to do then.
                    let _ = reply.send(Ok(seq.into_generation()));
                }
                Ok(()) => flying.push(InFlight { seq, projected_kv, span, reply }),
            }
        }
    }
}

/// Answers every request in hand `Stopped` after a tensor-parallel rank failed.
fn stop(engine: &Engine, waiting: VecDeque<Waiting>, parked: Option<InFlight>, in_flight: impl Iterator<Item = Reply>) {
    let why = engine.model.broken().unwrap_or_default();
    tracing::error!(reason = %why, "a tensor-parallel rank failed; the engine stops");
    let replies = in_flight.chain(parked.map(|p| p.reply)).chain(waiting.into_iter().map(|(_, _, _, r)| r));
    for reply in replies {
        let _ = reply.send(Err(EngineError::Stopped));
    }
}

impl EngineHandle {
    /// Moves `engine` onto its own thread and returns a handle to it. The thread ends when
    /// every handle is dropped.
    pub fn spawn(engine: Engine) -> Self {
        Self::spawn_with(engine, ServiceLimits::default())
    }

    pub fn spawn_with(engine: Engine, limits: ServiceLimits) -> Self {
        let info = engine.info.clone();
        let tokenizer = engine.tokenizer.clone();
        let encoder = engine.image_encoder();
        let (tx, rx) = mpsc::channel::<Command>();
        let busy = Arc::new(Busy { epoch: Instant::now(), step: AtomicU64::new(0), encoding: AtomicU64::new(0) });
        let thread_busy = busy.clone();
        std::thread::Builder::new()
            .name("medbatch-engine".into())
            .spawn(move || serve(engine, rx, limits, thread_busy))
            .expect("spawn engine thread");
        Self { tx, info, tokenizer, busy, encoder, encoding: Arc::new(tokio::sync::Mutex::new(())) }
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
        let rows = match &self.encoder {
            Some(encoder) if !req.images.is_empty() => {
                let _one_at_a_time = self.encoding.lock().await;
                let (encoder, images, busy, span) =
                    (encoder.clone(), req.images.clone(), self.busy.clone(), span.clone());
                let rows = tokio::task::spawn_blocking(move || {
                    let _g = span.enter();
                    busy.during(&busy.encoding, || encoder.encode(&images))
                })
                .await
                .map_err(|e| EngineError::Compute(format!("image encoding: {e}")))??;
                Some(rows)
            }
            _ => None,
        };
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Generate { req, rows, span, reply }).map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }
}
