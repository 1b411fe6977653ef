"""Machines as arguments of exported programs, and their short ``repr``.

Every machine class is a registered pytree (arrays as leaves, configuration static). For
``jax.export`` to *serialize* a program that takes a machine as an argument, each node type of its
tree must also be registered for serialization: the machine classes here (their static fields
encoded as JSON), and the bank records (:class:`~ellsjax.machines._banks.DeviceBank`,
:class:`~ellsjax.machines._banks.BlockIndex`) as named tuples. Only plain values and the library's
own frozen records (schedules, policies, search strategies, one-device placement) are encoded, by
name and fields; nothing is pickled, so deserializing runs no code a file names. A
:class:`~ellsjax.machines.search.Sharded` machine names devices and is refused.

Example:
    >>> import jax, ellsjax as ej
    >>> imgs = jax.random.uniform(jax.random.key(0), (6, 8, 8, 1), minval=-1, maxval=1)
    >>> m = ej.machines.els(imgs)
    >>> f = jax.export.export(jax.jit(lambda m, x: m._denoise(x, jax.numpy.full((1,), 0.5), None, 3)))
    >>> exp = f(m, imgs[:1])
    >>> back = jax.export.deserialize(exp.serialize())
    >>> bool(abs(back.call(m, imgs[:1]) - m.denoise(imgs[:1], 0.5, scale=3)).max() < 1e-5)
    True
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import numpy as np

__all__ = ["register_serialization", "register_static", "short_repr"]

#: Frozen records that may appear in a machine's static fields, by serialized name.
_STATIC: dict[str, type] = {}
_NAMES: dict[type, str] = {}


def register_static(cls: type, name: str | None = None) -> type:
    """Allow instances of the frozen dataclass ``cls`` in serialized static fields (by name)."""
    name = name or f"{cls.__module__}.{cls.__qualname__}"
    _STATIC[name] = cls
    _NAMES[cls] = name
    return cls


def _encode(v: Any) -> Any:
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return {"float": repr(float(v))}
    if isinstance(v, tuple):
        return {"tuple": [_encode(x) for x in v]}
    if isinstance(v, list):
        return [_encode(x) for x in v]
    if type(v) in _NAMES:
        return {"record": _NAMES[type(v)],
                "fields": {f.name: _encode(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}}
    raise TypeError(f"cannot serialize {type(v).__name__} {v!r} in a machine's static fields (a Sharded machine "
                    "names devices: export the one-device machine)")


def _decode(v: Any) -> Any:
    if isinstance(v, list):
        return [_decode(x) for x in v]
    if isinstance(v, dict):
        if "float" in v:
            return float(v["float"])
        if "tuple" in v:
            return tuple(_decode(x) for x in v["tuple"])
        cls = _STATIC.get(v.get("record"))
        if cls is None:
            raise ValueError(f"unknown record {v.get('record')!r} in a serialized machine")
        return cls(**{k: _decode(x) for k, x in v["fields"].items()})
    return v


def register_serialization(cls: type, meta: list[str]) -> None:
    """Register the machine dataclass ``cls`` (pytree with static fields ``meta``) for
    ``jax.export`` serialization."""
    data = [f.name for f in dataclasses.fields(cls) if f.name not in meta]

    def serialize(aux) -> bytes:
        return json.dumps([_encode(v) for v in aux]).encode()

    def deserialize(blob: bytes):
        return tuple(_decode(v) for v in json.loads(blob.decode()))

    def from_children(aux, children):
        return cls(**dict(zip(data, children, strict=True)), **dict(zip(meta, aux, strict=True)))

    jax.export.register_pytree_node_serialization(
        cls, serialized_name=f"ellsjax.{cls.__module__}.{cls.__qualname__}", serialize_auxdata=serialize,
        deserialize_auxdata=deserialize, from_children=from_children)


def _short(v: Any) -> str:
    if isinstance(v, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
        return f"{np.dtype(v.dtype).name}{list(v.shape)}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k!r}: {_short(x)}" for k, x in v.items()) + "}"
    if isinstance(v, tuple) and hasattr(v, "_fields"):
        return f"{type(v).__name__}(" + ", ".join(f"{k}={_short(x)}" for k, x in zip(v._fields, v, strict=True)) + ")"
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return short_repr(v)
    if isinstance(v, tuple) and len(v) > 8:
        return f"({', '.join(map(repr, v[:4]))}, … {len(v)} items)"
    return repr(v)


def short_repr(obj: Any) -> str:
    """``Type(field=value, …)`` with arrays as ``dtype[shape]`` and default-valued static fields
    left out (a machine's repr never prints its training set)."""
    parts = []
    for f in dataclasses.fields(obj):
        if not f.repr:
            continue
        v = getattr(obj, f.name)
        if not isinstance(v, (jax.Array, np.ndarray, jax.ShapeDtypeStruct, dict)):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            try:
                if default is not dataclasses.MISSING and bool(v == default):
                    continue
            except Exception:  # noqa: BLE001 - a value without a plain equality: shown
                pass
        elif isinstance(v, dict) and not v:
            continue
        if v is None and f.default is dataclasses.MISSING:
            continue
        parts.append(f"{f.name}={_short(v)}")
    return f"{type(obj).__name__}({', '.join(parts)})"
