"""The prompt table: one trainable vector per virtual token, and its initialisations."""

from __future__ import annotations

import math

import torch
from torch import nn

from deltatune.methods.prompt_tuning.config import PromptTuningConfig


class PromptEmbedding(nn.Module):
    """A table of virtual token vectors. Every prompt method loads its saved table into this form."""

    is_table = True  # checkpoint loading copies a saved table only into this form

    def __init__(self, num_rows: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_rows, dim)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


def init_token_ids(config: PromptTuningConfig, vocab_size: int) -> torch.Tensor | None:
    total = config.total_virtual_tokens
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        return torch.randint(0, vocab_size, (total,))
    if config.prompt_tuning_init != "TEXT":
        return None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **(config.tokenizer_kwargs or {}))
    except Exception as err:
        raise ValueError(
            f"Could not load a tokenizer from tokenizer_name_or_path={config.tokenizer_name_or_path!r} ({err}). "
            "Pass the folder of the base model's tokenizer."
        ) from err
    ids = tokenizer(config.prompt_tuning_init_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("prompt_tuning_init_text tokenises to nothing; give a non-empty text.")
    ids = (ids * math.ceil(total / len(ids)))[:total]  # repeat a short text, cut a long one
    return torch.tensor(ids, dtype=torch.long)


def create_prompt_embedding(config: PromptTuningConfig, word_embeddings: nn.Module, table_only: bool) -> nn.Module:
    encoder = PromptEmbedding(config.total_virtual_tokens, config.token_dim)
    if table_only:
        return encoder
    ids = init_token_ids(config, word_embeddings.weight.shape[0])
    if ids is not None:
        with torch.no_grad():
            vectors = word_embeddings(ids.to(word_embeddings.weight.device)).detach().float()
        encoder.embedding.weight = nn.Parameter(vectors.clone())
    return encoder
