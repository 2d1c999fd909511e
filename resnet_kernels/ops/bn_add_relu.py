"""Fused residual epilogue of a ResNet block, defined once with ``torch.library``:

    bn_add_relu(x, scale, shift, identity, identity_scale, identity_shift)
        = relu(x * scale[c] + shift[c] + identity * identity_scale[c] + identity_shift[c])
    add_relu(x, identity) = relu(x + identity)

``scale``/``shift`` are the last BN of the block as a per-channel affine, ``identity_scale``/
``identity_shift`` the optional BN of the 1x1 projection shortcut. Every per-channel argument is
optional (scale 1, shift 0); ``identity`` is optional too (then this is BN-apply + ReLU, used by
the training path of conv+BN+ReLU); ``relu=False`` drops the ReLU.

Backward uses the saved *output* as the ReLU mask (out > 0), never recomputes the forward, and
produces every tensor gradient; per-channel gradients are reductions over N, H, W.
"""

from __future__ import annotations

import logging
from typing import List, Optional

import torch
from torch import Tensor

from .. import _alloc, _backend, _registry, _tune
from .._eager import Eager
from .._checks import (DEVICE_TYPE, acc_dtype, channel_vector, check_activation, check_bool, check_channel_vector,
                       check_layout, check_like, check_tensor_args)
from .._numerics import mismatch, verify_rtol
from .._registry import _ModuleAttr

_launchers_get = _registry._launchers.get

OP = "bn_add_relu"
OP_BACKWARD = OP + "_backward"
_DEBUG = logging.DEBUG


def _geometry(x: Tensor, layout: str) -> tuple[int, int]:
    N, C, H, W = x.shape
    return C, (H * W if layout == "nchw" else 1)


def _validate(x, scale, shift, identity, identity_scale, identity_shift, op: str = OP) -> str:
    check_activation(op, "x", x)
    layout = check_layout(op, "x", x)
    C = x.shape[1]
    if identity is not None:
        check_like(op, "identity", identity, x, "x", layout)
    elif identity_scale is not None or identity_shift is not None:
        raise ValueError(f"{op}: identity_scale/identity_shift were given without identity")
    for name, t in (("scale", scale), ("shift", shift), ("identity_scale", identity_scale),
                    ("identity_shift", identity_shift)):
        if t is not None:
            check_channel_vector(op, name, t, C, x)
    return layout


# --------------------------------------------------------------------------------------------
# what the registry and the measured 'auto' see of a call (resnet_kernels/_tune.py)
# --------------------------------------------------------------------------------------------
def _flags(*ts) -> str:
    return "".join("1" if t is not None else "0" for t in ts)


class ForwardCall:
    """One validated bn_add_relu call: per-channel vectors already in the accumulation dtype.
    ``out``: write there (it may be ``x`` itself: in place) instead of a fresh output."""

    op = OP

    def __init__(self, x, scale, shift, identity, id_scale, id_shift, relu, layout, out=None):
        self.x, self.scale, self.shift, self.identity = x, scale, shift, identity
        self.id_scale, self.id_shift, self.relu, self.layout, self.out = id_scale, id_shift, bool(relu), layout, out
        self.device = x.device
        self.C, self.inner = _geometry(x, layout)

    def key(self) -> str:
        return (f"{tuple(self.x.shape)}|{self.layout}|{self.x.dtype}|"
                f"{_flags(self.scale, self.shift, self.identity, self.id_scale, self.id_shift)}|relu{int(self.relu)}")

    def describe(self) -> str:
        return f"x {tuple(self.x.shape)} {str(self.x.dtype).replace('torch.', '')} {self.layout}"

    def run(self, impl, fresh: bool = False) -> Tensor:
        return _launch(impl, self.x, self.scale, self.shift, self.identity, self.id_scale, self.id_shift, self.relu,
                       self.C, self.inner, None if fresh else self.out)

    def compare(self, got: Tensor, ref: Tensor):
        return mismatch("out", got, ref, verify_rtol(self.x.dtype))


