"""The converter's error type: a weights file or folder that cannot become a model.

`ConvertError` is an `InputError` (exit status 2): a bad file, a missing or misshapen tensor, a
folder that holds no checkpoint. Its one-line message says what went wrong, where (file, tensor,
block) and what to do. A download that fails is `core.download.DownloadError`, a `Failure` (exit 1).
"""

from __future__ import annotations

from gpt2_scratch.core.errors import InputError


class ConvertError(InputError):
    """A one-line, user-actionable conversion failure."""


class BundleError(ConvertError):
    """A TensorFlow tensor bundle (model.ckpt.index / .data-*) that is damaged or unsupported."""
