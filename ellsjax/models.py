"""Trained networks behind the same :class:`~ellsjax.machines.Denoiser` interface as the machines.

:func:`load` reads a run directory written by :func:`ellsjax.training.train` (or ``ellsjax train``)
and returns a :class:`NetworkDenoiser`: ``denoise(x_t, t, label=...)`` gives
``x̂0 = (x_t − s·ε̂)/a`` from the network's noise prediction ``ε̂``, ``eps`` gives ``ε̂`` itself and
``score`` ``−ε̂/s``. It is a pytree (the weights are its leaves), so :func:`ellsjax.samplers.ddim`,
calibration and evaluation take a trained network and an analytic machine alike; locality scales
passed to it are accepted and ignored.

Example:
    >>> import numpy as np, ellsjax as ej
    >>> cfg = ej.nets.NetConfig(image_size=12, width=16, depth=2)
    >>> d = ej.models.from_module(ej.nets.build(cfg), cfg)
    >>> x = np.random.default_rng(0).standard_normal((2, 12, 12, 1)).astype(np.float32)
    >>> ej.samplers.ddim(d, x, [0.9, 0.5, 0.0]).shape
    (2, 12, 12, 1)
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from ellsjax import _checks
from ellsjax import nets as _nets
from ellsjax import schedules as _schedules
from ellsjax.denoiser import Denoiser

__all__ = ["NetworkDenoiser", "load", "from_module"]

_MIN_SIGNAL_VAR = 1e-12


@dataclasses.dataclass(frozen=True, eq=False)
class NetworkDenoiser(Denoiser):
    """A trained ε-prediction network seen as a denoiser.

    Labels: a conditional network needs a class id per image (it was never trained without
    one), an unconditional network takes none. ``scale`` (the machines' locality) is accepted and
    ignored, so samplers and calibration tools can pass the scale schedules they give machines.

    Attributes:
        state: the network's weights (an ``nnx.State``; the pytree's leaves).
        graphdef: the network's static structure (``nnx.split``).
        config: the network's :class:`~ellsjax.nets.NetConfig`.
        schedule: the noise schedule the network was trained with.
        weights: ``"params"`` or ``"ema"``: which weights of the run these are.
    """

    state: nnx.State
    graphdef: nnx.GraphDef
    config: _nets.NetConfig
    schedule: _schedules.Schedule = _schedules.cosine_legacy()
    weights: str = "params"
    min_signal_var: ClassVar[float] = _MIN_SIGNAL_VAR

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.config.image_shape

    @property
    def conditional(self) -> bool:
        return self.config.conditional

    @property
    def num_classes(self) -> int | None:
        return self.config.num_classes if self.config.conditional else None

    def module(self) -> nnx.Module:
        """The network as an NNX module (``nnx.merge`` of ``graphdef`` and ``state``)."""
        return nnx.merge(self.graphdef, self.state)


    def check_label(self, label: Array | None) -> None:
        """A conditional network needs labels in ``[0, num_classes)``; an unconditional one none."""
        if not self.conditional:
            if label is not None:
                raise ValueError("label: this network is unconditional; pass label=None")
            return
        k = self.config.num_classes
        if label is None:
            raise ValueError(f"label: this network is class-conditional; pass a class id in [0, {k}) or one per image")
        bad = sorted({int(v) for v in np.asarray(label).ravel() if not 0 <= v < k})
        if bad:
            raise ValueError(f"label: class ids must lie in [0, {k}), got {bad}")

    def _label_ok(self, label):
        return (label >= 0) & (label < self.config.num_classes)

    def denoise(self, x_t: Any, t: Any, *, scale: int | None = None, label: Any = None) -> Float[Array, "b h w c"]:
        """Posterior-mean estimate ``x̂0 = (x_t − s·ε̂)/a``; undefined where ``a(t) = 0`` (raises).

        Args:
            x_t: ``[B, H, W, C]`` noisy images.
            t: a time in ``[0, 1]`` or one per image.
            scale: ``None`` (a network has no locality scale; any other value is refused).
            label: ``None``, a class id, or one per image (required by a conditional network).
        """
        x_t, t, label, scale = self.check_inputs(x_t, t, scale=scale, label=label)
        # ᾱ ≤ 1e-12 (a ≤ 1e-6, e.g. float32's cos²(π/2) ≈ 2e-15) would amplify ε̂'s error a millionfold
        msg = ("t: x̂0 = (x_t − s·ε̂)/a is undefined where the signal level a(t) is 0 (t = 1 for this "
               "schedule); use eps() or score() there")
        signal_free = self.schedule.variances(t)[0] <= self.min_signal_var
        if not _checks.is_concrete(t):
            t = _checks.runtime_check(t, signal_free, _checks.fail(msg))
        elif bool(jnp.any(signal_free)):
            raise ValueError(msg)
        return _jit_denoise(self, x_t, t, label)

    # -- pure ---------------------------------------------------------------------------------------
    def _net_eps(self, x_t, t, label):
        return self.module()(x_t, t, label)

    def _denoise(
        self, x_t: Float[Array, "b h w c"], t: Float[Array, " b"], label: Int[Array, " b"] | None, scale: Any = None
    ) -> Float[Array, "b h w c"]:
        a, s = self.schedule(t)
        eps = self._net_eps(x_t, t, label)
        return (x_t - s[:, None, None, None] * eps) / a[:, None, None, None]

    def _eps(self, x_t, t, label, scale=None):
        return self._net_eps(x_t, t, label)

    def _score(self, x_t, t, label, scale=None):
        s = jnp.sqrt(self.schedule.variances(t)[1])
        return -self._net_eps(x_t, t, label) / s[:, None, None, None]


jax.tree_util.register_dataclass(
    NetworkDenoiser, data_fields=["state"], meta_fields=["graphdef", "config", "schedule", "weights"]
)


@jax.jit
def _jit_denoise(d, x_t, t, label):
    return d._denoise(x_t, t, label, None)


def from_module(
    model: nnx.Module,
    config: _nets.NetConfig | None = None,
    *,
    schedule: _schedules.Schedule | str = "cosine_legacy",
    weights: str = "params",
) -> NetworkDenoiser:
    """Wrap an in-memory network (e.g. :func:`ellsjax.nets.build`) as a :class:`NetworkDenoiser`.

    Args:
        model: a :class:`~ellsjax.nets.ResNet` / :class:`~ellsjax.nets.UNet`, or any NNX module with
            the call convention ``model(x_t, t, label) -> ε̂`` and a ``config`` attribute.
        config: the network's config (default: ``model.config``).
        schedule: the noise schedule it was trained with (the paper's by default).
        weights: a tag recorded on the denoiser.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model: expected an NNX module, got {type(model).__name__}")
    config = getattr(model, "config", None) if config is None else config
    if not isinstance(config, _nets.NetConfig):
        raise TypeError(f"config: expected an ellsjax.nets.NetConfig, got {type(config).__name__}")
    graphdef, state = nnx.split(model)
    return NetworkDenoiser(state, graphdef, config, schedule=_schedules.get(schedule), weights=weights)


def load(dir: str | os.PathLike, *, ema: bool = True, step: int | None = None) -> NetworkDenoiser:
    """Load a trained network from a run directory (``ellsjax train --out DIR``).

    Args:
        dir: the run directory (holds ``config.json`` and ``checkpoints/``).
        ema: use the moving-average weights when the run kept them (``TrainConfig.ema_decay``);
            without EMA in the run, the trained weights are used either way.
        step: which checkpoint (default: the newest one that reads back; an unreadable newer one is
            reported on stderr).

    Returns:
        A :class:`NetworkDenoiser` with the run's noise schedule.

    Raises:
        FileNotFoundError: no directory, no ``config.json``, no checkpoint (for ``step``).
        ValueError: an unreadable ``config.json``, a corrupt checkpoint, or non-finite weights.

    Example:
        >>> import tempfile, jax.numpy as jnp, ellsjax as ej
        >>> net = ej.nets.NetConfig(image_size=12, width=16, depth=2)
        >>> cfg = ej.training.TrainConfig(steps=2, batch_size=16, lr=2e-3, ema_decay=0.9, limit=32)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = ej.training.train(d, net, cfg, progress=False)
        ...     model, raw = ej.models.load(d), ej.models.load(d, ema=False)
        >>> model.weights, raw.weights, model.denoise(jnp.zeros((3, 12, 12, 1)), 0.5).shape
        ('ema', 'params', (3, 12, 12, 1))
    """
    from ellsjax import training as _training

    out = Path(dir)
    raw = _training._read_config(out)
    net = _nets.NetConfig.from_dict(raw["net"])
    cfg = _training.TrainConfig.from_dict(raw["train"])
    abstract = nnx.eval_shape(lambda: _nets.build(net, rngs=nnx.Rngs(0)))
    graphdef, template = nnx.split(abstract)
    which = "ema" if (ema and cfg.ema_decay is not None) else "params"
    ckpt = _training._Checkpoints(out, create=False)
    if step is None:  # the newest checkpoint that reads back (an unreadable newer one is reported)
        step, got = ckpt.restore_newest({which: template}, log=_training._stderr)
    else:
        got = ckpt.restore(step, {which: template})
    state = got[which]
    if not _training._all_finite(state):  # a diverged run (saved before training refused to) samples NaN
        raise ValueError(f"dir: the {which} weights of {out} (checkpoint {step}) contain NaN or inf; the run "
                         "diverged, so every sample would be NaN: train again with a lower learning rate")
    return NetworkDenoiser(state, graphdef, net, schedule=cfg.schedule, weights=which)
