"""gpt2-scratch: GPT-2 written from scratch in PyTorch, native to the Hugging Face ecosystem.

The one importable name of the project. Its stages are subpackages: the model (this folder),
``gpt2_scratch.convert`` (weights in and out), ``gpt2_scratch.train`` (the training loop and its
tasks), ``gpt2_scratch.eval`` (responses and the LLM judge) and ``gpt2_scratch.core`` (what they all
share). In a checkout they are the top-level folders convert/, train/, eval/ and core/; pyproject.toml
maps them into this package.

    from gpt2_scratch import GPT2ScratchForCausalLM, get_tokenizer

Importing this package is instant: torch and transformers load when a name below is first used
(the command line and the judge need neither to start). It registers the model with transformers' Auto
classes, so ``AutoModelForCausalLM.from_pretrained(dir)`` works on our folders without
trust_remote_code: at once if transformers is already imported, otherwise right after transformers is
(a one-time import hook), or at the first use of a model name here; ``gpt2_scratch.register()`` does it
explicitly.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys
from typing import Any

__version__ = "0.1.0"

# Public name -> the module (relative to this package) that defines it.
_EXPORTS = {
    "GPT2ScratchConfig": ".configuration_gpt2_scratch",
    "HUB_ID_OF_PRESET": ".configuration_gpt2_scratch",
    "OPENAI_SIZE_OF_PRESET": ".configuration_gpt2_scratch",
    "PRESETS": ".configuration_gpt2_scratch",
    "GPT2ScratchModel": ".modeling_gpt2_scratch",
    "GPT2ScratchForCausalLM": ".modeling_gpt2_scratch",
    "GPT2ScratchForSequenceClassification": ".modeling_gpt2_scratch",
    "save_model_dir": ".model_dir",
    "generate_responses": ".responses",
    "ENDOFTEXT": ".tokenizer",
    "ENDOFTEXT_ID": ".tokenizer",
    "get_encoding": ".tokenizer",
    "get_tokenizer": ".tokenizer",
    "PROMPT_STYLES": ".core.prompts",
    "chat_messages": ".core.prompts",
    "chat_template": ".core.prompts",
    "extract_response": ".core.prompts",
    "format_example": ".core.prompts",
    "format_input": ".core.prompts",
    "generation_prompt": ".core.prompts",
    "response_header": ".core.prompts",
}
__all__ = sorted(_EXPORTS) + ["register"]

_registered = False


def register() -> None:
    """Register our config and models with transformers' Auto classes (in this process), and make saved
    folders carry ``auto_map`` plus the modeling code, so a process without this package loads them with
    ``trust_remote_code=True``. Idempotent; called on the first use of any model name of this package."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    from .configuration_gpt2_scratch import GPT2ScratchConfig
    from .modeling_gpt2_scratch import GPT2ScratchForCausalLM, GPT2ScratchForSequenceClassification, GPT2ScratchModel

    AutoConfig.register(GPT2ScratchConfig.model_type, GPT2ScratchConfig, exist_ok=True)
    AutoModel.register(GPT2ScratchConfig, GPT2ScratchModel, exist_ok=True)
    AutoModelForCausalLM.register(GPT2ScratchConfig, GPT2ScratchForCausalLM, exist_ok=True)
    AutoModelForSequenceClassification.register(GPT2ScratchConfig, GPT2ScratchForSequenceClassification,
                                                exist_ok=True)
    GPT2ScratchConfig.register_for_auto_class()
    GPT2ScratchForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    GPT2ScratchForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
    _registered = True


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Registers our classes right after ``transformers`` itself is imported (then steps aside), so that
    ``import gpt2_scratch`` stays instant and ``AutoModel*`` still knows our model type."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)  # one use; find the real spec without us
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_register(module) -> None:
            exec_module(module)
            if any(f"{__name__}.{m}" in sys.modules for m in ("configuration_gpt2_scratch", "modeling_gpt2_scratch")):
                return  # our own modules are importing transformers: they register when they are done
            try:
                register()
            except Exception as err:  # never break the user's `import transformers`
                logging.getLogger(__name__).warning("gpt2_scratch: could not register with transformers' Auto "
                                                    "classes (%s: %s)", type(err).__name__, err)

        loader.exec_module = exec_then_register
        return spec


def _register_with_transformers() -> None:
    if "transformers" in sys.modules:
        register()
    elif not any(isinstance(finder, _RegisterAfterTransformers) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTransformers())


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gpt2_scratch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    if not module.startswith(".core"):
        register()
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


_register_with_transformers()
