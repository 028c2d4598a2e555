"""deltatune: parameter-efficient fine-tuning with peft's API and peft-compatible adapter files."""

import deltatune.methods  # noqa: F401  (registers every built-in method in deltatune.registry)
from deltatune.auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from deltatune.checkpoint import AdapterLoadError, get_peft_model_state_dict, set_peft_model_state_dict
from deltatune.config import PeftConfig, PeftType, TaskType
from deltatune.injection import inject_adapter_in_model
from deltatune.methods.bitfit import BitFitConfig
from deltatune.methods.bottleneck import BottleneckConfig
from deltatune.methods.ia3 import IA3Config
from deltatune.methods.ln_tuning import LNTuningConfig
from deltatune.methods.lora import LoraConfig
from deltatune.methods.lora.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from deltatune.methods.lora.loraplus import create_loraplus_optimizer
from deltatune.methods.p_tuning import PromptEncoderConfig, PromptEncoderReparameterizationType
from deltatune.methods.prefix_tuning import PrefixTuningConfig
from deltatune.methods.prompt_tuning import PromptTuningConfig, PromptTuningInit
from deltatune.peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
)
from deltatune.quantized.training import cast_mixed_precision_params, prepare_model_for_kbit_training
from deltatune.status import get_layer_status, get_model_status

__version__ = "0.1.0"

__all__ = [
    "BitFitConfig",
    "BottleneckConfig",
    "IA3Config",
    "LNTuningConfig",
    "AdapterLoadError",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "LoraConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptTuningConfig",
    "PromptTuningInit",
    "PeftConfig",
    "PeftType",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "TaskType",
    "cast_mixed_precision_params",
    "get_layer_status",
    "get_model_status",
    "get_peft_model",
    "hotswap_adapter",
    "prepare_model_for_compiled_hotswap",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "prepare_model_for_kbit_training",
    "set_peft_model_state_dict",
    "create_loraplus_optimizer",
]
