"""The denoiser interface shared by analytic machines and trained networks, and the machines' base.

A :class:`Denoiser` maps a noisy batch ``x_t`` at time ``t`` to the posterior-mean estimate ``x̂0``;
``score`` and ``eps`` follow from it:

    score(x_t, t) = (a·x̂0 − x_t)/s²,      ε̂(x_t, t) = (x_t − a·x̂0)/s.

Two levels: ``denoise``/``score``/``eps`` check their arguments and run a cached ``jax.jit``;
``_denoise(x_t, t, label, scale)`` is the pure, unchecked function that samplers call inside their
own jitted programs (``t`` and ``label`` already per-example arrays).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ellsjax import _checks
from ellsjax import kernel as _kernel
from ellsjax import schedules as _schedules
from ellsjax.machines import _banks

__all__ = [
    "Denoiser", "Machine", "PixelProvenance", "DEFAULT_MEMORY_BUDGET", "DEFAULT_BANK_BUDGET", "default_memory_budget",
    "MIN_CHUNK_ENTRIES", "MIN_QUERY_TILE", "query_tile",
    "bank_key",
]

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


#: Default bytes of temporaries per streamed chunk (logits, gathered patches), per backend: on CPU
#: half the last-level cache (:func:`_cpu_chunk_budget`); accelerators want large chunks to fill
#: the device.
DEFAULT_MEMORY_BUDGET = {"cpu": _cpu_chunk_budget(), "gpu": 1024 * 2**20, "tpu": 1024 * 2**20}


#: Default bytes one scale's materialized bank may take, per backend.
DEFAULT_BANK_BUDGET = {"cpu": 2**30, "gpu": 4 * 2**30, "tpu": 4 * 2**30}


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


def default_memory_budget() -> int:
    """The chunk memory budget used when a machine's ``memory_budget`` is ``None``."""
    return DEFAULT_MEMORY_BUDGET.get(jax.default_backend(), 256 * 2**20)


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


