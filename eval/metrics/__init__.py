"""Local ``evaluate`` metric modules: loadable offline by path.

``evaluate.load("exact_match")`` fetches the script from the Hugging Face Hub, which needs the
network; these live in the repository instead and load by path::

    import evaluate
    judge = evaluate.load("eval/metrics/llm_judge")          # relative to the repo root, or
    from gpt2_scratch.eval.metrics import load_metric
    judge = load_metric("llm_judge")                         # from anywhere

- ``exact_match``: share of predictions equal to the reference (after stripping whitespace).
- ``rouge_l``:     ROUGE-L F1 (and precision/recall) via Google's ``rouge_score``.
- ``llm_judge``:   the chapter-7 judge (``eval.judge.score_records``) through Ollama or an
                   OpenAI-compatible server; needs ``instructions`` and ``inputs`` besides
                   predictions and references.
"""

from __future__ import annotations

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent
NAMES = ("exact_match", "rouge_l", "llm_judge")


def load_metric(name: str, **kwargs):
    """``evaluate.load`` of one of our metric modules by absolute path (works offline)."""
    if name not in NAMES:
        raise ValueError(f"unknown metric {name!r}; ours are {', '.join(NAMES)}")
    import evaluate

    return evaluate.load(str(METRICS_DIR / name), **kwargs)
