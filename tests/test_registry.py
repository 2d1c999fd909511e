"""The registry and the measured 'auto' (resnet_kernels/_registry.py, resnet_kernels/_tune.py),
checked with fake implementations on CPU tensors and an injected timer: a wrong implementation is
excluded and warned about once, the fastest correct one is chosen, the cache is written, reloaded,
versioned and survives corruption, nothing is timed under capture/tracing/RESNET_KERNELS_TUNE=0,
deterministic mode filters, an explicit backend is obeyed without timing."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

import resnet_kernels as rk
from resnet_kernels import BackendUnavailableError, _registry, _tune
from resnet_kernels._registry import Backend, Impl

RAN: list = []  # which fake launcher ran, in order


def _fake_ok(x, scale, shift, identity, id_scale, id_shift, out, relu, C, inner):
    RAN.append("fast")
    from resnet_kernels.backends.torch_bn_add_relu import bn_add_relu_forward
    bn_add_relu_forward(x, scale, shift, identity, id_scale, id_shift, out, relu, C, inner)


def _fake_wrong(x, scale, shift, identity, id_scale, id_shift, out, relu, C, inner):
    RAN.append("wrong")
    out.copy_(x)  # ignores the affine, the residual and the ReLU


def _fake_raises(*args):
    RAN.append("raises")
    raise RuntimeError("illegal memory access (simulated)")


def _fake_flaky(*args):
    RAN.append("flaky")
    _fake_ok(*args)
    RAN.pop()


def _fake_nondet(*args):
    RAN.append("nondet")
    _fake_ok(*args)
    RAN.pop()


# the fake launchers are looked up by "module:function": this test module is importable as
# test_registry (tests/ is on sys.path) and under its importlib-mode name; register both ways
_MOD = __name__


def _impl(backend, fn, **kw):
    kw.setdefault("priority", 1)
    kw.setdefault("auto_on", ("cpu", "cuda"))
    return Impl("bn_add_relu", backend, f"{_MOD}:{fn}", **kw)


FAKE = Backend("fake", "fake implementations for the registry tests", lambda device: None)
FAKE2 = Backend("fake2", "", lambda device: None)
FAKE3 = Backend("fake3", "", lambda device: None)

TIMES = {"fast": 1.0, "wrong": 0.1, "raises": 0.1, "nondet": 0.5, "flaky": 0.2, None: 10.0}


def _timer(fn, device):
    RAN.clear()
    fn()
    return TIMES[RAN[-1] if RAN else None]  # aten / torch ran no fake: 10 ms


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RESNET_KERNELS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("RESNET_KERNELS_TUNE", raising=False)
    RAN.clear()
    return tmp_path / "cache"


@pytest.fixture
def fakes():
    """Backends fake (correct, fastest correct), fake2 (wrong, fastest), fake3 (raises)."""
    import sys
    sys.modules.setdefault(_MOD, sys.modules[__name__])
    with _registry.registered(FAKE, [_impl("fake", "_fake_ok")]), \
            _registry.registered(FAKE2, [_impl("fake2", "_fake_wrong")]), \
            _registry.registered(FAKE3, [_impl("fake3", "_fake_raises")]):
        yield


def _args(seed=0, shape=(2, 3, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    C = shape[1]
    return x, torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g), torch.randn(shape, generator=g)


def _expected(x, s, b, i):
    return torch.relu(x * s.view(1, -1, 1, 1) + b.view(1, -1, 1, 1) + i)


def test_fastest_correct_is_chosen_wrong_and_raising_are_excluded_and_warned_once(cache_dir, fakes):
    x, s, b, i = _args()
    with _tune.testing(timer=_timer, devices=("cpu",)):
        with pytest.warns(_tune.TuningWarning) as rec, _tune.recording() as decisions:
            y = rk.bn_add_relu(x, s, b, i)
        torch.testing.assert_close(y, _expected(x, s, b, i))
        msgs = [str(w.message) for w in rec.list if issubclass(w.category, _tune.TuningWarning)]
        assert any("'fake2' implementation of bn_add_relu" in m and "x (2, 3, 4, 4) float32 nchw" in m
                   and "disagrees with the torch reference" in m for m in msgs), msgs
        assert any("'fake3' implementation of bn_add_relu" in m and "illegal memory access" in m for m in msgs), msgs
        assert [d.impl for d in decisions] == ["fake"] and decisions[0].how == "tuned"
        # the second call with the same key: the remembered choice, nothing timed, no new warning
        RAN.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with _tune.recording() as decisions:
                y2 = rk.bn_add_relu(x, s, b, i)
        assert RAN == ["fast"] and decisions[0].how == "cached"
        torch.testing.assert_close(y2, y)
        # another shape is a new key: measured again, the failures warned again for that shape
        with pytest.warns(_tune.TuningWarning, match=r"x \(1, 3, 5, 5\)"):
            rk.bn_add_relu(*_args(shape=(1, 3, 5, 5)))
        res = _tune.results()
        assert len(res) == 2
        one = next(iter(res.values()))
        assert one["fake"] == 1.0 and one["aten"] == 10.0 and str(one["fake2"]).startswith("error: AssertionError")


def test_cache_written_reloaded_versioned(cache_dir, fakes):
    x, s, b, i = _args()
    with _tune.testing(timer=_timer, devices=("cpu",)):
        with pytest.warns(_tune.TuningWarning):
            rk.bn_add_relu(x, s, b, i)
        path = cache_dir / "tuning.json"
        doc = json.loads(path.read_text())
        assert doc["schema"] == _tune.SCHEMA
        (fp, entries), = doc["entries"].items()
        assert fp == _tune.fingerprint(torch.device("cpu"))
        (key, entry), = entries.items()
        assert key.startswith("bn_add_relu|(2, 3, 4, 4)|nchw|torch.float32|")
        assert entry["choice"] == "fake" and set(entry["failed"]) == {"fake2", "fake3"}
        # a new process (memory forgotten) reuses the file: nothing is measured
        _tune.reset()
        RAN.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with _tune.recording() as decisions:
                rk.bn_add_relu(x, s, b, i)
        assert RAN == ["fast"] and decisions[0].how == "cached"
        assert _tune.cache_summary()["entries"] == 1


@pytest.mark.parametrize("content", ["{not json", json.dumps({"schema": "other/9", "entries": {}}), "[1, 2]"])
def test_corrupt_or_foreign_cache_is_ignored_with_a_warning(cache_dir, fakes, content):
    cache_dir.mkdir(parents=True)
    (cache_dir / "tuning.json").write_text(content)
    x, s, b, i = _args()
    with _tune.testing(timer=_timer, devices=("cpu",)):
        with pytest.warns(_tune.TuningWarning, match=r"tuning\.json (is corrupt|is not a tuning cache)"):
            y = rk.bn_add_relu(x, s, b, i)
        torch.testing.assert_close(y, _expected(x, s, b, i))
        doc = json.loads((cache_dir / "tuning.json").read_text())  # rewritten, valid again
        assert doc["schema"] == _tune.SCHEMA


def test_unwritable_cache_dir_warns_and_keeps_choices_in_memory(tmp_path, monkeypatch, fakes):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("RESNET_KERNELS_CACHE_DIR", str(blocker / "sub"))  # a directory under a file
    x, s, b, i = _args()
    with _tune.testing(timer=_timer, devices=("cpu",)):
        with pytest.warns(_tune.TuningWarning, match=r"cannot write the tuning cache"):
            y = rk.bn_add_relu(x, s, b, i)
        torch.testing.assert_close(y, _expected(x, s, b, i))
        with _tune.recording() as decisions:
            rk.bn_add_relu(x, s, b, i)
        assert decisions[0].how == "cached" and decisions[0].impl == "fake"


@pytest.mark.parametrize("why", ["env", "tracing", "capture"])
def test_no_timing_when_it_must_not(cache_dir, fakes, monkeypatch, why):
    if why == "env":
        monkeypatch.setenv("RESNET_KERNELS_TUNE", "0")
    elif why == "tracing":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    else:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    timed = []
    x, s, b, i = _args()
    with _tune.testing(timer=lambda fn, d: timed.append(1) or 1.0, devices=("cpu",)):
        with _tune.recording() as decisions:
            y = rk.bn_add_relu(x, s, b, i)
    assert timed == []
    # the documented static default: the first candidate in the registry's order (the fake, priority 1)
    assert decisions[0].impl == "fake" and decisions[0].how.startswith("static (not timed:")
    assert not (cache_dir / "tuning.json").exists()
    torch.testing.assert_close(y, _expected(x, s, b, i))


def test_cached_choice_still_used_when_timing_is_off(cache_dir, fakes, monkeypatch):
    x, s, b, i = _args()
    with _tune.testing(timer=_timer, devices=("cpu",)):
        with pytest.warns(_tune.TuningWarning):
            rk.bn_add_relu(x, s, b, i)
        _tune.reset()
        monkeypatch.setenv("RESNET_KERNELS_TUNE", "0")
        with _tune.recording() as decisions:
            rk.bn_add_relu(x, s, b, i)
        assert decisions[0].how == "cached" and decisions[0].impl == "fake"


def test_deterministic_mode_filters(cache_dir, fakes):
    nondet = Backend("fakend", "", lambda device: None)
    x, s, b, i = _args()
    with _registry.registered(nondet, [_impl("fakend", "_fake_nondet", deterministic=False)]):
        with _tune.testing(timer=_timer, devices=("cpu",)):
            with pytest.warns(_tune.TuningWarning), _tune.recording() as decisions:
                rk.bn_add_relu(x, s, b, i)
            assert decisions[0].impl == "fakend"  # fastest correct
            old = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(True)
            try:
                with pytest.warns(_tune.TuningWarning), _tune.recording() as decisions:
                    rk.bn_add_relu(x, s, b, i)
                assert decisions[0].impl == "fake"  # a separate key, nondeterministic filtered out
                with pytest.raises(BackendUnavailableError, match=r"not deterministic"):
                    rk.bn_add_relu(x, s, b, i, backend="fakend")
            finally:
                torch.use_deterministic_algorithms(old)


def test_explicit_backend_is_obeyed_without_timing(cache_dir, fakes):
    timed = []
    x, s, b, i = _args()
    with _tune.testing(timer=lambda fn, d: timed.append(1) or 1.0, devices=("cpu",)):
        RAN.clear()
        with _tune.recording() as decisions:
            y = rk.bn_add_relu(x, s, b, i, backend="fake2")  # wrong, but asked for by name
        assert timed == [] and RAN == ["wrong"] and decisions[0].how == "explicit"
        torch.testing.assert_close(y, x)
        with pytest.raises(RuntimeError, match="simulated"):
            rk.bn_add_relu(x, s, b, i, backend="fake3")


def test_cached_choice_that_can_no_longer_run_is_measured_again(cache_dir, fakes):
    """E.g. a GPU or a build that disappeared between tuning and use."""
    gone = {"flag": False}
    flaky = Backend("flaky", "", lambda device: "went away" if gone["flag"] else None)
    x, s, b, i = _args()
    with _registry.registered(flaky, [_impl("flaky", "_fake_flaky")]):
        with _tune.testing(timer=_timer, devices=("cpu",)):
            with pytest.warns(_tune.TuningWarning), _tune.recording() as decisions:
                rk.bn_add_relu(x, s, b, i)
            assert decisions[0].impl == "flaky"
            gone["flag"] = True
            with _tune.recording() as decisions:
                y = rk.bn_add_relu(x, s, b, i)
            assert decisions[0].impl == "fake" and decisions[0].how == "tuned"
            torch.testing.assert_close(y, _expected(x, s, b, i))
            with pytest.raises(BackendUnavailableError, match="backend 'flaky' is unavailable: went away"):
                rk.bn_add_relu(x, s, b, i, backend="flaky")


def test_every_implementation_failing_is_an_error_naming_them(cache_dir, monkeypatch):
    from resnet_kernels.backends import aten_bn_add_relu, torch_bn_add_relu
    monkeypatch.setattr(aten_bn_add_relu, "bn_add_relu_forward", _fake_raises)
    monkeypatch.setattr(torch_bn_add_relu, "bn_add_relu_forward", _fake_raises)
    x, s, b, i = _args()
    with _tune.testing(timer=_timer, devices=("cpu",)):
        with pytest.warns(_tune.TuningWarning), \
                pytest.raises(BackendUnavailableError, match=r"every implementation failed .*aten: RuntimeError"):
            rk.bn_add_relu(x, s, b, i)


def test_registry_rejects_bad_declarations():
    with pytest.raises(ValueError, match="identifier other than 'auto'"):
        _registry.register_backend(Backend("auto", "", lambda d: None))
    with pytest.raises(ValueError, match="already registered"):
        _registry.register_backend(Backend("torch", "", lambda d: None))
    with pytest.raises(ValueError, match="unknown op"):
        _registry.register(Impl("conv3d", "torch", "x:y"))
    with pytest.raises(ValueError, match="register the backend"):
        _registry.register(Impl("bn_add_relu", "nobody", "x:y"))
    with pytest.raises(ValueError, match="already has a 'torch' implementation"):
        _registry.register(Impl("bn_add_relu", "torch", "x:y"))


def test_every_op_has_a_reference_and_an_implementation_per_public_backend():
    # a backend declared fallback_auto (e.g. cutlass: convolutions only) may leave ops to 'auto'
    partial = {b for b in rk.BACKENDS if _registry.get_backend_decl(b).fallback_auto}
    covered = set()
    for op in _registry.OPS:
        impls = _registry.implementations(op)
        assert sum(i.reference for i in impls) == 1, op
        assert set(rk.BACKENDS) - partial <= {i.backend for i in impls} <= set(rk.BACKENDS), op
        covered |= {i.backend for i in impls}
        for i in impls:
            assert callable(i.load()), i
    assert covered == set(rk.BACKENDS)  # every public backend implements at least one op


def test_hidden_backends_are_not_offered_nor_chosen_but_resolvable():
    hidden = Backend("fakehidden", "", lambda device: None, hidden=True)
    with _registry.registered(hidden, [_impl("fakehidden", "_fake_ok", priority=0)]):
        assert "fakehidden" not in rk.BACKENDS and "fakehidden" not in _registry.backend_names()
        assert "fakehidden" in _registry.choices()
        x, s, b, i = _args()
        with _tune.recording() as decisions:
            rk.bn_add_relu(x, s, b, i)
            y = rk.bn_add_relu(x, s, b, i, backend="fakehidden")
        assert [d.impl for d in decisions] == ["aten", "fakehidden"]
        torch.testing.assert_close(y, _expected(x, s, b, i))


def test_cache_dir_default_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv("RESNET_KERNELS_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _tune.cache_path() == tmp_path / "resnet_kernels" / "tuning.json"
    monkeypatch.setenv("RESNET_KERNELS_CACHE_DIR", str(tmp_path / "x"))
    assert _tune.cache_path() == tmp_path / "x" / "tuning.json"
    assert os.fspath(_tune.cache_dir()) == str(tmp_path / "x")


def test_distributed_ranks_use_rank0s_choice(tmp_path):
    """Rank 0 measures and broadcasts; rank 1 measures nothing and uses rank 0's choice."""
    import subprocess
    import sys

    out = tmp_path / "out.json"
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tune_dist_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", RESNET_KERNELS_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, worker, str(out)], capture_output=True, text=True, timeout=200, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = json.loads(out.read_text())
    assert r0["impl"] == r1["impl"] == "aten"  # rank 1's own timer would have picked torch
    assert r0["how"] == r1["how"] == "tuned"
    assert sorted(r0["timer_calls"]) == ["aten", "torch"] and r1["timer_calls"] == []
    assert r0["ok"] and r1["ok"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("op", ["conv2d_stats", "conv2d_epilogue"])
def test_gpu_auto_measures_verifies_and_caches(tmp_path, monkeypatch, op):
    """On a real GPU: the first call of a ResNet layer shape times every implementation, each of
    ours agrees with the aten reference (none excluded), the choice is cached and reused, and the
    result matches PyTorch's own layers."""
    monkeypatch.setenv("RESNET_KERNELS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("RESNET_KERNELS_TUNE", raising=False)
    _tune.reset()
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8, 64, 28, 28, device="cuda", dtype=torch.bfloat16, generator=g)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3, device="cuda", dtype=torch.bfloat16, generator=g) * 0.05
    s, b = torch.rand(64, device="cuda") + 0.5, torch.randn(64, device="cuda")

    def call():
        if op == "conv2d_stats":
            return rk.conv2d_stats(x, w, padding=1)
        return (rk.conv2d_epilogue(x, w, s, b, padding=1, relu=True),)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _tune.recording() as decisions:
            got = call()
    mine = [d for d in decisions if d.op == op]
    assert mine and mine[0].how == "tuned"
    times = _tune.results()[mine[0].key]
    failed = {k: v for k, v in times.items() if isinstance(v, str)}
    assert not failed, failed  # every implementation ran and agreed with the reference on this GPU
    assert {"aten", "cuda", "triton"} <= set(times)
    assert not [w_ for w_ in caught if issubclass(w_.category, _tune.TuningWarning)]
    with _tune.recording() as decisions:
        again = call()
    assert [d.how for d in decisions if d.op == op] == ["cached"]
    ref = torch.nn.functional.conv2d(x.float(), w.float(), padding=1)
    if op == "conv2d_epilogue":
        ref = torch.relu(ref * s.view(1, -1, 1, 1) + b.view(1, -1, 1, 1))
    scale = float(ref.abs().max())
    for t in (got[0], again[0]):
        assert float((t.float() - ref).abs().max()) <= 2 ** -7 * scale
    assert json.loads((tmp_path / "tuning.json").read_text())["schema"] == _tune.SCHEMA


