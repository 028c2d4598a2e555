"""The cases of `make bench` (bench/run.py): for each, how to build deltatune's, peft's and the reference model.

Every builder returns a common.Setup whose `step` runs one timed unit (a training step, a forward, a generate())
and whose `check` computes, without randomness, what deltatune and peft must agree on before any ratio is
printed (an eval-mode loss, logits, generated tokens). Both libraries get the same base weights and batch, and
their adapters the same values (`common.seed_adapters`), so they compute the same numbers.

The reference is the plain transformers model, never a PeftModel inside disable_adapter(): for training cases its
frozen step (forward, backward to the input embeddings only; every adapter step pays at least that), for
inference cases its forward, for generation the merged model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import common
import torch

KEYS = ("deltatune", "peft", "reference")


@dataclass(frozen=True)
class Target:
    """ratio(numerator / denominator) of `measure` ("time", or "memory": peak memory above the reference's) must
    be at most `limit`."""

    measure: str
    numerator: str
    denominator: str
    limit: float

    def describe(self) -> str:
        if self.measure == "memory":
            return f"peak memory above the reference, {self.numerator}/{self.denominator} <= {self.limit}"
        return f"time {self.numerator}/{self.denominator} <= {self.limit}"


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    build: Callable[[str, dict[str, Any]], common.Setup]
    targets: tuple[Target, ...] = ()
    # the imports a fresh memory process makes before its RSS baseline (the same for every case)
    extra_imports: tuple[str, ...] = ()
    check_tolerance: float = 1e-4  # max |deltatune - peft| of the check values, relative to their scale
    memory: bool = True  # measure peak memory (fresh processes); off where building is slow and memory is not the point


def _lib(key: str):
    return __import__(key)


def batch_shape(settings: dict[str, Any], cpu: tuple[int, int], gpu: tuple[int, int]) -> tuple[int, int]:
    """(batch, seq): a CPU-sized batch, or a GPU-sized one on a GPU."""
    return cpu if settings["device"] == "cpu" else gpu


# --- training steps ---------------------------------------------------------------------------------------------
def lora_train(model_fn: Callable[[dict[str, Any]], torch.nn.Module], cpu: tuple[int, int], gpu: tuple[int, int],
               **lora: Any):
    """A builder: LoRA `lora` on model_fn(settings), AdamW step on the adapters, batch x seq `cpu` (or `gpu` on a
    GPU); reference: the frozen step."""

    def build(key: str, settings: dict[str, Any]) -> common.Setup:
        device = settings["device"]
        batch, seq = batch_shape(settings, cpu, gpu)
        model = model_fn(settings)
        vocab = model.get_input_embeddings().weight.shape[0]
        inputs = common.to_device(common.batch_inputs(batch, seq, vocab=vocab), device)
        _keep_bnb_differentiable(model)
        if key == "reference":
            return common.frozen_step(model.to(device), inputs)
        lib = _lib(key)
        config = lib.LoraConfig(task_type="CAUSAL_LM", **lora)
        peft_model = lib.get_peft_model(model, config).to(device)
        common.seed_adapters(peft_model)
        return common.adamw_step(peft_model, inputs, sync=common.sync_for(device))

    return build


def _keep_bnb_differentiable(model: torch.nn.Module) -> None:
    """bitsandbytes repacks a CPU 4-bit weight for a faster kernel at its first eval-mode forward (the check runs
    one), and that kernel has no backward: gradients stop at the layer. deltatune turns the repacking off
    (quantized/bnb.py); peft does not, so its timed steps would skip work and train wrongly, and so would the frozen
    reference. All three run the differentiable kernel here."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def prompt_train(settings: dict[str, Any], key: str) -> common.Setup:
    device = settings["device"]
    model = tiny(settings)
    inputs = common.to_device(common.batch_inputs(*batch_shape(settings, (8, 128), (16, 512))), device)
    if key == "reference":
        return common.frozen_step(model.to(device), inputs)
    lib = _lib(key)
    peft_model = lib.get_peft_model(model, lib.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20))
    common.seed_adapters(peft_model.to(device))
    return common.adamw_step(peft_model, inputs, sync=common.sync_for(device))


def smollm2(settings: dict[str, Any]) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from deltatune.embedded import resolve_model

    return AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m-instruct"),
                                                dtype=getattr(torch, settings["dtype"]))


def smollm2_nf4(settings: dict[str, Any]) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from deltatune.embedded import resolve_model

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=getattr(torch, settings["dtype"]))
    device_map = None if settings["device"] == "cpu" else {"": settings["device"]}
    return AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m-instruct"), quantization_config=quant,
                                                dtype=getattr(torch, settings["dtype"]), device_map=device_map)


def tiny(settings: dict[str, Any]) -> torch.nn.Module:
    return common.tiny_llama().to(getattr(torch, settings["dtype"]))


# --- inference -------------------------------------------------------------------------------------------------
ADAPTERS = [f"a{i}" for i in range(8)]


