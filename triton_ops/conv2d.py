"""Triton implicit-GEMM 2-D convolution with a fused fp32 epilogue and batch statistics.

GEMM view: M = N*OH*OW output pixels (rows), N_gemm = Cout (columns), K = Cin*KH*KW, reduced in
the order (kh, kw, cin) so that a channels_last input gives contiguous cin runs. Each program owns
a [BLOCK_M, BLOCK_N] tile of the output, accumulates it in fp32 with ``tl.dot`` over K in
BLOCK_K chunks, then applies ``act(acc * scale[k] + bias[k] + residual)`` and stores it once in
out's dtype with out's strides. The input is read through its strides, so one kernel serves NCHW
and channels_last (channels_last is the fast layout: the B-tile and A-tile loads are contiguous).

Two K-loop shapes (a constexpr switch):
* chunked (``PACKED_K=False``): one loop iteration = one filter tap (kh, kw) x one BLOCK_K chunk
  of input channels; the spatial address math is per row only. Used whenever Cin fills BLOCK_K
  reasonably (every ResNet conv but the stem).
* packed (``PACKED_K=True``): K is treated as one flat dense index k -> (kh, kw, cin), so a small
  Cin (the 7x7 stem has Cin = 3, K = 147) does not pad every tap up to BLOCK_K.

Operand prologue (``PROLOGUE``, ``conv2d_bn_stats``: resnet_kernels/ops/conv2d_bn.py): the input
is the previous unit's pre-BN output y_prev, and each A tile is replaced after its load by
h = relu((a - mean[c]) * weight[c] * rsqrt(var[c] + eps) + bias[c]) in fp32, rounded to the
activation dtype (``_bn_relu_operand``: batch_norm_act's kernel's operations, so h is the one
batch_norm_act would write), 0 at the zero padding, rows past M and channels past C; the per-channel
values come from the (C,) vectors for the chunk's channels (per K step: BLOCK_K loads of 2-4 vectors,
one rsqrt each). h is never written. Without it the prologue's operands are passed as None
(constexprs): the kernel compiles exactly as without the feature (AOT register counts identical).
AOT (triton 3.8, bf16, with statistics; registers without -> with the prologue, the same layer's
plain case, whose l2_3x3s2 is its fused-epilogue variant): stem-shaped packed-K 127 -> 174 (sm_90),
168 -> 174 (sm_80); 3x3 64->64 103 -> 168, 122 -> 176; 3x3 s2 128x128 tiles 200 -> 186, 193 -> 254;
1x1 s2 128x128 205 -> 190, 226 -> 252; no spills, but sm_80's 128x128 tiles are at the 255 limit.

Statistics (``compute_stats``), in the same launch: every program writes, for its BLOCK_N
channels, the mean and M2 (sum of squared deviations from that mean) of its valid rows of the fp32
accumulator to a (num_m_tiles, Cout) scratch pair, and the programs merge them per channel with
Chan's formula in two levels of fixed order (``_stats_merge``, ``_chan_merge``), after the
epilogue's store (the accumulator's registers are free by then):
* level 1: the m-tiles form groups of ``stats_group_tiles`` (16..64, about sqrt(num_m_tiles))
  consecutive tiles; after its partial, each program arrives on the int32 counter of its (group,
  column tile): a CTA barrier (every thread's stores first), then one thread's
  ``atomic_add(sem="acq_rel", scope="gpu")`` (the wgrad split-K's pattern, CUTLASS's semaphore).
  The group's last arrival reads the group's partials in tile order (``ld.global.cg``), merges
  them and stores the group's (mean, M2) below the tile partials;
* level 2 (several groups): that program arrives on its column tile's counter the same way; the
  last group-merger merges the group partials in group order. With one group level 1 is the end.
The last one writes (mean, biased var) in float32 for its channels. Each level's last arrival puts
its counter back to 0. Which program arrives last varies run to run; the merge order and shapes do
not: bitwise reproducible (on one GPU type). The counters must be all zero at launch: a cached
buffer per (device, stream) shared with the wgrad (``_common.arrival_counters``: assumptions, and
a launch that raises drops its buffer). Was: the conv kernel, then one or two launches of a
separate combine kernel (issue 12: 107 launches counted for ResNet-50's 53 conv2d_stats, now
53). The price is a serial tail: the last program of a column tile merges one group's tile
partials, then all group partials (the ResNet-50 stem at batch 256, 25088 tiles: 64 and 392 rows
of its channels, in steps of ``stats_merge_rows`` rows), where the separate kernel spread its
first level over ~256 programs. Not measured on a GPU: under the interpreter the programs run one
at a time (tests vary the arrival order through GROUP_M), and the AOT test checks the atomics and
the release barriers in the PTX.

Weight operand: the (K, Cout) GEMM matrix, read through two strides (swk, swn). Read in place,
a view of the weight with no pack launch and no cache entry, when the weight's memory already is
the K-major matrix (``_weight_cache.conv_fwd_inplace_strides``): (Cout, KH, KW, Cin) order with a
unit Cin stride, which is what a channels_last weight (``model.to(memory_format=
torch.channels_last)``) and any 1x1 weight with a unit Cin stride (contiguous ones too) have;
16-bit weights also need a 16-byte-aligned row pitch (K * 2 bytes) for 16-byte cp.async copies,
so the 16-bit 7x7 stem (K = 147) keeps its pack. Otherwise (an NCHW-contiguous 3x3 / 7x7 weight:
consecutive input channels are KH*KW elements apart, neither K- nor N-contiguous) the weight is
packed once per weight version and cached across calls (``resnet_kernels/_weight_cache.py``):
K-contiguous for fp32 (what the tf32 MMA wants), N-contiguous for 16-bit types (see
``_weight_kmajor``). In training the optimizer changes every weight every step, so a packed weight
costs one copy launch per conv per step and an in-place one none. 16-bit in-place operands are
K-major, which the AOT test (tests/test_triton_conv_aot.py, "+wcl" cases) compiles to the same
16-byte cp.async and wgmma / mma.sync as the N-major pack, without spills. No channel padding is
involved either way (the packed K loop covers a small Cin such as the stem's 3).

Precision: fp16/bf16 operands go to the tensor cores with fp32 accumulation; fp32 uses tf32 when
``allow_tf32`` (the op passes torch.backends.cudnn.allow_tf32) and 3xTF32 (``tf32x3``: fp32-level
accuracy, still on the tensor cores) otherwise.

Configs: on the GPU ``select_config`` picks one config per shape/dtype/arch by heuristic (no
autotuning: a benchmark sweep would rerun the kernel on the caller's buffers); the AOT test
(tests/test_triton_conv_aot.py) compiles those configs for sm_90/sm_80 and checks for tensor-core
instructions, cp.async pipelining and zero spills. Under ``TRITON_INTERPRET=1`` one small config is
used and the dot operands are upcast to fp32 (the interpreter computes bf16 dots wrongly).

Known performance limits: with an NCHW input the A-tile gather is not contiguous along cin, so it
is neither coalesced nor vectorized (correct, but channels_last is the layout to use); in the packed
stem loop the 16-bit A gather is element-wise (k -> cin is not contiguous in runs the compiler can
prove), so only the B tile goes through cp.async there. Loads are cp.async; ``ConvConfig.w_tma``
(opt-in, not yet measured on a GPU) takes the weight tiles through a TMA descriptor instead.
``ConvConfig.persistent`` (opt-in, not measured either) launches a few programs per SM that loop
over the tiles (``PERSISTENT``; each tile is ``_conv_tile``, which the default grid calls once).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import _alloc
from ._common import INTERPRET, arrival_counters, bn_channels, bn_relu_tile, cast_for_store, drop_arrival_counters

from .. import _weight_cache  # noqa: E402 (kept apart from the line above: merge-friendly)

__all__ = ["conv2d_forward", "conv2d_bn_stats", "ConvConfig", "select_config"]


@triton.jit
def _conv_tile(
    pid,
    x_ptr, w_ptr, scale_ptr, bias_ptr, res_ptr, out_ptr, pmean_ptr, pm2_ptr, mean_ptr, var_ptr, cnt_ptr,
    bn_mean_ptr, bn_var_ptr, bn_w_ptr, bn_b_ptr, bn_eps,
    C, H, W, COUT, OH, OW, M, KTOT, TILES_PER_GROUP,
    swk, swn,
    sxn, sxc, sxh, sxw,
    son, soc, soh, sow,
    srn, src, srh, srw,
    stride_h, stride_w, pad_h, pad_w,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
    STATS: tl.constexpr, PACKED_K: tl.constexpr, EVEN_C: tl.constexpr, W_DESC: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, MERGE_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PROLOGUE: tl.constexpr = False, HAS_BN_W: tl.constexpr = False, HAS_BN_B: tl.constexpr = False,
):
    # ---- grouped tile order: GROUP_M row tiles sweep all column tiles together (L2 reuse of
    # the A rows and of the weight columns).
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(COUT, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    # ---- rows: output pixel m -> (n, oh, ow) -> top-left input coordinate
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    ow = offs_m % OW
    t = offs_m // OW
    oh = t % OH
    nb = t // OH
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_row = nb.to(tl.int64) * sxn  # batch offset in int64: activations may exceed 2**31 elements

    # ---- columns: output channels
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = tl.max_contiguous(tl.multiple_of(offs_n, BLOCK_N), BLOCK_N)
    n_mask = offs_n < COUT
    offs_kk = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if PACKED_K:
        # flat K index k = (kh*KW + kw)*C + c, dense over [0, KTOT)
        for k0 in range(0, KTOT, BLOCK_K):
            offs_k = k0 + offs_kk
            k_mask = offs_k < KTOT
            c = offs_k % C
            r = offs_k // C
            kw = r % KW
            kh = r // KW
            ih = ih0[:, None] + kh[None, :]
            iw = iw0[:, None] + kw[None, :]
            a_mask = (m_mask[:, None] & k_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))
            a_ptrs = x_ptr + (x_row[:, None] + ih * sxh + iw * sxw + c[None, :] * sxc)
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
            b_ptrs = w_ptr + (offs_k[:, None] * swk + offs_n[None, :] * swn)
            b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if PROLOGUE:
                a = _bn_relu_operand(a, a_mask, c, k_mask, x_ptr, bn_mean_ptr, bn_var_ptr, bn_w_ptr, bn_b_ptr,
                                     bn_eps, HAS_BN_W, HAS_BN_B)
            if UPCAST_DOT:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    else:
        # one iteration = one filter tap (kh, kw) x one BLOCK_K chunk of input channels
        num_cb = tl.cdiv(C, BLOCK_K)
        for it in range(0, KH * KW * num_cb):
            cb = it % num_cb
            r = it // num_cb
            kw = r % KW
            kh = r // KW
            ih = ih0 + kh
            iw = iw0 + kw
            row_ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            offs_c = cb * BLOCK_K + offs_kk
            offs_c = tl.max_contiguous(tl.multiple_of(offs_c, BLOCK_K), BLOCK_K)
            a_ptrs = x_ptr + ((x_row + ih * sxh + iw * sxw)[:, None] + offs_c[None, :] * sxc)
            if W_DESC == 1:
                # TMA: w_ptr is a tensor descriptor of the K-major (COUT, KTOT) matrix; columns past
                # COUT come back as zeros (out of bounds), and EVEN_C means no channel tail
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                b = w_ptr.load([pid_n * BLOCK_N, r * C + cb * BLOCK_K]).T
            elif W_DESC == 2:
                # TMA on the N-major (KTOT, COUT) matrix
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                b = w_ptr.load([r * C + cb * BLOCK_K, pid_n * BLOCK_N])
            elif EVEN_C:
                b_ptrs = w_ptr + ((r * C + offs_c)[:, None] * swk + offs_n[None, :] * swn)
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=n_mask[None, :], other=0.0)
            else:
                b_ptrs = w_ptr + ((r * C + offs_c)[:, None] * swk + offs_n[None, :] * swn)
                c_mask = offs_c < C
                a = tl.load(a_ptrs, mask=row_ok[:, None] & c_mask[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=c_mask[:, None] & n_mask[None, :], other=0.0)
            if PROLOGUE:
                # h = relu(bn(a)) in fp32, rounded to x's dtype; the zero padding (and a channel
                # tail) stays 0, not relu(shift)
                ch_ok = offs_c < C
                a = _bn_relu_operand(a, row_ok[:, None] & ch_ok[None, :], offs_c, ch_ok, x_ptr, bn_mean_ptr,
                                     bn_var_ptr, bn_w_ptr, bn_b_ptr, bn_eps, HAS_BN_W, HAS_BN_B)
            if UPCAST_DOT:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    # ---- per-tile batch statistics of y = conv(x, w), from the fp32 accumulator
    if STATS:
        # the rows again, after the loop (``_arange_after_loop``: not held across the K loop)
        offs_m = pid_m * BLOCK_M + _arange_after_loop(BLOCK_M)
        m_mask = offs_m < M
        ow = offs_m % OW
        t = offs_m // OW
        oh = t % OH
        nb = t // OH
        cnt = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        valid = m_mask[:, None]
        tile_mean = tl.sum(tl.where(valid, acc, 0.0), axis=0) / cnt
        d = tl.where(valid, acc - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(d * d, axis=0)
        p_off = pid_m * COUT + offs_n
        tl.store(pmean_ptr + p_off, tile_mean, mask=n_mask)
        tl.store(pm2_ptr + p_off, tile_m2, mask=n_mask)

    # ---- fused epilogue in fp32
    y = acc
    if HAS_SCALE:
        sc = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)
        y = y * sc[None, :]
    if HAS_BIAS:
        bi = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)
        y = y + bi[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    nb64 = nb.to(tl.int64)
    if HAS_RES:
        r_off = (nb64 * srn + oh * srh + ow * srw)[:, None] + offs_n[None, :] * src
        res = tl.load(res_ptr + r_off, mask=out_mask, other=0.0)
        y = y + res.to(tl.float32)
    if RELU:
        y = tl.maximum(y, 0.0)
    o_off = (nb64 * son + oh * soh + ow * sow)[:, None] + offs_n[None, :] * soc
    tl.store(out_ptr + o_off, cast_for_store(y, out_ptr), mask=out_mask)

    # ---- the statistics merge, in this launch (after the epilogue: the accumulator is dead, the
    # merge's registers do not add to the main loop's). Release: every thread's partial stores
    # happen before the (one-thread) arrival on the counter of this (stats group, column tile): a
    # CTA barrier, then a gpu-scope acq_rel atomic (as the wgrad's split-K, CUTLASS's semaphore).
    # The group's last arrival merges the group (``_stats_merge``); which program that is varies
    # run to run, the merge order does not.
    if STATS:
        tl.debug_barrier()
        grp = pid_m // TILES_PER_GROUP
        grp_tiles = tl.minimum(num_pid_m - grp * TILES_PER_GROUP, TILES_PER_GROUP)
        arrived = tl.atomic_add(cnt_ptr + grp * num_pid_n + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == grp_tiles - 1:
            _stats_merge(pmean_ptr, pm2_ptr, mean_ptr, var_ptr, cnt_ptr, grp, pid_n, num_pid_m, num_pid_n,
                         COUT, M, TILES_PER_GROUP, BLOCK_M, BLOCK_N, MERGE_T)


@triton.jit
def _conv2d_fwd_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, res_ptr, out_ptr, pmean_ptr, pm2_ptr, mean_ptr, var_ptr, cnt_ptr,
    bn_mean_ptr, bn_var_ptr, bn_w_ptr, bn_b_ptr, bn_eps,
    C, H, W, COUT, OH, OW, M, KTOT, TILES_PER_GROUP,
    swk, swn,
    sxn, sxc, sxh, sxw,
    son, soc, soh, sow,
    srn, src, srh, srw,
    stride_h, stride_w, pad_h, pad_w,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
    STATS: tl.constexpr, PACKED_K: tl.constexpr, EVEN_C: tl.constexpr, W_DESC: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, MERGE_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PROLOGUE: tl.constexpr = False, HAS_BN_W: tl.constexpr = False, HAS_BN_B: tl.constexpr = False,
    PERSISTENT: tl.constexpr = False,
):
    # one program per output tile (the grid is the tile count), or, PERSISTENT (opt-in,
    # ``ConvConfig.persistent``), a grid of a few programs per SM, each walking the tiles
    # pid, pid + grid, ... in the same grouped order (the statistics counters do not care which
    # program arrives)
    if PERSISTENT:
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(COUT, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            _conv_tile(
                tile, x_ptr, w_ptr, scale_ptr, bias_ptr, res_ptr, out_ptr, pmean_ptr, pm2_ptr, mean_ptr,
                var_ptr, cnt_ptr, bn_mean_ptr, bn_var_ptr, bn_w_ptr, bn_b_ptr, bn_eps, C, H, W, COUT, OH, OW, M,
                KTOT, TILES_PER_GROUP, swk, swn, sxn, sxc, sxh, sxw, son, soc, soh, sow, srn, src, srh, srw,
                stride_h, stride_w, pad_h, pad_w, KH, KW, HAS_SCALE, HAS_BIAS, HAS_RES, RELU, STATS, PACKED_K,
                EVEN_C, W_DESC, DOT_PRECISION, UPCAST_DOT, MERGE_T, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
                PROLOGUE, HAS_BN_W, HAS_BN_B)
    else:
        _conv_tile(
            tl.program_id(0), x_ptr, w_ptr, scale_ptr, bias_ptr, res_ptr, out_ptr, pmean_ptr, pm2_ptr, mean_ptr,
            var_ptr, cnt_ptr, bn_mean_ptr, bn_var_ptr, bn_w_ptr, bn_b_ptr, bn_eps, C, H, W, COUT, OH, OW, M,
            KTOT, TILES_PER_GROUP, swk, swn, sxn, sxc, sxh, sxw, son, soc, soh, sow, srn, src, srh, srw,
            stride_h, stride_w, pad_h, pad_w, KH, KW, HAS_SCALE, HAS_BIAS, HAS_RES, RELU, STATS, PACKED_K,
            EVEN_C, W_DESC, DOT_PRECISION, UPCAST_DOT, MERGE_T, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, PROLOGUE,
            HAS_BN_W, HAS_BN_B)


_NO_INLINE_ASM = tl.constexpr(INTERPRET)  # the interpreter runs no inline PTX


@triton.jit
def _bn_relu_operand(a, valid, ch, ch_ok, x_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, eps,
                     HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """The operand prologue of ``conv2d_bn_stats`` (``PROLOGUE``): the loaded A tile ``a`` (rows =
    output pixels' taps, columns = input channels ``ch``) replaced by h = relu((a - mean[c]) * scale[c]
    + bias[c]), scale = weight[c] * rsqrt(var[c] + eps), in fp32, rounded to x's dtype as
    ``triton_ops/batch_norm.py``'s ``_fwd_kernel`` rounds batch_norm_act's output (the same
    operations in the same order: bitwise the h that batch_norm_act would write), and 0 where
    ``valid`` is false (the convolution's zero padding, rows past M, channels past C). The per-channel
    values are computed here from the (C,) vectors for the chunk's BLOCK_K channels (a few loads and
    one rsqrt per channel per K step; no separate launch)."""
    mu, sc, bi = bn_channels(mean_ptr, var_ptr, w_ptr, b_ptr, ch, ch_ok, eps, HAS_W, HAS_B)
    h = tl.where(valid, bn_relu_tile(a.to(tl.float32), mu, sc, bi, HAS_B), 0.0)
    return cast_for_store(h, x_ptr)


@triton.jit
def _arange_after_loop(N: tl.constexpr):
    """``tl.arange(0, N)`` through an opaque (not pure) ``mov``: values derived from it cannot be
    computed before the point where it is called. The statistics epilogue recomputes its rows
    (masks, output offsets: divisions by OW and OH) from it after the K loop. Without it, the
    runtime branch of the statistics merge at the end of the kernel (any branch there, even an
    empty-bodied one) made the compiler compute the epilogue's row math ahead of the K loop and
    hold it in registers across the loop. AOT test, triton 3.8, registers before the merge moved
    into this kernel -> with the merge, without / with this: stem bf16 sm_90 127 -> 152 / 127,
    3x3 64->64 bf16 sm_80 156 -> 168 / 122, stem fp32 sm_80 176 -> 232 / 176. Not all of it: the
    branch also moves thread-index math of the epilogue's layout conversions ahead of the loop
    (the stem fp32 on sm_90 128 -> 165, 16-bit on sm_80 151 -> 168; 1x1 128x128 tiles on sm_80
    186 -> 226 (bf16) and 170 -> 237 (fp32); no spills anywhere; not measured on a GPU)."""
    if _NO_INLINE_ASM:
        r = tl.arange(0, N)
    else:
        r = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [tl.arange(0, N)], dtype=tl.int32,
                                      is_pure=False, pack=1)
    return r


@triton.jit
def _chan_merge(pmean_ptr, pm2_ptr, t_begin, t_end, COUT, M, ROWS_PER_ROW, offs_c, c_mask,
                BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    """(count, mean, M2) per channel of rows [t_begin, t_end) of a (rows, COUT) pair of partials
    (mean, M2), row t holding min(M - t*ROWS_PER_ROW, ROWS_PER_ROW) values; channels offs_c
    (BLOCK_C of them, c_mask the valid ones). BLOCK_T rows per step: the step's (count, mean, M2)
    from its rows (two passes over registers: mean, then M2 = sum M2_t + n_t (mean_t - mean)^2),
    merged into the running one with Chan's pairwise formula. Fixed order and fixed shapes:
    bitwise reproducible. The partials were written by other programs of this launch: read from
    L2 (``.cg``), never from a stale L1 line. t_end > t_begin."""
    offs_t0 = tl.arange(0, BLOCK_T)
    n_run = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean_run = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2_run = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(t_begin, t_end, BLOCK_T):
        offs_t = t0 + offs_t0
        t_mask = offs_t < t_end
        n_t = tl.where(t_mask, tl.minimum(M - offs_t * ROWS_PER_ROW, ROWS_PER_ROW), 0).to(tl.float32)
        mk = t_mask[:, None] & c_mask[None, :]
        p = offs_t[:, None] * COUT + offs_c[None, :]
        mt = tl.load(pmean_ptr + p, mask=mk, other=0.0, cache_modifier=".cg")
        m2t = tl.load(pm2_ptr + p, mask=mk, other=0.0, cache_modifier=".cg")
        n_b = tl.sum(n_t, axis=0)  # > 0: t0 < t_end
        mean_b = tl.sum(n_t[:, None] * mt, axis=0) / n_b
        dm = tl.where(mk, mt - mean_b[None, :], 0.0)
        m2_b = tl.sum(m2t + n_t[:, None] * dm * dm, axis=0)
        n_new = n_run + n_b
        delta = mean_b - mean_run
        mean_run = mean_run + delta * (n_b / n_new)
        m2_run = m2_run + m2_b + delta * delta * (n_run * n_b / n_new)
        n_run = n_new
    return mean_run, m2_run


@triton.jit
def _stats_merge(pmean_ptr, pm2_ptr, mean_ptr, var_ptr, cnt_ptr, grp, pid_n, num_pid_m, num_pid_n,
                 COUT, M, TILES_PER_GROUP,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MERGE_T: tl.constexpr):
    """Run by the last-arriving program of stats group ``grp`` (m-tiles [grp*TILES_PER_GROUP,
    ...)) for column tile ``pid_n``: level 1 merges the group's tile partials in tile order. One
    group: that is the result, (mean, M2 / M) goes to mean/var. Several: the group partial goes to
    row num_pid_m + grp of the scratch, then (barrier + acq_rel arrival again) the last group of
    this column tile merges the group partials in group order (level 2, a group holding
    TILES_PER_GROUP * BLOCK_M rows: the same count rule one level up) and writes (mean, M2 / M).
    Each level's last arrival puts its counter back to 0 (all have arrived: nobody else touches it
    in this launch)."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < COUT
    t_begin = grp * TILES_PER_GROUP
    t_end = tl.minimum(t_begin + TILES_PER_GROUP, num_pid_m)
    g_mean, g_m2 = _chan_merge(pmean_ptr, pm2_ptr, t_begin, t_end, COUT, M, BLOCK_M, offs_n, n_mask,
                               BLOCK_N, MERGE_T)
    tl.store(cnt_ptr + grp * num_pid_n + pid_n, 0)
    num_groups = tl.cdiv(num_pid_m, TILES_PER_GROUP)
    if num_groups == 1:
        tl.store(mean_ptr + offs_n, g_mean, mask=n_mask)
        tl.store(var_ptr + offs_n, g_m2 / M, mask=n_mask)
    else:
        g_base = num_pid_m * COUT
        tl.store(pmean_ptr + g_base + grp * COUT + offs_n, g_mean, mask=n_mask)
        tl.store(pm2_ptr + g_base + grp * COUT + offs_n, g_m2, mask=n_mask)
        tl.debug_barrier()
        cnt2 = cnt_ptr + num_groups * num_pid_n + pid_n
        arrived = tl.atomic_add(cnt2, 1, sem="acq_rel", scope="gpu")
        if arrived == num_groups - 1:
            f_mean, f_m2 = _chan_merge(pmean_ptr + g_base, pm2_ptr + g_base, 0, num_groups, COUT, M,
                                       TILES_PER_GROUP * BLOCK_M, offs_n, n_mask, BLOCK_N, MERGE_T)
            tl.store(mean_ptr + offs_n, f_mean, mask=n_mask)
            tl.store(var_ptr + offs_n, f_m2 / M, mask=n_mask)
            tl.store(cnt2, 0)


