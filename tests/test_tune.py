"""``resnet_kernels.explain`` and ``tune_model`` / ``resnet-kernels tune`` on CPU: what ran and why,
the per-layer tuning table (timed here with an injected timer: CPU tensors are never timed for
real), the honest 'needs a CUDA GPU' of the command, and that neither changes the model's state."""

from __future__ import annotations

import pytest
import torch

import resnet_kernels as rk
from resnet_kernels import _tune, cli
from resnet_kernels.tune import tune_model

from rk_testing import HAS_GPU


def _model():
    torch.manual_seed(0)
    m = rk.models.resnet18(num_classes=10)
    return m


def test_explain_lists_every_fused_call_and_changes_nothing():
    m = _model().train()
    x = torch.randn(2, 3, 32, 32)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with rk.use_backend("aten"):
        exp = rk.explain(m, x, backward=True)
    after = m.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k  # running stats and num_batches_tracked restored
    assert all(p.grad is None for p in m.parameters())
    counts = exp.counts()
    # 20 convolutions in ResNet-18 (17 3x3/7x7 + 3 projections), each with batch statistics
    assert counts["conv2d_stats"] == {"aten": 20}
    assert set(counts) == {"conv2d_stats", "batch_norm_act", "batch_norm_act_backward", "bn_running_update",
                           "maxpool2d", "maxpool2d_backward"}
    # one BN apply per unit (a projection's two BNs in one pass), one running-update call per unit
    # (a projection unit's two BNs together)
    assert counts["batch_norm_act"] == counts["batch_norm_act_backward"] == {"aten": 17}
    assert counts["bn_running_update"] == {"aten": 17}
    assert counts["maxpool2d"] == counts["maxpool2d_backward"] == {"aten": 1}  # the stem's max pool
    fwd = [r for r in exp.rows if r.module != "(backward)"]
    assert {r.module for r in fwd} >= {"ResNet", "layer1.0", "layer4.1"}
    assert all(r.how == "explicit" and r.impl == "aten" for r in exp.rows)
    text = str(exp)
    assert "layer2.0" in text and "conv2d_stats" in text and "fused op calls on cpu" in text


def test_explain_auto_on_cpu_runs_the_plain_layers():
    """'auto' on CPU tensors: each fused unit runs the user's own layers (as fast as plain
    PyTorch, the same numbers); explain says so per unit."""
    m = _model().train()
    x = torch.randn(2, 3, 32, 32)
    exp = rk.explain(m, x)
    # ResNet-18: the stem and two units per basic block (the projections run inside the second),
    # and the stem's max pool
    assert exp.counts() == {"conv_bn_unit": {"aten": 17}, "maxpool2d": {"aten": 1}}
    assert all(r.how.startswith("static (cpu: the unit's own PyTorch layers)") for r in exp.rows)
    ref = _model().train()  # the same weights, unfused: bitwise the same output
    rk.unfuse(ref)
    torch.testing.assert_close(m(x), ref(x), rtol=0, atol=0)


def test_explain_eval_uses_the_folded_epilogue():
    m = _model().eval()
    with rk.use_backend("aten"):
        exp = rk.explain(m, torch.randn(1, 3, 32, 32))
    assert exp.counts()["conv2d_epilogue"] == {"aten": 20}


def test_explain_names_an_explicit_backend():
    m = _model().eval()
    with rk.use_backend("torch"):
        exp = rk.explain(m, torch.randn(1, 3, 32, 32))
    assert {r.impl for r in exp.rows} == {"torch"} and {r.how for r in exp.rows} == {"explicit"}


def test_tune_model_table_with_injected_timer(tmp_path, monkeypatch):
    """The per-layer table: each implementation's time (here: a fake timer making 'torch' the
    fastest), the choice, the speed-up over aten; the choices land in the cache."""
    monkeypatch.setenv("RESNET_KERNELS_CACHE_DIR", str(tmp_path))
    ran = []

    def timer(fn, device):
        from resnet_kernels.backends import aten_bn_add_relu  # noqa: F401
        ran.append(1)
        fn()
        return float(len(ran) % 2 + 1)  # alternate 2.0, 1.0 between the two candidates

    m = _model()
    x = torch.randn(2, 3, 16, 16)
    with _tune.testing(timer=timer, devices=("cpu",)):
        with pytest.warns(_tune.TuningNotice):
            exp = tune_model(m, x, "train", progress=None)
        table = exp.table(times=True)
        assert "aten ms" in table and "torch ms" in table and "vs aten" in table
        tuned = [r for r in exp.rows if r.how == "tuned"]
        assert tuned and all(set(r.times_ms) == {"aten", "torch"} for r in tuned)
        for r in tuned:
            assert r.impl == min(r.times_ms, key=lambda n: (r.times_ms[n], n))
        assert _tune.cache_summary()["entries"] >= len({r.key for r in tuned})
    assert m.training  # the model's mode is restored


@pytest.mark.skipif(HAS_GPU, reason="checks the message without a GPU")
def test_tune_command_needs_a_gpu(capsys):
    rc = cli.main(["tune", "--model", "resnet18", "--batch", "2", "--image-size", "32"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "needs a CUDA GPU" in err and "aten" in err
