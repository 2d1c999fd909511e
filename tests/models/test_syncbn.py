"""Fused nn.SyncBatchNorm (resnet_kernels/nn/_sync.py).

Multi-process (gloo, 3 CPU processes on 127.0.0.1, bounded time; see sync_worker.py): a small
ResNet (torchvision blocks: Conv(bias)+BN+ReLU stem, a downsampling block whose projection BN is
applied in the same pass, an identity block with a momentum=None BN and an affine=False BN) is
fused, converted with ``nn.SyncBatchNorm.convert_sync_batchnorm`` (after ``fuse`` for DDP, before
it for FSDP2) and trained 3 SGD+momentum steps in float64, every rank on its slice of each global
batch (unequal slices, a rank with 0 samples in every step, on a different rank each step). The
reference is what nn.SyncBatchNorm computes by definition (it refuses CPU tensors, so it cannot
run here): one process running the plain model with nn.BatchNorm2d over the union of the slices.
Per step the ranks' outputs (concatenated), every parameter gradient (after the wrapper's
reduction) and, at the end, every parameter and buffer (running statistics with the global
count, num_batches_tracked) and an eval forward must match it to float64 rounding. And
``torch.compile(DDP(model), backend='aot_eager')`` (2 steps, unequal slices, an empty rank) equals
eager DDP.

Also: one forward issues exactly one all_gather of 2C+2 numbers per SyncBatchNorm (never
activations), one backward one all_reduce of 2C numbers per SyncBatchNorm, eval none; a step with
no sample on any rank raises ValueError on every rank and changes no state. Single process:
``fuse`` accepts SyncBatchNorm, and without torch.distributed (or with a world of 1) the fused
SyncBatchNorm is plain BatchNorm, as nn.SyncBatchNorm falls back to F.batch_norm.

GPU (NCCL, >= 2 GPUs): the same training under DDP against torch's own nn.SyncBatchNorm (skipped
without 2 GPUs).
"""

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import resnet_kernels as rk
from resnet_kernels.models import resnet as rk_resnet
import sync_worker as sw

WORLD = 3
TOL = dict(rtol=1e-9, atol=1e-11)  # float64: both sides differ only in summation order


