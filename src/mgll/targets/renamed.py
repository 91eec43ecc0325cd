"""Old argument names and values that keep working for one release, with a DeprecationWarning.

One rule for every renamed spelling of the public API (the CHANGELOG's "Deprecated" section
lists them): the old spelling gives exactly the result of the new one, warns once per call
naming the new spelling, and is removed in the release after.
"""

from __future__ import annotations

import warnings
from typing import TypeVar

T = TypeVar("T")

SINCE, REMOVED_IN = "0.2", "0.3"


def renamed_keyword(
    function: str, old: str, new: str, old_value: T | None, value: T, default: T
) -> T:
    """The value of keyword ``new``, taking it from the deprecated keyword ``old`` when given.

    ``old_value`` is None when the caller did not pass ``old``.  Passing both, with different
    values, is a TypeError (which one was meant cannot be known).
    """
    if old_value is None:
        return value
    if value != default and value != old_value:
        raise TypeError(
            f"`{function}` got both `{old}=` ({old_value!r}) and `{new}=` ({value!r}); pass "
            f"only `{new}=`, the new spelling of `{old}=`"
        )
    warnings.warn(
        f"`{function}({old}=...)` is deprecated since mgll {SINCE} and will be removed in "
        f"{REMOVED_IN}: pass `{new}=` instead (same values, same result)",
        DeprecationWarning,
        stacklevel=3,
    )
    return old_value


def renamed_value(function: str, argument: str, value: object, renames: dict[str, str]):
    """``value``, or its new spelling from ``renames`` (old -> new) with a DeprecationWarning."""
    if not isinstance(value, str) or value not in renames:
        return value
    warnings.warn(
        f"`{function}({argument}={value!r})` is deprecated since mgll {SINCE} and will be "
        f"removed in {REMOVED_IN}: pass `{argument}={renames[value]!r}` instead (the same rule)",
        DeprecationWarning,
        stacklevel=3,
    )
    return renames[value]
