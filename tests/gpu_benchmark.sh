#!/usr/bin/env bash
# The GPU benchmark (README "Throughput and memory"): ONE command, under 8
# minutes, that returns what it measured even when it is cut short. The rows
# (tests/benchmark.py plan_rows) run in order of importance: ours compiled and
# the public code's step structure, Stage 2 and Stage 1, SD-1.5 then
# SD-3.5-M (the MFU and 2x targets); then ours eager; then larger
# micro-batches. Each row has its own deadline, the whole run a budget.
#
#   bash tests/gpu_benchmark.sh [OUT_DIR]       (default: $OUT, else bench-out)
#
# From the device tool (nothing can be downloaded there, and diffusers is not
# installed: it travels as a wheel, with peft at the tested version):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 peft==0.21.2     # once, here
#   run(command="bash tests/gpu_benchmark.sh", carry=[".whl"], timeout_s=560)
# Rehearsal on CPU (the same entry point and wheels, the tiny models):
#   PLAN=rehearsal bash tests/gpu_benchmark.sh /tmp/rehearsal
# A later session can take the rows a first one did not reach, e.g.
#   ONLY=sd35m bash tests/gpu_benchmark.sh       (rows whose name contains sd35m)
#
# What comes back: $OUT_DIR/results.json (rewritten after every row, so even
# a killed run returns the rows it finished; "complete" says whether it ended)
# and $OUT_DIR/benchmark.log (everything printed; the table at the end is
# written by the EXIT trap, from results.json). Copy results.json to
# tests/benchmark_results/<device>-<date>.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-bench-out}}
PLAN=${PLAN:-gpu}
ONLY=${ONLY:-}
BUDGET_S=${BUDGET_S:-480}
WORK=${WORK:-/tmp/realalign-bench}
START=$SECONDS
mkdir -p "$OUT" "$WORK"
exec > >(trap '' TERM INT; exec tee -a "$OUT/benchmark.log") 2>&1  # tee outlives a TERM: the trap's lines get logged
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

finish() {
    echo "=== finished after $((SECONDS - START)) s"
    [ -s "$OUT/results.json" ] && python3 tests/benchmark.py --table "$OUT/results.json"
}
trap finish EXIT
trap 'exit 143' TERM INT

echo "=== $(date -u +%FT%TZ) plan $PLAN, budget $BUDGET_S s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
# diffusers (and peft) from the carried wheels, into a fresh folder first on the path
if compgen -G ".whl/*.whl" >/dev/null; then
    SITE=$(mktemp -d /tmp/realalign-site.XXXXXX)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl ||
        { echo "error: could not install the wheels of .whl/"; exit 3; }
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import sys, torch, diffusers, transformers, peft, accelerate
print('python', sys.version.split()[0], '| torch', torch.__version__, '| diffusers', diffusers.__version__,
      diffusers.__file__, '| transformers', transformers.__version__, '| peft', peft.__version__,
      '| accelerate', accelerate.__version__)" || { echo "error: the libraries do not import"; exit 3; }
# the rows get what is left, less 20 s for the trap
python3 tests/benchmark.py --plan "$PLAN" --only "$ONLY" --budget $((BUDGET_S - (SECONDS - START) - 20)) \
    --workdir "$WORK" --out "$OUT/results.json"
