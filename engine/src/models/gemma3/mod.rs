//! Gemma 3 text decoder (`Gemma3ForCausalLM`), written to match Hugging Face transformers'
//! `modeling_gemma3.py` and llama.cpp's `gemma3` graph.
//!
//! Per layer, with sandwich norms:
//! ```text
//! h = x + post_attn_norm(attn(input_norm(x)))
//! y = h + post_ff_norm(down(gelu_tanh(gate(pre_ff_norm(h))) * up(pre_ff_norm(h))))
//! ```
//! Attention applies RMS norms to q and k per head before RoPE, scales scores by
//! `query_pre_attn_scalar^-0.5`, uses RoPE base 10k on local layers (a sliding window of
//! exactly `W` tokens, the query included) and the global base with linear scaling on
//! global layers. Embeddings are multiplied by `sqrt(hidden)`; the output head is tied to the
//! embedding unless the checkpoint has its own.
//!
//! Keys and values live in the model's paged KV cache ([`crate::kv`]); callers hold a
//! [`SeqCache`] per sequence. A forward pass packs the new rows of every sequence together —
//! prompt chunks and single decode rows — through the embedding, projections, norms, MLP
//! and one attention call per layer.
//!
//! - [`layers`]: RMSNorm, attention, MLP and the decoder layer, each loading itself;
//! - [`linear`]: quantized and dense linear layers, the embedding table;
//! - [`shard`]: one tensor-parallel rank's share of the weights;
//! - [`pass`]: one rank's forward pass over a packed batch;
//! - [`ranks`]: persistent threads for the ranks of a split model.

pub mod layers;
pub mod linear;
pub mod pass;
pub mod ranks;
pub mod shard;

pub use layers::{Attention, Layer, LayerParam, LayerSource, Mlp, RmsNorm};
pub use linear::{Embedding, Linear};
pub use shard::Shard;

use crate::kv::{self, ImageKey, KvLayout, KvManager, KvStats, PageStore, SeqCache};
use crate::load::config::TextConfig;
use candle_core::{DType, Device, Tensor, D};
use pass::{PassConsts, PassItem, PassJob};
use std::sync::{Arc, Mutex, OnceLock};

/// Numeric options that trade exactness against one reference or another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NumericOptions {
    /// Round q, k, v and attention probabilities to f16, as llama.cpp does with its default
    /// f16 KV cache (which is then kept in f16). Off for parity with transformers in f32.
    pub f16_attention: bool,
    /// Compute GELU as llama.cpp's CPU backend does: from a table indexed by the f16-rounded
    /// input, returning an f16 value, exact (identity/zero) beyond ±10.
    pub f16_gelu: bool,
}

/// Which attention implementation a pass runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttentionImpl {
    /// The fastest the device has: the CPU kernel over pages, candle-flash-attn on a GPU
    /// (feature `flash-attn`, bf16/f16), else the gathered path.
    #[default]
    Fused,
    /// Keys gathered per sequence and candle operations: the reference the others are tested
    /// against.
    Gathered,
}

/// How large a model's KV cache is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvConfig {
    /// Bytes of keys and values per rank; `None`: [`kv::DEFAULT_KV_MEMORY`] on the CPU, 90 %
    /// of a GPU's free memory.
    pub memory: Option<u64>,
}

/// Share of a GPU's free memory the KV cache takes when no size is given.
const GPU_KV_SHARE: f64 = 0.9;

/// The KV cache of a model: the host-side manager and each rank's pages.
pub(crate) struct KvState {
    pub manager: Arc<Mutex<KvManager>>,
    pub stores: Vec<Arc<Mutex<PageStore>>>,
}

/// The decoder: one shard per tensor-parallel rank (one without tensor parallelism). Ranks
/// run as threads of this process, in step through their communicator.
pub struct Gemma3 {
    pub cfg: TextConfig,
    pub shards: Vec<Arc<Shard>>,
    pub embed_scale: f64,
    pub numeric: NumericOptions,
    /// `<image_soft_token>` of a multimodal checkpoint: positions holding it take the rows of
    /// an image instead of an embedding, and each run of them attends to itself both ways
    /// while the prompt is read. `None` for text-only models.
    pub image_token_id: Option<u32>,
    /// Dtype of the two attention products (`q·kᵀ`, `p·v`) and of the cached keys and values
    /// (see [`Self::kv_dtype`] for llama.cpp's f16 numerics): f32, or the weights' bf16/f16.
    /// Scores are widened to f32 for the softmax either way.
    pub attention_dtype: DType,
    pub device: Device,
    pub attention: AttentionImpl,
    pub(crate) runtime: Runtime,
}

