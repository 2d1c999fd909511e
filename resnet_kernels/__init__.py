"""resnet-kernels: fused CUDA and Triton kernels for ResNet training and inference.

Nothing here touches the GPU at import time.
"""

__version__ = "0.1.0"

from . import functional, nn, ops  # noqa: E402  (registers the torch.library ops)
from ._alloc import poison_outputs  # noqa: E402
from ._backend import (BACKENDS, BackendUnavailableError, backend_status, get_backend, set_backend,  # noqa: E402
                       use_backend)
from ._info import format_info, info  # noqa: E402
from .ops import add_relu, batch_norm_act, bn_add_relu, bn_running_update, conv2d_epilogue, conv2d_stats  # noqa: E402
from . import models  # noqa: E402  (drop-in ResNets; needs functional)
from .models import fuse, unfuse  # noqa: E402
from .tune import explain  # noqa: E402

__all__ = [
    "__version__", "functional", "nn", "ops", "info", "format_info", "set_backend", "get_backend", "use_backend",
    "backend_status", "BackendUnavailableError", "BACKENDS", "add_relu", "bn_add_relu", "conv2d_epilogue",
    "conv2d_stats", "poison_outputs",
    "models", "fuse", "unfuse", "explain",
]
