"""The one training loop. Instruction finetuning, DPO and the classifier are tasks it runs.

    run = launch(...)                    # train/run.py: accelerator, prepared model, optimizer, loaders, state
    state, interrupted = fit(run, task)  # this module
    finish(run, task)                    # train/run.py

The loop owns everything that makes a run: epochs over a batch order fixed by (seed, epoch), gradient
accumulation with ``no_sync``, the loss normalised over the whole accumulation window on all processes,
clipping, the optimizer and scheduler steps, the evaluation cadence (after steps 1, 1 + eval_freq, ...,
as the book's 0-based 0, 5, 10, ...; and after the last step), throughput, the progress bar, metrics
(``metrics.jsonl`` and any experiment tracker), checkpoints (every ``--save-every`` steps, each epoch,
and on Ctrl-C), and the NaN guard on every loss it reports.

A task supplies only what is its own (the ``Task`` protocol below): how a batch becomes a loss and the
sums it reports, what an evaluation measures, what happens at the end of an epoch, and its log lines.
The sums a step reports are a vector: element 0 is the loss summed over the step's units, element 1
the number of units (target tokens for SFT, pairs for DPO, examples for the classifier), so the loop
can compute every loss it reports the same way; a task may add more (DPO's rewards).
"""

from __future__ import annotations

import time
from contextlib import closing, contextmanager, nullcontext
from itertools import islice
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch

from gpt2_scratch.train.run import StopRequest, TrainState, check_loss, save_checkpoint

if TYPE_CHECKING:
    from gpt2_scratch.train.run import Run


class Task(Protocol):
    """What a training command supplies to the loop."""

    name: str  # the progress bar's label
    units_seen_key: str  # the metrics key of the loop's count of units ("target_tokens_seen", "pairs_seen", ...)

    def units(self, batch: dict) -> int:
        """What the loss of ``batch`` averages over (this process's part)."""

    def tokens(self, batch: dict) -> int:
        """Input positions of ``batch`` (padding included: what the compute scales with)."""

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss summed over the batch's units, differentiable; the step's sums, detached, float64)."""

    def initial(self, run: Run) -> dict | None:
        """Metrics before the first step (every process calls it), or None."""

    def evaluate(self, run: Run, running: torch.Tensor) -> dict:
        """One evaluation's metrics (every process calls it): the training sums since the last one are ``running``."""

    def eval_line(self, run: Run, row: dict) -> str: ...

    def end_of_epoch(self, run: Run, epoch: int) -> tuple[dict, str | None] | None:
        """Called by every process after epoch ``epoch`` (1-based) ran to its end: (a row to log, its line), or None."""


def sums_over(run: Run, loader, num_batches: int | None, batch_sums: Callable[[Any, dict], torch.Tensor]) -> torch.Tensor:
    """The sums of ``batch_sums(model, batch)`` over the first ``num_batches`` batches of ``loader`` (None: all),
    in eval mode under autocast, over all processes; the model's mode is restored."""
    model, accelerator = run.model, run.accelerator
    was_training = model.training
    model.eval()
    totals = None
    with torch.no_grad(), accelerator.autocast():  # one context: bf16 weight copies are made once, not per batch
        for batch in islice(loader, num_batches):
            sums = batch_sums(model, batch).to(accelerator.device, torch.float64)
            totals = sums if totals is None else totals + sums
    model.train(was_training)
    if totals is None:
        raise RuntimeError("evaluation over an empty loader")
    return accelerator.reduce(totals, reduction="sum").cpu()  # host sync


def train_step(run: Run, task: Task, window: list[dict]) -> tuple[torch.Tensor, int]:
    """One optimizer step over the micro-batches of ``window``: (the task's sums of all processes, input tokens)."""
    accelerator, model, args = run.accelerator, run.model, run.args
    # Normalise by the units of the whole window on all processes (accelerate's recipe), so accumulation
    # and the process count do not change the gradient.
    counts = torch.tensor([sum(task.units(b) for b in window), sum(task.tokens(b) for b in window)],
                          device=accelerator.device)
    n_units, n_tokens = accelerator.reduce(counts, reduction="sum").tolist()
    totals = None
    for i, batch in enumerate(window):
        with accelerator.no_sync(model) if i < len(window) - 1 else nullcontext():
            with accelerator.autocast():
                loss_sum, sums = task.loss(model, batch)
            # DDP averages gradients over processes; scaling by their number turns that into a sum.
            accelerator.backward(loss_sum * accelerator.num_processes / max(n_units, 1))
        totals = sums if totals is None else totals + sums
    if args.max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return accelerator.reduce(totals.to(accelerator.device), reduction="sum").cpu(), int(n_tokens)  # host sync


