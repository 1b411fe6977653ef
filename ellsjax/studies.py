r"""Studies over several reproduction runs: the paper's table at CPU scale, and what attention does.

A :class:`Study` runs its members (:mod:`ellsjax.reproduce` presets, or other studies) into
``OUT/<member>`` — a member finished with the same settings is reused
(:func:`ellsjax.reproduce.finished`), so a study can be resumed and its members can be run one by one
first — and then writes its own ``OUT/results.json``, ``OUT/report.md`` and figures:

* ``kind="attention"`` (:data:`STUDIES` ``attention-cpu``): two networks trained alike, one with
  self-attention and one without (the DDPM UNet with ``attn`` at full resolution and its
  attention-free control, ``mid_attn=False``), each explained by its grid-calibrated bbELS machine
  (and its soft twin, and bbELS mixed with a whole-image posterior, :func:`ellsjax.machines.mixture`).
  It reports the drop in median Pearson r, and *where* the network and the machine disagree: the
  per-pixel disagreement map ``E(p)`` of each network (``1 − r`` split over the pixels,
  :func:`disagreement_map`), its border band against the interior, and, for the attention network,
  how far each pixel's attention reaches (``D(p) = Σ_q A_{pq}‖p − q‖``, averaged over its
  full-resolution attention layers, seeds and times; and ``D(p) − D_uniform(p)``, the reach beyond
  what uniform attention has from that pixel) with the Pearson correlation across pixels between
  the reach and the extra disagreement ``E_attn − E_conv`` (positive: the machine fails more where
  attention reaches further).
* ``kind="table"`` (``paper-cpu``): the paper's table shape, one row per (dataset, architecture):
  the machine's median r, IS's median r and the fraction of seeds on which the machine beats IS,
  with the paper's reported values alongside, one figure (network | machine | IS rows from the same
  noise, per row) and ``results.json``.

Example:
    >>> sorted(STUDIES)
    ['attention-cpu', 'attention-smoke', 'paper-cpu', 'paper-smoke']
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ellsjax import _io
from ellsjax import presets as _presets_mod
from ellsjax import reproduce as _rep

__all__ = ["Study", "STUDIES", "study", "run", "attention_report", "paper_table", "disagreement_map", "PAPER_TABLE"]

#: Median Pearson r between the ELS machine and the network as Kamb & Ganguli report it (arXiv
#: 2412.20292, Table 1, as quoted in ellsjax issue 24): best model per dataset, their ResNets, and the
#: UNet with self-attention on CIFAR-10. Shown beside the CPU-scale rows for orientation only: the
#: paper's networks, resolutions and training lengths differ.
PAPER_TABLE: Mapping[tuple[str, str], float] = {
    ("mnist", "resnet"): 0.94,
    ("fashion_mnist", "resnet"): 0.90,
    ("cifar10", "resnet"): 0.90,
    ("mnist", "best"): 0.94,
    ("fashion_mnist", "best"): 0.94,
    ("cifar10", "best"): 0.95,
    ("cifar10", "unet+attention"): 0.77,
}


@dataclasses.dataclass(frozen=True)
class Study:
    """Several runs and what is computed across them.

    Attributes:
        name: the study's name.
        kind: ``"attention"`` (two members: with and without attention) or ``"table"``.
        members: names of :data:`ellsjax.reproduce.PRESETS` or of other :data:`STUDIES`.
        figure_seeds: seeds per row of the table's figure.
        attention_times: times ``t`` at which the attention study reads the attention weights.
        description: one line for the report.
    """

    name: str
    kind: str
    members: tuple[str, ...]
    figure_seeds: int = 6
    attention_times: tuple[float, ...] = (0.8, 0.5, 0.2)
    description: str = ""

    def __post_init__(self):
        if self.kind not in ("attention", "table"):
            raise ValueError(f"kind: must be 'attention' or 'table', got {self.kind!r}")
        if self.kind == "attention" and len(self.members) != 2:
            raise ValueError(f"members: an attention study compares two runs (with, without), got {self.members}")


def _studies() -> dict[str, Study]:
    return {
        "attention-smoke": Study(
            name="attention-smoke", kind="attention", members=("attention-smoke-with", "attention-smoke-without"),
            figure_seeds=2, attention_times=(0.5,),
            description="plumbing check of the attention study (8x8 DDPM UNets trained for a few steps)"),
        "attention-cpu": Study(
            name="attention-cpu", kind="attention", members=("attention-cpu-with", "attention-cpu-without"),
            description="DDPM UNet with self-attention (16x16 and 8x8) against the same UNet without, on 16x16 "
                        "MNIST: bbELS calibrated on each, the drop in r, and where the disagreement sits"),
        "paper-smoke": Study(
            name="paper-smoke", kind="table", members=("smoke", "attention-smoke"), figure_seeds=2,
            description="plumbing check of the paper's table (smoke-sized members)"),
        "paper-cpu": Study(
            name="paper-cpu", kind="table",
            members=("mnist-cpu", "fashion-mnist-cpu", "cifar10-cpu", "attention-cpu"),
            description="the paper's table at CPU scale: MNIST (circular ResNet), Fashion-MNIST and CIFAR-10 "
                        "(class-conditional zero-padded ResNets) and the attention study's two UNets"),
    }


#: The studies by name.
STUDIES: Mapping[str, Study] = _presets_mod.LazyTable(_studies)


def study(name: str) -> Study:
    """Look a study up in :data:`STUDIES`."""
    if name not in STUDIES:
        raise ValueError(f"preset: unknown study {name!r}; known: {', '.join(sorted(STUDIES))}")
    return STUDIES[name]


def run(
    s: Study | str,
    out_dir: str | os.PathLike,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run a study into ``out_dir``: its members into ``out_dir/<member>`` (a finished member with
    the same settings is reused, see :func:`ellsjax.reproduce.finished`), then its own report.

    Returns the study's results (also written to ``out_dir/results.json``; ``report.md`` and
    ``figures/`` beside it).
    """
    s = study(s) if isinstance(s, str) else s
    if not isinstance(s, Study):
        raise TypeError(f"s: expected a Study or a study name, got {type(s).__name__}")
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    members: dict[str, dict[str, Any]] = {}
    walls: dict[str, float] = {}
    for name in s.members:
        t1 = time.perf_counter()
        if name in STUDIES:
            members[name] = run(name, out / name, progress=progress, log=log)
        else:
            done = _rep.finished(name, out / name)
            if done is not None:
                log(f"[{s.name}] reusing the finished run {out / name}")
                members[name] = done
            else:
                members[name] = _rep.run(name, out / name, progress=progress, log=log)
        walls[name] = time.perf_counter() - t1
    if s.kind == "attention":
        res = attention_report(s, out, members, log=log)
    else:
        res = paper_table(s, out, members, log=log)
    res["member_wall_s"] = walls
    res["total_s"] = time.perf_counter() - t0
    _io.write_json(out / "results.json", res)
    log(f"[{s.name}] done in {res['total_s']:.0f} s -> {out / 'report.md'}")
    return res


