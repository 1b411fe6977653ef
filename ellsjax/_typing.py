"""Annotation aliases for arguments that the public functions accept in more than one form.

jaxtyping's ``ArrayLike`` covers arrays and scalars but not Python lists, which the samplers and
tools document and accept for a time grid (``ddim(m, x, [0.9, 0.5, 0.0])``).
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real

from jaxtyping import ArrayLike, Float

__all__ = ["TimeGrid"]

#: A 1-D grid of times (or of noise levels σ): an array, or a sequence of real numbers.
TimeGrid = Float[ArrayLike, " s1"] | Sequence[Real]
