"""API and CLI edges from the new-user trial (issue 11): flags must be bools, backends are checked
when a module is built, ``--version``, ``check --dtypes fp64``, what ``check`` claims, the CPU
``bench`` report (min/median/max, the sizes used, progress), and the message given when the
package is imported from its source tree (no _C, no triton_ops)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import resnet_kernels as rk
from resnet_kernels import bench, cli
from resnet_kernels import functional as RF
from resnet_kernels.functional import conv_bn_act
from resnet_kernels.nn import AddReLU, BNAddReLU, ConvBN, ConvBNReLU

from rk_testing import HAS_GPU

REPO = Path(__file__).resolve().parents[1]


def _run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# --------------------------------------------------------------------------------------------
# bool flags and backend names
# --------------------------------------------------------------------------------------------
def _relu_calls():
    x = torch.randn(2, 4, 3, 3)
    conv, bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
    return bn, {
        "bn_add_relu": lambda r: rk.bn_add_relu(x, None, None, x, relu=r),
        "conv2d_epilogue": lambda r: rk.conv2d_epilogue(x, conv.weight.detach(), relu=r),
        "conv_bn_act": lambda r: RF.conv_bn_act(x, conv, bn, relu=r),
        "conv_bn_add_act": lambda r: RF.conv_bn_add_act(x, conv, bn, x, relu=r),
        "from_modules": lambda r: ConvBNReLU.from_modules(conv, bn, relu=r),  # None: the class default
    }


@pytest.mark.parametrize("name", list(_relu_calls()[1]))
@pytest.mark.parametrize("bad", ["no", 0, 1, None, torch.tensor(True)], ids=repr)
def test_relu_flag_must_be_a_bool(name, bad):
    if name == "from_modules" and bad is None:
        pytest.skip("relu=None is from_modules' documented default (the class's own)")
    bn, calls = _relu_calls()
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(TypeError, match="relu must be a bool"):
        calls[name](bad)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    calls[name](True)  # a real bool works


@pytest.mark.parametrize("make", [
    lambda b: ConvBNReLU(3, 4, 3, backend=b),
    lambda b: ConvBN(3, 4, 3, backend=b),
    lambda b: AddReLU(backend=b),
    lambda b: BNAddReLU(4, backend=b),
    lambda b: ConvBNReLU.from_modules(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), backend=b),
    lambda b: BNAddReLU.from_modules(nn.BatchNorm2d(4), backend=b),
], ids=["ConvBNReLU", "ConvBN", "AddReLU", "BNAddReLU", "ConvBNReLU.from_modules", "BNAddReLU.from_modules"])
def test_module_backend_checked_at_construction(make):
    for bad in ("foo", "TORCH", 3):
        with pytest.raises(ValueError, match="backend must be one of"):
            make(bad)
    for good in (None, "auto", "torch", "triton", "cuda"):  # availability is checked per call
        assert make(good).backend == good


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"resnet-kernels {rk.__version__}"


@pytest.mark.parametrize("dtypes, msg", [("fp64", "fp64 is not a check dtype"), ("fp32,fp64", "float64"),
                                         ("fp8", "fp32,fp16,bf16")])
def test_check_rejects_bad_dtypes_up_front(capsys, dtypes, msg):
    with pytest.raises(SystemExit) as e:
        cli.main(["check", "--dtypes", dtypes])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_check_does_not_claim_all_backends_when_only_the_reference_ran(capsys):
    rc, out, _ = _run(capsys, "check", "--backends", "torch", "--cases", "add_relu")
    assert rc == 0, out
    assert "all backends OK" not in out
    assert "no kernel backend (cuda, triton) was checked" in out


def test_check_names_the_checked_backends(capsys):
    pytest.importorskip("triton")
    rc, out, _ = _run(capsys, "check", "--backends", "torch,triton", "--cases", "add_relu", "--dtypes", "fp32")
    assert rc == 0, out
    assert "all checked backends OK (torch, triton)" in out


class _Tiny(nn.Module):
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


@pytest.mark.skipif(HAS_GPU, reason="the CPU report")
def test_bench_cpu_report_spread_sizes_and_progress(capsys, monkeypatch):
    monkeypatch.setattr(bench, "eager_model", lambda arch, n: (_Tiny(n, fused=False), "tests._Tiny"))
    monkeypatch.setattr(bench, "ours_model", lambda arch, n, backend: _Tiny(n, backend=backend))
    # batch given, image size and dtype left to the CPU defaults
    rc, out, err = _run(capsys, "bench", "--model", "resnet18", "--batch", "4", "--iters", "4", "--warmup", "1",
                        "--num-classes", "10", "--backends", "eager,torch")
    assert rc == 0, out + err
    header = out.splitlines()[2]
    for col in ("min ms", "median ms", "max ms"):
        assert col in header
    assert "batch 4  64x64  fp32" in out
    assert "image size 64 (GPU default 224)" in out and "dtype fp32 (GPU default bf16)" in out
    assert "batch 4" not in out.split("CPU defaults used")[1].split("\n")[0]  # batch was given
    # progress: the sizes first, then a line per step (non-terminal stream), then the result
    assert err.splitlines()[0].startswith("resnet18 train: batch 4, 64x64, fp32")
    for b in ("eager", "torch"):
        steps = [ln for ln in err.splitlines() if ln.startswith(f"resnet18 train {b}: ") and " steps, " in ln]
        assert [ln.split(": ")[1].split(" ")[0] for ln in steps] == ["1/5", "2/5", "3/5", "4/5", "5/5"]


def test_bench_progress_lines_are_bounded():
    s = io.StringIO()
    p = bench.Progress(s, "x", 60)
    for i in range(1, 61):
        p(i, 60)
    assert len([ln for ln in s.getvalue().splitlines() if "steps," in ln]) == 10


# --------------------------------------------------------------------------------------------
# imported from the source tree
# --------------------------------------------------------------------------------------------
_SNIPPET = """
import resnet_kernels, torch
from pathlib import Path
assert Path(resnet_kernels.__file__).resolve().parent == Path.cwd() / "resnet_kernels", resnet_kernels.__file__
print("INFO", resnet_kernels.format_info())
try:
    resnet_kernels.add_relu(torch.ones(1, 2, 3, 3), torch.ones(1, 2, 3, 3), backend="triton")
