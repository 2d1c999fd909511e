"""The accountant (resnet_kernels/count.py): kernel launches and HBM bytes per step, counted on the
meta device. Counted, not timed: these tests check the counting against hand counts and against
the roofline model's independent per-kernel tables (../shared/perf/roofline_model.py), not speed."""

import json

import pytest
import torch

from resnet_kernels import _registry, cli, count

# the small configuration of the hand counts: ResNet-18, batch 8, 64x64 images, fp32, channels_last.
# layer1 activations: 8 x 64 x 16 x 16 fp32
A = 8 * 64 * 16 * 16 * 4  # 524,288 bytes
W = 64 * 64 * 3 * 3 * 4  # a 3x3 64->64 conv weight: 147,456 bytes
V = 64 * 4  # one per-channel fp32 vector: 256 bytes


@pytest.fixture(scope="module")
def small():
    return {b: count.count_step("resnet18", "train", b, batch=8, image_size=64, dtype="fp32",
                                layout="channels_last", num_classes=10) for b in ("eager", "cuda", "auto")}


def _layer(c, layer, phase):
    es = [e for e in c.entries if e.layer == layer and e.phase == phase]
    return sum(e.launches for e in es), sum(e.bytes for e in es), {(e.op, e.impl): e for e in es}


def test_eager_layer_bytes_match_hand_count(small):
    """Forward of torchvision's BasicBlock layer1.1 in training (conv-BN-ReLU, conv-BN, add, ReLU)."""
    launches, got, ops = _layer(small["eager"], "layer1.1", "fwd")
    conv = A + W + A  # read x and the weight, write y (one cuDNN launch each)
    # native batch norm, 3 launches: statistics (read x), running stats + invstd, apply (read x,
    # write y); per-channel: weight, bias, running mean, running var read, save_mean and
    # save_invstd written (6 vectors)
    bn = 2 * A + A + 6 * V
    relu = 2 * A  # relu_ reads and writes in place
    residual = 3 * A  # out += identity: read both, write out
    nbt = 2 * 16  # num_batches_tracked.add_(1): one int64 read and written, per BN
    want = 2 * conv + 2 * bn + 2 * relu + residual + nbt
    assert want == 9_210_912
    assert got == want
    assert launches == 2 * 1 + 2 * 3 + 2 + 1 + 2  # convs, BNs, ReLUs, add, num_batches_tracked
    assert ops[("convolution", "aten")].bytes == 2 * conv


