"""Bottleneck adapters: placements on each architecture, exact math, training, files, and bad input."""

from __future__ import annotations

import collections
import json
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHS, inputs_for, logits, perturb_trainable, tiny_llama
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModel

import deltatune
from deltatune import BottleneckConfig, PeftModel, get_peft_model
from deltatune.layers import adapter_layers
from deltatune.methods.bottleneck import ARCHITECTURE_BLOCKS, NON_LINEARITIES, BottleneckLayer

ARCH_NAMES = list(ARCHS)
PLACEMENTS = ["houlsby", "pfeiffer", "parallel"]
# The blocks each architecture's adapters wrap, relative to one repeated layer: (attention, feed-forward).
BLOCKS = {
    "llama": ("self_attn", "mlp"),
    "gpt2": ("attn", "mlp"),
    "bert": ("attention.output.dense", "output.dense"),
    "t5": ("SelfAttention", "DenseReluDense"),
}
LAYERS_PER_MODEL = {"llama": 2, "gpt2": 2, "bert": 2, "t5": 4}  # T5: two encoder and two decoder blocks


def wrap(arch: str, seed: int = 0, **kwargs) -> PeftModel:
    kwargs.setdefault("reduction_factor", 4)
    return get_peft_model(ARCHS[arch][0](seed), BottleneckConfig(task_type=ARCHS[arch][1], **kwargs))


def block_paths(model: nn.Module) -> set[str]:
    """Wrapped modules, named relative to their numbered layer (`model.layers.1.mlp` -> `mlp`)."""
    return {re.sub(r".*\.\d+\.", "", name) for name, _ in adapter_layers(model)}


def train_inputs(arch: str) -> dict[str, torch.Tensor]:
    inputs = inputs_for(arch)
    if arch == "bert":
        inputs["labels"] = torch.tensor([0, 2])
    elif arch == "t5":
        inputs["labels"] = inputs.pop("decoder_input_ids")
    else:
        inputs["labels"] = inputs["input_ids"]
    return inputs


# --- placement ---------------------------------------------------------------------------------
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_placement_wraps_its_blocks_and_fresh_adapter_is_exact_noop(arch, placement):
    inputs = inputs_for(arch)
    expected = logits(ARCHS[arch][0](), inputs)
    model = wrap(arch, placement=placement)
    attention, feed_forward = BLOCKS[arch]
    assert block_paths(model) == ({attention, feed_forward} if placement == "houlsby" else {feed_forward})
    per_layer = 2 if placement == "houlsby" else 1
    assert len(list(adapter_layers(model))) == per_layer * LAYERS_PER_MODEL[arch]
    # The fresh adapters add exact zeros, but `expected` comes from a separately built model: last bits only.
    torch.testing.assert_close(logits(model, inputs), expected, rtol=1.3e-6, atol=1e-6)


CASES = [(arch, placement, None) for arch in ARCH_NAMES for placement in PLACEMENTS] + [
    ("llama", "parallel", ["self_attn"]),  # Llama calls its attention with hidden_states= as a keyword
    ("t5", "parallel", ["SelfAttention"]),
    ("gpt2", "parallel", ["attn"]),
]


@pytest.mark.parametrize(("arch", "placement", "targets"), CASES)
def test_wrapped_block_keeps_its_output_structure_and_adds_the_adapter(arch, placement, targets):
    """Each block returns what its base block does, with the hidden states changed by exactly the adapter."""
    model = wrap(arch, placement=placement, target_modules=targets, init_weights=False, non_linearity="gelu",
                 scaling=0.5)
    perturb_trainable(model)
    records = []

    def record(layer):
        def base_hook(module, args, kwargs, output):
            records.append((layer, args, kwargs, output))

        def layer_hook(module, args, kwargs, output):
            records[-1] += (output,)

        layer.base_layer.register_forward_hook(base_hook, with_kwargs=True)
        layer.register_forward_hook(layer_hook, with_kwargs=True)

    for _, layer in adapter_layers(model):
        record(layer)
    with torch.no_grad():
        model(**inputs_for(arch))
    assert records
    for layer, args, kwargs, base_out, out in records:
        assert type(out) is type(base_out)
        if isinstance(base_out, tuple):
            assert len(out) == len(base_out)
            assert all(a is b for a, b in zip(out[1:], base_out[1:], strict=True))
            base_hidden, hidden = base_out[0], out[0]
        else:
            base_hidden, hidden = base_out, out
        source = (args[0] if args else kwargs["hidden_states"]) if placement == "parallel" else base_hidden
        down, up = layer.adapter_down["default"], layer.adapter_up["default"]
        adapter = F.linear(F.gelu(F.linear(source, down.weight, down.bias)), up.weight, up.bias)
        torch.testing.assert_close(hidden, base_hidden + 0.5 * adapter)
        assert (hidden - base_hidden).abs().max() > 1e-4


