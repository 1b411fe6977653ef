"""``ellsjax evaluate``: compare a trained network with a machine (and the ideal score) sample by
sample, from the same noise over the same DDIM times; writes results.json and PNG figures."""

from __future__ import annotations

import argparse
import json

from ellsjax.cli._common import (
    HelpFormatter,
    add_overwrite,
    claim_outputs,
    load_network_run,
    machine_spec,
    output_dir,
    read_schedule,
    stage,
)
from ellsjax.cli._common import fail as _fail

__all__ = ["register"]

_OUTPUTS = ["results.json", "scatter.png", "grid.png"]


def register(sub) -> None:
    """Add the ``evaluate`` subcommand to an ``argparse`` subparsers object."""
    s = sub.add_parser(
        "evaluate",
        help="compare a trained network with a machine and the ideal score (Pearson r, R², MSE per seed)",
        description=(
            "Sample a trained network (--model, a run directory of `ellsjax train`), a machine built on the "
            "network's own training images and the ideal-score (IS) baseline from the same noise with DDIM over "
            "the schedule's times, and compare the final samples per seed: Pearson r of the centered, normalised "
            "samples (what the paper calls r^2), the coefficient of determination R^2 and the MSE. Writes "
            "OUT/results.json (medians, means, fraction of seeds beating IS, per-seed values), OUT/scatter.png "
            "(IS r vs machine r per seed) and OUT/grid.png (rows: network | machine | IS), each atomically; an "
            "OUT that holds another evaluation is refused unless --overwrite. Prints a line per stage on stderr."
        ),
        formatter_class=HelpFormatter,
    )
    s.add_argument("--model", required=True, help="trained network run directory")
    s.add_argument("--machine", default="bbels",
                   help="a registered machine to compare (`ellsjax machines` lists them; soft-window machines need a "
                        "schedule of widths from the differentiable calibration; machines without a scale use only "
                        "the schedule's times)")
    s.add_argument("--scales", default=None, metavar="FILE|PRESET",
                   help="per-step scales: a JSON schedule (calibration output) or a published preset name; "
                        "required for machines with a scale (for the others only its times are used; default: "
                        "the paper's 20-point grid)")
    s.add_argument("--n", type=int, default=100, help="number of seeds (samples)")
    s.add_argument("--seed", type=int, default=0, help="noise seed")
    s.add_argument("--support", type=int, default=None,
                   help="soft machines: window support K (default: the schedule file's)")
    s.add_argument("--raw-weights", action="store_true", help="use the trained weights, not their EMA")
    s.add_argument("--out", default=None,
                   help="output directory (default: evaluation/MACHINE, so evaluations of different machines do not "
                        "replace each other)")
    add_overwrite(s)
    s.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from ellsjax import evaluation, machines, schedules

    if args.n < 2:
        _fail(f"--n: need at least 2 seeds, got {args.n}")
    spec = machine_spec(args.machine)
    schedule = None if args.scales is None else read_schedule(args.scales, spec, nsteps=20)
    if spec.scale_kind != "none" and schedule is None:
        _fail(f"--scales: --machine {spec.name} needs a scale schedule (a JSON file or a preset name)")
    network, images, labels = load_network_run(args.model, ema=not args.raw_weights)
    out = output_dir(args.out if args.out is not None else f"evaluation/{spec.name}")
    claim_outputs(out, _OUTPUTS, overwrite=args.overwrite)
    ts = schedules.paper_times(20) if schedule is None else schedule.times()
    scales = None if spec.scale_kind == "none" or schedule is None else schedule.values
    opts = {"schedule": network.schedule, **({} if schedule is None else schedule.options)}
    if args.support is not None:
        opts["support"] = args.support
    cond_labels = labels if network.conditional else None
    try:
        machine = spec.build(images, cond_labels, **opts)
        x = jax.random.normal(jax.random.key(args.seed), (args.n, *network.image_shape))
        label = evaluation.seed_labels(network, args.n)
        baseline = machines.ideal(images, cond_labels, schedule=network.schedule)
        nsteps = len(np.ravel(ts)) - 1
        stage(f"evaluate: sampling the network in {args.model} ({args.n} seeds, {nsteps} steps)")
        net_samples = _finite(evaluation.sample(network, x, ts, label=label), f"the network in {args.model}")
        stage("evaluate: sampling the ideal-score baseline (is)")
        base_samples = _finite(evaluation.sample(baseline, x, ts, label=label), "the ideal-score baseline")
        stage(f"evaluate: sampling --machine {spec.name}")
        ev = evaluation.evaluate(network, machine, x, ts, scales=scales, label=label, baseline=baseline,
                                 network_samples=net_samples, baseline_samples=base_samples)
        _finite(ev.machine, f"--machine {spec.name}")
    except (ValueError, TypeError) as e:
        _fail(str(e))
    stage(f"evaluate: writing {out}")
    res = evaluation.save_results(
        out / "results.json", ev, model=str(args.model), machine=spec.name, scales_spec=args.scales,
        ts=[float(t) for t in np.asarray(ts)], scales=None if scales is None else list(scales), n=args.n,
        seed=args.seed, num_train_images=int(images.shape[0]),
    )
    evaluation.save_figures(ev, out, name=spec.name)
    sm = res["summary"]
    print(json.dumps({"machine_median_pearson_r": sm["machine"]["pearson_r"]["median"],
                      "is_median_pearson_r": sm["baseline"]["pearson_r"]["median"],
                      "frac_beats_is": sm["frac_beats_baseline"]}))
    print(f"wrote {out / 'results.json'}, {out / 'scatter.png'}, {out / 'grid.png'}")
    return 0


def _finite(samples, what: str):
    """The samples, or a one-line error when some are NaN or inf (a diverged network, a broken machine)."""
    import numpy as np

    arr = np.asarray(samples)
    bad = ~np.all(np.isfinite(arr.reshape(arr.shape[0], -1)), axis=1)
    if bad.any():
        _fail(f"the samples of {what} contain NaN or inf ({int(bad.sum())} of {arr.shape[0]} seeds); nothing was "
              "written")
    return arr
