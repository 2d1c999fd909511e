"""Ahead-of-time compilation of Triton kernels for a CUDA target, without a GPU.

    from rk_aot import KernelSpec, aot_compile
    res = aot_compile([KernelSpec("resnet_kernels.triton_ops.bn_add_relu", "_fwd_kernel",
                                  signature={"x_ptr": "*fp16", ..., "numel": "i32"},
                                  constexprs={"BLOCK_S": 1024, ...}, num_warps=8, arch=90)])
    res[0].n_spills, res[0].n_regs, res[0].ptx, res[0].sass

Each kernel goes through ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
(the API is the same in triton 3.6 and 3.8); registers and spills are read from the cubin's
resource usage with the ``cuobjdump`` shipped in the triton wheel (``n_spills`` is the local
memory size / 4, which is what triton's CUDA driver reports as ``n_spills`` at load time).

Why a subprocess: the tests run with ``TRITON_INTERPRET=1`` when there is no GPU, and then
``@triton.jit`` produced interpreter objects when the kernel module was imported; helper
``@triton.jit`` functions called by a kernel are resolved through the module's globals, so
re-wrapping only the kernel in a fresh ``JITFunction`` is not enough. The kernels are therefore
compiled in one child Python process started without ``TRITON_INTERPRET`` and with this
process's ``sys.path`` (so it imports the very same installed package and triton version).
All specs of one call share that process; results are cached per spec in this process.

Signatures: ``signature`` lists the runtime arguments only ("*fp32", "*fp16", "*bf16", "*fp64",
"i32", "i64", "fp32", ...); every argument named in ``constexprs`` is a constexpr (values:
int, float, bool, None, or a string "tl.float16" meaning that triton.language dtype). Pointer
arguments get the 16-byte divisibility hint that triton's launcher gives to any torch
allocation; integer arguments named in ``divisible_by_16`` get it too (what the launcher does
for runtime values divisible by 16).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    module: str
    kernel: str
    signature: Dict[str, str]
    constexprs: Dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    arch: int = 90
    divisible_by_16: Tuple[str, ...] = ()
    sass: bool = False  # also return the SASS (cuobjdump -sass), e.g. to look for HMMA/HGMMA

    def key(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@dataclasses.dataclass(frozen=True)
class AotResult:
    spec: KernelSpec
    name: str
    n_regs: int
    n_spills: int          # local memory bytes / 4 (triton's n_spills)
    local_bytes: int
    stack_bytes: int
    shared_bytes: int
    ptx: str
    sass: Optional[str]
    triton_version: str

    def summary(self) -> str:
        return (f"{self.spec.kernel} sm_{self.spec.arch} warps={self.spec.num_warps}: regs={self.n_regs} "
                f"spills={self.n_spills} stack={self.stack_bytes}B smem={self.shared_bytes}B")


_WORKER = r'''
import importlib, json, os, re, subprocess, sys, tempfile
_req = json.load(sys.stdin)
sys.path[:] = _req["sys_path"]  # import exactly what the parent imports
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction
import triton.backends.nvidia as _nv

BIN = os.path.join(os.path.dirname(_nv.__file__), "bin")

def const(v):
    if isinstance(v, str) and v.startswith("tl."):
        return getattr(tl, v[3:])
    return v

def run(spec):
    mod = importlib.import_module(spec["module"])
    fn = getattr(mod, spec["kernel"])
    if not isinstance(fn, JITFunction):
        raise TypeError(f"{spec['module']}.{spec['kernel']} is {type(fn).__name__}, not a triton JITFunction "
                        f"(TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} in the AOT worker)")
    consts = {k: const(v) for k, v in spec["constexprs"].items()}
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in spec["signature"]:
            sig[name] = spec["signature"][name]
        else:
            raise ValueError(f"{spec['kernel']}: argument {name!r} is neither in signature nor in constexprs")
    extra = set(spec["signature"]) | set(consts)
    extra -= set(fn.arg_names)
    if extra:
        raise ValueError(f"{spec['kernel']}: unknown arguments {sorted(extra)}")
    hinted = [i for i, n in enumerate(fn.arg_names)
              if sig[n].startswith("*") or n in spec["divisible_by_16"]]
    attrs = {(i,): [["tt.divisibility", 16]] for i in hinted}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    target = GPUTarget("cuda", spec["arch"], 32)
    ck = triton.compile(src, target=target, options={"num_warps": spec["num_warps"],
                                                      "num_stages": spec["num_stages"]})
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(ck.asm["cubin"])
        res = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", path],
                             capture_output=True, text=True, check=True).stdout
        sass = None
        if spec["sass"]:
            sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", path],
                                  capture_output=True, text=True, check=True).stdout
    def field(name):
        m = re.search(r"\b" + name + r":(\d+)", res)
        if m is None:
            raise RuntimeError(f"cuobjdump resource usage has no {name}: {res}")
        return int(m.group(1))
    local = field("LOCAL")
    return dict(name=ck.metadata.name, n_regs=field("REG"), n_spills=local // 4, local_bytes=local,
                stack_bytes=field("STACK"), shared_bytes=int(ck.metadata.shared), ptx=ck.asm["ptx"], sass=sass,
                triton_version=triton.__version__)

out = []
for spec in _req["specs"]:
    try:
        out.append(dict(ok=True, **run(spec)))
    except Exception as exc:  # reported per spec by the parent
        import traceback
        out.append(dict(ok=False, error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
sys.stdout.write("\n@@AOT@@" + json.dumps(out))
'''

_CACHE: Dict[str, Any] = {}


class AotError(RuntimeError):
    pass


def _child_env() -> Dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("CUDA_VISIBLE_DEVICES", "")  # never touch a GPU from the worker
    return env


def _check_spec(s: KernelSpec) -> None:
    """Signature and constexprs must name every argument of the kernel exactly once (checked
    here, before starting the worker)."""
    import importlib

    names = kernel_arg_names(getattr(importlib.import_module(s.module), s.kernel))
    given = list(s.signature) + list(s.constexprs)
    missing = [n for n in names if n not in given]
    unknown = [n for n in given if n not in names]
    dup = sorted(set(s.signature) & set(s.constexprs))
    if missing or unknown or dup:
        raise AotError(f"{s.module}.{s.kernel}: bad spec: missing arguments {missing}, unknown {unknown}, "
                       f"both runtime and constexpr {dup}")


def aot_compile(specs: Sequence[KernelSpec], timeout: float = 900.0) -> List[AotResult]:
    """Compile every spec (one child process for the ones not cached yet). Raises AotError
    naming the kernel when one fails to compile."""
    for s in specs:
        _check_spec(s)
    todo = list({s.key(): s for s in specs if s.key() not in _CACHE}.values())
    if todo:
        payload = json.dumps({"sys_path": [p for p in sys.path if p],
                              "specs": [dataclasses.asdict(s) for s in todo]})
        with tempfile.TemporaryDirectory() as cwd:  # no source tree on the child's path by accident
            proc = subprocess.run([sys.executable, "-c", _WORKER], input=payload, capture_output=True, text=True,
                                  env=_child_env(), timeout=timeout, cwd=cwd)
        if proc.returncode != 0 or "@@AOT@@" not in proc.stdout:
            raise AotError(f"AOT worker failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
        results = json.loads(proc.stdout.rsplit("@@AOT@@", 1)[1])
        for s, r in zip(todo, results):
            _CACHE[s.key()] = r
    out = []
    for s in specs:
        r = _CACHE[s.key()]
        if not r["ok"]:
            raise AotError(f"{s.module}.{s.kernel} (sm_{s.arch}, constexprs={s.constexprs}) failed to compile:\n"
                           f"{r['error']}")
        fields = {k: v for k, v in r.items() if k != "ok"}
        out.append(AotResult(spec=s, **fields))
    return out


def aot_compile_one(spec: KernelSpec) -> AotResult:
    return aot_compile([spec])[0]


def kernel_arg_names(kernel) -> List[str]:
    """Argument names of a @triton.jit kernel, whether or not it is an interpreter object."""
    import inspect

    fn = kernel
    while hasattr(fn, "fn"):
        fn = fn.fn
    return list(inspect.signature(fn).parameters)


def jit_functions(module) -> Dict[str, Any]:
    """The module-level @triton.jit functions of ``module`` (JITFunction or, under the
    interpreter, InterpretedFunction objects) by name."""
    from triton.runtime.jit import JITFunction

    kinds: Tuple[type, ...] = (JITFunction,)
    try:
        from triton.runtime.interpreter import InterpretedFunction
        kinds = kinds + (InterpretedFunction,)
    except ImportError:  # pragma: no cover - layout of older tritons
        pass
    return {n: v for n, v in vars(module).items() if isinstance(v, kinds)}


def tensor_core_instructions(res: AotResult) -> List[str]:
    """Tensor-core instructions found in the PTX (mma / wgmma) and SASS (HMMA / HGMMA) of a result,
    for kernels that must use them (convolutions)."""
    import re

    found = set(re.findall(r"\b(wgmma\.mma_async|mma\.sync)\b", res.ptx))
    if res.sass:
        found |= set(re.findall(r"\b(HGMMA|HMMA|IMMA)\b", res.sass))
    return sorted(found)


def global_vector_accesses(res: AotResult) -> Tuple[List[str], List[str]]:
    """(vector loads, vector stores) to global memory in the PTX, e.g. ['ld.global.v4.b32']."""
    import re

    loads = sorted(set(re.findall(r"ld\.global(?:\.[a-z0-9]+)*\.v[248]\.[a-z0-9]+", res.ptx)))
    stores = sorted(set(re.findall(r"st\.global(?:\.[a-z0-9]+)*\.v[248]\.[a-z0-9]+", res.ptx)))
    return loads, stores


def ptx_types(dtypes: Iterable) -> List[str]:
    """torch dtypes -> triton signature pointer types."""
    import torch

    names = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64",
             torch.int32: "*i32", torch.int64: "*i64", torch.uint8: "*u8"}
    return [names[d] for d in dtypes]
