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
explicit backend (``_registry.resolve_explicit``: registry changes, availability, ``supports(call)``
and the deterministic mode are read as usual; then ``call.run``); the first such hit binds the plan
to the implementations it resolved (``_Bound``: valid while ``_token`` and the registered backend
are unchanged and it is available, else resolved again), and later hits call their launchers
directly. The training unit's ops run under one autograd function whose backward is the ops' own
backward formulas (``_setup_context``/``_backward`` of ``batch_norm_act`` and ``conv2d_stats``), the
running-statistics update after the output, as ``commit`` does. Same launchers, same tensors, same
order, same side effects: the same numbers. Except where the backend declares a training unit
(``Backend.train_unit``: aten's ``backends/aten_unit.py``, PyTorch's own BatchNorm calls) that takes the
key's tensors: a bound hit then runs that unit and its backward instead of the ops, whose numbers
are PyTorch's BatchNorm's, within rounding of the ops' (docs/DESIGN.md, "A backend's training unit").

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

import importlib
import logging
import os
import weakref
from typing import Any

import torch
from torch import Tensor

from . import _alloc, _eager, _registry, _tune
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
_det = torch._C._get_deterministic_algorithms  # (what torch.are_deterministic_algorithms_enabled returns, without its frame)
_like = _bn_ops._like
_RunningUpdate = _bn_ops.RunningUpdate
_new_out = _conv_ops._new_out
_conv_input_grads = _conv_ops._conv_input_grads
_MF = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}  # what in_layout_of makes of a layout
_empty_like = _alloc.empty_like
_NO_PLAN = object()  # a key whose unit does not fit a plan (remembered: not captured again)

# module -> {key: plan or _NO_PLAN}; weak, so a plan never keeps a module (or its tensors) alive
_plans: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_log_debug = _tune.log.isEnabledFor
_DEBUG = logging.DEBUG


def clear() -> None:
    """Forget every plan and memo (tests)."""
    _plans.clear()
    _memos.clear()
    _tmemos.clear()


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


# what a training key accepts as a tensor argument, parameter or buffer (None: an absent optional)
_KEY_TYPES = frozenset((Tensor, _Parameter, type(None)))


# A module's parameters and buffers are read from its own dicts: what the attribute reads, without
# nn.Module.__getattr__'s Python frame (about 1 us each; a training unit reads a dozen).
def _unit_key(xin, conv, padding, bn):
    """A training key's part for one (conv, BatchNorm) pair, or None where a tensor is a subclass
    or not a tensor (no plan): what validation reads of x, the weight and the BatchNorm's
    parameters and buffers (shape, strides, dtype, device; a running buffer also its address, which
    the update's overlap check reads), the convolution's geometry and bias, the BatchNorm's mode
    and hyperparameters. (One function, no per-tensor calls: this runs once per training unit.)"""
    cp = conv._parameters
    w = cp.get("weight")
    p, b = bn._parameters, bn._buffers
    bw, bb = p.get("weight"), p.get("bias")
    rm, rv, nbt = b.get("running_mean"), b.get("running_var"), b.get("num_batches_tracked")
    tx = type(xin)
    if (tx is not Tensor and tx is not _Parameter) or not {type(w), type(bw), type(bb), type(rm), type(rv),
                                                           type(nbt)} <= _KEY_TYPES:
        return None
    return (xin.shape, xin.stride(), xin.dtype, xin.device,
            None if w is None else (w.shape, w.stride(), w.dtype, w.device),
            conv.stride, padding, conv.dilation, conv.groups, cp.get("bias") is None,
            type(bn), bn.training, bn.track_running_stats, type(bn.momentum), bn.momentum, bn.eps,
            None if bw is None else (bw.shape, bw.stride(), bw.dtype, bw.device),
            None if bb is None else (bb.shape, bb.stride(), bb.dtype, bb.device),
            None if rm is None else (rm.shape, rm.stride(), rm.dtype, rm.device, rm.data_ptr()),
            None if rv is None else (rv.shape, rv.stride(), rv.dtype, rv.device, rv.data_ptr()),
            None if nbt is None else (nbt.shape, nbt.stride(), nbt.dtype, nbt.device, nbt.data_ptr()))


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


def _token(tf32: bool) -> tuple:
    """What a bound plan's resolutions rest on besides its key (``_Bound``): the registry (its
    epoch changes with every registration or removal), the deterministic mode and, for float32
    convolutions, TF32 (both read by ``resolve_explicit`` and the implementations' ``supports``)."""
    return (_registry._epoch, _det(), tf32)


def _current(token, be, requested: str, device, tf32: bool) -> bool:
    """Whether implementations bound under ``token`` for backend ``be`` still are what
    ``resolve_explicit`` would give: the same token, the same registered backend, available here."""
    # (token == _token(tf32), read in place: this runs once per bound forward and backward)
    return (token[0] == _registry._epoch and token[1] == _det() and token[2] == tf32
            and _registry._backends.get(requested) is be and be.available(device) is None)


# --------------------------------------------------------------------------------------------
# eval: conv2d_epilogue
# --------------------------------------------------------------------------------------------
class _EvalPlan:
    __slots__ = ("conv", "fast")

    def __init__(self, conv):
        self.conv = conv
        self.fast = None  # (token, backend, implementation, y's strides, its launcher's _target): bound once a
        # hit resolved it


