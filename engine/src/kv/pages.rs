//! Where one rank's pages live: host memory on the CPU, device tensors on a GPU.
//!
//! A page holds `block` positions of one layer, each position all of the rank's KV heads
//! (`[block, kv_heads, head_dim]`); keys and values have a store each. A position's slot is
//! `page · block + offset`, and the stores are indexed by slot: `[pages · block, kv_heads ·
//! head_dim]`, or `[pages, block, kv_heads, head_dim]` seen as pages.

use super::manager::PageId;
use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};

/// A host store: f32, or f16/bf16 kept as their bits (so that the allocation is zeroed
/// memory the system hands out lazily, touched only as pages are used).
pub(crate) enum HostData {
    F32(Vec<f32>),
    F16(Vec<u16>),
    BF16(Vec<u16>),
}

impl HostData {
    fn zeroed(dtype: DType, n: usize) -> candle_core::Result<Self> {
        Ok(match dtype {
            DType::F32 => Self::F32(vec![0f32; n]),
            DType::F16 => Self::F16(vec![0u16; n]),
            DType::BF16 => Self::BF16(vec![0u16; n]),
            other => candle_core::bail!("a KV cache in {other:?} is not supported"),
        })
    }

    /// Writes `src` at element `at`, rounded to the store's dtype.
    fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            Self::F32(d) => d[at..at + src.len()].copy_from_slice(src),
            Self::F16(d) => {
                for (o, &x) in d[at..at + src.len()].iter_mut().zip(src) {
                    *o = f16::from_f32(x).to_bits();
                }
            }
            Self::BF16(d) => {
                for (o, &x) in d[at..at + src.len()].iter_mut().zip(src) {
                    *o = bf16::from_f32(x).to_bits();
                }
            }
        }
    }

    /// Reads `dst.len()` elements at `at`, widened to f32 (exactly; the half crate's slice
    /// conversion uses the CPU's F16C instructions where it has them).
    pub(crate) fn read(&self, at: usize, dst: &mut [f32]) {
        use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
        let n = dst.len();
        match self {
            Self::F32(d) => dst.copy_from_slice(&d[at..at + n]),
            Self::F16(d) => d[at..at + n].reinterpret_cast::<f16>().convert_to_f32_slice(dst),
            Self::BF16(d) => d[at..at + n].reinterpret_cast::<bf16>().convert_to_f32_slice(dst),
        }
    }

    /// The store itself when it holds f32 (rows can then be read in place).
    pub(crate) fn as_f32(&self) -> Option<&[f32]> {
        match self {
            Self::F32(d) => Some(d),
            _ => None,
        }
    }
}

pub(crate) enum Store {
    Host {
        k: HostData,
        v: HostData,
    },
    /// `[pages · block, kv_heads · head_dim]` each.
    Device {
        k: Tensor,
        v: Tensor,
    },
}

/// One rank's pages of every layer.
pub struct PageStore {
    pub block: usize,
    pub pages: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub dtype: DType,
    pub(crate) data: Store,
}

impl PageStore {
    /// A store of `pages` pages on `device`: host memory on the CPU, device memory (taken
    /// now) elsewhere.
    pub fn new(
        device: &Device,
        dtype: DType,
        pages: usize,
        block: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> candle_core::Result<Self> {
        let rows = pages * block;
        let width = kv_heads * head_dim;
        let data = if device.is_cpu() {
            Store::Host { k: HostData::zeroed(dtype, rows * width)?, v: HostData::zeroed(dtype, rows * width)? }
        } else {
            Store::Device {
                k: Tensor::zeros((rows, width), dtype, device)?,
                v: Tensor::zeros((rows, width), dtype, device)?,
            }
        };
        Ok(Self { block, pages, kv_heads, head_dim, dtype, data })
    }

    /// Elements of one position (all KV heads).
    pub fn row_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Bytes the store takes when every page is in use (keys and values).
    pub fn bytes(&self) -> u64 {
        (2 * self.pages * self.block * self.row_width() * self.dtype.size_in_bytes()) as u64
    }

    /// The slot of position `pos` of a sequence whose block `pos / block` is `page`.
    pub fn slot(&self, page: PageId, pos: usize) -> usize {
        page as usize * self.block + pos % self.block
    }

    /// Writes the rows of `k` and `v` (`[n, kv_heads, head_dim]`, f32 on the host or the
    /// store's dtype on its device) at `slots` (host) / `slots_dev` (`[n]` u32 on the
    /// device).
    pub fn write(
        &mut self,
        slots: &[u32],
        slots_dev: Option<&Tensor>,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<()> {
        let width = self.row_width();
        match &mut self.data {
            Store::Host { k: hk, v: hv } => {
                let kh = k.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                let vh = v.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                for (r, &s) in slots.iter().enumerate() {
                    let at = s as usize * width;
                    hk.write(at, &kh[r * width..(r + 1) * width]);
                    hv.write(at, &vh[r * width..(r + 1) * width]);
                }
                Ok(())
            }
            Store::Device { k: dk, v: dv } => {
                let n = slots.len();
                let idx = match slots_dev {
                    Some(t) => t.clone(),
                    None => Tensor::new(slots, dk.device())?,
                };
                let idx = idx.reshape((n, 1))?.broadcast_as((n, width))?.contiguous()?;
                let kr = k.reshape((n, width))?.to_dtype(self.dtype)?.contiguous()?;
                let vr = v.reshape((n, width))?.to_dtype(self.dtype)?.contiguous()?;
                dk.scatter_set(&idx, &kr, 0)?;
                dv.scatter_set(&idx, &vr, 0)
            }
        }
    }

    /// Keys and values of `slots` as `[kv_heads, n, head_dim]` tensors of the store's dtype
    /// on `device` (a gather: for the reference attention path).
    pub fn gather(&self, slots: &[u32], device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        let (n, width) = (slots.len(), self.row_width());
        let (k, v) = match &self.data {
            Store::Host { k, v } => {
                let mut kb = vec![0f32; n * width];
                let mut vb = vec![0f32; n * width];
                for (r, &s) in slots.iter().enumerate() {
                    k.read(s as usize * width, &mut kb[r * width..(r + 1) * width]);
                    v.read(s as usize * width, &mut vb[r * width..(r + 1) * width]);
                }
                let kt = Tensor::from_vec(kb, (n, width), device)?.to_dtype(self.dtype)?;
                let vt = Tensor::from_vec(vb, (n, width), device)?.to_dtype(self.dtype)?;
                (kt, vt)
            }
            Store::Device { k, v } => {
                let idx = Tensor::new(slots, k.device())?;
                (k.index_select(&idx, 0)?, v.index_select(&idx, 0)?)
            }
        };
        let shape = (n, self.kv_heads, self.head_dim);
        Ok((k.reshape(shape)?.transpose(0, 1)?.contiguous()?, v.reshape(shape)?.transpose(0, 1)?.contiguous()?))
    }
}
