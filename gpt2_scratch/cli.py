"""``python -m gpt2_scratch``: make a model directory, talk to a model, publish or classify.

    python -m gpt2_scratch init --preset gpt2-small --out DIR [--n-layers N ...]
    python -m gpt2_scratch generate --model DIR [--prompt TEXT] [--max-new-tokens N] [--temperature T] [--top-k K]
    python -m gpt2_scratch push --model DIR --repo-id USER/NAME
    python -m gpt2_scratch classify --model DIR --text "..."
"""

import argparse
import importlib
import sys

import torch

from .configuration_gpt2_scratch import PRESETS, GPT2ScratchConfig

# Subcommands that live in their own modules; each exposes add_parser(subparsers).
EXTRA_COMMAND_MODULES = ("gpt2_scratch.hub", "gpt2_scratch.classify_cli")


def cmd_init(args: argparse.Namespace) -> None:
    """Write a randomly initialised model directory (overrides make tiny models for tests and demos)."""
    from . import GPT2ScratchForCausalLM, save_model_dir

    overrides = {
        name: value
        for name, value in (
            ("n_layers", args.n_layers),
            ("emb_dim", args.emb_dim),
            ("n_heads", args.n_heads),
            ("context_length", args.context_length),
        )
        if value is not None
    }
    config = GPT2ScratchConfig.from_preset(args.preset, **overrides)
    torch.manual_seed(args.seed)
    model = GPT2ScratchForCausalLM(config)
    save_model_dir(model, args.out, overwrite=args.overwrite)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {args.preset} ({n_params:,} parameters, random init, seed {args.seed})")


def cmd_generate(args: argparse.Namespace) -> None:
    """Continue a prompt (or each line typed at the prompt), streaming tokens as they come."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer
    from transformers.utils import logging as hf_logging

    from .tokenizer import ENDOFTEXT_ID

    hf_logging.disable_progress_bar()  # loading takes a blink; keep the terminal for the text

    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    context_length = model.config.max_position_embeddings
    if args.max_new_tokens >= context_length:
        raise SystemExit(
            f"error: --max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the "
            f"{context_length}-token context of {args.model}"
        )
    max_prompt = context_length - args.max_new_tokens
    # The book's settings: temperature 0 is greedy; otherwise top-k filtering, then temperature sampling.
    sampling = {"do_sample": False}
    if args.temperature > 0:
        sampling = {"do_sample": True, "temperature": args.temperature, "top_k": args.top_k or 0, "top_p": args.top_p}

    def complete(prompt: str) -> None:
        ids = tokenizer.encode(prompt)
        if not ids:
            raise SystemExit("error: the prompt is empty after tokenization; give some text")
        if len(ids) > max_prompt:
            # As the book's generate(): keep the last tokens that fit, so the continuation follows the end.
            print(f"[prompt cropped from the left: {len(ids)} → {max_prompt} tokens]", file=sys.stderr)
            ids = ids[-max_prompt:]
        torch.manual_seed(args.seed)
        streamer = TextStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True)
        with torch.inference_mode():
            model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=args.max_new_tokens,
                eos_token_id=None if args.ignore_eos else ENDOFTEXT_ID,
                pad_token_id=ENDOFTEXT_ID,
                streamer=streamer,
                **sampling,
            )

    if args.prompt is not None:
        complete(args.prompt)
        return
    print("Type a prompt and press Enter (an empty line or 'quit' ends).", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if line.strip() in ("", "quit", "exit"):
            break
        complete(line)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gpt2_scratch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="write a randomly initialised model directory")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS), help="GPT-2 size to start from")
    p.add_argument("--out", required=True, help="model directory to create")
    p.add_argument("--seed", type=int, default=123, help="seed of the random init")
    p.add_argument("--n-layers", type=int, help="override the preset's number of blocks")
    p.add_argument("--emb-dim", type=int, help="override the preset's embedding width")
    p.add_argument("--n-heads", type=int, help="override the preset's attention heads")
    p.add_argument("--context-length", type=int, help="override the context length (1024)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("generate", help="continue a prompt with a model directory (interactive without --prompt)")
    p.add_argument("--model", required=True, help="model directory (ours, or any causal LM transformers loads)")
    p.add_argument("--prompt", help="text to continue; omit for an interactive loop")
    p.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the book's default); >0 samples")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1.0 = off)")
    p.add_argument("--seed", type=int, default=123, help="seed for sampling")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past <|endoftext|>")
    p.set_defaults(func=cmd_generate)

    for module_name in EXTRA_COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError, OSError) as error:
        # Library errors are already one actionable line; show them without a traceback.
        raise SystemExit(f"error: {error}") from None
