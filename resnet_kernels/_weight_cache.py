"""Packed convolution weights cached across calls, keyed so that a cached pack is never stale.

The conv launchers re-lay the (Cout, Cin, KH, KW) weight out as the GEMM operand their kernel
reads (triton_ops/conv2d.py, backends/cuda_conv2d.py) where they cannot read it in place (a
channels_last or 1x1 weight: ``conv_fwd_inplace_strides``, ``cuda_conv2d.in_place_ldw``).
Packing on every forward costs an allocation, a permute-copy (and a zero fill) per conv: 2-3
launches and ~50 MB of memory traffic per ResNet-50 forward (counted in
../shared/reviews/2026-12-02-kernel-review.md, P10). ``packed(weight, fmt, pack_fn)`` returns
``pack_fn(weight)`` from a cache instead when nothing the pack depends on can have changed since
it was made. The entry is keyed on the tensor object (a weak reference: the entry goes when the
weight does) and checked against its fingerprint:

* ``weight._version``: every in-place write through the tensor or any view/detach of it bumps it
  (optimizer steps, ``load_state_dict`` (``param.copy_`` under no_grad), ``nn.init``, ``w.mul_()``);
* ``data_ptr()``, ``storage_offset()``: a new storage (``module.to()``/``.half()``/``.cuda()``,
  which reassign ``param.data``, ``param.data = t``, ``set_``);
* shape, strides, dtype, device, layout (a pack is only valid for the exact geometry);
* on CUDA, the current stream (a pack is only read on the stream that wrote it);

plus the pack format ``fmt`` (each launcher's own layout, e.g. K-major vs N-major).

What bypasses the version counter cannot be seen, so those cases never use the cache:
* inference tensors (no version counter), fake tensors, CUDA stream capture (a graph that
  captured a cache hit would replay the old pack after the weight changed: captures always pack
  inside the graph);
* a weight that is a window into a larger storage (storage offset != 0 or a storage larger
  than the weight): FSDP1 flat parameters and similar packed-parameter schemes refill such
  storages with collectives that do not bump the parameter's version;
* while FSDP2 (``fully_shard``) is in use in the process: it all-gathers into the unsharded
  parameters under ``torch.autograd._unsafe_preserve_version_counter`` (same tensor, same
  address after the storage is re-allocated, same version, new values).
What remains the user's to avoid: writes through ``param.data`` (``w.data.copy_(...)`` gives the
write a fresh version counter, PyTorch's own documented pitfall) or under
``_unsafe_preserve_version_counter`` between two forwards. For such code set
``RESNET_KERNELS_WEIGHT_CACHE=0`` (read at each call) or call ``clear()`` after the write.

Weights a kernel can read in place need no pack and get no entry: ``conv_fwd_inplace_strides`` and
``conv_dgrad_inplace_strides`` (end of this file) say when the Triton conv forward / dgrad read the
weight's own memory (channels_last or 1x1 weights); the launchers then skip ``packed`` (a cached
view would also keep its weight alive).

The cache holds at most ``MAX_ENTRIES`` packs (least recently used dropped first); a pack lives
as long as its weight (one extra copy of every conv weight that ran through a packing launcher).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from typing import Any, Callable, Dict, Hashable, Tuple

import torch

from ._checks import DEVICE_TYPE

MAX_ENTRIES = 4096

_lock = threading.RLock()  # re-entrant: a weakref callback can run (GC) while the lock is held
_cache: "OrderedDict[Tuple[Hashable, int], Tuple[weakref.ref, tuple, Any]]" = OrderedDict()
_counts: Dict[str, int] = {"hits": 0, "packs": 0, "uncached": 0}


_ENV_NAME = "RESNET_KERNELS_WEIGHT_CACHE"
# os.environ's own store (what os.environ.get reads through two Python frames: ~2 us a call; every
# cached pack and folded BatchNorm reads the setting): the same value, read from it directly
_env_data = getattr(os.environ, "_data", None)
_env_key = os.environ.encodekey(_ENV_NAME) if hasattr(os.environ, "encodekey") else None
_env_decode = getattr(os.environ, "decodevalue", None)


_ENV_DIRECT = type(_env_data) is dict and _env_key is not None and _env_decode is not None


def enabled() -> bool:
    """RESNET_KERNELS_WEIGHT_CACHE (read at each call; unset: on)."""
    if _ENV_DIRECT:
        v = _env_data.get(_env_key)
        if v is None:
            return True
        v = _env_decode(v)
    else:
        v = os.environ.get(_ENV_NAME, "1")
    return v == "1" or v.strip().lower() not in ("0", "false", "off", "no")


_cs: Any = None


def _fsdp2_active() -> bool:
    global _cs
    if _cs is None:
        try:
            from torch.distributed import _composable_state as cs
        except Exception:  # torch built without distributed
            cs = False
        _cs = cs
    if not _cs:
        return False
    mapping = getattr(_cs, "_module_state_mapping", ())
    # (a WeakKeyDictionary's own dict, without its __len__ frame: it may still count entries whose
    # module is gone but not yet removed, which only reads as active: the uncached path)
    return len(mapping.data if type(mapping) is weakref.WeakKeyDictionary else mapping) > 0


def fingerprint(w: torch.Tensor) -> tuple:
    # CUDA: also the current stream. The pack was written on the stream current when it was made;
    # reading it from another stream, with no ordering between the two, could see it half written
    # (and the allocator frees it relative to its own stream only), so another stream repacks.
    stream = torch.cuda.current_stream(w.device).cuda_stream if w.is_cuda else None
    return (w.data_ptr(), w.storage_offset(), w._version, tuple(w.shape), tuple(w.stride()), w.dtype, w.device,
            w.layout, stream)


def _tensor_ok(w: torch.Tensor) -> bool:
    if w.is_inference() or w.layout != torch.strided:
        return False
    if type(w) not in (torch.Tensor, torch.nn.Parameter):
        return False  # FakeTensor, DTensor, functional and other subclasses
    if w.storage_offset() != 0 or w.untyped_storage().nbytes() != w.numel() * w.element_size():
        return False
    return not (w.is_cuda and torch.cuda.is_current_stream_capturing())


_PLAIN = (torch.Tensor, torch.nn.Parameter)
_strided = torch.strided


def _ok_fingerprint(w: torch.Tensor):
    """``fingerprint(w)`` when ``_tensor_ok(w)``, else None: the same checks and values in one pass
    (a lookup fingerprints every dependency on every call)."""
    if w.is_inference() or w.layout != _strided or type(w) not in _PLAIN:
        return None
    if w.storage_offset() != 0 or w.untyped_storage().nbytes() != w.numel() * w.element_size():
        return None
    stream = None
    if w.is_cuda:
        if torch.cuda.is_current_stream_capturing():
            return None
        stream = torch.cuda.current_stream(w.device).cuda_stream
    return (w.data_ptr(), 0, w._version, tuple(w.shape), w.stride(), w.dtype, w.device, _strided, stream)


def _checked_fingerprint(weight: torch.Tensor, deps: Tuple[Any, ...]):
    """The cache fingerprint of ``weight`` and ``deps`` (``fingerprint(weight) + ((id(d),) +
    fingerprint(d) or None for each dep)``), or None when one of them may not be cached."""
    fp = _ok_fingerprint(weight)
    if fp is None:
        return None
    for d in deps:
        if d is None:
            fp += (None,)
            continue
        f = _ok_fingerprint(d)
        if f is None:
            return None
        fp += ((id(d),) + f,)
    return fp


def cacheable(w: torch.Tensor) -> bool:
    """Whether ``w``'s packs may be cached (see the module docstring for why each case is not)."""
    return enabled() and _tensor_ok(w) and not _fsdp2_active()


