"""csrc's implicit-GEMM dgrad and wgrad (csrc/conv2d_dgrad.cu, csrc/conv2d_wgrad.cu), the 'cuda'
conv2d_backward's path for float16/bfloat16 channels_last with Cin and Cout multiples of 8 (the dgrad:
also stride 1 or 2, <= 9 taps per stride parity class; ``cuda_conv_backward.dgrad_refusal`` /
``wgrad_refusal``): every optional part of the op (mask as an activation or 1-bit, coef, residual +
res_mask, the upstream ReLU and BN-backward reductions, x recomputed from up_y) against the float64
reference and PyTorch's own error ('aten'), under the project's policy
(``testing.assert_close_to_ref``), with the outputs NaN-poisoned by the op. Without a GPU the
kernels' own source runs on the host runner (``cuda_target``; small shapes: it is slow). Each case
also checks which path ran: the csrc kernels, or (refused) cuDNN without them.
"""

from __future__ import annotations

import pytest
import torch

from resnet_kernels import _bits, _registry, testing
from resnet_kernels.backends import cuda_conv_backward
from resnet_kernels.backends import torch_conv_backward as ref_impl
from resnet_kernels.ops.conv_backward import BackwardCall, conv2d_backward
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
    """What cuda_conv_backward runs: the names of the csrc entry points it calls, and "operand" /
    "upstream_input" when it materialises dy (the cuDNN path) / x recomputed from up_y."""
    seen = []

    def spy(name, real):
        def f(*args, **kw):
            seen.append(name)
            return real(*args, **kw)
        return f

    real_call = cuda_conv_backward.call
    monkeypatch.setattr(cuda_conv_backward, "call", lambda name, *a: (seen.append(name), real_call(name, *a))[1])
    monkeypatch.setattr(cuda_conv_backward, "_operand", spy("operand", cuda_conv_backward._operand))
    monkeypatch.setattr(cuda_conv_backward, "upstream_input", spy("upstream_input", cuda_conv_backward.upstream_input))
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
        if dtype == torch.bfloat16:  # the weight read in place (channels_last); float16: contiguous (copied
            case.weight = case.weight.contiguous(memory_format=torch.channels_last)  # unless 1x1)
        assert cuda_conv_backward.dgrad_weight_in_place(case.weight) == (dtype == torch.bfloat16 or shape[6] == 1)
        if bits:
            _bits_of(case)
        ref = case.run("torch", dtype=torch.float64)
        pt = case.run("aten")
        dgrad_calls.clear()
        got = case.run("cuda", device=cuda_target)
        # the csrc kernels computed grad_x and grad_weight: nothing materialised (x = None: recomputed in them)
        assert dgrad_calls == ["conv2d_dgrad", "conv2d_wgrad"], dgrad_calls
        _check(case, got, pt, ref)


@pytest.mark.parametrize("config", ["plain", "proj", "first-proj"])
@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[5], ("7x7s2", 1, 8, 11, 11, 16, 7, 2, 3),
                                   ("splitk", 4, 8, 16, 16, 8, 1, 1, 0), ("splitk3", 2, 8, 24, 24, 16, 3, 1, 1)],
                         ids=["3x3s2", "tiles-s2", "7x7s2", "splitk", "splitk3"])
