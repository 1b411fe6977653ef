#!/usr/bin/env python
"""Training throughput of the paper's networks: images/s (median over repeats after a warm-up),
compile time, and peak memory, for the MNIST ResNet and UNet presets and a small ResNet.

Each configuration runs in its own process, so that its peak resident memory (``ru_maxrss``) is its
own. The timed loop is :func:`ellsjax.training.train`'s: batches drawn by ``batch_indices`` and
gathered from the bundled MNIST (resized to 32x32), the update's key folded in, the jitted step; a
repeat ends when its last update has finished (``block_until_ready``). Checkpointing and metrics
are excluded. On an accelerator the device's peak memory is reported too.

Usage:
    python scripts/bench_train.py                       # all configs; CPU-sized batches on CPU
    python scripts/bench_train.py --configs small --batch-size 128 --repeats 5 --steps 20
    python scripts/bench_train.py --out bench_train.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchmeta  # noqa: E402

# name -> (preset or None, NetConfig overrides); batch sizes are per backend (CPU: small enough
# that a repeat takes seconds, accelerators: the paper's 128)
CONFIGS = {
    "small": (None, {"arch": "resnet", "channels": 1, "image_size": 32, "width": 32, "depth": 2}),
    "MNIST_ResNet_zeros": ("MNIST_ResNet_zeros", {}),
    "MNIST_UNet_zeros": ("MNIST_UNet_zeros", {}),
}
DEFAULT_BATCH = {"cpu": {"small": 128, "MNIST_ResNet_zeros": 16, "MNIST_UNet_zeros": 16}}
DEFAULT_STEPS = {"cpu": {"small": 10, "MNIST_ResNet_zeros": 1, "MNIST_UNet_zeros": 2}}


def run_one(name: str, batch_size: int | None, steps: int | None, repeats: int) -> dict:
    import jax
    import numpy as np

    import ellsjax as ej
    from ellsjax import nets, training

    backend = jax.default_backend()
    preset, overrides = CONFIGS[name]
    net = nets.preset(preset).net if preset else nets.NetConfig(**overrides)
    b = batch_size or DEFAULT_BATCH.get(backend, {}).get(name, 128)
    k = steps or DEFAULT_STEPS.get(backend, {}).get(name, 20)
    cfg = training.TrainConfig(steps=1, batch_size=b)
    images, labels = ej.data.load("mnist", image_size=net.image_size)
    images, labels = training._check_data(net, images, labels)

    t0 = time.perf_counter()
    graphdef, state = training.init_state(net, cfg)
    jax.block_until_ready(state.params)
    init_s = time.perf_counter() - t0
    step = training.make_train_step(graphdef, cfg, conditional=net.conditional)
    n = images.shape[0]

    def batch(s):
        idx = training.batch_indices(s, n=n, batch_size=b, seed=0)
        return images[idx], labels[idx]

    t0 = time.perf_counter()
    compiled = step.lower(state.params, state.opt_state, state.ema, batch(0), state.key).compile()
    compile_s = time.perf_counter() - t0

    params, opt_state, ema = state.params, state.opt_state, state.ema
    s = 0

    def run(count):
        nonlocal params, opt_state, ema, s
        loss = None
        for _ in range(count):
            params, opt_state, ema, loss = compiled(params, opt_state, ema, batch(s),
                                                    training._fold_in(state.key, np.int32(s)))
            s += 1
        jax.block_until_ready((params, loss))
        return float(loss)

    t0 = time.perf_counter()
    run(1)  # warm-up: first execution (allocations, autotuning on GPUs)
    warmup_s = time.perf_counter() - t0
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss = run(k)
        rates.append(k * b / (time.perf_counter() - t0))
    mem = {}
    try:
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            mem["device_peak_mb"] = round(stats["peak_bytes_in_use"] / 2**20, 1)
    except Exception:  # CPU devices have no memory stats
        pass
    return {
        "config": name, "arch": net.arch, "width": net.width, "depth": net.depth, "image_size": net.image_size,
        "params": nets.count_params(nnx_merge(graphdef, params)), "batch_size": b, "steps_per_repeat": k,
        "repeats": repeats, "images_per_s_median": round(statistics.median(rates), 2),
        "images_per_s_min": round(min(rates), 2), "images_per_s_max": round(max(rates), 2),
        "init_s": round(init_s, 2), "compile_s": round(compile_s, 2), "warmup_step_s": round(warmup_s, 2),
        "last_loss": round(loss, 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), **mem,
    }


def nnx_merge(graphdef, params):
    from flax import nnx

    return nnx.merge(graphdef, params)


def machine_info() -> dict:
    import jax

    dev = jax.devices()[0]
    return {
        "backend": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)),
        "devices": jax.device_count(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
        "jax": jax.__version__, "load_average": list(os.getloadavg()),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated: {', '.join(CONFIGS)}")
    p.add_argument("--batch-size", type=int, default=None, help="override every config's batch size")
    p.add_argument("--steps", type=int, default=None, help="updates per timed repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench_train.json", help="JSON results file")
    _benchmeta.add_record_flag(p)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one config, print JSON
    args = p.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.batch_size, args.steps, args.repeats)))
        return 0
    names = [c for c in args.configs.split(",") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        p.error(f"--configs: unknown {unknown}; known: {', '.join(CONFIGS)}")
    results = []
    for name in names:
        cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--repeats", str(args.repeats)]
        if args.batch_size:
            cmd += ["--batch-size", str(args.batch_size)]
        if args.steps:
            cmd += ["--steps", str(args.steps)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        if r.returncode or not line:
            print(f"{name}: failed\n{r.stderr[-2000:]}", file=sys.stderr)
            return 1
        results.append(json.loads(line[-1][len("RESULT "):]))
        print(f"  done {name}", file=sys.stderr)
    info = machine_info()
    cols = [("config", 20), ("params", 9), ("batch_size", 6), ("images_per_s_median", 10), ("images_per_s_min", 9),
            ("images_per_s_max", 9), ("compile_s", 8), ("init_s", 7), ("peak_rss_mb", 9), ("device_peak_mb", 9)]
    heads = {"config": "config", "params": "params", "batch_size": "batch", "images_per_s_median": "img/s med",
             "images_per_s_min": "min", "images_per_s_max": "max", "compile_s": "compile", "init_s": "init",
             "peak_rss_mb": "RSS MB", "device_peak_mb": "dev MB"}
    print(f"backend {info['backend']} ({info['device']}), {info['cpu_count']} CPUs, jax {info['jax']}, "
          f"load {info['load_average'][0]:.2f}")
    print("  ".join(heads[c].rjust(w) for c, w in cols))
    for r in results:
        print("  ".join(str(r.get(c, "-")).rjust(w) for c, w in cols))
    with open(args.out, "w") as f:
        json.dump({"meta": _benchmeta.meta(), "machine": info, "results": results}, f, indent=1)
    print(f"-> {args.out}")
    if args.record:
        _benchmeta.record(
            "bench_train", title="Training throughput",
            description="Training updates per second of the network configurations, images per second over "
                        f"{args.repeats} timed repeats (`scripts/bench_train.py`).",
            columns=[heads[c] for c, _ in cols], rows=[[r.get(c, "-") for c, _ in cols] for r in results],
            notes=f"backend {info['backend']} ({info['device']}), load average {info['load_average'][0]:.2f} at the end.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
