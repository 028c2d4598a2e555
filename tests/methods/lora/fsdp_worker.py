"""Run by test_dora.py under torchrun (two CPU processes over gloo): trains a tiny Llama with plain LoRA and with
DoRA for three SGD steps, alone and under sharded FSDP, and prints the losses as JSON on rank 0."""

import functools
import json
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

import deltatune


def adapted(use_dora: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                         max_position_embeddings=64, pad_token_id=0))
    config = deltatune.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear", use_dora=use_dora,
                                  init_lora_weights=False)
    return deltatune.get_peft_model(model, config).train()


def losses(model: torch.nn.Module, ids: torch.Tensor) -> list[float]:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    out = []
    for _ in range(3):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out


def main() -> None:
    dist.init_process_group("gloo")
    try:
        ids = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(0))
        policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer})
        results = {}
        for name, use_dora in (("lora", False), ("dora", True)):
            alone = losses(adapted(use_dora), ids)
            model = FullyShardedDataParallel(adapted(use_dora), auto_wrap_policy=policy, use_orig_params=True,
                                             device_id=torch.device("cpu"))
            results[name] = (model.sharding_strategy.name, alone, losses(model, ids))
        if dist.get_rank() == 0:
            print(json.dumps(results), flush=True)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: there, one rank in 10-20 aborts in gloo's destructors
    # ("terminate called without an active exception") after all the work is done.
    os._exit(0)


if __name__ == "__main__":
    main()
