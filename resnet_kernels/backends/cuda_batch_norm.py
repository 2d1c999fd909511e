"""CUDA implementations of the training-mode BatchNorm ops (csrc/batch_norm.cu): thin wrappers
turning tensors into the torch-free ``_C`` API. Same arguments and semantics as the reference
launchers in torch_batch_norm.py (the contract); they write into the given outputs and assume
validated, non-empty inputs.

Activations float32/float16/bfloat16 (float64 is refused by the kernels: the op layer's supports()
leaves it to the torch implementation); mean/var float32; parameters, their gradients and the
running buffers float32 or a 16-bit type.

For the accountant (counted from the code, not measured):
* forward: 1 launch; reads y (and identity), writes out (+ 4 or 8 per-channel vectors).
* forward with the 1-bit mask (batch_norm_act_bits, ``mask_bits``): written by the same launch for
  float16/bfloat16 channels_last with C % 8 == 0 (16-byte-aligned activations: fresh allocations);
  otherwise (float32, NCHW, C % 8 != 0) a second csrc launch packs it from out (reads out, writes
  the bits).
* backward: the reduce, whose last-arriving block per column tile (channels_last) or channel (NCHW)
  runs the finalize in the same launch (on ``resnet_kernels._counters``' cached zeroed counters),
  when any per-channel sum is needed (grad_y, grad_weight, grad_bias, grad_id_*, or grad_identity
  with id_mean); an empty batch's finalize alone; + apply when grad_y or grad_identity is needed:
  2 in training with every gradient, 1 for a raw grad_identity alone. The reduce reads grad_out, out
  (relu), y (grad_y/grad_weight) and identity (grad_identity/grad_id_weight with id_mean); the apply
  reads grad_out, out (relu), y (grad_y) and identity (BN'd grad_identity) and writes grad_y and
  grad_identity; the workspace (partials and coefficients) is (3 * P + 8) * C * 4 bytes, P <= 1024.
* coefficients (batch_norm_act_coef): the backward's reduce + finalize alone (1 launch): the same
  entry point with coef/id_coef set and no grad_y/grad_identity; the finalize writes (A, B, K) to
  the (3, C) outputs. A 1-bit ``out`` (resnet_kernels/_bits.py) is read by the reduce kernel
  itself (``out_bits``): its bytes instead of out's.
* running update: 1 launch per 4 BatchNorms (C-sized vectors and num_batches_tracked).
"""

from __future__ import annotations

import torch

from .._bits import is_bits
from .._counters import arrival_counters, drop_arrival_counters
from .cuda_common import DTYPE_CODES, C_module, call, device_guard, fill_args, ptr, stream_of


def _code(t) -> int:
    return 0 if t is None else DTYPE_CODES[t.dtype]


def batch_norm_act_forward(y, mean, var, weight, bias, identity, id_mean, id_var, id_weight, id_bias, out,
                           eps, id_eps, relu, C, inner, mask_bits=None, running=None) -> None:
    """``mask_bits``: the 1-bit mask of out > 0 (resnet_kernels/_bits.py), written by the csrc forward
    (``BatchNormActArgs.bits``: in its kernel for 16-bit channels_last with C % 8 == 0, else by a
    second launch packing out). ``running``: ``bn_running_update``'s updates, the first
    ``_C.bn_running_update_slots`` (4) in the forward's own launch (``batch_norm_act_forward_running``:
    every thread of its grid takes a share of their channels), any more by ``bn_running_update``."""
    C_ = C_module()
    with device_guard(y):
        stream = stream_of(y)
        args = fill_args(
            C_.BatchNormActArgs, dtype=DTYPE_CODES[y.dtype], y=ptr(y), mean=ptr(mean), var=ptr(var),
            weight=ptr(weight), bias=ptr(bias), identity=ptr(identity), id_mean=ptr(id_mean), id_var=ptr(id_var),
            id_weight=ptr(id_weight), id_bias=ptr(id_bias), out=ptr(out), bits=ptr(mask_bits), weight_dtype=_code(weight),
            bias_dtype=_code(bias), id_weight_dtype=_code(id_weight), id_bias_dtype=_code(id_bias), eps=float(eps),
            id_eps=float(id_eps), numel=y.numel(), C=C, inner=inner, relu=bool(relu), stream=stream)
        if running:
            slots = C_.bn_running_update_slots
            call("batch_norm_act_forward_running", args, _running_args(C_, running[:slots], stream))
            running = running[slots:]
        else:
            call("batch_norm_act_forward", args)
    if running:
        bn_running_update(running)


