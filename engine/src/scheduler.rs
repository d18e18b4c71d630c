//! Admission and step planning.
//!
//! - A request becomes a sequence ([`Active`]): tokenized, its grammar compiled, and its
//!   longest cached prompt prefix adopted from the paged KV cache (few-shot examples,
//!   instructions and system prompts shared by many requests are computed once, without
//!   anyone asking).
//! - Each step ([`Engine::step`]) advances every sequence in flight by one forward pass — a
//!   prompt chunk (prompt tokens of all sequences together within a budget) or one
//!   generated token — and picks every sequence's next token at once.
//! - The [`Scheduler`] admits waiting requests while the KV pool has room for their prompt
//!   and a growth allowance, and when the pool runs dry mid-flight it preempts the newest
//!   sequence: its pages go back, and it is recomputed from its tokens when room returns
//!   (reusing whatever of it is still cached). Every row is computed the same whatever
//!   shares its pass, so a preempted sequence produces exactly the tokens it would have.

use crate::constrain::SeqMatcher;
use crate::engine::{EncodedImages, Engine, Finish, GenerateRequest, Generation, PREFILL_CHUNK};
use crate::kv::{ImageKey, SeqCache};
use crate::models::gemma3::BatchItem;
use crate::models::gemma3::Logits;
use crate::sampling::{pick, SplitMix64};
use crate::EngineError;
use candle_core::Tensor;
use std::collections::VecDeque;
use std::time::Instant;

/// Counters of the decoding loop, for benchmarks and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeStats {
    /// Forward passes that produced at least one sampled token.
    pub steps: u64,
    /// Wall time of those passes, including sampling and masks.
    pub step_ns: u64,
    /// Grammar masks computed (one per constrained sequence per token).
    pub masks: u64,
    /// Time spent computing and applying them.
    pub mask_ns: u64,
    /// Forward passes of any kind, and the token rows they carried.
    pub passes: u64,
    pub rows: u64,
    /// Sequences preempted because the KV pool ran dry.
    pub preemptions: u64,
    /// Prompt chunks put off a step because another sequence of the pass was computing the
    /// same prefix (they adopt it from the prefix cache instead).
    pub deferred: u64,
}

/// Why a step could not run.
pub(crate) enum StepError {
    /// Sequence `index` needs pages the pool does not have.
    OutOfPages {
        index: usize,
        needed: usize,
        available: usize,
    },
    Engine(EngineError),
}

impl From<EngineError> for StepError {
    fn from(e: EngineError) -> Self {
        Self::Engine(e)
    }
}

impl From<candle_core::Error> for StepError {
    fn from(e: candle_core::Error) -> Self {
        Self::Engine(e.into())
    }
}

/// A sequence being served: its tokens (prompt, then generated), its place in the KV cache
/// and its output so far.
pub struct Active {
    pub req: GenerateRequest,
    /// The prompt's tokens followed by those generated.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Rows for the prompt's image soft tokens, and the images' keys; kept while the
    /// sequence may have to be recomputed.
    image_rows: Option<Tensor>,
    image_keys: Vec<ImageKey>,
    /// Prompt tokens adopted from the prefix cache when first admitted.
    reused: usize,
    /// `None` while preempted.
    cache: Option<SeqCache>,
    text: String,
    rng: SplitMix64,
    started: Instant,
    pub finish: Option<Finish>,
    matcher: Option<SeqMatcher>,
}

impl Active {
    pub fn is_done(&self) -> bool {
        self.finish.is_some()
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Prompt tokens.
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_len
    }

    /// Pages of the KV cache the sequence holds, and those it alone holds.
    pub fn pages(&self) -> (usize, usize) {
        self.cache.as_ref().map(|c| (c.pages_held(), c.pages_own())).unwrap_or((0, 0))
    }

