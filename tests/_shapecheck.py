"""The test suite's runtime check of jaxtyping annotations (installed by ``tests/conftest.py``).

Every function and dataclass of ``ellsjax`` is wrapped by ``jaxtyping.jaxtyped`` (its import hook)
with :func:`shapes` as the type checker: beartype checks each annotation that involves a jaxtyping
array type (``Float[Array, "b h w c"]``, unions with ``None``, sequences of them), dimension names
bound consistently across a call. The other annotations (``str``, ``Literal[...]``, ``int``) are left
to the functions' own argument checks, whose clear errors the tests exercise: beartype would raise
its own error first.
"""

from __future__ import annotations

import typing

import beartype
import jaxtyping


def _has_array_type(hint: typing.Any) -> bool:
    if isinstance(hint, type) and issubclass(hint, jaxtyping.AbstractArray):
        return True
    return any(_has_array_type(a) for a in typing.get_args(hint))


def shapes(fn):
    """``beartype(fn)`` over its array annotations only (the others become ``Any``).

    A dataclass's ``__init__`` is not checked: the machines are dataclass pytrees, which JAX rebuilds
    with whatever its transformations put in the leaves (tracers, but also ``None``, ``object()``
    sentinels, ``jax.stages.ArgInfo`` while lowering, ``jax.ShapeDtypeStruct``)."""
    if getattr(fn, "__name__", "") == "__init__":
        return fn
    ann = getattr(fn, "__annotations__", None)
    if ann:
        for name, hint in list(ann.items()):
            if not _has_array_type(hint):
                ann[name] = typing.Any
    return beartype.beartype(fn)
