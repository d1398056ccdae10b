"""GPT-2, written from scratch, read top to bottom: attention → MLP → block → transformer → heads.

The architecture is the book's (chapter 4) and OpenAI's: token + position embeddings, pre-LayerNorm
blocks, causal multi-head attention with one fused qkv projection, a tanh-GELU MLP four times as
wide, a final LayerNorm and an LM head tied to the token embedding (untied with
``tie_word_embeddings=False``: the book's finetuned models train their ``out_head`` apart from it).

Parameter names follow transformers' GPT-2 (``transformer.wte``, ``transformer.h.N.attn.c_attn``,
``lm_head``) so a checkpoint is recognizable. The two widening projections (``c_attn``, ``c_fc``)
store their weights [in, out] as OpenAI and transformers do; the two narrowing ones (``c_proj``)
are ``nn.Linear`` [out, in]. `WideningProjection` says why; converting from Hugging Face is a prefix
strip plus a transpose of the two ``c_proj`` weights.

This file is copied next to every saved model (``save_pretrained`` writes it with ``auto_map``), so
it may import nothing from this project except, relatively, the configuration file.
"""

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast, SequenceClassifierOutputWithPast
from transformers.pytorch_utils import Conv1D

from .configuration_gpt2_scratch import GPT2ScratchConfig

# transformers renamed the KV cache from ``past_key_values`` to ``cache`` during 5.x (generate() now
# passes and reads back ``cache``); outputs are built with whichever field this version declares.
_OUTPUT_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# A target that is not one: padding, and with a masked prompt the prompt (torch's cross_entropy skips it).
IGNORE_INDEX = -100


def label_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The log-probability of each target under its logits, in fp32 (even under bf16 autocast): (N, vocab),
    (N,) -> (N,). The one loss path of the project: the LM loss is minus their mean (or sum), DPO sums
    them per sequence, and the book's exact loop takes their mean."""
    return -F.cross_entropy(logits.float(), targets, reduction="none")


@dataclass
class GPT2ScratchCausalLMOutput(CausalLMOutputWithPast):
    """transformers' causal-LM output plus ``label_logprobs``: the log-probability of each target, for the
    positions that have one (in row-major order), when targets were given."""

    label_logprobs: torch.FloatTensor | None = None


