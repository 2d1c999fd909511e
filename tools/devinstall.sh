#!/usr/bin/env bash
# Private install of the working tree for parallel development:
#   tools/devinstall.sh NAME [--no-cuda]
# copies the tree to /tmp/rk_src_NAME (so concurrent builds never share build/), installs it
# into /tmp/rk_site_NAME, and prints the PYTHONPATH to use:
#   PYTHONPATH=/tmp/rk_site_NAME .venv/bin/python -m pytest tests/...   (run from /tmp, not the repo)
set -euo pipefail
name=${1:?usage: tools/devinstall.sh NAME [--no-cuda]}
root=$(cd "$(dirname "$0")/.." && pwd)
src=/tmp/rk_src_$name
site=/tmp/rk_site_$name

rm -rf "$src"; mkdir -p "$src"
tar -C "$root" --exclude=./.venv --exclude=./.git --exclude=./build --exclude="*.egg-info" -cf - . | tar -C "$src" -xf -
rm -rf "$site"
if [[ "${2:-}" == "--no-cuda" ]]; then export RESNET_KERNELS_SKIP_CUDA=1; else export RESNET_KERNELS_REQUIRE_CUDA=1; fi
# The CUTLASS sm_90a kernels need the pinned headers (requirements-cutlass.txt); REQUIRE_CUDA makes
# them mandatory, so a development build without them leaves them out, and says so.
if [[ -z "${RESNET_KERNELS_CUTLASS_DIR:-}" && -z "${RESNET_KERNELS_SKIP_CUDA:-}" ]] &&
   ! "$root/.venv/bin/python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("cutlass_library") is None)' 2>/dev/null; then
  echo "devinstall: no CUTLASS (RESNET_KERNELS_CUTLASS_DIR unset, cutlass_library not installed): building without the sm_90a kernels" >&2
  export RESNET_KERNELS_SKIP_SM90=1
fi
"$root/.venv/bin/pip" install -q --no-build-isolation --no-deps --target "$site" "$src" >"$src.log" 2>&1 || { tail -40 "$src.log"; exit 1; }
echo "PYTHONPATH=$site"
