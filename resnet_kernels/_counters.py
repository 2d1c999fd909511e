"""Arrival counters of the single-launch reductions (the last program/CTA to arrive merges): the
Triton kernels' split-K, statistics merges and finalizes (triton_ops/), and the csrc ones (the
convolution's statistics, the wgrad's split-K, the dgrad's upstream finalize, the BatchNorm
backward's finalize: csrc/arrival.cuh, through backends/cuda_*.py). Torch only."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch


# int32 counters, all zero between launches: a cached buffer per (device, stream), grown as needed
# (a torch.zeros per call would be a memset launch of its own), shared by every kernel that uses
# them (triton_ops' conv2d_wgrad, conv2d, conv2d_dgrad, batch_norm; csrc's through the cuda backends).
# Each kernel's last-arriving program puts the counters it used back to 0, so a launch that
# completes leaves the buffer as it found it.
# Assumptions: the launches that use one buffer run one at a time, i.e. in the order of their
# stream (kernels of one stream do not overlap; each stream has its own buffer); a launch that
# raises in Python may have run partly (the interpreter) or not at all: its caller drops the buffer
# (``drop_arrival_counters``) and the next call starts from a fresh zeroed one. A kernel that
# faults on the GPU leaves the CUDA context unusable anyway. During CUDA graph capture nothing is
# cached: each call captures its own zeroed buffer (a memset node) in the graph's memory pool.
ARRIVAL_COUNTERS: Dict[tuple, torch.Tensor] = {}
MIN_ARRIVAL_COUNTERS = 1024


def _counter_key(device: torch.device):
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return ("cuda", index, torch.cuda.current_stream(index).cuda_stream)
    return (device.type, device.index, None)


def arrival_counters(device: torch.device, n: int) -> Tuple[torch.Tensor, Optional[tuple]]:
    """(an all-zero int32 buffer of at least n counters, its cache key or None if not cached)."""
    if device.type == "meta":
        return torch.zeros(n, dtype=torch.int32, device=device), None
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(n, dtype=torch.int32, device=device), None
    key = _counter_key(device)
    buf = ARRIVAL_COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        size = max(MIN_ARRIVAL_COUNTERS, 1 << (n - 1).bit_length())
        buf = ARRIVAL_COUNTERS[key] = torch.zeros(size, dtype=torch.int32, device=device)
    return buf, key


def drop_arrival_counters(key: Optional[tuple]) -> None:
    """Forget the buffer of ``key`` (a launch that used it raised: its counters may not be 0)."""
    if key is not None:
        ARRIVAL_COUNTERS.pop(key, None)
