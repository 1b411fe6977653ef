"""The one sampler driver: checks, preparation, progress, equal-scale runs and the trajectory, written
once. Each sampler supplies a :class:`Method` (how to start, one step, how to finish).

A trajectory is one jitted program. The per-step scales are static; consecutive steps with equal
scales (a *run*, :func:`runs`) become one ``lax.scan`` of the method's step, so a schedule of 19
scales with 7 distinct values compiles 7 step bodies, not 19. A method may instead supply a
``segment`` that advances a whole run at once (the diffrax solvers).

Progress is passed explicitly: ``progress=True`` (a tqdm bar) or a callable receiving each finished
step's index. Inside the compiled program a ``jax.debug.callback`` reports ``(token, step)``; the
token, a traced argument of the call, names the callable registered for that call only
(:class:`_Listener`), so the compiled program is shared by every call and concurrent calls do not
mix their reports. A sampler traced inside the caller's own ``jax.jit`` or ``jax.export`` reports
no progress (with a warning): its program stays free of host callbacks, so it can be exported with
the denoiser as an argument.

Replays: :func:`run` is public. Its ``x0_fn`` hook replaces the denoiser's ``_denoise`` by another
pure ``x̂0`` function returning ``(x̂0, aux)``; the ``aux`` of every step comes back stacked (this is
how :func:`ellsjax.explain.provenance` replays DDIM with provenance statistics).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ellsjax import _checks
from ellsjax.denoiser import Denoiser

__all__ = ["Trajectory", "Method", "run", "runs", "check_times", "check_scales", "check_denoiser", "prepared"]


class Trajectory(NamedTuple):
    """A sampled trajectory.

    Attributes:
        ts: ``[S+1]`` the times.
        xs: ``[S+1, B, H, W, C]`` ``x_t`` at each time (``xs[0]`` is the start, ``xs[-1]`` the sample).
        x0s: ``[S, B, H, W, C]`` the denoiser's ``x̂0`` at each step's start time ``ts[i]``.
    """

    ts: Float[Array, " s1"]
    xs: Float[Array, "s1 b h w c"]
    x0s: Float[Array, "s b h w c"]


class Method(NamedTuple):
    """What a sampler supplies to :func:`run` (module-level functions: the tuple is a static argument).

    Attributes:
        step: ``step(ctx, state, i, key) -> (state, (x_next, x0, aux))``: step ``i`` with the static
            per-step ``key`` (:attr:`keys`); ``x_next`` the VP state at ``ts[i+1]``, ``x0`` the
            denoiser's ``x̂0`` at ``ts[i]``, ``aux`` anything to stack (or ``None``).
        init: ``init(ctx, x) -> state`` (default: the VP state itself).
        finish: ``finish(ctx, state, keys) -> x`` the VP state at the last grid point (default: ``state``).
        keys: ``keys(scales, nsteps) -> tuple`` the static key of each step (default: its scale);
            runs of equal keys share one compiled step.
        segment: ``segment(ctx, state, start, n, key, keep) -> (state, (xs [n], x0s [n] | None, aux))``:
            a whole run at once, instead of ``step`` (``None``: scan ``step``).
    """

    step: Callable | None
    init: Callable | None = None
    finish: Callable | None = None
    keys: Callable | None = None
    segment: Callable | None = None


class Context(NamedTuple):
    """Everything a :class:`Method` sees besides its state: the denoiser, the grid, the labels, the
    sampler's own arguments (a pytree) and the ``x̂0`` function."""

    denoiser: Any
    grid: Any
    label: Any
    args: Any
    x0_fn: Callable

    def x0(self, x, t, k):
        """``x̂0`` at VP state ``x`` and scalar time ``t`` (broadcast over the batch) with scale ``k``,
        as ``(x̂0, aux)``."""
        out = self.x0_fn(self.denoiser, x, jnp.full((x.shape[0],), t), self.label, k)
        return out if isinstance(out, tuple) else (out, None)


def _denoise(denoiser, x, t, label, k):
    return denoiser._denoise(x, t, label, k)


def runs(keys: Sequence[Any]):
    """Runs of equal keys: ``(first step, length, key)``.

    Example:
        >>> list(runs([5, 5, 3, 3, 3, 5]))
        [(0, 2, 5), (2, 3, 3), (5, 1, 5)]
    """
    start = 0
    for k, grp in itertools.groupby(keys):
        n = len(list(grp))
        yield start, n, k
        start += n


# -- checks -----------------------------------------------------------------------------------------


def check_denoiser(denoiser: Any, x_start: Any, label: Any):
    """The common argument checks: a :class:`~ellsjax.denoiser.Denoiser`, a start batch of its image
    shape, valid labels. Returns ``(x, label)``."""
    if not isinstance(denoiser, Denoiser):
        raise TypeError(f"denoiser: expected an ellsjax Denoiser (machine or model), got {type(denoiser).__name__}")
    x = _checks.as_image_batch(x_start, "x_start", shape=denoiser.image_shape)
    label = denoiser.checked_label(_checks.as_labels(label, x.shape[0]))
    return x, label