    fn out(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    pub fn into_generation(self) -> Generation {
        Generation {
            text: self.text,
            ids: self.tokens[self.prompt_len..].to_vec(),
            prompt_tokens: self.prompt_len as u32,
            reused_tokens: self.reused as u32,
            finish: self.finish.unwrap_or(Finish::Length),
            engine_ms: self.started.elapsed().as_millis() as u64,
        }
    }
}

/// The keys identifying images for the prefix cache.
pub fn image_keys(images: &[std::sync::Arc<crate::image::Rgb8>]) -> Vec<ImageKey> {
    images.iter().map(|i| crate::kv::image_key(i.width, i.height, &i.data)).collect()
}

impl Engine {
    /// Tokenizes a request and sets up its sequence (adopting its longest cached prefix).
    pub fn admit(&mut self, req: &GenerateRequest) -> Result<Active, EngineError> {
        self.admit_encoded(req, None)
    }

    /// [`Self::admit`] with the request's images already encoded (by an
    /// [`crate::engine::ImageEncoder`]); `None` encodes them here.
    pub fn admit_encoded(
        &mut self,
        req: &GenerateRequest,
        images: Option<EncodedImages>,
    ) -> Result<Active, EngineError> {
        if req.chat {
            let (prompt, add_bos) = self.chat_prompt(&req.prompt)?;
            let wrapped = GenerateRequest { prompt, chat: false, add_bos, parse_special: true, ..req.clone() };
            return self.admit_encoded(&wrapped, images);
        }
        let ids = self.prompt_ids(req)?;
        let (image_rows, image_keys) = match images {
            Some(e) => (Some(e.rows), e.keys),
            None => (self.encode_images(&req.images)?, image_keys(&req.images)),
        };
        self.admit_prepared(req, ids, image_rows, image_keys)
    }

    /// A sequence for a request whose prompt is given as token ids (the request's text and
    /// images are not read).
    pub fn admit_tokens(&mut self, req: &GenerateRequest, ids: Vec<u32>) -> Result<Active, EngineError> {
        self.admit_prepared(req, ids, None, Vec::new())
    }

    fn admit_prepared(
        &mut self,
        req: &GenerateRequest,
        ids: Vec<u32>,
        image_rows: Option<Tensor>,
        image_keys: Vec<ImageKey>,
    ) -> Result<Active, EngineError> {
        if ids.is_empty() {
            return Err(EngineError::Request("prompt has no tokens".into()));
        }
        let limit = self.model.cfg.max_position_embeddings;
        if ids.len() + req.max_new_tokens as usize > limit {
            return Err(EngineError::Request(format!(
                "prompt of {} tokens plus {} new tokens exceeds the context of {limit}",
                ids.len(),
                req.max_new_tokens
            )));
        }
        let matcher = match &req.grammar {
            Some(g) => Some(self.guidance()?.matcher(g)?),
            None => None,
        };
        let prompt_len = ids.len();
        let mut a = Active {
            rng: SplitMix64::new(req.sampling.seed),
            req: req.clone(),
            tokens: ids,
            prompt_len,
            image_rows,
            image_keys,
            reused: 0,
            cache: None,
            text: String::new(),
            started: Instant::now(),
            finish: None,
            matcher,
        };
        a.reused = self.place(&mut a)?;
        Ok(a)
    }

    /// Gives a sequence without a cache one, adopting the longest cached prefix of its
    /// tokens (all but the last, which must be computed for its logits). Returns the tokens
    /// adopted.
    fn place(&self, a: &mut Active) -> Result<usize, EngineError> {
        let n = a.tokens.len();
        let (cache, reused) = self.model.cache_for(&a.tokens, a.image_keys.clone(), n - 1)?;
        a.cache = Some(cache);
        Ok(reused)
    }

    /// Pages a sequence needs beyond those it holds to be admitted: the rest of its tokens
    /// and a growth allowance of one block per layer.
    pub fn pages_to_admit(&self, a: &Active) -> Result<usize, EngineError> {
        let manager = self.model.kv_manager()?;
        let layout = crate::kv::lock(&manager).layout().clone();
        let len = a.tokens.len() + layout.block.min(a.req.max_new_tokens as usize);
        let held = a.cache.as_ref().map(SeqCache::pages_held).unwrap_or(0);
        Ok(layout.pages_for(len, PREFILL_CHUNK).saturating_sub(held))
    }

