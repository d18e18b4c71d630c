//! Linear layers whose weights are quantized blocks (GGUF) or dense tensors, and the token
//! embedding table.

use candle_core::quantized::{k_quants, GgmlDType, QMatMul, QTensor};
use candle_core::{Module, Tensor};
use std::sync::Arc;

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
    pub(crate) fn lookup(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Quant(q) => q.embedding(ids),
            Self::Dense(w) => w.index_select(ids, 0),
        }
    }
}

pub(crate) fn tensor_bytes(t: &Tensor) -> u64 {
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
