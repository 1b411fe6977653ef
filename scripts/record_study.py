#!/usr/bin/env python
"""Record a finished ``paper-cpu`` study (``ellsjax reproduce --preset paper-cpu --out DIR``) on the docs'
benchmarks page: the paper's table at CPU scale, every member's full machine table, and the attention
study, each as a table in ``docs/benchmarks/results/`` (``scripts/_benchmeta.py``), with the command that
made the runs, their date, the hardware and the jax version.

Usage:
    python scripts/record_study.py runs/paper-cpu --record   # after `ellsjax reproduce --preset paper-cpu`
    python scripts/record_study.py runs/paper-cpu            # print the tables only
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchmeta  # noqa: E402


def _run_date(path: Path) -> str:
    t = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc)
    return t.strftime("%Y-%m-%d %H:%M UTC")


def _r(v) -> str:
    return "—" if v is None else f"{v:.3f}"


def tables(root: Path) -> list[tuple[str, dict]]:
    """``[(name, record kwargs)]`` for the study in ``root``."""
    study = json.loads((root / "results.json").read_text())
    if study.get("study") is None or "rows" not in study:
        raise SystemExit(f"{root}: not a finished table study (results.json without 'rows')")
    name = study["study"]
    out = []
    cols = ["dataset", "architecture", "size", "machine", "median r", "IS median r", "beats IS", "best variant",
            "paper", "wall (min)"]
    rows = [[r["dataset"], r["architecture"], f"{r['image_size']}px", r["machine"], _r(r["median_r"]),
             _r(r["is_median_r"]), f"{r['frac_beats_is']:.0%}",
             "—" if r["best_variant"] is None else f"{r['best_variant']} {_r(r['best_variant_median_r'])}",
             "—" if r["paper_median_r"] is None else f"{r['paper_median_r']:.2f}", f"{r['wall_s'] / 60:.1f}"]
            for r in study["rows"]]
    out.append((name.replace("-", "_"), {
        "title": f"The paper's table at CPU scale ({name})",
        "description": "Median Pearson r between a trained network's samples and its grid-calibrated machine's "
                       "(ELS for circular, bbELS for zero padding), from the same noise on 100 evaluation seeds, "
                       "against the ideal score (IS); best variant: the best soft-window or mixture machine. "
                       f"Paper: {study['paper_source']} (larger networks and images: orientation only). Wall: "
                       "each run's own train + calibrate + evaluate time.",
        "columns": cols, "rows": rows, "date": _run_date(root / "results.json")}))
    for row in study["rows"]:
        run_dir = next(p for p in root.rglob(f"{row['run']}/results.json"))
        res = json.loads(run_dir.read_text())
        mcols = ["machine", "schedule", "median r", "mean r", "median R²", "median MSE", "beats IS"]
        mrows = [[v["machine"], v["schedule"], _r(v["summary"]["machine"]["pearson_r"]["median"]),
                  _r(v["summary"]["machine"]["pearson_r"]["mean"]), _r(v["summary"]["machine"]["r_squared"]["median"]),
                  f"{v['summary']['machine']['mse']['median']:.4f}", f"{v['summary']['frac_beats_baseline']:.0%}"]
                 for v in res["evaluations"].values()]
        t = res["timings"]
        notes = (f"{res['description']}. IS median r {_r(row['is_median_r'])}. Timings: "
                 + ", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in t.items()) + ".")
        out.append((f"{name.replace('-', '_')}_{row['run'].replace('-', '_')}", {
            "title": f"{row['run']}: every machine against its network",
            "description": f"The `{row['run']}` member of `{name}`: every machine the preset evaluates, against the "
                           "network's samples from the same noise.",
            "columns": mcols, "rows": mrows, "notes": notes, "date": _run_date(run_dir)}))
    for sub in root.iterdir():
        f = sub / "results.json"
        if not f.is_file():
            continue
        att = json.loads(f.read_text())
        if att.get("attention", False) is False or "median_r" not in att:
            continue
        acols = ["machine", "with attention", "without attention", "drop"]
        arows = [[k, _r(v["with_attention"]), _r(v["without_attention"]), f"{v['drop']:+.3f}"]
                 for k, v in att["median_r"].items()]
        a = att["attention"]
        bands = "; ".join(f"{k}: mean {b['mean']:.4f}, border {b['border']:.4f}, interior "
                          f"{'—' if b['interior'] is None else format(b['interior'], '.4f')}"
                          for k, b in att["error_bands"].items())
        notes = f"Per-pixel disagreement (1 − r split over the pixels, ellsjax.studies.disagreement_map): {bands}."
        if a is not None:
            notes += (f" Attention reach: mean {a['mean_distance_px']:.2f} px (uniform attention "
                      f"{a['uniform_distance_px']:.2f} px), mass beyond the patch radius {a['patch_radius']}: "
                      f"{a['mass_beyond_patch']:.3f} (uniform {a['uniform_mass_beyond_patch']:.3f}); correlation across "
                      f"pixels of the excess reach (minus uniform attention's) with the extra disagreement "
                      f"{_r(a['corr_excess_distance_vs_extra_error'])}, with the attention network's disagreement "
                      f"{_r(a['corr_excess_distance_vs_error_with'])}.")
        out.append((att["study"].replace("-", "_"), {
            "title": f"What attention does to the theory ({att['study']})",
            "description": att["description"] + ". Median Pearson r, 100 evaluation seeds per network.",
            "columns": acols, "rows": arows, "notes": notes, "date": _run_date(f)}))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="the study's output directory (ellsjax reproduce --preset paper-cpu --out ROOT)")
    p.add_argument("--command", default=None,
                   help="the command that made the runs (default: ellsjax reproduce --preset <study> --out ROOT)")
    _benchmeta.add_record_flag(p)
    args = p.parse_args(argv)
    root = Path(args.root)
    study = json.loads((root / "results.json").read_text())["study"]
    command = args.command or f"ellsjax reproduce --preset {study} --out {args.root}"
    for name, t in tables(root):
        print(f"## {t['title']}\n")
        print("| " + " | ".join(t["columns"]) + " |")
        for row in t["rows"]:
            print("| " + " | ".join(str(c) for c in row) + " |")
        print()
        if args.record:
            meta = {**_benchmeta.meta(), "command": command, "date": t["date"],
                    "source": f"the run's results.json, recorded by {_benchmeta.meta()['command']}"}
            _benchmeta.record(name, title=t["title"], description=t["description"], columns=t["columns"],
                              rows=t["rows"], notes=t.get("notes", ""), run_meta=meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
