#!/usr/bin/env bash
# Stage the pinned CUTLASS headers into .cutlass/ (git-ignored) for a build on a machine without
# network access (the GPU check: carry ".cutlass" to the device machine; benchmarks/gpu_check.sh
# then points RESNET_KERNELS_CUTLASS_DIR at it). Uses RESNET_KERNELS_CUTLASS_DIR when set, else
# installs requirements-cutlass.txt (headers only, --no-deps) into a temporary folder.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
src=${RESNET_KERNELS_CUTLASS_DIR:-}
if [[ -z "$src" ]]; then
  tmp=$(mktemp -d)
  python3 -m pip install -q --no-deps --target "$tmp" -r "$root/requirements-cutlass.txt"
  src="$tmp/cutlass_library/source"
fi
[[ -f "$src/include/cutlass/cutlass.h" ]] || { echo "no include/cutlass/cutlass.h under $src" >&2; exit 1; }
rm -rf "$root/.cutlass"
mkdir -p "$root/.cutlass/tools/util"
cp -r "$src/include" "$root/.cutlass/include"
cp -r "$src/tools/util/include" "$root/.cutlass/tools/util/include"
du -sh "$root/.cutlass"
