"""A fused ResNet-18 on a CPU against plain PyTorch, both timed in one interleaved run (process
CPU time, one intra-op thread, same weights; a benchmark, not a test: nothing is asserted).
``extra_info``: the two medians and their ratio (the median round of ``ROUNDS``, each a median of
``steps`` interleaved steps; every round's ratio too; and every step pooled: the ratio of the
medians and of the lower quartiles).

* ``auto`` (issue 8: within 1.1x): on CPU tensors each fused unit runs the user's own layers
  (``resnet_kernels/_tune.py``: ``plain_layers``); batch 8, 64x64.
* ``aten`` (issue 10 part 3, host time: within 1.1x): the explicit backend runs the fused path (the
  custom ops, the per-channel BatchNorm math, validation, dispatch) with PyTorch's own kernels; at
  batch 2 and 32x32 the kernels are tiny, so this is mostly what a GPU step pays on the host.

In the ``aten`` training case a third model runs in the same interleaved steps: ``floor``, the
least any design with one Python autograd function per (conv, BN, ReLU) unit can cost, each unit a
hand-written function that makes exactly plain PyTorch's calls (``conv2d``, ``native_batch_norm``
with its running update, ``relu_``; backward ``threshold_backward``, ``native_batch_norm_backward``,
``convolution_backward``) with no key, check, registry or decomposition (its gradients are checked
against plain PyTorch's first). fused/floor is then what the fused path adds beyond that design.

Run: ``pytest benchmarks/test_bench_cpu_auto.py --benchmark-only -s`` (CPU only; no GPU needed).
"""

import copy
import statistics
import time
import types

import pytest
import torch

import resnet_kernels as rk

torchvision = pytest.importorskip("torchvision")

CASES = {"auto": dict(batch=8, size=64, steps=10), "aten": dict(batch=2, size=32, steps=60)}
ROUNDS = 5  # interleaved rounds; the ratio reported is the median of the rounds' (each a median of steps)


_aten = torch.ops.aten


