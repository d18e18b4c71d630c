//! Blocked matrix products of f32 activations with quantized weights (GGUF Q8_0, Q4_0, Q4_K,
//! Q5_K, Q6_K), batch-invariant.
//!
//! - **Activations** are quantized per row exactly as candle's row-wise kernel did (its own
//!   `from_float`: Q8_0 blocks of 32 for Q8_0/Q4_0 weights, Q8_K superblocks of 256 for
//!   k-quants), so a row's quantized input never depends on the other rows.
//! - **Weights** are repacked at load into panels of [`PANEL`] rows: for each block, the
//!   panel's quantized values as unsigned bytes, interleaved four values per row at a time
//!   (`[chunk][row][4]`), with each row's scales in f32. A panel is read once for a tile of up
//!   to [`ROW_TILE`] activation rows.
//! - **Every output element is accumulated over K in one fixed order**: exact integer dot
//!   products per sub-block, then one fused multiply-add per block (or superblock) in block
//!   order. The AVX-512 VNNI, AVX2 and portable paths do the same operations in the same
//!   order, so the result of a row depends neither on how many rows share the call, nor on
//!   the tile, nor on the threads (which split panels, never K), nor on the machine's vector
//!   width.
//!
//! Hand-written rather than taken from candle: its row-wise kernel re-reads every weight row
//! for every activation row and converts each block's f16 scale through a function call
//! (61 % + 9 % of a batched decode step of the demo model), and its repacked tile kernels
//! quantize activations differently by batch size. Measured gains are in docs/benchmarks.md
//! ("Blocked quantized kernels").

pub mod dense_half;
#[cfg(target_arch = "x86_64")]
mod x86;

use candle_core::quantized::k_quants::{BlockQ8K, BlockQ8_0, GgmlType};
use half::f16;

/// Weight rows per panel: one AVX-512 vector of i32 or f32 lanes.
pub const PANEL: usize = 16;
/// Activation rows computed together against one panel.
pub const ROW_TILE: usize = 4;
/// Values per Q8_0 / Q4_0 block.
pub const QK8: usize = 32;
/// Values per k-quant superblock.
pub const QK_K: usize = 256;

/// Quantized weight layouts the blocked kernel takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightType {
    Q8_0,
    Q4_0,
    Q4K,
    Q5K,
    Q6K,
}

impl WeightType {
    /// Bytes of one stored block and values in it.
    pub fn block(self) -> (usize, usize) {
        match self {
            Self::Q8_0 => (34, QK8),
            Self::Q4_0 => (18, QK8),
            Self::Q4K => (144, QK_K),
            Self::Q5K => (176, QK_K),
            Self::Q6K => (210, QK_K),
        }
    }

    fn sub_block(self) -> usize {
        match self {
            Self::Q6K => 16,
            _ => 32,
        }
    }

    /// Whether values are kept as 4-bit nibbles in the panels (two chunks per byte run).
    pub(crate) fn nibbles(self) -> bool {
        matches!(self, Self::Q4_0 | Self::Q4K)
    }

    /// Bytes the panels keep per block of [`PANEL`] rows.
    fn packed_block(self) -> usize {
        let vals = self.block().1 * PANEL;
        if self.nibbles() {
            vals / 2
        } else {
            vals
        }
    }
}

/// One block of one panel as the kernels read it.
///
/// - `q`: `[values / 4][PANEL][4]` unsigned bytes (Q8_0: the signed value plus 128; Q5_K
///   0..31; Q6_K 0..63). 4-bit types (Q4_0 and Q4_K, 0..15) keep two chunks in one run of
///   bytes, `[values / 8][PANEL][4]`: chunk `2j` in the low nibbles, chunk `2j + 1` in the high
///   ones, so they take no more memory than in the GGUF file.
/// - Q8_0 and Q4_0 blocks: `d` per row; the kernel subtracts `128 × Σ activation` (Q8_0) or
///   `8 × Σ activation` (Q4_0) per block.
/// - k-quant superblocks: per sub-block and row an integer scale `sc` and min `mn`, and per
///   row `d` and `dmin`: the block contributes `da · (d · Σ sc·(q·a) − dmin · Σ mn·bsum)`.
///   Q6_K's `q − 32` becomes a min of `32 · sc` with `dmin = d`.
pub struct Panels {
    pub ty: WeightType,
    /// Output features (weight rows) and input features.
    pub n: usize,
    pub k: usize,
    /// `[panel][block][values / 4][PANEL][4]`.
    q: Vec<u8>,
    /// `[panel][block][sub-block][PANEL]`.
    sc: Vec<i32>,
    mn: Vec<i32>,
    /// `[panel][block][PANEL]`.
    d: Vec<f32>,
    dmin: Vec<f32>,
}

