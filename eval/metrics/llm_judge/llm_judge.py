"""The chapter-7 LLM judge as an ``evaluate`` metric: mean 0-100 score from Ollama (or OpenAI-compatible).

A thin wrapper over ``eval.judge.score_records``, so it has the same prompt, options, retries,
concurrency and cache as ``python eval/judge.py``. The judge needs the record's instruction and
input besides the response and the reference output, hence the two extra features. Failed
records (unparsable after retries, or unreachable) are not averaged; they are returned in
``failures`` with their reason, and counted in ``num_scores`` of ``num_records``.
"""

import datasets
import evaluate

from gpt2_scratch.eval.judge import score_records
from gpt2_scratch.eval.judge_cache import JudgeCache
from gpt2_scratch.eval.judge_client import MAX_REPLY_TOKENS, REQUEST_TIMEOUT, RetryPolicy, make_judge

_DESCRIPTION = "Mean 0-100 score an LLM judge (Ollama or OpenAI-compatible) gives the responses."
_KWARGS = """
Args:
    predictions (list of str): model responses.
    references (list of str): reference outputs (the records' "output").
    instructions (list of str): the records' "instruction".
    inputs (list of str): the records' "input" ("" when none).
    model (str): judge model. Default "llama3".
    host (str): server URL. Default "http://localhost:11434".
    api (str): "ollama" or "openai". Default "ollama".
    workers (int): concurrent requests. Default 4.
    cache (str or None): JSONL answer cache path (resumable). Default None.
    timeout (float), request_timeout (float), max_reply_tokens (int), retries (int),
        retry_backoff (float), parse_retries (int): as in eval/judge.py.
    preflight (bool): check the server and model first. Default True.
Returns:
    judge_score (float): mean of the parsed scores; num_scores, num_records (int);
    scores (list of int or None, per record); failures (list of {index, reason, reply}).
Example:
    >>> judge = evaluate.load("eval/metrics/llm_judge")
    >>> judge.compute(predictions=[...], references=[...], instructions=[...], inputs=[...])
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class LLMJudge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Raschka, S. (2024). Build a Large Language Model (From Scratch), ch. 7.",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string"),
                                        "instructions": datasets.Value("string"),
                                        "inputs": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, instructions, inputs, model="llama3",
                 host="http://localhost:11434", api="ollama", workers=4, cache=None, timeout=120.0,
                 request_timeout=REQUEST_TIMEOUT, max_reply_tokens=MAX_REPLY_TOKENS, retries=4,
                 retry_backoff=1.0, parse_retries=2, preflight=True):
        judge = make_judge(api, host, model, timeout=timeout, request_timeout=request_timeout,
                           max_reply_tokens=max_reply_tokens,
                           retry=RetryPolicy(attempts=retries + 1, backoff=retry_backoff))
        if preflight:
            judge.preflight()
        records = [{"instruction": i, "input": x, "output": r, "model_response": p}
                   for p, r, i, x in zip(predictions, references, instructions, inputs)]
        outcomes = score_records(records, judge, response_key="model_response",
                                 cache=JudgeCache(cache) if cache else None, workers=workers,
                                 parse_retries=parse_retries, progress=False)
        scores = [o["score"] for o in outcomes]
        ok = [s for s in scores if s is not None]
        return {
            "judge_score": sum(ok) / len(ok) if ok else float("nan"),
            "num_scores": len(ok),
            "num_records": len(records),
            "scores": scores,
            "failures": [{"index": o["index"], "reason": o["reason"], "reply": o["reply"]}
                         for o in outcomes if o["status"] == "failed"],
        }
