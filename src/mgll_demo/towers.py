"""A small CNN image tower and an embedding-bag text tower, both trained from scratch."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_WORD = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lower-case words and digits; punctuation and word order carry no label here."""
    return _WORD.findall(text.lower())


class Vocabulary:
    """Word to index, built from the training texts; index 0 is the unknown word."""

    def __init__(self, texts: Iterable[str]) -> None:
        words = sorted({w for t in texts for w in tokenize(t)})
        self.index = {w: i + 1 for i, w in enumerate(words)}

    def __len__(self) -> int:
        return len(self.index) + 1

    def encode(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Flat token ids and per-text offsets, the input of :class:`torch.nn.EmbeddingBag`."""
        ids, offsets = [], []
        for t in texts:
            offsets.append(len(ids))
            ids.extend(self.index.get(w, 0) for w in tokenize(t) or ["<empty>"])
        return torch.tensor(ids, dtype=torch.long), torch.tensor(offsets, dtype=torch.long)


class ImageTower(nn.Module):
    """Three conv blocks (28 -> 14 -> 7 -> 3) and a linear head; the flatten keeps position."""

    def __init__(self, dim: int = 64, width: int = 16) -> None:
        super().__init__()
        blocks = []
        for c_in, c_out in ((1, width), (width, 2 * width), (2 * width, 2 * width)):
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.head = nn.Linear(2 * width * 3 * 3, dim)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


class TextTower(nn.Module):
    """Mean of word embeddings (an embedding bag) followed by a two-layer MLP."""

    def __init__(self, vocab_size: int, dim: int = 64, width: int = 128) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab_size, width, mode="mean")
        self.mlp = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, dim)
        )

    def forward(self, ids: Tensor, offsets: Tensor) -> Tensor:
        return self.mlp(self.bag(ids, offsets))


class DualEncoder(nn.Module):
    """Image and text towers with a learnable logit scale and bias (open_clip conventions).

    ``logit_scale`` is kept as a log and exponentiated (clamped at 100) when used; the bias is
    used by the pointwise term of MGLL only, the CLIP baseline ignores it.
    """

    def __init__(self, vocab: Vocabulary, dim: int = 64, bias_init: float = 0.0) -> None:
        super().__init__()
        self.vocab = vocab
        self.image = ImageTower(dim)
        self.text = TextTower(len(vocab), dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.logit_bias = nn.Parameter(torch.tensor(float(bias_init)))

    def scale(self) -> Tensor:
        return self.logit_scale.exp().clamp(max=100.0)

    def encode_image(self, images: Tensor) -> Tensor:
        return F.normalize(self.image(images), dim=-1)

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        ids, offsets = self.vocab.encode(texts)
        return F.normalize(self.text(ids, offsets), dim=-1)