def _launch(impl, x, scale, shift, identity, id_scale, id_shift, relu: bool, C: int, inner: int, out) -> Tensor:
    """One forward launch with the op's output contract: the result has x's strides and dtype;
    ``out``: where an implementation that writes into its output writes (None: a fresh one)."""
    fn = _launchers_get(impl.launcher) or impl.load()  # (Impl.load's cached entry, without its frame)
    if type(fn) is _ModuleAttr:  # (the launcher as its module holds it now, without _ModuleAttr's frame)
        fn = getattr(fn.mod, fn.attr)
    if impl.returns_output:
        got = fn(x, scale, shift, identity, id_scale, id_shift, None, relu, C, inner)
        if got.stride() != x.stride() or got.dtype != x.dtype:
            dense = _alloc.empty_like(x)  # the op's output has x's strides (its fake says so)
            dense.copy_(got)
            got = dense
        return got
    if out is None:
        out = _alloc.empty_like(x)
    fn(x, scale, shift, identity, id_scale, id_shift, out, relu, C, inner)
    return out


class BackwardCall:
    """One validated bn_add_relu_backward call; ``needs``: (x, identity, scale, shift, id_scale)."""

    op = OP_BACKWARD
    _NAMES = ("grad_x", "grad_identity", "grad_scale", "grad_shift", "grad_identity_scale")

    def __init__(self, grad_out, out, x, scale, identity, id_scale, relu, layout, needs):
        self.grad_out, self.out, self.x, self.scale = grad_out, out, x, scale
        self.identity, self.id_scale, self.relu, self.layout = identity, id_scale, bool(relu), layout
        self.needs = tuple(bool(n) for n in needs)
        self.device = grad_out.device
        self.C, self.inner = _geometry(grad_out, layout)

    def key(self) -> str:
        return (f"{tuple(self.grad_out.shape)}|{self.layout}|{self.grad_out.dtype}|"
                f"{_flags(self.out, self.x, self.scale, self.identity, self.id_scale)}|"
                f"{''.join(str(int(n)) for n in self.needs)}|relu{int(self.relu)}")

    def describe(self) -> str:
        g = self.grad_out
        return f"grad_out {tuple(g.shape)} {str(g.dtype).replace('torch.', '')} {self.layout}"

    def run(self, impl, fresh: bool = True) -> List[Tensor]:
        outs = _backward_outputs(self.grad_out, self.C, *self.needs, fake=False)
        gx, gi, gs, gb, gis = (t if t.numel() else None for t in outs)
        impl.load()(self.grad_out, self.out, self.x, self.scale, self.identity, self.id_scale, gx, gi, gs, gb, gis,
                    self.relu, self.C, self.inner)
        return outs

    def compare(self, got, ref):
        rtol = verify_rtol(self.grad_out.dtype)
        for name, g, r in zip(self._NAMES, got, ref):
            err = mismatch(name, g, r, rtol)
            if err is not None:
                return err
        return None


def apply_in_place(y: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], residual: Optional[Tensor],
                   relu: bool) -> Tensor:
    """act(y * scale[c] + shift[c] + residual) by the implementation 'auto' chooses for this
    bn_add_relu call, written over y (a fresh, dense activation the caller owns; the per-channel
    vectors in the accumulation dtype) where that implementation writes into its output, else
    returned fresh. Returns the result. For implementations of other ops (e.g. the aten
    convolution's epilogue)."""
    layout = "nhwc" if (not y.is_contiguous() and y.is_contiguous(memory_format=torch.channels_last)) else "nchw"
    device = y.device
    # (_tune.quiet(), inline)
    if DEVICE_TYPE[device] not in _tune._tunable_devices and _tune._capture.get() is None \
            and _tune._recorder.get() is None and not _tune.log.isEnabledFor(_DEBUG):
        # what dispatch would run: the static first choice, when it holds for every call
        impl = _registry.static_first(OP, device)
        if impl is not None:
            N, C, H, W = y.shape  # (_geometry, inline)
            return _launch(impl, y, scale, shift, residual, None, None, bool(relu), C, H * W if layout == "nchw" else 1,
                           y)
    call = ForwardCall(y, scale, shift, residual, None, None, relu, layout, out=y)
    return _tune.dispatch(OP, "auto", call)


# --------------------------------------------------------------------------------------------
# forward op
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("resnet_kernels::bn_add_relu", mutates_args=())
def bn_add_relu_op(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], identity: Optional[Tensor],
                   identity_scale: Optional[Tensor], identity_shift: Optional[Tensor], relu: bool,
                   backend: str) -> Tensor:
    layout = _validate(x, scale, shift, identity, identity_scale, identity_shift)
    acc = acc_dtype(x.dtype)
    call = ForwardCall(x, channel_vector(scale, acc), channel_vector(shift, acc), identity,
                       channel_vector(identity_scale, acc), channel_vector(identity_shift, acc), relu, layout)
    # backend is concrete ('auto' means auto, not "the one in force": bn_add_relu() already
    # substituted that); an explicit one is checked even for an empty batch, so an unusable
    # explicit backend always raises
    if x.numel() == 0:
        _tune.check_requested(OP, backend, call)
        return _alloc.empty_like(x)
    return _tune.dispatch(OP, backend, call)


