"""Benchmark for issue 5: test-set generation speed and judge concurrency. Prints two tables.

    python bench/bench_eval.py            # the full run reported in the issue (~10-20 min on 2 cores)
    python bench/bench_eval.py --quick    # tiny model, few prompts: checks the script works

Generation: the book's 110 test prompts (instruction-data.json [935:1045]), up to 256 new tokens,
gpt2-small shape with random weights (seed 123). Random weights almost never emit <|endoftext|>,
so every response runs the full 256 tokens: the worst case, and the same work for every method.

- ours, batched: ``gpt2_scratch.generate_responses`` (batch 8, left padding, KV cache, greedy).
- ours, one at a time: the same with batch 1 (measured on a subset).
- the book's loop: ``generate_text_simple`` as in chapters 5-7, written here the book's way: one
  prompt at a time, no cache, the whole sequence re-fed at every step, cropped to the context.
  It is far too slow to run in full; it is measured on a few prompts and fewer tokens and
  extrapolated per token. Its later steps are longer than its first ones (the sequence grows), so
  the extrapolation UNDER-estimates the book's time and the reported speed-up is conservative.
- transformers: ``GPT2LMHeadModel.generate`` one prompt at a time with the same weights (subset,
  extrapolated per prompt, which is linear).

Judge: eval/judge.py (subprocess, no cache) against the stand-in Ollama server answering each
request after a fixed delay, with 1 and with 4 workers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO / "tests"))  # the stand-in Ollama server


def book_generate_text_simple(model, idx, max_new_tokens, context_size, eos_id):
    """The book's greedy loop (ch. 5/7): no cache, re-feed everything each step, crop to context."""
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        with torch.no_grad():
            logits = model(idx_cond, use_cache=False).logits
        logits = logits[:, -1, :]
        idx_next = torch.argmax(logits, dim=-1, keepdim=True)
        if idx_next == eos_id:
            break
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def transformers_twin(model):
    """transformers' GPT2LMHeadModel holding our model's weights (c_proj: Linear [out,in] → Conv1D [in,out])."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    ref = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.context_length, n_embd=c.emb_dim,
                                     n_layer=c.n_layers, n_head=c.n_heads, layer_norm_epsilon=c.layer_norm_epsilon,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    state = {k: (v.t() if k.endswith("c_proj.weight") else v)
             for k, v in model.state_dict().items()}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("attn.bias") for k in missing), (missing, unexpected)
    return ref.eval()


def bench_generation(args) -> list[tuple]:
    from gpt2_scratch import (GPT2ScratchConfig, GPT2ScratchForCausalLM, extract_response, format_input,
                              generate_responses, get_tokenizer)

    torch.manual_seed(123)
    overrides = dict(n_layers=2, emb_dim=64, n_heads=4, context_length=512) if args.quick else {}
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("gpt2-small", **overrides)).eval()
    tok = get_tokenizer()
    records = json.loads((SHARED / "data" / "instruction-data.json").read_text())[935:1045][: args.n_prompts]
    n, T = len(records), args.max_new_tokens
    rows = []

    batched = records[: args.batched_prompts or n]
    t0 = time.perf_counter()
    ours = generate_responses(model, tok, batched, batch_size=8, max_new_tokens=T, progress=True)
    dt = time.perf_counter() - t0
    rows.append(("ours, batched (8), KV cache", f"{len(batched)} x {T}", dt, len(batched) * T / dt,
                 "measured" if len(batched) == n else f"subset; full {dt * n / len(batched):.0f} s extrapolated"))

    sub = records[: args.subset]
    t0 = time.perf_counter()
    ours_one = generate_responses(model, tok, sub, batch_size=1, max_new_tokens=T, progress=False)
    dt = time.perf_counter() - t0
    rows.append(("ours, one at a time, KV cache", f"{len(sub)} x {T}", dt, len(sub) * T / dt,
                 f"subset; full {dt * n / len(sub):.0f} s extrapolated"))

    hf = transformers_twin(model)
    hf_texts, eos_hits = [], 0
    t0 = time.perf_counter()
    for rec in sub:
        prompt = format_input(rec)
        ids = torch.tensor([tok.encode(prompt)])
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=T, do_sample=False,
                              eos_token_id=50256, pad_token_id=50256)
        new = out[0, ids.shape[1]:].tolist()
        if 50256 in new:
            eos_hits += 1
            new = new[: new.index(50256)]
        hf_texts.append(extract_response(tok.decode(ids[0].tolist() + new), prompt))
    dt = time.perf_counter() - t0
    rows.append(("transformers generate, one at a time", f"{len(sub)} x {T}", dt, len(sub) * T / dt,
                 f"subset; full {dt * n / len(sub):.0f} s extrapolated"))

    book_sub, book_T = records[: args.book_prompts], args.book_tokens
    steps = 0
    t0 = time.perf_counter()
    for rec in book_sub:
        ids = torch.tensor([tok.encode(format_input(rec))])
        out = book_generate_text_simple(model, ids, book_T, model.config.context_length, 50256)
        steps += out.shape[1] - ids.shape[1]
    dt = time.perf_counter() - t0
    rows.append(("book loop (no cache, one at a time)", f"{len(book_sub)} x {book_T}", dt, steps / dt,
                 f"subset; full >= {n * T / (steps / dt):.0f} s extrapolated per token"))

    same = [a == b == c for a, b, c in zip(ours[: len(sub)], ours_one, hf_texts)]
    print(f"\nparity on the subset: ours batched == ours one-at-a-time == transformers for "
          f"{sum(same)}/{len(sub)} prompts; eos reached in {eos_hits}/{len(sub)} transformers runs")
    return rows


def bench_judge(args) -> list[tuple]:
    """(how, workers, records, wall s, average line) for the CLI (whole process) and score_records alone."""
    from ollama_standin import OllamaStandin

    from gpt2_scratch.eval.judge import score_records
    from gpt2_scratch.eval.judge_client import OllamaJudge

    records = json.loads((SHARED / "data" / "instruction-data.json").read_text())[935:935 + args.judge_records]
    records = [{**r, "model_response": r["output"]} for r in records]
    rows = []
    with tempfile.TemporaryDirectory() as tmp, OllamaStandin(delay=args.judge_delay) as server:
        data = Path(tmp) / "responses.json"
        data.write_text(json.dumps(records))
        for workers in (1, 4):
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, str(REPO / "eval" / "judge.py"), "--file", str(data), "--host",
                                server.url, "--workers", str(workers), "--no-cache", "--quiet",
                                "--out", str(Path(tmp) / f"s{workers}.json")], capture_output=True, text=True)
            dt = time.perf_counter() - t0
            assert r.returncode == 0, r.stderr
            rows.append(("eval/judge.py (whole process)", workers, len(records), dt, r.stdout.splitlines()[2]))
        for workers in (1, 4):
            judge = OllamaJudge(server.url, "llama3")
            t0 = time.perf_counter()
            out = score_records(records, judge, workers=workers, progress=False)
            dt = time.perf_counter() - t0
            avg = sum(o["score"] for o in out) / len(out)
            rows.append(("score_records (scoring only)", workers, len(records), dt, f"Average score: {avg:.2f}"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description="issue 5 benchmark: generation and judge speed")
    ap.add_argument("--quick", action="store_true", help="tiny model and few prompts (checks the script)")
    ap.add_argument("--n-prompts", type=int, default=110)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batched-prompts", type=int, default=None,
                    help="prompts for ours batched (default: all; fewer = measured subset, extrapolated)")
    ap.add_argument("--subset", type=int, default=8, help="prompts for the one-at-a-time runs")
    ap.add_argument("--book-prompts", type=int, default=3)
    ap.add_argument("--book-tokens", type=int, default=32)
    ap.add_argument("--judge-records", type=int, default=110)
    ap.add_argument("--judge-delay", type=float, default=0.2, help="stand-in seconds per request")
    ap.add_argument("--skip-generation", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.n_prompts, args.max_new_tokens, args.subset, args.book_tokens = 16, 16, 2, 8
        args.judge_records, args.judge_delay = 12, 0.1

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, CPU")
    if not args.skip_generation:
        rows = bench_generation(args)
        ref = next(r for r in rows if r[0].startswith("ours, batched"))[3]
        print(f"\n| generation, {args.n_prompts} test prompts (gpt2-small shape, random weights) "
              "| measured prompts x tokens | wall s | tok/s |"
              " ours batched is | note |")
        print("|---|---|---|---|---|---|")
        for name, shape, dt, tps, note in rows:
            print(f"| {name} | {shape} | {dt:.1f} | {tps:.1f} | {ref / tps:.1f}x | {note} |")

    rows = bench_judge(args)
    print(f"\n| judge (stand-in, {args.judge_delay:g} s per request) | workers | records | wall s | vs 1 worker |"
          " summary |")
    print("|---|---|---|---|---|---|")
    for how, workers, n, dt, avg in rows:
        base = next(r[3] for r in rows if r[0] == how and r[1] == 1)
        print(f"| {how} | {workers} | {n} | {dt:.2f} | {dt / base:.2f} | {avg} |")


if __name__ == "__main__":
    main()
