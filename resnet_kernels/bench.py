"""``resnet-kernels bench``: whole-model throughput of the fused ResNets against PyTorch eager
(cuDNN) and ``torch.compile``, all in one run.

For every requested backend the same model (same weights: one ``state_dict`` loaded into each)
runs ``warmup`` untimed steps and ``iters`` timed steps on synthetic data; the report gives the
median step time (CUDA events on a GPU; host wall clock on a CPU, labelled as such), images/s at
that median, the peak GPU memory during the timed steps and the speed-up over eager.

Backends
--------
eager    the unfused model (torchvision's ResNet if torchvision is installed, else
         ``resnet_kernels.models.resnetXX`` with fusion switched off): cuDNN convolutions and
         separate BatchNorm / add / ReLU kernels.
compile  ``torch.compile`` of that eager model (default mode).
auto     ``resnet_kernels.models.resnetXX()``: the fused model with the measured choice per layer
         (``resnet_kernels/_tune.py``; the first step tunes, or uses the cache that
         ``resnet-kernels tune`` wrote); the report lists the implementations it chose (``mix``).
<name>   every backend of the registry (``resnet_kernels/backends/__init__.py``), e.g. ``cuda``,
         ``triton``, ``aten``, ``torch``: the fused model with that backend forced for every op.

Modes: ``infer`` times ``model(images)`` in ``eval()`` under ``torch.no_grad()``; ``train``
times a full step: ``zero_grad``, forward, cross-entropy loss (in float32), backward and an
SGD (momentum 0.9) ``step``, in ``train()`` mode (batch statistics, running-stat updates).
The model's parameters and activations are all in ``--dtype`` (no autocast).

Defaults: on a GPU batch 256, 224x224, bf16, 50 timed steps after 10 warm-up steps, backends
eager, compile, auto and the registry's benchmark backends. Without a GPU: a small CPU comparison
(batch 2, 64x64, fp32, 5 steps after 1) of eager, auto and the same backends (those that do not run
on CPU tensors outside an interpreter are listed as unavailable with the reason).
``first_iter_ms`` is the wall-clock time of the first warm-up step (torch.compile, Triton JIT
compilation and autotuning happen there); ``peak_mem_bytes`` is torch's peak allocated memory
during the warm-up (after the first step) and timed steps, parameters and optimizer state included.

JSON schema (``--json``), ``"schema": "resnet-kernels-bench/1"``::

    {"schema", "env": {gpu, torch, triton, torch_cuda, git_commit, ...},
     "config": {model, mode, batch, image_size, dtype, layout, backends, iters, warmup,
                num_classes, device},
     "timer": "cuda_events" | "wall_clock_cpu", "eager_model": str, "notes": [str],
     "results": [{"backend", "status": "ok" | "unavailable" | "error", "reason": str | null,
                  "mix" (auto only): {op: {implementation: calls per step}},
                  # status "ok" only:
                  "median_ms", "mean_ms", "min_ms", "max_ms", "iqr_ms", "iters", "warmup",
                  "images_per_s", "peak_mem_bytes" (null on CPU), "first_iter_ms",
                  "speedup_vs_eager" (null when eager did not run)}]}
"""

from __future__ import annotations

import gc
import json
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import _registry, _timing, _tune

SCHEMA = "resnet-kernels-bench/1"
ARCHS = ("resnet18", "resnet34", "resnet50")
BASELINES = ("eager", "compile")
# the backends come from the registry: never listed by hand here
BACKENDS = BASELINES + ("auto",) + _registry.backend_names()
_BENCH_DEFAULT = tuple(b.name for b in _registry.backends() if b.benchmark)
MODES = ("train", "infer")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LAYOUTS = ("nchw", "channels_last")
GPU_DEFAULTS = dict(batch=256, image_size=224, dtype="bf16", iters=50, warmup=10,
                    backends=BASELINES + ("auto",) + _BENCH_DEFAULT)
# on a CPU torch.compile is skipped by default (minutes of compilation for a tiny comparison); the
# backends that cannot run on CPU tensors are listed with the reason
CPU_DEFAULTS = dict(batch=2, image_size=64, dtype="fp32", iters=5, warmup=1,
                    backends=("eager", "auto") + _BENCH_DEFAULT)
CPU_NOTE = ("no CUDA GPU is visible: this is a CPU comparison with host wall-clock times of the "
            "PyTorch paths (noisy on a shared machine: see min/max); kernel timings need an NVIDIA GPU")


