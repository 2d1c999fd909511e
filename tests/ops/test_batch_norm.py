"""batch_norm_act / batch_norm_act_backward / bn_running_update (resnet_kernels/ops/batch_norm.py):
every backend against a float64 nn.functional.batch_norm reference (training mode: the gradient
through the batch statistics included), with PyTorch's own unfused layers in the same dtype giving
the error bound (resnet_kernels.testing), plus gradcheck, opcheck, the running-statistics update
against nn.BatchNorm2d's own, input validation and the functional path that uses them.

Backends: ``rk_testing.ALL_BACKENDS`` (CPU: torch, aten, and triton under the interpreter; the
cuda kernels on the host runner: tests/ops/test_batch_norm_cuda.py and ``test_cuda_op_parity``
here). Outputs are NaN-poisoned (conftest), so an element a kernel does not write fails.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnet_kernels as rk
import rk_testing as rt
from resnet_kernels import BackendUnavailableError, testing
from resnet_kernels.ops.batch_norm import batch_norm_act, bn_running_update

DEV = rt.DEVICE
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(1, 3, 7, 7), (2, 5, 3, 4), (3, 8, 4, 4), (4, 16, 2, 3)]
IDENT = ["none", "raw", "bn"]


def _kernel_dtypes(backend):
    return [d for d in DTYPES if not (d == torch.float64 and backend in ("triton", "cuda"))]


def make(shape, dtype, layout, ident, seed=0, offset=0.0, device=DEV, pdtype=None):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    pdtype = pdtype or (torch.float64 if dtype == torch.float64 else torch.float32)

    def act(shift=0.0):
        t = torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + shift
        return rt.layouts(t.to(dtype), layout).to(device)

    def vec(lo, hi):
        return (torch.rand(C, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(pdtype).to(device)

    y = act(offset)
    r = act(-offset) if ident != "none" else None
    w, b = vec(0.5, 1.5), vec(-1.0, 1.0)
    iw, ib = (vec(0.5, 1.5), vec(-1.0, 1.0)) if ident == "bn" else (None, None)
    go = act()
    return y, w, b, r, iw, ib, go


def _stats(t):
    acc = rt.acc_of(t.dtype)
    with torch.no_grad():
        var, mean = torch.var_mean(t.double(), dim=(0, 2, 3), correction=0)
    return mean.to(acc), var.to(acc)


def ours(y, w, b, r, iw, ib, ident, relu, backend, eps=1e-5, id_eps=1e-3):
    m, v = _stats(y)
    if ident == "none":
        return batch_norm_act(y, m, v, w, b, eps=eps, relu=relu, backend=backend)
    if ident == "raw":
        return batch_norm_act(y, m, v, w, b, r, eps=eps, relu=relu, backend=backend)
    im, iv = _stats(r)
    return batch_norm_act(y, m, v, w, b, r, im, iv, iw, ib, eps=eps, id_eps=id_eps, relu=relu, backend=backend)


def plain(y, w, b, r, iw, ib, ident, relu, eps=1e-5, id_eps=1e-3):
    """PyTorch's own layers: batch_norm (training) [+ shortcut (its own batch_norm)] [+ relu]."""
    z = F.batch_norm(y, None, None, w, b, True, 0.1, eps)
    if ident == "raw":
        z = z + r
    elif ident == "bn":
        z = z + F.batch_norm(r, None, None, iw, ib, True, 0.1, id_eps)
    return torch.relu(z) if relu else z


def _leaf(t, dtype=None):
    if t is None:
        return None
    t = t.detach().clone() if dtype is None else t.detach().to(dtype)
    return t.requires_grad_()


def _run(fn, tensors, go):
    leaves = [_leaf(t) for t in tensors]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], go)
    it = iter(grads)
    return out.detach(), [next(it) if t is not None else None for t in leaves]


