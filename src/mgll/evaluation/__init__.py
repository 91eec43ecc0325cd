r"""Held-out metrics that no compared loss trains on directly: the evaluation layer.

Pure torch, float64 throughout; nothing here is imported by the loss.  Every metric skips the
queries or classes it cannot score (no positive, or no negative) instead of counting them as
0 or 1, and says so in its docstring.

* :func:`linear_probe` / :func:`linear_probe_auroc`: logistic regression on frozen features,
  standardised on the probe set, with the L2 strength chosen by k-fold cross-validation
  (a fixed penalty on unit-norm features binds hardest on embeddings that sit in a narrow
  cone, and turns the probe into a copy of zero-shot).
* :func:`macro_auroc`: the mean of the per-class AUROCs that exist.
* :func:`caption_marginal_scores`: zero-shot class scores as a model's probability summed
  over the captions of a bank that contain the class (the other protocol next to class
  prompts, :class:`mgll.ZeroShotClassifier`; each suits a different loss, so report both).
* :func:`relevance`, :func:`mean_average_precision`, :func:`ndcg`: retrieval with binary
  (superset, exact set, shared label) or graded (Jaccard) relevance.

See the "Evaluation" page of the docs for the protocol, and the digits demo for how the
metrics compare CLIP and MGLL.  Shape letters: M images scored, D feature width, C classes,
Q queries, K captions of a bank.
"""

from mgll.evaluation.auroc import macro_auroc, multilabel_auroc
from mgll.evaluation.probe import linear_probe, linear_probe_auroc
from mgll.evaluation.retrieval import mean_average_precision, ndcg, relevance
from mgll.evaluation.zeroshot import ZeroShotClassifier, caption_marginal_scores

__all__ = [
    "ZeroShotClassifier",
    "caption_marginal_scores",
    "linear_probe",
    "linear_probe_auroc",
    "macro_auroc",
    "mean_average_precision",
    "multilabel_auroc",
    "ndcg",
    "relevance",
]
