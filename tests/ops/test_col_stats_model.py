"""A float32 torch model of the sm_90a training convolution's statistics epilogue
(csrc/sm90/col_stats_epilogue.hpp + csrc/col_stats_tile.cuh) and of its combine (csrc/nhwc_stats.cu:
nhwc_stats_finalize_kernel, float64), with the accuracy requirement of issue 9: |mean| = 100 x std,
as accurate as PyTorch's Welford-based BatchNorm. CPU only, no GPU and no _C needed.

The model follows the kernel's order: per 128-row CTA tile, two 64-row subtiles; per subtile and
column, four 16-row groups, each an exact two-pass (mean, then the sum of squared deviations) in
float32; groups combined ((g0 + g1) + (g2 + g3)) with Chan's formula in float32, then the two subtiles
(first, second); the tiles' (mean, M2) combined in float64. The negative control shows why the
plain alternative (float32 sum and sum of squares per CTA, as CUTLASS's Sm90RowReduction would
accumulate) is not enough: it misses the same tolerance by orders of magnitude.
The kernel code itself runs on the CPU in test_nhwc_stats.py (the host runner), with the same
tolerance; test_model_matches_host_runner ties the two together.
"""

from __future__ import annotations

import pytest
import torch

F32 = torch.float32


def _chan(na, ma, qa, nb, mb, qb):
    """rk::conv::chan_combine, elementwise, in the tensors' dtype (a = the lower rows)."""
    n = na + nb
    delta = mb - ma
    frac = torch.where(nb == 0, torch.zeros_like(nb), nb / torch.where(n == 0, torch.ones_like(n), n))
    m = torch.where(nb == 0, ma, ma + delta * frac)
    q = torch.where(nb == 0, qa, qa + qb + delta * delta * na * frac)
    return torch.where(nb == 0, na, n), m, q


def model_tile_partials(yr: torch.Tensor):
    """(M, C) float32 values (already rounded to the output dtype) -> per-128-row-tile (mean, M2)
    float32 (tiles, C), in the epilogue's order."""
    M, C = yr.shape
    tiles = (M + 127) // 128
    pad = torch.zeros(tiles * 128, C, dtype=F32)
    valid = torch.zeros(tiles * 128, C, dtype=torch.bool)
    pad[:M], valid[:M] = yr, True
    v = pad.view(tiles, 2, 4, 16, C)  # tile, subtile, row group, row, column
    ok = valid.view(tiles, 2, 4, 16, C)
    n = ok.sum(3).to(F32)
    s = torch.zeros(tiles, 2, 4, C, dtype=F32)
    for i in range(16):  # the kernel's summation order
        s = s + torch.where(ok[:, :, :, i], v[:, :, :, i], torch.zeros((), dtype=F32))
    mean = torch.where(n > 0, s / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(s))
    q = torch.zeros_like(s)
    for i in range(16):
        d = v[:, :, :, i] - mean
        q = q + torch.where(ok[:, :, :, i], d * d, torch.zeros((), dtype=F32))
    g = [(n[:, :, k], mean[:, :, k], q[:, :, k]) for k in range(4)]
    a = _chan(*g[0], *g[1])  # butterfly xor 8
    b = _chan(*g[2], *g[3])
    sub = _chan(*a, *b)  # butterfly xor 16
    tile = _chan(*(x[:, 0] for x in sub), *(x[:, 1] for x in sub))  # subtile 0, then 1
    return tile[1], tile[2]


def model_combine(part_mean, part_m2, M):
    """nhwc_stats_finalize_kernel's float64 combine (its order differs only in the tree; the
    accuracy is float64's)."""
    tiles = part_mean.shape[0]
    rows = torch.tensor([min(128, M - 128 * t) for t in range(tiles)], dtype=torch.float64)[:, None]
    pm, pq = part_mean.double(), part_m2.double()
    mean = (rows * pm).sum(0) / M
    m2 = pq.sum(0) + (rows * (pm - mean) ** 2).sum(0)
    return mean.float(), (m2 / M).float()