def eval_unit(xin, weight, scale, shift, residual, conv, padding, relu: bool, requested: str, full, memo=None):
    """``conv2d_epilogue(xin, weight, scale, shift, residual, ...)`` through the plan of ``conv``
    (the eval unit's module) when no gradient is needed; ``full()`` runs the whole path. ``memo``:
    (bn, the BatchNorm's cached fold) when ``xin``, ``residual`` and ``weight`` are the unit entry's
    own, unconverted (``_folded_epilogue``): a bound hit then becomes the unit's memo
    (``eval_hit``)."""
    if not _usable(requested):
        return full()
    key = (_OP_EPI, requested, relu, _sig(xin), _sig(weight), _sig(scale), _sig(shift), _sig(residual), conv.stride,
           padding, conv.dilation, conv.groups)
    if _SUB in key or key[3] is None or key[4] is None or key[3][3].type == "meta":  # (_bad, for a flat key)
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
    tf32 = xin.dtype is _F32 and cudnn_conv_tf32_enabled()
    f = plan.fast
    if f is not None and _current(f[0], f[1], requested, xin.device, tf32):
        y = _eval_launch(tpl, f, xin, weight, scale, shift, residual, tf32)
        if memo is not None:
            _memos[conv] = _EvalMemo(memo[0], requested, relu, xin, residual, weight, conv, memo[1], plan)
        return y
    acc = acc_dtype(xin.dtype)
    call = _clone_call(tpl, x=xin, weight=_conv_ops._dense_weight(weight), scale=channel_vector(scale, acc),
                       bias=channel_vector(shift, acc), residual=residual, allow_tf32=tf32)
    impl = _resolve(_OP_EPI, requested, call, call.device)
    if impl is None:
        return full()
    y = call.run(impl)[0]
    if call.weight is weight and call.scale is scale and call.bias is shift:
        plan.fast = (_token(tf32), _registry._backends[requested], impl, y.stride(), _target(impl))
    return y


def _eval_launch(tpl, f, xin, weight, scale, shift, residual, tf32: bool):
    """A bound eval plan's launch (see ``_Bound``): the launcher with the tensors the Call would
    hold (no conversion for this key); ``ConvCall._finish`` only where the output is off-contract."""
    impl = f[2]
    ro = impl.returns_output
    out = None if ro else _new_out(tpl.shape, xin, tpl.layout)
    res = getattr(*f[4])(xin, weight, scale, shift, residual, out, tpl.stride, tpl.padding, tpl.relu, False, tf32,
                         dilation=tpl.dilation, groups=tpl.groups)
    if not ro:
        return out
    y = res[0]
    if y.stride() == f[3] and y.dtype == xin.dtype:
        return y
    return _clone_call(tpl, x=xin, weight=weight, scale=scale, bias=shift, residual=residual,
                       allow_tf32=tf32)._finish(impl, out, res)[0]


class _EvalMemo:
    """An eval unit's last bound hit as the fused models' entry saw it (``functional.unit_act`` /
    ``unit_add_act``): its BatchNorm, the backend and flag, what validation read of x, the residual
    and the weight, the convolution's geometry, the folded (scale, shift) objects of the BatchNorm's
    cache, and the plan. ``eval_hit`` re-reads each of them, so a call that would take another path
    (or another key) does not hit."""

    __slots__ = ("bn", "requested", "relu", "xsig", "rsig", "wsig", "geometry", "fold", "plan", "devtype")

    def __init__(self, bn, requested, relu, x, residual, weight, conv, fold, plan):
        self.bn, self.requested, self.relu = weakref.ref(bn), requested, relu
        self.xsig, self.rsig, self.wsig = _sig(x), _sig(residual), _sig(weight)
        self.geometry = _geometry(conv)
        self.fold, self.plan = fold, plan
        self.devtype = x.device.type


def _geometry(conv) -> tuple:
    """What the path from a unit's entry to its plan reads of the convolution besides its weight
    (``functional._conv_input``: the padding mode and form; the plan key: the rest)."""
    return (conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode,
            conv._reversed_padding_repeated_twice)


# conv -> _EvalMemo (weak, and the memo holds its BatchNorm weakly: a memo keeps no module alive)
_memos: "weakref.WeakKeyDictionary[Any, _EvalMemo]" = weakref.WeakKeyDictionary()
_memo_get = _memos.data.get  # (keyed by weak references: what WeakKeyDictionary.get looks up)
_ref = weakref.ref
_globally_plain = _eager._globally_plain
_recorder_get = _tune._recorder.get
_autocast_on = torch.is_autocast_enabled
# (cheaper than the per-device check, which parses its argument; a private entry, so where a torch
# version lacks it every call asks the per-device check)
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None) or (lambda: True)


