#!/usr/bin/env python
"""Accelerator readiness in one command: correctness against the CPU, then timings, on any backend.

1. **Correctness**: every registered machine on a small case, on the default backend and on the CPU
   (``jax.default_device``); the largest difference must be at most ``--tolerance`` (1e-5). On a
   CPU-only host both runs are on the CPU and the check runs the same code.
2. **Timings** on CIFAR-10-shaped data (32×32×3): the real CIFAR-10 subset where ``--cifar`` points to
   one (``cifar10_subset.npz``, 4000 images), else synthetic images (``--n``, 50 000 by default):
   one step of exact ELS and bbELS (k = 5 and 11), IS and PCA; the same ELS step with certified search
   (``with_search(TopK(1e-3))``: top-k candidates, exact rescoring and a rigorous bound); a
   20-step bbELS DDIM sample with the paper's CIFAR-10 schedule; one step of the differentiable
   calibration (soft-window ELS, value and derivative in ℓ); one training step of the paper's
   CIFAR-10 ResNet and UNet (batch 128).
3. **Against the capacity plan**: the streamed exact ELS step's measured time and the device's peak
   memory next to :func:`ellsjax.plan.plan`'s roofline prediction and temporaries for this device
   kind (H100, TPU v5e/v4/v5p, CPU).
4. Writes one JSON and prints a table. Sections that would overrun ``--budget`` seconds are skipped
   (and say so). ``--quick`` shrinks every size so that the whole check runs in well under a minute
   on a CPU (what the test suite runs).

Example:
    python scripts/device_check.py --out device_check.json              # on a GPU/TPU host
    python scripts/device_check.py --quick --out /tmp/device_check.json  # CI-sized
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import ellsjax as ej


def _timed(fn, repeats):
    """Compile/warm once, then the median of ``repeats`` timed calls (seconds)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), first


def _scale_for(spec, k):
    return {"size": k, "side": k, "width": 1.2, "none": None}[spec.scale_kind]


def correctness(tolerance, quick):
    """Every registered machine, default backend vs CPU, on a small case."""
    rng = np.random.default_rng(0)
    imgs = rng.uniform(-1, 1, (6 if quick else 12, 8, 8, 3)).astype(np.float32)
    x = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    t = np.array([0.3, 0.7], np.float32)
    cpu = jax.devices("cpu")[0]
    rows = []
    for spec in ej.machines.specs():
        options = {"support": 5} if spec.scale_kind == "width" else {}
        scale = _scale_for(spec, 3)
        m = spec.build(imgs, **options)
        here = np.asarray(m.prepare((scale,)).denoise(x, t, scale=scale))
        with jax.default_device(cpu):
            mc = spec.build(imgs, **options)
            there = np.asarray(mc.prepare((scale,)).denoise(x, t, scale=scale))
        diff = float(np.max(np.abs(here - there)))
        rows.append({"machine": spec.name, "max_abs_diff_vs_cpu": diff, "ok": bool(diff <= tolerance and
                                                                                  np.all(np.isfinite(here)))})
    return rows


def _cifar(args):
    if args.cifar and Path(args.cifar).exists():
        images, _ = ej.data.load("cifar10", source="npz", path=args.cifar, limit=args.n)
        return images, f"CIFAR-10 subset ({images.shape[0]} real images)"
    rng = np.random.default_rng(1)
    size = 8 if args.quick else 32
    images = rng.uniform(-1, 1, (args.n, size, size, 3)).astype(np.float32)
    return images, f"synthetic ({args.n} images of {size}x{size}x3)"


