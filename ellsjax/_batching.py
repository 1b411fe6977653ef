"""Running a jitted function over a large batch in fixed-size pieces (private)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np


def map_padded(fn: Callable[..., Any], size: int, *arrays: Any) -> Any:
    """``fn`` over consecutive batches of ``size`` rows of ``arrays`` (``None`` entries pass through),
    concatenated. The last batch is padded by repeating the final row, so every call has the same
    shape (one compile), and its padding is cut from the output."""
    n = next(a for a in arrays if a is not None).shape[0]
    size = min(int(size), n)
    outs = []
    for start in range(0, n, size):
        idx = np.minimum(np.arange(start, start + size), n - 1)
        out = fn(*(None if a is None else a[idx] for a in arrays))
        outs.append(out[: min(size, n - start)])
    return jnp.concatenate(outs)
