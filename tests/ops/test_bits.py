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


@pytest.mark.parametrize("case", ["nhwc-bits-in-kernel-4", "nchw-packed-after-5", "one-program-wide-C"])
def test_cuda_tail_applies_the_running_updates_in_its_launch(case, cuda_target, monkeypatch):
    """csrc's batch_norm_act_forward_running (the host runner without a GPU): the forward's own
    launch applies up to 4 updates (every thread of its grid a share of the channels: C = 1040 with
    a one-block grid loops), a fifth goes out as bn_running_update; out and bits bitwise those of
    the call without updates, the buffers bitwise bn_running_update_many's on cuda (16-bit
    buffers, mean-only and count-only updates included)."""
    import resnet_kernels.backends.cuda_batch_norm as cbn
    from resnet_kernels.ops.batch_norm import batch_norm_act_bits, bn_running_update_many

    dev = cuda_target
    layout = "nchw" if case.startswith("nchw") else "channels_last"
    shape = {"nhwc-bits-in-kernel-4": (2, 16, 3, 5), "nchw-packed-after-5": (2, 13, 3, 3),
             "one-program-wide-C": (1, 8, 1, 2)}[case]
    y, m, v, w, b, idt = (t.to(dev, torch.float16) if t.dim() == 4 else t.to(dev)
                          for t in _fwd_args(shape, layout))
    Cs = {"nhwc-bits-in-kernel-4": [16, 3, 64, 24], "nchw-packed-after-5": [13, 7, 5, 9, 11],
          "one-program-wide-C": [1040]}[case]

    def make():
        ups = _updates(Cs, torch.float32, seed=5)
        ups[0] = ups[0][:3] + (ups[0][3].float(),) + ups[0][4:]
        if len(ups) > 1:
            ups[1] = (ups[1][0], ups[1][1], ups[1][2].bfloat16(), ups[1][3].half(), ups[1][4], ups[1][5], ups[1][6])
        if len(ups) > 2:
            ups[2] = (ups[2][0], ups[2][1], ups[2][2], None, None, ups[2][5], ups[2][6])  # mean only
        if len(ups) > 3:
            ups[3] = (ups[3][0], ups[3][1], None, None, ups[3][4], ups[3][5], ups[3][6])  # count only
        return ups

    calls = []
    real_call = cbn.call

    def spy(name, *args):
        calls.append(name)
        return real_call(name, *args)

    monkeypatch.setattr(cbn, "call", spy)
    ref_out, ref_bits = batch_norm_act_bits(y, m, v, w, b, idt, backend="cuda")
    a, c = make(), make()
    calls.clear()
    out, bits = batch_norm_act_bits(y, m, v, w, b, idt, updates=a, backend="cuda")
    assert calls[0] == "batch_norm_act_forward_running", calls
    assert calls.count("bn_running_update_many") == (1 if len(Cs) > 4 else 0), calls
    assert torch.equal(out, ref_out) and torch.equal(bits, ref_bits)
    bn_running_update_many(c, backend="cuda")
    for i, (ua, uc) in enumerate(zip(a, c)):
        for name, ta, tc in zip(("running_mean", "running_var", "num_batches_tracked"), ua[2:5], uc[2:5]):
            assert (ta is None) == (tc is None) and (ta is None or torch.equal(ta, tc)), f"{name}[{i}]"
    _check_updated(a, _expected(make()))


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


_NO_UPDATES = ([], [], [], [], [], [], [], [])


def test_batch_norm_act_bits_opcheck_and_not_differentiable():
    from resnet_kernels.ops.batch_norm import batch_norm_act_bits

    y, m, v, w, b, idt = _fwd_args((2, 5, 3, 3), "channels_last")
    torch.library.opcheck(torch.ops.resnet_kernels.batch_norm_act_bits.default,
                          (y, m, v, w, b, idt, None, None, None, None, 1e-5, 1e-5, True, *_NO_UPDATES, "torch"),
                          test_utils=("test_schema", "test_faketensor"))
    # with updates: the schema declares the buffers it mutates (test_schema checks it)
    ups = _updates([5, 7], torch.float32)
    torch.library.opcheck(torch.ops.resnet_kernels.batch_norm_act_bits.default,
                          (y, m, v, w, b, idt, None, None, None, None, 1e-5, 1e-5, True,
                           [u[0] for u in ups], [u[1] for u in ups], [u[2] for u in ups], [u[3] for u in ups],
                           [u[4] for u in ups], [7, 7], [u[5] for u in ups], [u[6] for u in ups], "torch"),
                          test_utils=("test_schema", "test_faketensor"))
    out, _ = batch_norm_act_bits(y.requires_grad_(), m, v, w, b, idt, backend="torch")
    with pytest.raises(RuntimeError, match="no autograd formula"):
        out.sum().backward()


