"""The accountant: kernels launched and HBM bytes moved by one model step, counted without a GPU.

``count_step(model="resnet50", mode="train", backend="eager")`` builds the model on the ``meta``
device (shapes only, no memory, no kernel runs), runs one *warm-up* step and then one counted
step under a ``TorchDispatchMode`` that sees every op below autograd, forward, backward and the
optimizer alike, and returns a :class:`Count` (per layer, per phase, per op, totals).
``resnet-kernels count`` prints it (``--json``). Counted, not timed: see docs/COUNT.md.

Counting rules (what a CUDA device would launch):

* an aten op that computes counts 1 launch, bytes = what it reads + writes: the memory each tensor
  input and output addresses (a broadcast, stride-0 tensor counted once); views, ``detach``,
  allocations (``empty*``) and scalar reads count 0;
* multi-kernel aten ops count their CUDA kernels: training batch norm 3 (statistics, running
  statistics + invstd, apply: x read twice), its backward 2 (reduce, apply), eval batch norm 1,
  ``convolution_backward`` one kernel per requested gradient (dgrad reads grad_out + weight,
  wgrad reads grad_out + x), ``nll_loss_backward`` 2 (zero fill, scatter), a ``_foreach_*`` op
  one launch per multi_tensor_apply chunk (at most 110/64/48/36/30 tensors for 1..5 tensor
  lists, 320 blocks of 65,536 elements);
* AccumulateGrad's copy of a fresh gradient counts 0 (on a GPU the engine steals the buffer; the
  counter's own reference forces the copy here);
* a ``resnet_kernels::`` op counts what its implementation declares (``Impl.cost`` in
  ``resnet_kernels/backends/__init__.py``), never its Python decomposition; ``auto`` counts the
  implementation 'auto' picks statically on CUDA tensors (the first supporting one in priority
  order: what it uses when it cannot measure; the measured choice may differ per layer).

Backends: ``eager`` (torchvision's model: cuDNN convolutions, native BN), ``auto``, and each
registry backend with a cost declaration (``aten``, ``cuda``, ``triton``): the fused model with
that implementation counted for every fused op. torch.compile is not counted (Inductor needs a
GPU to generate code; see docs/COUNT.md).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from . import _registry

MODELS = ("resnet18", "resnet34", "resnet50")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_BLOCK = re.compile(r"^layer\d+\.\d+$")

# ops that launch nothing: allocations, metadata, scalar reads (views are detected from the schema)
_FREE = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "detach", "alias", "lift_fresh",
         "_local_scalar_dense", "_unsafe_view", "as_strided_", "_reshape_alias", "set_", "resize_", "sym_size",
         "sym_stride", "sym_numel", "sym_storage_offset", "_record_function_enter_new", "_record_function_exit"}
_FOREACH_MAX_TENSORS = {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}


def nbytes(t) -> int:
    from .backends import nbytes as _nb

    return _nb(t)


def _tensors(xs) -> List[torch.Tensor]:
    out: List[torch.Tensor] = []
    for a in xs:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(t for t in a if isinstance(t, torch.Tensor))
    return out


def _io_bytes(args, kwargs, result) -> int:
    """Bytes read (every tensor argument) + written (every tensor result; an in-place op's result
    is its mutated input, read and written)."""
    outs = result if isinstance(result, (list, tuple)) else [result]
    return sum(nbytes(t) for t in _tensors(list(args) + list(kwargs.values())) + _tensors(outs))


def aten_cost(func, args, kwargs, result) -> Tuple[int, int]:
    """(launches, bytes) of one aten op on a CUDA device, by the rules in this module's docstring."""
    name = func._schema.name.split("::")[-1]
    if func.is_view or name in _FREE:
        return 0, 0
    if name.startswith("_foreach_"):
        lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
        depth = max(1, len(lists) + (0 if name.endswith("_") else 1))
        n = len(lists[0]) if lists else 0
        chunks = sum(math.ceil(t.numel() / 65536) for t in lists[0]) if lists else 0
        launches = max(math.ceil(n / _FOREACH_MAX_TENSORS.get(depth, 30)), math.ceil(chunks / 320)) if n else 0
        # an in-place foreach op writes its first list (its result is None)
        written = lists[0] if (name.endswith("_") and lists) else result
        return launches, _io_bytes(args, kwargs, written)
    b = _io_bytes(args, kwargs, result)
    if name in ("native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional",
                "cudnn_batch_norm"):
        training = args[5] if len(args) > 5 else kwargs.get("training", False)
        if name == "_native_batch_norm_legit" and len(args) == 5:  # the no-running-stats overload
            training = args[3]
        if training:
            return 3, b + nbytes(args[0])  # x read by the statistics and by the apply pass
        return 1, b
    if name in ("native_batch_norm_backward", "cudnn_batch_norm_backward"):
        return 2, b + nbytes(args[0]) + nbytes(args[1])  # reduce reads (g, x), apply reads them again
    if name == "convolution_backward":
        g, x, w = args[0], args[1], args[2]
        mask = args[-1]
        gx, gw, gb = result
        launches = b = 0
        if mask[0]:
            launches, b = launches + 1, b + nbytes(g) + nbytes(w) + nbytes(gx)
        if mask[1]:
            launches, b = launches + 1, b + nbytes(g) + nbytes(x) + nbytes(gw)
        if len(mask) > 2 and mask[2]:
            launches, b = launches + 1, b + nbytes(g) + nbytes(gb)
        return launches, b
    if name == "nll_loss_backward":
        return 2, b + nbytes(result)
    return 1, b


