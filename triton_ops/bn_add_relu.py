"""Triton kernels for the fused residual epilogue (see ``resnet_kernels/ops/bn_add_relu.py``):

    forward:  out = relu(x * scale[c] + shift[c] + identity * id_scale[c] + id_shift[c])
    backward: g = grad_out * (out > 0)
              grad_x = g * scale[c]            grad_identity = g * id_scale[c]
              grad_scale = sum(g * x)          grad_shift = sum(g)      grad_id_scale = sum(g * identity)

Every dense tensor of one call shares one layout: NCHW-contiguous (channel of flat element i is
(i // inner) % C with inner = H*W) or channels_last (inner = 1, channel = i % C). Per-channel
tensors are float32 (float64 for float64 activations), contiguous, or None (absent: scale 1 /
shift 0 / no residual); absent operands and ``relu`` are compile-time flags. All arithmetic is
done in float32 (float64 for float64 activations) and rounded once when stored.

Kernels (each file-level ``@triton.jit`` function is listed in ``KERNELS`` for the AOT tests):

* ``_fwd_kernel`` -- forward, three tilings selected by the constexpr ``MODE``:
  ``MODE_PLANES`` (NCHW; 2-D tile [planes, H*W], the per-channel values are one per row),
  ``MODE_COLS`` (channels_last; 2-D tile [pixels, channels], per-channel values are one vector
  per program) and ``MODE_FLAT`` (1-D blocks, channel = (i // inner) % C gathered per element;
  used when the contiguous extent is not a multiple of the 16-byte vector width, e.g. NCHW with
  7x7 planes or channels_last with C = 3, where a 2-D tile could not use vector loads).
* ``_bwd_cols_kernel`` (channels_last) and ``_bwd_planes_kernel`` (NCHW) -- elementwise input
  gradients plus per-program partial per-channel sums written to a (P, C) buffer (no atomics).
* ``_sum_partials_kernel`` -- reduces the (P, C) partial sums in a fixed order: the per-channel
  gradients are bitwise deterministic for a given shape and device.

Block sizes come from heuristics (no autotuning, nothing to benchmark at first call). Under the
Triton interpreter (``INTERPRET``) a single small configuration is used.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from .. import _alloc
from ._common import INTERPRET, cast_for_store

MODE_FLAT = 0
MODE_PLANES = 1
MODE_COLS = 2

_INT32_MAX = 2 ** 31 - 1


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _fwd_kernel(x_ptr, scale_ptr, shift_ptr, id_ptr, id_scale_ptr, id_shift_ptr, out_ptr,
                R, S_V, C, inner, numel,
                MODE: tl.constexpr, VEC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
                HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_ID: tl.constexpr,
                HAS_ID_SCALE: tl.constexpr, HAS_ID_SHIFT: tl.constexpr, RELU: tl.constexpr,
                IS64: tl.constexpr, INNER_ONE: tl.constexpr, INT64: tl.constexpr):
    # MODE_FLAT: 1-D block of BLOCK_S elements of the flat tensor (numel of them).
    # MODE_PLANES / MODE_COLS: the tensor is an [R, S] matrix (S = S_V * VEC, so the compiler
    # knows rows start on a VEC boundary); the program owns the tile [BLOCK_R, BLOCK_S] at
    # (program_id(0), program_id(1)). Channel = row % C (planes) or column (cols).
    if IS64:
        acc_t = tl.float64
    else:
        acc_t = tl.float32
    if MODE == 0:
        pid = tl.program_id(0)
        if INT64:
            start = pid.to(tl.int64) * BLOCK_S
        else:
            start = pid * BLOCK_S
        offs = start + tl.arange(0, BLOCK_S)
        mask = offs < numel
        if INNER_ONE:
            ch = offs % C
        else:
            ch = (offs // inner) % C
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_t)
        if HAS_SCALE:
            x = x * tl.load(scale_ptr + ch, mask=mask, other=0.0)
        if HAS_SHIFT:
            x = x + tl.load(shift_ptr + ch, mask=mask, other=0.0)
        if HAS_ID:
            r = tl.load(id_ptr + offs, mask=mask, other=0.0).to(acc_t)
            if HAS_ID_SCALE:
                r = r * tl.load(id_scale_ptr + ch, mask=mask, other=0.0)
            if HAS_ID_SHIFT:
                r = r + tl.load(id_shift_ptr + ch, mask=mask, other=0.0)
            x = x + r
    else:
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
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_t)
        # per-channel vectors broadcast along the tile's other axis (inline: nested jit calls
        # are slow under the interpreter)
        if HAS_SCALE:
            v = tl.load(scale_ptr + ch, mask=chmask, other=0.0)
            if MODE == 1:
                x = x * v[:, None]
            else:
                x = x * v[None, :]
        if HAS_SHIFT:
            v = tl.load(shift_ptr + ch, mask=chmask, other=0.0)
            if MODE == 1:
                x = x + v[:, None]
            else:
                x = x + v[None, :]
        if HAS_ID:
            r = tl.load(id_ptr + offs, mask=mask, other=0.0).to(acc_t)
            if HAS_ID_SCALE:
                v = tl.load(id_scale_ptr + ch, mask=chmask, other=0.0)
                if MODE == 1:
                    r = r * v[:, None]
                else:
                    r = r * v[None, :]
            if HAS_ID_SHIFT:
                v = tl.load(id_shift_ptr + ch, mask=chmask, other=0.0)
                if MODE == 1:
                    r = r + v[:, None]
                else:
                    r = r + v[None, :]
            x = x + r
    if RELU:
        # where(y < 0, 0, y), not maximum: NaN propagates like torch.relu.
        x = tl.where(x < 0, 0.0, x)
    tl.store(out_ptr + offs, cast_for_store(x, out_ptr), mask=mask)


@triton.jit
def _bwd_cols_kernel(go_ptr, out_ptr, x_ptr, scale_ptr, id_ptr, id_scale_ptr,
                     gx_ptr, gi_ptr, ps_ptr, pb_ptr, pis_ptr,
                     M, C_V, TILES,
                     VEC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                     RELU: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_ID_SCALE: tl.constexpr,
                     NEED_GX: tl.constexpr, NEED_GI: tl.constexpr, NEED_GS: tl.constexpr,
                     NEED_GB: tl.constexpr, NEED_GIS: tl.constexpr, IS64: tl.constexpr, INT64: tl.constexpr):
    # channels_last: an [M, C] matrix (M = N*H*W pixels). Program (pr, pc) owns the channel block
    # pc and the TILES consecutive row tiles starting at pr * TILES; it writes its column sums to
    # row pr of the (P, C) partial buffers.
    pid_r = tl.program_id(0)
    C = C_V * VEC
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    if IS64:
        acc_t = tl.float64
    else:
        acc_t = tl.float32
    if HAS_SCALE:
        sc = tl.load(scale_ptr + cols, mask=cmask, other=0.0)[None, :]
    if HAS_ID_SCALE:
        isc = tl.load(id_scale_ptr + cols, mask=cmask, other=0.0)[None, :]
    acc_s = tl.zeros([BLOCK_R, BLOCK_C], dtype=acc_t)
    acc_b = tl.zeros([BLOCK_R, BLOCK_C], dtype=acc_t)
    acc_is = tl.zeros([BLOCK_R, BLOCK_C], dtype=acc_t)
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
            o = tl.load(out_ptr + offs, mask=mask, other=0.0)
            g = tl.where(o > 0, g, 0.0)
        if NEED_GX:
            if HAS_SCALE:
                tl.store(gx_ptr + offs, cast_for_store(g * sc, gx_ptr), mask=mask)
            else:
                tl.store(gx_ptr + offs, cast_for_store(g, gx_ptr), mask=mask)
        if NEED_GI:
            if HAS_ID_SCALE:
                tl.store(gi_ptr + offs, cast_for_store(g * isc, gi_ptr), mask=mask)
            else:
                tl.store(gi_ptr + offs, cast_for_store(g, gi_ptr), mask=mask)
        if NEED_GS:
            acc_s += g * tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_t)
        if NEED_GB:
            acc_b += g
        if NEED_GIS:
            acc_is += g * tl.load(id_ptr + offs, mask=mask, other=0.0).to(acc_t)
    poffs = pid_r * C + cols
    if NEED_GS:
        tl.store(ps_ptr + poffs, tl.sum(acc_s, axis=0), mask=cmask)
    if NEED_GB:
        tl.store(pb_ptr + poffs, tl.sum(acc_b, axis=0), mask=cmask)
    if NEED_GIS:
        tl.store(pis_ptr + poffs, tl.sum(acc_is, axis=0), mask=cmask)


@triton.jit
def _bwd_planes_kernel(go_ptr, out_ptr, x_ptr, scale_ptr, id_ptr, id_scale_ptr,
                       gx_ptr, gi_ptr, ps_ptr, pb_ptr, pis_ptr,
                       N, C, HW_V, N_TILES, HW_TILES,
                       VEC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HW: tl.constexpr,
                       RELU: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_ID_SCALE: tl.constexpr,
                       NEED_GX: tl.constexpr, NEED_GI: tl.constexpr, NEED_GS: tl.constexpr,
                       NEED_GB: tl.constexpr, NEED_GIS: tl.constexpr, IS64: tl.constexpr, INT64: tl.constexpr):
    # NCHW: program (c, nb, hb) owns channel c, the N_TILES consecutive batch tiles starting at
    # nb * N_TILES and the HW_TILES consecutive H*W tiles starting at hb * HW_TILES; tile
    # [BLOCK_N, BLOCK_HW] reads BLOCK_N planes (n, c). The per-channel values are scalars. The
    # program's sums go to row nb * num_programs(2) + hb of the (P, C) partial buffers.
    c = tl.program_id(0)
    nb = tl.program_id(1)
    hb = tl.program_id(2)
    HW = HW_V * VEC
    if IS64:
        acc_t = tl.float64
    else:
        acc_t = tl.float32
    if HAS_SCALE:
        sc = tl.load(scale_ptr + c)
    if HAS_ID_SCALE:
        isc = tl.load(id_scale_ptr + c)
    acc_s = tl.zeros([BLOCK_N, BLOCK_HW], dtype=acc_t)
    acc_b = tl.zeros([BLOCK_N, BLOCK_HW], dtype=acc_t)
    acc_is = tl.zeros([BLOCK_N, BLOCK_HW], dtype=acc_t)
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
                o = tl.load(out_ptr + offs, mask=mask, other=0.0)
                g = tl.where(o > 0, g, 0.0)
            if NEED_GX:
                if HAS_SCALE:
                    tl.store(gx_ptr + offs, cast_for_store(g * sc, gx_ptr), mask=mask)
                else:
                    tl.store(gx_ptr + offs, cast_for_store(g, gx_ptr), mask=mask)
            if NEED_GI:
                if HAS_ID_SCALE:
                    tl.store(gi_ptr + offs, cast_for_store(g * isc, gi_ptr), mask=mask)
                else:
                    tl.store(gi_ptr + offs, cast_for_store(g, gi_ptr), mask=mask)
            if NEED_GS:
                acc_s += g * tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_t)
            if NEED_GB:
                acc_b += g
            if NEED_GIS:
                acc_is += g * tl.load(id_ptr + offs, mask=mask, other=0.0).to(acc_t)
    p = nb * tl.num_programs(2) + hb
    if NEED_GS:
        tl.store(ps_ptr + p * C + c, tl.sum(tl.sum(acc_s, axis=1), axis=0))
    if NEED_GB:
        tl.store(pb_ptr + p * C + c, tl.sum(tl.sum(acc_b, axis=1), axis=0))
    if NEED_GIS:
        tl.store(pis_ptr + p * C + c, tl.sum(tl.sum(acc_is, axis=1), axis=0))


@triton.jit
def _sum_partials_kernel(part_ptr, out0_ptr, out1_ptr, out2_ptr, P, C,
                         BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, IS64: tl.constexpr):
    # part is (K, P, C) contiguous; program (pc, k) writes sum over P of part[k, :, block pc]
    # to out_k, always in the same order (deterministic).
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    k = tl.program_id(1)
    cmask = cols < C
    if IS64:
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    base = part_ptr + k.to(tl.int64) * P * C
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        m = (rows < P)[:, None] & cmask[None, :]
        acc += tl.load(base + rows[:, None] * C + cols[None, :], mask=m, other=0.0)
    s = tl.sum(acc, axis=0)
    if k == 0:
        tl.store(out0_ptr + cols, s, mask=cmask)
    elif k == 1:
        tl.store(out1_ptr + cols, s, mask=cmask)
    else:
        tl.store(out2_ptr + cols, s, mask=cmask)


KERNELS = {
    "_fwd_kernel": _fwd_kernel,
    "_bwd_cols_kernel": _bwd_cols_kernel,
    "_bwd_planes_kernel": _bwd_planes_kernel,
    "_sum_partials_kernel": _sum_partials_kernel,
}


# --------------------------------------------------------------------------------------------
# heuristics
# --------------------------------------------------------------------------------------------
# Elements per program tile. On the GPU: 8 KiB of each streamed input per forward tile (16
# bytes = one vector load per thread and tensor, times 2-4, with 8 warps). With >= 50%
# occupancy that keeps ~100 KiB of loads in flight per SM, several times what HBM latency x
# bandwidth needs, while the register count stays <= 64 (checked by tests/test_triton_aot.py).
# The flat forward tiling gathers the per-channel values per element and the backward keeps
# three accumulators per element: they use half as many elements per tile. Under the
# interpreter: one small configuration (each program costs milliseconds there).
_GPU_TILE_BYTES = 8192
_INTERP_TILE = 1024
# Target number of programs for the backward (partial sums per channel block); the GPU value
# is scaled by the number of SMs.
_INTERP_PROGRAMS = 8


def _vec_width(extent: int, itemsize: int) -> int:
    """Largest power of two <= 16 bytes / itemsize that divides ``extent``."""
    v = max(16 // itemsize, 1)
    while v > 1 and extent % v:
        v //= 2
    return v


def _tile_elems(itemsize: int, interpret: bool) -> int:
    if interpret:
        return _INTERP_TILE
    return max(_GPU_TILE_BYTES // itemsize, 256)


def _num_warps(tile: int, interpret: bool) -> int:
    if interpret:
        return 4
    return 8 if tile >= 2048 else 4


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(device: torch.device, interpret: bool) -> int:
    if interpret or device.type != "cuda":
        return _INTERP_PROGRAMS
    return 8 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _block_for_extent(extent: int, cap: int, lo: int = 512) -> int:
    """Power-of-two block for a contiguous extent: the largest one <= cap whose padded coverage
    of ``extent`` is within 1/16 of the best candidate's, among blocks >= lo (a block never
    goes below ``lo`` elements unless the whole extent is shorter, so each program reads long
    contiguous runs rather than small fragments of many rows)."""
    top = min(triton.next_power_of_2(max(extent, 1)), max(cap, 1))
    lo = min(lo, top)
    cands = []
    b = top
    while b >= lo:
        cands.append(b)
        b //= 2
    best = min(triton.cdiv(extent, b) * b for b in cands)
    for b in cands:  # largest first
        if triton.cdiv(extent, b) * b * 16 <= best * 17:
            return b
    return top


def _forward_config(N: int, C: int, HW: int, layout: str, itemsize: int, interpret: bool = None) -> dict:
    """Tiling for the forward kernel: mode, (R, S) matrix view, block sizes, grid, num_warps.
    ``interpret`` (default: ``INTERPRET``) selects the interpreter's single small configuration."""
    interpret = INTERPRET if interpret is None else interpret
    tile = _tile_elems(itemsize, interpret)
    vmax = max(16 // itemsize, 1)
    numel = N * C * HW
    if layout == "nchw":
        R, S = N * C, HW
    else:
        R, S = N * HW, C
    if S % vmax == 0 and S > 1:
        block_s = _block_for_extent(S, tile)
        block_r = max(1, min(tile // block_s, triton.next_power_of_2(R)))
        mode = MODE_PLANES if layout == "nchw" else MODE_COLS
        grid = (triton.cdiv(R, block_r), triton.cdiv(S, block_s))
        return dict(MODE=mode, R=R, S_V=S // vmax, VEC=vmax, BLOCK_R=block_r, BLOCK_S=block_s, grid=grid,
                    num_warps=_num_warps(block_r * block_s, interpret))
    if not interpret:
        tile = max(tile // 2, 256)
    block = min(tile, triton.next_power_of_2(numel))
    return dict(MODE=MODE_FLAT, R=0, S_V=0, VEC=1, BLOCK_R=1, BLOCK_S=block, grid=(triton.cdiv(numel, block),),
                num_warps=_num_warps(block, interpret))


def _split(total_tiles: int, programs: int) -> tuple[int, int]:
    """(tiles per program, number of programs) covering ``total_tiles`` with about ``programs``."""
    programs = max(1, min(programs, total_tiles))
    per = triton.cdiv(total_tiles, programs)
    return per, triton.cdiv(total_tiles, per)


def _backward_config(N: int, C: int, HW: int, layout: str, itemsize: int, device: torch.device,
                     interpret: bool = None) -> dict:
    """Tiling for the backward kernels ("cols": channels_last, "planes": NCHW)."""
    interpret = INTERPRET if interpret is None else interpret
    # three accumulators live per tile: half the forward tile keeps register use moderate
    tile = _tile_elems(itemsize, interpret)
    if not interpret:
        tile = max(tile // 2, 256)
    target = _target_programs(device, interpret)
    if layout == "nhwc":
        M = N * HW
        vec = _vec_width(C, itemsize)
        block_c = _block_for_extent(C, tile)
        block_r = max(1, min(tile // block_c, triton.next_power_of_2(M)))
        c_blocks = triton.cdiv(C, block_c)
        tiles, r_progs = _split(triton.cdiv(M, block_r), max(1, target // c_blocks))
        return dict(kind="cols", M=M, C_V=C // vec, VEC=vec, BLOCK_R=block_r, BLOCK_C=block_c, TILES=tiles,
                    P=r_progs, grid=(r_progs, c_blocks), num_warps=_num_warps(block_r * block_c, interpret))
    vec = _vec_width(HW, itemsize)
    block_hw = _block_for_extent(HW, tile)
    block_n = max(1, min(tile // block_hw, triton.next_power_of_2(N)))
    per_c = max(1, target // C)
    n_tiles, nb = _split(triton.cdiv(N, block_n), per_c)
    hw_tiles, hb = _split(triton.cdiv(HW, block_hw), max(1, per_c // nb))
    return dict(kind="planes", HW_V=HW // vec, VEC=vec, BLOCK_N=block_n, BLOCK_HW=block_hw, N_TILES=n_tiles,
                HW_TILES=hw_tiles, P=nb * hb, grid=(C, nb, hb), num_warps=_num_warps(block_n * block_hw, interpret))


def _sum_config(P: int, C: int, interpret: bool = None) -> dict:
    interpret = INTERPRET if interpret is None else interpret
    block_c = min(triton.next_power_of_2(C), 128)
    tile = min(_tile_elems(8, interpret), 1024)
    block_p = max(1, min(triton.next_power_of_2(P), tile // block_c))
    return dict(BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4)


def _shape(t: torch.Tensor, C: int, inner: int) -> tuple[int, int, int]:
    """(N, C, H*W) of a dense 4-D tensor with the given channel geometry."""
    N, C_, H, W = t.shape
    if C_ != C or inner not in (1, H * W):
        raise ValueError(f"bn_add_relu launcher: C={C}, inner={inner} do not describe a tensor of shape "
                         f"{tuple(t.shape)}")
    return N, C, H * W


def _on_device(t: torch.Tensor):
    """Launch on the tensor's GPU (triton launches on the current device and stream)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _layout(inner: int, HW: int) -> str:
    # the op layer passes inner = H*W for NCHW and 1 for channels_last; with H*W == 1 both
    # layouts are the same memory order, an [N, C] matrix: use the channels_last tilings
    return "nchw" if (inner == HW and HW != 1) else "nhwc"


# --------------------------------------------------------------------------------------------
# launchers (same names and arguments as resnet_kernels/backends/torch_bn_add_relu.py)
# --------------------------------------------------------------------------------------------
def bn_add_relu_forward(x, scale, shift, identity, id_scale, id_shift, out, relu, C, inner) -> None:
    N, C, HW = _shape(x, C, inner)
    numel = x.numel()
    if numel == 0:
        return
    layout = _layout(inner, HW)
    cfg = _forward_config(N, C, HW, layout, x.element_size())
    dummy = x  # stands in for absent operands; never dereferenced (their flags are False)
    with _on_device(x):
        _fwd_kernel[cfg["grid"]](
            x, scale if scale is not None else dummy, shift if shift is not None else dummy,
            identity if identity is not None else dummy, id_scale if id_scale is not None else dummy,
            id_shift if id_shift is not None else dummy, out,
            cfg["R"], cfg["S_V"], C, max(inner, 1), numel,
            MODE=cfg["MODE"], VEC=cfg["VEC"], BLOCK_R=cfg["BLOCK_R"], BLOCK_S=cfg["BLOCK_S"],
            HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, HAS_ID=identity is not None,
            HAS_ID_SCALE=id_scale is not None, HAS_ID_SHIFT=id_shift is not None, RELU=bool(relu),
            IS64=x.dtype == torch.float64, INNER_ONE=inner == 1, INT64=numel > _INT32_MAX,
            num_warps=cfg["num_warps"])


def bn_add_relu_backward(grad_out, out, x, scale, identity, id_scale, grad_x, grad_identity, grad_scale,
                         grad_shift, grad_id_scale, relu, C, inner) -> None:
    N, C, HW = _shape(grad_out, C, inner)
    numel = grad_out.numel()
    if numel == 0:
        for v in (grad_scale, grad_shift, grad_id_scale):
            if v is not None:
                v.zero_()
        return
    layout = _layout(inner, HW)
    is64 = grad_out.dtype == torch.float64
    acc = torch.float64 if is64 else torch.float32
    cfg = _backward_config(N, C, HW, layout, grad_out.element_size(), grad_out.device)
    sums = [t for t in (grad_scale, grad_shift, grad_id_scale) if t is not None]
    P = cfg["P"]
    # partial sums: every row is written by exactly one program (poisoned in tests, like outputs)
    part = _alloc.empty((len(sums), P, C), dtype=acc, device=grad_out.device) if sums else None
    slot = iter(range(len(sums)))
    ps = part[next(slot)] if grad_scale is not None else None
    pb = part[next(slot)] if grad_shift is not None else None
    pis = part[next(slot)] if grad_id_scale is not None else None
    d = grad_out
    ptrs = (grad_out, out if out is not None else d, x if x is not None else d, scale if scale is not None else d,
            identity if identity is not None else d, id_scale if id_scale is not None else d,
            grad_x if grad_x is not None else d, grad_identity if grad_identity is not None else d,
            ps if ps is not None else d, pb if pb is not None else d, pis if pis is not None else d)
    flags = dict(RELU=bool(relu), HAS_SCALE=scale is not None, HAS_ID_SCALE=id_scale is not None,
                 NEED_GX=grad_x is not None, NEED_GI=grad_identity is not None, NEED_GS=grad_scale is not None,
                 NEED_GB=grad_shift is not None, NEED_GIS=grad_id_scale is not None, IS64=is64,
                 INT64=numel > _INT32_MAX)
    with _on_device(grad_out):
        if cfg["kind"] == "cols":
            _bwd_cols_kernel[cfg["grid"]](*ptrs, cfg["M"], cfg["C_V"], cfg["TILES"], VEC=cfg["VEC"],
                                          BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"],
                                          **flags)
        else:
            _bwd_planes_kernel[cfg["grid"]](*ptrs, N, C, cfg["HW_V"], cfg["N_TILES"], cfg["HW_TILES"], VEC=cfg["VEC"],
                                            BLOCK_N=cfg["BLOCK_N"], BLOCK_HW=cfg["BLOCK_HW"],
                                            num_warps=cfg["num_warps"], **flags)
        if sums:
            outs = sums + [sums[0]] * (3 - len(sums))
            sc = _sum_config(P, C)
            _sum_partials_kernel[(triton.cdiv(C, sc["BLOCK_C"]), len(sums))](
                part, outs[0], outs[1], outs[2], P, C, BLOCK_P=sc["BLOCK_P"], BLOCK_C=sc["BLOCK_C"], IS64=is64,
                num_warps=sc["num_warps"])
