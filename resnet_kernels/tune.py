"""Seeing and steering what 'auto' runs: ``explain(model, *inputs)`` and ``tune_model`` (behind
``resnet-kernels tune``). See ``resnet_kernels/_tune.py`` for how 'auto' measures, verifies and
caches its choices."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, TextIO

import torch
from torch import nn

from . import _registry, _tune


@dataclass
class Row:
    module: str
    op: str
    call: str
    impl: str
    how: str
    key: str = ""
    times_ms: Dict[str, Any] = field(default_factory=dict)

    def speedup_over(self, baseline: str = "aten") -> Optional[float]:
        b, c = self.times_ms.get(baseline), self.times_ms.get(self.impl)
        if isinstance(b, (int, float)) and isinstance(c, (int, float)) and c > 0:
            return b / c
        return None


@dataclass
class Explanation:
    """Which implementation ran for each fused op call of one step, and why."""
    rows: List[Row]
    device: str

    def counts(self) -> Dict[str, Dict[str, int]]:
        out: Dict[str, Dict[str, int]] = {}
        for r in self.rows:
            out.setdefault(r.op, {}).setdefault(r.impl, 0)
            out[r.op][r.impl] += 1
        return out

    def table(self, times: bool = False) -> str:
        names = _registry.backend_names()
        head = f"{'module':<28}{'op':<22}{'implementation':<16}{'how':<30}call"
        if times:
            head = (f"{'module':<28}{'op':<22}" + "".join(f"{n + ' ms':>12}" for n in names)
                    + f"  {'choice':<8}{'vs aten':>8}  call")
        lines = [head]
        for r in self.rows:
            if times:
                cells = []
                for n in names:
                    v = r.times_ms.get(n)
                    cells.append(f"{v:>12.4f}" if isinstance(v, (int, float)) else
                                 f"{'FAILED' if isinstance(v, str) else '-':>12}")
                sp = r.speedup_over()
                # a choice among graphs, not implementations (the training block's 'prologue' / 'written')
                other = [f"{n} {v:.4f} ms" for n, v in r.times_ms.items() if n not in names
                         and isinstance(v, (int, float))]
                lines.append(f"{r.module[:27]:<28}{r.op:<22}" + "".join(cells)
                             + f"  {r.impl:<8}{(f'{sp:.2f}x' if sp else '-'):>8}  {r.call}"
                             + (f" [{', '.join(other)}]" if other else ""))
            else:
                lines.append(f"{r.module[:27]:<28}{r.op:<22}{r.impl:<16}{r.how[:29]:<30}{r.call}")
        summary = "; ".join(f"{op}: " + ", ".join(f"{i} x{n}" for i, n in sorted(c.items(), key=lambda kv: -kv[1]))
                            for op, c in sorted(self.counts().items()))
        lines.append(f"{len(self.rows)} fused op calls on {self.device}: {summary or 'none'}")
        failed = sorted({f"{r.op} {n}: {v}" for r in self.rows for n, v in r.times_ms.items() if isinstance(v, str)})
        for f in failed:
            lines.append(f"excluded: {f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


@contextlib.contextmanager
def _module_paths(model: nn.Module) -> Iterator[None]:
    """Attribute the ops called inside each submodule's forward to its qualified name."""
    stack: List[str] = []
    handles = []
    def push(label):
        def pre(module, args) -> None:
            stack.append(label)
        return pre

    def pop(module, args, output) -> None:  # returns None: the output is left alone
        if stack:
            stack.pop()

    # Not on the layers a fused unit is made of (convolutions, BatchNorms, ReLUs, the downsample
    # Sequential, the stem's max pool): a hook there makes the unit run its plain modules, as it
    # must for user hooks.
    plain = (nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.Sequential, nn.MaxPool2d)
    for name, mod in model.named_modules():
        if isinstance(mod, plain):
            continue
        handles.append(mod.register_forward_pre_hook(push(name or type(model).__name__)))
        handles.append(mod.register_forward_hook(pop))
    token = _tune._where.set(stack)
    try:
        yield
    finally:
        _tune._where.reset(token)
        for h in handles:
            h.remove()


def _rows(decisions) -> List[Row]:
    res = _tune.results()
    return [Row(d.detail.get("module") or "(backward)", d.op, d.detail.get("call", ""), d.impl, d.how, d.key,
                dict(res.get(d.key, {}))) for d in decisions]


def _device_of(model: nn.Module, inputs) -> str:
    for t in list(inputs) + list(model.parameters()):
        if isinstance(t, torch.Tensor):
            return str(t.device)
    return "cpu"


def explain(model: nn.Module, *inputs: Any, backward: bool = False, **kwargs: Any) -> Explanation:
    """Run ``model(*inputs, **kwargs)`` once and report, per fused op call, the module it came
    from, the implementation that ran and how it was chosen ('explicit', 'tuned', 'cached',
    'static ...'). ``backward=True`` also runs the backward of ``output.sum()`` (its ops are
    listed as '(backward)'). The model's buffers (running statistics, counters) and parameter
    gradients are restored afterwards: explaining changes nothing."""
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    grads = {k: (None if p.grad is None else p.grad.detach().clone()) for k, p in model.named_parameters()}
    try:
        with _tune.recording() as decisions, _module_paths(model):
            if backward:
                out = model(*inputs, **kwargs)
                (out if isinstance(out, torch.Tensor) else out[0]).float().sum().backward()
            else:
                with torch.no_grad():
                    model(*inputs, **kwargs)
    finally:
        with torch.no_grad():
            for k, v in model.named_buffers():
                if k in buffers:
                    v.copy_(buffers[k])
        for k, p in model.named_parameters():
            p.grad = grads.get(k)
    return Explanation(_rows(decisions), _device_of(model, inputs))


def tune_model(model: nn.Module, images: torch.Tensor, mode: str = "train",
               progress: Optional[TextIO] = sys.stderr) -> Explanation:
    """Tune every fused layer of ``model`` for ``images`` ('train': forward and backward;
    'infer': eval forward) and return the per-layer table (times of every implementation, the
    verdicts, the choice). The choices are cached (``resnet_kernels/_tune.py``); the model's
    state is left as it was."""
    if mode not in ("train", "infer"):
        raise ValueError(f"mode must be 'train' or 'infer', got {mode!r}")
    was_training = model.training
    model.train(mode == "train")
    fused = [n for n, m in model.named_modules() if hasattr(m, "fused") or type(m).__module__.startswith(
        "resnet_kernels.nn")]
    done = {"n": 0}
    handles = []
    if progress is not None:
        total = max(len(fused), 1)

        def tick(m, a, o):
            done["n"] += 1
            n = min(done["n"], total)
            bar = "#" * (30 * n // total)
            progress.write(f"\rtuning {mode}: [{bar:<30}] {n}/{total} fused modules")
            progress.flush()

        handles = [m.register_forward_hook(tick) for n, m in model.named_modules() if n in fused]
    try:
        exp = explain(model, images, backward=(mode == "train"))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        if progress is not None:
            progress.write("\n")
    return exp


__all__ = ["explain", "tune_model", "Explanation", "Row"]
