r"""Calibrating a machine's locality schedule against a network (or any denoiser).

Two methods, both along the *network's* DDIM trajectories (``x_{t_i}`` from the same noise):

**Grid calibration** (Kamb & Ganguli, arXiv 2412.20292, §5): at each step ``i`` and for each seed
``b``, compare the network's score with each candidate scale's machine score on the same
``x_{t_i}`` and keep the best candidate,

.. math::

    k^\star_{i,b} = \arg\max_k \cos\big(\nabla\log p^{\mathrm{net}}_{t_i}(x_{i,b}),
    \nabla\log p^{k}_{t_i}(x_{i,b})\big)
    \quad(\text{or } \arg\min_k \|\cdot - \cdot\|_2),

and the schedule is the per-step median over seeds, ``k_i = \mathrm{median}_b\,k^\star_{i,b}`` (the
lower median, so that it is always one of the candidates).

**Differentiable calibration**: for a soft-window machine (:mod:`ellsjax.machines.soft`), whose
``x̂0`` is smooth in the window width ``ℓ``, minimise

.. math::

    L(\ell) = \sum_i \frac{\mathrm{mean}_b\,\|\hat x_0^{\ell_i}(x_{i,b}, t_i) - \hat x_0^{\mathrm{net}}(x_{i,b}, t_i)\|^2}
                         {\mathrm{mean}_b\,\|\hat x_0^{\mathrm{net}}(x_{i,b}, t_i)\|^2}

over ``log ℓ_i`` per step (``curve="per_step"``) or over a smooth curve
``log ℓ(t) = c_0 + c_1 t + c_2 t²`` (``curve="quadratic"``), differentiating through the streaming
kernel. Per step the objective is a sum of independent one-dimensional terms ``L_i(ℓ_i)``, so the
default optimizer there is a derivative-based line search per step (bracketing by the sign of
``dL_i/d log ℓ``, cubic Hermite interpolation inside the bracket, the best point kept): a handful
of evaluations on a fixed set of seeds instead of dozens of noisy Adam steps. Adam (optax) serves
the coupled quadratic curve and is available per step. (Each step's term is normalised by the
target's size, so that the steps near ``t = 1``, where the network's ``x̂0`` is large and noisy, do
not dominate the smooth curve; per step the normalisation does not move the minimum.)

The "network" is any :class:`~ellsjax.machines.Denoiser` — a trained network
(:func:`ellsjax.models.load`) or a machine with a known schedule (which is how the tests check that
calibration recovers it).

Example:
    >>> import jax, numpy as np, ellsjax as ej
    >>> imgs = jax.random.uniform(jax.random.key(0), (8, 8, 8, 1), minval=-1, maxval=1)
    >>> target = ej.machines.els(imgs)
    >>> x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    >>> ts = [0.8, 0.6, 0.4, 0.2, 0.0]
    >>> cal = grid_calibrate(target, ej.machines.els(imgs), x, ts, candidates=(1, 3, 5),
    ...                      network_scales=(5, 5, 3, 3))
    >>> cal.scales
    (5, 5, 3, 3)
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, Float

from ellsjax import _checks
from ellsjax import samplers as _samplers
from ellsjax._batching import map_padded
from ellsjax.denoiser import Denoiser
from ellsjax.machines.mixture import LocalGlobalMixture
from ellsjax.machines.soft import SoftEquivariantLocalScore
from ellsjax.scales import ScaleSchedule

__all__ = [
    "calibration_times",
    "network_trajectory",
    "GridCalibration",
    "grid_calibrate",
    "SoftCalibration",
    "MixtureCalibration",
    "differentiable_calibrate",
    "widths_from_sizes",
    "trajectory_loss",
]


def calibration_times(nsteps: int = 20) -> np.ndarray:
    """The paper's calibration grid: ``t = i/nsteps`` for ``i = nsteps … 0`` (``nsteps`` DDIM steps).

    Example:
        >>> calibration_times(4).tolist()
        [1.0, 0.75, 0.5, 0.25, 0.0]
    """
    if isinstance(nsteps, bool) or not isinstance(nsteps, (int, np.integer)) or nsteps < 1:
        raise ValueError(f"nsteps: need a positive int, got {nsteps!r}")
    return (np.arange(nsteps, -1, -1) / nsteps).astype(np.float32)


def network_trajectory(
    network: Denoiser, x_start: Float[ArrayLike, "b h w c"], ts: Any, *, label: Any = None, scales: Any = None
) -> _samplers.Trajectory:
    """The network's DDIM trajectory from ``x_start`` over ``ts`` (``x_{t_i}`` and its ``x̂0`` per step)."""
    if not isinstance(network, Denoiser):
        raise TypeError(f"network: expected an ellsjax Denoiser (model or machine), got {type(network).__name__}")
    _, traj = _samplers.ddim(network, x_start, ts, scales=scales, label=label, return_trajectory=True)
    return traj


