//! The layers of the Gemma 3 decoder: RMSNorm, attention, the gated MLP and the decoder layer
//! with its sandwich norms. Each layer loads its own weights from a [`LayerSource`] (a GGUF
//! file, a safetensors checkpoint read for one rank, or random values) and runs its own
//! forward pass.

use super::linear::Linear;
use super::pass::{rotate, LayerPass};
use super::{round_f16, AttentionImpl, NumericOptions};
use crate::kv::cpu::{AttnShape, SeqRows};
use crate::kv::PageStore;
use crate::EngineError;
use candle_core::{DType, Tensor, D};

/// Beyond this magnitude llama.cpp's GELU returns the input (or zero) instead of the table.
const GELU_TABLE_LIMIT: f64 = 10.0;

/// RMSNorm with the effective multiplier already resolved (`w` for GGUF, whose files store
/// Gemma's `1 + w`; `1 + w` computed in f32 for safetensors).
pub struct RmsNorm {
    pub(crate) weight: Tensor,
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

/// A weight a decoder layer asks for, whatever its file calls it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerParam {
    InputNorm,
    Q,
    K,
    V,
    O,
    QNorm,
    KNorm,
    PostAttentionNorm,
    PreFeedForwardNorm,
    Gate,
    Up,
    Down,
    PostFeedForwardNorm,
}

/// Where a layer's weights come from. A source for one tensor-parallel rank returns that
/// rank's slice of each matrix.
pub trait LayerSource {
    fn linear(&mut self, layer: usize, p: LayerParam) -> Result<Linear, EngineError>;
    fn norm(&mut self, layer: usize, p: LayerParam) -> Result<RmsNorm, EngineError>;
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

impl Layer {
    /// Loads layer `i` from `src`.
    pub fn load(src: &mut dyn LayerSource, i: usize) -> Result<Self, EngineError> {
        use LayerParam as P;
        Ok(Self {
            input_norm: src.norm(i, P::InputNorm)?,
            attn: Attention {
                q: src.linear(i, P::Q)?,
                k: src.linear(i, P::K)?,
                v: src.linear(i, P::V)?,
                o: src.linear(i, P::O)?,
                q_norm: src.norm(i, P::QNorm)?,
                k_norm: src.norm(i, P::KNorm)?,
            },
            post_attn_norm: src.norm(i, P::PostAttentionNorm)?,
            pre_ff_norm: src.norm(i, P::PreFeedForwardNorm)?,
            mlp: Mlp { gate: src.linear(i, P::Gate)?, up: src.linear(i, P::Up)?, down: src.linear(i, P::Down)? },
            post_ff_norm: src.norm(i, P::PostFeedForwardNorm)?,
        })
    }

    /// Layer `index` over the rows `x` of every item of the pass, writing each row's key and
    /// value to its sequence's page.
    pub(crate) fn forward(
        &self,
        index: usize,
        x: &Tensor,
        pass: &LayerPass<'_>,
        store: &mut PageStore,
    ) -> candle_core::Result<Tensor> {
        let _span = tracing::trace_span!("layer", index).entered();
        let h = self.attn.forward(index, &self.input_norm.forward(x)?, pass, store)?;
        let x = (x + self.post_attn_norm.forward(&h)?)?;
        let h = self.mlp.forward(&self.pre_ff_norm.forward(&x)?, pass)?;
        x + self.post_ff_norm.forward(&h)?
    }
}

impl Mlp {
    /// `down(gelu_tanh(gate(x)) * up(x))`; `down` is row-parallel, so the ranks' partial sums
    /// are added.
    fn forward(&self, x: &Tensor, pass: &LayerPass<'_>) -> candle_core::Result<Tensor> {
        let (g, u) = (self.gate.forward(x)?, self.up.forward(x)?);
        let h = match gelu_mul_cpu(&g, &u, pass.consts.numeric)? {
            Some(h) => h,
            None => (gelu(&g, pass.consts.numeric)? * u)?,
        };
        pass.comm.all_reduce_sum(&self.down.forward(&h)?)
    }
}

/// candle's tanh-approximated GELU of one f32 (its `Gelu::f32`, the same expression).
#[inline(always)]
fn gelu_f32(v: f32) -> f32 {
    const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
    0.5 * v * (1.0 + f32::tanh(SQRT_TWO_OVER_PI * v * (1.0 + 0.044715 * v * v)))
}

/// llama.cpp's GELU table: the GELU of every f16 value, rounded to f16 (as `gelu` below
/// computes it), indexed by the f16's bits.
fn gelu_f16_table() -> &'static [f32] {
    static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX).map(|b| half::f16::from_f32(gelu_f32(half::f16::from_bits(b).to_f32())).to_f32()).collect()
    })
}

