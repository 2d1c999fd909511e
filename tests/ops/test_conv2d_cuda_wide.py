"""The 128 x 128 tile with 128-byte K tiles (csrc/conv2d.cu, ``TileCfg<128, 128, ST>``): fp16/bf16
channels_last (the vector path), Cout >= 128, Cin % 64 == 0, K = KH*KW*Cin >= 256 (4 K tiles),
ST = 4 stages (128 KiB of dynamic shared memory) where the device's opt-in shared memory per block
holds them, 3 (96 KiB) where only those fit, else the 64-byte-K 128 x 128 tile (48 KiB static).

Without a GPU the host runner poses as each kind of device (``HostRunner.configure_device``: an
A100's 163 KiB opt-in, an sm_86/89's 99 KiB, and a made-up 64 KiB part), and for every shape and
epilogue the three configurations must give

* the same output and batch statistics bit for bit: every accumulator sees the same mma.sync
  (m16n8k16) sequence in the same K order, only grouped into K tiles of 64 instead of 32 elements;
* an output within test_conv2d_cuda's tolerance of the float64 reference (2 x PyTorch's own error
  in the dtype + half an ulp of the dtype relative to max |ref|).

The launch log (``HostRunner.take_launches``) shows which kernel ran. With a GPU the parity test
runs on the real device's choice.
"""

import pytest
import torch
import torch.nn.functional as F

import rk_testing

from resnet_kernels import _alloc, testing
from resnet_kernels.backends.cuda_conv2d import conv2d_forward

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# (N, Cin, H, W, Cout, k, stride, pad): N = 1 with H = W = 7 (one partial m tile), stride 2 with
# a partial n tile (Cout = 136), 1x1 with the fewest K tiles it takes (4: the 4-stage pipeline's
# prologue holds 3 of them) and 5, and 9 m tiles (a full band of 8 of the grouped CTA order and one
# more) x 2 n tiles
SHAPES = {
    "3x3_n1_7x7": (1, 64, 7, 7, 128, 3, 1, 1),
    "3x3s2_cout136": (2, 64, 13, 11, 136, 3, 2, 1),
    "1x1s2_four_ktiles": (2, 256, 9, 9, 256, 1, 2, 0),
    "1x1_five_ktiles": (3, 320, 9, 9, 128, 1, 1, 0),
    "1x1_nine_mtiles": (2, 256, 24, 24, 256, 1, 1, 0),
}
EPILOGUES = {
    "stats": dict(scale=False, bias=False, residual=False, relu=False, stats=True),
    "bn_add_relu": dict(scale=True, bias=True, residual=True, relu=True, stats=False),
}
# the devices the host runner poses as -> the kernel the launcher must pick (its launch expression)
DEVICES = {
    "sm80_163k": ((8, 0, 163 * 1024), "128, false, 128, 4>"),
    "sm86_99k": ((8, 6, 99 * 1024), "128, false, 128, 3>"),
    "small_64k": ((8, 0, 64 * 1024), "conv2d_igemm_kernel<T, MATH, true, 128>"),
}
_U = testing.UNIT_ROUNDOFF
_CL = torch.channels_last


def _make(shape, dtype, epi, dev, seed=0):
    N, Cin, H, W, Cout, k, s, p = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, Cin, H, W, generator=g).to(dtype).to(dev).contiguous(memory_format=_CL)
    w = (torch.randn(Cout, Cin, k, k, generator=g) / (Cin * k * k) ** 0.5).to(dtype).to(dev)
    OH, OW = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    scale = (torch.rand(Cout, generator=g) + 0.5).to(dev) if epi["scale"] else None
    bias = torch.randn(Cout, generator=g).to(dev) if epi["bias"] else None
    res = (torch.randn(N, Cout, OH, OW, generator=g).to(dtype).to(dev).contiguous(memory_format=_CL)
           if epi["residual"] else None)
    return x, w, scale, bias, res, (s, s), (p, p), (N, Cout, OH, OW)


