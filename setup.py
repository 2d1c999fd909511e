"""Build script: drives CMake to compile the torch-free CUDA extension ``resnet_kernels._C``.

Environment variables
---------------------
RESNET_KERNELS_CUDA_ARCHS     semicolon/comma separated SM list (default "80;90"); entries the
                              nvcc in use cannot target are dropped with a message.
RESNET_KERNELS_REQUIRE_CUDA   "1": a missing/unusable CUDA compiler is a hard build error
                              (CI sets it). Otherwise the pure Python + Triton package installs
                              and the build output says so.
RESNET_KERNELS_SKIP_CUDA      "1": do not build the extension even if nvcc is present.
RESNET_KERNELS_CUTLASS_DIR    CUTLASS source root for the sm_90a kernels (csrc/sm90/): the directory
                              holding include/cutlass (e.g. an installed nvidia-cutlass wheel's
                              cutlass_library/source). Default: the cutlass_library package importable by
                              the build's Python. Pinned version: CUTLASS_PIN below
                              (pip install --no-deps nvidia-cutlass==4.2.0.0: headers only).
RESNET_KERNELS_SKIP_SM90      "1": leave the sm_90a kernels out even if CUTLASS is found.
                              Without CUTLASS, an nvcc < 12.4 or sm_90 not among the architectures they
                              are left out with a message (an error with RESNET_KERNELS_REQUIRE_CUDA=1
                              when sm_90 is requested).
MAX_JOBS                      parallel compile jobs (default: number of CPUs).
CUDA_HOME / CUDA_PATH         where to look for nvcc before PATH.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "80;90"
CUTLASS_PIN = "4.2.0.0"  # nvidia-cutlass wheel version the sm_90a kernels are written against
MIN_NVCC_SM90A = (12, 4)


# Measured on a shared 2-core machine (see the README): the whole CUDA build, both default
# architectures, idle (estimated from the CPU time) to heavily loaded (measured).
BUILD_MINUTES_2_CORES = "2 to 6"  # README: 142 s CPU time, 5 min 39 s wall clock under load


def _tty(text: str) -> None:
    """Also show ``text`` on the user's terminal: pip hides a build backend's output unless -v,
    so a plain ``pip install .`` would otherwise compile for minutes in silence. No terminal (CI,
    a log file): nothing, the text is in the captured output anyway."""
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(text)
    except OSError:
        pass


def _say(msg: str, tty: bool = False) -> None:
    # setuptools swallows stdout of build steps unless verbose; stderr shows in pip -v and in
    # failures. Print to both so the message is visible either way.
    bar = "=" * 78
    text = f"\n{bar}\nresnet-kernels: {msg}\n{bar}\n"
    sys.stderr.write(text)
    sys.stdout.write(text)
    if tty:
        _tty(text)


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def find_nvcc():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return _real_nvcc(found)
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def _real_nvcc(nvcc: str) -> str:
    """PATH may hold a wrapper script around the toolkit's nvcc; CMake needs the real one (it
    locates the toolkit's headers and libraries next to it). nvcc --dryrun prints its home."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull], capture_output=True, text=True, timeout=60)
        m = re.search(r"_HERE_=(\S+)", out.stdout + out.stderr)
        if m and (Path(m.group(1)) / "nvcc").exists():
            return str(Path(m.group(1)) / "nvcc")
    except (OSError, subprocess.SubprocessError):
        pass
    return nvcc


def nvcc_supported_archs(nvcc: str):
    out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout
    return {int(m) for m in re.findall(r"compute_(\d+)", out)}


def requested_archs():
    raw = os.environ.get("RESNET_KERNELS_CUDA_ARCHS", DEFAULT_ARCHS)
    archs = []
    for tok in re.split(r"[;,\s]+", raw.strip()):
        if not tok:
            continue
        tok = tok.lower().replace("sm_", "").replace("compute_", "").replace(".", "")
        if not tok.isdigit():
            raise RuntimeError(f"RESNET_KERNELS_CUDA_ARCHS: cannot parse {tok!r} (expected e.g. '80;90')")
        archs.append(int(tok))
    return archs


def _cmake_binary() -> str:
    """The pip-installed cmake (a build requirement, new enough for CUDA 13) before PATH's."""
    try:
        import cmake

        cand = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if cand.exists():
            return str(cand)
    except (ImportError, AttributeError):
        pass
    found = shutil.which("cmake")
    if not found:
        raise RuntimeError("cmake not found: pip install cmake (>= 3.26)")
    return found