    /// Pages that can be handed out now.
    pub fn pages_available(&self) -> Result<usize, EngineError> {
        let manager = self.model.kv_manager()?;
        let available = crate::kv::lock(&manager).available();
        Ok(available)
    }

    /// One step of continuous batching: every active sequence advances by one forward pass
    /// — a prompt chunk (prompt tokens of all sequences together within `token_budget`) or
    /// one generated token. Sequences that finish get their `finish` set.
    pub fn step(&mut self, active: &mut [Active], token_budget: usize) -> Result<(), EngineError> {
        match self.try_step(active, token_budget) {
            Ok(()) => Ok(()),
            Err(StepError::Engine(e)) => Err(e),
            Err(StepError::OutOfPages { needed, available, .. }) => Err(EngineError::Compute(format!(
                "the KV cache is full: {needed} pages needed, {available} available (raise the KV memory)"
            ))),
        }
    }

    pub(crate) fn try_step(&mut self, active: &mut [Active], token_budget: usize) -> Result<(), StepError> {
        let mut budget = token_budget.max(1);
        let soft = self.model.image_token_id;
        // A sequence that has computed nothing of its own yet looks for a longer cached
        // prefix: blocks other sequences have computed since it was placed (sequences
        // admitted together with the same few-shot prefix).
        for a in active.iter_mut() {
            let Some(cache) = a.cache.as_ref() else { continue };
            if a.finish.is_some() || cache.len() != a.reused || a.reused + 1 >= a.tokens.len() {
                continue;
            }
            let n = a.tokens.len();
            if let Some((longer, reused)) =
                self.model.longer_cache_for(&a.tokens, a.image_keys.clone(), n - 1, a.reused)?
            {
                // The old cache (adopted blocks only) gives its references back on drop.
                a.cache = Some(longer);
                a.reused = reused;
            }
        }
        let manager = self.model.kv_manager().map_err(EngineError::from)?;
        let block = crate::kv::lock(&manager).layout().block;
        // (index, from, to): tokens `from..to` of sequence `index` run in this pass.
        let mut plan: Vec<(usize, usize, usize)> = Vec::new();
        for (i, a) in active.iter().enumerate() {
            let Some(cache) = a.cache.as_ref() else { continue };
            if a.finish.is_some() {
                continue;
            }
            let (from, total) = (cache.len(), a.tokens.len());
            if from + 1 == total {
                plan.push((i, from, total));
            } else if from < total && budget > 0 {
                // Another sequence of this pass computes the same next block from the same
                // prefix: this one waits a step and adopts it from the prefix cache then,
                // rather than computing it again.
                let end = from + block;
                let fresh = from == a.reused && a.image_keys.is_empty() && end < total;
                let duplicate = fresh
                    && plan.iter().any(|&(j, fj, tj)| {
                        fj == from && tj >= end && active[j].tokens.get(..end) == a.tokens.get(..end)
                    });
                if duplicate {
                    self.stats.deferred += 1;
                    continue;
                }
                let to = chunk_end(&a.tokens, from, budget, soft);
                budget = budget.saturating_sub(to - from);
                plan.push((i, from, to));
            }
        }
        if plan.is_empty() {
            return Ok(());
        }
        for &(i, _, to) in &plan {
            let cache = active[i].cache.as_mut().expect("planned sequences have caches");
            if let Err(e) = cache.reserve(to) {
                return Err(StepError::OutOfPages { index: i, needed: e.needed, available: e.available });
            }
        }
        let started = Instant::now();
        let mut rows = Vec::with_capacity(plan.len());
        for &(i, from, to) in &plan {
            let a = &active[i];
            rows.push(image_rows(&a.tokens, from, to, soft, a.image_rows.as_ref())?);
        }
        let logits = {
            let mut by_index: Vec<Option<&mut Active>> = active.iter_mut().map(Some).collect();
            let mut items = Vec::with_capacity(plan.len());
            for (k, &(i, from, to)) in plan.iter().enumerate() {
                let a = by_index[i].take().expect("each sequence once");
                let wants = to == a.tokens.len();
                items.push(BatchItem {
                    ids: &a.tokens[from..to],
                    cache: a.cache.as_mut().expect("planned"),
                    logits: if wants { Logits::Last } else { Logits::None },
                    images: rows[k].as_ref(),
                });
            }
            self.model.forward_packed(&mut items)?
        };
        self.stats.passes += 1;
        self.stats.rows += plan.iter().map(|&(_, from, to)| (to - from) as u64).sum::<u64>();
        let sampled: Vec<usize> =
            plan.iter().filter(|&&(i, _, to)| to == active[i].tokens.len()).map(|&(i, _, _)| i).collect();
        let Some(logits) = logits else { return Ok(()) };
        let choices = self.choose(&logits, active, &sampled)?;
        for (&i, choice) in sampled.iter().zip(choices) {
            self.accept(&mut active[i], choice);
        }
        self.stats.steps += 1;
        self.stats.step_ns += started.elapsed().as_nanos() as u64;
        Ok(())
    }

