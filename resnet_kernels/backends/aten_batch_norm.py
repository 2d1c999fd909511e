"""The 'aten' implementations of the training-mode BatchNorm ops: PyTorch's own native batch-norm
kernels given our statistics (the contract: resnet_kernels/backends/torch_batch_norm.py).

forward   ``native_batch_norm`` in its running-statistics form with (mean, var) = y's batch
          statistics (one normalise pass), the identity's likewise, ``add_``, ``relu_``: PyTorch's
          kernels, rounding after each like PyTorch's unfused layers;
backward  ``threshold_backward`` (the ReLU mask; it is also a raw identity's gradient), then
          ``native_batch_norm_backward`` in training form with save_mean = mean and save_invstd =
          1/sqrt(var + eps): PyTorch's own reduce + apply kernels, the path through the batch
          statistics included.
coef      ``threshold_backward`` (relu), then per BN side ``native_batch_norm_backward`` with only the
          parameter gradients requested (PyTorch's reduce kernel alone: grad_bias = sum g,
          grad_weight = sum g (x - mean) * invstd) and a few (C,)-sized ops for (A, B, K).
All return their outputs (``returns_output``) instead of copying into preallocated ones.
"""

from __future__ import annotations

import torch

from .._bits import is_bits, pack, unpack

_aten = torch.ops.aten


def _raw(overload):
    """The operator's C entry behind ``torch.ops.aten.<op>.default`` (``OpOverload.__call__``
    calls exactly it), without that Python frame; the overload itself where a torch version has
    no such attribute."""
    return getattr(overload, "_op", overload)


_threshold_backward = _raw(_aten.threshold_backward.default)
_native_batch_norm_backward = _raw(_aten.native_batch_norm_backward.default)


def _bn_eval(x, mean, var, weight, bias, eps):
    # native_batch_norm wants the parameters and statistics in one dtype (the statistics' dtype,
    # float32/float64: a no-op for float32 parameters)
    dt = mean.dtype
    w = weight if weight is None or weight.dtype is dt else weight.to(dt)
    b = bias if bias is None or bias.dtype is dt else bias.to(dt)
    return _native_batch_norm(x, w, b, mean, var, False, 0.0, eps)[0]


_native_batch_norm = torch.native_batch_norm  # (the C binding: no OpOverloadPacket Python call)


_SCALARS: dict = {}  # float -> a 0-dim float64 CPU tensor holding it
_Tensor = torch.Tensor
_ONE = torch.tensor(1)  # the count's increment (int64: adds to any integer or float count as the int 1 does)


def _scalar(v: float, like: torch.Tensor):
    """``v`` as the scalar operand of an elementwise op on ``like``: a cached 0-dim float64 CPU
    tensor where ``like`` is a plain tensor, else ``v`` itself (a FakeTensor, for one, takes no real
    tensor). The op computes exactly as with the Python float (a CPU scalar operand: converted to
    the op's compute type, no type promotion; tests/test_aten_scalars.py), without wrapping
    the float into a new tensor on every call (~1.2 us a call on a CPU: ``torch.mul(t, 1.5)``
    against ``torch.mul(t, dim0)``). The table is bounded; its values are a model's few
    (eps, unbias) constants."""
    if type(like) is not _Tensor or not v:  # (0.0 and -0.0 are one dict key)
        return v
    t = _SCALARS.get(v)
    if t is None:
        if len(_SCALARS) >= 256:
            _SCALARS.clear()
        t = _SCALARS[v] = torch.tensor(v, dtype=torch.float64)
    return t


