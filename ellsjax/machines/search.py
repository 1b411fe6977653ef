r"""How a bank machine searches its prebuilt banks, and where the banks live: strategy objects.

A bank machine (:class:`~ellsjax.machines.BankMachine`: IS, LS, ELS, bbELS) carries one **search**
strategy and one **placement**; its one streaming dispatch hands every group of queries and its
prebuilt bank to ``placement.run(search, ...)``. Each strategy states what it computes and the error
bound it certifies (``|x̂0 − exact| ≤ bound`` in every output value, plus float32 rounding), and the
combination is checked when it is made: a pair that cannot be honoured raises, naming both parts.

Search (``machine.with_search(strategy)``):

* :class:`Exact` — stream every entry (the default). Bound 0.
* :class:`TopK` — top-``k`` candidates per query from a low-precision GEMM, rescored exactly
  (:func:`ellsjax.kernel.topk_softmax`); where the resulting bound of every output value of a group
  is at most ``tolerance`` that estimate is used, else the exact pass. Bound: the estimate's bound,
  or 0 where the exact pass ran.
* :class:`Pruned` — banks ordered in bounded blocks; per tile of similar queries the blocks are
  visited best-bound-first until the rest is provably invisible to float32 (``tolerance=0``) or
  within ``tolerance`` (:mod:`ellsjax.machines._pruning`). Bound: the pass's own.
* :class:`CertifiedSubset` — for the PCA-locality machine (image-level, not a patch bank): images
  visited coarse to fine until the rest is certified within ``tolerance`` (see
  :mod:`ellsjax.machines.pca`).

Placement (``machine.shard(mesh)``):

* :class:`Single` — one device (the default).
* :class:`Sharded` — banks split along their entry axis over ``mesh[axis]``; every device streams its
  slice and the partial statistics are merged exactly (:func:`ellsjax.kernel.merge_across`).
  Entries are dealt evenly: the entry axis is cut into one equal slot per device, and each bank's
  ``u`` real entries into runs of ``⌈u/n⌉`` or ``⌊u/n⌋``, one at the start of each slot (padding, of
  weight exactly 0, after it), whatever the bank size
  (:func:`ellsjax.machines._banks.pack_group_bank`); so the cross-device merge combines ``n``
  non-empty partial softmaxes (fewer only when ``u < n``).

Where there is no prebuilt bank (an unprepared machine, or a bank over ``bank_budget``), the machine
streams windows straight from the training images, exactly; its bound is then 0.

Example:
    >>> import jax, ellsjax as ej
    >>> from ellsjax.machines.search import TopK
    >>> imgs = jax.random.uniform(jax.random.key(0), (8, 8, 8, 1), minval=-1, maxval=1)
    >>> m = ej.machines.els(imgs).with_search(TopK(tolerance=1e-3, k=16)).prepare((3,))
    >>> x0, bound = m.denoise_with_bound(imgs[:1] * 0.9, 0.05, scale=3)
    >>> bool((bound <= 1e-3).all())
    True
"""

from __future__ import annotations

import abc
import dataclasses
import math
import numbers
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ellsjax import _checks
from ellsjax import kernel as _kernel
from ellsjax.machines import _banks, _pruning
from ellsjax.machines._policy import MIN_CHUNK_ENTRIES, ExecutionPolicy, bank_chunk

__all__ = [
    "AbstractSearch", "Exact", "TopK", "Pruned", "CertifiedSubset", "SCORINGS",
    "AbstractPlacement", "Single", "Sharded", "StreamPlan", "bank_stats",
]

#: GEMM input precisions of :class:`TopK`'s candidate scoring.
SCORINGS: tuple[str, ...] = ("bfloat16", "float32")


class StreamPlan(NamedTuple):
    """What one group's pass needs besides its queries and bank: the machine's execution policy,
    bank positions per training image (for ``chunk_size`` in images) and an optional chunk rewrite
    (:class:`BankMap`, the soft window's weighted keys)."""

    policy: ExecutionPolicy
    positions_per_image: int = 1
    bank_map: Any = None


class BankMap(NamedTuple):
    """A rewrite of every streamed bank chunk (``fn(chunk) -> chunk``) that adds ``extra_rows`` rows
    to a packed chunk's keys (so that chunks are sized for what the kernel really reads)."""

    fn: Any
    extra_rows: int

    def __call__(self, chunk):
        return self.fn(chunk)


