"""Publishing a training run: its model card, built from the files the run left, and the push command.

    gpt2-scratch push --model DIR --repo-id USER/NAME [--private] [--revision BRANCH] [--exist-ok]
    python -m gpt2_scratch push ...                       (the same command)

The card is ``huggingface_hub.ModelCardData`` YAML metadata (base_model, datasets, license,
library_name, pipeline_tag, tags), then the final losses or accuracies, the judge score when a scores
file is there, the loss/accuracy plots, the training arguments, and how to load the model with and
without this package. It is read from the run's folder (``--run-dir``, default the model folder, then
its parent): train/sft.py and train/classify.py save the model at the top of OUT beside ``args.json``,
``metrics.jsonl``, ``loss.png`` (``accuracy.png``); eval/judge.py writes ``*-scores.json``. The upload
itself is the model library's generic ``gpt2_scratch.hub.push_folder``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from gpt2_scratch.convert.resolve import preset_name
from gpt2_scratch.core.args import arg
from gpt2_scratch.core.download import is_hub_id
from gpt2_scratch.core.errors import InputError
from gpt2_scratch.hub import check_repo_id, hub_token, push_folder
from gpt2_scratch.train.lora import card_line
from gpt2_scratch.train.pretrain_record import card_lines as pretraining_card_lines

logger = logging.getLogger(__name__)

# Data files the training scripts use → Hub dataset ids, for the card's `datasets:` metadata.
KNOWN_DATASETS = {
    "SMSSpamCollection": "ucirvine/sms_spam",
    "SMSSpamCollection.tsv": "ucirvine/sms_spam",
    "sms+spam+collection.zip": "ucirvine/sms_spam",
}
ARGS_FILES = ("args.json", "training_args.json", "train_args.json")
PLOT_FILES = ("loss.png", "accuracy.png")
# eval/judge.py writes `<responses stem>-scores.json` ({"model": judge, "summary": {"average": ...}, ...}).
SCORE_GLOB = "*scores.json"
# Run-mechanics arguments that say nothing about the training (and would leak local paths).
CARD_SKIPPED_ARGS = ("out", "output_dir", "overwrite", "resume", "data_cache", "models_dir", "push_to_hub",
                     "token_cache", "tokenize_threads")


@dataclass
class RunInfo:
    """What the training run left next to the model (every field optional)."""

    args: dict = field(default_factory=dict)
    args_file: Path | None = None
    final: dict = field(default_factory=dict)  # last value of each metric in metrics.jsonl
    plots: dict[str, Path] = field(default_factory=dict)  # name in repo -> local file
    judge_score: float | None = None
    judge_file: Path | None = None
    judge_model: str | None = None


# --------------------------------------------------------------------------------------------
# Reading the run directory
# --------------------------------------------------------------------------------------------
def find_run_info(model_dir: Path, run_dir: Path | None = None, scores: Path | None = None) -> RunInfo:
    """Collect args, final metrics, plots and judge score from ``run_dir`` (or DIR, then DIR/..).

    ``scores`` names the judge's scores file; otherwise the first ``*scores.json`` found is used.
    """
    if run_dir is not None:
        check_run_dir(Path(run_dir))
    search = [Path(run_dir)] if run_dir is not None else [model_dir, model_dir.parent]
    info = RunInfo()
    for d in search:
        for name in ARGS_FILES:
            if info.args_file is None and (d / name).is_file():
                try:
                    info.args = json.loads((d / name).read_text())
                    info.args_file = d / name
                except (OSError, json.JSONDecodeError) as e:
                    logger.warning("ignoring unreadable %s: %s", d / name, e)
        if not info.final and (d / "metrics.jsonl").is_file():
            info.final = _final_metrics(d / "metrics.jsonl")
        for name in PLOT_FILES:
            if name not in info.plots and (d / name).is_file():
                info.plots[name] = d / name
        if info.judge_score is None and scores is None:
            for path in sorted(d.glob(SCORE_GLOB)):
                info.judge_score, info.judge_model = _judge_score(path)
                if info.judge_score is not None:
                    info.judge_file = path
                    break
    if scores is not None:
        info.judge_score, info.judge_model = _judge_score(Path(scores), flag="--scores")
        if info.judge_score is None:
            raise InputError(f"--scores {scores}: no judge score in it (expected eval/judge.py output or a list of "
                             "scores)")
        info.judge_file = Path(scores)
    return info


def check_run_dir(run_dir: Path) -> None:
    """An explicit --run-dir must be a folder a run left its files in: a card built from nothing would be
    published without its results or arguments, and without a word."""
    if not run_dir.is_dir():
        what = "is not a folder" if run_dir.exists() else "no such folder"
        raise InputError(f"--run-dir {run_dir}: {what}; give the training run's output folder (args.json, "
                         "metrics.jsonl), or leave --run-dir out to use the model folder and its parent")
    names = (*ARGS_FILES, "metrics.jsonl", *PLOT_FILES)
    if not any((run_dir / name).is_file() for name in names) and not any(run_dir.glob(SCORE_GLOB)):
        raise InputError(f"--run-dir {run_dir}: holds no training run (none of {', '.join(names)} or "
                         f"{SCORE_GLOB}); give the run's output folder, or leave --run-dir out")


def _final_metrics(path: Path) -> dict:
    """Last value of every numeric key over the JSON lines (later lines win), NaN included: a card must not
    show an earlier finite loss for a run that ended in NaN. The initial losses (before training) are no
    run's final numbers."""
    final: dict = {}
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s:%d: not JSON, skipped", path, line_no)
            continue
        if not isinstance(rec, dict) or rec.get("initial"):
            continue
        for k, v in rec.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                final[k] = v
    return final


