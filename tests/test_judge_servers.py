"""The judge against servers as they really are: format refusals, errors that will not change,
replies that never end, malformed streams, Ctrl-C, and values that must never reach the mean.

The client-level checks run in-process against the stand-in (fast); what a user sees (exit
status, the one-line error, resuming after Ctrl-C) runs eval/judge.py as a subprocess.
"""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO_ROOT, run_cli
from ollama_standin import OllamaStandin, standin_score

from gpt2_scratch.eval.judge import _judge_identity, compare_records, score_records
from gpt2_scratch.eval.judge_cache import JudgeCache
from gpt2_scratch.eval.judge_client import RetryPolicy, make_judge
from gpt2_scratch.eval.judge_prompts import SCORE_SCHEMA
from gpt2_scratch.eval.judge_summary import score_summary

JUDGE = str(REPO_ROOT / "eval" / "judge.py")
FAST = RetryPolicy(attempts=4, backoff=0.01)


def make_records(responses):
    return [{"instruction": f"Name a colour that is not number {i}.", "input": "", "output": "Blue.",
             "model_response": r} for i, r in enumerate(responses)]


def judge_for(server, api="ollama", **kw):
    return make_judge(api, server.url, "llama3", retry=FAST, **kw)


def sent_format(payload) -> str:
    """The structured-output format a chat request asked for (see eval/judge_client.py)."""
    fmt, rf = payload.get("format"), payload.get("response_format")
    if isinstance(fmt, dict):
        return "schema"
    if fmt == "json":
        return "json"
    return rf["type"] if rf else "text"


def run_judge(*args, cwd):
    return run_cli(JUDGE, "--quiet", "--retry-backoff", "0.01", *args, cwd=cwd, timeout=120)


# --------------------------------------------------------------------------- structured-output ladder


@pytest.mark.parametrize("api, refused, used", [
    ("openai", {"json_schema"}, "json_object"),  # llama-cpp-python: json_schema → HTTP 500 validation error
    ("openai", {"json_schema", "json_object"}, "text"),
    ("ollama", {"schema"}, "json"),  # Ollama < 0.5
    ("ollama", {"schema", "json"}, "text"),
])
def test_refused_format_falls_back_once_and_is_remembered(api, refused, used, caplog):
    responses = [f"Blue, shade {i}." for i in range(8)]
    with OllamaStandin(models=["llama3"], reject_formats=refused, delay=0.02) as server:
        judge = judge_for(server, api)
        out = score_records(make_records(responses), judge, workers=4, progress=False)
    assert [o["score"] for o in out] == [standin_score(r) for r in responses]
    assert judge.format == used
    # Four workers, yet each refused format was sent exactly once: until one format has worked,
    # requests go one at a time; the one that worked is used for every later request.
    assert sorted(sent_format(p) for p in server.rejected) == sorted(refused)
    assert [sent_format(p) for p in server.chat_requests] == [used] * 8
    if used == "json_object":  # with the schema, which llama-cpp-python turns into a grammar
        assert all(p["response_format"]["schema"] == SCORE_SCHEMA for p in server.chat_requests)
    assert server.max_in_flight > 1, "once the format is settled, the workers ask in parallel"
    warnings = [r.getMessage() for r in caplog.records if "refused structured output" in r.getMessage()]
    assert len(warnings) == len(refused), warnings


def test_no_structured_sends_no_format():
    with OllamaStandin(models=["llama3"]) as server:
        judge = judge_for(server, "openai", structured=False)
        out = score_records(make_records(["Blue."]), judge, workers=1, progress=False)
    assert out[0]["score"] == standin_score("Blue.") and judge.format == "text"
    assert "response_format" not in server.chat_requests[0] and server.rejected == []


# --------------------------------------------------------------------------- what is retried


@pytest.mark.parametrize("api", ["ollama", "openai"])
def test_errors_that_will_not_change_are_not_retried(api):
    responses = ["Blue. HTTP400", "Blue. INVALID500", "Blue. FAIL500:2", "Cyan."]
    with OllamaStandin(models=["llama3"]) as server:
        judge = judge_for(server, api)
        out = score_records(make_records(responses), judge, workers=2, progress=False)
        counts = [server.count(m) for m in ("HTTP400", "INVALID500", "FAIL500", "Cyan.")]
    assert counts == [1, 1, 3, 1], "4xx and validation errors once; a plain 500 is retried"
    assert "HTTP 400" in out[0]["reason"] and "not retried" in out[0]["reason"]
    assert "HTTP 500" in out[1]["reason"] and "not retried" in out[1]["reason"]
    assert [o["score"] for o in out[2:]] == [standin_score(r) for r in responses[2:]]
    # an error about the request's content is not mistaken for a refused format
    assert judge.format == {"ollama": "schema", "openai": "json_schema"}[api] and server.rejected == []


