"""Argument checks shared by the public functions.

Shape, rank and dtype checks always run (they are static under ``jax.jit``). Value checks (NaN/inf,
ranges, label membership) run on the host for concrete arrays; on traced arrays (inside a user's own
``jax.jit``, ``vmap`` or ``grad``) :func:`runtime_check` compiles them into the program: a device-side
predicate, and only when it fails a host callback that runs the same eager check on the concrete
values, so the caller gets the same exception with the same message.
"""

from __future__ import annotations

import contextlib
import numbers
import os
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import jax

# jax is imported inside the array checks: the light checks below (padding, positive ints) serve
# modules that must import without it (the data layer, the command line's argument parsing).

#: The two boundary rules of this field: ``"circular"`` (wrap around; ELS, circularly padded
#: networks) and ``"zeros"`` (zero padding; boundary-broken ELS, zero-padded networks).
Padding = Literal["circular", "zeros"]
#: The padding values, :data:`Padding`'s members as a tuple.
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


#: Whether :func:`runtime_check` compiles its checks in (read when a program is traced). Off: traced
#: values pass unchecked (as before 0.2), e.g. for ``jax.export``, which cannot serialize the host
#: callback. Environment: ``ELLSJAX_RUNTIME_CHECKS=0``; in code: :func:`runtime_checks`.
_RUNTIME_CHECKS = [os.environ.get("ELLSJAX_RUNTIME_CHECKS", "1") != "0"]


@contextlib.contextmanager
def runtime_checks(enabled: bool):
    """Within it, value checks of traced arguments are compiled in (``True``, the default) or not.

    It acts when a program is traced: a function already compiled keeps what it was traced with
    (``jax.jit`` caches by function and argument types, not by this switch).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> f = lambda x: runtime_check(x, x < 0, fail("x: negative"))
        >>> with runtime_checks(False):
        ...     exported = jax.export.export(jax.jit(f))(jnp.zeros(3))   # no host callback inside
        >>> exported.out_avals
        (ShapedArray(float32[3]),)
    """
    old = _RUNTIME_CHECKS[0]
    _RUNTIME_CHECKS[0] = bool(enabled)
    try:
        yield
    finally:
        _RUNTIME_CHECKS[0] = old


def runtime_check(x: jax.Array, bad: Any, check: Any, *operands: Any) -> jax.Array:
    """``x``, guarded by a value check that holds inside ``jax.jit`` (and ``vmap``, ``grad``).

    When the program runs and any of ``bad`` (a traced bool array) is true, ``check(*operands)`` runs
    on the host with the operands' concrete values and raises (an all-true ``bad`` runs the host check
    at every call, for checks with no device-side test): pass the eager check itself, so that
    the caller gets its exception type and message (on CPU ``jax.jit`` re-raises the callback's
    exception, its text after XLA's callback context). While ``bad`` is all false, nothing leaves
    the device: the check is one reduction and a ``lax.cond`` (under ``vmap`` the branches become a
    select and the host check runs per example, raising only for a bad one). The result carries
    the check as a data dependency (it cannot be removed as dead code while ``x`` is used), and its
    derivative is ``x``'s (the check is invisible to ``jax.grad``). ``jax.export`` cannot serialize
    the callback: trace such a program inside :func:`runtime_checks` ``(False)``.

    Args:
        x: the array to return (the checked argument itself, so later uses depend on the check).
        bad: bools, any shape: where the value is wrong.
        check: ``check(*host_operands)`` raises the eager error (it sees numpy arrays).
        operands: small arrays ``check`` needs (the values to name in the message).
    """
    import jax
    import jax.numpy as jnp

    if not _RUNTIME_CHECKS[0]:
        return x
    struct = jax.ShapeDtypeStruct(x.shape, x.dtype)

    def on_host(bad_now, x_now, *ops):
        if np.any(bad_now):
            check(*(np.asarray(o) for o in ops))  # the authority: raises the eager error (or passes, for an always-true ``bad``)
        return np.asarray(x_now)

    @jax.custom_jvp
    def guarded(x, bad, ops):
        fail = lambda: jax.pure_callback(on_host, struct, bad, x, *ops, vmap_method="sequential")  # noqa: E731
        return jax.lax.cond(jnp.any(bad), fail, lambda: x)

    @guarded.defjvp
    def _(primals, tangents):
        return guarded(*primals), tangents[0]

    return guarded(x, bad, operands)


def fail(message: str, error: type[Exception] = ValueError):
    """A check for :func:`runtime_check` whose message names no value: it always raises ``error(message)``."""

    def check(*_):
        raise error(message)

    return check


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
    if not is_concrete(x):  # traced: the same value checks, compiled in (see runtime_check)
        x = x.astype(jnp.float32)
        x = runtime_check(x, ~jnp.isfinite(x), fail(f"{name}: contains NaN or inf"))
        if in_range is not None:
            lo, hi = (float(v) for v in in_range)
            x = runtime_check(x, (x < lo - RANGE_SLACK) | (x > hi + RANGE_SLACK),
                              lambda lo_hi: check_range(lo_hi, name, in_range), jnp.stack([x.min(), x.max()]))
        return x
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
    """A time per batch element: a real number or a 0-d or ``[batch]`` array in [0, 1], returned as float32
    ``[batch]``. Values are checked on the host when concrete, inside the program when traced."""
    import jax.numpy as jnp

    what = f"{name}: expected a real number or array of times in [0, 1] (a scalar or shape [{batch}])"
    if isinstance(t, (str, bytes, bool, np.bool_)):
        raise TypeError(f"{what}, got {t!r}")
    dtype = getattr(t, "dtype", None)
    if dtype is not None and not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"{what}, got dtype {dtype}")
    if not is_concrete(t):
        t = t.astype(jnp.float32)
        if t.ndim == 0:
            t = jnp.broadcast_to(t, (batch,))
        elif t.shape != (batch,):
            raise ValueError(f"{name}: expected a scalar or shape [{batch}], got shape {t.shape}")
        bad = ~jnp.isfinite(t) | (t < 0) | (t > 1)
        return runtime_check(t, bad, lambda v: _check_times_host(v, name), t)
    try:  # concrete: checked and broadcast on the host
        arr = np.asarray(t)
    except (TypeError, ValueError):
        raise TypeError(f"{what}, got {t!r}") from None
    if arr.dtype.kind not in "fiu":  # strings, objects, bools: never parsed or cast silently
        raise TypeError(f"{what}, got {t!r}")
    t = arr.astype(np.float32)
    if t.ndim == 0:
        t = np.broadcast_to(t, (batch,))
    elif t.shape != (batch,):
        raise ValueError(f"{name}: expected a scalar or shape [{batch}], got shape {t.shape}")
    _check_times_host(t, name)
    return jnp.asarray(t)


def _check_times_host(t: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(t)):
        raise ValueError(f"{name}: contains NaN or inf")
    if np.any((t < 0) | (t > 1)):
        raise ValueError(f"{name}: times must lie in [0, 1], got min {float(t.min())}, max {float(t.max())}")


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




def labels_present(label: jax.Array, class_sizes: tuple[int, ...]) -> jax.Array:
    """Traced labels: ``[B]`` bools, true where the class id lies in ``[0, K)`` and has training
    images (``class_sizes[k] > 0``); the device-side half of a machine's label check."""
    import jax.numpy as jnp

    sizes = jnp.asarray(class_sizes, jnp.int32)
    inside = (label >= 0) & (label < len(class_sizes))
    return inside & (sizes[jnp.clip(label, 0, len(class_sizes) - 1)] > 0)