# ----------------------------------------------------------------------------------------------
# configs

@dataclass(frozen=True)
class ConvConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3
    packed_k: Optional[bool] = None  # None: decided from the shape (see _use_packed_k)
    # weight operand K-contiguous; None: in place where the weight allows it (K-major), else packed by
    # dtype (see _weight_kmajor); False forces the N-major pack, True the K-major operand (in place or packed)
    w_kmajor: Optional[bool] = None
    w_tma: bool = False  # weight tiles through a TMA tensor descriptor where _weight_descriptor allows
    # persistent schedule: this many programs per SM (the grid: at most the tile count), each looping
    # over the tiles; 0: one program per tile. Opt-in, not measured on a GPU (see docs/CONV.md)
    persistent: int = 0
    stats_group: Optional[int] = None  # m-tiles per statistics group; None: ``stats_group_tiles`` (tests force it)


# The interpreter runs one program at a time in numpy: one small config.
INTERPRETER_CONFIG = ConvConfig(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=4, num_warps=4, num_stages=1)


# the statistics merge: groups of STATS_GROUP_MIN..STATS_GROUP_MAX consecutive m-tiles (level 1),
# then the groups (level 2); STATS_MERGE_ELEMS partials (rows x channels) per merge step
STATS_GROUP_MIN, STATS_GROUP_MAX, STATS_GROUP_STEP = 16, 64, 16
STATS_MERGE_ELEMS = 128 if INTERPRET else 2048