def _tolerance(value: Any, *, zero_ok: bool, what: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"tolerance: {what} expects a float, got {value!r}")
    tol = float(value)
    if not math.isfinite(tol) or tol < 0 or (tol == 0 and not zero_ok):
        need = ">= 0" if zero_ok else "> 0"
        raise ValueError(f"tolerance: {what} needs a finite tolerance {need}, got {value!r}")
    return tol


# -------------------------------------------------------------------------------------- search
@dataclasses.dataclass(frozen=True)
class AbstractSearch(abc.ABC):
    """A search strategy: how one group's queries meet its prebuilt bank. Frozen and hashable
    (static in a machine's pytree)."""

    #: Whether bank machines (patch banks) can use it; :class:`CertifiedSubset` is PCA's.
    for_banks: ClassVar[bool] = True

    def bank_block(self) -> int | None:
        """Entries per bounded block the prebuilt banks need (``None``: plain layout)."""
        return None

    def check_placement(self, placement: AbstractPlacement) -> None:  # noqa: B027 - most searches run anywhere
        """Raise if this search cannot run under ``placement`` (the default: it runs under any)."""

    @abc.abstractmethod
    def run(self, queries: _kernel.Queries, bank: _banks.DeviceBank, label, plan: StreamPlan):
        """``(means, bound)`` of one group over its (single-device) bank; ``bound`` per query."""

    def stats(self, queries: _kernel.Queries, bank: _banks.DeviceBank, label, plan: StreamPlan):
        """Exact-mergeable softmax statistics over (one device's slice of) a bank."""
        return bank_stats(queries, bank, label, plan)


def _zero_bound(mean):
    return jnp.zeros(mean.shape[:-1], mean.dtype)


def _exact(queries, bank, label, plan: StreamPlan):
    """``(means, 0)``: the exact pass over every entry, which certifies a zero bound."""
    mean = _kernel.finalize(bank_stats(queries, bank, label, plan))
    return mean, _zero_bound(mean)


@dataclasses.dataclass(frozen=True)
class Exact(AbstractSearch):
    """Stream every entry of the bank (the default). Bound 0."""

    def run(self, queries, bank, label, plan):
        return _exact(queries, bank, label, plan)


@dataclasses.dataclass(frozen=True)
class TopK(AbstractSearch):
    """Top-``k`` candidates per query from a ``scoring``-precision GEMM, rescored exactly, used
    where the rigorous bound of a whole group is at most ``tolerance`` (else the exact pass).

    Retrieval is an exact ``jax.lax.top_k`` on every platform (:func:`ellsjax.kernel.topk_softmax`), so
    the bound is rigorous everywhere. Where it pays: TPUs (a native ``TopK`` op). On GPUs top-k
    compiles to a full sort of every chunk's scores and on CPUs the selection costs more than the
    exponentials it saves: there it is certified but not faster (use :class:`Pruned`). Needs prebuilt
    banks (:meth:`~ellsjax.machines.BankMachine.prepare`); it is not combined with :class:`Sharded`
    (the candidates of every device would have to be merged).

    Attributes:
        tolerance: the largest error allowed per output value (``> 0``).
        k: candidates per query.
        scoring: ``"bfloat16"`` or ``"float32"`` GEMM inputs for the candidate scores.
    """

    tolerance: float
    k: int = 64
    scoring: str = "bfloat16"

    def __post_init__(self):
        object.__setattr__(self, "tolerance", _tolerance(self.tolerance, zero_ok=False, what="TopK"))
        object.__setattr__(self, "k", _checks.check_positive_int(self.k, "k"))
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring: must be 'bfloat16' or 'float32', got {self.scoring!r}")

    def check_placement(self, placement):
        if isinstance(placement, Sharded):
            raise ValueError("search, placement: TopK search is not combined with Sharded placement (each device "
                             "would need every other device's candidates); use Exact or Pruned(tolerance=0) "
                             "with Sharded, or TopK on one device")

    def run(self, queries, bank, label, plan):
        if plan.bank_map is not None:  # a rewritten (soft-window) bank: the candidates' keys would differ
            return _exact(queries, bank, label, plan)
        approx = topk_bank(queries, bank, label, plan.policy, self)
        ok = jnp.all(approx.error_bound <= self.tolerance)
        mean = jax.lax.cond(ok, lambda: approx.mean, lambda: _exact(queries, bank, label, plan)[0])
        return mean, jnp.where(ok, approx.error_bound, 0.0)

    def stats(self, queries, bank, label, plan):
        raise TypeError("TopK search gives no mergeable statistics (it is not combined with Sharded placement)")