def _check_pair(network, machine):
    if not isinstance(network, Denoiser):
        raise TypeError(f"network: expected an ellsjax Denoiser (model or machine), got {type(network).__name__}")
    if not isinstance(machine, Denoiser):
        raise TypeError(f"machine: expected an ellsjax Denoiser, got {type(machine).__name__}")
    if tuple(network.image_shape) != tuple(machine.image_shape):
        raise ValueError(f"machine: image shape {machine.image_shape} differs from the network's {network.image_shape}")
    if network.schedule != machine.schedule:
        raise ValueError(f"machine: noise schedule {machine.schedule} differs from the network's {network.schedule}")


def _trajectory(network, x_start, ts, label, network_scales, trajectory):
    if trajectory is not None:
        if not isinstance(trajectory, _samplers.Trajectory):
            raise TypeError("trajectory: expected an ellsjax.samplers.Trajectory")
        return trajectory
    if x_start is None:
        raise ValueError("x_start: pass the starting noise (or a precomputed trajectory=)")
    return network_trajectory(network, x_start, ts, label=label, scales=network_scales)


def _stack_steps(traj, label):
    """``(x [S·B,...], t [S·B], label [S·B] | None, x0_net [S, B, ...])`` for the steps' start times."""
    s, b = traj.x0s.shape[:2]
    x = traj.xs[:s].reshape(s * b, *traj.xs.shape[2:])
    t = jnp.repeat(jnp.asarray(traj.ts[:s], jnp.float32), b)
    lab = None if label is None else jnp.tile(label, s)
    return x, t, lab


@partial(jax.jit, static_argnums=(4,))
def _machine_x0(machine, x, t, label, scale):
    return machine._denoise(x, t, label, scale)


class GridCalibration(NamedTuple):
    """Result of :func:`grid_calibrate`.

    Attributes:
        ts: ``[S+1]`` the time grid; step ``i`` starts at ``ts[i]``.
        scales: ``S`` calibrated scales (per-step lower median over seeds of the best candidate).
        candidates: the candidate scales compared.
        best: ``[S, B]`` the best candidate per step and seed.
        similarity: ``[S, K, B]`` the comparison per step, candidate and seed (cosine similarity of
            the scores, or minus their L2 distance: larger is better either way).
        metric: ``"cosine"`` or ``"l2"``.
    """

    ts: np.ndarray
    scales: tuple
    candidates: tuple
    best: np.ndarray
    similarity: np.ndarray
    metric: str

    @property
    def schedule(self) -> ScaleSchedule:
        """The calibrated schedule (``kind="size"``), with ``method``, ``metric`` and ``candidates``
        as its ``meta``."""
        return ScaleSchedule(tuple(np.asarray(self.ts, np.float64)), self.scales, "size", source="grid calibration",
                             meta={"method": "grid", "metric": self.metric,
                                   "candidates": [int(k) for k in self.candidates]})

    def save(self, path: str | os.PathLike, **meta: Any) -> None:
        """Write :attr:`schedule` as JSON (``{"ts", "scales", ...}``; :meth:`ScaleSchedule.load` reads it)."""
        self.schedule.save(path, **meta)


