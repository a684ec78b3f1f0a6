#!/usr/bin/env bash
# RealAlign, end to end, on one multi-GPU node:
#   1. curate   real photos -> (real, inpainted fake) pairs          curate.py
#   2. stage1   Diffusion-DRO on the real photos                     train_dro.py
#   3. stage2   Diffusion-DPO on the pairs, from the Stage-1 LoRA    train_dpo.py
#   4. eval     Table 1 metrics for base / stage 1 / RealAlign       evaluate.py
#
#   bash run_all.sh                      the paper's SD-1.5 run (GPUs, network)
#   BACKBONE=sd35m bash run_all.sh       the SD-3.5-M run (needs HF_TOKEN: gated model)
#   SMOKE=1 bash run_all.sh              the same four steps on tiny offline models (CPU, < 3 min)
#   SMOKE=1 BACKBONE=sd35m bash run_all.sh
#   SMOKE=1 REAL_IMAGES=my_photos bash run_all.sh   the smoke run on your own captioned photos
#
# A rerun resumes: finished steps are skipped, an interrupted one continues.
# Every setting below is an environment variable; the defaults are the paper's.
set -euo pipefail
cd "$(dirname "$0")"

SMOKE=${SMOKE:-0}                              # 1 = tiny offline models and procedural images (or REAL_IMAGES), on CPU
BACKBONE=${BACKBONE:-sd15}                     # sd15 (Stable Diffusion 1.5) or sd35m (SD-3.5-Medium)
[ "$BACKBONE" = sd15 ] || [ "$BACKBONE" = sd35m ] || { echo "BACKBONE must be sd15 or sd35m" >&2; exit 1; }

# The paper's values per backbone (SPEC §3-5), and the smoke run's (seconds on a CPU).
if [ "$BACKBONE" = sd35m ]; then
  d_model=stabilityai/stable-diffusion-3.5-medium; d_ckpt1=3200; d_ckpt2=450; d_prompts=drawbench; d_batch=1
else
  d_model=stable-diffusion-v1-5/stable-diffusion-v1-5; d_ckpt1=1600; d_ckpt2=800; d_prompts=pickapic_v2; d_batch=4
fi
d_steps1=3200; d_steps2=1000; d_every=50; d_out=outputs/$BACKBONE; d_seeds="42 123 456 789 1000"
d_metrics=pickscore,imagereward,unifiedreward,hpsv3,deqa,aesthetic,laplacian,sgp
if [ "$SMOKE" = 1 ]; then
  d_out=outputs/smoke; [ "$BACKBONE" = sd35m ] && d_out=outputs/smoke-sd35m
  d_steps1=4; d_steps2=4; d_ckpt1=4; d_ckpt2=4; d_every=2; d_batch=2; d_seeds="42 123"
  d_metrics=pickscore,sgp,laplacian,clip
fi

OUTPUT_DIR=${OUTPUT_DIR:-$d_out}               # everything is written under here
[ "$SMOKE" = 1 ] && d_model=$OUTPUT_DIR/tiny-models/tiny-$([ "$BACKBONE" = sd35m ] && echo sd3 || echo sd15)
MODEL=${MODEL:-$d_model}                       # base pipeline (hub id or folder; SD-3.5-M is gated: set HF_TOKEN)
DATA_DIR=${DATA_DIR:-data}                     # downloads (HPDv3) go here
REAL_IMAGES=${REAL_IMAGES:-hpdv3}              # hpdv3 (downloaded), or your folder / CSV of captioned photos
MAX_IMAGES=${MAX_IMAGES:-}                     # curate a random subset of this many images (empty = all)
TOP_K=${TOP_K:-512}                            # pairs kept after the filters (paper: 512)
SALIENCY=${SALIENCY:-u2net}                    # u2net (paper; pip install "rembg[gpu]") or spectral
NUM_GPUS=${NUM_GPUS:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c GPU || true)}  # detected
STAGE1_STEPS=${STAGE1_STEPS:-$d_steps1}        # Diffusion-DRO optimizer steps (effective batch 256)
STAGE2_STEPS=${STAGE2_STEPS:-$d_steps2}        # Diffusion-DPO optimizer steps (effective batch 256)
STAGE1_CKPT=${STAGE1_CKPT:-$d_ckpt1}           # Stage-1 checkpoint Stage 2 starts from (SD-1.5: 1600; SD-3.5-M: not stated)
STAGE2_CKPT=${STAGE2_CKPT:-$d_ckpt2}           # Stage-2 checkpoint evaluated in Table 1 (800 / 450)
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-$d_every} # checkpoint + resumable state every N steps
STAGE1_BATCH=${STAGE1_BATCH:-$d_batch}         # per-GPU micro-batch (accumulation fills the batch of 256)
STAGE2_BATCH=${STAGE2_BATCH:-$d_batch}         # per-GPU micro-batch of Stage 2
PROMPTS=${PROMPTS:-$d_prompts}                 # Table 1 prompt set (pickapic_v2 / drawbench / partiprompts / hpdv2 / file)
METRICS=${METRICS:-$d_metrics}                 # Table 1 + Figure 2 metrics
SEEDS=${SEEDS:-$d_seeds}                       # one image per prompt per seed

