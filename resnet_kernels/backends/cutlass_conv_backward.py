"""conv2d_backward (resnet_kernels/ops/conv_backward.py) on the cutlass backend: CUTLASS 3.x sm_90a
dgrad and wgrad (csrc/sm90/conv2d_sm90_bwd.cu: TMA + wgmma, Hopper only) fed by a materialised
gradient operand. Contract: ``backends/torch_conv_backward.py``. **Compile-verified only**: no GPU
has run these kernels yet; the measured 'auto' verifies the implementation against the reference
on first use, like every other.

Issue 12 asks, on Hopper's TMA/wgmma path, for either a register-sourced operand variant or a cheap
separate pass. This is the separate pass: TMA copies global memory straight to shared memory, so
there is no register stage to apply the BN backward in, and a register-sourced (RS) wgmma mainloop
is not among CUTLASS's conv collectives. Per call:

* x None: recomputed from up_y by ``torch_conv_backward.upstream_input`` (torch ops, as the cuda
  backend's separate path);
* the operand dy = A * g * (mask > 0) - (B + K * (y - mean)) written once in the activation dtype by
  the cuda backend's csrc passes (``cuda_conv_backward._operand``: one ``bn_add_relu`` forward pass
  with coef, preceded by one masking pass with an activation mask; a 1-bit mask unpacked first);
  dy = g itself (no pass) without mask and coef;
* grad_weight: ``conv2d_sm90_wgrad`` (dy, x -> the KRSC gradient; no split-K: deterministic); a
  weight that is not channels_last gets its gradient through one KRSC temporary and a copy;
* grad_x: ``conv2d_sm90_dgrad`` (dy, the KRSC weight: read in place when channels_last, else the
  shared packed copy of cuda_conv2d.pack_weight) with the residual as CUTLASS's C operand (beta = 1:
  added in float32 before the one rounding; masked by one csrc pass first when res_mask is given);
  with up_y it writes a temporary and the cuda backend's ``upstream_epilogue`` follows (the
  upstream ReLU and BN-backward reductions: reduce + finalize, one masking pass, per-channel ops).

``cutlass_conv_bwd_supports`` (backends/__init__.py) keeps every other call away: float16/bfloat16,
channels_last activations, Cin and Cout multiples of 8, stride 1 when grad_x is needed (CUTLASS's
sm90 dgrad is unit-stride; strided dgrad is the sm100 collectives'), TMA limits, an sm_90 GPU.
"""

from __future__ import annotations

import torch

from .. import _alloc
from .cuda_common import DTYPE_CODES, C_module, call, device_guard, fill_args, ptr, stream_of
from .cuda_conv2d import pack_weight
from .cuda_conv_backward import _masked, _nhwc_dense, _operand, upstream_epilogue
from .torch_conv_backward import upstream_input


def weight_in_place(weight) -> bool:
    """Whether the dgrad reads this weight as it is: KRSC memory (a channels_last weight, or any 1x1
    whose input channels are contiguous) with a 16-byte aligned start; else the packed copy."""
    return (weight.is_contiguous(memory_format=torch.channels_last)
            and (weight.storage_offset() * weight.element_size()) % 16 == 0)


def _args(C_, dy, w, x, residual, grad_x, grad_w, xs, weight, stride, padding, workspace=None, workspace_bytes=0):
    N, Cin, H, W = xs.shape
    Cout, _, KH, KW = weight.shape
    OH, OW = dy.shape[2], dy.shape[3]
    return fill_args(
        C_.Conv2dSm90BwdArgs, dtype=DTYPE_CODES[dy.dtype], dy=ptr(dy), w=ptr(w), x=ptr(x), residual=ptr(residual),
        grad_x=ptr(grad_x), grad_w=ptr(grad_w), workspace=ptr(workspace), workspace_bytes=int(workspace_bytes), N=N,
        Cin=Cin, H=H, W=W, Cout=Cout, KH=KH, KW=KW, stride_h=int(stride[0]), stride_w=int(stride[1]),
        pad_h=int(padding[0]), pad_w=int(padding[1]), OH=OH, OW=OW, stream=stream_of(dy))


def _run(C_, kind: str, fields: dict) -> None:
    """The workspace CUTLASS asks for (0 for these kernels today), then the launch."""
    nbytes = getattr(C_, f"conv2d_sm90_{kind}_workspace_bytes")(_args(C_, **fields))
    ws = _alloc.empty(((nbytes + 3) // 4,), dtype=torch.float32, device=fields["dy"].device) if nbytes else None
    call(f"conv2d_sm90_{kind}", _args(C_, workspace=ws, workspace_bytes=nbytes, **fields))


def _wgrad(C_, dy, x, weight, grad_weight, stride, padding) -> None:
    direct = _nhwc_dense(grad_weight) and grad_weight.is_contiguous(memory_format=torch.channels_last)
    gw = grad_weight if direct else _alloc._fill(torch.empty_like(grad_weight, memory_format=torch.channels_last))
    _run(C_, "wgrad", dict(dy=dy, w=None, x=x, residual=None, grad_x=None, grad_w=gw, xs=x, weight=weight,
                           stride=stride, padding=padding))
    if not direct:
        grad_weight.copy_(gw)


def _dgrad(C_, dy, weight, residual, gx, stride, padding) -> None:
    if weight_in_place(weight):
        w = weight
    else:
        w, ldw = pack_weight(weight)  # (Cout, KH*KW*Cin) KRSC: Cin % 8 == 0, so ldw == KH*KW*Cin
        Cout, Cin, KH, KW = weight.shape
        if ldw != KH * KW * Cin:
            raise ValueError(f"conv2d_backward (cutlass): the packed weight has ldw {ldw} != {KH * KW * Cin}")
    _run(C_, "dgrad", dict(dy=dy, w=w, x=None, residual=residual, grad_x=gx, grad_w=None, xs=gx, weight=weight,
                           stride=stride, padding=padding))


def conv2d_backward(g, mask, y, mean, coef, x, weight, grad_x, grad_weight, stride, padding, residual, res_mask, up_y,
                    up_mean, up_var, up_weight, up_eps, up_coef, up_grad_weight, up_grad_bias, allow_tf32, *,
                    up_bias=None) -> None:
    C_ = C_module()
    with device_guard(g):
        if x is None:  # the upstream unit's output, recomputed by torch ops (the contract's upstream_input)
            x = upstream_input(up_y, up_mean, up_var, up_weight, up_bias, up_eps)
        dy = _operand(g, mask, y, mean, coef)  # the separate pass(es): dy in the activation dtype
        for name, t in (("dy", dy), ("x", x), ("grad_x", grad_x)):
            if t is not None and not _nhwc_dense(t):
                raise ValueError(f"conv2d_backward (cutlass): {name} must be dense channels_last (16-byte aligned), "
                                 f"got strides {t.stride()}")
        if grad_weight is not None:
            _wgrad(C_, dy, x, weight, grad_weight, stride, padding)
        if grad_x is None:
            return
        r = residual if residual is None or res_mask is None else _masked(residual, res_mask)
        gx = grad_x if up_y is None else _alloc.empty_like(grad_x)
        _dgrad(C_, dy, weight, r, gx, stride, padding)
        if up_y is not None:
            upstream_epilogue(gx, x, up_y, up_mean, up_var, up_weight, up_eps, grad_x, up_coef, up_grad_weight,
                              up_grad_bias)
