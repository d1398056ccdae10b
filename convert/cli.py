"""The ``convert`` commands: GPT-2 weights in (OpenAI's TF checkpoint, Hugging Face) and out (Hugging Face).

    gpt2-scratch convert openai --size 355M --out models/gpt2-medium [--models-dir CACHE]
    gpt2-scratch convert openai --from-dir FILES --out DIR
    gpt2-scratch convert hf --repo openai-community/gpt2-medium --out DIR
    gpt2-scratch convert hf --from-dir PATH --out DIR          # folder or .safetensors file
    gpt2-scratch convert export-hf --model DIR --out HF_DIR    # standard GPT2LMHeadModel folder
    gpt2-scratch convert book --pth FILE.pth --out DIR [--n-heads N] [--prompt-style alpaca]  # the book's GPTModel
    gpt2-scratch convert export-book --model DIR --out FILE.pth        # … and back, printing its cfg
    gpt2-scratch convert gguf --model DIR --out FILE.gguf [--dtype f16]   # llama.cpp/Ollama + FILE.Modelfile

(``gpt2-scratch convert ...`` is the same.) Every output is a complete folder or nothing (written to a
temporary name, then renamed); the output is checked before the slow part starts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gpt2_scratch.core.args import arg
from gpt2_scratch.core.errors import InputError, unicode_problem
from gpt2_scratch.core.files import check_output_dir, check_output_file, claimed_output

OVERWRITE_HELP = "replace an existing --out folder"


def _check_out(out: str, overwrite: bool, inputs=()) -> Path:
    """Fail before the slow part, not after it."""
    path = check_output_dir(out, inputs=inputs)
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise InputError(f"--out {path}: already exists and is not empty; choose another --out or pass --overwrite")
    return path


def _save(model, out: Path, tokenizer, overwrite: bool, source: str, started: float,
          prompt_style: str | None = None) -> None:
    from gpt2_scratch import save_model_dir

    save_model_dir(model, out, tokenizer=tokenizer, overwrite=overwrite, prompt_style=prompt_style)
    c = model.config
    print(f"wrote {out}: GPT-2 {model.num_parameters() / 1e6:.1f}M params (n_layers={c.n_layers}, "
          f"emb_dim={c.emb_dim}, n_heads={c.n_heads}, vocab={c.vocab_size}, context={c.context_length}) from "
          f"{source} in {time.perf_counter() - started:.1f} s")


@dataclass
class OpenAIArgs:
    """OpenAI's released TF checkpoint (downloaded, or files you have) → our model folder."""

    out: str = arg(help="model folder to write")
    size: Literal["124M", "355M", "774M", "1558M"] | None = arg(None, "download this release size")
    from_dir: str | None = arg(None, "folder with model.ckpt.index, model.ckpt.data-00000-of-00001, hparams.json")
    models_dir: str | None = arg(None, "download cache (files go to MODELS_DIR/SIZE; default "
                                       "$GPT2_SCRATCH_CACHE/openai or ~/.cache/gpt2-scratch/openai)")
    base_url: str | None = arg(None, "primary URL prefix (default OpenAI's; env GPT2_SCRATCH_OPENAI_URL)")
    mirror: list[str] | None = arg(None, "fallback URL prefix, repeatable (default the book's backup; env "
                                         "GPT2_SCRATCH_OPENAI_MIRRORS, comma-separated)", action="extend")
    overwrite: bool = arg(False, OVERWRITE_HELP)


def run_openai(args: OpenAIArgs) -> None:
    from gpt2_scratch.convert.openai import download_openai, load_openai_checkpoint, openai_tokenizer

    if (args.size is None) == (args.from_dir is None):
        raise InputError("give exactly one of --size (download) and --from-dir (files you have)")
    started = time.perf_counter()
    out = _check_out(args.out, args.overwrite, inputs=[("--from-dir", args.from_dir)])
    with claimed_output(args.out):  # one run per output at a time (core.files.claimed_output)
        folder = Path(args.from_dir) if args.from_dir is not None else download_openai(
            args.size, args.models_dir, base_url=args.base_url, mirrors=args.mirror)
        model = load_openai_checkpoint(folder)
        _save(model, out, openai_tokenizer(folder), args.overwrite, str(folder), started)


