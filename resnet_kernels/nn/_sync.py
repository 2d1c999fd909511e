"""Cross-process batch statistics for the fused ``nn.SyncBatchNorm`` path.

The fused units already have each process's per-channel batch statistics (the convolution
epilogue's mean and biased variance, or ``torch.var_mean`` in ``BNAddReLU``). Only those cross
processes, never activations:

* forward: one ``all_gather`` per BN of ``[mean (C), var (C), count_hi, count_lo]`` (the per-rank
  element count m = N*H*W, split so that it is exact in float32 up to 2**48); every rank then
  combines the ranks' (count, mean, M2 = count * var) exactly, in float64 (Chan et al.'s parallel
  formula): ``N = sum n_r``, ``mean = sum n_r mean_r / N``,
  ``var = sum n_r (var_r + (mean_r - mean)^2) / N``. Ranks with no samples contribute nothing
  (as ``nn.SyncBatchNorm`` filters counts < 1). Like ``nn.SyncBatchNorm``: ``all_gather`` on gloo,
  ``all_gather_into_tensor`` on other backends (NCCL).
* backward: one ``all_reduce`` (SUM) per BN of the per-channel gradients of the global
  (mean, var), i.e. the BN-backward sums (``nn.SyncBatchNorm`` all-reduces sum_dy and
  sum_dy_xmu, the same information); each rank then maps them to its own local (mean, var):
  ``d mean_r = n_r/N (G_mean + 2 G_var (mean_r - mean))``, ``d var_r = n_r/N G_var``, which the
  convolution's backward turns into input and weight gradients. A rank with no samples still
  takes part in both collectives (so its peers do not block), as ``nn.SyncBatchNorm`` does.

Both directions are ``torch.library`` custom ops (``resnet_kernels::sync_batch_stats`` and
``resnet_kernels::sync_batch_stats_backward``), opaque to ``torch.compile`` (no graph break, never
recomputed by the partitioner). The process group crosses the op boundary as its name.

``sync_group(bn)`` decides, exactly as ``nn.SyncBatchNorm.forward`` does, whether a BN
synchronises: an ``nn.SyncBatchNorm`` in training mode (batch statistics) with
``torch.distributed`` available and initialised and a process group (``bn.process_group`` or the
world) of more than one process. Otherwise it behaves as a plain BatchNorm (per-process
statistics), exactly like ``nn.SyncBatchNorm``'s fallback to ``F.batch_norm``; eval mode never
synchronises. One deliberate difference: ``nn.SyncBatchNorm`` refuses CPU tensors when it
synchronises; the fused path synchronises CPU tensors too (gloo).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

_HI = float(2 ** 24)  # count = hi * 2**24 + lo, both exact in float32


def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() else None


def sync_group(bn: nn.Module):
    """The process group ``bn`` synchronises over in this forward, or None (plain BN semantics)."""
    if not isinstance(bn, nn.SyncBatchNorm) or not bn.training:
        return None  # SyncBatchNorm: "Don't sync batchnorm stats in inference mode"
    dist = _dist()
    if dist is None or not dist.is_initialized():
        return None
    group = bn.process_group if bn.process_group else dist.group.WORLD
    if dist.get_world_size(group) <= 1:
        return None
    return group


def _group(name: str):
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(name)


@torch.library.custom_op("resnet_kernels::sync_batch_stats", mutates_args=())
def sync_batch_stats_op(mean: Tensor, var: Tensor, count: int, group_name: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(global mean, global biased var, global count as a float64 scalar tensor) over the group."""
    dist = _dist()
    pg = _group(group_name)
    world = dist.get_world_size(pg)
    C = mean.shape[0]
    acc = mean.dtype
    if count > 0:
        cnt = torch.tensor([count // int(_HI), count % int(_HI)], dtype=acc, device=mean.device)
        payload = torch.cat([mean.detach(), var.detach(), cnt])
    else:  # statistics of an empty batch are undefined (NaN): send zeros with a zero count
        payload = torch.zeros(2 * C + 2, dtype=acc, device=mean.device)
    if pg._get_backend_name() == "gloo":
        parts = [torch.empty_like(payload) for _ in range(world)]
        dist.all_gather(parts, payload, group=pg)
        table = torch.stack(parts)
    else:
        table = torch.empty(world, 2 * C + 2, dtype=acc, device=mean.device)
        dist.all_gather_into_tensor(table, payload, group=pg)
    t = table.to(torch.float64)
    n = t[:, 2 * C] * _HI + t[:, 2 * C + 1]  # (world,)
    total = n.sum()
    capturing = t.is_cuda and torch.cuda.is_current_stream_capturing()
    if not capturing and total.item() <= 1:  # (a host sync, as nn.SyncBatchNorm's count mask; not under capture)
        # Every rank sees the same table, so every rank raises here (no rank is left waiting).
        raise ValueError(f"Expected more than 1 value per channel when training, got {int(total.item())} over the "
                         f"{world} processes of the SyncBatchNorm process group")
    w = (n / total)[:, None]
    means, variances = t[:, :C], t[:, C:2 * C]
    g_mean = (w * means).sum(0)
    g_var = (w * (variances + (means - g_mean) ** 2)).sum(0)
    return g_mean.to(acc), g_var.to(acc), total


@sync_batch_stats_op.register_fake
def _(mean, var, count, group_name):
    return torch.empty_like(mean), torch.empty_like(var), mean.new_empty((), dtype=torch.float64)


@torch.library.custom_op("resnet_kernels::sync_batch_stats_backward", mutates_args=())
def sync_batch_stats_backward_op(g_mean: Tensor, g_var: Tensor, mean: Tensor, global_mean: Tensor,
                                 count: int, total: Tensor, group_name: str) -> Tuple[Tensor, Tensor]:
    """Gradients of this rank's local (mean, var) from its partial gradients of the global ones."""
    dist = _dist()
    C = mean.shape[0]
    summed = torch.cat([g_mean, g_var]).contiguous()
    dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=_group(group_name))
    if count == 0:
        z = torch.zeros(C, dtype=mean.dtype, device=mean.device)
        return z, z.clone()
    G = summed.to(torch.float64)
    r = count / total
    d_mean = r * (G[:C] + 2 * G[C:] * (mean.to(torch.float64) - global_mean.to(torch.float64)))
    d_var = r * G[C:]
    return d_mean.to(mean.dtype), d_var.to(mean.dtype)


@sync_batch_stats_backward_op.register_fake
def _(g_mean, g_var, mean, global_mean, count, total, group_name):
    return torch.empty_like(mean), torch.empty_like(mean)


def _setup_context(ctx, inputs, output):
    mean, var, count, group_name = inputs
    g_mean, _, total = output
    ctx.count, ctx.group_name = count, group_name
    ctx.save_for_backward(mean, g_mean, total)


def _backward(ctx, g_mean, g_var, g_total):
    mean, global_mean, total = ctx.saved_tensors
    z = None
    if g_mean is None or g_var is None:
        z = torch.zeros_like(mean)
    d_mean, d_var = sync_batch_stats_backward_op(z if g_mean is None else g_mean.to(mean.dtype),
                                                 z if g_var is None else g_var.to(mean.dtype),
                                                 mean, global_mean, ctx.count, total, ctx.group_name)
    return d_mean, d_var, None, None


sync_batch_stats_op.register_autograd(_backward, setup_context=_setup_context)


def sync_batch_stats(mean: Tensor, var: Tensor, count: int, group) -> Tuple[Tensor, Tensor, Tensor]:
    """(mean, var, total count) of the union of the group's batches, from this rank's (mean, var)
    over ``count`` values per channel; differentiable (see the module docstring)."""
    return sync_batch_stats_op(mean, var, count, group.group_name)


__all__ = ["sync_group", "sync_batch_stats"]
