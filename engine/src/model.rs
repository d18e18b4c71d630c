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
//! The model owns no sequence state: callers pass a [`SeqCache`] per sequence. Local layers
//! keep only the window they need (plus slack, so a cached prefix can be shortened), and no
//! buffer is sized to the full context up front.

use crate::comm::{Communicator, SingleRank};
use crate::config::TextConfig;
use candle_core::quantized::{k_quants, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};
use std::sync::Arc;

/// Extra positions a local layer keeps beyond the `W - 1` it needs, so that a cached prompt
/// prefix can be cut back by up to this many tokens and reused.
pub const LOCAL_CACHE_SLACK: usize = 256;

/// A linear layer (no bias) whose weight is quantized (GGUF) or dense.
pub enum Linear {
    /// Quantized blocks multiplied row by row (see [`QuantBlocks`]).
    Blocks(QuantBlocks),
    /// Quantized types without a row-wise kernel here: candle's own quantized matmul.
    Quant(QMatMul),
    Dense(Tensor),
}

/// Quantized weight blocks `[out, in]`, multiplied with candle's per-row kernel: each
/// activation row is quantized on its own (Q8_0 blocks for Q8_0/Q4_0 weights, Q8_K for
/// k-quants, as llama.cpp does) and dotted with every weight row.
///
/// Why not candle's `QMatMul`: on x86 it switches to repacked tile kernels by batch size
/// and CPU features, which quantize activations differently (Q8_K even for Q8_0 weights)
/// and so make a row's result depend on how many rows share the call — a batched sequence
/// would not get the tokens it gets alone, and results would differ between machines.
pub struct QuantBlocks {
    n: usize,
    k: usize,
    blocks: BlockData,
}

enum BlockData {
    Q4_0(Vec<k_quants::BlockQ4_0>),
    Q8_0(Vec<k_quants::BlockQ8_0>),
    Q4K(Vec<k_quants::BlockQ4K>),
    Q5K(Vec<k_quants::BlockQ5K>),
    Q6K(Vec<k_quants::BlockQ6K>),
}

impl QuantBlocks {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (m, k) = x.dims2()?;
        if k != self.k {
            candle_core::bail!("linear layer takes {} inputs, got {k}", self.k);
        }
        let x = x.contiguous()?;
        let lhs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let mut dst = vec![0f32; m * self.n];
        let mkn = (m, k, self.n);
        match &self.blocks {
            BlockData::Q4_0(b) => k_quants::matmul(mkn, &lhs, b, &mut dst)?,
            BlockData::Q8_0(b) => k_quants::matmul(mkn, &lhs, b, &mut dst)?,
            BlockData::Q4K(b) => k_quants::matmul(mkn, &lhs, b, &mut dst)?,
            BlockData::Q5K(b) => k_quants::matmul(mkn, &lhs, b, &mut dst)?,
            BlockData::Q6K(b) => k_quants::matmul(mkn, &lhs, b, &mut dst)?,
        }
        Tensor::from_vec(dst, (m, self.n), x.device())
    }
}

/// Copies GGUF block bytes into properly aligned blocks.
fn blocks_of<T: k_quants::GgmlType>(bytes: &[u8]) -> candle_core::Result<Vec<T>> {
    let size = std::mem::size_of::<T>();
    if !bytes.len().is_multiple_of(size) {
        candle_core::bail!("tensor size is not a whole number of {size}-byte blocks");
    }
    let n = bytes.len() / size;
    let mut v: Vec<T> = Vec::with_capacity(n);
    // SAFETY: the block types are plain old data (integers and f16 scales) laid out as in
    // ggml; `v` has capacity for `n` blocks, exactly `bytes.len()` bytes, all written here.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), v.as_mut_ptr() as *mut u8, bytes.len());
        v.set_len(n);
    }
    Ok(v)
}

