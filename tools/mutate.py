#!/usr/bin/env python3
"""A small mutation test of the code that runs on a CPU (Triton kernels under the interpreter, the
ops, the BN semantics, fuse): plant one known bug at a time in the INSTALLED copy of the package,
run the tests meant to catch it, restore the file, and print the score. Developers run it before
changing kernels or loosening a tolerance; it is not part of CI (minutes per mutant under the
interpreter).

    tools/devinstall.sh NAME --no-cuda            # installs the tree into /tmp/rk_site_NAME
    tools/mutate.py --site /tmp/rk_site_NAME      # every mutant
    tools/mutate.py --site /tmp/rk_site_NAME M07 M08 M08-bf16   # a subset
    tools/mutate.py --list

The working tree is never modified: each mutation is applied to the installed file (which must
be identical to the working tree's source, else the run stops: re-run devinstall), the tests of
the working tree run against it (``pytest -x``: the first failure kills the mutant), and the
original is restored in a ``finally``. A mutant whose anchor text is not found exactly once is
reported as "stale" (the code moved on): update its entry.

Mutants M01-M16 and X17 are the planted bugs of shared/reviews/2026-12-02-mutation-and-test-audit.md;
"-bf16"/"-fp16" variants run only the cases of that dtype (a 1 % statistics error must be caught in
every dtype).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Tuple

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Mutant:
    id: str
    path: str  # source path relative to the repository root
    edits: List[Tuple[str, str]]  # (old, new): each old must occur exactly once
    tests: List[str]  # pytest arguments, test paths relative to the repository root
    what: str
    extra: List[str] = field(default_factory=list)


BN = "triton_ops/bn_add_relu.py"
CV = "triton_ops/conv2d.py"
BN_T = ["tests/ops/test_bn_add_relu.py", "-k", "triton or Triton"]
CV_T = ["tests/ops/test_conv2d_triton.py"]

MUTANTS = [
    Mutant("M01", BN, [("        else:\n            ch = (offs // inner) % C\n",
                        "        else:\n            ch = offs % C\n")], BN_T,
           "flat NCHW channel index (offs // inner) % C -> offs % C"),
    Mutant("M02", BN, [("        rmask = rows < R\n", "        rmask = rows < R - 1\n")], BN_T,
           "2-D tiling row mask drops the last row"),
    Mutant("M03", BN, [("                r = r * tl.load(id_scale_ptr + ch, mask=mask, other=0.0)\n",
                        "                r = r\n")], BN_T,
           "flat mode: identity_scale multiply dropped"),
    Mutant("M04", BN, [("            x = x + r\n    else:\n", "            x = tl.where(x < 0, 0.0, x) + r\n    else:\n"),
                       ("    if RELU:\n        # where(y < 0, 0, y), not maximum: NaN propagates like torch.relu.\n"
                        "        x = tl.where(x < 0, 0.0, x)\n", "")], BN_T,
           "ReLU on the BN branch before the identity add, none after"),
    Mutant("M05", BN, [("acc += tl.load(base + rows[:, None] * C + cols[None, :], mask=m, other=0.0)",
                        "acc += tl.load(base + rows[:, None] + cols[None, :] * P, mask=m, other=0.0)")], BN_T,
           "backward partials (P, C) read as (C, P)"),
    Mutant("M06", CV, [("ih0 = oh * stride_h - pad_h", "ih0 = oh * stride_h + pad_h")], CV_T, "H padding sign"),
    Mutant("M07", CV, [("iw0 = ow * stride_w - pad_w", "iw0 = ow * stride_h - pad_w")], CV_T,
           "W coordinate uses stride_h"),
    Mutant("M08", CV, [("tl.store(var_ptr + offs_c, m2 / M, mask=c_mask)",
                        "tl.store(var_ptr + offs_c, m2 / (M - 1), mask=c_mask)")], CV_T,
           "conv batch variance unbiased instead of biased"),
    Mutant("M08-bf16", CV, [("tl.store(var_ptr + offs_c, m2 / M, mask=c_mask)",
                             "tl.store(var_ptr + offs_c, m2 / (M - 1), mask=c_mask)")],
           ["tests/ops/test_conv2d_op.py", "-k", "stats_forward and triton and bfloat16"],
           "M08, bf16 cases only"),
    Mutant("M09", CV, [("        y = y + res.to(tl.float32)\n    if RELU:\n        y = tl.maximum(y, 0.0)\n",
                        "    if RELU:\n        y = tl.maximum(y, 0.0)\n    if HAS_RES:\n        y = y + res.to(tl.float32)\n")],
           CV_T, "residual added after the ReLU"),
    Mutant("M10", CV, [("grid = (num_m_tiles * triton.cdiv(cout, cfg.BLOCK_N),)",
                        "grid = ((M // cfg.BLOCK_M) * triton.cdiv(cout, cfg.BLOCK_N),)")], CV_T,
           "last partial M tile never launched"),
    Mutant("M11", "resnet_kernels/ops/conv2d.py", [("shift = gm / m - b * mean.to(acc)", "shift = gm / m")],
           ["tests/ops/test_conv2d_op.py", "-k", "gradcheck or backward"],
           "conv2d_stats backward: the -b*mean term dropped"),
    Mutant("M12", "resnet_kernels/ops/bn_add_relu.py",
           [("ctx.save_for_backward(output if relu else None,", "ctx.save_for_backward(x if relu else None,")],
           ["tests/ops/test_bn_add_relu.py", "-k", "torch"], "ReLU mask taken from the input, not the output"),
    Mutant("M13", "resnet_kernels/nn/_bn.py", [("unbiased = var.detach() * (m / (m - 1))", "unbiased = var.detach()")],
           ["tests/nn/test_conv_bn.py", "-k", "torch"], "running_var updated with the biased variance"),
    Mutant("M13-bf16", "resnet_kernels/nn/_bn.py",
           [("unbiased = var.detach() * (m / (m - 1))", "unbiased = var.detach()")],
           ["tests/nn/test_conv_bn.py", "-k", "running_stats_every_dtype and bfloat16"], "M13, bf16 cases only"),
    Mutant("M14", "resnet_kernels/nn/_bn.py",
           [("bn.running_mean.mul_(1.0 - factor).add_(mean.detach().to(bn.running_mean.dtype), alpha=factor)",
             "bn.running_mean.mul_(factor).add_(mean.detach().to(bn.running_mean.dtype), alpha=1.0 - factor)"),
            ("bn.running_var.mul_(1.0 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)",
             "bn.running_var.mul_(factor).add_(unbiased.to(bn.running_var.dtype), alpha=1.0 - factor)")],
           ["tests/nn/test_conv_bn.py", "-k", "torch"], "momentum inverted"),
    Mutant("M15", "resnet_kernels/nn/_bn.py",
           [("bn.num_batches_tracked.add_(1)", "bn.num_batches_tracked.add_(0)")],
           ["tests/nn/test_conv_bn.py", "-k", "torch"], "num_batches_tracked not incremented"),
    Mutant("M16", "resnet_kernels/models/_units.py",
           [("    return unit_reason(downsample[0], downsample[1])",
             "    return conv_reason(downsample[0])")],
           ["tests/models/test_fuse.py", "-k", "downsample_norm"],
           "fuse(): the downsample's norm layer not checked on its own (successor of the "
           "downsample-SyncBatchNorm rejection, now that SyncBatchNorm fuses)"),
    Mutant("X17", "resnet_kernels/models/resnet.py",
           [("shortcut = x if ds is None else ds(x)", "shortcut = x if ds is None else ds[0](x)")],
           ["tests/models/test_fuse.py", "-k", "syncbatchnorm or SyncBatchNorm"],
           "unfused shortcut skips the downsample BN"),
]


def installed_path(site: Path, src: str) -> Path:
    if src.startswith("triton_ops/"):
        return site / "resnet_kernels" / src
    return site / src


def _pytest_cmd(tests: List[str], stop_first: bool) -> List[str]:
    args = [a if a.startswith("-") or not a.startswith("tests/") else str(ROOT / a) for a in tests]
    return [sys.executable, "-m", "pytest", *(["-x"] if stop_first else []), "-q", "-p", "no:cacheprovider", *args]


def baseline(chosen: List[Mutant], site: Path, timeout: float) -> List[str]:
    """Each distinct test selection must pass on the unmutated code (else a 'kill' means nothing)."""
    bad = []
    env = dict(os.environ, PYTHONPATH=str(site))
    for tests in dict.fromkeys(tuple(m.tests) for m in chosen):
        t0 = time.time()
        res = subprocess.run(_pytest_cmd(list(tests), True), cwd="/tmp", env=env, capture_output=True, text=True,
                             timeout=timeout)
        last = ([ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()] or [""])[-1]
        print(f"baseline  {'ok' if res.returncode == 0 else 'FAILED':<8} {time.time() - t0:6.0f} s  "
              f"{' '.join(tests)}  [{last}]", flush=True)
        if res.returncode != 0:
            bad.append(" ".join(tests))
    return bad


def run_mutant(m: Mutant, site: Path, timeout: float, verbose: bool) -> Tuple[str, float, str]:
    """('killed' | 'SURVIVED' | 'stale' | 'error', seconds, detail)."""
    src = ROOT / m.path
    dst = installed_path(site, m.path)
    original = src.read_text()
    if not dst.exists() or dst.read_text() != original:
        return "error", 0.0, f"{dst} is not the working tree's {m.path}: re-run tools/devinstall.sh"
    mutated = original
    for old, new in m.edits:
        n = mutated.count(old)
        if n != 1:
            return "stale", 0.0, f"anchor found {n} times in {m.path}: {old.strip()[:60]!r}"
        mutated = mutated.replace(old, new)
    cmd = _pytest_cmd(m.tests, True)
    env = dict(os.environ, PYTHONPATH=str(site))
    t0 = time.time()
    try:
        dst.write_text(mutated)
        res = subprocess.run(cmd, cwd="/tmp", env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "error", time.time() - t0, f"timed out after {timeout:.0f} s"
    finally:
        dst.write_text(original)
    dt = time.time() - t0
    tail = [ln for ln in (res.stdout + res.stderr).strip().splitlines() if ln.strip()]
    last = tail[-1] if tail else ""
    if verbose:
        print("\n".join(tail[-15:]))
    if res.returncode == 1:
        first = next((ln for ln in tail if ln.startswith("FAILED")), last)
        return "killed", dt, first
    if res.returncode == 0:
        return "SURVIVED", dt, last
    return "error", dt, f"pytest exit {res.returncode}: {last}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ids", nargs="*", help="mutant ids (default: all)")
    ap.add_argument("--site", type=Path, help="the --target of tools/devinstall.sh (/tmp/rk_site_NAME)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per mutant")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip running each test selection on the unmutated code first")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    if a.list:
        for m in MUTANTS:
            print(f"{m.id:<9} {m.path:<34} {m.what}")
        return 0
    if a.site is None:
        ap.error("--site is required (see tools/devinstall.sh)")
    known = {m.id for m in MUTANTS}
    unknown = [i for i in a.ids if i not in known]
    if unknown:
        ap.error(f"unknown mutant ids {unknown}; --list shows them")
    chosen = [m for m in MUTANTS if not a.ids or m.id in a.ids]
    if not a.no_baseline:
        failing = baseline(chosen, a.site, a.timeout)
        if failing:
            print(f"the unmutated code fails {failing}: fix that first (no score)")
            return 2
    results = []
    for m in chosen:
        status, dt, detail = run_mutant(m, a.site, a.timeout, a.verbose)
        results.append((m, status))
        print(f"{m.id:<9} {status:<8} {dt:6.0f} s  {m.what}  [{detail}]", flush=True)
    scored = [r for r in results if r[1] in ("killed", "SURVIVED")]
    killed = sum(r[1] == "killed" for r in scored)
    print(f"\nmutation score: {killed}/{len(scored)} killed"
          + (f" = {100.0 * killed / len(scored):.1f} %" if scored else ""))
    bad = [m.id for m, s in results if s not in ("killed", "SURVIVED")]
    if bad:
        print(f"not scored (stale anchor or error): {', '.join(bad)}")
    survivors = [m.id for m, s in results if s == "SURVIVED"]
    if survivors:
        print(f"survivors: {', '.join(survivors)}")
    return 0 if not survivors and not bad else 1


if __name__ == "__main__":
    sys.exit(main())
