"""The host runner (test-only): csrc/'s CUDA kernels compiled for the CPU and run there.

``build()`` compiles the kernels' own source (csrc/*.cu, csrc/module.cpp: the same pybind11
bindings as ``resnet_kernels._C``) with the host C++ compiler against
tests/host/runner/include (stand-ins for the CUDA headers: built-ins, __half/__nv_bfloat16, the
runtime calls csrc makes, and host implementations of csrc/ptx.cuh's PTX helpers) plus
tests/host/runner/runner.cpp (fibers per CTA thread, barriers, warp collectives, cp.async groups,
a shared-memory race detector and a global-memory bounds check). The only edit made to the source
on the way is mechanical: ``k<<<g, b, s, st>>>(args)`` becomes
``::rk_host::launcher(g, b, s, st, k, "k")(args)`` (every launch is rewritten, or the build fails).
Tests can also pass ``patches`` (exact text substitutions) to build a deliberately broken copy.

``HostRunner`` wraps the loaded module with the two extra calls the seam
``resnet_kernels.backends.cuda_common.host_runner`` needs: ``pointer(tensor)`` (registers the
tensor's extent, so a kernel access outside every tensor of the call is an error) and ``done()``.
Objects and modules are cached under $RK_HOST_RUNNER_CACHE (default: <tmp>/rk_host_runner), keyed
by a hash of every input, so a second test session reuses them.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
RUNNER = REPO / "tests" / "host" / "runner"
INCLUDE = RUNNER / "include"

# a kernel name (optionally a template-id without nested <>) followed by <<<config>>>(
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;(){}]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)

# -fno-gnu-unique: the static locals of template kernels (their __shared__ arrays) must stay private
# to each loaded runner module (several, each with a planted bug, can be loaded in one process)
COMMON_FLAGS = ["-std=c++17", "-O1", "-g0", "-fPIC", "-DRK_HOST_RUNNER", "-ffp-contract=off", "-fno-strict-aliasing",
                "-fno-gnu-unique", "-Wno-unknown-pragmas", "-Wno-attributes"]
# kernel translation units: every load/store calls the runner's checks; __CUDA_ARCH__ selects the
# device code paths (sm_80: cp.async, ldmatrix, mma.sync)
KERNEL_FLAGS = ["-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0", "-D__CUDA_ARCH__=800"]


def compiler() -> str | None:
    for c in (os.environ.get("CXX"), "g++", "c++"):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def rewrite_launches(text: str, name: str) -> str:
    want = text.count("<<<")
    out, n = _LAUNCH.subn(lambda m: f"::rk_host::launcher({m.group(2)}, {m.group(1)}, \"{m.group(1)}\")(", text)
    if n != want:
        raise RuntimeError(f"{name}: rewrote {n} of {want} kernel launches (unexpected launch syntax)")
    return out


def _cache_root() -> Path:
    return Path(os.environ.get("RK_HOST_RUNNER_CACHE") or Path(tempfile.gettempdir()) / "rk_host_runner")


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def _python_includes():
    import pybind11

    return [f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]


def build(patches: dict[str, list[tuple[str, str]]] | None = None, jobs: int | None = None) -> Path:
    """Compile (or reuse) the host-runner module; returns the path of its ``_C`` shared object.

    ``patches``: {csrc file name: [(old, new), ...]}: exact substitutions (each ``old`` must occur
    exactly once) applied to a copy of the source, to inject bugs."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) on PATH")
    patches = patches or {}
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    root = _cache_root()
    # sources (patched copies of csrc/) and every header they may include
    texts = {p.name: p.read_text() for p in sorted(CSRC.iterdir()) if p.suffix in (".cu", ".cuh", ".h", ".cpp")}
    for name, subs in patches.items():
        for old, new in subs:
            if texts[name].count(old) != 1:
                raise RuntimeError(f"patch for {name}: {old!r} occurs {texts[name].count(old)} times, expected once")
            texts[name] = texts[name].replace(old, new)
    runner_files = {p.relative_to(RUNNER).as_posix(): p.read_text() for p in sorted(RUNNER.rglob("*"))
                    if p.is_file() and p.suffix in (".h", ".cpp")}
    headers = {**{k: v for k, v in texts.items() if not k.endswith((".cu", ".cpp"))},
               **{Path(k).name: v for k, v in runner_files.items() if k.endswith(".h")}}

    def deps(text: str, seen: set) -> set:  # the quoted includes of a file, transitively
        for inc in re.findall(r'#\s*include\s*[<"]([\w./]+)[>"]', text):
            if inc in headers and inc not in seen:
                seen.add(inc)
                deps(headers[inc], seen)
        return seen

    src_dir = root / "src" / _digest(*(f"{k}\n{v}" for k, v in sorted(texts.items())))
    if not src_dir.exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root))
        for name, text in texts.items():
            (tmp / name).write_text(rewrite_launches(text, name) if name.endswith(".cu") else text)
        shutil.copytree(tmp, src_dir, dirs_exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    pyinc = _python_includes()
    units = []  # (source path, flags)
    for name in sorted(texts):
        if name.endswith(".cu"):
            units.append((src_dir / name, ["-x", "c++", *KERNEL_FLAGS]))
        elif name.endswith(".cpp"):
            units.append((src_dir / name, pyinc))
    units.append((RUNNER / "runner.cpp", []))
    obj_dir = root / "obj"
    obj_dir.mkdir(parents=True, exist_ok=True)

    def compile_one(unit):
        src, extra = unit
        flags = [*COMMON_FLAGS, f"-I{INCLUDE}", f"-I{src_dir}", *extra]
        text = src.read_text()
        dep_text = [f"{h}\n{headers[h]}" for h in sorted(deps(text, set()))]
        key_flags = [f for f in flags if f != f"-I{src_dir}"]  # a patch elsewhere must not rebuild this
        obj = obj_dir / f"{src.stem}-{_digest(version, key_flags, text, *dep_text)}.o"
        if not obj.exists():
            tmp = obj.with_suffix(f".{os.getpid()}.tmp.o")
            r = subprocess.run([cxx, *flags, "-c", str(src), "-o", str(tmp)], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"host runner: compiling {src.name} failed:\n{r.stderr[-6000:]}")
            os.replace(tmp, obj)
        return obj

    workers = jobs or max(1, min(len(units), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        objs = list(ex.map(compile_one, units))
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    mod_dir = root / "mod" / _digest(version, *(o.name for o in objs))
    so = mod_dir / f"_C{suffix}"
    if not so.exists():
        mod_dir.mkdir(parents=True, exist_ok=True)
        tmp = mod_dir / f"_C.{os.getpid()}.tmp.so"
        r = subprocess.run([cxx, "-shared", "-Wl,-Bsymbolic", "-o", str(tmp), *map(str, objs), "-ldl"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"host runner: linking failed:\n{r.stderr[-6000:]}")
        nm = shutil.which("nm")
        if nm:  # every instrumentation hook must be ours: an unresolved one would fail at import
            und = subprocess.run([nm, "-u", str(tmp)], capture_output=True, text=True).stdout
            missing = sorted({ln.split()[-1] for ln in und.splitlines() if "__tsan_" in ln})
            if missing:
                raise RuntimeError(f"host runner: instrumentation hooks not provided by runner.cpp: {missing}")
        os.replace(tmp, so)
    return so


class HostRunner:
    """A loaded host-runner module: ``_C``'s API (entry points, argument structs) plus
    ``pointer``/``done`` for the seam in ``resnet_kernels.backends.cuda_common``."""

    def __init__(self, so_path: Path, sm_count: int = 2, blocks_per_sm: int = 2):
        name = f"rk_host_runner_{_digest(str(so_path))}._C"
        spec = importlib.util.spec_from_file_location(name, so_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self.module = module
        self.path = so_path
        self._lib = ctypes.CDLL(str(so_path))  # the same loaded object: same globals
        self._lib.rk_host_register_buffer.argtypes = [ctypes.c_uint64, ctypes.c_uint64]
        self._lib.rk_host_configure.argtypes = [ctypes.c_int, ctypes.c_int]
        self._lib.rk_host_configure_device.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self._lib.rk_host_configure_order.argtypes = [ctypes.c_uint]
        self._lib.rk_host_take_launches.restype = ctypes.c_char_p
        # a "GPU" of 2 SMs x 2 resident blocks: grid-stride loops really loop
        self._lib.rk_host_configure(sm_count, blocks_per_sm)
        self.configure_device(*self.DEFAULT_DEVICE)
        self.configure_order(0)

    # the device the runner poses as by default: an A100 (sm_80, 163 KiB opt-in shared memory per block)
    DEFAULT_DEVICE = (8, 0, 163 * 1024)

    def configure_device(self, major: int, minor: int, smem_optin: int) -> None:
        """Pose as a device of compute capability major.minor with ``smem_optin`` bytes of opt-in
        shared memory per block (what cudaDeviceGetAttribute reports and cudaFuncSetAttribute and
        dynamic-shared-memory launches are checked against)."""
        self._lib.rk_host_configure_device(major, minor, smem_optin)

    def configure_order(self, seed: int) -> None:
        """Run each launch's CTAs in blockIdx order (seed 0) or in a pseudo-random permutation fixed
        by ``seed`` (kernels whose CTAs meet on arrival counters must not depend on the order)."""
        self._lib.rk_host_configure_order(seed)

    def take_launches(self) -> list[str]:
        """The kernels launched since the last call (their launch expressions in csrc), in order."""
        return self._lib.rk_host_take_launches().decode().splitlines()

    def __getattr__(self, name):
        return getattr(self.module, name)

    def pointer(self, t) -> int:
        """Address of CPU tensor ``t``; its extent becomes readable/writable by the next launch."""
        if t.device.type != "cpu":
            raise ValueError(f"the host runner takes CPU tensors, got a {t.device.type} tensor")
        p = t.data_ptr()
        if t.numel() > 0:
            span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
            self._lib.rk_host_register_buffer(p, span * t.element_size())
        return p

    def done(self) -> None:
        self._lib.rk_host_clear_buffers()
