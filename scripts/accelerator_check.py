"""Compile ellsjax's programs for TPUs and an H100 on this CPU — no accelerator needed — and export them
for every platform.

For each target (TPU v5e, v4, v5p topologies and an H100; ``--quick``: v5e and the H100), deviceless
compiles (``jax.experimental.topologies``) of: every registered machine's ``_denoise`` on small shapes,
a whole DDIM trajectory with the machine as an argument, the TopK search, pruned streaming, a bank
sharded over 4 devices, and the all-of-CIFAR-10 / all-of-MNIST exact ELS/bbELS steps at k = 5 and 11,
batch 16 and 256, under a 1 GiB chunk budget (``--quick``: one of them). A row fails when its program
does not compile or its temporaries exceed 1.5 × the machine's memory budget (one chunk's worth).
Then ``jax.export`` to ``cpu``, ``cuda``, ``rocm`` and ``tpu`` at once of the small programs, each
serialized and read back. Prints a table, writes JSON (``--json``), exits 1 if any row failed.

Needs ``pip install '.[accelerators]'`` (libtpu; the CUDA plugin without NVIDIA libraries). Example::

    python scripts/accelerator_check.py --quick --json accelerator_check.json
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the CUDA plugin compiles; it must not look for a GPU
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import ellsjax as ej  # noqa: E402
from ellsjax import plan as _plan  # noqa: E402

LIMIT = 1.5  # temporaries allowed, in memory budgets
EXPORT_PLATFORMS = ["cpu", "cuda", "rocm", "tpu"]


def _shapes(tree, sharding=None):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def _small_cases(platform: str):
    """``(name, fn, args, budget)``: every machine's step on 16 images 16×16, a DDIM trajectory, the
    TopK search and pruned streaming (prebuilt banks from small random data)."""
    rng = np.random.default_rng(0)
    data = rng.uniform(-1, 1, (16, 16, 16, 1)).astype(np.float32)
    x = jax.ShapeDtypeStruct((2, 16, 16, 1), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.float32)
    cases = []
    for name in ej.machines.names():
        spec = ej.machines.spec(name)
        shape_only = name != "golddiff"  # GoldDiff pools the data for its proxy
        m = spec.build(jax.ShapeDtypeStruct(data.shape, jnp.float32) if shape_only else data, platform=platform)
        scale = {"size": 3, "side": 3, "width": 1.0, "none": None}[m.scale_kind]
        cases.append((f"denoise {name}", lambda m, x, t, s=scale: m._denoise(x, t, None, s), (m, x, t),
                      m.policy.budget if hasattr(m, "policy") else m.pca.policy.budget))
    els = ej.machines.els(data, platform=platform)
    for label, m in (("TopK search", els.with_search(ej.machines.TopK(1e-3)).prepare((3,))),
                     ("Pruned(0) streaming", els.with_search(ej.machines.Pruned(0.0, block=64)).prepare((3,)))):
        cases.append((f"{label} els", lambda m, x, t: m._denoise(x, t, None, 3), (m, x, t), m.policy.budget))
    bb = ej.machines.bbels(data, platform=platform).prepare((5, 3))
    ts = ej.schedules.paper_times(5)  # 4 steps

    def ddim(m, x):
        return ej.samplers.ddim(m, x, ts, scales=[5, 5, 3, 3])

    cases.append(("DDIM trajectory bbels (4 steps)", ddim, (bb, x), bb.policy.budget))
    return cases


def _compile(target: str, fn, args):
    devs = _plan.compile_devices(target, 1)
    sharding = NamedSharding(Mesh(np.array(devs), ("x",)), P())
    with ej.denoiser.runtime_checks(False):
        compiled = jax.jit(fn).trace(*_shapes(args, sharding)).lower().compile()
    mem = compiled.memory_analysis()
    return float(mem.temp_size_in_bytes), float(mem.argument_size_in_bytes)


def _row(target, name, budget, run):
    t0 = time.perf_counter()
    try:
        temp, args = run()
        ok = temp <= LIMIT * budget
        err = "" if ok else f"temporaries {temp / 2**30:.2f} GiB > {LIMIT} × budget {budget / 2**30:.2f} GiB"
    except Exception as e:  # noqa: BLE001 - a failed compile is a failed row, reported
        temp = args = float("nan")
        ok, err = False, f"{type(e).__name__}: {str(e).splitlines()[0][:240] if str(e) else ''}"
        if os.environ.get("ELLSJAX_CHECK_TRACEBACK"):
            traceback.print_exc()
    row = {"target": target, "program": name, "temp_bytes": temp, "argument_bytes": args, "budget": budget,
           "ok": ok, "error": err, "seconds": round(time.perf_counter() - t0, 2)}
    mark = "ok" if ok else "FAIL"
    print(f"| {target} | {name} | {temp / 2**20:.1f} | {args / 2**20:.1f} | {budget / 2**20:.0f} | {mark} "
          f"{err} | {row['seconds']} |", flush=True)
    return row


def _dataset_cases(quick: bool):
    shapes = {"cifar10": (50_000, 32, 32, 3), "mnist": (60_000, 28, 28, 1)}
    if quick:
        return [("els", 5, "cifar10", shapes["cifar10"], 256)]
    return [(m, k, d, s, b) for d, s in shapes.items() for m in ("els", "bbels") for k in (5, 11) for b in (16, 256)]


def _export(name, fn, args):
    t0 = time.perf_counter()
    try:
        with ej.denoiser.runtime_checks(False):
            exp = jax.export.export(jax.jit(fn), platforms=EXPORT_PLATFORMS)(*_shapes(args))
        back = jax.export.deserialize(exp.serialize())
        ok, err = back.platforms == tuple(EXPORT_PLATFORMS), ""
        size = len(exp.mlir_module_serialized)
    except Exception as e:  # noqa: BLE001
        ok, err, size = False, f"{type(e).__name__}: {str(e).splitlines()[0][:240] if str(e) else ''}", 0
    row = {"program": name, "platforms": EXPORT_PLATFORMS, "ok": ok, "error": err, "module_bytes": size,
           "seconds": round(time.perf_counter() - t0, 2)}
    print(f"| export | {name} | {','.join(EXPORT_PLATFORMS)} | {size / 1e3:.0f} kB | {'ok' if ok else 'FAIL'} {err} |",
          flush=True)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="v5e and H100 only, one all-of-CIFAR-10 case")
    p.add_argument("--targets", default=None, help="comma-separated targets (default: v5e,v4,v5p,h100)")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    targets = args.targets.split(",") if args.targets else (["v5e", "h100"] if args.quick else
                                                             ["v5e", "v4", "v5p", "h100"])
    for t in targets:
        try:
            _plan.compile_devices(t, 1)
        except Exception as e:  # noqa: BLE001
            raise SystemExit(f"accelerator_check: cannot compile for {t} here ({e}); "
                             "pip install '.[accelerators]'") from None
    print(f"jax {jax.__version__}; deviceless compiles; a row fails above {LIMIT} × the machine's chunk budget")
    print("| target | program | temporaries (MiB) | arguments (MiB) | budget (MiB) | result | s |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for target in targets:
        platform = _plan.TARGETS[target].platform
        for name, fn, fargs, budget in _small_cases(platform):
            rows.append(_row(target, name, budget, lambda fn=fn, fargs=fargs: _compile(target, fn, fargs)))

        def sharded(target=target):
            pl = _plan.plan("els", scale=3, images=(64, 16, 16, 1), batch=2, target=target, devices=4)
            if not pl.fits:
                raise RuntimeError(pl.note or "does not fit")
            return pl.temp_bytes, pl.argument_bytes

        rows.append(_row(target, "sharded els bank (4 devices)", ej.machines.memory_budget_for(platform), sharded))
        if target in ("v5e", "h100"):
            for m, k, d, shape, b in _dataset_cases(args.quick):
                def big(m=m, k=k, shape=shape, b=b, target=target):
                    pl = _plan.plan(m, scale=k, images=shape, batch=b, target=target, memory_budget=2**30)
                    if not pl.fits:
                        raise RuntimeError(pl.note or "exceeds device memory")
                    return pl.temp_bytes, pl.argument_bytes

                rows.append(_row(target, f"{m} k={k} all of {d} ({shape[0]:,}) B={b}", 2**30, big))
    print("\n| export | program | platforms | module | result |\n|---|---|---|---|---|")
    exports = [_export(name, fn, fargs) for name, fn, fargs, _ in _small_cases("cpu")]
    failed = [r for r in rows + exports if not r["ok"]]
    print(f"\n{len(rows)} compiles, {len(exports)} exports; {len(failed)} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"jax": jax.__version__, "date": time.strftime("%Y-%m-%d"), "compiles": rows,
                       "exports": exports}, f, indent=1, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
