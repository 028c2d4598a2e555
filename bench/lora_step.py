"""LoRA training-step benchmark: deltatune vs peft vs the frozen base model, on CPU.

Model: a randomly initialised Llama (hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 8000), float32.
Configurations:
  deltatune    LoRA r=16, alpha=32 on all linear layers; forward, backward, AdamW step on the adapters.
  peft         the same with peft.
  frozen-base  every parameter frozen; forward + backward to `inputs_embeds` only (the floor LoRA pays).
All three use the same base weights (seed), the same batch, and identical adapter values: after injection
each adapter tensor is re-initialised from a generator seeded by its name (A ~ U(+-1/sqrt(fan_in)), B = 0,
the libraries' default scheme), so both libraries train the very same numbers. The run checks this: the
two libraries' losses must agree at every step.

Time: one process holds the three models and runs one step of each per round, rotating the order every
round to cancel machine drift and cache effects. Warm-up rounds are dropped. We report median wall and CPU
(process) time per step, and as ratios the median over rounds of the per-round ratios (paired, so drift and
load from other processes largely cancel). torch.set_num_threads(--threads) in every process; the default,
one thread, keeps the numbers stable when other processes share the cores (with 2 threads on 2 busy cores,
OpenMP barriers made single steps vary 5x). A load-average warning flags a busy machine.

Memory: each configuration runs in a fresh spawned process. Two numbers:
  tensors   params + grads + optimizer state + tensors saved for backward (unique storages that are not
            parameters, counted with torch.autograd.graph.saved_tensors_hooks). Deterministic, allocator-
            independent; this is the number the ratios use.
  peak RSS  growth of resident memory during the steps (Linux: VmHWM reset via /proc/self/clear_refs,
            after malloc_trim). Includes transient buffers and allocator slack, so it is a cross-check.

    .venv/bin/python bench/lora_step.py [--steps 20 --warmup 5 --batch 8 --seq 128 --threads 1 --json]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import multiprocessing as mp
import os
import re
import statistics
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

warnings.filterwarnings("ignore", category=FutureWarning)

KINDS = ("deltatune", "peft", "frozen-base")
MB = 2**20
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Setup:
    model: nn.Module
    step: Callable[[], float]  # one training step on the fixed batch; returns the loss
    leaves: list[torch.Tensor]  # the tensors that receive gradients
    optimizer: torch.optim.Optimizer | None


def build(kind: str, batch: int, seq: int, seed: int = 0) -> Setup:
    """The model for `kind` with its step closure, same base weights and batch for every kind."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, vocab_size=8000)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    ids = torch.randint(config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))

    if kind == "frozen-base":
        model.requires_grad_(False).train()
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()

        def frozen_step() -> float:
            embeds.grad = None
            loss = model(inputs_embeds=embeds, labels=ids).loss
            loss.backward()
            return loss.item()

        return Setup(model, frozen_step, [embeds], None)

    lib = __import__("deltatune" if kind == "deltatune" else "peft")
    lora = lib.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    model = lib.get_peft_model(model, lora).train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    with torch.no_grad():
        for name, p in named:
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) + seed)
            bound = 0.0 if ".lora_B." in name else p.shape[1] ** -0.5
            p.copy_(torch.rand(p.shape, generator=gen) * 2 * bound - bound)
    opt = torch.optim.AdamW(params, lr=1e-3)

    def lora_step() -> float:
        opt.zero_grad(set_to_none=True)  # at the start, so grads stay inspectable after the last step
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        return loss.item()

    return Setup(model, lora_step, params, opt)


