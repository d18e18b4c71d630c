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
use candle_core::{Tensor, D};

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
        let g = gelu(&self.gate.forward(x)?, pass.consts.numeric)?;
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
