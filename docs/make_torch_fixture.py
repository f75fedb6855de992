"""Writes assets/testdata/refnet_torch.safetensors and refnet_torch_outputs.json: the PyTorch
reference network (../shared/peer/model.py, imported, not copied) with seeded weights and
batch-norm statistics, and its eval-mode outputs on a deterministic 2x3x64x64 input
x[i] = ((i * 7919) % 1000) / 500 - 1. model/tests/torch_parity.rs imports the weights and
compares. Run with the peer's virtual environment:

    /tmp/peer/bin/python docs/make_torch_fixture.py
"""
import json, os, sys
import torch
from safetensors.torch import save_file

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "..", "shared", "peer"))
import model as M  # noqa: E402

torch.manual_seed(0)
net = M.RefNet().train()
with torch.no_grad():
    for s in range(3):  # non-trivial running statistics
        g = torch.Generator().manual_seed(10 + s)
        net(torch.randn(8, 3, 64, 64, generator=g))
net.eval()
n = 2 * 3 * 64 * 64
x = torch.tensor([((i * 7919) % 1000) / 500.0 - 1.0 for i in range(n)], dtype=torch.float32).reshape(2, 3, 64, 64)
with torch.no_grad():
    out = net(x)
out_dir = os.path.join(here, "..", "assets", "testdata")
os.makedirs(out_dir, exist_ok=True)
state = {k: v.contiguous() for k, v in net.state_dict().items()}
save_file(state, os.path.join(out_dir, "refnet_torch.safetensors"))
with open(os.path.join(out_dir, "refnet_torch_outputs.json"), "w") as f:
    json.dump({k: v.reshape(-1).tolist() for k, v in out.items()} | {"torch": torch.__version__, "tensors": len(state)}, f, indent=1)
print(len(state), "tensors;", {k: tuple(v.shape) for k, v in out.items()})
