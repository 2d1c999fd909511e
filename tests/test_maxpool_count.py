"""The accountant and the stem's max pool: the fused models count resnet_kernels::maxpool2d (a
one-byte argmax) where eager counts max_pool2d_with_indices (int64 indices), and the stem row's
bytes drop by exactly the difference (counted, not timed)."""

import pytest

import resnet_kernels.models.resnet as rk_resnet
from resnet_kernels import count

# ResNet-18, batch 8, 64x64, fp32, channels_last: the stem's pool reads the 8x64x32x32 ReLU output
# and writes 8x64x16x16
A = 8 * 64 * 16 * 16 * 4  # the pool's output, fp32 bytes
M = 8 * 64 * 16 * 16  # its elements (one argmax byte each)
X = 4 * A  # its input


def _stem(c):
    return {(e.phase, e.op, e.impl): e for e in c.entries if e.layer == "stem"}


def _count(backend):
    return count.count_step("resnet18", "train", backend, batch=8, image_size=64, dtype="fp32",
                            layout="channels_last", num_classes=10)


@pytest.mark.parametrize("backend", ["cuda", "triton", "auto"])
def test_stem_pool_bytes_drop(backend, monkeypatch):
    fused = _count(backend)
    stem = _stem(fused)
    fwd, bwd = stem[("fwd", "maxpool2d", backend if backend != "auto" else "cuda")], \
        stem[("bwd", "maxpool2d_backward", backend if backend != "auto" else "cuda")]
    assert (fwd.launches, fwd.bytes) == (1, X + A + M)  # read x, write out and the argmax
    assert (bwd.launches, bwd.bytes) == (1, A + M + X)  # read grad_out and the argmax, write grad_x
    assert not any("max_pool2d_with_indices" in op for _, op, _ in stem)

    monkeypatch.setattr(rk_resnet, "stem_pool", lambda m, x, b: m(x))  # the stem before: nn.MaxPool2d
    plain = _count(backend)
    pstem = _stem(plain)
    efwd = pstem[("fwd", "max_pool2d_with_indices", "aten")]
    ebwd = pstem[("bwd", "max_pool2d_with_indices_backward", "aten")]
    # x, out, int64 indices; grad_out, x (the accountant counts every argument), indices, grad_x
    assert (efwd.bytes, ebwd.bytes) == (X + A + 2 * A, A + X + 2 * A + X)
    before, after = plain.by_layer()["stem"], fused.by_layer()["stem"]
    assert after[0] == before[0]  # as many launches
    assert before[1] - after[1] == (efwd.bytes + ebwd.bytes) - (fwd.bytes + bwd.bytes) == 7 * A + A // 2
    assert plain.bytes - fused.bytes == before[1] - after[1]  # nothing else changed


def test_inference_writes_no_argmax():
    c = count.count_step("resnet18", "infer", "cuda", batch=8, image_size=64, dtype="fp32", layout="channels_last",
                         num_classes=10)
    fwd = _stem(c)[("fwd", "maxpool2d", "cuda")]
    assert (fwd.launches, fwd.bytes) == (1, X + A)
