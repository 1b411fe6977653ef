#!/usr/bin/env python
"""A whole protocol sample (10 DDIM steps, linear-β DDPM schedule) with the exact PCA-locality machine,
GoldDiff as published and GoldDiff certified, from the same noise: wall time of each (compile
included and reported separately by a second, warm run) and the max difference from exact PCA.

Example:
    python scripts/bench_golddiff_sample.py --n 4000 --batch 8 --tolerance 1e-2 --out golddiff_sample.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

import ellsjax as ej
from ellsjax.machines.pca import release_threshold

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchmeta  # noqa: E402


def timed_sample(m, x, ts, repeats):
    walls = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = np.asarray(ej.evaluation.sample(m, x, ts, batch_size=x.shape[0]))
        walls.append(time.perf_counter() - t0)
    return out, walls


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--path", default=os.environ.get("ELLSJAX_DATA_DIR", "../shared/data"))
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tolerance", type=float, default=1e-2)
    p.add_argument("--chunk", type=int, default=None, help="certified mode's images per chunk")
    p.add_argument("--repeats", type=int, default=2, help="runs per machine (the first compiles)")
    p.add_argument("--out", default="golddiff_sample.json")
    _benchmeta.add_record_flag(p)
    args = p.parse_args()

    images, _ = ej.data.load(args.dataset, source="npz", path=args.path, limit=args.n)
    sched = ej.schedules.ddpm_linear()
    ts = ej.locality.protocol_times()
    x = jax.random.normal(jax.random.key(0), (args.batch, *images.shape[1:]))
    gd_opts = {"dataset": args.dataset if args.dataset == "cifar10" else None}
    exact = ej.machines.pca(images, schedule=sched, threshold=release_threshold(gd_opts["dataset"]))
    machines = {
        "pca (exact)": exact,
        "golddiff (published)": ej.machines.golddiff(images, schedule=sched, **gd_opts),
        f"pca, certified search (tolerance {args.tolerance:g})": exact.with_search(
            ej.machines.CertifiedSubset(args.tolerance, chunk=args.chunk, **gd_opts)),
    }
    rows, exact = [], None
    for name, m in machines.items():
        out, walls = timed_sample(m, x, ts, args.repeats)
        if exact is None:
            exact = out
        rows.append({"machine": name, "wall_s": walls, "warm_s": min(walls),
                     "max_diff_vs_exact": float(np.abs(out - exact).max()),
                     "mean_abs_diff_vs_exact": float(np.abs(out - exact).mean())})
        print(f"{name:40s} best {min(walls):7.1f} s (runs {', '.join(f'{w:.1f}' for w in walls)})  "
              f"max |diff| vs exact {rows[-1]['max_diff_vs_exact']:.2e}", flush=True)
    res = {"meta": _benchmeta.meta(), "host": {"platform": platform.platform(), "backend": jax.default_backend(),
                    "devices": [str(d) for d in jax.devices()], "load_avg_end": os.getloadavg()},
           "args": vars(args), "threshold": machines["pca (exact)"].threshold, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    base = rows[0]["warm_s"]
    print(f"\n| machine | 10-step sample (s, best of {args.repeats}; the first run compiles) | speed-up vs exact | max diff vs exact |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['machine']} | {r['warm_s']:.1f} | {base / r['warm_s']:.2f}x | {r['max_diff_vs_exact']:.2e} |")
    if args.record:
        _benchmeta.record(
            "bench_golddiff_sample", title="Whole 10-step locality-protocol samples: PCA, GoldDiff, certified search",
            description="Exact PCA locality, GoldDiff as published and PCA with the certified subset search, from "
                        "the same noise (`scripts/bench_golddiff_sample.py`).",
            columns=["machine", f"10-step sample (s, best of {args.repeats})", "speed-up vs exact", "max diff vs exact"],
            rows=[[r["machine"], round(r["warm_s"], 1), f"{base / r['warm_s']:.2f}×", f"{r['max_diff_vs_exact']:.2e}"]
                  for r in rows],
            notes=f"{args.n} {args.dataset} images, batch {args.batch}; the first run of each compiles.")


if __name__ == "__main__":
    main()
