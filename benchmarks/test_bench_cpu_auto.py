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

Run: ``pytest benchmarks/test_bench_cpu_auto.py --benchmark-only -s`` (CPU only; no GPU needed).
"""

import copy
import statistics
import time

import pytest
import torch

import resnet_kernels as rk

torchvision = pytest.importorskip("torchvision")

CASES = {"auto": dict(batch=8, size=64, steps=10), "aten": dict(batch=2, size=32, steps=60)}
ROUNDS = 5  # interleaved rounds; the ratio reported is the median of the rounds' (each a median of steps)


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
        for m in (plain, fused):
            m.train(train)
        x = torch.randn(case["batch"], 3, case["size"], case["size"])
        y = torch.randint(0, 10, (case["batch"],))
        for m in (plain, fused):
            for _ in range(4):  # warm-up: a unit's validated plan is made, then bound (_unitplan.py)
                _step(m, x, y, train)
        rounds = []
        every = {"plain": [], "fused": []}
        for _ in range(ROUNDS):
            times = {"plain": [], "fused": []}
            for _ in range(case["steps"]):
                for name, m in (("plain", plain), ("fused", fused)):
                    t = time.process_time()
                    _step(m, x, y, train)
                    times[name].append(time.process_time() - t)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            rounds.append((med["fused"] / med["plain"], med["plain"], med["fused"]))
            for k, v in times.items():
                every[k] += v
        ratio, plain_ms, fused_ms = sorted(rounds)[len(rounds) // 2]
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
        benchmark.pedantic(_step, args=(fused, x, y, train), rounds=3, iterations=1)
    finally:
        torch.set_num_threads(threads)
