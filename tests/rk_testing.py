"""Helpers shared by the tests (importable because pytest puts tests/ on sys.path)."""

import contextlib
import os

import pytest
import torch

from resnet_kernels import _registry, testing

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"
# The backends come from the registry. The explicit torch backend (the reference decomposition)
# is the tests' oracle; the others are tested against it. With a GPU every registered backend is
# tested (a missing build then fails with its cause, never skips); without one, those that run on
# CPU tensors (aten; triton under the interpreter, which conftest switches on).
ORACLE = "torch"
# Backends that implement only a hardware- and shape-specific subset, tested by their own files
# instead of the generic every-backend parametrisation: cutlass (sm_90 GPUs, bf16/fp16 NHWC with
# channels multiples of 8: tests/ops/test_conv2d_cutlass.py).
DEDICATED_BACKENDS = ("cutlass",)
KERNEL_BACKENDS = [b.name for b in _registry.backends()
                   if b.name != ORACLE and b.name not in DEDICATED_BACKENDS
                   and (HAS_GPU or b.available(torch.device("cpu")) is None)]
ALL_BACKENDS = [ORACLE] + KERNEL_BACKENDS

# GPU-only tests: ``@needs_gpu("why")`` (or in pytestmark). conftest.py marks every test skipped
# with this reason prefix ``gpu``, so ``-m gpu`` / ``-m "not gpu"`` select them.
GPU_SKIP_REASON = "needs a visible GPU"


def needs_gpu(why: str):
    return pytest.mark.skipif(not HAS_GPU, reason=f"{GPU_SKIP_REASON}: {why}")


@contextlib.contextmanager
def cudnn_tf32(allow: bool):
    """cuDNN's TF32 for convolutions set to ``allow`` for the block (PyTorch's default is on: an
    fp32 comparison with PyTorch's own error must switch it off). A no-op without a GPU."""
    if not HAS_GPU:
        yield
        return
    try:
        old = torch.backends.cudnn.allow_tf32
    except RuntimeError:  # conv and RNN were given different settings (new API): back to the default
        old = True
    torch.backends.cudnn.allow_tf32 = allow  # the legacy switch sets conv and RNN alike
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Elementwise ops compute in fp32 (fp64 for fp64) and round once, like the reference; the only
# difference left is the final rounding of the output and fp32 reassociation for the per-channel
# sums. These tables compare two results that were each rounded to the output dtype (kernel vs
# torch backend): both round to nearest (the GPU's cvt.rn; under the Triton interpreter
# triton_ops/_common.py cast_for_store), but fp32 values a few fp32 ulps apart that straddle a
# rounding boundary land on neighbouring 16-bit values, so 1 ulp of the 16-bit dtype is allowed.
ELEMENTWISE_TOL = {
    torch.float32: dict(atol=1e-6, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=2 ** -10),   # 1 fp16 ulp
    torch.bfloat16: dict(atol=1e-2, rtol=2 ** -7),  # 1 bf16 ulp (two independent roundings)
    torch.float64: dict(atol=1e-12, rtol=1e-12),
}

# Per-channel reductions over N*H*W terms, accumulated in fp32 in a different order than
# torch.sum: error grows like eps32 * sqrt(terms) * |values|; terms are products of O(1) values.
REDUCTION_TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-4, rtol=1e-4),
    torch.bfloat16: dict(atol=1e-4, rtol=1e-4),
    torch.float64: dict(atol=1e-10, rtol=1e-10),
}


def memory_format(layout: str) -> torch.memory_format:
    """"nchw" / "channels_last" (also "nhwc") -> the torch memory format."""
    return torch.channels_last if layout in ("channels_last", "nhwc") else torch.contiguous_format


def layouts(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.contiguous(memory_format=memory_format(layout))


def poisoned(shape, dtype: torch.dtype, device, layout: str = "nchw") -> torch.Tensor:
    """An output buffer in ``layout`` as the ops allocate them under the tests' poison mode: all
    NaN (asserted), so an element a kernel does not write fails the comparison."""
    from resnet_kernels import _alloc

    out = _alloc.empty_like(torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format(layout)))
    assert out.numel() == 0 or torch.isnan(out).all(), "outputs must be poisoned (conftest poison mode)"
    return out


def epilogue64(y: torch.Tensor, scale=None, bias=None, res=None, relu: bool = False) -> torch.Tensor:
    """The fused conv epilogue in float64 on y's device: relu?(y * scale[c] + bias[c] + res)."""
    y = y.detach().double()
    c = (1, y.shape[1], 1, 1)
    if scale is not None:
        y = y * scale.detach().to(y.device, torch.float64).view(c)
    if bias is not None:
        y = y + bias.detach().to(y.device, torch.float64).view(c)
    if res is not None:
        y = y + res.detach().to(y.device, torch.float64)
    return torch.relu(y) if relu else y


