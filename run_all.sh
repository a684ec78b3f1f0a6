#!/usr/bin/env bash
# RealAlign, end to end, on one multi-GPU node:
#   1. curate   real photos -> (real, inpainted fake) pairs          curate.py
#   2. stage1   Diffusion-DRO on the real photos                     train_dro.py
#   3. stage2   Diffusion-DPO on the pairs, from the Stage-1 LoRA    train_dpo.py
#   4. eval     paper Table 1, one row per method, beside the paper's numbers   evaluate.py
#   5. panel    the qualitative panel of paper Fig. 6 / Fig. 7, every row            evaluate.py
#
# Table 1's rows (paper Table 1; the Stage-1-only row is the ablation):
#   SD-1.5 on Pick-a-Pic v2:   base, diffusion_dpo (released UNet), stage1, realalign
#   SD-3.5-M on DrawBench:     base, flow_grpo (released LoRA), stage1, realalign
#   COMPLEMENTARITY=1 adds "<baseline> + RealAlign" (diffusion_dpo_realalign / flow_grpo_realalign): both
#                   stages trained again on top of the baseline network or LoRA (paper Fig. 5), in
#                   OUTPUT_DIR/complementarity/; opt-in because it doubles the training.
#   RELEASED=1      adds realalign_released: the authors' released RealAlign LoRA, to tell a training
#                   problem from an evaluation problem.
#
#   bash run_all.sh                      the paper's SD-1.5 run (GPUs, network)
#   BACKBONE=sd35m bash run_all.sh       the SD-3.5-M run (needs HF_TOKEN: gated model)
#   SMOKE=1 bash run_all.sh              the same steps on tiny offline models (CPU, about 2 min)
#   SMOKE=1 BACKBONE=sd35m COMPLEMENTARITY=1 RELEASED=1 bash run_all.sh    every row, offline
#   DRY_RUN=1 bash run_all.sh            print every command (launch lines included) instead of running it
#   NUM_MACHINES=2 MACHINE_RANK=0 MAIN_PROCESS_IP=10.0.0.1 bash run_all.sh   on node 0, and MACHINE_RANK=1 on node 1
#   SMOKE=1 REAL_IMAGES=my_photos bash run_all.sh   the smoke run on your own captioned photos: curated at
#                                        SMOKE_PHOTO_RESOLUTION=128 px (masks and fakes you can see in
#                                        OUTPUT_DIR/pairs-<mask>-128px/preview.png; training stays at 32 px)
#   RUN_LIKE_AUTHORS=1 BACKBONE=sd35m bash run_all.sh   Stage 1 as the authors' public SD-3.5-M trainer runs it
#                                        (README "Differences from the public code"), in OUTPUT_DIR outputs/sd35m-authors
#
# A rerun resumes: finished steps are skipped, an interrupted one continues.
# Every setting below is an environment variable; the defaults are the paper's.
set -euo pipefail
cd "$(dirname "$0")"

SMOKE=${SMOKE:-0}                              # 1 = tiny offline models and procedural images (or REAL_IMAGES), on CPU
BACKBONE=${BACKBONE:-sd15}                     # sd15 (Stable Diffusion 1.5) or sd35m (SD-3.5-Medium)
[ "$BACKBONE" = sd15 ] || [ "$BACKBONE" = sd35m ] || { echo "BACKBONE must be sd15 or sd35m" >&2; exit 1; }
# 1 = every stage with the authors' choices where they differ from ours: on SD-3.5-M, Stage 1 samples the
# policy image to its end and shares the real side's noise (--sd3_policy_point endpoint) and its policy
# target is the learner's own prediction, which switches the policy term off (--policy_target learner,
# sampled with the learner: --snapshot_every 1). Curation needs no flag: the authors' non-photo question
# and fp32 inpainting are curate.py's defaults; on SD-1.5 every default already is the authors' choice.
RUN_LIKE_AUTHORS=${RUN_LIKE_AUTHORS:-0}
[ "$RUN_LIKE_AUTHORS" = 0 ] || [ "$RUN_LIKE_AUTHORS" = 1 ] || { echo "RUN_LIKE_AUTHORS must be 0 or 1" >&2; exit 1; }