def test_fused_layer_counts_declared_cost_not_decomposition(small):
    """layer1.1 of the fused model on the cuda backend (a training block, resnet_kernels/_block.py):
    each convolution counts what the cuda implementation declares, not the aten ops of any Python
    decomposition; the second applies the first unit's BN + ReLU in its operand prologue
    (conv2d_bn_stats: h is never written, no batch_norm_act)."""
    _, _, ops = _layer(small["cuda"], "layer1.1", "fwd")
    stats = ops[("conv2d_stats", "cuda")]
    assert stats.calls == 1
    # per call: no pack_weight (the channels_last weight is read in place: Cin = 64 needs no channel
    # padding, K = 576 is a multiple of 8), the implicit GEMM (read x and the weight, write y and the
    # per-tile (mean, M2) partials: N*OH*OW = 2048 rows in 16 tiles of 128, 64 channels, fp32), and
    # in the same launch the statistics merge of the last CTA (16 tiles: one group; read the
    # partials, write mean and var)
    partials = 2 * 16 * 64 * 4
    per_call = (A + W + A + partials) + (partials + 2 * V)
    assert stats.launches == 1
    assert stats.bytes == per_call
    assert ("convolution", "aten") not in ops  # the fused conv is not counted as aten ops
    # the same launch; the prologue reads y_prev in x's place plus mean, var, weight, bias
    pro = ops[("conv2d_bn_stats", "cuda")]
    assert pro.calls == 1 and pro.launches == 1
    assert pro.bytes == per_call + 4 * V
    assert ("batch_norm_act", "cuda") not in ops
    # the tail: read y and the identity, write out; its 1-bit mask (8 bytes per pixel of 64
    # channels) packed from out by a second csrc launch (float32: read out, write the bits)
    # and the block's running-statistics updates, applied by the forward's own launch
    # (batch_norm_act_forward_running): per BN read mean and var, read and write the running mean
    # and var; num_batches_tracked (int64) read, written
    tail = ops[("batch_norm_act_bits", "cuda")]
    assert tail.bytes == (3 * A + 4 * V) + (A + A // 32) + 2 * (2 * V + 4 * V + 16) and tail.launches == 2
    assert ("bn_running_update", "cuda") not in ops
    assert not any(op in ("mul", "rsqrt", "sub", "_to_copy", "add_", "mul_") for op, _ in ops), ops.keys()


def test_auto_counts_its_static_cuda_choice(small):
    """'auto' on CUDA without a measurement: aten (cuDNN) convolutions, the cuda batch_norm_act; every
    unit in a block (the stem a one-unit block): no per-unit BatchNorm backward or running update."""
    impls = {(e.op, e.impl) for e in small["auto"].entries}
    assert ("conv2d_stats", "aten") in impls and ("conv2d_stats", "cuda") not in impls
    assert ("batch_norm_act", "cuda") in impls
    assert not {op for op, _ in impls} & {"batch_norm_act_backward", "bn_running_update"}, impls


def test_cutlass_conv2d_stats_declared_cost():
    """The sm_90a training forward (backend 'cutlass', conv2d_stats; csrc/sm90/): one CUTLASS kernel
    whose epilogue writes y in bf16 and the per-128-row-tile (mean, M2) partials, then the combine.
    Hand count for a ResNet-50 layer1 3x3 conv at batch 256 (56x56x64 -> 56x56x64, bf16): 3 launches
    (pack, conv, combine); y is written once in bf16 (2 bytes per output element), where the
    earlier float32-output path wrote and re-read a float32 y (4 + 4 more) in 4 launches."""
    from types import SimpleNamespace

    from resnet_kernels.backends import _COSTS, _cutlass_conv_cost

    impl = [i for i in _registry.implementations("conv2d_stats") if i.backend == "cutlass"]
    assert impl and impl[0].cost is _cutlass_conv_cost
    N, C, H, W_ = 256, 64, 56, 56
    meta = dict(dtype=torch.bfloat16, device="meta")
    call = SimpleNamespace(x=torch.empty(N, C, H, W_, **meta), weight=torch.empty(C, C, 3, 3, **meta),
                           residual=None, scale=None, bias=None, compute_stats=True, shape=(N, C, H, W_))
    launches, got = _cutlass_conv_cost(call)
    act = N * C * H * W_ * 2  # x and y, bf16
    w = C * C * 9 * 2
    tiles = (N * H * W_ + 127) // 128
    partials = 2 * tiles * C * 4
    want = (w + w) + (act + w + act + partials) + (partials + 2 * C * 4)
    assert launches == 3
    assert got == want
    # the float32-output path: pack + conv (x, w, y in float32) + tile statistics (read y in float32,
    # write y in bf16 and the partials) + finalize: the same plus the float32 y written and read
    yf = N * H * W_ * C * 4
    before = (w + w) + (act + w + yf) + (yf + act + partials) + (partials + 2 * C * 4)
    assert before - got == 2 * yf  # 8 bytes less per output element, one launch less
    assert ("conv2d_stats", "cutlass") not in _COSTS  # declared on the Impl (cost=_cutlass_conv_cost)


def test_phases_and_layers_cover_the_step(small):
    for c in small.values():
        phases = c.by_phase()
        assert set(phases) == {"fwd", "bwd", "optim"}
        layers = list(c.by_layer())
        assert layers[0] == "stem" and "layer4.1" in layers and "head" in layers and "optimizer" in layers
        assert c.launches == sum(v[0] for v in phases.values())
        assert c.bytes == sum(v[1] for v in c.by_layer().values())
    # the optimizer (SGD momentum, foreach): mul_ over the buffers, add_ into them, add_ into the params
    opt = [e for e in small["eager"].entries if e.phase == "optim"]
    assert {e.op for e in opt} == {"_foreach_mul_", "_foreach_add_"}
    params = sum(p.numel() for p in count.build_model("resnet18", "eager", 10).parameters()) * 4
    assert sum(e.bytes for e in opt) == 2 * params + 2 * (3 * params)


@pytest.mark.parametrize("mode,launches,gbytes", [("infer", 174, 41.3), ("train", 735 - 2 * 53, 122.0)])
def test_eager_resnet50_totals_agree_with_roofline_model(mode, launches, gbytes):
    """The roofline model (batch 256, 224x224, bf16, channels_last) lists 174 kernels for an
    inference forward and 735 for a training step, 2 x 53 of them autocast weight casts and
    bf16->fp32 gradient casts that this fp32-free bf16 model does not run; its GB are
    41.3 / 122.0. Launches must match within 5%, bytes within 5%."""
    c = count.count_step("resnet50", mode, "eager", batch=256, image_size=224, dtype="bf16")
    assert abs(c.launches - launches) <= 0.05 * launches, c.launches
    assert abs(c.bytes / 1e9 - gbytes) <= 0.05 * gbytes, c.bytes


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("mode", ["train", "infer"])
def test_fused_model_launches_and_bytes_at_most_eager(arch, mode):
    """Issue 10's counted targets (batch 256, 224x224, bf16, channels_last): every countable
    implementation and 'auto' launch at most as many kernels per step as plain PyTorch and move
    fewer bytes. Counted on the meta device, not timed. (The 'aten' backend is PyTorch's own
    kernels around our statistics: eager's passes plus the statistics pass, not a target.)"""
    e = count.count_step(arch, mode, "eager", batch=256, image_size=224, dtype="bf16")
    for b in [b for b in count.count_backends()[1:] if b != "aten"]:
        c = count.count_step(arch, mode, b, batch=256, image_size=224, dtype="bf16")
        assert c.launches <= e.launches, (b, c.launches, e.launches)
        assert c.bytes < e.bytes, (b, c.bytes / 1e9, e.bytes / 1e9)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="model"):
        count.count_step("resnet7")
    with pytest.raises(ValueError, match="backend"):
        count.count_step("resnet18", backend="torch")  # no cost declared: listed as not countable
    with pytest.raises(ValueError, match="mode"):
        count.count_step("resnet18", mode="eval")


