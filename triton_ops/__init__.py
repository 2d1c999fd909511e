"""Triton kernels, one file per fused op (kernel + launcher). Installed as
``resnet_kernels.triton_ops``; imported lazily by the triton backend, never at package import.

``TRITON_INTERPRET=1`` (set before this package is imported) runs them on the CPU with the
Triton interpreter: then a single autotune config is used and tensor-core dots are done in fp32
(the interpreter computes bf16 ``tl.dot`` wrongly)."""
