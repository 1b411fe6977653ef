"""``ellsjax calibrate``: a machine's per-step scale schedule, calibrated on a trained network's DDIM
trajectories (grid search for patch-size machines, gradient descent for soft-window ones)."""

from __future__ import annotations

import argparse
import json

from ellsjax.cli._common import HelpFormatter, load_network_run, machine_spec, output_file
from ellsjax.cli._common import fail as _fail

__all__ = ["register"]


def register(sub) -> None:
    """Add the ``calibrate`` subcommand to an ``argparse`` subparsers object."""
    s = sub.add_parser(
        "calibrate",
        help="calibrate a machine's locality schedule against a trained network (writes a JSON schedule)",
        description=(
            "Run the trained network (--model, a run directory of `ellsjax train`) from --n noise draws with DDIM "
            "over t = i/STEPS, i = STEPS … 0, and calibrate a machine built on the network's own training images "
            "on those trajectories. Machines with an integer scale (els, bbels, ls, pspc): the paper's grid search, "
            "at each step the candidate whose score is most similar to the network's (cosine, or --metric l2), "
            "then the per-step median over seeds. Soft-window machines (soft-els, soft-bbels; width scale): minimise the "
            "normalised x̂0 distance to the network through the streaming kernel, with gradients: a line search on "
            "log ℓ per step (default), or Adam on log ℓ per step or on a quadratic log ℓ(t). Writes OUT, a schedule that `sample --scales`, `evaluate --scales` and "
            "ellsjax.scales.ScaleSchedule.load read."
        ),
        formatter_class=HelpFormatter,
    )
    s.add_argument("--model", required=True, help="trained network run directory")
    s.add_argument("--machine", default="bbels",
                   help="the machine to calibrate: any registered machine with a calibration method "
                        "(`ellsjax machines`: grid for integer scales, differentiable for widths ℓ)")
    s.add_argument("--n", type=int, default=16, help="number of network trajectories (noise seeds)")
    s.add_argument("--seed", type=int, default=10_000, help="noise seed of the trajectories")
    s.add_argument("--steps", type=int, default=20, help="DDIM steps")
    s.add_argument("--candidates", default="1,3,5,7,9,11,13,15", help="grid: comma-separated candidate scales")
    s.add_argument("--metric", default="cosine", choices=("cosine", "l2"), help="grid: score comparison")
    s.add_argument("--support", type=int, default=11, help="soft: the largest window side K (odd)")
    s.add_argument("--window", default="box", choices=("gaussian", "box"), help="soft: window shape")
    s.add_argument("--init", default="2.0",
                   help="soft: starting width ℓ at every step, or a patch-size schedule JSON (e.g. the grid "
                        "calibration of the hard twin, `calibrate --machine els`): ℓ from each step's size")
    s.add_argument("--optimizer", default="auto", choices=("auto", "line_search", "adam"),
                   help="soft: auto = the line search per step, Adam for --curve quadratic")
    s.add_argument("--iterations", type=int, default=None,
                   help="soft: evaluations per step (line search; default 6) or Adam steps (default 40)")
    s.add_argument("--lr", type=float, default=0.1, help="soft: Adam learning rate on log ℓ")
    s.add_argument("--batch", type=int, default=8, help="soft: seeds per evaluation (line search) or Adam step")
    s.add_argument("--curve", default="per_step", choices=("per_step", "quadratic"), help="soft: ℓ per step or ℓ(t)")
    s.add_argument("--batch-size", type=int, default=16, help="images per machine call")
    s.add_argument("--raw-weights", action="store_true", help="use the trained weights, not their EMA")
    s.add_argument("--out", default="scales.json", help="output JSON schedule")
    s.set_defaults(func=_cmd_calibrate)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    import jax

    from ellsjax import calibration, evaluation

    for opt in ("n", "steps", "iterations", "batch", "batch_size"):
        if getattr(args, opt) is not None and getattr(args, opt) <= 0:
            _fail(f"--{opt.replace('_', '-')} must be positive, got {getattr(args, opt)}")
    init = _parse_init(args.init, args.window, args.steps)
    spec = machine_spec(args.machine)
    if spec.calibration is None:
        from ellsjax import machines

        able = [s.name for s in machines.specs() if s.calibration is not None]
        _fail(f"--machine: {spec.name} has no scale to calibrate; calibratable: {', '.join(able)}")
    soft = spec.calibration == "differentiable"
    if not soft:
        try:
            candidates = tuple(int(v) for v in args.candidates.split(",") if v.strip())
        except ValueError:
            _fail(f"--candidates: expected comma-separated ints, got {args.candidates!r}")
        if not candidates:
            _fail("--candidates: empty")
    network, images, labels = load_network_run(args.model, ema=not args.raw_weights)
    out = output_file(args.out)
    opts = {"schedule": network.schedule}
    if soft:
        opts.update(support=args.support, window=args.window)
    cond_labels = labels if network.conditional else None
    label = evaluation.seed_labels(network, args.n)
    try:
        machine = spec.build(images, cond_labels, **opts)
        ts = calibration.calibration_times(args.steps)
        x = jax.random.normal(jax.random.key(args.seed), (args.n, *network.image_shape))
        traj = calibration.network_trajectory(network, x, ts, label=label)
        meta = {"machine": spec.name, "model": str(args.model), "n": args.n, "seed": args.seed}
        if soft:
            res = calibration.differentiable_calibrate(
                network, machine, None, ts, init=init, iterations=args.iterations, learning_rate=args.lr,
                batch=min(args.batch, args.n), curve=args.curve, optimizer=args.optimizer, label=label,
                trajectory=traj,
            )
            summary = {"ells": [round(float(v), 4) for v in res.ells], "loss": [float(res.losses[0]),
                                                                                 float(res.losses[-1])]}
        else:
            res = calibration.grid_calibrate(network, machine, None, ts, candidates=candidates, metric=args.metric,
                                             label=label, trajectory=traj, batch_size=args.batch_size)
            summary = {"scales": list(res.scales)}
        res.save(out, **meta)
    except (ValueError, TypeError) as e:
        _fail(str(e))
    print(json.dumps(summary))
    print(f"wrote {out}")
    return 0


def _parse_init(value: str, window: str, steps: int):
    """``--init``: a positive width, or a patch-size schedule file with ``steps`` steps."""
    import os

    import numpy as np

    from ellsjax import calibration
    from ellsjax.scales import ScaleSchedule

    try:
        width = float(value)
    except ValueError:
        width = None
    if width is not None:
        if not (width > 0 and np.isfinite(width)):
            _fail(f"--init must be a positive width or a schedule file, got {value}")
        return width
    if not os.path.isfile(value):
        _fail(f"--init: {value} is neither a number nor a schedule file")
    try:
        schedule = ScaleSchedule.load(value, nsteps=steps, kind="size")
    except (ValueError, OSError) as e:
        _fail(f"--init: cannot read {value}: {e}")
    if schedule.kind != "size":
        _fail(f"--init: {value} is a width schedule; give a patch-size schedule (or pass its widths as --init)")
    sizes = schedule.values
    if len(sizes) != steps:
        _fail(f"--init: {value} has {len(sizes)} steps, --steps is {steps}")
    return calibration.widths_from_sizes(sizes, window)
