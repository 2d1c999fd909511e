"""Triton weight gradient (wgrad) of a 2-D convolution with the BN-backward operand fused into the
operand load (contract: ``conv2d_wgrad`` in resnet_kernels/backends/torch_conv_backward.py).

    dy = A[co] * g' - (B[co] + K[co] * (y - mean[co])),  g' = g * (mask > 0)
         (mask optional; without coef (3, Cout): dy = g'), in fp32, rounded to the activation dtype
    gw[co, ci, kh, kw] = sum over (n, oh, ow) of dy[n, co, oh, ow] * x[n, ci, oh*sh - ph + kh, ow*sw - pw + kw]

GEMM view: M = Cout (rows), N_gemm = Cin*KH*KW (columns, indexed (kh, kw, ci) so that a
channels_last x gives contiguous ci runs), and the reduction K = N*OH*OW output pixels, which is
huge (802816 for a 56x56 layer at batch 256) while M * N_gemm is small (at most 512 x 4608). Each
program owns a [BLOCK_M, BLOCK_N] tile of gw and one contiguous range of pixels (its split); per
BLOCK_K chunk of pixels it loads g (and mask, y) as a [BLOCK_M, BLOCK_K] tile, computes dy in fp32
(``_common.bn_dy``), forces the out-of-range elements to 0 (after bn_dy: bn_dy of a zero g is not
zero), rounds dy to the activation dtype (``_common.round_to``: the operand cuDNN would read) and
``tl.dot``s it with the gathered [BLOCK_K, BLOCK_N] tile of x (zero outside the image), fp32
accumulation. g/mask/y share one layout, x has its own: both are read through their strides
(NCHW-contiguous or channels_last; channels_last is the fast layout).

x recomputed (``X_FROM_UP``, the op's x = None): x_ptr is the upstream unit's conv output up_y
and the B tile is h = relu(up_y * s + t) computed in the load (s = up_weight * (1/sqrt(up_var +
eps)), t = up_bias - up_mean * s, fp32, per column channel once per program from the four
vectors), forced to 0 outside the image (padding taps are 0, not relu(t)) and rounded to the
activation dtype before the dot: the h that batch_norm_act would have written and the x-given
kernel would read. Same bytes as reading h (up_y instead), + 4 vectors per program; h is never
written. AOT (tests/test_triton_conv2d_wgrad_aot.py, triton 3.8, bf16, 0 spills): l1 3x3 64x64
tile 115 / 120 registers on sm_90 / sm_80 (x given: 102 / 98), ds 1x1 128x128 181 / 185
(x given: 180 / 180). On a GPU the fp32 v * s + t may be contracted into an FMA (one rounding
where the reference rounds twice): h can then differ from the materialised one by one unit in
the last place of the activation dtype at rare elements; under the interpreter it is bitwise.

Two column shapes (a constexpr switch, as the forward's K loop):
* chunked (``PACKED_N=False``): a column tile = one filter tap (kh, kw) x BLOCK_N input channels;
  the x address math is per pixel row only. Every ResNet conv but the stem.
* packed (``PACKED_N=True``): the columns are one flat dense index j -> (kh, kw, ci), so the stem's
  Cin = 3 (N_gemm = 147) does not pad every tap up to BLOCK_N.

Deterministic split-K in ONE launch, no atomics on the data (``SPLITS`` from the problem size,
``choose_splits``), grid (tiles, SPLITS):
* split s reduces pixels [s*P_PER_SPLIT, (s+1)*P_PER_SPLIT) in order and stores its fp32 tile,
  unmasked, into a tile-major (SPLITS, tiles, BLOCK_M, BLOCK_N) scratch (whole tiles: fixed
  offsets from one scalar base, no mask, no [BLOCK_M, BLOCK_N] pointer tensor in registers);
* then it increments the tile's int32 arrival counter: a CTA barrier (every thread's partial
  stores first), one thread's ``atomic_add(sem="acq_rel", scope="gpu")``, its old value broadcast
  to the CTA (shared memory + barrier): CUTLASS's split-K semaphore pattern;
* the program that arrives last (old value == SPLITS-1) reads the SPLITS partials of its tile in
  split order 0, 1, ..., SPLITS-1 (``ld.global.cg``: from L2), sums them in fp32, rounds once to
  grad_weight's dtype, stores with grad_weight's strides and puts the counter back to 0.
Which program arrives last varies run to run; the sum's order and shapes do not: bitwise
reproducible (on one GPU type). The counter is the only atomic; it decides who sums, not what.
With SPLITS == 1 (``SPLIT_K=False``) the program stores the rounded result into grad_weight
directly (no scratch, no counter). The counters must be all zero at launch: a cached buffer per
(device, stream), reset by the kernel itself and shared with the conv forward's statistics
(``_common.arrival_counters``: assumptions and failure handling).

Bytes per call (e = activation element size, T = number of operand tensors read for dy: 1 for g,
+1 with mask, +1 with coef (y); P = N*OH*OW, tiles_m = cdiv(Cout, BLOCK_M), tiles_n the column
tiles): dy operands T * e * P * Cout * tiles_n, x about e * P * Cin*KH*KW * tiles_m (each tap
gathers its own shifted view; stride 2 and the padding skip some), mean/coef 16 * Cout per program,
scratch 2 * 4 * SPLITS * tiles * BLOCK_M * BLOCK_N (each partial written once and read once, by
the tile's last program; = 2 * 4 * SPLITS * Cout*Cin*KH*KW when the tiles divide the weight, more
for partial tiles: the stem's 147 columns take 192), 4 bytes of counter per (tile, split),
grad_weight once. The re-reads across column/row tiles come from L2 when the tiles of one split
run together (the split is the slow grid axis). Example, ResNet-18 layer1 3x3 64->64 at batch 256,
bf16, channels_last, with mask and coef (one row tile, 9 column tiles, 30 splits): 9 x 3 x 103 MB
of dy operand reads and 9 x 103 MB of x reads (mostly L2 hits), 2 x 30 x 147 KB of scratch; the
DRAM floor is ~0.41 GB (g, mask, y, x once each). The last program of a tile reads its SPLITS
partials alone (layer1: 30 x 16 KB per tile), which the earlier separate reduce kernel spread
over many programs: a short serial tail per tile, traded for one launch less.

Precision: fp16/bf16 operands on the tensor cores with fp32 accumulation; fp32 uses tf32 when
``allow_tf32`` and 3xTF32 (``tf32x3``, fp32-accurate) otherwise, as the forward. float64 is
refused (TypeError): the op layer routes it to the torch implementation.

Configs: on the GPU ``select_config`` picks one config per shape/dtype/arch by heuristic (no
autotuning: a sweep would rerun the kernel on the caller's buffers); the AOT test
(tests/test_triton_conv2d_wgrad_aot.py) compiles those configs for sm_90/sm_80 and checks for
tensor-core instructions and zero spills. Under ``TRITON_INTERPRET=1`` one small config is used,
few splits, and the dot operands are upcast to fp32 (the interpreter computes bf16 dots wrongly).

Not measured on a GPU yet (no GPU in the sessions that wrote it). The single-launch split-K runs
under the interpreter, one program at a time in grid order, and the AOT test checks its memory
ordering in the PTX; it has not run with programs arriving concurrently. Known limits: with NCHW g
the [BLOCK_M, BLOCK_K] operand tile is contiguous along the pixels, with channels_last along Cout,
and the dot wants it K-major: one of the two layouts is transposed on its way to the tensor cores.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import _alloc
from .._bits import bits_shape, is_bits
from ._common import (ARRIVAL_COUNTERS, INTERPRET, arrival_counters, bn_channels, bn_dy, bn_relu_tile,
                      cast_for_store, drop_arrival_counters, mask_bit, round_to)
from ._wgrad_plan import (GPU_MIN_SPLIT_ITERS, GPU_TARGET_PROGRAMS, INTERPRETER_CONFIG, INTERPRETER_MIN_SPLIT_ITERS,
                          INTERPRETER_TARGET_PROGRAMS, WgradConfig, choose_splits, gpu_config)
from ._wgrad_plan import tiles as grad_weight_tiles

__all__ = ["conv2d_wgrad", "WgradConfig", "select_config", "choose_splits"]


@triton.jit
def _conv2d_wgrad_kernel(
    g_ptr, m_ptr, y_ptr, mean_ptr, coef_ptr, x_ptr, gw_ptr, part_ptr, cnt_ptr,
    C, H, W, COUT, OH, OW, NPIX, NCOL, P_PER_SPLIT,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    swo, swi, swh, sww,
    smean, scr, scc,
    stride_h, stride_w, pad_h, pad_w,
    um_ptr, uv_ptr, uw_ptr, ub_ptr, up_eps,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_COEF: tl.constexpr, PACKED_N: tl.constexpr, EVEN_C: tl.constexpr,
    SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    MASK_BITS: tl.constexpr = False,
    X_FROM_UP: tl.constexpr = False, UP_HAS_W: tl.constexpr = False, UP_HAS_B: tl.constexpr = False,
):
    # MASK_BITS: m_ptr is a 1-bit ReLU mask (resnet_kernels/_bits.py: byte [pixel, co // 8] of a
    # contiguous (N, OH, OW, ceil(Cout/8)) uint8 tensor), not an activation
    # X_FROM_UP: x_ptr is the upstream unit's conv output up_y and the B operand is recomputed as
    # h = relu(up_y * s + t) per channel ci (s = up_weight * rsqrt(up_var + eps), t = up_bias -
    # up_mean * s from um/uv/uw/ub, UP_HAS_W / UP_HAS_B: weight / bias given, else 1 / 0)
    # ---- grouped tile order within one split (axis 1 = the split: the slow axis, so the programs
    # running together read the same pixel range of g and x)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_pid_m = tl.cdiv(COUT, BLOCK_M)
    if PACKED_N:
        num_pid_n = tl.cdiv(NCOL, BLOCK_N)
    else:
        num_pid_n = KH * KW * tl.cdiv(C, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    # ---- rows: output channels co, and their BN-backward coefficients
    offs_co = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    co_mask = offs_co < COUT
    mu = tl.zeros([BLOCK_M], dtype=tl.float32)
    ca = mu
    cb = mu
    ck = mu
    if HAS_COEF:
        mu = tl.load(mean_ptr + offs_co * smean, mask=co_mask, other=0.0).to(tl.float32)
        ca = tl.load(coef_ptr + offs_co * scc, mask=co_mask, other=0.0).to(tl.float32)
        cb = tl.load(coef_ptr + scr + offs_co * scc, mask=co_mask, other=0.0).to(tl.float32)
        ck = tl.load(coef_ptr + 2 * scr + offs_co * scc, mask=co_mask, other=0.0).to(tl.float32)
    g_col = offs_co * sgc

    # ---- columns: (kh, kw, ci)
    if PACKED_N:
        offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = offs_j < NCOL
        ci = offs_j % C
        r = offs_j // C
        kw = r % KW
        kh = r // KW
    else:
        num_cb = tl.cdiv(C, BLOCK_N)
        r = pid_n // num_cb
        kw = r % KW
        kh = r // KW
        ci = (pid_n % num_cb) * BLOCK_N + tl.arange(0, BLOCK_N)
        ci = tl.max_contiguous(tl.multiple_of(ci, BLOCK_N), BLOCK_N)
        col_mask = ci < C
    x_col = ci * sxc
    if X_FROM_UP:
        # the upstream BN's per-channel values of the column channels, once per program (the
        # forward prologue's formula, _common.bn_channel_scale / bn_relu_tile: the same h)
        u_mu, u_sc, u_b = bn_channels(um_ptr, uv_ptr, uw_ptr, ub_ptr, ci, col_mask, up_eps, UP_HAS_W, UP_HAS_B)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    p_begin = split * P_PER_SPLIT
    p_end = tl.minimum(p_begin + P_PER_SPLIT, NPIX)
    offs_kk = tl.arange(0, BLOCK_K)
    for p0 in range(p_begin, p_end, BLOCK_K):
        # pixels p -> (n, oh, ow)
        offs_p = p0 + offs_kk
        p_ok = offs_p < p_end
        ow = offs_p % OW
        t = offs_p // OW
        oh = t % OH
        nb = (t // OH).to(tl.int64)  # batch offsets in int64: activations may exceed 2**31 elements

        # ---- A = dy [BLOCK_M, BLOCK_K], the fused BN-backward operand
        a_mask = co_mask[:, None] & p_ok[None, :]
        a_off = g_col[:, None] + (nb * sgn + oh * sgh + ow * sgw)[None, :]
        gv = tl.load(g_ptr + a_off, mask=a_mask, other=0.0).to(tl.float32)
        mv = gv
        yv = gv
        if HAS_MASK:
            if MASK_BITS:
                mrow = offs_p.to(tl.int64) * ((COUT + 7) // 8)
                mv = mask_bit(m_ptr, mrow[None, :], offs_co[:, None], a_mask)
            else:
                mv = tl.load(m_ptr + a_off, mask=a_mask, other=0)
        if HAS_COEF:
            yv = tl.load(y_ptr + a_off, mask=a_mask, other=0.0).to(tl.float32)
        dy = bn_dy(gv, mv, yv, mu[:, None], ca[:, None], cb[:, None], ck[:, None], HAS_MASK, HAS_COEF)
        # after bn_dy: bn_dy of a zero g is not zero (the x tile is 0 at those pixels too, so this
        # only makes the operand itself right; rows past Cout are never stored)
        dy = tl.where(a_mask, dy, 0.0)
        a = round_to(dy, g_ptr.dtype.element_ty)

        # ---- B = x [BLOCK_K, BLOCK_N], the shifted input view of the column taps
        ih0 = oh * stride_h - pad_h
        iw0 = ow * stride_w - pad_w
        if PACKED_N:
            ih = ih0[:, None] + kh[None, :]
            iw = iw0[:, None] + kw[None, :]
            b_mask = p_ok[:, None] & col_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            b_off = nb[:, None] * sxn + ih * sxh + iw * sxw + x_col[None, :]
        else:
            ih = ih0 + kh
            iw = iw0 + kw
            row_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            b_off = (nb * sxn + ih * sxh + iw * sxw)[:, None] + x_col[None, :]
            if EVEN_C:
                b_mask = row_ok[:, None]
            else:
                b_mask = row_ok[:, None] & col_mask[None, :]
        if X_FROM_UP:
            # x recomputed from up_y: relu((v - mean) * scale + bias) in fp32, 0 outside the image
            # (padding taps and masked rows/columns stay 0, not relu(bias)), rounded to the
            # activation dtype: the h the forward's prologue convolved
            uv = tl.load(x_ptr + b_off, mask=b_mask, other=0.0).to(tl.float32)
            hv = bn_relu_tile(uv, u_mu, u_sc, u_b, UP_HAS_B)
            b = round_to(tl.where(b_mask, hv, 0.0), x_ptr.dtype.element_ty)
        else:
            b = tl.load(x_ptr + b_off, mask=b_mask, other=0.0)

        if UPCAST_DOT:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    # ---- store: one split: grad_weight rounded once. Split-K: this split's fp32 partial tile, then
    # the tile's arrival counter; the program that arrives last sums the SPLITS partials of the tile
    # in split order (0, 1, ..., SPLITS-1: the result does not depend on which program arrives
    # last), rounds once, stores grad_weight and puts the counter back to 0 for the next launch.
    out_mask = co_mask[:, None] & col_mask[None, :]
    if SPLIT_K:
        # the scratch is (SPLITS, tiles, BLOCK_M, BLOCK_N) fp32, tile-major: whole tiles, so the
        # partial stores and loads need no mask and their offsets are one fixed pattern from a
        # scalar base (a [BLOCK_M, BLOCK_N] tensor of offsets, masks or 64-bit pointers would
        # hold as many registers as the accumulator, or twice as many)
        num_tiles = tl.num_programs(0)
        nsplit = tl.num_programs(1)
        t_off = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tile_elems: tl.constexpr = BLOCK_M * BLOCK_N
        mine = part_ptr + (split.to(tl.int64) * num_tiles + pid) * tile_elems
        tl.store(mine + t_off, acc)
        # release: every thread's partial stores happen before the (one-thread) counter update
        # (CTA barrier, then the gpu-scope acq_rel atomic; as CUTLASS's split-K semaphore)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if arrived == nsplit - 1:
            # acquire: the atomic's result reaches every thread through shared memory and a CTA
            # barrier; the partials are read from L2 (.cg), never from a stale L1 line
            tot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            base = part_ptr + pid.to(tl.int64) * tile_elems
            step = num_tiles.to(tl.int64) * tile_elems
            for _s in range(0, nsplit):
                tot += tl.load(base + t_off, cache_modifier=".cg")
                base += step
            gw_off = (offs_co * swo)[:, None] + (ci * swi + kh * swh + kw * sww)[None, :]
            tl.store(gw_ptr + gw_off, cast_for_store(tot, gw_ptr), mask=out_mask)
            tl.store(cnt_ptr + pid, 0)  # every split has arrived: nobody else touches it this launch
    else:
        gw_off = (offs_co * swo)[:, None] + (ci * swi + kh * swh + kw * sww)[None, :]
        tl.store(gw_ptr + gw_off, cast_for_store(acc, gw_ptr), mask=out_mask)


# ----------------------------------------------------------------------------------------------
# configs

# the configs, column tiles and split count: triton_ops/_wgrad_plan.py (no triton import: the
# accountant counts the split-K scratch from the same functions)
TARGET_PROGRAMS = INTERPRETER_TARGET_PROGRAMS if INTERPRET else GPU_TARGET_PROGRAMS
MIN_SPLIT_ITERS = INTERPRETER_MIN_SPLIT_ITERS if INTERPRET else GPU_MIN_SPLIT_ITERS


def select_config(npix: int, cout: int, cin: int, kh: int, kw: int, dtype: torch.dtype,
                  arch: Optional[int] = None, allow_tf32: bool = True) -> WgradConfig:
    """``_wgrad_plan.gpu_config`` (``arch``: the compute capability as major*10+minor, default the
    current CUDA device), or the interpreter's one small config."""
    if INTERPRET:
        return INTERPRETER_CONFIG
    if arch is None:
        major, minor = torch.cuda.get_device_capability()
        arch = major * 10 + minor
    return gpu_config(npix, cout, cin, kh, kw, dtype, arch, allow_tf32)


