"""CUDA convolution launcher: wraps ``_C.conv2d_forward`` (csrc/conv2d.cu), an implicit-GEMM
tensor-core kernel with a fused fp32 epilogue and deterministic batch statistics (merged in the
same launch by its last-arriving CTAs, on ``resnet_kernels._counters``' cached zeroed counters).

Contract (shared by every backend's ``conv2d_forward``): see resnet_kernels/backends/torch_conv2d.py.
The kernel takes the weight as a (Cout, ldw) matrix whose columns are ordered (kh, kw, cin) with
cin fastest and cin padded with zero channels to Cp, a multiple of 16 bytes' worth of elements (so
each 16-byte chunk of K is one filter tap: the stem's 3 channels become 8 for 16-bit types, 4 for
fp32), ldw = KH*KW*Cp rounded up to a multiple of 8, zero padded: the weight itself where its
memory already is that matrix (``in_place_ldw``: channels_last or 1x1, no padding needed), else
packed here (small next to the activations). x, out and residual are passed with their element
strides (NCHW or channels_last).
"""

from __future__ import annotations

import torch

from .. import _alloc
from .._counters import arrival_counters, drop_arrival_counters
from .cuda_common import DTYPE_CODES, C_module, call, device_guard, fill_args, ptr, stream_of


def pack_weight(weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(Cout, Cin, KH, KW) -> ((Cout, ldw) matrix, ldw): columns (kh, kw, cin), zero padded;
    cached across calls, repacked whenever the weight may have changed (resnet_kernels/_weight_cache.py)."""
    from .. import _weight_cache

    return _weight_cache.packed(weight, "cuda_conv2d", _pack_weight)


def padded_channels(Cin: int, element_size: int) -> int:
    """Cp: Cin rounded up to a multiple of 16 bytes' worth of elements (csrc/conv2d.h)."""
    vec = 16 // element_size
    return (Cin + vec - 1) // vec * vec


def _pack_weight(weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    Cout, Cin, KH, KW = weight.shape
    Cp = padded_channels(Cin, weight.element_size())
    K = Cp * KH * KW
    ldw = (K + 7) // 8 * 8
    packed = _alloc.empty((Cout, ldw), dtype=weight.dtype, device=weight.device)
    if ldw > Cin * KH * KW:
        packed.zero_()  # padding channels and columns: multiplied by zeros, they must be finite
    packed[:, :K].view(Cout, KH, KW, Cp)[..., :Cin].copy_(weight.permute(0, 2, 3, 1))
    return packed, ldw


def in_place_ldw(weight: torch.Tensor, dtype: torch.dtype) -> int:
    """ldw of ``weight`` read in place as the kernel's (Cout, ldw) matrix, or 0 where it must be
    packed. In place when its memory already is that matrix: (Cout, KH, KW, Cin)-ordered with a unit
    Cin stride (``_weight_cache.conv_fwd_inplace_strides``: a channels_last weight, or a 1x1 one
    with a unit Cin stride, contiguous ones too), in the activations' dtype, no channel padding
    (Cp = Cin), rows exactly K = KH*KW*Cin apart (no columns past K to zero) with K a multiple of 8,
    and a 16-byte-aligned pointer: every ResNet convolution but the stem's after
    ``model.to(memory_format=torch.channels_last)``, and every 1x1 one. A training step changes
    every weight, so the pack (a copy launch per convolution per step) is then gone."""
    from .. import _weight_cache

    st = _weight_cache.conv_fwd_inplace_strides(weight, dtype)
    if st is None:
        return 0
    Cout, Cin, KH, KW = weight.shape
    K = KH * KW * Cin
    if Cin != padded_channels(Cin, weight.element_size()) or K % 8 or (Cout > 1 and st[1] != K):
        return 0
    return K if weight.data_ptr() % 16 == 0 else 0


# the Conv2dArgs fields of the operand prologue (csrc/conv2d.h): absent
NO_PROLOGUE = dict(bn_mean=0, bn_var=0, bn_weight=0, bn_bias=0, bn_weight_dtype=0, bn_bias_dtype=0, bn_eps=0.0)
# csrc/conv2d.h kConvPrologueMaxChannels: the operand prologue's per-channel table (shared memory)
# holds at most this many channels (Cp, the padded Cin)
PROLOGUE_MAX_CHANNELS = 1536


def prologue_in_kernel(call) -> bool:
    """Whether ``conv2d_bn_stats`` on this call (a BnConvCall) applies the BN + ReLU in the
    convolution kernel's operand prologue (Cp <= PROLOGUE_MAX_CHANNELS) rather than materialising h
    with batch_norm_act first."""
    Cin = call.weight.shape[1]
    return padded_channels(Cin, call.x.element_size()) <= PROLOGUE_MAX_CHANNELS


def conv2d_forward(x, weight, scale, bias, residual, out, stride, padding, relu, compute_stats, allow_tf32, *,
                   dilation=(1, 1), groups: int = 1, prologue=None):
    """``prologue``: None, or (mean, var, bn_weight, bn_bias, eps) of x's BatchNorm: the kernel
    convolves h = relu(batch_norm(x)) (csrc/conv2d.h's operand prologue; no epilogue then)."""
    # dilation 1 and groups 1 only: the registry's ``supports`` routes the others elsewhere
    C_ = C_module()
    N, Cin, H, W = x.shape
    Cout, _, KH, KW = weight.shape
    OH, OW = out.shape[2], out.shape[3]
    with device_guard(x):
        ldw = in_place_ldw(weight, x.dtype)
        wmat, ldw = (weight, ldw) if ldw else pack_weight(weight)
        mean = var = ws = counters = key = None
        nbytes = C_.conv2d_workspace_bytes(N=N, OH=OH, OW=OW, Cout=Cout, compute_stats=bool(compute_stats))
        ncnt = C_.conv2d_stats_counters(N=N, OH=OH, OW=OW, Cout=Cout, compute_stats=bool(compute_stats))
        if compute_stats:
            mean = _alloc.empty((Cout,), dtype=torch.float32, device=x.device)
            var = _alloc.empty((Cout,), dtype=torch.float32, device=x.device)
            # float64 per-group then float32 per-tile (mean, M2) partials (8-byte aligned: an allocation)
            ws = _alloc.empty((max((nbytes + 7) // 8, 1),), dtype=torch.float64, device=x.device)
            counters, key = arrival_counters(x.device, max(ncnt, 1))
        args = fill_args(
            C_.Conv2dArgs, dtype=DTYPE_CODES[x.dtype], x=ptr(x), w=ptr(wmat), scale=ptr(scale), bias=ptr(bias),
            residual=ptr(residual), out=ptr(out), mean=ptr(mean), var=ptr(var), workspace=ptr(ws),
            workspace_bytes=nbytes, counters=ptr(counters), counters_count=counters.numel() if compute_stats else 0,
            N=N, Cin=Cin, H=H, W=W, Cout=Cout, KH=KH, KW=KW,
            stride_h=int(stride[0]), stride_w=int(stride[1]), pad_h=int(padding[0]), pad_w=int(padding[1]),
            OH=OH, OW=OW, ldw=ldw, x_stride=list(x.stride()), out_stride=list(out.stride()),
            res_stride=list(residual.stride()) if residual is not None else [0, 0, 0, 0],
            relu=bool(relu), allow_tf32=bool(allow_tf32), stream=stream_of(x), **_prologue_fields(prologue))
        try:
            call("conv2d_forward", args)
        except BaseException:
            drop_arrival_counters(key)  # it may have arrived partly (the host runner): not all zero
            raise
    if compute_stats:
        return mean, var
    return None


def _prologue_fields(prologue):
    if prologue is None:
        return NO_PROLOGUE
    from .cuda_batch_norm import _code

    mean, var, bn_weight, bn_bias, eps = prologue
    return dict(bn_mean=ptr(mean), bn_var=ptr(var), bn_weight=ptr(bn_weight), bn_bias=ptr(bn_bias),
                bn_weight_dtype=_code(bn_weight), bn_bias_dtype=_code(bn_bias), bn_eps=float(eps))


def conv2d_bn_stats(y_prev, mean, var, bn_weight, bn_bias, eps, weight, out, stride, padding, allow_tf32):
    """``conv2d_bn_stats``. In the kernel when Cp <= PROLOGUE_MAX_CHANNELS (every ResNet layer):
    ``conv2d_forward`` with statistics and the operand prologue, which computes h = relu(bn(y_prev))
    in its A loads with batch_norm_act's arithmetic (csrc/bn_affine.cuh): h is never written.
    Otherwise h is materialised in a temporary by the cuda batch_norm_act kernel
    (cuda_batch_norm.batch_norm_act_forward) and convolved. The two paths are bitwise equal
    (tests/ops/test_conv2d_cuda_prologue.py). Contract: resnet_kernels/backends/torch_conv2d.py."""
    from .cuda_batch_norm import batch_norm_act_forward
    from .torch_conv2d import _bn_geometry

    if padded_channels(y_prev.shape[1], y_prev.element_size()) <= PROLOGUE_MAX_CHANNELS:
        return conv2d_forward(y_prev, weight, None, None, None, out, stride, padding, False, True, allow_tf32,
                              prologue=(mean, var, bn_weight, bn_bias, eps))

    h = _alloc.empty_like(y_prev)
    C, inner = _bn_geometry(y_prev)
    batch_norm_act_forward(y_prev, mean, var, bn_weight, bn_bias, None, None, None, None, None, h, eps, 0.0, True,
                           C, inner)
    return conv2d_forward(h, weight, None, None, None, out, stride, padding, False, True, allow_tf32)
