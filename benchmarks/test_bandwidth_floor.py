"""A pass/fail bandwidth floor (GPU only; moved here from the correctness suite, where a speed
assertion does not belong): the bn_add_relu forward with a projection shortcut reads x and
identity and writes out (3 tensors); its effective bandwidth must be >= 85% of a device copy's
(read 1 + write 1) on tensors at least twice the GPU's L2 (asserted: the 7x7 case used to be
51 MB, about an H100's 50 MB L2). Target: 90%.

    pytest benchmarks/test_bandwidth_floor.py -s        # prints the measured GB/s
"""

import pytest
import torch

import resnet_kernels as rk
import timing
from resnet_kernels.ops.bn_add_relu import bn_add_relu

pytestmark = [pytest.mark.gpu, timing.requires_gpu]
KERNEL_BACKENDS = ("triton", "cuda")


def _gpu_ms(fn, iters=20, reps=5):
    """Median over ``reps`` of the mean time of ``iters`` back-to-back calls (launch overhead
    hidden behind the queued kernels)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / iters)
    return sorted(times)[len(times) // 2]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", ["nchw-56x56-fp16", "channels_last-56x56-fp16", "nchw-7x7-fp16", "nchw-28x28-fp32"])
def test_forward_bandwidth_vs_copy(backend, case):
    ok, why = rk.backend_status(backend, "cuda")
    if not ok:
        pytest.skip(f"backend {backend} unavailable: {why}")
    layout, hw, dt = case.split("-")
    H = int(hw.split("x")[0])
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[dt]
    # 56x56 fp16 and 28x28 fp32: 103 MB; 7x7 fp16: 4096 x 512 -> 206 MB per tensor
    N, C = {56: (256, 64), 28: (256, 128), 7: (4096, 512)}[H]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(N, C, H, H, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
    nbytes = x.numel() * x.element_size()
    l2 = getattr(torch.cuda.get_device_properties(x.device), "L2_cache_size", 0)
    assert nbytes >= 2 * l2, f"{case}: {nbytes / 1e6:.0f} MB per tensor is not >= 2x the L2 ({l2 / 1e6:.0f} MB)"
    i = torch.randn_like(x)
    s, b, i_s, i_b = (torch.rand(C, device="cuda") for _ in range(4))
    dst = torch.empty_like(x)
    t_copy = _gpu_ms(lambda: dst.copy_(x))
    t_op = _gpu_ms(lambda: bn_add_relu(x, s, b, i, i_s, i_b, backend=backend))
    bw_copy = 2 * nbytes / t_copy / 1e6
    bw_op = 3 * nbytes / t_op / 1e6
    print(f"\n{backend} {case}: {bw_op:.0f} GB/s vs copy {bw_copy:.0f} GB/s ({bw_op / bw_copy:.1%})")
    assert bw_op >= 0.85 * bw_copy, f"{backend} {case}: {bw_op:.0f} GB/s is {bw_op / bw_copy:.1%} of copy"
