"""The one downloader: weights and data sets arrive whole and verified, or not at all.

For each file:
- a file already under its final name is complete (only a verified download is ever renamed
  there), so it is used without touching the network: a filled cache works offline;
- bytes go to `NAME.part`; a partial file is resumed with an HTTP Range request. A server that
  ignores Range (answers 200 instead of 206) restarts the file from byte 0 instead of appending;
- connection errors, cut transfers and 5xx answers are retried with backoff (`core.retry`); a 4xx,
  or retries used up, moves on to the next mirror;
- the result is renamed into place only when its size matches the server's and, where known, its
  checksum (a sha256 we know, else the server's Content-MD5); a wrong checksum deletes the partial
  file, so nothing that looks complete is left behind;
- when no URL answers at all, one line says which URL failed and what to do offline.

`fetch_to_cache` puts a file under the project's cache folder (`core.files.cache_root()`), which is
what data sets given as URLs use; OpenAI's checkpoints go through `download_file` into their own folder.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlparse

import requests
from tqdm.auto import tqdm

from gpt2_scratch.core.errors import Failure
from gpt2_scratch.core.files import cache_root
from gpt2_scratch.core.retry import RetryPolicy

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # 1 MiB per write: progress updates often, memory stays flat


class DownloadError(Failure):
    """A file that could not be downloaded (server error, bad checksum, offline).

    `url` is the first URL tried, `reason` why it failed, `offline` true when no server answered.
    """

    def __init__(self, message: str, *, url: str | None = None, reason: str | None = None, offline: bool = False):
        super().__init__(message)
        self.url, self.reason, self.offline = url, reason, offline


# Owner/name, as the Hugging Face Hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` has the shape of a Hub repo id (``owner/name``); says nothing of whether it exists."""
    return bool(_HUB_ID.match(spec))


class _TryNextURL(Exception):
    """This URL cannot serve the file (4xx, or retries used up); the reason is the message."""


class _Retry(Exception):
    """A transient failure: try the same URL again after backing off."""


class _Unreachable(_Retry):
    """Could not even connect (DNS, refused, unreachable): retried too, and counted as offline."""


def hub_resolves(endpoint: str) -> bool:
    """Whether the Hub's host name resolves here (always assumed behind a proxy, which resolves it). Without it,
    huggingface_hub and datasets retry every request for ~25 s, logging each attempt, before they give up."""
    import socket
    import urllib.request

    parts = urlparse(endpoint)
    if not parts.hostname or urllib.request.getproxies().get(parts.scheme):
        return True
    try:
        socket.getaddrinfo(parts.hostname, None)
    except (OSError, UnicodeError):
        return False
    return True


@contextmanager
def hub_offline_when_unreachable() -> Iterator[bool]:
    """Inside, ``datasets`` and huggingface_hub work from their caches only when the Hub's host does not resolve
    (what HF_HUB_OFFLINE=1 does, set for the block): a cached data set still loads, an uncached one fails at
    once instead of after ~25 s of retries. Yields whether the Hub was found unreachable (for the message)."""
    import datasets.config  # deferred: heavy
    from huggingface_hub import constants

    unreachable = not constants.HF_HUB_OFFLINE and not hub_resolves(constants.ENDPOINT)
    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    if unreachable:
        datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield unreachable
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(CHUNK * 8):
            h.update(block)
    return h.hexdigest()


def _server_md5(response: requests.Response) -> str | None:
    """The whole file's MD5 if the server states it (Azure Blob: Content-MD5 on full reads,
    x-ms-blob-content-md5 on ranged ones), as hex."""
    value = response.headers.get("x-ms-blob-content-md5")
    if value is None and response.status_code == 200:
        value = response.headers.get("Content-MD5")
    if not value:
        return None
    try:
        return base64.b64decode(value).hex()
    except ValueError:
        return None


def _fetch_once(session: requests.Session, url: str, part: Path, policy: RetryPolicy,
                progress: bool, desc: str) -> tuple[int, str | None]:
    """One GET into `part`, resuming it if it exists. Returns (total size, server md5 or None)."""
    have = part.stat().st_size if part.exists() else 0
    # identity: byte offsets (Range, Content-Length) must count the file's bytes, not gzip's.
    headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
    try:
        response = session.get(url, headers=headers, stream=True, timeout=policy.timeout)
    except (requests.ConnectionError, requests.ConnectTimeout) as e:
        raise _Unreachable(_short(e)) from None
    except requests.Timeout:
        raise _Retry("no answer within the timeout") from None
    with response:
        status = response.status_code
        if status == 416 and have:
            # Our partial file is not a prefix the server can continue (e.g. the file changed).
            part.unlink()
            raise _Retry("server refused to resume; restarting")
        if status >= 500 or status == 429:
            raise _Retry(f"HTTP {status}")
        if status >= 400:
            raise _TryNextURL(f"HTTP {status}")
        if status == 206:
            start = _content_range_start(response)
            if start != have:
                part.unlink()
                raise _Retry(f"server resumed at byte {start}, not {have}; restarting")
            total = _content_range_total(response)
            mode = "ab"
        elif status == 200:
            if have:
                log.info("%s ignored the Range request; downloading %s from the start", url, desc)
            have, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
        else:
            raise _TryNextURL(f"unexpected HTTP {status}")
        md5 = _server_md5(response)

        got = have
        with open(part, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                         unit_divisor=1024, desc=desc, disable=not progress) as bar:
            try:
                for chunk in response.iter_content(CHUNK):
                    f.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
                raise _Retry(f"transfer cut at byte {got} ({_short(e)})") from None
        if total is not None and got != total:
            raise _Retry(f"transfer ended at byte {got} of {total}")
        return got, md5


