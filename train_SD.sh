#!/usr/bin/env bash
# Full UNet fine-tuning of Stable Diffusion with EMA on LesionGen captions (the original train_SD.sh defaults).
# Every setting is an overridable environment variable; extra arguments are passed through and win:
#   MODEL_NAME=models/tiny-sd TRAIN_DATA_DIR=data/captions/train ./train_SD.sh --max_train_steps 100
# Hardware (GPUs, DeepSpeed, FSDP, CPU) is chosen by ACCELERATE_CONFIG, one of the files in external/.
set -euo pipefail
# Relative paths in variables and arguments are taken from the caller's directory, as users expect.
HERE="$(cd "$(dirname "$0")" && pwd)"
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"

MODEL_NAME="${MODEL_NAME:-stable-diffusion-v1-5/stable-diffusion-v1-5}"
TRAIN_DATA_DIR="${TRAIN_DATA_DIR:-data/captions/train}"
OUTPUT_DIR="${OUTPUT_DIR:-outputs/lesiongen-sd}"
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-$HERE/external/single_gpu.yaml}"
RESOLUTION="${RESOLUTION:-256}"
TRAIN_BATCH_SIZE="${TRAIN_BATCH_SIZE:-1}"
GRADIENT_ACCUMULATION_STEPS="${GRADIENT_ACCUMULATION_STEPS:-4}"
# Unset: the run's own default, 15000 steps (the original's), unless NUM_TRAIN_EPOCHS or --num_train_epochs sizes it.
MAX_TRAIN_STEPS="${MAX_TRAIN_STEPS:-}"
NUM_TRAIN_EPOCHS="${NUM_TRAIN_EPOCHS:-}"
LEARNING_RATE="${LEARNING_RATE:-1e-5}"
LR_SCHEDULER="${LR_SCHEDULER:-constant}"
LR_WARMUP_STEPS="${LR_WARMUP_STEPS:-0}"
MAX_GRAD_NORM="${MAX_GRAD_NORM:-1}"
MIXED_PRECISION="${MIXED_PRECISION:-fp16}"
CHECKPOINTING_STEPS="${CHECKPOINTING_STEPS:-7500}"
VALIDATION_STEPS="${VALIDATION_STEPS:-500}"
SEED="${SEED:-42}"
ACCELERATE="${ACCELERATE:-accelerate}"
# Extra `accelerate launch` options, e.g. ACCELERATE_LAUNCH_ARGS="--main_process_port 29600 --num_processes 2".
ACCELERATE_LAUNCH_ARGS="${ACCELERATE_LAUNCH_ARGS:-}"
if [ "$ACCELERATE" = accelerate ] && [ -x "$HERE/.venv/bin/accelerate" ]; then ACCELERATE="$HERE/.venv/bin/accelerate"; fi

# accelerate launch turns any failed run into exit code 1 and its own traceback (--quiet drops that traceback for a
# single process); the run's own code (2: bad input, already said in one line) comes back through this file.
LESIONGEN_EXIT_STATUS_FILE="$(mktemp)"
export LESIONGEN_EXIT_STATUS_FILE
trap 'rm -f "$LESIONGEN_EXIT_STATUS_FILE"' EXIT
status=0
# shellcheck disable=SC2086  # ACCELERATE_LAUNCH_ARGS is split into words on purpose
"$ACCELERATE" launch --quiet --config_file "$ACCELERATE_CONFIG" $ACCELERATE_LAUNCH_ARGS -m lesiongen.diffusion.train \
  --mode full --use_ema \
  --pretrained_model_name_or_path "$MODEL_NAME" \
  --train_data_dir "$TRAIN_DATA_DIR" \
  --output_dir "$OUTPUT_DIR" \
  --resolution "$RESOLUTION" --center_crop --random_flip \
  --train_batch_size "$TRAIN_BATCH_SIZE" \
  --gradient_accumulation_steps "$GRADIENT_ACCUMULATION_STEPS" \
  --gradient_checkpointing \
  ${MAX_TRAIN_STEPS:+--max_train_steps "$MAX_TRAIN_STEPS"} \
  ${NUM_TRAIN_EPOCHS:+--num_train_epochs "$NUM_TRAIN_EPOCHS"} \
  --learning_rate "$LEARNING_RATE" \
  --lr_scheduler "$LR_SCHEDULER" --lr_warmup_steps "$LR_WARMUP_STEPS" \
  --max_grad_norm "$MAX_GRAD_NORM" \
  --mixed_precision "$MIXED_PRECISION" \
  --checkpointing_steps "$CHECKPOINTING_STEPS" \
  --validation_steps "$VALIDATION_STEPS" \
  --seed "$SEED" \
  "$@" || status=$?
if [ "$status" -ne 0 ] && [ -s "$LESIONGEN_EXIT_STATUS_FILE" ]; then status="$(cat "$LESIONGEN_EXIT_STATUS_FILE")"; fi
exit "$status"
