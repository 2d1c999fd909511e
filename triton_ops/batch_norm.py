"""Triton kernels for the training-mode BatchNorm ops (see ``resnet_kernels/ops/batch_norm.py``;
the contract, argument for argument, is ``resnet_kernels/backends/torch_batch_norm.py``):

    forward   out = act((y - mean) * scale + bias + R)      scale = weight * rsqrt(var + eps)
              R = (identity - id_mean) * id_scale + id_bias  (identity with its own BN)
                = identity                                   (raw identity) / 0 (none)
    backward  g = grad_out * (out > 0) (relu) or grad_out;  d = y - mean
              sum_g = sum(g), sum_gd = sum(g * d)  (over N, H, W), and sum(g * (identity - id_mean))
              grad_bias = sum_g, grad_weight = sum_gd * invstd,
              grad_y = A * g - A * sum_g / m - A * invstd^2 * sum_gd / m * d   (A = weight * invstd)
              the identity side alike with its own statistics, or grad_identity = g (raw identity)
    running   running_mean = (1 - f) * running_mean + f * mean,
              running_var = (1 - f) * running_var + f * unbias * var, num_batches_tracked += 1

The per-channel affine (invstd, scale) is computed inside the kernels from mean/var/weight/bias/eps
(no separate finalize launch in the forward). The normalisation works on ``y - mean`` (forward and
backward), not ``y * scale + shift``: with |mean| >> std the result keeps its accuracy relative to
the centred values. All arithmetic is in float32 (float64 for float64 activations; the
running-statistics update in float32, or float64 for float64 buffers), every output is rounded
once when stored. weight/bias/id_weight/id_bias may be float32 or the activation dtype (loaded as
they are); grad_weight/grad_bias/... are stored in their own dtype. Python floats reach a kernel
as float32: eps, id_eps, 1/m and the running-update factors are passed as three float32 parts
whose sum is exact to ~72 bits, added in float64 by the float64 paths (``_parts``).

Layouts as in ``triton_ops/bn_add_relu.py``: NCHW-contiguous (channel of flat element i is
(i // inner) % C, inner = H*W) or channels_last (inner = 1). The elementwise kernels (forward,
apply) always use a 2-D tiling: ``MODE_PLANES`` [planes, H*W] tiles for NCHW (per-channel values
one per row), ``MODE_COLS`` [pixels, channels] tiles for channels_last (one vector per program);
the vector width is the largest power of two <= 16 bytes dividing the contiguous extent (1 for
7x7 planes or odd C). Unlike bn_add_relu there is no flat 1-D tiling with per-element channel
gathers: with 4-8 per-channel values and an rsqrt per channel, a per-element integer division,
modulo, gathers and rsqrt would cost more instructions than the 16-byte vectors save (modeled,
not measured: no GPU here).

Kernel launches per call (what the accountant declares):

* ``batch_norm_act_forward``: 1 (``_fwd_kernel``); with ``running`` (batch_norm_act_bits, the
  training block's tail) 1 too: ``_fwd_running_kernel`` also applies up to RUNNING_SLOTS
  running-statistics updates (any more: ``bn_running_update`` after it).
* ``batch_norm_act_backward``: at most 2, deterministic, no atomics on the data:
  ``_reduce_cols_kernel`` (channels_last) or ``_reduce_planes_kernel`` (NCHW) writes per-program
  partial sums to a (K, P, C) float32 buffer, then each program arrives on its channel block's
  int32 counter (a CTA barrier, then one gpu-scope acq_rel atomic add: the pattern of the conv's
  statistics merge and the wgrad's split-K, ``_common.arrival_counters``); the last of a block's P
  arrivals runs the finalize (``_finalize_block``): it sums the P partials of each channel in a
  fixed order (from L2) and writes grad_weight/grad_bias/grad_id_weight/grad_id_bias and the
  per-channel coefficients of the input gradients to a (6, C) buffer, and puts the counter back to
  0. Which program arrives last varies run to run, the order of the sum does not. Then
  ``_apply_kernel`` writes grad_y and grad_identity in one pass. The reduce launch is skipped when
  no per-channel sum is needed (only grad_identity of a raw identity), the apply kernel when
  neither grad_y nor grad_identity is requested: 2 launches for every training step that needs
  grad_y, 1 otherwise (was 3: a separate finalize launch; the dgrad's upstream
  reductions, triton_ops/conv2d_dgrad.py, also run ``_finalize_block`` in their own launch now).
  grad_y may be grad_out's own buffer (the
  reduce pass reads grad_out before the apply pass, which reads each element before writing it;
  tests/ops/test_batch_norm_triton.py checks it bitwise).
* ``batch_norm_act_coef``: 1, the backward's reduce + in-launch finalize (``_reduce_finalize``,
  shared with ``batch_norm_act_backward``): the finalize writes the coefficient rows (A, B, K) of
  y's BN (and of the identity's) to the op's (3, C) outputs instead of the apply kernel's buffer.
* ``bn_running_update``: 1 (``_running_kernel``) per RUNNING_SLOTS BatchNorms (a residual block's
  updates together), none when no buffer is given.

Activation bytes per call (counted, not measured; E = N*C*H*W elements of s bytes each):

* forward: reads y (+ identity when given), writes out: 2 E s (3 E s with an identity).
* backward reduce (when a per-channel sum is needed): reads grad_out, out (relu), y (grad_y or
  grad_weight requested), identity (identity with BN and grad_identity or grad_id_weight requested).
* backward apply (when grad_y or grad_identity is requested): reads grad_out, out (relu), y
  (grad_y), identity (grad_identity of an identity with BN); writes grad_y, grad_identity.
  E.g. relu, no identity, all gradients: 3 + 4 = 7 E s; raw identity: 8 E s; identity with BN:
  4 + 6 = 10 E s.
* per-channel traffic: (K, P, C) partials (K <= 3 sums, P <= ~8 programs per SM in all, see
  ``_reduce_config``), a (6, C) coefficient buffer, the (C,) vectors; each program of the
  elementwise kernels reads the per-channel values of its channels (from L2).

Block sizes come from heuristics (no autotuning). Under the Triton interpreter (``INTERPRET``) a
single small configuration is used. float64 is supported (computed in float64).
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from .. import _alloc
from .._bits import is_bits
from .._bits import pack as pack_bits
from ._common import (INTERPRET, arrival_counters, cast_for_store, drop_arrival_counters, mask_bit, pack_bits_cols,
                      pack_bits_rows)
from .bn_add_relu import (_backward_config, _block_for_extent, _layout, _num_warps, _on_device,
                          _tile_elems, _vec_width)

MODE_PLANES = 1
MODE_COLS = 2

ID_NONE = 0
ID_RAW = 1
ID_BN = 2

_INT32_MAX = 2 ** 31 - 1
# rows of the (6, C) coefficient buffer written by the finalize (_finalize_block) for _apply_kernel:
# grad = A * g - B - K * (x - mean)  for x = y (rows 0..2) and x = identity (rows 3..5)
N_COEF = 6


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _fwd_kernel(y_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, id_ptr, im_ptr, iv_ptr, iw_ptr, ib_ptr, out_ptr, bits_ptr,
                eps, eps_lo, eps_lo2, id_eps, id_eps_lo, id_eps_lo2, R, S_V, C,
                MODE: tl.constexpr, VEC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
                HAS_W: tl.constexpr, HAS_B: tl.constexpr, ID_MODE: tl.constexpr, HAS_IW: tl.constexpr,
                HAS_IB: tl.constexpr, RELU: tl.constexpr, IS64: tl.constexpr, INT64: tl.constexpr,
                BITS: tl.constexpr = False):
    _fwd_tile(y_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, id_ptr, im_ptr, iv_ptr, iw_ptr, ib_ptr, out_ptr, bits_ptr,
              eps, eps_lo, eps_lo2, id_eps, id_eps_lo, id_eps_lo2, R, S_V, C, MODE, VEC, BLOCK_R, BLOCK_S, HAS_W,
              HAS_B, ID_MODE, HAS_IW, HAS_IB, RELU, IS64, INT64, BITS)


@triton.jit
def _fwd_running_kernel(y_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, id_ptr, im_ptr, iv_ptr, iw_ptr, ib_ptr, out_ptr,
                        bits_ptr, eps, eps_lo, eps_lo2, id_eps, id_eps_lo, id_eps_lo2, R, S_V, C,
                        m0, v0, rm0, rv0, n0, k0, k0_lo, k0_lo2, f0, f0_lo, f0_lo2, fu0, fu0_lo, fu0_lo2, C0,
                        m1, v1, rm1, rv1, n1, k1, k1_lo, k1_lo2, f1, f1_lo, f1_lo2, fu1, fu1_lo, fu1_lo2, C1,
                        m2, v2, rm2, rv2, n2, k2, k2_lo, k2_lo2, f2, f2_lo, f2_lo2, fu2, fu2_lo, fu2_lo2, C2,
                        m3, v3, rm3, rv3, n3, k3, k3_lo, k3_lo2, f3, f3_lo, f3_lo2, fu3, fu3_lo, fu3_lo2, C3,
                        MODE: tl.constexpr, VEC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
                        HAS_W: tl.constexpr, HAS_B: tl.constexpr, ID_MODE: tl.constexpr, HAS_IW: tl.constexpr,
                        HAS_IB: tl.constexpr, RELU: tl.constexpr, IS64: tl.constexpr, INT64: tl.constexpr,
                        BITS: tl.constexpr, RUN_BLOCK: tl.constexpr, F0: tl.constexpr, F1: tl.constexpr,
                        F2: tl.constexpr, F3: tl.constexpr):
    # _fwd_kernel's tile, after (batch_norm_act_bits' ``running``) the running-statistics updates of
    # up to RUNNING_SLOTS BatchNorms, as _running_kernel computes them, spread over the programs:
    # program l (in row-major order of the grid) updates the RUN_BLOCK-column chunks l, l + P, ...
    # of each slot (P programs) and program 0 increments the num_batches_tracked. The buffers are
    # disjoint from everything the tile reads (the op checks), so the order does not matter; first,
    # so that none of their registers is live with the tile's (sm_80: 70 -> within 64 per thread).
    lid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    nprog = tl.num_programs(0) * tl.num_programs(1)
    if F0 != 0:
        _running_range(m0, v0, rm0, rv0, n0, k0, k0_lo, k0_lo2, f0, f0_lo, f0_lo2, fu0, fu0_lo, fu0_lo2, C0, lid,
                       nprog, RUN_BLOCK, F0)
    if F1 != 0:
        _running_range(m1, v1, rm1, rv1, n1, k1, k1_lo, k1_lo2, f1, f1_lo, f1_lo2, fu1, fu1_lo, fu1_lo2, C1, lid,
                       nprog, RUN_BLOCK, F1)
    if F2 != 0:
        _running_range(m2, v2, rm2, rv2, n2, k2, k2_lo, k2_lo2, f2, f2_lo, f2_lo2, fu2, fu2_lo, fu2_lo2, C2, lid,
                       nprog, RUN_BLOCK, F2)
    if F3 != 0:
        _running_range(m3, v3, rm3, rv3, n3, k3, k3_lo, k3_lo2, f3, f3_lo, f3_lo2, fu3, fu3_lo, fu3_lo2, C3, lid,
                       nprog, RUN_BLOCK, F3)
    _fwd_tile(y_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, id_ptr, im_ptr, iv_ptr, iw_ptr, ib_ptr, out_ptr, bits_ptr,
              eps, eps_lo, eps_lo2, id_eps, id_eps_lo, id_eps_lo2, R, S_V, C, MODE, VEC, BLOCK_R, BLOCK_S, HAS_W,
              HAS_B, ID_MODE, HAS_IW, HAS_IB, RELU, IS64, INT64, BITS)


@triton.jit
def _fwd_tile(y_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, id_ptr, im_ptr, iv_ptr, iw_ptr, ib_ptr, out_ptr, bits_ptr,
              eps, eps_lo, eps_lo2, id_eps, id_eps_lo, id_eps_lo2, R, S_V, C,
              MODE: tl.constexpr, VEC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
              HAS_W: tl.constexpr, HAS_B: tl.constexpr, ID_MODE: tl.constexpr, HAS_IW: tl.constexpr,
              HAS_IB: tl.constexpr, RELU: tl.constexpr, IS64: tl.constexpr, INT64: tl.constexpr,
              BITS: tl.constexpr):
    # The tensor is an [R, S] matrix (S = S_V * VEC, so the compiler knows rows start on a VEC
    # boundary); the program owns the tile [BLOCK_R, BLOCK_S] at (program_id(0), program_id(1));
    # channel = row % C (MODE_PLANES) or column (MODE_COLS). The per-channel values are computed
    # on 1-D vectors (one per row / column) and broadcast once.
    if IS64:
        acc_t = tl.float64
    else:
        acc_t = tl.float32
    S = S_V * VEC
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    rmask = rows < R
    cmask = cols < S
    if INT64:
        roff = rows.to(tl.int64) * S
    else:
        roff = rows * S
    offs = roff[:, None] + cols[None, :]
    mask = rmask[:, None] & cmask[None, :]
    if MODE == 1:
        ch = rows % C
        chmask = rmask
    else:
        ch = cols
        chmask = cmask
    # per-channel affine of the main input
    mu = tl.load(mean_ptr + ch, mask=chmask, other=0.0).to(acc_t)
    v = tl.load(var_ptr + ch, mask=chmask, other=1.0).to(acc_t)
    if IS64:
        sc = 1.0 / tl.sqrt(v + (((tl.zeros_like(v) + eps) + eps_lo) + eps_lo2))
    else:
        sc = tl.rsqrt(v + eps)
    if HAS_W:
        sc = sc * tl.load(w_ptr + ch, mask=chmask, other=0.0).to(acc_t)
    if HAS_B:
        sh = tl.load(b_ptr + ch, mask=chmask, other=0.0).to(acc_t)
    if ID_MODE == 2:
        imu = tl.load(im_ptr + ch, mask=chmask, other=0.0).to(acc_t)
        iv = tl.load(iv_ptr + ch, mask=chmask, other=1.0).to(acc_t)
        if IS64:
            isc = 1.0 / tl.sqrt(iv + (((tl.zeros_like(iv) + id_eps) + id_eps_lo) + id_eps_lo2))
        else:
            isc = tl.rsqrt(iv + id_eps)
        if HAS_IW:
            isc = isc * tl.load(iw_ptr + ch, mask=chmask, other=0.0).to(acc_t)
        if HAS_IB:
            # one shift for both sides (fewer per-channel registers)
            if HAS_B:
                sh = sh + tl.load(ib_ptr + ch, mask=chmask, other=0.0).to(acc_t)
            else:
                sh = tl.load(ib_ptr + ch, mask=chmask, other=0.0).to(acc_t)
    # broadcast along the tile's other axis (inline: nested jit calls are slow under the interpreter)
    if MODE == 1:
        mu = mu[:, None]
        sc = sc[:, None]
        if HAS_B or HAS_IB:
            sh = sh[:, None]
        if ID_MODE == 2:
            imu = imu[:, None]
            isc = isc[:, None]
    elif MODE == 2:
        mu = mu[None, :]
        sc = sc[None, :]
        if HAS_B or HAS_IB:
            sh = sh[None, :]
        if ID_MODE == 2:
            imu = imu[None, :]
            isc = isc[None, :]
    x = (tl.load(y_ptr + offs, mask=mask, other=0.0).to(acc_t) - mu) * sc
    if ID_MODE == 1:
        x = x + tl.load(id_ptr + offs, mask=mask, other=0.0).to(acc_t)
    elif ID_MODE == 2:
        x = x + (tl.load(id_ptr + offs, mask=mask, other=0.0).to(acc_t) - imu) * isc
    if HAS_B or HAS_IB:  # HAS_IB only with ID_MODE 2 (the launcher)
        x = x + sh
    if RELU:
        # where(x < 0, 0, x), not maximum: NaN propagates like torch.relu
        x = tl.where(x < 0, 0.0, x)
    xr = cast_for_store(x, out_ptr)
    tl.store(out_ptr + offs, xr, mask=mask)
    if BITS:
        # the 1-bit mask of the stored out > 0 (resnet_kernels/_bits.py: byte [n, hw, c // 8] of
        # (N*HW, CB) bytes); the launcher makes every byte's 8 channels lie in this tile (race-free:
        # each byte written by one program)
        pos = (xr > 0) & mask
        CB = (C + 7) // 8
        if MODE == 1:
            # rows n*C + c (C % 8 == 0, BLOCK_R % 8 == 0): a byte per 8 consecutive rows
            byt = pack_bits_rows(pos, BLOCK_R, BLOCK_S)
            grow = (tl.program_id(0) * (BLOCK_R // 8) + tl.arange(0, BLOCK_R // 8)) * 8
            nn = grow // C
            if INT64:
                pix = nn.to(tl.int64)[:, None] * S + cols[None, :]
            else:
                pix = nn[:, None] * S + cols[None, :]
            boffs = pix * CB + ((grow % C) // 8)[:, None]
            bmask = (grow < R)[:, None] & cmask[None, :]
        else:
            # rows = pixels, columns = channels (BLOCK_S % 8 == 0): a byte per 8 consecutive columns
            byt = pack_bits_cols(pos, BLOCK_R, BLOCK_S)
            bcol = tl.program_id(1) * (BLOCK_S // 8) + tl.arange(0, BLOCK_S // 8)
            if INT64:
                brow = rows.to(tl.int64) * CB
            else:
                brow = rows * CB
            boffs = brow[:, None] + bcol[None, :]
            bmask = rmask[:, None] & (bcol < CB)[None, :]
        tl.store(bits_ptr + boffs, byt, mask=bmask)


@triton.jit
def _reduce_cols_kernel(go_ptr, out_ptr, y_ptr, mean_ptr, id_ptr, im_ptr, pg_ptr, pd_ptr, pi_ptr,
                        var_ptr, w_ptr, iv_ptr, iw_ptr, gw_ptr, gb_ptr, giw_ptr, gib_ptr, coef_ptr, icoef_ptr, cnt_ptr,
                        eps, eps_lo, eps_lo2, id_eps, id_eps_lo, id_eps_lo2, inv_m, inv_m_lo, inv_m_lo2,
                        M, C_V, TILES,
                        VEC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, RELU: tl.constexpr,
                        NEED_G: tl.constexpr, NEED_D: tl.constexpr, NEED_I: tl.constexpr, IS64: tl.constexpr,
                        INT64: tl.constexpr, FIN_BLOCK_P: tl.constexpr, HAS_W: tl.constexpr, HAS_IW: tl.constexpr, W_GW: tl.constexpr,
                        W_GB: tl.constexpr, W_GIW: tl.constexpr, W_GIB: tl.constexpr, COEF_Y: tl.constexpr,
                        COEF_I: tl.constexpr,
                        MASK_BITS: tl.constexpr = False):
    # channels_last: an [M, C] matrix (M = N*H*W pixels). Program (pr, pc) owns the channel block
    # pc and the TILES consecutive row tiles starting at pr * TILES; it writes its column sums of
    # g, g * (y - mean) and g * (identity - id_mean) to row pr of the (P, C) partial buffers, then
    # arrives on the channel block's counter; the last of the P arrivals finalizes the block.
    # MASK_BITS: out_ptr is the 1-bit ReLU mask (resnet_kernels/_bits.py: [M, ceil(C/8)] bytes).
    pid_r = tl.program_id(0)
    C = C_V * VEC
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    if IS64:
        acc_t = tl.float64
    else:
        acc_t = tl.float32
    if NEED_D:
        mu = tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(acc_t)[None, :]
    if NEED_I:
        imu = tl.load(im_ptr + cols, mask=cmask, other=0.0).to(acc_t)[None, :]
    acc_g = tl.zeros([BLOCK_R, BLOCK_C], dtype=acc_t)
    acc_d = tl.zeros([BLOCK_R, BLOCK_C], dtype=acc_t)
    acc_i = tl.zeros([BLOCK_R, BLOCK_C], dtype=acc_t)
    for t in range(TILES):
        rows = (pid_r * TILES + t) * BLOCK_R + tl.arange(0, BLOCK_R)
        if INT64:
            roff = rows.to(tl.int64) * C
        else:
            roff = rows * C
        offs = roff[:, None] + cols[None, :]
        mask = (rows < M)[:, None] & cmask[None, :]
        g = tl.load(go_ptr + offs, mask=mask, other=0.0).to(acc_t)
        if RELU:
            if MASK_BITS:
                if INT64:
                    brow = rows.to(tl.int64) * ((C + 7) // 8)
                else:
                    brow = rows * ((C + 7) // 8)
                o = mask_bit(out_ptr, brow[:, None], cols[None, :], mask)
            else:
                o = tl.load(out_ptr + offs, mask=mask, other=0.0)
            g = tl.where(o > 0, g, 0.0)
        if NEED_G:
            acc_g += g
        if NEED_D:
            # masked elements: g = 0, so the (0 - mean) there adds nothing
            acc_d += g * (tl.load(y_ptr + offs, mask=mask, other=0.0).to(acc_t) - mu)
        if NEED_I:
            acc_i += g * (tl.load(id_ptr + offs, mask=mask, other=0.0).to(acc_t) - imu)
    poffs = pid_r * C + cols
    if NEED_G:
        tl.store(pg_ptr + poffs, tl.sum(acc_g, axis=0), mask=cmask)
    if NEED_D:
        tl.store(pd_ptr + poffs, tl.sum(acc_d, axis=0), mask=cmask)
    if NEED_I:
        tl.store(pi_ptr + poffs, tl.sum(acc_i, axis=0), mask=cmask)
    # ---- the finalize, in this launch. Release: every thread's partial stores happen before the
    # (one-thread) arrival on the channel block's counter (a CTA barrier, then a gpu-scope acq_rel
    # atomic: the conv statistics' and the wgrad split-K's pattern, triton_ops/_common.py). The last
    # arrival sums the block's P partial rows in row order (which program that is varies run to
    # run, the order of the sum does not) and puts the counter back to 0.
    tl.debug_barrier()
    pc = tl.program_id(1)
    P = tl.num_programs(0)
    arrived = tl.atomic_add(cnt_ptr + pc, 1, sem="acq_rel", scope="gpu")
    if arrived == P - 1:
        _finalize_block(pg_ptr, pd_ptr, pi_ptr, var_ptr, w_ptr, iv_ptr, iw_ptr, gw_ptr, gb_ptr, giw_ptr, gib_ptr,
                        coef_ptr, icoef_ptr, eps, eps_lo, eps_lo2, id_eps, id_eps_lo, id_eps_lo2, inv_m, inv_m_lo,
                        inv_m_lo2, P, C, cols, cmask, FIN_BLOCK_P, BLOCK_C, NEED_G, NEED_D, NEED_I, HAS_W, HAS_IW,
                        W_GW, W_GB, W_GIW, W_GIB, COEF_Y, COEF_I, IS64)
        tl.store(cnt_ptr + pc, 0)


@triton.jit
def _reduce_planes_kernel(go_ptr, out_ptr, y_ptr, mean_ptr, id_ptr, im_ptr, pg_ptr, pd_ptr, pi_ptr,
                          var_ptr, w_ptr, iv_ptr, iw_ptr, gw_ptr, gb_ptr, giw_ptr, gib_ptr, coef_ptr, icoef_ptr, cnt_ptr,
                          eps, eps_lo, eps_lo2, id_eps, id_eps_lo, id_eps_lo2, inv_m, inv_m_lo, inv_m_lo2,
                          N, C, HW_V, N_TILES, HW_TILES,
                          VEC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HW: tl.constexpr, RELU: tl.constexpr,
                          NEED_G: tl.constexpr, NEED_D: tl.constexpr, NEED_I: tl.constexpr, IS64: tl.constexpr,
                          INT64: tl.constexpr, FIN_BLOCK_P: tl.constexpr, HAS_W: tl.constexpr, HAS_IW: tl.constexpr, W_GW: tl.constexpr,
                          W_GB: tl.constexpr, W_GIW: tl.constexpr, W_GIB: tl.constexpr, COEF_Y: tl.constexpr,
                          COEF_I: tl.constexpr,
                          MASK_BITS: tl.constexpr = False):
    # NCHW: program (c, nb, hb) owns channel c, the N_TILES consecutive batch tiles starting at
    # nb * N_TILES and the HW_TILES consecutive H*W tiles starting at hb * HW_TILES; tile
    # [BLOCK_N, BLOCK_HW] reads BLOCK_N planes (n, c). The per-channel values are scalars. The
    # program's sums go to row nb * num_programs(2) + hb of the (P, C) partial buffers; then it
    # arrives on channel c's counter, and the last of the P arrivals finalizes channel c.
    # MASK_BITS: out_ptr is the 1-bit ReLU mask (resnet_kernels/_bits.py: byte [n, hw, c // 8]).
    c = tl.program_id(0)
    nb = tl.program_id(1)
    hb = tl.program_id(2)
    HW = HW_V * VEC
    if IS64:
        acc_t = tl.float64
    else:
        acc_t = tl.float32
    if NEED_D:
        mu = tl.load(mean_ptr + c).to(acc_t)
    if NEED_I:
        imu = tl.load(im_ptr + c).to(acc_t)
    acc_g = tl.zeros([BLOCK_N, BLOCK_HW], dtype=acc_t)
    acc_d = tl.zeros([BLOCK_N, BLOCK_HW], dtype=acc_t)
    acc_i = tl.zeros([BLOCK_N, BLOCK_HW], dtype=acc_t)
    for i in range(N_TILES):
        n = (nb * N_TILES + i) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        if INT64:
            base = (n.to(tl.int64) * C + c) * HW
        else:
            base = (n * C + c) * HW
        for j in range(HW_TILES):
            hw = (hb * HW_TILES + j) * BLOCK_HW + tl.arange(0, BLOCK_HW)
            offs = base[:, None] + hw[None, :]
            mask = nmask[:, None] & (hw < HW)[None, :]
            g = tl.load(go_ptr + offs, mask=mask, other=0.0).to(acc_t)
            if RELU:
                if MASK_BITS:
                    if INT64:
                        brow = n.to(tl.int64) * HW
                    else:
                        brow = n * HW
                    o = mask_bit(out_ptr, (brow[:, None] + hw[None, :]) * ((C + 7) // 8), c, mask)
                else:
                    o = tl.load(out_ptr + offs, mask=mask, other=0.0)
                g = tl.where(o > 0, g, 0.0)
            if NEED_G:
                acc_g += g
            if NEED_D:
                acc_d += g * (tl.load(y_ptr + offs, mask=mask, other=0.0).to(acc_t) - mu)
            if NEED_I:
                acc_i += g * (tl.load(id_ptr + offs, mask=mask, other=0.0).to(acc_t) - imu)
    p = nb * tl.num_programs(2) + hb
    if NEED_G:
        tl.store(pg_ptr + p * C + c, tl.sum(tl.sum(acc_g, axis=1), axis=0))
    if NEED_D:
        tl.store(pd_ptr + p * C + c, tl.sum(tl.sum(acc_d, axis=1), axis=0))
    if NEED_I:
        tl.store(pi_ptr + p * C + c, tl.sum(tl.sum(acc_i, axis=1), axis=0))
    # ---- the finalize of channel c, in this launch (as ``_reduce_cols_kernel``'s, one channel wide)
    tl.debug_barrier()
    P = tl.num_programs(1) * tl.num_programs(2)
    arrived = tl.atomic_add(cnt_ptr + c, 1, sem="acq_rel", scope="gpu")
    if arrived == P - 1:
        cols = c + tl.arange(0, 1)
        _finalize_block(pg_ptr, pd_ptr, pi_ptr, var_ptr, w_ptr, iv_ptr, iw_ptr, gw_ptr, gb_ptr, giw_ptr, gib_ptr,
                        coef_ptr, icoef_ptr, eps, eps_lo, eps_lo2, id_eps, id_eps_lo, id_eps_lo2, inv_m, inv_m_lo,
                        inv_m_lo2, P, C, cols, cols < C, FIN_BLOCK_P, 1, NEED_G, NEED_D, NEED_I, HAS_W, HAS_IW,
                        W_GW, W_GB, W_GIW, W_GIB, COEF_Y, COEF_I, IS64)
        tl.store(cnt_ptr + c, 0)


@triton.jit
def _finalize_block(pg_ptr, pd_ptr, pi_ptr, var_ptr, w_ptr, iv_ptr, iw_ptr,
                    gw_ptr, gb_ptr, giw_ptr, gib_ptr, coef_ptr, icoef_ptr,
                    eps, eps_lo, eps_lo2, id_eps, id_eps_lo, id_eps_lo2, inv_m, inv_m_lo, inv_m_lo2, P, C, cols, cmask,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, NEED_G: tl.constexpr, NEED_D: tl.constexpr,
                    NEED_I: tl.constexpr, HAS_W: tl.constexpr, HAS_IW: tl.constexpr, W_GW: tl.constexpr,
                    W_GB: tl.constexpr, W_GIW: tl.constexpr, W_GIB: tl.constexpr, COEF_Y: tl.constexpr,
                    COEF_I: tl.constexpr, IS64: tl.constexpr):
    """The finalize of channels ``cols`` (BLOCK_C of them, ``cmask`` the valid ones): sums their
    (P, C) partials over P, always in the same order (deterministic; from L2: ``.cg``, the partials
    may have been written by other programs of the same launch), and writes the parameter gradients
    (in their own dtypes) and the input gradients' coefficients: rows (A, B, K) of y's BN at
    coef_ptr, of the identity's at icoef_ptr ((3, C) each; the backward passes rows 0..2 and 3..5 of
    its (6, C) buffer, see N_COEF; batch_norm_act_coef its two outputs)."""
    if IS64:
        acc_t = tl.float64
    else:
        acc_t = tl.float32
    acc_g = tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_t)
    acc_d = tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_t)
    acc_i = tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_t)
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        msk = (rows < P)[:, None] & cmask[None, :]
        offs = rows[:, None] * C + cols[None, :]
        if NEED_G:
            acc_g += tl.load(pg_ptr + offs, mask=msk, other=0.0, cache_modifier=".cg")
        if NEED_D:
            acc_d += tl.load(pd_ptr + offs, mask=msk, other=0.0, cache_modifier=".cg")
        if NEED_I:
            acc_i += tl.load(pi_ptr + offs, mask=msk, other=0.0, cache_modifier=".cg")
    # 1 / (N*H*W) from the host (an integer argument equal to 1 would be a constexpr); float64:
    # its three float32 parts added in float64 (a float32 scalar + a float64 vector is float64)
    if IS64:
        inv_m = ((tl.zeros([BLOCK_C], dtype=tl.float64) + inv_m) + inv_m_lo) + inv_m_lo2
    if NEED_G:
        sg = tl.sum(acc_g, axis=0)
        if W_GB:
            tl.store(gb_ptr + cols, cast_for_store(sg, gb_ptr), mask=cmask)
        if W_GIB:
            tl.store(gib_ptr + cols, cast_for_store(sg, gib_ptr), mask=cmask)
    if NEED_D:
        sd = tl.sum(acc_d, axis=0)
        v = tl.load(var_ptr + cols, mask=cmask, other=1.0).to(acc_t)
        if IS64:
            inv = 1.0 / tl.sqrt(v + (((tl.zeros_like(v) + eps) + eps_lo) + eps_lo2))
        else:
            inv = tl.rsqrt(v + eps)
        if W_GW:
            tl.store(gw_ptr + cols, cast_for_store(sd * inv, gw_ptr), mask=cmask)
        if COEF_Y:
            if HAS_W:
                a = inv * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(acc_t)
            else:
                a = inv
            tl.store(coef_ptr + cols, a, mask=cmask)
            tl.store(coef_ptr + C + cols, a * (sg * inv_m), mask=cmask)
            tl.store(coef_ptr + 2 * C + cols, a * (inv * inv) * (sd * inv_m), mask=cmask)
    if NEED_I:
        si = tl.sum(acc_i, axis=0)
        iv = tl.load(iv_ptr + cols, mask=cmask, other=1.0).to(acc_t)
        if IS64:
            iinv = 1.0 / tl.sqrt(iv + (((tl.zeros_like(iv) + id_eps) + id_eps_lo) + id_eps_lo2))
        else:
            iinv = tl.rsqrt(iv + id_eps)
        if W_GIW:
            tl.store(giw_ptr + cols, cast_for_store(si * iinv, giw_ptr), mask=cmask)
        if COEF_I:
            if HAS_IW:
                ia = iinv * tl.load(iw_ptr + cols, mask=cmask, other=0.0).to(acc_t)
            else:
                ia = iinv
            tl.store(icoef_ptr + cols, ia, mask=cmask)
            tl.store(icoef_ptr + C + cols, ia * (sg * inv_m), mask=cmask)
            tl.store(icoef_ptr + 2 * C + cols, ia * (iinv * iinv) * (si * inv_m), mask=cmask)




@triton.jit
def _apply_kernel(go_ptr, out_ptr, y_ptr, mean_ptr, id_ptr, im_ptr, coef_ptr, gy_ptr, gi_ptr,
                  R, S_V, C,
                  MODE: tl.constexpr, VEC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
                  RELU: tl.constexpr, NEED_GY: tl.constexpr, GI_MODE: tl.constexpr, IS64: tl.constexpr,
                  INT64: tl.constexpr):
    # Tilings as _fwd_kernel. grad_y = A * g - B - K * (y - mean) with (A, B, K) = coef rows 0..2;
    # grad_identity likewise with rows 3..5 and id_mean (GI_MODE 2), or = g (GI_MODE 1).
    if IS64:
        acc_t = tl.float64
    else:
        acc_t = tl.float32
    S = S_V * VEC
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    rmask = rows < R
    cmask = cols < S
    if INT64:
        roff = rows.to(tl.int64) * S
    else:
        roff = rows * S
    offs = roff[:, None] + cols[None, :]
    mask = rmask[:, None] & cmask[None, :]
    if MODE == 1:
        ch = rows % C
        chmask = rmask
    else:
        ch = cols
        chmask = cmask
    if NEED_GY:
        a = tl.load(coef_ptr + ch, mask=chmask, other=0.0)
        b = tl.load(coef_ptr + C + ch, mask=chmask, other=0.0)
        k = tl.load(coef_ptr + 2 * C + ch, mask=chmask, other=0.0)
        mu = tl.load(mean_ptr + ch, mask=chmask, other=0.0).to(acc_t)
    if GI_MODE == 2:
        ia = tl.load(coef_ptr + 3 * C + ch, mask=chmask, other=0.0)
        ib = tl.load(coef_ptr + 4 * C + ch, mask=chmask, other=0.0)
        ik = tl.load(coef_ptr + 5 * C + ch, mask=chmask, other=0.0)
        imu = tl.load(im_ptr + ch, mask=chmask, other=0.0).to(acc_t)
    if MODE == 1:
        if NEED_GY:
            a = a[:, None]
            b = b[:, None]
            k = k[:, None]
            mu = mu[:, None]
        if GI_MODE == 2:
            ia = ia[:, None]
            ib = ib[:, None]
            ik = ik[:, None]
            imu = imu[:, None]
    elif MODE == 2:
        if NEED_GY:
            a = a[None, :]
            b = b[None, :]
            k = k[None, :]
            mu = mu[None, :]
        if GI_MODE == 2:
            ia = ia[None, :]
            ib = ib[None, :]
            ik = ik[None, :]
            imu = imu[None, :]
    g = tl.load(go_ptr + offs, mask=mask, other=0.0).to(acc_t)
    if RELU:
        o = tl.load(out_ptr + offs, mask=mask, other=0.0)
        g = tl.where(o > 0, g, 0.0)
    if NEED_GY:
        d = tl.load(y_ptr + offs, mask=mask, other=0.0).to(acc_t) - mu
        tl.store(gy_ptr + offs, cast_for_store(a * g - (b + k * d), gy_ptr), mask=mask)
    if GI_MODE == 1:
        tl.store(gi_ptr + offs, cast_for_store(g, gi_ptr), mask=mask)
    elif GI_MODE == 2:
        di = tl.load(id_ptr + offs, mask=mask, other=0.0).to(acc_t) - imu
        tl.store(gi_ptr + offs, cast_for_store(ia * g - (ib + ik * di), gi_ptr), mask=mask)


# per-slot flags of _running_kernel (a constexpr bit set per BatchNorm)
RUN_RM = 1  # running_mean present
RUN_RV = 2  # running_var present
RUN_NBT = 4  # num_batches_tracked present
RUN_RM64 = 8  # running_mean is float64
RUN_RV64 = 16  # running_var is float64
RUNNING_SLOTS = 4  # BatchNorms per _running_kernel launch (a bottleneck block's with its projection)


@triton.jit
def _running_slot(mean_ptr, var_ptr, rm_ptr, rv_ptr, nbt_ptr, keep, keep_lo, keep_lo2, f, f_lo, f_lo2, fu, fu_lo,
                  fu_lo2, C, BLOCK: tl.constexpr, FLAGS: tl.constexpr):
    # _running_cols on this program's BLOCK columns; program 0 also increments num_batches_tracked.
    pid = tl.program_id(0)
    _running_cols(mean_ptr, var_ptr, rm_ptr, rv_ptr, keep, keep_lo, keep_lo2, f, f_lo, f_lo2, fu, fu_lo, fu_lo2, C,
                  pid * BLOCK, BLOCK, FLAGS)
    if FLAGS & 4:  # RUN_NBT
        if pid == 0:
            tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)


@triton.jit
def _running_range(mean_ptr, var_ptr, rm_ptr, rv_ptr, nbt_ptr, keep, keep_lo, keep_lo2, f, f_lo, f_lo2, fu, fu_lo,
                   fu_lo2, C, lid, nprog, BLOCK: tl.constexpr, FLAGS: tl.constexpr):
    # _running_cols on the BLOCK-column chunks lid, lid + nprog, ... of the C values; program lid 0
    # also increments num_batches_tracked.
    for start in range(lid * BLOCK, C, nprog * BLOCK):
        _running_cols(mean_ptr, var_ptr, rm_ptr, rv_ptr, keep, keep_lo, keep_lo2, f, f_lo, f_lo2, fu, fu_lo, fu_lo2,
                      C, start, BLOCK, FLAGS)
    if FLAGS & 4:  # RUN_NBT
        if lid == 0:
            tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)


@triton.jit
def _running_cols(mean_ptr, var_ptr, rm_ptr, rv_ptr, keep, keep_lo, keep_lo2, f, f_lo, f_lo2, fu, fu_lo,
                  fu_lo2, C, start, BLOCK: tl.constexpr, FLAGS: tl.constexpr):
    # running_mean = keep * running_mean + f * mean; running_var = keep * running_var + fu * var
    # (keep = 1 - factor, fu = factor * unbias) on columns [start, start + BLOCK) of C, each computed
    # in float64 for a float64 buffer, else float32.
    cols = start + tl.arange(0, BLOCK)
    cmask = cols < C
    if FLAGS & 1:  # RUN_RM
        if FLAGS & 8:  # RUN_RM64
            z = tl.zeros([BLOCK], dtype=tl.float64)  # float64 factors: their float32 parts added in float64
            rm = tl.load(rm_ptr + cols, mask=cmask, other=0.0).to(tl.float64) * (((z + keep) + keep_lo) + keep_lo2) + \
                tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(tl.float64) * (((z + f) + f_lo) + f_lo2)
        else:
            rm = tl.load(rm_ptr + cols, mask=cmask, other=0.0).to(tl.float32) * keep + \
                tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(tl.float32) * f
        tl.store(rm_ptr + cols, cast_for_store(rm, rm_ptr), mask=cmask)
    if FLAGS & 2:  # RUN_RV
        if FLAGS & 16:  # RUN_RV64
            z = tl.zeros([BLOCK], dtype=tl.float64)
            rv = tl.load(rv_ptr + cols, mask=cmask, other=0.0).to(tl.float64) * (((z + keep) + keep_lo) + keep_lo2) + \
                tl.load(var_ptr + cols, mask=cmask, other=0.0).to(tl.float64) * (((z + fu) + fu_lo) + fu_lo2)
        else:
            rv = tl.load(rv_ptr + cols, mask=cmask, other=0.0).to(tl.float32) * keep + \
                tl.load(var_ptr + cols, mask=cmask, other=0.0).to(tl.float32) * fu
        tl.store(rv_ptr + cols, cast_for_store(rv, rv_ptr), mask=cmask)


@triton.jit
def _running_kernel(m0, v0, rm0, rv0, n0, k0, k0_lo, k0_lo2, f0, f0_lo, f0_lo2, fu0, fu0_lo, fu0_lo2, C0,
                    m1, v1, rm1, rv1, n1, k1, k1_lo, k1_lo2, f1, f1_lo, f1_lo2, fu1, fu1_lo, fu1_lo2, C1,
                    m2, v2, rm2, rv2, n2, k2, k2_lo, k2_lo2, f2, f2_lo, f2_lo2, fu2, fu2_lo, fu2_lo2, C2,
                    m3, v3, rm3, rv3, n3, k3, k3_lo, k3_lo2, f3, f3_lo, f3_lo2, fu3, fu3_lo, fu3_lo2, C3,
                    BLOCK: tl.constexpr, F0: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr, F3: tl.constexpr):
    # The running-statistics updates of up to RUNNING_SLOTS BatchNorms (a residual block's) in one
    # launch: slot s (its own C, factors, buffers and dtypes; flags Fs, 0 = unused slot) is
    # _running_slot; the grid covers the largest C, and a program's columns beyond a slot's C are
    # masked off.
    if F0 != 0:
        _running_slot(m0, v0, rm0, rv0, n0, k0, k0_lo, k0_lo2, f0, f0_lo, f0_lo2, fu0, fu0_lo, fu0_lo2, C0, BLOCK, F0)
    if F1 != 0:
        _running_slot(m1, v1, rm1, rv1, n1, k1, k1_lo, k1_lo2, f1, f1_lo, f1_lo2, fu1, fu1_lo, fu1_lo2, C1, BLOCK, F1)
    if F2 != 0:
        _running_slot(m2, v2, rm2, rv2, n2, k2, k2_lo, k2_lo2, f2, f2_lo, f2_lo2, fu2, fu2_lo, fu2_lo2, C2, BLOCK, F2)
    if F3 != 0:
        _running_slot(m3, v3, rm3, rv3, n3, k3, k3_lo, k3_lo2, f3, f3_lo, f3_lo2, fu3, fu3_lo, fu3_lo2, C3, BLOCK, F3)


KERNELS = {
    "_fwd_kernel": _fwd_kernel,
    "_fwd_running_kernel": _fwd_running_kernel,
    "_reduce_cols_kernel": _reduce_cols_kernel,
    "_reduce_planes_kernel": _reduce_planes_kernel,
    "_apply_kernel": _apply_kernel,
    "_running_kernel": _running_kernel,
}


# --------------------------------------------------------------------------------------------
# heuristics (the tile sizes of triton_ops/bn_add_relu.py)
# --------------------------------------------------------------------------------------------
def _elementwise_config(N: int, C: int, HW: int, layout: str, itemsize: int, interpret: bool = None,
                        streams: int = 3, vectors: int = 4) -> dict:
    """Tiling for _fwd_kernel and _apply_kernel: mode, (R, S) matrix view, vector width, block
    sizes, grid, num_warps. ``streams``: activation tensors read or written (forward: y, identity,
    out; apply: grad_out, out, y, identity, grad_y, grad_identity); ``vectors``: per-channel values
    per channel (forward: mean, var, weight, bias and the identity's four; apply: 4 per gradient).
    Register budget on the GPU (tests/test_triton_batch_norm_aot.py: <= 64): with channels_last
    each thread holds the per-channel values of its VEC columns, so the tile is halved when
    streams + vectors > 8, and again without vector access."""
    interpret = INTERPRET if interpret is None else interpret
    tile = _tile_elems(itemsize, interpret)
    if streams + vectors > 8 and not interpret:
        tile = max(tile // 2, 256)
    if layout == "nchw":
        R, S = N * C, HW
    else:
        R, S = N * HW, C
    vec = _vec_width(S, itemsize)
    scalar = vec * itemsize < 8 and not interpret
    if scalar:
        # no 8-byte vectors (7x7 planes, odd C): each element has its own 64-bit address; at most
        # 4 elements per thread keep the registers within the budget
        tile = max(tile // 2, 256)
    block_s = _block_for_extent(S, tile)
    block_r = max(1, min(tile // block_s, triton.next_power_of_2(R)))
    mode = MODE_PLANES if layout == "nchw" else MODE_COLS
    grid = (triton.cdiv(R, block_r), triton.cdiv(S, block_s))
    n = block_r * block_s
    num_warps = max(1, min(8, n // 128)) if scalar else _num_warps(n, interpret)
    return dict(MODE=mode, R=R, S_V=S // vec, VEC=vec, BLOCK_R=block_r, BLOCK_S=block_s, grid=grid,
                num_warps=num_warps)


def _fwd_load(id_mode: int) -> dict:
    """streams / vectors (see _elementwise_config) of _fwd_kernel."""
    return dict(streams=2 + (id_mode != ID_NONE), vectors=8 if id_mode == ID_BN else 4)


def _apply_load(relu: bool, need_gy: bool, gi_mode: int) -> dict:
    """streams / vectors (see _elementwise_config) of _apply_kernel."""
    return dict(streams=1 + relu + 2 * need_gy + (gi_mode != ID_NONE) + (gi_mode == ID_BN),
                vectors=4 * need_gy + 4 * (gi_mode == ID_BN))


def _reduce_config(N: int, C: int, HW: int, layout: str, itemsize: int, device: torch.device,
                   interpret: bool = None) -> dict:
    """Tiling for the reduce kernels ("cols": channels_last, "planes": NCHW): bn_add_relu's
    backward tiling (up to three accumulators per element, half the streaming tile)."""
    return _backward_config(N, C, HW, layout, itemsize, device, interpret)


def _finalize_rows(P: int, block_c: int, interpret: bool = None) -> int:
    """Rows of partials the in-launch finalize sums per step ([rows, block_c] accumulators): the
    tile of bn_add_relu's partial-sum finalize (``_sum_config``) over the reduce's channel block."""
    interpret = INTERPRET if interpret is None else interpret
    tile = min(_tile_elems(8, interpret), 1024)
    return max(1, min(triton.next_power_of_2(P), tile // block_c))


def _running_config(C: int) -> dict:
    block = min(triton.next_power_of_2(C), 1024)
    return dict(BLOCK=block, grid=(triton.cdiv(C, block),), num_warps=4)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _shape(t: torch.Tensor, C: int, inner: int) -> tuple[int, int, int]:
    """(N, C, H*W) of a dense 4-D tensor with the given channel geometry."""
    N, C_, H, W = t.shape
    if C_ != C or inner not in (1, H * W):
        raise ValueError(f"batch_norm launcher: C={C}, inner={inner} do not describe a tensor of shape "
                         f"{tuple(t.shape)}")
    return N, C, H * W


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _parts(x: float) -> tuple[float, float, float]:
    """x as three float32 values (hi, lo, lo2), hi the float32 rounding of x, whose sum is x to
    ~72 bits (Python floats reach a kernel as float32; the float32 paths use hi, the float64 paths
    add the three in float64: hi + lo is exact there, + lo2 rounds once)."""
    x = float(x)
    hi = _f32(x)
    lo = _f32(x - hi)
    return hi, lo, _f32((x - hi) - lo)


# --------------------------------------------------------------------------------------------
# launchers (same names, arguments and semantics as resnet_kernels/backends/torch_batch_norm.py)
# --------------------------------------------------------------------------------------------
def bits_in_kernel(C: int, layout: str) -> bool:
    """Whether ``_fwd_kernel`` writes the 1-bit mask itself (else ``_bits.pack`` after it): always
    for channels_last; for NCHW when C % 8 == 0 (a byte's 8 channels are 8 consecutive rows of the
    [N*C, H*W] tiling, which can then be aligned to the row tiles)."""
    return layout != "nchw" or C % 8 == 0


def _bits_config(cfg: dict, C: int, R: int, S: int) -> dict:
    """The elementwise tiling adjusted so that each mask byte's 8 channels lie in one tile: column
    blocks of >= 8 channels (channels_last), row blocks of a multiple of 8 planes (NCHW, C % 8 == 0);
    the same number of elements per tile or a few more."""
    cfg = dict(cfg)
    if cfg["MODE"] == MODE_COLS:
        if cfg["BLOCK_S"] < 8:
            cfg["BLOCK_R"] = max(1, min(cfg["BLOCK_R"] * cfg["BLOCK_S"] // 8, triton.next_power_of_2(R)))
            cfg["BLOCK_S"] = 8
    elif cfg["BLOCK_R"] % 8:
        n = cfg["BLOCK_R"] * cfg["BLOCK_S"]
        cfg["BLOCK_R"] = 8
        cfg["BLOCK_S"] = max(cfg["VEC"], min(cfg["BLOCK_S"], triton.next_power_of_2(max(n // 8, 1))))
    cfg["grid"] = (triton.cdiv(R, cfg["BLOCK_R"]), triton.cdiv(S, cfg["BLOCK_S"]))
    return cfg


def batch_norm_act_forward(y, mean, var, weight, bias, identity, id_mean, id_var, id_weight, id_bias, out,
                           eps, id_eps, relu, C, inner, mask_bits=None, running=None) -> None:
    """``mask_bits`` (optional): the 1-bit mask of out > 0 (resnet_kernels/_bits.py), written by the
    same kernel (``bits_in_kernel``), else packed from out afterwards (NCHW with C % 8 != 0).
    ``running`` (optional): ``bn_running_update``'s updates, the first RUNNING_SLOTS (with buffers)
    applied by the same launch (``_fwd_running_kernel``), any more by ``bn_running_update`` after it."""
    N, C, HW = _shape(y, C, inner)
    numel = y.numel()
    if numel == 0:
        if running:
            bn_running_update(running)
        return
    live = [u for u in running if running_flags(*u[2:5])] if running else []
    live, running = live[:RUNNING_SLOTS], live[RUNNING_SLOTS:]  # (the buffers are disjoint: any order)
    id_mode = ID_NONE if identity is None else (ID_BN if id_mean is not None else ID_RAW)
    layout = _layout(inner, HW)
    cfg = _elementwise_config(N, C, HW, layout, y.element_size(), **_fwd_load(id_mode))
    bits_here = mask_bits is not None and bits_in_kernel(C, layout)
    if bits_here:
        cfg = _bits_config(cfg, C, cfg["R"], cfg["S_V"] * cfg["VEC"])
    e3 = _parts(eps)
    ie3 = _parts(id_eps if id_eps is not None else 0.0)
    d = y  # stands in for absent operands; never dereferenced (their flags are False)

    def opt(t):
        return t if t is not None else d

    args = (y, mean, var, opt(weight), opt(bias), opt(identity),
            opt(id_mean if id_mode == ID_BN else None), opt(id_var if id_mode == ID_BN else None),
            opt(id_weight if id_mode == ID_BN else None), opt(id_bias if id_mode == ID_BN else None), out,
            mask_bits if bits_here else out, *e3, *ie3, cfg["R"], cfg["S_V"], C)
    kw = dict(MODE=cfg["MODE"], VEC=cfg["VEC"], BLOCK_R=cfg["BLOCK_R"], BLOCK_S=cfg["BLOCK_S"],
              HAS_W=weight is not None, HAS_B=bias is not None, ID_MODE=id_mode,
              HAS_IW=id_mode == ID_BN and id_weight is not None, HAS_IB=id_mode == ID_BN and id_bias is not None,
              RELU=bool(relu), IS64=y.dtype == torch.float64, INT64=numel > _INT32_MAX, BITS=bits_here,
              num_warps=cfg["num_warps"])
    with _on_device(y):
        if live:
            rargs, flags = _running_args(live, mean)
            _fwd_running_kernel[cfg["grid"]](*args, *rargs, RUN_BLOCK=_run_block(live), F0=flags[0], F1=flags[1],
                                             F2=flags[2], F3=flags[3], **kw)
        else:
            _fwd_kernel[cfg["grid"]](*args, **kw)
        if mask_bits is not None and not bits_here:
            pack_bits(out, out=mask_bits)
    if running:
        bn_running_update(running)


def _reduce_finalize(grad_out, out, y, mean, var, weight, identity, id_mean, id_var, id_weight, grad_weight,
                     grad_bias, grad_id_weight, grad_id_bias, coef, id_coef, need_g, need_d, need_i, eps, id_eps,
                     relu, N, C, HW, layout) -> None:
    """The backward's per-channel half, ONE launch: ``_reduce_cols_kernel``/``_reduce_planes_kernel``
    (partial sums of g (need_g), g * (y - mean) (need_d), g * (identity - id_mean) (need_i)), whose
    last-arriving program per channel block runs the finalize (``_finalize_block``): the parameter
    gradients given (not None) and the coefficient rows (A, B, K) of y's BN into ``coef`` and of the
    identity's into ``id_coef`` ((3, C) acc views, or None). The arrival counters are the shared
    all-zero buffer of ``_common.arrival_counters`` (dropped if the launch raises)."""
    numel = grad_out.numel()
    is64 = grad_out.dtype == torch.float64
    acc = torch.float64 if is64 else torch.float32
    dev = grad_out.device
    dummy = grad_out

    def opt(t):
        return t if t is not None else dummy

    rc = _reduce_config(N, C, HW, layout, grad_out.element_size(), dev)
    P = rc["P"]
    kinds = [k for k, need in (("g", need_g), ("d", need_d), ("i", need_i)) if need]
    # every (P, C) row is written by exactly one program (poisoned in tests like outputs)
    part = _alloc.empty((len(kinds), P, C), dtype=acc, device=dev)
    pg, pd, pi = (part[kinds.index(k)] if k in kinds else dummy for k in ("g", "d", "i"))
    cols = rc["kind"] == "cols"
    counters, key = arrival_counters(dev, rc["grid"][1] if cols else C)
    block_c = rc["BLOCK_C"] if cols else 1
    ptrs = (grad_out, opt(out if relu else None), opt(y if need_d else None), mean,
            opt(identity if need_i else None), opt(id_mean if need_i else None), pg, pd, pi,
            var, opt(weight), opt(id_var if need_i else None), opt(id_weight if need_i else None),
            opt(grad_weight), opt(grad_bias), opt(grad_id_weight), opt(grad_id_bias), opt(coef), opt(id_coef), counters,
            *_parts(eps), *_parts(id_eps if id_eps is not None else 0.0), *_parts(C / numel))
    flags = dict(RELU=bool(relu), NEED_G=need_g, NEED_D=need_d, NEED_I=need_i, IS64=is64, INT64=numel > _INT32_MAX,
                 FIN_BLOCK_P=_finalize_rows(P, block_c), HAS_W=weight is not None,
                 HAS_IW=need_i and id_weight is not None, W_GW=grad_weight is not None, W_GB=grad_bias is not None,
                 W_GIW=grad_id_weight is not None, W_GIB=grad_id_bias is not None, COEF_Y=coef is not None,
                 COEF_I=id_coef is not None)
    if relu and is_bits(out):
        flags["MASK_BITS"] = True
    try:
        if cols:
            _reduce_cols_kernel[rc["grid"]](*ptrs, rc["M"], rc["C_V"], rc["TILES"], VEC=rc["VEC"],
                                            BLOCK_R=rc["BLOCK_R"], BLOCK_C=rc["BLOCK_C"],
                                            num_warps=rc["num_warps"], **flags)
        else:
            _reduce_planes_kernel[rc["grid"]](*ptrs, N, C, rc["HW_V"], rc["N_TILES"], rc["HW_TILES"],
                                              VEC=rc["VEC"], BLOCK_N=rc["BLOCK_N"], BLOCK_HW=rc["BLOCK_HW"],
                                              num_warps=rc["num_warps"], **flags)
    except BaseException:
        drop_arrival_counters(key)
        raise


def batch_norm_act_backward(grad_out, out, y, mean, var, weight, identity, id_mean, id_var, id_weight,
                            grad_y, grad_identity, grad_weight, grad_bias, grad_id_weight, grad_id_bias,
                            eps, id_eps, relu, C, inner) -> None:
    N, C, HW = _shape(grad_out, C, inner)
    numel = grad_out.numel()
    id_bn = identity is not None and id_mean is not None
    if identity is None:
        grad_identity = None
    if not id_bn:  # like the reference: the identity's parameter gradients exist only with its BN
        grad_id_weight = grad_id_bias = None
    need_g = grad_y is not None or grad_bias is not None or (
        id_bn and (grad_identity is not None or grad_id_bias is not None))
    need_d = grad_y is not None or grad_weight is not None
    need_i = id_bn and (grad_identity is not None or grad_id_weight is not None)
    if numel == 0:  # not reached through the op layer (it returns early for empty batches)
        for t in (grad_weight, grad_bias, grad_id_weight, grad_id_bias):
            if t is not None:
                t.zero_()
        return
    layout = _layout(inner, HW)
    is64 = grad_out.dtype == torch.float64
    dummy = grad_out

    def opt(t):
        return t if t is not None else dummy

    coef_y = grad_y is not None
    coef_i = id_bn and grad_identity is not None
    coef = None
    with _on_device(grad_out):
        if need_g or need_d or need_i:
            if coef_y or coef_i:
                coef = _alloc.empty((N_COEF, C), dtype=torch.float64 if is64 else torch.float32,
                                    device=grad_out.device)
            _reduce_finalize(grad_out, out, y, mean, var, weight, identity, id_mean, id_var, id_weight, grad_weight,
                             grad_bias, grad_id_weight, grad_id_bias, coef[:3] if coef_y else None,
                             coef[3:] if coef_i else None, need_g, need_d, need_i, eps, id_eps, relu, N, C, HW,
                             layout)
        if grad_y is not None or grad_identity is not None:
            gi_mode = ID_NONE if grad_identity is None else (ID_BN if id_bn else ID_RAW)
            cfg = _elementwise_config(N, C, HW, layout, grad_out.element_size(),
                                      **_apply_load(bool(relu), coef_y, gi_mode))
            _apply_kernel[cfg["grid"]](
                grad_out, opt(out if relu else None), opt(y if coef_y else None), opt(mean if coef_y else None),
                opt(identity if coef_i else None), opt(id_mean if coef_i else None), opt(coef), opt(grad_y),
                opt(grad_identity), cfg["R"], cfg["S_V"], C,
                MODE=cfg["MODE"], VEC=cfg["VEC"], BLOCK_R=cfg["BLOCK_R"], BLOCK_S=cfg["BLOCK_S"], RELU=bool(relu),
                NEED_GY=coef_y, GI_MODE=gi_mode, IS64=is64, INT64=numel > _INT32_MAX,
                num_warps=cfg["num_warps"])


def batch_norm_act_coef(grad_out, out, y, mean, var, weight, identity, id_mean, id_var, id_weight, coef, id_coef,
                        grad_weight, grad_bias, grad_id_weight, grad_id_bias, eps, id_eps, relu, C, inner) -> None:
    """The reduce + finalize half of ``batch_norm_act_backward`` (2 launches): coef (3, C) = rows
    (A, B, K) of y's BN, id_coef (3, C) those of the identity's (given iff id_mean is), the
    parameter gradients given; nothing elementwise is written."""
    N, C, HW = _shape(grad_out, C, inner)
    if grad_out.numel() == 0:  # not reached through the op layer (it returns early for empty batches)
        raise ValueError("batch_norm_act_coef launcher: empty batch (the op layer handles it)")
    id_bn = identity is not None and id_mean is not None
    if not id_bn:
        id_coef = grad_id_weight = grad_id_bias = None
    need_i = id_bn and (id_coef is not None or grad_id_weight is not None)
    with _on_device(grad_out):
        _reduce_finalize(grad_out, out, y, mean, var, weight, identity, id_mean, id_var, id_weight, grad_weight,
                         grad_bias, grad_id_weight, grad_id_bias, coef, id_coef, True, True, need_i, eps, id_eps,
                         relu, N, C, HW, _layout(inner, HW))


def running_flags(running_mean, running_var, num_batches_tracked) -> int:
    """The constexpr slot flags of _running_kernel for one BatchNorm's buffers (0: nothing to do)."""
    flags = 0
    if running_mean is not None:
        flags |= RUN_RM | (RUN_RM64 if running_mean.dtype == torch.float64 else 0)
    if running_var is not None:
        flags |= RUN_RV | (RUN_RV64 if running_var.dtype == torch.float64 else 0)
    if num_batches_tracked is not None:
        flags |= RUN_NBT
    return flags


def bn_running_update(updates) -> None:
    """``updates``: (mean, var, running_mean, running_var, num_batches_tracked, factor, unbias) per
    BatchNorm (resnet_kernels/ops/batch_norm.py ``RunningUpdate``), no buffer in two of them: one
    ``_running_kernel`` launch per RUNNING_SLOTS BatchNorms."""
    live = [u for u in updates if running_flags(*u[2:5])]
    for i in range(0, len(live), RUNNING_SLOTS):
        group = live[i:i + RUNNING_SLOTS]
        cfg = _running_config(max(max(u[0].numel() for u in group), 1))
        dummy = group[0][0]
        args, flags = _running_args(group, dummy)
        with _on_device(dummy):
            _running_kernel[cfg["grid"]](*args, BLOCK=cfg["BLOCK"], F0=flags[0], F1=flags[1], F2=flags[2],
                                         F3=flags[3], num_warps=cfg["num_warps"])


def _running_args(group, dummy) -> tuple:
    """(the runtime arguments of RUNNING_SLOTS slots, their flags) for up to RUNNING_SLOTS updates
    with buffers (``_running_kernel``'s, also ``_fwd_running_kernel``'s): unused slots get ``dummy``
    pointers and flags 0."""
    args, flags = [], []
    for s in range(RUNNING_SLOTS):
        if s < len(group):
            mean, var, rm, rv, nbt, factor, unbias = group[s]
            factor = float(factor)
            args += [mean, var] + [t if t is not None else dummy for t in (rm, rv, nbt)]
            args += [*_parts(1.0 - factor), *_parts(factor), *_parts(factor * float(unbias)), mean.numel()]
            flags.append(running_flags(rm, rv, nbt))
        else:
            args += [dummy] * 5 + [0.0] * 9 + [0]
            flags.append(0)
    return args, flags


def _run_block(group) -> int:
    """_fwd_running_kernel's chunk of columns per program and slot."""
    return min(triton.next_power_of_2(max(max(u[0].numel() for u in group), 1)), 512)
