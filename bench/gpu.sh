#!/usr/bin/env bash
# `make bench` on a CUDA GPU, in bfloat16: the cases of bench/run.py with GPU-sized batches (the SmolLM2 course
# recipe at 8 x 512), every timed step ending with a synchronize. Not run in CI. Meant as one prepared script for a
# short session on a lent GPU machine (under 8 minutes); the table goes to $RESULTS/results-gpu.md.
#
#   bench/gpu.sh
#   PYTHON=python3 RESULTS=/some/dir CASES="smollm2-course generate" bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
RESULTS=${RESULTS:-bench/results}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
mkdir -p "$RESULTS"

"$PYTHON" -c "import sys, torch; torch.cuda.is_available() or sys.exit('no CUDA device visible to torch ' + torch.__version__); print(torch.cuda.get_device_name(), 'torch', torch.__version__)"
"$PYTHON" -m deltatune models --prepare smollm2-135m-instruct >/dev/null
# shellcheck disable=SC2086
exec "$PYTHON" bench/run.py --device cuda --dtype bfloat16 --threads 4 --rounds 10 --warmup 3 \
    ${CASES:+--cases $CASES} --markdown "$RESULTS/results-gpu.md"
