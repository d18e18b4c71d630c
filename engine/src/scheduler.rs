//! Admission and step planning: requests become sequences (tokenized, their cached prompt
//! prefix reused), and each step of continuous batching advances every sequence in flight by
//! one forward pass — a prompt chunk or one generated token.

use crate::constrain::SeqMatcher;
use crate::engine::{Engine, Finish, GenerateRequest, Generation, PREFILL_CHUNK};
use crate::kv::{SeqCache, LOCAL_CACHE_SLACK};
use crate::models::gemma3::{BatchItem, Logits};
use crate::sampling::{pick, SplitMix64};
use crate::EngineError;
use candle_core::Tensor;
use std::time::Instant;

/// Cached prompt prefixes kept at once (pipelines use one or two shared prefixes).
const PREFIX_CACHE_ENTRIES: usize = 4;

/// Counters of the decoding loop, for benchmarks.
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
}

pub(crate) struct PrefixEntry {
    text: String,
    ids: Vec<u32>,
    cache: SeqCache,
    last_used: u64,
}

impl Engine {
    /// A cache holding `prefix`'s KV, computed once per distinct prefix.
    fn prefix_cache(&mut self, prefix: &str, req: &GenerateRequest) -> Result<(Vec<u32>, SeqCache), EngineError> {
        self.clock += 1;
        if let Some(e) = self.prefixes.iter_mut().find(|e| e.text == prefix) {
            e.last_used = self.clock;
            return Ok((e.ids.clone(), e.cache.clone()));
        }
        let ids = self.tokenizer.encode(prefix, req.add_bos, req.parse_special);
        let mut cache = self.model.new_cache();
        if !ids.is_empty() {
            self.prefill(&ids, &mut cache)?;
        }
        if self.prefixes.len() >= PREFIX_CACHE_ENTRIES {
            let oldest = (0..self.prefixes.len()).min_by_key(|&i| self.prefixes[i].last_used).unwrap_or(0);
            self.prefixes.swap_remove(oldest);
        }
        self.prefixes.push(PrefixEntry {
            text: prefix.to_string(),
            ids: ids.clone(),
            cache: cache.clone(),
            last_used: self.clock,
        });
        Ok((ids, cache))
    }

    /// Tokenizes a request and sets up its sequence (reusing a cached prompt prefix).
    pub fn admit(&mut self, req: &GenerateRequest) -> Result<Active, EngineError> {
        self.admit_encoded(req, None)
    }

    /// [`Self::admit`] with the request's image rows already encoded (by an
    /// [`ImageEncoder`]); `None` encodes them here.
    pub fn admit_encoded(&mut self, req: &GenerateRequest, image_rows: Option<Tensor>) -> Result<Active, EngineError> {
        if req.chat {
            let (prompt, add_bos) = self.chat_prompt(&req.prompt)?;
            let wrapped = GenerateRequest {
                prompt,
                chat: false,
                add_bos,
                parse_special: true,
                shared_prefix_len: 0,
                ..req.clone()
            };
            return self.admit_encoded(&wrapped, image_rows);
        }
        let ids = self.prompt_ids(req)?;
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
        let image_rows = match image_rows {
            Some(rows) => Some(rows),
            None => self.encode_images(&req.images)?,
        };
        let mut cache = self.model.new_cache();
        let mut reused = 0usize;
        if req.shared_prefix_len > 0 && req.prompt.is_char_boundary(req.shared_prefix_len) {
            let (pids, pcache) = self.prefix_cache(&req.prompt[..req.shared_prefix_len], req)?;
            // Tokens can merge across the prefix boundary, so reuse the common token prefix,
            // and never past the first image (its rows are not in the cached prefix).
            let first_image = self.model.image_token_id.and_then(|t| ids.iter().position(|&x| x == t));
            let common = pids
                .iter()
                .zip(&ids)
                .take_while(|(a, b)| a == b)
                .count()
                .min(ids.len() - 1)
                .min(first_image.unwrap_or(usize::MAX));
            let mut c = pcache;
            if common > 0 && c.truncate(common, &self.model.cfg)? {
                cache = c;
                reused = common;
            }
        }
        Ok(Active {
            rng: SplitMix64::new(req.sampling.seed),
            req: req.clone(),
            next_prefill: reused,
            reused,
            ids,
            image_rows,
            cache,
            pending: None,
            out: Vec::new(),
            text: String::new(),
            started: Instant::now(),
            finish: None,
            matcher,
        })
    }

