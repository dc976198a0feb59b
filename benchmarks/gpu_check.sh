#!/usr/bin/env bash
# The GPU check in one command: install the carried wheels, then SD-1.x-size LoRA training (cached and
# uncached, batch 1 x 4 and the automatic micro-batch) and generation (batch 1 and 16) at 512 px in bf16,
# printing steps/s, images/s, peak memory and achieved TFLOP/s against the GPU's bf16 peak; then the speed
# goals' two ratios on the same model: generate() against the original one-image-per-call loop and, given
# diffusers' script (--reference), LoRA training against it at identical flags. Nothing is downloaded.
# The check part took 133 s on an H200 (2026-11-30); the ratio parts have not yet run on a GPU.
#
# Prepare the wheels where pip can reach an index: the packages of gpu_check_requirements.txt that the GPU
# machine lacks, for its Python (3.12 here) and platform, without their dependencies. For a machine with
# PyTorch's usual stack (numpy, pandas, transformers, accelerate, peft) that is about 10 MB:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
#       -d wheels diffusers datasets dill multiprocess open-clip-torch ftfy wcwidth
# Every wheel in the folder is installed without resolving dependencies, so bring each missing one.
# For the training ratio, bring diffusers' examples/text_to_image/train_text_to_image_lora.py as a file.
# Copy the repository and wheels/ there, then:
#   WHEELS=wheels bash benchmarks/gpu_check.sh                      # the GPU check and the generation ratio
#   WHEELS=wheels bash benchmarks/gpu_check.sh --reference train_text_to_image_lora.py   # and the training ratio
#   bash benchmarks/gpu_check.sh --parts training-ratio generation-ratio --reference ... --torch_compile
#                                                                   # the ratios with compiled runs (minutes more)
#   bash benchmarks/gpu_check.sh --size tiny --device cpu           # the CPU dry run (tests run it)
# Arguments go to benchmarks/gpu_check.py (--help lists them; --json FILE keeps the figures).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(dirname "$HERE")"
PYTHON="${PYTHON:-python3}"
WHEELS="${WHEELS:-$REPO/wheels}"

if [ -d "$WHEELS" ]; then
  echo "installing from $WHEELS (no index)"
  "$PYTHON" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl
else
  echo "no wheel folder at $WHEELS: using the packages already installed"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PYTHON" "$HERE/gpu_check.py" "$@"
