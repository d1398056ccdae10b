"""Near-duplicate records by TF-IDF over character n-grams and cosine similarity (the book's method).

    gpt2-scratch data dedup --data records.json [--key instruction] [--threshold 0.9] [--pairs P.jsonl] [--out F]

As the book's ``ch07/02_dataset-utilities/find-near-duplicates.py``: each text is lower-cased and
stripped of punctuation (every character that is neither a word character nor white space), turned
into a TF-IDF vector over its character 1- to 3-grams (scikit-learn's ``TfidfVectorizer``, fitted on the
non-empty texts of the key), and two records are near-duplicates when the cosine similarity of their
vectors is strictly greater than ``--threshold`` (0.9, the script's default). Texts of one character
or none never pair, as in the book. By default each key of the first record is searched in turn, and,
as the book's ``--remove_duplicates``, the later record of a pair is removed for every key but
``instruction`` (one task often comes with many inputs); keys named with ``--key`` all remove.

One difference, on purpose: the book's script drops the records whose key is empty before vectorising
and then reads the similarity matrix with indices into the unfiltered list, so on a key that is empty in
some records (``input`` in most instruction data) it pairs the wrong records. Here every index is the
record's own index in the input file.

The similarities are computed a block of rows at a time (the vectors are L2-normalised, so a block's
cosine similarities are one sparse product), so memory stays at block x records, not records x records.
"""

from __future__ import annotations

import contextlib

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gpt2_scratch.core.args import arg
from gpt2_scratch.core.errors import InputError
from gpt2_scratch.core.files import check_output_file, claimed_output, write_json_atomic, write_text_atomic
from gpt2_scratch.core.records import load_records
from gpt2_scratch.datatools.common import check_new_output, jsonl_text

_PUNCTUATION = re.compile(r"[^\w\s]")
BLOCK_ROWS = 2048  # rows of the similarity matrix held at once


def normalize(text: str) -> str:
    """The book's preprocessing: lower case, punctuation removed."""
    return _PUNCTUATION.sub("", text.lower())


def near_duplicates(texts: Sequence[str], threshold: float = 0.9) -> list[tuple[int, int, float]]:
    """Pairs ``(i, j, similarity)`` with i < j, indices into ``texts``, whose similarity is above ``threshold``.

    The vectoriser is fitted on the non-empty texts (the book's corpus); texts of at most one character
    take part in the fit but never pair (as in the book).
    """
    # scikit-learn is imported here, not at the top: `gpt2-scratch data --help` and the other data
    # commands should not pay for loading it.
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics.pairwise import cosine_similarity

    kept = [i for i, text in enumerate(texts) if text]
    if len(kept) < 2:
        return []
    vectors = TfidfVectorizer(analyzer="char", ngram_range=(1, 3)).fit_transform([normalize(texts[i]) for i in kept])
    pairs = []
    for start in range(0, len(kept), BLOCK_ROWS):
        block = cosine_similarity(vectors[start:start + BLOCK_ROWS], vectors)  # (rows, len(kept))
        for row in range(block.shape[0]):
            a = start + row
            for b in (block[row, a + 1:] > threshold).nonzero()[0] + a + 1:
                i, j = kept[a], kept[b]
                if len(texts[i]) > 1 and len(texts[j]) > 1:
                    pairs.append((i, j, float(block[row, b])))
    return pairs


def key_texts(records: Sequence[dict], key: str, source: str) -> list[str]:
    """Each record's ``key`` as text ("" where it is absent or null); any other value is an InputError."""
    texts = []
    for index, record in enumerate(records):
        value = record.get(key)
        if value is not None and not isinstance(value, str):
            raise InputError(f"{source}: record {index} field '{key}' is a {type(value).__name__}, not text; "
                             "pass --key with keys that hold text")
        texts.append(value or "")
    return texts


@dataclass(kw_only=True)
class DedupArgs:
    """Find near-duplicate records (the book's find-near-duplicates.py: TF-IDF of character 1-3-grams, cosine)."""

    data: str = arg(help="records (.json/.jsonl file, URL or Hub data set id)")
    key: list[str] | None = arg(None, "the record keys to search, each in turn (default: every key of the first "
                                      "record, as the book)")
    threshold: float = arg(0.9, "pairs whose cosine similarity is strictly greater are near-duplicates (the book's "
                                "default)", at_least=0, at_most=1)
    pairs: str | None = arg(None, "write the pairs here, one JSON line each: {\"key\", \"a\", \"b\", \"similarity\"} "
                                  "with a < b record indices into --data")
    out: str | None = arg(None, "write the records here with the later member of every pair removed (without --key, "
                                "as the book: pairs by instruction are listed but remove nothing, since one task "
                                "often comes with many inputs)")
    overwrite: bool = arg(False, "replace existing --pairs/--out files")
    quiet: bool = arg(False, "print only the summary, not each pair", aliases=("-q",))


def run(args: DedupArgs) -> int:
    outputs = [(flag, path) for flag, path in (("--pairs", args.pairs), ("--out", args.out)) if path]
    for flag, path in outputs:
        check_output_file(path, flag=flag, inputs=[("--data", args.data)])
        check_new_output(Path(path), flag=flag, overwrite=args.overwrite)
    if args.pairs and args.out and Path(args.pairs).resolve() == Path(args.out).resolve():
        raise InputError("--pairs and --out name the same file; choose two files")
    with contextlib.ExitStack() as claims:  # one run per output at a time (core.files.claimed_output)
        for flag, path in outputs:
            claims.enter_context(claimed_output(path, flag=flag))
        return _dedup(args)


def _dedup(args: DedupArgs) -> int:
    """``run``'s work, once its outputs are claimed."""
    records = load_records(args.data, required=(), flag="--data")
    if not records:
        raise InputError(f"{args.data} holds no records")
    keys = args.key or list(records[0])
    missing = [k for k in keys if not any(k in r for r in records)]
    if missing:
        raise InputError(f"--key {missing[0]!r} is in no record of {args.data} (its keys: {', '.join(records[0])})")
    found: list[dict] = []
    for key in keys:
        texts = key_texts(records, key, args.data)
        pairs = near_duplicates(texts, args.threshold)
        print(f"{key}: {len(pairs)} pair{'s' * (len(pairs) != 1)} above {args.threshold:g} "
              f"({sum(1 for t in texts if t)} of {len(records)} records have one)")
        for i, j, similarity in pairs:
            found.append({"key": key, "a": i, "b": j, "similarity": similarity})
            if not args.quiet:
                print(f"  {key} {i}~{j} {similarity:.3f}  {_short(texts[i])!r}  ~  {_short(texts[j])!r}")
    removing = set(args.key) if args.key else set(keys) - {"instruction"}
    removed = sorted({p["b"] for p in found if p["key"] in removing})
    if args.pairs:
        write_text_atomic(args.pairs, jsonl_text(found))
    if args.out:
        write_json_atomic(args.out, [r for i, r in enumerate(records) if i not in set(removed)])
    print(f"{len(found)} pairs in {len(keys)} key{'s' * (len(keys) != 1)}; {len(removed)} records are the later "
          f"member of a pair by {', '.join(k for k in keys if k in removing) or 'no key that removes'}" + (f"; wrote {len(records) - len(removed)} records to {args.out}" if args.out else "")
          + (f"; pairs in {args.pairs}" if args.pairs else ""))
    return 0


def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."
