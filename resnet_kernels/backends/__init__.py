"""Every implementation of every fused op, declared once (see ``resnet_kernels/_registry.py``).

A launcher module per op per backend holds the code (``<backend>_<op>.py`` here, or
``triton_ops/<op>.py``); launchers write into preallocated outputs (unless declared
``returns_output``) and assume the op layer validated everything (shapes, dtypes, layouts,
devices, non-empty) and that ``supports`` accepted the call.

Adding an implementation: its launcher file(s) and one ``register`` call below.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .. import _ext, _weight_cache
from .._bits import is_bits, pack_cost, unpack_cost
from . import cuda_common
from .._backend import triton_import_error, triton_interpreting
from .._registry import Backend, Impl, register, register_backend

_P = "resnet_kernels.backends."
_TRITON = "resnet_kernels.triton_ops."


# --------------------------------------------------------------------------------------------
# where each backend can run
# --------------------------------------------------------------------------------------------
def _anywhere(device: Optional[torch.device]) -> Optional[str]:
    return None


def _cuda_available(device: Optional[torch.device]) -> Optional[str]:
    if cuda_common.host_runner_active() and (device is None or device.type == "cpu"):
        return None  # tests: csrc's kernels compiled for the CPU stand in for _C (cuda_common.host_runner)
    if _ext.get_C() is None:
        return _ext.C_error() or "resnet_kernels._C unavailable"
    if device is None:
        return None if torch.cuda.is_available() else "no CUDA GPU is visible to torch"
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors, got {device.type} tensors"
    return None


def _triton_available(device: Optional[torch.device]) -> Optional[str]:
    err = triton_import_error()
    if err:
        return err
    if device is None:
        if torch.cuda.is_available() or triton_interpreting():
            return None
        return "no CUDA GPU is visible to torch (set TRITON_INTERPRET=1 to run the Triton interpreter on the CPU)"
    if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
        return None
    return (f"the triton backend runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1, set before "
            f"import), got {device.type} tensors")


register_backend(Backend("cuda", "hand-written CUDA kernels (csrc/, resnet_kernels._C)", _cuda_available))
register_backend(Backend("triton", "Triton kernels (triton_ops/)", _triton_available))
register_backend(Backend(
    "aten", "PyTorch's own kernels: cuDNN convolutions on CUDA (oneDNN on CPU), native elementwise and "
            "reduction ops; the floor 'auto' falls back to, and what it uses on CPU tensors", _anywhere,
    train_unit="resnet_kernels.backends.aten_unit"))
register_backend(Backend(
    "torch", "the plain-PyTorch reference decomposition in the accumulation dtype (float64 capable): the "
             "test oracle", _anywhere, benchmark=False))
register_backend(Backend(
    "cutlass", "CUTLASS 3.x sm_90a convolutions for Hopper (H100/H200: TMA im2col, wgmma; csrc/sm90/, built into "
               "resnet_kernels._C when CUTLASS is found); other ops resolve as 'auto'", lambda d: _cutlass_available(d),
    # a per-layer-shape implementation (no stem, no fp32): whole-model runs use it through 'auto', so it
    # is not in bench's default set (an explicit backend='cutlass' model run would stop at the stem)
    fallback_auto=True, benchmark=False))


# --------------------------------------------------------------------------------------------
# what each implementation supports
# --------------------------------------------------------------------------------------------
def conv_kernel_supports(call) -> Optional[str]:
    """The configurations the cuda/triton convolution kernels implement."""
    why = []
    if call.x.dtype == torch.float64:
        why.append("float64 (the conv kernels compute float32, float16 and bfloat16; float64 runs on the aten "
                   "and torch implementations)")
    if call.groups != 1:
        why.append(f"groups={call.groups} (the conv kernels implement groups=1)")
    if tuple(call.dilation) != (1, 1):
        why.append(f"dilation={tuple(call.dilation)} (the conv kernels implement dilation 1)")
    return "; ".join(why) or None


def _sm90_cap(device: torch.device):
    return torch.cuda.get_device_capability(device)


def _cutlass_available(device: Optional[torch.device]) -> Optional[str]:
    """The CUTLASS kernels: _C built with them (sm90_kernels) and a compute-capability 9.0 GPU (the
    sm_90a cubin runs nowhere else). The host runner cannot run them (CUTLASS needs real TMA/wgmma)."""
    C = _ext.get_C()
    if C is None:
        return _ext.C_error() or "resnet_kernels._C unavailable"
    if not getattr(C, "sm90_kernels", False):
        return ("resnet_kernels._C was built without the CUTLASS sm_90a kernels: "
                + (getattr(C, "sm90_note", "") or "a build from before they existed"))
    if device is None:
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible to torch"
        if not any(_sm90_cap(torch.device("cuda", i)) == (9, 0) for i in range(torch.cuda.device_count())):
            return "no compute capability 9.0 GPU (H100/H200/GH200) is visible: the sm_90a kernels run only there"
        return None
    if device.type != "cuda":
        return f"the cutlass backend runs on CUDA tensors, got {device.type} tensors"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    cap = _sm90_cap(device)
    if cap != (9, 0):
        return (f"{device} is compute capability {cap[0]}.{cap[1]}: the sm_90a kernels run on 9.0 "
                f"(H100/H200/GH200) only")
    return None


_INT32_MAX = 2**31 - 1


def _tma_conv_reasons(stride, padding, KH: int, KW: int, x_numel: int, out_numel: int) -> list:
    """What the CUTLASS sm_90a convolutions' TMA im2col and 32-bit extents refuse (the forward's and
    the backward's ``supports`` alike): strides above 8, padding outside the im2col corner limits,
    tensors of more than 2^31 - 1 elements."""
    why = []
    (sh, sw), (ph, pw) = stride, padding
    if sh > 8 or sw > 8:
        why.append(f"stride={tuple(stride)} (TMA im2col takes strides <= 8)")
    if max(ph, pw) > 128 or min(ph - (KH - 1), pw - (KW - 1)) < -128 or max(ph - (KH - 1), pw - (KW - 1)) > 127 \
            or max(KH, KW) > 255:
        why.append(f"padding={tuple(padding)} with kernel ({KH}, {KW}) is outside the TMA im2col corner "
                   f"limits (padding <= 128, padding - (kernel - 1) in [-128, 127])")
    if x_numel > _INT32_MAX or out_numel > _INT32_MAX:
        why.append("a tensor of more than 2^31 - 1 elements (32-bit CUTLASS extents)")
    return why


def cutlass_supports(call) -> Optional[str]:
    """The calls the CUTLASS sm_90a convolution (csrc/sm90/conv2d_sm90.h) implements: every reason
    it refuses this one, joined (None: supported). The device itself is checked by the backend's
    ``available`` (and here too for a CUDA tensor, so the reason names it)."""
    why = []
    x, w = call.x, call.weight
    N, Cin, H, W = x.shape
    Cout, _, KH, KW = w.shape
    OH, OW = call.shape[2], call.shape[3]
    if x.device.type == "cuda" and _sm90_cap(x.device) != (9, 0):
        cap = _sm90_cap(x.device)
        why.append(f"{x.device} is compute capability {cap[0]}.{cap[1]} (the sm_90a kernels run on 9.0 only)")
    if x.dtype == torch.float32:
        if not call.allow_tf32:
            why.append("float32 with TF32 disabled (torch.backends.cudnn.allow_tf32 is False): the sm_90a kernels "
                       "compute float32 in TF32")
    elif x.dtype not in (torch.bfloat16, torch.float16):
        why.append(f"dtype {str(x.dtype).replace('torch.', '')} (the sm_90a kernels take bfloat16, float16 and "
                   f"float32 as TF32)")
    if call.groups != 1:
        why.append(f"groups={call.groups} (the sm_90a kernels implement groups=1)")
    if tuple(call.dilation) != (1, 1):
        why.append(f"dilation={tuple(call.dilation)} (the sm_90a kernels implement dilation 1)")
    out_nhwc = call.layout == "nhwc" or (OH == 1 and OW == 1)  # the op allocates out in call.layout
    if not x.is_contiguous(memory_format=torch.channels_last) or not out_nhwc:
        why.append("x is not channels_last (NHWC) contiguous (the sm_90a kernels read NHWC activations through "
                   "TMA and write NHWC outputs)")
    if Cin % 8 != 0 or Cin == 0:
        # 16-byte TMA rows need 8 channels of 16 bits (4 of float32, whose packed filter rows are
        # however padded to a multiple of 8 columns: cuda_conv2d.pack_weight)
        why.append(f"Cin={Cin} is not a positive multiple of 8 (16-byte TMA rows, unpadded packed filter rows)")
    vec = 4 if x.dtype == torch.float32 else 8  # 16 bytes of channels (float64 is refused above)
    if Cout % vec != 0:
        why.append(f"Cout={Cout} is not a multiple of {vec} (16-byte TMA rows)")
    why += _tma_conv_reasons(call.stride, call.padding, KH, KW, N * H * W * Cin, N * OH * OW * Cout)
    if x.device.type == "cuda":
        if x.data_ptr() % 16 != 0:
            why.append("x's data pointer is not 16-byte aligned (TMA)")
        r = call.residual
        if r is not None and (r.data_ptr() % 16 != 0 or not r.is_contiguous(memory_format=torch.channels_last)):
            why.append("the residual is not a 16-byte aligned channels_last contiguous tensor (TMA)")
    return "; ".join(why) or None


# --------------------------------------------------------------------------------------------
# cost declarations: what one call launches on a GPU (kernels, HBM bytes read + written),
# from the call's shapes alone, for the accountant (resnet_kernels/count.py, docs/COUNT.md).
# Bytes are compulsory traffic: each tensor a kernel reads or writes counted once per kernel
# (re-reads through L2 misses are not modelled); per-tile partial-sum scratch is counted.
# --------------------------------------------------------------------------------------------
def nbytes(t) -> int:
    """Bytes of the memory a tensor addresses (broadcast / stride-0 dimensions counted once; a 1-bit
    ReLU mask, resnet_kernels/_bits.py, is a uint8 tensor: its numel)."""
    if t is None or t.numel() == 0:
        return 0
    span = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
    return span * t.element_size()


def _act_bytes(shape, dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * (torch.empty((), dtype=dtype).element_size())


def _vecs(*ts) -> int:
    return sum(nbytes(t) for t in ts)


def _fused_bar_cost(call):
    """The one-pass bn_add_relu kernel (cuda, triton): read x (+identity) and the per-channel
    vectors, write out."""
    return 1, 2 * nbytes(call.x) + nbytes(call.identity) + _vecs(call.scale, call.shift, call.id_scale, call.id_shift)


def _aten_bar_cost(call):
    """aten_bn_add_relu.bn_add_relu_forward, pass by pass."""
    x, acc = call.x, _acc(call.x.dtype)
    a = nbytes(x)
    a_acc = _act_bytes(x.shape, acc)
    vec = _vecs(call.scale, call.shift, call.id_scale, call.id_shift)
    ident = nbytes(call.identity)
    if call.scale is not None and call.shift is not None and (call.identity is None or x.dtype == acc):
        # eval batch_norm (read x, write y in x's dtype, or acc when an identity follows: x.dtype == acc then)
        launches, b = 1, 2 * a
        if call.identity is not None:
            launches, b = launches + 1, b + 2 * a + ident  # addcmul_/add_
            if call.id_shift is not None:
                launches, b = launches + 1, b + 2 * a
        if call.relu:
            launches, b = launches + 1, b + 2 * a
        return launches, b + vec
    launches, b = 1, a + a_acc  # addcmul/mul/add/copy into the acc temporary
    if call.identity is not None:
        launches, b = launches + 1, b + 2 * a_acc + ident
        if call.id_shift is not None:
            launches, b = launches + 1, b + 2 * a_acc
    if call.relu:
        launches, b = launches + 1, b + 2 * a_acc
    if acc != x.dtype:
        launches, b = launches + 1, b + a_acc + a  # rounded to x's dtype
    return launches, b + vec


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fused_bar_bwd_cost(call):
    """The bn_add_relu backward kernel (cuda, triton): read grad_out, the mask (out), x for
    d scale, identity for d identity_scale; write grad_x / grad_identity; per-block partial sums
    then one small reduce launch when a per-channel gradient is needed."""
    nx, ni, ns, nb, nis = call.needs
    g = nbytes(call.grad_out)
    b = g + (nbytes(call.out) if call.relu else 0) + nbytes(call.x) + nbytes(call.identity)
    b += g * (int(nx) + int(ni)) + _vecs(call.scale, call.id_scale)
    sums = int(ns) + int(nb) + int(nis)
    vec = call.C * torch.empty((), dtype=_acc(call.grad_out.dtype)).element_size()
    return 1 + (1 if sums else 0), b + 2 * sums * vec


def _aten_bar_bwd_cost(call):
    """aten_bn_add_relu.bn_add_relu_backward, pass by pass."""
    nx, ni, ns, nb, nis = call.needs
    go = call.grad_out
    acc = _acc(go.dtype)
    g = nbytes(go)
    g_acc = _act_bytes(go.shape, acc)
    vec = call.C * torch.empty((), dtype=acc).element_size()
    launches = b = 0
    if call.relu:
        launches, b = 1, 3 * g  # where(out > 0, grad, 0): read grad, out; write g
    for need, s in ((nx, call.scale), (ni, call.id_scale)):
        if not need:
            continue
        if s is None or go.dtype == acc:
            launches, b = launches + 1, b + 2 * g + nbytes(s)
        else:
            launches, b = launches + 2, b + g + g_acc + g_acc + g + nbytes(s)  # fp32 product, then rounded
    if nb:
        launches, b = launches + 1, b + g + vec
    for need, t in ((ns, call.x), (nis, call.identity)):
        if not need:
            continue
        if go.dtype == acc:
            launches, b = launches + 3, b + g + nbytes(t) + g_acc + g_acc + 3 * vec  # mul, sum, copy_
        else:
            launches, b = launches + 5, b + (g + g_acc) + (nbytes(t) + g_acc) + 3 * g_acc + g_acc + 3 * vec
    return launches, b


_CONV_BM = 128  # rows (N*OH*OW) per tile of the statistics partials: csrc/conv2d.cu's BM; Triton's BLOCK_M varies


def _conv_io(call) -> int:
    out = _act_bytes(call.shape, call.x.dtype)
    return nbytes(call.x) + out + nbytes(call.residual) + _vecs(call.scale, call.bias)


def _partials(call) -> int:
    N, Cout, OH, OW = call.shape
    return 2 * ((N * OH * OW + _CONV_BM - 1) // _CONV_BM) * Cout * 4  # (mean, M2) per tile, float32


def _cuda_stat_groups(m_tiles: int) -> int:
    """Groups of csrc/conv2d.cu's in-launch statistics merge: max(16, ceil(sqrt(m_tiles))) m-tiles
    each (its ``stat_group_tiles``; tests/ops/test_conv2d_cuda.py checks the two agree)."""
    g = max(16, math.isqrt(m_tiles - 1) + 1 if m_tiles > 0 else 0)
    return (m_tiles + g - 1) // g


def _cuda_conv_cost(call):
    """pack_weight where the weight is not read in place (``cuda_conv2d.in_place_ldw``): a permute
    copy, plus a zero fill of the whole packed matrix first when it has padding (channels Cin -> Cp,
    a multiple of 16 bytes' worth, or columns up to a multiple of 8); the implicit-GEMM kernel (x,
    the weight matrix, the epilogue's operands, out) whose statistics, when asked for, are merged in
    the same launch (csrc/conv2d.h): per-tile (mean, M2) partials written, read back by each group's
    last CTA, per-group float64 partials (with several groups) written and read by each column
    tile's last CTA, mean and var written."""
    from .cuda_conv2d import in_place_ldw, padded_channels

    Cout, Cin, KH, KW = call.weight.shape
    wsz = call.weight.element_size()
    K = Cin * KH * KW
    ldw = in_place_ldw(call.weight, call.x.dtype)
    launches = b = 0
    if not ldw:
        ldw = (KH * KW * padded_channels(Cin, wsz) + 7) // 8 * 8
        launches, b = 1, nbytes(call.weight) + Cout * K * wsz
        if ldw > K:
            launches, b = launches + 1, b + Cout * ldw * wsz
    launches, b = launches + 1, b + _conv_io(call) + Cout * ldw * wsz
    if call.compute_stats:
        N, _, OH, OW = call.shape
        m_tiles = (N * OH * OW + _CONV_BM - 1) // _CONV_BM
        groups = _cuda_stat_groups(m_tiles)
        p = _partials(call)
        b += p + p + (2 * (2 * groups * Cout * 8) if groups > 1 else 0) + 2 * Cout * 4
    return launches, b


def _view_or_copy(weight, dtype, perm, rows) -> bool:
    """Whether triton's pack ``weight.to(dtype).permute(perm).reshape(rows, -1).contiguous()`` copies
    (False: the weight already is that matrix, a view)."""
    if weight.dtype != dtype:
        return True
    w = torch.empty_strided(tuple(weight.shape), tuple(weight.stride()), dtype=dtype, device="meta")
    try:
        return not w.permute(*perm).view(rows, -1).is_contiguous()
    except RuntimeError:  # not viewable: reshape copies
        return True


def _triton_fwd_pack(call) -> Tuple[int, int]:
    """triton_ops/conv2d.py's weight operand: none where the weight is read in place
    (``_weight_cache.conv_fwd_inplace_strides``: channels_last, or 1x1 with a unit Cin stride; 16-bit
    with 16-byte rows), else ``pack_weight`` (K-major for fp32, N-major for 16-bit), one permute
    copy (read W, write the packed W) unless it is a view. Counted every step: a training step
    changes every weight, so the per-version cache never hits there."""
    w = call.weight
    if _weight_cache.conv_fwd_inplace_strides(w, call.x.dtype) is not None:
        return 0, 0
    cout, cin, kh, kw = w.shape
    copies = (_view_or_copy(w, w.dtype, (0, 2, 3, 1), cout) if call.x.dtype == torch.float32
              else _view_or_copy(w, w.dtype, (2, 3, 1, 0), cin * kh * kw))
    return (1, 2 * nbytes(w)) if copies else (0, 0)


def _triton_dgrad_pack(call) -> Tuple[int, int]:
    """triton_ops/conv2d_dgrad.py's weight operand: none where the weight is read in place
    (``_weight_cache.conv_dgrad_inplace_strides``: 16-bit, channels_last or 1x1 with a unit Cin
    stride, 16-byte rows), else ``pack_weight``: the weight cast to g's dtype (a copy when the
    dtypes differ) and permuted to (K, Cin) (K-major for fp32; a copy unless a view)."""
    w, dt = call.weight, call.g.dtype
    if _weight_cache.conv_dgrad_inplace_strides(w, dt) is not None:
        return 0, 0
    cout, cin, kh, kw = w.shape
    launches = b = 0
    out = w.numel() * torch.empty((), dtype=dt).element_size()
    if w.dtype != dt:
        launches, b = 1, nbytes(w) + out
    copies = (_view_or_copy(w, dt, (1, 2, 3, 0), cin) if dt == torch.float32
              else _view_or_copy(w, dt, (2, 3, 0, 1), cout * kh * kw))
    if copies:
        launches, b = launches + 1, b + 2 * out
    return launches, b


def _triton_conv_cost(call):
    """the weight operand (``_triton_fwd_pack``: read in place, or one permute copy) and the conv
    kernel, which with statistics also merges them in the same launch (triton_ops/conv2d.py: the
    per-tile (mean, M2) partials written once and read back once by the merging programs, counted
    with 128-row tiles, and the (mean, var) result; the group partials, at most 1/16 of the tile
    partials, and the int32 arrival counters are left out)."""
    w = nbytes(call.weight)
    launches, b = _triton_fwd_pack(call)
    launches, b = launches + 1, b + _conv_io(call) + w
    if call.compute_stats:
        p = _partials(call)
        Cout = call.shape[1]
        b += p + p + 2 * Cout * 4
    return launches, b


def _aten_conv_cost(call):
    """cuDNN's convolution counted as one launch (x, weight, y); with statistics
    torch.batch_norm_update_stats (one pass: read y, write mean and var); with an epilogue, the
    bn_add_relu pass that 'auto' picks statically on CUDA tensors (the cuda kernel: read y
    (+ residual), write y)."""
    Cout = call.shape[1]
    y = _act_bytes(call.shape, call.x.dtype)
    launches, b = 1, nbytes(call.x) + nbytes(call.weight) + y
    if call.compute_stats:
        return launches + 1, b + y + 2 * Cout * 4
    if call.scale is not None or call.bias is not None or call.residual is not None or call.relu:
        launches, b = launches + 1, b + 2 * y + nbytes(call.residual) + _vecs(call.scale, call.bias)
    return launches, b


def _no_float64(call) -> Optional[str]:
    """csrc/batch_norm.cu computes float32/float16/bfloat16 activations (float32 statistics)."""
    if call.dtype == torch.float64:
        return "float64 (the cuda BatchNorm kernels compute float32, float16 and bfloat16; float64 runs on triton, aten, torch)"
    return None


def _fused_bn_cost(call):
    """batch_norm_act's one-pass kernel (cuda, triton): per-channel scale/shift computed in the
    kernel; read y (+ identity) and the per-channel vectors, write out."""
    return 1, 2 * nbytes(call.y) + nbytes(call.identity) + _vecs(call.mean, call.var, *call.params(), call.id_mean,
                                                                  call.id_var)


def _triton_bn_bits_cost(call):
    """batch_norm_act_bits on triton: ``_fused_bn_cost`` plus the bits written by the same kernel
    (``triton_ops.batch_norm.bits_in_kernel``), else (NCHW with C % 8 != 0) ``_bits.pack`` after it."""
    launches, b = _fused_bn_cost(call)
    N, C, H, W = call.y.shape
    if _bits_in_kernel(C, call.layout):
        return launches, b + N * H * W * ((C + 7) // 8)
    pl, pb = pack_cost(call.y)
    return launches + pl, b + pb


def _cuda_bn_bits_cost(call):
    """batch_norm_act_bits on cuda (csrc/batch_norm.cu): ``_fused_bn_cost`` plus the bits written by
    the forward kernel itself for float16/bfloat16 on channels_last (or H*W == 1) with C % 8 == 0
    (16-byte-aligned activations assumed: fresh allocations); otherwise (float32, NCHW, C % 8 != 0)
    a second csrc launch (bn_bits_pack_kernel) reads out and writes the bits."""
    launches, b = _fused_bn_cost(call)
    N, C, H, W = call.y.shape
    B = N * H * W * ((C + 7) // 8)
    if (call.layout != "nchw" or H * W == 1) and C % 8 == 0 and call.y.element_size() == 2:
        return launches, b + B
    return launches + 1, b + nbytes(call.y) + B


def _packed_after(cost):
    """batch_norm_act_bits on aten: its forward, then ``_bits.pack`` of out by torch ops."""
    def fn(call):
        launches, b = cost(call)
        pl, pb = pack_cost(call.y)
        return launches + pl, b + pb
    fn.__doc__ = f"{cost.__name__} + _bits.pack_cost (the 1-bit mask packed from out by torch ops)"
    return fn


def _bits_in_kernel(C: int, layout: str) -> bool:
    return layout != "nchw" or C % 8 == 0  # as triton_ops/batch_norm.py's bits_in_kernel


def _bn_partials(call) -> int:
    """per-channel partial sums of the backward's reduce pass: (sum g, sum g (y - mean)) per block of
    rows (and the identity's), float32; modelled as blocks of about 2,048 elements per channel (the
    kernels choose at most ~1,024 blocks in all: a few MB at most either way)"""
    N, C, H, W = call.grad_out.shape
    blocks = max(1, (N * H * W + 2047) // 2048)
    return blocks * C * 4 * (3 if call.id_mean is not None else 2)


def _fused_bn_bwd_cost(call):
    """batch_norm_act_backward (cuda, triton): the reduce pass (read grad_out, the mask, y, the
    identity when it has its own BN; write per-block partials) and the per-channel finalize
    (fixed-order sums, the parameter gradients; run by the reduce's last-arriving blocks in its
    launch on both) when a per-channel sum is needed; the apply pass (read
    grad_out, the mask and what the gradients need; write grad_y and grad_identity) when an
    activation gradient is: 2 launches in a training step."""
    ny, ni, nw, nb, niw, nib = call.needs
    g = nbytes(call.grad_out)
    side = call.id_mean is not None
    sums = ny or nw or nb or (side and (ni or niw or nib))  # a per-channel sum is needed
    launches = b = 0
    vec = call.C * 4
    if sums:  # the reduce pass and the finalize
        p = _bn_partials(call)
        reads = g + nbytes(call.out) + nbytes(call.y) + (nbytes(call.identity) if side else 0)
        launches, b = 1, reads + p + p + 8 * vec
    if ny or ni:  # the apply pass
        reads = g + nbytes(call.out) + (nbytes(call.y) if ny else 0) + (nbytes(call.identity) if side and ni else 0)
        launches, b = launches + 1, b + reads + g * (int(ny) + int(ni)) + 8 * vec
    return max(launches, 1), b


def _aten_bn_cost(call):
    """aten_batch_norm.batch_norm_act_forward: native_batch_norm (running-statistics form: read y,
    write z), the identity's own (read, write), add_ (read both, write), relu_ (read, write)."""
    a = nbytes(call.y)
    launches, b = 1, 2 * a
    if call.identity is not None:
        if call.id_mean is not None:
            launches, b = launches + 1, b + 2 * a
        launches, b = launches + 1, b + 3 * a
    if call.relu:
        launches, b = launches + 1, b + 2 * a
    return launches, b + _vecs(call.mean, call.var, *call.params(), call.id_mean, call.id_var)


def _aten_bn_bwd_cost(call):
    """aten_batch_norm.batch_norm_act_backward: threshold_backward (read grad_out and out, write g),
    per BN side rsqrt on C values and native_batch_norm_backward (2 kernels: reduce reads g and x;
    apply reads them again and writes the input gradient)."""
    ny, ni, nw, nb, niw, nib = call.needs
    g = nbytes(call.grad_out)
    launches, b = 0, 0
    if call.relu:
        launches, b = 1, 3 * g
    sides = [(ny or nw or nb, call.y, ny)]
    if call.id_mean is not None:
        sides.append((ni or niw or nib, call.identity, ni))
    for needed, x, need_x in sides:
        if needed:  # rsqrt, the reduce, the apply (not without the input gradient)
            launches += 3 if need_x else 2
            b += (2 if need_x else 1) * (g + nbytes(x)) + (g if need_x else 0) + 8 * call.C * 4
    return max(launches, 1), b


def _fused_bn_coef_cost(call):
    """batch_norm_act_coef (cuda, triton): batch_norm_act_backward's reduce pass (read grad_out, the
    mask, y, and the identity when it has its own BN; write per-block partials) and finalize (read
    them and the per-channel statistics and weights; write coef and id_coef, (3, C) each, and the
    requested parameter gradients; in the reduce's launch on both: its last-arriving program or block
    per channel block, column tile or channel): 1 launch, no apply pass. A 1-bit ``out``
    (resnet_kernels/_bits.py) is read natively by both reduce kernels: its bytes are the bits'
    (nbytes of a uint8 tensor)."""
    g = nbytes(call.grad_out)
    sides = 2 if call.id_mean is not None else 1
    p = _bn_partials(call)
    reads = g + nbytes(call.out) + nbytes(call.y) + (nbytes(call.identity) if sides == 2 else 0)
    vec = call.C * torch.empty((), dtype=_acc(call.grad_out.dtype)).element_size()
    return 1, reads + p + p + sides * (3 + 3) * vec + sum(call.needs) * vec



def _aten_bn_coef_cost(call):
    """aten_batch_norm.batch_norm_act_coef: threshold_backward (read grad_out and out, write g), then
    per BN side: var + eps and rsqrt, the weight in acc (ones_like without one, a cast when it is
    not in acc), native_batch_norm_backward's reduce alone (read g and x; the parameter gradients),
    invstd * weight (with one), three (C,) products, stack, mul_, casts of the requested parameter
    gradients to their dtype."""
    g = nbytes(call.grad_out)
    acc = _acc(call.grad_out.dtype)
    vec = call.C * torch.empty((), dtype=acc).element_size()
    launches, b = (1, 3 * g) if call.relu else (0, 0)
    if call.relu and is_bits(call.out):  # unpack, then where (read grad_out and the bools, write g)
        ul, ub = unpack_cost(call.out, call.grad_out)
        launches, b = launches + ul, b + ub - g + call.grad_out.numel()
    sides = [(call.y, call.weight, call.needs[:2], call.pdtypes[0])]
    if call.id_mean is not None:
        sides.append((call.identity, call.id_weight, call.needs[2:], call.pdtypes[2]))
    for x, w, needs, pdt in sides:
        launches, b = launches + 2, b + 4 * vec  # var + eps, rsqrt
        if w is None:
            launches, b = launches + 1, b + vec
        elif w.dtype != acc:
            launches, b = launches + 1, b + nbytes(w) + vec
        launches, b = launches + 1, b + g + nbytes(x) + 5 * vec  # the reduce
        if w is not None:
            launches, b = launches + 1, b + 3 * vec
        launches, b = launches + 5, b + 3 * 3 * vec + 6 * vec + 4 * vec  # products, stack, mul_
        for need in needs:
            if need and pdt is not None and pdt != acc:
                launches, b = launches + 1, b + vec + call.C * torch.empty((), dtype=pdt).element_size()
    return launches, b


_RUNNING_SLOTS = 4  # BatchNorms per running-update launch (triton_ops/batch_norm.py RUNNING_SLOTS, csrc kBnRunningUpdateSlots)


def _update_cost(call):
    """bn_running_update (cuda, triton): one kernel per 4 BatchNorms (a residual block's updates
    together) over their C values (read the statistics and the buffers, write the buffers)."""
    b = 0
    for u in call.updates:
        b += _vecs(u.mean, u.var) * (u.running_mean is not None or u.running_var is not None)
        b += 2 * _vecs(u.running_mean, u.running_var) + (16 if u.num_batches_tracked is not None else 0)
    return -(-len(call.updates) // _RUNNING_SLOTS), b


def _aten_update_cost(call):
    """aten_batch_norm.bn_running_update: _foreach_mul (var * unbias), a cast per statistic whose
    dtype is not its buffer's, _foreach_lerp_ per buffer dtype, _foreach_add_ (num_batches_tracked):
    PyTorch's multi-tensor launches, one each for a call's few (C,) vectors."""
    from .aten_batch_norm import running_groups

    ups = call.updates
    with_var, groups, nbts = running_groups(ups)
    launches, b = 0, 0
    if with_var:
        launches, b = 1, sum(2 * nbytes(ups[i].var) for i in with_var)
    for pairs in groups.values():
        launches += 1
        for i, k in pairs:
            buf, stat = ups[i][k], ups[i][k - 2]
            if buf.dtype != stat.dtype:
                launches, b = launches + 1, b + nbytes(stat) + nbytes(buf)
            b += 3 * nbytes(buf)
    if nbts:
        launches, b = launches + 1, b + 16 * len(nbts)
    return launches, b


def _cuda_update_supports(call) -> Optional[str]:
    """csrc's running-update kernel reads float32 statistics and float32/16-bit buffers."""
    why = _no_float64(call)
    if why is None and not call.stats_float32:
        why = "mean/var not float32 (the cuda running-update kernel reads float32 statistics)"
    return why


def _cuda_bits_supports(call) -> Optional[str]:
    """batch_norm_act_bits on cuda: the forward's (``_no_float64``) and, with running-statistics
    updates, those of csrc's running update, which its launch applies (``_cuda_update_supports``)."""
    why = _no_float64(call)
    if why is None and call.ucall is not None:
        why = _cuda_update_supports(call.ucall)
        if why is not None:
            why = f"the running-statistics updates: {why}"
    return why


def _with_running(cost, update_cost, in_launch: bool = False):
    """batch_norm_act_bits' cost with its running-statistics updates (``call.ucall``): ``cost``, plus
    ``update_cost``'s launches and bytes (``in_launch``: the forward's own launch applies 4, so only
    their bytes (triton's ``_fwd_running_kernel``, csrc's ``batch_norm_act_forward_running``); the
    rest go out as ``bn_running_update``)."""
    def fn(call):
        launches, b = cost(call)
        if call.ucall is None:
            return launches, b
        ul, ub = update_cost(call.ucall)
        if in_launch:  # (the rest: bn_running_update's launches, one per 4)
            ul = -(-max(len(call.ucall.updates) - _RUNNING_SLOTS, 0) // _RUNNING_SLOTS)
        return launches + ul, b + ub
    fn.__doc__ = (f"{cost.__name__}, with running-statistics updates + {update_cost.__name__}"
                  f"{' (4 in the same launch: their bytes only)' if in_launch else ''}")
    return fn


def _cutlass_conv_cost(call):
    """pack_weight (a permute copy: Cin % 8 == 0, no padding) unless the weight is read in place
    (``cuda_conv2d.in_place_ldw``: channels_last or 1x1), then the CUTLASS kernel (x, the weight
    matrix, the epilogue's operands, out) and, with statistics, the same kernel with the statistics
    epilogue (csrc/sm90/col_stats_epilogue.hpp: out in the activation dtype plus each 128-row tile's
    per-channel (mean, M2) partials, no float32 copy of y) and nhwc_stats_combine's one launch
    (reads the partials, writes mean and var)."""
    from .cuda_conv2d import in_place_ldw

    Cout, Cin, KH, KW = call.weight.shape
    wk = Cout * Cin * KH * KW * call.weight.element_size()
    launches, b = (0, 0) if in_place_ldw(call.weight, call.x.dtype) else (1, nbytes(call.weight) + wk)
    if not call.compute_stats:
        return launches + 1, b + _conv_io(call) + wk
    p = _partials(call)  # 128-row tiles: the sm_90a CTA tile's rows, as csrc/sm90's epilogue writes them
    b += _conv_io(call) + wk + p  # the convolution with its statistics epilogue
    b += p + 2 * Cout * 4  # the combine
    return launches + 2, b


_COSTS = {
    ("bn_add_relu", "cuda"): _fused_bar_cost, ("bn_add_relu", "triton"): _fused_bar_cost,
    ("bn_add_relu", "aten"): _aten_bar_cost,
    ("bn_add_relu_backward", "cuda"): _fused_bar_bwd_cost, ("bn_add_relu_backward", "triton"): _fused_bar_bwd_cost,
    ("bn_add_relu_backward", "aten"): _aten_bar_bwd_cost,
    ("conv2d_epilogue", "cuda"): _cuda_conv_cost, ("conv2d_stats", "cuda"): _cuda_conv_cost,
    ("conv2d_epilogue", "triton"): _triton_conv_cost, ("conv2d_stats", "triton"): _triton_conv_cost,
    ("conv2d_epilogue", "aten"): _aten_conv_cost, ("conv2d_stats", "aten"): _aten_conv_cost,
    ("batch_norm_act", "cuda"): _fused_bn_cost, ("batch_norm_act", "triton"): _fused_bn_cost,
    ("batch_norm_act", "aten"): _aten_bn_cost,
    ("batch_norm_act_bits", "cuda"): _with_running(_cuda_bn_bits_cost, _update_cost, in_launch=True),
    ("batch_norm_act_bits", "triton"): _with_running(_triton_bn_bits_cost, _update_cost, in_launch=True),
    ("batch_norm_act_bits", "aten"): _with_running(_packed_after(_aten_bn_cost), _aten_update_cost),
    ("batch_norm_act_backward", "cuda"): _fused_bn_bwd_cost, ("batch_norm_act_backward", "triton"): _fused_bn_bwd_cost,
    ("batch_norm_act_backward", "aten"): _aten_bn_bwd_cost,
    ("batch_norm_act_coef", "cuda"): _fused_bn_coef_cost, ("batch_norm_act_coef", "triton"): _fused_bn_coef_cost,
    ("batch_norm_act_coef", "aten"): _aten_bn_coef_cost,
    ("bn_running_update", "cuda"): _update_cost, ("bn_running_update", "triton"): _update_cost,
    ("bn_running_update", "aten"): _aten_update_cost,
}


# --------------------------------------------------------------------------------------------
# the implementations ('priority': the static order of 'auto' where it does not measure)
# --------------------------------------------------------------------------------------------
_EVERYWHERE = ("cuda", "cpu")

for _op, _fn in (("bn_add_relu", "bn_add_relu_forward"), ("bn_add_relu_backward", "bn_add_relu_backward")):
    register(Impl(_op, "cuda", _P + "cuda_bn_add_relu:" + _fn, priority=20, cost=_COSTS[(_op, "cuda")]))
    register(Impl(_op, "triton", _TRITON + "bn_add_relu:" + _fn, priority=30, cost=_COSTS[(_op, "triton")]))
    register(Impl(_op, "aten", _P + "aten_bn_add_relu:" + _fn, priority=40, auto_on=_EVERYWHERE,
                  returns_output=_op == "bn_add_relu", cost=_COSTS[(_op, "aten")]))
    register(Impl(_op, "torch", _P + "torch_bn_add_relu:" + _fn, priority=90, auto_on=_EVERYWHERE, reference=True))

for _op in ("conv2d_epilogue", "conv2d_stats"):
    # aten first: cuDNN is the floor until a kernel of ours is measured faster on this GPU
    register(Impl(_op, "aten", _P + "aten_conv2d:conv2d_forward", priority=10, auto_on=_EVERYWHERE, reference=True,
                  returns_output=True, cost=_COSTS[(_op, "aten")]))
    register(Impl(_op, "cuda", _P + "cuda_conv2d:conv2d_forward", supports=conv_kernel_supports, priority=20,
                  cost=_COSTS[(_op, "cuda")]))
    register(Impl(_op, "triton", _TRITON + "conv2d:conv2d_forward", supports=conv_kernel_supports, priority=30,
                  cost=_COSTS[(_op, "triton")]))
    register(Impl(_op, "torch", _P + "torch_conv2d:conv2d_forward", priority=90, auto_on=_EVERYWHERE))
    # Hopper only (sm_90a): ahead of the mma.sync kernel in the static order; 'auto' measures on CUDA anyway
    register(Impl(_op, "cutlass", _P + "cutlass_conv2d:conv2d_forward", supports=cutlass_supports, priority=15,
                  cost=_cutlass_conv_cost))


# conv2d_bn_stats (resnet_kernels/ops/conv2d_bn.py): conv2d_stats of relu(bn(y_prev)); triton and cuda
# apply the BN + ReLU in their operand prologue (h never written; cuda up to Cp = 1536 input channels,
# its shared-memory table: beyond, it materialises h with its batch_norm_act first), aten materialises
# h first with its batch_norm_act launcher. Static order as conv2d_stats' (aten: the cuDNN floor).
def _triton_conv_bn_cost(call):
    """``_triton_conv_cost`` (x = y_prev: the same bytes read) plus the BN's (Cin,) vectors, read by
    the prologue (once per program in fact: L2 hits, counted once)."""
    launches, b = _triton_conv_cost(call)
    return launches, b + _vecs(*call.bn_vectors())


def _cuda_conv_bn_cost(call):
    """The path that runs (cuda_conv2d.prologue_in_kernel): in the kernel, ``_cuda_conv_cost`` (y_prev
    read as its x) plus the BN's (Cin,) vectors (read once per CTA into its (scale, shift) table: L2
    hits, counted once); else cuda batch_norm_act's one-pass kernel (read y_prev and the vectors,
    write h), then ``_cuda_conv_cost`` (which reads h: x's bytes)."""
    from .cuda_conv2d import prologue_in_kernel

    launches, b = _cuda_conv_cost(call)
    if prologue_in_kernel(call):
        return launches, b + _vecs(*call.bn_vectors())
    return launches + 1, b + 2 * nbytes(call.x) + _vecs(*call.bn_vectors())


def _aten_conv_bn_cost(call):
    """aten batch_norm_act (native_batch_norm: read y_prev, write z; relu_: read, write), then
    ``_aten_conv_cost`` (which reads h: x's bytes)."""
    launches, b = _aten_conv_cost(call)
    return launches + 2, b + 4 * nbytes(call.x) + _vecs(*call.bn_vectors())


register(Impl("conv2d_bn_stats", "aten", _P + "aten_conv2d:conv2d_bn_stats", priority=10, auto_on=_EVERYWHERE,
              returns_output=True, cost=_aten_conv_bn_cost))
# operand_prologue: the block takes the prologue graph for cuda's choice (in the kernel for every
# Cp <= 1536; beyond, the launcher writes h to a temporary itself: still correct, counted as such)
register(Impl("conv2d_bn_stats", "cuda", _P + "cuda_conv2d:conv2d_bn_stats", supports=conv_kernel_supports,
              priority=20, cost=_cuda_conv_bn_cost, operand_prologue=True))
register(Impl("conv2d_bn_stats", "triton", _TRITON + "conv2d:conv2d_bn_stats", supports=conv_kernel_supports,
              priority=30, cost=_triton_conv_bn_cost, operand_prologue=True))
register(Impl("conv2d_bn_stats", "torch", _P + "torch_conv2d:conv2d_bn_stats", priority=90, auto_on=_EVERYWHERE,
              reference=True))


# the training-mode BatchNorm ops (resnet_kernels/ops/batch_norm.py): 'aten' runs PyTorch's native
# batch-norm kernels with our statistics, lerp_ for the running statistics (aten_batch_norm.py);
# batch_norm_act_coef is the backward's reduce + finalize half (the fused convolution backward's coefficients)
# batch_norm_act_bits is batch_norm_act writing the 1-bit ReLU mask too (the same launchers, mask_bits=)
for _op, _fn in (("batch_norm_act", "batch_norm_act_forward"), ("batch_norm_act_backward", "batch_norm_act_backward"),
                 ("batch_norm_act_coef", "batch_norm_act_coef"), ("bn_running_update", "bn_running_update"),
                 ("batch_norm_act_bits", "batch_norm_act_forward")):
    register(Impl(_op, "cuda", _P + "cuda_batch_norm:" + _fn,
                  supports={"bn_running_update": _cuda_update_supports,
                            "batch_norm_act_bits": _cuda_bits_supports}.get(_op, _no_float64), priority=20,
                  cost=_COSTS[(_op, "cuda")]))
    # batch_norm_act_bits and batch_norm_act_coef run in the training block, whose backward reads the
    # 1-bit ReLU mask: triton writes and reads it in its kernels, cuda packs / unpacks it by extra
    # torch passes (counted): triton first in their static order ('auto' measures on CUDA anyway)
    register(Impl(_op, "triton", _TRITON + "batch_norm:" + _fn,
                  priority=15 if _op in ("batch_norm_act_bits", "batch_norm_act_coef") else 30,
                  cost=_COSTS[(_op, "triton")]))
    register(Impl(_op, "aten", _P + "aten_batch_norm:" + _fn, priority=40, auto_on=_EVERYWHERE,
                  returns_output=_op != "bn_running_update", cost=_COSTS[(_op, "aten")]))
    register(Impl(_op, "torch", _P + "torch_batch_norm:" + _fn, priority=90, auto_on=_EVERYWHERE, reference=True))


# maxpool2d (resnet_kernels/ops/maxpool.py): the one-byte argmax instead of int64 indices
def _pool_elems(call) -> int:
    return call.x.shape[0] * call.x.shape[1] * call.osize[0] * call.osize[1]


def _fused_pool_cost(call):
    """One kernel: read x, write out (+ the one-byte argmax when a gradient is needed)."""
    m = _pool_elems(call)
    return 1, nbytes(call.x) + m * call.x.element_size() + (m if call.need_argmax else 0)


def _fused_pool_bwd_cost(call):
    """One gather kernel: read grad_out and the argmax, write grad_x."""
    g = nbytes(call.grad_out)
    return 1, g + call.grad_out.numel() + _act_bytes(call.input_shape(), call.grad_out.dtype)


def _aten_pool_cost(call):
    """aten_maxpool.maxpool2d_forward: max_pool2d_with_indices (x, out, int64 indices: CUDA writes
    them even without a gradient), then with an argmax: idx - base (int64), the table lookup
    (index_select into uint8); a window wider than the input: idx // W, idx + ih * (kw - W), - base,
    to uint8."""
    m = _pool_elems(call)
    launches, b = 1, nbytes(call.x) + m * call.x.element_size() + 8 * m
    if call.need_argmax:
        if call.k[1] <= call.x.shape[3]:
            launches, b = launches + 2, b + 16 * m + 9 * m
        else:
            launches, b = launches + 4, b + 16 * m + 24 * m + 16 * m + 9 * m
    return launches, b


def _aten_pool_bwd_cost(call):
    """aten_maxpool.maxpool2d_backward: the argmax to int32 (the lookup's index), the table lookup
    (int64 offsets), + base in place, then max_pool2d_with_indices_backward (read grad_out and the
    int64 indices, write grad_x)."""
    m = call.grad_out.numel()
    launches, b = 3, 5 * m + 12 * m + 16 * m
    return launches + 1, b + nbytes(call.grad_out) + 8 * m + _act_bytes(call.input_shape(), call.grad_out.dtype)


for _op, _fn, _fused, _aten in (
        ("maxpool2d", "maxpool2d_forward", _fused_pool_cost, _aten_pool_cost),
        ("maxpool2d_backward", "maxpool2d_backward", _fused_pool_bwd_cost, _aten_pool_bwd_cost)):
    register(Impl(_op, "cuda", _P + "cuda_maxpool:" + _fn, priority=20, cost=_fused))
    register(Impl(_op, "triton", _TRITON + "maxpool:" + _fn, priority=30, cost=_fused))
    register(Impl(_op, "aten", _P + "aten_maxpool:" + _fn, priority=40, auto_on=_EVERYWHERE, returns_output=True,
                  cost=_aten))
    register(Impl(_op, "torch", _P + "torch_maxpool:" + _fn, priority=90, auto_on=_EVERYWHERE, reference=True))


# conv2d_backward (resnet_kernels/ops/conv_backward.py): the convolution backward of a training
# unit with its BN backward computed in the operand prologue. 'triton' first in the static order:
# the point of the op is the passes it saves over 'aten' (dy materialised by elementwise ops, then
# cuDNN); on CUDA 'auto' measures both and verifies the kernels against the reference first.


def _triton_wgrad_scratch(call) -> int:
    """Bytes of the Triton wgrad's fp32 split-K scratch on an H100/H200 launch (sm_90): its own
    config and split choice (triton_ops/_wgrad_plan.py, the launcher's functions; no triton import),
    0 with one split (e.g. ResNet-50 layer4's 3x3 at batch 256: 2 splits; layer1's: 30)."""
    from ..triton_ops import _wgrad_plan

    Cout, Cin, KH, KW = call.weight.shape
    N, _, OH, OW = call.g.shape
    return _wgrad_plan.scratch_bytes(N * OH * OW, Cout, Cin, KH, KW, call.g.dtype, 90, bool(call.allow_tf32))[1]


def _conv_bwd_operand_reads(call) -> int:
    return nbytes(call.g) + nbytes(call.mask) + (nbytes(call.y) if call.coef is not None else 0)


def _upstream_input_cost(call):
    """(launches, bytes) of materialising x = relu(up_y * s + t) with torch ops when x is None (the
    aten and cuda implementations: ``torch_conv_backward.upstream_input``, the reference
    batch_norm_act_forward): up_y cast to acc (16-bit only), * scale, + shift, relu, the cast back
    into x; ~6 per-channel ops for (scale, shift)."""
    if not call.x_from_up:
        return 0, 0
    X, x4 = nbytes(call.up_y), call.up_y.numel() * 4
    launches, b = 3 + 1, 3 * 2 * x4 + (x4 + X)
    if call.dtype != call.acc:
        launches, b = launches + 1, b + X + x4
    return launches + 6, b + 64 * call.up_y.shape[1]


def _triton_conv_bwd_cost(call):
    """wgrad: the operand (g, the mask, y) and x read once, fp32 split-K partials written and read
    back in split order by each tile's last-arriving program, grad_weight written (1 launch: the
    reduction is in the same kernel; the per-tile arrival counters' bytes are negligible and not
    counted). dgrad: the weight operand (``_triton_dgrad_pack``: read in place, or packed), the
    operand and the weight read, the residual (+ its mask), the upstream x (mask) and up_y read in
    the epilogue, grad_x and per-tile partials written (1 launch), and with upstream reductions the
    finalize, run by each column tile's last-arriving program in the same launch (partials and
    per-channel vectors in, coefficients and parameter gradients out). x None (recomputed from
    up_y): the wgrad reads up_y in x's place (+ 4 upstream vectors), the dgrad epilogue no x (its
    mask comes from the up_y it reads anyway)."""
    need_x, need_w = call.needs[0], call.needs[1]
    Cout, Cin, KH, KW = call.weight.shape
    launches = b = 0
    ops = _conv_bwd_operand_reads(call)
    vec = 3 * Cout * 4 + (nbytes(call.mean) if call.coef is not None else 0)
    if need_w:
        part = _triton_wgrad_scratch(call)
        xin = nbytes(call.up_y) + 4 * Cin * 4 if call.x_from_up else nbytes(call.xs)
        launches, b = 1, ops + xin + 2 * part + nbytes(call.weight) + vec
    if need_x:
        pl, pb = _triton_dgrad_pack(call)
        launches, b = launches + pl + 1, b + pb
        b += ops + nbytes(call.weight) + nbytes(call.residual) + nbytes(call.res_mask) + nbytes(call.xs) + vec
        if call.upstream:
            N, _, H, W = call.xs.shape
            p = 2 * max(1, (N * H * W + 127) // 128) * Cin * 4  # (2, tiles of 128 rows, Cin) partials
            b += (4 * Cin * 4 if call.x_from_up else nbytes(call.x)) + nbytes(call.up_y) + 2 * p + 12 * Cin * 4
    return max(launches, 1), b


def _unpack_masks(call, need_x=None):
    """(launches, bytes) of unpacking 1-bit mask / res_mask (resnet_kernels/_bits.py) first (the aten
    and cuda implementations: their elementwise passes read bool masks then, counted as before);
    res_mask only when grad_x is computed so (need_x, default: requested)."""
    need_x = call.needs[0] if need_x is None else need_x
    launches = b = 0
    for m, like in ((call.mask, call.g), (call.res_mask, call.xs)):
        if m is not None and is_bits(m) and (m is not call.res_mask or need_x):
            ul, ub = unpack_cost(m, like)
            launches, b = launches + ul, b + ub
    return launches, b


def _aten_conv_bwd_cost(call):
    """aten_conv_backward.conv2d_backward: see its module docstring for the ops counted."""
    need_x, need_w = call.needs[0], call.needs[1]
    g = nbytes(call.g)
    e4 = call.g.numel() * 4  # an accumulation-dtype temporary
    launches, b = 0, 0
    dy = g
    launches, b = _unpack_masks(call)
    ul, ub = _upstream_input_cost(call)
    launches, b = launches + ul, b + ub
    if call.mask is not None:
        launches, b = launches + 1, b + 3 * g
    if call.coef is not None:  # 2 per-channel ops, addcmul, addcmul_, the cast
        launches += 5
        b += (g + e4) + (e4 + nbytes(call.y) + e4) + (e4 + g) + 64 * call.weight.shape[0]
    if need_w:
        launches, b = launches + 1, b + dy + nbytes(call.xs) + nbytes(call.weight)
    if need_x:
        X = nbytes(call.xs)
        launches, b = launches + 1, b + dy + nbytes(call.weight) + X
        if call.residual is not None:
            launches += 1 + (call.res_mask is not None)
            b += 3 * X + (3 * X if call.res_mask is not None else 0)
        if call.upstream:
            x4 = call.xs.numel() * 4
            launches += 4 + 8  # where, copy, sum, sub+mul+sum fused as 2, ~8 per-channel ops
            b += 3 * X + 2 * X + X + (X + x4) + (x4 + X + x4) + x4 + 64 * call.xs.shape[1]
        elif call.residual is not None:
            launches, b = launches + 1, b + 2 * X  # the copy into grad_x
    return max(launches, 1), b


def _cuda_refusals(call):
    """(dgrad, wgrad) refusals of csrc's backward kernels for this call (cuda_conv_backward's
    ``dgrad_refusal`` / ``wgrad_refusal``): None where the csrc kernel computes that output."""
    from .cuda_conv_backward import dgrad_refusal, wgrad_refusal

    return (dgrad_refusal(call.g, call.mask, call.y, call.xs, call.weight, call.stride, call.residual, call.res_mask,
                          call.up_y),
            wgrad_refusal(call.g, call.mask, call.y, call.xs, call.weight))


def _cuda_own_dgrad_cost(call):
    """cuda_conv_backward._dgrad (csrc/conv2d_dgrad.cu): a channels_last copy of the weight (read and
    write it) unless ``dgrad_weight_in_place``, the dgrad kernel (the operand g, the mask (activation or bits), y with coef, the weight
    once; the residual and its mask, the upstream mask x (x None: recomputed from the up_y it reads
    anyway, + 3 vectors) and up_y read once in the epilogue; grad_x and with upstream reductions the
    per-tile partials written), and in the same launch the upstream finalize of the last-arriving
    CTAs (partials read back, float64 group sums written and read with several groups, 4 per-channel
    vectors in, 5 out)."""
    from .cuda_conv_backward import dgrad_weight_in_place

    W = nbytes(call.weight)
    launches, b = (1, 0) if dgrad_weight_in_place(call.weight) else (2, 2 * W)
    b += _conv_bwd_operand_reads(call) + W + nbytes(call.residual) + nbytes(call.res_mask) + nbytes(call.xs)
    b += 4 * call.weight.shape[0] * 4 if call.coef is not None else 0
    if call.upstream:
        N, Cin, H, Wd = call.xs.shape
        sh, sw = call.stride
        tiles = sum(-(-(N * -(-(H - ah) // sh) * -(-(Wd - aw) // sw)) // 128)
                    for ah in range(min(sh, H)) for aw in range(min(sw, Wd)))
        p = 2 * tiles * Cin * 4
        groups = _cuda_stat_groups(tiles)  # csrc/conv2d_dgrad.cu's up_group_rows: the same rule
        b += (3 * Cin * 4 if call.x_from_up else nbytes(call.xs)) + nbytes(call.up_y) + 2 * p + 9 * Cin * 4
        b += 2 * (2 * groups * Cin * 8) if groups > 1 else 0
    return launches, b


def _cuda_own_wgrad_cost(call):
    """cuda_conv_backward._wgrad (csrc/conv2d_wgrad.cu): the operand (g, the mask, y with coef) and x
    (x None: up_y, recomputed as it is loaded, + 4 vectors) read once, grad_weight written (1 launch);
    with split-K (``wgrad_splits``) the float32 partials written and read back by each tile's last
    CTA in the same launch."""
    from .cuda_conv_backward import wgrad_splits

    Cout, Cin, KH, KW = call.weight.shape
    N, OH, OW = call.g.shape[0], call.g.shape[2], call.g.shape[3]
    b = _conv_bwd_operand_reads(call) + nbytes(call.weight)
    b += 4 * Cout * 4 if call.coef is not None else 0
    b += nbytes(call.up_y) + 4 * Cin * 4 if call.x_from_up else nbytes(call.xs)
    splits = wgrad_splits(N, Cin, Cout, KH, KW, OH, OW)
    if splits == 1:
        return 1, b
    return 1, b + 2 * splits * Cout * Cin * KH * KW * 4


def _cuda_conv_bwd_cost(call):
    """cuda_conv_backward.conv2d_backward: see its module docstring for the passes counted. grad_x and
    grad_weight by csrc's dgrad / wgrad (``_cuda_own_dgrad_cost``, ``_cuda_own_wgrad_cost``) where
    ``dgrad_refusal`` / ``wgrad_refusal`` let them, the rest by the separate passes around cuDNN
    (``_cuda_sep_conv_bwd_cost``)."""
    need_x, need_w = call.needs[0], call.needs[1]
    rx, rw = _cuda_refusals(call)
    own_x, own_w = need_x and rx is None, need_w and rw is None
    launches = b = 0
    if own_x:
        launches, b = _cuda_own_dgrad_cost(call)
    if own_w:
        wl, wb = _cuda_own_wgrad_cost(call)
        launches, b = launches + wl, b + wb
    if (need_x and not own_x) or (need_w and not own_w):
        sl, sb = _cuda_sep_conv_bwd_cost(call, need_x and not own_x, need_w and not own_w)
        launches, b = launches + sl, b + sb
    return max(launches, 1), b


def _cuda_sep_conv_bwd_cost(call, need_x, need_w):
    """The separate passes around cuDNN (cuda_conv_backward's module docstring) for the outputs the
    csrc kernels do not compute (need_x / need_w)."""
    g = nbytes(call.g)
    launches, b = _unpack_masks(call, need_x)
    ul, ub = _upstream_input_cost(call)
    launches, b = launches + ul, b + ub
    if call.mask is not None:  # the masking pass (a where after unpacking a 1-bit mask)
        launches, b = launches + 1, b + 3 * g
    if call.coef is not None:  # the operand pass (+ 2 per-channel ops)
        launches, b = launches + 3, b + 3 * g + nbytes(call.y) + 64 * call.weight.shape[0]
    if need_w:
        launches, b = launches + 1, b + g + nbytes(call.xs) + nbytes(call.weight)
    if need_x:
        X = nbytes(call.xs)
        launches, b = launches + 1, b + g + nbytes(call.weight) + X
        if call.residual is not None:
            launches += 1 + (call.res_mask is not None)
            b += 3 * X + (3 * X if call.res_mask is not None else 0)
        if call.upstream:  # reduce + finalize, the masking pass, ~8 per-channel ops
            N, C, H, W = call.xs.shape
            launches += 2 + 1 + 8
            b += 3 * X + 2 * max(1, (N * H * W + 2047) // 2048) * C * 4 * 2 + 3 * X + 64 * C
        elif call.residual is None:
            launches, b = launches + 1, b + 2 * X  # the copy into grad_x
    return max(launches, 1), b


def _no_float64_conv_bwd(call) -> Optional[str]:
    if call.dtype == torch.float64:
        return "float64 (the cuda and triton kernels compute float32, float16 and bfloat16; float64 runs on aten, torch)"
    return None


register(Impl("conv2d_backward", "triton", _TRITON + "conv2d_backward:conv2d_backward", supports=_no_float64_conv_bwd,
              priority=20, cost=_triton_conv_bwd_cost))
register(Impl("conv2d_backward", "cuda", _P + "cuda_conv_backward:conv2d_backward", supports=_no_float64_conv_bwd,
              priority=30, cost=_cuda_conv_bwd_cost))
register(Impl("conv2d_backward", "aten", _P + "aten_conv_backward:conv2d_backward", priority=40, auto_on=_EVERYWHERE,
              cost=_aten_conv_bwd_cost))
register(Impl("conv2d_backward", "torch", _P + "torch_conv_backward:conv2d_backward", priority=90,
              auto_on=_EVERYWHERE, reference=True))


# the cutlass implementation (resnet_kernels/backends/cutlass_conv_backward.py: CUTLASS sm_90a dgrad and
# wgrad after one separate operand pass; compile-verified only, no GPU has run it): Hopper only, behind
# the fused kernels in the static order ('auto' measures on CUDA anyway)
def cutlass_conv_bwd_supports(call) -> Optional[str]:
    """The conv2d_backward calls csrc/sm90/conv2d_sm90_bwd.h implements: every reason it refuses this
    one, joined (None: supported)."""
    from .cuda_conv_backward import _nhwc_dense

    why = []
    g, xs = call.g, call.xs
    Cout, Cin, KH, KW = call.weight.shape
    N, _, H, W = xs.shape
    OH, OW = g.shape[2], g.shape[3]
    need_x = call.needs[0]
    if g.device.type == "cuda" and _sm90_cap(g.device) != (9, 0):
        cap = _sm90_cap(g.device)
        why.append(f"{g.device} is compute capability {cap[0]}.{cap[1]} (the sm_90a kernels run on 9.0 only)")
    C = _ext.get_C()
    if C is not None and getattr(C, "sm90_kernels", False) and not hasattr(C, "conv2d_sm90_dgrad"):
        why.append("resnet_kernels._C predates the sm_90a backward kernels (rebuild it)")
    if call.dtype not in (torch.bfloat16, torch.float16):
        why.append(f"dtype {str(call.dtype).replace('torch.', '')} (the sm_90a kernels take bfloat16 and float16)")
    if Cin % 8 != 0:
        why.append(f"Cin={Cin} is not a multiple of 8 (16-byte TMA rows)")
    if Cout % 8 != 0:
        why.append(f"Cout={Cout} is not a multiple of 8 (16-byte TMA rows)")
    if need_x and tuple(call.stride) != (1, 1):
        why.append(f"stride={tuple(call.stride)} with grad_x (CUTLASS's sm90 dgrad is unit-stride; strided dgrad is "
                   f"the sm100 collectives')")
    why += _tma_conv_reasons(call.stride, call.padding, KH, KW, N * H * W * Cin, N * OH * OW * Cout)
    for name, t in (("g", g), ("mask", call.mask), ("y", call.y), ("x" if call.x is not None else "up_y", xs),
                    ("residual", call.residual), ("res_mask", call.res_mask), ("up_y", call.up_y)):
        if t is not None and not is_bits(t) and not _nhwc_dense(t):
            why.append(f"{name} is not dense channels_last with a 16-byte aligned start (TMA reads NHWC)")
            break
    return "; ".join(why) or None


def _cutlass_conv_bwd_cost(call):
    """cutlass_conv_backward.conv2d_backward (its docstring has the passes): x recomputed by torch ops
    when None; the operand pass(es) as the cuda backend's separate path (a 1-bit mask unpacked, the
    masking pass, the coefficient pass); the wgrad kernel (dy and x read, grad_weight written; a
    KRSC temporary and a copy when grad_weight is not channels_last); the dgrad kernel (the weight
    packed first unless ``weight_in_place``; dy, the weight and the residual read, grad_x written),
    the residual's masking pass with res_mask, and with upstream reductions the cuda backend's
    ``upstream_epilogue`` (reduce + finalize, the masking pass, ~8 per-channel ops)."""
    from .cutlass_conv_backward import weight_in_place

    need_x, need_w = call.needs[0], call.needs[1]
    g, Wb = nbytes(call.g), nbytes(call.weight)
    launches, b = _unpack_masks(call)
    ul, ub = _upstream_input_cost(call)
    launches, b = launches + ul, b + ub
    if call.mask is not None:
        launches, b = launches + 1, b + 3 * g
    if call.coef is not None:
        launches, b = launches + 3, b + 3 * g + nbytes(call.y) + 64 * call.weight.shape[0]
    if need_w:
        launches, b = launches + 1, b + g + nbytes(call.xs) + Wb
        if not call.weight.is_contiguous(memory_format=torch.channels_last):
            launches, b = launches + 1, b + 2 * Wb  # the KRSC temporary copied into grad_weight
    if need_x:
        X = nbytes(call.xs)
        if not weight_in_place(call.weight):
            launches, b = launches + 1, b + 2 * Wb  # pack_weight: read the weight, write KRSC
        launches, b = launches + 1, b + g + Wb + X + nbytes(call.residual)
        if call.res_mask is not None:
            launches, b = launches + 1, b + 3 * X
        if call.upstream:
            N, C, H, W = call.xs.shape
            launches += 2 + 1 + 8
            b += 3 * X + 2 * max(1, (N * H * W + 2047) // 2048) * C * 4 * 2 + 3 * X + 64 * C
    return max(launches, 1), b


register(Impl("conv2d_backward", "cutlass", _P + "cutlass_conv_backward:conv2d_backward",
              supports=cutlass_conv_bwd_supports, priority=35, cost=_cutlass_conv_bwd_cost))