class WideningProjection(Conv1D):
    """``x @ weight + bias`` with the weight stored [in, out]: for projections wider out than in.

    Generating one token at a time makes every projection a matrix-vector product, whose speed is
    reading the weight from memory, and CPU BLAS reads a weight fastest along its longer dimension:
    c_fc (768 → 3072) stored [in, out] takes 510 µs per token, stored [out, in] 777 µs; the narrowing
    c_proj (3072 → 768) is the other way round, 535 vs 670 µs (MKL, fp32, 2 cores;
    ``python bench/bench_model.py --layouts``). Matrix-matrix products in training do not care. So
    c_attn and c_fc store [in, out], which is also OpenAI's and transformers' layout, and the c_proj
    layers stay nn.Linear [out, in].

    transformers' Conv1D is this layout; subclassing it lets tools that know GPT-2 (peft's LoRA, for
    one) treat the layer as they treat GPT-2's. Unlike Conv1D, the bias is optional (the book's
    qkv_bias=False).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(nf=out_features, nx=in_features)  # weight (in, out) ~ N(0, 0.02), bias zeros
        if not bias:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.t(), self.bias)  # (..., in) → (..., out); addmm on [in, out]


def keep_mask(shape: torch.Size, p: float, dtype: torch.dtype = torch.bool) -> tuple[torch.Tensor, float]:
    """A dropout mask from 16 random bits per element: (True, or 1 in ``dtype``, where kept, with probability
    1 - p to within 1/65536; the scale 1 / that probability, so the kept values' expectation is exact).

    torch's CPU dropout draws a Bernoulli sample per element (``bernoulli_``: about 4.4 ns each on this
    project's 2-core CPU). One 64-bit draw of torch's generator over int64's whole range (``random_`` from
    -2**63: 64 random bits, about 2.8 ns) gives four 16-bit numbers, each compared with a threshold, and the
    comparison writes ``dtype`` directly (a bf16 mask so costs a sixth of a boolean one converted after): an
    [2, 12, 256, 256] bf16 attention mask takes about 1.1 ms instead of 6.6 (bench/README.md, "Pretraining").
    The bits come from the same global generator, so ``manual_seed``, checkpointed RNG states and activation
    checkpointing's replay give the same masks; the masks differ from ``nn.Dropout``'s, which is why the
    book-exact loops do not use this.
    """
    kept = _kept_of_65536(p)
    if kept in (0, 65536):
        return torch.full(shape, bool(kept), dtype=dtype), float(bool(kept))
    n = math.prod(shape)
    bits = _random_words(n)[:n].view(shape)
    return torch.lt(bits, kept - 32768, out=torch.empty(shape, dtype=dtype)), 65536 / kept


def causal_keep_mask(shape: torch.Size, p: float, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """``keep_mask`` for causal attention's weights (..., T, T), T even, drawing bits for the lower triangle
    only: above the diagonal the weights are zeros, whatever multiplies them.

    Query rows i and T-1-i need i+1 and T-i bits, T+1 together: one row of T+1 random words per such pair,
    row i reading its start and row T-1-i the rest (a view that steps T+2 words per pair, turned upside
    down). Every weight on or below the diagonal gets its own word; above it a row reads its neighbour's,
    which is never used. Half the draws of ``keep_mask``: an [2, 12, 256, 256] bf16 mask in 0.7 ms, not 1.1.
    """
    *lead, T, keys = shape
    kept = _kept_of_65536(p)
    if kept in (0, 65536) or T != keys or T % 2:
        return keep_mask(shape, p, dtype)
    pairs, half, matrices = T + 1, T // 2, math.prod(lead)
    per_matrix = half * pairs
    words = _random_words(matrices * per_matrix + T)  # + T: the last pair's view runs past its words
    first_rows = words[:matrices * per_matrix].view(matrices, half, pairs)[:, :, :T]  # rows 0 .. T/2-1
    last_rows = words.as_strided((matrices, half, T), (per_matrix, T + 2, 1), 1).flip(1)  # rows T/2 .. T-1
    keep = torch.empty(matrices, T, T, dtype=dtype)
    torch.lt(first_rows, kept - 32768, out=keep[:, :half])
    torch.lt(last_rows, kept - 32768, out=keep[:, half:])
    return keep.view(shape), 65536 / kept


def _kept_of_65536(p: float) -> int:
    """How many of the 65536 values of 16 random bits keep an element: 0 or 65536 when p is within
    1/131072 of 1 or 0 (an int16 threshold could not say 65536)."""
    return round((1.0 - p) * 65536)


def _random_words(n: int) -> torch.Tensor:
    """At least ``n`` int16 words of random bits, uniform over [-32768, 32767], from torch's generator."""
    words = torch.empty((n + 3) // 4 * 4, dtype=torch.int16)
    # From int64's minimum to its end (to=None) is the whole 64-bit range, one full draw per four words
    # ([0, 2**63) would leave the top word one bit short).
    words.view(torch.int64).random_(-(2**63), None)
    return words


def drop_with_bits(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout of ``x`` with ``keep_mask``'s mask, as torch's dropout applies its own: ``x`` times a noise
    tensor of its dtype (0 or the scale), which autograd keeps for the backward pass. Multiplying by the
    boolean mask instead would convert it to ``x``'s dtype twice, forward and backward."""
    keep, scale = keep_mask(x.shape, p, x.dtype)
    return x * keep.mul_(scale)


def fast_masks_here(x: torch.Tensor) -> bool:
    """Whether ``keep_mask`` beats torch's dropout for ``x``: on CPU and eager. GPUs have a fused dropout kernel,
    and under torch.compile inductor draws dropout masks with its own fast generator (``random_`` would
    break the graph)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


class Dropout(nn.Dropout):
    """``nn.Dropout``; with ``fast_masks`` set (the training commands set it through
    ``use_fast_dropout_masks``), its mask comes from ``keep_mask`` where ``fast_masks_here``."""

    fast_masks = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast_masks and self.training and self.p > 0 and fast_masks_here(x):
            return drop_with_bits(x, self.p)
        return super().forward(x)


def attend_with_fast_dropout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
                             p: float) -> torch.Tensor:
    """softmax(QK^T / sqrt(d), where allowed) with ``keep_mask`` dropout, times V: (B, nh, T, hs).

    What SDPA computes with ``dropout_p``, for training on CPU: there SDPA's fused kernels take no dropout, and
    its math path draws torch's Bernoulli masks, upcasts bf16 to fp32 and guards against rows with no allowed
    key (a padding query always sees itself here: ``build_attention_mask``). Here the [T, T] weights are made
    in as few passes as they can be: the causal mask and the scale inside the product (``baddbmm`` of an
    additive -inf bias), the softmax in the inputs' precision (computed in fp32 inside, rounded once, as the
    bf16 product with V would round it anyway), the dropout's rescaling on the hs-wide output, and a causal
    mask's random bits drawn for the lower triangle only (``causal_keep_mask``). One gpt2-small layer's
    forward and backward at 2 x 256 tokens on this project's CPU: through SDPA with dropout about 17 ms in
    fp32 and in bf16, here about 10 and 4.7 ms.
    """
    B, nh, T, hs = q.shape
    scale = 1.0 / math.sqrt(hs)
    if allowed is None:  # causal (queries and keys start together: no cache while training): one fused product
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1)
        bias = torch.zeros(T, T, dtype=q.dtype, device=q.device).masked_fill_(future, float("-inf"))
        scores = torch.baddbmm(bias, q.reshape(B * nh, T, hs), k.reshape(B * nh, T, hs).transpose(1, 2),
                               alpha=scale).view(B, nh, T, T)
    else:  # padding: a mask per sequence, (B, 1, T, T)
        scores = ((q * scale) @ k.transpose(-2, -1)).masked_fill_(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    mask = causal_keep_mask if allowed is None else keep_mask
    keep, rescale = mask(weights.shape, p, weights.dtype)
    return ((weights * keep).to(v.dtype) @ v) * rescale


def short_bf16_on_cpu(q: torch.Tensor, k: torch.Tensor, max_keys: int = 256) -> bool:
    """Whether SDPA's plain softmax(QK^T)V path beats its flash kernel here.

    On CPU in bf16 the flash kernel is slow for short sequences: forward + backward of one gpt2-small
    layer at 72 tokens takes 14 ms against 7.8 ms for the plain path, which materialises the T x T
    scores; by 200 tokens they are even and the scores grow quadratically, so the plain path is used
    only up to `max_keys` keys (bench/bench_model.py: training step, bf16). Only whole sequences
    (training, prefill) take it; decoding steps against the KV cache and fp32 keep the flash kernel.
    """
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[2] == k.shape[2]
            and k.shape[2] <= max_keys)


class CausalSelfAttention(nn.Module):
    """Multi-head attention where each position sees itself and the positions before it."""

    def __init__(self, config: GPT2ScratchConfig, layer_idx: int):
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.emb_dim // config.n_heads
        self.layer_idx = layer_idx  # which slot of the KV cache is ours
        self.c_attn = WideningProjection(config.emb_dim, 3 * config.emb_dim, bias=config.qkv_bias)  # fused q, k, v
        self.c_proj = nn.Linear(config.emb_dim, config.emb_dim)
        self.attn_dropout = config.drop_rate
        self.resid_dropout = Dropout(config.drop_rate)
        self.fast_masks = False  # see Dropout

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        B, T, E = x.shape
        q, k, v = self.c_attn(x).split(E, dim=2)  # 3 × (B, T, E)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            # Append this step's keys/values; get back everything seen so far.
            k, v = cache.update(k, v, self.layer_idx)  # (B, nh, T_past + T, hs)
        if self.fast_masks and self.training and self.attn_dropout > 0 and cache is None and fast_masks_here(q):
            y = attend_with_fast_dropout(q, k, v, attn_mask, self.attn_dropout)
        else:
            y = self.sdpa(q, k, v, attn_mask, cache)
        y = y.transpose(1, 2).reshape(B, T, E)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))

    def sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
             cache: Cache | None) -> torch.Tensor:
        """torch's scaled-dot-product attention: (B, nh, T, hs)."""
        with sdpa_kernel(SDPBackend.MATH) if short_bf16_on_cpu(q, k) else nullcontext():
            return F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=self.attn_dropout if self.training else 0.0,
                is_causal=attn_mask is None and self_attends_causally(q, k, cache),
            )  # (B, nh, T, hs)


