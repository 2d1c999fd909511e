"""The 'aten' backend's training unit (``Backend.train_unit``; used by resnet_kernels/_unitplan.py).

A bound training plan whose ops (``conv2d_stats`` [+ the projection's], ``batch_norm_act``,
``bn_running_update``) all resolved to 'aten' runs the whole unit, relu?(bn(conv(x)) + S) with S
the identity, or rbn(rconv(rx)), or nothing, as ``nn.Conv2d -> nn.BatchNorm2d (-> add) -> ReLU``
run it, instead of the ops one by one:

forward   per side: ``conv2d``, then ``native_batch_norm`` in its training form with the running
          buffers (batch statistics, normalisation and running update in one call, PyTorch's own
          kernels) and ``num_batches_tracked.add_``; then ``add_`` and ``relu_``;
backward  ``threshold_backward``, ``native_batch_norm_backward`` with the saved mean and invstd
          (aten_batch_norm.batch_norm_act_backward given ``invstd``); the planned unit then calls
          ``convolution_backward`` as for the ops.

The per-op path makes, per BatchNorm, three more calls forward (its separate statistics pass,
var * unbias, the lerp) and two more backward (var + eps, rsqrt). The numbers are PyTorch's own
BatchNorm's (tests/test_unitplan.py: bitwise nn.BatchNorm2d's on CPU); they agree with the per-op
path within rounding (that path rounds the running update and invstd in other steps).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .._checks import acc_dtype
from .aten_batch_norm import batch_norm_act_backward

_conv2d = torch.conv2d  # (the C bindings: no Python frame)
_native_batch_norm = torch.native_batch_norm
_ONE = torch.tensor(1)  # (num_batches_tracked's increment, as aten_batch_norm's)
_Tensor = torch.Tensor


def supports(x_dtype: torch.dtype, sides: Sequence[Sequence[Optional[torch.Tensor]]]) -> Optional[str]:
    """None where ``native_batch_norm`` takes each side's (weight, bias, running_mean, running_var)
    as they are: the present ones of one dtype, the activation's or its accumulation dtype (what
    PyTorch's CPU and CUDA batch norms accept); running_mean and running_var both or neither.
    Else why not (the plan then binds the ops one by one)."""
    allowed = (x_dtype, acc_dtype(x_dtype))
    for side in sides:
        dts = {t.dtype for t in side if t is not None}
        if len(dts) > 1:
            return f"BatchNorm parameters and buffers of several dtypes {sorted(map(str, dts))}"
        if dts and dts.pop() not in allowed:
            return f"BatchNorm parameters not in {x_dtype} or {acc_dtype(x_dtype)}"
        if (side[2] is None) != (side[3] is None):
            return "running_mean without running_var (or the reverse)"
    return None


def forward(x, weight, geometry, bn_weight, bn_bias, running_mean, running_var, count, factor, eps, identity,
            rx, rweight, rgeometry, rbn_weight, rbn_bias, rrunning_mean, rrunning_var, rcount, rfactor, reps, relu):
    """(out, y, mean, invstd, r, rmean, rinvstd). ``geometry``: (stride, padding, dilation, groups);
    ``count``: the num_batches_tracked to increment (None: not counted); ``factor``: the running
    update's momentum (the cumulative average's 1 / (count + 1) included); running buffers None:
    none kept. The projection side (``rx`` ...) likewise, or ``rx`` None: ``identity`` (or None) is
    added as it is."""
    y = _conv2d(x, weight, None, *geometry)
    out, mean, invstd = _native_batch_norm(y, bn_weight, bn_bias, running_mean, running_var, True, factor, eps)
    if count is not None:
        count.add_(_ONE if type(count) is _Tensor else 1)
    r = rmean = rinvstd = None
    if rx is not None:
        r = _conv2d(rx, rweight, None, *rgeometry)
        z, rmean, rinvstd = _native_batch_norm(r, rbn_weight, rbn_bias, rrunning_mean, rrunning_var, True, rfactor,
                                               reps)
        if rcount is not None:
            rcount.add_(_ONE if type(rcount) is _Tensor else 1)
        out.add_(z)
    elif identity is not None:
        out.add_(identity)
    if relu:
        out.relu_()
    return out, y, mean, invstd, r, rmean, rinvstd


_NO_DTYPES = (None, None, None, None)


def backward(grad, out, y, mean, invstd, bn_weight, r, rmean, rinvstd, rbn_weight, needs, eps, reps, relu):
    """[grad_y, grad_identity (or grad_r), grad_weight, grad_bias, grad_rweight, grad_rbias] (None
    where not needed; ``needs`` as batch_norm_act_backward's) from ``forward``'s saved tensors: ``r``
    the projection's convolution output, or the raw identity with ``rmean`` None."""
    return batch_norm_act_backward(grad, out, y, mean, None, bn_weight, r, rmean, None, rbn_weight, needs, _NO_DTYPES,
                                   eps, reps, relu, 0, 0, invstd=invstd, id_invstd=rinvstd)