def eval_hit(x, conv, bn, residual, relu: bool, requested: str, fold):
    """act(bn(conv(x)) + residual) for an eval unit (``bn`` with running statistics) called from
    its entry (``functional.unit_act``/``unit_add_act``, past their module checks), through its
    memo, when everything the whole path would read is what the memo recorded: then the whole
    path would take exactly that bound hit (``eval_unit``) with the same tensors. Else None (the
    caller takes the whole path). ``fold``: ``functional._folded_scale_shift`` (the BatchNorm's
    cached fold, re-read: a changed statistic, parameter, eps or dtype gives other objects).
    (``_memos.get``, ``_sig``, ``_geometry`` and ``_usable`` inline: this runs once per eval unit.)"""
    m = _memo_get(_ref(conv))
    if m is None or m.bn() is not bn or bn.training or m.relu is not relu or m.requested != requested:
        return None
    if type(x) is not Tensor or (x.shape, x.stride(), x.dtype, x.device) != m.xsig:
        return None
    if residual is None:
        if m.rsig is not None:
            return None
    elif (type(residual) is not Tensor and type(residual) is not _Parameter) \
            or (residual.shape, residual.stride(), residual.dtype, residual.device) != m.rsig:
        return None
    w = conv._parameters.get("weight")
    if (type(w) is not Tensor and type(w) is not _Parameter) or (w.shape, w.stride(), w.dtype, w.device) != m.wsig \
            or (conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode,
                conv._reversed_padding_repeated_twice) != m.geometry:
        return None
    if not ENABLED or not _globally_plain() or _recorder_get() is not None or _log_debug(_DEBUG) \
            or (_any_autocast() and _autocast_on(m.devtype)):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad
                                    or (residual is not None and residual.requires_grad)):
        return None
    plan = m.plan
    f = plan.fast
    tf32 = x.dtype is _F32 and cudnn_conv_tf32_enabled()
    if f is None or not _current(f[0], f[1], requested, x.device, tf32):
        return None
    scale_shift = fold(x, conv, bn)
    if scale_shift is not m.fold:
        return None
    return _eval_launch(plan.conv, f, x, w, scale_shift[0], scale_shift[1], residual, tf32)


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
    __slots__ = ("conv", "rconv", "bn", "upd", "y_layout", "bwd", "fast", "fast_bwd")

    def __init__(self, conv, rconv, bn, upd, y_layout):
        self.conv, self.rconv, self.bn, self.upd = conv, rconv, bn, upd
        self.y_layout = y_layout
        self.bwd = {}  # batch_norm_act_backward's validated calls: key -> template or _NO_PLAN
        self.fast = None  # the forward's implementations, bound (_Bound), once a hit resolved them
        self.fast_bwd = {}  # needs -> (token, batch_norm_act_backward's implementation) for the bound backward

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
        if self.fast is not None and call.weight is weight and call.id_weight is id_weight:
            # (for the bound backward: no conversion here)
            self.fast_bwd[call.needs] = (_token(False), impl, _registry._backends[requested], _target(impl))
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
    b = bn._buffers
    nbt, rm = b.get("num_batches_tracked"), b.get("running_mean")
    count = bn.training and bn.track_running_stats and nbt is not None
    running = bn.training and bn.track_running_stats and rm is not None
    if not (count or running):
        return None
    factor, unbias = _factor_unbias(bn, m, count, running)
    return _bn_ops.RunningUpdate(mean.contiguous(), var.contiguous(), rm if running else None,
                                 b.get("running_var") if running else None, nbt if count else None, factor, unbias)


def _updates(bn, rbn, mean, var, rmean, rvar, y) -> list:
    m = y.numel() // y.shape[1]
    ups = []
    u = _update_entry(bn, mean, var, m)
    if u is not None:
        ups.append(u)
    if rbn is not None:
        u = _update_entry(rbn, rmean, rvar, m)
        if u is not None:
            ups.append(u)
    return ups


def _in_layout(t: Tensor, layout: str) -> Tensor:
    """``_checks.in_layout_of(t, ref)`` for a ref whose ``layout_of`` is ``layout``."""
    if layout == "nhwc":
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


def _run_conv(tpl, requested, x, w, tf32):
    """(y, mean, var, the implementation, whether the weight was passed as given)."""
    call = _clone_call(tpl, x=x, weight=_conv_ops._dense_weight(w), allow_tf32=tf32)
    impl = _resolve(_OP_STATS, requested, call, call.device)
    if impl is None:  # the backend now leaves this op to 'auto' (a registry change): the dispatcher's way
        return _tune.dispatch(_OP_STATS, requested, call) + (None, False)
    return call.run(impl) + (impl, call.weight is w)


