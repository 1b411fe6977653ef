"""The published tables, in one place: the paper's calibrated scale schedules, its networks, and
PSPC's patch-size schedule. Plain data (no JAX): the modules that use them
(:mod:`ellsjax.scales`, :mod:`ellsjax.nets`, the machines' registry specs) build their objects from it.

Three kinds of "schedule" appear in this library, named apart:

* the **noise schedule** ``t ↦ (a(t), s(t))`` (:class:`ellsjax.schedules.Schedule`);
* a **patch-size schedule**: one odd patch size ``k`` per sampler step (the tables below;
  :class:`ellsjax.scales.ScaleSchedule` with ``kind="size"``);
* a **window-width schedule**: one float width ``ℓ`` per step for the soft-window machines
  (:class:`ellsjax.scales.ScaleSchedule` with ``kind="width"``, written by the differentiable
  calibration).

Example:
    >>> from ellsjax import presets
    >>> presets.PAPER_SCALES["MNIST_ResNet_zeros"][:4], presets.published_scales("mnist", "zeros")
    ((3, 3, 5, 5), 'MNIST_ResNet_zeros')
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal, NamedTuple

__all__ = [
    "LazyTable",
    "PAPER_SCALES",
    "PAPER_SCALES_SOURCE",
    "paper_scales",
    "PUBLISHED_SCALES",
    "published_scales",
    "PSPC_CIFAR10_SCALES",
    "PSPC_CIFAR10_SOURCE",
    "NetworkSpec",
    "NETWORKS",
    "NETWORKS_SOURCE",
]

# Published per-step patch sizes, Kamb & Ganguli, "An analytic theory of creativity in convolutional
# diffusion models" (arXiv 2412.20292), as released in github.com/Kambm/convolutional_diffusion,
# files/scales_*.pt (copied from ../shared/reference/kamb_ganguli_scales.json). Index j = 0 … 19,
# 0 = lowest noise. Images 32×32 (MNIST/FashionMNIST resized from 28), cosine_legacy schedule.
# 'zeros' networks pair with the boundary-broken ELS machine, 'circular' with plain ELS.
#: Where :data:`PAPER_SCALES` comes from (paper and release files).
PAPER_SCALES_SOURCE = (
    "Kamb & Ganguli, arXiv 2412.20292; github.com/Kambm/convolutional_diffusion files/scales_*.pt"
)
#: The published per-step patch sizes by network name, as released (index 0 = lowest noise, 20 entries);
#: :func:`paper_scales` and ``ScaleSchedule.paper`` turn one into a sampler's schedule.
PAPER_SCALES: dict[str, tuple[int, ...]] = {
    "CIFAR10_ResNet_circular_conditional": (3, 3, 3, 3, 5, 5, 5, 5, 7, 7, 7, 9, 9, 11, 11, 13, 13, 15, 15, 15),
    "CIFAR10_ResNet_zeros_conditional": (3, 3, 3, 3, 5, 5, 5, 7, 7, 7, 7, 9, 9, 11, 11, 13, 15, 17, 17, 17),
    "CIFAR10_UNet_zeros_conditional": (3, 3, 3, 3, 5, 5, 5, 5, 7, 7, 7, 7, 9, 9, 11, 13, 13, 15, 17, 25),
    "CelebA_ResNet_zeros": (3, 3, 3, 5, 5, 5, 5, 5, 7, 7, 9, 9, 9, 11, 11, 11, 13, 15, 19, 19),
    "CelebA_UNet_zeros": (3, 3, 3, 3, 3, 3, 3, 5, 5, 5, 5, 5, 7, 7, 9, 9, 9, 13, 19, 27),
    "FashionMNIST_ResNet_zeros_conditional": (3, 3, 5, 5, 7, 7, 9, 9, 9, 11, 11, 11, 13, 13, 13, 15, 15, 15, 17, 17),
    "FashionMNIST_UNet_zeros_conditional": (3, 3, 5, 5, 7, 7, 7, 9, 11, 11, 11, 13, 15, 15, 21, 23, 25, 25, 25, 25),
    "MNIST_ResNet_circular": (3, 3, 5, 5, 5, 7, 7, 9, 9, 9, 11, 11, 11, 11, 9, 9, 7, 7, 3, 3),
    "MNIST_ResNet_zeros": (3, 3, 5, 5, 5, 7, 7, 7, 9, 9, 11, 11, 11, 11, 13, 15, 15, 15, 15, 15),
    "MNIST_UNet_zeros": (3, 3, 3, 5, 5, 7, 7, 7, 9, 9, 9, 11, 13, 15, 17, 21, 23, 23, 25, 27),
}

#: The published patch-size schedule matching a dataset and a network padding (the ResNet ones:
#: ``zeros`` networks are explained by bbELS, ``circular`` ones by ELS).
PUBLISHED_SCALES: dict[tuple[str, str], str] = {
    ("mnist", "zeros"): "MNIST_ResNet_zeros",
    ("mnist", "circular"): "MNIST_ResNet_circular",
    ("fashion_mnist", "zeros"): "FashionMNIST_ResNet_zeros_conditional",
    ("cifar10", "zeros"): "CIFAR10_ResNet_zeros_conditional",
    ("cifar10", "circular"): "CIFAR10_ResNet_circular_conditional",
    ("celeb_a", "zeros"): "CelebA_ResNet_zeros",
}


def published_scales(dataset: str, padding: str) -> str | None:
    """The :data:`PAPER_SCALES` name published for ``dataset`` and a network ``padding`` (or ``None``)."""
    return PUBLISHED_SCALES.get((dataset, padding))


def paper_scales(
    name: str, *, convention: Literal["sampler", "calibration"] = "sampler"
) -> tuple[int, ...]:
    """Per-step patch sizes of a published preset, aligned with the paper's 20-point time grid
    (:func:`ellsjax.schedules.paper_times`).

    Returns 19 scales, ``scales[i]`` used at ``paper_times(20)[i]``, ready for
    ``ej.samplers.ddim(m, x, paper_times(20), scales=...)``.

    The released files are ambiguous by one step: the calibration script stores at index ``j`` the
    best scale found at ``t = (j+1)/20``, while the reference sampler applies index ``j`` at
    ``t = j/20``. ``convention="sampler"`` (default) reproduces the reference sampler, i.e. the
    published figures; ``convention="calibration"`` uses at each ``t`` the scale calibrated there.

    Args:
        name: a key of :data:`PAPER_SCALES`, e.g. ``"MNIST_ResNet_zeros"``.
        convention: ``"sampler"`` or ``"calibration"``.
    """
    if name not in PAPER_SCALES:
        raise ValueError(f"name: unknown scale preset {name!r}; known: {sorted(PAPER_SCALES)}")
    raw = PAPER_SCALES[name]
    n = len(raw)
    if convention == "sampler":  # t = j/n uses raw[j], j = n-1 … 1
        return tuple(raw[j] for j in range(n - 1, 0, -1))
    if convention == "calibration":  # t = j/n uses raw[j-1]
        return tuple(raw[j - 1] for j in range(n - 1, 0, -1))
    raise ValueError(f"convention: must be 'sampler' or 'calibration', got {convention!r}")


#: PSPC-Square patch sizes for 32×32 CIFAR-10 over the 18 steps of the EDM grid
#: ``ej.edm.karras_sigmas(18)`` (σ from 80 to 0.002), step ``i`` at ``σ_i``.
PSPC_CIFAR10_SCALES: tuple[int, ...] = (32, 32, 32, 32, 32, 32, 32, 23, 15, 11, 7, 5, 3, 3, 3, 3, 3, 3)
#: Where :data:`PSPC_CIFAR10_SCALES` comes from.
PSPC_CIFAR10_SOURCE = (
    "Niedoba et al., ICML 2025, appendix B; github.com/plai-group/pspc CIFAR_PATCH_SCHEDULE (18-step EDM grid)"
)


class NetworkSpec(NamedTuple):
    """One of the paper's networks, as data (:func:`ellsjax.nets.preset` builds its ``NetConfig``)."""

    dataset: str
    channels: int
    arch: str
    padding: str
    conditional: bool
    epochs: int = 300


