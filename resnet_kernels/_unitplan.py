"""Validated plans of the fused units: the host-time hot path of ``resnet_kernels.functional``.

A fused unit in plain eager execution runs, per call, every op's whole path: the public function's
checks, the eager fast path (``_eager.py``), the op's validation, its Call, the registry's
resolution, the launcher, plus the functional layer around them (``batch_stats_args``,
``commit``). On small tensors that is ~60 us per op on this project's CPU machine: what a GPU step
pays on its host (issue 10 part 3). A unit's *plan* is the validated Calls of one such call,
captured as ``_tune.dispatch`` receives them, kept per BatchNorm module (a few per module, e.g. for
a training and a validation batch shape) and keyed on everything the ops' validation reads: the
shape, strides, dtype and device of every tensor argument, the modules' hyperparameters (conv
geometry, BN eps/momentum/mode, affine and tracked buffers), the requested backend, and the running
buffers' addresses (the running-statistics update refuses overlapping buffers). A later call with
the same key rebinds the Calls to its own tensors and runs each op as ``_tune.dispatch`` does for an
explicit backend (``_registry.resolve_explicit`` on every call: registry changes, availability,
``supports(call)`` and the deterministic mode are read as usual; then ``call.run``), the training
unit's ops under one autograd function whose backward is the ops' own backward formulas
(``_setup_context``/``_backward`` of ``batch_norm_act`` and ``conv2d_stats``), the
running-statistics update after the output, as ``commit`` does. Same launchers, same tensors, same
order, same side effects: the same numbers.

A call whose key has no plan takes the whole path, which validates (and raises exactly what it
raises: a failed call makes no plan) and, when it succeeded, makes the plan from the Calls it
dispatched. So a parameter moved by ``.to()``, a dtype or layout change, a replaced parameter or
buffer (another address or geometry), ``train()``/``eval()``, another batch shape or another
backend all miss; values (optimizer steps, ``load_state_dict``, running statistics) are not part of
any validation and are read by the launchers on every call, as before.

Only for explicit backends (``backend='cuda'``, ``use_backend('aten')``, ...; ``'auto'`` measures per
call on a GPU) in plain eager execution (``_eager._globally_plain``: no torch.compile, dispatch or
function mode such as the accountant's, functorch or profiler), without ``explain``'s recorder or the
DEBUG log (both want each op's decision), on plain tensors (no subclass), outside autocast, and for
the common units: a training unit whose BatchNorms use batch statistics through ``batch_norm_act``
(no conv bias, not a synchronising SyncBatchNorm, a non-empty batch; a raw identity or a projection
whose BatchNorm is another module in training too) and an eval unit's ``conv2d_epilogue`` when no
gradient is needed. ``RESNET_KERNELS_UNIT_PLANS=0`` (read at import) turns plans off.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any

import torch
from torch import Tensor

from . import _eager, _registry, _tune
from ._checks import acc_dtype, channel_vector, layout_of
from ._numerics import cudnn_conv_tf32_enabled
from .ops import batch_norm as _bn_ops
from .ops import conv2d as _conv_ops

ENABLED = os.environ.get("RESNET_KERNELS_UNIT_PLANS", "1").strip().lower() not in ("0", "false", "off", "no")
MAX_PLANS = 4  # per BatchNorm module (e.g. a training and an evaluation batch shape, both layouts)

_Parameter = torch.nn.Parameter
_Sync = torch.nn.SyncBatchNorm  # (its statistics depend on the process group: never planned)
_F32 = torch.float32
_OP_STATS, _OP_EPI = _conv_ops.OP_STATS, _conv_ops.OP_EPILOGUE
_OP_BN, _OP_UPD, _OP_BWD = _bn_ops.OP, _bn_ops.OP_UPDATE, _bn_ops.OP_BACKWARD
_resolve = _registry.resolve_explicit
_NO_PLAN = object()  # a key whose unit does not fit a plan (remembered: not captured again)

# module -> {key: plan or _NO_PLAN}; weak, so a plan never keeps a module (or its tensors) alive
_plans: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_log_debug = _tune.log.isEnabledFor
_DEBUG = logging.DEBUG


def clear() -> None:
    """Forget every plan (tests)."""
    _plans.clear()


def count() -> int:
    """How many plans exist (tests)."""
    return sum(1 for d in list(_plans.values()) for p in d.values() if p is not _NO_PLAN)


def _usable(requested: str) -> bool:
    """Whether this call may use (or make) a plan: an explicit backend, plain eager, no recorder or
    debug log."""
    return (ENABLED and requested != "auto" and _eager._globally_plain() and _tune._recorder.get() is None
            and not _log_debug(_DEBUG))


_SUB = object()  # in a key: a tensor subclass or a non-tensor (no plan)


def _sig(t) -> Any:
    """What validation reads of an optional tensor argument; _SUB for a tensor subclass or
    anything else (no plan)."""
    if t is None:
        return None
    tt = type(t)
    if tt is not Tensor and tt is not _Parameter:
        return _SUB
    return (t.shape, t.stride(), t.dtype, t.device)


def _buf(t) -> Any:
    """A running buffer: also its address (the update's overlap check reads it)."""
    if t is None:
        return None
    if type(t) is not Tensor and type(t) is not _Parameter:
        return _SUB
    return (t.shape, t.stride(), t.dtype, t.device, t.data_ptr())


def _bn_key(bn) -> tuple:
    return (type(bn), bn.training, bn.track_running_stats, type(bn.momentum), bn.momentum, bn.eps,
            _sig(bn.weight), _sig(bn.bias),
            _buf(bn.running_mean), _buf(bn.running_var), _buf(bn.num_batches_tracked))


def _conv_key(xin, conv, padding) -> tuple:
    w = conv.weight
    return (_sig(xin), _sig(w), conv.stride, padding, conv.dilation, conv.groups, conv.bias is None)


def _bad(key: tuple) -> bool:
    """A key holding a tensor subclass or a non-tensor (``_sig`` gave _SUB): no plan."""
    for part in key:
        if part is _SUB:
            return True
        if type(part) is tuple:
            for e in part:
                if e is _SUB:
                    return True
    return False


def _lookup(owner, key):
    d = _plans.get(owner)
    return None if d is None else d.get(key)


def _store(owner, key, plan) -> None:
    d = _plans.get(owner)
    if d is None:
        d = _plans[owner] = {}
    elif len(d) >= MAX_PLANS and key not in d:
        d.pop(next(iter(d)))  # the oldest
    d[key] = plan


class _Capture:
    """Collects the Calls ``_tune.dispatch`` receives while a unit's whole path runs."""

    def __init__(self):
        self.calls = []

    def __enter__(self):
        self.token = _tune._capture.set(self.calls)
        return self.calls

    def __exit__(self, *exc):
        _tune._capture.reset(self.token)
        return False


def _clone_call(call, **tensors):
    """A Call of the same class with the same fields, some replaced (no __init__: nothing re-validated)."""
    new = object.__new__(type(call))
    d = new.__dict__
    d.update(call.__dict__)
    d.update(tensors)
    return new


def _template(call, *names):
    """``call`` with its tensors dropped (a plan keeps no activation alive)."""
    return _clone_call(call, **{n: None for n in names})


_CONV_TENSORS = ("x", "weight", "scale", "bias", "residual")
_BN_TENSORS = ("y", "mean", "var", "weight", "bias", "identity", "id_mean", "id_var", "id_weight", "id_bias")


# --------------------------------------------------------------------------------------------
# eval: conv2d_epilogue
# --------------------------------------------------------------------------------------------
class _EvalPlan:
    __slots__ = ("conv",)

    def __init__(self, conv):
        self.conv = conv


def eval_unit(xin, weight, scale, shift, residual, conv, padding, relu: bool, requested: str, full):
    """``conv2d_epilogue(xin, weight, scale, shift, residual, ...)`` through the plan of ``conv``
    (the eval unit's module) when no gradient is needed; ``full()`` runs the whole path."""
    if not _usable(requested):
        return full()
    key = (_OP_EPI, requested, relu, _sig(xin), _sig(weight), _sig(scale), _sig(shift), _sig(residual), conv.stride,
           padding, conv.dilation, conv.groups)
    if _bad(key) or key[3] is None or key[4] is None or key[3][3].type == "meta":
        return full()
    if torch.is_grad_enabled() and (xin.requires_grad or weight.requires_grad
                                    or (scale is not None and scale.requires_grad)
                                    or (shift is not None and shift.requires_grad)
                                    or (residual is not None and residual.requires_grad)):
        return full()  # (the op's autograd)
    plan = _lookup(conv, key)
    if plan is None:
        with _Capture() as calls:
            out = full()
        plan = _NO_PLAN
        if calls and calls[0][0] == _OP_EPI and calls[0][1] == requested:
            plan = _EvalPlan(_template(calls[0][2], *_CONV_TENSORS))
        _store(conv, key, plan)
        return out
    if plan is _NO_PLAN:
        return full()
    tpl = plan.conv
    acc = acc_dtype(xin.dtype)
    call = _clone_call(tpl, x=xin, weight=_conv_ops._dense_weight(weight), scale=channel_vector(scale, acc),
                       bias=channel_vector(shift, acc), residual=residual,
                       allow_tf32=xin.dtype is _F32 and cudnn_conv_tf32_enabled())
    impl = _resolve(_OP_EPI, requested, call, call.device)
    if impl is None:
        return full()
    return call.run(impl)[0]


# --------------------------------------------------------------------------------------------
# training: conv2d_stats [+ the projection's] -> batch_norm_act -> bn_running_update
# --------------------------------------------------------------------------------------------
class _Rec:
    """Stands in for an autograd ctx while an op's own ``setup_context`` runs (records what it
    saves and sets), and for it again in the op's own ``backward``."""

    def __init__(self):
        self.saved = ()

    def save_for_backward(self, *ts):
        self.saved = ts

    def set_materialize_grads(self, value):
        pass


class _TrainPlan:
    __slots__ = ("conv", "rconv", "bn", "upd", "y_layout", "bwd")

    def __init__(self, conv, rconv, bn, upd, y_layout):
        self.conv, self.rconv, self.bn, self.upd = conv, rconv, bn, upd
        self.y_layout = y_layout
        self.bwd = {}  # batch_norm_act_backward's validated calls: key -> template or _NO_PLAN

    def run_backward(self, grad, out, y, mean, var, weight, identity, id_mean, id_var, id_weight, eps, id_eps, relu,
                     ny, ni, nw, nb, niw, nib, w_dt, iw_dt, requested):
        """The ``batch_norm_act_backward`` op (its signature) for this unit's backward: its validated
        call rebound (the saved tensors' geometry is the forward plan's; the key adds the gradient's
        and the flags), else the op (which validates), whose call becomes the template."""
        args = (grad, out, y, mean, var, weight, identity, id_mean, id_var, id_weight, eps, id_eps, relu, ny, ni, nw,
                nb, niw, nib, w_dt, iw_dt, requested)
        if not _usable(requested):
            return _bn_ops._batch_norm_act_backward(*args)
        key = (_sig(grad), ny, ni, nw, nb, niw, nib, w_dt, iw_dt)
        tpl = self.bwd.get(key)
        if tpl is None:
            with _Capture() as calls:
                res = _bn_ops._batch_norm_act_backward(*args)
            ok = len(calls) == 1 and calls[0][0] == _OP_BWD and calls[0][1] == requested and key[0] is not _SUB
            self.bwd[key] = _template(calls[0][2], *_BWD_TENSORS) if ok else _NO_PLAN
            return res
        if tpl is _NO_PLAN:
            return _bn_ops._batch_norm_act_backward(*args)
        g = grad
        call = _clone_call(tpl, grad_out=g, out=out if relu else None, y=y, mean=_bn_ops._stat(mean, g),
                           var=_bn_ops._stat(var, g), weight=_bn_ops._param(weight, g),
                           identity=identity if (id_mean is not None or ni) else None,
                           id_mean=None if id_mean is None else _bn_ops._stat(id_mean, g),
                           id_var=None if id_var is None else _bn_ops._stat(id_var, g),
                           id_weight=_bn_ops._param(id_weight, g))
        impl = _resolve(_OP_BWD, requested, call, call.device)
        if impl is None:
            return _tune.dispatch(_OP_BWD, requested, call)
        return call.run(impl)


_BWD_TENSORS = ("grad_out", "out", "y", "mean", "var", "weight", "identity", "id_mean", "id_var", "id_weight")


def _factor_unbias(bn, m: int, count: bool, running: bool):
    """``batch_stats_args``' factor (the module's momentum, or the cumulative average's) and unbias."""
    if bn.momentum is None:
        factor = 1.0 / (float(bn.num_batches_tracked) + 1.0) if count else 0.0
    else:
        factor = bn.momentum
    return float(factor), float(m / (m - 1))


def _update_entry(bn, mean, var, m: int):
    count = bn.training and bn.track_running_stats and bn.num_batches_tracked is not None
    running = bn.training and bn.running_mean is not None
    if not (count or running):
        return None
    factor, unbias = _factor_unbias(bn, m, count, running)
    rm, rv = (bn.running_mean, bn.running_var) if running else (None, None)
    return _bn_ops.RunningUpdate(mean.contiguous(), var.contiguous(), rm, rv,
                                 bn.num_batches_tracked if count else None, factor, unbias)


def _in_layout(t: Tensor, layout: str) -> Tensor:
    """``_checks.in_layout_of(t, ref)`` for a ref whose ``layout_of`` is ``layout``."""
    if layout == "nhwc":
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


def _run_conv(tpl, requested, x, w):
    call = _clone_call(tpl, x=x, weight=_conv_ops._dense_weight(w),
                       allow_tf32=x.dtype is _F32 and cudnn_conv_tf32_enabled())
    impl = _resolve(_OP_STATS, requested, call, call.device)
    if impl is None:  # the backend now leaves this op to 'auto' (a registry change): the dispatcher's way
        return _tune.dispatch(_OP_STATS, requested, call)
    return call.run(impl)


def _forward(plan: _TrainPlan, requested, bn, rbn, xin, w, bw, bb, ident, rx, rw, rbw, rbb, eps, id_eps, relu,
             need_saves: bool):
    """The unit's ops; returns (out, [(setup_context recorder, inputs)] or None)."""
    y, mean, var = _run_conv(plan.conv, requested, xin, w)
    r = rmean = rvar = None
    if plan.rconv is not None:
        r, rmean, rvar = _run_conv(plan.rconv, requested, rx, rw)
        ident = _in_layout(r, plan.y_layout)
    bn_args = (y, mean, var, bw, bb, ident, rmean, rvar, rbw, rbb, eps, id_eps, relu, requested)
    call = _clone_call(plan.bn, y=y, mean=_bn_ops._stat(mean, y), var=_bn_ops._stat(var, y),
                       weight=_bn_ops._param(bw, y), bias=_bn_ops._param(bb, y), identity=ident,
                       id_mean=None if rmean is None else _bn_ops._stat(rmean, y),
                       id_var=None if rvar is None else _bn_ops._stat(rvar, y),
                       id_weight=_bn_ops._param(rbw, y), id_bias=_bn_ops._param(rbb, y))
    impl = _resolve(_OP_BN, requested, call, call.device)
    out = call.run(impl) if impl is not None else _tune.dispatch(_OP_BN, requested, call)
    if plan.upd is not None:  # as commit(): after the unit's ops succeeded, all BatchNorms in one call
        m = y.numel() // y.shape[1]
        ups = [u for u in (_update_entry(bn, mean, var, m),
                           _update_entry(rbn, rmean, rvar, m) if rbn is not None else None) if u is not None]
        ucall = _clone_call(plan.upd, updates=ups)
        uimpl = _resolve(_OP_UPD, requested, ucall, ucall.device)
        if uimpl is not None:
            ucall.run(uimpl)
        else:
            _tune.dispatch(_OP_UPD, requested, ucall)
    if not need_saves:
        return out, None
    saves = []
    rec = _Rec()
    _bn_ops._setup_context(rec, bn_args, out)
    saves.append(rec)
    rec = _Rec()
    _conv_ops._stats_setup_context(rec, (xin, w, list(plan.conv.stride), list(plan.conv.padding),
                                         list(plan.conv.dilation), plan.conv.groups, requested), (y, mean, var))
    saves.append(rec)
    if plan.rconv is not None:
        rec = _Rec()
        rc = plan.rconv
        _conv_ops._stats_setup_context(rec, (rx, rw, list(rc.stride), list(rc.padding), list(rc.dilation), rc.groups,
                                             requested), (r, rmean, rvar))
        saves.append(rec)
    return out, saves


class _TrainUnit(torch.autograd.Function):
    """One training unit as one autograd node: forward the unit's ops, backward the ops' own
    backward functions in autograd's order (batch_norm_act's, then each convolution's)."""

    @staticmethod
    def forward(ctx, plan, requested, bn, rbn, eps, id_eps, relu, xin, w, bw, bb, ident, rx, rw, rbw, rbb):
        out, saves = _forward(plan, requested, bn, rbn, xin, w, bw, bb, ident, rx, rw, rbw, rbb, eps, id_eps, relu,
                              True)
        tensors = []
        for rec in saves:
            tensors.extend(rec.saved)
            rec.n = len(rec.saved)
            rec.saved = ()
        ctx.recs = saves
        ctx.plan = plan
        ctx.save_for_backward(*tensors)
        return out

    @staticmethod
    def backward(ctx, grad):
        n = ctx.needs_input_grad
        saved = ctx.saved_tensors
        recs = ctx.recs
        pos = 0
        for rec in recs:
            rec.saved_tensors = saved[pos:pos + rec.n]
            pos += rec.n
        try:
            return _TrainUnit._backward(ctx, recs, n, grad)
        finally:
            for rec in recs:  # (the unpacked output's grad_fn is this node: no reference cycle left behind)
                rec.saved_tensors = ()

    @staticmethod
    def _backward(ctx, recs, n, grad):
        # (plan, requested, bn, rbn, eps, id_eps, relu, xin, w, bw, bb, ident, rx, rw, rbw, rbb)
        nx, nw, nbw, nbb, nid, nrx, nrw, nrbw, nrbb = n[7:16]
        bn_rec, conv_rec = recs[0], recs[1]
        proj = len(recs) == 3
        ny = nx or nw
        ni = (nrx or nrw) if proj else nid
        # batch_norm_act's inputs: y, mean, var (conv outputs), weight, bias, identity, id_mean, id_var,
        # id_weight, id_bias
        bn_rec.needs_input_grad = (ny, ny, ny, nbw, nbb, ni, ni and proj, ni and proj, nrbw, nrbb,
                                   False, False, False, False)
        g = _bn_ops.backward_with(bn_rec, grad, ctx.plan.run_backward)
        gy, gbw, gbb, gi, grbw, grbb = g[0], g[3], g[4], g[5], g[8], g[9]
        gx = gw = grx = grw = None
        if ny and gy is not None:
            conv_rec.needs_input_grad = (nx, nw, False, False, False, False, False)
            gx, gw = _conv_ops._stats_backward(conv_rec, gy, None, None)[:2]
        if proj:
            if (nrx or nrw) and gi is not None:
                recs[2].needs_input_grad = (nrx, nrw, False, False, False, False, False)
                grx, grw = _conv_ops._stats_backward(recs[2], gi, None, None)[:2]
            gi = None
        return (None, None, None, None, None, None, None, gx, gw, gbw, gbb, gi, grx, grw, grbw, grbb)


def train_unit(xin, conv, bn, padding, identity, rx, rconv, rbn, rpadding, relu: bool, requested: str, full):
    """relu(bn(conv(xin)) + S) in training, S = ``identity`` (raw, may be None) or, with ``rconv``,
    rbn(rconv(rx)); ``full()`` runs the whole path (``functional``'s). Through the unit's plan where
    one applies (see the module docstring)."""
    if not _usable(requested) or bn is rbn or isinstance(bn, _Sync) or isinstance(rbn, _Sync):
        return full()
    key = (_OP_STATS, requested, relu, _conv_key(xin, conv, padding), _bn_key(bn), _sig(identity),
           None if rconv is None else (_conv_key(rx, rconv, rpadding), _bn_key(rbn)))
    if _bad(key[3]) or _bad(key[4]) or key[5] is _SUB or key[3][0] is None or (
            key[6] is not None and (_bad(key[6][0]) or _bad(key[6][1]) or key[6][0][0] is None)) \
            or xin.device.type == "meta":
        return full()
    plan = _lookup(bn, key)
    if plan is None:
        with _Capture() as calls:
            out = full()
        _store(bn, key, _make_train_plan(calls, requested, rconv is not None, bn, rbn))
        return out
    if plan is _NO_PLAN:
        return full()
    w, bw, bb = conv.weight, bn.weight, bn.bias
    rw = rbw = rbb = None
    if rconv is not None:
        rw, rbw, rbb = rconv.weight, rbn.weight, rbn.bias
        ident = None
    else:
        ident = None if identity is None else _in_layout(identity, plan.y_layout)
    eps = float(bn.eps)
    id_eps = float(rbn.eps) if rbn is not None else 1e-5
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (xin, w, bw, bb, ident, rx, rw, rbw,
                                                                                   rbb)):
        return _TrainUnit.apply(plan, requested, bn, rbn, eps, id_eps, relu, xin, w, bw, bb, ident, rx, rw, rbw, rbb)
    return _forward(plan, requested, bn, rbn, xin, w, bw, bb, ident, rx, rw, rbw, rbb, eps, id_eps, relu, False)[0]