# --------------------------------------------------------------------------------------------
# batch_norm_act_bits' running-statistics updates (the block's, applied by its tail)
# --------------------------------------------------------------------------------------------
def _updates(Cs, buf_dtype, nbt=True, seed=2, factors=None):
    """RunningUpdate tuples for BatchNorms of Cs channels: float32 statistics, buffers of
    buf_dtype (the running_var of the second one float64 where buf_dtype is float32: mixed)."""
    g = torch.Generator().manual_seed(seed)
    ups = []
    for i, C in enumerate(Cs):
        mean, var = torch.randn(C, generator=g).to(DEV), (torch.rand(C, generator=g) + 0.1).to(DEV)
        rm = torch.randn(C, generator=g).to(buf_dtype).to(DEV)
        rv_dt = torch.float64 if (i == 1 and buf_dtype == torch.float32) else buf_dtype
        rv = (torch.rand(C, generator=g) + 0.5).to(rv_dt).to(DEV)
        n = torch.tensor(3 + i, dtype=torch.long, device=DEV) if nbt else None
        f = factors[i] if factors else 0.1 + 0.05 * i
        ups.append((mean, var, rm, rv, n, f, 1.0 + 1.0 / (8 + i)))
    return ups


def _expected(ups):
    """float64 reference of each update: (running_mean, running_var, num_batches_tracked)."""
    out = []
    for mean, var, rm, rv, n, f, unbias in ups:
        erm = None if rm is None else (1 - f) * rm.double() + f * mean.double()
        erv = None if rv is None else (1 - f) * rv.double() + f * unbias * var.double()
        out.append((erm, erv, None if n is None else n + 1))
    return out


def _check_updated(ups, exp):
    for i, ((_, _, rm, rv, n, _, _), (erm, erv, en)) in enumerate(zip(ups, exp)):
        for name, got, want in (("running_mean", rm, erm), ("running_var", rv, erv)):
            if got is None:
                continue
            # one rounding to the buffer's dtype after float32 arithmetic (aten rounds var * unbias to
            # the float32 statistics' dtype first, also for a float64 buffer)
            tol = {torch.float64: 1e-6, torch.float32: 2e-6}.get(got.dtype, 1e-2)
            torch.testing.assert_close(got.double().cpu(), want.cpu(), rtol=tol, atol=tol, msg=f"{name}[{i}]")
        if n is not None:
            assert int(n) == int(en), f"num_batches_tracked[{i}]"


@pytest.mark.parametrize("backend", _backends("batch_norm_act_bits") + (["cuda"] if rt.HAS_GPU else []))
@pytest.mark.parametrize("case", ["block", "five", "wide-few-programs", "half-buffers", "mean-only"])
def test_batch_norm_act_bits_applies_the_running_updates(backend, case):
    """The updates given to batch_norm_act_bits: each buffer as bn_running_update computes it
    (float64 reference), out and bits bitwise those of the call without updates. Cases: a
    bottleneck block's 4 (in triton's launch: C 3, 13, 64, 1040; a float64 running_var); 5 (beyond
    triton's 4 slots: a second launch); C = 1040 with a 1-program grid (the per-program chunk loop);
    16-bit buffers; running_mean without running_var nor count."""
    from resnet_kernels.ops.batch_norm import batch_norm_act_bits

    if backend == "cuda" and case in ("block", "five"):
        pytest.skip("cuda's running-update kernel takes float32/16-bit buffers (the float64 one is refused: "
                    "test_batch_norm_act_bits_refuses_before_any_update)")
    shape = (1, 8, 2, 2) if case == "wide-few-programs" else (2, 16, 5, 5)
    y, m, v, w, b, idt = _fwd_args(shape, "channels_last")
    if case == "block":
        ups = _updates([3, 13, 64, 1040], torch.float32)
    elif case == "five":
        ups = _updates([3, 5, 7, 9, 11], torch.float32)
    elif case == "wide-few-programs":
        ups = _updates([1040, 600], torch.float32, seed=3)
        ups = [(u[0], u[1], u[2], u[3].float(), u[4], u[5], u[6]) for u in ups]
    elif case == "half-buffers":
        ups = _updates([16, 24], torch.bfloat16, nbt=False)
    else:
        ups = [(u[0], u[1], u[2], None, None, u[5], u[6]) for u in _updates([16], torch.float32)]
    exp = _expected(ups)
    ref_out, ref_bits = batch_norm_act_bits(y, m, v, w, b, idt, relu=True, backend=backend)
    out, bits = batch_norm_act_bits(y, m, v, w, b, idt, relu=True, updates=ups, backend=backend)
    assert torch.equal(out, ref_out) and torch.equal(bits, ref_bits)
    _check_updated(ups, exp)


