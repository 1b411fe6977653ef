"""Time a machine's first call, its repeated unprepared calls and its prepared calls.

The process's first ``denoise`` of a fresh machine (build, compile, run); fresh machines in the warm
process (build and run: the program is cached for these shapes); ``--repeats`` unprepared calls of
one machine; ``prepare`` and ``--repeats`` prepared calls; medians, a table, and JSON. Only the public API is used, so the same script times another checkout of ellsjax (run it with
``PYTHONPATH=<checkout>``) for a before/after comparison. Example (issue 21's case)::

    python scripts/bench_first_call.py --machine bbels --scale 11 --n 1000 --image-size 32 --out first_call.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

import ellsjax as ej

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchmeta  # noqa: E402


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return time.perf_counter() - t0, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--machine", default="bbels")
    p.add_argument("--scale", type=int, default=11)
    p.add_argument("--n", type=int, default=1000, help="training images")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--path", default=None, help="npz file (default: ../shared/data/<dataset>.npz if present)")
    p.add_argument("--t", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="JSON file to write")
    _benchmeta.add_record_flag(p)
    args = p.parse_args(argv)

    path = args.path or os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", f"{args.dataset}.npz")
    kw = dict(source="npz", path=path) if os.path.exists(path) else dict(source="bundled")
    imgs, _ = ej.data.load(args.dataset, limit=args.n + args.batch, image_size=args.image_size, **kw)
    imgs = np.asarray(imgs)
    train, x0 = imgs[: args.n], imgs[args.n:]
    a, s = (float(v) for v in ej.schedules.cosine_legacy()(args.t))
    x = (a * x0 + s * np.random.default_rng(0).normal(size=x0.shape)).astype(np.float32)
    build = ej.machines.spec(args.machine).builder

    def call(m):
        return m.denoise(x, args.t, scale=args.scale)

    first, ref = _timed(lambda: call(build(train)))  # this process's first call: compiles
    # a fresh machine in a warm process: built and run (its program is cached for these shapes)
    fresh = statistics.median(_timed(lambda: call(build(train)))[0] for _ in range(args.repeats))
    m = build(train)
    unprepared = [_timed(lambda: call(m))[0] for _ in range(args.repeats)]
    prep_s, pm = _timed(lambda: m.prepare((args.scale,)))
    prepared_runs = [_timed(lambda: call(pm)) for _ in range(args.repeats + 1)]
    prepared = [r[0] for r in prepared_runs[1:]]  # the first prepared call compiles the bank program
    diff = float(np.abs(np.asarray(prepared_runs[-1][1]) - np.asarray(ref)).max())
    res = {
        "machine": args.machine, "scale": args.scale, "n": args.n, "image_size": args.image_size, "t": args.t,
        "batch": args.batch, "first_call_s": first, "fresh_machine_warm_process_s": fresh,
        "unprepared_median_s": statistics.median(unprepared),
        "prepare_s": prep_s, "prepared_first_s": prepared_runs[0][0], "prepared_median_s": statistics.median(prepared),
        "unprepared_over_prepared": statistics.median(unprepared) / statistics.median(prepared),
        "max_abs_diff": diff, "ellsjax": getattr(ej, "__file__", ""), "jax": jax.__version__,
        "host": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"), "meta": _benchmeta.meta(),
    }
    print(f"{args.machine} k={args.scale}, {args.n} {args.dataset} images {args.image_size}px, B={args.batch}, "
          f"t={args.t} (median of {args.repeats})")
    print("| first call (process) | fresh machine, warm process | repeated unprepared call | prepare | prepared call "
          "| unprepared / prepared |")
    print("|---|---|---|---|---|---|")
    print(f"| {first:.2f} s | {fresh:.3f} s | {res['unprepared_median_s']:.3f} s | {prep_s:.2f} s | {res['prepared_median_s']:.3f} s "
          f"| {res['unprepared_over_prepared']:.2f}× |")
    print(f"max |prepared − first| = {diff:.2e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    if args.record:
        _benchmeta.record(
            "bench_first_call", title="First call, repeated calls and prepared banks",
            description="What a `denoise` call costs the first time in a process (compilation), for a fresh machine "
                        "in a warm process, unprepared, and after `prepare` (`scripts/bench_first_call.py`).",
            columns=["machine", "k", "N", "image", "B", "t", "first call (s)", "fresh machine, warm (s)",
                     "unprepared (s)", "prepare (s)", "prepared (s)", "unprepared / prepared"],
            rows=[[args.machine, args.scale, args.n, f"{args.image_size}×{args.image_size}", args.batch, args.t,
                   round(first, 2), round(fresh, 3), round(res["unprepared_median_s"], 3), round(prep_s, 2),
                   round(res["prepared_median_s"], 3), round(res["unprepared_over_prepared"], 2)]],
            notes=f"{args.dataset}; medians of {args.repeats}; max |prepared − first| = {diff:.1e}.")
    return res


if __name__ == "__main__":
    main()