def grid_calibrate(
    network: Denoiser,
    machine: Denoiser,
    x_start: Float[ArrayLike, "b h w c"] | None,
    ts: Any = None,
    *,
    candidates: Sequence[int],
    metric: Literal["cosine", "l2"] = "cosine",
    label: Any = None,
    network_scales: Any = None,
    trajectory: _samplers.Trajectory | None = None,
    batch_size: int = 8,
) -> GridCalibration:
    """Calibrate a machine's per-step scale on the network's DDIM trajectories (the paper's method).

    Args:
        network: the reference denoiser (a trained network, or a machine: then pass its
            ``network_scales``).
        machine: the machine to calibrate (any denoiser taking the ``candidates`` as scales).
        x_start: ``[B, H, W, C]`` starting noise, one trajectory per seed.
        ts: the time grid (default :func:`calibration_times` ``(20)``: 20 steps from ``t = 1``).
        candidates: the scales to compare (e.g. odd patch sizes ``1, 3, …, 15``).
        metric: ``"cosine"`` (cosine similarity of the scores, the paper's) or ``"l2"`` (distance).
        label: ``None`` or class ids, for conditional denoisers.
        network_scales: scales passed to ``network`` when it is itself a machine.
        trajectory: a precomputed network trajectory (then ``x_start`` may be ``None``).
        batch_size: images per machine call (the steps of all trajectories are stacked and cut
            into batches of this size; small batches keep the kernel's chunks GEMM-friendly).

    Returns:
        A :class:`GridCalibration`; ``.save(path)`` writes the JSON schedule.
    """
    _check_pair(network, machine)
    if metric not in ("cosine", "l2"):
        raise ValueError(f"metric: must be 'cosine' or 'l2', got {metric!r}")
    if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Sequence) or len(candidates) == 0:
        raise ValueError(f"candidates: expected a non-empty sequence of scales, got {candidates!r}")
    cands = tuple(machine.check_scale(k) for k in candidates)
    if len(set(cands)) != len(cands):
        raise ValueError(f"candidates: contains duplicates: {candidates!r}")
    ts = calibration_times(20) if ts is None else ts
    traj = _trajectory(network, x_start, ts, label, network_scales, trajectory)
    labels = _checks.as_labels(label, traj.x0s.shape[1])
    if labels is None or _checks.is_concrete(labels):
        machine.check_label(labels)
    x, t, lab = _stack_steps(traj, labels)
    s, b = traj.x0s.shape[:2]
    a, var = (v[:, None, None, None] for v in machine.schedule.variances(t))
    net_score = ((a * traj.x0s.reshape(x.shape) - x) / var).reshape(s, b, -1)
    ready = machine.prepare(cands, conditional=lab is not None)
    batch_size = _checks.check_positive_int(batch_size, "batch_size")
    sims = []
    for k in cands:
        x0 = map_padded(lambda xc, tc, lc, k=k: _machine_x0(ready, xc, tc, lc, k), batch_size, x, t, lab)
        m_score = ((a * x0 - x) / var).reshape(s, b, -1)
        if metric == "cosine":
            num = jnp.sum(m_score * net_score, -1)
            den = jnp.linalg.norm(m_score, axis=-1) * jnp.linalg.norm(net_score, axis=-1)
            sims.append(np.asarray(num / jnp.maximum(den, 1e-30)))
        else:
            sims.append(-np.asarray(jnp.linalg.norm(m_score - net_score, axis=-1)))
    sim = np.stack(sims, axis=1)  # [S, K, B]
    if not np.all(np.isfinite(sim)):
        raise ValueError("network: the comparison produced NaN/inf (a denoiser returned non-finite values)")
    best = np.asarray(cands)[np.argmax(sim, axis=1)]  # [S, B]
    lower_median = np.sort(best, axis=1)[:, (b - 1) // 2]  # always one of the candidates
    scales = tuple(type(cands[0])(v) for v in lower_median)
    return GridCalibration(np.asarray(traj.ts), scales, cands, best, sim, metric)


def trajectory_loss(
    machine: Denoiser, trajectory: _samplers.Trajectory, scales: Any, *, label: Any = None, batch_size: int = 8,
) -> np.ndarray:
    """Per step, ``mean_b ‖x̂0_machine − x̂0_network‖² / mean_b ‖x̂0_network‖²`` on a network trajectory.

    The objective of :func:`differentiable_calibrate`, for any machine and per-step scales (e.g. a
    grid-calibrated hard machine), so that schedules of different machines can be compared on it.

    Returns:
        ``[S]`` the normalised losses.
    """
    if not isinstance(trajectory, _samplers.Trajectory):
        raise TypeError("trajectory: expected an ellsjax.samplers.Trajectory")
    s, b = trajectory.x0s.shape[:2]
    scales = _samplers.check_scales(scales, machine, s)
    labels = _checks.as_labels(label, b)
    batch_size = _checks.check_positive_int(batch_size, "batch_size")
    ready = machine.prepare(scales if scales is not None else (None,), conditional=labels is not None)
    out = np.zeros(s)
    for i in range(s):
        k = None if scales is None else scales[i]
        t = jnp.full((b,), trajectory.ts[i], jnp.float32)
        x0 = map_padded(lambda xc, tc, lc, k=k: _machine_x0(ready, xc, tc, lc, k), batch_size, trajectory.xs[i], t,
                        labels)
        target = trajectory.x0s[i]
        out[i] = float(jnp.mean((x0 - target) ** 2) / jnp.mean(target**2))
    return out


class SoftCalibration(NamedTuple):
    """Result of :func:`differentiable_calibrate`.

    Attributes:
        ts: ``[S+1]`` the time grid.
        ells: ``S`` window widths ``ℓ_i`` (floats), the soft machine's per-step scales.
        support: the machine's support ``K``.
        padding: the machine's padding (``"circular"``: soft ELS, ``"zeros"``: soft bbELS).
        window: the machine's window shape (``"gaussian"`` or ``"box"``).
        edge: the box window's edge width.
        losses: ``[iters]`` per round: Adam's minibatch loss, or the line search's sum over steps of
            each step's best value so far (non-increasing).
        step_loss: ``[S]`` each step's normalised loss at the final ``ℓ`` on all seeds.
        curve: ``"per_step"`` or ``"quadratic"``.
        timings: seconds per phase of the run (``prepare``: bank builds; ``compile``: the first call
            of each window side's program; ``iterations``: the optimizer's rounds; ``final``: the loss of
            every step on all seeds; 0 when the line search already evaluated all seeds), or ``None``.
        optimizer: ``"line_search"`` or ``"adam"``.
    """

    ts: np.ndarray
    ells: tuple
    support: int
    padding: str
    window: str
    edge: float
    losses: np.ndarray
    step_loss: np.ndarray
    curve: str
    timings: dict | None = None
    optimizer: str = "adam"

    @property
    def schedule(self) -> ScaleSchedule:
        """The learned schedule (``kind="width"``, with the soft machine's ``support``, ``window``,
        ``edge`` and ``padding``; ``method``, ``curve`` and ``optimizer`` as its ``meta``)."""
        return ScaleSchedule(tuple(np.asarray(self.ts, np.float64)), self.ells, "width", padding=self.padding,
                             options={"support": int(self.support), "window": self.window, "edge": float(self.edge)},
                             source="differentiable calibration",
                             meta={"method": "differentiable", "curve": self.curve, "optimizer": self.optimizer})

    def save(self, path: str | os.PathLike, **meta: Any) -> None:
        """Write :attr:`schedule` as JSON (``{"ts", "ells", "support", "padding", "window", "edge", ...}``;
        :meth:`ScaleSchedule.load` reads it)."""
        self.schedule.save(path, **meta)


class MixtureCalibration(NamedTuple):
    """Result of :func:`differentiable_calibrate` for a :class:`~ellsjax.machines.LocalGlobalMixture`.

    Attributes:
        ts: ``[S+1]`` the time grid.
        local_scales: ``S`` local scales ``k_i`` (given, held fixed).
        weights: ``S`` learned weights ``w_i ∈ [0, 1]`` of the global part.
        losses: ``[iters]`` per round, as :attr:`SoftCalibration.losses`.
        step_loss: ``[S]`` each step's normalised loss at the final weights on all seeds.
        step_loss_local: ``[S]`` the same at ``w = 0`` (the local machine alone), for comparison.
        timings: seconds per phase, as :attr:`SoftCalibration.timings`.
        optimizer: ``"line_search"`` or ``"adam"``.
    """

    ts: np.ndarray
    local_scales: tuple
    weights: tuple
    losses: np.ndarray
    step_loss: np.ndarray
    step_loss_local: np.ndarray
    timings: dict | None = None
    optimizer: str = "line_search"

    @property
    def scales(self) -> tuple:
        """The mixture's per-step scales ``(k_i, w_i)`` for the samplers."""
        return tuple(zip(self.local_scales, self.weights, strict=True))


def _values_from(params, curve, ts, link="exp"):
    u = params if curve == "per_step" else params[0] + params[1] * ts + params[2] * ts * ts
    return jnp.exp(u) if link == "exp" else u


class _WidthParam:
    """A soft machine's per-step parameter: ``u = log ℓ`` in ``[log 0.05, log K]``; the static part of
    a step is the window side of its ``ℓ``."""

    link = "exp"

    def __init__(self, machine, init, s):
        init_arr = np.broadcast_to(np.asarray(init, np.float64), (s,)) if np.ndim(init) == 0 else np.asarray(init, np.float64)
        if init_arr.shape != (s,) or not np.all(np.isfinite(init_arr)) or np.any(init_arr <= 0):
            raise ValueError(f"init: expected one positive ℓ or {s} of them, got {init!r}")
        self.machine = machine
        self.lo, self.hi = float(np.log(_ELL_MIN)), float(np.log(float(machine.support)))
        self.u0 = np.clip(np.log(init_arr), self.lo, self.hi)

    value = staticmethod(lambda u: float(np.exp(u)))
    dvalue = staticmethod(lambda u: float(np.exp(u)))  # dℓ/du

    def static(self, i, value):
        return self.machine.window_size(value)

    def view(self, machine, static, conditional):
        return machine.prepare(sides=[static], conditional=conditional)

    @staticmethod
    def x0(machine, x, t, label, value, static):
        return machine.denoise_ell(x, t, label, value, side=static)


class _MixtureParam:
    """A mixture's per-step parameter: the weight ``w`` itself in ``[0, 1]`` (the objective is a
    quadratic in it); the static part of step ``i`` is its fixed local scale."""

    link = "identity"
    lo, hi = 0.0, 1.0

    def __init__(self, machine, init, s):
        pairs = list(init) if isinstance(init, (list, tuple)) else None
        if pairs is None or len(pairs) != s or any(not isinstance(p, (tuple, list)) or len(p) != 2 for p in pairs):
            raise ValueError(f"init: a mixture needs one (local scale, weight) pair per step ({s}), got {init!r}")
        checked = [machine.check_scale(tuple(p)) for p in pairs]
        self.machine = machine
        self.local = tuple(k for k, _ in checked)
        self.u0 = np.array([w for _, w in checked], np.float64)

    value = staticmethod(float)
    dvalue = staticmethod(lambda u: 1.0)

    def static(self, i, value):
        return self.local[i]

    def view(self, machine, static, conditional):
        return machine.prepare(((static, 0.0),), conditional=conditional)

    @staticmethod
    def x0(machine, x, t, label, value, static):
        return machine.denoise_weight(x, t, label, value, local_scale=static)


def differentiable_calibrate(
    network: Denoiser,
    machine: SoftEquivariantLocalScore | LocalGlobalMixture,
    x_start: Float[ArrayLike, "b h w c"] | None,
    ts: Any = None,
    *,
    init: Any = 2.0,
    iterations: int | None = None,
    learning_rate: float = 0.1,
    batch: int | None = None,
    curve: Literal["per_step", "quadratic"] = "per_step",
    optimizer: Literal["auto", "line_search", "adam"] = "auto",
    key: int = 0,
    label: Any = None,
    network_scales: Any = None,
    trajectory: _samplers.Trajectory | None = None,
) -> SoftCalibration:
    """Learn the soft window width ``ℓ`` per step (or a smooth ``ℓ(t)``) from gradients.

    Minimises the normalised ``‖x̂0_machine − x̂0_network‖²`` along the network's trajectories (see
    the module docstring), differentiating through the streaming kernel in forward mode. Each step
    runs at the window side of its current ``ℓ``
    (:meth:`~ellsjax.machines.SoftEquivariantLocalScore.window_size`), exactly as the machine
    defines it; the value and gradient of one step are one compiled program per window side (fixed
    shapes: ``batch`` seeds), reused by every step and iteration, so a change of ``ℓ`` never
    recompiles (at most one compile per side the run visits), and each side's bank is built once.

    Optimizers (``optimizer``; ``"auto"``: the line search per step, Adam for the quadratic curve):

    - ``"line_search"`` (``curve="per_step"`` only): the objective is a sum of one-dimensional
      terms ``L_i(ℓ_i)``; per step, from ``init``, expand downhill in ``u = log ℓ`` (steps 0.25,
      0.5, 1, …) until ``dL_i/du`` changes sign or ``L_i`` rises, then shrink the bracket at the
      minimiser of the cubic Hermite interpolant of ``(L, dL/du)`` at its ends (kept inside its
      middle 80%). ``iterations`` (default 6) evaluations per step at most, on one fixed set of
      ``batch`` seeds; a step stops early (no more evaluations) once its bracket is narrower than
      0.05, the interpolant in its bracket promises less than ``10⁻³·L_i`` below its best value,
      or its slope is exactly zero; each step keeps the
      best point it evaluated, so the result is never worse than ``init`` on those seeds. ``ℓ``
      stays in ``[0.05, support]``.
    - ``"adam"``: ``optax.adam(learning_rate)`` on ``log ℓ`` (or the curve's coefficients), a
      fresh random subset of ``batch`` seeds per step (``key``), ``iterations`` (default 40) steps.

    Args:
        network: the reference denoiser (network or machine; pass ``network_scales`` for a machine).
        machine: a soft-window machine (:func:`ellsjax.machines.soft_els` / ``soft_bbels``), or a
            :class:`~ellsjax.machines.LocalGlobalMixture` whose global weight ``w_i`` is learned per
            step at fixed local scales (see below).
        x_start: ``[B, H, W, C]`` starting noise.
        ts: time grid (default :func:`calibration_times` ``(20)``).
        init: starting ``ℓ``: one float, or one per step (e.g. from :func:`grid_calibrate`). For a
            mixture: one ``(k_i, w_i)`` pair per step, the local scales (held fixed) and the
            starting weights.
        iterations: evaluations per step (line search) or Adam steps; default 6 resp. 40.
        learning_rate: Adam learning rate (on ``log ℓ``); unused by the line search.
        batch: seeds per evaluation (line search: a fixed subset; Adam: a random subset per step);
            ``None``: all.
        curve: ``"per_step"`` (an independent ``ℓ_i`` per step) or ``"quadratic"``
            (``log ℓ(t) = c_0 + c_1 t + c_2 t²``).
        optimizer: ``"auto"``, ``"line_search"`` or ``"adam"``.
        key: seed of the seed subsets.
        label: ``None`` or class ids.
        network_scales: scales passed to ``network`` when it is itself a machine.
        trajectory: a precomputed network trajectory (then ``x_start`` may be ``None``).

    Returns:
        A :class:`SoftCalibration`; ``.ells`` are the soft machine's per-step scales for the sampler.
        For a mixture, a :class:`MixtureCalibration`; ``.scales`` are its ``(k_i, w_i)``.

    A mixture's objective is, per step, a quadratic in ``w_i`` (``x̂0`` is affine in ``w``), so the
    line search runs on ``w`` itself in ``[0, 1]``: the cubic Hermite step through two points with
    their derivatives is then the exact minimiser, reached in a few evaluations; Adam steps are
    projected back onto ``[0, 1]``. Only ``curve="per_step"`` applies.

    Example:
        >>> import jax, ellsjax as ej
        >>> imgs = jax.random.uniform(jax.random.key(0), (6, 8, 8, 1), minval=-1, maxval=1)
        >>> m = ej.machines.soft_els(imgs, support=3)
        >>> x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
        >>> cal = differentiable_calibrate(m, m, x, [0.8, 0.4, 0.0], init=1.0, iterations=3,
        ...                                network_scales=(1.5, 0.8))
        >>> len(cal.ells), cal.optimizer, bool(cal.losses[-1] < cal.losses[0])
        (2, 'line_search', True)
    """
    _check_pair(network, machine)
    if not isinstance(machine, (SoftEquivariantLocalScore, LocalGlobalMixture)):
        raise TypeError(f"machine: expected a soft-window machine (ej.machines.soft_els) or a local/global mixture "
                        f"(ej.machines.mixture), got {type(machine).__name__}")
    if curve not in ("per_step", "quadratic"):
        raise ValueError(f"curve: must be 'per_step' or 'quadratic', got {curve!r}")
    if optimizer not in ("auto", "line_search", "adam"):
        raise ValueError(f"optimizer: must be 'auto', 'line_search' or 'adam', got {optimizer!r}")
    if optimizer == "auto":
        optimizer = "line_search" if curve == "per_step" else "adam"
    mix = isinstance(machine, LocalGlobalMixture)
    if mix and curve != "per_step":
        raise ValueError("curve: a mixture's weights are learned per step; use curve='per_step'")
    if optimizer == "line_search" and curve != "per_step":
        raise ValueError("optimizer: 'line_search' needs curve='per_step' (the quadratic curve couples the steps; "
                         "use 'adam')")
    iterations = (6 if optimizer == "line_search" else 40) if iterations is None else iterations
    iterations = _checks.check_positive_int(iterations, "iterations")
    if not (float(learning_rate) > 0):
        raise ValueError(f"learning_rate: must be positive, got {learning_rate!r}")
    ts = calibration_times(20) if ts is None else ts
    traj = _trajectory(network, x_start, ts, label, network_scales, trajectory)
    s, b = traj.x0s.shape[:2]
    labels = _checks.as_labels(label, b)
    if labels is None or _checks.is_concrete(labels):
        machine.check_label(labels)
    batch = b if batch is None else _checks.check_positive_int(batch, "batch")
    if batch > b:
        raise ValueError(f"batch: {batch} is more than the {b} seeds")
    param = _MixtureParam(machine, init, s) if mix else _WidthParam(machine, init, s)
    tstep = jnp.asarray(traj.ts[:s], jnp.float32)
    xs = traj.xs[:s]
    targets = traj.x0s
    norms = np.asarray(jnp.mean(targets.reshape(s, b, -1) ** 2, axis=(1, 2)))
    rng = np.random.default_rng(key)
    timings = {"prepare": 0.0, "compile": 0.0, "iterations": 0.0, "final": 0.0}
    steps = _StepPrograms(machine, labels is not None, timings, param)

    def evaluate(i, value, sel):
        lab = None if labels is None else labels[sel]
        return steps.value_and_grad(float(value), xs[i, sel], targets[i, sel], tstep[i], norms[i], lab,
                                    static=param.static(i, value))

    t_iter = time.perf_counter()
    if optimizer == "line_search":
        sel = np.sort(rng.choice(b, batch, replace=False)) if batch < b else np.arange(b)
        search = _LineSearch(param.u0, lo=param.lo, hi=param.hi)
        losses = []
        for _ in range(iterations):
            todo = search.pending()
            if not todo:
                break
            u = search.propose()
            res = {i: evaluate(i, param.value(u[i]), sel) for i in todo}  # dispatch all, then read back
            search.update({i: (float(v), float(g) * param.dvalue(u[i])) for i, (v, g) in res.items()})
            losses.append(float(np.sum(search.best_f)))
            if not np.isfinite(losses[-1]):
                raise ValueError(f"network: the loss became NaN/inf at iteration {len(losses)}; check the "
                                 "network's x̂0")
        values = np.array([param.value(u) for u in search.best_u])
        known = search.best_f if batch == b else None  # the search's values are the final losses then
    else:
        import optax

        if curve == "per_step":
            params = jnp.asarray(param.u0, jnp.float32)
        else:  # least-squares fit of the quadratic to log(init)
            coef = np.polynomial.polynomial.polyfit(np.asarray(tstep, np.float64), param.u0, 2)
            params = jnp.asarray(coef, jnp.float32)
        opt = optax.adam(float(learning_rate))
        opt_state = opt.init(params)
        update = _make_update(opt, curve, param.link, (param.lo, param.hi))
        losses = []
        for _ in range(iterations):
            sel = np.sort(rng.choice(b, batch, replace=False)) if batch < b else np.arange(b)
            values = np.asarray(_values_from(params, curve, tstep, param.link))
            # each step at its own static part (window side / local scale), one compiled program per part
            vals, grads = zip(*(evaluate(i, values[i], sel) for i in range(s)), strict=True)
            params, opt_state = update(params, opt_state, jnp.stack(grads), tstep)
            losses.append(float(np.sum(np.asarray(vals))))
            if not (np.isfinite(losses[-1]) and bool(jnp.all(jnp.isfinite(params)))):
                raise ValueError(f"network: the loss or the parameters became NaN/inf at iteration {len(losses)}; "
                                 "check the network's x̂0 (and learning_rate)")
        values = np.asarray(_values_from(params, curve, tstep, param.link))
        known = None
    timings["iterations"] = time.perf_counter() - t_iter - timings["prepare"] - timings["compile"]
    t_final = time.perf_counter()
    if known is not None:
        step_loss = np.asarray(known, np.float64)
    else:
        step_loss = np.array([steps.loss(float(values[i]), xs[i], targets[i], tstep[i], norms[i], labels, batch,
                                         static=param.static(i, values[i])) for i in range(s)])
    if mix:
        local_loss = np.array([steps.loss(0.0, xs[i], targets[i], tstep[i], norms[i], labels, batch,
                                          static=param.static(i, 0.0)) for i in range(s)])
    timings["final"] = time.perf_counter() - t_final
    if mix:
        return MixtureCalibration(np.asarray(traj.ts), param.local, tuple(float(v) for v in values), np.asarray(losses),
                                  step_loss, local_loss, timings, optimizer)
    ells = values
    return SoftCalibration(np.asarray(traj.ts), tuple(float(v) for v in ells), machine.support,
                           machine.padding, machine.window, machine.edge, np.asarray(losses), step_loss, curve,
                           timings, optimizer)


def widths_from_sizes(sizes: Sequence[int], window: Literal["gaussian", "box"] = "box") -> list[float]:
    """Starting widths ``ℓ`` for a soft window from a patch-size schedule (e.g. :func:`grid_calibrate`'s):
    the box of half-side ``(k − 1)/2`` (the hard ``k×k`` patch up to the soft edges; at least 0.25),
    or a Gaussian of width ``k/3`` (at least 0.5).

    Example:
        >>> widths_from_sizes([1, 5, 9]), widths_from_sizes([3], "gaussian")
        ([0.25, 2.0, 4.0], [1.0])
    """
    if window not in ("gaussian", "box"):
        raise ValueError(f"window: must be 'gaussian' or 'box', got {window!r}")
    out = []
    for k in sizes:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"sizes: expected positive int patch sizes, got {k!r}")
        out.append(max((float(k) - 1.0) / 2.0, 0.25) if window == "box" else max(float(k) / 3.0, 0.5))
    return out


