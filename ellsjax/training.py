"""Train the paper's diffusion networks (:mod:`ellsjax.nets`): ε-prediction, AdamW, orbax checkpoints.

The objective is the reference's: ``t = randint(0, time_levels)/time_levels``, ``x_t = a(t)·x0 +
s(t)·ε`` under the paper's cosine schedule, loss ``mean((net(x_t, t, label) − ε)²)``; AdamW with
a per-step exponential learning-rate decay; batch 128.

A run lives in one directory::

    DIR/config.json      network, training options and a fingerprint of the data
    DIR/metrics.jsonl    one JSON object per logged step: step, epoch, loss (mean since the previous
                         record), lr, images_per_s (since the previous record, checkpointing excluded;
                         the first record includes compilation), time_s (since this call started)
    DIR/checkpoints/N/   orbax checkpoints (params, optimizer state, EMA, RNG key, step)

Everything random is a function of ``(seed, step)``: the noise and times of update ``s`` come from
``fold_in(key, s)``, and batch ``i`` of epoch ``e`` is slice ``i`` of a permutation drawn from
``(seed, e)``. A checkpoint therefore resumes exactly: on CPU, stopping at ``N`` and resuming to
``2N`` reproduces an uninterrupted run bit for bit. Ctrl-C (SIGINT) or ``kill`` (SIGTERM, what
schedulers such as SLURM, Kubernetes and preemptible VMs send) finishes the current step, saves a
checkpoint and returns (``TrainResult.interrupted``); a second signal aborts at once. A non-finite
loss stops the run at its first such step with :class:`NonFiniteLossError`; a checkpoint is only
saved when its weights are finite, so the newest one is the last good state.

Example:
    >>> import tempfile, ellsjax as ej
    >>> net = ej.nets.NetConfig(arch="resnet", image_size=12, width=16, depth=2)
    >>> cfg = ej.training.TrainConfig(steps=3, batch_size=16, lr=2e-3, ema_decay=0.9, limit=32)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     result = ej.training.train(d, net, cfg, progress=False)
    ...     model = ej.models.load(d)   # the EMA weights
    >>> result.step, result.interrupted, model.image_shape
    (3, False, (12, 12, 1))
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ellsjax import _checks
from ellsjax import nets as _nets
from ellsjax import schedules as _schedules

__all__ = [
    "TrainConfig",
    "TrainState",
    "TrainResult",
    "NonFiniteLossError",
    "train",
    "make_optimizer",
    "make_train_step",
    "init_state",
    "batch_indices",
    "load_data",
    "load_run_config",
    "latest_step",
    "CONFIG_FILE",
    "METRICS_FILE",
    "CHECKPOINT_DIR",
]

#: A run directory's configuration file (the network and training configs).
CONFIG_FILE = "config.json"
#: A run directory's metrics, one JSON line per logged step.
METRICS_FILE = "metrics.jsonl"
#: A run directory's checkpoint folder, one subfolder per saved step.
CHECKPOINT_DIR = "checkpoints"
_FORMAT = "ellsjax-train-run/1"
# Options that only say how long to run and how often to report; a resumed run may change them.
_RUN_LENGTH_FIELDS = ("steps", "log_every", "checkpoint_every", "keep_checkpoints")
_NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Training options (frozen; defaults are the paper's).

    Attributes:
        steps: total optimizer updates of the run (a resumed run continues up to it).
        batch_size: images per update (paper: 128). Each epoch drops the last ``N mod batch_size``
            images of its permutation, so every batch has the same shape.
        lr: AdamW learning rate (paper: 1e-4).
        weight_decay: AdamW decoupled weight decay (paper: 0).
        lr_decay: per-update exponential decay ``γ``: update ``s`` (0-based) uses ``lr·γ^s``
            (paper: 0.999965).
        ema_decay: keep an exponential moving average of the weights with this decay (e.g. 0.999),
            or ``None`` (paper: no EMA).
        seed: seeds the initialization, the noise and times, and the data order.
        time_levels: ``t`` is drawn uniformly from ``{0, 1, …, time_levels−1}/time_levels`` (paper: 1000).
        schedule: the noise schedule (paper: :func:`ellsjax.schedules.cosine_legacy`).
        log_every: write a metrics line every this many updates (and at the last).
        checkpoint_every: save a checkpoint every this many updates (and at the last).
        keep_checkpoints: how many recent checkpoints to keep.
        dataset: :func:`ellsjax.data.load` name (when :func:`train` loads the data itself).
        source: :func:`ellsjax.data.load` source.
        path: file or directory for the ``npz`` / ``idx`` sources.
        data_dir: tensorflow-datasets directory for the ``tfds`` source.
        split: dataset split.
        limit: train on the first ``limit`` images only (``None``: all the source has).
    """

    steps: int
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_decay: float = 0.999965
    ema_decay: float | None = None
    seed: int = 0
    time_levels: int = 1000
    schedule: _schedules.Schedule = _schedules.cosine_legacy()
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    dataset: str = "mnist"
    source: str = "bundled"
    path: str | None = None
    data_dir: str | None = None
    split: str = "train"
    limit: int | None = None

    def __post_init__(self):
        for name in ("steps", "batch_size", "time_levels", "log_every", "checkpoint_every", "keep_checkpoints"):
            _checks.check_positive_int(getattr(self, name), name)
        if self.limit is not None:
            _checks.check_positive_int(self.limit, "limit")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {self.seed!r}")
        for name, lo, hi in (("lr", 0.0, math.inf), ("weight_decay", 0.0, math.inf), ("lr_decay", 0.0, 1.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name}: expected a finite number, got {v!r}")
            if not (lo <= v <= hi) or (name in ("lr", "lr_decay") and v == 0):
                raise ValueError(f"{name}: must lie in {'(0, 1]' if name == 'lr_decay' else '[0, inf)'}"
                                 f"{' and be positive' if name == 'lr' else ''}, got {v}")
        if self.ema_decay is not None and not (0.0 < self.ema_decay < 1.0):
            raise ValueError(f"ema_decay: must lie in (0, 1) or be None, got {self.ema_decay!r}")
        if isinstance(self.schedule, str):
            object.__setattr__(self, "schedule", _schedules.get(self.schedule))
        if not isinstance(self.schedule, _schedules.Schedule):
            raise ValueError(f"schedule: expected a Schedule or a schedule name, got {self.schedule!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (see :meth:`from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Rebuild a config from :meth:`to_dict`; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"config: unknown training option(s) {unknown}; known: {sorted(names)}")
        d = dict(d)
        if isinstance(d.get("schedule"), dict):
            d["schedule"] = _schedules.Schedule(**d["schedule"])
        return cls(**d)


class TrainState(NamedTuple):
    """Everything a checkpoint holds.

    Attributes:
        step: updates done so far.
        params: the network's ``nnx.Param`` state.
        opt_state: the optax optimizer state.
        ema: the moving average of ``params``, or ``None``.
        key: the run's base PRNG key (update ``s`` uses ``fold_in(key, s)``).
    """

    step: int
    params: nnx.State
    opt_state: Any
    ema: nnx.State | None
    key: jax.Array


class NonFiniteLossError(ValueError):
    """Training met a NaN or infinite loss (or weights) and stopped; the run directory keeps its last
    good checkpoint. ``step`` is the first update (1-based) whose loss was not finite."""

    def __init__(self, msg: str, *, step: int):
        super().__init__(msg)
        self.step = step


class TrainResult(NamedTuple):
    """What :func:`train` returns.

    Attributes:
        out_dir: the run directory.
        step: updates done (the step of the last checkpoint).
        interrupted: whether Ctrl-C (SIGINT) or SIGTERM stopped the run before ``steps``.
        signal: the signal that stopped it (``signal.SIGINT`` / ``signal.SIGTERM``), else ``None``.
        loss: the last logged loss (``None`` if nothing was logged in this call).
    """

    out_dir: Path
    step: int
    interrupted: bool
    loss: float | None
    signal: int | None = None


# --------------------------------------------------------------------------- pure pieces


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """AdamW (β = 0.9, 0.999, ε = 1e-8) with learning rate ``lr·lr_decay^s`` at update ``s``."""
    sched = optax.exponential_decay(config.lr, transition_steps=1, decay_rate=config.lr_decay)
    return optax.adamw(sched, b1=0.9, b2=0.999, eps=1e-8, weight_decay=config.weight_decay)


def _learning_rate(config: TrainConfig, update: int) -> float:
    return float(config.lr * config.lr_decay**update)


def make_train_step(graphdef: nnx.GraphDef, config: TrainConfig, *, conditional: bool, step_times: bool = False,
                    dropout: bool = False) -> Callable:
    """The jitted, pure training update for a network structure and a training config.

    ``step(params, opt_state, ema, batch, key) -> (params, opt_state, ema, loss)`` where ``batch``
    is ``(images [B,H,W,C], labels [B])`` and ``key`` the update's key (``fold_in(run key, s)``);
    ``ema`` is ``None`` without EMA. Functions are cached per ``(graphdef, config options)``, so
    repeated runs in one process reuse one compiled program.

    ``step_times``: draw ``t = (i+1)/time_levels`` for ``i`` in ``0 … time_levels−1`` (the DDPM
    UNet's convention, whose time input is the step ``i``) instead of ``i/time_levels``.
    ``dropout``: pass the network a ``dropout_key`` (:class:`ellsjax.nets.DDPMUNet`).

    Example:
        >>> import jax.numpy as jnp, ellsjax as ej
        >>> net = ej.nets.NetConfig(image_size=12, width=16, depth=2)
        >>> cfg = ej.training.TrainConfig(steps=1, batch_size=16, lr=2e-3, ema_decay=0.9)
        >>> graphdef, state = ej.training.init_state(net, cfg)
        >>> step = ej.training.make_train_step(graphdef, cfg, conditional=False)
        >>> batch = (jnp.zeros((16, 12, 12, 1)), jnp.zeros((16,), jnp.int32))
        >>> params, opt_state, ema, loss = step(state.params, state.opt_state, state.ema, batch, state.key)
        >>> loss.shape
        ()
    """
    return _cached_step(graphdef, _step_key(config), bool(conditional), bool(step_times), bool(dropout))


def _step_key(config: TrainConfig) -> tuple:
    return (config.lr, config.weight_decay, config.lr_decay, config.ema_decay, config.time_levels, config.schedule)


@functools.lru_cache(maxsize=16)
def _cached_step(graphdef, opt_key, conditional, step_times=False, dropout=False):
    lr, wd, decay, ema_decay, levels, schedule = opt_key
    tx = make_optimizer(TrainConfig(steps=1, lr=lr, weight_decay=wd, lr_decay=decay))

    def loss_fn(params, x_t, t, labels, noise, k_drop):
        model = nnx.merge(graphdef, params)
        kw = {"dropout_key": k_drop} if dropout else {}
        eps = model(x_t, t, labels if conditional else None, **kw)
        return jnp.mean(jnp.square(eps - noise))

    @jax.jit
    def step(params, opt_state, ema, batch, key):
        images, labels = batch
        k_t, k_noise = jax.random.split(key)
        k_drop = jax.random.fold_in(k_noise, 1) if dropout else None  # keeps the other draws as before
        b = images.shape[0]
        t = (jax.random.randint(k_t, (b,), 0, levels) + int(step_times)).astype(jnp.float32) / levels
        noise = jax.random.normal(k_noise, images.shape, images.dtype)
        a, s = schedule(t)
        x_t = a[:, None, None, None] * images + s[:, None, None, None] * noise
        loss, grads = jax.value_and_grad(loss_fn)(params, x_t, t, labels, noise, k_drop)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if ema is not None:
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
        return params, opt_state, ema, loss

    return step


# an eager fold_in dispatches several small programs (milliseconds); this one costs microseconds
_fold_in = jax.jit(jax.random.fold_in)


def init_state(net: _nets.NetConfig, config: TrainConfig) -> tuple[nnx.GraphDef, TrainState]:
    """Build the network and a fresh :class:`TrainState` (step 0) from the seed.

    Returns:
        ``(graphdef, state)``: the network's static structure and its trainable state.
    """
    graphdef, params = _nets.init(net, jax.random.fold_in(jax.random.key(config.seed), 0))
    opt_state, ema = _cached_opt_init(_step_key(config))(params)
    # committed to the device like restored checkpoints are, so that fresh and resumed runs
    # hit the same compiled step
    params, opt_state, ema, key = jax.device_put((params, opt_state, ema, _run_key(config.seed)), jax.devices()[0])
    return graphdef, TrainState(0, params, opt_state, ema, key)


@functools.lru_cache(maxsize=16)
def _cached_opt_init(opt_key):
    """Optimizer state and EMA in one program (instead of an eager dispatch per zeros_like/copy)."""
    lr, wd, decay, ema_decay = opt_key[:4]
    tx = make_optimizer(TrainConfig(steps=1, lr=lr, weight_decay=wd, lr_decay=decay))
    return jax.jit(lambda p: (tx.init(p), jax.tree.map(jnp.copy, p) if ema_decay is not None else None))


# The per-update noise uses the RngBitGenerator PRNG: its programs compile about twice as fast as
# threefry's on CPU and run faster on GPUs; runs are reproducible on one backend.
_KEY_IMPL = "rbg"


def _run_key(seed: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed, impl=_KEY_IMPL), 1)


def batch_indices(step: int, *, n: int, batch_size: int, seed: int) -> np.ndarray:
    """Indices of the training images of update ``step`` (0-based).

    Epoch ``e = step // (n // batch_size)`` draws a permutation of ``range(n)`` from ``(seed, e)``;
    the update takes slice ``step mod (n // batch_size)`` of it. A function of the step alone, so a
    resumed run sees exactly the batches an uninterrupted one would.

    Example:
        >>> batch_indices(0, n=10, batch_size=4, seed=0).shape
        (4,)
        >>> sorted(np.concatenate([batch_indices(s, n=8, batch_size=4, seed=0) for s in (2, 3)]).tolist())
        [0, 1, 2, 3, 4, 5, 6, 7]
    """
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size: {batch_size} is larger than the {n} training images")
    epoch, i = divmod(int(step), per_epoch)
    return _permutation(n, seed, epoch)[i * batch_size : (i + 1) * batch_size]


@functools.lru_cache(maxsize=2)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    perm.flags.writeable = False
    return perm


# --------------------------------------------------------------------------- data


def load_data(net: _nets.NetConfig, config: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """Load the training images the config names, at the network's image size, and check them."""
    from ellsjax import data as _data

    if net.conditional and config.dataset == "celeb_a":
        raise ValueError("dataset: celeb_a has no class labels; a conditional network cannot train on it")
    images, labels = _data.load(
        config.dataset, split=config.split, source=config.source, path=config.path, data_dir=config.data_dir,
        image_size=net.image_size, limit=config.limit,
    )
    return _check_data(net, images, labels)


def _check_data(net: _nets.NetConfig, images: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images)
    if images.ndim != 4 or not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"data: expected float images [N, H, W, C], got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    _checks.check_range(images, "data: images")
    if c != net.channels:
        raise ValueError(f"data: the images have {c} channel(s) but the network expects channels={net.channels}")
    if (h, w) != (net.image_size, net.image_size):
        raise ValueError(f"data: the images are {h}x{w} but the network expects image_size={net.image_size}")
    if labels is None:
        if net.conditional:
            raise ValueError("data: a conditional network needs labels")
        labels = np.zeros(n, np.int32)
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"data: expected integer labels of shape [{n}], got {labels.dtype} {labels.shape}")
    if net.conditional and (labels.min() < 0 or labels.max() >= net.num_classes):
        raise ValueError(f"data: labels must lie in [0, {net.num_classes}) for num_classes={net.num_classes}, "
                         f"got [{labels.min()}, {labels.max()}]")
    return np.ascontiguousarray(images, np.float32), labels.astype(np.int32)


def _fingerprint(images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    crc = zlib.crc32(memoryview(images).cast("B"))
    crc = zlib.crc32(memoryview(labels).cast("B"), crc)
    return {"n": int(images.shape[0]), "shape": list(images.shape[1:]), "crc32": int(crc)}


# --------------------------------------------------------------------------- run directory


def load_run_config(out_dir: str | os.PathLike) -> tuple[_nets.NetConfig, TrainConfig]:
    """Read the network and training configs of a run directory (``DIR/config.json``).

    Raises:
        FileNotFoundError: no run at ``out_dir``.
        ValueError: an unreadable or foreign ``config.json``.
    """
    raw = _read_config(Path(out_dir))
    return _nets.NetConfig.from_dict(raw["net"]), TrainConfig.from_dict(raw["train"])


def _read_config(out: Path) -> dict[str, Any]:
    path = out / CONFIG_FILE
    if out.is_file():
        raise FileNotFoundError(f"dir: {out} is a file; give the run directory (where `ellsjax train --out DIR` / "
                                "ellsjax.training.train wrote config.json and checkpoints/)")
    if not out.is_dir():
        raise FileNotFoundError(f"dir: no such directory: {out}")
    if not path.is_file():
        raise FileNotFoundError(f"dir: {out} holds no trained network (no {CONFIG_FILE})")
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != _FORMAT or not isinstance(raw.get("net"), dict) or not isinstance(raw.get("train"), dict):
            raise ValueError(f"not an ellsjax training run (format {raw.get('format')!r})")
        _nets.NetConfig.from_dict(raw["net"])
        TrainConfig.from_dict(raw["train"])
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"dir: cannot read {path}: {e}") from None
    return raw


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def latest_step(out_dir: str | os.PathLike) -> int | None:
    """Step of the newest checkpoint of a run, or ``None`` if it has none."""
    return _Checkpoints(Path(out_dir), create=False).latest()


def _flatten(tree: Any) -> dict[str, Any]:
    """A pytree as a flat dict of dotted names (stable and readable in the checkpoint)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[".".join(_key_name(k) for k in path)] = leaf
    return out


def _key_name(k: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _unflatten(template: Any, flat: dict[str, Any]) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    names = [".".join(_key_name(k) for k in path) for path, _ in leaves]
    return jax.tree_util.tree_unflatten(treedef, [flat[n] for n in names])


class _Checkpoints:
    """Orbax checkpoints of a run under ``DIR/checkpoints`` (flat named items), with clear errors."""

    def __init__(self, out: Path, *, create: bool, keep: int | None = None):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.dir = (out / CHECKPOINT_DIR).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=create, enable_async_checkpointing=False,
        )
        self._exists = self.dir.is_dir()
        self.manager = ocp.CheckpointManager(self.dir, options=options) if (create or self._exists) else None

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps()) if self.manager is not None else []

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, state: TrainState) -> None:
        if state.step in self.steps():
            return
        a = self.ocp.args
        items = {
            "params": a.StandardSave(_flatten(state.params)),
            "train": a.StandardSave({
                **{"opt_state." + k: v for k, v in _flatten(state.opt_state).items()},
                "key": np.asarray(jax.random.key_data(state.key)),
                "step": np.asarray(state.step, np.int64),
            }),
        }
        if state.ema is not None:
            items["ema"] = a.StandardSave(_flatten(state.ema))
        from ellsjax._io import OutputError

        # a full disk, found before orbax starts its writer threads (each of which would log the
        # failure with a traceback); the estimate is the arrays' bytes plus room for metadata
        need = sum(int(np.asarray(v).nbytes) for v in jax.tree.leaves((state.params, state.opt_state, state.ema)))
        need += 64 << 10
        free = shutil.disk_usage(self.dir).free
        if free < need:
            raise OutputError(f"cannot write checkpoint {state.step} in {self.dir}: no space left on the device "
                              f"(about {_size(need)} needed, {_size(free)} free)")
        levels = _quiet_orbax_logs()
        try:
            self.manager.save(state.step, args=a.Composite(**items))
            self.manager.wait_until_finished()
        except Exception as e:  # orbax/tensorstore raise many types (a full disk is a ValueError there)
            _quiet_failed_reads()
            text = str(e)
            reason = ("no space left on the device" if "No space left" in text or "os_error_code='28'" in text
                      else (text.strip().splitlines() or [type(e).__name__])[0][:200])
            raise OutputError(f"cannot write checkpoint {state.step} in {self.dir}: {reason}") from None
        for name, level in levels.items():  # reported once, above, on failure; restored on success
            logging.getLogger(name).setLevel(level)

    def restore(self, step: int | None, items: dict[str, Any]) -> dict[str, Any]:
        """Restore the named flat items (``{"params": template, ...}``) at ``step`` (default: latest)."""
        steps = self.steps()
        if not steps:
            raise FileNotFoundError(f"dir: no checkpoint in {self.dir}")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise FileNotFoundError(f"step: no checkpoint for step {step} in {self.dir}; available: {steps}")
        a = self.ocp.args
        flat = {name: _flatten(tmpl) for name, tmpl in items.items()}
        _quiet_failed_reads()  # a failing read reports once, below, not through orbax's teardown noise
        try:
            got = self.manager.restore(
                step, args=a.Composite(**{name: a.StandardRestore(f) for name, f in flat.items()})
            )
            out = {}
            for name, tmpl in items.items():
                missing = sorted(set(flat[name]) - set(got[name]))
                if missing:
                    raise KeyError(f"{name} lacks {missing[:3]}")
                out[name] = _unflatten(tmpl, dict(got[name]))
                bad = [k for k, v in flat[name].items() if tuple(got[name][k].shape) != tuple(v.shape)]
                if bad:
                    raise ValueError(f"shape mismatch for {bad[:3]}")
        except Exception as e:  # orbax/tensorstore raise many types; the user needs one clear message
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ValueError(
                f"checkpoint: cannot read {self.dir / str(step)} ({type(e).__name__}: {msg[:200]}); "
                "it is corrupt or does not match the run's config.json"
            ) from None
        return out

    def restore_newest(self, items: dict[str, Any], *, log: Callable[[str], None] | None = None,
                       set_aside: bool = False) -> tuple[int, dict[str, Any]]:
        """``(step, items)`` of the newest checkpoint that reads back; each unreadable newer one is
        reported to ``log`` (and, with ``set_aside``, moved to ``DIR/checkpoints_unreadable/STEP``
        so that training redoes and saves those steps). Raises ``ValueError`` if none reads."""
        steps = self.steps()
        if not steps:
            raise FileNotFoundError(f"dir: no checkpoint in {self.dir}")
        errors = []
        for step in reversed(steps):
            try:
                got = self.restore(step, items)
            except ValueError as e:
                errors.append((step, str(e)))
                continue
            for bad, why in errors:
                if log is not None:
                    log(f"{why}; using checkpoint {step} instead")
                if set_aside:
                    self._set_aside(bad, log)
            return step, got
        raise ValueError(f"checkpoint: none of the checkpoints {steps} in {self.dir} can be read; "
                         f"newest: {errors[0][1]}")

    def _set_aside(self, step: int, log: Callable[[str], None] | None) -> None:
        import shutil

        dest = self.dir.parent / "checkpoints_unreadable" / str(step)
        if dest.exists():
            dest = dest.with_name(f"{step}.{int(time.time())}")
        dest.parent.mkdir(exist_ok=True)
        shutil.move(str(self.dir / str(step)), str(dest))
        if log is not None:
            log(f"moved the unreadable checkpoint {step} to {dest}")
        self.manager.reload()


def _restore_state(ckpt: _Checkpoints, template: TrainState, log: Callable[[str], None] | None = None) -> TrainState:
    train_tmpl = {
        **{"opt_state." + k: v for k, v in _flatten(template.opt_state).items()},
        "key": np.asarray(jax.random.key_data(template.key)),
        "step": np.asarray(0, np.int64),
    }
    items: dict[str, Any] = {"params": template.params, "train": train_tmpl}
    if template.ema is not None:
        items["ema"] = template.ema
    _, got = ckpt.restore_newest(items, log=log, set_aside=True)
    tr = got["train"]
    opt_flat = {k[len("opt_state."):]: v for k, v in tr.items() if k.startswith("opt_state.")}
    key = jax.random.wrap_key_data(jnp.asarray(tr["key"], jnp.uint32), impl=_KEY_IMPL)
    params, opt_state, ema, key = jax.device_put(
        (got["params"], _unflatten(template.opt_state, opt_flat), got.get("ema"), key), jax.devices()[0]
    )
    return TrainState(int(np.asarray(tr["step"])), params, opt_state, ema, key)


# --------------------------------------------------------------------------- the loop


_QUIET = False


def _quiet_failed_reads() -> None:
    """After a failed checkpoint read, orbax leaves tensorstore reads in flight: their coroutines
    are collected later ("Exception ignored in: <coroutine ... _read_array_index_and_device_put>")
    and late callbacks hit orbax's closed event loop ("RuntimeError: Event loop is closed"), each
    printing a traceback through ``sys.unraisablehook``. The error was reported once already; drop
    those, and pass anything else to the previous hook."""
    global _QUIET
    if _QUIET:
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        exc, obj = unraisable.exc_value, unraisable.object
        code = getattr(obj, "cr_code", None)
        if (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed") or (
                code is not None and "orbax" in code.co_filename):
            return
        previous(unraisable)

    sys.unraisablehook = hook
    _QUIET = True


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _quiet_orbax_logs() -> dict[str, int]:
    """Silence the logs through which orbax's writer threads report a failed save (each with a
    traceback; the failure is raised once, as an error); returns the previous levels."""
    names = ("absl", "asyncio", "concurrent.futures")
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return levels


def _stderr(msg: str) -> None:
    print(f"ellsjax: note: {msg}", file=sys.stderr, flush=True)


class _StopFlag:
    """SIGINT (Ctrl-C) or SIGTERM (``kill``, schedulers) → finish the current step, save, return.
    A second signal aborts at once (KeyboardInterrupt)."""

    _SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.signum: int | None = None

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals reach only the main thread; nothing to install
            return
        previous = {sig: signal.getsignal(sig) for sig in self._SIGNALS}

        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested, self.signum = True, signum
            what = "interrupt" if signum == signal.SIGINT else "terminate signal (SIGTERM)"
            print(f"\nellsjax train: {what} received; saving a checkpoint after this step "
                  "(send it again to abort without saving)", file=sys.stderr, flush=True)

        for sig in self._SIGNALS:
            signal.signal(sig, handler)
        try:
            yield self
        finally:
            for sig, prev in previous.items():
                signal.signal(sig, prev)


def _all_finite(tree: Any) -> bool:
    """Whether every leaf of a pytree of arrays is finite (checked on the host: no compile)."""
    return all(bool(np.all(np.isfinite(np.asarray(leaf)))) for leaf in jax.tree.leaves(tree))


def _nonfinite(step: int, what: str, config: TrainConfig, ckpt: _Checkpoints, out: Path) -> NonFiniteLossError:
    last = ckpt.latest()
    kept = (f"its last good checkpoint, step {last}, is kept in {out}" if last is not None
            else f"no checkpoint was saved in {out} before it")
    return NonFiniteLossError(
        f"loss: {what} at step {step}; training stopped ({kept}). The run diverged: start a new one with a "
        f"lower learning rate (lr, --lr; now {config.lr:g}) or check the data", step=step)


def train(
    out_dir: str | os.PathLike,
    net: _nets.NetConfig,
    config: TrainConfig,
    *,
    data: tuple[Any, Any] | None = None,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train a network, writing checkpoints, ``config.json`` and ``metrics.jsonl`` to ``out_dir``.

    Args:
        out_dir: the run directory (created). A directory that already holds a run needs ``resume``.
        net: the network (:class:`ellsjax.nets.NetConfig`, e.g. ``ej.nets.preset(name).net``).
        config: training options.
        data: ``(images [N,H,W,C] in [-1, 1], labels [N] | None)`` to train on instead of loading
            ``config.dataset`` (the config's data fields are then only recorded). A resumed run
            checks that its data is the same as before (count, shape and a CRC32).
        resume: continue the run in ``out_dir`` from its newest checkpoint up to
            ``config.steps``. ``net`` and ``config`` must equal the saved ones except for
            ``steps``, ``log_every``, ``checkpoint_every`` and ``keep_checkpoints`` (see
            :func:`load_run_config`). With nothing saved yet, the run starts from step 0.
        progress: show a tqdm progress bar.
        callback: called with each metrics record (a dict) after it is written.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ValueError: bad options, data that does not fit the network, an existing run without
            ``resume``, a resume with a different config or data, or a corrupt checkpoint.
    """
    if not isinstance(net, _nets.NetConfig):
        raise TypeError(f"net: expected an ellsjax.nets.NetConfig, got {type(net).__name__}")
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config: expected an ellsjax.training.TrainConfig, got {type(config).__name__}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir: {out} exists and is not a directory")
    has_run = (out / CONFIG_FILE).exists() or (out / CHECKPOINT_DIR).exists()
    if has_run and not resume:
        raise ValueError(f"out_dir: {out} already holds a training run; resume it (resume=True / --resume) "
                         "or choose another directory")

    images, labels = load_data(net, config) if data is None else _check_data(net, *data)
    if images.shape[0] < config.batch_size:
        raise ValueError(f"batch_size: {config.batch_size} is larger than the {images.shape[0]} training images")
    fingerprint = _fingerprint(images, labels)

    if has_run:
        saved = _read_config(out)
        _check_resumable(saved, net, config, fingerprint, out)

    graphdef, state = init_state(net, config)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = _Checkpoints(out, create=True, keep=config.keep_checkpoints)
    if has_run and ckpt.latest() is not None:
        state = _restore_state(ckpt, state, log=_stderr)
    start = state.step
    if start > config.steps:
        raise ValueError(f"steps: the run is already at step {start}, beyond steps={config.steps}")
    _write_json_atomic(out / CONFIG_FILE, {
        "format": _FORMAT, "net": net.to_dict(), "train": config.to_dict(), "data": fingerprint,
        "ellsjax_version": _version(),
    })
    metrics_path = out / METRICS_FILE
    _truncate_metrics(metrics_path, start)

    step_fn = make_train_step(graphdef, config, conditional=net.conditional, step_times=net.arch == "ddpm-unet",
                              dropout=net.dropout > 0)
    n = images.shape[0]
    per_epoch = n // config.batch_size
    stop = _StopFlag()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start, desc="training", unit="step", dynamic_ncols=True)
    last_loss: float | None = None
    t_start = time.perf_counter()
    t_window, window, pending = t_start, [], None
    try:
        with stop.installed(), open(metrics_path, "a") as metrics:
            while state.step < config.steps and not stop.requested:
                s = state.step
                idx = batch_indices(s, n=n, batch_size=config.batch_size, seed=config.seed)
                batch = (images[idx], labels[idx])
                params, opt_state, ema, loss = step_fn(
                    state.params, state.opt_state, state.ema, batch, _fold_in(state.key, np.int32(s))
                )
                state = TrainState(s + 1, params, opt_state, ema, state.key)
                window.append(loss)
                # keep one update in flight: wait for the previous one, so the bar shows real progress,
                # and stop at the first non-finite loss (update s, 1-based, is the previous one)
                if pending is not None:
                    prev = float(pending)
                    if not math.isfinite(prev):
                        raise _nonfinite(s, f"not finite ({prev})", config, ckpt, out)
                pending = loss
                if bar is not None:
                    bar.update(1)
                done = state.step
                if done % config.log_every == 0 or done == config.steps:
                    losses = np.asarray(jax.device_get(window), np.float64)
                    now = time.perf_counter()
                    record = {
                        "step": done,
                        "epoch": round(done / per_epoch, 4),
                        "loss": float(losses.mean()),
                        "lr": _learning_rate(config, done - 1),
                        "images_per_s": round(len(window) * config.batch_size / max(now - t_window, 1e-9), 2),
                        "time_s": round(now - t_start, 3),
                    }
                    if not np.all(np.isfinite(losses)):
                        record["nonfinite"] = True
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    if not np.all(np.isfinite(losses)):
                        first = done - len(losses) + 1 + int(np.flatnonzero(~np.isfinite(losses))[0])
                        raise _nonfinite(first, "not finite", config, ckpt, out)
                    last_loss = record["loss"]
                    if bar is not None:
                        bar.set_postfix(loss=f"{last_loss:.4f}")
                    t_window, window = now, []
                    if callback is not None:
                        callback(record)
                if done % config.checkpoint_every == 0 or done == config.steps:
                    t_save = time.perf_counter()
                    _save_finite(ckpt, state, loss, config, out)
                    t_window += time.perf_counter() - t_save  # throughput excludes checkpointing
            if stop.requested:
                _save_finite(ckpt, state, pending, config, out)
    finally:
        if bar is not None:
            bar.close()
    interrupted = bool(stop.requested and state.step < config.steps)
    return TrainResult(out, state.step, interrupted, last_loss, stop.signum if interrupted else None)