impl Linear {
    pub fn from_qtensor(t: Arc<QTensor>) -> candle_core::Result<Self> {
        let (n, k) = t.shape().dims2()?;
        let data = t.data()?;
        let blocks = match t.dtype() {
            GgmlDType::Q4_0 => BlockData::Q4_0(blocks_of(&data)?),
            GgmlDType::Q8_0 => BlockData::Q8_0(blocks_of(&data)?),
            GgmlDType::Q4K => BlockData::Q4K(blocks_of(&data)?),
            GgmlDType::Q5K => BlockData::Q5K(blocks_of(&data)?),
            GgmlDType::Q6K => BlockData::Q6K(blocks_of(&data)?),
            _ => return Ok(Self::Quant(QMatMul::from_arc(t)?)),
        };
        Ok(Self::Blocks(QuantBlocks { n, k, blocks }))
    }

    /// `x`: `[m, in]` f32 → `[m, out]` f32. Dense weights held in bf16 or f16 multiply in
    /// that dtype (the input rounded to it; the product accumulated in f32 by the GPU's GEMM,
    /// or widened to f32 on the CPU) and the result is widened back, so the residual stream,
    /// norms and softmax stay in f32.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Blocks(b) => b.forward(x),
            Self::Quant(q) => q.forward(x),
            Self::Dense(w) if w.dtype() == x.dtype() => x.matmul(&w.t()?),
            Self::Dense(w) => x.to_dtype(w.dtype())?.matmul(&w.t()?)?.to_dtype(x.dtype()),
        }
    }
}

/// Token embedding table, quantized or dense.
pub enum Embedding {
    Quant(Arc<QTensor>),
    Dense(Tensor),
}

impl Embedding {
    fn lookup(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Quant(q) => q.embedding(ids),
            Self::Dense(w) => w.index_select(ids, 0),
        }
    }
}

/// RMSNorm with the effective multiplier already resolved (`w` for GGUF, whose files store
/// Gemma's `1 + w`; `1 + w` computed in f32 for safetensors).
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps }
    }

    /// Normalizes over the last dimension, in f32.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x.broadcast_div(&(ms + self.eps)?.sqrt()?)?;
        normed.broadcast_mul(&self.weight)
    }
}

pub struct Attention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub q_norm: RmsNorm,
    pub k_norm: RmsNorm,
}

pub struct Mlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

pub struct Layer {
    pub input_norm: RmsNorm,
    pub attn: Attention,
    pub post_attn_norm: RmsNorm,
    pub pre_ff_norm: RmsNorm,
    pub mlp: Mlp,
    pub post_ff_norm: RmsNorm,
}

/// Numeric options that trade exactness against one reference or another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NumericOptions {
    /// Round q, k, v and attention probabilities to f16, as llama.cpp does with its default
    /// f16 KV cache. Off for parity with transformers in f32.
    pub f16_attention: bool,
    /// Compute GELU as llama.cpp's CPU backend does: from a table indexed by the f16-rounded
    /// input, returning an f16 value, exact (identity/zero) beyond ±10.
    pub f16_gelu: bool,
}

/// Beyond this magnitude llama.cpp's GELU returns the input (or zero) instead of the table.
const GELU_TABLE_LIMIT: f64 = 10.0;

/// One tensor-parallel rank's part of the decoder (the whole decoder without tensor
/// parallelism).
///
/// - q, k, v, gate and up are split by output rows (column-parallel), o and down by input
///   columns (row-parallel), each followed by an all-reduce of the partial sums;
/// - attention heads are split across ranks, and KV heads too; with fewer KV heads than
///   ranks, each rank keeps the KV head its query heads use (replicated);
/// - the embedding table and the output head are split by vocabulary rows: a lookup is an
///   all-reduce of the rank that holds the row (others add zeros), the logits an all-gather;
///   norms are replicated.
pub struct Shard {
    /// This rank's view of the shape: its attention heads, KV heads and MLP width.
    pub cfg: TextConfig,
    /// Rows `vocab_start ..` of the embedding table.
    pub embed: Embedding,
    pub vocab_start: usize,
    pub vocab_rows: usize,
    pub layers: Vec<Layer>,
    /// Rows of the output head for the same vocabulary slice.
    pub lm_head: Linear,
    /// The final norm (replicated).
    pub norm: RmsNorm,
    pub comm: Arc<dyn Communicator>,
    /// Where this rank's weights live and its pass runs.
    pub device: Device,
}

