"""Publish a model directory to the Hugging Face Hub, with a generated model card.

``python -m gpt2_scratch push --model DIR --repo-id USER/NAME [--private] [--revision BRANCH] [--exist-ok]``
uploads, in ONE commit, every file of DIR — what ``save_pretrained`` wrote (weights, config with
``auto_map``, modeling code, tokenizer, generation config) and, when DIR is a training run's output,
its args/metrics files; never dot-files or ``checkpoints/`` (optimizer and RNG states) — plus:

- ``README.md``: a model card (``huggingface_hub.ModelCardData`` YAML metadata — base_model,
  datasets, license, library_name, pipeline_tag, tags — then the training arguments, final
  train/val loss, accuracies or judge score when present, and how to load the model with and
  without this package);
- the run's plots (``loss.png``, ``accuracy.png``) when found, referenced from the card.

The run's files are looked up in ``--run-dir`` (default: DIR, then DIR's parent): train/sft.py
and train/classify.py save the model at the top of OUT beside ``args.json``, ``metrics.jsonl``,
``loss.png`` (``accuracy.png``), and eval/judge.py writes ``*-scores.json``.

Everything goes through ``huggingface_hub`` (``HfApi.create_repo``, ``create_branch``,
``create_commit``), so the token comes from where the rest of the ecosystem finds it
(``HF_TOKEN``, then the ``hf auth login`` cache) and ``HF_ENDPOINT`` is honoured.
Failures are one-line ``HubError`` messages: no token (checked before any network or card
work), repository already exists (unless ``exist_ok``), token rejected, Hub unreachable.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

# Book preset names → the Hub ids of OpenAI's released checkpoints.
PRESET_HUB_IDS = {
    "gpt2-small": "openai-community/gpt2",
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    # OpenAI's own size names, as `convert openai --size` takes them.
    "124M": "openai-community/gpt2",
    "355M": "openai-community/gpt2-medium",
    "774M": "openai-community/gpt2-large",
    "1558M": "openai-community/gpt2-xl",
}
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
CARD_SKIPPED_ARGS = ("output_dir", "overwrite", "resume", "data_cache", "models_dir", "push_to_hub")


class HubError(RuntimeError):
    """A push that cannot proceed; the message is one line saying what to do."""


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
        info.judge_score, info.judge_model = _judge_score(Path(scores))
        if info.judge_score is None:
            raise HubError(f"{scores}: no judge score in it (expected eval/judge.py output or a list of scores)")
        info.judge_file = Path(scores)
    return info


def _final_metrics(path: Path) -> dict:
    """Last value of every numeric key over the JSON lines (later lines win)."""
    final: dict = {}
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s:%d: not JSON, skipped", path, line_no)
            continue
        for k, v in rec.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                final[k] = v
    return final


def _judge_score(path: Path) -> tuple[float | None, str | None]:
    """(average score, judge model) of a scores file: eval/judge.py's ``{"model", "summary": {"average"}}``,
    a dict with an ``average``/``mean``/``score`` key, or a plain list of per-item scores (the book's)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        logger.warning("ignoring unreadable score file %s: %s", path, e)
        return None, None
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
    if explicit:
        return PRESET_HUB_IDS.get(explicit, explicit)
    if args.get("random_init"):
        return None  # trained from random weights: there is no base model
    for key in ("base_model", "model", "model_name_or_path"):
        value = args.get(key)
        if not isinstance(value, str) or not value:
            continue
        if value in PRESET_HUB_IDS:
            return PRESET_HUB_IDS[value]
        # A Hub id looks like "owner/name" and is not a directory on this machine.
        if value.count("/") == 1 and not Path(value).exists() and not value.startswith((".", "/")):
            return value
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
    from huggingface_hub import ModelCard, ModelCardData

    config = json.loads((model_dir / "config.json").read_text())
    arch = (config.get("architectures") or ["GPT2ScratchForCausalLM"])[0]
    is_classifier = arch.endswith("ForSequenceClassification")
    auto_class = "AutoModelForSequenceClassification" if is_classifier else "AutoModelForCausalLM"
    base = resolve_base_model(run.args, base_model)
    datasets = resolve_datasets(run.args, dataset)
    # OpenAI's GPT-2 weights are MIT-licensed; a model trained from them inherits that by default.
    license = license or ("mit" if base and base.startswith("openai-community/") else "apache-2.0")

    data = ModelCardData(
        base_model=base,
        datasets=datasets or None,
        license=license,
        library_name="transformers",
        pipeline_tag="text-classification" if is_classifier else "text-generation",
        tags=["gpt2-scratch", "gpt2", "llms-from-scratch", "custom_code"],
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
    if is_classifier and config.get("id2label"):
        by_id = sorted(config["id2label"].items(), key=lambda kv: int(kv[0]))
        labels = ", ".join(f"`{i}` = {lab}" for i, lab in by_id)
        lines += ["", f"Labels: {labels}."]
    if datasets:
        lines += ["", "Data: " + ", ".join(f"[{d}](https://huggingface.co/datasets/{d})" for d in datasets) + "."]
    elif run.args.get("data"):
        lines += ["", f"Data: `{_md_cell(run.args['data'])}`."]

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
# The upload
# --------------------------------------------------------------------------------------------
# Folders a training run keeps beside the model that are not part of it (optimizer states, RNG states).
SKIPPED_DIRS = ("checkpoints",)


def _model_files(model_dir: Path) -> dict[str, Path]:
    """Every file in the directory (path in repo → local path), except dot-files and checkpoints/."""
    files = {}
    for f in sorted(model_dir.rglob("*")):
        rel = f.relative_to(model_dir)
        if any(part.startswith(".") for part in rel.parts) or rel.parts[0] in SKIPPED_DIRS:
            continue
        if f.is_file():
            files[rel.as_posix()] = f
    return files


def _check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise HubError(f"{model_dir}: no such model directory (write one with save_pretrained or a training script)")
    if not (model_dir / "config.json").is_file():
        raise HubError(f"{model_dir}: no config.json — not a save_pretrained directory")
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    if not any((model_dir / w).is_file() for w in weights):
        raise HubError(f"{model_dir}: no model.safetensors — not a save_pretrained directory")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Socket-level failure classes of the HTTP client huggingface_hub uses (httpx2 in 2.x, httpx before)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module_name in ("httpx2", "httpx", "requests"):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        cls = getattr(module, "TransportError", None) or getattr(module, "RequestException", None)
        if isinstance(cls, type):
            errors.append(cls)
    return tuple(errors)


def _network_error(endpoint: str, exc: BaseException) -> HubError:
    return HubError(
        f"cannot reach the Hub at {endpoint} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
        "check your network connection or HF_ENDPOINT, then retry"
    )


def push_model_dir(
    model_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    exist_ok: bool = True,
    run_dir: str | os.PathLike | None = None,
    scores: str | os.PathLike | None = None,
    base_model: str | None = None,
    dataset: str | None = None,
    license: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
):
    """Upload a ``save_pretrained`` directory plus a generated model card in one commit.

    Returns the ``huggingface_hub.CommitInfo``. ``exist_ok=False`` refuses to add a commit to a
    repository that already exists. Raises ``HubError`` with a one-line message on failure.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError

    model_dir = Path(model_dir)
    endpoint = endpoint or constants.ENDPOINT
    # The token first: without one nothing else is worth doing.
    token = token or get_token()
    if not token:
        raise HubError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access), then retry"
        )
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise HubError(f"--repo-id {repo_id!r}: expected USER/NAME (or ORG/NAME)")
    _check_model_dir(model_dir)

    run = find_run_info(model_dir, Path(run_dir) if run_dir is not None else None,
                        Path(scores) if scores is not None else None)
    card = build_model_card(model_dir, repo_id, run, base_model=base_model, dataset=dataset, license=license)
    files = _model_files(model_dir)
    if "README.md" in files:
        logger.warning("%s/README.md is replaced by the generated model card", model_dir)
        del files["README.md"]
    operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(p)) for rel, p in files.items()]
    for name, path in run.plots.items():
        if name not in files:
            operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)))
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode()))

    api = HfApi(endpoint=endpoint, token=token)
    where = f"{endpoint}/{repo_id}"
    try:
        try:
            api.create_repo(repo_id, private=private, exist_ok=exist_ok)
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if status == 409:
                raise HubError(
                    f"{where} already exists; pass --exist-ok to add a commit to it (or choose another --repo-id)"
                ) from None
            raise
        if revision and revision != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        logger.info("uploading %d files to %s (revision %s)", len(operations), where, revision or "main")
        return api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message or "Upload model and model card with gpt2-scratch",
            revision=revision,
        )
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 401:
            raise HubError(f"{where}: the Hub rejected the token (HTTP 401); check HF_TOKEN or `hf auth login`"
                           ) from None
        if status == 403:
            raise HubError(f"{where}: the token may not write here (HTTP 403); use a write token for this "
                           "namespace") from None
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HubError(f"{where}: upload failed: {first}") from None
    except _transport_errors() as e:
        raise _network_error(endpoint, e) from None
    except (RuntimeError, ValueError) as e:
        # LFS transfers wrap their failure: "Error while uploading 'model.safetensors' to the Hub." from the cause.
        if isinstance(e.__cause__, _transport_errors()):
            raise _network_error(endpoint, e.__cause__) from None
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HubError(f"{where}: upload failed: {first}") from None


# --------------------------------------------------------------------------------------------
# CLI: `python -m gpt2_scratch push`
# --------------------------------------------------------------------------------------------
def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "push",
        help="upload a model directory and a generated model card to the Hugging Face Hub",
        description=(
            "Upload a save_pretrained model directory (weights, config, modeling code, tokenizer) "
            "plus a generated README.md model card and the run's plots to the Hub in one commit. "
            "The token comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT is honoured."
        ),
    )
    p.add_argument("--model", required=True, metavar="DIR", help="model directory written by save_pretrained")
    p.add_argument("--repo-id", required=True, metavar="USER/NAME", help="Hub repository to push to")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--revision", metavar="BRANCH", default=None, help="branch to commit to (created if missing)")
    p.add_argument("--exist-ok", action="store_true",
                   help="add a commit to the repository if it already exists (default: refuse)")
    p.add_argument("--run-dir", metavar="DIR", default=None,
                   help="where args.json / metrics.jsonl / loss.png / scores.json are (default: DIR, then its parent)")
    p.add_argument("--scores", metavar="FILE", default=None,
                   help="judge scores for the card (eval/judge.py output; default: *scores.json in the run dir)")
    p.add_argument("--base-model", metavar="HUB_ID", default=None,
                   help="base model for the card metadata (default: from the run's args.json)")
    p.add_argument("--dataset", metavar="HUB_ID", default=None, help="data set for the card metadata")
    p.add_argument("--license", default=None, help="license for the card (default: mit for OpenAI GPT-2 finetunes)")
    p.add_argument("--commit-message", default=None)
    p.set_defaults(func=_run_push)
    return p


def _run_push(args: argparse.Namespace) -> int:
    try:
        info = push_model_dir(
            args.model,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            exist_ok=args.exist_ok,
            run_dir=args.run_dir,
            scores=args.scores,
            base_model=args.base_model,
            dataset=args.dataset,
            license=args.license,
            commit_message=args.commit_message,
        )
    except HubError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"pushed {args.model} to {info.commit_url}")
    return 0
