"""conv2d_backward (resnet_kernels/ops/conv_backward.py) on the cuda backend. Contract:
``backends/torch_conv_backward.py``. Each output by csrc's own kernel where it supports the call,
else by the separate-pass variant around cuDNN; :func:`dgrad_refusal` and :func:`wgrad_refusal`
decide, and the registry's cost model branches on the same functions, so the accountant counts the
path that runs:

* grad_x: csrc's implicit-GEMM dgrad (csrc/conv2d_dgrad.cu: mma.sync, sm_80+): the operand dy
  computed in registers from (g, mask, y, mean, coef) as it is loaded, the residual (+ res_mask),
  the upstream ReLU (x None: its mask recomputed from up_y) and the upstream BN-backward reductions
  (per-CTA partials, summed in a fixed order by the last-arriving CTAs in the same launch) in its
  epilogue. Launches: the dgrad kernel, and a channels_last copy of the weight unless it is read in
  place (:func:`dgrad_weight_in_place`: channels_last, or a 1x1).
  Taken for float16/bfloat16 with every activation-shaped tensor channels_last, Cin and Cout
  multiples of 8, stride 1 or 2, at most 9 filter taps per stride parity class (1x1, 3x3).
* grad_weight: csrc's implicit-GEMM wgrad (csrc/conv2d_wgrad.cu): the same operand prologue, x
  (x None: recomputed from up_y as it is loaded), deterministic split-K (:func:`wgrad_splits`; with
  more than one split the partials summed in split order by each tile's last-arriving CTA, in the
  same launch, on ``resnet_kernels._counters``' cached zeroed counters). Taken for float16/bfloat16
  channels_last with Cin and Cout multiples of 8 (any kernel, stride, padding).
* otherwise csrc's elementwise and BatchNorm kernels around cuDNN's dgrad and/or wgrad
  (``aten.convolution_backward``, as the cuda backend's other convolution backwards): the operand
  dy materialised once in the activation dtype (x materialised by ``upstream_input`` when None).

Kernels per call of the separate-pass path:
* operand, with coef: ``bn_add_relu`` forward with x = g, scale = A, shift = K mean - B,
  identity = y, id_scale = -K (dy = A g + (K mean - B) - K y, 1 pass, one rounding), preceded by one
  ``bn_add_relu`` backward pass (g * (mask > 0), exact) when a mask is given; without coef: that
  masking pass or nothing (dy = g);
* ``aten.convolution_backward``: cuDNN dgrad and/or wgrad;
* epilogue: the residual (masked by one ``bn_add_relu`` backward pass when res_mask is given) added
  by one ``bn_add_relu`` forward pass (x = gx, identity = residual); with upstream reductions
  ``batch_norm_act_backward``'s reduce + finalize (relu: out = x, y = up_y: sum_g and
  sum_g (up_y - up_mean), the parameter gradients), one masking pass writing grad_x, and the
  coefficients (A, B, K) from those sums by 4 tiny per-channel ops.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _alloc
from .._bits import is_bits, unpack
from .._counters import arrival_counters, drop_arrival_counters
from .._checks import acc_dtype
from .cuda_batch_norm import batch_norm_act_backward
from .cuda_bn_add_relu import bn_add_relu_backward, bn_add_relu_forward
from .cuda_common import DTYPE_CODES, C_module, call, device_guard, fill_args, ptr, stream_of
from .torch_conv_backward import _tf32, upstream_input


def _inner(t) -> int:
    return 1 if (t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()) else t.shape[2] * t.shape[3]


def _masked(g, mask):
    """g * (mask > 0) in g's dtype (one csrc pass, exact). A 1-bit mask (resnet_kernels/_bits.py) is
    unpacked by torch ops and applied by torch.where instead (the csrc pass reads an activation)."""
    if is_bits(mask):
        return torch.where(unpack(mask, g), g, torch.zeros((), dtype=g.dtype, device=g.device))
    out = torch.empty_like(g)
    bn_add_relu_backward(g, mask, None, None, None, None, out, None, None, None, None, True, g.shape[1], _inner(g))
    return out


def _operand(g, mask, y, mean, coef):
    if coef is None:
        return g if mask is None else _masked(g, mask)
    a, b, k = coef[0], coef[1], coef[2]
    x = g if mask is None else _masked(g, mask)  # exact (no scale: the one rounding is dy's)
    dy = torch.empty_like(g)
    bn_add_relu_forward(x, a, (k * mean - b).contiguous(), y, (-k).contiguous(), None, dy, False, g.shape[1],
                        _inner(g))
    return dy


_DGRAD_DTYPES = (torch.float16, torch.bfloat16)
_DGRAD_MAX_TAPS = 9  # csrc/conv2d_dgrad.cu kMaxTaps: filter taps per stride parity class


def _same_dtype(up_weight, up_bias):
    """(up_weight, up_bias) in one dtype (the kernels read both as up_w_dtype)."""
    if up_weight is not None and up_bias is not None and up_bias.dtype != up_weight.dtype:
        up_bias = up_bias.to(up_weight.dtype)
    return up_weight, up_bias


def _vec_dtype(up_weight, up_bias):
    return next((t.dtype for t in (up_weight, up_bias) if t is not None), torch.float32)


def _nhwc_dense(t) -> bool:
    """Dense channels_last with a 16-byte aligned start (the csrc dgrad/wgrad access 16 bytes at a time; a
    tensor's storage itself is aligned): what the csrc dgrad and wgrad read and write."""
    return t.is_contiguous(memory_format=torch.channels_last) and (t.storage_offset() * t.element_size()) % 16 == 0


def dgrad_refusal(g, mask, y, xs, weight, stride, residual, res_mask, up_y) -> Optional[str]:
    """Why csrc's dgrad kernel does not compute this call's grad_x (then cuDNN's does, with the
    separate passes); None when it does. ``xs``: x, or up_y when x is recomputed."""
    if g.dtype not in _DGRAD_DTYPES:
        return f"{g.dtype} (csrc dgrad: float16, bfloat16)"
    Cout, Cin, KH, KW = weight.shape
    if Cin % 8 or Cout % 8:
        return f"Cin = {Cin}, Cout = {Cout} (csrc dgrad: multiples of 8)"
    sh, sw = (int(v) for v in stride)
    if sh > 2 or sw > 2:
        return f"stride {tuple(stride)} (csrc dgrad: 1 or 2)"
    if -(-KH // sh) * -(-KW // sw) > _DGRAD_MAX_TAPS:
        return f"a {KH}x{KW} kernel at stride {tuple(stride)} (csrc dgrad: at most 9 taps per stride parity class)"
    for name, t in (("g", g), ("mask", mask), ("y", y), ("x", xs), ("residual", residual), ("res_mask", res_mask),
                    ("up_y", up_y)):
        if t is not None and not is_bits(t) and not _nhwc_dense(t):
            return f"{name} is not channels_last (csrc dgrad: channels_last activations)"
    return None


def dgrad_weight_in_place(weight) -> bool:
    """Whether csrc's dgrad reads this weight as it is (input channels contiguous, 16-byte aligned
    8-channel chunks: a channels_last weight, or a contiguous 1x1), else it gets a channels_last copy."""
    s0, s1, s2, s3 = weight.stride()
    KH, KW = weight.shape[2], weight.shape[3]
    return (s1 == 1 and s0 % 8 == 0 and (KH == 1 or s2 % 8 == 0) and (KW == 1 or s3 % 8 == 0)
            and (weight.storage_offset() * weight.element_size()) % 16 == 0)


def _dgrad(g, mask, y, mean, coef, x, weight, grad_x, stride, padding, residual, res_mask, up_y, up_mean, up_var,
           up_weight, up_bias, up_eps, up_coef, up_grad_weight, up_grad_bias) -> None:
    """grad_x (+ the upstream outputs) by csrc's dgrad kernel (``conv2d_dgrad``, csrc/conv2d_dgrad.h);
    x None: its upstream ReLU mask recomputed from up_y in the epilogue."""
    C_ = C_module()
    N, Cin, H, W = grad_x.shape
    Cout, _, KH, KW = weight.shape
    OH, OW = g.shape[2], g.shape[3]
    up = up_y is not None
    if not _nhwc_dense(grad_x):
        raise ValueError(f"conv2d_backward (cuda): grad_x must be channels_last like x, got strides {grad_x.stride()}")
    with device_guard(g):
        # read in place when its input channels are contiguous (channels_last, or 1x1), else one copy
        w = weight if dgrad_weight_in_place(weight) else weight.contiguous(memory_format=torch.channels_last)
        nbytes = C_.conv2d_dgrad_workspace_bytes(N=N, Cin=Cin, H=H, W=W, stride_h=int(stride[0]),
                                                 stride_w=int(stride[1]), upstream=up)
        # float64 group sums then float32 partial rows (8-byte aligned: an allocation)
        ws = _alloc.empty((max((nbytes + 7) // 8, 1),), dtype=torch.float64, device=g.device) if up else None
        ncnt = C_.conv2d_dgrad_counters(N=N, Cin=Cin, H=H, W=W, stride_h=int(stride[0]), stride_w=int(stride[1]),
                                        upstream=up)
        counters, key = arrival_counters(g.device, ncnt) if up else (None, None)
        mbits, rbits = (mask if is_bits(mask) else None), (res_mask if is_bits(res_mask) else None)
        coef, mean = (None, None) if coef is None else (coef.contiguous(), mean.contiguous())  # (held: in use)
        pdt = up_grad_weight.dtype if up_grad_weight is not None else (
            up_grad_bias.dtype if up_grad_bias is not None else torch.float32)
        up_weight, up_bias = _same_dtype(up_weight, up_bias if x is None else None)
        args = fill_args(
            C_.Conv2dDgradArgs, dtype=DTYPE_CODES[g.dtype], g=ptr(g), mask=ptr(None if mbits is not None else mask),
            mask_bits=ptr(mbits), y=ptr(y if coef is not None else None),
            coef=ptr(coef), mean=ptr(mean), w=ptr(w), w_stride=list(w.stride()), grad_x=ptr(grad_x),
            residual=ptr(residual), res_mask=ptr(None if rbits is not None else res_mask), res_bits=ptr(rbits),
            up_out=ptr(x if up else None), up_y=ptr(up_y), up_mean=ptr(up_mean if up else None),
            up_var=ptr(up_var if up else None), up_weight=ptr(up_weight if up else None), up_bias=ptr(up_bias),
            up_coef=ptr(up_coef if up else None), up_grad_weight=ptr(up_grad_weight if up else None),
            up_grad_bias=ptr(up_grad_bias if up else None), workspace=ptr(ws), workspace_bytes=nbytes,
            counters=ptr(counters), counters_count=counters.numel() if up else 0,
            up_w_dtype=DTYPE_CODES[_vec_dtype(up_weight, up_bias)],
            up_gw_dtype=DTYPE_CODES[pdt], up_eps=float(up_eps), N=N, Cin=Cin, H=H, W=W, Cout=Cout, KH=KH,
            KW=KW, stride_h=int(stride[0]), stride_w=int(stride[1]), pad_h=int(padding[0]), pad_w=int(padding[1]),
            OH=OH, OW=OW, stream=stream_of(g))
        try:
            call("conv2d_dgrad", args)
        except BaseException:
            drop_arrival_counters(key)  # it may have arrived partly (the host runner): not all zero
            raise


def wgrad_splits(N: int, Cin: int, Cout: int, KH: int, KW: int, OH: int, OW: int) -> int:
    """The split-K count of csrc's wgrad (csrc/conv2d_wgrad.cu ``conv2d_wgrad_splits``, restated for the
    accountant, which counts without _C; tests/ops/test_conv_backward_cuda.py checks they agree): about
    264 CTAs, at least 16 K tiles of 32 pixels per split, at most 64 splits."""
    tiles = KH * KW * -(-Cout // 128) * -(-Cin // 64)
    k_tiles = -(-(N * OH * OW) // 32)
    return max(1, min(-(-264 // tiles), -(-k_tiles // 16), 64))


def wgrad_refusal(g, mask, y, xs, weight) -> Optional[str]:
    """Why csrc's wgrad kernel (csrc/conv2d_wgrad.cu) does not compute this call's grad_weight (then
    cuDNN's does, on the materialised operand); None when it does. ``xs``: x, or up_y when x is
    recomputed (the kernel then recomputes it as it loads it)."""
    if g.dtype not in _DGRAD_DTYPES:
        return f"{g.dtype} (csrc wgrad: float16, bfloat16)"
    Cout, Cin = weight.shape[0], weight.shape[1]
    if Cin % 8 or Cout % 8:
        return f"Cin = {Cin}, Cout = {Cout} (csrc wgrad: multiples of 8)"
    for name, t in (("g", g), ("mask", mask), ("y", y), ("x", xs)):
        if t is not None and not is_bits(t) and not _nhwc_dense(t):
            return f"{name} is not channels_last (csrc wgrad: channels_last activations)"
    return None


def _wgrad(g, mask, y, mean, coef, x, weight, grad_weight, stride, padding, up_y, up_mean, up_var, up_weight,
           up_bias, up_eps) -> None:
    """grad_weight by csrc's wgrad kernel (``conv2d_wgrad``, csrc/conv2d_wgrad.h); x None: recomputed
    from up_y as it is loaded."""
    C_ = C_module()
    Cout, Cin, KH, KW = weight.shape
    N, _, H, W = (x if x is not None else up_y).shape
    OH, OW = g.shape[2], g.shape[3]
    xup = x is None
    with device_guard(g):
        splits = C_.conv2d_wgrad_splits(N=N, Cin=Cin, Cout=Cout, KH=KH, KW=KW, OH=OH, OW=OW)
        nbytes = C_.conv2d_wgrad_workspace_bytes(Cin=Cin, Cout=Cout, KH=KH, KW=KW, splits=splits)
        ws = _alloc.empty((nbytes // 4,), dtype=torch.float32, device=g.device) if nbytes else None
        ncnt = C_.conv2d_wgrad_counters(Cin=Cin, Cout=Cout, KH=KH, KW=KW, splits=splits)
        counters, key = arrival_counters(g.device, ncnt) if ncnt else (None, None)
        mbits = mask if is_bits(mask) else None
        coef, mean = (None, None) if coef is None else (coef.contiguous(), mean.contiguous())  # (held: in use)
        up_weight, up_bias = _same_dtype(up_weight, up_bias)
        vdt = _vec_dtype(up_weight, up_bias) if xup else torch.float32
        args = fill_args(
            C_.Conv2dWgradArgs, dtype=DTYPE_CODES[g.dtype], g=ptr(g), mask=ptr(None if mbits is not None else mask),
            mask_bits=ptr(mbits), y=ptr(y if coef is not None else None),
            coef=ptr(coef), mean=ptr(mean), x=ptr(x), up_y=ptr(up_y if xup else None),
            up_mean=ptr(up_mean if xup else None), up_var=ptr(up_var if xup else None),
            up_weight=ptr(up_weight if xup else None), up_bias=ptr(up_bias if xup else None),
            up_w_dtype=DTYPE_CODES[vdt], up_eps=float(up_eps), grad_weight=ptr(grad_weight),
            gw_stride=list(grad_weight.stride()), workspace=ptr(ws), workspace_bytes=nbytes, counters=ptr(counters),
            counters_count=counters.numel() if ncnt else 0, splits=splits, N=N,
            Cin=Cin, H=H, W=W, Cout=Cout, KH=KH, KW=KW, stride_h=int(stride[0]), stride_w=int(stride[1]),
            pad_h=int(padding[0]), pad_w=int(padding[1]), OH=OH, OW=OW, stream=stream_of(g))
        try:
            call("conv2d_wgrad", args)
        except BaseException:
            drop_arrival_counters(key)  # it may have arrived partly (the host runner): not all zero
            raise


def conv2d_backward(g, mask, y, mean, coef, x, weight, grad_x, grad_weight, stride, padding, residual, res_mask, up_y,
                    up_mean, up_var, up_weight, up_eps, up_coef, up_grad_weight, up_grad_bias, allow_tf32, *,
                    up_bias=None) -> None:
    xs = x if x is not None else up_y
    own = grad_x is not None and dgrad_refusal(g, mask, y, xs, weight, stride, residual, res_mask, up_y) is None
    own_w = grad_weight is not None and wgrad_refusal(g, mask, y, xs, weight) is None
    if x is None and ((grad_x is not None and not own) or (grad_weight is not None and not own_w)):
        # recomputed from the upstream unit for cuDNN (the contract's ``upstream_input``: torch ops,
        # counted); the csrc kernels recompute it from up_y as they load it
        x = upstream_input(up_y, up_mean, up_var, up_weight, up_bias, up_eps)
    if own:
        _dgrad(g, mask, y, mean, coef, x, weight, grad_x, stride, padding, residual, res_mask, up_y, up_mean, up_var,
               up_weight, up_bias, up_eps, up_coef, up_grad_weight, up_grad_bias)
    if own_w:
        _wgrad(g, mask, y, mean, coef, x, weight, grad_weight, stride, padding, up_y, up_mean, up_var, up_weight,
               up_bias, up_eps)
    cudnn_x, cudnn_w = grad_x is not None and not own, grad_weight is not None and not own_w
    if not (cudnn_x or cudnn_w):
        return
    dy = _operand(g, mask, y, mean, coef)
    with _tf32(allow_tf32):
        gx, gw, _ = torch.ops.aten.convolution_backward(
            dy, x, weight, None, list(stride), list(padding), [1, 1], False, [0, 0], 1, [cudnn_x, cudnn_w, False])
    if cudnn_w:
        grad_weight.copy_(gw)
    if grad_x is None or own:
        return
    C, inner = x.shape[1], _inner(x)
    if residual is not None:
        r = residual if res_mask is None else _masked(residual, res_mask)
        summed = grad_x if up_y is None else torch.empty_like(gx)
        bn_add_relu_forward(gx, None, None, r, None, None, summed, False, C, inner)
        gx = summed
    if up_y is None:
        if residual is None:
            grad_x.copy_(gx)
        return
    upstream_epilogue(gx, x, up_y, up_mean, up_var, up_weight, up_eps, grad_x, up_coef, up_grad_weight, up_grad_bias)


def upstream_epilogue(gx, x, up_y, up_mean, up_var, up_weight, up_eps, grad_x, up_coef, up_grad_weight,
                      up_grad_bias) -> None:
    """The upstream unit's ReLU and BN-backward reductions after a data gradient gx (+ residual) that
    a separate convolution wrote (cuDNN here, CUTLASS in cutlass_conv_backward): batch_norm_act_backward's
    reduce + finalize (sum_g and sum_g (up_y - up_mean) of gx masked by x > 0, the parameter
    gradients), one masking pass writing grad_x, and the coefficients (A, B, K) from those sums by
    per-channel ops. gx: (N, C, H, W) in x's dtype and layout, not grad_x."""
    C, inner = x.shape[1], _inner(x)
    acc = acc_dtype(gx.dtype)
    sum_g = torch.empty((C,), dtype=acc, device=gx.device)
    sum_gd_inv = torch.empty((C,), dtype=acc, device=gx.device)  # sum_g (up_y - up_mean) * invstd
    batch_norm_act_backward(gx, x, up_y, up_mean, up_var, None, None, None, None, None, None, None, sum_gd_inv, sum_g,
                            None, None, up_eps, 0.0, True, C, inner)
    bn_add_relu_backward(gx, x, None, None, None, None, grad_x, None, None, None, None, True, C, inner)
    m = gx.numel() // C
    invstd = torch.rsqrt(up_var + up_eps)
    a = invstd if up_weight is None else up_weight.to(acc) * invstd
    up_coef[0].copy_(a)
    up_coef[1].copy_(a * sum_g / m)
    up_coef[2].copy_(a * invstd * sum_gd_inv / m)
    if up_grad_weight is not None:
        up_grad_weight.copy_(sum_gd_inv)
    if up_grad_bias is not None:
        up_grad_bias.copy_(sum_g)