def packed(weight: torch.Tensor, fmt: Hashable, pack_fn: Callable[[torch.Tensor], Any],
           deps: Tuple[Any, ...] = ()) -> Any:
    """``pack_fn(weight)``, from the cache when ``weight`` (and every tensor in ``deps``; None
    entries allowed) is unchanged since it was packed with this ``fmt``. ``pack_fn`` must depend
    only on the values and geometry of ``weight`` and ``deps``, and on ``fmt``. The value is made
    outside inference mode (normal tensors, usable later with autograd)."""
    fp = _checked_fingerprint(weight, deps) if enabled() else None
    if fp is None or _fsdp2_active():
        with _lock:
            _counts["uncached"] += 1
        return pack_fn(weight)
    key = (fmt, id(weight))
    with _lock:
        e = _cache.get(key)
        if e is not None and e[0]() is weight and e[1] == fp:
            _cache.move_to_end(key)
            _counts["hits"] += 1
            return e[2]
    with torch.inference_mode(False):
        value = pack_fn(weight)

    def drop(ref, key=key):
        with _lock:
            cur = _cache.get(key)
            if cur is not None and cur[0] is ref:
                del _cache[key]

    with _lock:
        _cache[key] = (weakref.ref(weight, drop), fp, value)
        _cache.move_to_end(key)
        while len(_cache) > MAX_ENTRIES:
            _cache.popitem(last=False)
        _counts["packs"] += 1
    return value