fn tensor_bytes(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}

impl Linear {
    /// Bytes the weight holds in memory (quantized blocks as stored).
    pub fn bytes(&self) -> u64 {
        match self {
            Self::Blocks(b) => {
                let n = match &b.blocks {
                    BlockData::Q4_0(v) => std::mem::size_of_val(v.as_slice()),
                    BlockData::Q8_0(v) => std::mem::size_of_val(v.as_slice()),
                    BlockData::Q4K(v) => std::mem::size_of_val(v.as_slice()),
                    BlockData::Q5K(v) => std::mem::size_of_val(v.as_slice()),
                    BlockData::Q6K(v) => std::mem::size_of_val(v.as_slice()),
                };
                n as u64
            }
            Self::Quant(_) => 0,
            Self::Dense(w) => tensor_bytes(w),
        }
    }
}

impl Shard {
    /// Bytes of this rank's dense weights: `(split, replicated)`, the replicated part being
    /// its norms. (Quantized GGUF weights, never split, are not counted.)
    pub fn weight_bytes(&self) -> (u64, u64) {
        let norms = |l: &Layer| {
            [&l.input_norm, &l.post_attn_norm, &l.pre_ff_norm, &l.post_ff_norm, &l.attn.q_norm, &l.attn.k_norm]
                .iter()
                .map(|n| tensor_bytes(&n.weight))
                .sum::<u64>()
        };
        let replicated = self.layers.iter().map(norms).sum::<u64>() + tensor_bytes(&self.norm.weight);
        let linears = |l: &Layer| {
            [&l.attn.q, &l.attn.k, &l.attn.v, &l.attn.o, &l.mlp.gate, &l.mlp.up, &l.mlp.down]
                .iter()
                .map(|x| x.bytes())
                .sum::<u64>()
        };
        let embed = match &self.embed {
            Embedding::Dense(t) => tensor_bytes(t),
            Embedding::Quant(_) => 0,
        };
        // A tied head shares the embedding's values but is its own tensor here.
        let split = self.layers.iter().map(linears).sum::<u64>() + embed + self.lm_head.bytes();
        (split, replicated)
    }

    /// Bytes of weights a decode step reads on this rank: every matrix of every layer, the
    /// output head and the norms (the embedding table is only looked up, a row per token; a
    /// tied head is read once, as the head).
    pub fn step_weight_bytes(&self) -> u64 {
        let (split, replicated) = self.weight_bytes();
        let embed = match &self.embed {
            Embedding::Dense(t) => tensor_bytes(t),
            Embedding::Quant(_) => 0,
        };
        split - embed + replicated
    }

    /// The whole decoder as one rank.
    pub fn whole(
        cfg: TextConfig,
        embed: Embedding,
        vocab_rows: usize,
        layers: Vec<Layer>,
        lm_head: Linear,
        norm: RmsNorm,
        device: Device,
    ) -> Self {
        Self { cfg, embed, vocab_start: 0, vocab_rows, layers, lm_head, norm, comm: Arc::new(SingleRank), device }
    }
}

/// The decoder: one shard per tensor-parallel rank (one without tensor parallelism). Ranks
/// run as threads of this process, one forward pass each, in step through their
/// communicator.
pub struct Gemma3 {
    pub cfg: TextConfig,
    pub shards: Vec<Shard>,
    pub embed_scale: f64,
    pub numeric: NumericOptions,
    /// `<image_soft_token>` of a multimodal checkpoint: positions holding it take the rows of
    /// an image instead of an embedding, and each run of them attends to itself both ways
    /// while the prompt is read. `None` for text-only models.
    pub image_token_id: Option<u32>,
    /// Dtype of cached keys and values and of the two attention products (`q·kᵀ`, `p·v`):
    /// f32, or the weights' bf16/f16 on a GPU, where the cache is read whole every step.
    /// Scores are widened to f32 for the mask and softmax either way.
    pub attention_dtype: DType,
    pub device: Device,
}