log() { echo "[run_all] $*"; }
die() { echo "[run_all] error: $*" >&2; exit 1; }

# ------------------------------------------------------------------ settings
if [ "$SMOKE" = 1 ]; then
  # Everything offline and on CPU: tiny random-weight models built here, a
  # handful of procedural photos, a few steps of each stage.
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CUDA_VISIBLE_DEVICES=""
  TINY=$OUTPUT_DIR/tiny-models
  LAUNCH=(python)
  # REAL_IMAGES=my_folder: your own captioned photos instead of the procedural ones
  SMOKE_REAL=$OUTPUT_DIR/data/images; [ "$REAL_IMAGES" != hpdv3 ] && SMOKE_REAL=$REAL_IMAGES
  CURATE_ARGS=(--real_images "$SMOKE_REAL" --saliency spectral --resolution 32
               --inpaint_model "$TINY/tiny-sd15-inpaint" --num_inference_steps 2 --top_k 6
               --min_pickscore_gap -1000 --pickscore_model "$TINY/tiny-clip" --pickscore_processor "$TINY/tiny-clip")
  [ -n "$MAX_IMAGES" ] && CURATE_ARGS+=(--max_images "$MAX_IMAGES")
  # --ema_every 1: SD-3's EMA updates every 8 steps, which a 4-step run never reaches
  TRAIN_ARGS=(--resolution 32 --effective_batch_size 4 --checkpoint_every "$CHECKPOINT_EVERY" --ema_every 1
              --sample_grid_steps 2)
  STAGE2_EXTRA=(--learning_rate 1e-4 --lr_warmup_steps 0)
  EVAL_ARGS=(--prompts "$OUTPUT_DIR/data/prompts.txt" --resolution 32 --num_inference_steps 2 --batch_size 3
             --pickscore_model "$TINY/tiny-clip" --pickscore_processor "$TINY/tiny-clip" --clip_model "$TINY/tiny-clip")
else
  if [ "$NUM_GPUS" -lt 1 ]; then
    die "no GPU found (nvidia-smi lists none). The real run needs GPUs (SPEC: 4-8 x 80 GB);
       try the offline smoke run instead:  SMOKE=1 bash run_all.sh"
  fi
  if [ "${HF_HUB_OFFLINE:-0}" != 1 ] && ! timeout 20 python -c "import huggingface_hub as h; h.HfApi().model_info('$MODEL')" \
       >/dev/null 2>&1; then
    die "cannot reach the Hugging Face hub for $MODEL (no network, or a gated model without HF_TOKEN).
       With the models already cached, set HF_HUB_OFFLINE=1; to try the pipeline offline:  SMOKE=1 bash run_all.sh"
  fi
  LAUNCH=(accelerate launch --num_processes "$NUM_GPUS" --mixed_precision bf16)
  REAL_PATH=$REAL_IMAGES; [ "$REAL_IMAGES" = hpdv3 ] && REAL_PATH=$DATA_DIR/hpdv3
  CURATE_ARGS=(--real_images "$REAL_PATH" --saliency "$SALIENCY" --top_k "$TOP_K")
  [ -n "$MAX_IMAGES" ] && CURATE_ARGS+=(--max_images "$MAX_IMAGES")
  TRAIN_ARGS=(--checkpoint_every "$CHECKPOINT_EVERY")
  STAGE2_EXTRA=()
  EVAL_ARGS=(--prompts "$PROMPTS")