# --------------------------------------------------------------------------- the reply cap


@pytest.mark.parametrize("api", ["ollama", "openai"])
def test_reply_is_capped(api):
    responses = ["Blue.", "Blue. CHATTY"]
    with OllamaStandin(models=["llama3"]) as server:
        capped = judge_for(server, api)
        out = score_records(make_records(responses), capped, workers=1, progress=False)
        caps = [OllamaStandin.cap(p) for p in server.chat_requests]
        assert caps == [64] * len(caps)
        assert out[0]["score"] == standin_score("Blue.")
        # The chatty reply is cut before its score; the server gives the same reply again, so it
        # is asked twice, not three times, and the reason says what to change.
        assert out[1]["status"] == "failed" and server.count("CHATTY") == 2
        assert "cut at 64 tokens" in out[1]["reason"] and "--max-reply-tokens" in out[1]["reason"]

        uncapped = judge_for(server, api, max_reply_tokens=0)
        out = score_records(make_records(responses), uncapped, workers=1, progress=False)
        assert OllamaStandin.cap(server.chat_requests[-1]) is None
        assert out[1]["score"] == standin_score("Blue. CHATTY")
    # the cap can change the answer, so it is part of the cache key's identity
    assert _judge_identity(capped) != _judge_identity(uncapped)
    if api == "ollama":  # and the book's options stay as they are
        assert capped.options == {"seed": 123, "temperature": 0, "num_ctx": 2048, "num_predict": 64}


# --------------------------------------------------------------------------- never hang


@pytest.mark.parametrize("api", ["ollama", "openai"])
def test_a_reply_that_never_ends_fails_at_the_total_deadline(api):
    """Ollama: NDJSON chunks without done, forever; OpenAI: a body that trickles forever. The
    gap between chunks never reaches --timeout; the total deadline ends the request."""
    responses = ["Blue. FOREVER", "Blue."]
    with OllamaStandin(models=["llama3"]) as server:
        judge = judge_for(server, api, timeout=30, request_timeout=1.5)
        t0 = time.monotonic()
        out = score_records(make_records(responses), judge, workers=2, progress=False)
        elapsed = time.monotonic() - t0
        assert server.count("FOREVER") == 1, "a request that overran its deadline is not retried"
    assert out[0]["status"] == "failed"
    assert "within 1.5 s" in out[0]["reason"] and "--request-timeout" in out[0]["reason"]
    assert out[1]["score"] == standin_score("Blue.")
    assert 1.5 <= elapsed < 4.0, elapsed


@pytest.mark.parametrize("kind", ["list", "str", "int"])
def test_a_stream_line_that_is_json_but_not_an_object_fails_the_record(kind):
    responses = [f"Blue. NONOBJECT:{kind}", "Blue."]
    with OllamaStandin(models=["llama3"]) as server:
        out = score_records(make_records(responses), judge_for(server), workers=1, progress=False)
        assert server.count("NONOBJECT") == 1
    assert out[0]["status"] == "failed" and "not an Ollama chat chunk" in out[0]["reason"]
    assert out[1]["score"] == standin_score("Blue.")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_stops_the_run_and_a_rerun_resumes(tmp_path, sig, code):
    """SIGINT (or SIGTERM) while both workers wait on a server that answers in a minute: the process exits in
    seconds with 130 (143) and the resume line; what had arrived is cached and not asked again."""
    responses = [f"Blue, shade {i}." for i in range(4)] + [f"Blue, slow {i}. SLOW:1" for i in range(2)] \
        + [f"Blue, late {i}." for i in range(4)]
    data = tmp_path / "responses.json"
    data.write_text(json.dumps(make_records(responses)))
    out, cache = tmp_path / "scores.json", tmp_path / "scores.cache.jsonl"
    cmd = [sys.executable, JUDGE, "--quiet", "--file", str(data), "--workers", "2", "--out", str(out)]
    with OllamaStandin(models=["llama3"], delay=0.05, slow_seconds=60) as server:
        # SIGINT back to its default in the child: a shell that starts CI in the background hands it
        # down ignored, and Python then never raises KeyboardInterrupt.
        proc = subprocess.Popen(cmd + ["--host", server.url], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 60
        while server.count("SLOW") < 2 or server.in_flight < 2:  # both workers are stuck now
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        time.sleep(0.2)
        t0 = time.monotonic()
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=30)
        took = time.monotonic() - t0
        assert proc.returncode == code, stderr
        assert took < 5, f"the judge took {took:.1f} s to stop after Ctrl-C"
        assert "answers so far are in the cache" in stderr and "Traceback" not in stderr
        kept = [json.loads(line)["index"] for line in cache.read_text().splitlines()]
        assert sorted(kept) == [0, 1, 2, 3]

        asked = server.count()
        r = run_cli(*cmd[1:], "--host", server.url, cwd=tmp_path, timeout=60)
        assert r.returncode == 0, r.stderr
        assert server.count() - asked == 6, "the rerun asks only what the cache lacks"
    assert "Answers taken from the cache: 4" in r.stdout
    assert f"Average score: {np.mean([standin_score(s) for s in responses]):.2f}" in r.stdout