class Denoiser:
    """Interface: something that returns ``x̂0 = E[x0 | x_t]`` under a noise schedule.

    Subclasses set ``schedule``, ``image_shape`` (``(H, W, C)``), ``conditional`` and implement
    ``_denoise`` and ``check_scale``. They must be pytrees so that they can be passed to
    ``jax.jit`` (all machines here are registered dataclasses).
    """

    schedule: _schedules.Schedule
    #: Whether ``scale`` (a patch size) is required.
    needs_scale: ClassVar[bool] = False
    #: ``x̂0`` is defined only where ``ᾱ(t)`` exceeds this (a network divides by ``a``; the machines'
    #: softmax is defined everywhere, hence ``-1``). Samplers check their grids against it.
    min_signal_var: ClassVar[float] = -1.0

    @property
    def image_shape(self) -> tuple[int, int, int]:
        raise NotImplementedError

    @property
    def conditional(self) -> bool:
        return False

    # -- to implement -------------------------------------------------------------------------------
    def _denoise(
        self, x_t: Float[Array, "b h w c"], t: Float[Array, " b"], label: Int[Array, " b"] | None, scale: int | None
    ) -> Float[Array, "b h w c"]:
        raise NotImplementedError

    def check_scale(self, scale: Any) -> int | None:
        """Validate a locality scale for this denoiser; return it normalised (or ``None``)."""
        return None

    def prepare(self, scales: Any = (None,), *, conditional: bool = False) -> "Denoiser":
        """Return a denoiser ready to run at these scales (e.g. with prebuilt banks); same results.

        The default has nothing to prepare and returns ``self``.
        """
        return self

    def check_label(self, label: Array | None) -> None:
        """Validate concrete labels (the default accepts only ``None``)."""
        if label is not None:
            raise ValueError("label: this denoiser is unconditional; pass label=None")

    # -- public, checked --------------------------------------------------------------------------
    def check_inputs(self, x_t: Any, t: Any, *, scale: Any = None, label: Any = None):
        """Check and normalise the arguments of :meth:`denoise`; returns ``(x_t, t, label, scale)``."""
        x_t = _checks.as_image_batch(x_t, "x_t", shape=self.image_shape)
        t = _checks.as_times(t, x_t.shape[0])
        label = _checks.as_labels(label, x_t.shape[0])
        if _checks.is_concrete(label) or label is None:
            self.check_label(label)
        return x_t, t, label, self.check_scale(scale)

    def denoise(self, x_t: Any, t: Any, *, scale: int | None = None, label: Any = None) -> Float[Array, "b h w c"]:
        """Posterior mean ``x̂0 = E[x0 | x_t]``.

        Args:
            x_t: ``[B, H, W, C]`` float noisy images.
            t: a time in ``[0, 1]`` or one per image (``[B]``).
            scale: the locality scale (odd patch size) for local machines.
            label: ``None``, a class id, or one per image (``[B]``), for conditional denoising.
        """
        x_t, t, label, scale = self.check_inputs(x_t, t, scale=scale, label=label)
        return _jit_denoise(self._ready(scale, label), x_t, t, label, scale)

    def score(self, x_t: Any, t: Any, *, scale: int | None = None, label: Any = None) -> Float[Array, "b h w c"]:
        """Score ``∇ log p_t(x_t) = (a·x̂0 − x_t)/s²``. Undefined at ``s(t) = 0`` (raises)."""
        x_t, t, label, scale = self.check_inputs(x_t, t, scale=scale, label=label)
        self._check_noisy(t, "score")
        return _jit_score(self._ready(scale, label), x_t, t, label, scale)

    def eps(self, x_t: Any, t: Any, *, scale: int | None = None, label: Any = None) -> Float[Array, "b h w c"]:
        """Noise prediction ``ε̂ = (x_t − a·x̂0)/s``. Undefined at ``s(t) = 0`` (raises)."""
        x_t, t, label, scale = self.check_inputs(x_t, t, scale=scale, label=label)
        self._check_noisy(t, "eps")
        return _jit_eps(self._ready(scale, label), x_t, t, label, scale)

    def _ready(self, scale, label) -> "Denoiser":
        # Build what this scale needs once (memoized); skipped for traced machines (user's jit).
        if all(_checks.is_concrete(x) for x in jax.tree.leaves(self)):
            return self.prepare((scale,), conditional=label is not None)
        return self

    def _check_noisy(self, t: Array, what: str) -> None:
        if _checks.is_concrete(t) and bool(jnp.any(self.schedule.variances(t)[1] <= 0)):
            raise ValueError(
                f"t: the {what} diverges where the noise level s(t) is 0 (t = 0 for this schedule); "
                "use denoise() there, which returns the nearest-neighbour limit"
            )

    def _score(self, x_t, t, label, scale):
        a, var = _ab(self.schedule, t)
        x0 = self._denoise(x_t, t, label, scale)
        return (a * x0 - x_t) / var

    def _eps(self, x_t, t, label, scale):
        a, var = _ab(self.schedule, t)
        x0 = self._denoise(x_t, t, label, scale)
        return (x_t - a * x0) / jnp.sqrt(var)


def _ab(schedule, t):
    ab, var = schedule.variances(t)
    return jnp.sqrt(ab)[:, None, None, None], var[:, None, None, None]


@partial(jax.jit, static_argnums=(4,))
def _jit_denoise(d, x_t, t, label, scale):
    return d._denoise(x_t, t, label, scale)


@partial(jax.jit, static_argnums=(4,))
def _jit_score(d, x_t, t, label, scale):
    return d._score(x_t, t, label, scale)


@partial(jax.jit, static_argnums=(4,))
def _jit_eps(d, x_t, t, label, scale):
    return d._eps(x_t, t, label, scale)


@partial(jax.jit, static_argnums=(4,))
def _jit_topk(d, x_t, t, label, scale):
    return d._denoise_topk(x_t, t, label, scale)


