"""`train(config)`: the training loop, on accelerate's Accelerator (devices, processes, mixed precision).

Why the loop looks the way it does:
- Data order and sharding come from sampler.DataOrder, and the loss is a token sum divided by the whole
  optimizer step's target count (loss.py). Together they make N processes with the same global batch follow
  the same trajectory as one process, and make a resumed run continue exactly where it stopped.
- Gradient accumulation is explicit: gradients are all-reduced only on an optimizer step's last micro-batch
  (`no_sync` before it), so an optimizer step is the unit of everything: logging, evaluation, checkpoints.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltatune import get_peft_model
from deltatune.data import collate
from deltatune.trainer import checkpoints, report
from deltatune.trainer.config import ConfigError, TrainConfig, save_config
from deltatune.trainer.evaluate import evaluate
from deltatune.trainer.examples import RunData, load_run_data
from deltatune.trainer.loading import load_base_model, load_tokenizer, model_folder, save_label_names, task_type
from deltatune.trainer.loss import forward_loss, target_count
from deltatune.trainer.methods import METHODS, build_peft_config
from deltatune.trainer.sampler import DataOrder


class TrainingStopped(RuntimeError):
    """The run cannot go on (a non-finite loss); the message says at which step and what was kept."""


@dataclass
class TrainResult:
    output_dir: str
    saved_to: str  # output_dir/adapter, or output_dir/model for full fine-tuning
    summary: dict[str, Any]


# A function called before each optimizer step with (step number from 1, model): for tests and tools.
StepHook = Callable[[int, nn.Module], None]


def make_accelerator(config: TrainConfig):
    from accelerate import Accelerator

    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("mixed_precision fp16 needs a CUDA GPU; use bf16 or no on this machine.")
    if config.mixed_precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ConfigError("This GPU has no bf16 support; use mixed_precision fp16 or no.")
    return Accelerator(mixed_precision=config.mixed_precision, cpu=not has_accelerator())


def has_accelerator() -> bool:
    """Without one, accelerate must be told `cpu=True`, or processes started by torchrun each run alone."""
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(mps and mps.is_available()) or bool(xpu and xpu.is_available())


def build_model(config: TrainConfig, path: str, data: RunData, tokenizer) -> tuple[nn.Module, dict[str, int]]:
    """The model to train, and the base model's weight bytes as loaded and as they would be unquantized."""
    from deltatune.quantized.loading import model_memory_bytes

    model = load_base_model(path, data.label_names, tokenizer.pad_token_id, quantize=config.quantize)
    weights = {"loaded": model_memory_bytes(model), "full_precision": model_memory_bytes(model, full_precision=True)}
    peft_config = build_peft_config(config, task_type(data.label_names), path)
    if peft_config is None:  # full fine-tuning
        model.requires_grad_(True)
        if config.compile:
            model.compile()
        return model, weights
    try:
        peft_model = get_peft_model(model, peft_config)
    except ValueError as err:  # the method does not fit this model (no target modules, no KV cache, ...)
        raise ConfigError(f"Cannot apply method {config.method!r} to {config.model}: {err}") from err
    # Saved adapters name the model the user gave (an embedded name, say), not the folder it was loaded from.
    peft_model.peft_config["default"].base_model_name_or_path = config.model
    if config.compile:
        # Module.compile compiles forward in place: parameter names, saving and generate() stay as they are.
        peft_model.compile()
    return peft_model, weights


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on vectors (biases, norms, prompt rows stay 2-D).
    With loraplus_lr_ratio, LoRA+'s groups instead (B at ratio x the learning rate)."""
    if config.loraplus_lr_ratio is not None:
        from deltatune import create_loraplus_optimizer

        return create_loraplus_optimizer(model, torch.optim.AdamW, lr=config.learning_rate,
                                         loraplus_lr_ratio=config.loraplus_lr_ratio,
                                         loraplus_weight_decay=config.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    try:  # one kernel for every tensor: about 5x faster than the per-tensor loop over a LoRA model's ~400 factors
        return torch.optim.AdamW(groups, lr=config.learning_rate, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype the fused kernel does not take
        return torch.optim.AdamW(groups, lr=config.learning_rate)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)
    name = {"constant": "constant_with_warmup"}.get(config.lr_scheduler, config.lr_scheduler)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


# What a finished run leaves in output_dir besides checkpoints: a new run there would replace it.
RESULTS = ("adapter", "model", "summary.json")


def resume_point(config: TrainConfig) -> str | None:
    """The checkpoint to continue from; refuses to mix a new run into an old run's checkpoints or results."""
    if config.resume is False:
        if checkpoints.list_checkpoints(config.output_dir) and not config.overwrite:
            raise ConfigError(
                f"{config.output_dir} holds checkpoints of an earlier run. Pass --resume to continue it, "
                "--overwrite to start over there, or another --output-dir.")
        found = [name for name in RESULTS if os.path.exists(os.path.join(config.output_dir, name))]
        if found and not config.overwrite:
            raise ConfigError(
                f"{config.output_dir} holds the results of an earlier run ({', '.join(found)}). Pass --overwrite to "
                "replace them, or another --output-dir.")
        return None
    if config.resume is True:
        latest = checkpoints.latest_checkpoint(config.output_dir)
        if latest is None:
            warnings.warn(f"resume: no checkpoint in {config.output_dir}; starting from the beginning.", stacklevel=2)
        return latest
    if not os.path.isfile(os.path.join(config.resume, checkpoints.STATE_FILE)):
        raise ConfigError(f"resume: {config.resume!r} is not a checkpoint folder (no {checkpoints.STATE_FILE}).")
    return config.resume


# Settings a resumed run must keep: the method's own, and those the restored optimizer and scheduler state would
# silently override or the continuation depends on.
RESUME_KEYS = ("seed", "method", "learning_rate", "weight_decay", "lr_scheduler", "warmup_steps", "warmup_ratio",
               "max_grad_norm", "max_length", "mixed_precision", "quantize")


def _run_identity(config: TrainConfig, order: DataOrder, total_steps: int, data: RunData) -> dict[str, Any]:
    """What a checkpoint must share with the run resuming it for the continuation to be exact."""
    keys = dict.fromkeys((*RESUME_KEYS, *METHODS[config.method].keys))
    return {**{k: getattr(config, k) for k in keys}, "num_examples": order.num_examples,
            "global_batch": order.global_batch, "total_steps": total_steps, "data_hash": data.fingerprint}


def _check_resumable(state: dict, identity: dict, path: str) -> None:
    """Compared before anything is loaded (a changed method would otherwise fail on the weights' keys). Settings a
    checkpoint does not record (written by an older version) are not compared."""
    changed = {k: (state[k], v) for k, v in identity.items() if k in state and state[k] != v}
    if changed:
        details = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changed.items())
        if "data_hash" in changed:
            details += "; the data_hash covers the tokenized train and eval examples: other files or rows"
        raise ConfigError(f"Cannot resume from {path}: the run's settings changed ({details}). "
                          "Resume with the same settings, or start a new run.")