def test_csrc_wgrad_alone_matches_the_reference(shape, config, cuda_target, dgrad_calls):
    """grad_weight only (the dgrad's shape-independent parts are above): any kernel size (the stem's
    7x7 stride 2), split-K (splitk: 2 splits, splitk3: 3 splits of 12 K tiles) and one split."""
    _, N, Cin, H, W, Cout, k, s, p = shape
    OH, OW = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    splits = cuda_conv_backward.wgrad_splits(N, Cin, Cout, k, k, OH, OW)
    assert splits == {"splitk": 2, "splitk3": 3}.get(shape[0], 1)
    for dtype in DTYPES:
        case = Case(shape, config, dtype, "channels_last", seed=2)
        outs = {}
        for backend, device, dt in (("torch", "cpu", torch.float64), ("aten", "cpu", None),
                                    ("cuda", cuda_target, None)):
            t = [None if v is None else v.to(device, dt) if (dt is not None and v.is_floating_point()) else
                 v.to(device) for v in case.tensors()]
            g, mask, y, mean, coef, x, weight, _, _, up_y, up_mean, up_var, up_weight, up_bias = t
            dgrad_calls.clear()
            outs[backend] = conv2d_backward(g, x, weight, stride=case.stride, padding=case.padding, mask=mask, y=y,
                                            mean=mean, coef=coef, up_y=up_y, up_mean=up_mean, up_var=up_var,
                                            up_weight=up_weight, up_bias=up_bias, need_x=False, backend=backend)
        assert dgrad_calls == ["conv2d_wgrad"], dgrad_calls  # no upstream_input, no cuDNN, no dgrad
        ref, pt, got = outs["torch"], outs["aten"], outs["cuda"]
        assert got[0] is None
        testing.assert_close_to_ref(f"grad_weight ({dtype})", got[1].cpu(), pt[1].cpu(), ref[1], dtype,
                                    n_terms=case.terms["grad_weight"], roundings=2 * testing.ROUNDINGS)


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
    assert "conv2d_dgrad" not in dgrad_calls and "operand" in dgrad_calls
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
                  stride_h=1, stride_w=1, pad_h=0, pad_w=0, OH=4, OW=4, g=16, w=16, w_stride=[8, 1, 8, 8], grad_x=16)
    with pytest.raises(ValueError, match="Cin = 3 must be a multiple of 8"):
        C_.conv2d_dgrad(fill_args(C_.Conv2dDgradArgs, **fields))
    fields.update(Cin=8, stride_h=3)
    with pytest.raises(ValueError, match="stride"):
        C_.conv2d_dgrad(fill_args(C_.Conv2dDgradArgs, **fields))
    fields.update(stride_h=1, w_stride=[72, 9, 3, 1])
    with pytest.raises(ValueError, match=r"w_stride\[1\] = 9 must be 1"):
        C_.conv2d_dgrad(fill_args(C_.Conv2dDgradArgs, **fields))
    fields.update(w_stride=[8, 1, 8, 8], dtype=0)
    with pytest.raises(ValueError, match="float32 is not supported"):
        C_.conv2d_dgrad(fill_args(C_.Conv2dDgradArgs, **fields))


@pytest.mark.parametrize("dims", [(1, 8, 8, 1, 1, 5, 5), (256, 64, 64, 1, 1, 56, 56), (256, 512, 512, 3, 3, 7, 7),
                                  (256, 1024, 2048, 1, 1, 7, 7), (2, 16, 40, 7, 7, 6, 6), (256, 64, 256, 1, 1, 56, 56)])
def test_the_accountants_split_count_is_the_kernels(dims, cuda_target):
    from resnet_kernels.backends.cuda_common import C_module

    N, Cin, Cout, KH, KW, OH, OW = dims
    assert cuda_conv_backward.wgrad_splits(*dims) == C_module().conv2d_wgrad_splits(
        N=N, Cin=Cin, Cout=Cout, KH=KH, KW=KW, OH=OH, OW=OW)


# planted bugs (tests/host_runner.py ``build(patches=...)``): the host runner must report them
_BUGS = {
    "dgrad_barrier": ("conv2d_dgrad", {"conv2d_dgrad.cu": [(
        "    if (more) store(st ^ 1);  // the other buffer: last read before the previous __syncthreads\n"
        "    __syncthreads();\n", "    if (more) store(st ^ 1);\n")]}),
    "wgrad_barrier": ("conv2d_wgrad", {"conv2d_wgrad.cu": [(
        "    if (more) store(st ^ 1);\n    __syncthreads();\n", "    if (more) store(st ^ 1);\n")]}),
}


@pytest.mark.parametrize("bug", list(_BUGS))
def test_a_missing_main_loop_barrier_is_reported(bug, cuda_target):
    import host_runner
    import rk_testing

    if rk_testing.HAS_GPU:
        pytest.skip("planted bugs run on the host runner only")
    kernel, patches = _BUGS[bug]
    runner = host_runner.HostRunner(host_runner.build(patches=patches))
    case = Case(SHAPES[4], "tail", torch.bfloat16, "channels_last")
    from resnet_kernels.backends import cuda_common

    with cuda_common.host_runner(runner):
        with pytest.raises(RuntimeError, match=r"shared-memory race") as info:
            case.run("cuda", device="cpu")
    assert f"{kernel}_kernel" in str(info.value)


