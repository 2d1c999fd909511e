"""Every implementation of every fused op, declared once (see ``resnet_kernels/_registry.py``).

A launcher module per op per backend holds the code (``<backend>_<op>.py`` here, or
``triton_ops/<op>.py``); launchers write into preallocated outputs (unless declared
``returns_output``) and assume the op layer validated everything (shapes, dtypes, layouts,
devices, non-empty) and that ``supports`` accepted the call.

Adding an implementation: its launcher file(s) and one ``register`` call below.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _ext
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
            "reduction ops; the floor 'auto' falls back to, and what it uses on CPU tensors", _anywhere))
register_backend(Backend(
    "torch", "the plain-PyTorch reference decomposition in the accumulation dtype (float64 capable): the "
             "test oracle", _anywhere, benchmark=False))


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


# --------------------------------------------------------------------------------------------
# the implementations ('priority': the static order of 'auto' where it does not measure)
# --------------------------------------------------------------------------------------------
_EVERYWHERE = ("cuda", "cpu")

for _op, _fn in (("bn_add_relu", "bn_add_relu_forward"), ("bn_add_relu_backward", "bn_add_relu_backward")):
    register(Impl(_op, "cuda", _P + "cuda_bn_add_relu:" + _fn, priority=20))
    register(Impl(_op, "triton", _TRITON + "bn_add_relu:" + _fn, priority=30))
    register(Impl(_op, "aten", _P + "aten_bn_add_relu:" + _fn, priority=40, auto_on=_EVERYWHERE,
                  returns_output=_op == "bn_add_relu"))
    register(Impl(_op, "torch", _P + "torch_bn_add_relu:" + _fn, priority=90, auto_on=_EVERYWHERE, reference=True))

for _op in ("conv2d_epilogue", "conv2d_stats"):
    # aten first: cuDNN is the floor until a kernel of ours is measured faster on this GPU
    register(Impl(_op, "aten", _P + "aten_conv2d:conv2d_forward", priority=10, auto_on=_EVERYWHERE, reference=True,
                  returns_output=True))
    register(Impl(_op, "cuda", _P + "cuda_conv2d:conv2d_forward", supports=conv_kernel_supports, priority=20))
    register(Impl(_op, "triton", _TRITON + "conv2d:conv2d_forward", supports=conv_kernel_supports, priority=30))
    register(Impl(_op, "torch", _P + "torch_conv2d:conv2d_forward", priority=90, auto_on=_EVERYWHERE))
