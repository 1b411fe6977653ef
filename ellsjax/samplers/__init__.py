"""Samplers that run any :class:`~ellsjax.denoiser.Denoiser` (analytic machine or trained network).

Each sampler is a :class:`Method` (its step) run by one driver (:func:`run`: argument checks,
preparation of the denoiser, progress, equal-scale runs, the trajectory). :func:`run` is public: with
its ``x0_fn`` hook any sampler can be replayed with another ``x̂0`` function (e.g. one that also
reports provenance, :func:`ellsjax.explain.provenance`).

Example:
    >>> import jax, ellsjax as ej
    >>> imgs = jax.random.uniform(jax.random.key(0), (8, 8, 8, 1), minval=-1, maxval=1)
    >>> m = ej.machines.els(imgs)
    >>> x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    >>> ej.samplers.ddim(m, x, [0.9, 0.5, 0.2, 0.0], scales=[5, 3, 3]).shape
    (2, 8, 8, 1)
"""

from ellsjax.samplers._ddim import DDIM, ddim
from ellsjax.samplers._ddpm import DDPM, ddpm
from ellsjax.samplers._diffrax import ODE_SOLVERS, SDE_SOLVERS, ode, sde
from ellsjax.samplers._driver import Method, Trajectory, check_denoiser, check_scales, check_times, run, runs
from ellsjax.samplers._edm import EULER, HEUN, check_sigmas, euler, heun

__all__ = [
    "ddim", "ddpm", "euler", "heun", "ode", "sde", "Trajectory", "check_times", "check_scales", "check_sigmas",
    "check_denoiser", "ODE_SOLVERS", "SDE_SOLVERS", "Method", "run", "runs", "DDIM", "DDPM", "EULER", "HEUN",
]