# --------------------------------------------------------------------------- scores you can trust


@pytest.mark.parametrize("host", ["http://exa mple:99999", "ftp://x", "http://localhost:99999", "http://:80"])
def test_invalid_host_is_one_line_before_any_request(tmp_path, host):
    data = tmp_path / "responses.json"
    data.write_text(json.dumps(make_records(["Blue."])))
    r = run_judge("--file", str(data), "--host", host, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: --host: invalid host URL")
    assert r.stdout == ""


@pytest.mark.parametrize("mode", ["score", "pairwise"])
def test_nothing_scored_is_a_failure(tmp_path, mode):
    data = tmp_path / "responses.json"
    data.write_text(json.dumps([{**r, "other": f"Red {i}."} for i, r in
                                enumerate(make_records([f"Blue {i}. HTTP400" for i in range(3)]))]))
    extra = ("--compare-key", "other") if mode == "pairwise" else ()
    with OllamaStandin(models=["llama3"]) as server:
        r = run_judge("--file", str(data), "--host", server.url, *extra, cwd=tmp_path)
        assert server.count() == (3 if mode == "score" else 6)
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    what = "score" if mode == "score" else "verdict"
    assert r.stderr.startswith(f"error: no record got a {what} (3 failed; record 0: HTTP 400"), r.stderr
    assert ("Number of scores: 0 of 3" if mode == "score" else "Number of comparisons: 0 of 3") in r.stdout


def test_impossible_cached_values_are_asked_again(tmp_path):
    responses = [f"Blue, shade {i}." for i in range(5)]
    data = tmp_path / "responses.json"
    data.write_text(json.dumps(make_records(responses)))
    out = tmp_path / "scores.json"
    cache = out.with_suffix(".cache.jsonl")
    expected = f"Average score: {np.mean([standin_score(s) for s in responses]):.2f}"
    with OllamaStandin(models=["llama3"]) as server:
        assert run_judge("--file", str(data), "--host", server.url, "--out", str(out), cwd=tmp_path).returncode == 0
        entries = [json.loads(line) for line in cache.read_text().splitlines()]
        for entry, bad in zip(sorted(entries, key=lambda e: e["index"]), [9999, -1, 85.5, "85", True]):
            entry["value"] = bad  # hand-edited (or written by a buggy version)
        cache.write_text("".join(json.dumps(e) + "\n" for e in entries))

        r = run_judge("--file", str(data), "--host", server.url, "--out", str(out), cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert server.count() == 10, "every impossible value is asked again"
    assert "ignoring 5 cache entries with an impossible value (record 0: 9999" in r.stderr
    assert expected in r.stdout and "Answers taken from the cache: 0" in r.stdout


def test_impossible_cached_verdict_is_asked_again(tmp_path, caplog):
    recs = make_records(["Blue.", "Red."])
    other = [{**r, "model_response": "Green."} for r in recs]
    cache = JudgeCache(tmp_path / "c.jsonl")
    with OllamaStandin(models=["llama3"]) as server:
        first = compare_records(recs, "model_response", other, "model_response", judge_for(server),
                                cache=cache, workers=1, progress=False)
        lines = cache.path.read_text().splitlines()
        cache.path.write_text("\n".join([json.dumps({**json.loads(lines[0]), "value": "C"}), *lines[1:]]) + "\n")
        again = compare_records(recs, "model_response", other, "model_response", judge_for(server),
                                cache=cache, workers=1, progress=False)
        assert server.count() == 4 + 1
    assert [o["result"] for o in again] == [o["result"] for o in first]
    assert "impossible value" in caplog.text


def test_summary_averages_only_scores_0_to_100():
    recs = make_records(["a", "b", "c"])
    outcomes = [{"index": 0, "status": "ok", "score": 80, "reply": "80", "reason": None},
                {"index": 1, "status": "ok", "score": 9999, "reply": "9999", "reason": None},
                {"index": 2, "status": "ok", "score": True, "reply": "true", "reason": None}]
    s = score_summary(outcomes, recs, response_key="model_response")
    assert (s["num_scores"], s["average"]) == (1, 80.0)
    assert [f["index"] for f in s["failures"]] == [1, 2]
    assert "impossible score 9999" in s["failures"][0]["reason"]
