"""Responses to instruction prompts, many at a time: what chapter 7 produces for its test set.

The book generates one prompt at a time and recomputes the whole sequence for every new token.
Here prompts of similar length are batched together, left-padded, and decoded with transformers'
``generate`` and the KV cache; greedy decoding, stopping at <|endoftext|>. The text of each response
is then cut out exactly as the book does (``extract_response``).
"""

import logging

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gpt2_scratch.core.prompts import extract_response, format_input
from .tokenizer import ENDOFTEXT_ID

logger = logging.getLogger(__name__)


@torch.inference_mode()
def generate_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    style: str = "alpaca",
    progress: bool = True,
) -> list[str]:
    """One response per record (same order), generated greedily in batches with the KV cache."""
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be positive, got {batch_size} and {max_new_tokens}")
    context_length = model.config.max_position_embeddings
    if max_new_tokens >= context_length:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in a {context_length}-token context")
    max_prompt = context_length - max_new_tokens

    prompt_ids = []
    for index, record in enumerate(records):
        ids = tokenizer.encode(format_input(record, style))
        if len(ids) > max_prompt:
            # The book crops from the left too, keeping the end of the prompt the model must continue.
            logger.warning("record %d: prompt of %d tokens cropped to its last %d", index, len(ids), max_prompt)
            ids = ids[-max_prompt:]
        prompt_ids.append(ids)

    # Longest first, so each batch holds prompts of similar length (little padding) and a batch
    # that runs out of memory does so at once.
    order = sorted(range(len(records)), key=lambda i: -len(prompt_ids[i]))
    responses: list[str | None] = [None] * len(records)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    bar = tqdm(total=len(records), desc="responses", unit="prompt", disable=not progress)
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = max(len(prompt_ids[i]) for i in batch)
            input_ids = torch.full((len(batch), width), ENDOFTEXT_ID, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):  # left padding: every prompt ends at the same column
                input_ids[row, width - len(prompt_ids[i]) :] = torch.tensor(prompt_ids[i])
                attention_mask[row, width - len(prompt_ids[i]) :] = 1
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=ENDOFTEXT_ID,
                pad_token_id=ENDOFTEXT_ID,
            )
            for row, i in enumerate(batch):
                new_ids = output[row, width:].tolist()
                if ENDOFTEXT_ID in new_ids:  # the book stops at eos and keeps nothing after it
                    new_ids = new_ids[: new_ids.index(ENDOFTEXT_ID)]
                prompt_text = tokenizer.decode(prompt_ids[i])
                generated_text = tokenizer.decode(prompt_ids[i] + new_ids)
                responses[i] = extract_response(generated_text, prompt_text, style)
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return responses
