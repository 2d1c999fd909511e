"""The benchmark harness without a GPU: the timing core with a fake clock, the rotation and
copy-bandwidth arithmetic, the benchmark shapes, the summary generator and gpu_check.sh."""

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from resnet_kernels import _timing

from rk_testing import HAS_GPU

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "benchmarks"


@pytest.fixture
def bench_modules(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import shapes
    import summarize

    return shapes, summarize


class FakeTimer:
    """A scripted clock: ``fn`` advances it; marks read it; synchronize is counted."""

    name = "fake"

    def __init__(self):
        self.now = 0.0
        self.syncs = 0
        self.marks = 0

    def mark(self):
        self.marks += 1
        return self.now

    def elapsed_ms(self, a, b):
        return b - a

    def synchronize(self):
        self.syncs += 1


# --------------------------------------------------------------------------------------------
# measure
# --------------------------------------------------------------------------------------------


def test_measure_median_excludes_warmup():
    t = FakeTimer()
    durations = iter([100.0, 100.0, 5.0, 1.0, 3.0, 2.0, 4.0])  # 2 warm-up (slow: compile), 5 timed

    def fn():
        t.now += next(durations)

    m = _timing.measure(fn, iters=5, warmup=2, timer=t)
    assert m.samples_ms == [5.0, 1.0, 3.0, 2.0, 4.0]
    assert m.median_ms == 3.0
    assert (m.min_ms, m.max_ms, m.mean_ms) == (1.0, 5.0, 3.0)
    assert m.iters == 5 and m.warmup == 2 and m.timer == "fake"
    assert t.syncs == 2  # once after the warm-up, once before reading the samples
    assert m.per_second(6) == pytest.approx(6 / 3e-3)


def test_measure_quantiles_match_numpy():
    t = FakeTimer()
    vals = [7.0, 1.0, 9.5, 3.25, 3.0, 8.0, 2.0, 6.5]
    it = iter(vals)

    def fn():
        t.now += next(it)

    m = _timing.measure(fn, iters=len(vals), warmup=0, timer=t)
    assert m.median_ms == pytest.approx(np.median(vals))
    assert m.iqr_ms == pytest.approx(np.percentile(vals, 75) - np.percentile(vals, 25))
    assert m.mean_ms == pytest.approx(statistics.fmean(vals))
    d = m.to_dict(samples=True)
    assert d["samples_ms"] == vals and d["median_ms"] == m.median_ms and d["timer"] == "fake"


def test_measure_rotates_inputs_over_warmup_and_timed_iterations():
    t = FakeTimer()
    seen = []

    def fn(buf):
        seen.append(buf)
        t.now += 1.0

    m = _timing.measure(fn, [("a",), ("b",), ("c",)], iters=4, warmup=2, timer=t)
    assert seen == ["a", "b", "c", "a", "b", "c"]
    assert m.rotation == 3


def test_measure_setup_is_not_timed():
    t = FakeTimer()
    calls = []

    def setup(x):
        t.now += 1000.0  # e.g. the forward pass before a timed backward
        return x * 10, "y"

    def fn(a, b):
        calls.append((a, b))
        t.now += 2.0

    m = _timing.measure(fn, [(1,), (2,)], setup=setup, iters=3, warmup=1, timer=t)
    assert m.samples_ms == [2.0, 2.0, 2.0]
    assert calls == [(10, "y"), (20, "y"), (10, "y"), (20, "y")]


def test_measure_single_value_setup_and_progress():
    t = FakeTimer()
    progress = []

    def fn(v):
        assert v == "ready"
        t.now += 1.0

    _timing.measure(fn, [()], setup=lambda: "ready", iters=2, warmup=1, timer=t,
                    on_iter=lambda d, n: progress.append((d, n)))
    assert progress == [(1, 3), (2, 3), (3, 3)]


@pytest.mark.parametrize("kw, msg", [(dict(iters=0, warmup=1), "iters"), (dict(iters=1, warmup=-1), "warmup")])
def test_measure_rejects_bad_counts(kw, msg):
    with pytest.raises(ValueError, match=msg):
        _timing.measure(lambda: None, timer=FakeTimer(), **kw)


def test_measure_rejects_empty_inputs():
    with pytest.raises(ValueError, match="inputs"):
        _timing.measure(lambda: None, [], iters=1, warmup=0, timer=FakeTimer())


def test_wall_clock_timer_measures_cpu_time():
    import time

    m = _timing.measure(lambda: time.sleep(0.002), iters=3, warmup=1, timer=_timing.WallClockTimer())
    assert m.timer == "wall_clock_cpu"
    assert 1.5 <= m.median_ms < 500


# --------------------------------------------------------------------------------------------
# rotation, copy bandwidth, peak memory, environment
# --------------------------------------------------------------------------------------------


def test_rotation_count():
    L2 = 50 * 2 ** 20
    # a working set far larger than L2: two copies are enough
    assert _timing.rotation_count(400 * 2 ** 20, L2) == 2
    # a working set of L2 size: the others touched in between must exceed 2 x L2
    n = _timing.rotation_count(L2, L2)
    assert (n - 1) * L2 >= 2 * L2
    # small sets: many copies, capped
    assert _timing.rotation_count(1024, L2) == 64
    assert _timing.rotation_count(1024, L2, max_sets=10) == 10
    # the memory cap wins over the L2 target but never goes below min_sets
    assert _timing.rotation_count(2 ** 20, L2, max_total_bytes=5 * 2 ** 20) == 5
    assert _timing.rotation_count(2 ** 20, L2, max_total_bytes=1) == 2
    with pytest.raises(ValueError):
        _timing.rotation_count(0, L2)


def test_make_rotation_builds_independent_sets():
    import torch

    sets = _timing.make_rotation(lambda: (torch.zeros(4),), 10 ** 9, "cpu")
    assert len(sets) == 2
    assert sets[0][0] is not sets[1][0]


def test_copy_bandwidth_arithmetic():
    class CopyTimer(FakeTimer):
        def mark(self):
            self.now += 0.5  # every iteration's mark pair is 0.5 ms apart
            return self.now

    ct = CopyTimer()
    r = _timing.copy_bandwidth(1000, "cpu", iters=4, warmup=1, timer=ct)
    assert r["bytes"] == 2000  # read + write
    assert r["median_ms"] == pytest.approx(0.5)
    assert r["gbps"] == pytest.approx(2000 / 0.5e-3 / 1e9)
    assert _timing.gbps(2000, 0.5) == pytest.approx(r["gbps"])


def test_peak_memory_on_cpu_runs_fn_and_returns_none():
    called = []
    assert _timing.peak_memory(lambda: called.append(1), "cpu") is None
    assert called == [1]


def test_git_commit_falls_back_to_env(tmp_path, monkeypatch):
    if shutil.which("git"):
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True)
        if r.returncode == 0:
            pytest.skip("tmp_path is inside a git repository")
    monkeypatch.setenv("RESNET_KERNELS_COMMIT", "abc123")
    assert _timing.git_commit(tmp_path) == ("abc123", None)
    monkeypatch.delenv("RESNET_KERNELS_COMMIT")
    assert _timing.git_commit(tmp_path) == (None, None)


