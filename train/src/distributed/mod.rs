//! Data-parallel training across processes, GPUs and machines, on MPI.
//!
//! A run launched by `mpirun -np K` (or Slurm's `srun`) trains one model with K ranks: every
//! rank holds the whole network, takes its own shard of each global batch, and the ranks sum
//! their gradients with one all-reduce per step before the identical optimizer step. Why MPI and
//! not burn's own data parallelism: burn 0.22's `ExecutionStrategy::ddp` all-reduces through
//! NCCL between CUDA devices inside one process (the CPU and wgpu backends panic on its
//! collectives), and its multi-node layer was removed; MPI is the launcher and transport every
//! cluster already runs, on any backend and across machines.
//!
//! [`Collective`] is the little the trainer needs from a process group; [`join`] gives the
//! group this process belongs to: one of one ([`Solo`]) unless the process was started by an
//! MPI launcher, and then MPI's world (built with the `mpi` feature; without it a launch of
//! more than one rank is refused rather than run as K unrelated trainings over one run
//! directory). [`sync`] moves a model's gradients, running statistics and weights through a
//! group.

#[cfg(feature = "mpi")]
mod mpi;
pub mod sync;

use anyhow::{Result, bail};

/// What the trainer needs from a group of processes training one model. Every call is
/// collective: each rank makes the same calls in the same order.
pub trait Collective {
    /// This process's rank, 0-based.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// The rank among the ranks on this machine (which GPU to take).
    fn local_rank(&self) -> usize;
    /// The number of ranks on this machine.
    fn local_size(&self) -> usize;
    /// Waits until every rank arrives.
    fn barrier(&self);
    /// Rank 0's `bytes`, on every rank (the others' arguments are ignored).
    fn broadcast(&self, bytes: Vec<u8>) -> Vec<u8>;
    /// Sums `buf` element-wise over the ranks, in place; every rank gets the same sum.
    fn all_reduce_sum(&self, buf: &mut [f32]);
    /// Every rank's `mine`, in rank order, on every rank.
    fn all_gather(&self, mine: &[u8]) -> Vec<Vec<u8>>;
    /// Ends every rank of the job now, with `code` (after an error on one rank that the others
    /// cannot know of, so none of them waits forever in a collective).
    fn abort(&self, code: i32) -> !;
    /// The transport, for the log: `"Open MPI v4.1.4, 2 ranks"`.
    fn describe(&self) -> String;
    /// Whether this rank writes the run's files and speaks for the run.
    fn is_root(&self) -> bool {
        self.rank() == 0
    }
}

/// A group of one process: every collective is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn local_rank(&self) -> usize {
        0
    }
    fn local_size(&self) -> usize {
        1
    }
    fn barrier(&self) {}
    fn broadcast(&self, bytes: Vec<u8>) -> Vec<u8> {
        bytes
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) {}
    fn all_gather(&self, mine: &[u8]) -> Vec<Vec<u8>> {
        vec![mine.to_vec()]
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
    fn describe(&self) -> String {
        "one process".into()
    }
}

/// The size of the job an MPI launcher started this process in, read from the variables the
/// common launchers set (Open MPI, MPICH/Hydra and Intel MPI through PMI, PMIx, Slurm's
/// `srun`); `None` when no launcher did.
pub fn launched_world_size() -> Option<usize> {
    // Not SLURM_NTASKS: a batch script's own shell has it too, outside any `srun`.
    const VARS: [&str; 4] = [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_SIZE",
        "MPI_LOCALNRANKS",
    ];
    let from_env = VARS
        .iter()
        .filter_map(|v| std::env::var(v).ok()?.trim().parse::<usize>().ok())
        .max();
    // PMIx announces a launch by its rank variable alone.
    from_env.or_else(|| std::env::var_os("PMIX_RANK").map(|_| 1))
}