# --------------------------------------------------------------------------- shared


def _grid_key(res: dict[str, Any]) -> str:
    return next(k for k in res["evaluations"] if k.endswith("-grid") and res["evaluations"][k]["schedule"] == "grid")


def _median_r(row: dict[str, Any], which: str = "machine") -> float:
    return float(row["summary"][which]["pearson_r"]["median"])


def _samples(run_dir: Path, res: dict[str, Any], n: int | None = None) -> dict[str, np.ndarray]:
    """The evaluation seeds' samples of a run (its ``samples.npz``), or, for a run made before that
    file existed, the first ``n`` seeds recomputed exactly as the run made them (same noise, labels,
    schedule): the network, the grid machine and IS."""
    path = run_dir / "samples.npz"
    if path.is_file():
        with np.load(path) as z:
            return {k.replace("_plus_", "+"): z[k][:n] for k in z.files if k != "labels"}
    import jax

    from ellsjax import evaluation as _ev
    from ellsjax import machines as _machines
    from ellsjax import models, training
    from ellsjax.scales import ScaleSchedule

    p = _rep.preset(res["preset"])
    network = models.load(run_dir / "net")
    images, labels = training.load_data(p.net, p.train)
    mlabels = labels if p.net.conditional else None
    n = p.eval_seeds if n is None else min(n, p.eval_seeds)
    x = jax.random.normal(jax.random.key(0), (p.eval_seeds, *network.image_shape))[:n]
    lab = _ev.seed_labels(p.net, max(p.calib_seeds, p.eval_seeds))
    lab = None if lab is None else lab[:n]
    grid = ScaleSchedule.load(run_dir / "scales_grid.json")
    ts = grid.times()
    hard = _machines.build(p.machine, images, mlabels, schedule=network.schedule)
    ideal = _machines.ideal(images, mlabels, schedule=network.schedule)
    return {"network": _ev.sample(network, x, ts, label=lab, batch_size=p.batch_size),
            _grid_key(res): _ev.sample(hard, x, ts, scales=grid.values, label=lab, batch_size=p.batch_size),
            "is": _ev.sample(ideal, x, ts, label=lab, batch_size=p.batch_size)}


