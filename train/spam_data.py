"""The chapter-6 data pipeline: SMS Spam Collection → balanced, shuffled, split, padded tensors.

Reproduces the book's steps (Raschka, "Build a Large Language Model (From Scratch)", ch. 6)
with our own code:

1. read ``label<TAB>text`` lines (quoting off: the texts contain quote characters, and a
   CSV reader with quoting on merges lines — that is why the book's notebook counts 5572 rows
   where the file has 5574);
2. balance by undersampling the majority class: ``df[ham].sample(n_spam, random_state=123)``,
   then the ham subset and all spam rows concatenated in that order;
3. shuffle with ``df.sample(frac=1, random_state=123)`` and cut 70/10/20 with ``int()``
   boundaries (747+747 rows → 1045/149/300);
4. tokenize with GPT-2 BPE, pad with ``<|endoftext|>`` (50256) to the longest *training*
   example; validation/test are truncated to that length.

Every example also carries an ``attention_mask``: our classifier reads the logits of the last
*real* token (the book reads position -1, which is a pad token for every shorter message).

pandas is used because the book's seeded sampling is pandas' (``random_state`` → numpy
``RandomState``), so the same seed gives the same rows. It is a dependency of ``datasets``.
"""

from __future__ import annotations

import io
import logging
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import Dataset

from gpt2_scratch.core.download import fetch_to_cache
from gpt2_scratch.core.files import path_kind, write_bytes_atomic
from gpt2_scratch.core.records import DataError
from gpt2_scratch.tokenizer import ENDOFTEXT_ID

logger = logging.getLogger(__name__)

SPAM_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
# The book's fallback copy of the same zip.
SPAM_BACKUP_URL = "https://f001.backblazeb2.com/file/LLMs-from-scratch/sms%2Bspam%2Bcollection.zip"
# Name of the data file inside the UCI zip (no extension there).
ZIP_MEMBER = "SMSSpamCollection"
# Book's label ids: ham → 0, spam → 1.
DEFAULT_LABELS = ("ham", "spam")
PAD_TOKEN_ID = ENDOFTEXT_ID  # GPT-2 has no pad token: the book pads with <|endoftext|>


class SpamDataError(DataError):
    """A data file that cannot be used; the message is one line naming file and line."""


