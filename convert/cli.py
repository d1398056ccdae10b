"""`python -m convert`: GPT-2 weights in (OpenAI's TF checkpoint, Hugging Face) and out (Hugging Face).

    python -m convert openai --size 355M --out models/gpt2-medium [--models-dir CACHE]
    python -m convert openai --from-dir FILES --out DIR
    python -m convert hf --repo openai-community/gpt2-medium --out DIR
    python -m convert hf --from-dir PATH --out DIR          # folder or .safetensors file
    python -m convert export-hf --model DIR --out HF_DIR    # standard GPT2LMHeadModel folder
    python -m convert gguf --model DIR --out FILE.gguf [--dtype f16]   # llama.cpp/Ollama + FILE.Modelfile

Every output is a complete folder or nothing (written to a temp name, then renamed).
Errors are one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from convert.errors import ConvertError

log = logging.getLogger(__name__)


def _check_out(out: Path, overwrite: bool) -> None:
    """Fail before the slow part, not after it."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConvertError(f"{out}: already exists and is not empty; choose another --out or pass --overwrite")


def _save(model, out: Path, tokenizer, overwrite: bool, source: str, started: float) -> None:
    from gpt2_scratch import save_model_dir

    save_model_dir(model, out, tokenizer=tokenizer, overwrite=overwrite)
    n = sum(p.numel() for p in model.parameters())
    c = model.config
    print(f"wrote {out}: GPT-2 {n / 1e6:.1f}M params (n_layers={c.n_layers}, emb_dim={c.emb_dim}, "
          f"n_heads={c.n_heads}, vocab={c.vocab_size}, context={c.context_length}) from {source} "
          f"in {time.perf_counter() - started:.1f} s")


def cmd_openai(args) -> None:
    from convert.download import download_openai
    from convert.openai import load_openai_checkpoint, openai_tokenizer

    started = time.perf_counter()
    _check_out(args.out, args.overwrite)
    if args.from_dir is not None:
        folder = args.from_dir
    else:
        from convert.resolve import default_models_dir

        root = args.models_dir or default_models_dir()
        folder = download_openai(args.size, root, base_url=args.base_url, mirrors=args.mirror)
    model = load_openai_checkpoint(folder)
    _save(model, args.out, openai_tokenizer(folder), args.overwrite, str(folder), started)


def cmd_hf(args) -> None:
    from convert.hf import fetch_hf_repo, load_hf_checkpoint

    from gpt2_scratch import get_tokenizer

    started = time.perf_counter()
    _check_out(args.out, args.overwrite)
    source = args.from_dir if args.from_dir is not None else fetch_hf_repo(args.repo, args.revision)
    model = load_hf_checkpoint(source)
    _save(model, args.out, get_tokenizer(), args.overwrite, args.repo or str(source), started)


def cmd_export_hf(args) -> None:
    from convert.hf import export_hf

    started = time.perf_counter()
    out = export_hf(args.model, args.out, overwrite=args.overwrite)
    print(f"wrote {out}: transformers GPT2LMHeadModel folder from {args.model} "
          f"in {time.perf_counter() - started:.1f} s")


def cmd_gguf(args) -> None:
    from convert.gguf import export_gguf

    started = time.perf_counter()
    gguf_path, modelfile = export_gguf(args.model, args.out, dtype=args.dtype, prompt_style=args.prompt_style,
                                       modelfile=args.modelfile, overwrite=args.overwrite)
    print(f"wrote {gguf_path} ({args.dtype}, {gguf_path.stat().st_size / 1e6:.1f} MB) and {modelfile} from "
          f"{args.model} in {time.perf_counter() - started:.1f} s; for Ollama: "
          f"ollama create NAME -f {modelfile}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("openai", help="OpenAI's released TF checkpoint → our model folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--size", choices=["124M", "355M", "774M", "1558M"], help="download this release size")
    src.add_argument("--from-dir", type=Path, help="folder with model.ckpt.index, model.ckpt.data-00000-of-00001, hparams.json")
    p.add_argument("--out", type=Path, required=True, help="model folder to write")
    p.add_argument("--models-dir", type=Path, help="download cache (files go to MODELS_DIR/SIZE); "
                   "default ~/.cache/gpt2-scratch/openai")
    p.add_argument("--base-url", help="primary URL prefix (default OpenAI's; env GPT2_SCRATCH_OPENAI_URL)")
    p.add_argument("--mirror", action="append", help="fallback URL prefix, repeatable "
                   "(default the book's backup; env GPT2_SCRATCH_OPENAI_MIRRORS, comma-separated)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.set_defaults(func=cmd_openai)

    p = sub.add_parser("hf", help="Hugging Face GPT2LMHeadModel (Hub repo or local) → our model folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--repo", help="Hub repo id, e.g. openai-community/gpt2-medium (HF cache/offline/endpoint apply)")
    src.add_argument("--from-dir", type=Path, help="local folder (config.json + model.safetensors) or .safetensors file")
    p.add_argument("--revision", help="branch, tag or commit of --repo")
    p.add_argument("--out", type=Path, required=True, help="model folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.set_defaults(func=cmd_hf)

    p = sub.add_parser("export-hf", help="our model folder → standard transformers GPT2LMHeadModel folder")
    p.add_argument("--model", type=Path, required=True, help="model folder written by gpt2-scratch")
    p.add_argument("--out", type=Path, required=True, help="folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.set_defaults(func=cmd_export_hf)

    p = sub.add_parser("gguf", help="our model folder → GGUF file for llama.cpp/Ollama, with a Modelfile")
    p.add_argument("--model", type=Path, required=True, help="model folder written by gpt2-scratch (or an SFT run's output)")
    p.add_argument("--out", type=Path, required=True, help="GGUF file to write (FILE.gguf)")
    p.add_argument("--dtype", default="f16", help="f32 | f16 | bf16 | q8_0 for the matrices; norms and biases stay f32 "
                   "(default f16)")
    p.add_argument("--prompt-style", choices=["alpaca", "phi3"],
                   help="prompt format the model was finetuned with (default: prompt_style in the model's config.json)")
    p.add_argument("--modelfile", type=Path, help="Ollama Modelfile to write (default: --out with suffix .Modelfile)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=cmd_gguf)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileExistsError as e:  # save_model_dir's refusal, raced past our early check
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
