"""``ellsjax explain``: provenance maps and creativity measures of samples written by ``ellsjax sample``.

The samples file (``OUT/samples.npz``) holds the starting noise, the time grid and the scales; its
``config.json`` the machine and training set. ``explain`` rebuilds the machine, replays the same
DDIM trajectory with provenance (:func:`ellsjax.explain.provenance`), and writes
``provenance.png`` (sample, source map, max-weight and entropy maps, top source patches),
``provenance.npz`` (the maps of every step) and ``creativity.json`` (per-sample measures), and
prints a summary; ``--compare is,bbels`` also samples other machines from the same noise and
prints a creativity table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ellsjax.cli._common import HelpFormatter, add_overwrite, claim_outputs, machine_spec, output_dir, stage
from ellsjax.cli._common import fail as _fail

__all__ = ["register"]

_OUTPUTS = ["provenance.png", "provenance.npz", "creativity.json"]


def register(sub) -> None:
    """Add the ``explain`` subcommand to an ``argparse`` subparsers object."""
    s = sub.add_parser(
        "explain",
        help="provenance maps and creativity measures of samples from `ellsjax sample`",
        description=(
            "Replay the DDIM trajectory of samples written by `ellsjax sample` (their samples.npz holds the "
            "starting noise, times and scales; config.json beside it the machine and training set) and record, "
            "per pixel and step, the training image and position of the patch with the most weight, that weight "
            "and the entropy of the weights. Writes OUT/provenance.png, OUT/provenance.npz and "
            "OUT/creativity.json and prints the creativity measures (nearest-image distance and near-copy test, "
            "patch-space distance, Theorem 4.1 consistency, mosaic statistics). Prints a line per stage on "
            "stderr. Outputs are written atomically; an OUT holding another run's outputs is refused unless "
            "--overwrite."
        ),
        formatter_class=HelpFormatter,
    )
    s.add_argument("--samples", required=True, metavar="FILE", help="samples.npz written by `ellsjax sample`")
    s.add_argument("--config", default=None, metavar="FILE", help="its config.json (default: next to FILE)")
    s.add_argument("--out", default=None, help="output directory (default: the samples' directory)")
    s.add_argument("--step", type=int, default=-1,
                   help="the step whose provenance is drawn and measured (-1: the last, least noisy)")
    s.add_argument("--max-samples", type=int, default=4, help="samples drawn in the figure")
    s.add_argument("--top", type=int, default=4, help="source patches shown per sample")
    s.add_argument("--patch-size", type=int, default=3,
                   help="patch size of the patch-space distance and the consistency condition")
    s.add_argument("--compare", default=None, metavar="M1,M2",
                   help="also sample these machines (e.g. is,bbels) from the same noise and print a creativity table")
    add_overwrite(s)
    s.set_defaults(func=_cmd_explain)


def _load(args):
    path = Path(args.samples)
    if not path.is_file():
        _fail(f"--samples: no such file {path}")
    cfg_path = Path(args.config) if args.config else path.parent / "config.json"
    if not cfg_path.is_file():
        _fail(f"--config: no config.json at {cfg_path} (written by `ellsjax sample` next to samples.npz)")
    import zipfile
    import zlib

    try:
        with np.load(path, allow_pickle=False) as z:
            missing = {"samples", "x_start", "ts", "scales"} - set(z.files)
            if missing:
                _fail(f"--samples: {path} lacks {sorted(missing)}; write it with `ellsjax sample`")
            data = {k: np.asarray(z[k]) for k in z.files}
    except (OSError, ValueError, EOFError, AttributeError, zipfile.BadZipFile, zlib.error) as e:
        _fail(f"--samples: cannot read {path} ({type(e).__name__}: {e}); it is not a complete samples.npz of "
              "`ellsjax sample`")
    try:
        cfg = json.loads(cfg_path.read_text())
        for key in ("machine", "dataset", "n_train", "image_shape"):
            cfg[key]  # noqa: B018 (presence check)
    except (OSError, ValueError, TypeError, KeyError) as e:
        _fail(f"--config: cannot read {cfg_path} ({type(e).__name__}: {e}); it is not a config.json of `ellsjax sample`")
    if "model" in cfg:
        _fail("--samples: these samples come from a trained network; provenance needs an analytic machine")
    return data, cfg


def _cmd_explain(args: argparse.Namespace) -> int:
    import ellsjax as ej

    data, cfg = _load(args)
    for opt in ("max_samples", "top", "patch_size"):
        if getattr(args, opt) <= 0:
            _fail(f"--{opt.replace('_', '-')} must be positive, got {getattr(args, opt)}")
    names = [n.strip() for n in args.compare.split(",") if n.strip()] if args.compare else []
    specs = {n: machine_spec(n, flag="--compare") for n in [cfg["machine"], *names]}
    without = [n for n, s in specs.items() if not s.provenance]
    if without:
        able = [s.name for s in ej.machines.specs() if s.provenance]
        _fail(f"machine {without[0]!r} has no provenance; use one of {', '.join(able)}")
    out = output_dir(args.out if args.out else Path(args.samples).parent)
    claim_outputs(out, _OUTPUTS, overwrite=args.overwrite)
    t0 = time.perf_counter()
    try:
        stage(f"explain: loading {cfg['n_train']} {cfg['dataset']} training images")
        images, labels = ej.data.load(
            cfg["dataset"], split=cfg.get("split", "train"), source=cfg.get("source", "bundled"),
            path=cfg.get("path"), data_dir=cfg.get("data_dir"),
            image_size=cfg.get("image_size", cfg["image_shape"][0]), limit=cfg["n_train"],
        )
        label = cfg.get("label")
        schedule = cfg.get("schedule_name", "cosine_legacy")

        def build(name, options):
            return specs[name].build(images, labels if label is not None else None, schedule=schedule, **options)

        machine = build(cfg["machine"], cfg.get("machine_options", {}))
        scales = [k.item() for k in data["scales"]] if machine.needs_scale else None
        stage(f"explain: replaying {data['x_start'].shape[0]} samples of {cfg['machine']} over {len(data['ts']) - 1} "
              "steps with provenance")
        prov = ej.explain.provenance(machine, data["x_start"], data["ts"], scales=scales, label=label)
        nsteps = prov.image.shape[0]
        if not -nsteps <= args.step < nsteps:
            _fail(f"--step: must index one of the {nsteps} steps, got {args.step}")
        samples = np.asarray(prov.samples)
        drift = float(np.max(np.abs(samples - data["samples"])))
        stage("explain: creativity measures (nearest training images and patches)")
        measures = ej.explain.creativity(samples, images, patch_size=args.patch_size, provenance=prov, step=args.step)
        table = None
        if names:
            # the explained machine's row is the replay above; the others sample from the same noise
            ms = {n: build(n, {}) for n in names if n != cfg["machine"]}
            if scales is None and any(m.needs_scale for m in ms.values()):
                _fail("--compare: the samples carry no scales (an IS run); compare from samples of a patch machine")
            if ms:
                stage(f"explain: sampling {', '.join(ms)} from the same noise for the comparison")
            rows = ej.explain.compare(ms, data["x_start"], data["ts"], scales=scales, images=images, label=label,
                                      patch_size=args.patch_size) if ms else {}
            own = {c: float(np.mean(measures[c])) for c in ej.explain.TABLE_COLUMNS}
            table = {n: own if n == cfg["machine"] else rows[n] for n in names}
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        _fail(str(e))

    from ellsjax import _io

    stage(f"explain: writing {out}")
    with _io.atomic_path(out / "provenance.png") as tmp:
        ej.explain.plot_provenance(prov, images, tmp, step=args.step, max_samples=args.max_samples, top=args.top)
    _io.save_npz(
        out / "provenance.npz", samples=samples, ts=np.asarray(prov.ts), image=np.asarray(prov.image),
        row=np.asarray(prov.row), col=np.asarray(prov.col), weight=np.asarray(prov.weight),
        entropy=np.asarray(prov.entropy),
    )
    report = {
        "machine": cfg["machine"], "step": args.step, "t": float(prov.ts[args.step % nsteps]),
        "patch_size": args.patch_size, "copy_ratio": ej.explain.COPY_RATIO,
        "consistency_tolerance": ej.explain.CONSISTENCY_TOLERANCE, "replay_max_abs_diff": drift,
        "per_sample": {k: np.asarray(v).tolist() for k, v in measures.items()},
        "mean": {k: float(np.mean(v)) for k, v in measures.items() if k != "nearest"},
        "compare": table, "seconds": round(time.perf_counter() - t0, 2),
    }
    _io.write_json(out / "creativity.json", report)
    print(f"replayed {samples.shape[0]} samples of {cfg['machine']} (max |diff| to the saved samples {drift:.2g})")
    print(ej.explain.format_table({cfg["machine"]: report["mean"]}))
    if table is not None:
        print(f"\nsame noise ({samples.shape[0]} seeds), {len(images)} training images:")
        print(ej.explain.format_table(table))
    print(f"-> {out / 'provenance.png'}, {out / 'provenance.npz'}, {out / 'creativity.json'}")
    return 0