def _dataset(res: dict[str, Any]) -> str:
    return res["train"]["dataset"]


def _architecture(net: dict[str, Any]) -> str:
    if net["arch"] == "ddpm-unet":
        attn = bool(net.get("attn")) or net.get("mid_attn", True)
        return "unet+attention" if attn else "unet"
    return net["arch"]


def _describe_arch(net: dict[str, Any]) -> str:
    arch = _architecture(net)
    extra = [net["padding"]] + (["conditional"] if net.get("conditional") else [])
    return f"{arch} ({', '.join(extra)})"


# --------------------------------------------------------------------------- attention


def attention_report(s: Study, out: Path, members: dict[str, dict[str, Any]], *,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """The attention study's analysis of its two finished members (``members[with], members[without]``):
    the drop in median r per machine, per-pixel error maps, and the attention reach (module docstring)."""
    import jax
    import jax.numpy as jnp

    from ellsjax import models, nets

    name_with, name_without = s.members
    res_with, res_without = members[name_with], members[name_without]
    key = _grid_key(res_with)
    drops = {}
    for k in res_with["evaluations"]:
        if k in res_without["evaluations"]:
            a, b = _median_r(res_with["evaluations"][k]), _median_r(res_without["evaluations"][k])
            drops[k] = {"with_attention": a, "without_attention": b, "drop": b - a}
    is_r = {"with_attention": _median_r(res_with["evaluations"][key], "baseline"),
            "without_attention": _median_r(res_without["evaluations"][key], "baseline")}

    maps, band = {}, {}
    samples = {}
    for label, name, res in (("with", name_with, res_with), ("without", name_without, res_without)):
        smp = _samples(out / name, res)
        samples[label] = smp
        for k, v in smp.items():
            if k in ("network", "is"):
                continue
            maps[f"{label}:{k}"] = disagreement_map(smp["network"], v)  # [H, W]
    h, w = maps[f"with:{key}"].shape
    # the border band: pixels within r of an edge, r = half the grid schedule's median patch size
    k_med = int(np.median(res_with["calibration"]["grid"]["scales"]))
    r = k_med // 2
    yy, xx = np.mgrid[:h, :w]
    border = np.minimum(np.minimum(yy, xx), np.minimum(h - 1 - yy, w - 1 - xx)) < max(r, 1)
    for m, e in maps.items():
        band[m] = {"mean": float(e.mean()), "border": float(e[border].mean()),
                   "interior": float(e[~border].mean()) if (~border).any() else None}

    # how far the attention network's attention reaches, per query pixel
    network = models.load(out / name_with / "net")
    model = network.module()
    x0 = jnp.asarray(samples["with"]["network"][: max(2, min(16, len(samples["with"]["network"])))])
    lab = None
    if network.conditional:
        lab = jnp.arange(x0.shape[0]) % network.num_classes
    dist = np.zeros((h, w))
    beyond = np.zeros((h, w))
    count = 0
    pos = np.stack([yy.ravel(), xx.ravel()], -1).astype(np.float64)
    dmat = np.sqrt(((pos[:, None] - pos[None]) ** 2).sum(-1))
    cheb = np.abs(pos[:, None] - pos[None]).max(-1)
    for i, t in enumerate(s.attention_times):
        ab, var = network.schedule.variances(jnp.full((x0.shape[0],), t))
        eps = jax.random.normal(jax.random.key(100 + i), x0.shape)
        xt = jnp.sqrt(ab)[:, None, None, None] * x0 + jnp.sqrt(var)[:, None, None, None] * eps
        tt = jnp.full((x0.shape[0],), t)
        for lh, lw, att in nets.attention_weights(model, xt, tt, lab):
            if (lh, lw) != (h, w):
                continue  # the full-resolution layers: their pixels are the image's
            a = np.asarray(att, np.float64).mean(0)  # [HW, HW]
            dist += (a * dmat).sum(-1).reshape(h, w)
            beyond += (a * (cheb > r)).sum(-1).reshape(h, w)
            count += 1
    attention = None
    if count:
        dist, beyond = dist / count, beyond / count
        # uniform attention's reach: the geometry alone (a corner is far from most pixels), what the
        # excess reach D(p) − D_uniform(p) is measured against
        uniform = dmat.mean(-1).reshape(h, w)
        extra = maps[f"with:{key}"] - maps[f"without:{key}"]
        attention = {
            "layers_times": count, "mean_distance_px": float(dist.mean()),
            "uniform_distance_px": float(uniform.mean()),
            "mass_beyond_patch": float(beyond.mean()),
            "uniform_mass_beyond_patch": float((cheb > r).mean()), "patch_radius": r,
            "corr_distance_vs_extra_error": _pearson(dist, extra),
            "corr_distance_vs_error_with": _pearson(dist, maps[f"with:{key}"]),
            "corr_excess_distance_vs_extra_error": _pearson(dist - uniform, extra),
            "corr_excess_distance_vs_error_with": _pearson(dist - uniform, maps[f"with:{key}"]),
            "corr_beyond_vs_extra_error": _pearson(beyond, extra),
        }
    fig = _error_figure(out / "figures" / "error_maps.png", maps, key, dist if count else None)
    res = {"study": s.name, "description": s.description, "members": list(s.members), "machine_key": key,
           "median_r": drops, "is_median_r": is_r, "error_maps": {m: e.tolist() for m, e in maps.items()},
           "error_bands": band, "attention": attention, "figures": {"error_maps": str(fig.relative_to(out))}}
    _io.write_text(out / "report.md", _attention_markdown(s, res))
    return res


def disagreement_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Where two sets of samples ``[B, H, W, C]`` disagree: ``1 − r`` (Pearson) split over the pixels.

    Each sample is centered and scaled to unit norm (``z``, as Pearson r does), so that
    ``Σ_{p,c} (z_a − z_b)²/2 = 1 − r``; the map is ``H·W·Σ_c (z_a − z_b)²(p)/2`` averaged over the
    samples, whose mean over the pixels is the mean of ``1 − r``. Every sample weighs the same, whatever
    its range (a network sample far outside ``[−1, 1]`` does not dominate, as it would a squared error).

    Example:
        >>> import numpy as np
        >>> a = np.random.default_rng(0).normal(size=(3, 4, 4, 1)); b = a + 0.3 * np.roll(a, 1, axis=1)
        >>> from ellsjax.evaluation import pearson_r
        >>> bool(np.isclose(disagreement_map(a, b).mean(), np.mean(1 - pearson_r(a, b))))
        True
    """
    def unit(x):
        x = np.asarray(x, np.float64)
        x = x - x.mean(axis=(1, 2, 3), keepdims=True)
        norm = np.sqrt(np.sum(x * x, axis=(1, 2, 3), keepdims=True))
        if np.any(norm == 0):
            raise ValueError("a, b: a constant sample has no defined correlation")
        return x / norm

    za, zb = unit(a), unit(b)
    h, w = za.shape[1:3]
    return (h * w * 0.5 * np.sum((za - zb) ** 2, axis=-1)).mean(0)


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    a, b = np.ravel(a) - np.mean(a), np.ravel(b) - np.mean(b)
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return None if den == 0 else float((a * b).sum() / den)


def _error_figure(path: Path, maps: dict[str, np.ndarray], key: str, dist: np.ndarray | None) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = [(f"with attention: net vs {key}", maps[f"with:{key}"]),
              (f"without attention: net vs {key}", maps[f"without:{key}"]),
              ("extra disagreement with attention", maps[f"with:{key}"] - maps[f"without:{key}"])]
    mix = sorted(m for m in maps if m.startswith("with:") and m.endswith("-mixture"))
    if mix:
        panels.append((f"with attention: net vs {mix[0][5:]}", maps[mix[0]]))
    if dist is not None:
        panels.append(("attention reach D(p) (px)", dist))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.1 * len(panels), 3.2))
    for ax, (title, img) in zip(np.atleast_1d(axes), panels, strict=True):
        im = ax.imshow(img, cmap="magma" if "extra" not in title else "coolwarm")
        ax.set_title(title, fontsize=7)
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return _io.save_figure(path, fig, dpi=110)


def _attention_markdown(s: Study, res: dict[str, Any]) -> str:
    lines = [f"# ellsjax study: {s.name}", "", s.description, "",
             "Median Pearson r between each network's samples and the machine's, same noise:", "",
             "| machine | with attention | without attention | drop |", "| --- | --- | --- | --- |"]
    for k, v in res["median_r"].items():
        lines.append(f"| {k} | {v['with_attention']:.3f} | {v['without_attention']:.3f} | {v['drop']:+.3f} |")
    isr = res["is_median_r"]
    lines.append(f"| is | {isr['with_attention']:.3f} | {isr['without_attention']:.3f} | "
                 f"{isr['without_attention'] - isr['with_attention']:+.3f} |")
    lines += ["", "Per-pixel disagreement E(p): 1 − r split over the pixels (samples centered and scaled to unit norm, "
              "E(p) = H·W·Σ_c (z_net − z_machine)²/2, mean over seeds; its mean over pixels is the mean of 1 − r). "
              "Border band: pixels within the grid schedule's median patch radius of an edge:", "",
              "| network: machine | mean | border band | interior |", "| --- | --- | --- | --- |"]
    for m, b in res["error_bands"].items():
        inner = "—" if b["interior"] is None else f"{b['interior']:.4f}"
        lines.append(f"| {m} | {b['mean']:.4f} | {b['border']:.4f} | {inner} |")
    a = res["attention"]
    if a is not None:
        lines += ["", f"Attention reach of the attention network (full-resolution layers, {a['layers_times']} "
                  f"layer×time maps): mean distance {a['mean_distance_px']:.2f} px (uniform attention: "
                  f"{a['uniform_distance_px']:.2f} px); attention mass beyond the machine's patch radius "
                  f"{a['patch_radius']}: {a['mass_beyond_patch']:.3f} (uniform: {a['uniform_mass_beyond_patch']:.3f}). "
                  "Pearson correlation across pixels of the reach D(p) with the extra disagreement E_attn − E_conv: "
                  f"{_fmt(a['corr_distance_vs_extra_error'])}, with E_attn: {_fmt(a['corr_distance_vs_error_with'])}; "
                  "of the excess reach D(p) − D_uniform(p) (the geometry removed) with the extra disagreement: "
                  f"{_fmt(a['corr_excess_distance_vs_extra_error'])}, with E_attn: "
                  f"{_fmt(a['corr_excess_distance_vs_error_with'])}; of the mass beyond the patch with the extra "
                  f"disagreement: {_fmt(a['corr_beyond_vs_extra_error'])}."]
    lines += ["", f"![error maps]({res['figures']['error_maps']})", ""]
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "undefined" if v is None else f"{v:+.3f}"


# --------------------------------------------------------------------------- the table


def paper_table(s: Study, out: Path, members: dict[str, dict[str, Any]], *,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """One row per (dataset, architecture) of the runs under ``members`` (a study member contributes
    its own members' runs): machine median r (grid schedule, and the best soft or mixture variant),
    IS median r, the fraction of seeds on which the machine beats IS, the paper's value; one figure."""
    runs: list[tuple[str, Path, dict[str, Any]]] = []
    for name, res in members.items():
        if name in STUDIES:
            for sub in STUDIES[name].members:
                runs.append((sub, out / name / sub, _rep.finished(sub, out / name / sub) or _load(out / name / sub)))
        else:
            runs.append((name, out / name, res))
    rows = []
    for name, _, res in runs:
        key = _grid_key(res)
        ev = res["evaluations"]
        grid = ev[key]
        variants = {k: _median_r(v) for k, v in ev.items() if k != key and v["machine"].split("+")[0]
                    in (grid["machine"], f"soft-{grid['machine']}")}
        best = max(variants.items(), key=lambda kv: kv[1]) if variants else (None, None)
        dataset, arch = _dataset(res), _architecture(res["net"])
        rows.append({
            "run": name, "dataset": dataset, "architecture": _describe_arch(res["net"]), "machine": grid["machine"],
            "median_r": _median_r(grid), "is_median_r": _median_r(grid, "baseline"),
            "frac_beats_is": float(grid["summary"]["frac_beats_baseline"]),
            "best_variant": best[0], "best_variant_median_r": best[1],
            "paper_median_r": PAPER_TABLE.get((dataset, arch)),
            "wall_s": float(res["timings"]["total_s"]), "num_train_images": res["num_train_images"],
            "image_size": res["net"]["image_size"],
        })
    fig = _table_figure(out / "figures" / "samples.png", runs, s.figure_seeds)
    res = {"study": s.name, "description": s.description, "rows": rows, "figures": {"samples": str(fig.relative_to(out))},
           "paper_source": "Kamb & Ganguli, arXiv 2412.20292, Table 1 (as quoted in ellsjax issue 24)"}
    _io.write_text(out / "report.md", _table_markdown(s, res))
    return res


def _load(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "results.json").read_text())


def _table_figure(path: Path, runs, n: int) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ellsjax import plotting

    fig, axes = plt.subplots(len(runs), 1, figsize=(1.0 * n + 1.6, 3.3 * len(runs)), squeeze=False)
    for ax, (name, run_dir, res) in zip(axes[:, 0], runs, strict=True):
        key = _grid_key(res)
        smp = _samples(run_dir, res, n)
        block = np.concatenate([smp["network"][:n], smp[key][:n], smp["is"][:n]])
        ax.imshow(plotting.image_grid(block, ncols=n), cmap="gray" if block.shape[-1] == 1 else None)
        ax.set_title(f"{name}: rows network | {key} | IS", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return _io.save_figure(path, fig, dpi=100)


def _table_markdown(s: Study, res: dict[str, Any]) -> str:
    lines = [f"# ellsjax study: {s.name}", "", s.description, "",
             "| dataset | architecture | size | machine | median r | IS median r | machine beats IS | best variant "
             "(median r) | paper's median r | wall |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["rows"]:
        best = "—" if r["best_variant"] is None else f"{r['best_variant']} ({r['best_variant_median_r']:.3f})"
        paper = "—" if r["paper_median_r"] is None else f"{r['paper_median_r']:.2f}"
        lines.append(f"| {r['dataset']} | {r['architecture']} | {r['image_size']}px | {r['machine']} | "
                     f"{r['median_r']:.3f} | {r['is_median_r']:.3f} | {r['frac_beats_is']:.0%} | {best} | {paper} | "
                     f"{r['wall_s'] / 60:.1f} min |")
    lines += ["", f"Paper's values: {res['paper_source']}; its networks are larger, trained longer, on 28-32 px "
              "images: orientation, not a target.", "", f"![samples]({res['figures']['samples']})", ""]
    return "\n".join(lines)
