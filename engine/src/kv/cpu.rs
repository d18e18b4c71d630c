//! Attention over paged keys and values on the CPU: one call per layer for every sequence
//! of a pass, prompt chunks and single decode rows alike.
//!
//! Work is split over candle's CPU thread pool by (sequence, KV head, tile of query rows);
//! a work item widens the keys and values it needs to f32 once and serves every query head
//! of its KV group. Each query row attends to one contiguous range of positions — causal,
//! cut to the sliding window on local layers, extended to the end of its image on image
//! rows — and its result is computed the same way whatever else is in the pass: the same
//! keys in the same order, the same lanes, so a batched sequence gets the values it gets
//! alone.
//!
//! Hand-written rather than built from candle operations: those need a score matrix, a mask
//! and a softmax per sequence and head group (a few dozen small operations, each sequence
//! on its own), which made attention the largest cost of a batched decode step here.

use super::manager::PageId;
use super::pages::{HostData, PageStore, Store};
use candle_core::DType;
use half::{bf16, f16};
use std::cell::RefCell;

/// Query rows per work item.
const ROW_TILE: usize = 16;
/// Lanes of the dot products: independent partial sums combined in a fixed order, so the
/// result does not depend on the vector width the machine has.
const LANES: usize = 16;

/// One sequence's part of a layer's attention.
pub(crate) struct SeqRows<'a> {
    /// First row of the pass's `q` and output.
    pub row: usize,
    /// New rows (queries).
    pub len: usize,
    /// Position of the first new row.
    pub pos0: usize,
    /// The sequence's page of each block for this layer.
    pub pages: &'a [PageId],
    /// Image run of each new row (empty when there is none).
    pub groups: &'a [Option<u32>],
}

/// What a layer's attention computes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttnShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Keys a query sees at most (sliding-window layers); `None` on global layers.
    pub window: Option<usize>,
    /// `query_pre_attn_scalar^-0.5`.
    pub scale: f32,
    /// Round attention probabilities to f16 (llama.cpp's f16 KV cache).
    pub f16_probs: bool,
    /// Round the two products' results to this dtype (bf16/f16 weights), as a product in
    /// that dtype does.
    pub round_to: DType,
}

fn round(x: f32, to: DType) -> f32 {
    match to {
        DType::BF16 => bf16::from_f32(x).to_f32(),
        DType::F16 => f16::from_f32(x).to_f32(),
        _ => x,
    }
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in ra.iter().zip(rb).enumerate() {
        acc[l] += x * y;
    }
    // Pairwise, in a fixed order.
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            acc[l] += acc[l + w];
        }
    }
    acc[0]
}

/// The positions row `r` of `s` sees: `first ..= last`.
fn visible(s: &SeqRows<'_>, r: usize, window: Option<usize>) -> (usize, usize) {
    let qp = s.pos0 + r;
    let first = window.map_or(0, |w| (qp + 1).saturating_sub(w));
    let mut last = qp;
    if let Some(g) = s.groups.get(r).copied().flatten() {
        let mut j = r + 1;
        while j < s.len && s.groups[j] == Some(g) {
            j += 1;
        }
        last = s.pos0 + j - 1;
    }
    (first, last)
}

struct Scratch {
    k: RowScratch,
    v: RowScratch,
    scores: Vec<f32>,
    q: Vec<f32>,
    acc: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = const {
        RefCell::new(Scratch {
            k: RowScratch { buf: Vec::new(), offs: Vec::new() },
            v: RowScratch { buf: Vec::new(), offs: Vec::new() },
            scores: Vec::new(),
            q: Vec::new(),
            acc: Vec::new(),
        })
    };
}

