"""The host runner catches the bugs a GPU would show (and some it would hide): each test builds a
copy of csrc/ with one bug planted by an exact text substitution (tests/host_runner.py ``build(
patches=...)``) and runs the cuda launcher on CPU tensors through it.

* a cp.async.wait_group one group too shallow: the compute reads a stage whose copies are still
  in flight -> "in flight" race (on a GPU: stale data, now and then);
* the main loop's __syncthreads removed: a thread reads a tile chunk another thread's copy landed in
  the same barrier interval -> shared-memory race;
* a wrong ldmatrix fragment index (A chunk of the k-step): wrong products -> parity failure;
* an off-by-one at a partial M tile in the epilogue (m > M instead of m >= M): a store past the
  end of out -> "out-of-bounds global access" (on a GPU: silent corruption of a neighbour);
* the second barrier of bn_add_relu_backward's block_sum removed: a warp overwrites the shared
  partial another thread is still reading -> shared-memory race;
* the 128-byte-K 128 x 128 tile launched without its cudaFuncSetAttribute opt-in: 128 KiB of
  dynamic shared memory above the 48 KiB default -> the launch fails (on a GPU: "invalid argument");
* the same tile launched with 1 KiB less dynamic shared memory than it uses -> an access beyond the
  launch's dynamic shared memory (on a GPU: an illegal address, or another CTA's data).

The parity tests of the unmodified kernels on the runner are tests/ops/test_conv2d_cuda.py and
tests/ops/test_bn_add_relu_cuda.py (fixture ``cuda_target``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import host_runner
import rk_testing as rt
from resnet_kernels.backends import cuda_bn_add_relu, cuda_common, cuda_conv2d

pytestmark = pytest.mark.skipif(host_runner.compiler() is None, reason="no C++ compiler (g++) on PATH")

_variants: dict = {}


def _runner(bug):
    if bug not in _variants:
        _variants[bug] = host_runner.HostRunner(host_runner.build(patches=BUGS[bug]))
    return _variants[bug]


BUGS = {
    "shallow_wait": {"conv2d.cu": [("    cp_async_wait<C::STAGES - 2>();\n", "    cp_async_wait<C::STAGES - 1>();\n")]},
    "missing_barrier": {"conv2d.cu": [(
        "    __syncthreads();  // tile kt visible to all; everyone is done with the stage refilled below\n", "")]},
    "fragment_index": {"conv2d_layout.h": [(
        "RK_HD int a_ldsm_chunk(int lane, int ks) { return ks * 2 + (lane >> 4); }",
        "RK_HD int a_ldsm_chunk(int lane, int ks) { return ks * 2 + ((lane >> 3) & 1); }")]},
    "partial_tile": {"conv2d.cu": [("      if (m >= p.M) continue;\n", "      if (m > p.M) continue;\n")]},
    "wide_no_opt_in": {"conv2d.cu": [(
        "    opt_in_dynamic_smem(conv2d_igemm_kernel<T, kMma16, true, 128, false, 128, 4>, dev, Wide128<4>::SMEM_BYTES,\n"
        "                        opted);\n", "")]},
    "wide_short_smem": {"conv2d.cu": [("Wide128<4>::THREADS, Wide128<4>::SMEM_BYTES,",
                                       "Wide128<4>::THREADS, Wide128<4>::SMEM_BYTES - 1024,")]},
    "bn_block_sum_barrier": {"bn_add_relu_impl.cuh": [(
        "    for (int w = 0; w < kThreads / 32; ++w) t += sm[w];\n  }\n  __syncthreads();\n",
        "    for (int w = 0; w < kThreads / 32; ++w) t += sm[w];\n  }\n")]},
}


def _conv(runner, dtype=torch.bfloat16, layout="channels_last", N=2, Cin=16, H=9, W=11, Cout=24):
    """A 3x3 s1 p1 conv (M = N*H*W = 198: one full and one partial M tile), statistics on."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(N, Cin, H, W).to(dtype).contiguous(memory_format=fmt)
    w = (torch.randn(Cout, Cin, 3, 3) / 12).to(dtype)
    out = torch.full((N, Cout, H, W), float("nan"), dtype=dtype).contiguous(memory_format=fmt)
    with cuda_common.host_runner(runner):
        cuda_conv2d.conv2d_forward(x, w, None, None, None, out, (1, 1), (1, 1), False, True, False)
    ref = F.conv2d(x.double(), w.double(), None, 1, 1)
    return (out.double() - ref).abs().max().item() / ref.abs().max().item()


