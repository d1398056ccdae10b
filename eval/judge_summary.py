"""Statistics and the printed report for judge scores and pairwise verdicts.

The first two lines are the book's (``Number of scores: N of M`` and ``Average score: X.XX``), so
results compare directly with chapter 7. The rest says how far to trust that average: median,
sample standard deviation, a 95% confidence interval of the mean (Student t), a histogram in ten
bins (printed, and as a PNG), the lowest-scoring records, and every failure with its reason.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from gpt2_scratch.core.files import atomic_path
from gpt2_scratch.eval.judge_prompts import is_score

# Two-sided 95% critical values of Student's t for 1..30 degrees of freedom; beyond that the
# Cornish-Fisher expansion below is accurate to ~1e-5 (no scipy dependency for one number).
_T975 = [12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423]
_Z975 = 1.959963984540054

HIST_EDGES = np.linspace(0, 100, 11)  # [0,10) ... [90,100]; numpy's last bin includes 100


def t_critical_975(df: int) -> float:
    """t such that P(|T_df| <= t) = 0.95."""
    if df <= 0:
        return math.nan
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975  # Abramowitz & Stegun 26.7.5
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def mean_ci95(values) -> tuple[float, float]:
    """95% t-interval of the mean; (nan, nan) with fewer than two values."""
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return (math.nan, math.nan)
    half = t_critical_975(x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return (float(x.mean() - half), float(x.mean() + half))


def _short(text, width: int = 70) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def score_summary(outcomes: list[dict], records: list[dict], *, response_key: str,
                  lowest: int = 5) -> dict:
    """Numbers for the report. ``outcomes[i]`` has ``score`` (int or None), ``status``, ``reason``, ``reply``.

    Only integers 0..100 are averaged, whatever their source: any other score is reported as a
    failure of its record.
    """
    scored = [(o["index"], o["score"]) for o in outcomes if is_score(o["score"])]
    impossible = [{"index": o["index"], "reply": o.get("reply"),
                   "reason": f"impossible score {o['score']!r} (not an integer 0..100); not averaged"}
                  for o in outcomes if o["score"] is not None and not is_score(o["score"])]
    scores = np.array([s for _, s in scored], dtype=float)
    counts, _ = np.histogram(scores, bins=HIST_EDGES)
    lo, hi = mean_ci95(scores)
    worst = sorted(scored, key=lambda t: (t[1], t[0]))[:lowest]
    return {
        "num_scores": int(scores.size),
        "num_records": len(records),
        "average": float(scores.mean()) if scores.size else math.nan,
        "median": float(np.median(scores)) if scores.size else math.nan,
        "std": float(scores.std(ddof=1)) if scores.size > 1 else math.nan,
        "ci95": [lo, hi],
        "num_empty": sum(o["status"] == "empty" for o in outcomes),
        "num_cached": sum(bool(o.get("cached")) for o in outcomes),
        "histogram": {"edges": HIST_EDGES.tolist(), "counts": counts.tolist()},
        "lowest": [{"index": i, "score": s, "instruction": records[i]["instruction"],
                    "response": records[i][response_key]} for i, s in worst],
        "failures": sorted([{"index": o["index"], "reason": o["reason"], "reply": o.get("reply")}
                            for o in outcomes if o["status"] == "failed" and o["score"] is None]
                           + impossible, key=lambda f: f["index"]),
    }


def format_score_summary(s: dict) -> str:
    lines = [
        f"Number of scores: {s['num_scores']} of {s['num_records']}",
        f"Average score: {s['average']:.2f}",
        "",
        f"Median: {s['median']:.1f}   Std: {s['std']:.2f}   "
        f"95% CI of the mean: [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}]",
        f"Empty responses scored 0 without asking: {s['num_empty']}   "
        f"Answers taken from the cache: {s['num_cached']}",
        "",
        "Histogram:",
    ]
    counts = s["histogram"]["counts"]
    edges = s["histogram"]["edges"]
    top = max(counts) if counts and max(counts) else 1
    for k, c in enumerate(counts):
        hi = int(edges[k + 1]) - 1 if k < len(counts) - 1 else 100
        bar = "#" * round(40 * c / top)
        lines.append(f"  {int(edges[k]):3d}-{hi:3d} | {bar} {c}")
    if s["lowest"]:
        lines += ["", "Lowest-scoring records:"]
        lines += [f"  #{w['index']:<5} {w['score']:3d}  {_short(w['instruction'], 50)}  ->  "
                  f"{_short(w['response'], 50)!s}" for w in s["lowest"]]
    lines += ["", f"Failures: {len(s['failures'])}"]
    lines += [f"  #{f['index']:<5} {f['reason']}" + (f"  reply: {_short(f['reply'], 80)!r}"
                                                     if f.get("reply") is not None else "")
              for f in s["failures"]]
    return "\n".join(lines)


def pairwise_summary(outcomes: list[dict], records: list[dict], *, name_a: str, name_b: str) -> dict:
    """Win/tie/loss of A against B; ``outcomes[i]['result']`` is "win", "tie", "loss" or None (failed)."""
    decided = [o for o in outcomes if o["result"] in ("win", "tie", "loss")]
    points = np.array([{"win": 1.0, "tie": 0.5, "loss": 0.0}[o["result"]] for o in decided])
    both = [o for o in decided if o.get("consistent") is not None]
    lo, hi = mean_ci95(points)
    return {
        "name_a": name_a, "name_b": name_b,
        "num_compared": len(decided), "num_records": len(records),
        "wins": sum(o["result"] == "win" for o in decided),
        "ties": sum(o["result"] == "tie" for o in decided),
        "losses": sum(o["result"] == "loss" for o in decided),
        "win_rate": float(points.mean()) if points.size else math.nan,
        "win_rate_ci95": [lo, hi],
        "position_consistency": (sum(o["consistent"] for o in both) / len(both)) if both else math.nan,
        "num_cached": sum(bool(o.get("cached")) for o in outcomes),
        "failures": [{"index": o["index"], "reply": o.get("reply"),
                      "reason": o["reason"] if o["result"] is None else f"impossible result {o['result']!r}"}
                     for o in outcomes if o["result"] not in ("win", "tie", "loss")],
    }


def format_pairwise_summary(s: dict, criterion: str = "better") -> str:
    lines = [
        f"Pairwise ({'which is better' if criterion == 'better' else 'which is more ' + criterion}): "
        f"A = {s['name_a']}  vs  B = {s['name_b']}",
        f"Number of comparisons: {s['num_compared']} of {s['num_records']}",
        f"A wins: {s['wins']}   ties: {s['ties']}   A losses: {s['losses']}",
        f"Win rate of A (tie = 1/2): {s['win_rate']:.3f}   95% CI: "
        f"[{s['win_rate_ci95'][0]:.3f}, {s['win_rate_ci95'][1]:.3f}]",
        f"Judge agreed with itself when the order was swapped: {s['position_consistency']:.1%}   "
        f"Answers taken from the cache: {s['num_cached']}",
        "",
        f"Failures: {len(s['failures'])}",
    ]
    lines += [f"  #{f['index']:<5} {f['reason']}" + (f"  reply: {_short(f['reply'], 80)!r}"
                                                     if f.get("reply") is not None else "")
              for f in s["failures"]]
    return "\n".join(lines)


def save_histogram_png(scores, path: str | os.PathLike, title: str) -> Path:
    """Write a histogram of ``scores`` (ten bins over 0..100) as a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display here or in CI
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.hist(np.asarray(scores, dtype=float), bins=HIST_EDGES, edgecolor="black")
    ax.set_xlabel("judge score")
    ax.set_ylabel("records")
    ax.set_xticks(HIST_EDGES)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path