def self_attends_causally(q: torch.Tensor, k: torch.Tensor, cache: Cache | None) -> bool:
    """Whether SDPA's built-in causal mask (top-left aligned) is the right one: only when queries and keys start
    at the same position. Without a cache that is always so, and the answer must not read a shape: under
    torch.compile with a dynamic length, ``q.shape[2] == k.shape[2]`` is a symbolic bool that SDPA refuses,
    and the whole forward would fall back to eager. With a cache, the keys include the past: causal only
    while it is empty (the prefill), and a single new token attends to everything (no mask at all)."""
    if cache is None:
        return True  # a single position attends to itself alone: causal or not, the same result
    return q.shape[2] == k.shape[2] and q.shape[2] > 1


class MLP(nn.Module):
    """Position-wise feed-forward network: expand 4x, tanh-approximated GELU (as GPT-2), project back."""

    def __init__(self, config: GPT2ScratchConfig):
        super().__init__()
        self.c_fc = WideningProjection(config.emb_dim, 4 * config.emb_dim)
        self.c_proj = nn.Linear(4 * config.emb_dim, config.emb_dim)
        self.dropout = Dropout(config.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(GradientCheckpointingLayer):
    """One transformer block: pre-LayerNorm attention and MLP, each added to the residual stream.

    The unit of activation checkpointing (``model.activation_checkpointing_enable()``, or the older
    ``gradient_checkpointing_enable()``): transformers' ``GradientCheckpointingLayer`` then keeps only
    each block's input during the forward pass and recomputes the block in the backward pass, with the
    same random draws (dropout), so the gradients are those of a plain step. The KV cache is passed by
    keyword: under checkpointing the layer drops it (a replayed block would append to it twice).
    """

    def __init__(self, config: GPT2ScratchConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.emb_dim, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.emb_dim, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask, cache):
        x = x + self.attn(self.ln_1(x), attn_mask, cache)
        return x + self.mlp(self.ln_2(x))


def build_attention_mask(
    attention_mask: torch.Tensor | None, query_length: int, past_length: int
) -> torch.Tensor | None:
    """The boolean SDPA mask (B, 1, T, T_past + T): True where a query may look at a key.

    None when SDPA's built-in causal path (or no mask at all, for a single new token) is exact,
    which is every training step without padding and every unpadded decoding step.
    """
    total_length = past_length + query_length
    has_padding = attention_mask is not None and not bool(attention_mask.all())  # host sync, once per forward
    if not has_padding and (past_length == 0 or query_length == 1):
        return None
    device = attention_mask.device if attention_mask is not None else None
    query_pos = torch.arange(past_length, total_length, device=device)[:, None]  # (T, 1)
    key_pos = torch.arange(total_length, device=device)[None, :]  # (1, T_total)
    allowed = (key_pos <= query_pos)[None, None]  # (1, 1, T, T_total) causal
    if has_padding:
        allowed = allowed & attention_mask[:, None, None, -total_length:].bool()  # (B, 1, T, T_total)
        # A padding query would otherwise see no key at all, and SDPA turns an empty row into NaN,
        # which then leaks through the cached values. Let every query see itself: real tokens never
        # look at padding keys, so their outputs are unchanged.
        allowed = allowed | (key_pos == query_pos)[None, None]
    return allowed


class GPT2ScratchPreTrainedModel(PreTrainedModel):
    """Ties our config to transformers' loading, saving, init and device-placement machinery."""

    config_class = GPT2ScratchConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["Block"]
    _supports_sdpa = True
    supports_gradient_checkpointing = True  # per Block: see Block

    def use_fast_dropout_masks(self, enabled: bool = True) -> None:
        """Draw dropout masks on CPU from 16 random bits per element (``keep_mask``) instead of torch's
        Bernoulli samples, and attend with ``attend_with_fast_dropout`` while training with dropout: the same
        dropout rate and expectation, different masks, a faster step. The training commands turn it on
        (except ``--book-exact``, which draws the book's masks); a model starts with torch's."""
        for module in self.modules():
            if isinstance(module, (Dropout, CausalSelfAttention)):
                module.fast_masks = enabled

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2's init: N(0, 0.02) weights, zero biases, unit LayerNorm gains; the projections into the
        # residual stream are scaled down by sqrt(2 · n_layers) so the stream's variance stays bounded.
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, WideningProjection)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        if isinstance(module, (CausalSelfAttention, MLP)):
            nn.init.normal_(module.c_proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layers))