/// An activation row quantized as the weights' type wants it.
pub struct Activations {
    pub rows: usize,
    pub k: usize,
    /// `[rows][k]` signed values.
    q: Vec<i8>,
    /// `[rows][blocks]` scales.
    d: Vec<f32>,
    /// Sums of the values: Q8_0 `[rows][blocks]` per block of 32; Q8_K `[rows][blocks][16]` per
    /// 16 values.
    sums: Vec<i32>,
    blocks: usize,
}

impl Panels {
    pub fn panels(&self) -> usize {
        self.n.div_ceil(PANEL)
    }

    fn blocks(&self) -> usize {
        self.k / self.ty.block().1
    }

    fn nsb(&self) -> usize {
        match self.ty {
            WeightType::Q8_0 | WeightType::Q4_0 => 1,
            t => QK_K / t.sub_block(),
        }
    }

    /// Bytes the packed weights take.
    pub fn bytes(&self) -> usize {
        self.q.len() + 4 * (self.sc.len() + self.mn.len() + self.d.len() + self.dmin.len())
    }

    /// Packs GGUF blocks (`bytes`, rows of `k / block values` blocks each) of an `[n, k]`
    /// weight.
    pub fn pack(ty: WeightType, n: usize, k: usize, bytes: &[u8]) -> Result<Self, String> {
        let (bsize, bvals) = ty.block();
        if !k.is_multiple_of(bvals) {
            return Err(format!("{k} inputs are not a whole number of {bvals}-value blocks"));
        }
        let blocks = k / bvals;
        if bytes.len() != n * blocks * bsize {
            return Err(format!("{} bytes for {n} rows of {blocks} blocks of {bsize} bytes", bytes.len()));
        }
        let panels = n.div_ceil(PANEL);
        let nsb = match ty {
            WeightType::Q8_0 | WeightType::Q4_0 => 1,
            t => QK_K / t.sub_block(),
        };
        // Q8_0 and Q4_0 blocks have one scale and no min: only k-quants keep the rest.
        let kq = !matches!(ty, WeightType::Q8_0 | WeightType::Q4_0);
        let per = |len: usize| if kq { len } else { 0 };
        let mut p = Self {
            ty,
            n,
            k,
            q: vec![0; panels * blocks * ty.packed_block()],
            sc: vec![0; per(panels * blocks * nsb * PANEL)],
            mn: vec![0; per(panels * blocks * nsb * PANEL)],
            d: vec![0.0; panels * blocks * PANEL],
            dmin: vec![0.0; per(panels * blocks * PANEL)],
        };
        let mut vals = vec![0u8; bvals];
        let (mut sc, mut mn) = (vec![0i32; nsb], vec![0i32; nsb]);
        for row in 0..n {
            let (pi, r) = (row / PANEL, row % PANEL);
            for b in 0..blocks {
                let src = &bytes[(row * blocks + b) * bsize..][..bsize];
                let (d, dmin) = unpack(ty, src, &mut vals, &mut sc, &mut mn);
                let pb = pi * blocks + b;
                let q = &mut p.q[pb * ty.packed_block()..][..ty.packed_block()];
                for (c, chunk) in vals.chunks_exact(4).enumerate() {
                    if ty.nibbles() {
                        let (j, shift) = (c / 2, 4 * (c % 2));
                        for (l, &v) in chunk.iter().enumerate() {
                            q[(j * PANEL + r) * 4 + l] |= v << shift;
                        }
                    } else {
                        q[(c * PANEL + r) * 4..][..4].copy_from_slice(chunk);
                    }
                }
                p.d[pb * PANEL + r] = d;
                if kq {
                    for s in 0..nsb {
                        p.sc[(pb * nsb + s) * PANEL + r] = sc[s];
                        p.mn[(pb * nsb + s) * PANEL + r] = mn[s];
                    }
                    p.dmin[pb * PANEL + r] = dmin;
                }
            }
        }
        Ok(p)
    }