def timings(args, deadline):
    images, source = _cifar(args)
    h = images.shape[1]
    x = jax.random.normal(jax.random.key(0), (args.batch, *images.shape[1:]))
    tb = jnp.full((args.batch,), 0.5)
    out, skipped = [], []

    def run(name, make, repeats=args.repeats):
        if time.perf_counter() > deadline:
            skipped.append(name)
            return
        t0 = time.perf_counter()
        try:
            fn = make()
            med, first = _timed(fn, repeats)
        except Exception as e:  # report, do not stop the check
            out.append({"what": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            return
        out.append({"what": name, "median_s": med, "first_call_s": first,
                    "setup_s": time.perf_counter() - t0 - first - med * repeats})

    step = jax.jit(lambda m, xx, tt, k: m._denoise(xx, tt, None, k), static_argnums=3)

    def stepper(build, k):
        # Building (and preparing) is setup; the returned closure is what is timed.
        def make():
            m = build()
            return lambda: step(m, x, tb, k)
        return make

    for k in (5, 11) if h >= 11 else (3, 5):
        for name in ("els", "bbels"):
            run(f"{name} exact step k={k}",
                stepper(lambda name=name, k=k: ej.machines.build(name, images).prepare((k,)), k))
        run(f"els certified search step k={k} (tolerance 1e-3)",
            stepper(lambda k=k: ej.machines.els(images).with_search(ej.machines.TopK(1e-3)).prepare((k,)), k))
    run("is exact step", stepper(lambda: ej.machines.ideal(images).prepare(), None))
    out.extend(against_plan(images, x, tb, args))
    run("pca step", stepper(lambda: ej.machines.pca(images[: min(len(images), 2000)]), None))
    sched = ej.scales.ScaleSchedule.load("CIFAR10_ResNet_zeros_conditional")
    if args.quick:
        sched = sched.on_grid(ej.schedules.paper_times(5))
    ts, scales = sched.times(), tuple(min(v, h - 1) for v in sched.values)

    def sample():
        m = ej.machines.bbels(images).prepare(scales)
        return lambda: ej.samplers.ddim(m, x, ts, scales=scales)

    run(f"bbels {len(scales)}-step DDIM sample", sample, repeats=1)

    def calib():
        from ellsjax import calibration as cal

        soft = ej.machines.soft_els(images, support=min(9, h - 1 + h % 2), window="box")
        side = soft.window_size(2.0)
        ready = soft.prepare(sides=[side])
        return lambda: cal._step_value_and_grad(ready, jnp.float32(2.0), x, x * 0.1, jnp.float32(0.5),
                                                jnp.float32(1.0), None, side=side)

    run("differentiable calibration step (soft ELS, value + dL/dℓ)", calib)

    def train_step(preset):
        def make():
            net = ej.nets.preset(preset).net
            if args.quick:
                import dataclasses

                net = dataclasses.replace(net, width=16, depth=2, emb_dim=None, image_size=h)
            cfg = ej.training.TrainConfig(steps=1, batch_size=args.train_batch)
            graphdef, state = ej.training.init_state(net, cfg)
            fn = ej.training.make_train_step(graphdef, cfg, conditional=net.conditional)
            xb = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (args.train_batch, h, h, 3)), jnp.float32)
            lb = jnp.zeros((args.train_batch,), jnp.int32)
            key = jax.random.key(0)
            return lambda: fn(state.params, state.opt_state, state.ema, (xb, lb), key)[-1]
        return make

    for preset in ("CIFAR10_ResNet_zeros_conditional", "CIFAR10_UNet_zeros_conditional"):
        run(f"training step {preset} (batch {args.train_batch})", train_step(preset))
    return {"data": source, "batch": args.batch, "rows": out, "skipped_over_budget": skipped}


def _plan_target(device) -> str:
    """The capacity plan's target for a device (its closest published kind)."""
    kind = str(getattr(device, "device_kind", "")).lower()
    if device.platform == "tpu":
        return "v5e" if ("lite" in kind or "v5e" in kind) else ("v5p" if "v5" in kind else "v4")
    return "h100" if device.platform == "gpu" else "cpu"


