"""The judge's resumable answer cache: ``core.llm_work.AnswerCache`` under the judge's name.

Entries are keyed by ``cache_key`` over everything that determines the judge's answer (the record's
fields, the response(s), the judge model, the API, the prompt version and the options), so a changed
record, response, model or prompt is asked again and an unchanged one never is. What a cached value
may be (a 0..100 integer, a verdict) is checked where it is used (``eval.judge``).
"""

from __future__ import annotations

from gpt2_scratch.core.llm_work import AnswerCache as JudgeCache
from gpt2_scratch.core.llm_work import cache_key

__all__ = ["JudgeCache", "cache_key"]
