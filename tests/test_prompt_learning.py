"""Prompt tuning, prefix tuning and P-tuning: interop with peft, generation, training, bad input."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import peft
import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama, tiny_t5
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

import deltatune as dt
from deltatune.methods.p_tuning import PromptEncoderConfig
from deltatune.methods.prefix_tuning import PrefixTuningConfig
from deltatune.methods.prompt_tuning import PromptTuningConfig

N = 4
METHODS = {
    "prompt": (PromptTuningConfig, peft.PromptTuningConfig, {}),
    "prefix": (PrefixTuningConfig, peft.PrefixTuningConfig, {"prefix_projection": True, "encoder_hidden_size": 16}),
    "prefix_plain": (PrefixTuningConfig, peft.PrefixTuningConfig, {}),
    "p_tuning_mlp": (PromptEncoderConfig, peft.PromptEncoderConfig, {"encoder_hidden_size": 16}),
    "p_tuning_lstm": (
        PromptEncoderConfig, peft.PromptEncoderConfig,
        {"encoder_hidden_size": 16, "encoder_reparameterization_type": "LSTM"},
    ),
}
MODELS = {"llama": (tiny_llama, "CAUSAL_LM"), "t5": (tiny_t5, "SEQ_2_SEQ_LM")}

IDS = torch.tensor([[0, 0, 5, 6, 7, 9], [1, 2, 3, 4, 5, 6]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])


def make(method: str, model: str = "llama", seed: int = 3, lib=dt):
    ours, theirs, kwargs = METHODS[method]
    factory, task = MODELS[model]
    config_cls = ours if lib is dt else theirs
    torch.manual_seed(seed)
    return lib.get_peft_model(factory(), config_cls(task_type=task, num_virtual_tokens=N, **kwargs)).eval()


def inputs(model: str) -> dict:
    if model == "t5":
        return {"input_ids": IDS, "attention_mask": MASK, "decoder_input_ids": torch.tensor([[0, 5, 6], [0, 7, 8]])}
    # peft places real tokens at positions n.. whatever the padding; explicit positions reproduce that.
    return {"input_ids": IDS, "attention_mask": MASK, "position_ids": torch.arange(IDS.shape[1]).expand(2, -1)}


def randomize_prompts(peft_model) -> None:
    with torch.no_grad():
        for param in peft_model.prompt_encoder.parameters():
            param.add_(torch.randn_like(param) * 0.5)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_interop_with_peft_both_ways(method, model, tmp_path):
    ours = make(method, model)
    randomize_prompts(ours)
    ours.save_pretrained(tmp_path / "ours")
    factory, _ = MODELS[model]
    theirs = peft.PeftModel.from_pretrained(factory(), tmp_path / "ours").eval()
    with torch.no_grad():
        expected = ours(**inputs(model)).logits
        peft_inputs = {k: v for k, v in inputs(model).items() if k != "position_ids"}
        assert (theirs(**peft_inputs).logits - expected).abs().max() < 1e-4

    theirs = make(method, model, seed=5, lib=peft)
    randomize_prompts(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = dt.PeftModel.from_pretrained(factory(), tmp_path / "theirs")
    with torch.no_grad():
        assert (loaded(**inputs(model)).logits - theirs(**peft_inputs).logits).abs().max() < 1e-4


def same_prefix_in_both(factory, **config):
    """(ours, peft's, ours re-created from peft's file): one prefix adapter, the same values."""
    torch.manual_seed(0)
    theirs = peft.get_peft_model(factory(), peft.PrefixTuningConfig(num_virtual_tokens=N, **config)).eval()
    randomize_prompts(theirs)
    ours = dt.get_peft_model(factory(), PrefixTuningConfig(num_virtual_tokens=N, **config)).eval()
    dt.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    return ours, theirs


@pytest.mark.parametrize(("method", "change", "field"), [
    ("prompt", {"hidden_size": 48, "num_attention_heads": 4}, "token_dim"),
    ("p_tuning_mlp", {"hidden_size": 48, "num_attention_heads": 4}, "token_dim"),
    ("prefix_plain", {"num_hidden_layers": 3}, "num_layers"),
])
def test_loading_onto_a_base_of_other_sizes_names_the_field(method, change, field, tmp_path):
    make(method).save_pretrained(tmp_path)
    config = tiny_llama().config
    for key, value in change.items():
        setattr(config, key, value)
    other = LlamaForCausalLM(config)
    with pytest.raises(ValueError, match=f"{field}=.*this model needs {field}="):
        dt.PeftModel.from_pretrained(other, tmp_path)


def test_an_explicit_token_dim_must_fit_the_input_embeddings():
    dt.get_peft_model(tiny_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, token_dim=32))
    with pytest.raises(ValueError, match="token_dim=24, but this model needs token_dim=32"):
        dt.get_peft_model(tiny_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, token_dim=24))


def test_prefix_sizes_the_cache_by_head_dim_when_the_model_sets_it():
    """Gemma-style: head_dim set apart from hidden_size / num_attention_heads, as many KV heads as heads."""

    def gemma_like():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                                            vocab_size=128)).eval()

    ours, theirs = same_prefix_in_both(gemma_like, task_type="CAUSAL_LM")
    assert ours.peft_config["default"].token_dim == theirs.peft_config["default"].token_dim == 64
    ids = torch.randint(1, 128, (2, 5))
    with torch.no_grad():
        assert (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max() < 1e-5


def test_prefix_keeps_token_type_ids_as_given():
    """A prefix adds cache entries, not input positions: GPT-2's token_type_ids keep the input's length."""
    ours, theirs = same_prefix_in_both(tiny_gpt2, task_type="CAUSAL_LM")
    ids = torch.randint(1, 128, (2, 5))
    types = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    with torch.no_grad():
        # GPT-2 adds the token-type embedding (its word embedding of the type id) to the input: peft, which drops
        # token_type_ids with a warning, gets the same input through inputs_embeds.
        wte = theirs.get_base_model().transformer.wte
        expected = theirs(inputs_embeds=wte(ids) + wte(types)).logits
        assert (ours(input_ids=ids, token_type_ids=types).logits - expected).abs().max() < 1e-5


@pytest.mark.parametrize("method", ["prompt", "prefix", "p_tuning_mlp"])
def test_config_keys_and_file_keys_match_peft(method, tmp_path):
    import json

    from safetensors.torch import load_file

    make(method).save_pretrained(tmp_path / "ours")
    make(method, lib=peft).save_pretrained(tmp_path / "theirs")
    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs_cfg = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert set(ours_cfg) == set(theirs_cfg)
    for key in ("num_layers", "token_dim", "num_attention_heads", "num_transformer_submodules"):
        assert ours_cfg[key] == theirs_cfg[key], key
    ours_sd = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs_sd = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in theirs_sd.items()}


def greedy_by_forward(model, ids, mask, steps):
    for _ in range(steps):
        token = model(input_ids=ids, attention_mask=mask).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    return ids


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("method", ["prompt", "prefix", "p_tuning_mlp"])
def test_generate_equals_repeated_forward(method, use_cache):
    model = make(method)
    randomize_prompts(model)
    with torch.no_grad():
        expected = greedy_by_forward(model, IDS, MASK, 6)
        out = model.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=6, do_sample=False,
                             use_cache=use_cache, pad_token_id=0)
        with model.disable_adapter():
            base = model.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=6, do_sample=False,
                                  pad_token_id=0)
    assert torch.equal(out, expected)
    assert not torch.equal(base, expected)  # the adapter really changes the generation


@pytest.mark.parametrize("method", ["prompt", "prefix", "p_tuning_mlp"])
def test_sampling_returns_only_real_tokens(method):
    model = make(method)
    torch.manual_seed(0)
    out = model.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=5, do_sample=True, top_k=20,
                         pad_token_id=0)
    assert out.shape == (2, IDS.shape[1] + 5)
    assert torch.equal(out[:, : IDS.shape[1]], IDS)


# --- decoder-only generation on a lively model ---------------------------------------------------------------
LLAMA_IDS = torch.tensor([[0, 0, 5, 6, 7, 9], [1, 2, 3, 4, 5, 6], [0, 0, 0, 11, 12, 13]])  # left-padded with pad 0
LLAMA_MASK = (LLAMA_IDS != 0).long()
GENERATING = ["prefix", "prefix_plain", "prompt", "p_tuning_mlp"]


def lively_llama() -> LlamaForCausalLM:
    """A tiny Llama with grouped-query attention and larger initial weights, so that greedy decoding varies from
    step to step and a wrong position, a duplicated cache entry or a misplaced row shows in the output. No EOS:
    every row generates the full length."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, pad_token_id=0,
                         bos_token_id=None, eos_token_id=None, initializer_range=0.3)
    return LlamaForCausalLM(config).eval()


