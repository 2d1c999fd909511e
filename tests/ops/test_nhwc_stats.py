"""The statistics kernels of csrc/nhwc_stats.cu (built for every architecture): per-channel (mean,
biased var) of a float32 (M, C) matrix ROUNDED to the output dtype, and that rounding. The tile
kernel reduces each 64 x 32 subtile with rk::colstats::subtile_column_stats (csrc/col_stats_tile.cuh),
the same code, order and rounding as the sm_90a training convolution's epilogue
(csrc/sm90/col_stats_epilogue.hpp), and the combine kernel is the one that convolution launches on
its epilogue's partials: so these tests, run on the host runner without a GPU (csrc's own source on
the CPU, the ``cuda_target`` fixture), check that epilogue's arithmetic.

Reference: torch.var_mean in float64 of the rounded values (what a BatchNorm after a bf16/fp16 conv
sees). Tolerance: 2x PyTorch's own float32 error plus 2**-14 of the variance itself (a float32 sum /
sum-of-squares reduction misses by ~1e-3 at |mean| = 100 x std, and statistics of the unrounded
values by ~1e-2 for bfloat16, so the bound is tight enough to tell), y bit-equal to torch's rounding.
"""

from __future__ import annotations

import pytest
import torch

from resnet_kernels import _alloc, testing
from resnet_kernels._ext import get_C
from resnet_kernels.backends import cuda_common

C_ = get_C()
_U32 = testing.UNIT_ROUNDOFF[torch.float32]
DTYPE_CODES = cuda_common.DTYPE_CODES


def _run(yf, y, dtype):
    M, C = yf.shape
    mod = cuda_common.C_module()
    mean = _alloc.empty((C,), dtype=torch.float32, device=yf.device)
    var = _alloc.empty((C,), dtype=torch.float32, device=yf.device)
    nbytes = mod.nhwc_stats_workspace_bytes(M=M, C=C)
    ws = _alloc.empty((max(nbytes // 4, 1),), dtype=torch.float32, device=yf.device)
    p = cuda_common.ptr
    args = cuda_common.fill_args(mod.NhwcStatsArgs, dtype=DTYPE_CODES[dtype], yf=p(yf), y=p(y), mean=p(mean),
                                 var=p(var), workspace=p(ws), workspace_bytes=nbytes, M=M, C=C,
                                 stream=cuda_common.stream_of(yf) if yf.is_cuda else 0)
    cuda_common.call("nhwc_stats_forward", args)
    if yf.is_cuda:
        torch.cuda.synchronize()
    return mean, var


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("M, C", [(1, 8), (127, 8), (128, 33), (129, 64), (300, 40), (1000, 8)])
def test_stats_match_float64(M, C, dtype, cuda_target):
    dev = cuda_target
    g = torch.Generator().manual_seed(M * 1000 + C)
    std = torch.rand(C, generator=g) + 0.1
    mu = (torch.randn(C, generator=g) * 100 * std)  # |mean| up to a few hundred x std
    mu[: C // 2] = 100 * std[: C // 2]  # and exactly 100 x std for half the channels
    yf = (mu + std * torch.randn(M, C, generator=g)).float().to(dev)
    y = _alloc.empty((M, C), dtype=dtype, device=dev)  # NaN-poisoned under the tests
    mean, var = _run(yf, y, dtype)
    assert torch.equal(y, yf.to(dtype)), "y must be yf rounded to nearest (even)"
    yr = yf.to(dtype).float()  # the statistics are of the rounded values
    rvar, rmean = torch.var_mean(yr.double(), dim=0, correction=0)
    tvar, tmean = torch.var_mean(yr, dim=0, correction=0)
    tol_m = 2 * (tmean.double() - rmean).abs() + 16 * _U32 * rmean.abs() + 1e-30
    assert ((mean.double() - rmean).abs() <= tol_m).all(), (mean.double() - rmean).abs().max()
    if M > 1:
        tol_v = 2 * (tvar.double() - rvar).abs() + 2**-14 * rvar
        err = (var.double() - rvar).abs()
        assert (err <= tol_v).all(), f"max relative var error {(err / rvar).max().item():.3g}"
    else:
        assert (var == 0).all()
    mean2, var2 = _run(yf, _alloc.empty((M, C), dtype=dtype, device=dev), dtype)
    assert torch.equal(mean, mean2) and torch.equal(var, var2), "not deterministic"


def test_stats_without_y_and_empty(cuda_target):
    dev = cuda_target
    yf = torch.randn(200, 16, device=dev)
    mean, var = _run(yf, None, torch.bfloat16)
    rvar, rmean = torch.var_mean(yf.bfloat16().double(), dim=0, correction=0)  # of the rounded values
    assert torch.allclose(mean.double(), rmean, atol=1e-6) and torch.allclose(var.double(), rvar, rtol=1e-5)
    empty = torch.empty(0, 16, device=dev)
    mean, var = _run(empty, None, torch.float32)
    assert mean.isnan().all() and var.isnan().all()


@pytest.fixture(params=["_C", "host"])
def api(request):
    if request.param == "_C":
        if C_ is None:
            pytest.skip("resnet_kernels._C is not built")
        return C_
    return request.getfixturevalue("host_runner_module")


@pytest.mark.parametrize("over, match", [
    (dict(dtype=3), "float64"),
    (dict(M=-1), "M"),
    (dict(C=-2), "C"),
    (dict(mean=0), "mean"),
    (dict(var=0), "var"),
    (dict(yf=0), "yf"),
    (dict(workspace=0), "workspace"),
    (dict(workspace_bytes=8), "workspace_bytes"),
    (dict(yf=4098), "aligned"),
])
def test_C_rejects_bad_arguments(over, match, api):
    a = dict(dtype=2, yf=4096, y=0, mean=8192, var=12288, workspace=16384, workspace_bytes=2 * 2 * 8 * 4, M=200,
             C=8, stream=0)
    a.update(over)
    with pytest.raises(ValueError, match=match):
        api.nhwc_stats_forward(cuda_common.fill_args(api.NhwcStatsArgs, **a))


def test_workspace_bytes(api):
    assert api.nhwc_stats_workspace_bytes(M=200, C=8) == 2 * 2 * 8 * 4  # 2 tiles of 128 rows, (mean, M2)
    assert api.nhwc_stats_workspace_bytes(M=0, C=8) == 0
    with pytest.raises(ValueError, match="M"):
        api.nhwc_stats_workspace_bytes(M=-1, C=8)
