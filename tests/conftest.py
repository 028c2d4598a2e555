"""Tiny models built from configs (random weights, offline) shared by the tests."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

# Tiny matrices gain nothing from intra-op threads, and spinning worker threads make a 2-core run ~10x slower.
torch.set_num_threads(1)


def tiny_llama(seed: int = 0, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=tie,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def tiny_bert(seed: int = 0, num_labels: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=128, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(config).eval()


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=4,
                      vocab_size=128, decoder_start_token_id=0, pad_token_id=0)
    return T5ForConditionalGeneration(config).eval()


def batch(seed: int = 1, size: int = 2, length: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (size, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded row
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture
def llama():
    return tiny_llama()


# --- shared by the LoRA tests -------------------------------------------------------------------
ARCHS = {
    # name: (factory, task_type, two target module names, extra LoraConfig kwargs)
    "llama": (tiny_llama, "CAUSAL_LM", ("q_proj", "v_proj"), {}),
    "gpt2": (tiny_gpt2, "CAUSAL_LM", ("c_attn", "c_proj"), {"fan_in_fan_out": True}),
    "bert": (tiny_bert, "SEQ_CLS", ("query", "value"), {}),
    "t5": (tiny_t5, "SEQ_2_SEQ_LM", ("q", "v"), {}),
}


def inputs_for(arch: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """A batch the architecture's forward accepts (T5 also needs decoder inputs)."""
    inputs = batch(seed)
    if arch == "t5":
        inputs["decoder_input_ids"] = batch(seed + 1, length=5)["input_ids"]
    return inputs


def lora_kwargs(arch: str, **overrides) -> dict:
    """LoraConfig kwargs, the same for deltatune and peft: non-zero B so the adapter changes the output."""
    _, task_type, targets, extra = ARCHS[arch]
    kwargs = {"task_type": task_type, "target_modules": list(targets), "r": 4, "lora_alpha": 8,
              "init_lora_weights": False, **extra}
    kwargs.update(overrides)
    return kwargs


def logits(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def perturb_trainable(model, seed: int = 0, scale: float = 0.1) -> None:
    """Move every trainable parameter (LoRA factors, modules_to_save copies, biases) away from its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g).to(param.dtype) * scale)


# --- embedded real models (src/deltatune/embedded.py) ---------------------------------------------------------
@pytest.fixture(scope="session")
def embedded_cache():
    """One deltatune cache for the whole session, exported as $DELTATUNE_CACHE so that code under test (and CLI
    subprocesses) finds the models prepared here: each real model is downloaded and converted once per session.
    Set DELTATUNE_TEST_CACHE to a folder to keep the prepared models between sessions."""
    import shutil
    import tempfile
    from pathlib import Path

    kept = os.environ.get("DELTATUNE_TEST_CACHE")
    path = Path(kept) if kept else Path(tempfile.mkdtemp(prefix="deltatune-cache-"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DELTATUNE_CACHE", str(path))
        yield path
    if not kept:
        shutil.rmtree(path, ignore_errors=True)  # ~0.6 GB: not left for pytest's tmp rotation


@pytest.fixture(scope="session")
def prepared_smollm2(embedded_cache):
    """The folder of the real SmolLM2-135M-Instruct (safetensors, tokenizer, chat template), prepared once."""
    from deltatune.embedded import prepare

    return prepare("smollm2-135m-instruct", cache_dir=embedded_cache)


@pytest.fixture(scope="session")
def prepared_minilm(embedded_cache):
    """The folder of the real all-MiniLM-L6-v2 BERT encoder, prepared once."""
    from deltatune.embedded import prepare

    return prepare("all-minilm-l6-v2", cache_dir=embedded_cache)
