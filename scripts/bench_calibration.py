#!/usr/bin/env python
"""Time the grid and the differentiable calibration on the same network trajectories.

For a trained network (a run directory of ``ellsjax train``): one DDIM trajectory of the network from
``--n`` noise draws, then the grid calibration of a hard machine over ``--candidates`` and the
differentiable calibration of its soft-window twin on *those same* trajectories, each timed as one
call (bank builds and compilation included: what a user waits for). Prints a table and writes JSON.

Example:
    python scripts/bench_calibration.py --model runs/net16 --machine els --n 8 --candidates 1,3,5,7,9 \\
        --support 9 --out bench_calibration.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import jax
import numpy as np

import ellsjax as ej
from ellsjax import calibration as cal

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchmeta  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="trained network run directory")
    p.add_argument("--machine", default="els", help="the hard machine (its spec's soft twin is calibrated too)")
    p.add_argument("--n", type=int, default=8, help="network trajectories (noise seeds)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--candidates", default="1,3,5,7,9")
    p.add_argument("--support", type=int, default=9)
    p.add_argument("--window", default="box")
    p.add_argument("--optimizer", default="auto", choices=("auto", "line_search", "adam"))
    p.add_argument("--iterations", type=int, default=None, help="evaluations per step (line search; default 6) "
                   "or Adam steps (default 40)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--init", default="2.0", help="a width ℓ, or 'grid' (start from the grid schedule)")
    p.add_argument("--batch-size", type=int, default=16, help="grid: images per machine call")
    p.add_argument("--out", default="bench_calibration.json")
    _benchmeta.add_record_flag(p)
    args = p.parse_args()

    t0 = time.perf_counter()
    network = ej.models.load(args.model)
    net_cfg, train_cfg = ej.training.load_run_config(args.model)
    images, labels = ej.training.load_data(net_cfg, train_cfg)
    cond = labels if network.conditional else None
    t_load = time.perf_counter() - t0

    spec = ej.machines.spec(args.machine)
    hard = spec.build(images, cond, schedule=network.schedule)
    soft = ej.machines.spec(spec.soft_twin).build(images, cond, schedule=network.schedule, support=args.support,
                                                  window=args.window)
    ts = cal.calibration_times(args.steps)
    x = jax.random.normal(jax.random.key(10_000), (args.n, *network.image_shape))
    label = ej.evaluation.seed_labels(network, args.n)
    t0 = time.perf_counter()
    traj = cal.network_trajectory(network, x, ts, label=label)
    jax.block_until_ready(traj.x0s)
    t_traj = time.perf_counter() - t0

    candidates = tuple(int(v) for v in args.candidates.split(","))
    t0 = time.perf_counter()
    grid = cal.grid_calibrate(network, hard, None, ts, candidates=candidates, label=label, trajectory=traj,
                              batch_size=args.batch_size)
    t_grid = time.perf_counter() - t0

    if args.init == "grid":
        init = cal.widths_from_sizes(grid.scales, args.window)
    else:
        init = float(args.init)
    t0 = time.perf_counter()
    res = cal.differentiable_calibrate(network, soft, None, ts, init=init, iterations=args.iterations,
                                       optimizer=args.optimizer, learning_rate=args.lr, batch=min(args.batch, args.n), label=label,
                                       trajectory=traj)
    t_soft = time.perf_counter() - t0
    grid_obj = float(np.sum(cal.trajectory_loss(hard, traj, grid.scales, label=label)))

    timings = getattr(res, "timings", None)
    out = {
        "meta": _benchmeta.meta(),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "backend": jax.default_backend(),
                 "jax": jax.__version__, "load_avg_after": os.getloadavg()},
        "args": vars(args), "num_train_images": int(images.shape[0]), "image_shape": list(network.image_shape),
        "load_s": t_load, "trajectory_s": t_traj, "grid_s": t_grid, "soft_s": t_soft,
        "soft_over_grid": t_soft / t_grid, "grid_scales": list(grid.scales), "grid_objective": grid_obj,
        "soft_ells": [float(v) for v in res.ells], "soft_objective": float(np.sum(res.step_loss)),
        "soft_losses": [float(v) for v in res.losses], "soft_phases": timings, "soft_optimizer": res.optimizer,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"{images.shape[0]} training images {network.image_shape}, {args.n} trajectories of {args.steps} steps")
    print("| phase | wall (s) |\n|---|---|")
    print(f"| network trajectories | {t_traj:.1f} |")
    print(f"| grid calibration ({len(candidates)} candidates) | {t_grid:.1f} |")
    print(f"| differentiable calibration ({res.optimizer}, {len(res.losses)} rounds, {args.window}, K ≤ {args.support}) | "
          f"{t_soft:.1f} |")
    print(f"| ratio soft / grid | {t_soft / t_grid:.2f} |")
    if timings:
        for k, v in timings.items():
            print(f"| soft: {k} | {v:.1f} |")
    print(f"objective (Σ normalised x̂0 MSE): grid {grid_obj:.4g}, soft {out['soft_objective']:.4g}; wrote {args.out}")
    if args.record:
        _benchmeta.record(
            "bench_calibration", title="Grid and differentiable calibration",
            description="One set of network trajectories; the grid calibration of the hard machine and the "
                        "differentiable calibration of its soft twin on the same trajectories, each one call "
                        "including bank builds and compilation (`scripts/bench_calibration.py`).",
            columns=["network run", "training images", "trajectories", "candidates", "support K", "optimizer",
                     "grid (s)", "differentiable (s)", "ratio", "objective grid → soft"],
            rows=[[args.model, f"{images.shape[0]} at {'×'.join(map(str, network.image_shape[:2]))}", args.n,
                   args.candidates, args.support, f"{res.optimizer}, init {args.init}", round(t_grid, 1),
                   round(t_soft, 1), round(t_soft / t_grid, 2), f"{grid_obj:.4g} → {out['soft_objective']:.4g}"]],
            notes=f"network trajectories {t_traj:.1f} s; window {args.window}.")


if __name__ == "__main__":
    main()
