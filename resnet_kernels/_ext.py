"""Loads the compiled CUDA extension ``resnet_kernels._C`` lazily and remembers why it failed.

Importing ``_C`` does not touch the GPU (the CUDA runtime initialises on the first kernel or
``runtime_info()`` call), but it is still only imported on first use.
"""

from __future__ import annotations

import functools
import importlib


@functools.lru_cache(maxsize=None)
def _load():
    try:
        mod = importlib.import_module("resnet_kernels._C")
        return mod, None
    except ImportError as exc:  # the reason is reported by info() and by backend errors
        msg = str(exc)
        if "No module named" in msg:
            msg = ("resnet_kernels._C is not installed: the package was built without a CUDA "
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