    /// The stored (unsigned) value `l` of chunk `c` of row `r` in block `pb` of the panels.
    pub(crate) fn value(&self, pb: usize, c: usize, r: usize, l: usize) -> u8 {
        let q = &self.q[pb * self.ty.packed_block()..];
        if self.ty.nibbles() {
            (q[((c / 2) * PANEL + r) * 4 + l] >> (4 * (c % 2))) & 0xF
        } else {
            q[(c * PANEL + r) * 4 + l]
        }
    }

    /// Quantizes `x` (`[rows, k]`) as this weight's kernel needs it.
    pub fn quantize(&self, x: &[f32]) -> Activations {
        let rows = x.len() / self.k;
        match self.ty {
            WeightType::Q8_0 | WeightType::Q4_0 => quantize_rows(x, rows, self.k, false),
            _ => quantize_rows(x, rows, self.k, true),
        }
    }

    /// `y = x · Wᵀ` for quantized activations `a`: `[rows, n]`, in panels `range` (the rest of
    /// `out` untouched). `out` holds `[rows, n]`.
    pub fn product(&self, a: &Activations, panels: std::ops::Range<usize>, out: &mut [f32]) {
        self.product_with(pick_kernel(), a, panels, out)
    }

    pub(crate) fn product_with(
        &self,
        kernel: Kernel,
        a: &Activations,
        panels: std::ops::Range<usize>,
        out: &mut [f32],
    ) {
        let mut tile = [[0f32; PANEL]; ROW_TILE];
        for p in panels {
            let mut r0 = 0;
            while r0 < a.rows {
                let rows = (a.rows - r0).min(ROW_TILE);
                kernel(self, a, p, r0, rows, &mut tile);
                for (t, acc) in tile.iter().enumerate().take(rows) {
                    let row = r0 + t;
                    let n0 = p * PANEL;
                    let width = PANEL.min(self.n - n0);
                    out[row * self.n + n0..][..width].copy_from_slice(&acc[..width]);
                }
                r0 += rows;
            }
        }
    }

    /// `y = x · Wᵀ` (`x`: `[rows, k]` f32), panels split over candle's CPU threads.
    pub fn matmul(&self, x: &[f32]) -> Vec<f32> {
        let a = self.quantize(x);
        let mut out = vec![0f32; a.rows * self.n];
        let ptr = OutPtr(out.as_mut_ptr(), out.len());
        candle_core::utils::barrier_pool().execute_chunked(self.panels(), |range| {
            let ptr = ptr;
            // SAFETY: panels write disjoint columns of `out` (each its own PANEL columns of
            // every row), and `out` outlives the call.
            let out = unsafe { std::slice::from_raw_parts_mut(ptr.0, ptr.1) };
            self.product(&a, range, out);
        });
        out
    }
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32, usize);
// SAFETY: see `Panels::matmul`: workers write disjoint elements.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Q4_K / Q5_K packed 6-bit scale and min of sub-block `j` (llama.cpp's `get_scale_min_k4`).
fn scale_min_k4(j: usize, s: &[u8]) -> (i32, i32) {
    if j < 4 {
        ((s[j] & 63) as i32, (s[j + 4] & 63) as i32)
    } else {
        (((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4)) as i32, ((s[j + 4] >> 4) | ((s[j] >> 6) << 4)) as i32)
    }
}

