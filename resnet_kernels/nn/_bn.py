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
and updates its running statistics with them and the global count, as nn.SyncBatchNorm does
(the collective runs before any buffer changes).

Failed calls change nothing: the argument checks (and torch's "more than 1 value per channel"
error) come before any side effect, and a caller that still has to run ops that may raise passes
``updates=[]``: the side effects are then appended to that list as callables instead of being
applied, and the caller runs them (``commit(updates)``) once everything has succeeded
(``batch_stats_args`` appends ``PendingUpdate`` entries, which ``commit`` applies together: one
``bn_running_update`` call, one launch for a residual block's BatchNorms).

Empty batches behave like ``nn.BatchNorm2d``: in training ``num_batches_tracked`` still counts
the call, the running statistics are left unchanged, and (scale, shift) are (weight, bias) (torch
returns ``input * weight[0] + bias[0]`` for an empty input), so the output is empty and the
gradients of weight and bias are zeros, never NaN.
"""

from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from .._checks import acc_dtype
from ._sync import sync_batch_stats, sync_group


def _batch_mean_var(x: Tensor) -> Tuple[Tensor, Tensor]:
    var, mean = torch.var_mean(x.to(acc_dtype(x.dtype)), dim=(0, 2, 3), correction=0)
    return mean, var


def uses_batch_stats(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    if bn.training:
        return True
    b = bn._buffers  # (what bn.running_mean reads, without nn.Module.__getattr__'s Python frame)
    return b.get("running_mean") is None and b.get("running_var") is None


class PendingUpdate(NamedTuple):
    """A BatchNorm's running-statistics update deferred by ``batch_stats_args``: ``update`` is the
    (mean, var, running_mean, running_var, num_batches_tracked, factor, unbias) tuple of
    ``ops.batch_norm.bn_running_update_many``."""

    update: tuple
    backend: Optional[str]


def commit(updates: Optional[List]) -> None:
    """Apply the side effects deferred by ``bn_scale_shift(..., updates=...)`` (callables) and
    ``batch_stats_args`` (``PendingUpdate``), in order: consecutive running-statistics updates of one
    backend go out as one ``bn_running_update_many`` call (one launch for a residual block's up to 4
    BatchNorms on cuda and triton), split where a buffer would be updated twice (a BatchNorm module
    used twice), so that each applies after the previous one as nn.BatchNorm2d's would."""
    batch: list = []
    backend = None
    seen: set = set()
    for u in updates or ():
        if isinstance(u, PendingUpdate):
            ids = {id(t) for t in u.update[2:5] if t is not None}
            if batch and (u.backend != backend or ids & seen):
                _flush(batch, backend)
                batch, seen = [], set()
            batch.append(u.update)
            backend = u.backend
            seen |= ids
            continue
        if batch:
            _flush(batch, backend)
            batch, seen = [], set()
        u()
    if batch:
        _flush(batch, backend)


def one_call(updates: Optional[List]) -> Optional[List[tuple]]:
    """The (mean, var, running_mean, running_var, num_batches_tracked, factor, unbias) tuples of
    ``updates`` where ``commit`` would apply them as one ``bn_running_update_many`` call (every entry
    a ``PendingUpdate`` of one backend, no buffer in two of them), for an op that applies them
    itself after its output (the training block's tail, ``batch_norm_act_bits``); else None."""
    if not updates:
        return []
    seen: set = set()
    backend = updates[0].backend if isinstance(updates[0], PendingUpdate) else None
    for u in updates:
        if not isinstance(u, PendingUpdate) or u.backend != backend:
            return None
        for t in u.update[2:5]:
            if t is not None:
                if id(t) in seen:
                    return None
                seen.add(id(t))
    return [u.update for u in updates]


def _flush(batch: list, backend: Optional[str]) -> None:
    (_bn_running_update_many or _load_update())(batch, backend=backend)


def bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm, x: Tensor,
                   batch_stats: Optional[Tuple[Tensor, Tensor]] = None,
                   updates: Optional[List[Callable[[], None]]] = None) -> Tuple[Tensor, Tensor]:
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D (N, C, H, W) input for {type(bn).__name__}, got shape {tuple(x.shape)}")
    C = x.shape[1]
    if C != bn.num_features:
        raise ValueError(f"{type(bn).__name__}({bn.num_features}) got an input with {C} channels")
    batch = uses_batch_stats(bn)
    m = x.numel() // C if C else 0
    group = sync_group(bn) if batch else None  # a synchronising SyncBatchNorm: the group's union counts
    if batch and group is None and m == 1:
        # torch's own check and message; raised before any side effect (torch increments
        # num_batches_tracked first)
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)}")
    # Mirrors torch.nn.modules.batchnorm._BatchNorm.forward (the counter is read, the update deferred).
    if bn.momentum is None:
        factor = 0.0
    else:
        factor = bn.momentum
    count = bn.training and bn.track_running_stats and bn.num_batches_tracked is not None
    if count and bn.momentum is None:
        factor = 1.0 / (float(bn.num_batches_tracked) + 1.0)
    effects: List[Callable[[], None]] = []
    if count:
        effects.append(lambda: bn.num_batches_tracked.add_(1))

    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if batch and group is None and m == 0:
        # nn.BatchNorm2d on an empty input: input * weight[0] + bias[0], running stats untouched
        _run(effects, updates)
        if bn.weight is not None:
            dt = torch.float64 if bn.weight.dtype == torch.float64 else acc
            return bn.weight.to(dt), bn.bias.to(dt)
        return x.new_ones((C,), dtype=acc), x.new_zeros((C,), dtype=acc)
    if batch:
        mean, var = batch_stats if batch_stats is not None else _batch_mean_var(x)
        if group is None:
            unbias = m / (m - 1)
        else:
            # nn.SyncBatchNorm over the process group: the statistics of the union of the ranks'
            # batches (a rank may have none), the running variance unbiased by the global count
            mean, var, total = sync_batch_stats(mean, var, m, group)
            unbias = total / (total - 1)
        if bn.training and bn.track_running_stats and bn.running_mean is not None:
            mean_d, unbiased = mean.detach(), var.detach() * unbias

            def update_running():
                with torch.no_grad():
                    bn.running_mean.mul_(1.0 - factor).add_(mean_d.to(bn.running_mean.dtype), alpha=factor)
                    bn.running_var.mul_(1.0 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)

            effects.append(update_running)
    else:
        mean, var = bn.running_mean, bn.running_var
    _run(effects, updates)
    if mean.dtype == torch.float64:
        acc = torch.float64
    invstd = torch.rsqrt(var.to(acc) + bn.eps)
    if bn.weight is not None:
        scale = bn.weight.to(acc) * invstd
        shift = bn.bias.to(acc) - mean.to(acc) * scale
    else:
        scale = invstd
        shift = -mean.to(acc) * invstd
    return scale, shift


