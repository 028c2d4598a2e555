"""P-tuning's reparameterisation: virtual tokens = MLP(embeddings) or MLP(BiLSTM(embeddings))."""

from __future__ import annotations

import torch
from torch import nn

from deltatune.methods.p_tuning.config import PromptEncoderConfig
from deltatune.methods.prompt_tuning.encoder import PromptEmbedding


class PromptEncoder(nn.Module):
    """Module names (embedding, lstm_head, mlp_head) follow peft's so state dicts line up."""

    def __init__(self, config: PromptEncoderConfig) -> None:
        super().__init__()
        dim, hidden = config.token_dim, config.encoder_hidden_size
        self.embedding = nn.Embedding(config.total_virtual_tokens, dim)
        self.lstm_head: nn.LSTM | None = None
        if config.encoder_reparameterization_type == "LSTM":
            self.lstm_head = nn.LSTM(
                dim, hidden, num_layers=config.encoder_num_layers, dropout=config.encoder_dropout,
                bidirectional=True, batch_first=True,
            )
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            self.mlp_head = nn.Sequential(
                nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim)
            )

    def forward(self) -> torch.Tensor:
        h = self.embedding.weight
        if self.lstm_head is not None:
            h = self.lstm_head(h.unsqueeze(0))[0].squeeze(0)
        return self.mlp_head(h)


def create_prompt_encoder(config: PromptEncoderConfig, word_embeddings: nn.Module, table_only: bool) -> nn.Module:
    if table_only:
        return PromptEmbedding(config.total_virtual_tokens, config.token_dim)
    return PromptEncoder(config)
