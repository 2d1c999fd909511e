"""``fuse(model)`` / ``unfuse(model)``: switch an existing model to the fused kernels in place.

What ``fuse`` converts (parameters, buffers, ``state_dict`` keys, and therefore an existing
optimizer and its state, are untouched: modules change class, never contents):

* ``torchvision.models.resnet.ResNet`` / ``BasicBlock`` / ``Bottleneck`` (exactly those classes):
  their ``__class__`` becomes a subclass of both :mod:`resnet_kernels.models.resnet`'s drop-in
  class and the torchvision class (so ``isinstance(model, torchvision.models.ResNet)`` still
  holds), whose forward runs the stem (conv+BN+ReLU, and its ``maxpool`` through the
  one-byte-argmax max pool op when it is a plain ``nn.MaxPool2d`` the op covers), conv+BN+ReLU and
  conv+BN(+projection conv+BN)+add+ReLU through the fused functional API over the very same
  submodules;
* this package's own ``ResNet``/``BasicBlock``/``Bottleneck`` (fused by default): ``fused = True``;
* every plain ``nn.Sequential`` that contains ``Conv2d -> BatchNorm2d (-> ReLU)``: its class
  becomes :class:`FusedSequential`, which runs those runs of modules as one fused unit.

Anything else is left alone and listed in the report with the reason: subclasses of those
classes (their own forward), modules whose forward ``fuse`` cannot see (custom modules that own a
Conv2d and a BatchNorm2d), and units the fused path does not cover (dilation, grouped conv, other
padding modes, a norm layer other than ``nn.BatchNorm2d``, module hooks); such units run the
plain PyTorch modules, exactly as before.

``nn.SyncBatchNorm`` fuses like ``nn.BatchNorm2d``: the fused units synchronise its per-channel
batch statistics across its process group (see ``resnet_kernels/nn/_sync.py``), exactly as
SyncBatchNorm does. ``nn.SyncBatchNorm.convert_sync_batchnorm`` works before or after ``fuse``:
the fused modules keep the real norm modules as children (which the conversion replaces) and
check them on every forward.

``unfuse(model)`` undoes ``fuse``: converted torchvision modules get their original class back,
``FusedSequential`` becomes ``nn.Sequential`` again, and this package's own modules get
``fused = False`` (they then run the plain PyTorch forward, identical to torchvision's).
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from torch import nn

from .. import _backend
from .._script import no_script
from ..functional import conv_bn_act
from ..nn.pool import pool_reason
from ._units import projection_reason, relu_ok, unit_ok, unit_reason
from .resnet import BasicBlock, Bottleneck, ResNet

__all__ = ["fuse", "unfuse", "FuseReport", "FusedSequential"]

_ORIG = "_rk_orig_class"


class FusedSequential(nn.Sequential):
    """``nn.Sequential`` whose ``Conv2d -> BatchNorm2d (-> ReLU)`` runs go through
    :func:`resnet_kernels.functional.conv_bn_act`; everything else runs module by module.
    Same children, same ``state_dict`` as the ``nn.Sequential`` it came from."""

    backend: Optional[str] = None

    def forward(self, x):
        mods = list(self._modules.values())
        i, n = 0, len(mods)
        while i < n:
            m = mods[i]
            if i + 1 < n and unit_ok(x, m, mods[i + 1]):  # x: a 4-D tensor (or an fx Proxy)
                relu = i + 2 < n and relu_ok(mods[i + 2])
                x = conv_bn_act(x, m, mods[i + 1], relu=relu, backend=self.backend)
                i += 3 if relu else 2
            else:
                x = m(x)
                i += 1
        return x

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"

    __prepare_scriptable__ = no_script


@dataclass
class FuseReport:
    """What ``fuse``/``unfuse`` did. ``changed``: (module name, what was done);
    ``skipped``: (module or unit name, why it was left alone / runs unfused)."""

    action: str
    backend: Optional[str] = None
    changed: List[Tuple[str, str]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)

    @property
    def fused(self) -> List[str]:
        return [n for n, _ in self.changed]

    def __str__(self) -> str:
        lines = [f"{self.action}: {len(self.changed)} module(s) changed, {len(self.skipped)} left alone"
                 + (f" (backend={self.backend!r})" if self.action == "fuse" else "")]
        lines += [f"  {self.action}d {n or '<model>'}: {what}" for n, what in self.changed]
        lines += [f"  skipped {n or '<model>'}: {why}" for n, why in self.skipped]
        return "\n".join(lines)


def _tv_classes():
    """torchvision's ResNet classes, when torchvision is loaded (a torchvision model cannot
    exist otherwise, so fuse never imports it)."""
    tvr = sys.modules.get("torchvision.models.resnet")
    if tvr is None:
        return {}
    return {getattr(tvr, n): n for n in ("ResNet", "BasicBlock", "Bottleneck") if hasattr(tvr, n)}


_OURS = {"ResNet": ResNet, "BasicBlock": BasicBlock, "Bottleneck": Bottleneck}
_TV_PREFIX = "_Torchvision"


@functools.lru_cache(maxsize=None)
def _fused_tv_class(tv_cls: type, kind: str) -> type:
    """The class a torchvision ``kind`` module gets: our drop-in class first (its forward), then
    torchvision's (isinstance checks keep working). Named like ours in reprs; reachable as
    ``resnet_kernels.models.fuse._TorchvisionResNet`` etc., so pickle finds it."""
    cls = type(kind, (_OURS[kind], tv_cls), {"__module__": __name__,
                                            "__doc__": f"torchvision's {kind}, fused (see resnet_kernels.fuse)."})
    cls.__qualname__ = _TV_PREFIX + kind
    return cls


def __getattr__(name: str):
    # pickle/copy look the fused torchvision classes up by name (module __getattr__, PEP 562)
    kind = name[len(_TV_PREFIX):] if name.startswith(_TV_PREFIX) else None
    if kind in _OURS:
        import torchvision.models.resnet as tvr

        return _fused_tv_class(getattr(tvr, kind), kind)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# (conv, bn, what follows) per unit; "relu" or "add" (the block's last unit, with the shortcut)
_UNITS = {
    "ResNet": [("conv1", "bn1", "relu")],
    "BasicBlock": [("conv1", "bn1", "relu"), ("conv2", "bn2", "add")],
    "Bottleneck": [("conv1", "bn1", "relu"), ("conv2", "bn2", "relu"), ("conv3", "bn3", "add")],
}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _plan_block(name: str, m: nn.Module, kind: str, report: FuseReport) -> bool:
    """Check a ResNet / block; returns whether at least one unit will run fused."""
    units_ok, notes = [], []
    try:
        relu = m.relu
        for conv_n, bn_n, after in _UNITS[kind]:
            conv, bn = getattr(m, conv_n), getattr(m, bn_n)
            label = f"{conv_n}+{bn_n}"
            if after == "add":
                ds = m.downsample
                if ds is None:
                    label += "+add(identity)"
                elif projection_reason(ds) is None:
                    label += "+add(downsample.0+downsample.1)"
                else:
                    label += "+add(downsample)"
                    notes.append((_join(name, "downsample"),
                                  f"{projection_reason(ds)}; the shortcut runs as plain modules"))
            label += "+relu"
            why = unit_reason(conv, bn)
            if why is None:
                units_ok.append(label)
            else:
                notes.append((_join(name, label), f"{why}; runs as plain modules"))
    except AttributeError as e:
        report.skipped.append((name, f"{type(m).__name__} lacks an expected submodule ({e}); left alone"))
        return False
    if not relu_ok(relu):
        report.skipped.append((name, f"its relu is a {type(relu).__name__} or has hooks; left alone"))
        return False
    if not units_ok:
        report.skipped.append((name, "no unit can be fused: " + "; ".join(w for _, w in notes)))
        return False
    if kind == "ResNet":  # the stem's max pool: the one-byte-argmax op (resnet_kernels/nn/pool.py)
        why = pool_reason(getattr(m, "maxpool", None))
        if why is None:
            units_ok.append("maxpool")
        else:
            notes.append((_join(name, "maxpool"), f"{why}; runs as the plain module"))
    report.changed.append((name, f"{kind}: " + ", ".join(units_ok)))
    report.skipped.extend(notes)
    return True


def _plan_sequential(name: str, seq: nn.Sequential, report: FuseReport, exact: bool) -> bool:
    mods = list(seq._modules.items())
    found, notes = [], []
    for i in range(len(mods) - 1):
        (cn, conv), (bn_name, bn) = mods[i], mods[i + 1]
        if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.modules.batchnorm._BatchNorm)):
            continue
        why = unit_reason(conv, bn)
        if why is not None:
            notes.append((_join(name, f"{cn}+{bn_name}"), f"{why}; runs as plain modules"))
            continue
        label = f"{cn}+{bn_name}"
        if i + 2 < len(mods) and relu_ok(mods[i + 2][1]):
            label += f"+{mods[i + 2][0]}(relu)"
        found.append(label)
    if found and not exact:
        report.skipped.append((name, f"{type(seq).__name__} is an nn.Sequential subclass with its own forward; "
                                     f"left alone (would fuse {', '.join(found)})"))
        return False
    report.skipped.extend(notes)
    if found:
        report.changed.append((name, "Sequential: " + ", ".join(found)))
    return bool(found)


def _check_args(fn: str, model, backend) -> Optional[str]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")
    return None if backend is None else _backend._check_name(backend)


def fuse(model: nn.Module, backend: Optional[str] = None, *, report: bool = False):
    """Convert ``model`` in place to run on the fused kernels and return it (like ``.to()`` or
    ``SyncBatchNorm.convert_sync_batchnorm``: ``model = resnet_kernels.fuse(model)``).

    backend: None (the backend in force at each call, see ``resnet_kernels.use_backend``),
    'auto', 'cuda', 'triton' or 'torch'; stored on every converted module.
    report: True returns ``(model, FuseReport)``: what was fused, what was left alone and why
    (``print(report)``).
    """
    backend = _check_args("fuse", model, backend)
    if not isinstance(report, bool):
        raise TypeError(f"fuse: report must be a bool, got {report!r}")
    result = _fuse(model, backend)
    return (model, result) if report else model


def _fuse(model: nn.Module, backend: Optional[str]) -> FuseReport:
    tv = _tv_classes()
    report = FuseReport("fuse", backend)
    actions = []  # (module, our class or None (flag only), FusedSequential)
    claimed: List[str] = []  # prefixes whose submodules a converted block owns

    for name, m in model.named_modules():  # parents come before their children
        if any(name.startswith(p) for p in claimed):
            continue
        t = type(m)
        if t in tv:
            kind = tv[t]
            if _plan_block(name, m, kind, report):
                actions.append((m, "tv", kind))
            if kind != "ResNet":
                claimed.append(name + "." if name else "")  # "" (the root block): everything
            continue
        if isinstance(m, (ResNet, BasicBlock, Bottleneck)):
            # ours (or a subclass of ours, which keeps its class): set .fused, which our forward
            # honours per unit on every call, even where no unit can be fused right now
            kind = next(k for k, c in _OURS.items() if isinstance(m, c))
            _plan_block(name, m, kind, report)
            actions.append((m, "ours", kind))
            if kind != "ResNet":
                claimed.append(name + "." if name else "")  # "" (the root block): everything
            continue
        tv_sub = next((n for c, n in tv.items() if isinstance(m, c)), None)
        if tv_sub is not None:
            report.skipped.append((name, f"{t.__name__} subclasses torchvision's {tv_sub} with its own methods; "
                                         f"left alone"))
            continue
        if isinstance(m, nn.Sequential):
            if _plan_sequential(name, m, report, exact=t in (nn.Sequential, FusedSequential)):
                actions.append((m, "seq", "Sequential"))
            continue
        kids = list(m.children())
        if any(isinstance(k, nn.Conv2d) for k in kids) and any(isinstance(k, nn.modules.batchnorm._BatchNorm)
                                                              for k in kids):
            report.skipped.append((name, f"{t.__name__} owns Conv2d/BatchNorm layers that its own forward() "
                                         f"calls; fuse() cannot see that data flow, left alone"))

    # Everything checked: apply.
    for m, how, kind in actions:
        if how == "tv":
            m.__dict__[_ORIG] = type(m)
            m.__class__ = _fused_tv_class(type(m), kind)
        elif how == "seq":
            m.__class__ = FusedSequential
            m.backend = backend
            continue
        m.fused = True
        m.backend = backend
    return report


def unfuse(model: nn.Module, *, report: bool = False):
    """Undo :func:`fuse` in place (same parameter and buffer objects) and return the model;
    ``report=True`` returns ``(model, FuseReport)``."""
    _check_args("unfuse", model, None)
    if not isinstance(report, bool):
        raise TypeError(f"unfuse: report must be a bool, got {report!r}")
    result = _unfuse(model)
    return (model, result) if report else model


def _unfuse(model: nn.Module) -> FuseReport:
    report = FuseReport("unfuse")
    for name, m in model.named_modules():
        if _ORIG in m.__dict__:
            orig = m.__dict__.pop(_ORIG)
            m.__class__ = orig
            m.__dict__.pop("fused", None)
            m.__dict__.pop("backend", None)
            report.changed.append((name, f"back to {orig.__module__}.{orig.__name__}"))
        elif isinstance(m, (ResNet, BasicBlock, Bottleneck)):
            if m.fused:
                m.fused = False
                report.changed.append((name, f"{type(m).__name__}: fused=False (plain PyTorch forward)"))
        elif type(m) is FusedSequential:
            m.__class__ = nn.Sequential
            m.__dict__.pop("backend", None)
            report.changed.append((name, "back to torch.nn.Sequential"))
    return report
