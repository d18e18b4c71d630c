//! The KV cache of the sequences being served: cached keys and values of every layer.

use crate::load::config::TextConfig;
use crate::models::gemma3::{round_f16, NumericOptions};
use candle_core::{DType, Device, Tensor, D};

/// Extra positions a local layer keeps beyond the `W - 1` it needs, so that a cached prompt
/// prefix can be cut back by up to this many tokens and reused.
pub const LOCAL_CACHE_SLACK: usize = 256;

/// One layer's cached keys and values for one sequence: positions `start .. start + len`.
#[derive(Clone, Default)]
pub(crate) struct LayerCache {
    pub(crate) k: Option<Tensor>,
    pub(crate) v: Option<Tensor>,
    pub(crate) start: usize,
}

/// The per-sequence state: cached keys/values of every layer (of every rank) and the next
/// position.
#[derive(Clone)]
pub struct SeqCache {
    pub(crate) ranks: Vec<Vec<LayerCache>>,
    pub(crate) pos: usize,
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

/// One sequence's place in one layer of a pass.
pub(crate) struct Step<'a> {
    pub pos0: usize,
    pub is_global: bool,
    /// The image run of each new row (empty when there is none).
    pub groups: &'a [Option<u32>],
    pub device: &'a Device,
}

fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

/// Attention of one sequence's new rows (`q`, `k`, `v` as `[heads, t, head_dim]`, rotated),
/// appending `k` and `v` to the layer's cache. `step.groups` gives the image run of each new
/// row: rows of one run see each other both ways (within the sliding window on local
/// layers, which bounds only how far back a key may be), as transformers' mask does at
/// prefill. Returns `[t, heads × head_dim]`.
pub(crate) fn attend(
    cfg: &TextConfig,
    numeric: NumericOptions,
    ad: DType,
    (q, k, v): (&Tensor, Tensor, Tensor),
    lc: &mut LayerCache,
    step: &Step<'_>,
) -> candle_core::Result<Tensor> {
    let (pos0, groups, is_global) = (step.pos0, step.groups, step.is_global);
    let (h, kvh, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
    let t = q.dim(1)?;
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
    if numeric.f16_attention {
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
