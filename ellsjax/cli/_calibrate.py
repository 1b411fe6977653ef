"""``ellsjax calibrate``: a machine's per-step scale schedule, calibrated on a trained network's DDIM
trajectories (grid search for patch-size machines, gradient descent for soft-window ones)."""

from __future__ import annotations

import argparse
import json

from ellsjax.cli._common import (
    HelpFormatter,
    add_overwrite,
    claim_outputs,
    load_network_run,
    machine_spec,
    note,
    output_file,
    stage,
)
from ellsjax.cli._common import fail as _fail

__all__ = ["register"]

_DEFAULT_CANDIDATES = (1, 3, 5, 7, 9, 11, 13, 15)
_DEFAULT_SUPPORT = 11


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
            "ellsjax.scales.ScaleSchedule.load read (atomically; an existing OUT is refused unless --overwrite). "
            "Prints a line per stage on stderr."
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
    s.add_argument("--candidates", default=None,
                   help="grid: comma-separated candidate scales (default: 1,3,5,7,9,11,13,15, those the machine "
                        "accepts at the network's image size)")
    s.add_argument("--metric", default="cosine", choices=("cosine", "l2"), help="grid: score comparison")
    s.add_argument("--support", type=int, default=None,
                   help="soft: the largest window side K (odd; default 11, or the largest the network's image size "
                        "allows)")
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
    add_overwrite(s)
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
    candidates = None
    if not soft and args.candidates is not None:
        try:
            candidates = tuple(int(v) for v in args.candidates.split(",") if v.strip())
        except ValueError:
            _fail(f"--candidates: expected comma-separated ints, got {args.candidates!r}")
        if not candidates:
            _fail("--candidates: empty")
    network, images, labels = load_network_run(args.model, ema=not args.raw_weights)
    out = output_file(args.out)
    claim_outputs(out.parent, [out.name], overwrite=args.overwrite,
                  lock_name=f".{out.name}.ellsjax.lock")
    cond_labels = labels if network.conditional else None
    label = evaluation.seed_labels(network, args.n)
    try:
        machine = _build(spec, images, cond_labels, network, args) if soft else spec.build(
            images, cond_labels, schedule=network.schedule)
        if not soft and candidates is None:
            candidates = _default_candidates(machine, network)
        ts = calibration.calibration_times(args.steps)
        x = jax.random.normal(jax.random.key(args.seed), (args.n, *network.image_shape))
        stage(f"calibrate: network trajectories ({args.n} seeds, {args.steps} steps)")
        traj = calibration.network_trajectory(network, x, ts, label=label)
        stage(f"calibrate: {'differentiable' if soft else 'grid'} calibration of {spec.name}"
              + ("" if soft else f" over candidates {', '.join(map(str, candidates))}"))
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
        from ellsjax import _io

        with _io.atomic_path(out) as tmp:
            res.save(tmp, **meta)
    except (ValueError, TypeError) as e:
        _fail(str(e))
    print(json.dumps(summary))
    print(f"wrote {out}")
    return 0


def _default_candidates(machine, network) -> tuple[int, ...]:
    """The default grid, less the sizes the machine refuses at the network's image size (said on stderr)."""
    ok = []
    for k in _DEFAULT_CANDIDATES:
        try:
            machine.check_scale(k)
        except (ValueError, TypeError):
            continue
        ok.append(k)
    if not ok:
        _fail(f"--candidates: none of the default sizes {list(_DEFAULT_CANDIDATES)} fits the "
              f"{'x'.join(map(str, network.image_shape[:2]))} images; pass --candidates")
    if len(ok) < len(_DEFAULT_CANDIDATES):
        note(f"--candidates: the default 1,3,…,15 clipped to {','.join(map(str, ok))} (the sizes this machine takes at "
             f"the network's {'x'.join(map(str, network.image_shape[:2]))} images)")
    return tuple(ok)


def _build(spec, images, cond_labels, network, args):
    """A soft-window machine; the default --support shrinks to the largest odd side the image allows."""
    opts = {"schedule": network.schedule, "window": args.window}
    if args.support is not None:
        return spec.build(images, cond_labels, support=args.support, **opts)
    for k in range(_DEFAULT_SUPPORT, 0, -2):
        try:
            machine = spec.build(images, cond_labels, support=k, **opts)
        except ValueError as e:
            if str(e).startswith("support:"):
                continue
            raise
        if k < _DEFAULT_SUPPORT:
            note(f"--support: the default {_DEFAULT_SUPPORT} clipped to {k}, the largest window side this machine "
                 f"takes at the network's {'x'.join(map(str, network.image_shape[:2]))} images")
        return machine
    _fail(f"--support: no window side fits the {'x'.join(map(str, network.image_shape[:2]))} images")


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
