"""Generating answers for a batch of prompts, shared by evaluation and `deltatune generate`.

Prompts go through the data layer's `encode_prompt`, so the model sees exactly the tokens that preceded the
answers during training, and generation stops at the tokens that ended them (`stop_token_ids`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from deltatune.data import collate, encode_prompt, stop_token_ids

Prompt = str | Sequence[Mapping]  # a plain prompt, or chat messages


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence[Prompt], max_new_tokens: int,
                     max_length: int | None = None, **generate_kwargs: Any) -> list[str]:
    """The text generated after each prompt (new tokens only, special tokens dropped); greedy unless told.

    With `max_length` (the run's longest example), a prompt keeps only its last max_length - max_new_tokens tokens
    (at least one), so that prompt and answer fit as they did in training, and in a model's position table."""
    if not prompts:
        return []
    device = next(model.parameters()).device
    keep = max(max_length - max_new_tokens, 1) if max_length else None
    encoded = [{"input_ids": encode_prompt(tokenizer, prompt)[-keep:] if keep else encode_prompt(tokenizer, prompt)}
               for prompt in prompts]
    batch = collate(encoded, tokenizer.pad_token_id, padding_side="left")
    generate_kwargs.setdefault("do_sample", False)
    output = model.generate(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                            max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=stop_token_ids(tokenizer), **generate_kwargs)
    return tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