def test_every_offered_countable_backend_declares_every_cost():
    for b in count.count_backends()[2:]:
        for op in _registry.OPS:
            impl = _registry.get_impl(op, b)
            assert impl is None or impl.cost is not None


def test_cli_count_json(capsys):
    rc = cli.main(["count", "--model", "resnet18", "--mode", "infer", "--batch", "2", "--image-size", "64",
                   "--dtype", "fp32", "--backends", "eager,cuda", "--json"])
    out, _ = capsys.readouterr()
    assert rc == 0
    d = json.loads(out)
    assert d["schema"] == "resnet-kernels-count/1"
    eager, cuda = d["results"]
    assert (eager["backend"], cuda["backend"]) == ("eager", "cuda")
    assert eager["launches"] == sum(layer["launches"] for layer in eager["layers"]) > 0
    assert cuda["bytes"] == sum(layer["bytes"] for layer in cuda["layers"]) > 0
    # at batch 2 the weights dominate: each conv of ours reads its channels_last weight once, in
    # place (cuda_conv2d.in_place_ldw; only the stem's 7x7x3 one is packed: read, write, read), as
    # eager's cuDNN convolutions do
    weights = sum(p.numel() for n, p in count.build_model("resnet18", "eager", 1000).named_parameters()
                  if p.dim() == 4) * 4
    assert weights < cuda["bytes"] < 1.2 * weights and cuda["bytes"] < eager["bytes"]


