"""A tiny model folder (Llama config + byte-level BPE tokenizer with a chat template) and tiny data files."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [f"What is {a} plus {b}? {a + b}. <|user|> <|assistant|> hi" for a in range(10) for b in range(10)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model_folder(path: str) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


def addition_rows(n: int = 24) -> list[dict]:
    return [{"prompt": f"What is {i % 7} plus {i % 5}?", "completion": str(i % 7 + i % 5)} for i in range(n)]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide state that refuses a second Accelerator with other settings (tests
    elsewhere make their own); every run here starts from none, as a new `deltatune` process does."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return build_model_folder(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def train_file(tmp_path_factory) -> str:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", addition_rows())


@pytest.fixture(scope="session")
def classification_file(tmp_path_factory) -> str:
    rows = [{"text": f"{'great fun' if i % 2 else 'dull and slow'} number {i}", "label": "pos" if i % 2 else "neg"}
            for i in range(16)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "cls.jsonl", rows)


def adapter_tensors(folder: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], *, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=lambda text, key=key: f"{key}: {text}")
