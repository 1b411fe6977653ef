#!/usr/bin/env python
"""How much of an ELS patch bank pruning could skip, and how much its block bounds do prove.

For queries of a noised held-out image (ELS: circular windows) against every interior ``k×k`` patch of
``--n`` training images, from the exact logits (``z = τ·(‖q‖² − ‖q − a·k‖²)``, ``τ = 1/(2s²)``):

* ``entries``: the fraction of entries within ``margin`` of the query's best logit — what even a
  perfect per-entry method must score (exact mode: ``margin`` = the float32 underflow margin 104; a
  tolerance of ~1e-6 of the mass: ~27);
* per block size (entries ordered into blocks by the library's PCA tree, ``_banks.block_order``):
  ``true``, the fraction of blocks holding at least one such entry (the best any block method can
  do), and ``bound``, the fraction whose upper bound (``_pruning.block_score_bounds``, the bound the
  pruned pass uses) cannot rule them out — per single query, before the union over a tile of queries
  that the pruned pass takes.

Example:
    python scripts/pruning_headroom.py --n 1000 --k 11 --t 0.2,0.5 --blocks 32,128,512 --out headroom.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import ellsjax as ej

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchmeta  # noqa: E402

_banks = importlib.import_module("ellsjax.machines._banks")
_pruning = importlib.import_module("ellsjax.machines._pruning")
_patch = importlib.import_module("ellsjax.machines.patch")
_explain = importlib.import_module("ellsjax.explain")


def headroom(images, held_out, k, ts, blocks, margins, queries, seed=0):
    """One row per ``t`` in ``ts`` for patch size ``k`` (the block orders are built once per ``k``)."""
    rng = np.random.default_rng(seed)
    n, h, w, c = images.shape
    keys = _explain._interior_patches(images, k).reshape(-1, k * k * c).astype(np.float32)  # the ELS bank
    qwin = _patch._window_index(h, w, k, k, "circular")  # [H·W, k·k] the ELS query windows
    norms = np.einsum("nd,nd->n", keys, keys)
    indexed = []
    for b in blocks:
        order = _banks.block_order(keys, b)[: len(keys) // b * b]
        fields = _banks._block_index(keys[order], np.ones(len(order), bool), np.ones(len(order), np.float32), b, rng)
        indexed.append((b, order, _banks.BlockIndex(*(np.asarray(f, np.float32) for f in fields))))
    rows = []
    for t in ts:
        a, s = (float(v) for v in ej.schedules.cosine_legacy()(t))
        x = a * held_out + s * rng.standard_normal(held_out.shape).astype(np.float32)
        q = x.reshape(h * w, c)[qwin].reshape(h * w, k * k * c)
        q = q[rng.choice(len(q), min(queries, len(q)), replace=False)].astype(np.float32)
        tau = 1.0 / (2 * s * s)
        z = tau * (2 * a * (q @ keys.T) - a * a * norms[None])  # τ(‖q‖² − ‖q − a·k‖²)
        zmax = z.max(1, keepdims=True)
        row = {"k": k, "t": t, "entries_total": len(keys), "queries": len(q)}
        for mg in margins:
            row[f"entries_within_{mg:g}"] = float((z >= zmax - mg).mean())
        for b, order, index in indexed:
            upper = tau * np.asarray(_pruning.block_score_bounds(jnp.asarray(q), jnp.full(len(q), a, jnp.float32), index))
            zb = z[:, order].reshape(len(q), -1, b).max(-1)
            assert np.all(upper >= zb - 1e-3 * np.abs(zb).max()), "block bound below a block's best logit"
            for mg in margins:
                row[f"blocks{b}_true_within_{mg:g}"] = float((zb >= zmax - mg).mean())
                row[f"blocks{b}_bound_within_{mg:g}"] = float((upper >= zmax - mg).mean())
        rows.append(row)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--path", default=os.environ.get("ELLSJAX_DATA_DIR", "../shared/data"))
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--k", default="11", help="comma-separated patch sizes")
    p.add_argument("--t", default="0.2,0.5", help="comma-separated noise levels (the paper's schedule)")
    p.add_argument("--blocks", default="32,128,512", help="comma-separated entries per block")
    p.add_argument("--margins", default=f"{_pruning.UNDERFLOW_MARGIN:g},27",
                   help="logit margins below the best (104: float32 underflow, exact mode)")
    p.add_argument("--queries", type=int, default=64, help="query pixels sampled per case")
    p.add_argument("--out", default="pruning_headroom.json")
    _benchmeta.add_record_flag(p)
    args = p.parse_args(argv)
    images, _ = ej.data.load(args.dataset, source="npz", path=args.path, limit=args.n + 1, image_size=args.image_size)
    images = np.asarray(images)
    blocks = [int(v) for v in args.blocks.split(",")]
    margins = [float(v) for v in args.margins.split(",")]
    rows = []
    for k in [int(v) for v in args.k.split(",")]:
        rows += headroom(images[: args.n], images[args.n], k, [float(v) for v in args.t.split(",")], blocks, margins,
                         args.queries)
        print(rows[-1], flush=True)
    with open(args.out, "w") as f:
        json.dump({"meta": _benchmeta.meta(), "host": platform.platform(), "args": vars(args), "rows": rows}, f, indent=1)
    for mg in margins:
        print(f"\nmargin {mg:g}: fraction that must be scored (per query, mean)")
        print("| k | t | entries | " + " | ".join(f"blocks of {b}: true / bound" for b in blocks) + " |")
        print("|---|---|---|" + "---|" * len(blocks))
        for r in rows:
            cells = " | ".join(f"{r[f'blocks{b}_true_within_{mg:g}']:.3f} / {r[f'blocks{b}_bound_within_{mg:g}']:.3f}"
                               for b in blocks)
            print(f"| {r['k']} | {r['t']} | {r[f'entries_within_{mg:g}']:.3f} | {cells} |")
    if args.record:
        for mg in margins:
            _benchmeta.record(
                f"pruning_headroom_margin{mg:g}", title=f"Pruning headroom, margin {mg:g}",
                description="Per single query (before any tile union), the fraction that must be scored: entries "
                            f"within {mg:g} of the best logit, and per block size the blocks holding one (true) and "
                            "the blocks the bounds cannot rule out (bound); `scripts/pruning_headroom.py`.",
                columns=["k", "t", "entries", *(f"blocks of {b}: true / bound" for b in blocks)],
                rows=[[r["k"], r["t"], round(r[f"entries_within_{mg:g}"], 3),
                       *(f"{r[f'blocks{b}_true_within_{mg:g}']:.3f} / {r[f'blocks{b}_bound_within_{mg:g}']:.3f}"
                         for b in blocks)] for r in rows],
                notes=f"{args.n} {args.dataset} images at {args.image_size}×{args.image_size}, {args.queries} query "
                      "pixels of a noised held-out image per case; paper's schedule.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
