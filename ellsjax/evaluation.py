r"""Theory vs network: per-image agreement metrics and the paper's sample-level comparison.

The network and a machine start from the same noise and are both sampled with DDIM over the same
times; their final samples are compared image by image. Metrics, for a machine output ``m`` and the
network output ``n`` (each flattened to ``D`` numbers):

* :func:`pearson_r` — the Pearson correlation of the centered, normalised outputs,
  ``r = ⟨m − m̄, n − n̄⟩ / (‖m − m̄‖·‖n − n̄‖)``. **The paper calls this number "r²"**; it is a
  correlation coefficient, not its square, so it is named honestly here.
* :func:`r_squared` — the coefficient of determination of ``m`` as a prediction of ``n``,
  ``R² = 1 − Σ(n − m)² / (D·Var(n))`` (can be negative).
* :func:`mse` — ``Σ(n − m)²/D``.

:func:`evaluate` samples the network, the machine and the ideal-score (IS) baseline and
:func:`summarize` aggregates: median and mean over seeds of each metric, for the machine and the
baseline, and the fraction of seeds where the machine's ``r`` beats the IS's.

Example:
    >>> import numpy as np
    >>> a = np.array([[1.0, 2.0, 3.0, 4.0]]); b = np.array([[2.0, 4.0, 6.0, 8.0]])
    >>> round(float(pearson_r(a, b)[0]), 6), float(mse(a, a)[0])
    (1.0, 0.0)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from jaxtyping import ArrayLike, Float

from ellsjax import _io
from ellsjax import plotting as _plotting
from ellsjax import samplers as _samplers
from ellsjax._batching import map_padded
from ellsjax.denoiser import Denoiser

__all__ = ["pearson_r", "r_squared", "mse", "metrics", "Evaluation", "evaluate", "sample", "seed_labels",
           "summarize", "save_figures", "save_results"]


def seed_labels(model: Any, n: int) -> np.ndarray | None:
    """Class ids ``0, 1, …, C−1, 0, …`` for ``n`` seeds of a class-conditional network (anything with
    ``conditional`` and ``num_classes``: a loaded model or its config), else ``None``.

    Example:
        >>> from types import SimpleNamespace
        >>> seed_labels(SimpleNamespace(conditional=True, num_classes=3), 5).tolist()
        [0, 1, 2, 0, 1]
    """
    return (np.arange(n) % model.num_classes).astype(np.int32) if model.conditional else None


def _flat_pair(pred, ref, name_pred="pred", name_ref="ref"):
    p = np.asarray(pred, np.float64)
    r = np.asarray(ref, np.float64)
    if p.shape != r.shape or p.ndim < 1:
        raise ValueError(f"{name_pred}: shape {p.shape} differs from {name_ref}'s {r.shape} (need equal [B, ...] batches)")
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(r))):
        raise ValueError(f"{name_pred}, {name_ref}: contain NaN or inf")
    return p.reshape(p.shape[0], -1), r.reshape(r.shape[0], -1)


def pearson_r(pred: Float[ArrayLike, "b ..."], ref: Float[ArrayLike, "b ..."]) -> np.ndarray:
    """Per-image Pearson correlation ``⟨p − p̄, r − r̄⟩/(‖p − p̄‖‖r − r̄‖)`` (the paper's "r²").

    A constant image has no defined correlation: that is a ``ValueError`` (not a NaN).

    Example:
        >>> round(float(pearson_r(np.array([[0.0, 1.0, 0.0]]), np.array([[1.0, 0.0, 1.0]]))[0]), 6)
        -1.0
    """
    p, r = _flat_pair(pred, ref)
    pc, rc = p - p.mean(1, keepdims=True), r - r.mean(1, keepdims=True)
    den = np.linalg.norm(pc, axis=1) * np.linalg.norm(rc, axis=1)
    if np.any(den == 0):
        raise ValueError(f"pred, ref: images {np.flatnonzero(den == 0).tolist()} are constant; Pearson r is undefined")
    return np.sum(pc * rc, axis=1) / den


def r_squared(pred: Float[ArrayLike, "b ..."], ref: Float[ArrayLike, "b ..."]) -> np.ndarray:
    """Per-image coefficient of determination of ``pred`` for ``ref``: ``1 − Σ(r − p)²/(D·Var(r))``.

    Example:
        >>> float(r_squared(np.array([[1.0, 1.0, 3.0, 3.0]]), np.array([[0.0, 2.0, 2.0, 4.0]]))[0])
        0.5
    """
    p, r = _flat_pair(pred, ref)
    var = r.var(axis=1)
    if np.any(var == 0):
        raise ValueError(f"ref: images {np.flatnonzero(var == 0).tolist()} are constant; R² is undefined")
    return 1.0 - np.mean((r - p) ** 2, axis=1) / var


def mse(pred: Float[ArrayLike, "b ..."], ref: Float[ArrayLike, "b ..."]) -> np.ndarray:
    """Per-image mean squared difference ``Σ(r − p)²/D``."""
    p, r = _flat_pair(pred, ref)
    return np.mean((r - p) ** 2, axis=1)


def metrics(pred: Float[ArrayLike, "b ..."], ref: Float[ArrayLike, "b ..."]) -> dict[str, np.ndarray]:
    """``{"pearson_r", "r_squared", "mse"}``, each ``[B]``, of ``pred`` against ``ref``."""
    return {"pearson_r": pearson_r(pred, ref), "r_squared": r_squared(pred, ref), "mse": mse(pred, ref)}


class Evaluation(NamedTuple):
    """Samples from the same noise and their per-seed metrics against the network.

    Attributes:
        network: ``[B, H, W, C]`` the network's samples.
        machine: ``[B, H, W, C]`` the machine's samples.
        baseline: ``[B, H, W, C]`` the ideal-score machine's samples (or ``None``).
        machine_metrics: :func:`metrics` of the machine vs the network.
        baseline_metrics: :func:`metrics` of the baseline vs the network (or ``None``).
    """

    network: np.ndarray
    machine: np.ndarray
    baseline: np.ndarray | None
    machine_metrics: dict
    baseline_metrics: dict | None


def evaluate(
    network: Denoiser,
    machine: Denoiser,
    x_start: Float[ArrayLike, "b h w c"],
    ts: Any,
    *,
    scales: Any = None,
    baseline: Denoiser | None = None,
    label: Any = None,
    network_scales: Any = None,
    network_samples: Float[ArrayLike, "b h w c"] | None = None,
    baseline_samples: Float[ArrayLike, "b h w c"] | None = None,
    batch_size: int | None = 16,
) -> Evaluation:
    """Sample the network, the machine and the baseline from the same noise over ``ts``; compare.

    Args:
        network: the reference denoiser (trained network, or a machine with ``network_scales``).
        machine: the machine under test; ``scales`` its per-step scales (``len(ts) − 1``).
        x_start: ``[B, H, W, C]`` the common starting noise (one seed per image).
        ts: the DDIM time grid.
        scales: the machine's per-step scales.
        baseline: the IS machine (``ej.machines.ideal(images)``) or ``None``.
        label: ``None`` or class ids.
        network_scales: scales for ``network`` when it is a machine.
        network_samples: the network's samples from ``x_start`` over ``ts``, if already computed.
        baseline_samples: the baseline's samples, if already computed.
        batch_size: seeds sampled per DDIM call (see :func:`sample`).

    Returns:
        An :class:`Evaluation` (summarise it with :func:`summarize`).

    Example:
        >>> import jax, ellsjax as ej
        >>> imgs = jax.random.uniform(jax.random.key(0), (8, 8, 8, 1), minval=-1, maxval=1)
        >>> x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
        >>> ev = evaluate(ej.machines.els(imgs), ej.machines.els(imgs), x, [0.8, 0.4, 0.0],
        ...               scales=(3, 3), network_scales=(3, 3), baseline=ej.machines.ideal(imgs))
        >>> summarize(ev)["machine"]["pearson_r"]["median"] > 0.999
        True
    """
    for name, d in (("network", network), ("machine", machine), ("baseline", baseline)):
        if d is not None and not isinstance(d, Denoiser):
            raise TypeError(f"{name}: expected an ellsjax Denoiser, got {type(d).__name__}")
    kw = {"label": label, "batch_size": batch_size}
    net = (sample(network, x_start, ts, scales=network_scales, **kw) if network_samples is None
           else np.asarray(network_samples))
    mach = sample(machine, x_start, ts, scales=scales, **kw)
    base = None
    if baseline_samples is not None:
        base = np.asarray(baseline_samples)
    elif baseline is not None:
        base = sample(baseline, x_start, ts, **kw)
    for what, arr in (("network", net), ("machine", mach), ("baseline", base)):
        bad = None if arr is None else ~np.all(np.isfinite(np.reshape(arr, (arr.shape[0], -1))), axis=1)
        if bad is not None and bad.any():
            raise ValueError(f"{what}: its samples contain NaN or inf ({int(bad.sum())} of {arr.shape[0]} seeds, e.g. "
                             f"seed {int(np.flatnonzero(bad)[0])}): a diverged network or a broken denoiser")
    return Evaluation(net, mach, base, metrics(mach, net), None if base is None else metrics(base, net))


def sample(
    denoiser: Denoiser, x_start: Float[ArrayLike, "b h w c"], ts: Any, *, scales: Any = None, label: Any = None,
    batch_size: int | None = 16,
) -> np.ndarray:
    """:func:`ellsjax.samplers.ddim` over batches of ``batch_size`` seeds (``None``: all at once).

    The machines fold a batch's pixels into one query block whose streamed chunks shrink as it
    grows, so moderate batches run faster on CPUs; the last batch is padded (one compile). Each
    sample depends only on its own noise, so the result is the same as one call.
    """
    x = np.asarray(x_start, np.float32)
    n = x.shape[0]
    lab = None if label is None else np.broadcast_to(np.asarray(label), (n,))
    size = n if batch_size is None else min(int(batch_size), n)
    if size < 1:
        raise ValueError(f"batch_size: must be positive (or None), got {batch_size!r}")
    # prepare once (e.g. a machine's banks) for every batch
    checked = _samplers.check_scales(scales, denoiser, len(np.ravel(ts)) - 1)
    denoiser = denoiser.prepare(checked if checked is not None else (None,), conditional=lab is not None)
    return np.asarray(map_padded(lambda xb, lb: _samplers.ddim(denoiser, xb, ts, scales=scales, label=lb), size, x, lab))


def _agg(values: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    return {k: {"median": float(np.median(v)), "mean": float(np.mean(v))} for k, v in values.items()}


def summarize(ev: Evaluation) -> dict[str, Any]:
    """Aggregates over seeds: ``{"n", "machine": {metric: {median, mean}}, "baseline": …,
    "frac_beats_baseline"}`` (the fraction of seeds whose machine Pearson r exceeds the baseline's)."""
    out: dict[str, Any] = {"n": int(ev.machine.shape[0]), "machine": _agg(ev.machine_metrics)}
    if ev.baseline_metrics is not None:
        out["baseline"] = _agg(ev.baseline_metrics)
        out["frac_beats_baseline"] = float(np.mean(ev.machine_metrics["pearson_r"] > ev.baseline_metrics["pearson_r"]))
    return out


def save_results(path: str | os.PathLike, ev: Evaluation, **meta: Any) -> dict[str, Any]:
    """Write ``results.json`` (atomically): the summary, the per-seed metrics and ``meta``; returns the dict."""
    res = {**meta, "summary": summarize(ev),
           "per_seed": {"machine": {k: v.tolist() for k, v in ev.machine_metrics.items()}}}
    if ev.baseline_metrics is not None:
        res["per_seed"]["baseline"] = {k: v.tolist() for k, v in ev.baseline_metrics.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _io.write_json(path, res)
    return res


def save_figures(ev: Evaluation, out_dir: str | os.PathLike, *, name: str = "machine", max_images: int = 16,
                 prefix: str = "") -> dict[str, Path]:
    """Write the scatter plot (IS r vs machine r per seed, diagonal drawn) and the image grid
    (rows: network | machine | IS, same seeds) as PNG, each atomically; returns ``{"scatter": path, "grid": path}``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    if ev.baseline_metrics is not None:
        fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
        x, y = ev.baseline_metrics["pearson_r"], ev.machine_metrics["pearson_r"]
        ax.scatter(x, y, s=10)
        lo = min(float(np.min(x)), float(np.min(y)), 0.0)
        ax.plot([lo, 1], [lo, 1], "k--", lw=1)
        ax.set_xlabel("IS Pearson r vs network")
        ax.set_ylabel(f"{name} Pearson r vs network")
        ax.set_title(f"{name}: median r {np.median(y):.3f} (IS {np.median(x):.3f})")
        fig.tight_layout()
        paths["scatter"] = _io.save_figure(out / f"{prefix}scatter.png", fig)
    k = min(max_images, ev.network.shape[0])
    rows = [ev.network[:k], ev.machine[:k]] + ([ev.baseline[:k]] if ev.baseline is not None else [])
    grid = _plotting.image_grid(np.concatenate(rows), ncols=k)
    paths["grid"] = _plotting.save_png(out / f"{prefix}grid.png", grid, scale=2)
    return paths
