#!/usr/bin/env bash
# The full-size GPU benchmark (README "Throughput and memory"): SD-1.5 and
# SD-3.5-M architectures with random weights, ours vs the public code's step
# structure. Needs one GPU; writes JSON and logs under ${OUT:-bench-out}.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 170 python3 tests/benchmark.py --arch sd15 --resolution 512 --batch 4 --steps 2 --workdir /tmp/bw \
    --out "$OUT/sd15.json" 2>&1 | tee "$OUT/sd15.log"
timeout 190 python3 tests/benchmark.py --arch sd35m --resolution 512 --batch 2 --steps 2 --workdir /tmp/bw \
    --out "$OUT/sd35m.json" 2>&1 | tee "$OUT/sd35m.log"
