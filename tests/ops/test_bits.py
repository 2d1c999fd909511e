"""The 1-bit ReLU mask (resnet_kernels/_bits.py) and the ops that read it instead of an activation:
``batch_norm_act_coef``'s ``out`` and ``conv2d_backward``'s ``mask`` / ``res_mask`` give the same
results with the bits as with the tensor they were packed from (bitwise: the mask is exact), on
triton (interpreter without a GPU), aten and torch; bad bits are refused with a message naming the
argument. Small shapes: seconds in all.
"""

from __future__ import annotations

import pytest
import torch

import rk_testing as rt
from resnet_kernels import _bits, _registry
from resnet_kernels.ops.batch_norm import batch_norm_act_coef
from resnet_kernels.ops.conv_backward import conv2d_backward

DEV = rt.DEVICE
LAYOUTS = ["nchw", "channels_last"]


def _backends(op):
    have = {i.backend for i in _registry.implementations(op, include_hidden=True)}
    out = [b for b in ("torch", "aten") if b in have]
    if "triton" in have and (rt.HAS_GPU or rt.interpreting()):
        out.append("triton")
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("C", [3, 8, 13, 64])
def test_pack_unpack_round_trip(C, layout):
    t = rt.layouts(torch.randn(1, C, 3, 5, dtype=torch.float64), layout)
    t[0, 0, 0, 0] = 0.0  # > 0, not >= 0
    b = _bits.pack(t)
    assert b.dtype == torch.uint8 and tuple(b.shape) == (1, 3, 5, (C + 7) // 8) and b.is_contiguous()
    assert _bits.is_bits(b) and not _bits.is_bits(t)
    # bit c % 8 of byte [n, h, w, c // 8], independent of the layout
    for c in range(C):
        got = (b[0, :, :, c // 8] >> (c % 8)) & 1
        assert torch.equal(got.bool(), t[0, c] > 0)
    if C % 8:
        assert not (b[..., -1] >> (C % 8)).any(), "the bits past C are 0"
    u = _bits.unpack(b, t)
    assert u.dtype == torch.bool and torch.equal(u, t > 0) and u.stride() == (t > 0).stride()


class _ConvCase:
    """A 3x3 stride-2 conv backward (Cin 12, Cout 10: not multiples of 8) with a tail mask ("tail":
    mask, coef, upstream) or a shortcut's masked residual ("first-id")."""

    def __init__(self, layout, config):
        gen = torch.Generator().manual_seed(0)
        N, Cin, H, Cout = 2, 12, 9, 10
        OH = (H + 2 - 3) // 2 + 1

        def act(shape, relu=False):
            t = torch.randn(shape, generator=gen)
            return rt.layouts(torch.relu(t) if relu else t, layout).to(DEV)

        def vec(n, lo=-1.0, hi=1.0):
            return (torch.rand(n, generator=gen) * (hi - lo) + lo).to(DEV)

        self.stride, self.padding = (2, 2), (1, 1)
        up = config == "tail"
        self.g = act((N, Cout, OH, OH))
        self.x = act((N, Cin, H, H), relu=up)
        self.weight = (torch.randn((Cout, Cin, 3, 3), generator=gen) / 3).to(DEV)
        self.mask = act((N, Cout, OH, OH)) if up else None
        self.y = act((N, Cout, OH, OH))
        self.mean = vec(Cout)
        self.coef = torch.stack([vec(Cout, 0.5, 1.5), vec(Cout), vec(Cout)])
        self.residual = act((N, Cin, H, H)) if not up else None
        self.res_mask = act((N, Cin, H, H)) if not up else None
        self.up = up
        self.up_y = act((N, Cin, H, H)) if up else None
        self.up_mean, self.up_var, self.up_weight = (vec(Cin), vec(Cin, 0.5, 2.0), vec(Cin, 0.5, 1.5)) if up else (
            None, None, None)

    def run(self, backend, device=None):
        return conv2d_backward(self.g, self.x, self.weight, stride=self.stride, padding=self.padding, mask=self.mask,
                               y=self.y, mean=self.mean, coef=self.coef, residual=self.residual,
                               res_mask=self.res_mask, up_y=self.up_y, up_mean=self.up_mean, up_var=self.up_var,
                               up_weight=self.up_weight, need_up_weight=self.up, need_up_bias=self.up,
                               backend=backend)


def _conv_case(layout, config):
    return _ConvCase(layout, config)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", _backends("conv2d_backward"))
def test_conv2d_backward_reads_bits_like_the_mask(backend, layout):
    # tail: mask (Cout = 10, not a multiple of 8); first-id: res_mask (Cin = 12)
    for config in ("tail", "first-id"):
        case = _conv_case(layout, config)
        want = case.run(backend, device=DEV)
        if case.mask is not None:
            case.mask = _bits.pack(case.mask)
        if case.res_mask is not None:
            case.res_mask = _bits.pack(case.res_mask)
        got = case.run(backend, device=DEV)
        for name, a, b in zip(("grad_x", "grad_weight", "up_coef", "up_grad_weight", "up_grad_bias"), got, want):
            assert (a is None) == (b is None), name
            if a is not None:
                assert torch.equal(a, b), (config, name)


def _coef_args(layout, C=11, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    shape = (2, C, 3, 4)

    def act():
        return rt.layouts(torch.randn(shape, generator=g).to(dtype), layout).to(DEV)

    y, grad_out, out, identity = act(), act(), act(), act()
    var, mean = torch.var_mean(y.float(), dim=(0, 2, 3), correction=0)
    ivar, imean = torch.var_mean(identity.float(), dim=(0, 2, 3), correction=0)
    w = torch.rand(C, generator=g).to(DEV) + 0.5
    return grad_out, out, y, mean, var, w, identity, imean, ivar, w.flip(0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", _backends("batch_norm_act_coef"))
def test_batch_norm_act_coef_reads_bits_like_out(backend, layout):
    grad_out, out, *rest = _coef_args(layout)
    kw = dict(relu=True, need_weight=True, need_bias=True, need_id_weight=True, need_id_bias=True, backend=backend)
    want = batch_norm_act_coef(grad_out, out, *rest, **kw)
    got = batch_norm_act_coef(grad_out, _bits.pack(out), *rest, **kw)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_reads_and_writes_bits(layout, cuda_target):
    """The cuda backend (csrc on the host runner without a GPU): the bits written by its forward
    and read by its reduce kernel (and by the convolution backward's torch passes) give what the
    full mask gives."""
    from resnet_kernels.ops.batch_norm import batch_norm_act, batch_norm_act_bits

    dev = cuda_target
    grad_out, out, *rest = (t.to(dev) if t is not None else None for t in _coef_args(layout, dtype=torch.float16))
    kw = dict(relu=True, need_weight=True, need_bias=True, need_id_weight=True, need_id_bias=True, backend="cuda")
    want = batch_norm_act_coef(grad_out, out, *rest, **kw)
    got = batch_norm_act_coef(grad_out, _bits.pack(out), *rest, **kw)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    case = _ConvCase(layout, "first-id")
    for name in ("g", "x", "weight", "y", "residual", "res_mask"):
        setattr(case, name, getattr(case, name).to(dev, torch.float16))
    case.mean, case.coef = case.mean.to(dev), case.coef.to(dev)
    case.mask = torch.relu(case.g)  # a tail mask too
    want = case.run("cuda")
    case.mask, case.res_mask = _bits.pack(case.mask), _bits.pack(case.res_mask)
    got = case.run("cuda")
    for a, b in zip(got, want):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
    y, m, v, w, b, idt = (t.to(dev) for t in _fwd_args((2, 13, 3, 5), layout, torch.float16))
    o, bits = batch_norm_act_bits(y, m, v, w, b, idt, backend="cuda")
    assert torch.equal(o, batch_norm_act(y, m, v, w, b, idt, backend="cuda")) and torch.equal(bits, _bits.pack(o))


def test_bad_bits_are_named():
    grad_out, out, *rest = _coef_args("channels_last")
    bits = _bits.pack(out)
    with pytest.raises(ValueError, match=r"out as a packed ReLU mask must be a contiguous uint8 tensor of shape"):
        batch_norm_act_coef(grad_out, bits[..., :1].contiguous(), *rest, backend="torch")
    with pytest.raises(ValueError, match=r"not contiguous"):
        batch_norm_act_coef(grad_out, bits.transpose(1, 2).contiguous().transpose(1, 2), *rest, backend="torch")
    with pytest.raises(TypeError, match=r"out must be a tensor like grad_out .* or a uint8 packed ReLU mask"):
        batch_norm_act_coef(grad_out, bits.to(torch.int32), *rest, backend="torch")
    case = _conv_case("nchw", "first-id")
    g, x, w = case.g, case.x, case.weight
    with pytest.raises(ValueError, match=r"mask as a packed ReLU mask must be .* \(2, 5, 5, 2\)"):
        conv2d_backward(g, x, w, stride=(2, 2), padding=(1, 1), mask=_bits.pack(x), backend="torch")
    with pytest.raises(ValueError, match=r"res_mask as a packed ReLU mask must be .* \(2, 9, 9, 2\)"):
        conv2d_backward(g, x, w, stride=(2, 2), padding=(1, 1), residual=x, res_mask=_bits.pack(g), backend="aten")


def test_opcheck_with_bits():
    case = _conv_case("channels_last", "first-id")
    args = (case.g, None, case.y, case.mean, case.coef, case.x, case.weight, list(case.stride), list(case.padding),
            case.residual, _bits.pack(case.res_mask), None, None, None, None, None, 1e-5, True, True, False, False,
            "aten")
    torch.library.opcheck(torch.ops.resnet_kernels.conv2d_backward.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    grad_out, out, y, mean, var, w, *_ = _coef_args("nchw")
    args = (grad_out, _bits.pack(out), y, mean, var, w, None, None, None, None, 1e-5, 1e-5, True, True, True,
            False, False, None, None, "torch")
    torch.library.opcheck(torch.ops.resnet_kernels.batch_norm_act_coef.default, args,
                          test_utils=("test_schema", "test_faketensor"))


# --------------------------------------------------------------------------------------------
# the producer: batch_norm_act_bits (the block tail's forward)
# --------------------------------------------------------------------------------------------
def _fwd_args(shape, layout, dtype=torch.float32):
    from resnet_kernels.ops.batch_norm import batch_norm_act_bits  # noqa: F401 (the op is registered)

    g = torch.Generator().manual_seed(1)
    C = shape[1]
    y = rt.layouts(torch.randn(shape, generator=g).to(dtype), layout).to(DEV)
    idt = rt.layouts(torch.randn(shape, generator=g).to(dtype), layout).to(DEV)
    m, v = (torch.randn(C, generator=g) * 0.1).to(DEV), (torch.rand(C, generator=g) + 0.5).to(DEV)
    w, b = torch.randn(C, generator=g).to(DEV), torch.randn(C, generator=g).to(DEV)
    return y, m, v, w, b, idt


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", _backends("batch_norm_act_bits"))
def test_batch_norm_act_bits_writes_out_and_its_mask(backend, layout):
    from resnet_kernels.ops.batch_norm import batch_norm_act, batch_norm_act_bits

    # C = 13: not a multiple of 8 (NCHW: packed after the triton kernel); C = 16 NCHW: in the kernel
    for shape in ((2, 13, 3, 5), (2, 16, 5, 5), (1, 3, 4, 4)):
        y, m, v, w, b, idt = _fwd_args(shape, layout)
        out, bits = batch_norm_act_bits(y, m, v, w, b, idt, relu=True, backend=backend)
        assert torch.equal(out, batch_norm_act(y, m, v, w, b, idt, relu=True, backend=backend))
        assert bits.dtype == torch.uint8 and tuple(bits.shape) == _bits.bits_shape(shape) and bits.is_contiguous()
        assert torch.equal(bits, _bits.pack(out)), shape


@pytest.mark.skipif(not (rt.HAS_GPU or rt.interpreting()), reason="triton needs a GPU or TRITON_INTERPRET=1")
def test_triton_bits_with_several_channel_and_plane_tiles():
    """Tiles that split the channels (channels_last, C = 200: 8-channel aligned column blocks) and
    plane tiles forced to 8 rows (NCHW, C = 16, 33x33 planes): every byte written by one program."""
    from resnet_kernels.ops.batch_norm import batch_norm_act_bits

    for shape, layout in (((1, 1040, 2, 2), "channels_last"), ((2, 16, 33, 33), "nchw")):
        y, m, v, *_ = _fwd_args(shape, layout, torch.bfloat16)
        out, bits = batch_norm_act_bits(y, m, v, relu=True, backend="triton")
        assert torch.equal(bits, _bits.pack(out)), layout


def test_batch_norm_act_bits_opcheck_and_not_differentiable():
    from resnet_kernels.ops.batch_norm import batch_norm_act_bits

    y, m, v, w, b, idt = _fwd_args((2, 5, 3, 3), "channels_last")
    torch.library.opcheck(torch.ops.resnet_kernels.batch_norm_act_bits.default,
                          (y, m, v, w, b, idt, None, None, None, None, 1e-5, 1e-5, True, "torch"),
                          test_utils=("test_schema", "test_faketensor"))
    out, _ = batch_norm_act_bits(y.requires_grad_(), m, v, w, b, idt, backend="torch")
    with pytest.raises(RuntimeError, match="not differentiable"):
        out.sum().backward()


def test_the_accountant_counts_the_bits():
    from resnet_kernels.backends import nbytes
    from resnet_kernels.ops.batch_norm import bits_call, forward_call

    y = torch.empty((256, 256, 56, 56), dtype=torch.bfloat16, device="meta").contiguous(
        memory_format=torch.channels_last)
    m = torch.empty(256, device="meta")
    fwd, bits = forward_call(*(y, m, m, m, m, y, m, m, m, m, 1e-5, 1e-5, True)), bits_call(
        *(y, m, m, m, m, y, m, m, m, m, 1e-5, 1e-5, True))
    t_fwd = _registry.get_impl("batch_norm_act", "triton").cost(fwd)
    t_bits = _registry.get_impl("batch_norm_act_bits", "triton").cost(bits)
    assert t_bits == (t_fwd[0], t_fwd[1] + y.numel() // 8)  # same kernel, + the bits written
    c_fwd = _registry.get_impl("batch_norm_act", "cuda").cost(fwd)
    assert _registry.get_impl("batch_norm_act_bits", "cuda").cost(bits) == (c_fwd[0], c_fwd[1] + y.numel() // 8)
    y13 = torch.empty((256, 13, 56, 56), dtype=torch.bfloat16, device="meta")  # NCHW, C % 8 != 0
    m13 = torch.empty(13, device="meta")
    args13 = (y13, m13, m13, None, None, None, None, None, None, None, 1e-5, 1e-5, True)
    c_fwd = _registry.get_impl("batch_norm_act", "cuda").cost(forward_call(*args13))
    B13 = 256 * 56 * 56 * 2
    assert _registry.get_impl("batch_norm_act_bits", "cuda").cost(bits_call(*args13)) == (
        c_fwd[0] + 1, c_fwd[1] + nbytes(y13) + B13)  # csrc's pack launch: read out, write the bits
    plain = _registry.get_impl("batch_norm_act", "aten").cost(fwd)
    with_bits = _registry.get_impl("batch_norm_act_bits", "aten").cost(bits)
    assert with_bits[0] > plain[0] and with_bits[1] > plain[1] + y.numel() // 8  # packed afterwards
    b = torch.empty(_bits.bits_shape(y.shape), dtype=torch.uint8, device="meta")
    assert nbytes(b) == y.numel() // 8


# --------------------------------------------------------------------------------------------
# the training block saves the bits, not its output
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if (rt.HAS_GPU or rt.interpreting()) else []))
def test_the_block_saves_the_bits_and_not_its_output(backend):
    import torchvision

    import resnet_kernels as rk
    from resnet_kernels import _block

    torch.manual_seed(0)
    blk = rk.fuse(torchvision.models.resnet.BasicBlock(8, 8), backend=backend).to(DEV)
    x = torch.randn(2, 8, 5, 5, device=DEV).contiguous(memory_format=torch.channels_last).requires_grad_()
    out = blk(x)
    fn = out.grad_fn
    assert type(fn).__name__ == _block._BlockFn.__name__ + "Backward"
    saved = fn.saved_tensors
    assert not any(t.data_ptr() == out.data_ptr() for t in saved), "the block's output is saved"
    bits = [t for t in saved if t.dtype == torch.uint8]
    assert len(bits) == 1 and torch.equal(bits[0], _bits.pack(out.detach()))
    out.backward(torch.randn_like(out))
    assert x.grad is not None


# --------------------------------------------------------------------------------------------
# the cuda backend's csrc kernels write and read the bits themselves (csrc/batch_norm.cu)
# --------------------------------------------------------------------------------------------
CUDA_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_forward_writes_every_byte_of_the_bits(layout, dtype, cuda_target):
    """csrc batch_norm_act_forward with bits: equal to ``_bits.pack(out)`` into a poisoned buffer
    (every byte written, the bits past C zero), relu on and off, with and without the identity: in
    the forward kernel (16-bit channels_last, C % 8 == 0: 8 channels a thread; C = 520: several
    column tiles) and by the pack launch (float32, NCHW, C % 8 != 0)."""
    from resnet_kernels.backends import cuda_batch_norm

    dev = cuda_target
    shapes = [(1, C, 7, 7) for C in (3, 8, 13, 64)] + [(1, 520, 2, 2)]
    zeros = 0
    for shape in shapes:
        y, m, v, w, b, idt = (t.to(dev) for t in _fwd_args(shape, layout, dtype))
        C = shape[1]
        inner = 1 if layout == "channels_last" else shape[2] * shape[3]
        for relu in (True, False):
            for identity in (None, idt):
                out = torch.full_like(y, float("nan"))
                bits = torch.full(_bits.bits_shape(shape), 0xA5, dtype=torch.uint8, device=dev)
                cuda_batch_norm.batch_norm_act_forward(y, m, v, w, b, identity, None, None, None, None, out, 1e-5,
                                                       1e-5, relu, C, inner, mask_bits=bits)
                assert not out.isnan().any()
                assert torch.equal(bits, _bits.pack(out)), (shape, relu, identity is None)
                zeros += int((out <= 0).sum()) if relu else 0
    assert zeros > 0  # some bits are 0 (relu zeros are not > 0)


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_coef_reads_bits_like_out(layout, dtype, cuda_target):
    """csrc's reduce kernel reading the bits (out_bits) gives bitwise what it gives reading out: one
    byte per 8 channels (channels_last 16-bit, C % 8 == 0), one per element (float32, C % 8 != 0,
    NCHW), with and without the identity's BN."""
    dev = cuda_target
    for C in (3, 8, 13, 64):
        grad_out, out, *rest = (t.to(dev) for t in _coef_args(layout, C=C, dtype=dtype))
        bits = _bits.pack(out)
        for with_id in (True, False):
            args = rest if with_id else rest[:4] + [None] * 4
            kw = dict(relu=True, need_weight=True, need_bias=True, need_id_weight=with_id, need_id_bias=with_id,
                      backend="cuda")
            want = batch_norm_act_coef(grad_out, out, *args, **kw)
            got = batch_norm_act_coef(grad_out, bits, *args, **kw)
            for a, b in zip(got, want):
                assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), (C, with_id)
            masked = torch.where(out > 0, grad_out, torch.zeros((), dtype=dtype, device=dev))
            plain = batch_norm_act_coef(masked, out, *args, **{**kw, "relu": False})
            for a, b in zip(got, plain):  # the mask is applied (not a no-op)
                assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), (C, with_id)
