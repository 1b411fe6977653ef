"""ellsjax: analytic (closed-form) diffusion denoisers in JAX.

The Equivariant Local Score machine of Kamb & Ganguli ("An analytic theory of creativity in
convolutional diffusion models", arXiv 2412.20292) and its relatives, with samplers, data and
tools to compare them with trained convolutional diffusion networks.

Submodules load on first use (``import ellsjax.data`` loads no machine or sampler code), so
``ellsjax.machines``, ``ellsjax.samplers`` … are attributes of the package as usual.

Example:
    >>> import jax, ellsjax as ej
    >>> images, labels = ej.data.load("mnist", limit=64, image_size=12)
    >>> m = ej.machines.els(images, padding="circular")
    >>> x = jax.random.normal(jax.random.key(0), (4, *images.shape[1:]))
    >>> x0 = ej.samplers.ddim(m, x, ej.schedules.paper_times(5), scales=[7, 5, 3, 3])
    >>> x0.shape
    (4, 12, 12, 1)
"""

import importlib
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("ellsjax")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

#: The public submodules, bottom layer first; each is imported when first accessed.
_SUBMODULES = (
    "data", "schedules", "presets", "scales", "edm", "kernel", "denoiser", "machines", "samplers", "models",
    "nets", "training", "convert", "calibration", "evaluation", "explain", "reproduce", "studies", "locality", "plotting",
    "cli",
)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"ellsjax.{name}")
    if name == "Denoiser":
        return importlib.import_module("ellsjax.denoiser").Denoiser
    raise AttributeError(f"module 'ellsjax' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_SUBMODULES, "Denoiser"])


__all__ = [*_SUBMODULES, "Denoiser", "__version__"]
