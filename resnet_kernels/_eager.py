"""The eager fast path of the ops: the same implementation and autograd formula, without the
``torch.library`` dispatch round trip.

Every op is defined once with ``torch.library.custom_op`` (schema, fake, autograd): that is what
torch.compile, export, fake tensors, FX, the accountant's dispatch mode and ``opcheck`` see. A
custom op call in plain eager mode, though, goes dispatcher -> Python autograd wrapper ->
dispatcher -> argument normalisation -> the function: about 2-5x the host time of the function
itself on small tensors (measured on this project's CPU machine: a ``batch_norm_act`` call with
autograd 500 us through the op, 250 us through an ``autograd.Function`` around the same code,
100 us for the code alone). ``Eager(op, setup_context, backward)`` calls the op's own function
directly — inside an ``autograd.Function`` built from the op's own ``setup_context``/``backward``
when a gradient is needed — whenever nothing but plain eager execution is active:

* no torch.compile/dynamo tracing, no TorchDispatchMode (fake tensors, the accountant, debug
  modes) or TorchFunctionMode (e.g. ``with torch.device(...)``), no functorch transform (vmap,
  grad), no profiler (so traces keep naming the ops);
* every tensor argument exactly a ``torch.Tensor``/``nn.Parameter`` (no subclass: FakeTensor,
  DTensor, FX proxies); the arguments scanned are the schema's tensor and tensor-list positions,
  found once per op (its other arguments are ints, floats, bools and strings).
Otherwise the op itself is called. Results, gradients and errors are the same code's either way;
``RESNET_KERNELS_EAGER_FASTPATH=0`` (read at import) always calls the op.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch
from torch import Tensor

_ENABLED = os.environ.get("RESNET_KERNELS_EAGER_FASTPATH", "1").strip().lower() not in ("0", "false", "off", "no")
_PLAIN = (Tensor, torch.nn.Parameter)


_C = torch._C
_compiler = torch.compiler
_profiler = torch.autograd.profiler


def _globally_plain() -> bool:
    """No compile tracing, dispatch/function mode, functorch transform or profiler is active."""
    return not (not _ENABLED or _compiler.is_compiling() or _C._len_torch_dispatch_stack()
                or _C._is_torch_function_mode_enabled() or _C._are_functorch_transforms_active()
                or _profiler._is_profiler_enabled)


def plain_eager(args) -> bool:
    """Whether nothing but plain eager execution sees a call with these arguments."""
    if not _globally_plain():
        return False
    for a in args:
        if isinstance(a, Tensor):
            if type(a) not in _PLAIN:
                return False
        elif isinstance(a, (list, tuple)):
            if any(isinstance(t, Tensor) and type(t) not in _PLAIN for t in a):
                return False
    return True


def _tensor_positions(op):
    """(positions of the schema's Tensor / Optional[Tensor] arguments, positions of its tensor-list
    arguments): the only arguments a tensor can legitimately be passed in."""
    single, lists = [], []
    opt_tensor = _C.OptionalType.ofTensor()
    tensor_list = _C.ListType.ofTensors()
    opt_list = _C.OptionalType(tensor_list)
    for i, a in enumerate(op._opoverload._schema.arguments):
        if a.type.isSubtypeOf(opt_tensor):
            single.append(i)
        elif a.type.isSubtypeOf(opt_list):
            lists.append(i)
    return tuple(single), tuple(lists)


class Eager:
    """Call ``op`` (a ``torch.library`` CustomOpDef) or, in plain eager mode, its function."""

    def __init__(self, op, setup_context: Optional[Callable] = None, backward: Optional[Callable] = None):
        self.op = op
        self.fn = op._init_fn
        self.function = None
        # only the schema's tensor arguments are scanned (per call: the others hold no tensors)
        self._single, self._lists = _tensor_positions(op)
        self._nargs = len(op._opoverload._schema.arguments)
        if backward is not None:
            fn = self.fn

            def forward(ctx, *args):
                # ctx-style forward (no separate setup_context: autograd would bind the arguments
                # to the function's signature with inspect on every call)
                out = fn(*args)
                setup_context(ctx, args, out)
                return out

            self.function = type(f"{op._name}_eager", (torch.autograd.Function,), {
                "forward": staticmethod(forward),
                "backward": staticmethod(backward),
            })
        self._apply = self.function.apply if self.function is not None else None

    def __call__(self, *args) -> Any:
        if not _globally_plain():
            return self.op(*args)
        if len(args) != self._nargs:  # (every caller passes the full schema; plain_eager's scan otherwise)
            if not plain_eager(args):
                return self.op(*args)
            if self._apply is not None and _grad_enabled() and \
                    any(isinstance(a, Tensor) and a.requires_grad for a in args):
                return self._apply(*args)
            return self.fn(*args)
        grad = False
        for i in self._single:
            a = args[i]
            if a is None:
                continue
            t = type(a)
            if t is Tensor or t is _Parameter:
                if not grad and a.requires_grad:
                    grad = True
            elif isinstance(a, Tensor):  # a subclass: FakeTensor, DTensor, FX proxies' tensors
                return self.op(*args)
        for i in self._lists:
            a = args[i]
            if isinstance(a, (list, tuple)) and any(isinstance(t, Tensor) and type(t) not in _PLAIN for t in a):
                return self.op(*args)
        if grad and self._apply is not None and _grad_enabled():
            return self._apply(*args)
        return self.fn(*args)


_Parameter = torch.nn.Parameter
_grad_enabled = torch.is_grad_enabled


__all__ = ["Eager", "plain_eager"]