def test_cli_count_table(capsys):
    rc = cli.main(["count", "--model", "resnet18", "--mode", "infer", "--batch", "2", "--image-size", "64",
                   "--backends", "eager", "--ops"])
    out, _ = capsys.readouterr()
    assert rc == 0 and "COUNTED" in out and "| **total** |" in out and "| layer4.1 |" in out
    assert "| fwd | convolution | aten | 20 | 20 |" in out  # ResNet-18: 20 convolutions, one launch each


@pytest.mark.parametrize("backend", ["auto", "cuda"])
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_block_backward_counts_fewer_launches_and_bytes_than_the_per_op_graph(arch, backend, monkeypatch):
    """Issue 12: a training block as one autograd function (resnet_kernels/_block.py: the BN backward
    computed inside conv2d_backward, the residual-gradient sum in its epilogue) launches fewer
    kernels and moves fewer bytes per step than the per-op graph of the same ops ('auto', static
    CUDA choice: the Triton dgrad/wgrad; 'cuda': the csrc dgrad/wgrad and BatchNorm writing and
    reading the 1-bit mask, ResNet-50 474 / 76.0 GB vs 553 / 95.5 when written), and its backward
    has no batch_norm_act_backward apply pass nor autograd's residual accumulate inside the blocks.
    Counted, not timed."""
    from resnet_kernels import _block

    fused = count.count_step(arch, "train", backend, batch=256, image_size=224, dtype="bf16")
    monkeypatch.setattr(_block, "backend_ok", lambda backend: False)
    per_op = count.count_step(arch, "train", backend, batch=256, image_size=224, dtype="bf16")
    assert fused.launches < per_op.launches, (fused.launches, per_op.launches)
    assert fused.bytes < per_op.bytes, (fused.bytes / 1e9, per_op.bytes / 1e9)
    in_blocks = [e for e in fused.entries if e.phase == "bwd" and e.layer.startswith("layer")]
    ops = {e.op for e in in_blocks}
    assert "conv2d_backward" in ops and "batch_norm_act_coef" in ops
    assert not ops & {"batch_norm_act_backward", "convolution_backward", "add"}, ops


def test_issue12_targets_for_the_triton_training_step():
    """Issue 12's counted targets (batch 256, 224x224, bf16, channels_last, ResNet-50 training step):
    the triton backend launches at most 0.6x eager's kernels and moves at most 0.65x its bytes
    (counted 355 / 630 and 76.6 / 123.1 GB when written); no copy of a weight gradient into the
    parameter's layout in the backward of the convolution layers. Counted on the meta device, not timed."""
    e = count.count_step("resnet50", "train", "eager", batch=256, image_size=224, dtype="bf16")
    t = count.count_step("resnet50", "train", "triton", batch=256, image_size=224, dtype="bf16")
    assert t.launches <= 0.6 * e.launches, (t.launches, e.launches)
    assert t.bytes <= 0.65 * e.bytes, (t.bytes / 1e9, e.bytes / 1e9)
    copies = [en for en in t.entries if en.phase == "bwd" and en.op == "copy_" and en.layer != "head"]
    assert not copies, [(en.layer, en.calls) for en in copies]


