"""Ahead-of-time compilation of the Triton implicit-GEMM conv kernel for real GPUs (no GPU needed).

The test process runs with TRITON_INTERPRET=1 (no GPU here), where ``@triton.jit`` yields
interpreter objects that cannot be compiled. So the compile runs in a child process (this file run
as a script) with TRITON_INTERPRET unset, against the same resnet_kernels and triton as the test
process. The child builds the exact launch a ResNet-18 layer at batch 256 (channels_last) would
do, from meta tensors: ``triton_ops.conv2d._prepare`` gives the GPU config (not the interpreter
one), the kernel arguments and constexprs; each argument is specialized with triton's own
``native_specialize_impl`` (ints equal to 1 become constexprs, multiples of 16 get the
divisibility attribute; tensors are assumed 16-byte aligned, as the CUDA caching allocator
guarantees), so the compiled code is what the JIT would build for that launch. ``triton.compile``
then lowers it to PTX and a cubin for sm_90 and sm_80, and ptxas's ``-v`` log (printed by triton
when TRITON_DUMP_PTXAS_LOG=1, with a fresh cache dir so ptxas really runs) gives registers and
spills.

Cases (see CASES): 4 ResNet-18 layers and a small-batch layer (64-row tiles) in bf16 and fp32 with
tf32; fp16 on the stem and on a 3x3 stride-2 layer; fp32 without tf32 (3xTF32) on that layer; each
for sm_90 and sm_80. Their weights are NCHW-contiguous (packed, except the 1x1 layer's: read in
place); WCL_CASES ("<layer>+wcl") repeat the 16-bit layers with a channels_last weight, read in place
as the K-major operand (the 16-bit stem still packs), each in its own cache dir. Asserted per case: it compiles; ptxas reports 0 bytes of spill stores/loads; the
PTX uses tensor cores (``mma.sync`` on sm_80; ``wgmma.mma_async`` on sm_90 for 16-bit inputs,
``wgmma`` or ``mma.sync`` for fp32); the chunked K loop is software pipelined (``cp.async`` in
the PTX and shared memory for at least two stages of the A and B tiles); with statistics (the
"stats" layers) the merge runs in the same launch: exactly two atomics, the level-1 and level-2
arrival counters' gpu-scope acq_rel adds, each after a CTA barrier that follows the last global
store before it (the release pattern), and the partials read back with ``ld.global.cg``; without
statistics no atomic. Register counts are printed (``pytest -s``) as a table.
PERS_CASES ("<layer>+pers", bf16): the opt-in persistent schedule (a loop over tiles around the whole
tile), asserted like the one-tile-per-program kernel (the statistics' two atomics and release
barriers inside the loop); its registers are in the printed table with the plain kernel's.
BN_CASES ("<layer>+bn", bf16): conv2d_bn_stats' operand prologue (``PROLOGUE``: relu(bn(x)) on the A
tiles, with statistics), asserted alike (the A/B tiles' 16-byte cp.async present, other copy sizes
allowed for the prologue's per-channel vectors).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import os
import re
import subprocess
import sys

import pytest

# (name, N, Cin, H, Cout, k, stride, pad, epilogue) at batch 256, channels_last; epilogue:
# "stats" = training forward (y + batch statistics), "fused" = inference (scale, bias, residual, relu)
LAYERS = [
    ("stem7x7s2", 256, 3, 224, 64, 7, 2, 3, "stats"),
    ("l1_3x3s1", 256, 64, 56, 64, 3, 1, 1, "stats"),
    ("l2_3x3s2", 256, 64, 56, 128, 3, 2, 1, "fused"),
    ("ds_1x1s2", 256, 128, 28, 256, 1, 2, 0, "stats"),
]
DTYPES = ["bf16", "fp16", "fp32-tf32"]
ARCHS = [90, 80]
# small batch (M = 392 < 4096: the 64-row tile config), inference epilogue
SMALL = ("l4_3x3_b8", 8, 512, 7, 512, 3, 1, 1, "fused")
# every dtype on the stem (packed K loop) and on a chunked layer with the fused epilogue; fp16 is
# the same code as bf16 elsewhere, so the other layers compile bf16 and tf32 only (compile time);
# exact fp32 (allow_tf32=False -> 3xTF32) on one layer
_DT_FOR = {"stem7x7s2": DTYPES, "l2_3x3s2": DTYPES + ["fp32-3xtf32"]}
CASES = [(lay, dt) for lay in LAYERS + [SMALL] for dt in _DT_FOR.get(lay[0], ["bf16", "fp32-tf32"])]
# the weight read in place (``_weight_cache.conv_fwd_inplace_strides``): a channels_last weight,
# named "<layer>+wcl" (the weights of CASES are NCHW-contiguous: packed, except the 1x1 layer's,
# read in place too): 16-bit K-major where the pack was N-major; fp32 was this view already; the
# 16-bit stem keeps its pack (147-element rows)
WCL_CASES = [(lay, dt) for lay in LAYERS + [SMALL] if lay[0] != "ds_1x1s2"
             for dt in (["bf16", "fp16"] if lay[0] == "l2_3x3s2" else ["bf16"])]
# conv2d_bn_stats: the BN + ReLU operand prologue (PROLOGUE, with statistics), "<layer>+bn": the
# chunked K loop on a 3x3 and a 1x1 layer (their NCHW-contiguous weights, as CASES: the 3x3 packed, the
# 1x1 read in place) and on the 128x128-tile 3x3 stride-2 layer (the most registers), and the packed K
# loop on the stem's shape (the stem itself has no BN before it; the loop shape is what is compiled)
BN_CASES = [(lay, "bf16") for lay in LAYERS]
# the opt-in TMA weight path (ConvConfig.w_tma): sm_90 only (TMA is Hopper's), chunked K loop
TMA_CASES = [(lay, dt) for lay in LAYERS if lay[0] in ("l1_3x3s1", "l2_3x3s2") for dt in ("bf16", "fp32-tf32")]
# and with the conv2d_bn_stats prologue ("<layer>+bn+tma")
TMA_BN_CASES = [(lay, "bf16") for lay in LAYERS if lay[0] == "l1_3x3s1"]
# the opt-in persistent schedule (ConvConfig.persistent, "<layer>+pers"): the tile loop around the
# whole tile (K loop, epilogue, the statistics merge with its counters), with statistics on a 64-wide
# and a 128-wide tile, the inference epilogue on the 128x128 3x3 stride-2 layer
PERS_CASES = [(lay, "bf16") for lay in LAYERS if lay[0] in ("l1_3x3s1", "l2_3x3s2", "ds_1x1s2")]


# ------------------------------------------------------------------------------------------------
# child process: compile everything, write JSON

def _barrier_after_last_store(before: str) -> bool:
    """A CTA barrier between the last global store in ``before`` (the PTX up to an atomic) and its end."""
    last_bar = max(before.rfind("bar.sync"), before.rfind("barrier.sync"))
    return last_bar > before.rfind("st.global") >= 0


def _child_compile_all(out_path: str) -> None:
    import torch
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.runtime.jit import native_specialize_impl

    from resnet_kernels.triton_ops import _common
    from resnet_kernels.triton_ops import conv2d as conv

    assert not _common.INTERPRET, "the AOT child must not run under the interpreter"
    kernel = conv._conv2d_fwd_kernel
    assert isinstance(kernel, triton.runtime.jit.JITFunction), type(kernel)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32-tf32": torch.float32,
                   "fp32-3xtf32": torch.float32}

    class _AlignedPtr:  # a tensor argument as the specializer sees it: dtype + 16-byte aligned address
        def __init__(self, dtype):
            self.dtype = dtype

        def data_ptr(self):
            return 1 << 20

    from triton.tools.tensor_descriptor import TensorDescriptor

    tl_name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    jobs = ([(case, cc, False, False) for case, cc in itertools.product(CASES, ARCHS)]
            + [(case, 90, True, False) for case in TMA_CASES]
            + [(case, cc, False, True) for case, cc in itertools.product(WCL_CASES, ARCHS)]
            + [(case, cc, False, "bn") for case, cc in itertools.product(BN_CASES, ARCHS)]
            + [(case, 90, True, "bn") for case in TMA_BN_CASES]
            + [(case, cc, False, "pers") for case, cc in itertools.product(PERS_CASES, ARCHS)])
    base_cache = os.environ["TRITON_CACHE_DIR"]
    results = []
    for ((name, n, cin, h, cout, k, s, p, epi), dt), cc, tma, wcl in jobs:
        dtype = torch_dtype[dt]
        cl = torch.channels_last
        x = torch.empty((n, cin, h, h), dtype=dtype, device="meta").to(memory_format=cl)
        w = torch.empty((cout, cin, k, k), dtype=dtype, device="meta")
        bn = None
        persistent = wcl == "pers"
        if persistent:
            wcl = False
            name = name + "+pers"
            os.environ["TRITON_CACHE_DIR"] = os.path.join(base_cache, f"pers-{name}-{dt}-{cc}")
        if wcl == "bn":
            wcl = False
            epi = "stats"
            vec = [torch.empty((cin,), dtype=torch.float32, device="meta") for _ in range(4)]
            bn = (*vec, 1e-5)
            name = name + "+bn"
            os.environ["TRITON_CACHE_DIR"] = os.path.join(base_cache, f"bn-{name}-{dt}-{cc}")
        if wcl:
            w = w.to(memory_format=cl)
            name = name + "+wcl"
            # its own cache dir: a kernel identical to a packed case's (same specialization) must still
            # run ptxas, whose -v log is what is asserted
            os.environ["TRITON_CACHE_DIR"] = os.path.join(base_cache, f"wcl-{name}-{dt}-{cc}")
        oh = (h + 2 * p - k) // s + 1
        out = torch.empty((n, cout, oh, oh), dtype=dtype, device="meta").to(memory_format=cl)
        fused = epi == "fused"
        scale = torch.empty((cout,), dtype=torch.float32, device="meta") if fused else None
        bias = torch.empty((cout,), dtype=torch.float32, device="meta") if fused else None
        res = torch.empty_like(out) if fused else None
        allow_tf32 = dt != "fp32-3xtf32"
        cfg = conv.select_config(n * oh * oh, cout, cin, k, k, dtype, cc, allow_tf32)
        if tma:
            cfg = dataclasses.replace(cfg, w_tma=True)
        if persistent:
            cfg = dataclasses.replace(cfg, persistent=1)
        plan = conv._prepare(x, w, scale, bias, res, out, (s, s), (p, p), fused, not fused, allow_tf32, config=cfg,
                             arch=cc, bn=bn)
        assert plan.constexprs["PROLOGUE"] == (bn is not None), plan.constexprs
        assert plan.constexprs["PERSISTENT"] == persistent, plan.constexprs
        if tma:
            assert plan.constexprs["W_DESC"] in (1, 2), plan.constexprs
            name = name + "+tma"

        names = [a for a in kernel.arg_names if a not in plan.constexprs]
        assert len(names) == len(plan.args), (names, len(plan.args))
        signature, constexprs, attrs = {}, {}, {}
        for a, v in zip(names, plan.args):
            if isinstance(v, TensorDescriptor):
                signature[a] = f"tensordesc<{tl_name[v.base.dtype]}[{', '.join(map(str, v.block_shape))}]>"
                continue
            if isinstance(v, torch.Tensor):
                v = _AlignedPtr(v.dtype)
            ty, attr = native_specialize_impl(BaseBackend, v, False, True, True)
            signature[a] = ty
            if ty == "constexpr":
                constexprs[a] = attr
            elif attr:
                attrs[(kernel.arg_names.index(a),)] = BaseBackend.parse_attr(attr)
        for a, v in plan.constexprs.items():
            signature[a] = "constexpr"
            constexprs[a] = v
        src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        log = io.StringIO()
        entry = dict(layer=name, dtype=dt, arch=cc, config=vars(plan.config).copy(),
                     packed=bool(plan.constexprs["PACKED_K"]), stats=bool(plan.constexprs["STATS"]),
                     prologue=bool(plan.constexprs["PROLOGUE"]))
        try:
            with contextlib.redirect_stdout(log):
                ck = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                    options=dict(num_warps=plan.num_warps, num_stages=plan.num_stages))
        except Exception as e:  # reported, asserted in the parent
            entry.update(error=f"{type(e).__name__}: {e}"[:4000])
            results.append(entry)
            continue
        ptx = ck.asm["ptx"]
        w_arg = dict(zip(names, plan.args))["w_ptr"]
        if isinstance(w_arg, TensorDescriptor):
            w_arg = w_arg.base
        text = log.getvalue()
        regs = [int(m) for m in re.findall(r"Used (\d+) registers", text)]
        spill = [int(a) + int(b) for a, b in
                 re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)]
        entry.update(
            ptxas_log_found=bool(regs) and bool(spill),
            n_regs=max(regs) if regs else None,
            spill_bytes=sum(spill) if spill else None,
            shared=int(ck.metadata.shared),
            wgmma="wgmma.mma_async" in ptx,
            mma_sync=bool(re.search(r"\bmma\.sync\.aligned\b", ptx)),
            cp_async=("cp.async" in ptx),
            # bytes per cp.async copy: 4-byte copies are a transposing or unvectorised load
            cp_async_sizes=sorted({int(b, 0) for b in re.findall(
                r"cp\.async\.c[ag]\.shared\.global(?:\.[\w:]+)*\s*\[[^\]]+\],\s*\[[^\]]+\],\s*(0x[0-9a-fA-F]+|\d+)",
                ptx)}),
            w_kmajor=dict(zip(names, plan.args))["swk"] == 1,
            w_inplace=w_arg is w or getattr(w_arg, "_base", None) is w,  # a view of the weight: no pack
            tma=("cp.async.bulk.tensor" in ptx),
            # the statistics merge in the same launch: the arrival counters' atomics, each after a CTA
            # barrier that follows the last global store before it (the release pattern), and the
            # partials read back from L2
            atomics=re.findall(r"\b(?:atom|red)\.[\w.]+", ptx),
            release_barriers=[_barrier_after_last_store(ptx[:m.start()]) for m in re.finditer(r"\batom\.", ptx)],
            ld_cg=bool(re.search(r"\bld\.global\.cg\b", ptx)),
            elem_bytes=torch.empty((), dtype=dtype).element_size(),
        )
        results.append(entry)
    with open(out_path, "w") as f:
        json.dump(results, f)


# ------------------------------------------------------------------------------------------------
# parent: one child run per session, then one test per (layer, dtype, arch)

@pytest.fixture(scope="module")
def aot_results(tmp_path_factory):
    import triton

    import resnet_kernels

    tmp = tmp_path_factory.mktemp("conv_aot")
    out_json = tmp / "results.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")  # fresh: ptxas must run so its -v log is printed
    env["TRITON_DUMP_PTXAS_LOG"] = "1"
    # the same resnet_kernels and triton as this process
    roots = [os.path.dirname(os.path.dirname(resnet_kernels.__file__)),
             os.path.dirname(os.path.dirname(triton.__file__))]
    env["PYTHONPATH"] = os.pathsep.join(roots + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out_json)], env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"AOT child failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    results = {(r["layer"], r["dtype"], r["arch"]): r for r in json.loads(out_json.read_text())}
    lines = [f"triton {triton.__version__}: conv kernel AOT (batch 256, channels_last)",
             f"{'layer':10} {'dtype':11} {'sm':>3} {'tile':>11} {'w/s':>4} {'regs':>4} {'spill':>5} "
             f"{'smem':>6} tensor-core"]
    for (layer, dt, cc), r in results.items():
        if "error" in r:
            lines.append(f"{layer:10} {dt:11} {cc:3} ERROR {r['error'][:200]}")
            continue
        c = r["config"]
        tc = "wgmma" if r["wgmma"] else ("mma.sync" if r["mma_sync"] else "NONE")
        lines.append(f"{layer:10} {dt:11} {cc:3} {c['BLOCK_M']:>3}x{c['BLOCK_N']:>3}x{c['BLOCK_K']:<3} "
                     f"{c['num_warps']}/{c['num_stages']} {r['n_regs']:>4} {r['spill_bytes']:>5} "
                     f"{r['shared']:>6} {tc}{' packed-K' if r['packed'] else ''}{' stats' if r['stats'] else ''}"
                     f" W{'k' if r['w_kmajor'] else 'n'}-major cp.async{r['cp_async_sizes']}")
    print("\n" + "\n".join(lines))
    return results


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layer,dtype", [(lay[0], dt) for lay, dt in CASES] +
                         [(lay[0] + "+wcl", dt) for lay, dt in WCL_CASES] +
                         [(lay[0] + "+bn", dt) for lay, dt in BN_CASES] +
                         [(lay[0] + "+pers", dt) for lay, dt in PERS_CASES])
def test_conv_kernel_aot(aot_results, layer, dtype, arch):
    r = aot_results[(layer, dtype, arch)]
    assert r["prologue"] == layer.endswith("+bn"), r
    # read in place: channels_last weights (fp32 always; 16-bit but the stem's 147-element rows)
    # and the 1x1 layer's contiguous weight
    want_inplace = ("1x1" in layer or layer.endswith("+wcl")) and not (
        layer.startswith("stem") and not dtype.startswith("fp32"))
    assert r.get("w_inplace") == want_inplace, r
    if want_inplace:
        assert r["w_kmajor"], r
    assert "error" not in r, r.get("error")
    assert r["ptxas_log_found"], "no ptxas -v log captured (cache hit or log format changed)"
    assert r["spill_bytes"] == 0, f"register spills: {r}"
    assert 0 < r["n_regs"] <= 255, r
    if arch == 80:
        assert r["mma_sync"], f"no mma.sync in the sm_80 PTX: {r}"
    elif dtype.startswith("fp32"):
        assert r["wgmma"] or r["mma_sync"], f"no tensor-core instruction in the sm_90 PTX: {r}"
    else:
        assert r["wgmma"], f"16-bit conv on sm_90 should use wgmma: {r}"
    if not r["packed"]:
        # chunked K loop: A and B tiles staged through shared memory with cp.async, >= 2 stages
        c = r["config"]
        stage = (c["BLOCK_M"] * c["BLOCK_K"] + c["BLOCK_K"] * c["BLOCK_N"]) * r["elem_bytes"]
        assert r["cp_async"], f"the K loop is not pipelined with cp.async: {r}"
        # every global->shared copy is 16 bytes (channels_last A rows along cin; the weight packed
        # along the dimension the MMA wants it contiguous: K for fp32, whose 32-bit B operand
        # neither wgmma nor ldmatrix can transpose: N-major fp32 gave 4-byte copies)
        if r["prologue"]:
            # the A and B tiles still 16-byte copies (the prologue's (Cin,) vectors may add others)
            assert 16 in r["cp_async_sizes"], f"cp.async copies of {r['cp_async_sizes']} bytes: {r}"
        else:
            assert r["cp_async_sizes"] == [16], f"cp.async copies of {r['cp_async_sizes']} bytes: {r}"
        assert r["shared"] >= 2 * stage, f"shared memory {r['shared']} < 2 pipeline stages ({2 * stage}): {r}"
    if dtype.startswith("fp32"):
        assert r["w_kmajor"], "fp32 weights are packed K-major"
    if r["stats"]:  # one launch: the statistics merged by the last arrivals, ordered by the counters
        assert r["atomics"] == ["atom.global.gpu.acq_rel.add.u32"] * 2, r["atomics"]  # level 1, level 2
        assert all(r["release_barriers"]), "no CTA barrier between the partial stores and a counter atomic"
        assert r["ld_cg"], "the partials are not read with ld.global.cg"
    else:
        assert r["atomics"] == [], r["atomics"]


@pytest.mark.parametrize("layer,dtype", [(lay[0], dt) for lay, dt in TMA_CASES] +
                         [(lay[0] + "+bn", dt) for lay, dt in TMA_BN_CASES])
def test_conv_kernel_tma_aot(aot_results, layer, dtype):
    """ConvConfig.w_tma on sm_90: the weight tiles come through TMA (cp.async.bulk.tensor), the
    activations still through 16-byte cp.async, wgmma, no spills."""
    r = aot_results[(layer + "+tma", dtype, 90)]
    assert "error" not in r, r.get("error")
    assert r["ptxas_log_found"] and r["spill_bytes"] == 0 and 0 < r["n_regs"] <= 255, r
    assert r["wgmma"] and r["tma"], r
    assert r["cp_async"] and 16 in r["cp_async_sizes"], r
    assert r["prologue"] or r["cp_async_sizes"] == [16], r


if __name__ == "__main__":
    _child_compile_all(sys.argv[1])
