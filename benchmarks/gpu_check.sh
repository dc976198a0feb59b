#!/usr/bin/env bash
# The GPU check in one command: install the carried wheels, then SD-1.x-size LoRA training (cached and
# uncached, batch 1 x 4 and the automatic micro-batch) and generation (batch 1 and 16) at 512 px in bf16,
# printing steps/s, images/s, peak memory and achieved TFLOP/s against the GPU's bf16 peak. Measured
# budget: under 8 minutes on one GPU with only PyTorch preinstalled (nothing is downloaded).
#
# Prepare the wheels on a machine with internet, for the GPU machine's Python and platform
# (the torchvision pin must match the installed torch; check with `python -c "import torch; print(torch.__version__)"`):
#   pip download -d wheels --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64 \
#       -r benchmarks/gpu_check_requirements.txt "torchvision==<the matching version>"
# Copy the repository and wheels/ there, then:
#   WHEELS=wheels bash benchmarks/gpu_check.sh                      # the GPU check
#   bash benchmarks/gpu_check.sh --size tiny --device cpu           # the CPU dry run (tests run it)
# Arguments go to benchmarks/gpu_check.py (--help lists them; --json FILE keeps the figures).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(dirname "$HERE")"
PYTHON="${PYTHON:-python3}"
WHEELS="${WHEELS:-$REPO/wheels}"

if [ -d "$WHEELS" ]; then
  echo "installing from $WHEELS (no index)"
  "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" -r "$HERE/gpu_check_requirements.txt"
else
  echo "no wheel folder at $WHEELS: using the packages already installed"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PYTHON" "$HERE/gpu_check.py" "$@"
