"""eval/generate.py: responses for the book's 110 test records, batched = one at a time, resumable."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO_ROOT, run_cli

from gpt2_scratch.core.files import JsonlFile, content_key
from gpt2_scratch.eval.generate import generate_file, model_fingerprint

GENERATE = str(REPO_ROOT / "eval" / "generate.py")
TINY_256 = dict(n_layers=2, emb_dim=64, n_heads=4, context_length=256)  # room for every test prompt + 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM, save_model_dir

    torch.manual_seed(123)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("gpt2-small", **TINY_256))
    return save_model_dir(model, tmp_path_factory.mktemp("gen") / "tiny")


@pytest.fixture(scope="module")
def data_path(shared_dir):
    return shared_dir / "data" / "instruction-data.json"


@pytest.fixture(scope="module")
def batched_run(tmp_path_factory, model_dir, data_path):
    """The 110 test records through the CLI, batch 8, 32 new tokens: (written records, test records)."""
    out = tmp_path_factory.mktemp("batched") / "test-with-responses.json"
    r = run_cli(GENERATE, "--model", str(model_dir), "--data", str(data_path), "--split", "test",
                "--out", str(out), "--batch-size", "8", "--max-new-tokens", "32", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "Wrote" in r.stdout and not out.with_name(out.name + ".partial.jsonl").exists()
    return json.loads(out.read_text()), json.loads(data_path.read_text())[935:1045]


def test_110_test_responses(batched_run):
    written, test = batched_run
    assert len(written) == 110
    assert [{k: v for k, v in w.items() if k != "model_response"} for w in written] == test
    responses = [w["model_response"] for w in written]
    assert all(isinstance(s, str) for s in responses) and sum(bool(s) for s in responses) > 100


def _one_at_a_time(model_dir, records):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gpt2_scratch import generate_responses

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return generate_responses(model, tokenizer, records, batch_size=1, max_new_tokens=32, progress=False)


def test_batched_equals_one_at_a_time(batched_run, model_dir):
    """Every 4th record (each batch of 8 is represented, with its padding) generated alone."""
    written, test = batched_run
    picked = list(range(0, 110, 4))
    assert _one_at_a_time(model_dir, [test[i] for i in picked]) == [written[i]["model_response"] for i in picked]


def _transformers_generate(model, tokenizer, records, *, batch_size, max_new_tokens):
    """The reference: transformers' ``generate`` over the same left-padded batches (longest prompts first),
    which keeps decoding a row that has ended until its batch's last row ends; each continuation is cut at
    <|endoftext|>. Returns (responses, the new-token count of each row, batch by batch)."""
    from gpt2_scratch import ENDOFTEXT_ID
    from gpt2_scratch.core.prompts import extract_response, format_input

    prompts = [tokenizer.encode(format_input(r)) for r in records]
    order = sorted(range(len(records)), key=lambda i: -len(prompts[i]))
    responses, counts = [None] * len(records), []
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in batch)
        ids = torch.tensor([[ENDOFTEXT_ID] * (width - len(prompts[i])) + prompts[i] for i in batch])
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in batch])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=ENDOFTEXT_ID, pad_token_id=ENDOFTEXT_ID)
        counts.append([])
        for row, i in enumerate(batch):
            new = out[row, width:].tolist()
            new = new[:new.index(ENDOFTEXT_ID)] if ENDOFTEXT_ID in new else new
            counts[-1].append(len(new))
            responses[i] = extract_response(tokenizer.decode(prompts[i] + new), tokenizer.decode(prompts[i]))
    return responses, counts


def test_rows_that_end_leave_the_batch_with_the_same_responses(data_path):
    """generate_responses drops a row from its batch (and the KV cache) once it emits <|endoftext|>; every
    response is still the one transformers' generate gives in the same batch, where the row stays to the end."""
    from gpt2_scratch import ENDOFTEXT_ID, GPT2ScratchConfig, GPT2ScratchForCausalLM, generate_responses, get_tokenizer

    torch.manual_seed(123)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("gpt2-small", **TINY_256)).eval()
    with torch.no_grad():  # a likelier <|endoftext|> (the head is the tied embedding): rows end at different steps
        model.transformer.wte.weight[ENDOFTEXT_ID] *= 3
    tokenizer = get_tokenizer()
    records = json.loads(data_path.read_text())[935:967]
    for batch_size in (8, 3):
        expected, counts = _transformers_generate(model, tokenizer, records, batch_size=batch_size, max_new_tokens=24)
        # Rows that ended early beside rows that ran to the limit, and rows that answered nothing at all.
        assert any(min(c) < max(c) == 24 for c in counts) and any(0 in c for c in counts), counts
        assert generate_responses(model, tokenizer, records, batch_size=batch_size, max_new_tokens=24,
                                  progress=False) == expected


@pytest.mark.slow
def test_batched_equals_one_at_a_time_all_110(batched_run, model_dir):
    written, test = batched_run
    assert _one_at_a_time(model_dir, test) == [w["model_response"] for w in written]