def _judge_score(path: Path, flag: str | None = None) -> tuple[float | None, str | None]:
    """(average score, judge model) of a scores file: eval/judge.py's ``{"model", "summary": {"average"}}``,
    a dict with an ``average``/``mean``/``score`` key, or a plain list of per-item scores (the book's).

    A file found by its name is skipped with a warning when it cannot be read; one the user named (``flag``)
    is an InputError saying why."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: malformed JSON, or bytes that are not UTF-8
        if flag is None:
            logger.warning("ignoring unreadable score file %s: %s", path, e)
            return None, None
        if isinstance(e, json.JSONDecodeError):
            why = f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}"
        elif isinstance(e, UnicodeDecodeError):
            why = f"not UTF-8 text (byte {e.start})"
        else:
            why = "no such file" if isinstance(e, FileNotFoundError) else f"cannot read it ({e.strerror or e})"
        raise InputError(f"{flag} {path}: {why}; give the scores file eval/judge.py wrote") from None
    judge = None
    if isinstance(data, dict):
        judge = data.get("model") if isinstance(data.get("model"), str) else None
        for holder in (data.get("summary"), data):
            if isinstance(holder, dict):
                for key in ("average", "average_score", "mean", "mean_score", "score"):
                    value = holder.get(key)
                    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                        return float(value), judge
        data = data.get("scores")
    if isinstance(data, list):
        nums = [float(x) for x in data if isinstance(x, (int, float)) and not isinstance(x, bool)]
        if nums:
            return sum(nums) / len(nums), judge
    return None, judge


def resolve_base_model(args: dict, explicit: str | None = None) -> str | None:
    """The Hub id the model derives from: --base-model, else the run's --model when it names one."""
    from gpt2_scratch import HUB_ID_OF_PRESET  # deferred: the configuration module loads transformers

    def hub_id(value: str) -> str | None:
        preset = preset_name(value) or ("gpt2-small" if value == "gpt2" else None)
        if preset is not None:
            return HUB_ID_OF_PRESET[preset]
        # A Hub id looks like "owner/name" and is not a folder on this machine.
        return value if is_hub_id(value) and not Path(value).exists() and not value.startswith((".", "/")) else None

    if explicit:
        return hub_id(explicit) or explicit
    if args.get("random_init"):
        return None  # trained from random weights: there is no base model
    for key in ("base_model", "model", "model_name_or_path"):
        value = args.get(key)
        if isinstance(value, str) and value and hub_id(value):
            return hub_id(value)
    return None


