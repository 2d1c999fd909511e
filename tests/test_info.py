"""resnet_kernels.info() and ``python -m resnet_kernels info`` run and tell the truth."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

import resnet_kernels as rk
import rk_testing as rt
from resnet_kernels import _backend, _ext


def _C_importable() -> tuple[bool, str]:
    try:
        importlib.import_module("resnet_kernels._C")
        return True, ""
    except ImportError as exc:
        return False, str(exc)


def test_info_versions_and_extension():
    d = rk.info()
    assert d["resnet_kernels"] == rk.__version__
    assert d["torch"] == torch.__version__
    assert d["torch_cuda"] == torch.version.cuda
    try:
        import triton
        assert d["triton"] == triton.__version__
    except ImportError:
        assert d["triton"] is None
    ok, err = _C_importable()
    assert d["extension"]["built"] is ok
    if ok:
        C = importlib.import_module("resnet_kernels._C")
        assert d["extension"]["archs"] == [f"sm_{a}" for a in C.built_archs.split(",") if a]
        assert d["extension"]["archs"], "a built extension names the SM architectures it was compiled for"
        assert "error" not in d["extension"]
    else:
        assert d["extension"]["error"] == _ext.C_error()
        if "No module named" in err:
            assert "not installed" in d["extension"]["error"]
        else:
            assert err in d["extension"]["error"]


def test_info_gpus_and_backends():
    d = rk.info()
    assert d["gpu_visible"] is torch.cuda.is_available()
    assert len(d["gpus"]) == (torch.cuda.device_count() if d["gpu_visible"] else 0)
    assert d["default_backend"] == rk.get_backend()
    assert set(d["backends"]) == set(rk.BACKENDS)
    assert d["backends"]["torch"]["usable"] is True
    for name in ("cuda", "triton"):
        ok, why = _backend.backend_status(name)
        st = d["backends"][name]
        assert st["usable"] is ok
        assert st["reason"]
        if not ok:
            assert st["reason"] == why
    assert d["backends"]["cuda"]["usable"] is (_C_importable()[0] and torch.cuda.is_available())
    if rt.interpreting() and d["backends"]["triton"]["usable"]:
        assert "TRITON_INTERPRET=1" in d["backends"]["triton"]["reason"]


def test_info_json_roundtrip_and_text():
    d = rk.info()
    assert json.loads(json.dumps(d)) == d
    text = rk.format_info(d)
    assert f"resnet_kernels {rk.__version__}" in text
    if d["extension"]["built"]:
        assert "_C extension   built for" in text
    else:
        assert f"_C extension   NOT available: {d['extension']['error']}" in text
    for name, st in d["backends"].items():
        assert any(line.split()[:2] == [name, "yes" if st["usable"] else "no"] for line in text.splitlines()), name


def _run_cli(*args):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    with tempfile.TemporaryDirectory() as cwd:  # never import the source tree by accident
        return subprocess.run([sys.executable, "-m", "resnet_kernels", *args], capture_output=True, text=True,
                              env=env, cwd=cwd, timeout=300)


def test_cli_info_json_matches_in_process(capsys):
    from resnet_kernels import cli

    assert cli.main(["info", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    d = rk.info()
    for key in ("resnet_kernels", "torch", "triton", "gpu_visible", "gpus", "extension", "default_backend"):
        assert got[key] == d[key], key
    for name in rk.BACKENDS:
        assert got["backends"][name]["usable"] == d["backends"][name]["usable"], name


def test_python_m_resnet_kernels_info():
    """The module entry point in a fresh interpreter (the C extension state is re-detected there)."""
    proc = _run_cli("info")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith(f"resnet_kernels {rk.__version__}")
    built = _C_importable()[0]
    assert ("_C extension   built for" in out) is built
    assert ("_C extension   NOT available" in out) is (not built)
    assert ("GPU            none visible" in out) is (not torch.cuda.is_available())
    for name in rk.BACKENDS:
        ok = name == "torch" or _backend.backend_status(name)[0]
        assert any(line.split()[:2] == [name, "yes" if ok else "no"] for line in out.splitlines()), name


def test_cli_rejects_unknown_command(capsys):
    from resnet_kernels import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["frobnicate"])
    assert e.value.code != 0
    assert "invalid choice" in capsys.readouterr().err