class GPT2ScratchModel(GPT2ScratchPreTrainedModel):
    """The transformer body: embeddings, blocks, final LayerNorm. Returns hidden states (B, T, E)."""

    def __init__(self, config: GPT2ScratchConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.emb_dim)
        self.wpe = nn.Embedding(config.context_length, config.emb_dim)
        self.drop = Dropout(config.drop_rate)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.emb_dim, eps=config.layer_norm_epsilon)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.wte = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
    ) -> tuple[torch.Tensor, Cache | None]:
        B, T = input_ids.shape
        cache = cache if cache is not None else past_key_values  # older transformers 5.x and callers use this name
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None
        past_length = cache.get_seq_length() if cache is not None else 0

        if past_length + T > self.config.context_length:
            raise ValueError(
                f"sequence of {past_length + T} tokens is longer than the context length "
                f"{self.config.context_length}; crop the input to its last {self.config.context_length} tokens"
            )
        if position_ids is None:
            if attention_mask is not None:
                # Count only real tokens, so left padding does not shift the positions.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]  # (B, T)
            else:
                position_ids = torch.arange(past_length, past_length + T, device=input_ids.device)[None]  # (1, T)

        try:
            tokens = self.wte(input_ids)  # (B, T, E)
        except IndexError:
            # Checked only on failure: a range check before every decoding step would cost a host sync.
            bad = input_ids[(input_ids < 0) | (input_ids >= self.config.vocab_size)]
            raise ValueError(
                f"token id {bad[0].item()} is outside the vocabulary [0, {self.config.vocab_size})"
            ) from None
        x = self.drop(tokens + self.wpe(position_ids))  # (B, T, E)
        attn_mask = build_attention_mask(attention_mask, T, past_length)
        for block in self.h:
            x = block(x, attn_mask, cache=cache)
        return self.ln_f(x), cache