/// What a loaded model sets up on first use: its KV cache and its rank threads.
#[derive(Default)]
pub(crate) struct Runtime {
    kv: Mutex<Option<Arc<KvState>>>,
    workers: OnceLock<ranks::RankWorkers>,
}

/// One sequence's part of a batched forward pass.
pub struct BatchItem<'a> {
    pub ids: &'a [u32],
    pub cache: &'a mut SeqCache,
    pub logits: Logits,
    /// Rows for the image soft tokens among `ids`, in order (`[count, hidden]`); required
    /// when `ids` holds any. A run of soft tokens must not be split between passes.
    pub images: Option<&'a Tensor>,
}

impl<'a> BatchItem<'a> {
    /// An item without images.
    pub fn text(ids: &'a [u32], cache: &'a mut SeqCache, logits: Logits) -> Self {
        Self { ids, cache, logits, images: None }
    }
}

/// Which positions' logits a forward pass returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position (generation).
    Last,
    /// Every position of the chunk (parity tests).
    All,
    /// None (a prompt chunk that does not end the prompt).
    None,
}

pub(crate) fn round_f16(t: &Tensor) -> candle_core::Result<Tensor> {
    t.to_dtype(DType::F16)?.to_dtype(DType::F32)
}

/// cos/sin tables for `positions`, shape `[n, head_dim / 2]`, computed in f64 and rounded
/// once to f32 (both references compute them in f32 from the same formula).
fn rope_tables(
    positions: impl ExactSizeIterator<Item = usize>,
    head_dim: usize,
    base: f64,
    factor: f64,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let n = positions.len();
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in positions {
        for i in 0..half {
            let inv_freq = 1.0 / base.powf((2 * i) as f64 / head_dim as f64) / factor;
            let a = p as f64 * inv_freq;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    Ok((Tensor::from_vec(cos, (n, half), device)?, Tensor::from_vec(sin, (n, half), device)?))
}

/// Rotate-half RoPE on `x` (`[.., d]`) with tables broadcast against its leading dimensions
/// (`[n, 1, d/2]` for `[n, heads, d]`).
pub(crate) fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let a = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let b = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[a, b], D::Minus1)
}

