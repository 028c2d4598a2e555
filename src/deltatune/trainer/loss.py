"""The training objective as a sum over target tokens, so that any split of a batch adds up to the same gradient.

Token-mean losses computed per micro-batch or per process and then averaged weight short and long examples
differently depending on how the batch was cut; a sum divided by the whole batch's target count does not.
"""

from __future__ import annotations

import inspect

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


def forward_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, number of targets, logits) of one batch, as loss_sum(forward_logits(...)) gives them.

    A causal LM's output head runs only at the positions that predict a target (`logits_to_keep`, where the model's
    forward takes it): with the prompt masked out, most positions predict nothing, and the head (a vocabulary-wide
    product, a fifth of a small model's work) and its vocabulary-wide logits are the largest tensors of a step. The
    logits returned are then those positions' only."""
    labels = batch["labels"]
    if labels.dim() == 1 or not _keeps_positions(model):
        logits = forward_logits(model, batch)
        return (*loss_sum(logits, labels), logits)
    targets = labels[:, 1:]
    wanted = targets != IGNORE
    positions = wanted.any(0).nonzero().view(-1)  # position t predicts token t + 1
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=positions).logits
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets[:, positions].reshape(-1),
                            ignore_index=IGNORE, reduction="sum")
    return total, wanted.sum(), logits


def _keeps_positions(model) -> bool:
    """Whether the model's forward takes logits_to_keep with positions that are the input's own: not where a prompt
    adapter puts virtual tokens in front of them."""
    model = getattr(model, "module", model)  # DDP
    if getattr(model, "_prompt_active", False):
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters
