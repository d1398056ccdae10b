"""The one exception type of the converter package.

Every failure a user can cause (a bad file, a missing tensor, no network) is raised as
`ConvertError` with a one-line message saying what went wrong, where (file, tensor, block, URL)
and what to do. The CLI prints that line and exits 2; library callers (train/, eval/) catch it
the same way.
"""

from __future__ import annotations


class ConvertError(RuntimeError):
    """A one-line, user-actionable conversion or download failure."""


class BundleError(ConvertError):
    """A TensorFlow tensor bundle (model.ckpt.index / .data-*) that is damaged or unsupported."""


class DownloadError(ConvertError):
    """A file that could not be downloaded (server error, bad checksum, offline).

    `url` is the first URL tried, `reason` why it failed, `offline` true when no server answered.
    """

    def __init__(self, message: str, *, url: str | None = None, reason: str | None = None, offline: bool = False):
        super().__init__(message)
        self.url, self.reason, self.offline = url, reason, offline