@pytest.mark.parametrize("backend", rt.ALL_BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("ident", IDENT)
@pytest.mark.parametrize("relu", [True, False])
def test_parity_with_batchnorm(backend, layout, ident, relu):
    for dtype in _kernel_dtypes(backend):
        for i, shape in enumerate(SHAPES):
            y, w, b, r, iw, ib, go = make(shape, dtype, layout, ident, seed=i)
            tensors = (y, w, b, r, iw, ib)
            got, g_got = _run(lambda *t: ours(*t, ident, relu, backend), tensors, go)
            pt, g_pt = _run(lambda *t: plain(*t, ident, relu), tensors, go)
            t64 = [None if t is None else t.double() for t in tensors]
            ref, g_ref = _run(lambda *t: plain(*t, ident, relu), t64, go.double())
            m = y.numel() // shape[1]
            what = f"{backend} {_f(dtype)} {layout} {ident} relu={relu} {shape}"
            assert got.stride() == y.stride(), what
            testing.assert_close_to_ref(f"out {what}", got, pt, ref, dtype, n_terms=m)
            for name, a, p, e in zip(("y", "weight", "bias", "identity", "id_weight", "id_bias"), g_got, g_pt, g_ref):
                if e is None:
                    continue
                # a parameter gradient is a sum over m terms of magnitude ~ |g|: its own scale
                testing.assert_close_to_ref(f"grad_{name} {what}", a.to(p.dtype), p, e,
                                            dtype if name in ("y", "identity") else p.dtype, n_terms=m,
                                            roundings=2 * testing.ROUNDINGS)


def _f(dt):
    return str(dt).replace("torch.", "")


@pytest.mark.parametrize("backend", rt.ALL_BACKENDS)
def test_large_mean_accuracy(backend):
    """|mean| = 100 x std: the backward's sums of g * (y - mean) must not cancel catastrophically."""
    dtype = torch.float32
    y, w, b, r, iw, ib, go = make((4, 6, 5, 5), dtype, "channels_last", "bn", seed=3, offset=150.0)
    tensors = (y, w, b, r, iw, ib)
    got, g_got = _run(lambda *t: ours(*t, "bn", True, backend), tensors, go)
    pt, g_pt = _run(lambda *t: plain(*t, "bn", True), tensors, go)
    ref, g_ref = _run(lambda *t: plain(*t, "bn", True), [t.double() for t in tensors], go.double())
    testing.assert_close_to_ref("out", got, pt, ref, dtype, n_terms=100)
    for name, a, p, e in zip(("y", "weight", "bias", "identity", "id_weight", "id_bias"), g_got, g_pt, g_ref):
        testing.assert_close_to_ref(f"grad_{name}", a, p, e, dtype, n_terms=100, roundings=2 * testing.ROUNDINGS)


@pytest.mark.parametrize("backend", rt.ALL_BACKENDS)
def test_bf16_parameters(backend):
    """model.to(bfloat16): parameters in the activations' dtype are read as they are, their
    gradients come back in it."""
    dtype = torch.bfloat16
    y, w, b, r, iw, ib, go = make((2, 8, 3, 3), dtype, "nchw", "bn", seed=5, pdtype=torch.bfloat16)
    tensors = (y, w, b, r, iw, ib)
    got, g_got = _run(lambda *t: ours(*t, "bn", True, backend), tensors, go)
    pt, g_pt = _run(lambda *t: plain(*t, "bn", True), tensors, go)
    ref, g_ref = _run(lambda *t: plain(*t, "bn", True), [t.double() for t in tensors], go.double())
    testing.assert_close_to_ref("out", got, pt, ref, dtype, n_terms=18)
    for name, a, p, e in zip(("y", "weight", "bias", "identity", "id_weight", "id_bias"), g_got, g_pt, g_ref):
        assert a.dtype == p.dtype, name
        testing.assert_close_to_ref(f"grad_{name}", a, p, e, dtype, n_terms=18, roundings=2 * testing.ROUNDINGS)


@pytest.mark.parametrize("backend", rt.ALL_BACKENDS)
def test_partial_gradients(backend):
    """Every subset of requested gradients: the others are not computed (None), the requested ones
    equal those of the full backward."""
    y, w, b, r, iw, ib, go = make((2, 4, 3, 3), torch.float32, "channels_last", "bn", seed=7)
    full_out, full = _run(lambda *t: ours(*t, "bn", True, backend), (y, w, b, r, iw, ib), go)
    for mask in range(1, 64, 5):
        leaves = [t.detach().clone().requires_grad_(bool(mask >> i & 1)) for i, t in enumerate((y, w, b, r, iw, ib))]
        out = ours(*leaves, "bn", True, backend)
        want = [t for t in leaves if t.requires_grad]
        grads = torch.autograd.grad(out, want, go)
        k = 0
        for i, t in enumerate(leaves):
            if t.requires_grad:
                torch.testing.assert_close(grads[k], full[i], rtol=1e-5, atol=1e-6)
                k += 1


def test_gradcheck_float64():
    """The composite y -> batch_norm_act(y, batch_stats(y)) against numerical derivatives."""
    y, w, b, r, iw, ib, _ = make((2, 3, 3, 2), torch.float64, "nchw", "bn", seed=11)
    for ident in IDENT:
        for relu in (False, True):
            args = [t.detach().clone().requires_grad_() for t in (y, w, b)]
            extra = [] if ident == "none" else [r.detach().clone().requires_grad_()]
            if ident == "bn":
                extra += [iw.detach().clone().requires_grad_(), ib.detach().clone().requires_grad_()]

            def fn(y, w, b, *rest):
                rr, iww, ibb = (list(rest) + [None, None, None])[:3]
                return ours(y, w, b, rr, iww, ibb, ident, relu, "torch")

            assert torch.autograd.gradcheck(fn, tuple(args + extra), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", rt.ALL_BACKENDS)
def test_empty_batch(backend):
    y = torch.empty(0, 4, 3, 3, device=DEV)
    m = torch.zeros(4, device=DEV)
    w = torch.ones(4, device=DEV, requires_grad=True)
    out = batch_norm_act(y, m, m + 1, w, None, relu=True, backend=backend)
    assert out.shape == y.shape
    (gw,) = torch.autograd.grad(out.sum(), [w])
    assert torch.equal(gw, torch.zeros_like(gw))


@pytest.mark.parametrize("backend", rt.ALL_BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("bdtype", [torch.float32, torch.bfloat16])
def test_running_update_matches_batchnorm(backend, momentum, bdtype):
    C = 6
    bn = nn.BatchNorm2d(C, momentum=momentum).to(DEV)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.num_batches_tracked.fill_(4)
    bn = bn.to(bdtype)
    ref = nn.BatchNorm2d(C, momentum=momentum).to(DEV).to(bdtype)
    ref.load_state_dict(bn.state_dict())
    x = torch.randn(3, C, 4, 5, device=DEV).to(bdtype)
    ref.train()(x)
    mean, var = _stats(x.float())
    n = x.numel() // C
    factor = momentum if momentum is not None else 1.0 / (float(bn.num_batches_tracked) + 1)
    bn_running_update(mean, var, bn.running_mean, bn.running_var, bn.num_batches_tracked, factor=factor,
                      unbias=n / (n - 1), backend=backend)
    assert int(bn.num_batches_tracked) == 5
    tol = dict(rtol=1e-5, atol=1e-6) if bdtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(bn.running_mean, ref.running_mean, **tol)
    torch.testing.assert_close(bn.running_var, ref.running_var, **tol)


@pytest.mark.parametrize("backend", rt.ALL_BACKENDS)
def test_running_update_optional_buffers(backend):
    mean, var = torch.randn(3, device=DEV), torch.rand(3, device=DEV)
    rm, nbt = torch.zeros(3, device=DEV), torch.tensor(7, device=DEV)
    bn_running_update(mean, var, rm, None, nbt, factor=0.5, unbias=2.0, backend=backend)
    torch.testing.assert_close(rm, 0.5 * mean)
    assert int(nbt) == 8
    rv = torch.ones(3, device=DEV)
    bn_running_update(mean, var, None, rv, None, factor=0.5, unbias=2.0, backend=backend)
    torch.testing.assert_close(rv, 0.5 + var)


def test_errors_name_the_argument_and_change_nothing():
    y = torch.randn(2, 4, 3, 3)
    m, v = torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError, match="mean"):
        batch_norm_act(y, torch.zeros(5), v)
    with pytest.raises(ValueError, match="identity"):
        batch_norm_act(y, m, v, identity=torch.randn(2, 4, 3, 4))
    with pytest.raises(ValueError, match="id_mean"):
        batch_norm_act(y, m, v, identity=y, id_mean=m)
    with pytest.raises(ValueError, match="without identity"):
        batch_norm_act(y, m, v, id_mean=m, id_var=v)
    with pytest.raises(TypeError, match="eps"):
        batch_norm_act(y, m, v, eps="1")
    with pytest.raises(TypeError, match="relu"):
        batch_norm_act(y, m, v, relu=1)
    rm, rv, nbt = torch.zeros(4), torch.ones(4), torch.tensor(0)
    with pytest.raises(ValueError, match="running_var"):
        bn_running_update(m, v, rm, torch.ones(5), nbt, factor=0.1, unbias=1.0)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        bn_running_update(m, v, rm, rv, torch.tensor(0.0), factor=0.1, unbias=1.0)
    assert torch.equal(rm, torch.zeros(4)) and int(nbt) == 0  # a failed call changed nothing
    if not rt.HAS_GPU:
        with pytest.raises(BackendUnavailableError, match="cuda"):
            batch_norm_act(y, m, v, backend="cuda")
        with pytest.raises(BackendUnavailableError, match="cuda"):
            bn_running_update(m, v, rm, rv, nbt, factor=0.1, unbias=1.0, backend="cuda")
        assert torch.equal(rm, torch.zeros(4)) and int(nbt) == 0


def test_opcheck():
    y, w, b, r, iw, ib, go = make((2, 3, 4, 4), torch.float32, "channels_last", "bn", seed=2)
    m, v = _stats(y)
    im, iv = _stats(r)
    args = (y.requires_grad_(), m, v, w.requires_grad_(), b.requires_grad_(), r.requires_grad_(), im, iv,
            iw.requires_grad_(), ib.requires_grad_(), 1e-5, 1e-3, True, "torch")
    torch.library.opcheck(torch.ops.resnet_kernels.batch_norm_act.default, args)
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(0)
    torch.library.opcheck(torch.ops.resnet_kernels.bn_running_update.default,
                          ([m], [v], [rm], [rv], [nbt], [7], [0.1], [1.5], "torch"))


# --------------------------------------------------------------------------------------------
# the functional path
# --------------------------------------------------------------------------------------------
class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__) if hasattr(func, "overloadpacket") else str(func))
        return func(*args, **(kwargs or {}))