#: The smallest width the line search visits (a window narrower than this is the centre pixel only).
_ELL_MIN = 0.05


class _LineSearch:
    """Independent one-dimensional minimisations of ``f_i(u)`` from values and derivatives, run in
    lockstep (one evaluation per unfinished problem per round; see :func:`differentiable_calibrate`).

    Per problem: the points evaluated, a bracket ``(L, R)`` (``u_L < u_R``) once the minimiser is
    known to lie between two of them, the expansion step, and the best point so far."""

    # first expansion step, bracket width at which to stop (both in u = log ℓ), and the gain inside
    # a bracket (relative to the best value) below which one more evaluation is not worth its cost
    _STEP0, _TOL, _RTOL = 0.25, 0.05, 1e-3

    def __init__(self, u0, *, lo, hi):
        self.n = len(u0)
        self.lo, self.hi = float(lo), float(hi)
        self.next_u = np.asarray(u0, np.float64).copy()
        self.last = [None] * self.n  # (u, f, g) of the latest evaluation
        self.bracket = [None] * self.n
        self.step = np.full(self.n, self._STEP0)
        self.done = np.zeros(self.n, bool)
        self.best_u = self.next_u.copy()
        self.best_f = np.full(self.n, np.inf)

    def pending(self):
        return [i for i in range(self.n) if not self.done[i]]

    def propose(self):
        return self.next_u.copy()

    def update(self, results):
        for i, (f, g) in results.items():
            u = self.next_u[i]
            if f < self.best_f[i]:
                self.best_u[i], self.best_f[i] = u, f
            self._advance(i, (u, f, g))

    def _advance(self, i, pt):
        u, f, g = pt
        prev, self.last[i] = self.last[i], pt
        if not np.isfinite(f) or not np.isfinite(g) or g == 0.0:
            # only an exactly flat point stops the expansion: a small slope may sit on a plateau
            # with a lower valley further on (measured: the t = 1 step of a network's trajectory)
            self.done[i] = True
            return
        br = self.bracket[i]
        if br is None and prev is not None:
            # moving from prev to pt downhill: the minimiser is between them once the slope turns or f rises
            right = u > prev[0]
            if (g > 0) == right or f > prev[1]:
                br = (prev, pt) if right else (pt, prev)
        elif br is not None:
            left, rightpt = br
            # keep the side on which the slope changes sign (best point tracked separately)
            br = (left, pt) if g > 0 else (pt, rightpt)
        self.bracket[i] = br
        if br is None:  # expand downhill
            nxt = float(np.clip(u - np.sign(g) * self.step[i], self.lo, self.hi))
            self.step[i] *= 2.0
            if nxt == u:  # at the boundary and still pushed outwards
                self.done[i] = True
                return
            self.next_u[i] = nxt
            return
        (ul, fl, gl), (ur, fr, gr) = br
        width = ur - ul
        tau, predicted = _hermite_argmin(fl, fr, gl * width, gr * width)
        if width < self._TOL or self.best_f[i] - predicted <= self._RTOL * abs(self.best_f[i]):
            self.done[i] = True  # the bracket is tight, or the model promises no worthwhile gain
            return
        self.next_u[i] = ul + width * tau


