"""gpt2-scratch: GPT-2 written from scratch in PyTorch, native to the Hugging Face ecosystem.

Importing this package registers the model with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(dir)`` works on our directories without trust_remote_code.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .configuration_gpt2_scratch import HUB_ID_OF_PRESET, OPENAI_SIZE_OF_PRESET, PRESETS, GPT2ScratchConfig
from .model_dir import save_model_dir
from .modeling_gpt2_scratch import (
    GPT2ScratchForCausalLM,
    GPT2ScratchForSequenceClassification,
    GPT2ScratchModel,
)
from core.prompts import PROMPT_STYLES, extract_response, format_example, format_input, response_header
from .responses import generate_responses
from .tokenizer import ENDOFTEXT, ENDOFTEXT_ID, get_encoding, get_tokenizer

__version__ = "0.1.0"

# In this process: resolve model_type "gpt2-scratch" to our classes.
AutoConfig.register(GPT2ScratchConfig.model_type, GPT2ScratchConfig, exist_ok=True)
AutoModel.register(GPT2ScratchConfig, GPT2ScratchModel, exist_ok=True)
AutoModelForCausalLM.register(GPT2ScratchConfig, GPT2ScratchForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(GPT2ScratchConfig, GPT2ScratchForSequenceClassification, exist_ok=True)
# In saved directories: write auto_map and copy the config/modeling code beside the weights, so a
# process without this package loads them with trust_remote_code=True.
GPT2ScratchConfig.register_for_auto_class()
GPT2ScratchForCausalLM.register_for_auto_class("AutoModelForCausalLM")
GPT2ScratchForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "ENDOFTEXT",
    "ENDOFTEXT_ID",
    "HUB_ID_OF_PRESET",
    "OPENAI_SIZE_OF_PRESET",
    "PRESETS",
    "PROMPT_STYLES",
    "GPT2ScratchConfig",
    "GPT2ScratchForCausalLM",
    "GPT2ScratchForSequenceClassification",
    "GPT2ScratchModel",
    "extract_response",
    "format_example",
    "format_input",
    "generate_responses",
    "get_encoding",
    "get_tokenizer",
    "response_header",
    "save_model_dir",
]