def test_env_info_fields():
    d = _timing.env_info("cpu")
    for k in ("gpu", "torch", "torch_cuda", "triton", "git_commit", "resnet_kernels", "python"):
        assert k in d
    assert d["gpu"] is None and d["device"] == "cpu"


# --------------------------------------------------------------------------------------------
# benchmark shapes
# --------------------------------------------------------------------------------------------


def test_resnet_conv_shapes(bench_modules):
    shapes, _ = bench_modules
    r18 = shapes.resnet_convs("resnet18")
    r50 = shapes.resnet_convs("resnet50")
    # ResNet-18: stem, layer1's 3x3, and per later stage: strided 3x3, 3x3, 1x1 projection
    assert len(r18) == 11
    assert len(r50) == 23
    stem = r18[0]
    assert (stem.cin, stem.cout, stem.k, stem.stride, stem.pad, stem.h, stem.oh) == (3, 64, 7, 2, 3, 224, 112)
    # every 3x3 conv of ResNet-18's layer1 shares one shape (4 uses)
    l1 = next(c for c in r18 if c.where[0] == "r18.layer1.0.conv1")
    assert len(l1.where) == 4 and l1.oh == 56
    # torchvision v1.5 bottleneck: the stride sits on the 3x3 conv
    s2 = next(c for c in r50 if c.where[0] == "r50.layer2.0.conv2")
    assert (s2.k, s2.stride, s2.h, s2.oh) == (3, 2, 56, 28)
    # the total number of conv layers is preserved by the dedup
    assert sum(len(c.where) for c in r18) == 20
    assert sum(len(c.where) for c in r50) == 53
    assert stem.flops(1) == 2 * 112 * 112 * 64 * 3 * 49
    assert len({c.id for c in shapes.distinct_convs()}) == len(shapes.distinct_convs())
    assert shapes.residual_shapes(256)[0] == ("r50.layer1", (256, 256, 56, 56))
    assert shapes.residual_shapes(256)[-1] == ("r50.layer4", (256, 2048, 7, 7))


