"""What a run logs as it goes (``metrics.jsonl``) and the plots drawn from it (``loss.png``, ``accuracy.png``).

``metrics.jsonl`` holds one JSON object per evaluation (and per epoch sample, per accuracy estimate),
appended and synced as it happens (``core.files.JsonlFile``); a resumed run first drops the rows
logged after its checkpoint, so every row is logged exactly once. The plots are the book's: a series
over optimizer steps, with the tokens seen on a second x-axis.
"""

from __future__ import annotations

import os
from pathlib import Path

from gpt2_scratch.core.files import JsonlFile, atomic_path


class MetricsLog:
    """``metrics.jsonl`` of a run; only the main process writes (``enabled``)."""

    def __init__(self, path: str | os.PathLike, *, enabled: bool = True):
        self.file = JsonlFile(path)
        self.enabled = enabled
        # Rows in the file (the main process's count): a checkpoint records it, so a resume knows which rows
        # came after it.
        self.count = len(self.read()) if enabled and self.path.exists() else 0

    @property
    def path(self) -> Path:
        return self.file.path

    def log(self, row: dict) -> None:
        if self.enabled:
            self.file.append(row)
            self.count += 1

    def read(self) -> list[dict]:
        return self.file.read()

    def truncate_after(self, step: int, *, rows: int | None = None) -> int:
        """On resume: drop the rows logged after the checkpoint, its first ``rows`` being those logged before it
        (None, a checkpoint that did not count them: those of a later step). The resumed run logs them again,
        so each row is logged once (a finished run's final rows are among them). Returns how many of a later
        step were dropped (the trackers already have them, and skip them when they come again)."""
        if not (self.enabled and self.path.exists()):
            return 0
        logged = self.read()
        kept = logged[:rows] if rows is not None else [row for row in logged if row.get("step", 0) <= step]
        dropped = logged[len(kept):] if rows is not None else [row for row in logged if row.get("step", 0) > step]
        self.file.rewrite(kept)
        self.count = len(kept)
        return sum(1 for row in dropped if row.get("step", 0) > step)


def plot_curves(rows: list[dict], out_dir: str | os.PathLike, *, stem: str = "loss",
                series: dict[str, str] | None = None, ylabel: str = "Loss") -> list[Path]:
    """The book's plot: each ``series`` (metrics key → legend label) over ``step``, with ``tokens_seen`` on a
    second x-axis; written as PNG and PDF. Rows lacking a key are skipped for that series."""
    import matplotlib  # deferred: heavy, and only the plots need it

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt  # deferred: after the backend is chosen

    series = series or {"train_loss": "training loss", "val_loss": "validation loss"}
    fig, ax = plt.subplots(figsize=(5, 3))
    plotted = False
    for (key, label), style in zip(series.items(), ("-", "-.", ":", "--")):
        points = [(r["step"], r[key]) for r in rows if "step" in r and isinstance(r.get(key), (int, float))]
        if points:
            ax.plot(*zip(*points), style, label=label)
            plotted = True
    if plotted:
        ax.legend(loc="upper right")
    ax.set_xlabel("Steps")
    ax.set_ylabel(ylabel)
    # Second x-axis: tokens seen, placed by the same steps (an invisible plot aligns the ticks).
    ax2 = ax.twiny()
    first = next(iter(series))
    seen = [(r["tokens_seen"], r[first]) for r in rows if "tokens_seen" in r and isinstance(r.get(first), (int, float))]
    if seen:
        ax2.plot(*zip(*seen), alpha=0)
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    paths = []
    try:
        for suffix in (".png", ".pdf"):
            path = Path(out_dir) / f"{stem}{suffix}"
            with atomic_path(path) as tmp:
                fig.savefig(tmp)
            paths.append(path)
    finally:
        plt.close(fig)
    return paths
