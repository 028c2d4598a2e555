"""Prompt-learning benchmark: deltatune vs peft training step, peak memory and adapter switch, on CPU.

Model: a randomly initialised Llama (hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 8000), float32;
`prefix-gqa` uses 4 key/value heads, so the prefix lives in a grouped-query KV cache.
Configurations, each in both libraries, num_virtual_tokens=20, CAUSAL_LM:
  prompt      prompt tuning (RANDOM init)
  prefix      prefix tuning, prefix_projection=False
  prefix-gqa  the same on the grouped-query model
Step: forward(input_ids, attention_mask, labels), backward, AdamW step on the trainable tensor (the table).
Both libraries use the same base weights, batch and table values (the table is re-drawn from a seeded
generator after get_peft_model); the run checks that their losses agree at every step.

Time: one process holds all six models and runs one step of each per round, rotating the order every round
to cancel drift; warm-up rounds are dropped. We report median wall and CPU (process) time per step and, as
ratios, the median over rounds of the paired per-round deltatune/peft ratios.
Memory: each configuration runs in a fresh spawned process with common.measure_memory: tensor accounting
(params + grads + optimizer state + unique non-parameter storages saved for backward, via
saved_tensors_hooks; deterministic, the ratio uses it) and peak-RSS growth (VmHWM; allocator-dependent).
Switch: two prompt-tuning adapters on one base model; median time of `set_adapter` over many alternating
switches, then the median time of one no-grad forward right after a switch.

    .venv/bin/python bench/prompt_step.py [--steps 12 --warmup 2 --threads 2 --switches 2000 --json]
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import common  # bench/ is on sys.path when this file runs as a script (also in spawned children)
import torch
from common import RESULTS, Setup, paired_ratio
from torch import nn

warnings.filterwarnings("ignore", category=FutureWarning)

LIBS = ("deltatune", "peft")
METHODS = ("prompt", "prefix", "prefix-gqa")
KINDS = tuple(f"{lib}/{method}" for method in METHODS for lib in LIBS)
N_VIRTUAL = 20


def base_model(kv_heads: int, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=kv_heads, vocab_size=8000)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def adapter_config(lib: str, method: str) -> Any:
    if lib == "peft":
        from peft import PrefixTuningConfig, PromptTuningConfig
    else:
        from deltatune.methods.prefix_tuning import PrefixTuningConfig
        from deltatune.methods.prompt_tuning import PromptTuningConfig
    if method == "prompt":
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL)
    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL, prefix_projection=False)


def wrap(lib: str, method: str, model: nn.Module, adapter_name: str = "default") -> nn.Module:
    """`model` wrapped by `lib` with one adapter of `method`."""
    get_peft_model = __import__(lib).get_peft_model
    return get_peft_model(model, adapter_config(lib, method), adapter_name=adapter_name)


def seed_table(model: nn.Module, adapter_name: str, seed: int) -> nn.Parameter:
    """Re-draw the adapter's table from `seed`, identically in both libraries; return it."""
    table = model.prompt_encoder[adapter_name].embedding.weight
    with torch.no_grad():
        table.copy_(torch.randn(table.shape, generator=torch.Generator().manual_seed(seed)))
    return table


