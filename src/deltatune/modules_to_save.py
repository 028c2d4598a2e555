"""Fully trainable copies of whole modules (e.g. a new classifier head), one copy per adapter."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn


class ModulesToSaveWrapper(nn.Module):
    """Keeps the original module frozen and routes forward through the active adapter's copy.

    `tied_to` names the wrapper that owns the shared weights when this module's weights are tied to
    another modules_to_save target (an input embedding tied to the output head): the copies share their
    Parameters, so tying survives training, saving, loading and merging, and only the owner is saved.
    """

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self.tied_to: str | None = None
        # {batch size: adapter name per row} while a mixed-adapter batch runs (deltatune/mixed_batch.py)
        self.mixed_rows: dict[int, list[str]] | None = None

    def add_copy(self, adapter_name: str, shared_from: tuple[nn.Module, nn.Module] | None = None) -> None:
        """`shared_from` is (owner's original, owner's copy) for a module tied to another target."""
        clone = copy.deepcopy(self.original_module)
        if shared_from is not None:
            share_tied_parameters(self.original_module, clone, shared_from)
        for param in clone.parameters():
            param.requires_grad_(True)
        self.modules_to_save[adapter_name] = clone

    def set_adapter(self, adapter_name: str | None) -> None:
        self.active_adapter = adapter_name if adapter_name in self.modules_to_save else None

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:  # ModuleDict.pop takes no default
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def active_module(self) -> nn.Module:
        if self.disabled or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def adapter_parameters(self, adapter_name: str) -> Iterator[tuple[str, nn.Parameter]]:
        if adapter_name in self.modules_to_save:
            yield from self.modules_to_save[adapter_name].named_parameters()

    def forward(self, *args, **kwargs):
        if self.mixed_rows is not None:
            return self._mixed_forward(*args, **kwargs)
        return self.active_module()(*args, **kwargs)

    def _mixed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each row of `x` through its adapter's copy, or the original where that adapter has none: one call per
        distinct module, as peft does (these are heads and embeddings, not worth a gathered matmul)."""
        names = self.mixed_rows.get(x.shape[0])
        if names is None:
            raise ValueError(f"A mixed-adapter batch was set up for {' or '.join(map(str, sorted(self.mixed_rows)))} "
                             f"rows, but a modules_to_save module got {x.shape[0]}.")
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(names):
            groups.setdefault(name if name in self.modules_to_save else "", []).append(row)
        modules = {name: self.modules_to_save[name] if name else self.original_module for name in groups}
        if len(groups) == 1:
            return modules[next(iter(groups))](x, *args, **kwargs)
        out = None
        for name, rows in groups.items():
            index = torch.tensor(rows, device=x.device)
            part = modules[name](x.index_select(0, index), *args, **kwargs)
            if out is None:
                out = part.new_empty((x.shape[0], *part.shape[1:]))
            out = out.index_copy(0, index, part)  # out of place: autograd takes each part's gradient back
        return out

    # transformers reads `.weight` of input/output embeddings (resize, tying checks, generation).
    @property
    def weight(self) -> nn.Parameter:
        return self.active_module().weight


def share_tied_parameters(
    original: nn.Module, clone: nn.Module, owner: tuple[nn.Module, nn.Module]
) -> None:
    """Point `clone`'s parameters at the owner's copy wherever `original` shares them with the owner."""
    owner_original, owner_copy = owner
    owner_params = dict(owner_original.named_parameters())
    owner_copy_params = dict(owner_copy.named_parameters())
    for name, param in list(original.named_parameters()):
        for owner_name, owner_param in owner_params.items():
            if param is owner_param:
                module_path, _, leaf = name.rpartition(".")
                target = clone.get_submodule(module_path) if module_path else clone
                setattr(target, leaf, owner_copy_params[owner_name])