def _hermite_argmin(f0, f1, m0, m1):
    """The minimiser over ``τ ∈ [0.1, 0.9]`` of the cubic Hermite interpolant with values ``f0, f1``
    and slopes ``m0, m1`` at ``τ = 0, 1`` (a dense evaluation: robust where the cubic is not convex),
    and the interpolant's value there."""
    tau = np.linspace(0.1, 0.9, 81)
    t2, t3 = tau * tau, tau * tau * tau
    p = (2 * t3 - 3 * t2 + 1) * f0 + (t3 - 2 * t2 + tau) * m0 + (-2 * t3 + 3 * t2) * f1 + (t3 - t2) * m1
    j = int(np.argmin(p))
    return float(tau[j]), float(p[j])


@partial(jax.jit, static_argnames=("side", "x0"))
def _step_value_and_grad(machine, ell, x, target, t, norm, label, *, side, x0=_WidthParam.x0):
    """One step's normalised loss ``L = mean‖x̂0(p) − x̂0_net‖² / norm`` at the static part ``side``
    (a soft machine's window side, a mixture's local scale) and ``dL/dp`` for the scalar parameter
    ``p`` (``ℓ``, or a mixture's ``w``), in forward mode: ``p`` is one scalar, so a JVP (the tangent
    carried through the same streaming pass) costs about one more forward pass, where reverse mode
    would store or recompute every chunk's softmax."""
    tb = jnp.full((x.shape[0],), t)
    out, dout = jax.jvp(lambda e: x0(machine, x, tb, label, e, side), (ell,), (jnp.ones_like(ell),))
    diff = out - target
    return jnp.mean(diff * diff) / norm, 2.0 * jnp.mean(diff * dout) / norm