# ----------------------------------------------------------------------------------------------
# launcher

@functools.lru_cache(maxsize=None)
def _cuda_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(g, mask, y, mean, coef, x, grad_weight):
    """The few facts the kernel relies on that a caller could get wrong (the op layer validates
    the rest): float64 is refused, operands share g's dtype, mask/y share g's layout."""
    if g.dtype == torch.float64 or x.dtype == torch.float64:
        raise TypeError("conv2d_wgrad (triton): float64 is not supported (the torch implementation computes it)")
    if g.dtype not in _DTYPES or x.dtype != g.dtype:
        raise TypeError(f"conv2d_wgrad (triton): g and x must share one of float32/float16/bfloat16, "
                        f"got {g.dtype} and {x.dtype}")
    for name, t in (("mask", mask), ("y", y)):
        if name == "mask" and is_bits(t):
            if tuple(t.shape) != bits_shape(g.shape) or not t.is_contiguous():
                raise ValueError("conv2d_wgrad (triton): mask bits must be a contiguous (N, OH, OW, ceil(Cout/8)) "
                                 "uint8 tensor")
            continue
        if t is not None and (t.shape != g.shape or t.stride() != g.stride()):
            raise ValueError(f"conv2d_wgrad (triton): {name} must have g's shape and strides")
    if coef is not None and (y is None or mean is None):
        raise ValueError("conv2d_wgrad (triton): coef needs y and mean")


