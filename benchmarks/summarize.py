#!/usr/bin/env python
"""Summaries of benchmark results (no GPU and no resnet_kernels import needed).

    python benchmarks/summarize.py summary [--stages FILE] [--json OUT] FILE...
        FILEs: pytest-benchmark JSON (--benchmark-json) of the suites in this directory,
        RK_BENCH_RECORDS JSON-lines files (*.jsonl) and/or ``resnet-kernels bench --json`` files. Prints one table per suite: our CUDA-event
        median times, speed-ups of cuda/triton over eager (cuDNN) and torch.compile, and the
        % of copy bandwidth of the memory-bound ops; then the stage status from --stages.
    python benchmarks/summarize.py compare OLD.json NEW.json
        Two pytest-benchmark JSON files of the same suites: per benchmark, the CUDA-event
        medians (extra_info["median_ms"]) old vs new and new/old.

A speed-up is baseline time / our time: > 1 means ours is faster.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Optional, Tuple

BASELINES = ("eager", "compile", "cudnn")
try:  # ours: 'auto' and the registry's benchmark backends (never listed by hand)
    from resnet_kernels import _registry

    OURS = ("auto",) + tuple(b.name for b in _registry.backends() if b.benchmark or b.name == "cutlass")
except ImportError:  # summarising results on a machine without the package
    OURS = ("auto", "cuda", "triton", "aten")


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def records_from(data: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Flat records from a pytest-benchmark JSON or a ``resnet-kernels bench`` JSON."""
    if data.get("schema", "").startswith("resnet-kernels-bench/"):
        c = data["config"]
        case = f"{c['model']} {c['mode']} N{c['batch']}"
        out = []
        for r in data["results"]:
            rec = {"suite": "models", "case": case, "impl": r["backend"], "status": r["status"],
                   "reason": r.get("reason"), "source": "resnet-kernels bench"}
            if r["status"] == "ok":
                rec.update(median_ms=r["median_ms"], images_per_s=r["images_per_s"],
                           peak_mem_bytes=r.get("peak_mem_bytes"))
            out.append(rec)
        return out
    if "benchmarks" in data:
        out = []
        for b in data["benchmarks"]:
            rec = dict(b.get("extra_info") or {})
            rec.setdefault("suite", b.get("group") or "other")
            rec.setdefault("case", b.get("name"))
            rec["name"] = b.get("fullname") or b.get("name")
            rec.setdefault("status", "ok" if "median_ms" in rec else "no-extra-info")
            out.append(rec)
        return out
    raise ValueError("not a pytest-benchmark JSON (no 'benchmarks') nor a resnet-kernels bench JSON (no 'schema')")


def load(paths: Iterable[str]) -> Tuple[List[Dict[str, Any]], List[str]]:
    recs: List[Dict[str, Any]] = []
    problems: List[str] = []
    for p in paths:
        try:
            with open(p) as f:
                if p.endswith(".jsonl"):  # RK_BENCH_RECORDS: one extra_info per line
                    for line in f:
                        if line.strip():
                            r = json.loads(line)
                            r.setdefault("status", "ok")
                            recs.append(r)
                else:
                    recs.extend(records_from(json.load(f)))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problems.append(f"{p}: {type(exc).__name__}: {exc}")
    return recs, problems


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------


def _what(r: Dict[str, Any]) -> str:
    return str(r.get("direction") or r.get("kind") or r.get("mode") or "")


def _group(records: List[Dict[str, Any]]) -> "OrderedDict[str, OrderedDict[Tuple[str, str], Dict[str, Dict]]]":
    suites: "OrderedDict[str, OrderedDict]" = OrderedDict()
    for r in records:
        key = (str(r.get("case")), _what(r) if r.get("suite") != "models" else "")
        suites.setdefault(str(r.get("suite")), OrderedDict()).setdefault(key, {})[str(r.get("impl"))] = r
    return suites


def _ms(r: Optional[Dict[str, Any]]) -> Optional[float]:
    if r is None or r.get("status", "ok") != "ok":
        return None
    v = r.get("median_ms")
    return float(v) if v is not None else None


def _f(v: Optional[float], fmt: str) -> str:
    """``format(v, fmt)``, or a '-' padded to the same width for a missing value."""
    if v is None:
        digits = "".join(ch for ch in fmt.split(".")[0] if ch.isdigit())
        return "-".rjust(int(digits) if digits else 1)
    return format(v, fmt)