@dataclass
class Entry:
    layer: str
    phase: str  # fwd | bwd | optim
    op: str
    impl: str  # 'aten' for aten ops, else the implementation counted for a resnet_kernels op
    calls: int = 0
    launches: int = 0
    bytes: int = 0


@dataclass
class Count:
    model: str
    mode: str
    backend: str
    config: Dict[str, Any]
    entries: List[Entry] = field(default_factory=list)

    @property
    def launches(self) -> int:
        return sum(e.launches for e in self.entries)

    @property
    def bytes(self) -> int:
        return sum(e.bytes for e in self.entries)

    def by_layer(self) -> "OrderedDict[str, Tuple[int, int]]":
        out: "OrderedDict[str, List[int]]" = OrderedDict()
        for e in self.entries:
            v = out.setdefault(e.layer, [0, 0])
            v[0] += e.launches
            v[1] += e.bytes
        return OrderedDict((k, (v[0], v[1])) for k, v in out.items())

    def by_phase(self) -> Dict[str, Tuple[int, int]]:
        out: Dict[str, List[int]] = {}
        for e in self.entries:
            v = out.setdefault(e.phase, [0, 0])
            v[0] += e.launches
            v[1] += e.bytes
        return {k: (v[0], v[1]) for k, v in out.items()}

    def to_dict(self) -> Dict[str, Any]:
        return {"model": self.model, "mode": self.mode, "backend": self.backend, "config": self.config,
                "launches": self.launches, "bytes": self.bytes,
                "phases": {k: {"launches": v[0], "bytes": v[1]} for k, v in self.by_phase().items()},
                "layers": [{"layer": k, "launches": v[0], "bytes": v[1]} for k, v in self.by_layer().items()],
                "ops": [e.__dict__ for e in self.entries]}