    /// The next token of each sequence of `rows` from its row of `logits` (`[rows, vocab]`),
    /// under its grammar; `None` where the grammar allows nothing.
    ///
    /// On the CPU each row is masked and picked where it lies. On a device the rows stay
    /// there: the grammar masks go over as one bitmask, every greedy row's argmax comes back
    /// in one copy, and only rows that sample at a temperature are copied to the host.
    fn choose(
        &mut self,
        logits: &Tensor,
        active: &mut [Active],
        rows: &[usize],
    ) -> Result<Vec<Option<u32>>, StepError> {
        let t = Instant::now();
        let mut masks = Vec::with_capacity(rows.len());
        for &i in rows {
            masks.push(active[i].matcher.as_mut().map(|m| m.mask()));
        }
        let guidance = self.guidance.get().cloned();
        let constrained = masks.iter().filter(|m| m.is_some()).count() as u64;
        let picks = if logits.device().is_cpu() {
            let table: Vec<Vec<f32>> = logits.to_vec2()?;
            let mut out = Vec::with_capacity(rows.len());
            for ((&i, mut row), mask) in rows.iter().zip(table).zip(masks) {
                let allowed = match (mask, &guidance) {
                    (None, _) => true,
                    (Some(Ok(mask)), Some(g)) => g.apply_mask(&mask, &mut row),
                    _ => false,
                };
                let a = &mut active[i];
                out.push(allowed.then(|| pick(&row, &a.req.sampling, &mut a.rng)));
            }
            out
        } else {
            choose_on_device(logits, active, rows, masks, guidance.as_deref())?
        };
        if constrained > 0 {
            self.stats.masks += constrained;
            self.stats.mask_ns += t.elapsed().as_nanos() as u64;
        }
        Ok(picks)
    }

    /// Takes a sequence's next token (or its grammar's dead end) and checks whether it ends.
    fn accept(&self, a: &mut Active, choice: Option<u32>) {
        let Some(next) = choice else {
            a.finish = Some(Finish::Grammar);
            return;
        };
        if self.stop_ids.contains(&next) {
            a.finish = Some(Finish::Eos);
            return;
        }
        a.tokens.push(next);
        if a.generated() == 1 {
            // From admission to the engine (its waiting queue not counted) to the first token.
            metrics::histogram!("medbatch_time_to_first_token_seconds").record(a.started.elapsed().as_secs_f64());
        }
        a.text = self.tokenizer.decode(a.out(), false);
        let at_length = a.generated() >= a.req.max_new_tokens as usize;
        if let Some(m) = a.matcher.as_mut() {
            if m.consume(next).is_err() {
                a.finish = Some(Finish::Grammar);
            } else if m.is_stopped() {
                a.finish = Some(Finish::Stop);
            } else if at_length {
                a.finish = Some(Finish::Length);
            }
            return;
        }
        if let Some(cut) = a.req.stop.iter().filter_map(|s| a.text.find(s.as_str())).min() {
            a.text.truncate(cut);
            a.finish = Some(Finish::Stop);
        } else if at_length {
            a.finish = Some(Finish::Length);
        }
    }

