"""One deterministic sentence per image from its findings (the "description" granularity)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

#: The sentence of an image without a finding (a null label of the description presets).
NO_FINDING = "A chest X-ray with no finding."


@lru_cache(maxsize=1024)
def phrase(label: str) -> str:
    """``"Pleural_Thickening"`` -> ``"pleural thickening"``."""
    return label.replace("_", " ").lower()


def join(words: Sequence[str]) -> str:
    """``["a", "b", "c"]`` -> ``"a, b and c"``."""
    words = list(words)
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def sentence(positives: Sequence[str], uncertain: Sequence[str] = ()) -> str:
    """``"A chest X-ray showing cardiomegaly; possibly edema."`` (labels in file order)."""
    certain = [phrase(x) for x in positives if x not in uncertain]
    maybe = [phrase(x) for x in uncertain]
    if not certain and not maybe:
        return NO_FINDING
    if not certain:
        return f"A chest X-ray possibly showing {join(maybe)}."
    tail = f"; possibly {join(maybe)}" if maybe else ""
    return f"A chest X-ray showing {join(certain)}{tail}."