def _make_train_plan(calls, requested: str, proj: bool, bn, rbn):
    """The plan from the Calls the whole path dispatched, or _NO_PLAN where they are not this
    module's path (the general (scale, shift) path, an empty batch, a backend deferring to 'auto')."""
    ops = [c[0] for c in calls]
    want = [_OP_STATS, _OP_STATS, _OP_BN] if proj else [_OP_STATS, _OP_BN]
    has_upd = ops[len(want):] == [_OP_UPD]
    if ops[:len(want)] != want or not (has_upd or len(ops) == len(want)):
        return _NO_PLAN
    if any(c[1] != requested for c in calls):
        return _NO_PLAN
    conv = _template(calls[0][2], *_CONV_TENSORS)
    rconv = _template(calls[1][2], *_CONV_TENSORS) if proj else None
    bcall = calls[len(want) - 1][2]
    if bcall.bits or (bcall.id_mean is not None) != proj:
        return _NO_PLAN
    y_layout = layout_of(bcall.y)
    upd = None
    if has_upd:
        ucall = calls[-1][2]
        n = sum(1 for b in ((bn,) + ((rbn,) if proj else ())) if b.training and (
            (b.track_running_stats and b.num_batches_tracked is not None) or b.running_mean is not None))
        if len(ucall.updates) != n:
            return _NO_PLAN
        upd = _clone_call(ucall, updates=None)
    elif any(b.training and ((b.track_running_stats and b.num_batches_tracked is not None)
                             or b.running_mean is not None) for b in ((bn,) + ((rbn,) if proj else ()))):
        return _NO_PLAN
    return _TrainPlan(conv, rconv, _template(bcall, *_BN_TENSORS), upd, y_layout)


__all__ = ["eval_unit", "train_unit", "clear", "count"]
