"""bn_running_update over several BatchNorms at once (resnet_kernels/ops/batch_norm.py
``bn_running_update_many``; the op takes lists, ``bn_running_update`` is its one-BatchNorm form):
every implementation against nn.BatchNorm2d's own running statistics after one and several steps
(momentum 0.1 and None, float32/float64/half buffers, C = 3 and odd C, up to 5 BatchNorms: more
than one launch's 4 slots), buffers missing, memory around the buffers untouched (each buffer a
slice of a NaN-guarded storage), the launches counted for one and for four BatchNorms, errors that
name the argument and leave every buffer untouched, the commit of a block's deferred updates
(resnet_kernels/nn/_bn.py ``commit``) in order, opcheck and torch.compile.

The cuda implementation runs csrc's kernel: on the GPU, or through the host runner on CPU tensors
(the ``cuda_target`` fixture).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import rk_testing as rt
from resnet_kernels import _registry
from resnet_kernels.nn._bn import PendingUpdate, commit
from resnet_kernels.ops.batch_norm import RunningUpdate, bn_running_update, bn_running_update_many

BACKENDS = list(dict.fromkeys(rt.ALL_BACKENDS + ["cuda"]))
PAD = 5  # NaN guard elements before and after each buffer


@pytest.fixture
def dev(request, backend):
    """The device for ``backend``: cuda without a GPU runs through the host runner on CPU tensors."""
    if backend == "cuda":
        return request.getfixturevalue("cuda_target")
    return rt.DEVICE


def _guarded(values: torch.Tensor):
    """``values`` as the middle of a NaN (or, for integers, -7) guarded 1-D storage: (view, storage)."""
    fill = float("nan") if values.is_floating_point() else -7
    store = torch.full((values.numel() + 2 * PAD,), fill, dtype=values.dtype, device=values.device)
    view = store[PAD:PAD + values.numel()]
    view.copy_(values)
    return view, store


def _guard_intact(store: torch.Tensor, what: str):
    guard = torch.cat([store[:PAD], store[-PAD:]])
    ok = torch.isnan(guard).all() if store.is_floating_point() else (guard == -7).all()
    assert ok, f"{what}: memory around the buffer was written"


def _bns(Cs, momenta, dtype, dev, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for C, mo in zip(Cs, momenta):
        bn = nn.BatchNorm2d(C, momentum=mo)
        with torch.no_grad():
            bn.running_mean.copy_(torch.randn(C, generator=g))
            bn.running_var.copy_(torch.rand(C, generator=g) + 0.5)
            bn.num_batches_tracked.fill_(3)
        out.append(bn.to(dtype).to(dev))
    return out


def _tol(dtype):
    return {torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
            torch.float64: dict(rtol=1e-12, atol=1e-12)}.get(dtype, dict(rtol=1e-5, atol=1e-6))


def _skip_unsupported(backend, dtype):
    if backend == "cuda" and dtype == torch.float64:
        pytest.skip("the cuda kernels refuse float64 (test_float64_refused_by_cuda)")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("bdtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("Cs", [(3,), (3, 64, 7, 5), (5, 3, 130, 1, 9)], ids=lambda c: "C" + "-".join(map(str, c)))
def test_matches_batchnorm_over_steps(backend, momentum, bdtype, Cs, dev):
    """Three training steps: the running statistics and num_batches_tracked of every BatchNorm
    track nn.BatchNorm2d's own (each with its own C and momentum; the buffers' dtype as after
    model.to(dtype)), nothing around the buffers is written."""
    _skip_unsupported(backend, bdtype)
    momenta = [momentum if i % 2 == 0 else 0.3 for i in range(len(Cs))]  # mixed factors in one call
    bns = _bns(Cs, momenta, bdtype, dev)
    refs = copy.deepcopy(bns)
    guarded = []
    for bn in bns:  # every buffer a slice of a guarded storage
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            view, store = _guarded(getattr(bn, name).detach().clone())
            setattr(bn, name, view)
            guarded.append((f"{name} C={bn.num_features}", store))
    g = torch.Generator().manual_seed(1)
    acc = torch.float64 if bdtype == torch.float64 else torch.float32
    for step in range(3):
        ups = []
        for bn, ref in zip(bns, refs):
            x = torch.randn(2, bn.num_features, 3, 2, generator=g).to(bdtype).to(dev)
            ref.train()(x)
            var, mean = torch.var_mean(x.to(acc), dim=(0, 2, 3), correction=0)
            m = x.numel() // bn.num_features
            factor = bn.momentum if bn.momentum is not None else 1.0 / (float(bn.num_batches_tracked) + 1.0)
            ups.append((mean, var, bn.running_mean, bn.running_var, bn.num_batches_tracked, factor, m / (m - 1)))
        bn_running_update_many(ups, backend=backend)
        for bn, ref in zip(bns, refs):
            tag = f"{backend} step {step} C={bn.num_features}"
            assert bn.running_mean.dtype == bdtype and bn.running_var.dtype == bdtype
            torch.testing.assert_close(bn.running_mean, ref.running_mean, **_tol(bdtype), msg=lambda m: f"{tag}: {m}")
            torch.testing.assert_close(bn.running_var, ref.running_var, **_tol(bdtype), msg=lambda m: f"{tag}: {m}")
            assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == 4 + step, tag
    for what, store in guarded:
        _guard_intact(store, what)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_update_is_the_one_element_call(backend, dev):
    """bn_running_update (one BatchNorm) and bn_running_update_many of one give the same bits."""
    g = torch.Generator().manual_seed(2)
    mean, var = torch.randn(7, generator=g).to(dev), torch.rand(7, generator=g).to(dev)
    a = [torch.randn(7, generator=g).to(dev), torch.rand(7, generator=g).to(dev), torch.tensor(2, device=dev)]
    b = [t.clone() for t in a]
    bn_running_update(mean, var, *a, factor=0.25, unbias=1.5, backend=backend)
    bn_running_update_many([RunningUpdate(mean, var, *b, 0.25, 1.5)], backend=backend)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_buffers(backend, dev):
    """Per BatchNorm any subset of the buffers (track_running_stats=False: none, which changes
    nothing; only num_batches_tracked; only one running buffer); absent ones are not written."""
    g = torch.Generator().manual_seed(3)
    C = [3, 5, 4, 6, 2]
    stats = [(torch.randn(c, generator=g).to(dev), torch.rand(c, generator=g).to(dev)) for c in C]
    rm = [torch.zeros(c, device=dev) for c in C]
    rv = [torch.ones(c, device=dev) for c in C]
    nbt = [torch.tensor(10 * i, device=dev) for i in range(len(C))]
    given = [(True, False, True), (False, True, False), (False, False, True), (False, False, False),
             (True, True, True)]
    ups = [RunningUpdate(*stats[i], rm[i] if w[0] else None, rv[i] if w[1] else None, nbt[i] if w[2] else None,
                         0.5, 2.0) for i, w in enumerate(given)]
    bn_running_update_many(ups, backend=backend)
    for i, (wm, wv, wn) in enumerate(given):
        mean, var = stats[i]
        if wm:
            torch.testing.assert_close(rm[i], 0.5 * mean, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(rm[i], torch.zeros_like(mean)), f"running_mean[{i}] written although not given"
        if wv:
            torch.testing.assert_close(rv[i], 0.5 + var, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(rv[i], torch.ones_like(var)), f"running_var[{i}] written although not given"
        assert int(nbt[i]) == 10 * i + (1 if wn else 0), f"num_batches_tracked[{i}]"


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_statistics(backend, dev):
    """C = 0 BatchNorms beside others: num_batches_tracked still counts the call (nn.BatchNorm2d(0));
    only C = 0 ones: no implementation runs, the counters still count."""
    e = torch.empty(0, device=dev)
    n0, n1 = torch.tensor(0, device=dev), torch.tensor(5, device=dev)
    rm = torch.zeros(3, device=dev)
    bn_running_update_many([(e, e, e.clone(), e.clone(), n0, 0.1, 1.0),
                            (torch.ones(3, device=dev), torch.ones(3, device=dev), rm, None, n1, 0.5, 1.0)],
                           backend=backend)
    assert int(n0) == 1 and int(n1) == 6
    torch.testing.assert_close(rm, torch.full_like(rm, 0.5))
    bn_running_update_many([(e, e, None, None, n0, 0.1, 1.0)], backend=backend)
    assert int(n0) == 2


def test_float64_refused_by_cuda(cuda_target):
    dev = cuda_target
    m = torch.zeros(3, dtype=torch.float64, device=dev)
    rm = m.clone()
    with pytest.raises(_registry.BackendUnavailableError, match="float64"):
        bn_running_update_many([(m, m, rm, None, None, 0.1, 1.0)], backend="cuda")


# --------------------------------------------------------------------------------------------
# errors: named, and nothing changed
# --------------------------------------------------------------------------------------------
def _four(dev="cpu"):
    g = torch.Generator().manual_seed(4)
    out = []
    for C in (3, 5, 4, 5):
        out.append([torch.randn(C, generator=g).to(dev), torch.rand(C, generator=g).to(dev),
                    torch.zeros(C, device=dev), torch.ones(C, device=dev), torch.tensor(0, device=dev), 0.1, 1.5])
    return out


def _snapshot(ups):
    return [[t.clone() if isinstance(t, torch.Tensor) else t for t in u[2:5]] for u in ups]


def _unchanged(ups, snap):
    for i, (u, s) in enumerate(zip(ups, snap)):
        for t, t0 in zip(u[2:5], s):
            if isinstance(t, torch.Tensor):
                assert torch.equal(t, t0), f"update {i}: a failed call changed a buffer"


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
@pytest.mark.parametrize("bad, err, pattern", [
    (lambda u: u[3].__setitem__(3, torch.ones(7)), ValueError, r"bn_running_update: running_var\[3\] must be a 1-D"),
    (lambda u: u[2].__setitem__(4, torch.tensor(0.0)), ValueError, r"num_batches_tracked\[2\] must be a one-element int64"),
    (lambda u: u[1].__setitem__(1, torch.ones(4)), ValueError, r"var\[1\] must match mean\[1\]"),
    (lambda u: u[2].__setitem__(2, torch.zeros(8)[::2]), ValueError, r"running_mean\[2\] must be contiguous"),
    (lambda u: u[3].__setitem__(2, u[1][3]), ValueError, r"running_mean\[3\] shares memory with running_var\[1\]"),
    (lambda u: u[1].__setitem__(4, u[0][4]), ValueError, r"num_batches_tracked\[1\] shares memory with num_batches"),
    (lambda u: u[2].__setitem__(3, "x"), TypeError, r"running_var\[2\] must be a torch.Tensor or None"),
    (lambda u: u[0].__setitem__(0, None), TypeError, r"mean\[0\] must be a torch.Tensor"),
    (lambda u: u[1].__setitem__(5, "0.1"), TypeError, r"factor\[1\]"),
    (lambda u: u.__setitem__(2, (1, 2)), TypeError, r"updates\[2\] must be a \(mean, var"),
])
def test_errors_name_the_argument_and_change_nothing(backend, bad, err, pattern):
    ups = _four()
    bad(ups)
    snap = _snapshot([u for u in ups if isinstance(u, list)])
    with pytest.raises(err, match=pattern):
        bn_running_update_many([tuple(u) if isinstance(u, list) else u for u in ups], backend=backend)
    _unchanged([u for u in ups if isinstance(u, list)], snap)


def test_overlapping_slices_of_one_storage_are_refused_and_disjoint_ones_accepted():
    store = torch.zeros(10)
    m = torch.ones(4)
    with pytest.raises(ValueError, match=r"running_var\[1\] shares memory with running_mean\[0\]"):
        bn_running_update_many([(m, m, store[0:4], None, None, 0.5, 1.0), (m, m, None, store[3:7], None, 0.5, 1.0)])
    assert torch.equal(store, torch.zeros(10))
    bn_running_update_many([(m, m, store[0:4], None, None, 0.5, 1.0), (m, 2 * m, None, store[4:8], None, 0.5, 1.0)],
                           backend="triton")
    assert torch.equal(store, torch.tensor([0.5] * 4 + [1.0] * 4 + [0.0] * 2))


def test_op_list_arguments_are_checked():
    op = torch.ops.resnet_kernels.bn_running_update.default
    m, rm = torch.zeros(3), torch.zeros(3)
    with pytest.raises(ValueError, match="factor must have one entry per BatchNorm"):
        op([m], [m], [rm], [], [], [1], [], [1.0], "torch")
    with pytest.raises(ValueError, match="running_var has 1 tensors, buffers says 0 are present"):
        op([m], [m], [rm], [rm.clone()], [], [1], [0.1], [1.0], "torch")
    with pytest.raises(ValueError, match=r"buffers\[0\] must be a bit set"):
        op([m], [m], [rm], [], [], [9], [0.1], [1.0], "torch")
    assert torch.equal(rm, torch.zeros(3))


def test_unavailable_backend_changes_nothing():
    if rt.HAS_GPU:
        pytest.skip("cuda is available here")
    ups = _four()
    snap = _snapshot(ups)
    with pytest.raises(_registry.BackendUnavailableError, match="cuda"):
        bn_running_update_many([tuple(u) for u in ups], backend="cuda")
    _unchanged(ups, snap)


# --------------------------------------------------------------------------------------------
# launches counted (the accountant: resnet_kernels/count.py, on the meta device)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, launches", [(1, {"cuda": 1, "triton": 1, "aten": 3}),
                                         (4, {"cuda": 1, "triton": 1, "aten": 3}),
                                         (5, {"cuda": 2, "triton": 2, "aten": 3})])
def test_counted_launches(n, launches):
    from resnet_kernels.count import Counter

    ups = [(torch.zeros(64, device="meta"), torch.ones(64, device="meta"), torch.zeros(64, device="meta"),
            torch.ones(64, device="meta"), torch.zeros((), dtype=torch.long, device="meta"), 0.1, 1.5)
           for _ in range(n)]
    for backend, want in launches.items():
        counter = Counter()
        with counter:
            bn_running_update_many(ups, backend=backend)
        (entry,) = [e for e in counter.entries.values() if e.op == "bn_running_update"]
        assert entry.calls == 1 and entry.impl == backend
        assert entry.launches == want, (backend, n, entry.launches)
        per_bn = 64 * 4 * 2 + 2 * 64 * 4 * 2 + 16  # stats read, buffers read and written, the counter
        if backend != "aten":
            assert entry.bytes == n * per_bn


def test_aten_counts_a_cast_per_half_buffer():
    from resnet_kernels.count import Counter

    z = torch.zeros(8, device="meta")
    half = torch.zeros(8, dtype=torch.float16, device="meta")
    counter = Counter()
    with counter:
        bn_running_update_many([(z, z, half, half.clone(), None, 0.1, 1.5), (z, z, z.clone(), z.clone(), None, 0.1,
                                                                             1.5)], backend="aten")
    (entry,) = [e for e in counter.entries.values() if e.op == "bn_running_update"]
    # _foreach_mul, 2 casts, a lerp per buffer dtype (float16, float32)
    assert entry.launches == 1 + 2 + 2


# --------------------------------------------------------------------------------------------
# the deferred updates of a unit / a block (nn/_bn.py commit)
# --------------------------------------------------------------------------------------------
class _Calls(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "resnet_kernels" and "bn_running_update" in func._schema.name:
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_commit_batches_consecutive_updates_in_order():
    """One call for a run of updates; a BatchNorm updated twice (a module used twice) and a deferred
    callable between them split the run, so every update applies after the previous as
    nn.BatchNorm2d's would."""
    bns = _bns((3, 4, 3), (0.1, None, None), torch.float32, "cpu")
    refs = copy.deepcopy(bns)
    g = torch.Generator().manual_seed(5)
    order = [0, 1, 2, 1, "cb", 0, 2]
    log = []
    updates = []
    for k in order:
        if k == "cb":
            updates.append(lambda: log.append("cb"))
            continue
        bn, ref = bns[k], refs[k]
        x = torch.randn(2, bn.num_features, 2, 2, generator=g)
        ref.train()(x)
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        # the factor of the count at the time of the call, as batch_stats_args computes it
        seen = sum(1 for j in order[:len(updates)] if j == k)
        factor = bn.momentum if bn.momentum is not None else 1.0 / (float(bn.num_batches_tracked) + seen + 1.0)
        updates.append(PendingUpdate((mean, var, bn.running_mean, bn.running_var, bn.num_batches_tracked, factor,
                                      8 / 7), "triton"))
    calls = _Calls()
    with calls:
        commit(updates)
    assert calls.n == 3 and log == ["cb"]  # [0, 1, 2] | [1] | cb | [0, 2]
    for bn, ref in zip(bns, refs):
        torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
        assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_a_batchnorm_used_twice_before_a_commit(momentum):
    """batch_stats_args twice on one BatchNorm (a module used twice in a block), then commit: the
    buffers are nn.BatchNorm2d's after two calls (the second update after the first; with
    momentum=None its factor counts the first)."""
    from resnet_kernels.nn._bn import batch_stats_args

    (bn,) = _bns((5,), (momentum,), torch.float32, "cpu")
    ref = copy.deepcopy(bn)
    g = torch.Generator().manual_seed(6)
    updates = []
    for _ in range(2):
        y = torch.randn(2, 5, 3, 3, generator=g)
        ref.train()(y)
        var, mean = torch.var_mean(y, dim=(0, 2, 3), correction=0)
        assert batch_stats_args(bn.train(), y, mean, var, updates, "triton") is not None
    assert int(bn.num_batches_tracked) == 3  # deferred
    calls = _Calls()
    with calls:
        commit(updates)
    assert calls.n == 2
    torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == 5