# --------------------------------------------------------------------------------------------
# Error bounds against a float64 reference computed from the inputs. A fused kernel computes
# in the accumulation dtype (float32; float64 for float64 activations) and rounds once when it
# stores. Its error against the exact result is then bounded by
#   * the rounding of the stored result: ULP[dtype] / 2 * |result| (round to nearest: half an
#     ulp, on the GPU and, via triton_ops/_common.py cast_for_store, also under the Triton
#     interpreter, whose own fp32 -> bf16 cast truncates), plus TINY[dtype] for results in the
#     subnormal range;
#   * the arithmetic in the accumulation dtype: k * ACC_EPS * (sum of |terms|) for a chain of
#     k roundings (cancellation makes the error relative to the terms, not to the result);
#   * for a sum of n terms in any order: (n + 1) * ACC_EPS * sum |terms| (the classical
#     worst-case bound gamma_n, with one more rounding for the products).
# These are worst-case bounds: an index or channel mix-up, a dropped element or a missing
# operand produces errors of the order of the values themselves, far above them.
# --------------------------------------------------------------------------------------------
# (ULP = 2 x the unit roundoff of resnet_kernels.testing, the project's tolerance policy)
ULP = {dt: 2 * u for dt, u in testing.UNIT_ROUNDOFF.items()}
TINY = {torch.float32: 2.0 ** -149, torch.float16: 2.0 ** -24, torch.bfloat16: 2.0 ** -133,
        torch.float64: 2.0 ** -1074}


def acc_of(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def acc_eps(dtype: torch.dtype) -> float:
    """Unit roundoff (x2) of the accumulation dtype used for activations of ``dtype``."""
    return ULP[acc_of(dtype)]


def elementwise_bound(expected: torch.Tensor, magnitude: torch.Tensor, dtype: torch.dtype, ops: int = 8,
                      stored: torch.dtype | None = None) -> torch.Tensor:
    """Allowed |error| of a fused elementwise result: ``ops`` roundings in the accumulation dtype
    relative to ``magnitude`` (the sum of |terms|), plus one round-to-nearest to ``stored``
    (default ``dtype``) of the result (half an ulp)."""
    stored = dtype if stored is None else stored
    e = expected.double().abs()
    return ULP[stored] / 2 * e + ops * acc_eps(dtype) * magnitude.double() + TINY[stored]


def reduction_bound(expected: torch.Tensor, abs_sum: torch.Tensor, n_terms: int, dtype: torch.dtype,
                    stored: torch.dtype | None = None) -> torch.Tensor:
    """Allowed |error| of a sum of ``n_terms`` products accumulated in the accumulation dtype,
    stored as ``stored`` (default: the accumulation dtype)."""
    stored = acc_of(dtype) if stored is None else stored
    e = expected.double().abs()
    return (n_terms + 2) * acc_eps(dtype) * abs_sum.double() + ULP[stored] * e + TINY[stored]


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """|actual - expected| <= bound elementwise (float64 comparison); NaN/inf in ``actual`` fail
    (so do outputs a kernel forgot to write: they are poisoned with NaN)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    b = bound.detach().double().cpu().expand_as(e)
    err = (a - e).abs()
    bad = ~(err <= b)  # NaN counts as bad
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        n = int(bad.sum())
        raise AssertionError(f"{what}: {n} of {e.numel()} elements out of bounds; first at {idx}: "
                             f"got {a[idx].item()!r}, expected {e[idx].item()!r} (bound {b[idx].item():.3g}); "
                             f"max excess {float((err - b)[bad].max()):.3g}")


def in_cta_orders(run, seeds=(0, 1, 2, 3)):
    """[run(runner) for each CTA order]: on the host runner (``cuda_common.host_runner`` active) each
    launch's grid runs in blockIdx order (seed 0) and in the seeded permutations
    (``HostRunner.configure_order``), the launch log emptied before each run, blockIdx order
    restored after; with a GPU (no runner) one run, ``run(None)``. For the kernels whose CTAs meet on
    arrival counters: their results must not depend on which CTA arrives last."""
    from resnet_kernels.backends import cuda_common

    runner = cuda_common._host
    out = []
    try:
        for seed in (seeds if runner is not None else seeds[:1]):
            if runner is not None:
                runner.configure_order(seed)
                runner.take_launches()
            out.append(run(runner))
    finally:
        if runner is not None:
            runner.configure_order(0)
    return out
