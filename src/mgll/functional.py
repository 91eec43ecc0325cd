r"""The MGLL math as functions (docs/concepts.rst); :class:`mgll.MGLLLoss` is a thin wrapper.

Shape letters: N images, D embedding width, G granularities, K_g texts at granularity g,
C_g classes at granularity g, J groups of the smooth-KL support.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from mgll import _validation as v
from mgll import distributed
from mgll._problem import LossConfig, LossTerms, build_batch, compute_dtype
from mgll._terms import (
    pointwise_rows,
    pointwise_targets,
    scale_free,
    smooth_kl_rows,
    soft_ce_rows,
)
from mgll.backends import resolve_backend
from mgll.targets.cooc import normalize_rows
from mgll.targets.overlap import check_rules, rules_for
from mgll.targets.renamed import renamed_keyword

__all__ = ["mgll_loss", "pointwise_loss", "smooth_kl_loss", "soft_clip_loss"]


def soft_clip_loss(logits: Tensor, targets: Tensor) -> Tensor:
    r"""Soft-target CLIP loss over a co-occurrence matrix (paper eq. 1-3).

    .. math::
        L = \tfrac12\Big(\tfrac{1}{|A_r|}\sum_{i\in A_r}\sum_k -W^r_{ik}\log\operatorname{softmax}_k Z_{i\cdot}
          + \tfrac{1}{|A_c|}\sum_{k\in A_c}\sum_i -W^c_{ki}\log\operatorname{softmax}_i Z_{\cdot k}\Big)

    with :math:`W^r = C` normalised per row, :math:`W^c = C^\top` normalised per row (that is,
    C normalised per column), and anchors :math:`A_r, A_c` the rows and columns of C with a
    positive.  Rows and columns without a positive are skipped; with ``targets = I`` this is
    the standard CLIP loss.

    Args:
        logits: Z, scaled image-text similarities.
        targets: C, non-negative co-occurrence; ``C[i, k] > 0`` means text k describes image i.

    Shape:
        - logits: (N, K)
        - targets: (N, K)
        - Output: scalar

    Example:
        >>> logits = torch.randn(4, 4, requires_grad=True)
        >>> loss = soft_clip_loss(logits, torch.eye(4))
        >>> loss.backward()
    """
    v.check_logits_and_targets(logits, targets)
    z, c = _upcast(logits, targets)
    n_rows = (c.sum(1) > 0).sum().clamp_min(1)
    n_cols = (c.sum(0) > 0).sum().clamp_min(1)
    loss = 0.5 * (soft_ce_rows(z, c) / n_rows + soft_ce_rows(z.T, c.T) / n_cols)
    return loss


def pointwise_loss(
    logits: Tensor,
    targets: Tensor,
    logit_bias: Tensor | None = None,
    *,
    pointwise_target: str = "binary",
    pointwise_norm: str = "pairs",
    target: str | None = None,
    norm: str | None = None,
) -> Tensor:
    r"""Pointwise sigmoid loss over every image-text pair (paper eq. 4).

    .. math::
        L = -\frac{1}{\text{norm}}\sum_{i,k} Y_{ik}\log\sigma(Z_{ik}+b)
            + (1-Y_{ik})\log\big(1-\sigma(Z_{ik}+b)\big)

    ``pointwise_norm="pairs"`` divides by N*K, so the magnitude does not grow with the batch
    (default); ``pointwise_norm="images"`` divides by N, as the paper's eq. 4 and SigLIP do.
    The options have the names and defaults of :class:`mgll.MGLLLoss`'s.

    Args:
        logits: Z, scaled image-text similarities.
        targets: C, non-negative co-occurrence.
        logit_bias: optional scalar b added to every logit.
        pointwise_target: ``"binary"``: :math:`Y = 1[C > 0]`; ``"graded"``:
            :math:`Y = \min(C, 1)`, a soft BCE target that keeps partial weights (Jaccard
            overlaps, uncertain labels) and equals ``"binary"`` on 0/1 co-occurrence;
            ``"soft"``: Y is C normalised per row, as the authors' code does.
        pointwise_norm: ``"pairs"`` or ``"images"``.
        target, norm: the old names of ``pointwise_target`` and ``pointwise_norm`` (mgll 0.1),
            accepted with a DeprecationWarning until 0.3.

    Shape:
        - logits: (N, K)
        - targets: (N, K)
        - Output: scalar

    Example:
        >>> logits = torch.randn(4, 6, requires_grad=True)
        >>> loss = pointwise_loss(logits, torch.rand(4, 6).round(), torch.tensor(-10.0))
        >>> loss.backward()
    """
    target = renamed_keyword(
        "pointwise_loss", "target", "pointwise_target", target, pointwise_target, "binary"
    )
    norm = renamed_keyword(
        "pointwise_loss", "norm", "pointwise_norm", norm, pointwise_norm, "pairs"
    )
    v.check_logits_and_targets(logits, targets, logit_bias)
    v.check_option("pointwise_target", target)
    v.check_option("pointwise_norm", norm)
    z, c = _upcast(logits, targets)
    if logit_bias is not None:
        z = z + logit_bias.to(z.dtype).reshape(())
    y = pointwise_targets(c, target)
    denom = z.numel() if norm == "pairs" else z.shape[0]
    return pointwise_rows(z, y) / denom


def smooth_kl_loss(
    logits: Sequence[Tensor],
    owners: Sequence[Tensor | None] | None = None,
    groups: Tensor | None = None,
) -> Tensor:
    r"""Cross-granularity consistency: a Jensen-Shannon-like smooth KL (paper eq. 5-6).

    .. math::
        L = \frac1N\sum_i\sum_g \mathrm{KL}\big(Q^g_i \,\|\, M_i\big),\qquad
        M_i = \frac1G\sum_g Q^g_i,\qquad
        Q^g_i \propto \operatorname{softmax}(Z^g_{i\cdot})\,R^g S

    Each granularity gives image i a distribution over a shared support: the samples of the
    batch through the ownership :math:`R^g` (paper eq. 5-6), optionally pooled into groups by
    :math:`S` (:doc:`/smooth_kl`).  Bounded by :math:`G\log G`, never NaN.

    Args:
        logits: G logit matrices :math:`Z^g`.
        owners: per granularity :math:`R^g`, non-negative, ``owners[g][k, n] > 0`` when text k
            belongs to sample n (rows are normalised here).  None, or a None entry, means the
            paired identity (K_g = N).
        groups: S, non-negative grouping of the samples (rows normalised here); None keeps the
            samples themselves as the support.

    Shape:
        - logits[g]: (N, K_g)
        - owners[g]: (K_g, N)
        - groups: (N, J)
        - Output: scalar

    Example:
        >>> z1 = torch.randn(4, 4, requires_grad=True)
        >>> loss = smooth_kl_loss([z1, torch.randn(4, 4)])
        >>> loss.backward()
    """
    owners = v.check_smooth_kl_inputs(logits, owners, groups)
    n = logits[0].shape[0]
    dtype = compute_dtype(logits[0].dtype)
    maps = [None if r is None else normalize_rows(r.to(dtype)) for r in owners]
    if groups is not None:
        s = normalize_rows(groups.to(dtype))
        maps = [s if t is None else t @ s for t in maps]
    if len(logits) < 2:
        return logits[0].new_zeros((), dtype=dtype)
    return smooth_kl_rows([z.to(dtype) for z in logits], maps) / n


@dataclass(frozen=True)
class LossOptions(LossConfig):
    """Every option of :class:`mgll.MGLLLoss` and :func:`mgll_loss`, with its default.

    The one definition of the options: the term settings are the fields of
    :class:`~mgll._problem.LossConfig` (what the backends read), then the call's own
    (``normalize``, ``backend``, ``validate``) and the distributed ones of
    :mod:`mgll.distributed`.  Construction checks every value once (the messages of
    docs/errors.rst) and stores it normalised (floats, tuples); :class:`mgll.MGLLLoss` keeps
    the result and uses it on every call, and ``mgll_loss(**options)`` builds one per call.  A
    new option is a field here (or in ``LossConfig``) plus its check in ``__post_init__``.
    """

    normalize: bool = True
    backend: str = "auto"
    validate: bool = True
    gather_with_grad: bool = False
    local_loss: bool = False
    rank: int | None = None
    world_size: int | None = None
    group: object = None

    def __post_init__(self) -> None:
        def store(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        for name in ("soft_clip_weight", "pointwise_weight"):  # one, or one per granularity
            store(name, v.check_term_weight(name, getattr(self, name)))
        store("smooth_kl_weight", v.check_weight("smooth_kl_weight", self.smooth_kl_weight))
        for name in ("pointwise_target", "pointwise_norm", "smooth_kl_support"):
            v.check_option(name, getattr(self, name))
        store("granularity_weights", v.check_granularity_weights(self.granularity_weights))
        store("overlap", check_rules(self.overlap))
        check_backend(self.backend)
        v.check_flag("normalize", self.normalize)
        v.check_flag("validate", self.validate)
        # not a field: derived, and left out of comparisons and the repr
        store("_distributed", distributed.check_options(
            self.gather_with_grad, self.local_loss, self.rank, self.world_size, self.group
        ))  # fmt: skip

    @classmethod
    def from_keywords(cls, caller: str, options: dict[str, object]) -> LossOptions:
        """``cls(**options)``, an unknown name reported as Python reports it for ``caller``."""
        for name in options:
            if name not in _OPTION_NAMES:
                raise TypeError(f"{caller}() got an unexpected keyword argument {name!r}")
        return cls(**options)

    @property
    def distributed_options(self) -> distributed.DistributedOptions:
        return self._distributed

    def settings(self) -> dict[str, object]:
        """Every option by name, in the order of the signature (shallow: ``group`` as given)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


