"""The one retry policy: how often, and how long apart, to try again after a transient failure.

Used by the downloader (connection errors, cut transfers, HTTP 5xx) and by the judge's HTTP client
(the same, plus 429). Waits double from ``backoff`` up to ``max_backoff``, with jitter so that
parallel workers do not retry in lockstep.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

from gpt2_scratch.core.errors import InputError


def _env_number(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        raise InputError(f"environment variable {name}={os.environ[name]!r} is not a number") from None


@dataclass
class RetryPolicy:
    """Tries per request, the pause between them, and how long to wait for an answer."""

    attempts: int = 4
    """tries in all, the first included"""
    backoff: float = 1.0
    """seconds before the second try; doubled for each further one (with jitter)"""
    max_backoff: float = 30.0
    """the longest pause between two tries"""
    timeout: float = 30.0
    """seconds to connect, and at most between two received chunks of an answer"""

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise InputError(f"retry attempts must be at least 1, got {self.attempts}")
        if not (self.backoff >= 0 and self.timeout > 0):
            raise InputError(f"retry backoff must be >= 0 and timeout > 0, got {self.backoff} and {self.timeout}")

    @classmethod
    def for_downloads(cls) -> "RetryPolicy":
        """Defaults for downloads, overridable by GPT2_SCRATCH_DOWNLOAD_ATTEMPTS/_BACKOFF/_TIMEOUT."""
        return cls(attempts=int(_env_number("GPT2_SCRATCH_DOWNLOAD_ATTEMPTS", 4)),
                   backoff=_env_number("GPT2_SCRATCH_DOWNLOAD_BACKOFF", 1.0),
                   timeout=_env_number("GPT2_SCRATCH_DOWNLOAD_TIMEOUT", 30.0))

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the second try)."""
        base = min(self.max_backoff, self.backoff * 2 ** (retry - 1))
        return base * (0.5 + random.random() / 2)
