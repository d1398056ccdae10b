"""Evaluation for gpt2-scratch: test-set responses and an LLM judge.

- ``eval/generate.py``  adds ``model_response`` to instruction records (batched, resumable).
- ``eval/judge.py``     scores responses 0-100 with a judge model served by Ollama (or any
  OpenAI-compatible server), as in chapter 7 of "Build a Large Language Model From Scratch",
  with retries, concurrency, a resumable cache and a summary you can trust.
- ``eval/metrics/``     the judge and cheap deterministic metrics as local ``evaluate`` modules.

The judge side imports neither torch nor transformers, so it starts fast.
"""