def resolve_datasets(args: dict, explicit: str | None = None) -> list[str]:
    """Hub data set ids for the card's metadata: --dataset, else the run's --data when it names one.

    A URL or local path is not a Hub id; the known SMS Spam files map to ucirvine/sms_spam, anything
    else stays out of the metadata (the card's text still names it).
    """
    value = explicit or args.get("data") or args.get("dataset")
    if not isinstance(value, str) or not value:
        return []
    name = value.rstrip("/").rsplit("/", 1)[-1]
    if name in KNOWN_DATASETS:
        return [KNOWN_DATASETS[name]]
    if "://" in value or Path(value).exists() or value.startswith((".", "/", "~")):
        return []
    if explicit or value.count("/") == 1:
        return [value]
    return []


# --------------------------------------------------------------------------------------------
# The model card
# --------------------------------------------------------------------------------------------
def build_model_card(
    model_dir: Path,
    repo_id: str,
    run: RunInfo,
    *,
    base_model: str | None = None,
    dataset: str | None = None,
    license: str | None = None,
):
    """Return a ``huggingface_hub.ModelCard`` describing the model directory and its run."""
    from huggingface_hub import ModelCard, ModelCardData  # deferred: heavy

    config = json.loads((model_dir / "config.json").read_text())
    arch = (config.get("architectures") or ["GPT2ScratchForCausalLM"])[0]
    is_classifier = arch.endswith("ForSequenceClassification")
    auto_class = "AutoModelForSequenceClassification" if is_classifier else "AutoModelForCausalLM"
    base = resolve_base_model(run.args, base_model)
    datasets = resolve_datasets(run.args, dataset)
    # OpenAI's GPT-2 weights are MIT-licensed; a model trained from them inherits that by default.
    license = license or ("mit" if base and base.startswith("openai-community/") else "apache-2.0")
    lora_line = card_line(run.args, base)  # a LoRA finetune says so, and of what
    data = ModelCardData(
        base_model=base,
        datasets=datasets or None,
        license=license,
        library_name="transformers",
        pipeline_tag="text-classification" if is_classifier else "text-generation",
        tags=["gpt2-scratch", "gpt2", "llms-from-scratch", "custom_code"] + (["lora", "peft"] if lora_line else []),
    )

    name = repo_id.rsplit("/", 1)[-1]
    shape = (
        f"{config.get('n_layers', config.get('num_hidden_layers'))} layers, "
        f"{config.get('emb_dim', config.get('hidden_size'))} dims, "
        f"{config.get('n_heads', config.get('num_attention_heads'))} heads, "
        f"context {config.get('context_length', config.get('max_position_embeddings'))}"
    )
    lines = [f"# {name}", ""]
    what = "a text classifier (the book's chapter 6)" if is_classifier else "a causal language model"
    lines.append(
        f"GPT-2 ({shape}) written from scratch in PyTorch with "
        f"gpt2-scratch — {what}"
        + (f", finetuned from [{base}](https://huggingface.co/{base})." if base else ".")
    )
    lines += ["", lora_line] if lora_line else []
    if is_classifier and config.get("id2label"):
        by_id = sorted(config["id2label"].items(), key=lambda kv: int(kv[0]))
        labels = ", ".join(f"`{i}` = {lab}" for i, lab in by_id)
        lines += ["", f"Labels: {labels}."]
    if datasets:
        lines += ["", "Data: " + ", ".join(f"[{d}](https://huggingface.co/datasets/{d})" for d in datasets) + "."]
    elif run.args.get("data"):
        lines += ["", f"Data: `{_md_cell(run.args['data'])}`."]
    lines += pretraining_card_lines(model_dir)  # a pretrained model: its tokens and corpus fingerprint

    results = _results_rows(run)
    if results:
        lines += ["", "## Results", "", "| metric | value |", "|---|---|"] + results
    if "loss.png" in run.plots:
        lines += ["", "![Training and validation loss](loss.png)"]
    if "accuracy.png" in run.plots:
        lines += ["", "![Training and validation accuracy](accuracy.png)"]

    if run.args:
        lines += ["", "## Training arguments", "", "| argument | value |", "|---|---|"]
        for k, v in run.args.items():
            if k not in CARD_SKIPPED_ARGS:
                lines.append(f"| `{k}` | `{_md_cell(v)}` |")

    lines += ["", "## How to use", "", "With the `gpt2_scratch` package installed (it registers the classes):", ""]
    if is_classifier:
        lines += _usage_classifier(repo_id, auto_class, remote=False)
        lines += ["", "Without it — the modeling code ships in this repository:", ""]
        lines += _usage_classifier(repo_id, auto_class, remote=True)
    else:
        lines += _usage_lm(repo_id, remote=False)
        lines += ["", "Without it — the modeling code ships in this repository:", ""]
        lines += _usage_lm(repo_id, remote=True)
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"
    return ModelCard(content)