def make_lively(method: str, factory=None, task: str = "CAUSAL_LM"):
    """A prompt adapter with randomised prompts on a model whose greedy output varies from step to step."""
    ours, _, kwargs = METHODS[method]
    torch.manual_seed(3)
    model = dt.get_peft_model((factory or lively_llama)(), ours(task_type=task, num_virtual_tokens=N, **kwargs)).eval()
    randomize_prompts(model)
    return model


def make_causal(method: str):
    return make_lively(method)


@contextmanager
def cache_lengths(model) -> Iterator[list[int]]:
    """Records the length of the KV cache handed to each forward of the base model."""
    lengths = []

    def record(_, args, kwargs):
        if kwargs.get("cache") is not None:
            lengths.append(kwargs["cache"].get_seq_length())

    handle = model.get_base_model().register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield lengths
    finally:
        handle.remove()


@pytest.mark.parametrize("method", ["prompt", "prefix_plain"])
def test_a_plain_peft_model_generates_with_its_prompt_adapter(method):
    """Made without a task_type: generate() still puts the virtual tokens in (not the bare model's generate)."""
    model = make_lively(method, task=None)
    assert type(model) is dt.PeftModel
    options = {"input_ids": LLAMA_IDS, "attention_mask": LLAMA_MASK, "max_new_tokens": 6, "do_sample": False}
    with torch.no_grad():
        out = model.generate(**options)
        assert torch.equal(out, greedy_by_forward(model, LLAMA_IDS, LLAMA_MASK, 6))
        with model.disable_adapter():
            assert not torch.equal(out, model.generate(**options))