/// Where work items write: rows of `[rows, heads × head_dim]`.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every (row, head) of the output is written by exactly one work item, so workers
// never touch the same elements; the buffer outlives the call that hands the pointer out.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Attention of every sequence's new rows. `q` is `[rows, heads, head_dim]` (rotated, not
/// yet scaled); the new keys and values are already in `store`. Returns `[rows, heads ×
/// head_dim]`.
pub(crate) fn attention(q: &[f32], seqs: &[SeqRows<'_>], store: &PageStore, shape: AttnShape) -> Vec<f32> {
    let (h, kvh, hd) = (shape.heads, shape.kv_heads, shape.head_dim);
    let rows: usize = seqs.iter().map(|s| s.len).sum();
    let mut out = vec![0f32; rows * h * hd];
    let Store::Host { k: kstore, v: vstore } = &store.data else { unreachable!("the CPU kernel runs on host pages") };
    // Work items: (sequence, KV head, tile of rows).
    let mut items: Vec<(usize, usize, usize)> = Vec::new();
    for (i, s) in seqs.iter().enumerate() {
        for g in 0..kvh {
            for t in (0..s.len).step_by(ROW_TILE) {
                items.push((i, g, t));
            }
        }
    }
    let out_ptr = OutPtr(out.as_mut_ptr());
    let work = |range: std::ops::Range<usize>| {
        let out_ptr = out_ptr;
        SCRATCH.with(|cell| {
            let sc = &mut *cell.borrow_mut();
            for &(i, g, t0) in &items[range] {
                let s = &seqs[i];
                let t1 = (t0 + ROW_TILE).min(s.len);
                let spans: Vec<(usize, usize)> = (t0..t1).map(|r| visible(s, r, shape.window)).collect();
                let lo = spans.iter().map(|x| x.0).min().unwrap_or(0);
                let hi = spans.iter().map(|x| x.1).max().unwrap_or(0) + 1;
                let ksrc = RowSource { store, data: kstore, pages: s.pages, head: g };
                let vsrc = RowSource { store, data: vstore, pages: s.pages, head: g };
                let (kbase, koff) = key_rows(&ksrc, lo, hi, &mut sc.k);
                let (vbase, voff) = key_rows(&vsrc, lo, hi, &mut sc.v);
                let group = h / kvh;
                for (r, &(first, last)) in (t0..t1).zip(&spans) {
                    for hq in g * group..(g + 1) * group {
                        let qrow = &q[((s.row + r) * h + hq) * hd..][..hd];
                        sc.q.clear();
                        sc.q.extend(qrow.iter().map(|&x| round(x * shape.scale, shape.round_to)));
                        let n = last + 1 - first;
                        sc.scores.clear();
                        let mut max = f32::NEG_INFINITY;
                        for p in first..=last {
                            let kr = &kbase[koff[p - lo]..][..hd];
                            let x = round(dot(&sc.q, kr), shape.round_to);
                            max = max.max(x);
                            sc.scores.push(x);
                        }
                        let mut sum = 0f32;
                        for x in sc.scores.iter_mut() {
                            *x = (*x - max).exp();
                            sum += *x;
                        }
                        sc.acc.clear();
                        sc.acc.resize(hd, 0.0);
                        for (j, &e) in sc.scores.iter().enumerate().take(n) {
                            let mut pj = e / sum;
                            if shape.f16_probs {
                                pj = f16::from_f32(pj).to_f32();
                            }
                            let pj = round(pj, shape.round_to);
                            let vr = &vbase[voff[first + j - lo]..][..hd];
                            for (a, &x) in sc.acc.iter_mut().zip(vr) {
                                *a += pj * x;
                            }
                        }
                        // SAFETY: see `OutPtr`; the slice lies inside `out`.
                        let dst =
                            unsafe { std::slice::from_raw_parts_mut(out_ptr.0.add(((s.row + r) * h + hq) * hd), hd) };
                        for (o, &a) in dst.iter_mut().zip(&sc.acc) {
                            *o = round(a, shape.round_to);
                        }
                    }
                }
            }
        });
    };
    candle_core::utils::barrier_pool().execute_chunked(items.len(), work);
    out
}

/// Where one KV head's rows of one sequence are.
struct RowSource<'a> {
    store: &'a PageStore,
    data: &'a HostData,
    pages: &'a [PageId],
    head: usize,
}

/// Rows widened to f32 (for f16 and bf16 stores) and each row's offset.
#[derive(Default)]
struct RowScratch {
    buf: Vec<f32>,
    offs: Vec<usize>,
}

/// Positions `lo..hi` as f32 rows: a slice and each row's offset in it. An f32 store is read
/// in place; f16 and bf16 rows are widened into the scratch.
fn key_rows<'a>(src: &RowSource<'a>, lo: usize, hi: usize, scratch: &'a mut RowScratch) -> (&'a [f32], &'a [usize]) {
    let (store, hd) = (src.store, src.store.head_dim);
    let width = store.row_width();
    let at = |p: usize| store.slot(src.pages[p / store.block], p) * width + src.head * hd;
    scratch.offs.clear();
    if let Some(base) = src.data.as_f32() {
        scratch.offs.extend((lo..hi).map(at));
        return (base, &scratch.offs);
    }
    scratch.buf.clear();
    scratch.buf.resize((hi - lo) * hd, 0.0);
    for p in lo..hi {
        src.data.read(at(p), &mut scratch.buf[(p - lo) * hd..(p - lo + 1) * hd]);
        scratch.offs.push((p - lo) * hd);
    }
    (&scratch.buf, &scratch.offs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_is_the_same_for_any_split() {
        let a: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..37).map(|i| (i as f32 * 0.11).cos()).collect();
        let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        assert!((dot(&a, &b) as f64 - exact).abs() < 1e-5);
    }

    #[test]
    fn rows_see_causal_windowed_and_image_ranges() {
        let groups = [None, Some(0), Some(0), Some(0), None];
        let s = SeqRows { row: 0, len: 5, pos0: 10, pages: &[], groups: &groups };
        assert_eq!(visible(&s, 0, None), (0, 10));
        assert_eq!(visible(&s, 1, None), (0, 13), "an image row sees its whole image");
        assert_eq!(visible(&s, 3, Some(4)), (10, 13));
        assert_eq!(visible(&s, 4, Some(4)), (11, 14));
    }
}