def test_cache_summary_reports_a_bad_cache_without_warning(cache_dir):
    cache_dir.mkdir(parents=True)
    (cache_dir / "tuning.json").write_text("{not json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _tune.cache_summary()
    assert got["exists"] and got["entries"] == 0 and "is corrupt" in got["error"]


def test_the_static_first_choice_is_remembered_only_while_it_cannot_change():
    """first_candidate (what 'auto' runs on CPU tensors) remembers its answer per (op, device type)
    only where no call or mode can change it, and answers afresh after any registration, for a
    backend that became unavailable, and where a passed-over implementation depended on the call."""
    import sys
    sys.modules.setdefault(_MOD, sys.modules[__name__])
    x, s, b, i = _args()
    cpu = torch.device("cpu")
    import importlib
    call = importlib.import_module("resnet_kernels.ops.bn_add_relu").ForwardCall(x, s, b, i, None, None, True, "nchw")

    def first():
        return _registry.first_candidate("bn_add_relu", call, cpu).backend

    assert first() == "aten" and first() == "aten"
    assert ("bn_add_relu", "cpu") in _registry._first
    up = {"on": True}
    switch = Backend("rk_switch", "", lambda device: None if up["on"] else "switched off")
    with _registry.registered(switch, [_impl("rk_switch", "_fake_ok", priority=0)]):
        assert first() == "rk_switch" and first() == "rk_switch"  # (the registration: answered afresh)
        up["on"] = False
        assert first() == "aten"  # unavailable now: passed over, and not remembered (availability can change)
        up["on"] = True
        assert first() == "rk_switch"
    assert first() == "aten"
    picky = Backend("rk_picky", "", lambda device: None)
    wants = {"c": 3}
    with _registry.registered(picky, [_impl("rk_picky", "_fake_ok", priority=0,
                                            supports=lambda c: None if c.x.shape[1] == wants["c"] else "no")]):
        assert first() == "rk_picky"
        wants["c"] = 4  # the same epoch, another answer from supports: never remembered past it
        assert first() == "aten"
    nondet = Backend("rk_nondet", "", lambda device: None)
    with _registry.registered(nondet, [_impl("rk_nondet", "_fake_nondet", priority=0, deterministic=False)]):
        assert first() == "rk_nondet"
        prev = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            assert first() == "aten"
        finally:
            torch.use_deterministic_algorithms(prev)


def test_apply_in_place_runs_what_dispatch_would_run():
    """The aten convolution epilogue's nested bn_add_relu (ops.bn_add_relu.apply_in_place) skips
    building a Call for 'auto' on CPU tensors only where dispatch would run the kept static first
    choice; a registration changes it, and a recorder still sees the decision."""
    import importlib
    import sys
    sys.modules.setdefault(_MOD, sys.modules[__name__])
    bar = importlib.import_module("resnet_kernels.ops.bn_add_relu")
    x, s, b, i = _args()
    want = _expected(x, s, b, i)
    RAN.clear()
    torch.testing.assert_close(bar.apply_in_place(x.clone(), s, b, i, True), want)
    assert RAN == []  # aten's
    with _registry.registered(FAKE, [_impl("fake", "_fake_ok")]):
        got = bar.apply_in_place(x.clone(), s, b, i, True)
        assert RAN == ["fast"]
        torch.testing.assert_close(got, want)
        with _tune.recording() as rec:
            bar.apply_in_place(x.clone(), s, b, i, True)
        assert [(d.op, d.impl) for d in rec] == [("bn_add_relu", "fake")]
    RAN.clear()
    bar.apply_in_place(x.clone(), s, b, i, True)
    assert RAN == []
