"""Image classification end to end: a tiny ViT and a small conv net, each with LoRA, bottleneck and IA3 adapters.

Both models start from a "pretrained" 10-label model and move to a new 5-label task. The head is sized for the
new task before wrapping, as a user does (ViT: from_pretrained(num_labels=5, ignore_mismatched_sizes=True); the
conv net: assign a new nn.Linear), and modules_to_save=["classifier"] trains and saves that head.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import ViTConfig, ViTForImageClassification
from transformers.utils import logging

from deltatune import AdapterLoadError, BottleneckConfig, IA3Config, LoraConfig, PeftModel, get_peft_model

PRETRAINED_LABELS, NUM_LABELS, IMAGE_SIZE = 10, 5, 16


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x))


class TinyConvNet(nn.Module):
    def __init__(self, num_labels: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(ConvBlock(3, 8), ConvBlock(8, 16))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(16, num_labels)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.blocks(pixel_values)).flatten(1))


@pytest.fixture(scope="module")
def vit_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = ViTConfig(image_size=IMAGE_SIZE, patch_size=4, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64, num_labels=PRETRAINED_LABELS)
    path = tmp_path_factory.mktemp("vit")
    ViTForImageClassification(config).save_pretrained(path)
    return path


def vit(checkpoint, num_labels: int = NUM_LABELS, head_seed: int = 0) -> nn.Module:
    torch.manual_seed(head_seed)  # the new head's random init
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # "newly initialized: classifier" is the point here
    try:
        model = ViTForImageClassification.from_pretrained(checkpoint, num_labels=num_labels,
                                                          ignore_mismatched_sizes=True)
    finally:
        logging.set_verbosity(verbosity)
    return model.eval()


def convnet(num_labels: int = NUM_LABELS, head_seed: int = 0) -> nn.Module:
    torch.manual_seed(0)
    model = TinyConvNet(PRETRAINED_LABELS)
    torch.manual_seed(head_seed)
    model.classifier = nn.Linear(model.classifier.in_features, num_labels)
    return model.eval()


def make_model(kind: str, checkpoint, **kwargs) -> nn.Module:
    return vit(checkpoint, **kwargs) if kind == "vit" else convnet(**kwargs)


HEAD = {"modules_to_save": ["classifier"]}
CONFIGS = {
    # method: {model: config}
    "lora": {
        "vit": lambda: LoraConfig(target_modules=["q_proj", "v_proj", "fc1"], r=4, lora_alpha=8, **HEAD),
        "convnet": lambda: LoraConfig(target_modules=["conv"], r=4, lora_alpha=8, **HEAD),  # Conv2d LoRA
    },
    "bottleneck": {
        "vit": lambda: BottleneckConfig(placement="houlsby", reduction_factor=4, **HEAD),
        "convnet": lambda: BottleneckConfig(placement="parallel", target_modules=["blocks.0", "blocks.1"],
                                            reduction_factor=2, **HEAD),
    },
    "ia3": {
        "vit": lambda: IA3Config(target_modules=["k_proj", "v_proj", "fc2"], feedforward_modules=["fc2"], **HEAD),
        "convnet": lambda: IA3Config(target_modules=["conv"], feedforward_modules=[], **HEAD),
    },
}
CASES = [(kind, method) for method in CONFIGS for kind in ("vit", "convnet")]


def images(seed: int = 0, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g), torch.randint(0, NUM_LABELS, (n,), generator=g)


def logits(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    out = model(pixel_values=pixels)
    return getattr(out, "logits", out)


@pytest.mark.parametrize(("kind", "method"), CASES)
def test_fresh_adapter_is_exact_noop(kind, method, vit_checkpoint):
    pixels, _ = images()
    with torch.no_grad():
        expected = logits(make_model(kind, vit_checkpoint), pixels)
        model = get_peft_model(make_model(kind, vit_checkpoint), CONFIGS[method][kind]())
        assert expected.shape == (len(pixels), NUM_LABELS)
        # The adapters add exact zeros (or scale by ones), but `expected` comes from a separately built model and
        # LoRA adds its term through other kernels: last-bit differences only, far below any adapter's effect.
        torch.testing.assert_close(logits(model, pixels), expected, rtol=1.3e-6, atol=1e-6)


@pytest.mark.parametrize(("kind", "method"), CASES)
def test_train_save_load_gives_identical_outputs(kind, method, vit_checkpoint, tmp_path):
    base = make_model(kind, vit_checkpoint)
    originals = [(p, p.detach().clone()) for p in base.parameters()]
    model = get_peft_model(base, CONFIGS[method][kind]())
    head = model.get_base_model().classifier
    assert all(p.requires_grad for p in head.modules_to_save["default"].parameters())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    pixels, labels = images()
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(logits(model, pixels), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, before) and not p.requires_grad for p, before in originals)

    test_pixels, _ = images(seed=1)
    with torch.no_grad():
        trained = logits(model, test_pixels)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved["base_model.model.classifier.weight"].shape[0] == NUM_LABELS
    # A different random head on the fresh base: the saved copy must replace it.
    loaded = PeftModel.from_pretrained(make_model(kind, vit_checkpoint, head_seed=1), tmp_path)
    with torch.no_grad():
        # The same weights in another model object: a CPU may pick other kernels for it (seen: 6e-8 apart).
        torch.testing.assert_close(logits(loaded, test_pixels), trained, rtol=1.3e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["vit", "convnet"])
def test_head_for_a_new_label_count_does_not_load_onto_the_old_head(kind, vit_checkpoint, tmp_path):
    get_peft_model(make_model(kind, vit_checkpoint), CONFIGS["lora"][kind]()).save_pretrained(tmp_path)
    with pytest.raises(AdapterLoadError, match=r"Shape mismatch for base_model\.model\.classifier"):
        PeftModel.from_pretrained(make_model(kind, vit_checkpoint, num_labels=PRETRAINED_LABELS), tmp_path)


@pytest.mark.parametrize("config_cls", [LoraConfig, IA3Config])
def test_default_targets_for_vit(config_cls, vit_checkpoint):
    model = get_peft_model(vit(vit_checkpoint), config_cls(modules_to_save=["classifier"]))
    from deltatune.layers import adapter_layers

    names = {name.rsplit(".", 1)[-1] for name, _ in adapter_layers(model)}
    assert names and names <= {"q_proj", "k_proj", "v_proj", "fc2"}
