"""``torch.jit.script`` support: none, with a message that says what to do instead.

The fused modules' forward passes call Python helpers and ``torch.library`` custom ops with
Python-side argument checks, which TorchScript cannot compile (it would fail with an unrelated
message such as ``Unknown type annotation: 'bool' at``). ``torch.jit.script`` calls
``__prepare_scriptable__`` on every module before compiling it; the fused modules use
:func:`no_script` there to raise a clear error first.
"""

from __future__ import annotations

ALTERNATIVES = ("torch.compile(model), torch.export.export(model, (x,)) or torch.jit.trace(model, x) "
                "work on fused models")


def no_script(self):
    name = type(self).__name__
    orig = self.__dict__.get("_rk_orig_class")
    if orig is not None:
        undo = (f"or call resnet_kernels.unfuse(model) first to get torchvision's scriptable "
                f"{orig.__name__} back")
    else:
        undo = ("or build the torchvision model instead (same state_dict keys: "
                "load this model's state_dict into it)")
    raise RuntimeError(
        f"torch.jit.script cannot compile resnet_kernels' {name}: its forward calls the fused "
        f"torch.library ops through Python code that TorchScript does not support. {ALTERNATIVES}; {undo}.")
