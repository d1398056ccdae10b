"""DPO (train/dpo.py): the loss against TRL's and hand-computed values for both log-prob conventions, a
short run on a tiny SFT model through the real CLI, and bad preference records."""

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import ENV, TINY, assert_refused, kill_at_checkpoint

from gpt2_scratch.core.cli import main as cli_main
from gpt2_scratch.train.dpo import dpo_loss, pair_logprobs

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PREFERENCE_DATA = SHARED / "data" / "instruction-data-with-preference.json"


def test_loss_matches_hand_computed_values():
    # rewards: chosen -1 - (-1.5) = 0.5, rejected -2 - (-1.5) = -0.5; loss = -log sigmoid(0.1 * 1.0)
    losses, chosen, rejected = dpo_loss(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0]),
                                        torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0]), beta=0.1)
    assert chosen.tolist() == [0.5, -1.0] and rejected.tolist() == [-0.5, 1.0]
    torch.testing.assert_close(losses, torch.tensor([0.6443966600735709, 0.7981388693815918]))


def tiny_batch(n_pairs: int = 3):
    """A preference batch of the book's first records, collated as train/dpo.py does."""
    from gpt2_scratch.core.records import load_records
    from gpt2_scratch import get_tokenizer
    from gpt2_scratch.train.preference_data import PreferenceCollator, tokenize_pairs

    records = load_records(str(PREFERENCE_DATA))[:n_pairs]
    ds = tokenize_pairs(records, get_tokenizer(), max_length=128)
    return PreferenceCollator(allowed_max_length=128)([ds[i] for i in range(len(ds))])


def independent_token_logps(model, ids, labels):
    """Per-token log-probs of the targets from the full logits (no target-only projection), 0 where masked."""
    logps = F.log_softmax(model(ids, use_cache=False).logits.double(), dim=-1)  # (N, T, V)
    keep = labels != -100
    picked = logps.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, picked, torch.zeros_like(picked)), keep


def trl_loss(per_token_logps, ref_chosen, ref_rejected, beta):
    """TRL's DPOTrainer loss (sigmoid, reverse KL: the DPO paper's) on given per-token log-probs of the
    [chosen; rejected] sequences: its _compute_loss with precomputed reference log-probs and a stand-in
    model that returns these log-probs, as TRL's fused LM head does (0 at positions without a target)."""
    from trl import DPOTrainer

    n, t = per_token_logps.shape
    outputs = SimpleNamespace(log_probs=per_token_logps, entropy=torch.zeros(n, t), mean_logits=torch.zeros(n, t),
                              is_top1=torch.zeros(n, t, dtype=torch.bool))

    class StandIn:
        training = True

        def __call__(self, **kwargs):
            return outputs

    trainer = SimpleNamespace(
        model=StandIn(), accelerator=SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=["sigmoid"], loss_weights=[1.0], beta=beta, use_weighting=False, label_smoothing=0.0,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(n, t + 1, dtype=torch.long), "attention_mask": torch.ones(n, t + 1),
              "completion_mask": torch.ones(n, t + 1), "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = DPOTrainer._compute_loss(trainer, StandIn(), inputs, False)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize("logprob", ["mean", "sum"])
def test_loss_matches_trl_on_the_same_log_probs(logprob):
    from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM

    torch.manual_seed(0)
    policy = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("gpt2-small", **TINY)).eval()
    torch.manual_seed(1)
    reference = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("gpt2-small", **TINY)).eval()
    batch = tiny_batch()
    ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    with torch.no_grad():
        ours = [torch.cat(pair_logprobs(m, batch, logprob)).double() for m in (policy, reference)]
        (token_logps, keep), (ref_token_logps, _) = (independent_token_logps(m, ids, labels) for m in (policy, reference))
    counts = keep.sum(-1, keepdim=True)
    if logprob == "mean":  # TRL sums per-token log-probs: give it each token's share of the mean
        token_logps, ref_token_logps = token_logps / counts, ref_token_logps / counts
    # Our log-probs (target-only projection) equal the independent full-logits ones.
    torch.testing.assert_close(ours[0], token_logps.sum(-1), atol=2e-5, rtol=1e-6)
    torch.testing.assert_close(ours[1], ref_token_logps.sum(-1), atol=2e-5, rtol=1e-6)

    beta = 0.1
    ref_chosen, ref_rejected = ref_token_logps.sum(-1).chunk(2)
    expected, metrics = trl_loss(token_logps, ref_chosen, ref_rejected, beta)
    losses, chosen_rewards, rejected_rewards = dpo_loss(*ours[0].chunk(2), *ours[1].chunk(2), beta)
    torch.testing.assert_close(losses.mean(), expected, atol=1e-7, rtol=1e-6)
    # TRL logs rewards times beta; the margin's sign, hence the accuracy, is the same.
    margin = beta * (chosen_rewards - rejected_rewards).mean().item()
    assert margin == pytest.approx(metrics["rewards/margins"][0], abs=1e-7, rel=1e-4)
    accuracy = (chosen_rewards > rejected_rewards).double().mean().item()
    assert accuracy == pytest.approx(metrics["rewards/accuracies"][0], abs=1e-6)