@dataclasses.dataclass(frozen=True, eq=False)
class Machine(Denoiser):
    """Base of the analytic machines: a training set, optionally split by class.

    Attributes:
        images: ``[N, H, W, C]`` float32 training images.
        class_members: ``[K, Nmax]`` int32 indices of each class's images (padded), or ``None``.
        schedule: the noise schedule.
        class_sizes: number of training images per class id ``0 … K−1`` (static), or ``None``.
        chunk_size: training images per streamed chunk; ``None`` picks it from ``memory_budget``.
        memory_budget: bytes of temporaries allowed per chunk when ``chunk_size`` is ``None``
            (``None``: :func:`default_memory_budget` of the backend).
        bank_budget: bytes a materialized bank of one scale may take (``None``: a per-backend
            default, :data:`DEFAULT_BANK_BUDGET`); larger banks are gathered from the images chunk by
            chunk at every call instead (same result, slower).
        banks: prebuilt deduplicated banks by ``"k{scale}"`` / ``"k{scale}/class"`` (see
            :meth:`prepare`); empty until prepared.
        tolerance: ``None`` (exact search) or the largest error allowed per output value for the
            approximate top-``top_k`` search (see :meth:`with_search`).
        top_k: candidates per query of the approximate search.
        scoring: GEMM input precision of the approximate search's candidate scoring.
        mesh: a ``jax.sharding.Mesh`` the prebuilt banks are split over (see :meth:`shard`), or ``None``.
        mesh_axis: the mesh axis the banks are split along.
    """

    images: Float[Array, "n h w c"]
    class_members: Int[Array, "k nmax"] | None
    schedule: _schedules.Schedule = _schedules.cosine_legacy()
    class_sizes: tuple[int, ...] | None = None
    chunk_size: int | None = None
    memory_budget: int | None = None
    bank_budget: int | None = None
    banks: dict = dataclasses.field(default_factory=dict)
    tolerance: float | None = None
    top_k: int = 64
    scoring: str = "bfloat16"
    mesh: Any = None
    mesh_axis: str = "bank"

    _DATA_FIELDS: ClassVar[tuple[str, ...]] = ("images", "class_members", "banks")
    #: Whether :meth:`_denoise_provenance` is implemented (softmax machines over training patches).
    supports_provenance: ClassVar[bool] = False

    def _denoise_provenance(self, x_t, t, label, scale) -> tuple[Array, PixelProvenance]:
        """``(x̂0, provenance)``: :meth:`_denoise` that also reports, per output pixel, the training
        patch with the largest weight and the weights' entropy. Streams the training images (no
        prebuilt, deduplicated bank: every patch keeps its image and position) through the same
        kernel pass (:func:`ellsjax.kernel.streaming_softmax` with ``provenance=True``). Pure and
        unchecked, like :meth:`_denoise`."""
        raise NotImplementedError(f"{type(self).__name__} does not report provenance")

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

    # -- prebuilt banks ----------------------------------------------------------------------------
    def _bank_layout(self, scale: int | None) -> dict[str, tuple[np.ndarray, int | None]] | None:
        """Per position group: the bank window index ``[G, Pb, kk]`` and the value's index in the
        window (``None``: the value is the whole window). ``None`` (the default): this machine has
        no banks to prebuild and reads its training set at every call."""
        return None

    def prepare(self, scales: Any = (None,), *, conditional: bool = False) -> "Machine":
        """Return this machine with deduplicated banks built for ``scales`` (exact, faster).

        Each bank is built once on the host (identical windows stored once with their count) and
        memoized on this object, so repeated calls are free. Banks larger than ``bank_budget`` are
        not built; those scales keep streaming windows from the images. Called automatically by
        ``denoise``/``score``/``eps`` and the samplers.

        Args:
            scales: the patch sizes to prepare (``None`` entries are ignored).
            conditional: prepare the per-class banks (for ``label=...``) instead of the full one.
        """
        if (conditional and not self.conditional) or self._bank_layout(next(iter(scales), None)) is None:
            return self
        memo = self.__dict__.setdefault("_bank_memo", {})
        new = {}
        wanted = {s for s in scales if s is not None} if self.needs_scale else {None}
        for k in wanted:
            key = bank_key(k, conditional)
            if key in self.banks:
                continue
            if key not in memo:
                memo[key] = self._build_bank(k, conditional)
            if memo[key] is not None:
                new[key] = memo[key]
        if not new:
            return self
        return dataclasses.replace(self, banks={**self.banks, **new})

    def with_search(self, *, tolerance: float | None, top_k: int = 64, scoring: str = "bfloat16") -> "Machine":
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
        if tolerance is not None and not (float(tolerance) > 0):
            raise ValueError(f"tolerance: must be positive (or None for exact search), got {tolerance!r}")
        top_k = _checks.check_positive_int(top_k, "top_k")
        if scoring not in ("bfloat16", "float32"):
            raise ValueError(f"scoring: must be 'bfloat16' or 'float32', got {scoring!r}")
        return dataclasses.replace(
            self, tolerance=None if tolerance is None else float(tolerance), top_k=top_k, scoring=scoring
        )

    def denoise_with_bound(self, x_t: Any, t: Any, *, scale: int | None = None, label: Any = None):
        """Approximate posterior mean by the top-``top_k`` search, and its error bound per pixel.

        Returns:
            ``(x0_hat [B, H, W, C], bound [B, H, W])``: ``|x0_hat − exact| ≤ bound`` in every channel
            (plus float32 rounding). Needs a bank that fits ``bank_budget``.
        """
        x_t, t, label, scale = self.check_inputs(x_t, t, scale=scale, label=label)
        if self._bank_layout(scale) is None:
            raise ValueError(f"{type(self).__name__} has no patch bank to search; approximate search needs one")
        ready = self.prepare((scale,), conditional=label is not None)
        if bank_key(scale if self.needs_scale else None, label is not None) not in ready.banks:
            raise ValueError("scale: the bank of this scale exceeds bank_budget; approximate search needs a prebuilt bank")
        return _jit_topk(ready, x_t, t, label, scale)

    def _topk_bank(self, queries, bank: "_banks.DeviceBank", label):
        """:func:`ellsjax.kernel.topk_softmax` of one group's queries over its prebuilt bank."""
        kb, ng, d1, u = bank.keys_t.shape
        d = d1 - 1
        mq = queries.q.shape[-2]
        lead = int(np.prod(queries.q.shape[:-2]))
        budget = self.memory_budget or default_memory_budget()
        c = int(min(max(budget // (4 * lead * (2 * mq + d + 2)), self.top_k, 1), u))
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
            queries, bank_fn, fetch_fn, nchunks, k=min(self.top_k, u), total_count=pick(jnp.sum(counts, axis=-1)),
            key_norm_max=pick(kmax), value_abs_max=pick(vmax), scoring=self.scoring,
        )

    def _build_bank(self, k, conditional):
        layout = self._bank_layout(k)
        n, ch = self.num_images, self.image_shape[-1]
        budget = self.bank_budget or DEFAULT_BANK_BUDGET.get(jax.default_backend(), 2**30)
        if sum(_banks.bank_nbytes(n, b, ch, c is not None) for b, c in layout.values()) > budget:
            return None
        images = np.asarray(self.images)
        if conditional:
            members = [np.asarray(self.class_members)[y, :size] for y, size in enumerate(self.class_sizes)]
        else:
            members = [np.arange(n)]
        out = {}
        for name, (bidx, center) in layout.items():
            gb = _banks.build_group_bank(images, members, bidx, center)
            out[name] = self._place(gb)
        return out

    def _place(self, gb: "_banks.GroupBank") -> "_banks.DeviceBank":
        """Pack a host bank for the kernel and move it to the device(s): whole, or split along its
        entry axis over the mesh."""
        ndev = 1 if self.mesh is None else self.mesh.shape[self.mesh_axis]
        packed = _banks.pack_group_bank(gb, _banks.pad_multiple(gb.keys.shape[2], ndev))
        if self.mesh is None:
            return _banks.DeviceBank(*(None if v is None else jnp.asarray(v) for v in packed))
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        def put(v, axis):
            spec = [None] * v.ndim
            spec[axis] = self.mesh_axis
            return jax.make_array_from_callback(v.shape, NamedSharding(self.mesh, P(*spec)), lambda idx: v[idx])

        return _banks.DeviceBank(put(packed.keys_t, 3), put(packed.vv, 2), None if packed.values is None else put(packed.values, 2))

    def _stream_bank(self, queries, bank: "_banks.DeviceBank", label, positions_per_image: int):
        """Posterior means of one group's queries over its prebuilt bank.

        ``queries`` have leading dims ``[G]`` (one bank for the batch) or ``[B, G]`` (``label``:
        each image against its class's bank). With a mesh (:meth:`shard`) every device streams its
        slice of the bank and the partial statistics are merged exactly across devices.
        """
        if self.mesh is not None:
            return self._stream_sharded(queries, bank, label, positions_per_image)

        def exact():
            return _kernel.finalize(self._bank_stats(queries, bank, label, positions_per_image))

        if self.tolerance is None:
            return exact()
        approx = self._topk_bank(queries, bank, label)
        return jax.lax.cond(jnp.all(approx.error_bound <= self.tolerance), lambda: approx.mean, exact)

    def _bank_stats(self, queries, bank: "_banks.DeviceBank", label, positions_per_image: int):
        """Streaming-softmax statistics of ``queries`` over (this device's part of) a prebuilt bank."""
        kb, ng, d1, u = bank.keys_t.shape
        mq = queries.q.shape[-2]
        lead = int(np.prod(queries.q.shape[:-2]))
        v1 = bank.vv.shape[-1]
        budget = self.memory_budget or default_memory_budget()
        if (label is not None and self.chunk_size is None and queries.q.shape[0] > 1
                and budget // (4 * lead * (2 * mq + d1 + v1)) < MIN_CHUNK_ENTRIES):
            # class-conditional batch: each image has its own class's bank, so the batch cannot share
            # chunks; stream image by image rather than shrink every chunk by the batch size
            def one(args):
                q1, lab1 = args
                st = self._bank_stats(jax.tree.map(lambda v: v[None], q1), bank, lab1[None], positions_per_image)
                return jax.tree.map(lambda v: v[0], st)

            return jax.lax.map(one, (queries, label))
        tile = None
        if self.chunk_size is not None:
            c = self.chunk_size * positions_per_image
        else:
            # per bank entry: logits and weights of every query, plus the entry itself, per group;
            # a power of two divides the padded bank, so no chunk overlaps the previous one
            tile = query_tile(budget, lead, mq, d1 + v1, 2) if label is None else None
            c = 1 << max(0, int(budget // (4 * lead * (2 * (tile or mq) + d1 + v1))).bit_length() - 1)
        c = int(min(max(c, 1), u))
        nchunks = -(-u // c)
        pick = (lambda x: x[label]) if label is not None else (lambda x: x[0])

        def bank_fn(i):
            start = jnp.minimum(i * c, u - c)
            vv = jax.lax.dynamic_slice_in_dim(bank.vv, start, c, axis=2)
            if u % c:  # the last chunk is clamped into range: entries seen already count zero
                vv = vv * (start + jnp.arange(c) >= i * c)[:, None].astype(vv.dtype)
            return _kernel.PackedBank(pick(jax.lax.dynamic_slice_in_dim(bank.keys_t, start, c, axis=3)), pick(vv))

        return _kernel.streaming_softmax(queries, bank_fn, nchunks, query_tile=tile)[1]

    def _stream_sharded(self, queries, bank, label, positions_per_image):
        from jax.sharding import PartitionSpec as P

        ax = self.mesh_axis
        bspec = _banks.DeviceBank(P(None, None, None, ax), P(None, None, ax, None),
                                  None if bank.values is None else P(None, None, ax, None))

        def local(q, b, lab):
            stats = self._bank_stats(q, b, lab, positions_per_image)
            return _kernel.finalize(_kernel.merge_across(stats, q.inv_temp, ax))

        if label is None:
            fn = jax.shard_map(lambda q, b: local(q, b, None), mesh=self.mesh, in_specs=(P(), bspec), out_specs=P(),
                               check_vma=False)
            return fn(queries, bank)
        fn = jax.shard_map(local, mesh=self.mesh, in_specs=(P(), bspec, P()), out_specs=P(), check_vma=False)
        return fn(queries, bank, label)

    def shard(self, mesh: Any = None, *, axis: str = "bank") -> "Machine":
        """Return this machine with its prebuilt banks split across devices along ``axis`` of ``mesh``.

        Each device streams its slice of every bank; the partial statistics (max, normaliser,
        weighted sum) are merged exactly with ``pmax``/``psum`` (:func:`ellsjax.kernel.merge_across`),
        so results equal the single-device ones up to float32 summation order. Queries are
        replicated. Banks are built on the host (per process) and each device receives only its
        slice (``jax.make_array_from_callback``), so the same code runs on a multi-host GPU cluster or
        TPU pod after ``jax.distributed.initialize()`` with a mesh over ``jax.devices()``. Scales whose
        bank exceeds ``bank_budget`` (a per-process host budget) stream images on each device
        unsharded. Approximate search (:meth:`with_search`) is not combined with sharding: sharded
        machines search exactly.

        Args:
            mesh: a ``jax.sharding.Mesh``; default: all devices on one axis named ``axis``.
            axis: the mesh axis the banks are split along.
        """
        if mesh is None:
            mesh = jax.make_mesh((jax.device_count(),), (axis,), axis_types=(jax.sharding.AxisType.Explicit,))
        if axis not in mesh.axis_names:
            raise ValueError(f"axis: {axis!r} is not an axis of the mesh {tuple(mesh.axis_names)}")
        return dataclasses.replace(self, mesh=mesh, mesh_axis=axis, banks={}, tolerance=None)

    # -- the streamed training set ---------------------------------------------------------------------
    def _chunking(self, label: Array | None, bytes_per_image: int) -> tuple[Array, Array, int, int]:
        """Member indices ``[Gb, n_chunks·c]``, validity mask, number of chunks and images per chunk.

        ``Gb = 1`` without labels (one bank shared by the whole batch), ``Gb = B`` with labels (each
        image searches only its own class).
        """
        n = self.num_images if label is None else max(self.class_sizes)
        if self.chunk_size is not None:
            c = min(self.chunk_size, n)
        else:
            budget = self.memory_budget or default_memory_budget()
            c = int(min(max(1, budget // max(1, bytes_per_image)), n))
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


def build(cls, images, labels, *, schedule, chunk_size, memory_budget, bank_budget=None, **extra):
    """Check the common constructor arguments and build a machine of class ``cls``."""
    imgs, members, sizes = prepare_training_set(images, labels)
    if chunk_size is not None:
        chunk_size = _checks.check_positive_int(chunk_size, "chunk_size")
    if memory_budget is not None:
        memory_budget = _checks.check_positive_int(memory_budget, "memory_budget")
    if bank_budget is not None:
        bank_budget = _checks.check_positive_int(bank_budget, "bank_budget")
    return cls(
        imgs,
        members,
        schedule=_schedules.get(schedule),
        class_sizes=sizes,
        chunk_size=chunk_size,
        memory_budget=memory_budget,
        bank_budget=bank_budget,
        **extra,
    )


def prepare_training_set(images: Any, labels: Any) -> tuple[Array, Array | None, tuple[int, ...] | None]:
    """Check training images/labels; build per-class member lists. Returns ``(images, members, sizes)``."""
    images = _checks.as_image_batch(images, "images")
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
