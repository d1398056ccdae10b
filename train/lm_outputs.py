"""What a language-model run (SFT, DPO; the kinds of training that come next) writes besides its checkpoints.

    check_generation_limits(args, context, model)   before training: --max-new-tokens / --sample-tokens fit
    epoch_sample(run, epoch, ...)                    the end of an epoch: the book's greedy sample (a row, a line)
    save_language_model(run, model, ...)             the finished model at the top of OUT (with LoRA: the adapter)
    write_test_responses(run, model, ...)            OUT/instruction-data-with-response.json

The classifier uses none of these (``Task.finish``'s default saves its model).
"""

from __future__ import annotations

from typing import Any

import torch

from gpt2_scratch.responses import generate_responses
from gpt2_scratch.tokenizer import ENDOFTEXT_ID
from gpt2_scratch.core.args import option_name
from gpt2_scratch.core.compile import eager
from gpt2_scratch.core.errors import InputError
from gpt2_scratch.core.files import write_json_atomic
from gpt2_scratch.train import lora
from gpt2_scratch.train.checkpoints import save_model_into
from gpt2_scratch.train.sharded import is_sharded
from gpt2_scratch.train.state import Run, timed


def greedy_sample(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The book's per-epoch check: greedily continue a fixed validation prompt (newlines shown as spaces)."""
    was_training = model.training
    model.eval()
    context = model.config.max_position_embeddings
    ids = tokenizer.encode(prompt)[-(context - max_new_tokens):]
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                             device=device), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=ENDOFTEXT_ID,
                             eos_token_id=None)
    model.train(was_training)
    return tokenizer.decode(out[0]).replace("\n", " ")


def epoch_sample(run: Run, epoch: int, tokenizer, prompt: str, max_new_tokens: int):
    """The end of an epoch of SFT or DPO: the greedy sample (main process only) as (row, log line). A model
    sharded with FSDP gathers its parameters in every forward pass, on all processes together: then every
    process generates the same sample (greedy, a fixed number of tokens) and only the main one reports it."""
    main = run.accelerator.is_main_process
    if not main and not is_sharded(run.model):
        return None
    with eager():  # --compile trains compiled; generation decodes a new shape every token
        sample = greedy_sample(run.unwrapped(), tokenizer, prompt, max_new_tokens)
    return ({"sample": sample}, f"epoch {epoch} sample: {sample}") if main else None


def save_language_model(run: Run, model, tokenizer, *, prompt_style: str, lora_settings, load_base):
    """The finished language model at the top of OUT (with LoRA: OUT/adapter, and the merged model unless
    --no-merge); returns the model to generate the test responses with."""
    model.eval()
    with timed(run.state, "save_model"):
        if lora_settings is None:
            save_model_into(run.out, model, tokenizer, prompt_style=prompt_style)
            return model
        return lora.save_outputs(run.out, model, tokenizer, lora_settings, prompt_style=prompt_style,
                                 load_base=load_base)


def write_test_responses(run: Run, model, tokenizer, records: list[dict], style: str) -> list[str]:
    """The test split with a greedy ``model_response`` per record (instruction-data-with-response.json)."""
    args = run.args
    print(f"generating {len(records)} test responses (greedy, up to {args.max_new_tokens} new tokens)", flush=True)
    with timed(run.state, "responses"), eager():  # --compile: generation decodes a new shape every token
        responses = generate_responses(model, tokenizer, records, batch_size=args.response_batch_size,
                                       max_new_tokens=args.max_new_tokens, style=style)
    write_json_atomic(run.out / "instruction-data-with-response.json",
                      [dict(r, model_response=resp) for r, resp in zip(records, responses)])
    return responses


def check_generation_limits(args: Any, context: int, model_name: str) -> None:
    """--max-new-tokens and --sample-tokens must leave room for a prompt: found before training, not after."""
    for name in ("max_new_tokens", "sample_tokens"):
        if getattr(args, name) >= context:
            raise InputError(f"{option_name(name)} {getattr(args, name)} leaves no room for a prompt in the "
                             f"{context}-token context of {model_name}; pass at most {context - 1}")
