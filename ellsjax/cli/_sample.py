"""``ellsjax sample``: the main job. Draws samples from an analytic machine (or a trained network) on
a dataset and writes a PNG grid, an ``.npz`` of the samples and a ``config.json``.

Machines, their scale kinds and default schedules come from the registry (:mod:`ellsjax.machines`);
this module compares no machine names."""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from ellsjax.cli._common import (
    HelpFormatter,
    add_overwrite,
    claim_outputs,
    cli_message,
    free_memory,
    machine_spec,
    note,
    output_dir,
    read_schedule,
)
from ellsjax.cli._common import fail as _fail

__all__ = ["register"]

_DEFAULT_STEPS = 20
_OUTPUTS = ["samples.npz", "samples.png", "config.json"]
_GRID_MAX = 256  # samples drawn in samples.png (all of them go to samples.npz)
# library argument names -> this command's flags, for the messages passed through
_FLAGS = {"label": "--class", "limit": "--n-train", "image_size": "--image-size", "split": "--split",
          "path": "--path", "source": "--source", "classes": "--class", "scales": "--scales", "scale": "--scales",
          "x_start": "--num-samples", "name": "--dataset"}


def register(sub) -> None:
    """Add the ``sample`` subcommand to an ``argparse`` subparsers object."""
    s = sub.add_parser(
        "sample",
        help="sample from an analytic machine (default: bbELS on bundled MNIST, the paper's MNIST schedule)",
        description=(
            "Sample with deterministic DDIM from an analytic machine built on a training set. Defaults: "
            "the boundary-broken ELS machine on the first 256 bundled MNIST training images resized to 32x32, "
            "the paper's 20-point time grid and its published MNIST ResNet (zero padding) scale schedule. "
            "Writes OUT/samples.png (the first 256 samples), OUT/samples.npz and OUT/config.json, each atomically "
            "(a crash or a full disk leaves no partial file); OUT is checked before sampling, and one that holds "
            "another run's samples, or that another run is writing, is refused (--overwrite replaces them). "
            "Memory: samples are drawn --batch-size at a time, so the sampler's memory does not grow with "
            "--num-samples; the noise and the samples of the whole run are kept in host memory (12 bytes per "
            "pixel of each sample) and a run whose arrays would not fit in the available memory is refused up "
            "front with the size it needs."
        ),
        formatter_class=HelpFormatter,
    )
    s.add_argument("--machine", default="bbels",
                   help="a registered machine (`ellsjax machines` lists them): bbels = ELS with zero padding; "
                        "els = ELS with circular padding; ls = local score; is = ideal score; soft-els, soft-bbels "
                        "= soft-window ELS (--scales: a schedule from the differentiable calibration, or widths ℓ)")
    s.add_argument("--padding", choices=("zeros", "circular"), default=None,
                   help="boundary rule: with a machine family's name picks its member (--machine els --padding "
                        "zeros is bbels)")
    s.add_argument("--machine-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra keyword for the machine's builder (VALUE parsed as JSON if possible); repeatable")
    s.add_argument("--dataset", default="mnist", help="mnist, fashion_mnist, cifar10 or celeb_a")
    s.add_argument("--source", default="bundled", choices=("bundled", "npz", "idx", "tfds", "auto"),
                   help="where the training images come from (see ellsjax.data.load)")
    s.add_argument("--path", default=None, help="file or directory for --source npz/idx")
    s.add_argument("--data-dir", default=None, help="tensorflow-datasets data_dir for --source tfds")
    s.add_argument("--split", default="train", help="dataset split the training images come from")
    s.add_argument("--n-train", type=int, default=256, help="number of training images (the first ones)")
    s.add_argument("--image-size", type=int, default=None,
                   help="resize training images to SxS (default: 32 for mnist/fashion_mnist as in the paper, native otherwise)")
    s.add_argument("--class", dest="label", type=int, default=None,
                   help="sample class-conditionally: the bank holds only training images of this class")
    s.add_argument("--num-samples", type=int, default=8, help="number of samples (one noise draw each)")
    s.add_argument("--batch-size", type=int, default=64,
                   help="samples per sampler call (bounds the sampler's memory; every sample depends only on its own "
                        "noise)")
    s.add_argument("--seed", type=int, default=0, help="seed of the starting noise")
    s.add_argument("--scales", default=None,
                   help="a preset name, a JSON schedule file, comma-separated scales (one per step) or one scale; "
                        "default: the machine's published schedule for the dataset")
    s.add_argument("--steps", type=int, default=None,
                   help=f"DDIM steps + 1 (grid points of the paper's grid; default {_DEFAULT_STEPS}); a schedule "
                        "with its own grid is mapped onto it")
    s.add_argument("--schedule", default="cosine_legacy", help="noise schedule: cosine_legacy, cosine, linear, exponential")
    s.add_argument("--out", default="samples", help="output directory")
    s.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_overwrite(s)
    s.add_argument("--model", default=None, metavar="DIR",
                   help="sample from the trained network in DIR (`ellsjax train --out DIR`) instead of a machine, "
                        "with the same noise, time grid (--steps, or the times of a --scales file or preset) and "
                        "outputs; the machine and data options are ignored")
    s.set_defaults(func=_cmd_sample)


