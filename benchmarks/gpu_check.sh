#!/usr/bin/env bash
# One-command check on a machine with an NVIDIA GPU and no network, run from the repo root:
#
#   bash benchmarks/gpu_check.sh
#
# Stages (each under `timeout`; a failed stage does not stop the others; exit status 1 if any
# stage failed or ran out of time):
#   install     RESNET_KERNELS_REQUIRE_CUDA=1 pip install --no-build-isolation --no-index .
#               (RESNET_KERNELS_CUDA_ARCHS defaults to this GPU's SM, to halve the compile time)
#   info        python -m resnet_kernels info
#   check       resnet-kernels check --no-model (parity of every backend, fp32 + bf16)
#   tests       pytest tests -q --maxfail=100 (on pytest-xdist workers; the CPU-only files are left out)
#   tune        resnet-kernels tune --model resnet50 --mode train: every implementation timed and
#               verified per layer shape, the per-layer table printed before the summary
#   bench-ops   the fused residual-epilogue suite, reduced (RK_BENCH_FAST=1)
#   bench-conv  the convolution suite, reduced (RK_BENCH_FAST=1)
#   bench-conv-bwd  the fused convolution backward (conv2d_backward: cuda, triton, aten), reduced
#               (RK_BENCH_FAST=1: 4 ResNet layer shapes at batch 256)
#   model-*     resnet-kernels bench: resnet18 and resnet50, train and infer, short runs (batch 64,
#               10 timed steps; torch.compile only for resnet18 inference unless
#               RK_GPU_CHECK_COMPILE_ALL=1)
#   count-check benchmarks/count_vs_profiler.py: ResNet-18 and -50 training steps (eager, cuda,
#               triton) profiled on the GPU, their kernels against `resnet-kernels count`'s
#               launches (the counted numbers' first check; printed into the log)
# then prints a summary table LAST (ours vs eager vs torch.compile, % of copy bandwidth, stage
# status). Everything shares one time budget (RK_GPU_CHECK_BUDGET seconds, default 470: under
# 8 minutes on an H100); a stage that would start past it is reported as "no-time".
#
# Environment:
#   PYTHON                      interpreter with torch, triton, pytest, pytest-benchmark,
#                               setuptools, pybind11, cmake, ninja (default: python, else python3)
#   OUT                         if set, result files are written to $OUT/gpu_check/ (<= 8 files)
#   RK_GPU_CHECK_BUDGET         total seconds (default 470)
#   RK_GPU_CHECK_SKIP_INSTALL=1 use the package already installed
#   RK_GPU_CHECK_COMPILE_ALL=1  torch.compile baseline for every model run (minutes of compiling:
#                               raise RK_GPU_CHECK_BUDGET too)
#   RK_GPU_CHECK_MODEL_BATCH    batch of the model runs (default 64)
#   RK_GPU_CHECK_ONLY           space-separated stage names to run (the others are "skipped"),
#                               e.g. "info bench-ops bench-conv"
set -o pipefail
set -u

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-$(command -v python || command -v python3)}
BUDGET=${RK_GPU_CHECK_BUDGET:-470}
RESERVE=15  # seconds kept for the summary
T0=$(date +%s)
DEADLINE=$((T0 + BUDGET))
WORK=$(mktemp -d "${TMPDIR:-/tmp}/rk_gpu_check.XXXXXX")
RES=$WORK/results
mkdir -p "$RES"
STAGES=$RES/stages.tsv
LOG=$RES/gpu_check.log
: >"$STAGES"
: >"$LOG"
export ROOT WORK RES PY
# git metadata for the benchmark records (the commands below run outside the repo)
RESNET_KERNELS_COMMIT=${RESNET_KERNELS_COMMIT:-$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)}
export RESNET_KERNELS_COMMIT
# never the Triton interpreter here
unset TRITON_INTERPRET
if [[ -z "${RESNET_KERNELS_CUDA_ARCHS:-}" ]] && command -v nvidia-smi >/dev/null 2>&1; then
  cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
  [[ "$cc" =~ ^[0-9]+$ ]] && export RESNET_KERNELS_CUDA_ARCHS=$cc
fi

# pytest outside the source tree: `python -m pytest` puts the current directory on sys.path, and
# the repo root would shadow the installed package (with its compiled _C) by the sources.
PYTEST="cd \"\$WORK\" && \"\$PY\" -m pytest -c \"\$ROOT/pyproject.toml\" --rootdir \"\$ROOT\" -p no:cacheprovider"
if command -v resnet-kernels >/dev/null 2>&1 && [[ "$(dirname "$(command -v resnet-kernels)")" == "$(dirname "$PY")" ]]; then
  RK="resnet-kernels"
else
  RK="\"\$PY\" -m resnet_kernels"
fi

record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$STAGES"; }

