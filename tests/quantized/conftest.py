"""A tiny Llama saved to a folder once per session, and loaders that read it back quantized.

bitsandbytes 0.50 runs its 8-bit and 4-bit layers on the CPU, so everything here runs without a GPU. Loading
the same folder with the same config gives bit-identical quantized weights, which the parity tests rely on.
"""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")

# bitsandbytes logs one line per 8-bit matmul on CPU (inputs cast to float16), and transformers a progress bar.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

VOCAB = 128
QUANTIZATIONS = ("8bit", "nf4")


def tiny_llama_config():
    from transformers import LlamaConfig

    # hidden 64: bitsandbytes' CPU 4-bit kernel needs out_features % 32 == 0; every weight splits into 64-blocks.
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(path)
    return path


def bnb_config(quantize: str):
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)


def load(path, quantize: str | None = None):
    """The tiny Llama from `path`, quantized with bitsandbytes ("8bit", "nf4", "fp4") or in float32 (None)."""
    from transformers import AutoModelForCausalLM

    kwargs = {} if quantize is None else {"quantization_config": bnb_config(quantize)}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


def token_batch(seed: int = 1, size: int = 2, length: int = 9) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (size, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def train_losses(model, lr: float, steps: int = 5) -> list[float]:
    """`steps` AdamW steps of `model` on token_batch() (labels = inputs); the loss before each step."""
    inputs = token_batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses
