"""CUTLASS sm_90a convolution launcher: wraps ``_C.conv2d_sm90_forward`` (csrc/sm90/conv2d_sm90.cu),
a CUTLASS 3.x implicit-GEMM convolution for Hopper (TMA im2col loads, wgmma, warp-specialized
pipeline) with the fused epilogue out = act(conv*scale[k] + bias[k] + residual) in one kernel, and
for statistics the same convolution whose epilogue also writes each 128-row tile's per-channel
(mean, M2) of the rounded output (csrc/sm90/col_stats_epilogue.hpp), then one deterministic combine.

Contract (shared by every backend's ``conv2d_forward``): see resnet_kernels/backends/torch_conv2d.py;
the registry's ``supports`` (``cutlass_supports`` in backends/__init__.py) keeps every call this
kernel does not implement away from it: bfloat16/float16, or float32 where TF32 is allowed (computed
in TF32: the operands' low mantissa bits are dropped by the tensor cores, as in Triton's tf32 dot),
channels_last, Cin a multiple of 8 and Cout of 16 bytes' worth of channels, groups 1, dilation 1,
an sm_90 GPU. The weight is the kernel's KRSC matrix ((Cout, KH, KW, Cin) contiguous, ldw =
KH*KW*Cin): read in place where its memory already is that (``cuda_conv2d.in_place_ldw``: a
channels_last weight, or a 1x1 one; the cuda backend's rule, which with Cin % 8 == 0 needs no channel
padding), else packed with the cuda backend's pack (shared through resnet_kernels/_weight_cache.py).
"""

from __future__ import annotations

import torch

from .. import _alloc
from .cuda_common import DTYPE_CODES, C_module, call, device_guard, fill_args, ptr, stream_of
from .cuda_conv2d import NO_PROLOGUE, in_place_ldw, pack_weight


def _nhwc_strides(t: torch.Tensor):
    N, C, H, W = t.shape
    return [H * W * C, 1, W * C, C]


def _aligned_vec(v):
    """(Cout,) float32 vectors must be contiguous and 16-byte aligned (the epilogue's vector loads)."""
    if v is None:
        return None
    if not v.is_contiguous() or v.data_ptr() % 16 != 0:
        v = v.clone(memory_format=torch.contiguous_format)
    return v


def conv2d_forward(x, weight, scale, bias, residual, out, stride, padding, relu, compute_stats, allow_tf32, *,
                   dilation=(1, 1), groups: int = 1):
    C_ = C_module()
    N, Cin, H, W = x.shape
    Cout, _, KH, KW = weight.shape
    OH, OW = out.shape[2], out.shape[3]
    for name, t in (("x", x), ("out", out), ("residual", residual)):
        if t is not None and not t.is_contiguous(memory_format=torch.channels_last):
            raise ValueError(f"cutlass conv2d: {name} must be channels_last contiguous, got strides {t.stride()}")
    with device_guard(x):
        # (Cout, KH*KW*Cin): Cin % 8 == 0, so no padding columns; in place when the weight already is it
        ldw = in_place_ldw(weight, x.dtype)
        wmat, ldw = (weight, ldw) if ldw else pack_weight(weight)
        scale, bias = _aligned_vec(scale), _aligned_vec(bias)
        mean = var = None
        if compute_stats:
            mean = _alloc.empty((Cout,), dtype=torch.float32, device=x.device)
            var = _alloc.empty((Cout,), dtype=torch.float32, device=x.device)
        fields = dict(
            dtype=DTYPE_CODES[x.dtype], x=ptr(x), w=ptr(wmat), scale=ptr(scale), bias=ptr(bias),
            residual=ptr(residual), out=ptr(out), mean=ptr(mean), var=ptr(var), workspace=0, workspace_bytes=0,
            counters=0, counters_count=0,  # csrc/conv2d.cu's statistics merge only: sm90 has its own
            N=N, Cin=Cin, H=H, W=W, Cout=Cout, KH=KH, KW=KW, stride_h=int(stride[0]), stride_w=int(stride[1]),
            pad_h=int(padding[0]), pad_w=int(padding[1]), OH=OH, OW=OW, ldw=ldw, x_stride=_nhwc_strides(x),
            out_stride=_nhwc_strides(out), res_stride=_nhwc_strides(residual) if residual is not None else [0, 0, 0, 0],
            relu=bool(relu), allow_tf32=bool(allow_tf32), stream=stream_of(x), **NO_PROLOGUE)
        nbytes = C_.conv2d_sm90_workspace_bytes(fill_args(C_.Conv2dArgs, **fields))
        ws = None
        if nbytes > 0:
            # float32 elements (the epilogue's per-tile (mean, M2) partials live here)
            ws = _alloc.empty(((nbytes + 3) // 4,), dtype=torch.float32, device=x.device)
        fields.update(workspace=ptr(ws), workspace_bytes=nbytes)
        call("conv2d_sm90_forward", fill_args(C_.Conv2dArgs, **fields))
    if compute_stats:
        return mean, var
    return None