# run_stage NAME CAP_SECONDS 'shell command'
run_stage() {
  local name=$1 cap=$2 cmd=$3
  local now left t rc status start
  if [[ -n "${RK_GPU_CHECK_ONLY:-}" && " $RK_GPU_CHECK_ONLY " != *" $name "* ]]; then
    record "$name" skipped 0 0
    return
  fi
  now=$(date +%s)
  left=$((DEADLINE - now - RESERVE))
  if ((left < 10)); then
    echo "=== [$name] skipped: the ${BUDGET}s budget is spent" | tee -a "$LOG"
    record "$name" no-time 124 0
    return
  fi
  t=$((cap < left ? cap : left))
  echo "=== [$name] (timeout ${t}s): $cmd" | tee -a "$LOG"
  start=$(date +%s.%N)
  timeout -k 10 "$t" bash -c "$cmd" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  record "$name" "$status" "$rc" "$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN{printf "%.1f", e - s}')"
  echo "=== [$name] $status (rc $rc)" | tee -a "$LOG"
}

# The CUTLASS headers of the sm_90a kernels: the GPU image has no network and no nvidia-cutlass, so
# a session stages them into .cutlass/ (tools/stage_cutlass.sh; git-ignored, ~28 MB) and carries
# that folder to the GPU machine. Without them the build leaves the sm_90a kernels out, said here
# (REQUIRE_CUDA would otherwise make a missing CUTLASS a build error).
if [[ -z "${RESNET_KERNELS_CUTLASS_DIR:-}" && -f "$ROOT/.cutlass/include/cutlass/cutlass.h" ]]; then
  export RESNET_KERNELS_CUTLASS_DIR="$ROOT/.cutlass"
fi
if [[ -z "${RESNET_KERNELS_CUTLASS_DIR:-}" ]] && \
    ! "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("cutlass_library") is None)' 2>/dev/null; then
  echo "NOTE: no CUTLASS headers (.cutlass/ not staged and carried): building without the sm_90a 'cutlass' kernels" | tee -a "$LOG"
  export RESNET_KERNELS_SKIP_SM90=1
fi

if [[ "${RK_GPU_CHECK_SKIP_INSTALL:-0}" == 1 ]]; then
  record install skipped 0 0
else
  run_stage install 200 "cd \"\$ROOT\" && RESNET_KERNELS_REQUIRE_CUDA=1 \"\$PY\" -m pip install --no-build-isolation --no-index -q ."
fi
run_stage info 30 "cd \"\$WORK\" && \"\$PY\" -m resnet_kernels info && \"\$PY\" -m resnet_kernels info --json >\"\$RES/info.json\""
run_stage check 90 "cd \"\$WORK\" && $RK check --no-model --json \"\$RES/check.json\""
# The test suite. Left out here (CI runs them, and they do not change with a GPU): the AOT/SASS
# compiles and host-code emulations on the CPU and the CPU-only model/DDP tests. The rest runs on
# pytest-xdist workers where the image has it: the Triton JIT compiles a few hundred kernel
# variants (~0.5-1 s of one CPU core each), far beyond the cap serially. The GPU timing test
# (bandwidth vs a copy, benchmarks/test_bandwidth_floor.py) runs alone afterwards, with the GPU to
# itself. (The marker gpu now selects every GPU-only test, not the timing tests.)
# RK_GPU_CHECK_ALL_TESTS=1 runs everything; RK_GPU_CHECK_TEST_WORKERS sets the worker count.
# --maxfail, not -x: one GPU run is precious, so it should show every failure it can.
TEST_ARGS="-q --maxfail=100 --durations=30"
if [[ "${RK_GPU_CHECK_ALL_TESTS:-0}" != 1 ]]; then
  for f in test_triton_aot.py test_triton_conv_aot.py test_sass.py test_conv_sass.py test_host_runner.py \
           test_bn_add_relu_index.py models/test_resnet.py models/test_ddp.py; do
    TEST_ARGS+=" --ignore=\"\$ROOT/tests/$f\""
  done
fi
if "$PY" -c "import xdist" >/dev/null 2>&1; then
  TESTS_CMD="export OMP_NUM_THREADS=2; \
$PYTEST \"\$ROOT/tests\" $TEST_ARGS -n ${RK_GPU_CHECK_TEST_WORKERS:-12}"
else
  echo "(pytest-xdist is not installed: the tests run serially and may not finish within the cap)" | tee -a "$LOG"
  TESTS_CMD="$PYTEST \"\$ROOT/tests\" $TEST_ARGS"
