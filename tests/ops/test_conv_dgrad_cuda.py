"""csrc's implicit-GEMM dgrad (csrc/conv2d_dgrad.cu), the 'cuda' conv2d_backward's grad_x path for
float16/bfloat16 channels_last with Cin and Cout multiples of 8, stride 1 or 2, <= 9 taps per stride
parity class (``cuda_conv_backward.dgrad_refusal``): every optional part of the op (mask as an
activation or 1-bit, coef, residual + res_mask, the upstream ReLU and BN-backward reductions, x
recomputed from up_y) against the float64 reference and PyTorch's own error ('aten'), under the
project's policy (``testing.assert_close_to_ref``), with the outputs NaN-poisoned by the op. Without
a GPU the kernel's own source runs on the host runner (``cuda_target``; tiny shapes: it is slow).
Each case also checks which path ran: the csrc kernel, or (refused) cuDNN without it.
"""

from __future__ import annotations

import pytest
import torch

from resnet_kernels import _bits, _registry
from resnet_kernels.backends import cuda_conv_backward
from resnet_kernels.ops.conv_backward import BackwardCall
from ops.test_conv_backward import CONFIGS, Case, _check  # (tests/ is on the path: pyproject)

# (id, N, Cin, H, W, Cout, k, stride, pad): odd H = W = 7 and N = 1, both strides, 1x1 and 3x3
# "tiles": 2 m tiles (162 rows of 128), 2 channel tiles (72 of 64: a tail), 2 K tiles of output channels
# (40 of 32: a tail); "tiles-s2": stride 2 with a parity class over 128 rows
SHAPES = [("1x1", 2, 8, 5, 5, 16, 1, 1, 0), ("3x3", 1, 8, 7, 7, 8, 3, 1, 1), ("3x3s2", 1, 16, 7, 7, 8, 3, 2, 1),
          ("1x1s2", 2, 8, 6, 6, 16, 1, 2, 0), ("tiles", 2, 72, 9, 9, 40, 3, 1, 1),
          ("tiles-s2", 5, 16, 11, 11, 40, 3, 2, 1)]
DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture
def dgrad_calls(monkeypatch):
    """The names of the csrc entry points cuda_conv_backward calls."""
    seen = []
    real = cuda_conv_backward.call

    def spy(name, *args):
        seen.append(name)
        return real(name, *args)

    monkeypatch.setattr(cuda_conv_backward, "call", spy)
    return seen


def _bits_of(case: Case):
    """The case with its mask and res_mask packed to 1 bit (resnet_kernels/_bits.py)."""
    if case.mask is not None:
        case.mask = _bits.pack(case.mask)
    if case.res_mask is not None:
        case.res_mask = _bits.pack(case.res_mask)
    return case


@pytest.mark.parametrize("bits", [False, True], ids=["act-mask", "bit-mask"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_csrc_dgrad_matches_the_reference(shape, config, bits, cuda_target, dgrad_calls):
    if bits and not (CONFIGS[config][0] or CONFIGS[config][3]):
        pytest.skip("no mask in this configuration")
    for dtype in DTYPES:
        case = Case(shape, config, dtype, "channels_last", seed=1)
        if bits:
            _bits_of(case)
        ref = case.run("torch", dtype=torch.float64)
        pt = case.run("aten")
        dgrad_calls.clear()
        got = case.run("cuda", device=cuda_target)
        assert dgrad_calls.count("conv2d_dgrad") == 1, dgrad_calls  # the csrc kernel computed grad_x
        _check(case, got, pt, ref)


@pytest.mark.parametrize("shape", [("c3", 1, 3, 7, 7, 8, 3, 1, 1), ("cout6", 1, 8, 5, 5, 6, 1, 1, 0),
                                   ("nchw", 1, 8, 5, 5, 8, 1, 1, 0), ("fp32", 1, 8, 5, 5, 8, 1, 1, 0),
                                   ("7x7s2", 1, 8, 11, 11, 8, 7, 2, 3)], ids=lambda s: s[0])
def test_refused_calls_run_cudnn_and_say_why(shape, cuda_target, dgrad_calls):
    layout = "nchw" if shape[0] == "nchw" else "channels_last"
    dtype = torch.float32 if shape[0] == "fp32" else torch.bfloat16
    case = Case(shape, "tail", dtype, layout)
    why = cuda_conv_backward.dgrad_refusal(case.g, case.mask, case.y, case.x, case.weight, case.stride,
                                           case.residual, case.res_mask, case.up_y)
    assert why and isinstance(why, str)
    ref = case.run("torch", dtype=torch.float64)
    pt = case.run("aten")
    dgrad_calls.clear()
    got = case.run("cuda", device=cuda_target)
    assert "conv2d_dgrad" not in dgrad_calls
    _check(case, got, pt, ref)


def _call(shape, config, layout="channels_last", dtype=torch.bfloat16):
    case = Case(shape, config, dtype, layout)
    return BackwardCall(case.g, case.mask, case.y, case.mean, case.coef, case.x, case.weight, case.stride, case.padding,
                        case.residual, case.res_mask, case.up_y, case.up_mean, case.up_var, case.up_weight, 1e-5,
                        (True, True, True, True), up_bias=case.up_bias)


def test_the_cost_counts_the_path_that_runs():
    """The accountant's cost of the cuda impl follows dgrad_refusal: the csrc dgrad path counts fewer
    launches and bytes than the separate passes around cuDNN for the same call."""
    impl = next(i for i in _registry.implementations("conv2d_backward", include_hidden=True) if i.backend == "cuda")
    shape = ("s", 8, 64, 28, 28, 64, 3, 1, 1)  # activations, not the weight, dominate (as in a ResNet)
    own = impl.cost(_call(shape, "tail"))
    sep = impl.cost(_call(shape, "tail", layout="nchw"))
    assert own[0] < sep[0] and own[1] < sep[1], (own, sep)


def test_the_kernel_names_the_bad_argument(cuda_target):
    from resnet_kernels.backends.cuda_common import C_module, fill_args

    C_ = C_module()
    fields = {f: 0 for f in C_.Conv2dDgradArgs.fields}
    fields.update(dtype=2, up_w_dtype=0, up_gw_dtype=0, up_eps=1e-5, N=1, Cin=3, H=4, W=4, Cout=8, KH=1, KW=1,
                  stride_h=1, stride_w=1, pad_h=0, pad_w=0, OH=4, OW=4, g=16, wt=16, grad_x=16)
    with pytest.raises(ValueError, match="Cin = 3 must be a multiple of 8"):
        C_.conv2d_dgrad(fill_args(C_.Conv2dDgradArgs, **fields))
    fields.update(Cin=8, stride_h=3)
    with pytest.raises(ValueError, match="stride"):
        C_.conv2d_dgrad(fill_args(C_.Conv2dDgradArgs, **fields))
    fields.update(stride_h=1, dtype=0)
    with pytest.raises(ValueError, match="float32 is not supported"):
        C_.conv2d_dgrad(fill_args(C_.Conv2dDgradArgs, **fields))