except Exception as e:
    print("TRITON", type(e).__name__, e)
try:
    resnet_kernels.add_relu(torch.ones(1, 2, 3, 3), torch.ones(1, 2, 3, 3), backend="cuda")
except Exception as e:
    print("CUDA", type(e).__name__, e)
"""


@pytest.mark.skipif(not (REPO / "setup.py").is_file() or (REPO / "resnet_kernels" / "_C.abi3.so").exists()
                    or any((REPO / "resnet_kernels").glob("_C*.so")), reason="needs a source checkout without a build")
def test_source_tree_import_says_so():
    # python -c puts the current directory first on sys.path: the checkout shadows the install
    r = subprocess.run([sys.executable, "-c", _SNIPPET], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    info = out.split("INFO", 1)[1].split("\nTRITON")[0]
    assert "built without a CUDA compiler" not in info
    assert "imported from its source tree" in info and "cd /tmp" in info
    triton_line = next(ln for ln in out.splitlines() if ln.startswith("TRITON"))
    assert "ModuleNotFoundError" not in triton_line
    if "triton is not installed" not in triton_line:
        assert triton_line.startswith("TRITON BackendUnavailableError") and "source tree" in triton_line
    cuda_line = next(ln for ln in out.splitlines() if ln.startswith("CUDA"))
    assert cuda_line.startswith("CUDA BackendUnavailableError") and "source tree" in cuda_line