@dataclasses.dataclass(frozen=True)
class Pruned(AbstractSearch):
    """Pruned streaming of banks ordered in bounded blocks (:mod:`ellsjax.machines._pruning`).

    * ``tolerance=0`` (exact): skipped entries would have float32 weight exactly 0, so results equal
      the exact ones up to float32 summation order;
    * ``tolerance=ε > 0``: blocks are skipped while ``|x̂0 − exact| ≤ ε`` in every output value.

    Serves the prebuilt banks of single-bank groups (ELS, the bbELS interior, IS; conditional banks
    too); other groups, and soft-window (rewritten) chunks, stream exactly. With :class:`Sharded`
    only ``tolerance=0`` (each device's skipped mass is bounded on its own slice, not the whole).

    Attributes:
        tolerance: ``0.0`` (exact) or ``ε > 0``.
        block: entries per bounded block (a power of two).
        tile: queries per tile of similar queries.
    """

    tolerance: float = 0.0
    block: int = 512
    tile: int = 256

    def __post_init__(self):
        object.__setattr__(self, "tolerance", _tolerance(self.tolerance, zero_ok=True, what="Pruned"))
        blk = _checks.check_positive_int(self.block, "block")
        if blk & (blk - 1):
            raise ValueError(f"block: must be a power of two, got {blk}")
        object.__setattr__(self, "block", blk)
        object.__setattr__(self, "tile", _checks.check_positive_int(self.tile, "tile"))

    def bank_block(self) -> int:
        return self.block

    def check_placement(self, placement):
        if isinstance(placement, Sharded) and self.tolerance > 0:
            raise ValueError(f"search, placement: Pruned(tolerance={self.tolerance:g}) is not combined with Sharded "
                             "placement (its bound would hold per device, not for the merged result); use "
                             "Pruned(tolerance=0) (exact) with Sharded")

    def _prunes(self, queries, bank, plan) -> bool:
        return plan.bank_map is None and _pruning.prunable(queries, bank)

    def run(self, queries, bank, label, plan):
        if not self._prunes(queries, bank, plan):
            return _exact(queries, bank, label, plan)
        st, rest = _pruning.pruned_stats(queries, bank, label, tolerance=self.tolerance, tile=self.tile)
        pick = (lambda x: x[label][:, None]) if label is not None else (lambda x: x[0][None])
        return _kernel.finalize(st), _pruning.error_bound(st, rest, pick(_pruning.value_bound(bank.vv)))

    def stats(self, queries, bank, label, plan):
        if not self._prunes(queries, bank, plan):
            return bank_stats(queries, bank, label, plan)
        return _pruning.pruned_stats(queries, bank, label, tolerance=self.tolerance, tile=self.tile)[0]


@dataclasses.dataclass(frozen=True)
class CertifiedSubset(AbstractSearch):
    """Certified image-level search of the PCA-locality machine: images visited coarse to fine (a
    pooled proxy, then full resolution), scored exactly in chunks, until a rigorous bound on every
    unvisited image's mass is within ``tolerance`` (``0``: float32 cannot see them). See
    :mod:`ellsjax.machines.pca`. ``None`` options take the GoldDiff release's defaults for the
    machine's training set when the strategy is given to the machine.

    Attributes:
        tolerance: ``ε ≥ 0``.
        chunk: images per scored chunk (default ``max(k_min, 64)``, at most ``N``).
        k_max: images re-sorted at full resolution (default ``N/10``).
        proxy_side: side of the pooled proxy (default: the release's rule).
        dataset: a dataset name with release parameters (``"cifar10"``).
    """

    for_banks: ClassVar[bool] = False
    tolerance: float = 0.0
    chunk: int | None = None
    k_max: int | None = None
    proxy_side: int | None = None
    dataset: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "tolerance", _tolerance(self.tolerance, zero_ok=True, what="CertifiedSubset"))
        for name in ("chunk", "k_max", "proxy_side"):
            object.__setattr__(self, name, _checks.check_positive_int(getattr(self, name), name, allow_none=True))
        if self.dataset is not None and not isinstance(self.dataset, str):
            raise TypeError(f"dataset: expected a name, got {self.dataset!r}")

    def run(self, queries, bank, label, plan):
        raise TypeError("CertifiedSubset is the PCA-locality machine's search; bank machines do not run it")


# ----------------------------------------------------------------------------------- placement
@dataclasses.dataclass(frozen=True)
class AbstractPlacement(abc.ABC):
    """Where a machine's prebuilt banks live and how a pass over them is run."""

    @property
    def devices(self) -> int:
        return 1

    @property
    def platform(self) -> str | None:
        """The platform of the devices it names (``None``: it names none)."""
        return None

    @abc.abstractmethod
    def place(self, packed: _banks.DeviceBank) -> _banks.DeviceBank:
        """Move a host-packed bank to the device(s)."""

    @abc.abstractmethod
    def run(self, search: AbstractSearch, queries, bank, label, plan: StreamPlan):
        """``(means, bound)`` of one group over its bank."""


