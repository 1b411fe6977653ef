#!/usr/bin/env python
"""How much work ANY certified subset method could save over the exact PCA-locality machine.

A certified subset method (GoldDiff's coarse-to-fine retrieval with a bound,
``pca(...).with_search(CertifiedSubset(ε))``) scores a subset ``S`` of the training images exactly and bounds what the others
could change: for output ``m`` with posterior weights ``w_mn`` and mean ``x̂(m)``, leaving out the
images outside ``S`` moves the mean by at most ``Σ_{n∉S} w_mn·|φ_n(m) − x̂(m)|`` (the quantity a
rigorous mass bound must cover, however tight). This script runs the exact machine along the
locality protocol's 10-step DDIM trajectories and, from the exact weights (float64, every output of
every image), finds per output the fewest images ``k_m ≥ 1`` whose complement could stay within ``ε``: images taken
by decreasing weight, and the complement's move ``B`` credited down to ``A/(1 + W_U)`` (``A`` its
shares ``w_mn·|φ_n(m) − x̂(m)|``, ``W_U`` its weight; ``B ≥ A/(1 + W_U)`` by the triangle inequality). A subset shared by all outputs of an image (what GoldDiff
retrieves) holds at least ``max_m k_m`` images — an ORACLE lower bound: no bound is that tight and no
retrieval that lucky. Its mean fraction of ``N`` over the steps bounds the speed-up of any such method
at ``ε`` from above (cost ∝ subset size; overheads ignored). The union of the per-output top-``k_m``
sets is printed too (what a per-image subset serving every output with those orders would need).

Example:
    python scripts/certified_subset_oracle.py --n 4000 --batch 8 --tolerance 1e-2 --out oracle.json
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
import jax.numpy as jnp
import numpy as np

import ellsjax as ej
from ellsjax.machines.pca import release_threshold

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchmeta  # noqa: E402


def oracle_sizes(phi, xt, mask, a, inv_temp, eps):
    """``(max_m k_m, |∪_m top-k_m|)`` for one noisy image ``xt`` ``[D]`` against images ``phi`` ``[N, D]``."""
    n, d = phi.shape
    e2 = (xt[None] - a * phi) ** 2
    logits = -inv_temp * (e2.astype(np.float64) @ mask.T.astype(np.float64))  # [N, D] per output
    w = np.exp(logits - logits.max(0, keepdims=True))
    w /= w.sum(0, keepdims=True)
    mean = (w * phi).sum(0)
    share = w * np.abs(phi - mean[None])  # how far each image's absence could move each output
    order = np.argsort(-w, axis=0)
    # leaving out the images ranked k.. (U) moves the mean by B = Σ_U w_n|φ_n − x̂_S| ≥ A/(1 + W_U), with
    # A = Σ_U w_n|φ_n − x̂| and W_U = Σ_U w_n (triangle inequality, |x̂ − x̂_S| ≤ B): certifiable only if
    # A/(1 + W_U) ≤ ε — optimistic, so k_m stays a lower bound; and S holds at least one image
    tail = np.cumsum(np.take_along_axis(share, order, 0)[::-1], 0)[::-1]
    tail_w = np.cumsum(np.take_along_axis(w, order, 0)[::-1], 0)[::-1]
    within = tail / (1.0 + tail_w) <= eps
    within[0] = False
    k_m = np.where(within.any(0), within.argmax(0), n)
    union = np.zeros(n, bool)
    for m in range(d):
        union[order[: k_m[m], m]] = True
    return int(k_m.max()), int(union.sum())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--path", default=os.environ.get("ELLSJAX_DATA_DIR", "../shared/data"))
    p.add_argument("--n", type=int, default=4000, help="training images")
    p.add_argument("--batch", type=int, default=8, help="trajectories (seeds 0..batch-1 of one key)")
    p.add_argument("--tolerance", type=float, default=1e-2, help="ε, the certified error per output value")
    p.add_argument("--out", default="certified_subset_oracle.json")
    _benchmeta.add_record_flag(p)
    args = p.parse_args(argv)
    if args.tolerance <= 0:
        raise SystemExit(f"--tolerance: must be positive, got {args.tolerance}")

    images, _ = ej.data.load(args.dataset, source="npz", path=args.path, limit=args.n)
    images = np.asarray(images)
    sched = ej.schedules.ddpm_linear()
    ts = ej.locality.protocol_times()
    gd_opts = {"dataset": args.dataset if args.dataset == "cifar10" else None}
    machine = ej.machines.pca(images, schedule=sched, threshold=release_threshold(gd_opts["dataset"]))
    x = jax.random.normal(jax.random.key(0), (args.batch, *images.shape[1:]))
    t0 = time.perf_counter()
    _, traj = ej.locality.protocol_sample(machine, x, ts, batch_size=args.batch, return_trajectory=True)
    sample_s = time.perf_counter() - t0
    phi = images.reshape(args.n, -1).astype(np.float32)
    rows = []
    for i, t in enumerate(np.asarray(ts[:-1])):
        ab, var = (float(v) for v in sched.variances(jnp.float32(t)))
        mask = np.asarray(machine._mask(jnp.float32(t)))  # the machine's own N_t (its rule, θ, covariance)
        a, inv_temp = np.sqrt(ab), 0.5 / (var * machine.temperature)
        sizes = [oracle_sizes(phi, np.asarray(traj.xs[i, b]).reshape(-1), mask, a, inv_temp, args.tolerance)
                 for b in range(args.batch)]
        shared, union = (np.array(v) for v in zip(*sizes))
        rows.append({"t": float(t), "s": float(np.sqrt(var)), "neighbourhood_density": float(mask.mean()),
                     "shared_subset_lower_bound_median": float(np.median(shared)), "shared_max": int(shared.max()),
                     "union_median": float(np.median(union))})
        r = rows[-1]
        print(f"t={t:.3f} s={r['s']:.3f}  shared subset ≥ {r['shared_subset_lower_bound_median']:.0f} "
              f"(max {r['shared_max']}), union {r['union_median']:.0f} of {args.n}", flush=True)
    frac = float(np.mean([r["shared_subset_lower_bound_median"] for r in rows]) / args.n)
    frac_union = float(np.mean([r["union_median"] for r in rows]) / args.n)
    res = {"meta": _benchmeta.meta(), "host": {"platform": platform.platform(), "backend": jax.default_backend()}, "args": vars(args),
           "exact_sample_s": sample_s, "rows": rows, "work_fraction_lower_bound": frac,
           "speedup_upper_bound": 1.0 / frac, "work_fraction_union": frac_union}
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"\n| t | s | neighbourhood density | shared subset ≥ (median of {args.batch}) | union of per-output sets |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['t']:.3f} | {r['s']:.3f} | {r['neighbourhood_density']:.2f} | "
              f"{r['shared_subset_lower_bound_median']:.0f} | {r['union_median']:.0f} |")
    print(f"\nwork ≥ {frac:.3f} of exact over the 10 steps ⇒ any certified subset method at ε = {args.tolerance:g} "
          f"is at most {1 / frac:.2f}× faster than exact (union: {frac_union:.3f}, {1 / frac_union:.2f}×)")
    if args.record:
        _benchmeta.record(
            "certified_subset_oracle", title="Certified subset oracle",
            description="The fewest images a subset shared by an image's outputs must hold for the left-out ones to "
                        "possibly stay within ε, per step of the locality protocol (`scripts/certified_subset_oracle.py`).",
            columns=["t", "s", "neighbourhood density", f"shared subset ≥ (median of {args.batch})",
                     "union of per-output sets"],
            rows=[[round(r["t"], 3), round(r["s"], 3), round(r["neighbourhood_density"], 2),
                   int(r["shared_subset_lower_bound_median"]), int(r["union_median"])] for r in rows],
            notes=f"{args.n} {args.dataset} images, ε = {args.tolerance:g}, exact sample {sample_s:.0f} s; work ≥ "
                  f"{frac:.3f} of exact over the 10 steps, so any certified subset method is at most {1 / frac:.2f}× "
                  "faster than exact.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
