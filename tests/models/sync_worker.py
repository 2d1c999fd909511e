"""Fused nn.SyncBatchNorm across processes; run by test_syncbn.py as
``python sync_worker.py IN.pt OUT_DIR MODE WORLD``.

MODE 'gloo': WORLD CPU processes on 127.0.0.1, float64, the torch backend. Each rank trains the
fused tiny ResNet (below) with SyncBatchNorm on its slice of every global batch (unequal slices,
some empty) under DistributedDataParallel and under FSDP2 (``fully_shard``), trains under
``torch.compile(DDP(model), backend='aot_eager')`` next to eager, counts the collectives
of one forward/backward without a wrapper, and checks that an all-empty step fails on every rank
without changing any state. Every rank writes OUT_DIR/rank{r}.pt; test_syncbn.py compares them
with one process running plain nn.BatchNorm2d over the union of the slices.

MODE 'nccl' (GPU, WORLD <= cuda device count): the same steps under DDP on cuda:rank, fused
(float64 on the torch backend, and float32 on 'auto') next to the unfused model with torch's own
nn.SyncBatchNorm; both results are written for the test to compare.
"""

import os
import socket
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

DEADLINE_S = 150


def build_model() -> nn.Module:
    """A small ResNet-like net made of torchvision blocks: a Conv(bias)+BN+ReLU Sequential stem, a
    downsampling BasicBlock (1x1 projection + BN) and an identity BasicBlock whose second BN has
    no affine parameters, one BN with momentum=None (cumulative average), a linear head."""
    from torchvision.models.resnet import BasicBlock, conv1x1

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("stem", nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=True), nn.BatchNorm2d(4), nn.ReLU()))
    model.add_module("layer", nn.Sequential(
        BasicBlock(4, 8, stride=2, downsample=nn.Sequential(conv1x1(4, 8, 2), nn.BatchNorm2d(8))),
        BasicBlock(8, 8)))
    model.layer[1].bn2 = nn.BatchNorm2d(8, affine=False)
    model.layer[1].bn1.momentum = None
    model.add_module("head", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)))
    with torch.no_grad():  # non-trivial BN parameters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


N_SYNC_BN = 6


def make_data(world: int):
    """Global batches and, per step, the per-rank slice sizes (unequal, some ranks empty)."""
    g = torch.Generator().manual_seed(1)
    sizes = [[3, 0, 2], [1, 3, 2], [0, 2, 3]] if world == 3 else [[3, 0], [1, 4], [2, 3]]
    steps = []
    for s in sizes:
        n = sum(s)
        steps.append({"x": torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64),
                      "w": torch.linspace(-1, 1, n * 5, dtype=torch.float64).reshape(n, 5) * (1 + len(steps)),
                      "sizes": s})
    x_eval = torch.randn(sum(sizes[1]), 3, 8, 8, generator=g, dtype=torch.float64)
    # torch.compile: 2 steps, unequal slices with an empty rank
    csizes = [[2, 0, 3], [2, 2, 1]] if world == 3 else [[2, 0], [2, 3]]
    csteps = [{"x": torch.randn(sum(s), 3, 8, 8, generator=g, dtype=torch.float64),
               "w": torch.linspace(-1, 1, 5 * sum(s), dtype=torch.float64).reshape(sum(s), 5) * (i + 1),
               "sizes": s} for i, s in enumerate(csizes)]
    compiled = {"steps": csteps, "x_eval": torch.randn(sum(csizes[1]), 3, 8, 8, generator=g, dtype=torch.float64),
                "eval_sizes": csizes[1]}
    return {"steps": steps, "x_eval": x_eval, "eval_sizes": sizes[1], "compile": compiled}


def _slice(t, sizes, rank):
    lo = sum(sizes[:rank])
    return t[lo:lo + sizes[rank]]


def _full(t):
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t.clone()


def _fused_sync(state, backend, dtype, device, convert_first):
    import resnet_kernels as rk
    from resnet_kernels.models import resnet as rk_resnet

    model = build_model()
    model.load_state_dict(state)
    model = model.to(device=device, dtype=dtype)
    if convert_first:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        rk.fuse(model, backend=backend)
    else:
        rk.fuse(model, backend=backend)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert sum(type(m) is nn.SyncBatchNorm for m in model.modules()) == N_SYNC_BN
    assert type(model.stem).__name__ == "FusedSequential", type(model.stem)
    assert all(isinstance(b, (rk_resnet.BasicBlock, rk_resnet.Bottleneck)) for b in model.layer)
    return model