/// One layer's cached keys and values for one sequence: positions `start .. start + len`.
#[derive(Clone, Default)]
struct LayerCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    start: usize,
}

/// The per-sequence state: cached keys/values of every layer (of every rank) and the next
/// position.
#[derive(Clone)]
pub struct SeqCache {
    ranks: Vec<Vec<LayerCache>>,
    pos: usize,
}

impl SeqCache {
    pub fn new(num_layers: usize) -> Self {
        Self::with_ranks(num_layers, 1)
    }

    /// A cache for a model split over `ranks` tensor-parallel ranks.
    pub fn with_ranks(num_layers: usize, ranks: usize) -> Self {
        Self { ranks: vec![vec![LayerCache::default(); num_layers]; ranks.max(1)], pos: 0 }
    }

    /// Tokens processed so far (the next token's position).
    pub fn len(&self) -> usize {
        self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }

    /// Cuts the sequence back to its first `len` tokens. Returns false (and leaves the cache
    /// unusable for reuse) when a local layer no longer holds the keys that position needs.
    pub fn truncate(&mut self, len: usize, cfg: &TextConfig) -> candle_core::Result<bool> {
        if len > self.pos {
            return Ok(false);
        }
        for layers in &mut self.ranks {
            for (i, l) in layers.iter_mut().enumerate() {
                let keep_from = if cfg.layer_is_global[i] { 0 } else { len.saturating_sub(cfg.sliding_window - 1) };
                if keep_from < l.start {
                    return Ok(false);
                }
                if let (Some(k), Some(v)) = (&l.k, &l.v) {
                    let n = len - l.start;
                    l.k = Some(k.narrow(1, 0, n)?);
                    l.v = Some(v.narrow(1, 0, n)?);
                }
            }
        }
        self.pos = len;
        Ok(true)
    }

    /// Bytes held by cached keys and values.
    pub fn bytes(&self) -> usize {
        self.ranks
            .iter()
            .flatten()
            .map(|l| 2 * l.k.as_ref().map(|k| k.elem_count() * k.dtype().size_in_bytes()).unwrap_or(0))
            .sum()
    }
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

fn round_f16(t: &Tensor) -> candle_core::Result<Tensor> {
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

/// Rotate-half RoPE on `x`: `[heads, n, d]` with tables `[n, d/2]`.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let a = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let b = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[a, b], D::Minus1)
}

fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

struct Rope {
    local: (Tensor, Tensor),
    global: (Tensor, Tensor),
}

/// What every rank needs to know of one item of a pass.
struct ItemView<'a> {
    ids: &'a [u32],
    pos0: usize,
    logits: Logits,
    images: Option<&'a Tensor>,
}

/// The inputs of a pass shared by every rank.
struct Pass<'a> {
    views: &'a [ItemView<'a>],
    groups: &'a [Vec<Option<u32>>],
}

/// One sequence's place in one layer of a pass.
struct Step<'a> {
    layer: usize,
    pos0: usize,
    rope: &'a Rope,
    groups: &'a [Option<u32>],
    device: &'a Device,
}

impl Gemma3 {
    /// Runs `ids` (the next tokens of one sequence) through the model, appending to `cache`.
    /// Returns logits `[1, vocab]` or `[ids.len(), vocab]`.
    pub fn forward(&self, ids: &[u32], cache: &mut SeqCache, which: Logits) -> candle_core::Result<Tensor> {
        let mut out = self.forward_batch(&mut [BatchItem::text(ids, cache, which)])?;
        out.pop().flatten().ok_or_else(|| candle_core::Error::Msg("no logits requested".into()))
    }

