"""Loads the compiled CUDA extension ``resnet_kernels._C`` lazily and remembers why it failed.

Importing ``_C`` does not touch the GPU (the CUDA runtime initialises on the first kernel or
``runtime_info()`` call), but it is still only imported on first use.
"""

from __future__ import annotations

import functools
import importlib
import sys
from pathlib import Path


def source_tree() -> str | None:
    """The repository root when this package was imported from a source checkout instead of an
    installation (``python -m ...`` or ``pytest`` run from the repository root put the current
    directory first on sys.path): the checkout has setup.py and csrc/ next to the package, and
    no ``triton_ops`` inside it (``pip install`` places triton_ops/ there)."""
    pkg = Path(__file__).resolve().parent
    root = pkg.parent
    if (root / "setup.py").is_file() and (root / "csrc").is_dir() and not (pkg / "triton_ops").is_dir():
        return str(root)
    return None


def source_tree_message(what: str) -> str | None:
    """Why ``what`` is missing when the package was imported from a source checkout, else None."""
    root = source_tree()
    if root is None:
        return None
    here = Path(__file__).resolve().parent
    installed = []
    for entry in sys.path:
        cand = Path(entry or ".").resolve() / "resnet_kernels"
        if (cand / "__init__.py").is_file() and cand != here and str(cand) not in installed:
            installed.append(str(cand))
    hint = (f"an installed copy is at {installed[0]}, " if installed else
            "install it first (pip install .), then run ")
    return (f"{what} is missing because resnet_kernels was imported from its source tree {root} (the "
            f"current directory or PYTHONPATH puts the checkout ahead of the installed package, and the "
            f"checkout holds no build): {hint}from another directory (e.g. cd /tmp) or with the checkout off "
            f"PYTHONPATH")


@functools.lru_cache(maxsize=None)
def _load():
    try:
        mod = importlib.import_module("resnet_kernels._C")
        return mod, None
    except ImportError as exc:  # the reason is reported by info() and by backend errors
        msg = str(exc)
        if "No module named" in msg:
            msg = source_tree_message("resnet_kernels._C") or (
                "resnet_kernels._C is not installed: the package was built without a CUDA "
                "compiler (nvcc) or with RESNET_KERNELS_SKIP_CUDA=1; reinstall with nvcc on PATH "
                "(RESNET_KERNELS_REQUIRE_CUDA=1 makes a missing compiler a build error)")
        else:
            msg = f"resnet_kernels._C failed to import: {msg}"
        return None, msg


def get_C():
    """The _C module, or None."""
    return _load()[0]


def C_error() -> str | None:
    """Why _C is unavailable, or None when it loaded."""
    return _load()[1]


def require_C():
    mod, err = _load()
    if mod is None:
        raise RuntimeError(err)
    return mod