_OPTION_NAMES = frozenset(f.name for f in fields(LossOptions))


def option_parameters() -> list[inspect.Parameter]:
    """The options as keyword-only parameters with their defaults (the public signatures)."""
    # what a caller may pass (checked, then stored as a tuple)
    hints = {
        "granularity_weights": "Sequence[float] | None",
        "soft_clip_weight": "float | Sequence[float]",
        "pointwise_weight": "float | Sequence[float]",
        "overlap": "str | Sequence[str]",
        "group": object,
    }
    return [
        inspect.Parameter(
            f.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=f.default,
            annotation=hints.get(f.name, f.type),
        )
        for f in fields(LossOptions)
    ]


def with_options(function):
    """Spell out ``function``'s ``**options`` in its signature (the docs, ``help``, IDEs).

    ``__wrapped__`` names a source without defaults, so that tools which re-read the defaults
    from the source text (Sphinx's ``autodoc_preserve_defaults``) keep this signature.
    """
    sig = inspect.signature(function)
    params = [p for p in sig.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    last = [p for p in params if p.name == "output_dict"]
    rest = [p for p in params if p.name != "output_dict"]
    function.__signature__ = sig.replace(parameters=[*rest, *option_parameters(), *last])
    function.__wrapped__ = _spelled_out
    return function


def _spelled_out(*args, **options):  # pragma: no cover - never called, see with_options
    """A function whose parameters :func:`with_options` writes out from :class:`LossOptions`."""
    raise NotImplementedError


@with_options
def mgll_loss(
    image_features: Tensor,
    text_features: Sequence[Tensor],
    logit_scale: Tensor,
    logit_bias: Tensor | None = None,
    *,
    labels: Sequence[Tensor] | None = None,
    targets: Sequence[Tensor] | None = None,
    output_dict: bool = False,
    **options,
) -> Tensor | dict[str, Tensor]:
    r"""The full MGLL loss from features (:doc:`/concepts`); :class:`mgll.MGLLLoss` gives the
    formula and the options.

    Shape:
        - image_features: (N, D)
        - text_features[g]: (N, D) paired, (K_g, D) bank
        - labels[g]: (N,) integer ids or (N, C_g) multi-hot, bool/integer 0/1 or float label
          probabilities in [0, 1] (paired)
        - targets[g]: (N, K_g) non-negative co-occurrence (bank)
        - Output: scalar, or a dict of the three weighted terms

    ``overlap`` (``"any"``, ``"count"``, ``"jaccard"``, or one per granularity) is how two
    multi-hot label vectors of a paired batch become their co-occurrence weight, the rules of
    :func:`mgll.targets.from_multi_hot`; integer ids always mean "equal id", and bank
    ``targets`` are used as given.

    Under ``torch.distributed`` the loss is that of the global batch; ``gather_with_grad``,
    ``local_loss``, ``rank``, ``world_size`` and ``group`` are described in :mod:`mgll.distributed`.

    Raises:
        TypeError, ValueError: on bad input, before any compute, naming the argument, what was
            expected and what was received (the "Errors and guarantees" page lists every check;
            ``validate=False`` skips those that read tensor values).

    Example:
        >>> img, txt = torch.randn(8, 32, requires_grad=True), torch.randn(8, 32)
        >>> ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 1])
        >>> loss = mgll_loss(img, [txt, txt], torch.tensor(10.0), labels=[ids, ids % 2])
        >>> loss.backward()
    """
    options = LossOptions.from_keywords("mgll_loss", options)
    return loss_with(
        image_features, text_features, logit_scale, logit_bias, labels, targets, output_dict,
        options,
    )  # fmt: skip


def loss_with(
    image_features: Tensor,
    text_features: Sequence[Tensor],
    logit_scale: Tensor,
    logit_bias: Tensor | None,
    labels: Sequence[Tensor] | None,
    targets: Sequence[Tensor] | None,
    output_dict: bool,
    options: LossOptions,
) -> Tensor | dict[str, Tensor]:
    """:func:`mgll_loss` with options already checked (what :class:`mgll.MGLLLoss` calls)."""
    config, backend, normalize = options, options.backend, options.normalize
    validate, dist_options = options.validate, options.distributed_options
    # under torch.distributed a rank may hold no sample (the last, uneven batch); the global
    # batch must not be empty (checked on every rank alike once the sizes are gathered)
    empty_ok = distributed.resolve_group(dist_options) is not None
    texts = v.check_features(image_features, text_features, allow_empty=empty_ok)
    v.check_scale_and_bias(logit_scale, logit_bias, image_features)
    mode, values = v.check_labels_or_targets(labels, targets, image_features, texts)
    v.check_granularity_count(config.granularity_weights, len(texts))
    v.check_term_weight_count("soft_clip_weight", config.soft_clip_weight, len(texts))
    v.check_term_weight_count("pointwise_weight", config.pointwise_weight, len(texts))
    v.check_reference(config.smooth_kl_reference, len(texts))
    rules = rules_for(config.overlap, len(texts))
    if torch.compiler.is_compiling() and _compiles_as_one_op(
        backend, dist_options, texts, like=image_features
    ):
        from mgll.backends import _fused_op  # one registered op: no graph break (docs/backends.rst)

        terms = LossTerms(
            *_fused_op.loss_terms(
                image_features,
                texts,
                logit_scale,
                logit_bias,
                values,
                mode,
                config,
                normalize,
                validate,
            )
        )
        return terms._asdict() if output_dict else terms[0] + terms[1] + terms[2]
    if validate:  # the value checks: one host sync (docs/errors.rst)
        v.check_values(
            v.batch_conditions(
                image_features, texts, logit_scale, logit_bias, mode, values, normalize
            )
        )
    batch = distributed.gather_batch(image_features, texts, mode, values, dist_options, rules)
    problem = build_batch(
        batch.image, batch.texts, logit_scale, logit_bias, mode, batch.values, config, normalize,
        validate, bound=_runs_fused(backend, batch),
    )  # fmt: skip
    if batch.cols is not None:  # distributed local loss: this rank's rows and columns only
        problem.rows, problem.cols = batch.rows, batch.cols
    terms = _run(problem, config, backend, image_features)
    if batch.loss_factor != 1:
        terms = LossTerms(*(batch.loss_factor * t for t in terms))
    if output_dict:
        return terms._asdict()
    return terms.soft_clip_loss + terms.pointwise_loss + terms.smooth_kl_loss


def _compiles_as_one_op(backend: str, options, texts, like: Tensor) -> bool:
    """Under torch.compile: whether this call is the fused backend on one process."""
    from mgll.backends import fused_would_run

    if backend not in ("auto", "fused") or distributed.resolve_group(options) is not None:
        return False
    return backend == "fused" or fused_would_run(like, texts)


def _runs_fused(backend: str, batch) -> bool:
    """Whether ``backend`` is, or ``"auto"`` picks, ``"fused"``: it shifts by the logit bound."""
    from mgll.backends import fused_would_run

    auto = backend == "auto" and fused_would_run(batch.image, batch.texts, batch.rows, batch.cols)
    return backend == "fused" or auto


def _run(problem, config: LossConfig, backend: str, like: Tensor) -> LossTerms:
    with torch.autocast(like.device.type, enabled=False):
        terms = resolve_backend(backend, problem)(problem, config)
        # a term that is off (weight 0) is a differentiable zero on every backend: backward()
        # on the loss works and gives zero gradients, whatever the weights
        if not all(t.requires_grad for t in terms):
            anchor = _graph_zero(problem)
            terms = LossTerms(*(t if t.requires_grad else t + anchor for t in terms))
    # float32 (or wider) for half inputs and under autocast, as open_clip's losses: a half loss
    # rounds, and overflows once a GradScaler multiplies it by 65536 (docs/errors.rst)
    return LossTerms(*(t.to(compute_dtype(like.dtype)) for t in terms))


def _graph_zero(problem) -> Tensor:
    """An exact 0 connected to every differentiable input (sums of empty slices)."""
    leaves = [problem.image, *problem.texts, problem.scale.reshape(1)]
    if problem.bias is not None:
        leaves.append(problem.bias.reshape(1))
    return sum((x[:0].sum() for x in leaves), problem.scale.new_zeros(()))


def check_backend(name: str) -> None:
    from mgll.backends import BACKENDS

    # Every registered name is accepted; one that cannot run here (see available_backends)
    # raises its own error on first use, saying what is missing.
    if name not in ("auto", *BACKENDS):
        raise ValueError(f"`backend` must be one of {('auto', *BACKENDS)}, got {name!r}")


def _upcast(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Logits and targets in the compute dtype; targets brought to a maximum in [0.5, 1)."""
    dtype = compute_dtype(logits.dtype)
    return logits.to(dtype), scale_free(targets.to(dtype))
