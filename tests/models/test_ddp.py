"""DistributedDataParallel, gloo backend, 2 CPU processes on 127.0.0.1, bounded time: the fused
resnet18's averaged gradients and final parameters/buffers equal a single-process computation.

Single-process reference (the same fused resnet18, same weights, one thread like the workers):
per step, the gradient is the sum of the gradients of the two half-batches, each forwarded on its
own (BatchNorm uses per-process batch statistics under DDP; the workers scale their loss by the
world size, so DDP's average is the same sum); running statistics are rank 0's (DDP broadcasts
rank 0's buffers before every forward), i.e. those updated by the first half only. The per-shard
computations are the same kernels on the same shapes, so the only difference left is the order of
the all-reduce sum: tolerance rtol 1e-5 / atol 1e-6 (fp32). Parity of the fused model itself with
torchvision is tested in test_resnet.py."""

import os
import subprocess
import sys

import torch
import torchvision

import resnet_kernels as rk
from rk_models_testing import loss_weights

STEPS = 2
WORLD = 2


def _reference(model, batches, weights):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    grads = []
    for x, w in zip(batches, weights):
        opt.zero_grad()
        saved = None
        for r, (xs, ws) in enumerate(zip(x.chunk(WORLD), w.chunk(WORLD))):
            if r == 1:  # rank 1's running-statistics updates are discarded (rank 0's are broadcast)
                saved = {n: b.clone() for n, b in model.named_buffers()}
            (model(xs) * ws).sum().backward()
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(saved[n])
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        opt.step()
    return grads


def test_ddp_gloo_two_processes_matches_single_process(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10)
    batches = [torch.randn(4, 3, 40, 40) for _ in range(STEPS)]
    weights = [loss_weights((4, 10)) * (i + 1) for i in range(STEPS)]
    inp, out = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save({"state": tv.state_dict(), "batches": batches, "weights": weights}, inp)

    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_worker.py")
    proc = subprocess.run([sys.executable, worker, str(inp), str(out)], capture_output=True, text=True,
                          timeout=200, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = torch.load(out)
    assert res["ranks_equal"], "DDP ranks ended with different parameters"

    model = rk.models.resnet18(num_classes=10, backend="torch")
    model.load_state_dict(tv.state_dict(), strict=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g_ref = _reference(model, batches, weights)
    finally:
        torch.set_num_threads(threads)
    for step in range(STEPS):
        for n, g in g_ref[step].items():
            torch.testing.assert_close(res["grads"][step][n], g, rtol=1e-5, atol=1e-6, msg=f"step {step} grad {n}")
    sd = model.state_dict()
    assert list(res["state"]) == list(sd)
    for k, v in res["state"].items():
        torch.testing.assert_close(v, sd[k], rtol=1e-5, atol=1e-6, msg=f"final {k}")
