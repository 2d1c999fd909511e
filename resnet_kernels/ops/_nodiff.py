"""Ops that compute part of a fused function's forward or backward (the training block,
resnet_kernels/_block.py) and have no derivative of their own: their autograd formula raises."""

from __future__ import annotations


def register_not_differentiable(op, message: str) -> None:
    """Register on the ``torch.library`` op ``op`` an autograd formula that raises
    RuntimeError(message) when a gradient is asked of it."""

    def backward(ctx, *grads):
        raise RuntimeError(message)

    def setup_context(ctx, inputs, output):
        pass

    op.register_autograd(backward, setup_context=setup_context)
