"""``conv2d_backward`` (resnet_kernels/ops/conv_backward.py) per implementation on every distinct
ResNet-18/50 convolution (224x224 input) at batch 256, bf16, channels_last: the training block's
inner-unit call (the operand dy = A g - (B + K (y - mean)) from the incoming gradient, grad_x with the
upstream unit's ReLU and BN-backward reductions, grad_weight, the upstream parameter gradients).
``cuda``: csrc's dgrad/wgrad where ``cuda_conv_backward.dgrad_refusal`` / ``wgrad_refusal`` allow
(the stem: cuDNN's dgrad is not needed, its wgrad is csrc's), ``triton``: the Triton kernels,
``aten``: the operand materialised, then cuDNN. TFLOP/s counts the data and weight gradients
(2 x 2*N*OH*OW*Cout*Cin*KH*KW; the stem's weight gradient only).
"""

import pytest
import torch

import resnet_kernels as rk
import shapes
import timing
from resnet_kernels.ops.conv_backward import conv2d_backward

pytestmark = timing.requires_gpu

DTYPE = torch.bfloat16
CL = torch.channels_last
CONVS = shapes.distinct_convs(("resnet18", "resnet50"))
N = 256
if timing.FAST:
    keep = {(3, 64, 7, 2, 3, 224), (64, 64, 3, 1, 1, 56), (1024, 256, 1, 1, 0, 14), (128, 128, 3, 2, 1, 56)}
    CONVS = [c for c in CONVS if c.key in keep]
IMPLS = ("cuda", "triton", "aten")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("c", CONVS, ids=[c.id for c in CONVS])
def test_conv2d_backward(benchmark, c, impl):
    ok, why = rk.backend_status(impl, "cuda")
    if not ok:
        pytest.skip(f"backend {impl} unavailable: {why}")
    benchmark.group = f"conv2d_backward {c.id} N{N}"
    up = c.cin != 3  # the stem: no upstream unit, no grad_x

    def act(C, H, relu=False):
        t = torch.randn(N, C, H, H, device="cuda", dtype=DTYPE).contiguous(memory_format=CL)
        return torch.relu(t) if relu else t

    def vec(C, lo=-1.0, hi=1.0):
        return torch.rand(C, device="cuda") * (hi - lo) + lo

    weight = (torch.randn(c.cout, c.cin, c.k, c.k, device="cuda") / c.k).to(DTYPE).contiguous(memory_format=CL)
    coef = torch.stack([vec(c.cout, 0.5, 1.5), vec(c.cout), vec(c.cout)])
    mean = vec(c.cout)
    ups = dict(up_y=act(c.cin, c.h), up_mean=vec(c.cin), up_var=vec(c.cin, 0.5, 2.0), up_weight=vec(c.cin, 0.5, 1.5),
               need_up_weight=True, need_up_bias=True) if up else {}

    def make():
        return act(c.cout, c.oh), act(c.cout, c.oh), act(c.cin, c.h, relu=True)

    def fn(g, y, x):
        conv2d_backward(g, x, weight, stride=(c.stride, c.stride), padding=(c.pad, c.pad), y=y, mean=mean, coef=coef,
                        need_x=up, backend=impl, **ups)

    per_set = (2 * N * c.cout * c.oh * c.oh + N * c.cin * c.h * c.h) * DTYPE.itemsize
    inputs = timing.rotation(make, per_set)
    info = {"suite": "conv_backward", "case": f"{c.name} N{N}", "conv": c.name, "where": list(c.where),
            "kind": "inner" if up else "stem", "impl": impl, "batch": N, "dtype": "bf16", "layout": "channels_last",
            "shape": {"cin": c.cin, "cout": c.cout, "k": c.k, "stride": c.stride, "pad": c.pad, "h": c.h}}
    timing.run(benchmark, fn, inputs, info=info, flops=c.flops(N) * (2 if up else 1))
