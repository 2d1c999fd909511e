"""Training-mode BatchNorm from given batch statistics, defined once with ``torch.library``:

    batch_norm_act(y, mean, var, weight, bias, identity, id_mean, id_var, id_weight, id_bias, eps, id_eps, relu)
        = act(bn(y) + R),  bn(y) = (y - mean[c]) / sqrt(var[c] + eps) * weight[c] + bias[c],
          R = the identity's own BN (id_mean ... id_eps) of identity, or identity, or 0
    bn_running_update(mean, var, running_mean, running_var, num_batches_tracked, factor, unbias)
        the running-statistics update of nn.BatchNorm2d, in place (one kernel)
    bn_running_update_many(updates)
        those of several BatchNorms (a residual block's) in one call: one kernel for up to 4
        (the op itself takes lists: ``bn_running_update`` is its one-BatchNorm form)

``mean``/``var`` are **the batch statistics of y** (biased variance), e.g. from ``conv2d_stats``'s
epilogue, and likewise ``id_mean``/``id_var`` of ``identity``: the backward is nn.BatchNorm2d's
training gradient, which includes the path through the batch statistics, so ``mean``/``var``
receive no gradient of their own (their producer's backward skips its statistics pass). One
pass forward (the per-channel scale/shift computed in the kernel, no separate launch); backward
``batch_norm_act_backward``: a fixed-order per-channel reduce of the masked gradient g and of
g * (y - mean), then one pass writing grad_y (and grad_identity) — no separate ReLU-mask pass, no
statistics-correction pass. See ``resnet_kernels/backends/torch_batch_norm.py`` for the exact
math every implementation follows.

``batch_norm_act_coef`` is the reduce + finalize half of ``batch_norm_act_backward`` alone: it
returns the per-channel coefficients (A, B, K) of the input gradients, grad_y = A * g - (B + K * (y -
mean)), instead of applying them, plus the parameter gradients. The fused convolution backward
(``resnet_kernels/backends/torch_conv_backward.py``) computes that operand on the fly in its dgrad
and wgrad, so grad_y is never written. It is used inside a backward and is not differentiable.

``batch_norm_act_bits`` is ``batch_norm_act`` returning ``[out, bits]``, bits the 1-bit mask of
out > 0 (``resnet_kernels/_bits.py``), written by the same Triton kernel: the training block's tail
(``resnet_kernels/_block.py``), whose backward reads the bits instead of out (``batch_norm_act_coef``'s
``out`` and ``conv2d_backward``'s ``mask``/``res_mask`` accept either). It also applies the block's
running-statistics updates (``bn_running_update``'s lists), in the same launch on triton and cuda.
Not differentiable.

This is the path ``resnet_kernels.functional`` takes for a BatchNorm in training (see
``nn/_bn.py``: ``batch_stats_args``); the general per-channel ``(scale, shift)`` path
(``bn_scale_shift`` + ``bn_add_relu``) remains for what this op does not cover: a synchronising
SyncBatchNorm, a convolution bias before the BN, empty batches.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from .. import _alloc, _backend, _tune
from .._bits import bits_shape, check_mask, empty_like_bits, is_bits
from .._bits import pack as _pack_bits
from .._eager import Eager
from .._checks import (acc_dtype, check_activation, check_bool, check_channel_vector, check_layout, check_like,
                       check_tensor_args, in_layout_of)
from .._numerics import mismatch, verify_rtol
from ._nodiff import register_not_differentiable

_F32, _F64 = torch.float32, torch.float64

OP = "batch_norm_act"
OP_BACKWARD = OP + "_backward"
OP_UPDATE = "bn_running_update"
OP_COEF = OP + "_coef"
OP_BITS = OP + "_bits"


def _geometry(x: Tensor, layout: str):
    N, C, H, W = x.shape
    return C, (H * W if layout == "nchw" else 1)


def _param(t: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    """A per-channel parameter as the kernels take it: contiguous, in the accumulation dtype or the
    activations' (a no-op for a float32 or same-dtype parameter: no cast launched)."""
    if t is None:
        return None
    dt = t.dtype
    xdt = x.dtype
    if dt is not xdt:
        acc = _F64 if xdt is _F64 else _F32  # acc_dtype, inline (per argument of every call)
        if dt is not acc:
            t = t.to(acc)
    return t if t.is_contiguous() else t.contiguous()


def _stat(t: Tensor, x: Tensor) -> Tensor:
    acc = _F64 if x.dtype is _F64 else _F32  # acc_dtype, inline
    if t.dtype is not acc:
        t = t.to(acc)
    return t if t.is_contiguous() else t.contiguous()  # (no-op .to/.contiguous skipped: a dispatch each)


