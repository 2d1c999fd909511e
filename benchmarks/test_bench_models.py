"""Whole models: ResNet-18 and ResNet-50 train step and inference, fused (cuda, triton) vs
eager vs torch.compile, through the same code as ``resnet-kernels bench`` (same weights for
every impl, synthetic data, bf16, channels_last; see ``resnet_kernels/bench.py`` for what a step
is). ``extra_info``: CUDA-event median step time, images/s, peak memory of one step.

Environment: RK_BENCH_MODEL_BATCH (default 256; 64 with RK_BENCH_FAST=1).
"""

import os

import pytest
import torch

from resnet_kernels import _registry, bench
import timing

pytestmark = timing.requires_gpu

BATCH = int(os.environ.get("RK_BENCH_MODEL_BATCH", "64" if timing.FAST else "256"))


@pytest.mark.parametrize("impl", ("auto",) + tuple(b.name for b in _registry.backends() if b.benchmark)
                         + bench.BASELINES)
@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("model", ("resnet18", "resnet50"))
def test_model(benchmark, model, mode, impl):
    dev = torch.device("cuda")
    ok, why = bench.backend_availability(impl, dev)
    if not ok:
        pytest.skip(f"{impl}: {why}")
    benchmark.group = f"{model} {mode} N{BATCH}"
    cfg = bench.make_config(model=model, mode=mode, batch=BATCH, backends=[impl], device="cuda")
    state, src = bench.eager_state(cfg)
    step = bench.build_step(cfg, impl, state, dev)
    inputs = bench.make_inputs(cfg, dev)
    info = {"suite": "models", "case": f"{model} {mode} N{BATCH}", "model": model, "mode": mode, "impl": impl,
            "batch": BATCH, "dtype": cfg.dtype, "layout": cfg.layout, "eager_model": src}
    try:
        timing.run(benchmark, step, inputs, info=info, images=BATCH, peak_memory=True)
    finally:
        del step
        torch.cuda.empty_cache()
        if impl == "compile":
            torch._dynamo.reset()