def rows_of(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per (suite, case, direction/kind): baseline and our medians and the ratios."""
    rows = []
    for suite, groups in _group(records).items():
        for (case, what), impls in groups.items():
            base = {b: _ms(impls.get(b)) for b in BASELINES}
            row: Dict[str, Any] = {"suite": suite, "case": case, "what": what,
                                   "eager_ms": base["eager"] if base["eager"] is not None else base["cudnn"],
                                   "eager_is": "cudnn" if base["eager"] is None and base["cudnn"] is not None
                                   else "eager",
                                   "compile_ms": base["compile"]}
            for o in OURS:
                r = impls.get(o)
                ms = _ms(r)
                row[f"{o}_ms"] = ms
                row[f"{o}_vs_eager"] = row["eager_ms"] / ms if ms and row["eager_ms"] else None
                row[f"{o}_vs_compile"] = row["compile_ms"] / ms if ms and row["compile_ms"] else None
                row[f"{o}_pct_copy"] = r.get("pct_of_copy") if ms else None
                row[f"{o}_tflops"] = r.get("tflops") if ms else None
                row[f"{o}_images_per_s"] = r.get("images_per_s") if ms else None
                eg = impls.get("eager")
                if ms and eg and r.get("peak_mem_bytes") and eg.get("peak_mem_bytes"):
                    row[f"{o}_mem_vs_eager"] = r["peak_mem_bytes"] / eg["peak_mem_bytes"]
                if r is not None and r.get("status", "ok") != "ok":
                    row[f"{o}_status"] = f"{r['status']}: {r.get('reason')}"
            rows.append(row)
    return rows


TITLES = {
    "ops": "fused residual epilogue (bf16, channels_last; %copy = achieved GB/s over a D2D copy of the same bytes)",
    "conv": "convolutions (bf16, channels_last; kind conv: baseline is cuDNN alone)",
    "models": "whole models (step time; speed-up in images/s)",
}


# the per-impl metric shown next to the ratios, per suite
METRIC = {"ops": ("_pct_copy", "%copy", "7.1f"), "conv": ("_tflops", "TFLOP/s", "7.1f"),
          "models": ("_images_per_s", "img/s", "7.0f")}


def format_rows(rows: List[Dict[str, Any]]) -> str:
    out: List[str] = ["times: CUDA-event medians in ms; NxE = speed-up over eager (cuDNN), NxC = over torch.compile "
                      "(baseline ms / our ms, > 1 = ours faster)"]
    by_suite: "OrderedDict[str, List[Dict]]" = OrderedDict()
    for r in rows:
        by_suite.setdefault(r["suite"], []).append(r)
    for suite, rs in by_suite.items():
        out.append("")
        out.append(f"[{suite}] {TITLES.get(suite, '')}")
        mkey, mlabel, mfmt = METRIC.get(suite, ("_pct_copy", "%copy", "6.1f"))
        w = max(24, min(56, max(len(f"{r['case']} {r['what']}".strip()) for r in rs)))
        head = f"{'case':<{w}} {'eager':>8} {'compile':>8} | {'cuda':>8} {'xE':>6} {'xC':>6} {mlabel:>7} | " \
               f"{'triton':>8} {'xE':>6} {'xC':>6} {mlabel:>7}"
        out.append(head)
        for r in rs:
            label = f"{r['case']} {r['what']}".strip()[:w]
            line = f"{label:<{w}} {_f(r['eager_ms'], '8.3f')} {_f(r['compile_ms'], '8.3f')}"
            for o in OURS:
                line += (f" | {_f(r[o + '_ms'], '8.3f')} {_f(r[o + '_vs_eager'], '6.2f')} "
                         f"{_f(r[o + '_vs_compile'], '6.2f')} {_f(r.get(o + mkey), mfmt)}")
            out.append(line)
            for o in OURS:
                if r.get(o + "_status"):
                    out.append(f"    {o}: {r[o + '_status']}")
    return "\n".join(out)


def format_records(records: List[Dict[str, Any]]) -> str:
    return format_rows(rows_of(records))


def read_stages(path: str) -> List[Dict[str, Any]]:
    """Stage lines written by gpu_check.sh: name<TAB>status<TAB>rc<TAB>seconds."""
    stages = []
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 4:
                stages.append({"stage": parts[0], "status": parts[1], "rc": int(parts[2]), "seconds": float(parts[3])})
    return stages


def format_stages(stages: List[Dict[str, Any]]) -> str:
    lines = [f"{'stage':<28}{'status':<10}{'rc':>4}{'seconds':>9}"]
    for s in stages:
        lines.append(f"{s['stage']:<28}{s['status']:<10}{s['rc']:>4}{s['seconds']:>9.1f}")
    bad = [s["stage"] for s in stages if s["status"] not in ("ok", "skipped")]
    lines.append("ALL STAGES OK" if not bad else f"FAILED STAGES: {', '.join(bad)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------


def cmd_summary(args) -> int:
    records, problems = load(args.files)
    rows = rows_of(records)
    text = format_rows(rows) if rows else "no benchmark results to summarise"
    stages = read_stages(args.stages) if args.stages else []
    parts = [text]
    if problems:
        parts.append("unreadable result files:\n" + "\n".join(f"  {p}" for p in problems))
    if stages:
        parts.append(format_stages(stages))
    print("\n\n".join(parts))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "stages": stages, "problems": problems}, f, indent=2)
            f.write("\n")
    return 0


def cmd_compare(args) -> int:
    (old, p1), (new, p2) = load([args.old]), load([args.new])
    if p1 or p2:
        print("\n".join(p1 + p2), file=sys.stderr)
        return 2
    o = {r["name"]: r for r in old if "name" in r}
    print(f"{'benchmark':<90}{'old ms':>10}{'new ms':>10}{'new/old':>9}")
    for r in new:
        name = r.get("name")
        a, b = _ms(o.get(name)), _ms(r)
        ratio = b / a if a and b else None
        print(f"{str(name)[:89]:<90}{_f(a, '10.4f')}{_f(b, '10.4f')}{_f(ratio, '9.3f')}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("summary")
    s.add_argument("files", nargs="*")
    s.add_argument("--stages")
    s.add_argument("--json")
    s.set_defaults(func=cmd_summary)
    c = sub.add_parser("compare")
    c.add_argument("old")
    c.add_argument("new")
    c.set_defaults(func=cmd_compare)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
