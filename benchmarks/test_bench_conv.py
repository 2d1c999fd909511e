"""Every distinct convolution of ResNet-18 and ResNet-50 (224x224 input) at batch 256 and 32,
bf16, channels_last.

kind ``infer``  conv + BN + ReLU in eval() under no_grad:
                cuda / triton: ``resnet_kernels.functional.conv_bn_act(x, conv, bn, backend=impl)``
                (BN folded into the convolution's epilogue); eager: ``relu_(bn(conv(x)))`` (cuDNN
                conv, then the BN and ReLU kernels); compile: ``torch.compile`` of eager.
kind ``conv``   the convolution alone, no BN/ReLU: cuda / triton: the backend's launcher
                ``conv2d_forward`` (the documented launcher contract) into a preallocated output;
                cudnn: ``F.conv2d``.
kind ``train``  forward + backward of conv + BN + ReLU in train() (batch statistics,
                running-stat update; gradients w.r.t. x, conv.weight, bn.weight, bn.bias; the
                stem's input needs no gradient): cuda / triton vs eager. ``peak_mem_bytes``: the
                memory allocated at the peak of one step beyond what was allocated before it.

TFLOP/s counts 2*N*OH*OW*Cout*Cin*KH*KW per convolution (x3 for train: forward, data and weight
gradients; x2 for the stem).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnet_kernels as rk
from resnet_kernels import _registry
import shapes
import timing

pytestmark = timing.requires_gpu

DTYPE = torch.bfloat16
CL = torch.channels_last
CONVS = shapes.distinct_convs(("resnet18", "resnet50"))
BATCHES = (256, 32)
if timing.FAST:
    keep = {(3, 64, 7, 2, 3, 224), (64, 64, 3, 1, 1, 56), (1024, 256, 1, 1, 0, 14)}
    CONVS = [c for c in CONVS if c.key in keep]
    BATCHES = (256,)
IDS = [c.id for c in CONVS]


BASELINES = ("eager", "compile", "cudnn")
# 'auto' (the measured choice) and every backend of the registry that benchmarks
# plus the per-layer implementations kept out of the model benchmark's default set (benchmark=False:
# they serve only some layers) that these bf16 channels_last layers exercise: cutlass (sm_90a)
OURS = ("auto",) + tuple(b.name for b in _registry.backends() if b.benchmark or b.name == "cutlass")


def _available(impl, c=None):
    if impl in BASELINES or impl == "auto":
        return
    ok, why = rk.backend_status(impl, "cuda")
    if not ok:
        pytest.skip(f"backend {impl} unavailable: {why}")
    if impl == "cutlass" and c is not None and (c.cin % 8 or c.cout % 8):
        pytest.skip(f"cutlass: Cin={c.cin}, Cout={c.cout} (channels must be multiples of 8)")


def _modules(c, train):
    torch.manual_seed(0)
    conv = nn.Conv2d(c.cin, c.cout, c.k, c.stride, c.pad, bias=False)
    bn = nn.BatchNorm2d(c.cout)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    conv, bn = (m.to(device="cuda", dtype=DTYPE, memory_format=CL) for m in (conv, bn))
    return conv.train(train), bn.train(train)


def _x(c, n, grad=False):
    return torch.randn(n, c.cin, c.h, c.h, device="cuda", dtype=DTYPE).contiguous(memory_format=CL).requires_grad_(grad)


def _info(c, n, kind, impl):
    return {"suite": "conv", "case": f"{c.name} N{n}", "conv": c.name, "where": list(c.where), "kind": kind,
            "impl": impl, "batch": n, "dtype": "bf16", "layout": "channels_last",
            "shape": {"cin": c.cin, "cout": c.cout, "k": c.k, "stride": c.stride, "pad": c.pad, "h": c.h}}


def _in_bytes(c, n):
    return n * c.cin * c.h * c.h * DTYPE.itemsize


@pytest.mark.parametrize("impl", OURS + ("eager", "compile"))
@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("c", CONVS, ids=IDS)
def test_infer_conv_bn_relu(benchmark, c, n, impl):
    _available(impl, c)
    benchmark.group = f"infer {c.id} N{n}"
    conv, bn = _modules(c, train=False)
    if impl in OURS:
        def f(x):
            return rk.functional.conv_bn_act(x, conv, bn, relu=True, backend=impl)
    else:
        def f(x):
            return torch.relu_(bn(conv(x)))
        if impl == "compile":
            f = timing.compiled(f)

    def fn(x):
        with torch.no_grad():
            f(x)

    inputs = timing.rotation(lambda: (_x(c, n),), _in_bytes(c, n))
    timing.run(benchmark, fn, inputs, info=_info(c, n, "infer", impl), flops=c.flops(n))


# the convolution launchers alone (an implementation that allocates its own output is the aten
# convolution itself: that is the 'cudnn' row)
@pytest.mark.parametrize("impl", tuple(i.backend for i in _registry.implementations("conv2d_epilogue")
                                       if i.backend in OURS and not i.returns_output)
                         + ("cudnn",))
@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("c", CONVS, ids=IDS)
def test_conv_alone(benchmark, c, n, impl):
    _available(impl, c)
    benchmark.group = f"conv {c.id} N{n}"
    conv, _ = _modules(c, train=False)
    w = conv.weight.detach()
    st, pd = (c.stride, c.stride), (c.pad, c.pad)
    if impl == "cudnn":
        def fn(x, out):
            F.conv2d(x, w, None, st, pd)
    else:
        from resnet_kernels._numerics import cudnn_conv_tf32_enabled

        launcher = _registry.get_impl("conv2d_epilogue", impl).load()

        def fn(x, out):
            launcher(x, w, None, None, None, out, st, pd, False, False, cudnn_conv_tf32_enabled())

    def make():
        return _x(c, n), torch.empty(n, c.cout, c.oh, c.oh, device="cuda", dtype=DTYPE).contiguous(memory_format=CL)

    inputs = timing.rotation(make, _in_bytes(c, n) + n * c.cout * c.oh * c.oh * DTYPE.itemsize)
    timing.run(benchmark, fn, inputs, info=_info(c, n, "conv", impl), flops=c.flops(n))


@pytest.mark.parametrize("impl", OURS + ("eager",))
@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("c", CONVS, ids=IDS)
def test_train_conv_bn_relu(benchmark, c, n, impl):
    _available(impl, c)
    benchmark.group = f"train {c.id} N{n}"
    conv, bn = _modules(c, train=True)
    need_dx = c.cin != 3  # the stem's input (the images) needs no gradient
    params = [conv.weight, bn.weight, bn.bias]
    if impl in OURS:
        def f(x):
            return rk.functional.conv_bn_act(x, conv, bn, relu=True, backend=impl)
    else:
        def f(x):
            return torch.relu(bn(conv(x)))

    def fn(x, g):
        out = f(x)
        torch.autograd.grad(out, ([x] if need_dx else []) + params, g)

    def make():
        g = torch.randn(n, c.cout, c.oh, c.oh, device="cuda", dtype=DTYPE).contiguous(memory_format=CL)
        return _x(c, n, grad=need_dx), g

    inputs = timing.rotation(make, _in_bytes(c, n) + n * c.cout * c.oh * c.oh * DTYPE.itemsize)
    timing.run(benchmark, fn, inputs, info=_info(c, n, "train", impl), flops=c.flops(n) * (3 if need_dx else 2),
               peak_memory=True)
