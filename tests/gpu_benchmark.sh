#!/usr/bin/env bash
# The full-size GPU benchmark (README "Throughput and memory"), ONE script for
# every row: SD-1.5 and SD-3.5-M architectures with random weights, 512 px,
# ours (bf16) against the public code's step structure (tests/benchmark.py),
# 3 warm-up + 10 timed steps per measurement, median / spread / MFU / peak
# memory in the JSON. One GPU, about 9 minutes in all, model building included.
#
#   bash tests/gpu_benchmark.sh [OUT_DIR]      (default: $OUT, else bench-out)
#
# Rehearsal on CPU with the tiny models (same calls, tiny shapes):
#   SD15_ARCH=tiny SD3_ARCH=tiny-sd3 RES=32 EXTRA="--warmup 1 --steps 2" CAP_SCALE=3 BUDGET_S=1800 \
#       bash tests/gpu_benchmark.sh /tmp/bench-rehearsal
#
# Every measurement runs in its own process with its own timeout, and the
# whole script stops starting new ones at BUDGET_S, so one failure or a slow
# compile costs its own slot and the rest still run. In order of importance:
#   1. ours (eager) and the baseline, both stages, both backbones, at the
#      paper's micro-batches (SD-1.5 4, SD-3.5-M 2 here; 1 in the paper's
#      SD-3.5-M config, 2 keeps the comparison with the earlier H200 figures);
#   2. larger micro-batches for 80 GB cards (the effective batch stays 256;
#      only the accumulation changes): SD-1.5 16, SD-3.5-M 8, ours only;
#   3. ours with torch.compile (the CUDA default), Stage 2, as far as the
#      budget goes (compiling is not fast: on this repo's CPU it took > 225 s).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-bench-out}}
BUDGET_S=${BUDGET_S:-500}  # + at most one 30 s backstop: under 9 minutes
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
WORK=${WORK:-/tmp/realalign-bench}
SD15=${SD15_ARCH:-sd15} SD3=${SD3_ARCH:-sd35m} RES=${RES:-512} EXTRA=${EXTRA:-} CAP_SCALE=${CAP_SCALE:-1}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt" || echo "no GPU" | tee "$OUT/gpu.txt"
START=$SECONDS

bench() {  # bench NAME CAP_S ARGS...: one tests/benchmark.py call, if the budget allows
    local name=$1 cap=$(($2 * CAP_SCALE)); shift 2
    local left=$((BUDGET_S - (SECONDS - START)))
    if ((left < 40 + 30)); then echo "skipped $name: budget spent" | tee -a "$OUT/skipped.txt"; return; fi
    ((cap > left)) && cap=$left
    echo "=== $name (cap ${cap} s, $((SECONDS - START)) s elapsed)"
    # the driver stops its own measurements at the cap (killing their processes, so
    # none keeps the GPU busy under the next one); `timeout` is only a backstop
    # shellcheck disable=SC2086  # EXTRA is a list of flags
    timeout $((cap + 30)) python3 tests/benchmark.py --resolution "$RES" --workdir "$WORK" \
        --out "$OUT/$name.json" --timeout "$cap" $EXTRA "$@" 2>&1 | tee "$OUT/$name.log" | grep -v '^{' || true
}

# 1. the honest comparison (ours without compile, so no compile time can stall
#    it); one call per stage, so each has its own cap (the first call of a
#    backbone also builds its random-weight model, ~30 s)
bench sd15-b4-dpo   90 --arch "$SD15" --batch 4 --no-compile --stages dpo
bench sd15-b4-dro  100 --arch "$SD15" --batch 4 --no-compile --stages dro
bench sd35m-b2-dpo 110 --arch "$SD3" --batch 2 --no-compile --stages dpo
bench sd35m-b2-dro 120 --arch "$SD3" --batch 2 --no-compile --stages dro
# 2. micro-batch candidates for 80 GB cards (ours, eager; peak memory tells what fits)
bench sd15-b16  90 --arch "$SD15" --batch 16 --no-compile --sides ours
bench sd35m-b8  90 --arch "$SD3" --batch 8  --no-compile --sides ours
# 3. torch.compile, our CUDA default: the graphs (one per role, shape and grad
#    mode) compile in the 3 warm-up steps, which can take minutes per network
bench sd15-b4-compile-dpo   150 --arch "$SD15" --batch 4 --compile --sides ours --stages dpo
bench sd35m-b2-compile-dpo  150 --arch "$SD3" --batch 2 --compile --sides ours --stages dpo
echo "done in $((SECONDS - START)) s; results in $OUT"
