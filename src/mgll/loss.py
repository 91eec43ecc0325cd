"""``MGLLLoss``: the module interface, a thin wrapper over :func:`mgll.functional.mgll_loss`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

from torch import Tensor, nn

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
        pointwise_target: ``"binary"`` (:math:`1[C>0]`, default) or ``"soft"`` (C normalised
            per row, as the authors' code).
        pointwise_norm: ``"pairs"`` (divide by N*K_g, default) or ``"images"`` (divide by N).
        smooth_kl_support: ``"samples"`` (the paper's form) or ``"coarse"`` (pool the samples
            by a coarse granularity first, SPEC 2.3b).
        smooth_kl_reference: the granularity whose groups pool the samples for
            ``"coarse"``; default: the one with the fewest groups in the batch.
        normalize: L2-normalise the features (default True).
        backend: ``"auto"`` or a name from :func:`mgll.available_backends`.

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
        smooth_kl_support: str = "samples",
        smooth_kl_reference: int | None = None,
        normalize: bool = True,
        backend: str = "auto",
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
        )
        check_backend(backend)
        self.normalize = bool(normalize)
        self.backend = backend

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
            output_dict=output_dict,
        )

    def extra_repr(self) -> str:
        settings = {**asdict(self.config), "normalize": self.normalize, "backend": self.backend}
        return ", ".join(f"{k}={v!r}" for k, v in settings.items())