class BenchError(Exception):
    """A configuration the benchmark cannot run (reported as a plain error message)."""


@dataclass
class BenchConfig:
    model: str = "resnet50"
    mode: str = "train"
    batch: int = 256
    image_size: int = 224
    dtype: str = "bf16"
    layout: str = "channels_last"
    backends: Tuple[str, ...] = GPU_DEFAULTS["backends"]
    iters: int = 50
    warmup: int = 10
    num_classes: int = 1000
    device: str = "cuda"

    def validate(self) -> "BenchConfig":
        if self.model not in ARCHS:
            raise BenchError(f"model must be one of {ARCHS}, got {self.model!r}")
        if self.mode not in MODES:
            raise BenchError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.dtype not in DTYPES:
            raise BenchError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.layout not in LAYOUTS:
            raise BenchError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        for name, v, lo in (("batch", self.batch, 1), ("image_size", self.image_size, 32), ("iters", self.iters, 1),
                            ("warmup", self.warmup, 1), ("num_classes", self.num_classes, 1)):
            if not isinstance(v, int) or v < lo:
                raise BenchError(f"{name} must be an integer >= {lo}, got {v!r}")
        if self.mode == "train" and self.batch < 2:
            raise BenchError("batch must be >= 2 in train mode (BatchNorm needs more than one value per channel)")
        if not self.backends:
            raise BenchError("backends must name at least one backend")
        bad = [b for b in self.backends if b not in BACKENDS]
        if bad:
            raise BenchError(f"unknown backend(s) {bad}; choose from {BACKENDS}")
        if len(set(self.backends)) != len(self.backends):
            raise BenchError(f"backends lists a backend twice: {list(self.backends)}")
        return self


def make_config(*, model: str = "resnet50", mode: str = "train", batch: Optional[int] = None,
                image_size: Optional[int] = None, dtype: Optional[str] = None, layout: str = "channels_last",
                backends: Optional[Sequence[str]] = None, iters: Optional[int] = None, warmup: Optional[int] = None,
                num_classes: int = 1000, device: Optional[str] = None) -> BenchConfig:
    """A config with the unset (None) fields filled from the GPU or the CPU defaults."""
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    d = GPU_DEFAULTS if torch.device(dev).type == "cuda" else CPU_DEFAULTS
    return BenchConfig(
        model=model, mode=mode, batch=d["batch"] if batch is None else batch,
        image_size=d["image_size"] if image_size is None else image_size,
        dtype=d["dtype"] if dtype is None else dtype, layout=layout,
        backends=tuple(d["backends"] if backends is None else backends),
        iters=d["iters"] if iters is None else iters, warmup=d["warmup"] if warmup is None else warmup,
        num_classes=num_classes, device=dev).validate()


# --------------------------------------------------------------------------------------------
# models (imported lazily: the models package may be absent in a partial build)
# --------------------------------------------------------------------------------------------


def _ours_constructor(arch: str) -> Callable[..., nn.Module]:
    try:
        from . import models
    except ImportError as exc:
        raise BenchError(f"resnet_kernels.models is not available ({exc}); the fused model backends "
                         "(torch, cuda, triton) need it") from exc
    ctor = getattr(models, arch, None)
    if ctor is None:
        raise BenchError(f"resnet_kernels.models has no {arch}()")
    return ctor


def eager_model(arch: str, num_classes: int) -> Tuple[nn.Module, str]:
    """The unfused baseline model and a description of where it came from."""
    try:
        import torchvision.models as tvm

        return getattr(tvm, arch)(num_classes=num_classes), f"torchvision.models.{arch}"
    except ImportError:
        pass
    model = _ours_constructor(arch)(num_classes=num_classes)
    for m in model.modules():  # the plain PyTorch path of every block (what unfuse() sets)
        if hasattr(m, "fused"):
            m.fused = False
    return model, f"resnet_kernels.models.{arch} with fused=False (torchvision not installed)"


def ours_model(arch: str, num_classes: int, backend: str) -> nn.Module:
    """The fused model running on ``backend`` ('auto' or a registry backend)."""
    return _ours_constructor(arch)(num_classes=num_classes, backend=backend)


