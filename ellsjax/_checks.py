"""Argument checks shared by the public functions.

Shape, rank and dtype checks always run (they are static under ``jax.jit``). Value checks (NaN/inf,
ranges, label membership) run only on concrete arrays: inside a user's own ``jax.jit`` the values
are tracers and cannot be inspected without a host round trip.
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import jax

# jax is imported inside the array checks: the light checks below (padding, positive ints) serve
# modules that must import without it (the data layer, the command line's argument parsing).

#: The two boundary rules of this field: ``"circular"`` (wrap around; ELS, circularly padded
#: networks) and ``"zeros"`` (zero padding; boundary-broken ELS, zero-padded networks).
Padding = Literal["circular", "zeros"]
PADDINGS: tuple[str, ...] = ("zeros", "circular")


def check_padding(value: Any, name: str = "padding") -> str:
    """A :data:`Padding`: ``"zeros"`` or ``"circular"``."""
    if not isinstance(value, str) or value not in PADDINGS:
        raise ValueError(f"{name}: must be one of {', '.join(PADDINGS)}, got {value!r}")
    return value


def check_positive_int(v: Any, name: str, *, allow_none: bool = False) -> int | None:
    """A positive Python int (bools and floats rejected); ``None`` passes when ``allow_none``."""
    if v is None and allow_none:
        return None
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral) or v <= 0:
        raise ValueError(f"{name}: expected a positive int{' or None' if allow_none else ''}, got {name}={v!r}")
    return int(v)


def is_concrete(x: Any) -> bool:
    """True when ``x`` holds values we can look at (not a tracer)."""
    import jax

    return not isinstance(x, jax.core.Tracer)


#: Slack on the documented image range [-1, 1] (float rounding of a conversion or a resize).
RANGE_SLACK = 1e-3


def as_image_batch(
    x: Any, name: str, *, shape: tuple[int, int, int] | None = None, in_range: tuple[float, float] | None = None
) -> jax.Array:
    """Check an NHWC float image batch and return it as float32.

    Args:
        x: the array.
        name: the argument's name, used in error messages.
        shape: the required ``(H, W, C)``, if any.
        in_range: also require (concrete) values in this range, e.g. the documented ``(-1, 1)``
            (training images; noisy ``x_t`` legitimately leave it). ``None``: no range check.
    """
    import jax.numpy as jnp

    dtype = getattr(x, "dtype", None)
    if dtype is None:
        x = np.asarray(x)
        dtype = x.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{name}: expected a floating-point array of images in [-1, 1], got dtype {dtype}"
            + (" (convert uint8 pixels with p/127.5 - 1)" if jnp.issubdtype(dtype, jnp.integer) else "")
        )
    if np.ndim(x) != 4:
        raise ValueError(f"{name}: expected rank 4 [batch, height, width, channels], got shape {np.shape(x)}")
    # [N, C, H, W] read as NHWC is C rows of H pixels with W channels: many channels, as many as the
    # "width", few "rows"; a batch of images with more than 4 channels is almost surely that
    b_, h_, w_, c_ = np.shape(x)
    nchw = c_ > 4 and c_ == w_ and h_ <= 4
    hint = (f"; it looks like NCHW [batch, channels, height, width] ({h_} channel(s) of {w_}x{c_}): ellsjax takes NHWC "
            "images, pass x.transpose(0, 2, 3, 1)") if nchw else ""
    if shape is not None and tuple(np.shape(x)[1:]) != tuple(shape):
        raise ValueError(f"{name}: expected images of shape [*, {shape[0]}, {shape[1]}, {shape[2]}], got {np.shape(x)}"
                         + hint)
    if shape is None and nchw:
        raise ValueError(f"{name}: shape {np.shape(x)} has {c_} channels{hint}")
    if np.shape(x)[0] == 0:
        raise ValueError(f"{name}: the batch is empty")
    if not is_concrete(x):
        return x.astype(jnp.float32)
    # concrete values are checked on the host (numpy): no device program per new shape
    host = np.asarray(x, np.float32)
    if not np.all(np.isfinite(host)):
        raise ValueError(f"{name}: contains NaN or inf")
    if in_range is not None:
        check_range(host, name, in_range)
    return jnp.asarray(host)


def check_range(x: Any, name: str, bounds: tuple[float, float] = (-1.0, 1.0)) -> None:
    """Values in ``bounds`` (up to :data:`RANGE_SLACK`), else an error naming the likely conversion."""
    lo, hi = float(np.min(x)), float(np.max(x))
    a, b = (float(v) for v in bounds)
    if lo >= a - RANGE_SLACK and hi <= b + RANGE_SLACK:
        return
    hint = ""
    if (a, b) == (-1.0, 1.0) and lo >= 0 and hi <= 255:
        hint = "; 8-bit pixels p in [0, 255] convert with p/127.5 - 1"
    what = "the documented image range" if (a, b) == (-1.0, 1.0) else "the range"
    raise ValueError(f"{name}: values lie in [{lo:.4g}, {hi:.4g}], outside {what} [{a:g}, {b:g}]{hint}"
                     + ("" if hint else " (pass image_range=None for data that is not an image)"))


def check_scale(k: Any, name: str = "scale") -> int:
    """A patch size: a positive odd Python int."""
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (numbers.Integral,)):
        raise TypeError(f"{name}: expected a positive odd int patch size, got {k!r}")
    k = int(k)
    if k <= 0 or k % 2 == 0:
        raise ValueError(f"{name}: patch size must be a positive odd int, got {k}")
    return k


def as_times(t: Any, batch: int, name: str = "t") -> jax.Array:
    """A time per batch element: a scalar or a ``[batch]`` array in [0, 1], returned as float32 [batch]."""
    import jax.numpy as jnp

    dtype = getattr(t, "dtype", None)
    if dtype is not None and not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"{name}: expected a real number or array of times, got dtype {dtype}")
    if not is_concrete(t):
        t = t.astype(jnp.float32)
        if t.ndim == 0:
            return jnp.broadcast_to(t, (batch,))
        if t.shape != (batch,):
            raise ValueError(f"{name}: expected a scalar or shape [{batch}], got shape {t.shape}")
        return t
    try:  # concrete: checked and broadcast on the host
        t = np.asarray(t, np.float32)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a real number or array of times, got {t!r}") from None
    if t.ndim == 0:
        t = np.broadcast_to(t, (batch,))
    elif t.shape != (batch,):
        raise ValueError(f"{name}: expected a scalar or shape [{batch}], got shape {t.shape}")
    if not np.all(np.isfinite(t)):
        raise ValueError(f"{name}: contains NaN or inf")
    if np.any((t < 0) | (t > 1)):
        raise ValueError(f"{name}: times must lie in [0, 1], got min {float(t.min())}, max {float(t.max())}")
    return jnp.asarray(t)


def as_labels(label: Any, batch: int, name: str = "label") -> jax.Array | None:
    """``None``, an int, or a ``[batch]`` int array, returned as int32 [batch] (or None)."""
    import jax.numpy as jnp

    if label is None:
        return None
    dtype = getattr(label, "dtype", None)
    if dtype is None:
        if isinstance(label, (bool, np.bool_)) or not isinstance(label, numbers.Integral):
            arr = np.asarray(label)
            if not jnp.issubdtype(arr.dtype, jnp.integer):
                raise TypeError(f"{name}: expected None, an int or an int array of shape [{batch}], got {label!r}")
            label = arr
            dtype = arr.dtype
    elif not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{name}: expected integer class labels, got dtype {dtype}")
    if not is_concrete(label):
        lab = label.astype(jnp.int32)
        if lab.ndim == 0:
            return jnp.broadcast_to(lab, (batch,))
    else:  # concrete: broadcast on the host
        lab = np.asarray(label, np.int32)
        if lab.ndim == 0:
            lab = np.broadcast_to(lab, (batch,))
    if lab.shape != (batch,):
        raise ValueError(f"{name}: expected an int or shape [{batch}], got shape {lab.shape}")
    return jnp.asarray(lab)