@bn_add_relu_op.register_fake
def _(x, scale, shift, identity, identity_scale, identity_shift, relu, backend):
    _validate(x, scale, shift, identity, identity_scale, identity_shift)
    return torch.empty_like(x)


# --------------------------------------------------------------------------------------------
# backward op
# --------------------------------------------------------------------------------------------
def _backward_outputs(grad_out: Tensor, C: int, need_x: bool, need_identity: bool, need_scale: bool,
                      need_shift: bool, need_id_scale: bool, fake: bool) -> List[Tensor]:
    acc = acc_dtype(grad_out.dtype)
    if fake:
        def act(flag):
            return torch.empty_like(grad_out) if flag else grad_out.new_empty(0)

        def vec(flag):
            return grad_out.new_empty(C if flag else 0, dtype=acc)
    else:
        def act(flag):
            return _alloc.empty_like(grad_out) if flag else grad_out.new_empty(0)

        def vec(flag):
            return _alloc.empty((C if flag else 0,), dtype=acc, device=grad_out.device)
    return [act(need_x), act(need_identity), vec(need_scale), vec(need_shift), vec(need_id_scale)]


def _validate_backward(grad_out, out, x, scale, identity, identity_scale, relu, need_scale, need_id_scale):
    op = OP_BACKWARD
    check_activation(op, "grad_out", grad_out)
    layout = check_layout(op, "grad_out", grad_out)
    if relu:
        if out is None:
            raise ValueError(f"{op}: out (the saved forward output, the ReLU mask) is required when relu=True")
        check_like(op, "out", out, grad_out, "grad_out", layout)
    if need_scale:
        if x is None:
            raise ValueError(f"{op}: x is required to compute the gradient of scale")
        check_like(op, "x", x, grad_out, "grad_out", layout)
    if need_id_scale:
        if identity is None:
            raise ValueError(f"{op}: identity is required to compute the gradient of identity_scale")
        check_like(op, "identity", identity, grad_out, "grad_out", layout)
    C = grad_out.shape[1]
    for name, t in (("scale", scale), ("identity_scale", identity_scale)):
        if t is not None:
            check_channel_vector(op, name, t, C, grad_out)
    return layout


@torch.library.custom_op("resnet_kernels::bn_add_relu_backward", mutates_args=())
def bn_add_relu_backward_op(grad_out: Tensor, out: Optional[Tensor], x: Optional[Tensor], scale: Optional[Tensor],
                            identity: Optional[Tensor], identity_scale: Optional[Tensor], relu: bool,
                            need_x: bool, need_identity: bool, need_scale: bool, need_shift: bool,
                            need_id_scale: bool, backend: str) -> List[Tensor]:
    """Returns [grad_x, grad_identity, grad_scale, grad_shift, grad_identity_scale]; a gradient
    that was not requested is an empty tensor. grad_shift is also the identity_shift gradient."""
    layout = _validate_backward(grad_out, out, x, scale, identity, identity_scale, relu, need_scale, need_id_scale)
    acc = acc_dtype(grad_out.dtype)
    call = BackwardCall(grad_out, out if relu else None, x if need_scale else None, channel_vector(scale, acc),
                        identity if need_id_scale else None, channel_vector(identity_scale, acc), relu, layout,
                        (need_x, need_identity, need_scale, need_shift, need_id_scale))
    if grad_out.numel() == 0:
        _tune.check_requested(OP_BACKWARD, backend, call)
        outs = _backward_outputs(grad_out, grad_out.shape[1], need_x, need_identity, need_scale, need_shift,
                                 need_id_scale, fake=False)
        for v in outs[2:]:
            v.zero_()  # a sum over an empty batch is 0
        return outs
    return _tune.dispatch(OP_BACKWARD, backend, call)


@bn_add_relu_backward_op.register_fake
def _(grad_out, out, x, scale, identity, identity_scale, relu, need_x, need_identity, need_scale, need_shift,
      need_id_scale, backend):
    _validate_backward(grad_out, out, x, scale, identity, identity_scale, relu, need_scale, need_id_scale)
    return _backward_outputs(grad_out, grad_out.shape[1], need_x, need_identity, need_scale, need_shift,
                             need_id_scale, fake=True)


