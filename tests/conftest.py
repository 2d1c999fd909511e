"""Shared test setup (helpers live in rk_testing.py).

* Without a visible GPU the Triton kernels run under the Triton interpreter on CPU tensors:
  TRITON_INTERPRET=1 is set here, before anything imports the kernels (triton reads it when
  ``@triton.jit`` runs).
* Every output an op allocates is poisoned with NaN before the kernel runs (poison_outputs), so
  an element a kernel forgot to write fails the comparison.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import resnet_kernels  # noqa: E402


@pytest.fixture(autouse=True)
def _poison_outputs():
    with resnet_kernels.poison_outputs(True):
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
