"""The real SmolLM2-135M-Instruct in 4-bit NF4 on CPU: QLoRA trains. Slow: about 15 s once the model is prepared."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

import deltatune
from deltatune.quantized.loading import load_base_model, model_memory_bytes

TEXT = [
    "The capital of France is Paris. It is famous for the Eiffel Tower and its museums.",
    "Water boils at one hundred degrees Celsius at sea level, and freezes at zero degrees.",
]


@pytest.mark.slow
def test_smollm2_trains_in_4bit_on_cpu(prepared_smollm2):
    lines = []
    base = load_base_model(str(prepared_smollm2), "nf4", report=lines.append)
    assert model_memory_bytes(base) < 0.5 * model_memory_bytes(base, full_precision=True)
    assert "4-bit nf4" in lines[0]
    base = deltatune.prepare_model_for_kbit_training(base)
    tokenizer = AutoTokenizer.from_pretrained(prepared_smollm2)
    batch = tokenizer(TEXT, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    torch.manual_seed(0)
    model = deltatune.get_peft_model(base, deltatune.LoraConfig(
        task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[0] < 5.0  # a working language model (random weights: about ln(49152) = 10.8)
    assert losses[-1] < losses[0]