def batch_norm_act_forward(y, mean, var, weight, bias, identity, id_mean, id_var, id_weight, id_bias, out, eps,
                           id_eps, relu, C, inner, mask_bits=None, running=None):
    """``mask_bits``: packed from the result by torch ops afterwards (``_bits.pack``, counted).
    ``running``: ``bn_running_update`` (its foreach launches) after."""
    dt = mean.dtype
    if (weight is None or weight.dtype is dt) and (bias is None or bias.dtype is dt):
        z = _native_batch_norm(y, weight, bias, mean, var, False, 0.0, eps)[0]  # (_bn_eval, inline)
    else:
        z = _bn_eval(y, mean, var, weight, bias, eps)
    if identity is not None:
        z.add_(_bn_eval(identity, id_mean, id_var, id_weight, id_bias, id_eps) if id_mean is not None else identity)
    if relu:
        z.relu_()
    if mask_bits is not None:
        pack(z, out=mask_bits)
    if running:
        bn_running_update(running)
    return z


def _bn_grads(g, x, mean, var, weight, eps, need_x, need_w, need_b, w_dtype, invstd=None):
    if invstd is None:
        invstd = torch.add(var, _scalar(eps, var)).rsqrt_()
    w = weight if weight is None or weight.dtype is mean.dtype else weight.to(mean.dtype)
    gx, gw, gb = _native_batch_norm_backward(g, x, w, None, None, mean, invstd, True, eps,
                                             [need_x, need_w and w is not None, need_b])
    if gw is not None and w_dtype is not None and gw.dtype != w_dtype:
        gw = gw.to(w_dtype)
    if gb is not None and w_dtype is not None and gb.dtype != w_dtype:
        gb = gb.to(w_dtype)
    return gx, gw, gb


def batch_norm_act_backward(grad_out, out, y, mean, var, weight, identity, id_mean, id_var, id_weight, needs, pdtypes,
                            eps, id_eps, relu, C, inner, invstd=None, id_invstd=None):
    """Returns [grad_y, grad_identity, grad_weight, grad_bias, grad_id_weight, grad_id_bias] (None
    where not needed). ``invstd``/``id_invstd``: 1/sqrt(var + eps) as native_batch_norm saved it (the
    aten training unit, aten_unit.py; ``var``/``id_var`` are then not read), else computed here."""
    ny, ni, nw, nb, niw, nib = needs
    g = _threshold_backward(grad_out, out, 0) if relu else grad_out
    gy = gw = gb = gi = giw = gib = None
    if ny or nw or nb:
        gy, gw, gb = _bn_grads(g, y, mean, var, weight, eps, ny, nw, nb, pdtypes[0], invstd)
    if identity is not None and id_mean is not None and (ni or niw or nib):
        gi, giw, gib = _bn_grads(g, identity, id_mean, id_var, id_weight, id_eps, ni, niw, nib, pdtypes[2],
                                 id_invstd)
    elif ni:
        gi = g if g is not grad_out else grad_out.clone()
    return [gy, gi, gw, gb, giw, gib]


def _coef_side(g, x, mean, var, weight, eps, m, need_w, need_b, w_dtype):
    """(coef (3, C), grad_weight, grad_bias) of one BN side: native_batch_norm_backward's reduce
    (with an acc-dtype weight, so its parameter gradients come back in acc), then
    A = weight * invstd, B = A * sum_g / m, K = A * invstd * grad_weight / m (grad_weight =
    sum_gd * invstd)."""
    acc = mean.dtype
    invstd = torch.add(var, _scalar(eps, var)).rsqrt_()
    w = weight.to(acc) if weight is not None else torch.ones_like(mean)
    _, gw, gb = _aten.native_batch_norm_backward(g, x, w, None, None, mean, invstd, True, eps, [False, True, True])
    a = invstd * w if weight is not None else invstd
    coef = torch.stack((a, gb * a, gw * (a * invstd)))
    coef[1:].mul_(1.0 / m)
    gw = (gw if w_dtype is None or gw.dtype == w_dtype else gw.to(w_dtype)) if need_w else None
    gb = (gb if w_dtype is None or gb.dtype == w_dtype else gb.to(w_dtype)) if need_b else None
    return coef, gw, gb