def test_resumes_from_the_partial_file(tmp_path, model_dir, data_path):
    """Records already in OUT.partial.jsonl are not generated again; a torn last line is ignored."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    records = json.loads(data_path.read_text())[935:947]
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = tmp_path / "out.json"
    kw = dict(fingerprint=model_fingerprint(model_dir), max_new_tokens=8, batch_size=4, save_every=4,
              progress=False)
    full = generate_file(model, tokenizer, records, out, **kw)

    # Pretend a run was killed after 5 records: their entries (marked) plus a torn sixth line.
    settings = {"model": kw["fingerprint"], "max_new_tokens": 8, "style": "alpaca"}
    partial = JsonlFile(tmp_path / "out.json.partial.jsonl")
    for i, rec in enumerate(records[:5]):
        key = content_key({**settings, **{k: rec[k] for k in ("instruction", "input", "output")}})
        partial.append({"key": key, "index": i, "response": f"FROM PARTIAL {i}"})
    with open(partial.path, "ab") as f:
        f.write(b'{"key": "abc", "index": 5, "resp')
    resumed = generate_file(model, tokenizer, records, out, **kw)
    assert [r["model_response"] for r in resumed[:5]] == [f"FROM PARTIAL {i}" for i in range(5)]
    assert resumed[5:] == full[5:]
    assert json.loads(out.read_text()) == resumed and not partial.path.exists()

    # Other settings (here max_new_tokens) do not reuse the partial entries.
    partial.append({"key": "stale", "index": 0, "response": "FROM PARTIAL"})
    other = generate_file(model, tokenizer, records[:2], out, **{**kw, "max_new_tokens": 4})
    assert all("FROM PARTIAL" not in r["model_response"] for r in other)


@pytest.mark.slow
def test_resumes_after_sigkill(tmp_path, model_dir, data_path):
    out = tmp_path / "out.json"
    partial = tmp_path / "out.json.partial.jsonl"
    args = [GENERATE, "--model", str(model_dir), "--data", str(data_path), "--split", "test", "--out",
            str(out), "--max-new-tokens", "16", "--save-every", "8", "--quiet"]
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while (not partial.exists() or partial.read_bytes().count(b"\n") < 16) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = partial.read_bytes().count(b"\n")
    assert 16 <= kept < 110 and not out.exists()
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert f"Resuming: {kept} of 110" in r.stdout
    resumed = [w["model_response"] for w in json.loads(out.read_text())]
    r = run_cli(*args[:-1], "--out", str(tmp_path / "fresh.json"), "--quiet")
    assert resumed == [w["model_response"] for w in json.loads((tmp_path / "fresh.json").read_text())]


@pytest.mark.parametrize("case, needle, code", [
    ("not a string", "record 1 field 'instruction' must be a string, got NoneType", 2),
    ("unreadable", "missing.json: no such file", 2),
    ("no model", "--model {tmp}/nowhere: no such folder", 2),
    ("out is the data", "--out {tmp}/data.json is also --data: writing it would replace the input", 2),
    ("out is a folder", "--out {tmp} is a folder", 2),
])
def test_bad_input_is_one_line(tmp_path, data_path, case, needle, code):
    records = json.loads(data_path.read_text())[:5]
    path, model, out = tmp_path / "data.json", tmp_path / "model", tmp_path / "o.json"
    model.mkdir()
    if case == "not a string":
        records[1]["instruction"] = None
    elif case == "unreadable":
        path = tmp_path / "missing.json"
    elif case == "no model":
        model = tmp_path / "nowhere"
    elif case == "out is the data":
        out = path
    elif case == "out is a folder":
        out = tmp_path
    if case != "unreadable":
        path.write_text(json.dumps(records))
    before = path.read_bytes() if path.exists() else None
    r = run_cli(GENERATE, "--model", str(model), "--data", str(path), "--out", str(out))
    assert r.returncode == code, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr
    assert needle.format(tmp=tmp_path) in r.stderr
    assert (path.read_bytes() if path.exists() else None) == before  # the input is untouched


def test_records_without_input_get_responses(tmp_path, model_dir):
    """Magpie-style records (no 'input' key) are valid everywhere: the responses file keeps their shape."""
    path = tmp_path / "no-input.json"
    records = [{"instruction": "Name a color.", "output": "Red."}, {"instruction": "Say hi.", "output": "Hi."}]
    path.write_text(json.dumps(records))
    out = tmp_path / "out.json"
    r = run_cli(GENERATE, "--model", str(model_dir), "--data", str(path), "--out", str(out), "--max-new-tokens", "4",
                "--quiet")
    assert r.returncode == 0, r.stderr
    written = json.loads(out.read_text())
    assert [{k: v for k, v in w.items() if k != "model_response"} for w in written] == records


def test_a_rerun_replaces_its_own_output_and_overwrite_any_file(model_dir, data_path, tmp_path, capsys):
    """An existing --out is replaced when it is respond's own earlier output (the same command run again) or
    with --overwrite; anything else is refused (the bad-input table has that row)."""
    from gpt2_scratch.core.cli import main

    out = tmp_path / "responses.json"
    argv = ["respond", "--model", str(model_dir), "--data", str(data_path), "--out", str(out), "--limit", "2",
            "--max-new-tokens", "2", "--quiet"]
    assert main(argv) == 0
    first = out.read_text()
    assert main([*argv, "--limit", "3"]) == 0  # its own output: replaced
    assert len(json.loads(out.read_text())) == 3 and out.read_text() != first
    out.write_text("my notes, not JSON")
    assert main(argv) == 2 and "add --overwrite" in capsys.readouterr().err
    assert out.read_text() == "my notes, not JSON"
    assert main([*argv, "--overwrite"]) == 0
    assert len(json.loads(out.read_text())) == 2
