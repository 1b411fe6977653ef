"""Atomic output files (private): a crash, a kill or a full disk leaves the previous file or none,
never a truncated one.

Every writer goes through :func:`atomic_path`: the content is written to a hidden temporary name
in the target's own directory (so the final ``os.replace`` is a rename within one file system,
atomic on POSIX and Windows) and renamed over the target only once it is complete. A failed write
removes the temporary file and raises :class:`OutputError`, an ``OSError`` whose message is one
line naming the path and the reason.

Example:
    >>> import json, tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> write_json(d / "a.json", {"x": 1})
    PosixPath('...a.json')
    >>> json.loads((d / "a.json").read_text()), sorted(p.name for p in d.iterdir())
    ({'x': 1}, ['a.json'])
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["OutputError", "atomic_path", "write_json", "write_text", "save_npz"]


class OutputError(OSError):
    """An output file could not be written; ``str(e)`` is one line with the path and the reason."""


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError):
        if e.errno == errno.ENOSPC:
            return "no space left on the device"
        if e.strerror:
            return e.strerror[0].lower() + e.strerror[1:]
    return f"{type(e).__name__}: {e}"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to ``path`` (same suffix, so writers that infer a format from the name
    work); renamed onto ``path`` when the block ends without error, removed otherwise.

    Raises:
        OutputError: the block or the rename failed with an ``OSError`` (e.g. a full disk).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        err = OutputError(f"cannot write {path}: {_reason(e)}")
        err.errno = e.errno
        raise err from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (serialised first, so a value JSON cannot hold
    raises before anything is written); returns the path."""
    return write_text(path, json.dumps(obj, indent=indent))


def save_figure(path: str | os.PathLike, fig: Any, *, dpi: float | None = None) -> Path:
    """A matplotlib figure saved as PNG to ``path`` atomically, then closed (also when saving fails);
    returns the path."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", **({} if dpi is None else {"dpi": dpi}))
    finally:
        plt.close(fig)
    return Path(path)


def save_npz(path: str | os.PathLike, **arrays: Any) -> Path:
    """``np.savez_compressed`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)
