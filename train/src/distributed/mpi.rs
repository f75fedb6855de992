//! The MPI world through rsmpi (the `mpi` crate): Open MPI, MPICH or Intel MPI, launched by
//! `mpirun`, `mpiexec` or Slurm's `srun`.

use super::Collective;
use anyhow::{Result, anyhow};
use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::{Count, Threading};

/// Elements per MPI call: counts are C `int`s, and a few buckets keep each message in the range
/// MPI's ring algorithms are tuned for.
const BUCKET: usize = 1 << 24;

/// MPI's world communicator (and the ranks sharing this machine), held until the run ends:
/// dropping it finalises MPI, which a launcher expects of every rank that exits normally.
pub struct MpiWorld {
    world: SimpleCommunicator,
    local: SimpleCommunicator,
    // Declared last: dropped after the communicators.
    _universe: Universe,
}

impl MpiWorld {
    /// Initialises MPI (once per process: MPI cannot start again after it finalised).
    pub fn init() -> Result<MpiWorld> {
        // Only the trainer's thread calls MPI; the data loader's threads never do.
        let (universe, _) =
            mpi::initialize_with_threading(Threading::Funneled).ok_or_else(|| {
                anyhow!(
                    "MPI was already initialised (and finalised) in this process: one MPI run per \
                 process"
                )
            })?;
        let world = universe.world();
        let local = world.split_shared(world.rank());
        Ok(MpiWorld {
            world,
            local,
            _universe: universe,
        })
    }
}

impl Collective for MpiWorld {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn size(&self) -> usize {
        self.world.size() as usize
    }

    fn local_rank(&self) -> usize {
        self.local.rank() as usize
    }

    fn local_size(&self) -> usize {
        self.local.size() as usize
    }

    fn barrier(&self) {
        self.world.barrier();
    }

    fn broadcast(&self, mut bytes: Vec<u8>) -> Vec<u8> {
        let root = self.world.process_at_rank(0);
        let mut len = bytes.len() as u64;
        root.broadcast_into(&mut len);
        bytes.resize(len as usize, 0);
        for chunk in bytes.chunks_mut(BUCKET) {
            root.broadcast_into(chunk);
        }
        bytes
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) {
        for chunk in buf.chunks_mut(BUCKET) {
            let send = chunk.to_vec();
            self.world
                .all_reduce_into(&send[..], chunk, SystemOperation::sum());
        }
    }

    fn all_gather(&self, mine: &[u8]) -> Vec<Vec<u8>> {
        let n = self.size();
        let mut counts = vec![0 as Count; n];
        let len = Count::try_from(mine.len()).expect("a gathered message under 2 GiB");
        self.world.all_gather_into(&len, &mut counts[..]);
        let displs: Vec<Count> = counts
            .iter()
            .scan(0, |at, &c| {
                let d = *at;
                *at += c;
                Some(d)
            })
            .collect();
        let total: usize = counts.iter().map(|&c| c as usize).sum();
        let mut all = vec![0u8; total];
        {
            let mut parts = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
            self.world.all_gather_varcount_into(mine, &mut parts);
        }
        counts
            .iter()
            .zip(&displs)
            .map(|(&c, &d)| all[d as usize..(d + c) as usize].to_vec())
            .collect()
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }

    fn describe(&self) -> String {
        let library = mpi::environment::library_version()
            .ok()
            // "Open MPI v4.1.4, package: Debian OpenMPI, ...": the name and version.
            .and_then(|v| v.split([',', '\n']).next().map(|l| l.trim().to_string()))
            .unwrap_or_else(|| "MPI".into());
        format!(
            "{library}, {} ranks ({} on this machine)",
            self.size(),
            self.local_size()
        )
    }
}
