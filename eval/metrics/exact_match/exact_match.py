"""Exact match between a model response and the reference output, as an ``evaluate`` metric.

Deterministic and free, a floor under the judge's score: the share of responses that equal the
reference after stripping surrounding whitespace (responses extracted the book's way keep a
leading newline), optionally ignoring case and punctuation.
"""

import string

import datasets
import evaluate

_DESCRIPTION = "Share of predictions equal to their reference after stripping whitespace."
_KWARGS = """
Args:
    predictions (list of str): model responses.
    references (list of str): reference outputs.
    ignore_case (bool): compare lower-cased text. Default False.
    ignore_punctuation (bool): drop ASCII punctuation before comparing. Default False.
Returns:
    exact_match (float): in [0, 1].
Example:
    >>> em = evaluate.load("eval/metrics/exact_match")
    >>> em.compute(predictions=["\\nParis.", "Rome"], references=["Paris.", "Milan"])
    {'exact_match': 0.5}
"""
_PUNCT = str.maketrans("", "", string.punctuation)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, ignore_case=False, ignore_punctuation=False):
        def norm(text):
            text = " ".join(text.split())
            if ignore_case:
                text = text.lower()
            if ignore_punctuation:
                text = " ".join(text.translate(_PUNCT).split())
            return text

        hits = [norm(p) == norm(r) for p, r in zip(predictions, references)]
        return {"exact_match": sum(hits) / len(hits) if hits else 0.0}
