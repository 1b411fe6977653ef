"""``ellsjax sample``: the main job. Draws samples from an analytic machine on a dataset and writes
a PNG grid, an ``.npz`` of the samples and a ``config.json``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ellsjax.cli._common import fail as _fail

__all__ = ["register", "DEFAULT_PRESETS"]

# The published scale schedule matching a dataset and a padding (zeros pairs with bbELS networks).
DEFAULT_PRESETS = {
    ("mnist", "zeros"): "MNIST_ResNet_zeros",
    ("mnist", "circular"): "MNIST_ResNet_circular",
    ("fashion_mnist", "zeros"): "FashionMNIST_ResNet_zeros_conditional",
    ("cifar10", "zeros"): "CIFAR10_ResNet_zeros_conditional",
    ("cifar10", "circular"): "CIFAR10_ResNet_circular_conditional",
    ("celeb_a", "zeros"): "CelebA_ResNet_zeros",
}


def register(sub) -> None:
    """Add the ``sample`` subcommand to an ``argparse`` subparsers object."""
    s = sub.add_parser(
        "sample",
        help="sample from an analytic machine (default: bbELS on bundled MNIST, the paper's MNIST schedule)",
        description=(
            "Sample with deterministic DDIM from an analytic machine built on a training set. Defaults: "
            "the boundary-broken ELS machine on the first 256 bundled MNIST training images resized to 32x32, "
            "the paper's 20-point time grid and its published MNIST ResNet (zero padding) scale schedule. "
            "Writes OUT/samples.png, OUT/samples.npz and OUT/config.json."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    s.add_argument("--machine", default="bbels",
                   help="a machine of ellsjax.machines.MACHINES: bbels = ELS with zero padding; els = ELS with "
                        "circular padding; ls = local score; is = ideal score; soft-els, soft-bbels = soft-window ELS "
                        "(--scales: a schedule from the differentiable calibration, or widths ℓ)")
    s.add_argument("--padding", choices=("zeros", "circular"), default=None,
                   help="padding of the ELS machine: --machine els --padding zeros is bbels")
    s.add_argument("--machine-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra keyword for the machine's builder (VALUE parsed as JSON if possible); repeatable")
    s.add_argument("--dataset", default="mnist", help="mnist, fashion_mnist, cifar10 or celeb_a")
    s.add_argument("--source", default="bundled", choices=("bundled", "npz", "idx", "tfds", "auto"),
                   help="where the training images come from (see ellsjax.data.load)")
    s.add_argument("--path", default=None, help="file or directory for --source npz/idx")
    s.add_argument("--data-dir", default=None, help="tensorflow-datasets data_dir for --source tfds")
    s.add_argument("--split", default="train")
    s.add_argument("--n-train", type=int, default=256, help="number of training images (the first ones)")
    s.add_argument("--image-size", type=int, default=None,
                   help="resize training images to SxS (default: 32 for mnist/fashion_mnist as in the paper, native otherwise)")
    s.add_argument("--class", dest="label", type=int, default=None,
                   help="sample class-conditionally: the bank holds only training images of this class")
    s.add_argument("--num-samples", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--scales", default=None,
                   help="a preset name, a JSON schedule file, comma-separated ints (one per step) or one int; "
                        "default: the published preset for the dataset and padding")
    s.add_argument("--steps", type=int, default=20, help="grid size when --scales carries no times")
    s.add_argument("--schedule", default="cosine_legacy", help="noise schedule: cosine_legacy, cosine, linear, exponential")
    s.add_argument("--out", default="samples", help="output directory")
    s.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    s.add_argument("--model", default=None, metavar="DIR",
                   help="sample from the trained network in DIR (`ellsjax train --out DIR`) instead of a machine, "
                        "with the same noise, time grid (--steps, or the times of --scales) and outputs; the "
                        "machine and data options are ignored")
    s.set_defaults(func=_cmd_sample)




def _cmd_sample(args: argparse.Namespace) -> int:
    import jax

    import ellsjax as ej

    if args.model is not None:
        return _cmd_sample_model(args)

    if args.machine == "bbels" and args.padding == "circular":
        _fail("--machine bbels is ELS with zero padding; use --machine els for plain (circular) ELS")
    name = "bbels" if (args.machine == "els" and args.padding == "zeros") else args.machine
    if name not in ej.machines.MACHINES:
        _fail(f"--machine: unknown machine {args.machine!r}; known: {', '.join(sorted(ej.machines.MACHINES))}")
    padding = "circular" if name in ("els", "soft-els") else "zeros"  # the network padding whose scale preset applies
    options = dict(_parse_option(o) for o in args.machine_option)
    image_size = args.image_size
    if image_size is None and args.dataset in ("mnist", "fashion_mnist"):
        image_size = 32
    for opt in ("n_train", "num_samples", "steps"):
        if getattr(args, opt) <= 0:
            _fail(f"--{opt.replace('_', '-')} must be positive, got {getattr(args, opt)}")

    t0 = time.perf_counter()
    try:
        images, labels = ej.data.load(
            args.dataset, split=args.split, source=args.source, path=args.path, data_dir=args.data_dir,
            image_size=image_size, limit=args.n_train,
        )
        conditional = args.label is not None
        soft = name.startswith("soft-")
        if soft:
            # a soft-window machine's per-step scale is a float width ℓ; its schedule file also names the
            # window (support, shape, padding) it was learned with, which the builder takes unless overridden
            if args.scales is None:
                _fail(f"--scales: --machine {name} needs a soft-window schedule (a JSON with 'ells' from the "
                      "differentiable calibration) or widths ℓ (one float, or comma-separated floats, one per step)")
            spec = args.scales
            ts, scales, info = _soft_schedule(spec, nsteps=args.steps)
            want = "circular" if name == "soft-els" else "zeros"
            if info.get("padding", want) != want:
                _fail(f"--scales: the schedule was learned for padding {info['padding']!r}; use --machine "
                      f"{'soft-els' if info['padding'] == 'circular' else 'soft-bbels'}")
            for key in ("support", "window", "edge"):
                if key in info:
                    options.setdefault(key, info[key])
        machine = ej.machines.build(name, images, labels if conditional else None, schedule=args.schedule, **options)
        if soft:
            pass  # ts, scales from the soft schedule above
        elif not machine.needs_scale:
            ts, scales = ej.schedules.paper_times(args.steps), None
            spec = None
        else:
            spec = args.scales
            if spec is None and name == "pspc":
                # PSPC's published schedule: 18 steps on the EDM grid for 32x32 CIFAR-10; DDIM over the
                # same noise levels is Euler's method for that ODE
                if args.dataset != "cifar10" or machine.image_shape[:2] != (32, 32):
                    _fail("PSPC's published scale schedule is for 32x32 CIFAR-10 only; pass --scales")
                spec = "PSPC_CIFAR10 (Niedoba et al. 2025, EDM grid of 18 steps)"
                ts = ej.edm.karras_times(len(ej.machines.PSPC_CIFAR10_SCALES), machine.schedule)
                scales = ej.machines.PSPC_CIFAR10_SCALES
            else:
                if spec is None:
                    spec = DEFAULT_PRESETS.get((args.dataset, padding))
                    if spec is None:
                        _fail(f"no published scale schedule for {args.dataset} with {padding} padding; pass --scales")
                ts, scales = ej.schedules.resolve_scales(spec, nsteps=args.steps)
        x_start = jax.random.normal(jax.random.key(args.seed), (args.num_samples, *machine.image_shape))
        if scales is not None and name == "els":
            # ELS needs k <= image size; a preset made for larger images cannot run here
            too_big = [k for k in scales if k > min(machine.image_shape[:2])]
            if too_big:
                _fail(f"scales {sorted(set(too_big))} exceed the {machine.image_shape[0]}px images (ELS needs k <= size)")
        t_load = time.perf_counter() - t0
        samples = ej.samplers.ddim(
            machine, x_start, ts, scales=scales, label=args.label, progress=not args.no_progress
        )
        samples = np.asarray(samples)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        _fail(str(e))
    elapsed = time.perf_counter() - t0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ej.plotting.save_png(out / "samples.png", ej.plotting.image_grid(samples), scale=4)
    config = {
        "machine": name, "machine_options": options, "padding": padding, "dataset": args.dataset, "source": args.source,
        "path": args.path, "data_dir": args.data_dir, "image_size": image_size, "schedule_name": args.schedule,
        "split": args.split, "n_train": int(images.shape[0]), "image_shape": list(machine.image_shape),
        "label": args.label, "num_samples": args.num_samples, "seed": args.seed,
        "scales_spec": spec, "scales": None if scales is None else list(scales), "ts": [float(t) for t in ts],
        "schedule": machine.schedule.describe(), "seconds_total": round(elapsed, 2),
        "seconds_data": round(t_load, 2), "backend": jax.default_backend(),
    }
    np.savez_compressed(
        out / "samples.npz", samples=samples, x_start=np.asarray(x_start), ts=np.asarray(ts),
        scales=np.asarray(scales if scales is not None else [], np.float32 if soft else np.int32),
    )
    (out / "config.json").write_text(json.dumps(config, indent=1))
    print(f"{args.num_samples} samples from {name} on {images.shape[0]} {args.dataset} "
          f"images in {elapsed:.1f}s -> {out / 'samples.png'}, {out / 'samples.npz'}")
    return 0


def _soft_schedule(spec: str, *, nsteps: int):
    """``(ts, ells, info)`` for a soft machine: a soft schedule file, or floats on ``paper_times(nsteps)``."""
    import ellsjax as ej
    from ellsjax import calibration

    if spec.endswith(".json") or Path(spec).is_file():
        ts, ells, info = calibration.load_schedule(spec, nsteps=nsteps)
        if not info:
            _fail(f"--scales: {spec} holds integer patch sizes; soft machines need a soft-window schedule "
                  "(a JSON with 'ells', written by the differentiable calibration)")
        return ts, ells, info
    try:
        ells = [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        _fail(f"--scales: {spec!r} is neither a soft-window schedule file nor comma-separated widths ℓ")
    if not ells or any(not np.isfinite(e) or e <= 0 for e in ells):
        _fail(f"--scales: widths ℓ must be positive and finite, got {spec!r}")
    if len(ells) == 1:
        ells = ells * (nsteps - 1)
    if len(ells) != nsteps - 1:
        _fail(f"--scales: expected {nsteps - 1} widths for a {nsteps}-point grid (--steps), got {len(ells)}")
    return ej.schedules.paper_times(nsteps), tuple(ells), {}


def _cmd_sample_model(args: argparse.Namespace) -> int:
    """``--model DIR``: DDIM from a trained network, written like the machines' samples."""
    import jax

    import ellsjax as ej

    for opt in ("num_samples", "steps"):
        if getattr(args, opt) <= 0:
            _fail(f"--{opt.replace('_', '-')} must be positive, got {getattr(args, opt)}")
    t0 = time.perf_counter()
    try:
        model = ej.models.load(args.model)
        if model.conditional and args.label is None:
            _fail(f"--class: the network in {args.model} is class-conditional; pass --class K (0 <= K < {model.num_classes})")
        ts = (ej.schedules.resolve_scales(args.scales, nsteps=args.steps)[0] if args.scales is not None
              else ej.schedules.paper_times(args.steps))
        x_start = jax.random.normal(jax.random.key(args.seed), (args.num_samples, *model.image_shape))
        samples = np.asarray(ej.samplers.ddim(model, x_start, ts, label=args.label, progress=not args.no_progress))
    except (ValueError, TypeError, FileNotFoundError) as e:
        _fail(str(e))
    elapsed = time.perf_counter() - t0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
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