@dataclasses.dataclass(frozen=True)
class Single(AbstractPlacement):
    """Banks on one device (the default)."""

    def place(self, packed):
        return jax.tree.map(jnp.asarray, packed)

    def run(self, search, queries, bank, label, plan):
        return search.run(queries, bank, label, plan)


@dataclasses.dataclass(frozen=True)
class Sharded(AbstractPlacement):
    """Banks split along their entry axis over ``axis`` of ``mesh``; queries replicated.

    Each device streams its slice of every bank; the partial statistics (max, normaliser, weighted
    sum) are merged exactly with ``pmax``/``psum`` (:func:`ellsjax.kernel.merge_across`), so results
    equal the single-device ones up to float32 summation order. Banks are built on the host (per
    process) and each device receives only its slice (``jax.make_array_from_callback``), so the same
    code runs on a multi-host GPU cluster or TPU pod after ``jax.distributed.initialize()``.

    Attributes:
        mesh: a ``jax.sharding.Mesh``.
        axis: the mesh axis the banks are split along.
    """

    mesh: Any
    axis: str = "bank"

    def __post_init__(self):
        if not isinstance(self.mesh, jax.sharding.Mesh):
            raise TypeError(f"mesh: expected a jax.sharding.Mesh, got {type(self.mesh).__name__}")
        if self.axis not in self.mesh.axis_names:
            raise ValueError(f"axis: {self.axis!r} is not an axis of the mesh {tuple(self.mesh.axis_names)}")

    @property
    def devices(self) -> int:
        return int(self.mesh.shape[self.axis])

    @property
    def platform(self) -> str:
        return _platform_of(self.mesh.devices.flat[0])

    def place(self, packed):
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        def put(v, axis):
            spec = [None] * v.ndim
            spec[axis] = self.axis
            return jax.make_array_from_callback(v.shape, NamedSharding(self.mesh, P(*spec)), lambda idx: v[idx])

        blocks = None
        if packed.blocks is not None:  # each device's blocks with its entries; the rest replicated
            b = packed.blocks
            rep = lambda v: jax.device_put(v, NamedSharding(self.mesh, P()))  # noqa: E731
            blocks = _banks.BlockIndex(put(b.centers, 2), put(b.radii, 2), put(b.counts, 2), rep(b.key_norm),
                                       rep(b.basis), put(b.lo, 2), put(b.hi, 2), put(b.perp_lo, 2), put(b.perp_hi, 2))
        return _banks.DeviceBank(put(packed.keys_t, 3), put(packed.vv, 2),
                                 None if packed.values is None else put(packed.values, 2), blocks)

    def _spec(self, bank: _banks.DeviceBank):
        from jax.sharding import PartitionSpec as P

        ax = self.axis
        blocks = None
        if bank.blocks is not None:
            blocks = _banks.BlockIndex(P(None, None, ax, None), P(None, None, ax), P(None, None, ax), P(), P(),
                                       P(None, None, ax, None), P(None, None, ax, None), P(None, None, ax),
                                       P(None, None, ax))
        return _banks.DeviceBank(P(None, None, None, ax), P(None, None, ax, None),
                                 None if bank.values is None else P(None, None, ax, None), blocks)

    def run(self, search, queries, bank, label, plan):
        from jax.sharding import PartitionSpec as P

        def local(q, b, lab):
            return _kernel.finalize(_kernel.merge_across(search.stats(q, b, lab, plan), q.inv_temp, self.axis))

        bspec = self._spec(bank)
        if label is None:
            fn = jax.shard_map(lambda q, b: local(q, b, None), mesh=self.mesh, in_specs=(P(), bspec),
                               out_specs=P(), check_vma=False)
            mean = fn(queries, bank)
        else:
            fn = jax.shard_map(local, mesh=self.mesh, in_specs=(P(), bspec, P()), out_specs=P(), check_vma=False)
            mean = fn(queries, bank, label)
        return mean, _zero_bound(mean)


def _platform_of(device) -> str:
    """``"cpu"``, ``"gpu"`` or ``"tpu"`` for a device (``cuda``/``rocm`` are GPUs)."""
    p = str(device.platform).lower()
    return "gpu" if p in ("cuda", "rocm", "gpu") else p


