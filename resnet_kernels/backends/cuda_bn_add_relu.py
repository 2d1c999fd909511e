"""CUDA implementations: thin wrappers turning tensors into the torch-free ``_C`` API
(an argument struct of device pointers, sizes, dtype codes, the raw stream of torch's current
stream)."""

from __future__ import annotations

import torch

from .cuda_common import DTYPE_CODES, C_module, call, device_guard, fill_args, ptr, stream_of


def bn_add_relu_forward(x, scale, shift, identity, id_scale, id_shift, out, relu, C, inner) -> None:
    C_ = C_module()
    with device_guard(x):
        args = fill_args(
            C_.BnAddReluArgs, dtype=DTYPE_CODES[x.dtype], x=ptr(x), scale=ptr(scale), shift=ptr(shift),
            identity=ptr(identity), id_scale=ptr(id_scale), id_shift=ptr(id_shift), out=ptr(out), numel=x.numel(),
            C=C, inner=inner, relu=bool(relu), stream=stream_of(x))
        call("bn_add_relu_forward", args)


def bn_add_relu_backward(grad_out, out, x, scale, identity, id_scale, grad_x, grad_identity, grad_scale,
                         grad_shift, grad_id_scale, relu, C, inner) -> None:
    C_ = C_module()
    code = DTYPE_CODES[grad_out.dtype]
    with device_guard(grad_out):
        nbytes = C_.bn_add_relu_backward_workspace_bytes(dtype=code, numel=grad_out.numel(), C=C, inner=inner)
        # Scratch for the per-block partial sums: every byte read is written first, so it is not
        # poisoned (and _alloc's integer poison value does not fit uint8).
        ws = torch.empty((max(nbytes, 1),), dtype=torch.uint8, device=grad_out.device)
        args = fill_args(
            C_.BnAddReluBackwardArgs, dtype=code, grad_out=ptr(grad_out), out=ptr(out), x=ptr(x),
            scale=ptr(scale), identity=ptr(identity), id_scale=ptr(id_scale), grad_x=ptr(grad_x),
            grad_identity=ptr(grad_identity), grad_scale=ptr(grad_scale), grad_shift=ptr(grad_shift),
            grad_id_scale=ptr(grad_id_scale), workspace=ptr(ws), workspace_bytes=nbytes, numel=grad_out.numel(),
            C=C, inner=inner, relu=bool(relu), stream=stream_of(grad_out))
        call("bn_add_relu_backward", args)
