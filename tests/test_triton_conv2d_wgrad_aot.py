"""Ahead-of-time compilation of the Triton wgrad kernels (triton_ops/conv2d_wgrad.py) for real GPUs
(no GPU needed), as tests/test_triton_conv_aot.py does for the forward conv.

The test process runs under TRITON_INTERPRET=1 without a GPU, where ``@triton.jit`` yields
interpreter objects that cannot be compiled, so the compile runs in a child process (this file run
as a script) with TRITON_INTERPRET unset, against the same resnet_kernels and triton as the test
process. The child builds the exact launch a ResNet-18 layer's weight gradient at batch 256
(channels_last g and x) would do, from meta tensors: ``conv2d_wgrad._prepare`` gives the GPU config
(``select_config``), the split count, the kernel arguments and constexprs; each argument is
specialized with triton's own ``native_specialize_impl`` (ints equal to 1 become constexprs,
multiples of 16 get the divisibility attribute; tensors are assumed 16-byte aligned), so the
compiled code is what the JIT would build for that launch. ``triton.compile`` lowers it to PTX and a
cubin for sm_90 and sm_80; ptxas's ``-v`` log (TRITON_DUMP_PTXAS_LOG=1, fresh cache dir) gives
registers and spills.

Cases (CASES): the stem (packed columns), 3x3 stride 1 and 2, a 1x1 stride-2 downsample and a
small-K layer4 conv, with the full BN-backward operand (mask + coef: three operand tensors); bf16
and fp32 with tf32 everywhere, fp16 on the stem and layer2, fp32 without tf32 (3xTF32) on layer2,
the plain operand (dy = g) on layer1; layer4 bf16 forced to one split (the direct-store variant,
``SPLIT_K=False``; the heuristic also picks one split for layer4 fp32 on sm_80); each for sm_90
and sm_80. One kernel per call: split-K reduces in the same launch (the last-arriving program of
a tile sums the partials), there is no separate reduce kernel.
The x = None variant ("bn-ypre": the B operand relu(up_y * s + t) recomputed in the load,
``X_FROM_UP``) on l1 3x3 and the 1x1, bf16.
Asserted per case: it compiles; ptxas reports 0 bytes of spill stores/loads; the PTX uses tensor
cores (``mma.sync`` on sm_80; ``wgmma.mma_async`` on sm_90 for 16-bit inputs, ``wgmma`` or
``mma.sync`` for fp32); the operand loads are software pipelined (``cp.async`` in the PTX). With
split-K: exactly one atomic, the tile counter's gpu-scope acq_rel add, preceded by a CTA barrier
after the last global store (the partial tile: the release pattern), and the partials read back
with ``ld.global.cg``; with one split: no atomic at all.
Register counts are printed (``pytest -s``) as a table. Set RK_WGRAD_AOT_DUMP=<dir> to keep the PTX.
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

# (name, N, Cin, H, Cout, k, stride, pad) at batch 256, channels_last
LAYERS = [
    ("stem7x7s2", 256, 3, 224, 64, 7, 2, 3),
    ("l1_3x3s1", 256, 64, 56, 64, 3, 1, 1),
    ("l2_3x3s2", 256, 64, 56, 128, 3, 2, 1),
    ("ds_1x1s2", 256, 128, 28, 256, 1, 2, 0),
    ("l4_3x3s1", 256, 512, 7, 512, 3, 1, 1),
]
ARCHS = [90, 80]
_DT_FOR = {"stem7x7s2": ["bf16", "fp16", "fp32-tf32"], "l2_3x3s2": ["bf16", "fp16", "fp32-tf32", "fp32-3xtf32"]}
# (layer, dtype, operand): operand "bn" = mask + coef (g, mask, y read per element), "plain" = g only
CASES = ([(lay, dt, "bn") for lay in LAYERS for dt in _DT_FOR.get(lay[0], ["bf16", "fp32-tf32"])]
         + [(lay, "bf16", "plain") for lay in LAYERS if lay[0] == "l1_3x3s1"]
         + [(lay, "bf16", "bn-1split") for lay in LAYERS if lay[0] == "l4_3x3s1"]
         # the mask as the block tail's 1-bit ReLU mask (resnet_kernels/_bits.py)
         + [(lay, "bf16", "bn-bits") for lay in LAYERS if lay[0] == "ds_1x1s2"]
         # x = None: the B operand recomputed from up_y as relu(up_y * s + t) in its load (``X_FROM_UP``)
         + [(lay, "bf16", "bn-ypre") for lay in LAYERS if lay[0] in ("l1_3x3s1", "ds_1x1s2")])


def _case_id(layer, dt, operand):
    return f"{layer}-{dt}-{operand}"


# ------------------------------------------------------------------------------------------------
# child process: compile everything, write JSON

def _child_compile_all(out_path: str) -> None:
    import torch
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.runtime.jit import native_specialize_impl

    from resnet_kernels.triton_ops import _common
    from resnet_kernels.triton_ops import conv2d_wgrad as wg

    assert not _common.INTERPRET, "the AOT child must not run under the interpreter"
    kernel = wg._conv2d_wgrad_kernel
    assert isinstance(kernel, triton.runtime.jit.JITFunction), type(kernel)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32-tf32": torch.float32,
                   "fp32-3xtf32": torch.float32}

    class _AlignedPtr:  # a tensor argument as the specializer sees it: dtype + 16-byte aligned address
        def __init__(self, dtype):
            self.dtype = dtype

        def data_ptr(self):
            return 1 << 20

    def specialize(fn, names, values):
        signature, constexprs, attrs = {}, {}, {}
        for a, v in zip(names, values):
            if isinstance(v, torch.Tensor):
                v = _AlignedPtr(v.dtype)
            ty, attr = native_specialize_impl(BaseBackend, v, False, True, True)
            signature[a] = ty
            if ty == "constexpr":
                constexprs[a] = attr
            elif attr:
                attrs[(fn.arg_names.index(a),)] = BaseBackend.parse_attr(attr)
        return signature, constexprs, attrs

    def compile_one(fn, signature, constexprs, attrs, cc, num_warps, num_stages, entry):
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                ck = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                    options=dict(num_warps=num_warps, num_stages=num_stages))
        except Exception as e:  # reported, asserted in the parent
            entry.update(error=f"{type(e).__name__}: {e}"[:4000])
            return entry
        ptx = ck.asm["ptx"]
        text = log.getvalue()
        regs = [int(m) for m in re.findall(r"Used (\d+) registers", text)]
        spill = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)]
        entry.update(
            ptxas_log_found=bool(regs) and bool(spill),
            n_regs=max(regs) if regs else None,
            spill_bytes=sum(spill) if spill else None,
            shared=int(ck.metadata.shared),
            wgmma="wgmma.mma_async" in ptx,
            mma_sync=bool(re.search(r"\bmma\.sync\.aligned\b", ptx)),
            cp_async=("cp.async" in ptx),
            atomics=re.findall(r"\b(?:atom|red)\.[\w.]+", ptx),
            ld_cg=bool(re.search(r"\bld\.global\.cg\b", ptx)),
        )
        m = re.search(r"\batom\.", ptx)
        if m:  # the release pattern: a CTA barrier between the last global store and the atomic
            before = ptx[:m.start()]
            last_bar = max(before.rfind("bar.sync"), before.rfind("barrier.sync"))
            entry.update(release_barrier=last_bar > before.rfind("st.global") >= 0)
        if os.environ.get("RK_WGRAD_AOT_DUMP"):
            with open(os.path.join(os.environ["RK_WGRAD_AOT_DUMP"], f"{entry['case']}-sm{cc}.ptx"), "w") as f:
                f.write(ptx)
        return entry

    results = []
    cl = torch.channels_last
    for ((name, n, cin, h, cout, k, s, p), dt, operand), cc in itertools.product(CASES, ARCHS):
        dtype = torch_dtype[dt]
        oh = (h + 2 * p - k) // s + 1
        x = torch.empty((n, cin, h, h), dtype=dtype, device="meta").to(memory_format=cl)
        g = torch.empty((n, cout, oh, oh), dtype=dtype, device="meta").to(memory_format=cl)
        bn = operand.startswith("bn")
        mask = torch.empty_like(g) if bn else None
        if operand == "bn-bits":
            mask = torch.empty((n, oh, oh, (cout + 7) // 8), dtype=torch.uint8, device="meta")
        y = torch.empty_like(g) if bn else None
        mean = torch.empty((cout,), dtype=torch.float32, device="meta") if bn else None
        coef = torch.empty((3, cout), dtype=torch.float32, device="meta") if bn else None
        gw = torch.empty((cout, cin, k, k), dtype=dtype, device="meta")
        allow_tf32 = dt != "fp32-3xtf32"
        cfg = wg.select_config(n * oh * oh, cout, cin, k, k, dtype, cc, allow_tf32)
        if operand.endswith("-1split"):
            cfg = dataclasses.replace(cfg, splits=1)
        up = None
        if operand.endswith("-ypre"):
            vec = torch.empty((cin,), dtype=torch.float32, device="meta")
            up, x = (x, vec, vec, vec, vec, 1e-5), None
        plan = wg._prepare(g, mask, y, mean, coef, x, gw, (s, s), (p, p), allow_tf32, config=cfg, arch=cc, up=up)
        names = [a for a in kernel.arg_names if a not in plan.constexprs]
        assert len(names) == len(plan.args), (names, len(plan.args))
        signature, constexprs, attrs = specialize(kernel, names, plan.args)
        for a, v in plan.constexprs.items():
            signature[a] = "constexpr"
            constexprs[a] = v
        entry = dict(case=_case_id(name, dt, operand), arch=cc, config=vars(plan.config).copy(),
                     packed=bool(plan.constexprs["PACKED_N"]), splits=plan.splits, grid=list(plan.grid))
        results.append(compile_one(kernel, signature, constexprs, attrs, cc, plan.num_warps, plan.num_stages, entry))
    with open(out_path, "w") as f:
        json.dump(results, f)


# ------------------------------------------------------------------------------------------------
# parent: one child run per session, then one test per (case, arch)

@pytest.fixture(scope="module")
def aot_results(tmp_path_factory):
    import triton

    import resnet_kernels

    tmp = tmp_path_factory.mktemp("wgrad_aot")
    out_json = tmp / "results.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")  # fresh: ptxas must run so its -v log is printed
    env["TRITON_DUMP_PTXAS_LOG"] = "1"
    roots = [os.path.dirname(os.path.dirname(resnet_kernels.__file__)),
             os.path.dirname(os.path.dirname(triton.__file__))]
    env["PYTHONPATH"] = os.pathsep.join(roots + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out_json)], env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"AOT child failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    results = {(r["case"], r["arch"]): r for r in json.loads(out_json.read_text())}
    lines = [f"triton {triton.__version__}: wgrad kernel AOT (batch 256, channels_last)",
             f"{'case':26} {'sm':>3} {'tile':>11} {'w/s':>4} {'splits':>6} {'regs':>4} {'spill':>5} "
             f"{'smem':>6} tensor-core"]
    for (case, cc), r in results.items():
        if "error" in r:
            lines.append(f"{case:26} {cc:3} ERROR {r['error'][:200]}")
            continue
        tc = "wgmma" if r["wgmma"] else ("mma.sync" if r["mma_sync"] else "-")
        c = r["config"]
        lines.append(f"{case:26} {cc:3} {c['BLOCK_M']:>3}x{c['BLOCK_N']:>3}x{c['BLOCK_K']:<3} "
                     f"{c['num_warps']}/{c['num_stages']} {r['splits']:>6} {r['n_regs']!s:>4} {r['spill_bytes']!s:>5} "
                     f"{r['shared']:>6} {tc}{' packed-N' if r['packed'] else ''}"
                     f"{' cp.async' if r['cp_async'] else ''} grid {r['grid']}")
    print("\n" + "\n".join(lines))
    return results


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", [_case_id(lay[0], dt, op) for lay, dt, op in CASES])
def test_wgrad_kernel_aot(aot_results, case, arch):
    r = aot_results[(case, arch)]
    assert "error" not in r, r.get("error")
    assert r["ptxas_log_found"], "no ptxas -v log captured (cache hit or log format changed)"
    assert r["spill_bytes"] == 0, f"register spills: {r}"
    assert 0 < r["n_regs"] <= 255, r
    if arch == 80:
        assert r["mma_sync"], f"no mma.sync in the sm_80 PTX: {r}"
    elif "-fp32" in case:
        assert r["wgmma"] or r["mma_sync"], f"no tensor-core instruction in the sm_90 PTX: {r}"
    else:
        assert r["wgmma"], f"16-bit wgrad on sm_90 should use wgmma: {r}"
    assert r["cp_async"], f"the operand loads are not pipelined with cp.async: {r}"
    # split-K fills the GPU: about two waves of 132 SMs wherever K is long enough
    assert r["grid"][0] * r["grid"][1] >= 132 or r["splits"] > 1, r
    assert (r["splits"] == 1) == case.endswith("-1split") or case.startswith("l4_3x3s1-fp32"), r
    if r["splits"] > 1:  # one launch: the tile's last program reduces, ordered by its counter
        assert r["atomics"] == ["atom.global.gpu.acq_rel.add.u32"], r["atomics"]
        assert r["release_barrier"], "no CTA barrier between the partial-tile stores and the counter atomic"
        assert r["ld_cg"], "the partials are not read with ld.global.cg"
    else:
        assert r["atomics"] == [], r["atomics"]


if __name__ == "__main__":
    _child_compile_all(sys.argv[1])
