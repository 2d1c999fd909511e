"""Output allocation for the ops. In poison mode (tests) every freshly allocated output is
filled with NaN (integers: a large sentinel) so an element a kernel forgot to write fails."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

_poison = False


@contextlib.contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    global _poison
    old, _poison = _poison, enabled
    try:
        yield
    finally:
        _poison = old


def poisoning() -> bool:
    return _poison


def _fill(t: torch.Tensor) -> torch.Tensor:
    if _poison and t.numel() and not isinstance(t, torch._subclasses.FakeTensor):
        t.fill_(float("nan") if t.is_floating_point() else -12345)
    return t


def empty_like(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Same shape and strides as dense ``x`` (NCHW or channels_last)."""
    return _fill(torch.empty_like(x, dtype=dtype))


def empty(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _fill(torch.empty(shape, dtype=dtype, device=device))