/// One stored block as unsigned values, sub-block scales and mins, `(d, dmin)`.
fn unpack(ty: WeightType, b: &[u8], vals: &mut [u8], sc: &mut [i32], mn: &mut [i32]) -> (f32, f32) {
    match ty {
        WeightType::Q8_0 => {
            for (v, &x) in vals.iter_mut().zip(&b[2..34]) {
                *v = (x as i8 as i32 + 128) as u8;
            }
            sc[0] = 1;
            mn[0] = 0;
            (f16_at(b, 0), 0.0)
        }
        WeightType::Q4_0 => {
            // Nibble `q` stands for `q − 8`: kept as is, the kernel subtracts `8 × Σa`.
            for l in 0..16 {
                vals[l] = b[2 + l] & 0xF;
                vals[l + 16] = b[2 + l] >> 4;
            }
            sc[0] = 1;
            mn[0] = 0;
            (f16_at(b, 0), 0.0)
        }
        WeightType::Q4K => {
            let (scales, qs) = (&b[4..16], &b[16..144]);
            for j in 0..4 {
                for l in 0..32 {
                    vals[64 * j + l] = qs[32 * j + l] & 0xF;
                    vals[64 * j + 32 + l] = qs[32 * j + l] >> 4;
                }
            }
            for j in 0..8 {
                (sc[j], mn[j]) = scale_min_k4(j, scales);
            }
            (f16_at(b, 0), f16_at(b, 2))
        }
        WeightType::Q5K => {
            let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
            for j in 0..4 {
                let (u1, u2) = (1u8 << (2 * j), 2u8 << (2 * j));
                for l in 0..32 {
                    vals[64 * j + l] = (qs[32 * j + l] & 0xF) + if qh[l] & u1 != 0 { 16 } else { 0 };
                    vals[64 * j + 32 + l] = (qs[32 * j + l] >> 4) + if qh[l] & u2 != 0 { 16 } else { 0 };
                }
            }
            for j in 0..8 {
                (sc[j], mn[j]) = scale_min_k4(j, scales);
            }
            (f16_at(b, 0), f16_at(b, 2))
        }
        WeightType::Q6K => {
            let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
            for n in 0..2 {
                let (ql, qh) = (&ql[64 * n..], &qh[32 * n..]);
                for l in 0..32 {
                    let v = &mut vals[128 * n..];
                    v[l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
                    v[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
                    v[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                    v[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                }
            }
            for j in 0..16 {
                sc[j] = scales[j] as i8 as i32;
                mn[j] = 32 * sc[j];
            }
            let d = f16_at(b, 208);
            (d, d)
        }
    }
}

/// Candle's Q8_0 (`k = false`, blocks of 32, with block sums) or Q8_K (`k = true`,
/// superblocks of 256, with sums per 16 values) quantization of each row, as its row-wise
/// kernel did. Rows are spread over candle's CPU threads; each row is quantized on its own,
/// so the split changes nothing.
fn quantize_rows(x: &[f32], rows: usize, k: usize, q8k: bool) -> Activations {
    let (bvals, nsums) = if q8k { (QK_K, 16) } else { (QK8, 1) };
    let blocks = k / bvals;
    let mut out = Activations {
        rows,
        k,
        q: vec![0; rows * k],
        d: vec![0.0; rows * blocks],
        sums: vec![0; rows * blocks * nsums],
        blocks,
    };
    let ptrs = RowPtrs(out.q.as_mut_ptr(), out.d.as_mut_ptr(), out.sums.as_mut_ptr());
    let work = |range: std::ops::Range<usize>| {
        let ptrs = ptrs;
        for r in range {
            // SAFETY: each row's slices are disjoint from every other row's, inside the
            // vectors allocated above, which outlive the call.
            let (q, d, sums) = unsafe {
                (
                    std::slice::from_raw_parts_mut(ptrs.0.add(r * k), k),
                    std::slice::from_raw_parts_mut(ptrs.1.add(r * blocks), blocks),
                    std::slice::from_raw_parts_mut(ptrs.2.add(r * blocks * nsums), blocks * nsums),
                )
            };
            let row = &x[r * k..(r + 1) * k];
            if q8k {
                quantize_row_q8k(row, q, d, sums);
            } else {
                quantize_row_q8_0(row, q, d, sums);
            }
        }
    };
    // A few rows (decode steps) are not worth waking the pool for.
    if rows < 8 {
        work(0..rows);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(rows, work);
    }
    out
}

#[derive(Clone, Copy)]
struct RowPtrs(*mut i8, *mut f32, *mut i32);
// SAFETY: see `quantize_rows`: workers write disjoint rows.
unsafe impl Send for RowPtrs {}
unsafe impl Sync for RowPtrs {}

fn quantize_row_q8_0(x: &[f32], q: &mut [i8], d: &mut [f32], sums: &mut [i32]) {
    let blocks = d.len();
    let mut b = vec![BlockQ8_0::zeros(); blocks];
    BlockQ8_0::from_float(x, &mut b);
    // SAFETY: `BlockQ8_0` is `repr(C)`: an f16 scale then 32 signed bytes (34 bytes, as
    // candle asserts); the slice covers exactly the vector's initialized blocks.
    let bytes = unsafe { std::slice::from_raw_parts(b.as_ptr() as *const u8, blocks * 34) };
    for j in 0..blocks {
        let blk = &bytes[j * 34..(j + 1) * 34];
        d[j] = f16_at(blk, 0);
        let mut s = 0i32;
        for (i, &v) in blk[2..].iter().enumerate() {
            q[j * QK8 + i] = v as i8;
            s += v as i8 as i32;
        }
        sums[j] = s;
    }
}

fn quantize_row_q8k(x: &[f32], q: &mut [i8], d: &mut [f32], sums: &mut [i32]) {
    const SIZE: usize = 4 + QK_K + 2 * (QK_K / 16);
    let blocks = d.len();
    let mut b = vec![BlockQ8K::zeros(); blocks];
    BlockQ8K::from_float(x, &mut b);
    // SAFETY: `BlockQ8K` is `repr(C)`: an f32 scale, 256 signed bytes, 16 i16 sums (292
    // bytes, as candle asserts).
    let bytes = unsafe { std::slice::from_raw_parts(b.as_ptr() as *const u8, blocks * SIZE) };
    for j in 0..blocks {
        let blk = &bytes[j * SIZE..(j + 1) * SIZE];
        d[j] = f32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]);
        for i in 0..QK_K {
            q[j * QK_K + i] = blk[4 + i] as i8;
        }
        for s in 0..16 {
            let at = 4 + QK_K + 2 * s;
            sums[j * 16 + s] = i16::from_le_bytes([blk[at], blk[at + 1]]) as i32;
        }
    }
}

/// A kernel computing `rows` activation rows from `r0` against panel `p` into `tile`.
pub(crate) type Kernel = fn(&Panels, &Activations, usize, usize, usize, &mut [[f32; PANEL]; ROW_TILE]);

/// Every kernel this CPU runs, fastest first, the portable one last.
pub(crate) fn kernels() -> Vec<(&'static str, Kernel)> {
    #[allow(unused_mut)]
    let mut out: Vec<(&'static str, Kernel)> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    out.extend(x86::kernels());
    out.push(("portable", scalar));
    out
}

/// The kernel in use: the fastest this CPU runs, or the one `MEDBATCH_KERNEL` names
/// (`avx512-vnni`, `avx2`, `portable`; for comparisons — every kernel gives the same bits).
fn pick_kernel() -> Kernel {
    static CHOSEN: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let all = kernels();
        let wanted = std::env::var("MEDBATCH_KERNEL").ok();
        match wanted.and_then(|w| all.iter().find(|(n, _)| *n == w)) {
            Some((_, k)) => *k,
            None => all[0].1,
        }
    })
}

/// Threads a product runs on: candle's CPU pool (`CANDLE_NUM_THREADS`, else every core).
pub fn threads() -> usize {
    candle_core::utils::barrier_pool().n_workers() + 1
}

/// The name of the kernel in use.
pub fn kernel_name() -> &'static str {
    let k = pick_kernel();
    kernels().into_iter().find(|(_, f)| std::ptr::fn_addr_eq(*f, k)).map(|(n, _)| n).unwrap_or("portable")
}