# The paper's values per backbone (README "Method"), and the smoke run's (seconds on a CPU).
# The baseline row is a released model: SD-1.5 Diffusion-DPO's UNet (a network: the complementarity
# stages start from it with --init_unet), SD-3.5-M Flow-GRPO's LoRA (continued with --init_lora).
if [ "$BACKBONE" = sd35m ]; then
  d_model=stabilityai/stable-diffusion-3.5-medium; d_ckpt1=3200; d_ckpt2=450; d_prompts=drawbench; d_batch=1
  baseline_name=flow_grpo; d_baseline=jieliu/SD3.5M-FlowGRPO-PickScore; baseline_init=--init_lora
  d_released=Xixixixihahahaha/RealAlign-SD-3.5-M; d_panel=figure7
else
  d_model=stable-diffusion-v1-5/stable-diffusion-v1-5; d_ckpt1=1600; d_ckpt2=800; d_prompts=pickapic_v2; d_batch=4
  baseline_name=diffusion_dpo; d_baseline=mhdang/dpo-sd1.5-text2image-v1; baseline_init=--init_unet
  d_released=Xixixixihahahaha/RealAlign-SD-1.5; d_panel=figure6
fi
d_steps1=3200; d_steps2=1000; d_every=50; d_out=outputs/$BACKBONE; d_seeds="42 123 456 789 1000"
d_metrics=pickscore,imagereward,unifiedreward,hpsv3,deqa,aesthetic,laplacian,sgp
if [ "$SMOKE" = 1 ]; then
  d_out=outputs/smoke; [ "$BACKBONE" = sd35m ] && d_out=outputs/smoke-sd35m
  d_steps1=4; d_steps2=4; d_ckpt1=4; d_ckpt2=4; d_every=4; d_batch=2; d_seeds="42 123"
  d_metrics=pickscore,sgp,laplacian,clip
fi
STAGE1_AUTHORS=()  # the Stage-1 flags of RUN_LIKE_AUTHORS=1 (both Stage-1 runs: ours and the complementarity one)
if [ "$RUN_LIKE_AUTHORS" = 1 ] && [ "$BACKBONE" = sd35m ]; then
  d_out=$d_out-authors
  STAGE1_AUTHORS=(--sd3_policy_point endpoint --policy_target learner --snapshot_every 1)
fi

OUTPUT_DIR=${OUTPUT_DIR:-$d_out}               # everything is written under here
[ "$SMOKE" = 1 ] && d_model=$OUTPUT_DIR/tiny-models/tiny-$([ "$BACKBONE" = sd35m ] && echo sd3 || echo sd15)
if [ "$SMOKE" = 1 ]; then  # offline stand-ins for the released weights (python tests/tiny_models.py tiny-released)
  if [ "$BACKBONE" = sd35m ]; then
    d_baseline=$OUTPUT_DIR/tiny-models/released/flowgrpo-lora-sd3; d_released=$OUTPUT_DIR/tiny-models/released/realalign-lora-sd3
  else
    d_baseline=$OUTPUT_DIR/tiny-models/released/dpo-unet-sd15; d_released=$OUTPUT_DIR/tiny-models/released/realalign-lora-sd15
  fi
