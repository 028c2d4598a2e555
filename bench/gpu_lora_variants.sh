#!/usr/bin/env bash
# The LoRA-variant benches on a CUDA GPU: mixed-adapter batches (bench/mixed_batch.py) and the DoRA training step
# (bench/dora_step.py), deltatune vs peft. Not run in CI; needs a CUDA build of torch. JSON goes to $RESULTS
# (default bench/results/). Measured once on an H200: see bench/README.md.
#
#   bench/gpu_lora_variants.sh
#   PYTHON=python3 RESULTS=/some/dir bench/gpu_lora_variants.sh
#   BENCHES=dora bench/gpu_lora_variants.sh          # one of them (mixed, dora)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
RESULTS=${RESULTS:-bench/results}
BENCHES=${BENCHES-mixed dora}
[ -n "${BENCHES// }" ] || { echo "BENCHES is empty: name mixed and/or dora" >&2; exit 2; }
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
mkdir -p "$RESULTS"

"$PYTHON" -c "import sys, torch; torch.cuda.is_available() or sys.exit('no CUDA device visible to torch ' + torch.__version__)"
for bench in $BENCHES; do
    case $bench in
        mixed) "$PYTHON" bench/mixed_batch.py --device cuda --batch 32 --seq 256 --steps 30 --warmup 5 \
                   --json "$RESULTS/mixed_batch-gpu.json" ;;
        dora) "$PYTHON" bench/dora_step.py --device cuda --batch 16 --seq 512 --accum 4 --steps 40 --warmup 5 \
                  --json "$RESULTS/dora_step-gpu.json" ;;
        *) echo "unknown bench '$bench' in BENCHES (mixed, dora)" >&2; exit 2 ;;
    esac
done