def test_explicit_target_modules_override_the_placement():
    model = wrap("llama", placement="houlsby", target_modules=["self_attn"])
    assert block_paths(model) == {"self_attn"}
    assert model.peft_config["default"].target_modules == ["self_attn"]


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_bottleneck_width_follows_reduction_factor_or_size(placement):
    layer = next(layer for _, layer in adapter_layers(wrap("llama", placement=placement, reduction_factor=8)))
    assert (layer.adapter_down["default"].out_features, layer.adapter_up["default"].out_features) == (4, 32)
    layer = next(layer for _, layer in adapter_layers(wrap("llama", placement=placement, bottleneck_size=3,
                                                           reduction_factor=5)))
    assert layer.adapter_down["default"].weight.shape == (3, 32)


def table_model(model_type: str) -> nn.Module:
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, d_ff=64, d_kv=8,
                 num_heads=4, num_layers=2, image_size=16, patch_size=4, pad_token_id=0, bos_token_id=0,
                 eos_token_id=0, ffn_dim=64, word_embed_proj_dim=32, dim=32, hidden_dim=64, n_heads=4,
                 n_layers=2)
    if model_type == "falcon":
        del sizes["num_key_value_heads"]
    torch.manual_seed(0)
    return AutoModel.from_config(AutoConfig.for_model(model_type, **sizes)).eval()


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURE_BLOCKS))
def test_every_table_entry_names_existing_blocks(model_type):
    """Houlsby wraps an attention and a feed-forward block in every layer of each table architecture."""
    model = get_peft_model(table_model(model_type), BottleneckConfig(placement="houlsby", reduction_factor=4))
    layers = list(adapter_layers(model))
    n_layers = 4 if model_type in ("t5", "mt5") else 2
    assert len(layers) == 2 * n_layers
    assert all(layer.widths.out_features == 32 for _, layer in layers)


# --- training, files, switching ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("arch", "placement"),
    [(arch, "houlsby") for arch in ARCH_NAMES] + [("llama", "pfeiffer"), ("llama", "parallel")],
)
def test_adamw_steps_lower_the_loss_and_leave_base_weights_untouched(arch, placement):
    torch.manual_seed(0)
    model = wrap(arch, placement=placement)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    assert all(re.search(r"\.(adapter_down|adapter_up|modules_to_save)\.", n) for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = train_inputs(arch)
    losses = []
    for _ in range(6):
        loss = model(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_save_and_load_give_identical_outputs(arch, placement, tmp_path):
    model = wrap(arch, placement=placement, non_linearity="tanh")
    perturb_trainable(model)
    inputs = inputs_for(arch)
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path)

    with open(tmp_path / "adapter_config.json") as f:
        saved = json.load(f)
    assert saved["peft_type"] == "BOTTLENECK"
    assert (saved["placement"], saved["non_linearity"], saved["reduction_factor"]) == (placement, "tanh", 4)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert keys and all(k.startswith("base_model.model.") and ".default" not in k for k in keys)
    assert any(k.endswith("adapter_up.weight") for k in keys)

    loaded = PeftModel.from_pretrained(ARCHS[arch][0](), tmp_path)
    assert isinstance(loaded.peft_config["default"], BottleneckConfig)
    # The same weights in another model object, which may run other kernels: last bits only.
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=1.3e-6, atol=1e-6)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_disable_switch_delete_unload_and_refused_merge():
    inputs = inputs_for("llama")
    base = logits(tiny_llama(), inputs)
    model = wrap("llama", placement="houlsby", init_weights=False)
    adapted = logits(model, inputs)
    assert not torch.equal(adapted, base)
    with model.disable_adapter():  # `base` comes from a separately built model: last bits only
        torch.testing.assert_close(logits(model, inputs), base, rtol=1.3e-6, atol=1e-6)
    assert torch.equal(logits(model, inputs), adapted)

    model.add_adapter("other", BottleneckConfig(placement="parallel", reduction_factor=2, init_weights=False))
    model.set_adapter("other")
    other = logits(model, inputs)
    assert not torch.equal(other, adapted) and not torch.equal(other, base)
    model.set_adapter("default")
    assert torch.equal(logits(model, inputs), adapted)

    with pytest.raises(ValueError, match="non-linear and cannot be merged"):
        model.merge_and_unload()
    model.delete_adapter("other")
    assert torch.equal(logits(model, inputs), adapted)
    unloaded = model.unload()
    assert not list(adapter_layers(unloaded))
    torch.testing.assert_close(logits(unloaded, inputs), base, rtol=1.3e-6, atol=1e-6)  # separately built `base`