# --------------------------------------------------------------------------------------------
# the op under torch.library's checks and torch.compile
# --------------------------------------------------------------------------------------------
def test_opcheck():
    m, v = torch.randn(3), torch.rand(3)
    m2, v2 = torch.randn(5), torch.rand(5)
    args = ([m, m2], [v, v2], [torch.zeros(3), torch.zeros(5)], [torch.ones(5)], [torch.tensor(0)], [5, 3],
            [0.1, 0.5], [1.5, 2.0], "torch")
    torch.library.opcheck(torch.ops.resnet_kernels.bn_running_update.default, args)


def _two_bn_step(bns, x1, x2):
    ups = []
    for bn, x in zip(bns, (x1, x2)):
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        ups.append((mean, var, bn.running_mean, bn.running_var, bn.num_batches_tracked, 0.25, 1.5))
    bn_running_update_many(ups, backend="torch")
    return x1.sum()


def test_compiles_fullgraph():
    """The list op with its mutated buffer lists in a compiled graph: the same buffers as eager."""
    bns = _bns((3, 5), (0.1, None), torch.float32, "cpu")
    refs = copy.deepcopy(bns)
    x1, x2 = torch.randn(2, 3, 2, 2), torch.randn(2, 5, 2, 2)
    torch.compile(_two_bn_step, fullgraph=True)(bns, x1, x2)
    _two_bn_step(refs, x1, x2)
    for a, b in zip(bns, refs):
        torch.testing.assert_close(a.running_mean, b.running_mean)
        torch.testing.assert_close(a.running_var, b.running_var)
        assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == 4


