"""Upload a folder to the Hugging Face Hub in one commit: the model library's only publishing code.

``push_folder`` sends every file of a ``save_pretrained`` folder (never dot-files, never
``checkpoints/`` with its optimizer and RNG states) plus any extra files given (a model card, plots),
through ``huggingface_hub`` (``HfApi.create_repo``, ``create_branch``, ``create_commit``), so the token
comes from where the rest of the ecosystem finds it (``HF_TOKEN``, then the ``hf auth login`` cache)
and ``HF_ENDPOINT`` is honoured. What goes into a model card is the training side's business
(train/publish.py builds it from a run's files).

Failures are one line: no token, a malformed repo id or a repository that already exists are bad
input (``InputError``, checked before any network work); a rejected token or an unreachable Hub is a
``HubError`` (a ``Failure``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from gpt2_scratch.core.errors import Failure, InputError, one_line

logger = logging.getLogger(__name__)


class HubError(Failure):
    """The Hub refused or could not be reached; the message is one line saying what to do."""


# --------------------------------------------------------------------------------------------
# The upload
# --------------------------------------------------------------------------------------------
# Folders a training run keeps beside the model that are not part of it (optimizer states, RNG states).
SKIPPED_DIRS = ("checkpoints",)


def _model_files(model_dir: Path) -> dict[str, Path]:
    """Every file in the directory (path in repo → local path), except dot-files and checkpoints/."""
    files = {}
    for f in sorted(model_dir.rglob("*")):
        rel = f.relative_to(model_dir)
        if any(part.startswith(".") for part in rel.parts) or rel.parts[0] in SKIPPED_DIRS:
            continue
        if f.is_file():
            files[rel.as_posix()] = f
    return files


def check_repo_id(repo_id: str, flag: str = "--repo-id") -> None:
    """A model repository id the Hub would accept, checked here (huggingface_hub's own rules: characters,
    length, no "--" or ".."), so a bad one is bad input before any request or any training."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise InputError(f"{flag} {repo_id!r}: expected USER/NAME (or ORG/NAME)")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        reason = str(err).removesuffix(f": '{repo_id}'.").rstrip(".")  # the id is named once, at the front
        raise InputError(f"{flag} {repo_id!r}: not a valid Hub repo id ({one_line(reason, 200)}); choose another "
                         "name") from None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Socket-level failure classes of the HTTP client huggingface_hub uses (httpx2 in 2.x, httpx before)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module_name in ("httpx2", "httpx", "requests"):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        cls = getattr(module, "TransportError", None) or getattr(module, "RequestException", None)
        if isinstance(cls, type):
            errors.append(cls)
    return tuple(errors)


def _network_error(endpoint: str, exc: BaseException) -> HubError:
    return HubError(
        f"cannot reach the Hub at {endpoint} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
        "check your network connection or HF_ENDPOINT, then retry"
    )


def hub_token(token: str | None = None) -> str:
    """The token to push with (given, else HF_TOKEN or the `hf auth login` cache); checked first of all."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise InputError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access), "
                         "then retry")
    return token


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    extra_files: dict[str, bytes | Path] | None = None,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    exist_ok: bool = True,
    commit_message: str | None = None,
    endpoint: str | None = None,
):
    """Upload every file of ``folder`` (see ``_model_files``) plus ``extra_files`` (path in repo → bytes or a
    local file; they win over the folder's own) in one commit; returns the ``huggingface_hub.CommitInfo``.

    ``exist_ok=False`` refuses to add a commit to a repository that already exists.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    endpoint = endpoint or constants.ENDPOINT
    token = hub_token(token)  # without one nothing else is worth doing
    check_repo_id(repo_id)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder to upload")
    files: dict[str, bytes | Path] = {**_model_files(folder), **(extra_files or {})}
    operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=src if isinstance(src, bytes) else str(src))
                  for rel, src in files.items()]

    api = HfApi(endpoint=endpoint, token=token)
    where = f"{endpoint}/{repo_id}"
    try:
        try:
            api.create_repo(repo_id, private=private, exist_ok=exist_ok)
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if status == 409:
                raise InputError(f"{where} already exists; pass --exist-ok to add a commit to it (or choose another "
                                 "--repo-id)") from None
            raise
        if revision and revision != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        logger.info("uploading %d files to %s (revision %s)", len(operations), where, revision or "main")
        return api.create_commit(repo_id, operations=operations, revision=revision,
                                 commit_message=commit_message or "Upload model and model card with gpt2-scratch")
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 401:
            raise HubError(f"{where}: the Hub rejected the token (HTTP 401); check HF_TOKEN or `hf auth login`"
                           ) from None
        if status == 403:
            raise HubError(f"{where}: the token may not write here (HTTP 403); use a write token for this "
                           "namespace") from None
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HubError(f"{where}: upload failed: {first}") from None
    except _transport_errors() as e:
        raise _network_error(endpoint, e) from None
    except (RuntimeError, ValueError) as e:
        # LFS transfers wrap their failure: "Error while uploading 'model.safetensors' to the Hub." from the cause.
        if isinstance(e.__cause__, _transport_errors()):
            raise _network_error(endpoint, e.__cause__) from None
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HubError(f"{where}: upload failed: {first}") from None
