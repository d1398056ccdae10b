"""Speed of our GPT-2 against transformers' GPT2LMHeadModel, side by side in one run.

Training step (forward + backward + AdamW) tokens/s at batch 8 × 72 tokens, and generation tokens/s
(greedy, KV cache) at batch 1 and batch 8, fp32 and bf16 autocast, gpt2-small shape, same weights.
Measurements alternate between the two models round by round so machine noise hits both alike;
the table shows medians.

    python bench/bench_model.py [--rounds 5] [--steps 3] [--new-tokens 64] [--threads N] [--only "batch 1"]
    python bench/bench_model.py --layouts     # why c_attn/c_fc store [in, out] and c_proj [out, in]
"""

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import transformers_twin  # noqa: E402  (the same reference the parity tests use)

from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM  # noqa: E402


def autocast(dtype):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


def train_tok_per_s(model, dtype, steps, batch=8, seq=72):
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)
    ids = torch.randint(0, 50257, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def step():
        with autocast(dtype):
            logits = model(inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, optimizer state
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch * seq / (time.perf_counter() - start)


@torch.inference_mode()
def generate_tok_per_s(model, dtype, batch, new_tokens, prompt_len=32):
    model.eval()
    ids = torch.randint(0, 50257, (batch, prompt_len), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=50256)
    with autocast(dtype):
        model.generate(ids, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    return batch * new_tokens / (time.perf_counter() - start)


@torch.inference_mode()
def projection_layouts(rounds: int, layers: int = 12) -> None:
    """One token's matrix-vector product per projection of gpt2-small, weight stored [out, in] vs [in, out].

    Each shape cycles through one weight per layer (as decoding does), so the weights come from
    memory, not cache: the product's speed is how fast BLAS reads the weight in that layout.
    """
    shapes = {"attn.c_attn": (768, 2304), "attn.c_proj": (768, 768), "mlp.c_fc": (768, 3072), "mlp.c_proj": (3072, 768)}
    print(f"µs per token per projection, fp32, batch 1, {layers} weights cycled, {rounds} rounds (medians)")
    print("| projection | in → out | [out, in] (nn.Linear) | [in, out] (Conv1D) |")
    print("|---|---|---:|---:|")
    for name, (n_in, n_out) in shapes.items():
        out_in = [torch.randn(n_out, n_in) for _ in range(layers)]
        in_out = [w.t().contiguous() for w in out_in]
        bias, x = torch.randn(n_out), torch.randn(1, 1, n_in)
        layouts = {"out_in": lambda: [torch.nn.functional.linear(x, w, bias) for w in out_in],
                   "in_out": lambda: [torch.nn.functional.linear(x, w.t(), bias) for w in in_out]}
        samples = {k: [] for k in layouts}
        for _ in range(rounds):
            for k, run in layouts.items():
                run()
                start = time.perf_counter()
                for _ in range(10):
                    run()
                samples[k].append((time.perf_counter() - start) / (10 * layers) * 1e6)
        a, b = (statistics.median(samples[k]) for k in layouts)
        print(f"| {name} | {n_in} → {n_out} | {a:.0f} | {b:.0f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="training steps timed per round")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per round")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--only", help="run only the workloads whose name contains this text (e.g. 'batch 1')")
    parser.add_argument("--layouts", action="store_true", help="time the projection weight layouts instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.layouts:
        projection_layouts(args.rounds)
        return

    torch.manual_seed(0)
    ours = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("gpt2-small"))
    theirs = transformers_twin(ours)
    models = {"ours": ours, "transformers": theirs}
    cases = [
        ("train step, batch 8×72", lambda m, d: train_tok_per_s(m, d, args.steps)),
        ("generate, batch 1", lambda m, d: generate_tok_per_s(m, d, 1, args.new_tokens)),
        ("generate, batch 8", lambda m, d: generate_tok_per_s(m, d, 8, args.new_tokens)),
    ]
    print(f"gpt2-small shape, {args.threads} threads, torch {torch.__version__}, {args.rounds} rounds (medians)")
    print(f"| {'workload':<24} | dtype | {'ours tok/s':>10} | {'transformers tok/s':>18} | ours / transformers |")
    print(f"|{'-' * 26}|-------|{'-' * 12}|{'-' * 20}|---------------------|")
    for name, run in cases:
        if args.only and args.only not in name:
            continue
        for dtype in ("fp32", "bf16"):
            samples = {label: [] for label in models}
            for _ in range(args.rounds):
                for label, model in models.items():  # alternate: noise hits both alike
                    samples[label].append(run(model, dtype))
            a, b = (statistics.median(samples[label]) for label in models)
            print(f"| {name:<24} | {dtype:<5} | {a:>10.1f} | {b:>18.1f} | {a / b:>18.2f}x |", flush=True)


if __name__ == "__main__":
    main()