def _with_adapters(lib, names: list[str], settings: dict[str, Any]) -> torch.nn.Module:
    model = None
    for name in names:
        config = lib.LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules="all-linear")
        if model is None:
            model = lib.get_peft_model(tiny(settings), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    common.seed_adapters(model)
    model.set_adapter(names[0])
    return model.eval()


def forward_case(mixed: bool):
    """A builder: no-grad forwards of batch 8 x 128, one unmerged adapter (or row i with adapter i of 8)."""

    def build(key: str, settings: dict[str, Any]) -> common.Setup:
        device = settings["device"]
        ids = common.batch_inputs(*batch_shape(settings, (8, 128), (8, 512)))["input_ids"].to(device)
        sync = common.sync_for(device)
        if key == "reference":
            model = tiny(settings).eval().to(device)
            kwargs: dict[str, Any] = {}
        else:
            model = _with_adapters(_lib(key), ADAPTERS if mixed else ADAPTERS[:1], settings).to(device)
            kwargs = {"adapter_names": ADAPTERS} if mixed else {}

        def step() -> torch.Tensor:
            with torch.no_grad():
                logits = model(input_ids=ids, **kwargs).logits
            sync()
            return logits

        return common.Setup(model, step, [], None, check=step)

    return build


def generate_case(key: str, settings: dict[str, Any]) -> common.Setup:
    """generate() of 32 new tokens (greedy, KV cache) for one prompt on SmolLM2 with an unmerged r=16 adapter;
    the reference is the same adapter merged into the weights (merge_and_unload)."""
    device = settings["device"]
    lib = _lib("peft" if key == "peft" else "deltatune")
    config = lib.LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules="all-linear")
    model = lib.get_peft_model(smollm2(settings), config)
    common.seed_adapters(model)
    model = model.eval().to(device)
    if key == "reference":
        model = model.merge_and_unload()
    ids = common.batch_inputs(1, 24, vocab=model.get_input_embeddings().weight.shape[0])["input_ids"].to(device)
    sync = common.sync_for(device)
    new_tokens = 32

    def step() -> torch.Tensor:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        sync()
        return out

    return common.Setup(model, step, [], None, check=lambda: step().float(), per_step=new_tokens)


TINY_SHAPES = {"cpu": (8, 128), "gpu": (16, 512)}


def compiled_train(key: str, settings: dict[str, Any]) -> common.Setup:
    """The tiny LoRA step under torch.compile (Module.compile, as `deltatune train --compile`): deltatune's and peft's
    compiled; the reference is deltatune's eager step. The first step, which compiles, is a warm-up round."""
    device = settings["device"]
    lib = _lib("peft" if key == "peft" else "deltatune")
    model = lib.get_peft_model(tiny(settings), lib.LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32,
                                                              lora_dropout=0.0, target_modules="all-linear"))
    common.seed_adapters(model)
    model.to(device)
    if key != "reference":
        model.compile()
    inputs = common.to_device(common.batch_inputs(*batch_shape(settings, (8, 128), (16, 512))), device)
    return common.adamw_step(model, inputs, sync=common.sync_for(device))


CASES: dict[str, Case] = {case.name: case for case in (
    Case("tiny-lora", "Tiny Llama (4 x 512), LoRA r=16 all-linear, dropout 0, batch 8 x 128: training step",
         lora_train(tiny, **TINY_SHAPES, r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"),
         (Target("time", "deltatune", "reference", 1.06),)),
    Case("tiny-lora-dropout", "The same with lora_dropout=0.05",
         lora_train(tiny, **TINY_SHAPES, r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"),
         (Target("time", "deltatune", "reference", 1.15),)),
    Case("smollm2-course", "SmolLM2-135M-Instruct, the course's recipe (r=6, alpha 8, dropout 0.05, all-linear), "
         "batch 4 x 128: training step",
         lora_train(smollm2, (4, 128), (8, 512), r=6, lora_alpha=8, lora_dropout=0.05, target_modules="all-linear"),
         (Target("time", "deltatune", "peft", 0.72), Target("memory", "deltatune", "peft", 0.5))),
    Case("dora", "Tiny Llama, DoRA r=16 all-linear, batch 8 x 128: training step",
         lora_train(tiny, **TINY_SHAPES, r=16, lora_alpha=32, target_modules="all-linear", use_dora=True)),
    Case("qlora-nf4", "SmolLM2-135M-Instruct in bitsandbytes NF4, LoRA r=16 all-linear, batch 2 x 64: training step",
         lora_train(smollm2_nf4, (2, 64), (8, 512), r=16, lora_alpha=32, target_modules="all-linear"),
         extra_imports=("bitsandbytes",), check_tolerance=1e-3),
    Case("prompt-tuning", "Tiny Llama, prompt tuning (20 virtual tokens), batch 8 x 128: training step",
         lambda key, settings: prompt_train(settings, key)),
    Case("inference", "Tiny Llama, one unmerged LoRA r=16 adapter, batch 8 x 128: no-grad forward",
         forward_case(mixed=False), (Target("time", "deltatune", "reference", 1.04),)),
    Case("mixed-8", "Tiny Llama, 8 LoRA adapters, row i with adapter i (adapter_names), batch 8 x 128: forward",
         forward_case(mixed=True), (Target("time", "deltatune", "reference", 1.10),)),
    Case("generate", "SmolLM2-135M-Instruct, generate() 32 tokens, one unmerged LoRA r=16 (reference: merged)",
         generate_case),
    Case("compile", "Tiny Llama, LoRA r=16 all-linear, dropout 0: the training step compiled (torch.compile), "
         "against deltatune's eager step as the reference", compiled_train,
         (Target("time", "deltatune", "reference", 1.0),), memory=False),
)}