@dataclass
class Run:
    """Everything one training run holds, built by `_start`."""

    config: TrainConfig
    accelerator: Any
    tokenizer: Any
    data: RunData
    model: nn.Module  # as prepared by accelerate (DDP-wrapped with several processes)
    unwrapped: nn.Module
    optimizer: Any
    scheduler: Any
    order: DataOrder
    total_steps: int
    start_step: int
    resumed_from: str | None
    log: report.MetricsLog
    base_weights: dict[str, int]  # bytes of the base model's weights: "loaded" and "full_precision"

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def evaluate(self, step: int) -> dict[str, float] | None:
        if self.data.eval is None:
            return None
        metrics = evaluate(self.unwrapped, self.data.eval, self.tokenizer, self.accelerator,
                           batch_size=self.config.eval_batch_size or self.config.batch_size,
                           generate=self.config.eval_generate,
                           max_new_tokens=self.config.max_new_tokens, max_length=self.config.max_length)
        if self.main:
            self.log.append({"split": "eval", "step": step, **metrics})
        return metrics

    def checkpoint_state(self, step: int) -> dict[str, Any]:
        return {**_run_identity(self.config, self.order, self.total_steps, self.data), "step": step,
                "epoch": self.order.epoch_of(step), "steps_per_epoch": self.order.steps_per_epoch}


