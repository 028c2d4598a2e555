"""Methods table: trainable parameters, training-step time and peak memory of every deltatune method, on CPU.

Model: common.tiny_llama (Llama, hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 8000), float32, random
weights, batch 8 x seq 128 (attention_mask of ones, labels = input_ids). Rows:
  frozen    reference: no trainable tensor; forward with labels + backward to inputs_embeds only (about the
            floor of every method below: each has a trainable tensor in the first layer)
  full-ft   reference: every parameter trained
  lora      LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
  ia3       IA3Config() (defaults: k_proj, v_proj, down_proj)
  houlsby   BottleneckConfig(placement="houlsby"), pfeiffer: placement="pfeiffer" (reduction factor 16)
  prompt    PromptTuningConfig(num_virtual_tokens=20): the model sees 148 positions
  ln-tuning LNTuningConfig() (defaults: the RMSNorms)
  bitfit    BitFitConfig(): Llama has no biases, so this row uses the same shape with attention_bias=True and
            mlp_bias=True (marked *); deltatune refuses BitFit on the bias-free model
Step (all but frozen): forward with labels, backward, AdamW step on the trainable parameters.
Trainable share: trainable / all parameters of the model as trained (peft's print_trainable_parameters).
Time: common.time_interleaved, one process holding every model, one step of each per round in rotating order,
warm-up rounds dropped; median wall time, and the median of per-round ratios to the frozen row.
Memory: each configuration in a fresh spawned process, common.measure_memory over 2 steps: peak RSS growth
(VmHWM minus RSS after imports) and the deterministic tensor accounting.

    .venv/bin/python bench/methods_table.py [--steps 8 --warmup 1 --threads 2 --methods lora ia3 --json]
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from collections.abc import Callable
from typing import Any

import common
import torch
from torch import nn

warnings.filterwarnings("ignore", category=FutureWarning)


def _config(name: str, **kwargs: Any) -> Callable[[], Any]:
    def make() -> Any:
        return getattr(__import__("deltatune"), name)(task_type="CAUSAL_LM", **kwargs)

    return make


METHODS: dict[str, Callable[[], Any] | None] = {  # None: a reference row without an adapter
    "frozen": None,
    "full-ft": None,
    "lora": _config("LoraConfig", r=16, lora_alpha=32, target_modules="all-linear"),
    "ia3": _config("IA3Config"),
    "houlsby": _config("BottleneckConfig", placement="houlsby"),
    "pfeiffer": _config("BottleneckConfig", placement="pfeiffer"),
    "prompt": _config("PromptTuningConfig", num_virtual_tokens=20),
    "ln-tuning": _config("LNTuningConfig"),
    "bitfit": _config("BitFitConfig"),
}
BIASED = {"bitfit": dict(attention_bias=True, mlp_bias=True)}  # base-model overrides per row
BATCH, SEQ = 8, 128


def build(method: str) -> common.Setup:
    model = common.tiny_llama(**BIASED.get(method, {}))
    inputs = common.batch_inputs(BATCH, SEQ)
    if method == "frozen":
        return common.frozen_step(model, inputs)
    make_config = METHODS[method]
    if make_config is not None:
        from deltatune import get_peft_model

        model = get_peft_model(model, make_config())
    return common.adamw_step(model.train(), inputs)


def count(model: nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="measured rounds (one step of each method)")
    parser.add_argument("--warmup", type=int, default=1, help="rounds dropped before measuring")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every process")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), metavar="M",
                        help=f"subset of: {' '.join(METHODS)} (default: all)")
    parser.add_argument("--json", nargs="?", const=str(common.default_json_path("methods_table")),
                        help=f"write results as JSON (default path: {common.RESULTS}/methods_table-<time>.json)")
    args = parser.parse_args()
    methods = [m for m in METHODS if m in args.methods]
    torch.set_num_threads(args.threads)

    memory = {m: common.in_fresh_process(common.measure_memory, build, m, args.threads) for m in methods}
    setups = {m: build(m) for m in methods}
    counts = {m: count(s.model) for m, s in setups.items()}
    times = common.time_interleaved({m: s.step for m, s in setups.items()}, args.warmup, args.steps)
    wall = times["wall"]
    ratios = {m: common.paired_ratio(wall[m], wall["frozen"]) if "frozen" in wall else None for m in methods}

    print(f"deltatune methods, Llama 4x512 (vocab 8000), batch {BATCH}, seq {SEQ}, float32, CPU, "
          f"{args.threads} threads, torch {torch.__version__}; step = forward+backward+AdamW, "
          f"median of {args.steps} steps")
    print(f"{'method':<10} {'trainable':>11} {'share %':>8} {'step ms':>8} {'min ms':>7} {'x frozen':>9} "
          f"{'grad+opt MB':>12} {'act MB':>7} {'tensors MB':>11} {'peak RSS MB':>12}")
    for m in methods:
        (trainable, total), mem, r = counts[m], memory[m], ratios[m]
        name = f"{m}*" if m in BIASED else m
        ratio = "n/a" if r is None else f"{r:.2f}"
        rss = "n/a" if mem["peak_rss"] is None else f"{mem['peak_rss']:.0f}"
        print(f"{name:<10} {trainable:>11,} {100 * trainable / total:8.3f} {statistics.median(wall[m]) * 1e3:8.0f} "
              f"{min(wall[m]) * 1e3:7.0f} {ratio:>9} {mem['grads'] + mem['optimizer']:12.1f} "
              f"{mem['saved_for_backward']:7.0f} {mem['tensors']:11.0f} {rss:>12}")
    print("min ms: fastest measured step. x frozen: median per-round ratio to the frozen row (forward + backward\n"
          "to inputs_embeds, no update). act MB: tensors saved for backward. tensors MB: params + grads + AdamW\n"
          "state + act MB (deterministic). peak RSS MB: peak resident memory over 2 steps in a fresh process,\n"
          "minus its RSS after imports (allocator-dependent).")
    if "bitfit" in methods:
        print("* bitfit: the same shape with attention_bias=True, mlp_bias=True (tiny Llama has no biases).")

    if args.json:
        path = common.write_json(args.json, {
            "args": vars(args), "torch": torch.__version__, "batch": BATCH, "seq": SEQ,
            "trainable_total": counts, "step_seconds": times, "x_frozen": ratios, "memory_mb": memory,
        })
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