    /// Serves one request.
    pub fn generate(&mut self, req: &GenerateRequest) -> Result<Generation, EngineError> {
        let mut out = self.generate_batch(std::slice::from_ref(req));
        out.pop().expect("one result")
    }

    /// Serves several requests together with continuous batching; results in order.
    pub fn generate_batch(&mut self, reqs: &[GenerateRequest]) -> Vec<Result<Generation, EngineError>> {
        let mut sched = Scheduler::new(SchedulerLimits { max_sequences: reqs.len().max(1), ..Default::default() });
        for (i, r) in reqs.iter().enumerate() {
            sched.push(r.clone(), None, tracing::Span::current(), i);
        }
        let mut results: Vec<Option<Result<Generation, EngineError>>> = (0..reqs.len()).map(|_| None).collect();
        while !sched.is_empty() {
            for f in sched.admit(self) {
                results[f.tag] = Some(f.result);
            }
            for f in sched.step(self) {
                results[f.tag] = Some(f.result);
            }
        }
        results.into_iter().map(|r| r.expect("every request answered")).collect()
    }
}

/// [`Engine::choose`] where the logits are on a device: one bitmask over for the grammars,
/// one argmax of every row back, and only the rows that sample at a temperature copied.
fn choose_on_device(
    logits: &Tensor,
    active: &mut [Active],
    rows: &[usize],
    masks: Vec<Option<Result<llguidance::toktrie::SimpleVob, EngineError>>>,
    guidance: Option<&crate::constrain::GuidanceFactory>,
) -> Result<Vec<Option<u32>>, StepError> {
    let (n, vocab) = logits.dims2()?;
    let per_row = vocab.div_ceil(8);
    let mut alive = vec![true; n];
    let masked = if masks.iter().any(Option::is_some) {
        let mut bits = vec![0xffu8; n * per_row];
        for (r, mask) in masks.into_iter().enumerate() {
            let row = &mut bits[r * per_row..(r + 1) * per_row];
            match (mask, guidance) {
                (None, _) => {}
                (Some(Ok(m)), Some(g)) => alive[r] = g.mask_bits(&m, row),
                _ => alive[r] = false,
            }
        }
        crate::sampling::apply_bitmask(logits, &bits)?
    } else {
        logits.clone()
    };
    let greedy = crate::sampling::argmax_rows(&masked)?;
    let sampled: Vec<usize> = (0..n).filter(|&r| alive[r] && !active[rows[r]].req.sampling.is_greedy()).collect();
    let mut out: Vec<Option<u32>> = (0..n).map(|r| alive[r].then_some(greedy[r])).collect();
    if !sampled.is_empty() {
        let idx: Vec<u32> = sampled.iter().map(|&r| r as u32).collect();
        let host: Vec<Vec<f32>> = masked
            .index_select(&Tensor::new(idx.as_slice(), logits.device())?, 0)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec2()?;
        for (&r, row) in sampled.iter().zip(host) {
            let a = &mut active[rows[r]];
            out[r] = Some(pick(&row, &a.req.sampling, &mut a.rng));
        }
    }
    Ok(out)
}

/// How much a scheduler serves at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedulerLimits {
    /// Sequences in flight at most.
    pub max_sequences: usize,
    /// Prompt tokens per forward pass, over all sequences (longer prompts are prefilled in
    /// chunks across steps).
    pub prefill_tokens_per_step: usize,
}

impl Default for SchedulerLimits {
    fn default() -> Self {
        Self { max_sequences: 64, prefill_tokens_per_step: PREFILL_CHUNK }
    }
}

