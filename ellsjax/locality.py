"""The locality family's shared benchmark (Lukoianov et al., NeurIPS 2025; reused by GoldDiff, ICML 2026).

The protocol: a 1000-step linear-β DDPM schedule (β from 1e-4 to 0.02,
:func:`ellsjax.schedules.ddpm_linear`), 10 DDIM steps at ``t_idx`` 900, 800, …, 0 (the last step lands
on the clean image: the sample is the final ``x̂0``), the papers' "baseline UNet" as the reference
network (Ho et al.'s DDPM UNet, ``arch="ddpm-unet"``, with its middle self-attention block; ch 128,
``ch_mult`` 1,2,3,4 at 32 px and ch 64, 1,2,2 at 28 px, 2 residual blocks, dropout 0.15; its released
weights convert with ``ellsjax convert`` or ``reproduce --weights``), and per sample ``r² = 1 − SS_res/(D·Var(network sample))`` and the MSE (on the ``[-1, 1]``
pixel scale) of each analytic denoiser's sample against the network's from the same noise, with the
seconds per denoiser step and the peak memory of one step. The denoisers: Optimal (the ideal score),
Wiener, Kamb & Ganguli's ELS (the machine of the network's padding, grid-calibrated on the
network's trajectories), PCA locality, GoldDiff as published, and GoldDiff certified.

Presets (:data:`PRESETS`, run with ``ellsjax reproduce --preset NAME``): ``locality-smoke`` (seconds;
the tests run it; a plain 2-level UNet, plumbing only), ``locality-mnist-cpu`` and ``locality-cifar-cpu``
(the DDPM UNet at a CPU-sized ch 32, trained on this CPU on a subset of the data),
``locality-cifar10`` and ``locality-mnist`` (the protocol's networks on the full training sets, for
accelerators; ``--weights`` takes the released ones instead).

Example:
    >>> sorted(PRESETS)[:2]
    ['locality-cifar-cpu', 'locality-cifar10']
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ellsjax import _io
from ellsjax import calibration as _cal
from ellsjax import convert as _convert
from ellsjax import evaluation as _ev
from ellsjax import machines as _machines
from ellsjax import presets as _presets_mod
from ellsjax import samplers as _samplers
from ellsjax import schedules as _schedules
from ellsjax.machines import search as _search

__all__ = ["LocalityPreset", "PRESETS", "preset", "run", "protocol_times", "protocol_sample"]


def _clipped_x0(d, x, t, label, k):
    # diffusers' DDIMScheduler (the protocol's sampler) clips x̂0 to [-1, 1] by default
    # (clip_sample=True): analytic x̂0 already lie there; a network's at t_idx 900 (a = 0.016) do not
    return jnp.clip(d._denoise(x, t, label, k), -1.0, 1.0)


def protocol_sample(denoiser, x_start, ts, *, scales=None, batch_size: int = 8, return_trajectory: bool = False):
    """The protocol's sampler: DDIM (η = 0) over ``ts`` with ``x̂0`` clipped to ``[-1, 1]`` at every step
    (diffusers' ``clip_sample=True``), in batches of ``batch_size`` seeds.

    Returns the samples ``[B, H, W, C]`` (numpy), and the :class:`~ellsjax.samplers.Trajectory` if asked.
    """
    ts = _samplers.check_times(ts, denoiser)
    sc = _samplers.check_scales(scales, denoiser, ts.shape[0] - 1)
    outs, trajs = [], []
    x_start = jnp.asarray(x_start, jnp.float32)
    for i in range(0, x_start.shape[0], batch_size):
        x, traj, _ = _samplers.run(_samplers.DDIM, denoiser, x_start[i:i + batch_size], ts, scales=sc,
                                   x0_fn=_clipped_x0, return_trajectory=return_trajectory)
        outs.append(np.asarray(x))
        trajs.append(traj)
    out = np.concatenate(outs)
    if not return_trajectory:
        return out
    traj = _samplers.Trajectory(trajs[0].ts, jnp.concatenate([t.xs for t in trajs], axis=1),
                                jnp.concatenate([t.x0s for t in trajs], axis=1))
    return out, traj


def protocol_times(t_idx=tuple(range(900, -1, -100)), steps: int = 1000) -> np.ndarray:
    """The protocol's DDIM times on :func:`~ellsjax.schedules.ddpm_linear`: ``(t_idx + 1)/steps`` for
    each index, then ``0`` (clean), so ``len(t_idx)`` denoiser calls.

    Example:
        >>> protocol_times((900, 0)).tolist()
        [0.9010000228881836, 0.0010000000474974513, 0.0]
    """
    idx = np.asarray(t_idx)
    if idx.ndim != 1 or idx.size == 0 or np.any(np.diff(idx) >= 0) or idx.min() < 0 or idx.max() >= steps:
        raise ValueError(f"t_idx: expected decreasing step indices in [0, {steps}), got {t_idx!r}")
    return np.concatenate([(idx + 1) / steps, [0.0]]).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class LocalityPreset:
    """One run of the locality protocol.

    Attributes:
        name: preset name.
        net: the reference network (:class:`ellsjax.nets.NetConfig`; the DDPM UNet but in the smoke preset).
        train: its training options (:class:`ellsjax.training.TrainConfig`, with the protocol's
            :func:`~ellsjax.schedules.ddpm_linear` schedule).
        seeds: samples compared per denoiser.
        t_idx: the DDIM step indices.
        candidates: the ELS machine's grid-calibration patch sizes.
        calib_seeds: network trajectories the ELS calibration uses (other noise than the samples).
        dataset: a name with GoldDiff release parameters (``"cifar10"``) or ``None``.
        certified_tolerance: the certified GoldDiff's ``ε``.
        batch_size: images per denoiser call.
        description: one line for the report.
    """

    name: str
    net: Any
    train: Any
    seeds: int = 100
    t_idx: tuple[int, ...] = tuple(range(900, -1, -100))
    candidates: tuple[int, ...] = (3, 5, 7, 9, 11, 13, 15)
    calib_seeds: int = 8
    dataset: str | None = None
    certified_tolerance: float = 1e-2
    batch_size: int = 8
    description: str = ""


def _presets() -> dict[str, LocalityPreset]:
    from ellsjax import nets, training

    sched = _schedules.ddpm_linear()

    def tc(**kw):
        return training.TrainConfig(schedule=sched, log_every=100, checkpoint_every=1000, **kw)

    unet = lambda size, ch, width, depth: nets.NetConfig(  # noqa: E731
        arch="unet", image_size=size, channels=ch, width=width, depth=depth, padding="zeros")
    # the protocol's DDPM UNet (its middle block has self-attention; attn=[] at the levels)
    ddpm = lambda size, ch, width, mult, blocks, dropout: nets.NetConfig(  # noqa: E731
        arch="ddpm-unet", image_size=size, channels=ch, width=width, ch_mult=mult, num_res_blocks=blocks,
        dropout=dropout)
    return {
        "locality-smoke": LocalityPreset(
            name="locality-smoke", net=unet(8, 1, 16, 2),
            train=tc(steps=10, batch_size=16, lr=2e-3, limit=40), seeds=2, t_idx=(900, 0),
            candidates=(3,), calib_seeds=1, batch_size=2,
            description="plumbing check: an 8x8 UNet trained for 10 steps on 40 MNIST images (numbers meaningless)"),
        "locality-mnist-cpu": LocalityPreset(
            name="locality-mnist-cpu", net=ddpm(16, 1, 32, (1, 2), 1, 0.0),
            train=tc(steps=3000, batch_size=64, lr=1e-3, limit=2000, ema_decay=0.995), seeds=32,
            candidates=(3, 5, 7, 9, 11, 13, 15), calib_seeds=8,
            description="DDPM UNet (ch 32, ch_mult 1,2, 1 block per level, middle attention) on 2000 MNIST images "
                        "at 16x16, 3000 steps"),
        "locality-cifar-cpu": LocalityPreset(
            name="locality-cifar-cpu", net=ddpm(32, 3, 32, (1, 2), 1, 0.0),
            # EMA 0.995: at 0.999 the average still holds 8% of the random initial weights after 2500
            # steps (measured: ε error 0.28 at t = 0.9 against 0.06 without EMA; DDIM samples diverge)
            train=tc(steps=2500, batch_size=32, lr=1e-3, dataset="cifar10", source="auto", limit=1000,
                     ema_decay=0.995),
            seeds=16, candidates=(3, 5, 7, 9, 11, 15), calib_seeds=4, dataset="cifar10",
            description="DDPM UNet (ch 32, ch_mult 1,2, 1 block per level, middle attention) on 1000 CIFAR-10 "
                        "images, 2500 steps on a CPU"),
        "locality-cifar10": LocalityPreset(
            name="locality-cifar10", net=ddpm(32, 3, 128, (1, 2, 3, 4), 2, 0.15),
            train=tc(steps=200_000, batch_size=128, lr=2e-4, dataset="cifar10", source="auto", ema_decay=0.9999),
            seeds=100, candidates=tuple(range(1, 32, 2)), calib_seeds=32, dataset="cifar10", batch_size=64,
            description="the protocol on all of CIFAR-10 (a GPU job)"),
        "locality-mnist": LocalityPreset(
            name="locality-mnist", net=ddpm(28, 1, 64, (1, 2, 2), 2, 0.15),
            train=tc(steps=100_000, batch_size=128, lr=2e-4, source="auto", ema_decay=0.9999),
            seeds=100, candidates=tuple(range(1, 32, 2)), calib_seeds=32, batch_size=64,
            description="the protocol on all of MNIST at 28x28 (a GPU job)"),
    }


#: The protocol's presets, by name.
PRESETS: Mapping[str, LocalityPreset] = _presets_mod.LazyTable(_presets)


def preset(name: str) -> LocalityPreset:
    """Look a protocol run up in :data:`PRESETS`."""
    if name not in PRESETS:
        raise ValueError(f"preset: unknown locality preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def _step_cost(den, x, ts, scales):
    """Median seconds of one denoiser call at the batch ``x`` at the protocol's first, middle and last
    times (each timed after a warm-up call at that time: the costs differ with ``t`` for the
    certified search), and the peak bytes of one compiled step (temporaries, arguments, outputs)."""
    times, peak, programs = [], 0, {}
    steps = len(ts) - 1
    for i in sorted({0, steps // 2, steps - 1}):
        t = ts[i]
        k = None if scales is None else scales[i]
        tb = jnp.full((x.shape[0],), t, jnp.float32)
        if k not in programs:  # t is traced: one program per distinct scale
            fn = jax.jit(lambda d, xx, tt, k=k: d._denoise(xx, tt, None, k))
            programs[k] = fn.lower(den, x, tb).compile()
            mem = programs[k].memory_analysis()
            if mem is not None:
                peak = max(peak, sum(int(getattr(mem, f, 0) or 0) for f in
                                     ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes")))
        compiled = programs[k]
        jax.block_until_ready(compiled(den, x, tb))
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(den, x, tb))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), peak


def run(
    p: LocalityPreset | str,
    out_dir: str | os.PathLike,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    weights: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run the protocol (train → calibrate ELS → sample every denoiser → table) into ``out_dir``.

    Returns the results (also ``results.json``, ``report.md`` and ``samples.png`` in ``out_dir``).
    ``weights``: the protocol's released baseline UNet (a ``ckpt_epoch_200.pt`` of the locality
    repository) to use instead of training, converted into ``out_dir/net``
    (:func:`ellsjax.convert.network_run`).
    """
    from ellsjax import models, training

    p = preset(p) if isinstance(p, str) else p
    if not isinstance(p, LocalityPreset):
        raise TypeError(f"p: expected a LocalityPreset or a preset name, got {type(p).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    cfg = p.train
    images, _ = training.load_data(p.net, cfg)
    run_dir = out / "net"
    net, cfg, note = _convert.trained_or_converted(run_dir, p.net, cfg, (images, None), weights=weights,
                                                   log=lambda m: log(f"[{p.name}] {m}"), progress=progress)
    if note:
        p = dataclasses.replace(p, net=net, description=f"{p.description}; {note}")
    network = models.load(run_dir)
    timings["train_s"] = time.perf_counter() - t0
    sched = network.schedule
    ts = protocol_times(p.t_idx, sched.steps if sched.kind == "ddpm_linear" else 1000)
    shape = network.image_shape
    x_start = jax.random.normal(jax.random.key(0), (p.seeds, *shape))
    x_cal = jax.random.normal(jax.random.key(10_000), (p.calib_seeds, *shape))
    bs = p.batch_size

    t1 = time.perf_counter()
    els_name = _machines.for_network(p.net.padding).name
    els = _machines.build(els_name, images, schedule=sched)
    cands = tuple(k for k in p.candidates if k <= min(shape[:2]))
    log(f"[{p.name}] grid calibration of {els_name} over {cands} on {p.calib_seeds} network trajectories")
    _, traj = protocol_sample(network, x_cal, ts, batch_size=bs, return_trajectory=True)
    grid = _cal.grid_calibrate(network, els, None, ts, candidates=cands, trajectory=traj, batch_size=bs)
    with _io.atomic_path(out / "scales_grid.json") as tmp:
        grid.save(tmp, machine=els_name, preset=p.name)
    timings["calibration_s"] = time.perf_counter() - t1

    golddiff = _machines.golddiff(images, schedule=sched, dataset=p.dataset)
    denoisers = [
        ("Network (UNet)", network, None),
        ("Optimal (ideal score)", _machines.ideal(images, schedule=sched), None),
        ("Wiener", _machines.wiener(images, schedule=sched), None),
        (f"Kamb & Ganguli ({els_name}, calibrated)", els, tuple(grid.scales)),
        ("PCA locality", _machines.pca(images, schedule=sched), None),
        ("GoldDiff (published)", golddiff, None),
        # GoldDiff's retrieval order without its random pre-sample, certified within ε of exact PCA (θ as GoldDiff's)
        (f"GoldDiff (certified, ε = {p.certified_tolerance:g})",
         golddiff.pca.with_search(_search.CertifiedSubset(p.certified_tolerance, dataset=p.dataset)), None),
    ]
    rows, samples = [], {}
    t2 = time.perf_counter()
    for label, den, scales in denoisers:
        log(f"[{p.name}] sampling {label}")
        ta = time.perf_counter()
        samples[label] = protocol_sample(den, x_start, ts, scales=scales, batch_size=bs)
        wall = time.perf_counter() - ta
        step_s, peak = _step_cost(den, x_start[:bs], ts, scales)
        rows.append({"denoiser": label, "step_s": step_s, "peak_bytes": peak, "sample_wall_s": wall})
    ref = samples["Network (UNet)"]
    for row in rows:
        s = samples[row["denoiser"]]
        r2 = _ev.r_squared(s, ref)
        mse = np.mean((np.asarray(s, np.float64) - np.asarray(ref, np.float64)) ** 2, axis=(1, 2, 3))
        row.update(r2_mean=float(np.mean(r2)), r2_median=float(np.median(r2)), mse_mean=float(np.mean(mse)))
    timings["sampling_s"] = time.perf_counter() - t2
    timings["total_s"] = time.perf_counter() - t0
    _grid_figure(samples, out / "samples.png")
    results = {
        "preset": p.name, "description": p.description, "net": p.net.to_dict(),
        "train": {**cfg.to_dict(), "schedule": dataclasses.asdict(cfg.schedule)},
        "num_train_images": int(images.shape[0]), "t_idx": list(p.t_idx), "ts": ts.tolist(),
        "els_scales": list(grid.scales), "rows": rows, "timings": timings,
        "host": {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
                 "load_avg_end": os.getloadavg()},
        "notes": "r2 = 1 - SS_res/(D Var(network sample)) per sample; MSE on the [-1, 1] pixel scale; step_s: "
                 f"median seconds of one denoiser call on {bs} images at the first, middle and last step; peak_bytes: "
                 "compiled step temporaries + arguments + outputs.",
    }
    _io.write_json(out / "results.json", results)
    _io.write_text(out / "report.md", _report(p, results))
    log(f"[{p.name}] done in {timings['total_s']:.0f} s -> {out / 'report.md'}")
    return results


def _report(p: LocalityPreset, res: dict[str, Any]) -> str:
    lines = [f"# {p.name}: the locality protocol", "", p.description, "",
             f"{res['num_train_images']} training images; {len(p.t_idx)}-step DDIM at t_idx {list(p.t_idx)} on the linear-β "
             f"DDPM schedule; {p.seeds} samples from the same noise for every denoiser; ELS patch sizes "
             f"{res['els_scales']}.", "",
             "| denoiser | r² (mean) | r² (median) | MSE | s / step | peak memory (MiB) |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['denoiser']} | {r['r2_mean']:.3f} | {r['r2_median']:.3f} | {r['mse_mean']:.4f} | "
                     f"{r['step_s']:.3f} | {r['peak_bytes'] / 2**20:.1f} |")
    t = res["timings"]
    lines += ["", f"Wall time {t['total_s']:.0f} s (training {t['train_s']:.0f} s, calibration "
              f"{t['calibration_s']:.0f} s, sampling {t['sampling_s']:.0f} s) on {res['host']['backend']}.",
              "", res["notes"], "", "![samples](samples.png)", ""]
    return "\n".join(lines)


def _grid_figure(samples: dict[str, np.ndarray], path: Path, max_images: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = list(samples)
    n = min(max_images, next(iter(samples.values())).shape[0])
    fig, axes = plt.subplots(len(names), n, figsize=(1.2 * n + 2.5, 1.2 * len(names)), squeeze=False)
    for i, name in enumerate(names):
        for j in range(n):
            img = np.clip((np.asarray(samples[name][j]) + 1) / 2, 0, 1)
            ax = axes[i, j]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    _io.save_figure(path, fig, dpi=100)