fi
PAIRS=$OUTPUT_DIR/pairs/pairs.csv
mkdir -p "$OUTPUT_DIR"

# Run one step unless it is marked done; stop the whole run at the first failure.
step() {
  local name=$1; shift
  if [ -f "$OUTPUT_DIR/.done-$name" ]; then log "$name: done already, skipped"; return; fi
  log "$name: $*"
  local start=$SECONDS
  "$@" || die "step '$name' failed (exit $?). Fix the cause and rerun: finished steps are skipped, this one resumes."
  touch "$OUTPUT_DIR/.done-$name"
  log "$name: finished in $((SECONDS - start)) s"
}
# Stage runs continue from their saved state when one exists.
resume_flag() { [ -f "$1/state/training_state.pt" ] && echo --resume || true; }

# ------------------------------------------------------------------ 0. inputs
if [ "$SMOKE" = 1 ]; then
  step tiny-models python common.py tiny-models "$TINY"
  # also writes data/prompts.txt, the evaluation's prompts (with REAL_IMAGES too)
  step smoke-images python common.py smoke-images "$OUTPUT_DIR/data/images"
else
  log "disk: models ~10 GB (SD-1.5) / ~30 GB (SD-3.5-M with T5) in the HF cache; HPDv3 archive ~300 GB while"
  log "      extracting (estimate; only its 57,759 real photos are used); curated pairs < 1 GB; checkpoints ~100 MB."
  if [ "$REAL_IMAGES" = hpdv3 ]; then
    download_hpdv3() {
      python - "$DATA_DIR/hpdv3" <<'PY'
import sys
from huggingface_hub import snapshot_download
snapshot_download("MizzenAI/HPDv3", repo_type="dataset", local_dir=sys.argv[1],
                  allow_patterns=["all.json", "images.tar.gz.*"])
PY
      (cd "$DATA_DIR/hpdv3" && cat images.tar.gz.* | tar -xz && rm images.tar.gz.*)
    }
    step download-hpdv3 download_hpdv3
  fi
fi

# ------------------------------------------------------------------ 1-4
step curate "${LAUNCH[@]}" curate.py --output_dir "$OUTPUT_DIR/pairs" "${CURATE_ARGS[@]}"
step stage1 "${LAUNCH[@]}" train_dro.py --pretrained_model "$MODEL" --pairs "$PAIRS" \
  --output_dir "$OUTPUT_DIR/stage1" --max_train_steps "$STAGE1_STEPS" --train_batch_size "$STAGE1_BATCH" \
  "${TRAIN_ARGS[@]}" $(resume_flag "$OUTPUT_DIR/stage1")
[ -d "$OUTPUT_DIR/stage1/checkpoint-$STAGE1_CKPT" ] || die "no Stage-1 checkpoint at step $STAGE1_CKPT
       (STAGE1_CKPT must be a multiple of CHECKPOINT_EVERY, at most STAGE1_STEPS)"
step stage2 "${LAUNCH[@]}" train_dpo.py --pretrained_model "$MODEL" --pairs "$PAIRS" \
  --init_lora "$OUTPUT_DIR/stage1/checkpoint-$STAGE1_CKPT" --output_dir "$OUTPUT_DIR/stage2" \
  --max_train_steps "$STAGE2_STEPS" --train_batch_size "$STAGE2_BATCH" "${TRAIN_ARGS[@]}" "${STAGE2_EXTRA[@]}" \
  $(resume_flag "$OUTPUT_DIR/stage2")
[ -d "$OUTPUT_DIR/stage2/checkpoint-$STAGE2_CKPT" ] || die "no Stage-2 checkpoint at step $STAGE2_CKPT"
# shellcheck disable=SC2086
step eval "${LAUNCH[@]}" evaluate.py --pretrained_model "$MODEL" --output_dir "$OUTPUT_DIR/eval" \
  --method base= --method "stage1=$OUTPUT_DIR/stage1/checkpoint-$STAGE1_CKPT" \
  --method "realalign=$OUTPUT_DIR/stage2/checkpoint-$STAGE2_CKPT" \
  --metrics "$METRICS" --seeds $SEEDS "${EVAL_ARGS[@]}"

log "all steps done. Table 1: $OUTPUT_DIR/eval/results.md"
[ -f "$OUTPUT_DIR/eval/results.md" ] && cat "$OUTPUT_DIR/eval/results.md"
exit 0