@pytest.mark.parametrize("method", GENERATING)
def test_causal_generate_equals_repeated_forward_with_and_without_cache(method):
    model = make_causal(method)
    options = {"input_ids": LLAMA_IDS, "attention_mask": LLAMA_MASK, "max_new_tokens": 6, "do_sample": False}
    with torch.no_grad():
        expected = greedy_by_forward(model, LLAMA_IDS, LLAMA_MASK, 6)
        cached = model.generate(**options, use_cache=True)
        with cache_lengths(model) as lengths:
            uncached = model.generate(**options, use_cache=False)
        with model.disable_adapter():
            base = model.generate(**options)
    assert torch.equal(cached, expected)
    assert torch.equal(uncached, expected)
    if model.peft_config["default"].is_prefix:
        assert lengths == [N] * 6  # the prefix only: re-fed sequences are not stored again
    assert len({tuple(row.tolist()) for row in expected[:, -6:]}) == len(expected)  # rows really decode differently
    for row, base_row in zip(expected, base, strict=True):
        assert not torch.equal(row, base_row)  # the adapter changes every row's generation


@pytest.mark.parametrize("method", GENERATING)
def test_causal_beam_search_rows_equal_rows_generated_alone(method):
    """generate() repeats each input row per beam; a prefix cache must have one row per beam too."""
    model = make_causal(method)
    options = {"max_new_tokens": 6, "num_beams": 3, "num_return_sequences": 2}
    with torch.no_grad():
        batch = model.generate(input_ids=LLAMA_IDS, attention_mask=LLAMA_MASK, **options)
        assert batch.shape == (2 * len(LLAMA_IDS), LLAMA_IDS.shape[1] + 6)
        for i, row in enumerate(LLAMA_IDS):
            pad = int((LLAMA_MASK[i] == 0).sum())
            alone = model.generate(input_ids=row[pad:][None], **options)
            assert torch.equal(batch[2 * i : 2 * i + 2, pad:], alone), i


