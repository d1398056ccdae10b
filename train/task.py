"""The contract between the training loop and a kind of training: the ``Task`` base class.

A new kind of training (pretraining on raw text, conversations, ...) is one new module in train/ that
defines three things, as train/sft.py, train/dpo.py and train/classify.py do:

    @dataclass
    class XArgs(ModelOptions, RunOptions, ...):     # its options (train/options.py has the shared ones)
        ...
    def set_up(args) -> (Run, Task):                 # every check, the data, the model, then train/run.py's
        started = start(args, inputs=...)            #   start and launch (the shared loop; a loop of its own:
        ...                                          #   launch_own_loop(..., fit=that_loop))
        run, loaders = launch(started, model=..., train_dataset=..., train_sampler=..., collate=...,
                              eval_loaders={...}, data_sha256=fingerprint(records))
        return run, XTask(...)
    @dataclass
    class XTask(Task):                               # what is its own in the loop: the hooks below
        name = "x"; units_seen_key = "x_seen"
        def units(self, batch): ...
        def loss(self, model, batch): ...
        def evaluate(self, run, running): ...

and ``run = lambda args: run_training(args, set_up)`` for core/cli.py's command table (a whole one, next-token
training on raw token sequences in 40 lines: tests/test_loop.py, ``test_a_new_kind_of_training_is_one_task_with_
three_hooks``). The loop
(train/loop.py) owns everything else: epochs, accumulation, clipping, the optimizer and scheduler,
evaluation cadence, metrics and trackers, checkpoints and ``--resume``, Ctrl-C/SIGTERM, the NaN guard.

The sums convention: ``loss`` returns, besides the differentiable loss summed over the batch's units, a
detached float64 vector of sums whose element 0 is that summed loss and element 1 the number of units
(target tokens, pairs, examples). The loop adds these vectors over steps and processes, so every loss it
reports is ``mean_loss(sums)``, whatever the task; a task may append more sums (DPO's rewards).

Every hook is declared here; those with a default need not be written. The loop and train/run.py call
nothing on a task that is not declared here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gpt2_scratch.train.checkpoints import save_model_into
from gpt2_scratch.train.state import Run, timed

if TYPE_CHECKING:  # for annotations only: torch is imported by the modules that compute
    import torch


def mean_loss(sums: "torch.Tensor") -> float:
    """Element 0 of a sums vector (a summed loss) over element 1 (its units)."""
    return sums[0].item() / max(sums[1].item(), 1)


class Task:
    """What a kind of training supplies to the loop. Subclass it (as a dataclass, usually) and set
    ``name`` and ``units_seen_key``; ``units``, ``loss`` and ``evaluate`` have no default."""

    name: str = "train"  # the progress bar's label
    units_seen_key: str = "units_seen"  # the metrics key of the loop's count of units ("target_tokens_seen", ...)

    # ---- one step (train/loop.py's train_step) -------------------------------------------------------

    def units(self, batch: dict) -> int:
        """What the loss of ``batch`` averages over (this process's part): the loop normalises the gradient
        of a whole accumulation window by the sum of these over all processes."""
        raise NotImplementedError(f"{type(self).__name__}.units")

    def tokens(self, batch: dict) -> int:
        """Input positions of ``batch``, padding included (what the compute scales with: tokens/s, tokens seen).
        Default: the size of ``batch["input_ids"]``."""
        return batch["input_ids"].numel()

    def loss(self, model, batch: dict) -> "tuple[torch.Tensor, torch.Tensor]":
        """(the loss summed over the batch's units, differentiable; the step's sums, detached, float64: see the
        module docstring). Called under autocast; ``model`` is the prepared one (DDP-wrapped with several
        processes), so call its forward."""
        raise NotImplementedError(f"{type(self).__name__}.loss")

    def batch_sums(self, model, batch: dict) -> "torch.Tensor":
        """The sums of one evaluation batch (``loop.sums_over`` adds them up). Default: ``loss``'s sums."""
        return self.loss(model, batch)[1]

    # ---- evaluation and log lines ----------------------------------------------------------------------

    def initial(self, run: Run) -> dict | None:
        """Metrics before the first step (every process calls it), or None (the default: nothing measured)."""
        return None

    def evaluate(self, run: Run, running: "torch.Tensor") -> dict:
        """One evaluation's metrics (every process calls it, every ``--eval-freq`` steps and after the last);
        ``running`` is the sum of the training steps' sums since the previous evaluation. A key ending in
        ``loss`` is checked by the loop's NaN guard."""
        raise NotImplementedError(f"{type(self).__name__}.evaluate")

    def eval_line(self, run: Run, row: dict) -> str | None:
        """The line printed for a logged row (``initial`` or ``evaluate``'s, with the loop's epoch, step, lr,
        tokens_seen, the units count and tokens_per_sec added); None prints nothing. Default: the row's
        numbers, ``key value`` separated by ``|``."""
        shown = (f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
        return " | ".join(shown)

    def end_of_epoch(self, run: Run, epoch: int) -> tuple[dict, str | None] | None:
        """Called by every process after epoch ``epoch`` (1-based) ran to its end, before the epoch's
        checkpoint: (a row to log, its line), or None (the default)."""
        return None

    # ---- the end of the run (train/run.py's finish) --------------------------------------------------

    def final_evaluation(self, run: Run) -> dict | None:
        """After the last step, every process: a metrics row measured once (the classifier's full-split
        accuracies), or None (the default)."""
        return None

    def finish(self, run: Run) -> None:
        """The main process, after ``final_evaluation``: write what the run leaves in OUT. Default: the model at
        the top of OUT (train/lm_outputs.py has what a language model adds: the samples, test responses and
        LoRA's adapter)."""
        model = run.unwrapped()
        model.eval()
        with timed(run.state, "save_model"):
            save_model_into(run.out, model, None)