def _forward(plan: _TrainPlan, requested, bn, rbn, xin, w, bw, bb, ident, rx, rw, rbw, rbb, eps, id_eps, relu,
             need_saves: bool, tf32: bool):
    """The unit's ops, each resolved as the dispatcher does; returns (out, [(setup_context recorder,
    inputs)] or None). Binds the plan (``_Bound``) where every op resolved to an
    implementation that takes this key's tensors as they are."""
    y, mean, var, cimpl, dense = _run_conv(plan.conv, requested, xin, w, tf32)
    r = rmean = rvar = rimpl = None
    if plan.rconv is not None:
        r, rmean, rvar, rimpl, rdense = _run_conv(plan.rconv, requested, rx, rw, tf32)
        dense = dense and rdense and rimpl is not None
        ident = _in_layout(r, plan.y_layout)
    bn_args = (y, mean, var, bw, bb, ident, rmean, rvar, rbw, rbb, eps, id_eps, relu, requested)
    call = _clone_call(plan.bn, y=y, mean=_bn_ops._stat(mean, y), var=_bn_ops._stat(var, y),
                       weight=_bn_ops._param(bw, y), bias=_bn_ops._param(bb, y), identity=ident,
                       id_mean=None if rmean is None else _bn_ops._stat(rmean, y),
                       id_var=None if rvar is None else _bn_ops._stat(rvar, y),
                       id_weight=_bn_ops._param(rbw, y), id_bias=_bn_ops._param(rbb, y))
    impl = _resolve(_OP_BN, requested, call, call.device)
    out = call.run(impl) if impl is not None else _tune.dispatch(_OP_BN, requested, call)
    uimpl = None
    if plan.upd is not None:  # as commit(): after the unit's ops succeeded, all BatchNorms in one call
        ucall = _clone_call(plan.upd, updates=_updates(bn, rbn, mean, var, rmean, rvar, y))
        uimpl = _resolve(_OP_UPD, requested, ucall, ucall.device)
        if uimpl is not None:
            ucall.run(uimpl)
        else:
            _tune.dispatch(_OP_UPD, requested, ucall)
    if (cimpl is not None and dense and impl is not None and (plan.upd is None or uimpl is not None)
            and call.weight is bw and call.bias is bb and call.id_weight is rbw and call.id_bias is rbb):
        plan.fast = _Bound(_token(tf32), _registry._backends[requested], cimpl, rimpl, impl, uimpl, y, xin, bn,
                           rbn, bw, bb, rbw, rbb, plan)
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


# --------------------------------------------------------------------------------------------
# the bound training unit: a hit whose resolutions are current runs the launchers directly
# --------------------------------------------------------------------------------------------
class _Bound:
    """A training plan's implementations as one hit resolved them (``resolve_explicit``: the
    registry, the backend's availability, ``supports`` and the deterministic mode), with what they
    rest on (``_token``) and what their outputs must look like (``ConvCall._finish``'s contract:
    y dense in x's layout and dtype, (C,) contiguous statistics in the accumulation dtype, not
    aliased). Made only where the whole path's per-call conversions are no-ops for this key (a dense
    weight; BN parameters in the activation or accumulation dtype, contiguous), so the launchers get
    exactly the tensors the Calls would hold. A later hit under the same token, with the backend
    still available, calls them directly (``_fast_forward``/``_fast_backward``): the same launchers,
    arguments and order as the Calls', without rebuilding, re-resolving and re-checking them.

    It also keeps each implementation's launcher as ``_target`` gives it ((module, name), looked up
    per call as the registry's ``_ModuleAttr`` does: a monkeypatched launcher is still the one
    called) and what the running-statistics update reads that the key fixes: the
    unbiasing factor m / (m - 1) (m = y's elements per channel) and, per BatchNorm with an update,
    whether it counts batches and keeps running statistics (``_update_entry``'s conditions). Where the
    backend declares a training unit that takes the key's tensors (``_unit_of``), ``unit`` is its
    module, which a hit runs instead of the launchers (with the convolutions' ``geometry``)."""

    __slots__ = ("token", "be", "conv", "rconv", "bn", "upd", "strides", "acc", "cshape", "cfn", "rcfn", "bfn",
                 "ufn", "bro", "unbias", "usides", "pinfo", "unit", "uflags", "geometry", "rgeometry")

    def __init__(self, token, be, conv, rconv, bn, upd, y, x, bn_mod, rbn_mod, bw, bb, rbw, rbb, plan):
        self.token, self.be, self.conv, self.rconv, self.bn, self.upd = token, be, conv, rconv, bn, upd
        self.strides = y.stride()
        self.acc = acc_dtype(x.dtype)
        self.cshape = (y.shape[1],)
        self.cfn = _target(conv)
        self.rcfn = None if rconv is None else _target(rconv)
        self.bfn = _target(bn)
        self.ufn = None if upd is None else _target(upd)
        self.bro = bn.returns_output
        m = y.numel() // y.shape[1]
        self.unbias = float(m / (m - 1))
        sides = []
        for i, b in enumerate((bn_mod, rbn_mod)):
            if b is None:
                continue
            bufs = b._buffers
            count = bool(b.training and b.track_running_stats and bufs.get("num_batches_tracked") is not None)
            running = bool(b.training and b.track_running_stats and bufs.get("running_mean") is not None)
            if count or running:
                sides.append((i, count, running))
        self.usides = tuple(sides)
        # the backend's training unit (``Backend.train_unit``), where every op resolved to this backend and
        # the unit takes this key's tensors: per side (count, running) as above, the convolutions' geometry
        flags = {i: (count, running) for i, count, running in sides}
        self.uflags = (flags.get(0, (False, False)), flags.get(1, (False, False)))
        self.unit = _unit_of(be, x, ((bn_mod, bw, bb, self.uflags[0][1]),) + (
            () if rbn_mod is None else ((rbn_mod, rbw, rbb, self.uflags[1][1]),)))
        self.geometry = _conv_geometry(plan.conv)
        self.rgeometry = None if plan.rconv is None else _conv_geometry(plan.rconv)
        # the BN parameters' presence and dtypes (the key fixes them): what the backward converts to
        self.pinfo = (bb is not None, rbb is not None,
                      (None if bw is None else bw.dtype, None if bb is None else bb.dtype,
                       None if rbw is None else rbw.dtype, None if rbb is None else rbb.dtype))