# --------------------------------------------------------------------------------------------
# resnet_kernels ops: the call object of the op's arguments and the implementation counted
# --------------------------------------------------------------------------------------------
def _custom_call(name: str, args):
    from ._checks import acc_dtype, channel_vector
    import importlib

    B = importlib.import_module("resnet_kernels.ops.bn_add_relu")
    C = importlib.import_module("resnet_kernels.ops.conv2d")

    if name == "conv2d_epilogue":
        x, w, scale, bias, residual, stride, padding, dilation, groups, relu, backend = args
        layout, shape = C._validate_epilogue(x, w, scale, bias, residual, stride, padding, dilation, groups)
        acc = acc_dtype(x.dtype)
        return C.ConvCall(name, x, w, channel_vector(scale, acc), channel_vector(bias, acc), residual, stride,
                          padding, dilation, groups, relu, False, layout, shape), backend
    if name == "conv2d_stats":
        x, w, stride, padding, dilation, groups, backend = args
        layout, shape = C._validate_conv(name, x, w, stride, padding, dilation, groups)
        return C.ConvCall(name, x, w, None, None, None, stride, padding, dilation, groups, False, True, layout,
                          shape), backend
    if name == "bn_add_relu":
        x, scale, shift, identity, id_scale, id_shift, relu, backend = args
        layout = B._validate(x, scale, shift, identity, id_scale, id_shift)
        acc = acc_dtype(x.dtype)
        return B.ForwardCall(x, channel_vector(scale, acc), channel_vector(shift, acc), identity,
                             channel_vector(id_scale, acc), channel_vector(id_shift, acc), relu, layout), backend
    if name == "bn_add_relu_backward":
        (g, out, x, scale, identity, id_scale, relu, need_x, need_identity, need_scale, need_shift, need_id_scale,
         backend) = args
        layout = B._validate_backward(g, out, x, scale, identity, id_scale, relu, need_scale, need_id_scale)
        acc = acc_dtype(g.dtype)
        return B.BackwardCall(g, out if relu else None, x if need_scale else None, channel_vector(scale, acc),
                              identity if need_id_scale else None, channel_vector(id_scale, acc), relu, layout,
                              (need_x, need_identity, need_scale, need_shift, need_id_scale)), backend
    from .ops import batch_norm, conv2d_bn, conv_backward, maxpool

    for mod in (batch_norm, maxpool, conv_backward, conv2d_bn):  # op modules that export CALLS: op name -> the validated call of its args
        if name in mod.CALLS:
            return mod.CALLS[name](*args[:-1]), args[-1]
    raise NotImplementedError(f"the accountant does not know resnet_kernels::{name}")


def counted_impl(op: str, backend: str, call) -> _registry.Impl:
    """The implementation the accountant counts for ``backend`` ('auto': the static CUDA choice)."""
    if backend != "auto":
        impl = _registry.get_impl(op, backend)
        if impl is not None:
            why = impl.why_not(call)
            if why is not None:
                raise _registry.BackendUnavailableError(f"{op}: backend {backend!r} does not support this call: {why}")
            return impl
        if not _registry.get_backend_decl(backend).fallback_auto:
            raise _registry.BackendUnavailableError(f"{op}: backend {backend!r} has no implementation of {op}")
    for impl in _registry.implementations(op):
        if "cuda" in impl.auto_on and impl.why_not(call) is None:
            return impl
    raise _registry.BackendUnavailableError(f"{op}: no implementation 'auto' could choose on CUDA for this call")


# --------------------------------------------------------------------------------------------
# the counting mode
# --------------------------------------------------------------------------------------------
class Counter(TorchDispatchMode):
    """Counts every op dispatched while active (see the module docstring for the rules)."""

    def __init__(self):
        super().__init__()
        self.layer = "stem"
        self.phase = "fwd"
        self.active = True
        self.entries: "OrderedDict[Tuple[str, str, str, str], Entry]" = OrderedDict()

    def _add(self, layer, phase, op, impl, launches, b):
        key = (layer, phase, op, impl)
        e = self.entries.get(key)
        if e is None:
            e = self.entries[key] = Entry(layer, phase, op, impl)
        e.calls += 1
        e.launches += launches
        e.bytes += b

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func in _CONVS:
            result = _cudnn_layout(func, args, result)
        if not self.active:
            return result
        node = torch._C._current_autograd_node()
        layer, phase = self.layer, self.phase
        if node is not None:
            phase = "bwd"
            layer = node.metadata.get("rk_layer", "head") if hasattr(node, "metadata") else "head"
            if type(node).__name__ == "AccumulateGrad" and func._schema.name in ("aten::clone", "aten::detach"):
                return result
        ns = func.namespace
        if ns == "resnet_kernels":
            name = func._schema.name.split("::")[-1]
            call, backend = _custom_call(name, args)
            impl = counted_impl(name, backend, call)
            if impl.cost is None:
                raise NotImplementedError(f"{name}: the {impl.backend} implementation declares no cost "
                                          f"(Impl.cost in resnet_kernels/backends/__init__.py)")
            launches, b = impl.cost(call)
            self._add(layer, phase, name, impl.backend, launches, b)
        elif ns in ("aten", "prims"):
            launches, b = aten_cost(func, args, kwargs, result)
            if launches or b:
                self._add(layer, phase, func._schema.name.split("::")[-1], "aten", launches, b)
        return result


