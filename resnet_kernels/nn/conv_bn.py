"""Fused convolution + BatchNorm (+ ReLU) modules: ``ConvBNReLU`` and ``ConvBN``.

Each holds a real ``nn.Conv2d`` as ``.conv`` and a real ``nn.BatchNorm2d`` as ``.bn``: same
parameter names (``state_dict`` keys ``conv.weight``, ``bn.weight``, ``bn.bias``,
``bn.running_mean``, ``bn.running_var``, ``bn.num_batches_tracked``), same initialisation, same
``train()``/``eval()`` behaviour (batch statistics and running-statistics updates in training,
running statistics folded into the convolution's epilogue in eval). See
``resnet_kernels.functional.conv_bn_act`` for how each mode runs.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .. import _backend
from .._script import no_script

# resnet_kernels.functional imports this package (for _bn): bind the module, use it at call time.
from .. import functional as _functional


def _check_backend(where: str, backend: Optional[str]) -> Optional[str]:
    """A module's backend: None (the one in force at each call) or a valid name, checked when the
    module is built rather than at its first forward."""
    if backend is None:
        return None
    try:
        return _backend._check_name(backend)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


class _ConvBNAct(nn.Module):
    _RELU: bool = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, padding_mode: str = "zeros", eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True, track_running_stats: bool = True,
                 device=None, dtype=None, backend: Optional[str] = None):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                              dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                              device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, affine=affine,
                                 track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.backend = _check_backend(type(self).__name__, backend)

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: Optional[bool] = None,
                     backend: Optional[str] = None) -> "_ConvBNAct":
        """Wrap existing modules; their parameters and buffers are shared, not copied.

        relu: True gives a ``ConvBNReLU``, False a ``ConvBN``; None (default) the class it is
        called on (``ConvBNReLU.from_modules(conv, bn)`` applies the ReLU).
        """
        _functional._check_pair(f"{cls.__name__}.from_modules", conv, bn)
        if relu is None:
            relu = cls._RELU
        _functional._check_bool(f"{cls.__name__}.from_modules", "relu", relu)
        backend = _check_backend(f"{cls.__name__}.from_modules", backend)
        target = ConvBNReLU if relu else ConvBN
        self = target.__new__(target)
        nn.Module.__init__(self)
        self.conv = conv
        self.bn = bn
        self.backend = backend
        return self

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """act(bn(conv(x)) + residual); residual: optional, the output's shape and dtype."""
        return _functional.conv_bn_act(x, self.conv, self.bn, relu=self._RELU, residual=residual, backend=self.backend)

    def extra_repr(self) -> str:
        return f"relu={self._RELU}, backend={self.backend!r}"

    __prepare_scriptable__ = no_script


class ConvBNReLU(_ConvBNAct):
    """relu(bn(conv(x)) [+ residual]): drop-in for ``nn.Conv2d -> nn.BatchNorm2d -> nn.ReLU``.

    The constructor mirrors ``nn.Conv2d`` (bias defaults to False, as before a BN) followed by
    ``nn.BatchNorm2d``'s options; ``backend`` picks the kernels (None: the one in force).
    """

    _RELU = True


class ConvBN(_ConvBNAct):
    """bn(conv(x)) [+ residual], no ReLU: drop-in for ``nn.Conv2d -> nn.BatchNorm2d``."""

    _RELU = False


__all__ = ["ConvBNReLU", "ConvBN"]
