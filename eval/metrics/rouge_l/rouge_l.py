"""ROUGE-L (longest common subsequence) between responses and references, as an ``evaluate`` metric.

Uses Google's ``rouge_score`` package (the implementation behind the Hub's "rouge" metric) with its
default tokenizer; reports the mean F1, precision and recall over the records.
"""

import datasets
import evaluate
from rouge_score import rouge_scorer

_DESCRIPTION = "Mean ROUGE-L F1/precision/recall of predictions against references (rouge_score)."
_KWARGS = """
Args:
    predictions (list of str): model responses.
    references (list of str): reference outputs.
    use_stemmer (bool): Porter-stem words before matching. Default False.
Returns:
    rougeL (float): mean F1 in [0, 1]; rougeL_precision, rougeL_recall likewise.
Example:
    >>> rl = evaluate.load("eval/metrics/rouge_l")
    >>> rl.compute(predictions=["the cat sat"], references=["the cat sat down"])["rougeL"]
    0.857...
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class RougeL(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lin, C.-Y. (2004). ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, use_stemmer=False):
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
        scores = [scorer.score(r, p)["rougeL"] for p, r in zip(predictions, references)]  # (target, prediction)
        n = max(len(scores), 1)
        return {
            "rougeL": sum(s.fmeasure for s in scores) / n,
            "rougeL_precision": sum(s.precision for s in scores) / n,
            "rougeL_recall": sum(s.recall for s in scores) / n,
        }
