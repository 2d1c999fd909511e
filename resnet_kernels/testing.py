"""The parity tolerance policy, one for the tests (tests/) and ``resnet-kernels check``.

Every result is compared with a float64 reference computed from the same (dtype-rounded) inputs,
and PyTorch's own unfused layers run in the same dtype on the same inputs give PyTorch's error
against that reference. A result's max error may be

    bound = max(K * pytorch_err, floor(dtype, n_terms) * magnitude)

with ``magnitude`` = max|reference| (the scale of the tensor) and

    floor(dtype, n) = ROUNDINGS * u(dtype) + C_SUM * sqrt(n) * u(acc)

where u is the unit roundoff (half an ulp at 1) of the result's dtype, and acc the accumulation
dtype (float32 for 16-bit and float32 data, float64 for float64). The constants and where they
come from:

* ``K = 2``: a fused kernel rounds at most as often as PyTorch's unfused chain (once per stored
  tensor against once per layer), but at other points, so the two rounding patterns differ; the
  worst element of one pattern can reach about twice the worst of the other when two
  roundings of the same sign meet (K = 1 would fail on a fair kernel half of the time).
* ``K_CHAIN = 3``: whole networks (tests/models, the model cases of ``resnet-kernels check``):
  20-50 layers amplify rounding data-dependently (a batch norm divides by small standard
  deviations, a ReLU mask flips on a tie), so the fused and unfused chains drift apart by more.
* ``ROUNDINGS = 2``: where PyTorch happens to be (nearly) exact, the result still rounds when it
  is stored (u * |result|) and, on the unfused torch backend, once more where the conv output is
  stored in dtype before the BN epilogue: 2 u relative to max|reference|.
* ``C_SUM = 4``: sums of n terms accumulated in another order than the reference: the rounding
  errors of the partial sums are independent with standard deviation about sqrt(n) * u(acc)
  relative to the result (the probabilistic form of the worst-case n * u bound, Higham 2019,
  "A new approach to probabilistic rounding error analysis"); 4 standard deviations.

An element a kernel forgot to write (outputs are NaN-poisoned in the tests), a non-finite value,
or a reference that is itself not finite fails: a check that cannot fail is a defect.

For 16-bit data the floor is about 2 u (2**-10 for fp16, 2**-7 ~ 0.8 % for bf16), so a 1 %
error in a statistic computed in float32 (the batch mean/var, whose dtype is float32: pass that
dtype, not the activations') is caught in every activation dtype.

Measured on a CPU (torch backend and the Triton kernels under the interpreter; 2,300 checks of
tests/ops/test_conv2d_op.py, tests/nn/test_conv_bn.py, tests/test_functional.py), largest
error / bound: float32 0.16 (the floor is about 10x the largest float32 error), float16 0.80,
bfloat16 0.85, float64 0.09; median 0.03 (fp32) and 0.3 (16-bit). ``resnet-kernels check``
(torch and triton, fp32/fp16/bf16, no model cases): largest error / allowed 0.48.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

# unit roundoff: half the spacing of the dtype's numbers at 1 (round to nearest)
UNIT_ROUNDOFF = {
    torch.float64: 2.0 ** -53,
    torch.float32: 2.0 ** -24,
    torch.float16: 2.0 ** -11,
    torch.bfloat16: 2.0 ** -8,
}
K = 2.0
K_CHAIN = 3.0
ROUNDINGS = 2
C_SUM = 4.0

# ``resnet-kernels check`` compares max|err| / max|ref| per tensor of small cases whose longest
# reduction has about CHECK_TERMS[kind] terms: forward outputs (conv K = Cin*KH*KW <= 3*7*7 or
# 64*3*3 = 576 in its cases), gradients (the weight gradient sums over N*OH*OW and the BN backward
# over the same rows, up to a few thousand: 4096) and running statistics (the batch mean/var over
# N*OH*OW rows). Gradients go through twice the roundings of the forward (grad_out, the masked
# gradient, the conv backward): CHECK_ROUNDINGS.
CHECK_TERMS = {"out": 576, "grad": 4096, "stat": 4096}
CHECK_ROUNDINGS = {"out": ROUNDINGS, "grad": 2 * ROUNDINGS, "stat": ROUNDINGS}


def unit_roundoff(dtype: torch.dtype) -> float:
    return UNIT_ROUNDOFF[dtype]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are accumulated in for data of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def floor(dtype: torch.dtype, n_terms: int = 1, roundings: int = ROUNDINGS) -> float:
    """The relative floor: ``roundings`` roundings to ``dtype`` plus the reassociation of a sum of
    ``n_terms`` terms in the accumulation dtype (see the module docstring)."""
    n = max(int(n_terms), 1)
    return roundings * UNIT_ROUNDOFF[dtype] + C_SUM * math.sqrt(n) * UNIT_ROUNDOFF[acc_dtype(dtype)]


def bound(pytorch_err: float, magnitude: float, dtype: torch.dtype, n_terms: int = 1, k: float = K,
          roundings: int = ROUNDINGS) -> float:
    """max(k * PyTorch's own error, floor * magnitude)."""
    return max(k * pytorch_err, floor(dtype, n_terms, roundings) * magnitude)


def max_err(a: torch.Tensor, ref64: torch.Tensor) -> float:
    """max|a - ref64| in float64 (0 for empty tensors)."""
    if not a.numel():
        return 0.0
    return (a.detach().to(torch.float64).cpu() - ref64.detach().to(torch.float64).cpu()).abs().max().item()


def assert_close_to_ref(what: str, got: torch.Tensor, pt: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype,
                        n_terms: int = 1, scale: Optional[float] = None, k: float = K,
                        roundings: int = ROUNDINGS) -> None:
    """The policy for one tensor: ``got`` (ours) and ``pt`` (PyTorch's unfused result in the same
    dtype) against the float64 reference ``ref64``. ``dtype`` is the precision the tensor is
    computed and stored in (a float32 statistic of 16-bit activations: float32). ``scale``
    replaces max|ref64| as the floor's magnitude where the reference is ~0 by cancellation."""
    assert got.shape == ref64.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert got.dtype == pt.dtype, f"{what}: dtype {got.dtype} != PyTorch's {pt.dtype}"
    assert torch.isfinite(ref64).all(), f"{what}: the float64 reference is not finite (the check would be vacuous)"
    assert torch.isfinite(got).all(), f"{what}: non-finite values (unwritten elements are NaN-poisoned)"
    e_got = max_err(got, ref64)
    e_pt = max_err(pt, ref64)
    mag = (ref64.abs().max().item() if ref64.numel() else 0.0) if scale is None else scale
    b = bound(e_pt, mag, dtype, n_terms, k, roundings)
    _record(what, dtype, e_got, e_pt, mag, b)
    assert e_got <= b, (f"{what} ({dtype}): error vs float64 {e_got:.3g} > bound {b:.3g} = max({k} x PyTorch's "
                        f"own error {e_pt:.3g}, floor {floor(dtype, n_terms, roundings):.3g} x max|ref| {mag:.3g})")


def check_allowed(dtype: torch.dtype, kind: str, eager_err: float) -> float:
    """``resnet-kernels check``: the allowed max|err| / max|ref| of a tensor of ``kind`` ("out",
    "grad", "stat") when PyTorch's eager error (same measure) is ``eager_err``. Its cases include
    a whole resnet18, hence K_CHAIN."""
    return max(K_CHAIN * eager_err, floor(dtype, CHECK_TERMS[kind], CHECK_ROUNDINGS[kind]))


# Measurement hook (not used by the tests themselves): with RK_TOL_RECORD=<file>, every
# assert_close_to_ref appends "what dtype err pytorch_err magnitude bound" to the file, to see how
# close the observed errors come to the bounds.
def _record(what, dtype, e_got, e_pt, mag, b) -> None:
    import os

    path = os.environ.get("RK_TOL_RECORD")
    if path:
        with open(path, "a") as f:
            f.write(f"{what!r}\t{dtype}\t{e_got:.6g}\t{e_pt:.6g}\t{mag:.6g}\t{b:.6g}\n")