def _run(x, w, scale, bias, res, stride, pad, oshape, epi):
    out = _alloc._fill(torch.empty(oshape, dtype=x.dtype, device=x.device, memory_format=_CL))
    stats = conv2d_forward(x, w, scale, bias, res, out, stride, pad, epi["relu"], epi["stats"], False)
    if x.is_cuda:
        torch.cuda.synchronize()
    return out, stats


def _check_parity(out, stats, x, w, scale, bias, res, stride, pad, epi):
    y64 = F.conv2d(x.double(), w.double(), None, stride, pad)
    ref = rk_testing.epilogue64(y64, scale, bias, res, epi["relu"])
    mine = F.conv2d(x.float().cpu(), w.float().cpu(), None, stride, pad).to(x.dtype).double()  # PyTorch's own
    theirs = rk_testing.epilogue64(mine.to(ref.device), scale, bias, res, epi["relu"]).to(x.dtype).double()
    tol = 2 * (theirs - ref).abs().max().item() + _U[x.dtype] * ref.abs().max().item()
    assert not out.isnan().any(), "unwritten (NaN-poisoned) output elements"
    err = (out.double() - ref).abs().max().item()
    assert err <= tol, f"max error {err:.3g} > tol {tol:.3g}"
    if epi["stats"]:  # test_conv2d_cuda's rule: 2 x torch.var_mean's error on PyTorch's conv + floor
        mean, var = stats
        rvar, rmean = torch.var_mean(y64, dim=(0, 2, 3), correction=0)
        tvar, tmean = torch.var_mean(mine.float(), dim=(0, 2, 3), correction=0)
        ymax = y64.abs().max().item()
        tol_m = 2 * (tmean.double().to(rmean.device) - rmean).abs().max().item() + _U[x.dtype] * ymax
        tol_v = 2 * (tvar.double().to(rvar.device) - rvar).abs().max().item() + _U[x.dtype] * ymax ** 2
        assert (mean.double() - rmean).abs().max().item() <= tol_m
        assert (var.double() - rvar).abs().max().item() <= tol_v