def batch_inputs(batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(8000, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def build(kind: str, batch: int, seq: int, seed: int = 0) -> Setup:
    """The wrapped model for `kind` ("lib/method") and its training-step closure."""
    lib, method = kind.split("/")
    model = wrap(lib, method, base_model(4 if method == "prefix-gqa" else 8, seed)).train()
    params = [seed_table(model, "default", seed + 1)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0] is params[0], f"{kind}: only the table may be trainable"
    inputs = batch_inputs(batch, seq, seed)
    opt = torch.optim.AdamW(params, lr=1e-3)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        return loss.item()

    return Setup(model, step, params, opt)


def _build_kind(args: dict[str, Any], kind: str) -> Setup:
    return build(kind, args["batch"], args["seq"])


def measure_memory(kind: str, args: dict[str, Any]) -> dict[str, float | None]:
    """common's accounting, run on this file's models (called in a fresh spawned process)."""
    memory = common.measure_memory(functools.partial(_build_kind, args), kind, args["threads"], steps=3)
    memory["peak_rss_delta"] = memory["peak_rss"]
    return memory


def measure_time(args: argparse.Namespace) -> tuple[dict[str, dict[str, list[float]]], dict[str, float]]:
    """Wall and CPU seconds per step ({clock: {kind: [...]}}), interleaved, warm-up dropped; and the max
    |loss deltatune - loss peft| per method (0 when both train the same numbers)."""
    steps = {kind: build(kind, args.batch, args.seq).step for kind in KINDS}
    times: dict[str, dict[str, list[float]]] = {clock: {kind: [] for kind in KINDS} for clock in ("wall", "cpu")}
    gaps = dict.fromkeys(METHODS, 0.0)
    for i in range(args.warmup + args.steps):
        losses = {}
        shift = i % len(KINDS)
        for kind in KINDS[shift:] + KINDS[:shift]:
            wall, cpu = time.perf_counter(), time.process_time()
            losses[kind] = steps[kind]()
            if i >= args.warmup:
                times["wall"][kind].append(time.perf_counter() - wall)
                times["cpu"][kind].append(time.process_time() - cpu)
        for method in METHODS:
            gaps[method] = max(gaps[method], abs(losses[f"deltatune/{method}"] - losses[f"peft/{method}"]))
    return times, gaps


def max_gap(x: torch.Tensor, y: torch.Tensor) -> float:
    return (x - y).abs().max().item()


def measure_switch(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Per library: set_adapter median (us), then the median no-grad forward right after a switch (ms).

    Both libraries hold adapters "a" and "b" on their own copy of the base model; every switch and every
    forward alternates between the libraries (order flipped each round) so drift hits both alike.
    """
    inputs = batch_inputs(args.batch, args.seq)
    del inputs["labels"]
    models = {}
    for lib in LIBS:
        model = wrap(lib, "prompt", base_model(8), adapter_name="a")
        model.add_adapter("b", adapter_config(lib, "prompt"))
        seed_table(model, "a", 1)
        seed_table(model, "b", 2)
        models[lib] = model.eval()
    names, warmup = ("a", "b"), 100
    switch: dict[str, list[float]] = {lib: [] for lib in LIBS}
    forward: dict[str, list[float]] = {lib: [] for lib in LIBS}
    logits = {}
    for i in range(warmup + args.switches):
        for lib in LIBS[:: 1 - 2 * (i % 2)]:
            start = time.perf_counter_ns()
            models[lib].set_adapter(names[i % 2])
            if i >= warmup:
                switch[lib].append((time.perf_counter_ns() - start) / 1e3)
    with torch.no_grad():
        for i in range(1 + args.switch_forwards):  # round 0 is a warm-up
            for lib in LIBS[:: 1 - 2 * (i % 2)]:
                models[lib].set_adapter(names[i % 2])
                start = time.perf_counter()
                logits[lib, names[i % 2]] = models[lib](**inputs).logits
                if i:
                    forward[lib].append(time.perf_counter() - start)
    out = {lib: {"set_adapter_us": statistics.median(switch[lib]), "set_adapter_min_us": min(switch[lib]),
                 "forward_after_switch_ms": statistics.median(forward[lib]) * 1e3} for lib in LIBS}
    out["check"] = {"max |a - b| logits (>0)": max_gap(logits["deltatune", "a"], logits["deltatune", "b"]),
                    "max |deltatune - peft| logits": max(max_gap(logits["deltatune", n], logits["peft", n])
                                                         for n in names)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="measured rounds (one step of each config)")
    parser.add_argument("--warmup", type=int, default=2, help="rounds dropped before measuring")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every process")
    parser.add_argument("--switches", type=int, default=2000, help="set_adapter calls timed per library")
    parser.add_argument("--switch-forwards", type=int, default=6, help="forwards timed after a switch")
    default_json = RESULTS / f"prompt_step-{time.strftime('%Y%m%d-%H%M%S')}.json"
    parser.add_argument("--json", nargs="?", const=str(default_json),
                        help=f"write results as JSON (default path: {RESULTS}/prompt_step-<time>.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ctx = mp.get_context("spawn")
    memory = {}
    for kind in KINDS:
        with ctx.Pool(1) as pool:
            memory[kind] = pool.apply(measure_memory, (kind, vars(args)))
    times, gaps = measure_time(args)
    switch = measure_switch(args)

    wall, cpu = times["wall"], times["cpu"]
    print(f"Prompt learning, {N_VIRTUAL} virtual tokens, Llama 4x512, batch {args.batch}, seq {args.seq}, "
          f"float32, CPU, {args.threads} threads, torch {torch.__version__}; medians of {args.steps} steps")
    print(f"{'config':<22} {'wall ms':>8} {'cpu ms':>8} {'min ms':>8} {'tensors MB':>11} {'saved-bwd MB':>13} "
          f"{'grad+opt MB':>12} {'peak RSS+ MB':>13}")
    for kind in KINDS:
        m = memory[kind]
        rss = "n/a" if m["peak_rss_delta"] is None else f"{m['peak_rss_delta']:.1f}"
        print(f"{kind:<22} {statistics.median(wall[kind]) * 1e3:8.1f} {statistics.median(cpu[kind]) * 1e3:8.1f} "
              f"{min(wall[kind]) * 1e3:8.1f} {m['tensors']:11.1f} {m['saved_for_backward']:13.1f} "
              f"{m['grads'] + m['optimizer']:12.2f} {rss:>13}")
    ratios = {}
    for method in METHODS:
        ours, theirs = f"deltatune/{method}", f"peft/{method}"
        r = ratios[method] = {
            "time": paired_ratio(wall[ours], wall[theirs]),
            "cpu_time": paired_ratio(cpu[ours], cpu[theirs]),
            "memory": memory[ours]["tensors"] / memory[theirs]["tensors"],
        }
        print(f"deltatune/peft {method:<11} time {r['time']:.3f} (cpu {r['cpu_time']:.3f})  "
              f"memory {r['memory']:.3f}  max |loss gap| {gaps[method]:.1e}")
    print(f"set_adapter, 2 prompt-tuning adapters (median of {args.switches}), then one no-grad forward:")
    for lib in LIBS:
        s = switch[lib]
        print(f"  {lib:<10} set_adapter {s['set_adapter_us']:8.1f} us (min {s['set_adapter_min_us']:.1f})  "
              f"forward after switch {s['forward_after_switch_ms']:.1f} ms")
    print("  checks: " + ", ".join(f"{k} {v:.1e}" for k, v in switch["check"].items()))

    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "step_seconds": times,
                                    "memory_mb": memory, "ratios": ratios,
                                    "max_loss_gap": gaps, "switch": switch}, indent=2))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
