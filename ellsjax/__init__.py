"""ellsjax: analytic (closed-form) diffusion denoisers in JAX.

The Equivariant Local Score machine of Kamb & Ganguli ("An analytic theory of creativity in
convolutional diffusion models", arXiv 2412.20292) and its relatives, with samplers, data and
tools to compare them with trained convolutional diffusion networks.

Example:
    >>> import jax, ellsjax as ej
    >>> images, labels = ej.data.load("mnist", limit=64)
    >>> m = ej.machines.els(images, padding="zeros")
    >>> x = jax.random.normal(jax.random.key(0), (1, *images.shape[1:]))
    >>> x0 = ej.samplers.ddim(m, x, [0.95, 0.5, 0.0], scales=[7, 3])
    >>> x0.shape
    (1, 28, 28, 1)
"""

from ellsjax import data, edm, explain, kernel, machines, plotting, samplers, schedules
from ellsjax.machines import Denoiser

__version__ = "0.1.0"

# Imported on first use: they pull in Flax NNX, optax and orbax (about a second), which the
# analytic machines do not need.
_LAZY = ("models", "nets", "training", "calibration", "evaluation", "reproduce")


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"ellsjax.{name}")
    raise AttributeError(f"module 'ellsjax' has no attribute {name!r}")


__all__ = ["data", "edm", "explain", "kernel", "machines", "plotting", "samplers", "schedules", "Denoiser", "__version__", *_LAZY]
