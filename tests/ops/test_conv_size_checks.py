"""The size checks of the convolution entry points of the C++ API (csrc/common.h check_conv_sizes):
per entry point, which extents must be positive and which may be zero, the exact message of each,
and their order (a call with several bad sizes names the first). On _C when it is built (the
sm_90a entry points when it holds them: their checks run before the device check) and on the host
runner's build of the same source."""

from __future__ import annotations

import pytest

from resnet_kernels.backends import cuda_common
from ops.test_conv2d_cuda import api  # noqa: F401 (the fixture: _C when built, and the host runner)

# the order of the checks; splits (conv2d_wgrad's own) comes after the strides
ORDER = ["N", "Cin", "H", "W", "Cout", "KH", "KW", "stride_h", "stride_w", "splits", "pad_h", "pad_w"]
PADS = {"pad_h", "pad_w"}

# entry point -> (argument struct, fields it checks, the extents it accepts at zero)
ENTRY = {
    "conv2d_forward": ("Conv2dArgs", ORDER[:9] + ORDER[10:], {"N", "H", "W", "Cout"}),
    "conv2d_dgrad": ("Conv2dDgradArgs", ORDER[:9] + ORDER[10:], set()),
    "conv2d_wgrad": ("Conv2dWgradArgs", ORDER, set()),
    "conv2d_sm90_forward": ("Conv2dArgs", ORDER[:9] + ORDER[10:], {"Cout"}),
    "conv2d_sm90_workspace_bytes": ("Conv2dArgs", ORDER[:9] + ORDER[10:], {"Cout"}),
    "conv2d_sm90_dgrad": ("Conv2dSm90BwdArgs", ORDER[:9] + ORDER[10:], set()),
    "conv2d_sm90_wgrad": ("Conv2dSm90BwdArgs", ORDER[:9] + ORDER[10:], set()),
    "conv2d_sm90_dgrad_workspace_bytes": ("Conv2dSm90BwdArgs", ORDER[:9] + ORDER[10:], set()),
    "conv2d_sm90_wgrad_workspace_bytes": ("Conv2dSm90BwdArgs", ORDER[:9] + ORDER[10:], set()),
}


def _entry(api, name):
    if not hasattr(api, name):
        pytest.skip(f"{name} is not in this module (the host runner, and a _C built without CUTLASS, have no "
                    "sm_90a entry points)")
    return getattr(api, name)


def _args(api, cls_name, sizes):
    """The struct with bfloat16, every pointer null, every other field zero, and `sizes` set."""
    cls = getattr(api, cls_name)
    fields = {}
    for f in cls.fields:
        if f == "dtype":
            fields[f] = 2
        elif f.endswith("_stride"):
            fields[f] = [0, 0, 0, 0]
        elif f.endswith("_eps"):
            fields[f] = 0.0
        elif f in ("relu", "allow_tf32"):
            fields[f] = False
        else:
            fields[f] = 0
    fields.update(sizes)
    return cuda_common.fill_args(cls, **fields)


def _fn_name(name):
    """The name the messages give: the sm_90a workspace queries validate as their entry point."""
    return {"conv2d_sm90_workspace_bytes": "conv2d_sm90_forward",
            "conv2d_sm90_dgrad_workspace_bytes": "conv2d_sm90_dgrad",
            "conv2d_sm90_wgrad_workspace_bytes": "conv2d_sm90_wgrad"}.get(name, name)


def _message(fn, args):
    try:
        fn(args)
    except ValueError as e:
        return str(e)
    return None


def _size_message(text):
    return text is not None and any(f"{f} must be > 0, got" in text or f"{f} must be >= 0, got" in text for f in ORDER)


@pytest.mark.parametrize("name", list(ENTRY))
def test_the_first_bad_size_is_named(name, api):
    """All sizes -1, then fixed one at a time in order: each call names exactly the next one."""
    fn = _entry(api, name)
    cls, checked, zero_ok = ENTRY[name]
    sizes = {f: -1 for f in checked}
    for f in checked:
        want = f"{_fn_name(name)}: {f} must be {'>= 0' if f in zero_ok or f in PADS else '> 0'}, got -1"
        assert _message(fn, _args(api, cls, sizes)) == want
        sizes[f] = 0 if f in PADS else 1
    got = _message(fn, _args(api, cls, sizes))
    assert not _size_message(got), got


@pytest.mark.parametrize("name", list(ENTRY))
def test_which_sizes_may_be_zero(name, api):
    """From valid sizes, each field at 0: refused with its message unless the entry point accepts it."""
    fn = _entry(api, name)
    cls, checked, zero_ok = ENTRY[name]
    valid = {f: 0 if f in PADS else 1 for f in checked}
    for f in checked:
        got = _message(fn, _args(api, cls, {**valid, f: 0}))
        if f in zero_ok or f in PADS:
            assert not _size_message(got), (f, got)
        else:
            assert got == f"{_fn_name(name)}: {f} must be > 0, got 0", (f, got)