class _VocabProduct(torch.autograd.Function):
    """``x @ weight.T`` for an [vocab, E] weight, whose weight gradient is computed in slices of the vocabulary
    (``VocabProjection`` says why): the forward product and the input's gradient are nn.Linear's, one product
    each. Under CPU autocast both inputs are cast as autocast casts a linear's, and the weight's gradient is
    written in the weight's dtype slice by slice, as autocast's cast back would give it."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, chunk: int) -> torch.Tensor:
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else weight.dtype
        x = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
        w = weight.to(dtype)
        ctx.save_for_backward(x, w)
        ctx.chunk, ctx.hidden_shape, ctx.hidden_dtype, ctx.weight_dtype = chunk, hidden.shape, hidden.dtype, weight.dtype
        return (x @ w.t()).view(*hidden.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad_logits: torch.Tensor):
        x, w = ctx.saved_tensors
        vocab, chunk = w.shape[0], ctx.chunk
        grad = grad_logits.reshape(-1, vocab).to(x.dtype)
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (grad @ w).view(ctx.hidden_shape).to(ctx.hidden_dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.empty(w.shape, dtype=ctx.weight_dtype, device=w.device)
            for start in range(0, vocab, chunk):
                rows = slice(start, start + chunk)
                if grad_weight.dtype == x.dtype:
                    torch.mm(grad[:, rows].t(), x, out=grad_weight[rows])
                else:  # autocast: the bf16 slice, then its fp32 copy while it is still in cache
                    grad_weight[rows].copy_(grad[:, rows].t() @ x)
        return grad_hidden, grad_weight, None


class VocabProjection(nn.Linear):
    """The LM head: ``nn.Linear(E, vocab, bias=False)`` whose weight gradient is computed in slices of the
    vocabulary while training on CPU.

    That gradient, ``grad.T @ x`` ([vocab, tokens] x [tokens, E]), is a tall product oneDNN is slow on as one
    bf16 call: at 512 tokens of gpt2-small it took 59 to 80 ms against 44 to 48 ms for the same product in
    seven slices of 8192 rows (this project's 2-core AMD EPYC; the forward product and the input's gradient
    are as fast whole, and fp32 is alike both ways: bench/README.md, "Pretraining"). Each slice is the same
    dot products as the whole product's rows, so the gradient equals nn.Linear's.
    Everywhere else (no gradient for the weight, GPUs, torch.compile, a few rows) it is nn.Linear.
    """

    chunk = 8192  # vocabulary rows per slice (4096 to 16384 time alike)
    min_rows = 64  # fewer positions than this: nn.Linear (nothing to gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        sliced = (weight.requires_grad and torch.is_grad_enabled() and x.device.type == "cpu"
                  and self.bias is None and weight.shape[0] > self.chunk and type(weight) is nn.Parameter
                  and x.numel() >= self.min_rows * x.shape[-1]
                  and (torch.is_autocast_enabled("cpu") or x.dtype == weight.dtype)
                  and not torch.compiler.is_compiling())
        if not sliced:
            return super().forward(x)
        return _VocabProduct.apply(x, weight, self.chunk)


class GPT2ScratchForCausalLM(GPT2ScratchPreTrainedModel, GenerationMixin):
    """GPT-2 with its language-modeling head: next-token logits over the vocabulary."""

    # The head is the token embedding, transposed (one tensor, as in GPT-2), unless the config unties it.
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: GPT2ScratchConfig):
        super().__init__(config)
        self.transformer = GPT2ScratchModel(config)
        self.lm_head = VocabProjection(config.emb_dim, config.vocab_size, bias=False)
        self.post_init()
        if self.generation_config is not None:
            # GPT-2 has no pad token; batched generation pads with <|endoftext|>, as the book does.
            self.generation_config.pad_token_id = config.eos_token_id

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_logits: bool = True,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> GPT2ScratchCausalLMOutput:
        """Logits (B, T, vocab) and, given targets, the mean cross-entropy over targets that are not -100
        (``IGNORE_INDEX``) and each target's log-probability (``label_logprobs``).

        Targets come in one of two conventions:
          labels: aligned with input_ids, shifted here (Hugging Face's convention: labels = input_ids).
          shift_labels: already the next token of each position (the book's collate makes these).
        ``num_items_in_batch`` (in kwargs) turns the mean into sum / that count, for gradient
        accumulation normalised by target tokens. ``logits_to_keep=n`` computes logits for the last n
        positions only (generate() asks for 1 while prefilling: the vocabulary projection is costly).
        ``return_logits=False`` with targets skips the logits of the output and projects only the
        positions that have a target: padding and masked prompts cost no vocabulary projection, which
        is about a third of GPT-2 small's compute per token. Training loops use it.

        The KV cache comes as ``cache`` (transformers' name since it renamed it) or, from older
        transformers and callers, as ``past_key_values``; the output carries it under the name the
        installed transformers reads back.
        """
        hidden, cache = self.transformer(
            input_ids, attention_mask, position_ids, cache, use_cache, past_key_values
        )  # (B, T, E)
        if labels is None and shift_labels is None:
            if logits_to_keep:
                hidden = hidden[:, -logits_to_keep:]
            logits = self.lm_head(hidden)  # (B, T, vocab)
            return GPT2ScratchCausalLMOutput(logits=logits, **{_OUTPUT_CACHE_FIELD: cache})

        if shift_labels is None:  # align labels with the positions that predict them
            shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        supervised = shift_labels != IGNORE_INDEX  # (B, T)
        logits = None
        if return_logits:
            logits = self.lm_head(hidden)  # (B, T, vocab)
            supervised_logits = logits[supervised]
        else:
            supervised_logits = self.lm_head(hidden[supervised])  # (N, vocab): only positions with a target
        logprobs = label_logprobs(supervised_logits, shift_labels[supervised])  # (N,)
        count = kwargs.get("num_items_in_batch")
        loss = -logprobs.sum() / (count if count is not None else supervised.sum().clamp(min=1))
        return GPT2ScratchCausalLMOutput(loss=loss, logits=logits, label_logprobs=logprobs,
                                         **{_OUTPUT_CACHE_FIELD: cache})


class GPT2ScratchForSequenceClassification(GPT2ScratchPreTrainedModel):
    """GPT-2 with a classification head read from the last real token (chapter 6: spam or not).

    The last token is the only one that has attended to the whole text, so its hidden state
    summarises it. With right padding, "last" means the last position the attention mask keeps.
    """

    def __init__(self, config: GPT2ScratchConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = GPT2ScratchModel(config)
        self.score = nn.Linear(config.emb_dim, config.num_labels)  # replaces the LM head (the book's out_head)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        num_items_in_batch: int | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        """Logits (B, num_labels); with labels, their cross-entropy: the mean over the batch, or (as the causal
        LM's, transformers' convention) the sum divided by ``num_items_in_batch`` (1 keeps the sum: training's
        ``ClassifyTask.loss``, which normalises over a whole accumulation window)."""
        B, T = input_ids.shape
        if attention_mask is not None and not bool(attention_mask.all()):
            if bool(attention_mask[:, 0].eq(0).any()):
                raise ValueError("sequence classification expects right padding (attention_mask starting with 1)")
            last = attention_mask.long().sum(-1) - 1  # (B,) index of each row's last real token
            # Padding is on the right and invisible to the causal real tokens; skip the mask so the fast
            # causal kernel runs.
            attention_mask = None
        else:
            last = torch.full((B,), T - 1, device=input_ids.device)
        hidden, _ = self.transformer(input_ids, attention_mask, use_cache=False)  # (B, T, E)
        logits = self.score(hidden[torch.arange(B, device=hidden.device), last])  # (B, num_labels)
        loss = None
        if labels is not None:
            if num_items_in_batch is None:
                loss = F.cross_entropy(logits.float(), labels)
            else:
                loss = F.cross_entropy(logits.float(), labels, reduction="sum") / num_items_in_batch
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits)
