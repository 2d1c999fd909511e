"""Helpers for tests/models.

Tolerance rules (CPU), all against a float64 oracle (the torchvision model in float64, same
weights, same inputs):

* float64 (the fused model in float64): max|ours - oracle| <= 1e-9 * max|oracle| per tensor.
  This is the strict parity check of the semantics (outputs, input and parameter gradients,
  running statistics, optimizer steps); measured: <= 2e-12.
* float32: per tensor, relative L2 error  |ours - oracle| / |oracle|  <=  3 * (the same for
  torchvision's own fp32 model) + 1e-4. Deep nets amplify fp32 rounding unevenly (batch statistics
  divide by small standard deviations; a pre-ReLU value within rounding of 0 flips the ReLU mask),
  so the bound is relative to what PyTorch's own layers achieve; measured on resnet18 at 64x64:
  both ~5e-6, so the bound has a 20x margin while a real bug (a wrong term, a low-precision
  accumulation) gives errors of 1e-3 and above. resnet50 at 64x64 with random init is checked in
  float64 in training (in fp32 even torchvision's gradients are off by up to 1.5% there: a few
  near-zero pre-ReLU values flip, and the last stage normalises over only 8 values per channel).
* gradients and momentum buffers in fp32/bf16: floor 2e-2 (see GRAD_FLOOR: ReLU/max-pool ties).
* bfloat16 autocast: the fp32 rule with a 3e-2 floor (bf16 has 8 significant bits and both models
  round every layer's output to bf16); bf16 gradients: 1.5x torchvision's error + GRAD_FLOOR (see
  BF16_GRAD_FACTOR).
* every check can fail: the oracle and the result must be finite, and a bound >= MAX_BOUND (an
  all-zero result has relative L2 error 1) is refused as vacuous.

Inputs are 48x48 or 64x64 (not 32x32): at 32x32 with batch 2 the last stage (1x1)'s BatchNorm normalises over
m = 2 values per channel, which is so ill-conditioned that torchvision's fp32 output is off by O(1).
"""

from __future__ import annotations

import copy
from typing import Dict

import torch
import torchvision

import resnet_kernels as rk
import resnet_kernels.testing  # noqa: F401 (rk.testing)

FACTOR = rk.testing.K_CHAIN  # 3: whole networks (resnet_kernels.testing)
FLOOR = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
FP64_RTOL = 1e-9
# Gradients (input, parameters, momentum) in fp32: a pre-ReLU value (or two values of a max-pool
# window) within rounding of each other make fp32 and fp64 take different branches, which moves
# one gradient element; through the BatchNorm backward that changes a whole channel's gradients by
# ~1% relative L2. With ~2e5 ReLU inputs in a small resnet18 this happens ~once per few steps, for
# torchvision's own fp32 model as often as for ours (measured: 0.7-1% when it happens, ~6e-6
# otherwise). Gradients are therefore held to this floor in reduced precision; they are checked
# strictly (FP64_RTOL) by the float64 tests. Parameters and momentum after an fp32 optimizer step
# (which applied such a gradient) use this floor too; outputs and running statistics of a forward
# keep the 1e-4 floor. Multi-step fp32 tests re-synchronise the models before every step: whole
# fp32 trajectories are chaotic (see test_three_sgd_momentum_steps_match_torchvision_resnet18).
GRAD_FLOOR = 2e-2
# bf16 autocast gradients of a train-mode resnet18 are far from the float64 oracle for torchvision
# itself (relative L2 0.3-0.56 per parameter, measured at 48x48 and 64x64, batch 2-4: every layer
# rounds its output to bf16 and the BN backward cancels), so 3x that would exceed 1 and accept a
# zero gradient. Ours and torchvision round the same tensors: measured ratio ours/torchvision
# <= 1.43 over every parameter (seeds 0, 1), so 1.5x. This guards gross errors only (zero, sign,
# a missing term of the gradient's size); bf16 gradient parity per op is checked at the ulp level
# by tests/ops and tests/nn.
BF16_GRAD_FACTOR = 1.5
# Checks whose bound reaches MAX_BOUND are refused as vacuous (an all-zero result has error 1).
MAX_BOUND = 0.9


def make_models(arch: str, seed: int = 0, oracle: bool = True, backend: str = "torch", **kw):
    """(torchvision fp32, ours fp32, torchvision fp64 oracle or None), identical weights."""
    torch.manual_seed(seed)
    tv = getattr(torchvision.models, arch)(**kw)
    torch.manual_seed(seed)
    ours = getattr(rk.models, arch)(backend=backend, **kw)
    ours.load_state_dict(tv.state_dict(), strict=True)
    ref = copy.deepcopy(tv).double() if oracle else None
    return tv, ours, ref


def loss_weights(shape, dtype=torch.float32):
    """A fixed, non-uniform output weighting so every logit gets a different gradient."""
    n = 1
    for d in shape:
        n *= d
    return torch.linspace(-1.0, 1.0, n, dtype=torch.float64).reshape(shape).to(dtype)


def fwd_bwd(model, x):
    """Forward + backward of sum(out * w) (in fp32, fp64 for fp64 outputs); returns (out, grad_x)."""
    x = x.detach().clone().requires_grad_()
    out = model(x)
    acc = torch.float64 if out.dtype == torch.float64 else torch.float32
    (out.to(acc) * loss_weights(out.shape, acc)).sum().backward()
    return out.detach(), x.grad.detach()