def read_labeled_tsv(path: str | os.PathLike, labels: Sequence[str] = DEFAULT_LABELS) -> pd.DataFrame:
    """Read ``label<TAB>text`` lines into a DataFrame with columns ``Label`` and ``Text``.

    The row index is 0..N-1 in file order, exactly what
    ``pd.read_csv(path, sep="\\t", header=None, names=["Label", "Text"], quoting=csv.QUOTE_NONE)``
    gives, so seeded sampling afterwards picks the same rows as the book's pandas code.
    Only the first tab separates label from text. Blank lines are skipped.

    Raises SpamDataError (one line, with the 1-based line number) for a line without a tab,
    a label not in ``labels``, an empty text, undecodable bytes, or a file without records.
    """
    path = Path(path)
    kind = path_kind(path)
    if kind is not None:  # a named pipe would be read for ever, /dev/null as an empty file
        raise SpamDataError(f"{path}: is {kind}, not a data file; pass a label<TAB>text file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SpamDataError(f"{path}: cannot read data file ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no = raw[: e.start].count(b"\n") + 1
        raise SpamDataError(f"{path}:{line_no}: not UTF-8 text ({e.reason} at byte {e.start})") from None

    known = set(labels)
    rows_label: list[str] = []
    rows_text: list[str] = []
    # Split on "\n" only: str.splitlines() would also break on \x0b, \x1c, \u2028 … inside texts.
    for line_no, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")  # the UCI file has CRLF line ends
        if not line.strip():
            continue
        label, sep, message = line.partition("\t")
        if not sep:
            raise SpamDataError(
                f"{path}:{line_no}: no tab in line {line[:40]!r}; expected 'label<TAB>text'"
            )
        if label not in known:
            raise SpamDataError(
                f"{path}:{line_no}: unknown label {label[:40]!r}; expected one of {sorted(known)} "
                "(pass --labels to use other classes)"
            )
        if not message.strip():
            raise SpamDataError(f"{path}:{line_no}: empty text after label {label!r}")
        rows_label.append(label)
        rows_text.append(message)
    if not rows_label:
        raise SpamDataError(f"{path}:1: no records (empty file); expected 'label<TAB>text' lines")
    return pd.DataFrame({"Label": rows_label, "Text": rows_text})


def balance_by_undersampling(df: pd.DataFrame, seed: int = 123, labels: Sequence[str] | None = None) -> pd.DataFrame:
    """Undersample every class down to the size of the smallest one (the book's ``create_balanced_dataset``).

    For the two SMS classes this is exactly the book's
    ``pd.concat([df[ham].sample(n_spam, random_state=seed), df[spam]])``: larger classes are sampled
    with ``random_state=seed``; the smallest class is kept whole and unsampled; classes are
    concatenated in ``labels`` order (ham first).
    """
    labels = list(labels) if labels is not None else sorted(df["Label"].unique())
    counts = {label: int((df["Label"] == label).sum()) for label in labels}
    smallest = min(counts.values())
    if smallest == 0:
        missing = [label for label, n in counts.items() if n == 0]
        raise SpamDataError(f"cannot balance classes: no examples of {missing}")
    parts = []
    for label in labels:
        rows = df[df["Label"] == label]
        parts.append(rows if counts[label] == smallest else rows.sample(smallest, random_state=seed))
    return pd.concat(parts)


def random_split(
    df: pd.DataFrame, train_frac: float = 0.7, val_frac: float = 0.1, seed: int = 123
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Shuffle (``df.sample(frac=1, random_state=seed)``) and cut into train/val/test like the book.

    Boundaries are ``int(n * train_frac)`` and that plus ``int(n * val_frac)``; the test split
    gets the remainder (1494 rows → 1045/149/300).
    """
    df = df.sample(frac=1, random_state=seed).reset_index(drop=True)
    train_end = int(len(df) * train_frac)
    val_end = train_end + int(len(df) * val_frac)
    return df[:train_end], df[train_end:val_end], df[val_end:]


@dataclass
class SpamSplits:
    """The three splits as DataFrames (columns Label, Text) plus the label vocabulary."""

    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    labels: tuple[str, ...]

    @property
    def label2id(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))


def prepare_splits(
    path: str | os.PathLike,
    *,
    labels: Sequence[str] = DEFAULT_LABELS,
    seed: int = 123,
    balance: bool = True,
    train_frac: float = 0.7,
    val_frac: float = 0.1,
) -> SpamSplits:
    """Read, balance and split a ``label<TAB>text`` file the way chapter 6 does."""
    df = read_labeled_tsv(path, labels)
    counts = df["Label"].value_counts().to_dict()
    logger.info("read %d records from %s: %s", len(df), path, counts)
    if balance:
        df = balance_by_undersampling(df, seed=seed, labels=labels)
    train, val, test = random_split(df, train_frac, val_frac, seed=seed)
    if len(train) == 0:
        raise SpamDataError(f"{path}: only {len(df)} usable records, the training split is empty")
    return SpamSplits(train, val, test, tuple(labels))


class SpamDataset(Dataset):
    """Tokenized, padded classification examples.

    Items are dicts ``{"input_ids": LongTensor[T], "attention_mask": LongTensor[T], "labels": LongTensor[]}``
    (the default collate stacks them into [B, T] / [B]). ``max_length=None`` pads to the longest
    example of *this* split (use it for train); pass the training length for val/test, whose
    longer examples are then truncated — the book's ``SpamDataset``.
    """

    def __init__(
        self,
        df: pd.DataFrame,
        encode: Callable[[str], list[int]],
        label2id: dict[str, int],
        max_length: int | None = None,
        pad_token_id: int = PAD_TOKEN_ID,
    ):
        encoded = [encode(text) for text in df["Text"]]
        self.max_length = max_length if max_length is not None else max(len(ids) for ids in encoded)
        encoded = [ids[: self.max_length] for ids in encoded]
        n, t = len(encoded), self.max_length
        self.input_ids = torch.full((n, t), pad_token_id, dtype=torch.long)  # [N, T]
        self.attention_mask = torch.zeros((n, t), dtype=torch.long)  # [N, T], 1 = real token
        for i, ids in enumerate(encoded):
            self.input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            self.attention_mask[i, : len(ids)] = 1
        self.labels = torch.tensor([label2id[label] for label in df["Label"]], dtype=torch.long)  # [N]
        self.texts = list(df["Text"])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}

    def num_tokens(self) -> int:
        """Real (non-pad) tokens over the whole split."""
        return int(self.attention_mask.sum())


def fetch_spam_data(url: str, *, mirrors: Sequence[str] = ()) -> Path:
    """Download the data (the UCI zip, or a plain TSV) once into the cache and return the TSV's path.

    The download goes through ``core.download`` (resume, retries, mirrors; the book's backup copy of
    the UCI zip is the default URL's mirror). A zip is searched for the ``SMSSpamCollection`` member,
    which is extracted once beside it. The content must look like ``label<TAB>text`` lines (not, say,
    an HTML error page) before it is used.
    """
    download = fetch_to_cache(url, subdir="sms_spam", mirrors=mirrors,
                              offline_hint="download the SMS Spam Collection elsewhere and pass --data PATH to its TSV")
    payload = download.read_bytes()
    if payload[:4] != b"PK\x03\x04":  # not a zip: the TSV itself
        try:
            _check_tsv(payload, url)
        except SpamDataError:
            download.unlink()  # an error page must not be taken for the data next time
            raise
        return download
    tsv = download.with_name(ZIP_MEMBER + ".tsv")
    if not tsv.is_file():
        try:
            with zipfile.ZipFile(io.BytesIO(payload)) as zf:
                names = [n for n in zf.namelist() if Path(n).name in (ZIP_MEMBER, ZIP_MEMBER + ".tsv")]
                if not names:
                    raise SpamDataError(f"{url}: the zip has no {ZIP_MEMBER} member (members: {zf.namelist()[:5]})")
                member = zf.read(names[0])
        except zipfile.BadZipFile as e:
            download.unlink(missing_ok=True)  # a damaged download must not be reused
            raise SpamDataError(f"{url}: corrupt zip ({e}); run the command again to download it anew") from None
        try:
            _check_tsv(member, url)
        except SpamDataError:
            download.unlink()
            raise
        write_bytes_atomic(tsv, member)
    return tsv


def _check_tsv(payload: bytes, url: str) -> None:
    first = next((line for line in payload[:4096].split(b"\n") if line.strip()), b"")
    if b"\t" not in first:
        raise SpamDataError(f"{url}: not label<TAB>text data (starts with {first[:40]!r})")