/// The group this process trains in: MPI's world when an MPI launcher started it, otherwise a
/// group of one.
pub fn join() -> Result<Box<dyn Collective>> {
    match launched_world_size() {
        None => Ok(Box::new(Solo)),
        #[cfg(feature = "mpi")]
        Some(_) => Ok(Box::new(mpi::MpiWorld::init()?)),
        #[cfg(not(feature = "mpi"))]
        Some(1) => Ok(Box::new(Solo)),
        #[cfg(not(feature = "mpi"))]
        Some(k) => bail!(
            "this process was launched as one of {k} MPI ranks, but this retina-train was built \
             without MPI support, so each rank would train on its own over the same run \
             directory\nhint: build with `cargo build --release --features retina-train/mpi` \
             (needs an MPI library, e.g. Debian's openmpi-bin and libopenmpi-dev), or run \
             without mpirun"
        ),
    }
}

/// An error every rank saw at once (a non-finite loss reduced over the ranks, diverged
/// weights): rank 0 reports it, the other ranks end without repeating it.
#[derive(Debug)]
pub struct Quiet;

impl std::fmt::Display for Quiet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stopped with the other ranks (rank 0 reports why)")
    }
}

impl std::error::Error for Quiet {}

/// An error every rank met at once (the same check on the same reduced numbers), which rank 0
/// reports; the other ranks return [`Quiet`].
#[derive(Debug)]
pub struct AllRanks(anyhow::Error);

impl std::fmt::Display for AllRanks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for AllRanks {}

/// `e`, met on every rank alike: rank 0 reports it, then every rank ends (the others
/// quietly). Rank 0 prints before the ranks part at a barrier: a rank that exited first would
/// have mpirun kill rank 0 before it said why. With one process, `e` itself.
pub fn together(group: &dyn Collective, e: anyhow::Error) -> anyhow::Error {
    if group.size() == 1 {
        return e;
    }
    if group.is_root() {
        crate::util::report_error(&e);
    }
    group.barrier();
    if group.is_root() {
        AllRanks(e).into()
    } else {
        Quiet.into()
    }
}

/// The part `p` of `parts` of a batch of `m` samples: the slice `[m p / P, m (p + 1) / P)`, so
/// the parts differ in size by at most one and together are the batch, in order.
pub fn part(m: usize, p: usize, parts: usize) -> std::ops::Range<usize> {
    m * p / parts..m * (p + 1) / parts
}

/// Checks that a global batch of `batch_size` splits into `parts` non-empty micro-batches.
pub fn check_split(batch_size: usize, ranks: usize, accumulate: usize) -> Result<()> {
    if accumulate == 0 {
        bail!("accumulate must be at least 1 (micro-batches per step on each rank)");
    }
    let parts = ranks * accumulate;
    if batch_size < parts {
        bail!(
            "batch_size {batch_size} is smaller than ranks x accumulate = {ranks} x {accumulate}: \
             some micro-batches would be empty\nhint: raise batch_size (the global batch, split \
             over the ranks) to at least {parts}"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_the_batch_in_order_and_differ_by_at_most_one() {
        for m in 1..40 {
            for parts in 1..9 {
                let ranges: Vec<_> = (0..parts).map(|p| part(m, p, parts)).collect();
                assert_eq!(ranges[0].start, 0);
                assert_eq!(ranges[parts - 1].end, m);
                for w in ranges.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
                let lens: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
                let (lo, hi) = (lens.iter().min().unwrap(), lens.iter().max().unwrap());
                assert!(hi - lo <= 1, "{m} in {parts}: {lens:?}");
            }
        }
    }

    #[test]
    fn a_batch_too_small_for_the_parts_is_refused() {
        assert!(check_split(16, 2, 2).is_ok());
        let e = check_split(4, 4, 2).unwrap_err().to_string();
        assert!(e.contains("4 x 2") && e.contains("at least 8"), "{e}");
        assert!(check_split(16, 1, 0).is_err());
    }
}
