"""How a machine runs: the execution policy (chunking, memory, banks, devices, search) and the
chunk planning derived from it. Nothing here changes a result beyond float32 summation order.

:class:`ExecutionPolicy` is one small frozen record carried by every machine (static in its pytree).
The backend budgets are computed lazily, once per process (:func:`default_memory_budget`,
:func:`default_bank_budget`): nothing is read from the system at import time.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

from ellsjax import _checks

__all__ = [
    "ExecutionPolicy",
    "default_memory_budget",
    "default_bank_budget",
    "memory_budgets",
    "query_tile",
    "MIN_CHUNK_ENTRIES",
    "MIN_QUERY_TILE",
    "SCORINGS",
]

#: GEMM input precisions of the approximate search's candidate scoring.
SCORINGS: tuple[str, ...] = ("bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class ExecutionPolicy:
    """How a machine streams its bank: never *what* it computes.

    Attributes:
        chunk_size: training images per streamed chunk (prebuilt banks: that many images' worth of
            entries); ``None`` picks it from ``memory_budget``.
        memory_budget: bytes of temporaries allowed per chunk when ``chunk_size`` is ``None``
            (``None``: :func:`default_memory_budget` of the backend).
        bank_budget: bytes a materialized bank of one scale may take (``None``:
            :func:`default_bank_budget`); larger banks are gathered from the images chunk by chunk at
            every call instead (same result, slower).
        mesh: a ``jax.sharding.Mesh`` the prebuilt banks are split over, or ``None``.
        mesh_axis: the mesh axis the banks are split along.
        tolerance: ``None`` (exact search) or the largest error allowed per output value for the
            approximate top-``top_k`` search.
        top_k: candidates per query of the approximate search.
        scoring: GEMM input precision of the approximate search's candidate scoring.
        prune: ``None`` (stream every block), ``0.0`` (skip the bank blocks whose every entry has
            float32 weight exactly 0: same results) or a tolerance ``ε > 0`` (skip blocks while the
            error they can cause stays ``≤ ε``); see :mod:`ellsjax.machines._pruning`.
        prune_block: entries per bounded block of a pruned bank (a power of two).
        prune_tile: queries per tile of similar queries in a pruned pass.
    """

    chunk_size: int | None = None
    memory_budget: int | None = None
    bank_budget: int | None = None
    mesh: Any = None
    mesh_axis: str = "bank"
    tolerance: float | None = None
    top_k: int = 64
    scoring: str = "bfloat16"
    prune: float | None = None
    prune_block: int = 512
    prune_tile: int = 256

    def __post_init__(self):
        for name in ("chunk_size", "memory_budget", "bank_budget"):
            object.__setattr__(self, name, _checks.check_positive_int(getattr(self, name), name, allow_none=True))
        object.__setattr__(self, "top_k", _checks.check_positive_int(self.top_k, "top_k"))
        if self.tolerance is not None:
            tol = float(self.tolerance)
            if not (tol > 0 and math.isfinite(tol)):
                raise ValueError(f"tolerance: must be positive (or None for exact search), got {self.tolerance!r}")
            object.__setattr__(self, "tolerance", tol)
        if self.prune is not None:
            tol = float(self.prune)
            if not (tol >= 0 and math.isfinite(tol)):
                raise ValueError(f"tolerance: must be >= 0 (0: exact pruning), got {self.prune!r}")
            object.__setattr__(self, "prune", tol)
        blk = _checks.check_positive_int(self.prune_block, "block")
        if blk & (blk - 1):
            raise ValueError(f"block: must be a power of two, got {blk}")
        object.__setattr__(self, "prune_tile", _checks.check_positive_int(self.prune_tile, "tile"))
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring: must be 'bfloat16' or 'float32', got {self.scoring!r}")

    @property
    def budget(self) -> int:
        """Bytes of temporaries per chunk: ``memory_budget`` or the backend default."""
        return self.memory_budget or default_memory_budget()

    @property
    def bank_bytes(self) -> int:
        """Bytes one scale's prebuilt bank may take: ``bank_budget`` or the backend default."""
        return self.bank_budget or default_bank_budget()

    @property
    def devices(self) -> int:
        """Devices the banks are split over (1 without a mesh)."""
        return 1 if self.mesh is None else int(self.mesh.shape[self.mesh_axis])


