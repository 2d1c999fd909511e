"""resnet_kernels.testing, the tolerance policy itself: its checks fail on a zero, a NaN, an
off-by-one-rounding-too-many result and on a non-finite reference; its floors are what the
docstring derives, and a 1 % statistics error exceeds the float32 bound."""

import math

import pytest
import torch

from resnet_kernels import testing


def _case(dtype, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(n, generator=g, dtype=torch.float64) + 0.5
    pt = ref.to(dtype)  # PyTorch's result: the reference rounded once
    return ref, pt


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rejects_zero_nan_inf_and_accepts_a_rounding(dtype):
    ref, pt = _case(dtype)
    testing.assert_close_to_ref("rounded", pt.clone(), pt, ref, dtype)
    with pytest.raises(AssertionError, match="error vs float64"):
        testing.assert_close_to_ref("zero", torch.zeros_like(pt), pt, ref, dtype)
    bad = pt.clone()
    bad[3] = float("nan")
    with pytest.raises(AssertionError, match="non-finite"):
        testing.assert_close_to_ref("nan", bad, pt, ref, dtype)
    with pytest.raises(AssertionError, match="reference is not finite"):
        testing.assert_close_to_ref("inf ref", pt, pt, ref * float("inf"), dtype)


def test_one_percent_statistic_error_fails_in_float32():
    """Batch statistics are float32 whatever the activations: checked with float32's floor, a
    biased/unbiased mix-up over m = 50 rows (2 %) or any 1 % error fails."""
    ref, _ = _case(torch.float32, n=16)
    ref = ref.abs() + 0.1  # a variance
    pt = ref.float()
    with pytest.raises(AssertionError):
        testing.assert_close_to_ref("var", (ref * 1.01).float(), pt, ref, torch.float32, n_terms=50)


def test_floor_values():
    u32, u16, ubf = 2.0 ** -24, 2.0 ** -11, 2.0 ** -8
    assert testing.floor(torch.float16) == pytest.approx(2 * u16 + 4 * u32)
    assert testing.floor(torch.bfloat16, 100) == pytest.approx(2 * ubf + 4 * 10 * u32)
    assert testing.floor(torch.float32, 400) == pytest.approx(2 * u32 + 4 * 20 * u32)
    assert testing.floor(torch.float64, 4) == pytest.approx(2 * 2.0 ** -53 + 4 * 2 * 2.0 ** -53)
    # bound = max(K x PyTorch's error, floor x magnitude)
    assert testing.bound(1.0, 1.0, torch.float32) == 2.0
    assert testing.bound(0.0, 3.0, torch.float16, 9) == pytest.approx(3.0 * (2 * u16 + 12 * u32))
    # the bf16 floor stays below 1 %: a 1 % error of a bf16 result PyTorch gets exactly fails
    assert testing.floor(torch.bfloat16, 1024) < 0.01
    assert math.isclose(testing.check_allowed(torch.float32, "out", 1.0), 3.0)
    assert testing.check_allowed(torch.bfloat16, "grad", 0.0) == testing.floor(torch.bfloat16, 4096, 4)