def _md_cell(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    if isinstance(value, str) and (value.startswith(("/", "~")) or Path(value).is_absolute()):
        text = ".../" + Path(value).name  # a local path: its name says enough, the rest is this machine's
    return text.replace("|", "\\|").replace("`", "'")


def _results_rows(run: RunInfo) -> list[str]:
    rows = []
    names = {
        "train_loss": "final train loss",
        "train_loss_running": "final train loss (running mean of the last steps)",
        "val_loss": "final validation loss",
        "train_accuracy": "train accuracy",
        "val_accuracy": "validation accuracy",
        "test_accuracy": "test accuracy",
    }
    for key, label in names.items():
        if key in run.final:
            value = run.final[key]
            rows.append(f"| {label} | {value * 100:.2f}% |" if "accuracy" in key else f"| {label} | {value:.4f} |")
    if run.judge_score is not None:
        by = f"judged by {run.judge_model}, " if run.judge_model else ""
        rows.append(f"| LLM-judge score (0-100, {by}`{run.judge_file.name}`) | {run.judge_score:.2f} |")
    return rows


def _usage_lm(repo_id: str, remote: bool) -> list[str]:
    imp = "" if remote else "import gpt2_scratch  # registers GPT2ScratchForCausalLM with the Auto classes\n"
    trc = ", trust_remote_code=True" if remote else ""
    return [
        "```python",
        f"{imp}from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        # Without the package the tokenizer also reads the repo's config (auto_map): it needs the flag too.
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}"{trc})',
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}"{trc})',
        'inputs = tokenizer("Every effort moves you", return_tensors="pt")',
        "out = model.generate(**inputs, max_new_tokens=30, do_sample=False)",
        "print(tokenizer.decode(out[0], skip_special_tokens=True))",
        "```",
    ]


def _usage_classifier(repo_id: str, auto_class: str, remote: bool) -> list[str]:
    imp = "" if remote else "import gpt2_scratch  # registers the classes with the Auto classes\n"
    trc = ", trust_remote_code=True" if remote else ""
    return [
        "```python",
        f"{imp}import torch",
        f"from transformers import {auto_class}, AutoTokenizer",
        "",
        # Without the package the tokenizer also reads the repo's config (auto_map): it needs the flag too.
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}"{trc})',
        f'model = {auto_class}.from_pretrained("{repo_id}"{trc})',
        'inputs = tokenizer("You won a free prize! Reply WIN now.", return_tensors="pt")',
        "probs = model(**inputs).logits.softmax(-1)[0]",
        "print(model.config.id2label[int(probs.argmax())], float(probs.max()))",
        "```",
    ]


# --------------------------------------------------------------------------------------------
# Pushing a run
# --------------------------------------------------------------------------------------------