def _backward(grad_out, out, y, mean, var, weight, identity, id_mean, id_var, id_weight, grad_y, grad_identity,
              grad_weight, grad_bias, grad_id_weight, grad_id_bias, coef, id_coef, eps, id_eps, relu, C, inner) -> None:
    C_ = C_module()
    bits = out is not None and is_bits(out)
    code = DTYPE_CODES[grad_out.dtype]
    numel = grad_out.numel()
    with device_guard(grad_out):
        nbytes = C_.batch_norm_act_backward_workspace_bytes(dtype=code, numel=numel, C=C, inner=inner)
        # Scratch for the per-block partial sums and the per-channel coefficients: every byte read
        # is written first by an earlier launch of the same call (so it is not poisoned).
        ws = torch.empty((max(nbytes, 1),), dtype=torch.uint8, device=grad_out.device)
        # the reduce's blocks arrive on one counter per column tile (channels_last) or channel: <= C
        counters, key = arrival_counters(grad_out.device, max(C, 1))
        args = fill_args(
            C_.BatchNormActBackwardArgs, dtype=code, grad_out=ptr(grad_out),
            out=ptr(out if relu and not bits else None), out_bits=ptr(out if relu and bits else None),
            y=ptr(y), mean=ptr(mean), var=ptr(var), weight=ptr(weight), identity=ptr(identity),
            id_mean=ptr(id_mean), id_var=ptr(id_var), id_weight=ptr(id_weight), grad_y=ptr(grad_y),
            grad_identity=ptr(grad_identity), grad_weight=ptr(grad_weight), grad_bias=ptr(grad_bias),
            grad_id_weight=ptr(grad_id_weight), grad_id_bias=ptr(grad_id_bias), coef=ptr(coef),
            id_coef=ptr(id_coef), weight_dtype=_code(weight), id_weight_dtype=_code(id_weight),
            grad_weight_dtype=_code(grad_weight), grad_bias_dtype=_code(grad_bias),
            grad_id_weight_dtype=_code(grad_id_weight), grad_id_bias_dtype=_code(grad_id_bias), workspace=ptr(ws),
            workspace_bytes=nbytes, counters=ptr(counters), counters_count=counters.numel(), eps=float(eps),
            id_eps=float(id_eps), numel=numel, C=C, inner=inner, relu=bool(relu), stream=stream_of(grad_out))
        try:
            call("batch_norm_act_backward", args)
        except BaseException:
            drop_arrival_counters(key)  # it may have arrived partly (the host runner): not all zero
            raise


def batch_norm_act_backward(grad_out, out, y, mean, var, weight, identity, id_mean, id_var, id_weight,
                            grad_y, grad_identity, grad_weight, grad_bias, grad_id_weight, grad_id_bias,
                            eps, id_eps, relu, C, inner) -> None:
    _backward(grad_out, out, y, mean, var, weight, identity, id_mean, id_var, id_weight, grad_y, grad_identity,
              grad_weight, grad_bias, grad_id_weight, grad_id_bias, None, None, eps, id_eps, relu, C, inner)


def batch_norm_act_coef(grad_out, out, y, mean, var, weight, identity, id_mean, id_var, id_weight, coef, id_coef,
                        grad_weight, grad_bias, grad_id_weight, grad_id_bias, eps, id_eps, relu, C, inner) -> None:
    """coef / id_coef: (3, C) float32, contiguous (the op allocates them). A 1-bit ``out``
    (resnet_kernels/_bits.py) is read by the reduce kernel itself (``out_bits``)."""
    if id_mean is None:
        identity = id_var = id_weight = None
    _backward(grad_out, out, y, mean, var, weight, identity, id_mean, id_var, id_weight, None, None, grad_weight,
              grad_bias, grad_id_weight, grad_id_bias, coef, id_coef, eps, id_eps, relu, C, inner)


def bn_running_update(updates) -> None:
    """``updates``: (mean, var, running_mean, running_var, num_batches_tracked, factor, unbias) per
    BatchNorm, no buffer in two of them: one ``bn_running_update_many`` launch per
    ``_C.bn_running_update_slots`` (4) BatchNorms, with a BnRunningUpdateArgs each."""
    C_ = C_module()
    slots = C_.bn_running_update_slots
    for i in range(0, len(updates), slots):
        group = updates[i:i + slots]
        first = group[0]
        ref = next(t for t in (first[2], first[3], first[4], first[0]) if t is not None)
        with device_guard(ref):
            call("bn_running_update_many", _running_args(C_, group, stream_of(ref)))


def _running_args(C_, group, stream) -> list:
    """A BnRunningUpdateArgs per update of ``group``."""
    return [fill_args(C_.BnRunningUpdateArgs, mean=ptr(mean), var=ptr(var), running_mean=ptr(running_mean),
                      running_var=ptr(running_var), num_batches_tracked=ptr(num_batches_tracked),
                      running_mean_dtype=_code(running_mean), running_var_dtype=_code(running_var),
                      factor=float(factor), unbias=float(unbias), C=mean.numel(), stream=stream)
            for mean, var, running_mean, running_var, num_batches_tracked, factor, unbias in group]
