"""The judge's names for the one client of model servers (``core.llm_http``, ``core.llm_client``).

The judge and ``gpt2-scratch data`` talk to servers through the same code; this module keeps the names
the judge has always used (``make_judge``, ``OllamaJudge``, ``JudgeError``) for code that imports them.
"""

from __future__ import annotations

from gpt2_scratch.core.http_watch import _lines
from gpt2_scratch.core.llm_client import OllamaClient as OllamaJudge
from gpt2_scratch.core.llm_client import OpenAIClient as OpenAIJudge
from gpt2_scratch.core.llm_client import make_client as make_judge
from gpt2_scratch.core.llm_http import MAX_REPLY_BYTES, MAX_REPLY_TOKENS, REQUEST_TIMEOUT, Cancelled, Reply, RequestFailed
from gpt2_scratch.core.llm_http import ServerError as JudgeError
from gpt2_scratch.core.llm_http import ServerInputError as JudgeInputError
from gpt2_scratch.core.retry import RetryPolicy

__all__ = ["MAX_REPLY_BYTES", "MAX_REPLY_TOKENS", "REQUEST_TIMEOUT", "Cancelled", "JudgeError", "JudgeInputError",
           "OllamaJudge", "OpenAIJudge", "Reply", "RequestFailed", "RetryPolicy", "_lines", "make_judge"]