@dataclass
class HFArgs:
    """Hugging Face GPT2LMHeadModel (a Hub repo, or a local folder or .safetensors file) → our model folder."""

    out: str = arg(help="model folder to write")
    repo: str | None = arg(None, "Hub repo id, e.g. openai-community/gpt2-medium (HF cache, HF_HUB_OFFLINE and "
                                 "HF_ENDPOINT apply)")
    from_dir: str | None = arg(None, "local folder (config.json + model.safetensors) or .safetensors file")
    revision: str | None = arg(None, "branch, tag or commit of --repo")
    overwrite: bool = arg(False, OVERWRITE_HELP)


def run_hf(args: HFArgs) -> None:
    from gpt2_scratch.convert.hf import fetch_hf_repo, load_hf_checkpoint
    from gpt2_scratch import get_tokenizer

    if (args.repo is None) == (args.from_dir is None):
        raise InputError("give exactly one of --repo (Hub) and --from-dir (a local folder or file)")
    started = time.perf_counter()
    out = _check_out(args.out, args.overwrite, inputs=[("--from-dir", args.from_dir)])
    with claimed_output(args.out):  # one run per output at a time (core.files.claimed_output)
        source = Path(args.from_dir) if args.from_dir is not None else fetch_hf_repo(args.repo, args.revision)
        model = load_hf_checkpoint(source)
        _save(model, out, get_tokenizer(), args.overwrite, args.repo or str(source), started)


@dataclass
class ExportHFArgs:
    """Our model folder → a standard transformers GPT2LMHeadModel folder (any GPT-2 tool can use it)."""

    model: str = arg(help="model folder written by gpt2-scratch")
    out: str = arg(help="folder to write")
    overwrite: bool = arg(False, OVERWRITE_HELP)


def run_export_hf(args: ExportHFArgs) -> None:
    from gpt2_scratch.convert.hf import export_hf

    started = time.perf_counter()
    _check_out(args.out, args.overwrite, inputs=[("--model", args.model)])
    with claimed_output(args.out):  # one run per output at a time (core.files.claimed_output)
        out = export_hf(args.model, args.out, overwrite=args.overwrite)
        print(f"wrote {out}: transformers GPT2LMHeadModel folder from {args.model} "
              f"in {time.perf_counter() - started:.1f} s")


@dataclass
class BookArgs:
    """The book's GPTModel state dict (chapters 5-7, a .pth) → our model folder (LM or chapter 6 classifier)."""

    pth: str = arg(help="torch.save(model.state_dict()) file, or chapter 5's {'model_state_dict': ...} checkpoint "
                        "(read with weights_only=True: tensors only, never code)")
    out: str = arg(help="model folder to write")
    n_heads: int | None = arg(None, "the cfg's n_heads; needed only when emb_dim is not 768, 1024, 1280 or 1600 "
                                    "(GPT-2's sizes, whose head counts are known)")
    labels: str | None = arg(None, "a classifier's class names, comma-separated (default for two classes: ham,spam)")
    prompt_style: Literal["alpaca", "phi3", "chat"] | None = arg(
        None, "the prompt style an instruction-finetuned model was trained with (chapter 7's: alpaca); recorded "
              "in config.json with its chat template, for `chat`, pipelines and the GGUF export")
    overwrite: bool = arg(False, OVERWRITE_HELP)


def run_book(args: BookArgs) -> None:
    from gpt2_scratch.convert.book import load_book_checkpoint

    started = time.perf_counter()
    out = _check_out(args.out, args.overwrite, inputs=[("--pth", args.pth)])
    with claimed_output(args.out):  # one run per output at a time (core.files.claimed_output)
        labels = tuple(args.labels.split(",")) if args.labels else None
        model = load_book_checkpoint(args.pth, n_heads=args.n_heads, labels=labels)
        if args.prompt_style is not None and hasattr(model, "score"):
            raise InputError(f"--pth {args.pth} holds a classifier (chapter 6), which has no prompt style; drop "
                             "--prompt-style")
        _save(model, out, None, args.overwrite, str(args.pth), started, args.prompt_style)
        c = model.config
        if hasattr(model, "score"):
            print(f"  a sequence classifier ({', '.join(c.id2label[i] for i in range(c.num_labels))}): load it with "
                  "AutoModelForSequenceClassification")
        elif not c.tie_word_embeddings:
            print("  its out_head differs from tok_emb, so the LM head is kept untied (tie_word_embeddings=false)")


