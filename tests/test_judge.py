"""eval/judge.py end to end against the stand-in Ollama server, run as a user runs it.

The stand-in scores a response with ``standin_score`` (a CRC of its text), so every average below
is known exactly. Faults are injected with markers in the responses (see tests/ollama_standin.py)
and the server counts the requests, so retries and resumption are checked by number, not by time.
"""

import json
import math
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO_ROOT, run_cli
from ollama_standin import OllamaStandin, standin_score

from gpt2_scratch.core.prompts import format_input
from gpt2_scratch.eval.judge_prompts import parse_score, parse_verdict, score_prompt

JUDGE = str(REPO_ROOT / "eval" / "judge.py")


@pytest.fixture(scope="module")
def test_records(shared_dir):
    """The book's 110 test records (instruction-data.json [935:1045])."""
    data = json.loads((shared_dir / "data" / "instruction-data.json").read_text())
    return data[935:1045]


@pytest.fixture()
def server():
    with OllamaStandin(models=["llama3"]) as srv:
        yield srv


def write_responses(path, records, responses, key="model_response"):
    path.write_text(json.dumps([{**r, key: s} for r, s in zip(records, responses)], indent=1))
    return path


def expected_scores(responses):
    return [standin_score(s) if s.strip() else 0 for s in responses]


def run_judge(*args, cwd):
    return run_cli(JUDGE, "--quiet", "--retry-backoff", "0.01", *args, cwd=cwd, timeout=300)


def book_lines(stdout):
    """The book's two summary lines (after the one-line header)."""
    lines = stdout.splitlines()
    return lines[1], lines[2]


# --------------------------------------------------------------------------- prompt and parsing


def test_prompt_is_the_books():
    rec = {"instruction": "Rewrite the sentence.", "input": "The cat sat.", "output": "The cat was sitting."}
    assert score_prompt(rec, "A cat sat.") == (
        "Given the input `Below is an instruction that describes a task. Write a response that "
        "appropriately completes the request.\n\n### Instruction:\nRewrite the sentence.\n\n### Input:\n"
        "The cat sat.` and correct output `The cat was sitting.`, score the model response `A cat sat.` "
        "on a scale from 0 to 100, where 100 is the best score. Respond with the integer number only.")


def test_the_judge_sees_the_training_prompt_with_or_without_input(shared_dir):
    """The judge asks about exactly the prompt training used (core.prompts, shared by both); a record
    without an 'input' key is the same question as one with an empty input."""
    data = json.loads((shared_dir / "data" / "instruction-data.json").read_text())
    for record in data[:50]:
        assert f"Given the input `{format_input(record, 'alpaca')}` " in score_prompt(record, "x")
    empty = next(r for r in data if r["input"] == "")
    no_input = {k: v for k, v in empty.items() if k != "input"}
    assert score_prompt(no_input, "x") == score_prompt(empty, "x")


@pytest.mark.parametrize("reply, score", [
    ('{"score": 87}', 87), ('{"score": 87.0}', 87), ('```json\n{"score": 42}\n```', 42),
    ("87", 87), (" 87\n", 87), ("0", 0), ("100", 100), ("Score: 73", 73), ("I'd give it a score of 9.", 9),
    ("85/100", 85), ("I would rate it 64 out of 100.", 64), ("The response deserves 90 points", 90),
    ('Here you go: {"score": 55}', 55),
    ("", None), ("I cannot rate this.", None), ("between 60 and 70", None), ("150", None),
    ("85.5", None), ('{"score": 101}', None), ('{"score": "high"}', None), ("-5", None), ("n/a", None),
])
def test_parse_score(reply, score):
    assert parse_score(reply) == score


@pytest.mark.parametrize("reply, verdict", [
    ('{"winner": "A"}', "A"), ('{"winner": "tie"}', "tie"), ("B", "B"), ("Response A.", "A"),
    ("tie", "tie"), ("**B**", "B"), ("Response B is better: it is correct.", "B"), ("A tie.", "tie"),
    ("Both are fine", None), ("A better answer is B", None), ("", None),
])
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


# --------------------------------------------------------------------------- scoring end to end


