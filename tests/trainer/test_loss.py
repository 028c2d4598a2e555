"""forward_loss: the output head only where a target is predicted gives the full-logits loss."""

from __future__ import annotations

import torch
from conftest import tiny_llama

import deltatune
from deltatune.trainer.loss import IGNORE, forward_logits, forward_loss, loss_sum


def masked_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 128, (3, 9), generator=g)
    labels = ids.clone()
    labels[:, :5] = IGNORE  # the prompt
    labels[1, 7:] = IGNORE  # a shorter answer
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_loss_with_the_head_only_at_target_positions_equals_the_full_one():
    batch = masked_batch()
    for model in (tiny_llama(), deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(
            r=4, lora_alpha=8, init_lora_weights=False, target_modules="all-linear", task_type="CAUSAL_LM"))):
        total, count, logits = forward_loss(model, batch)
        expected_total, expected_count = loss_sum(forward_logits(model, batch), batch["labels"])
        assert logits.shape[1] == 4  # positions 4 .. 7 predict tokens 5 .. 8, the only targets
        assert count == expected_count == 3 * 4 - 2
        torch.testing.assert_close(total, expected_total, rtol=1e-5, atol=1e-5)


def test_prompt_tuning_keeps_every_position():
    """Virtual tokens sit in front of the input, so positions are not the input's: the full logits are used."""
    model = deltatune.get_peft_model(tiny_llama(), deltatune.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                                num_virtual_tokens=3))
    batch = masked_batch()
    total, _, logits = forward_loss(model, batch)
    assert logits.shape[1] == 3 + 9
    torch.testing.assert_close(total, loss_sum(forward_logits(model, batch), batch["labels"])[0])
