"""The base of the analytic machines: a training set (optionally split by class), an execution
policy and, once prepared, its prebuilt patch banks.

The denoiser interface itself lives in :mod:`ellsjax.denoiser`; how chunks are sized in
:mod:`ellsjax.machines._policy`; sharded banks in :mod:`ellsjax.machines._sharding`; approximate
search in :mod:`ellsjax.machines._search`; bank building in :mod:`ellsjax.machines._banks`.

**Banks are an explicit value.** :meth:`Machine.prepare` returns a new machine whose ``banks`` hold
the deduplicated banks of the requested scales (a machine never changes, and nothing is memoized on
it): keep the returned machine and pass it on. Samplers prepare for their own run; for repeated
``denoise`` calls, prepare once::

    m = ej.machines.els(images).prepare((3, 5))   # banks of k = 3 and 5, built once
    m.denoise(x, 0.5, scale=5)                    # reuses them

An unprepared machine's ``denoise`` builds the bank of its scale for that call only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ellsjax import _checks
from ellsjax import kernel as _kernel
from ellsjax import schedules as _schedules
from ellsjax.denoiser import Denoiser
from ellsjax.machines import _banks, _pruning, _search, _sharding
from ellsjax.machines._policy import (
    MIN_CHUNK_ENTRIES,
    MIN_QUERY_TILE,
    ExecutionPolicy,
    bank_chunk,
    default_memory_budget,
    images_per_chunk,
    memory_budgets,
    query_tile,
)

__all__ = [
    "Denoiser", "Machine", "ExecutionPolicy", "PixelProvenance", "default_memory_budget", "memory_budgets",
    "MIN_CHUNK_ENTRIES", "MIN_QUERY_TILE", "query_tile", "bank_key",
]


class BankMap(NamedTuple):
    """A rewrite of every streamed bank chunk (``fn(chunk) -> chunk``) that adds ``extra_rows`` rows
    to a packed chunk's keys (so that chunks are sized for what the kernel really reads)."""

    fn: Any
    extra_rows: int

    def __call__(self, chunk):
        return self.fn(chunk)


class PixelProvenance(NamedTuple):
    """Where each output pixel of one denoising call comes from (see
    :meth:`Machine._denoise_provenance` and :func:`ellsjax.explain.provenance`).

    Attributes:
        image: ``[B, H, W]`` int32 index (into the machine's training images) of the training patch
            with the largest softmax weight (first in image-then-position order among exact ties).
        row: ``[B, H, W]`` int32 row of that patch's center in its training image (for IS, whose
            "patch" is the whole image: the pixel's own row).
        col: ``[B, H, W]`` int32 column, likewise.
        weight: ``[B, H, W]`` that patch's softmax weight, in ``(0, 1]``.
        entropy: ``[B, H, W]`` entropy (nats) of the pixel's softmax weights over all training
            patches of its bank (``log N`` for ``N`` equal weights).
    """

    image: Int[Array, "b h w"]
    row: Int[Array, "b h w"]
    col: Int[Array, "b h w"]
    weight: Float[Array, "b h w"]
    entropy: Float[Array, "b h w"]