def _status_kb(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def measure_memory(kind: str, args: dict[str, Any]) -> dict[str, float | None]:
    """In a fresh process: tensor-byte accounting of the third step and peak-RSS growth over 3 steps (MB)."""
    torch.set_num_threads(args["threads"])
    setup = build(kind, args["batch"], args["seq"])
    step, params = setup.step, list(setup.model.parameters())
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        rss0: int | None = _status_kb("VmRSS")
    except OSError:
        rss0 = None
    for _ in range(2):  # the first step allocates grads and optimizer state
        step()
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    rss_peak = None if rss0 is None else (_status_kb("VmHWM") - rss0) / 1024
    opt_state = [v for s in setup.optimizer.state.values() for v in s.values()] if setup.optimizer else []
    out = {
        "params": sum(p.nbytes for p in params) / MB,
        "grads": sum(t.grad.nbytes for t in setup.leaves if t.grad is not None) / MB,
        "optimizer": sum(v.nbytes for v in opt_state if torch.is_tensor(v)) / MB,
        "saved_for_backward": sum(saved.values()) / MB,
        "peak_rss_delta": rss_peak,
    }
    out["tensors"] = out["params"] + out["grads"] + out["optimizer"] + out["saved_for_backward"]
    return out


def measure_time(args: argparse.Namespace) -> tuple[dict[str, dict[str, list[float]]], float]:
    """Wall and CPU seconds per step ({clock: {kind: [...]}}), warm-up dropped; and the max loss gap
    between deltatune and peft over all steps (0 when both train the same numbers)."""
    steps = {kind: build(kind, args.batch, args.seq).step for kind in KINDS}
    times: dict[str, dict[str, list[float]]] = {clock: {kind: [] for kind in KINDS} for clock in ("wall", "cpu")}
    loss_gap = 0.0
    for i in range(args.warmup + args.steps):
        losses = {}
        for kind in KINDS[i % 3:] + KINDS[: i % 3]:  # rotate the order every round
            wall, cpu = time.perf_counter(), time.process_time()
            losses[kind] = steps[kind]()
            if i >= args.warmup:
                times["wall"][kind].append(time.perf_counter() - wall)
                times["cpu"][kind].append(time.process_time() - cpu)
        loss_gap = max(loss_gap, abs(losses["deltatune"] - losses["peft"]))
    return times, loss_gap


def paired_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="measured rounds (one step of each config)")
    parser.add_argument("--warmup", type=int, default=5, help="rounds dropped before measuring")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads in every process (1: stable on a shared machine)")
    default_json = RESULTS / f"lora_step-{time.strftime('%Y%m%d-%H%M%S')}.json"
    parser.add_argument("--json", nargs="?", const=str(default_json),
                        help=f"write results as JSON (default path: {RESULTS}/lora_step-<time>.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    load = [os.getloadavg()[0]]
    ctx = mp.get_context("spawn")
    memory = {}
    for kind in KINDS:
        with ctx.Pool(1) as pool:
            memory[kind] = pool.apply(measure_memory, (kind, vars(args)))
    times, loss_gap = measure_time(args)
    load.append(os.getloadavg()[0])

    wall, cpu = times["wall"], times["cpu"]
    print(f"LoRA r=16 all-linear, Llama 4x512, batch {args.batch}, seq {args.seq}, float32, CPU, "
          f"{args.threads} threads, torch {torch.__version__}; medians of {args.steps} steps")
    print(f"{'config':<12} {'wall ms':>8} {'cpu ms':>8} {'min ms':>8} {'tensors MB':>11} {'saved-bwd MB':>13} "
          f"{'grad+opt MB':>12} {'peak RSS+ MB':>13}")
    for kind in KINDS:
        m = memory[kind]
        rss = "n/a" if m["peak_rss_delta"] is None else f"{m['peak_rss_delta']:.1f}"
        print(f"{kind:<12} {statistics.median(wall[kind]) * 1e3:8.1f} {statistics.median(cpu[kind]) * 1e3:8.1f} "
              f"{min(wall[kind]) * 1e3:8.1f} {m['tensors']:11.1f} {m['saved_for_backward']:13.1f} "
              f"{m['grads'] + m['optimizer']:12.1f} {rss:>13}")
    ratios = {}
    for other in ("peft", "frozen-base"):
        r = ratios[other] = {
            "time": paired_ratio(wall["deltatune"], wall[other]),
            "cpu_time": paired_ratio(cpu["deltatune"], cpu[other]),
            "memory": memory["deltatune"]["tensors"] / memory[other]["tensors"],
        }
        print(f"deltatune/{other:<12} time {r['time']:.3f} (cpu {r['cpu_time']:.3f})  memory {r['memory']:.3f}")
    print(f"max |loss deltatune - loss peft| over all steps: {loss_gap:.2e}")
    if max(load) > max(os.cpu_count(), args.threads) + 0.5:  # our threads count in the load
        print(f"warning: load average {max(load):.1f} on {os.cpu_count()} CPUs: other processes competed "
              "for the cores; rerun on a quiet machine before trusting the times.")

    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "step_seconds": times,
                                    "memory_mb": memory, "ratios": ratios, "max_loss_gap": loss_gap,
                                    "load_average": load}, indent=2))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