def test_unmodified_kernels_run_clean(host_runner_module):
    assert _conv(host_runner_module) < 2 ** -7  # one bf16 rounding
    assert _conv(host_runner_module, Cin=64, Cout=128) < 2 ** -7  # the 128-byte-K 128 x 128 tile
    assert _conv(host_runner_module, torch.float32, "nchw") < 2 ** -18  # 3xTF32, generic gather path


@pytest.mark.parametrize("bug, match", [
    ("shallow_wait", r"shared-memory race: ldmatrix row read .* cp.async targeting it is in flight"),
    ("missing_barrier", r"shared-memory race: ldmatrix row read .* wrote it in the same barrier interval"),
    ("partial_tile", r"out-of-bounds global access: write"),
])
def test_conv_pipeline_and_tile_bugs_are_reported(bug, match):
    with pytest.raises(RuntimeError, match=match) as info:
        _conv(_runner(bug))
    assert "conv2d_igemm_kernel" in str(info.value)


@pytest.mark.parametrize("bug, match", [
    ("wide_no_opt_in", r"131072 bytes of dynamic shared memory: above the kernel's "
                       r"cudaFuncAttributeMaxDynamicSharedMemorySize \(49152\)"),
    ("wide_short_smem", r"of dynamic shared memory \[\d+, \d+\) by .*: beyond the launch's 130048 bytes"),
])
def test_dynamic_shared_memory_bugs_are_reported(bug, match):
    with pytest.raises(RuntimeError, match=match) as info:
        _conv(_runner(bug), Cin=64, Cout=128)
    assert "conv2d_igemm_kernel<T, kMma16, true, 128, false, 128, 4>" in str(info.value)


def test_wrong_fragment_index_fails_parity(host_runner_module):
    assert _conv(host_runner_module) < 2 ** -7
    err = _conv(_runner("fragment_index"))
    assert err > 0.05, f"a wrong ldmatrix chunk index gave relative error {err:.3g} only"


def test_bn_backward_missing_barrier_is_reported():
    """grad_shift and grad_scale: two block_sum calls per block, the second one's shared writes
    race with the first one's reads once the barrier between them is gone."""
    shape, C = (2, 8, 4, 4), 8
    g, x = torch.randn(shape), torch.randn(shape)

    def run(runner):
        grad_scale, grad_shift = torch.full((C,), float("nan")), torch.full((C,), float("nan"))
        with cuda_common.host_runner(runner):
            cuda_bn_add_relu.bn_add_relu_backward(g, None, x, None, None, None, None, None, grad_scale, grad_shift,
                                                  None, False, C, 16)
        return grad_scale, grad_shift

    with pytest.raises(RuntimeError, match=r"shared-memory race: .* in the same barrier interval") as info:
        run(_runner("bn_block_sum_barrier"))
    assert "bn_add_relu_bwd_nchw_kernel" in str(info.value)
    grad_scale, grad_shift = run(_runner(None))  # the unmodified source is right
    torch.testing.assert_close(grad_shift, g.sum((0, 2, 3)), **rt.REDUCTION_TOL[torch.float32])
    torch.testing.assert_close(grad_scale, (g * x).sum((0, 2, 3)), **rt.REDUCTION_TOL[torch.float32])


BUGS[None] = {}