@pytest.mark.parametrize("model, blocks, units", [("resnet50", 16, 49), ("resnet18", 8, 17)])
def test_running_updates_one_launch_per_block(model, blocks, units, monkeypatch):
    """A training block's BatchNorms (a bottleneck's 3 and its projection's) update their running
    statistics with the block's last op, batch_norm_act_bits, in its own launch on triton and cuda
    (no launch of their own: the tail stays one launch per block); the stem's BN likewise on triton
    (the stem a one-unit block: ``models.resnet._STEM_BACKENDS``), on cuda one bn_running_update
    call (its per-unit stem). The per-op graph (cuda without the block) commits per unit: a
    projection unit's two BNs in one call. ResNet-50: 53 BNs -> 0 launches on triton, 1 on cuda (17
    before the tails took them; 49 per op), ResNet-18: 20 -> 0 / 1 (9; 17). Counted, not timed."""
    from resnet_kernels import _block

    for backend, calls, block in (("triton", 0, True), ("cuda", 1, True), ("cuda", units, False)):
        if not block:
            monkeypatch.setattr(_block, "backend_ok", lambda backend: False)
        c = count.count_step(model, "train", backend, batch=2, image_size=64, dtype="bf16")
        upd = [e for e in c.entries if e.op == "bn_running_update"]
        assert {e.impl for e in upd} <= {backend}
        assert sum(e.calls for e in upd) == sum(e.launches for e in upd) == calls, (backend, upd)
        per_layer = {e.layer: e.launches for e in upd}
        assert per_layer.pop("stem", 0) == (backend == "cuda")
        if block:
            assert not per_layer, per_layer
            tails = {e.layer: (e.calls, e.launches) for e in c.entries if e.op == "batch_norm_act_bits"}
            # one tail per block, one launch (bf16 channels_last: the bits in the forward's kernel too)
            stem = backend == "triton"
            assert len(tails) == blocks + stem and set(tails.values()) == {(1, 1)}, tails


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_triton_conv_counts_a_weight_pack_only_where_one_runs(dtype):
    """triton_ops/conv2d.py and conv2d_dgrad.py read a channels_last weight in place (no pack
    launch; resnet_kernels/_weight_cache.py ``conv_*_inplace_strides``): ResNet-50 training at
    batch 2 (bf16 and fp32, channels_last). Forward: one launch per conv2d_stats / conv2d_bn_stats
    call (the statistics are merged in the conv's launch), plus a pack for the 16-bit stem only (147-element
    weight rows, not 16-byte aligned: packed).
    Backward: the dgrad reads 16-bit weights in place; fp32 packs them K-major (the tf32 MMA's B
    operand), one copy each (read + write the weight). Hand counts from the shapes."""
    from resnet_kernels import _weight_cache as wc

    c = count.count_step("resnet50", "train", "triton", batch=2, image_size=64, dtype=dtype)
    net = count.build_model("resnet50", "triton", 10)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 53
    # the 32 inner units beyond a block's first take their input's BN + ReLU in the operand
    # prologue (conv2d_bn_stats): the same kernel, the same weight operand
    st = [e for e in c.entries if e.op in ("conv2d_stats", "conv2d_bn_stats") and e.impl == "triton"]
    calls = sum(e.calls for e in st)
    assert calls == 53
    assert sum(e.calls for e in st if e.op == "conv2d_bn_stats") == 32
    # per call: the conv kernel (with its statistics merge) + the pack
    stem_pack = 1 if dtype == "bf16" else 0
    assert sum(e.launches for e in st) == calls + stem_pack, [(e.layer, e.launches) for e in st]
    cl = torch.channels_last
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    w = torch.empty(64, 64, 3, 3, dtype=dt, device="meta").contiguous(memory_format=cl)
    assert (wc.conv_dgrad_inplace_strides(w, dt) is not None) == (dtype == "bf16")
    bw = [e for e in c.entries if e.op == "conv2d_backward" and e.impl == "triton"]
    if bw:  # the fused blocks' backward: one dgrad pack per conv with grad_x in fp32, none in bf16
        eb = count.count_step("resnet50", "train", "triton", batch=2, image_size=64, dtype="bf16")
        nb = sum(e.launches for e in eb.entries if e.op == "conv2d_backward")
        if dtype == "fp32":
            # the blocks' 52 convs, each with grad_x, and the stem's (a one-unit block; its image input
            # needs no gradient: no dgrad, no pack)
            assert sum(e.calls for e in bw) == 53
            assert sum(e.launches for e in bw) == nb + 52


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_eager_convolutions_keep_the_activation_layout_as_cudnn_does(layout):
    """On the meta device aten's convolution returns NCHW whatever its input; cuDNN returns
    channels_last for a channels_last input or weight, and the accountant restrides to match, so
    eager's channels_last step is counted with a GPU's layouts: its avgpool on a channels_last
    activation then records an as_strided view whose backward launches new_zeros + copy_ (as
    torchvision's model does on a GPU or a CPU); the NCHW step has neither."""
    c = count.count_step("resnet18", "train", "eager", batch=2, image_size=64, dtype="fp32", layout=layout,
                         num_classes=10)
    head = {e.op for e in c.entries if e.layer == "head" and e.phase == "bwd"}
    assert ({"new_zeros", "copy_"} <= head) == (layout == "channels_last"), head
    grads = [e for e in c.entries if e.op == "convolution_backward"]
    assert grads and all(e.launches >= 1 for e in grads)


