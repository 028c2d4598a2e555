"""DoRA training-step benchmark: deltatune vs peft, on CPU (or --device cuda, timing only).

Model: common.tiny_llama (Llama, hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 8000), float32, random
weights. Both libraries: LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", use_dora=True); forward
with labels, backward, AdamW on the adapters. Same base weights, batch and adapter values: every A and B is
redrawn from a generator seeded by its file key (A ~ U(+-1/sqrt(fan_in)), B ~ U(+-1e-3), so the rescaling is
not trivially 1), and each magnitude stays as its library initialised it (||W|| per row, the same numbers).
The largest loss difference between the libraries over all steps is printed: it should be rounding-sized.

Two step shapes, timed separately:
  accum 1   the batch (--batch sequences of --seq tokens) in one forward/backward per optimizer step
  accum N   the same batch as N micro-batches with gradients accumulated, then one optimizer step. deltatune
            computes each layer's weight norm once per step (cached on the parameter versions); peft
            recomputes it in every micro-batch, so this is where the cache shows.
Reference row "lora": deltatune's plain LoRA (use_dora=False), same A and B: what DoRA costs on top of LoRA.
Reference row "frozen": the same model with every parameter frozen, forward + backward to inputs_embeds only
(per micro-batch): the floor any adapter step pays, so frozen/peft is the lowest ratio any DoRA could reach.
Time: common.time_interleaved (one process holds the three models, one step of each per round in rotating
order, warm-up rounds dropped); median wall and CPU time per step and the medians of the per-round ratios.
Memory (accum 1): each library in a fresh spawned process, common.measure_memory (peak RSS growth and the
deterministic tensor accounting: params + grads + AdamW state + tensors saved for backward).

--host-bound shrinks the model (hidden 64, intermediate 128, 4 heads) and the batch (2 x 8) until the kernels
cost next to nothing, and steps AdamW with foreach=True as it runs on a GPU: what is left is host time (Python,
dispatch, autograd), which is what bounds this bench's step on a GPU (bench/README.md). A CPU-only stand-in for
the GPU figure, to check a change to the forward without a GPU.

    .venv/bin/python bench/dora_step.py [--steps 10 --warmup 2 --batch 8 --seq 128 --accum 4 --threads 1 --json]
    python bench/dora_step.py --device cuda --batch 16 --seq 512 --steps 20 --warmup 5   # on a GPU
    .venv/bin/python bench/dora_step.py --host-bound --steps 400 --warmup 30                # host time only
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import warnings
import zlib

import common
import torch

warnings.filterwarnings("ignore", category=FutureWarning)

LIBS = ("deltatune", "peft")
KINDS = (*LIBS, "lora", "frozen")
TARGET = 0.8  # deltatune's DoRA step should take at most this share of peft's
HOST_BOUND = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)


def set_adapter_values(lib, model: torch.nn.Module, seed: int) -> None:
    """Draw A and B from generators seeded by their file keys; keep the magnitudes as initialised."""
    state = lib.get_peft_model_state_dict(model)
    values = {}
    for key, tensor in state.items():
        if "lora_magnitude_vector" in key:
            values[key] = tensor.clone()
            continue
        gen = torch.Generator().manual_seed(zlib.crc32(key.encode()) + seed)
        bound = 1e-3 if ".lora_B." in key else tensor.shape[1] ** -0.5
        values[key] = (torch.rand(tensor.shape, generator=gen) * 2 - 1) * bound
    lib.set_peft_model_state_dict(model, values)


def micro_batches(batch: int, seq: int, accum: int, seed: int, device: str = "cpu") -> list[dict[str, torch.Tensor]]:
    inputs = common.batch_inputs(batch, seq, seed=seed)
    return [{k: v[i::accum].to(device) for k, v in inputs.items()} for i in range(accum)]


def build_frozen(batch: int, seq: int, accum: int, seed: int = 0, device: str = "cpu", host_bound: bool = False
                 ) -> common.Setup:
    """The floor: no trainable parameter, forward + backward to the input embeddings of every micro-batch."""
    model = common.tiny_llama(seed, **(HOST_BOUND if host_bound else {})).requires_grad_(False).train().to(device)
    micros = micro_batches(batch, seq, accum, seed, device)
    embeds = [model.get_input_embeddings()(m["input_ids"]).detach().requires_grad_() for m in micros]

    def step() -> float:
        total = 0.0
        for micro, embed in zip(micros, embeds, strict=True):
            embed.grad = None
            loss = model(inputs_embeds=embed, attention_mask=micro["attention_mask"], labels=micro["labels"]).loss
            (loss / accum).backward()
            total += loss.item() / accum
        return total

    return common.Setup(model, step, embeds, None)


def build(kind: str, batch: int, seq: int, accum: int, seed: int = 0, device: str = "cpu", host_bound: bool = False
          ) -> common.Setup:
    """The DoRA model of one library with its step closure: `accum` micro-batches, then one AdamW step."""
    if kind == "frozen":
        return build_frozen(batch, seq, accum, seed, device, host_bound)
    lib = __import__("deltatune" if kind == "lora" else kind)
    config = lib.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", use_dora=kind != "lora",
                            task_type="CAUSAL_LM")
    model = lib.get_peft_model(common.tiny_llama(seed, **(HOST_BOUND if host_bound else {})), config).train()
    set_adapter_values(lib, model, seed)
    model.to(device)
    micros = micro_batches(batch, seq, accum, seed, device)
    params = [p for p in model.parameters() if p.requires_grad]
    # foreach: the default on a GPU; on a CPU only where host-bound stands in for a GPU
    opt = torch.optim.AdamW(params, lr=1e-3, foreach=True if host_bound else None)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for micro in micros:
            loss = model(**micro).loss / accum
            loss.backward()
            total += loss.item()
        opt.step()
        return total

    return common.Setup(model, step, params, opt)


def time_all(args: argparse.Namespace, accum: int) -> tuple[dict[str, dict[str, list[float]]], float]:
    """Step times ({clock: {kind: [...]}}) and the largest loss gap between the two libraries."""
    setups = {kind: build(kind, args.batch, args.seq, accum, device=args.device, host_bound=args.host_bound)
              for kind in KINDS}
    losses: dict[str, list[float]] = {kind: [] for kind in KINDS}

    def stepper(kind: str):
        return lambda: losses[kind].append(setups[kind].step())

    times = common.time_interleaved({kind: stepper(kind) for kind in KINDS}, args.warmup, args.steps)
    gap = max(abs(a - b) for a, b in zip(losses["deltatune"], losses["peft"], strict=True))
    return times, gap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="measured rounds (one step of each library)")
    parser.add_argument("--warmup", type=int, default=2, help="rounds dropped before measuring")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--accum", type=int, default=4, help="micro-batches per step in the accumulation run")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads in every process (1: stable on a shared machine)")
    parser.add_argument("--device", default="cpu", help="e.g. cuda (implies --no-memory: the memory columns are CPU's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory measurement")
    parser.add_argument("--host-bound", action="store_true",
                        help="a model and batch so small that only host time counts (defaults then: --batch 2 "
                             "--seq 8 --accum 2 --no-memory): the CPU stand-in for the GPU step")
    parser.add_argument("--json", nargs="?", const=str(common.default_json_path("dora_step")),
                        help=f"write results as JSON (default path: {common.RESULTS}/dora_step-<time>.json)")
    if "--host-bound" in sys.argv[1:]:
        parser.set_defaults(batch=2, seq=8, accum=2, no_memory=True)
    args = parser.parse_args()
    if args.batch % args.accum:
        parser.error(f"--batch {args.batch} does not split into --accum {args.accum} micro-batches")
    torch.set_num_threads(args.threads)

    load = [os.getloadavg()[0]]
    memory = {}
    if not args.no_memory and args.device == "cpu":
        for name in LIBS:
            builder = functools.partial(build, batch=args.batch, seq=args.seq, accum=1)
            memory[name] = common.in_fresh_process(common.measure_memory, builder, name, args.threads)
    runs = {}
    for accum in dict.fromkeys((1, args.accum)):
        runs[accum] = time_all(args, accum)
    load.append(os.getloadavg()[0])

    shape = "4x64 (host-bound)" if args.host_bound else "4x512"
    print(f"DoRA r=16 all-linear, Llama {shape}, batch {args.batch} x seq {args.seq}, float32, {args.device}, "
          f"{args.threads} thread(s), torch {torch.__version__}; medians of {args.steps} steps")
    print(f"{'accum':>5} {'config':<10} {'wall ms':>9} {'cpu ms':>9} {'min ms':>9}")
    ratios = {}
    for accum, (times, gap) in runs.items():
        wall, cpu = times["wall"], times["cpu"]
        for kind in KINDS:
            print(f"{accum:>5} {kind:<10} {statistics.median(wall[kind]) * 1e3:9.1f} "
                  f"{statistics.median(cpu[kind]) * 1e3:9.1f} {min(wall[kind]) * 1e3:9.1f}")
        ratios[accum] = {f"{kind}/peft": {"time": common.paired_ratio(wall[kind], wall["peft"]),
                                          "cpu_time": common.paired_ratio(cpu[kind], cpu["peft"])}
                         for kind in ("deltatune", "lora", "frozen")}
        ratios[accum]["max_loss_gap"] = gap
    for accum, r in ratios.items():
        ours, lora, floor = r["deltatune/peft"], r["lora/peft"], r["frozen/peft"]
        if ours["time"] <= TARGET:
            verdict = "ok"
        elif floor["time"] > TARGET:  # the frozen model alone takes more: no adapter step can get under the target
            verdict = f"above the {TARGET} target, out of reach at this shape (see the floor; try --host-bound)"
        else:
            verdict = f"ABOVE the {TARGET} target"
        print(f"accum {accum}: deltatune/peft step time {ours['time']:.3f} (cpu {ours['cpu_time']:.3f}), {verdict}; "
              f"plain LoRA/peft {lora['time']:.3f}; floor frozen/peft {floor['time']:.3f} "
              f"(cpu {floor['cpu_time']:.3f}); max |loss gap| {r['max_loss_gap']:.1e}")
    if memory:
        print(f"{'library':<10} {'tensors MB':>11} {'saved-bwd MB':>13} {'peak RSS+ MB':>13}")
        for name, m in memory.items():
            rss = "n/a" if m["peak_rss"] is None else f"{m['peak_rss']:.1f}"
            print(f"{name:<10} {m['tensors']:11.1f} {m['saved_for_backward']:13.1f} {rss:>13}")
        ratios["memory"] = memory["deltatune"]["tensors"] / memory["peft"]["tensors"]
        print(f"deltatune/peft memory (tensors) {ratios['memory']:.3f}")
    if max(load) > max(os.cpu_count() or 1, args.threads) + 0.5:
        print(f"warning: load average {max(load):.1f} on {os.cpu_count()} CPUs: other processes competed for the "
              "cores; trust the paired ratios over the absolute times, or rerun on a quiet machine.")
    if args.json:
        path = common.write_json(args.json, {
            "args": vars(args), "torch": torch.__version__, "memory_mb": memory, "load_average": load,
            "step_seconds": {str(a): times for a, (times, _) in runs.items()},
            "ratios": {str(k): v for k, v in ratios.items()},
        })
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
