r"""Label-to-text builders: structured annotations in, texts and loss inputs out (docs/guide_annotations.rst).

A :class:`Granularity` says how one annotation field becomes text (a template, optional
per-label descriptions); a :class:`MultiGranularTextBuilder` turns a batch of annotations
(``{"disease": ["DR", "DME"], "description": "...", ...}``) into, per granularity, the texts
to encode, their de-duplicated ``unique_texts`` with an ``inverse`` index, and the ``labels``
(paired mode) or ``targets`` (bank mode) that :class:`mgll.MGLLLoss` needs.

Example:
    >>> builder = MultiGranularTextBuilder([
    ...     Granularity("disease", "This is a fundus image of {}."),
    ...     Granularity("explanation"),
    ... ])
    >>> batch = builder.build([
    ...     {"disease": ["DR", "DME"], "explanation": "hard exudates near the macula"},
    ...     {"disease": ["DME", "DR"], "explanation": "microaneurysms"},
    ...     {"disease": "AMD", "explanation": "drusen"},
    ... ])
    >>> batch["disease"].texts
    ('This is a fundus image of DME, DR.', 'This is a fundus image of DME, DR.', 'This is a fundus image of AMD.')
    >>> batch["disease"].unique_texts, batch["disease"].inverse
    (('This is a fundus image of DME, DR.', 'This is a fundus image of AMD.'), tensor([0, 0, 1]))
    >>> batch["disease"].labels  # multi-hot over classes ('AMD', 'DME', 'DR')
    tensor([[0., 1., 1.],
            [0., 1., 1.],
            [1., 0., 0.]])
    >>> encode = lambda strings: torch.randn(len(strings), 16)  # a toy text encoder
    >>> image = torch.randn(3, 16, requires_grad=True)
    >>> loss = mgll.MGLLLoss()(image, batch.encode(encode), torch.tensor(10.0), **batch.loss_kwargs())
    >>> loss.backward()
"""

from mgll.text.batch import GranularityTexts, TextBatch, encode_unique
from mgll.text.builder import MultiGranularTextBuilder
from mgll.text.granularity import UNKNOWN_KEY, Granularity  # noqa: F401  (importable)
from mgll.text.hierarchy import LabelHierarchy

__all__ = [
    "Granularity",
    "GranularityTexts",
    "LabelHierarchy",
    "MultiGranularTextBuilder",
    "TextBatch",
    "encode_unique",
]