def test_benchmark_conftest_does_not_set_triton_interpret():
    text = (BENCH_DIR / "conftest.py").read_text()
    assert "TRITON_INTERPRET" not in text.replace("does NOT set TRITON_INTERPRET", "")


@pytest.mark.skipif(HAS_GPU, reason="with a GPU this would run the benchmarks")
def test_benchmark_suites_skip_cleanly_without_gpu(tmp_path):
    pytest.importorskip("pytest_benchmark")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["RK_BENCH_FAST"] = "1"
    # the CPU suites (test_bench_cpu_*.py: 'auto' and host time against plain PyTorch on a CPU)
    # are meant to run here; every other suite times GPU kernels
    r = subprocess.run([sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT),
                        "-p", "no:cacheprovider", "-q", "-rs",
                        *(f"--ignore={p}" for p in sorted(BENCH_DIR.glob("test_bench_cpu_*.py"))), str(BENCH_DIR)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "skipped" in out and "need an NVIDIA GPU" in out
    assert " passed" not in out  # nothing ran


# --------------------------------------------------------------------------------------------
# summary generator and gpu_check.sh
# --------------------------------------------------------------------------------------------


def _pb(records):
    return {"benchmarks": [{"name": f"test[{i}]", "fullname": f"bench.py::test[{i}]", "group": "g",
                            "stats": {"median": 1.0}, "extra_info": r} for i, r in enumerate(records)]}


def _fake_results(tmp_path):
    ops = [dict(suite="ops", case="bn_add_relu r50.layer1", direction="fwd", impl=i, median_ms=ms, pct_of_copy=pc)
           for i, ms, pc in (("eager", 3.0, 30.0), ("compile", 1.5, 60.0), ("cuda", 1.0, 90.0), ("triton", 1.2, 75.0))]
    conv = [dict(suite="conv", case="r50.conv1 N256", kind="conv", impl=i, median_ms=ms, tflops=tf)
            for i, ms, tf in (("cudnn", 2.0, 100.0), ("cuda", 4.0, 50.0))]
    model = {"schema": "resnet-kernels-bench/1", "config": {"model": "resnet18", "mode": "train", "batch": 64},
             "results": [{"backend": "eager", "status": "ok", "median_ms": 10.0, "images_per_s": 6400.0},
                         {"backend": "compile", "status": "ok", "median_ms": 8.0, "images_per_s": 8000.0},
                         {"backend": "cuda", "status": "ok", "median_ms": 5.0, "images_per_s": 12800.0},
                         {"backend": "triton", "status": "unavailable", "reason": "no triton"}]}
    paths = []
    for name, data in (("ops.json", _pb(ops)), ("conv.json", _pb(conv)), ("model.json", model)):
        p = tmp_path / name
        p.write_text(json.dumps(data))
        paths.append(str(p))
    return paths


def test_summary_rows_and_ratios(tmp_path, bench_modules):
    _, summarize = bench_modules
    recs, problems = summarize.load(_fake_results(tmp_path))
    assert not problems
    rows = {(r["suite"], r["case"], r["what"]): r for r in summarize.rows_of(recs)}
    op = rows[("ops", "bn_add_relu r50.layer1", "fwd")]
    assert op["cuda_vs_eager"] == pytest.approx(3.0) and op["cuda_vs_compile"] == pytest.approx(1.5)
    assert op["triton_vs_eager"] == pytest.approx(2.5) and op["cuda_pct_copy"] == 90.0
    cv = rows[("conv", "r50.conv1 N256", "conv")]
    assert cv["eager_is"] == "cudnn" and cv["cuda_vs_eager"] == pytest.approx(0.5)
    assert cv["compile_ms"] is None and cv["triton_ms"] is None
    md = rows[("models", "resnet18 train N64", "")]
    assert md["cuda_vs_eager"] == pytest.approx(2.0) and md["cuda_vs_compile"] == pytest.approx(1.6)
    assert "no triton" in md["triton_status"]


def test_summary_command_prints_tables_and_stages(tmp_path, bench_modules, capsys):
    _, summarize = bench_modules
    stages = tmp_path / "stages.tsv"
    stages.write_text("install\tok\t0\t80.5\ntests\tfailed\t1\t30.0\nmodel-x\tno-time\t124\t0\n")
    out_json = tmp_path / "s.json"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    rc = summarize.main(["summary", "--stages", str(stages), "--json", str(out_json), *_fake_results(tmp_path),
                         str(bad)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "[ops]" in out and "[conv]" in out and "[models]" in out
    assert "3.00" in out and "90.0" in out  # cuda: 3x eager, 90% of copy bandwidth
    assert "FAILED STAGES: tests, model-x" in out
    assert "bad.json" in out
    assert out.rstrip().splitlines()[-1].startswith("FAILED STAGES")  # the stage verdict is last
    d = json.loads(out_json.read_text())
    assert len(d["rows"]) == 3 and len(d["stages"]) == 3


def test_compare_command(tmp_path, bench_modules, capsys):
    _, summarize = bench_modules
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_pb([dict(suite="ops", case="c", impl="cuda", median_ms=2.0)])))
    b.write_text(json.dumps(_pb([dict(suite="ops", case="c", impl="cuda", median_ms=1.0)])))
    assert summarize.main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "bench.py::test[0]" in out and "0.500" in out


def test_gpu_check_script_syntax_and_references():
    script = BENCH_DIR / "gpu_check.sh"
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = script.read_text()
    assert "set -o pipefail" in text and "timeout" in text
    for ref in ("benchmarks/test_bench_bn_add_relu.py", "benchmarks/test_bench_conv.py",
                "benchmarks/test_bench_conv_backward.py", "benchmarks/summarize.py",
                "benchmarks/count_vs_profiler.py"):
        assert (ROOT / ref).exists() and ref.split("/")[-1] in text
    assert "RESNET_KERNELS_REQUIRE_CUDA=1" in text and "--no-build-isolation" in text


def test_summary_reads_jsonl_records(tmp_path, bench_modules):
    _, summarize = bench_modules
    p = tmp_path / "records_ops.jsonl"
    lines = [dict(suite="ops", case="add_relu x", direction="bwd", impl=i, median_ms=ms) for i, ms in
             (("eager", 2.0), ("triton", 0.5))]
    p.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    recs, problems = summarize.load([str(p)])
    assert not problems
    (row,) = summarize.rows_of(recs)
    assert row["triton_vs_eager"] == pytest.approx(4.0)


def test_gpu_check_script_runs_end_to_end_with_every_stage_deselected(tmp_path):
    """The stage bookkeeping, the summary printed last and the $OUT files, without running
    any stage (RK_GPU_CHECK_ONLY names none of them)."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out), RK_GPU_CHECK_ONLY="none", TMPDIR=str(tmp_path))
    r = subprocess.run(["bash", str(BENCH_DIR / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.rstrip().splitlines()
    assert "ALL STAGES OK" in lines[-2] and lines[-1].startswith("total ")
    assert "resnet-kernels GPU check summary" in r.stdout
    files = sorted(p.name for p in (out / "gpu_check").iterdir())
    assert len(files) <= 8 and "summary.json" in files and "stages.tsv" in files
    stages = json.loads((out / "gpu_check" / "summary.json").read_text())["stages"]
    assert {s["stage"] for s in stages} >= {"install", "info", "check", "tests", "bench-ops", "bench-conv",
                                            "bench-conv-bwd", "model-resnet18-infer", "model-resnet50-train",
                                            "count-check"}
    assert all(s["status"] == "skipped" for s in stages)
