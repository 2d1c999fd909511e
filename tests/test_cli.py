"""The ``resnet-kernels`` command: info, check and bench (CPU mode here; CI has no GPU)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import resnet_kernels
from resnet_kernels import bench, cli
from resnet_kernels.functional import conv_bn_act

from rk_testing import HAS_GPU


def _run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# --------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------


def test_info_text(capsys):
    rc, out, _ = _run(capsys, "info")
    assert rc == 0
    assert "resnet_kernels" in out and "torch" in out
    for b in resnet_kernels.BACKENDS:
        assert f"  {b}" in out
    assert "tuning cache" in out


def test_info_json(capsys):
    rc, out, _ = _run(capsys, "info", "--json")
    assert rc == 0
    d = json.loads(out)
    assert set(d["backends"]) == set(resnet_kernels.BACKENDS)
    assert d["backends"]["torch"]["usable"] is True and d["backends"]["aten"]["usable"] is True
    assert d["tuning_cache"]["path"].endswith("tuning.json")


def test_python_dash_m_entry_point(tmp_path):
    """``python -m resnet_kernels`` (run outside the source tree, as users do)."""
    r = subprocess.run([sys.executable, "-m", "resnet_kernels", "bench", "--help"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert r.returncode == 0, r.stderr
    for opt in ("--model", "--mode", "--batch", "--image-size", "--dtype", "--layout", "--backends", "--iters",
                "--warmup", "--json", "--plot"):
        assert opt in r.stdout


# --------------------------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------------------------


def test_check_torch_passes_and_prints_table(capsys, tmp_path):
    path = tmp_path / "check.json"
    rc, out, _ = _run(capsys, "check", "--backends", "torch", "--no-model", "--json", str(path))
    assert rc == 0, out
    assert "case" in out and "result" in out
    res = json.loads(path.read_text())
    cases = {r["case"] for r in res["rows"]}
    for c in ("add_relu", "bn_add_relu", "bn_add_relu +proj", "maxpool2d 3x3 s2", "conv_bn_act train 3x3",
              "conv_bn_add_act proj"):
        assert c in cases
    assert all(r["status"] == "PASS" for r in res["rows"])
    assert res["passed"] is True
    # each row compares forward and backward tensors: the worst tensor is named
    assert all(r["worst"] for r in res["rows"])


@pytest.mark.skipif(HAS_GPU, reason="checks the CPU listing of the cuda backend")
def test_check_lists_unavailable_backends_without_failing(capsys):
    rc, out, _ = _run(capsys, "check", "--cases", "add_relu")
    assert rc == 0, out
    assert "unavailable (not a failure): cuda:" in out
    # conftest sets TRITON_INTERPRET=1 without a GPU: triton is checked in the interpreter
    assert any(line.split()[3:4] == ["triton"] for line in out.splitlines() if line.startswith("add_relu"))


def test_check_detects_a_wrong_kernel(capsys, monkeypatch):
    from resnet_kernels.backends import torch_bn_add_relu

    orig = torch_bn_add_relu.bn_add_relu_forward

    def broken(x, scale, shift, identity, identity_scale, identity_shift, out, *args):
        orig(x, scale, shift, identity, identity_scale, identity_shift, out, *args)
        out.view(-1)[0] += 0.5  # one wrong element

    monkeypatch.setattr(torch_bn_add_relu, "bn_add_relu_forward", broken)
    rc, out, _ = _run(capsys, "check", "--backends", "torch", "--cases", "add_relu")
    assert rc == 1
    assert "FAIL" in out and "failed" in out


def test_check_rejects_unknown_backend(capsys):
    rc, _, err = _run(capsys, "check", "--backends", "nope")
    assert rc == 2
    assert "nope" in err


# --------------------------------------------------------------------------------------------
# bench (CPU mode)
# --------------------------------------------------------------------------------------------


class _Tiny(nn.Module):
    """A stand-in model with the same interface as the ResNets (fused path through the real
    conv_bn_act op; eager path through the plain layers)."""

    def __init__(self, num_classes, backend=None, fused=True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)
        self.backend, self.fused = backend, fused

    def forward(self, x):
        if self.fused:
            y = conv_bn_act(x, self.conv1, self.bn1, relu=True, backend=self.backend)
        else:
            y = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


@pytest.fixture
def tiny_models(monkeypatch):
    monkeypatch.setattr(bench, "eager_model", lambda arch, n: (_Tiny(n, fused=False), "tests._Tiny"))
    monkeypatch.setattr(bench, "ours_model", lambda arch, n, backend: _Tiny(n, backend=backend))


BENCH_ARGS = ["bench", "--model", "resnet18", "--batch", "2", "--image-size", "32", "--iters", "3", "--warmup", "1",
              "--num-classes", "10", "--quiet"]


def _check_schema(d, backends):
    assert d["schema"] == bench.SCHEMA
    for k in ("gpu", "torch", "triton", "torch_cuda", "git_commit", "resnet_kernels"):
        assert k in d["env"]
    c = d["config"]
    assert (c["batch"], c["image_size"], c["iters"], c["warmup"]) == (2, 32, 3, 1)
    assert d["timer"] in ("cuda_events", "wall_clock_cpu")
    assert [r["backend"] for r in d["results"]] == backends
    for r in d["results"]:
        assert r["status"] in ("ok", "unavailable", "error")
        if r["status"] == "ok":
            for k in ("median_ms", "mean_ms", "min_ms", "max_ms", "iqr_ms", "images_per_s", "first_iter_ms"):
                assert isinstance(r[k], float) and r[k] >= 0, k
            assert r["iters"] == 3 and r["warmup"] == 1
            assert r["images_per_s"] == pytest.approx(2 / (r["median_ms"] * 1e-3))
            assert r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        else:
            assert r["reason"]


@pytest.mark.skipif(HAS_GPU, reason="CPU mode")
@pytest.mark.parametrize("mode", ["train", "infer"])
def test_bench_cpu_writes_json_and_plot(capsys, tmp_path, tiny_models, mode):
    path, png = tmp_path / "b.json", tmp_path / "b.png"
    argv = BENCH_ARGS + ["--mode", mode, "--backends", "eager,auto,torch,cuda,triton", "--json", str(path)]
    try:
        import matplotlib  # noqa: F401
        have_mpl = True
        argv += ["--plot", str(png)]
    except ImportError:
        have_mpl = False
    rc, out, err = _run(capsys, *argv)
    assert rc == 0, out + err
    d = json.loads(path.read_text())
    _check_schema(d, ["eager", "auto", "torch", "cuda", "triton"])
    st = {r["backend"]: r for r in d["results"]}
    assert st["eager"]["status"] == st["torch"]["status"] == st["auto"]["status"] == "ok"
    # auto on CPU tensors: PyTorch's own kernels for every fused op, reported per step
    assert st["auto"]["mix"] and all(set(used) == {"aten"} for used in st["auto"]["mix"].values())
    assert "auto chose, per step:" in out
    assert st["eager"]["speedup_vs_eager"] == pytest.approx(1.0)
    assert st["torch"]["speedup_vs_eager"] == pytest.approx(st["eager"]["median_ms"] / st["torch"]["median_ms"])
    assert st["torch"]["peak_mem_bytes"] is None  # no GPU memory on a CPU run
    for b in ("cuda", "triton"):
        assert st[b]["status"] == "unavailable"
        assert "NVIDIA GPU" in st[b]["reason"]
    assert d["timer"] == "wall_clock_cpu"
    assert "kernel timings need an NVIDIA GPU" in out  # said plainly in the printed report
    assert "CPU wall-clock" in out
    assert "images/s" in out
    if have_mpl:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_plot_without_matplotlib_is_a_clear_error(capsys, tmp_path, tiny_models, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rc, _, err = _run(capsys, *BENCH_ARGS, "--backends", "eager", "--plot", str(tmp_path / "p.png"))
    assert rc == 2
    assert "matplotlib" in err
    assert not (tmp_path / "p.png").exists()


def test_bench_reports_a_failing_backend(capsys, tmp_path, tiny_models, monkeypatch):
    def boom(arch, n, backend):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(bench, "ours_model", boom)
    path = tmp_path / "b.json"
    rc, out, _ = _run(capsys, *BENCH_ARGS, "--backends", "eager,torch", "--json", str(path))
    assert rc == 1
    d = json.loads(path.read_text())
    r = {r["backend"]: r for r in d["results"]}
    assert r["eager"]["status"] == "ok"
    assert r["torch"]["status"] == "error" and "kernel exploded" in r["torch"]["reason"]
    assert "kernel exploded" in out


@pytest.mark.parametrize("argv, msg", [
    (["--iters", "0"], "iters"),
    (["--warmup", "0"], "warmup"),
    (["--batch", "1", "--mode", "train"], "batch"),
])
def test_bench_rejects_bad_config(capsys, argv, msg):
    rc, _, err = _run(capsys, "bench", "--backends", "eager", *argv)
    assert rc == 2
    assert msg in err


def test_bench_rejects_unknown_backend(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--backends", "eager,warp"])
    assert e.value.code == 2
    assert "warp" in capsys.readouterr().err


@pytest.mark.skipif(HAS_GPU, reason="CPU mode")
def test_bench_real_resnet18_cpu(capsys, tmp_path):
    """The real models (eager: torchvision or the unfused model; torch: the fused model on the
    torch backend), tiny sizes, inference."""
    pytest.importorskip("resnet_kernels.models")
    path = tmp_path / "r18.json"
    rc, out, err = _run(capsys, "bench", "--model", "resnet18", "--mode", "infer", "--batch", "2", "--image-size",
                        "32", "--iters", "2", "--warmup", "1", "--num-classes", "10", "--quiet", "--json", str(path))
    assert rc == 0, out + err
    d = json.loads(path.read_text())
    # the CPU defaults: eager, auto and the registry's benchmark backends; those that cannot run on
    # CPU tensors outside an interpreter are listed with the reason
    got = [(r["backend"], r["status"]) for r in d["results"]]
    assert got[:2] == [("eager", "ok"), ("auto", "ok")]
    assert dict(got)["aten"] == "ok" and dict(got)["cuda"] == dict(got)["triton"] == "unavailable"
    assert "kernel timings need an NVIDIA GPU" in out
    assert resnet_kernels.__version__ == d["env"]["resnet_kernels"]
