"""The prefix table: num_layers * 2 key/value vectors per virtual token."""

from __future__ import annotations

import torch
from torch import nn

from deltatune.methods.prefix_tuning.config import PrefixTuningConfig
from deltatune.methods.prompt_tuning.encoder import PromptEmbedding


class PrefixEncoder(nn.Module):
    """With prefix_projection the table is an MLP of smaller embeddings (more stable training)."""

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__()
        out_dim = config.num_layers * 2 * config.token_dim
        self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
        self.transform = nn.Sequential(
            nn.Linear(config.token_dim, config.encoder_hidden_size),
            nn.Tanh(),
            nn.Linear(config.encoder_hidden_size, out_dim),
        )
        if config.init_weights == "zero":
            nn.init.zeros_(self.transform[-1].weight)
            nn.init.zeros_(self.transform[-1].bias)

    def forward(self) -> torch.Tensor:
        return self.transform(self.embedding.weight)


def create_prefix_encoder(config: PrefixTuningConfig, word_embeddings: nn.Module, table_only: bool) -> nn.Module:
    if config.prefix_projection and not table_only:
        return PrefixEncoder(config)
    table = PromptEmbedding(config.num_virtual_tokens, config.num_layers * 2 * config.token_dim)
    if config.init_weights == "zero":
        nn.init.zeros_(table.embedding.weight)
    return table