@pytest.fixture
def runner(host_runner_module):
    """The host runner's module; its device reset to the default afterwards."""
    yield host_runner_module
    host_runner_module.configure_device(*host_runner_module.DEFAULT_DEVICE)
    host_runner_module.take_launches()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("epi", list(EPILOGUES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_wide128_parity_and_bitwise_across_devices(shape, epi, dtype, runner, cuda_target):
    e = EPILOGUES[epi]
    args = _make(shape, DTYPES[dtype], e, cuda_target)
    x, w, scale, bias, res, stride, pad, oshape = args
    results = {}
    for name, (device, kernel) in DEVICES.items():
        runner.configure_device(*device)
        runner.take_launches()
        results[name] = _run(x, w, scale, bias, res, stride, pad, oshape, e)
        launched = runner.take_launches()
        assert len([k for k in launched if "conv2d_igemm_kernel" in k]) == 1, launched
        assert any(k.endswith(kernel) for k in launched), f"{name}: expected {kernel}, launched {launched}"
    out, stats = results["sm80_163k"]
    _check_parity(out, stats, x, w, scale, bias, res, stride, pad, e)
    for name, (o, s) in results.items():
        assert torch.equal(o, out), f"{name}: output differs from the 4-stage tile's"
        if e["stats"]:
            assert torch.equal(s[0], stats[0]) and torch.equal(s[1], stats[1]), f"{name}: statistics differ"


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_wide128_parity_on_this_device(dtype, cuda_target):
    """Whatever configuration the device in use selects (on the host runner: the default A100)."""
    for shape in ("3x3_n1_7x7", "3x3s2_cout136"):
        for e in EPILOGUES.values():
            x, w, scale, bias, res, stride, pad, oshape = _make(shape, DTYPES[dtype], e, cuda_target, seed=1)
            out, stats = _run(x, w, scale, bias, res, stride, pad, oshape, e)
            _check_parity(out, stats, x, w, scale, bias, res, stride, pad, e)


@pytest.mark.parametrize("case, kernel", [
    (dict(Cin=64, Cout=128, k=3), "128, false, 128, 4>"),
    (dict(Cin=256, Cout=128, k=1), "128, false, 128, 4>"),  # K = 256: 4 K tiles
    # Cin % 64 != 0: the 64-byte-K 128 x 128 tile
    (dict(Cin=96, Cout=128, k=3), "conv2d_igemm_kernel<T, MATH, true, 128>"),
    # K < 256 (1x1 on 64 / 192 channels): the 64-byte-K 128 x 128 tile (2 CTAs per SM)
    (dict(Cin=64, Cout=256, k=1), "conv2d_igemm_kernel<T, MATH, true, 128>"),
    (dict(Cin=192, Cout=128, k=1), "conv2d_igemm_kernel<T, MATH, true, 128>"),
    # Cout < 128: the 128 x 64 tile
    (dict(Cin=64, Cout=64, k=3), "conv2d_igemm_kernel<T, MATH, true, 64>"),
    # NCHW x: the generic gather path, 128 x 64
    (dict(Cin=64, Cout=128, k=3, nchw=True), "conv2d_igemm_kernel<T, MATH, false, 64>"),
    # fp32: the 128 x 64 tile
    (dict(Cin=64, Cout=128, k=3, dtype=torch.float32), "conv2d_igemm_kernel<T, MATH, true, 64>"),
])
def test_wide128_selection(case, kernel, runner, cuda_target):
    dtype, k = case.get("dtype", torch.bfloat16), case["k"]
    fmt = torch.contiguous_format if case.get("nchw") else _CL
    x = torch.randn(1, case["Cin"], 5, 5).to(dtype).contiguous(memory_format=fmt)
    w = (torch.randn(case["Cout"], case["Cin"], k, k) / (8 * k)).to(dtype)
    out = _alloc._fill(torch.empty(1, case["Cout"], 5, 5, dtype=dtype, memory_format=fmt))
    runner.take_launches()
    conv2d_forward(x, w, None, None, None, out, (1, 1), (k // 2, k // 2), False, False, False)
    launched = runner.take_launches()
    assert any(n.endswith(kernel) for n in launched), f"expected {kernel}, launched {launched}"
    ref = F.conv2d(x.double(), w.double(), None, 1, k // 2)
    floor = 2 ** 6 * _U[dtype] if dtype == torch.float32 else 4 * _U[dtype]  # 3xTF32: test_conv2d_cuda's
    assert (out.double() - ref).abs().max().item() <= floor * ref.abs().max().item()


def test_operand_prologue_keeps_the_128x64_tile(runner, cuda_target):
    """The BN + ReLU operand prologue (PRO) runs on the 128 x 64 tile only, also where the shape
    would take the 128-byte-K tile (its per-channel table needs the shared memory)."""
    x = torch.randn(1, 64, 5, 5).to(torch.bfloat16).contiguous(memory_format=_CL)
    w = (torch.randn(128, 64, 3, 3) / 24).to(torch.bfloat16)
    out = _alloc._fill(torch.empty(1, 128, 5, 5, dtype=torch.bfloat16, memory_format=_CL))
    bn = (torch.randn(64), torch.rand(64) + 0.5, torch.rand(64) + 0.5, torch.randn(64), 1e-5)
    runner.take_launches()
    conv2d_forward(x, w, None, None, None, out, (1, 1), (1, 1), False, True, False, prologue=bn)
    launched = runner.take_launches()
    assert any(k.endswith("conv2d_igemm_kernel<T, MATH, true, 64, true>") for k in launched), launched
    assert not out.isnan().any()