@dataclass
class ExportBookArgs:
    """Our model folder → a state dict the book's GPTModel(cfg).load_state_dict accepts; prints the cfg."""

    model: str = arg(help="model folder written by gpt2-scratch")
    out: str = arg(help=".pth file to write")
    overwrite: bool = arg(False, "replace an existing --out file")


def run_export_book(args: ExportBookArgs) -> None:
    from gpt2_scratch.convert.book import export_book
    from gpt2_scratch.model_dir import is_classifier_config, read_config

    started = time.perf_counter()
    check_output_file(args.out, inputs=[("--model", args.model)])
    with claimed_output(args.out):  # one run per output at a time (core.files.claimed_output)
        cfg = export_book(args.model, args.out, overwrite=args.overwrite)
        config = read_config(args.model)
        print(f"wrote {args.out}: the book's GPTModel state dict from {args.model} in {time.perf_counter() - started:.1f} s")
        print(f"cfg = {cfg!r}")
        print("model = GPTModel(cfg)")
        if is_classifier_config(config):
            print(f"model.out_head = torch.nn.Linear(cfg['emb_dim'], {len(config['id2label'])})  # chapter 6's classifier head")
        print(f"model.load_state_dict(torch.load({str(args.out)!r}, weights_only=True))")


@dataclass
class GGUFArgs:
    """Our model folder (an SFT run's output too) → a GGUF file for llama.cpp and Ollama, with a Modelfile."""

    model: str = arg(help="model folder written by gpt2-scratch (or an SFT run's output)")
    out: str = arg(help="GGUF file to write (FILE.gguf)")
    dtype: Literal["f32", "f16", "bf16", "q8_0"] = arg("f16", "type of the matrices; norms and biases stay f32")
    prompt_style: Literal["alpaca", "phi3", "chat"] | None = arg(
        None, "prompt format the model was finetuned with (default: the one recorded in its config.json)",
        aliases=("--style",))
    modelfile: str | None = arg(None, "Ollama Modelfile to write (default: --out with the suffix .Modelfile)")
    overwrite: bool = arg(False, "replace existing output files")


def run_gguf(args: GGUFArgs) -> None:
    from gpt2_scratch.convert.gguf import export_gguf, stored_types

    started = time.perf_counter()
    modelfile = args.modelfile or str(Path(args.out).with_suffix(".Modelfile"))
    for flag, path in (("--out", args.out), ("--modelfile", modelfile)):
        # The Modelfile names the GGUF in one line of UTF-8: a newline or a byte that is not UTF-8 breaks it.
        problem = unicode_problem(path, from_bytes=True) or (
            "a name with a control character (a newline?)" if any(ord(c) < 32 for c in path) else None)
        if problem:
            raise InputError(f"{flag} {path!r} is {problem}, which the Modelfile's FROM line cannot hold; choose "
                             "another name")
    check_output_file(args.out, inputs=[("--model", args.model)])
    check_output_file(modelfile, flag="--modelfile", inputs=[("--model", args.model)])
    with claimed_output(args.out):  # one run per output at a time (core.files.claimed_output)
        gguf_path, modelfile = export_gguf(args.model, args.out, dtype=args.dtype, prompt_style=args.prompt_style,
                                           modelfile=args.modelfile, overwrite=args.overwrite)
        types = ", ".join(f"{n} {t}" for t, n in stored_types(gguf_path).items())  # what the file holds, per type
        print(f"wrote {gguf_path} (--dtype {args.dtype}: tensors {types}; {gguf_path.stat().st_size / 1e6:.1f} MB) and "
              f"{modelfile} from {args.model} in {time.perf_counter() - started:.1f} s; for Ollama: ollama create NAME -f "
              f"{modelfile}")
