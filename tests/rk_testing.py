"""Helpers shared by the tests (importable because pytest puts tests/ on sys.path)."""

import os

import torch

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"
# cuda needs a GPU; triton runs on the GPU or, without one, in the interpreter (conftest sets it).
KERNEL_BACKENDS = ["triton", "cuda"] if HAS_GPU else ["triton"]
ALL_BACKENDS = ["torch"] + KERNEL_BACKENDS


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Elementwise ops compute in fp32 (fp64 for fp64) and round once, like the reference; the only
# difference left is the final rounding of the output (fp32->bf16 casts truncate under the
# interpreter: 1 bf16 ulp = 2**-7 relative) and fp32 reassociation for the per-channel sums.
ELEMENTWISE_TOL = {
    torch.float32: dict(atol=1e-6, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=2 ** -10),   # 1 fp16 ulp
    torch.bfloat16: dict(atol=1e-2, rtol=2 ** -7),  # 1 bf16 ulp (interpreter truncates)
    torch.float64: dict(atol=1e-12, rtol=1e-12),
}

# Per-channel reductions over N*H*W terms, accumulated in fp32 in a different order than
# torch.sum: error grows like eps32 * sqrt(terms) * |values|; terms are products of O(1) values.
REDUCTION_TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-4, rtol=1e-4),
    torch.bfloat16: dict(atol=1e-4, rtol=1e-4),
    torch.float64: dict(atol=1e-10, rtol=1e-10),
}


def layouts(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x.contiguous()