# ----------------------------------------------------------------------------------------------
# split-K arrival counters: one int32 counter per tile, from the buffer shared with the conv's
# statistics (``_common.arrival_counters``: all zero between launches, a cached buffer per
# (device, stream), assumptions and failure handling there)
_COUNTERS = ARRIVAL_COUNTERS
_counters = arrival_counters
_drop_counters = drop_arrival_counters


@dataclass
class _Plan:
    """The launch's arguments, built from shapes, strides and dtypes only (works on meta tensors:
    the AOT test compiles exactly what a real launch would)."""
    grid: Tuple[int, int]
    args: tuple
    constexprs: dict
    num_warps: int
    num_stages: int
    config: WgradConfig
    splits: int
    p_per_split: int
    part: Optional[torch.Tensor]      # the (SPLITS, tiles, BLOCK_M, BLOCK_N) fp32 scratch (split-K only)
    counters: Optional[torch.Tensor]  # the per-tile arrival counters (split-K only)
    counter_key: Optional[tuple]      # their cache key (None: not cached)


def _prepare(g, mask, y, mean, coef, x, grad_weight, stride, padding, allow_tf32,
             config: Optional[WgradConfig] = None, arch: Optional[int] = None, up=None) -> _Plan:
    """``up`` = (up_y, up_mean, up_var, up_weight, up_bias, up_eps) when x is None: x recomputed
    from up_y in the B-operand load (``X_FROM_UP``)."""
    from_up = x is None
    if from_up:
        if up is None or up[0] is None or up[1] is None or up[2] is None:
            raise ValueError("conv2d_wgrad (triton): x = None needs up (up_y, up_mean, up_var, ...)")
        up_y, up_mean, up_var, up_weight, up_bias, up_eps = up
        x = up_y
    _check(g, mask, y, mean, coef, x, grad_weight)
    n, cin, h, w = x.shape
    cout, _, kh, kw = grad_weight.shape
    oh, ow = g.shape[2], g.shape[3]
    (sh, sw), (ph, pw) = (int(e) for e in stride), (int(e) for e in padding)
    npix = n * oh * ow
    ncol = cin * kh * kw
    if config is None and arch is None and not INTERPRET and x.is_cuda:
        arch = _cuda_arch(x.device.index if x.device.index is not None else torch.cuda.current_device())
    cfg = config or select_config(npix, cout, cin, kh, kw, x.dtype, arch, bool(allow_tf32))
    packed, tiles = grad_weight_tiles(cfg, cout, cin, kh, kw)
    if cfg.splits is None:
        splits, per = choose_splits(tiles, npix, cfg.BLOCK_K, TARGET_PROGRAMS, MIN_SPLIT_ITERS)
    else:  # forced (tests): equal pixel ranges, not chunk-aligned (boundaries inside a chunk), none empty
        per = max(1, triton.cdiv(npix, max(1, cfg.splits)))
        splits = max(1, triton.cdiv(npix, per))

    part = counters = key = None
    if splits > 1 and tiles > 0:  # (no tiles: an empty grad_weight, nothing launched)
        part = _alloc.empty((splits, tiles, cfg.BLOCK_M, cfg.BLOCK_N), dtype=torch.float32, device=x.device)
        counters, key = _counters(x.device, tiles)

    if x.dtype == torch.float32:
        precision = "tf32" if allow_tf32 else "tf32x3"  # as the forward (triton_ops/conv2d.py)
    else:
        precision = "tf32"  # ignored for 16-bit operands
    dummy = g  # stands in for absent optional pointers (never dereferenced: constexpr-disabled)
    has_coef = coef is not None
    args = (
        g, mask if mask is not None else dummy, y if has_coef else dummy,
        mean if has_coef else dummy, coef if has_coef else dummy, x, grad_weight,
        part if part is not None else dummy, counters if counters is not None else dummy,
        cin, h, w, cout, oh, ow, npix, ncol, per,
        *g.stride(), *x.stride(), *grad_weight.stride(),
        mean.stride(0) if has_coef else 0, *(coef.stride() if has_coef else (0, 0)),
        sh, sw, ph, pw,
    )
    if from_up:
        args += (up_mean.contiguous(), up_var.contiguous(),
                 up_weight.contiguous() if up_weight is not None else dummy,
                 up_bias.contiguous() if up_bias is not None else dummy, float(up_eps))
    else:
        args += (dummy, dummy, dummy, dummy, 0.0)
    constexprs = dict(
        KH=kh, KW=kw, HAS_MASK=mask is not None, HAS_COEF=has_coef, PACKED_N=bool(packed),
        EVEN_C=cin % cfg.BLOCK_N == 0, SPLIT_K=part is not None, DOT_PRECISION=precision, UPCAST_DOT=INTERPRET,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        MASK_BITS=mask is not None and is_bits(mask),
    )
    # (x given: all False, the kernel's defaults: its code is as before)
    constexprs.update(X_FROM_UP=from_up, UP_HAS_W=from_up and up_weight is not None,
                      UP_HAS_B=from_up and up_bias is not None)
    return _Plan((tiles, splits), args, constexprs, cfg.num_warps, cfg.num_stages, cfg, splits, per, part,
                 counters, key)