_CONVS = (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default)


def _channels_last(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 4 and not t.is_contiguous() and \
        t.is_contiguous(memory_format=torch.channels_last)


def _cudnn_layout(func, args, result):
    """The meta device's convolutions return NCHW-contiguous tensors whatever the layout of their
    inputs; cuDNN (what a GPU runs) returns channels_last outputs and gradients when the input or the
    weight is channels_last. Restrided here (outside the count: the mode is off inside dispatch), so
    the rest of the step sees a GPU's layouts: e.g. eager's avgpool on a channels_last activation
    records an as_strided view whose backward launches 2 kernels (new_zeros, copy_), as on a GPU."""
    if func is torch.ops.aten.convolution.default:
        x, w = args[0], args[1]
        if result.device.type == "meta" and result.dim() == 4 and (_channels_last(x) or _channels_last(w)):
            return result.contiguous(memory_format=torch.channels_last)
        return result
    x, w = args[1], args[2]
    if not (_channels_last(x) or _channels_last(w)):
        return result
    return tuple(r.contiguous(memory_format=torch.channels_last)
                 if isinstance(r, torch.Tensor) and r.device.type == "meta" and r.dim() == 4 else r for r in result)


def _tag(tensors, label: str) -> None:
    """Tag every autograd node reachable from ``tensors`` that has no layer yet with ``label``."""
    stack = [t.grad_fn for t in tensors if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    while stack:
        n = stack.pop()
        if n is None or "rk_layer" in n.metadata:
            continue
        n.metadata["rk_layer"] = label
        stack.extend(f for f, _ in n.next_functions if f is not None)


@contextlib.contextmanager
def _layer_hooks(model: torch.nn.Module, counter: Counter):
    handles = []
    for name, m in model.named_modules():
        if not _BLOCK.match(name):
            continue

        def pre(mod, inp, name=name):
            _tag(_tensors(inp), counter.layer)  # what ran since the last block (the stem)
            counter.layer = name

        def post(mod, inp, out, name=name):
            _tag(_tensors(out if isinstance(out, (list, tuple)) else [out]), name)
            counter.layer = "head"

        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _cuda_like_auto():
    """On a CUDA device 'auto' runs the fused ops; on meta tensors a fused unit would run the
    user's own layers (``_tune.plain_layers``). Count what it does on CUDA."""
    from . import _tune

    saved = _tune.plain_layers
    _tune.plain_layers = lambda x, requested, unit=None, record=True: False
    try:
        yield
    finally:
        _tune.plain_layers = saved


def build_model(arch: str, backend: str, num_classes: int) -> torch.nn.Module:
    if backend == "eager":
        from .bench import eager_model

        return eager_model(arch, num_classes)[0]
    from .bench import ours_model

    return ours_model(arch, num_classes, backend)


def count_backends() -> Tuple[str, ...]:
    """eager, auto and every registry backend that runs whole models (``Backend.benchmark``: not
    the reference, not a backend serving only some layers such as ``cutlass``) and whose
    implementations all declare a cost."""
    names = [b.name for b in _registry.backends() if b.benchmark
             and all(i.cost is not None for op in _registry.OPS for i in _registry.implementations(op)
                     if i.backend == b.name)]
    return ("eager", "auto") + tuple(names)


def count_step(model: str = "resnet50", mode: str = "train", backend: str = "eager", batch: int = 256,
               image_size: int = 224, dtype: str = "bf16", layout: str = "channels_last",
               num_classes: int = 1000) -> Count:
    """Count one step (train: forward, cross-entropy, backward, SGD momentum step; infer: forward
    under no_grad in eval mode) of ``model`` on ``backend``, without a GPU."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    if mode not in ("train", "infer"):
        raise ValueError(f"mode must be 'train' or 'infer', got {mode!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if layout not in ("nchw", "channels_last"):
        raise ValueError(f"layout must be 'nchw' or 'channels_last', got {layout!r}")
    if backend not in count_backends():
        raise ValueError(f"backend must be one of {count_backends()}, got {backend!r}")
    if batch < 1 or image_size < 32:
        raise ValueError(f"batch must be >= 1 and image_size >= 32, got {batch}, {image_size}")
    mf = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    dt = DTYPES[dtype]
    with torch.device("meta"):
        net = build_model(model, backend, num_classes)
    net = net.to(device="meta", dtype=dt, memory_format=mf)
    x = torch.empty(batch, 3, image_size, image_size, device="meta", dtype=dt).contiguous(memory_format=mf)
    labels = torch.empty(batch, device="meta", dtype=torch.long)
    config = {"batch": batch, "image_size": image_size, "dtype": dtype, "layout": layout,
              "num_classes": num_classes, "optimizer": "SGD(momentum=0.9, foreach=True)" if mode == "train" else None}
    counter = Counter()
    ctx = _cuda_like_auto() if backend != "eager" else contextlib.nullcontext()
    with ctx, _layer_hooks(net, counter):
        if mode == "infer":
            net.eval()
            with torch.no_grad():
                for step in range(2):  # steady state: count the second (e.g. folded BN constants cached)
                    counter.active = step == 1
                    counter.entries.clear()
                    with counter:
                        counter.layer = "stem"
                        net(x)
        else:
            net.train()
            opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, foreach=True)
            for step in range(2):  # the first step creates the momentum buffers: count the second
                counter.active = step == 1
                counter.entries.clear()
                with counter:
                    counter.layer, counter.phase = "stem", "fwd"
                    opt.zero_grad(set_to_none=True)
                    out = net(x)
                    loss = F.cross_entropy(out.float(), labels)
                    _tag([loss], "head")
                    loss.backward()
                    counter.layer, counter.phase = "optimizer", "optim"
                    opt.step()
    return Count(model, mode, backend, config, list(counter.entries.values()))


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def _gb(b: int) -> str:
    return f"{b / 1e9:.2f}"


def format_counts(counts: List[Count]) -> str:
    """Per-layer launches / GB for each backend, then totals (counted, not timed)."""
    c0 = counts[0]
    cfg = c0.config
    lines = [f"{c0.model} {c0.mode}, batch {cfg['batch']}, {cfg['image_size']}x{cfg['image_size']}, {cfg['dtype']}, "
             f"{cfg['layout']}: kernel launches / HBM GB per step, COUNTED on the meta device (not timed)"]
    layers: List[str] = []
    for c in counts:
        for k in c.by_layer():
            if k not in layers:
                layers.append(k)
    head = "| layer | " + " | ".join(c.backend for c in counts) + " |"
    lines += ["", head, "|---|" + "---|" * len(counts)]
    tables = [c.by_layer() for c in counts]
    for k in layers:
        cells = [f"{t[k][0]} / {_gb(t[k][1])}" if k in t else "-" for t in tables]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + " | ".join(f"**{c.launches} / {_gb(c.bytes)}**" for c in counts) + " |")
    return "\n".join(lines)


def format_ops(c: Count) -> str:
    """One backend's step by phase and op (summed over layers): calls, launches, GB."""
    rows: "OrderedDict[Tuple[str, str, str], List[int]]" = OrderedDict()
    for e in c.entries:
        v = rows.setdefault((e.phase, e.op, e.impl), [0, 0, 0])
        v[0] += e.calls
        v[1] += e.launches
        v[2] += e.bytes
    lines = [f"{c.backend}: per op (all layers), counted", "", "| phase | op | implementation | calls | launches | GB |",
             "|---|---|---|---|---|---|"]
    for (phase, op, impl), (calls, launches, b) in sorted(rows.items(), key=lambda kv: (kv[0][0], -kv[1][1])):
        lines.append(f"| {phase} | {op} | {impl} | {calls} | {launches} | {_gb(b)} |")
    return "\n".join(lines)


def to_json(counts: List[Count]) -> str:
    return json.dumps({"schema": "resnet-kernels-count/1", "counted": "meta device, not timed",
                       "results": [c.to_dict() for c in counts]}, indent=1)


__all__ = ["count_step", "count_backends", "Count", "Entry", "Counter", "aten_cost", "counted_impl",
           "format_counts", "format_ops", "to_json"]
