"""Counted against profiled, on a GPU: one model step (the accountant's: ``resnet_kernels.count``)
run on CUDA under ``torch.profiler``, its GPU kernels counted, next to what ``resnet-kernels count``
counts for the same step on the meta device (docs/COUNT.md). The counted numbers are this
project's evidence until a GPU has timed it; this is how a GPU run checks them.

A diagnostic, not a test: it prints, per (model, mode, backend), the counted launches, the kernels
the profiler saw (memsets and copies apart) and their ratio, then the most frequent kernel names,
and asserts nothing (a driver, cuDNN or cuBLAS choice can add kernels the accountant's per-op
table does not know). Exit status 2 without a CUDA device.

    python benchmarks/count_vs_profiler.py [--models resnet18,resnet50] [--modes train]
        [--backends eager,cuda,triton] [--batch 64] [--names 12]

Same step as the accountant's: ``zero_grad(set_to_none=True)``, forward, ``cross_entropy`` in
float32, ``backward()``, SGD(momentum=0.9, foreach=True) ``step()``; inference an eval forward
under no_grad. 224x224, bf16, channels_last, 1000 classes by default (what ``resnet-kernels bench``
runs in benchmarks/gpu_check.sh, so Triton's compiled kernels are reused). Three steps warm up
(compiles, weight packs, momentum buffers, folded constants), the fourth is profiled.
"""

from __future__ import annotations

import argparse
import collections
import sys

import torch
import torch.nn.functional as F


def _step(net, x, labels, mode, opt):
    if mode == "infer":
        with torch.no_grad():
            net(x)
        return
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(net(x).float(), labels).backward()
    opt.step()


def profiled(model: str, mode: str, backend: str, batch: int, image_size: int, dtype: str, layout: str,
             num_classes: int):
    """(kernels, memsets, copies, Counter of kernel names) of one step on the current CUDA device."""
    from torch.profiler import ProfilerActivity, profile

    from resnet_kernels.count import DTYPES, build_model

    dt = DTYPES[dtype]
    mf = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    net = build_model(model, backend, num_classes).to(device="cuda", dtype=dt, memory_format=mf)
    x = torch.randn(batch, 3, image_size, image_size, device="cuda", dtype=dt).contiguous(memory_format=mf)
    labels = torch.randint(0, num_classes, (batch,), device="cuda")
    opt = None
    if mode == "train":
        net.train()
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, foreach=True)
    else:
        net.eval()
    for _ in range(3):
        _step(net, x, labels, mode, opt)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _step(net, x, labels, mode, opt)
        torch.cuda.synchronize()
    names: collections.Counter = collections.Counter()
    memsets = copies = 0
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if e.name.startswith("Memset"):
            memsets += 1
        elif e.name.startswith("Memcpy"):
            copies += 1
        else:
            names[e.name] += 1
    return sum(names.values()), memsets, copies, names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--modes", default="train")
    p.add_argument("--backends", default="eager,cuda,triton")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--layout", default="channels_last", choices=("nchw", "channels_last"))
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--names", type=int, default=12, help="kernel names listed per run (0: none)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("count_vs_profiler: no CUDA device (this compares counts with a GPU's profile)", file=sys.stderr)
        return 2
    from resnet_kernels import count
    from resnet_kernels.bench import backend_availability

    rows = []
    print("| model | mode | backend | counted launches | profiled kernels | ratio | memsets | copies |")
    print("|---|---|---|---|---|---|---|---|")
    for model in a.models.split(","):
        for mode in a.modes.split(","):
            for backend in a.backends.split(","):
                ok, why = backend_availability(backend, torch.device("cuda"))
                if not ok:
                    print(f"| {model} | {mode} | {backend} | - | not run: {why} | - | - | - |")
                    continue
                c = count.count_step(model, mode, backend, batch=a.batch, image_size=a.image_size, dtype=a.dtype,
                                     layout=a.layout, num_classes=a.num_classes)
                try:
                    k, ms, cp, names = profiled(model, mode, backend, a.batch, a.image_size, a.dtype, a.layout,
                                                a.num_classes)
                except Exception as e:  # one run's failure is reported, the others still run
                    err = f"failed: {type(e).__name__}: {e}"
                    print(f"| {model} | {mode} | {backend} | {c.launches} | {err} | - | - | - |")
                    continue
                print(f"| {model} | {mode} | {backend} | {c.launches} | {k} | {k / c.launches:.2f} | {ms} | {cp} |",
                      flush=True)
                rows.append((model, mode, backend, names))
    for model, mode, backend, names in rows:
        if a.names > 0:
            print(f"\n{model} {mode} {backend}: the {a.names} most frequent kernels")
            for name, n in names.most_common(a.names):
                print(f"  {n:5d}  {name[:150]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
