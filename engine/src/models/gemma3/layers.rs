//! The layers of the Gemma 3 decoder: RMSNorm, attention, the gated MLP and the decoder layer
//! with its sandwich norms. Each layer loads its own weights from a [`LayerSource`] (a GGUF
//! file, a safetensors checkpoint read for one rank, or random values) and runs its own
//! forward pass.

use super::linear::Linear;
use super::{apply_rope, round_f16, ItemView, NumericOptions, Rope};
use crate::comm::Communicator;
use crate::kv::LayerCache;
use crate::load::config::TextConfig;
use crate::EngineError;
use candle_core::{DType, Device, Tensor, D};

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

/// What a layer's pass needs besides its input rows: the rank's shape and communicator, and
/// each item's place in the pass.
pub(crate) struct LayerPass<'a> {
    /// This rank's view of the shape (its heads, KV heads and MLP width).
    pub cfg: &'a TextConfig,
    pub numeric: NumericOptions,
    pub attention_dtype: DType,
    pub comm: &'a dyn Communicator,
    pub items: &'a [ItemView<'a>],
    pub ropes: &'a [Rope],
    /// The image run of each new row of each item (empty for items without one).
    pub groups: &'a [Vec<Option<u32>>],
    pub device: &'a Device,
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

    /// Layer `index` over the rows `x` of every item of the pass, appending each item's keys
    /// and values to its cache.
    pub(crate) fn forward(
        &self,
        index: usize,
        x: &Tensor,
        pass: &LayerPass<'_>,
        caches: &mut [&mut Vec<LayerCache>],
    ) -> candle_core::Result<Tensor> {
        let _span = tracing::trace_span!("layer", index).entered();
        let h = self.attn.forward(index, &self.input_norm.forward(x)?, pass, caches)?;
        let x = (x + self.post_attn_norm.forward(&h)?)?;
        let h = self.mlp.forward(&self.pre_ff_norm.forward(&x)?, pass)?;
        x + self.post_ff_norm.forward(&h)?
    }
}

impl Mlp {
    /// `down(gelu_tanh(gate(x)) * up(x))`; `down` is row-parallel, so the ranks' partial sums
    /// are added.
    fn forward(&self, x: &Tensor, pass: &LayerPass<'_>) -> candle_core::Result<Tensor> {
        let g = gelu(&self.gate.forward(x)?, pass.numeric)?;
        let u = self.up.forward(x)?;
        pass.comm.all_reduce_sum(&self.down.forward(&(g * u)?)?)
    }
}

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
    /// Self-attention of every item's new rows against its cache; `o` is row-parallel, so the
    /// ranks' partial sums are added.
    fn forward(
        &self,
        layer: usize,
        h: &Tensor,
        pass: &LayerPass<'_>,
        caches: &mut [&mut Vec<LayerCache>],
    ) -> candle_core::Result<Tensor> {
        let (q, k, v) = (self.q.forward(h)?, self.k.forward(h)?, self.v.forward(h)?);
        let mut outs = Vec::with_capacity(pass.items.len());
        let mut off = 0;
        for (i, (item, cache)) in pass.items.iter().zip(caches.iter_mut()).enumerate() {
            let t = item.ids.len();
            let (qb, kb, vb) = (q.narrow(0, off, t)?, k.narrow(0, off, t)?, v.narrow(0, off, t)?);
            let (qb, kb, vb) = self.rotate(layer, (&qb, &kb, &vb), &pass.ropes[i], pass)?;
            let step = crate::kv::Step {
                pos0: item.pos0,
                is_global: pass.cfg.layer_is_global[layer],
                groups: &pass.groups[i],
                device: pass.device,
            };
            outs.push(crate::kv::attend(
                pass.cfg,
                pass.numeric,
                pass.attention_dtype,
                (&qb, kb, vb),
                &mut cache[layer],
                &step,
            )?);
            off += t;
        }
        let out = if outs.len() == 1 { outs.pop().expect("one") } else { Tensor::cat(&outs, 0)? };
        pass.comm.all_reduce_sum(&self.o.forward(&out)?)
    }

    /// One item's q, k and v as `[heads, t, head_dim]`: q and k normed per head and rotated,
    /// rounded to f16 as llama.cpp's cache does when asked, and k and v in the cache's dtype.
    fn rotate(
        &self,
        layer: usize,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        rope: &Rope,
        pass: &LayerPass<'_>,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let cfg = pass.cfg;
        let t = q.dim(0)?;
        let (h, kvh, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let (cos, sin) = if cfg.layer_is_global[layer] { &rope.global } else { &rope.local };
        let q = self.q_norm.forward(&q.reshape((t, h, hd))?)?.transpose(0, 1)?.contiguous()?;
        let k = self.k_norm.forward(&k.reshape((t, kvh, hd))?)?.transpose(0, 1)?.contiguous()?;
        let v = v.reshape((t, kvh, hd))?.transpose(0, 1)?.contiguous()?;
        let mut q = apply_rope(&q, cos, sin)?;
        let mut k = apply_rope(&k, cos, sin)?;
        let mut v = v;
        if pass.numeric.f16_attention {
            q = round_f16(&q)?;
            k = round_f16(&k)?;
            v = round_f16(&v)?;
        }
        if pass.attention_dtype != DType::F32 {
            // Keys and values are cached in the attention dtype; q is rounded after scaling.
            k = k.to_dtype(pass.attention_dtype)?;
            v = v.to_dtype(pass.attention_dtype)?;
        }
        Ok((q, k, v))
    }
}