def test_scores_a_file_with_workers(tmp_path, server, test_records):
    records = test_records[:30]
    responses = [r["output"] for r in records]
    responses[3] = ""  # the book scores an empty response 0 without asking
    responses[7] = "Something unrelated entirely."
    data = write_responses(tmp_path / "responses.json", records, responses)
    server.delay = 0.05  # so the four workers overlap

    out = tmp_path / "scores.json"
    r = run_judge("--file", str(data), "--host", server.url, "--workers", "4", "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr

    expected = expected_scores(responses)
    assert book_lines(r.stdout) == ("Number of scores: 30 of 30", f"Average score: {np.mean(expected):.2f}")
    assert server.count() == 29, "one request per non-empty response"
    assert server.max_in_flight > 1, "workers should ask concurrently"
    # the book's options, plus a cap on the reply (a score is a few tokens)
    assert all(p["options"] == {"seed": 123, "temperature": 0, "num_ctx": 2048, "num_predict": 64}
               for p in server.chat_requests)
    assert all(p["format"]["properties"]["score"]["type"] == "integer" for p in server.chat_requests)

    saved = json.loads(out.read_text())
    assert [o["score"] for o in saved["records"]] == expected
    assert saved["records"][3]["status"] == "empty"
    s = saved["summary"]
    lo, hi = s["ci95"]
    half = 2.0452 * np.std(expected, ddof=1) / math.sqrt(30)  # t(0.975, 29)
    assert (s["median"], round(s["std"], 6)) == (np.median(expected), round(np.std(expected, ddof=1), 6))
    assert lo == pytest.approx(np.mean(expected) - half) and hi == pytest.approx(np.mean(expected) + half)
    assert sum(s["histogram"]["counts"]) == 30
    assert [w["score"] for w in s["lowest"]] == sorted(expected)[:5]
    assert s["failures"] == [] and "Failures: 0" in r.stdout
    assert out.with_suffix(".hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.with_suffix(".summary.txt").read_text().startswith("Number of scores: 30 of 30\n")

    # Same command again: everything comes from the cache, nothing is asked.
    r = run_judge("--file", str(data), "--host", server.url, "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0 and server.count() == 29
    assert book_lines(r.stdout)[1] == f"Average score: {np.mean(expected):.2f}"
    assert "Answers taken from the cache: 29" in r.stdout


def test_retries_faults_and_reports_unparsable(tmp_path, test_records):
    records = test_records[:10]
    responses = [r["output"] for r in records]
    faults = {0: "FAIL500:2", 1: "SLOW:1", 2: "MIDERR:1", 3: "GARBLE:1", 4: "PLAIN", 5: "UNPARSABLE",
              6: "FAIL500:9"}
    for i, mark in faults.items():
        responses[i] = f"{responses[i]} {mark}"
    data = write_responses(tmp_path / "responses.json", records, responses)
    out = tmp_path / "scores.json"
    with OllamaStandin(models=["llama3"], slow_seconds=5.0) as server:
        r = run_judge("--file", str(data), "--host", server.url, "--workers", "3", "--timeout", "2",
                      "--retries", "3", "--out", str(out), cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        # attempts per record: transport retries (--retries 3 → 4 attempts) and parse retries
        # (up to 3, but an unparsable reply the server repeats word for word is not asked a third time)
        assert [server.count(faults[i]) for i in range(7)] == [3, 2, 2, 2, 1, 2, 4]

    expected = expected_scores(responses)
    ok = [s for i, s in enumerate(expected) if i not in (5, 6)]
    assert book_lines(r.stdout) == ("Number of scores: 8 of 10", f"Average score: {np.mean(ok):.2f}")
    saved = json.loads(out.read_text())
    fails = {f["index"]: f for f in saved["summary"]["failures"]}
    assert sorted(fails) == [5, 6]
    assert fails[5]["reason"] == "unparsable reply after 2 attempts (the same reply each time)"
    assert fails[5]["reply"] == "This response is hard to rate; it has good and bad parts."
    assert "HTTP 500" in fails[6]["reason"] and "gave up after 4 attempts" in fails[6]["reason"]
    assert "Failures: 2" in r.stdout and "#5" in r.stdout and "hard to rate" in r.stdout
    # Only successful answers are cached: a rerun asks exactly the two failures again.
    cached = [json.loads(line) for line in out.with_suffix(".cache.jsonl").read_text().splitlines()]
    assert sorted(e["index"] for e in cached) == [0, 1, 2, 3, 4, 7, 8, 9]


def test_resumes_after_sigkill(tmp_path, test_records):
    records = test_records[:60]
    responses = [r["output"] for r in records]
    data = write_responses(tmp_path / "responses.json", records, responses)
    out = tmp_path / "scores.json"
    cache = out.with_suffix(".cache.jsonl")
    with OllamaStandin(models=["llama3"], delay=0.1) as server:
        proc = subprocess.Popen([sys.executable, JUDGE, "--quiet", "--file", str(data), "--host", server.url,
                                 "--workers", "2", "--out", str(out)], cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while (not cache.exists() or cache.read_bytes().count(b"\n") < 10) and proc.poll() is None:
            assert time.monotonic() < deadline, "the judge wrote nothing to its cache"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        asked_before = -1
        while asked_before != server.count():  # let requests already on the wire reach the count
            asked_before = server.count()
            time.sleep(0.5)
        kept = len(cache.read_bytes().splitlines())
        assert 10 <= kept < 60

        r = run_judge("--file", str(data), "--host", server.url, "--workers", "2", "--out", str(out),
                      cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert server.count() - asked_before == 60 - kept, "the rerun asks only what the cache lacks"
    assert book_lines(r.stdout) == ("Number of scores: 60 of 60",
                                    f"Average score: {np.mean(expected_scores(responses)):.2f}")
    assert f"Answers taken from the cache: {kept}" in r.stdout


def test_torn_cache_line_is_ignored(tmp_path, server, test_records):
    records = test_records[:10]
    responses = [r["output"] for r in records]
    data = write_responses(tmp_path / "responses.json", records, responses)
    out = tmp_path / "scores.json"
    cache = out.with_suffix(".cache.jsonl")
    assert run_judge("--file", str(data), "--host", server.url, "--out", str(out), cwd=tmp_path).returncode == 0
    lines = cache.read_bytes().splitlines(keepends=True)
    assert len(lines) == 10 and server.count() == 10
    cache.write_bytes(b"".join(lines[:9]) + lines[9][: len(lines[9]) // 2])  # killed mid-write

    r = run_judge("--file", str(data), "--host", server.url, "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert server.count() == 11, "only the torn record is asked again"
    assert "torn last line" in r.stderr
    repaired = cache.read_bytes().splitlines(keepends=True)
    assert repaired[:9] == lines[:9], "nothing before the torn line is lost"
    assert len(repaired) == 10 and all(json.loads(line) for line in repaired)
    assert book_lines(r.stdout)[1] == f"Average score: {np.mean(expected_scores(responses)):.2f}"


# --------------------------------------------------------------------------- bad input


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case, needle, code", [
    ("missing key", "record 2 has no 'output' field; every record needs 'instruction' and 'output' strings", 2),
    ("no response key", "record 0 has no 'model_response' string; add responses with `gpt2-scratch respond`", 2),
    ("unreadable", "does-not-exist.json: no such file", 2),
    ("not json", "malformed JSON at line 1", 2),
    ("server down", "start it with `ollama serve`", 1),
    ("model not pulled", "pull it with `ollama pull mistral`", 1),
])
def test_bad_input_is_one_line(tmp_path, server, test_records, case, needle, code):
    records = [{**r, "model_response": r["output"]} for r in test_records[:4]]
    host, model, path = server.url, "llama3", tmp_path / "responses.json"
    if case == "missing key":
        del records[2]["output"]
    elif case == "no response key":
        records = test_records[:4]
    elif case == "unreadable":
        path = tmp_path / "does-not-exist.json"
    elif case == "server down":
        host = f"http://127.0.0.1:{_free_port()}"
    elif case == "model not pulled":
        model = "mistral"
    if case == "not json":
        path.write_text("{oops")
    elif case != "unreadable":
        path.write_text(json.dumps(records))
    r = run_judge("--file", str(path), "--host", host, "--model", model, cwd=tmp_path)
    assert r.returncode == code, r.stderr  # 2: the input is bad; 1: the server failed
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr
    assert needle in r.stderr
    assert server.count() == 0


# --------------------------------------------------------------------------- pairwise, OpenAI API, evaluate


def test_pairwise_on_the_example_data(tmp_path, server, shared_dir):
    path = shared_dir / "data" / "eval-example-data.json"
    data = json.loads(path.read_text())
    out = tmp_path / "pairwise.json"
    r = run_judge("--file", str(path), "--response-key", "model 1 response", "--compare-key",
                  "model 2 response", "--out", str(out), "--host", server.url, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    wins = ties = losses = differ = 0
    for rec in data:
        a, b = rec["model 1 response"], rec["model 2 response"]
        differ += a != b
        sa, sb = standin_score(a), standin_score(b)
        if a == b or sa == sb:
            ties += 1
        elif sa > sb:
            wins += 1
        else:
            losses += 1
    assert f"A wins: {wins}   ties: {ties}   A losses: {losses}" in r.stdout
    assert server.count() == 2 * differ, "each differing pair is asked in both orders; equal ones not at all"
    s = json.loads(out.read_text())["summary"]
    assert (s["wins"], s["ties"], s["losses"], s["position_consistency"]) == (wins, ties, losses, 1.0)


def test_pairwise_across_two_files(tmp_path, server, test_records):
    records = test_records[:6]
    a = write_responses(tmp_path / "a.json", records, [r["output"] for r in records])
    b = write_responses(tmp_path / "b.json", records, [""] + [r["output"] + " Extra." for r in records[1:]])
    r = run_judge("--file", str(a), "--compare-file", str(b), "--host", server.url, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Number of comparisons: 6 of 6" in r.stdout and server.count() == 10


def test_pairwise_politeness_of_dpo_against_sft(tmp_path, server, test_records):
    """The DPO flow: the SFT run's test responses against the DPO run's, asked which is more polite
    (the prompt leaves the correct output out: tone is not in it)."""
    records = test_records[:5]
    sft = write_responses(tmp_path / "sft.json", records, [f"{r['output']} Do it yourself." for r in records])
    dpo = write_responses(tmp_path / "dpo.json", records,
                          [f"Please note: {r['output']}" if i < 4 else r["output"] for i, r in enumerate(records)])
    out = tmp_path / "polite.json"
    r = run_judge("--data", str(dpo), "--compare-file", str(sft), "--criterion", "polite", "--out", str(out),
                  "--host", server.url, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Pairwise (which is more polite)" in r.stdout and "A wins: 4   ties: 1   A losses: 0" in r.stdout
    asked = [m["content"] for req in server.chat_requests for m in req["messages"]]
    assert all("more polite" in q and "correct output" not in q for q in asked) and len(asked) == 10
    assert json.loads(out.read_text())["criterion"] == "polite"
    # The same pairs asked which is better are other questions: nothing comes from the politeness cache.
    r = run_judge("--data", str(dpo), "--compare-file", str(sft), "--out", str(out), "--host", server.url,
                  cwd=tmp_path)
    assert r.returncode == 0 and "Answers taken from the cache: 0" in r.stdout, r.stderr
    r = run_judge("--data", str(dpo), "--criterion", "polite", "--host", server.url, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: --criterion polite asks which of two responses")


def test_openai_compatible_api(tmp_path, server, test_records):
    records = test_records[:8]
    responses = [r["output"] for r in records]
    data = write_responses(tmp_path / "responses.json", records, responses)
    r = run_judge("--file", str(data), "--api", "openai", "--host", server.url + "/v1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert book_lines(r.stdout)[1] == f"Average score: {np.mean(expected_scores(responses)):.2f}"
    sent = server.chat_requests[-1]
    assert sent["response_format"]["type"] == "json_schema" and (sent["seed"], sent["temperature"]) == (123, 0)


def test_evaluate_metric_modules(tmp_path, server, test_records):
    import evaluate

    from gpt2_scratch.eval.metrics import load_metric

    records = test_records[:12]
    preds = [r["output"] if i % 3 else "Something else." for i, r in enumerate(records)]
    judge = evaluate.load(str(REPO_ROOT / "eval" / "metrics" / "llm_judge"))
    result = judge.compute(predictions=preds, references=[r["output"] for r in records],
                           instructions=[r["instruction"] for r in records],
                           inputs=[r["input"] for r in records], host=server.url, workers=2,
                           cache=str(tmp_path / "cache.jsonl"))
    assert result["scores"] == expected_scores(preds)
    assert result["judge_score"] == pytest.approx(np.mean(expected_scores(preds)))
    assert (result["num_scores"], result["num_records"], result["failures"]) == (12, 12, [])

    em = load_metric("exact_match").compute(predictions=["\nParis.", "rome", "x"],
                                            references=["Paris.", "Rome", "y"])
    assert em == {"exact_match": 1 / 3}
    em = load_metric("exact_match").compute(predictions=["rome!"], references=["Rome"], ignore_case=True,
                                            ignore_punctuation=True)
    assert em == {"exact_match": 1.0}
    rl = load_metric("rouge_l").compute(predictions=["the cat sat", "a b"], references=["the cat sat down", "a b"])
    assert rl["rougeL"] == pytest.approx((6 / 7 + 1) / 2)
