//! Attention on a GPU through candle-flash-attn's paged, windowed varlen kernel (feature
//! `flash-attn`): one kernel per layer for every sequence of the pass — prompt chunks and
//! decode rows of different lengths together — reading keys and values straight from the
//! pages through the pass's block tables.
//!
//! What it cannot serve goes to the gathered path: f32 (the kernel is bf16/f16 only),
//! pages of a size that is not a multiple of 32, head sizes over 256 or not a multiple of 8.
//! Image runs among the new rows are passed as ranges whose rows see each other both ways;
//! the kernel lets such a pair through its sliding window as well, where transformers keeps
//! the window (`window AND (causal OR same image)`) — the two differ only for an image
//! longer than the window, which MedGemma's 256-token images never are (windows of 512 and
//! 1,024).

use super::cpu::AttnShape;
use super::device::DeviceTables;
use super::pages::{PageStore, Store};
use candle_core::{DType, Tensor};

/// Largest head size the kernel's paged path is built for here.
const MAX_HEAD_DIM: usize = 256;

/// Whether the kernel serves a layer whose pages are `store`.
pub(crate) fn serves(store: &PageStore) -> bool {
    matches!(store.data, Store::Device { .. })
        && matches!(store.dtype, DType::BF16 | DType::F16)
        && store.block.is_multiple_of(32)
        && store.head_dim.is_multiple_of(8)
        && store.head_dim <= MAX_HEAD_DIM
}

/// Attention of every new row of the pass (`q`: `[rows, heads, head_dim]`, rotated, not
/// scaled) against layer `layer`'s pages. Returns `[rows, heads × head_dim]` in f32.
pub(crate) fn attention(
    q: &Tensor,
    layer: usize,
    tables: &DeviceTables,
    store: &PageStore,
    shape: AttnShape,
) -> candle_core::Result<Tensor> {
    let Store::Device { k, v } = &store.data else { candle_core::bail!("candle-flash-attn runs on device pages") };
    let paged = (store.pages, store.block, store.kv_heads, store.head_dim);
    let (k, v) = (k.reshape(paged)?, v.reshape(paged)?);
    let rows = q.dim(0)?;
    let q = q.to_dtype(store.dtype)?.contiguous()?;
    let out = candle_flash_attn::flash_attn_varlen_paged_windowed(
        &q,
        &k,
        &v,
        &tables.cu_q,
        &tables.cu_k,
        &tables.table(layer)?,
        tables.image_spans.as_ref(),
        tables.max_q,
        tables.max_k,
        shape.scale,
        // Keys `qp - (W - 1) ..= qp`: the window counts the query itself.
        shape.window.map(|w| w - 1),
        Some(0),
        store.block,
        None,
    )?;
    out.to_dtype(DType::F32)?.reshape((rows, shape.heads * shape.head_dim))
}