/// The sum activation row `row` contributes to a block's correction: Q8_0 blocks `128 ×
/// Σa` (weights stored plus 128), Q4_0 blocks `8 × Σa`; k-quant sub-block `s` its sum of
/// values. Inlined into the SIMD kernels: a call there would spill their vector registers.
#[inline(always)]
fn sub_sum(p: &Panels, a: &Activations, row: usize, b: usize, s: usize) -> i32 {
    match p.ty {
        WeightType::Q8_0 => 128 * a.sums[row * a.blocks + b],
        WeightType::Q4_0 => 8 * a.sums[row * a.blocks + b],
        WeightType::Q6K => a.sums[(row * a.blocks + b) * 16 + s],
        _ => a.sums[(row * a.blocks + b) * 16 + 2 * s] + a.sums[(row * a.blocks + b) * 16 + 2 * s + 1],
    }
}

/// The portable kernel, and the definition of the arithmetic every path reproduces.
fn scalar(p: &Panels, a: &Activations, pi: usize, r0: usize, rows: usize, tile: &mut [[f32; PANEL]; ROW_TILE]) {
    let (bvals, blocks, nsb, sbv) = (p.ty.block().1, p.blocks(), p.nsb(), p.ty.block().1 / p.nsb());
    let q8 = matches!(p.ty, WeightType::Q8_0 | WeightType::Q4_0);
    for (t, acc) in tile.iter_mut().enumerate().take(rows) {
        let row = r0 + t;
        *acc = [0.0; PANEL];
        for b in 0..blocks {
            let pb = pi * blocks + b;
            let x = &a.q[row * a.k + b * bvals..][..bvals];
            let da = a.d[row * a.blocks + b];
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let (mut sumi, mut summ) = (0i32, 0i32);
                for s in 0..nsb {
                    let mut dot = 0i32;
                    for c in s * sbv / 4..(s + 1) * sbv / 4 {
                        for l in 0..4 {
                            dot += p.value(pb, c, r, l) as i32 * x[c * 4 + l] as i32;
                        }
                    }
                    if q8 {
                        sumi = dot;
                    } else {
                        sumi += dot * p.sc[(pb * nsb + s) * PANEL + r];
                        summ += p.mn[(pb * nsb + s) * PANEL + r] * sub_sum(p, a, row, b, s);
                    }
                }
                let d = p.d[pb * PANEL + r];
                *acc_r = if q8 {
                    (d * da).mul_add((sumi - sub_sum(p, a, row, b, 0)) as f32, *acc_r)
                } else {
                    let t = (-p.dmin[pb * PANEL + r]).mul_add(summ as f32, d * sumi as f32);
                    da.mul_add(t, *acc_r)
                };
            }
        }
    }
}

