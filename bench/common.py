"""Helpers shared by the benchmarks in bench/: the tiny Llama, equal adapter values in both libraries, training and
inference steps, interleaved timing, fresh-process memory measurement.

Import from a script under bench/ with `import common` (a script's own folder is on sys.path, also in the
processes that multiprocessing's "spawn" starts).

Timing: `time_interleaved` runs one step of every configuration per round, rotating the order each round so
machine drift and cache effects hit all alike; warm-up rounds are dropped; wall and process-CPU seconds.
On a GPU every step ends with a synchronize (`sync_for`), so queued kernels are billed to the step that queued them.
Memory: `in_fresh_process(measure_memory, build, key, threads)` builds one configuration in a new spawned
process and reports
  peak_rss   VmHWM during `steps` training steps minus VmRSS after every library is imported (IMPORTS, the same
             in every process), before the model was built (Linux; VmHWM reset via /proc/self/clear_refs after
             the model is built, after malloc_trim): weights, adapters, grads, optimizer state, activations,
             transient buffers and allocator slack. On CUDA, torch.cuda.max_memory_allocated instead.
  tensors    params + grads + optimizer state + tensors saved for backward (unique non-parameter storages,
             seen through saved_tensors_hooks in the last step): deterministic, allocator-independent.
"""

from __future__ import annotations

import ctypes
import gc
import json
import multiprocessing as mp
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

MB = 2**20
RESULTS = Path(__file__).resolve().parent / "results"
TINY_LLAMA = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, vocab_size=8000)


# Imported before any memory baseline, in every fresh process alike, so no configuration is billed for a library.
IMPORTS = ("transformers", "peft", "deltatune")


@dataclass
class Setup:
    model: nn.Module
    step: Callable[[], Any]  # one timed unit on a fixed batch (a training step returns the loss)
    leaves: list[torch.Tensor]  # the tensors that receive gradients
    optimizer: torch.optim.Optimizer | None
    # What two libraries must agree on before they are compared, computed without randomness (eval mode)
    check: Callable[[], Any] | None = None
    per_step: int = 1  # units one step makes (generated tokens), for per-unit times


def to_device(inputs: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in inputs.items()}


def sync_for(device: str | torch.device) -> Callable[[], None]:
    """What ends a timed step on `device`: a synchronize on CUDA, nothing on the CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def seed_adapters(model: nn.Module, seed: int = 0) -> None:
    """Give every trainable tensor a value drawn from a generator seeded by its name, so that deltatune and peft
    (whose parameter names are the same) hold the same adapter: A factors and prompt tables ~ U(+-1/sqrt(fan_in)),
    B factors ~ U(+-0.01) (not zero: an adapter that adds nothing would make the libraries' checks trivial);
    DoRA magnitudes keep their initial values (the base weight's norms, the same in both)."""
    import zlib

    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad or "magnitude" in name:
                continue
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) + seed)
            bound = 0.01 if "lora_B" in name or "lora_embedding_B" in name else param.shape[-1] ** -0.5
            param.copy_(((torch.rand(param.shape, generator=gen) * 2 - 1) * bound).to(param.dtype))


def tiny_llama(seed: int = 0, **overrides: Any) -> nn.Module:
    """A randomly initialised LlamaForCausalLM of the benchmarks' shape (TINY_LLAMA), float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides}))


def batch_inputs(batch: int, seq: int, vocab: int = TINY_LLAMA["vocab_size"], seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def eval_loss(model: nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    """The loss in eval mode (no dropout), without gradients; the model's mode is restored."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = model(**inputs).loss.item()
    model.train(was_training)
    return loss


def adamw_step(model: nn.Module, inputs: dict[str, torch.Tensor], lr: float = 1e-3,
               sync: Callable[[], None] = lambda: None) -> Setup:
    """Forward with labels, backward, AdamW step on `model`'s trainable parameters."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        sync()
        return loss.item()

    return Setup(model, step, params, opt, check=lambda: eval_loss(model, inputs))


def frozen_step(model: nn.Module, inputs: dict[str, torch.Tensor], sync: Callable[[], None] = lambda: None) -> Setup:
    """Every parameter frozen; forward with labels + backward to `inputs_embeds` only: the floor that any
    adapter step pays when its first trainable tensor sits at the bottom of the model."""
    model.requires_grad_(False).train()
    kwargs = {k: v for k, v in inputs.items() if k != "input_ids"}
    embeds = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_()

    def step() -> float:
        embeds.grad = None
        loss = model(inputs_embeds=embeds, **kwargs).loss
        loss.backward()
        sync()
        return loss.item()

    return Setup(model, step, [embeds], None, check=lambda: eval_loss(model, inputs))


def _status_kb(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _trim_and_read_rss() -> int | None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return _status_kb("VmRSS")
    except OSError:
        return None


def import_libraries(extra: tuple[str, ...] = ()) -> None:
    import importlib

    for name in (*IMPORTS, *extra):
        importlib.import_module(name)


def measure_memory(build: Callable[[str], Setup], key: str, threads: int, steps: int = 2,
                   extra_imports: tuple[str, ...] = ()) -> dict[str, float | None]:
    """Memory of `steps` training steps of build(key), in MB (see the module docstring). Meant to run in a
    fresh process (`in_fresh_process`): the numbers then hold no other configuration's allocations.
    The first step allocates grads and optimizer state; the last one is watched by saved_tensors_hooks."""
    torch.set_num_threads(threads)
    import_libraries(extra_imports)
    rss_base = _trim_and_read_rss()
    setup = build(key)
    params = list(setup.model.parameters())
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    if _trim_and_read_rss() is not None:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            rss_base = None
    for _ in range(steps - 1):
        setup.step()
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        setup.step()
    opt_state = [v for s in setup.optimizer.state.values() for v in s.values()] if setup.optimizer else []
    out: dict[str, float | None] = {
        "params": sum(p.nbytes for p in params) / MB,
        "grads": sum(t.grad.nbytes for t in setup.leaves if t.grad is not None) / MB,
        "optimizer": sum(v.nbytes for v in opt_state if torch.is_tensor(v)) / MB,
        "saved_for_backward": sum(saved.values()) / MB,
        "peak_rss": None if rss_base is None else (_status_kb("VmHWM") - rss_base) / 1024,
    }
    out["tensors"] = sum(out[k] for k in ("params", "grads", "optimizer", "saved_for_backward"))
    return out


def in_fresh_process(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a new spawned process (fn and args must pickle: module-level functions, plain data)."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def time_interleaved(steps: dict[str, Callable[[], Any]], warmup: int, n: int) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds per step, {"wall"|"cpu": {key: [n values]}}: one step of each key per round,
    order rotated every round, the first `warmup` rounds dropped."""
    keys = list(steps)
    times: dict[str, dict[str, list[float]]] = {clock: {k: [] for k in keys} for clock in ("wall", "cpu")}
    for i in range(warmup + n):
        shift = i % len(keys)
        for key in keys[shift:] + keys[:shift]:
            wall, cpu = time.perf_counter(), time.process_time()
            steps[key]()
            if i >= warmup:
                times["wall"][key].append(time.perf_counter() - wall)
                times["cpu"][key].append(time.process_time() - cpu)
    return times


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a[i] / b[i]: drift and outside load that hit a round hit both."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def default_json_path(name: str) -> Path:
    return RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    return path