class _StepPrograms:
    """Per static part (window side / local scale): the machine carrying only what that part needs (a
    fixed pytree structure, so each part's value-and-gradient program compiles once and is reused by
    every step and iteration)."""

    def __init__(self, machine, conditional, timings, param=None):
        self.machine, self.conditional, self.timings = machine, conditional, timings
        self.param = param if param is not None else _WidthParam(machine, 1.0, 1)
        self.views, self.compiled = {}, set()

    def view(self, static):
        if static not in self.views:
            t0 = time.perf_counter()
            self.views[static] = self.param.view(self.machine, static, self.conditional)
            self.timings["prepare"] += time.perf_counter() - t0
        return self.views[static]

    def _static(self, value, static):
        return self.param.static(0, value) if static is None else static

    def value_and_grad(self, value, x, target, t, norm, label, *, static=None):
        static = self._static(value, static)
        args = (self.view(static), jnp.float32(value), x, target, t, jnp.float32(norm), label)
        kw = {"side": static, "x0": self.param.x0}
        if ("grad", static) not in self.compiled:  # the first call compiles: time it apart
            t0 = time.perf_counter()
            out = jax.block_until_ready(_step_value_and_grad(*args, **kw))
            self.timings["compile"] += time.perf_counter() - t0
            self.compiled.add(("grad", static))
            return out
        return _step_value_and_grad(*args, **kw)

    def loss(self, value, x, target, t, norm, label, batch, *, static=None):
        static = self._static(value, static)
        m = self.view(static)
        x0 = map_padded(lambda xc, lc: _step_x0(m, jnp.float32(value), xc, t, lc, side=static, x0=self.param.x0),
                        batch, x, label)
        return float(jnp.mean((x0 - target) ** 2) / norm)


@partial(jax.jit, static_argnames=("side", "x0"))
def _step_x0(machine, ell, x, t, label, *, side, x0=_WidthParam.x0):
    return x0(machine, x, jnp.full((x.shape[0],), t), label, ell, side)


def _make_update(opt, curve, link="exp", bounds=None):
    @jax.jit
    def update(params, opt_state, dloss_dvalue, ts):
        # the chain rule from each step's dL/dp_i to the parameters (log ℓ or w per step, or the curve)
        _, vjp = jax.vjp(lambda p: _values_from(p, curve, ts, link), params)
        grads = vjp(dloss_dvalue)[0]
        updates, opt_state = opt.update(grads, opt_state, params)
        params = params + updates
        if link == "identity":  # projected onto the parameter's interval (a mixture's w in [0, 1])
            params = jnp.clip(params, *bounds)
        return params, opt_state

    return update
