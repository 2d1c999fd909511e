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


def pytest_collection_modifyitems(config, items):
    """Every GPU-only test (skipped with rk_testing.GPU_SKIP_REASON without a GPU) gets the ``gpu``
    marker: ``pytest -m gpu`` runs exactly them, ``-m "not gpu"`` the rest."""
    import rk_testing

    for item in items:
        if any(str(m.kwargs.get("reason", "")).startswith(rk_testing.GPU_SKIP_REASON)
               for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(autouse=True)
def _poison_outputs():
    with resnet_kernels.poison_outputs(True):
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def on_device():
    """For test modules whose tensors and modules are created without naming a device (the
    tests/conv_ref.py style): inside the test, factory calls and module constructors put them on
    ``rk_testing.DEVICE``, so with a GPU the cuda/triton backends run their real kernels (on CPU
    tensors with a GPU present they would raise BackendUnavailableError: no interpreter).

    With a GPU, cuDNN's TF32 is also switched off for the test (PyTorch's default is on): these
    modules compare float32 results with PyTorch's own float32 layers (the tests/conv_ref.py
    rule), and two different TF32 roundings do not compare (the Triton kernel's tf32 dot truncates
    its operands, biasing y by ~-2**-10 relative; cuDNN rounds them). The kernels follow the flag
    (3xTF32, fp32-accurate). The TF32 paths are tested at the launcher level
    (tests/ops/test_conv2d_cuda.py, tests/ops/test_conv2d_triton.py) with bounds made for them."""
    import rk_testing

    with rk_testing.cudnn_tf32(False), torch.device(rk_testing.DEVICE):
        yield


# --------------------------------------------------------------------------------------------
# The cuda backend without a GPU: the host runner (tests/host_runner.py, docs/DESIGN.md)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def host_runner_module():
    """csrc/'s kernels compiled for the CPU (built once per session, cached across sessions).
    Not built when a GPU is visible: the real kernels run then (and parallel test workers on a GPU
    machine would all compile it)."""
    import host_runner
    import rk_testing

    if rk_testing.HAS_GPU:
        pytest.skip("a GPU is visible: the cuda tests run the real kernels, the host runner is not built")
    if host_runner.compiler() is None:
        pytest.skip("no C++ compiler (g++) on PATH: the host runner cannot be built")
    return host_runner.HostRunner(host_runner.build())


@pytest.fixture
def cuda_target(request, monkeypatch):
    """The device the cuda backend's parity tests put their tensors on: "cuda" with a GPU (the
    real kernels); without one, "cpu" with the host runner swapped in for ``_C``
    (``cuda_common.host_runner``) and the cuda backend reported usable on CPU tensors, so the
    ops, the launchers and csrc's own kernel source all run."""
    import rk_testing

    if rk_testing.HAS_GPU:
        yield "cuda"
        return
    mod = request.getfixturevalue("host_runner_module")
    from resnet_kernels.backends import cuda_common

    # the registry's cuda availability reports CPU tensors usable while the runner is swapped in
    with cuda_common.host_runner(mod):
        yield "cpu"
