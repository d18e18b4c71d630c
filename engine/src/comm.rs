//! Collective communication between the ranks of a tensor-parallel model.
//!
//! - [`SingleRank`]: one rank, every collective is the identity.
//! - [`InProcess`]: ranks are threads of one process sharing buffers; used on the CPU (and by
//!   the tests). Every rank sums or gathers the ranks' buffers in rank order, so all ranks get
//!   bit-identical results.
//!
//! Collectives are blocking and must be called by every rank of the group in the same order
//! with tensors of the same shape, as with NCCL.

use candle_core::{Tensor, D};
use std::sync::{Arc, Condvar, Mutex};

/// In-process communicators for `world` CPU ranks (none needed for one).
pub fn cpu_comms(world: usize) -> Vec<Arc<dyn Communicator>> {
    if world <= 1 {
        vec![Arc::new(SingleRank)]
    } else {
        InProcess::group(world).into_iter().map(|c| Arc::new(c) as Arc<dyn Communicator>).collect()
    }
}

/// One rank's handle on its group.
pub trait Communicator: Send + Sync {
    /// This rank, `0..world()`.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn world(&self) -> usize;
    /// Elementwise sum of every rank's `t` (same shape everywhere), returned on every rank.
    fn all_reduce_sum(&self, t: &Tensor) -> candle_core::Result<Tensor>;
    /// Every rank's `t` concatenated along the last dimension in rank order (the other
    /// dimensions equal everywhere), returned on every rank.
    fn all_gather_last(&self, t: &Tensor) -> candle_core::Result<Tensor>;
    /// Marks the group failed (a rank died or erred): every rank waiting in a collective, and
    /// every later collective, fails with `why` instead of waiting forever.
    fn abort(&self, why: &str);
    /// Why the group failed, once it has.
    fn failed(&self) -> Option<String>;
}

/// The group of one.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleRank;

impl Communicator for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        Ok(t.clone())
    }
    fn all_gather_last(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        Ok(t.clone())
    }
    fn abort(&self, _why: &str) {}
    fn failed(&self) -> Option<String> {
        None
    }
}

/// A barrier that a failed rank can break: `std::sync::Barrier` would leave the other ranks
/// waiting forever for a rank that died.
struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
    world: usize,
}

struct GateState {
    arrived: usize,
    generation: u64,
    failed: Option<String>,
}

impl Gate {
    fn wait(&self) -> candle_core::Result<()> {
        let mut s = self.state.lock().expect("gate");
        if let Some(why) = &s.failed {
            candle_core::bail!("tensor-parallel group failed: {why}");
        }
        let generation = s.generation;
        s.arrived += 1;
        if s.arrived == self.world {
            s.arrived = 0;
            s.generation += 1;
            self.cv.notify_all();
            return Ok(());
        }
        while s.generation == generation && s.failed.is_none() {
            s = self.cv.wait(s).expect("gate");
        }
        match &s.failed {
            Some(why) if s.generation == generation => candle_core::bail!("tensor-parallel group failed: {why}"),
            _ => Ok(()),
        }
    }

    fn fail(&self, why: &str) {
        let mut s = self.state.lock().expect("gate");
        s.failed.get_or_insert_with(|| why.to_string());
        self.cv.notify_all();
    }
}

/// What the ranks of an in-process group share: a slot per rank and a barrier.
struct Shared {
    slots: Mutex<Vec<Option<Tensor>>>,
    gate: Gate,
}

/// A rank of a group of threads in one process.
pub struct InProcess {
    rank: usize,
    world: usize,
    shared: Arc<Shared>,
}

impl InProcess {
    /// The `world` handles of a new group, in rank order; hand one to each rank's thread.
    pub fn group(world: usize) -> Vec<InProcess> {
        assert!(world > 0, "a group has at least one rank");
        let gate = Gate {
            state: Mutex::new(GateState { arrived: 0, generation: 0, failed: None }),
            cv: Condvar::new(),
            world,
        };
        let shared = Arc::new(Shared { slots: Mutex::new(vec![None; world]), gate });
        (0..world).map(|rank| InProcess { rank, world, shared: shared.clone() }).collect()
    }

    /// Publishes `t`, waits for every rank, reads every rank's tensor (in rank order), then
    /// waits again so that no rank overwrites its slot before all have read.
    fn exchange(&self, t: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        // Copied to a fresh contiguous buffer: the other ranks read it after this rank has
        // moved on.
        let mine = t.contiguous()?.copy()?;
        self.shared.slots.lock().expect("slots")[self.rank] = Some(mine);
        self.shared.gate.wait()?;
        let all: Vec<Tensor> =
            self.shared.slots.lock().expect("slots").iter().map(|s| s.clone().expect("every rank wrote")).collect();
        self.shared.gate.wait()?;
        for (r, x) in all.iter().enumerate() {
            if x.dims()[..x.rank() - 1] != t.dims()[..t.rank() - 1] {
                candle_core::bail!("rank {r} sent {:?}, rank {} {:?}", x.dims(), self.rank, t.dims());
            }
        }
        Ok(all)
    }
}

impl Communicator for InProcess {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        if self.world == 1 {
            return Ok(t.clone());
        }
        let all = self.exchange(t)?;
        let mut sum = all[0].clone();
        for x in &all[1..] {
            sum = (sum + x)?;
        }
        Ok(sum)
    }
    fn all_gather_last(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        if self.world == 1 {
            return Ok(t.clone());
        }
        let all = self.exchange(t)?;
        Tensor::cat(&all, D::Minus1)
    }
    fn abort(&self, why: &str) {
        self.shared.gate.fail(&format!("rank {}: {why}", self.rank));
    }
    fn failed(&self) -> Option<String> {
        self.shared.gate.state.lock().expect("gate").failed.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn a_failed_rank_releases_the_others() {
        let errors: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = InProcess::group(3)
                .into_iter()
                .map(|c| {
                    s.spawn(move || {
                        let t = Tensor::new(&[1f32], &Device::Cpu).unwrap();
                        c.all_reduce_sum(&t).unwrap();
                        if c.rank() == 2 {
                            // Rank 2 dies before the second collective.
                            c.abort("injected failure");
                            return "aborted".to_string();
                        }
                        c.all_reduce_sum(&t).unwrap_err().to_string()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(errors[0].contains("rank 2: injected failure"), "{errors:?}");
        assert!(errors[1].contains("rank 2: injected failure"), "{errors:?}");
    }

    #[test]
    fn every_rank_gets_the_same_sum_and_the_gather_in_rank_order() {
        let out: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
            let handles: Vec<_> = InProcess::group(3)
                .into_iter()
                .map(|c| {
                    s.spawn(move || {
                        let r = c.rank() as f32;
                        let t = Tensor::new(&[[r, 10.0 * r]], &Device::Cpu).unwrap();
                        let sum = c.all_reduce_sum(&t).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                        let g = c.all_gather_last(&t).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                        (sum, g)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (sum, g) in out {
            assert_eq!(sum, vec![3.0, 30.0]);
            assert_eq!(g, vec![0.0, 0.0, 1.0, 10.0, 2.0, 20.0]);
        }
    }
}
