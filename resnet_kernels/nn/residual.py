"""Residual epilogue modules: ``AddReLU`` and ``BNAddReLU``."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

import torch

from ..ops.batch_norm import batch_norm_act
from ..ops.bn_add_relu import add_relu, bn_add_relu
from ._bn import batch_stats_args, bn_scale_shift, commit, uses_batch_stats
from .._checks import check_activation, check_layout, check_like
from .._script import no_script
from .conv_bn import _check_backend


class AddReLU(nn.Module):
    """relu(x + identity) in one fused pass."""

    def __init__(self, backend: Optional[str] = None):
        super().__init__()
        self.backend = _check_backend("AddReLU", backend)

    def forward(self, x: Tensor, identity: Tensor) -> Tensor:
        return add_relu(x, identity, backend=self.backend)

    __prepare_scriptable__ = no_script


class BNAddReLU(nn.Module):
    """relu(bn(x) + identity), or relu(bn(x) + shortcut_bn(identity)) with ``shortcut_bn``.

    ``bn`` and ``shortcut_bn`` are real ``nn.BatchNorm2d`` modules (same parameter names,
    ``state_dict`` keys, initialisation and train/eval behaviour, running statistics included);
    their effect is applied as a per-channel affine inside one fused kernel with the add and
    the ReLU. Either may be replaced by an ``nn.SyncBatchNorm`` (e.g. by
    ``nn.SyncBatchNorm.convert_sync_batchnorm``): its statistics are then synchronised across the
    process group in training, as nn.SyncBatchNorm's are.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, shortcut_bn: bool = False, device=None, dtype=None,
                 backend: Optional[str] = None):
        super().__init__()
        kw = dict(eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats,
                  device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(num_features, **kw)
        self.shortcut_bn = nn.BatchNorm2d(num_features, **kw) if shortcut_bn else None
        self.backend = _check_backend("BNAddReLU", backend)

    @classmethod
    def from_modules(cls, bn: nn.BatchNorm2d, shortcut_bn: Optional[nn.BatchNorm2d] = None,
                     backend: Optional[str] = None) -> "BNAddReLU":
        """Wrap existing BatchNorm2d (or SyncBatchNorm) modules; their parameters and buffers are
        shared, not copied."""
        for name, m in (("bn", bn), ("shortcut_bn", shortcut_bn)):
            if m is not None and type(m) not in (nn.BatchNorm2d, nn.SyncBatchNorm):
                raise TypeError(f"BNAddReLU.from_modules: {name} must be an nn.BatchNorm2d or nn.SyncBatchNorm, "
                                f"got {type(m).__name__}")
        backend = _check_backend("BNAddReLU.from_modules", backend)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.bn = bn
        self.shortcut_bn = shortcut_bn
        self.backend = backend
        return self

    def forward(self, x: Tensor, identity: Tensor) -> Tensor:
        # the op's own checks of x and identity first, so the BatchNorm statistics never see a bad
        # identity (e.g. on another device: torch's error would not name it)
        layout = check_layout("BNAddReLU", "x", x) if check_activation("BNAddReLU", "x", x) is None else None
        if identity is not None:
            check_like("BNAddReLU", "identity", identity, x, "x", layout)
        updates: list = []  # the BNs' side effects, applied once the fused op has succeeded
        st = self._batch_stats(self.bn, x, updates)
        r_st = self._batch_stats(self.shortcut_bn, identity, updates) if self.shortcut_bn is not None else None
        if st is not None and (self.shortcut_bn is None or r_st is not None):
            # every BN uses batch statistics: batch_norm_act (its backward includes the path
            # through the statistics, so they are computed without autograd here)
            if r_st is None:
                out = batch_norm_act(x, st.mean, st.var, st.weight, st.bias, identity, eps=st.eps, relu=True,
                                     backend=self.backend)
            else:
                out = batch_norm_act(x, st.mean, st.var, st.weight, st.bias, identity, r_st.mean, r_st.var,
                                     r_st.weight, r_st.bias, eps=st.eps, id_eps=r_st.eps, relu=True,
                                     backend=self.backend)
            commit(updates)
            return out
        updates.clear()  # the general path below defers the same side effects itself
        scale, shift = bn_scale_shift(self.bn, x, updates=updates)
        if self.shortcut_bn is None:
            out = bn_add_relu(x, scale, shift, identity, backend=self.backend)
        else:
            if identity is None:
                raise TypeError("BNAddReLU: identity must be a torch.Tensor (shortcut_bn normalises it), got None")
            id_scale, id_shift = bn_scale_shift(self.shortcut_bn, identity, updates=updates)
            out = bn_add_relu(x, scale, shift, identity, id_scale, id_shift, backend=self.backend)
        commit(updates)
        return out

    def _batch_stats(self, bn, t, updates):
        """A ``BatchStats`` of bn applied to t (batch statistics from torch.var_mean, without
        autograd), or None where the general path runs (eval, a synchronising SyncBatchNorm, an
        empty batch)."""
        if not uses_batch_stats(bn) or not isinstance(t, Tensor) or t.dim() != 4 or t.numel() == 0:
            return None
        with torch.no_grad():
            var, mean = torch.var_mean(t, dim=(0, 2, 3), correction=0) if t.dtype in (torch.float32, torch.float64) \
                else torch.var_mean(t.float(), dim=(0, 2, 3), correction=0)
        return batch_stats_args(bn, t, mean, var, updates, self.backend)

    def extra_repr(self) -> str:
        return f"shortcut_bn={self.shortcut_bn is not None}, backend={self.backend!r}"

    __prepare_scriptable__ = no_script