# ------------------------------------------------------------------------------------------------
# small values derived from a module's tensors (e.g. a BatchNorm folded into (scale, shift))

_derived: Dict[int, Tuple[weakref.ref, tuple, tuple, Any]] = {}  # id(owner) -> (ref, deps, quick fp, value)


def _quick(deps: Tuple[Any, ...]) -> tuple:
    """What a hit compares for each of ``deps`` (pinned by the entry, so ids are not reused):
    id, ``_version``, ``data_ptr()``, dtype. The checks ``_ok_fingerprint`` adds (plain strided
    tensor, not a window of a larger storage, not an inference tensor) hold for as long as these do:
    they were checked when the entry was made."""
    return tuple([None if d is None else (id(d), d._version, d.data_ptr(), d.dtype) for d in deps])


def derived(owner: Any, fmt: Hashable, fn: Callable[[], Any], deps: Tuple[Any, ...], device: torch.device) -> Any:
    """``fn()``, from the cache when ``fmt`` and every tensor in ``deps`` (None entries allowed) are
    unchanged since it was computed for ``owner`` (one entry per owner, held as long as the owner
    lives): the rules of ``packed`` (version, storage, dtype; never under CUDA-graph capture,
    FSDP2, ``RESNET_KERNELS_WEIGHT_CACHE=0``, for inference or subclass tensors), with a hit
    checking only each dependency's identity, version, address and dtype (about 1 us each instead
    of ``packed``'s full fingerprint). ``fn`` must depend only on the values and geometry of
    ``deps`` and on ``fmt``; its value is made outside inference mode. ``device``: where the value
    lives (on CUDA the current stream is part of the key, as in ``fingerprint``)."""
    # (enabled() only where the variable is set: unset reads as on)
    if not (_ENV_DIRECT and _env_key not in _env_data) and not enabled() or _fsdp2_active():
        return fn()
    if DEVICE_TYPE[device] == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return fn()
        fmt = (fmt, torch.cuda.current_stream(device).cuda_stream)
    key = id(owner)
    e = _derived.get(key)
    if e is not None and e[0]() is owner:
        try:
            # (e[2] == (fmt, _quick(deps)), compared in place: this runs once per folded BatchNorm call)
            if e[2][0] == fmt:
                q = e[2][1]
                if len(q) == len(deps):
                    for d, t in zip(deps, q):
                        if d is None:
                            if t is not None:
                                break
                        elif t is None or t[0] != id(d) or t[1] != d._version or t[2] != d.data_ptr() \
                                or t[3] != d.dtype:
                            break
                    else:
                        return e[3]
        except RuntimeError:  # an inference tensor has no version counter
            return fn()
    for d in deps:
        if d is not None and _ok_fingerprint(d) is None:
            return fn()
    with torch.inference_mode(False):
        value = fn()

    def drop(ref, key=key):
        cur = _derived.get(key)
        if cur is not None and cur[0] is ref:
            del _derived[key]

    _derived[key] = (weakref.ref(owner, drop), tuple(deps), (fmt, _quick(deps)), value)
    return value


