"""Mixed-adapter batch benchmark (forward, adapter_names): deltatune vs peft, on CPU (or --device cuda).

Model: common.tiny_llama (hidden 512, intermediate 1376, 4 layers, vocab 8000), float32, random weights, eval
mode, no_grad. Eight LoRA adapters (r=16, lora_alpha=32, all-linear) with the same random values in both
libraries. One batch of --batch rows x --seq tokens; row i uses adapter i % k for k = 1, 4 and 8 distinct
adapters. Rows:
  base        the bare model (disable_adapter): what any adapter adds its cost to
  single      the plain single-adapter forward (set_adapter, no adapter_names): the throughput to match
  dt-k        deltatune, adapter_names with k distinct adapters (gathered factors, two batched matmuls)
  peft-k      peft, adapter_names with k distinct adapters (one sub-batch per adapter)
Time: common.time_interleaved (every configuration once per round, rotating order, warm-up dropped); tokens/s
from the median wall time; ratios against `single` and against peft with the same k (per-round paired), and
"overhead": the adapters' own time (median wall minus base's), peft's over deltatune's. On this shape the base
model's matmuls dominate a forward, so whole-forward ratios between the libraries stay near 1 whatever the
adapter path costs; the overhead ratio is where a per-adapter loop shows.

    .venv/bin/python bench/mixed_batch.py [--batch 32 --seq 64 --steps 5 --warmup 2 --threads 2 --json]
    python bench/mixed_batch.py --device cuda --batch 32 --seq 256 --steps 20 --warmup 5   # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import warnings
import zlib

import common
import torch

warnings.filterwarnings("ignore", category=FutureWarning)

ADAPTERS = [f"a{i}" for i in range(8)]
KS = (1, 4, 8)


def build(lib):
    model = None
    for name in ADAPTERS:
        config = lib.LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules="all-linear")
        if model is None:
            model = lib.get_peft_model(common.tiny_llama(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        state = lib.get_peft_model_state_dict(model, adapter_name=name)
        seeds = {key: zlib.crc32(f"{name}{key}".encode()) for key in state}
        values = {key: torch.randn(t.shape, generator=torch.Generator().manual_seed(seeds[key])) * 0.02
                  for key, t in state.items()}
        lib.set_peft_model_state_dict(model, values, adapter_name=name)
    model.set_adapter(ADAPTERS[0])
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="e.g. cuda: every step ends with a device synchronize")
    parser.add_argument("--json", nargs="?", const="", default=None, help="write results (default path if empty)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import peft

    import deltatune

    ours, theirs = build(deltatune).to(args.device), build(peft).to(args.device)
    ids = common.batch_inputs(args.batch, args.seq)["input_ids"].to(args.device)
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)

    def run(model, names=None):
        def step():
            with torch.no_grad():
                logits = model(input_ids=ids, **({} if names is None else {"adapter_names": names})).logits
            sync()
            return logits
        return step

    def bare():
        with ours.disable_adapter():
            return run(ours)()

    steps = {"base": bare, "single": run(ours)}
    for k in KS:
        rows = [ADAPTERS[i % k] for i in range(args.batch)]
        steps[f"dt-{k}"], steps[f"peft-{k}"] = run(ours, rows), run(theirs, rows)
        torch.testing.assert_close(steps[f"dt-{k}"](), steps[f"peft-{k}"](), atol=1e-4, rtol=1e-4)
    times = common.time_interleaved(steps, args.warmup, args.steps)["wall"]
    tokens = args.batch * args.seq
    tps = {key: tokens / statistics.median(values) for key, values in times.items()}
    print(f"batch {args.batch} x seq {args.seq}, {args.device}, threads {args.threads}, {args.steps} timed rounds")
    base = statistics.median(times["base"])
    print(f"{'config':<8} {'tokens/s':>10} {'vs single':>10} {'vs peft':>8} {'overhead ms':>12} {'peft/ours':>10}")
    results = {}
    for key, value in tps.items():
        vs_peft = overhead_ratio = ""
        overhead = (statistics.median(times[key]) - base) * 1e3
        if key.startswith("dt-"):
            peft_key = "peft-" + key[3:]
            vs_peft = f"{common.paired_ratio(times[peft_key], times[key]):.2f}x"
            peft_overhead = statistics.median(times[peft_key]) - base
            overhead_ratio = f"{peft_overhead * 1e3 / overhead:.2f}x" if overhead > 0 else "n/a"
        print(f"{key:<8} {value:>10.0f} {value / tps['single']:>9.2f}x {vs_peft:>8} {overhead:>12.1f} "
              f"{overhead_ratio:>10}")
        results[key] = {"tokens_per_s": value, "vs_single": value / tps["single"], "wall": times[key]}
    if args.json is not None:
        path = common.write_json(args.json or common.default_json_path("mixed_batch"), {"args": vars(args),
                                                                                       "results": results})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