/// candle's row-wise quantized product of `x` (`[rows, k]`) with the GGUF weight `w`
/// (`[n, k]`), the kernel the blocked one replaced: the reference for tests and benchmarks.
pub fn candle_row_wise(w: &candle_core::quantized::QTensor, x: &[f32]) -> candle_core::Result<Vec<f32>> {
    use candle_core::quantized::{k_quants as kq, GgmlDType};
    let (n, k) = w.shape().dims2()?;
    let rows = x.len() / k;
    let data = w.data()?;
    let mut out = vec![0f32; rows * n];
    /// The tensor's bytes as aligned blocks of `T`.
    fn blocks<T: kq::GgmlType>(b: &[u8]) -> Vec<T> {
        let n = b.len() / std::mem::size_of::<T>();
        let mut v: Vec<T> = Vec::with_capacity(n);
        // SAFETY: ggml block types are plain old data (integers and f16 scales, `repr(C)`);
        // `v` has room for `n` blocks and exactly `n * size_of::<T>()` bytes are written.
        unsafe {
            std::ptr::copy_nonoverlapping(b.as_ptr(), v.as_mut_ptr() as *mut u8, n * std::mem::size_of::<T>());
            v.set_len(n);
        }
        v
    }
    let mkn = (rows, k, n);
    match w.dtype() {
        GgmlDType::Q8_0 => kq::matmul(mkn, x, &blocks::<kq::BlockQ8_0>(&data), &mut out)?,
        GgmlDType::Q4_0 => kq::matmul(mkn, x, &blocks::<kq::BlockQ4_0>(&data), &mut out)?,
        GgmlDType::Q4K => kq::matmul(mkn, x, &blocks::<kq::BlockQ4K>(&data), &mut out)?,
        GgmlDType::Q5K => kq::matmul(mkn, x, &blocks::<kq::BlockQ5K>(&data), &mut out)?,
        GgmlDType::Q6K => kq::matmul(mkn, x, &blocks::<kq::BlockQ6K>(&data), &mut out)?,
        t => candle_core::bail!("no row-wise kernel for {t:?}"),
    }
    Ok(out)
}

/// The GGUF type of a blocked weight type.
pub fn ggml_type(ty: WeightType) -> candle_core::quantized::GgmlDType {
    use candle_core::quantized::GgmlDType;
    match ty {
        WeightType::Q8_0 => GgmlDType::Q8_0,
        WeightType::Q4_0 => GgmlDType::Q4_0,
        WeightType::Q4K => GgmlDType::Q4K,
        WeightType::Q5K => GgmlDType::Q5K,
        WeightType::Q6K => GgmlDType::Q6K,
    }
}

#[cfg(test)]
mod tests;