@functools.cache
def _cpu_chunk_budget() -> int:
    """Half the last-level cache (Linux sysfs), within [4, 64] MiB; 16 MiB where it cannot be read.

    A chunk whose logits stay in cache is about twice as fast as a larger one, and a very small one
    pays a per-chunk overhead: on a 2-core EPYC with 32 MiB L3, 16 MiB chunks measured 10–15% faster
    than 4 MiB ones for ELS/bbELS at k = 3…15 (``scripts/bench_machines.py --memory-budget``)."""
    import glob

    sizes = []
    for d in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(f"{d}/level") as f:
                level = int(f.read())
            with open(f"{d}/size") as f:
                text = f.read().strip()
            unit = {"K": 2**10, "M": 2**20}.get(text[-1:], 1)
            sizes.append((level, int(text.rstrip("KM")) * unit))
        except (OSError, ValueError):
            continue
    if not sizes:
        return 16 * 2**20
    return int(min(max(max(sizes)[1] // 2, 4 * 2**20), 64 * 2**20))


def memory_budgets() -> dict[str, int]:
    """Default bytes of temporaries per streamed chunk, per backend: on CPU half the last-level
    cache; accelerators want large chunks to fill the device."""
    return {"cpu": _cpu_chunk_budget(), "gpu": 1024 * 2**20, "tpu": 1024 * 2**20}


_BANK_BUDGETS = {"cpu": 2**30, "gpu": 4 * 2**30, "tpu": 4 * 2**30}


def default_memory_budget() -> int:
    """The chunk memory budget used when a policy's ``memory_budget`` is ``None`` (this backend)."""
    import jax

    backend = jax.default_backend()
    if backend == "cpu":
        return _cpu_chunk_budget()
    return memory_budgets().get(backend, 256 * 2**20)


def default_bank_budget() -> int:
    """Bytes one scale's prebuilt bank may take when a policy's ``bank_budget`` is ``None``."""
    import jax

    return _BANK_BUDGETS.get(jax.default_backend(), 2**30)


#: A batch's queries are streamed together while the memory budget still leaves chunks of at least
#: :data:`MIN_CHUNK_ENTRIES` bank entries; beyond that (large unconditional batches) they are cut into
#: tiles of at least :data:`MIN_QUERY_TILE` queries, each streaming the whole bank, so the GEMMs stay
#: large instead of shrinking to a few bank entries per chunk.
MIN_CHUNK_ENTRIES = 512
MIN_QUERY_TILE = 1024


def query_tile(budget: int, lead: int, mq: int, per_entry: int, per_query: int) -> int | None:
    """Queries per tile for ``mq`` queries (``lead`` leading groups) under ``budget`` bytes, where a
    chunk costs ``4·lead·(per_entry + per_query·mq)`` bytes per bank entry; ``None``: no tiling."""
    if mq <= MIN_QUERY_TILE or budget // (4 * lead * (per_entry + per_query * mq)) >= MIN_CHUNK_ENTRIES:
        return None
    fit = (budget // (4 * lead * MIN_CHUNK_ENTRIES) - per_entry) // per_query
    return int(min(mq, max(MIN_QUERY_TILE, fit)))


def bank_chunk(policy: ExecutionPolicy, *, lead: int, mq: int, per_entry: int, entries: int,
               positions_per_image: int, conditional: bool) -> tuple[int, int | None]:
    """``(entries per chunk, query tile | None)`` for streaming a prebuilt bank of ``entries``.

    Per bank entry a chunk holds the logits and weights of every query (``2·mq``) and the entry
    itself (``per_entry`` floats), per leading group; a power of two divides the padded bank, so no
    chunk overlaps the previous one."""
    tile = None
    if policy.chunk_size is not None:
        c = policy.chunk_size * positions_per_image
    else:
        tile = query_tile(policy.budget, lead, mq, per_entry, 2) if not conditional else None
        c = 1 << max(0, int(policy.budget // (4 * lead * (2 * (tile or mq) + per_entry))).bit_length() - 1)
    return int(min(max(c, 1), entries)), tile


def images_per_chunk(policy: ExecutionPolicy, n: int, bytes_per_image: int) -> int:
    """Training images per streamed chunk (``n`` images to stream, ``bytes_per_image`` of temporaries each)."""
    if policy.chunk_size is not None:
        return min(policy.chunk_size, n)
    return int(min(max(1, policy.budget // max(1, bytes_per_image)), n))
