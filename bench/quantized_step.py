"""QLoRA training step: SmolLM2-135M-Instruct in full precision, 8-bit and 4-bit NF4, deltatune vs peft.

Six configurations: {full, 8bit, nf4} x {deltatune, peft}. The base model is loaded the same way for both
libraries (transformers' from_pretrained; bitsandbytes `BitsAndBytesConfig` for 8bit / nf4, double quantization,
compute dtype = the model dtype); each library's own `prepare_model_for_kbit_training` runs on the quantized
bases (gradient checkpointing only with --checkpointing); LoRA r=16, alpha=32 on all linear layers; AdamW on the
adapters. After injection every adapter tensor is re-initialised from a generator seeded by its name (A uniform,
B = 0), so both libraries train the same numbers; the run prints the largest loss difference between them.

Time: one process holds all six models and runs one step of each per round, order rotated every round
(bench/common.py `time_interleaved`); the ratios are medians of per-round ratios. Memory: each configuration in a
fresh process (CPU: bench/common.py `measure_memory`: peak RSS over the steps minus the RSS after the imports, so
the weights are in it, and exact tensor bytes; CUDA: peak `torch.cuda.max_memory_allocated`, model included).
`weights MB` is
`deltatune.quantized.loading.model_memory_bytes` of the base model (parameters, buffers and quantization state).

    .venv/bin/python bench/quantized_step.py [--steps 6 --warmup 2 --batch 2 --seq 64 --threads 1 --json]
    bench/gpu_quantized.sh     # the same table on a CUDA GPU (bfloat16, larger batch)
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import time
import warnings
import zlib
from typing import Any

import common
import torch

warnings.filterwarnings("ignore")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

QUANTS = ("full", "8bit", "nf4")
LIBS = ("deltatune", "peft")
KEYS = tuple(f"{lib}:{quant}" for quant in QUANTS for lib in LIBS)


def load_base(path: str, quant: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": dtype}
    if quant == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif quant == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    if device != "cpu":
        kwargs["device_map"] = {"": device}
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def build(key: str, args: dict[str, Any]) -> common.Setup:
    """The model for `key` ("lib:quant") with its training-step closure."""
    lib_name, quant = key.split(":")
    lib = __import__(lib_name)
    dtype = getattr(torch, args["dtype"])
    model = load_base(args["model"], quant, args["device"], dtype)
    if quant != "full":
        model = lib.prepare_model_for_kbit_training(model, use_gradient_checkpointing=args["checkpointing"])
    config = lib.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    model = lib.get_peft_model(model, config).train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with torch.no_grad():
        for name, p in named:
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            bound = 0.0 if ".lora_B." in name else p.shape[1] ** -0.5
            p.copy_((torch.rand(p.shape, generator=gen) * 2 * bound - bound).to(p.dtype))
    vocab = model.get_input_embeddings().weight.shape[0]
    inputs = common.batch_inputs(args["batch"], args["seq"], vocab=vocab)
    inputs = {k: v.to(args["device"]) for k, v in inputs.items()}
    return common.adamw_step(model, inputs, lr=1e-4)


def measure_cpu_memory(build_fn, key: str, threads: int) -> dict[str, float | None]:
    """common.measure_memory with the libraries imported first, so that the RSS baseline already holds them
    (bitsandbytes' native library would otherwise count as memory of the quantized configurations only)."""
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import deltatune  # noqa: F401

    return common.measure_memory(build_fn, key, threads)


def measure_cuda_memory(build_fn, key: str, steps: int = 2) -> dict[str, float]:
    """In a fresh process: CUDA memory the built model holds, and the peak allocated over `steps` training steps
    (model included; stored under "peak_rss" so the table reads both devices alike), in MB."""
    setup = build_fn(key)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        setup.step()
    torch.cuda.synchronize()
    return {"model": held / common.MB, "peak_rss": torch.cuda.max_memory_allocated() / common.MB}


def weights_mb(model) -> float:
    from deltatune.quantized.loading import model_memory_bytes

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return model_memory_bytes(base) / common.MB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="a model folder, Hub id or embedded model name (default: the embedded SmolLM2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--steps", type=int, default=6, help="measured rounds (one step of each configuration)")
    parser.add_argument("--warmup", type=int, default=2, help="rounds dropped before measuring")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads in every process (1: stable on a shared machine)")
    parser.add_argument("--checkpointing", action="store_true",
                        help="gradient checkpointing on the quantized bases (prepare_model_for_kbit_training)")
    parser.add_argument("--json", nargs="?", const=str(common.default_json_path("quantized_step")),
                        help="also write everything as JSON (default path: bench/results/quantized_step-<time>.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from deltatune.embedded import resolve_model

    args.model = resolve_model(args.model)
    settings = vars(args)
    build_fn = functools.partial(build, args=settings)

    memory = {}
    for key in KEYS:
        if args.device == "cpu":
            memory[key] = common.in_fresh_process(measure_cpu_memory, build_fn, key, args.threads)
        else:
            memory[key] = common.in_fresh_process(measure_cuda_memory, build_fn, key)

    setups = {key: build_fn(key) for key in KEYS}
    weights = {key: weights_mb(setup.model) for key, setup in setups.items()}
    losses: dict[str, list[float]] = {key: [] for key in KEYS}

    def recording(key: str):
        def step() -> None:
            losses[key].append(setups[key].step())
            if args.device != "cpu":
                torch.cuda.synchronize()
        return step

    times = common.time_interleaved({key: recording(key) for key in KEYS}, args.warmup, args.steps)
    wall = times["wall"]
    gap = max(abs(a - b) for quant in QUANTS
              for a, b in zip(losses[f"deltatune:{quant}"], losses[f"peft:{quant}"], strict=True))

    peak_name = "peak RSS MB" if args.device == "cpu" else "peak CUDA MB"
    print(f"SmolLM2-135M-Instruct, LoRA r=16 all-linear, batch {args.batch} x seq {args.seq}, {args.dtype}, "
          f"{args.device}, {args.threads} threads, checkpointing {'on' if args.checkpointing else 'off'}, "
          f"torch {torch.__version__}; medians of {args.steps} steps")
    print(f"{'config':<15} {'step ms':>9} {'weights MB':>11} {peak_name:>14} {'tensors MB':>11}")
    for key in KEYS:
        m = memory[key]
        tensors = f"{m['tensors']:.1f}" if "tensors" in m else "n/a"
        peak = "n/a" if m["peak_rss"] is None else f"{m['peak_rss']:.1f}"
        print(f"{key:<15} {statistics.median(wall[key]) * 1e3:9.1f} {weights[key]:11.1f} {peak:>14} {tensors:>11}")
    ratios = {}
    for quant in QUANTS:
        ours, theirs = f"deltatune:{quant}", f"peft:{quant}"
        peak_ours, peak_theirs = memory[ours]["peak_rss"], memory[theirs]["peak_rss"]
        ratios[quant] = {
            "time": common.paired_ratio(wall[ours], wall[theirs]),
            "weights": weights[ours] / weights[theirs],
            "peak": None if not (peak_ours and peak_theirs) else peak_ours / peak_theirs,
        }
        if "tensors" in memory[ours]:
            ratios[quant]["tensors"] = memory[ours]["tensors"] / memory[theirs]["tensors"]
        shown = "  ".join(f"{k} {v:.3f}" for k, v in ratios[quant].items() if v is not None)
        print(f"deltatune/peft {quant:<5} {shown}")
    print(f"max |loss deltatune - loss peft| over all steps: {gap:.2e}")
    if args.json:
        path = common.write_json(args.json, {"args": settings, "torch": torch.__version__, "step_seconds": times,
                                             "memory_mb": memory, "weights_mb": weights, "ratios": ratios,
                                             "losses": losses, "max_loss_gap": gap,
                                             "time": time.strftime("%Y-%m-%d %H:%M:%S")})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