@pytest.mark.parametrize("backend", _backends("batch_norm_act_bits"))
def test_batch_norm_act_bits_with_updates_matches_bn_running_update(backend):
    """Bitwise the buffers bn_running_update_many writes on the same backend (the block's commit
    before)."""
    from resnet_kernels.ops.batch_norm import batch_norm_act_bits, bn_running_update_many

    y, m, v, w, b, idt = _fwd_args((2, 16, 3, 3), "nchw")
    a, c = _updates([16, 40, 8], torch.float32), _updates([16, 40, 8], torch.float32)
    batch_norm_act_bits(y, m, v, w, b, idt, updates=a, backend=backend)
    bn_running_update_many(c, backend=backend)
    for ua, uc in zip(a, c):
        for ta, tc in zip(ua[2:5], uc[2:5]):
            assert torch.equal(ta, tc)


def test_batch_norm_act_bits_refuses_before_any_update():
    """Bad updates raise naming the argument, and no buffer (nor count) has changed."""
    from resnet_kernels.ops.batch_norm import batch_norm_act_bits

    y, m, v, w, b, idt = _fwd_args((2, 8, 3, 3), "channels_last")
    ups = _updates([8, 4], torch.float32)
    before = [[t.clone() for t in u[2:5]] for u in ups]

    def unchanged():
        for u, bf in zip(ups, before):
            for t, t0 in zip(u[2:5], bf):
                assert torch.equal(t, t0)

    with pytest.raises(ValueError, match=r"running_mean\[1\] shares memory with mean"):
        batch_norm_act_bits(y, m, v, w, b, idt, updates=[ups[0], (m[:4], m[:4], m[4:], None, None, 0.1, 1.0)],
                            backend="torch")
    unchanged()
    with pytest.raises(ValueError, match=r"running_var\[1\] shares memory with running_mean\[0\]"):
        batch_norm_act_bits(y, m, v, w, b, idt, updates=[ups[0], (ups[1][0], ups[1][1], None, ups[0][2][:4], None,
                                                                  0.1, 1.0)], backend="torch")
    unchanged()
    with pytest.raises(TypeError, match=r"batch_norm_act_bits: updates\[1\] must be a"):
        batch_norm_act_bits(y, m, v, w, b, idt, updates=[ups[0], ups[1][:6]], backend="torch")
    unchanged()
    bad_nbt = ups[1][:4] + (torch.zeros((), dtype=torch.int32, device=DEV),) + ups[1][5:]
    with pytest.raises(ValueError, match=r"num_batches_tracked\[1\] must be a one-element int64"):
        batch_norm_act_bits(y, m, v, w, b, idt, updates=[ups[0], bad_nbt], backend="torch")
    unchanged()
    with pytest.raises(ValueError, match=r"identity must"):
        batch_norm_act_bits(y, m, v, w, b, idt[:1], updates=ups, backend="torch")
    unchanged()
    if "cuda" in _registry.backend_names(include_hidden=True):
        from resnet_kernels.backends import _cuda_bits_supports
        from resnet_kernels.ops.batch_norm import bits_call

        f64 = [(u[0], u[1], u[2], u[3].double(), u[4], u[5], u[6]) for u in ups]
        lists = ([u[0] for u in f64], [u[1] for u in f64], [u[2] for u in f64], [u[3] for u in f64],
                 [u[4] for u in f64], [7, 7], [u[5] for u in f64], [u[6] for u in f64])
        why = _cuda_bits_supports(bits_call(y, m, v, w, b, idt, None, None, None, None, 1e-5, 1e-5, True, *lists))
        assert why is not None and why.startswith("the running-statistics updates: float64"), why


def test_batch_norm_act_bits_empty_batch_still_updates():
    from resnet_kernels.ops.batch_norm import batch_norm_act_bits

    y = torch.empty((0, 8, 3, 3), device=DEV)
    m, v = torch.zeros(8, device=DEV), torch.ones(8, device=DEV)
    ups = _updates([8], torch.float32)
    exp = _expected(ups)
    out, bits = batch_norm_act_bits(y, m, v, updates=ups, backend="torch")
    assert out.shape == y.shape and bits.numel() == 0
    _check_updated(ups, exp)


