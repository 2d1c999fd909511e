"""The Triton wgrad's launch geometry as plain Python (no triton import): its configs, column tiles
and split-K count, shared by the launcher (triton_ops/conv2d_wgrad.py) and the accountant's cost
of that implementation (resnet_kernels/backends/__init__.py), which must count the scratch the
launch really allocates on a GPU without importing triton."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class WgradConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3
    packed_n: Optional[bool] = None  # None: decided from the shape (see use_packed_n)
    splits: Optional[int] = None     # None: ``choose_splits``; else forced (tests): equal pixel ranges


# The interpreter runs one program at a time in numpy: one small config, few splits.
INTERPRETER_CONFIG = WgradConfig(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)

# split-K: about this many programs (tiles x splits): two waves' worth of an H100/H200's 132 SMs,
# each split at least MIN_SPLIT_ITERS BLOCK_K chunks long (its partial tile, 4 bytes per gw
# element, costs as much traffic as a few chunks of operands). A function of the shape only.
GPU_TARGET_PROGRAMS, GPU_MIN_SPLIT_ITERS = 264, 16
INTERPRETER_TARGET_PROGRAMS, INTERPRETER_MIN_SPLIT_ITERS = 4, 2


def choose_splits(num_tiles: int, npix: int, block_k: int, target_programs: int,
                  min_iters: int) -> Tuple[int, int]:
    """(SPLITS, pixels per split): enough splits that num_tiles * SPLITS reaches about
    ``target_programs``, none shorter than ``min_iters`` chunks of ``block_k`` pixels (but at
    least one split), every split a whole number of chunks and none empty (the last one may be
    shorter)."""
    iters = max(1, cdiv(npix, block_k))
    splits = max(1, min(cdiv(target_programs, max(1, num_tiles)), iters // max(1, min_iters)))
    per = cdiv(iters, splits)
    return cdiv(iters, per), per * block_k


def use_packed_n(cin: int, kh: int, kw: int, block_n: int) -> bool:
    """Packed columns when padding every tap's channel chunk up to BLOCK_N would waste more than
    a third of the column tiles (the 7x7 stem on Cin=3: 49 chunked tiles vs 3 packed)."""
    chunked = kh * kw * cdiv(cin, block_n)
    packed = cdiv(cin * kh * kw, block_n)
    return 3 * chunked > 4 * packed


def tiles(cfg: WgradConfig, cout: int, cin: int, kh: int, kw: int) -> Tuple[bool, int]:
    """(packed columns, number of [BLOCK_M, BLOCK_N] tiles of grad_weight)."""
    packed = cfg.packed_n if cfg.packed_n is not None else use_packed_n(cin, kh, kw, cfg.BLOCK_N)
    tiles_n = cdiv(cin * kh * kw, cfg.BLOCK_N) if packed else kh * kw * cdiv(cin, cfg.BLOCK_N)
    return packed, cdiv(cout, cfg.BLOCK_M) * tiles_n


def gpu_config(npix: int, cout: int, cin: int, kh: int, kw: int, dtype: torch.dtype, arch: int,
               allow_tf32: bool = True) -> WgradConfig:
    """Heuristic GPU config for ResNet shapes (batch 256), chosen from the AOT register/spill
    report (tests/test_triton_conv2d_wgrad_aot.py) on triton 3.6 and 3.8, not from timings (none
    measured yet):
    * rows: 64 output channels when Cout is 64 (ResNet's smallest), else 128;
    * columns: 128 input channels per tap when Cin >= 128, else 64 (Cin = 64 fills it exactly);
      the stem (Cin = 3, N_gemm = 147) packs its columns, 64 wide (3 tiles);
    * BLOCK_K = 32 pixels: the dy prologue holds up to three [BLOCK_M, BLOCK_K] operand tiles
      (g, mask, y) in flight per stage, so longer chunks cost shared memory and registers; fp32
      below sm_90 (mma.sync holds both operands' K slice in registers) and fp32 without tf32
      (3xTF32: three dots per chunk) use 16
      and a column tile of 64 (128x128 fp32 spilled on sm_80);
    * 8 warps, 3 stages.
    ``arch`` is the compute capability as major*10+minor."""
    is_fp32 = dtype == torch.float32
    block_m = 64 if cout <= 64 else 128
    block_n = 128 if cin >= 128 else 64
    block_k, num_stages = 32, 3
    if is_fp32 and (arch < 90 or not allow_tf32):
        block_k = 16
        block_n = 64  # 128x128x16 fp32 spilled on sm_80 (triton 3.8: 128 registers + 24 bytes of spills)
    return WgradConfig(block_m, block_n, block_k, GROUP_M=8, num_warps=8, num_stages=num_stages)


def scratch_bytes(npix: int, cout: int, cin: int, kh: int, kw: int, dtype: torch.dtype, arch: int,
                  allow_tf32: bool = True) -> Tuple[int, int]:
    """(SPLITS, bytes of the fp32 split-K scratch) of a GPU launch: 0 bytes with one split."""
    cfg = gpu_config(npix, cout, cin, kh, kw, dtype, arch, allow_tf32)
    _, n = tiles(cfg, cout, cin, kh, kw)
    splits, _ = choose_splits(n, npix, cfg.BLOCK_K, GPU_TARGET_PROGRAMS, GPU_MIN_SPLIT_ITERS)
    return splits, (0 if splits == 1 else splits * n * cfg.BLOCK_M * cfg.BLOCK_N * 4)
