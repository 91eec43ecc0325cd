"""``MGLLLoss``: the module interface, a thin wrapper over :func:`mgll.functional.mgll_loss`."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from mgll.functional import LossOptions, loss_with, with_options


class MGLLLoss(nn.Module):
    r"""Multi-Granular Language Learning loss: a drop-in replacement for a CLIP loss.

    .. math::
        L = \alpha_1\sum_g\lambda_g L^g_{\mathrm{sCLIP}} + \alpha_2\sum_g\lambda_g L^g_P
            + \alpha_3 L_{\mathrm{sKL}}

    Li, Wang, Farsiu, Kinahan, *Boosting Medical Visual Understanding From Multi-Granular
    Language Learning*, ICLR 2026 (arXiv:2511.15943).

    Args:
        soft_clip_weight: :math:`\alpha_1`, weight of the soft-target CLIP term: one float, or
            a sequence of one per granularity (:math:`\alpha_{1,g}`, inside the sum over g).
        pointwise_weight: :math:`\alpha_2`, weight of the pointwise sigmoid term, one float or
            one per granularity.  Drop a coarse granularity's pointwise term (e.g.
            ``(1.0, 0.0)``, coarse last) when most image-caption pairs there are positives:
            it then mostly learns "everything matches" (:ref:`concepts-term-weights`).  A 0 at
            g removes that granularity's term.
        smooth_kl_weight: :math:`\alpha_3`, weight of the cross-granularity smooth KL.
        granularity_weights: :math:`\lambda_g`, one per granularity (default all 1).
        pointwise_target: ``"binary"`` (:math:`1[C>0]`, default: every pair with a positive
            weight is a positive, in both input modes), ``"graded"`` (:math:`\min(C, 1)`, a soft
            BCE target for partial weights such as Jaccard overlaps or uncertain labels; equal
            to ``"binary"`` on 0/1 co-occurrence) or ``"soft"`` (C normalised per row, as the
            authors' code).
        pointwise_norm: ``"pairs"`` (divide by N*K_g, default) or ``"images"`` (divide by N).
        smooth_kl_support: ``"coarse"`` (default: pool the samples by a coarse granularity
            before comparing; in the demo it beat the paper's form at three granularities and
            lost to it in one two-granularity setting: :doc:`/smooth_kl`, :doc:`/demo`) or
            ``"samples"`` (the paper's eq. 5-6).
        smooth_kl_reference: the granularity whose groups pool the samples for
            ``"coarse"``; default: the coarsest in the batch (fewest distinct ids or label
            sets).
        overlap: how two multi-hot label vectors of a paired batch become a co-occurrence
            weight: ``"jaccard"`` (default: shared over present labels; it measured best on the
            digits demo, :doc:`/demo`), ``"any"`` (1 when they share a label, the rule
            before the default changed) or ``"count"`` (the number of shared labels), or a
            sequence with one rule per granularity.  Entries may be label probabilities in [0, 1] (uncertain
            labels); the rules generalise as documented in
            :func:`mgll.targets.from_multi_hot`.  Integer ids always mean "equal id"; bank
            ``targets`` are used as given.
        normalize: L2-normalise the features (default True); a bool.
        backend: ``"auto"`` or a name from :func:`mgll.available_backends`.
        validate: check the input *values* (finite features with a non-zero norm, a positive
            finite logit scale, non-negative labels and targets) before computing; this costs
            one host synchronisation per call.  Turn off only on a hot path whose inputs are
            known to be valid; types, shapes, dtypes and devices are always checked.  See the
            "Errors and guarantees" page.
        gather_with_grad: under ``torch.distributed``, gather the features with their
            gradients (needed by ``local_loss``); without it every rank computes the full loss
            and its own features' gradient is scaled so that DDP's averaging stays exact.
        local_loss: each rank computes only its own image rows and text columns against the
            global batch (O(N_r x N) per rank); needs ``gather_with_grad=True``.
        rank: this process's rank; default and check: the group's.
        world_size: the number of processes; default and check: the group's size.  1 never
            gathers; more than 1 without an initialised process group is an error.
        group: the process group to gather over (default: the default group).  With none
            initialised, or a group of size 1, nothing is gathered.  See
            :mod:`mgll.distributed` for what each rank returns and why DDP's averaged
            gradients equal those of one process on the concatenated batch.

    Shape:
        - image_features: (N, D)
        - text_features: a sequence of G tensors, (N, D) paired or (K_g, D) bank
        - logit_scale: scalar, already exponentiated; logit_bias: scalar or None
        - labels[g]: (N,) integer ids or (N, C_g) multi-hot (paired mode)
        - targets[g]: (N, K_g) non-negative co-occurrence (bank mode)
        - Output: scalar, or with ``output_dict=True`` the dict ``soft_clip_loss``,
          ``pointwise_loss``, ``smooth_kl_loss`` (each weighted; they sum to the loss)

    Warning:
        **Label ids must mean the same class on every rank.**  Under ``torch.distributed`` the
        loss gathers ``labels`` and compares their integer ids across ranks.  Numbering each
        batch's labels on its own (``torch.unique(..., return_inverse=True)`` or a
        ``{label: index}`` dict per batch) makes different classes share an id and trains on
        wrong targets with no error (the builder does this for a granularity without declared
        ``classes``).  Use the declared ``classes`` of :class:`mgll.text.Granularity` (then
        the builder's ids are fixed), :func:`mgll.targets.stable_ids` for
        label strings, or one vocabulary built once for the dataset; see the distributed guide.

    Returns:
        The scalar loss (or the dict of terms) in float32 for float16/bfloat16 inputs and under
        autocast, as open_clip's losses; float64 for float64 inputs.

    Raises:
        TypeError, ValueError: on bad input, before any compute (see the "Errors and
            guarantees" page).
        RuntimeError: on ``create_graph=True`` with ``backend="fused"``, ``"tiled"``,
            ``"triton"`` or ``"auto"``: they give exact first-order gradients only; use
            ``backend="reference"`` for second-order gradients.

    Example:
        >>> loss_fn = MGLLLoss()
        >>> image = torch.randn(8, 32, requires_grad=True)
        >>> texts = [torch.randn(8, 32), torch.randn(8, 32)]  # G=2 granularities, paired
        >>> ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 1])
        >>> loss = loss_fn(image, texts, torch.tensor(10.0), labels=[ids, ids % 2])
        >>> loss.backward()
    """

    @with_options
    def __init__(self, **options) -> None:
        super().__init__()
        #: The checked options (:class:`mgll.functional.LossOptions`), used as is by every call.
        self.options = LossOptions.from_keywords("MGLLLoss.__init__", options)

    @property
    def config(self) -> LossOptions:
        """The options (a :class:`~mgll._problem.LossConfig`: the term settings first)."""
        return self.options

    # every option reads as an attribute, as before: loss_fn.backend, loss_fn.group, ...
    normalize = property(lambda self: self.options.normalize)
    backend = property(lambda self: self.options.backend)
    validate = property(lambda self: self.options.validate)
    gather_with_grad = property(lambda self: self.options.gather_with_grad)
    local_loss = property(lambda self: self.options.local_loss)
    rank = property(lambda self: self.options.rank)
    world_size = property(lambda self: self.options.world_size)
    group = property(lambda self: self.options.group)

    @classmethod
    def reference_compatible(cls, **overrides) -> MGLLLoss:
        """The configuration whose value and gradients equal the authors' code (:doc:`/differences`).

        Per granularity :math:`\\tfrac14[CE(Z, W^r) + CE(Z^\\top, W^r)]` plus BCE-with-logits
        against the soft target W^r averaged over all pairs; the authors' consistency term,
        which never applies (it takes the log of raw logits), is left out.
        """
        settings = dict(
            soft_clip_weight=0.5,
            pointwise_weight=1.0,
            smooth_kl_weight=0.0,
            pointwise_target="soft",
            pointwise_norm="pairs",
        )
        return cls(**{**settings, **overrides})

    @classmethod
    def paper(cls, **overrides) -> MGLLLoss:
        """The paper's equations as written (eq. 1-6), every term weighted 1.

        Soft CLIP and the pointwise term with binary targets normalised per image (eq. 4
        divides by N), the smooth KL over the samples of the batch (eq. 5-6), and multi-hot
        labels that are positives when they share a label (``overlap="any"``).  Keyword
        arguments override single settings.

        Example:
            >>> loss_fn = MGLLLoss.paper()
            >>> image = torch.randn(6, 16, requires_grad=True)
            >>> ids = torch.tensor([0, 0, 1, 1, 2, 2])
            >>> loss = loss_fn(image, [torch.randn(6, 16)] * 2, torch.tensor(10.0), labels=[ids, ids % 2])
            >>> loss.backward()
        """
        settings = dict(
            soft_clip_weight=1.0,
            pointwise_weight=1.0,
            smooth_kl_weight=1.0,
            pointwise_target="binary",
            pointwise_norm="images",
            smooth_kl_support="samples",
            overlap="any",
        )
        return cls(**{**settings, **overrides})

    def forward(
        self,
        image_features: Tensor,
        text_features: Sequence[Tensor],
        logit_scale: Tensor,
        logit_bias: Tensor | None = None,
        *,
        labels: Sequence[Tensor] | None = None,
        targets: Sequence[Tensor] | None = None,
        output_dict: bool = False,
    ) -> Tensor | dict[str, Tensor]:
        r"""The loss of one batch, with this module's settings.

        Pass exactly one of ``labels`` (paired mode: text ``i`` of every granularity describes
        image ``i``) and ``targets`` (bank mode: a bank of ``K_g`` texts per granularity and
        which of them describe which image).  Both are keyword-only.

        Args:
            image_features: the image embeddings, one row per image; L2-normalised here
                unless the module was built with ``normalize=False``.
            text_features: one tensor per granularity (G of them): the N paired texts, or a
                bank of K_g texts.
            logit_scale: the temperature :math:`s` that multiplies the cosine similarities,
                already exponentiated (open_clip's ``model.logit_scale.exp()``): a positive
                floating-point tensor, e.g. ``torch.tensor(100.0)``; gradients flow to it.
            logit_bias: an optional additive bias :math:`b` of the pointwise (sigmoid) term, a
                scalar tensor as in SigLIP; None (default) means no bias.
            labels: paired mode, one tensor per granularity: integer class ids ``(N,)``
                (images with the same id share texts) or a multi-hot ``(N, C_g)`` matrix
                (images with a common label share texts); the co-occurrence :math:`C^g` is
                built from them.
            targets: bank mode, one ``(N, K_g)`` non-negative co-occurrence matrix per
                granularity, :math:`C^g_{ik} > 0` when text ``k`` describes image ``i``
                (:mod:`mgll.targets` builds them).
            output_dict: return the three weighted terms as a dict instead of their sum.

        Shape:
            - image_features: (N, D)
            - text_features[g]: (N, D) with ``labels``, (K_g, D) with ``targets``
            - logit_scale, logit_bias: scalar (one element)
            - labels[g]: (N,) or (N, C_g); targets[g]: (N, K_g)
            - Output: scalar

        Returns:
            The scalar loss, in the dtype of the features; with ``output_dict=True`` a dict
            with the keys ``soft_clip_loss``, ``pointwise_loss`` and ``smooth_kl_loss``, each
            already weighted, whose values sum to the loss (open_clip's trainers sum such a
            dict).  Under ``torch.distributed`` see :mod:`mgll.distributed` for what each rank
            returns.

        Raises:
            TypeError: an argument of the wrong type: e.g. a Python number as
                ``logit_scale`` (pass ``torch.tensor(100.0)``), integer features, float
                ``labels`` (pass them as ``targets``), or labels passed positionally (they
                land in ``logit_bias``: use ``labels=``).
            ValueError: shapes that do not fit together (the message names the argument,
                the expected and the received shape, e.g. transposed ``image_features``),
                both or neither of ``labels`` and ``targets``, tensors on different devices,
                and, unless ``validate=False``, NaN/inf or zero-norm features, a logit scale
                that is not positive, negative labels or targets.  :doc:`/errors` lists every
                check.
            ImportError: ``backend="triton"`` without triton installed.

        Example:
            >>> loss_fn = MGLLLoss()
            >>> image = torch.randn(4, 16, requires_grad=True)           # N=4, D=16
            >>> texts = [torch.randn(4, 16), torch.randn(4, 16)]         # G=2, paired
            >>> ids = torch.tensor([0, 0, 1, 1])                         # granularity 0: ids
            >>> multi_hot = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 1]])  # granularity 1
            >>> loss = loss_fn(image, texts, torch.tensor(100.0), labels=[ids, multi_hot])
            >>> loss.shape, loss.requires_grad
            (torch.Size([]), True)
            >>> terms = loss_fn(image, texts, torch.tensor(100.0), labels=[ids, multi_hot],
            ...                 output_dict=True)
            >>> sorted(terms)
            ['pointwise_loss', 'smooth_kl_loss', 'soft_clip_loss']
            >>> torch.allclose(sum(terms.values()), loss)
            True
            >>> bank = [torch.randn(3, 16)]                              # G=1, K_0=3 texts
            >>> c = torch.tensor([[1.0, 0, 0], [1, 1, 0], [0, 0, 1], [0, 1, 0]])  # (N, K_0)
            >>> MGLLLoss()(image, bank, torch.tensor(100.0), targets=[c]).ndim
            0
        """
        return loss_with(
            image_features, text_features, logit_scale, logit_bias, labels, targets, output_dict,
            self.options,
        )  # fmt: skip

    def extra_repr(self) -> str:
        settings = self.options.settings()
        group = settings.pop("group")
        group = "None" if group is None else f"<{type(group).__name__}>"
        return ", ".join(f"{k}={v!r}" for k, v in settings.items()) + f", group={group}"