def derived_holds(owner: Any, value: Any) -> bool:
    """Whether ``value`` is the object ``derived`` holds for ``owner`` (so a later hit returns this
    very object: its identity stands for an unchanged value)."""
    e = _derived.get(id(owner))
    return e is not None and e[0]() is owner and e[3] is value


def clear() -> None:
    """Drop every cached pack."""
    with _lock:
        _cache.clear()
        _derived.clear()


def stats() -> Dict[str, int]:
    """Counters since start (or ``reset_stats``): hits, packs (cached misses), uncached packs,
    and the current number of entries."""
    with _lock:
        return dict(_counts, entries=len(_cache))


def reset_stats() -> None:
    with _lock:
        for k in _counts:
            _counts[k] = 0


# ------------------------------------------------------------------------------------------------
# weights a kernel reads in place (no pack, no cache entry)

def _linear_strides(weight: torch.Tensor, k_dims: Tuple[int, ...]) -> Any:
    """The element stride of a flat index over ``k_dims`` (outermost first) when ``weight``'s
    addressing is linear in it (dims of size 1 may carry any stride), else None."""
    step = None
    span = 1
    for d in reversed(k_dims):
        n, s = weight.shape[d], weight.stride(d)
        if n > 1:
            if step is None:
                step = s
            elif s != step * span:
                return None
        span *= n
    return 1 if step is None else step


def conv_fwd_inplace_strides(weight: torch.Tensor, dtype: torch.dtype):
    """(swk, swn) of the (Cout, Cin, KH, KW) ``weight`` read in place as the forward's K-major
    (K, Cout) GEMM operand, K = KH*KW*Cin indexed (kh*KW + kw)*Cin + c, or None when the pack is
    needed. In place when the weight's memory is (Cout, KH, KW, Cin)-ordered with a unit Cin stride:
    a channels_last weight (``model.to(memory_format=torch.channels_last)``) and any 1x1 weight
    whose Cin stride is 1 (contiguous ones too). 16-bit weights also need a 16-byte-aligned row
    pitch (Cout stride) for 16-byte cp.async copies (the 7x7 stem's K = 147 is not: packed);
    fp32 is exempt: its K-major pack of such a weight was this very view. Same dtype as the
    activations only. Used by triton_ops/conv2d.py and by the accountant (backends/__init__.py)."""
    if weight.dim() != 4 or weight.dtype != dtype or weight.layout != torch.strided:
        return None
    if _linear_strides(weight, (2, 3, 1)) != 1:
        return None
    swn = weight.stride(0)
    if dtype != torch.float32 and (swn * weight.element_size()) % 16:
        return None
    return 1, swn


def conv_dgrad_inplace_strides(weight: torch.Tensor, dtype: torch.dtype):
    """(swr, swk, swn) of the (Cout, Cin, KH, KW) ``weight`` read in place as the dgrad's
    Cin-contiguous (K, Cin) GEMM operand (tap r = kh*KW + kw, K index (r, co), N index ci), or None
    when the pack is needed. 16-bit only (the fp32 / tf32 B operand wants K-contiguous, which no
    usual weight layout gives here); unit Cin stride, taps linear, and 16-byte-aligned tap and Cout
    strides (16-byte cp.async rows): a channels_last weight (swr = Cin, swk = KH*KW*Cin) and any
    1x1 weight with a unit Cin stride (contiguous too: swk = Cin). Same dtype as the gradient only."""
    if weight.dim() != 4 or weight.dtype != dtype or dtype == torch.float32 or weight.layout != torch.strided:
        return None
    if weight.shape[1] > 1 and weight.stride(1) != 1:
        return None
    swr = _linear_strides(weight, (2, 3))
    if swr is None:
        return None
    if weight.shape[2] * weight.shape[3] == 1:
        swr = 0
    swk = weight.stride(0) if weight.shape[0] > 1 else 0
    esize = weight.element_size()
    if (swr * esize) % 16 or (swk * esize) % 16:
        return None
    return swr, swk, 1
