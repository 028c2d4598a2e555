"""LoRA+: parameter groups and learning rates as peft's, and training steps that match peft's."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from conftest import ARCHS, inputs_for, lora_kwargs, max_diff
from peft.optimizers import create_loraplus_optimizer as peft_loraplus

import deltatune

LR, RATIO, LR_EMBEDDING = 1e-3, 16.0, 5e-5
CASES = {
    # name: (arch, LoraConfig overrides): LoRA on embeddings, modules_to_save with 2-D / 1-D / norm parameters
    "llama-embedding-head-norm": ("llama", {"target_modules": ["q_proj", "v_proj", "embed_tokens"],
                                            "modules_to_save": ["lm_head", "model.norm"]}),
    "gpt2-bias-all-layernorm": ("gpt2", {"bias": "all", "modules_to_save": ["ln_f"]}),
    "bert-classifier-lora-only-bias": ("bert", {"bias": "lora_only"}),
}


def ours_and_peft(case: str):
    arch, overrides = CASES[case]
    kwargs = lora_kwargs(arch, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(ARCHS[arch][0](), peft.LoraConfig(**kwargs))
        ours = deltatune.get_peft_model(ARCHS[arch][0](), deltatune.LoraConfig(**kwargs))
        deltatune.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    return ours, theirs


def named_groups(model, optimizer) -> list[tuple[list[str], float, float]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [(sorted(names[id(p)] for p in g["params"]), g["lr"], g["weight_decay"]) for g in optimizer.param_groups]


@pytest.mark.parametrize("case", list(CASES))
def test_groups_and_learning_rates_equal_peft(case):
    ours, theirs = ours_and_peft(case)
    kwargs = {"lr": LR, "loraplus_lr_ratio": RATIO, "loraplus_lr_embedding": LR_EMBEDDING,
              "loraplus_weight_decay": 0.1}
    got = named_groups(ours, deltatune.create_loraplus_optimizer(ours, torch.optim.AdamW, **kwargs))
    expected = named_groups(theirs, peft_loraplus(theirs, torch.optim.AdamW, **kwargs))
    assert got == expected
    (a, _, _), (embedding, lr_embedding, _), (b, lr_b, _), (b_no_decay, _, decay) = got
    assert all(".lora_A." in n or "modules_to_save" in n for n in a)
    assert all(".lora_B." in n or "modules_to_save" in n for n in b)
    assert (lr_embedding, lr_b, decay) == (LR_EMBEDDING, LR * RATIO, 0.0)
    if case.startswith("llama"):
        assert embedding and all("lora_embedding" in n for n in embedding)
    else:
        assert b_no_decay and all(n.endswith("bias") or ".ln_f." in n for n in b_no_decay)


def _step(model, optimizer, inputs, steps: int = 2):
    model.eval()  # no dropout: both libraries see the same function
    for _ in range(steps):
        out = model(**inputs)
        loss = out.logits.float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("case", list(CASES))
def test_training_steps_equal_peft(case):
    ours, theirs = ours_and_peft(case)
    inputs = inputs_for(CASES[case][0])
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    kwargs = {"lr": LR, "loraplus_lr_ratio": RATIO, "loraplus_lr_embedding": LR_EMBEDDING, "betas": (0.8, 0.9)}
    _step(ours, deltatune.create_loraplus_optimizer(ours, torch.optim.AdamW, **kwargs), inputs)
    _step(theirs, peft_loraplus(theirs, torch.optim.AdamW, **kwargs), inputs)
    mine = dict(ours.named_parameters())
    for name, param in theirs.named_parameters():
        if param.requires_grad:
            assert max_diff(mine[name], param) < 1e-5, name
    # Adam's steps are about lr in size: B factors move RATIO times farther than A factors.
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in mine.items() if n in before}
    a_moves = [v for n, v in moved.items() if ".lora_A." in n]
    b_moves = [v for n, v in moved.items() if ".lora_B." in n]
    assert min(b_moves) > 4 * max(a_moves)


def test_optimizer_keywords_reach_the_optimizer():
    ours, _ = ours_and_peft("gpt2-bias-all-layernorm")
    optimizer = deltatune.create_loraplus_optimizer(ours, torch.optim.SGD, lr=0.1, loraplus_lr_ratio=4, momentum=0.5)
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 1e-6, 0.4, 0.4]
    assert all(g["momentum"] == 0.5 for g in optimizer.param_groups)


def test_bad_ratio_and_frozen_model_are_refused():
    ours, _ = ours_and_peft("gpt2-bias-all-layernorm")
    with pytest.raises(ValueError, match="loraplus_lr_ratio must be positive"):
        deltatune.create_loraplus_optimizer(ours, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=0)
    ours.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        deltatune.create_loraplus_optimizer(ours, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)


def test_parameters_under_a_module_named_like_bias_take_no_decay_as_in_peft():
    from torch import nn

    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))  # 1-D: LoRA+ puts it beside the B factors

        def forward(self, x):
            return x * self.scale

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.body = nn.Linear(4, 4)
            self.bias_gate = Gate()  # "bias" in the full name: no weight decay, for peft and transformers

        def forward(self, x):
            return self.bias_gate(self.body(x))

    kwargs = {"target_modules": ["body"], "modules_to_save": ["bias_gate"], "r": 2}
    groups = []
    for lib, make in ((deltatune, deltatune.create_loraplus_optimizer), (peft, peft_loraplus)):
        model = lib.get_peft_model(Net(), lib.LoraConfig(**kwargs))
        optimizer = make(model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO, loraplus_weight_decay=0.1)
        groups.append(sorted(named_groups(model, optimizer)))
    assert groups[0] == groups[1]
