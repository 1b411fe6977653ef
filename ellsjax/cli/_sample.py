"""``ellsjax sample``: the main job. Draws samples from an analytic machine (or a trained network) on
a dataset and writes a PNG grid, an ``.npz`` of the samples and a ``config.json``.

Machines, their scale kinds and default schedules come from the registry (:mod:`ellsjax.machines`);
this module compares no machine names."""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from ellsjax.cli._common import HelpFormatter, machine_spec, note, output_dir, read_schedule
from ellsjax.cli._common import fail as _fail

__all__ = ["register"]

_DEFAULT_STEPS = 20


def register(sub) -> None:
    """Add the ``sample`` subcommand to an ``argparse`` subparsers object."""
    s = sub.add_parser(
        "sample",
        help="sample from an analytic machine (default: bbELS on bundled MNIST, the paper's MNIST schedule)",
        description=(
            "Sample with deterministic DDIM from an analytic machine built on a training set. Defaults: "
            "the boundary-broken ELS machine on the first 256 bundled MNIST training images resized to 32x32, "
            "the paper's 20-point time grid and its published MNIST ResNet (zero padding) scale schedule. "
            "Writes OUT/samples.png, OUT/samples.npz and OUT/config.json (OUT is checked before sampling)."
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
    s.add_argument("--model", default=None, metavar="DIR",
                   help="sample from the trained network in DIR (`ellsjax train --out DIR`) instead of a machine, "
                        "with the same noise, time grid (--steps, or the times of a --scales file or preset) and "
                        "outputs; the machine and data options are ignored")
    s.set_defaults(func=_cmd_sample)


def _check_counts(args) -> int:
    for opt in ("n_train", "num_samples", "steps"):
        v = getattr(args, opt)
        if v is not None and v <= 0:
            _fail(f"--{opt.replace('_', '-')} must be positive, got {v}")
    if args.steps is not None and args.steps < 2:
        _fail(f"--steps: the grid needs at least 2 points, got {args.steps}")
    return args.steps or _DEFAULT_STEPS


def _check_fits(num: int, shape) -> None:
    """Refuse a batch whose samples alone (and their starting noise) cannot fit in memory."""
    need = 2 * 4 * num * int(np.prod(shape))
    try:
        import os

        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > total // 2:
        _fail(f"--num-samples: {num} samples of {'x'.join(map(str, shape))} need {need / 2**30:.1f} GiB for the "
              f"noise and the samples alone; this machine has {total / 2**30:.1f} GiB (ask for fewer and run it "
              "several times with different --seed)")


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
        x_start = jax.random.normal(jax.random.key(args.seed), (args.num_samples, *machine.image_shape))
        t_load = time.perf_counter() - t0
        samples = ej.samplers.ddim(
            machine, x_start, ts, scales=scales, label=args.label, progress=not args.no_progress
        )
        samples = np.asarray(samples)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        _fail(str(e))
    elapsed = time.perf_counter() - t0

    ej.plotting.save_png(out / "samples.png", ej.plotting.image_grid(samples), scale=4)
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
    np.savez_compressed(
        out / "samples.npz", samples=samples, x_start=np.asarray(x_start), ts=np.asarray(ts),
        scales=np.asarray(scales if scales is not None else [], np.float32 if width else np.int32),
    )
    (out / "config.json").write_text(json.dumps(config, indent=1))
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
    t0 = time.perf_counter()
    try:
        model = ej.models.load(args.model)
        if model.conditional and args.label is None:
            _fail(f"--class: the network in {args.model} is class-conditional; pass --class K (0 <= K < {model.num_classes})")
        _check_fits(args.num_samples, model.image_shape)
        x_start = jax.random.normal(jax.random.key(args.seed), (args.num_samples, *model.image_shape))
        samples = np.asarray(ej.samplers.ddim(model, x_start, ts, label=args.label, progress=not args.no_progress))
    except (ValueError, TypeError, FileNotFoundError) as e:
        _fail(str(e))
    elapsed = time.perf_counter() - t0

    ej.plotting.save_png(out / "samples.png", ej.plotting.image_grid(samples), scale=4)
    config = {
        "model": str(args.model), "weights": model.weights, "net": model.config.to_dict(),
        "image_shape": list(model.image_shape), "label": args.label, "num_samples": args.num_samples,
        "seed": args.seed, "scales": None, "ts": [float(t) for t in ts], "schedule": model.schedule.describe(),
        "seconds_total": round(elapsed, 2), "backend": jax.default_backend(),
    }
    np.savez_compressed(out / "samples.npz", samples=samples, x_start=np.asarray(x_start), ts=np.asarray(ts),
                        scales=np.zeros(0, np.int32))
    (out / "config.json").write_text(json.dumps(config, indent=1))
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
