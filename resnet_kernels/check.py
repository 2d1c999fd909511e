"""``resnet-kernels check``: a parity self-test of every backend that can run on this machine.

Every case runs three ways on the same (dtype-rounded) inputs and the same parameters:

* ``ref``   the unfused PyTorch layers (``nn.Conv2d``, ``nn.BatchNorm2d``, ``F.relu``, ``+``)
            in float64: the reference;
* ``eager`` the same unfused layers in the case's dtype: PyTorch's own error, shown for scale;
* each backend (``torch``, ``triton``, ``cuda``) through the fused public API
  (``add_relu``, ``bn_add_relu``, ``ops.max_pool2d``, ``functional.conv_bn_act`` / ``conv_bn_add_act``, and a small
  ``models.resnet18`` when the models package is installed).

Forward outputs, every gradient (inputs, weights, BN affine parameters, per-channel scale and
shift) and the BN running statistics are compared. The error of a tensor is
``max|ours - ref| / max|ref|`` (scale-free: the worst element relative to the tensor's scale).
A case passes when every tensor's error is at most ``resnet_kernels.testing.check_allowed``:
``max(3 * eager error, floor)``, no worse than 3x what PyTorch itself achieves in that dtype (deep
chains such as a whole ResNet amplify rounding in data-dependent ways) or within a floor derived
from the dtype's unit roundoff and the reduction length (the project's one tolerance policy,
shared with the tests).

float32 runs with TF32 disabled (cuDNN and matmul) on both sides, so it checks exact fp32.
"""

from __future__ import annotations

import contextlib
import json
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .testing import K_CHAIN as EAGER_FACTOR
from .testing import check_allowed

DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _randomise_bn_(bn: nn.BatchNorm2d, g: torch.Generator, mean_std: float) -> None:
    """Non-trivial BN parameters and running statistics drawn from ``g`` (call under no_grad)."""
    n = bn.num_features
    bn.weight.copy_(torch.rand(n, generator=g) + 0.5)
    bn.bias.copy_(torch.randn(n, generator=g) * 0.2)
    bn.running_mean.copy_(torch.randn(n, generator=g) * mean_std)
    bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)