def against_plan(images, x, tb, args):
    """The capacity plan's prediction (:func:`ellsjax.plan.plan`: roofline time, temporaries) of the
    streamed exact ELS step next to its measured time and the device's peak memory."""
    from ellsjax import plan as _plan

    dev = jax.devices()[0]
    target = _plan_target(dev)
    rows = []
    for k in ((3,) if args.quick else (5, 11)):
        m = ej.machines.els(images)
        step = jax.jit(lambda m, xx, tt: m._denoise(xx, tt, None, k))
        med, first = _timed(lambda: step(m, x, tb), args.repeats)
        stats = dev.memory_stats() or {}
        try:
            # --quick: counts and roofline only (the plan's compile costs the CI-sized check seconds)
            p = _plan.plan("els", scale=k, images=images.shape, batch=x.shape[0], target=target,
                           compile=not args.quick)
            pred = {"predicted_s": p.roofline_s, "bound": p.bound, "predicted_temp_bytes": p.temp_bytes,
                    "predicted_flops": p.flops}
        except Exception as e:  # noqa: BLE001 - no compiler for the target here: measured only
            pred = {"plan_error": f"{type(e).__name__}: {str(e)[:160]}"}
        rows.append({"what": f"els streamed step k={k} vs plan ({target})", "median_s": med, "first_call_s": first,
                     "peak_bytes_in_use": stats.get("peak_bytes_in_use"), **pred,
                     "measured_over_predicted": med / pred["predicted_s"] if "predicted_s" in pred else None})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    p.add_argument("--n", type=int, default=None, help="synthetic training images (default 50000; --quick 32)")
    p.add_argument("--cifar", default=None, help="a cifar10_subset.npz (or folder) to use real images")
    p.add_argument("--batch", type=int, default=1, help="images per timed machine step")
    p.add_argument("--train-batch", type=int, default=None, help="training batch (default 128; --quick 4)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5; --quick 1)")
    p.add_argument("--tolerance", type=float, default=1e-5)
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check")
    p.add_argument("--out", default="device_check.json")
    args = p.parse_args(argv)
    args.n = args.n or (32 if args.quick else 50_000)
    args.train_batch = args.train_batch or (4 if args.quick else 128)
    args.repeats = args.repeats or (1 if args.quick else 5)
    start = time.perf_counter()
    deadline = start + args.budget
    result = {
        "host": {"platform": platform.platform(), "backend": jax.default_backend(),
                 "devices": [str(d) for d in jax.devices()], "jax": jax.__version__, "cpus": os.cpu_count()},
        "args": vars(args),
        "correctness": correctness(args.tolerance, args.quick),
    }
    result["timings"] = timings(args, deadline)
    result["total_s"] = time.perf_counter() - start
    result["ok"] = all(r["ok"] for r in result["correctness"]) and not any(
        "error" in r for r in result["timings"]["rows"])
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"backend {result['host']['backend']} ({', '.join(result['host']['devices'][:2])}); "
          f"data: {result['timings']['data']}")
    print("| machine | max |Δ| vs CPU | ok |\n|---|---|---|")
    for r in result["correctness"]:
        print(f"| {r['machine']} | {r['max_abs_diff_vs_cpu']:.1e} | {'yes' if r['ok'] else 'NO'} |")
    print("\n| what | median (s) | first call (s) |\n|---|---|---|")
    for r in result["timings"]["rows"]:
        if "error" in r:
            print(f"| {r['what']} | error: {r['error']} | |")
        else:
            extra = f" (plan: {r['predicted_s']:.4f} s, {r['bound']}-bound)" if r.get("predicted_s") else ""
            print(f"| {r['what']} | {r['median_s']:.4f}{extra} | {r['first_call_s']:.2f} |")
    for name in result["timings"]["skipped_over_budget"]:
        print(f"| {name} | skipped (over --budget) | |")
    print(f"\ntotal {result['total_s']:.0f} s; {'OK' if result['ok'] else 'FAILED'}; wrote {args.out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