def test_triton_wgrad_scratch_is_what_the_launch_allocates():
    """The Triton wgrad's split-K scratch as counted (``_triton_wgrad_scratch``) is what its launcher
    allocates on an sm_90 GPU: (SPLITS, tiles, BLOCK_M, BLOCK_N) fp32, nothing with one split.
    ResNet-50 at batch 256: layer1's 3x3 64->64 (56x56) takes 30 splits, layer4's 3x3 512->512 (7x7)
    2, the stem (7x7, Cin 3, 112x112) packs its 147 columns into 3 tiles of 64."""
    from resnet_kernels.backends import _triton_wgrad_scratch
    from resnet_kernels.ops.conv_backward import backward_call
    from resnet_kernels.triton_ops import _wgrad_plan as wp

    def case(n, cin, cout, k, hw, stride=1):
        oh = hw // stride
        g = torch.empty(n, cout, oh, oh, device="meta", dtype=torch.bfloat16)
        x = torch.empty(n, cin, hw, hw, device="meta", dtype=torch.bfloat16)
        w = torch.empty(cout, cin, k, k, device="meta", dtype=torch.bfloat16)
        call = backward_call(g, None, None, None, None, x, w, [stride] * 2, [k // 2] * 2, None, None, None, None, None,
                             None, None, 1e-5, False, True, False, False)
        return _triton_wgrad_scratch(call)

    assert wp.scratch_bytes(256 * 56 * 56, 64, 64, 3, 3, torch.bfloat16, 90) == (30, 30 * 9 * 64 * 64 * 4)
    assert wp.scratch_bytes(256 * 7 * 7, 512, 512, 3, 3, torch.bfloat16, 90) == (2, 2 * 144 * 128 * 128 * 4)
    assert case(256, 64, 64, 3, 56) == 30 * 9 * 64 * 64 * 4
    assert case(256, 512, 512, 3, 7) == 2 * 144 * 128 * 128 * 4
    splits, b = wp.scratch_bytes(256 * 112 * 112, 64, 3, 7, 7, torch.bfloat16, 90)
    assert b == splits * 3 * 64 * 64 * 4 and splits > 1
    # one split (a long K does not help a grid that already fills the GPU): no scratch
    assert wp.scratch_bytes(64 * 128, 2048, 2048, 3, 3, torch.bfloat16, 90) == (1, 0)


@pytest.mark.parametrize("backend", ["triton", "cuda", "auto"])
@pytest.mark.parametrize("arch, C", [("resnet50", 2048), ("resnet18", 512)])
def test_the_last_blocks_gradient_arrives_in_its_layout(arch, C, backend):
    """The fused ResNet's avgpool + flatten (resnet_kernels/nn/pool.py ``head_pool``) writes its input
    gradient channels_last in one kernel (a division of the (N, 1, 1, C) broadcast): the last block's
    backward takes it as it is (before: a channels_last clone there, 1 launch and 0.10 GB for
    ResNet-50 at batch 256 bf16, and aten's as_strided backward, new_zeros + copy_, in the head), and no
    copy replaces it anywhere in the backward. Counted, not timed."""
    N, H = 256, 7
    c = count.count_step(arch, "train", backend, batch=N, image_size=224, dtype="bf16")
    bwd = [e for e in c.entries if e.phase == "bwd"]
    copies = [(e.layer, e.op) for e in bwd if e.op in ("clone", "copy_", "new_zeros", "contiguous")]
    assert not copies, copies
    (div,) = [e for e in bwd if e.op == "div"]
    assert (div.layer, div.calls, div.launches) == ("head", 1, 1)
    assert div.bytes == N * C * 2 + N * C * H * H * 2  # the (N, C) gradient read, the activation's written
