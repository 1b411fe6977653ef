"""``ellsjax machines``: list the registered machines (name, scale kind, padding, calibration)."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def register(sub) -> None:
    """Add the ``machines`` subcommand to an ``argparse`` subparsers object."""
    s = sub.add_parser(
        "machines",
        help="list the registered analytic machines",
        description="List every machine of the registry (ellsjax.machines.specs()): its name for --machine, what "
                    "its per-step scale is, its padding, how it is calibrated, and what it computes.",
    )
    s.set_defaults(func=_cmd_machines)


def _cmd_machines(args: argparse.Namespace) -> int:
    from ellsjax import machines

    rows = [(s.name, s.scale_kind, s.padding or "-", s.calibration or "-", s.summary) for s in machines.specs()]
    head = ("machine", "scale", "padding", "calibration", "")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    for r in [head, *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
    return 0
