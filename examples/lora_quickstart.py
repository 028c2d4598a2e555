"""A short LoRA run end to end, offline, in about a minute on a laptop CPU.

It builds a small Llama from a config (random weights), teaches it with LoRA to continue a fixed
pattern, and shows what a user of the library does next: save the adapter, load it back (with deltatune
and, when installed, with peft), merge it, and switch it off.
"""

from __future__ import annotations

import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from deltatune import LoraConfig, PeftModel, get_peft_model


def build_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def pattern_batch(batch: int = 16, length: int = 32) -> torch.Tensor:
    """Sequences that count upwards modulo 50 from a random start: easy to learn, impossible to guess."""
    start = torch.randint(0, 50, (batch, 1))
    return (start + torch.arange(length)) % 50 + 1


def next_token_accuracy(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        predicted = model(input_ids=ids).logits[:, :-1].argmax(-1)
    return (predicted == ids[:, 1:]).float().mean().item()


def main() -> None:
    torch.manual_seed(0)
    config = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules="all-linear")
    model = get_peft_model(build_model(), config)
    model.print_trainable_parameters()

    held_out = pattern_batch(64)
    print(f"next-token accuracy before: {next_token_accuracy(model, held_out):.1%}")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    start = time.perf_counter()
    for step in range(1, 101):
        ids = pattern_batch()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 25 == 0:
            print(f"step {step:3d}  loss {loss.item():.3f}")
    model.eval()
    print(f"trained 100 steps in {time.perf_counter() - start:.1f}s")
    accuracy = next_token_accuracy(model, held_out)
    print(f"next-token accuracy after:  {accuracy:.1%}")
    with model.disable_adapter():
        print(f"with the adapter disabled: {next_token_accuracy(model, held_out):.1%}")

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        reloaded = PeftModel.from_pretrained(build_model(), folder)
        print(f"reloaded with deltatune:   {next_token_accuracy(reloaded, held_out):.1%}")
        try:
            import peft
        except ImportError:
            pass
        else:
            other = peft.PeftModel.from_pretrained(build_model(), folder)
            print(f"reloaded with peft:        {next_token_accuracy(other, held_out):.1%}")
    merged = model.merge_and_unload()
    print(f"merged into the base:      {next_token_accuracy(merged, held_out):.1%} ({type(merged).__name__})")


if __name__ == "__main__":
    main()