def _conv_geometry(tpl) -> tuple:
    """(stride, padding, dilation, groups) of a convolution template, as ``torch.conv2d`` takes them."""
    return tuple(tpl.stride), tuple(tpl.padding), tuple(tpl.dilation), tpl.groups


def _unit_of(be, x, sides):
    """``be``'s training unit module (``Backend.train_unit``) where it declares one and its
    ``supports`` takes the key's BatchNorm tensors (per side: (module, weight, bias, whether its
    running statistics update)), else None. (A bound plan's ops all resolved to ``be``'s own
    implementations: ``resolve_explicit`` gives the named backend's or raises.)"""
    name = be.train_unit
    if name is None:
        return None
    unit = importlib.import_module(name)
    tensors = []
    for b, w, bias, running in sides:
        bufs = b._buffers
        tensors.append((w, bias) + ((bufs.get("running_mean"), bufs.get("running_var")) if running else (None, None)))
    return unit if unit.supports(x.dtype, tensors) is None else None


def _target(impl):
    """(object, attribute) whose getattr is ``impl``'s launcher at call time: the registry's
    ``_ModuleAttr`` (module, function name) unpacked, so a call is one getattr instead of its
    ``__call__`` frame."""
    fn = impl.load()
    if type(fn) is _registry._ModuleAttr:
        return fn.mod, fn.attr
    return fn, "__call__"


def _fast_conv(f: _Bound, tpl, impl, fn, x, w, tf32):
    """``_run_conv`` through a bound implementation (``fn``: its launcher's ``_target``);
    ``ConvCall._finish`` (which fixes or names what is off) runs only when the outputs are not what
    the contract says."""
    ro = impl.returns_output
    out = None if ro else _new_out(tpl.shape, x, tpl.layout)
    res = getattr(*fn)(x, w, None, None, None, out, tpl.stride, tpl.padding, False, True, tf32,
                       dilation=tpl.dilation, groups=tpl.groups)
    y, st = res if ro else (out, res)
    if type(st) is tuple and len(st) == 2:
        mean, var = st
        acc, cs = f.acc, f.cshape
        if (y.stride() == f.strides and y.dtype == x.dtype and mean.dtype == acc and var.dtype == acc
                and mean.shape == cs and var.shape == cs and mean.is_contiguous() and var.is_contiguous()
                and mean.untyped_storage().data_ptr() != var.untyped_storage().data_ptr()):
            return y, mean, var
    return _clone_call(tpl, x=x, weight=w, allow_tf32=tf32)._finish(impl, out, res)


def _fast_updates(f: _Bound, bn, rbn, mean, var, rmean, rvar) -> list:
    """``_updates`` for a bound plan: the RunningUpdate per BatchNorm with an update, its buffers and
    momentum read from the module now (the cumulative average's factor from its count), the rest
    from ``f`` (what the plan's key fixes)."""
    ups = []
    for side, count, running in f.usides:
        b, mu, va = (bn, mean, var) if side == 0 else (rbn, rmean, rvar)
        ups.append(_RunningUpdate(mu, va, *_side_update(b, count, running), f.unbias))
    return ups


def _side_update(b, count: bool, running: bool):
    """(running_mean, running_var, num_batches_tracked, factor) of BatchNorm ``b``'s update in a bound
    plan: its buffers where it counts / keeps running statistics (what the key fixes: ``f.usides``,
    ``f.uflags``), else None; the momentum read now (the cumulative average's factor from the count)."""
    bufs = b._buffers
    nbt = bufs.get("num_batches_tracked") if count else None
    mom = b.momentum
    factor = (1.0 / (float(nbt) + 1.0) if count else 0.0) if mom is None else float(mom)
    if running:
        return bufs.get("running_mean"), bufs.get("running_var"), nbt, factor
    return None, None, nbt, factor


def _fast_forward(plan: _TrainPlan, f: _Bound, bn, rbn, xin, w, bw, bb, ident, rx, rw, rbw, rbb, eps, id_eps,
                  relu, tf32):
    """``_forward``'s ops through ``f``: (out, y, mean, var, r, rmean, rvar, identity as batch_norm_act
    took it); through the backend's training unit where ``f`` has one: (out, y, mean, invstd, r, rmean,
    rinvstd, r or the identity), with the running-statistics updates made."""
    unit = f.unit
    if unit is not None:
        rm, rv, nbt, factor = _side_update(bn, *f.uflags[0])
        if rx is None:
            rrm = rrv = rnbt = rfactor = None
        else:
            rrm, rrv, rnbt, rfactor = _side_update(rbn, *f.uflags[1])
        out, y, mean, inv, r, rmean, rinv = unit.forward(xin, w, f.geometry, bw, bb, rm, rv, nbt, factor, eps, ident,
                                                         rx, rw, f.rgeometry, rbw, rbb, rrm, rrv, rnbt, rfactor,
                                                         id_eps, relu)
        return out, y, mean, inv, r, rmean, rinv, (ident if r is None else r)
    y, mean, var = _fast_conv(f, plan.conv, f.conv, f.cfn, xin, w, tf32)
    r = rmean = rvar = None
    if plan.rconv is not None:
        r, rmean, rvar = _fast_conv(f, plan.rconv, f.rconv, f.rcfn, rx, rw, tf32)
        ident = _in_layout(r, plan.y_layout)
    tpl = plan.bn
    if f.bro:
        got = getattr(*f.bfn)(y, mean, var, bw, bb, ident, rmean, rvar, rbw, rbb, None, eps, id_eps, relu, tpl.C,
                              tpl.inner)
        out = got if (got.stride() == y.stride() and got.dtype == y.dtype) else _like(got, y)
    else:
        out = _empty_like(y)
        getattr(*f.bfn)(y, mean, var, bw, bb, ident, rmean, rvar, rbw, rbb, out, eps, id_eps, relu, tpl.C, tpl.inner)
    if f.ufn is not None:
        getattr(*f.ufn)(_fast_updates(f, bn, rbn, mean, var, rmean, rvar))
    return out, y, mean, var, r, rmean, rvar, ident


