"""prepare_model_for_kbit_training: frozen, upcast where it matters, checkpointing on; then LoRA trains."""

from __future__ import annotations

import pytest
import torch
from bitsandbytes.nn import Linear4bit
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM

import deltatune

from .conftest import VOCAB, tiny_llama_config, token_batch

LORA = {"task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"}


@pytest.fixture(scope="module")
def bf16_dirs(tmp_path_factory):
    """The tiny Llama saved in bfloat16, with untied and with tied embeddings."""
    dirs = {}
    for tie in (False, True):
        torch.manual_seed(0)
        config = tiny_llama_config()
        config.tie_word_embeddings = tie
        path = tmp_path_factory.mktemp(f"bf16-tied-{tie}")
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
        dirs[tie] = path
    return dirs


def load_4bit_bf16(path):
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=config)


def checkpointing_on(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_freezes_and_upcasts_norms_and_head_but_not_untied_embeddings(bf16_dirs):
    model = load_4bit_bf16(bf16_dirs[False])
    packed = model.model.layers[0].self_attn.q_proj.weight
    out = deltatune.prepare_model_for_kbit_training(model)
    assert out is model
    assert not any(p.requires_grad for p in model.parameters())
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # peft upcasts it too; it needs no float32
    assert model.model.layers[0].self_attn.q_proj.weight is packed  # quantized layers are left alone
    assert checkpointing_on(model)


def test_a_tied_input_embedding_is_upcast_with_the_head(bf16_dirs):
    model = deltatune.prepare_model_for_kbit_training(load_4bit_bf16(bf16_dirs[True]))
    assert model.model.embed_tokens.weight is model.lm_head.weight
    assert model.lm_head.weight.dtype == torch.float32


def checkpoint_kwargs(model) -> dict:
    return next(m._gradient_checkpointing_func.keywords for m in model.modules()
                if getattr(m, "gradient_checkpointing", False))


def test_checkpointing_is_reentrant_unless_asked_otherwise(bf16_dirs):
    # bitsandbytes' 8-bit matmul keeps its input outside saved tensors: only reentrant checkpointing drops it.
    default = deltatune.prepare_model_for_kbit_training(load_4bit_bf16(bf16_dirs[False]))
    assert checkpoint_kwargs(default) == {"use_reentrant": True}
    chosen = deltatune.prepare_model_for_kbit_training(load_4bit_bf16(bf16_dirs[False]),
                                                       gradient_checkpointing_kwargs={"use_reentrant": False})
    assert checkpoint_kwargs(chosen) == {"use_reentrant": False}


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": False}])
def test_lora_trains_on_a_prepared_4bit_bf16_model(bf16_dirs, kwargs):
    base = deltatune.prepare_model_for_kbit_training(load_4bit_bf16(bf16_dirs[False]),
                                                     gradient_checkpointing_kwargs=kwargs)
    model = deltatune.get_peft_model(base, deltatune.LoraConfig(**LORA))
    assert isinstance(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer, Linear4bit)
    inputs = token_batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        first = model.get_base_model().model.layers[0].self_attn.q_proj.lora_B["default"].weight
        assert first.grad is not None and first.grad.abs().sum() > 0  # through the checkpointed first layer
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert model(**inputs).logits.shape == (2, 9, VOCAB)


def test_without_checkpointing_and_on_plain_modules():
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)).to(torch.float16)
    deltatune.prepare_model_for_kbit_training(plain, use_gradient_checkpointing=False)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in plain.parameters())
    with pytest.raises(TypeError, match="use_gradient_checkpointing=False"):
        deltatune.prepare_model_for_kbit_training(plain)


@pytest.mark.parametrize(("when", "prepare"), [("after", False), ("before", True)])
def test_an_evaluation_pass_does_not_stop_4bit_gradients(tiny_llama_dir, when, prepare):
    """bitsandbytes repacks a 4-bit weight for its CPU kernel at an eval-mode no-grad forward (on CPUs with
    AVX512-BF16), and that kernel has no backward: later training got no gradient through the frozen layers.
    An evaluation after get_peft_model no longer repacks; one before it is undone (its scales stay rounded to
    bfloat16, hence the tolerance)."""
    from .conftest import load

    inputs = token_batch()

    def gradients(evaluate: str | None) -> dict[str, torch.Tensor]:
        base = load(tiny_llama_dir, "nf4")
        if evaluate == "before":
            with torch.no_grad():
                base(**inputs)
        if prepare:
            base = deltatune.prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        torch.manual_seed(0)
        config = deltatune.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
        model = deltatune.get_peft_model(base, config)
        if evaluate == "after":
            model.eval()
            with torch.no_grad():
                model(**inputs)
        model.train()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    expected, got = gradients(None), gradients(when)
    tolerance = {} if when == "after" else {"rtol": 1e-2, "atol": 1e-4}
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, msg=name, **tolerance)