def check_times(ts: Any, denoiser: Denoiser, name: str = "ts") -> jax.Array:
    """Check a reverse-time grid: 1-D, at least 2 times, strictly decreasing, in [0, 1], and with
    positive noise at every step's start time. Returns it as float32. A traced grid (inside a
    user's ``jax.jit``) is checked when the program runs, with the same errors."""
    arr = jnp.asarray(ts, jnp.float32) if not isinstance(ts, jax.Array) else ts.astype(jnp.float32)
    if arr.ndim != 1 or arr.shape[0] < 2:
        raise ValueError(f"{name}: expected a 1-D grid of at least 2 decreasing times, got shape {arr.shape}")
    signal, var = denoiser.schedule.variances(arr[:-1])
    floor = denoiser.min_signal_var
    host = lambda v, sg, vr: _check_times_host(v, sg, vr, floor, name)  # noqa: E731
    if not _checks.is_concrete(arr):
        bad = (~jnp.all(jnp.isfinite(arr)) | jnp.any((arr < 0) | (arr > 1)) | ~jnp.all(jnp.diff(arr) < 0)
               | jnp.any(var <= 0) | jnp.any(signal <= floor))
        return _checks.runtime_check(arr, bad, host, arr, signal, var)
    host(np.asarray(arr), np.asarray(signal), np.asarray(var))
    return arr


def _check_times_host(v: np.ndarray, signal: np.ndarray, var: np.ndarray, floor: float, name: str) -> None:
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name}: contains NaN or inf")
    if v.min() < 0 or v.max() > 1:
        raise ValueError(f"{name}: times must lie in [0, 1], got [{v.min()}, {v.max()}]")
    if not np.all(np.diff(v) < 0):
        raise ValueError(f"{name}: times must be strictly decreasing (ts[0] is the start time), got {v}")
    if np.any(var <= 0):
        raise ValueError(f"{name}: a step starts where the noise level is 0; only the last time may be noise-free")
    if np.any(signal <= floor):
        bad = v[:-1][signal <= floor]
        raise ValueError(
            f"{name}: this denoiser's x̂0 is undefined where the signal level a(t) is 0, but steps start "
            f"at t = {bad.tolist()}; start the grid below it (e.g. ts[0] = 0.999)"
        )


def check_scales(scales: Any, denoiser: Denoiser, nsteps: int, name: str = "scales") -> tuple | None:
    """Check per-step scales (one per step, ``len(ts) − 1``) for this denoiser; returns a tuple, or
    ``None`` for a denoiser without a scale (which refuses any but ``None``)."""
    if scales is None:
        if denoiser.needs_scale:
            raise ValueError(f"{name}: this denoiser needs a scale per step ({nsteps} values)")
        return None
    if hasattr(scales, "values") and hasattr(scales, "ts") and not isinstance(scales, (Sequence, np.ndarray)):
        scales = scales.values  # a ScaleSchedule
    if isinstance(scales, (str, bytes)) or not isinstance(scales, (Sequence, np.ndarray, jax.Array)):
        raise TypeError(f"{name}: expected a sequence of {nsteps} scales, got {scales!r}")
    scales = [s.item() if hasattr(s, "item") else s for s in scales]
    if len(scales) != nsteps:
        raise ValueError(f"{name}: expected {nsteps} values (one per step, len(ts) - 1), got {len(scales)}")
    if not denoiser.needs_scale:
        if all(s is None for s in scales):
            return None
        raise ValueError(f"{name}: {type(denoiser).__name__} has no scale; pass {name}=None "
                         "(ellsjax.denoiser.scale_for(denoiser, scales) does so for a comparison)")
    out = []
    for i, s in enumerate(scales):
        try:
            out.append(denoiser.check_scale(s))
        except (TypeError, ValueError) as e:
            raise type(e)(f"{name}[{i}]: {e}") from None
    return tuple(out)


def prepared(denoiser: Denoiser, scales: tuple | None, label: Any) -> Denoiser:
    """The denoiser made ready for these scales (:meth:`~ellsjax.denoiser.Denoiser.prepare`, e.g.
    prebuilt banks) when its arrays are concrete; same results."""
    if not all(_checks.is_concrete(v) for v in jax.tree.leaves(denoiser)):
        return denoiser
    return denoiser.prepare(scales if scales is not None else (None,), conditional=label is not None)


# -- progress ---------------------------------------------------------------------------------------


class _Listener:
    """Per-call progress callables, by token (a call registers, the compiled program reports its
    token, the call unregisters)."""

    _lock = threading.Lock()
    _targets: dict[int, Callable[[int], None]] = {}
    _next = itertools.count(1)

    @classmethod
    def tick(cls, token, i):
        target = cls._targets.get(int(token))
        if target is not None:
            target(int(i))

    @classmethod
    @contextlib.contextmanager
    def listening(cls, progress: bool | Callable[[int], None], total: int):
        """``(token, has_progress)`` for one call; ``progress`` as for the samplers."""
        if not progress:
            yield 0, False
            return
        bar = None
        if callable(progress):
            target = progress
        else:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="sampling", unit="step")
            target = lambda i: bar.update(1)  # noqa: E731
        with cls._lock:
            token = next(cls._next)
            cls._targets[token] = target
        try:
            yield token, True
        finally:
            with cls._lock:
                cls._targets.pop(token, None)
            if bar is not None:
                bar.close()


