//! Linear layers whose weights are quantized blocks (GGUF) or dense tensors, and the token
//! embedding table.

use crate::kernels::{Panels, WeightType};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Tensor};
use std::sync::Arc;

/// A linear layer (no bias) whose weight is quantized (GGUF) or dense.
pub enum Linear {
    /// Quantized weights repacked for the blocked kernel (see [`crate::kernels`]): batch-
    /// invariant, each activation row quantized on its own as llama.cpp does.
    Blocks(Panels),
    /// Quantized types the blocked kernel does not take: candle's own quantized matmul.
    Quant(QMatMul),
    Dense(Tensor),
}

impl Linear {
    pub fn from_qtensor(t: Arc<QTensor>) -> candle_core::Result<Self> {
        let (n, k) = t.shape().dims2()?;
        let ty = match t.dtype() {
            GgmlDType::Q4_0 => WeightType::Q4_0,
            GgmlDType::Q8_0 => WeightType::Q8_0,
            GgmlDType::Q4K => WeightType::Q4K,
            GgmlDType::Q5K => WeightType::Q5K,
            GgmlDType::Q6K => WeightType::Q6K,
            _ => return Ok(Self::Quant(QMatMul::from_arc(t)?)),
        };
        let panels = Panels::pack(ty, n, k, &t.data()?).map_err(candle_core::Error::Msg)?;
        Ok(Self::Blocks(panels))
    }

    /// `x`: `[m, in]` f32 → `[m, out]` f32. Dense weights held in bf16 or f16 multiply in
    /// that dtype (the input rounded to it; the product accumulated in f32 by the GPU's GEMM,
    /// or by the CPU kernel of [`crate::kernels::dense_half`]) and the result is widened back,
    /// so the residual stream,
    /// norms and softmax stay in f32.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Blocks(p) => {
                let (m, k) = x.dims2()?;
                if k != p.k {
                    candle_core::bail!("linear layer takes {} inputs, got {k}", p.k);
                }
                let lhs: Vec<f32> = x.contiguous()?.flatten_all()?.to_vec1()?;
                Tensor::from_vec(p.matmul(&lhs), (m, p.n), x.device())
            }
            Self::Quant(q) => q.forward(x),
            Self::Dense(w) if w.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() != DType::F32 => {
                match half_forward(w, x)? {
                    Some(y) => Ok(y),
                    None => x.to_dtype(w.dtype())?.matmul(&w.t()?)?.to_dtype(x.dtype()),
                }
            }
            Self::Dense(w) if w.dtype() == x.dtype() => x.matmul(&w.t()?),
            Self::Dense(w) => x.to_dtype(w.dtype())?.matmul(&w.t()?)?.to_dtype(x.dtype()),
        }
    }
}

/// `x · wᵀ` for a contiguous bf16/f16 weight on the CPU by [`crate::kernels::dense_half`]
/// (rounding as a product in that dtype does), read in place; `None` for other weights.
fn half_forward(w: &Tensor, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    use crate::kernels::dense_half::{matmul, HalfWeights};
    use candle_core::{CpuStorage, Storage};
    let (n, k) = w.dims2()?;
    let (m, xk) = x.dims2()?;
    if xk != k {
        candle_core::bail!("linear layer takes {k} inputs, got {xk}");
    }
    let lhs: Vec<f32> = x.contiguous()?.flatten_all()?.to_vec1()?;
    let (storage, layout) = w.storage_and_layout();
    let Some((lo, hi)) = layout.contiguous_offsets() else { return Ok(None) };
    let out = match &*storage {
        Storage::Cpu(CpuStorage::BF16(v)) => matmul(&lhs, k, HalfWeights::Bf16(&v[lo..hi])),
        Storage::Cpu(CpuStorage::F16(v)) => matmul(&lhs, k, HalfWeights::F16(&v[lo..hi])),
        _ => return Ok(None),
    };
    Ok(Some(Tensor::from_vec(out, (m, n), x.device())?))
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
    /// Bytes the weight holds in memory (quantized weights as repacked).
    pub fn bytes(&self) -> u64 {
        match self {
            Self::Blocks(p) => p.bytes() as u64,
            Self::Quant(_) => 0,
            Self::Dense(w) => tensor_bytes(w),
        }
    }
}
