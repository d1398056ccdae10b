"""How a run stops early: on a signal (Ctrl-C, SIGTERM) with a checkpoint, or on a loss that is not finite.

    with StopRequest() as stop:           # around a loop
        ...
        if stop.agreed(accelerator):      # at a step boundary: checkpoint, say so, return stop.exit_code
    check_loss(loss, step, root)          # a NaN or infinite loss ends the run (Diverged, exit 1)

SIGTERM is what ``timeout``, ``kill``, ``docker stop`` and a cluster's preemption send; a run treats it as
it treats Ctrl-C: it finishes the current step, saves a checkpoint, prints one line saying how to
continue (``--resume``) and exits 130 after Ctrl-C, 143 (128 + SIGTERM) after SIGTERM. A second
signal of either kind stops at once (exit 130 / 143, no checkpoint). Outside the loop, SIGTERM interrupts
as Ctrl-C does (core.process.terminate_as_interrupt: exit 143, the output folder's lock released).
"""

from __future__ import annotations

import math
import signal
import sys
from pathlib import Path

from gpt2_scratch.core.errors import EXIT_INTERRUPTED, EXIT_TERMINATED, Failure, Terminated
from gpt2_scratch.train.checkpoints import list_checkpoints

# What each signal is called in the lines a run prints, and the exit code it ends the run with.
_SIGNALS = {signal.SIGINT: ("Ctrl-C", EXIT_INTERRUPTED), signal.SIGTERM: ("SIGTERM", EXIT_TERMINATED)}


class StopRequest:
    """The first Ctrl-C or SIGTERM asks the loop to stop at the next step boundary (with a checkpoint); a
    second one interrupts at once. Use as a context manager around the loop: the previous handlers come
    back when it ends."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the first signal received
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def cause(self) -> str:
        """The first signal's name as the run's lines say it ("Ctrl-C", "SIGTERM")."""
        return _SIGNALS.get(self.signum, ("Ctrl-C", EXIT_INTERRUPTED))[0]

    @property
    def exit_code(self) -> int:
        """130 after Ctrl-C, 143 after SIGTERM (another process's signal, seen through ``agreed``: 130)."""
        return _SIGNALS.get(self.signum, ("Ctrl-C", EXIT_INTERRUPTED))[1]

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        self.signum = signum
        again = "Ctrl-C again" if signum == signal.SIGINT else "a second SIGTERM"
        print(f"\n{self.cause}: stopping after this step ({again} stops at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequest":
        self._previous = {signum: signal.signal(signum, self._handle) for signum in _SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def agreed(self, accelerator) -> bool:
        """Whether any process was asked to stop (all processes must stop at the same step)."""
        if accelerator.num_processes == 1:
            return self.requested
        import torch  # deferred: this module is read by commands that never train

        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


class Diverged(Failure):
    """The loss became NaN or infinite; nothing from that point on is saved."""


def check_loss(loss: float, step: int, checkpoint_root: Path, what: str = "loss") -> None:
    """Stop the run with one line when a loss is not finite (the weights are broken from here on).

    Called with each step's training loss and with every evaluation's loss: an update can leave finite
    but exploded weights whose next loss overflows, and no checkpoint may be saved from them.
    """
    if math.isfinite(loss):
        return
    kept = list_checkpoints(checkpoint_root)
    last = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was saved before it"
    raise Diverged(f"training diverged at step {step}: the {what} is {loss}; no model was saved from this run and "
                   f"{last}; lower --lr or clip gradients with --max-grad-norm 1.0, then start again (--overwrite)")
