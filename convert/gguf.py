"""Our model folder → one GGUF file for llama.cpp / Ollama, plus an Ollama Modelfile beside it.

    gpt2-scratch convert gguf --model DIR --out FILE.gguf [--dtype f32|f16|bf16|q8_0] [--prompt-style alpaca|phi3|chat]

The file uses llama.cpp's own "gpt2" architecture, so llama.cpp, Ollama, llama-cpp-python and
transformers' GGUF reader run it with no code of ours:

- Tensors follow `GGUF_RULES`, a table from our parameter names to llama.cpp's, checked like every
  converter here (`convert.mapping.plan_conversion`: every tensor consumed, every target filled, every
  shape asserted). GGUF stores matrices as torch's Linear does, [out, in]; our widening projections
  (c_attn, c_fc) store [in, out] and are transposed, the c_proj layers are already [out, in].
- llama.cpp's gpt2 graph always adds the qkv bias; a model without one (the book's qkv_bias=False)
  gets zeros, which is exact. A tied head is left out (llama.cpp and transformers then reuse the token
  embedding); an untied one is written as `output.weight`.
- `--dtype` applies to the matrices (embeddings, projections, head). Norm gains and biases (1-D) stay
  f32, as llama.cpp's own converter keeps them: its kernels expect f32 there. q8_0 blocks are 32 values
  along a row; a matrix whose rows are not a multiple of 32 falls back to f16.
- The exact GPT-2 tokenizer is embedded (the same verified encoder.json / vocab.bpe as
  `gpt2_scratch.tokenizer`), with bos = eos = pad = <|endoftext|> (50256) written explicitly: llama.cpp
  defaults GPT-2 style vocabularies to token 11, and it must not prepend a BOS our prompts never had.
- The prompt style the model was trained with goes in as `gpt2_scratch.prompt_style` and as a Jinja
  `tokenizer.chat_template` (llama.cpp servers, llama-cpp-python and transformers use it for chat): the
  very template `save_model_dir` puts in the model folder's tokenizer (`core.prompts.chat_template`), less the
  chat style's `{% generation %}` marks (transformers' own tag: the text is the same).

The Modelfile (`FILE.Modelfile`) makes `ollama create NAME -f FILE.Modelfile` a model that answers in
the trained prompt format. Its TEMPLATE is the same chat convention (`core.prompts`), written in Go's
template language from the same pieces of the style:

    the last user message is the instruction; the system message, if any, is the input.

So a user who types an instruction gets exactly ``generation_prompt({"instruction": msg}, style)``, and a
record with an input is sent as [system: input, user: instruction]. Earlier turns are not shown to the
model: it was finetuned on single prompts, and its context is short.
Sampling defaults to greedy decoding (temperature 0, no repeat penalty), what our `generate` does.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from gpt2_scratch.core.files import atomic_path
from gpt2_scratch.core.prompts import chat_template
from gpt2_scratch.convert.errors import ConvertError
from gpt2_scratch.convert.mapping import Dims, Rule, convert_tensors, embd_shape, plan_conversion

log = logging.getLogger(__name__)

DTYPES = ("f32", "f16", "bf16", "q8_0")
PROMPT_STYLE_KEY = "gpt2_scratch.prompt_style"  # our own GGUF metadata key; readers ignore unknown keys
Q8_0_BLOCK = 32  # values per q8_0 block, along a row


# ---------------------------------------------------------------------------------------------
# The tensor table: our name → llama.cpp's gpt2 name, with the layout change
# ---------------------------------------------------------------------------------------------
# Shapes are ours (the source); "transpose" turns our [in, out] into GGUF's [out, in].
GGUF_RULES: tuple[Rule, ...] = (
    Rule("transformer.wte.weight", "token_embd.weight", lambda d: (d.n_vocab, d.n_embd)),
    Rule("transformer.wpe.weight", "position_embd.weight", lambda d: (d.n_ctx, d.n_embd)),
    Rule("transformer.h.{i}.ln_1.weight", "blk.{i}.attn_norm.weight", embd_shape),
    Rule("transformer.h.{i}.ln_1.bias", "blk.{i}.attn_norm.bias", embd_shape),
    Rule("transformer.h.{i}.attn.c_attn.weight", "blk.{i}.attn_qkv.weight", lambda d: (d.n_embd, 3 * d.n_embd), "transpose"),
    Rule("transformer.h.{i}.attn.c_attn.bias", "blk.{i}.attn_qkv.bias", lambda d: (3 * d.n_embd,)),
    Rule("transformer.h.{i}.attn.c_proj.weight", "blk.{i}.attn_output.weight", lambda d: (d.n_embd, d.n_embd)),
    Rule("transformer.h.{i}.attn.c_proj.bias", "blk.{i}.attn_output.bias", embd_shape),
    Rule("transformer.h.{i}.ln_2.weight", "blk.{i}.ffn_norm.weight", embd_shape),
    Rule("transformer.h.{i}.ln_2.bias", "blk.{i}.ffn_norm.bias", embd_shape),
    Rule("transformer.h.{i}.mlp.c_fc.weight", "blk.{i}.ffn_up.weight", lambda d: (d.n_embd, 4 * d.n_embd), "transpose"),
    Rule("transformer.h.{i}.mlp.c_fc.bias", "blk.{i}.ffn_up.bias", lambda d: (4 * d.n_embd,)),
    Rule("transformer.h.{i}.mlp.c_proj.weight", "blk.{i}.ffn_down.weight", lambda d: (d.n_embd, 4 * d.n_embd)),
    Rule("transformer.h.{i}.mlp.c_proj.bias", "blk.{i}.ffn_down.bias", embd_shape),
    Rule("transformer.ln_f.weight", "output_norm.weight", embd_shape),
    Rule("transformer.ln_f.bias", "output_norm.bias", embd_shape),
)
# Only for a head that is not tied to the token embedding.
UNTIED_HEAD_RULE = Rule("lm_head.weight", "output.weight", lambda d: (d.n_vocab, d.n_embd))


# ---------------------------------------------------------------------------------------------
# Prompt templates, built from the pieces in gpt2_scratch.core.prompts so they cannot drift from training
# ---------------------------------------------------------------------------------------------
def ollama_template(style: str | None) -> str:
    """The Modelfile TEMPLATE (Go text/template, Ollama's variables): `core.prompts`' chat convention.

    With `.Messages` in it, Ollama executes it once per request with all messages (consecutive messages
    of one role merged) and `.System` = the system messages joined by blank lines. The last user message
    is the instruction and `.System` the input; an assistant message after it is a prefill, written after
    the response header (Ollama continues it), so unlike the Jinja template it gets no end-of-text.
    Without a known style: `{{ .Prompt }}`, the plain completion template (the text goes to the model as it is).
    """
    from gpt2_scratch.core.prompts import CHAT_STYLE, prompt_pieces

    if style is None:
        return "{{ .Prompt }}"
    if style == CHAT_STYLE:
        return chat_ollama_template()
    s = prompt_pieces(style)
    for text in (s.head, s.input_separator, s.response_header):
        if "{{" in text or '"""' in text:
            raise ConvertError(f"prompt style {style!r}: its text contains '{{{{' or '\"\"\"', which a Modelfile "
                               "TEMPLATE cannot hold literally")
    return ('{{ $instruction := "" }}{{ $response := "" }}{{ range .Messages }}'
            '{{ if eq .Role "user" }}{{ $instruction = .Content }}{{ $response = "" }}{{ end }}'
            '{{ if eq .Role "assistant" }}{{ $response = .Content }}{{ end }}{{ end }}'
            f"{s.head}{{{{ $instruction }}}}{{{{ if .System }}}}{s.input_separator}{{{{ .System }}}}{{{{ end }}}}"
            f"{s.response_header}{{{{ $response }}}}")


def chat_ollama_template() -> str:
    """The chat style's TEMPLATE: every turn, as training wrote it (core/prompts.py's ``conversation_segments``),
    the assistant header last. An answer's <|endoftext|> is written when the next user turn comes, so a final
    assistant message is a prefill that Ollama continues."""
    from gpt2_scratch.core.prompts import CHAT_HEADERS, END_OF_TEXT, TURN_SEPARATOR

    system, user, assistant = CHAT_HEADERS["system"], CHAT_HEADERS["user"], CHAT_HEADERS["assistant"]
    return ('{{ $open := "" }}{{ $answered := "" }}'
            f'{{{{ if .System }}}}{system}{{{{ .System }}}}{{{{ $open = "y" }}}}{{{{ end }}}}'
            "{{ range .Messages }}"
            f'{{{{ if eq .Role "user" }}}}{{{{ if $answered }}}}{END_OF_TEXT}{{{{ end }}}}'
            f"{{{{ if $open }}}}{TURN_SEPARATOR}{{{{ end }}}}{user}{{{{ .Content }}}}{TURN_SEPARATOR}{assistant}"
            '{{ $open = "y" }}{{ $answered = "" }}{{ end }}'
            '{{ if eq .Role "assistant" }}{{ .Content }}{{ $answered = "y" }}{{ end }}'
            "{{ end }}")


def modelfile_text(gguf_path: Path, modelfile_path: Path, *, style: str | None, context_length: int,
                   source: str) -> str:
    """The Modelfile: FROM the GGUF (relative to the Modelfile's folder, as Ollama resolves it)."""
    gguf_path, folder = Path(os.path.abspath(gguf_path)), Path(os.path.abspath(modelfile_path)).parent
    try:
        rel = os.path.relpath(gguf_path, folder)
        from_path = rel if rel.startswith("..") else f"./{rel}"
    except ValueError:  # another drive (Windows)
        from_path = str(gguf_path)
    if any(c.isspace() for c in from_path):
        from_path = f'"{from_path}"'
    if style is None:
        usage = ["# Prompt style unknown: the template passes your text to the model as it is (a completion",
                 "# model). Export again with --prompt-style alpaca|phi3|chat if the model was instruction-finetuned."]
    elif style == "chat":
        usage = ["# Prompt style chat: the whole conversation, as in training (### System/User/Assistant turns).",
                 "# Temperature 0 and repeat_penalty 1 give greedy decoding, as gpt2-scratch's chat does;",
                 "# an answer stops at <|endoftext|> or after 256 tokens."]
    else:
        usage = [f"# Prompt style {style}: the last user message is the instruction, the system message (if any)",
                 "# is the input. Each request is one prompt, as in training: earlier turns are not shown.",
                 "# Temperature 0 and repeat_penalty 1 give greedy decoding, as gpt2-scratch's generate does;",
                 "# an answer stops at <|endoftext|> or after 256 tokens (the book's limit for its test responses)."]
    lines = [
        f"# Written by `gpt2-scratch convert gguf` from {source}.",
        f"# ollama create NAME -f {modelfile_path.name}",
        *usage,
        f"FROM {from_path}",
        f'TEMPLATE """{ollama_template(style)}"""',
        'PARAMETER stop "<|endoftext|>"',
        f"PARAMETER num_ctx {context_length}",
        "PARAMETER temperature 0",
        "PARAMETER repeat_penalty 1",
        # A model that never writes <|endoftext|> would otherwise go on until the context is full.
        f"PARAMETER num_predict {min(256, context_length)}",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Reading our model folder
# ---------------------------------------------------------------------------------------------
def _read_config(model_dir: Path) -> dict:
    """config.json of a gpt2-scratch causal LM folder, or a one-line error naming the folder."""
    from gpt2_scratch.model_dir import is_classifier_config, read_config

    config = read_config(model_dir)
    if config.get("model_type") != "gpt2-scratch":
        kind = config.get("model_type")
        hint = (" (a transformers GPT-2: convert it first with `gpt2-scratch convert hf --from-dir DIR --out OURS`)"
                if kind == "gpt2" else "")
        raise ConvertError(f"{model_dir}: model_type {kind!r} is not a gpt2-scratch model{hint}")
    if is_classifier_config(config):
        raise ConvertError(f"{model_dir}: a text classifier (GPT2ScratchForSequenceClassification), not a language "
                           "model; only a causal LM "
                           "(GPT2ScratchForCausalLM) can be exported to GGUF")
    return config


def resolve_prompt_style(model_dir: str | os.PathLike, override: str | None = None) -> tuple[str | None, str]:
    """(prompt style or None when unknown, where it came from).

    Order: `override` (--prompt-style); ``prompt_style`` in config.json (what SFT runs record); the
    ``prompt_style`` of args.json beside it (an SFT run's output folder from before config.json
    recorded it); else unknown.
    """
    from gpt2_scratch.core.prompts import PROMPT_STYLES

    model_dir = Path(model_dir)
    candidates = [(override, "--prompt-style")]
    config = _read_config(model_dir)
    candidates.append((config.get("prompt_style"), f"{model_dir / 'config.json'}"))
    args_path = model_dir / "args.json"
    if args_path.is_file():
        try:
            args = json.loads(args_path.read_text(encoding="utf-8"))
            candidates.append((args.get("prompt_style") if isinstance(args, dict) else None, str(args_path)))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            log.warning("%s: unreadable, not used for the prompt style", args_path)
    for style, source in candidates:
        if style is None:
            continue
        if style not in PROMPT_STYLES:
            raise ConvertError(f"{source}: prompt style {style!r} is unknown; choose one of {', '.join(PROMPT_STYLES)} "
                               "with --prompt-style")
        return style, source
    return None, "nowhere (no prompt_style in config.json)"


def load_causal_lm(model_dir: Path):
    """Our GPT2ScratchForCausalLM from `model_dir`, in float32, loaded strictly (no tensor missing, extra or
    misshapen: from_pretrained would fill a missing one with random weights)."""
    from gpt2_scratch.model_dir import load_model_dir

    _read_config(model_dir)
    return load_model_dir(model_dir, head="causal-lm", dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Tensors and metadata
# ---------------------------------------------------------------------------------------------
def gguf_tensors(model, *, source: str, dims_source: str) -> dict[str, np.ndarray]:
    """{GGUF name: float32 array in GGUF's layout}, checked against `GGUF_RULES`."""
    c = model.config
    dims = Dims(n_vocab=c.vocab_size, n_ctx=c.context_length, n_embd=c.emb_dim, n_head=c.n_heads, n_layer=c.n_layers)
    state = {name: t.detach() for name, t in model.state_dict().items()}
    tied = model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    rules = GGUF_RULES if tied else (*GGUF_RULES, UNTIED_HEAD_RULE)
    if tied:
        state.pop("lm_head.weight", None)  # the same tensor as wte; llama.cpp falls back to token_embd
    for i in range(c.n_layers):
        # llama.cpp's gpt2 graph always adds a qkv bias; zeros reproduce a model without one exactly.
        state.setdefault(f"transformer.h.{i}.attn.c_attn.bias", torch.zeros(3 * c.emb_dim))
    plan = plan_conversion({n: tuple(t.shape) for n, t in state.items()}, rules, dims,
                           source=source, dims_source=dims_source)
    converted = convert_tensors(plan, lambda name: state[name])
    return {name: t.float().contiguous().numpy() for name, t in converted.items()}


def _storage(name: str, array: np.ndarray, dtype: str):
    """(array to write, GGML type or None for numpy's own) for one tensor under --dtype."""
    from gguf import GGMLQuantizationType, quants

    if array.ndim == 1 or dtype == "f32":
        return array.astype(np.float32), None
    if dtype == "f16":
        return array.astype(np.float16), None
    if dtype == "bf16":
        return quants.quantize(array, GGMLQuantizationType.BF16), GGMLQuantizationType.BF16
    if array.shape[-1] % Q8_0_BLOCK:
        log.info("%s: rows of %d values are not whole q8_0 blocks of %d; stored as f16", name, array.shape[-1], Q8_0_BLOCK)
        return array.astype(np.float16), None
    return quants.quantize(array, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0


def _check_q8_0(tensors: dict[str, np.ndarray], model_dir: Path) -> None:
    """Say how many matrices --dtype q8_0 stores as f16 instead (rows not whole blocks), and why;
    refuse when none can be quantized, rather than write an f16 file and call it q8_0."""
    matrices = {name: a.shape[-1] for name, a in tensors.items() if a.ndim > 1}
    fallback = {name: width for name, width in matrices.items() if width % Q8_0_BLOCK}
    if not fallback:
        return
    widths = ", ".join(map(str, sorted(set(fallback.values()))))
    why = f"their rows of {widths} values are not whole q8_0 blocks of {Q8_0_BLOCK}"
    if len(fallback) == len(matrices):
        raise ConvertError(f"--dtype q8_0: none of the {len(matrices)} matrices of {model_dir} can be stored as q8_0 "
                           f"({why}); export with --dtype f16 or bf16")
    log.warning("--dtype q8_0: %d of %d matrices are stored as f16 instead (%s): %s", len(fallback), len(matrices),
                why, ", ".join(sorted(fallback)[:3]) + (", ..." if len(fallback) > 3 else ""))


def stored_types(path: str | os.PathLike) -> dict[str, int]:
    """How many tensors the GGUF file at ``path`` holds of each type, read back from the file itself
    (``{"q8_0": 9, "f16": 3, "f32": 26}``): what an export reports is what it wrote."""
    from collections import Counter

    from gguf import GGUFReader

    counts = Counter(t.tensor_type.name.lower() for t in GGUFReader(path).tensors)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _tokenizer_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, token types, merges) of the exact GPT-2 BPE."""
    from gguf import TokenType

    from gpt2_scratch.tokenizer import ENDOFTEXT_ID, VOCAB_SIZE, vocab_files

    encoder_json, vocab_bpe = vocab_files()
    encoder = json.loads(encoder_json.read_text(encoding="utf-8"))
    tokens = [None] * len(encoder)
    for token, i in encoder.items():
        tokens[i] = token
    if len(tokens) != VOCAB_SIZE or None in tokens:
        raise ConvertError(f"{encoder_json}: ids are not 0..{VOCAB_SIZE - 1}")
    types = [int(TokenType.NORMAL)] * len(tokens)
    types[ENDOFTEXT_ID] = int(TokenType.CONTROL)  # a special token: never produced from plain text
    lines = vocab_bpe.read_text(encoding="utf-8").split("\n")
    merges = [line for line in lines[1:] if line]  # line 0 is "#version: 0.2"
    return tokens, types, merges


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def _write_gguf(path: Path, model, tensors: dict[str, np.ndarray], *, dtype: str, style: str | None, name: str) -> None:
    import gguf

    from gpt2_scratch.tokenizer import ENDOFTEXT_ID, VOCAB_SIZE

    c = model.config
    if c.vocab_size != VOCAB_SIZE:
        raise ConvertError(f"{name}: vocab_size {c.vocab_size} differs from the GPT-2 tokenizer's {VOCAB_SIZE}; "
                           "llama.cpp needs one embedding row per token of the embedded tokenizer")
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_name(name)
    writer.add_file_type(int(gguf.LlamaFileType[FILE_TYPES[dtype]]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(c.context_length)
    writer.add_embedding_length(c.emb_dim)
    writer.add_feed_forward_length(4 * c.emb_dim)
    writer.add_block_count(c.n_layers)
    writer.add_head_count(c.n_heads)
    writer.add_layer_norm_eps(c.layer_norm_epsilon)

    tokens, types, merges = _tokenizer_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(ENDOFTEXT_ID)
    writer.add_eos_token_id(ENDOFTEXT_ID)
    writer.add_pad_token_id(ENDOFTEXT_ID)
    writer.add_add_bos_token(False)  # our prompts start with their text, never with <|endoftext|>
    writer.add_add_eos_token(False)
    if style is not None:
        writer.add_string(PROMPT_STYLE_KEY, style)
        # Without transformers' {% generation %} tag, which plain Jinja2 (llama-cpp-python) cannot parse.
        writer.add_chat_template(chat_template(style, generation_marks=False))

    for tensor_name, array in tensors.items():
        data, raw_dtype = _storage(tensor_name, array, dtype)
        writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


# ---------------------------------------------------------------------------------------------
# The export
# ---------------------------------------------------------------------------------------------
def export_gguf(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "f16",
    prompt_style: str | None = None,
    modelfile: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write `out` (GGUF) and its Modelfile (default: `out` with suffix .Modelfile); return both paths.

    Each file is complete or absent. Existing outputs are refused unless `overwrite`.
    """
    model_dir, out = Path(model_dir), Path(out)
    modelfile = Path(modelfile) if modelfile is not None else out.with_suffix(".Modelfile")
    if dtype not in DTYPES:
        raise ConvertError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    if out.suffix != ".gguf":
        raise ConvertError(f"{out}: the output name must end in .gguf (llama.cpp and Ollama tools look for it)")
    if modelfile.resolve() == out.resolve():
        raise ConvertError(f"{modelfile}: the Modelfile cannot be the GGUF file itself; choose another --modelfile")
    for path in (out, modelfile):
        if path.exists() and not overwrite:
            raise ConvertError(f"{path}: already exists; choose another path or pass --overwrite")
        if path.is_dir():
            raise ConvertError(f"{path}: is a folder; choose a file path")
    style, style_source = resolve_prompt_style(model_dir, prompt_style)  # checks the folder first
    if style is None:
        log.warning("%s: prompt style unknown (no prompt_style in config.json); the Modelfile passes text through "
                    "as-is ({{ .Prompt }}); pass --prompt-style alpaca|phi3|chat for an instruction-finetuned model",
                    model_dir)
    else:
        log.info("prompt style %s (from %s)", style, style_source)

    model = load_causal_lm(model_dir)
    tensors = gguf_tensors(model, source=str(model_dir), dims_source=str(model_dir / "config.json"))
    if dtype == "q8_0":
        _check_q8_0(tensors, model_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    modelfile.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        _write_gguf(tmp, model, tensors, dtype=dtype, style=style, name=model_dir.resolve().name)
    text = modelfile_text(out, modelfile, style=style, context_length=model.config.context_length,
                          source=str(model_dir))
    with atomic_path(modelfile) as tmp:
        tmp.write_text(text, encoding="utf-8")
    log.info("wrote %s (%s) and %s", out, dtype, modelfile)
    return out, modelfile
