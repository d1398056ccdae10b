"""`gpt2-scratch data generate` (Magpie) through the local stand-in server: what is sent, the records written,
near-duplicates dropped, bad replies counted, resume after SIGKILL with nothing asked twice, Ctrl-C/SIGTERM."""

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import default_sigint, run_cli, wait_for_lines
from ollama_standin import MAGPIE_INSTRUCTIONS, OllamaStandin

GENERATE = ["-m", "gpt2_scratch", "data", "generate"]
LLAMA3_USER_TURN = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>"  # the notebook's query


def generate(*args, cwd):
    return run_cli(*GENERATE, "--quiet", "--retry-backoff", "0.01", *map(str, args), cwd=cwd, timeout=300)


def expected_instructions(seed: int, slots: int) -> list[str]:
    """The stand-in's instruction per slot, without near-duplicates (the last of its list repeats the first)."""
    kept, seen = [], set()
    for k in range(slots):
        text = MAGPIE_INSTRUCTIONS[(seed + k) % len(MAGPIE_INSTRUCTIONS)]
        norm = "".join(c for c in text.lower() if c.isalnum() or c.isspace())
        if norm not in seen:
            seen.add(norm)
            kept.append((k, text))
    return kept


@pytest.mark.parametrize("api", ["ollama", "openai"])
def test_writes_the_books_records_from_a_user_turn_start(api, tmp_path):
    out = tmp_path / "new.json"
    with OllamaStandin() as server:
        r = generate("--host", server.url, "--api", api, "--n", 5, "--workers", 2, "--out", out, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        raw, chat = list(server.raw_requests), list(server.chat_requests)
    # seed 123: slots 0..4 give instructions 3, 4, 5, 0 (a near-duplicate of 5), 1; slot 5 gives 2
    kept = expected_instructions(123, 6)
    assert [k for k, _ in kept] == [0, 1, 2, 4, 5]
    records = json.loads(out.read_text())
    assert records == [{"instruction": t, "output": "An answer to: " + t} for _, t in kept]
    assert len(raw) == 6 and all(p["prompt"] == LLAMA3_USER_TURN for p in raw)
    options = [p["options"] if api == "ollama" else p for p in raw]
    assert sorted(o["seed"] for o in options) == list(range(123, 129))
    assert all(o["temperature"] == 1.0 and o["stop"] == ["<|eot_id|>"] for o in options)
    if api == "ollama":
        assert all(p["raw"] is True for p in raw)
    assert sorted(p["messages"][-1]["content"] for p in chat) == sorted(t for _, t in kept)
    assert "Wrote 5 records" in r.stdout and "1 near-duplicate instructions dropped, 0 failed" in r.stdout


def test_other_templates_and_a_bad_reply_costs_its_slot(tmp_path):
    out = tmp_path / "new.json"
    with OllamaStandin() as server:
        server.garbage_seeds = {124}  # slot 1's instruction comes back in the wrong shape
        r = generate("--host", server.url, "--n", 3, "--template", "gemma", "--out", out, cwd=tmp_path)
        assert {p["prompt"] for p in server.raw_requests} == {"<start_of_turn>user\n"}
        assert {tuple(p["options"]["stop"]) for p in server.raw_requests} == {("<end_of_turn>",)}
    assert r.returncode == 0, r.stderr
    assert "1 of 5 slots failed" in r.stdout and "slot 1: instruction: " in r.stdout
    assert [rec["instruction"] for rec in json.loads(out.read_text())] == [
        MAGPIE_INSTRUCTIONS[3], MAGPIE_INSTRUCTIONS[5], MAGPIE_INSTRUCTIONS[1]]


def test_gives_up_after_max_tries_with_what_it_has(tmp_path):
    out = tmp_path / "new.json"
    with OllamaStandin() as server:
        r = generate("--host", server.url, "--n", 9, "--out", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(out.read_text())) == 5  # the stand-in knows five distinct instructions
    assert "(only 5 of 9 after 36 tries: raise --max-tries)" in r.stdout


def test_resumes_after_sigkill_without_asking_twice(tmp_path):
    out = tmp_path / "new.json"
    cache = out.with_suffix(".cache.jsonl")
    with OllamaStandin(delay=0.3) as server:
        cmd = [sys.executable, *GENERATE, "--quiet", "--host", server.url, "--n", 5, "--workers", 1, "--out", out]
        proc = subprocess.Popen(list(map(str, cmd)), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_lines(cache, 6, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL and not out.exists()
        time.sleep(0.5)  # a request on the wire reaches the server (its answer is lost with the process)
        kept = len(cache.read_bytes().splitlines())
        raw_before, chat_before = len(server.raw_requests), len(server.chat_requests)
        assert kept < raw_before + chat_before <= kept + 1
        r = generate("--host", server.url, "--n", 5, "--out", out, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        asked_again = len(server.raw_requests) - raw_before + len(server.chat_requests) - chat_before
    assert asked_again == 6 + 5 - kept, "the rerun asks only what the cache lacks"
    assert json.loads(out.read_text()) == [{"instruction": t, "output": "An answer to: " + t}
                                           for _, t in expected_instructions(123, 6)]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_and_sigterm_stop_resumably(sig, tmp_path):
    out = tmp_path / "new.json"
    cache = out.with_suffix(".cache.jsonl")
    with OllamaStandin(delay=0.3) as server:
        cmd = [sys.executable, *GENERATE, "--quiet", "--host", server.url, "--n", 5, "--workers", 1, "--out", out]
        proc = subprocess.Popen(list(map(str, cmd)), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, preexec_fn=default_sigint)
        wait_for_lines(cache, 2, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == (130 if sig == signal.SIGINT else 143)  # 143: SIGTERM, as training runs
        assert "interrupted; answers so far are in" in err and not out.exists()
        r = generate("--host", server.url, "--n", 5, "--out", out, cwd=tmp_path)
    assert r.returncode == 0 and len(json.loads(out.read_text())) == 5


def test_bad_options_and_a_server_that_is_down(tmp_path):
    with OllamaStandin() as server:
        url = server.url
        r = generate("--host", url, "--end-of-turn", "</s>", cwd=tmp_path)
        assert r.returncode == 2 and "--end-of-turn goes with --user-turn" in r.stderr
    r = generate("--host", url, "--n", 2, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.startswith(f"error: no Ollama server answers at {url}")
    assert list(tmp_path.iterdir()) == []