def test_the_accountant_counts_the_updates_in_the_tail():
    """triton and cuda apply up to 4 updates in the forward's own launch (their bytes only), beyond
    that one bn_running_update launch more; aten adds its bn_running_update's cost."""
    from resnet_kernels.ops.batch_norm import RunningUpdate, UpdateCall, bits_call

    y = torch.empty((256, 256, 56, 56), dtype=torch.bfloat16, device="meta").contiguous(
        memory_format=torch.channels_last)
    m = torch.empty(256, device="meta")

    def ups(n):
        t = [torch.empty(256, device="meta") for _ in range(4 * n)]
        nbt = [torch.empty((), dtype=torch.long, device="meta") for _ in range(n)]
        return [RunningUpdate(t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3], nbt[i], 0.1, 1.0) for i in range(n)]

    def call(u):
        lists = ([x[0] for x in u], [x[1] for x in u], [x[2] for x in u], [x[3] for x in u], [x[4] for x in u],
                 [7] * len(u), [x[5] for x in u], [x[6] for x in u])
        return bits_call(y, m, m, m, m, y, m, m, m, m, 1e-5, 1e-5, True, *lists)

    plain = bits_call(y, m, m, m, m, y, m, m, m, m, 1e-5, 1e-5, True)
    upd = _registry.get_impl("bn_running_update", "triton").cost
    for backend in ("triton", "cuda", "aten"):
        cost = _registry.get_impl("batch_norm_act_bits", backend).cost
        ucost = _registry.get_impl("bn_running_update", backend).cost
        for n in (1, 4, 5):
            u = ups(n)
            ul, ub = ucost(UpdateCall(u, y.device))
            extra = (0 if n <= 4 else 1) if backend in ("triton", "cuda") else ul
            assert cost(call(u)) == (cost(plain)[0] + extra, cost(plain)[1] + ub), (backend, n)
    assert upd(UpdateCall(ups(4), y.device))[0] == 1


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


# fake implementations of batch_norm_act_bits for the measured 'auto' (registered by the test below)
_FAKE_TAIL_RAN: list = []


def _fake_tail_wrong_running(*args, running=None, **kw):
    """The torch forward, its running update with the factor doubled: out right, buffers wrong."""
    from resnet_kernels.backends import torch_batch_norm

    _FAKE_TAIL_RAN.append("wrong")
    torch_batch_norm.batch_norm_act_forward(*args, **kw)
    if running:
        torch_batch_norm.bn_running_update([u._replace(factor=2 * u.factor) for u in running])


def _fake_tail_ok(*args, running=None, **kw):
    from resnet_kernels.backends import torch_batch_norm

    _FAKE_TAIL_RAN.append("ok")
    torch_batch_norm.batch_norm_act_forward(*args, running=running, **kw)


def test_auto_measures_the_tail_with_updates_on_copies(monkeypatch, tmp_path):
    """'auto' measuring batch_norm_act_bits with updates (the call mutates): every candidate runs
    on copies of the buffers, which the verification compares (a candidate updating them wrong is
    excluded), and the chosen one then updates the real buffers exactly once."""
    import sys

    from resnet_kernels import _tune
    from resnet_kernels._registry import Backend, Impl
    from resnet_kernels.ops.batch_norm import batch_norm_act_bits

    monkeypatch.setenv("RESNET_KERNELS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("RESNET_KERNELS_TUNE", raising=False)
    sys.modules.setdefault(__name__, sys.modules[__name__])
    times = {"wrong": 0.1, "ok": 0.5}

    def timer(fn, device):
        _FAKE_TAIL_RAN.clear()
        fn()
        return times[_FAKE_TAIL_RAN[-1]] if _FAKE_TAIL_RAN else 10.0

    impls = [Impl("batch_norm_act_bits", name, f"{__name__}:{fn}", priority=95, auto_on=("cpu",))
             for name, fn in (("faketail", "_fake_tail_ok"), ("faketailbad", "_fake_tail_wrong_running"))]
    y, m, v, w, b, idt = _fwd_args((2, 8, 3, 3), "channels_last")
    ups = _updates([8, 5], torch.float32)
    exp = _expected(ups)
    with _registry.registered(Backend("faketail", "", lambda d: None), [impls[0]]), \
            _registry.registered(Backend("faketailbad", "", lambda d: None), [impls[1]]), \
            _tune.testing(timer=timer, devices=("cpu",)):
        with pytest.warns(_tune.TuningWarning, match=r"'faketailbad' implementation of batch_norm_act_bits.*"
                                                     r"running_mean\[0\]"), _tune.recording() as decisions:
            out, bits = batch_norm_act_bits(y, m, v, w, b, idt, updates=ups, backend="auto")
        assert [d.impl for d in decisions] == ["faketail"], decisions
    _check_updated(ups, exp)  # once: the candidates' runs changed copies only
    ref_out, ref_bits = batch_norm_act_bits(y, m, v, w, b, idt, backend="torch")
    assert torch.equal(out, ref_out) and torch.equal(bits, ref_bits)