def _run_worker(tmp_path, mode, world):
    model = sw.build_model()
    data = sw.make_data(world)
    data["state"] = model.state_dict()
    inp = tmp_path / "in.pt"
    torch.save(data, inp)
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sync_worker.py")
    proc = subprocess.run([sys.executable, worker, str(inp), str(tmp_path), mode, str(world)], capture_output=True,
                          text=True, timeout=200, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return data, [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def _reference(data):
    """Plain nn.BatchNorm2d model, one process, the union of the ranks' slices (float64)."""
    model = sw.build_model().double()
    model.load_state_dict(data["state"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    outs, grads = [], []
    for st in data["steps"]:
        opt.zero_grad()
        out = model(st["x"])
        (out * st["w"]).sum().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        opt.step()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        ev = model(data["x_eval"])
    return {"outs": outs, "grads": grads, "state": state, "eval": ev}


def _compare(tag, ranks, ref, data, tol):
    for step, st in enumerate(data["steps"]):
        out = torch.cat([r["outs"][step] for r in ranks])
        torch.testing.assert_close(out, ref["outs"][step], **tol, msg=lambda m: f"{tag} step {step} output: {m}")
        for rank, r in enumerate(ranks):
            assert r["outs"][step].shape[0] == st["sizes"][rank]
            assert r["grads"][step].keys() == ref["grads"][step].keys()
            for n, g in ref["grads"][step].items():
                torch.testing.assert_close(r["grads"][step][n], g, **tol,
                                           msg=lambda m: f"{tag} step {step} rank {rank} grad {n}: {m}")
    for rank, r in enumerate(ranks):
        assert list(r["state"]) == list(ref["state"])
        for k, v in ref["state"].items():
            if k.endswith("num_batches_tracked"):
                assert torch.equal(r["state"][k], v), f"{tag} rank {rank} {k}"
            else:
                torch.testing.assert_close(r["state"][k], v, **tol, msg=lambda m: f"{tag} rank {rank} final {k}: {m}")
    torch.testing.assert_close(torch.cat([r["eval"] for r in ranks]), ref["eval"], **tol,
                               msg=lambda m: f"{tag} eval output: {m}")


def test_fused_syncbn_gloo_ddp_fsdp2_match_batchnorm_over_the_union(tmp_path):
    data, ranks = _run_worker(tmp_path, "gloo", WORLD)
    ref = _reference(data)
    _compare("DDP", [r["ddp"] for r in ranks], ref, data, TOL)
    _compare("FSDP2", [r["fsdp"] for r in ranks], ref, data, TOL)
    # torch.compile(DDP(model)) (aot_eager: the same ops, traced, the sync ops opaque) == eager DDP
    eager = [r["compile"]["eager"] for r in ranks]
    _compare("compile", [r["compile"]["compiled"] for r in ranks], {
        "outs": [torch.cat([r["outs"][s] for r in eager]) for s in range(len(data["compile"]["steps"]))],
        "grads": eager[0]["grads"], "state": eager[0]["state"], "eval": torch.cat([r["eval"] for r in eager])},
        data["compile"], TOL)

    # one all_gather of [mean, var, count_hi, count_lo] per SyncBatchNorm forward, one all_reduce
    # of [d mean, d var] per backward, nothing in eval; no other collective
    widths = [4, 8, 8, 8, 8, 8]  # stem, block0 bn1, bn2, downsample, block1 bn1, bn2 (forward order)
    for rank, r in enumerate(ranks):
        c = r["counts"]
        assert sorted(c["forward"]) == sorted(("all_gather", 2 * w + 2) for w in widths), (rank, c)
        assert sorted(c["backward"]) == sorted(("all_reduce", 2 * w) for w in widths), (rank, c)
        assert c["eval"] == [], (rank, c)
        e = r["all_empty"]
        assert e["error"] is not None and "Expected more than 1 value per channel" in e["error"], (rank, e)
        assert e["unchanged"], rank


def _syncbn_models():
    model = sw.build_model().double()
    plain = copy.deepcopy(model)
    fused = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    rk.fuse(fused, backend="torch")
    return plain, fused


def _step_matches(plain, fused):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    for m in (plain, fused):
        m.zero_grad()
        (m(x) * torch.linspace(-1, 1, 20, dtype=torch.float64).reshape(4, 5)).sum().backward()
    for (n, p), (_, q) in zip(plain.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, **TOL, msg=lambda m: f"grad {n}: {m}")
    for (n, p), (_, q) in zip(plain.state_dict().items(), fused.state_dict().items()):
        torch.testing.assert_close(q, p, **TOL, msg=lambda m: f"{n}: {m}")
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        fused(x[:1, :, :1, :1])  # per-process statistics: plain BN's check applies


def test_fuse_accepts_syncbatchnorm_single_process_is_plain_batchnorm():
    import torch.distributed as dist

    assert not dist.is_initialized()
    plain, fused = _syncbn_models()
    assert type(fused.stem).__name__ == "FusedSequential"
    assert all(isinstance(b, (rk_resnet.BasicBlock, rk_resnet.Bottleneck)) for b in fused.layer)
    _step_matches(plain, fused)


def test_world_of_one_is_plain_batchnorm():
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        plain, fused = _syncbn_models()
        _step_matches(plain, fused)
        # the custom ops themselves (over a group of 1: the union is this process's batch)
        g = torch.Generator().manual_seed(7)
        mean = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
        var = torch.rand(5, generator=g, dtype=torch.float64).add(0.1).requires_grad_()
        name = dist.group.WORLD.group_name
        gm, gv, total = torch.ops.resnet_kernels.sync_batch_stats(mean, var, 2 ** 25 + 3, name)
        torch.testing.assert_close(gm, mean.detach(), rtol=1e-15, atol=0)
        torch.testing.assert_close(gv, var.detach(), rtol=1e-15, atol=0)
        assert total.dtype == torch.float64 and total.item() == 2 ** 25 + 3  # exact past 2**24
        torch.library.opcheck(torch.ops.resnet_kernels.sync_batch_stats.default, (mean, var, 12, name))
        assert torch.autograd.gradcheck(lambda m, v: torch.ops.resnet_kernels.sync_batch_stats(m, v, 12, name)[:2],
                                        (mean, var))
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            torch.ops.resnet_kernels.sync_batch_stats(mean, var, 1, name)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("how", ["norm_layer", "convert_after_build"])
def test_fused_resnet18_with_syncbatchnorm_runs_every_unit_fused(monkeypatch, how):
    """norm_layer=nn.SyncBatchNorm, or convert_sync_batchnorm on a built (fused) resnet18: the
    blocks hold the norm modules as children (which the conversion replaces) and check them on
    every forward, so every unit runs fused; single process: plain BatchNorm semantics."""
    import torchvision
    from rk_models_testing import check, check_state, count_calls, fwd_bwd
    from resnet_kernels.models import resnet as rk_resnet

    counts = count_calls(monkeypatch, rk_resnet)
    kw = dict(norm_layer=nn.SyncBatchNorm) if how == "norm_layer" else {}
    torch.manual_seed(5)
    tv = torchvision.models.resnet18(num_classes=10, **kw)
    ours = rk.models.resnet18(num_classes=10, backend="torch", **kw)
    ours.load_state_dict(tv.state_dict(), strict=True)
    if how != "norm_layer":
        tv = nn.SyncBatchNorm.convert_sync_batchnorm(tv)
        ours = nn.SyncBatchNorm.convert_sync_batchnorm(ours)
    assert type(ours.layer2[0].downsample[1]) is nn.SyncBatchNorm
    tv, ours = tv.double(), ours.double()
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    out_t, dx_t = fwd_bwd(tv, x)
    out_o, dx_o = fwd_bwd(ours, x)
    assert counts == {"conv_bn_act": 1 + 8, "conv_bn_add_act": 8}
    check("output", out_o, None, out_t, torch.float64)
    check("input grad", dx_o, None, dx_t, torch.float64)
    check_state(how, ours, None, tv, dtype=torch.float64)


def _gpus():
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.skipif(_gpus() < 2, reason="needs >= 2 CUDA devices (NCCL)")
def test_fused_syncbn_nccl_ddp_matches_torch_syncbatchnorm(tmp_path):
    world = 3 if _gpus() >= 3 else 2
    data, ranks = _run_worker(tmp_path, "nccl", world)
    # float64 (torch backend): to rounding; float32 on the GPU kernels (TF32 off): fp32 rounding
    # through 3 SGD steps of a small net
    for tag, tol in (("float64", TOL), ("float32", dict(rtol=1e-3, atol=1e-4))):
        plain = [r[tag]["plain"] for r in ranks]
        _compare(f"NCCL {tag}", [r[tag]["fused"] for r in ranks], {
            "outs": [torch.cat([r["outs"][s] for r in plain]) for s in range(len(data["steps"]))],
            "grads": plain[0]["grads"], "state": plain[0]["state"],
            "eval": torch.cat([r["eval"] for r in plain])}, data, tol)