def _check_float(op: str, name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{op}: {name} must be a float, got {type(v).__name__}")
    return float(v)


def check_bn_vectors(op: str, x_name: str, x: Tensor, mean, var, weight, bias, weight_name: str = "weight",
                     bias_name: str = "bias") -> None:
    """A BatchNorm's per-channel vectors for the activation ``x``: mean and var required (its batch
    statistics), weight and bias optional, each (C,) on x's device (messages name the arguments)."""
    C = x.shape[1]
    for name, t in (("mean", mean), ("var", var)):
        if t is None:
            raise ValueError(f"{op}: {name} ({x_name}'s batch statistics) is required")
        check_channel_vector(op, name, t, C, x)
    for name, t in ((weight_name, weight), (bias_name, bias)):
        if t is not None:
            check_channel_vector(op, name, t, C, x)


def _validate(y, mean, var, weight, bias, identity, id_mean, id_var, id_weight, id_bias, op: str = OP) -> str:
    check_activation(op, "y", y)
    layout = check_layout(op, "y", y)
    C = y.shape[1]
    check_bn_vectors(op, "y", y, mean, var, weight, bias)
    if identity is not None:
        check_like(op, "identity", identity, y, "y", layout)
    if (id_mean is None) != (id_var is None):
        raise ValueError(f"{op}: give both id_mean and id_var (the identity's batch statistics), or neither")
    if id_mean is not None and identity is None:
        raise ValueError(f"{op}: id_mean/id_var were given without identity")
    if (id_weight is not None or id_bias is not None) and id_mean is None:
        raise ValueError(f"{op}: id_weight/id_bias were given without id_mean/id_var")
    for name, t in (("id_mean", id_mean), ("id_var", id_var), ("id_weight", id_weight), ("id_bias", id_bias)):
        if t is not None:
            check_channel_vector(op, name, t, C, y)
    return layout


def _like(t: Tensor, ref: Tensor) -> Tensor:
    """An implementation's own result with ref's strides and dtype (a no-op when it has them)."""
    if t.stride() == ref.stride() and t.dtype == ref.dtype:
        return t
    dense = _alloc.empty_like(ref)
    dense.copy_(t)
    return dense


def _flags(*ts) -> str:
    return "".join("1" if t is not None else "0" for t in ts)


def _short(dt) -> str:
    return str(dt).replace("torch.", "") if dt is not None else "-"


# --------------------------------------------------------------------------------------------
# what the registry and the measured 'auto' see of a call
# --------------------------------------------------------------------------------------------
class ForwardCall:
    op = OP

    def __init__(self, y, mean, var, weight, bias, identity, id_mean, id_var, id_weight, id_bias, eps, id_eps, relu,
                 layout):
        self.y, self.mean, self.var, self.weight, self.bias = y, mean, var, weight, bias
        # batch_norm_act_bits (``bits_call``): the 1-bit mask of out > 0 (resnet_kernels/_bits.py) too,
        # and the running-statistics updates applied after it (``ucall``: an UpdateCall; the call then
        # mutates those buffers: the measured 'auto' runs its candidates on copies of them)
        self.bits = False
        self.ucall = None
        self.mutates = False
        self.identity, self.id_mean, self.id_var, self.id_weight, self.id_bias = identity, id_mean, id_var, id_weight, id_bias
        self.eps, self.id_eps, self.relu, self.layout = eps, id_eps, bool(relu), layout
        self.device = y.device
        self.dtype = y.dtype
        self.C, self.inner = _geometry(y, layout)

    def params(self):
        return (self.weight, self.bias, self.id_weight, self.id_bias)

    def key(self) -> str:
        return (f"{tuple(self.y.shape)}|{self.layout}|{self.y.dtype}|"
                f"{_flags(self.weight, self.bias, self.identity, self.id_mean, self.id_weight, self.id_bias)}|"
                f"p{_short(self.weight.dtype if self.weight is not None else None)}|relu{int(self.relu)}"
                f"{'|bits' if self.bits else ''}{'' if self.ucall is None else '|run ' + self.ucall.key()}")

    def describe(self) -> str:
        return f"y {tuple(self.y.shape)} {_short(self.y.dtype)} {self.layout}"

    def run(self, impl, fresh: bool = False):
        """out; batch_norm_act_bits: [out, bits], and with updates and ``fresh`` (the measured 'auto':
        on copies of the buffers) [out, bits, the updated copies]. The outputs are always new."""
        out = None if impl.returns_output else _alloc.empty_like(self.y)
        kw = {}
        if self.bits:
            kw["mask_bits"] = empty_like_bits(self.y)
        bufs = None
        if self.ucall is not None:
            ups = self.ucall.updates
            if fresh:
                ups = [u._replace(**{n: getattr(u, n).clone() for n in _BUFFERS if getattr(u, n) is not None})
                       for u in ups]
                bufs = [u[2:5] for u in ups]
            kw["running"] = ups
        got = impl.load()(self.y, self.mean, self.var, self.weight, self.bias, self.identity, self.id_mean,
                          self.id_var, self.id_weight, self.id_bias, out, self.eps, self.id_eps, self.relu, self.C,
                          self.inner, **kw)
        out = out if out is not None else _like(got, self.y)
        if not self.bits:
            return out
        return [out, kw["mask_bits"]] if bufs is None else [out, kw["mask_bits"], bufs]

    def compare(self, got, ref):
        if not self.bits:
            return mismatch("out", got, ref, verify_rtol(self.y.dtype))
        err = mismatch("out", got[0], ref[0], verify_rtol(self.y.dtype))
        if err is None and not torch.equal(got[1], _pack_bits(got[0])):
            return "mask_bits differ from the output's (out > 0)"
        if err is None and self.ucall is not None:
            err = self.ucall.compare(got[2], ref[2])
        return err


class BackwardCall:
    """``needs``: (grad_y, grad_identity, grad_weight, grad_bias, grad_id_weight, grad_id_bias)."""

    op = OP_BACKWARD
    _NAMES = ("grad_y", "grad_identity", "grad_weight", "grad_bias", "grad_id_weight", "grad_id_bias")

    def __init__(self, grad_out, out, y, mean, var, weight, identity, id_mean, id_var, id_weight, eps, id_eps, relu,
                 layout, needs, pdtypes):
        self.grad_out, self.out, self.y, self.mean, self.var, self.weight = grad_out, out, y, mean, var, weight
        self.identity, self.id_mean, self.id_var, self.id_weight = identity, id_mean, id_var, id_weight
        self.eps, self.id_eps, self.relu, self.layout = eps, id_eps, bool(relu), layout
        self.needs = tuple(map(bool, needs))
        self.pdtypes = pdtypes  # dtypes of (weight, bias, id_weight, id_bias) gradients
        self.device = grad_out.device
        self.dtype = grad_out.dtype
        self.C, self.inner = _geometry(grad_out, layout)

    def params(self):
        return (self.weight, self.id_weight)

    def key(self) -> str:
        return (f"{tuple(self.grad_out.shape)}|{self.layout}|{self.grad_out.dtype}|"
                f"{_flags(self.weight, self.identity, self.id_mean, self.id_weight)}|"
                f"{''.join(str(int(n)) for n in self.needs)}|p{'/'.join(_short(d) for d in self.pdtypes)}|"
                f"relu{int(self.relu)}")

    def describe(self) -> str:
        g = self.grad_out
        return f"grad_out {tuple(g.shape)} {_short(g.dtype)} {self.layout}"

    def run(self, impl, fresh: bool = True) -> List[Tensor]:
        if impl.returns_output:
            got = impl.load()(self.grad_out, self.out, self.y, self.mean, self.var, self.weight, self.identity,
                              self.id_mean, self.id_var, self.id_weight, self.needs, self.pdtypes, self.eps,
                              self.id_eps, self.relu, self.C, self.inner)
            # what was not requested: an empty tensor (_backward_outputs' for need=False), made only for those
            return [((_like(t, self.grad_out) if i < 2 else t) if (need and t is not None)
                     else _empty_output(self.grad_out, i, self.pdtypes))
                    for i, (t, need) in enumerate(zip(got, self.needs))]
        outs = _backward_outputs(self.grad_out, self.C, self.needs, self.pdtypes, fake=False)
        gy, gi, gw, gb, giw, gib = (t if t.numel() else None for t in outs)
        impl.load()(self.grad_out, self.out, self.y, self.mean, self.var, self.weight, self.identity, self.id_mean,
                    self.id_var, self.id_weight, gy, gi, gw, gb, giw, gib, self.eps, self.id_eps, self.relu, self.C,
                    self.inner)
        return outs

    def compare(self, got, ref):
        rtol = verify_rtol(self.grad_out.dtype)
        for name, g, r in zip(self._NAMES, got, ref):
            err = mismatch(name, g, r, rtol)
            if err is not None:
                return err
        return None


class CoefCall:
    """A batch_norm_act_coef call. ``needs``: (grad_weight, grad_bias, grad_id_weight,
    grad_id_bias); coef is always computed, id_coef when the identity has its own BN (id_mean)."""

    op = OP_COEF
    _NAMES = ("coef", "id_coef", "grad_weight", "grad_bias", "grad_id_weight", "grad_id_bias")

    def __init__(self, grad_out, out, y, mean, var, weight, identity, id_mean, id_var, id_weight, eps, id_eps, relu,
                 layout, needs, pdtypes):
        self.grad_out, self.out, self.y, self.mean, self.var, self.weight = grad_out, out, y, mean, var, weight
        self.identity, self.id_mean, self.id_var, self.id_weight = identity, id_mean, id_var, id_weight
        self.eps, self.id_eps, self.relu, self.layout = eps, id_eps, bool(relu), layout
        self.needs = tuple(bool(n) for n in needs)
        self.pdtypes = pdtypes  # dtypes of (weight, bias, id_weight, id_bias) gradients
        self.device = grad_out.device
        self.dtype = grad_out.dtype
        self.C, self.inner = _geometry(grad_out, layout)

    def params(self):
        return (self.weight, self.id_weight)

    def key(self) -> str:
        return (f"{tuple(self.grad_out.shape)}|{self.layout}|{self.grad_out.dtype}|"
                f"{_flags(self.weight, self.id_mean, self.id_weight)}|"
                f"{''.join(str(int(n)) for n in self.needs)}|p{'/'.join(_short(d) for d in self.pdtypes)}|"
                f"relu{int(self.relu)}{'|bits' if is_bits(self.out) else ''}")

    def describe(self) -> str:
        g = self.grad_out
        return f"grad_out {tuple(g.shape)} {_short(g.dtype)} {self.layout} (coefficients)"

    def run(self, impl, fresh: bool = True) -> List[Tensor]:
        args = (self.grad_out, self.out, self.y, self.mean, self.var, self.weight, self.identity, self.id_mean,
                self.id_var, self.id_weight)
        tail = (self.eps, self.id_eps, self.relu, self.C, self.inner)
        if impl.returns_output:
            got = impl.load()(*args, self.needs, self.pdtypes, *tail)
            empty = _coef_outputs(self.grad_out, self.C, self.id_mean is not None, (False,) * 4, self.pdtypes,
                                  fake=False)
            return [t if (t is not None and (i < 2 or self.needs[i - 2])) else e
                    for i, (t, e) in enumerate(zip(got, empty))]
        outs = _coef_outputs(self.grad_out, self.C, self.id_mean is not None, self.needs, self.pdtypes, fake=False)
        impl.load()(*args, *(t if t.numel() else None for t in outs), *tail)
        return outs

    def compare(self, got, ref):
        rtol = verify_rtol(self.grad_out.dtype)
        for name, g, r in zip(self._NAMES, got, ref):
            err = mismatch(name, g, r, rtol)
            if err is not None:
                return err
        return None


class RunningUpdate(NamedTuple):
    """One BatchNorm's running-statistics update, as the ``bn_running_update`` launchers take it."""

    mean: Tensor
    var: Tensor
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    num_batches_tracked: Optional[Tensor]
    factor: float
    unbias: float


class UpdateCall:
    """A bn_running_update call: the updates of one or more BatchNorms (a residual block's), applied
    together. It mutates its buffers: the measured 'auto' runs candidates on copies (``fresh=True``
    returns them for verification) and then the chosen one in place."""

    op = OP_UPDATE
    mutates = True

    def __init__(self, updates: List[RunningUpdate], device: torch.device):
        self.updates = updates
        self.device = device
        ts = [t for u in updates for t in u[:5] if t is not None and t.is_floating_point()]
        # what the implementations' supports() read: float64 anywhere (statistics or buffers), and
        # whether every statistic is float32 (the csrc kernel reads float32 statistics)
        self.dtype = torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32
        self.stats_float32 = all(u.mean.dtype == torch.float32 and u.var.dtype == torch.float32 for u in updates)

    def params(self):
        return tuple(t for u in self.updates for t in (u.running_mean, u.running_var))

    def key(self) -> str:
        return ";".join(f"{u.mean.shape[0]}|{u.mean.dtype}|{_short(_buf_dtype(u))}|"
                        f"{_flags(u.running_mean, u.running_var, u.num_batches_tracked)}" for u in self.updates)

    def describe(self) -> str:
        Cs = ",".join(str(u.mean.shape[0]) for u in self.updates)
        dts = ",".join(sorted({_short(_buf_dtype(u)) for u in self.updates}))
        return f"{len(self.updates)} BatchNorm(s) C={Cs} {dts} buffers"

    def run(self, impl, fresh: bool = False):
        updates = self.updates
        if fresh:
            updates = [u._replace(**{n: getattr(u, n).clone() for n in _BUFFERS if getattr(u, n) is not None})
                       for u in updates]
        impl.load()(updates)
        return [u[2:5] for u in updates] if fresh else None

    def compare(self, got, ref):
        for i, (g, r) in enumerate(zip(got, ref)):
            for name, gt, rt in zip(_BUFFERS, g, r):
                if gt is None:
                    continue
                if name == "num_batches_tracked":
                    if not torch.equal(gt, rt):
                        return f"num_batches_tracked[{i}] differs"
                    continue
                err = mismatch(f"{name}[{i}]", gt, rt, verify_rtol(gt.dtype))
                if err is not None:
                    return err
        return None


_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _buf_dtype(u: RunningUpdate):
    return u.running_mean.dtype if u.running_mean is not None else (
        u.running_var.dtype if u.running_var is not None else None)


# --------------------------------------------------------------------------------------------
# forward op
# --------------------------------------------------------------------------------------------
def forward_call(y, mean, var, weight, bias, identity, id_mean, id_var, id_weight, id_bias, eps, id_eps,
                 relu, op: str = OP) -> ForwardCall:
    """The validated call of the op's arguments (also what the accountant costs)."""
    layout = _validate(y, mean, var, weight, bias, identity, id_mean, id_var, id_weight, id_bias, op)
    return ForwardCall(y, _stat(mean, y), _stat(var, y), _param(weight, y), _param(bias, y), identity,
                       None if id_mean is None else _stat(id_mean, y), None if id_var is None else _stat(id_var, y),
                       _param(id_weight, y), _param(id_bias, y), eps, id_eps, relu, layout)


def bits_call(y, mean, var, weight, bias, identity, id_mean, id_var, id_weight, id_bias, eps, id_eps,
              relu, run_mean=(), run_var=(), running_mean=(), running_var=(), num_batches_tracked=(), buffers=(),
              factor=(), unbias=()) -> ForwardCall:
    """batch_norm_act_bits' call: batch_norm_act's, writing the 1-bit mask too, and applying the
    running-statistics updates given by the lists (``bn_running_update``'s, the statistics named
    run_mean/run_var) after it: ``call.ucall`` (an ``UpdateCall``, or None without one)."""
    call = forward_call(y, mean, var, weight, bias, identity, id_mean, id_var, id_weight, id_bias, eps, id_eps, relu,
                        OP_BITS)
    call.bits, call.op = True, OP_BITS
    if len(run_mean) or len(buffers):
        ups = _expand(run_mean, run_var, running_mean, running_var, num_batches_tracked, buffers, factor, unbias,
                      OP_BITS, "run_")
        # the kernel reads these while it writes the buffers: none may share memory with a buffer
        # (compared per storage first: one lookup per tensor, the exact test only on a shared storage)
        reads: dict = {}
        for rname, t in (("y", y), ("mean", mean), ("var", var), ("weight", weight), ("bias", bias),
                         ("identity", identity), ("id_mean", id_mean), ("id_var", id_var), ("id_weight", id_weight),
                         ("id_bias", id_bias)):
            if t is not None:
                reads.setdefault(_storage_id(t), []).append((rname, t))
        for i, u in enumerate(ups):
            if u.mean.device != y.device:
                raise ValueError(f"{OP_BITS}: run_mean[{i}] must be on y's device ({y.device}), got {u.mean.device}")
            for bname, buf in zip(_BUFFERS, u[2:5]):
                if buf is None:
                    continue
                for rname, t in reads.get(_storage_id(buf), ()):
                    if _overlap(buf, t):
                        raise ValueError(f"{OP_BITS}: {bname}[{i}] shares memory with {rname}, which the same "
                                         f"kernel reads (it is updated in place)")
        ucall = update_call_of(ups)
        if ucall.updates:
            call.ucall, call.mutates = ucall, True
    return call


@torch.library.custom_op("resnet_kernels::batch_norm_act", mutates_args=())
def batch_norm_act_op(y: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                      identity: Optional[Tensor], id_mean: Optional[Tensor], id_var: Optional[Tensor],
                      id_weight: Optional[Tensor], id_bias: Optional[Tensor], eps: float, id_eps: float, relu: bool,
                      backend: str) -> Tensor:
    call = forward_call(y, mean, var, weight, bias, identity, id_mean, id_var, id_weight, id_bias, eps, id_eps, relu)
    if y.numel() == 0:
        _tune.check_requested(OP, backend, call)
        return _alloc.empty_like(y)
    return _tune.dispatch(OP, backend, call)


@batch_norm_act_op.register_fake
def _(y, mean, var, weight, bias, identity, id_mean, id_var, id_weight, id_bias, eps, id_eps, relu, backend):
    _validate(y, mean, var, weight, bias, identity, id_mean, id_var, id_weight, id_bias)
    return torch.empty_like(y)


# --------------------------------------------------------------------------------------------
# forward op writing the 1-bit ReLU mask too (the training block's tail: resnet_kernels/_block.py)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("resnet_kernels::batch_norm_act_bits",
                         mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def batch_norm_act_bits_op(y: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                           identity: Optional[Tensor], id_mean: Optional[Tensor], id_var: Optional[Tensor],
                           id_weight: Optional[Tensor], id_bias: Optional[Tensor], eps: float, id_eps: float,
                           relu: bool, run_mean: List[Tensor], run_var: List[Tensor], running_mean: List[Tensor],
                           running_var: List[Tensor], num_batches_tracked: List[Tensor], buffers: List[int],
                           factor: List[float], unbias: List[float], backend: str) -> List[Tensor]:
    """[out, bits]: batch_norm_act's out and the 1-bit mask of out > 0 (resnet_kernels/_bits.py);
    then the running-statistics updates of the lists (``bn_running_update``'s arguments, the
    statistics named run_mean/run_var), in the same launch where the implementation can (triton, cuda)."""
    call = bits_call(y, mean, var, weight, bias, identity, id_mean, id_var, id_weight, id_bias, eps, id_eps, relu,
                     run_mean, run_var, running_mean, running_var, num_batches_tracked, buffers, factor, unbias)
    if y.numel() == 0:
        _tune.check_requested(OP_BITS, backend, call)
        if call.ucall is not None:  # no output to write; the updates still apply (as bn_running_update's)
            _apply_updates(call.ucall, backend)
        return [_alloc.empty_like(y), empty_like_bits(y)]
    return _tune.dispatch(OP_BITS, backend, call)


@batch_norm_act_bits_op.register_fake
def _(y, mean, var, weight, bias, identity, id_mean, id_var, id_weight, id_bias, eps, id_eps, relu, run_mean, run_var,
      running_mean, running_var, num_batches_tracked, buffers, factor, unbias, backend):
    bits_call(y, mean, var, weight, bias, identity, id_mean, id_var, id_weight, id_bias, eps, id_eps, relu, run_mean,
              run_var, running_mean, running_var, num_batches_tracked, buffers, factor, unbias)
    return [torch.empty_like(y), y.new_empty(bits_shape(y.shape), dtype=torch.uint8)]


# Not differentiable (the training block's own backward computes the gradients): an op that mutates
# its arguments takes no autograd formula, so a backward through its outputs raises PyTorch's "no
# autograd formula was registered" for resnet_kernels.batch_norm_act_bits.
_batch_norm_act_bits = Eager(batch_norm_act_bits_op)


# --------------------------------------------------------------------------------------------
# backward op
# --------------------------------------------------------------------------------------------
def _grad_vectors(grad_out: Tensor, C: int, needs, pdtypes, fake: bool) -> List[Tensor]:
    """(grad_weight, grad_bias, grad_id_weight, grad_id_bias) for ``needs`` of those four: (C,)
    in their dtype (None: acc), or empty when not needed."""
    vecs = []
    for need, dt in zip(needs, pdtypes):
        dt = dt or acc_dtype(grad_out.dtype)
        if fake:
            vecs.append(grad_out.new_empty(C if need else 0, dtype=dt))
        else:
            vecs.append(_alloc.empty((C if need else 0,), dtype=dt, device=grad_out.device))
    return vecs


def _backward_outputs(grad_out: Tensor, C: int, needs, pdtypes, fake: bool) -> List[Tensor]:
    new = torch.empty_like if fake else _alloc.empty_like
    acts = [new(grad_out) if needs[i] else grad_out.new_empty(0) for i in (0, 1)]
    return acts + _grad_vectors(grad_out, C, needs[2:], pdtypes, fake)


def _empty_output(grad_out: Tensor, i: int, pdtypes) -> Tensor:
    """Output ``i`` of ``_backward_outputs`` for a gradient that is not requested."""
    if i < 2:
        return grad_out.new_empty(0)
    return _alloc.empty((0,), dtype=pdtypes[i - 2] or acc_dtype(grad_out.dtype), device=grad_out.device)


def _validate_backward(grad_out, out, y, mean, var, weight, identity, id_mean, id_var, id_weight, relu, needs,
                       op: str = OP_BACKWARD):
    check_activation(op, "grad_out", grad_out)
    layout = check_layout(op, "grad_out", grad_out)
    if relu:
        if out is None:
            raise ValueError(f"{op}: out (the saved forward output, the ReLU mask) is required when relu=True")
        if op == OP_COEF:  # also its 1-bit mask (resnet_kernels/_bits.py)
            check_mask(op, "out", out, grad_out, "grad_out", layout)
        else:
            check_like(op, "out", out, grad_out, "grad_out", layout)
    check_like(op, "y", y, grad_out, "grad_out", layout)
    C = grad_out.shape[1]
    for name, t in (("mean", mean), ("var", var)):
        check_channel_vector(op, name, t, C, grad_out)
    if weight is not None:
        check_channel_vector(op, "weight", weight, C, grad_out)
    if needs[1]:
        if identity is None:
            raise ValueError(f"{op}: identity is required to compute its gradient")
    if identity is not None:
        check_like(op, "identity", identity, grad_out, "grad_out", layout)
    if (needs[4] or needs[5]) and id_mean is None:
        raise ValueError(f"{op}: id_mean/id_var are required for the identity BN's parameter gradients")
    if (id_mean is None) != (id_var is None):
        raise ValueError(f"{op}: give both id_mean and id_var, or neither")
    for name, t in (("id_mean", id_mean), ("id_var", id_var), ("id_weight", id_weight)):
        if t is not None:
            check_channel_vector(op, name, t, C, grad_out)
    return layout


def backward_call(grad_out, out, y, mean, var, weight, identity, id_mean, id_var, id_weight, eps, id_eps, relu, need_y,
                  need_identity, need_weight, need_bias, need_id_weight, need_id_bias, weight_dtype,
                  id_weight_dtype) -> BackwardCall:
    needs = (need_y, need_identity, need_weight, need_bias, need_id_weight, need_id_bias)
    layout = _validate_backward(grad_out, out, y, mean, var, weight, identity, id_mean, id_var, id_weight, relu, needs)
    pdtypes = (weight_dtype, weight_dtype, id_weight_dtype, id_weight_dtype)
    g = grad_out
    return BackwardCall(g, out if relu else None, y, _stat(mean, g), _stat(var, g), _param(weight, g),
                        identity if (id_mean is not None or need_identity) else None,
                        None if id_mean is None else _stat(id_mean, g), None if id_var is None else _stat(id_var, g),
                        _param(id_weight, g), eps, id_eps, relu, layout, needs, pdtypes)


@torch.library.custom_op("resnet_kernels::batch_norm_act_backward", mutates_args=())
def batch_norm_act_backward_op(grad_out: Tensor, out: Optional[Tensor], y: Tensor, mean: Tensor, var: Tensor,
                               weight: Optional[Tensor], identity: Optional[Tensor], id_mean: Optional[Tensor],
                               id_var: Optional[Tensor], id_weight: Optional[Tensor], eps: float, id_eps: float,
                               relu: bool, need_y: bool, need_identity: bool, need_weight: bool, need_bias: bool,
                               need_id_weight: bool, need_id_bias: bool, weight_dtype: Optional[torch.dtype],
                               id_weight_dtype: Optional[torch.dtype], backend: str) -> List[Tensor]:
    """[grad_y, grad_identity, grad_weight, grad_bias, grad_id_weight, grad_id_bias]; one not
    requested is an empty tensor. Parameter gradients have ``weight_dtype``/``id_weight_dtype``
    (the parameters' own; None: the accumulation dtype)."""
    call = backward_call(grad_out, out, y, mean, var, weight, identity, id_mean, id_var, id_weight, eps, id_eps, relu,
                         need_y, need_identity, need_weight, need_bias, need_id_weight, need_id_bias, weight_dtype,
                         id_weight_dtype)
    g, needs, pdtypes = grad_out, call.needs, call.pdtypes
    if g.numel() == 0:
        _tune.check_requested(OP_BACKWARD, backend, call)
        outs = _backward_outputs(g, g.shape[1], needs, pdtypes, fake=False)
        for v in outs[2:]:
            v.zero_()  # a sum over an empty batch is 0
        return outs
    return _tune.dispatch(OP_BACKWARD, backend, call)


@batch_norm_act_backward_op.register_fake
def _(grad_out, out, y, mean, var, weight, identity, id_mean, id_var, id_weight, eps, id_eps, relu, need_y,
      need_identity, need_weight, need_bias, need_id_weight, need_id_bias, weight_dtype, id_weight_dtype, backend):
    needs = (need_y, need_identity, need_weight, need_bias, need_id_weight, need_id_bias)
    _validate_backward(grad_out, out, y, mean, var, weight, identity, id_mean, id_var, id_weight, relu, needs)
    return _backward_outputs(grad_out, grad_out.shape[1], needs,
                             (weight_dtype, weight_dtype, id_weight_dtype, id_weight_dtype), fake=True)


_batch_norm_act_backward = Eager(batch_norm_act_backward_op)


# --------------------------------------------------------------------------------------------
# the backward's coefficients (reduce + finalize only), for the fused convolution backward
# --------------------------------------------------------------------------------------------
def _coef_outputs(grad_out: Tensor, C: int, has_id: bool, needs, pdtypes, fake: bool) -> List[Tensor]:
    acc = acc_dtype(grad_out.dtype)
    if fake:
        coefs = [grad_out.new_empty((3, C) if need else (0,), dtype=acc) for need in (True, has_id)]
    else:
        coefs = [_alloc.empty((3, C) if need else (0,), dtype=acc, device=grad_out.device) for need in (True, has_id)]
    return coefs + _grad_vectors(grad_out, C, needs, pdtypes, fake)


def _validate_coef(grad_out, out, y, mean, var, weight, identity, id_mean, id_var, id_weight, relu, needs):
    op = OP_COEF
    layout = _validate_backward(grad_out, out, y, mean, var, weight, identity, id_mean, id_var, id_weight, relu,
                                (False, False) + tuple(needs), op)
    if id_mean is not None and identity is None:
        raise ValueError(f"{op}: identity is required with id_mean/id_var (its BN's coefficients are reduced over it)")
    if id_weight is not None and id_mean is None:
        raise ValueError(f"{op}: id_weight was given without id_mean/id_var")
    return layout


def coef_call(grad_out, out, y, mean, var, weight, identity, id_mean, id_var, id_weight, eps, id_eps, relu,
              need_weight, need_bias, need_id_weight, need_id_bias, weight_dtype, id_weight_dtype) -> CoefCall:
    needs = (need_weight, need_bias, need_id_weight, need_id_bias)
    layout = _validate_coef(grad_out, out, y, mean, var, weight, identity, id_mean, id_var, id_weight, relu, needs)
    g = grad_out
    bn = id_mean is not None  # a raw identity has no coefficients: not an operand of this op
    return CoefCall(g, out if relu else None, y, _stat(mean, g), _stat(var, g), _param(weight, g),
                    identity if bn else None, _stat(id_mean, g) if bn else None, _stat(id_var, g) if bn else None,
                    _param(id_weight, g) if bn else None, eps, id_eps, relu, layout, needs,
                    (weight_dtype, weight_dtype, id_weight_dtype, id_weight_dtype))


@torch.library.custom_op("resnet_kernels::batch_norm_act_coef", mutates_args=())
def batch_norm_act_coef_op(grad_out: Tensor, out: Optional[Tensor], y: Tensor, mean: Tensor, var: Tensor,
                           weight: Optional[Tensor], identity: Optional[Tensor], id_mean: Optional[Tensor],
                           id_var: Optional[Tensor], id_weight: Optional[Tensor], eps: float, id_eps: float,
                           relu: bool, need_weight: bool, need_bias: bool, need_id_weight: bool, need_id_bias: bool,
                           weight_dtype: Optional[torch.dtype], id_weight_dtype: Optional[torch.dtype],
                           backend: str) -> List[Tensor]:
    """[coef, id_coef, grad_weight, grad_bias, grad_id_weight, grad_id_bias] (see
    ``batch_norm_act_coef``): always six tensors; id_coef is empty (shape (0,)) without id_mean, a
    parameter gradient not requested is empty."""
    call = coef_call(grad_out, out, y, mean, var, weight, identity, id_mean, id_var, id_weight, eps, id_eps, relu,
                     need_weight, need_bias, need_id_weight, need_id_bias, weight_dtype, id_weight_dtype)
    g = grad_out
    if g.numel() == 0:
        _tune.check_requested(OP_COEF, backend, call)
        return _empty_batch_coef(call)
    return _tune.dispatch(OP_COEF, backend, call)


def _empty_batch_coef(call: CoefCall) -> List[Tensor]:
    """An empty batch: every sum is 0, so B = K = 0 and the parameter gradients are 0; A = weight *
    invstd as always."""
    from ..backends.torch_batch_norm import coefficients

    outs = _coef_outputs(call.grad_out, call.C, call.id_mean is not None, call.needs, call.pdtypes, fake=False)
    acc = acc_dtype(call.dtype)
    zero = torch.zeros(call.C, dtype=acc, device=call.device)
    coefficients(outs[0], call.var, call.weight, call.eps, zero, zero)
    if call.id_mean is not None:
        coefficients(outs[1], call.id_var, call.id_weight, call.id_eps, zero, zero)
    for v in outs[2:]:
        v.zero_()
    return outs


@batch_norm_act_coef_op.register_fake
def _(grad_out, out, y, mean, var, weight, identity, id_mean, id_var, id_weight, eps, id_eps, relu, need_weight,
      need_bias, need_id_weight, need_id_bias, weight_dtype, id_weight_dtype, backend):
    needs = (need_weight, need_bias, need_id_weight, need_id_bias)
    _validate_coef(grad_out, out, y, mean, var, weight, identity, id_mean, id_var, id_weight, relu, needs)
    return _coef_outputs(grad_out, grad_out.shape[1], id_mean is not None, needs,
                         (weight_dtype, weight_dtype, id_weight_dtype, id_weight_dtype), fake=True)


register_not_differentiable(batch_norm_act_coef_op,
                            f"{OP_COEF} is not differentiable: it computes part of a backward (the BatchNorm "
                            f"backward's coefficients); double backward through it is not supported")
_batch_norm_act_coef = Eager(batch_norm_act_coef_op)


def batch_norm_act_coef(grad_out: Tensor, out: Optional[Tensor], y: Tensor, mean: Tensor, var: Tensor,
                        weight: Optional[Tensor] = None, identity: Optional[Tensor] = None,
                        id_mean: Optional[Tensor] = None, id_var: Optional[Tensor] = None,
                        id_weight: Optional[Tensor] = None, *, eps: float = 1e-5, id_eps: float = 1e-5,
                        relu: bool = True, need_weight: bool = False, need_bias: bool = False,
                        need_id_weight: bool = False, need_id_bias: bool = False,
                        weight_dtype: Optional[torch.dtype] = None, id_weight_dtype: Optional[torch.dtype] = None,
                        backend: Optional[str] = None) -> List[Tensor]:
    """The per-channel coefficients of ``batch_norm_act``'s input gradients, and its parameter
    gradients, without computing grad_y (the reduce + finalize half of its backward).

    Arguments as ``batch_norm_act``'s backward sees them: ``grad_out`` the gradient of its output,
    ``out`` its saved output (the ReLU mask; required when relu), y, mean, var, weight, and the
    identity with its own BN (identity, id_mean, id_var, id_weight) or None. A raw identity (no
    id_mean) has no coefficients (its gradient is g) and is ignored.

    Returns ``[coef, id_coef, grad_weight, grad_bias, grad_id_weight, grad_id_bias]``, always six
    tensors (a ``torch.library`` op cannot return None):

    * coef (3, C) in acc (float32; float64 for float64 activations): rows (A, B, K) with
      A = weight * invstd (weight None: invstd), B = A * sum(g) / m, K = A * invstd^2 * sum(g * (y -
      mean)) / m, so that batch_norm_act_backward's grad_y = A * g - (B + K * (y - mean)) (g the
      masked gradient; m = N*H*W; sums in a fixed order);
    * id_coef (3, C) likewise for the identity's BN when id_mean is given, else empty (shape (0,));
    * the parameter gradients as batch_norm_act_backward returns them, each (C,) in
      weight_dtype/id_weight_dtype (None: acc) when its need_* flag is set, else empty.

    Not differentiable (it is part of a backward)."""
    check_tensor_args(OP_COEF, ("out", "weight", "identity", "id_mean", "id_var", "id_weight"), grad_out=grad_out,
                      out=out, y=y, mean=mean, var=var, weight=weight, identity=identity, id_mean=id_mean,
                      id_var=id_var, id_weight=id_weight)
    tensors = (grad_out, out, y, mean, var, weight, identity, id_mean, id_var, id_weight)
    args = tensors + (_check_float(OP_COEF, "eps", eps), _check_float(OP_COEF, "id_eps", id_eps),
                      check_bool(OP_COEF, "relu", relu), check_bool(OP_COEF, "need_weight", need_weight),
                      check_bool(OP_COEF, "need_bias", need_bias),
                      check_bool(OP_COEF, "need_id_weight", need_id_weight),
                      check_bool(OP_COEF, "need_id_bias", need_id_bias), weight_dtype, id_weight_dtype,
                      _backend.op_arg(backend))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        # through the dispatcher: the op's autograd (a backward that raises) is attached to the
        # outputs (the eager fast path would record the implementation's own torch ops instead)
        return batch_norm_act_coef_op(*args)
    return _batch_norm_act_coef(*args)


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    y, mean, var, weight, bias, identity, id_mean, id_var, id_weight, id_bias, eps, id_eps, relu, backend = inputs
    ctx.eps, ctx.id_eps, ctx.relu, ctx.backend = eps, id_eps, relu, backend
    ctx.has_bias, ctx.has_id_bias = bias is not None, id_bias is not None
    ctx.pdt = (weight.dtype if weight is not None else None, bias.dtype if bias is not None else None,
               id_weight.dtype if id_weight is not None else None, id_bias.dtype if id_bias is not None else None)
    # the identity is saved even when raw (its gradient is then the masked gradient, written by the
    # same pass): it is the block's input or shortcut, which the convolutions save anyway
    ctx.save_for_backward(output if relu else None, y, mean, var, weight, identity, id_mean, id_var, id_weight)


def _backward(ctx, grad):
    return backward_with(ctx, grad, _batch_norm_act_backward)


def backward_with(ctx, grad, run):
    """The op's backward with ``run`` (the ``batch_norm_act_backward`` op's signature) computing the
    gradients: the op itself, or a fused unit's validated plan of it (resnet_kernels/_unitplan.py)."""
    out, y, mean, var, weight, identity, id_mean, id_var, id_weight = ctx.saved_tensors
    n = ctx.needs_input_grad
    ny, nw, nb, ni, niw, nib = bool(n[0]), bool(n[3]), bool(n[4]), bool(n[5]), bool(n[8]), bool(n[9])
    if grad is None or not (ny or nw or nb or ni or niw or nib):
        return (None,) * 14
    # autograd may hand any strides (e.g. the expanded gradient of .sum()): y's layout (a no-op when it is)
    grad = in_layout_of(grad, y)
    w_dt, b_dt, iw_dt, ib_dt = ctx.pdt
    ni = ni and identity is not None
    gy, gi, gw, gb, giw, gib = run(
        grad, out, y, mean, var, weight, identity, id_mean, id_var, id_weight, ctx.eps, ctx.id_eps, ctx.relu, ny, ni,
        nw and weight is not None, nb and ctx.has_bias, niw and id_weight is not None, nib and ctx.has_id_bias,
        w_dt or b_dt, iw_dt or ib_dt, ctx.backend)
    return (gy if ny else None, None, None,
            _as(gw, w_dt) if (nw and weight is not None) else None,
            _as(gb, b_dt) if (nb and ctx.has_bias) else None,
            gi if ni else None, None, None,
            _as(giw, iw_dt) if (niw and id_weight is not None) else None,
            _as(gib, ib_dt) if (nib and ctx.has_id_bias) else None,
            None, None, None, None)


def _as(t: Tensor, dt) -> Tensor:
    return t if dt is None or t.dtype == dt else t.to(dt)


batch_norm_act_op.register_autograd(_backward, setup_context=_setup_context)
_batch_norm_act = Eager(batch_norm_act_op, _setup_context, _backward)


# --------------------------------------------------------------------------------------------
# running statistics
# --------------------------------------------------------------------------------------------
# The op takes lists (one entry per BatchNorm) with the buffers compacted: ``buffers[i]`` says which of
# update i's running_mean (1), running_var (2), num_batches_tracked (4) are present, and the three
# buffer lists hold the present ones in update order (torch.compile cannot functionalise a mutated
# list holding None).
_HAS = (1, 2, 4)


def _expand(mean, var, running_mean, running_var, num_batches_tracked, buffers, factor, unbias, op: str = OP_UPDATE,
            stats: str = "") -> List[RunningUpdate]:
    """The op's list arguments as one RunningUpdate per BatchNorm, validated (messages name the
    argument, with its index when the call updates several BatchNorms; ``stats``: the prefix of the
    statistics' argument names, "run_" in batch_norm_act_bits)."""
    n = len(mean)
    for name, v in ((stats + "var", var), ("buffers", buffers), ("factor", factor), ("unbias", unbias)):
        if len(v) != n:
            raise ValueError(f"{op}: {name} must have one entry per BatchNorm ({n}, as {stats}mean), got {len(v)}")
    lists = (running_mean, running_var, num_batches_tracked)
    pos = [0, 0, 0]
    updates = []
    for i in range(n):
        b = buffers[i]
        if not isinstance(b, int) or not 0 <= b <= 7:
            raise ValueError(f"{op}: buffers[{i}] must be a bit set of 1 (running_mean), 2 (running_var), "
                             f"4 (num_batches_tracked), got {b!r}")
        bufs = []
        for k, (name, lst) in enumerate(zip(_BUFFERS, lists)):
            if b & _HAS[k]:
                if pos[k] >= len(lst):
                    raise ValueError(f"{op}: {name} has {len(lst)} tensors, fewer than buffers says are present")
                bufs.append(lst[pos[k]])
                pos[k] += 1
            else:
                bufs.append(None)
        updates.append(RunningUpdate(mean[i], var[i], *bufs, factor[i], unbias[i]))
    for name, lst, k in zip(_BUFFERS, lists, pos):
        if len(lst) != k:
            raise ValueError(f"{op}: {name} has {len(lst)} tensors, buffers says {k} are present")
    _validate_update(updates, op, stats)
    return updates


def _validate_update(updates: List[RunningUpdate], op: str = OP_UPDATE, stats: str = "") -> None:
    several = len(updates) > 1

    def nm(name, i):
        return f"{name}[{i}]" if several else name

    for i, u in enumerate(updates):
        mean, var = u.mean, u.var
        for name, t in ((stats + "mean", mean), (stats + "var", var)):
            if not isinstance(t, Tensor) or t.dim() != 1 or not t.is_floating_point():
                raise ValueError(f"{op}: {nm(name, i)} must be a 1-D floating-point tensor of per-channel statistics")
        C = mean.shape[0]
        if var.shape != mean.shape or var.device != mean.device:
            raise ValueError(f"{op}: {nm(stats + 'var', i)} must match {nm(stats + 'mean', i)} (shape "
                             f"{tuple(mean.shape)}, device {mean.device}), got shape {tuple(var.shape)} on "
                             f"{var.device}")
        for name, t in (("running_mean", u.running_mean), ("running_var", u.running_var)):
            if t is None:
                continue
            if t.dim() != 1 or t.shape[0] != C or not t.is_floating_point() or t.device != mean.device:
                raise ValueError(f"{op}: {nm(name, i)} must be a 1-D floating-point tensor of C={C} values on "
                                 f"{mean.device}, got shape {tuple(t.shape)} {t.dtype} on {t.device}")
            if not t.is_contiguous():
                raise ValueError(f"{op}: {nm(name, i)} must be contiguous (it is updated in place)")
        if u.num_batches_tracked is not None:
            t = u.num_batches_tracked
            if t.numel() != 1 or t.dtype != torch.long or t.device != mean.device:
                raise ValueError(f"{op}: {nm('num_batches_tracked', i)} must be a one-element int64 tensor on "
                                 f"{mean.device}, got shape {tuple(t.shape)} {t.dtype} on {t.device}")
        if i and mean.device != updates[0].mean.device:
            raise ValueError(f"{op}: {nm(stats + 'mean', i)} is on {mean.device}, {stats}mean[0] on "
                             f"{updates[0].mean.device} (one launch, one device)")
    # the implementations update every buffer of the call at once: each may appear once
    if not _any_overlap(updates):
        return
    seen = []  # (some buffers overlap: the pairwise scan names the first pair, in call order)
    for i, u in enumerate(updates):
        for name, t in zip(_BUFFERS, u[2:5]):
            if t is None:
                continue
            for other, j, s in seen:
                if _overlap(t, s):
                    raise ValueError(f"{op}: {nm(name, i)} shares memory with {nm(other, j)}: each buffer may be "
                                     f"updated once per call (apply such updates in separate calls, in order)")
            seen.append((name, i, t))


def _any_overlap(updates: List[RunningUpdate]) -> bool:
    """False when no two buffers of the call share memory (``_overlap``'s rule), from one sweep over
    the buffers' byte ranges sorted per storage instead of comparing every pair (a block's 4
    BatchNorms have 12 buffers: 66 pairs, two storage lookups each). True when some may: the
    pairwise scan then decides and names the pair (also for what the sweep does not model: an
    empty buffer, a tensor without storage)."""
    ids = set()
    spans = []
    for u in updates:
        for t in u[2:5]:
            if t is None:
                continue
            if id(t) in ids:
                return True
            ids.add(id(t))
            n = t.numel()
            if n == 0:
                return True
            try:
                st = t.untyped_storage()
            except (RuntimeError, NotImplementedError):
                return True
            a0 = t.storage_offset() * t.element_size()
            spans.append((st._cdata, a0, a0 + n * t.element_size()))
    spans.sort()
    storage, end = None, 0
    for cdata, a0, a1 in spans:
        if cdata == storage and a0 < end:
            return True
        if cdata != storage:
            storage, end = cdata, a1
        elif a1 > end:
            end = a1
    return False


def _storage_id(t: Tensor):
    """t's storage's identity, or None for a tensor without one (tracing wrappers: the op checks the
    real tensors when it runs)."""
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return None


def _overlap(a: Tensor, b: Tensor) -> bool:
    """Whether two contiguous tensors share memory (same storage, intersecting element ranges)."""
    if a is b:
        return True
    try:
        sa, sb = a.untyped_storage(), b.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return False  # a wrapper without storage (tracing): the op checks the real tensors when it runs
    if sa._cdata != sb._cdata:
        return False
    a0, b0 = a.storage_offset() * a.element_size(), b.storage_offset() * b.element_size()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def update_call(mean, var, running_mean, running_var, num_batches_tracked, buffers, factor,
                unbias) -> UpdateCall:
    return update_call_of(_expand(mean, var, running_mean, running_var, num_batches_tracked, buffers, factor, unbias))


def update_call_of(updates: List[RunningUpdate]) -> UpdateCall:
    """The UpdateCall of validated updates (``_expand``'s)."""
    # a BatchNorm without buffers has nothing to update: not handed to the implementations
    return UpdateCall([u._replace(mean=u.mean.contiguous(), var=u.var.contiguous(), factor=float(u.factor),
                                  unbias=float(u.unbias))
                       for u in updates if any(t is not None for t in u[2:5])],
                      updates[0].mean.device if updates else torch.device("cpu"))


# the op's arguments (without backend) -> its call, for the accountant (resnet_kernels/count.py)
CALLS = {OP: forward_call, OP_BACKWARD: backward_call, OP_UPDATE: update_call, OP_COEF: coef_call,
         OP_BITS: bits_call}


@torch.library.custom_op("resnet_kernels::bn_running_update",
                         mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def bn_running_update_op(mean: List[Tensor], var: List[Tensor], running_mean: List[Tensor], running_var: List[Tensor],
                         num_batches_tracked: List[Tensor], buffers: List[int], factor: List[float],
                         unbias: List[float], backend: str) -> None:
    _apply_updates(update_call(mean, var, running_mean, running_var, num_batches_tracked, buffers, factor, unbias),
                   backend)


def _apply_updates(call: UpdateCall, backend: str) -> None:
    if all(u.mean.numel() == 0 for u in call.updates):
        # nothing to dispatch (no BatchNorm with buffers, or only empty ones: C == 0)
        _tune.check_requested(OP_UPDATE, backend, call)
        for u in call.updates:
            if u.num_batches_tracked is not None:
                u.num_batches_tracked.add_(1)
        return
    _tune.dispatch(OP_UPDATE, backend, call)


@bn_running_update_op.register_fake
def _(mean, var, running_mean, running_var, num_batches_tracked, buffers, factor, unbias, backend):
    _expand(mean, var, running_mean, running_var, num_batches_tracked, buffers, factor, unbias)


_bn_running_update = Eager(bn_running_update_op)


# --------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------
def batch_norm_act(y: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, identity: Optional[Tensor] = None, id_mean: Optional[Tensor] = None,
                   id_var: Optional[Tensor] = None, id_weight: Optional[Tensor] = None,
                   id_bias: Optional[Tensor] = None, *, eps: float = 1e-5, id_eps: float = 1e-5, relu: bool = True,
                   backend: Optional[str] = None) -> Tensor:
    """act(bn(y) + R) with bn using the batch statistics ``mean``/``var`` of y (see the module
    docstring): y, identity (N, C, H, W) in one layout and dtype; per-channel tensors (C,), float32
    or the activation dtype."""
    check_tensor_args(OP, ("weight", "bias", "identity", "id_mean", "id_var", "id_weight", "id_bias"), y=y, mean=mean,
                      var=var, weight=weight, bias=bias, identity=identity, id_mean=id_mean, id_var=id_var,
                      id_weight=id_weight, id_bias=id_bias)
    return _batch_norm_act(y, mean, var, weight, bias, identity, id_mean, id_var, id_weight, id_bias,
                             _check_float(OP, "eps", eps), _check_float(OP, "id_eps", id_eps),
                             check_bool(OP, "relu", relu), _backend.op_arg(backend))


def batch_norm_act_bits(y: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor] = None,
                        bias: Optional[Tensor] = None, identity: Optional[Tensor] = None,
                        id_mean: Optional[Tensor] = None, id_var: Optional[Tensor] = None,
                        id_weight: Optional[Tensor] = None, id_bias: Optional[Tensor] = None, *, eps: float = 1e-5,
                        id_eps: float = 1e-5, relu: bool = True, updates: Sequence[RunningUpdate] = (),
                        backend: Optional[str] = None) -> List[Tensor]:
    """``batch_norm_act`` that also returns the 1-bit mask of out > 0: ``[out, bits]``, bits a
    contiguous uint8 (N, H, W, ceil(C/8)) tensor (resnet_kernels/_bits.py), written by the same
    kernel where the implementation can (triton; cuda/aten pack it afterwards with torch ops). What
    the training block's tail runs (resnet_kernels/_block.py): its backward reads the bits instead
    of out. Not differentiable (the block's own backward computes the gradients).

    ``updates``: running-statistics updates (``RunningUpdate``s, as ``bn_running_update_many``
    takes them: the block's BatchNorms') applied after the output is written, by the same launch on
    triton and cuda (up to 4: no launch of their own), else by the backend's ``bn_running_update``;
    no buffer in two of them nor sharing memory with an input. All or nothing: every argument is
    checked before the launch, so a call that raises has changed no buffer."""
    check_tensor_args(OP_BITS, ("weight", "bias", "identity", "id_mean", "id_var", "id_weight", "id_bias"), y=y,
                      mean=mean, var=var, weight=weight, bias=bias, identity=identity, id_mean=id_mean, id_var=id_var,
                      id_weight=id_weight, id_bias=id_bias)
    tensors = (y, mean, var, weight, bias, identity, id_mean, id_var, id_weight, id_bias)
    args = tensors + (_check_float(OP_BITS, "eps", eps), _check_float(OP_BITS, "id_eps", id_eps),
                      check_bool(OP_BITS, "relu", relu)) + _update_lists(_checked_updates(OP_BITS, updates)) + (
                          _backend.op_arg(backend),)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        # through the dispatcher: PyTorch's autograd fallback (a backward that raises) is attached to the outputs
        return batch_norm_act_bits_op(*args)
    return _batch_norm_act_bits(*args)


def bn_running_update(mean: Tensor, var: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                      num_batches_tracked: Optional[Tensor] = None, *, factor: float, unbias: float,
                      backend: Optional[str] = None) -> None:
    """running = (1 - factor) running + factor (mean, var * unbias); num_batches_tracked += 1."""
    check_tensor_args(OP_UPDATE, ("running_mean", "running_var", "num_batches_tracked"), mean=mean, var=var,
                      running_mean=running_mean, running_var=running_var, num_batches_tracked=num_batches_tracked)
    _update([RunningUpdate(mean, var, running_mean, running_var, num_batches_tracked,
                           _check_float(OP_UPDATE, "factor", factor), _check_float(OP_UPDATE, "unbias", unbias))],
            backend)


def bn_running_update_many(updates: Sequence[RunningUpdate], *, backend: Optional[str] = None) -> None:
    """Several BatchNorms' ``bn_running_update`` in one call (one launch for up to 4 on cuda and
    triton: a residual block's): ``updates`` are (mean, var, running_mean, running_var,
    num_batches_tracked, factor, unbias) tuples (``RunningUpdate``), buffers None where absent, no
    buffer in two of them. All or nothing: a call that raises has changed no buffer."""
    _update(_checked_updates(OP_UPDATE, updates), backend)


def _checked_updates(op: str, updates) -> List[RunningUpdate]:
    """``updates`` (a sequence of 7-tuples) as RunningUpdates, their types checked."""
    if isinstance(updates, (Tensor, str, bytes)) or not hasattr(updates, "__iter__"):
        raise TypeError(f"{op}: updates must be a sequence of RunningUpdate tuples, got {type(updates).__name__}")
    checked = []
    for i, u in enumerate(updates):
        if not isinstance(u, tuple) or len(u) != 7:
            raise TypeError(f"{op}: updates[{i}] must be a (mean, var, running_mean, running_var, "
                            f"num_batches_tracked, factor, unbias) tuple, got {type(u).__name__}")
        mean, var, rm, rv, nbt, factor, unbias = u
        check_tensor_args(op, (f"running_mean[{i}]", f"running_var[{i}]", f"num_batches_tracked[{i}]"),
                          **{f"mean[{i}]": mean, f"var[{i}]": var, f"running_mean[{i}]": rm,
                             f"running_var[{i}]": rv, f"num_batches_tracked[{i}]": nbt})
        checked.append(RunningUpdate(mean, var, rm, rv, nbt, _check_float(op, f"factor[{i}]", factor),
                                     _check_float(op, f"unbias[{i}]", unbias)))
    return checked


def _update_lists(updates: List[RunningUpdate]) -> tuple:
    """The op's list arguments of these updates: (mean, var, running_mean, running_var,
    num_batches_tracked, buffers, factor, unbias), the buffers compacted (``_HAS``), the
    statistics detached (the update is not differentiable)."""
    lists = ([], [], [])
    buffers = []
    for u in updates:
        b = 0
        for k, t in enumerate(u[2:5]):
            if t is not None:
                lists[k].append(t)
                b |= _HAS[k]
        buffers.append(b)
    return ([u.mean.detach() for u in updates], [u.var.detach() for u in updates], *lists, buffers,
            [u.factor for u in updates], [u.unbias for u in updates])


def _update(updates: List[RunningUpdate], backend: Optional[str]) -> None:
    with torch.no_grad():
        _bn_running_update(*_update_lists(updates), _backend.op_arg(backend))


__all__ = ["batch_norm_act", "bn_running_update", "bn_running_update_many", "RunningUpdate"]