def _save_finite(ckpt: _Checkpoints, state: TrainState, loss: Any, config: TrainConfig, out: Path) -> None:
    """Save a checkpoint only of a finite state: the loss of its last update and every weight."""
    if loss is not None and not math.isfinite(float(loss)):
        raise _nonfinite(state.step, f"not finite ({float(loss)})", config, ckpt, out)
    if not (_all_finite(state.params) and (state.ema is None or _all_finite(state.ema))):
        raise _nonfinite(state.step, "finite, but the weights after it are not", config, ckpt, out)
    ckpt.save(state)


def _check_resumable(saved: dict[str, Any], net: _nets.NetConfig, config: TrainConfig,
                     fingerprint: dict[str, Any], out: Path) -> None:
    saved_net = _nets.NetConfig.from_dict(saved["net"])
    if saved_net != net:
        diff = {k: (v, getattr(net, k)) for k, v in dataclasses.asdict(saved_net).items() if getattr(net, k) != v}
        raise ValueError(f"net: cannot resume {out} with a different network; (saved, given): {diff}")
    saved_cfg = TrainConfig.from_dict(saved["train"])
    diff = {
        f.name: (getattr(saved_cfg, f.name), getattr(config, f.name))
        for f in dataclasses.fields(TrainConfig)
        if f.name not in _RUN_LENGTH_FIELDS and getattr(saved_cfg, f.name) != getattr(config, f.name)
    }
    if diff:
        raise ValueError(f"config: cannot resume {out} with different training options; (saved, given): {diff}")
    if saved.get("data") is not None and saved["data"] != fingerprint:
        raise ValueError(f"data: the training images differ from those of the run in {out} "
                         f"(saved {saved['data']}, now {fingerprint})")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records past ``step`` (written after the checkpoint a resume starts from)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    path.write_text("".join(line + "\n" for line in keep))


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("ellsjax")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"