def test_training_unit_takes_the_batch_norm_path_and_skips_the_statistics_pass():
    """A training conv+BN+ReLU unit runs conv2d_stats -> batch_norm_act -> bn_running_update
    forward, and batch_norm_act_backward + the conv backward (no bn_add_relu correction pass and
    no per-channel torch ops) backward."""
    from resnet_kernels.functional import conv_bn_act

    conv, bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    log = _OpLog()
    with log:
        out = conv_bn_act(x, conv, bn, relu=True, backend="torch")
    fwd = list(log.ops)
    log.ops.clear()
    with log:
        out.sum().backward()
    bwd = list(log.ops)
    assert "batch_norm_act" in fwd and "bn_running_update" in fwd and "bn_add_relu" not in fwd, fwd
    assert not {"rsqrt", "mul", "sub"} & set(fwd), fwd  # no per-channel BN math around the kernels
    assert "batch_norm_act_backward" in bwd and "bn_add_relu" not in bwd, bwd
    ref = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    ref[0].weight.data.copy_(conv.weight)
    xr = x.detach().clone().requires_grad_()
    ref_out = ref(xr)
    ref_out.sum().backward()
    torch.testing.assert_close(out, ref_out.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(conv.weight.grad, ref[0].weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.weight.grad, ref[1].weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.bias.grad, ref[1].bias.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_mean, ref[1].running_mean)
    torch.testing.assert_close(bn.running_var, ref[1].running_var)
    assert int(bn.num_batches_tracked) == 1


def test_eval_fold_is_cached_and_never_stale():
    from resnet_kernels import _weight_cache
    from resnet_kernels.functional import conv_bn_act

    conv, bn = nn.Conv2d(3, 4, 3, padding=1, bias=True), nn.BatchNorm2d(4)
    x = torch.randn(2, 3, 5, 5)
    ref = lambda: torch.relu(bn(conv(x)))  # noqa: E731
    bn.train()(conv(x))  # running statistics away from their initial values
    bn.eval()
    with torch.no_grad():
        a = conv_bn_act(x, conv, bn, backend="torch")
        log = _OpLog()
        with log:
            b = conv_bn_act(x, conv, bn, backend="torch")
        assert not {"rsqrt", "mul", "sub", "_to_copy"} & set(log.ops), log.ops  # the fold came from the cache
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(b, ref(), rtol=1e-5, atol=1e-5)
        # every way the fold's inputs change invalidates it
        for change in (lambda: bn.running_mean.add_(0.5), lambda: bn.running_var.mul_(2), lambda: bn.weight.mul_(-1),
                       lambda: bn.bias.add_(1), lambda: conv.bias.add_(1),
                       lambda: bn.load_state_dict({k: v * 1.5 if v.is_floating_point() else v
                                                   for k, v in bn.state_dict().items()})):
            change()
            torch.testing.assert_close(conv_bn_act(x, conv, bn, backend="torch"), ref(), rtol=1e-5, atol=1e-5)
    assert _weight_cache.enabled()
