"""LayerNorm tuning layer: the frozen norm plus one trainable copy of it per adapter.

The copies live in `ln_tuning_layers[adapter]`, so file keys are peft's (`<norm>.ln_tuning_layers.weight`).
A copy replaces the norm rather than adding to it, so only one adapter can act (or be merged) at a time.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from deltatune.layers import AdapterLayer


class LNTuningLayer(AdapterLayer):
    adapter_param_containers = ("ln_tuning_layers",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ln_tuning_layers = nn.ModuleDict()
        # The base layer's own tensors while an adapter's copy is merged into it.
        self._unmerged_state: dict[str, torch.Tensor] | None = None

    def update_layer(self, adapter_name: str) -> None:
        self.ln_tuning_layers[adapter_name] = copy.deepcopy(self.base_layer)

    def _single_active(self) -> str:
        if len(self.active_adapters) != 1:
            raise ValueError(
                f"LayerNorm tuning replaces the norm, so one adapter acts at a time; "
                f"{self.active_adapters} are active."
            )
        return self.active_adapters[0]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.use_base_only():
            return self.base_layer(x, *args, **kwargs)
        return self.ln_tuning_layers[self._single_active()](x, *args, **kwargs)

    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        names = self._to_merge(adapter_names)
        if len(names) > 1 or (names and self.merged_adapters):
            raise ValueError(
                f"LayerNorm tuning replaces the norm, so only one adapter can be merged; asked for {names} "
                f"with {self.merged_adapters} already merged. Unmerge first."
            )
        for name in names:
            tuned = self.ln_tuning_layers[name].state_dict().values()
            if not all(torch.isfinite(t).all() for t in tuned if t.is_floating_point()):
                raise ValueError(
                    f"Merging adapter {name!r} would write NaN or inf into the base weights; "
                    "nothing was changed."
                )

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Copy the adapter's norm into the base norm; the base's own tensors are kept to unmerge exactly."""
        names = self._to_merge(adapter_names)
        if not names:
            return
        if safe_merge or len(names) > 1 or self.merged_adapters:
            self.check_merge(adapter_names)
        tuned = self.ln_tuning_layers[names[0]].state_dict()
        self._unmerged_state = {key: t.detach().clone() for key, t in self.base_layer.state_dict().items()}
        self.base_layer.load_state_dict(tuned)
        self.merged_adapters.append(names[0])

    def unmerge(self) -> None:
        if self._unmerged_state is not None:
            self.base_layer.load_state_dict(self._unmerged_state)
        self._unmerged_state = None
        self.merged_adapters.clear()


def create_ln_tuning_layer(target: nn.Module, adapter_name: str, config, module_name: str):
    """Wrap `target` (or add an adapter to an existing layer); None for a module without parameters."""
    if isinstance(target, LNTuningLayer):
        layer = target
    elif any(True for _ in target.parameters()):
        layer = LNTuningLayer(target)
    else:
        return None
    layer.update_layer(adapter_name)
    return layer