class BatchStats(NamedTuple):
    """A BatchNorm in training, as ``ops.batch_norm.batch_norm_act`` takes it: the batch statistics
    of its input (from the convolution's epilogue) and its parameters."""

    mean: Tensor
    var: Tensor
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    eps: float

    def scale_shift(self) -> Tuple[Tensor, Tensor]:
        """(scale, shift) of the same BN, differentiable through mean and var (for a unit that must
        take the general path because of its other BN)."""
        acc = self.mean.dtype
        invstd = torch.rsqrt(self.var + self.eps)
        scale = invstd if self.weight is None else self.weight.to(acc) * invstd
        shift = -self.mean * scale
        return scale, (shift if self.bias is None else shift + self.bias.to(acc))


def batch_stats_args(bn: nn.modules.batchnorm._BatchNorm, y: Tensor, mean: Tensor, var: Tensor,
                     updates: list, backend: Optional[str]) -> Optional[BatchStats]:
    """``bn`` (using batch statistics) applied to ``y``, whose batch mean and biased variance are
    ``mean``/``var``, as a :class:`BatchStats` for ``batch_norm_act``; bn's side effects (the running
    statistics and num_batches_tracked) are appended to ``updates`` as a ``PendingUpdate``, exactly
    those of ``bn_scale_shift``; ``commit`` applies a unit's or a block's together (one kernel). None (and nothing appended) where the general
    path must run: a synchronising SyncBatchNorm, an empty batch. Raises (before any side effect)
    what ``bn_scale_shift`` raises."""
    if y.dim() != 4:
        raise ValueError(f"expected a 4-D (N, C, H, W) input for {type(bn).__name__}, got shape {tuple(y.shape)}")
    C = y.shape[1]
    if C != bn.num_features:
        raise ValueError(f"{type(bn).__name__}({bn.num_features}) got an input with {C} channels")
    m = y.numel() // C if C else 0
    if m == 0 or sync_group(bn) is not None:
        return None
    if m == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(y.shape)}")
    count = bn.training and bn.track_running_stats and bn.num_batches_tracked is not None
    # (as _BatchNorm.forward: buffers kept after track_running_stats was turned off are not updated)
    running = bn.training and bn.track_running_stats and bn.running_mean is not None
    if count or running:
        if bn.momentum is None:
            # the count this update will follow: the buffer's, plus this BN's updates still pending
            # in ``updates`` (a module used twice in one block)
            pending = sum(1 for u in updates if isinstance(u, PendingUpdate) and u.update[4] is bn.num_batches_tracked)
            factor = 1.0 / (float(bn.num_batches_tracked) + 1.0 + pending) if count else 0.0
        else:
            factor = bn.momentum
        rm, rv = (bn.running_mean, bn.running_var) if running else (None, None)
        nbt = bn.num_batches_tracked if count else None
        updates.append(PendingUpdate((mean, var, rm, rv, nbt, factor, m / (m - 1)), backend))
    return BatchStats(mean, var, bn.weight, bn.bias, float(bn.eps))


_bn_running_update_many = None


def _load_update():
    global _bn_running_update_many
    from ..ops.batch_norm import bn_running_update_many  # imported on first use (the op module imports this one)
    _bn_running_update_many = bn_running_update_many
    return bn_running_update_many


def _run(effects: List[Callable[[], None]], updates: Optional[List[Callable[[], None]]]) -> None:
    if updates is None:
        commit(effects)
    else:
        updates.extend(effects)
