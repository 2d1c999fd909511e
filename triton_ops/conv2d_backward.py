"""The Triton implementation of ``conv2d_backward`` (resnet_kernels/ops/conv_backward.py; contract:
resnet_kernels/backends/torch_conv_backward.py): the wgrad kernel (``conv2d_wgrad.py``: the
BN-backward operand computed in its prologue, deterministic split-K) into grad_weight, then the
dgrad kernel (``conv2d_dgrad.py``: the same prologue; the residual-gradient sum, the upstream
unit's ReLU mask and per-channel partial sums in its epilogue, then the BN finalize kernel of
``batch_norm.py``) into grad_x and the upstream coefficients. The operand dy is never written.
With x None (recomputed from the upstream unit's up_y, see the contract) x is never written
either: the wgrad computes its B tile relu(up_y * s + t) in its load (``X_FROM_UP``), the dgrad
its upstream ReLU mask from the up_y it already reads (``UP_FROM_Y``).
"""

from __future__ import annotations

from .conv2d_dgrad import conv2d_dgrad
from .conv2d_wgrad import conv2d_wgrad


def conv2d_backward(g, mask, y, mean, coef, x, weight, grad_x, grad_weight, stride, padding, residual, res_mask, up_y,
                    up_mean, up_var, up_weight, up_eps, up_coef, up_grad_weight, up_grad_bias, allow_tf32, *,
                    up_bias=None) -> None:
    # x None: never materialised; the wgrad recomputes it from up_y in its B-operand load, the dgrad
    # its ReLU mask in the epilogue (which reads up_y for the upstream sums anyway)
    if grad_weight is not None:
        conv2d_wgrad(g, mask, y, mean, coef, x, grad_weight, stride, padding, allow_tf32,
                     up=None if x is not None else (up_y, up_mean, up_var, up_weight, up_bias, up_eps))
    if grad_x is not None:
        up = up_y is not None
        conv2d_dgrad(g, mask, y, mean, coef, weight, grad_x, stride, padding, residual, res_mask, x if up else None,
                     up_y, up_mean, up_var, up_weight, up_eps, up_coef, up_grad_weight, up_grad_bias, allow_tf32,
                     up_bias=up_bias)
