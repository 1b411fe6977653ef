"""Scale schedules: the per-step locality scale of a sampler run, with its time grid.

A :class:`ScaleSchedule` pairs a decreasing time grid ``ts`` (``S+1`` times) with one scale per step
(``S`` values, ``values[i]`` used on the step that starts at ``ts[i]``). Its ``kind`` says what the
values are:

* ``"size"``: integer patch sizes (ELS, bbELS, LS) or window sides (PSPC): the paper's calibrated
  schedules (:data:`ellsjax.presets.PAPER_SCALES`) and the grid calibration's output;
* ``"width"``: float window widths ``ℓ`` of the soft-window machines (the differentiable
  calibration's output), with the machine options they were learned for (``support``, ``window``,
  ``edge``) and the ``padding``.

(The *noise* schedule ``t ↦ (a, s)`` is a different thing: :mod:`ellsjax.schedules`.)

This class is the one place schedules are read and written (the calibrations return one: their
``.schedule``; ``sample``, ``evaluate`` and ``calibrate`` read one with :meth:`ScaleSchedule.load`):

* a schedule file: JSON with ``"ts"`` and either ``"scales"`` (sizes) or ``"ells"`` (widths, plus
  ``"support"``, ``"padding"``, ``"window"``, ``"edge"``); any other keys are kept as ``meta``
  (:meth:`~ScaleSchedule.save` writes it, :meth:`~ScaleSchedule.load` reads it back unchanged);
* the published schedules: a preset name of :data:`ellsjax.presets.PAPER_SCALES`
  (:meth:`~ScaleSchedule.paper`), or the authors' released table (``{"nsteps", "scales": {name:
  [k_0 … k_19]}}``, e.g. ``kamb_ganguli_scales.json``: :meth:`~ScaleSchedule.read_table`, or
  :meth:`~ScaleSchedule.load` with ``name=``);
* bare values: one scale, a sequence, or a comma-separated string, on ``paper_times(nsteps)``.

Example:
    >>> from ellsjax.scales import ScaleSchedule
    >>> s = ScaleSchedule.load("MNIST_ResNet_zeros")
    >>> s.kind, len(s.ts), len(s.values), s.values[:3]
    ('size', 20, 19, (15, 15, 15))
    >>> ScaleSchedule.load("5,3", nsteps=3).values
    (5, 3)
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from ellsjax import presets as _presets
from ellsjax import schedules as _schedules

__all__ = ["ScaleSchedule", "SCHEDULE_KINDS", "WIDTH_OPTIONS"]

#: What a schedule holds: patch ``"size"``\ s (ints) or window ``"width"``\ s (floats).
SCHEDULE_KINDS: tuple[str, ...] = ("size", "width")
#: Machine options a width schedule records (those of :func:`ellsjax.machines.soft_els`).
WIDTH_OPTIONS: tuple[str, ...] = ("support", "window", "edge")
_WIDTH_DEFAULTS = {"window": "gaussian", "edge": 0.15}


def _as_size(v: Any, where: str) -> int:
    if isinstance(v, (bool, np.bool_)):
        raise ValueError(f"{where}: expected an integer patch size, got {v!r}")
    if isinstance(v, numbers.Real) and float(v).is_integer():  # 5.0 from a JSON writer that prints floats
        if int(v) <= 0:
            raise ValueError(f"{where}: patch sizes must be positive, got {v!r}")
        return int(v)
    raise ValueError(f"{where}: expected integer patch sizes, got {v!r} (a window width ℓ belongs in a width "
                     "schedule, written with 'ells')")


def _paper_grid(nsteps: int) -> tuple[float, ...]:
    """:func:`ellsjax.schedules.paper_times` as Python floats (its float32 values, exactly)."""
    return tuple(float(t) for t in _schedules.paper_times(nsteps))


def _as_width(v: Any, where: str) -> float:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and v > 0):
        raise ValueError(f"{where}: window widths ℓ must be positive and finite, got {v!r}")
    return float(v)


@dataclasses.dataclass(frozen=True)
class ScaleSchedule:
    """Per-step locality scales on a time grid (see the module docstring).

    Attributes:
        ts: ``S+1`` strictly decreasing times; step ``i`` runs from ``ts[i]`` to ``ts[i+1]``.
        values: ``S`` scales: ints (``kind="size"``) or floats (``kind="width"``).
        kind: ``"size"`` or ``"width"``.
        padding: the machine padding a width schedule was learned for (``None``: any).
        options: the machine options of a width schedule (``support``, ``window``, ``edge``).
        source: where it came from (a preset name, a file, ``"command line"``), for reports.
        meta: anything else its file held (method, metric, candidates, …).

    Two schedules are equal when their steps, values, kind, padding and options are (``source`` and
    ``meta`` describe where one came from).
    """

    ts: tuple[float, ...]
    values: tuple
    kind: Literal["size", "width"] = "size"
    padding: str | None = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    source: str = dataclasses.field(default="", compare=False)
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"kind: must be one of {', '.join(SCHEDULE_KINDS)}, got {self.kind!r}")
        ts = np.asarray(self.ts, np.float64)
        if ts.ndim != 1 or ts.shape[0] < 2 or not np.all(np.isfinite(ts)):
            raise ValueError(f"ts: expected a 1-D grid of at least 2 finite times, got {self.ts!r}")
        if len(self.values) != len(ts) - 1:
            raise ValueError(f"values: need len(values) == len(ts) - 1, got {len(self.values)} and {len(ts)}")
        conv = _as_size if self.kind == "size" else _as_width
        values = tuple(conv(v, f"values[{i}]") for i, v in enumerate(self.values))
        object.__setattr__(self, "ts", tuple(float(t) for t in ts))
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "options", dict(self.options))
        object.__setattr__(self, "meta", dict(self.meta))

    @property
    def nsteps(self) -> int:
        """Number of steps ``S``."""
        return len(self.values)

    def times(self) -> np.ndarray:
        """``ts`` as a float32 array (what the samplers take)."""
        return np.asarray(self.ts, np.float32)

    def on_grid(self, ts: Any) -> ScaleSchedule:
        """The same schedule on another time grid: each new step takes the scale of the old step whose
        start time is nearest to its own (ties: the less noisy one)."""
        new = np.asarray(ts, np.float64)
        old = np.asarray(self.ts[:-1], np.float64)
        pick = [int(np.flatnonzero(np.abs(old - t) == np.min(np.abs(old - t)))[-1]) for t in new[:-1]]
        return dataclasses.replace(self, ts=tuple(new), values=tuple(self.values[j] for j in pick),
                                   source=f"{self.source} mapped onto {len(new) - 1} steps")

    # -- files ------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The file form (see the module docstring)."""
        if self.kind == "size":
            return {"ts": list(self.ts), "scales": list(self.values), **self.meta}
        return {"ts": list(self.ts), "ells": list(self.values), **{k: self.options[k] for k in self.options},
                "padding": self.padding, **self.meta}

    def save(self, path: str | os.PathLike, **meta: Any) -> None:
        """Write the schedule as JSON (extra ``meta`` is stored alongside)."""
        obj = self.to_json()
        obj.update(meta)
        with open(path, "w") as f:
            json.dump(obj, f, indent=1)

    @classmethod
    def from_json(cls, obj: Any, *, where: str = "spec") -> ScaleSchedule:
        """Parse the file form; errors name ``where``."""
        if not isinstance(obj, dict) or "ts" not in obj or not ({"scales", "ells"} & set(obj)):
            raise ValueError(f"{where}: not a scale schedule (expected a JSON object with 'ts' and 'scales' or 'ells')")
        try:
            ts = np.asarray(obj["ts"], np.float64)
            if "ells" in obj:
                values = list(obj["ells"])
                kind, field = "width", "ells"
                if "support" not in obj:
                    raise ValueError("a width schedule needs 'support'")
                options = {"support": int(obj["support"]),
                           **{k: obj.get(k, d) for k, d in _WIDTH_DEFAULTS.items()}}
                options["edge"] = float(options["edge"])
                options["window"] = str(options["window"])
                padding = str(obj.get("padding") or "circular")
                meta = {k: v for k, v in obj.items() if k not in {"ts", "ells", "padding", *WIDTH_OPTIONS}}
            else:
                values = list(obj["scales"])
                kind, field, options, padding = "size", "scales", {}, None
                meta = {k: v for k, v in obj.items() if k not in {"ts", "scales"}}
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: malformed scale schedule: {e}") from None
        if ts.ndim != 1 or len(values) != len(ts) - 1:
            raise ValueError(f"{where}: needs len({field}) == len(ts) - 1, got {len(values)} and {ts.shape}")
        try:
            return cls(tuple(ts), tuple(values), kind, padding=padding, options=options, meta=meta)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    @classmethod
    def paper(cls, name: str, *, convention: Literal["sampler", "calibration"] = "sampler") -> ScaleSchedule:
        """A published patch-size schedule (:data:`ellsjax.presets.PAPER_SCALES`) on the paper's
        20-point grid :func:`ellsjax.schedules.paper_times`; ``convention`` as in
        :func:`ellsjax.presets.paper_scales` (``"sampler"`` reproduces the published figures).

        Example:
            >>> ScaleSchedule.paper("MNIST_ResNet_zeros").values[-3:]
            (5, 5, 3)
            >>> ScaleSchedule.paper("MNIST_ResNet_zeros", convention="calibration").values[-3:]
            (5, 3, 3)
        """
        values = _presets.paper_scales(name, convention=convention)
        source = name if convention == "sampler" else f"{name} ({convention} convention)"
        return cls(_paper_grid(len(values) + 1), values, "size", source=source)

    @classmethod
    def read_table(
        cls, table: Any, *, convention: Literal["sampler", "calibration"] = "sampler"
    ) -> dict[str, ScaleSchedule]:
        """Every schedule of a published table, by name.

        A table is the authors' release format, ``{"nsteps": N, "scales": {name: [k_0, …, k_{N−1}]}}``
        with ``k_j`` calibrated at noise index ``j`` (0 = lowest), e.g. ``kamb_ganguli_scales.json``;
        each becomes a schedule on ``paper_times(N)`` by the index rule of ``convention``
        (:func:`ellsjax.presets.paper_scales`). The bundled :data:`ellsjax.presets.PAPER_SCALES` is
        such a table.

        Args:
            table: a path to the JSON file, or its parsed object.
            convention: ``"sampler"`` (the published figures) or ``"calibration"``.
        """
        where = "table"
        if isinstance(table, (str, os.PathLike)):
            where = f"table: {os.fspath(table)!r}"
            try:
                with open(table) as f:
                    table = json.load(f)
            except (OSError, ValueError) as e:
                raise ValueError(f"{where}: cannot read a scale table: {e}") from None
        if not isinstance(table, Mapping) or not isinstance(table.get("scales"), Mapping):
            raise ValueError(f"{where}: not a published scale table (expected a JSON object whose 'scales' maps "
                             "names to per-index patch sizes)")
        if convention not in ("sampler", "calibration"):
            raise ValueError(f"convention: must be 'sampler' or 'calibration', got {convention!r}")
        out = {}
        for name, raw in table["scales"].items():
            raw = [_as_size(v, f"{where}: {name}[{j}]") for j, v in enumerate(raw)]
            n = int(table.get("nsteps", len(raw)))
            if len(raw) != n or n < 2:
                raise ValueError(f"{where}: {name} has {len(raw)} values for nsteps = {n}")
            # the index rule of presets.paper_scales: t = j/n uses raw[j] (sampler) or raw[j-1] (calibration)
            shift = 0 if convention == "sampler" else 1
            values = tuple(raw[j - shift] for j in range(n - 1, 0, -1))
            source = name if convention == "sampler" else f"{name} ({convention} convention)"
            out[name] = cls(_paper_grid(n), values, "size", source=source)
        return out

    @classmethod
    def load(cls, spec: Any, *, nsteps: int = 20, kind: str | None = None, name: str | None = None) -> ScaleSchedule:
        """Read a scale specification.

        Args:
            spec: a :class:`ScaleSchedule`; a preset name of :data:`ellsjax.presets.PAPER_SCALES`
                (on :func:`ellsjax.schedules.paper_times` ``(20)``); a path to a JSON schedule; a
                sequence of scales or a comma-separated string of them (one per step of
                ``paper_times(nsteps)``); or one scale (the same at every step).
            nsteps: grid size when ``spec`` carries no times.
            kind: how bare numbers are read: ``"size"`` (ints; floats with a fraction are an
                error), ``"width"`` (floats), or ``None`` (ints if all are integral, else widths).
            name: with a published table file (:meth:`read_table`), the schedule to take from it.

        Raises:
            ValueError: naming ``spec``, for anything it cannot read exactly.
        """
        if kind is not None and kind not in SCHEDULE_KINDS:
            raise ValueError(f"kind: must be one of {', '.join(SCHEDULE_KINDS)} or None, got {kind!r}")
        if isinstance(spec, ScaleSchedule):
            return spec
        if name is not None and not (isinstance(spec, (str, os.PathLike)) and os.path.isfile(spec)):
            raise ValueError(f"name: selects a schedule from a published table file; {spec!r} is not a file")
        if isinstance(spec, str) and spec in _presets.PAPER_SCALES:
            return cls.paper(spec)
        if isinstance(spec, (str, os.PathLike)) and (os.fspath(spec).endswith(".json") or os.path.isfile(spec)):
            path = os.fspath(spec)
            try:
                with open(path) as f:
                    obj = json.load(f)
            except (OSError, ValueError) as e:
                raise ValueError(f"spec: cannot read a scale schedule from {path!r}: {e}") from None
            if isinstance(obj, dict) and isinstance(obj.get("scales"), dict):  # a published table
                table = cls.read_table(obj)
                if name not in table:
                    raise ValueError(f"name: {path!r} is a table of {len(table)} schedules: pass name= one of "
                                     f"{sorted(table)}" + ("" if name is None else f" (got {name!r})"))
                return dataclasses.replace(table[name], source=f"{path}: {name}")
            out = cls.from_json(obj, where=f"spec: {path!r}")
            return dataclasses.replace(out, source=path)
        if isinstance(spec, str):
            tokens = [v.strip() for v in spec.split(",") if v.strip()]
            try:
                nums = [float(v) for v in tokens]
            except ValueError:
                raise ValueError(
                    f"spec: {spec!r} is neither a preset ({sorted(_presets.PAPER_SCALES)}), a JSON file, nor "
                    "comma-separated numbers"
                ) from None
            if not nums:
                raise ValueError(f"spec: {spec!r} holds no scales")
            spec = nums if len(nums) > 1 else nums[0]
        elif isinstance(spec, numbers.Number) or (isinstance(spec, np.ndarray) and spec.ndim == 0):
            spec = spec.item() if isinstance(spec, np.ndarray) else spec
        else:
            try:
                spec = [v.item() if hasattr(v, "item") else v for v in spec]
            except TypeError:
                raise ValueError(f"spec: expected a preset, a file, or scales, got {spec!r}") from None
        ts = _paper_grid(nsteps)
        values = spec if isinstance(spec, list) else [spec]
        if kind is None:
            kind = "size" if all(isinstance(v, numbers.Real) and float(v).is_integer() for v in values) else "width"
        conv = _as_size if kind == "size" else _as_width
        values = [conv(v, f"spec[{i}]") for i, v in enumerate(values)]
        if not isinstance(spec, list):
            values = values * (nsteps - 1)
        if len(values) != nsteps - 1:
            word = "widths" if kind == "width" else "scales"
            raise ValueError(f"spec: expected {nsteps - 1} {word} for a {nsteps}-point grid, got {len(values)}")
        return cls(ts, tuple(values), kind, source="values")