@pytest.mark.parametrize("config", ["tail", "inner-ypre"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_upstream_parameters_in_the_activation_dtype(config, dtype, cuda_target, dgrad_calls):
    """up_weight / up_bias in the activation dtype (a model cast to bf16/fp16): the finalize reads them
    and writes up_grad_weight / up_grad_bias in that dtype; the recomputed x reads them too."""
    case = Case(SHAPES[1], config, dtype, "channels_last", seed=3)
    case.up_weight = case.up_weight.to(dtype)
    if case.up_bias is not None:
        case.up_bias = case.up_bias.to(dtype)
        case.h = ref_impl.upstream_input(case.up_y, case.up_mean, case.up_var, case.up_weight, case.up_bias, 1e-5)
    ref = case.run("torch", dtype=torch.float64)
    pt = case.run("aten")
    got = case.run("cuda", device=cuda_target)
    assert dgrad_calls.count("conv2d_dgrad") == 1
    assert got[3].dtype == dtype and got[4].dtype == dtype
    _check(case, got, pt, ref)


def test_results_are_bitwise_reproducible(cuda_target):
    """Fixed-order reductions (the dgrad's upstream partials + finalize, the wgrad's split-K summed by
    each tile's last-arriving CTA): two runs give the same bits (on a GPU too: the only atomic, the
    split-K arrival counter, picks the CTA that sums, not the order)."""
    case = Case(("splitk3", 2, 16, 24, 24, 16, 3, 1, 1), "tail", torch.bfloat16, "channels_last", seed=4)
    assert cuda_conv_backward.wgrad_splits(2, 16, 16, 3, 3, 24, 24) > 1
    a = case.run("cuda", device=cuda_target)
    b = case.run("cuda", device=cuda_target)
    for name, u, v in zip(("grad_x", "grad_weight", "up_coef", "up_grad_weight", "up_grad_bias"), a, b):
        assert torch.equal(u, v), name


@pytest.mark.parametrize("shape", [("splitk3", 2, 16, 24, 24, 16, 3, 1, 1),
                                   ("splitk_tiles", 4, 72, 16, 16, 136, 1, 1, 0),
                                   ("up_groups_s2", 2, 16, 40, 40, 16, 3, 2, 1)],
                         ids=["3x3-3splits", "1x1-2x2tiles-2splits", "s2-28rows-2groups"])
def test_reductions_run_in_their_own_launch_in_any_cta_order(shape, cuda_target, monkeypatch):
    """The wgrad's split-K partials are summed by each tile's last-arriving CTA, and the dgrad's
    upstream partial rows by the last arrivals of each (group of rows, column tile) and then of each
    column tile (s2-28rows-2groups: 4 parity classes x 7 row tiles = 28 rows, groups of 16), in their
    own launches: one dgrad and one wgrad kernel launched, nothing else; on the host runner the grid
    runs in blockIdx order and in 3 permutations with bit-identical results (the order of each sum
    does not depend on which CTA arrives last); the counters are all zero afterwards (a fresh buffer
    first). Parity: test_csrc_wgrad_alone_matches_the_reference, test_csrc_dgrad_matches_the_reference
    and, for the two-group shape, the check below."""
    import rk_testing
    from resnet_kernels import _counters

    monkeypatch.setattr(_counters, "ARRIVAL_COUNTERS", {})
    _, N, Cin, H, W, Cout, k, s, p = shape
    OH, OW = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    assert cuda_conv_backward.wgrad_splits(N, Cin, Cout, k, k, OH, OW) > 1
    case = Case(shape, "tail", torch.bfloat16, "channels_last", seed=5)

    def run(runner):
        got = case.run("cuda", device=cuda_target)
        if runner is not None:
            launched = [n for n in runner.take_launches() if "grad" in n]
            assert sorted(launched) == ["conv2d_dgrad_kernel<T, true>", "conv2d_wgrad_kernel<T>"], launched
        return got

    outs = rk_testing.in_cta_orders(run)
    if shape[0] == "up_groups_s2":
        got = outs[0]
        ref = case.run("torch", device="cpu", dtype=torch.float64)
        pt = case.run("aten", device="cpu")
        _check(case, got, pt, ref)
    for o in outs[1:]:
        for name, u, v in zip(("grad_x", "grad_weight", "up_coef", "up_grad_weight", "up_grad_bias"), outs[0], o):
            assert torch.equal(u, v), f"{name} depends on the CTA order"
    assert _counters.ARRIVAL_COUNTERS and all(int(b.count_nonzero()) == 0 for b in _counters.ARRIVAL_COUNTERS.values())


def test_wgrad_drops_its_counters_when_the_launch_raises(cuda_target, monkeypatch):
    """A wgrad launch that raises (it may have arrived partly) drops the cached counter buffer."""
    from resnet_kernels import _counters

    case = Case(("splitk3", 2, 16, 24, 24, 16, 3, 1, 1), "tail", torch.bfloat16, "channels_last", seed=6)
    case.run("cuda", device=cuda_target)
    key = _counters._counter_key(torch.device(cuda_target))
    assert key in _counters.ARRIVAL_COUNTERS
    real = cuda_conv_backward.call

    def boom(name, *args):
        if name == "conv2d_wgrad":
            raise RuntimeError("boom")
        return real(name, *args)

    monkeypatch.setattr(cuda_conv_backward, "call", boom)
    with pytest.raises(RuntimeError, match="boom"):
        case.run("cuda", device=cuda_target)
    assert key not in _counters.ARRIVAL_COUNTERS


def test_wgrad_names_its_counters(cuda_target):
    """conv2d_wgrad with splits > 1 needs the counters (named when missing, misaligned or too few)."""
    from resnet_kernels.backends.cuda_common import C_module, fill_args

    C_ = C_module()
    assert C_.conv2d_wgrad_counters(Cin=72, Cout=136, KH=3, KW=3, splits=1) == 0
    assert C_.conv2d_wgrad_counters(Cin=72, Cout=136, KH=3, KW=3, splits=2) == 9 * 2 * 2
    fields = {f: 0 for f in C_.Conv2dWgradArgs.fields}
    fields.update(dtype=2, up_w_dtype=0, up_eps=1e-5, N=1, Cin=8, H=4, W=4, Cout=8, KH=1, KW=1, stride_h=1,
                  stride_w=1, pad_h=0, pad_w=0, OH=4, OW=4, g=16, x=16, grad_weight=16, gw_stride=[8, 1, 8, 8],
                  splits=2, workspace=16, workspace_bytes=1 << 20)
    with pytest.raises(ValueError, match=r"counters \(splits > 1\)"):
        C_.conv2d_wgrad(fill_args(C_.Conv2dWgradArgs, **fields))
    fields.update(counters=18)
    with pytest.raises(ValueError, match="counters must be 4-byte aligned"):
        C_.conv2d_wgrad(fill_args(C_.Conv2dWgradArgs, **fields))
    fields.update(counters=16, counters_count=0)
    with pytest.raises(ValueError, match="counters_count = 0 < 1 required"):
        C_.conv2d_wgrad(fill_args(C_.Conv2dWgradArgs, **fields))


@pytest.mark.parametrize("dims", [(1, 8, 4, 4, 1, 1), (2, 16, 40, 40, 2, 2), (4, 64, 56, 56, 1, 1),
                                  (256, 128, 56, 56, 2, 2)])
def test_dgrad_workspace_and_counters_follow_the_declared_group_rule(dims, cuda_target):
    """The upstream finalize's groups (csrc up_group_rows) are the declared cost's (backends'
    _cuda_stat_groups): the workspace holds the float64 group sums and the float32 partial rows, one
    counter per (group, 64-channel column tile), plus one per column tile with several groups."""
    from resnet_kernels.backends import _cuda_stat_groups
    from resnet_kernels.backends.cuda_common import C_module

    N, Cin, H, W, sh, sw = dims
    tiles = sum(-(-(N * -(-(H - ah) // sh) * -(-(W - aw) // sw)) // 128) for ah in range(sh) for aw in range(sw))
    groups = _cuda_stat_groups(tiles)
    C_ = C_module()
    kw = dict(N=N, Cin=Cin, H=H, W=W, stride_h=sh, stride_w=sw)
    assert C_.conv2d_dgrad_workspace_bytes(**kw, upstream=True) == 2 * groups * Cin * 8 + 2 * tiles * Cin * 4
    assert C_.conv2d_dgrad_counters(**kw, upstream=True) == (groups + (groups > 1)) * -(-Cin // 64)
    assert C_.conv2d_dgrad_workspace_bytes(**kw, upstream=False) == 0 == C_.conv2d_dgrad_counters(**kw, upstream=False)