def _launch(g, mask, y, mean, coef, x, grad_weight, stride, padding, allow_tf32,
            config: Optional[WgradConfig] = None, up=None) -> _Plan:
    plan = _prepare(g, mask, y, mean, coef, x, grad_weight, stride, padding, allow_tf32, config, up=up)
    if grad_weight.numel() == 0:
        return plan
    if g.shape[0] * g.shape[2] * g.shape[3] == 0:  # (one split: no scratch, no counters)
        grad_weight.zero_()
        return plan
    try:
        _conv2d_wgrad_kernel[plan.grid](*plan.args, **plan.constexprs, num_warps=plan.num_warps,
                                        num_stages=plan.num_stages)
    except BaseException:
        _drop_counters(plan.counter_key)  # it may have run partly (interpreter): counters not all 0
        raise
    return plan


def conv2d_wgrad(g, mask, y, mean, coef, x, grad_weight, stride, padding, allow_tf32, *,
                 conv_dtype: Optional[torch.dtype] = None, up=None) -> None:
    """grad_weight = the weight gradient of the convolution x -> g's shape, with the fused
    BN-backward operand (see the module docstring and the contract). ``conv_dtype`` is the torch
    reference's knob and is ignored (the kernel always reads the operands in the activation dtype
    and accumulates in fp32). dilation 1, groups 1. x None: ``up`` = (up_y, up_mean, up_var,
    up_weight, up_bias, up_eps) and x = relu(bn(up_y)) is recomputed in the B-operand load."""
    _launch(g, mask, y, mean, coef, x, grad_weight, stride, padding, allow_tf32, up=up)