@pytest.mark.parametrize("method", GENERATING)
def test_causal_sampling_several_sequences_per_row(method):
    model = make_causal(method)
    outputs = []
    for use_cache in (True, False):
        torch.manual_seed(0)
        outputs.append(model.generate(input_ids=LLAMA_IDS, attention_mask=LLAMA_MASK, max_new_tokens=5,
                                      do_sample=True, top_k=20, num_return_sequences=2, use_cache=use_cache))
    out = outputs[0]
    assert out.shape == (2 * len(LLAMA_IDS), LLAMA_IDS.shape[1] + 5)
    assert torch.equal(out[:, : LLAMA_IDS.shape[1]], LLAMA_IDS.repeat_interleave(2, dim=0))
    assert torch.all((out >= 0) & (out < 128))
    assert torch.equal(outputs[0], outputs[1])  # the same draws with and without the cache


@pytest.mark.parametrize("method", GENERATING)
def test_causal_generate_return_dict_holds_the_plain_sequences(method):
    model = make_causal(method)
    options = {"input_ids": LLAMA_IDS, "attention_mask": LLAMA_MASK, "max_new_tokens": 6}
    with torch.no_grad():
        plain = model.generate(**options)
        out = model.generate(**options, return_dict_in_generate=True, output_scores=True)
    assert torch.equal(out.sequences, plain)
    assert torch.equal(out.sequences[:, : LLAMA_IDS.shape[1]], LLAMA_IDS)  # real tokens only, no placeholders
    assert len(out.scores) == 6
    assert torch.equal(torch.stack(out.scores, 1).argmax(-1), out.sequences[:, -6:])  # scores match the tokens


@pytest.mark.parametrize("method", GENERATING)
def test_causal_max_length_counts_real_tokens_only(method):
    model = make_causal(method)
    with torch.no_grad():
        by_length = model.generate(input_ids=LLAMA_IDS, attention_mask=LLAMA_MASK, max_length=10)
        by_new = model.generate(input_ids=LLAMA_IDS, attention_mask=LLAMA_MASK, max_new_tokens=4)
    assert torch.equal(by_length, by_new)  # 6 input tokens + 4 new: the virtual tokens are not counted


# --- encoder-decoder generation ------------------------------------------------------------------------------
T5_IDS = torch.tensor([[5, 6, 7, 9, 0, 0], [1, 2, 3, 4, 5, 6], [11, 12, 13, 0, 0, 0]])  # right-padded with T5's pad 0
T5_MASK = (T5_IDS != 0).long()
T5_EOS = 1


def lively_t5() -> T5ForConditionalGeneration:
    """A tiny T5 with larger initial weights: greedy decoding varies from step to step (the default init mostly
    repeats one token), so a wrong position or a stale cache entry shows in the output."""
    torch.manual_seed(0)
    config = T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=128,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=T5_EOS, initializer_factor=3.0)
    return T5ForConditionalGeneration(config).eval()


def make_seq2seq(method: str):
    return make_lively(method, lively_t5, "SEQ_2_SEQ_LM")


def seq2seq_greedy_by_forward(model, ids, mask, steps, decoder_ids=None):
    """Greedy decoding by full forward passes: the decoder re-runs over its whole sequence every step, no cache."""
    decoder_ids = torch.zeros(len(ids), 1, dtype=torch.long) if decoder_ids is None else decoder_ids  # T5 starts at 0
    done = torch.zeros(len(ids), dtype=torch.bool)
    for _ in range(steps):
        token = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits[:, -1].argmax(-1)
        token = token.masked_fill(done, 0)  # finished rows are padded, as generate() does
        done |= token == T5_EOS
        decoder_ids = torch.cat([decoder_ids, token[:, None]], dim=1)
        if done.all():
            break
    return decoder_ids


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("method", ["prefix", "prefix_plain", "prompt", "p_tuning_mlp"])
def test_seq2seq_generate_equals_repeated_forward(method, use_cache):
    model = make_seq2seq(method)
    with torch.no_grad():
        expected = seq2seq_greedy_by_forward(model, T5_IDS, T5_MASK, 6)
        out = model.generate(input_ids=T5_IDS, attention_mask=T5_MASK, max_new_tokens=6, do_sample=False,
                             use_cache=use_cache)
        with model.disable_adapter():
            base = model.generate(input_ids=T5_IDS, attention_mask=T5_MASK, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, expected)
    assert len({tuple(row.tolist()) for row in out}) == len(out)  # the rows really decode differently
    for row, base_row in zip(out, base, strict=True):
        assert not torch.equal(row, base_row)  # the adapter changes every row's generation