# ----------------------------------------------------------------------- passes over one bank
def bank_stats(queries: _kernel.Queries, bank: _banks.DeviceBank, label, plan: StreamPlan):
    """Streaming-softmax statistics of ``queries`` over (this device's part of) a prebuilt bank,
    exactly, in chunks sized by the plan's policy."""
    kb, ng, d1, u = bank.keys_t.shape
    if plan.bank_map is not None:
        d1 += plan.bank_map.extra_rows
    mq = queries.q.shape[-2]
    lead = int(np.prod(queries.q.shape[:-2]))
    v1 = bank.vv.shape[-1]
    policy = plan.policy
    if (label is not None and policy.chunk_size is None and queries.q.shape[0] > 1
            and policy.budget // (4 * lead * (2 * mq + d1 + v1)) < MIN_CHUNK_ENTRIES):
        # class-conditional batch: each image has its own class's bank, so the batch cannot share
        # chunks; stream image by image rather than shrink every chunk by the batch size
        def one(args):
            q1, lab1 = args
            st = bank_stats(jax.tree.map(lambda v: v[None], q1), bank, lab1[None], plan)
            return jax.tree.map(lambda v: v[0], st)

        return jax.lax.map(one, (queries, label))
    c, tile = bank_chunk(policy, lead=lead, mq=mq, per_entry=d1 + v1, entries=u,
                         positions_per_image=plan.positions_per_image, conditional=label is not None)
    nchunks = -(-u // c)
    pick = (lambda x: x[label]) if label is not None else (lambda x: x[0])

    def bank_fn(i):
        start = jnp.minimum(i * c, u - c)
        vv = jax.lax.dynamic_slice_in_dim(bank.vv, start, c, axis=2)
        if u % c:  # the last chunk is clamped into range: entries seen already count zero
            vv = vv * (start + jnp.arange(c) >= i * c)[:, None].astype(vv.dtype)
        chunk = _kernel.PackedBank(pick(jax.lax.dynamic_slice_in_dim(bank.keys_t, start, c, axis=3)), pick(vv))
        return chunk if plan.bank_map is None else plan.bank_map(chunk)

    return _kernel.streaming_softmax(queries, bank_fn, nchunks, query_tile=tile)[1]


def topk_bank(queries: _kernel.Queries, bank: _banks.DeviceBank, label, policy: ExecutionPolicy, search: TopK):
    """:func:`ellsjax.kernel.topk_softmax` of one group's queries over its prebuilt bank."""
    kb, ng, d1, u = bank.keys_t.shape
    d = d1 - 1
    mq = queries.q.shape[-2]
    lead = int(np.prod(queries.q.shape[:-2]))
    c = int(min(max(policy.budget // (4 * lead * (2 * mq + d + 2)), search.k, 1), u))
    nchunks = -(-u // c)
    pick = (lambda x: x[label]) if label is not None else (lambda x: x[0])
    counts = bank.vv[..., 0]
    keys = jnp.swapaxes(bank.keys_t[..., :d, :], -1, -2)  # [Kb, G, U, D]
    sq = bank.keys_t[..., d, :]
    values = keys if bank.values is None else bank.values
    log_count = jnp.log(counts)  # -inf for padding
    present = counts > 0
    kmax = jnp.sqrt(jnp.max(jnp.where(present, sq, 0.0), axis=-1))
    vmax = jnp.max(jnp.where(present[..., None], jnp.abs(values), 0.0), axis=(-1, -2))

    def bank_fn(i):
        start = jnp.minimum(i * c, u - c)
        sl = lambda x: jax.lax.dynamic_slice_in_dim(x, start, c, axis=2)  # noqa: E731
        ids = start + jnp.arange(c, dtype=jnp.int32)
        lc = jnp.where(ids >= i * c, sl(log_count), -jnp.inf)
        chunk = _kernel.Bank(pick(sl(keys)), pick(sl(values)), pick(lc), pick(sl(sq)))
        return chunk, jnp.broadcast_to(ids, chunk.log_count.shape)

    def fetch_fn(ids):  # ids [*lead, m, K] -> entries of each query's own bank
        g = jnp.arange(ng).reshape((ng, 1, 1))
        b = 0 if label is None else label.reshape((-1, 1, 1, 1))
        return _kernel.Bank(keys[b, g, ids], values[b, g, ids], log_count[b, g, ids], sq[b, g, ids])

    return _kernel.topk_softmax(
        queries, bank_fn, fetch_fn, nchunks, k=min(search.k, u), total_count=pick(jnp.sum(counts, axis=-1)),
        key_norm_max=pick(kmax), value_abs_max=pick(vmax), scoring=search.scoring,
    )
