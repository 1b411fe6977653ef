"""End to end: train a network, calibrate machines against it, evaluate, write a report.

:func:`run` executes one :class:`ReproducePreset`:

1. **train** the preset's network (:func:`ellsjax.training.train`; a finished or partial run in
   ``OUT/net`` is resumed, not retrained);
2. **calibrate** on the network's DDIM trajectories from ``calib_seeds`` noise draws: the grid
   calibration of the hard machine (ELS for circular networks, bbELS for zero-padded ones) and the
   differentiable calibration of its soft-window twins (:mod:`ellsjax.calibration`; Gaussian and
   soft-box windows), initialised from the grid result (``ℓ_i = max(k_i/3, 0.5)``, resp. the box of
   half-side ``(k_i − 1)/2``);
3. **evaluate** on ``eval_seeds`` *other* noise draws: the network, the machine with the grid
   schedule, the soft machine with the learned ``ℓ`` schedule, the machine with the published
   schedule of the matching paper network (over the paper's grid), the other analytic denoisers
   (``others``: PSPC with its own grid-calibrated patch sizes, Wiener, PCA-locality, σ-CFDM) and
   the ideal score (IS) baseline (:mod:`ellsjax.evaluation`);
4. **report**: ``OUT/results.json``, ``OUT/report.md`` (a table of median/mean Pearson r, R², MSE
   and the fraction of seeds beating IS, and the creativity measures of :mod:`ellsjax.explain` for
   the network's, IS's and every machine's samples), ``OUT/figures/*.png`` and the schedules
   ``OUT/scales_grid.json`` / ``OUT/scales_soft_{gaussian,box}.json``.

Presets (:data:`PRESETS`): ``smoke`` (seconds; the test suite runs it),
``mnist-cpu`` (a small circular ResNet on 16×16 MNIST), ``fashion-mnist-cpu`` and ``cifar10-cpu``
(class-conditional zero-padded ResNets on 16×16 Fashion-MNIST and CIFAR-10), the attention pair
``attention-cpu-with`` / ``attention-cpu-without`` (and its smoke versions; compared by
:mod:`ellsjax.studies`), each well under half an hour on a 2-core CPU, and the paper's networks for a
GPU (``paper-mnist-resnet-zeros``, ``paper-mnist-resnet-circular``, ``paper-mnist-unet-zeros``,
``paper-fashion-mnist-resnet``, ``paper-cifar10-resnet``, ``paper-cifar10-unet``; the networks and
training lengths of :data:`ellsjax.nets.PRESETS`, 100 evaluation seeds).

Example:
    >>> [name for name in sorted(PRESETS) if name.endswith("-cpu")]
    ['cifar10-cpu', 'fashion-mnist-cpu', 'mnist-cpu']
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ellsjax import _io
from ellsjax import calibration as _cal
from ellsjax import convert as _convert
from ellsjax import evaluation as _ev
from ellsjax import explain as _explain
from ellsjax import machines as _machines
from ellsjax import presets as _presets_mod
from ellsjax import samplers as _samplers
from ellsjax.scales import ScaleSchedule

__all__ = ["ReproducePreset", "PRESETS", "preset", "run", "finished", "fitted_schedule"]


@dataclasses.dataclass(frozen=True)
class ReproducePreset:
    """One end-to-end experiment.

    Attributes:
        name: preset name.
        net: the network (:class:`ellsjax.nets.NetConfig`).
        train: training options (:class:`ellsjax.training.TrainConfig`); its ``steps`` is replaced by
            ``epochs`` passes over the data when ``epochs`` is set.
        epochs: training length in passes over the training set (``None``: ``train.steps``).
        published: the :data:`ellsjax.presets.PAPER_SCALES` schedule evaluated for comparison
            (``None``: skipped).
        candidates: the grid calibration's candidate patch sizes.
        calib_seeds: noise draws (trajectories) used for calibration.
        eval_seeds: noise draws used for evaluation (different ones).
        nsteps: DDIM steps (grid :func:`ellsjax.calibration.calibration_times`).
        metric: grid comparison, ``"cosine"`` or ``"l2"``.
        soft_support: the soft machine's support ``K``.
        soft_iterations: evaluations per step (line search) or Adam steps of the differentiable
            calibration.
        soft_batch: seeds per evaluation (line search: one fixed subset) or per Adam step.
        soft_lr: Adam learning rate on ``log ℓ`` (Adam only).
        soft_curve: ``"per_step"`` or ``"quadratic"``.
        soft_optimizer: ``"auto"``, ``"line_search"`` or ``"adam"``
            (:func:`ellsjax.calibration.differentiable_calibrate`).
        soft_windows: the soft window shapes calibrated (``"gaussian"``, ``"box"``), each evaluated.
        others: the other analytic denoisers evaluated too (names of :data:`ellsjax.machines.MACHINES`,
            with default options): those taking a scale (``pspc``'s patch size) are grid-calibrated
            over the ``candidates`` that fit the image, the rest (``wiener``, ``pca``, ``cfdm``)
            have none.
        mixtures: whole-image denoisers (``"is"``, ``"wiener"``) each mixed with the hard machine at
            its grid schedule, ``(1 − w_i)·x̂0_local + w_i·x̂0_global``
            (:func:`ellsjax.machines.mixture`), the weights learned by
            :func:`ellsjax.calibration.differentiable_calibrate` on the calibration trajectories and
            evaluated like the rest (not in the paper: what a global part adds to the local theory).
        batch_size: images per machine call in calibration and evaluation (small on CPUs, where the
            kernel's chunks shrink as the query block grows; large on accelerators).
        description: one line for the report.
    """

    name: str
    net: Any
    train: Any
    epochs: int | None = None
    published: str | None = None
    candidates: tuple[int, ...] = (1, 3, 5, 7, 9, 11, 13, 15)
    calib_seeds: int = 16
    eval_seeds: int = 100
    nsteps: int = 20
    metric: str = "cosine"
    soft_support: int = 11
    soft_iterations: int = 30
    soft_batch: int = 8
    soft_lr: float = 0.1
    soft_curve: str = "per_step"
    soft_optimizer: str = "auto"
    soft_windows: tuple[str, ...] = ("gaussian", "box")
    others: tuple[str, ...] = ("pspc", "wiener", "pca", "cfdm")
    mixtures: tuple[str, ...] = ()
    batch_size: int = 16
    description: str = ""

    @property
    def machine(self) -> str:
        """The machine that explains a network of this padding (the registry's
        :func:`ellsjax.machines.for_network`: ELS for circular, bbELS for zero padding)."""
        return _machines.for_network(self.net.padding).name

    @property
    def soft_machine(self) -> str:
        """The differentiable (soft-window) twin of :attr:`machine`."""
        twin = _machines.spec(self.machine).soft_twin
        if twin is None:
            raise ValueError(f"machine: {self.machine} has no soft-window twin to calibrate")
        return twin


def _presets() -> dict[str, ReproducePreset]:
    from ellsjax import nets, training

    out = {
        "smoke": ReproducePreset(
            name="smoke",
            net=nets.NetConfig(arch="resnet", image_size=8, width=16, depth=2, padding="circular"),
            train=training.TrainConfig(steps=20, batch_size=16, lr=2e-3, limit=32, log_every=10,
                                       checkpoint_every=1000),
            candidates=(3, 5), calib_seeds=3, eval_seeds=3, nsteps=4, soft_support=5, soft_iterations=2,
            soft_batch=2, soft_lr=0.2, soft_windows=("box",),
            description="plumbing check: an 8x8 ResNet trained for 20 steps (numbers meaningless)",
        ),
        "mnist-cpu": ReproducePreset(
            name="mnist-cpu",
            net=nets.NetConfig(arch="resnet", image_size=16, width=32, depth=4, padding="circular"),
            train=training.TrainConfig(steps=4000, batch_size=64, lr=1e-3, limit=1000, ema_decay=0.999,
                                       log_every=100, checkpoint_every=1000),
            published="MNIST_ResNet_circular",
            candidates=(1, 3, 5, 7, 9, 11, 13, 15), calib_seeds=16, eval_seeds=100, nsteps=20,
            # the box window only (the Gaussian fitted worse: 0.829 vs 0.892 median r, 2026-12-03); the line
            # search from the grid schedule, at most 5 evaluations per step on 8 of the 16 seeds: 0.94-0.98x
            # the grid's time, objective 4.199 vs the grid's 4.263 (scripts/bench_calibration.py, 2026-12-03)
            soft_support=11, soft_iterations=5, soft_batch=8, soft_windows=("box",),
            description="circular ResNet (width 32, 4 layers) on 1000 MNIST images at 16x16, 4000 steps",
        ),
    }

    def conditional_cpu(name, dataset, channels, published, description):
        # the paper's FashionMNIST and CIFAR-10 networks are class-conditional with zero padding (hence
        # bbELS); here a small ResNet on 1000 images at 16x16 (CIFAR-10 too: at 32x32 one bbELS call on this
        # data costs 7-10x the 16x16 one, measured 2026-12-07, which puts the calibration and evaluation
        # alone past the 25-minute budget of a CPU preset)
        return ReproducePreset(
            name=name,
            net=nets.NetConfig(arch="resnet", image_size=16, channels=channels, width=32, depth=4, padding="zeros",
                               conditional=True, num_classes=10),
            train=training.TrainConfig(steps=4000, batch_size=64, lr=1e-3, dataset=dataset, source="auto",
                                       limit=1000, ema_decay=0.999, log_every=100, checkpoint_every=1000),
            published=published,
            candidates=(1, 3, 5, 7, 9, 11, 13, 15), calib_seeds=16, eval_seeds=100, nsteps=20,
            soft_support=11, soft_iterations=5, soft_batch=8, soft_windows=("box",),
            description=f"class-conditional zero-padded ResNet (width 32, 4 layers) on 1000 {description}, 4000 steps",
        )

    out["fashion-mnist-cpu"] = conditional_cpu("fashion-mnist-cpu", "fashion_mnist", 1,
                                               "FashionMNIST_ResNet_zeros_conditional", "Fashion-MNIST images at 16x16")
    out["cifar10-cpu"] = conditional_cpu("cifar10-cpu", "cifar10", 3, "CIFAR10_ResNet_zeros_conditional",
                                         "CIFAR-10 images at 16x16 (the shared subset; $ELLSJAX_DATA_DIR)")
    # the attention study's pair (ellsjax.studies): the same DDPM UNet, trained alike, with self-attention
    # at full resolution (and in the middle) or with none
    for suffix, attn in (("with", {"attn": (0,)}), ("without", {"mid_attn": False})):
        out[f"attention-smoke-{suffix}"] = ReproducePreset(
            name=f"attention-smoke-{suffix}",
            net=nets.NetConfig(arch="ddpm-unet", image_size=8, width=32, ch_mult=(1,), num_res_blocks=1, **attn),
            train=training.TrainConfig(steps=6, batch_size=8, lr=2e-3, limit=32, log_every=10, checkpoint_every=1000),
            candidates=(3,), calib_seeds=2, eval_seeds=2, nsteps=2, soft_windows=(), others=(), mixtures=("is",),
            description=f"plumbing check: an 8x8 DDPM UNet {suffix} attention, 6 steps (numbers meaningless)",
        )
        out[f"attention-cpu-{suffix}"] = ReproducePreset(
            name=f"attention-cpu-{suffix}",
            net=nets.NetConfig(arch="ddpm-unet", image_size=16, width=32, ch_mult=(1, 2), num_res_blocks=1, **attn),
            # EMA 0.995: a short run (ellsjax.locality's CPU presets measured 0.999 too slow to forget the init)
            train=training.TrainConfig(steps=2500, batch_size=32, lr=1e-3, limit=1000, ema_decay=0.995,
                                       log_every=100, checkpoint_every=1000),
            candidates=(1, 3, 5, 7, 9, 11, 13, 15), calib_seeds=16, eval_seeds=100, nsteps=20,
            soft_support=11, soft_iterations=5, soft_batch=8, soft_windows=("box",), others=(),
            mixtures=("is", "wiener"),
            description=f"DDPM UNet (ch 32, ch_mult 1,2, 1 block per level) {suffix} self-attention "
                        "(16x16 and 8x8) on 1000 MNIST images at 16x16, 2500 steps",
        )
    paper = {
        "paper-mnist-resnet-zeros": ("MNIST_ResNet_zeros", "MNIST_ResNet_zeros"),
        "paper-mnist-resnet-circular": ("MNIST_ResNet_circular", "MNIST_ResNet_circular"),
        "paper-mnist-unet-zeros": ("MNIST_UNet_zeros", "MNIST_UNet_zeros"),
        "paper-fashion-mnist-resnet": ("FashionMNIST_ResNet_zeros_conditional", "FashionMNIST_ResNet_zeros_conditional"),
        "paper-cifar10-resnet": ("CIFAR10_ResNet_zeros_conditional", "CIFAR10_ResNet_zeros_conditional"),
        "paper-cifar10-unet": ("CIFAR10_UNet_zeros_conditional", "CIFAR10_UNet_zeros_conditional"),
    }
    for name, (net_name, scales_name) in paper.items():
        p = nets.preset(net_name)
        out[name] = ReproducePreset(
            name=name, net=p.net,
            train=training.TrainConfig(steps=1, dataset=p.dataset, source="auto", log_every=200,
                                       checkpoint_every=2000),
            epochs=p.epochs, published=scales_name, candidates=tuple(range(1, 32, 2)), calib_seeds=100,
            eval_seeds=100, nsteps=20, soft_support=15, soft_iterations=100, soft_batch=16, soft_lr=0.05,
            batch_size=128,
            description=f"the paper's {net_name} ({p.epochs} epochs; a GPU job)",
        )
    return out


#: The experiments by name.
PRESETS: Mapping[str, ReproducePreset] = _presets_mod.LazyTable(_presets)


def preset(name: str) -> ReproducePreset:
    """Look an experiment up in :data:`PRESETS`."""
    if name not in PRESETS:
        raise ValueError(f"preset: unknown reproduce preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def run(
    p: ReproducePreset | str,
    out_dir: str | os.PathLike,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    weights: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run an experiment (train → calibrate → evaluate → report) into ``out_dir``; returns the results.

    Args:
        p: a :class:`ReproducePreset` or its name in :data:`PRESETS`.
        out_dir: output directory (created; an existing network run in ``out_dir/net`` is resumed).
        progress: show training progress bars.
        log: receives one line per stage.
        weights: a released PyTorch network (e.g. Kamb & Ganguli's ``backbone_MNIST_ResNet_zeros.pt``
            for ``paper-mnist-resnet-zeros``) to use instead of training: converted into
            ``out_dir/net`` (:func:`ellsjax.convert.network_run`; it must match the preset's
            architecture, channels and padding; its own depth and widths are used).
    """
    from ellsjax import models, training

    p = preset(p) if isinstance(p, str) else p
    if not isinstance(p, ReproducePreset):
        raise TypeError(f"p: expected a ReproducePreset or a preset name, got {type(p).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    # 1. train
    cfg = p.train
    images, labels = training.load_data(p.net, cfg)
    if p.epochs is not None:
        cfg = dataclasses.replace(cfg, steps=max(1, p.epochs * (images.shape[0] // cfg.batch_size)))
    run_dir = out / "net"
    net, cfg, note = _convert.trained_or_converted(run_dir, p.net, cfg, (images, labels), weights=weights,
                                                   log=lambda m: log(f"[{p.name}] {m}"), progress=progress)
    if note:
        p = dataclasses.replace(p, net=net, description=f"{p.description}; {note}")
    network = models.load(run_dir)
    timings["train_s"] = time.perf_counter() - t0

    # 2. calibrate
    t1 = time.perf_counter()
    shape = network.image_shape
    sample_labels = _ev.seed_labels(p.net, max(p.calib_seeds, p.eval_seeds))
    mlabels = labels if p.net.conditional else None
    hard = _machines.build(p.machine, images, mlabels, schedule=network.schedule)
    ts = _cal.calibration_times(p.nsteps)
    x_cal = jax.random.normal(jax.random.key(10_000), (p.calib_seeds, *shape))
    lab_cal = None if sample_labels is None else sample_labels[: p.calib_seeds]
    traj = _cal.network_trajectory(network, x_cal, ts, label=lab_cal)
    log(f"[{p.name}] grid calibration of {p.machine} over {p.candidates} on {p.calib_seeds} trajectories")
    grid = _cal.grid_calibrate(network, hard, None, ts, candidates=p.candidates, metric=p.metric, label=lab_cal,
                               trajectory=traj, batch_size=p.batch_size)
    with _io.atomic_path(out / "scales_grid.json") as tmp:
        grid.save(tmp, machine=p.machine, preset=p.name)
    timings["grid_calibration_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    softs, diffs = {}, {}
    for window in p.soft_windows:
        softs[window] = _machines.build(p.soft_machine, images, mlabels, schedule=network.schedule,
                                        support=p.soft_support, window=window)
        log(f"[{p.name}] differentiable calibration of {p.soft_machine}, {window} window (K <= {p.soft_support}, "
            f"{p.soft_optimizer} optimizer, {p.soft_iterations} iterations)")
        diffs[window] = _cal.differentiable_calibrate(
            network, softs[window], None, ts, init=_cal.widths_from_sizes(grid.scales, window), iterations=p.soft_iterations,
            learning_rate=p.soft_lr, batch=min(p.soft_batch, p.calib_seeds), curve=p.soft_curve,
            optimizer=p.soft_optimizer, label=lab_cal,
            trajectory=traj,
        )
        with _io.atomic_path(out / f"scales_soft_{window}.json") as tmp:
            diffs[window].save(tmp, machine=p.soft_machine, preset=p.name)
    # the grid schedule measured on the differentiable calibration's objective, for comparison
    grid_loss = _cal.trajectory_loss(hard, traj, grid.scales, label=lab_cal, batch_size=p.batch_size)
    timings["soft_calibration_s"] = time.perf_counter() - t2

    # 3. evaluate
    t3 = time.perf_counter()
    ideal = _machines.ideal(images, mlabels, schedule=network.schedule)
    x_eval = jax.random.normal(jax.random.key(0), (p.eval_seeds, *shape))
    lab_eval = None if sample_labels is None else sample_labels[: p.eval_seeds]
    rows: dict[str, dict[str, Any]] = {}
    figures: dict[str, dict[str, str]] = {}

    creativity: dict[str, dict[str, float]] = {}

    def measure(key, samples):
        # patch-mosaic measures (ellsjax.explain) of the final samples; consistency against the
        # ELS machine with the network's padding, at 3x3 patches
        c = _explain.creativity(np.asarray(samples), images, patch_size=3, padding=p.net.padding)
        creativity[key] = {m: float(np.mean(c[m])) for m in _CREATIVITY}

    def record(key, machine, grid_ts, scales, evaluation, schedule=None):
        measure(key, evaluation.machine)
        rows[key] = {"machine": machine, "ts": [float(v) for v in grid_ts],
                     "scales": None if scales is None else list(scales),
                     "schedule": schedule or key.rsplit("-", 1)[-1], "summary": _ev.summarize(evaluation)}
        figs = _ev.save_figures(evaluation, out / "figures", name=key, prefix=f"{key}_")
        figures[key] = {k: str(v.relative_to(out)) for k, v in figs.items()}

    log(f"[{p.name}] evaluating on {p.eval_seeds} seeds")
    bs = p.batch_size
    net_samples = _ev.sample(network, x_eval, ts, label=lab_eval, batch_size=bs)
    ideal_samples = _ev.sample(ideal, x_eval, ts, label=lab_eval, batch_size=bs)
    measure("network", net_samples)
    measure("is", ideal_samples)
    ev = _ev.evaluate(network, hard, x_eval, ts, scales=grid.scales, label=lab_eval, network_samples=net_samples,
                      baseline_samples=ideal_samples, batch_size=bs)
    record(f"{p.machine}-grid", p.machine, ts, grid.scales, ev)
    samples = {"network": net_samples, "is": ideal_samples, f"{p.machine}-grid": ev.machine}
    for window, diff in diffs.items():
        ev = _ev.evaluate(network, softs[window], x_eval, ts, scales=diff.ells, label=lab_eval,
                          network_samples=net_samples, baseline_samples=ideal_samples, batch_size=bs)
        record(f"{p.soft_machine}-{window}", p.soft_machine, ts, diff.ells, ev)
    if p.published is not None:
        published = ScaleSchedule.load(p.published)
        pts = published.times()
        pscales, schedule_name = fitted_schedule(hard, published.values)
        if schedule_name != "published":
            log(f"[{p.name}] the published schedule {p.published} has patches larger than the "
                f"{shape[0]}x{shape[1]} images allow; evaluating it {schedule_name.removeprefix('published, ')}")
        try:  # the machine's own check: e.g. ELS patches no larger than the image
            _samplers.check_scales(pscales, hard, published.nsteps)
        except ValueError as e:
            log(f"[{p.name}] skipping the published schedule {p.published}: {e}")
        else:
            ev = _ev.evaluate(network, hard, x_eval, pts, scales=pscales, label=lab_eval, baseline=ideal, batch_size=bs)
            record(f"{p.machine}-published", p.machine, pts, pscales, ev, schedule=schedule_name)
    timings["evaluation_s"] = time.perf_counter() - t3

    # 3b. the other analytic denoisers, under the same protocol
    t4 = time.perf_counter()
    other_scales: dict[str, list[int] | None] = {}
    for name in p.others:
        other = _machines.build(name, images, mlabels, schedule=network.schedule)
        oscales = None
        if other.needs_scale:
            cands = tuple(k for k in p.candidates if _fits(other, k))
            log(f"[{p.name}] grid calibration of {name} over {cands}")
            og = _cal.grid_calibrate(network, other, None, ts, candidates=cands, metric=p.metric, label=lab_cal,
                                     trajectory=traj, batch_size=bs)
            with _io.atomic_path(out / f"scales_grid_{name}.json") as tmp:
                og.save(tmp, machine=name, preset=p.name)
            oscales = list(og.scales)
        log(f"[{p.name}] evaluating {name}")
        ev = _ev.evaluate(network, other, x_eval, ts, scales=oscales, label=lab_eval, network_samples=net_samples,
                          baseline_samples=ideal_samples, batch_size=bs)
        record(f"{name}-{'grid' if oscales is not None else 'none'}", name, ts, oscales, ev,
               schedule="grid" if oscales is not None else "—")
        other_scales[name] = oscales
    timings["others_s"] = time.perf_counter() - t4

    # 3c. the local machine plus a whole-image posterior, its per-step weights learned from gradients
    t5 = time.perf_counter()
    mixtures: dict[str, dict[str, Any]] = {}
    for name in p.mixtures:
        glob = _machines.build(name, images, mlabels, schedule=network.schedule)
        mix = _machines.mixture(hard, glob)
        log(f"[{p.name}] differentiable calibration of the {p.machine} + {name} mixture's weights")
        mc = _cal.differentiable_calibrate(network, mix, None, ts, init=[(k, 0.0) for k in grid.scales],
                                           label=lab_cal, trajectory=traj)
        ev = _ev.evaluate(network, mix, x_eval, ts, scales=mc.scales, label=lab_eval, network_samples=net_samples,
                          baseline_samples=ideal_samples, batch_size=bs)
        key = f"{p.machine}+{name}-mixture"
        record(key, f"{p.machine}+{name}", ts, [list(pair) for pair in mc.scales], ev, schedule="grid + learned w")
        samples[key] = ev.machine
        mixtures[name] = {"weights": list(mc.weights), "local_scales": list(mc.local_scales),
                          "objective": float(np.sum(mc.step_loss)), "objective_local": float(np.sum(mc.step_loss_local)),
                          "step_loss": mc.step_loss.tolist(), "step_loss_local": mc.step_loss_local.tolist()}
    timings["mixtures_s"] = time.perf_counter() - t5
    timings["total_s"] = time.perf_counter() - t0
    # the evaluation seeds' samples (what per-pixel comparisons, e.g. the attention study's error maps, read)
    _io.save_npz(out / "samples.npz", labels=np.asarray(-1 if lab_eval is None else lab_eval),
                 **{k.replace("+", "_plus_"): np.asarray(v, np.float32) for k, v in samples.items()})

    results = {
        "preset": p.name,
        "description": p.description,
        "net": p.net.to_dict(),
        "train": {**cfg.to_dict(), "schedule": dataclasses.asdict(cfg.schedule)},
        "weights": None if weights is None else Path(weights).name,
        "num_train_images": int(images.shape[0]),
        "calibration": {
            "grid": {"scales": list(grid.scales), "candidates": list(grid.candidates), "metric": grid.metric,
                     "file": "scales_grid.json"},
            "others": {n: {"scales": sc, "file": None if sc is None else f"scales_grid_{n}.json"}
                       for n, sc in other_scales.items()},
            "mixtures": mixtures,
            "grid_objective": float(np.sum(grid_loss)),
            "grid_step_loss": grid_loss.tolist(),
            "soft": {
                w: {"ells": list(d.ells), "support": d.support, "window": d.window, "edge": d.edge,
                    "final_loss": float(d.losses[-1]), "initial_loss": float(d.losses[0]),
                    "step_loss": d.step_loss.tolist(), "objective": float(np.sum(d.step_loss)),
                    "file": f"scales_soft_{w}.json"}
                for w, d in diffs.items()
            },
        },
        "protocol": _protocol(p),
        "evaluations": rows,
        "creativity": creativity,
        "figures": figures,
        "timings": timings,
        "notes": "pearson_r is the Pearson correlation of centered, normalised samples (the paper's 'r^2'); "
                 "r_squared is the coefficient of determination 1 - SS_res/(D Var(network)).",
    }
    _io.write_json(out / "results.json", results)
    _io.write_text(out / "report.md", _report(p, results, cfg, int(images.shape[0])))
    log(f"[{p.name}] done in {timings['total_s']:.0f} s -> {out / 'report.md'}")
    return results


def _protocol(p: ReproducePreset) -> dict[str, Any]:
    """The preset's calibration and evaluation options (what, with the network and training, makes a
    finished run reusable: :func:`finished`)."""
    keep = ("published", "candidates", "calib_seeds", "eval_seeds", "nsteps", "metric", "soft_support",
            "soft_iterations", "soft_batch", "soft_lr", "soft_curve", "soft_optimizer", "soft_windows", "others",
            "mixtures")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in
            ((k, getattr(p, k)) for k in keep)}


def finished(p: ReproducePreset | str, out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The results of a finished run of ``p`` in ``out_dir`` (its ``results.json``), or ``None`` when
    there is none or it was made with other settings (network, training, calibration or evaluation
    options; a run of another preset)."""
    p = preset(p) if isinstance(p, str) else p
    path = Path(out_dir) / "results.json"
    if not path.is_file():
        return None
    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    from ellsjax import nets, training

    if res.get("preset") != p.name:
        return None
    if res.get("protocol") is not None and res["protocol"] != _protocol(p):
        return None
    try:  # through the configs, so that an option added since (at its default) still matches
        net = nets.NetConfig.from_dict(res["net"])
        train = training.TrainConfig.from_dict(res["train"])
    except (KeyError, TypeError, ValueError):
        return None
    if p.epochs is None and train != p.train:
        return None
    if p.epochs is not None and dataclasses.replace(train, steps=p.train.steps) != p.train:
        return None  # the steps follow from the epochs and the data
    return res if net == p.net else None


def fitted_schedule(machine, scales) -> tuple[tuple, str]:
    """A published schedule made to fit ``machine``'s images: the patch sizes it cannot take (the
    paper's networks saw larger images) capped at the largest it can, and the schedule's name for the
    report (``"published"``, or ``"published, capped at K"``).

    Example:
        >>> import jax, ellsjax as ej
        >>> imgs = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1), minval=-1, maxval=1)
        >>> fitted_schedule(ej.machines.els(imgs), (11, 9, 5, 3))
        ((7, 7, 5, 3), 'published, capped at 7')
        >>> fitted_schedule(ej.machines.els(imgs), (5, 3))
        ((5, 3), 'published')
    """
    scales = tuple(scales)
    cap = max((k for k in range(1, max(scales) + 1) if _fits(machine, k)), default=None)
    if cap is None or cap >= max(scales):
        return scales, "published"
    return tuple(min(k, cap) for k in scales), f"published, capped at {cap}"


def _fits(machine, k) -> bool:
    """Whether ``k`` is a scale this machine takes (its own check, e.g. a window inside the image)."""
    try:
        machine.check_scale(k)
    except (TypeError, ValueError):
        return False
    return True


#: Creativity measures in the report (means over the evaluation seeds; :func:`ellsjax.explain.creativity`).
_CREATIVITY = ("nn_rms", "near_copy", "patch_rms", "consistency")


def _fmt_scales(s):
    return ", ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in s)


def _report(p: ReproducePreset, res: dict[str, Any], cfg, n_images: int) -> str:
    lines = [
        f"# ellsjax reproduce: {p.name}",
        "",
        p.description,
        "",
        f"Network: {p.net.arch}, width {p.net.width}, depth {p.net.depth}, padding {p.net.padding}, "
        f"{p.net.image_size}x{p.net.image_size}, receptive field {p.net.receptive_field}; "
        + (f"the authors' weights ({res['weights']}); machines on {n_images} {cfg.dataset} images."
           if res.get("weights") else
           f"trained {cfg.steps} steps, batch {cfg.batch_size}, lr {cfg.lr} on {n_images} {cfg.dataset} images."),
        f"Calibration on {p.calib_seeds} network trajectories ({p.nsteps} DDIM steps, t = i/{p.nsteps}); "
        f"evaluation on {p.eval_seeds} other seeds, network and machines from the same noise.",
        "",
        "Pearson r is the correlation of centered, normalised samples (what the paper calls r²); R² is the "
        "coefficient of determination 1 − SS_res/(D·Var(network)).",
        "",
        "| machine | schedule | median r | mean r | median R² | median MSE | IS median r | IS mean r | "
        "beats IS |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in res["evaluations"].values():
        sm = row["summary"]
        m, b = sm["machine"], sm["baseline"]
        lines.append(
            f"| {row['machine']} | {row['schedule']} | {m['pearson_r']['median']:.3f} | "
            f"{m['pearson_r']['mean']:.3f} | {m['r_squared']['median']:.3f} | {m['mse']['median']:.4f} | "
            f"{b['pearson_r']['median']:.3f} | {b['pearson_r']['mean']:.3f} | {sm['frac_beats_baseline']:.2f} |"
        )
    cal = res["calibration"]
    lines += [
        "",
        "Schedules (step i starts at t = ts[i]):",
        "",
        f"- grid ({cal['grid']['metric']}, candidates {cal['grid']['candidates']}): {_fmt_scales(cal['grid']['scales'])}",
    ]
    for w, c in cal["soft"].items():
        lines.append(f"- learned {w} window ℓ (K ≤ {c['support']}; minibatch loss {c['initial_loss']:.4g} → "
                     f"{c['final_loss']:.4g}): {_fmt_scales(c['ells'])}")
    for key, row in res["evaluations"].items():
        if key.endswith("-published"):
            lines.append(f"- {row['schedule']} ({p.published}, over the paper's 19-step grid): "
                         f"{_fmt_scales(row['scales'])}")
    for n, o in cal.get("others", {}).items():
        if o["scales"] is not None:
            lines.append(f"- {n} grid: {_fmt_scales(o['scales'])}")
    for n, mx in cal.get("mixtures", {}).items():
        lines.append(f"- {n} weight w in the {p.machine} + {n} mixture (at the grid's patch sizes; objective "
                     f"{mx['objective']:.4g}, {mx['objective_local']:.4g} at w = 0): {_fmt_scales(mx['weights'])}")
    objs = ", ".join(f"{c['objective']:.4g} for the learned {w} window" for w, c in cal["soft"].items())
    lines += [
        "",
        "On the calibration trajectories, the differentiable calibration's objective (Σ over steps of the "
        f"normalised x̂0 MSE against the network) is {objs}, and {cal['grid_objective']:.4g} for the grid "
        "schedule of the hard machine.",
    ]
    lines += [
        "",
        "## Creativity",
        "",
        "Means over the evaluation seeds (ellsjax.explain.creativity): nn_rms, the RMS distance to the nearest "
        f"training image; near_copy, the fraction of samples whose nearest training image is {1 / _explain.COPY_RATIO:.0f}x "
        "closer than the second nearest; patch_rms, the RMS distance of each 3x3 patch to its nearest training "
        "patch; consistency, the fraction of pixels equal (within 2/255) to the center of their nearest training "
        "patch (Theorem 4.1 of the paper; ELS samples satisfy it).",
        "",
        "| samples | " + " | ".join(_CREATIVITY) + " |",
        "| --- |" + " --- |" * len(_CREATIVITY),
    ]
    for key, row in res["creativity"].items():
        lines.append(f"| {key} | " + " | ".join(f"{row[m]:.3f}" for m in _CREATIVITY) + " |")
    lines += ["", "## Figures", ""]
    for key, figs in res["figures"].items():
        for kind, path in figs.items():
            lines.append(f"![{key} {kind}]({path})")
    t = res["timings"]
    lines += ["", "Timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items()), ""]
    return "\n".join(lines)
