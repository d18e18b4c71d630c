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

#[inline(always)]
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

/// A dot product with [`dot`]'s arithmetic: lane `l` sums the products of elements `l`,
/// `l + 16`, … in order (no fused multiply-add), then the lanes are added pairwise. The
/// SIMD variants hold the sixteen lanes in vector registers, which LLVM does not manage on
/// its own for this loop (it gave shuffled 4-wide code: 23 % of pp512 in this kernel).
trait Dot {
    /// # Safety
    /// The CPU has the variant's target features.
    unsafe fn dot(a: &[f32], b: &[f32]) -> f32;
}

struct Portable;
impl Dot for Portable {
    #[inline(always)]
    unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        dot(a, b)
    }
}

/// Adds the remainder to `acc` and reduces it as [`dot`] does.
#[inline(always)]
fn finish(mut acc: [f32; LANES], ra: &[f32], rb: &[f32]) -> f32 {
    for (l, (x, y)) in ra.iter().zip(rb).enumerate() {
        acc[l] += x * y;
    }
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            acc[l] += acc[l + w];
        }
    }
    acc[0]
}

#[cfg(target_arch = "x86_64")]
struct Avx512;
#[cfg(target_arch = "x86_64")]
impl Dot for Avx512 {
    #[inline(always)]
    unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY (caller): the CPU has AVX-512F.
        unsafe { dot_avx512(a, b) }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len()) / LANES * LANES;
    let mut acc = [0f32; LANES];
    // SAFETY: loads of 16 floats at offsets below `n`, inside both slices; the store fills
    // `acc`, 16 floats.
    unsafe {
        let mut v = _mm512_setzero_ps();
        let mut i = 0;
        while i < n {
            v = _mm512_add_ps(v, _mm512_mul_ps(_mm512_loadu_ps(a.as_ptr().add(i)), _mm512_loadu_ps(b.as_ptr().add(i))));
            i += LANES;
        }
        _mm512_storeu_ps(acc.as_mut_ptr(), v);
    }
    finish(acc, &a[n..], &b[n..])
}

#[cfg(target_arch = "x86_64")]
struct Avx2;
#[cfg(target_arch = "x86_64")]
impl Dot for Avx2 {
    #[inline(always)]
    unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY (caller): the CPU has AVX2.
        unsafe { dot_avx2(a, b) }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len()) / LANES * LANES;
    let mut acc = [0f32; LANES];
    // SAFETY: as in `dot_avx512`, lanes 0–7 and 8–15 in two registers.
    unsafe {
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i < n {
            let (pa, pb) = (a.as_ptr().add(i), b.as_ptr().add(i));
            lo = _mm256_add_ps(lo, _mm256_mul_ps(_mm256_loadu_ps(pa), _mm256_loadu_ps(pb)));
            hi = _mm256_add_ps(hi, _mm256_mul_ps(_mm256_loadu_ps(pa.add(8)), _mm256_loadu_ps(pb.add(8))));
            i += LANES;
        }
        _mm256_storeu_ps(acc.as_mut_ptr(), lo);
        _mm256_storeu_ps(acc.as_mut_ptr().add(8), hi);
    }
    finish(acc, &a[n..], &b[n..])
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

#[derive(Default)]
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
    let ctx = Ctx { q, seqs, store, kstore, vstore, shape, items: &items, out: OutPtr(out.as_mut_ptr()) };
    let run = pick_work();
    candle_core::utils::barrier_pool().execute_chunked(items.len(), |range| {
        // SAFETY: `pick_work` returns a SIMD variant only where the CPU has its features.
        unsafe { run(&ctx, range) }
    });
    out
}

/// What every work item of one attention call reads and where it writes.
struct Ctx<'a, 'b> {
    q: &'a [f32],
    seqs: &'a [SeqRows<'b>],
    store: &'a PageStore,
    kstore: &'a HostData,
    vstore: &'a HostData,
    shape: AttnShape,
    items: &'a [(usize, usize, usize)],
    out: OutPtr,
}

