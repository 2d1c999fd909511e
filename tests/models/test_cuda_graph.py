"""CUDA-graph capture of a fused ResNet-18 (needs a GPU): an eval forward and a training
forward+backward are captured after a warm-up on a side stream (so Triton JIT compilation and
cuDNN autotuning happen outside the capture) and replayed; the replay must equal an eager run of
an identical model on the same input."""

import copy

import pytest
import torch

import resnet_kernels
from rk_testing import KERNEL_BACKENDS, needs_gpu

pytestmark = needs_gpu("CUDA-graph capture")

# every backend of the registry, and 'auto' (under capture: the cached or static choice, never timed)
BACKENDS = KERNEL_BACKENDS + ["auto"]


def _model(backend: str) -> torch.nn.Module:
    torch.manual_seed(0)
    m = resnet_kernels.models.resnet18(num_classes=10, backend=backend)
    return m.cuda().to(memory_format=torch.channels_last)


def _input() -> torch.Tensor:
    return torch.randn(8, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)


def _warm_up(fn, iters: int = 3) -> None:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(iters):
            fn()
    torch.cuda.current_stream().wait_stream(s)


@pytest.mark.parametrize("backend", BACKENDS)
def test_capture_eval_forward(backend):
    model = _model(backend).eval()
    static_x = _input()
    with torch.no_grad():
        _warm_up(lambda: model(static_x))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(static_x)
        static_x.copy_(_input())  # new data through the captured graph
        graph.replay()
        torch.cuda.synchronize()
        ref = model(static_x)
    torch.testing.assert_close(static_out, ref, rtol=0, atol=0)  # same kernels, same inputs


@pytest.mark.parametrize("backend", BACKENDS)
def test_capture_train_forward_backward(backend):
    model = _model(backend).train()
    static_x = _input()

    def step():
        model.zero_grad(set_to_none=True)
        model(static_x).float().square().mean().backward()

    _warm_up(step)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = model(static_x).float().square().mean()
        static_loss.backward()
    # BN in training normalises with batch statistics, so outputs and gradients depend only on
    # the parameters and the input, not on the running statistics the replays keep updating.
    ref_model = copy.deepcopy(model)
    static_x.copy_(_input())
    graph.replay()
    torch.cuda.synchronize()
    ref_loss = ref_model(static_x).float().square().mean()
    ref_grads = torch.autograd.grad(ref_loss, list(ref_model.parameters()))
    torch.testing.assert_close(static_loss, ref_loss, rtol=1e-5, atol=0)
    for (name, p), g in zip(model.named_parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_reduce_overhead_fullgraph(backend):
    """torch.compile(mode="reduce-overhead", fullgraph=True): the whole fused model in one graph
    (no graph break) run as CUDA graphs; a training step's loss and gradients match eager's."""
    torch._dynamo.reset()
    model = _model(backend).train()
    ref_model = copy.deepcopy(model)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    x = _input()
    for _ in range(3):  # warm-up runs, then recorded and replayed CUDA graphs
        model.zero_grad(set_to_none=True)
        loss = compiled(x).float().square().mean()
        loss.backward()
    ref_model.load_state_dict(model.state_dict())
    ref_loss = ref_model(x).float().square().mean()
    ref_grads = torch.autograd.grad(ref_loss, list(ref_model.parameters()))
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-4, atol=1e-5)
    for (name, p), g in zip(model.named_parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
