"""``resnet_kernels.info()``: what is installed and which backends can run here, and why not."""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any

import torch

from . import __version__, _backend, _ext, _registry, _tune


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def info() -> dict[str, Any]:
    """A dict with versions, the _C build, GPU visibility and per-backend usability."""
    C = _ext.get_C()
    ext: dict[str, Any] = {"built": C is not None}
    if C is None:
        ext["error"] = _ext.C_error()
    else:
        ext["archs"] = [f"sm_{a}" for a in C.built_archs.split(",") if a]
        ext["cuda_version_built"] = C.cuda_version_built
        rt = C.runtime_info()
        ext["cuda_runtime"] = rt["runtime_version"]
        ext["cuda_driver"] = rt["driver_version"]
    gpu = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if gpu else []
    backends = {}
    for b in _registry.backends():
        ok, why = _backend.backend_status(b.name)
        backends[b.name] = {"usable": ok, "reason": why or "ready", "description": b.description}
    if _backend.triton_interpreting() and backends.get("triton", {}).get("usable"):
        backends["triton"]["reason"] = "TRITON_INTERPRET=1: Triton interpreter on the CPU"
    return {
        "resnet_kernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "extension": ext,
        "gpu_visible": gpu,
        "gpus": gpus,
        "default_backend": _backend.get_backend(),
        "backends": backends,
        "auto": {
            "cuda": "measured and verified per layer shape on the GPU, cached (resnet-kernels tune)",
            "cpu": "aten (PyTorch's own kernels)",
            "tune": "off (RESNET_KERNELS_TUNE=0)" if _tune._env_off() else "on",
        },
        "tuning_cache": _tune.cache_summary(),
        "torch_only": {
            "conv2d": "groups != 1, dilation != 1 and float64 run on the aten and torch implementations "
                      "(other padding modes pad the input first, then use the kernels)",
        },
    }


def _cuda_ver(v):
    """CUDA's integer versions (13000) as text ("13.0"); anything else unchanged."""
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return f"{v // 1000}.{(v % 1000) // 10}"
    return v


def format_info(d: dict[str, Any] | None = None) -> str:
    d = info() if d is None else d
    ext = d["extension"]
    lines = [
        f"resnet_kernels {d['resnet_kernels']}  (python {d['python']})",
        f"torch          {d['torch']}  (built with CUDA {d['torch_cuda']})",
        f"triton         {d['triton'] or 'not installed'}",
    ]
    if ext["built"]:
        rt = _cuda_ver(ext["cuda_runtime"])
        built = _cuda_ver(ext["cuda_version_built"])
        lines.append(f"_C extension   built for {', '.join(ext['archs'])} with CUDA {built}"
                     f" (runtime {rt}, driver {_cuda_ver(ext['cuda_driver']) or 'none'})")
    else:
        lines.append(f"_C extension   NOT available: {ext['error']}")
    lines.append(f"GPU            {', '.join(d['gpus']) if d['gpu_visible'] else 'none visible'}")
    a = d["auto"]
    lines.append(f"default        backend={d['default_backend']!r} (auto: CUDA tensors {a['cuda']}; CPU tensors "
                 f"{a['cpu']}; tuning {a['tune']})")
    for name, st in d["backends"].items():
        mark = "yes" if st["usable"] else "no "
        lines.append(f"  {name:<7} {mark}  {st['reason']}")
    c = d["tuning_cache"]
    state = (f"{c['entries']} entries for {c['machines']} machine(s)" if c["exists"] else "not written yet")
    lines.append(f"tuning cache   {c['path']} ({state}{'; ' + c['error'] if c['error'] else ''})")
    for op, note in d["torch_only"].items():
        lines.append(f"note           {op}: {note}")
    return "\n".join(lines)
