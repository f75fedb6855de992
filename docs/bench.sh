#!/usr/bin/env bash
# Retina beside the PyTorch reference (shared/peer/bench.py) on the reference network, in one
# run, alternating the two so machine drift cancels. Prints one table with the ratios.
#
#   docs/bench.sh [ROUNDS]        (default 1 round; each round runs both programs)
#
# Needs the peer's virtual environment (see ../shared/peer/README.md); set PEER_PYTHON to its
# python (default /tmp/peer/bin/python). Without it, only Retina is measured.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-1}"
peer_py="${PEER_PYTHON:-/tmp/peer/bin/python}"
peer_dir="${PEER_DIR:-../shared/peer}"
profile="${PROFILE:-release}"
flag=$([ "$profile" = release ] && echo --release || true)
cargo build --quiet $flag --workspace --bins
bin="${CARGO_TARGET_DIR:-target}/$profile"
out=$(mktemp -d)
for r in $(seq 1 "$rounds"); do
  echo "round $r: retina" >&2
  "$bin/retina-train" bench --preset reference --image-size 224 --batch-size 16 --steps 7 --json > "$out/train224.$r.json"
  "$bin/retina-train" bench --preset reference --image-size 128 --batch-size 16 --steps 7 --json > "$out/train128.$r.json"
  "$bin/retina-infer" bench --preset reference --image-size 224 --json > "$out/infer.$r.json"
  if [ -x "$peer_py" ] && [ -f "$peer_dir/bench.py" ]; then
    echo "round $r: pytorch + onnxruntime" >&2
    "$peer_py" "$peer_dir/bench.py" > "$out/peer.$r.json"
    # Peak resident memory of a process doing the reference's own training step at 224 px, batch
    # 16 (bench.py does not report it): the counterpart of retina-train bench's peak_rss_mib.
    "$peer_py" - "$peer_dir" > "$out/peermem.$r.json" <<'PYMEM'
import json, resource, sys
import torch
sys.path.insert(0, sys.argv[1])
import model as M
torch.set_num_threads(2)
torch.manual_seed(0)
net = M.RefNet().train()
opt = M.make_optimizer(net)
x = torch.randn(M.BATCH, 3, 224, 224)
yd = torch.randint(0, M.NUM_CLASSES, (M.BATCH,))
yf = torch.randint(0, 2, (M.BATCH,)).float()
yv = torch.rand(M.BATCH)
for _ in range(4):
    M.train_step(net, opt, x, yd, yf, yv)
print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
PYMEM
  fi
done
python3 - "$out" "$rounds" <<'PY'
import json, os, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def load(name):
    vals = [json.load(open(os.path.join(out, f"{name}.{r}.json"))) for r in range(1, rounds + 1)
            if os.path.exists(os.path.join(out, f"{name}.{r}.json"))]
    return vals
med = lambda xs: statistics.median(xs) if xs else float("nan")
t224, t128, inf, peer = load("train224"), load("train128"), load("infer"), load("peer")
peermem = load("peermem")
rows = [
    ("training step, batch 16, 224 px (img/s)", med([x["train_img_per_s"] for x in t224]),
     med([p["train"]["224"]["img_per_s"] for p in peer]), None, True),
    ("training step, batch 16, 128 px (img/s)", med([x["train_img_per_s"] for x in t128]),
     med([p["train"]["128"]["img_per_s"] for p in peer]), None, True),
    ("inference batch 1, 224 px (ms)", med([x["b1_latency_ms"] for x in inf]),
     med([p["torch_infer_224"]["b1_latency_ms_median"] for p in peer]),
     med([p["ort_infer_224"]["b1_latency_ms_median"] for p in peer]), False),
    ("inference batch 16, 224 px (img/s)", med([x["b16_img_per_s"] for x in inf]),
     med([p["torch_infer_224"]["b16_img_per_s"] for p in peer]),
     med([p["ort_infer_224"]["b16_img_per_s"] for p in peer]), True),
    ("peak memory, training 224 px (MiB)", med([x["peak_rss_mib"] for x in t224]),
     med([p["peak_rss_mib"] for p in peermem]), None, False),
]
if t224:
    print(f"CPU: {t224[0].get('cpu', '?')}; Retina's kernels: {t224[0].get('isa', '?')} "
          f"(RETINA_ISA=avx512|avx2|portable to compare)\n")
print(f"| work | Retina ({t224[0]['backend'] if t224 else '?'}) | PyTorch {peer[0]['torch'] if peer else '-'} | ONNX Runtime | Retina vs PyTorch (>1: Retina better) |")
print("|---|---|---|---|---|")
for name, ours, torch, ort, higher_better in rows:
    ratio = (ours / torch if higher_better else torch / ours) if torch == torch and torch else float("nan")
    f = lambda v: "-" if v is None or v != v else f"{v:.2f}"
    print(f"| {name} | {f(ours)} | {f(torch)} | {f(ort)} | {f(ratio)}x |")
if peer:
    print("\nPyTorch CPU share during its runs:", [p["train"]["224"]["cpu_share"] for p in peer])
PY