@pytest.mark.parametrize("use_cache", [True, False])
def test_seq2seq_prefix_rows_equal_rows_generated_alone(use_cache):
    model = make_seq2seq("prefix_plain")
    with torch.no_grad():
        batch = model.generate(input_ids=T5_IDS, attention_mask=T5_MASK, max_new_tokens=6, use_cache=use_cache)
        for i, row in enumerate(T5_IDS):
            alone = model.generate(input_ids=row[T5_MASK[i].bool()][None], max_new_tokens=6, use_cache=use_cache)
            assert torch.equal(batch[i, : alone.shape[1]], alone[0]), i


def test_seq2seq_prefix_beam_search_rows_equal_rows_generated_alone():
    """generate() repeats each input row per beam, and the prefix cache must have one row per beam too."""
    model = make_seq2seq("prefix_plain")
    options = {"max_new_tokens": 6, "num_beams": 3, "num_return_sequences": 2}
    with torch.no_grad():
        batch = model.generate(input_ids=T5_IDS, attention_mask=T5_MASK, **options)
        for i, row in enumerate(T5_IDS):
            alone = model.generate(input_ids=row[T5_MASK[i].bool()][None], **options)
            assert torch.equal(batch[2 * i : 2 * i + 2, : alone.shape[1]], alone), i


def test_seq2seq_prefix_sampling_returns_real_tokens():
    model = make_seq2seq("prefix_plain")
    outputs = []
    for use_cache in (True, False):
        torch.manual_seed(0)
        outputs.append(model.generate(input_ids=T5_IDS, attention_mask=T5_MASK, max_new_tokens=5, do_sample=True,
                                      top_k=20, num_return_sequences=2, use_cache=use_cache))
    out = outputs[0]
    assert out.shape[0] == 2 * len(T5_IDS) and 2 <= out.shape[1] <= 6
    assert torch.all(out[:, 0] == 0) and torch.all((out >= 0) & (out < 128))
    assert torch.equal(outputs[0], outputs[1])  # the same draws with and without the cache


@pytest.mark.parametrize("use_cache", [True, False])
def test_seq2seq_prefix_continues_given_decoder_ids(use_cache):
    model = make_seq2seq("prefix_plain")
    decoder_ids = torch.tensor([[0, 7], [0, 9], [0, 3]])
    with torch.no_grad():
        expected = seq2seq_greedy_by_forward(model, T5_IDS, T5_MASK, 4, decoder_ids)
        out = model.generate(input_ids=T5_IDS, attention_mask=T5_MASK, decoder_input_ids=decoder_ids,
                             decoder_attention_mask=torch.ones_like(decoder_ids), max_new_tokens=4, use_cache=use_cache)
    assert torch.equal(out, expected)


def test_seq2seq_prefix_refuses_cache_implementation():
    model = make_seq2seq("prefix_plain")
    with pytest.raises(ValueError, match="drop cache_implementation"):
        model.generate(input_ids=T5_IDS, attention_mask=T5_MASK, max_new_tokens=2, cache_implementation="static")


@pytest.mark.parametrize("method", ["prompt", "prefix", "p_tuning_mlp"])
def test_left_padded_row_equals_unpadded_row(method):
    model = make(method)
    randomize_prompts(model)
    with torch.no_grad():
        padded = model(input_ids=IDS[:1], attention_mask=MASK[:1]).logits[0, -4:]
        alone = model(input_ids=IDS[:1, 2:]).logits[0, -4:]
    assert (padded - alone).abs().max() < 1e-5


@pytest.mark.parametrize("method", ["prompt", "prefix", "p_tuning_mlp", "p_tuning_lstm"])
def test_training_changes_only_prompt_parameters(method):
    model = make(method)
    model.train()
    base_before = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(any(p is q for q in model.prompt_encoder.parameters()) for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=5e-2)
    ids = torch.randint(1, 128, (4, 8), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for key, value in model.get_base_model().state_dict().items():
        assert torch.equal(value, base_before[key]), key


def test_labels_of_virtual_positions_are_ignored():
    model = make("prompt")
    randomize_prompts(model)
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids, labels=ids)
    logits = out.logits[:, N - 1 : -1]  # positions predicting real tokens; the last virtual one predicts the first
    manual = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1))
    assert torch.allclose(out.loss, manual, atol=1e-6)