fi
MODEL=${MODEL:-$d_model}                       # base pipeline (hub id or folder; SD-3.5-M is gated: set HF_TOKEN)
BASELINE=${BASELINE:-$d_baseline}              # the baseline row: Diffusion-DPO UNet (SD-1.5) / Flow-GRPO LoRA (SD-3.5-M)
COMPLEMENTARITY=${COMPLEMENTARITY:-0}          # 1 = also train both stages on top of BASELINE ("+ RealAlign" row)
RELEASED=${RELEASED:-0}                        # 1 = also evaluate the authors' released RealAlign LoRA
RELEASED_LORA=${RELEASED_LORA:-$d_released}    # that LoRA (hub id or folder)
DATA_DIR=${DATA_DIR:-data}                     # downloads (HPDv3) go here
REAL_IMAGES=${REAL_IMAGES:-hpdv3}              # hpdv3 (downloaded), or your folder / CSV of captioned photos
SMOKE_PHOTO_RESOLUTION=${SMOKE_PHOTO_RESOLUTION:-128}  # SMOKE=1 with REAL_IMAGES: curation's crop size in pixels
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
PANEL_PROMPTS=${PANEL_PROMPTS:-$d_panel}       # qualitative panel prompts: figure6 / figure7 (the paper's) or a file
NUM_MACHINES=${NUM_MACHINES:-1}                # nodes; start this script on each (OUTPUT_DIR on a shared filesystem)
MACHINE_RANK=${MACHINE_RANK:-0}                # this node's rank: 0 .. NUM_MACHINES-1
MAIN_PROCESS_IP=${MAIN_PROCESS_IP:-}           # address of the rank-0 node (needed when NUM_MACHINES > 1)
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}  # a free port on the rank-0 node
CHECKPOINTS_TOTAL_LIMIT=${CHECKPOINTS_TOTAL_LIMIT:-}  # keep only the newest N checkpoints (+ STAGE1_CKPT / STAGE2_CKPT)
HUB_MODEL_ID=${HUB_MODEL_ID:-}                 # set (you/name): upload Stage 2's STAGE2_CKPT checkpoint to this hub repo
DRY_RUN=${DRY_RUN:-0}                          # 1 = print the commands, run nothing, skip the GPU and hub checks

log() { echo "[run_all] $*"; }
die() { echo "[run_all] error: $*" >&2; exit 1; }

# ------------------------------------------------------------------ settings
# Your photos are read now, with curate.py's own reader, before anything is built or downloaded.
if [ "$REAL_IMAGES" != hpdv3 ] && [ "$DRY_RUN" != 1 ]; then
  [ -e "$REAL_IMAGES" ] || die "REAL_IMAGES=$REAL_IMAGES does not exist (give a folder of captioned photos, or a CSV of prompt,image_path)"
  python - "$REAL_IMAGES" "$OUTPUT_DIR" <<'PY' || exit 1
import logging, sys
from accelerate import PartialState
import common, curate
PartialState()  # curate.py's logger needs it; its warnings (a photo without a caption) come again from curate.py
logging.disable(logging.WARNING)
try:
    candidates, counts = curate.list_real_images(sys.argv[1], sys.argv[2])
except common.UserError as err:
    sys.exit(f"[run_all] error: REAL_IMAGES: {str(err).replace('--real_images ', '')}")
