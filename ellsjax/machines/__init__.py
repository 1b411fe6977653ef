"""Analytic denoisers ("machines"): the ideal score, the local score and the equivariant local score,
and the other closed-form denoisers of this literature (PSPC, Wiener, PCA locality, σ-CFDM).

Every machine is a frozen pytree holding its training set; ``denoise``, ``score`` and ``eps`` take a
noisy batch ``x_t`` ``[B, H, W, C]``, a time ``t`` and (for the local machines) a patch size ``scale``.

Example:
    >>> import jax, ellsjax as ej
    >>> imgs = jax.random.uniform(jax.random.key(0), (6, 8, 8, 1), minval=-1, maxval=1)
    >>> m = ej.machines.els(imgs, padding="circular")
    >>> m.score(imgs[:1], 0.5, scale=3).shape
    (1, 8, 8, 1)
"""

from ellsjax.machines.base import DEFAULT_MEMORY_BUDGET, Denoiser, Machine, default_memory_budget
from ellsjax.machines.cfdm import SmoothedClosedForm, cfdm, cfdm_time, from_cfdm_time
from ellsjax.machines.ideal import IdealScore, ideal
from ellsjax.machines.patch import EquivariantLocalScore, LocalScore, bbels, els, local
from ellsjax.machines.pca import PCALocality, pca
from ellsjax.machines.pca import neighbourhoods as pca_neighbourhoods
from ellsjax.machines.pspc import PSPC_CIFAR10_SCALES, PatchSetPosteriorComposite, pspc
from ellsjax.machines.soft import SoftEquivariantLocalScore, soft_bbels, soft_els
from ellsjax.machines.wiener import Wiener, wiener

#: Machines by name, for the command line and the evaluation tools: ``name → builder(images,
#: labels=None, **options)``. New machines register here.
MACHINES = {
    "is": ideal,
    "ls": local,
    "els": els,
    "bbels": bbels,
    "pspc": pspc,
    "wiener": wiener,
    "pca": pca,
    "cfdm": cfdm,
    "soft-els": soft_els,
    "soft-bbels": soft_bbels,
}


def build(name: str, images, labels=None, **options) -> Machine:
    """Build a machine by its registry name (see :data:`MACHINES`), passing ``options`` through.

    Example:
        >>> import jax, ellsjax as ej
        >>> imgs = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1), minval=-1, maxval=1)
        >>> type(ej.machines.build("bbels", imgs)).__name__
        'EquivariantLocalScore'
    """
    if name not in MACHINES:
        raise ValueError(f"name: unknown machine {name!r}; known: {sorted(MACHINES)}")
    return MACHINES[name](images, labels, **options)

__all__ = [
    "Denoiser",
    "Machine",
    "IdealScore",
    "LocalScore",
    "EquivariantLocalScore",
    "ideal",
    "local",
    "els",
    "bbels",
    "PatchSetPosteriorComposite",
    "Wiener",
    "PCALocality",
    "SmoothedClosedForm",
    "pspc",
    "wiener",
    "pca",
    "cfdm",
    "cfdm_time",
    "from_cfdm_time",
    "pca_neighbourhoods",
    "PSPC_CIFAR10_SCALES",
    "MACHINES",
    "build",
    "SoftEquivariantLocalScore",
    "soft_els",
    "soft_bbels",
    "DEFAULT_MEMORY_BUDGET",
    "default_memory_budget",
]
