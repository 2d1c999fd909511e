"""Helpers shared by the cuda_<op>.py wrappers."""

from __future__ import annotations

import torch

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def ptr(t) -> int:
    """Device pointer of a tensor, 0 for None (the C++ API's 'absent')."""
    return 0 if t is None else t.data_ptr()


def stream_of(t: torch.Tensor) -> int:
    """Raw cudaStream_t of torch's current stream on t's device."""
    return torch.cuda.current_stream(t.device).cuda_stream
