#!/usr/bin/env python
"""Draw the README's figure from a reproduce run: network | ELS | IS samples from the same noise.

Reads the output directory of ``ellsjax reproduce --preset mnist-cpu --out RUN`` (``RUN/net``, the trained
network run; ``RUN/scales_grid.json``, the machine's grid-calibrated schedule and its machine name), draws
``--seeds`` starting noises from ``jax.random.key(--seed)`` and samples, over the schedule's DDIM grid, the
network, the calibrated machine and the ideal score from each, as ``ellsjax.reproduce`` does. Writes one
PNG, rows network | machine | IS, a column per seed (``ellsjax.plotting.image_grid``), and prints each
seed's correlation with the network (``pearson_r``, the paper's "r²")::

    python scripts/readme_figure.py runs/mnist-cpu --out docs/_static/readme.png
    python scripts/readme_figure.py /tmp/smoke --out /tmp/readme.png     # on `ellsjax reproduce --preset smoke`
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np

import ellsjax as ej

MAX_BYTES = 150_000  # the README's picture stays small


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="an `ellsjax reproduce` output directory (with net/ and scales_grid.json)")
    p.add_argument("--out", type=Path, default=Path("docs/_static/readme.png"))
    p.add_argument("--seeds", type=int, default=8, help="columns: starting noises")
    p.add_argument("--seed", type=int, default=0, help="the noises are jax.random.normal(jax.random.key(SEED), ...)")
    p.add_argument("--zoom", type=int, default=3, help="each pixel drawn as ZOOM×ZOOM pixels")
    args = p.parse_args(argv)
    net_dir, schedule_file = args.run / "net", args.run / "scales_grid.json"
    for path in (net_dir, schedule_file):
        if not path.exists():
            p.error(f"run: {path} does not exist (run `ellsjax reproduce --preset mnist-cpu --out {args.run}`)")
    if args.seeds < 1 or args.zoom < 1:
        p.error("--seeds and --zoom: must be positive")

    network = ej.models.load(net_dir)
    images, labels = ej.training.load_data(*ej.training.load_run_config(net_dir))
    conditional = network.conditional
    schedule = ej.scales.ScaleSchedule.load(schedule_file)
    name = json.loads(schedule_file.read_text()).get("machine", "els")
    machine = ej.machines.build(name, images, labels if conditional else None, schedule=network.schedule)
    ideal = ej.machines.ideal(images, labels if conditional else None, schedule=network.schedule)

    ts = schedule.times()
    x = jax.random.normal(jax.random.key(args.seed), (args.seeds, *network.image_shape))
    label = ej.evaluation.seed_labels(network, args.seeds)
    rows = [ej.evaluation.sample(network, x, ts, label=label),
            ej.evaluation.sample(machine, x, ts, scales=schedule.values, label=label),
            ej.evaluation.sample(ideal, x, ts, label=label)]
    picture = ej.plotting.image_grid(np.concatenate(rows), ncols=args.seeds)
    ej.plotting.save_png(args.out, picture, scale=args.zoom)
    size = args.out.stat().st_size
    r_machine, r_ideal = (ej.evaluation.pearson_r(r, rows[0]) for r in rows[1:])
    print(f"{args.out}: {picture.shape[1] * args.zoom}×{picture.shape[0] * args.zoom} px, {size / 1000:.0f} kB; rows: "
          f"network | {name} (grid-calibrated, {len(ts) - 1} steps) | is; seeds of jax.random.key({args.seed})")
    print(f"r vs network per seed: {name} {np.round(r_machine, 3).tolist()}, is {np.round(r_ideal, 3).tolist()}")
    if size > MAX_BYTES:
        print(f"warning: {size} bytes, over the README's {MAX_BYTES}: use fewer --seeds or a smaller --zoom")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