    /// KV bytes a sequence will hold at its longest (prompt plus all new tokens), for
    /// admission against a memory budget.
    pub fn projected_kv_bytes(&self, a: &Active) -> u64 {
        let cfg = &self.model.cfg;
        let len = (a.ids.len() + a.req.max_new_tokens as usize) as u64;
        let per_layer_token = 2 * cfg.kv_dim() as u64 * 4;
        let local_len = len.min((cfg.sliding_window + LOCAL_CACHE_SLACK) as u64);
        cfg.layer_is_global.iter().map(|&g| per_layer_token * if g { len } else { local_len }).sum()
    }

    /// One step of continuous batching: every active sequence advances by one forward pass
    /// — a prompt chunk (prompt tokens of all sequences together within `token_budget`) or
    /// one generated token. Sequences that finish get their `finish` set.
    pub fn step(&mut self, active: &mut [Active], token_budget: usize) -> Result<(), EngineError> {
        let mut budget = token_budget.max(1);
        let mut plan: Vec<(usize, usize, usize, bool)> = Vec::new(); // (index, from, to, wants logits)
        for (i, a) in active.iter().enumerate() {
            if a.finish.is_some() {
                continue;
            }
            if a.next_prefill < a.ids.len() {
                if budget == 0 {
                    continue;
                }
                let to = chunk_end(&a.ids, a.next_prefill, budget, self.model.image_token_id);
                budget = budget.saturating_sub(to - a.next_prefill);
                plan.push((i, a.next_prefill, to, to == a.ids.len()));
            } else if a.pending.is_some() {
                plan.push((i, 0, 0, true));
            }
        }
        if plan.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let samples = plan.iter().filter(|p| p.3).count();
        let logits = {
            let mut pending_tok: Vec<[u32; 1]> = Vec::with_capacity(plan.len());
            for &(i, _, _, _) in &plan {
                pending_tok.push([active[i].pending.unwrap_or(0)]);
            }
            let soft = self.model.image_token_id;
            let mut rows = Vec::with_capacity(plan.len());
            for &(i, from, to, _) in &plan {
                let a = &active[i];
                rows.push(if to > from { image_rows(&a.ids, from, to, soft, a.image_rows.as_ref())? } else { None });
            }
            let mut by_index: Vec<Option<&mut Active>> = active.iter_mut().map(Some).collect();
            let mut items = Vec::with_capacity(plan.len());
            for (k, &(i, from, to, wants)) in plan.iter().enumerate() {
                let a = by_index[i].take().expect("each sequence once");
                let ids: &[u32] = if to > from { &a.ids[from..to] } else { &pending_tok[k] };
                items.push(BatchItem {
                    ids,
                    cache: &mut a.cache,
                    logits: if wants { Logits::Last } else { Logits::None },
                    images: rows[k].as_ref(),
                });
            }
            self.model.forward_batch(&mut items)?
        };
        for (&(i, from, to, _), l) in plan.iter().zip(logits) {
            let a = &mut active[i];
            if to > from {
                a.next_prefill = to;
                if to == a.ids.len() {
                    a.image_rows = None;
                }
            }
            let Some(l) = l else { continue };
            let mut row: Vec<f32> = l.flatten_all()?.to_vec1()?;
            a.pending = None;
            if let Some(m) = a.matcher.as_mut() {
                let t = Instant::now();
                let allowed = match (m.mask(), self.guidance.get()) {
                    (Ok(mask), Some(g)) => g.apply_mask(&mask, &mut row),
                    _ => false,
                };
                self.stats.masks += 1;
                self.stats.mask_ns += t.elapsed().as_nanos() as u64;
                if !allowed {
                    a.finish = Some(Finish::Grammar);
                    continue;
                }
            }
            let next = pick(&row, &a.req.sampling, &mut a.rng);
            if self.stop_ids.contains(&next) {
                a.finish = Some(Finish::Eos);
                continue;
            }
            a.out.push(next);
            a.text = self.tokenizer.decode(&a.out, false);
            if let Some(m) = a.matcher.as_mut() {
                if m.consume(next).is_err() {
                    a.finish = Some(Finish::Grammar);
                } else if m.is_stopped() {
                    a.finish = Some(Finish::Stop);
                } else if a.out.len() >= a.req.max_new_tokens as usize {
                    a.finish = Some(Finish::Length);
                } else {
                    a.pending = Some(next);
                }
                continue;
            }
            if let Some(cut) = a.req.stop.iter().filter_map(|s| a.text.find(s.as_str())).min() {
                a.text.truncate(cut);
                a.finish = Some(Finish::Stop);
            } else if a.out.len() >= a.req.max_new_tokens as usize {
                a.finish = Some(Finish::Length);
            } else {
                a.pending = Some(next);
            }
        }
        if samples > 0 {
            self.stats.steps += 1;
            self.stats.step_ns += started.elapsed().as_nanos() as u64;
        }
        Ok(())
    }

