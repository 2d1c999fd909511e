"""The fused convolution backward of a training unit, defined once with ``torch.library``:

    conv2d_backward(g, mask, y, mean, coef, x, weight, ..., residual, res_mask, up_y, up_mean, up_var, up_weight,
                    up_bias) -> (grad_x, grad_weight, up_coef, up_grad_weight, up_grad_bias)

The convolution's input and weight gradients where the gradient operand is the BatchNorm backward
of the unit the convolution belongs to, computed on the fly from the unit's incoming gradient
``g`` (masked by ``mask > 0``: the ReLU of a block tail), its saved conv output ``y`` and three
per-channel coefficients ``coef`` = (A, B, K): dy = A * g' - (B + K * (y - mean)) — never written
to memory by the fused implementation. Two more things happen in the epilogue of the input
gradient:

* ``residual`` (optionally masked by ``res_mask > 0``) is added: the other branch's gradient of a
  block input, summed here instead of by autograd's accumulate kernel;
* with ``up_y`` (the *upstream* unit: ``x`` is relu(bn_up(up_y)), the previous unit's output),
  grad_x is masked by ``x > 0`` (that unit's ReLU) and reduced per channel into that unit's BN
  coefficients ``up_coef`` and its parameter gradients: the upstream unit's whole BN backward
  except its operand, which its own ``conv2d_backward`` computes from grad_x, up_y and up_coef.

``x`` may be None when ``up_y`` is given (the forward convolved relu(bn_up(up_y)) without writing it):
x is then h = relu(up_y * s + t), s = up_weight * rsqrt(up_var + up_eps), t = up_bias - up_mean * s
(up_weight None: 1, up_bias None: 0), in the accumulation dtype, rounded to the activation dtype —
what ``batch_norm_act`` would have written (the contract: ``torch_conv_backward.upstream_input``).
The fused implementation recomputes it where it reads x (the wgrad's operand load, the dgrad
epilogue's ReLU mask) and never writes it; x's shape, dtype and layout are up_y's then.

The math every implementation follows, argument for argument, is
``resnet_kernels/backends/torch_conv_backward.py``. Implementations (registry): ``triton`` (the
dgrad kernel with the operand prologue and the epilogue above, finalized in its launch; the wgrad
kernel with the same prologue and a deterministic split-K), ``aten`` (the operand materialised
once by PyTorch's elementwise ops, then ``aten.convolution_backward``: cuDNN's dgrad and wgrad),
``torch`` (the reference, in the accumulation dtype). Outputs that are not requested are returned
as empty tensors (a custom op cannot return None).

This op is used inside a backward (``resnet_kernels/ops/block.py``, the training residual block
as one autograd function); it has no derivative of its own (double backward is not supported
through it).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import _alloc, _tune
from .._bits import check_mask, is_bits
from .._checks import acc_dtype, check_activation, check_channel_vector, check_layout, check_like
from .._numerics import cudnn_conv_tf32_enabled, mismatch, verify_rtol

OP = "conv2d_backward"
_NEEDS = ("grad_x", "grad_weight", "up_grad_weight", "up_grad_bias")


def _out_hw(H: int, W: int, KH: int, KW: int, stride, padding) -> Tuple[int, int]:
    return (H + 2 * padding[0] - KH) // stride[0] + 1, (W + 2 * padding[1] - KW) // stride[1] + 1


def _pair_list(name: str, v, minimum: int) -> Tuple[int, int]:
    if (not isinstance(v, (list, tuple)) or len(v) != 2
            or any(isinstance(e, bool) or not isinstance(e, int) or e < minimum for e in v)):
        raise ValueError(f"{OP}: {name} must be a list of two ints >= {minimum}, got {v!r}")
    return int(v[0]), int(v[1])


def _validate(g, mask, y, mean, coef, x, weight, stride, padding, residual, res_mask, up_y, up_mean, up_var,
              up_weight, needs, up_bias=None) -> Tuple[str, str]:
    op = OP
    check_activation(op, "g", g)
    g_layout = check_layout(op, "g", g)
    if x is None:  # x = relu(bn_up(up_y)), recomputed from up_y: up_y stands for x's shape, dtype and layout
        if up_y is None:
            raise ValueError(f"{op}: x must be given unless up_y is given (x = None: x is recomputed as "
                             "relu(up_y * s + t) from the upstream unit's up_y and BN)")
        xname, xs = "up_y", up_y
    else:
        xname, xs = "x", x
    check_activation(op, xname, xs)
    x_layout = check_layout(op, xname, xs)
    if xs.dtype != g.dtype:
        raise TypeError(f"{op}: {xname} must have the dtype of g ({g.dtype}), got {xs.dtype}")
    if xs.device != g.device:
        raise ValueError(f"{op}: {xname} must be on g's device ({g.device}), got {xs.device}")
    x = xs
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        raise ValueError(f"{op}: weight must be a 4-D (Cout, Cin, KH, KW) tensor, got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    if weight.dtype != g.dtype or weight.device != g.device:
        raise TypeError(f"{op}: weight must have g's dtype and device ({g.dtype}, {g.device}), got "
                        f"{weight.dtype}, {weight.device}")
    sh, sw = _pair_list("stride", stride, 1)
    ph, pw = _pair_list("padding", padding, 0)
    N, Cin, H, W = x.shape
    Cout, Cw, KH, KW = weight.shape
    if Cw != Cin:
        raise ValueError(f"{op}: weight must have {xname}'s {Cin} input channels (groups=1), got shape {tuple(weight.shape)}")
    OH, OW = _out_hw(H, W, KH, KW, (sh, sw), (ph, pw))
    if tuple(g.shape) != (N, Cout, OH, OW):
        raise ValueError(f"{op}: g must have the convolution output's shape {(N, Cout, OH, OW)} ({xname} {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}, stride {(sh, sw)}, padding {(ph, pw)}), got {tuple(g.shape)}")
    if mask is not None:  # an activation like g (compared > 0) or its 1-bit mask (resnet_kernels/_bits.py)
        check_mask(op, "mask", mask, g, "g", g_layout)
    if coef is not None:
        if y is None or mean is None:
            raise ValueError(f"{op}: coef (the unit's BN-backward coefficients) needs y and mean")
        check_like(op, "y", y, g, "g", g_layout)
        check_channel_vector(op, "mean", mean, Cout, g)
        acc = acc_dtype(g.dtype)
        if not isinstance(coef, Tensor) or tuple(coef.shape) != (3, Cout) or coef.dtype != acc:
            raise ValueError(f"{op}: coef must be a (3, {Cout}) {acc} tensor of (A, B, K) rows, got "
                             f"{tuple(coef.shape) if isinstance(coef, Tensor) else type(coef).__name__}"
                             f"{' ' + str(coef.dtype) if isinstance(coef, Tensor) else ''}")
        if coef.device != g.device:
            raise ValueError(f"{op}: coef must be on g's device ({g.device}), got {coef.device}")
    elif y is not None or mean is not None:
        raise ValueError(f"{op}: y/mean were given without coef")
    if residual is not None:
        check_like(op, "residual", residual, x, xname, x_layout)
    if res_mask is not None:
        if residual is None:
            raise ValueError(f"{op}: res_mask was given without residual")
        check_mask(op, "res_mask", res_mask, x, xname, x_layout)
    need_x, need_w, need_uw, need_ub = needs
    if up_y is not None:
        if xname == "x":
            check_like(op, "up_y", up_y, x, "x", x_layout)
        for name, t in (("up_mean", up_mean), ("up_var", up_var)):
            if t is None:
                raise ValueError(f"{op}: up_y needs {name} (the upstream unit's batch statistics)")
            check_channel_vector(op, name, t, Cin, x)
        if up_weight is not None:
            check_channel_vector(op, "up_weight", up_weight, Cin, x)
        if up_bias is not None:  # (used only to recompute x; ignored when x is given)
            check_channel_vector(op, "up_bias", up_bias, Cin, x)
        if not need_x:
            raise ValueError(f"{op}: the upstream reductions (up_y) need grad_x (need_x=True)")
    elif (up_mean is not None or up_var is not None or up_weight is not None or up_bias is not None or need_uw
          or need_ub):
        raise ValueError(f"{op}: up_mean/up_var/up_weight/up_bias/need_up_weight/need_up_bias need up_y")
    return g_layout, x_layout


def _stat(t: Optional[Tensor], acc) -> Optional[Tensor]:
    return None if t is None else t.to(acc).contiguous()


def _param(t: Optional[Tensor], g: Tensor, acc) -> Optional[Tensor]:
    """An upstream BN parameter (up_weight, up_bias): kept in acc or the activation dtype, else acc."""
    if t is not None and t.dtype not in (acc, g.dtype):
        t = t.to(acc)
    return None if t is None else t.contiguous()


class BackwardCall:
    """One validated conv2d_backward call, as the registry and the measured 'auto' see it."""

    op = OP

    def __init__(self, g, mask, y, mean, coef, x, weight, stride, padding, residual, res_mask, up_y, up_mean, up_var,
                 up_weight, up_eps, needs, up_bias=None):
        acc = acc_dtype(g.dtype)
        self.g, self.mask, self.y, self.mean, self.coef = g, mask, y, _stat(mean, acc), coef
        # a channels_last weight stays as it is (was: .contiguous(), a copy kernel per call that the
        # accountant never saw); every implementation reads the weight through its strides or packs it
        self.x, self.weight = x, (weight if weight.is_contiguous() or weight.is_contiguous(
            memory_format=torch.channels_last) else weight.contiguous())
        self.stride, self.padding = tuple(int(v) for v in stride), tuple(int(v) for v in padding)
        self.residual, self.res_mask = residual, res_mask
        self.up_y, self.up_mean, self.up_var = up_y, _stat(up_mean, acc), _stat(up_var, acc)
        self.up_weight = _param(up_weight, g, acc)
        # x None: recomputed from up_y (relu(up_y * s + t)); up_bias only matters then
        self.up_bias = _param(up_bias, g, acc) if x is None else None
        self.xs = x if x is not None else up_y  # x's shape, dtype and layout
        self.up_eps = float(up_eps)
        self.needs = tuple(bool(n) for n in needs)
        self.device, self.dtype, self.acc = g.device, g.dtype, acc
        self.allow_tf32 = g.dtype == torch.float32 and cudnn_conv_tf32_enabled()
        self.pdtype = self.up_weight.dtype if self.up_weight is not None else acc

    @property
    def upstream(self) -> bool:
        return self.up_y is not None

    @property
    def x_from_up(self) -> bool:
        """x is not given: recomputed from up_y by every implementation that reads it."""
        return self.x is None

    def key(self) -> str:
        flags = "".join("1" if t is not None else "0" for t in
                        (self.mask, self.coef, self.residual, self.res_mask, self.up_y, self.up_weight))
        if self.x_from_up:  # (x given: the key is unchanged)
            flags += "|xup" + ("1" if self.up_bias is not None else "0")
        xs = self.xs
        lay = "cl" if xs.is_contiguous(memory_format=torch.channels_last) and not xs.is_contiguous() else "c"
        return (f"g{tuple(self.g.shape)}|x{tuple(xs.shape)}|{lay}|{self.dtype}|w{tuple(self.weight.shape)}"
                f"|s{self.stride}|p{self.padding}|{flags}|{''.join(str(int(n)) for n in self.needs)}"
                f"|tf32{int(self.allow_tf32)}|bits{int(is_bits(self.mask))}{int(is_bits(self.res_mask))}")

    def describe(self) -> str:
        return (f"g {tuple(self.g.shape)} {str(self.dtype).replace('torch.', '')}, x {tuple(self.xs.shape)}, weight "
                f"{tuple(self.weight.shape)}, stride {self.stride}, padding {self.padding}"
                f"{', upstream BN' if self.upstream else ''}{' (x recomputed from up_y)' if self.x_from_up else ''}{', residual' if self.residual is not None else ''}")

    def outputs(self, fake: bool = False):
        return _outputs(self.xs, self.weight, self.needs, self.upstream, self.pdtype, self.acc)

    def run(self, impl, fresh: bool = True):
        gx, gw, uc, ugw, ugb = self.outputs()
        impl.load()(self.g, self.mask, self.y, self.mean, self.coef, self.x, self.weight,
                    gx if gx.numel() else None, gw if gw.numel() else None, self.stride, self.padding,
                    self.residual, self.res_mask, self.up_y, self.up_mean, self.up_var, self.up_weight, self.up_eps,
                    uc if uc.numel() else None, ugw if ugw.numel() else None, ugb if ugb.numel() else None,
                    self.allow_tf32, **({"up_bias": self.up_bias} if self.x_from_up else {}))
        return gx, gw, uc, ugw, ugb

    def compare(self, got, ref):
        rtol = verify_rtol(self.dtype, self.allow_tf32)
        for name, a, b in zip(("grad_x", "grad_weight", "up_coef", "up_grad_weight", "up_grad_bias"), got, ref):
            # the coefficients' B and K rows are sums of cancelling terms: measured against row A's scale
            err = mismatch(name, a, b, 2 * rtol)
            if err is not None:
                return err
        return None


def _outputs(x: Tensor, weight: Tensor, needs, upstream: bool, pdtype, acc):
    N, Cin, H, W = x.shape
    need_x, need_w, need_uw, need_ub = needs
    empty = x.new_empty((0,), dtype=x.dtype)
    gx = _alloc.empty_like(x) if need_x else empty
    # grad_weight in the weight's own layout (a channels_last 3x3 weight gets a channels_last gradient):
    # autograd's AccumulateGrad then takes it as .grad instead of copying it into the parameter's strides
    gw = _alloc._fill(torch.empty_like(weight, device=x.device)) if need_w else empty
    uc = _alloc._fill(torch.empty((3, Cin), dtype=acc, device=x.device)) if upstream else x.new_empty((0,), dtype=acc)
    ugw = _alloc._fill(torch.empty((Cin,), dtype=pdtype, device=x.device)) if need_uw else x.new_empty((0,), dtype=pdtype)
    ugb = _alloc._fill(torch.empty((Cin,), dtype=pdtype, device=x.device)) if need_ub else x.new_empty((0,), dtype=pdtype)
    return gx, gw, uc, ugw, ugb


def backward_call(g, mask, y, mean, coef, x, weight, stride, padding, residual, res_mask, up_y, up_mean, up_var,
                  up_weight, up_bias, up_eps, need_x, need_weight, need_up_weight, need_up_bias) -> BackwardCall:
    needs = (need_x, need_weight, need_up_weight, need_up_bias)
    _validate(g, mask, y, mean, coef, x, weight, stride, padding, residual, res_mask, up_y, up_mean, up_var, up_weight,
              needs, up_bias)
    return BackwardCall(g, mask, y, mean, coef, x, weight, stride, padding, residual, res_mask, up_y, up_mean, up_var,
                        up_weight, up_eps, needs, up_bias)


@torch.library.custom_op("resnet_kernels::conv2d_backward", mutates_args=())
def conv2d_backward_op(g: Tensor, mask: Optional[Tensor], y: Optional[Tensor], mean: Optional[Tensor],
                       coef: Optional[Tensor], x: Optional[Tensor], weight: Tensor, stride: List[int], padding: List[int],
                       residual: Optional[Tensor], res_mask: Optional[Tensor], up_y: Optional[Tensor],
                       up_mean: Optional[Tensor], up_var: Optional[Tensor], up_weight: Optional[Tensor],
                       up_bias: Optional[Tensor], up_eps: float,
                       need_x: bool, need_weight: bool, need_up_weight: bool, need_up_bias: bool,
                       backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    call = backward_call(g, mask, y, mean, coef, x, weight, stride, padding, residual, res_mask, up_y, up_mean, up_var,
                         up_weight, up_bias, up_eps, need_x, need_weight, need_up_weight, need_up_bias)
    if g.numel() == 0 or call.xs.numel() == 0:
        _tune.check_requested(OP, backend, call)
        gx, gw, uc, ugw, ugb = call.outputs()
        for t in (gx, gw, uc, ugw, ugb):  # an empty batch: no gradient flows (statistics undefined: zeros)
            t.zero_()
        return gx, gw, uc, ugw, ugb
    return tuple(_tune.dispatch(OP, backend, call))


@conv2d_backward_op.register_fake
def _(g, mask, y, mean, coef, x, weight, stride, padding, residual, res_mask, up_y, up_mean, up_var, up_weight, up_bias,
      up_eps, need_x, need_weight, need_up_weight, need_up_bias, backend):
    needs = (need_x, need_weight, need_up_weight, need_up_bias)
    _validate(g, mask, y, mean, coef, x, weight, stride, padding, residual, res_mask, up_y, up_mean, up_var, up_weight,
              needs, up_bias)
    x = x if x is not None else up_y  # (x None: up_y has its shape, dtype and layout)
    acc = acc_dtype(g.dtype)
    pdtype = up_weight.dtype if up_weight is not None and up_weight.dtype in (acc, g.dtype) else acc
    N, Cin, H, W = x.shape
    gx = torch.empty_like(x) if need_x else x.new_empty((0,))
    gw = torch.empty_like(weight, device=x.device) if need_weight else x.new_empty((0,))
    uc = x.new_empty((3, Cin) if up_y is not None else (0,), dtype=acc)
    ugw = x.new_empty((Cin,) if need_up_weight else (0,), dtype=pdtype)
    ugb = x.new_empty((Cin,) if need_up_bias else (0,), dtype=pdtype)
    return gx, gw, uc, ugw, ugb


def conv2d_backward(g: Tensor, x: Optional[Tensor], weight: Tensor, *, stride=(1, 1), padding=(0, 0),
                    mask: Optional[Tensor] = None, y: Optional[Tensor] = None, mean: Optional[Tensor] = None,
                    coef: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                    res_mask: Optional[Tensor] = None, up_y: Optional[Tensor] = None, up_mean: Optional[Tensor] = None,
                    up_var: Optional[Tensor] = None, up_weight: Optional[Tensor] = None,
                    up_bias: Optional[Tensor] = None, up_eps: float = 1e-5,
                    need_x: bool = True, need_weight: bool = True, need_up_weight: bool = False,
                    need_up_bias: bool = False, backend: str = "auto"):
    """(grad_x, grad_weight, up_coef, up_grad_weight, up_grad_bias), unrequested ones as None.
    x may be None when up_y is given: x = relu(up_y * s + t), the upstream unit's output recomputed
    from up_y, up_mean, up_var, up_weight, up_bias, up_eps (module docstring).
    See the module docstring and ``backends/torch_conv_backward.py`` for the math."""
    outs = conv2d_backward_op(g, mask, y, mean, coef, x, weight, list(stride), list(padding), residual, res_mask, up_y,
                              up_mean, up_var, up_weight, up_bias, float(up_eps), bool(need_x), bool(need_weight),
                              bool(need_up_weight), bool(need_up_bias), backend)
    gx, gw, uc, ugw, ugb = outs
    return (gx if need_x else None, gw if need_weight else None, uc if up_y is not None else None,
            ugw if need_up_weight else None, ugb if need_up_bias else None)


# what the accountant costs: the validated call of the op's arguments (resnet_kernels/count.py)
CALLS = {OP: backward_call}

__all__ = ["conv2d_backward", "BackwardCall", "backward_call", "CALLS"]
