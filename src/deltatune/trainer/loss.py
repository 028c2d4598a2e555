"""The training objective as a sum over target tokens, so that any split of a batch adds up to the same gradient.

Token-mean losses computed per micro-batch or per process and then averaged weight short and long examples
differently depending on how the batch was cut; a sum divided by the whole batch's target count does not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, number of targets) of a causal LM (next token) or a classifier (labels: [batch])."""
    if labels.dim() == 1:
        return F.cross_entropy(logits.float(), labels, reduction="sum"), torch.tensor(labels.numel())
    logits = logits[:, -labels.shape[1]:]  # prompt tuning and P-tuning put virtual-token positions first
    targets = labels[:, 1:]
    total = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                            ignore_index=IGNORE, reduction="sum")
    return total, (targets != IGNORE).sum()


def target_count(example: dict) -> int:
    """How many targets one example adds to loss_sum's count (known before any forward pass)."""
    labels = example["labels"]
    if isinstance(labels, int):
        return 1
    return sum(1 for label in labels[1:] if label != IGNORE)


def forward_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