def test_trainable_parameter_count_is_tiny():
    model = make("prompt")
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == N * 32
    assert total == trainable + sum(p.numel() for p in tiny_llama().parameters())


def test_switch_between_prompt_adapters_without_reloading(tmp_path):
    model = make("prompt")
    randomize_prompts(model)
    model.add_adapter("other", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6))
    base = model.get_base_model()
    with torch.no_grad():
        first = model(input_ids=IDS).logits
        model.set_adapter("other")
        second = model(input_ids=IDS).logits
        model.set_adapter("default")
        again = model(input_ids=IDS).logits
    assert model.get_base_model() is base
    assert second.shape[1] == IDS.shape[1] + 6 and first.shape[1] == IDS.shape[1] + N
    assert torch.equal(first, again)
    assert [p for p in model.parameters() if p.requires_grad][0] is model.prompt_encoder["default"].embedding.weight
    model.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path, all_adapters=True)
    assert sorted(loaded.peft_config) == ["default", "other"]
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=IDS).logits, first, atol=1e-6)


def test_prompt_adapter_switched_in_inference_mode_stays_frozen():
    model = make("prompt")
    model.add_adapter("other", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6))
    model.set_adapter("other", inference_mode=True)
    assert not any(p.requires_grad for p in model.parameters())
    model.set_adapter("other")
    assert [p for p in model.parameters() if p.requires_grad] == [model.prompt_encoder["other"].embedding.weight]
    model.set_requires_grad("default")  # both train now
    assert sum(p.requires_grad for p in model.parameters()) == 2


def test_sequence_classification_trains_prompt_and_head():
    torch.manual_seed(0)
    model = dt.get_peft_model(tiny_bert(), PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=N))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("prompt_encoder" in n for n in names) and any("classifier" in n for n in names)
    out = model(input_ids=IDS, attention_mask=MASK, token_type_ids=torch.zeros_like(IDS), labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and out.loss is not None


def write_tokenizer(path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "classify": 1, "the": 2, "sentiment": 3, ":": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)


@pytest.mark.parametrize("num_virtual_tokens, expected_ids", [(8, [1, 2, 3, 4, 1, 2, 3, 4]), (3, [1, 2, 3])])
def test_text_init_copies_the_embeddings_of_the_text(tmp_path, num_virtual_tokens, expected_ids):
    write_tokenizer(tmp_path)
    config = PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens, prompt_tuning_init="TEXT",
        prompt_tuning_init_text="classify the sentiment :", tokenizer_name_or_path=str(tmp_path),
    )
    model = dt.get_peft_model(tiny_llama(), config)
    table = model.prompt_encoder["default"].embedding.weight
    embeddings = model.get_base_model().get_input_embeddings().weight
    assert torch.equal(table, embeddings[expected_ids])


@pytest.mark.parametrize(
    "make_config, message",
    [
        (lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=0), "num_virtual_tokens"),
        (lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=-2), "num_virtual_tokens"),
        (lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prompt_tuning_init="TEXT",
                                    tokenizer_name_or_path="x"), "prompt_tuning_init_text"),
        (lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prompt_tuning_init="TEXT",
                                    prompt_tuning_init_text="hi"), "tokenizer_name_or_path"),
        (lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                     encoder_reparameterization_type="GRU"), "encoder_reparameterization_type"),
    ],
)
def test_bad_configs(make_config, message):
    with pytest.raises(ValueError, match=message):
        make_config()


def test_missing_tokenizer_path_is_a_clear_error(tmp_path):
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prompt_tuning_init="TEXT",
                                prompt_tuning_init_text="hi", tokenizer_name_or_path=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="tokenizer_name_or_path"):
        dt.get_peft_model(tiny_llama(), config)


def test_prefix_on_a_model_without_a_kv_cache_is_refused():
    with pytest.raises(ValueError, match="Prefix tuning needs a model that reads a KV cache.*bert"):
        dt.get_peft_model(tiny_bert(), PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))


def test_merging_a_prompt_adapter_is_refused():
    model = make("prompt")
    with pytest.raises(ValueError, match="prompt-learning adapters.*cannot be merged.*unload"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()
    assert model.active_adapter == "default" and "default" in model.prompt_encoder  # nothing was dropped