print(f"[run_all] REAL_IMAGES: {len(candidates)} captioned photos in {sys.argv[1]} ({counts['input_kind']})")
PY
fi
if [ "$SMOKE" = 1 ]; then
  # Everything offline and on CPU: tiny random-weight models built here, a
  # handful of procedural photos, a few steps of each stage.
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CUDA_VISIBLE_DEVICES=""
  TINY=$OUTPUT_DIR/tiny-models
  LAUNCH=(python)
  # --no-drop_nonphoto: the non-photo filter's VLM (Qwen3-VL-8B) is not available offline.
  # --min_pickscore_gap / --min_colorfulness_gap -1000: both filters off. The tiny random models make them
  # artefacts: the tiny CLIP's scores are noise, and the tiny inpainting model's fakes are colourful noise,
  # so "real more colourful than fake" would drop most ordinary (muted) photos. The real run keeps both.
  SMOKE_REAL=$OUTPUT_DIR/data/images smoke_resolution=32 smoke_saliency=spectral
  if [ "$REAL_IMAGES" != hpdv3 ]; then
    # REAL_IMAGES=my_folder: your own captioned photos instead of the procedural ones, at a size where the
    # mask and the fake show something. The mask is the real run's U^2-Net where rembg and its weights are
    # on disk (rembg keeps u2net.onnx in $U2NET_HOME, default ~/.u2net), else the weight-free spectral one.
    SMOKE_REAL=$REAL_IMAGES smoke_resolution=$SMOKE_PHOTO_RESOLUTION
    if [ -f "${U2NET_HOME:-$HOME/.u2net}/u2net.onnx" ] && python -c "import importlib.util as u; exit(not u.find_spec('rembg'))"
    then smoke_saliency=u2net; log "your photos: masks by U^2-Net (as the real run), at $smoke_resolution px"
    else log "your photos: masks by the spectral saliency (U^2-Net needs rembg and ${U2NET_HOME:-~/.u2net}/u2net.onnx), at $smoke_resolution px"
    fi
    # fakes of another size or mask never share a folder (curate.py refuses to mix them): one per setting
    smoke_pairs_dir=$OUTPUT_DIR/pairs-$smoke_saliency-${smoke_resolution}px
  fi
  CURATE_ARGS=(--real_images "$SMOKE_REAL" --saliency "$smoke_saliency" --resolution "$smoke_resolution"
               --no-drop_nonphoto --inpaint_model "$TINY/tiny-sd15-inpaint" --num_inference_steps 2 --top_k 6
               --min_pickscore_gap -1000 --min_colorfulness_gap -1000
               --pickscore_model "$TINY/tiny-clip" --pickscore_processor "$TINY/tiny-clip")
  [ -n "$MAX_IMAGES" ] && CURATE_ARGS+=(--max_images "$MAX_IMAGES")
  # --ema_every 1: SD-3's EMA updates every 8 steps, which a 4-step run never reaches
  TRAIN_ARGS=(--resolution 32 --effective_batch_size 4 --checkpoint_every "$CHECKPOINT_EVERY" --ema_every 1
              --sample_grid_steps 2)
  STAGE2_EXTRA=(--learning_rate 1e-4 --lr_warmup_steps 0)
  EVAL_ARGS=(--prompts "$OUTPUT_DIR/data/prompts.txt" --resolution 32 --num_inference_steps 2 --batch_size 3
             --pickscore_model "$TINY/tiny-clip" --pickscore_processor "$TINY/tiny-clip" --clip_model "$TINY/tiny-clip"
             --note "Smoke run: tiny random-weight models and a few steps; these numbers mean nothing.")
