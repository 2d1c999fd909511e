"""The stem's max pool (3x3, stride 2, padding 1) of a ResNet at batch 256, 224x224 (its input is
the 64x112x112 stem output), bf16, channels_last: the training forward (x requires grad, so an
argmax / indices are saved) and the backward alone (the forward as untimed per-iteration setup).

impl:
  cuda / triton / aten  ``resnet_kernels.ops.max_pool2d`` (a one-byte argmax), backend=impl;
  auto                  the measured choice;
  eager                 ``F.max_pool2d`` (int64 indices); compile: ``torch.compile`` of it.

Bytes (what the one-byte-argmax kernels move; T = one output tensor, the input is 4T):
  fwd: read x (4T), write out (T) and the argmax (T/2 in bf16) -> 5.5T;
  bwd: read grad (T) and the argmax (T/2), write grad_x (4T) -> 5.5T.
GB/s = those bytes / median time for every impl (eager moves 4T more in each direction: its int64
indices are 4T in bf16), so a higher figure is a faster pool.
"""

import pytest
import torch
import torch.nn.functional as F

import resnet_kernels as rk
from resnet_kernels import _registry
from resnet_kernels.ops import max_pool2d
import timing

pytestmark = timing.requires_gpu

DTYPE = torch.bfloat16
SHAPE = (256, 64, 112, 112)
BASELINES = ("eager", "compile")
IMPLS = ("auto",) + tuple(b.name for b in _registry.backends() if b.benchmark) + BASELINES


def _fn(impl):
    if impl in BASELINES:
        def eager(x):
            return F.max_pool2d(x, 3, 2, 1)
        return timing.compiled(eager) if impl == "compile" else eager
    return lambda x: max_pool2d(x, 3, 2, 1, backend=impl)


def _make():
    x = torch.randn(SHAPE, device="cuda", dtype=DTYPE).contiguous(memory_format=torch.channels_last)
    return (x.requires_grad_(True),)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("direction", ("fwd", "bwd"))
def test_stem_maxpool(benchmark, direction, impl):
    if impl not in BASELINES and impl != "auto":
        ok, why = rk.backend_status(impl, "cuda")
        if not ok:
            pytest.skip(f"backend {impl} unavailable: {why}")
    benchmark.group = f"maxpool 3x3/2 {direction} {'x'.join(map(str, SHAPE))}"
    T = SHAPE[0] * SHAPE[1] * (SHAPE[2] // 2) * (SHAPE[3] // 2) * DTYPE.itemsize
    info = {"suite": "ops", "case": f"maxpool stem {'x'.join(map(str, SHAPE))}", "op": "maxpool2d",
            "direction": direction, "impl": impl, "shape": list(SHAPE), "dtype": "bf16", "layout": "channels_last"}
    fn = _fn(impl)
    moved = int(5.5 * T)
    inputs = timing.rotation(_make, moved)
    if direction == "fwd":
        timing.run(benchmark, fn, inputs, info=info, bytes_moved=moved)
        return

    def setup(x):
        out = fn(x)
        return out, torch.randn_like(out), x

    def bwd(out, g, x):
        torch.autograd.grad(out, x, g)

    timing.run(benchmark, bwd, inputs, info=info, setup=setup, bytes_moved=moved)
