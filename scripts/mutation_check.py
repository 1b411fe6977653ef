"""A short mutation check: do the tests catch one-line defects in the library?

Each mutation replaces one line of the library (a string that must occur exactly once in its file)
in a temporary copy of the repository and runs the tests that should catch it there; a mutation is
*caught* when those tests fail. The copy is made once; each mutation is applied, run and undone in
turn. Prints a table (mutation, tests run, caught?) and writes the results as JSON.

Usage:
    python scripts/mutation_check.py [--repo DIR] [--only NAME,...] [--tests PYTEST_ARGS] [--json OUT]

``--repo`` (default: this repository) may be another checkout, e.g. an older commit checked out in
a temporary directory: the mutations then run against its own code and its own tests (a mutation
whose line that version lacks is reported as ``n/a``). ``--tests`` replaces every selected
mutation's test selection (space-separated pytest arguments; the script's own test uses it to keep
one run tiny).

A run of all mutations takes minutes (each runs its test files in a fresh interpreter).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]


class Mutation(NamedTuple):
    """One line of ``path`` (``old``, exactly once) replaced by ``new``; ``tests`` the pytest
    arguments that should catch it; ``what`` the defect in words."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    what: str


MUTATIONS: tuple[Mutation, ...] = (
    # the four the suite missed (issue 27), and the cross-device merge its sharded tests missed
    Mutation("merge-across-rescale", "ellsjax/kernel.py",
             "        jax.lax.psum(stats.total * c, axis_name),",
             "        jax.lax.psum(stats.total, axis_name),",
             ("tests/test_scaleout.py", "tests/test_multihost.py"),
             "the cross-device merge adds the normalisers without rescaling them to the global max"),
    Mutation("grid-upper-median", "ellsjax/calibration.py",
             "lower_median = np.sort(best, axis=1)[:, (b - 1) // 2]",
             "lower_median = np.sort(best, axis=1)[:, b // 2]",
             ("tests/test_calibration.py", "-k", "grid"),
             "grid calibration takes the upper median over seeds"),
    Mutation("pruning-never-prunes", "ellsjax/machines/_pruning.py",
             "UNDERFLOW_MARGIN = 104.0", "UNDERFLOW_MARGIN = 1e30",
             ("tests/test_pruning.py",),
             "exact pruning never finds a block invisible (same results, no block skipped)"),
    Mutation("provenance-height", "ellsjax/machines/patch.py",
             "PixelProvenance(ids // (h * w), pos // w, pos % w,",
             "PixelProvenance(ids // (h * w), pos // h, pos % h,",
             ("tests/test_explain.py", "-k", "provenance"),
             "provenance decodes row/column with the height instead of the width"),
    # ones the suite caught before
    Mutation("merge-stats-rescale", "ellsjax/kernel.py",
             "        s1.total * c1 + s2.total * c2,",
             "        s1.total + s2.total * c2,",
             ("tests/test_kernel.py",),
             "the chunk merge does not rescale the first part's normaliser"),
    Mutation("els-window-offset", "ellsjax/machines/patch.py",
             "    r = np.arange(h)[:, None, None, None] + np.arange(kh)[None, None, :, None] - kh // 2",
             "    r = np.arange(h)[:, None, None, None] + np.arange(kh)[None, None, :, None]",
             ("tests/test_machines.py", "-k", "matches_dense_reference"),
             "ELS windows start at the pixel instead of being centered on it"),
    Mutation("ddim-noise-level", "ellsjax/samplers/_ddim.py",
             "    x_next = a[i + 1] * x0 + s[i + 1] * eps",
             "    x_next = a[i + 1] * x0 + s[i] * eps",
             ("tests/test_samplers.py",),
             "DDIM re-noises with the current step's noise level instead of the next one's"),
    Mutation("pca-mask-transposed", "ellsjax/machines/pca.py",
             "        keep = (mag >= threshold * jnp.max(mag)).T",
             "        keep = mag >= threshold * jnp.max(mag)",
             ("tests/test_denoisers_extra.py", "-k", "pca"),
             "the PCA rule (the release's global threshold) reads its neighbourhoods transposed"),
    Mutation("bank-multiplicities", "ellsjax/machines/_banks.py",
             "            out_lc[bi, gi, : len(keys)] = np.log(counts)",
             "            out_lc[bi, gi, : len(keys)] = 0.0",
             ("tests/test_machines.py", "-k", "deduplicat"),
             "deduplicated bank entries lose their multiplicities"),
    Mutation("checkpoint-fallback", "ellsjax/training.py",
             "        for step in reversed(steps):",
             "        for step in reversed(steps[-1:]):",
             ("tests/test_reliability.py", "-k", "checkpoint"),
             "loading does not fall back to an older checkpoint when the newest is unreadable"),
    # what the tests added for issue 27 look at: the CLI and the experiment drivers
    Mutation("cli-sample-seed", "ellsjax/cli/_sample.py",
             "        x_start = np.asarray(jax.random.normal(jax.random.key(args.seed), (args.num_samples, *machine.image_shape)))",
             "        x_start = np.asarray(jax.random.normal(jax.random.key(args.seed + 1), (args.num_samples, *machine.image_shape)))",
             ("tests/test_cli.py", "-k", "tiny"),
             "`ellsjax sample` draws its noise from another key than --seed"),
    Mutation("cli-sample-label", "ellsjax/cli/_sample.py",
             "        samples = _draw(machine, x_start, ts, scales=scales, label=args.label, batch_size=args.batch_size,",
             "        samples = _draw(machine, x_start, ts, scales=scales, label=None, batch_size=args.batch_size,",
             ("tests/test_cli.py", "-k", "tiny"),
             "`ellsjax sample --class` samples without the class"),
    Mutation("reproduce-eval-noise", "ellsjax/reproduce.py",
             "    x_eval = jax.random.normal(jax.random.key(0), (p.eval_seeds, *shape))",
             "    x_eval = jax.random.normal(jax.random.key(1), (p.eval_seeds, *shape))",
             ("tests/test_reproduce.py", "-k", "smoke_outputs"),
             "the experiment evaluates on other noise than it reports"),
    Mutation("locality-r2-swapped", "ellsjax/locality.py",
             "        r2 = _ev.r_squared(s, ref)",
             "        r2 = _ev.r_squared(ref, s)",
             ("tests/test_locality.py", "-k", "smoke"),
             "the locality table's R² normalises by the denoiser's variance instead of the network's"),
)