class _FloorUnit(torch.autograd.Function):
    """relu?(bn(conv(x)) [+ identity]) in training with plain PyTorch's own calls (see the module
    docstring): the floor of a one-Python-function-per-unit design, for reference only."""

    @staticmethod
    def forward(ctx, x, w, bw, bb, identity, conv, bn, relu):
        y = torch.nn.functional.conv2d(x, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        out, mean, invstd = torch.native_batch_norm(y, bw, bb, bn.running_mean, bn.running_var, True, bn.momentum,
                                                    bn.eps)
        bn.num_batches_tracked.add_(1)
        if identity is not None:
            out.add_(identity)
        if relu:
            out.relu_()
        ctx.save_for_backward(x, w, y, bw, mean, invstd, out if relu else None)
        ctx.conv, ctx.eps, ctx.has_identity = conv, bn.eps, identity is not None
        return out

    @staticmethod
    def backward(ctx, g):
        x, w, y, bw, mean, invstd, out = ctx.saved_tensors
        if out is not None:
            g = _aten.threshold_backward(g, out, 0)
        gy, gbw, gbb = _aten.native_batch_norm_backward(g, y, bw, None, None, mean, invstd, True, ctx.eps,
                                                        [True, True, True])
        c = ctx.conv
        gx, gw, _ = _aten.convolution_backward(gy, x, w, None, c.stride, c.padding, c.dilation, False, [0, 0],
                                               c.groups, [ctx.needs_input_grad[0], True, False])
        return gx, gw, gbw, gbb, (g if ctx.has_identity else None), None, None, None


def _floor_unit(x, conv, bn, relu, identity=None):
    return _FloorUnit.apply(x, conv.weight, bn.weight, bn.bias, identity, conv, bn, relu)


def _floor_block(blk, x):
    out = _floor_unit(x, blk.conv1, blk.bn1, True)
    ds = blk.downsample
    identity = x if ds is None else _floor_unit(x, ds[0], ds[1], False)
    return _floor_unit(out, blk.conv2, blk.bn2, True, identity)


def _floor_model(plain):
    """A copy of torchvision's ResNet-18 ``plain`` whose (conv, BN, ReLU) units are _FloorUnit."""
    m = copy.deepcopy(plain)
    for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
        for blk in layer:
            blk.forward = types.MethodType(_floor_block, blk)

    def forward(self, x):
        x = self.maxpool(_floor_unit(x, self.conv1, self.bn1, True))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    m.forward = types.MethodType(forward, m)
    return m


def _step(m, x, y, train):
    if train:
        m.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(m(x), y).backward()
    else:
        with torch.no_grad():
            m(x)


@pytest.mark.parametrize("backend", list(CASES))
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_fused_vs_plain_cpu(benchmark, mode, backend):
    case = CASES[backend]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        plain = torchvision.models.resnet18(num_classes=10)
        fused = copy.deepcopy(plain)
        rk.fuse(fused, backend=backend)
        train = mode == "train"
        models = [("plain", plain), ("fused", fused)]
        if backend == "aten" and train:
            models.append(("floor", _floor_model(plain)))
        for _, m in models:
            m.train(train)
        x = torch.randn(case["batch"], 3, case["size"], case["size"])
        y = torch.randint(0, 10, (case["batch"],))
        for _, m in models:
            for _ in range(4):  # warm-up: a unit's validated plan is made, then bound (_unitplan.py)
                _step(m, x, y, train)
        if len(models) == 3:  # the floor is a reference only where its gradients are plain PyTorch's
            for name, m in models[::2]:
                _step(m, x, y, train)
            for (n, a), b in zip(plain.named_parameters(), models[2][1].parameters()):
                torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=lambda e: f"floor {n}: {e}")
        rounds = []
        every = {name: [] for name, _ in models}
        for _ in range(ROUNDS):
            times = {name: [] for name, _ in models}
            for _ in range(case["steps"]):
                for name, m in models:
                    t = time.process_time()
                    _step(m, x, y, train)
                    times[name].append(time.process_time() - t)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            rounds.append((med["fused"] / med["plain"], med["plain"], med["fused"], med.get("floor")))
            for k, v in times.items():
                every[k] += v
        ratio, plain_ms, fused_ms, floor_ms = sorted(rounds)[len(rounds) // 2]
        # every step of every round pooled: the ratio of the medians and of the lower quartiles (the
        # step times' spread here comes from the machine: the same on both sides)
        q = {k: statistics.quantiles(v, n=4) for k, v in every.items()}
        pooled = statistics.median(every["fused"]) / statistics.median(every["plain"])
        pooled_q1 = q["fused"][0] / q["plain"][0]
        benchmark.extra_info.update(backend=backend, plain_ms=plain_ms, fused_ms=fused_ms, ratio=ratio,
                                    round_ratios=[r[0] for r in rounds], pooled_ratio=pooled,
                                    pooled_q1_ratio=pooled_q1)
        print(f"\n{mode} {backend}: plain {plain_ms:.2f} ms, fused {fused_ms:.2f} ms, ratio {ratio:.3f} "
              f"(rounds: {', '.join(f'{r[0]:.3f}' for r in rounds)}; all steps pooled: median {pooled:.3f}, "
              f"lower quartile {pooled_q1:.3f})")
        if "floor" in every:  # each round's floor/plain; every step pooled: floor/plain, fused/floor
            floor_pooled = statistics.median(every["floor"]) / statistics.median(every["plain"])
            over_floor = statistics.median(every["fused"]) / statistics.median(every["floor"])
            benchmark.extra_info.update(floor_round_ratios=[r[3] / r[1] for r in rounds],
                                        floor_pooled_ratio=floor_pooled, fused_over_floor=over_floor)
            print(f"{mode} {backend}: floor (a Python autograd function per unit, plain PyTorch's calls): "
                  f"floor/plain {', '.join(f'{r[3] / r[1]:.3f}' for r in rounds)} (pooled {floor_pooled:.3f}); "
                  f"fused/floor pooled {over_floor:.3f}")
        benchmark.pedantic(_step, args=(fused, x, y, train), rounds=3, iterations=1)
    finally:
        torch.set_num_threads(threads)