def _check_counts(args) -> int:
    for opt in ("n_train", "num_samples", "steps", "batch_size"):
        v = getattr(args, opt)
        if v is not None and v <= 0:
            _fail(f"--{opt.replace('_', '-')} must be positive, got {v}")
    if args.steps is not None and args.steps < 2:
        _fail(f"--steps: the grid needs at least 2 points, got {args.steps}")
    return args.steps or _DEFAULT_STEPS


def _check_fits(num: int, shape) -> None:
    """Refuse a run whose host arrays cannot fit in the available memory: the starting noise (drawn
    once, then copied to the host) and the samples, 4 bytes per value each."""
    need = 3 * 4 * num * int(np.prod(shape))
    have = free_memory()
    if have is not None and need > 0.8 * have:
        _fail(f"--num-samples: {num} samples of {'x'.join(map(str, shape))} need {need / 2**30:.1f} GiB for the "
              f"noise and the samples alone; this machine has {have / 2**30:.1f} GiB available (ask for fewer and "
              "run it several times with different --seed)")


def _draw(denoiser, x_start, ts, *, scales, label, batch_size: int, progress: bool) -> np.ndarray:
    """DDIM samples of every starting noise, ``batch_size`` at a time (the last batch padded with
    its final row: one compile), written into one host array; the sampler never holds more than a
    batch. A bar over samples when there are several batches, else the sampler's bar over steps."""
    import ellsjax as ej

    n = x_start.shape[0]
    size = min(batch_size, n)
    if size == n:
        return np.asarray(ej.samplers.ddim(denoiser, x_start, ts, scales=scales, label=label, progress=progress))
    denoiser = denoiser.prepare(scales if scales is not None else (None,), conditional=label is not None)
    out = np.empty(x_start.shape, np.float32)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="sampling", unit="sample", dynamic_ncols=True)
    try:
        for start in range(0, n, size):
            idx = np.minimum(np.arange(start, start + size), n - 1)
            got = np.asarray(ej.samplers.ddim(denoiser, x_start[idx], ts, scales=scales, label=label))
            k = min(size, n - start)
            out[start:start + k] = got[:k]
            if bar is not None:
                bar.update(k)
    finally:
        if bar is not None:
            bar.close()
    return out


def _check_finite(samples: np.ndarray, what: str) -> None:
    bad = ~np.all(np.isfinite(samples.reshape(samples.shape[0], -1)), axis=1)
    if bad.any():
        _fail(f"the samples of {what} contain NaN or inf ({int(bad.sum())} of {samples.shape[0]}, e.g. sample "
              f"{int(np.flatnonzero(bad)[0])}); nothing was written")


def _write(out, samples, x_start, ts, scales_arr, config) -> None:
    """The three outputs, each atomically; config.json last, so that it marks a complete run."""
    import ellsjax as ej
    from ellsjax import _io

    _io.save_npz(out / "samples.npz", samples=samples, x_start=np.asarray(x_start), ts=np.asarray(ts),
                 scales=scales_arr)
    ej.plotting.save_png(out / "samples.png", ej.plotting.image_grid(samples[:_GRID_MAX]), scale=4)
    _io.write_json(out / "config.json", config)


def _grid_schedule(schedule, steps_given: int | None, nsteps: int, flag: str = "--scales"):
    """A schedule with its own grid, mapped onto ``paper_times(--steps)`` when ``--steps`` asks for
    another number of steps (said on stderr)."""
    import ellsjax as ej

    if steps_given is None or len(schedule.ts) == nsteps:
        return schedule
    mapped = schedule.on_grid(ej.schedules.paper_times(nsteps))
    note(f"{flag}: {schedule.source or 'the schedule'} has {schedule.nsteps} steps; mapped onto --steps {nsteps} "
         f"(the paper's grid): {list(mapped.values)}")
    return mapped


