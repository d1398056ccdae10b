"""The one training loop. Instruction finetuning, DPO and the classifier are tasks it runs.

    run, loaders = launch(...)   # train/run.py: accelerator, prepared model, optimizer, loaders, state
    stopped = fit(run, task)     # this module: None when the run ended, else the exit code of a stop
    finish(run, task)            # train/run.py

The loop owns everything that makes a run: epochs over a batch order fixed by (seed, epoch), gradient
accumulation with ``no_sync``, the loss normalised over the whole accumulation window on all processes,
clipping, the optimizer and scheduler steps, the evaluation cadence (after steps 1, 1 + eval_freq, ...,
as the book's 0-based 0, 5, 10, ...; and after the last step), throughput, the progress bar, metrics
(``metrics.jsonl`` and any experiment tracker), checkpoints (every ``--save-every`` steps, each epoch,
and on Ctrl-C or SIGTERM: train/stopping.py), and the NaN guard on every loss it reports.

A task supplies only what is its own (the ``Task`` base class, train/task.py): how a batch becomes a
loss and the sums it reports, what an evaluation measures, what happens at the end of an epoch, and
its log lines. The training step is ``train_step``; each task's loss is its ``Task.loss``.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from itertools import chain, islice
from typing import Any, Callable

import torch

from gpt2_scratch.core.errors import Failure
from gpt2_scratch.train.checkpoints import save_checkpoint
from gpt2_scratch.train.sharded import is_sharded
from gpt2_scratch.train.state import Run, timed
from gpt2_scratch.train.stopping import StopRequest, check_loss
from gpt2_scratch.train.task import Task, mean_loss


def sums_over(run: Run, loader, num_batches: int | None, batch_sums: Callable[[Any, dict], torch.Tensor]) -> torch.Tensor:
    """The sums of ``batch_sums(model, batch)`` over the first ``num_batches`` batches of ``loader`` (None: all),
    in eval mode under autocast, over all processes; the model's mode is restored."""
    model, accelerator = run.model, run.accelerator
    was_training = model.training
    model.eval()
    totals = None
    batches = islice(loader, num_batches)
    if is_sharded(model):
        batches = _in_lockstep(batches, model, accelerator, batch_sums)
    with torch.no_grad(), accelerator.autocast():  # one context: bf16 weight copies are made once, not per batch
        for batch in batches:
            sums = batch_sums(model, batch).to(accelerator.device, torch.float64)
            totals = sums if totals is None else totals + sums
    model.train(was_training)
    if accelerator.num_processes > 1:
        # A split with fewer batches than processes (or a last batch smaller than the process count) leaves
        # some processes nothing to evaluate: they add zeros of the others' length, so every example counts once.
        width = torch.tensor([0 if totals is None else len(totals)], device=accelerator.device)
        width = int(accelerator.reduce(width, reduction="max").item())
        if totals is None and width:
            totals = torch.zeros(width, dtype=torch.float64, device=accelerator.device)
    if totals is None:
        raise RuntimeError("evaluation over an empty loader")
    return accelerator.reduce(totals, reduction="sum").cpu()  # host sync


def _in_lockstep(batches, model, accelerator, batch_sums):
    """``batches`` for a model sharded with FSDP, whose every forward pass gathers parameters on ALL processes:
    while any process still has a batch, one that has run out repeats its last one and drops the sums (else
    the others would wait for it forever); a process that never had one cannot, and every process says so."""
    previous = None
    for batch in chain(batches, [None]):  # None: this process has run out
        while True:
            state = torch.tensor([batch is not None, batch is None and previous is None], device=accelerator.device)
            anyone_has, someone_cannot = accelerator.reduce(state.int(), reduction="max").tolist()
            if someone_cannot and anyone_has:
                raise Failure("with FSDP every process needs an evaluation batch while any has one: this split has "
                              "fewer examples than processes; give it at least one example per process")
            if not anyone_has:
                return
            if batch is not None:
                break
            batch_sums(model, previous)  # this process's part of the others' forward pass; its sums are not counted
        previous = batch
        yield batch


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


def fit(run: Run, task: Task) -> int | None:
    """Train until the epochs (or --max-steps) are done: None; or the exit code when a signal stopped the run
    at a step boundary (train/stopping.py) after saving a checkpoint."""
    state, args = run.state, run.args
    with _Fitting(run, task) as fitting, StopRequest() as stop:
        if state.step == 0 and state.batches_done == 0:
            fitting.initial()
        while state.epoch < args.epochs and state.step < run.total_steps:
            if fitting.epoch(stop):
                return stop.exit_code
        if state.last_eval_step != state.step:
            fitting.evaluate()
    return None


