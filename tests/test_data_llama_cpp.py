"""`gpt2-scratch data prefs` and `data generate` --api openai against a real llama.cpp (llama-cpp-python's
OpenAI-compatible server with Gemma 3 270M, the judge's slow-suite server; see test_judge_llama_cpp.py).

The model is a tiny base model, so its rewrites and instructions mean nothing; what is checked is the protocol
as a recording proxy sees it: chat requests for prefs and raw /v1/completions for generate, each carrying the cap
and its seed, all answered 200 with text, the output files in the book's shape, and a rerun that asks nothing.
Skipped, with the install hint, where llama-cpp-python[server] or the model package is missing.
"""

import json
import random

import pytest
from conftest import run_cli
from test_judge_llama_cpp import ALIAS, RecordingProxy, llama_server  # noqa: F401 (llama_server: the fixture)

pytestmark = pytest.mark.slow

DATA = ["-m", "gpt2_scratch", "data"]


def test_prefs_against_llama_cpp(tmp_path, llama_server, shared_dir):  # noqa: F811
    records = json.loads((shared_dir / "data" / "instruction-data.json").read_text())[:3]
    data, out = tmp_path / "data.json", tmp_path / "prefs.json"
    data.write_text(json.dumps(records))
    # Gemma 3 270M is a base model: asked for a polite rewrite it answers a blank line (the record fails, as an
    # empty reply must), asked for an impolite one of the first record it writes text. A seed that picks
    # "impolite" for the first record makes the run write at least that one.
    seed = next(s for s in range(100) if random.Random(s).choice(["polite", "impolite"]) == "impolite")
    proxy = RecordingProxy(llama_server)
    try:
        args = ("prefs", "--data", str(data), "--api", "openai", "--host", proxy.url, "--model", ALIAS,
                "--max-reply-tokens", "48", "--workers", "2", "--seed", str(seed), "--out", str(out), "--quiet")
        r = run_cli(*DATA, *args, cwd=tmp_path, timeout=900)
        assert r.returncode == 0, r.stderr
        chats = proxy.chats()
        assert len(chats) >= 3 and all(c["status"] == 200 for c in chats)
        assert all(c["payload"]["max_tokens"] == 48 and c["payload"]["seed"] == 123 for c in chats)
        written = json.loads(out.read_text())
        failed = 3 - len(written)  # a record whose rewrite stays empty is reported and left out
        assert written and written[0]["instruction"] == records[0]["instruction"] and f"{failed} failed" in r.stdout
        assert written[0]["chosen"] == records[0]["output"] and written[0]["rejected"].strip()
        for pref in written:
            assert isinstance(pref["chosen"], str) and isinstance(pref["rejected"], str)
            assert pref["output"] in (pref["chosen"], pref["rejected"])
        r = run_cli(*DATA, *args, "--overwrite", cwd=tmp_path, timeout=300)
        assert r.returncode == 0 and f"{len(written)} from the cache" in r.stdout
        if not failed:
            assert len(proxy.chats()) == len(chats), "a rerun asks nothing"
    finally:
        proxy.close()


def test_generate_against_llama_cpp(tmp_path, llama_server):  # noqa: F811
    out = tmp_path / "new.json"
    proxy = RecordingProxy(llama_server)
    try:
        r = run_cli(*DATA, "generate", "--api", "openai", "--host", proxy.url, "--model", ALIAS, "--template", "gemma",
                    "--n", "2", "--max-reply-tokens", "32", "--max-tries", "6", "--out", str(out), "--quiet",
                    cwd=tmp_path, timeout=900)
        raw = [e for e in proxy.log if e["path"] == "/v1/completions"]
        assert raw and all(e["status"] == 200 and isinstance(e["body"]["choices"][0]["text"], str) for e in raw)
        assert all(e["payload"]["prompt"] == "<start_of_turn>user\n" and e["payload"]["stop"] == ["<end_of_turn>"]
                   and e["payload"]["max_tokens"] == 32 for e in raw)
        assert len({e["payload"]["seed"] for e in raw}) == len(raw), "each slot its own seed"
        assert r.returncode == 0, r.stderr  # a base model still writes some first line to take as an instruction
        records = json.loads(out.read_text())
        assert records and all(set(rec) == {"instruction", "output"} for rec in records)
    finally:
        proxy.close()
