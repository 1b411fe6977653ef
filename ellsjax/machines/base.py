"""The bases of the analytic machines: a training set (optionally split by class) and an execution
policy (:class:`Machine`); bank machines add prebuilt patch banks, a search strategy and a placement
(:class:`BankMachine`).

Two kinds of machine, each with only the methods it honours:

* **bank machines** (:class:`BankMachine`: IS, LS, ELS, bbELS) — a softmax over a bank of training
  patches that can be prebuilt (:meth:`BankMachine.prepare`), searched by a strategy
  (:meth:`BankMachine.with_search`: :mod:`ellsjax.machines.search`) and split over devices
  (:meth:`BankMachine.shard`);
* **other machines** (:class:`Machine`: PSPC, Wiener, PCA locality, σ-CFDM) — they read their
  training set (or its statistics) at every call and have no banks to prepare, search or shard.

The denoiser interface itself lives in :mod:`ellsjax.denoiser`; chunk sizing in
:mod:`ellsjax.machines._policy`; bank building in :mod:`ellsjax.machines._banks`.

**Banks are an explicit value.** :meth:`BankMachine.prepare` returns a new machine whose ``banks``
hold the deduplicated banks of the requested scales (a machine never changes, and nothing is memoized
on it): keep the returned machine and pass it on. Samplers prepare for their own run; for repeated
``denoise`` calls, prepare once::

    m = ej.machines.els(images).prepare((3, 5))   # banks of k = 3 and 5, built once
    m.denoise(x, 0.5, scale=5)                    # reuses them

An unprepared machine streams its windows straight from the training images at every call (exact,
no bank built and dropped).

**Shapes without data.** Every builder also takes ``jax.ShapeDtypeStruct`` images (a *shape-only*
machine): it cannot run or prepare, but it can be traced, lowered, compiled and exported for any
platform (``jax.jit(f).trace(machine, ...)``), which is how a capacity plan is made without data.
"""

from __future__ import annotations

import abc
import dataclasses
from functools import partial
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from ellsjax import _checks
from ellsjax import schedules as _schedules
from ellsjax.denoiser import Denoiser
from ellsjax.machines import _banks, _export
from ellsjax.machines._banks import bank_key
from ellsjax.machines._policy import (
    MIN_CHUNK_ENTRIES,
    MIN_QUERY_TILE,
    ExecutionPolicy,
    check_platform,
    images_per_chunk,
    memory_budgets,
    query_tile,
)
from ellsjax.machines.search import (
    AbstractPlacement,
    AbstractSearch,
    BankMap,
    CertifiedSubset,
    Exact,
    Pruned,
    Sharded,
    Single,
    StreamPlan,
    TopK,
    _platform_of,
)

# the static records a serialized machine may hold, and its bank records
for _cls in (_schedules.Schedule, ExecutionPolicy, Exact, TopK, Pruned, CertifiedSubset, Single):
    _export.register_static(_cls)
jax.export.register_namedtuple_serialization(_banks.DeviceBank, serialized_name="ellsjax.DeviceBank")
jax.export.register_namedtuple_serialization(_banks.BlockIndex, serialized_name="ellsjax.BlockIndex")

#: What a builder takes as its training set: ``[N, H, W, C]`` images, or their shapes only.
TrainingImages = Float[ArrayLike, "n h w c"] | jax.ShapeDtypeStruct