def test_generation_with_kv_cache_is_unchanged_by_a_fresh_adapter():
    inputs = inputs_for("llama")
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    expected = tiny_llama().generate(**inputs, **kwargs)
    model = wrap("llama", placement="houlsby")
    out = model.generate(**inputs, **kwargs)
    # Two separately built models: each step's logits agree up to the last bits, and so do the greedy tokens (the
    # top-two margins here are >= 7e-3, far above rounding).
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(expected.logits), rtol=1.3e-6, atol=1e-6)
    assert torch.equal(out.sequences, expected.sequences)


def test_half_precision_base_keeps_float32_adapter_and_its_own_output_dtype():
    config = BottleneckConfig(placement="houlsby", reduction_factor=4)
    model = get_peft_model(tiny_llama().to(torch.bfloat16), config)
    layer = next(layer for _, layer in adapter_layers(model))
    assert layer.adapter_down["default"].weight.dtype == torch.float32
    out = model(**inputs_for("llama")).logits
    assert out.dtype == torch.bfloat16


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


class TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([ConvBlock(3, 8), ConvBlock(8, 8)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize("placement", ["pfeiffer", "parallel"])
def test_convolution_blocks_are_adapted_over_their_channels(placement):
    x = torch.randn(2, 3, 5, 5)
    config = BottleneckConfig(placement=placement, target_modules=["blocks.0", "blocks.1"],
                              reduction_factor=2, init_weights=False)
    model = deltatune.inject_adapter_in_model(config, TwoBlocks())
    first = model.blocks[0]
    in_features = 3 if placement == "parallel" else 8
    assert first.adapter_down["default"].weight.shape == (4, in_features)
    with torch.no_grad():
        base = first.base_layer(x)
        source = x if placement == "parallel" else base
        down, up = first.adapter_down["default"], first.adapter_up["default"]
        adapter = up(torch.relu(down(source.movedim(1, -1)))).movedim(-1, 1)
        torch.testing.assert_close(first(x), base + adapter)
        assert model(x).shape == (2, 8, 5, 5)


@pytest.mark.parametrize("non_linearity", sorted(NON_LINEARITIES))
def test_every_non_linearity_is_applied(non_linearity):
    model = wrap("llama", non_linearity=non_linearity, init_weights=False)
    layer = next(layer for _, layer in adapter_layers(model))
    assert type(layer.adapter_act["default"]) is type(NON_LINEARITIES[non_linearity]())
    assert torch.isfinite(logits(model, inputs_for("llama"))).all()


# --- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, -2, 2.5, True, "4"])
def test_reduction_factor_must_be_an_integer_of_at_least_one(value):
    with pytest.raises(ValueError, match="reduction_factor must be an integer >= 1"):
        BottleneckConfig(reduction_factor=value)


def test_reduction_factor_must_divide_the_hidden_size():
    with pytest.raises(ValueError, match=r"reduction_factor=5 does not divide the hidden size 32 .*"):
        wrap("llama", reduction_factor=5)
    with pytest.raises(ValueError, match="does not divide"):
        wrap("llama", reduction_factor=64)


@pytest.mark.parametrize("value", [0, -1, 1.5])
def test_bottleneck_size_must_be_positive(value):
    with pytest.raises(ValueError, match="bottleneck_size must be a positive integer"):
        BottleneckConfig(bottleneck_size=value)


def test_unknown_non_linearity_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown non_linearity 'softplus'.*'gelu'.*'relu'.*'tanh'"):
        BottleneckConfig(non_linearity="softplus")


@pytest.mark.parametrize(
    ("field", "value"), [("placement", "middle"), ("scaling", float("nan")), ("scaling", "1")]
)
def test_bad_placement_or_scaling(field, value):
    with pytest.raises(ValueError, match=field):
        BottleneckConfig(**{field: value})


def test_unknown_architecture_asks_for_target_modules():
    with pytest.raises(ValueError, match=r"model_type=None.*Set target_modules.*\['conv'\]"):
        deltatune.inject_adapter_in_model(BottleneckConfig(placement="houlsby"), TwoBlocks())


def test_containers_and_modules_without_a_hidden_size_are_refused():
    with pytest.raises(ValueError, match="container without a forward"):
        deltatune.inject_adapter_in_model(BottleneckConfig(target_modules=["blocks"]), TwoBlocks())
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ValueError, match="Cannot tell the hidden size of 1"):
        deltatune.inject_adapter_in_model(BottleneckConfig(target_modules=["1"]), model)


def test_bottleneck_layer_is_registered_and_typed():
    model = wrap("gpt2", placement="houlsby")
    assert all(isinstance(layer, BottleneckLayer) for _, layer in adapter_layers(model))
    assert "BOTTLENECK" in deltatune.registry.known_methods()


Pair = collections.namedtuple("Pair", ["hidden", "extra"])
OUTPUT_KINDS = {
    "tensor": lambda h: h,
    "tuple": lambda h: (h, "extra"),
    "list": lambda h: [h, "extra"],
    "namedtuple": lambda h: Pair(h, "extra"),
}


class ReturnsKind(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor):
        return OUTPUT_KINDS[self.kind](self.fc(x))


@pytest.mark.parametrize("kind", sorted(OUTPUT_KINDS))
def test_block_outputs_keep_their_container_type(kind):
    torch.manual_seed(0)
    model = nn.Sequential(ReturnsKind(kind))
    x = torch.randn(2, 4)
    base = model(x)
    config = BottleneckConfig(target_modules=["0"], reduction_factor=2, init_weights=False)
    out = deltatune.inject_adapter_in_model(config, model)(x)
    assert type(out) is type(base)
    if kind != "tensor":
        assert out[1] == "extra"
        out, base = out[0], base[0]
    assert out.shape == base.shape and not torch.equal(out, base)


def test_block_returning_a_dict_is_refused_with_a_clear_error():
    class ReturnsDict(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return {"hidden": self.fc(x)}

    model = deltatune.inject_adapter_in_model(BottleneckConfig(target_modules=["0"], reduction_factor=2),
                                              nn.Sequential(ReturnsDict()))
    with pytest.raises(TypeError, match="return a tensor or a tuple"):
        model(torch.randn(2, 4))


def test_a_block_mixing_convolutions_and_linear_layers_is_refused():
    """A ConvNext layer permutes between its depthwise convolution (channels on axis 1) and its linear layers
    (channels last): its layers cannot tell the axis of its output, so no adapter is guessed onto it."""
    from transformers import ConvNextConfig, ConvNextModel

    model = ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2))
    with pytest.raises(ValueError, match="ConvNextLayer mixes convolution and linear layers"):
        get_peft_model(model, BottleneckConfig(target_modules=["stages.0.layers.0"], bottleneck_size=2))