def train(model, wrapped, data, rank, device, dtype):
    world = dist.get_world_size()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    outs, grads = [], []
    for st in data["steps"]:
        xs = _slice(st["x"], st["sizes"], rank).to(device=device, dtype=dtype)
        ws = _slice(st["w"], st["sizes"], rank).to(device=device, dtype=dtype)
        opt.zero_grad()
        out = wrapped(xs)
        # the global loss is sum(out * w) over the union; the wrappers average gradients over ranks
        (out * ws).sum().mul(world).backward()
        outs.append(out.detach().cpu())
        grads.append({n: _full(p.grad).cpu() for n, p in model.named_parameters()})
        opt.step()
    state = {k: _full(v).cpu() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        ev = wrapped(_slice(data["x_eval"], data["eval_sizes"], rank).to(device=device, dtype=dtype)).cpu()
    return {"outs": outs, "grads": grads, "state": state, "eval": ev}


def _count_collectives(model, data, rank):
    """Collectives issued by one fused forward / backward / eval forward, no wrapper."""
    calls = []
    originals = {n: getattr(dist, n) for n in ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast")}

    def counting(name):
        def f(*a, **k):
            t = a[1] if name in ("all_gather", "all_gather_into_tensor") else a[0]
            calls.append((name, t.numel()))
            return originals[name](*a, **k)
        return f

    for n in originals:
        setattr(dist, n, counting(n))
    try:
        st = data["steps"][1]
        out = model(_slice(st["x"], st["sizes"], rank))
        fwd = list(calls)
        calls.clear()
        (out * _slice(st["w"], st["sizes"], rank)).sum().backward()
        bwd = list(calls)
        calls.clear()
        model.eval()
        with torch.no_grad():
            model(_slice(st["x"], st["sizes"], rank))
        ev = list(calls)
        model.train()
    finally:
        for n, f in originals.items():
            setattr(dist, n, f)
    return {"forward": fwd, "backward": bwd, "eval": ev}


def _all_empty_fails(model):
    """A step where every rank has 0 samples: ValueError on every rank, no buffer changed."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        model(torch.zeros(0, 3, 8, 8, dtype=torch.float64))
    except ValueError as e:
        msg = str(e)
    else:
        msg = None
    after = model.state_dict()
    return {"error": msg, "unchanged": all(torch.equal(before[k], after[k]) for k in before)}


def _worker(rank: int, world: int, port: int, inp: str, outdir: str, mode: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    backend = "gloo" if mode == "gloo" else "nccl"
    if mode == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    data = torch.load(inp)
    res = {}
    if mode == "gloo":
        from torch.distributed.fsdp import fully_shard

        dev, dt = torch.device("cpu"), torch.float64
        model = _fused_sync(data["state"], "torch", dt, dev, convert_first=False)
        res["counts"] = _count_collectives(model, data, rank)
        res["all_empty"] = _all_empty_fails(model)

        model = _fused_sync(data["state"], "torch", dt, dev, convert_first=False)
        # DDP refuses CPU modules containing SyncBatchNorm (torch's own SyncBatchNorm refuses CPU
        # tensors); the fused units synchronise CPU tensors over gloo, so lift that check here.
        DDP._passing_sync_batchnorm_handle = lambda self, module: None
        res["ddp"] = train(model, DDP(model), data, rank, dev, dt)

        model = _fused_sync(data["state"], "torch", dt, dev, convert_first=True)
        for blk in model.layer:
            fully_shard(blk)
        fully_shard(model)
        res["fsdp"] = train(model, model, data, rank, dev, dt)

        # torch.compile(DDP(fused SyncBN model)) against the same in eager. (momentum=None reads
        # num_batches_tracked on the host, which recompiles every step: momentum 0.1 here.)
        runs = {}
        for name in ("eager", "compiled"):
            model = _fused_sync(data["state"], "torch", dt, dev, convert_first=False)
            model.layer[1].bn1.momentum = 0.1
            ddp = DDP(model)
            runs[name] = train(model, ddp if name == "eager" else torch.compile(ddp, backend="aot_eager"),
                               data["compile"], rank, dev, dt)
        res["compile"] = runs
    else:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        dev = torch.device("cuda", rank)
        for tag, dt, kernels in (("float64", torch.float64, "torch"), ("float32", torch.float32, "auto")):
            model = _fused_sync(data["state"], kernels, dt, dev, convert_first=False)
            fused = train(model, DDP(model, device_ids=[rank]), data, rank, dev, dt)
            plain = nn.SyncBatchNorm.convert_sync_batchnorm(build_model())
            plain.load_state_dict(data["state"])
            plain = plain.to(device=dev, dtype=dt)
            res[tag] = {"fused": fused, "plain": train(plain, DDP(plain, device_ids=[rank]), data, rank, dev, dt)}
    torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    inp, outdir, mode, world = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_worker, args=(world, port, inp, outdir, mode), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            print(f"sync_worker: timed out after {DEADLINE_S}s", file=sys.stderr)
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
