#!/usr/bin/env python
"""Benchmark one machine step (and optionally a whole sample) on real data.

For each machine and scale: the median step time over repeats after warm-up (compile time and
bank-build time reported separately), the achieved GFLOP/s by the issue's formula
``2·H·W·k²·C·N·(H−k+1)(W−k+1)`` per image (counting every bank patch, before deduplication), the fp32
GEMM rate of this machine for the same shapes measured in the same run, peak memory (compiled
temporaries and process RSS), and the max error against an independent float64 numpy evaluation on
sampled pixels.

Example:
    python scripts/bench_machines.py --machines els,bbels --n 1000 --scales 5,9 --out bench.json
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import ellsjax as ej

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchmeta  # noqa: E402


def _f(v, fmt=".1f"):
    return "-" if v is None else format(v, fmt)


def median_time(fn, repeats):
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


def gemm_rate(m, d, repeats=5):
    """fp32 GEMM GFLOP/s for [m, d] x [d, n] on this machine: the best over n (conservative: XLA's
    CPU GEMM with a small inner dimension is fastest around n = 2048 and 4x slower at n = 8192)."""
    best = 0.0
    for n in (512, 1024, 2048, 4096, 8192):
        q = jax.random.normal(jax.random.key(0), (m, d))
        k = jax.random.normal(jax.random.key(1), (d, n))
        f = jax.jit(lambda q, k: jnp.dot(q, k, precision=jax.lax.Precision.HIGHEST))
        jax.block_until_ready(f(q, k))
        t, _ = median_time(lambda: f(q, k), repeats)
        best = max(best, 2 * m * d * n / t / 1e9)
    return best


def window(img, r, c, k, mode):
    h, w, ch = img.shape
    rr = np.arange(r - k // 2, r + k // 2 + 1)[:, None]
    cc = np.arange(c - k // 2, c + k // 2 + 1)[None, :]
    if mode == "circular":
        return img[rr % h, cc % w]
    inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
    return np.where(inside[..., None], img[np.clip(rr, 0, h - 1), np.clip(cc, 0, w - 1)], 0.0)


def reference_pixel(images, x, r, c, k, a, s, padding):
    """float64 posterior mean of one pixel of one image, from the definitions (ELS / bbELS)."""
    n, h, w, ch = images.shape
    hk = k // 2

    def cls(v, size):
        return v if v < hk else (v - size if v >= size - hk else "in")

    if padding == "circular":
        pos = [(i, j) for i in range(hk, h - hk) for j in range(hk, w - hk)]
        q = window(x, r, c, k, "circular")
    else:
        pos = [(i, j) for i in range(h) for j in range(w) if cls(i, h) == cls(r, h) and cls(j, w) == cls(c, w)]
        q = window(x, r, c, k, "zeros")
    padded = np.pad(images.astype(np.float64), ((0, 0), (hk, hk), (hk, hk), (0, 0)))
    keys = np.stack([padded[:, i : i + k, j : j + k] for i, j in pos], axis=1).reshape(-1, k * k * ch)
    vals = np.stack([images[:, i, j] for i, j in pos], axis=1).reshape(-1, ch).astype(np.float64)
    d2 = ((q.reshape(1, -1).astype(np.float64) - a * keys) ** 2).sum(1)
    logit = -d2 / (2 * s * s)
    wts = np.exp(logit - logit.max())
    return wts @ vals / wts.sum()


def bench_step(machine_name, images, k, batch, t, repeats, check_pixels, rng, memory_budget=None, prune="off",
               queries=None, reference=None, options=None):
    spec = ej.machines.spec(machine_name)
    kwargs = dict(options or {})
    if "memory_budget" in inspect.signature(spec.builder).parameters:
        kwargs["memory_budget"] = memory_budget
    m = spec.build(images, **kwargs)
    if prune != "off":
        m = m.with_search(ej.machines.Pruned(float(prune)))
    # the float64 check and the FLOP count below are those of the ELS/bbELS definitions
    els_like = type(m) is ej.machines.EquivariantLocalScore
    h, w, ch = m.image_shape
    n = images.shape[0]
    x = jax.random.normal(jax.random.key(1), (batch, h, w, ch))
    if queries is not None:
        # a noised held-out image (pruning depends on how close queries lie to the data)
        a_t, s_t = (float(v) for v in m.schedule(t))
        x = a_t * jnp.asarray(queries[:batch]) + s_t * x
    t0 = time.perf_counter()
    ready = m.prepare((k,))
    t_bank = time.perf_counter() - t0
    step = jax.jit(lambda mm, xx: mm._denoise(xx, jnp.full((batch,), t, jnp.float32), None, k))
    t0 = time.perf_counter()
    ej.machines._pruning.visit_log = [] if prune != "off" else None
    compiled = step.lower(ready, x).compile()
    t_compile = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp_bytes = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
    jax.block_until_ready(compiled(ready, x))
    jax.effects_barrier()
    visits = ej.machines._pruning.visit_log
    ej.machines._pruning.visit_log = None
    visited = float(np.mean(visits)) if visits else None
    t_med, ts = median_time(lambda: compiled(ready, x), repeats)
    flops = 2 * h * w * k * k * ch * n * (h - k + 1) * (w - k + 1) * batch if els_like else None
    entries = None
    if ready.banks:
        bank = next(iter(ready.banks.values()))
        entries = int(sum((np.asarray(gb.vv[..., 0]) > 0).sum() for gb in bank.values()))
    out = np.asarray(compiled(ready, x))
    ref_err = None
    if reference:  # error against another registered machine (e.g. golddiff against exact pca)
        ref = ej.machines.spec(reference).build(images, **{k_: v for k_, v in (options or {}).items()
                                                          if k_ in ("threshold", "schedule")})
        ref_err = float(np.abs(out - np.asarray(ref.denoise(x, t, scale=k if ref.needs_scale else None))).max())
    a, s = (float(v) for v in m.schedule(t))
    err = 0.0
    if check_pixels and els_like:
        padding = m.padding
        img0 = np.asarray(x[0])
        coords = [(0, 0), (h - 1, w // 2), (h // 2, 1)] + [tuple(rng.integers(0, [h, w])) for _ in range(check_pixels - 3)]
        for r, c in coords:
            ref = reference_pixel(np.asarray(images), img0, r, c, k, a, s, padding)
            err = max(err, float(np.abs(out[0, r, c] - ref).max()))
    return {
        "machine": machine_name,
        "k": k,
        "N": n,
        "image": [h, w, ch],
        "batch": batch,
        "t": t,
        "prune": prune,
        "blocks_skipped": None if visited is None else 1.0 - visited,
        "step_s_median": t_med,
        "step_s_all": ts,
        "compile_s": t_compile,
        "bank_build_s": t_bank,
        "bank_entries": entries,
        "bank_patches_total": n * (h - k + 1) * (w - k + 1) if els_like else None,
        "gflop": None if flops is None else flops / 1e9,
        "gflops_achieved": None if flops is None else flops / t_med / 1e9,
        "gemm_gflops_same_shape": gemm_rate(batch * h * w, k * k * ch) if els_like else None,
        "temp_bytes_compiled": temp_bytes,
        "max_err_vs_float64": err if check_pixels and els_like else None,
        "reference": reference,
        "max_err_vs_reference": ref_err,
        "pixels_checked": check_pixels,
    }


def bench_sample(machine_name, images, preset, batch, seed, memory_budget=None, prune="off"):
    m = ej.machines.spec(machine_name).build(images, memory_budget=memory_budget)
    if prune != "off":
        m = m.with_search(ej.machines.Pruned(float(prune)))
    schedule = ej.scales.ScaleSchedule.load(preset)
    ts, scales = schedule.times(), schedule.values
    x = jax.random.normal(jax.random.key(seed), (batch, *m.image_shape))
    t0, c0 = time.perf_counter(), time.process_time()
    out = ej.samplers.ddim(m, x, ts, scales=scales)
    jax.block_until_ready(out)
    # process CPU time (all threads) next to wall time: on a shared machine wall time also counts
    # other processes' turns, CPU time does not
    return {"machine": machine_name, "preset": preset, "N": int(images.shape[0]), "batch": batch, "prune": prune,
            "sample_s_total": time.perf_counter() - t0, "sample_cpu_s": time.process_time() - c0,
            "load_avg_after": os.getloadavg(), "note": "includes bank builds and compilation"}, np.asarray(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--machines", default="els,bbels", help="comma-separated registered machines (ellsjax.machines.names())")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--source", default="auto", help="auto: bundled if it holds --n images, else ../shared/data npz")
    p.add_argument("--path", default=None)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--scales", default="3,5,9,15")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--t", default="0.5", help="comma-separated noise levels")
    p.add_argument("--prune", default="off",
                   help="comma-separated pruning modes per step: off, 0 (exact float32 skip), or a tolerance")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--check-pixels", type=int, default=8, help="pixels compared with float64 numpy (0: skip)")
    p.add_argument("--sample", default=None, help="also time a whole DDIM sample with this scale preset")
    p.add_argument("--sample-only", action="store_true", help="skip the per-step table (with --sample)")
    p.add_argument("--memory-budget", type=float, default=None,
                   help="chunk memory budget in MiB (default: the platform's, ellsjax.machines.memory_budget_for(platform))")
    p.add_argument("--reference", default=None,
                   help="also report the max error against this registered machine (e.g. pca for golddiff)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="builder option for the benchmarked machines (repeatable; values parsed as JSON, "
                        "e.g. --option tolerance=0.01 --option schedule='\"ddpm_linear\"')")
    p.add_argument("--out", default="bench_machines.json")
    _benchmeta.add_record_flag(p)
    args = p.parse_args()
    options = {}
    for item in args.option:
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    for name in args.machines.split(","):
        ej.machines.spec(name)  # unknown names fail here, listing the registered ones
    budget = None if args.memory_budget is None else int(args.memory_budget * 2**20)

    source, path = args.source, args.path
    if source == "auto":
        bundled = ej.data.bundled_info().get(args.dataset, {}).get("train", {}).get("num_images", 0)
        if args.n > bundled:
            source, path = "npz", path or "../shared/data"
        else:
            source = "bundled"
    images, _ = ej.data.load(args.dataset, source=source, path=path, limit=args.n + args.batch,
                             image_size=args.image_size)
    images, held_out = images[: args.n], images[args.n:]
    rng = np.random.default_rng(0)
    rows = []
    for name in args.machines.split(",") if not args.sample_only else []:
        for k, t, prune in itertools.product([int(v) for v in args.scales.split(",")],
                                             [float(v) for v in args.t.split(",")], args.prune.split(",")):
            rows.append(bench_step(name, images, k, args.batch, t, args.repeats, args.check_pixels, rng, budget,
                                   prune, held_out, args.reference, options))
            r = rows[-1]
            skipped = "" if r["blocks_skipped"] is None else f" skipped {100 * r['blocks_skipped']:.0f}% of blocks"
            print(f"{name:6s} k={k:2d} t={t} prune={prune}{skipped} N={r['N']} B={r['batch']}  "
                  f"step {r['step_s_median']:.3f}s  "
                  f"({_f(r['gflops_achieved'])} GFLOP/s; same-shape GEMM {_f(r['gemm_gflops_same_shape'])})  "
                  f"compile {r['compile_s']:.1f}s  bank {r['bank_build_s']:.1f}s ({r['bank_entries']} entries)  "
                  f"temp {None if r['temp_bytes_compiled'] is None else round(r['temp_bytes_compiled'] / 2**20, 1)} MiB  "
                  f"err {r['max_err_vs_float64']}"
                  + ("" if r["reference"] is None else f" vs {r['reference']} {r['max_err_vs_reference']:.2e}"), flush=True)
    samples, first = [], None
    for prune in args.prune.split(",") if args.sample else []:
        sample, out = bench_sample(args.machines.split(",")[-1], images, args.sample, args.batch, 0, budget, prune)
        first = out if first is None else first
        sample["max_diff_vs_first"] = float(np.abs(out - first).max())  # pruning modes against the first mode
        samples.append(sample)
        print(f"whole sample ({sample['preset']}, {sample['machine']}, N={sample['N']}, prune={prune}): "
              f"{sample['sample_s_total']:.1f}s wall, {sample['sample_cpu_s']:.1f}s CPU, max |diff| vs the first "
              f"mode {sample['max_diff_vs_first']:.2e}; load average after {sample['load_avg_after']}", flush=True)
    sample = samples[0] if len(samples) == 1 else (samples or None)
    result = {
        "meta": _benchmeta.meta(),
        "host": {"platform": platform.platform(), "processor": platform.processor(), "cpus": jax.local_device_count(),
                 "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()], "jax": jax.__version__},
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "args": vars(args),
        "steps": rows,
        "sample": sample,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\npeak RSS {result['peak_rss_mib']:.0f} MiB; wrote {args.out}")
    print("\n| machine | k | t | prune | blocks skipped | N | B | step (s) | GFLOP/s | GEMM GFLOP/s | % of GEMM | compile (s) | bank (s) | entries | max err | err vs reference |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        skipped = "-" if r["blocks_skipped"] is None else f"{100 * r['blocks_skipped']:.0f}%"
        print(f"| {r['machine']} | {r['k']} | {r['t']} | {r['prune']} | {skipped} | {r['N']} | {r['batch']} | {r['step_s_median']:.3f} | {_f(r['gflops_achieved'])} | "
              f"{_f(r['gemm_gflops_same_shape'])} | "
              f"{'-' if r['gflops_achieved'] is None else format(100 * r['gflops_achieved'] / r['gemm_gflops_same_shape'], '.0f') + '%'} | "
              f"{r['compile_s']:.1f} | {r['bank_build_s']:.1f} | {r['bank_entries']} | "
              f"{'-' if r['max_err_vs_float64'] is None else format(r['max_err_vs_float64'], '.1e')} | "
              f"{'-' if r['max_err_vs_reference'] is None else r['reference'] + ' ' + format(r['max_err_vs_reference'], '.1e')} |")
    if args.record:
        _record(args, rows, samples, result["peak_rss_mib"])


def _record(args, rows, samples, peak_rss_mib):
    """The step table (and whole samples, if timed) for the docs' benchmarks page."""
    notes = (f"{args.dataset} at {args.image_size}×{args.image_size}, a noised held-out image per query image; "
             f"median step of {args.repeats} after warm-up (compile and bank build separate); GFLOP/s by "
             f"2·H·W·k²·C·N·(H−k+1)(W−k+1); max error against float64 numpy on {args.check_pixels} pixels; "
             f"peak RSS {peak_rss_mib:.0f} MiB.")
    for smp in samples:
        notes += (f" Whole {smp['preset']} sample ({smp['machine']}, N = {smp['N']}, prune {smp['prune']}): "
                  f"{smp['sample_s_total']:.1f} s wall, {smp['sample_cpu_s']:.1f} s CPU, bank builds and compilation "
                  f"included; max difference from the first mode {smp['max_diff_vs_first']:.1e}.")
    table = [[r["machine"], r["k"], r["t"], r["prune"],
              "-" if r["blocks_skipped"] is None else f"{100 * r['blocks_skipped']:.0f}%", r["N"], r["batch"],
              round(r["step_s_median"], 4), _f(r["gflops_achieved"]), _f(r["gemm_gflops_same_shape"]),
              round(r["compile_s"], 2), round(r["bank_build_s"], 2), r["bank_entries"],
              "-" if r["max_err_vs_float64"] is None else f"{r['max_err_vs_float64']:.1e}"] for r in rows]
    _benchmeta.record(
        "bench_machines", title="Machine steps",
        description="One `denoise` step per machine, patch size k and noise level t (`scripts/bench_machines.py`).",
        columns=["machine", "k", "t", "prune", "blocks skipped", "N", "B", "step (s)", "GFLOP/s", "GEMM GFLOP/s",
                 "compile (s)", "bank (s)", "bank entries", "max err"],
        rows=table, notes=notes)


if __name__ == "__main__":
    main()
