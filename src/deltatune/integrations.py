"""transformers.Trainer support: checkpoints that hold the adapter in peft's layout, not a copy of the whole model.

Trainer knows peft's own PeftModel class only; given deltatune's, it saves `model.state_dict()` (every base
weight) into each checkpoint. The callback fixes that through Trainer's public callback hooks:

    trainer = Trainer(model=peft_model, args=args, train_dataset=data, callbacks=[PeftSaveCallback()])

- on_init_end: turns off `args.remove_unused_columns` (with a warning): Trainer keeps only the dataset columns
  named in the model's forward signature, and PeftModel.forward takes `**kwargs`, so every column would go;
- on_save: writes the adapter (adapter_config.json + adapter_model.safetensors) into checkpoint-N, and replaces
  the full-model weights file Trainer wrote there with the trainable tensors alone, under the names of the
  model Trainer holds: `trainer.train(resume_from_checkpoint=...)` then restores them (Trainer logs the frozen
  base weights as "missing keys": they were never saved, and stay as loaded).
The optimizer, scheduler and RNG files Trainer writes beside them are left as they are.

TRL's SFTTrainer patches the forward of the model it is given and only unwraps peft's own PeftModel class, so
give it the transformers model that carries the injected layers, and the PeftModel to the callback:

    SFTTrainer(model=peft_model.get_base_model(), ..., callbacks=[PeftSaveCallback(peft_model)])

(layer methods such as LoRA, IA3 and bottleneck adapters; prompt-learning methods need the PeftModel's forward).
"""

from __future__ import annotations

import os
import re
import warnings

from safetensors.torch import save_file
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from deltatune.peft_model import PeftModel

# The full model Trainer may have saved beside the adapter: whole files, or shards and their index.
FULL_MODEL_FILES = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")


def _unwrap(model):
    while not isinstance(model, PeftModel) and hasattr(model, "module"):  # DDP and similar wrappers
        model = model.module
    return model


def _peft_model(model) -> PeftModel:
    model = _unwrap(model)
    if not isinstance(model, PeftModel):
        raise TypeError(f"Trainer holds a {type(model).__name__}, not a deltatune PeftModel: pass the PeftModel to "
                        "PeftSaveCallback(peft_model).")
    return model


class PeftSaveCallback(TrainerCallback):
    """Keep Trainer checkpoints adapter-only (peft layout) and resumable; see the module docstring.

    `peft_model`: the PeftModel to save, when Trainer holds its base model (TRL); default: the model Trainer holds.
    """

    def __init__(self, peft_model: PeftModel | None = None) -> None:
        self.peft_model = peft_model

    def on_init_end(self, args, state, control, **kwargs):
        if args.remove_unused_columns and self.peft_model is None:
            warnings.warn("PeftSaveCallback: setting remove_unused_columns=False (a PeftModel's forward takes "
                          "**kwargs, so Trainer would drop every dataset column).", stacklevel=2)
            args.remove_unused_columns = False
        return control

    def on_save(self, args, state, control, model=None, **kwargs):
        if not args.should_save:
            return control
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        peft_model = self.peft_model or _peft_model(model)
        peft_model.save_pretrained(folder)  # peft's layout: "default" at the top, other adapters in subfolders
        for name in os.listdir(folder):
            if FULL_MODEL_FILES.fullmatch(name) and os.path.isfile(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))
        trainable = {name: p.detach().cpu().contiguous() for name, p in _unwrap(model).named_parameters()
                     if p.requires_grad}
        save_file(trainable, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return control


__all__ = ["PeftSaveCallback"]