/// A request or preempted sequence waiting for room.
enum Waiting<T> {
    New { req: GenerateRequest, images: Option<EncodedImages>, span: tracing::Span, tag: T },
    Parked { seq: Box<Active>, span: tracing::Span, tag: T },
}

/// A request the scheduler is done with.
pub struct Finished<T> {
    pub tag: T,
    pub result: Result<Generation, EngineError>,
}

/// Requests waiting, sequences in flight, and the rules that move them: admission by free
/// pages, preemption of the newest sequence when the pool runs dry. `T` tags each request
/// for its caller (a reply channel, an index).
pub struct Scheduler<T> {
    limits: SchedulerLimits,
    waiting: VecDeque<Waiting<T>>,
    running: Vec<Active>,
    tags: Vec<(tracing::Span, T)>,
}

impl<T> Scheduler<T> {
    pub fn new(limits: SchedulerLimits) -> Self {
        Self { limits, waiting: VecDeque::new(), running: Vec::new(), tags: Vec::new() }
    }

    /// Queues a request (with its images' rows when they were encoded already).
    pub fn push(&mut self, req: GenerateRequest, images: Option<EncodedImages>, span: tracing::Span, tag: T) {
        self.waiting.push_back(Waiting::New { req, images, span, tag });
    }

    /// Nothing waiting and nothing in flight.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Admits waiting requests, oldest first, while there are fewer than `max_sequences` in
    /// flight and the pool has room for the next one's tokens and a growth allowance (the
    /// first always goes in). Returns the requests that end at admission (invalid ones, and
    /// those asking for no tokens).
    pub fn admit(&mut self, engine: &mut Engine) -> Vec<Finished<T>> {
        let mut done = Vec::new();
        while self.running.len() < self.limits.max_sequences.max(1) {
            let Some(next) = self.waiting.pop_front() else { break };
            let (mut seq, span, tag) = match next {
                Waiting::Parked { seq, span, tag } => (seq, span, tag),
                Waiting::New { req, images, span, tag } => {
                    let admitted = {
                        let _g = span.enter();
                        engine.admit_encoded(&req, images)
                    };
                    match admitted {
                        Err(e) => {
                            done.push(Finished { tag, result: Err(e) });
                            continue;
                        }
                        Ok(seq) if req.max_new_tokens == 0 => {
                            done.push(Finished { tag, result: Ok(seq.into_generation()) });
                            continue;
                        }
                        Ok(seq) => (Box::new(seq), span, tag),
                    }
                }
            };
            if seq.cache.is_none() {
                if let Err(e) = engine.place(&mut seq) {
                    done.push(Finished { tag, result: Err(e) });
                    continue;
                }
            }
            let room = match (engine.pages_to_admit(&seq), engine.pages_available()) {
                (Ok(need), Ok(free)) => need <= free,
                _ => false,
            };
            if !room && !self.running.is_empty() {
                self.waiting.push_front(Waiting::Parked { seq, span, tag });
                break;
            }
            self.running.push(*seq);
            self.tags.push((span, tag));
        }
        done
    }