def backend_availability(backend: str, device: torch.device) -> Tuple[bool, str]:
    """(runnable, reason) for one backend of the model benchmark on ``device``."""
    if backend == "eager":
        return True, ""
    if backend == "compile":
        if not hasattr(torch, "compile"):
            return False, "this torch has no torch.compile"
        return True, ""
    try:
        _ours_constructor("resnet18")
    except BenchError as exc:
        return False, str(exc)
    if backend == "auto":
        return True, ""
    from ._backend import backend_status

    ok, why = backend_status(backend, device)
    if ok and device.type not in _registry.auto_device_types(backend):
        return False, (f"kernel timings need an NVIDIA GPU: the {backend} backend runs on {device.type} tensors only "
                       f"in an emulator (e.g. the Triton interpreter), whose timings mean nothing")
    if not ok and device.type != "cuda":
        why = f"kernel timings need an NVIDIA GPU: {why}"
    return ok, why


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on a terminal; otherwise a start line, then a line with the elapsed
    time every tenth of the steps (every step when there are at most 10), then an end line."""

    def __init__(self, stream: Optional[TextIO], label: str, total: int, width: int = 30):
        self.stream, self.label, self.total, self.width = stream, label, total, width
        self.tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self._last = -1
        self._t0 = time.perf_counter()
        self._every = max(1, -(-total // 10))
        if stream is not None and not self.tty:
            stream.write(f"{label}: {total} iterations ...\n")
            stream.flush()

    def __call__(self, done: int, total: int) -> None:
        if self.stream is None:
            return
        if not self.tty:
            if done % self._every == 0 or done == total:
                self.stream.write(f"{self.label}: {done}/{total} steps, {time.perf_counter() - self._t0:.1f} s\n")
                self.stream.flush()
            return
        filled = self.width * done // max(total, 1)
        if filled == self._last and done != total:
            return
        self._last = filled
        self.stream.write(f"\r{self.label:<28} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total}")
        self.stream.flush()

    def close(self, message: str) -> None:
        if self.stream is None:
            return
        if self.tty:
            self.stream.write("\r" + " " * (self.width + 44) + "\r")
        self.stream.write(f"{self.label}: {message}\n")
        self.stream.flush()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _make_step(model: nn.Module, runner: Callable[[torch.Tensor], torch.Tensor],
               mode: str) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One benchmark step of ``runner`` (``model`` itself, or ``torch.compile(model)`` which
    shares its parameters)."""
    if mode == "infer":
        model.eval()

        def infer_step(images: torch.Tensor, labels: torch.Tensor) -> None:
            with torch.no_grad():
                runner(images)

        return infer_step
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    def train_step(images: torch.Tensor, labels: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(runner(images).float(), labels)
        loss.backward()
        opt.step()

    return train_step


def eager_state(cfg: BenchConfig) -> Tuple[Dict[str, torch.Tensor], str]:
    """The seeded weights every backend of one run loads (a CPU ``state_dict``), and where the
    eager model comes from."""
    torch.manual_seed(0)
    base, src = eager_model(cfg.model, cfg.num_classes)
    return {k: v.detach().clone() for k, v in base.state_dict().items()}, src


def make_inputs(cfg: BenchConfig, device: torch.device, n: int = 2) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``n`` synthetic (images, labels) batches, cycled over the iterations (the models are
    compute-bound; cycling only avoids feeding one buffer over and over)."""
    dtype = DTYPES[cfg.dtype]
    mf = torch.channels_last if cfg.layout == "channels_last" else torch.contiguous_format
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        img = torch.randn(cfg.batch, 3, cfg.image_size, cfg.image_size, generator=gen)
        lab = torch.randint(0, cfg.num_classes, (cfg.batch,), generator=gen)
        out.append((img.to(device=device, dtype=dtype).contiguous(memory_format=mf), lab.to(device)))
    return out


def build_step(cfg: BenchConfig, backend: str, state: Dict[str, torch.Tensor],
               device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """The model of ``backend`` with ``state`` loaded, on ``device`` in ``cfg``'s dtype and
    layout, wrapped as one benchmark step ``step(images, labels)``."""
    dtype = DTYPES[cfg.dtype]
    mf = torch.channels_last if cfg.layout == "channels_last" else torch.contiguous_format
    if backend in ("eager", "compile"):
        model, _ = eager_model(cfg.model, cfg.num_classes)
    else:
        model = ours_model(cfg.model, cfg.num_classes, backend)
    model.load_state_dict(state)
    model = model.to(device=device, dtype=dtype, memory_format=mf)
    runner = torch.compile(model) if backend == "compile" else model
    return _make_step(model, runner, cfg.mode)


def _run_backend(cfg: BenchConfig, backend: str, state: Dict[str, torch.Tensor], device: torch.device,
                 inputs: List[Tuple[torch.Tensor, torch.Tensor]], timer: Any,
                 progress: Optional[TextIO]) -> Dict[str, Any]:
    step = build_step(cfg, backend, state, device)
    bar = Progress(progress, f"{cfg.model} {cfg.mode} {backend}", cfg.warmup + cfg.iters)
    mix: Dict[str, Dict[str, int]] = {}
    try:
        _sync(device)
        t0 = time.perf_counter()
        with _tune.recording() as decisions:
            step(*inputs[0])  # first call: torch.compile / Triton JIT / autotuning happen here
        _sync(device)
        for d in decisions:
            mix.setdefault(d.op, {}).setdefault(d.impl, 0)
            mix[d.op][d.impl] += 1
        first_ms = (time.perf_counter() - t0) * 1e3
        bar(1, cfg.warmup + cfg.iters)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        m = _timing.measure(step, inputs[1:] + inputs[:1], iters=cfg.iters, warmup=cfg.warmup - 1, timer=timer,
                            on_iter=lambda d, t: bar(d + 1, t + 1))
        peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    except BaseException:
        bar.close("failed")
        raise
    res = {"backend": backend, "status": "ok", "reason": None}
    if backend == "auto":
        res["mix"] = mix
    res.update(m.to_dict())
    # the first warm-up step ran (and was timed on the wall clock) before measure()
    res.update(warmup=cfg.warmup, images_per_s=m.per_second(cfg.batch), peak_mem_bytes=peak, first_iter_ms=first_ms)
    bar.close(f"median {m.median_ms:.3f} ms/step, {res['images_per_s']:.1f} images/s")
    return res


def defaulted_notes(cfg: BenchConfig, given: Dict[str, Any]) -> List[str]:
    """Notes for the sizes a CPU run took from its own defaults, which differ from the GPU ones
    (``given``: the options the user set, None for unset)."""
    if torch.device(cfg.device).type == "cuda":
        return []
    changed = [f"{k.replace('_', ' ')} {getattr(cfg, k)} (GPU default {GPU_DEFAULTS[k]})"
               for k in ("batch", "image_size", "dtype", "iters", "warmup")
               if given.get(k) is None and getattr(cfg, k) != GPU_DEFAULTS[k]]
    if not changed:
        return []
    return ["CPU defaults used for the sizes not given: " + ", ".join(changed) +
            "; pass --batch/--image-size/--dtype/--iters/--warmup to choose"]


def run_bench(cfg: BenchConfig, *, progress: Optional[TextIO] = sys.stderr, timer: Any = None,
              notes: Sequence[str] = ()) -> Dict[str, Any]:
    """Run every backend of ``cfg``; returns the result dict (see the module docstring)."""
    cfg.validate()
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("device is cuda but no CUDA GPU is visible to torch")
    timer = timer or _timing.default_timer(device)
    if progress is not None:
        progress.write(f"{cfg.model} {cfg.mode}: batch {cfg.batch}, {cfg.image_size}x{cfg.image_size}, {cfg.dtype}, "
                       f"{cfg.layout}, {cfg.warmup} warm-up + {cfg.iters} timed steps per backend on {device}\n")
        for n in notes:
            progress.write(f"note: {n}\n")
        progress.flush()
    notes = list(notes) + ([CPU_NOTE] if device.type != "cuda" else [])

    state, eager_src = eager_state(cfg)
    inputs = make_inputs(cfg, device)

    results: List[Dict[str, Any]] = []
    for backend in cfg.backends:
        ok, why = backend_availability(backend, device)
        if not ok:
            results.append({"backend": backend, "status": "unavailable", "reason": why})
            if progress is not None:
                progress.write(f"{cfg.model} {cfg.mode} {backend}: unavailable: {why}\n")
            continue
        try:
            results.append(_run_backend(cfg, backend, state, device, inputs, timer, progress))
        except Exception as exc:  # noqa: BLE001 - recorded and reported; the other backends still run
            msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            results.append({"backend": backend, "status": "error", "reason": msg})
            if progress is not None:
                progress.write(f"{cfg.model} {cfg.mode} {backend}: ERROR {msg}\n")
                traceback.print_exc(file=progress)
        finally:
            _free(device)
            if backend == "compile":
                torch._dynamo.reset()

    eager = next((r for r in results if r["backend"] == "eager" and r["status"] == "ok"), None)
    for r in results:
        if r["status"] == "ok":
            r["speedup_vs_eager"] = eager["median_ms"] / r["median_ms"] if eager else None
    return {"schema": SCHEMA, "env": _timing.env_info(device), "config": {**asdict(cfg), "backends": list(cfg.backends)},
            "timer": timer.name, "eager_model": eager_src, "notes": notes, "results": results}


# --------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------


def _fmt_mem(b: Optional[int]) -> str:
    return "n/a" if b is None else f"{b / 2 ** 20:,.0f}"


def format_table(result: Dict[str, Any]) -> str:
    c = result["config"]
    env = result["env"]
    where = env["gpu"] or f"CPU ({env['cpu']})"
    timer = {"cuda_events": "GPU time from CUDA events",
             "wall_clock_cpu": "CPU wall-clock time"}.get(result["timer"], result["timer"])
    lines = [f"{c['model']} {c['mode']}  batch {c['batch']}  {c['image_size']}x{c['image_size']}  {c['dtype']} "
             f"{c['layout']}  on {where}",
             f"{timer} per step over {c['iters']} steps after {c['warmup']} warm-up steps (images/s and vs eager "
             f"from the median); eager = {result['eager_model']}",
             f"{'backend':<9}{'images/s':>12}{'min ms':>11}{'median ms':>11}{'max ms':>11}{'peak MiB':>11}"
             f"{'vs eager':>10}"]
    for r in result["results"]:
        if r["status"] == "ok":
            sp = "-" if r.get("speedup_vs_eager") is None else f"{r['speedup_vs_eager']:.2f}x"
            lines.append(f"{r['backend']:<9}{r['images_per_s']:>12,.1f}{r['min_ms']:>11.3f}{r['median_ms']:>11.3f}"
                         f"{r['max_ms']:>11.3f}{_fmt_mem(r['peak_mem_bytes']):>11}{sp:>10}")
        else:
            lines.append(f"{r['backend']:<9}{r['status']}: {r['reason']}")
    for r in result["results"]:
        for op, used in sorted((r.get("mix") or {}).items()):
            parts = ", ".join(f"{impl} x{n}" for impl, n in sorted(used.items(), key=lambda kv: -kv[1]))
            lines.append(f"{r['backend']} chose, per step: {op}: {parts}")
    for n in result["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def require_matplotlib():
    try:
        import matplotlib
    except ImportError as exc:
        raise BenchError("--plot needs matplotlib, which is not installed (pip install matplotlib)") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(result: Dict[str, Any], path: str) -> None:
    """A PNG bar chart of images/s per backend (speed-up over eager on each bar)."""
    plt = require_matplotlib()
    ok = [r for r in result["results"] if r["status"] == "ok"]
    if not ok:
        raise BenchError("--plot: no backend produced a result to plot")
    c = result["config"]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(ok) + 2), 4.0))
    names = [r["backend"] for r in ok]
    vals = [r["images_per_s"] for r in ok]
    bars = ax.bar(names, vals, color=["#888888" if n in ("eager", "compile") else "#2a7ab9" for n in names])
    for b, r in zip(bars, ok):
        sp = r.get("speedup_vs_eager")
        ax.annotate(f"{r['images_per_s']:,.0f}" + ("" if sp is None else f"\n{sp:.2f}x"),
                    (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
    where = result["env"]["gpu"] or "CPU (wall clock)"
    ax.set_title(f"{c['model']} {c['mode']}, batch {c['batch']}, {c['image_size']}px, {c['dtype']}, {c['layout']}\n"
                 f"{where}", fontsize=9)
    ax.set_ylabel("images/s (median step)")
    ax.set_ylim(0, max(vals) * 1.25)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(result: Dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")


def failed(result: Dict[str, Any]) -> bool:
    return any(r["status"] == "error" for r in result["results"])


__all__ = ["BenchConfig", "BenchError", "make_config", "run_bench", "format_table", "plot", "write_json", "failed",
           "SCHEMA", "ARCHS", "BACKENDS", "MODES", "DTYPES", "LAYOUTS"]
