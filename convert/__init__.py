"""Weights in and out of gpt2-scratch: OpenAI's TensorFlow checkpoint read without TensorFlow,
Hugging Face safetensors both ways, the book's .pth both ways, GGUF out.

    from gpt2_scratch.convert import load_model          # "gpt2-medium" | model folder | HF repo id
    gpt2-scratch convert openai --size 355M --out models/gpt2-medium

Modules: tf_bundle (the checkpoint reader), mapping (name tables and checks), build (assembling
our model without extra copies), openai / hf (the sources), resolve (what a --model string names),
book (the book's .pth), gguf (llama.cpp and Ollama), cli (the commands). Downloads go through core.download.
"""

from gpt2_scratch.convert.errors import BundleError, ConvertError
from gpt2_scratch.convert.resolve import load_model

__all__ = ["BundleError", "ConvertError", "load_model"]