def _fast_backward(ctx, grad):
    """``_TrainUnit._backward`` for a bound forward: batch_norm_act's backward (``backward_with``'s
    flags, the implementation bound per flags once the plan's backward resolved it), then each
    convolution's input gradients (``_stats_backward``: the statistics' gradients are None here)."""
    plan = ctx.plan
    requested, eps, id_eps, relu = ctx.fargs
    out, y, mean, var, bw, ident, rmean, rvar, rbw, xin, w, rx, rw = ctx.saved_tensors
    n = ctx.needs_input_grad
    nx, nw, nbw, nbb, nid, nrx, nrw, nrbw, nrbb = n[1:10]
    proj = plan.rconv is not None
    ny = nx or nw
    ni = (nrx or nrw) if proj else nid
    if grad is None or not (ny or nbw or nbb or ni or nrbw or nrbb):
        return (None,) * 10
    grad = grad.contiguous(memory_format=_MF[plan.y_layout])  # (in_layout_of(grad, y): y's layout is the key's)
    has_b, has_rb, (w_dt, b_dt, iw_dt, ib_dt) = ctx.fast.pinfo
    ni = ni and ident is not None
    needs = (ny, ni, nbw and bw is not None, nbb and has_b, nrbw and rbw is not None, nrbb and has_rb)
    bound = plan.fast_bwd.get(needs)
    unit = ctx.fast.unit
    if unit is not None:  # (the unit's forward saved invstd where var was: its own backward, whatever resolves now)
        gy, gi, gw, gb, giw, gib = unit.backward(grad, out, y, mean, var, bw, ident, rmean, rvar, rbw, needs, eps,
                                                 id_eps, relu)
    elif bound is None or not _current(bound[0], bound[2], requested, grad.device, False):
        gy, gi, gw, gb, giw, gib = plan.run_backward(
            grad, out, y, mean, var, bw, ident, rmean, rvar, rbw, eps, id_eps, relu, *needs,
            w_dt or b_dt, iw_dt or ib_dt, requested)
    else:
        impl, fn = bound[1], bound[3]
        pdt = (w_dt or b_dt, w_dt or b_dt, iw_dt or ib_dt, iw_dt or ib_dt)
        C, inner = plan.bn.C, plan.bn.inner
        identity = ident if (rmean is not None or ni) else None
        if impl.returns_output:
            got = getattr(*fn)(grad, out, y, mean, var, bw, identity, rmean, rvar, rbw, needs, pdt, eps, id_eps, relu,
                               C, inner)
            gy, gi, gw, gb, giw, gib = got  # (where not needed: ignored below, as backward_with does)
            if ny and gy is not None and (gy.stride() != grad.stride() or gy.dtype != grad.dtype):
                gy = _like(gy, grad)
            if ni and gi is not None and (gi.stride() != grad.stride() or gi.dtype != grad.dtype):
                gi = _like(gi, grad)
        else:
            outs = _bn_ops._backward_outputs(grad, C, needs, pdt, fake=False)
            gy, gi, gw, gb, giw, gib = (t if t.numel() else None for t in outs)
            getattr(*fn)(grad, out, y, mean, var, bw, identity, rmean, rvar, rbw, gy, gi, gw, gb, giw, gib, eps, id_eps,
                         relu, C, inner)
    # (the parameters' gradients in their own dtypes: _bn_ops._as, inline)
    gbw = (gw if w_dt is None or gw.dtype == w_dt else gw.to(w_dt)) if needs[2] else None
    gbb = (gb if b_dt is None or gb.dtype == b_dt else gb.to(b_dt)) if needs[3] else None
    grbw = (giw if iw_dt is None or giw.dtype == iw_dt else giw.to(iw_dt)) if needs[4] else None
    grbb = (gib if ib_dt is None or gib.dtype == ib_dt else gib.to(ib_dt)) if needs[5] else None
    gx = gw = grx = grw = None
    if ny and gy is not None:  # (in_layout_of(gy, xin): x's layout is the conv template's)
        tpl = plan.conv
        gx, gw = _conv_input_grads(tpl, gy.contiguous(memory_format=_MF[tpl.layout]), xin, w, bool(nx), bool(nw))
    if proj:
        if (nrx or nrw) and gi is not None:
            tpl = plan.rconv
            grx, grw = _conv_input_grads(tpl, gi.contiguous(memory_format=_MF[tpl.layout]), rx, rw, bool(nrx),
                                         bool(nrw))
        gi = None
    elif not ni:
        gi = None
    return (None, gx, gw, gbw, gbb, gi, grx, grw, grbw, grbb)


