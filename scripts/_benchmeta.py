"""What every benchmark script records with its numbers, and where (the docs' benchmarks page reads it).

``meta()`` is the run's context: the hardware (CPU model and core count from ``/proc/cpuinfo`` or the
platform, the accelerators jax sees), the jax and ellsjax versions, the UTC date and the exact command line.
``record(name, ...)`` appends one run's table to ``docs/benchmarks/results/<name>.json``, from which the
docs build renders ``docs/benchmarks.md`` (``docs/_ext/benchtables.py``); a script records only when asked
(``--record``), so exploratory runs leave the repository alone.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "results"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def meta(argv: list[str] | None = None) -> dict:
    """The run's context. ``argv`` defaults to ``sys.argv`` (the command is written as run from the repo root)."""
    import jax

    import ellsjax

    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve() if argv else None
    try:
        shown = str(script.relative_to(RESULTS.parents[2])) if script else ""
    except ValueError:
        shown = argv[0]
    devices = jax.devices()
    accelerators = sorted({d.device_kind for d in devices if d.platform != "cpu"})
    return {
        "hardware": f"{cpu_model()}, {os.cpu_count()} cores" + (f"; {', '.join(accelerators)}" if accelerators else ""),
        "backend": jax.default_backend(),
        "devices": len(devices),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "ellsjax": ellsjax.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["python", shown, *argv[1:]]),
    }


def add_record_flag(parser) -> None:
    """``--record``: append this run's table to the docs' benchmarks page (``docs/benchmarks/results``)."""
    parser.add_argument("--record", action="store_true",
                        help=f"append this run's table to {RESULTS.relative_to(RESULTS.parents[2])}/ "
                             "(rendered on the docs' benchmarks page)")


def record(name: str, *, title: str, description: str, columns: list[str], rows: list[list], notes: str = "",
           run_meta: dict | None = None, results: Path | None = None) -> Path:
    """Append one run (its ``meta()``, a table and notes) to ``results/<name>.json``; returns the file.

    The file is ``{"title", "description", "runs": [...]}``; the title and description are the script's
    current ones, each run keeps its own table, context and notes.
    """
    if any(len(r) != len(columns) for r in rows):
        raise ValueError(f"rows: every row needs {len(columns)} cells ({columns})")
    path = Path(results or RESULTS) / f"{name}.json"
    doc = json.loads(path.read_text()) if path.exists() else {"runs": []}
    doc.update(title=title, description=description)
    doc["runs"].append({"meta": run_meta or meta(), "columns": columns, "rows": rows, "notes": notes})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    print(f"recorded in {path}")
    return path