    /// Serves one request.
    pub fn generate(&mut self, req: &GenerateRequest) -> Result<Generation, EngineError> {
        let mut out = self.generate_batch(std::slice::from_ref(req));
        out.pop().expect("one result")
    }

    /// Serves several requests together with continuous batching; results in order.
    pub fn generate_batch(&mut self, reqs: &[GenerateRequest]) -> Vec<Result<Generation, EngineError>> {
        let mut results: Vec<Option<Result<Generation, EngineError>>> = (0..reqs.len()).map(|_| None).collect();
        let mut active = Vec::new();
        let mut slots = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            match self.admit(r) {
                Ok(a) if r.max_new_tokens == 0 => results[i] = Some(Ok(a.into_generation())),
                Ok(a) => {
                    active.push(a);
                    slots.push(i);
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        while active.iter().any(|a| a.finish.is_none()) {
            if let Err(e) = self.step(&mut active, PREFILL_CHUNK) {
                for &i in &slots {
                    results[i].get_or_insert_with(|| Err(EngineError::Compute(e.to_string())));
                }
                break;
            }
        }
        for (a, i) in active.into_iter().zip(slots) {
            if results[i].is_none() {
                results[i] = Some(Ok(a.into_generation()));
            }
        }
        results.into_iter().map(|r| r.expect("every request answered")).collect()
    }
}

/// A sequence being served: its prompt, cache and output so far.
pub struct Active {
    pub req: GenerateRequest,
    ids: Vec<u32>,
    /// Rows for the prompt's image soft tokens, until the prompt has been read.
    image_rows: Option<Tensor>,
    next_prefill: usize,
    reused: usize,
    cache: SeqCache,
    /// The token sampled last, to be fed at the next step.
    pending: Option<u32>,
    out: Vec<u32>,
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

    /// Tokens generated so far (0 while the prompt is still being read).
    pub fn generated(&self) -> usize {
        self.out.len() + usize::from(self.pending.is_some() && self.out.is_empty())
    }

    /// KV bytes the sequence holds now.
    pub fn kv_bytes(&self) -> usize {
        self.cache.bytes()
    }

    pub fn into_generation(self) -> Generation {
        Generation {
            text: self.text,
            ids: self.out,
            prompt_tokens: self.ids.len() as u32,
            reused_tokens: self.reused as u32,
            finish: self.finish.unwrap_or(Finish::Length),
            engine_ms: self.started.elapsed().as_millis() as u64,
        }
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
