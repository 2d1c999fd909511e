"""nn.BatchNorm2d semantics as a per-channel affine (scale, shift), shared by the fused modules.

``bn_scale_shift(bn, x)`` returns (scale, shift) such that ``bn(x) == x * scale[c] + shift[c]``
in ``bn``'s current mode, and performs exactly the side effects ``bn(x)`` would:
``num_batches_tracked += 1``, the momentum (or cumulative, ``momentum=None``) update of the
running mean and of the running variance (unbiased by m / (m - 1)). Batch statistics may be
supplied (e.g. produced by a convolution epilogue); otherwise they are computed from ``x``.
Gradients flow to ``x`` through the batch statistics, and to ``bn.weight``/``bn.bias``.

An ``nn.SyncBatchNorm`` that synchronises in this call (training, torch.distributed initialised,
a process group of more than one process: see ``_sync.sync_group``) uses the statistics of the
union of the group's batches instead, gathered from the per-process (mean, var) (see _sync.py),
and updates its running statistics with them and the global count, as nn.SyncBatchNorm does.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .._checks import acc_dtype
from ._sync import sync_batch_stats, sync_group


def _batch_mean_var(x: Tensor) -> Tuple[Tensor, Tensor]:
    var, mean = torch.var_mean(x.to(acc_dtype(x.dtype)), dim=(0, 2, 3), correction=0)
    return mean, var


def uses_batch_stats(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm, x: Tensor,
                   batch_stats: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D (N, C, H, W) input for {type(bn).__name__}, got shape {tuple(x.shape)}")
    C = x.shape[1]
    if C != bn.num_features:
        raise ValueError(f"{type(bn).__name__}({bn.num_features}) got an input with {C} channels")
    # Mirrors torch.nn.modules.batchnorm._BatchNorm.forward (and SyncBatchNorm.forward), except that
    # every check (and, for a SyncBatchNorm, the collective) runs before any buffer changes, so a
    # failed call leaves the module's state untouched.
    if uses_batch_stats(bn):
        m = x.numel() // C if C else 0
        group = sync_group(bn)
        if group is None:
            if m <= 1:
                raise ValueError(f"Expected more than 1 value per channel when training, "
                                 f"got input size {list(x.shape)}")
            mean, var = batch_stats if batch_stats is not None else _batch_mean_var(x)
            unbias = m / (m - 1)
        else:
            # nn.SyncBatchNorm over the process group: the statistics of the union of the ranks'
            # batches (a rank may have none), the running variance unbiased by the global count.
            mean, var = batch_stats if batch_stats is not None else _batch_mean_var(x)
            mean, var, total = sync_batch_stats(mean, var, m, group)
            unbias = total / (total - 1)
    else:
        mean, var = bn.running_mean, bn.running_var

    if bn.momentum is None:
        factor = 0.0
    else:
        factor = bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    if uses_batch_stats(bn) and bn.training and bn.running_mean is not None:
        with torch.no_grad():
            bn.running_mean.mul_(1.0 - factor).add_(mean.detach().to(bn.running_mean.dtype), alpha=factor)
            unbiased = var.detach() * unbias
            bn.running_var.mul_(1.0 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)
    acc = torch.float64 if (x.dtype == torch.float64 or mean.dtype == torch.float64) else torch.float32
    invstd = torch.rsqrt(var.to(acc) + bn.eps)
    if bn.weight is not None:
        scale = bn.weight.to(acc) * invstd
        shift = bn.bias.to(acc) - mean.to(acc) * scale
    else:
        scale = invstd
        shift = -mean.to(acc) * invstd
    return scale, shift