_bn_add_relu_backward = Eager(bn_add_relu_backward_op)


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------
def _dense_like(g: Tensor, ref: Optional[Tensor]) -> Tensor:
    if ref is not None and not ref.is_contiguous() and ref.is_contiguous(memory_format=torch.channels_last):
        return g.contiguous(memory_format=torch.channels_last)
    if ref is not None or not g.is_contiguous(memory_format=torch.channels_last):
        return g.contiguous()
    return g


def _setup_context(ctx, inputs, output):
    x, scale, shift, identity, identity_scale, identity_shift, relu, backend = inputs
    ctx.relu = relu
    ctx.backend = backend
    ctx.has = (scale is not None, shift is not None, identity is not None, identity_scale is not None,
               identity_shift is not None)
    ctx.pdtypes = tuple(t.dtype if t is not None else None
                        for t in (scale, shift, identity_scale, identity_shift))
    need_scale = scale is not None and scale.requires_grad
    need_id_scale = identity_scale is not None and identity_scale.requires_grad
    ctx.save_for_backward(output if relu else None, x if need_scale else None, scale,
                          identity if need_id_scale else None, identity_scale)


def _backward(ctx, grad):
    out, x, scale, identity, identity_scale = ctx.saved_tensors
    has_scale, has_shift, has_identity, has_id_scale, has_id_shift = ctx.has
    nx, ns, nb, ni, nis, nib = ctx.needs_input_grad[:6]
    # Autograd may hand us any strides (e.g. the expanded gradient of .sum()): bring the
    # gradient into the saved tensors' layout (a no-op when it already is).
    ref = next((t for t in (out, x, identity) if t is not None), None)
    grad = _dense_like(grad, ref)
    # With no per-channel scales, d/dx and d/didentity are both the masked gradient: compute once.
    share = nx and ni and not has_scale and not has_id_scale
    need_x = bool(nx)
    need_identity = bool(ni) and has_identity and not share
    need_scale = bool(ns) and has_scale
    need_shift = (bool(nb) and has_shift) or (bool(nib) and has_id_shift)
    need_id_scale = bool(nis) and has_id_scale
    gx, gi, gs, gb, gis = _bn_add_relu_backward(
        grad, out, x, scale, identity, identity_scale, ctx.relu, need_x or share, need_identity, need_scale,
        need_shift, need_id_scale, ctx.backend)
    s_dt, b_dt, is_dt, ib_dt = ctx.pdtypes
    grad_x = gx if nx else None
    grad_identity = (gx if share else gi) if ni else None
    return (grad_x,
            gs.to(s_dt) if (ns and has_scale) else None,
            gb.to(b_dt) if (nb and has_shift) else None,
            grad_identity,
            gis.to(is_dt) if (nis and has_id_scale) else None,
            gb.to(ib_dt) if (nib and has_id_shift) else None,
            None, None)


bn_add_relu_op.register_autograd(_backward, setup_context=_setup_context)
bn_add_relu_eager = Eager(bn_add_relu_op, _setup_context, _backward)


# --------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------
def bn_add_relu(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], identity: Optional[Tensor],
                identity_scale: Optional[Tensor] = None, identity_shift: Optional[Tensor] = None, *,
                relu: bool = True, backend: Optional[str] = None) -> Tensor:
    """relu(x * scale[c] + shift[c] + identity * identity_scale[c] + identity_shift[c]).

    x, identity: (N, C, H, W), float32/float16/bfloat16/float64, both NCHW-contiguous or both
    channels_last. Per-channel tensors: shape (C,), float32 or the activation dtype; None means
    scale 1 / shift 0 (identity None: no residual). backend: None (the one in force, see
    ``resnet_kernels.use_backend``), 'auto', 'cuda', 'triton' or 'torch'.
    """
    check_tensor_args(OP, ("scale", "shift", "identity", "identity_scale", "identity_shift"), x=x, scale=scale,
                      shift=shift, identity=identity, identity_scale=identity_scale, identity_shift=identity_shift)
    return bn_add_relu_eager(x, scale, shift, identity, identity_scale, identity_shift, check_bool(OP, "relu", relu),
                          _backend.op_arg(backend))


def add_relu(x: Tensor, identity: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """relu(x + identity), fused; backward uses the saved output as the ReLU mask."""
    if identity is None:
        raise TypeError("add_relu: identity must be a tensor, got None")
    return bn_add_relu(x, None, None, identity, backend=backend)