def batch_norm_act_coef(grad_out, out, y, mean, var, weight, identity, id_mean, id_var, id_weight, needs, pdtypes,
                        eps, id_eps, relu, C, inner):
    """Returns [coef, id_coef, grad_weight, grad_bias, grad_id_weight, grad_id_bias] (None where not
    needed or, for id_coef, without the identity's BN)."""
    nw, nb, niw, nib = needs
    if relu and is_bits(out):  # the 1-bit mask (resnet_kernels/_bits.py): unpacked, then where
        g = torch.where(unpack(out, grad_out), grad_out, torch.zeros((), dtype=grad_out.dtype, device=grad_out.device))
    else:
        g = _aten.threshold_backward(grad_out, out, 0) if relu else grad_out
    m = grad_out.numel() // C
    coef, gw, gb = _coef_side(g, y, mean, var, weight, eps, m, nw, nb, pdtypes[0])
    icoef = giw = gib = None
    if id_mean is not None:
        icoef, giw, gib = _coef_side(g, identity, id_mean, id_var, id_weight, id_eps, m, niw, nib, pdtypes[2])
    return [coef, icoef, gw, gb, giw, gib]


def running_groups(updates):
    """How ``bn_running_update`` batches a call's updates into foreach launches: (the indices of the
    updates with a running_var, whose var * unbias is one ``_foreach_mul``; per buffer dtype, the
    (update index, 2 = running_mean | 3 = running_var) pairs one ``_foreach_lerp_`` updates (a
    statistic of another dtype than its buffer cast first, one launch each); the
    num_batches_tracked, one ``_foreach_add_``). Shared with the accountant's cost
    (resnet_kernels/backends/__init__.py ``_aten_update_cost``)."""
    with_var = [i for i, u in enumerate(updates) if u[3] is not None]
    groups = {}
    for i, u in enumerate(updates):
        for k in (2, 3):
            if u[k] is not None:
                groups.setdefault(u[k].dtype, []).append((i, k))
    return with_var, groups, [u[4] for u in updates if u[4] is not None]


def _in_dtype(t, dt):
    return t if t.dtype == dt else t.to(dt)  # (a no-op .to still costs a dispatch)


def bn_running_update(updates):
    """PyTorch's foreach kernels (one multi-tensor launch each for a block's few (C,) vectors):
    ``_foreach_mul`` (var * unbias; one BatchNorm's: a ``mul``), ``_foreach_lerp_`` per buffer dtype (a statistic of another
    dtype than its buffer cast first: one launch each), ``_foreach_add_`` (num_batches_tracked)."""
    if len(updates) == 1:
        mean, var, rm, rv, nbt, factor, unbias = updates[0]
        if rm is not None and rv is not None and rm.dtype == rv.dtype == mean.dtype == var.dtype:
            # one BatchNorm (the common call): what running_groups arranges below, without its lists
            # (the same launches: the mul, one lerp over both buffers with one weight, the count's add)
            torch._foreach_lerp_([rm, rv], [mean, torch.mul(var, _scalar(float(unbias), var))], float(factor))
            if nbt is not None:
                nbt.add_(_ONE if type(nbt) is _Tensor else 1)
            return
    with_var, groups, nbts = running_groups(updates)
    unbiased = {}
    if len(with_var) == 1:  # (one vector: the same single launch as the foreach, without its list plumbing)
        i = with_var[0]
        unbiased = {i: torch.mul(updates[i][1], _scalar(float(updates[i][6]), updates[i][1]))}
    elif with_var:
        prods = torch._foreach_mul([updates[i][1] for i in with_var], [float(updates[i][6]) for i in with_var])
        unbiased = dict(zip(with_var, prods))
    for dt, pairs in groups.items():
        bufs = [updates[i][k] for i, k in pairs]
        srcs = [_in_dtype(updates[i][0] if k == 2 else unbiased[i], dt) for i, k in pairs]
        torch._foreach_lerp_(bufs, srcs, [float(updates[i][5]) for i, _ in pairs])
    if nbts:
        torch._foreach_add_(nbts, 1)