@dataclass
class Ctx:
    """How one run of a case computes: ``impl`` is 'ref', 'eager' or a backend name."""

    impl: str
    dtype: torch.dtype
    device: torch.device
    layout: str

    @property
    def fused(self) -> bool:
        return self.impl not in ("ref", "eager")

    @property
    def cdtype(self) -> torch.dtype:
        return torch.float64 if self.impl == "ref" else self.dtype

    @property
    def mf(self) -> torch.memory_format:
        return torch.channels_last if self.layout == "channels_last" else torch.contiguous_format

    def act(self, seed: int, *shape: int, grad: bool = True) -> Tensor:
        """A random activation, rounded to the case dtype (then widened to fp64 for ref)."""
        g = torch.Generator().manual_seed(seed)
        t = torch.randn(*shape, generator=g).to(self.dtype).to(self.cdtype)
        t = t.to(self.device).contiguous(memory_format=self.mf) if len(shape) == 4 else t.to(self.device)
        return t.requires_grad_(grad)

    def vec(self, seed: int, n: int, lo: float, hi: float) -> Tensor:
        """A per-channel float32 parameter (float64 for ref) that requires grad."""
        g = torch.Generator().manual_seed(seed)
        t = torch.rand(n, generator=g) * (hi - lo) + lo
        return t.to(torch.float64 if self.impl == "ref" else torch.float32).to(self.device).requires_grad_(True)

    def module(self, m: nn.Module, seed: int) -> nn.Module:
        """Seeded parameters (BN affine and running stats randomised), rounded to the dtype."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, nn.Conv2d):
                    fan_in = mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
                    mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) / fan_in ** 0.5)
                elif isinstance(mod, nn.BatchNorm2d):
                    _randomise_bn_(mod, g, mean_std=0.2)
        m = m.to(self.dtype).to(device=self.device, dtype=self.cdtype)
        return m.to(memory_format=self.mf)


def _grads(out: Tensor, wrt: Dict[str, Tensor], ctx: Ctx, seed: int) -> Dict[str, Tensor]:
    g = ctx.act(seed, *out.shape, grad=False) if out.dim() == 4 else \
        torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(ctx.dtype).to(
            device=ctx.device, dtype=ctx.cdtype)
    names = list(wrt)
    gs = torch.autograd.grad(out, [wrt[n] for n in names], g, allow_unused=True)
    res = {}
    for n, t in zip(names, gs):
        if t is None:
            raise RuntimeError(f"no gradient reached {n}")
        res["grad_" + n] = t
    return res


# --------------------------------------------------------------------------------------------
# cases: each returns {name: tensor}; names starting with grad_ are gradients, running_ stats
# --------------------------------------------------------------------------------------------


def case_add_relu(ctx: Ctx) -> Dict[str, Tensor]:
    from . import add_relu

    x, i = ctx.act(1, 2, 8, 6, 6), ctx.act(2, 2, 8, 6, 6)
    out = add_relu(x, i, backend=ctx.impl) if ctx.fused else F.relu(x + i)
    return {"out": out, **_grads(out, {"x": x, "identity": i}, ctx, 3)}


def case_maxpool(ctx: Ctx) -> Dict[str, Tensor]:
    """The stem's max pool (3x3, stride 2, padding 1; odd sizes) and its gradient."""
    from .ops.maxpool import max_pool2d

    x = ctx.act(21, 2, 8, 9, 11)
    out = max_pool2d(x, 3, 2, 1, backend=ctx.impl) if ctx.fused else F.max_pool2d(x, 3, 2, 1)
    return {"out": out, **_grads(out, {"x": x}, ctx, 22)}


def _bn_add_relu_case(ctx: Ctx, proj: bool) -> Dict[str, Tensor]:
    from . import bn_add_relu

    C = 8
    x, i = ctx.act(11, 2, C, 5, 7), ctx.act(12, 2, C, 5, 7)
    s, b = ctx.vec(13, C, 0.5, 1.5), ctx.vec(14, C, -0.5, 0.5)
    si, bi = (ctx.vec(15, C, 0.5, 1.5), ctx.vec(16, C, -0.5, 0.5)) if proj else (None, None)
    if ctx.fused:
        out = bn_add_relu(x, s, b, i, si, bi, backend=ctx.impl)
    else:
        def aff(t, sc, sh):  # PyTorch eager in the activation dtype: per-channel affine kernels
            return t * sc.to(t.dtype).view(1, -1, 1, 1) + sh.to(t.dtype).view(1, -1, 1, 1)

        out = F.relu(aff(x, s, b) + (aff(i, si, bi) if proj else i))
    wrt = {"x": x, "identity": i, "scale": s, "shift": b}
    if proj:
        wrt.update(identity_scale=si, identity_shift=bi)
    return {"out": out, **_grads(out, wrt, ctx, 17)}


def case_bn_add_relu(ctx: Ctx) -> Dict[str, Tensor]:
    return _bn_add_relu_case(ctx, proj=False)


def case_bn_add_relu_proj(ctx: Ctx) -> Dict[str, Tensor]:
    return _bn_add_relu_case(ctx, proj=True)


def _conv_bn(ctx: Ctx, seed: int, cin: int, cout: int, k: int, stride: int, pad: int, train: bool):
    m = ctx.module(nn.Sequential(nn.Conv2d(cin, cout, k, stride, pad, bias=False), nn.BatchNorm2d(cout)), seed)
    m.train(train)
    return m[0], m[1]