@dataclasses.dataclass(frozen=True, eq=False)
class Machine(Denoiser):
    """Base of the analytic machines: a training set, optionally split by class.

    Attributes:
        images: ``[N, H, W, C]`` float32 training images.
        class_members: ``[K, Nmax]`` int32 indices of each class's images (padded), or ``None``.
        schedule: the noise schedule.
        class_sizes: number of training images per class id ``0 … K−1`` (static), or ``None``.
        policy: how it runs (:class:`~ellsjax.machines.ExecutionPolicy`: chunking, memory and bank
            budgets, device mesh, approximate search); never what it computes.
        banks: prebuilt deduplicated banks, ``{bank_key(scale, conditional): {group: DeviceBank}}``
            (:func:`bank_key`, :class:`~ellsjax.machines._banks.DeviceBank`); empty until
            :meth:`prepare` returns a machine that carries them.
    """

    images: Float[Array, "n h w c"]
    class_members: Int[Array, "k nmax"] | None
    schedule: _schedules.Schedule = _schedules.cosine_legacy()
    class_sizes: tuple[int, ...] | None = None
    policy: ExecutionPolicy = ExecutionPolicy()
    banks: dict = dataclasses.field(default_factory=dict)

    _DATA_FIELDS: ClassVar[tuple[str, ...]] = ("images", "class_members", "banks")
    #: Whether :meth:`_denoise_provenance` is implemented (softmax machines over training patches).
    supports_provenance: ClassVar[bool] = False

    # the policy's fields, read through the machine
    chunk_size = property(lambda self: self.policy.chunk_size, doc="See :class:`ExecutionPolicy`.")
    memory_budget = property(lambda self: self.policy.memory_budget, doc="See :class:`ExecutionPolicy`.")
    bank_budget = property(lambda self: self.policy.bank_budget, doc="See :class:`ExecutionPolicy`.")
    tolerance = property(lambda self: self.policy.tolerance, doc="See :class:`ExecutionPolicy`.")
    top_k = property(lambda self: self.policy.top_k, doc="See :class:`ExecutionPolicy`.")
    scoring = property(lambda self: self.policy.scoring, doc="See :class:`ExecutionPolicy`.")
    mesh = property(lambda self: self.policy.mesh, doc="See :class:`ExecutionPolicy`.")
    mesh_axis = property(lambda self: self.policy.mesh_axis, doc="See :class:`ExecutionPolicy`.")

    def _denoise_provenance(self, x_t, t, label, scale) -> tuple[Array, PixelProvenance]:
        """``(x̂0, provenance)``: :meth:`_denoise` that also reports, per output pixel, the training
        patch with the largest weight and the weights' entropy. Streams the training images (no
        prebuilt, deduplicated bank: every patch keeps its image and position) through the same
        kernel pass (:func:`ellsjax.kernel.streaming_softmax` with ``provenance=True``). Pure and
        unchecked, like :meth:`_denoise`."""
        raise TypeError(f"{type(self).__name__} does not report provenance")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def num_images(self) -> int:
        return self.images.shape[0]

    @property
    def conditional(self) -> bool:
        return self.class_sizes is not None

    def check_label(self, label: Array | None) -> None:
        if label is None:
            return
        if self.class_sizes is None:
            raise ValueError("label: this machine was built without labels; pass labels=... to build it")
        present = [k for k, n in enumerate(self.class_sizes) if n > 0]
        bad = sorted({int(v) for v in np.asarray(label).ravel() if not (0 <= v < len(self.class_sizes)) or self.class_sizes[v] == 0})
        if bad:
            raise ValueError(f"label: no training images of class {bad}; classes present: {present}")

    def with_policy(self, **changes: Any) -> Machine:
        """This machine with some :class:`ExecutionPolicy` fields changed (same results)."""
        return dataclasses.replace(self, policy=dataclasses.replace(self.policy, **changes))

    # -- prebuilt banks ----------------------------------------------------------------------------
    def _bank_layout(self, scale: Any) -> dict[str, tuple[np.ndarray, int | None]] | None:
        """Per position group: the bank window index ``[G, Pb, kk]`` and the value's index in the
        window (``None``: the value is the whole window). ``None`` (the default): this machine has
        no banks to prebuild and reads its training set at every call."""
        return None

    def _bank_scales(self, scales: Any) -> set:
        """The bank keys' scales that running at ``scales`` needs (patch machines: the scales
        themselves; machines whose bank does not depend on the scale: ``{None}``)."""
        return {s for s in scales if s is not None} if self.needs_scale else {None}

    def prepare(self, scales: Any = (None,), *, conditional: bool = False) -> Machine:
        """Return this machine with deduplicated banks built for ``scales`` (exact, faster).

        Each bank is built on the host (identical windows stored once with their count) and placed
        on the device(s). Banks already carried are kept, so ``m.prepare((3,)).prepare((5,))``
        carries both and ``m.prepare((3,)).prepare((3,))`` builds nothing; ``self`` is unchanged.
        Banks larger than the policy's ``bank_budget`` are not built; those scales keep streaming
        windows from the images.

        Args:
            scales: the scales to prepare (``None`` entries are ignored).
            conditional: prepare the per-class banks (for ``label=...``) instead of the full one.
        """
        if (conditional and not self.conditional) or self._bank_layout(next(iter(scales), None)) is None:
            return self
        new = {}
        for k in sorted(self._bank_scales(scales), key=lambda v: (v is None, v)):
            key = bank_key(k, conditional)
            if key in self.banks:
                continue
            built = self._build_bank(k, conditional)
            if built is not None:
                new[key] = built
        if not new:
            return self
        return dataclasses.replace(self, banks={**self.banks, **new})

    def _ready(self, scale: Any, label: Any) -> Machine:
        # a checked call on concrete arrays runs on the banks of its scale: carried, or built for this
        # call only (prepare once and keep the result for repeated calls)
        if not all(_checks.is_concrete(x) for x in jax.tree.leaves(self)):
            return self
        return self.prepare((scale,), conditional=label is not None)

    def with_search(self, *, tolerance: float | None, top_k: int = 64, scoring: str = "bfloat16") -> Machine:
        """Return this machine with approximate search switched on (or off with ``tolerance=None``).

        At every call and for every group of pixels, the ``top_k`` best candidates per query are
        retrieved from a ``scoring``-precision GEMM and re-scored exactly
        (:func:`ellsjax.kernel.topk_softmax`); if the resulting error bound of every output value is
        at most ``tolerance`` that result is used, otherwise the exact search runs. So results stay
        within ``tolerance`` (plus float32 rounding) of the exact ones, and the approximate search
        is used where the posterior is concentrated (low noise). It needs prebuilt banks (see
        :meth:`prepare`); scales whose bank exceeds ``bank_budget`` stay exact. Retrieval is exact
        top-k on CPU/GPU and ``approx_max_k`` on TPU (bound then as stated by its recall target).
        On CPUs top-k selection costs more than the exponentials it saves: use it on accelerators.

        Example:
            >>> import jax, ellsjax as ej
            >>> imgs = jax.random.uniform(jax.random.key(0), (8, 8, 8, 1), minval=-1, maxval=1)
            >>> m = ej.machines.els(imgs).with_search(tolerance=1e-3, top_k=16)
            >>> m.denoise(imgs[:1], 0.05, scale=3).shape
            (1, 8, 8, 1)
        """
        return _search.with_search(self, tolerance=tolerance, top_k=top_k, scoring=scoring)

    def with_pruning(self, tolerance: float | None = 0.0, *, block: int = 512, tile: int = 256) -> Machine:
        """Return this machine with pruned streaming of its prebuilt banks (or without: ``None``).

        The banks are rebuilt with their entries in blocks lying in balls; each group's queries are
        sorted into tiles of similar queries, and per tile the blocks are visited best-bound-first
        until every remaining block is provably invisible (:mod:`ellsjax.machines._pruning`):

        * ``tolerance=0`` (exact): skipped entries would have float32 weight exactly 0, so results
          equal the unpruned ones up to float32 summation order;
        * ``tolerance=ε > 0``: blocks are skipped while ``|x̂0 − exact| ≤ ε`` in every output value,
          a bound :meth:`denoise_with_bound` returns.

        Pruning serves the prebuilt banks of single-bank groups (ELS, the bbELS interior, IS;
        conditional and sharded banks too); other groups stream exactly.

        Args:
            tolerance: ``None`` (off), ``0.0`` (exact) or ``ε > 0``.
            block: entries per bounded block (a power of two).
            tile: queries per tile of similar queries.

        Example:
            >>> import jax, ellsjax as ej
            >>> imgs = jax.random.uniform(jax.random.key(0), (20, 8, 8, 1), minval=-1, maxval=1)
            >>> m = ej.machines.els(imgs).with_pruning(0.0, block=16).prepare((3,))
            >>> x = imgs[:1] * 0.9
            >>> bool(abs(m.denoise(x, 0.05, scale=3) - ej.machines.els(imgs).denoise(x, 0.05, scale=3)).max() < 1e-5)
            True
        """
        policy = dataclasses.replace(self.policy, prune=tolerance, prune_block=block, prune_tile=tile,
                                     tolerance=None)
        return dataclasses.replace(self, policy=policy, banks={})

    def denoise_with_bound(self, x_t: Any, t: Any, *, scale: Any = None, label: Any = None):
        """Certified posterior mean and its error bound per pixel: by pruning
        (:meth:`with_pruning`) where it is on, else by the top-``top_k`` search (:meth:`with_search`).

        Returns:
            ``(x0_hat [B, H, W, C], bound [B, H, W])``: ``|x0_hat − exact| ≤ bound`` in every channel
            (plus float32 rounding). Needs a bank that fits ``bank_budget``.
        """
        return _search.denoise_with_bound(self, x_t, t, scale=scale, label=label)

    def _build_bank(self, k, conditional):
        layout = self._bank_layout(k)
        n, ch = self.num_images, self.image_shape[-1]
        if sum(_banks.bank_nbytes(n, b, ch, c is not None) for b, c in layout.values()) > self.policy.bank_bytes:
            return None
        images = np.asarray(self.images)
        if conditional:
            members = [np.asarray(self.class_members)[y, :size] for y, size in enumerate(self.class_sizes)]
        else:
            members = [np.arange(n)]
        return {name: _sharding.place(self, _banks.build_group_bank(images, members, bidx, center))
                for name, (bidx, center) in layout.items()}

    def _stream_bank(self, queries, bank: _banks.DeviceBank, label, positions_per_image: int, bank_map=None):
        """Posterior means of one group's queries over its prebuilt bank.

        ``queries`` have leading dims ``[G]`` (one bank for the batch) or ``[B, G]`` (``label``:
        each image against its class's bank). With a mesh (:meth:`shard`) every device streams its
        slice of the bank and the partial statistics are merged exactly across devices.
        ``bank_map`` (optional, a :class:`BankMap`) rewrites each streamed chunk (the soft-window
        machines' weighted layout); such calls search exactly.
        """
        if self.policy.mesh is not None:
            return _sharding.stream_sharded(self, queries, bank, label, positions_per_image, bank_map)
        exact = lambda: _kernel.finalize(  # noqa: E731
            self._bank_stats(queries, bank, label, positions_per_image, bank_map))
        if bank_map is not None or self.policy.prune is not None:
            return exact()
        return _search.exact_or_search(self, queries, bank, label, exact)

    def _bounded_means(self, queries, bank: _banks.DeviceBank, label):
        """``(means, bound)`` of one group over its prebuilt bank under the certified mode in use:
        pruning (:meth:`with_pruning`) or top-k search (:meth:`with_search`); ``bound`` bounds
        ``max_v |means − exact|`` per query."""
        if self.policy.prune is not None:
            if self._prunes(queries, bank, None):
                st, rest = _pruning.pruned_stats(queries, bank, label, tolerance=self.policy.prune,
                                                 tile=self.policy.prune_tile)
                pick = (lambda x: x[label][:, None]) if label is not None else (lambda x: x[0][None])
                return _kernel.finalize(st), _pruning.error_bound(st, rest, pick(_pruning.value_bound(bank.vv)))
            mean = self._stream_bank(queries, bank, label, 1)
            return mean, jnp.zeros(mean.shape[:-1], mean.dtype)
        res = _search.topk_bank(self, queries, bank, label)
        return res.mean, res.error_bound

    def _prunes(self, queries, bank: _banks.DeviceBank, bank_map) -> bool:
        """Whether this group's pass is pruned (:mod:`ellsjax.machines._pruning`)."""
        return self.policy.prune is not None and bank_map is None and _pruning.prunable(queries, bank)

    def _bank_stats(self, queries, bank: _banks.DeviceBank, label, positions_per_image: int, bank_map=None):
        """Streaming-softmax statistics of ``queries`` over (this device's part of) a prebuilt bank."""
        if self._prunes(queries, bank, bank_map):
            return _pruning.pruned_stats(queries, bank, label, tolerance=self.policy.prune,
                                         tile=self.policy.prune_tile)[0]
        kb, ng, d1, u = bank.keys_t.shape
        if bank_map is not None:
            d1 += bank_map.extra_rows
        mq = queries.q.shape[-2]
        lead = int(np.prod(queries.q.shape[:-2]))
        v1 = bank.vv.shape[-1]
        policy = self.policy
        if (label is not None and policy.chunk_size is None and queries.q.shape[0] > 1
                and policy.budget // (4 * lead * (2 * mq + d1 + v1)) < MIN_CHUNK_ENTRIES):
            # class-conditional batch: each image has its own class's bank, so the batch cannot share
            # chunks; stream image by image rather than shrink every chunk by the batch size
            def one(args):
                q1, lab1 = args
                st = self._bank_stats(jax.tree.map(lambda v: v[None], q1), bank, lab1[None], positions_per_image,
                                      bank_map)
                return jax.tree.map(lambda v: v[0], st)

            return jax.lax.map(one, (queries, label))
        c, tile = bank_chunk(policy, lead=lead, mq=mq, per_entry=d1 + v1, entries=u,
                             positions_per_image=positions_per_image, conditional=label is not None)
        nchunks = -(-u // c)
        pick = (lambda x: x[label]) if label is not None else (lambda x: x[0])

        def bank_fn(i):
            start = jnp.minimum(i * c, u - c)
            vv = jax.lax.dynamic_slice_in_dim(bank.vv, start, c, axis=2)
            if u % c:  # the last chunk is clamped into range: entries seen already count zero
                vv = vv * (start + jnp.arange(c) >= i * c)[:, None].astype(vv.dtype)
            chunk = _kernel.PackedBank(pick(jax.lax.dynamic_slice_in_dim(bank.keys_t, start, c, axis=3)), pick(vv))
            return chunk if bank_map is None else bank_map(chunk)

        return _kernel.streaming_softmax(queries, bank_fn, nchunks, query_tile=tile)[1]

    def shard(self, mesh: Any = None, *, axis: str = "bank") -> Machine:
        """Return this machine with its prebuilt banks split across devices along ``axis`` of ``mesh``.

        Each device streams its slice of every bank; the partial statistics (max, normaliser,
        weighted sum) are merged exactly with ``pmax``/``psum`` (:func:`ellsjax.kernel.merge_across`),
        so results equal the single-device ones up to float32 summation order. Queries are
        replicated. Banks are built on the host (per process) and each device receives only its
        slice (``jax.make_array_from_callback``), so the same code runs on a multi-host GPU cluster or
        TPU pod after ``jax.distributed.initialize()`` with a mesh over ``jax.devices()``. Scales whose
        bank exceeds ``bank_budget`` (a per-process host budget) stream images on each device
        unsharded. Approximate search (:meth:`with_search`) is not combined with sharding: sharded
        machines search exactly. Banks carried so far are dropped (:meth:`prepare` rebuilds them
        split over the mesh).

        Args:
            mesh: a ``jax.sharding.Mesh``; default: all devices on one axis named ``axis``.
            axis: the mesh axis the banks are split along.
        """
        return _sharding.shard(self, mesh, axis=axis)

    # -- the streamed training set ---------------------------------------------------------------------
    def _chunking(self, label: Array | None, bytes_per_image: int) -> tuple[Array, Array, int, int]:
        """Member indices ``[Gb, n_chunks·c]``, validity mask, number of chunks and images per chunk.

        ``Gb = 1`` without labels (one bank shared by the whole batch), ``Gb = B`` with labels (each
        image searches only its own class).
        """
        n = self.num_images if label is None else max(self.class_sizes)
        c = images_per_chunk(self.policy, n, bytes_per_image)
        nch = -(-n // c)
        width = nch * c
        if label is None:
            members = jnp.arange(width, dtype=jnp.int32)[None] % self.num_images
            valid = (jnp.arange(width) < self.num_images)[None]
        else:
            members = jnp.pad(self.class_members[label], ((0, 0), (0, width - n)))
            sizes = jnp.asarray(self.class_sizes, jnp.int32)[label]
            valid = jnp.arange(width)[None, :] < sizes[:, None]
        return members, valid, nch, c

    def _chunk(self, members, valid, c, i):
        idx = jax.lax.dynamic_slice_in_dim(members, i * c, c, axis=1)
        ok = jax.lax.dynamic_slice_in_dim(valid, i * c, c, axis=1)
        return self.images[idx], ok  # [Gb, c, H, W, C], [Gb, c]


def bank_key(scale: int | None, conditional: bool) -> str:
    """Key of a prebuilt bank in :attr:`Machine.banks`."""
    return f"k{scale}" + ("/class" if conditional else "")


def register(cls, extra_meta: tuple[str, ...] = ()):
    """Register a :class:`Machine` dataclass subclass as a pytree (arrays are leaves)."""
    meta = [f.name for f in dataclasses.fields(cls) if f.name not in cls._DATA_FIELDS]
    return jax.tree_util.register_dataclass(cls, data_fields=list(cls._DATA_FIELDS), meta_fields=meta)


def build(cls, images, labels, *, schedule, chunk_size=None, memory_budget=None, bank_budget=None,
          image_range=(-1.0, 1.0), **extra):
    """Check the common constructor arguments and build a machine of class ``cls``."""
    imgs, members, sizes = prepare_training_set(images, labels, image_range=image_range)
    policy = ExecutionPolicy(chunk_size=chunk_size, memory_budget=memory_budget, bank_budget=bank_budget)
    return cls(imgs, members, schedule=_schedules.get(schedule), class_sizes=sizes, policy=policy, **extra)


def prepare_training_set(
    images: Any, labels: Any, *, image_range: tuple[float, float] | None = (-1.0, 1.0)
) -> tuple[Array, Array | None, tuple[int, ...] | None]:
    """Check training images/labels (values within ``image_range`` unless it is ``None``); build
    per-class member lists. Returns ``(images, members, sizes)``."""
    images = _checks.as_image_batch(images, "images", in_range=image_range)
    if labels is None:
        return images, None, None
    lab = np.asarray(labels)
    if not np.issubdtype(lab.dtype, np.integer):
        raise TypeError(f"labels: expected integer class ids, got dtype {lab.dtype}")
    if lab.shape != (images.shape[0],):
        raise ValueError(f"labels: expected shape [{images.shape[0]}] (one per image), got {lab.shape}")
    if lab.min() < 0:
        raise ValueError(f"labels: class ids must be >= 0, got {int(lab.min())}")
    k = int(lab.max()) + 1
    sizes = tuple(int(s) for s in np.bincount(lab, minlength=k))
    nmax = max(sizes)
    members = np.zeros((k, nmax), np.int32)
    for cls in range(k):
        idx = np.flatnonzero(lab == cls)
        members[cls, : len(idx)] = idx
    return images, jnp.asarray(members), sizes