__all__ = [
    "TrainingImages", "Denoiser", "Machine", "BankMachine", "ExecutionPolicy", "PixelProvenance", "BankMap", "memory_budgets",
    "MIN_CHUNK_ENTRIES", "MIN_QUERY_TILE", "query_tile", "bank_key",
]


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
    """Base of the analytic machines: a training set, optionally split by class (abstract).

    Attributes:
        pixels: ``[N, H·W·C]`` float32 training images, flattened row-major: how a machine stores
            them (a 2-D array has no padded device layout: on TPUs a ``[N, H, W, 3]`` array pads its
            3 channels to 128 lanes, and a relayout of the whole training set would be a second
            copy of it). ``jax.ShapeDtypeStruct`` in a shape-only machine. :attr:`images` is the
            ``[N, H, W, C]`` view.
        class_members: ``[K, Nmax]`` int32 indices of each class's images (padded), or ``None``.
        hwc: the image shape ``(H, W, C)`` (static).
        schedule: the noise schedule.
        class_sizes: number of training images per class id ``0 … K−1`` (static), or ``None``.
        policy: how it runs (:class:`~ellsjax.machines.ExecutionPolicy`: chunking, memory and bank
            budgets, target platform); never what it computes.
    """

    pixels: Float[Array, "n d"]
    class_members: Int[Array, "k nmax"] | None
    hwc: tuple[int, int, int]
    schedule: _schedules.Schedule = _schedules.cosine_legacy()
    class_sizes: tuple[int, ...] | None = None
    policy: ExecutionPolicy = ExecutionPolicy()

    _DATA_FIELDS: ClassVar[tuple[str, ...]] = ("pixels", "class_members")

    def _denoise_provenance(self, x_t, t, label, scale) -> tuple[Array, PixelProvenance]:
        """``(x̂0, provenance)``: :meth:`_denoise` that also reports, per output pixel, the training
        patch with the largest weight and the weights' entropy. Streams the training images (no
        prebuilt, deduplicated bank: every patch keeps its image and position) through the same
        kernel pass (:func:`ellsjax.kernel.streaming_softmax` with ``provenance=True``). Pure and
        unchecked, like :meth:`_denoise`."""
        raise TypeError(f"{type(self).__name__} does not report provenance")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.hwc)  # type: ignore[return-value]

    @property
    def num_images(self) -> int:
        return self.pixels.shape[0]

    @property
    def images(self) -> Float[Array, "n h w c"]:
        """The ``[N, H, W, C]`` training images (a view of :attr:`pixels`; inside the machines'
        programs the flat array is read directly)."""
        if self.shape_only:
            return jax.ShapeDtypeStruct((self.num_images, *self.hwc), self.pixels.dtype)
        return self.pixels.reshape(self.num_images, *self.hwc)

    @property
    def conditional(self) -> bool:
        return self.class_sizes is not None

    @property
    def shape_only(self) -> bool:
        """Whether this machine was built from ``jax.ShapeDtypeStruct`` images (no data)."""
        return isinstance(self.pixels, jax.ShapeDtypeStruct)

    def check_label(self, label: Array | None) -> None:
        if label is None:
            return
        if self.class_sizes is None:
            raise ValueError("label: this machine was built without labels; pass labels=... to build it")
        present = [k for k, n in enumerate(self.class_sizes) if n > 0]
        bad = sorted({int(v) for v in np.asarray(label).ravel() if not (0 <= v < len(self.class_sizes)) or self.class_sizes[v] == 0})
        if bad:
            raise ValueError(f"label: no training images of class {bad}; classes present: {present}")

    def _label_ok(self, label):
        return _checks.labels_present(label, self.class_sizes)

    def with_policy(self, **changes: Any) -> Machine:
        """This machine with some :class:`ExecutionPolicy` fields changed (same results)."""
        return dataclasses.replace(self, policy=dataclasses.replace(self.policy, **changes))

    def _ready(self, scale: Any, label: Any) -> Machine:
        if self.shape_only:
            raise ValueError(f"images: this {type(self).__name__} was built from shapes only (jax.ShapeDtypeStruct); "
                             "it can be traced, compiled and exported (jax.jit(f).trace(machine, ...)), not run")
        return self

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
        # rows of the flat array, shaped after the gather (a chunk's relayout is chunk-sized)
        return self.pixels[idx].reshape(*idx.shape, *self.hwc), ok  # [Gb, c, H, W, C], [Gb, c]


