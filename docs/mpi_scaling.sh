#!/usr/bin/env bash
# Data-parallel scaling on this machine: the same training work (COUNT generated eyes at SIZE px
# input, EPOCHS epochs, global batch BATCH) on 1 rank x 1 thread (whole batches, and the same
# batches as two accumulated halves, the micro-batch a rank gets), then on 2 ranks x 1 thread
# each under mpirun, for the small and the reference preset. Prints the training images/s of
# the step (the median over epochs 2.., once the first epoch has decoded every image), the
# epoch's wall time with validation, the speed-ups, and each step's all-reduce time and bytes.
#
#   docs/mpi_scaling.sh            (PROFILE=release by default; COUNT, SIZE, EPOCHS, BATCH)
#
# Needs Open MPI (Debian: openmpi-bin libopenmpi-dev libclang-dev).
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${PROFILE:-release}"
count="${COUNT:-512}"
size="${SIZE:-128}"
epochs="${EPOCHS:-3}"
batch="${BATCH:-16}"
flag=$([ "$profile" = release ] && echo --release || true)
cargo build --quiet $flag --workspace --bins --features retina-train/mpi
bin="${CARGO_TARGET_DIR:-target}/$profile/retina-train"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$bin" synth --count "$count" --size 256 --seed 7 --out "$work/data" >/dev/null
export RAYON_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
lscpu | sed -n 's/^Model name: *//p' | head -1 | sed 's/^/cpu: /'
nproc | sed 's/^/cores: /'
mpirun --version | head -1
for preset in small reference; do
  args=(fit --data "$work/data/labels.csv" --preset "$preset" --image-size "$size"
    --batch-size "$batch" --epochs "$epochs" --set data.quality_share=0)
  "$bin" "${args[@]}" --out "$work/$preset-1" >/dev/null 2>"$work/$preset-1.log"
  "$bin" "${args[@]}" --set accumulate=2 --out "$work/$preset-1a" >/dev/null 2>"$work/$preset-1a.log"
  mpirun -np 2 --oversubscribe "$bin" "${args[@]}" --out "$work/$preset-2" \
    >/dev/null 2>"$work/$preset-2.log"
  python3 - "$work/$preset" "$preset" <<'PY'
import json, statistics, sys
run, preset = sys.argv[1:]
def read(path):
    rows = [json.loads(l) for l in open(path + "/metrics.jsonl")]
    later = rows[1:] or rows
    med = lambda k: statistics.median(r.get(k, 0.0) for r in later)
    mb = later[-1].get("allreduce_bytes_per_step", 0) / 2**20
    return med("train_img_per_s"), med("seconds"), med("allreduce_s_per_step"), mb
(a, sa, _, _), (c, sc, _, _) = read(run + "-1"), read(run + "-1a")
b, sb, ar, mb = read(run + "-2")
print(f"{preset}: step img/s, 1 rank {a:.1f} | 1 rank, 2 accumulated halves {c:.1f} | "
      f"2 ranks {b:.1f} | speed-up {b / a:.2f}x ({b / c:.2f}x vs the same halves) | "
      f"epoch wall s {sa:.1f} / {sc:.1f} / {sb:.1f} ({sa / sb:.2f}x) | "
      f"all-reduce {ar * 1000:.1f} ms/step, {mb:.2f} MiB/step per rank")
PY
done
