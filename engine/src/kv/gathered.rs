//! Attention by gathering each sequence's visible keys and values out of the pages into
//! contiguous tensors, then candle operations: a score matrix, a mask, a softmax and a
//! product per sequence.
//!
//! It runs on any device and is the arithmetic the engine used before pages: the reference
//! the kernels are tested against, and the path a GPU takes where no fused kernel serves
//! (f32, or a build without the `flash-attn` feature). It is per sequence — a few dozen
//! small operations each — so it is not the fast path anywhere.

use super::cpu::AttnShape;
use super::manager::PageId;
use super::pages::PageStore;
use candle_core::{DType, Device, Tensor, D};

fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

fn round_f16(t: &Tensor) -> candle_core::Result<Tensor> {
    t.to_dtype(DType::F16)?.to_dtype(DType::F32)
}

/// One sequence's new rows `q` (`[heads, t, head_dim]`, rotated, not scaled) against its
/// pages (`pages`: its page of each block for this layer; the new keys and values already
/// written). `groups` gives the image run of each new row: rows of one run see each other
/// both ways (within the sliding window on local layers, which bounds only how far back a
/// key may be), as transformers' mask does at prefill. Returns `[t, heads × head_dim]`.
pub(crate) fn attention(
    q: &Tensor,
    pos0: usize,
    pages: &[PageId],
    groups: &[Option<u32>],
    store: &PageStore,
    shape: AttnShape,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let (h, kvh, hd) = (shape.heads, shape.kv_heads, shape.head_dim);
    let t = q.dim(1)?;
    let start = shape.window.map_or(0, |w| (pos0 + 1).saturating_sub(w));
    let end = pos0 + t;
    let slots: Vec<u32> = (start..end).map(|p| store.slot(pages[p / store.block], p) as u32).collect();
    let (k_all, v_all) = store.gather(&slots, device)?;
    let s = end - start;
    let ad = shape.round_to;

    // Scores for all heads at once: query heads of one KV group share its keys.
    let g = h / kvh;
    let q = (q * f64::from(shape.scale))?.reshape((kvh, g * t, hd))?;
    let q = if ad == DType::F32 { q } else { q.to_dtype(ad)? };
    let (k_all, v_all) = if ad == DType::F32 {
        (k_all.to_dtype(DType::F32)?, v_all.to_dtype(DType::F32)?)
    } else {
        (k_all.to_dtype(ad)?, v_all.to_dtype(ad)?)
    };
    let scores = q.matmul(&k_all.t()?)?.to_dtype(DType::F32)?;
    let mut p = if t == 1 {
        // One new token sees exactly the gathered range: no mask.
        softmax_last(&scores)?
    } else {
        let scores = scores.reshape((h, t, s))?;
        let mut mask = Vec::with_capacity(t * s);
        for i in 0..t {
            let qp = pos0 + i;
            let group = groups.get(i).copied().flatten();
            for j in 0..s {
                let kp = start + j;
                let same_image = group.is_some() && kp >= pos0 && groups[kp - pos0] == group;
                let in_window = shape.window.is_none_or(|w| kp + w > qp);
                let visible = in_window && (kp <= qp || same_image);
                mask.push(if visible { 0f32 } else { f32::NEG_INFINITY });
            }
        }
        let mask = Tensor::from_vec(mask, (1, t, s), device)?;
        softmax_last(&scores.broadcast_add(&mask)?)?
    };
    if shape.f16_probs {
        p = round_f16(&p)?;
    }
    let p = if ad == DType::F32 { p } else { p.to_dtype(ad)? };
    let out = p.reshape((kvh, g * t, s))?.matmul(&v_all)?.to_dtype(DType::F32)?.reshape((h, t, hd))?;
    out.transpose(0, 1)?.reshape((t, h * hd))
}
