#!/usr/bin/env bash
# The quantized-step table (bench/quantized_step.py) on a CUDA GPU: SmolLM2-135M-Instruct in bfloat16, 8-bit and
# 4-bit NF4 with LoRA, deltatune vs peft, peak CUDA memory and step time. Not run in CI; needs a CUDA build of
# torch and bitsandbytes with its CUDA library (the PyPI wheels carry both). Prints the table and writes JSON
# under bench/results/. Pass extra arguments through, e.g. `bench/gpu_quantized.sh --checkpointing`.
#
#   bench/gpu_quantized.sh                 # model: the embedded SmolLM2 (prepared on first use, ~0.6 GB)
#   MODEL=/path/to/model bench/gpu_quantized.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false

"$PYTHON" - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"no CUDA device visible to torch {torch.__version__}; this script is for a GPU machine")
import bitsandbytes  # noqa: F401  (fails here, clearly, if bitsandbytes or its CUDA library is missing)
from deltatune.quantized.loading import check_quantization_available
for option in ("8bit", "nf4"):
    check_quantization_available(option, "cuda")
print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}")
PY

exec "$PYTHON" bench/quantized_step.py --device cuda:0 --dtype bfloat16 --batch 8 --seq 512 --steps 10 --warmup 3 \
    --threads 4 --model "${MODEL:-smollm2-135m-instruct}" --json "$@"