fi
run_stage tests 150 "$TESTS_CMD"
run_stage bandwidth 30 "$PYTEST \"\$ROOT/benchmarks/test_bandwidth_floor.py\" -q -s"
# the measured 'auto': every ResNet-50 layer shape timed and verified, the per-layer table kept
# (RESNET_KERNELS_CACHE_DIR keeps the cache inside this run's results)
export RESNET_KERNELS_CACHE_DIR="$RES/tune_cache"
run_stage tune 90 "cd \"\$WORK\" && $RK tune --model resnet50 --mode train --batch ${RK_GPU_CHECK_MODEL_BATCH:-64} --quiet >\"\$RES/tune.txt\""
run_stage bench-ops 60 "export RK_BENCH_FAST=1 RK_BENCH_RECORDS=\"\$RES/records_ops.jsonl\"; $PYTEST \"\$ROOT/benchmarks/test_bench_bn_add_relu.py\" -q --benchmark-json=\"\$RES/bench_ops.json\""
run_stage bench-conv 60 "export RK_BENCH_FAST=1 RK_BENCH_RECORDS=\"\$RES/records_conv.jsonl\"; $PYTEST \"\$ROOT/benchmarks/test_bench_conv.py\" -q --benchmark-json=\"\$RES/bench_conv.json\""
# (its records join the summary; no pytest-benchmark JSON of its own: the $OUT file limit)
run_stage bench-conv-bwd 40 "export RK_BENCH_FAST=1 RK_BENCH_RECORDS=\"\$RES/records_conv_bwd.jsonl\"; $PYTEST \"\$ROOT/benchmarks/test_bench_conv_backward.py\" -q"

MB=${RK_GPU_CHECK_MODEL_BATCH:-64}
for model in resnet18 resnet50; do
  for mode in infer train; do
    # torch.compile of a whole model takes tens of seconds to minutes: by default only
    # resnet18 inference gets a compile baseline here (the model suite times all of them)
    # auto (the measured choice) and every backend the registry benchmarks
    ours=$("$PY" -c 'from resnet_kernels import _registry; print(",".join(b.name for b in _registry.backends() if b.benchmark))')
    backends=eager,auto,$ours
    cap=45
    if [[ "$model-$mode" == resnet18-infer || "${RK_GPU_CHECK_COMPILE_ALL:-0}" == 1 ]]; then
      backends=eager,compile,auto,$ours
      cap=85
    fi
    run_stage "model-$model-$mode" $cap "cd \"\$WORK\" && $RK bench --model $model --mode $mode --batch $MB --iters 10 --warmup 3 --backends $backends --quiet --json \"\$RES/model_${model}_${mode}.json\""
  done
done

# the accountant checked: counted launches against the kernels the profiler sees (last: the model
# runs above compiled the Triton kernels it reuses; a diagnostic, printed into the log)
run_stage count-check 60 "cd \"\$WORK\" && \"\$PY\" \"\$ROOT/benchmarks/count_vs_profiler.py\" --batch $MB"

# ---- summary (printed last) -------------------------------------------------------------------
shopt -s nullglob
models=("$RES"/model_*.json)
results=()
# the JSON-lines records (written case by case) survive a stage killed by its timeout, unlike
# the pytest-benchmark JSON written at the end of the session
for f in "$RES/records_ops.jsonl" "$RES/records_conv.jsonl" "$RES/records_conv_bwd.jsonl" "${models[@]}"; do [[ -f $f ]] && results+=("$f"); done
SUMMARY=$RES/summary.txt
timeout 60 "$PY" "$ROOT/benchmarks/summarize.py" summary --stages "$STAGES" --json "$RES/summary.json" \
  "${results[@]}" >"$SUMMARY" 2>&1
summary_rc=$?
if ((${#models[@]})); then  # one file for the model runs (the $OUT file limit)
  "$PY" -c 'import json, sys; json.dump([json.load(open(p)) for p in sys.argv[2:]], open(sys.argv[1], "w"), indent=1)' \
    "$RES/bench_models.json" "${models[@]}" || true
fi
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT/gpu_check"
  for f in info.json check.json tune.txt bench_ops.json bench_conv.json bench_models.json summary.json stages.tsv; do  # + the log: 9
    [[ -f "$RES/$f" ]] && cp "$RES/$f" "$OUT/gpu_check/$f"
  done
  tail -c 2000000 "$LOG" >"$OUT/gpu_check/gpu_check.log"
fi

failed=$(awk -F'\t' '$2 != "ok" && $2 != "skipped"' "$STAGES" | wc -l)
echo
echo "=================================== resnet-kernels GPU check summary ==================================="
[[ -f "$RES/tune.txt" ]] && { echo "-- resnet-kernels tune (ResNet-50 train): the measured choice per layer"; cat "$RES/tune.txt"; echo; }
cat "$SUMMARY"
((summary_rc == 0)) || echo "(the summary generator failed: rc $summary_rc)"
echo "total $(($(date +%s) - T0))s; results in $RES${OUT:+ and $OUT/gpu_check}"
if ((failed > 0 || summary_rc != 0)); then exit 1; fi
exit 0
