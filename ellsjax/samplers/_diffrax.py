r"""Probability-flow ODE (adaptive steps) and reverse-SDE samplers through diffrax, for any denoiser.

Both work in EDM variables (:mod:`ellsjax.edm`): the state ``x̃ = x_t/a`` and the forward-running
time ``ρ = −log σ`` (``σ = s/a``), in which both equations are well conditioned from ``σ ≈ 80`` down
to ``σ ≈ 10⁻³``. With ``D(x̃; σ)`` the denoiser's ``x̂0`` at the VP state ``a·x̃`` and time ``t(σ)``:

.. math::

    \text{PF-ODE:}\quad \frac{d\tilde x}{d\rho} = D(\tilde x; \sigma) - \tilde x, \qquad
    \text{reverse SDE:}\quad d\tilde x = 2\big(D(\tilde x; \sigma) - \tilde x\big)\,d\rho + \sqrt{2}\,\sigma\,dW_\rho .

The ODE is ``dx̃/dσ = (x̃ − D)/σ`` (Karras et al. 2022, eq. 3) with ``dσ = −σ dρ``; the SDE is the
reverse-time SDE (Anderson 1982; Song et al. 2021) of the forward process ``dx̃ = dW_{σ²}``, written in
``ρ`` (``dσ² = −2σ² dρ``), i.e. Karras et al.'s eq. 6 with ``β = 1``. Its noise is additive, so
solvers for additive noise (ShARK, SRA1, SEA) reach strong order 1.5 where Euler–Maruyama has 1/2.

Grids: ``ts`` (decreasing VP times) as for every sampler here; the solution is saved at them. A grid
ending where ``σ = 0`` (``t = 0`` for the paper's schedule) cannot be reached in ``ρ``: the solve
continues from ``σ_{S−1}`` to ``σ_stop = min(sigma_stop, σ_{S−1}/2)`` and finishes with the denoising
step ``x̃ = D(x̃; σ_stop)`` (the Euler step of the EDM samplers). ``x_start`` and results are VP
states, as for :func:`ellsjax.samplers.ddim`.

Scales: ``scales[i]`` (static) holds on ``[ts[i], ts[i+1]]``; runs of equal scales are one solve,
so a per-step patch-size schedule becomes piecewise-constant in time.

Example:
    >>> import jax, ellsjax as ej
    >>> imgs = jax.random.uniform(jax.random.key(0), (8, 6, 6, 1), minval=-1, maxval=1)
    >>> m = ej.machines.wiener(imgs)
    >>> x = jax.random.normal(jax.random.key(1), (2, 6, 6, 1))
    >>> ej.samplers.ode(m, x, [0.9, 0.5, 0.0]).shape      # ej.samplers.sde(m, x, ts, key=0) likewise
    (2, 6, 6, 1)
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Sequence
from typing import Any

import diffrax
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, ArrayLike, Float

from ellsjax import edm as _edm
from ellsjax._typing import TimeGrid
from ellsjax.denoiser import Denoiser
from ellsjax.samplers._ddpm import as_key
from ellsjax.samplers._driver import Method, Trajectory, check_denoiser, check_scales, run
from ellsjax.samplers._edm import edm_denoise, resolve_grid

__all__ = ["ode", "sde", "ODE_SOLVERS", "SDE_SOLVERS"]

#: Adaptive Runge–Kutta solvers for :func:`ode` (each with an embedded error estimate).
ODE_SOLVERS = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5, "dopri8": diffrax.Dopri8,
               "bosh3": diffrax.Bosh3, "heun": diffrax.Heun}
#: Solvers for :func:`sde`: Euler–Maruyama, and three of strong order 1.5 for additive noise.
SDE_SOLVERS = {"euler": diffrax.Euler, "shark": diffrax.ShARK, "sra1": diffrax.SRA1, "sea": diffrax.SEA}


def _rho_grid(ts, sig, sigma_stop):
    """``ρ = −log σ`` at each grid point; a final ``σ = 0`` becomes ``σ_stop``. Also returns the
    ``σ`` actually reached at the end and whether a final denoising step is due."""
    final_zero = sig[-1] <= 0
    stop = jnp.minimum(sigma_stop, 0.5 * sig[-2])
    end = jnp.where(final_zero, stop, sig[-1])
    sig_eff = sig.at[-1].set(end)
    return -jnp.log(sig_eff), sig_eff, final_zero


def _init(ctx, x):
    return _edm.to_edm(x, ctx.grid[1][0])


def _finish(ctx, xe, keys):
    """VP state at the last grid point: the denoising step where it is noise-free."""
    ts, sig, rho, sig_eff = ctx.grid
    final_zero = ctx.args[0]

    def denoised():
        s = sig_eff[-1]
        return edm_denoise(ctx, xe, _edm.to_time(s, ctx.denoiser.schedule), s, keys[-1])[0]

    return jax.lax.cond(final_zero, denoised, lambda: _edm.from_edm(xe, sig_eff[-1]))


def _outputs(ctx, xe, ys, start, n, k, keep):
    """VP states at the run's grid points and, if kept, ``x̂0`` at each step's start."""
    ts, sig, _, _ = ctx.grid
    xs = jax.vmap(_edm.from_edm)(ys, sig[start + 1 : start + n + 1])
    if not keep:
        return xs, None
    starts = jnp.concatenate([xe[None], ys[:-1]])
    x0s = jnp.stack([edm_denoise(ctx, starts[j], ts[start + j], sig[start + j], k)[0] for j in range(n)])
    return xs, x0s


def _field(ctx, k, scale):
    def f(r, y, args):
        s = jnp.exp(-r)
        return scale * (edm_denoise(ctx, y, _edm.to_time(s, ctx.denoiser.schedule), s, k)[0] - y)

    return f


def _ode_segment(config, ctx, xe, start, n, k, keep):
    solver, rtol, atol, max_steps = config
    rho = ctx.grid[2]
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_field(ctx, k, 1.0)), ODE_SOLVERS[solver](), rho[start], rho[start + n], None, xe,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        saveat=diffrax.SaveAt(ts=rho[start + 1 : start + n + 1]), max_steps=max_steps,
    )
    stats = {name: jnp.asarray(sol.stats[name])[None] for name in _STATS}
    return sol.ys[-1], (*_outputs(ctx, xe, sol.ys, start, n, k, keep), stats)


def _sde_segment(config, ctx, xe, start, n, k, keep):
    solver, substeps = config
    rho = ctx.grid[2]
    key = ctx.args[1]
    frac = jnp.arange(substeps, dtype=jnp.float32) / substeps
    fine = (rho[:-1, None] + (rho[1:] - rho[:-1])[:, None] * frac[None]).reshape(-1)  # [S·substeps]
    tol = 0.25 * jnp.min(rho[1:] - rho[:-1]) / substeps
    levy = diffrax.BrownianIncrement if solver == "euler" else diffrax.SpaceTimeLevyArea
    # the same path in every run: a function of the key and the whole grid's ρ range only
    bm = diffrax.VirtualBrownianTree(rho[0], rho[-1], tol=tol, shape=jax.ShapeDtypeStruct(xe.shape, jnp.float32),
                                     key=key, levy_area=levy)

    def diffusion(r, y, args):
        return lx.DiagonalLinearOperator(jnp.full(xe.shape, jnp.sqrt(2.0) * jnp.exp(-r), jnp.float32))

    steps = jnp.concatenate([fine[start * substeps : (start + n) * substeps], rho[start + n][None]])
    terms = diffrax.MultiTerm(diffrax.ODETerm(_field(ctx, k, 2.0)), diffrax.ControlTerm(diffusion, bm))
    sol = diffrax.diffeqsolve(
        terms, SDE_SOLVERS[solver](), rho[start], rho[start + n], None, xe,
        stepsize_controller=diffrax.StepTo(ts=steps), saveat=diffrax.SaveAt(ts=rho[start + 1 : start + n + 1]),
        max_steps=n * substeps,
    )
    return sol.ys[-1], (*_outputs(ctx, xe, sol.ys, start, n, k, keep), None)


_STATS = ("num_steps", "num_accepted_steps", "num_rejected_steps")


@functools.lru_cache(maxsize=64)
def _ode_method(solver: str, rtol: float, atol: float, max_steps: int) -> Method:
    # one Method object per configuration: it is a static argument of the compiled trajectory
    return Method(step=None, init=_init, finish=_finish,
                  segment=functools.partial(_ode_segment, (solver, rtol, atol, max_steps)))


@functools.lru_cache(maxsize=64)
def _sde_method(solver: str, substeps: int) -> Method:
    return Method(step=None, init=_init, finish=_finish, segment=functools.partial(_sde_segment, (solver, substeps)))


def _solve(method, denoiser, x, ts, sig, label, args, scales, sigma_stop, return_trajectory):
    rho, sig_eff, final_zero = _rho_grid(ts, sig, jnp.float32(sigma_stop))
    out, traj, aux = run(method, denoiser, x, (ts, sig, rho, sig_eff), scales=scales, label=label,
                         args=(final_zero, *args), return_trajectory=return_trajectory, checked=True)
    if traj is not None:  # the last grid point is the finished state (denoised where σ = 0)
        traj = traj._replace(xs=traj.xs.at[-1].set(out))
    return out, traj, aux


def _positive(v, name):
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (0 < v < float("inf")):
        raise ValueError(f"{name}: expected a positive finite float, got {v!r}")
    return float(v)


def ode(
    denoiser: Denoiser,
    x_start: Float[ArrayLike, "b h w c"],
    ts: TimeGrid,
    *,
    scales: Sequence[Any] | None = None,
    label: Any = None,
    solver: str = "tsit5",
    rtol: float = 1e-4,
    atol: float = 1e-4,
    sigma_stop: float = 0.002,
    max_steps: int = 4096,
    return_trajectory: bool = False,
    return_stats: bool = False,
) -> Any:
    """Adaptive-step probability-flow ODE solve (diffrax, PID step control), one jitted program.

    Args:
        denoiser: a machine or a trained network.
        x_start: ``[B, H, W, C]`` the VP state at ``ts[0]``.
        ts: decreasing VP times; the solution is reported at each (see the module docstring for a
            noise-free end).
        scales: ``len(ts) − 1`` patch sizes, ``scales[i]`` on ``[ts[i], ts[i+1]]`` (static).
        label: ``None``, a class id, or ``[B]`` ids, for a conditional denoiser.
        solver: a key of :data:`ODE_SOLVERS` (``tsit5``, ``dopri5``, ``dopri8``, ``bosh3``, ``heun``).
        rtol, atol: the step controller's tolerances on ``x̃`` (RMS over the whole batch).
        sigma_stop: where a noise-free end stops integrating (EDM's ``σ_min``; see module docstring).
        max_steps: per solve; exceeding it raises.
        return_trajectory: also return a :class:`~ellsjax.samplers.Trajectory` at the grid points.
        return_stats: also return diffrax's step counts (``num_steps``, ``num_accepted_steps``,
            ``num_rejected_steps``) summed over the solves.

    Returns:
        The VP state at ``ts[-1]``; then the trajectory and/or the stats if asked, in that order.
    """
    x, label = check_denoiser(denoiser, x_start, label)
    ts, sig = resolve_grid(denoiser, ts, None)
    scales = check_scales(scales, denoiser, ts.shape[0] - 1)
    if solver not in ODE_SOLVERS:
        raise ValueError(f"solver: unknown ODE solver {solver!r}; known: {sorted(ODE_SOLVERS)}")
    rtol, atol, sigma_stop = _positive(rtol, "rtol"), _positive(atol, "atol"), _positive(sigma_stop, "sigma_stop")
    if isinstance(max_steps, bool) or not isinstance(max_steps, numbers.Integral) or max_steps < 1:
        raise ValueError(f"max_steps: expected a positive int, got {max_steps!r}")
    method = _ode_method(solver, rtol, atol, int(max_steps))
    out, traj, stats = _solve(method, denoiser, x, ts, sig, label, (), scales, sigma_stop, return_trajectory)
    result: list[Any] = [out]
    if return_trajectory:
        result.append(traj)
    if return_stats:
        result.append({k: int(jnp.sum(v)) for k, v in stats.items()})
    return result[0] if len(result) == 1 else tuple(result)


def sde(
    denoiser: Denoiser,
    x_start: Float[ArrayLike, "b h w c"],
    ts: TimeGrid,
    *,
    key: jax.Array | int,
    scales: Sequence[Any] | None = None,
    label: Any = None,
    solver: str = "shark",
    substeps: int = 1,
    sigma_stop: float = 0.002,
    return_trajectory: bool = False,
) -> Float[Array, "b h w c"] | tuple[Float[Array, "b h w c"], Trajectory]:
    """Reverse-SDE sampling (diffrax, a ``VirtualBrownianTree`` from ``key``), one jitted program.

    Fixed steps: each grid interval ``[ts[i], ts[i+1]]`` is cut into ``substeps`` equal steps in
    ``ρ = −log σ``. Deterministic given ``key``; the Brownian path depends only on ``key`` and the
    grid's ``ρ`` range, so refining ``substeps`` refines the same path.

    Args:
        denoiser: a machine or a trained network.
        x_start: ``[B, H, W, C]`` the VP state at ``ts[0]``.
        ts: decreasing VP times (see the module docstring for a noise-free end).
        key: int seed or ``jax.random`` key.
        scales: ``len(ts) − 1`` patch sizes, ``scales[i]`` on ``[ts[i], ts[i+1]]`` (static).
        label: ``None``, a class id, or ``[B]`` ids, for a conditional denoiser.
        solver: a key of :data:`SDE_SOLVERS`: ``euler`` (Euler–Maruyama) or ``shark`` / ``sra1`` /
            ``sea`` (additive-noise solvers of strong order 1.5; they draw space-time Lévy areas).
        substeps: solver steps per grid interval.
        sigma_stop: where a noise-free end stops integrating (see the module docstring).
        return_trajectory: also return a :class:`~ellsjax.samplers.Trajectory` at the grid points.
    """
    x, label = check_denoiser(denoiser, x_start, label)
    ts, sig = resolve_grid(denoiser, ts, None)
    scales = check_scales(scales, denoiser, ts.shape[0] - 1)
    if solver not in SDE_SOLVERS:
        raise ValueError(f"solver: unknown SDE solver {solver!r}; known: {sorted(SDE_SOLVERS)}")
    if isinstance(substeps, bool) or not isinstance(substeps, numbers.Integral) or substeps < 1:
        raise ValueError(f"substeps: expected a positive int, got {substeps!r}")
    sigma_stop = _positive(sigma_stop, "sigma_stop")
    out, traj, _ = _solve(_sde_method(solver, int(substeps)), denoiser, x, ts, sig, label, (as_key(key),), scales,
                          sigma_stop, return_trajectory)
    return (out, traj) if return_trajectory else out
