"""The fused residual epilogue: add_relu and bn_add_relu (with and without the BN of the
projection shortcut), forward and backward, on the ResNet-50 block outputs at batch 256
(bf16, channels_last).

impl:
  cuda / triton  the fused op (``resnet_kernels.add_relu`` / ``bn_add_relu``, backend=impl);
                 the BN is given as per-channel (scale, shift) leaves that require grad.
  eager          what PyTorch runs for the same math: ``F.batch_norm`` in inference form (the
                 same per-channel affine; its backward yields the weight/bias gradients, like
                 our scale/shift gradients), ``+`` and ``relu_``: separate kernels.
  compile        ``torch.compile`` of the eager function.

direction: ``fwd`` times the forward; ``bwd`` times the backward alone (the forward runs as
untimed per-iteration setup), gradients w.r.t. x, identity and every per-channel parameter.

Bytes (the minimum traffic of a fused implementation, T = one activation tensor):
  fwd: read x, identity; write out -> 3T for every variant.
  bwd: add_relu: read grad, out (ReLU mask); write grad_x (= grad_identity) -> 3T;
       bn_add_relu: + read x (scale gradient), write grad_identity separately -> 5T;
       +proj: + read identity (identity_scale gradient) -> 6T.
GB/s = bytes / median time; pct_of_copy = that over a device-to-device copy moving the same
bytes in the same process.
"""

import pytest
import torch
import torch.nn.functional as F

import resnet_kernels as rk
from resnet_kernels import _registry
import shapes
import timing

pytestmark = timing.requires_gpu

DTYPE = torch.bfloat16
EPS = 1e-5
SHAPES = shapes.residual_shapes(256)
if timing.FAST:
    SHAPES = SHAPES[:1]
VARIANTS = ("add_relu", "bn_add_relu", "bn_add_relu_proj")
BASELINES = ("eager", "compile")
# 'auto' (the measured choice) and every backend of the registry that benchmarks, then the baselines
IMPLS = ("auto",) + tuple(b.name for b in _registry.backends() if b.benchmark) + BASELINES
FWD_T = {"add_relu": 3, "bn_add_relu": 3, "bn_add_relu_proj": 3}
BWD_T = {"add_relu": 3, "bn_add_relu": 5, "bn_add_relu_proj": 6}


def _available(impl):
    if impl in BASELINES or impl == "auto":
        return
    ok, why = rk.backend_status(impl, "cuda")
    if not ok:
        pytest.skip(f"backend {impl} unavailable: {why}")


def _make_set(variant, shape, grad):
    N, C, H, W = shape

    def act():
        t = torch.randn(shape, device="cuda", dtype=DTYPE).contiguous(memory_format=torch.channels_last)
        return t.requires_grad_(grad)

    def vec(lo, hi):
        return (torch.rand(C, device="cuda") * (hi - lo) + lo).requires_grad_(grad)

    x, i = act(), act()
    s = b = si = bi = None
    if variant != "add_relu":
        s, b = vec(0.5, 1.5), vec(-0.5, 0.5)
    if variant == "bn_add_relu_proj":
        si, bi = vec(0.5, 1.5), vec(-0.5, 0.5)
    g = torch.randn(shape, device="cuda", dtype=DTYPE).contiguous(memory_format=torch.channels_last) if grad else None
    return x, i, s, b, si, bi, g


def _forward_fn(variant, impl, C):
    if impl not in BASELINES:
        if variant == "add_relu":
            return lambda x, i, s, b, si, bi: rk.add_relu(x, i, backend=impl)
        return lambda x, i, s, b, si, bi: rk.bn_add_relu(x, s, b, i, si, bi, backend=impl)

    zeros = torch.zeros(C, device="cuda")
    ones = torch.full((C,), 1.0 - EPS, device="cuda")  # so weight * rsqrt(var + eps) == weight

    def eager(x, i, s, b, si, bi):
        if variant == "add_relu":
            return torch.relu_(x + i)
        y = F.batch_norm(x, zeros, ones, s, b, False, 0.0, EPS)
        r = F.batch_norm(i, zeros, ones, si, bi, False, 0.0, EPS) if variant == "bn_add_relu_proj" else i
        return torch.relu_(y + r)

    return timing.compiled(eager) if impl == "compile" else eager


def _wrt(variant, x, i, s, b, si, bi):
    return [t for t in (x, i, s, b, si, bi) if t is not None]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("direction", ("fwd", "bwd"))
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [s for _, s in SHAPES], ids=[n for n, _ in SHAPES])
def test_residual_epilogue(benchmark, shape, variant, direction, impl):
    _available(impl)
    benchmark.group = f"{variant} {direction} {'x'.join(map(str, shape))}"
    fwd = _forward_fn(variant, impl, shape[1])
    T = torch.Size(shape).numel() * DTYPE.itemsize
    case = f"{variant} {next(n for n, s in SHAPES if s == shape)} {'x'.join(map(str, shape))}"
    info = {"suite": "ops", "case": case, "op": variant, "direction": direction, "impl": impl,
            "shape": list(shape), "dtype": "bf16", "layout": "channels_last"}
    if direction == "fwd":
        inputs = timing.rotation(lambda: _make_set(variant, shape, False)[:6], 3 * T)

        def fn(*a):
            with torch.no_grad():
                fwd(*a)

        timing.run(benchmark, fn, inputs, info=info, bytes_moved=FWD_T[variant] * T)
        return

    inputs = timing.rotation(lambda: _make_set(variant, shape, True), BWD_T[variant] * T)

    def setup(x, i, s, b, si, bi, g):
        out = fwd(x, i, s, b, si, bi)
        return out, g, tuple(_wrt(variant, x, i, s, b, si, bi))

    def bwd(out, g, wrt):
        torch.autograd.grad(out, wrt, g)

    timing.run(benchmark, bwd, inputs, info=info, setup=setup, bytes_moved=BWD_T[variant] * T)
