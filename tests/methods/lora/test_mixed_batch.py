"""Mixed-adapter batches (adapter_names): each row matches running that row alone with its adapter."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import tiny_bert, tiny_llama, tiny_t5
from transformers import ViTConfig, ViTForImageClassification

import deltatune
from deltatune.mixed_batch import BASE

ADAPTERS = {"a": dict(r=4, lora_alpha=8), "b": dict(r=8, lora_alpha=4), "c": dict(r=2, lora_alpha=2)}


def perturbed(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)


def mixed_model(task_type: str | None = "CAUSAL_LM") -> deltatune.PeftModel:
    model = None
    for i, (name, kwargs) in enumerate(ADAPTERS.items()):
        targets = ["q_proj", "v_proj"] if name != "c" else ["down_proj"]  # c adapts other layers than a and b
        config = deltatune.LoraConfig(task_type=task_type, target_modules=targets, **kwargs)
        if model is None:
            model = deltatune.get_peft_model(tiny_llama(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        perturbed(model, seed=i)  # reseeds B of every adapter; differing seeds keep adapters distinct
    return model.eval()


def alone(model: deltatune.PeftModel, name: str, fn):
    if name == BASE:
        with model.disable_adapter():
            return fn()
    model.set_adapter(name)
    return fn()


ROWS = ["a", BASE, "b", "c", "a", "b"]


def test_rows_match_single_adapter_runs():
    model = mixed_model()
    ids = torch.randint(1, 128, (len(ROWS), 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=ROWS).logits
        for i, name in enumerate(ROWS):
            expected = alone(model, name, lambda i=i: model(input_ids=ids[i:i + 1]).logits)
            torch.testing.assert_close(mixed[i:i + 1], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed[0], mixed[1])  # the adapters do change the output


def test_stacks_are_cached_and_rebuilt_after_weights_change():
    model = mixed_model()
    ids = torch.randint(1, 128, (3, 5))
    with torch.no_grad():
        model(ids, adapter_names=["a", "b", BASE])
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        first = layer._mixed_cache.value[0]
        model(ids, adapter_names=["a", "b", BASE])
        assert layer._mixed_cache.value[0] is first
        model(ids, adapter_names=["c", BASE, "c"])  # another mix of the loaded adapters: same stacks
        assert layer._mixed_cache.value[0] is first
        layer.lora_B["a"].weight.mul_(2)  # an in-place update (an optimizer step) bumps the version
        out = model(ids, adapter_names=["a", "b", BASE]).logits
        assert layer._mixed_cache.value[0] is not first
        model.set_adapter("a")
        torch.testing.assert_close(out[:1], model(ids[:1]).logits, atol=1e-5, rtol=1e-5)


def test_stacks_follow_an_adapter_deleted_and_reloaded_under_its_name(tmp_path):
    """A serving loop: the new adapter's factors (same shapes) may land at the freed addresses with equal version
    counters, so addresses and versions alone cannot tell the old stacks from the new."""
    model = mixed_model()
    ids = torch.randint(1, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    expected = []
    with torch.no_grad():
        for version in range(2):
            perturbed(model, seed=10 + version)
            model.save_pretrained(tmp_path / str(version), selected_adapters=["a"])
            expected.append(alone(model, "a", lambda: model(ids).logits))
        for step in range(40):
            if "x" in model.peft_config:
                model.delete_adapter("x")
            model.load_adapter(tmp_path / str(step % 2) / "a", adapter_name="x")
            mixed = model(ids, adapter_names=["x", "x"]).logits
            torch.testing.assert_close(mixed, expected[step % 2], atol=1e-5, rtol=1e-5)


def test_gradients_reach_each_rows_adapter():
    model = mixed_model()
    ids = torch.randint(1, 128, (2, 5))
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    model(ids, adapter_names=["a", BASE]).logits.sum().backward()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_B["a"].weight.grad.abs().sum() > 0
    assert layer.lora_B["b"].weight.grad is None or layer.lora_B["b"].weight.grad.abs().sum() == 0


@pytest.mark.parametrize("task_type", ["CAUSAL_LM", None])  # None: a plain PeftModel generates as the task class
@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_rows_match_single_adapter_runs(num_beams, task_type):
    model = mixed_model(task_type)
    assert (type(model) is deltatune.PeftModel) == (task_type is None)
    rows = ["b", "a", BASE, "c"]
    ids = torch.randint(1, 128, (len(rows), 5), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=6, do_sample=False, num_beams=num_beams, pad_token_id=0)
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=rows, **kwargs)
        for i, name in enumerate(rows):
            row = ids[i:i + 1]
            expected = alone(model, name, lambda row=row: model.generate(
                input_ids=row, attention_mask=torch.ones_like(row), **kwargs))
            assert torch.equal(mixed[i:i + 1, :expected.shape[1]], expected), name


@pytest.mark.parametrize("num_beams", [1, 2])
def test_seq2seq_generate_rows_match_single_adapter_runs(num_beams):
    """The encoder sees each row once, the decoder once per beam: both get their rows' adapters."""
    model = None
    for name, r in (("a", 4), ("b", 2)):
        config = deltatune.LoraConfig(task_type="SEQ_2_SEQ_LM", r=r, lora_alpha=2 * r, target_modules=["q", "v"])
        if model is None:
            model = deltatune.get_peft_model(tiny_t5(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_B" in param_name:
                param.copy_(torch.randn(param.shape, generator=g))
    model.eval()
    rows = ["a", BASE, "b"]
    ids = torch.randint(1, 64, (1, 6), generator=torch.Generator().manual_seed(1)).repeat(len(rows), 1)
    kwargs = dict(max_new_tokens=5, do_sample=False, num_beams=num_beams, num_return_sequences=num_beams)
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=rows, **kwargs)
        for i, name in enumerate(rows):
            expected = alone(model, name, lambda: model.generate(input_ids=ids[:1], **kwargs))
            got = mixed[i * num_beams:(i + 1) * num_beams]
            assert torch.equal(got[:, :expected.shape[1]], expected), name
    assert len({tuple(row.tolist()) for row in mixed[::num_beams]}) == len(rows)  # the adapters change the output


def test_generate_with_several_return_sequences_repeats_the_rows():
    model = mixed_model()
    ids = torch.randint(1, 128, (2, 5))
    out = model.generate(input_ids=ids, adapter_names=["a", "b"], max_new_tokens=3, do_sample=True,
                         num_return_sequences=3, pad_token_id=0)
    assert out.shape[0] == 6


def test_generate_takes_each_layers_stacks_once_per_call(monkeypatch):
    from deltatune.methods.lora import mixed_batch
    from deltatune.methods.lora.layers import LoraLinear

    model = mixed_model()
    calls = []
    original = mixed_batch.stacked_factors
    monkeypatch.setattr(mixed_batch, "stacked_factors", lambda layer, *a: calls.append(layer) or original(layer, *a))
    ids = torch.randint(1, 128, (3, 5))
    model.generate(input_ids=ids, adapter_names=["a", BASE, "c"], max_new_tokens=5, do_sample=False, pad_token_id=0)
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert len(calls) == len(layers)  # not once per generated token


def test_classification_rows_take_their_adapters_head_as_in_peft():
    """SEQ_CLS adapters keep a copy of the classifier (modules_to_save): each row goes through its adapter's copy,
    "__base__" rows through the original head."""

    def build(lib):
        model = None
        for name, r in (("a", 4), ("b", 2)):
            config = lib.LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=8, target_modules=["query", "value"])
            if model is None:
                model = lib.get_peft_model(tiny_bert(), config, adapter_name=name)
            else:
                model.add_adapter(name, config)
        return model.eval()

    theirs, ours = build(peft), build(deltatune)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=g))
    for name in ("a", "b"):
        state = peft.get_peft_model_state_dict(theirs, adapter_name=name)
        assert any("classifier" in key for key in state)
        deltatune.set_peft_model_state_dict(ours, state, adapter_name=name)
    rows = ["a", BASE, "b", "a"]
    ids = torch.randint(1, 64, (len(rows), 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mixed = ours(input_ids=ids, adapter_names=rows).logits
        torch.testing.assert_close(mixed, theirs(input_ids=ids, adapter_names=rows).logits, atol=1e-5, rtol=1e-5)
        for i, name in enumerate(rows):
            expected = alone(ours, name, lambda i=i: ours(input_ids=ids[i:i + 1]).logits)
            torch.testing.assert_close(mixed[i:i + 1], expected, atol=1e-5, rtol=1e-5)
    ours.train()
    ours(input_ids=ids, adapter_names=["a", BASE, "a", BASE]).logits.sum().backward()
    head = ours.base_model.model.classifier
    assert head.modules_to_save["a"].weight.grad.abs().sum() > 0
    assert head.modules_to_save["b"].weight.grad is None


def test_unknown_adapter_lists_the_loaded_ones():
    model = mixed_model()
    with pytest.raises(ValueError, match=r"Unknown adapter\(s\) \['nope'\].*\['a', 'b', 'c'\]"):
        model(torch.randint(1, 128, (2, 5)), adapter_names=["a", "nope"])


def test_wrong_number_of_names():
    model = mixed_model()
    with pytest.raises(ValueError, match="got 1 name.*batch of 2"):
        model(torch.randint(1, 128, (2, 5)), adapter_names=["a"])
    with pytest.raises(ValueError, match="got 3 name.*batch of 2"):
        model.generate(input_ids=torch.randint(1, 128, (2, 5)), adapter_names=["a", "b", "c"], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"a list with one adapter name per row, not a string: pass \['a'\] \* 2"):
        model(torch.randint(1, 128, (2, 5)), adapter_names="a")


def test_vision_inputs_by_keyword():
    """pixel_values (and audio models' input_features / input_values) tell the batch size as input_ids do."""
    config = ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, num_labels=3)
    torch.manual_seed(0)
    model = deltatune.get_peft_model(ViTForImageClassification(config),
                                     deltatune.LoraConfig(target_modules=["q_proj", "v_proj"]), adapter_name="a")
    model.add_adapter("b", deltatune.LoraConfig(target_modules=["q_proj", "v_proj"]))
    perturbed(model, seed=0)
    model.eval()
    pixels = torch.randn(3, 3, 8, 8)
    rows = ["b", BASE, "a"]
    with torch.no_grad():
        mixed = model(pixel_values=pixels, adapter_names=rows).logits
        for i, name in enumerate(rows):
            expected = alone(model, name, lambda i=i: model(pixel_values=pixels[i:i + 1]).logits)
            torch.testing.assert_close(mixed[i:i + 1], expected, atol=1e-5, rtol=1e-5)


def test_dora_and_other_methods_are_refused_by_name():
    model = mixed_model()
    model.add_adapter("d", deltatune.LoraConfig(target_modules=["q_proj"], use_dora=True))
    model.add_adapter("ia3", deltatune.IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    ids = torch.randint(1, 128, (2, 5))
    with pytest.raises(ValueError, match="'d' uses DoRA"):
        model(ids, adapter_names=["a", "d"])
    with pytest.raises(ValueError, match="'ia3' is a IA3 adapter"):
        model(ids, adapter_names=["ia3", "a"])
    model(ids, adapter_names=["a", BASE])  # the others still work beside them


def test_training_with_gradient_checkpointing_is_refused():
    model = mixed_model()
    model.get_base_model().gradient_checkpointing_enable()
    model.train()
    ids = torch.randint(1, 128, (2, 5))
    with pytest.raises(ValueError, match="gradient checkpointing.*gradient_checkpointing_disable"):
        model(ids, adapter_names=["a", "b"])
    with torch.no_grad():  # nothing is recomputed without a backward pass
        model(ids, adapter_names=["a", "b"])


def test_merged_adapters_are_refused():
    model = mixed_model()
    model.merge_adapter(["a"])
    with pytest.raises(ValueError, match="unmerged"):
        model(torch.randint(1, 128, (2, 5)), adapter_names=["a", "b"])


def test_embedding_targets_are_refused():
    model = mixed_model()
    model.add_adapter("e", deltatune.LoraConfig(target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match=r"\['e'\].*Embedding"):
        model(torch.randint(1, 128, (2, 5)), adapter_names=["e", "a"])


def test_layers_forget_the_rows_after_the_call():
    model = mixed_model()
    ids = torch.randint(1, 128, (2, 5))
    with pytest.raises(ValueError):
        model(ids, adapter_names=["a", "nope"])
    model(ids, adapter_names=["a", "b"])
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.mixed_rows is None


def test_a_setup_that_fails_halfway_leaves_no_layer_routing_rows(monkeypatch):
    from deltatune.methods.lora import mixed_batch
    from deltatune.methods.lora.layers import LoraLinear

    model = mixed_model()
    ids = torch.randint(1, 128, (2, 5))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        original, calls = mixed_batch.stacked_factors, []

        def fail_on_third(layer, *args):
            calls.append(layer)
            if len(calls) == 3:
                raise torch.OutOfMemoryError("simulated")
            return original(layer, *args)

        monkeypatch.setattr(mixed_batch, "stacked_factors", fail_on_third)
        with pytest.raises(torch.OutOfMemoryError):
            model(input_ids=ids, adapter_names=["a", "b"])
        assert all(m.mixed_rows is None for m in model.modules() if isinstance(m, LoraLinear))
        torch.testing.assert_close(model(input_ids=ids).logits, expected)


def test_generate_reads_a_generation_config_passed_by_position():
    from transformers import GenerationConfig

    model = mixed_model()
    ids = torch.randint(1, 128, (2, 5), generator=torch.Generator().manual_seed(2))
    config = GenerationConfig(max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False, pad_token_id=0)
    by_keyword = model.generate(ids, generation_config=config, adapter_names=["a", "b"])
    by_position = model.generate(ids, config, adapter_names=["a", "b"])
    assert by_position.shape[0] == 4
    assert torch.equal(by_position, by_keyword)
    with pytest.raises(TypeError, match="multiple values for \\['generation_config'\\]"):
        model.generate(ids, config, generation_config=config, adapter_names=["a", "b"])


def test_seq2seq_rows_from_encoder_outputs():
    model = deltatune.get_peft_model(tiny_t5(), deltatune.LoraConfig(task_type="SEQ_2_SEQ_LM", target_modules=["q"]),
                                     adapter_name="a").eval()
    ids, decoder_ids = torch.randint(1, 64, (2, 6)), torch.zeros(2, 1, dtype=torch.long)
    with torch.no_grad():
        encoded = model.get_base_model().get_encoder()(input_ids=ids)
        from_ids = model(input_ids=ids, decoder_input_ids=decoder_ids, adapter_names=["a", BASE]).logits
        from_encoded = model(encoder_outputs=encoded, decoder_input_ids=decoder_ids, adapter_names=["a", BASE]).logits
    assert from_encoded.shape == from_ids.shape


def test_an_active_adapter_of_another_method_does_not_leak_into_the_rows():
    model = mixed_model()
    model.add_adapter("ia3", deltatune.IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ia3_l" in name:
                param.fill_(3.0)
    ids = torch.randint(1, 128, (2, 5))
    with torch.no_grad():
        expected = model(ids, adapter_names=["a", BASE]).logits
        model.set_adapter("ia3")
        torch.testing.assert_close(model(ids, adapter_names=["a", BASE]).logits, expected)
        with model.disable_adapter():
            torch.testing.assert_close(model(ids[1:]).logits, expected[1:], atol=1e-5, rtol=1e-5)