/// `gelu(g) * u` for f32 tensors on the CPU in one pass over candle's thread pool, with the
/// bits of [`gelu`] followed by candle's product (the same operations per element); `None`
/// elsewhere. Replaces six whole-tensor passes (f16 rounding, GELU, comparisons, selects)
/// of which the GELU ran on one thread.
fn gelu_mul_cpu(g: &Tensor, u: &Tensor, numeric: NumericOptions) -> candle_core::Result<Option<Tensor>> {
    if !g.device().is_cpu() || g.dtype() != DType::F32 || u.dtype() != DType::F32 || g.shape() != u.shape() {
        return Ok(None);
    }
    let (gv, uv) = (g.flatten_all()?.to_vec1::<f32>()?, u.flatten_all()?.to_vec1::<f32>()?);
    let mut out = vec![0f32; gv.len()];
    let table = numeric.f16_gelu.then(gelu_f16_table);
    let limit = GELU_TABLE_LIMIT as f32;
    const CHUNK: usize = 4096;
    let ptr = OutPtr(out.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(gv.len().div_ceil(CHUNK), |range| {
        let ptr = ptr;
        let (lo, hi) = (range.start * CHUNK, (range.end * CHUNK).min(gv.len()));
        // SAFETY: chunks are disjoint ranges of `out`, which outlives the call.
        let dst = unsafe { std::slice::from_raw_parts_mut(ptr.0.add(lo), hi - lo) };
        for ((o, &x), &y) in dst.iter_mut().zip(&gv[lo..hi]).zip(&uv[lo..hi]) {
            let a = match table {
                Some(_) if x >= limit => x,
                Some(_) if x <= -limit => 0.0,
                Some(t) => t[half::f16::from_f32(x).to_bits() as usize],
                None => gelu_f32(x),
            };
            *o = a * y;
        }
    });
    Ok(Some(Tensor::from_vec(out, g.shape(), g.device())?))
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: workers write disjoint chunks (see `gelu_mul_cpu`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

fn gelu(x: &Tensor, numeric: NumericOptions) -> candle_core::Result<Tensor> {
    if !numeric.f16_gelu {
        return x.gelu();
    }
    let table = round_f16(&round_f16(x)?.gelu()?)?;
    let high = x.ge(GELU_TABLE_LIMIT)?;
    let low = x.le(-GELU_TABLE_LIMIT)?;
    let y = high.where_cond(x, &table)?;
    low.where_cond(&x.zeros_like()?, &y)
}

impl Attention {
    /// Self-attention of every item's new rows against its pages, one attention call for the
    /// whole pass; `o` is row-parallel, so the ranks' partial sums are added.
    fn forward(
        &self,
        layer: usize,
        h: &Tensor,
        pass: &LayerPass<'_>,
        store: &mut PageStore,
    ) -> candle_core::Result<Tensor> {
        let cfg = pass.cfg;
        let (t, heads, kvh, hd) = (h.dim(0)?, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let is_global = cfg.layer_is_global[layer];
        let rope = if is_global { &pass.rope_global } else { &pass.rope_local };
        let q = self.q_norm.forward(&self.q.forward(h)?.reshape((t, heads, hd))?)?;
        let k = self.k_norm.forward(&self.k.forward(h)?.reshape((t, kvh, hd))?)?;
        let v = self.v.forward(h)?.reshape((t, kvh, hd))?;
        let (mut q, mut k, mut v) = (rotate(&q, rope)?, rotate(&k, rope)?, v);
        let numeric = pass.consts.numeric;
        if numeric.f16_attention {
            q = round_f16(&q)?;
            k = round_f16(&k)?;
            v = round_f16(&v)?;
        }
        let shape = AttnShape {
            heads,
            kv_heads: kvh,
            head_dim: hd,
            window: (!is_global).then_some(cfg.sliding_window),
            scale: cfg.query_pre_attn_scalar.powf(-0.5) as f32,
            f16_probs: numeric.f16_attention,
            round_to: pass.consts.attention_dtype,
        };
        let dt = pass.device_tables.as_ref();
        let slots = match dt {
            Some(_) => Vec::new(),
            None => pass.slots(layer, store),
        };
        store.write(&slots, dt.map(|d| d.slots(layer)).transpose()?.as_ref(), &k, &v)?;
        let out = match (pass.consts.attention, pass.device.is_cpu()) {
            (AttentionImpl::Fused, true) => self.attend_cpu(layer, &q, pass, store, shape)?,
            #[cfg(feature = "flash-attn")]
            (AttentionImpl::Fused, false) if crate::kv::flash::serves(store) => {
                crate::kv::flash::attention(&q, layer, dt.expect("device tables"), store, shape)?
            }
            _ => self.attend_gathered(layer, &q, pass, store, shape)?,
        };
        pass.comm.all_reduce_sum(&self.o.forward(&out)?)
    }

    /// The CPU kernel over every sequence of the pass at once.
    fn attend_cpu(
        &self,
        layer: usize,
        q: &Tensor,
        pass: &LayerPass<'_>,
        store: &PageStore,
        shape: AttnShape,
    ) -> candle_core::Result<Tensor> {
        let qv = q.flatten_all()?.to_vec1::<f32>()?;
        let seqs: Vec<SeqRows<'_>> = pass
            .job
            .items
            .iter()
            .zip(&pass.offsets)
            .map(|(it, &row)| SeqRows {
                row,
                len: it.ids.len(),
                pos0: it.pos0,
                pages: it.pages(layer),
                groups: &it.groups,
            })
            .collect();
        let out = crate::kv::cpu::attention(&qv, &seqs, store, shape);
        Tensor::from_vec(out, (pass.rows, shape.heads * shape.head_dim), pass.device)
    }

    /// The reference path: each sequence's keys gathered, candle operations per sequence.
    fn attend_gathered(
        &self,
        layer: usize,
        q: &Tensor,
        pass: &LayerPass<'_>,
        store: &PageStore,
        shape: AttnShape,
    ) -> candle_core::Result<Tensor> {
        let mut outs = Vec::with_capacity(pass.job.items.len());
        for (it, &row) in pass.job.items.iter().zip(&pass.offsets) {
            let n = it.ids.len();
            let qi = q.narrow(0, row, n)?.transpose(0, 1)?.contiguous()?;
            outs.push(crate::kv::gathered::attention(
                &qi,
                it.pos0,
                it.pages(layer),
                &it.groups,
                store,
                shape,
                pass.device,
            )?);
        }
        if outs.len() == 1 {
            Ok(outs.pop().expect("one"))
        } else {
            Tensor::cat(&outs, 0)
        }
    }
}
