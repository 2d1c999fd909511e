"""Functional fused ResNet units that take the *existing* ``nn.Conv2d`` / ``nn.BatchNorm2d``
modules (so parameters, buffers and ``state_dict`` stay the user's own):

    conv_bn_act(x, conv, bn, relu=True, residual=None)
        = act(bn(conv(x)) + residual)
    conv_bn_add_act(x, conv, bn, shortcut_input, shortcut_conv=None, shortcut_bn=None, relu=True)
        = act(bn(conv(x)) + shortcut_bn(shortcut_conv(shortcut_input)))   (or + shortcut_input)

Both follow the module's ``train()``/``eval()`` mode exactly like the unfused layers (batch
statistics and running-statistics updates in training, running statistics in eval). ``bn`` may
also be an ``nn.SyncBatchNorm``: in training under torch.distributed its batch statistics are those
of the union of the process group's batches, as nn.SyncBatchNorm's (only per-channel statistics
cross processes: one all_gather per BN forward, one all_reduce per BN backward; see nn/_sync.py).

How each mode runs (see docs/CONV.md):

* running statistics (eval): BN is folded into a per-channel (scale, shift) from the current
  parameters and buffers (``conv.bias`` folded into the shift; cached while none of them changes
  and no gradient flows through it, see ``_folded_scale_shift``) and applied
  in the convolution's fp32 epilogue, together with the residual add and the ReLU: one kernel
  (``conv2d_epilogue``). A projection shortcut is its own ``conv2d_epilogue`` (relu=False) whose
  output is the main convolution's residual.
* batch statistics (train): ``conv2d_stats`` gives y = conv(x) and its per-channel batch mean and
  variance from the convolution's epilogue; ``batch_norm_act`` applies the BN from them (the
  per-channel scale/shift computed inside its kernel), adds the shortcut (for a projection: the
  raw shortcut convolution with its own BN, in the same pass) and the ReLU; ``bn_running_update``
  then updates the running statistics and ``num_batches_tracked`` exactly as nn.BatchNorm2d does,
  once every op of the unit has succeeded. The backward of ``batch_norm_act`` is the full BN
  gradient (through the batch statistics too), so ``conv2d_stats`` gets no statistics gradient.
  Where that path does not apply — a SyncBatchNorm synchronising across processes, a
  ``conv.bias`` before the BN (it shifts the batch mean, which the running mean sees, while the
  normalised output is unchanged), an empty batch — ``bn_scale_shift`` turns the BN into a
  differentiable per-channel (scale, shift) and ``bn_add_relu`` applies it.

With ``backend='auto'`` on CPU (and meta) tensors a unit runs the user's own layers (``bn(conv(x))``,
the add, the ReLU): no kernel of ours runs natively there, and PyTorch's own kernels are what
'auto' picks per op anyway (``resnet_kernels/_tune.py``: ``plain_layers``); an explicit backend
runs the fused ops.

Every ``nn.Conv2d`` configuration works: ``padding_mode`` other than 'zeros' and ``padding='same'``
with an odd total padding pad the input explicitly first (exactly what nn.Conv2d itself does);
groups != 1, dilation != 1 and float64 run on the torch backend under ``auto``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from . import _backend, _tune, _unitplan, _weight_cache
from ._checks import DEVICE_TYPE, check_bool, in_layout_of, layout_of
from .nn._bn import BatchStats, batch_stats_args, bn_scale_shift, commit, uses_batch_stats
from .ops.batch_norm import batch_norm_act
from .ops.bn_add_relu import bn_add_relu
from .ops.conv2d import conv2d_epilogue, conv2d_stats


def _check_pair(fn: str, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"{fn}: conv must be an nn.Conv2d, got {type(conv).__name__}")
    if type(conv).forward is not nn.Conv2d.forward:
        raise TypeError(f"{fn}: conv ({type(conv).__name__}) overrides nn.Conv2d.forward; the fused op computes "
                        f"nn.Conv2d's own convolution and would ignore it")
    base = nn.SyncBatchNorm if isinstance(bn, nn.SyncBatchNorm) else nn.BatchNorm2d
    if not isinstance(bn, base):
        raise TypeError(f"{fn}: bn must be an nn.BatchNorm2d or nn.SyncBatchNorm, got {type(bn).__name__}")
    if type(bn).forward is not base.forward:
        raise TypeError(f"{fn}: bn ({type(bn).__name__}) overrides {base.__name__}.forward; the fused op "
                        f"reproduces {base.__name__}'s own semantics and would ignore it")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"{fn}: bn.num_features ({bn.num_features}) != conv.out_channels ({conv.out_channels})")


def _dense(x: Tensor) -> Tensor:
    """x as an NCHW-contiguous or channels_last tensor (a no-op for either)."""
    if not isinstance(x, Tensor):
        return x  # the op names the bad argument
    if x.dim() == 4 and layout_of(x) is None:
        return x.contiguous()
    return x


def _conv_input(x: Tensor, conv: nn.Conv2d) -> Tuple[Tensor, Tuple[int, int]]:
    """(input to convolve with zero padding, that padding): explicit padding for what the ops do
    not take directly, mirroring nn.Conv2d (F.pad with _reversed_padding_repeated_twice)."""
    x = _dense(x)
    pad4 = conv._reversed_padding_repeated_twice  # (left, right, top, bottom)
    asymmetric = pad4[0] != pad4[1] or pad4[2] != pad4[3]  # only possible with padding='same'
    if conv.padding_mode != "zeros" or asymmetric:
        cl = isinstance(x, Tensor) and x.dim() == 4 and layout_of(x) == "nhwc"
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, pad4, mode=mode)
        x = x.contiguous(memory_format=torch.channels_last) if cl else _dense(x)
        return x, (0, 0)
    if isinstance(conv.padding, str):  # 'valid' or a symmetric 'same'
        return x, (pad4[2], pad4[0])
    return x, tuple(conv.padding)


def _in_layout(t: Optional[Tensor], ref: Tensor) -> Optional[Tensor]:
    """A residual/shortcut in the memory layout of ``ref`` (an op input or output: the outputs
    take their input's layout). They differ only when one of them is ambiguous (a single channel
    or 1x1 spatial size) or not dense; a copy then. Bad arguments are left for the op to name."""
    if not (isinstance(t, Tensor) and isinstance(ref, Tensor) and t.dim() == 4 and ref.dim() == 4):
        return t
    return in_layout_of(t, ref)  # a no-op when it already is


def _autocast_dtype(x) -> Optional[torch.dtype]:
    """The autocast dtype in force for x's device, or None (autocast off, or a device type such as
    'meta' that has no autocast: torch.is_autocast_enabled would raise for it)."""
    if not (isinstance(x, Tensor) and x.is_floating_point()):
        return None
    dev = DEVICE_TYPE[x.device]
    if not torch.amp.is_autocast_available(dev) or not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def _fx_node(fn, tensors, args, kwargs):
    """Under torch.fx symbolic tracing (torch.fx.symbolic_trace, torchvision's
    create_feature_extractor) the tensors are Proxies: record one call of the fused function as a
    graph node (the modules become get_attr nodes) instead of tracing into it, so the traced graph
    still runs the fused ops, in whatever train/eval mode the modules are in when it runs.
    None when not tracing."""
    proxy = next((t for t in tensors if isinstance(t, torch.fx.Proxy)), None)
    if proxy is None:
        return None
    return proxy.tracer.create_proxy("call_function", fn, args, kwargs)


_check_bool = check_bool
_Proxy = torch.fx.Proxy


def _cast(t, dtype: Optional[torch.dtype]):
    """What autocast does to a convolution's inputs: floating tensors other than float64 are
    cast to the autocast dtype (differentiably)."""
    if dtype is None or not isinstance(t, Tensor) or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
        return t
    return t.to(dtype)


def _train_parts(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, backend: Optional[str],
                 wdt: Optional[torch.dtype], updates: list):
    """(y, bn_of_y) with y = conv(x) and bn using batch statistics: ``bn_of_y`` a ``BatchStats``
    (the batch_norm_act path: the statistics from the convolution's epilogue) or, where that path
    does not apply (a synchronising SyncBatchNorm, a conv bias, an empty batch), a (scale, shift)
    pair with bn(y) == y * scale + shift. bn's side effects (running statistics,
    num_batches_tracked) are appended to ``updates``."""
    xin, padding = _conv_input(x, conv)
    y, mean, var = conv2d_stats(xin, _cast(conv.weight, wdt), stride=conv.stride, padding=padding, dilation=conv.dilation,
                                groups=conv.groups, backend=backend)
    if conv.bias is None:
        st = batch_stats_args(bn, y, mean, var, updates, backend)
        if st is not None:
            return y, st
        return y, bn_scale_shift(bn, y, batch_stats=(mean, var), updates=updates)
    # a conv bias shifts the batch mean (the running mean sees it); the normalised output does not
    b = conv.bias.to(mean.dtype)
    scale, shift = bn_scale_shift(bn, y, batch_stats=(mean + b, var), updates=updates)
    return y, (scale, shift + b * scale)


def _affine(st) -> Tuple[Tensor, Tensor]:
    return st.scale_shift() if isinstance(st, BatchStats) else st


def _apply(y: Tensor, st, residual: Optional[Tensor], r_st, relu: bool, backend: Optional[str]) -> Tensor:
    """act(bn(y) + shortcut), shortcut = r_bn(residual) when ``r_st`` is given, else residual (or
    none): one batch_norm_act pass when every BN is a ``BatchStats``, else one bn_add_relu pass."""
    residual = _in_layout(residual, y)
    if isinstance(st, BatchStats) and (r_st is None or isinstance(r_st, BatchStats)):
        if r_st is None:
            return batch_norm_act(y, st.mean, st.var, st.weight, st.bias, residual, eps=st.eps, relu=relu,
                                  backend=backend)
        return batch_norm_act(y, st.mean, st.var, st.weight, st.bias, residual, r_st.mean, r_st.var, r_st.weight,
                              r_st.bias, eps=st.eps, id_eps=r_st.eps, relu=relu, backend=backend)
    scale, shift = _affine(st)
    if r_st is None:
        return bn_add_relu(y, scale, shift, residual, relu=relu, backend=backend)
    r_scale, r_shift = _affine(r_st)
    return bn_add_relu(y, scale, shift, residual, r_scale, r_shift, relu=relu, backend=backend)


def _folded_epilogue(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool, residual: Optional[Tensor],
                     backend: Optional[str], wdt: Optional[torch.dtype] = None) -> Tensor:
    """act(bn(conv(x)) + residual) with bn using running statistics: one conv2d_epilogue."""
    xin, padding = _conv_input(x, conv)
    fold = _folded_scale_shift(xin, conv, bn)
    scale, shift = fold
    rin = _in_layout(residual, xin)
    w = _cast(conv.weight, wdt)

    def full():
        return conv2d_epilogue(xin, w, scale, shift, rin, stride=conv.stride, padding=padding,
                               dilation=conv.dilation, groups=conv.groups, relu=relu, backend=backend)

    requested = _backend.op_arg(backend)
    if requested != "auto" and _unitplan.ENABLED:  # the unit's validated plan (resnet_kernels/_unitplan.py)
        # the unit's memo (_unitplan.eval_hit) where nothing was converted and the fold is the cache's
        memo = None
        if xin is x and rin is residual and wdt is None and _weight_cache.derived_holds(bn, fold):
            memo = (bn, fold)
        return _unitplan.eval_unit(xin, w, scale, shift, rin, conv, padding, relu, requested, full, memo)
    return full()


def _folded_scale_shift(xin, conv: nn.Conv2d, bn: nn.BatchNorm2d):
    """bn (running statistics) with conv's bias folded into a per-channel (scale, shift). Cached
    across calls per BatchNorm (``_weight_cache.derived``: keyed on the running statistics, weight,
    bias and conv bias, so never stale after an optimizer step, a running-statistics update,
    load_state_dict, ``.to()`` or a replaced parameter) when no
    gradient can flow through it and nothing is being traced: an inference forward then launches no
    per-channel kernels at all."""
    def fold(_=None):
        # bn_scale_shift only reads the shape and dtype of its input in this mode
        proxy = xin.new_empty((0, conv.out_channels, 0, 0)) if isinstance(xin, Tensor) else xin
        scale, shift = bn_scale_shift(bn, proxy)
        if conv.bias is not None:
            shift = shift + conv.bias.to(shift.dtype) * scale
        return scale, shift

    # (the modules' own dicts: what the attributes read, without nn.Module.__getattr__'s Python frame)
    p, bufs = bn._parameters, bn._buffers
    w, b, cb = p.get("weight"), p.get("bias"), conv._parameters.get("bias")
    rv = bufs.get("running_var")
    if (not isinstance(xin, Tensor) or rv is None or torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and ((w is not None and w.requires_grad) or (b is not None and b.requires_grad)
                                             or (cb is not None and cb.requires_grad)))):
        return fold()
    dev = xin.device
    return _weight_cache.derived(bn, ("bn_fold", xin.dtype, bn.eps, dev, conv.out_channels), fold,
                                 (rv, bufs.get("running_mean"), w, b, cb), dev)


def conv_bn_act(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, *, relu: bool = True,
                residual: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """act(bn(conv(x)) + residual), with bn in its current train/eval mode.

    Under autocast the convolution runs in the autocast dtype, as nn.Conv2d's would: x, the conv
    weight and the residual are cast to it (differentiably; BN statistics and parameters stay
    float32) and the result has that dtype.
    """
    _check_pair("conv_bn_act", conv, bn)
    _check_bool("conv_bn_act", "relu", relu)
    return unit_act(x, conv, bn, relu, residual, backend)


def unit_act(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool, residual: Optional[Tensor],
             backend: Optional[str]) -> Tensor:
    """``conv_bn_act`` past the checks of its modules and flag, for callers that made them: the
    fused models, whose units ``models._units.unit_ok`` accepted (exactly nn.Conv2d and
    nn.BatchNorm2d/nn.SyncBatchNorm of matching width) with a literal bool ``relu``."""
    if isinstance(x, _Proxy) or isinstance(residual, _Proxy):  # (the node's arguments built only then)
        return _fx_node(conv_bn_act, (x, residual), (x, conv, bn), dict(relu=relu, residual=residual, backend=backend))
    backend = _backend.op_arg(backend)  # (once: the name in force, passed on)
    if backend != "auto":  # the unit's memo (resnet_kernels/_unitplan.py)
        if bn.training:
            y = _unitplan.train_hit(x, conv, bn, residual, None, None, None, relu, backend)
        else:
            y = _unitplan.eval_hit(x, conv, bn, residual, relu, backend, _folded_scale_shift)
        if y is not None:
            return y
    if _plain_ok(x, backend, bn):  # 'auto' on CPU tensors: PyTorch's own layers
        y = conv(x)
        _check_residual("conv_bn_act", "residual", residual, y)  # before the BatchNorm changes state
        _check_bn_input(bn, y)
        return _plain(bn(y), residual, relu)
    dt = _autocast_dtype(x)
    if dt is None:
        return _conv_bn_act(x, conv, bn, relu, residual, backend, None)
    with torch.autocast(x.device.type, enabled=False):
        return _conv_bn_act(_cast(x, dt), conv, bn, relu, _cast(residual, dt), backend, dt)


def _plain_ok(x, backend, *bns) -> bool:
    """'auto' runs this unit as the user's own layers (``_tune.plain_layers``). Not with a
    SyncBatchNorm: PyTorch's refuses CPU tensors in a distributed job, where the fused path syncs
    over gloo."""
    for b in bns:
        if isinstance(b, nn.SyncBatchNorm):
            return False
    return _tune.plain_layers(x, _backend.op_arg(backend))


def _check_residual(fn: str, name: str, r, y: Tensor) -> None:
    """What the fused ops check of a residual, for the plain-layers path (before any state change)."""
    if r is None:
        return
    if not isinstance(r, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor or None, got {type(r).__name__}")
    if tuple(r.shape) != tuple(y.shape):
        raise ValueError(f"{fn}: {name} must have the output's shape {tuple(y.shape)}, got {tuple(r.shape)}")
    if r.device != y.device:
        raise ValueError(f"{fn}: {name} must be on the output's device ({y.device}), got {r.device}")


def _check_bn_input(bn: nn.BatchNorm2d, y: Tensor) -> None:
    """nn.BatchNorm2d's 'one value per channel' error, raised before it counts the call (torch
    increments num_batches_tracked first): a failed call changes nothing, as on the fused path."""
    if bn.training and y.dim() == 4 and y.shape[1] and y.numel() // y.shape[1] == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(y.shape)}")


def _plain(y: Tensor, residual: Optional[Tensor], relu: bool) -> Tensor:
    """The tail of a torchvision block: ``out += identity; relu(out, inplace=True)``."""
    if residual is not None:
        y += residual  # y is the BatchNorm's fresh output, which its backward does not need
    return torch.relu_(y) if relu else y


def _planned(x, conv, wdt, backend) -> Optional[str]:
    """The explicit backend requested when a training unit may run through its validated plan
    (resnet_kernels/_unitplan.py: plain eager, no autocast, no conv bias), else None."""
    if wdt is not None or conv.bias is not None or not _unitplan.ENABLED:
        return None
    if type(x) is not Tensor and type(x) is not nn.Parameter:
        return None
    requested = _backend.op_arg(backend)
    return None if requested == "auto" else requested


def _conv_bn_act(x, conv, bn, relu, residual, backend, wdt):
    if uses_batch_stats(bn):
        requested = _planned(x, conv, wdt, backend)
        if requested is not None:
            xin, padding = _conv_input(x, conv)
            return _unitplan.train_unit(xin, conv, bn, padding, residual, None, None, None, None, relu, requested,
                                        lambda: _conv_bn_act_train(x, conv, bn, relu, residual, backend, wdt),
                                        xin is x)
        return _conv_bn_act_train(x, conv, bn, relu, residual, backend, wdt)
    return _folded_epilogue(x, conv, bn, relu, residual, backend, wdt)


def _conv_bn_act_train(x, conv, bn, relu, residual, backend, wdt):
    # bn's running-statistics update is applied only once every op has succeeded, so a
    # call that raises (a bad residual, an unusable backend) changes nothing
    updates: list = []
    y, st = _train_parts(x, conv, bn, backend, wdt, updates)
    out = _apply(y, st, residual, None, relu, backend)
    commit(updates)
    return out


def conv_bn_add_act(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, shortcut_input: Tensor,
                    shortcut_conv: Optional[nn.Conv2d] = None, shortcut_bn: Optional[nn.BatchNorm2d] = None, *,
                    relu: bool = True, backend: Optional[str] = None) -> Tensor:
    """act(bn(conv(x)) + shortcut), shortcut = shortcut_bn(shortcut_conv(shortcut_input)) when a
    projection is given, else shortcut_input. Both BNs, the add and the ReLU run in one pass.
    Autocast: as for ``conv_bn_act``."""
    _check_pair("conv_bn_add_act", conv, bn)
    _check_bool("conv_bn_add_act", "relu", relu)
    if (shortcut_conv is None) != (shortcut_bn is None):
        raise ValueError("conv_bn_add_act: give both shortcut_conv and shortcut_bn, or neither")
    if shortcut_conv is not None:
        _check_pair("conv_bn_add_act (shortcut)", shortcut_conv, shortcut_bn)
    return unit_add_act(x, conv, bn, shortcut_input, shortcut_conv, shortcut_bn, relu, backend)


def unit_add_act(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, shortcut_input: Tensor,
                 shortcut_conv: Optional[nn.Conv2d], shortcut_bn: Optional[nn.BatchNorm2d], relu: bool,
                 backend: Optional[str]) -> Tensor:
    """``conv_bn_add_act`` past the checks of its modules and flag (see ``unit_act``; the projection's
    pair accepted by ``models._units.projection_reason``)."""
    if isinstance(x, _Proxy) or isinstance(shortcut_input, _Proxy):
        return _fx_node(conv_bn_add_act, (x, shortcut_input),
                        (x, conv, bn, shortcut_input, shortcut_conv, shortcut_bn), dict(relu=relu, backend=backend))
    backend = _backend.op_arg(backend)
    if backend != "auto" and bn.training:  # the training unit's memo (resnet_kernels/_unitplan.py)
        if shortcut_conv is None or shortcut_bn.training:
            y = _unitplan.train_hit(x, conv, bn, shortcut_input if shortcut_conv is None else None,
                                    None if shortcut_conv is None else shortcut_input, shortcut_conv, shortcut_bn,
                                    relu, backend)
            if y is not None:
                return y
    elif backend != "auto":  # eval units' memos
        if shortcut_conv is None:
            y = _unitplan.eval_hit(x, conv, bn, shortcut_input, relu, backend, _folded_scale_shift)
            if y is not None:
                return y
        elif not (shortcut_bn.training or uses_batch_stats(bn)):
            # the projection's unit, then the main one with its output (_conv_bn_add_act_full's order)
            r = _unitplan.eval_hit(shortcut_input, shortcut_conv, shortcut_bn, None, False, backend,
                                   _folded_scale_shift)
            if r is not None:
                y = _unitplan.eval_hit(x, conv, bn, r, relu, backend, _folded_scale_shift)
                if y is not None:
                    return y
                if _autocast_dtype(x) is None:  # (else the whole path, which casts)
                    return _folded_epilogue(x, conv, bn, relu, r, backend)
    if _plain_ok(x, backend, bn, shortcut_bn):  # 'auto' on CPU tensors: PyTorch's own layers
        y = conv(x)
        _check_bn_input(bn, y)
        if shortcut_conv is None:
            _check_residual("conv_bn_add_act", "shortcut_input", shortcut_input, y)
            return _plain(bn(y), shortcut_input, relu)
        s = shortcut_conv(shortcut_input)
        _check_residual("conv_bn_add_act", "the shortcut", s, y)  # before the BatchNorms change state
        _check_bn_input(shortcut_bn, s)
        y = bn(y)
        return _plain(y, shortcut_bn(s), relu)
    dt = _autocast_dtype(x)
    if dt is None:
        return _conv_bn_add_act(x, conv, bn, shortcut_input, shortcut_conv, shortcut_bn, relu, backend, None)
    with torch.autocast(x.device.type, enabled=False):
        return _conv_bn_add_act(_cast(x, dt), conv, bn, _cast(shortcut_input, dt), shortcut_conv, shortcut_bn, relu,
                                backend, dt)


def _conv_bn_add_act(x, conv, bn, shortcut_input, shortcut_conv, shortcut_bn, relu, backend, wdt):
    if shortcut_conv is None:
        return _conv_bn_act(x, conv, bn, relu, shortcut_input, backend, wdt)
    if uses_batch_stats(bn) and uses_batch_stats(shortcut_bn):
        requested = _planned(x, conv, wdt, backend)
        if requested is not None and shortcut_conv.bias is None and (
                type(shortcut_input) is Tensor or type(shortcut_input) is nn.Parameter):
            xin, padding = _conv_input(x, conv)
            rin, rpadding = _conv_input(shortcut_input, shortcut_conv)
            return _unitplan.train_unit(xin, conv, bn, padding, None, rin, shortcut_conv, shortcut_bn, rpadding, relu,
                                        requested, lambda: _conv_bn_add_act_full(x, conv, bn, shortcut_input,
                                                                                 shortcut_conv, shortcut_bn, relu,
                                                                                 backend, wdt),
                                        xin is x and rin is shortcut_input)
    return _conv_bn_add_act_full(x, conv, bn, shortcut_input, shortcut_conv, shortcut_bn, relu, backend, wdt)


def _conv_bn_add_act_full(x, conv, bn, shortcut_input, shortcut_conv, shortcut_bn, relu, backend, wdt):
    updates: list = []  # both BNs' side effects, applied once every op has succeeded
    if uses_batch_stats(bn):
        y, st = _train_parts(x, conv, bn, backend, wdt, updates)
        if uses_batch_stats(shortcut_bn):
            # Both BNs, the add and the ReLU in one pass over y and the raw shortcut conv.
            r, r_st = _train_parts(shortcut_input, shortcut_conv, shortcut_bn, backend, wdt, updates)
            out = _apply(y, st, r, r_st, relu, backend)
        else:
            r = _folded_epilogue(shortcut_input, shortcut_conv, shortcut_bn, False, None, backend, wdt)
            out = _apply(y, st, r, None, relu, backend)
        commit(updates)
        return out
    if uses_batch_stats(shortcut_bn):
        r, r_st = _train_parts(shortcut_input, shortcut_conv, shortcut_bn, backend, wdt, updates)
        r = _apply(r, r_st, None, None, False, backend)
    else:
        r = _folded_epilogue(shortcut_input, shortcut_conv, shortcut_bn, False, None, backend, wdt)
    out = _folded_epilogue(x, conv, bn, relu, r, backend, wdt)
    commit(updates)
    return out


def residual_block(x: Tensor, units, shortcut=None, *, backend: Optional[str] = None,
                   add_input: bool = True) -> Optional[Tensor]:
    """A torchvision residual block in training as one autograd function (``resnet_kernels/_block.py``):
    ``units`` the (conv, bn) pairs of the main path (each followed by a ReLU but the last), the last
    one's output added to the shortcut (``x``, or ``shortcut`` = (conv, bn) applied to x) before the
    final ReLU; with ``add_input=False`` and no ``shortcut`` nothing is added (relu(bn(conv(x))) for
    one unit: the ResNets' stem). Returns None where that path does not apply (then nothing has
    happened: run the per-unit functions); see ``_block.applicable``. Under autocast x and the weights
    are cast to the autocast dtype as for ``conv_bn_act``."""
    from . import _block

    convs = [c for c, _ in units] + ([shortcut[0]] if shortcut is not None else [])
    bns = [b for _, b in units] + ([shortcut[1]] if shortcut is not None else [])
    requested = _backend.op_arg(backend)
    if not _block.applicable(x, convs, bns, requested):
        return None
    if not any(isinstance(b, nn.SyncBatchNorm) for b in bns) and _tune.plain_layers(x, requested, record=False):
        return None  # 'auto' on CPU tensors: the per-unit path runs the user's own layers
    dt = _autocast_dtype(x)
    if dt is None:
        return _block.train_block(x, units, shortcut, requested, None, add_input)
    with torch.autocast(x.device.type, enabled=False):
        return _block.train_block(_cast(x, dt), units, shortcut, requested, dt, add_input)


__all__ = ["conv_bn_act", "conv_bn_add_act", "residual_block"]
