//! NCCL for GPU ranks (feature `cuda`): one communicator per device of this process, through
//! cudarc's `nccl` module as candle re-exports it. The all-reduce and the all-gather run as
//! candle custom ops on the stream of the rank's device, so they are ordered with its kernels.

use crate::comm::Communicator;
use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::nccl::safe::{Comm, ReduceOp};
use candle_core::cuda::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use std::sync::{Arc, Mutex, MutexGuard};

fn nccl_err(e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("NCCL: {e:?}"))
}

/// cudarc's `Comm` holds a raw `ncclComm_t` and so is not `Send`. NCCL lets a communicator be
/// used from any thread, one call at a time; the `Mutex` in [`Group`] serialises the calls.
struct SendComm(Comm);

// SAFETY: see `SendComm`: the communicator is only ever used under its mutex.
unsafe impl Send for SendComm {}

/// What the ranks of one group share: their communicators, and why the group failed. When a
/// rank fails, every communicator is taken out and dropped, which aborts it
/// (`ncclCommAbort`): collectives the other ranks have queued end instead of waiting forever
/// for the failed rank.
struct Group {
    comms: Vec<Mutex<Option<SendComm>>>,
    failed: Mutex<Option<String>>,
}

/// A rank's NCCL communicator.
pub struct Nccl {
    group: Arc<Group>,
    rank: usize,
    world: usize,
}

/// Locks a mutex even if a rank panicked while holding it (the state stays meaningful: a
/// taken communicator or a failure reason).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Nccl {
    /// One communicator per device, in device order (`ncclCommInitAll` over the devices'
    /// streams).
    pub fn group(devices: &[Device]) -> candle_core::Result<Vec<Nccl>> {
        let streams =
            devices.iter().map(|d| Ok(d.as_cuda_device()?.cuda_stream())).collect::<candle_core::Result<Vec<_>>>()?;
        let comms = Comm::from_devices(streams).map_err(nccl_err)?;
        let world = comms.len();
        let group = Arc::new(Group {
            comms: comms.into_iter().map(|c| Mutex::new(Some(SendComm(c)))).collect(),
            failed: Mutex::new(None),
        });
        Ok((0..world).map(|rank| Nccl { group: group.clone(), rank, world }).collect())
    }

    /// Runs `f` with this rank's communicator, unless the group has failed.
    fn with_comm<R>(&self, f: impl FnOnce(&Comm) -> candle_core::Result<R>) -> candle_core::Result<R> {
        if let Some(why) = &*lock(&self.group.failed) {
            candle_core::bail!("tensor-parallel group failed: {why}");
        }
        match &*lock(&self.group.comms[self.rank]) {
            Some(c) => f(&c.0),
            None => candle_core::bail!("tensor-parallel group failed: its communicators were aborted"),
        }
    }
}

/// Which collective a custom op runs.
enum Op<'a> {
    Sum(&'a Comm),
    Gather(&'a Comm, usize),
}

impl CustomOp1 for Op<'_> {
    fn name(&self) -> &'static str {
        match self {
            Op::Sum(_) => "nccl-all-reduce",
            Op::Gather(..) => "nccl-all-gather",
        }
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL collectives run on CUDA devices")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let n = l.shape().elem_count();
        match l.contiguous_offsets() {
            Some((0, end)) if end == n => {}
            _ => candle_core::bail!("NCCL collectives take contiguous tensors"),
        }
        let dev = s.device().clone();
        macro_rules! run {
            ($t:ty) => {{
                let src = s.as_cuda_slice::<$t>()?;
                match self {
                    Op::Sum(comm) => {
                        // SAFETY: every element is written by the all-reduce before use.
                        let mut dst = unsafe { dev.alloc::<$t>(n)? };
                        comm.all_reduce(src, &mut dst, &ReduceOp::Sum).map_err(nccl_err)?;
                        Ok((CudaStorage::wrap_cuda_slice(dst, dev), l.shape().clone()))
                    }
                    Op::Gather(comm, world) => {
                        // SAFETY: every element is written by the all-gather before use.
                        let mut dst = unsafe { dev.alloc::<$t>(n * world)? };
                        comm.all_gather(src, &mut dst).map_err(nccl_err)?;
                        Ok((CudaStorage::wrap_cuda_slice(dst, dev), Shape::from(n * world)))
                    }
                }
            }};
        }
        match s.dtype() {
            DType::F32 => run!(f32),
            DType::BF16 => run!(half::bf16),
            DType::F16 => run!(half::f16),
            other => candle_core::bail!("NCCL collectives on {other:?} are not supported"),
        }
    }
}

impl Communicator for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        let t = t.contiguous()?;
        self.with_comm(|comm| t.apply_op1_no_bwd(&Op::Sum(comm)))
    }
    fn all_gather_last(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        let (rows, cols) = t.dims2()?;
        let t = t.contiguous()?;
        // NCCL gathers rank after rank: [world, rows, cols] → [rows, world · cols].
        let g = self.with_comm(|comm| t.apply_op1_no_bwd(&Op::Gather(comm, self.world)))?;
        g.reshape((self.world, rows, cols))?.transpose(0, 1)?.contiguous()?.reshape((rows, self.world * cols))
    }
    fn abort(&self, why: &str) {
        {
            let mut failed = lock(&self.group.failed);
            if failed.is_some() {
                return;
            }
            *failed = Some(format!("rank {}: {why}", self.rank));
        }
        // Collectives are only enqueued under these locks, so a rank waiting on its stream for
        // a collective holds none of them; dropping a communicator aborts it.
        for slot in &self.group.comms {
            drop(lock(slot).take());
        }
    }
    fn failed(&self) -> Option<String> {
        lock(&self.group.failed).clone()
    }
}