type Work = unsafe fn(&Ctx<'_, '_>, std::ops::Range<usize>);

/// The work loop compiled for the widest vectors this CPU has. The code is the same in each
/// variant and Rust never fuses a multiply and an add on its own, so every variant computes
/// the same sums in the same order and gets the same bits; only the vector width changes
/// (measured on the demo model's pp512, 2 threads: see docs/benchmarks.md, "Blocked
/// quantized kernels").
fn pick_work() -> Work {
    static CHOSEN: std::sync::OnceLock<Work> = std::sync::OnceLock::new();
    *CHOSEN.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            // `MEDBATCH_KERNEL` (see `crate::kernels`) picks narrower paths for comparisons.
            let wanted = std::env::var("MEDBATCH_KERNEL").unwrap_or_default();
            if wanted == "avx2" && is_x86_feature_detected!("avx2") {
                return work_avx2 as Work;
            }
            if wanted != "portable" {
                if is_x86_feature_detected!("avx512f") {
                    return work_avx512 as Work;
                }
                if is_x86_feature_detected!("avx2") {
                    return work_avx2 as Work;
                }
            }
        }
        work_portable as Work
    })
}

/// `unsafe` only to share the variants' signature: it needs nothing of the CPU.
unsafe fn work_portable(ctx: &Ctx<'_, '_>, range: std::ops::Range<usize>) {
    // SAFETY: the portable dot product needs nothing of the CPU.
    unsafe { work::<Portable>(ctx, range) }
}

/// Callers make sure the CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn work_avx512(ctx: &Ctx<'_, '_>, range: std::ops::Range<usize>) {
    // SAFETY (caller): the CPU has AVX-512F.
    unsafe { work::<Avx512>(ctx, range) }
}

/// Callers make sure the CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn work_avx2(ctx: &Ctx<'_, '_>, range: std::ops::Range<usize>) {
    // SAFETY (caller): the CPU has AVX2.
    unsafe { work::<Avx2>(ctx, range) }
}

/// Work items `range` of `ctx.items`.
///
/// # Safety
/// The CPU has the target features `D` needs.
#[inline(always)]
unsafe fn work<D: Dot>(ctx: &Ctx<'_, '_>, range: std::ops::Range<usize>) {
    let Ctx { q, seqs, store, kstore, vstore, shape, items, out: out_ptr } = *ctx;
    let (h, kvh, hd) = (shape.heads, shape.kv_heads, shape.head_dim);
    // The scratch is taken out of the thread-local and put back, rather than used inside
    // `with`'s closure: code in that closure would be compiled without the caller's
    // target features.
    let mut scratch = SCRATCH.with(|cell| cell.take());
    {
        let sc = &mut scratch;
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
                        // SAFETY (caller): the CPU has what `D` needs.
                        let x = round(unsafe { D::dot(&sc.q, kr) }, shape.round_to);
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
                    let dst = unsafe { std::slice::from_raw_parts_mut(out_ptr.0.add(((s.row + r) * h + hq) * hd), hd) };
                    for (o, &a) in dst.iter_mut().zip(&sc.acc) {
                        *o = round(a, shape.round_to);
                    }
                }
            }
        }
    }
    SCRATCH.with(|cell| cell.replace(scratch));
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
    fn simd_dot_products_give_the_portable_bits() {
        for len in [1, 15, 16, 17, 64, 255, 256, 257] {
            let a: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
            let b: Vec<f32> = (0..len).map(|i| (i as f32 * 0.11).cos() / 7.0).collect();
            let want = dot(&a, &b);
            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F.
                    assert_eq!(unsafe { Avx512::dot(&a, &b) }.to_bits(), want.to_bits(), "avx512, {len}");
                }
                if is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2.
                    assert_eq!(unsafe { Avx2::dot(&a, &b) }.to_bits(), want.to_bits(), "avx2, {len}");
                }
            }
        }
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
