"""A training residual block as one autograd function: the fused backward of issue #12.

``train_block(x, units, shortcut, backend, wdt)`` runs torchvision's BasicBlock/Bottleneck
    h_0 = x;  h_i = relu(bn_i(conv_i(h_{i-1})))                      (inner units, i < k)
    out = relu(bn_k(conv_k(h_{k-1})) + S),  S = x or bn_d(conv_d(x))   (the tail)
with every BatchNorm in training (batch statistics), and returns ``out`` (``add_input=False``
without a projection: S = 0, the ResNets' stem as a one-unit block); its forward is the ops of
the unfused path (``conv2d_stats``, ``batch_norm_act``, ``bn_running_update``: the same kernels,
the same side effects, committed once everything succeeded; on the ``_PROLOGUE_BACKENDS``, and per
unit under 'auto' where its chosen implementation does it in its loads and, measured forward + backward,
the unit is faster so (``_takes_prologue``), an inner
unit's BN + ReLU is applied by the next convolution to its operand instead, ``conv2d_bn_stats``, and
h_i is neither written nor saved: the backward recomputes it, ``conv2d_backward`` with x=None), but
its backward is one chain of ``conv2d_backward`` calls (resnet_kernels/ops/conv_backward.py) instead
of autograd's per-op graph:

    tail:   (A, B, K)_k [and _d], bn_k's [and bn_d's] parameter gradients
                = batch_norm_act_coef(g_out, out, y_k, ...)        (a reduce and a finalize)
    shortcut (projection): grad_x_d, grad W_d = conv2d_backward(g_out masked by out, y_d, coef_d)
    unit k .. 1: grad h_{i-1}, grad W_i, (A, B, K)_{i-1}, bn_{i-1}'s parameter gradients
                = conv2d_backward(g_i, y_i, coef_i, h_{i-1}, W_i, upstream = unit i-1)
            (g_k = g_out masked by out; g_i = grad h_i, already masked by unit i's ReLU in the
             epilogue that produced it); unit 1 adds the shortcut's gradient (g_out masked by
             out for an identity shortcut, grad_x_d for a projection) in its epilogue: the
             block input's gradient leaves the block summed.

The block's output is read by its backward only as the tail's ReLU mask (out > 0: by the coefficients'
reduce, the tail's and the projection's operand prologues and unit 1's residual mask): the tail runs
``batch_norm_act_bits``, which also writes the 1-bit mask (resnet_kernels/_bits.py, 1/8 byte per
element, in the same kernel on triton), and the backward saves and reads those bits instead of out.

No gradient of a BN's output or of a ReLU is ever materialised on the fused implementation: each
``conv2d_backward`` computes its operand from (g, y, A, B, K) as it loads it, and reduces the next
unit's BN backward in its epilogue. Per unit of a bottleneck that replaces {BN reduce, finalize,
apply (grad_y written), dgrad, wgrad} with {dgrad (finalize in its launch), wgrad}; the residual-gradient
accumulate kernel at the block input disappears (counted: ``resnet-kernels count``).

Used only where it computes exactly what the unfused path computes: plain eager execution (not
under torch.compile, FX tracing, functorch or dispatch modes: those see the per-op graph), a
gradient needed, every BN using batch statistics through ``batch_stats_args`` (not a synchronising
SyncBatchNorm, no conv bias, a non-empty batch), and the requested backend implementing the
block's fused backward (``auto``, ``triton``, ``cuda``, and ``torch`` as the reference; see
``_BLOCK_BACKENDS``).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.fx
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import _registry, _tune
from ._eager import plain_eager
from ._numerics import cudnn_conv_tf32_enabled, mismatch, verify_rtol
from .nn._bn import batch_stats_args, commit, one_call, uses_batch_stats
from .nn._sync import sync_group
from .ops.batch_norm import batch_norm_act, batch_norm_act_bits, batch_norm_act_coef
from .ops.conv2d import conv2d_stats
from .ops.conv2d_bn import OP as _PROLOGUE_OP, bn_conv_call, conv2d_bn_stats
from .ops.conv_backward import conv2d_backward

_OPS = ("conv2d_backward", "batch_norm_act_coef", "batch_norm_act_bits", "conv2d_bn_stats")
# Explicit backends that run the block as one function: those whose conv2d_backward computes the
# BN-backward operand inside the convolution kernels (triton; cuda: its csrc dgrad/wgrad, bf16/fp16
# channels_last, with the csrc BatchNorm writing the 1-bit mask in its forward kernel and its reduce
# kernel reading it), and the reference (torch: exact float64 parity of the whole chain). cuda's
# block counts below its per-op graph (batch 256, bf16, channels_last, train: ResNet-50 474
# launches / 76.0 GB vs 553 / 95.5 per op; ResNet-18 191 / 18.1 vs 215 / 21.3; resnet-kernels
# count). 'aten' implements conv2d_backward as separate passes around cuDNN, which count more
# launches and bytes than its per-op graph: an explicit request for it keeps the per-op graph;
# 'auto' may still measure and pick its conv2d_backward inside the block.
_BLOCK_BACKENDS = ("triton", "torch", "cuda")
# Explicit backends whose block forward applies each inner unit's BN + ReLU in the next convolution's
# operand prologue (``conv2d_bn_stats``) and whose backward recomputes that input from the saved conv
# output (``conv2d_backward`` with x=None): the normalised activations are never written nor saved.
# The Triton kernels do both in their loads; so do the cuda ones (the csrc conv's register-staged A
# operand, up to 1536 input channels, beyond which its launcher materialises h, counted; the csrc
# dgrad/wgrad recompute x from up_y, 16-bit channels_last): counted, the prologue takes cuda's
# ResNet-50 train block from 474 / 76.0 GB to 442 / 71.0 (ResNet-18 191 / 18.1 -> 183 / 17.0);
# the reference checks the whole chain. Under 'auto' the
# choice is per unit (``_takes_prologue``): possible where the implementation chosen for that unit's
# ``conv2d_bn_stats`` applies it in its loads (``Impl.operand_prologue``), and there, where 'auto'
# measures, the two graphs' forward + backward are measured against each other (``_unit_graphs``);
# else the written graph (the static order: aten first).
_PROLOGUE_BACKENDS = ("triton", "torch", "cuda")


_GRAPH = "block_unit_graph"  # the measured choice of a unit's graph (``_tune.choose_graph``)
_GRAPHS = ("prologue", "written")  # static order: where the chosen conv2d_bn_stats applies the prologue


def _takes_prologue(backend: str, y_prev: Tensor, st, weight: Tensor, u: "_Unit"):
    """(whether unit ``u``, not the first, convolves relu(bn(y_prev)) through ``conv2d_bn_stats``
    (the prologue graph) rather than a written h, the op's validated call where 'auto' built one to
    decide (plain eager tensors: the caller dispatches it instead of validating twice) else None).
    On 'auto' the prologue graph needs the implementation 'auto' picks for that call to apply it in
    its loads (``Impl.operand_prologue``); where it does and 'auto' measures (CUDA), the two graphs
    of the unit are measured forward + backward (``_unit_graphs``: the prologue graph's
    conv2d_bn_stats and conv2d_backward recomputing its input, x=None, against the written graph's
    batch_norm_act + conv2d_stats and conv2d_backward reading the saved h) and the faster taken
    (``_tune.choose_graph``: once per shape, cached like the ops' choices). Elsewhere the static
    order (and for fake or meta tensors: the accountant counts the static choice)."""
    if backend != "auto":
        return backend in _PROLOGUE_BACKENDS, None
    call = bn_conv_call(y_prev, st.mean, st.var, st.weight, st.bias, st.eps, weight, u.stride, u.padding)
    if type(y_prev) is Tensor and plain_eager(()):
        impl = _tune.choose(_PROLOGUE_OP, call, call.device)[0]
        if not impl.operand_prologue:
            return False, None
        name, decision = _tune.choose_graph(_GRAPH, call.key(), call.device, _GRAPHS,
                                            lambda: _unit_graphs(call, st, weight, u))
        rec = _tune._recorder.get()
        if rec is not None:  # (explain / tune list it: op 'block_unit_graph', impl 'prologue' or 'written')
            where = _tune._where.get()
            decision.detail.setdefault("call", call.describe())
            decision.detail.setdefault("module", where[-1] if where else "")
            rec.append(decision)
        return name == "prologue", (call if name == "prologue" else None)
    impl = _registry.first_candidate(_PROLOGUE_OP, call, call.device)
    return impl is not None and impl.operand_prologue, None


def _unit_graphs(call, st, weight: Tensor, u: "_Unit"):
    """({graph: ms}, {graph: why excluded}) for ``_tune.choose_graph``: unit ``u``'s two graphs run,
    verified against each other and timed, forward half + backward half, each op through 'auto'
    (its own measured and verified choice, made in the untimed first run). Only y_prev, the BN's
    vectors and the weight are read; everything else is scratch (no running statistic, parameter or
    RNG state changes). The backward half is the unit's ``conv2d_backward`` with the upstream BN's
    reductions, as the block's backward runs it for an inner unit (no mask: the tail's ReLU mask is
    the same in both graphs), on a stand-in gradient (the unit's own conv output) and BN
    coefficients derived from its statistics."""
    y_prev, dev = call.x, call.device
    bwd_kw = dict(stride=u.stride, padding=u.padding, up_y=y_prev, up_mean=st.mean, up_var=st.var,
                  up_weight=st.weight, up_eps=st.eps, need_x=True, need_weight=True,
                  need_up_weight=st.weight is not None, need_up_bias=st.bias is not None, backend="auto")
    times: dict = {}
    failed: dict = {}
    with torch.no_grad():
        def fwd_written():
            h = batch_norm_act(y_prev, st.mean, st.var, st.weight, st.bias, eps=st.eps, relu=True, backend="auto")
            return (h,) + tuple(conv2d_stats(h, weight, stride=u.stride, padding=u.padding, backend="auto"))

        def fwd_prologue():
            return tuple(_tune.dispatch(_PROLOGUE_OP, "auto", call))

        try:
            h, y, m, v = fwd_written()
            acc = m.dtype
            a = torch.rsqrt(v.to(acc) + 1e-5)
            coef = torch.stack([a, m.to(acc) * 1e-3, a * 1e-3])
            g = y  # a stand-in incoming gradient: y's shape, dtype and layout (only read)
            ref_b = conv2d_backward(g, h, weight, y=y, mean=m, coef=coef, **bwd_kw)
            times["written"] = (_tune.time_ms(fwd_written, dev)
                                + _tune.time_ms(lambda: conv2d_backward(g, h, weight, y=y, mean=m, coef=coef,
                                                                        **bwd_kw), dev))
        except Exception as exc:  # noqa: BLE001 - excluded, reported once by choose_graph
            failed["written"] = _tune._first_line(exc)
            ref_b = y = None
        try:
            got = fwd_prologue()
            if y is not None:
                err = _compare_forward(call, got, (y, m, v))
                if err is not None:
                    raise AssertionError(f"its forward disagrees with the written graph's: {err}")
                del got
            else:  # (the written graph failed: the prologue graph's own output stands in)
                y, m = got[0], got[1]
                a = torch.rsqrt(got[2].to(m.dtype) + 1e-5)
                coef = torch.stack([a, m * 1e-3, a * 1e-3])
                g = y
            up_bias = st.bias  # (x=None: the recompute reads the BN's bias)
            got_b = conv2d_backward(g, None, weight, y=y, mean=m, coef=coef, up_bias=up_bias, **bwd_kw)
            if ref_b is not None:
                err = _compare_backward(got_b, ref_b, y.dtype)
                if err is not None:
                    raise AssertionError(f"its backward disagrees with the written graph's: {err}")
            times["prologue"] = (_tune.time_ms(fwd_prologue, dev)
                                 + _tune.time_ms(lambda: conv2d_backward(g, None, weight, y=y, mean=m, coef=coef,
                                                                         up_bias=up_bias, **bwd_kw), dev))
        except Exception as exc:  # noqa: BLE001
            failed["prologue"] = _tune._first_line(exc)
    return times, failed


# The graphs' outputs are checked against each other, each op's implementation having been verified
# against the reference within the op's tolerance (``call.compare``): two of them may differ by twice it.
def _compare_forward(call, got, ref) -> Optional[str]:
    """conv2d_bn_stats' (y, mean, var) against the written graph's (``ConvCall.compare``'s rule, twice
    its tolerance)."""
    rtol = 2 * verify_rtol(call.x.dtype, call.allow_tf32)
    spread = float((ref[2].float().clamp_min(0).sqrt() + ref[1].float().abs()).max())
    return (mismatch("y", got[0], ref[0], rtol) or mismatch("mean", got[1], ref[1], rtol, scale=spread)
            or mismatch("var", got[2], ref[2], 2 * rtol))


def _compare_backward(got, ref, dtype) -> Optional[str]:
    """conv2d_backward's outputs (grad_x, grad_weight, up_coef, up_grad_weight, up_grad_bias; None
    where not requested) against the other graph's (``BackwardCall.compare``'s rule, twice its
    tolerance)."""
    rtol = verify_rtol(dtype, dtype == torch.float32 and cudnn_conv_tf32_enabled())
    for name, a, b in zip(("grad_x", "grad_weight", "up_coef", "up_grad_weight", "up_grad_bias"), got, ref):
        err = mismatch(name, a, b, 4 * rtol)
        if err is not None:
            return err
    return None


def backend_ok(backend: str) -> bool:
    """Whether a ``backend`` request ('auto' or a name) runs the block as one function."""
    if backend == "auto":
        return True
    return backend in _BLOCK_BACKENDS and all(_registry.get_impl(op, backend) is not None for op in _OPS)


def _bn_ok(bn: nn.Module) -> bool:
    return uses_batch_stats(bn) and sync_group(bn) is None


def applicable(x, convs: Sequence[nn.Conv2d], bns: Sequence[nn.Module], backend: str) -> bool:
    """Whether ``train_block`` runs these modules (else the per-op path). Not under torch.compile or
    a functorch transform (they trace the per-op graph of custom ops); dispatch modes (fake tensors,
    the accountant) see this path as a GPU run would."""
    if not (type(x) is Tensor or isinstance(x, Tensor) and not isinstance(x, torch.fx.Proxy)):
        return False
    if not torch.is_grad_enabled() or x.dim() != 4 or x.shape[0] == 0 or not backend_ok(backend):
        return False
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    if not all(_bn_ok(b) for b in bns) or any(c.bias is not None for c in convs):
        return False
    return x.requires_grad or any(p.requires_grad for m in list(convs) + list(bns) for p in m.parameters())


class _Unit:
    __slots__ = ("conv", "bn", "stride", "padding", "st")

    def __init__(self, conv, bn):
        self.conv, self.bn = conv, bn
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.st = None


class _BlockFn(torch.autograd.Function):
    """Inputs: (x, *weights, *bn params); the layout of the flat inputs is in ``plan``."""

    @staticmethod
    def forward(ctx, plan, x, *params):
        units, proj, backend = plan["units"], plan["proj"], plan["backend"]
        n = len(units) + (1 if proj is not None else 0)
        weights = params[:n]
        updates: list = []
        hs, ys, sts, pro = [], [], [], []
        for i, u in enumerate(units):
            fused = False
            if i == 0:
                y, mean, var = conv2d_stats(x, weights[0], stride=u.stride, padding=u.padding, backend=backend)
            else:
                p = sts[i - 1]
                fused, call = _takes_prologue(backend, ys[i - 1], p, weights[i], u)
                if fused:
                    # the previous unit's BN + ReLU applied to this convolution's operand as it loads it:
                    # h_{i-1} is never written (nor saved: the backward recomputes it from y_{i-1})
                    if call is not None:  # built and validated by 'auto' to choose: run it (the op's own code)
                        y, mean, var = _tune.dispatch(_PROLOGUE_OP, backend, call)
                    else:
                        y, mean, var = conv2d_bn_stats(ys[i - 1], p.mean, p.var, p.weight, p.bias, weights[i],
                                                       eps=p.eps, stride=u.stride, padding=u.padding, backend=backend)
                else:
                    h = batch_norm_act(ys[i - 1], p.mean, p.var, p.weight, p.bias, eps=p.eps, relu=True,
                                       backend=backend)
                    hs.append(h)
                    y, mean, var = conv2d_stats(h, weights[i], stride=u.stride, padding=u.padding, backend=backend)
            st = batch_stats_args(u.bn, y, mean, var, updates, backend)
            if st is None:
                raise _Fallback()
            ys.append(y)
            sts.append(st)
            pro.append(fused)
        yd = std = None
        tail = sts[-1]
        if proj is not None:
            yd, md, vd = conv2d_stats(x, weights[-1], stride=proj.stride, padding=proj.padding, backend=backend)
            std = batch_stats_args(proj.bn, yd, md, vd, updates, backend)
            if std is None:
                raise _Fallback()
        # the block's running-statistics updates go with its last op (in its own launch on triton and
        # cuda), which applies them only once it runs: a block that raises before has changed no buffer
        ups = one_call(updates)
        if proj is not None:
            out, bits = batch_norm_act_bits(ys[-1], tail.mean, tail.var, tail.weight, tail.bias, yd, std.mean,
                                            std.var, std.weight, std.bias, eps=tail.eps, id_eps=std.eps, relu=True,
                                            updates=ups or (), backend=backend)
        else:  # (the identity shortcut; none where the block's input is not added: the stem)
            out, bits = batch_norm_act_bits(ys[-1], tail.mean, tail.var, tail.weight, tail.bias,
                                            x if plan["add_input"] else None, eps=tail.eps, relu=True,
                                            updates=ups or (), backend=backend)
        if ups is None:  # (a BatchNorm used twice in the block: its updates in order, as commit splits them)
            commit(updates)
        ctx.plan = plan
        ctx.pro = pro
        ctx.sts = sts
        ctx.std = std
        # the backward reads out only as its ReLU mask: the 1-bit mask is saved instead of out
        ctx.save_for_backward(x, bits, *ys, *([yd] if yd is not None else []), *weights, *hs)
        return out

    @staticmethod
    @once_differentiable  # the block's ops have no derivative of their own: double backward raises
    def backward(ctx, g_out):
        plan = ctx.plan
        units, proj, backend = plan["units"], plan["proj"], plan["backend"]
        k = len(units)
        saved = ctx.saved_tensors
        x, bits = saved[0], saved[1]  # bits: the 1-bit mask of out > 0 (resnet_kernels/_bits.py)
        ys = list(saved[2:2 + k])
        pos = 2 + k
        yd = None
        if proj is not None:
            yd = saved[pos]
            pos += 1
        n = k + (1 if proj is not None else 0)
        weights = saved[pos:pos + n]
        # the inputs of units 2..k: saved (h_i), or None where unit i+1 took the prologue (recomputed
        # from y_i and unit i's BN by conv2d_backward: x=None, up_bias)
        pro = ctx.pro
        saved_h = iter(saved[pos + n:])
        hs = [x] + [None if pro[i] else next(saved_h) for i in range(1, k)]
        sts, std = ctx.sts, ctx.std
        needs = ctx.needs_input_grad  # (plan, x, *weights, *bn params)
        need_x = needs[1]
        nw = needs[2:2 + len(weights)]
        nbn = needs[2 + len(weights):]
        # every consumer of g_out takes the activations' layout: a copy only where it arrives otherwise
        # (the fused ResNets' head_pool writes the last block's channels_last: no copy, counted)
        g_out = g_out.contiguous(memory_format=torch.channels_last) if _cl(ys[-1]) else g_out.contiguous()
        tail = sts[-1]
        n_w, n_b = nbn[2 * (k - 1)], nbn[2 * (k - 1) + 1]
        n_dw, n_db = (nbn[2 * k], nbn[2 * k + 1]) if std is not None else (False, False)
        coef, id_coef, gw_t, gb_t, gw_d, gb_d = batch_norm_act_coef(
            g_out, bits, ys[-1], tail.mean, tail.var, tail.weight, yd, std.mean if std else None,
            std.var if std else None, std.weight if std else None, eps=tail.eps, id_eps=std.eps if std else 0.0,
            relu=True, need_weight=n_w, need_bias=n_b, need_id_weight=n_dw, need_id_bias=n_db,
            weight_dtype=_dtype(tail.weight), id_weight_dtype=_dtype(std.weight) if std else None, backend=backend)
        gw_t, gb_t, gw_d, gb_d = (t if need else None for t, need in ((gw_t, n_w), (gb_t, n_b), (gw_d, n_dw),
                                                                        (gb_d, n_db)))
        grads_w: List[Optional[Tensor]] = [None] * len(weights)
        grads_bn: List[Optional[Tensor]] = [None] * len(nbn)
        grads_bn[2 * (k - 1)], grads_bn[2 * (k - 1) + 1] = gw_t, gb_t
        residual = res_mask = None
        if need_x:
            if proj is None and plan["add_input"]:
                residual, res_mask = g_out, bits
        if proj is not None and (need_x or nw[-1]):
            gxd, gwd, _, _, _ = conv2d_backward(g_out, x, weights[-1], stride=proj.stride, padding=proj.padding,
                                                mask=bits, y=yd, mean=std.mean, coef=id_coef, need_x=need_x,
                                                need_weight=nw[-1], backend=backend)
            grads_w[-1] = gwd
            grads_bn[2 * k], grads_bn[2 * k + 1] = gw_d, gb_d
            residual = gxd
        g, mask = g_out, bits
        grad_x = None
        for i in range(k - 1, -1, -1):
            u = units[i]
            up = sts[i - 1] if i > 0 else None
            nx = need_x if i == 0 else True
            if not (nx or nw[i]):
                continue
            gx, gw, up_coef, ugw, ugb = conv2d_backward(
                g, hs[i], weights[i], stride=u.stride, padding=u.padding, mask=mask, y=ys[i], mean=sts[i].mean,
                coef=coef, residual=residual if i == 0 else None, res_mask=res_mask if i == 0 else None,
                up_y=ys[i - 1] if up is not None else None, up_mean=up.mean if up else None,
                up_var=up.var if up else None, up_weight=up.weight if up else None,
                up_bias=up.bias if up is not None and pro[i] else None, up_eps=up.eps if up else 1e-5, need_x=nx, need_weight=nw[i], need_up_weight=bool(up) and nbn[2 * (i - 1)] and up.weight is not None,
                need_up_bias=bool(up) and nbn[2 * (i - 1) + 1] and up.bias is not None, backend=backend)
            grads_w[i] = gw
            if up is not None:
                grads_bn[2 * (i - 1)], grads_bn[2 * (i - 1) + 1] = ugw, ugb
                g, mask, coef = gx, None, up_coef
            else:
                grad_x = gx
        grads_bn = [_cast_like(gr, p) for gr, p in zip(grads_bn, _bn_params(plan))]
        return (None, grad_x, *grads_w, *grads_bn)


class _Fallback(Exception):
    """The per-call checks found a case the block function does not cover (raised before any side
    effect: ``batch_stats_args`` appends nothing when it returns None)."""


def _dtype(p: Optional[Tensor]) -> Optional[torch.dtype]:
    return None if p is None else p.dtype


def _cl(t: Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _bn_params(plan) -> List[Optional[Tensor]]:
    return plan["bn_params"]


def _cast_like(g: Optional[Tensor], p: Optional[Tensor]) -> Optional[Tensor]:
    if g is None or p is None:
        return None
    return g if g.dtype == p.dtype else g.to(p.dtype)


def train_block(x: Tensor, units: Sequence[Tuple[nn.Conv2d, nn.Module]], shortcut: Optional[Tuple[nn.Conv2d, nn.Module]],
                backend: str, wdt: Optional[torch.dtype] = None, add_input: bool = True) -> Optional[Tensor]:
    """The block's output through ``_BlockFn``, or None where the per-op path must run instead
    (nothing has happened then). ``wdt``: the autocast dtype (x already cast to it by the caller).
    ``add_input``: without ``shortcut``, whether x is added before the last ReLU (the identity
    shortcut) or nothing is (a chain of units alone: the ResNets' stem, one unit)."""
    us = [_Unit(c, b) for c, b in units]
    proj = _Unit(*shortcut) if shortcut is not None else None
    convs = [u.conv for u in us] + ([proj.conv] if proj else [])
    bns = [u.bn for u in us] + ([proj.bn] if proj else [])
    weights = [c.weight if wdt is None or c.weight.dtype in (wdt, torch.float64) else c.weight.to(wdt) for c in convs]
    bn_params: List[Optional[Tensor]] = []
    for b in bns:
        bn_params += [b.weight, b.bias]
    plan = {"units": us, "proj": proj, "backend": backend, "bn_params": bn_params,
            "add_input": add_input and proj is None}
    try:
        return _BlockFn.apply(plan, x, *weights, *bn_params)
    except _Fallback:
        return None


__all__ = ["train_block", "applicable", "backend_ok"]
