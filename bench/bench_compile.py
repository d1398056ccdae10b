"""--compile against eager: training-step throughput of the same model on the same batches, side by side.

    python bench/bench_compile.py [--layers 4] [--width 256] [--heads 4] [--batch 8] [--tokens 128] [--steps 20]

Both models start from the same weights and take the same steps (AdamW, the loop's loss: the model's
``return_logits=False`` path); compilation time is reported apart and not counted in the rate. Prints a
table; run by hand (the figures in bench/README.md name the CPU they were taken on).
"""

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM
    from gpt2_scratch.core.compile import compile_model

    config = GPT2ScratchConfig.from_preset("gpt2-small", n_layers=args.layers, emb_dim=args.width,
                                           n_heads=args.heads, context_length=max(args.tokens, 64))
    torch.manual_seed(0)
    eager = GPT2ScratchForCausalLM(config).train()
    compiled = GPT2ScratchForCausalLM(config).train()
    compiled.load_state_dict(eager.state_dict())
    compile_model(compiled)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, config.vocab_size, (args.batch, args.tokens), generator=g) for _ in range(args.steps)]

    def step(model, optimizer, ids) -> float:
        loss = model(ids, shift_labels=torch.roll(ids, -1, 1), use_cache=False, return_logits=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    rows = []
    for name, model in (("eager", eager), ("compiled", compiled)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        tick = time.perf_counter()
        first = step(model, optimizer, batches[0])  # warm-up (compilation for the compiled model)
        warmup = time.perf_counter() - tick
        tick = time.perf_counter()
        losses = [step(model, optimizer, ids) for ids in batches[1:]]
        seconds = time.perf_counter() - tick
        rows.append((name, warmup, (args.steps - 1) * args.batch * args.tokens / seconds, first, losses[-1]))
    print(f"shape: {args.layers} layers x {args.width} wide, batch {args.batch} x {args.tokens} tokens, "
          f"{args.steps} steps, {torch.get_num_threads()} threads")
    print(f"{'':10} {'first step s':>13} {'tokens/s':>10} {'first loss':>11} {'last loss':>10}")
    for name, warmup, rate, first, last in rows:
        print(f"{name:10} {warmup:13.1f} {rate:10,.0f} {first:11.5f} {last:10.5f}")
    print(f"compiled / eager: {rows[1][2] / rows[0][2]:.2f}x")


if __name__ == "__main__":
    main()
