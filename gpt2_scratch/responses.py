"""Responses to instruction prompts, many at a time: what chapter 7 produces for its test set.

The book generates one prompt at a time and recomputes the whole sequence for every new token.
Here prompts of similar length are batched together, left-padded, and decoded greedily with the KV
cache, stopping at <|endoftext|>. A row that has ended leaves the batch, its cache rows with it, so the
rows still decoding stop paying for it. Transformers' ``generate`` decodes every row until the batch's
slowest ends: at the book's finetuned gpt2-medium lengths that is 5,170 decoded row-steps of which 2,314
are live, and dropping the ended rows is 1.48x faster (bench/README.md). The text of each response is
then cut out exactly as the book does (``extract_response``).
"""

import inspect
import logging

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

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
            continuations = greedy_batch(model, input_ids.to(device), attention_mask.to(device), max_new_tokens)
            for i, new_ids in zip(batch, continuations):
                prompt_text = tokenizer.decode(prompt_ids[i])
                generated_text = tokenizer.decode(prompt_ids[i] + new_ids)
                responses[i] = extract_response(generated_text, prompt_text, style)
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return responses


def greedy_batch(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> list[list[int]]:
    """The greedy continuation of each row of a left-padded batch: up to ``max_new_tokens`` token ids, without
    the <|endoftext|> that ends it (the book stops there and keeps nothing after it). A row that has ended
    leaves the batch and the KV cache; the others decode exactly as they would beside it."""
    # transformers renamed past_key_values to cache during 5.x; a wrapper (peft) passes either through.
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = DynamicCache(config=model.config)
    new_ids: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    live = list(range(input_ids.shape[0]))  # the batch's rows, as rows of input_ids
    ids, mask = input_ids, attention_mask
    for step in range(max_new_tokens):
        # Positions count real tokens only, so left padding does not shift them.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]  # (rows, T)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                    **{cache_name: cache})
        next_ids = out.logits[:, -1].argmax(-1)  # (rows,)
        tokens = next_ids.tolist()  # host sync
        going = [j for j, token in enumerate(tokens) if token != ENDOFTEXT_ID]
        for j in going:
            new_ids[live[j]].append(tokens[j])
        if not going or step == max_new_tokens - 1:
            break
        if len(going) < len(tokens):  # the rows that ended leave the batch
            keep = torch.tensor(going, device=ids.device)
            cache.batch_select_indices(keep)
            next_ids, mask, live = next_ids[keep], mask[keep], [live[j] for j in going]
        ids = next_ids[:, None]  # (rows, 1)
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
    return new_ids