@dataclasses.dataclass(frozen=True, eq=False)
class BankMachine(Machine):
    """A machine whose posterior is a softmax over a bank of training patches (abstract): banks can
    be prebuilt (:meth:`prepare`), searched by a strategy (:meth:`with_search`) and placed over
    devices (:meth:`shard`); :meth:`denoise_with_bound` returns the estimate with its certified bound.
    Its attributes are :class:`Machine`'s and these.

    Attributes:
        banks: prebuilt deduplicated banks, ``{bank_key(scale, conditional): {group: DeviceBank}}``
            (:func:`bank_key`, :class:`~ellsjax.machines._banks.DeviceBank`); empty until
            :meth:`prepare` returns a machine that carries them.
        search: the search strategy (:mod:`ellsjax.machines.search`; default :class:`Exact`).
        placement: where the banks live (:class:`Single` or :class:`Sharded`).
    """

    banks: dict = dataclasses.field(default_factory=dict)
    search: AbstractSearch = Exact()
    placement: AbstractPlacement = Single()

    _DATA_FIELDS: ClassVar[tuple[str, ...]] = Machine._DATA_FIELDS + ("banks",)

    # -- to implement ----------------------------------------------------------------------------
    @abc.abstractmethod
    def _bank_layout(self, scale: Any) -> dict[str, tuple[np.ndarray, int | None]]:
        """Per position group: the bank window index ``[G, Pb, kk]`` and the value's index in the
        window (``None``: the value is the whole window)."""

    @abc.abstractmethod
    def _denoise_bounded(self, x_t, t, label, scale) -> tuple[Array, Array]:
        """Pure ``(x̂0 [B, H, W, C], bound [B, H, W])`` under this machine's search and placement."""

    def _denoise(self, x_t, t, label, scale):
        return self._denoise_bounded(x_t, t, label, scale)[0]

    # -- prebuilt banks --------------------------------------------------------------------------
    def _bank_scales(self, scales: Any) -> set:
        """The bank keys' scales that running at ``scales`` needs (patch machines: the scales
        themselves, checked; machines whose bank does not depend on the scale: ``{None}``)."""
        checked = {self.check_scale(s) for s in scales if s is not None}  # a machine without a scale refuses any
        return checked if self.needs_scale else {None}

    def prepare(self, scales: Any = (None,), *, conditional: bool = False) -> BankMachine:
        """Return this machine with deduplicated banks built for ``scales`` (exact, faster).

        Each bank is built on the host (identical windows stored once with their count) and placed
        on the device(s) by the machine's placement. Banks already carried are kept, so
        ``m.prepare((3,)).prepare((5,))`` carries both and ``m.prepare((3,)).prepare((3,))`` builds
        nothing; ``self`` is unchanged. Banks larger than the policy's ``bank_budget`` are not
        built; those scales keep streaming windows from the images. Each scale is checked as
        :meth:`check_scale` checks it.

        Args:
            scales: the scales to prepare (``None`` entries are ignored).
            conditional: prepare the per-class banks (for ``label=...``) instead of the full one.
        """
        if conditional and not self.conditional:
            raise ValueError("conditional: this machine was built without labels; there are no class banks")
        wanted = sorted(self._bank_scales(scales), key=lambda v: (v is None, v))
        if self.shape_only and wanted:
            raise ValueError("images: a shape-only machine (jax.ShapeDtypeStruct images) has no data to build banks "
                             "from; it streams its windows from the images")
        new = {}
        for k in wanted:
            key = bank_key(k, conditional)
            if key in self.banks:
                continue
            built = self._build_bank(k, conditional)
            if built is not None:
                new[key] = built
        if not new:
            return self
        return dataclasses.replace(self, banks={**self.banks, **new})

    def _bank_fits(self, layout) -> bool:
        """Whether a bank of this layout fits the policy's ``bank_budget`` (else it is never built and
        its scale streams windows from the images)."""
        ch = self.image_shape[-1]
        total = sum(_banks.bank_nbytes(self.num_images, b, ch, c is not None) for b, c in layout.values())
        return total <= self.policy.bank_bytes

    def _build_bank(self, k, conditional):
        layout = self._bank_layout(k)
        n = self.num_images
        if not self._bank_fits(layout):
            return None
        images = np.asarray(self.pixels).reshape(n, *self.hwc)
        if conditional:
            members = [np.asarray(self.class_members)[y, :size] for y, size in enumerate(self.class_sizes)]
        else:
            members = [np.arange(n)]
        return {name: self._place(_banks.build_group_bank(images, members, bidx, center))
                for name, (bidx, center) in layout.items()}

    def _place(self, gb: _banks.GroupBank) -> _banks.DeviceBank:
        """Pack a host bank for the kernel (in bounded blocks where the search needs them) and move
        it to the device(s) of the placement."""
        devices = self.placement.devices
        multiple = _banks.pad_multiple(gb.keys.shape[2], devices)
        block = self.search.bank_block()
        if block is not None:
            block = min(block, multiple // devices)
        # over n devices: n equal slots, each holding ⌈u/n⌉ or ⌊u/n⌋ real entries (pack_group_bank)
        return self.placement.place(_banks.pack_group_bank(gb, multiple, block, devices=devices))

    # -- strategies --------------------------------------------------------------------------------
    def with_search(self, search: AbstractSearch) -> BankMachine:
        """Return this machine searching its prebuilt banks with ``search`` (a strategy of
        :mod:`ellsjax.machines.search`: :class:`Exact`, :class:`TopK` or :class:`Pruned`).

        Banks carried are kept where their layout suits the new search (and dropped where it needs
        another: :class:`Pruned` orders entries in blocks). A search the placement cannot honour
        raises, naming both.

        Example:
            >>> import jax, ellsjax as ej
            >>> from ellsjax.machines.search import Pruned
            >>> imgs = jax.random.uniform(jax.random.key(0), (20, 8, 8, 1), minval=-1, maxval=1)
            >>> m = ej.machines.els(imgs).with_search(Pruned(0.0, block=16)).prepare((3,))
            >>> x = imgs[:1] * 0.9
            >>> bool(abs(m.denoise(x, 0.05, scale=3) - ej.machines.els(imgs).denoise(x, 0.05, scale=3)).max() < 1e-5)
            True
        """
        if not isinstance(search, AbstractSearch):
            raise TypeError(f"search: expected a search strategy (Exact(), TopK(...), Pruned(...)), got {search!r}")
        if not search.for_banks:
            raise TypeError(f"search: {type(search).__name__} is not a search of {type(self).__name__} (a bank "
                            "machine takes Exact, TopK or Pruned)")
        search.check_placement(self.placement)
        banks = self.banks if search.bank_block() == self.search.bank_block() else {}
        return dataclasses.replace(self, search=search, banks=banks)

    def shard(self, mesh: Any = None, *, axis: str = "bank") -> BankMachine:
        """Return this machine with its prebuilt banks split across devices along ``axis`` of ``mesh``
        (:class:`~ellsjax.machines.search.Sharded`; results equal the single-device ones up to float32
        summation order). The budgets follow the mesh's platform. Banks carried so far are dropped
        (:meth:`prepare` rebuilds them split over the mesh). A search that cannot run sharded
        (:class:`TopK`, :class:`Pruned` with a tolerance) raises.

        Args:
            mesh: a ``jax.sharding.Mesh``; default: all devices on one axis named ``axis``.
            axis: the mesh axis the banks are split along.
        """
        if mesh is None:
            mesh = jax.make_mesh((jax.device_count(),), (axis,), axis_types=(jax.sharding.AxisType.Explicit,))
        placement = Sharded(mesh, axis)
        self.search.check_placement(placement)
        policy = dataclasses.replace(self.policy, platform=placement.platform)
        return dataclasses.replace(self, placement=placement, policy=policy, banks={})

    def _ready(self, scale: Any, label: Any) -> BankMachine:
        # a Sharded machine runs sharded over its prepared banks; unprepared it would stream the whole
        # training set on one device, which is not what sharding promises: say so instead
        super()._ready(scale, label)
        if isinstance(self.placement, Sharded):
            k = scale if self.needs_scale else None
            if self._bank_fits(self._bank_layout(k)) and bank_key(k, label is not None) not in self.banks:
                raise ValueError(f"scale: this Sharded machine has no prepared bank for scale {k!r}"
                                 f"{' (class banks)' if label is not None else ''}; its banks are split over the mesh "
                                 f"by prepare: call m = m.prepare(({k!r},){', conditional=True' if label is not None else ''})"
                                 " once and keep m")
        return self

    @property
    def mesh(self):
        """The mesh of a :class:`Sharded` placement (``None`` on one device)."""
        return getattr(self.placement, "mesh", None)

    def denoise_with_bound(self, x_t: Any, t: Any, *, scale: Any = None, label: Any = None):
        """``(x̂0, bound)``: exactly what :meth:`denoise` returns, with a per-pixel bound
        ``|x̂0 − exact| ≤ bound`` in every channel (plus float32 rounding) certified by the search
        strategy — 0 for :class:`Exact` and wherever the exact pass ran (no prebuilt bank, or a
        :class:`TopK` estimate over its tolerance).

        Returns:
            ``(x0_hat [B, H, W, C], bound [B, H, W])``.
        """
        x_t, t, label, scale = self.check_inputs(x_t, t, scale=scale, label=label)
        return _jit_bounded(self._ready(scale, label), x_t, t, label, scale)

    # -- the one streaming dispatch ------------------------------------------------------------------
    def _run_bank(self, queries, bank: _banks.DeviceBank, label, positions_per_image: int, bank_map=None):
        """``(means, bound)`` of one group's queries over its prebuilt bank: the search strategy run
        by the placement. ``queries`` have leading dims ``[G]`` (one bank for the batch) or
        ``[B, G]`` (``label``: each image against its class's bank). ``bank_map`` (a
        :class:`BankMap`) rewrites each streamed chunk (the soft window's weighted keys)."""
        plan = StreamPlan(self.policy, positions_per_image, bank_map)
        return self.placement.run(self.search, queries, bank, label, plan)


@partial(jax.jit, static_argnums=(4,))
def _jit_bounded(d, x_t, t, label, scale):
    return d._denoise_bounded(x_t, t, label, scale)


def register(cls):
    """Register a machine dataclass as a pytree (its ``_DATA_FIELDS`` are leaves, the rest static)
    whose tree can be serialized with ``jax.export`` (:mod:`ellsjax.machines._export`)."""
    meta = [f.name for f in dataclasses.fields(cls) if f.name not in cls._DATA_FIELDS]
    jax.tree_util.register_dataclass(cls, data_fields=list(cls._DATA_FIELDS), meta_fields=meta)
    _export.register_serialization(cls, meta)
    cls.__repr__ = _export.short_repr  # the dataclass repr would print the training set
    return cls


def build(cls, images, labels, *, schedule, chunk_size=None, memory_budget=None, bank_budget=None,
          image_range=(-1.0, 1.0), platform=None, **extra):
    """Check the common constructor arguments and build a machine of class ``cls``.

    ``platform`` (``"cpu"``, ``"gpu"``, ``"tpu"`` or ``None``) sets whose budgets apply; ``None``:
    the platform of the devices the images live on (for ``jax.ShapeDtypeStruct`` images, of their
    ``sharding``, else the default backend's)."""
    imgs, members, sizes = prepare_training_set(images, labels, image_range=image_range)
    platform = check_platform(platform) or images_platform(imgs)
    policy = ExecutionPolicy(chunk_size=chunk_size, memory_budget=memory_budget, bank_budget=bank_budget,
                             platform=platform)
    n, hwc = imgs.shape[0], tuple(int(v) for v in imgs.shape[1:])
    if isinstance(imgs, jax.ShapeDtypeStruct):
        flat = jax.ShapeDtypeStruct((n, int(np.prod(hwc))), imgs.dtype, sharding=imgs.sharding)
    else:
        flat = imgs.reshape(n, -1)
    return cls(flat, members, hwc, schedule=_schedules.get(schedule), class_sizes=sizes, policy=policy, **extra)


def images_platform(images: Any) -> str:
    """The platform (``cpu``/``gpu``/``tpu``) of the devices an array (or a ``ShapeDtypeStruct`` with a
    sharding) lives on; the default backend's where it names none."""
    sharding = getattr(images, "sharding", None)
    devices = getattr(sharding, "device_set", None)
    if devices:
        return _platform_of(next(iter(devices)))
    return _platform_of(jax.devices()[0])


def prepare_training_set(
    images: Any, labels: Any, *, image_range: tuple[float, float] | None = (-1.0, 1.0)
) -> tuple[Array, Array | None, tuple[int, ...] | None]:
    """Check training images/labels (values within ``image_range`` unless it is ``None``); build
    per-class member lists. Returns ``(images, members, sizes)``."""
    if isinstance(images, jax.ShapeDtypeStruct):  # a shape-only machine: shapes and dtype checked, no values
        images = _shape_only_images(images)
    else:
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


def _shape_only_images(images: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    if len(images.shape) != 4:
        raise ValueError(f"images: expected rank 4 [batch, height, width, channels], got shape {images.shape}")
    if images.shape[0] == 0:
        raise ValueError("images: the training set is empty")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"images: expected a floating-point dtype, got {images.dtype}")
    return jax.ShapeDtypeStruct(images.shape, jnp.float32, sharding=images.sharding)
