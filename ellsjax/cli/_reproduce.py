"""``ellsjax reproduce``: train → calibrate (grid and differentiable) → evaluate → report.md."""

from __future__ import annotations

import argparse
import pickle

from ellsjax.cli._common import HelpFormatter, claim_outputs, output_dir
from ellsjax.cli._common import fail as _fail

__all__ = ["register"]


def register(sub) -> None:
    """Add the ``reproduce`` subcommand to an ``argparse`` subparsers object."""
    s = sub.add_parser(
        "reproduce",
        help="train a network, calibrate ELS/bbELS against it, evaluate and write a report",
        description=(
            "Run one experiment end to end into --out: train the preset's network (OUT/net; resumed if present), "
            "grid-calibrate the matching machine (ELS for circular, bbELS for zero padding) and learn the soft-window "
            "schedule of its differentiable twin on network trajectories, evaluate both (and the published schedule) "
            "against the network and the ideal score on other seeds, and write OUT/results.json, OUT/report.md, "
            "OUT/figures/*.png and the schedules OUT/scales_grid.json, OUT/scales_soft_WINDOW.json. Presets: smoke "
            "(seconds), mnist-cpu, fashion-mnist-cpu, cifar10-cpu (CPU-sized; cifar10-cpu reads the CIFAR-10 npz from "
            "$ELLSJAX_DATA_DIR), paper-* (the paper's networks; GPU). Studies run several presets into OUT/<member> "
            "(a finished member with the same settings is reused) and compare them (ellsjax.studies): "
            "attention-cpu (a DDPM UNet with and without self-attention: the drop in r and per-pixel error maps), "
            "paper-cpu (mnist-cpu, fashion-mnist-cpu, cifar10-cpu and attention-cpu as the paper's table), and "
            "their smoke versions attention-smoke, paper-smoke. "
            "locality-* presets run the locality family's shared protocol instead (ellsjax.locality: linear-beta "
            "DDPM schedule, 10 DDIM steps, the papers' DDPM UNet; Optimal, Wiener, ELS, PCA, GoldDiff published and "
            "certified; r^2, MSE, time per step, peak memory): locality-smoke (seconds), locality-mnist-cpu, "
            "locality-cifar-cpu (CPU), locality-mnist, locality-cifar10 (GPU)."
        ),
        formatter_class=HelpFormatter,
    )
    s.add_argument("--preset", required=True,
                   help="experiment name (ellsjax.reproduce.PRESETS, ellsjax.studies.STUDIES or ellsjax.locality.PRESETS)")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--no-progress", action="store_true", help="hide the training progress bar")
    s.add_argument("--weights", default=None, metavar="FILE",
                   help="use the authors' released network (.pt; see `ellsjax convert`) instead of training: "
                        "Kamb & Ganguli's backbone for a paper-* preset, the locality repo's baseline UNet "
                        "(ckpt_epoch_200.pt) for locality-cifar10 / locality-mnist")
    s.set_defaults(func=_cmd_reproduce)


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from ellsjax import locality, reproduce, studies

    tables = ((reproduce, reproduce.PRESETS), (studies, studies.STUDIES), (locality, locality.PRESETS))
    runner = next((module for module, table in tables if args.preset in table), None)
    if runner is None:
        known = sorted([*reproduce.PRESETS, *studies.STUDIES, *locality.PRESETS])
        _fail(f"--preset: unknown experiment {args.preset!r}; known: {', '.join(known)}")
    if runner is studies and args.weights is not None:
        _fail(f"--weights: {args.preset} is a study of several networks; pass weights to one preset's run")
    claim_outputs(output_dir(args.out), [], overwrite=True)  # one process per output directory (it resumes)
    try:
        extra = {} if runner is studies else {"weights": args.weights}
        runner.run(args.preset, args.out, progress=not args.no_progress, **extra)
    except (ValueError, TypeError, FileNotFoundError, ImportError, pickle.UnpicklingError) as e:
        _fail(str(e))
    return 0