class _TrainUnit(torch.autograd.Function):
    """One training unit as one autograd node: forward the unit's ops, backward the ops' own
    backward functions in autograd's order (batch_norm_act's, then each convolution's)."""

    @staticmethod
    def forward(ctx, args, xin, w, bw, bb, ident, rx, rw, rbw, rbb):
        plan, requested, bn, rbn, eps, id_eps, relu = args  # (the non-tensor arguments: one apply argument)
        tf32 = xin.dtype is _F32 and cudnn_conv_tf32_enabled()
        f = plan.fast
        ctx.plan = plan
        if f is not None and _current(f.token, f.be, requested, xin.device, tf32):
            out, y, mean, var, r, rmean, rvar, ident = _fast_forward(plan, f, bn, rbn, xin, w, bw, bb, ident, rx, rw,
                                                                     rbw, rbb, eps, id_eps, relu, tf32)
            keep = xin.requires_grad or w.requires_grad
            rkeep = rx is not None and (rx.requires_grad or rw.requires_grad)
            ctx.save_for_backward(out if relu else None, y, mean, var, bw, ident, rmean, rvar, rbw,
                                  xin if keep else None, w if keep else None, rx if rkeep else None,
                                  rw if rkeep else None)
            ctx.fast, ctx.fargs = f, (requested, eps, id_eps, relu)
            return out
        ctx.fast = None
        out, saves = _forward(plan, requested, bn, rbn, xin, w, bw, bb, ident, rx, rw, rbw, rbb, eps, id_eps, relu,
                              True, tf32)
        tensors = []
        for rec in saves:
            tensors.extend(rec.saved)
            rec.n = len(rec.saved)
            rec.saved = ()
        ctx.recs = saves
        ctx.save_for_backward(*tensors)
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.fast is not None:
            return _fast_backward(ctx, grad)
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
        # ((plan, requested, bn, rbn, eps, id_eps, relu), xin, w, bw, bb, ident, rx, rw, rbw, rbb)
        nx, nw, nbw, nbb, nid, nrx, nrw, nrbw, nrbb = n[1:10]
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
        return (None, gx, gw, gbw, gbb, gi, grx, grw, grbw, grbb)


def _train_key(xin, conv, bn, padding, identity, rx, rconv, rbn, rpadding, relu: bool, requested: str):
    """A training unit's plan key, or None where it can have no plan (a tensor subclass or a
    non-tensor among its arguments, parameters and buffers)."""
    k = _unit_key(xin, conv, padding, bn)
    if k is None:
        return None
    if identity is None:
        isig = None
    else:
        ti = type(identity)
        if ti is not Tensor and ti is not _Parameter:
            return None
        isig = (identity.shape, identity.stride(), identity.dtype, identity.device)
    if rconv is None:
        return (_OP_STATS, requested, relu, k, isig, None)
    rk = _unit_key(rx, rconv, rpadding, rbn)
    if rk is None:
        return None
    return (_OP_STATS, requested, relu, k, isig, rk)


def train_unit(xin, conv, bn, padding, identity, rx, rconv, rbn, rpadding, relu: bool, requested: str, full,
               memo: bool = False):
    """relu(bn(conv(xin)) + S) in training, S = ``identity`` (raw, may be None) or, with ``rconv``,
    rbn(rconv(rx)); ``full()`` runs the whole path (``functional``'s). Through the unit's plan where
    one applies (see the module docstring). ``memo``: ``xin`` and ``rx`` are the unit entry's own
    inputs (nothing padded or copied): a hit becomes the unit's memo (``train_hit``)."""
    if not _usable(requested) or bn is rbn or isinstance(bn, _Sync) or isinstance(rbn, _Sync):
        return full()
    key = _train_key(xin, conv, bn, padding, identity, rx, rconv, rbn, rpadding, relu, requested)
    if key is None or xin.device.type == "meta":
        return full()
    plan = _lookup(bn, key)
    if plan is None:
        with _Capture() as calls:
            out = full()
        _store(bn, key, _make_train_plan(calls, requested, rconv is not None, bn, rbn))
        return out
    if plan is _NO_PLAN:
        return full()
    out = _train_run(plan, xin, conv, bn, identity, rx, rconv, rbn, relu, requested)
    if memo:
        m = _tmemos.get(bn)
        if m is None or m.plan is not plan or m.key != key or m.conv() is not conv or m.rconv() is not rconv \
                or m.rbn() is not rbn:
            _tmemos[bn] = _TrainMemo(key, plan, conv, rconv, rbn, xin.device.type)
    return out


