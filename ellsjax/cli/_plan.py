"""``ellsjax plan``: a capacity plan for a machine step on a target, compiled here without data or
device (:func:`ellsjax.plan.plan`)."""

from __future__ import annotations

import argparse
import json

from ellsjax.cli._common import HelpFormatter
from ellsjax.cli._common import fail as _fail

__all__ = ["register", "format_table"]

_DATASETS = {"cifar10": (50_000, 32, 32, 3), "mnist": (60_000, 28, 28, 1), "imagenet64": (1_281_167, 64, 64, 3)}


def register(sub) -> None:
    """Add the ``plan`` subcommand to an ``argparse`` subparsers object."""
    s = sub.add_parser(
        "plan",
        help="predict memory and time of a machine step on a CPU, an H100 or a TPU (compiled here, no device)",
        description=(
            "Compile one exact denoising step of a machine for a target without data (jax.ShapeDtypeStruct images) "
            "and without the device (compile-only H100 and TPU devices; TPU targets need "
            "pip install 'ellsjax[accelerators]'), and report per device: arguments and temporaries, loop-aware "
            "GEMM FLOPs, exponentials and GEMM bytes, a roofline time from the target's published peak rates and "
            "which bound binds, the largest training set that fits, and what a bfloat16 top-k screen would take. "
            "A prediction: nothing runs on the device."
        ),
        formatter_class=HelpFormatter,
    )
    s.add_argument("--machine", default="els", help="registered machine name")
    s.add_argument("--scales", default="5", help="comma-separated scales (patch sizes)")
    s.add_argument("--dataset", default="cifar10", help=f"one of {', '.join(_DATASETS)}, or N,H,W,C")
    s.add_argument("--batch", type=int, default=16, help="images per step")
    s.add_argument("--target", default="h100", help="cpu, h100, v5e, v4, v5p")
    s.add_argument("--devices", type=int, default=1,
                   help="devices per step; above 1 the prebuilt banks are split over them (sharded)")
    s.add_argument("--memory-budget", type=int, default=None, help="bytes of temporaries per chunk")
    s.add_argument("--json", default=None, help="also write the rows to this JSON file")
    s.set_defaults(func=_cmd_plan)


def _shape(text: str) -> tuple[int, int, int, int]:
    if text in _DATASETS:
        return _DATASETS[text]
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        _fail(f"--dataset: expected one of {', '.join(_DATASETS)} or N,H,W,C, got {text!r}")
    return shape


def format_table(rows: list[dict]) -> str:
    """A Markdown table of plan rows."""
    head = ("| machine | k | N | B | target × devices | args / temps (GB) | TFLOP | exp (1e9) | roofline | bound "
            "| bf16 screen | largest N |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        mem = "does not fit" if not r["fits"] and r["argument_bytes"] != r["argument_bytes"] else \
            f"{r['argument_bytes'] / 1e9:.2f} / {r['temp_bytes'] / 1e9:.2f}"
        low = "—" if r["low_precision_s"] is None else f"{r['low_precision_s']:.3g} s"
        lines.append(
            f"| {r['machine']} | {r['scale']} | {r['images'][0]:,} | {r['batch']} | {r['target']} × {r['devices']}"
            f"{' (sharded)' if r['sharded'] else ''} | {mem}{'' if r['fits'] else ' (exceeds memory)'} | "
            f"{r['flops'] / 1e12:.3g} | {r['exps'] / 1e9:.3g} | {r['roofline_s']:.3g} s | {r['bound']} | {low} | "
            f"{r['max_images']:,} |")
    return "\n".join(lines)


def _cmd_plan(args: argparse.Namespace) -> int:
    from ellsjax import plan as _plan

    shape = _shape(args.dataset)
    try:
        scales = [int(v) for v in args.scales.split(",")]
    except ValueError:
        _fail(f"--scales: expected comma-separated ints, got {args.scales!r}")
    rows = []
    for k in scales:
        try:
            p = _plan.plan(args.machine, scale=k, images=shape, batch=args.batch, target=args.target,
                           devices=args.devices, memory_budget=args.memory_budget)
        except (ValueError, TypeError, ImportError, RuntimeError) as e:
            _fail(f"plan: {e}")
        rows.append(p.row())
    print(format_table(rows))
    print(f"\nPrediction from published peak rates ({_plan.TARGETS[args.target].sources}); nothing ran on the device.")
    if args.json:
        from ellsjax._io import write_text

        write_text(args.json, json.dumps(rows, indent=2, default=str))
    return 0
