"""``MGLLLoss``: the module interface, a thin wrapper over :func:`mgll.functional.mgll_loss`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

from torch import Tensor, nn

from mgll._validation import check_flag
from mgll.distributed import check_options
from mgll.functional import check_backend, make_config, mgll_loss


class MGLLLoss(nn.Module):
    r"""Multi-Granular Language Learning loss: a drop-in replacement for a CLIP loss.

    .. math::
        L = \alpha_1\sum_g\lambda_g L^g_{\mathrm{sCLIP}} + \alpha_2\sum_g\lambda_g L^g_P
            + \alpha_3 L_{\mathrm{sKL}}

    Li, Wang, Farsiu, Kinahan, *Boosting Medical Visual Understanding From Multi-Granular
    Language Learning*, ICLR 2026 (arXiv:2511.15943).

    Args:
        soft_clip_weight: :math:`\alpha_1`, weight of the soft-target CLIP term.
        pointwise_weight: :math:`\alpha_2`, weight of the pointwise sigmoid term.
        smooth_kl_weight: :math:`\alpha_3`, weight of the cross-granularity smooth KL.
        granularity_weights: :math:`\lambda_g`, one per granularity (default all 1).
        pointwise_target: ``"binary"`` (:math:`1[C>0]`, default: every pair with a positive
            weight is a positive, in both input modes), ``"graded"`` (:math:`\min(C, 1)`, a soft
            BCE target for partial weights such as Jaccard overlaps or uncertain labels; equal
            to ``"binary"`` on 0/1 co-occurrence) or ``"soft"`` (C normalised per row, as the
            authors' code).
        pointwise_norm: ``"pairs"`` (divide by N*K_g, default) or ``"images"`` (divide by N).
        smooth_kl_support: ``"coarse"`` (default: pool the samples by a coarse granularity
            before comparing, SPEC 2.3b; it beat the paper's form on every setting of the demo,
            see the smooth-KL page) or ``"samples"`` (the paper's eq. 5-6).
        smooth_kl_reference: the granularity whose groups pool the samples for
            ``"coarse"``; default: the coarsest in the batch (fewest distinct ids or label
            sets).
        overlap: how two multi-hot label vectors of a paired batch become a co-occurrence
            weight: ``"jaccard"`` (default: shared over present labels; it measured best on the
            digits demo, see the demo page), ``"any"`` (1 when they share a label, the rule
            before the default changed) or ``"count"`` (the number of shared labels), or a
            sequence with one rule per granularity.  Entries may be label probabilities in [0, 1] (uncertain
            labels); the rules generalise as documented in
            :func:`mgll.targets.from_multi_hot`.  Integer ids always mean "equal id"; bank
            ``targets`` are used as given.
        normalize: L2-normalise the features (default True).
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

    Example:
        >>> loss_fn = MGLLLoss()
        >>> image = torch.randn(8, 32, requires_grad=True)
        >>> texts = [torch.randn(8, 32), torch.randn(8, 32)]  # G=2 granularities, paired
        >>> ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 1])
        >>> loss = loss_fn(image, texts, torch.tensor(10.0), labels=[ids, ids % 2])
        >>> loss.backward()
    """

    def __init__(
        self,
        *,
        soft_clip_weight: float = 1.0,
        pointwise_weight: float = 1.0,
        smooth_kl_weight: float = 1.0,
        granularity_weights: Sequence[float] | None = None,
        pointwise_target: str = "binary",
        pointwise_norm: str = "pairs",
        smooth_kl_support: str = "coarse",
        smooth_kl_reference: int | None = None,
        overlap: str | Sequence[str] = "jaccard",
        normalize: bool = True,
        backend: str = "auto",
        validate: bool = True,
        gather_with_grad: bool = False,
        local_loss: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        group: object = None,
    ) -> None:
        super().__init__()
        self.config = make_config(
            soft_clip_weight=soft_clip_weight,
            pointwise_weight=pointwise_weight,
            smooth_kl_weight=smooth_kl_weight,
            granularity_weights=granularity_weights,
            pointwise_target=pointwise_target,
            pointwise_norm=pointwise_norm,
            smooth_kl_support=smooth_kl_support,
            smooth_kl_reference=smooth_kl_reference,
            overlap=overlap,
        )
        check_backend(backend)
        self.normalize = bool(normalize)
        self.backend = backend
        self.validate = check_flag("validate", validate)
        options = check_options(gather_with_grad, local_loss, rank, world_size, group)
        self.gather_with_grad, self.local_loss = options.gather_with_grad, options.local_loss
        self.rank, self.world_size, self.group = options.rank, options.world_size, options.group

    @classmethod
    def reference_compatible(cls, **overrides) -> MGLLLoss:
        """The configuration whose value and gradients equal the authors' code (SPEC 3).

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
        return mgll_loss(
            image_features,
            text_features,
            logit_scale,
            logit_bias,
            labels=labels,
            targets=targets,
            **asdict(self.config),
            normalize=self.normalize,
            backend=self.backend,
            validate=self.validate,
            output_dict=output_dict,
            gather_with_grad=self.gather_with_grad,
            local_loss=self.local_loss,
            rank=self.rank,
            world_size=self.world_size,
            group=self.group,
        )

    def extra_repr(self) -> str:
        settings = {**asdict(self.config), "normalize": self.normalize, "backend": self.backend}
        settings["validate"] = self.validate
        settings.update(gather_with_grad=self.gather_with_grad, local_loss=self.local_loss)
        settings.update(rank=self.rank, world_size=self.world_size)
        group = "None" if self.group is None else f"<{type(self.group).__name__}>"
        return ", ".join(f"{k}={v!r}" for k, v in settings.items()) + f", group={group}"
