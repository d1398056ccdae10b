"""`gpt2-scratch data prefs`: the book's preference pairs through the local stand-in server, as a user runs it:
the output file (and `gpt2-scratch dpo` training on it), resume after SIGKILL, bad replies, a server that is down,
Ctrl-C and SIGTERM."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO_ROOT, SHARED_DIR, default_sigint, run_cli, wait_for_lines
from ollama_standin import OllamaStandin

from gpt2_scratch.core.prompts import format_input

PREFS = ["-m", "gpt2_scratch", "data", "prefs"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def book_records():
    return json.loads((SHARED_DIR / "data" / "instruction-data.json").read_text())


def write(path, records):
    path.write_text(json.dumps(records, indent=1))
    return path


def prefs(*args, cwd):
    return run_cli(*PREFS, "--quiet", "--retry-backoff", "0.01", *map(str, args), cwd=cwd, timeout=300)


def book_prompt(entry, politeness):
    """The notebook's prompt, typed out here from the notebook (not imported from the code under test)."""
    return (f"Given the input `{format_input(entry)}` and correct output `{entry['output']}`, slightly rewrite the "
            f"output to be more {politeness}.Keep the modification minimal.Only return return the generated "
            "response and nothing else.")


@pytest.mark.parametrize("api", ["ollama", "openai"])
def test_writes_the_books_pairs(api, tmp_path, book_records):
    records = book_records[:40]
    data, out = write(tmp_path / "data.json", records), tmp_path / "prefs.json"
    with OllamaStandin() as server:
        r = prefs("--data", data, "--host", server.url, "--api", api, "--workers", "3", "--out", out, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        prompts = sorted(p["messages"][-1]["content"] for p in server.chat_requests)
    rng = random.Random(123)
    styles = [rng.choice(["polite", "impolite"]) for _ in records]
    assert prompts == sorted(book_prompt(e, s) for e, s in zip(records, styles)), "one request per record, the book's words"
    written = json.loads(out.read_text())
    assert len(written) == 40 and {"polite", "impolite"} == set(styles)
    for entry, style, pref in zip(records, styles, written):
        assert {k: pref[k] for k in entry} == entry
        if style == "polite":  # the polite rewrite over the original
            assert (pref["chosen"], pref["rejected"]) == ("Please note: " + entry["output"], entry["output"])
        else:  # the original over the impolite rewrite
            assert (pref["chosen"], pref["rejected"]) == (entry["output"], "Obviously, " + entry["output"])
    assert f"Wrote 40 preference records to {out} (0 failed, 0 from the cache)" in r.stdout


def test_the_output_trains_with_dpo_unchanged(tmp_path, book_records, tiny_model_dir):
    data, out = write(tmp_path / "data.json", book_records[:40]), tmp_path / "prefs.json"
    with OllamaStandin() as server:
        assert prefs("--data", data, "--host", server.url, "--out", out, cwd=tmp_path).returncode == 0
    tiny = ["--max-steps", "2", "--batch-size", "4", "--eval-freq", "1", "--eval-iter", "1", "--max-new-tokens", "2",
            "--sample-tokens", "2", "--lr", "1e-4"]
    r = subprocess.run([sys.executable, "train/dpo.py", "--model", str(tiny_model_dir), "--data", str(out), *tiny,
                        "--out", str(tmp_path / "dpo")], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "dpo" / "model.safetensors").is_file()


def test_resumes_after_sigkill_without_asking_a_record_twice(tmp_path, book_records):
    records = book_records[:60]
    data, out = write(tmp_path / "data.json", records), tmp_path / "prefs.json"
    cache = out.with_suffix(".cache.jsonl")
    with OllamaStandin(delay=0.1) as server:
        proc = subprocess.Popen([sys.executable, *PREFS, "--quiet", "--data", str(data), "--host", server.url,
                                 "--workers", "2", "--out", str(out)], cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_lines(cache, 10, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL and not out.exists()
        asked_before = -1
        while asked_before != len(server.chat_requests):  # let requests already on the wire arrive
            asked_before = len(server.chat_requests)
            time.sleep(0.5)
        kept = len(cache.read_bytes().splitlines())
        assert 10 <= kept < 60
        first = {p["messages"][-1]["content"] for p in server.chat_requests}
        r = prefs("--data", data, "--host", server.url, "--workers", "2", "--out", out, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        again = [p["messages"][-1]["content"] for p in server.chat_requests[asked_before:]]
    assert len(again) == 60 - kept == len(set(again)), "the rerun asks only what the cache lacks, each once"
    assert len(first | set(again)) == 60
    assert len(json.loads(out.read_text())) == 60 and f"{kept} from the cache" in r.stdout


def test_a_bad_reply_costs_its_record_not_the_file(tmp_path, book_records):
    records = [dict(r) for r in book_records[:8]]
    records[2]["output"] += " NONOBJECT:list"  # a stream line that is not an Ollama chat chunk
    records[5]["output"] += " EMPTYREWRITE"  # an empty rewrite, asked again, then given up
    records[6]["output"] += " FAIL500:1"  # a transient error: retried and answered
    data, out = write(tmp_path / "data.json", records), tmp_path / "prefs.json"
    bad = write(tmp_path / "bad.json", [records[2], records[5]])
    with OllamaStandin() as server:
        r = prefs("--data", data, "--host", server.url, "--out", out, cwd=tmp_path)
        # every record failing is a failure of the run (exit 1), and nothing is written
        none = prefs("--data", bad, "--host", server.url, "--out", tmp_path / "none.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    written = json.loads(out.read_text())
    assert [w["instruction"] for w in written] == [e["instruction"] for i, e in enumerate(records) if i not in (2, 5)]
    assert "2 of 8 records failed" in r.stdout
    assert "record 2: " in r.stdout and "not an Ollama chat chunk" in r.stdout
    assert "record 5: unparsable reply" in r.stdout
    assert none.returncode == 1 and none.stderr.startswith("error: every record failed (record 0: ")
    assert not (tmp_path / "none.json").exists()


def test_a_server_that_is_down_is_one_line_before_anything_is_written(tmp_path, book_records):
    data, out = write(tmp_path / "data.json", book_records[:3]), tmp_path / "prefs.json"
    with OllamaStandin() as server:
        url = server.url
    r = prefs("--data", data, "--host", url, "--out", out, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"error: no Ollama server answers at {url}; start it with `ollama serve`")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.json"]
    with OllamaStandin(models=["mistral"]) as server:
        r = prefs("--data", data, "--host", server.url, "--out", out, cwd=tmp_path)
    assert r.returncode == 1 and "pull it with `ollama pull llama3`" in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_and_sigterm_stop_resumably(sig, tmp_path, book_records):
    records = book_records[:40]
    data, out = write(tmp_path / "data.json", records), tmp_path / "prefs.json"
    cache = out.with_suffix(".cache.jsonl")
    with OllamaStandin(delay=0.2) as server:
        proc = subprocess.Popen([sys.executable, *PREFS, "--quiet", "--data", str(data), "--host", server.url,
                                 "--workers", "2", "--out", str(out)], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=default_sigint)
        wait_for_lines(cache, 4, proc)
        started = time.monotonic()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - started < 5, "the run stops at once"
        assert proc.returncode == (130 if sig == signal.SIGINT else 143)  # 143: SIGTERM, as training runs
        assert "interrupted; answers so far are in" in err and not out.exists()
        kept = len(cache.read_bytes().splitlines())
        r = prefs("--data", data, "--host", server.url, "--out", out, cwd=tmp_path)
    assert r.returncode == 0 and f"{kept} from the cache" in r.stdout


def test_bad_input_is_one_line_before_any_request(tmp_path, book_records):
    data = write(tmp_path / "data.json", book_records[:3])
    no_output = write(tmp_path / "no-output.json", [{"instruction": "Say hi."}])
    with OllamaStandin() as server:
        cases = [
            (["--data", no_output], "no-output.json: record 0 has no 'output' field"),
            (["--data", data, "--out", data], "is also --data: writing it would replace the input"),
            (["--data", data, "--timeout", "0"], "--timeout must be"),
            (["--data", data, "--host", "htp:/x"], "--host: invalid host URL 'htp:/x'"),
            (["--data", data, "--limit", "0"], "--limit 0 leaves no records"),
        ]
        for args, needle in cases:
            r = prefs(*args, *([] if "--host" in args else ["--host", server.url]), cwd=tmp_path)
            assert r.returncode == 2 and r.stderr.startswith("error: ") and needle in r.stderr, (args, r.stderr)
            assert r.stderr.count("\n") == 1
        assert server.chat_requests == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.json", "no-output.json"]