def _data(M, C, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    std = torch.rand(C, generator=g) + 0.1
    mu = 100 * std * torch.where(torch.rand(C, generator=g) < 0.5, -1.0, 1.0)  # |mean| = 100 x std
    return (mu + std * torch.randn(M, C, generator=g)).to(dtype).float()


def _check(mean, var, yr, what):
    rvar, rmean = torch.var_mean(yr.double(), dim=0, correction=0)
    tvar, tmean = torch.var_mean(yr, dim=0, correction=0)  # PyTorch's own float32 (Welford-class) error
    tol_m = 2 * (tmean.double() - rmean).abs() + 16 * 2.0**-24 * rmean.abs() + 1e-30
    tol_v = 2 * (tvar.double() - rvar).abs() + 2**-14 * rvar
    em, ev = (mean.double() - rmean).abs(), (var.double() - rvar).abs()
    return bool((em <= tol_m).all() and (ev <= tol_v).all()), f"{what}: max rel var error {(ev / rvar).max():.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("M, C", [(1, 8), (100, 8), (128, 32), (200, 40), (4096, 16), (12544, 8)])
def test_model_accuracy_at_mean_100_std(M, C, dtype):
    yr = _data(M, C, dtype, M + C)
    pm, pq = model_tile_partials(yr)
    mean, var = model_combine(pm, pq, M)
    ok, msg = _check(mean, var, yr, "epilogue model")
    assert ok, msg


def test_plain_float32_sums_are_not_enough():
    """The negative control: per-CTA float32 (sum, sum of squares), combined exactly, fails the
    bound the model passes (so the test above can tell). float16 data: with bfloat16 values at
    |mean| = 100 x std (8-bit significands, one binade) a 128-row float32 sum of squares happens to
    be exact (16-bit squares, 7 more bits of sum), so only float16 shows the cancellation here; the
    epilogue must be right for both."""
    M, C, dtype = 12544, 16, torch.float16
    yr = _data(M, C, dtype, 7)
    tiles = (M + 127) // 128
    pad = torch.zeros(tiles * 128, C)
    pad[:M] = yr
    s = pad.view(tiles, 128, C).sum(1, dtype=F32)
    sq = (pad * pad).view(tiles, 128, C).sum(1, dtype=F32)
    mean = s.double().sum(0) / M
    var = sq.double().sum(0) / M - mean * mean
    ok, msg = _check(mean.float(), var.float(), yr, "float32 sum/sumsq")
    assert not ok, "float32 sum / sum of squares passed the bound: the bound is too loose to tell"
    ok, msg = _check(*model_combine(*model_tile_partials(yr), M), yr, "model")
    assert ok, msg


def test_model_rows_outside_the_problem_are_ignored():
    yr = _data(130, 8, torch.bfloat16, 3)  # a second tile with 2 rows: subtile 1 of it empty
    pm, pq = model_tile_partials(yr)
    assert torch.allclose(pm[1].double(), yr[128:].double().mean(0), rtol=0, atol=1e-5 * yr.abs().max().item())
    assert torch.allclose(pq[1].double(), ((yr[128:].double() - yr[128:].double().mean(0)) ** 2).sum(0),
                          rtol=1e-5, atol=1e-3)


def test_model_matches_host_runner(cuda_target):
    """nhwc_stats_forward (csrc: the epilogue's col_stats_tile.cuh code + the combine kernel; on the
    host runner without a GPU) against this model on the same rounded values."""
    from resnet_kernels import _alloc
    from resnet_kernels.backends import cuda_common

    M, C, dtype = 300, 40, torch.bfloat16
    yr = _data(M, C, dtype, 11)
    dev = cuda_target
    yf = yr.to(dev)
    mod = cuda_common.C_module()
    mean = _alloc.empty((C,), dtype=torch.float32, device=dev)
    var = _alloc.empty((C,), dtype=torch.float32, device=dev)
    nbytes = mod.nhwc_stats_workspace_bytes(M=M, C=C)
    ws = _alloc.empty((nbytes // 4,), dtype=torch.float32, device=dev)
    p = cuda_common.ptr
    args = cuda_common.fill_args(mod.NhwcStatsArgs, dtype=cuda_common.DTYPE_CODES[dtype], yf=p(yf), y=0,
                                 mean=p(mean), var=p(var), workspace=p(ws), workspace_bytes=nbytes, M=M, C=C,
                                 stream=cuda_common.stream_of(yf) if yf.is_cuda else 0)
    cuda_common.call("nhwc_stats_forward", args)
    tiles = (M + 127) // 128
    part = ws.cpu()[: 2 * tiles * C].view(2, tiles, C)
    pm, pq = model_tile_partials(yr)
    assert torch.allclose(part[0], pm, rtol=2**-20, atol=0), (part[0] - pm).abs().max()
    assert torch.allclose(part[1], pq, rtol=2**-16, atol=1e-6), (part[1] - pq).abs().max()
    mm, mv = model_combine(pm, pq, M)
    assert torch.allclose(mean.cpu(), mm, rtol=2**-20) and torch.allclose(var.cpu(), mv, rtol=2**-16)