    /// Runs the next tokens of several sequences in one pass: their rows are packed through
    /// the embedding, projections, norms and MLP; attention runs per sequence with its own
    /// positions, window and cache. Returns each item's logits (`[1, vocab]`, `[n, vocab]`,
    /// or none), in order. Every row is computed as it would be alone. With several ranks,
    /// each runs the pass on its shard in a thread of its own.
    pub fn forward_batch(&self, items: &mut [BatchItem<'_>]) -> candle_core::Result<Vec<Option<Tensor>>> {
        if items.is_empty() || items.iter().any(|b| b.ids.is_empty()) {
            candle_core::bail!("forward called with no tokens");
        }
        let views: Vec<ItemView<'_>> = items
            .iter()
            .map(|b| ItemView { ids: b.ids, pos0: b.cache.pos, logits: b.logits, images: b.images })
            .collect();
        // Image runs of each item (prefill only: a single-token step never holds an image).
        let groups: Vec<Vec<Option<u32>>> = views.iter().map(|b| self.image_groups(b.ids)).collect();
        let pass = Pass { views: &views, groups: &groups };
        // Each rank's caches of every item.
        let world = self.shards.len();
        let mut per_rank: Vec<Vec<&mut Vec<LayerCache>>> =
            (0..world).map(|_| Vec::with_capacity(items.len())).collect();
        for b in items.iter_mut() {
            if b.cache.ranks.len() != world {
                candle_core::bail!("a cache made for {} ranks used with {world}", b.cache.ranks.len());
            }
            for (r, c) in b.cache.ranks.iter_mut().enumerate() {
                per_rank[r].push(c);
            }
        }
        let logits = if world == 1 {
            let caches = per_rank.pop().expect("one rank");
            self.forward_shard(&self.shards[0], &pass, caches)?
        } else {
            let results: Vec<candle_core::Result<Option<Tensor>>> = std::thread::scope(|sc| {
                let handles: Vec<_> = self
                    .shards
                    .iter()
                    .zip(per_rank)
                    .map(|(shard, caches)| {
                        let pass = &pass;
                        sc.spawn(move || {
                            // A rank that errs or panics breaks the group, so that the others
                            // return from their collectives instead of waiting for it.
                            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                self.forward_shard(shard, pass, caches)
                            }))
                            .unwrap_or_else(|_| Err(candle_core::Error::Msg("the rank's thread panicked".into())));
                            if let Err(e) = &r {
                                shard.comm.abort(&e.to_string());
                            }
                            r
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| Err(candle_core::Error::Msg("a rank panicked".into()))))
                    .collect()
            });
            // Every rank ends with the same logits; rank 0's are returned.
            let mut first = None;
            for r in results {
                let l = r?;
                first.get_or_insert(l);
            }
            first.flatten()
        };
        let mut out = Vec::with_capacity(items.len());
        let mut off = 0;
        for b in items.iter_mut() {
            let t = b.ids.len();
            b.cache.pos += t;
            let n = match b.logits {
                Logits::Last => 1,
                Logits::All => t,
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

    /// One rank's pass over its shard; returns the logits (whole vocabulary) of the rows
    /// asked for, or none.
    fn forward_shard(
        &self,
        shard: &Shard,
        pass: &Pass<'_>,
        mut caches: Vec<&mut Vec<LayerCache>>,
    ) -> candle_core::Result<Option<Tensor>> {
        let views = pass.views;
        let (cfg, dev) = (&self.cfg, &shard.device);
        // The tables of every row of the pass are made at once (one copy to the device), then
        // each item takes its rows.
        let positions: Vec<usize> = views.iter().flat_map(|b| b.pos0..b.pos0 + b.ids.len()).collect();
        let local = rope_tables(positions.iter().copied(), cfg.head_dim, cfg.rope_local_base, 1.0, dev)?;
        let global =
            rope_tables(positions.iter().copied(), cfg.head_dim, cfg.rope_global_base, cfg.rope_global_factor, dev)?;
        let mut ropes = Vec::with_capacity(views.len());
        let mut off = 0;
        for b in views {
            let t = b.ids.len();
            let rows = |(c, s): &(Tensor, Tensor)| -> candle_core::Result<(Tensor, Tensor)> {
                Ok((c.narrow(0, off, t)?, s.narrow(0, off, t)?))
            };
            ropes.push(Rope { local: rows(&local)?, global: rows(&global)? });
            off += t;
        }
        let all_ids: Vec<u32> = views.iter().flat_map(|b| b.ids.iter().copied()).collect();
        let mut x = self.embed_with_images(shard, views, &all_ids)?;
        for (i, layer) in shard.layers.iter().enumerate() {
            let _span = tracing::trace_span!("layer", i).entered();
            let residual = x.clone();
            let h = layer.input_norm.forward(&x)?;
            let a = &layer.attn;
            let (q, k, v) = (a.q.forward(&h)?, a.k.forward(&h)?, a.v.forward(&h)?);
            let mut outs = Vec::with_capacity(views.len());
            let mut off = 0;
            for (((b, rope), g), cache) in views.iter().zip(&ropes).zip(pass.groups).zip(caches.iter_mut()) {
                let t = b.ids.len();
                let (qb, kb, vb) = (q.narrow(0, off, t)?, k.narrow(0, off, t)?, v.narrow(0, off, t)?);
                let step = Step { layer: i, pos0: b.pos0, rope, groups: g, device: dev };
                outs.push(self.attention(&shard.cfg, a, (&qb, &kb, &vb), &mut cache[i], &step)?);
                off += t;
            }
            let out = if outs.len() == 1 { outs.pop().expect("one") } else { Tensor::cat(&outs, 0)? };
            let h = shard.comm.all_reduce_sum(&a.o.forward(&out)?)?;
            let h = layer.post_attn_norm.forward(&h)?;
            x = (residual + h)?;
            let residual = x.clone();
            let h = layer.pre_ff_norm.forward(&x)?;
            let g = self.gelu(&layer.mlp.gate.forward(&h)?)?;
            let u = layer.mlp.up.forward(&h)?;
            let h = shard.comm.all_reduce_sum(&layer.mlp.down.forward(&(g * u)?)?)?;
            let h = layer.post_ff_norm.forward(&h)?;
            x = (residual + h)?;
        }
        // Only the rows whose logits are wanted go through the output head.
        let mut rows = Vec::with_capacity(views.len());
        let mut off = 0;
        for b in views {
            let t = b.ids.len();
            match b.logits {
                Logits::Last => rows.push(x.narrow(0, off + t - 1, 1)?),
                Logits::All => rows.push(x.narrow(0, off, t)?),
                Logits::None => {}
            }
            off += t;
        }
        if rows.is_empty() {
            return Ok(None);
        }
        let x = if rows.len() == 1 { rows.pop().expect("one") } else { Tensor::cat(&rows, 0)? };
        let x = shard.norm.forward(&x)?;
        let mut logits = shard.comm.all_gather_last(&shard.lm_head.forward(&x.contiguous()?)?)?;
        if let Some(cap) = self.cfg.final_logit_softcap {
            logits = ((logits / cap)?.tanh()? * cap)?;
        }
        Ok(Some(logits))
    }

    /// The scaled embeddings of every item's ids, with image rows in place of the image soft
    /// tokens (not scaled: transformers scatters the projected image features after the
    /// embedding scale).
    fn embed_with_images(&self, shard: &Shard, items: &[ItemView<'_>], all_ids: &[u32]) -> candle_core::Result<Tensor> {
        let soft = self.image_token_id;
        // A soft-token id outside the vocabulary (tiny test vocabularies) is looked up as 0,
        // as transformers does; its row is replaced anyway.
        let lookup: Vec<u32> =
            all_ids.iter().map(|&t| if Some(t) == soft && t as usize >= self.cfg.vocab_size { 0 } else { t }).collect();
        let x = (self.embed_rows(shard, &lookup)? * self.embed_scale)?;
        let Some(soft) = soft else { return Ok(x) };
        if !all_ids.contains(&soft) {
            return Ok(x);
        }
        // Rows of `x` followed by every image row; each position picks its row by index.
        let n = all_ids.len();
        let mut table = vec![x];
        let mut index = Vec::with_capacity(n);
        let (mut off, mut extra) = (0usize, n);
        for b in items {
            let count = b.ids.iter().filter(|&&t| t == soft).count();
            let rows = match (count, b.images) {
                (0, _) => 0,
                (c, Some(img)) if img.dim(0)? == c => {
                    table.push(img.to_dtype(DType::F32)?.to_device(&shard.device)?);
                    c
                }
                (c, Some(img)) => {
                    candle_core::bail!("{c} image soft tokens in the prompt, {} image rows given", img.dim(0)?)
                }
                (c, None) => candle_core::bail!("{c} image soft tokens in the prompt but no image given"),
            };
            let mut k = 0;
            for (j, &t) in b.ids.iter().enumerate() {
                if t == soft {
                    index.push((extra + k) as u32);
                    k += 1;
                } else {
                    index.push((off + j) as u32);
                }
            }
            off += b.ids.len();
            extra += rows;
        }
        let table = Tensor::cat(&table, 0)?;
        table.index_select(&Tensor::new(index.as_slice(), &shard.device)?, 0)
    }

    /// Embedding rows of `ids` (f32, unscaled). A shard holding part of the vocabulary looks
    /// up its own rows, zeros for the others, and the ranks' rows are summed.
    fn embed_rows(&self, shard: &Shard, ids: &[u32]) -> candle_core::Result<Tensor> {
        if shard.comm.world() == 1 {
            let ids_t = Tensor::new(ids, &shard.device)?;
            return shard.embed.lookup(&ids_t)?.to_dtype(DType::F32);
        }
        let (lo, n) = (shard.vocab_start, shard.vocab_rows);
        let held = |t: u32| (t as usize) >= lo && (t as usize) < lo + n;
        let local: Vec<u32> = ids.iter().map(|&t| if held(t) { t - lo as u32 } else { 0 }).collect();
        let mine: Vec<f32> = ids.iter().map(|&t| if held(t) { 1.0 } else { 0.0 }).collect();
        let rows = shard.embed.lookup(&Tensor::new(local.as_slice(), &shard.device)?)?.to_dtype(DType::F32)?;
        let mask = Tensor::from_vec(mine, (ids.len(), 1), &shard.device)?;
        shard.comm.all_reduce_sum(&rows.broadcast_mul(&mask)?)
    }

    /// For each position of a prompt chunk, the image run it belongs to (numbered from 0
    /// within the chunk), or `None` for text.
    fn image_groups(&self, ids: &[u32]) -> Vec<Option<u32>> {
        let Some(soft) = self.image_token_id else { return Vec::new() };
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

    /// Attention of one sequence's new rows (`q`, `k`, `v` already projected). `groups`
    /// gives the image run of each new row (empty when there is none): rows of one run see
    /// each other both ways (within the sliding window on local layers, which bounds only
    /// how far back a key may be), as transformers' mask does at prefill.
    fn attention(
        &self,
        cfg: &TextConfig,
        a: &Attention,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        lc: &mut LayerCache,
        step: &Step<'_>,
    ) -> candle_core::Result<Tensor> {
        let (layer_idx, pos0, rope, groups) = (step.layer, step.pos0, step.rope, step.groups);
        let t = q.dim(0)?;
        let (h, kvh, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let is_global = cfg.layer_is_global[layer_idx];
        let (cos, sin) = if is_global { &rope.global } else { &rope.local };

        let q = q.reshape((t, h, hd))?;
        let k = k.reshape((t, kvh, hd))?;
        let v = v.reshape((t, kvh, hd))?;
        let q = a.q_norm.forward(&q)?.transpose(0, 1)?.contiguous()?;
        let k = a.k_norm.forward(&k)?.transpose(0, 1)?.contiguous()?;
        let v = v.transpose(0, 1)?.contiguous()?;
        let mut q = apply_rope(&q, cos, sin)?;
        let mut k = apply_rope(&k, cos, sin)?;
        let mut v = v;
        if self.numeric.f16_attention {
            q = round_f16(&q)?;
            k = round_f16(&k)?;
            v = round_f16(&v)?;
        }
        if self.attention_dtype != DType::F32 {
            // Keys and values are cached in the attention dtype; q is rounded after scaling.
            k = k.to_dtype(self.attention_dtype)?;
            v = v.to_dtype(self.attention_dtype)?;
        }
        let (k_all, v_all) = match (&lc.k, &lc.v) {
            (Some(pk), Some(pv)) => (Tensor::cat(&[pk, &k], 1)?, Tensor::cat(&[pv, &v], 1)?),
            _ => {
                lc.start = pos0;
                (k, v)
            }
        };
        let s = k_all.dim(1)?;
        let start = lc.start;

        // Scores for all heads at once: query heads of one KV group share its keys.
        let g = h / kvh;
        let ad = self.attention_dtype;
        let q = (q * cfg.query_pre_attn_scalar.powf(-0.5))?.reshape((kvh, g * t, hd))?;
        let q = if ad == DType::F32 { q } else { q.to_dtype(ad)? };
        let (mut p, v_vis, n) = if t == 1 {
            // One new token (a decode step) sees a suffix of the cache: all of it on global
            // layers, its last `W` positions on local ones. Attending to that suffix needs no
            // mask, so nothing is built on the host and copied to the device per sequence and
            // layer (a copy that would also wait for the device's queue).
            let first = if is_global { start } else { (pos0 + 1).saturating_sub(cfg.sliding_window).max(start) };
            let (skip, n) = (first - start, s - (first - start));
            let (k_vis, v_vis) = (k_all.narrow(1, skip, n)?, v_all.narrow(1, skip, n)?);
            let scores = q.matmul(&k_vis.t()?)?.to_dtype(DType::F32)?;
            (softmax_last(&scores)?, v_vis, n)
        } else {
            let scores = q.matmul(&k_all.t()?)?.to_dtype(DType::F32)?.reshape((h, t, s))?;
            let mut mask = Vec::with_capacity(t * s);
            for i in 0..t {
                let qp = pos0 + i;
                let group = groups.get(i).copied().flatten();
                for j in 0..s {
                    let kp = start + j;
                    let same_image = group.is_some() && kp >= pos0 && groups[kp - pos0] == group;
                    let in_window = is_global || kp + cfg.sliding_window > qp;
                    let visible = in_window && (kp <= qp || same_image);
                    mask.push(if visible { 0f32 } else { f32::NEG_INFINITY });
                }
            }
            let mask = Tensor::from_vec(mask, (1, t, s), step.device)?;
            (softmax_last(&scores.broadcast_add(&mask)?)?, v_all.clone(), s)
        };
        if self.numeric.f16_attention {
            p = round_f16(&p)?;
        }
        let p = if ad == DType::F32 { p } else { p.to_dtype(ad)? };
        let out = p.reshape((kvh, g * t, n))?.matmul(&v_vis)?.to_dtype(DType::F32)?.reshape((h, t, hd))?;
        let out = out.transpose(0, 1)?.reshape((t, h * hd))?;

        // Keep only what later queries can see (plus slack for prefix reuse).
        let (k_all, v_all, start) = if !is_global && s > cfg.sliding_window - 1 + LOCAL_CACHE_SLACK {
            let keep = cfg.sliding_window - 1 + LOCAL_CACHE_SLACK / 2;
            let drop = s - keep;
            (k_all.narrow(1, drop, keep)?, v_all.narrow(1, drop, keep)?, start + drop)
        } else {
            (k_all, v_all, start)
        };
        lc.k = Some(k_all);
        lc.v = Some(v_all);
        lc.start = start;
        Ok(out)
    }

    fn gelu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if !self.numeric.f16_gelu {
            return x.gelu();
        }
        let table = round_f16(&round_f16(x)?.gelu()?)?;
        let high = x.ge(GELU_TABLE_LIMIT)?;
        let low = x.le(-GELU_TABLE_LIMIT)?;
        let y = high.where_cond(x, &table)?;
        low.where_cond(&x.zeros_like()?, &y)
    }

    /// A fresh per-sequence cache for this model.
    pub fn new_cache(&self) -> SeqCache {
        SeqCache::with_ranks(self.cfg.num_layers, self.shards.len())
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