def _build_with_progress(cmd, cwd) -> None:
    """Run the build, passing its output through (pip -v, logs) and echoing the build steps
    ("[3/8] Building CUDA object ...") to the terminal, so a plain pip install shows progress."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    t0 = time.monotonic()
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        m = re.match(r"\[(\d+)/(\d+)\]\s+(Building \S+ object|Linking \S+ shared (?:module|library))\s*(\S*)", line)
        if m:
            what = Path(m.group(4)).name.replace(".o", "") if m.group(4) else ""
            _tty(f"resnet-kernels: [{m.group(1)}/{m.group(2)}] {m.group(3).split()[0].lower()} {what} "
                 f"({int(time.monotonic() - t0)} s)\n")
    if proc.wait() != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd)


def _nvcc_version(nvcc: str):
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def find_cutlass():
    """(CUTLASS source root holding include/cutlass, None) or (None, why not found)."""
    env = os.environ.get("RESNET_KERNELS_CUTLASS_DIR", "").strip()
    if env:
        base = Path(env)
        for cand in (base, base / "source", base / "cutlass_library" / "source"):
            if (cand / "include" / "cutlass" / "cutlass.h").exists():
                return cand.resolve(), None
        return None, f"RESNET_KERNELS_CUTLASS_DIR={env} holds no include/cutlass/cutlass.h"
    import importlib.util

    spec = importlib.util.find_spec("cutlass_library")  # located, not imported (its deps are not needed)
    if spec is None or not spec.submodule_search_locations:
        return None, (f"CUTLASS not found: pip install --no-deps nvidia-cutlass=={CUTLASS_PIN} and set "
                      "RESNET_KERNELS_CUTLASS_DIR to its cutlass_library/source (or make cutlass_library "
                      "importable by the build)")
    cand = Path(list(spec.submodule_search_locations)[0]).resolve() / "source"
    if (cand / "include" / "cutlass" / "cutlass.h").exists():
        return cand, None
    return None, f"the cutlass_library package at {cand.parent} has no source/include/cutlass/cutlass.h"


def sm90_config(nvcc: str, archs):
    """(CMake arguments, message) for the CUTLASS sm_90a kernels (csrc/sm90/)."""
    why = None
    if _truthy("RESNET_KERNELS_SKIP_SM90"):
        why = "RESNET_KERNELS_SKIP_SM90=1"
    elif 90 not in archs:
        why = "sm_90 is not among the architectures built"
    elif _nvcc_version(nvcc) < MIN_NVCC_SM90A:
        why = (f"nvcc {'.'.join(map(str, _nvcc_version(nvcc)))} cannot build them "
               f"(sm_90a and CUTLASS 3.x need CUDA >= {'.'.join(map(str, MIN_NVCC_SM90A))})")
    cutlass = None
    if why is None:
        cutlass, why = find_cutlass()
    if why is not None:
        if _truthy("RESNET_KERNELS_REQUIRE_CUDA") and 90 in archs and not _truthy("RESNET_KERNELS_SKIP_SM90"):
            raise RuntimeError(f"RESNET_KERNELS_REQUIRE_CUDA=1 but the sm_90a kernels cannot be built: {why} "
                               "(RESNET_KERNELS_SKIP_SM90=1 leaves them out)")
        note = why.replace('"', "'").replace(";", ",")
        return ["-DRK_SM90A=OFF", f"-DRK_SM90_NOTE={note}"], f"NOT building the sm_90a (CUTLASS) kernels: {why}"
    return ["-DRK_SM90A=ON", f"-DRK_CUTLASS_DIR={cutlass}"], f"building the sm_90a (CUTLASS) kernels with {cutlass}"


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path):
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


class CMakeBuild(build_ext):
    """Builds the CMake extension, or (SKIP_CUDA, no nvcc, a failed build without REQUIRE_CUDA)
    leaves it out. An extension left out is also left out of the outputs this command reports
    (get_outputs / get_output_mapping, used by ``pip install -e .``) and of the in-place copy:
    declaring a file that was never produced fails the editable install."""

    def initialize_options(self) -> None:
        super().initialize_options()
        self._skipped = set()
        self._sm90_on = False

    def _only_built(self, method, *args):
        exts, self.extensions = self.extensions, [e for e in self.extensions if e.name not in self._skipped]
        try:
            return method(*args)
        finally:
            self.extensions = exts

    def copy_extensions_to_source(self) -> None:
        self._only_built(super().copy_extensions_to_source)

    def get_outputs(self):
        return self._only_built(super().get_outputs)

    def get_output_mapping(self):
        return self._only_built(super().get_output_mapping)

    def build_extension(self, ext: CMakeExtension) -> None:
        self._skipped.add(ext.name)  # until the build below succeeds
        self._build_or_skip(ext)

    def _build_or_skip(self, ext: CMakeExtension) -> None:
        require = _truthy("RESNET_KERNELS_REQUIRE_CUDA")
        if _truthy("RESNET_KERNELS_SKIP_CUDA"):
            if require:
                raise RuntimeError("RESNET_KERNELS_SKIP_CUDA=1 contradicts RESNET_KERNELS_REQUIRE_CUDA=1")
            _say("RESNET_KERNELS_SKIP_CUDA=1: NOT building the CUDA backend (resnet_kernels._C).")
            return
        nvcc = find_nvcc()
        if nvcc is None:
            msg = ("no CUDA compiler (nvcc) found in CUDA_HOME, CUDA_PATH, PATH or /usr/local/cuda: "
                   "installing WITHOUT the CUDA backend (resnet_kernels._C). The triton and torch "
                   "backends still work.")
            if require:
                raise RuntimeError("RESNET_KERNELS_REQUIRE_CUDA=1 but " + msg)
            _say(msg)
            return
        try:
            try:
                self._build_with_cmake(ext, nvcc)
            except Exception as exc:  # noqa: BLE001
                if require or not self._sm90_on:
                    raise
                # the CUTLASS translation unit (e.g. other CUTLASS headers than the pinned ones) must
                # not cost the rest of _C: build again without it, and say so
                _say(f"building with the sm_90a (CUTLASS) kernels FAILED ({exc}); building resnet_kernels._C "
                     "again without them (RESNET_KERNELS_SKIP_SM90=1 skips this attempt).", tty=True)
                os.environ["RESNET_KERNELS_SKIP_SM90"] = "1"
                try:
                    self._build_with_cmake(ext, nvcc)
                finally:
                    os.environ.pop("RESNET_KERNELS_SKIP_SM90", None)
            self._skipped.discard(ext.name)
        except Exception as exc:  # noqa: BLE001 - reported below, never swallowed silently
            if require:
                raise
            _say(f"building the CUDA backend FAILED ({exc}); installing without resnet_kernels._C. "
                 "Set RESNET_KERNELS_REQUIRE_CUDA=1 to make this an error.")

    def _build_with_cmake(self, ext: CMakeExtension, nvcc: str) -> None:
        supported = nvcc_supported_archs(nvcc)
        wanted = requested_archs()
        archs = [a for a in wanted if a in supported]
        dropped = [a for a in wanted if a not in supported]
        if dropped:
            _say(f"nvcc at {nvcc} cannot target sm_{', sm_'.join(map(str, dropped))}; dropping them.")
        if not archs:
            raise RuntimeError(f"none of the requested CUDA architectures {wanted} is supported by {nvcc} "
                               f"(it supports {sorted(supported)})")
        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        # A cache from an earlier build (another compiler, another isolated-build pybind11 path)
        # makes CMake fail or silently reuse stale settings: always configure afresh.
        (build_temp / "CMakeCache.txt").unlink(missing_ok=True)
        import pybind11

        cfg = "Release"
        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(str(a) for a in archs)}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        ]
        if shutil.which("ninja"):
            cmake_args.append("-GNinja")
        else:
            try:
                import ninja  # noqa: F401

                cmake_args += ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={Path(ninja.BIN_DIR) / 'ninja'}"]
            except ImportError:
                pass
        sm90_args, sm90_msg = sm90_config(nvcc, archs)
        self._sm90_on = "-DRK_SM90A=ON" in sm90_args
        cmake_args += sm90_args
        _say(sm90_msg, tty=True)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        srcs = [p.name for ext_ in ("*.cu", "*.cpp") for p in sorted((ROOT / "csrc").glob(ext_))]
        if "-DRK_SM90A=ON" in sm90_args:
            srcs.append("sm90/conv2d_sm90.cu")
            srcs.append("sm90/conv2d_sm90_bwd.cu")
        _say(f"compiling the CUDA backend resnet_kernels._C ({len(srcs)} sources: {', '.join(srcs)}) with {nvcc} "
             f"for sm_{', sm_'.join(map(str, archs))}, MAX_JOBS={jobs}. This takes {BUILD_MINUTES_2_CORES} minutes on "
             f"2 CPU cores (less with more cores and fewer architectures: RESNET_KERNELS_CUDA_ARCHS); "
             f"RESNET_KERNELS_SKIP_CUDA=1 skips it (triton and torch backends only).", tty=True)
        cmake = _cmake_binary()
        t0 = time.monotonic()
        subprocess.run([cmake, ext.sourcedir, *cmake_args], cwd=build_temp, check=True)
        _build_with_progress([cmake, "--build", ".", "--config", cfg, "-j", jobs], build_temp)
        mins, secs = divmod(int(time.monotonic() - t0), 60)
        _say(f"built resnet_kernels._C in {mins} min {secs} s", tty=True)


setup(
    packages=[
        "resnet_kernels",
        "resnet_kernels.backends",
        "resnet_kernels.ops",
        "resnet_kernels.nn",
        "resnet_kernels.models",
        "resnet_kernels.triton_ops",
    ],
    # triton_ops/ lives at the top of the repository (one file per fused op) and is installed
    # inside the package, so importing it never shadows or pollutes a top-level name.
    package_dir={"resnet_kernels.triton_ops": "triton_ops"},
    # RESNET_KERNELS_SKIP_CUDA=1: no extension is declared at all (the build step would skip it).
    ext_modules=[] if _truthy("RESNET_KERNELS_SKIP_CUDA") and not _truthy("RESNET_KERNELS_REQUIRE_CUDA")
    else [CMakeExtension("resnet_kernels._C", ROOT)],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