def _copy(repo: Path, dest: Path) -> Path:
    ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache")
    shutil.copytree(repo, dest, ignore=ignore)
    return dest


def run_one(m: Mutation, root: Path, tests: tuple[str, ...], timeout: float) -> dict:
    """Apply ``m`` in the copy ``root``, run ``tests`` there, undo; returns the row."""
    path = root / m.path
    row = {"mutation": m.name, "what": m.what, "file": m.path, "tests": " ".join(tests)}
    text = path.read_text() if path.is_file() else ""
    if text.count(m.old) != 1:
        return {**row, "caught": None, "status": "n/a (line not found once)", "seconds": 0.0}
    path.write_text(text.replace(m.old, m.new))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                           cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        status = {0: "passed", 1: "failed"}.get(r.returncode, f"pytest exit {r.returncode}")
        tail = [line for line in r.stdout.splitlines() if line.strip()][-1:]
        detail = tail[0] if tail else r.stderr.strip()[-200:]
    except subprocess.TimeoutExpired:
        status, detail = "timeout", f"over {timeout:.0f} s"
    finally:
        path.write_text(text)
    # caught: a test failed (an error while collecting counts too: the defect did not go unnoticed)
    return {**row, "caught": status != "passed", "status": status, "detail": detail,
            "seconds": round(time.perf_counter() - t0, 1)}


def check_imports_copy(root: Path) -> None:
    """Refuse to run unless a fresh interpreter in ``root`` imports ellsjax from ``root``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", "import ellsjax; print(ellsjax.__file__)"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=120)
    got = Path(r.stdout.strip()).resolve()
    if r.returncode != 0 or root.resolve() not in got.parents:
        raise SystemExit(f"the copy in {root} imports ellsjax from {r.stdout.strip() or r.stderr[-500:]}")


def format_table(rows: list[dict]) -> str:
    width = max(len("mutation"), *(len(r["mutation"]) for r in rows))
    twidth = max(len("tests"), *(len(r["tests"]) for r in rows))
    lines = [f"{'mutation':<{width}}  {'tests':<{twidth}}  caught", f"{'-' * width}  {'-' * twidth}  ------"]
    for r in rows:
        caught = {True: "yes", False: "NO", None: "n/a"}[r["caught"]]
        lines.append(f"{r['mutation']:<{width}}  {r['tests']:<{twidth}}  {caught} ({r['status']}, {r['seconds']} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout to mutate (default: this one)")
    parser.add_argument("--only", default=None, help="comma-separated mutation names (default: all)")
    parser.add_argument("--tests", default=None, help="pytest arguments replacing every mutation's own selection")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mutation's test run")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args(argv)
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name}: {m.what} ({m.path}; {' '.join(m.tests)})")
        return 0
    chosen = list(MUTATIONS)
    if args.only is not None:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        known = {m.name for m in MUTATIONS}
        if unknown := [n for n in names if n not in known]:
            parser.error(f"--only: unknown mutation(s) {unknown}; known: {sorted(known)}")
        chosen = [m for m in MUTATIONS if m.name in names]
    override = None if args.tests is None else tuple(shlex.split(args.tests))
    repo = args.repo.resolve()
    if not (repo / "ellsjax" / "__init__.py").is_file():
        parser.error(f"--repo: {repo} is not an ellsjax checkout")
    rows = []
    with tempfile.TemporaryDirectory(prefix="ellsjax-mutation-") as tmp:
        root = _copy(repo, Path(tmp) / "repo")
        check_imports_copy(root)
        for m in chosen:
            row = run_one(m, root, override or m.tests, args.timeout)
            print(f"{row['mutation']}: {row['status']} ({row['seconds']} s)", file=sys.stderr, flush=True)
            rows.append(row)
    print(format_table(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"repo": str(repo), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