#: Where :data:`NETWORKS` comes from (paper appendix and release scripts).
NETWORKS_SOURCE = (
    "Kamb & Ganguli, arXiv 2412.20292 App. C.1; github.com/Kambm/convolutional_diffusion "
    "(scripts/training_script.py: ResNet width 128·mult = 256, last kernel 3, no normalization; UNet features "
    "mult·32·2^i = 64, 128, 256, embedding 256; README: CIFAR-10 ResNet with --layers 8)"
)

#: The paper's networks, keyed like :data:`PAPER_SCALES` (whose schedules were calibrated against them).
NETWORKS: dict[str, NetworkSpec] = {
    "MNIST_ResNet_zeros": NetworkSpec("mnist", 1, "resnet", "zeros", False),
    "MNIST_ResNet_circular": NetworkSpec("mnist", 1, "resnet", "circular", False),
    "MNIST_UNet_zeros": NetworkSpec("mnist", 1, "unet", "zeros", False),
    "MNIST_UNet_circular": NetworkSpec("mnist", 1, "unet", "circular", False),
    "FashionMNIST_ResNet_zeros_conditional": NetworkSpec("fashion_mnist", 1, "resnet", "zeros", True),
    "FashionMNIST_UNet_zeros_conditional": NetworkSpec("fashion_mnist", 1, "unet", "zeros", True),
    "CIFAR10_ResNet_zeros_conditional": NetworkSpec("cifar10", 3, "resnet", "zeros", True),
    "CIFAR10_ResNet_circular_conditional": NetworkSpec("cifar10", 3, "resnet", "circular", True),
    "CIFAR10_UNet_zeros_conditional": NetworkSpec("cifar10", 3, "unet", "zeros", True),
    "CelebA_ResNet_zeros": NetworkSpec("celeb_a", 3, "resnet", "zeros", False),
    "CelebA_UNet_zeros": NetworkSpec("celeb_a", 3, "unet", "zeros", False),
}


class LazyTable(Mapping):
    """A read-only ``name → entry`` table built by ``factory()`` on first access, once (tables whose
    entries import heavy modules, e.g. network configs importing Flax)."""

    def __init__(self, factory: Callable[[], dict[str, Any]]):
        self._factory = factory
        self._table: dict[str, Any] | None = None

    def _get(self) -> dict[str, Any]:
        if self._table is None:
            self._table = self._factory()
        return self._table

    def __getitem__(self, key: str) -> Any:
        return self._get()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())
