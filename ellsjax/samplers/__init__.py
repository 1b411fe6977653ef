"""Samplers that run any :class:`~ellsjax.machines.Denoiser` (analytic machine or trained network).

Example:
    >>> import jax, ellsjax as ej
    >>> imgs = jax.random.uniform(jax.random.key(0), (8, 8, 8, 1), minval=-1, maxval=1)
    >>> m = ej.machines.els(imgs)
    >>> x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    >>> ej.samplers.ddim(m, x, [0.9, 0.5, 0.2, 0.0], scales=[5, 3, 3]).shape
    (2, 8, 8, 1)
"""

from ellsjax.samplers._ddim import Trajectory, check_scales, check_times, ddim
from ellsjax.samplers._ddpm import ddpm
from ellsjax.samplers._diffrax import ODE_SOLVERS, SDE_SOLVERS, ode, sde
from ellsjax.samplers._edm import check_sigmas, euler, heun

__all__ = [
    "ddim", "ddpm", "euler", "heun", "ode", "sde", "Trajectory", "check_times", "check_scales", "check_sigmas",
    "ODE_SOLVERS", "SDE_SOLVERS",
]