def check_tokenizer_for_hub(model_dir: Path) -> None:
    """Refuse a folder every user of the Hub repo would fail on: no tokenizer files (``AutoTokenizer`` fails),
    tokenizer files transformers cannot load, or a chat template that does not parse or render
    (``apply_chat_template`` fails). Checked the way those users load it: with transformers itself."""
    from transformers import AutoTokenizer  # deferred: heavy, and only a push checks its tokenizer

    fix = "save the model folder again (gpt2-scratch writes the tokenizer and its template with every model)"
    missing = [name for name in ("tokenizer.json", "tokenizer_config.json") if not (model_dir / name).is_file()]
    if missing:
        raise InputError(f"--model {model_dir}: no {' or '.join(missing)}, so AutoTokenizer.from_pretrained would "
                         f"fail for every user of the repo; {fix}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as err:  # transformers raises many kinds here; each means the same: it does not load
        raise InputError(f"--model {model_dir}: its tokenizer files do not load ({' '.join(str(err).split())[:200]}); "
                         f"{fix}") from None
    if getattr(tokenizer, "chat_template", None):
        where = "chat_template.jinja" if (model_dir / "chat_template.jinja").is_file() else "tokenizer_config.json"
        try:
            tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False,
                                          add_generation_prompt=True)
        except Exception as err:  # jinja2's TemplateSyntaxError, or any error the template raises when rendered
            raise InputError(f"--model {model_dir}/{where}: the chat template fails ({type(err).__name__}: "
                             f"{' '.join(str(err).split())[:200]}), so apply_chat_template would fail for every "
                             f"user of the repo; fix it, or delete it and {fix}") from None


def push_run(model_dir: str | os.PathLike, repo_id: str, *, run_dir: str | os.PathLike | None = None,
             scores: str | os.PathLike | None = None, base_model: str | None = None, dataset: str | None = None,
             license: str | None = None, **upload):
    """Check the model folder loads whole and finite, build its card from the run's files, upload both.

    ``upload`` goes to ``gpt2_scratch.hub.push_folder`` (private, revision, exist_ok, commit_message, ...).
    A folder that does not load strictly (a missing tensor, a truncated file), holds NaN weights (a
    diverged run), or whose tokenizer or chat template users could not load is refused before anything is sent.
    """
    from gpt2_scratch.model_dir import check_finite, load_model_dir  # deferred: loads torch and transformers

    model_dir = Path(model_dir)
    check_repo_id(repo_id)  # the cheap checks first: a bad id or no token, no point in the rest
    upload["token"] = hub_token(upload.get("token"))
    model = load_model_dir(model_dir, flag="--model")
    check_finite(model, str(model_dir))
    del model
    check_tokenizer_for_hub(model_dir)
    run = find_run_info(model_dir, Path(run_dir) if run_dir is not None else None,
                        Path(scores) if scores is not None else None)
    card = build_model_card(model_dir, repo_id, run, base_model=base_model, dataset=dataset, license=license)
    if (model_dir / "README.md").is_file():
        logger.warning("%s/README.md is replaced by the generated model card", model_dir)
    extra: dict[str, bytes | Path] = {name: path for name, path in run.plots.items()}
    extra["README.md"] = str(card).encode()
    info = push_folder(model_dir, repo_id, extra_files=extra, **upload)
    print(f"pushed {model_dir} to {getattr(info, 'commit_url', repo_id)}", flush=True)
    return info


@dataclass
class PushArgs:
    """Upload a model folder (weights, config, modeling code, tokenizer) with a generated model card and the
    run's plots to the Hugging Face Hub in one commit (token from HF_TOKEN or `hf auth login`)."""

    model: str = arg(help="model folder written by save_pretrained or a training run")
    repo_id: str = arg(help="Hub repository to push to (USER/NAME)")
    private: bool = arg(False, "create the repository as private")
    revision: str | None = arg(None, "branch to commit to (created if missing)")
    exist_ok: bool = arg(False, "add a commit to the repository if it already exists (default: refuse)")
    run_dir: str | None = arg(None, "where args.json / metrics.jsonl / loss.png / scores.json are (default: the "
                                    "model folder, then its parent)")
    scores: str | None = arg(None, "judge scores for the card (eval/judge.py output; default: *scores.json in "
                                   "the run folder)")
    base_model: str | None = arg(None, "base model for the card metadata (default: from the run's args.json)")
    dataset: str | None = arg(None, "data set for the card metadata")
    license: str | None = arg(None, "license for the card (default: mit for OpenAI GPT-2 finetunes)")
    commit_message: str | None = arg(None, "the commit's message")


def run_push(args: PushArgs) -> None:
    push_run(args.model, args.repo_id, run_dir=args.run_dir, scores=args.scores, base_model=args.base_model,
             dataset=args.dataset, license=args.license, private=args.private, revision=args.revision,
             exist_ok=args.exist_ok, commit_message=args.commit_message)