    /// One step over every sequence in flight; returns those that finished (or failed).
    /// When the pool runs dry, the newest sequences are preempted until the step fits; a
    /// sequence that does not fit alone fails.
    pub fn step(&mut self, engine: &mut Engine) -> Vec<Finished<T>> {
        let mut done = Vec::new();
        loop {
            if self.running.is_empty() {
                return done;
            }
            let _s = tracing::trace_span!("engine_step", sequences = self.running.len()).entered();
            match engine.try_step(&mut self.running, self.limits.prefill_tokens_per_step) {
                Ok(()) => break,
                Err(StepError::Engine(e)) => {
                    let msg = e.to_string();
                    for (_, (_, tag)) in self.running.drain(..).zip(self.tags.drain(..)) {
                        done.push(Finished { tag, result: Err(EngineError::Compute(msg.clone())) });
                    }
                    return done;
                }
                Err(StepError::OutOfPages { index, needed, available }) => {
                    if self.running.len() == 1 {
                        let (_, tag) = self.tags.pop().expect("one");
                        self.running.pop();
                        done.push(Finished {
                            tag,
                            result: Err(EngineError::Request(format!(
                                "the sequence needs {needed} more KV pages and the pool has {available} free: \
                                 raise the KV memory"
                            ))),
                        });
                        return done;
                    }
                    let _ = index;
                    // The newest sequence gives its pages back and waits to be recomputed.
                    let mut seq = self.running.pop().expect("several");
                    let (span, tag) = self.tags.pop().expect("several");
                    seq.cache = None;
                    engine.stats.preemptions += 1;
                    tracing::debug!(sequences = self.running.len(), "KV pool full: a sequence is preempted");
                    self.waiting.push_front(Waiting::Parked { seq: Box::new(seq), span, tag });
                }
            }
        }
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].is_done() {
                let seq = self.running.remove(i);
                let (_, tag) = self.tags.remove(i);
                done.push(Finished { tag, result: Ok(seq.into_generation()) });
            } else {
                i += 1;
            }
        }
        done
    }

    /// Every request in hand, waiting or in flight (to answer them when the engine stops).
    pub fn drain(&mut self) -> Vec<T> {
        let mut out: Vec<T> = self.tags.drain(..).map(|(_, t)| t).collect();
        self.running.clear();
        out.extend(self.waiting.drain(..).map(|w| match w {
            Waiting::New { tag, .. } | Waiting::Parked { tag, .. } => tag,
        }));
        out
    }
}

/// The end of a prompt chunk starting at `from` of about `budget` tokens that does not split
/// a run of image soft tokens: a run that would be cut is left for the next chunk, or taken
/// whole when the chunk would otherwise be empty.
pub fn chunk_end(ids: &[u32], from: usize, budget: usize, soft: Option<u32>) -> usize {
    let mut to = (from + budget.max(1)).min(ids.len());
    let Some(soft) = soft else { return to };
    if to < ids.len() && ids[to - 1] == soft && ids[to] == soft {
        let mut start = to - 1;
        while start > from && ids[start - 1] == soft {
            start -= 1;
        }
        if start > from {
            to = start;
        } else {
            while to < ids.len() && ids[to] == soft {
                to += 1;
            }
        }
    }
    to
}

/// The rows of `images` for the soft tokens in `ids[from..to]`.
pub(crate) fn image_rows(
    ids: &[u32],
    from: usize,
    to: usize,
    soft: Option<u32>,
    images: Option<&Tensor>,
) -> Result<Option<Tensor>, EngineError> {
    let Some(soft) = soft else { return Ok(None) };
    let count = ids[from..to].iter().filter(|&&t| t == soft).count();
    if count == 0 {
        return Ok(None);
    }
    let images = images.ok_or_else(|| EngineError::Request(format!("{count} image soft tokens but no image")))?;
    let before = ids[..from].iter().filter(|&&t| t == soft).count();
    if before + count > images.dim(0)? {
        return Err(EngineError::Request(format!(
            "the prompt holds {} image soft tokens, the images give {} rows",
            ids.iter().filter(|&&t| t == soft).count(),
            images.dim(0)?
        )));
    }
    Ok(Some(images.narrow(0, before, count)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_never_split_an_image() {
        let s = 9;
        let ids = [1, 2, 9, 9, 9, 9, 3, 4, 9, 9, 5];
        assert_eq!(chunk_end(&ids, 0, 4, Some(s)), 2, "a run cut at 4 moves to the next chunk");
        assert_eq!(chunk_end(&ids, 2, 2, Some(s)), 6, "a run at the chunk start is taken whole");
        assert_eq!(chunk_end(&ids, 0, 6, Some(s)), 6);
        assert_eq!(chunk_end(&ids, 6, 3, Some(s)), 8);
        assert_eq!(chunk_end(&ids, 0, 4, None), 4);
        assert_eq!(chunk_end(&ids, 10, 4, Some(s)), 11);
    }
}