def _content_range_start(response: requests.Response) -> int | None:
    value = response.headers.get("Content-Range", "")  # "bytes 100-199/200"
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _content_range_total(response: requests.Response) -> int | None:
    value = response.headers.get("Content-Range", "")
    total = value.rsplit("/", 1)[-1]
    return int(total) if total.isdigit() else None


# Connection failures that waiting will not fix.
_PERMANENT = ("Name or service not known", "Network is unreachable")


def _short(e: Exception) -> str:
    """The innermost reason of a requests/urllib3 error, on one line."""
    text = str(e)
    for marker in ("Connection refused", "Name or service not known", "Temporary failure in name resolution",
                   "Network is unreachable", "timed out", "Connection reset", "Connection aborted",
                   "IncompleteRead", "Response ended prematurely"):
        if marker in text:
            return marker
    return text.splitlines()[0][:120] if text else type(e).__name__


def download_file(urls: Sequence[str], dest: str | Path, *, sha256: str | None = None,
                  policy: RetryPolicy | None = None, progress: bool = True,
                  session: requests.Session | None = None,
                  offline_hint: str = "download it elsewhere and pass the local file instead") -> Path:
    """Download one file from the first URL that serves it correctly; returns `dest`.

    Raises DownloadError with one line naming every URL's failure and ending with ``offline_hint``
    (what to do without the network: the caller knows which flag takes a local copy).
    """
    dest = Path(dest)
    policy = policy or RetryPolicy.for_downloads()
    if dest.is_file():
        if sha256 is None or _file_digest(dest, "sha256") == sha256:
            log.info("%s: already complete, skipping", dest)
            return dest
        log.warning("%s: sha256 does not match, downloading it again", dest)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    own_session = session is None
    session = session or requests.Session()
    failures: list[tuple[str, str]] = []  # (url, why it failed)
    reached_any = False  # did any server answer at all? if not, we are offline
    try:
        for url in urls:
            reason = "not tried"
            for attempt in range(policy.attempts):
                if attempt:
                    time.sleep(policy.delay(attempt))
                try:
                    size, md5 = _fetch_once(session, url, part, policy, progress, dest.name)
                except _Retry as e:
                    reached_any |= not isinstance(e, _Unreachable)
                    reason = str(e)
                    log.warning("%s: %s (attempt %d/%d)", url, reason, attempt + 1, policy.attempts)
                    if isinstance(e, _Unreachable) and reason in _PERMANENT:
                        break  # an unknown host stays unknown: go to the next mirror now
                    continue
                except _TryNextURL as e:
                    reached_any = True
                    reason = str(e)
                    log.warning("%s: %s; trying the next mirror", url, reason)
                    break
                reached_any = True
                # Complete as far as the size goes; now the content.
                expected, algorithm = (sha256, "sha256") if sha256 else (md5, "md5")
                if expected is not None:
                    actual = _file_digest(part, algorithm)
                    if actual != expected:
                        part.unlink()  # resuming a wrong file would only extend it
                        reason = f"{algorithm} {actual[:12]}… is not the expected {expected[:12]}…"
                        log.warning("%s: %s", url, reason)
                        break
                os.replace(part, dest)
                log.info("%s: downloaded %d bytes from %s", dest, size, url)
                return dest
            failures.append((url, reason))
    finally:
        if own_session:
            session.close()
    if not reached_any:
        mirrors = f" nor {len(urls) - 1} mirror{'s' if len(urls) > 2 else ''}" if len(urls) > 1 else ""
        raise DownloadError(f"cannot reach {urls[0]} ({failures[0][1]}){mirrors}: offline? {offline_hint}",
                            url=urls[0], reason=failures[0][1], offline=True)
    kept = f"; the partial file {part} is kept for resuming" if part.exists() else ""
    raise DownloadError(f"could not download {dest.name}: "
                        + "; ".join(f"{u} ({why})" for u, why in failures)
                        + f"{kept}; retry later, or {offline_hint}",
                        url=urls[0], reason=failures[0][1])


def fetch_to_cache(url: str, *, subdir: str, mirrors: Sequence[str] = (), sha256: str | None = None,
                   offline_hint: str = "download it elsewhere and pass the local file instead",
                   progress: bool = True) -> Path:
    """``url`` (or a mirror) downloaded once into ``cache_root()/subdir/<file name>``; the cached path.

    A cached copy is used without the network (checked against ``sha256`` when one is known).
    """
    name = unquote(Path(urlparse(url).path).name) or "download"
    return download_file([url, *mirrors], cache_root() / subdir / name, sha256=sha256, progress=progress,
                         offline_hint=offline_hint)