def _cmd_sample(args: argparse.Namespace) -> int:
    import jax

    import ellsjax as ej

    if args.model is not None:
        return _cmd_sample_model(args)
    nsteps = _check_counts(args)
    spec = machine_spec(args.machine, args.padding)
    options = dict(_parse_option(o) for o in args.machine_option)
    image_size = args.image_size
    if image_size is None and args.dataset in ("mnist", "fashion_mnist"):
        image_size = 32
    if spec.scale_kind == "none" and args.scales is not None:
        _fail(f"--scales: --machine {spec.name} takes no scale; drop --scales (--steps sets the grid)")
    schedule = None
    if args.scales is not None:
        schedule = _grid_schedule(read_schedule(args.scales, spec, nsteps=nsteps), args.steps, nsteps)
    out = output_dir(args.out)
    claim_outputs(out, _OUTPUTS, overwrite=args.overwrite)

    t0 = time.perf_counter()
    try:
        images, labels = ej.data.load(
            args.dataset, split=args.split, source=args.source, path=args.path, data_dir=args.data_dir,
            image_size=image_size, limit=args.n_train,
        )
        _check_fits(args.num_samples, images.shape[1:])
        if schedule is None and spec.scale_kind != "none":
            schedule = spec.scales_for(args.dataset, images.shape[1:], ej.schedules.get(args.schedule))
            schedule = _grid_schedule(schedule, args.steps, nsteps)
        if schedule is not None:
            for key, value in schedule.options.items():  # a width schedule names the window it was learned with
                options.setdefault(key, value)
        machine = spec.build(images, labels if args.label is not None else None, schedule=args.schedule, **options)
        if schedule is None:
            ts, scales = ej.schedules.paper_times(nsteps), None
        else:
            ts, scales = schedule.times(), ej.samplers.check_scales(schedule.values, machine, schedule.nsteps)
        x_start = np.asarray(jax.random.normal(jax.random.key(args.seed), (args.num_samples, *machine.image_shape)))
        t_load = time.perf_counter() - t0
        samples = _draw(machine, x_start, ts, scales=scales, label=args.label, batch_size=args.batch_size,
                        progress=not args.no_progress)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        _fail(cli_message(str(e), _FLAGS))
    elapsed = time.perf_counter() - t0
    _check_finite(samples, f"--machine {spec.name}")

    config = {
        "machine": spec.name, "machine_options": options, "padding": spec.padding, "dataset": args.dataset,
        "source": args.source, "path": args.path, "data_dir": args.data_dir, "image_size": image_size,
        "schedule_name": args.schedule, "split": args.split, "n_train": int(images.shape[0]),
        "image_shape": list(machine.image_shape), "label": args.label, "num_samples": args.num_samples,
        "seed": args.seed, "scales_spec": None if schedule is None else (schedule.source or args.scales),
        "scales": None if scales is None else list(scales), "ts": [float(t) for t in ts],
        "schedule": machine.schedule.describe(), "seconds_total": round(elapsed, 2),
        "seconds_data": round(t_load, 2), "backend": jax.default_backend(),
    }
    width = spec.scale_kind == "width"
    _write(out, samples, x_start, ts, np.asarray(scales if scales is not None else [], np.float32 if width else np.int32),
           config)
    print(f"{args.num_samples} samples from {spec.name} on {images.shape[0]} {args.dataset} "
          f"images in {elapsed:.1f}s -> {out / 'samples.png'}, {out / 'samples.npz'}")
    return 0


def _cmd_sample_model(args: argparse.Namespace) -> int:
    """``--model DIR``: DDIM from a trained network, written like the machines' samples."""
    import jax

    import ellsjax as ej
    from ellsjax.scales import ScaleSchedule

    nsteps = _check_counts(args)
    ts = ej.schedules.paper_times(nsteps)
    if args.scales is not None:
        try:
            schedule = ScaleSchedule.load(args.scales, nsteps=nsteps)
        except ValueError as e:
            _fail(f"--scales: {e}")
        if schedule.source == "values":
            _fail(f"--scales: a network takes no scales; with --model, --scales only supplies the time grid of a "
                  f"schedule file or preset (got {args.scales!r}); use --steps for the paper's grid")
        ts = _grid_schedule(schedule, args.steps, nsteps).times()
    out = output_dir(args.out)
    try:
        model = ej.models.load(args.model)
    except (ValueError, TypeError, FileNotFoundError) as e:
        _fail(cli_message(str(e), {"dir": "--model"}) if str(e).startswith("dir: ") else f"--model: {e}")
    if model.conditional and args.label is None:
        _fail(f"--class: the network in {args.model} is class-conditional; pass --class K (0 <= K < {model.num_classes})")
    if not model.conditional and args.label is not None:
        _fail(f"--class: the network in {args.model} is unconditional (trained without labels); drop --class")
    if model.conditional and not 0 <= args.label < model.num_classes:
        _fail(f"--class: the network in {args.model} knows classes 0 … {model.num_classes - 1}, got {args.label}")
    _check_fits(args.num_samples, model.image_shape)
    claim_outputs(out, _OUTPUTS, overwrite=args.overwrite)
    t0 = time.perf_counter()
    try:
        x_start = np.asarray(jax.random.normal(jax.random.key(args.seed), (args.num_samples, *model.image_shape)))
        samples = _draw(model, x_start, ts, scales=None, label=args.label, batch_size=args.batch_size,
                        progress=not args.no_progress)
    except (ValueError, TypeError, FileNotFoundError) as e:
        _fail(cli_message(str(e), _FLAGS))
    elapsed = time.perf_counter() - t0
    _check_finite(samples, f"the network in {args.model}")

    config = {
        "model": str(args.model), "weights": model.weights, "net": model.config.to_dict(),
        "image_shape": list(model.image_shape), "label": args.label, "num_samples": args.num_samples,
        "seed": args.seed, "scales": None, "ts": [float(t) for t in ts], "schedule": model.schedule.describe(),
        "seconds_total": round(elapsed, 2), "backend": jax.default_backend(),
    }
    _write(out, samples, x_start, ts, np.zeros(0, np.int32), config)
    print(f"{args.num_samples} samples from the network in {args.model} in {elapsed:.1f}s -> "
          f"{out / 'samples.png'}, {out / 'samples.npz'}")
    return 0


def _parse_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        _fail(f"--machine-option: expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value
