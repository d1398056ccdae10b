"""The configuration of our GPT-2: the book's field names, Hugging Face's standard names mapped onto them.

This file is copied next to every saved model (``save_pretrained`` writes it with ``auto_map``), so it
may import nothing from this project except, relatively, the modeling file.
"""

import math

from transformers import PretrainedConfig

# The four released GPT-2 sizes (OpenAI's 124M/355M/774M/1558M checkpoints), in the book's names.
PRESETS: dict[str, dict[str, int]] = {
    "gpt2-small": {"emb_dim": 768, "n_layers": 12, "n_heads": 12},  # 124M
    "gpt2-medium": {"emb_dim": 1024, "n_layers": 24, "n_heads": 16},  # 355M
    "gpt2-large": {"emb_dim": 1280, "n_layers": 36, "n_heads": 20},  # 774M
    "gpt2-xl": {"emb_dim": 1600, "n_layers": 48, "n_heads": 25},  # 1558M
}

# OpenAI's release names each checkpoint by its parameter count; the Hub keeps them as openai-community/*.
OPENAI_SIZE_OF_PRESET = {"gpt2-small": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}
HUB_ID_OF_PRESET = {"gpt2-small": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
                    "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}


class GPT2ScratchConfig(PretrainedConfig):
    """GPT-2's hyperparameters.

    Args:
        vocab_size: number of token ids (50257 for the GPT-2 BPE; 50256 is ``<|endoftext|>``).
        context_length: the most positions the model can attend over (learned position embeddings).
        emb_dim: width of the residual stream.
        n_heads: attention heads per layer; ``emb_dim`` must be divisible by it.
        n_layers: number of transformer blocks.
        drop_rate: dropout after the embeddings, on the attention weights and on both residual branches.
            0.0 as in the book's finetuning; GPT-2's pretraining used 0.1.
        qkv_bias: whether the query/key/value projection has a bias (OpenAI's weights do).
        layer_norm_epsilon: LayerNorm's epsilon (GPT-2: 1e-5).
        initializer_range: standard deviation of the normal init of fresh weights (GPT-2: 0.02).
    """

    model_type = "gpt2-scratch"
    # Standard names other tools (DynamicCache, generate, accelerate) look for.
    attribute_map = {
        "hidden_size": "emb_dim",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "max_position_embeddings": "context_length",
        "n_positions": "context_length",
        "n_embd": "emb_dim",
        "n_head": "n_heads",
        "n_layer": "n_layers",
    }

    def __init__(
        self,
        vocab_size: int = 50257,
        context_length: int = 1024,
        emb_dim: int = 768,
        n_heads: int = 12,
        n_layers: int = 12,
        drop_rate: float = 0.0,
        qkv_bias: bool = True,
        layer_norm_epsilon: float = 1e-5,
        initializer_range: float = 0.02,
        bos_token_id: int = 50256,
        eos_token_id: int = 50256,
        use_cache: bool = True,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.emb_dim = emb_dim
        self.n_heads = n_heads
        self.n_layers = n_layers
        self.drop_rate = drop_rate
        self.qkv_bias = qkv_bias
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        # Declared explicitly: transformers 5 drops generation keys passed through **kwargs, and an
        # undeclared tie_word_embeddings silently unties the head from the embedding.
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)
        self.validate_values()

    def validate_values(self) -> None:
        """Raise one clear ValueError for a configuration no model can be built from."""
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPT2ScratchConfig: {name} must be a positive integer, got {value!r}")
        if self.emb_dim % self.n_heads:
            raise ValueError(
                f"GPT2ScratchConfig: emb_dim {self.emb_dim} is not divisible by n_heads {self.n_heads}; "
                f"choose n_heads among the divisors of {self.emb_dim}"
            )
        def number(value) -> bool:  # a real number (not a bool, not NaN or infinite)
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        if not number(self.drop_rate) or not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"GPT2ScratchConfig: drop_rate must be in [0, 1), got {self.drop_rate!r}")
        # LayerNorm divides by sqrt(var + eps): a negative eps gives NaN on a constant row, 0 divides by 0.
        if not number(self.layer_norm_epsilon) or not 0.0 < self.layer_norm_epsilon < 1.0:
            raise ValueError(f"GPT2ScratchConfig: layer_norm_epsilon must be a number in (0, 1) (GPT-2: 1e-5), "
                             f"got {self.layer_norm_epsilon!r}")
        if not number(self.initializer_range) or self.initializer_range < 0:
            raise ValueError(f"GPT2ScratchConfig: initializer_range must be a number >= 0 (GPT-2: 0.02), "
                             f"got {self.initializer_range!r}")
        for name in ("qkv_bias", "tie_word_embeddings", "use_cache"):
            if not isinstance(getattr(self, name), bool):  # "false" would count as true
                raise ValueError(f"GPT2ScratchConfig: {name} must be true or false, got {getattr(self, name)!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPT2ScratchConfig":
        """The config of one of the four GPT-2 sizes, with any field overridden (e.g. tiny test models)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})