else
  if [ "$DRY_RUN" = 1 ]; then  # no GPU or hub checks: the commands are only printed
    [ "$NUM_GPUS" -ge 1 ] || { log "dry run: no GPU here, showing NUM_GPUS=1 per node"; NUM_GPUS=1; }
  elif [ "$NUM_GPUS" -lt 1 ]; then
    die "no GPU found (nvidia-smi lists none). The real run needs GPUs (the paper trains on 4-8 x 80 GB);
       try the offline smoke run instead:  SMOKE=1 bash run_all.sh"
  fi
  if [ "$DRY_RUN" != 1 ] && [ "${HF_HUB_OFFLINE:-0}" != 1 ] && ! timeout 20 python -c "import huggingface_hub as h; h.HfApi().model_info('$MODEL')" \
       >/dev/null 2>&1; then
    die "cannot reach the Hugging Face hub for $MODEL (no network, or a gated model without HF_TOKEN).
       To run offline, everything must already be on disk: the models in the Hugging Face cache ($MODEL, the
       inpainting model, PickScore and the metric models), the real photos ($DATA_DIR/hpdv3 or REAL_IMAGES=your
       folder) and the prompt sets (or PROMPTS=a prompt file); then set HF_HUB_OFFLINE=1.
       To try the pipeline offline on tiny models:  SMOKE=1 bash run_all.sh"
  fi
  # accelerate's --num_processes is the total over all nodes
  # (every value accelerate would otherwise guess is given: no "were not specified" notice)
  LAUNCH=(accelerate launch --num_processes "$((NUM_GPUS * NUM_MACHINES))" --mixed_precision bf16
          --num_machines "$NUM_MACHINES" --dynamo_backend no)
  if [ "$NUM_MACHINES" -gt 1 ]; then
    [ -n "$MAIN_PROCESS_IP" ] || die "NUM_MACHINES=$NUM_MACHINES needs MAIN_PROCESS_IP, the address of the rank-0 node"
    LAUNCH+=(--machine_rank "$MACHINE_RANK" --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$MAIN_PROCESS_PORT")
  fi
  REAL_PATH=$REAL_IMAGES; [ "$REAL_IMAGES" = hpdv3 ] && REAL_PATH=$DATA_DIR/hpdv3
  # curate.py's defaults are the paper's data: the non-photo filter (Qwen3-VL-8B-Instruct) on, safety checker off
  CURATE_ARGS=(--real_images "$REAL_PATH" --saliency "$SALIENCY" --top_k "$TOP_K")
  [ -n "$MAX_IMAGES" ] && CURATE_ARGS+=(--max_images "$MAX_IMAGES")
  TRAIN_ARGS=(--checkpoint_every "$CHECKPOINT_EVERY")
  STAGE2_EXTRA=()
  EVAL_ARGS=(--prompts "$PROMPTS")
fi
[ -n "$CHECKPOINTS_TOTAL_LIMIT" ] && TRAIN_ARGS+=(--checkpoints_total_limit "$CHECKPOINTS_TOTAL_LIMIT")
HUB_ARGS=()
if [ -n "$HUB_MODEL_ID" ]; then
  HUB_ARGS=(--push_to_hub --hub_model_id "$HUB_MODEL_ID")
  if [ "$DRY_RUN" != 1 ] && ! timeout 20 python -c "import huggingface_hub as h; h.whoami()" >/dev/null 2>&1; then
    die "HUB_MODEL_ID is set but the hub does not know you (no network, or not logged in: hf auth login)"
  fi
fi
PAIRS_DIR=${smoke_pairs_dir:-$OUTPUT_DIR/pairs}  # curation's folder (SMOKE=1 with REAL_IMAGES: one per size and mask)
PAIRS=$PAIRS_DIR/pairs.csv
[ "$DRY_RUN" = 1 ] || mkdir -p "$OUTPUT_DIR"

# Run one step unless it is done with the same settings and the same inputs;
# stop the whole run at the first failure. OUT is the folder the step writes.
# The marker .done-NAME holds the step's fingerprint (`python common.py
# fingerprint`, ~0.1 s; README "Running reliably"): its settings (the command
# line without --resume, paths left out: moving OUTPUT_DIR or the photos changes
# nothing) and the content of every file or folder it reads (a pairs CSV and its
# images, photo folders, model folders and checkpoints, prompt files; hub
# models by their downloaded revision). A step whose settings changed runs
# again and a trainer resumes from its state (README "Resuming": which settings
# may change; the others are refused with a message). A step whose inputs
# changed runs again on the new ones: a training run starts afresh (the earlier
# one moves to OUT.previous), curate.py and evaluate.py redo what the change
# touches; the steps downstream then see new inputs in turn.
step() {
  local name=$1 out=$2; shift 2
  local marker=$OUTPUT_DIR/.done-$name why rc=0
  why=$(python common.py fingerprint "$marker" "$out" -- "$@") || rc=$?
  if [ $rc = 0 ]; then log "$name: done already, skipped"; return; fi
  [ $rc = 10 ] || [ $rc = 11 ] || die "could not check whether step '$name' is done (exit $rc)"
  if [ "$DRY_RUN" = 1 ]; then log "$name (dry run): $(printf '%q ' "$@")"; return; fi
  [ -n "$why" ] && log "$name: $why"
  if [ $rc = 11 ] && [ -d "$out/state" ]; then  # a training run on other inputs cannot continue
    rm -rf "$out.previous" && mv "$out" "$out.previous"
    log "$name: the earlier run moved to $out.previous; this one starts afresh"
  fi
  [ -f "$out/state/training_state.pt" ] && set -- "$@" --resume  # a trainer continues from its state
  python common.py fingerprint "$marker" "$out" --write started -- "$@"
  log "$name: $*"
  local start=$SECONDS
  "$@" || { rc=$?; [ $rc = 130 ] && die "step '$name' was interrupted; rerun to continue it"
            die "step '$name' failed (exit $rc). Fix the cause and rerun: finished steps are skipped, this one resumes."; }
  python common.py fingerprint "$marker" "$out" --write done -- "$@"
  log "$name: finished in $((SECONDS - start)) s"
}

# ------------------------------------------------------------------ 0. inputs
if [ "$SMOKE" = 1 ]; then
  step tiny-models "$TINY" python tests/tiny_models.py tiny-models "$TINY"
  # also writes data/prompts.txt, the evaluation's prompts (with REAL_IMAGES too)
  step smoke-images "$OUTPUT_DIR/data/images" python tests/tiny_models.py smoke-images "$OUTPUT_DIR/data/images"
  step tiny-released "$TINY/released" python tests/tiny_models.py tiny-released "$TINY"
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
    step download-hpdv3 "$DATA_DIR/hpdv3" download_hpdv3
  fi
fi

# ------------------------------------------------------------------ 1-4
[ "$RUN_LIKE_AUTHORS" = 1 ] && [ "$BACKBONE" = sd15 ] && log "RUN_LIKE_AUTHORS=1: on SD-1.5 every default already is the authors' choice"
step curate "$PAIRS_DIR" "${LAUNCH[@]}" curate.py --output_dir "$PAIRS_DIR" "${CURATE_ARGS[@]}"
step stage1 "$OUTPUT_DIR/stage1" "${LAUNCH[@]}" train_dro.py --pretrained_model "$MODEL" --pairs "$PAIRS" \
  --output_dir "$OUTPUT_DIR/stage1" --max_train_steps "$STAGE1_STEPS" --train_batch_size "$STAGE1_BATCH" \
  "${TRAIN_ARGS[@]}" "${STAGE1_AUTHORS[@]}" --final_checkpoint "$STAGE1_CKPT"
[ "$DRY_RUN" = 1 ] || [ -d "$OUTPUT_DIR/stage1/checkpoint-$STAGE1_CKPT" ] || die "no Stage-1 checkpoint at step $STAGE1_CKPT
       (STAGE1_CKPT must be a multiple of CHECKPOINT_EVERY, at most STAGE1_STEPS)"
step stage2 "$OUTPUT_DIR/stage2" "${LAUNCH[@]}" train_dpo.py --pretrained_model "$MODEL" --pairs "$PAIRS" \
  --init_lora "$OUTPUT_DIR/stage1/checkpoint-$STAGE1_CKPT" --output_dir "$OUTPUT_DIR/stage2" \
  --max_train_steps "$STAGE2_STEPS" --train_batch_size "$STAGE2_BATCH" "${TRAIN_ARGS[@]}" "${STAGE2_EXTRA[@]}" \
  --final_checkpoint "$STAGE2_CKPT" "${HUB_ARGS[@]}"
[ "$DRY_RUN" = 1 ] || [ -d "$OUTPUT_DIR/stage2/checkpoint-$STAGE2_CKPT" ] || die "no Stage-2 checkpoint at step $STAGE2_CKPT"

# Table 1's rows, named as evaluate.py's paper table names them (base first: the gains are over it)
METHODS=(--method base= --method "$baseline_name=$BASELINE"
         --method "stage1=$OUTPUT_DIR/stage1/checkpoint-$STAGE1_CKPT"
         --method "realalign=$OUTPUT_DIR/stage2/checkpoint-$STAGE2_CKPT")
EVAL_STEP=eval
if [ "$COMPLEMENTARITY" = 1 ]; then
  # "<baseline> + RealAlign" (paper Fig. 5): the same two stages, both on top of the baseline. SD-1.5:
  # every stage runs on the Diffusion-DPO UNet (--init_unet), and the row stacks the final LoRA on it.
  # SD-3.5-M: Stage 1 continues the Flow-GRPO LoRA (--init_lora; it is also the reference), Stage 2
  # continues Stage 1's, so the final LoRA holds both.
  C=$OUTPUT_DIR/complementarity
  C_NET=(); [ "$baseline_init" = --init_unet ] && C_NET=(--init_unet "$BASELINE")
  C_INIT1=(); [ "$baseline_init" = --init_lora ] && C_INIT1=(--init_lora "$BASELINE")
  step complementarity-stage1 "$C/stage1" "${LAUNCH[@]}" train_dro.py --pretrained_model "$MODEL" --pairs "$PAIRS" \
    --output_dir "$C/stage1" --max_train_steps "$STAGE1_STEPS" --train_batch_size "$STAGE1_BATCH" \
    "${C_NET[@]}" "${C_INIT1[@]}" "${TRAIN_ARGS[@]}" "${STAGE1_AUTHORS[@]}" --final_checkpoint "$STAGE1_CKPT"
  [ "$DRY_RUN" = 1 ] || [ -d "$C/stage1/checkpoint-$STAGE1_CKPT" ] || die "no complementarity Stage-1 checkpoint at step $STAGE1_CKPT"
  step complementarity-stage2 "$C/stage2" "${LAUNCH[@]}" train_dpo.py --pretrained_model "$MODEL" --pairs "$PAIRS" \
    "${C_NET[@]}" --init_lora "$C/stage1/checkpoint-$STAGE1_CKPT" --output_dir "$C/stage2" \
    --max_train_steps "$STAGE2_STEPS" --train_batch_size "$STAGE2_BATCH" "${TRAIN_ARGS[@]}" "${STAGE2_EXTRA[@]}" \
    --final_checkpoint "$STAGE2_CKPT"
  [ "$DRY_RUN" = 1 ] || [ -d "$C/stage2/checkpoint-$STAGE2_CKPT" ] || die "no complementarity Stage-2 checkpoint at step $STAGE2_CKPT"
  if [ "$baseline_init" = --init_unet ]; then
    METHODS+=(--method "${baseline_name}_realalign=$BASELINE+$C/stage2/checkpoint-$STAGE2_CKPT")
  else
    METHODS+=(--method "${baseline_name}_realalign=$C/stage2/checkpoint-$STAGE2_CKPT")
  fi
  EVAL_STEP+=-complementarity
fi
if [ "$RELEASED" = 1 ]; then
  METHODS+=(--method "realalign_released=$RELEASED_LORA")
  EVAL_STEP+=-released
fi
# evaluate.py resumes per method: a later run with more rows only adds what is new
# shellcheck disable=SC2086
step "$EVAL_STEP" "$OUTPUT_DIR/eval" "${LAUNCH[@]}" evaluate.py --pretrained_model "$MODEL" --output_dir "$OUTPUT_DIR/eval" \
  "${METHODS[@]}" --metrics "$METRICS" --seeds $SEEDS "${EVAL_ARGS[@]}"

# ------------------------------------------------------------------ 5. panel
# One column per Table-1 row, one row per prompt (paper Fig. 6 on SD-1.5, Fig. 7 on SD-3.5-M: the
# prompts of the figure's caption, evaluate.py --prompts figure6 / figure7), first seed only.
# shellcheck disable=SC2086
step "panel${EVAL_STEP#eval}" "$OUTPUT_DIR/panel" "${LAUNCH[@]}" evaluate.py --pretrained_model "$MODEL" \
  --output_dir "$OUTPUT_DIR/panel" "${METHODS[@]}" \
  "${EVAL_ARGS[@]}" --prompts "$PANEL_PROMPTS" --seeds ${SEEDS%% *} --grid_prompts 1000 \
  --metrics laplacian  # the panel needs no score: laplacian is the one metric that loads no model

[ "$DRY_RUN" = 1 ] && { log "dry run: nothing was run"; exit 0; }
# Table 1, once, at the very end (the evaluation steps only log where they wrote it)
echo; cat "$OUTPUT_DIR/eval/results.md"; echo
log "all steps done. Table 1 (above): $OUTPUT_DIR/eval/results.md"
[ -f "$PAIRS_DIR/summary.json" ] && log "curation: $PAIRS_DIR/preview.png; $(python -c \
  'import json, sys; print(json.load(open(sys.argv[1])).get("summary_line", ""))' "$PAIRS_DIR/summary.json")"
[ -f "$OUTPUT_DIR/panel/grid.png" ] && log "qualitative panel: $OUTPUT_DIR/panel/grid.png"
exit 0
