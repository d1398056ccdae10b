"""The options training commands share, each declared once.

Each command's Args (``SFTArgs``, ``DPOArgs``, ``ClassifyArgs``) inherits the classes it needs and adds
its own fields; a recipe that differs from the shared default says so with ``redefault`` (DPO's
learning rate). ``--help`` lists a command's own options first, then one group per class below.
Value bounds are declared on the field and checked once for every command (``core.args.check_values``);
``resume_may_change`` marks what a ``--resume`` may change: how the run is watched and what happens
after it, never what it computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gpt2_scratch.core.args import arg


@dataclass
class ModelOptions:
    """the model to start from"""

    model: str = arg("gpt2-medium", "model folder, Hugging Face repo id, or preset (gpt2-small|gpt2-medium|"
                                    "gpt2-large|gpt2-xl: OpenAI's weights, or untrained with --random-init)")
    random_init: bool = arg(False, "start from random weights instead of pretrained ones (offline runs, tests)")
    models_dir: str | None = arg(None, "cache folder for OpenAI's weights (default $GPT2_SCRATCH_CACHE/openai "
                                       "or ~/.cache/gpt2-scratch/openai)", resume_may_change=True)


@dataclass
class InstructionDataOptions:
    """the instruction records and how they become examples"""

    data: str = arg("", "records: .json/.jsonl/.parquet file, datasets save_to_disk folder, URL or Hub data set id")
    prompt_style: Literal["alpaca", "phi3", "chat"] | None = arg(
        "alpaca", "prompt template (alpaca: the book's; chat: multi-turn conversations)", aliases=("--style",))
    sample: int | None = arg(None, "train on a seeded random sample of this many records (Python's "
                                   "random.seed(--seed); random.sample(records, N), as the Alpaca-1000 blog recipe)",
                             at_least=1)
    split: str = arg("0.85,0.1", "fractions of the records for train and test (the rest is validation), cut in "
                                 "this order: the book's 0.85,0.1 (85/10/5); the blog's 0.8,0.1 (80/10/10); a third "
                                 "number may name the validation fraction explicitly")
    shuffle_split: bool = arg(False, "shuffle the records (with --seed) before the split; the book splits in file order")
    max_length: int | None = arg(None, "longest example in tokens (default: the model's context)", at_least=1)


@dataclass
class ConversationDataOptions:
    """the records' format (sft)"""

    data_format: Literal["auto", "book", "messages", "sharegpt", "prompt-completion"] = arg(
        "auto", "the records' format (auto: recognised by their keys; core/conversations.py)")


@dataclass
class DataFilesOptions:
    """the records' field names, and held-out files (sft, dpo)"""

    columns: str | None = arg(None, "rename the records' fields first: SRC=DST pairs, e.g. "
                                    "question=instruction,answer=output or dialog=messages")
    val_data: str | None = arg(None, "validation records from this source (same forms as --data) instead of a part "
                                     "of --data (that part trains too)")
    test_data: str | None = arg(None, "test records from this source instead of a part of --data (that part "
                                      "trains too)")

    def held_out_inputs(self) -> list[tuple[str, str]]:
        """(flag, source) of the held-out files given, in the order --val-data, --test-data: inputs of the run."""
        return [(flag, value) for flag, value in (("--val-data", self.val_data), ("--test-data", self.test_data))
                if value]

    def data_described(self, data: str) -> str:
        """``--data X`` and the held-out files with it: what a ``--resume`` data check names."""
        held_out = ", ".join(f"{flag} {value}" for flag, value in self.held_out_inputs())
        return f"--data {data}" + (f" (with {held_out})" if held_out else "")


@dataclass
class RunOptions:
    """the training run"""

    out: str = arg("runs/train", "output folder (refused if it exists, unless --resume/--overwrite)",
                   aliases=("--output-dir",), resume_may_change=True)
    overwrite: bool = arg(False, "replace an existing output folder (after every check of the run has passed)",
                          resume_may_change=True)
    resume: str | None = arg(None, "continue from the latest checkpoint in OUT/checkpoints, or from the given "
                                   "checkpoint folder", nargs="?", const="latest", resume_may_change=True)
    resume_other_data: bool = arg(False, "let --resume continue on data whose contents differ from the data the "
                                         "checkpoint was trained on (refused otherwise)", resume_may_change=True)
    epochs: int = arg(2, "passes over the training split", at_least=1)
    max_steps: int | None = arg(None, "stop after this many optimizer steps", at_least=1)
    batch_size: int = arg(8, "global batch size (examples per micro-batch, over all processes)", at_least=1)
    grad_accum: int = arg(1, "micro-batches per optimizer step (gradient accumulation)", at_least=1)
    lr: float = arg(5e-5, "peak learning rate (AdamW)", above=0)
    weight_decay: float = arg(0.1, "AdamW weight decay", at_least=0)
    lr_schedule: Literal["constant", "cosine"] = arg("constant", "learning-rate schedule after warmup (the book: "
                                                                 "constant)")
    warmup_steps: int = arg(0, "linear warmup steps", at_least=0)
    max_grad_norm: float = arg(0.0, "clip the gradient norm to this value (0: no clipping, as the book)", at_least=0)
    mixed_precision: Literal["no", "bf16", "auto"] = arg(
        "no", "bf16 autocast: fast on CPUs with AMX or AVX512-BF16 and on GPUs, far slower than fp32 elsewhere; "
              "auto: bf16 where it is fast, else fp32")
    compile: bool = arg(False, "torch.compile the model (inductor): the same losses, faster steps once compiled; "
                               "the first steps pay for compilation")
    gradient_checkpointing: bool = arg(False, "activation checkpointing (transformers'): keep only each block's "
                                              "input and recompute the block in the backward pass; the same "
                                              "gradients, less memory, slower steps (bench/README.md)")
    seed: int = arg(123, "seed for initialisation, data order and sampling", at_least=0, at_most=2**32 - 1)
    eval_freq: int = arg(5, "evaluate (and log a line) every this many optimizer steps", at_least=1,
                         resume_may_change=True)
    eval_iter: int = arg(5, "batches per evaluation", at_least=1, resume_may_change=True)
    save_every: int = arg(0, "also checkpoint every this many steps (0: only at the end of each epoch)", at_least=0,
                          resume_may_change=True)
    keep_checkpoints: int = arg(2, "how many of the newest checkpoints to keep (0: all)", at_least=0,
                                resume_may_change=True)
    report_to: list[str] = arg(["none"], "experiment trackers that also get every metrics.jsonl row, through "
                                         "Accelerate: none, tensorboard, wandb, mlflow, trackio, or several; all "
                                         "write locally under OUT/trackers (wandb offline)", resume_may_change=True)
    project: str | None = arg(None, "tracker project / experiment name (default: gpt2-scratch)",
                              resume_may_change=True)
    run_name: str | None = arg(None, "tracker run name (default: OUT's folder name)", resume_may_change=True,
                               plain_name=True)
    push_to_hub: str | None = arg(None, "after training, upload the model with a model card to this Hub repo "
                                        "(USER/NAME)", resume_may_change=True)


@dataclass
class GenerationOptions:
    """what the finished model generates"""

    sample_tokens: int = arg(35, "tokens of the greedy sample printed after each epoch", at_least=1,
                             resume_may_change=True)
    max_new_tokens: int = arg(256, "longest response generated for the test split", at_least=1,
                              resume_may_change=True)
    response_batch_size: int = arg(8, "prompts per batch when generating the test responses", at_least=1,
                                   resume_may_change=True)