def stats_group_tiles(num_m_tiles: int) -> int:
    """M-tiles per statistics group: about sqrt(num_m_tiles) (what balances the two serial
    merges: a group's last program walks its group, the last group-merger of a column tile walks
    the groups), rounded up to a multiple of STATS_GROUP_STEP, within [STATS_GROUP_MIN,
    STATS_GROUP_MAX]. A function of the tile count only, so the merge order, and with it every bit
    of the result, is the same on every run and every GPU. ResNet-50 at batch 256 (128-row tiles):
    6272 tiles at 56x56 -> 64 (98 groups), 25088 for the stem -> 64 (392), 1568 -> 48 (33),
    392 -> 32 (13), 98 -> 16 (7)."""
    g = math.isqrt(max(0, num_m_tiles - 1)) + 1  # ceil(sqrt(n)) for n >= 1
    g = -(-g // STATS_GROUP_STEP) * STATS_GROUP_STEP
    return max(STATS_GROUP_MIN, min(STATS_GROUP_MAX, g))


def stats_merge_rows(block_n: int) -> int:
    """Partial rows per merge step (a power of two): STATS_MERGE_ELEMS / BLOCK_N, at least 1 (32
    for 64-wide column tiles, 16 for 128-wide ones; 4 under the interpreter's 32-wide tiles)."""
    return max(1, STATS_MERGE_ELEMS // block_n)


def _use_packed_k(cin: int, kh: int, kw: int, block_k: int) -> bool:
    """Packed K when padding every tap's channel chunk up to BLOCK_K would waste more than a
    third of the K loop (e.g. the 7x7 stem on Cin=3: 49 chunked iterations vs 5 packed)."""
    chunked = kh * kw * triton.cdiv(cin, block_k)
    packed = triton.cdiv(cin * kh * kw, block_k)
    return 3 * chunked > 4 * packed


def select_config(M: int, cout: int, cin: int, kh: int, kw: int, dtype: torch.dtype,
                  arch: Optional[int] = None, allow_tf32: bool = True) -> ConvConfig:
    """Heuristic GPU config for ResNet shapes (batch 256, channels_last), chosen from the AOT
    register/spill report (tests/test_triton_conv_aot.py) on triton 3.6 and 3.8:
    * 128-row tiles (64 for tiny problems), 64- or 128-wide channel tiles (ResNet's Cout is 64 or
      a multiple of 128), 8 warps (4 warps on 128x64 tiles needs ~200-250 registers on sm_80);
    * 16-bit: BLOCK_K 64 (32 while Cin < 64), 3-4 stages (<= 96 KiB of shared memory);
    * fp32/tf32: BLOCK_K 32 on sm_90 (wgmma reads the operands from shared memory), 16 with 4
      stages below sm_90, where mma.sync holds the whole BLOCK_K slice of both operands in registers
      (BLOCK_K 32 spills there with triton 3.6); without tf32 (3xTF32: three dots per chunk)
      the channel tile is capped at 64 (128x128 needs ~252 registers);
    * the stem (Cin = 3, K = 147) uses the packed K loop with BLOCK_K 32 (5 iterations); fp32 below
      sm_90 64x64x16 tiles with 4 warps (the 128x64x32 tile spilled on sm_80 with triton 3.6).
    ``arch`` is the compute capability as major*10+minor (default: the current CUDA device)."""
    if INTERPRET:
        return INTERPRETER_CONFIG
    if arch is None:
        major, minor = torch.cuda.get_device_capability()
        arch = major * 10 + minor
    is_fp32 = dtype == torch.float32
    block_m = 128 if M >= 4096 else 64
    block_n = 128 if cout >= 128 and not (is_fp32 and not allow_tf32) else 64
    tile = block_m * block_n
    num_warps = 8
    if cin * kh * kw <= 160 and cin < 16:
        # the stem: K = 147, packed. fp32 below sm_90: 64x64x16 tiles, 4 warps, 4 stages (128
        # registers, no spills on triton 3.6 and 3.8); 128x64x32 with 8 warps spilled 12 bytes on
        # sm_80 with triton 3.6 once the statistics merge moved into the kernel (x16: still 12;
        # 4 warps: 255 registers)
        block_k, num_stages = (16, 4) if is_fp32 and arch < 90 else (32, 3)
        if is_fp32 and arch < 90:
            block_m, num_warps = 64, 4
    elif is_fp32:
        if arch >= 90:
            block_k, num_stages = 32, 3
        else:
            block_k, num_stages = 16, 4
    else:
        block_k = 64 if cin >= 64 else 32
        num_stages = 3 if tile >= 128 * 128 else 4
    return ConvConfig(block_m, block_n, block_k, GROUP_M=8, num_warps=num_warps, num_stages=num_stages)


# ----------------------------------------------------------------------------------------------
# the weight operand

def _weight_kmajor(dtype: torch.dtype) -> bool:
    """K-contiguous weight operand for fp32, N-contiguous for 16-bit types.

    fp32 (tf32 / 3xTF32): wgmma (sm_90) reads a 32-bit B operand from shared memory only K-major
    (the transposed form exists for 16-bit types only) and mma.sync's tf32 B fragment is K-pairs per
    thread, so an N-major fp32 weight made Triton transpose it on the way into shared memory with
    4-byte cp.async copies (review P9: 48 LDGSTS.E vs 12 LDGSTS.E.BYPASS.128). K-major, the B tile
    loads with 16-byte cp.async along K.
    16-bit: wgmma takes either major-ness for B (``.tnspB`` for N-major) and ldmatrix has a .trans
    form on sm_80, and both packings give 16-byte copies; the AOT comparison (commit message and
    docs/CONV.md) found no advantage for K-major there, so 16-bit keeps the N-major packing."""
    return dtype == torch.float32


def pack_weight(weight: torch.Tensor, kmajor: bool) -> torch.Tensor:
    """(Cout, Cin, KH, KW) -> the (K, Cout) GEMM operand, K = KH*KW*Cin indexed
    (kh*KW + kw)*Cin + c. K-major: the transpose of a contiguous (Cout, K) matrix, strides (1, K),
    which is a view of the weight itself when it is channels_last (no copy); N-major: contiguous
    (K, Cout), strides (Cout, 1). The kernel takes the two strides (a stride of 1 is specialised to a
    constant by Triton, which gives it the contiguity)."""
    cout, cin, kh, kw = weight.shape
    ktot = cin * kh * kw
    if kmajor:
        return weight.permute(0, 2, 3, 1).reshape(cout, ktot).contiguous().t()
    return weight.permute(2, 3, 1, 0).reshape(ktot, cout).contiguous()


def weight_operand_view(weight: torch.Tensor) -> torch.Tensor:
    """The (K, Cout) operand as a view of a weight that ``_weight_cache.conv_fwd_inplace_strides``
    accepts (strides (1, Cout stride)); built with ``as_strided`` so that it is a view for any
    stride the size-1 dims carry."""
    cout, cin, kh, kw = weight.shape
    return weight.as_strided((cin * kh * kw, cout), (1, weight.stride(0)))


def _weight_descriptor(w2: torch.Tensor, kmajor: bool, packed: bool, even_c: bool, cfg: ConvConfig):
    """A TMA tensor descriptor of the packed weight (K-major: the (Cout, K) matrix, block
    [BLOCK_N, BLOCK_K]; N-major: (K, Cout), block [BLOCK_K, BLOCK_N]), or None where the chunked
    K loop cannot use one: the packed K loop (the stem), a channel tail (Cin % BLOCK_K != 0: the
    tile would run into the next tap's rows), or a matrix TMA cannot address (16-byte aligned
    base and row pitch). Opt-in (``ConvConfig.w_tma``): compiled ahead of time for sm_90 on triton
    3.6 and 3.8 and tested under the interpreter, not yet measured on a GPU."""
    if packed or not even_c:
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    mat = w2.t() if kmajor else w2  # contiguous either way
    block = [cfg.BLOCK_N, cfg.BLOCK_K] if kmajor else [cfg.BLOCK_K, cfg.BLOCK_N]
    esize = mat.element_size()
    if (mat.stride(1) != 1 or (mat.stride(0) * esize) % 16 or (mat.data_ptr() % 16 and mat.device.type != "meta")
            or block[1] * esize < 16):
        return None
    return TensorDescriptor(mat, list(mat.shape), list(mat.stride()), block)


# ----------------------------------------------------------------------------------------------
# launcher



def _geometry(x, weight, out, stride, padding):
    """Sizes of a call the op layer already validated (resnet_kernels/ops/conv2d.py: validation
    happens once, there)."""
    n, cin, h, w = x.shape
    cout, _, kh, kw = weight.shape
    oh, ow = out.shape[2], out.shape[3]
    (sh, sw), (ph, pw) = (int(e) for e in stride), (int(e) for e in padding)
    return (n, cin, h, w, cout, kh, kw, oh, ow, sh, sw, ph, pw)


@functools.lru_cache(maxsize=None)
def _cuda_arch(index: int) -> int:
    """Compute capability of CUDA device ``index`` as major * 10 + minor (90 for sm_90)."""
    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


# the persistent grid's SM count where there is no GPU: under the interpreter (a few programs, so
# that each walks several tiles) and for meta tensors (the AOT test: the grid is not compiled in)
_NO_GPU_SMS = 2


def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (``_NO_GPU_SMS`` off a GPU)."""
    if device.type != "cuda" or INTERPRET:
        return _NO_GPU_SMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@dataclass
class _Plan:
    """Everything one launch needs: the kernel's positional arguments, its constexprs and the
    launch options. Built from shapes, strides and dtypes only (works on meta tensors, which the
    AOT test uses to compile exactly what a real launch would)."""
    grid: Tuple[int]
    args: tuple
    constexprs: dict
    num_warps: int
    num_stages: int
    config: ConvConfig
    pmean: Optional[torch.Tensor]     # statistics scratch: (num_m_tiles (+ num_groups), Cout) float32 each,
    pm2: Optional[torch.Tensor]       # tile partials, then the group partials when there are several groups
    M: int
    num_m_tiles: int
    cout: int
    mean: Optional[torch.Tensor] = None      # the statistics: (Cout,) float32 mean and biased var
    var: Optional[torch.Tensor] = None
    tiles_per_group: int = 0                 # m-tiles per statistics group (level 1)
    num_groups: int = 0
    counters: Optional[torch.Tensor] = None  # arrival counters (statistics with a launch only)
    counter_key: Optional[tuple] = None      # their cache key (None: not cached)


def _prepare(x, weight, scale, bias, residual, out, stride, padding, relu, compute_stats, allow_tf32,
             config: Optional[ConvConfig] = None, arch: Optional[int] = None, bn: Optional[tuple] = None) -> _Plan:
    """``bn``: None, or (mean, var, weight, bias, eps) of the BN + ReLU applied to x in the operand
    prologue (``conv2d_bn_stats``: mean/var float32 (C,), weight/bias None or (C,) float32 or x's dtype)."""
    (n, cin, h, w, cout, kh, kw, oh, ow, sh, sw, ph, pw) = _geometry(x, weight, out, stride, padding)
    M = n * oh * ow
    ktot = cin * kh * kw
    if config is None and arch is None and not INTERPRET and x.is_cuda:
        arch = _cuda_arch(x.device.index if x.device.index is not None else torch.cuda.current_device())
    cfg = config or select_config(M, cout, cin, kh, kw, x.dtype, arch, bool(allow_tf32))
    packed = cfg.packed_k if cfg.packed_k is not None else _use_packed_k(cin, kh, kw, cfg.BLOCK_K)

    inplace = _weight_cache.conv_fwd_inplace_strides(weight, x.dtype) if cfg.w_kmajor is not False else None
    if inplace is not None:
        # the weight's own memory is the K-major operand: a view, no pack launch, no cache entry
        # (a cached view would keep the weight alive)
        kmajor = True
        w2 = weight_operand_view(weight)
    else:
        kmajor = cfg.w_kmajor if cfg.w_kmajor is not None else _weight_kmajor(x.dtype)
        w2 = _weight_cache.packed(weight, ("triton_conv2d", kmajor), functools.partial(pack_weight, kmajor=kmajor))

    even_c = cin % cfg.BLOCK_K == 0
    w_desc_mode, w_arg = 0, w2
    if cfg.w_tma:
        desc = _weight_descriptor(w2, kmajor, packed, even_c, cfg)
        if desc is not None:
            w_desc_mode, w_arg = (1 if kmajor else 2), desc

    num_m_tiles = triton.cdiv(M, cfg.BLOCK_M)
    num_n_tiles = triton.cdiv(cout, cfg.BLOCK_N)
    pmean = pm2 = mean = var = counters = key = None
    tpg = cfg.stats_group or stats_group_tiles(num_m_tiles)
    groups = triton.cdiv(num_m_tiles, tpg)
    if compute_stats:
        # tile partials, then (several groups) the group partials below them
        rows = num_m_tiles + (groups if groups > 1 else 0)
        pmean = _alloc.empty((rows, cout), dtype=torch.float32, device=x.device)
        pm2 = _alloc.empty((rows, cout), dtype=torch.float32, device=x.device)
        mean = _alloc.empty((cout,), dtype=torch.float32, device=x.device)
        var = _alloc.empty((cout,), dtype=torch.float32, device=x.device)
        if M > 0 and cout > 0:  # (else nothing is launched)
            # one per (group, column tile), then one per column tile for level 2
            counters, key = arrival_counters(x.device, (groups + (1 if groups > 1 else 0)) * num_n_tiles)
    res = residual if residual is not None else out
    dummy = out  # stands in for absent optional pointers (never dereferenced: constexpr-disabled)

    if x.dtype == torch.float32:
        # tf32 exactly when PyTorch's conv would use it; otherwise 3xTF32 (fp32-accurate split
        # products on the tensor cores) rather than the much slower FMA path.
        precision = "tf32" if allow_tf32 else "tf32x3"
    else:
        precision = "tf32"  # ignored for 16-bit operands
    args = (
        x, w_arg, scale if scale is not None else dummy, bias if bias is not None else dummy, res, out,
        pmean if compute_stats else dummy, pm2 if compute_stats else dummy,
        mean if compute_stats else dummy, var if compute_stats else dummy,
        counters if counters is not None else dummy,
        # the prologue's operands; None where absent: Triton makes a None argument a constexpr, so
        # without the prologue the kernel's signature and code are what they were before it existed
        *((bn[0], bn[1], bn[2], bn[3], float(bn[4])) if bn is not None else (None,) * 5),
        cin, h, w, cout, oh, ow, M, ktot, tpg,
        *w2.stride(),
        *x.stride(), *out.stride(), *res.stride(),
        sh, sw, ph, pw,
    )
    constexprs = dict(
        KH=kh, KW=kw,
        HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        RELU=bool(relu), STATS=bool(compute_stats), PACKED_K=bool(packed),
        EVEN_C=even_c, W_DESC=w_desc_mode,
        DOT_PRECISION=precision, UPCAST_DOT=INTERPRET, MERGE_T=stats_merge_rows(cfg.BLOCK_N),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        PROLOGUE=bn is not None, HAS_BN_W=bn is not None and bn[2] is not None,
        HAS_BN_B=bn is not None and bn[3] is not None, PERSISTENT=cfg.persistent > 0,
    )
    tiles = num_m_tiles * num_n_tiles
    grid = (min(tiles, cfg.persistent * _num_sms(x.device)) if cfg.persistent > 0 else tiles,)
    return _Plan(grid, args, constexprs, cfg.num_warps, cfg.num_stages, cfg, pmean, pm2, M, num_m_tiles, cout,
                 mean, var, tpg, groups, counters, key)


def _launch(x, weight, scale, bias, residual, out, stride, padding, relu, compute_stats, allow_tf32,
            config: Optional[ConvConfig] = None, bn: Optional[tuple] = None):
    plan = _prepare(x, weight, scale, bias, residual, out, stride, padding, relu, compute_stats, allow_tf32,
                    config, bn=bn)
    M, cout = plan.M, plan.cout
    if M > 0 and cout > 0:
        try:
            _conv2d_fwd_kernel[plan.grid](*plan.args, **plan.constexprs,
                                          num_warps=plan.num_warps, num_stages=plan.num_stages)
        except BaseException:
            # it may have run partly (interpreter): the counters may not be all 0
            drop_arrival_counters(plan.counter_key)
            raise
    if not compute_stats:
        return None
    if M == 0:
        plan.mean.fill_(float("nan"))
        plan.var.fill_(float("nan"))
    return plan.mean, plan.var


def conv2d_forward(x, weight, scale, bias, residual, out, stride, padding, relu, compute_stats, allow_tf32, *,
                   dilation=(1, 1), groups: int = 1):
    """out = act(conv2d(x, weight) * scale + bias + residual) (see the module docstring); returns
    (mean, biased var) of conv2d(x, weight) per output channel when ``compute_stats``. dilation 1
    and groups 1 only (the registry's ``supports`` routes the others elsewhere)."""
    return _launch(x, weight, scale, bias, residual, out, stride, padding, relu, compute_stats, allow_tf32)


def conv2d_bn_stats(y_prev, mean, var, bn_weight, bn_bias, eps, weight, out, stride, padding, allow_tf32):
    """``conv2d_bn_stats`` (resnet_kernels/ops/conv2d_bn.py; contract:
    resnet_kernels/backends/torch_conv2d.py ``conv2d_bn_stats``): out = conv2d(relu(bn(y_prev)),
    weight) with the BN + ReLU applied to the A tiles as they are loaded (``PROLOGUE``:
    ``_bn_relu_operand``), h never written; returns the (mean, biased var) of out per channel."""
    return _launch(y_prev, weight, None, None, None, out, stride, padding, False, True, allow_tf32,
                   bn=(mean, var, bn_weight, bn_bias, eps))
