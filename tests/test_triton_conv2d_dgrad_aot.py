"""Ahead-of-time compilation of the Triton dgrad kernel (``triton_ops/conv2d_dgrad.py``) for real
GPUs (no GPU needed), as tests/test_triton_conv_aot.py does for the forward kernel.

The test process runs with TRITON_INTERPRET=1 (no GPU here), where ``@triton.jit`` yields
interpreter objects that cannot be compiled; the compile runs in a child process (this file run as
a script) with TRITON_INTERPRET unset, against the same resnet_kernels and triton. The child builds
the exact launch the dgrad of a ResNet layer at batch 256 (channels_last) would do, from meta
tensors: ``conv2d_dgrad._prepare`` gives the GPU config (``select_config``), the kernel arguments
and constexprs; each argument is specialized with triton's ``native_specialize_impl`` (ints equal
to 1 become constexprs, multiples of 16 get the divisibility attribute, tensors are 16-byte
aligned), so the compiled code is what the JIT would build. ``triton.compile`` lowers it for sm_90
and sm_80; ptxas's ``-v`` log (TRITON_DUMP_PTXAS_LOG=1, fresh cache dir) gives registers and spills.

Cases (CASES): the operand/epilogue variants "plain" (dy = g, grad_x stored) and "fused" (ReLU
mask, BN coefficients, residual with its mask, upstream ReLU and BN partial sums: the whole fused
backward) on ResNet layers: the 7x7 stem (Cin = 3: 16-wide column tiles), 3x3 stride 1 and 2,
1x1 stride 1 (Cin = 256: 128-wide column tiles) and 2, a small-batch layer (64-row tiles); bf16 and
fp32 with tf32 everywhere, fp16 on one layer, fp32 without tf32 (3xTF32) on one; each for sm_90 and
sm_80. Their weights are NCHW-contiguous (packed, except the 16-bit 1x1 layers': read in place);
WCL_CASES ("<layer>+wcl") repeat 16-bit 3x3 layers with a channels_last weight, read in place as the
Cin-contiguous operand (16-byte cp.async asserted), each in its own cache dir (its kernel can be
identical to the packed case's: only stride values differ). The "fused-ypre" layers (x = None: the upstream ReLU mask recomputed from up_y in the epilogue,
``UP_FROM_Y``, no up_out) repeat l1 3x3 and b 1x1 in bf16.
Asserted per case: it compiles; 0 bytes of spills; the fused variants (upstream reductions) exactly
one atomic, the column tile's arrival counter (gpu-scope acq_rel add, after a CTA barrier: the
in-launch finalize), their partials read back with ``ld.global.cg``, the plain ones none; tensor
cores (``mma.sync`` on sm_80; ``wgmma.mma_async`` on sm_90 for 16-bit, ``wgmma`` or ``mma.sync``
for fp32); the weight tile goes through ``cp.async`` (software pipelined) wherever its rows are
16-byte multiples (not the stem: Cin = 3). Register counts are printed (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys

import pytest

# (name, N, Cin, H, Cout, k, stride, pad, variant): the dgrad of conv Cin -> Cout on an H x H input
LAYERS = [
    ("stem7x7s2", 256, 3, 224, 64, 7, 2, 3, "plain"),
    ("l1_3x3s1", 256, 64, 56, 64, 3, 1, 1, "fused"),
    ("l2_3x3s2", 256, 64, 56, 128, 3, 2, 1, "fused"),
    ("b_1x1s1", 256, 256, 56, 64, 1, 1, 0, "fused"),
    ("ds_1x1s2", 256, 128, 56, 256, 1, 2, 0, "plain"),
    ("l4_3x3_b8", 8, 512, 7, 512, 3, 1, 1, "fused"),  # M = 392 < 4096: 64-row tiles
    # the block tail's 1-bit ReLU mask (resnet_kernels/_bits.py) as mask and res_mask
    ("b_1x1s1_bits", 256, 256, 56, 64, 1, 1, 0, "fused-bits"),
    # x = None (``UP_FROM_Y``): the upstream ReLU mask recomputed from up_y and the upstream BN's
    # vectors in the epilogue instead of read (no up_out)
    ("l1_3x3s1_ypre", 256, 64, 56, 64, 3, 1, 1, "fused-ypre"),
    ("b_1x1s1_ypre", 256, 256, 56, 64, 1, 1, 0, "fused-ypre"),
]
ARCHS = [90, 80]
_DT_FOR = {"l1_3x3s1": ["bf16", "fp16", "fp32-tf32"], "l2_3x3s2": ["bf16", "fp32-tf32", "fp32-3xtf32"],
           "l1_3x3s1_ypre": ["bf16"], "b_1x1s1_ypre": ["bf16"]}
CASES = [(lay, dt) for lay in LAYERS for dt in _DT_FOR.get(lay[0], ["bf16", "fp32-tf32"])]
# the weight read in place (no pack: a 16-bit channels_last weight, ``_weight_cache.
# conv_dgrad_inplace_strides``; the weights above are NCHW-contiguous: packed, except the 1x1 layers,
# whose contiguous weight is read in place too): the 3x3 layers in 16-bit, named "<layer>+wcl"
WCL_CASES = [(lay, dt) for lay in LAYERS if lay[0] in ("l1_3x3s1", "l2_3x3s2", "l4_3x3_b8")
             for dt in (["bf16", "fp16"] if lay[0] == "l2_3x3s2" else ["bf16"])]


# ------------------------------------------------------------------------------------------------
# child process: compile everything, write JSON

def _child_compile_all(out_path: str) -> None:
    import itertools

    import torch
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.runtime.jit import native_specialize_impl

    from resnet_kernels.triton_ops import _common
    from resnet_kernels.triton_ops import conv2d_dgrad as dg

    assert not _common.INTERPRET, "the AOT child must not run under the interpreter"
    kernel = dg._conv2d_dgrad_kernel
    assert isinstance(kernel, triton.runtime.jit.JITFunction), type(kernel)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32-tf32": torch.float32,
                   "fp32-3xtf32": torch.float32}

    class _AlignedPtr:  # a tensor argument as the specializer sees it: dtype + 16-byte aligned address
        def __init__(self, dtype):
            self.dtype = dtype

        def data_ptr(self):
            return 1 << 20

    results = []
    jobs = [(case, False) for case in CASES] + [(case, True) for case in WCL_CASES]
    base_cache = os.environ["TRITON_CACHE_DIR"]
    for (((name, n, cin, h, cout, k, s, p, variant), dt), wcl), cc in itertools.product(jobs, ARCHS):
        dtype = torch_dtype[dt]
        cl = torch.channels_last
        oh = (h + 2 * p - k) // s + 1

        def act(c, hw, dty=dtype):
            return torch.empty((n, c, hw, hw), dtype=dty, device="meta").to(memory_format=cl)

        def vec(c, rows=None):
            return torch.empty((c,) if rows is None else (rows, c), dtype=torch.float32, device="meta")

        fused = variant in ("fused", "fused-bits", "fused-ypre")
        ypre = variant == "fused-ypre"
        g = act(cout, oh)
        w = torch.empty((cout, cin, k, k), dtype=dtype, device="meta")
        if wcl:
            w = w.to(memory_format=cl)
            name = name + "+wcl"
            # its own cache dir: a kernel identical to a packed case's (same specialization) must still
            # run ptxas, whose -v log is what is asserted
            os.environ["TRITON_CACHE_DIR"] = os.path.join(base_cache, f"wcl-{name}-{dt}-{cc}")
        gx = act(cin, h)
        allow_tf32 = dt != "fp32-3xtf32"
        cfg = dg.select_config(n * h * h, cin, cout, k, k, dtype, cc, allow_tf32)
        def mask(c, hw):
            if variant == "fused-bits":
                return torch.empty((n, hw, hw, (c + 7) // 8), dtype=torch.uint8, device="meta")
            return act(c, hw) if fused else None

        plan = dg._prepare(
            g, mask(cout, oh), act(cout, oh) if fused else None, vec(cout) if fused else None,
            vec(cout, 3) if fused else None, w, gx, (s, s), (p, p), act(cin, h) if fused else None,
            mask(cin, h), act(cin, h) if fused and not ypre else None, act(cin, h) if fused else None,
            vec(cin) if fused else None, allow_tf32, config=cfg, arch=cc,
            up_bn=(vec(cin), vec(cin), vec(cin), 1e-5) if fused else None,
            up_fin=(vec(cin, 3), vec(cin), vec(cin)) if fused else None)
        names = [a for a in kernel.arg_names if a not in plan.constexprs]
        assert len(names) == len(plan.args), (names, len(plan.args))
        signature, constexprs, attrs = {}, {}, {}
        for a, v in zip(names, plan.args):
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
        entry = dict(layer=name, dtype=dt, arch=cc, variant=variant, config=vars(plan.config).copy())
        try:
            with contextlib.redirect_stdout(log):
                ck = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                    options=dict(num_warps=plan.num_warps, num_stages=plan.num_stages))
        except Exception as e:  # reported, asserted in the parent
            entry.update(error=f"{type(e).__name__}: {e}"[:4000])
            results.append(entry)
            continue
        ptx = ck.asm["ptx"]
        text = log.getvalue()
        regs = [int(m) for m in re.findall(r"Used (\d+) registers", text)]
        spill = [int(a) + int(b) for a, b in
                 re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)]
        arg = dict(zip(names, plan.args))
        entry.update(w_inplace=arg["w_ptr"] is w)
        entry.update(
            ptxas_log_found=bool(regs) and bool(spill),
            n_regs=max(regs) if regs else None,
            spill_bytes=sum(spill) if spill else None,
            shared=int(ck.metadata.shared),
            wgmma="wgmma.mma_async" in ptx,
            mma_sync=bool(re.search(r"\bmma\.sync\.aligned\b", ptx)),
            cp_async=("cp.async" in ptx),
            cp_async_sizes=sorted({int(b, 0) for b in re.findall(
                r"cp\.async\.c[ag]\.shared\.global(?:\.[\w:]+)*\s*\[[^\]]+\],\s*\[[^\]]+\],\s*(0x[0-9a-fA-F]+|\d+)",
                ptx)}),
            w_kmajor=arg["swk"] == 1,
            atomics=re.findall(r"\b(?:atom|red)\.[\w.]+", ptx),
            ld_cg=bool(re.search(r"\bld\.global\.cg\b", ptx)),
            w_row_bytes=(cin if arg["swn"] == 1 else cout * k * k) * torch.empty((), dtype=dtype).element_size(),
        )
        m = re.search(r"\batom\.", ptx)
        if m:  # the release pattern: a CTA barrier between the last global store and the atomic
            before = ptx[:m.start()]
            last_bar = max(before.rfind("bar.sync"), before.rfind("barrier.sync"))
            entry.update(release_barrier=last_bar > before.rfind("st.global") >= 0)
        results.append(entry)
    with open(out_path, "w") as f:
        json.dump(results, f)


# ------------------------------------------------------------------------------------------------
# parent: one child run per session, then one test per (layer, dtype, arch)

@pytest.fixture(scope="module")
def aot_results(tmp_path_factory):
    import triton

    import resnet_kernels

    tmp = tmp_path_factory.mktemp("dgrad_aot")
    out_json = tmp / "results.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")  # fresh: ptxas must run so its -v log is printed
    env["TRITON_DUMP_PTXAS_LOG"] = "1"
    roots = [os.path.dirname(os.path.dirname(resnet_kernels.__file__)),
             os.path.dirname(os.path.dirname(triton.__file__))]
    env["PYTHONPATH"] = os.pathsep.join(roots + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out_json)], env=env,
                          capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        pytest.fail(f"AOT child failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    results = {(r["layer"], r["dtype"], r["arch"]): r for r in json.loads(out_json.read_text())}
    lines = [f"triton {triton.__version__}: dgrad kernel AOT (batch 256, channels_last)",
             f"{'layer':10} {'variant':7} {'dtype':11} {'sm':>3} {'tile':>11} {'w/s':>4} {'regs':>4} {'spill':>5} "
             f"{'smem':>6} tensor-core"]
    for (layer, dt, cc), r in results.items():  # (layer names up to 13 characters: b_1x1s1_ypre)
        if "error" in r:
            lines.append(f"{layer:10} {r['variant']:7} {dt:11} {cc:3} ERROR {r['error'][:200]}")
            continue
        c = r["config"]
        tc = "wgmma" if r["wgmma"] else ("mma.sync" if r["mma_sync"] else "NONE")
        lines.append(f"{layer:10} {r['variant']:7} {dt:11} {cc:3} {c['BLOCK_M']:>3}x{c['BLOCK_N']:>3}x{c['BLOCK_K']:<3} "
                     f"{c['num_warps']}/{c['num_stages']} {r['n_regs']:>4} {r['spill_bytes']:>5} "
                     f"{r['shared']:>6} {tc} W{'k' if r['w_kmajor'] else 'n'}-major cp.async{r['cp_async_sizes']}")
    print("\n" + "\n".join(lines))
    return results


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layer,dtype", [(lay[0], dt) for lay, dt in CASES] +
                         [(lay[0] + "+wcl", dt) for lay, dt in WCL_CASES])
def test_dgrad_kernel_aot(aot_results, layer, dtype, arch):
    r = aot_results[(layer, dtype, arch)]
    # in place: the channels_last 16-bit weights and the 1x1 16-bit ones; packed: the rest
    want_inplace = not dtype.startswith("fp32") and (layer.endswith("+wcl") or "1x1" in layer)
    assert r.get("w_inplace") == want_inplace, r
    assert "error" not in r, r.get("error")
    assert r["ptxas_log_found"], "no ptxas -v log captured (cache hit or log format changed)"
    assert r["spill_bytes"] == 0, f"register spills: {r}"
    assert 0 < r["n_regs"] <= 255, r
    if arch == 80:
        assert r["mma_sync"], f"no mma.sync in the sm_80 PTX: {r}"
    elif dtype.startswith("fp32"):
        assert r["wgmma"] or r["mma_sync"], f"no tensor-core instruction in the sm_90 PTX: {r}"
    else:
        assert r["wgmma"], f"16-bit dgrad on sm_90 should use wgmma: {r}"
    if r["w_row_bytes"] % 16 == 0:
        # the weight tile is staged through shared memory with cp.async (software pipelined)
        assert r["cp_async"], f"the weight tile is not loaded with cp.async: {r}"
    if r["w_inplace"]:
        # the weight's own Cin-contiguous rows: 16-byte copies
        assert 16 in r["cp_async_sizes"], r
    if dtype.startswith("fp32"):
        assert r["w_kmajor"], "fp32 weights are packed K-major"
    if r["variant"].startswith("fused"):
        # the upstream finalize in the same launch: the column tile's last arrival sums the partials
        assert r["atomics"] == ["atom.global.gpu.acq_rel.add.u32"], r["atomics"]
        assert r["release_barrier"], "no CTA barrier between the partial stores and the counter atomic"
        assert r["ld_cg"], "the partials are not read with ld.global.cg"
    else:
        assert r["atomics"] == [], r["atomics"]


if __name__ == "__main__":
    _child_compile_all(sys.argv[1])
