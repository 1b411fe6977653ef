"""The capacity-plan table: exact ELS at k = 5 and 11 on CIFAR-10, MNIST and ImageNet-1K 64×64, on one
H100 (streamed), a v5e-8 and a v5e-256 (prebuilt banks sharded over the chips), per
:func:`ellsjax.plan.plan`. Compiled on this CPU without data or device; a **prediction** from published
peak rates. Prints a Markdown table and writes JSON. Needs ``pip install '.[accelerators]'``::

    python scripts/capacity_plan.py --json capacity_plan.json
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

from ellsjax import plan as _plan  # noqa: E402
from ellsjax.cli._plan import format_table  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchmeta  # noqa: E402

DATASETS = {"cifar10": (50_000, 32, 32, 3), "mnist": (60_000, 28, 28, 1), "imagenet64": (1_281_167, 64, 64, 3)}
SETUPS = (("h100", 1), ("v5e", 8), ("v5e", 256))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--scales", default="5,11")
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--json", default=None)
    _benchmeta.add_record_flag(p)
    args = p.parse_args(argv)
    rows = []
    for name in args.datasets.split(","):
        for k in (int(v) for v in args.scales.split(",")):
            for target, devices in SETUPS:
                t0 = time.perf_counter()
                pl = _plan.plan("els", scale=k, images=DATASETS[name], batch=args.batch, target=target,
                                devices=devices)
                row = {**pl.row(), "dataset": name, "plan_seconds": round(time.perf_counter() - t0, 1)}
                rows.append(row)
                print(format_table([row]).splitlines()[-1], flush=True)
    print()
    print(format_table(rows))
    print("\nA prediction: " + "; ".join(f"{t}: {_plan.TARGETS[t].sources}" for t in ("h100", "v5e")))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"jax": jax.__version__, "date": time.strftime("%Y-%m-%d"), "meta": _benchmeta.meta(),
                       "batch": args.batch, "rows": rows}, f, indent=1, default=str)
    if args.record:
        lines = [ln for ln in format_table(rows).splitlines() if ln.startswith("|")]
        cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
        _benchmeta.record(
            "capacity_plan", title="Capacity plan (a prediction, not a measurement)",
            description="Exact ELS per dataset, patch size and accelerator setup, compiled on the host for the target "
                        "without data or device and costed from published peak rates (`scripts/capacity_plan.py`, "
                        "`ellsjax plan`).",
            columns=cells[0], rows=[r for r in cells[2:]],
            notes=f"Batch {args.batch}. " + "; ".join(f"{t}: {_plan.TARGETS[t].sources}" for t in ("h100", "v5e")))


if __name__ == "__main__":
    main()
