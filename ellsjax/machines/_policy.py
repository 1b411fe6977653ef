"""How a machine runs: the execution policy (chunking, memory and bank budgets, target platform)
and the chunk planning derived from it. Nothing here changes a result beyond float32 summation order.

:class:`ExecutionPolicy` is one small frozen record carried by every machine (static in its pytree).
Its budgets follow its ``platform`` — the platform of the devices the machine's arrays (or its
mesh) live on, fixed when the machine is built, or an explicit ``platform=`` — never the host's
default backend at trace time, so a program compiled for a TPU or an H100 from a CPU host gets the
accelerator's chunks. Search and placement are strategies of their own
(:mod:`ellsjax.machines.search`).
"""

from __future__ import annotations

import dataclasses
import functools

from ellsjax import _checks

__all__ = [
    "ExecutionPolicy",
    "PLATFORMS",
    "memory_budget_for",
    "bank_budget_for",
    "memory_budgets",
    "query_tile",
    "MIN_CHUNK_ENTRIES",
    "MIN_QUERY_TILE",
]

#: Platforms with their own budgets (``cuda``/``rocm`` devices count as ``gpu``).
PLATFORMS: tuple[str, ...] = ("cpu", "gpu", "tpu")


def check_platform(value, name: str = "platform") -> str | None:
    """``None`` or one of :data:`PLATFORMS` (``cuda``/``rocm`` accepted as ``gpu``)."""
    if value is None:
        return None
    p = str(value).lower() if isinstance(value, str) else None
    p = "gpu" if p in ("cuda", "rocm") else p
    if p not in PLATFORMS:
        raise ValueError(f"{name}: must be one of {', '.join(PLATFORMS)} (or None), got {value!r}")
    return p


@dataclasses.dataclass(frozen=True)
class ExecutionPolicy:
    """How a machine streams its bank: never *what* it computes.

    Attributes:
        chunk_size: training images per streamed chunk (prebuilt banks: that many images' worth of
            entries); ``None`` picks it from ``memory_budget``.
        memory_budget: bytes of temporaries allowed per chunk when ``chunk_size`` is ``None``
            (``None``: :func:`memory_budget_for` the platform).
        bank_budget: bytes a materialized bank of one scale may take (``None``:
            :func:`bank_budget_for` the platform); larger banks are gathered from the images chunk
            by chunk at every call instead (same result, slower).
        platform: ``"cpu"``, ``"gpu"`` or ``"tpu"``: whose budgets apply. Machines set it when they
            are built (the platform of their images' devices, or of a ``Sharded`` mesh); ``None``
            only in a bare policy (then ``"cpu"``).
    """

    chunk_size: int | None = None
    memory_budget: int | None = None
    bank_budget: int | None = None
    platform: str | None = None

    def __post_init__(self):
        for name in ("chunk_size", "memory_budget", "bank_budget"):
            object.__setattr__(self, name, _checks.check_positive_int(getattr(self, name), name, allow_none=True))
        object.__setattr__(self, "platform", check_platform(self.platform))

    @property
    def budget(self) -> int:
        """Bytes of temporaries per chunk: ``memory_budget`` or the platform's default."""
        return self.memory_budget or memory_budget_for(self.platform or "cpu")

    @property
    def bank_bytes(self) -> int:
        """Bytes one scale's prebuilt bank may take: ``bank_budget`` or the platform's default."""
        return self.bank_budget or bank_budget_for(self.platform or "cpu")


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
    """Default bytes of temporaries per streamed chunk, per platform: on CPU half the last-level
    cache; accelerators want large chunks to fill the device."""
    return {"cpu": _cpu_chunk_budget(), "gpu": 1024 * 2**20, "tpu": 1024 * 2**20}


_BANK_BUDGETS = {"cpu": 2**30, "gpu": 4 * 2**30, "tpu": 4 * 2**30}


def memory_budget_for(platform: str) -> int:
    """The chunk memory budget of ``platform`` (see :func:`memory_budgets`).

    Example:
        >>> memory_budget_for("tpu") == 2**30
        True
    """
    return memory_budgets()[check_platform(platform) or "cpu"]


def bank_budget_for(platform: str) -> int:
    """Bytes one scale's prebuilt bank may take on ``platform`` (host-built, device-resident)."""
    return _BANK_BUDGETS[check_platform(platform) or "cpu"]


#: A batch's queries are streamed together while the memory budget still leaves chunks of at least
#: :data:`MIN_CHUNK_ENTRIES` bank entries; beyond that (large unconditional batches) they are cut into
#: tiles of at least :data:`MIN_QUERY_TILE` queries, each streaming the whole bank, so the GEMMs stay
#: large instead of shrinking to a few bank entries per chunk.
MIN_CHUNK_ENTRIES = 512
#: The fewest queries in one tile of a large unconditional batch (see :data:`MIN_CHUNK_ENTRIES`).
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