def check(name: str, ours: torch.Tensor, tv, oracle: torch.Tensor, dtype=torch.float32, floor=None) -> None:
    """The tolerance rules above, for one tensor (``tv`` is unused for float64; ``floor``
    overrides the dtype's floor, see GRAD_FLOOR)."""
    assert ours.shape == oracle.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(oracle.shape)}"
    o = oracle.double()
    if dtype == torch.float64:
        assert ours.dtype == torch.float64, name
        err, scale = (ours - o).abs().max().item(), o.abs().max().item()
        assert err <= FP64_RTOL * scale, (f"{name}: float64 max|ours - torchvision| = {err:.3g} > "
                                          f"{FP64_RTOL} * {scale:.3g}")
        return
    # A reference that overflowed (inf - inf, inf <= 3 * inf) or a result that did would make the
    # check vacuous: both must be finite.
    assert torch.isfinite(o).all(), f"{name}: the float64 reference is not finite (the check would be vacuous)"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values in the result"
    norm = o.norm().item()
    if norm == 0.0:
        assert torch.count_nonzero(ours) == 0, f"{name}: expected all zeros"
        return
    err_ours = (ours.double() - o).norm().item() / norm
    err_tv = (tv.double() - o).norm().item() / norm
    floor = FLOOR[dtype] if floor is None else floor
    factor = BF16_GRAD_FACTOR if (dtype == torch.bfloat16 and floor >= GRAD_FLOOR) else FACTOR
    bound = factor * err_tv + floor
    # An all-zero result has relative L2 error exactly 1: a bound that reaches it cannot fail.
    assert bound < MAX_BOUND, (f"{name}: vacuous check, bound {bound:.3g} >= {MAX_BOUND} would accept an all-zero "
                               f"result (torchvision's own error {err_tv:.3g})")
    assert err_ours <= bound, (f"{name}: relative L2 error {err_ours:.3g} > {factor} * torchvision's ({err_tv:.3g}) "
                               f"+ {floor}")


def check_state(tag: str, ours: torch.nn.Module, tv: torch.nn.Module, ref: torch.nn.Module,
                grads: bool = True, dtype=torch.float32, floor=None) -> None:
    """Parameters (and their gradients, floor GRAD_FLOOR) and buffers, name by name; ``floor``
    overrides the dtype's floor for parameters and buffers (GRAD_FLOOR after an fp32 optimizer
    step has applied gradients)."""
    tv = tv if tv is not None else ref
    po, pt, pr = dict(ours.named_parameters()), dict(tv.named_parameters()), dict(ref.named_parameters())
    assert po.keys() == pt.keys() == pr.keys()
    for n in pr:
        check(f"{tag} param {n}", po[n].detach(), pt[n].detach(), pr[n].detach(), dtype, floor)
        if grads:
            assert po[n].grad is not None, f"{tag}: no gradient for {n}"
            check(f"{tag} grad {n}", po[n].grad, pt[n].grad, pr[n].grad, dtype, floor=GRAD_FLOOR)
    bo, bt, br = dict(ours.named_buffers()), dict(tv.named_buffers()), dict(ref.named_buffers())
    assert bo.keys() == bt.keys() == br.keys()
    for n in br:
        if n.endswith("num_batches_tracked"):
            assert torch.equal(bo[n], bt[n]), f"{tag} {n}: {bo[n]} != {bt[n]}"
        else:
            check(f"{tag} buffer {n}", bo[n], bt[n], br[n], dtype, floor)


def count_calls(monkeypatch, module) -> Dict[str, int]:
    """Count the functional-API calls made through ``module`` (models.resnet or models.fuse), per
    unit: a residual block run as one function (``residual_block``, training) counts as the
    per-unit calls it replaces (a ``conv_bn_act`` per inner unit, one ``conv_bn_add_act``; with
    ``add_input=False`` and no shortcut, the stem: a ``conv_bn_act`` per unit)."""
    counts: Dict[str, int] = {}
    if hasattr(module, "residual_block"):
        orig_block = module.residual_block

        def block(x, units, shortcut=None, _orig=orig_block, **k):
            out = _orig(x, units, shortcut, **k)
            if out is not None:
                added = shortcut is not None or k.get("add_input", True)
                counts["conv_bn_act"] = counts.get("conv_bn_act", 0) + len(units) - added
                if added:
                    counts["conv_bn_add_act"] = counts.get("conv_bn_add_act", 0) + 1
            return out
        monkeypatch.setattr(module, "residual_block", block)
    # (models.resnet calls the functions past their module checks, unit_act / unit_add_act)
    for fn, name in (("conv_bn_act", "conv_bn_act"), ("conv_bn_add_act", "conv_bn_add_act"),
                     ("unit_act", "conv_bn_act"), ("unit_add_act", "conv_bn_add_act")):
        if not hasattr(module, fn):
            continue
        orig = getattr(module, fn)

        def wrapped(*a, _orig=orig, _fn=name, **k):
            counts[_fn] = counts.get(_fn, 0) + 1
            return _orig(*a, **k)
        monkeypatch.setattr(module, fn, wrapped)
    return counts


def classes(model) -> Dict[str, type]:
    return {n: type(m) for n, m in model.named_modules()}
