#!/usr/bin/env python3
"""Registers, shared memory and local memory (spills, stack) of every kernel in the sm_90a cubin of
the installed ``resnet_kernels._C`` (the CUTLASS kernels of csrc/sm90/), plus the tensor-core and
TMA instructions each one issues, from ``cuobjdump`` (no GPU needed; the triton wheel ships it).

    python tools/sm90_resources.py [--so PATH] [--arch sm_90a] [--check]

--check: exit status 1 if a kernel uses local memory (LOCAL/STACK or LDL/STL in its SASS), if a
CUTLASS convolution kernel lacks HGMMA or UTMALDG, or if the statistics-epilogue kernel (the
training forward, csrc/sm90/col_stats_epilogue.hpp) issues a global atomic (ATOM/ATOMG/RED: its
partials must be deterministic) or lacks its butterfly shuffles (SHFL). The shared memory of the
CUTLASS kernels is dynamic (their SharedStorage, set at launch: the mainloop's STAGES, read from the
kernel's name, times 32 KB, plus the epilogue's buffers, 4 KB more for the statistics scratch), so
the static SHARED column shows only the static part.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys

COUNTED = ("HGMMA", "HMMA", "UTMALDG", "UTMASTG", "SHFL", "STG", "ATOM", "ATOMG", "RED", "LDL", "STL")


def find_cuobjdump() -> str | None:
    try:
        import triton

        cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(cand):
            return cand
    except ImportError:
        pass
    found = shutil.which("cuobjdump")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "cuobjdump")):
            return os.path.join(home, "bin", "cuobjdump")
    return None


def find_so() -> str:
    import resnet_kernels

    hits = glob.glob(os.path.join(os.path.dirname(resnet_kernels.__file__), "_C*.so"))
    if not hits:
        raise SystemExit("resnet_kernels._C is not installed (no _C*.so next to the package)")
    return hits[0]


def _run(cmd) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {res.stderr[-2000:]}")
    return res.stdout


def resource_usage(tool: str, so: str, arch: str) -> dict[str, dict[str, int]]:
    out = _run([tool, "-res-usage", so])
    table, cur, fn = {}, None, None
    for line in out.splitlines():
        m = re.match(r"\s*arch = (sm_\d+a?)", line)
        if m:
            cur = m.group(1)
            continue
        m = re.match(r"\s*Function (\S+?):\s*$", line)
        if m:
            fn = m.group(1)
            continue
        if fn is not None and cur == arch and "REG:" in line:
            table[fn] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            fn = None
    return table


def opcode_counts(tool: str, so: str, arch: str) -> dict[str, dict[str, int]]:
    """{function: {opcode: count}} for the opcodes in COUNTED, from one SASS dump of the arch."""
    out = _run([tool, "-sass", "-arch", arch, so])
    counts: dict[str, dict[str, int]] = {}
    fn = None
    for line in out.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            fn = m.group(1)
            counts[fn] = dict.fromkeys(COUNTED, 0)
            continue
        if fn is None:
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m and m.group(1) in counts[fn]:
            counts[fn][m.group(1)] += 1
    return counts


def short_name(mangled: str) -> str:
    """A readable label: our kernels by identifier; CUTLASS's by conv kind, dtype and epilogue."""
    m = re.search(r"\d+(nhwc_\w+?_kernel)", mangled)
    if m:
        dt = "bf16" if "bfloat16" in mangled else "fp16" if "half" in mangled else ""
        return f"{m.group(1)}<{dt}>" if dt else m.group(1)
    if "ConvUniversal" in mangled:
        # (half_t appears in every name: the epilogue's smem copy atom)
        dt = "bf16" if "bfloat16_t" in mangled else "tf32" if "TF32TF32" in mangled else "fp16"
        kind = conv_kind(mangled)
        if kind != "fprop":  # csrc/sm90/conv2d_sm90_bwd.cu: one epilogue each
            return f"cutlass {kind} {dt}"
        epi = ("fused-epilogue" if "PerColLinComb" in mangled else "stats-epilogue" if "ColStatsPartials" in mangled
               else "plain")
        return f"cutlass fprop {dt} {epi}"
    return mangled[:60]


def conv_kind(mangled: str) -> str:
    """fprop / dgrad / wgrad: the cutlass::conv::Operator of a CUTLASS conv kernel's problem shape."""
    m = re.search(r"ConvProblemShapeILNS\w+?OperatorE(\d)E", mangled)
    return {"0": "fprop", "1": "dgrad", "2": "wgrad"}.get(m.group(1), "?") if m else "?"


def stages(mangled: str) -> int:
    """The mainloop's pipeline stages, from the CUTLASS kernel's name (0: not a CUTLASS mainloop)."""
    m = re.search(r"MainloopSm90TmaGmmaWarpSpecialized\w*?ILS\w+?_[012]ELi(\d+)E", mangled)
    return int(m.group(1)) if m else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--so", help="the _C*.so to inspect (default: the installed resnet_kernels._C)")
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--check", action="store_true", help="exit 1 on local memory or missing HGMMA/UTMALDG")
    args = ap.parse_args(argv)
    tool = find_cuobjdump()
    if tool is None:
        raise SystemExit("cuobjdump not found (triton/backends/nvidia/bin, PATH or $CUDA_HOME/bin)")
    so = args.so or find_so()
    usage = resource_usage(tool, so, args.arch)
    if not usage:
        print(f"{so}: no {args.arch} kernels (built without the CUTLASS sm_90a kernels?)")
        return 1 if args.check else 0
    ops = opcode_counts(tool, so, args.arch)
    problems = []
    print(f"{so} ({args.arch}, cuobjdump {tool})")
    head = (f"{'kernel':<36} {'REG':>4} {'SHARED':>7} {'STAGES':>6} {'LOCAL':>6} {'STACK':>6} "
            + " ".join(f"{o:>7}" for o in COUNTED))
    print(head)
    print("-" * len(head))
    for fn in sorted(usage, key=short_name):
        u, c = usage[fn], ops.get(fn, dict.fromkeys(COUNTED, 0))
        print(f"{short_name(fn):<36} {u.get('REG', 0):>4} {u.get('SHARED', 0):>7} {stages(fn):>6} {u.get('LOCAL', 0):>6} "
              f"{u.get('STACK', 0):>6} " + " ".join(f"{c[o]:>7}" for o in COUNTED))
        if u.get("LOCAL", 0) or u.get("STACK", 0) or c["LDL"] or c["STL"]:
            problems.append(f"{short_name(fn)}: local memory (spills / stack)")
        if "ConvUniversal" in fn and not (c["HGMMA"] and c["UTMALDG"]):
            problems.append(f"{short_name(fn)}: no HGMMA or no UTMALDG")
        if "ColStatsPartials" in fn and (c["ATOM"] or c["ATOMG"] or c["RED"] or not c["SHFL"]):
            problems.append(f"{short_name(fn)}: global atomics or no butterfly shuffles in the statistics epilogue")
    for p in problems:
        print("PROBLEM:", p)
    return 1 if (problems and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