class _Fitting:
    """What one ``fit`` keeps between its steps: the progress bar, the throughput since the last evaluation
    (timing only, not checkpointed), and the logging, evaluation and checkpoint of the run."""

    def __init__(self, run: Run, task: Task) -> None:
        from tqdm.auto import tqdm  # deferred: tqdm.auto probes for notebooks at import

        self.run, self.task, self.state = run, task, run.state
        self.main = run.accelerator.is_main_process
        self.bar = tqdm(total=run.total_steps, initial=run.state.step, desc=task.name, unit="step",
                        disable=not self.main, dynamic_ncols=True)
        self.window_tokens, self.window_seconds = 0, 0.0

    def __enter__(self) -> "_Fitting":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()  # the bar ends its line before any error or final line

    def log(self, row: dict, line: str | None) -> None:
        for key, value in row.items():  # the NaN guard, on every loss the run reports
            if key.endswith("loss") and isinstance(value, float):
                check_loss(value, self.state.step, self.run.checkpoint_root, key.replace("_", " "))
        self.run.log(row)
        if self.main and line:
            self.bar.write(line)

    def checkpoint(self) -> None:
        run, state = self.run, self.state
        state.metrics_rows = run.metrics.count  # a resume drops the rows logged after this point
        run.check_out()
        with timed(state, "checkpoints"):
            save_checkpoint(run.accelerator, run.model, run.checkpoint_root, state,
                            keep=run.args.keep_checkpoints or None, optimizer=run.optimizer, scheduler=run.scheduler)

    def initial(self) -> None:
        with timed(self.state, "evaluation"):
            row = self.task.initial(self.run)
        if row is not None:
            row = {"epoch": 0, "step": 0, **row, "tokens_seen": 0, "initial": True}
            self.log(row, self.task.eval_line(self.run, row))

    def evaluate(self) -> None:
        run, state, task = self.run, self.state, self.task
        running = torch.tensor(state.running, dtype=torch.float64)
        with timed(state, "evaluation"):
            measured = task.evaluate(run, running)
        row = {"epoch": min(state.epoch + 1, run.args.epochs), "step": state.step, **measured,
               "lr": run.scheduler.get_last_lr()[0], "tokens_seen": state.tokens_seen,
               task.units_seen_key: state.units_seen,
               "tokens_per_sec": self.window_tokens / self.window_seconds if self.window_seconds else 0.0}
        self.log(row, task.eval_line(run, row))
        state.running, state.last_eval_step, state.evaluations = [], state.step, state.evaluations + 1
        self.window_tokens, self.window_seconds = 0, 0.0

    def step(self, window: list[dict]) -> None:
        """One optimizer step and its counters."""
        state, tick = self.state, time.perf_counter()
        sums, n_tokens = train_step(self.run, self.task, window)
        running = sums if not state.running else torch.tensor(state.running, dtype=torch.float64) + sums
        state.running = running.tolist()
        state.step += 1
        state.batches_done += len(window)
        state.tokens_seen += n_tokens
        state.units_seen += int(sums[1].item())
        elapsed = time.perf_counter() - tick
        state.train_seconds += elapsed
        state.phase_seconds["train_steps"] = state.train_seconds
        self.window_tokens += n_tokens
        self.window_seconds += elapsed
        step_loss = mean_loss(sums)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{step_loss:.3f}")
        check_loss(step_loss, state.step, self.run.checkpoint_root)

    def epoch(self, stop: StopRequest) -> bool:
        """The rest of the current epoch (or the run's last steps); True when ``stop`` ended it."""
        run, state, args, accelerator = self.run, self.state, self.run.args, self.run.accelerator
        epoch = state.epoch
        run.train_sampler.set_epoch(epoch)
        run.train_loader.set_epoch(epoch)
        loader = (accelerator.skip_first_batches(run.train_loader, state.batches_done) if state.batches_done
                  else run.train_loader)
        batches = iter(loader)
        while window := list(islice(batches, args.grad_accum)):  # this optimizer step's micro-batches
            self.step(window)
            last = state.step >= run.total_steps
            # The last step's evaluation comes before its checkpoint, so a resume from that checkpoint
            # does not evaluate (and log) it again.
            if (state.step - 1) % args.eval_freq == 0 or last:
                self.evaluate()
            if args.save_every and state.step % args.save_every == 0:
                self.checkpoint()
            if stop.agreed(accelerator):
                self.checkpoint()
                self.bar.close()
                if self.main:
                    print(f"stopped at step {state.step}: {stop.cause}; checkpoint saved in {run.checkpoint_root}; "
                          "continue with the same command and --resume", flush=True)
                return True
            if last:
                break
        if state.batches_done >= len(run.train_sampler):  # the epoch ran to its end
            with timed(state, "epoch_end"):
                ended = self.task.end_of_epoch(run, epoch + 1)
            if ended is not None:
                row, line = ended
                self.log({"epoch": epoch + 1, "step": state.step, **row}, line)
            accelerator.wait_for_everyone()
            state.epoch += 1
            state.batches_done = 0
            self.checkpoint()
        return False
