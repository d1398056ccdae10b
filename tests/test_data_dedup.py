"""`gpt2-scratch data dedup`: the book's near-duplicate search, checked against a plain-Python TF-IDF + cosine."""

import json
import math
import re
from collections import Counter

import pytest
from conftest import REPO_ROOT, SHARED_DIR, run_cli

from gpt2_scratch.datatools.dedup import near_duplicates

EXAMPLES = SHARED_DIR / "data" / "instruction-examples.json"


def reference_pairs(texts, threshold):
    """TF-IDF of character 1-3-grams + cosine, written out by hand from scikit-learn's documented formulas:
    idf = ln((1 + n) / (1 + df)) + 1 over the non-empty texts, raw counts times idf, L2-normalised rows;
    runs of white space become one space before the n-grams are cut (its char analyzer)."""
    index = [i for i, t in enumerate(texts) if t]
    docs = [re.sub(r"\s\s+", " ", re.sub(r"[^\w\s]", "", texts[i].lower())) for i in index]
    grams = [Counter(d[k:k + n] for n in (1, 2, 3) for k in range(len(d) - n + 1)) for d in docs]
    df = Counter(g for c in grams for g in c)
    idf = {g: math.log((1 + len(docs)) / (1 + df[g])) + 1 for g in df}
    vectors = []
    for c in grams:
        v = {g: count * idf[g] for g, count in c.items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        vectors.append({g: x / norm for g, x in v.items()})
    pairs = []
    for a in range(len(index)):
        for b in range(a + 1, len(index)):
            s = sum(x * vectors[b].get(g, 0.0) for g, x in vectors[a].items())
            i, j = index[a], index[b]
            if s > threshold and len(texts[i]) > 1 and len(texts[j]) > 1:
                pairs.append((i, j, s))
    return pairs


@pytest.mark.parametrize("key", ["instruction", "input", "output"])
@pytest.mark.parametrize("threshold", [0.9, 0.6])
def test_pairs_and_scores_equal_the_reference_on_the_books_examples(key, threshold):
    records = json.loads(EXAMPLES.read_text())
    texts = [r.get(key) or "" for r in records]
    ours, ref = near_duplicates(texts, threshold), reference_pairs(texts, threshold)
    assert [(i, j) for i, j, _ in ours] == [(i, j) for i, j, _ in ref]
    assert ours or (key == "input" and threshold == 0.9), "the comparison should cover some pairs"
    for (_, _, s), (_, _, r) in zip(ours, ref):
        assert s == pytest.approx(r, abs=1e-9)
    if key == "input":  # 75 of the 200 inputs are empty: every pair must still name the records themselves
        assert sum(1 for t in texts if not t) == 75
        for i, j, _ in ours:
            assert texts[i] and texts[j]


def test_the_book_script_pairs_the_wrong_records_when_a_key_is_empty():
    """The book's indexing (similarity matrix of the non-empty texts, read with indices into all records)
    names records that are not the pair; ours names the right ones."""
    texts = ["", "What is the capital of Italy?", "", "what is the capital of italy", "Name a fruit."]
    ours = near_duplicates(texts, 0.9)
    assert [(i, j) for i, j, _ in ours] == [(1, 3)]
    # the book's script would report records (0, 1): positions 0 and 1 of the filtered list, read in the full one


def test_cli_writes_pairs_and_deduplicated_records(tmp_path):
    records = json.loads(EXAMPLES.read_text())
    pairs_file, out = tmp_path / "pairs.jsonl", tmp_path / "dedup.json"
    r = run_cli("-m", "gpt2_scratch", "data", "dedup", "--data", str(EXAMPLES), "--pairs", str(pairs_file),
                "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    pairs = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    expected = [{"key": key, "a": i, "b": j, "similarity": pytest.approx(s, abs=1e-9)}
                for key in records[0] for i, j, s in reference_pairs([r.get(key) or "" for r in records], 0.9)]
    assert pairs == expected and pairs
    removed = {p["b"] for p in pairs if p["key"] != "instruction"}  # as the book, by default
    assert {p["key"] for p in pairs} == {"instruction", "output"} and removed
    assert json.loads(out.read_text()) == [r for i, r in enumerate(records) if i not in removed]
    assert f"wrote {len(records) - len(removed)} records to {out}" in r.stdout
    # a key named with --key removes by it
    by_instruction = tmp_path / "by-instruction.json"
    r = run_cli("-m", "gpt2_scratch", "data", "dedup", "--data", str(EXAMPLES), "--key", "instruction", "--out",
                str(by_instruction), "--quiet")
    dropped = {p["b"] for p in pairs if p["key"] == "instruction"}
    assert r.returncode == 0 and json.loads(by_instruction.read_text()) == [
        rec for i, rec in enumerate(records) if i not in dropped]
    # an existing output is kept unless --overwrite
    again = run_cli("-m", "gpt2_scratch", "data", "dedup", "--data", str(EXAMPLES), "--out", str(out))
    assert again.returncode == 2 and again.stderr.startswith("error: --out") and "--overwrite" in again.stderr
    bad = run_cli("-m", "gpt2_scratch", "data", "dedup", "--data", str(EXAMPLES), "--key", "nope")
    assert bad.returncode == 2 and "--key 'nope' is in no record" in bad.stderr


def test_the_readmes_data_commands_parse():
    """Every `gpt2-scratch data ...` line of the README's data section is a command line the parser accepts."""
    import importlib
    import shlex

    from gpt2_scratch.core.args import parse_dataclass_args
    from gpt2_scratch.core.cli import COMMANDS

    lines = [line.split("#")[0] for line in (REPO_ROOT / "README.md").read_text().splitlines()
             if line.startswith("gpt2-scratch data ")]
    assert len(lines) >= 6
    for line in lines:
        words = [w.split("|")[0] for w in shlex.split(line.replace("[", " ").replace("]", " "))]
        command = COMMANDS["data"][words[2]]
        args_class = getattr(importlib.import_module(command.module), command.args_class)
        args, _ = parse_dataclass_args(args_class, words[3:])
        assert args is not None, line