def _params(prefix: str, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Dict[str, Tensor]:
    return {f"{prefix}conv.weight": conv.weight, f"{prefix}bn.weight": bn.weight, f"{prefix}bn.bias": bn.bias}


def _stats(prefix: str, bn: nn.BatchNorm2d) -> Dict[str, Tensor]:
    return {f"running_mean.{prefix}bn": bn.running_mean, f"running_var.{prefix}bn": bn.running_var}


def _conv_bn_act_case(ctx: Ctx, cin: int, cout: int, k: int, stride: int, pad: int, hw: int, train: bool,
                      residual: bool = False) -> Dict[str, Tensor]:
    from .functional import conv_bn_act

    conv, bn = _conv_bn(ctx, 21, cin, cout, k, stride, pad, train)
    x = ctx.act(22, 2, cin, hw, hw)
    oh = (hw + 2 * pad - k) // stride + 1
    r = ctx.act(23, 2, cout, oh, oh) if residual else None
    if ctx.fused:
        out = conv_bn_act(x, conv, bn, relu=True, residual=r, backend=ctx.impl)
    else:
        y = bn(conv(x))
        out = F.relu(y + r if residual else y)
    wrt = {"x": x, **_params("", conv, bn)}
    if residual:
        wrt["residual"] = r
    res = {"out": out, **_grads(out, wrt, ctx, 24)}
    if train:
        res.update(_stats("", bn))
    return res


def case_conv_bn_act_train(ctx: Ctx) -> Dict[str, Tensor]:
    return _conv_bn_act_case(ctx, 8, 16, 3, 1, 1, 8, train=True)


def case_conv_bn_act_eval_s2(ctx: Ctx) -> Dict[str, Tensor]:
    return _conv_bn_act_case(ctx, 8, 16, 3, 2, 1, 9, train=False)


def case_conv_bn_act_eval_residual(ctx: Ctx) -> Dict[str, Tensor]:
    return _conv_bn_act_case(ctx, 8, 8, 1, 1, 0, 6, train=False, residual=True)


def case_conv_bn_act_stem(ctx: Ctx) -> Dict[str, Tensor]:
    return _conv_bn_act_case(ctx, 3, 16, 7, 2, 3, 16, train=True)


def _conv_bn_add_act_case(ctx: Ctx, proj: bool) -> Dict[str, Tensor]:
    from .functional import conv_bn_add_act

    stride = 2 if proj else 1
    cin, cout, hw = 8, 16 if proj else 8, 8
    conv, bn = _conv_bn(ctx, 31, cout if proj else cin, cout, 3, 1, 1, True)
    x = ctx.act(32, 2, cin, hw, hw)  # block input (the shortcut input)
    oh = hw // stride
    h = ctx.act(33, 2, cout if proj else cin, oh, oh)  # the block's last conv input
    wrt = {"h": h, "x": x, **_params("", conv, bn)}
    if proj:
        sconv, sbn = _conv_bn(ctx, 34, cin, cout, 1, stride, 0, True)
        wrt.update(_params("shortcut_", sconv, sbn))
        if ctx.fused:
            out = conv_bn_add_act(h, conv, bn, x, sconv, sbn, relu=True, backend=ctx.impl)
        else:
            out = F.relu(bn(conv(h)) + sbn(sconv(x)))
    else:
        if ctx.fused:
            out = conv_bn_add_act(h, conv, bn, x, relu=True, backend=ctx.impl)
        else:
            out = F.relu(bn(conv(h)) + x)
    res = {"out": out, **_grads(out, wrt, ctx, 35), **_stats("", bn)}
    if proj:
        res.update(_stats("shortcut_", sbn))
    return res


def case_conv_bn_add_act_identity(ctx: Ctx) -> Dict[str, Tensor]:
    return _conv_bn_add_act_case(ctx, proj=False)


def case_conv_bn_add_act_proj(ctx: Ctx) -> Dict[str, Tensor]:
    return _conv_bn_add_act_case(ctx, proj=True)


def _model_case(ctx: Ctx, train: bool) -> Dict[str, Tensor]:
    from . import models

    torch.manual_seed(0)
    m = models.resnet18(num_classes=10, backend=ctx.impl if ctx.fused else None)
    with torch.no_grad():  # non-trivial BN parameters and running statistics
        g = torch.Generator().manual_seed(41)
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                _randomise_bn_(mod, g, mean_std=0.1)
    if not ctx.fused:
        for mod in m.modules():
            if hasattr(mod, "fused"):
                mod.fused = False
    m = m.to(ctx.dtype).to(device=ctx.device, dtype=ctx.cdtype).to(memory_format=ctx.mf)
    m.train(train)
    x = ctx.act(42, 4, 3, 64, 64)
    out = m(x)
    params = dict(m.named_parameters())
    res = {"logits": out}
    if train:
        res.update(_grads(out, {"x": x, **params}, ctx, 43))
        for name, buf in m.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                res[name] = buf
    return res


def case_resnet18_train(ctx: Ctx) -> Dict[str, Tensor]:
    return _model_case(ctx, train=True)


def case_resnet18_eval(ctx: Ctx) -> Dict[str, Tensor]:
    return _model_case(ctx, train=False)


OP_CASES: List[Tuple[str, Callable[[Ctx], Dict[str, Tensor]], Tuple[str, ...]]] = [
    ("add_relu", case_add_relu, ("channels_last", "nchw")),
    ("bn_add_relu", case_bn_add_relu, ("channels_last", "nchw")),
    ("bn_add_relu +proj", case_bn_add_relu_proj, ("channels_last",)),
    ("maxpool2d 3x3 s2", case_maxpool, ("channels_last", "nchw")),
    ("conv_bn_act train 3x3", case_conv_bn_act_train, ("channels_last", "nchw")),
    ("conv_bn_act eval 3x3 s2", case_conv_bn_act_eval_s2, ("channels_last",)),
    ("conv_bn_act eval 1x1 +res", case_conv_bn_act_eval_residual, ("channels_last",)),
    ("conv_bn_act train stem 7x7", case_conv_bn_act_stem, ("channels_last",)),
    ("conv_bn_add_act identity", case_conv_bn_add_act_identity, ("channels_last",)),
    ("conv_bn_add_act proj", case_conv_bn_add_act_proj, ("channels_last",)),
]
MODEL_CASES = [
    ("resnet18 train", case_resnet18_train, ("channels_last",)),
    ("resnet18 eval", case_resnet18_eval, ("channels_last",)),
]


# --------------------------------------------------------------------------------------------
# comparison and the runner
# --------------------------------------------------------------------------------------------


def kind_of(name: str) -> str:
    if name.startswith("grad_"):
        return "grad"
    if name.startswith("running_") or ".running_" in name:
        return "stat"
    return "out"


def rel_err(a: Tensor, ref: Tensor) -> float:
    if a.shape != ref.shape:
        raise ValueError(f"shape {tuple(a.shape)} != reference shape {tuple(ref.shape)}")
    a64, r64 = a.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(a64).all():
        return float("inf")
    scale = r64.abs().max().item() if r64.numel() else 0.0
    diff = (a64 - r64).abs().max().item() if r64.numel() else 0.0
    return diff / scale if scale > 0 else diff


@dataclass
class Row:
    case: str
    dtype: str
    layout: str
    backend: str
    status: str  # PASS / FAIL / ERROR
    err: Optional[float] = None  # worst err / allowed over the case's tensors
    worst: Optional[str] = None  # the tensor with the worst ratio
    worst_err: Optional[float] = None
    eager_err: Optional[float] = None
    allowed: Optional[float] = None
    message: Optional[str] = None


def _run(fn: Callable[[Ctx], Dict[str, Tensor]], ctx: Ctx) -> Dict[str, Tensor]:
    torch.manual_seed(0)
    return {k: v.detach() for k, v in fn(ctx).items()}


def check_case(name: str, fn: Callable[[Ctx], Dict[str, Tensor]], dtype: torch.dtype, device: torch.device,
               layout: str, backends: Sequence[str]) -> List[Row]:
    """Rows for one case on each backend (the reference and eager runs are shared)."""
    dn = SHORT[dtype]
    try:
        ref = _run(fn, Ctx("ref", dtype, device, layout))
        eager = _run(fn, Ctx("eager", dtype, device, layout))
        eager_err = {k: rel_err(eager[k], ref[k]) for k in ref}
    except Exception as exc:  # noqa: BLE001 - the reference itself failed: every backend row says so
        msg = f"reference failed: {type(exc).__name__}: {exc}"
        return [Row(name, dn, layout, b, "ERROR", message=msg) for b in backends]
    rows = []
    for b in backends:
        try:
            got = _run(fn, Ctx(b, dtype, device, layout))
        except Exception as exc:  # noqa: BLE001 - a backend that raises on a supported call fails
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            rows.append(Row(name, dn, layout, b, "ERROR", message=f"{type(exc).__name__}: {first}"))
            continue
        missing = sorted(set(ref) - set(got))
        if missing:
            rows.append(Row(name, dn, layout, b, "FAIL", message=f"missing outputs {missing}"))
            continue
        worst = None
        for k in ref:
            try:
                e = rel_err(got[k], ref[k])
            except ValueError as exc:
                worst = (float("inf"), k, float("inf"), eager_err[k], 0.0, str(exc))
                break
            allowed = check_allowed(dtype, kind_of(k), eager_err[k])
            ratio = e / allowed
            if worst is None or ratio > worst[0]:
                worst = (ratio, k, e, eager_err[k], allowed, None)
        ratio, k, e, ee, allowed, msg = worst
        rows.append(Row(name, dn, layout, b, "PASS" if ratio <= 1.0 else "FAIL", err=ratio, worst=k, worst_err=e,
                        eager_err=ee, allowed=allowed, message=msg))
    return rows


def available_backends(device: torch.device, requested: Optional[Sequence[str]] = None
                       ) -> Tuple[List[str], Dict[str, str]]:
    """(backends to check, {backend: why it is unavailable})."""
    from ._backend import backend_status
    from ._registry import backend_names

    known = backend_names()  # the registry's backends, in its order
    names = list(requested) if requested else list(known)
    run, skip = [], {}
    for n in names:
        if n not in known:
            raise ValueError(f"unknown backend {n!r}; choose from {known}")
        ok, why = backend_status(n, device)
        if ok:
            run.append(n)
        else:
            skip[n] = why
    return run, skip


def _models_available() -> Tuple[bool, str]:
    try:
        from . import models

        models.resnet18  # noqa: B018
        return True, ""
    except (ImportError, AttributeError) as exc:
        return False, f"resnet_kernels.models.resnet18 is not available ({exc})"


def run_check(*, device: Optional[str] = None, dtypes: Optional[Sequence[torch.dtype]] = None,
              backends: Optional[Sequence[str]] = None, model: Optional[bool] = None,
              cases: Optional[Sequence[str]] = None, progress=None) -> Dict[str, Any]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtypes is None:
        dtypes = [torch.float32, torch.bfloat16] if dev.type == "cuda" else [torch.float32]
    run, skip = available_backends(dev, backends)
    notes: Dict[str, str] = {}
    selected = list(OP_CASES)
    interp = dev.type != "cuda" and "triton" in run
    if model is None:
        model = not interp
        if interp:
            notes["model"] = ("resnet18 cases skipped: the Triton interpreter on the CPU takes minutes for a "
                              "whole model (pass --model to force them)")
    if model:
        ok, why = _models_available()
        if ok:
            selected += MODEL_CASES
        else:
            notes["model"] = f"resnet18 cases skipped: {why}"
    if cases:
        unknown = [c for c in cases if c not in {n for n, _, _ in OP_CASES + MODEL_CASES}]
        if unknown:
            raise ValueError(f"unknown case(s) {unknown}")
        selected = [c for c in selected if c[0] in cases]
    rows: List[Row] = []
    if run:
        with no_tf32():
            for dt in dtypes:
                for name, fn, layouts in selected:
                    for layout in layouts:
                        if progress is not None:
                            progress.write(f"checking {name} {SHORT[dt]} {layout} ...\n")
                            progress.flush()
                        rows.extend(check_case(name, fn, dt, dev, layout, run))
    return {"device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "checked": run, "unavailable": skip, "notes": notes,
            "rows": [r.__dict__ for r in rows],
            "passed": all(r.status == "PASS" for r in rows) and bool(run)}


def format_report(res: Dict[str, Any]) -> str:
    where = res["gpu"] or "CPU (no GPU visible)"
    lines = [f"resnet-kernels check on {res['device']} ({where}): backends {', '.join(res['checked']) or 'none'}",
             "error = max|ours - ref| / max|ref| against float64 PyTorch layers; allowed = max(floor, "
             f"{EAGER_FACTOR:g} x PyTorch's own error in that dtype) (resnet_kernels.testing)",
             f"{'case':<28}{'dtype':<6}{'layout':<15}{'backend':<8}{'result':<7}{'err/allowed':>12}"
             f"{'error':>10}{'eager':>10}  worst tensor"]
    for r in res["rows"]:
        if r["status"] == "ERROR" or r["err"] is None:
            lines.append(f"{r['case']:<28}{r['dtype']:<6}{r['layout']:<15}{r['backend']:<8}{r['status']:<7}"
                         f"  {r['message']}")
            continue
        lines.append(f"{r['case']:<28}{r['dtype']:<6}{r['layout']:<15}{r['backend']:<8}{r['status']:<7}"
                     f"{r['err']:>12.3g}{r['worst_err']:>10.2e}{r['eager_err']:>10.2e}  {r['worst']}"
                     + (f" ({r['message']})" if r["message"] else ""))
    for b, why in res["unavailable"].items():
        lines.append(f"unavailable (not a failure): {b}: {why}")
    for why in res["notes"].values():
        lines.append(f"note: {why}")
    n_fail = sum(r["status"] != "PASS" for r in res["rows"])
    if not res["checked"]:
        lines.append("FAILED: no backend could be checked")
    else:
        kernels = [b for b in res["checked"] if b != "torch"]
        if n_fail:
            verdict = ""
        elif kernels:
            verdict = f": all checked backends OK ({', '.join(res['checked'])})"
        else:
            verdict = (": the torch backend (the plain-PyTorch reference path) is OK; no kernel backend "
                       "(cuda, triton) was checked here")
        lines.append(f"{len(res['rows']) - n_fail} passed, {n_fail} failed" + verdict)
    return "\n".join(lines)


def main_check(args) -> int:
    names = args.dtypes.split(",") if isinstance(args.dtypes, str) else args.dtypes
    bad = [d for d in names or () if d not in DTYPE_NAMES]
    if bad:
        print(f"resnet-kernels check: error: unknown dtype(s) {bad}; choose from {','.join(DTYPE_NAMES)}",
              file=sys.stderr)
        return 2
    dtypes = [DTYPE_NAMES[d] for d in names] if names else None
    backends = args.backends.split(",") if args.backends else None
    cases = [c.strip() for c in args.cases.split(",")] if args.cases else None
    try:
        res = run_check(dtypes=dtypes, backends=backends, model=args.model, cases=cases,
                        progress=sys.stderr if args.verbose else None)
    except ValueError as exc:
        print(f"resnet-kernels check: error: {exc}", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        return 1
    print(format_report(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
            f.write("\n")
    return 0 if res["passed"] else 1