def _train_run(plan, xin, conv, bn, identity, rx, rconv, rbn, relu: bool, requested: str):
    """A plan hit's run: the unit's tensors read from its modules, then the planned ops (under
    ``_TrainUnit`` when a gradient is needed; bound where ``plan.fast`` is current)."""
    p = bn._parameters
    w, bw, bb = conv._parameters.get("weight"), p.get("weight"), p.get("bias")
    rw = rbw = rbb = None
    if rconv is not None:
        p = rbn._parameters
        rw, rbw, rbb = rconv._parameters.get("weight"), p.get("weight"), p.get("bias")
        ident = None
    else:
        ident = None if identity is None else _in_layout(identity, plan.y_layout)
    eps = float(bn.eps)
    id_eps = float(rbn.eps) if rbn is not None else 1e-5
    if torch.is_grad_enabled() and (xin.requires_grad or w.requires_grad or (bw is not None and bw.requires_grad)
                                    or (bb is not None and bb.requires_grad)
                                    or (ident is not None and ident.requires_grad)
                                    or (rx is not None and (rx.requires_grad or rw.requires_grad
                                                            or (rbw is not None and rbw.requires_grad)
                                                            or (rbb is not None and rbb.requires_grad)))):
        return _TrainUnit.apply((plan, requested, bn, rbn, eps, id_eps, relu), xin, w, bw, bb, ident, rx, rw, rbw,
                                rbb)
    tf32 = xin.dtype is _F32 and cudnn_conv_tf32_enabled()
    f = plan.fast
    if f is not None and _current(f.token, f.be, requested, xin.device, tf32):
        return _fast_forward(plan, f, bn, rbn, xin, w, bw, bb, ident, rx, rw, rbw, rbb, eps, id_eps, relu, tf32)[0]
    return _forward(plan, requested, bn, rbn, xin, w, bw, bb, ident, rx, rw, rbw, rbb, eps, id_eps, relu, False,
                    tf32)[0]


class _TrainMemo:
    """A training unit's last plan hit from its entry (``functional.unit_act``/``unit_add_act``):
    the key it had (everything the ops' validation reads), the plan, its modules and the
    convolutions' geometry (what ``functional._conv_input`` reads to pass the inputs as they are)."""

    __slots__ = ("key", "plan", "conv", "rconv", "rbn", "devtype", "geometry", "rgeometry")

    def __init__(self, key, plan, conv, rconv, rbn, devtype):
        self.key, self.plan, self.devtype = key, plan, devtype
        self.conv, self.rconv, self.rbn = _weak(conv), _weak(rconv), _weak(rbn)
        self.geometry = _geometry(conv)
        self.rgeometry = None if rconv is None else _geometry(rconv)


def _weak(m):
    """A weak reference to module ``m``, or one that gives None for None (the memos hold no module)."""
    return _NONE_REF if m is None else weakref.ref(m)


def _none():
    return None


_NONE_REF = _none

# bn -> _TrainMemo (weak, as the plans)
_tmemos: "weakref.WeakKeyDictionary[Any, _TrainMemo]" = weakref.WeakKeyDictionary()
_tmemo_get = _tmemos.data.get  # (keyed by weak references: what WeakKeyDictionary.get looks up)


def train_hit(x, conv, bn, identity, rx, rconv, rbn, relu: bool, requested: str):
    """``train_unit`` for a training unit called from its entry (``functional.unit_act`` /
    ``unit_add_act``, past their module checks) through its memo: when the whole path would reach
    ``train_unit`` with x and rx as they are (plain tensors, no autocast, the convolutions' padding
    unchanged) and the key it would compute is the memo's, the memo's plan runs; else None."""
    m = _tmemo_get(_ref(bn))  # (_tmemos.get(bn) without WeakKeyDictionary.get's frame)
    if m is None or m.conv() is not conv or m.rconv() is not rconv or m.rbn() is not rbn:
        return None
    # (_usable, inline: plain eager, no recorder, no DEBUG log; then autocast)
    if type(x) is not Tensor or (rx is not None and type(rx) is not Tensor) or not ENABLED \
            or not _globally_plain() or _recorder_get() is not None or _log_debug(_DEBUG) \
            or (_any_autocast() and _autocast_on(m.devtype)):
        return None
    if (conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode,
            conv._reversed_padding_repeated_twice) != m.geometry \
            or (rconv is not None and _geometry(rconv) != m.rgeometry):  # (_geometry(conv), inline)
        return None
    key = _train_key(x, conv, bn, conv.padding, identity, rx, rconv, rbn, None if rconv is None else rconv.padding,
                     relu, requested)
    if key != m.key:
        return None
    return _train_run(m.plan, x, conv, bn, identity, rx, rconv, rbn, relu, requested)


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
        n = sum(1 for b in ((bn,) + ((rbn,) if proj else ())) if b.training and b.track_running_stats and (
            b.num_batches_tracked is not None or b.running_mean is not None))
        if len(ucall.updates) != n:
            return _NO_PLAN
        upd = _clone_call(ucall, updates=None)
    elif any(b.training and b.track_running_stats and (b.num_batches_tracked is not None
                                                       or b.running_mean is not None)
             for b in ((bn,) + ((rbn,) if proj else ()))):
        return _NO_PLAN
    return _TrainPlan(conv, rconv, _template(bcall, *_BN_TENSORS), upd, y_layout)


__all__ = ["eval_unit", "train_unit", "clear", "count"]