# -- the driver -------------------------------------------------------------------------------------


@partial(jax.jit, static_argnames=("method", "x0_fn", "scales", "progress", "keep"))
def _trajectory(denoiser, x, grid, label, args, token, *, method, x0_fn, scales, progress, keep):
    nsteps = jax.tree.leaves(grid)[0].shape[0] - 1
    ctx = Context(denoiser, grid, label, args, x0_fn)
    state = method.init(ctx, x) if method.init is not None else x
    keys = method.keys(scales, nsteps) if method.keys is not None else (scales or (None,) * nsteps)

    def one(state, i, k):
        state, (x_next, x0, aux) = method.step(ctx, state, i, k)
        if progress:
            jax.debug.callback(_Listener.tick, token, i, ordered=True)
        return state, ((x_next, x0) if keep else None, aux)

    outs = []
    for start, n, k in runs(keys):
        if method.segment is not None:
            state, (xs, x0s, aux) = method.segment(ctx, state, start, n, k, keep)
            out = ((xs, x0s) if keep else None, aux)
        elif n == 1:
            state, out = one(state, start, k)
            out = jax.tree.map(lambda v: v[None], out)
        else:
            state, out = jax.lax.scan(lambda c, i, k=k: one(c, i, k), state, jnp.arange(start, start + n))
        outs.append(out)
    traj, aux = jax.tree.map(lambda *v: jnp.concatenate(v), *outs)
    x_end = method.finish(ctx, state, keys) if method.finish is not None else state
    return x_end, traj, aux


def run(
    method: Method,
    denoiser: Denoiser,
    x_start: Any,
    grid: Any,
    *,
    scales: tuple | None,
    label: Any = None,
    args: Any = None,
    progress: bool | Callable[[int], None] = False,
    return_trajectory: bool = False,
    x0_fn: Callable | None = None,
    checked: bool = False,
    prepare: bool = True,
):
    """Run a sampler's :class:`Method` from ``x_start`` over ``grid`` (one jitted program).

    Args:
        method: the sampler's step (and optional init/finish/keys/segment).
        denoiser: any :class:`~ellsjax.denoiser.Denoiser`; prepared here for ``scales``.
        x_start: ``[B, H, W, C]`` the VP state at the first grid point.
        grid: the grid as the method reads it: the times ``ts`` ``[S+1]``, or a tuple of arrays whose
            first is ``[S+1]`` (e.g. ``(ts, sigmas)``).
        scales: the checked per-step scales (:func:`check_scales`), static.
        label: the checked labels (``[B]`` int32 or ``None``).
        args: the sampler's own traced arguments (a pytree: keys, η, tolerances, …).
        progress: ``True`` shows a tqdm bar; a callable receives each finished step's index.
        return_trajectory: also return the :class:`Trajectory` (``x_t`` and ``x̂0`` per step).
        x0_fn: a pure ``x0_fn(denoiser, x_t, t [B], label, scale) -> x̂0 or (x̂0, aux)`` used instead
            of the denoiser's ``_denoise`` (a module-level function: it is a static argument).
        checked: ``x_start`` and ``label`` are already checked (else :func:`check_denoiser` runs).
        prepare: prepare the denoiser for ``scales`` first (``False`` where ``x0_fn`` does not use
            what preparing builds, e.g. banks).

    Returns:
        ``(x, trajectory | None, aux | None)``: the final state, the trajectory if asked, and the
        stacked ``aux`` of every step (``None`` if the steps return none).
    """
    if checked:
        x = x_start
    else:
        x, label = check_denoiser(denoiser, x_start, label)
    if prepare:
        denoiser = prepared(denoiser, scales, label)
    ts = jax.tree.leaves(grid)[0]
    nsteps = ts.shape[0] - 1
    if progress and not all(_checks.is_concrete(v) for v in jax.tree.leaves((x, denoiser, grid))):
        # traced by the caller (its own jax.jit, jax.export): a host callback would tie the program to
        # this process and block its export, so the caller's program reports no progress
        warnings.warn("progress: a sampler traced inside jax.jit or jax.export reports no progress (the "
                      "program stays free of host callbacks)", stacklevel=3)
        progress = False
    with _Listener.listening(progress, nsteps) as (token, has_progress):
        x_end, traj, aux = _trajectory(
            denoiser, x, grid, label, args, jnp.int32(token), method=method, x0_fn=x0_fn or _denoise,
            scales=scales, progress=has_progress, keep=bool(return_trajectory),
        )
        if has_progress:
            x_end = jax.block_until_ready(x_end)
            jax.effects_barrier()
    trajectory = None
    if return_trajectory:
        xs = jnp.concatenate([jnp.asarray(x, jnp.float32)[None], traj[0]])
        trajectory = Trajectory(ts, xs, traj[1])
    return x_end, trajectory, aux