def test_the_overlap_sweep_never_misses_what_the_pairwise_rule_finds():
    """``_any_overlap`` (one sorted sweep) gates the pairwise scan: it may say True for buffers that
    do not overlap (the scan then finds nothing), never False for buffers that do."""
    from resnet_kernels.ops.batch_norm import RunningUpdate, _any_overlap, _overlap

    g = torch.Generator().manual_seed(0)
    stores = [torch.zeros(40), torch.zeros(40, dtype=torch.float64)]
    found = {True: 0, False: 0}
    for _ in range(300):
        bufs = []
        for _ in range(int(torch.randint(1, 9, (1,), generator=g))):
            s = stores[int(torch.randint(0, 2, (1,), generator=g))]
            a = int(torch.randint(0, 36, (1,), generator=g))
            n = int(torch.randint(1, 5, (1,), generator=g))
            bufs.append(s[a:a + n] if int(torch.randint(0, 4, (1,), generator=g)) else torch.zeros(n))
        ups = [RunningUpdate(None, None, b, None, None, 0.1, 1.0) for b in bufs]
        pairwise = any(_overlap(bufs[i], bufs[j]) for i in range(len(bufs)) for j in range(i))
        found[pairwise] += 1
        if pairwise:
            assert _any_overlap(ups)
        else:
            assert not _any_overlap(ups)  # storage-backed, non-empty: the sweep is exact
    assert found[True] and found[False]