/// For each position of a prompt chunk, the image run it belongs to (numbered from 0 within
/// the chunk), or `None` for text; empty when the chunk has no image run.
pub(crate) fn image_groups(soft: Option<u32>, ids: &[u32]) -> Vec<Option<u32>> {
    let Some(soft) = soft else { return Vec::new() };
    if ids.len() < 2 || !ids.contains(&soft) {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(ids.len());
    let mut run = 0u32;
    for (i, &t) in ids.iter().enumerate() {
        if t != soft {
            out.push(None);
            continue;
        }
        if i > 0 && ids[i - 1] != soft && out.iter().any(Option::is_some) {
            run += 1;
        }
        out.push(Some(run));
    }
    out
}

impl Gemma3 {
    /// Tokens per block of this model's cache: candle-flash-attn's paged kernel needs 32;
    /// everything else uses 16.
    fn block_tokens(&self) -> usize {
        if pass::uses_flash(self.attention, &self.device, self.kv_dtype()) {
            kv::FLASH_BLOCK_TOKENS
        } else {
            kv::BLOCK_TOKENS
        }
    }

    /// The dtype keys and values are kept in. Values rounded to f16 (llama.cpp's numerics)
    /// are kept in f16 on a GPU and in f32 on the CPU, where the attention kernel then reads
    /// them in place instead of widening every key it visits (twice the memory, measured
    /// 1.6× faster decoding of the demo model at a 500-token context).
    pub fn kv_dtype(&self) -> DType {
        match (self.numeric.f16_attention, self.device.is_cpu()) {
            (true, true) => DType::F32,
            (true, false) => DType::F16,
            (false, _) => self.attention_dtype,
        }
    }

    /// Bytes one page takes on a rank (keys and values of one block of one layer; the rank
    /// holding the most KV heads).
    pub fn page_bytes(&self) -> u64 {
        let per_rank_kv_heads = self.shards.iter().map(|s| s.cfg.num_kv_heads).max().unwrap_or(1);
        (2 * self.block_tokens() * per_rank_kv_heads * self.cfg.head_dim * self.kv_dtype().size_in_bytes()) as u64
    }

    /// Sets up the KV cache (dropping any earlier one: sequences still holding it keep their
    /// own pages until they end). Returns its layout.
    pub fn configure_kv(&self, cfg: KvConfig) -> candle_core::Result<KvLayout> {
        let (layout, state) = self.build_kv(cfg)?;
        *self.runtime.kv.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(state));
        Ok(layout)
    }

    /// A KV cache of the given size and its layout, not yet installed.
    fn build_kv(&self, cfg: KvConfig) -> candle_core::Result<(KvLayout, KvState)> {
        let memory = match cfg.memory {
            Some(m) => m,
            None if self.device.is_cpu() => kv::DEFAULT_KV_MEMORY,
            None => gpu_free_memory(&self.shards)?,
        };
        let page = self.page_bytes();
        let pages = (memory / page) as usize;
        if pages < self.cfg.num_layers {
            candle_core::bail!(
                "a KV cache of {memory} bytes holds {pages} pages of {page} bytes: fewer than one block of every one of \
                 the {} layers",
                self.cfg.num_layers
            );
        }
        let layout = KvLayout {
            block: self.block_tokens(),
            pages,
            layer_is_global: self.cfg.layer_is_global.clone(),
            window: self.cfg.sliding_window,
            page_bytes: page * self.shards.len() as u64,
        };
        let mut stores = Vec::with_capacity(self.shards.len());
        for s in &self.shards {
            let store =
                PageStore::new(&s.device, self.kv_dtype(), pages, layout.block, s.cfg.num_kv_heads, s.cfg.head_dim)?;
            stores.push(Arc::new(Mutex::new(store)));
        }
        let state = KvState { manager: Arc::new(Mutex::new(KvManager::new(layout.clone()))), stores };
        Ok((layout, state))
    }

    /// The KV cache, set up with the default size on first use. The lock is held while it is
    /// built, so that threads first using a model together share one cache (two caches built
    /// at once would leave the sequences of the one replaced pointing at another cache).
    pub(crate) fn kv(&self) -> candle_core::Result<Arc<KvState>> {
        let mut slot = self.runtime.kv.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = slot.as_ref() {
            return Ok(k.clone());
        }
        let (_, state) = self.build_kv(KvConfig::default())?;
        let state = Arc::new(state);
        *slot = Some(state.clone());
        Ok(state)
    }

    /// The cache's layout and counters.
    pub fn kv_stats(&self) -> candle_core::Result<(KvLayout, KvStats)> {
        let kv = self.kv()?;
        let m = kv::lock(&kv.manager);
        Ok((m.layout().clone(), m.stats()))
    }

    /// The cache manager (for the scheduler's admission decisions).
    pub fn kv_manager(&self) -> candle_core::Result<Arc<Mutex<KvManager>>> {
        Ok(self.kv()?.manager.clone())
    }

    /// A fresh, empty sequence.
    pub fn new_cache(&self) -> SeqCache {
        self.cache_for(&[], Vec::new(), 0).expect("the KV cache can be set up").0
    }

    /// A sequence for a prompt of `ids`, starting with the cached blocks of its longest cached
    /// prefix (at most `limit` tokens), and how many tokens that is. `image_keys` are the keys
    /// of the prompt's images in order; blocks with image soft tokens are matched only when
    /// every image is known.
    pub fn cache_for(
        &self,
        ids: &[u32],
        image_keys: Vec<ImageKey>,
        limit: usize,
    ) -> candle_core::Result<(SeqCache, usize)> {
        Ok(self.cache_adopting(ids, image_keys, limit, None)?.expect("adopts unconditionally"))
    }

    /// For a sequence placed earlier with `before` tokens adopted and nothing computed since:
    /// a cache adopting the longer cached prefix there is now (blocks other sequences have
    /// computed meanwhile), or `None` when there is none. The prefix cache's statistics
    /// count the sequence once.
    pub fn longer_cache_for(
        &self,
        ids: &[u32],
        image_keys: Vec<ImageKey>,
        limit: usize,
        before: usize,
    ) -> candle_core::Result<Option<(SeqCache, usize)>> {
        self.cache_adopting(ids, image_keys, limit, Some(before))
    }

    fn cache_adopting(
        &self,
        ids: &[u32],
        image_keys: Vec<ImageKey>,
        limit: usize,
        before: Option<usize>,
    ) -> candle_core::Result<Option<(SeqCache, usize)>> {
        let kv = self.kv()?;
        let soft = self.image_token_id;
        // The image of each soft token (the n-th run is the n-th image); matching stops at a
        // soft token of an unknown image.
        let mut keys = Vec::with_capacity(ids.len());
        let mut limit = limit.min(ids.len());
        let (mut runs, mut prev_soft) = (0usize, false);
        for (j, &t) in ids.iter().enumerate() {
            if Some(t) == soft {
                if !prev_soft {
                    runs += 1;
                }
                prev_soft = true;
                match image_keys.get(runs - 1) {
                    Some(k) => keys.push(Some(*k)),
                    None => {
                        limit = limit.min(j);
                        keys.push(None);
                    }
                }
            } else {
                prev_soft = false;
                keys.push(None);
            }
        }
        let images = soft.map(|_| keys.as_slice());
        let blocks = {
            let mut m = kv::lock(&kv.manager);
            match before {
                None => m.adopt_prefix(ids, images, limit),
                Some(before) if m.cached_prefix_len(ids, images, limit) > before => {
                    m.readopt_prefix(ids, images, limit, before)
                }
                Some(_) => return Ok(None),
            }
        };
        let reused = blocks.len;
        let mut cache = SeqCache::new(kv.manager.clone(), blocks, image_keys);
        // The adopted tokens count as read: image runs among them are numbered from here on.
        cache.skip_adopted(&ids[..reused], soft);
        Ok(Some((cache, reused)))
    }

    /// Runs `ids` (the next tokens of one sequence) through the model, appending to `cache`.
    /// Returns logits `[1, vocab]` or `[ids.len(), vocab]`.
    pub fn forward(&self, ids: &[u32], cache: &mut SeqCache, which: Logits) -> candle_core::Result<Tensor> {
        let mut out = self.forward_batch(&mut [BatchItem::text(ids, cache, which)])?;
        out.pop().flatten().ok_or_else(|| candle_core::Error::Msg("no logits requested".into()))
    }

    /// Runs the next tokens of several sequences in one pass: their rows are packed through
    /// the embedding, projections, norms, MLP and one attention call per layer, each row with
    /// its sequence's positions, window and pages. Returns each item's logits (`[1, vocab]`,
    /// `[n, vocab]`, or none), in order. Every row is computed as it would be alone. With
    /// several ranks, each runs the pass on its shard in its own thread.
    pub fn forward_batch(&self, items: &mut [BatchItem<'_>]) -> candle_core::Result<Vec<Option<Tensor>>> {
        let logits = self.forward_packed(items)?;
        let mut out = Vec::with_capacity(items.len());
        let mut off = 0;
        for b in items.iter() {
            let n = match b.logits {
                Logits::Last => 1,
                Logits::All => b.ids.len(),
                Logits::None => 0,
            };
            match &logits {
                Some(l) if n > 0 => {
                    out.push(Some(l.narrow(0, off, n)?));
                    off += n;
                }
                _ => out.push(None),
            }
        }
        Ok(out)
    }

    /// [`Self::forward_batch`] with the logits of every item that asked for some stacked in
    /// one tensor (`[rows, vocab]`, in item order), left where the pass ran.
    pub fn forward_packed(&self, items: &mut [BatchItem<'_>]) -> candle_core::Result<Option<Tensor>> {
        if items.is_empty() || items.iter().any(|b| b.ids.is_empty()) {
            candle_core::bail!("forward called with no tokens");
        }
        let kv = self.kv()?;
        for b in items.iter_mut() {
            if !b.cache.belongs_to(&kv.manager) {
                candle_core::bail!("a sequence cache made for another model (or before the cache was set up again)");
            }
            let want = b.cache.len() + b.ids.len();
            if let Err(e) = b.cache.reserve(want) {
                candle_core::bail!(
                    "the KV cache is full: {} pages needed, {} available (raise the KV memory)",
                    e.needed,
                    e.available
                );
            }
        }
        let layers = self.cfg.num_layers;
        let job = PassJob {
            items: items
                .iter()
                .map(|b| PassItem {
                    ids: b.ids.to_vec(),
                    pos0: b.cache.len(),
                    logits: b.logits,
                    images: b.images.cloned(),
                    groups: image_groups(self.image_token_id, b.ids),
                    blocks: b.cache.blocks.blocks.len(),
                    tables: b.cache.tables(layers),
                })
                .collect(),
            consts: PassConsts {
                numeric: self.numeric,
                attention_dtype: self.attention_dtype,
                embed_scale: self.embed_scale,
                image_token_id: self.image_token_id,
                vocab_size: self.cfg.vocab_size,
                softcap: self.cfg.final_logit_softcap,
                attention: self.attention,
            },
        };
        let logits = if self.shards.len() == 1 {
            let mut store = kv.stores[0].lock().unwrap_or_else(|e| e.into_inner());
            pass::forward_shard(&self.shards[0], &job, &mut store)?
        } else {
            let workers = self.runtime.workers.get_or_init(|| ranks::RankWorkers::start(&self.shards));
            workers.run(Arc::new(job), &kv.stores)?
        };
        for b in items.iter_mut() {
            b.cache.advance(b.ids, self.image_token_id);
        }
        Ok(logits)
    }

    /// Tensor-parallel ranks the model runs on.
    pub fn ranks(&self) -> usize {
        self.shards.len()
    }

    /// Why the model can no longer run, once a tensor-parallel rank has failed (the group is
    /// broken for good: the process should stop and its work be done elsewhere).
    pub fn broken(&self) -> Option<String> {
        self.shards.iter().find_map(|s| s.comm.failed())
    }
}

/// The KV memory to take on each rank's GPU when none is given: a share of its free memory.
fn gpu_free_memory(shards: &[Arc<Shard>]) -> candle_core::Result<u64> {
    #[cfg(feature = "cuda")]
    {
        let mut least = u64::MAX;
        for s in shards {
            let dev = s.device.as_cuda_device()?;
            let (free, _) = dev.cuda_stream().context().mem_get_info().map_err(candle_core::Error::wrap)?;
            least = least.min(free as u64);
        }
        Ok((least as f64 * GPU_KV_SHARE) as u64)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (shards, GPU_KV_SHARE);
        candle_core::bail!("GPU devices need a build with the `cuda` feature")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_rotates_pairs_and_keeps_norm() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[[1f32, 2.0, 3.0, 4.0]]], &dev).unwrap();
        let (c, s) = rope_tables(5..6, 4, 10_000.0, 1.0, &dev).unwrap();
        let y = apply_rope(&x, &c, &s).unwrap();
        let n0: f32 = x.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        let n1: f32 = y.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!((n0 - n1).abs() < 1e-4);
        // Position 0 is the identity.
        let (c0, s0) = rope_tables(0..1, 4, 10_000.0, 1.0, &dev).unwrap();
        let y0 = apply_rope(&x, &c0, &s0).unwrap();
        assert_eq!(y0.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn linear_scaling_divides_frequencies() {
        let dev = Device::Cpu;
        let (c8, _) = rope_tables(8..9, 4, 1e6, 8.0, &dev).unwrap();
        let (c1, _) = rope_tables(1..2, 4, 1e6, 1.0, &dev).unwrap();
        let a = c8.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = c1.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-6);
        }
    }

    #[test]
    fn rms_norm_matches_formula() {
        let dev = Device::Cpu;
        let w = Tensor::new(&[2f32, 0.5], &dev).unwrap();
        let n = RmsNorm::new(w, 1e-6);
        let y = n.forward(&Tensor::new(&[[3f32, 4.0]], &dev).unwrap()).unwrap();
        let rms = ((9.0f32 + 16.0) / 2.0 + 1e-6).sqrt();
        let got = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((got[0] - 3.0 / rms * 2.0).abs() < 1e-5);
        assert!((got[1] - 4.0 / rms * 0.5).abs() < 1e-5);
    }
}
