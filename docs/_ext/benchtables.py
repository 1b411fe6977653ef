"""The benchmarks page's tables, rendered at build time from ``docs/benchmarks/results/*.json``.

The benchmark scripts write those files (``scripts/_benchmeta.py``, ``--record``): per benchmark a title, a
description and its runs, each with the run's context (hardware, jax version, UTC date, exact command), a table
and notes. The line ``<!-- benchmark-tables -->`` in ``benchmarks.md`` is replaced by one section per file, its
runs newest first; a file without those fields fails the build, naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

MARKER = "<!-- benchmark-tables -->"
RECORDED = "recorded_readme"  # the hand-copied figures go last


def _cell(v) -> str:
    text = "" if v is None else str(v)
    return text.replace("|", "\\|").replace("\n", " ")


def render(results: Path) -> str:
    files = sorted(results.glob("*.json"), key=lambda p: (p.stem == RECORDED, p.stem))
    if not files:
        raise ValueError(f"{results}: no benchmark results (*.json) to render")
    out = []
    for path in files:
        doc = json.loads(path.read_text())
        missing = [k for k in ("title", "description", "runs") if k not in doc]
        if missing or not doc["runs"]:
            raise ValueError(f"{path.name}: needs title, description and at least one run (missing {missing})")
        out += [f"## {doc['title']}", "", doc["description"], "", f"Source: `docs/benchmarks/results/{path.name}`.", ""]
        for run in reversed(doc["runs"]):
            meta = run["meta"]
            lack = [k for k in ("hardware", "jax", "date", "command") if not meta.get(k)]
            if lack:
                raise ValueError(f"{path.name}: a run lacks {lack} in its meta")
            out += [f"**{meta['date']}** · {meta['hardware']} · jax {meta['jax']}", "",
                    f"```bash\n{meta['command']}\n```", ""]
            cols = run["columns"]
            out += ["| " + " | ".join(_cell(c) for c in cols) + " |", "|" + "---|" * len(cols)]
            for row in run["rows"]:
                if len(row) != len(cols):
                    raise ValueError(f"{path.name}: a row has {len(row)} cells for {len(cols)} columns")
                out.append("| " + " | ".join(_cell(c) for c in row) + " |")
            out.append("")
            if run.get("notes"):
                out += [run["notes"], ""]
            if meta.get("source"):
                out += [f"*Source: {meta['source']}.*", ""]
    return "\n".join(out)


def _source_read(app, docname, source):
    if MARKER not in source[0]:
        return
    results = Path(app.srcdir) / "benchmarks" / "results"
    for path in results.glob("*.json"):
        app.env.note_dependency(str(path))
    source[0] = source[0].replace(MARKER, render(results))


def setup(app):
    app.connect("source-read", _source_read)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