def train(config: TrainConfig, *, step_hook: StepHook | None = None) -> TrainResult:
    """Train as `config` says; returns where the result went and the summary (also printed and saved)."""
    started = time.perf_counter()
    run = _start(config)
    before = _logged_eval(run.log, 0) if run.resumed_from else run.evaluate(0)
    _train_steps(run, step_hook)
    # Resuming a run that had finished its steps: its final evaluation is already logged.
    finished = run.resumed_from and run.start_step == run.total_steps
    after = (finished and _logged_eval(run.log, run.total_steps)) or run.evaluate(run.total_steps)
    saved_to = _save_final(run)
    summary = _summary(run, before, after, saved_to, time.perf_counter() - started)
    if run.main:
        report.plot_losses(run.log.read(), os.path.join(config.output_dir, report.PLOT_FILE))
        report.write_summary(config.output_dir, summary)
        print(report.summary_table(summary))
    run.accelerator.wait_for_everyone()
    return TrainResult(config.output_dir, saved_to, summary)


def _start(config: TrainConfig) -> Run:
    """Load model and data, build the optimizer, and restore the checkpoint being resumed, if any."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(config)
    resume_from = resume_point(config)
    set_seed(config.seed)
    path = model_folder(config.model)
    tokenizer = load_tokenizer(path)
    data = load_run_data(config, tokenizer)
    model, base_weights = build_model(config, path, data, tokenizer)
    order = DataOrder(len(data.train), config.batch_size, config.gradient_accumulation_steps,
                      accelerator.num_processes, config.seed)
    total_steps = config.max_steps or config.epochs * order.steps_per_epoch
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, total_steps)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    seed_ranks(config.seed, accelerator)
    run = Run(config, accelerator, tokenizer, data, prepared, accelerator.unwrap_model(prepared), optimizer,
              scheduler, order, total_steps, 0, resume_from, report.MetricsLog(config.output_dir), base_weights)
    if resume_from:
        identity = _run_identity(config, order, total_steps, data)
        _check_resumable(checkpoints.read_state(resume_from), identity, resume_from)
        state = checkpoints.load_checkpoint(resume_from, accelerator, run.unwrapped, optimizer, scheduler)
        run.start_step = state["step"]
    if run.main:
        _prepare_output(config, run.log, run.start_step, resume_from)
        for note in data.notes:
            print(f"deltatune: {note}")
    accelerator.wait_for_everyone()
    return run


def seed_ranks(seed: int, accelerator) -> None:
    """With several processes, each continues from its own seed once the model is built (the same on every rank,
    and made identical by data parallelism anyway): otherwise ranks that see batches of the same shape draw the
    same dropout masks. One process keeps its stream as it is."""
    from accelerate.utils import set_seed

    if accelerator.num_processes > 1:
        set_seed(seed + accelerator.process_index)


def _train_steps(run: Run, step_hook: StepHook | None) -> None:
    from tqdm.auto import tqdm

    config, accelerator = run.config, run.accelerator
    targets = [target_count(e) for e in run.data.train]
    lengths = [len(e["input_ids"]) for e in run.data.train]
    last_checkpoint = run.resumed_from
    bar = tqdm(total=run.total_steps, initial=run.start_step, desc="train", unit="step", disable=not run.main,
               dynamic_ncols=True)
    run.model.train()
    for step in range(run.start_step + 1, run.total_steps + 1):
        if step_hook is not None:
            step_hook(step, run.unwrapped)
        tick = time.perf_counter()
        indices = run.order.step_indices(step - 1)
        loss = _optimizer_step(run.model, accelerator, run.data.train,
                               run.order.micro_batches(step - 1, accelerator.process_index),
                               sum(targets[i] for i in indices), run.tokenizer.pad_token_id)
        if not math.isfinite(loss):
            bar.close()
            raise TrainingStopped(
                f"The training loss is {loss} at step {step}: stopped. The last good checkpoint is "
                f"{last_checkpoint or 'none (none was written yet)'}. Lower the learning rate or check the data, "
                "then start again or --resume from it.")
        if config.max_grad_norm:
            accelerator.clip_grad_norm_(run.model.parameters(), config.max_grad_norm)
        lr = run.optimizer.param_groups[0]["lr"]
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        tokens_per_s = sum(lengths[i] for i in indices) / max(time.perf_counter() - tick, 1e-9)
        if run.main:
            run.log.append({"split": "train", "step": step, "epoch": round(run.order.epoch_of(step), 4),
                            "loss": loss, "lr": lr, "tokens_per_s": round(tokens_per_s, 1)})
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        bar.update()
        if config.eval_steps and step % config.eval_steps == 0 and step != run.total_steps:
            run.evaluate(step)
        if config.save_steps and step % config.save_steps == 0:
            last_checkpoint = checkpoints.save_checkpoint(accelerator, config.output_dir, run.unwrapped,
                                                          run.optimizer, run.scheduler, run.checkpoint_state(step),
                                                          config.save_total_limit, run.data.label_names)
    bar.close()


def _summary(run: Run, before, after, saved_to: str, wall_time: float) -> dict[str, Any]:
    memory, memory_kind = report.peak_memory()
    return {"method": run.config.method,
            "trainable_params": sum(p.numel() for p in run.unwrapped.parameters() if p.requires_grad),
            "total_params": sum(p.numel() for p in run.unwrapped.parameters()),
            "steps": run.total_steps, "epochs": run.total_steps / run.order.steps_per_epoch,
            "wall_time_s": wall_time, "peak_memory_bytes": memory, "peak_memory_kind": memory_kind,
            "quantize": run.config.quantize, "base_weights_bytes": run.base_weights["loaded"],
            "base_weights_full_precision_bytes": run.base_weights["full_precision"],
            "processes": run.accelerator.num_processes, "eval_before": before, "eval_after": after,
            "saved_to": saved_to, "notes": run.data.notes}


def _optimizer_step(model, accelerator, examples: list[dict], micro_batches: list[list[int]], step_targets: int,
                    pad_token_id: int) -> float:
    """Forward and backward over this process's micro-batches; returns the step's loss over all processes."""
    total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    scale = accelerator.num_processes / max(step_targets, 1)  # DDP averages over processes: undo it
    for index, indices in enumerate(micro_batches):
        weight = 1.0 if indices else 0.0  # an empty slice of a partial batch: a placeholder that adds nothing
        batch = collate([examples[i] for i in indices or [0]], pad_token_id)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        last = index == len(micro_batches) - 1
        with nullcontext() if last else accelerator.no_sync(model):
            with accelerator.autocast():
                summed = forward_loss(model, batch)[0] * weight
            accelerator.backward(summed * scale)
        total += summed.detach().double()
    return accelerator.reduce(total, reduction="sum").item() / max(step_targets, 1)


def _prepare_output(config: TrainConfig, log: report.MetricsLog, start_step: int, resume_from: str | None) -> None:
    os.makedirs(config.output_dir, exist_ok=True)
    checkpoints.remove_leftovers(config.output_dir)
    if resume_from:
        log.keep_until(start_step)
    else:
        log.clear()
        checkpoints.rotate(config.output_dir, keep=0)  # old checkpoints are here only with overwrite
    save_config(config, os.path.join(config.output_dir, "train_config.yaml"))


def _logged_eval(log: report.MetricsLog, step: int) -> dict[str, float] | None:
    found = [r for r in log.read() if r["split"] == "eval" and r["step"] == step]
    return {k: v for k, v in found[-1].items() if k not in ("split", "step")} if found else None


def _save_final(run: Run) -> str:
    """output_dir/adapter (peft layout) or, for full fine-tuning, output_dir/model (transformers layout)."""
    full = run.config.method == "full"
    final = os.path.join(run.config.output_dir, "model" if full else "adapter")

    def write(directory: str) -> None:
        run.unwrapped.save_pretrained(directory)
        if full:
            run.tokenizer.save_pretrained(directory)
        else:
            save_label_names(directory, run.data.label_names)

    if run.main:
        checkpoints.write_folder(final, write)
    run.accelerator.wait_for_everyone()
    return final