def test_prompt_and_header_are_masked_and_the_answer_ends_with_endoftext():
    from gpt2_scratch import get_tokenizer

    batch = tiny_batch(1)
    tokenizer = get_tokenizer()
    for field in ("chosen", "rejected"):
        targets = batch[f"{field}_labels"][0]
        text = tokenizer.decode(targets[targets != -100])
        record = json.loads(PREFERENCE_DATA.read_text())[0]
        assert text == record[field] + "<|endoftext|>"


# ---------------------------------------------------------------------------------------------------
# Bad preference data: one line, exit 2, before any model is loaded
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("records, message", [
    ([{"instruction": "a", "chosen": "x", "rejected": "y"}, {"instruction": "b", "rejected": "y"}],
     "record 1 has no 'chosen' field"),
    ([{"instruction": "a", "chosen": "x", "rejected": 3}], "record 0 field 'rejected' must be a string, got int"),
    ([{"instruction": "a", "chosen": "x", "rejected": "y"}] * 3 + [{"instruction": "a", "chosen": " ", "rejected": "y"}],
     "record 3 field 'chosen' is empty"),
    ([{"instruction": "a", "input": 5, "chosen": "x", "rejected": "y"}], "record 0 field 'input' must be a string"),
    ([["instruction", "chosen"]], "record 0 is a list"),
])
def test_bad_preference_records_are_one_line_errors(records, message, tmp_path, capsys):
    data = tmp_path / "prefs.json"
    data.write_text(json.dumps(records))
    code = cli_main(["dpo", "--model", str(tmp_path / "no-model"), "--data", str(data), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and str(data) in err[0] and message in err[0], err[0]
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------
# A short run on a tiny SFT model
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sft_model(tmp_path_factory) -> Path:
    """A tiny GPT-2 instruction-finetuned for 40 steps on the book's data (plain loop, seconds)."""
    from gpt2_scratch.core.records import load_records
    from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM, get_tokenizer, save_model_dir
    from gpt2_scratch.train.data import InstructionCollator, prepare_instruction_data

    torch.manual_seed(123)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("gpt2-small", **TINY))
    data = prepare_instruction_data(load_records(str(SHARED / "data" / "instruction-data.json")), get_tokenizer(),
                                    max_length=128)
    collate = InstructionCollator(allowed_max_length=128)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(40):
        batch = collate([data.train[i] for i in range(8 * step, 8 * step + 8)])
        model(batch["input_ids"], shift_labels=batch["labels"], use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return save_model_dir(model, tmp_path_factory.mktemp("sft") / "tiny-sft", prompt_style="alpaca")


RUN = ["--data", str(PREFERENCE_DATA), "--lr", "5e-4", "--batch-size", "8", "--max-steps", "25", "--eval-freq", "8",
       "--eval-iter", "2", "--max-new-tokens", "2", "--response-batch-size", "110", "--sample-tokens", "4"]


def dpo(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train/dpo.py", *map(str, args)], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=900)


def rows(out: Path) -> list[dict]:
    """The run's metrics rows, without the closing timing row (where the time went)."""
    return [row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if not row.get("timing")]


@pytest.fixture(scope="module")
def dpo_run(tiny_sft_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo") / "run"
    result = dpo("--model", tiny_sft_model, *RUN, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def train_pair_rewards(policy_dir: Path, reference_dir: Path, pairs: int = 64) -> tuple[float, float]:
    """(mean reward margin, reward accuracy) of the first training pairs in file order, book's mean log-probs."""
    from gpt2_scratch.core.records import load_records
    from gpt2_scratch import get_tokenizer
    from gpt2_scratch.model_dir import load_model_dir
    from gpt2_scratch.train.preference_data import PreferenceCollator, prepare_preference_data

    data = prepare_preference_data(load_records(str(PREFERENCE_DATA)), get_tokenizer(), max_length=128)
    batch = PreferenceCollator(allowed_max_length=128)([data.train[i] for i in range(pairs)])
    with torch.no_grad():
        policy, reference = (pair_logprobs(load_model_dir(d), batch, "mean")
                             for d in (policy_dir, reference_dir))
    _, chosen, rejected = dpo_loss(*policy, *reference, beta=0.1)
    return (chosen - rejected).mean().item(), (chosen > rejected).double().mean().item()


@pytest.mark.slow  # two CLI processes and a tiny SFT: ~1 min of CPU
def test_dpo_raises_reward_margin_and_accuracy(dpo_run, tiny_sft_model):
    out, result = dpo_run
    metrics = rows(out)
    initial, last = metrics[0], metrics[-1]
    assert initial["initial"] and initial["val_loss"] == pytest.approx(0.6931, abs=1e-4)  # policy = reference
    assert initial["train_reward_margin"] == 0.0 and last["step"] == 25
    assert last["train_loss"] < 0.693 and last["train_reward_margin"] > 0, last  # the running means of the steps
    assert "| reward margin train" in result.stdout
    # Before training the margin is 0 and no pair is won (rewards are all 0); after 25 steps of 8 pairs:
    margin, accuracy = train_pair_rewards(out, tiny_sft_model)
    assert margin > 0.1 and accuracy > 0.65, (margin, accuracy)
    for name in ("model.safetensors", "config.json", "args.json", "loss.png", "rewards.png", "margins.png",
                 "accuracy.png", "instruction-data-with-response.json"):
        assert (out / name).is_file(), name
    responses = json.loads((out / "instruction-data-with-response.json").read_text())
    assert len(responses) == 110 and {"chosen", "rejected", "model_response"} <= set(responses[0])


@pytest.mark.slow
def test_the_readme_flow_judges_dpo_against_sft_responses(dpo_run, tiny_sft_model, tmp_path):
    """The starting model's responses to the book's test split (instruction-data.json) and the DPO run's (the
    preference file's) are the same records in the same order, so the judge compares them pair by pair."""
    from ollama_standin import OllamaStandin

    out, _ = dpo_run
    sft_responses = tmp_path / "sft-responses.json"
    result = subprocess.run([sys.executable, "eval/generate.py", "--model", tiny_sft_model, "--data",
                             SHARED / "data" / "instruction-data.json", "--split", "test", "--max-new-tokens", "2",
                             "--batch-size", "110", "--out", sft_responses, "--quiet"],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    with OllamaStandin(models=["llama3"]) as server:
        result = subprocess.run([sys.executable, "eval/judge.py", "--data", out / "instruction-data-with-response.json",
                                 "--compare-file", sft_responses, "--criterion", "polite", "--host", server.url,
                                 "--out", tmp_path / "polite.json", "--quiet"],
                                cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Number of comparisons: 110 of 110" in result.stdout, result.stdout


@pytest.mark.slow
def test_precomputed_reference_and_lora_runs(dpo_run, tiny_sft_model, tmp_path):
    """--precompute-ref logs what the frozen copy logs; with --lora the reference is the adapters-off model."""
    ref_out, _ = dpo_run
    short = [*RUN, "--max-steps", "9"]
    pre = dpo("--model", tiny_sft_model, *short, "--precompute-ref", "--out", tmp_path / "pre")
    assert pre.returncode == 0, pre.stderr[-3000:]
    keys = ("train_loss", "val_loss", "train_reward_margin", "val_reward_margin", "val_reward_accuracy")
    for got, want in zip(rows(tmp_path / "pre"), rows(ref_out)[:3]):
        assert got["step"] == want["step"]
        assert [got[k] for k in keys] == pytest.approx([want[k] for k in keys], abs=1e-5)
    lora = dpo("--model", tiny_sft_model, *short, "--lora", "--lr", "1e-2", "--out", tmp_path / "lora")
    assert lora.returncode == 0, lora.stderr[-3000:]
    assert rows(tmp_path / "lora")[-1]["train_reward_margin"] > 0
    assert (tmp_path / "lora" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_dpo_resume_after_sigkill_matches_the_uninterrupted_run(dpo_run, tiny_sft_model, tmp_path):
    """A DPO run killed after its step-10 checkpoint and resumed logs the same numbers and ends with the
    same weights as the uninterrupted run (the reference is rebuilt from --model, the running means come
    back from the checkpoint)."""
    from safetensors.torch import load_file

    ref_out, _ = dpo_run
    out = tmp_path / "killed"
    kill_at_checkpoint([sys.executable, "train/dpo.py", "--model", tiny_sft_model, *RUN, "--save-every", "10",
                        "--out", out], out / "checkpoints" / "step-00000010" / "train_state.json", cwd=REPO, env=ENV)
    resumed = dpo("--model", tiny_sft_model, *RUN, "--save-every", "10", "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    keys = ("train_loss", "val_loss", "train_reward_margin", "val_reward_accuracy")
    got, want = rows(out), rows(ref_out)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert [r.get(k) for r in got for k in keys] == pytest.approx([r.get(k) for r in want for k in keys], rel=1e-6)
    ref_weights, weights = load_file(ref_out / "model.safetensors"), load_file(out / "model.safetensors")
    for name in ref_weights:
        torch.testing.assert_close(weights[name], ref_weights[name], rtol=1e-6, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------------
# The data options SFT has: --val-data, --test-data, --columns
# ---------------------------------------------------------------------------------------------------

# One step of a tiny random model: seconds through the real command line.
ONE_STEP = ["--max-steps", "1", "--batch-size", "4", "--eval-iter", "1", "--max-new-tokens", "2", "--sample-tokens",
            "2"]


def book_pairs(tmp_path: Path, name: str, start: int, stop: int, rename: dict | None = None) -> tuple[Path, list]:
    """Records ``start:stop`` of the book's preference data in ``tmp_path/name`` (.json, or .jsonl with their
    fields renamed by ``rename``, as a Hugging Face data set names them), and the records as written."""
    records = json.loads(PREFERENCE_DATA.read_text())[start:stop]
    path = tmp_path / name
    if rename is None:
        path.write_text(json.dumps(records))
    else:
        path.write_text("".join(json.dumps({rename.get(k, k): v for k, v in r.items()}) + "\n" for r in records))
    return path, records


def test_held_out_files_are_the_validation_and_test_splits_and_resume_checks_them(tiny_model_dir, tmp_path, capsys):
    """--val-data / --test-data are the validation / test pairs; the parts of --data they replace train too (40
    records: 34 + 4 test + 2 validation); the test responses are the --test-data records; a --resume whose
    --val-data changed is refused in one line."""
    from gpt2_scratch.core.records import book_split
    from gpt2_scratch.tokenizer import get_tokenizer
    from gpt2_scratch.train.preference_data import load_preference_records, prepare_preference_data

    data, records = book_pairs(tmp_path, "data.json", 0, 40)
    val, val_records = book_pairs(tmp_path, "val.json", 40, 46)
    test, test_records = book_pairs(tmp_path, "test.json", 46, 49)
    split = book_split(records)
    assert (len(split.train), len(split.test), len(split.validation)) == (34, 4, 2)
    only_val = prepare_preference_data(load_preference_records(str(data)), get_tokenizer(),
                                       validation_records=load_preference_records(str(val)))
    assert (len(only_val.train), len(only_val.validation), len(only_val.test)) == (36, 6, 4)
    assert only_val.validation_records == val_records and only_val.test_records == split.test

    out = tmp_path / "run"
    argv = ["--model", tiny_model_dir, "--data", data, "--val-data", val, "--test-data", test, *ONE_STEP,
            "--save-every", "1", "--out", out]
    result = dpo(*argv)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"data {data}: 40 train / 6 validation / 3 test pairs" in result.stdout, result.stdout
    responses = json.loads((out / "instruction-data-with-response.json").read_text())
    assert [{k: v for k, v in r.items() if k != "model_response"} for r in responses] == test_records
    assert json.loads((out / "args.json").read_text())["val_data"] == str(val)

    val_records[0]["chosen"] += " (edited)"
    val.write_text(json.dumps(val_records))
    assert_refused(["dpo", *map(str, argv[:-2]), "--max-steps", "2", "--out", str(out), "--resume"], tmp_path,
                   capsys, code=2, needle=f"--resume: --data {data} (with --val-data {val}, --test-data {test}) "
                                          "differs from the data the checkpoint")


def test_columns_rename_hugging_face_fields_in_data_and_held_out_files(tiny_model_dir, tmp_path):
    """A data set whose fields are question/response_chosen/response_rejected trains with --columns, and the same
    renaming reads its --val-data; the pairs are the book records' own."""
    rename = {"instruction": "question", "input": "context", "chosen": "response_chosen",
              "rejected": "response_rejected"}
    data, records = book_pairs(tmp_path, "data.jsonl", 0, 40, rename)
    val, _ = book_pairs(tmp_path, "val.jsonl", 40, 46, rename)
    out = tmp_path / "run"
    result = dpo("--model", tiny_model_dir, "--data", data, "--val-data", val, "--columns",
                 "question=instruction,context=input,response_chosen=chosen,response_rejected=rejected",
                 *ONE_STEP, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"data {data}: 36 train / 6 validation / 4 test pairs" in result.stdout, result.stdout
    responses = json.loads((out / "instruction-data-with-response.json").read_text())
    assert [{k: v for k, v in r.items() if k != "model_response"} for r in responses] == records[34:38]


def test_bad_columns_and_held_out_files_are_one_line_and_write_nothing(tmp_path, capsys):
    """A --columns field a record lacks names the file, the record and the option; a DST that is no preference
    field, a missing --val-data, and an --out holding the --test-data are refused; --out is never created."""
    data, records = book_pairs(tmp_path, "data.jsonl", 0, 10, {"chosen": "response_chosen"})
    lines = data.read_text().splitlines()
    lines[3] = json.dumps({k: v for k, v in json.loads(lines[3]).items() if k != "response_chosen"})
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    base = ["dpo", "--model", "gpt2-small", "--random-init", "--data", str(data), "--out", str(out)]
    assert_refused([*base, "--columns", "response_chosen=chosen,answer=rejected"], tmp_path, capsys, code=2,
                   needle=f"{data}: record 0 has no 'answer' field to map with --columns")
    assert_refused([*base, "--columns", "response_chosen=chosen"], tmp_path, capsys, code=2,
                   needle=f"{data}: record 3 has no 'response_chosen' field to map with --columns")
    assert_refused([*base, "--columns", "response_chosen=output"], tmp_path, capsys, code=2,
                   needle="--columns 'response_chosen=output': expected SRC=DST pairs separated by commas, DST one "
                          "of instruction, input, chosen, rejected, prompt")
    good = [*base[:5], str(book_pairs(tmp_path, "good.json", 0, 10)[0]), *base[6:]]
    assert_refused([*good, "--val-data", str(tmp_path / "gone.json")], tmp_path, capsys, code=2,
                   needle=f"--val-data {tmp_path / 'gone.json'}: no such file")
    held = tmp_path / "held"
    held.mkdir()
    test, _ = book_pairs(held, "test.json", 10, 12)
    assert_refused([*good[:-1], str(held), "--overwrite", "--test-data", str(test)], tmp_path, capsys, code=2,
                   needle=f"--out {held} holds --test-data {test}")
    assert not out.exists()