@contextmanager
def timed(state: TrainState, phase: str):
    """Add the wall time of the block to ``state.phase_seconds[phase]`` (where a run's time goes, checkpointed)."""
    tick = time.perf_counter()
    try:
        yield
    finally:
        state.phase_seconds[phase] = state.phase_seconds.get(phase, 0.0) + time.perf_counter() - tick


def mean_loss(sums: torch.Tensor) -> float:
    """Element 0 (a summed loss) over element 1 (its units)."""
    return sums[0].item() / max(sums[1].item(), 1)


def fit(run: Run, task: Task) -> tuple[TrainState, bool]:
    """Train until the epochs (or --max-steps) are done; returns (state, whether Ctrl-C stopped it)."""
    from tqdm.auto import tqdm

    args, accelerator, state = run.args, run.accelerator, run.state
    main = accelerator.is_main_process
    root = run.checkpoint_root

    def checkpoint() -> None:
        state.metrics_rows = run.metrics.count  # a resume drops the rows logged after this point
        with timed(state, "checkpoints"):
            save_checkpoint(accelerator, run.model, root, state, keep=args.keep_checkpoints or None)

    def log(row: dict, line: str | None) -> None:
        for key, value in row.items():  # the NaN guard, on every loss the run reports
            if key.endswith("loss") and isinstance(value, float):
                check_loss(value, state.step, root, key.replace("_", " "))
        run.log(row)
        if main and line:
            bar.write(line)

    bar = tqdm(total=run.total_steps, initial=state.step, desc=task.name, unit="step", disable=not main,
               dynamic_ncols=True)
    if state.step == 0 and state.batches_done == 0:
        with timed(state, "evaluation"):
            row = task.initial(run)
        if row is not None:
            row = {"epoch": 0, "step": 0, **row, "tokens_seen": 0, "initial": True}
            log(row, task.eval_line(run, row))

    window_tokens, window_seconds = 0, 0.0  # throughput since the last evaluation (timing only, not checkpointed)

    def eval_and_log() -> None:
        nonlocal window_tokens, window_seconds
        running = torch.tensor(state.running, dtype=torch.float64)
        with timed(state, "evaluation"):
            measured = task.evaluate(run, running)
        row = {"epoch": min(state.epoch + 1, args.epochs), "step": state.step, **measured,
               "lr": run.scheduler.get_last_lr()[0], "tokens_seen": state.tokens_seen,
               task.units_seen_key: state.units_seen,
               "tokens_per_sec": window_tokens / window_seconds if window_seconds else 0.0}
        log(row, task.eval_line(run, row))
        state.running, state.last_eval_step, state.evaluations = [], state.step, state.evaluations + 1
        window_tokens, window_seconds = 0, 0.0

    done = state.step >= run.total_steps
    with StopRequest() as stop, closing(bar):  # the bar ends its line before any error or final line
        while state.epoch < args.epochs and not done:
            epoch = state.epoch
            run.train_sampler.set_epoch(epoch)
            run.train_loader.set_epoch(epoch)
            loader = (accelerator.skip_first_batches(run.train_loader, state.batches_done) if state.batches_done
                      else run.train_loader)
            batches = iter(loader)
            while True:
                tick = time.perf_counter()
                window = list(islice(batches, args.grad_accum))  # this optimizer step's micro-batches
                if not window:
                    break
                sums, n_tokens = train_step(run, task, window)
                running = sums if not state.running else torch.tensor(state.running, dtype=torch.float64) + sums
                state.running = running.tolist()
                state.step += 1
                state.batches_done += len(window)
                state.tokens_seen += n_tokens
                state.units_seen += int(sums[1].item())
                elapsed = time.perf_counter() - tick
                state.train_seconds += elapsed
                state.phase_seconds["train_steps"] = state.train_seconds
                window_tokens += n_tokens
                window_seconds += elapsed
                step_loss = mean_loss(sums)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.3f}")
                check_loss(step_loss, state.step, root)

                last = state.step >= run.total_steps
                # The last step's evaluation comes before its checkpoint, so a resume from that checkpoint
                # does not evaluate (and log) it again.
                if (state.step - 1) % args.eval_freq == 0 or last:
                    eval_and_log()
                if args.save_every and state.step % args.save_every == 0:
                    checkpoint()
                if stop.agreed(accelerator):
                    checkpoint()
                    bar.close()
                    if main:
                        print(f"stopped at step {state.step}: checkpoint saved in {root}; continue with the same "
                              "command and --resume", flush=True)
                    return state, True
                if last:
                    done = True
                    break

            if state.batches_done >= len(run.train_sampler):  # the epoch ran to its end
                with timed(state, "epoch_end"):
                    ended = task.end_of_epoch(run, epoch + 1)
                if ended is not None:
                    row, line = ended
                    log({"epoch": epoch + 1, "step": state.step, **row}, line)
                accelerator.wait_for_everyone()
                state.epoch += 1
                state.batches_done = 0
                checkpoint()
        if state.last_eval_step != state.step:
            eval_and_log()
    return state, False