def test_a_block_another_adapter_reached_into_is_refused():
    """Adapter layers never nest: a LoRA layer inside a bottleneck layer would escape disable_adapter and
    delete_adapter."""
    model = deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(target_modules=["down_proj"]))
    with pytest.raises(ValueError, match=r"mlp holds adapter layers of another adapter \(.*mlp.down_proj\)"):
        model.add_adapter("bn", BottleneckConfig(target_modules=["mlp"], bottleneck_size=2))
    assert list(model.peft_config) == ["default"]


def test_targets_inside_a_wrapped_block_are_named_as_such():
    model = get_peft_model(tiny_llama(), BottleneckConfig(target_modules=["mlp"], bottleneck_size=2))
    with pytest.raises(ValueError, match=r"only modules inside another adapter's layer \(.*mlp.base_layer.down_proj"):
        model.add_adapter("lora", deltatune.LoraConfig(target_modules=["down_proj"]))


def test_blocks_of_a_widening_model_take_their_own_width():
    """Swin's config.hidden_size is its last stage's width; each block's adapter fits the block's own."""
    from transformers import SwinConfig, SwinModel

    torch.manual_seed(0)
    config = SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=2)
    model = get_peft_model(SwinModel(config).eval(), BottleneckConfig(target_modules=r".*blocks\.\d+\.attention",
                                                                      bottleneck_size=4, init_weights=False))
    widths = [layer.widths.out_features for _, layer in adapter_layers(model)]
    assert widths == [16, 32] and config.hidden_size == 32
    assert torch.isfinite(model(pixel_values=torch.randn(1, 3, 32, 32)).last_hidden_state).all()


def test_bloom_adapters_read_the_block_contribution_not_the_residual_stream():
    """Bloom's attention and MLP add the residual inside their forward: the adapters wrap their output projections."""
    from transformers import BloomConfig, BloomModel

    model = get_peft_model(BloomModel(BloomConfig(hidden_size=32, n_layer=1, n_head=4, vocab_size=128)),
                           BottleneckConfig(placement="houlsby", reduction_factor=4))
    assert [name.split("h.0.")[1] for name, _ in adapter_layers(model)] == ["self_attention.dense",
                                                                             "mlp.dense_4h_to_h"]


def test_a_parallel_adapter_beside_a_downsampling_block_is_refused_by_name():
    from transformers import ResNetConfig, ResNetModel

    model = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="bottleneck"))
    config = BottleneckConfig(placement="parallel", target_modules=r".*stages\.\d+\.layers\.\d+", bottleneck_size=4)
    model = get_peft_model(model.eval(), config)
    with pytest.raises(ValueError, match=r"ResNetBottleNeckLayer's input .* \(it downsamples\)\. Use a sequential"):
        model(pixel_values=torch.randn(1, 3, 32, 32))
